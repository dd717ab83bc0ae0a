//! The session: our peer id, the listening socket, and the torrents it routes incoming
//! connections to. It owns a task group (listener, handshakes) whose token is the parent of every
//! torrent's, so `shutdown` stops the listener, then each torrent, and returns when all their
//! tasks are gone.
//!
//! Incoming connections are bounded before we know their torrent: at most
//! `SessionConfig::max_incoming` at once (handshaking or running), and at most
//! `MAX_HANDSHAKES` of them still handshaking; past either bound a connection is closed at once.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::core::metainfo::{InfoHash, Metainfo};
use crate::core::tracker_proto::{SwarmPeer, TransferTotals};
use crate::core::wire::Handshake;
use crate::engine::metadata::{self, FetchConfig, FetchProgress, Fetched};
use crate::engine::tasks::{Failure, TaskGroup};
use crate::engine::ticker::feed_dht_peers;
use crate::engine::torrent::{Torrent, TorrentConfig};
use crate::engine::PeerSource;
use crate::net::dht::{DhtHandle, DhtNode, DhtSettings};
use crate::net::peer;
use crate::net::tracker::{Announcer, AnnouncerConfig, AnnouncerSetup};

/// The default listening port; the next free one is taken if it is busy.
pub const DEFAULT_PORT: u16 = 6881;
/// Incoming connections still in their handshake, at most.
pub const MAX_HANDSHAKES: usize = 32;
/// `left` announced while a magnet's size is unknown.
const METADATA_LEFT: u64 = 16 * 1024;
/// How long shutdown waits for the listener and handshakes.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);
/// While a magnet's metadata is missing, the DHT is asked again this often (nodes that know the
/// torrent may join later, and a fresh node's table fills up as it goes).
const METADATA_DHT_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Incoming peer connections alive at once, across all torrents (`--max-incoming`).
    pub max_incoming: usize,
    /// Run a DHT node on the listen address (UDP, same port); `None` is `--no-dht`.
    pub dht: Option<DhtSettings>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_incoming: 200,
            dht: None,
        }
    }
}

type Routes = Arc<Mutex<HashMap<[u8; 20], Arc<Torrent>>>>;

pub struct Session {
    pub peer_id: [u8; 20],
    pub listen_addr: SocketAddr,
    torrents: Routes,
    tasks: Arc<TaskGroup>,
    dht: Option<DhtHandle>,
}

/// An Azureus-style peer id: `-SF0100-` and 12 random bytes.
pub fn new_peer_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"-SF0100-");
    rand::thread_rng().fill(&mut id[8..]);
    id
}

