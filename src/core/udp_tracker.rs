//! UDP tracker messages (BEP 15): connect, announce, scrape and error packets in both directions
//! (the client encodes requests and decodes responses; the built-in tracker decodes requests and
//! encodes responses), the retransmission schedule and connection-id lifetimes. Pure: no I/O, no
//! clock (times are parameters).
//!
//! Every decoder takes bytes from the network: they return errors, never panic, and allocate at
//! most in proportion to their input (which is at most one datagram).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use crate::core::compact::{self, CompactError};
use crate::core::tracker_proto::{
    AnnounceEvent, AnnounceQuery, AnnounceRequest, AnnounceResponse, ScrapeResponse, ScrapeStats,
    SwarmPeer, TrackerError, TransferTotals,
};

/// The magic constant that opens every connect request.
pub const PROTOCOL_ID: u64 = 0x0417_2710_1980;

pub const ACTION_CONNECT: u32 = 0;
pub const ACTION_ANNOUNCE: u32 = 1;
pub const ACTION_SCRAPE: u32 = 2;
pub const ACTION_ERROR: u32 = 3;

/// Largest UDP payload; nothing we read or write is longer.
pub const MAX_DATAGRAM: usize = 65_536;
/// Fixed sizes of the messages (BEP 15 allows longer packets for future extensions).
pub const CONNECT_REQUEST_LEN: usize = 16;
pub const CONNECT_RESPONSE_LEN: usize = 16;
pub const ANNOUNCE_REQUEST_LEN: usize = 98;
pub const ANNOUNCE_RESPONSE_HEADER_LEN: usize = 20;
/// Action and transaction id: the header of every response, and all an error carries besides text.
pub const RESPONSE_HEADER_LEN: usize = 8;
pub const REQUEST_HEADER_LEN: usize = 16;
/// "Up to about 74 torrents can be scraped at once" (so a request fits in a 1500-byte packet).
pub const MAX_SCRAPE_HASHES: usize = 74;
/// Longest error message we put in or take out of an error packet (bytes); the rest is cut.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// The spec's retransmission base: wait `15 s * 2^n` for an answer before trying again.
pub const SPEC_RETRY_BASE: Duration = Duration::from_secs(15);
/// `n` runs from 0 to 8 (3840 s with the spec's base); then the exchange has failed.
pub const MAX_RETRY_EXPONENT: u32 = 8;
/// How many sends the spec's full schedule makes before giving up.
pub const SPEC_ATTEMPTS: u32 = MAX_RETRY_EXPONENT + 1;
/// A client may use a connection id for one minute after it received it.
pub const CONNECTION_ID_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UdpTrackerError {
    #[error("{what} of {len} bytes is shorter than {min}")]
    TooShort {
        what: &'static str,
        len: usize,
        min: usize,
    },
    /// Not an answer to the request we are waiting for (a late or stray packet).
    #[error("transaction id {got:#010x} is not the one sent ({expected:#010x})")]
    WrongTransaction { expected: u32, got: u32 },
    #[error("action {got} where {expected} was expected")]
    WrongAction { expected: u32, got: u32 },
    #[error("unknown action {0}")]
    UnknownAction(u32),
    #[error("connect request with protocol id {0:#x}")]
    BadProtocolId(u64),
    #[error("{0} info-hashes in one scrape (at most {MAX_SCRAPE_HASHES})")]
    TooManyHashes(usize),
    #[error(transparent)]
    Peers(#[from] CompactError),
    /// The tracker answered with an error packet: its message, meant for the user.
    #[error("tracker error: {0}")]
    Tracker(String),
}

impl From<UdpTrackerError> for TrackerError {
    fn from(e: UdpTrackerError) -> Self {
        match e {
            UdpTrackerError::Tracker(message) => TrackerError::Failure(message),
            other => TrackerError::Malformed(other.to_string()),
        }
    }
}

/// How long to wait for an answer to send number `attempt` (0-based): `base * 2^attempt`, the
/// exponent capped at `MAX_RETRY_EXPONENT`.
pub fn retry_timeout(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(MAX_RETRY_EXPONENT))
}

