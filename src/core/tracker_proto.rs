//! HTTP tracker messages (BEP 3, compact peers BEP 23, IPv6 `peers6` BEP 7, scrape), and the
//! types UDP trackers (`core::udp_tracker`) share with them: building
//! announce / scrape URLs, parsing and encoding tracker responses, and parsing the query string of
//! an announce for the built-in tracker. Pure: no I/O, no clock.
//!
//! Every parser here takes bytes from the network: they return errors, never panic, and allocate
//! at most in proportion to their input.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use percent_encoding::{percent_decode_str, AsciiSet, NON_ALPHANUMERIC};
use serde_bencode::value::Value;

/// Bytes left alone in a query value: the RFC 3986 unreserved set. Everything else (including all
/// binary bytes of an info-hash) becomes `%XX`.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Deepest list/dict nesting accepted in a tracker response; real responses nest 3 deep. Bounds the
/// recursion of the bencode decoder, which would otherwise overflow the stack on `llll...`.
const MAX_NESTING: usize = 16;

/// Longest `failure reason` / `warning message` kept (characters); the rest is cut.
const MAX_MESSAGE_CHARS: usize = 1024;

/// Most key=value pairs read from one query string (the rest are ignored).
const MAX_QUERY_PAIRS: usize = 256;

/// Most info-hashes read from one scrape query.
pub const MAX_SCRAPE_HASHES: usize = 64;

/// The event field of an announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnnounceEvent {
    Started,
    Completed,
    Stopped,
}

impl AnnounceEvent {
    /// The value of the `event` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            AnnounceEvent::Started => "started",
            AnnounceEvent::Completed => "completed",
            AnnounceEvent::Stopped => "stopped",
        }
    }
}

/// Who announces: the torrent, our peer id and the port peers reach us on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwarmPeer {
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
    pub port: u16,
}

/// What we have transferred so far, as reported to trackers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferTotals {
    pub uploaded: u64,
    pub downloaded: u64,
    pub left: u64,
}

/// What a client tells the tracker in one announce.
#[derive(Clone, Debug)]
pub struct AnnounceRequest {
    pub peer: SwarmPeer,
    pub totals: TransferTotals,
    pub event: Option<AnnounceEvent>,
    pub numwant: u32,
}

/// A tracker's successful answer to an announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceResponse {
    /// Seconds the client should wait before the next regular announce.
    pub interval: u32,
    /// Seconds the client must wait at least between announces, if the tracker says.
    pub min_interval: Option<u32>,
    pub peers: Vec<SocketAddr>,
    /// Seeders.
    pub complete: Option<u32>,
    /// Leechers.
    pub incomplete: Option<u32>,
    /// `warning message`: the announce worked, but the tracker has something to say.
    pub warning: Option<String>,
}

/// Swarm counts for one torrent in a scrape response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrapeStats {
    /// Seeders.
    pub complete: u32,
    /// Times the tracker saw a `completed` event.
    pub downloaded: u32,
    /// Leechers.
    pub incomplete: u32,
}

/// A scrape response: counts per info-hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrapeResponse {
    pub files: BTreeMap<[u8; 20], ScrapeStats>,
}

/// An announce as the built-in tracker reads it from the query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceQuery {
    pub peer: SwarmPeer,
    pub totals: TransferTotals,
    /// `None` for a regular announce, also for `empty` and for events we do not know (`paused`).
    pub event: Option<AnnounceEvent>,
    pub numwant: Option<u32>,
    /// `compact=1` was asked for (the built-in tracker answers compact either way).
    pub compact: bool,
    /// The `ip` parameter as sent, if any.
    pub ip: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    /// The tracker answered with a `failure reason`: meant for the user.
    #[error("tracker refused the request: {0}")]
    Failure(String),
    #[error("malformed tracker response: {0}")]
    Malformed(String),
    #[error("tracker HTTP error: {0}")]
    Http(String),
    #[error("tracker did not answer in time")]
    Timeout,
    /// The tracker could not be reached (name resolution, socket errors, ICMP unreachable).
    #[error("cannot reach tracker: {0}")]
    Network(String),
    #[error("invalid tracker URL: {0}")]
    InvalidUrl(String),
    /// A scheme the code at hand does not speak: the URL builders here take http(s) only, the
    /// tracker client http(s) and udp.
    #[error("unsupported tracker URL scheme: {0}")]
    UnsupportedScheme(String),
    /// The announce URL does not end in `announce`, so it has no scrape convention.
    #[error("tracker has no scrape URL: {0}")]
    NoScrape(String),
    /// An announce or scrape query the built-in tracker cannot accept.
    #[error("invalid request: {0}")]
    BadRequest(String),
}

