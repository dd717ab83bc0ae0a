//! The built-in HTTP tracker (`swarmfs tracker`): announce and scrape over hyper's HTTP/1 server.
//!
//! It keeps the peers of any info-hash (no whitelist) in memory, answers compact peer lists (IPv4
//! in `peers`, IPv6 in `peers6`) without the asking peer itself, forgets peers that send
//! `stopped` or miss announces, and bounds everything a client can make it keep. Errors are
//! answered as a bencoded `failure reason` with HTTP 200, as trackers do.

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::core::tracker_proto::{
    encode_announce_response, encode_failure, encode_scrape_response, parse_announce_query,
    parse_scrape_query, AnnounceEvent, AnnounceQuery, AnnounceResponse, ScrapeResponse,
    ScrapeStats,
};

/// Most torrents tracked at once; announces for new ones are refused beyond it.
pub const MAX_TORRENTS: usize = 10_000;
/// Most peers kept per torrent.
pub const MAX_PEERS_PER_TORRENT: usize = 2_000;
/// Most peers kept over all torrents.
pub const MAX_PEERS_TOTAL: usize = 200_000;
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
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TrackerServer {
    /// Binds `addr` and spawns the serve task on the current runtime.
    pub async fn bind(addr: SocketAddr, cfg: TrackerConfig) -> std::io::Result<TrackerServer> {
        let listener = TcpListener::bind(addr).await?;
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
        let task = tokio::spawn(serve(listener, shared.clone(), cfg, shutdown_rx));
        log::info!("tracker listening on http://{local_addr}/announce");
        Ok(TrackerServer {
            local_addr,
            shared,
            shutdown,
            task,
        })
    }

    /// The announce URL of this tracker.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.local_addr)
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

    /// Stops accepting, closes open connections and waits for the serve task to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
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
            let result = shared.registry().announce(
                &announce,
                peer,
                Instant::now(),
                &mut rand::thread_rng(),
            );
            match result {
                Ok(response) => {
                    let _ = shared.observers.send(AnnounceSeen {
                        info_hash: announce.peer.info_hash,
                        peer,
                        event: announce.event,
                        left: announce.totals.left,
                    });
                    bencoded(encode_announce_response(&response))
                }
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
    cfg: TrackerConfig,
}

impl Registry {
    fn new(cfg: TrackerConfig) -> Self {
        Registry {
            swarms: HashMap::new(),
            total_peers: 0,
            cfg,
        }
    }

    /// Records the announce of `peer` and answers it, or returns a failure reason.
    fn announce(
        &mut self,
        query: &AnnounceQuery,
        peer: SocketAddr,
        now: Instant,
        rng: &mut impl rand::Rng,
    ) -> Result<AnnounceResponse, String> {
        let expiry = self.cfg.peer_expiry;
        if let Some(swarm) = self.swarms.get_mut(&query.peer.info_hash) {
            let before = swarm.peers.len();
            swarm
                .peers
                .retain(|_, entry| now.saturating_duration_since(entry.last_seen) < expiry);
            self.total_peers -= before - swarm.peers.len();
        }
        if query.event == Some(AnnounceEvent::Stopped) {
            let mut stats = ScrapeStats::default();
            if let Some(swarm) = self.swarms.get_mut(&query.peer.info_hash) {
                if swarm.peers.remove(&peer).is_some() {
                    self.total_peers -= 1;
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
        let swarm = self.swarms.entry(query.peer.info_hash).or_default();
        if !swarm.peers.contains_key(&peer) {
            if swarm.peers.len() >= MAX_PEERS_PER_TORRENT || total_full {
                if swarm.peers.is_empty() {
                    self.swarms.remove(&query.peer.info_hash);
                }
                return Err("tracker is full: too many peers".into());
            }
            self.total_peers += 1;
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
            .filter(|&&other| other != peer)
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
        self.swarms.retain(|_, swarm| {
            let before = swarm.peers.len();
            swarm
                .peers
                .retain(|_, entry| now.saturating_duration_since(entry.last_seen) < expiry);
            removed += before - swarm.peers.len();
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
            .announce(&query(2, 3000, 5, None), addr(3000), now, &mut rng)
            .unwrap();
        assert!(other.peers.is_empty());
        assert_eq!(reg.total_peers, 3);
    }

    #[test]
    fn stopped_removes_and_completed_counts() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        reg.announce(&query(1, 1000, 5, None), addr(1000), now, &mut rng)
            .unwrap();
        reg.announce(&query(1, 2000, 5, None), addr(2000), now, &mut rng)
            .unwrap();
        reg.announce(
            &query(1, 1000, 0, Some(AnnounceEvent::Completed)),
            addr(1000),
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
            now,
            &mut rng,
        )
        .unwrap();
        let answer = reg
            .announce(&query(1, 2000, 5, None), addr(2000), now, &mut rng)
            .unwrap();
        assert!(answer.peers.is_empty());
        reg.announce(
            &query(1, 2000, 5, Some(AnnounceEvent::Stopped)),
            addr(2000),
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
        reg.announce(&query(1, 1000, 5, None), addr(1000), start, &mut rng)
            .unwrap();
        let later = start + Duration::from_secs(20);
        reg.announce(&query(1, 2000, 5, None), addr(2000), later, &mut rng)
            .unwrap();
        reg.expire(start + Duration::from_secs(29));
        assert_eq!(reg.total_peers, 2);
        // Peer 1000 is lazily expired by an announce once it has been silent for 30 s.
        let answer = reg
            .announce(
                &query(1, 2000, 5, None),
                addr(2000),
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

    #[test]
    fn numwant_and_swarm_size_are_bounded() {
        let mut reg = registry(30);
        let mut rng = rand::thread_rng();
        let now = Instant::now();
        for port in 1..=(MAX_PEERS_PER_TORRENT as u16) {
            reg.announce(&query(1, port, 5, None), addr(port), now, &mut rng)
                .unwrap();
        }
        let full = reg.announce(&query(1, 60000, 5, None), addr(60000), now, &mut rng);
        assert!(full.unwrap_err().contains("full"));
        let mut asks_many = query(1, 1, 5, None);
        asks_many.numwant = Some(u32::MAX);
        let answer = reg.announce(&asks_many, addr(1), now, &mut rng).unwrap();
        assert_eq!(answer.peers.len(), MAX_NUMWANT);
        assert!(!answer.peers.contains(&addr(1)));
        asks_many.numwant = Some(3);
        assert_eq!(
            reg.announce(&asks_many, addr(1), now, &mut rng)
                .unwrap()
                .peers
                .len(),
            3
        );
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