/// A connection id the client got from a tracker, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionId {
    pub id: u64,
    pub received: Instant,
}

impl ConnectionId {
    /// Still usable at `now` (within a minute of receipt).
    pub fn is_valid(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.received) < CONNECTION_ID_LIFETIME
    }
}

/// The event code of an announce: 0 none, 1 completed, 2 started, 3 stopped.
fn event_code(event: Option<AnnounceEvent>) -> u32 {
    match event {
        None => 0,
        Some(AnnounceEvent::Completed) => 1,
        Some(AnnounceEvent::Started) => 2,
        Some(AnnounceEvent::Stopped) => 3,
    }
}

/// Unknown codes count as a regular announce, as unknown HTTP events do.
fn event_of(code: u32) -> Option<AnnounceEvent> {
    match code {
        1 => Some(AnnounceEvent::Completed),
        2 => Some(AnnounceEvent::Started),
        3 => Some(AnnounceEvent::Stopped),
        _ => None,
    }
}

/// Big-endian reads from a slice whose length the caller has checked; a short slice reads as 0
/// rather than panicking.
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn id20_at(bytes: &[u8], at: usize) -> [u8; 20] {
    bytes
        .get(at..at + 20)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 20])
}

fn need(what: &'static str, packet: &[u8], min: usize) -> Result<(), UdpTrackerError> {
    if packet.len() < min {
        return Err(UdpTrackerError::TooShort {
            what,
            len: packet.len(),
            min,
        });
    }
    Ok(())
}

fn request_header(connection_id: u64, action: u32, transaction_id: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&connection_id.to_be_bytes());
    out.extend_from_slice(&action.to_be_bytes());
    out.extend_from_slice(&transaction_id.to_be_bytes());
}

fn response_header(action: u32, transaction_id: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&action.to_be_bytes());
    out.extend_from_slice(&transaction_id.to_be_bytes());
}

// ---- client side: requests out ----

pub fn encode_connect_request(transaction_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONNECT_REQUEST_LEN);
    request_header(PROTOCOL_ID, ACTION_CONNECT, transaction_id, &mut out);
    out
}

/// An announce; `key` identifies us across address changes (the same for all our announces).
pub fn encode_announce_request(
    connection_id: u64,
    transaction_id: u32,
    req: &AnnounceRequest,
    key: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANNOUNCE_REQUEST_LEN);
    request_header(connection_id, ACTION_ANNOUNCE, transaction_id, &mut out);
    out.extend_from_slice(&req.peer.info_hash);
    out.extend_from_slice(&req.peer.peer_id);
    out.extend_from_slice(&req.totals.downloaded.to_be_bytes());
    out.extend_from_slice(&req.totals.left.to_be_bytes());
    out.extend_from_slice(&req.totals.uploaded.to_be_bytes());
    out.extend_from_slice(&event_code(req.event).to_be_bytes());
    // IP address 0: the tracker uses the packet's source.
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&key.to_be_bytes());
    let numwant = i32::try_from(req.numwant).unwrap_or(i32::MAX);
    out.extend_from_slice(&numwant.to_be_bytes());
    out.extend_from_slice(&req.peer.port.to_be_bytes());
    out
}

pub fn encode_scrape_request(
    connection_id: u64,
    transaction_id: u32,
    info_hashes: &[[u8; 20]],
) -> Result<Vec<u8>, UdpTrackerError> {
    if info_hashes.len() > MAX_SCRAPE_HASHES {
        return Err(UdpTrackerError::TooManyHashes(info_hashes.len()));
    }
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + 20 * info_hashes.len());
    request_header(connection_id, ACTION_SCRAPE, transaction_id, &mut out);
    for hash in info_hashes {
        out.extend_from_slice(hash);
    }
    Ok(out)
}

// ---- client side: responses in ----