fn encode_bytes(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, QUERY_VALUE).to_string()
}

/// Parses an http(s) tracker URL, dropping any fragment.
fn parse_tracker_url(tracker: &str) -> Result<url::Url, TrackerError> {
    let mut url = url::Url::parse(tracker)
        .map_err(|e| TrackerError::InvalidUrl(format!("{tracker}: {e}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(TrackerError::UnsupportedScheme(other.to_string())),
    }
    if url.host().is_none() {
        return Err(TrackerError::InvalidUrl(format!("{tracker}: no host")));
    }
    url.set_fragment(None);
    Ok(url)
}

/// Appends our already-encoded `params` to the URL's existing query (a tracker URL may carry its
/// own, e.g. a passkey).
fn with_query(mut url: url::Url, params: &str) -> String {
    let query = match url.query() {
        Some(existing) if !existing.is_empty() => {
            format!("{}&{params}", existing.trim_end_matches('&'))
        }
        _ => params.to_string(),
    };
    // All of `query` is already valid query text, so set_query keeps it byte for byte.
    url.set_query(Some(&query));
    url.into()
}

/// The full announce URL for `req` on `tracker` (compact=1, binary fields percent-encoded).
pub fn announce_url(tracker: &str, req: &AnnounceRequest) -> Result<String, TrackerError> {
    let url = parse_tracker_url(tracker)?;
    let mut params = format!(
        "info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact=1&numwant={}",
        encode_bytes(&req.peer.info_hash),
        encode_bytes(&req.peer.peer_id),
        req.peer.port,
        req.totals.uploaded,
        req.totals.downloaded,
        req.totals.left,
        req.numwant,
    );
    if let Some(event) = req.event {
        params.push_str("&event=");
        params.push_str(event.as_str());
    }
    Ok(with_query(url, &params))
}

/// The scrape URL for `announce` (the convention: the last path segment `announce...` becomes
/// `scrape...`), asking about `info_hashes`.
pub fn scrape_url(announce: &str, info_hashes: &[[u8; 20]]) -> Result<String, TrackerError> {
    let mut url = parse_tracker_url(announce)?;
    let path = url.path().to_string();
    let (dir, last) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
    let Some(rest) = last.strip_prefix("announce") else {
        return Err(TrackerError::NoScrape(announce.to_string()));
    };
    url.set_path(&format!("{dir}/scrape{rest}"));
    let params: Vec<String> = info_hashes
        .iter()
        .map(|h| format!("info_hash={}", encode_bytes(h)))
        .collect();
    Ok(with_query(url, &params.join("&")))
}

/// Checks that `body` is one well-formed bencoded value nested at most `MAX_NESTING` deep, without
/// recursion. Only then is it handed to serde_bencode, whose decoder recurses.
fn check_bencode_shape(body: &[u8]) -> Result<(), TrackerError> {
    let malformed = |what: &str| Err(TrackerError::Malformed(what.to_string()));
    let mut depth = 0usize;
    let mut pos = 0usize;
    loop {
        let Some(&byte) = body.get(pos) else {
            return malformed("truncated bencode");
        };
        match byte {
            b'i' => {
                let Some(end) = body[pos..].iter().position(|&b| b == b'e') else {
                    return malformed("unterminated integer");
                };
                pos += end + 1;
            }
            b'0'..=b'9' => {
                let Some(colon) = body[pos..].iter().position(|&b| b == b':') else {
                    return malformed("unterminated string length");
                };
                let len_text = std::str::from_utf8(&body[pos..pos + colon]).unwrap_or("x");
                let Ok(len) = len_text.parse::<usize>() else {
                    return malformed("bad string length");
                };
                let start = pos + colon + 1;
                match start.checked_add(len) {
                    Some(end) if end <= body.len() => pos = end,
                    _ => return malformed("string runs past the end"),
                }
            }
            b'l' | b'd' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return malformed("nested too deeply");
                }
                pos += 1;
                continue;
            }
            b'e' if depth > 0 => {
                depth -= 1;
                pos += 1;
            }
            _ => return malformed("unexpected byte"),
        }
        if depth == 0 {
            return Ok(());
        }
    }
}

