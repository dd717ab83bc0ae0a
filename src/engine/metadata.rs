//! Fetching a magnet link's metadata (BEP 9) before its torrent can start: connect to the peers
//! discovery finds (magnet `x.pe`, `--peer`, trackers, the DHT), up to a few at once; on each,
//! do the BEP 10 handshake and ask for 16 KiB pieces of the info dictionary, while
//! `core::metadata::MetadataAssembly` decides who is asked for what and verifies the result.
//! The connections end once the metadata is verified; the torrent then connects afresh, as a
//! normal torrent, to the peers that were found.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::metadata::{
    self, Arrival, MetadataAssembly, MetadataError, MetadataMessage, PeerId,
};
use crate::core::metainfo::InfoHash;
use crate::core::wire::{ExtendedHandshake, Handshake, Message};
use crate::engine::tasks::{Failure, TaskGroup};
use crate::engine::PeerSource;
use crate::net::peer::{self, Outgoing, PeerIoError, PeerWriter};

/// Our id for `ut_metadata` in the extension handshake we send.
const OUR_METADATA_ID: u8 = 1;
/// Requests outstanding per peer.
const PIPELINE: usize = 2;
/// Addresses remembered (tried or queued), at most; more are ignored.
const MAX_KNOWN: usize = 10_000;
/// A peer that rejects this many requests is not asked again.
const MAX_REJECTS: u32 = 3;
/// A connection that hears nothing for this long ends.
const IDLE: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(500);

/// How one fetch runs.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub info_hash: InfoHash,
    pub peer_id: [u8; 20],
    /// Our listen port, for the extension handshake.
    pub listen_port: u16,
    /// Where connections leave from (the listen address, when it names one).
    pub local_ip: Option<IpAddr>,
    /// Connections open at once.
    pub max_connections: usize,
    /// A piece a peer has not sent for this long is asked of another.
    pub request_timeout: Duration,
}

impl FetchConfig {
    pub fn new(info_hash: InfoHash, peer_id: [u8; 20], listen_port: u16) -> Self {
        FetchConfig {
            info_hash,
            peer_id,
            listen_port,
            local_ip: None,
            max_connections: 8,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// How far a fetch has come, for progress lines and the error after a timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Distinct peer addresses heard of.
    pub peers_found: usize,
    /// Connections that completed the BitTorrent handshake.
    pub peers_connected: usize,
    /// Peers that offered the metadata (ut_metadata with a size).
    pub peers_offering: usize,
    pub pieces_have: u32,
    pub pieces_total: u32,
}

/// The verified info dictionary and the peers worth connecting to for the content.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub info_bytes: Vec<u8>,
    /// Every address heard of, those that answered first.
    pub peers: Vec<(SocketAddr, PeerSource)>,
}

#[derive(Debug, thiserror::Error)]
enum FetchPeerError {
    #[error(transparent)]
    Io(#[from] PeerIoError),
    #[error("peer does not support extensions (BEP 10)")]
    NoExtensions,
    #[error("peer does not offer the metadata")]
    NoMetadata,
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("peer rejected {0} metadata requests")]
    Refused(u32),
    #[error("peer sent metadata that did not match the info-hash")]
    Corrupt,
}

struct Inner {
    assembly: MetadataAssembly,
    result: Option<Vec<u8>>,
    known: HashMap<SocketAddr, PeerSource>,
    queue: VecDeque<SocketAddr>,
    answered: Vec<SocketAddr>,
    /// Peers that sent pieces of corrupt metadata.
    banned: HashSet<PeerId>,
    active: usize,
    next_id: PeerId,
    progress: FetchProgress,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Woken when a connection ends or the metadata is complete.
    wake: Notify,
    /// Cancelled once the metadata is complete: every connection ends.
    finished: CancellationToken,
    progress_tx: watch::Sender<FetchProgress>,
    cfg: FetchConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &mut Inner) {
        let (have, total) = inner.assembly.progress();
        inner.progress.pieces_have = have;
        inner.progress.pieces_total = total;
        self.progress_tx.send_replace(inner.progress);
    }
}