/// Binds `listen`, or with none the first free port from 6881 up (then any port).
pub async fn bind_listener(listen: Option<SocketAddr>) -> std::io::Result<TcpListener> {
    if let Some(addr) = listen {
        return TcpListener::bind(addr).await;
    }
    for port in DEFAULT_PORT..DEFAULT_PORT + 10 {
        if let Ok(l) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
            return Ok(l);
        }
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await
}

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<[u8; 20], Arc<Torrent>>> {
    routes.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Starts accepting connections on `listener`.
    pub fn start(listener: TcpListener, cfg: SessionConfig) -> std::io::Result<Session> {
        let listen_addr = listener.local_addr()?;
        let torrents: Routes = Arc::default();
        let tasks = Arc::new(TaskGroup::new("session", CancellationToken::new()));
        let incoming = Arc::new(Semaphore::new(cfg.max_incoming.max(1)));
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let routes = torrents.clone();
        let group = tasks.clone();
        tasks.spawn("listener", Failure::Serious, async move {
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (Ok(slot), Ok(handshake)) = (
                    incoming.clone().try_acquire_owned(),
                    handshakes.clone().try_acquire_owned(),
                ) else {
                    log::debug!("incoming {addr}: too many connections; closed");
                    continue; // dropping the stream closes it
                };
                let routes = routes.clone();
                group.spawn("peer-in", Failure::Routine, async move {
                    answer(stream, addr, routes, slot, handshake).await
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), std::convert::Infallible>(())
        });
        let dht = cfg
            .dht
            .and_then(|settings| start_dht(listen_addr, settings));
        Ok(Session {
            peer_id: new_peer_id(),
            listen_addr,
            torrents,
            tasks,
            dht,
        })
    }

    /// The session's DHT node, unless `--no-dht` (or its socket could not be had).
    pub fn dht(&self) -> Option<&DhtHandle> {
        self.dht.as_ref()
    }

    /// Adds a torrent (verifying its data dir first, on the blocking pool) and starts it.
    pub async fn add_torrent(
        &self,
        meta: Arc<Metainfo>,
        cfg: TorrentConfig,
        progress: Arc<dyn Fn(u32) + Send + Sync>,
    ) -> anyhow::Result<Arc<Torrent>> {
        let peer_id = self.peer_id;
        let listen_addr = self.listen_addr;
        let parent = self.tasks.token().clone();
        let t = tokio::task::spawn_blocking(move || {
            Torrent::new(meta, cfg, peer_id, listen_addr, parent, &|n| progress(n))
        })
        .await??;
        lock(&self.torrents).insert(t.info_hash.0, t.clone());
        t.start(self.dht.clone());
        Ok(t)
    }

    /// Stops a torrent and forgets it: its peers are dropped, trackers hear `stopped`, and its
    /// readers fail. Returns false if the session has no such torrent.
    pub async fn remove_torrent(&self, info_hash: InfoHash) -> bool {
        let removed = lock(&self.torrents).remove(&info_hash.0);
        match removed {
            Some(t) => {
                t.shutdown().await;
                true
            }
            None => false,
        }
    }

    /// The torrent with this info-hash, if the session has it.
    pub fn torrent(&self, info_hash: InfoHash) -> Option<Arc<Torrent>> {
        lock(&self.torrents).get(&info_hash.0).cloned()
    }

    /// Fetches a magnet link's metadata from `peers` and the peers `trackers` return, until it
    /// is verified (`None` if the session shuts down first; the caller bounds the wait).
    /// Progress goes to `progress_tx`.
    pub async fn fetch_metadata(
        &self,
        info_hash: InfoHash,
        peers: Vec<SocketAddr>,
        trackers: Vec<Vec<String>>,
        progress_tx: watch::Sender<FetchProgress>,
    ) -> Option<Fetched> {
        let (peers_tx, peers_rx) = mpsc::unbounded_channel();
        for p in peers {
            let _ = peers_tx.send((p, PeerSource::Direct));
        }
        let (tracker_tx, mut tracker_rx) = mpsc::unbounded_channel();
        let forward = peers_tx.clone();
        // Ends when the announcer (its sender) is dropped at the end of the fetch.
        tokio::spawn(async move {
            while let Some(addr) = tracker_rx.recv().await {
                if forward.send((addr, PeerSource::Tracker)).is_err() {
                    break;
                }
            }
        });
        let tiers: Vec<Vec<String>> = trackers.into_iter().filter(|t| !t.is_empty()).collect();
        // Dropped at the end without a `stopped` event: the torrent announces afresh.
        let _announcer = (!tiers.is_empty()).then(|| {
            // Trackers hear a leecher with something left; the real size is not known yet.
            let (_totals_tx, totals) = watch::channel(TransferTotals {
                left: METADATA_LEFT,
                ..TransferTotals::default()
            });
            Announcer::spawn(AnnouncerSetup {
                config: AnnouncerConfig::default(),
                tiers,
                peer: SwarmPeer {
                    info_hash: info_hash.0,
                    peer_id: self.peer_id,
                    port: self.listen_addr.port(),
                },
                totals,
                peers_tx: tracker_tx,
            })
        });
        if let Some(dht) = self.dht.clone() {
            let forward = peers_tx.clone();
            // Ends with the fetch (the receiver is dropped) or at shutdown.
            self.tasks
                .spawn("metadata-dht", Failure::Routine, async move {
                    // Without announcing us: the torrent does that once it starts.
                    let every = METADATA_DHT_RETRY;
                    feed_dht_peers(dht, info_hash.0, None, every, every, forward, None).await;
                    Ok::<(), std::convert::Infallible>(())
                });
        }
        drop(peers_tx);
        let mut cfg = FetchConfig::new(info_hash, self.peer_id, self.listen_addr.port());
        cfg.local_ip = Some(self.listen_addr.ip()).filter(|ip| !ip.is_unspecified());
        metadata::fetch(cfg, peers_rx, progress_tx, self.tasks.token().child_token()).await
    }

    /// Stops accepting, shuts every torrent down, and returns once all their tasks are gone.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Torrent>> = lock(&self.torrents).drain().map(|(_, t)| t).collect();
        self.tasks.token().cancel();
        for t in &all {
            t.shutdown().await;
        }
        self.tasks.shutdown(SHUTDOWN_BOUND).await;
        if let Some(dht) = &self.dht {
            // Bounded: the node only has to write its table.
            let _ = tokio::time::timeout(SHUTDOWN_BOUND, dht.shutdown()).await;
        }
    }
}

/// Binds the DHT's UDP socket on the TCP listener's address and port and starts the node; on
/// failure the session runs without a DHT (said once, at warn).
fn start_dht(listen_addr: SocketAddr, settings: DhtSettings) -> Option<DhtHandle> {
    let started = std::net::UdpSocket::bind(listen_addr)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        })
        .and_then(|socket| DhtNode::start(socket, settings));
    match started {
        Ok(handle) => Some(handle),
        Err(e) => {
            log::warn!("DHT off: cannot use UDP {listen_addr}: {e}");
            None
        }
    }
}

/// Reads an incoming peer's handshake, finds its torrent, answers, and hands the connection to
/// the torrent's task group. `slot` is held as long as the connection lives.
async fn answer(
    stream: TcpStream,
    addr: SocketAddr,
    routes: Routes,
    slot: OwnedSemaphorePermit,
    handshake: OwnedSemaphorePermit,
) -> Result<(), peer::PeerIoError> {
    let (theirs, incoming) = peer::accept(stream).await?;
    let torrent = lock(&routes).get(&theirs.info_hash).cloned();
    let Some(t) = torrent else {
        log::debug!("incoming {addr}: unknown torrent");
        return Ok(());
    };
    if t.is_shutting_down() {
        return Ok(());
    }
    let ours = Handshake::new(t.info_hash.0, t.peer_id);
    let (r, w) = incoming.answer(&ours).await?;
    drop(handshake);
    let owner = t.clone();
    owner.tasks.spawn("peer-in", Failure::Routine, async move {
        let _slot = slot;
        crate::engine::peer::run(t, addr, false, theirs, r, w).await
    });
    Ok(())
}