/// Checks the header of a response to our request `transaction_id` with action `expected`. An
/// error packet becomes `UdpTrackerError::Tracker` with its message. Returns the body.
fn response_body(
    packet: &[u8],
    transaction_id: u32,
    expected: u32,
) -> Result<&[u8], UdpTrackerError> {
    need("response", packet, RESPONSE_HEADER_LEN)?;
    let got = u32_at(packet, 4);
    if got != transaction_id {
        return Err(UdpTrackerError::WrongTransaction {
            expected: transaction_id,
            got,
        });
    }
    let body = &packet[RESPONSE_HEADER_LEN..];
    match u32_at(packet, 0) {
        ACTION_ERROR => {
            let text = &body[..body.len().min(MAX_ERROR_MESSAGE)];
            Err(UdpTrackerError::Tracker(
                String::from_utf8_lossy(text).trim_end_matches('\0').into(),
            ))
        }
        action if action == expected => Ok(body),
        got => Err(UdpTrackerError::WrongAction { expected, got }),
    }
}

/// The connection id from a connect response.
pub fn decode_connect_response(packet: &[u8], transaction_id: u32) -> Result<u64, UdpTrackerError> {
    let body = response_body(packet, transaction_id, ACTION_CONNECT)?;
    need("connect response", packet, CONNECT_RESPONSE_LEN)?;
    Ok(u64_at(body, 0))
}

/// An announce response; `ipv6` says the tracker was reached over IPv6 (18-byte peers).
pub fn decode_announce_response(
    packet: &[u8],
    transaction_id: u32,
    ipv6: bool,
) -> Result<AnnounceResponse, UdpTrackerError> {
    let body = response_body(packet, transaction_id, ACTION_ANNOUNCE)?;
    need("announce response", packet, ANNOUNCE_RESPONSE_HEADER_LEN)?;
    let max_peers = MAX_DATAGRAM / compact::V4_LEN;
    let peers = compact::decode_peers(&body[12..], ipv6, max_peers)?;
    Ok(AnnounceResponse {
        interval: u32_at(body, 0),
        min_interval: None,
        peers,
        incomplete: Some(u32_at(body, 4)),
        complete: Some(u32_at(body, 8)),
        warning: None,
    })
}

/// A scrape response to a request for `info_hashes` (the counts come in the same order). Hashes
/// the tracker gave no counts for are left out; trailing bytes are ignored.
pub fn decode_scrape_response(
    packet: &[u8],
    transaction_id: u32,
    info_hashes: &[[u8; 20]],
) -> Result<ScrapeResponse, UdpTrackerError> {
    let body = response_body(packet, transaction_id, ACTION_SCRAPE)?;
    let mut response = ScrapeResponse::default();
    for (hash, counts) in info_hashes.iter().zip(body.chunks_exact(12)) {
        let stats = ScrapeStats {
            complete: u32_at(counts, 0),
            downloaded: u32_at(counts, 4),
            incomplete: u32_at(counts, 8),
        };
        response.files.insert(*hash, stats);
    }
    Ok(response)
}

// ---- server side: requests in ----

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Connect,
    /// An announce as the HTTP tracker would have parsed it (`compact` is true; `ip` is the IPv4
    /// field when not 0), and the client's `key`.
    Announce {
        query: AnnounceQuery,
        key: u32,
    },
    /// At most `MAX_SCRAPE_HASHES` info-hashes (more are ignored).
    Scrape(Vec<[u8; 20]>),
}

/// A request as the tracker reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `PROTOCOL_ID` for a connect.
    pub connection_id: u64,
    pub transaction_id: u32,
    pub kind: RequestKind,
}

/// The transaction id of a request, if the packet is long enough to have one (so that even a
/// request we cannot decode can get an error reply).
pub fn request_transaction_id(packet: &[u8]) -> Option<u32> {
    (packet.len() >= REQUEST_HEADER_LEN).then(|| u32_at(packet, 12))
}

