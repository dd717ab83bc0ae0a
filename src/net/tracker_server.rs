//! The built-in tracker (`swarmfs tracker`): announce and scrape over hyper's HTTP/1 server, and
//! over UDP (BEP 15) on the same port number.
//!
//! It keeps the peers of any info-hash (no whitelist) in memory, answers compact peer lists (IPv4
//! in `peers`, IPv6 in `peers6`) without the asking peer itself, forgets peers that send
//! `stopped` or miss announces, and bounds everything a client can make it keep. Errors are
//! answered as a bencoded `failure reason` with HTTP 200, as trackers do, and as an error packet
//! over UDP. UDP connection ids are stateless (a keyed hash of the client's IP and the minute), so
//! UDP clients cost no memory between packets either.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::seq::IteratorRandom;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::core::tracker_proto::{
    encode_announce_response, encode_failure, encode_scrape_response, parse_announce_query,
    parse_scrape_query, AnnounceEvent, AnnounceQuery, AnnounceResponse, ScrapeResponse,
    ScrapeStats,
};
use crate::core::udp_tracker::{
    self, decode_request, request_transaction_id, server_connection_id, server_connection_id_valid,
    RequestKind, UdpTrackerError,
};

/// Most torrents tracked at once; announces for new ones are refused beyond it.
pub const MAX_TORRENTS: usize = 10_000;
/// Most peers kept per torrent.
pub const MAX_PEERS_PER_TORRENT: usize = 2_000;
/// Most peers kept over all torrents.
pub const MAX_PEERS_TOTAL: usize = 200_000;
/// Most peer entries (over all torrents) one address may hold, so that one client cannot fill
/// the tracker with fake torrents or peers and lock everyone else out.
pub const MAX_ENTRIES_PER_ADDRESS: usize = MAX_TORRENTS / 10;
/// Peers given when the client does not say `numwant`, and the most given in any case.
pub const DEFAULT_NUMWANT: usize = 50;
pub const MAX_NUMWANT: usize = 200;
/// Most torrents listed by a scrape without `info_hash`.
pub const MAX_SCRAPE_ALL: usize = 1_000;
/// Most HTTP connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 1_024;
/// Time a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one (keep-alive) connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Capacity of the announce observer channel (slow observers lose the oldest records).
const OBSERVER_CAPACITY: usize = 1_024;
/// Longest UDP request read; longer datagrams are ignored. A full scrape (74 hashes) is 1496 bytes,
/// an announce 98 plus a few BEP 41 options.
const MAX_UDP_REQUEST: usize = 2_048;
/// How often binding TCP and UDP to the same system-chosen port is tried.
const SAME_PORT_TRIES: usize = 16;

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Seconds between announces we ask clients for.
    pub interval: u32,
    /// A peer that has not announced for this long is forgotten (about 3 announce intervals).
    pub peer_expiry: Duration,
}

impl TrackerConfig {
    /// `interval` seconds between announces; peers expire after three missed announces.
    pub fn with_interval(interval: u32) -> Self {
        let interval = interval.max(1);
        TrackerConfig {
            interval,
            peer_expiry: Duration::from_secs(u64::from(interval) * 3),
        }
    }

    /// The `min interval` we send: clients may not announce more often than this.
    fn min_interval(&self) -> u32 {
        self.interval.clamp(1, 5)
    }
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self::with_interval(30)
    }
}

/// One announce as the tracker accepted it, for observers (tests, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSeen {
    pub info_hash: [u8; 20],
    /// The address other peers are given for this peer.
    pub peer: SocketAddr,
    pub event: Option<AnnounceEvent>,
    pub left: u64,
}

/// A running tracker. Dropping it also stops it (without waiting); `shutdown` waits.
pub struct TrackerServer {
    /// The address of both the HTTP listener (TCP) and the UDP socket.
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    udp_task: JoinHandle<()>,
}

