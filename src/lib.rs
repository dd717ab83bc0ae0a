//! swarmfs: mount a BitTorrent swarm as a read-only directory.
//!
//! Layers, imports pointing one way only: `core` <- `net` <- `engine` <- `fuse` <- `cli`/`main.rs`.
//! - `core`: pure logic (metainfo, geometry, wire codec, picker, choker, cache); no I/O, no clock.
//! - `net`: sockets over the core codecs (peer connections, trackers).
//! - `engine`: the tokio tasks that run torrents: picking, choking, verifying, serving reads.
//! - `fuse`: the filesystem, translating kernel requests into engine reads.
//! - `cli`: one module per subcommand: argument structs (clap) and `run`.
pub mod cli;
pub mod core;
pub mod create;
pub mod engine;
pub mod fuse;
pub mod net;
