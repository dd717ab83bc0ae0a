//! The in-memory store of verified pieces: an LRU bounded in bytes. Pieces an in-flight read needs
//! are pinned (a count, so overlapping reads compose) and never evicted; a pin may be taken before
//! the piece arrives. Eviction is reported to the caller, because an evicted piece we announced
//! must no longer be served to peers.
//!
//! The newest inserted piece is never evicted before the next insert: a budget smaller than one
//! piece, or a cache full of pinned pieces, must still let a read make progress. So the cache may
//! exceed its budget by pinned pieces plus that one piece.

use std::collections::HashMap;

use bytes::Bytes;
use lru::LruCache;

/// LRU of verified pieces bounded in bytes; pinned pieces are never evicted.
pub struct PieceCache {
    /// Most recently used first. Capacity is unbounded: the byte budget is enforced here.
    entries: LruCache<u32, Bytes>,
    /// Pin counts; an entry exists only while the count is above zero. May name absent pieces.
    pins: HashMap<u32, u32>,
    /// Sum of the lengths of the cached pieces.
    used: u64,
    budget: u64,
    /// Piece memory held outside the cache that counts against its budget (pieces being
    /// downloaded or hashed): the budget bounds all piece data, not only the verified pieces.
    reserved: u64,
    /// The piece of the latest insert, exempt from eviction until the next insert.
    newest: Option<u32>,
}

impl PieceCache {
    pub fn new(budget: u64) -> Self {
        PieceCache {
            entries: LruCache::unbounded(),
            pins: HashMap::new(),
            used: 0,
            budget,
            reserved: 0,
            newest: None,
        }
    }

    /// Inserts a verified piece (replacing an existing entry, which then counts as most recently
    /// used), then evicts least-recently-used unpinned pieces until `used <= budget`; returns the
    /// evicted piece indices, least recently used first. If only pinned pieces remain the cache
    /// stays over budget; the newly inserted piece is kept until the next insert in any case.
    pub fn insert(&mut self, piece: u32, data: Bytes) -> Vec<u32> {
        let len = data.len() as u64;
        if let Some(old) = self.entries.put(piece, data) {
            self.used -= old.len() as u64;
        }
        self.used += len;
        self.newest = Some(piece);
        self.evict_to_budget()
    }

    /// The piece's bytes, marking it most recently used.
    pub fn get(&mut self, piece: u32) -> Option<Bytes> {
        self.entries.get(&piece).cloned()
    }

    /// The piece's bytes without touching the LRU order (uploads to peers must not keep a piece
    /// alive that no local reader wants).
    pub fn peek(&self, piece: u32) -> Option<Bytes> {
        self.entries.peek(&piece).cloned()
    }

    pub fn contains(&self, piece: u32) -> bool {
        self.entries.contains(&piece)
    }

    /// Takes one pin on `piece`, cached or not: a piece pinned before it arrives is pinned on
    /// arrival.
    pub fn pin(&mut self, piece: u32) {
        let count = self.pins.entry(piece).or_insert(0);
        *count = count.saturating_add(1);
    }

