//! Peer exchange (BEP 11, `ut_pex`): the message codec, and what one peer has been told, so each
//! message carries only the change since the last one (at most one a minute, bounded lists).
//! Private torrents (BEP 27) never offer it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::core::bencode::{self, Owned};
use crate::core::compact;

/// The extension's name in the BEP 10 handshake.
pub const EXTENSION_NAME: &str = "ut_pex";
/// At most one message per peer this often (BEP 11).
pub const PEX_INTERVAL: Duration = Duration::from_secs(60);
/// Added (and dropped) contacts we send in one message (BEP 11 says 50).
pub const MAX_SENT_PER_LIST: usize = 50;
/// Contacts per list we take from one message; the rest are ignored.
pub const MAX_ACCEPTED_PER_LIST: usize = 200;

/// Flag bits of an added contact.
pub const FLAG_SEED: u8 = 0x02;
/// We connected to it, so it accepts connections.
pub const FLAG_REACHABLE: u8 = 0x10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PexError {
    #[error("malformed ut_pex message: {0}")]
    Malformed(&'static str),
}

/// One `ut_pex` message: contacts added (with their flags) and dropped since the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PexMessage {
    pub added: Vec<(SocketAddr, u8)>,
    pub dropped: Vec<SocketAddr>,
}

impl PexMessage {
    pub fn encode(&self) -> Vec<u8> {
        let (mut added, mut added_f, mut added6, mut added6_f) = (vec![], vec![], vec![], vec![]);
        for (addr, flags) in &self.added {
            if addr.is_ipv4() {
                compact::encode_peer(addr, &mut added);
                added_f.push(*flags);
            } else {
                compact::encode_peer(addr, &mut added6);
                added6_f.push(*flags);
            }
        }
        let (mut dropped, mut dropped6) = (vec![], vec![]);
        for addr in &self.dropped {
            compact::encode_peer(
                addr,
                if addr.is_ipv4() {
                    &mut dropped
                } else {
                    &mut dropped6
                },
            );
        }
        bencode::dict([
            ("added", Owned::Bytes(added)),
            ("added.f", Owned::Bytes(added_f)),
            ("added6", Owned::Bytes(added6)),
            ("added6.f", Owned::Bytes(added6_f)),
            ("dropped", Owned::Bytes(dropped)),
            ("dropped6", Owned::Bytes(dropped6)),
        ])
        .encode()
    }

    /// Decodes a message, keeping at most `MAX_ACCEPTED_PER_LIST` contacts per list. Missing
    /// lists are empty; missing or short flags count as 0.
    pub fn decode(payload: &[u8]) -> Result<PexMessage, PexError> {
        let root = bencode::decode(payload).map_err(|_| PexError::Malformed("bad bencode"))?;
        if root.as_dict().is_none() {
            return Err(PexError::Malformed("not a dictionary"));
        }
        let bytes = |key: &str| -> Result<&[u8], PexError> {
            match root.get(key) {
                None => Ok(&[]),
                Some(n) => n
                    .as_bytes()
                    .ok_or(PexError::Malformed("a list is not a string")),
            }
        };
        let peers = |key: &str, ipv6: bool| -> Result<Vec<SocketAddr>, PexError> {
            compact::decode_peers(bytes(key)?, ipv6, MAX_ACCEPTED_PER_LIST)
                .map_err(|_| PexError::Malformed("bad compact peer list"))
        };
        let mut msg = PexMessage::default();
        for (list, flags, ipv6) in [("added", "added.f", false), ("added6", "added6.f", true)] {
            let flags = bytes(flags)?;
            for (i, addr) in peers(list, ipv6)?.into_iter().enumerate() {
                msg.added.push((addr, flags.get(i).copied().unwrap_or(0)));
            }
        }
        msg.dropped = peers("dropped", false)?;
        msg.dropped.extend(peers("dropped6", true)?);
        Ok(msg)
    }
}

/// What one peer has been told: the contacts it has heard added and not dropped.
#[derive(Debug, Default)]
pub struct PexSent {
    told: HashSet<SocketAddr>,
    last: Option<Instant>,
}

