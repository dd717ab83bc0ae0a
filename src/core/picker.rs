//! The piece picker: which blocks to request next, from which peer. Pure: peers are opaque
//! `PeerKey`s, time is the `now` passed in, randomness comes from the seed given at construction.
//!
//! # Piece states
//! Every piece is in exactly one state (`states[piece]`):
//! - `NotStarted`: not held, no block received or requested. Exactly these pieces are in the
//!   rarity order (unless the order is marked dirty and waits for a rebuild).
//! - `Partial`: in progress (`in_progress[piece]`); each block is `Missing`, `Requested` by one or
//!   more distinct peers (each with the time of its request), or `Received`. At least one block is
//!   not `Missing` (a piece whose last request is released goes back to `NotStarted`) and at least
//!   one is not `Received`.
//! - `Hashing`: every block received (`in_progress[piece]` keeps who sent them); the engine hashes
//!   it and calls `piece_verified` (-> `Have`) or `piece_failed` (-> `NotStarted`).
//! - `Have`: verified and held (bit set in `have`). `piece_lost` moves it back to `NotStarted`.
//!
//! Every request is recorded three times and the three agree: in the block's state, in the
//! peer's in-flight map, and in the by-time index that `expire_requests` walks oldest first.
//!
//! # Priorities
//! A piece is *wanted* when we do not have it and it has a deadline, is in the readahead set, or
//! background filling is on. Deadlines and readahead name pieces we do not have: verifying a
//! piece clears both (setting a deadline on a held piece is ignored).
//!
//! # Cost
//! New pieces come from a `BTreeSet` keyed by (availability, random tag, piece) holding only
//! not-started pieces, so the next rarest piece a peer has is found without scanning held or
//! started ones. Single `have`s and small bitfields update it in place; large bitfields and
//! disconnects only mark it dirty and the next `pick` rebuilds it once. A `pick` therefore costs
//! about O(deadlines + readahead + partial pieces + blocks returned + log pieces).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::core::layout::{Bitfield, BlockRef, Lengths, PieceIndex, BLOCK_SIZE};

/// An opaque peer id chosen by the engine.
pub type PeerKey = u64;

/// How many peers may have the same block in flight (endgame and urgent duplicates).
pub const DEFAULT_MAX_DUPLICATES: usize = 2;
/// A deadline piece due within this window may have its blocks requested twice.
pub const DEFAULT_URGENT_WINDOW: Duration = Duration::from_millis(500);

/// Bitfields with at most this many pieces update the rarity order in place; larger ones mark it
/// for one rebuild (cheaper than thousands of tree moves).
const INCREMENTAL_BITFIELD_LIMIT: u32 = 256;
/// `pick` never pre-allocates more than this, whatever `max` the caller passes.
const MAX_PICK_CAPACITY: usize = 1024;

/// What to do with a block that arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOutcome {
    /// First copy of a block we wanted. `piece_complete`: every block of the piece is now received
    /// (the engine then hashes it and calls piece_verified / piece_failed). `cancel`: other peers that
    /// also had this block requested (endgame/urgent duplicates): the engine sends them `cancel`.
    Accepted {
        piece_complete: bool,
        cancel: Vec<PeerKey>,
    },
    /// We already have this block / piece, or never wanted it: drop the data (not an offense).
    Unwanted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceState {
    NotStarted,
    Partial,
    Hashing,
    Have,
}

#[derive(Debug)]
enum BlockState {
    Missing,
    /// Never empty; each peer at most once; (peer, time of the request).
    Requested(Vec<(PeerKey, Instant)>),
    Received,
}

/// A piece with blocks requested or received (`Partial` or `Hashing`).
#[derive(Debug)]
struct InProgress {
    piece_len: u32,
    blocks: Vec<BlockState>,
    /// Blocks in `Missing`.
    missing: u32,
    /// Blocks in `Received`.
    received: u32,
    /// Peers that sent at least one received block, each once.
    contributors: Vec<PeerKey>,
}

impl InProgress {
    fn new(piece_len: u32) -> Self {
        let count = piece_len.div_ceil(BLOCK_SIZE);
        InProgress {
            piece_len,
            blocks: (0..count).map(|_| BlockState::Missing).collect(),
            missing: count,
            received: 0,
            contributors: Vec::new(),
        }
    }

    fn block_ref(&self, piece: u32, index: usize) -> BlockRef {
        let offset = index as u32 * BLOCK_SIZE;
        BlockRef {
            piece,
            offset,
            length: (self.piece_len - offset).min(BLOCK_SIZE),
        }
    }

    fn is_complete(&self) -> bool {
        self.received as usize == self.blocks.len()
    }
}

/// Every request in flight, indexed by peer and by time.
#[derive(Debug, Default)]
struct Requests {
    by_peer: HashMap<PeerKey, HashMap<BlockRef, Instant>>,
    by_time: BTreeSet<(Instant, PeerKey, BlockRef)>,
}

impl Requests {
    fn add(&mut self, peer: PeerKey, block: BlockRef, at: Instant) {
        self.by_peer.entry(peer).or_default().insert(block, at);
        self.by_time.insert((at, peer, block));
    }

    /// Forgets one request; false if it was not in flight.
    fn remove(&mut self, peer: PeerKey, block: BlockRef) -> bool {
        let Some(blocks) = self.by_peer.get_mut(&peer) else {
            return false;
        };
        let Some(at) = blocks.remove(&block) else {
            return false;
        };
        if blocks.is_empty() {
            self.by_peer.remove(&peer);
        }
        self.by_time.remove(&(at, peer, block));
        true
    }

    fn count(&self, peer: PeerKey) -> usize {
        self.by_peer.get(&peer).map_or(0, HashMap::len)
    }
}

/// Which blocks of a piece `take_blocks` may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only blocks nobody has in flight.
    Fresh,
    /// Also blocks whose newest request is older than `stale_after` (urgent deadline pieces).
    Urgent { stale_after: Duration },
    /// Also blocks in flight to other peers (endgame).
    Duplicate,
}

/// What one `pick` call asks for: blocks for `peer`, at `now`, at most `max` of them, of
/// which at most `deadline_max` of pieces with a deadline.
#[derive(Debug, Clone, Copy)]
struct Ask {
    peer: PeerKey,
    now: Instant,
    max: usize,
    deadline_max: usize,
}

/// Everything `take_blocks` needs besides the piece itself.
struct TakeCtx<'a> {
    ask: Ask,
    mode: Mode,
    max_duplicates: usize,
    out: &'a mut Vec<BlockRef>,
    requests: &'a mut Requests,
}

impl<'a> TakeCtx<'a> {
    fn new(
        ask: Ask,
        mode: Mode,
        max_duplicates: usize,
        out: &'a mut Vec<BlockRef>,
        requests: &'a mut Requests,
    ) -> Self {
        TakeCtx {
            ask,
            mode,
            max_duplicates,
            out,
            requests,
        }
    }
}

/// Requests blocks of one in-progress piece for `ctx.peer`, lowest offset first.
fn take_blocks(piece: u32, ip: &mut InProgress, ctx: &mut TakeCtx<'_>) {
    if ctx.mode == Mode::Fresh && ip.missing == 0 {
        return;
    }
    for index in 0..ip.blocks.len() {
        if ctx.out.len() >= ctx.ask.max {
            return;
        }
        let take = match &ip.blocks[index] {
            BlockState::Missing => true,
            BlockState::Received => false,
            BlockState::Requested(reqs) => {
                let allowed = reqs.len() < ctx.max_duplicates
                    && !reqs.iter().any(|(p, _)| *p == ctx.ask.peer);
                allowed
                    && match ctx.mode {
                        Mode::Fresh => false,
                        Mode::Duplicate => true,
                        Mode::Urgent { stale_after } => {
                            reqs.iter().map(|(_, at)| *at).max().is_some_and(|newest| {
                                ctx.ask.now.saturating_duration_since(newest) > stale_after
                            })
                        }
                    }
            }
        };
        if !take {
            continue;
        }
        let block = ip.block_ref(piece, index);
        match &mut ip.blocks[index] {
            BlockState::Requested(reqs) => reqs.push((ctx.ask.peer, ctx.ask.now)),
            state => {
                *state = BlockState::Requested(vec![(ctx.ask.peer, ctx.ask.now)]);
                ip.missing -= 1;
            }
        }
        ctx.requests.add(ctx.ask.peer, block, ctx.ask.now);
        ctx.out.push(block);
    }
}