fn decode_dict(body: &[u8]) -> Result<HashMap<Vec<u8>, Value>, TrackerError> {
    check_bencode_shape(body)?;
    match serde_bencode::from_bytes::<Value>(body) {
        Ok(Value::Dict(dict)) => Ok(dict),
        Ok(_) => Err(TrackerError::Malformed(
            "response is not a dictionary".into(),
        )),
        Err(e) => Err(TrackerError::Malformed(e.to_string())),
    }
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// A non-negative integer field, saturated to u32.
fn u32_field(dict: &HashMap<Vec<u8>, Value>, key: &str) -> Result<Option<u32>, TrackerError> {
    match dict.get(key.as_bytes()) {
        None => Ok(None),
        Some(Value::Int(n)) if *n >= 0 => Ok(Some(u32::try_from(*n).unwrap_or(u32::MAX))),
        Some(_) => Err(TrackerError::Malformed(format!(
            "`{key}` is not a non-negative integer"
        ))),
    }
}

/// Fails with the tracker's own words if it sent a `failure reason`.
fn check_failure(dict: &HashMap<Vec<u8>, Value>) -> Result<(), TrackerError> {
    match dict.get(b"failure reason".as_slice()) {
        None => Ok(()),
        Some(Value::Bytes(reason)) => Err(TrackerError::Failure(text_of(reason))),
        Some(_) => Err(TrackerError::Failure("(unreadable failure reason)".into())),
    }
}

fn compact_peers(bytes: &[u8], ipv6: bool) -> Result<Vec<SocketAddr>, TrackerError> {
    let size = if ipv6 { 18 } else { 6 };
    if !bytes.len().is_multiple_of(size) {
        return Err(TrackerError::Malformed(format!(
            "compact peer list of {} bytes is not a multiple of {size}",
            bytes.len()
        )));
    }
    let peers = bytes.chunks_exact(size).filter_map(|chunk| {
        let (ip_bytes, port_bytes) = chunk.split_at(size - 2);
        let port = u16::from_be_bytes([port_bytes[0], port_bytes[1]]);
        let ip = if ipv6 {
            let octets: [u8; 16] = ip_bytes.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(octets))
        } else {
            let octets: [u8; 4] = ip_bytes.try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(octets))
        };
        (port != 0).then_some(SocketAddr::new(ip, port))
    });
    Ok(peers.collect())
}

