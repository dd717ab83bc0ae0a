//! swarmfs: mount a BitTorrent swarm as a read-only directory.
//!
//! Layers, imports pointing one way only:
//! `core` <- `net` / `disk` <- `engine` <- `fuse` <- `cli`/`main.rs`.
//! - `core`: pure logic (metainfo, geometry and file layout, wire codec, picker, choker, cache);
//!   no I/O, no clock.
//! - `net`: sockets over the core codecs (peer connections, trackers).
//! - `disk`: the data dir's files (`-d`): one handle per file, positional reads and writes with no
//!   lock held across I/O, async wrappers on blocking threads, the resume check.
//! - `engine`: the tokio tasks that run torrents: picking, choking, verifying, serving reads.
//! - `fuse`: the filesystem, translating kernel requests into engine reads.
//! - `cli`: one module per subcommand: argument structs (clap) and `run`.
pub mod cli;
pub mod core;
pub mod create;
pub mod disk;
pub mod engine;
pub mod fuse;
pub mod net;