/// Not-started pieces, rarest first, ties broken by a per-piece random tag fixed at construction.
#[derive(Debug)]
struct RarityOrder {
    tags: Vec<u32>,
    set: BTreeSet<(u32, u32, u32)>,
    /// `set` is stale and must be rebuilt before use; while dirty, updates skip it.
    dirty: bool,
}

impl RarityOrder {
    fn key(&self, availability: u32, piece: u32) -> (u32, u32, u32) {
        (availability, self.tags[piece as usize], piece)
    }
    fn insert(&mut self, availability: u32, piece: u32) {
        if !self.dirty {
            self.set.insert(self.key(availability, piece));
        }
    }
    fn remove(&mut self, availability: u32, piece: u32) {
        if !self.dirty {
            self.set.remove(&self.key(availability, piece));
        }
    }
}

/// Decides what to request; see the module doc for its states and invariants.
#[derive(Debug)]
pub struct Picker {
    lengths: Lengths,
    states: Vec<PieceState>,
    have: Bitfield,
    /// Pieces not in `Have`.
    missing: u32,
    availability: Vec<u32>,
    /// `Partial` and `Hashing` pieces, in piece order.
    in_progress: BTreeMap<u32, InProgress>,
    requests: Requests,
    rarity: RarityOrder,
    deadlines: HashMap<u32, Instant>,
    deadline_order: BTreeSet<(Instant, u32)>,
    readahead: Vec<u32>,
    readahead_set: HashSet<u32>,
    background: bool,
    max_duplicates: usize,
    urgent_window: Duration,
    /// Run `check_invariants` after every mutation (unit tests; they turn it off for long runs).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    check_each_call: bool,
}

impl Picker {
    /// Nothing held, everything wanted.
    pub fn new(lengths: Lengths, seed: u64) -> Picker {
        Self::with_have(lengths, &Bitfield::new(lengths.piece_count()), seed)
    }

    /// Resume: the pieces in `have` are held (bits past the piece count are ignored).
    pub fn with_have(lengths: Lengths, have: &Bitfield, seed: u64) -> Picker {
        let count = lengths.piece_count();
        let mut rng = StdRng::seed_from_u64(seed);
        let tags: Vec<u32> = (0..count).map(|_| rng.gen()).collect();
        let mut held = Bitfield::new(count);
        let mut states = vec![PieceState::NotStarted; count as usize];
        let mut missing = count;
        for (i, state) in states.iter_mut().enumerate() {
            if have.get(i as u32) {
                held.set(i as u32, true);
                *state = PieceState::Have;
                missing -= 1;
            }
        }
        let set = (0..count)
            .filter(|&p| !held.get(p))
            .map(|p| (0, tags[p as usize], p))
            .collect();
        let picker = Picker {
            lengths,
            states,
            have: held,
            missing,
            availability: vec![0; count as usize],
            in_progress: BTreeMap::new(),
            requests: Requests::default(),
            rarity: RarityOrder {
                tags,
                set,
                dirty: false,
            },
            deadlines: HashMap::new(),
            deadline_order: BTreeSet::new(),
            readahead: Vec::new(),
            readahead_set: HashSet::new(),
            background: true,
            max_duplicates: DEFAULT_MAX_DUPLICATES,
            urgent_window: DEFAULT_URGENT_WINDOW,
            check_each_call: cfg!(test),
        };
        picker.debug_check();
        picker
    }

    pub fn lengths(&self) -> Lengths {
        self.lengths
    }

    /// How many peers may have one block in flight at once (at least 1; default 2).
    pub fn set_max_duplicates(&mut self, n: usize) {
        self.max_duplicates = n.max(1);
    }

    /// Deadline pieces due within `window` get their stale blocks duplicated (default 500 ms).
    pub fn set_urgent_window(&mut self, window: Duration) {
        self.urgent_window = window;
    }

    // ---- availability ----

    /// A `have` message.
    pub fn peer_has(&mut self, piece: PieceIndex) {
        self.add_availability(piece.get());
        self.debug_check();
    }

    /// A `bitfield` message, or have-all as `Bitfield::full`.
    pub fn peer_has_bitfield(&mut self, bf: &Bitfield) {
        let count = self.lengths.piece_count();
        if bf.count_ones() > INCREMENTAL_BITFIELD_LIMIT {
            self.rarity.dirty = true;
        }
        for p in bf.iter_ones().take_while(|&p| p < count) {
            self.add_availability(p);
        }
        self.debug_check();
    }

    /// A peer disconnected: its pieces no longer count and its requests go back to the pool.
    pub fn peer_gone(&mut self, peer: PeerKey, bf: &Bitfield) {
        let count = self.lengths.piece_count();
        if bf.count_ones() > INCREMENTAL_BITFIELD_LIMIT {
            self.rarity.dirty = true;
        }
        for p in bf.iter_ones().take_while(|&p| p < count) {
            let old = self.availability[p as usize];
            if old == 0 {
                continue;
            }
            self.set_availability(p, old - 1);
        }
        self.release_all(peer);
        self.debug_check();
    }

    fn add_availability(&mut self, p: u32) {
        let old = self.availability[p as usize];
        self.set_availability(p, old.saturating_add(1));
    }

    fn set_availability(&mut self, p: u32, new: u32) {
        let old = self.availability[p as usize];
        if self.states[p as usize] == PieceState::NotStarted {
            self.rarity.remove(old, p);
            self.rarity.insert(new, p);
        }
        self.availability[p as usize] = new;
    }

    pub fn availability(&self, piece: PieceIndex) -> u32 {
        self.availability[piece.as_usize()]
    }

    // ---- requesting ----

    /// Up to `max` blocks to request from `peer`, which has the pieces in `peer_pieces`. Never a
    /// block this peer already has in flight; never a piece we have. Order: (1) pieces with a
    /// deadline, earliest first, lowest offset first (blocks of a piece due within the urgent window
    /// whose request is older than half the window may be duplicated); (2) readahead pieces in
    /// order; (3) partial pieces; (4) new pieces, rarest first with a random tie-break, only if
    /// background is on. (5) Endgame: if that left room, blocks in flight to other peers (each
    /// block to at most `max_duplicates` peers).
    pub fn pick(
        &mut self,
        peer: PeerKey,
        peer_pieces: &Bitfield,
        max: usize,
        now: Instant,
    ) -> Vec<BlockRef> {
        self.pick_sharing_deadlines(peer, peer_pieces, max, usize::MAX, now)
    }

    /// `pick`, giving this peer at most `deadline_max` blocks of deadline pieces (its share of
    /// a waiting read's: the rest is left for peers that deliver sooner).
    pub fn pick_sharing_deadlines(
        &mut self,
        peer: PeerKey,
        peer_pieces: &Bitfield,
        max: usize,
        deadline_max: usize,
        now: Instant,
    ) -> Vec<BlockRef> {
        let mut out = Vec::with_capacity(max.min(MAX_PICK_CAPACITY));
        if max > 0 {
            let urgent = Mode::Urgent {
                stale_after: self.urgent_window / 2,
            };
            let ask = Ask {
                peer,
                now,
                max,
                deadline_max,
            };
            self.pick_priority(ask, peer_pieces, urgent, Mode::Fresh, &mut out);
            if self.background {
                // A piece started elsewhere is finished from this peer only when it is no
                // more common than the rarest piece this peer could start: a seed asked to
                // finish pieces other leechers already hold spends its upload on copies the
                // swarm has, not on pieces only it has.
                let rarest_new = self.rarest_new(peer_pieces);
                let rare = |availability: u32| rarest_new.is_none_or(|r| availability <= r);
                self.pick_partials(ask, peer_pieces, Mode::Fresh, rare, &mut out);
                self.pick_new(ask, peer_pieces, &mut out);
                self.pick_partials(ask, peer_pieces, Mode::Fresh, |_| true, &mut out);
            } else {
                self.pick_partials(ask, peer_pieces, Mode::Fresh, |_| true, &mut out);
            }
            // Endgame: nothing unrequested is left anywhere (not only at this peer: a leecher
            // holding a few pieces would otherwise duplicate blocks long before the end).
            if out.len() < max && self.in_endgame() {
                let dup = Mode::Duplicate;
                self.pick_priority(ask, peer_pieces, dup, dup, &mut out);
                self.pick_partials(ask, peer_pieces, dup, |_| true, &mut out);
            }
        }
        self.debug_check();
        out
    }