/// The BEP 3 dictionary form: a list of `{ip, port, peer id}`. Entries we cannot use (host names,
/// port 0, missing fields) are skipped rather than failing the whole answer.
fn dict_peers(list: &[Value]) -> Vec<SocketAddr> {
    list.iter()
        .filter_map(|entry| {
            let Value::Dict(peer) = entry else {
                return None;
            };
            let Some(Value::Bytes(ip)) = peer.get(b"ip".as_slice()) else {
                return None;
            };
            let Some(Value::Int(port)) = peer.get(b"port".as_slice()) else {
                return None;
            };
            let ip: IpAddr = std::str::from_utf8(ip).ok()?.trim().parse().ok()?;
            let port = u16::try_from(*port).ok().filter(|&p| p != 0)?;
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// Parses a tracker's announce response body.
pub fn parse_announce_response(body: &[u8]) -> Result<AnnounceResponse, TrackerError> {
    let dict = decode_dict(body)?;
    check_failure(&dict)?;
    let interval = u32_field(&dict, "interval")?
        .ok_or_else(|| TrackerError::Malformed("no `interval`".into()))?;
    let mut peers = match dict.get(b"peers".as_slice()) {
        None => Vec::new(),
        Some(Value::Bytes(bytes)) => compact_peers(bytes, false)?,
        Some(Value::List(list)) => dict_peers(list),
        Some(_) => return Err(TrackerError::Malformed("`peers` has the wrong type".into())),
    };
    match dict.get(b"peers6".as_slice()) {
        None => {}
        Some(Value::Bytes(bytes)) => peers.extend(compact_peers(bytes, true)?),
        Some(_) => return Err(TrackerError::Malformed("`peers6` is not a string".into())),
    }
    let warning = match dict.get(b"warning message".as_slice()) {
        Some(Value::Bytes(text)) => Some(text_of(text)),
        _ => None,
    };
    Ok(AnnounceResponse {
        interval,
        min_interval: u32_field(&dict, "min interval")?,
        peers,
        complete: u32_field(&dict, "complete")?,
        incomplete: u32_field(&dict, "incomplete")?,
        warning,
    })
}

fn int(n: u32) -> Value {
    Value::Int(i64::from(n))
}

fn entry(key: &str, value: Value) -> (Vec<u8>, Value) {
    (key.as_bytes().to_vec(), value)
}

fn to_bencode(dict: HashMap<Vec<u8>, Value>) -> Vec<u8> {
    // Serializing a Value into a Vec cannot fail: every key is a byte string.
    serde_bencode::to_bytes(&Value::Dict(dict)).unwrap_or_default()
}

/// Encodes an announce response the compact way: IPv4 peers in `peers`, IPv6 in `peers6`.
pub fn encode_announce_response(resp: &AnnounceResponse) -> Vec<u8> {
    let mut peers4 = Vec::new();
    let mut peers6 = Vec::new();
    for peer in &resp.peers {
        match peer {
            SocketAddr::V4(v4) => {
                peers4.extend_from_slice(&v4.ip().octets());
                peers4.extend_from_slice(&v4.port().to_be_bytes());
            }
            SocketAddr::V6(v6) => {
                peers6.extend_from_slice(&v6.ip().octets());
                peers6.extend_from_slice(&v6.port().to_be_bytes());
            }
        }
    }
    let mut dict = HashMap::new();
    dict.extend([
        entry("interval", int(resp.interval)),
        entry("peers", Value::Bytes(peers4)),
    ]);
    if !peers6.is_empty() {
        dict.extend([entry("peers6", Value::Bytes(peers6))]);
    }
    if let Some(min) = resp.min_interval {
        dict.extend([entry("min interval", int(min))]);
    }
    if let Some(n) = resp.complete {
        dict.extend([entry("complete", int(n))]);
    }
    if let Some(n) = resp.incomplete {
        dict.extend([entry("incomplete", int(n))]);
    }
    if let Some(text) = &resp.warning {
        dict.extend([entry(
            "warning message",
            Value::Bytes(text.as_bytes().to_vec()),
        )]);
    }
    to_bencode(dict)
}

/// Encodes an error answer: `d14:failure reason...e`.
pub fn encode_failure(reason: &str) -> Vec<u8> {
    to_bencode(HashMap::from([entry(
        "failure reason",
        Value::Bytes(reason.as_bytes().to_vec()),
    )]))
}

/// Parses a scrape response body. Entries whose key is not a 20-byte info-hash are skipped.
pub fn parse_scrape_response(body: &[u8]) -> Result<ScrapeResponse, TrackerError> {
    let dict = decode_dict(body)?;
    check_failure(&dict)?;
    let files = match dict.get(b"files".as_slice()) {
        Some(Value::Dict(files)) => files,
        None => return Ok(ScrapeResponse::default()),
        Some(_) => {
            return Err(TrackerError::Malformed(
                "`files` is not a dictionary".into(),
            ))
        }
    };
    let mut response = ScrapeResponse::default();
    for (key, stats) in files {
        let (Ok(info_hash), Value::Dict(stats)) = (<[u8; 20]>::try_from(key.as_slice()), stats)
        else {
            continue;
        };
        response.files.insert(
            info_hash,
            ScrapeStats {
                complete: u32_field(stats, "complete")?.unwrap_or(0),
                downloaded: u32_field(stats, "downloaded")?.unwrap_or(0),
                incomplete: u32_field(stats, "incomplete")?.unwrap_or(0),
            },
        );
    }
    Ok(response)
}

/// Encodes a scrape response.
pub fn encode_scrape_response(resp: &ScrapeResponse) -> Vec<u8> {
    let files: HashMap<Vec<u8>, Value> = resp
        .files
        .iter()
        .map(|(info_hash, stats)| {
            let stats = HashMap::from([
                entry("complete", int(stats.complete)),
                entry("downloaded", int(stats.downloaded)),
                entry("incomplete", int(stats.incomplete)),
            ]);
            (info_hash.to_vec(), Value::Dict(stats))
        })
        .collect();
    to_bencode(HashMap::from([entry("files", Value::Dict(files))]))
}

/// Splits a raw query string into percent-decoded (name, value) byte pairs. Decodes byte-wise, so
/// a binary info-hash survives (a form decoder would turn it into UTF-8 replacement characters).
/// `+` is kept literally: BitTorrent clients encode a binary 0x2B as `%2B`.
fn query_pairs(query: &str) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .take(MAX_QUERY_PAIRS)
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode_str(name).collect(),
                percent_decode_str(value).collect(),
            )
        })
}

