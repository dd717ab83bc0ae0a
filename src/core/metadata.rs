//! Metadata exchange (BEP 9, `ut_metadata`): the message codec, and the assembly of an info
//! dictionary from 16 KiB pieces fetched from several peers at once.
//!
//! The assembly hands out pieces to peers (one piece to one peer at a time), takes a piece back
//! when its peer rejects it, leaves, or does not answer within the request timeout, and checks
//! the whole dictionary against the info-hash once every piece is in. A mismatch starts over
//! and names the peers that contributed, so the caller can stop asking them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::core::bencode::{self, Owned};
use crate::core::metainfo::InfoHash;

/// The extension's name in the BEP 10 handshake.
pub const EXTENSION_NAME: &str = "ut_metadata";
/// Metadata travels in pieces of this size (the last one may be shorter).
pub const METADATA_PIECE_LEN: usize = 16 * 1024;
/// Largest info dictionary we accept from a peer's `metadata_size`; real ones are at most a
/// few MiB (a 1 TiB torrent of 256 KiB pieces has 80 MiB of hashes, so allow for that).
pub const MAX_METADATA_SIZE: u64 = 96 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("malformed ut_metadata message: {0}")]
    Malformed(&'static str),
    #[error("metadata size {0} is out of range (1 byte to {MAX_METADATA_SIZE} bytes)")]
    BadSize(u64),
    #[error("peer says the metadata is {theirs} bytes; we are assembling {ours}")]
    SizeMismatch { ours: u64, theirs: u64 },
    #[error("metadata piece {piece} has {got} bytes; expected {expected}")]
    BadPieceLength {
        piece: u32,
        got: usize,
        expected: usize,
    },
    #[error("metadata piece {0} is past the end")]
    PieceOutOfRange(u32),
}

/// One `ut_metadata` message (the payload of an extended message, after its id byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataMessage {
    Request {
        piece: u32,
    },
    /// `total_size` is the whole dictionary's size; `data` follows the bencoded header.
    Data {
        piece: u32,
        total_size: u64,
        data: Vec<u8>,
    },
    Reject {
        piece: u32,
    },
}

const MSG_REQUEST: i64 = 0;
const MSG_DATA: i64 = 1;
const MSG_REJECT: i64 = 2;

impl MetadataMessage {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, piece, total_size) = match self {
            MetadataMessage::Request { piece } => (MSG_REQUEST, piece, None),
            MetadataMessage::Data {
                piece, total_size, ..
            } => (MSG_DATA, piece, Some(*total_size)),
            MetadataMessage::Reject { piece } => (MSG_REJECT, piece, None),
        };
        let mut header = vec![
            ("msg_type", Owned::Int(kind)),
            ("piece", Owned::Int(i64::from(*piece))),
        ];
        if let Some(size) = total_size {
            header.push(("total_size", Owned::Int(size as i64)));
        }
        let mut out = bencode::dict(header).encode();
        if let MetadataMessage::Data { data, .. } = self {
            out.extend_from_slice(data);
        }
        out
    }

    /// Decodes a message. Unknown message types are errors (BEP 9 says to ignore them; the
    /// caller does, by dropping the error, so a violation is still visible in logs).
    pub fn decode(payload: &[u8]) -> Result<MetadataMessage, MetadataError> {
        let (header, used) =
            bencode::decode_prefix(payload).map_err(|_| MetadataError::Malformed("bad bencode"))?;
        if header.as_dict().is_none() {
            return Err(MetadataError::Malformed("not a dictionary"));
        }
        let int = |key: &str| header.get(key).and_then(|n| n.as_int());
        let kind = int("msg_type").ok_or(MetadataError::Malformed("no msg_type"))?;
        let piece = int("piece")
            .and_then(|p| u32::try_from(p).ok())
            .ok_or(MetadataError::Malformed("no valid piece"))?;
        let rest = &payload[used..];
        match kind {
            MSG_REQUEST | MSG_REJECT if !rest.is_empty() => {
                Err(MetadataError::Malformed("trailing data"))
            }
            MSG_REQUEST => Ok(MetadataMessage::Request { piece }),
            MSG_REJECT => Ok(MetadataMessage::Reject { piece }),
            MSG_DATA => {
                let total_size = int("total_size")
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or(MetadataError::Malformed("data without a valid total_size"))?;
                if rest.len() > METADATA_PIECE_LEN {
                    return Err(MetadataError::Malformed("data longer than a piece"));
                }
                Ok(MetadataMessage::Data {
                    piece,
                    total_size,
                    data: rest.to_vec(),
                })
            }
            _ => Err(MetadataError::Malformed("unknown msg_type")),
        }
    }
}