    /// Every missing piece is in progress and none has a block nobody has requested.
    fn in_endgame(&self) -> bool {
        self.missing as usize <= self.in_progress.len()
            && self.in_progress.values().all(|ip| ip.missing == 0)
    }

    /// Deadline pieces (in `deadline_mode` when due within the urgent window, else `Fresh`), then
    /// readahead pieces (in `readahead_mode`).
    fn pick_priority(
        &mut self,
        ask: Ask,
        peer_pieces: &Bitfield,
        deadline_mode: Mode,
        readahead_mode: Mode,
        out: &mut Vec<BlockRef>,
    ) {
        let max = ask.max;
        let urgent_until = ask.now.checked_add(self.urgent_window);
        let mut cursor: Option<(Instant, u32)> = None;
        let taken = out.len();
        let deadline_ask = Ask {
            max: max.min(taken.saturating_add(ask.deadline_max)),
            ..ask
        };
        while out.len() < deadline_ask.max {
            let next = match cursor {
                None => self.deadline_order.iter().next(),
                Some(c) => self
                    .deadline_order
                    .range((Bound::Excluded(c), Bound::Unbounded))
                    .next(),
            };
            let Some(&(deadline, piece)) = next else {
                break;
            };
            cursor = Some((deadline, piece));
            if !peer_pieces.get(piece) {
                continue;
            }
            let urgent = urgent_until.is_none_or(|until| deadline <= until);
            let mode = if urgent || deadline_mode == Mode::Duplicate {
                deadline_mode
            } else {
                Mode::Fresh
            };
            self.take_piece(piece, deadline_ask, mode, out);
        }
        let mut i = 0;
        while out.len() < max && i < self.readahead.len() {
            let piece = self.readahead[i];
            i += 1;
            if peer_pieces.get(piece) {
                self.take_piece(piece, ask, readahead_mode, out);
            }
        }
    }

    /// The availability of the rarest not-started piece `peer_pieces` has.
    fn rarest_new(&mut self, peer_pieces: &Bitfield) -> Option<u32> {
        if self.rarity.dirty {
            self.rebuild_rarity();
        }
        let first = Bound::Included((1u32, 0u32, 0u32));
        self.next_new(first, peer_pieces)
            .map(|(availability, _, _)| availability)
    }

    /// The first not-started piece `peer_pieces` has in rarity order from `from` (only pieces
    /// some peer is counted to have: availability at least 1).
    fn next_new(
        &self,
        from: Bound<(u32, u32, u32)>,
        peer_pieces: &Bitfield,
    ) -> Option<(u32, u32, u32)> {
        self.rarity
            .set
            .range((from, Bound::Unbounded))
            .find(|&&(_, _, p)| peer_pieces.get(p))
            .copied()
    }

    /// Every wanted in-progress piece whose availability passes `take`, in piece order.
    fn pick_partials(
        &mut self,
        ask: Ask,
        peer_pieces: &Bitfield,
        mode: Mode,
        take: impl Fn(u32) -> bool,
        out: &mut Vec<BlockRef>,
    ) {
        let mut ctx = TakeCtx::new(ask, mode, self.max_duplicates, out, &mut self.requests);
        for (&piece, ip) in self.in_progress.iter_mut() {
            if ctx.out.len() >= ask.max {
                break;
            }
            // Deadline pieces were offered in their share already.
            let deadline = self.deadlines.contains_key(&piece);
            let wanted = !deadline && (self.background || self.readahead_set.contains(&piece));
            if wanted && peer_pieces.get(piece) && take(self.availability[piece as usize]) {
                take_blocks(piece, ip, &mut ctx);
            }
        }
    }

    /// Starts new pieces, rarest first. Only pieces some peer is counted to have (availability of
    /// at least 1) are considered, so pieces nobody has are never scanned.
    fn pick_new(&mut self, ask: Ask, peer_pieces: &Bitfield, out: &mut Vec<BlockRef>) {
        let max = ask.max;
        if out.len() >= max {
            return;
        }
        if self.rarity.dirty {
            self.rebuild_rarity();
        }
        let mut from = Bound::Included((1u32, 0u32, 0u32));
        while out.len() < max {
            let Some(key) = self.next_new(from, peer_pieces) else {
                break;
            };
            from = Bound::Excluded(key);
            self.take_piece(key.2, ask, Mode::Fresh, out);
        }
    }

    fn rebuild_rarity(&mut self) {
        let set = (0..self.lengths.piece_count())
            .filter(|&p| self.states[p as usize] == PieceState::NotStarted)
            .map(|p| self.rarity.key(self.availability[p as usize], p))
            .collect();
        self.rarity.set = set;
        self.rarity.dirty = false;
    }

    /// Takes blocks of one piece, starting it if it was not started.
    fn take_piece(&mut self, piece: u32, ask: Ask, mode: Mode, out: &mut Vec<BlockRef>) {
        match self.states[piece as usize] {
            PieceState::Have | PieceState::Hashing => return,
            PieceState::NotStarted => self.start_piece(piece),
            PieceState::Partial => {}
        }
        let mut ctx = TakeCtx::new(ask, mode, self.max_duplicates, out, &mut self.requests);
        if let Some(ip) = self.in_progress.get_mut(&piece) {
            take_blocks(piece, ip, &mut ctx);
        }
    }

    /// NotStarted -> Partial with every block missing. The caller requests or receives a block
    /// before anything else can observe the piece.
    fn start_piece(&mut self, piece: u32) {
        let Some(index) = self.lengths.piece(piece) else {
            return;
        };
        self.rarity.remove(self.availability[piece as usize], piece);
        self.states[piece as usize] = PieceState::Partial;
        self.in_progress
            .insert(piece, InProgress::new(self.lengths.piece_len(index)));
    }

    /// Partial (with nothing requested or received) or Hashing -> NotStarted.
    fn reset_piece(&mut self, piece: u32) -> Option<InProgress> {
        let ip = self.in_progress.remove(&piece)?;
        self.states[piece as usize] = PieceState::NotStarted;
        self.rarity.insert(self.availability[piece as usize], piece);
        Some(ip)
    }

    /// A block arrived from `peer`.
    pub fn block_received(
        &mut self,
        peer: PeerKey,
        block: BlockRef,
        _now: Instant,
    ) -> BlockOutcome {
        let outcome = self.receive(peer, block);
        self.debug_check();
        outcome
    }

    fn receive(&mut self, peer: PeerKey, block: BlockRef) -> BlockOutcome {
        let Some(block) = self.lengths.block(block.piece, block.offset, block.length) else {
            return BlockOutcome::Unwanted;
        };
        let piece = block.piece;
        let index = (block.offset / BLOCK_SIZE) as usize;
        match self.states[piece as usize] {
            PieceState::Have | PieceState::Hashing => return BlockOutcome::Unwanted,
            PieceState::NotStarted => {
                // A late delivery after its request expired, or data for a piece we want anyway.
                if !self.is_wanted(piece) {
                    return BlockOutcome::Unwanted;
                }
                self.start_piece(piece);
            }
            PieceState::Partial => {}
        }
        let Some(ip) = self.in_progress.get_mut(&piece) else {
            return BlockOutcome::Unwanted;
        };
        let Some(state) = ip.blocks.get_mut(index) else {
            return BlockOutcome::Unwanted;
        };
        let mut cancel = Vec::new();
        match std::mem::replace(state, BlockState::Received) {
            BlockState::Received => return BlockOutcome::Unwanted,
            BlockState::Missing => ip.missing -= 1,
            BlockState::Requested(reqs) => {
                for (q, _) in reqs {
                    self.requests.remove(q, block);
                    if q != peer {
                        cancel.push(q);
                    }
                }
            }
        }
        ip.received += 1;
        if !ip.contributors.contains(&peer) {
            ip.contributors.push(peer);
        }
        let piece_complete = ip.is_complete();
        if piece_complete {
            self.states[piece as usize] = PieceState::Hashing;
        }
        BlockOutcome::Accepted {
            piece_complete,
            cancel,
        }
    }