impl TrackerServer {
    /// Binds `addr` over TCP (HTTP) and UDP (same port; with port 0 the one the system gives TCP)
    /// and spawns the serve tasks on the current runtime.
    pub async fn bind(addr: SocketAddr, cfg: TrackerConfig) -> std::io::Result<TrackerServer> {
        let (listener, udp) = bind_same_port(addr).await?;
        let local_addr = listener.local_addr()?;
        let cfg = TrackerConfig {
            interval: cfg.interval.max(1),
            ..cfg
        };
        let (observers, _) = broadcast::channel(OBSERVER_CAPACITY);
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::new(cfg.clone())),
            observers,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let udp_task = tokio::spawn(serve_udp(udp, shared.clone(), shutdown_rx.clone()));
        let task = tokio::spawn(serve(listener, shared.clone(), cfg, shutdown_rx));
        log::info!("tracker listening on http://{local_addr}/announce and udp://{local_addr}");
        Ok(TrackerServer {
            local_addr,
            shared,
            shutdown,
            task,
            udp_task,
        })
    }

    /// The HTTP announce URL of this tracker.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.local_addr)
    }

    /// The UDP announce URL of this tracker.
    pub fn udp_announce_url(&self) -> String {
        format!("udp://{}/announce", self.local_addr)
    }

    /// A channel of every announce the tracker accepts from now on.
    pub fn observe(&self) -> broadcast::Receiver<AnnounceSeen> {
        self.shared.observers.subscribe()
    }

    /// Swarm counts for one torrent (as a scrape would give them), if it is tracked.
    pub fn stats(&self, info_hash: &[u8; 20]) -> Option<ScrapeStats> {
        self.shared
            .registry()
            .scrape(&[*info_hash])
            .files
            .get(info_hash)
            .copied()
    }

    /// Stops accepting, closes open connections and waits for the serve tasks to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        let _ = self.udp_task.await;
    }
}

/// A TCP listener and a UDP socket on the same address and port.
async fn bind_same_port(addr: SocketAddr) -> std::io::Result<(TcpListener, UdpSocket)> {
    let tries = if addr.port() == 0 { SAME_PORT_TRIES } else { 1 };
    let mut last_error = None;
    for _ in 0..tries {
        let listener = TcpListener::bind(addr).await?;
        // The system chose a free TCP port; the same UDP port may be taken: then try another.
        match UdpSocket::bind(listener.local_addr()?).await {
            Ok(udp) => return Ok((listener, udp)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("cannot bind UDP")))
}

struct Shared {
    registry: Mutex<Registry>,
    observers: broadcast::Sender<AnnounceSeen>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one announce (HTTP or UDP) from `peer`, answering with peers of `family`, and
    /// tells the observers about it.
    fn announce(
        &self,
        query: &AnnounceQuery,
        peer: SocketAddr,
        family: PeerFamily,
    ) -> Result<AnnounceResponse, String> {
        let response = self.registry().announce(
            query,
            peer,
            family,
            Instant::now(),
            &mut rand::thread_rng(),
        )?;
        let _ = self.observers.send(AnnounceSeen {
            info_hash: query.peer.info_hash,
            peer,
            event: query.event,
            left: query.totals.left,
        });
        Ok(response)
    }
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    cfg: TrackerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let connection_slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let sweep_every = (cfg.peer_expiry / 4).max(Duration::from_millis(250));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = sweep.tick() => shared.registry().expire(Instant::now()),
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
                        log::debug!("tracker: too many connections, closing one from {remote}");
                        continue;
                    };
                    connections.spawn(serve_connection(stream, remote, shared.clone(), slot));
                }
                Err(e) => {
                    // E.g. out of file descriptors: pause instead of spinning.
                    log::warn!("tracker: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Dropping the JoinSet aborts the connections still open.
    connections.shutdown().await;
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
) {
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&request, remote, &shared)) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    // A connection that outlives CONNECTION_LIFETIME is simply dropped.
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
        log::debug!("tracker: connection from {remote}: {e}");
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn bencoded(body: Vec<u8>) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "text/plain", body)
}