fn bad(what: impl Into<String>) -> TrackerError {
    TrackerError::BadRequest(what.into())
}

fn id20(name: &str, value: &[u8]) -> Result<[u8; 20], TrackerError> {
    value
        .try_into()
        .map_err(|_| bad(format!("{name} must be 20 bytes, got {}", value.len())))
}

fn number<T: std::str::FromStr>(name: &str, value: &[u8]) -> Result<T, TrackerError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| bad(format!("{name} is not a valid number")))
}

/// Parses the query string of `GET /announce?...` (without the `?`).
pub fn parse_announce_query(query: &str) -> Result<AnnounceQuery, TrackerError> {
    let mut info_hash = None;
    let mut peer_id = None;
    let mut port = None;
    let mut left = None;
    let mut parsed = AnnounceQuery {
        peer: SwarmPeer {
            info_hash: [0; 20],
            peer_id: [0; 20],
            port: 0,
        },
        totals: TransferTotals::default(),
        event: None,
        numwant: None,
        compact: false,
        ip: None,
    };
    for (name, value) in query_pairs(query) {
        match name.as_slice() {
            b"info_hash" => info_hash = Some(id20("info_hash", &value)?),
            b"peer_id" => peer_id = Some(id20("peer_id", &value)?),
            b"port" => port = Some(number::<u16>("port", &value)?),
            b"uploaded" => parsed.totals.uploaded = number("uploaded", &value)?,
            b"downloaded" => parsed.totals.downloaded = number("downloaded", &value)?,
            b"left" => left = Some(number::<u64>("left", &value)?),
            b"numwant" => parsed.numwant = number::<u32>("numwant", &value).ok(),
            b"compact" => parsed.compact = value.as_slice() == b"1",
            b"event" => {
                parsed.event = match value.as_slice() {
                    b"started" => Some(AnnounceEvent::Started),
                    b"completed" => Some(AnnounceEvent::Completed),
                    b"stopped" => Some(AnnounceEvent::Stopped),
                    _ => None,
                }
            }
            b"ip" => parsed.ip = Some(text_of(&value)),
            _ => {}
        }
    }
    parsed.peer.info_hash = info_hash.ok_or_else(|| bad("missing info_hash"))?;
    parsed.peer.peer_id = peer_id.ok_or_else(|| bad("missing peer_id"))?;
    parsed.peer.port = port
        .filter(|&p| p != 0)
        .ok_or_else(|| bad("missing or zero port"))?;
    parsed.totals.left = left.ok_or_else(|| bad("missing left"))?;
    Ok(parsed)
}

