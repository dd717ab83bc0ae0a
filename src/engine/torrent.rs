//! One torrent: the handle its peer tasks, readers and timers share. The state lives in
//! `engine::state` behind one mutex and changes only through its named transitions; this file
//! adds what needs I/O or tasks around them: hashing and disk writes on the blocking pool, disk
//! reads, the tracker announcer, the torrent's task group and its shutdown.
//!
//! Invariants:
//! - Only pieces whose SHA-1 matched are held; only held pieces are announced, uploaded or
//!   returned to readers (`state` keeps "held iff cached or on disk").
//! - Locks: `state` is held only for short, non-blocking sections (no I/O, no await); the
//!   announcer's mutex is never taken while `state` is held. There is no other lock.
//! - Every task of the torrent (ticker, connects, peers, hashing) is in `tasks`; `shutdown`
//!   cancels them and returns when they are gone.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::blame::ReceivedPiece;
use crate::core::layout::{Bitfield, BlockRef, Lengths, PieceIndex};
use crate::core::metainfo::{InfoHash, Metainfo};
use crate::core::peer_proto::Command;
use crate::core::picker::PeerKey;
use crate::core::tracker_proto::{SwarmPeer, TransferTotals};
use crate::disk::Store;
use crate::engine::state::{Banned, BlockArrival, State, StateConfig};
use crate::engine::tasks::TaskGroup;
use crate::engine::{PeerSource, SourceCounts};
use crate::net::dht::DhtHandle;
use crate::net::ratelimit::RateLimiter;
use crate::net::tracker::{Announcer, AnnouncerConfig, AnnouncerSetup};

/// What a torrent is asked to do; filled from the command line.
#[derive(Debug, Clone)]
pub struct TorrentConfig {
    /// `-d, --data-dir`: verified pieces are also written to `DIR/<name>`.
    pub data_dir: Option<PathBuf>,
    /// Bytes of verified pieces kept in memory.
    pub cache_size: u64,
    pub max_peers: usize,
    /// `--upload-slots`: peers unchoked for their rate (the optimistic unchoke comes on top).
    pub upload_slots: usize,
    /// `--peer`: connected to directly and re-tried while the torrent runs.
    pub peers: Vec<SocketAddr>,
    /// Peers found while fetching a magnet's metadata: connected to at start, once.
    pub found_peers: Vec<(SocketAddr, PeerSource)>,
    /// `--tracker`: added after the torrent's own trackers.
    pub trackers: Vec<String>,
    pub upload_rate: Option<u64>,
    pub download_rate: Option<u64>,
    /// `--no-upload`: nobody is ever unchoked.
    pub no_upload: bool,
    /// Fetch every piece (download, seed). Off for a mount without a data dir: then pieces are
    /// fetched in the background only while the cache has room.
    pub fetch_all: bool,
    /// A read with no progress for this long fails with EIO.
    pub read_timeout: Duration,
    /// The largest readahead window of a sequential reader, in bytes.
    pub readahead: u64,
    /// Announce to trackers at all.
    pub announce: bool,
    /// How often the DHT is asked for peers and told about us (`--dht-announce-interval`); while
    /// no DHT node answers, every `DHT_RETRY` instead. Private torrents never use the DHT.
    pub dht_announce_interval: Duration,
}