fn handle(
    request: &Request<Incoming>,
    remote: SocketAddr,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"only GET\n".to_vec(),
        );
    }
    let query = request.uri().query().unwrap_or("");
    match request.uri().path() {
        "/announce" => {
            let announce = match parse_announce_query(query) {
                Ok(announce) => announce,
                Err(e) => return bencoded(encode_failure(&e.to_string())),
            };
            let peer = SocketAddr::new(
                peer_ip(remote.ip(), announce.ip.as_deref()),
                announce.peer.port,
            );
            match shared.announce(&announce, peer, PeerFamily::Any) {
                Ok(response) => bencoded(encode_announce_response(&response)),
                Err(reason) => bencoded(encode_failure(&reason)),
            }
        }
        "/scrape" => match parse_scrape_query(query) {
            Ok(hashes) => bencoded(encode_scrape_response(&shared.registry().scrape(&hashes))),
            Err(e) => bencoded(encode_failure(&e.to_string())),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}

/// Serves UDP requests until shutdown: one datagram in, at most one out, through one reused
/// buffer each way.
async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let key: [u8; 16] = rand::random();
    let epoch = Instant::now();
    // One byte more than the longest request, so a longer one is seen (and ignored), not cut.
    let mut packet = vec![0u8; MAX_UDP_REQUEST + 1];
    let mut answer = Vec::new();
    loop {
        let (len, remote) = tokio::select! {
            _ = shutdown.changed() => break,
            received = socket.recv_from(&mut packet) => match received {
                Ok(received) => received,
                Err(e) => {
                    log::debug!("tracker: UDP receive failed: {e}");
                    // Do not spin on a persistent error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if len > MAX_UDP_REQUEST {
            continue;
        }
        let minute = Instant::now().duration_since(epoch).as_secs() / 60;
        let ids = ConnectionIds { key: &key, minute };
        answer.clear();
        if handle_udp(&packet[..len], remote, &shared, ids, &mut answer) {
            if let Err(e) = socket.send_to(&answer, remote).await {
                log::debug!("tracker: UDP answer to {remote} failed: {e}");
            }
        }
    }
}

/// What UDP connection ids are checked against: the process's secret key and the current minute.
#[derive(Clone, Copy)]
struct ConnectionIds<'a> {
    key: &'a [u8; 16],
    minute: u64,
}

impl ConnectionIds<'_> {
    fn issue(&self, client: IpAddr) -> u64 {
        server_connection_id(self.key, client, self.minute)
    }

    fn accepts(&self, client: IpAddr, id: u64) -> bool {
        server_connection_id_valid(self.key, client, id, self.minute)
    }
}

/// Answers one UDP request into `answer`; false when the packet gets no answer: too short to carry
/// a transaction id, a connect without the protocol id, or a request without a valid connection
/// id (BEP 15: ignored, so a spoofed source address gets nothing).
fn handle_udp(
    packet: &[u8],
    remote: SocketAddr,
    shared: &Shared,
    ids: ConnectionIds<'_>,
    answer: &mut Vec<u8>,
) -> bool {
    let Some(transaction_id) = request_transaction_id(packet) else {
        return false;
    };
    let client = remote.ip();
    let request = match decode_request(packet) {
        Ok(request) => request,
        Err(UdpTrackerError::BadProtocolId(_)) => return false,
        Err(e) => {
            let connection_id = packet
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if !ids.accepts(client, connection_id) {
                return false;
            }
            udp_tracker::encode_error(transaction_id, &e.to_string(), answer);
            return true;
        }
    };
    if request.kind != RequestKind::Connect && !ids.accepts(client, request.connection_id) {
        return false;
    }
    match request.kind {
        RequestKind::Connect => {
            udp_tracker::encode_connect_response(transaction_id, ids.issue(client), answer);
        }
        RequestKind::Announce { query, key: _ } => {
            if query.peer.port == 0 {
                udp_tracker::encode_error(transaction_id, "invalid request: port 0", answer);
                return true;
            }
            let ipv6 = client.to_canonical().is_ipv6();
            let family = if ipv6 { PeerFamily::V6 } else { PeerFamily::V4 };
            let peer = SocketAddr::new(peer_ip(client, query.ip.as_deref()), query.peer.port);
            match shared.announce(&query, peer, family) {
                Ok(response) => {
                    udp_tracker::encode_announce_response(transaction_id, &response, ipv6, answer);
                }
                Err(reason) => udp_tracker::encode_error(transaction_id, &reason, answer),
            }
        }
        RequestKind::Scrape(hashes) => {
            // Positional counts: a torrent we do not track counts zeros.
            let mut stats = Vec::with_capacity(hashes.len());
            if !hashes.is_empty() {
                let files = shared.registry().scrape(&hashes).files;
                stats.extend(
                    hashes
                        .iter()
                        .map(|h| files.get(h).copied().unwrap_or_default()),
                );
            }
            udp_tracker::encode_scrape_response(transaction_id, &stats, answer);
        }
    }
    true
}

