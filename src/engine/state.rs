//! One torrent's shared state, changed only through the named transitions below ("peer joined",
//! "block arrived", "piece verified", "read wants these pieces", "peer left", ...). No I/O and no
//! clock here: the torrent calls these under its lock, with `now`, and does the I/O itself. A
//! transition may queue commands to peer tasks (a non-blocking channel send).
//!
//! # The invariant
//! We *hold* a piece (it is in the picker's `have`) iff it is in the cache or on disk. Only held
//! pieces are announced, uploaded or returned to readers. The places that can break it are the
//! ones that add a piece (`piece_verified`, `cache_from_disk`) and the ones that evict
//! (`evicted`, through every cache insert and unpin); `check_invariants` verifies it (in debug
//! builds: after every transition in unit tests, once a second otherwise).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::blame::{Blame, ReceivedPiece};
use crate::core::cache::PieceCache;
use crate::core::choker::{Choker, ChokerConfig, PeerSample};
use crate::core::layout::BLOCK_SIZE;
use crate::core::layout::{Bitfield, BlockRef, Lengths, PieceIndex};
use crate::core::peer_proto::{Command, PathEstimate};
use crate::core::pex;
use crate::core::picker::{BlockOutcome, PeerKey, Picker};
use crate::engine::{PeerSource, SourceCounts};

/// How long an address that broke the protocol stays banned. Not for good, as corrupt data is:
/// a client's bug looks the same as an attack here.
pub(crate) const VIOLATION_BAN: Duration = Duration::from_secs(600);
/// Failed copies of pieces kept to find out who of several senders sent the bad blocks.
const MAX_EVIDENCE_BYTES: usize = 16 << 20;
/// Blocks outstanding at one peer longer than this go to other peers.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer that has had our requests this long and sent no block is dropped: it unchoked us
/// and sends nothing (a slow honest peer delivers something meanwhile).
const STALL_TIMEOUT: Duration = REQUEST_TIMEOUT;
/// Connections being opened at once.
const MAX_HALF_OPEN: usize = 8;
/// A peer that has been neither interested in us nor sent us a block for this long is idle: its
/// slot goes to a newcomer when all are taken (so idle connections cannot lock peers out).
const IDLE_AFTER: Duration = Duration::from_secs(5);
/// Connections one address (IP) may hold in one torrent: a household behind one NAT, not a
/// flood from one host.
const MAX_PEERS_PER_IP: usize = 8;
/// The share of `max_peers` only our own outgoing connections may take (one in five).
const OUTGOING_RESERVE_DIVISOR: usize = 5;
/// Bounds on what a long session remembers about peers it no longer talks to.
const MAX_KNOWN_ADDRS: usize = 10_000;
const MAX_CANDIDATES: usize = 2_000;
const MAX_BANNED: usize = 4_096;
const MAX_GONE_TOTALS: usize = 1_024;
/// The first readahead window of a new sequential stream.
const INITIAL_WINDOW: u64 = 2 << 20;
/// A read this close after the previous one's end still counts as sequential.
const SEQUENTIAL_SLACK: u64 = 1 << 20;
/// Deadline of the first piece of a read, and the step between later ones.
const URGENT_DEADLINE: Duration = Duration::from_millis(300);
const DEADLINE_STEP: Duration = Duration::from_millis(50);
/// What a read's share assumes of a peer whose path is not estimated yet.
const UNKNOWN_PATH: PathEstimate = PathEstimate {
    rtt: Some(Duration::from_millis(100)),
    rate: 1024.0 * 1024.0,
};
/// Blocks of one read spread over the peers one by one; beyond, the rest goes in equal parts.
const MAX_SPREAD_BLOCKS: usize = 4096;
/// A peer that has not unchoked us yet counts for a read's share this long after connecting
/// (it is likely to unchoke within a round trip or two: seeders unchoke newcomers at once).
const UNCHOKE_EXPECTED_WITHIN: Duration = Duration::from_secs(2);

/// What the state needs to know of the torrent's configuration.
#[derive(Debug, Clone)]
pub(crate) struct StateConfig {
    pub lengths: Lengths,
    pub cache_size: u64,
    pub max_peers: usize,
    /// Regular unchoke slots (`ChokerConfig::regular_slots`).
    pub upload_slots: usize,
    /// Fetch every piece (download, seed), not only what readers want.
    pub fetch_all: bool,
    pub has_store: bool,
    /// The largest readahead window of a sequential reader, in bytes.
    pub max_window: u64,
    pub our_peer_id: [u8; 20],
    pub listen_port: u16,
    /// The address we listen on, when the listener is bound to one.
    pub local_ip: Option<IpAddr>,
    /// Never unchoke anyone (`--no-upload`).
    pub no_upload: bool,
    pub seed: u64,
}

struct PeerEntry {
    addr: SocketAddr,
    /// Where others can connect to it: its address if we connected to it, else the listen
    /// port its extension handshake gave (for PEX).
    listen_addr: Option<SocketAddr>,
    source: PeerSource,
    peer_id: [u8; 20],
    tx: mpsc::UnboundedSender<Command>,
    /// Cancelled to drop the connection (a ban, or the torrent shutting down).
    cancel: CancellationToken,
    connected_at: Instant,
    peer_interested: bool,
    /// The choker's decision; the peer task puts it on the wire.
    unchoked: bool,
    downloaded: u64,
    uploaded: u64,
    download_rate: u64,
    upload_rate: u64,
    last_block_at: Option<Instant>,
    is_seed: bool,
    /// The peer task's latest round trip and rate estimate.
    path: Option<PathEstimate>,
    /// Whether it unchoked us (None: it has said neither yet).
    unchoking_us: Option<bool>,
    /// When it last was interested in us or sent us a block (or connected).
    useful_at: Instant,
    /// Since when it has had requests of ours and sent no block.
    stalled_since: Option<Instant>,
    /// Dropped to free its slot; its task has not ended yet.
    evicted: bool,
}

impl PeerEntry {
    fn is_incoming(&self) -> bool {
        self.source == PeerSource::Incoming
    }
}

/// A sequential reader's readahead window (one per open file handle).
#[derive(Debug, Clone)]
struct ReadStream {
    next_offset: u64,
    window: u64,
    /// End of the file this stream reads (the window never crosses it).
    end: u64,
    /// The file's first and last pieces, fetched right after waiting reads and before any
    /// readahead (players and archivers read the end soon: MP4 `moov`, MKV cues, ZIP central
    /// directory); each is dropped from here once held, so it is fetched once.
    index: Vec<PieceIndex>,
}

pub type StreamId = u64;

/// What `piece_failed` decided, for logging.
pub(crate) struct Banned {
    pub addr: IpAddr,
}

/// Totals for progress lines and the mount's attributes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerTotals {
    pub down_rate: u64,
    pub up_rate: u64,
    pub peers: usize,
    pub seeds: usize,
}

pub(crate) struct State {
    cfg: StateConfig,
    picker: Picker,
    cache: PieceCache,
    /// Pieces being downloaded (and who sent each block), until they are hashed.
    partial: HashMap<u32, ReceivedPiece>,
    /// Bytes of complete pieces being hashed (they count against the cache budget, as do the
    /// partial ones).
    hashing_bytes: u64,
    peers: HashMap<PeerKey, PeerEntry>,
    choker: Choker,
    next_peer_key: PeerKey,
    /// Addresses learned and not yet tried (deduplicated with `known`).
    candidates: VecDeque<SocketAddr>,
    known: LruCache<SocketAddr, PeerSource>,
    /// Idle (`Torrent::sleep`): no connections in or out until a read wakes the torrent.
    asleep: bool,
    /// Peers that ever joined, by source.
    joined_by_source: SourceCounts,
    connecting: usize,
    /// Who sent corrupt data: strikes by address.
    blame: Blame,
    /// Banned addresses (the IP: a new port or peer id is no escape): for good (corrupt data,
    /// and their peer ids too) or until a time (protocol violations).
    banned_addrs: LruCache<IpAddr, Option<Instant>>,
    banned_ids: LruCache<[u8; 20], ()>,
    /// Pieces verified on disk (with a data dir): they survive cache eviction.
    on_disk: Bitfield,
    store_failed: bool,
    streams: HashMap<StreamId, ReadStream>,
    next_stream: StreamId,
    /// When the latest read started.
    last_read: Option<Instant>,
    /// Pieces each waiting read needs, counted, so deadlines are cleared when the last reader
    /// of a piece is gone.
    read_waiters: HashMap<u32, u32>,
    /// Bytes received from peers that have disconnected, by peer id (with their last address).
    received_from_gone: LruCache<[u8; 20], (SocketAddr, u64)>,
    /// Run `check_invariants` after every transition (unit tests).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    check_each_call: bool,
}

fn bounded<K: std::hash::Hash + Eq, V>(n: usize) -> LruCache<K, V> {
    LruCache::new(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))
}