/// How many pieces metadata of `size` bytes takes.
pub fn piece_count(size: u64) -> u32 {
    size.div_ceil(METADATA_PIECE_LEN as u64) as u32
}

/// The answer to a peer's request for `piece` of our info dictionary `info_bytes`.
pub fn answer_request(info_bytes: &[u8], piece: u32) -> MetadataMessage {
    let start = piece as usize * METADATA_PIECE_LEN;
    match info_bytes.get(start..) {
        Some(rest) if !rest.is_empty() => MetadataMessage::Data {
            piece,
            total_size: info_bytes.len() as u64,
            data: rest[..rest.len().min(METADATA_PIECE_LEN)].to_vec(),
        },
        _ => MetadataMessage::Reject { piece },
    }
}

/// Who is asked for metadata: the caller's own peer ids (connection numbers).
pub type PeerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    Requested { peer: PeerId, at: Instant },
    Have { peer: PeerId },
}

/// What a piece's arrival led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// More pieces are needed.
    Incomplete,
    /// Every piece is in and the SHA-1 matches: the exact info dictionary.
    Complete(Vec<u8>),
    /// Every piece is in but the SHA-1 does not match; the assembly starts over. These peers
    /// sent pieces of it (at least one of them lied).
    Corrupt(Vec<PeerId>),
}

/// The info dictionary being put together.
#[derive(Debug)]
pub struct MetadataAssembly {
    info_hash: InfoHash,
    request_timeout: Duration,
    /// Chosen from the first peer that offers a valid size; cleared when an attempt fails.
    size: Option<u64>,
    slots: Vec<Slot>,
    buf: Vec<u8>,
}

