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

/// Where we heard of a peer; progress lines and the mount's `user.swarmfs.peers` count peers by
/// it. One name per source, as users see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerSource {
    /// `--peer`, a magnet's `x.pe`.
    Direct,
    Tracker,
    Dht,
    Pex,
    /// It connected to us.
    Incoming,
}

impl PeerSource {
    pub const ALL: [PeerSource; 5] = [
        PeerSource::Direct,
        PeerSource::Tracker,
        PeerSource::Dht,
        PeerSource::Pex,
        PeerSource::Incoming,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PeerSource::Direct => "direct",
            PeerSource::Tracker => "tracker",
            PeerSource::Dht => "dht",
            PeerSource::Pex => "pex",
            PeerSource::Incoming => "incoming",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Peers counted by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounts([u64; 5]);

impl SourceCounts {
    pub fn add(&mut self, source: PeerSource) {
        self.0[source.index()] += 1;
    }
    pub fn get(&self, source: PeerSource) -> u64 {
        self.0[source.index()]
    }
}

impl SourceCounts {
    /// `direct=1 tracker=0 dht=0 pex=2 incoming=0`: every source, for machines (xattrs).
    pub fn key_values(&self) -> String {
        PeerSource::ALL
            .iter()
            .map(|s| format!("{}={}", s.name(), self.get(*s)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `tracker 3, pex 1` (sources with none left out; `none` if all are).
impl std::fmt::Display for SourceCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = PeerSource::ALL
            .iter()
            .filter(|s| self.get(**s) > 0)
            .map(|s| format!("{} {}", s.name(), self.get(*s)))
            .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}