pub fn decode_request(packet: &[u8]) -> Result<Request, UdpTrackerError> {
    need("request", packet, REQUEST_HEADER_LEN)?;
    let connection_id = u64_at(packet, 0);
    let transaction_id = u32_at(packet, 12);
    let kind = match u32_at(packet, 8) {
        ACTION_CONNECT => {
            if connection_id != PROTOCOL_ID {
                return Err(UdpTrackerError::BadProtocolId(connection_id));
            }
            RequestKind::Connect
        }
        ACTION_ANNOUNCE => {
            need("announce request", packet, ANNOUNCE_REQUEST_LEN)?;
            let ip = Ipv4Addr::from(u32_at(packet, 84));
            let numwant = i32::from_be_bytes(u32_at(packet, 92).to_be_bytes());
            let query = AnnounceQuery {
                peer: SwarmPeer {
                    info_hash: id20_at(packet, 16),
                    peer_id: id20_at(packet, 36),
                    port: u16::from_be_bytes([packet[96], packet[97]]),
                },
                totals: TransferTotals {
                    downloaded: u64_at(packet, 56),
                    left: u64_at(packet, 64),
                    uploaded: u64_at(packet, 72),
                },
                event: event_of(u32_at(packet, 80)),
                numwant: u32::try_from(numwant).ok(),
                compact: true,
                ip: (!ip.is_unspecified()).then(|| ip.to_string()),
            };
            RequestKind::Announce {
                query,
                key: u32_at(packet, 88),
            }
        }
        ACTION_SCRAPE => RequestKind::Scrape(
            packet[REQUEST_HEADER_LEN..]
                .chunks_exact(20)
                .take(MAX_SCRAPE_HASHES)
                .map(|h| id20_at(h, 0))
                .collect(),
        ),
        other => return Err(UdpTrackerError::UnknownAction(other)),
    };
    Ok(Request {
        connection_id,
        transaction_id,
        kind,
    })
}

// ---- server side: responses out ----

pub fn encode_connect_response(transaction_id: u32, connection_id: u64, out: &mut Vec<u8>) {
    response_header(ACTION_CONNECT, transaction_id, out);
    out.extend_from_slice(&connection_id.to_be_bytes());
}

/// An announce response for a client that reached us over IPv6 (`ipv6`: 18-byte peers) or IPv4
/// (6-byte peers). Peers of the other family cannot be expressed and are left out; so are peers
/// past what fits in one datagram.
pub fn encode_announce_response(
    transaction_id: u32,
    resp: &AnnounceResponse,
    ipv6: bool,
    out: &mut Vec<u8>,
) {
    response_header(ACTION_ANNOUNCE, transaction_id, out);
    out.extend_from_slice(&resp.interval.to_be_bytes());
    out.extend_from_slice(&resp.incomplete.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&resp.complete.unwrap_or(0).to_be_bytes());
    let entry = if ipv6 {
        compact::V6_LEN
    } else {
        compact::V4_LEN
    };
    let room = (MAX_DATAGRAM - ANNOUNCE_RESPONSE_HEADER_LEN) / entry;
    let fits = |peer: &&SocketAddr| peer.is_ipv6() == ipv6;
    for peer in resp.peers.iter().filter(fits).take(room) {
        compact::encode_peer(peer, out);
    }
}

/// Counts for each requested info-hash, in request order.
pub fn encode_scrape_response(transaction_id: u32, stats: &[ScrapeStats], out: &mut Vec<u8>) {
    response_header(ACTION_SCRAPE, transaction_id, out);
    for s in stats.iter().take(MAX_SCRAPE_HASHES) {
        out.extend_from_slice(&s.complete.to_be_bytes());
        out.extend_from_slice(&s.downloaded.to_be_bytes());
        out.extend_from_slice(&s.incomplete.to_be_bytes());
    }
}

/// An error packet; the message is cut to `MAX_ERROR_MESSAGE` bytes (at a character boundary).
pub fn encode_error(transaction_id: u32, message: &str, out: &mut Vec<u8>) {
    response_header(ACTION_ERROR, transaction_id, out);
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&message.as_bytes()[..end]);
}

// ---- server side: stateless connection ids ----