impl MetadataAssembly {
    pub fn new(info_hash: InfoHash, request_timeout: Duration) -> Self {
        MetadataAssembly {
            info_hash,
            request_timeout,
            size: None,
            slots: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// A peer's extension handshake said `metadata_size`. The first valid size is the one we
    /// assemble; a peer that disagrees with it cannot help (until an attempt fails).
    pub fn peer_offers(&mut self, size: u64) -> Result<(), MetadataError> {
        if size == 0 || size > MAX_METADATA_SIZE {
            return Err(MetadataError::BadSize(size));
        }
        match self.size {
            Some(ours) if ours != size => Err(MetadataError::SizeMismatch { ours, theirs: size }),
            Some(_) => Ok(()),
            None => {
                self.size = Some(size);
                self.slots = vec![Slot::Missing; piece_count(size) as usize];
                self.buf = vec![0; size as usize];
                Ok(())
            }
        }
    }

    /// The size being assembled, once a peer offered one.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The next piece to ask `peer` for: a missing one, or one whose peer has not answered
    /// within the request timeout (that request is taken over).
    pub fn next_request(&mut self, peer: PeerId, now: Instant) -> Option<u32> {
        let timeout = self.request_timeout;
        let index = self.slots.iter().position(|s| match *s {
            Slot::Missing => true,
            Slot::Requested { peer: p, at } => {
                p != peer && now.saturating_duration_since(at) >= timeout
            }
            Slot::Have { .. } => false,
        })?;
        self.slots[index] = Slot::Requested { peer, at: now };
        Some(index as u32)
    }

    /// `peer` answered `piece` with data.
    pub fn piece_arrived(
        &mut self,
        peer: PeerId,
        piece: u32,
        total_size: u64,
        data: &[u8],
    ) -> Result<Arrival, MetadataError> {
        let size = self.size.ok_or(MetadataError::PieceOutOfRange(piece))?;
        if total_size != size {
            return Err(MetadataError::SizeMismatch {
                ours: size,
                theirs: total_size,
            });
        }
        let slot = self
            .slots
            .get(piece as usize)
            .copied()
            .ok_or(MetadataError::PieceOutOfRange(piece))?;
        let start = piece as usize * METADATA_PIECE_LEN;
        let expected = (size as usize - start).min(METADATA_PIECE_LEN);
        if data.len() != expected {
            return Err(MetadataError::BadPieceLength {
                piece,
                got: data.len(),
                expected,
            });
        }
        if matches!(slot, Slot::Have { .. }) {
            return Ok(Arrival::Incomplete); // a late duplicate
        }
        self.buf[start..start + expected].copy_from_slice(data);
        self.slots[piece as usize] = Slot::Have { peer };
        if self.slots.iter().any(|s| !matches!(s, Slot::Have { .. })) {
            return Ok(Arrival::Incomplete);
        }
        if InfoHash::of_info(&self.buf) == self.info_hash {
            self.slots.clear();
            self.size = None;
            return Ok(Arrival::Complete(std::mem::take(&mut self.buf)));
        }
        let contributors: HashSet<PeerId> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Have { peer } => Some(*peer),
                _ => None,
            })
            .collect();
        self.slots.clear();
        self.buf = Vec::new();
        self.size = None;
        let mut contributors: Vec<PeerId> = contributors.into_iter().collect();
        contributors.sort_unstable();
        Ok(Arrival::Corrupt(contributors))
    }

    /// `peer` rejected `piece`: someone else may have it.
    pub fn rejected(&mut self, peer: PeerId, piece: u32) {
        if let Some(slot) = self.slots.get_mut(piece as usize) {
            if matches!(*slot, Slot::Requested { peer: p, .. } if p == peer) {
                *slot = Slot::Missing;
            }
        }
    }

    /// `peer` is gone: its outstanding requests go back to the pool.
    pub fn peer_gone(&mut self, peer: PeerId) {
        for slot in &mut self.slots {
            if matches!(*slot, Slot::Requested { peer: p, .. } if p == peer) {
                *slot = Slot::Missing;
            }
        }
    }

    /// Pieces in hand and pieces in all (0 of 0 before any peer offered a size).
    pub fn progress(&self) -> (u32, u32) {
        let have = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Have { .. }))
            .count();
        (have as u32, self.slots.len() as u32)
    }
}

