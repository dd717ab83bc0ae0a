//! Magnet URIs (BEP 9): `magnet:?xt=urn:btih:<hash>&dn=<name>&tr=<tracker>&x.pe=<host:port>`.
//!
//! The info-hash comes as 40 hex digits or 32 base32 characters (either case). `tr` and `x.pe`
//! may repeat (also as `tr.1`, `tr.2`, ...). Values are percent-decoded; in `dn` a `+` is a
//! space, as web forms write it. Parameters we do not know are ignored; malformed ones we do
//! know are errors. Links that carry only a v2 hash (`urn:btmh:`) are refused for now.

use std::net::SocketAddr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::core::metainfo::InfoHash;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Magnet {
    pub info_hash: InfoHash,
    /// `dn`: a name to show until the metadata arrives.
    pub display_name: Option<String>,
    /// `tr`, in order, without duplicates.
    pub trackers: Vec<String>,
    /// `x.pe`: peers to try directly.
    pub peers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MagnetError {
    #[error("not a magnet link (expected 'magnet:?...')")]
    NotAMagnet,
    #[error("magnet link has no BitTorrent info-hash (xt=urn:btih:...)")]
    MissingInfoHash,
    #[error("bad info-hash {0:?}: expected 40 hex digits or 32 base32 characters")]
    BadInfoHash(String),
    #[error("magnet link has two different info-hashes")]
    ConflictingInfoHashes,
    #[error(
        "magnet link has only a v2 info-hash (urn:btmh); v2-only torrents are not supported yet"
    )]
    V2Only,
    #[error("bad peer address {0:?} in x.pe (expected IPv4:port or [IPv6]:port)")]
    BadPeer(String),
    #[error("parameter {0:?} is not of the form key=value")]
    MalformedParameter(String),
    #[error("value of '{0}' is not valid UTF-8 after percent-decoding")]
    BadEncoding(String),
}

impl Magnet {
    pub fn parse(uri: &str) -> Result<Magnet, MagnetError> {
        let uri = uri.trim();
        let query = uri
            .get(..8)
            .filter(|p| p.eq_ignore_ascii_case("magnet:?"))
            .and_then(|_| uri.get(8..))
            .ok_or(MagnetError::NotAMagnet)?;
        let mut info_hash: Option<InfoHash> = None;
        let mut saw_v2 = false;
        let mut display_name = None;
        let mut trackers: Vec<String> = Vec::new();
        let mut peers = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = param
                .split_once('=')
                .ok_or_else(|| MagnetError::MalformedParameter(param.to_string()))?;
            // `tr.1`, `xt.2`: numbered forms of the same parameter.
            let base = match key.split_once('.') {
                Some((b, n)) if n.bytes().all(|c| c.is_ascii_digit()) && !n.is_empty() => b,
                _ => key,
            };
            let decode = |text: &str| {
                percent_decode_str(text)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| MagnetError::BadEncoding(key.to_string()))
            };
            match base {
                "xt" => {
                    let value = decode(raw)?;
                    let lower = value.to_ascii_lowercase();
                    if let Some(hash) = lower.strip_prefix("urn:btih:") {
                        let hash = parse_hash(&value[value.len() - hash.len()..])?;
                        if info_hash.is_some_and(|h| h != hash) {
                            return Err(MagnetError::ConflictingInfoHashes);
                        }
                        info_hash = Some(hash);
                    } else if lower.starts_with("urn:btmh:") {
                        saw_v2 = true;
                    }
                }
                "dn" => display_name = Some(decode(&raw.replace('+', " "))?),
                "tr" => {
                    let tracker = decode(raw)?;
                    if !tracker.is_empty() && !trackers.contains(&tracker) {
                        trackers.push(tracker);
                    }
                }
                "x.pe" => {
                    let text = decode(raw)?;
                    let peer = text
                        .parse::<SocketAddr>()
                        .map_err(|_| MagnetError::BadPeer(text.clone()))?;
                    if !peers.contains(&peer) {
                        peers.push(peer);
                    }
                }
                _ => {}
            }
        }
        let info_hash = match info_hash {
            Some(h) => h,
            None if saw_v2 => return Err(MagnetError::V2Only),
            None => return Err(MagnetError::MissingInfoHash),
        };
        Ok(Magnet {
            info_hash,
            display_name,
            trackers,
            peers,
        })
    }

    /// The link as text (hex info-hash; values percent-encoded).
    pub fn to_uri(&self) -> String {
        const VALUE: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let mut out = format!("magnet:?xt=urn:btih:{}", self.info_hash.to_hex());
        if let Some(dn) = &self.display_name {
            out.push_str(&format!("&dn={}", utf8_percent_encode(dn, VALUE)));
        }
        for tr in &self.trackers {
            out.push_str(&format!("&tr={}", utf8_percent_encode(tr, VALUE)));
        }
        for pe in &self.peers {
            out.push_str(&format!(
                "&x.pe={}",
                utf8_percent_encode(&pe.to_string(), VALUE)
            ));
        }
        out
    }
}