impl PexSent {
    /// The next message for this peer, given the contacts we are connected to now: `None`
    /// within a minute of the last one or when nothing changed.
    pub fn next(&mut self, connected: &[(SocketAddr, u8)], now: Instant) -> Option<PexMessage> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < PEX_INTERVAL)
        {
            return None;
        }
        let current: HashSet<SocketAddr> = connected.iter().map(|(a, _)| *a).collect();
        let mut msg = PexMessage::default();
        let mut seen = HashSet::new();
        for &(addr, flags) in connected {
            if msg.added.len() == MAX_SENT_PER_LIST {
                break;
            }
            if !self.told.contains(&addr) && seen.insert(addr) {
                msg.added.push((addr, flags));
            }
        }
        msg.dropped = self
            .told
            .iter()
            .filter(|a| !current.contains(a))
            .take(MAX_SENT_PER_LIST)
            .copied()
            .collect();
        msg.dropped.sort_unstable();
        if msg.added.is_empty() && msg.dropped.is_empty() {
            return None;
        }
        for a in &msg.dropped {
            self.told.remove(a);
        }
        self.told.extend(msg.added.iter().map(|(a, _)| *a));
        self.last = Some(now);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn messages_round_trip_with_both_families_and_flags() {
        let m = PexMessage {
            added: vec![
                // IPv4 contacts come first: they travel in their own list.
                (addr("127.0.0.2:6881"), FLAG_SEED | FLAG_REACHABLE),
                (addr("127.0.0.3:1"), 0),
                (addr("[::1]:7000"), 0),
            ],
            dropped: vec![addr("127.0.0.4:2"), addr("[::2]:3")],
        };
        assert_eq!(PexMessage::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn missing_fields_and_flags_are_tolerated_and_bad_ones_refused() {
        let m = PexMessage::decode(b"d5:added6:\x7f\x00\x00\x01\x1a\xe1e").unwrap();
        assert_eq!(m.added, vec![(addr("127.0.0.1:6881"), 0)]);
        assert!(m.dropped.is_empty());
        for bad in [
            &b""[..],
            b"le",
            b"d5:added5:12345e",
            b"d5:addedi1ee",
            b"d7:dropped6:123456",
            b"d5:added0:e trailing",
        ] {
            assert!(PexMessage::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_flood_of_contacts_is_cut_to_the_bound() {
        let many: Vec<u8> = (0..1000u32)
            .flat_map(|i| {
                let b = i.to_be_bytes();
                [127, b[1], b[2], b[3], 0, 1]
            })
            .collect();
        let payload = bencode::dict([("added", Owned::Bytes(many))]).encode();
        let m = PexMessage::decode(&payload).unwrap();
        assert_eq!(m.added.len(), MAX_ACCEPTED_PER_LIST);
    }

    #[test]
    fn random_mutations_never_panic() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let seed = PexMessage {
            added: vec![(addr("127.0.0.2:6881"), 2), (addr("[::1]:7000"), 0)],
            dropped: vec![addr("127.0.0.4:2")],
        }
        .encode();
        for _ in 0..20_000 {
            let m = crate::core::mutate::mutate(&mut rng, &seed);
            let _ = PexMessage::decode(&m);
        }
    }

    #[test]
    fn each_message_carries_the_change_at_most_once_a_minute() {
        let (a, b, c) = (
            addr("127.0.0.2:1"),
            addr("127.0.0.3:1"),
            addr("127.0.0.4:1"),
        );
        let mut sent = PexSent::default();
        let t0 = Instant::now();
        let first = sent.next(&[(a, 0), (b, FLAG_SEED)], t0).unwrap();
        assert_eq!(first.added, vec![(a, 0), (b, FLAG_SEED)]);
        assert!(first.dropped.is_empty());
        // Within the minute nothing is sent, whatever changed.
        assert_eq!(
            sent.next(&[(a, 0), (c, 0)], t0 + Duration::from_secs(59)),
            None
        );
        let second = sent.next(&[(a, 0), (c, 0)], t0 + PEX_INTERVAL).unwrap();
        assert_eq!(second.added, vec![(c, 0)]);
        assert_eq!(second.dropped, vec![b]);
        // No change: nothing to send, and the clock does not restart.
        assert_eq!(sent.next(&[(a, 0), (c, 0)], t0 + 3 * PEX_INTERVAL), None);
        let third = sent.next(&[(a, 0)], t0 + 3 * PEX_INTERVAL).unwrap();
        assert_eq!(third.dropped, vec![c]);
    }

    #[test]
    fn lists_are_bounded_and_the_rest_follows_later() {
        let peers: Vec<(SocketAddr, u8)> = (0..120u16)
            .map(|i| (SocketAddr::from(([127, 0, 0, 1], 1000 + i)), 0))
            .collect();
        let mut sent = PexSent::default();
        let t0 = Instant::now();
        assert_eq!(
            sent.next(&peers, t0).unwrap().added.len(),
            MAX_SENT_PER_LIST
        );
        assert_eq!(
            sent.next(&peers, t0 + PEX_INTERVAL).unwrap().added.len(),
            MAX_SENT_PER_LIST
        );
        let last = sent.next(&peers, t0 + 2 * PEX_INTERVAL).unwrap();
        assert_eq!(last.added.len(), 20);
        assert_eq!(
            sent.next(&[], t0 + 3 * PEX_INTERVAL).unwrap().dropped.len(),
            50
        );
    }
}