/// Which peers an announce answer may list: a UDP answer holds only one address family (the one
/// the client asked over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerFamily {
    Any,
    V4,
    V6,
}

impl PeerFamily {
    fn admits(self, peer: &SocketAddr) -> bool {
        match self {
            PeerFamily::Any => true,
            PeerFamily::V4 => peer.is_ipv4(),
            PeerFamily::V6 => peer.is_ipv6(),
        }
    }
}

/// The address other peers should use: the TCP source address, unless both it and the announced
/// `ip` are loopback (a local peer may prefer 127.0.0.1 over ::1 or another loopback address).
/// Announced addresses are never trusted otherwise: they would let anyone point a swarm at a
/// victim.
fn peer_ip(source: IpAddr, announced: Option<&str>) -> IpAddr {
    let source = source.to_canonical();
    match announced.and_then(|text| text.trim().parse::<IpAddr>().ok()) {
        Some(ip) if ip.is_loopback() && source.is_loopback() => ip.to_canonical(),
        _ => source,
    }
}

struct PeerEntry {
    left: u64,
    last_seen: Instant,
}

#[derive(Default)]
struct Swarm {
    peers: HashMap<SocketAddr, PeerEntry>,
    /// `completed` events seen.
    downloaded: u32,
}

impl Swarm {
    fn stats(&self) -> ScrapeStats {
        let seeders = self.peers.values().filter(|p| p.left == 0).count();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ScrapeStats {
            complete: count(seeders),
            downloaded: self.downloaded,
            incomplete: count(self.peers.len() - seeders),
        }
    }
}

/// All swarms the tracker knows. Time is passed in, so it is tested without waiting.
struct Registry {
    swarms: HashMap<[u8; 20], Swarm>,
    total_peers: usize,
    /// Peer entries by address (IP), for `MAX_ENTRIES_PER_ADDRESS`.
    per_address: HashMap<IpAddr, usize>,
    cfg: TrackerConfig,
}

/// Counts one entry of `addr` fewer.
fn forget(per_address: &mut HashMap<IpAddr, usize>, addr: &SocketAddr) {
    if let Some(n) = per_address.get_mut(&addr.ip()) {
        *n -= 1;
        if *n == 0 {
            per_address.remove(&addr.ip());
        }
    }
}

/// Drops the entries of `swarm` not seen within `expiry`; returns how many.
fn expire_swarm(
    swarm: &mut Swarm,
    per_address: &mut HashMap<IpAddr, usize>,
    now: Instant,
    expiry: Duration,
) -> usize {
    let before = swarm.peers.len();
    swarm.peers.retain(|addr, entry| {
        let live = now.saturating_duration_since(entry.last_seen) < expiry;
        if !live {
            forget(per_address, addr);
        }
        live
    });
    before - swarm.peers.len()
}

impl Registry {
    fn new(cfg: TrackerConfig) -> Self {
        Registry {
            swarms: HashMap::new(),
            total_peers: 0,
            per_address: HashMap::new(),
            cfg,
        }
    }