impl State {
    pub fn new(cfg: StateConfig, on_disk: Bitfield) -> State {
        let mut picker = Picker::with_have(cfg.lengths, &on_disk, cfg.seed);
        picker.set_background(cfg.fetch_all || cfg.has_store);
        State {
            picker,
            cache: PieceCache::new(cfg.cache_size),
            partial: HashMap::new(),
            hashing_bytes: 0,
            peers: HashMap::new(),
            choker: Choker::new(
                ChokerConfig {
                    regular_slots: cfg.upload_slots,
                    ..ChokerConfig::default()
                },
                cfg.seed ^ 0x5eed,
            ),
            next_peer_key: 1,
            candidates: VecDeque::new(),
            known: bounded(MAX_KNOWN_ADDRS),
            asleep: false,
            joined_by_source: SourceCounts::default(),
            connecting: 0,
            blame: Blame::new(BLOCK_SIZE as usize, MAX_BANNED, MAX_EVIDENCE_BYTES),
            banned_addrs: bounded(MAX_BANNED),
            banned_ids: bounded(MAX_BANNED),
            on_disk,
            store_failed: false,
            streams: HashMap::new(),
            last_read: None,
            next_stream: 1,
            read_waiters: HashMap::new(),
            received_from_gone: bounded(MAX_GONE_TOTALS),
            check_each_call: cfg!(test),
            cfg,
        }
    }

    // ---- views ----

    pub fn have(&self) -> &Bitfield {
        self.picker.have()
    }

    pub fn has(&self, piece: PieceIndex) -> bool {
        self.picker.has(piece)
    }

    pub fn is_complete(&self) -> bool {
        self.picker.is_complete()
    }

    pub fn bytes_left(&self) -> u64 {
        let l = &self.cfg.lengths;
        l.pieces()
            .filter(|p| !self.picker.has(*p))
            .map(|p| l.piece_len(p) as u64)
            .sum()
    }

    pub fn cache_used(&self) -> u64 {
        self.cache.used()
    }

    pub fn store_failed(&self) -> bool {
        self.store_failed
    }

    pub fn peer_totals(&self) -> PeerTotals {
        PeerTotals {
            down_rate: self.peers.values().map(|p| p.download_rate).sum(),
            up_rate: self.peers.values().map(|p| p.upload_rate).sum(),
            peers: self.peers.len(),
            seeds: self.peers.values().filter(|p| p.is_seed).count(),
        }
    }

    /// Bytes received from each peer (connected or gone) by peer id, with its last address.
    pub fn received_by_peer(&self) -> Vec<([u8; 20], SocketAddr, u64)> {
        let mut all: HashMap<[u8; 20], (SocketAddr, u64)> = self
            .received_from_gone
            .iter()
            .map(|(id, v)| (*id, *v))
            .collect();
        for p in self.peers.values() {
            let e = all.entry(p.peer_id).or_insert((p.addr, 0));
            e.0 = p.addr;
            e.1 += p.downloaded;
        }
        let mut v: Vec<_> = all.into_iter().map(|(id, (a, n))| (id, a, n)).collect();
        v.sort();
        v
    }

    fn broadcast(&self, c: &Command) {
        for p in self.peers.values() {
            let _ = p.tx.send(c.clone());
        }
    }

