//! Orchestration: the tokio tasks that run torrents.
//!
//! `session` owns the listener and the torrents; `torrent` is one torrent's shared handle, with
//! its state in `state` (changed only through named transitions) and its timers and connector in
//! `ticker`; `peer` is one connection's thin loop around `core::peer_proto`; `reader` serves the
//! mount's reads (piece data on disk is `crate::disk`); `tasks` owns every task and
//! shuts them down.
//!
//! Imports point one way: `session` -> `ticker` -> `peer` -> `torrent` -> `state`; `reader`
//! extends `torrent`. Time is read only through `tokio::time::Instant` (so tests may pause it).
pub mod metadata;
pub mod peer;
pub mod reader;
pub mod session;
pub(crate) mod state;
pub mod tasks;
#[cfg(test)]
mod tests;
pub mod ticker;
pub mod torrent;
