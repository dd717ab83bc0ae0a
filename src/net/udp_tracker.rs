//! UDP tracker client (BEP 15) over the `core::udp_tracker` codec: resolve the tracker, connect
//! (the connection id is cached for its minute and shared by clones), then announce or scrape,
//! retransmitting on the `base * 2^n` schedule.
//!
//! Each exchange uses its own connected UDP socket, so an ICMP "port unreachable" comes back as
//! an error on that socket and ends the exchange at once instead of waiting out the schedule.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::core::tracker_proto::{AnnounceRequest, AnnounceResponse, ScrapeResponse, TrackerError};
use crate::core::udp_tracker::{
    decode_announce_response, decode_connect_response, decode_scrape_response,
    encode_announce_request, encode_connect_request, encode_scrape_request, retry_timeout,
    ConnectionId, UdpTrackerError, MAX_DATAGRAM, MAX_SCRAPE_HASHES, SPEC_ATTEMPTS, SPEC_RETRY_BASE,
};

/// Most trackers whose connection ids we remember at once.
const MAX_CACHED_CONNECTIONS: usize = 1024;
/// Most addresses of one tracker host tried (each only while the previous ones refuse at once).
const MAX_ADDRESSES: usize = 4;

/// The retransmission schedule. `Default` is the spec's: 15 s, doubling, 9 sends (about 2 hours
/// in all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSchedule {
    /// Wait for the first answer; each further wait doubles.
    pub retry_base: Duration,
    /// Sends (connects and requests together) before the exchange fails with `Timeout`.
    pub attempts: u32,
}

impl Default for UdpSchedule {
    fn default() -> Self {
        UdpSchedule {
            retry_base: SPEC_RETRY_BASE,
            attempts: SPEC_ATTEMPTS,
        }
    }
}

/// A UDP tracker client. Cheap to clone; clones share the connection-id cache.
#[derive(Clone, Debug)]
pub struct UdpTrackerClient {
    schedule: UdpSchedule,
    connections: Arc<Mutex<HashMap<SocketAddr, ConnectionId>>>,
    /// Sent in every announce so a tracker can tell us apart from others behind the same address.
    key: u32,
    /// Where requests leave from, when set and of the tracker's family.
    local_ip: Option<IpAddr>,
}

impl Default for UdpTrackerClient {
    fn default() -> Self {
        Self::new(UdpSchedule::default())
    }
}

impl UdpTrackerClient {
    pub fn new(schedule: UdpSchedule) -> Self {
        UdpTrackerClient {
            schedule,
            connections: Arc::default(),
            key: rand::random(),
            local_ip: None,
        }
    }

    /// Requests to trackers of `ip`'s family leave from `ip`.
    pub fn with_local_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.local_ip = ip;
        self
    }

    /// Announces `req` to `tracker` (a `udp://host:port[/...]` URL).
    pub async fn announce(
        &self,
        tracker: &str,
        req: &AnnounceRequest,
    ) -> Result<AnnounceResponse, TrackerError> {
        let mut last_error = None;
        for addr in resolve(tracker).await? {
            let ipv6 = addr.is_ipv6();
            let result = self
                .exchange(
                    addr,
                    |connection_id, transaction_id| {
                        Ok(encode_announce_request(
                            connection_id,
                            transaction_id,
                            req,
                            self.key,
                        ))
                    },
                    |packet, transaction_id| decode_announce_response(packet, transaction_id, ipv6),
                )
                .await;
            match result {
                // Refused or unreachable at once: the host's next address may work.
                Err(e @ TrackerError::Network(_)) => last_error = Some(e),
                other => return other,
            }
        }
        Err(last_error.unwrap_or_else(|| TrackerError::Network("no address".into())))
    }

    /// Scrapes `tracker` for `info_hashes`, in requests of at most
    /// `core::udp_tracker::MAX_SCRAPE_HASHES` (BEP 15 has no full scrape: an empty list asks
    /// about nothing).
    pub async fn scrape(
        &self,
        tracker: &str,
        info_hashes: &[[u8; 20]],
    ) -> Result<ScrapeResponse, TrackerError> {
        let mut last_error = None;
        for addr in resolve(tracker).await? {
            match self.scrape_at(addr, info_hashes).await {
                Err(e @ TrackerError::Network(_)) => last_error = Some(e),
                other => return other,
            }
        }
        Err(last_error.unwrap_or_else(|| TrackerError::Network("no address".into())))
    }

    async fn scrape_at(
        &self,
        addr: SocketAddr,
        info_hashes: &[[u8; 20]],
    ) -> Result<ScrapeResponse, TrackerError> {
        let mut response = ScrapeResponse::default();
        let mut chunks: Vec<&[[u8; 20]]> = info_hashes.chunks(MAX_SCRAPE_HASHES).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let part = self
                .exchange(
                    addr,
                    |connection_id, transaction_id| {
                        encode_scrape_request(connection_id, transaction_id, chunk)
                    },
                    |packet, transaction_id| decode_scrape_response(packet, transaction_id, chunk),
                )
                .await?;
            response.files.extend(part.files);
        }
        Ok(response)
    }

    /// Connects if no connection id is cached, sends the request, and waits for its answer,
    /// retransmitting on the schedule. The attempt count runs on across reconnects (BEP 15's
    /// "announce times out" example).
    async fn exchange<T>(
        &self,
        tracker: SocketAddr,
        request: impl Fn(u64, u32) -> Result<Vec<u8>, UdpTrackerError>,
        answer: impl Fn(&[u8], u32) -> Result<T, UdpTrackerError>,
    ) -> Result<T, TrackerError> {
        let local = match (tracker, self.local_ip) {
            (SocketAddr::V4(_), Some(ip @ IpAddr::V4(_))) => ip,
            (SocketAddr::V6(_), Some(ip @ IpAddr::V6(_))) => ip,
            (SocketAddr::V4(_), _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (SocketAddr::V6(_), _) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let socket = UdpSocket::bind((local, 0)).await.map_err(network)?;
        socket.connect(tracker).await.map_err(network)?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut attempt = 0;
        // The connection id was obtained during this exchange (not taken from the cache).
        let mut fresh = false;
        while attempt < self.schedule.attempts {
            let wait = retry_timeout(self.schedule.retry_base, attempt);
            let connection_id = match self.cached(tracker) {
                Some(id) => id,
                None => {
                    let transaction_id = rand::random();
                    send(&socket, &encode_connect_request(transaction_id)).await?;
                    let answer = |packet: &[u8]| decode_connect_response(packet, transaction_id);
                    match receive(&socket, &mut buf, wait, answer).await? {
                        Some(id) => {
                            self.remember(tracker, id);
                            fresh = true;
                            id
                        }
                        None => {
                            attempt += 1;
                            continue;
                        }
                    }
                }
            };
            let transaction_id = rand::random();
            send(&socket, &request(connection_id, transaction_id)?).await?;
            let reply = |packet: &[u8]| answer(packet, transaction_id);
            match receive(&socket, &mut buf, wait, reply).await? {
                Some(value) => return Ok(value),
                None => {
                    attempt += 1;
                    // A cached id may be one the tracker no longer accepts (or one it tied to
                    // another of our ports): get a new one rather than resend it.
                    if !fresh {
                        self.forget(tracker);
                    }
                }
            }
        }
        Err(TrackerError::Timeout)
    }

    fn cached(&self, tracker: SocketAddr) -> Option<u64> {
        let now = Instant::now().into_std();
        let cache = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&tracker)
            .filter(|c| c.is_valid(now))
            .map(|c| c.id)
    }

    fn remember(&self, tracker: SocketAddr, id: u64) {
        let now = Instant::now().into_std();
        let mut cache = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_CONNECTIONS {
            cache.retain(|_, c| c.is_valid(now));
            if cache.len() >= MAX_CACHED_CONNECTIONS {
                cache.clear();
            }
        }
        cache.insert(tracker, ConnectionId { id, received: now });
    }

    fn forget(&self, tracker: SocketAddr) {
        let mut cache = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(&tracker);
    }
}