fn parse_hash(text: &str) -> Result<InfoHash, MagnetError> {
    let bad = || MagnetError::BadInfoHash(text.to_string());
    match text.len() {
        40 => InfoHash::from_hex(text).ok_or_else(bad),
        32 => {
            let bytes = data_encoding::BASE32
                .decode(text.to_ascii_uppercase().as_bytes())
                .map_err(|_| bad())?;
            let hash: [u8; 20] = bytes.try_into().map_err(|_| bad())?;
            Ok(InfoHash(hash))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a";

    #[test]
    fn parses_hex_link_with_everything() {
        let m = Magnet::parse(&format!(
            "magnet:?xt=urn:btih:{}&dn=Big+Buck%20Bunny&tr=udp%3A%2F%2F127.0.0.1%3A6969&tr=http://127.0.0.1/a&tr.1=http://127.0.0.1/a&x.pe=127.0.0.1:6881&x.pe=[::1]:51413&foo=bar",
            HEX.to_uppercase()
        ))
        .unwrap();
        assert_eq!(m.info_hash.to_hex(), HEX);
        assert_eq!(m.display_name.as_deref(), Some("Big Buck Bunny"));
        assert_eq!(m.trackers, ["udp://127.0.0.1:6969", "http://127.0.0.1/a"]);
        assert_eq!(
            m.peers,
            [
                "127.0.0.1:6881".parse::<SocketAddr>().unwrap(),
                "[::1]:51413".parse().unwrap()
            ]
        );
        // Round trip through to_uri.
        assert_eq!(Magnet::parse(&m.to_uri()).unwrap(), m);
    }

    #[test]
    fn parses_base32_hash() {
        let hash = InfoHash::from_hex(HEX).unwrap();
        let b32 = data_encoding::BASE32.encode(&hash.0);
        assert_eq!(b32.len(), 32);
        let m = Magnet::parse(&format!("magnet:?xt=urn:btih:{b32}")).unwrap();
        assert_eq!(m.info_hash, hash);
        let m = Magnet::parse(&format!("MAGNET:?xt=URN:BTIH:{}", b32.to_lowercase())).unwrap();
        assert_eq!(m.info_hash, hash);
        assert!(m.display_name.is_none() && m.trackers.is_empty() && m.peers.is_empty());
    }

    #[test]
    fn hybrid_link_uses_btih() {
        let m = Magnet::parse(&format!(
            "magnet:?xt=urn:btmh:1220{}&xt=urn:btih:{HEX}",
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(m.info_hash.to_hex(), HEX);
    }

    #[test]
    fn malformed_links_give_specific_errors() {
        use MagnetError as E;
        let cases: &[(&str, E)] = &[
            ("http://example/", E::NotAMagnet),
            ("magnet:", E::NotAMagnet),
            ("", E::NotAMagnet),
            ("magnet:?dn=x", E::MissingInfoHash),
            ("magnet:?xt=urn:sha1:abc", E::MissingInfoHash),
            ("magnet:?xt=urn:btih:abc", E::BadInfoHash("abc".into())),
            (
                "magnet:?xt=urn:btih:zz2fe1c06bba254a9dc9f519b335aa7c1367a88a",
                E::BadInfoHash("zz2fe1c06bba254a9dc9f519b335aa7c1367a88a".into()),
            ),
            (
                "magnet:?xt=urn:btih:11111111111111111111111111111111",
                E::BadInfoHash("11111111111111111111111111111111".into()),
            ),
            ("magnet:?xt=urn:btmh:1220abcd", E::V2Only),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&xt=urn:btih:0000000000000000000000000000000000000000",
                E::ConflictingInfoHashes,
            ),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&x.pe=example.com:1",
                E::BadPeer("example.com:1".into()),
            ),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&x.pe=127.0.0.1",
                E::BadPeer("127.0.0.1".into()),
            ),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&x.pe=::1:80",
                E::BadPeer("::1:80".into()),
            ),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&dn",
                E::MalformedParameter("dn".into()),
            ),
            (
                "magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&dn=%FF",
                E::BadEncoding("dn".into()),
            ),
            ("magnet:?xt=urn:btih:%C3%A9", E::BadInfoHash("é".into())),
        ];
        for (uri, expected) in cases {
            assert_eq!(Magnet::parse(uri).as_ref(), Err(expected), "{uri}");
        }
    }
}