    /// New work may be available: every peer tops up its requests.
    pub fn wake_peers(&self) {
        self.broadcast(&Command::Fill);
    }

    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if self.check_each_call {
            self.check_invariants();
        }
    }

    /// Panics if the state is inconsistent (debug builds only).
    #[cfg(debug_assertions)]
    pub fn check_invariants(&self) {
        for p in self.cfg.lengths.pieces() {
            let i = p.get();
            let stored = self.cache.contains(i) || self.on_disk.get(i);
            assert_eq!(
                self.picker.has(p),
                stored,
                "piece {i}: held must equal cached or on disk"
            );
            assert!(
                !(self.picker.has(p) && self.partial.contains_key(&i)),
                "piece {i}: held pieces have no download buffer"
            );
        }
        assert!(self.read_waiters.values().all(|&n| n > 0));
        assert!(self.peers.keys().all(|&k| k < self.next_peer_key));
        assert!(self.slots_taken(false) <= self.cfg.max_peers);
        assert!(self.candidates.len() <= MAX_CANDIDATES);
    }

    // ---- connections ----

    /// A peer address from discovery (`--peer`, trackers, the DHT, PEX); ignored if known,
    /// banned or ourselves.
    pub fn add_candidate(&mut self, addr: SocketAddr, source: PeerSource) {
        if self.banned_for_good(addr.ip()) || self.known.contains(&addr) {
            return;
        }
        let our_ip = match self.cfg.local_ip {
            Some(ip) => addr.ip() == ip,
            None => addr.ip().is_loopback(),
        };
        if addr.port() == self.cfg.listen_port && our_ip {
            return; // ourselves, as a tracker may list us
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            return;
        }
        self.known.put(addr, source);
        self.candidates.push_back(addr);
    }

    /// Lets a known address be tried again (explicit `--peer`s after a disconnect).
    pub fn requeue(&mut self, addr: SocketAddr) {
        let connected = self.peers.values().any(|p| p.addr == addr);
        if !connected && !self.candidates.contains(&addr) && !self.banned_for_good(addr.ip()) {
            self.known.put(addr, PeerSource::Direct);
            self.candidates.push_back(addr);
        }
    }

    /// The next address to connect to, if there is room for another connection.
    pub fn start_connect(&mut self) -> Option<SocketAddr> {
        if self.asleep {
            return None;
        }
        while self.slots_taken(false) + self.connecting < self.cfg.max_peers
            && self.connecting < MAX_HALF_OPEN
        {
            let addr = self.candidates.pop_front()?;
            if self.banned_for_good(addr.ip()) || self.peers.values().any(|p| p.addr == addr) {
                continue;
            }
            self.connecting += 1;
            return Some(addr);
        }
        None
    }

    pub fn connect_finished(&mut self) {
        self.connecting = self.connecting.saturating_sub(1);
    }

    /// Connections holding a slot (all, or only incoming ones); evicted ones hold none.
    fn slots_taken(&self, incoming_only: bool) -> usize {
        self.peers
            .values()
            .filter(|p| !p.evicted && (!incoming_only || p.is_incoming()))
            .count()
    }

    /// Whether a newcomer finds a slot, freeing an idle peer's if need be. Incoming
    /// connections may not take the slots kept for our own outgoing ones.
    /// One address may hold at most `MAX_PEERS_PER_IP` slots; a newcomer from an address at
    /// that bound may only replace an idle peer of the same address.
    fn make_room(&mut self, addr: IpAddr, outgoing: bool, now: Instant) -> bool {
        let reserve = self.cfg.max_peers / OUTGOING_RESERVE_DIVISOR;
        let from_addr = self
            .peers
            .values()
            .filter(|p| !p.evicted && p.addr.ip() == addr)
            .count();
        let addr_full = from_addr >= MAX_PEERS_PER_IP;
        let full = addr_full
            || self.slots_taken(false) >= self.cfg.max_peers
            || (!outgoing && self.slots_taken(true) >= self.cfg.max_peers - reserve);
        if !full {
            return true;
        }
        // Incoming newcomers replace incoming peers: the reserve stays with outgoing ones.
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| !p.evicted && (outgoing || p.is_incoming()))
            .filter(|(_, p)| !addr_full || p.addr.ip() == addr)
            .filter(|(_, p)| {
                !p.peer_interested && now.saturating_duration_since(p.useful_at) >= IDLE_AFTER
            })
            .map(|(k, p)| (p.useful_at, *k))
            .min();
        let Some((_, victim)) = victim else {
            return false;
        };
        if let Some(p) = self.peers.get_mut(&victim) {
            log::debug!("dropping idle peer {} to make room", p.addr);
            p.evicted = true;
            p.cancel.cancel();
        }
        true
    }

    /// A connected peer joins; None if we must not keep it (banned, self, duplicate, or full of
    /// peers that are not idle). Returns its key and what we hold now (the peer's opening
    /// bitfield).
    pub fn peer_joined(
        &mut self,
        addr: SocketAddr,
        outgoing: bool,
        peer_id: [u8; 20],
        tx: mpsc::UnboundedSender<Command>,
        cancel: CancellationToken,
        now: Instant,
    ) -> Option<(PeerKey, Bitfield)> {
        if self.asleep
            || peer_id == self.cfg.our_peer_id
            || self.banned_at(addr.ip(), now)
            || self.banned_ids.contains(&peer_id)
            || self.peers.values().any(|p| p.peer_id == peer_id)
            || !self.make_room(addr.ip(), outgoing, now)
        {
            return None;
        }
        let key = self.next_peer_key;
        self.next_peer_key += 1;
        let source = match outgoing {
            true => self
                .known
                .peek(&addr)
                .copied()
                .unwrap_or(PeerSource::Direct),
            false => PeerSource::Incoming,
        };
        self.joined_by_source.add(source);
        self.peers.insert(
            key,
            PeerEntry {
                addr,
                listen_addr: outgoing.then_some(addr),
                source,
                peer_id,
                tx,
                cancel,
                connected_at: now,
                peer_interested: false,
                unchoked: false,
                downloaded: 0,
                uploaded: 0,
                download_rate: 0,
                upload_rate: 0,
                last_block_at: None,
                is_seed: false,
                path: None,
                unchoking_us: None,
                useful_at: now,
                stalled_since: None,
                evicted: false,
            },
        );
        if self.picker.have().count_ones() > 0 && self.choker.on_connected(key) {
            self.set_unchoked(key, true);
        }
        self.debug_check();
        Some((key, self.picker.have().clone()))
    }

    /// A peer's connection ended: its pieces no longer count, its requests go to others.
    pub fn peer_left(&mut self, key: PeerKey, bitfield: &Bitfield) {
        if let Some(p) = self.peers.remove(&key) {
            let total = self
                .received_from_gone
                .get(&p.peer_id)
                .map_or(0, |(_, n)| *n);
            self.received_from_gone
                .put(p.peer_id, (p.addr, total + p.downloaded));
        }
        self.picker.peer_gone(key, bitfield);
        self.choker.peer_gone(key);
        self.wake_peers();
        self.debug_check();
    }

    /// An incoming peer told its listen port (extension handshake): others may connect there.
    pub fn peer_listen_port(&mut self, key: PeerKey, port: u16) {
        if let Some(p) = self.peers.get_mut(&key) {
            if p.listen_addr.is_none() && port != 0 {
                p.listen_addr = Some(SocketAddr::new(p.addr.ip(), port));
            }
        }
    }

    /// The peers `key` may hear of through PEX: every other connected peer we know a listen
    /// address of, with its BEP 11 flags.
    pub fn pex_contacts(&self, key: PeerKey) -> Vec<(SocketAddr, u8)> {
        self.peers
            .iter()
            .filter(|(k, _)| **k != key)
            .filter_map(|(_, p)| {
                let mut flags = 0;
                if p.is_seed {
                    flags |= pex::FLAG_SEED;
                }
                if p.listen_addr == Some(p.addr) {
                    flags |= pex::FLAG_REACHABLE;
                }
                Some((p.listen_addr?, flags))
            })
            .collect()
    }

    /// Connected peers by source, and every peer that ever joined by source.
    pub fn peer_sources(&self) -> (SourceCounts, SourceCounts) {
        let mut now = SourceCounts::default();
        for p in self.peers.values() {
            now.add(p.source);
        }
        (now, self.joined_by_source)
    }

    pub fn peer_has(&mut self, piece: PieceIndex) {
        self.picker.peer_has(piece);
    }

    pub fn peer_bitfield(&mut self, bitfield: &Bitfield) {
        self.picker.peer_has_bitfield(bitfield);
    }

    pub fn peer_is_seed(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.is_seed = true;
        }
    }

    /// The peer task's rates after a tick; `uploaded` is the block bytes sent since the last.
    pub fn peer_rates(&mut self, key: PeerKey, download: u64, upload: u64, uploaded: u64) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.download_rate = download;
            p.upload_rate = upload;
            p.uploaded += uploaded;
        }
    }

    /// The peer task's path estimate after a tick (`rate` in bytes/s).
    pub fn peer_path(&mut self, key: PeerKey, rtt: Duration, rate: u64) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.path = Some(PathEstimate {
                rtt: Some(rtt),
                rate: rate as f64,
            });
        }
    }

    fn samples(&self) -> Vec<PeerSample> {
        self.peers
            .iter()
            .map(|(k, p)| PeerSample {
                peer: *k,
                interested: p.peer_interested,
                download_rate: p.download_rate,
                upload_rate: p.upload_rate,
                connected_at: p.connected_at,
                last_block_received: p.last_block_at,
                unchoked: p.unchoked,
            })
            .collect()
    }

    fn set_unchoked(&mut self, key: PeerKey, unchoked: bool) {
        if unchoked && self.cfg.no_upload {
            return;
        }
        if let Some(p) = self.peers.get_mut(&key) {
            if p.unchoked != unchoked {
                p.unchoked = unchoked;
                let c = if unchoked {
                    Command::Unchoke
                } else {
                    Command::Choke
                };
                let _ = p.tx.send(c);
            }
        }
    }

    /// A peer's interest in us changed: unchoke it at once if a slot is free.
    pub fn peer_interested(&mut self, key: PeerKey, interested: bool, now: Instant) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.peer_interested = interested;
            // Useful until now: its idle time starts when it loses interest.
            p.useful_at = now;
        }
        if interested {
            let samples = self.samples();
            if self.choker.on_interested(now, key, &samples) {
                self.set_unchoked(key, true);
            }
        }
    }

    /// The periodic choke round (the choker decides whether one is due).
    pub fn choke_round(&mut self, now: Instant) {
        let samples = self.samples();
        let seeding = self.picker.is_complete();
        if let Some(decision) = self.choker.tick(now, &samples, seeding) {
            let unchoke: HashSet<PeerKey> = decision.unchoke.iter().copied().collect();
            let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
            for k in keys {
                self.set_unchoked(k, unchoke.contains(&k));
            }
        }
    }

    // ---- requests ----

    /// Up to `max` blocks for `key` to request.
    pub fn pick(
        &mut self,
        key: PeerKey,
        bitfield: &Bitfield,
        max: usize,
        now: Instant,
    ) -> Vec<BlockRef> {
        // A waiting read's blocks not yet asked for: this peer takes its share, the rest is
        // left for the peers that deliver sooner (the first peer to unchoke us does not take
        // a whole piece that eight peers would bring in an eighth of the time).
        let pending = self.picker.unrequested_deadline_blocks();
        let deadline_max = match pending {
            0 => usize::MAX,
            n => self
                .urgent_shares(n, now)
                .get(&key)
                .copied()
                .unwrap_or(0)
                .max(1),
        };
        let blocks = self
            .picker
            .pick_sharing_deadlines(key, bitfield, max, deadline_max, now);
        if let Some(p) = self.peers.get_mut(&key).filter(|_| !blocks.is_empty()) {
            p.stalled_since.get_or_insert(now);
        }
        self.debug_check();
        blocks
    }

    pub fn block_rejected(&mut self, key: PeerKey, block: BlockRef) {
        self.picker.block_rejected(key, block);
        self.wake_peers();
    }

    /// The peer cancelled these requests to make room for a read's: others may take them.
    pub fn requests_withdrawn(&mut self, key: PeerKey, blocks: &[BlockRef]) {
        for &b in blocks {
            self.picker.block_rejected(key, b);
        }
        self.debug_check();
    }

    pub fn peer_unchoked_us(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.unchoking_us = Some(true);
        }
    }

    pub fn peer_choked_us(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.unchoking_us = Some(false);
            p.stalled_since = None;
        }
        if !self.picker.peer_choked(key).is_empty() {
            self.wake_peers();
        }
    }

    /// Requests outstanding too long go back to the pool; their peers hear of it. Peers that
    /// have sent nothing for `STALL_TIMEOUT` while holding requests are dropped (also when
    /// other peers beat them to those blocks: a peer that never delivers is no use).
    pub fn expire_requests(&mut self, now: Instant) {
        for (k, p) in &self.peers {
            let stalled = p
                .stalled_since
                .is_some_and(|t| now.saturating_duration_since(t) >= STALL_TIMEOUT);
            if stalled && !p.evicted && self.picker.in_flight(*k) > 0 {
                log::info!(
                    "dropping peer {}: it has sent nothing for {STALL_TIMEOUT:?} while holding our requests",
                    p.addr
                );
                p.cancel.cancel();
            }
        }
        let expired = self.picker.expire_requests(now, REQUEST_TIMEOUT);
        if !expired.is_empty() {
            log::debug!("{} requests timed out", expired.len());
            let mut by_peer: HashMap<PeerKey, Vec<BlockRef>> = HashMap::new();
            for (k, b) in expired {
                by_peer.entry(k).or_default().push(b);
            }
            for (k, blocks) in by_peer {
                if let Some(p) = self.peers.get(&k) {
                    let _ = p.tx.send(Command::Expired(blocks));
                }
            }
        }
        self.update_background();
        self.wake_peers();
    }

    /// A block arrived from `key`. Returns the piece's buffer when it completed it (to hash).
    /// Peers that also had the block in flight are told to cancel it.
    pub fn block_arrived(
        &mut self,
        key: PeerKey,
        block: BlockRef,
        data: &[u8],
        now: Instant,
    ) -> BlockArrival {
        if let Some(p) = self.peers.get_mut(&key) {
            p.downloaded += data.len() as u64;
            p.last_block_at = Some(now);
            p.useful_at = now;
            p.stalled_since = None;
        }
        let outcome = self.picker.block_received(key, block, now);
        let BlockOutcome::Accepted {
            piece_complete,
            cancel,
        } = outcome
        else {
            return BlockArrival::Unwanted;
        };
        let Some(piece) = self.cfg.lengths.piece(block.piece) else {
            return BlockArrival::Unwanted;
        };
        let plen = self.cfg.lengths.piece_len(piece) as usize;
        if let std::collections::hash_map::Entry::Vacant(e) = self.partial.entry(block.piece) {
            e.insert(ReceivedPiece {
                data: vec![0u8; plen],
                senders: vec![None; plen.div_ceil(BLOCK_SIZE as usize)],
            });
            self.reserve_piece_memory();
        }
        let Some(received) = self.partial.get_mut(&block.piece) else {
            return BlockArrival::Unwanted;
        };
        let start = block.offset as usize;
        if let Some(dst) = received.data.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
        if let Some(sender) = received.senders.get_mut(start / BLOCK_SIZE as usize) {
            *sender = self.peers.get(&key).map(|p| p.addr.ip());
        }
        for k in cancel {
            if let Some(p) = self.peers.get(&k) {
                let _ = p.tx.send(Command::Cancel(block));
            }
        }
        let done = if piece_complete {
            match self.partial.remove(&block.piece) {
                Some(buf) => {
                    self.hashing_bytes += buf.data.len() as u64;
                    BlockArrival::PieceComplete(piece, buf)
                }
                None => BlockArrival::Accepted,
            }
        } else {
            BlockArrival::Accepted
        };
        self.debug_check();
        done
    }

    // ---- verification ----

    /// The piece's hash matched; `on_disk` if it was written to the data dir. Returns the
    /// addresses this banned (the good copy proved they sent bad blocks of it before).
    pub fn piece_verified(&mut self, piece: PieceIndex, data: Bytes, on_disk: bool) -> Vec<Banned> {
        let guilty = self.blame.piece_verified(piece.get(), &data);
        let banned = self.ban(guilty);
        self.hashing_bytes = self.hashing_bytes.saturating_sub(data.len() as u64);
        self.reserve_piece_memory();
        self.picker.piece_verified(piece);
        if on_disk {
            self.on_disk.set(piece.get(), true);
        }
        // Pieces a reader waits for go to the cache even when on disk: the reader copies from it.
        let evicted = self.cache.insert(piece.get(), data);
        self.broadcast(&Command::Have(piece.get()));
        self.evicted(&evicted);
        self.update_background();
        self.debug_check();
        banned
    }

    /// The piece failed its hash check: fetched again. Returns how many peers sent it and the
    /// addresses this banned.
    pub fn piece_failed(
        &mut self,
        piece: PieceIndex,
        failed: ReceivedPiece,
    ) -> (usize, Vec<Banned>) {
        let contributors = self.picker.piece_failed(piece);
        self.hashing_bytes = self.hashing_bytes.saturating_sub(failed.data.len() as u64);
        self.reserve_piece_memory();
        let guilty = self.blame.piece_failed(piece.get(), failed);
        let banned = self.ban(guilty);
        self.wake_peers();
        self.debug_check();
        (contributors.len(), banned)
    }

    /// Bans addresses for good: their connections are dropped, and no peer id of theirs joins
    /// again.
    fn ban(&mut self, addrs: Vec<IpAddr>) -> Vec<Banned> {
        for &addr in &addrs {
            self.banned_addrs.put(addr, None);
            for p in self.peers.values().filter(|p| p.addr.ip() == addr) {
                p.cancel.cancel();
                self.banned_ids.put(p.peer_id, ());
            }
        }
        addrs.into_iter().map(|addr| Banned { addr }).collect()
    }

    /// A peer broke the protocol: its address is banned for `VIOLATION_BAN` (unless it
    /// already is for good), and its other connections are dropped.
    pub fn peer_misbehaved(&mut self, addr: IpAddr, now: Instant) {
        if self.banned_for_good(addr) {
            return;
        }
        self.banned_addrs.put(addr, Some(now + VIOLATION_BAN));
        for p in self.peers.values().filter(|p| p.addr.ip() == addr) {
            p.cancel.cancel();
        }
    }

    fn banned_for_good(&self, addr: IpAddr) -> bool {
        matches!(self.banned_addrs.peek(&addr), Some(None))
    }

    fn banned_at(&self, addr: IpAddr, now: Instant) -> bool {
        match self.banned_addrs.peek(&addr) {
            Some(None) => true,
            Some(Some(until)) => now < *until,
            None => false,
        }
    }

    pub fn set_store_failed(&mut self) {
        self.store_failed = true;
        self.update_background();
    }

    // ---- piece data ----

    /// Verified data from the cache; `touch` marks it recently used (readers do, uploads not).
    pub fn cached_piece(&mut self, piece: PieceIndex, touch: bool) -> Option<Bytes> {
        if touch {
            self.cache.get(piece.get())
        } else {
            self.cache.peek(piece.get())
        }
    }

    pub fn is_on_disk(&self, piece: PieceIndex) -> bool {
        self.on_disk.get(piece.get())
    }

    /// A held piece read back from disk goes to the cache.
    pub fn cache_from_disk(&mut self, piece: PieceIndex, data: Bytes) {
        if !self.on_disk.get(piece.get()) {
            return;
        }
        let evicted = self.cache.insert(piece.get(), data);
        self.evicted(&evicted);
        self.debug_check();
    }

    /// The cache's share of the session's budget changed (`Torrent::set_cache_budget`).
    pub fn set_cache_budget(&mut self, bytes: u64) {
        let evicted = self.cache.set_budget(bytes);
        self.evicted(&evicted);
        self.update_background();
        self.debug_check();
    }

    /// Counts as a read for idleness (a torrent just added has not been idle yet).
    pub fn touch(&mut self, now: Instant) {
        self.last_read = Some(now);
    }

    /// Whether a reader has a file open or read within `within` of `now`.
    pub fn is_being_read(&self, now: Instant, within: Duration) -> bool {
        !self.streams.is_empty()
            || self
                .last_read
                .is_some_and(|t| now.saturating_duration_since(t) < within)
    }

    /// Pieces evicted from the cache that are not on disk are no longer held.
    /// Pieces being downloaded or hashed take their room from the cache, so the budget bounds
    /// all piece data held.
    fn reserve_piece_memory(&mut self) {
        let partial: u64 = self.partial.values().map(|p| p.data.len() as u64).sum();
        let evicted = self.cache.set_reserved(partial + self.hashing_bytes);
        self.evicted(&evicted);
    }

    fn evicted(&mut self, evicted: &[u32]) {
        for &e in evicted {
            if self.on_disk.get(e) {
                continue;
            }
            if let Some(p) = self.cfg.lengths.piece(e) {
                self.picker.piece_lost(p);
                self.broadcast(&Command::Lost(e));
            }
        }
    }

    /// Whether to fetch pieces nobody is reading: always for download/seed and with a working
    /// data dir; otherwise only while the cache has room.
    fn update_background(&mut self) {
        let on = self.cfg.fetch_all
            || (self.cfg.has_store && !self.store_failed)
            || self.cache.has_room(self.cfg.lengths.piece_length() as u64);
        self.picker.set_background(on);
    }

    // ---- reads ----

    /// Opens a readahead stream for a file spanning `[start, end)` of the torrent.
    pub fn open_stream(&mut self, start: u64, end: u64) -> StreamId {
        let id = self.next_stream;
        self.next_stream += 1;
        let lengths = self.cfg.lengths;
        let mut index: Vec<PieceIndex> = Vec::new();
        if end > start {
            for offset in [start, end - 1] {
                let first = lengths.pieces_for_range(offset, 1).start;
                if let Some(p) = lengths.piece(first) {
                    if !self.picker.has(p) && !index.contains(&p) {
                        index.push(p);
                    }
                }
            }
        }
        self.streams.insert(
            id,
            ReadStream {
                next_offset: start,
                window: 0,
                end,
                index: index.clone(),
            },
        );
        self.apply_readahead();
        if !index.is_empty() {
            self.wake_peers();
        }
        self.debug_check();
        id
    }

    pub fn close_stream(&mut self, id: StreamId) {
        self.streams.remove(&id);
        self.apply_readahead();
    }

    /// A read of `[offset, end)` starts: its pieces are pinned, the missing ones get deadlines,
    /// the stream's readahead window moves. Returns the pieces still missing. Every call must be
    /// matched by `read_done` with the same pieces.
    pub fn read_wants(
        &mut self,
        stream: Option<StreamId>,
        offset: u64,
        end: u64,
        pieces: &[PieceIndex],
        now: Instant,
    ) -> Vec<PieceIndex> {
        self.last_read = Some(now);
        if let Some(s) = stream.and_then(|id| self.streams.get_mut(&id)) {
            let max = self.cfg.max_window;
            let sequential = offset >= s.next_offset && offset - s.next_offset < SEQUENTIAL_SLACK;
            s.window = if !sequential {
                0 // a seek: start over small
            } else if s.window == 0 {
                INITIAL_WINDOW.min(max)
            } else {
                (s.window * 2).min(max)
            };
            s.next_offset = end;
        }
        let mut missing = Vec::new();
        for (i, &p) in pieces.iter().enumerate() {
            self.cache.pin(p.get());
            *self.read_waiters.entry(p.get()).or_insert(0) += 1;
            if !self.picker.has(p) {
                let deadline = now + URGENT_DEADLINE + DEADLINE_STEP * i as u32;
                self.picker.set_deadline(p, deadline);
                missing.push(p);
            }
        }
        self.apply_readahead();
        self.read_waiting(&missing, now);
        self.debug_check();
        missing
    }

    /// Peers hear of a read waiting for `missing`. If some of its blocks are not requested
    /// yet (nothing anticipated the read: random access, a seek), every peer's background
    /// requests yield for a while, the blocks are shared out (`urgent_shares`), and each peer
    /// with a share makes room (cancelling bulk requests beyond its path's bandwidth-delay
    /// product) and asks for them at once. When all are requested already, peers only top up.
    fn read_waiting(&self, missing: &[PieceIndex], now: Instant) {
        let mut unrequested = 0usize;
        let mut pieces = Vec::new();
        for &p in missing {
            let n = self.picker.unrequested_blocks(p);
            if n > 0 {
                unrequested += n as usize;
                pieces.push(p.get());
            }
        }
        if pieces.is_empty() {
            if !missing.is_empty() {
                self.wake_peers();
            }
            return;
        }
        let shares = self.urgent_shares(unrequested, now);
        let mut urgent: Vec<u32> = self
            .read_waiters
            .keys()
            .copied()
            .filter(|&p| {
                self.cfg
                    .lengths
                    .piece(p)
                    .is_some_and(|p| !self.picker.has(p))
            })
            .collect();
        urgent.sort_unstable();
        // Every peer hears of it (its background requests yield), those with a share ask for
        // their part of the read's blocks at once.
        for (key, p) in &self.peers {
            let c = Command::ReadWaiting {
                pieces: pieces.clone(),
                share: shares.get(key).copied().unwrap_or(0),
                urgent: urgent.clone(),
            };
            let _ = p.tx.send(c);
        }
    }

    /// Shares `blocks` out one at a time, each to the peer that would deliver it soonest: its
    /// requests in flight and the blocks already given to it, at its rate, plus its round
    /// trip (`UNKNOWN_PATH` until estimated). A fast near peer takes most; a slow far one
    /// gets none when the others finish first. Only peers that unchoke us, or may soon, count.
    fn urgent_shares(&self, blocks: usize, now: Instant) -> HashMap<PeerKey, usize> {
        let mut keys: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| match p.unchoking_us {
                Some(unchoking) => unchoking,
                None => now.saturating_duration_since(p.connected_at) < UNCHOKE_EXPECTED_WITHIN,
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        let mut load: Vec<(PeerKey, f64, f64, f64)> = keys
            .iter()
            .map(|&k| {
                let path = self.peers[&k].path.unwrap_or(UNKNOWN_PATH);
                let rtt = path.rtt.unwrap_or_default().as_secs_f64();
                let block_time = BLOCK_SIZE as f64 / path.rate.max(1.0);
                (k, self.picker.in_flight(k) as f64, block_time, rtt)
            })
            .collect();
        // Connections in their handshake get shares too (left for them when they unchoke us):
        // on a fresh mount the first peer in would otherwise take the whole read.
        let unknown_block_time = BLOCK_SIZE as f64 / UNKNOWN_PATH.rate;
        let unknown_rtt = UNKNOWN_PATH.rtt.unwrap_or_default().as_secs_f64();
        for i in 0..self.connecting.min(MAX_HALF_OPEN) {
            load.push((
                PeerKey::MAX - i as u64,
                0.0,
                unknown_block_time,
                unknown_rtt,
            ));
        }
        let mut shares: HashMap<PeerKey, usize> = HashMap::new();
        if load.is_empty() {
            return shares;
        }
        let spread = blocks.min(MAX_SPREAD_BLOCKS);
        for _ in 0..spread {
            let soonest = load
                .iter_mut()
                .min_by(|a, b| {
                    let eta = |x: &(PeerKey, f64, f64, f64)| (x.1 + 1.0) * x.2 + x.3;
                    eta(a).total_cmp(&eta(b))
                })
                .map(|x| {
                    x.1 += 1.0;
                    x.0
                });
            if let Some(k) = soonest {
                *shares.entry(k).or_insert(0) += 1;
            }
        }
        let rest = (blocks - spread).div_ceil(load.len());
        if rest > 0 {
            for k in keys {
                *shares.entry(k).or_insert(0) += rest;
            }
        }
        shares
    }

    /// The read that `read_wants` started is over (answered, failed or dropped).
    pub fn read_done(&mut self, pieces: &[PieceIndex]) {
        for &p in pieces {
            let evicted = self.cache.unpin(p.get());
            self.evicted(&evicted);
            let last = match self.read_waiters.get_mut(&p.get()) {
                Some(n) => {
                    *n -= 1;
                    *n == 0
                }
                None => true,
            };
            if last {
                self.read_waiters.remove(&p.get());
                self.picker.clear_deadline(p);
            }
        }
        self.debug_check();
    }

    /// The picker's readahead list: every stream's index pieces first, then the windows taken
    /// in turns, a piece of each stream at a time, so streams share the bandwidth left after
    /// waiting reads instead of the first stream's whole window going first.
    fn apply_readahead(&mut self) {
        let mut pieces: Vec<PieceIndex> = Vec::new();
        for s in self.streams.values_mut() {
            s.index.retain(|p| !self.picker.has(*p));
            for p in &s.index {
                if !pieces.contains(p) {
                    pieces.push(*p);
                }
            }
        }
        let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        let mut windows: Vec<std::ops::Range<u32>> = Vec::new();
        for id in ids {
            let s = &self.streams[&id];
            let end = s.next_offset.saturating_add(s.window).min(s.end);
            if s.window > 0 && end > s.next_offset {
                let range = self
                    .cfg
                    .lengths
                    .pieces_for_range(s.next_offset, end - s.next_offset);
                windows.push(range);
            }
        }
        while !windows.is_empty() {
            for w in windows.iter_mut() {
                if let Some(p) = w.next().and_then(|i| self.cfg.lengths.piece(i)) {
                    if !self.picker.has(p) && !pieces.contains(&p) {
                        pieces.push(p);
                    }
                }
            }
            windows.retain(|w| !w.is_empty());
        }
        self.picker.set_readahead(&pieces);
    }

    /// Pieces some read is waiting for (tests check that reads release them).
    #[cfg(test)]
    pub fn reads_waiting(&self) -> usize {
        self.read_waiters.len()
    }

    /// Goes idle: every connection is dropped and none is made or let in until `wake`.
    pub fn sleep(&mut self) {
        self.asleep = true;
        self.disconnect_all();
    }

    /// Leaves idleness: every address known from before is tried again. False if it was awake.
    pub fn wake(&mut self) -> bool {
        if !std::mem::replace(&mut self.asleep, false) {
            return false;
        }
        let again: Vec<SocketAddr> = self
            .known
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| !self.candidates.contains(a) && !self.banned_for_good(a.ip()))
            .collect();
        self.candidates.extend(again);
        true
    }

    pub fn is_asleep(&self) -> bool {
        self.asleep
    }

    pub fn disconnect_all(&self) {
        for p in self.peers.values() {
            p.cancel.cancel();
        }
    }
}