/// The connection id the tracker gives `client` during `minute` (minutes on the tracker's own
/// clock): a keyed hash, so the tracker keeps no state and a client that spoofs its source
/// address cannot guess it. Only the IP counts, not the port: clients may send from a new port
/// for every exchange (opentracker does the same).
pub fn server_connection_id(key: &[u8; 16], client: IpAddr, minute: u64) -> u64 {
    let mut hasher = Sha1::new();
    hasher.update(key);
    match client.to_canonical() {
        IpAddr::V4(ip) => hasher.update(ip.octets()),
        IpAddr::V6(ip) => hasher.update(ip.octets()),
    }
    hasher.update(minute.to_be_bytes());
    let digest = hasher.finalize();
    u64_at(&digest, 0)
}

/// Accepts ids given out this minute or the previous one: every id lives at least one minute
/// (what a client may assume) and at most two (what the spec asks trackers to accept).
pub fn server_connection_id_valid(key: &[u8; 16], client: IpAddr, id: u64, minute: u64) -> bool {
    id == server_connection_id(key, client, minute)
        || (minute > 0 && id == server_connection_id(key, client, minute - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mutate::mutate;
    use rand::{Rng, SeedableRng};

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn request() -> AnnounceRequest {
        AnnounceRequest {
            peer: SwarmPeer {
                info_hash: [0xAA; 20],
                peer_id: *b"-SF0100-abcdefghijkl",
                port: 6881,
            },
            totals: TransferTotals {
                uploaded: 3,
                downloaded: 1,
                left: 2,
            },
            event: Some(AnnounceEvent::Started),
            numwant: 50,
        }
    }

    /// Hex with spaces and newlines allowed, for the hand-written fixtures.
    fn bytes(hex_text: &str) -> Vec<u8> {
        let clean: String = hex_text.split_whitespace().collect();
        hex::decode(clean).unwrap()
    }

    #[test]
    fn connect_bytes_match_the_spec() {
        let req = encode_connect_request(0x1234_5678);
        assert_eq!(req, bytes("00000417 27101980  00000000  12345678"));
        let parsed = decode_request(&req).unwrap();
        assert_eq!(parsed.kind, RequestKind::Connect);
        assert_eq!(parsed.transaction_id, 0x1234_5678);

        let mut resp = Vec::new();
        encode_connect_response(0x1234_5678, 0x0102_0304_0506_0708, &mut resp);
        assert_eq!(resp, bytes("00000000 12345678 0102030405060708"));
        assert_eq!(
            decode_connect_response(&resp, 0x1234_5678),
            Ok(0x0102_0304_0506_0708)
        );
    }

    #[test]
    fn announce_bytes_match_the_spec() {
        let req = encode_announce_request(0x0102_0304_0506_0708, 7, &request(), 0xDEAD_BEEF);
        let expected = bytes(&format!(
            "0102030405060708 00000001 00000007 {} {} \
             0000000000000001 0000000000000002 0000000000000003 \
             00000002 00000000 deadbeef 00000032 1ae1",
            "aa".repeat(20),
            hex::encode(b"-SF0100-abcdefghijkl"),
        ));
        assert_eq!(req, expected);
        assert_eq!(req.len(), ANNOUNCE_REQUEST_LEN);

        let parsed = decode_request(&req).unwrap();
        assert_eq!(parsed.connection_id, 0x0102_0304_0506_0708);
        assert_eq!(parsed.transaction_id, 7);
        let RequestKind::Announce { query, key } = parsed.kind else {
            panic!("not an announce: {parsed:?}");
        };
        assert_eq!(key, 0xDEAD_BEEF);
        assert_eq!(query.peer, request().peer);
        assert_eq!(query.totals, request().totals);
        assert_eq!(query.event, Some(AnnounceEvent::Started));
        assert_eq!(query.numwant, Some(50));
        assert_eq!(query.ip, None);

        // The default numwant (-1) and a set IP field.
        let mut raw = req.clone();
        raw[84..88].copy_from_slice(&[127, 0, 0, 2]);
        raw[92..96].copy_from_slice(&(-1i32).to_be_bytes());
        raw.extend_from_slice(b"\x02\x0c/announce?x"); // BEP 41 options are ignored
        let RequestKind::Announce { query, .. } = decode_request(&raw).unwrap().kind else {
            panic!()
        };
        assert_eq!(query.numwant, None);
        assert_eq!(query.ip.as_deref(), Some("127.0.0.2"));
    }

    #[test]
    fn announce_response_bytes_both_families() {
        let resp = AnnounceResponse {
            interval: 1800,
            min_interval: None,
            peers: vec![
                addr("127.0.0.1:6881"),
                addr("[::1]:6882"),
                addr("10.0.0.2:1"),
            ],
            complete: Some(2),
            incomplete: Some(5),
            warning: None,
        };
        let mut v4 = Vec::new();
        encode_announce_response(9, &resp, false, &mut v4);
        assert_eq!(
            v4,
            bytes(
                "00000001 00000009 00000708 00000005 00000002 \
                 7f000001 1ae1 0a000002 0001"
            )
        );
        let back = decode_announce_response(&v4, 9, false).unwrap();
        assert_eq!(back.peers, vec![addr("127.0.0.1:6881"), addr("10.0.0.2:1")]);
        assert_eq!(
            (back.interval, back.complete, back.incomplete),
            (1800, Some(2), Some(5))
        );

        let mut v6 = Vec::new();
        encode_announce_response(9, &resp, true, &mut v6);
        assert_eq!(
            v6,
            bytes(
                "00000001 00000009 00000708 00000005 00000002 \
                 00000000000000000000000000000001 1ae2"
            )
        );
        let back = decode_announce_response(&v6, 9, true).unwrap();
        assert_eq!(back.peers, vec![addr("[::1]:6882")]);
        // A peer list that does not fit the family's stride is malformed.
        assert!(decode_announce_response(&v6[..v6.len() - 1], 9, true).is_err());
        assert!(decode_announce_response(&v4[..v4.len() - 1], 9, false).is_err());
    }

    #[test]
    fn scrape_round_trip_and_bytes() {
        let hashes = [[1u8; 20], [2u8; 20]];
        let req = encode_scrape_request(5, 6, &hashes).unwrap();
        assert_eq!(
            req,
            bytes(&format!(
                "0000000000000005 00000002 00000006 {}{}",
                "01".repeat(20),
                "02".repeat(20)
            ))
        );
        let parsed = decode_request(&req).unwrap();
        assert_eq!(parsed.kind, RequestKind::Scrape(hashes.to_vec()));
        assert!(matches!(
            encode_scrape_request(5, 6, &[[0; 20]; MAX_SCRAPE_HASHES + 1]),
            Err(UdpTrackerError::TooManyHashes(75))
        ));

        let stats = [
            ScrapeStats {
                complete: 1,
                downloaded: 2,
                incomplete: 3,
            },
            ScrapeStats::default(),
        ];
        let mut resp = Vec::new();
        encode_scrape_response(6, &stats, &mut resp);
        assert_eq!(
            resp,
            bytes("00000002 00000006 00000001 00000002 00000003 00000000 00000000 00000000")
        );
        let back = decode_scrape_response(&resp, 6, &hashes).unwrap();
        assert_eq!(back.files[&hashes[0]], stats[0]);
        assert_eq!(back.files[&hashes[1]], stats[1]);
        // Fewer counts than hashes: the rest are left out.
        let back = decode_scrape_response(&resp[..20], 6, &hashes).unwrap();
        assert_eq!(back.files.len(), 1);
    }

    #[test]
    fn error_packets_become_tracker_errors() {
        let mut err = Vec::new();
        encode_error(3, "torrent not registered", &mut err);
        assert_eq!(
            err,
            [
                bytes("00000003 00000003"),
                b"torrent not registered".to_vec()
            ]
            .concat()
        );
        for result in [
            decode_connect_response(&err, 3).map(|_| ()),
            decode_announce_response(&err, 3, false).map(|_| ()),
            decode_scrape_response(&err, 3, &[]).map(|_| ()),
        ] {
            assert_eq!(
                result,
                Err(UdpTrackerError::Tracker("torrent not registered".into()))
            );
        }
        assert_eq!(
            TrackerError::from(UdpTrackerError::Tracker("x".into())),
            TrackerError::Failure("x".into())
        );
        // Long messages are cut at a character boundary, both ways.
        let mut long = Vec::new();
        encode_error(1, &"é".repeat(MAX_ERROR_MESSAGE), &mut long);
        assert_eq!(long.len(), RESPONSE_HEADER_LEN + MAX_ERROR_MESSAGE);
        let mut huge = bytes("00000003 00000001");
        huge.extend(std::iter::repeat_n(b'x', 10_000));
        let Err(UdpTrackerError::Tracker(text)) = decode_connect_response(&huge, 1) else {
            panic!()
        };
        assert_eq!(text.len(), MAX_ERROR_MESSAGE);
    }

    #[test]
    fn malformed_packets_are_errors() {
        use UdpTrackerError::*;
        let connect_ok = bytes("00000000 00000001 0102030405060708");
        let cases: Vec<(&str, Vec<u8>, UdpTrackerError)> = vec![
            (
                "empty",
                vec![],
                TooShort {
                    what: "response",
                    len: 0,
                    min: 8,
                },
            ),
            (
                "header only",
                connect_ok[..8].to_vec(),
                TooShort {
                    what: "connect response",
                    len: 8,
                    min: 16,
                },
            ),
            (
                "15 bytes",
                connect_ok[..15].to_vec(),
                TooShort {
                    what: "connect response",
                    len: 15,
                    min: 16,
                },
            ),
            (
                "wrong transaction",
                bytes("00000000 00000002 0102030405060708"),
                WrongTransaction {
                    expected: 1,
                    got: 2,
                },
            ),
            (
                "wrong action",
                bytes("00000001 00000001 0102030405060708"),
                WrongAction {
                    expected: 0,
                    got: 1,
                },
            ),
        ];
        for (name, packet, error) in cases {
            assert_eq!(decode_connect_response(&packet, 1), Err(error), "{name}");
        }
        assert!(decode_connect_response(&connect_ok, 1).is_ok());

        let announce_cases: Vec<(&str, Vec<u8>)> = vec![
            ("no counts", bytes("00000001 00000001 00000708")),
            (
                "19 bytes",
                bytes("00000001 00000001 00000708 00000000 000000"),
            ),
            (
                "half a peer",
                bytes("00000001 00000001 00000708 00000000 00000000 7f000001"),
            ),
            (
                "scrape action",
                bytes("00000002 00000001 00000708 00000000 00000000"),
            ),
        ];
        for (name, packet) in announce_cases {
            assert!(
                decode_announce_response(&packet, 1, false).is_err(),
                "{name}"
            );
        }

        let good = encode_announce_request(1, 2, &request(), 3);
        let request_cases: Vec<(&str, Vec<u8>, UdpTrackerError)> = vec![
            (
                "short header",
                good[..15].to_vec(),
                TooShort {
                    what: "request",
                    len: 15,
                    min: 16,
                },
            ),
            (
                "short announce",
                good[..97].to_vec(),
                TooShort {
                    what: "announce request",
                    len: 97,
                    min: 98,
                },
            ),
            (
                "unknown action",
                bytes("0000000000000001 00000009 00000002"),
                UnknownAction(9),
            ),
            (
                "connect without the magic",
                bytes("0000000000000001 00000000 00000002"),
                BadProtocolId(1),
            ),
        ];
        for (name, packet, error) in request_cases {
            assert_eq!(decode_request(&packet), Err(error), "{name}");
        }
        assert_eq!(request_transaction_id(&good[..15]), None);
        assert_eq!(request_transaction_id(&good[..16]), Some(2));
        // A scrape lists at most MAX_SCRAPE_HASHES, whatever the packet holds.
        let mut many = encode_scrape_request(1, 2, &[]).unwrap();
        many.extend(std::iter::repeat_n(7u8, 20 * 200 + 7));
        let RequestKind::Scrape(hashes) = decode_request(&many).unwrap().kind else {
            panic!()
        };
        assert_eq!(hashes.len(), MAX_SCRAPE_HASHES);
    }

    #[test]
    fn peer_count_is_bounded_by_one_datagram() {
        let resp = AnnounceResponse {
            interval: 1,
            min_interval: None,
            peers: (0..20_000u32)
                .map(|i| SocketAddr::from((Ipv4Addr::from(i + 1), 1)))
                .collect(),
            complete: None,
            incomplete: None,
            warning: None,
        };
        let mut out = Vec::new();
        encode_announce_response(1, &resp, false, &mut out);
        assert!(out.len() <= MAX_DATAGRAM);
        let back = decode_announce_response(&out, 1, false).unwrap();
        assert_eq!(back.peers.len(), (MAX_DATAGRAM - 20) / 6);
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let mut announce_resp = Vec::new();
        let resp = AnnounceResponse {
            interval: 60,
            min_interval: None,
            peers: vec![addr("127.0.0.1:1"), addr("127.0.0.2:2")],
            complete: Some(1),
            incomplete: Some(1),
            warning: None,
        };
        encode_announce_response(4, &resp, false, &mut announce_resp);
        let mut scrape_resp = Vec::new();
        encode_scrape_response(4, &[ScrapeStats::default()], &mut scrape_resp);
        let mut connect_resp = Vec::new();
        encode_connect_response(4, 99, &mut connect_resp);
        let mut error = Vec::new();
        encode_error(4, "no", &mut error);
        let messages = [
            encode_connect_request(4),
            encode_announce_request(1, 4, &request(), 2),
            encode_scrape_request(1, 4, &[[3; 20]; 3]).unwrap(),
            announce_resp,
            scrape_resp,
            connect_resp,
            error,
        ];
        for _ in 0..20_000 {
            let message = &messages[rng.gen_range(0..messages.len())];
            let bad = mutate(&mut rng, message);
            let _ = decode_request(&bad);
            let _ = request_transaction_id(&bad);
            let _ = decode_connect_response(&bad, 4);
            let _ = decode_announce_response(&bad, 4, rng.gen());
            let _ = decode_scrape_response(&bad, 4, &[[3; 20]; 3]);
        }
    }

    #[test]
    fn retry_schedule_doubles_up_to_n_8() {
        let base = Duration::from_secs(15);
        let waits: Vec<u64> = (0..SPEC_ATTEMPTS + 2)
            .map(|n| retry_timeout(base, n).as_secs())
            .collect();
        assert_eq!(
            waits,
            [15, 30, 60, 120, 240, 480, 960, 1920, 3840, 3840, 3840]
        );
        assert_eq!(
            retry_timeout(Duration::from_millis(50), 2),
            Duration::from_millis(200)
        );
        assert_eq!(retry_timeout(Duration::MAX, 8), Duration::MAX);
    }

    #[test]
    fn connection_ids_live_a_minute_for_clients_and_up_to_two_at_the_tracker() {
        let t0 = Instant::now();
        let id = ConnectionId {
            id: 1,
            received: t0,
        };
        assert!(id.is_valid(t0 + Duration::from_secs(59)));
        assert!(!id.is_valid(t0 + Duration::from_secs(60)));

        let key = [7u8; 16];
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let given = server_connection_id(&key, ip, 10);
        assert!(server_connection_id_valid(&key, ip, given, 10));
        assert!(server_connection_id_valid(&key, ip, given, 11));
        assert!(!server_connection_id_valid(&key, ip, given, 12));
        assert!(!server_connection_id_valid(&key, ip, given, 9));
        assert!(!server_connection_id_valid(&key, other, given, 10));
        assert!(server_connection_id_valid(&key, mapped, given, 10));
        assert!(!server_connection_id_valid(&[8; 16], ip, given, 10));
        assert!(server_connection_id_valid(
            &key,
            ip,
            server_connection_id(&key, ip, 0),
            0
        ));
    }
}
