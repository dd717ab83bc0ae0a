//! Orchestration: the tokio tasks that run torrents.
//!
//! `session` owns the listener and the torrents; `torrent` holds one torrent's shared state and
//! its timers; `peer` is one connection's protocol logic; `reader` serves the mount's reads;
//! `store` writes verified pieces to `--data-dir`.
pub mod peer;
pub mod reader;
pub mod session;
pub mod store;
pub mod torrent;
