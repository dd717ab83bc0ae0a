//! One torrent: the shared state its peer tasks, readers and timers work on.
//!
//! Invariants:
//! - A piece is in the cache (or on disk) only after its SHA-1 matched; only such pieces are
//!   announced, uploaded or returned to readers.
//! - `State` is behind one mutex held only for short, non-blocking sections: hashing and disk
//!   writes happen on the blocking pool, network writes in each peer's writer task.
//! - Every peer task is registered in `State::peers` while it runs and removes itself on exit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::sync::{mpsc, watch, Notify};

use crate::core::cache::PieceCache;
use crate::core::choker::{ChokeDecision, Choker, ChokerConfig, PeerSample};
use crate::core::layout::{Bitfield, BlockRef, Lengths, PieceIndex};
use crate::core::metainfo::{InfoHash, Metainfo};
use crate::core::picker::{BlockOutcome, PeerKey, Picker};
use crate::disk::Store;
use crate::net::ratelimit::RateLimiter;
use crate::net::tracker::{Announcer, TransferTotals};

/// What a torrent is asked to do; filled from the command line.
#[derive(Debug, Clone)]
pub struct TorrentConfig {
    /// `-d, --data-dir`: verified pieces are also written to `DIR/<name>`.
    pub data_dir: Option<PathBuf>,
    /// Bytes of verified pieces kept in memory.
    pub cache_size: u64,
    pub max_peers: usize,
    /// `--peer`: connected to directly and re-tried while the torrent runs.
    pub peers: Vec<SocketAddr>,
    /// `--tracker`: added after the torrent's own trackers.
    pub trackers: Vec<String>,
    pub upload_rate: Option<u64>,
    pub download_rate: Option<u64>,
    /// Fetch every piece (download, seed). Off for a mount without a data dir: then pieces are
    /// fetched in the background only while the cache has room.
    pub fetch_all: bool,
    /// A read with no progress for this long fails with EIO.
    pub read_timeout: Duration,
    /// The largest readahead window of a sequential reader, in bytes.
    pub readahead: u64,
    /// Announce to trackers at all.
    pub announce: bool,
}

impl Default for TorrentConfig {
    fn default() -> Self {
        TorrentConfig {
            data_dir: None,
            cache_size: 256 << 20,
            max_peers: 50,
            peers: Vec::new(),
            trackers: Vec::new(),
            upload_rate: None,
            download_rate: None,
            fetch_all: true,
            read_timeout: Duration::from_secs(60),
            readahead: 32 << 20,
            announce: true,
        }
    }
}

/// Commands a torrent sends to one peer task.
#[derive(Debug, Clone)]
pub enum PeerCommand {
    Have(u32),
    Choke,
    Unchoke,
    Cancel(BlockRef),
    /// New work may be available (a read arrived, a request timed out): top up requests.
    FillRequests,
    /// Drop the connection (banned, or shutting down).
    Disconnect,
}

pub(crate) struct PeerEntry {
    pub addr: SocketAddr,
    pub peer_id: [u8; 20],
    pub tx: mpsc::UnboundedSender<PeerCommand>,
    pub connected_at: Instant,
    pub peer_interested: bool,
    pub am_choking: bool,
    pub downloaded: u64,
    pub uploaded: u64,
    last_downloaded: u64,
    last_uploaded: u64,
    pub down_rate: f64,
    pub up_rate: f64,
    pub last_block_at: Option<Instant>,
    pub strikes: u32,
    pub is_seed: bool,
}

/// A sequential reader's readahead window (one per open file handle).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadStream {
    pub next_offset: u64,
    pub window: u64,
    /// End of the file this stream reads (the window never crosses it).
    pub end: u64,
}

