//! Who sent corrupt data, and when to ban them.
//!
//! A piece that fails its hash check came from one address or from several. From one, that
//! address is to blame: a strike. From several, any of them may be, and striking them all lets
//! an attacker that mixes into an honest seeder's pieces get the honest seeder banned. So the
//! failed copy is kept as evidence (with who sent each block), and once the piece verifies, the
//! blocks that differ from the good copy name their senders; those who sent good blocks go free.
//!
//! Strikes and bans live on the address (the IP), not the connection or the peer id: a peer that
//! drops after each bad piece, or comes back under a fresh peer id, starts nothing afresh.

use std::net::IpAddr;
use std::num::NonZeroUsize;

use lru::LruCache;

/// Bad pieces (sent alone, or bad blocks proven against the good copy) that ban an address.
pub const STRIKES_TO_BAN: u32 = 3;

/// A piece as it was hashed: its bytes and who sent each block (`None`: nobody we know of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPiece {
    pub data: Vec<u8>,
    /// One entry per block of the piece, in order.
    pub senders: Vec<Option<IpAddr>>,
}

impl ReceivedPiece {
    /// The distinct addresses that sent blocks of it.
    fn distinct_senders(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.senders.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Strike counts by address and the evidence of failures that several addresses shared.
pub struct Blame {
    block_size: usize,
    strikes: LruCache<IpAddr, u32>,
    /// Failed copies of pieces that several addresses contributed to, by piece index.
    evidence: LruCache<u32, ReceivedPiece>,
    evidence_bytes: usize,
    max_evidence_bytes: usize,
}

impl Blame {
    /// Remembers strikes of at most `max_addrs` addresses and at most `max_evidence_bytes` of
    /// failed copies (the oldest go first; a piece whose evidence went blames nobody).
    pub fn new(block_size: usize, max_addrs: usize, max_evidence_bytes: usize) -> Blame {
        Blame {
            block_size: block_size.max(1),
            strikes: LruCache::new(NonZeroUsize::new(max_addrs).unwrap_or(NonZeroUsize::MIN)),
            evidence: LruCache::unbounded(),
            evidence_bytes: 0,
            max_evidence_bytes,
        }
    }

    pub fn strikes(&self, addr: IpAddr) -> u32 {
        self.strikes.peek(&addr).copied().unwrap_or(0)
    }

    /// Bytes of failed copies kept as evidence.
    pub fn evidence_bytes(&self) -> usize {
        self.evidence_bytes
    }

    /// A piece failed its hash check; returns the addresses this takes to the ban.
    pub fn piece_failed(&mut self, piece: u32, failed: ReceivedPiece) -> Vec<IpAddr> {
        match failed.distinct_senders().as_slice() {
            [] => Vec::new(),
            [only] => self.strike(&[*only]),
            _ => {
                self.drop_evidence(piece);
                if failed.data.len() <= self.max_evidence_bytes {
                    self.evidence_bytes += failed.data.len();
                    self.evidence.put(piece, failed);
                    while self.evidence_bytes > self.max_evidence_bytes {
                        match self.evidence.pop_lru() {
                            Some((_, old)) => self.evidence_bytes -= old.data.len(),
                            None => break,
                        }
                    }
                }
                Vec::new()
            }
        }
    }

    /// A piece verified: the blocks of its failed copy that differ name who sent them. Returns
    /// the addresses this takes to the ban.
    pub fn piece_verified(&mut self, piece: u32, good: &[u8]) -> Vec<IpAddr> {
        let Some(failed) = self.drop_evidence(piece) else {
            return Vec::new();
        };
        let mut guilty: Vec<IpAddr> = failed
            .data
            .chunks(self.block_size)
            .zip(good.chunks(self.block_size))
            .zip(&failed.senders)
            .filter(|((bad, ok), _)| bad != ok)
            .filter_map(|(_, sender)| *sender)
            .collect();
        guilty.sort_unstable();
        guilty.dedup();
        self.strike(&guilty)
    }

    fn drop_evidence(&mut self, piece: u32) -> Option<ReceivedPiece> {
        let old = self.evidence.pop(&piece)?;
        self.evidence_bytes -= old.data.len();
        Some(old)
    }

    /// One strike each; returns those that reach the ban with it (once, not on later strikes).
    fn strike(&mut self, addrs: &[IpAddr]) -> Vec<IpAddr> {
        let mut banned = Vec::new();
        for &a in addrs {
            let n = self.strikes.get(&a).copied().unwrap_or(0) + 1;
            self.strikes.put(a, n);
            if n == STRIKES_TO_BAN {
                banned.push(a);
            }
        }
        banned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 4;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn copy(data: &[u8], senders: &[u8]) -> ReceivedPiece {
        ReceivedPiece {
            data: data.to_vec(),
            senders: senders.iter().map(|&n| Some(ip(n))).collect(),
        }
    }

    #[test]
    fn an_address_that_sends_bad_pieces_alone_is_banned_at_the_third() {
        let mut b = Blame::new(BLOCK, 16, 1 << 20);
        assert!(b.piece_failed(0, copy(b"xxxxyyyy", &[2, 2])).is_empty());
        assert!(b.piece_failed(1, copy(b"xxxxyyyy", &[2, 2])).is_empty());
        assert_eq!(b.piece_failed(2, copy(b"xxxxyyyy", &[2, 2])), vec![ip(2)]);
        assert!(
            b.piece_failed(3, copy(b"xxxxyyyy", &[2, 2])).is_empty(),
            "banned once, not again"
        );
        assert_eq!(b.strikes(ip(2)), 4);
    }

    #[test]
    fn a_shared_failure_strikes_nobody_until_the_good_copy_names_the_sender() {
        let mut b = Blame::new(BLOCK, 16, 1 << 20);
        // Peer 2 sent the bad first block, honest peer 3 the good second one.
        assert!(b.piece_failed(7, copy(b"BADbgood", &[2, 3])).is_empty());
        assert_eq!((b.strikes(ip(2)), b.strikes(ip(3))), (0, 0));
        assert!(b.piece_verified(7, b"goodgood").is_empty());
        assert_eq!((b.strikes(ip(2)), b.strikes(ip(3))), (1, 0));
        assert_eq!(b.evidence_bytes(), 0, "settled evidence is dropped");
    }

    #[test]
    fn an_honest_address_mixed_into_every_bad_piece_is_never_banned() {
        let mut b = Blame::new(BLOCK, 16, 1 << 20);
        let mut banned = Vec::new();
        for piece in 0..20 {
            banned.extend(b.piece_failed(piece, copy(b"BADbgood", &[2, 3])));
            banned.extend(b.piece_verified(piece, b"goodgood"));
        }
        assert_eq!(banned, vec![ip(2)]);
        assert_eq!(b.strikes(ip(3)), 0);
    }

    #[test]
    fn strikes_outlive_reconnects_and_are_bounded_in_addresses() {
        let mut b = Blame::new(BLOCK, 2, 1 << 20);
        b.piece_failed(0, copy(b"xxxx", &[2]));
        b.piece_failed(1, copy(b"xxxx", &[3]));
        b.piece_failed(2, copy(b"xxxx", &[4]));
        assert_eq!(b.strikes(ip(2)), 0, "the oldest address is forgotten");
        assert_eq!((b.strikes(ip(3)), b.strikes(ip(4))), (1, 1));
    }

    #[test]
    fn evidence_is_bounded_in_bytes() {
        let mut b = Blame::new(BLOCK, 16, 16);
        for piece in 0..10 {
            b.piece_failed(piece, copy(b"BADbgood", &[2, 3]));
            assert!(b.evidence_bytes() <= 16);
        }
        assert_eq!(b.evidence_bytes(), 16);
        // Piece 0's evidence went: its verification blames nobody.
        assert!(b.piece_verified(0, b"goodgood").is_empty());
        assert_eq!(b.strikes(ip(2)), 0);
        b.piece_verified(9, b"goodgood");
        assert_eq!(b.strikes(ip(2)), 1);
    }

    #[test]
    fn a_piece_without_known_senders_blames_nobody() {
        let mut b = Blame::new(BLOCK, 16, 1 << 20);
        let orphan = ReceivedPiece {
            data: b"xxxx".to_vec(),
            senders: vec![None],
        };
        assert!(b.piece_failed(0, orphan).is_empty());
        assert_eq!(b.evidence_bytes(), 0);
    }
}