impl Default for TorrentConfig {
    fn default() -> Self {
        TorrentConfig {
            data_dir: None,
            cache_size: 256 << 20,
            max_peers: 50,
            upload_slots: 4,
            peers: Vec::new(),
            found_peers: Vec::new(),
            trackers: Vec::new(),
            upload_rate: None,
            download_rate: None,
            no_upload: false,
            fetch_all: true,
            read_timeout: Duration::from_secs(60),
            readahead: 32 << 20,
            announce: true,
            dht_announce_interval: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Default)]
pub struct Counters {
    pub downloaded: AtomicU64,
    pub uploaded: AtomicU64,
    pub wasted: AtomicU64,
    pub hash_failures: AtomicU64,
    /// PEX messages sent and received (BEP 11).
    pub pex_sent: AtomicU64,
    pub pex_received: AtomicU64,
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
    /// Connected peers by source, and every peer that ever joined by source.
    pub sources: SourceCounts,
    pub sources_ever: SourceCounts,
    pub pex_sent: u64,
    pub pex_received: u64,
    /// Nodes in our DHT routing table; `None` without a DHT.
    pub dht_nodes: Option<usize>,
}

pub struct Torrent {
    pub meta: Arc<Metainfo>,
    pub lengths: Lengths,
    pub info_hash: InfoHash,
    pub peer_id: [u8; 20],
    pub listen_port: u16,
    /// The address we listen on when it is a specific one: outgoing connections and tracker
    /// announces leave from it, so peers and trackers see the address that reaches us.
    pub local_ip: Option<IpAddr>,
    pub(crate) cfg: TorrentConfig,
    state: Mutex<State>,
    pub counters: Counters,
    store: Option<Arc<Store>>,
    /// Woken whenever a piece is verified, and at shutdown (readers wait on it).
    piece_done: Notify,
    pub(crate) tasks: TaskGroup,
    pub(crate) upload_limit: Option<RateLimiter>,
    pub(crate) download_limit: Option<RateLimiter>,
    totals_tx: watch::Sender<TransferTotals>,
    /// Pieces handed to the blocking pool for hashing and not yet filed.
    pending_verify: AtomicUsize,
    announcer: Mutex<Option<Announcer>>,
    completed_announced: AtomicBool,
    /// The session's DHT node, set at start (for its counts in snapshots).
    pub(crate) dht: OnceLock<DhtHandle>,
    /// Where discovery sends addresses (trackers are started again on waking).
    discovery: Mutex<Option<mpsc::UnboundedSender<(SocketAddr, PeerSource)>>>,
    /// False while idle (`sleep`): DHT announces wait.
    awake: watch::Sender<bool>,
}

/// Complete pieces waiting to be hashed (and written) beyond which peers stop requesting: a
/// slow disk (dirty-page throttling) must not pile up piece buffers in memory.
const MAX_PENDING_VERIFY: usize = 32;
/// How long shutdown waits for the torrent's tasks before aborting them.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

impl Torrent {
    /// Builds the torrent. With a data dir, verifies what is already there first (blocking;
    /// `progress` gets pieces checked). `cancel` is the parent token (the session's). Call
    /// `start` on a runtime afterwards.
    pub fn new(
        meta: Arc<Metainfo>,
        cfg: TorrentConfig,
        peer_id: [u8; 20],
        listen_addr: SocketAddr,
        cancel: CancellationToken,
        progress: &(dyn Fn(u32) + Sync),
    ) -> anyhow::Result<Arc<Torrent>> {
        let lengths = meta.info.lengths;
        let count = lengths.piece_count();
        let listen_port = listen_addr.port();
        // A listener bound to one address: connections and announces leave from it too.
        let local_ip = Some(listen_addr.ip()).filter(|ip| !ip.is_unspecified());
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
        let max_window = if store.is_some() {
            cfg.readahead
        } else {
            // Readahead past half the cache would evict what it fetched before anyone reads it.
            cfg.readahead.min(cfg.cache_size / 2)
        };
        let state = State::new(
            StateConfig {
                lengths,
                cache_size: cfg.cache_size,
                max_peers: cfg.max_peers,
                upload_slots: cfg.upload_slots,
                fetch_all: cfg.fetch_all,
                has_store: store.is_some(),
                max_window,
                our_peer_id: peer_id,
                listen_port,
                local_ip,
                no_upload: cfg.no_upload,
                seed,
            },
            on_disk,
        );
        let mut state = state;
        state.touch(Instant::now().into_std());
        let (totals_tx, _) = watch::channel(TransferTotals {
            uploaded: 0,
            downloaded: 0,
            left: state.bytes_left(),
        });
        Ok(Arc::new(Torrent {
            info_hash: meta.info_hash,
            lengths,
            peer_id,
            listen_port,
            local_ip,
            upload_limit: cfg.upload_rate.map(RateLimiter::new),
            download_limit: cfg.download_rate.map(RateLimiter::new),
            cfg,
            state: Mutex::new(state),
            counters: Counters::default(),
            store,
            piece_done: Notify::new(),
            tasks: TaskGroup::new("torrent", cancel.child_token()),
            totals_tx,
            pending_verify: AtomicUsize::new(0),
            announcer: Mutex::new(None),
            completed_announced: AtomicBool::new(false),
            dht: OnceLock::new(),
            discovery: Mutex::new(None),
            awake: watch::channel(true).0,
            meta,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.meta.info.name
    }

    pub fn is_shutting_down(&self) -> bool {
        self.tasks.is_cancelled()
    }

    /// Resolves once the torrent starts shutting down.
    pub async fn stopped(&self) {
        self.tasks.token().cancelled().await
    }

    /// True when every piece has been verified at least once and is held (in memory or on disk).
    pub fn is_complete(&self) -> bool {
        self.lock().is_complete()
    }

    /// Resolves when every piece is held, or the torrent shuts down (then false).
    pub async fn wait_complete(&self) -> bool {
        loop {
            let notified = self.piece_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_shutting_down() {
                return false;
            }
            if self.is_complete() {
                return true;
            }
            notified.await;
        }
    }

    /// Wakes everyone waiting for a piece (a piece was verified, or shutdown).
    pub(crate) fn piece_done_waiter(&self) -> tokio::sync::futures::Notified<'_> {
        self.piece_done.notified()
    }

    /// Starts the announcer; the timers and connector are started by `engine::ticker`.
    pub(crate) fn start_announcer(&self, peers_tx: mpsc::UnboundedSender<SocketAddr>) {
        if !self.cfg.announce {
            return;
        }
        let mut tiers = self.meta.trackers();
        for t in &self.cfg.trackers {
            if !tiers.iter().flatten().any(|x| x == t) {
                tiers.push(vec![t.clone()]);
            }
        }
        tiers.retain(|t| !t.is_empty());
        if tiers.is_empty() {
            return;
        }
        let a = Announcer::spawn(AnnouncerSetup {
            config: AnnouncerConfig {
                local_ip: self.local_ip,
                ..AnnouncerConfig::default()
            },
            tiers,
            peer: SwarmPeer {
                info_hash: self.info_hash.0,
                peer_id: self.peer_id,
                port: self.listen_port,
            },
            totals: self.totals_tx.subscribe(),
            peers_tx,
        });
        *self.announcer.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
        if self.is_complete() {
            self.completed_announced.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn discovery_tx(
        &self,
    ) -> MutexGuard<'_, Option<mpsc::UnboundedSender<(SocketAddr, PeerSource)>>> {
        self.discovery.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn awake_rx(&self) -> watch::Receiver<bool> {
        self.awake.subscribe()
    }

    /// Goes idle: every peer connection closes, none is made or let in, trackers hear `stopped`
    /// and DHT announces wait, until `wake` (which a read calls). Metadata, cache and data stay.
    pub async fn sleep(&self) {
        {
            let mut st = self.lock();
            if st.is_asleep() {
                return;
            }
            st.sleep();
        }
        self.awake.send_replace(false);
        self.stop_announcer().await;
        log::info!("{}: idle; connections closed", self.name());
    }

    /// Stops the announcer, if one runs: trackers hear `stopped` (bounded).
    async fn stop_announcer(&self) {
        let announcer = self
            .announcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(a) = announcer {
            let _ = tokio::time::timeout(Duration::from_secs(3), a.stop()).await;
        }
    }

    /// Leaves idleness: known peers are dialled again, trackers and the DHT announce again.
    pub fn wake(self: &Arc<Self>) {
        if self.is_shutting_down() || !self.lock().wake() {
            return;
        }
        log::info!("{}: woken", self.name());
        self.awake.send_replace(true);
        let discovery = self.discovery_tx().clone();
        if let Some(peers_tx) = discovery {
            self.start_trackers(peers_tx);
        }
        self.connect_more();
    }

    pub fn is_asleep(&self) -> bool {
        self.lock().is_asleep()
    }

    /// Stops: readers fail, peers disconnect, trackers hear `stopped` (bounded), and every task
    /// of the torrent is gone when this returns.
    pub async fn shutdown(&self) {
        self.tasks.token().cancel();
        self.piece_done.notify_waiters();
        self.lock().disconnect_all();
        self.stop_announcer().await;
        self.tasks.shutdown(SHUTDOWN_BOUND).await;
    }

    pub(crate) fn publish_totals(&self) {
        let left = self.lock().bytes_left();
        self.totals_tx.send_replace(TransferTotals {
            uploaded: self.counters.uploaded.load(Ordering::Relaxed),
            downloaded: self.counters.downloaded.load(Ordering::Relaxed),
            left,
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let totals = st.peer_totals();
        let (sources, sources_ever) = st.peer_sources();
        Snapshot {
            sources,
            sources_ever,
            pex_sent: self.counters.pex_sent.load(Ordering::Relaxed),
            pex_received: self.counters.pex_received.load(Ordering::Relaxed),
            dht_nodes: self.dht.get().map(|d| d.stats().nodes),
            downloaded: self.counters.downloaded.load(Ordering::Relaxed),
            uploaded: self.counters.uploaded.load(Ordering::Relaxed),
            down_rate: totals.down_rate as f64,
            up_rate: totals.up_rate as f64,
            peers: totals.peers,
            seeds: totals.seeds,
            pieces_have: st.have().count_ones(),
            pieces_total: self.lengths.piece_count(),
            bytes_left: st.bytes_left(),
            cache_used: st.cache_used(),
            hash_failures: self.counters.hash_failures.load(Ordering::Relaxed),
        }
    }

    /// Sets this torrent's share of the session's cache budget; a smaller share evicts at once.
    pub fn set_cache_budget(&self, bytes: u64) {
        self.lock().set_cache_budget(bytes);
    }

    /// Whether a reader has one of its files open, or read within `within`.
    pub fn is_being_read(&self, within: Duration) -> bool {
        self.lock().is_being_read(Instant::now().into_std(), within)
    }

    /// Bytes received from each peer (connected or gone) by peer id, with its last address.
    pub fn received_by_peer(&self) -> Vec<([u8; 20], SocketAddr, u64)> {
        self.lock().received_by_peer()
    }

    /// Verified fraction of the pieces `[first, last]`.
    pub fn progress_of(&self, pieces: std::ops::Range<u32>) -> f64 {
        if pieces.is_empty() {
            return 1.0;
        }
        let st = self.lock();
        let have = pieces.clone().filter(|&p| st.have().get(p)).count();
        have as f64 / pieces.len() as f64
    }

    // ---- peers (called by the peer tasks) ----

    /// A connected peer joins; None if it must not be kept.
    pub(crate) fn peer_joined(
        &self,
        addr: SocketAddr,
        outgoing: bool,
        peer_id: [u8; 20],
        tx: mpsc::UnboundedSender<Command>,
        cancel: CancellationToken,
    ) -> Option<(PeerKey, Bitfield)> {
        if self.is_shutting_down() {
            return None;
        }
        self.lock().peer_joined(
            addr,
            outgoing,
            peer_id,
            tx,
            cancel,
            Instant::now().into_std(),
        )
    }

    /// Up to `max` blocks for `key`, or none while the hashing / disk backlog is full (it wakes
    /// the peers when it drains).
    pub(crate) fn pick(&self, key: PeerKey, bitfield: &Bitfield, max: usize) -> Vec<BlockRef> {
        if self.pending_verify.load(Ordering::SeqCst) >= MAX_PENDING_VERIFY {
            return Vec::new();
        }
        self.lock()
            .pick(key, bitfield, max, Instant::now().into_std())
    }

    /// A block arrived from `key`: filed, and hashed once its piece is complete.
    pub(crate) fn block_arrived(self: &Arc<Self>, key: PeerKey, block: BlockRef, data: &[u8]) {
        let len = data.len() as u64;
        self.counters.downloaded.fetch_add(len, Ordering::Relaxed);
        let now = Instant::now().into_std();
        let arrival = self.lock().block_arrived(key, block, data, now);
        match arrival {
            BlockArrival::Unwanted => {
                self.counters.wasted.fetch_add(len, Ordering::Relaxed);
            }
            BlockArrival::Accepted => {}
            BlockArrival::PieceComplete(piece, received) => self.verify_piece(piece, received),
        }
    }

    /// Verified data for an upload or a read: from the cache, else from disk (then cached).
    /// None if we do not hold it. The disk read runs on the blocking pool.
    pub(crate) async fn piece_data(&self, piece: PieceIndex, touch: bool) -> Option<Bytes> {
        {
            let mut st = self.lock();
            if let Some(hit) = st.cached_piece(piece, touch) {
                return Some(hit);
            }
            if !st.is_on_disk(piece) {
                return None;
            }
        }
        let store = self.store.as_ref()?;
        let offset = self.lengths.piece_offset(piece);
        let len = self.lengths.piece_len(piece) as usize;
        let data = match store.read_piece(offset, len).await {
            Ok(b) => b,
            Err(e) => {
                log::warn!("reading piece {piece} from disk: {e}");
                return None;
            }
        };
        self.lock().cache_from_disk(piece, data.clone());
        Some(data)
    }

    /// Hashes a complete piece on the blocking pool, writes it to the data dir, then files it.
    fn verify_piece(self: &Arc<Self>, piece: PieceIndex, received: ReceivedPiece) {
        self.pending_verify.fetch_add(1, Ordering::SeqCst);
        let t = self.clone();
        self.tasks.spawn_blocking("verify", move || {
            // Released on every path; peers paused by the backlog resume when it drains.
            struct Done<'a>(&'a Torrent);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    let before = self.0.pending_verify.fetch_sub(1, Ordering::SeqCst);
                    if before == MAX_PENDING_VERIFY {
                        self.0.lock().wake_peers();
                    }
                }
            }
            let _done = Done(&t);
            let expected = t.meta.info.piece_hashes.get(piece.as_usize()).copied();
            if expected.is_none_or(|h| Sha1::digest(&received.data)[..] != h[..]) {
                t.piece_failed(piece, received);
                return;
            }
            let buf = received.data;
            let mut written = false;
            if let Some(store) = &t.store {
                if !t.lock().store_failed() {
                    match store.write_at(t.lengths.piece_offset(piece), &buf) {
                        Ok(()) => written = true,
                        Err(e) => {
                            log::warn!(
                                "writing to {}: {e}; continuing in memory only",
                                store.content_path().display()
                            );
                            t.lock().set_store_failed();
                        }
                    }
                }
            }
            t.piece_verified(piece, Bytes::from(buf), written);
        });
    }

    /// The data dir's store, for tests that inject disk faults.
    #[cfg(test)]
    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    fn piece_verified(&self, piece: PieceIndex, data: Bytes, on_disk: bool) {
        let complete = {
            let mut st = self.lock();
            let banned = st.piece_verified(piece, data, on_disk);
            log_bans(&banned);
            st.is_complete()
        };
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

    fn piece_failed(&self, piece: PieceIndex, received: ReceivedPiece) {
        self.counters.hash_failures.fetch_add(1, Ordering::Relaxed);
        let (contributors, banned) = self.lock().piece_failed(piece, received);
        log::warn!(
            "piece {piece} failed its hash check (from {contributors} peer(s)); fetching it again"
        );
        log_bans(&banned);
    }
}

fn log_bans(banned: &[Banned]) {
    for b in banned {
        log::warn!(
            "banning peer {}: it sent corrupt data for several pieces",
            b.addr
        );
    }
}