/// What `block_arrived` decided.
pub(crate) enum BlockArrival {
    /// Not needed (a duplicate, or a piece we have): wasted bytes.
    Unwanted,
    Accepted,
    /// The block completed this piece: hash the buffer.
    PieceComplete(PieceIndex, ReceivedPiece),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::layout::BLOCK_SIZE;

    const PIECE: u32 = 2 * BLOCK_SIZE;

    fn state(pieces: u32, cache_pieces: u64, on_disk: &str) -> State {
        state_with_slots(pieces, cache_pieces, on_disk, 4)
    }

    fn state_with_slots(pieces: u32, cache_pieces: u64, on_disk: &str, slots: usize) -> State {
        let lengths = Lengths::new(pieces as u64 * PIECE as u64, PIECE, pieces as u64).unwrap();
        let mut bf = Bitfield::new(pieces);
        for (i, c) in on_disk.chars().enumerate() {
            bf.set(i as u32, c == '#');
        }
        State::new(
            StateConfig {
                lengths,
                cache_size: cache_pieces * PIECE as u64,
                max_peers: 4,
                upload_slots: slots,
                fetch_all: false,
                has_store: on_disk.contains('#'),
                max_window: 4 * PIECE as u64,
                our_peer_id: [1; 20],
                listen_port: 6881,
                local_ip: None,
                no_upload: false,
                seed: 7,
            },
            bf,
        )
    }