pub(crate) struct State {
    pub picker: Picker,
    pub cache: PieceCache,
    /// Buffers of pieces being downloaded, until they are hashed.
    pub partial: HashMap<u32, Vec<u8>>,
    pub peers: HashMap<PeerKey, PeerEntry>,
    pub choker: Choker,
    pub next_peer_key: PeerKey,
    /// Addresses learned and not yet tried (deduplicated with `known`).
    pub candidates: VecDeque<SocketAddr>,
    pub known: HashSet<SocketAddr>,
    pub connecting: usize,
    /// Peers banned for corrupt data, by address and by peer id (on loopback every peer shares
    /// an IP, so an IP ban would be too wide).
    pub banned_addrs: HashSet<SocketAddr>,
    pub banned_ids: HashSet<[u8; 20]>,
    /// Pieces verified on disk (with a data dir): they survive cache eviction.
    pub on_disk: Bitfield,
    pub streams: HashMap<u64, ReadStream>,
    pub next_stream: u64,
    /// Pieces each waiting read needs, counted, so deadlines are cleared when the last reader
    /// of a piece is gone.
    pub read_waiters: HashMap<u32, u32>,
    pub store_failed: bool,
    /// Bytes received from peers that have disconnected, by peer id (with their last address).
    pub received_from_gone: HashMap<[u8; 20], (SocketAddr, u64)>,
}

#[derive(Default)]
pub struct Counters {
    pub downloaded: AtomicU64,
    pub uploaded: AtomicU64,
    pub wasted: AtomicU64,
    pub hash_failures: AtomicU64,
}

/// A point-in-time view for progress lines and the mount's attributes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub downloaded: u64,
    pub uploaded: u64,
    pub down_rate: f64,
    pub up_rate: f64,
    pub peers: usize,
    pub seeds: usize,
    pub pieces_have: u32,
    pub pieces_total: u32,
    pub bytes_left: u64,
    pub cache_used: u64,
    pub hash_failures: u64,
}

pub struct Torrent {
    pub meta: Arc<Metainfo>,
    pub lengths: Lengths,
    pub info_hash: InfoHash,
    pub peer_id: [u8; 20],
    pub listen_port: u16,
    pub(crate) cfg: TorrentConfig,
    pub(crate) state: Mutex<State>,
    pub counters: Counters,
    pub(crate) store: Option<Arc<Store>>,
    /// Woken whenever a piece is verified (readers wait on it).
    pub(crate) piece_done: Notify,
    pub(crate) shutdown_tx: watch::Sender<bool>,
    pub(crate) upload_limit: Option<RateLimiter>,
    pub(crate) download_limit: Option<RateLimiter>,
    totals_tx: watch::Sender<TransferTotals>,
    /// Pieces handed to the blocking pool for hashing and not yet filed.
    pub(crate) pending_verify: std::sync::atomic::AtomicUsize,
    announcer: Mutex<Option<Announcer>>,
    completed_announced: std::sync::atomic::AtomicBool,
}

/// Strike points before a peer is banned: a failed piece it sent alone costs 2, one it shared
/// with other peers 1 (the bad blocks may be someone else's), so three sole failures ban it
/// and an honest peer caught beside a corrupt one lasts twice as long.
const MAX_STRIKES: u32 = 6;
const SOLE_STRIKE: u32 = 2;
const SHARED_STRIKE: u32 = 1;
/// Blocks outstanding at one peer longer than this go to other peers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Complete pieces waiting to be hashed (and written) beyond which peers stop requesting: a
/// slow disk (dirty-page throttling) must not pile up piece buffers in memory.
pub(crate) const MAX_PENDING_VERIFY: usize = 32;
/// Connections being opened at once.
const MAX_HALF_OPEN: usize = 8;