/// Fetches the metadata from the peers that arrive on `peers_rx`, until it is verified or
/// `cancel` fires (the caller bounds the wait). Progress goes to `progress_tx`.
pub async fn fetch(
    cfg: FetchConfig,
    mut peers_rx: mpsc::UnboundedReceiver<(SocketAddr, PeerSource)>,
    progress_tx: watch::Sender<FetchProgress>,
    cancel: CancellationToken,
) -> Option<Fetched> {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            assembly: MetadataAssembly::new(cfg.info_hash, cfg.request_timeout),
            result: None,
            known: HashMap::new(),
            queue: VecDeque::new(),
            answered: Vec::new(),
            banned: HashSet::new(),
            active: 0,
            next_id: 0,
            progress: FetchProgress::default(),
        }),
        wake: Notify::new(),
        finished: CancellationToken::new(),
        progress_tx,
        cfg,
    });
    let tasks = TaskGroup::new("metadata", cancel.child_token());
    let mut discovery_open = true;
    let result = loop {
        connect_more(&shared, &tasks);
        if let Some(info_bytes) = shared.lock().result.take() {
            break Some(info_bytes);
        }
        tokio::select! {
            addr = peers_rx.recv(), if discovery_open => match addr {
                Some((addr, source)) => {
                    let mut inner = shared.lock();
                    if inner.known.len() < MAX_KNOWN && !inner.known.contains_key(&addr) {
                        inner.known.insert(addr, source);
                        inner.queue.push_back(addr);
                        inner.progress.peers_found += 1;
                        shared.publish(&mut inner);
                    }
                }
                None => discovery_open = false,
            },
            _ = shared.wake.notified() => {}
            _ = cancel.cancelled() => break None,
        }
    };
    shared.finished.cancel();
    tasks.shutdown(Duration::from_secs(1)).await;
    let info_bytes = result?;
    let inner = shared.lock();
    let source = |a: &SocketAddr| inner.known.get(a).copied().unwrap_or(PeerSource::Direct);
    let mut peers: Vec<(SocketAddr, PeerSource)> =
        inner.answered.iter().map(|a| (*a, source(a))).collect();
    peers.extend(
        inner
            .known
            .iter()
            .filter(|(a, _)| !inner.answered.contains(a))
            .map(|(a, s)| (*a, *s)),
    );
    Some(Fetched { info_bytes, peers })
}

fn connect_more(shared: &Arc<Shared>, tasks: &TaskGroup) {
    let mut inner = shared.lock();
    while inner.active < shared.cfg.max_connections.max(1) {
        let Some(addr) = inner.queue.pop_front() else {
            return;
        };
        inner.active += 1;
        inner.next_id += 1;
        let id = inner.next_id;
        let conn = Conn {
            shared: shared.clone(),
            id,
        };
        tasks.spawn("metadata-peer", Failure::Routine, async move {
            conn.run(addr).await
        });
    }
}

/// One connection; leaving (however it ends) hands its requests back.
struct Conn {
    shared: Arc<Shared>,
    id: PeerId,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.assembly.peer_gone(self.id);
        inner.active -= 1;
        drop(inner);
        self.shared.wake.notify_one();
    }
}

impl Conn {
    async fn run(self, addr: SocketAddr) -> Result<(), FetchPeerError> {
        let r = self.exchange(addr).await;
        if let Err(e) = &r {
            log::debug!("metadata from {addr}: {e}");
        }
        r
    }

