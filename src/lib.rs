//! swarmfs: mount a BitTorrent swarm as a read-only directory.
//!
//! Layers, imports pointing one way only: `core` <- `net` / `disk` <- `engine` <- `fuse` <- `cli`
//! / `main.rs`.
//! - `core`: pure logic (metainfo, with `names` sanitizing torrent names as libtorrent does,
//!   geometry and file layout, wire codec, the per-peer protocol state machine `peer_proto`,
//!   picker, choker, cache, the `metadata` (BEP 9) and `pex` (BEP 11) extensions, HTTP and UDP
//!   tracker messages, the mainline DHT: `krpc` messages, `routing` k-buckets and `dht`, the node
//!   as a state machine); no I/O, no clock (time is a parameter).
//! - `net`: sockets over the core codecs (peer connections over any byte stream, HTTP and UDP
//!   tracker clients, the built-in tracker, the DHT node's UDP socket task `dht`).
//! - `disk`: piece reads and writes under `--data-dir` on blocking threads, one handle per file.
//! - `engine`: the tokio tasks that run torrents. `state` holds a torrent's shared state behind
//!   named transitions (its invariant: a piece is held iff cached or on disk); `peer` is a thin
//!   loop around `core::peer_proto`; `metadata` fetches a magnet's info dictionary before its
//!   torrent starts; `tasks` owns every task, so shutdown waits for them all. The session owns
//!   the DHT node (one per process, UDP on the listen address); every non-private torrent looks
//!   its peers up and announces itself there (`ticker`).
//! - `fuse`: the filesystem, translating kernel requests into engine reads. `inode` is one
//!   torrent's tree; `library` (pure) puts several side by side at the root with the `.swarmfs/`
//!   control directory; `fs` answers the kernel from them behind a read lock, never the
//!   engine's, and hands control writes to whoever runs the mount (`fs::Control`).
//! - `cli`: one module per subcommand: argument structs (clap) and `run`. `librarian` adds and
//!   removes a mount's torrents (command line, `.swarmfs/add/`, watched directories, `-d`
//!   persistence), shares the cache budget and puts idle torrents to sleep; `control` is the
//!   mount's Unix socket and the `add` / `remove` / `status` commands that talk to it.
//! - `fuzz_targets` (hidden): the bodies of the fuzz targets over the `core` codecs and state
//!   machines, shared by `fuzz/` (cargo-fuzz) and the stable replay test `tests/fuzz_corpus.rs`.
pub mod cli;
pub mod core;
pub mod create;
pub mod disk;
pub mod engine;
pub mod fuse;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod net;
