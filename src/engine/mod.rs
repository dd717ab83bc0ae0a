//! Orchestration: the tokio tasks that run torrents.
//!
//! `session` owns the listener and the torrents; `torrent` holds one torrent's shared state and
//! its timers; `peer` is one connection's protocol logic; `reader` serves the mount's reads.
//! Verified pieces go to `--data-dir` through [`crate::disk::Store`].
pub mod peer;
pub mod reader;
pub mod session;
pub mod torrent;