    async fn exchange(&self, addr: SocketAddr) -> Result<(), FetchPeerError> {
        let cfg = &self.shared.cfg;
        let ours = Handshake::new(cfg.info_hash.0, cfg.peer_id);
        let (theirs, mut reader, mut writer) = peer::connect(addr, cfg.local_ip, &ours).await?;
        {
            let mut inner = self.shared.lock();
            inner.progress.peers_connected += 1;
            self.shared.publish(&mut inner);
        }
        if !theirs.supports_extensions() {
            return Err(FetchPeerError::NoExtensions);
        }
        let hs = ExtendedHandshake {
            extensions: vec![(metadata::EXTENSION_NAME.into(), OUR_METADATA_ID)],
            client: Some(format!("swarmfs {}", env!("CARGO_PKG_VERSION"))),
            listen_port: Some(cfg.listen_port),
            ..ExtendedHandshake::default()
        };
        send(
            &mut writer,
            Message::Extended {
                id: 0,
                payload: hs.encode().into(),
            },
        )
        .await?;
        // Their id for ut_metadata, once their handshake offered it with a size.
        let mut their_id: Option<u8> = None;
        let mut their_size = 0u64;
        let mut outstanding: HashMap<u32, Instant> = HashMap::new();
        let mut rejects = 0u32;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                m = reader.next(IDLE) => match m? {
                    Message::Extended { id: 0, payload } => {
                        let theirs = ExtendedHandshake::decode(&payload)
                            .map_err(|_| FetchPeerError::NoMetadata)?;
                        let id = theirs
                            .extensions
                            .iter()
                            .find(|(name, id)| name == metadata::EXTENSION_NAME && *id != 0)
                            .map(|(_, id)| *id);
                        let (Some(id), Some(size)) = (id, theirs.metadata_size) else {
                            return Err(FetchPeerError::NoMetadata);
                        };
                        let mut inner = self.shared.lock();
                        inner.assembly.peer_offers(size)?;
                        if their_id.is_none() {
                            inner.progress.peers_offering += 1;
                            inner.answered.push(addr);
                            self.shared.publish(&mut inner);
                        }
                        their_id = Some(id);
                        their_size = size;
                    }
                    Message::Extended { id: OUR_METADATA_ID, payload } => {
                        let Ok(msg) = MetadataMessage::decode(&payload) else {
                            continue; // BEP 9: ignore what we do not understand
                        };
                        match msg {
                            MetadataMessage::Data { piece, total_size, data } => {
                                outstanding.remove(&piece);
                                if self.piece_arrived(piece, total_size, &data)? {
                                    return Ok(());
                                }
                            }
                            MetadataMessage::Reject { piece } => {
                                outstanding.remove(&piece);
                                self.shared.lock().assembly.rejected(self.id, piece);
                                rejects += 1;
                                if rejects >= MAX_REJECTS {
                                    return Err(FetchPeerError::Refused(rejects));
                                }
                            }
                            MetadataMessage::Request { piece } => {
                                // We have nothing to give yet.
                                if let Some(id) = their_id {
                                    let reject = MetadataMessage::Reject { piece }.encode();
                                    send(&mut writer, Message::Extended { id, payload: reject.into() }).await?;
                                }
                            }
                        }
                    }
                    _ => {} // bitfields, haves, keep-alives: not needed for metadata
                },
                _ = tick.tick() => {}
                _ = self.shared.finished.cancelled() => return Ok(()),
            }
            if self.shared.lock().banned.contains(&self.id) {
                return Err(FetchPeerError::Corrupt);
            }
            let Some(id) = their_id else { continue };
            let now = Instant::now();
            outstanding.retain(|_, at| now.duration_since(*at) < self.shared.cfg.request_timeout);
            while outstanding.len() < PIPELINE {
                let next = {
                    let mut inner = self.shared.lock();
                    if inner.assembly.size().is_none() {
                        // A corrupt attempt was thrown away: offer again for the next one.
                        let _ = inner.assembly.peer_offers(their_size);
                    }
                    inner.assembly.next_request(self.id, now.into_std())
                };
                let Some(piece) = next else { break };
                outstanding.insert(piece, now);
                let request = MetadataMessage::Request { piece }.encode();
                writer
                    .write(&Outgoing::Message(Message::Extended {
                        id,
                        payload: request.into(),
                    }))
                    .await?;
            }
            writer.flush().await?;
        }
    }

    /// Files a piece; true once the metadata is complete (by this piece or another peer's).
    fn piece_arrived(
        &self,
        piece: u32,
        total_size: u64,
        data: &[u8],
    ) -> Result<bool, FetchPeerError> {
        let mut inner = self.shared.lock();
        if inner.result.is_some() {
            return Ok(true);
        }
        let arrival = inner
            .assembly
            .piece_arrived(self.id, piece, total_size, data)?;
        self.shared.publish(&mut inner);
        match arrival {
            Arrival::Incomplete => Ok(false),
            Arrival::Complete(info_bytes) => {
                inner.result = Some(info_bytes);
                drop(inner);
                self.shared.finished.cancel();
                self.shared.wake.notify_one();
                Ok(true)
            }
            Arrival::Corrupt(contributors) => {
                log::warn!("metadata did not match the info-hash; asking other peers");
                inner.banned.extend(contributors);
                Err(FetchPeerError::Corrupt)
            }
        }
    }
}

async fn send(writer: &mut PeerWriter, m: Message) -> Result<(), PeerIoError> {
    writer.write(&Outgoing::Message(m)).await?;
    writer.flush().await
}