    fn join(st: &mut State, id: u8) -> (PeerKey, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Each peer on its own IP, as bans are by IP.
        let addr = SocketAddr::from(([127, 0, 0, id], 1000 + id as u16));
        let (key, _) = st
            .peer_joined(
                addr,
                true,
                [id; 20],
                tx,
                CancellationToken::new(),
                Instant::now(),
            )
            .unwrap();
        (key, rx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Command>) -> Vec<Command> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// Delivers every block of `piece` from `key` and verifies it.
    fn fetch(st: &mut State, key: PeerKey, piece: u32) {
        let p = st.cfg.lengths.piece(piece).unwrap();
        let mut bf = Bitfield::new(st.cfg.lengths.piece_count());
        bf.set(piece, true);
        let now = Instant::now();
        let blocks = st.pick(key, &bf, 2, now);
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        let mut buf = None;
        for b in blocks {
            if let BlockArrival::PieceComplete(q, data) =
                st.block_arrived(key, b, &vec![0; b.length as usize], now)
            {
                assert_eq!(q, p);
                buf = Some(data);
            }
        }
        st.piece_verified(p, Bytes::from(buf.unwrap().data), false);
    }

    #[test]
    fn an_idle_torrent_lets_nobody_in_and_dials_its_known_peers_again_on_waking() {
        let mut st = state(4, 4, "....");
        let a = SocketAddr::from(([127, 0, 0, 9], 9000));
        st.add_candidate(a, PeerSource::Tracker);
        assert_eq!(st.start_connect(), Some(a));
        st.connect_finished();
        st.sleep();
        assert!(st.is_asleep());
        st.add_candidate(SocketAddr::from(([127, 0, 0, 10], 9000)), PeerSource::Dht);
        assert_eq!(st.start_connect(), None, "no dialling while asleep");
        let (tx, _rx) = mpsc::unbounded_channel();
        let joined = st.peer_joined(
            a,
            false,
            [3; 20],
            tx,
            CancellationToken::new(),
            Instant::now(),
        );
        assert!(joined.is_none(), "nobody is let in while asleep");
        assert!(st.wake());
        assert!(!st.wake(), "waking twice is once");
        let mut dialled = std::iter::from_fn(|| {
            let next = st.start_connect();
            st.connect_finished();
            next
        })
        .collect::<Vec<_>>();
        dialled.sort();
        assert_eq!(dialled, [a, SocketAddr::from(([127, 0, 0, 10], 9000))]);
        let _ = join(&mut st, 2);
    }

    #[test]
    fn pieces_being_downloaded_take_their_room_from_the_cache() {
        let mut st = state(4, 2, "....");
        let (k, _rx) = join(&mut st, 2);
        let p: Vec<PieceIndex> = (0..4).map(|i| st.cfg.lengths.piece(i).unwrap()).collect();
        for i in 0..2 {
            st.read_wants(None, 0, PIECE as u64, &p[i..i + 1], Instant::now());
            fetch(&mut st, k, i as u32);
            st.read_done(&p[i..i + 1]);
        }
        assert_eq!(st.have().count_ones(), 2, "the cache holds its two pieces");
        // One block of piece 2 arrives: its buffer is a piece's worth of memory.
        st.read_wants(None, 0, PIECE as u64, &p[2..3], Instant::now());
        let mut bf = Bitfield::new(4);
        bf.set(2, true);
        let blocks = st.pick(k, &bf, 1, Instant::now());
        st.block_arrived(
            k,
            blocks[0],
            &vec![0; blocks[0].length as usize],
            Instant::now(),
        );
        assert_eq!(
            st.have().count_ones(),
            1,
            "a cached piece made room for the one being downloaded"
        );
    }

    #[test]
    fn evicted_pieces_are_no_longer_held_and_peers_hear_it() {
        let mut st = state(4, 1, "....");
        let (k, mut rx) = join(&mut st, 2);
        let pieces: Vec<PieceIndex> = (0..2).map(|i| st.cfg.lengths.piece(i).unwrap()).collect();
        st.read_wants(None, 0, PIECE as u64, &pieces[..1], Instant::now());
        fetch(&mut st, k, 0);
        st.read_done(&pieces[..1]);
        assert!(st.has(pieces[0]));
        drain(&mut rx);
        st.read_wants(
            None,
            PIECE as u64,
            2 * PIECE as u64,
            &pieces[1..],
            Instant::now(),
        );
        fetch(&mut st, k, 1);
        st.read_done(&pieces[1..]);
        // A one-piece cache: piece 0 was evicted when piece 1 arrived.
        assert!(!st.has(pieces[0]) && st.has(pieces[1]));
        let cmds = drain(&mut rx);
        assert!(cmds.contains(&Command::Have(1)), "{cmds:?}");
        assert!(cmds.contains(&Command::Lost(0)), "{cmds:?}");
    }

    #[test]
    fn opening_a_file_fetches_its_first_and_last_pieces_before_readahead_once() {
        let mut st = state(10, 10, "..........");
        let (k, _rx) = join(&mut st, 2);
        let all = {
            let mut bf = Bitfield::new(10);
            (0..10).for_each(|i| bf.set(i, true));
            bf
        };
        // A file over pieces 2..=7 (it starts mid-piece 2 and ends inside piece 7).
        let stream = st.open_stream(2 * PIECE as u64 + 5, 7 * PIECE as u64 + 9);
        let pieces_of = |blocks: &[BlockRef]| -> Vec<u32> {
            let mut ps: Vec<u32> = blocks.iter().map(|b| b.piece).collect();
            ps.dedup();
            ps
        };
        let first = st.pick(k, &all, 4, Instant::now());
        assert_eq!(pieces_of(&first), vec![2, 7], "index pieces, nothing else");
        assert_eq!(
            st.pick(k, &all, 4, Instant::now()),
            vec![],
            "no background fill"
        );
        for b in first {
            if let BlockArrival::PieceComplete(p, data) =
                st.block_arrived(k, b, &vec![0; b.length as usize], Instant::now())
            {
                st.piece_verified(p, Bytes::from(data.data), false);
            }
        }
        // Held now: not asked for again, even when the cache evicts them later.
        st.close_stream(stream);
        let again = st.open_stream(2 * PIECE as u64 + 5, 7 * PIECE as u64 + 9);
        assert_eq!(st.pick(k, &all, 4, Instant::now()), vec![]);
        st.close_stream(again);
        // An empty file has no index pieces.
        st.open_stream(PIECE as u64, PIECE as u64);
        assert_eq!(st.pick(k, &all, 4, Instant::now()), vec![]);
    }

    #[test]
    fn pieces_on_disk_stay_held_when_evicted() {
        let mut st = state(3, 0, "##.");
        let p0 = st.cfg.lengths.piece(0).unwrap();
        st.cache_from_disk(p0, Bytes::from(vec![0; PIECE as usize]));
        let p1 = st.cfg.lengths.piece(1).unwrap();
        st.cache_from_disk(p1, Bytes::from(vec![0; PIECE as usize]));
        assert!(st.has(p0) && st.has(p1));
        // Not on disk: refused, so the invariant holds.
        let p2 = st.cfg.lengths.piece(2).unwrap();
        st.cache_from_disk(p2, Bytes::from(vec![0; PIECE as usize]));
        assert!(!st.has(p2));
    }

    #[test]
    fn a_read_pins_its_pieces_until_done() {
        let mut st = state(4, 1, "....");
        let (k, _rx) = join(&mut st, 2);
        let p: Vec<PieceIndex> = (0..4).map(|i| st.cfg.lengths.piece(i).unwrap()).collect();
        let missing = st.read_wants(None, 0, 2 * PIECE as u64, &p[..2], Instant::now());
        assert_eq!(missing, p[..2].to_vec());
        fetch(&mut st, k, 0);
        fetch(&mut st, k, 1);
        // Both pinned: held although the cache has room for one.
        assert!(st.has(p[0]) && st.has(p[1]));
        st.read_done(&p[..2]);
        assert_eq!(
            st.have().count_ones(),
            1,
            "unpinning evicted down to the budget"
        );
    }

    /// Delivers a wrong copy of a whole piece from `key`; returns what hashing it would fail.
    fn fetch_bad(st: &mut State, key: PeerKey) -> (PieceIndex, ReceivedPiece) {
        let bf = Bitfield::full(st.cfg.lengths.piece_count());
        let now = Instant::now();
        let mut done = None;
        for b in st.pick(key, &bf, 2, now) {
            if let BlockArrival::PieceComplete(p, received) =
                st.block_arrived(key, b, &vec![0xEE; b.length as usize], now)
            {
                done = Some((p, received));
            }
        }
        done.expect("a whole piece was picked")
    }

    #[test]
    fn an_address_that_sends_bad_pieces_is_banned_though_it_reconnects_each_time() {
        let mut st = state(4, 4, "....");
        st.picker.set_background(true);
        let bf = Bitfield::full(4);
        for round in 0..3u16 {
            // A fresh connection each time: new port, new peer id, same IP.
            let (tx, _rx) = mpsc::unbounded_channel();
            let addr = SocketAddr::from(([127, 0, 0, 9], 5000 + round));
            let (k, _) = st
                .peer_joined(
                    addr,
                    false,
                    [50 + round as u8; 20],
                    tx,
                    CancellationToken::new(),
                    Instant::now(),
                )
                .expect("not banned yet");
            st.peer_bitfield(&bf);
            let (p, received) = fetch_bad(&mut st, k);
            let (_, banned) = st.piece_failed(p, received);
            assert_eq!(banned.len(), usize::from(round == 2), "round {round}");
            st.peer_left(k, &bf);
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let again = st.peer_joined(
            SocketAddr::from(([127, 0, 0, 9], 6000)),
            false,
            [99; 20],
            tx,
            CancellationToken::new(),
            Instant::now(),
        );
        assert!(again.is_none(), "the banned IP is refused on any port");
        st.add_candidate(
            SocketAddr::from(([127, 0, 0, 9], 6001)),
            PeerSource::Tracker,
        );
        assert_eq!(st.start_connect(), None, "nor dialled");
        let (honest, _rx) = join(&mut st, 3);
        assert!(st.peers.contains_key(&honest), "other addresses still join");
    }

    #[test]
    fn a_failure_shared_with_an_attacker_bans_the_attacker_and_never_the_honest_peer() {
        let mut st = state(8, 8, "........");
        st.picker.set_background(true);
        let bf = Bitfield::full(8);
        st.peer_bitfield(&bf);
        let (honest, mut honest_rx) = join(&mut st, 2);
        let (attacker, _rx) = join(&mut st, 3);
        let mut banned = Vec::new();
        for _ in 0..3 {
            // Each piece: the attacker sends the first block (bad), the honest peer the second.
            let now = Instant::now();
            let a = st.pick(attacker, &bf, 1, now);
            let h = st.pick(honest, &bf, 1, now);
            assert_eq!(
                (a[0].piece, a[0].offset, h[0].piece),
                (h[0].piece, 0, a[0].piece)
            );
            st.block_arrived(attacker, a[0], &vec![0xEE; a[0].length as usize], now);
            let BlockArrival::PieceComplete(p, received) =
                st.block_arrived(honest, h[0], &vec![0; h[0].length as usize], now)
            else {
                panic!("the piece is complete");
            };
            banned.extend(st.piece_failed(p, received).1);
            // The honest peer alone sends the piece again: it verifies, naming the attacker.
            let blocks = st.pick(honest, &bf, 2, now);
            let mut good = None;
            for b in blocks {
                if let BlockArrival::PieceComplete(q, received) =
                    st.block_arrived(honest, b, &vec![0; b.length as usize], now)
                {
                    good = Some((q, received.data));
                }
            }
            let (q, data) = good.expect("verified");
            assert_eq!(q, p);
            banned.extend(st.piece_verified(q, Bytes::from(data), false));
        }
        let banned: Vec<IpAddr> = banned.iter().map(|b| b.addr).collect();
        assert_eq!(banned, vec![IpAddr::from([127, 0, 0, 3])]);
        assert!(st.peers[&attacker].cancel.is_cancelled());
        assert!(!st.peers[&honest].cancel.is_cancelled());
        drain(&mut honest_rx);
    }

    /// A peer joining at `now` from 127.0.0.`id`; its key and cancel token if it was let in.
    fn join_at(
        st: &mut State,
        id: u8,
        outgoing: bool,
        now: Instant,
    ) -> Option<(PeerKey, CancellationToken)> {
        let (tx, _rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let addr = SocketAddr::from(([127, 0, 0, id], 6000));
        let (k, _) = st.peer_joined(addr, outgoing, [id; 20], tx, cancel.clone(), now)?;
        Some((k, cancel))
    }

    #[test]
    fn idle_peers_give_their_slots_to_newcomers_and_useful_ones_keep_theirs() {
        let mut st = state(4, 4, "####");
        st.cfg.max_peers = 10; // 2 kept for outgoing connections, 8 for incoming ones
        let t0 = Instant::now();
        let held: Vec<_> =
            (2..=9) // [1; 20] is our own peer id
                .map(|id| join_at(&mut st, id, false, t0).expect("a free slot"))
                .collect();
        // Peer 1 is interested in us; peer 2 sends us data. The others say nothing.
        st.peer_interested(held[0].0, true, t0);
        assert!(
            join_at(&mut st, 20, false, t0 + IDLE_AFTER / 2).is_none(),
            "nobody is idle yet: the newcomer is refused"
        );
        let later = t0 + IDLE_AFTER * 2;
        st.peers.get_mut(&held[1].0).unwrap().useful_at = later;
        for id in 21..27 {
            assert!(
                join_at(&mut st, id, false, later).is_some(),
                "newcomer {id}"
            );
        }
        let evicted = held.iter().filter(|(_, c)| c.is_cancelled()).count();
        assert_eq!(evicted, 6, "each newcomer took an idle peer's slot");
        assert!(!held[0].1.is_cancelled() && !held[1].1.is_cancelled());
        assert!(
            join_at(&mut st, 27, false, later).is_none(),
            "the useful peers and the newcomers keep their slots"
        );
        assert!(
            join_at(&mut st, 30, true, later).is_some(),
            "the slots kept for outgoing connections are free"
        );
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_slots() {
        let mut st = state(4, 4, "####");
        st.cfg.max_peers = 50;
        let t0 = Instant::now();
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 5], port));
        let mut held = Vec::new();
        for i in 0..MAX_PEERS_PER_IP as u8 + 1 {
            let (tx, _rx) = mpsc::unbounded_channel();
            let cancel = CancellationToken::new();
            let id = [40 + i; 20];
            let joined = st.peer_joined(addr(7000 + i as u16), false, id, tx, cancel.clone(), t0);
            held.push((joined.is_some(), cancel));
        }
        let let_in = held.iter().filter(|(ok, _)| *ok).count();
        assert_eq!(
            let_in, MAX_PEERS_PER_IP,
            "the one past the bound is refused"
        );
        assert!(
            join_at(&mut st, 9, false, t0).is_some(),
            "other addresses join"
        );
        // Once its peers are idle, a newcomer from that address replaces one of them.
        let (tx, _rx) = mpsc::unbounded_channel();
        let later = t0 + IDLE_AFTER;
        let again = st.peer_joined(
            addr(8000),
            false,
            [60; 20],
            tx,
            CancellationToken::new(),
            later,
        );
        assert!(again.is_some());
        assert_eq!(held.iter().filter(|(_, c)| c.is_cancelled()).count(), 1);
    }

    #[test]
    fn a_protocol_violation_bans_the_address_for_a_while() {
        let mut st = state(4, 4, "####");
        let t0 = Instant::now();
        let (k, cancel) = join_at(&mut st, 7, false, t0).unwrap();
        st.peer_misbehaved(IpAddr::from([127, 0, 0, 7]), t0);
        assert!(cancel.is_cancelled(), "its connections are dropped");
        st.peer_left(k, &Bitfield::new(4));
        assert!(join_at(&mut st, 7, false, t0 + VIOLATION_BAN / 2).is_none());
        assert!(
            join_at(&mut st, 8, false, t0).is_some(),
            "others still join"
        );
        assert!(
            join_at(&mut st, 7, false, t0 + VIOLATION_BAN).is_some(),
            "the ban ends"
        );
    }

    #[test]
    fn a_peer_that_holds_our_requests_and_sends_nothing_is_dropped() {
        let mut st = state(4, 4, "....");
        st.picker.set_background(true);
        let bf = Bitfield::full(4);
        let t0 = Instant::now();
        let (silent, silent_cancel) = join_at(&mut st, 2, true, t0).unwrap();
        let (slow, slow_cancel) = join_at(&mut st, 3, true, t0).unwrap();
        st.peer_bitfield(&bf);
        st.peer_bitfield(&bf);
        assert_eq!(st.pick(silent, &bf, 2, t0).len(), 2);
        let slow_blocks = st.pick(slow, &bf, 2, t0);
        // The slow peer delivers one block late; the silent one nothing.
        let late = t0 + STALL_TIMEOUT / 2;
        st.block_arrived(slow, slow_blocks[0], &vec![0; BLOCK_SIZE as usize], late);
        st.expire_requests(t0 + STALL_TIMEOUT / 2);
        assert!(!silent_cancel.is_cancelled(), "not yet");
        st.expire_requests(t0 + STALL_TIMEOUT);
        assert!(silent_cancel.is_cancelled(), "the silent peer is dropped");
        assert!(!slow_cancel.is_cancelled(), "the slow one is kept");
    }

    #[test]
    fn candidates_and_known_addresses_are_bounded() {
        let mut st = state(1, 1, ".");
        for i in 0..(MAX_KNOWN_ADDRS as u32 + 5_000) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            st.add_candidate(SocketAddr::from((ip, 1)), PeerSource::Tracker);
        }
        assert_eq!(st.candidates.len(), MAX_CANDIDATES);
        assert!(st.known.len() <= MAX_KNOWN_ADDRS);
        for i in 0..(MAX_GONE_TOTALS + 2000) {
            let mut id = [0u8; 20];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let (tx, _rx) = mpsc::unbounded_channel();
            let addr = SocketAddr::from(([127, 0, 0, 1], 2000 + (i % 60000) as u16));
            let (k, _) = st
                .peer_joined(addr, true, id, tx, CancellationToken::new(), Instant::now())
                .unwrap();
            st.peer_left(k, &Bitfield::new(1));
        }
        assert!(st.received_from_gone.len() <= MAX_GONE_TOTALS);
    }