    /// The peer rejected (or will not send) a block: it goes back to the pool.
    pub fn block_rejected(&mut self, peer: PeerKey, block: BlockRef) {
        self.release(peer, block);
        self.debug_check();
    }

    /// The peer choked us: all its requests go back to the pool. Returns them, in block order.
    pub fn peer_choked(&mut self, peer: PeerKey) -> Vec<BlockRef> {
        let released = self.release_all(peer);
        self.debug_check();
        released
    }

    /// Requests older than `timeout` go back to the pool (the peer may still deliver; that is then
    /// Accepted if still needed). Returns them, oldest first.
    pub fn expire_requests(&mut self, now: Instant, timeout: Duration) -> Vec<(PeerKey, BlockRef)> {
        let expired: Vec<(PeerKey, BlockRef)> = self
            .requests
            .by_time
            .iter()
            .take_while(|(at, _, _)| now.saturating_duration_since(*at) > timeout)
            .map(|&(_, peer, block)| (peer, block))
            .collect();
        for &(peer, block) in &expired {
            self.release(peer, block);
        }
        self.debug_check();
        expired
    }

    /// Blocks of `piece` nobody has requested or sent yet (0 for a piece we have or hash).
    pub fn unrequested_blocks(&self, piece: PieceIndex) -> u32 {
        let p = piece.get();
        match self.states[p as usize] {
            PieceState::NotStarted => self.lengths.piece_len(piece).div_ceil(BLOCK_SIZE),
            PieceState::Partial => self.in_progress.get(&p).map_or(0, |ip| ip.missing),
            PieceState::Hashing | PieceState::Have => 0,
        }
    }

    /// Blocks of deadline pieces nobody has requested.
    pub fn unrequested_deadline_blocks(&self) -> usize {
        self.deadlines
            .keys()
            .filter_map(|&p| self.lengths.piece(p))
            .map(|p| self.unrequested_blocks(p) as usize)
            .sum()
    }

    /// Blocks requested from `peer` and not yet received, rejected, expired or released.
    pub fn in_flight(&self, peer: PeerKey) -> usize {
        self.requests.count(peer)
    }

    fn release_all(&mut self, peer: PeerKey) -> Vec<BlockRef> {
        let mut blocks: Vec<BlockRef> = self
            .requests
            .by_peer
            .get(&peer)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        blocks.sort_unstable();
        for &block in &blocks {
            self.release(peer, block);
        }
        blocks
    }

    /// Forgets one request; a piece left with nothing requested or received is not started again.
    fn release(&mut self, peer: PeerKey, block: BlockRef) {
        if !self.requests.remove(peer, block) {
            return;
        }
        let piece = block.piece;
        let Some(ip) = self.in_progress.get_mut(&piece) else {
            return;
        };
        if let Some(state) = ip.blocks.get_mut((block.offset / BLOCK_SIZE) as usize) {
            if let BlockState::Requested(reqs) = state {
                reqs.retain(|(q, _)| *q != peer);
                if reqs.is_empty() {
                    *state = BlockState::Missing;
                    ip.missing += 1;
                }
            }
        }
        if ip.received == 0 && ip.missing as usize == ip.blocks.len() {
            self.reset_piece(piece);
        }
    }

    /// Drops every request of an in-progress piece.
    fn release_piece_requests(&mut self, piece: u32) {
        let Some(ip) = self.in_progress.get_mut(&piece) else {
            return;
        };
        for index in 0..ip.blocks.len() {
            if let BlockState::Requested(reqs) = &ip.blocks[index] {
                let block = ip.block_ref(piece, index);
                for &(q, _) in reqs {
                    self.requests.remove(q, block);
                }
                ip.blocks[index] = BlockState::Missing;
                ip.missing += 1;
            }
        }
    }

    // ---- verification ----

    /// The piece's hash matched: we have it. Clears its deadline and readahead entry. Also accepted
    /// for a piece in any other state (e.g. verified from disk); its requests are then dropped.
    pub fn piece_verified(&mut self, piece: PieceIndex) {
        let p = piece.get();
        match self.states[p as usize] {
            PieceState::Have => {}
            PieceState::NotStarted => {
                self.rarity.remove(self.availability[p as usize], p);
                self.mark_have(p);
            }
            PieceState::Partial | PieceState::Hashing => {
                self.release_piece_requests(p);
                self.in_progress.remove(&p);
                self.mark_have(p);
            }
        }
        self.clear_priority(p);
        self.debug_check();
    }

    fn mark_have(&mut self, p: u32) {
        self.states[p as usize] = PieceState::Have;
        self.have.set(p, true);
        self.missing -= 1;
    }

    /// Hash mismatch: the piece is wanted again from scratch; returns the peers that contributed
    /// blocks (for strikes). Only a piece waiting for its hash can fail; otherwise returns nothing.
    pub fn piece_failed(&mut self, piece: PieceIndex) -> Vec<PeerKey> {
        let p = piece.get();
        let mut contributors = Vec::new();
        if self.states[p as usize] == PieceState::Hashing {
            if let Some(ip) = self.reset_piece(p) {
                contributors = ip.contributors;
            }
        }
        contributors.sort_unstable();
        self.debug_check();
        contributors
    }