fn network(e: std::io::Error) -> TrackerError {
    TrackerError::Network(e.to_string())
}

async fn send(socket: &UdpSocket, packet: &[u8]) -> Result<(), TrackerError> {
    socket.send(packet).await.map_err(network)?;
    Ok(())
}

/// Waits up to `wait` for the answer `parse` accepts. Packets of other transactions (late answers
/// to earlier sends, strays) are skipped; an error packet or a malformed answer ends the wait with
/// that error, and so does a socket error such as ICMP "connection refused". `None` on timeout.
async fn receive<T>(
    socket: &UdpSocket,
    buf: &mut [u8],
    wait: Duration,
    parse: impl Fn(&[u8]) -> Result<T, UdpTrackerError>,
) -> Result<Option<T>, TrackerError> {
    let deadline = Instant::now() + wait;
    loop {
        let len = match tokio::time::timeout_at(deadline, socket.recv(buf)).await {
            Err(_elapsed) => return Ok(None),
            Ok(result) => result.map_err(network)?,
        };
        match parse(&buf[..len]) {
            Ok(value) => return Ok(Some(value)),
            Err(UdpTrackerError::WrongTransaction { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The tracker's addresses from a `udp://host:port` URL: the literal IP, or up to `MAX_ADDRESSES`
/// of a host name's, in resolver order.
async fn resolve(tracker: &str) -> Result<Vec<SocketAddr>, TrackerError> {
    let invalid = |why: &str| TrackerError::InvalidUrl(format!("{tracker}: {why}"));
    let url = url::Url::parse(tracker).map_err(|e| invalid(&e.to_string()))?;
    if url.scheme() != "udp" {
        return Err(TrackerError::UnsupportedScheme(url.scheme().to_string()));
    }
    let port = url.port().ok_or_else(|| invalid("no port"))?;
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => return Ok(vec![SocketAddr::from((ip, port))]),
        Some(url::Host::Ipv6(ip)) => return Ok(vec![SocketAddr::from((ip, port))]),
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_string(),
        _ => return Err(invalid("no host")),
    };
    // Non-special URL schemes keep IP literals as text.
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| TrackerError::Network(format!("cannot resolve {host}: {e}")))?
        .take(MAX_ADDRESSES)
        .collect();
    if addrs.is_empty() {
        return Err(TrackerError::Network(format!("{host} has no address")));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_resolve_without_the_network() {
        assert_eq!(
            resolve("udp://127.0.0.1:6969/announce").await,
            Ok(vec!["127.0.0.1:6969".parse().unwrap()])
        );
        assert_eq!(
            resolve("udp://[::1]:80").await,
            Ok(vec!["[::1]:80".parse().unwrap()])
        );
        let localhost = resolve("udp://localhost:1/announce").await.unwrap();
        assert!(localhost
            .iter()
            .all(|a| a.port() == 1 && a.ip().is_loopback()));
        assert!(matches!(
            resolve("udp://127.0.0.1/announce").await,
            Err(TrackerError::InvalidUrl(_))
        ));
        assert!(matches!(
            resolve("http://127.0.0.1:1/announce").await,
            Err(TrackerError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            resolve("udp://:1").await,
            Err(TrackerError::InvalidUrl(_))
        ));
    }
}