    #[test]
    fn interest_unchokes_at_once_when_a_slot_is_free() {
        let mut st = state(2, 2, "##");
        let (k, mut rx) = join(&mut st, 2);
        st.peer_interested(k, true, Instant::now());
        assert_eq!(drain(&mut rx), vec![Command::Unchoke]);
    }

    #[test]
    fn upload_slots_bound_the_peers_unchoked_at_once() {
        // The most peers unchoked at once over 100 s of rounds, with `slots` regular slots.
        let most_unchoked = |slots: usize| {
            let mut st = state_with_slots(2, 2, "##", slots);
            st.cfg.max_peers = 8;
            let t0 = Instant::now();
            let mut peers: Vec<_> = (2..8).map(|id| join(&mut st, id)).collect();
            let mut unchoked = vec![false; peers.len()];
            let mut most = 0;
            for s in 0..100 {
                for (k, _) in &peers {
                    st.peer_interested(*k, true, t0 + Duration::from_secs(s));
                }
                st.choke_round(t0 + Duration::from_secs(s));
                for (i, (_, rx)) in peers.iter_mut().enumerate() {
                    for c in drain(rx) {
                        match c {
                            Command::Unchoke => unchoked[i] = true,
                            Command::Choke => unchoked[i] = false,
                            _ => {}
                        }
                    }
                }
                most = most.max(unchoked.iter().filter(|&&u| u).count());
            }
            most
        };
        // The regular slots and the optimistic unchoke.
        assert_eq!(most_unchoked(1), 2);
        assert_eq!(most_unchoked(4), 5);
    }