/// The info-hashes of `GET /scrape?info_hash=...&info_hash=...` (at most `MAX_SCRAPE_HASHES`).
pub fn parse_scrape_query(query: &str) -> Result<Vec<[u8; 20]>, TrackerError> {
    let mut hashes = Vec::new();
    for (name, value) in query_pairs(query) {
        if name.as_slice() == b"info_hash" && hashes.len() < MAX_SCRAPE_HASHES {
            hashes.push(id20("info_hash", &value)?);
        }
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn request(event: Option<AnnounceEvent>) -> AnnounceRequest {
        let mut info_hash = [0u8; 20];
        for (i, b) in info_hash.iter_mut().enumerate() {
            *b = (i as u8) * 13; // includes 0x00, '+', '&', '=', high bytes
        }
        info_hash[1] = b'+';
        info_hash[2] = b'&';
        info_hash[3] = b'=';
        info_hash[4] = b'%';
        AnnounceRequest {
            peer: SwarmPeer {
                info_hash,
                peer_id: *b"-SF0100-abcdefghijkl",
                port: 6881,
            },
            totals: TransferTotals {
                uploaded: 1,
                downloaded: 2,
                left: 3,
            },
            event,
            numwant: 50,
        }
    }

    #[test]
    fn announce_url_appends_with_question_mark_or_ampersand() {
        let req = request(Some(AnnounceEvent::Started));
        let url = announce_url("http://tracker.example:6969/announce", &req).unwrap();
        assert!(url.starts_with("http://tracker.example:6969/announce?info_hash=%00%2B%26%3D%25"));
        assert!(url.contains("&peer_id=-SF0100-abcdefghijkl&port=6881"));
        assert!(url.contains("&uploaded=1&downloaded=2&left=3&compact=1&numwant=50"));
        assert!(url.ends_with("&event=started"));

        let url = announce_url("https://t.example/announce.php?passkey=abc#frag", &req).unwrap();
        assert!(url.starts_with("https://t.example/announce.php?passkey=abc&info_hash="));
        assert!(!url.contains('#'));
        let url = announce_url("http://t.example/a?", &request(None)).unwrap();
        assert!(url.starts_with("http://t.example/a?info_hash="));
        assert!(!url.contains("event="));
    }

    #[test]
    fn announce_url_round_trips_through_the_server_parser() {
        let req = request(Some(AnnounceEvent::Completed));
        let url = announce_url("http://127.0.0.1:1/announce", &req).unwrap();
        let query = url.split_once('?').unwrap().1;
        let parsed = parse_announce_query(query).unwrap();
        assert_eq!(parsed.peer, req.peer);
        assert_eq!(parsed.totals, req.totals);
        assert_eq!(parsed.event, Some(AnnounceEvent::Completed));
        assert_eq!(parsed.numwant, Some(50));
        assert!(parsed.compact);
        assert_eq!(parsed.ip, None);
    }

    #[test]
    fn announce_url_rejects_non_http() {
        let req = request(None);
        assert!(matches!(
            announce_url("udp://tracker.example:80", &req),
            Err(TrackerError::UnsupportedScheme(s)) if s == "udp"
        ));
        assert!(matches!(
            announce_url("not a url", &req),
            Err(TrackerError::InvalidUrl(_))
        ));
    }

    #[test]
    fn scrape_url_follows_the_announce_convention() {
        let hash = [0xABu8; 20];
        let url = scrape_url("http://t.example:6969/announce", &[hash]).unwrap();
        assert_eq!(
            url,
            format!(
                "http://t.example:6969/scrape?info_hash={}",
                "%AB".repeat(20)
            )
        );
        let url = scrape_url("http://t.example/x/announce.php?pk=1", &[hash, hash]).unwrap();
        assert!(url.starts_with("http://t.example/x/scrape.php?pk=1&info_hash=%AB"));
        assert_eq!(url.matches("info_hash=").count(), 2);
        assert!(matches!(
            scrape_url("http://t.example/a", &[hash]),
            Err(TrackerError::NoScrape(_))
        ));
    }

    #[test]
    fn parses_opentracker_compact_response() {
        let resp = parse_announce_response(&fixture("tracker_opentracker_compact.bin")).unwrap();
        assert_eq!(resp.interval, 1666);
        assert_eq!(resp.min_interval, Some(833));
        assert_eq!(resp.complete, Some(1));
        assert_eq!(resp.incomplete, Some(1));
        assert_eq!(resp.warning, None);
        assert_eq!(
            resp.peers,
            vec![addr("127.0.0.1:1111"), addr("127.0.0.1:2222")]
        );
    }

    #[test]
    fn parses_dictionary_peers_skipping_unusable_entries() {
        let resp = parse_announce_response(&fixture("tracker_dict_peers.bin")).unwrap();
        assert_eq!(resp.interval, 1800);
        assert_eq!(resp.min_interval, None);
        // The host-name entry and the port-0 entry are skipped.
        assert_eq!(resp.peers, vec![addr("127.0.0.1:6881"), addr("[::1]:6882")]);
    }

    #[test]
    fn parses_peers6_and_warning() {
        let resp = parse_announce_response(&fixture("tracker_peers6.bin")).unwrap();
        assert_eq!(
            resp,
            AnnounceResponse {
                interval: 1800,
                min_interval: Some(60),
                peers: vec![addr("127.0.0.1:6881"), addr("[::1]:6882")],
                complete: Some(2),
                incomplete: Some(1),
                warning: Some("test warning".into()),
            }
        );
    }

    #[test]
    fn failure_reason_becomes_failure() {
        let err = parse_announce_response(&fixture("tracker_opentracker_failure.bin")).unwrap_err();
        assert_eq!(
            err,
            TrackerError::Failure(
                "Requested download is not authorized for use with this tracker.".into()
            )
        );
        let err = parse_scrape_response(&encode_failure("nope")).unwrap_err();
        assert_eq!(err, TrackerError::Failure("nope".into()));
    }

    #[test]
    fn parses_opentracker_scrape() {
        let resp = parse_scrape_response(&fixture("tracker_opentracker_scrape.bin")).unwrap();
        let hash: [u8; 20] = hex::decode("0123456789abcdef0123456789abcdef01234567")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(resp.files.len(), 1);
        assert_eq!(
            resp.files[&hash],
            ScrapeStats {
                complete: 1,
                downloaded: 0,
                incomplete: 1
            }
        );
    }

    #[test]
    fn announce_response_round_trips() {
        let resp = AnnounceResponse {
            interval: 30,
            min_interval: Some(5),
            peers: vec![
                addr("127.0.0.1:6881"),
                addr("[::1]:6882"),
                addr("10.1.2.3:65535"),
            ],
            complete: Some(3),
            incomplete: Some(0),
            warning: None,
        };
        let bytes = encode_announce_response(&resp);
        assert!(bytes.starts_with(b"d8:completei3e10:incompletei0e8:intervali30e"));
        let back = parse_announce_response(&bytes).unwrap();
        assert_eq!(
            back.peers,
            vec![
                addr("127.0.0.1:6881"),
                addr("10.1.2.3:65535"),
                addr("[::1]:6882")
            ]
        );
        assert_eq!(back.interval, 30);
        assert_eq!(back.min_interval, Some(5));

        let empty = AnnounceResponse {
            interval: 1,
            min_interval: None,
            peers: vec![],
            complete: None,
            incomplete: None,
            warning: None,
        };
        assert_eq!(
            encode_announce_response(&empty),
            b"d8:intervali1e5:peers0:e"
        );
        assert_eq!(
            parse_announce_response(b"d8:intervali1e5:peers0:e").unwrap(),
            empty
        );
    }

    #[test]
    fn scrape_response_round_trips() {
        let mut resp = ScrapeResponse::default();
        resp.files.insert(
            [7; 20],
            ScrapeStats {
                complete: 1,
                downloaded: 2,
                incomplete: 3,
            },
        );
        resp.files.insert([9; 20], ScrapeStats::default());
        assert_eq!(
            parse_scrape_response(&encode_scrape_response(&resp)).unwrap(),
            resp
        );
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"d",
            b"e",
            b"i5e",
            b"le",
            b"d8:intervale",
            b"d8:intervali-5ee",
            b"d8:interval3:abce",
            b"d8:intervali10e5:peers5:abcdee",
            b"d8:intervali10e6:peers617:aaaaaaaaaaaaaaaaae",
            b"d8:intervali10e5:peersi3ee",
            b"d8:intervali99999999999999999999999ee",
            b"d8:intervali10e5:peers99999999999999999999:e",
            b"d8:intervali10e5:peers18446744073709551615:e",
            b"d14:failure reasoni1ee",
            b"<html>not bencode</html>",
            b"d5:peers",
            b"3:abc",
        ];
        for case in cases {
            assert!(
                parse_announce_response(case).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(case)
            );
            let _ = parse_scrape_response(case);
        }
        let deep = [vec![b'l'; 100_000], vec![b'e'; 100_000]].concat();
        assert!(parse_announce_response(&deep).is_err());
        let deep_dict = [b"d8:intervali1e1:x".to_vec(), vec![b'l'; 100_000]].concat();
        assert!(parse_announce_response(&deep_dict).is_err());
        // Every prefix of a valid response fails cleanly.
        let good = fixture("tracker_peers6.bin");
        for len in 0..good.len() {
            assert!(parse_announce_response(&good[..len]).is_err());
        }
    }

    #[test]
    fn large_intervals_saturate() {
        let resp = parse_announce_response(b"d8:intervali99999999999e5:peers0:e").unwrap();
        assert_eq!(resp.interval, u32::MAX);
    }

    #[test]
    fn announce_query_parsing() {
        let q = parse_announce_query(
            "info_hash=%01%23Eg%89%AB%CD%EF%01%23Eg%89%AB%CD%EF%01%23Eg&peer_id=-XX0000-000000000000\
             &port=1111&uploaded=0&downloaded=0&left=5&compact=1&event=started&ip=127.0.0.2&numwant=7",
        )
        .unwrap();
        assert_eq!(
            hex::encode(q.peer.info_hash),
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(&q.peer.peer_id, b"-XX0000-000000000000");
        assert_eq!(q.peer.port, 1111);
        assert_eq!(q.totals.left, 5);
        assert_eq!(q.event, Some(AnnounceEvent::Started));
        assert_eq!(q.ip.as_deref(), Some("127.0.0.2"));
        assert_eq!(q.numwant, Some(7));
        assert!(q.compact);

        let base = format!(
            "info_hash={}&peer_id={}&left=0",
            "%AA".repeat(20),
            "%BB".repeat(20)
        );
        assert!(parse_announce_query(&format!("{base}&port=1&event=paused"))
            .unwrap()
            .event
            .is_none());
        for bad in [
            base.clone(),
            format!("{base}&port=0"),
            format!("{base}&port=70000"),
            format!("{base}&port=1&uploaded=-1"),
            format!("{base}&port=1&info_hash=%AA"),
            "port=1&left=0".to_string(),
            "%%%&&&==".to_string(),
        ] {
            assert!(
                matches!(parse_announce_query(&bad), Err(TrackerError::BadRequest(_))),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn scrape_query_parsing() {
        let q = format!(
            "info_hash={}&info_hash={}",
            "%01".repeat(20),
            "%02".repeat(20)
        );
        assert_eq!(parse_scrape_query(&q).unwrap(), vec![[1; 20], [2; 20]]);
        assert_eq!(parse_scrape_query("").unwrap(), Vec::<[u8; 20]>::new());
        assert!(parse_scrape_query("info_hash=abc").is_err());
        let many = vec![format!("info_hash={}", "%01".repeat(20)); 1000].join("&");
        assert!(parse_scrape_query(&many).unwrap().len() <= MAX_SCRAPE_HASHES);
    }
}