    /// Records the announce of `peer` and answers it, or returns a failure reason.
    fn announce(
        &mut self,
        query: &AnnounceQuery,
        peer: SocketAddr,
        family: PeerFamily,
        now: Instant,
        rng: &mut impl rand::Rng,
    ) -> Result<AnnounceResponse, String> {
        let expiry = self.cfg.peer_expiry;
        if let Some(swarm) = self.swarms.get_mut(&query.peer.info_hash) {
            self.total_peers -= expire_swarm(swarm, &mut self.per_address, now, expiry);
        }
        if query.event == Some(AnnounceEvent::Stopped) {
            let mut stats = ScrapeStats::default();
            if let Some(swarm) = self.swarms.get_mut(&query.peer.info_hash) {
                if swarm.peers.remove(&peer).is_some() {
                    self.total_peers -= 1;
                    forget(&mut self.per_address, &peer);
                }
                stats = swarm.stats();
                if swarm.peers.is_empty() {
                    self.swarms.remove(&query.peer.info_hash);
                }
            }
            return Ok(self.response(Vec::new(), stats));
        }
        if !self.swarms.contains_key(&query.peer.info_hash) && self.swarms.len() >= MAX_TORRENTS {
            return Err("tracker is full: too many torrents".into());
        }
        let total_full = self.total_peers >= MAX_PEERS_TOTAL;
        let address_entries = self.per_address.get(&peer.ip()).copied().unwrap_or(0);
        let swarm = self.swarms.entry(query.peer.info_hash).or_default();
        if !swarm.peers.contains_key(&peer) {
            let refusal = if address_entries >= MAX_ENTRIES_PER_ADDRESS {
                Some("too many announces from your address")
            } else if swarm.peers.len() >= MAX_PEERS_PER_TORRENT || total_full {
                Some("tracker is full: too many peers")
            } else {
                None
            };
            if let Some(reason) = refusal {
                if swarm.peers.is_empty() {
                    self.swarms.remove(&query.peer.info_hash);
                }
                return Err(reason.into());
            }
            self.total_peers += 1;
            *self.per_address.entry(peer.ip()).or_insert(0) += 1;
        }
        swarm.peers.insert(
            peer,
            PeerEntry {
                left: query.totals.left,
                last_seen: now,
            },
        );
        if query.event == Some(AnnounceEvent::Completed) {
            swarm.downloaded = swarm.downloaded.saturating_add(1);
        }
        let numwant = query
            .numwant
            .map_or(DEFAULT_NUMWANT, |n| {
                usize::try_from(n).unwrap_or(MAX_NUMWANT)
            })
            .min(MAX_NUMWANT);
        let peers = swarm
            .peers
            .keys()
            .filter(|&&other| other != peer && family.admits(&other))
            .copied()
            .choose_multiple(rng, numwant);
        let stats = swarm.stats();
        Ok(self.response(peers, stats))
    }

    fn response(&self, peers: Vec<SocketAddr>, stats: ScrapeStats) -> AnnounceResponse {
        AnnounceResponse {
            interval: self.cfg.interval,
            min_interval: Some(self.cfg.min_interval()),
            peers,
            complete: Some(stats.complete),
            incomplete: Some(stats.incomplete),
            warning: None,
        }
    }

    /// Counts for `hashes` (unknown ones are left out), or for every torrent (up to
    /// `MAX_SCRAPE_ALL`) when `hashes` is empty.
    fn scrape(&self, hashes: &[[u8; 20]]) -> ScrapeResponse {
        let mut response = ScrapeResponse::default();
        if hashes.is_empty() {
            for (info_hash, swarm) in self.swarms.iter().take(MAX_SCRAPE_ALL) {
                response.files.insert(*info_hash, swarm.stats());
            }
        }
        for info_hash in hashes {
            if let Some(swarm) = self.swarms.get(info_hash) {
                response.files.insert(*info_hash, swarm.stats());
            }
        }
        response
    }