    #[test]
    fn with_no_upload_nobody_is_ever_unchoked() {
        let mut st = state(2, 2, "##");
        st.cfg.no_upload = true;
        let (k, mut rx) = join(&mut st, 2);
        let t0 = Instant::now();
        st.peer_interested(k, true, t0);
        for s in 0..100 {
            st.choke_round(t0 + Duration::from_secs(s));
        }
        assert_eq!(drain(&mut rx), vec![]);
    }

    #[test]
    fn a_read_waiting_for_unrequested_blocks_gives_every_peer_a_share() {
        let mut st = state(8, 8, "........");
        let (a, mut rx_a) = join(&mut st, 2);
        let (b, mut rx_b) = join(&mut st, 3);
        let p0 = st.cfg.lengths.piece(0).unwrap();
        st.read_wants(None, 0, 100, &[p0], Instant::now());
        // Two unrequested blocks over two peers: one each.
        let want = Command::ReadWaiting {
            pieces: vec![0],
            share: 1,
            urgent: vec![0],
        };
        assert_eq!(drain(&mut rx_a), vec![want.clone()]);
        assert_eq!(drain(&mut rx_b), vec![want]);
        // Each peer asking for more takes only its share of the read's blocks.
        assert_eq!(st.pick(a, &Bitfield::full(8), 2, Instant::now()).len(), 1);
        assert_eq!(st.pick(b, &Bitfield::full(8), 2, Instant::now()).len(), 1);
        // Every block requested: a second read of it only tops the peers up.
        st.read_wants(None, 0, 100, &[p0], Instant::now());
        assert_eq!(drain(&mut rx_a), vec![Command::Fill]);
        // Withdrawn requests go back to the pool for any peer.
        let withdrawn = st.picker.pick(a, &Bitfield::full(8), 0, Instant::now());
        assert!(withdrawn.is_empty());
        let blocks: Vec<BlockRef> = (0..2)
            .map(|i| BlockRef {
                piece: 0,
                offset: i * BLOCK_SIZE,
                length: BLOCK_SIZE,
            })
            .collect();
        st.requests_withdrawn(a, &blocks[..1]);
        st.requests_withdrawn(b, &blocks[1..]);
        assert_eq!(st.picker.unrequested_blocks(p0), 2);
    }