impl Torrent {
    /// Builds the torrent. With a data dir, verifies what is already there first (blocking;
    /// `progress` gets pieces checked). Call `start` on a runtime afterwards.
    pub fn new(
        meta: Arc<Metainfo>,
        cfg: TorrentConfig,
        peer_id: [u8; 20],
        listen_port: u16,
        progress: &(dyn Fn(u32) + Sync),
    ) -> anyhow::Result<Arc<Torrent>> {
        let lengths = meta.info.lengths;
        let count = lengths.piece_count();
        let store = match &cfg.data_dir {
            Some(d) => Some(Arc::new(Store::open(d, &meta.info).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create files under {}: {e}",
                    d.join(&meta.info.name).display()
                )
            })?)),
            None => None,
        };
        let on_disk = match &store {
            Some(s) => s.verify(&meta.info.piece_hashes, progress),
            None => Bitfield::new(count),
        };
        let seed = u64::from_le_bytes(peer_id[12..20].try_into().unwrap_or([7; 8]));
        let mut picker = Picker::with_have(lengths, &on_disk, seed);
        picker.set_background(cfg.fetch_all || store.is_some());
        let state = State {
            picker,
            cache: PieceCache::new(cfg.cache_size),
            partial: HashMap::new(),
            peers: HashMap::new(),
            choker: Choker::new(ChokerConfig::default(), seed ^ 0x5eed),
            next_peer_key: 1,
            candidates: VecDeque::new(),
            known: HashSet::new(),
            connecting: 0,
            banned_addrs: HashSet::new(),
            banned_ids: HashSet::new(),
            on_disk,
            streams: HashMap::new(),
            next_stream: 1,
            read_waiters: HashMap::new(),
            store_failed: false,
            received_from_gone: HashMap::new(),
        };
        let (shutdown_tx, _) = watch::channel(false);
        let left = Self::left_of(&lengths, state.picker.have());
        let (totals_tx, _) = watch::channel(TransferTotals {
            uploaded: 0,
            downloaded: 0,
            left,
        });
        Ok(Arc::new(Torrent {
            info_hash: meta.info_hash,
            lengths,
            peer_id,
            listen_port,
            upload_limit: cfg.upload_rate.map(RateLimiter::new),
            download_limit: cfg.download_rate.map(RateLimiter::new),
            cfg,
            state: Mutex::new(state),
            counters: Counters::default(),
            store,
            piece_done: Notify::new(),
            shutdown_tx,
            totals_tx,
            pending_verify: std::sync::atomic::AtomicUsize::new(0),
            announcer: Mutex::new(None),
            completed_announced: std::sync::atomic::AtomicBool::new(false),
            meta,
        }))
    }

    fn left_of(lengths: &Lengths, have: &Bitfield) -> u64 {
        lengths
            .pieces()
            .filter(|p| !have.get(p.get()))
            .map(|p| lengths.piece_len(p) as u64)
            .sum()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.meta.info.name
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// True when every piece has been verified at least once and is held (in memory or on disk).
    pub fn is_complete(&self) -> bool {
        self.lock().picker.is_complete()
    }

    /// Starts the timers, the connector and the tracker announcer on the current runtime.
    pub fn start(self: &Arc<Self>) {
        let (peers_tx, peers_rx) = mpsc::unbounded_channel();
        if self.cfg.announce {
            let mut tiers = self.meta.trackers();
            for t in &self.cfg.trackers {
                if !tiers.iter().flatten().any(|x| x == t) {
                    tiers.push(vec![t.clone()]);
                }
            }
            tiers.retain(|t| !t.is_empty());
            if !tiers.is_empty() {
                let a = Announcer::spawn(
                    tiers,
                    self.info_hash.0,
                    self.peer_id,
                    self.listen_port,
                    self.totals_tx.subscribe(),
                    peers_tx.clone(),
                );
                *self.announcer.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
            }
        }
        for p in &self.cfg.peers {
            let _ = peers_tx.send(*p);
        }
        let t = self.clone();
        spawn_named(
            "torrent-ticker",
            async move { t.run_ticker(peers_rx).await },
        );
        if self.is_complete() {
            self.completed_announced.store(true, Ordering::Relaxed);
        }
    }

    /// Stops: readers fail, peers disconnect, trackers hear `stopped` (bounded by 2 s).
    pub async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.piece_done.notify_waiters();
        {
            let st = self.lock();
            for p in st.peers.values() {
                let _ = p.tx.send(PeerCommand::Disconnect);
            }
        }
        let announcer = self
            .announcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(a) = announcer {
            let _ = tokio::time::timeout(Duration::from_secs(3), a.stop()).await;
        }
    }

    /// Once a second: rates, choking, request timeouts, new connections, tracker totals.
    async fn run_ticker(self: Arc<Self>, mut peers_rx: mpsc::UnboundedReceiver<SocketAddr>) {
        let mut shutdown = self.shutdown_signal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = Instant::now();
        let mut retry_explicit = Instant::now();
        // Without trackers every sender is gone at once; a closed channel must not spin.
        let mut discovery_open = true;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                addr = peers_rx.recv(), if discovery_open => {
                    match addr {
                        Some(addr) => {
                            self.add_candidate(addr);
                            self.connect_more();
                        }
                        None => discovery_open = false,
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            if self.is_shutting_down() {
                return;
            }
            let now = Instant::now();
            let dt = now.duration_since(last).as_secs_f64().max(0.001);
            last = now;
            self.update_rates(dt);
            self.run_choker(now);
            self.expire_requests(now);
            if now.duration_since(retry_explicit) >= Duration::from_secs(5) {
                retry_explicit = now;
                for p in &self.cfg.peers {
                    self.requeue(*p);
                }
            }
            self.connect_more();
            self.publish_totals();
            // Evicted pieces leave 256 KiB holes in the heap that glibc keeps resident; give
            // them back so resident memory follows the cache budget. Cheap once a second.
            // SAFETY: malloc_trim only releases free memory; it is thread-safe.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    fn update_rates(&self, dt: f64) {
        let mut st = self.lock();
        for p in st.peers.values_mut() {
            let d = (p.downloaded - p.last_downloaded) as f64 / dt;
            let u = (p.uploaded - p.last_uploaded) as f64 / dt;
            p.last_downloaded = p.downloaded;
            p.last_uploaded = p.uploaded;
            // A short EWMA: responsive enough for 10 s choke rounds.
            p.down_rate = 0.6 * p.down_rate + 0.4 * d;
            p.up_rate = 0.6 * p.up_rate + 0.4 * u;
        }
    }

    pub(crate) fn samples(st: &State) -> Vec<PeerSample> {
        st.peers
            .iter()
            .map(|(k, p)| PeerSample {
                peer: *k,
                interested: p.peer_interested,
                download_rate: p.down_rate as u64,
                upload_rate: p.up_rate as u64,
                connected_at: p.connected_at,
                last_block_received: p.last_block_at,
                unchoked: !p.am_choking,
            })
            .collect()
    }

    fn run_choker(&self, now: Instant) {
        let mut st = self.lock();
        let samples = Self::samples(&st);
        let seeding = st.picker.is_complete();
        if let Some(decision) = st.choker.tick(now, &samples, seeding) {
            Self::apply_choke(&mut st, &decision);
        }
    }

    fn apply_choke(st: &mut State, decision: &ChokeDecision) {
        let unchoke: HashSet<PeerKey> = decision.unchoke.iter().copied().collect();
        for (k, p) in st.peers.iter_mut() {
            let want_unchoked = unchoke.contains(k);
            if want_unchoked && p.am_choking {
                p.am_choking = false;
                let _ = p.tx.send(PeerCommand::Unchoke);
            } else if !want_unchoked && !p.am_choking {
                p.am_choking = true;
                let _ = p.tx.send(PeerCommand::Choke);
            }
        }
    }

    /// A peer became interested: unchoke it at once if a slot is free.
    pub(crate) fn on_peer_interested(&self, key: PeerKey, interested: bool) {
        let mut st = self.lock();
        if let Some(p) = st.peers.get_mut(&key) {
            p.peer_interested = interested;
        }
        if !interested {
            return;
        }
        let samples = Self::samples(&st);
        if st.choker.on_interested(Instant::now(), key, &samples) {
            if let Some(p) = st.peers.get_mut(&key) {
                if p.am_choking {
                    p.am_choking = false;
                    let _ = p.tx.send(PeerCommand::Unchoke);
                }
            }
        }
    }

    fn expire_requests(&self, now: Instant) {
        let mut st = self.lock();
        let expired = st.picker.expire_requests(now, REQUEST_TIMEOUT);
        if !expired.is_empty() {
            log::debug!("{} requests timed out", expired.len());
        }
        let background = self.background_wanted(&st);
        st.picker.set_background(background);
        self.wake_peers(&st);
    }

    /// Whether to fetch pieces nobody is reading: always for download/seed and with a working
    /// data dir; otherwise only while the cache has room.
    fn background_wanted(&self, st: &State) -> bool {
        self.cfg.fetch_all
            || (self.store.is_some() && !st.store_failed)
            || st.cache.has_room(self.lengths.piece_length() as u64)
    }

    pub(crate) fn wake_peers(&self, st: &State) {
        for p in st.peers.values() {
            let _ = p.tx.send(PeerCommand::FillRequests);
        }
    }

    fn publish_totals(&self) {
        let left = {
            let st = self.lock();
            Self::left_of(&self.lengths, st.picker.have())
        };
        self.totals_tx.send_replace(TransferTotals {
            uploaded: self.counters.uploaded.load(Ordering::Relaxed),
            downloaded: self.counters.downloaded.load(Ordering::Relaxed),
            left,
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let have = st.picker.have();
        Snapshot {
            downloaded: self.counters.downloaded.load(Ordering::Relaxed),
            uploaded: self.counters.uploaded.load(Ordering::Relaxed),
            down_rate: st.peers.values().map(|p| p.down_rate).sum(),
            up_rate: st.peers.values().map(|p| p.up_rate).sum(),
            peers: st.peers.len(),
            seeds: st.peers.values().filter(|p| p.is_seed).count(),
            pieces_have: have.count_ones(),
            pieces_total: self.lengths.piece_count(),
            bytes_left: Self::left_of(&self.lengths, have),
            cache_used: st.cache.used(),
            hash_failures: self.counters.hash_failures.load(Ordering::Relaxed),
        }
    }

    /// Bytes received from each peer (connected or gone) by peer id, with its last address.
    pub fn received_by_peer(&self) -> Vec<([u8; 20], SocketAddr, u64)> {
        let st = self.lock();
        let mut all = st.received_from_gone.clone();
        for p in st.peers.values() {
            let e = all.entry(p.peer_id).or_insert((p.addr, 0));
            e.0 = p.addr;
            e.1 += p.downloaded;
        }
        let mut v: Vec<_> = all.into_iter().map(|(id, (a, n))| (id, a, n)).collect();
        v.sort();
        v
    }

    /// Verified fraction of the pieces `[first, last]`.
    pub fn progress_of(&self, pieces: std::ops::Range<u32>) -> f64 {
        if pieces.is_empty() {
            return 1.0;
        }
        let st = self.lock();
        let have = pieces.clone().filter(|&p| st.picker.have().get(p)).count();
        have as f64 / pieces.len() as f64
    }

    // ---- connections ----

    pub(crate) fn add_candidate(&self, addr: SocketAddr) {
        let mut st = self.lock();
        if st.banned_addrs.contains(&addr) || st.known.contains(&addr) {
            return;
        }
        if addr.port() == self.listen_port && addr.ip().is_loopback() {
            return; // ourselves, as a tracker may list us
        }
        st.known.insert(addr);
        st.candidates.push_back(addr);
    }

    /// Lets a known address be tried again (explicit `--peer`s after a disconnect).
    fn requeue(&self, addr: SocketAddr) {
        let mut st = self.lock();
        let connected = st.peers.values().any(|p| p.addr == addr);
        if !connected && !st.candidates.contains(&addr) && !st.banned_addrs.contains(&addr) {
            st.known.insert(addr);
            st.candidates.push_back(addr);
        }
    }

    fn connect_more(self: &Arc<Self>) {
        loop {
            let addr = {
                let mut st = self.lock();
                if st.peers.len() + st.connecting >= self.cfg.max_peers
                    || st.connecting >= MAX_HALF_OPEN
                {
                    return;
                }
                let Some(addr) = st.candidates.pop_front() else {
                    return;
                };
                if st.peers.values().any(|p| p.addr == addr) {
                    continue;
                }
                st.connecting += 1;
                addr
            };
            let t = self.clone();
            spawn_named("peer-connect", async move {
                let r = crate::engine::peer::connect_and_run(t.clone(), addr).await;
                if let Err(e) = r {
                    log::debug!("peer {addr}: {e}");
                }
            });
        }
    }

    /// Registers a connected peer; None if we must not keep it (banned, self, duplicate, full).
    pub(crate) fn register_peer(
        &self,
        addr: SocketAddr,
        peer_id: [u8; 20],
        tx: mpsc::UnboundedSender<PeerCommand>,
    ) -> Option<PeerKey> {
        let mut st = self.lock();
        if peer_id == self.peer_id
            || st.banned_addrs.contains(&addr)
            || st.banned_ids.contains(&peer_id)
            || st.peers.values().any(|p| p.peer_id == peer_id)
            || st.peers.len() >= self.cfg.max_peers
            || self.is_shutting_down()
        {
            return None;
        }
        let key = st.next_peer_key;
        st.next_peer_key += 1;
        st.peers.insert(
            key,
            PeerEntry {
                addr,
                peer_id,
                tx,
                connected_at: Instant::now(),
                peer_interested: false,
                am_choking: true,
                downloaded: 0,
                uploaded: 0,
                last_downloaded: 0,
                last_uploaded: 0,
                down_rate: 0.0,
                up_rate: 0.0,
                last_block_at: None,
                strikes: 0,
                is_seed: false,
            },
        );
        Some(key)
    }

    pub(crate) fn unregister_peer(&self, key: PeerKey, bitfield: &Bitfield) {
        let mut st = self.lock();
        if let Some(p) = st.peers.remove(&key) {
            let e = st
                .received_from_gone
                .entry(p.peer_id)
                .or_insert((p.addr, 0));
            e.0 = p.addr;
            e.1 += p.downloaded;
        }
        st.picker.peer_gone(key, bitfield);
        st.choker.peer_gone(key);
        self.wake_peers(&st);
    }

    pub(crate) fn connect_finished(&self) {
        let mut st = self.lock();
        st.connecting = st.connecting.saturating_sub(1);
    }

    // ---- data ----

    /// Verified piece data for an upload or a read: from the cache, else from disk (and then
    /// cached). None if we do not hold it.
    pub(crate) fn piece_data(&self, piece: PieceIndex, touch: bool) -> Option<Bytes> {
        {
            let mut st = self.lock();
            let hit = if touch {
                st.cache.get(piece.get())
            } else {
                st.cache.peek(piece.get())
            };
            if hit.is_some() {
                return hit;
            }
            if !st.on_disk.get(piece.get()) || self.store.is_none() {
                return None;
            }
        }
        let store = self.store.as_ref()?;
        let data = match store.read_aligned(
            self.lengths.piece_offset(piece),
            self.lengths.piece_len(piece) as usize,
        ) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("reading piece {piece} from disk: {e}");
                return None;
            }
        };
        let mut st = self.lock();
        let evicted = st.cache.insert(piece.get(), data.clone());
        self.after_evict(&mut st, &evicted);
        Some(data)
    }

    /// Pieces evicted from the cache that are not on disk are no longer held.
    pub(crate) fn after_evict(&self, st: &mut State, evicted: &[u32]) {
        for &e in evicted {
            if !st.on_disk.get(e) {
                if let Some(p) = self.lengths.piece(e) {
                    st.picker.piece_lost(p);
                }
            }
        }
    }

    /// A block arrived from `key`. Returns the peers to send `cancel` to.
    pub(crate) fn on_block(
        self: &Arc<Self>,
        key: PeerKey,
        block: BlockRef,
        data: &[u8],
    ) -> Vec<(mpsc::UnboundedSender<PeerCommand>, BlockRef)> {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(p) = st.peers.get_mut(&key) {
            p.downloaded += data.len() as u64;
            p.last_block_at = Some(now);
        }
        self.counters
            .downloaded
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        match st.picker.block_received(key, block, now) {
            BlockOutcome::Unwanted => {
                self.counters
                    .wasted
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                Vec::new()
            }
            BlockOutcome::Accepted {
                piece_complete,
                cancel,
            } => {
                let Some(piece) = self.lengths.piece(block.piece) else {
                    return Vec::new();
                };
                let plen = self.lengths.piece_len(piece) as usize;
                let buf = st
                    .partial
                    .entry(block.piece)
                    .or_insert_with(|| vec![0u8; plen]);
                let start = block.offset as usize;
                if let Some(dst) = buf.get_mut(start..start + data.len()) {
                    dst.copy_from_slice(data);
                }
                let cancels = cancel
                    .iter()
                    .filter_map(|k| st.peers.get(k).map(|p| (p.tx.clone(), block)))
                    .collect();
                if piece_complete {
                    if let Some(buf) = st.partial.remove(&block.piece) {
                        drop(st);
                        self.verify_piece(piece, buf);
                    }
                }
                cancels
            }
        }
    }

    /// Hashes a complete piece on the blocking pool, then files it.
    fn verify_piece(self: &Arc<Self>, piece: PieceIndex, buf: Vec<u8>) {
        self.pending_verify.fetch_add(1, Ordering::SeqCst);
        let t = self.clone();
        tokio::task::spawn_blocking(move || {
            // Released on every path; peers paused by the backlog resume when it drains.
            struct Done<'a>(&'a Torrent);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    let before = self.0.pending_verify.fetch_sub(1, Ordering::SeqCst);
                    if before == MAX_PENDING_VERIFY {
                        let st = self.0.lock();
                        self.0.wake_peers(&st);
                    }
                }
            }
            let _done = Done(&t);
            let expected = t.meta.info.piece_hashes.get(piece.as_usize()).copied();
            let ok = expected.is_some_and(|h| Sha1::digest(&buf)[..] == h[..]);
            if !ok {
                t.piece_failed(piece);
                return;
            }
            let mut written = false;
            if let Some(store) = &t.store {
                if !t.lock().store_failed {
                    match store.write_at(t.lengths.piece_offset(piece), &buf) {
                        Ok(()) => written = true,
                        Err(e) => {
                            log::warn!(
                                "writing to {}: {e}; continuing in memory only",
                                store.content_path().display()
                            );
                            t.lock().store_failed = true;
                        }
                    }
                }
            }
            t.piece_verified(piece, Bytes::from(buf), written);
        });
    }

    fn piece_verified(&self, piece: PieceIndex, data: Bytes, on_disk: bool) {
        let mut st = self.lock();
        st.picker.piece_verified(piece);
        if on_disk {
            st.on_disk.set(piece.get(), true);
        }
        // Pieces a reader waits for go to the cache even when on disk: the reader copies from it.
        let evicted = st.cache.insert(piece.get(), data);
        self.after_evict(&mut st, &evicted);
        let background = self.background_wanted(&st);
        st.picker.set_background(background);
        for p in st.peers.values() {
            let _ = p.tx.send(PeerCommand::Have(piece.get()));
        }
        let complete = st.picker.is_complete();
        drop(st);
        self.piece_done.notify_waiters();
        if complete && !self.completed_announced.swap(true, Ordering::Relaxed) {
            log::info!("{}: all pieces verified", self.name());
            self.publish_totals();
            if let Some(a) = self
                .announcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                a.completed();
            }
        }
    }

    fn piece_failed(&self, piece: PieceIndex) {
        self.counters.hash_failures.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let contributors = st.picker.piece_failed(piece);
        log::warn!(
            "piece {piece} failed its hash check (from {} peer(s)); fetching it again",
            contributors.len()
        );
        let points = if contributors.len() == 1 {
            SOLE_STRIKE
        } else {
            SHARED_STRIKE
        };
        for k in contributors {
            let mut ban = None;
            if let Some(p) = st.peers.get_mut(&k) {
                let before = p.strikes;
                p.strikes += points;
                // Only when crossing the limit: pieces still in flight may fail again later.
                if before < MAX_STRIKES && p.strikes >= MAX_STRIKES {
                    ban = Some((p.addr, p.peer_id));
                    let _ = p.tx.send(PeerCommand::Disconnect);
                }
            }
            if let Some((addr, id)) = ban {
                log::warn!("banning peer {addr}: it sent corrupt data for several pieces");
                st.banned_addrs.insert(addr);
                st.banned_ids.insert(id);
            }
        }
        self.wake_peers(&st);
    }
}

/// Spawns a task that logs its failure by name instead of vanishing.
pub(crate) fn spawn_named<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        fut.await;
        log::trace!("task {name} ended");
    })
}