/// A .torrent file around fetched info bytes (kept exactly, so its info-hash is the magnet's),
/// with the magnet's trackers as one tier each.
pub fn torrent_file(info_bytes: &[u8], trackers: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(info_bytes.len() + 256);
    out.push(b'd');
    if let Some(first) = trackers.first() {
        Owned::str("announce").encode_into(&mut out);
        Owned::str(first).encode_into(&mut out);
        Owned::str("announce-list").encode_into(&mut out);
        Owned::List(
            trackers
                .iter()
                .map(|t| Owned::List(vec![Owned::str(t)]))
                .collect(),
        )
        .encode_into(&mut out);
    }
    Owned::str("info").encode_into(&mut out);
    out.extend_from_slice(info_bytes);
    out.push(b'e');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metainfo::Metainfo;

    fn info_of(len: usize) -> Vec<u8> {
        // A valid-looking info dict of about `len` bytes (pieces padded with a long name).
        let name = "n".repeat(len.saturating_sub(60).max(1));
        format!(
            "d6:lengthi1e4:name{}:{}12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae",
            name.len(),
            name
        )
        .into_bytes()
    }

    fn assembly_for(info: &[u8]) -> MetadataAssembly {
        let mut a = MetadataAssembly::new(InfoHash::of_info(info), Duration::from_secs(10));
        a.peer_offers(info.len() as u64).unwrap();
        a
    }

    fn piece(info: &[u8], i: u32) -> &[u8] {
        let s = i as usize * METADATA_PIECE_LEN;
        &info[s..(s + METADATA_PIECE_LEN).min(info.len())]
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            MetadataMessage::Request { piece: 3 },
            MetadataMessage::Reject { piece: 0 },
            MetadataMessage::Data {
                piece: 1,
                total_size: 20000,
                data: vec![7; 3616],
            },
        ] {
            assert_eq!(MetadataMessage::decode(&m.encode()), Ok(m));
        }
        assert_eq!(
            MetadataMessage::Request { piece: 2 }.encode(),
            b"d8:msg_typei0e5:piecei2ee"
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"le",
            b"d8:msg_typei0ee",
            b"d5:piecei0ee",
            b"d8:msg_typei9e5:piecei0ee",
            b"d8:msg_typei0e5:piecei-1ee",
            b"d8:msg_typei0e5:piecei4294967296ee",
            b"d8:msg_typei0e5:piecei0eexx",
            b"d8:msg_typei1e5:piecei0ee",
            b"d8:msg_typei1e5:piecei0e10:total_sizei-5ee",
            b"d8:msg_type1:05:piecei0ee",
            b"d8:msg_typei0e5:piece",
        ];
        for case in cases {
            assert!(
                MetadataMessage::decode(case).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        let mut long = b"d8:msg_typei1e5:piecei0e10:total_sizei99999ee".to_vec();
        long.extend(vec![0; METADATA_PIECE_LEN + 1]);
        assert!(MetadataMessage::decode(&long).is_err());
    }

    #[test]
    fn random_mutations_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let seeds = [
            MetadataMessage::Request { piece: 1 }.encode(),
            MetadataMessage::Data {
                piece: 0,
                total_size: 40,
                data: vec![1; 40],
            }
            .encode(),
        ];
        let mut a = MetadataAssembly::new(InfoHash([0; 20]), Duration::from_secs(1));
        a.peer_offers(40).unwrap();
        for _ in 0..20_000 {
            let seed = &seeds[rng.gen_range(0..seeds.len())];
            let m = crate::core::mutate::mutate(&mut rng, seed);
            if let Ok(MetadataMessage::Data {
                piece,
                total_size,
                data,
            }) = MetadataMessage::decode(&m)
            {
                let _ = a.piece_arrived(1, piece, total_size, &data);
            }
        }
    }

    #[test]
    fn pieces_from_two_peers_assemble_and_verify() {
        let info = info_of(40_000); // three pieces
        let mut a = assembly_for(&info);
        let now = Instant::now();
        assert_eq!(a.next_request(1, now), Some(0));
        assert_eq!(a.next_request(2, now), Some(1));
        assert_eq!(a.next_request(1, now), Some(2));
        assert_eq!(a.next_request(2, now), None, "everything is asked for");
        let len = info.len() as u64;
        assert_eq!(
            a.piece_arrived(2, 1, len, piece(&info, 1)),
            Ok(Arrival::Incomplete)
        );
        assert_eq!(
            a.piece_arrived(1, 2, len, piece(&info, 2)),
            Ok(Arrival::Incomplete)
        );
        assert_eq!(a.progress(), (2, 3));
        assert_eq!(
            a.piece_arrived(1, 0, len, piece(&info, 0)),
            Ok(Arrival::Complete(info.clone()))
        );
    }

    #[test]
    fn rejected_and_abandoned_pieces_go_to_other_peers() {
        let info = info_of(20_000);
        let mut a = assembly_for(&info);
        let now = Instant::now();
        assert_eq!(a.next_request(1, now), Some(0));
        assert_eq!(a.next_request(1, now), Some(1));
        a.rejected(2, 0); // not 2's request: no effect
        assert_eq!(a.next_request(2, now), None);
        a.rejected(1, 0);
        assert_eq!(a.next_request(2, now), Some(0));
        a.peer_gone(1);
        assert_eq!(a.next_request(3, now), Some(1));
    }

    #[test]
    fn a_silent_peer_loses_its_piece_after_the_timeout() {
        let info = info_of(100);
        let mut a = assembly_for(&info);
        let t0 = Instant::now();
        assert_eq!(a.next_request(1, t0), Some(0));
        assert_eq!(a.next_request(2, t0 + Duration::from_secs(9)), None);
        assert_eq!(a.next_request(2, t0 + Duration::from_secs(10)), Some(0));
        // 1's late answer still counts.
        assert_eq!(
            a.piece_arrived(1, 0, info.len() as u64, &info),
            Ok(Arrival::Complete(info.clone()))
        );
    }

    #[test]
    fn sizes_and_lengths_are_checked() {
        let info = info_of(20_000);
        let mut a = MetadataAssembly::new(InfoHash::of_info(&info), Duration::from_secs(10));
        assert_eq!(a.peer_offers(0), Err(MetadataError::BadSize(0)));
        assert!(a.peer_offers(MAX_METADATA_SIZE + 1).is_err());
        a.peer_offers(info.len() as u64).unwrap();
        assert!(matches!(
            a.peer_offers(5),
            Err(MetadataError::SizeMismatch { .. })
        ));
        let len = info.len() as u64;
        assert!(a.piece_arrived(1, 2, len, b"x").is_err(), "past the end");
        assert!(a.piece_arrived(1, 1, len + 1, piece(&info, 1)).is_err());
        assert!(a.piece_arrived(1, 0, len, &info[..100]).is_err(), "short");
        assert_eq!(a.progress(), (0, 2));
    }

    #[test]
    fn a_corrupt_assembly_names_its_contributors_and_starts_over() {
        let info = info_of(20_000);
        let mut a = assembly_for(&info);
        let len = info.len() as u64;
        let now = Instant::now();
        a.next_request(4, now);
        a.next_request(7, now);
        let mut bad = piece(&info, 1).to_vec();
        bad[0] ^= 1;
        assert_eq!(
            a.piece_arrived(4, 0, len, piece(&info, 0)),
            Ok(Arrival::Incomplete)
        );
        assert_eq!(
            a.piece_arrived(7, 1, len, &bad),
            Ok(Arrival::Corrupt(vec![4, 7]))
        );
        assert_eq!(a.size(), None);
        assert_eq!(a.progress(), (0, 0));
        a.peer_offers(len).unwrap();
        assert_eq!(a.next_request(4, now), Some(0));
    }

    #[test]
    fn requests_are_answered_from_the_info_bytes() {
        let info = info_of(20_000);
        let MetadataMessage::Data {
            piece: 1,
            total_size,
            data,
        } = answer_request(&info, 1)
        else {
            panic!("expected data");
        };
        assert_eq!(total_size, info.len() as u64);
        assert_eq!(data, piece(&info, 1));
        assert_eq!(
            answer_request(&info, 2),
            MetadataMessage::Reject { piece: 2 }
        );
        assert_eq!(
            answer_request(&info, u32::MAX),
            MetadataMessage::Reject { piece: u32::MAX }
        );
    }

    #[test]
    fn the_torrent_file_keeps_the_info_bytes() {
        let info = info_of(500);
        let file = torrent_file(&info, &["http://127.0.0.1:1/announce".into()]);
        let meta = Metainfo::from_bytes(&file).unwrap();
        assert_eq!(meta.info_hash, InfoHash::of_info(&info));
        assert_eq!(meta.trackers(), vec![vec!["http://127.0.0.1:1/announce"]]);
        let bare = Metainfo::from_bytes(&torrent_file(&info, &[])).unwrap();
        assert_eq!(bare.info_bytes, info);
    }
}