    /// Forgets peers that have not announced within the expiry time, and empty swarms.
    fn expire(&mut self, now: Instant) {
        let expiry = self.cfg.peer_expiry;
        let mut removed = 0;
        let per_address = &mut self.per_address;
        self.swarms.retain(|_, swarm| {
            removed += expire_swarm(swarm, per_address, now, expiry);
            !swarm.peers.is_empty()
        });
        self.total_peers -= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tracker_proto::{SwarmPeer, TransferTotals};

    fn query(info_hash: u8, port: u16, left: u64, event: Option<AnnounceEvent>) -> AnnounceQuery {
        AnnounceQuery {
            peer: SwarmPeer {
                info_hash: [info_hash; 20],
                peer_id: [port as u8; 20],
                port,
            },
            totals: TransferTotals {
                left,
                ..TransferTotals::default()
            },
            event,
            numwant: None,
            compact: true,
            ip: None,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn registry(expiry_secs: u64) -> Registry {
        Registry::new(TrackerConfig {
            interval: 10,
            peer_expiry: Duration::from_secs(expiry_secs),
        })
    }

    #[test]
    fn peers_see_each_other_but_not_themselves() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        let first = reg
            .announce(
                &query(1, 1000, 5, Some(AnnounceEvent::Started)),
                addr(1000),
                PeerFamily::Any,
                now,
                &mut rng,
            )
            .unwrap();
        assert!(first.peers.is_empty());
        assert_eq!((first.complete, first.incomplete), (Some(0), Some(1)));
        let second = reg
            .announce(
                &query(1, 2000, 0, Some(AnnounceEvent::Started)),
                addr(2000),
                PeerFamily::Any,
                now,
                &mut rng,
            )
            .unwrap();
        assert_eq!(second.peers, vec![addr(1000)]);
        assert_eq!((second.complete, second.incomplete), (Some(1), Some(1)));
        assert_eq!(second.interval, 10);
        assert_eq!(second.min_interval, Some(5));
        // Another torrent is a separate swarm.
        let other = reg
            .announce(
                &query(2, 3000, 5, None),
                addr(3000),
                PeerFamily::Any,
                now,
                &mut rng,
            )
            .unwrap();
        assert!(other.peers.is_empty());
        assert_eq!(reg.total_peers, 3);
    }

    #[test]
    fn stopped_removes_and_completed_counts() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        reg.announce(
            &query(1, 1000, 5, None),
            addr(1000),
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .unwrap();
        reg.announce(
            &query(1, 2000, 5, None),
            addr(2000),
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .unwrap();
        reg.announce(
            &query(1, 1000, 0, Some(AnnounceEvent::Completed)),
            addr(1000),
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .unwrap();
        let stats = reg.scrape(&[[1; 20]]).files[&[1; 20]];
        assert_eq!(
            stats,
            ScrapeStats {
                complete: 1,
                downloaded: 1,
                incomplete: 1
            }
        );
        reg.announce(
            &query(1, 1000, 0, Some(AnnounceEvent::Stopped)),
            addr(1000),
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .unwrap();
        let answer = reg
            .announce(
                &query(1, 2000, 5, None),
                addr(2000),
                PeerFamily::Any,
                now,
                &mut rng,
            )
            .unwrap();
        assert!(answer.peers.is_empty());
        reg.announce(
            &query(1, 2000, 5, Some(AnnounceEvent::Stopped)),
            addr(2000),
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .unwrap();
        assert!(reg.swarms.is_empty());
        assert_eq!(reg.total_peers, 0);
    }

    #[test]
    fn silent_peers_expire() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let start = Instant::now();
        reg.announce(
            &query(1, 1000, 5, None),
            addr(1000),
            PeerFamily::Any,
            start,
            &mut rng,
        )
        .unwrap();
        let later = start + Duration::from_secs(20);
        reg.announce(
            &query(1, 2000, 5, None),
            addr(2000),
            PeerFamily::Any,
            later,
            &mut rng,
        )
        .unwrap();
        reg.expire(start + Duration::from_secs(29));
        assert_eq!(reg.total_peers, 2);
        // Peer 1000 is lazily expired by an announce once it has been silent for 30 s.
        let answer = reg
            .announce(
                &query(1, 2000, 5, None),
                addr(2000),
                PeerFamily::Any,
                start + Duration::from_secs(31),
                &mut rng,
            )
            .unwrap();
        assert!(answer.peers.is_empty());
        assert_eq!(reg.total_peers, 1);
        reg.expire(start + Duration::from_secs(61));
        assert!(reg.swarms.is_empty());
        assert_eq!(reg.total_peers, 0);
    }

    /// One client announcing fake torrents used to fill the tracker (10,000 in 1.5 s), after
    /// which every new torrent was refused. Now one address holds at most its budget.
    #[test]
    fn one_address_cannot_fill_the_tracker() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        let mut refused = 0;
        for i in 0..MAX_TORRENTS as u32 + 10 {
            let mut q = query(0, 7000, 5, None);
            q.peer.info_hash[..4].copy_from_slice(&i.to_be_bytes());
            match reg.announce(&q, addr(7000), PeerFamily::Any, now, &mut rng) {
                Ok(_) => {}
                Err(reason) => {
                    assert!(reason.contains("your address"), "{reason}");
                    refused += 1;
                }
            }
        }
        assert_eq!(reg.swarms.len(), MAX_ENTRIES_PER_ADDRESS);
        assert_eq!(refused, MAX_TORRENTS + 10 - MAX_ENTRIES_PER_ADDRESS);
        let other = SocketAddr::from(([127, 0, 0, 2], 7000));
        reg.announce(
            &query(200, 7000, 5, None),
            other,
            PeerFamily::Any,
            now,
            &mut rng,
        )
        .expect("another address is served");
        // Leaving (or expiring) gives the budget back.
        let mut leaving = query(0, 7000, 5, Some(AnnounceEvent::Stopped));
        leaving.peer.info_hash[..4].copy_from_slice(&0u32.to_be_bytes());
        reg.announce(&leaving, addr(7000), PeerFamily::Any, now, &mut rng)
            .unwrap();
        let mut q = query(0, 7000, 5, None);
        q.peer.info_hash[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        reg.announce(&q, addr(7000), PeerFamily::Any, now, &mut rng)
            .expect("room again after a stop");
        reg.expire(now + Duration::from_secs(31));
        assert!(reg.per_address.is_empty() && reg.swarms.is_empty());
    }

    #[test]
    fn numwant_and_swarm_size_are_bounded() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        for port in 1..=(MAX_PEERS_PER_TORRENT as u16) {
            // Each from an address of its own: one address may hold only so many entries.
            let from = SocketAddr::from(([10, 0, (port >> 8) as u8, port as u8], port));
            reg.announce(
                &query(1, port, 5, None),
                from,
                PeerFamily::Any,
                now,
                &mut rng,
            )
            .unwrap();
        }
        let full = reg.announce(
            &query(1, 60000, 5, None),
            addr(60000),
            PeerFamily::Any,
            now,
            &mut rng,
        );
        assert!(full.unwrap_err().contains("full"));
        let mut asks_many = query(1, 1, 5, None);
        asks_many.numwant = Some(u32::MAX);
        let first = SocketAddr::from(([10, 0, 0, 1], 1));
        let answer = reg
            .announce(&asks_many, first, PeerFamily::Any, now, &mut rng)
            .unwrap();
        assert_eq!(answer.peers.len(), MAX_NUMWANT);
        assert!(!answer.peers.contains(&first));
        asks_many.numwant = Some(3);
        assert_eq!(
            reg.announce(&asks_many, first, PeerFamily::Any, now, &mut rng)
                .unwrap()
                .peers
                .len(),
            3
        );
    }

    #[test]
    fn udp_requests_need_a_connection_id_and_get_one_family() {
        use crate::core::tracker_proto::AnnounceRequest;
        use crate::core::udp_tracker::*;
        let shared = Shared {
            registry: Mutex::new(registry(30)),
            observers: broadcast::channel(16).0,
        };
        let key = [5u8; 16];
        let ids = ConnectionIds {
            key: &key,
            minute: 3,
        };
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let v6: SocketAddr = "[::1]:40000".parse().unwrap();
        let ask = |packet: &[u8], from: SocketAddr, ids: ConnectionIds<'_>| {
            let mut answer = Vec::new();
            handle_udp(packet, from, &shared, ids, &mut answer).then_some(answer)
        };
        let connected = ask(&encode_connect_request(1), v4, ids).unwrap();
        let id4 = decode_connect_response(&connected, 1).unwrap();
        let connected = ask(&encode_connect_request(2), v6, ids).unwrap();
        let id6 = decode_connect_response(&connected, 2).unwrap();
        assert_ne!(id4, id6);

        let announce = |port: u16| AnnounceRequest {
            peer: SwarmPeer {
                info_hash: [1; 20],
                peer_id: [port as u8; 20],
                port,
            },
            totals: TransferTotals::default(),
            event: Some(AnnounceEvent::Started),
            numwant: 50,
        };
        // Without a valid connection id (or from another address) nothing is answered.
        assert!(ask(&encode_announce_request(7, 3, &announce(1000), 0), v4, ids).is_none());
        assert!(ask(
            &encode_announce_request(id6, 3, &announce(1000), 0),
            v4,
            ids
        )
        .is_none());
        assert!(ask(&encode_connect_request(1)[..15], v4, ids).is_none());
        let mut no_magic = encode_connect_request(1);
        no_magic[0] = 1;
        assert!(ask(&no_magic, v4, ids).is_none());

        let first = ask(
            &encode_announce_request(id4, 3, &announce(1000), 0),
            v4,
            ids,
        )
        .unwrap();
        assert!(decode_announce_response(&first, 3, false)
            .unwrap()
            .peers
            .is_empty());
        // The id stays good in the next minute, not the one after.
        let next_minute = ConnectionIds { minute: 4, ..ids };
        let v6_answer = ask(
            &encode_announce_request(id6, 4, &announce(2000), 0),
            v6,
            next_minute,
        )
        .unwrap();
        // The IPv6 client is not given the IPv4 peer it cannot be told about.
        let v6_answer = decode_announce_response(&v6_answer, 4, true).unwrap();
        assert!(v6_answer.peers.is_empty());
        assert_eq!(v6_answer.complete, Some(2));
        let later = ConnectionIds { minute: 5, ..ids };
        assert!(ask(
            &encode_announce_request(id4, 5, &announce(1000), 0),
            v4,
            later
        )
        .is_none());
        let again = ask(
            &encode_announce_request(id4, 5, &announce(3000), 0),
            v4,
            ids,
        )
        .unwrap();
        assert_eq!(
            decode_announce_response(&again, 5, false).unwrap().peers,
            vec![addr(1000)]
        );

        let scrape = ask(
            &encode_scrape_request(id4, 6, &[[1; 20], [2; 20]]).unwrap(),
            v4,
            ids,
        );
        let stats = decode_scrape_response(&scrape.unwrap(), 6, &[[1; 20], [2; 20]]).unwrap();
        assert_eq!(stats.files[&[1; 20]].complete, 3);
        assert_eq!(stats.files[&[2; 20]], ScrapeStats::default());

        // A malformed request with a valid id gets an error packet.
        let short = &encode_announce_request(id4, 8, &announce(1000), 0)[..50];
        let error = ask(short, v4, ids).unwrap();
        assert!(matches!(
            decode_announce_response(&error, 8, false),
            Err(UdpTrackerError::Tracker(m)) if m.contains("shorter")
        ));
        let zero_port = ask(&encode_announce_request(id4, 9, &announce(0), 0), v4, ids).unwrap();
        assert!(decode_announce_response(&zero_port, 9, false).is_err());
    }

    #[test]
    fn announced_ip_is_used_only_between_loopback_addresses() {
        let v6_loopback: IpAddr = "::1".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            peer_ip(v6_loopback, Some("127.0.0.1")),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(peer_ip(lan, Some("127.0.0.1")), lan);
        assert_eq!(peer_ip(v6_loopback, Some("10.0.0.1")), v6_loopback);
        assert_eq!(peer_ip(v6_loopback, Some("garbage")), v6_loopback);
        assert_eq!(
            peer_ip(mapped, None),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