    #[test]
    fn a_read_is_shared_among_peers_unchoking_us_or_about_to() {
        let mut st = state(8, 8, "........");
        let (a, _rx_a) = join(&mut st, 2);
        let (b, _rx_b) = join(&mut st, 3);
        let (c, _rx_c) = join(&mut st, 4);
        st.peer_unchoked_us(a);
        st.peer_choked_us(b);
        // c has said neither yet, just after connecting: it is expected to unchoke us soon.
        let shares = st.urgent_shares(16, Instant::now());
        assert_eq!(shares.get(&a), Some(&8));
        assert_eq!(shares.get(&c), Some(&8));
        assert!(!shares.contains_key(&b));
        // Seconds after connecting without unchoking us, c no longer counts.
        let later = Instant::now() + Duration::from_secs(3);
        let shares = st.urgent_shares(16, later);
        assert_eq!(shares.get(&a), Some(&16));
        assert!(!shares.contains_key(&c));
        // A connection in its handshake is kept a share.
        st.add_candidate("127.0.0.1:2000".parse().unwrap(), PeerSource::Tracker);
        assert!(st.start_connect().is_some());
        let shares = st.urgent_shares(16, later);
        assert_eq!(shares.get(&a), Some(&8));
    }

    #[test]
    fn a_seek_drops_the_readahead_of_the_position_left() {
        let mut st = state(10, 10, "..........");
        let (k, _rx) = join(&mut st, 2);
        let all = Bitfield::full(10);
        let piece = |i: u32| st.cfg.lengths.piece(i).unwrap();
        let (p0, p8) = (piece(0), piece(8));
        let stream = st.open_stream(0, 10 * PIECE as u64);
        // A read at the start: piece 0 is due, the file's last piece (9) is an index piece,
        // and the readahead window covers pieces 1.. after it.
        st.read_wants(Some(stream), 0, 100, &[p0], Instant::now());
        let first: Vec<u32> = st
            .pick(k, &all, 4, Instant::now())
            .iter()
            .map(|b| b.piece)
            .collect();
        assert_eq!(first, vec![0, 0, 9, 9]);
        st.read_done(&[p0]);
        // A seek to piece 8: the window at the old position is dropped, not fetched.
        st.read_wants(
            Some(stream),
            8 * PIECE as u64,
            8 * PIECE as u64 + 100,
            &[p8],
            Instant::now(),
        );
        let next: Vec<u32> = st
            .pick(k, &all, 64, Instant::now())
            .iter()
            .map(|b| b.piece)
            .collect();
        assert_eq!(next, vec![8, 8]);
    }

    #[test]
    fn a_reads_blocks_go_to_the_peers_that_deliver_them_soonest() {
        let mut st = state(8, 8, "........");
        let (near, mut rx_near) = join(&mut st, 2);
        let (far, mut rx_far) = join(&mut st, 3);
        let ms = Duration::from_millis;
        st.peer_path(near, ms(10), 16 << 20);
        st.peer_path(far, ms(200), 256 << 10);
        let pieces: Vec<PieceIndex> = (0..4).map(|i| st.cfg.lengths.piece(i).unwrap()).collect();
        // 8 blocks: all 8 from the near peer take 18 ms, the far one's first would take 262.
        st.read_wants(None, 0, 4 * PIECE as u64, &pieces, Instant::now());
        assert_eq!(
            drain(&mut rx_near),
            vec![Command::ReadWaiting {
                pieces: vec![0, 1, 2, 3],
                share: 8,
                urgent: vec![0, 1, 2, 3],
            }]
        );
        // The far one gets no share, but hears of the read (its background requests yield).
        assert_eq!(
            drain(&mut rx_far),
            vec![Command::ReadWaiting {
                pieces: vec![0, 1, 2, 3],
                share: 0,
                urgent: vec![0, 1, 2, 3],
            }]
        );
    }

    #[test]
    fn a_peer_with_a_long_queue_gets_a_smaller_share() {
        let mut st = state(16, 16, "................");
        st.picker.set_background(true);
        let (busy, mut rx_busy) = join(&mut st, 2);
        let (idle, _rx_idle) = join(&mut st, 3);
        for k in [busy, idle] {
            st.peer_path(k, Duration::from_millis(50), 4 << 20);
        }
        let all = Bitfield::full(16);
        st.peer_bitfield(&all);
        // 8 blocks (32 ms at 4 MiB/s) queued at one peer.
        assert_eq!(st.pick(busy, &all, 8, Instant::now()).len(), 8);
        drain(&mut rx_busy);
        let shares = st.urgent_shares(16, Instant::now());
        // The idle peer takes 8 first (its queue catches up with the busy one's), then both 4.
        assert_eq!(shares[&idle], 12);
        assert_eq!(shares[&busy], 4);
    }

    #[test]
    fn two_streams_readahead_in_turns() {
        let mut st = state(20, 20, "....................");
        let (k, _rx) = join(&mut st, 2);
        let all = Bitfield::full(20);
        let p = |i: u32| st.cfg.lengths.piece(i).unwrap();
        let (p0, p10) = (p(0), p(10));
        let half = 10 * PIECE as u64;
        // Two files, pieces 0..10 and 10..20, each read at its start.
        let a = st.open_stream(0, half);
        let b = st.open_stream(half, 2 * half);
        st.read_wants(Some(a), 0, 100, &[p0], Instant::now());
        st.read_wants(Some(b), half, half + 100, &[p10], Instant::now());
        let picked: Vec<u32> = st
            .pick(k, &all, 64, Instant::now())
            .iter()
            .map(|b| b.piece)
            .collect();
        // Both reads, the files' last pieces (index), then the windows a piece of each in turn.
        let windows: Vec<u32> = picked
            .iter()
            .copied()
            .filter(|&i| i != 9 && i != 19 && i != 0 && i != 10)
            .step_by(2)
            .collect();
        assert_eq!(windows, vec![1, 11, 2, 12, 3, 13, 4, 14], "{picked:?}");
    }
}