    /// Releases one pin on `piece`. When the last pin goes, an over-budget cache evicts again;
    /// returns the evicted piece indices. Unpinning a piece that holds no pin does nothing.
    pub fn unpin(&mut self, piece: u32) -> Vec<u32> {
        match self.pins.get_mut(&piece) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Vec::new()
            }
            Some(_) => {
                self.pins.remove(&piece);
                self.evict_to_budget()
            }
            None => {
                log::debug!("unpin of piece {piece}, which holds no pin");
                Vec::new()
            }
        }
    }

    pub fn is_pinned(&self, piece: u32) -> bool {
        self.pins.contains_key(&piece)
    }

    /// Bytes of piece data held.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Number of pieces held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a piece of `len` bytes fits without evicting anything (the engine fetches in the
    /// background only while this holds).
    pub fn has_room(&self, len: u64) -> bool {
        self.used.saturating_add(len) <= self.room()
    }

    /// What the cached pieces may take: the budget less what is reserved outside it.
    fn room(&self) -> u64 {
        self.budget.saturating_sub(self.reserved)
    }

    /// Sets the piece memory held outside the cache (see `reserved`); a larger reservation
    /// evicts at once. Returns the evicted piece indices.
    pub fn set_reserved(&mut self, bytes: u64) -> Vec<u32> {
        let grew = bytes > self.reserved;
        self.reserved = bytes;
        match grew {
            true => self.evict_to_budget(),
            false => Vec::new(),
        }
    }

    /// Changes the budget (a session shares one among its torrents); a smaller one evicts at
    /// once. Returns the evicted piece indices.
    pub fn set_budget(&mut self, budget: u64) -> Vec<u32> {
        let shrank = budget < self.budget;
        self.budget = budget;
        match shrank {
            true => self.evict_to_budget(),
            false => Vec::new(),
        }
    }

    /// Drops a piece (pins on it stay); returns whether it was cached.
    pub fn remove(&mut self, piece: u32) -> bool {
        if self.newest == Some(piece) {
            self.newest = None;
        }
        match self.entries.pop(&piece) {
            Some(data) => {
                self.used -= data.len() as u64;
                true
            }
            None => false,
        }
    }

    /// Evicts unpinned pieces, least recently used first, until the cache fits its budget or only
    /// pinned pieces and the newest one are left.
    fn evict_to_budget(&mut self) -> Vec<u32> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        // `iter()` runs most recently used first; reversed, it starts at the eviction end.
        for (&piece, data) in self.entries.iter().rev() {
            if self.used - freed <= self.room() {
                break;
            }
            if Some(piece) == self.newest || self.pins.contains_key(&piece) {
                continue;
            }
            victims.push(piece);
            freed += data.len() as u64;
        }
        for piece in &victims {
            self.entries.pop(piece);
        }
        self.used -= freed;
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    #[test]
    fn memory_reserved_outside_the_cache_counts_against_its_budget() {
        let mut c = PieceCache::new(300);
        c.insert(0, piece(100, 0));
        c.insert(1, piece(100, 1));
        c.insert(2, piece(100, 2));
        assert_eq!(
            c.set_reserved(150),
            vec![0, 1],
            "down to 150 of cached pieces"
        );
        assert!(!c.has_room(100));
        assert!(
            c.set_reserved(0).is_empty(),
            "a smaller reservation evicts nothing"
        );
        assert!(c.has_room(100));
    }

    #[test]
    fn evicts_least_recently_used_first_within_byte_budget() {
        let mut c = PieceCache::new(300);
        assert!(c.insert(0, piece(100, 0)).is_empty());
        assert!(c.insert(1, piece(100, 1)).is_empty());
        assert!(c.insert(2, piece(100, 2)).is_empty());
        assert_eq!(c.used(), 300);
        assert_eq!(c.len(), 3);
        // Touch 0 so 1 becomes the least recently used.
        assert_eq!(c.get(0), Some(piece(100, 0)));
        assert_eq!(c.insert(3, piece(100, 3)), vec![1]);
        assert!(!c.contains(1));
        assert!(c.contains(0) && c.contains(2) && c.contains(3));
        assert_eq!(c.used(), 300);
        // A bigger piece pushes out as many as needed, oldest first.
        assert_eq!(c.insert(4, piece(250, 4)), vec![2, 0, 3]);
        assert_eq!(c.used(), 250);
        assert_eq!(c.len(), 1);
        assert_eq!(c.budget(), 300);
    }

    #[test]
    fn eviction_stops_as_soon_as_the_budget_holds() {
        let mut c = PieceCache::new(250);
        c.insert(0, piece(50, 0));
        c.insert(1, piece(100, 1));
        c.insert(2, piece(100, 2));
        // 250 + 60 = 310: evicting piece 0 (50) is not enough, piece 1 too (150 freed).
        assert_eq!(c.insert(3, piece(60, 3)), vec![0, 1]);
        assert_eq!(c.used(), 160);
        assert!(c.contains(2) && c.contains(3));
    }

    #[test]
    fn peek_does_not_change_order() {
        let mut c = PieceCache::new(200);
        c.insert(0, piece(100, 0));
        c.insert(1, piece(100, 1));
        assert_eq!(c.peek(0), Some(piece(100, 0)));
        assert_eq!(c.peek(9), None);
        // 0 is still the least recently used.
        assert_eq!(c.insert(2, piece(100, 2)), vec![0]);
        // get does change it.
        assert!(c.get(1).is_some());
        assert_eq!(c.insert(3, piece(100, 3)), vec![2]);
        assert_eq!(c.get(2), None);
    }

    #[test]
    fn reinsert_of_the_same_piece_does_not_double_count() {
        let mut c = PieceCache::new(300);
        c.insert(0, piece(100, 0));
        c.insert(1, piece(100, 1));
        assert!(c.insert(0, piece(100, 7)).is_empty());
        assert_eq!(c.used(), 200);
        assert_eq!(c.len(), 2);
        assert_eq!(c.peek(0), Some(piece(100, 7)));
        // The replaced piece became most recently used, so 1 goes first.
        assert_eq!(c.insert(2, piece(150, 2)), vec![1]);
        // A replacement of another size adjusts the count.
        c.insert(2, piece(10, 2));
        assert_eq!(c.used(), 110);
    }

    #[test]
    fn pinned_pieces_are_never_evicted() {
        let mut c = PieceCache::new(200);
        c.insert(0, piece(100, 0));
        c.pin(0);
        c.insert(1, piece(100, 1));
        assert_eq!(c.insert(2, piece(100, 2)), vec![1]);
        assert!(c.contains(0));
        // Only the pinned piece and the newest remain: over budget is allowed.
        c.pin(2);
        assert!(c.insert(3, piece(100, 3)).is_empty());
        assert_eq!(c.used(), 300);
        assert!(c.contains(0) && c.contains(2) && c.contains(3));
        assert!(!c.has_room(1));
    }

    #[test]
    fn pin_before_arrival_pins_on_arrival() {
        let mut c = PieceCache::new(100);
        c.pin(5);
        assert!(c.is_pinned(5));
        assert!(!c.contains(5));
        c.insert(5, piece(100, 5));
        assert!(c.insert(6, piece(100, 6)).is_empty());
        assert!(c.contains(5) && c.contains(6));
        // Piece 7 evicts 6 (unpinned, no longer newest) but never 5.
        assert_eq!(c.insert(7, piece(100, 7)), vec![6]);
        assert!(c.contains(5));
    }

    #[test]
    fn unpin_evicts_when_over_budget() {
        let mut c = PieceCache::new(200);
        c.insert(0, piece(100, 0));
        c.insert(1, piece(100, 1));
        c.pin(0);
        c.pin(1);
        c.pin(1);
        assert!(c.insert(2, piece(100, 2)).is_empty());
        assert_eq!(c.used(), 300);
        // Pins count: the first unpin of 1 keeps it pinned.
        assert!(c.unpin(1).is_empty());
        assert!(c.is_pinned(1));
        assert_eq!(c.unpin(1), vec![1]);
        assert_eq!(c.used(), 200);
        assert!(!c.is_pinned(1));
        // Back within budget: unpinning 0 evicts nothing.
        assert!(c.unpin(0).is_empty());
        assert!(c.contains(0));
        // Unpinning what holds no pin is harmless.
        assert!(c.unpin(0).is_empty());
        assert!(c.unpin(42).is_empty());
    }

    #[test]
    fn budget_smaller_than_a_piece_keeps_the_newest_until_the_next_insert() {
        let mut c = PieceCache::new(10);
        assert!(c.insert(0, piece(100, 0)).is_empty());
        assert_eq!(c.get(0), Some(piece(100, 0)));
        assert_eq!(c.used(), 100);
        // Unpinning something else does not evict the newest either.
        c.pin(3);
        assert!(c.unpin(3).is_empty());
        assert!(c.contains(0));
        assert_eq!(c.insert(1, piece(100, 1)), vec![0]);
        assert_eq!(c.len(), 1);
        assert!(c.contains(1));
    }

    #[test]
    fn has_room_remove_and_empty() {
        let mut c = PieceCache::new(300);
        assert!(c.is_empty());
        assert!(c.has_room(300));
        assert!(!c.has_room(301));
        assert!(!c.has_room(u64::MAX));
        c.insert(0, piece(100, 0));
        c.insert(1, piece(100, 1));
        assert!(c.has_room(100));
        assert!(!c.has_room(101));
        assert!(c.remove(0));
        assert!(!c.remove(0));
        assert_eq!(c.used(), 100);
        assert!(c.remove(1));
        assert!(c.is_empty());
        assert_eq!(c.used(), 0);
        assert_eq!(c.get(1), None);
    }

    #[test]
    fn a_smaller_budget_evicts_at_once_and_a_larger_one_keeps_everything() {
        let mut c = PieceCache::new(4 * 10);
        for p in 0..4 {
            assert!(c.insert(p, Bytes::from(vec![0u8; 10])).is_empty());
        }
        c.pin(1);
        assert!(c.set_budget(100).is_empty());
        assert_eq!(c.len(), 4);
        // Down to 10 bytes: the least recently used unpinned pieces go, the pinned one and the
        // newest stay.
        assert_eq!(c.set_budget(10), vec![0, 2]);
        assert!(c.contains(1) && c.contains(3));
        assert!(!c.has_room(10));
        assert_eq!(c.set_budget(40), Vec::<u32>::new());
        assert!(c.has_room(20));
    }
}