    /// A verified piece was evicted from the memory cache: we no longer have it (wanted again only
    /// if it gets a deadline/readahead or background is on).
    pub fn piece_lost(&mut self, piece: PieceIndex) {
        let p = piece.get();
        if self.states[p as usize] == PieceState::Have {
            self.states[p as usize] = PieceState::NotStarted;
            self.have.set(p, false);
            self.missing += 1;
            self.rarity.insert(self.availability[p as usize], p);
        }
        self.debug_check();
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn has(&self, piece: PieceIndex) -> bool {
        self.have.get(piece.get())
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Pieces we do not have (not started, in progress or being hashed).
    pub fn missing_count(&self) -> u32 {
        self.missing
    }

    // ---- priorities ----

    /// An urgent read needs this piece by `deadline`. Keeps the earliest if set twice; ignored for
    /// a piece we have.
    pub fn set_deadline(&mut self, piece: PieceIndex, deadline: Instant) {
        let p = piece.get();
        if self.states[p as usize] == PieceState::Have {
            return;
        }
        match self.deadlines.get(&p) {
            Some(&old) if old <= deadline => {}
            old => {
                if let Some(&old) = old {
                    self.deadline_order.remove(&(old, p));
                }
                self.deadlines.insert(p, deadline);
                self.deadline_order.insert((deadline, p));
            }
        }
        self.debug_check();
    }

    pub fn clear_deadline(&mut self, piece: PieceIndex) {
        if let Some(old) = self.deadlines.remove(&piece.get()) {
            self.deadline_order.remove(&(old, piece.get()));
        }
        self.debug_check();
    }

    /// Replaces the readahead set (ordered; duplicates and held pieces are dropped).
    pub fn set_readahead(&mut self, pieces: &[PieceIndex]) {
        self.readahead.clear();
        self.readahead_set.clear();
        for p in pieces {
            let p = p.get();
            if self.states[p as usize] != PieceState::Have && self.readahead_set.insert(p) {
                self.readahead.push(p);
            }
        }
        self.debug_check();
    }

    /// Rarest-first fill of everything else; default on.
    pub fn set_background(&mut self, on: bool) {
        self.background = on;
    }

    fn clear_priority(&mut self, p: u32) {
        if let Some(old) = self.deadlines.remove(&p) {
            self.deadline_order.remove(&(old, p));
        }
        if self.readahead_set.remove(&p) {
            self.readahead.retain(|&q| q != p);
        }
    }

    fn is_wanted(&self, p: u32) -> bool {
        self.states[p as usize] != PieceState::Have
            && (self.background
                || self.deadlines.contains_key(&p)
                || self.readahead_set.contains(&p))
    }

    /// Whether `peer_pieces` has anything we still want (for `interested`).
    pub fn wants_any(&self, peer_pieces: &Bitfield) -> bool {
        let priority_hit = self
            .deadlines
            .keys()
            .chain(self.readahead.iter())
            .any(|&p| peer_pieces.get(p) && !self.have.get(p));
        if priority_hit || !self.background {
            return priority_hit;
        }
        if peer_pieces.len() == self.have.len() {
            // Spare bits are clear in both, so a byte-wise test is exact.
            peer_pieces
                .as_bytes()
                .iter()
                .zip(self.have.as_bytes())
                .any(|(theirs, ours)| theirs & !ours != 0)
        } else {
            peer_pieces
                .iter_ones()
                .take_while(|&p| p < self.lengths.piece_count())
                .any(|p| !self.have.get(p))
        }
    }

    // ---- invariants ----

    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if self.check_each_call {
            self.check_invariants();
        }
    }

    /// Panics if the states, the request indexes, the rarity order or the priorities disagree.
    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        let count = self.lengths.piece_count();
        assert_eq!(self.states.len(), count as usize);
        assert_eq!(self.availability.len(), count as usize);
        let mut missing = 0;
        let mut requests_seen = 0usize;
        for p in 0..count {
            let state = self.states[p as usize];
            assert_eq!(self.have.get(p), state == PieceState::Have, "piece {p}");
            if state != PieceState::Have {
                missing += 1;
            }
            let ip = self.in_progress.get(&p);
            match state {
                PieceState::NotStarted | PieceState::Have => assert!(ip.is_none(), "piece {p}"),
                PieceState::Partial | PieceState::Hashing => {
                    let ip = ip.unwrap_or_else(|| panic!("piece {p} in progress without blocks"));
                    let (mut m, mut r) = (0u32, 0u32);
                    for (i, b) in ip.blocks.iter().enumerate() {
                        match b {
                            BlockState::Missing => m += 1,
                            BlockState::Received => r += 1,
                            BlockState::Requested(reqs) => {
                                assert!(!reqs.is_empty(), "piece {p} block {i}");
                                let block = ip.block_ref(p, i);
                                for (k, &(peer, at)) in reqs.iter().enumerate() {
                                    assert!(reqs[..k].iter().all(|(q, _)| *q != peer));
                                    let recorded = self
                                        .requests
                                        .by_peer
                                        .get(&peer)
                                        .and_then(|m| m.get(&block));
                                    assert_eq!(recorded, Some(&at), "{block:?} of {peer}");
                                    assert!(self.requests.by_time.contains(&(at, peer, block)));
                                    requests_seen += 1;
                                }
                            }
                        }
                    }
                    assert_eq!((ip.missing, ip.received), (m, r), "piece {p} counters");
                    assert!(
                        ip.contributors.len() <= r as usize,
                        "piece {p} contributors"
                    );
                    assert_eq!(ip.contributors.is_empty(), r == 0, "piece {p} contributors");
                    if state == PieceState::Hashing {
                        assert!(ip.is_complete(), "piece {p} hashing before complete");
                    } else {
                        assert!(!ip.is_complete(), "piece {p} complete but partial");
                        assert!(
                            (m as usize) < ip.blocks.len(),
                            "piece {p} partial with nothing requested or received"
                        );
                    }
                }
            }
        }
        assert_eq!(self.missing, missing);
        assert_eq!(
            self.in_progress.len(),
            self.states
                .iter()
                .filter(|s| matches!(s, PieceState::Partial | PieceState::Hashing))
                .count()
        );
        let per_peer: usize = self.requests.by_peer.values().map(HashMap::len).sum();
        assert!(self.requests.by_peer.values().all(|m| !m.is_empty()));
        assert_eq!(per_peer, requests_seen);
        assert_eq!(self.requests.by_time.len(), requests_seen);
        if !self.rarity.dirty {
            let not_started = self
                .states
                .iter()
                .filter(|&&s| s == PieceState::NotStarted)
                .count();
            assert_eq!(self.rarity.set.len(), not_started);
            for &(a, tag, p) in &self.rarity.set {
                assert_eq!(self.states[p as usize], PieceState::NotStarted);
                assert_eq!(
                    (a, tag),
                    (self.availability[p as usize], self.rarity.tags[p as usize])
                );
            }
        }
        assert_eq!(self.deadlines.len(), self.deadline_order.len());
        for (&p, &d) in &self.deadlines {
            assert!(self.deadline_order.contains(&(d, p)));
            assert_ne!(self.states[p as usize], PieceState::Have);
        }
        assert_eq!(self.readahead.len(), self.readahead_set.len());
        for &p in &self.readahead {
            assert!(self.readahead_set.contains(&p));
            assert_ne!(self.states[p as usize], PieceState::Have);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerKey = 1;
    const B: PeerKey = 2;
    const C: PeerKey = 3;
    /// Sends the block that makes a fixture piece partial.
    const FILLER: PeerKey = 99;

    /// Fixture pieces have two blocks.
    const PIECE_LEN: u32 = 2 * BLOCK_SIZE;

    fn lengths(pieces: u32) -> Lengths {
        Lengths::new(pieces as u64 * PIECE_LEN as u64, PIECE_LEN, pieces as u64).unwrap()
    }

    /// libtorrent-style fixture. `avail`: one digit per piece, how many peers have it. `state`: one
    /// char per piece: `*` have, `+` partial (block 0 received from FILLER), ` ` not started.
    fn setup_seeded(avail: &str, state: &str, seed: u64) -> Picker {
        assert_eq!(avail.len(), state.len(), "fixture strings differ in length");
        let count = avail.len() as u32;
        let have = bits(&state.replace('+', " "));
        let mut picker = Picker::with_have(lengths(count), &have, seed);
        for (i, c) in avail.chars().enumerate() {
            let n = c.to_digit(10).expect("availability digit");
            for _ in 0..n {
                picker.peer_has(picker.lengths.piece(i as u32).unwrap());
            }
        }
        let t0 = Instant::now();
        for (i, c) in state.chars().enumerate() {
            if c == '+' {
                let block = block(i as u32, 0);
                assert!(matches!(
                    picker.block_received(FILLER, block, t0),
                    BlockOutcome::Accepted { .. }
                ));
            }
        }
        picker
    }

    fn setup(avail: &str, state: &str) -> Picker {
        setup_seeded(avail, state, 1)
    }

    /// `*` is a set bit.
    fn bits(mask: &str) -> Bitfield {
        let mut bf = Bitfield::new(mask.len() as u32);
        for (i, c) in mask.chars().enumerate() {
            bf.set(i as u32, c == '*');
        }
        bf
    }

    fn block(piece: u32, index: u32) -> BlockRef {
        BlockRef {
            piece,
            offset: index * BLOCK_SIZE,
            length: BLOCK_SIZE,
        }
    }

    fn pi(p: &Picker, i: u32) -> PieceIndex {
        p.lengths.piece(i).unwrap()
    }

    /// "piece.block" per block, e.g. "4.0 4.1".
    fn show(blocks: &[BlockRef]) -> String {
        blocks
            .iter()
            .map(|b| format!("{}.{}", b.piece, b.offset / BLOCK_SIZE))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Picks one whole piece at a time for a peer that has everything; returns the piece order.
    fn piece_order(p: &mut Picker, now: Instant) -> Vec<u32> {
        let all = Bitfield::full(p.lengths.piece_count());
        let mut order = Vec::new();
        loop {
            let got = p.pick(A, &all, 2, now);
            let Some(first) = got.first() else { break };
            assert!(got.iter().all(|b| b.piece == first.piece), "{}", show(&got));
            order.push(first.piece);
        }
        order
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn unrequested_blocks_count_what_nobody_asked_for_yet() {
        let mut p = setup("1111", "....");
        let now = Instant::now();
        let all = bits("****");
        let p0 = pi(&p, 0);
        let per_piece = p.unrequested_blocks(p0);
        assert!(per_piece > 1);
        p.set_deadline(p0, now);
        let one = p.pick(1, &all, 1, now);
        assert_eq!(one, vec![block(0, 0)]);
        assert_eq!(p.unrequested_blocks(p0), per_piece - 1);
        p.block_rejected(1, block(0, 0));
        assert_eq!(p.unrequested_blocks(p0), per_piece);
    }

    #[test]
    fn rarest_first() {
        let mut p = setup("4213132", "       ");
        let order = piece_order(&mut p, Instant::now());
        assert_eq!(order.len(), 7);
        assert_eq!(sorted(order[0..2].to_vec()), vec![2, 4]);
        assert_eq!(sorted(order[2..4].to_vec()), vec![1, 6]);
        assert_eq!(sorted(order[4..6].to_vec()), vec![3, 5]);
        assert_eq!(order[6], 0);
    }

    #[test]
    fn held_pieces_are_never_picked() {
        let mut p = setup("1111111", "* * * *");
        assert_eq!(p.missing_count(), 3);
        assert_eq!(sorted(piece_order(&mut p, Instant::now())), vec![1, 3, 5]);
    }

    #[test]
    fn availability_changes_reorder_between_picks() {
        let mut p = setup("1111", "    ");
        let now = Instant::now();
        let all = Bitfield::full(4);
        p.peer_has(pi(&p, 0));
        p.peer_has(pi(&p, 1));
        p.peer_has(pi(&p, 3));
        // Only piece 2 is still at availability 1.
        assert_eq!(show(&p.pick(A, &all, 2, now)), "2.0 2.1");
        assert_eq!(p.availability(pi(&p, 3)), 2);
    }

    #[test]
    fn random_tie_break_differs_across_seeds_but_not_within_one() {
        let now = Instant::now();
        let order = |seed| {
            piece_order(
                &mut setup_seeded(&"1".repeat(16), &" ".repeat(16), seed),
                now,
            )
        };
        assert_eq!(order(7), order(7));
        let distinct: HashSet<Vec<u32>> = (0..8).map(order).collect();
        assert!(
            distinct.len() >= 7,
            "only {} distinct orders",
            distinct.len()
        );
        // Not simply piece order either.
        assert!(distinct.iter().any(|o| *o != (0..16).collect::<Vec<_>>()));
    }

    #[test]
    fn large_bitfields_rebuild_to_the_same_order_as_single_haves() {
        let n = 600; // more than INCREMENTAL_BITFIELD_LIMIT
        let now = Instant::now();
        let mut one_by_one = Picker::new(lengths(n), 5);
        let mut bulk = Picker::new(lengths(n), 5);
        let mut evens = Bitfield::new(n);
        for i in (0..n).step_by(2) {
            evens.set(i, true);
        }
        for round in [&Bitfield::full(n), &evens] {
            bulk.peer_has_bitfield(round);
            for i in round.iter_ones() {
                one_by_one.peer_has(pi(&one_by_one, i));
            }
        }
        assert!(bulk.rarity.dirty);
        let order = piece_order(&mut bulk, now);
        assert_eq!(piece_order(&mut one_by_one, now), order);
        assert!(
            order[..n as usize / 2].iter().all(|p| p % 2 == 1),
            "odd pieces are rarer"
        );
    }

    #[test]
    fn partial_pieces_before_new_ones_as_rare() {
        let mut p = setup("2221222", "   +   ");
        let now = Instant::now();
        let all = Bitfield::full(7);
        assert_eq!(show(&p.pick(A, &all, 1, now)), "3.1");
        let next = p.pick(A, &all, 1, now);
        assert_ne!(next[0].piece, 3);
        // A peer without the partial piece starts a new one.
        let mut q = setup("2221222", "   +   ");
        assert_ne!(q.pick(B, &bits("*** ***"), 1, now)[0].piece, 3);
    }

    /// The distribution experiment's defect: a leecher that got the first blocks of a common
    /// piece from another leecher asked the seed for the rest, so the seed kept sending copies
    /// of pieces the swarm held while pieces only it had waited. A started piece is finished
    /// from a peer only when that peer has no rarer piece to start.
    #[test]
    fn a_common_started_piece_waits_for_the_rarer_pieces_a_peer_can_start() {
        let mut p = setup("2229222", "   +   ");
        let now = Instant::now();
        let all = Bitfield::full(7);
        let got = p.pick(A, &all, 100, now);
        let pieces: Vec<u32> = got.iter().map(|b| b.piece).collect();
        let first_of_3 = pieces
            .iter()
            .position(|&x| x == 3)
            .expect("piece 3 is picked");
        assert!(
            pieces[..first_of_3].iter().collect::<HashSet<_>>().len() == 6,
            "the six rarer pieces come before the common started one: {}",
            show(&got)
        );
        // Without a rarer piece to start, the started piece comes first again.
        let mut q = setup("9999999", "   +   ");
        assert_eq!(show(&q.pick(A, &all, 1, now)), "3.1");
    }

    #[test]
    fn deadline_then_readahead_then_rarest_with_started_pieces_as_rare_first() {
        let mut p = setup("5555551", "  +    ");
        let t0 = Instant::now();
        p.set_deadline(pi(&p, 5), t0 + Duration::from_secs(2));
        p.set_deadline(pi(&p, 4), t0 + Duration::from_secs(3));
        p.set_deadline(pi(&p, 4), t0 + Duration::from_secs(1)); // earliest wins
        p.set_deadline(pi(&p, 4), t0 + Duration::from_secs(9)); // ignored: later
        p.set_readahead(&[pi(&p, 3), pi(&p, 0)]);
        let all = Bitfield::full(7);
        let mut got = Vec::new();
        loop {
            let b = p.pick(A, &all, 1, t0);
            if b.is_empty() {
                break;
            }
            got.extend(b);
        }
        assert_eq!(
            show(&got),
            // 6 (the only piece of availability 1) before the started 2 (availability 5);
            // once 6 is started, both are started and no rarer than 1: piece order.
            "4.0 4.1 5.0 5.1 3.0 3.1 0.0 0.1 6.0 2.1 6.1 1.0 1.1"
        );
    }

    #[test]
    fn verifying_a_piece_clears_its_deadline_and_readahead() {
        let mut p = setup("111", "   ");
        let t0 = Instant::now();
        p.set_deadline(pi(&p, 2), t0);
        p.set_readahead(&[pi(&p, 1)]);
        p.piece_verified(pi(&p, 2));
        p.piece_verified(pi(&p, 1));
        assert!(p.deadlines.is_empty() && p.readahead.is_empty());
        p.set_deadline(pi(&p, 2), t0); // held: ignored
        p.set_readahead(&[pi(&p, 1), pi(&p, 0), pi(&p, 0)]);
        assert!(p.deadlines.is_empty());
        assert_eq!(p.readahead, vec![0]);
        p.clear_deadline(pi(&p, 0));
    }

    #[test]
    fn background_off_fetches_only_deadline_and_readahead_pieces() {
        let mut p = setup("1111111", " +     ");
        let t0 = Instant::now();
        let all = Bitfield::full(7);
        p.set_background(false);
        assert!(!p.wants_any(&all));
        assert!(
            p.pick(A, &all, 100, t0).is_empty(),
            "not even the partial piece"
        );
        p.set_readahead(&[pi(&p, 5)]);
        p.set_deadline(pi(&p, 2), t0 + Duration::from_secs(5));
        assert!(p.wants_any(&all));
        assert!(!p.wants_any(&bits("** ** *")));
        assert_eq!(show(&p.pick(A, &all, 100, t0)), "2.0 2.1 5.0 5.1");
        // Data for a piece nobody asked for is dropped; for the partial one it is kept.
        assert_eq!(p.block_received(A, block(6, 0), t0), BlockOutcome::Unwanted);
        assert!(matches!(
            p.block_received(A, block(1, 1), t0),
            BlockOutcome::Accepted {
                piece_complete: true,
                ..
            }
        ));
        p.set_background(true);
        assert!(p.wants_any(&bits("      *")));
        assert!(!p.pick(A, &all, 100, t0).is_empty());
    }

    #[test]
    fn endgame_duplicates_and_cancels() {
        let mut p = setup("33", "* ");
        let t0 = Instant::now();
        let all = Bitfield::full(2);
        assert_eq!(show(&p.pick(A, &all, 10, t0)), "1.0 1.1");
        assert!(
            p.pick(A, &all, 10, t0).is_empty(),
            "never twice to one peer"
        );
        assert_eq!(show(&p.pick(B, &all, 10, t0)), "1.0 1.1");
        assert!(p.pick(C, &all, 10, t0).is_empty(), "at most two copies");
        assert_eq!(
            p.block_received(A, block(1, 0), t0),
            BlockOutcome::Accepted {
                piece_complete: false,
                cancel: vec![B]
            }
        );
        assert_eq!((p.in_flight(A), p.in_flight(B)), (1, 1));
        // C may now duplicate block 1 only if a copy is free: still two in flight.
        assert!(p.pick(C, &all, 10, t0).is_empty());
        assert_eq!(
            p.block_received(B, block(1, 1), t0),
            BlockOutcome::Accepted {
                piece_complete: true,
                cancel: vec![A]
            }
        );
        assert_eq!(p.block_received(A, block(1, 1), t0), BlockOutcome::Unwanted);
        assert_eq!((p.in_flight(A), p.in_flight(B)), (0, 0));
        p.piece_verified(pi(&p, 1));
        assert!(p.is_complete());
        assert!(!p.wants_any(&all));
    }

    #[test]
    fn no_endgame_while_the_peer_has_fresh_blocks() {
        let mut p = setup("11", "  ");
        let t0 = Instant::now();
        assert_eq!(show(&p.pick(A, &bits("* "), 10, t0)), "0.0 0.1");
        // B has piece 1 untouched: it gets that, then duplicates of 0 to fill up.
        assert_eq!(show(&p.pick(B, &bits("**"), 3, t0)), "1.0 1.1 0.0");
    }

    #[test]
    fn no_endgame_for_a_peer_with_few_pieces_while_others_are_unrequested() {
        let mut p = setup("111", "   ");
        let t0 = Instant::now();
        assert_eq!(show(&p.pick(A, &bits("*  "), 10, t0)), "0.0 0.1");
        // B has only piece 0, already in flight at A; pieces 1 and 2 are still untouched
        // (at other peers), so B gets no duplicates.
        assert!(p.pick(B, &bits("*  "), 10, t0).is_empty());
    }

    #[test]
    fn urgent_deadline_blocks_are_duplicated_when_their_request_is_stale() {
        let mut p = setup("1111", "    ");
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let all = Bitfield::full(4);
        p.set_deadline(pi(&p, 0), t0 + ms(2000));
        p.set_deadline(pi(&p, 1), t0 + ms(2000));
        assert_eq!(show(&p.pick(A, &bits("*   "), 2, t0)), "0.0 0.1");
        // Deadline 1 s away: not urgent, so B starts other pieces.
        let b1 = p.pick(B, &all, 2, t0 + ms(1000));
        assert_eq!(show(&b1), "1.0 1.1");
        // (A, which has only pieces 0 and 1, would be in endgame here and duplicate piece 1.)
        p.block_rejected(B, block(1, 0));
        p.block_rejected(B, block(1, 1));
        assert_eq!(show(&p.pick(A, &bits("**  "), 2, t0 + ms(1500))), "1.0 1.1");
        // 1.6 s: both deadlines within 500 ms. Piece 0's requests are 1.6 s old (stale), piece 1's
        // 100 ms (not stale), so B duplicates piece 0 and then starts a new piece.
        let got = p.pick(B, &all, 4, t0 + ms(1600));
        assert_eq!(show(&got[..2]), "0.0 0.1");
        assert!(got[2..].iter().all(|b| b.piece >= 2), "{}", show(&got));
        assert_eq!(got.len(), 4);
        assert_eq!(
            p.block_received(B, block(0, 1), t0 + ms(1700)),
            BlockOutcome::Accepted {
                piece_complete: false,
                cancel: vec![A]
            }
        );
    }

    #[test]
    fn expired_requests_move_to_another_peer() {
        let mut p = setup("22", "  ");
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let all = Bitfield::full(2);
        assert_eq!(p.pick(A, &all, 4, t0).len(), 4);
        assert!(p.expire_requests(t0 + s(3), s(5)).is_empty());
        let expired = p.expire_requests(t0 + s(6), s(5));
        assert_eq!(expired.len(), 4);
        assert!(expired.iter().all(|&(peer, _)| peer == A));
        assert_eq!(p.in_flight(A), 0);
        let to_b = p.pick(B, &all, 4, t0 + s(6));
        assert_eq!(
            sorted(
                to_b.iter()
                    .map(|b| b.piece * 2 + b.offset / BLOCK_SIZE)
                    .collect()
            ),
            vec![0, 1, 2, 3]
        );
        // A delivers late: still needed, so accepted, and B's copy is cancelled.
        assert_eq!(
            p.block_received(A, block(0, 0), t0 + s(7)),
            BlockOutcome::Accepted {
                piece_complete: false,
                cancel: vec![B]
            }
        );
        assert_eq!(p.in_flight(B), 3);
    }

    #[test]
    fn late_delivery_after_expiry_restarts_a_wanted_piece() {
        let mut p = setup("1", " ");
        let t0 = Instant::now();
        let s = Duration::from_secs;
        p.pick(A, &bits("*"), 1, t0);
        p.expire_requests(t0 + s(10), s(5));
        assert_eq!(p.states[0], PieceState::NotStarted);
        assert!(matches!(
            p.block_received(A, block(0, 0), t0 + s(11)),
            BlockOutcome::Accepted { .. }
        ));
        assert_eq!(show(&p.pick(B, &bits("*"), 5, t0 + s(11))), "0.1");
    }

    #[test]
    fn failed_piece_names_contributors_and_is_fetched_again() {
        let mut p = setup("3", " ");
        let t0 = Instant::now();
        let all = Bitfield::full(1);
        assert_eq!(show(&p.pick(A, &all, 1, t0)), "0.0");
        assert_eq!(show(&p.pick(B, &all, 1, t0)), "0.1");
        assert!(p.piece_failed(pi(&p, 0)).is_empty(), "not hashing yet");
        assert!(matches!(
            p.block_received(A, block(0, 0), t0),
            BlockOutcome::Accepted {
                piece_complete: false,
                ..
            }
        ));
        assert!(matches!(
            p.block_received(B, block(0, 1), t0),
            BlockOutcome::Accepted {
                piece_complete: true,
                ..
            }
        ));
        assert!(
            p.pick(C, &all, 5, t0).is_empty(),
            "hashing: nothing to request"
        );
        assert_eq!(p.block_received(C, block(0, 0), t0), BlockOutcome::Unwanted);
        assert_eq!(p.piece_failed(pi(&p, 0)), vec![A, B]);
        assert_eq!(show(&p.pick(C, &all, 5, t0)), "0.0 0.1");
        assert!(!p.is_complete());
    }

    #[test]
    fn lost_piece_is_wanted_again_only_when_asked_for() {
        let mut p = setup("111", "***");
        let t0 = Instant::now();
        let all = Bitfield::full(3);
        assert!(p.is_complete());
        p.set_background(false);
        p.piece_lost(pi(&p, 1));
        assert!(!p.has(pi(&p, 1)));
        assert_eq!(p.missing_count(), 1);
        assert!(!p.wants_any(&all));
        assert!(p.pick(A, &all, 10, t0).is_empty());
        p.set_readahead(&[pi(&p, 1)]);
        assert_eq!(show(&p.pick(A, &all, 10, t0)), "1.0 1.1");
        let mut q = setup("111", "***");
        q.piece_lost(pi(&q, 2));
        assert!(q.wants_any(&all));
        assert_eq!(show(&q.pick(A, &all, 10, t0)), "2.0 2.1");
    }

    #[test]
    fn a_peer_never_gets_a_block_it_has_in_flight() {
        let mut p = setup("111", "   ");
        let t0 = Instant::now();
        let all = Bitfield::full(3);
        p.set_max_duplicates(3);
        let first = p.pick(A, &all, 100, t0);
        assert_eq!(first.len(), 6);
        assert!(p.pick(A, &all, 100, t0).is_empty());
        assert_eq!(p.pick(B, &all, 100, t0).len(), 6);
        assert_eq!(p.pick(C, &all, 100, t0).len(), 6);
        assert!(p.pick(A, &all, 100, t0).is_empty());
        assert_eq!(p.in_flight(A), 6);
    }

    #[test]
    fn peer_gone_releases_requests_and_availability() {
        let mut p = setup("0000", "    ");
        let t0 = Instant::now();
        let all = Bitfield::full(4);
        p.peer_has_bitfield(&all);
        assert_eq!(p.pick(A, &all, 3, t0).len(), 3);
        p.peer_gone(A, &all);
        assert_eq!(p.in_flight(A), 0);
        assert!((0..4).all(|i| p.availability(pi(&p, i)) == 0));
        assert!(
            p.in_progress.is_empty(),
            "untouched pieces are not started any more"
        );
        assert!(
            p.pick(B, &all, 8, t0).is_empty(),
            "nobody is counted to have anything"
        );
        p.peer_has_bitfield(&bits("** *"));
        assert_eq!(p.pick(B, &bits("** *"), 8, t0).len(), 6);
    }

    #[test]
    fn rejected_and_choked_requests_go_back_to_the_pool() {
        let mut p = setup("22", "  ");
        let t0 = Instant::now();
        let all = Bitfield::full(2);
        let got = p.pick(A, &all, 4, t0);
        p.block_rejected(A, got[1]);
        p.block_rejected(A, got[1]); // twice: no effect
        p.block_rejected(B, got[2]); // not B's: no effect
        assert_eq!(p.in_flight(A), 3);
        let mut rest = got.clone();
        rest.remove(1);
        rest.sort_unstable();
        assert_eq!(p.peer_choked(A), rest);
        assert_eq!(p.in_flight(A), 0);
        assert_eq!(p.pick(B, &all, 10, t0).len(), 4);
    }

    #[test]
    fn bad_or_unwanted_blocks_are_dropped() {
        let mut p = setup("11", "* ");
        let t0 = Instant::now();
        let bad = [
            BlockRef {
                piece: 1,
                offset: 1,
                length: BLOCK_SIZE,
            },
            BlockRef {
                piece: 1,
                offset: 0,
                length: 7,
            },
            BlockRef {
                piece: 9,
                offset: 0,
                length: BLOCK_SIZE,
            },
            BlockRef {
                piece: 1,
                offset: 2 * BLOCK_SIZE,
                length: BLOCK_SIZE,
            },
            block(0, 0), // held
        ];
        for b in bad {
            assert_eq!(p.block_received(A, b, t0), BlockOutcome::Unwanted, "{b:?}");
            p.block_rejected(A, b);
        }
        assert!(matches!(
            p.block_received(A, block(1, 0), t0),
            BlockOutcome::Accepted { .. }
        ));
        assert_eq!(
            p.block_received(A, block(1, 0), t0),
            BlockOutcome::Unwanted,
            "duplicate"
        );
    }

    #[test]
    fn short_last_piece_and_block() {
        let l = Lengths::new(PIECE_LEN as u64 + 100, PIECE_LEN, 2).unwrap();
        let mut p = Picker::new(l, 3);
        p.peer_has_bitfield(&Bitfield::full(2));
        p.set_deadline(l.piece(1).unwrap(), Instant::now());
        let got = p.pick(A, &Bitfield::full(2), 1, Instant::now());
        assert_eq!(
            got,
            vec![BlockRef {
                piece: 1,
                offset: 0,
                length: 100
            }]
        );
        assert_eq!(
            p.block_received(A, got[0], Instant::now()),
            BlockOutcome::Accepted {
                piece_complete: true,
                cancel: vec![]
            }
        );
    }

    #[test]
    fn random_operations_keep_invariants() {
        let n = 24;
        let mut rng = StdRng::seed_from_u64(42);
        let mut p = Picker::new(lengths(n), 9);
        let t0 = Instant::now();
        let peers: Vec<(PeerKey, Bitfield)> = (1..=5)
            .map(|k| {
                let mut bf = Bitfield::new(n);
                for i in 0..n {
                    bf.set(i, rng.gen_bool(0.7));
                }
                (k, bf)
            })
            .collect();
        for (_, bf) in &peers {
            p.peer_has_bitfield(bf);
        }
        let mut connected = vec![true; peers.len()];
        for step in 0..4000u64 {
            let now = t0 + Duration::from_millis(step * 10);
            let i = rng.gen_range(0..peers.len());
            let (peer, bf) = (&peers[i].0, &peers[i].1);
            if !connected[i] {
                p.peer_has_bitfield(bf);
                connected[i] = true;
            }
            match rng.gen_range(0..100) {
                0..=39 => {
                    let mine: HashSet<BlockRef> = p
                        .requests
                        .by_peer
                        .get(peer)
                        .map(|m| m.keys().copied().collect())
                        .unwrap_or_default();
                    for b in p.pick(*peer, bf, rng.gen_range(0..6), now) {
                        assert!(!mine.contains(&b), "{b:?} twice to {peer}");
                        assert!(bf.get(b.piece) && !p.has(pi(&p, b.piece)));
                    }
                }
                40..=69 => {
                    let inflight: Vec<BlockRef> = p
                        .requests
                        .by_peer
                        .get(peer)
                        .map(|m| m.keys().copied().collect())
                        .unwrap_or_default();
                    if let Some(&b) = inflight.iter().min() {
                        if let BlockOutcome::Accepted {
                            piece_complete: true,
                            ..
                        } = p.block_received(*peer, b, now)
                        {
                            if rng.gen_bool(0.1) {
                                p.piece_failed(pi(&p, b.piece));
                            } else {
                                p.piece_verified(pi(&p, b.piece));
                            }
                        }
                    }
                }
                70..=74 => {
                    p.peer_choked(*peer);
                }
                75..=77 => {
                    p.peer_gone(*peer, bf);
                    connected[i] = false;
                }
                78..=81 => {
                    p.expire_requests(now, Duration::from_millis(500));
                }
                82..=85 => {
                    let piece = rng.gen_range(0..n);
                    p.set_deadline(pi(&p, piece), now + Duration::from_millis(300));
                }
                86..=88 => {
                    let start = rng.gen_range(0..n - 3);
                    let ra: Vec<PieceIndex> = (start..start + 3).map(|i| pi(&p, i)).collect();
                    p.set_readahead(&ra);
                }
                89..=91 => {
                    let piece = rng.gen_range(0..n);
                    p.piece_lost(pi(&p, piece));
                }
                92..=94 => p.set_background(rng.gen_bool(0.7)),
                _ => {
                    let piece = rng.gen_range(0..n);
                    p.block_received(*peer, block(piece, rng.gen_range(0..2)), now);
                }
            }
        }
    }

    /// Drives a single-seeder download of `pieces` pieces of 256 KiB to completion with a
    /// pipeline of `depth` blocks; returns the number of blocks requested.
    fn download_from_one_seeder(pieces: u32, depth: usize) -> (Picker, u64) {
        let piece_len = 256 * 1024;
        let l = Lengths::new(pieces as u64 * piece_len as u64, piece_len, pieces as u64).unwrap();
        let mut p = Picker::new(l, 1);
        p.check_each_call = false;
        let all = Bitfield::full(pieces);
        p.peer_has_bitfield(&all);
        let mut now = Instant::now();
        let mut queue = std::collections::VecDeque::new();
        let mut requested = 0u64;
        while !p.is_complete() {
            let got = p.pick(A, &all, depth - queue.len(), now);
            requested += got.len() as u64;
            queue.extend(got);
            let b = queue
                .pop_front()
                .expect("a single seeder always has something to send");
            now += Duration::from_micros(20);
            match p.block_received(A, b, now) {
                BlockOutcome::Accepted {
                    piece_complete,
                    cancel,
                } => {
                    assert!(cancel.is_empty());
                    if piece_complete {
                        p.piece_verified(pi(&p, b.piece));
                    }
                }
                BlockOutcome::Unwanted => panic!("{b:?} unwanted"),
            }
        }
        (p, requested)
    }

    #[test]
    fn one_gib_from_one_seeder_to_completion() {
        let (p, requested) = download_from_one_seeder(4096, 128);
        assert_eq!(requested, 4096 * 16, "each block requested exactly once");
        assert_eq!(p.missing_count(), 0);
        assert!(p.in_progress.is_empty() && p.requests.by_time.is_empty());
        #[cfg(debug_assertions)]
        p.check_invariants();
    }

    /// `cargo test --release --lib picker_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "prints a throughput figure"]
    fn picker_throughput() {
        for (pieces, depth) in [(4096, 128), (65536, 128), (4096, 512)] {
            let start = Instant::now();
            let (_, requested) = download_from_one_seeder(pieces, depth);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{pieces} pieces, depth {depth}: {requested} blocks in {secs:.3} s = {:.0} blocks/s",
                requested as f64 / secs
            );
        }
    }
}
