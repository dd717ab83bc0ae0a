//! One peer connection's protocol as a pure state machine (sans-IO, as quinn-proto's
//! `Connection`): inputs are decoded messages, commands from the torrent and ticks, each with
//! `now`; outputs are `Action`s taken with `poll_action`. The engine's peer task only moves bytes
//! and inputs; every decision made about one peer is here and unit-tested as "one input, one
//! action list".
//!
//! # Facts it owns
//! - Choke and interest, both ways, as last sent / received on the wire.
//! - The peer's bitfield, and a mirror of ours (fed by `Command::Have` / `Command::Lost`), so
//!   interest ("the peer has a piece we lack") is a counter, not a scan.
//! - Our requests to the peer, kept in two disjoint sets (as anacrolix does):
//!   `requested` are in flight and count against the pipeline; `cancelled` were cancelled by us,
//!   expired at the picker, or outstanding when the peer choked us. A block in either set may
//!   still arrive and is then accepted; a block in neither is a protocol violation.
//!   `cancelled` is bounded (oldest forgotten first), so a peer that chokes us with requests
//!   outstanding any number of times cannot grow it, and `requested` is never cleared wholesale.
//!   A block re-requested after we cancelled it is in both sets: the peer may send it twice
//!   (once for the cancelled request it had already served, once for the new one).
//!   `cancelled` counts copies: a block requested, cancelled, requested and cancelled again may
//!   arrive twice, and both are accepted.
//! - Fast-extension facts (their allowed-fast pieces), the extension handshake, rate samples.
//!
//! # Requests sized to the path
//! Each request remembers when it was sent. The least latency from a request to its block is
//! the path's round trip (`PathEstimate`): every other latency adds what queued ahead of it.
//! The queue target is the bandwidth-delay product that
//! estimate gives plus a margin (`queue_depth`), topped up once an eighth of it drained, so the
//! path stays full but little waits at the peer beyond it: a slow far peer gets a shallow
//! queue, and what we ask of it later (a read) does not wait behind seconds of bulk requests;
//! a fast near one gets a deep queue.
//! When a read waits (`Command::ReadWaiting`), requests beyond the bandwidth-delay product are
//! cancelled (BEP 3 cancel; a BEP 6 reject of a cancelled request is accepted quietly) so the
//! read's blocks go out next instead of behind them. Where the peer has already sent what we
//! cancel (a deep buffer on its uplink), cancelled blocks arrive anyway and asking for them
//! again would only send them twice: a peer whose cancelled blocks mostly arrive is not sent
//! cancels for a while (`cancel_futility`); the read's blocks are still asked for at once.
//!
//! The path's rate is the best tick of the last `RATE_WINDOW`: a dip (the picker had nothing,
//! hashing was behind, a read trimmed the queue) does not shrink the queue, which would make
//! the next tick's rate lower still.
//!
//! # Extensions (BEP 10)
//! `PeerConfig::extensions` names the extensions we offer; they get local ids 1, 2, ... in our
//! handshake. A message for one of them comes out as `Action::Extended { name, .. }`;
//! `Command::SendExtended` sends one with the id the peer chose. New extensions plug in by name.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::core::layout::{Bitfield, BlockRef, Lengths, PieceIndex, BLOCK_SIZE};
use crate::core::wire::{BlockRequest, ExtendedHandshake, Message, MAX_REQUEST_LEN};

/// A peer that sends nothing at all (not even keep-alives) for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// We send a keep-alive after this long without sending anything.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(90);
/// Requests kept in flight to a peer before anything is known of its path: a burst that a
/// far, slow peer serves in under a round trip or two (what we send first waits in its uplink
/// ahead of any read), and that a near one outgrows at its first rate sample.
pub const INITIAL_QUEUE: usize = 16;
/// Bounds of the queue target once the path is estimated. The ceiling stays below what other
/// clients accept from one peer (libtorrent: 500 by default; our own upload queue: 16 MiB).
pub const MIN_QUEUE: usize = 4;
pub const MAX_QUEUE: usize = 512;
/// The `reqq` of our extension handshake: requests a peer may have outstanding with us.
pub const ANNOUNCED_REQUEST_QUEUE: usize = 2 * MAX_QUEUE;
/// Time of the path's rate added to the round trip in the queue target: covers jitter in the
/// peer's and the engine's own latency. It is about what a read's blocks wait behind at the
/// peer, so it is kept short.
pub const QUEUE_SLACK: Duration = Duration::from_millis(20);
/// The slack while reads nobody anticipated (random access, seeks) come in, and for how long
/// after the last one: background requests yield, so what such a read waits behind at the
/// peer is about the path alone. Sequential streams, whose reads the readahead anticipates,
/// keep the full slack.
const YIELD_SLACK: Duration = Duration::from_millis(2);
const YIELD_FOR: Duration = Duration::from_secs(2);
/// The pipeline is topped up in batches of what the path delivers in this long (at least a
/// block, at most `MAX_QUEUE / 8`): one picker call per block on a slow path, batches on a
/// fast one.
const REFILL_SPAN: Duration = Duration::from_millis(2);
/// Ticks over which the path's rate is the best one seen.
const RATE_WINDOW: usize = 10;
/// Shortest span of a delivery-rate sample taken between ticks (and at least two round trips),
/// so a new peer's queue grows to its path within a fraction of a second, not at the first tick.
const RATE_SAMPLE_SPAN: Duration = Duration::from_millis(100);
/// Above this share of cancelled blocks arriving anyway, a waiting read sends no cancels.
const FUTILE_CANCELS: f64 = 0.5;
/// Round-trip samples are capped here (a peer that stalls is not a long path).
const MAX_RTT: Duration = Duration::from_secs(5);
/// Cancelled-but-may-still-arrive requests remembered per peer (oldest forgotten first).
pub const MAX_CANCELLED: usize = 4 * MAX_QUEUE;
/// Allowed-fast pieces remembered per peer.
const MAX_ALLOWED_FAST: usize = 64;
/// Requests in a row we could not serve (choked, or a piece we do not hold) past which the peer
/// is flooding us, not downloading: a fast peer choked with a full pipeline has a few hundred
/// in flight at most.
pub const MAX_REFUSED_REQUESTS: u32 = 1_000;

/// What the connection was set up with.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub lengths: Lengths,
    /// Both sides set the fast-extension bit (BEP 6).
    pub fast: bool,
    /// Both sides set the extension-protocol bit (BEP 10).
    pub extensions: bool,
    /// Our listen port and client name, for the extension handshake.
    pub listen_port: u16,
    pub client: String,
    /// Extensions we offer, by name; local ids are their positions + 1.
    pub offered_extensions: Vec<&'static str>,
    /// The size of our info dictionary, offered in the extension handshake (BEP 9).
    pub metadata_size: Option<u64>,
}

/// One input to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Message(Message),
    Command(Command),
    /// About once a second. `uploaded`: block bytes written to the socket since the last tick.
    Tick {
        uploaded: u64,
    },
}

/// What the torrent (or the peer task on its behalf) tells one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// We verified this piece: announce it.
    Have(u32),
    /// We no longer hold this piece (evicted from memory, no data dir): we lack it again.
    Lost(u32),
    Choke,
    Unchoke,
    /// Another peer delivered this block first: cancel it here.
    Cancel(BlockRef),
    /// The picker gave these requests to other peers after a timeout; this peer may still
    /// deliver them, but they no longer count against its pipeline.
    Expired(Vec<BlockRef>),
    /// New work may be available (a read arrived, a backlog drained): top up requests.
    Fill,
    /// The blocks the picker chose in answer to `Action::WantBlocks`.
    Picked(Vec<BlockRef>),
    /// A read waits for these pieces, whose blocks are not all requested; `share` is about this
    /// peer's part of them. If the peer has one, requests beyond its bandwidth-delay product
    /// are cancelled to make room and the picker is asked for blocks at once.
    ReadWaiting {
        pieces: Vec<u32>,
        share: usize,
        /// Pieces some read waits for (this one's and earlier ones'): their requests are
        /// never withdrawn, so one read does not push another's blocks back.
        urgent: Vec<u32>,
    },
    /// The data for an `Action::Upload` is not available (evicted, or our send queue is full).
    UploadUnavailable(BlockRequest),
    /// Send an extension message, if the peer supports the extension.
    SendExtended {
        name: &'static str,
        payload: Bytes,
    },
}

/// Why the state machine wants the connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Violation(String),
    Idle(Duration),
}

/// One thing for the peer task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Message),
    /// Serve this block of a verified piece (or answer `Command::UploadUnavailable`).
    Upload(BlockRequest),
    /// The peer cancelled this request: drop it if it is still queued (BEP 3).
    CancelUpload(BlockRequest),
    /// The peer announced one more piece.
    PeerHas(PieceIndex),
    /// The peer's first statement of what it has (a bitfield or have-all).
    PeerBitfield(Bitfield),
    /// The peer now has every piece.
    PeerIsSeed,
    /// The peer's interest in us changed.
    PeerInterested(bool),
    /// The peer choked us: the picker releases every request we had there.
    ChokedUs,
    /// The peer unchoked us (before the `WantBlocks` that follows).
    UnchokedUs,
    /// A block we asked for arrived (the picker decides whether it is still wanted).
    BlockArrived {
        block: BlockRef,
        data: Bytes,
    },
    /// The peer will not send this block (fast extension).
    Rejected(BlockRef),
    /// We cancelled these requests to make room for a read's: the picker releases them.
    Withdrawn(Vec<BlockRef>),
    /// Ask the picker for up to this many blocks; answer with `Command::Picked`.
    WantBlocks(usize),
    /// A message of an extension we offered.
    Extended {
        name: &'static str,
        payload: Bytes,
    },
    /// The path's estimate after a tick, once it has a round trip and a rate (for choosing
    /// which peers a read's blocks go to).
    PathEstimated {
        rtt: Duration,
        /// Bytes/s.
        rate: u64,
    },
    /// Rates after a tick (bytes/s), for the choker and progress lines.
    Rates {
        download: u64,
        upload: u64,
    },
    Close(CloseReason),
}

pub struct PeerProto {
    cfg: PeerConfig,
    /// Requests refused in a row (see `MAX_REFUSED_REQUESTS`).
    refused_requests: u32,
    am_choking: bool,
    am_interested: bool,
    peer_choking: bool,
    peer_interested: bool,
    theirs: Bitfield,
    ours: Bitfield,
    /// Pieces the peer has that we lack: we are interested iff this is non-zero.
    lacking: u32,
    /// A bitfield, have-all, have-none or have was received.
    availability_known: bool,
    requested: HashMap<BlockRef, Sent>,
    /// Copies of each cancelled block that may still arrive.
    cancelled: HashMap<BlockRef, u32>,
    cancelled_order: VecDeque<BlockRef>,
    allowed_fast: Vec<u32>,
    their_handshake: Option<ExtendedHandshake>,
    queue_target: usize,
    path: PathEstimate,
    /// Delivery rate of each of the last `RATE_WINDOW` ticks (bytes/s): the tick's average or
    /// its best sample, whichever is higher.
    recent_rates: VecDeque<f64>,
    /// The delivery-rate sample being taken: since the block that opened it, and bytes since.
    sample_since: Option<Instant>,
    sample_bytes: u64,
    /// The best sample of the current tick (bytes/s).
    tick_best_rate: f64,
    /// Requests cancelled for a waiting read, not yet answered (bounded by `MAX_CANCELLED`).
    withdrawn: HashSet<BlockRef>,
    /// Until when background requests yield to reads (`YIELD_SLACK`).
    yield_until: Option<Instant>,
    /// Smoothed share of withdrawn requests whose block came anyway (1) rather than a reject
    /// (0); decays each tick so cancels are tried again.
    cancel_futility: f64,
    downloaded_since_tick: u64,
    download_rate: f64,
    upload_rate: f64,
    last_tick: Instant,
    last_received: Instant,
    last_sent: Instant,
    actions: VecDeque<Action>,
}

impl PeerProto {
    /// A connection whose handshakes are done. `ours` is what we hold now; the opening messages
    /// (our bitfield, the extension handshake) are queued at once.
    pub fn new(cfg: PeerConfig, ours: Bitfield, now: Instant) -> PeerProto {
        let n = cfg.lengths.piece_count();
        let mut p = PeerProto {
            refused_requests: 0,
            am_choking: true,
            am_interested: false,
            peer_choking: true,
            peer_interested: false,
            theirs: Bitfield::new(n),
            ours,
            lacking: 0,
            availability_known: false,
            requested: HashMap::new(),
            cancelled: HashMap::new(),
            cancelled_order: VecDeque::new(),
            allowed_fast: Vec::new(),
            their_handshake: None,
            queue_target: INITIAL_QUEUE,
            path: PathEstimate::default(),
            recent_rates: VecDeque::new(),
            sample_since: None,
            sample_bytes: 0,
            tick_best_rate: 0.0,
            withdrawn: HashSet::new(),
            yield_until: None,
            cancel_futility: 0.0,
            downloaded_since_tick: 0,
            download_rate: 0.0,
            upload_rate: 0.0,
            last_tick: now,
            last_received: now,
            last_sent: now,
            actions: VecDeque::new(),
            cfg,
        };
        p.open(now);
        p
    }

    fn open(&mut self, now: Instant) {
        let have = self.ours.count_ones();
        if self.cfg.fast && self.ours.all() {
            self.send(Message::HaveAll, now);
        } else if self.cfg.fast && have == 0 {
            self.send(Message::HaveNone, now);
        } else if have > 0 {
            let bf = Bytes::copy_from_slice(self.ours.as_bytes());
            self.send(Message::Bitfield(bf), now);
        }
        if self.cfg.extensions {
            let hs = ExtendedHandshake {
                extensions: self
                    .cfg
                    .offered_extensions
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (name.to_string(), i as u8 + 1))
                    .collect(),
                client: Some(self.cfg.client.clone()),
                listen_port: Some(self.cfg.listen_port),
                request_queue: Some(ANNOUNCED_REQUEST_QUEUE as u32),
                metadata_size: self.cfg.metadata_size,
            };
            let payload = Bytes::from(hs.encode());
            self.send(Message::Extended { id: 0, payload }, now);
        }
    }

    /// The next action, in the order decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Message(m) => {
                self.last_received = now;
                if let Err(reason) = self.on_message(m, now) {
                    self.actions.push_back(Action::Close(reason));
                }
            }
            Input::Command(c) => self.on_command(c, now),
            Input::Tick { uploaded } => self.on_tick(uploaded, now),
        }
    }

    // ---- read-only views ----

    /// The id the peer gave extension `name` in its handshake (None: not supported).
    pub fn their_extension_id(&self, name: &str) -> Option<u8> {
        let hs = self.their_handshake.as_ref()?;
        hs.extensions
            .iter()
            .find(|(n, id)| n == name && *id != 0)
            .map(|(_, id)| *id)
    }

    /// The listen port the peer gave in its extension handshake.
    pub fn their_listen_port(&self) -> Option<u16> {
        self.their_handshake.as_ref()?.listen_port
    }

    pub fn bitfield(&self) -> &Bitfield {
        &self.theirs
    }
    /// Requests in flight (not cancelled).
    pub fn in_flight(&self) -> usize {
        self.requested.len()
    }
    /// Requests cancelled, expired or choked away that may still arrive.
    pub fn cancelled_count(&self) -> usize {
        self.cancelled.len()
    }
    pub fn queue_target(&self) -> usize {
        self.queue_target
    }
    pub fn path(&self) -> PathEstimate {
        self.path
    }
    pub fn allowed_fast(&self) -> &[u32] {
        &self.allowed_fast
    }

    // ---- outputs ----

    fn send(&mut self, m: Message, now: Instant) {
        self.last_sent = now;
        self.actions.push_back(Action::Send(m));
    }

    fn set_interest(&mut self, now: Instant) {
        let wants = self.lacking > 0;
        if wants != self.am_interested {
            self.am_interested = wants;
            let m = if wants {
                Message::Interested
            } else {
                Message::NotInterested
            };
            self.send(m, now);
        }
    }

    /// Tops up the pipeline: asks the picker for blocks once a refill batch has drained.
    fn fill(&mut self) {
        if self.peer_choking || !self.am_interested {
            return;
        }
        let batch = refill_batch(self.path.rate);
        if self.requested.len() + batch > self.queue_target {
            return;
        }
        self.actions
            .push_back(Action::WantBlocks(self.queue_target - self.requested.len()));
    }

    fn cancel_request(&mut self, block: BlockRef) {
        if self.requested.remove(&block).is_none() {
            return;
        }
        let copies = self.cancelled.entry(block).or_insert(0);
        *copies += 1;
        if *copies == 1 {
            self.cancelled_order.push_back(block);
            while self.cancelled_order.len() > MAX_CANCELLED {
                if let Some(old) = self.cancelled_order.pop_front() {
                    self.cancelled.remove(&old);
                }
            }
        }
    }

    /// A block we may receive: in flight or cancelled. Removes it from whichever set holds it.
    fn take_request(&mut self, block: &BlockRef, now: Instant) -> bool {
        if let Some(sent) = self.requested.remove(block) {
            // A block also cancelled earlier may be the copy of that older request: its
            // latency from the new one would be too short to be a round trip.
            if !self.cancelled.contains_key(block) {
                self.path.delivered(sent, now);
            }
            return true;
        }
        if let Some(copies) = self.cancelled.get_mut(block) {
            *copies -= 1;
            if *copies == 0 {
                self.cancelled.remove(block);
            }
            if self.withdrawn.remove(block) {
                self.judge_cancel(true);
            }
            // `cancelled_order` is pruned lazily: stale entries are skipped when popped.
            if self.cancelled_order.len() > 2 * self.cancelled.len() + MAX_QUEUE {
                let live = &self.cancelled;
                self.cancelled_order.retain(|b| live.contains_key(b));
            }
            return true;
        }
        false
    }

    // ---- commands ----

    fn on_command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Have(i) => {
                if i < self.ours.len() && !self.ours.get(i) {
                    self.ours.set(i, true);
                    if self.theirs.get(i) {
                        self.lacking -= 1;
                    }
                }
                self.send(Message::Have(i), now);
                self.set_interest(now);
            }
            Command::Lost(i) => {
                if i < self.ours.len() && self.ours.get(i) {
                    self.ours.set(i, false);
                    if self.theirs.get(i) {
                        self.lacking += 1;
                    }
                    self.set_interest(now);
                }
            }
            Command::Choke => {
                if !self.am_choking {
                    self.am_choking = true;
                    self.send(Message::Choke, now);
                }
            }
            Command::Unchoke => {
                if self.am_choking {
                    self.am_choking = false;
                    self.send(Message::Unchoke, now);
                }
            }
            Command::Cancel(b) => {
                if self.requested.contains_key(&b) {
                    self.cancel_request(b);
                    self.send(Message::Cancel(request_of(b)), now);
                }
            }
            Command::Expired(blocks) => {
                for b in blocks {
                    self.cancel_request(b);
                }
                self.fill();
            }
            Command::Fill => self.fill(),
            Command::Picked(blocks) => {
                for b in blocks {
                    let sent = Sent {
                        at: now,
                        ahead: self.requested.len() as u32,
                    };
                    if let std::collections::hash_map::Entry::Vacant(e) = self.requested.entry(b) {
                        e.insert(sent);
                        // Still in `cancelled` if it was: the cancelled copy may arrive too.
                        self.send(Message::Request(request_of(b)), now);
                    }
                }
            }
            Command::ReadWaiting {
                pieces,
                share,
                urgent,
            } => self.read_waiting(&pieces, share, &urgent, now),
            Command::UploadUnavailable(r) => {
                if self.cfg.fast {
                    self.send(Message::Reject(r), now);
                }
            }
            Command::SendExtended { name, payload } => {
                if let Some(id) = self.their_extension_id(name) {
                    self.send(Message::Extended { id, payload }, now);
                }
            }
        }
    }

    /// What the queue target allows beyond the path's bandwidth-delay product, in time.
    fn slack(&self, now: Instant) -> Duration {
        match self.yield_until {
            Some(until) if now < until => YIELD_SLACK,
            _ => QUEUE_SLACK,
        }
    }

    /// A read waits for `pieces`: background requests yield for `YIELD_FOR`. If the peer has
    /// one of the pieces and a `share` of their blocks, cancel the newest requests beyond the
    /// path's bandwidth-delay product (the read's blocks would be served after them; the older
    /// ones are on their way already) and ask the picker at once for `share` blocks, whatever
    /// the refill rule says; it returns deadline blocks first. The pipeline refills with
    /// bulk only as it drains, so cancelled blocks the peer had already sent are accepted when
    /// they come rather than asked for again.
    fn read_waiting(&mut self, pieces: &[u32], share: usize, urgent: &[u32], now: Instant) {
        self.yield_until = Some(now + YIELD_FOR);
        if self.path.rate > 0.0 {
            self.queue_target = queue_depth(self.path.rate, self.path.rtt, YIELD_SLACK);
        }
        if self.peer_choking || !self.am_interested {
            return;
        }
        let n = self.theirs.len();
        if share == 0 || !pieces.iter().any(|&p| p < n && self.theirs.get(p)) {
            // Given a share of pieces it lacks: it still tops up, as `Fill` would, so the
            // read's blocks also reach it through the picker if others have them.
            self.fill();
            return;
        }
        let cancel = match self.cancel_futility < FUTILE_CANCELS {
            true => self.requested.len().saturating_sub(self.path.bdp_blocks()),
            false => 0,
        };
        if cancel > 0 {
            let mut newest: Vec<(Sent, BlockRef)> = self
                .requested
                .iter()
                .filter(|(b, _)| !urgent.contains(&b.piece))
                .map(|(b, s)| (*s, *b))
                .collect();
            newest.sort_unstable_by(|a, b| b.cmp(a));
            let withdrawn: Vec<BlockRef> = newest.iter().take(cancel).map(|(_, b)| *b).collect();
            if self.withdrawn.len() + withdrawn.len() > MAX_CANCELLED {
                let live = &self.cancelled;
                self.withdrawn.retain(|b| live.contains_key(b));
            }
            for &b in &withdrawn {
                self.cancel_request(b);
                self.send(Message::Cancel(request_of(b)), now);
                if self.withdrawn.len() < MAX_CANCELLED {
                    self.withdrawn.insert(b);
                }
            }
            self.actions.push_back(Action::Withdrawn(withdrawn));
        }
        self.actions
            .push_back(Action::WantBlocks(share.clamp(1, MAX_QUEUE)));
    }

    /// `len` bytes of a block arrived: counted for the tick, and for the rate sample, which
    /// closes once it spans `RATE_SAMPLE_SPAN` and two round trips. A sample above the path's
    /// rate raises it (and the queue target) at once; lower ones wait for the tick's verdict.
    fn on_delivered(&mut self, len: u64, now: Instant) {
        self.downloaded_since_tick += len;
        let Some(since) = self.sample_since else {
            self.sample_since = Some(now);
            self.sample_bytes = 0;
            return;
        };
        self.sample_bytes += len;
        let span = now.saturating_duration_since(since);
        let min_span = RATE_SAMPLE_SPAN.max(2 * self.path.rtt.unwrap_or_default());
        if span < min_span {
            return;
        }
        let rate = self.sample_bytes as f64 / span.as_secs_f64();
        self.tick_best_rate = self.tick_best_rate.max(rate);
        if rate > self.path.rate {
            self.path.rate = rate;
            self.queue_target = queue_depth(self.path.rate, self.path.rtt, self.slack(now));
        }
        self.sample_since = Some(now);
        self.sample_bytes = 0;
    }

    /// A withdrawn request was answered: its block came anyway (`futile`) or was rejected.
    fn judge_cancel(&mut self, futile: bool) {
        let sample = if futile { 1.0 } else { 0.0 };
        self.cancel_futility = 0.75 * self.cancel_futility + 0.25 * sample;
    }

    // ---- ticks ----

    fn on_tick(&mut self, uploaded: u64, now: Instant) {
        if now.saturating_duration_since(self.last_received) >= IDLE_TIMEOUT {
            self.actions
                .push_back(Action::Close(CloseReason::Idle(IDLE_TIMEOUT)));
            return;
        }
        let dt = now
            .saturating_duration_since(self.last_tick)
            .as_secs_f64()
            .max(0.001);
        self.last_tick = now;
        let down = self.downloaded_since_tick as f64 / dt;
        let up = uploaded as f64 / dt;
        self.downloaded_since_tick = 0;
        // A short EWMA: responsive enough for 10 s choke rounds.
        self.download_rate = 0.6 * self.download_rate + 0.4 * down;
        self.upload_rate = 0.6 * self.upload_rate + 0.4 * up;
        if self.recent_rates.len() == RATE_WINDOW {
            self.recent_rates.pop_front();
        }
        self.recent_rates.push_back(down.max(self.tick_best_rate));
        self.tick_best_rate = 0.0;
        self.path.rate = self.recent_rates.iter().copied().fold(0.0, f64::max);
        self.cancel_futility *= 0.9;
        if self.path.rate > 0.0 {
            self.queue_target = queue_depth(self.path.rate, self.path.rtt, self.slack(now));
        }
        self.actions.push_back(Action::Rates {
            download: self.download_rate as u64,
            upload: self.upload_rate as u64,
        });
        if let Some(rtt) = self.path.rtt.filter(|_| self.path.rate >= 1.0) {
            let rate = self.path.rate as u64;
            self.actions.push_back(Action::PathEstimated { rtt, rate });
        }
        if now.saturating_duration_since(self.last_sent) >= KEEPALIVE_EVERY {
            self.send(Message::KeepAlive, now);
        }
        self.fill();
    }

    // ---- messages ----

    fn on_message(&mut self, msg: Message, now: Instant) -> Result<(), CloseReason> {
        let n = self.cfg.lengths.piece_count();
        match msg {
            Message::KeepAlive => {}
            Message::Bitfield(bytes) => {
                let bf = Bitfield::from_bytes(&bytes, n)
                    .ok_or_else(|| violation("bitfield of the wrong size"))?;
                self.on_bitfield(bf, now);
            }
            Message::HaveAll | Message::HaveNone if !self.cfg.fast => {
                return Err(violation("fast-extension message without the fast bit"));
            }
            Message::HaveAll => self.on_bitfield(Bitfield::full(n), now),
            Message::HaveNone => self.availability_known = true,
            Message::Have(i) => {
                let p = self
                    .cfg
                    .lengths
                    .piece(i)
                    .ok_or_else(|| violation(format!("have for piece {i} of {n}")))?;
                self.availability_known = true;
                if self.add_piece(p) {
                    self.set_interest(now);
                    self.fill();
                }
            }
            Message::Choke => {
                if !self.peer_choking {
                    self.peer_choking = true;
                    // A fast peer rejects what it will not send; a plain one discards it
                    // (BEP 3), but may have sent it before the choke: either way the blocks
                    // may still arrive, so they move to `cancelled`, never into the void.
                    let blocks: Vec<BlockRef> = self.requested.keys().copied().collect();
                    for b in blocks {
                        self.cancel_request(b);
                    }
                    self.actions.push_back(Action::ChokedUs);
                }
            }
            Message::Unchoke => {
                if self.peer_choking {
                    self.peer_choking = false;
                    self.actions.push_back(Action::UnchokedUs);
                    self.fill();
                }
            }
            Message::Interested | Message::NotInterested => {
                let interested = msg == Message::Interested;
                if interested != self.peer_interested {
                    self.peer_interested = interested;
                    self.actions.push_back(Action::PeerInterested(interested));
                }
            }
            Message::Request(r) => self.on_request(r, now)?,
            Message::Piece {
                piece,
                offset,
                data,
            } => {
                let block = self
                    .cfg
                    .lengths
                    .block(piece, offset, data.len() as u32)
                    .ok_or_else(|| violation("piece message outside our block geometry"))?;
                if !self.take_request(&block, now) {
                    return Err(violation(format!(
                        "piece {piece}@{offset} that we did not request"
                    )));
                }
                self.on_delivered(data.len() as u64, now);
                self.actions.push_back(Action::BlockArrived { block, data });
                self.fill();
            }
            Message::Cancel(r) => self.actions.push_back(Action::CancelUpload(r)),
            Message::Reject(r) => {
                if !self.cfg.fast {
                    return Err(violation("reject without the fast bit"));
                }
                if let Some(b) = self.cfg.lengths.block(r.piece, r.offset, r.length) {
                    let in_flight = self.requested.contains_key(&b);
                    if !in_flight && self.withdrawn.remove(&b) {
                        self.judge_cancel(false);
                    }
                    if self.take_request(&b, now) && in_flight {
                        self.actions.push_back(Action::Rejected(b));
                        self.fill();
                    }
                }
            }
            Message::AllowedFast(i) => {
                if self.cfg.fast
                    && i < n
                    && self.allowed_fast.len() < MAX_ALLOWED_FAST
                    && !self.allowed_fast.contains(&i)
                {
                    self.allowed_fast.push(i);
                }
            }
            Message::Extended { id: 0, payload } => {
                // A malformed handshake is ignored, as other clients do: the base protocol
                // still works without it.
                if let Ok(hs) = ExtendedHandshake::decode(&payload) {
                    self.their_handshake = Some(hs);
                }
            }
            Message::Extended { id, payload } => {
                let index = id as usize - 1;
                if let Some(&name) = self.cfg.offered_extensions.get(index) {
                    self.actions.push_back(Action::Extended { name, payload });
                }
            }
            Message::Port(_) | Message::Suggest(_) | Message::Unknown { .. } => {}
        }
        Ok(())
    }

    /// Records one more piece of the peer's; false if it was known.
    fn add_piece(&mut self, p: PieceIndex) -> bool {
        let i = p.get();
        if self.theirs.get(i) {
            return false;
        }
        self.theirs.set(i, true);
        if !self.ours.get(i) {
            self.lacking += 1;
        }
        self.actions.push_back(Action::PeerHas(p));
        if self.theirs.all() {
            self.actions.push_back(Action::PeerIsSeed);
        }
        true
    }

    /// A bitfield or have-all. Normally the first statement of what the peer has; clients
    /// differ in what comes before it (libtorrent its extension handshake, aria2 allowed-fast
    /// messages), and aria2 sends one after have-none, which then only adds pieces.
    fn on_bitfield(&mut self, bf: Bitfield, now: Instant) {
        if self.availability_known {
            for i in bf.iter_ones() {
                if let Some(p) = self.cfg.lengths.piece(i) {
                    self.add_piece(p);
                }
            }
        } else {
            self.availability_known = true;
            let ours = &self.ours;
            self.lacking = bf.iter_ones().filter(|&i| !ours.get(i)).count() as u32;
            let seed = bf.all();
            self.theirs = bf.clone();
            self.actions.push_back(Action::PeerBitfield(bf));
            if seed {
                self.actions.push_back(Action::PeerIsSeed);
            }
        }
        self.set_interest(now);
        self.fill();
    }

    fn on_request(&mut self, r: BlockRequest, now: Instant) -> Result<(), CloseReason> {
        if r.length > MAX_REQUEST_LEN {
            return Err(violation(format!("request of {} bytes", r.length)));
        }
        if !self
            .cfg
            .lengths
            .request_in_bounds(r.piece, r.offset, r.length)
        {
            return Err(violation("request outside the torrent"));
        }
        if self.am_choking || !self.ours.get(r.piece) {
            self.refused_requests += 1;
            if self.refused_requests > MAX_REFUSED_REQUESTS {
                return Err(violation(format!(
                    "{} requests in a row that we could not serve",
                    self.refused_requests
                )));
            }
            if self.cfg.fast {
                self.send(Message::Reject(r), now);
            }
            return Ok(());
        }
        self.refused_requests = 0;
        self.actions.push_back(Action::Upload(r));
        Ok(())
    }
}

/// When a request was sent and how many were in flight to the peer ahead of it. Ordered by
/// time, then position: the greatest is the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Sent {
    at: Instant,
    ahead: u32,
}

/// One peer's path as we see it: round trip and delivery rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathEstimate {
    /// Round trip: the least latency seen from a request to its block.
    pub rtt: Option<Duration>,
    /// Delivery rate, bytes/s (0 until the first tick with data).
    pub rate: f64,
}

impl PathEstimate {
    /// A block requested at `sent` arrived at `now`: its latency is the round trip plus what
    /// queued ahead of it, so the least one seen is the round trip. Not an average: behind a
    /// deep uplink buffer a full pipe never drains, and averaging would count our own queue as
    /// distance, which raises the queue target, which lengthens the queue.
    fn delivered(&mut self, sent: Sent, now: Instant) {
        let latency = now.saturating_duration_since(sent.at).min(MAX_RTT);
        self.rtt = Some(self.rtt.map_or(latency, |old| old.min(latency)));
    }

    /// Requests that fill the path (bandwidth-delay product), at least `MIN_QUEUE`.
    fn bdp_blocks(&self) -> usize {
        let rtt = self.rtt.unwrap_or_default().as_secs_f64();
        let bdp = (self.rate * rtt / BLOCK_SIZE as f64).ceil();
        (bdp.min(MAX_QUEUE as f64) as usize).max(MIN_QUEUE)
    }
}

/// The queue target for a path of `rate` bytes/s and round trip `rtt`: the rate times the
/// round trip plus `slack`, plus a refill batch, within `MIN_QUEUE..=MAX_QUEUE`. Topped
/// up whenever a batch drained, the pipeline never holds less than the bandwidth-delay product
/// plus the slack; what waits at the peer beyond the path (and delays a read's blocks) is the
/// slack and a batch.
pub fn queue_depth(rate: f64, rtt: Option<Duration>, slack: Duration) -> usize {
    let rtt = rtt.unwrap_or_default().as_secs_f64();
    let seconds = rtt + slack.as_secs_f64();
    let blocks = (rate.max(0.0) * seconds / BLOCK_SIZE as f64).ceil() + refill_batch(rate) as f64;
    (blocks.min(MAX_QUEUE as f64) as usize).max(MIN_QUEUE)
}

/// Blocks asked for at once when topping up a path of `rate` bytes/s.
fn refill_batch(rate: f64) -> usize {
    let blocks = rate.max(0.0) * REFILL_SPAN.as_secs_f64() / BLOCK_SIZE as f64;
    (blocks as usize).clamp(1, MAX_QUEUE / 8)
}

fn violation(what: impl Into<String>) -> CloseReason {
    CloseReason::Violation(what.into())
}

fn request_of(b: BlockRef) -> BlockRequest {
    BlockRequest {
        piece: b.piece,
        offset: b.offset,
        length: b.length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::layout::BLOCK_SIZE;

    const PIECES: u32 = 8;
    const PIECE_LEN: u32 = 4 * BLOCK_SIZE;

    fn cfg(fast: bool) -> PeerConfig {
        PeerConfig {
            lengths: Lengths::new(PIECES as u64 * PIECE_LEN as u64, PIECE_LEN, PIECES as u64)
                .unwrap(),
            fast,
            extensions: false,
            listen_port: 6881,
            client: "test".into(),
            offered_extensions: Vec::new(),
            metadata_size: None,
        }
    }

    /// Our pieces as a string: `#` held, `.` not.
    fn bits(s: &str) -> Bitfield {
        let mut bf = Bitfield::new(s.len() as u32);
        for (i, c) in s.chars().enumerate() {
            bf.set(i as u32, c == '#');
        }
        bf
    }

    struct Harness {
        proto: PeerProto,
        now: Instant,
    }

    impl Harness {
        fn new(fast: bool, ours: &str) -> Harness {
            let now = Instant::now();
            let mut h = Harness {
                proto: PeerProto::new(cfg(fast), bits(ours), now),
                now,
            };
            h.drain();
            h
        }
        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.proto.poll_action()).collect()
        }
        fn msg(&mut self, m: Message) -> Vec<Action> {
            self.proto.handle(Input::Message(m), self.now);
            self.drain()
        }
        fn cmd(&mut self, c: Command) -> Vec<Action> {
            self.proto.handle(Input::Command(c), self.now);
            self.drain()
        }
        fn tick(&mut self, after: Duration, uploaded: u64) -> Vec<Action> {
            self.now += after;
            self.proto.handle(Input::Tick { uploaded }, self.now);
            self.drain()
        }
        /// A seed peer that unchoked us; the pipeline's first request is drained.
        fn unchoked_by_seed(fast: bool) -> Harness {
            let mut h = Harness::new(fast, "........");
            h.msg(Message::Bitfield(Bytes::from_static(&[0xff])));
            assert_eq!(
                h.msg(Message::Unchoke),
                vec![Action::UnchokedUs, Action::WantBlocks(INITIAL_QUEUE)]
            );
            h
        }
    }

    fn pi(i: u32) -> PieceIndex {
        cfg(false).lengths.piece(i).unwrap()
    }

    fn block(piece: u32, index: u32) -> BlockRef {
        BlockRef {
            piece,
            offset: index * BLOCK_SIZE,
            length: BLOCK_SIZE,
        }
    }

    fn piece_msg(b: BlockRef) -> Message {
        Message::Piece {
            piece: b.piece,
            offset: b.offset,
            data: Bytes::from(vec![7u8; b.length as usize]),
        }
    }

    fn blocks(n: u32) -> Vec<BlockRef> {
        (0..n).map(|i| block(i / 4, i % 4)).collect()
    }

    #[test]
    fn opening_messages_state_what_we_have() {
        let now = Instant::now();
        let first = |fast, ours: &str| PeerProto::new(cfg(fast), bits(ours), now).poll_action();
        assert_eq!(
            first(true, "########"),
            Some(Action::Send(Message::HaveAll))
        );
        assert_eq!(
            first(true, "........"),
            Some(Action::Send(Message::HaveNone))
        );
        assert_eq!(first(false, "........"), None);
        assert_eq!(
            first(false, "#.......").unwrap(),
            Action::Send(Message::Bitfield(Bytes::from_static(&[0x80])))
        );
    }

    #[test]
    fn extension_handshake_offers_named_extensions() {
        let mut c = cfg(false);
        c.extensions = true;
        c.offered_extensions = vec!["ut_metadata"];
        let mut p = PeerProto::new(c, bits("........"), Instant::now());
        let Some(Action::Send(Message::Extended { id: 0, payload })) = p.poll_action() else {
            panic!("expected the extension handshake");
        };
        let hs = ExtendedHandshake::decode(&payload).unwrap();
        assert_eq!(hs.extensions, vec![("ut_metadata".to_string(), 1)]);
        assert_eq!(hs.request_queue, Some(ANNOUNCED_REQUEST_QUEUE as u32));
    }

    #[test]
    fn extension_messages_are_routed_by_name_both_ways() {
        let mut c = cfg(false);
        c.extensions = true;
        c.offered_extensions = vec!["ut_metadata", "ut_pex"];
        let now = Instant::now();
        let mut p = PeerProto::new(c, bits("........"), now);
        while p.poll_action().is_some() {}
        let theirs = ExtendedHandshake {
            extensions: vec![("ut_pex".into(), 9), ("ut_metadata".into(), 0)],
            ..Default::default()
        };
        let payload = Bytes::from(theirs.encode());
        p.handle(Input::Message(Message::Extended { id: 0, payload }), now);
        assert_eq!(p.poll_action(), None);
        let body = Bytes::from_static(b"d1:xi1ee");
        p.handle(
            Input::Message(Message::Extended {
                id: 2,
                payload: body.clone(),
            }),
            now,
        );
        assert_eq!(
            p.poll_action(),
            Some(Action::Extended {
                name: "ut_pex",
                payload: body.clone()
            })
        );
        // Their id for ut_pex is 9; ut_metadata they disabled (id 0): not sent.
        for name in ["ut_pex", "ut_metadata"] {
            let payload = body.clone();
            p.handle(Input::Command(Command::SendExtended { name, payload }), now);
        }
        assert_eq!(
            p.poll_action(),
            Some(Action::Send(Message::Extended {
                id: 9,
                payload: body
            }))
        );
        assert_eq!(p.poll_action(), None);
    }

    #[test]
    fn interest_follows_pieces_the_peer_has_that_we_lack() {
        let mut h = Harness::new(false, "##......");
        assert_eq!(
            h.msg(Message::Bitfield(Bytes::from_static(&[0xc0]))),
            vec![Action::PeerBitfield(bits("##......"))]
        );
        assert_eq!(
            h.msg(Message::Have(2)),
            vec![Action::PeerHas(pi(2)), Action::Send(Message::Interested)]
        );
        assert_eq!(
            h.cmd(Command::Have(2)),
            vec![
                Action::Send(Message::Have(2)),
                Action::Send(Message::NotInterested)
            ]
        );
        // We lose a piece they have: interested again.
        assert_eq!(
            h.cmd(Command::Lost(0)),
            vec![Action::Send(Message::Interested)]
        );
        assert_eq!(h.cmd(Command::Lost(5)), vec![]);
    }

    #[test]
    fn unchoke_asks_for_blocks_and_picked_blocks_are_requested() {
        let mut h = Harness::unchoked_by_seed(false);
        let b = block(3, 1);
        assert_eq!(
            h.cmd(Command::Picked(vec![b])),
            vec![Action::Send(Message::Request(request_of(b)))]
        );
        assert_eq!(h.proto.in_flight(), 1);
    }

    #[test]
    fn pipeline_refills_in_batches_of_what_the_path_delivers_in_2_ms() {
        // Nothing known of the path: each block that arrives is asked for again at once.
        let mut h = Harness::unchoked_by_seed(false);
        let picked = blocks(INITIAL_QUEUE as u32);
        h.cmd(Command::Picked(picked.clone()));
        assert!(h.msg(piece_msg(picked[0])).contains(&Action::WantBlocks(1)));
        // 128 MiB/s delivers 16 blocks in 2 ms: nothing until 16 drained, then 16.
        let mut h = Harness::unchoked_by_seed(false);
        h.proto.path.rate = 128.0 * 1048576.0;
        h.proto.queue_target = 64;
        let picked = blocks(64);
        h.cmd(Command::Picked(picked.clone()));
        for (i, b) in picked.iter().enumerate().take(16) {
            let acts = h.msg(piece_msg(*b));
            assert!(matches!(acts[0], Action::BlockArrived { .. }));
            let want = acts.iter().find(|a| matches!(a, Action::WantBlocks(_)));
            if i + 1 < 16 {
                assert_eq!(want, None, "after {} blocks", i + 1);
            } else {
                assert_eq!(want, Some(&Action::WantBlocks(16)));
            }
        }
    }

    #[test]
    fn queue_target_grows_with_the_download_rate() {
        let mut h = Harness::unchoked_by_seed(false);
        let picked = blocks(30);
        h.cmd(Command::Picked(picked.clone()));
        h.now += Duration::from_millis(5);
        for b in &picked {
            h.msg(piece_msg(*b));
        }
        h.cmd(Command::Picked(blocks(1)));
        // 30 blocks in 10 ms: 3,000 blocks/s; round trip 5 ms (the first block, nothing ahead
        // of it): 3,000 * (5 ms + 20 ms) = 75 blocks, and a refill batch of 2 ms (6 blocks).
        let acts = h.tick(Duration::from_millis(5), 0);
        assert_eq!(h.proto.path().rtt, Some(Duration::from_millis(5)));
        assert_eq!(h.proto.queue_target(), 81);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::PathEstimated { rtt, .. }
                if *rtt == Duration::from_millis(5))),
            "{acts:?}"
        );
        assert!(acts.contains(&Action::WantBlocks(80)), "{acts:?}");
    }

    #[test]
    fn choke_moves_requests_to_cancelled_and_late_blocks_are_accepted() {
        for fast in [false, true] {
            let mut h = Harness::unchoked_by_seed(fast);
            let picked = blocks(4);
            h.cmd(Command::Picked(picked.clone()));
            assert_eq!(h.msg(Message::Choke), vec![Action::ChokedUs]);
            assert_eq!(h.proto.in_flight(), 0);
            assert_eq!(h.proto.cancelled_count(), 4);
            let acts = h.msg(piece_msg(picked[0]));
            assert!(
                matches!(acts[..], [Action::BlockArrived { .. }]),
                "{acts:?}"
            );
            if fast {
                // Rejecting a choked-away request releases nothing twice.
                let r = request_of(picked[1]);
                assert_eq!(h.msg(Message::Reject(r)), vec![]);
            }
        }
    }

    #[test]
    fn many_chokes_with_requests_outstanding_never_drop_an_honest_peer() {
        // The defect: each choke left its requests behind, and past 2,048 the set was cleared
        // wholesale, so the next legitimate block looked unrequested and the peer was dropped.
        let mut h = Harness::unchoked_by_seed(false);
        for round in 0..200u32 {
            let picked = blocks(32);
            h.cmd(Command::Picked(picked));
            assert_eq!(
                h.msg(Message::Choke),
                vec![Action::ChokedUs],
                "round {round}"
            );
            assert!(h.proto.cancelled_count() <= MAX_CANCELLED);
            assert_eq!(
                h.msg(Message::Unchoke),
                vec![Action::UnchokedUs, Action::WantBlocks(INITIAL_QUEUE)]
            );
        }
        let b = block(7, 3);
        h.cmd(Command::Picked(vec![b]));
        let acts = h.msg(piece_msg(b));
        assert!(matches!(acts[0], Action::BlockArrived { .. }), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Close(_))));
    }

    #[test]
    fn unrequested_block_is_a_violation() {
        let mut h = Harness::unchoked_by_seed(false);
        let acts = h.msg(piece_msg(block(1, 0)));
        assert!(matches!(
            acts[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn cancel_sends_cancel_and_the_block_may_still_arrive_once() {
        let mut h = Harness::unchoked_by_seed(false);
        let b = block(0, 0);
        h.cmd(Command::Picked(vec![b]));
        assert_eq!(
            h.cmd(Command::Cancel(b)),
            vec![Action::Send(Message::Cancel(request_of(b)))]
        );
        assert_eq!(h.cmd(Command::Cancel(b)), vec![], "cancelled once");
        assert!(matches!(
            h.msg(piece_msg(b))[0],
            Action::BlockArrived { .. }
        ));
        assert!(matches!(
            h.msg(piece_msg(b))[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn expired_requests_free_the_pipeline_but_may_still_arrive() {
        let mut h = Harness::unchoked_by_seed(false);
        let picked = blocks(INITIAL_QUEUE as u32);
        h.cmd(Command::Picked(picked.clone()));
        assert_eq!(
            h.cmd(Command::Expired(picked[..10].to_vec())),
            vec![Action::WantBlocks(10)]
        );
        assert!(matches!(
            h.msg(piece_msg(picked[0]))[0],
            Action::BlockArrived { .. }
        ));
    }

    #[test]
    fn reject_releases_a_request_only_with_the_fast_extension() {
        let mut h = Harness::unchoked_by_seed(true);
        let b = block(2, 2);
        h.cmd(Command::Picked(vec![b]));
        assert_eq!(
            h.msg(Message::Reject(request_of(b))),
            vec![Action::Rejected(b), Action::WantBlocks(INITIAL_QUEUE)]
        );
        let mut plain = Harness::unchoked_by_seed(false);
        assert!(matches!(
            plain.msg(Message::Reject(request_of(b)))[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
        assert!(matches!(
            plain.msg(Message::HaveAll)[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn requests_while_choking_are_rejected_then_served_once_unchoked() {
        let mut h = Harness::new(true, "########");
        let r = request_of(block(1, 0));
        assert_eq!(
            h.msg(Message::Request(r)),
            vec![Action::Send(Message::Reject(r))]
        );
        assert_eq!(
            h.cmd(Command::Unchoke),
            vec![Action::Send(Message::Unchoke)]
        );
        assert_eq!(h.msg(Message::Request(r)), vec![Action::Upload(r)]);
        assert_eq!(
            h.cmd(Command::UploadUnavailable(r)),
            vec![Action::Send(Message::Reject(r))]
        );
        // Without the fast extension a refused request is silently dropped.
        let mut plain = Harness::new(false, "........");
        plain.cmd(Command::Unchoke);
        assert_eq!(plain.msg(Message::Request(r)), vec![]);
    }

    #[test]
    fn a_flood_of_requests_we_cannot_serve_is_a_violation() {
        let mut h = Harness::new(true, "####....");
        let unserved = request_of(block(5, 0));
        for _ in 0..MAX_REFUSED_REQUESTS {
            assert_eq!(
                h.msg(Message::Request(unserved)),
                vec![Action::Send(Message::Reject(unserved))]
            );
        }
        // One served request in between starts the count again.
        h.cmd(Command::Unchoke);
        let served = request_of(block(1, 0));
        assert_eq!(
            h.msg(Message::Request(served)),
            vec![Action::Upload(served)]
        );
        for _ in 0..MAX_REFUSED_REQUESTS {
            h.msg(Message::Request(unserved));
        }
        assert!(matches!(
            h.msg(Message::Request(unserved))[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn bad_requests_and_haves_are_violations() {
        let mut h = Harness::new(false, "########");
        let too_long = BlockRequest {
            piece: 0,
            offset: 0,
            length: MAX_REQUEST_LEN + 1,
        };
        let outside = BlockRequest {
            piece: 0,
            offset: PIECE_LEN - 1,
            length: 2,
        };
        for m in [
            Message::Request(too_long),
            Message::Request(outside),
            Message::Have(PIECES),
            Message::Bitfield(Bytes::from_static(&[0xff, 0])),
        ] {
            let acts = h.msg(m.clone());
            assert!(
                matches!(acts[..], [Action::Close(CloseReason::Violation(_))]),
                "{m:?}: {acts:?}"
            );
        }
    }

    #[test]
    fn a_bitfield_after_have_none_only_adds_pieces() {
        let mut h = Harness::new(true, "........");
        assert_eq!(h.msg(Message::HaveNone), vec![]);
        let acts = h.msg(Message::Bitfield(Bytes::from_static(&[0x81])));
        assert_eq!(
            acts,
            vec![
                Action::PeerHas(pi(0)),
                Action::PeerHas(pi(7)),
                Action::Send(Message::Interested),
            ]
        );
    }

    #[test]
    fn a_full_bitfield_marks_a_seed() {
        let mut h = Harness::new(false, "........");
        assert_eq!(
            h.msg(Message::Bitfield(Bytes::from_static(&[0xff]))),
            vec![
                Action::PeerBitfield(bits("########")),
                Action::PeerIsSeed,
                Action::Send(Message::Interested)
            ]
        );
    }

    #[test]
    fn peer_interest_is_reported_on_change_only() {
        let mut h = Harness::new(false, "#.......");
        assert_eq!(
            h.msg(Message::Interested),
            vec![Action::PeerInterested(true)]
        );
        assert_eq!(h.msg(Message::Interested), vec![]);
        assert_eq!(
            h.msg(Message::NotInterested),
            vec![Action::PeerInterested(false)]
        );
    }

    #[test]
    fn ticks_report_rates_send_keepalives_and_drop_idle_peers() {
        let mut h = Harness::new(false, "#.......");
        let acts = h.tick(Duration::from_secs(1), 100_000);
        assert_eq!(
            acts,
            vec![Action::Rates {
                download: 0,
                upload: 40_000
            }]
        );
        h.msg(Message::KeepAlive);
        let acts = h.tick(KEEPALIVE_EVERY, 0);
        assert_eq!(acts.last(), Some(&Action::Send(Message::KeepAlive)));
        let acts = h.tick(IDLE_TIMEOUT, 0);
        assert_eq!(acts, vec![Action::Close(CloseReason::Idle(IDLE_TIMEOUT))]);
    }

    #[test]
    fn choke_and_unchoke_commands_are_sent_once() {
        let mut h = Harness::new(false, "#.......");
        assert_eq!(h.cmd(Command::Choke), vec![]);
        assert_eq!(
            h.cmd(Command::Unchoke),
            vec![Action::Send(Message::Unchoke)]
        );
        assert_eq!(h.cmd(Command::Unchoke), vec![]);
        assert_eq!(h.cmd(Command::Choke), vec![Action::Send(Message::Choke)]);
    }

    #[test]
    fn allowed_fast_set_is_bounded() {
        let mut h = Harness::new(true, "........");
        for i in 0..200 {
            h.msg(Message::AllowedFast(i % PIECES));
        }
        assert_eq!(h.proto.allowed_fast().len(), PIECES as usize);
    }

    #[test]
    fn queue_depth_is_the_bandwidth_delay_product_plus_a_margin() {
        let ms = Duration::from_millis;
        // 4 MiB/s, 50 ms: 4 MiB/s * (50 + 20) ms = 17.9 -> 18 blocks (BDP 12.8), and a refill
        // batch of 1.
        assert_eq!(queue_depth(4.0 * 1048576.0, Some(ms(50)), QUEUE_SLACK), 19);
        // A slow far peer: 256 KiB/s, 200 ms -> 5 blocks, not a 64-block floor (4 s of it).
        assert_eq!(queue_depth(262144.0, Some(ms(200)), QUEUE_SLACK), 5);
        // Nothing known, or a trickle: the floor.
        assert_eq!(queue_depth(0.0, None, QUEUE_SLACK), MIN_QUEUE);
        assert_eq!(queue_depth(1000.0, Some(ms(10)), QUEUE_SLACK), MIN_QUEUE);
        // A fast near peer: 1 GiB/s on loopback -> the ceiling.
        assert_eq!(
            queue_depth(
                1024.0 * 1048576.0,
                Some(Duration::from_micros(100)),
                QUEUE_SLACK
            ),
            MAX_QUEUE
        );
    }

    #[test]
    fn the_round_trip_is_the_least_latency_seen() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut path = PathEstimate {
            rtt: None,
            rate: 0.0,
        };
        path.delivered(Sent { at: t0, ahead: 0 }, t0 + ms(54));
        assert_eq!(path.rtt, Some(ms(54)));
        // Blocks that queued behind others at the peer do not lengthen it, however many.
        for i in 1..100 {
            path.delivered(Sent { at: t0, ahead: 20 }, t0 + ms(80 + i));
        }
        assert_eq!(path.rtt, Some(ms(54)));
        path.delivered(Sent { at: t0, ahead: 3 }, t0 + ms(50));
        assert_eq!(path.rtt, Some(ms(50)));
        // A stall is not a long path.
        let mut stalled = PathEstimate::default();
        stalled.delivered(Sent { at: t0, ahead: 0 }, t0 + Duration::from_secs(60));
        assert_eq!(stalled.rtt, Some(MAX_RTT));
    }

    /// A peer behind a link of `rate` bytes/s and round trip `rtt` with a deep buffer, serving
    /// our requests in order, for `run` (ticks every second). Returns the machine and the bytes
    /// delivered in the last second.
    fn over_a_link(rate: f64, rtt: Duration, run: Duration) -> (PeerProto, f64) {
        const N: u32 = 4096;
        let mut c = cfg(false);
        c.lengths = Lengths::new(N as u64 * PIECE_LEN as u64, PIECE_LEN, N as u64).unwrap();
        let t0 = Instant::now();
        let mut p = PeerProto::new(c, Bitfield::new(N), t0);
        let full = Bytes::from(Bitfield::full(N).as_bytes().to_vec());
        p.handle(Input::Message(Message::Bitfield(full)), t0);
        p.handle(Input::Message(Message::Unchoke), t0);
        let block_time = Duration::from_secs_f64(BLOCK_SIZE as f64 / rate);
        let mut on_the_way: VecDeque<(Instant, BlockRef)> = VecDeque::new();
        let mut link_free = t0;
        let mut next_block = 0u32;
        let mut next_tick = t0 + Duration::from_secs(1);
        let end = t0 + run;
        let mut last_second = 0.0;
        let mut now = t0;
        loop {
            while let Some(a) = p.poll_action() {
                if let Action::WantBlocks(n) = a {
                    let mut picked = Vec::new();
                    for _ in 0..n {
                        let b = block(next_block / 4 % N, next_block % 4);
                        next_block += 1;
                        let at_peer = now + rtt / 2;
                        link_free = link_free.max(at_peer) + block_time;
                        on_the_way.push_back((link_free + rtt / 2, b));
                        picked.push(b);
                    }
                    p.handle(Input::Command(Command::Picked(picked)), now);
                }
            }
            let arrival = on_the_way.front().map(|(at, _)| *at);
            match arrival {
                Some(at) if at < next_tick.min(end) => {
                    now = at;
                    let (_, b) = on_the_way.pop_front().unwrap();
                    if now + Duration::from_secs(1) >= end {
                        last_second += BLOCK_SIZE as f64;
                    }
                    p.handle(Input::Message(piece_msg(b)), now);
                }
                _ if next_tick >= end => return (p, last_second),
                _ => {
                    now = next_tick;
                    next_tick += Duration::from_secs(1);
                    p.handle(Input::Tick { uploaded: 0 }, now);
                }
            }
        }
    }

    #[test]
    fn a_slow_far_peer_gets_a_shallow_queue_that_still_fills_its_path() {
        let rate = 4.0 * 1048576.0;
        let (p, last_second) = over_a_link(rate, Duration::from_millis(50), Duration::from_secs(6));
        let rtt = p.path().rtt.unwrap().as_secs_f64();
        assert!((0.045..0.060).contains(&rtt), "round trip {rtt}");
        // BDP (13 blocks) + 20 ms of rate (5.1) + a refill batch: about 19-20, far below the old
        // floor of 64.
        assert!(
            (19..=26).contains(&p.queue_target()),
            "{}",
            p.queue_target()
        );
        assert!(p.in_flight() <= p.queue_target());
        assert!(last_second >= 0.95 * rate, "{last_second} of {rate}");
    }

    #[test]
    fn a_fast_near_peer_gets_a_deep_queue() {
        let rate = 1024.0 * 1048576.0;
        let (p, last_second) =
            over_a_link(rate, Duration::from_micros(200), Duration::from_secs(3));
        assert_eq!(p.queue_target(), MAX_QUEUE);
        assert!(last_second >= 0.95 * rate, "{last_second} of {rate}");
    }

    #[test]
    fn a_new_peer_s_queue_reaches_its_path_before_the_first_tick() {
        // Far and slow: the first burst (16 blocks) fills 50 ms at 4 MiB/s; the first rate
        // sample, two round trips later, sets the target to the BDP + 20 ms of rate + a batch.
        let ms = Duration::from_millis;
        let (p, _) = over_a_link(4.0 * 1048576.0, ms(50), ms(400));
        assert!(
            (19..=26).contains(&p.queue_target()),
            "{}",
            p.queue_target()
        );
        assert!(p.in_flight() <= p.queue_target());
        // Near and fast: the ceiling within the first 200 ms.
        let (p, _) = over_a_link(1024.0 * 1048576.0, Duration::from_micros(200), ms(200));
        assert_eq!(p.queue_target(), MAX_QUEUE);
    }

    /// A peer with a measured path: 256 KiB/s, 50 ms (queue target and BDP at the floor of 4),
    /// with `in_flight` requests outstanding (blocks 16.. of `blocks(32)`, sent in order).
    fn slow_peer_with_requests_outstanding(fast: bool) -> Harness {
        let mut h = Harness::unchoked_by_seed(fast);
        let picked = blocks(32);
        h.cmd(Command::Picked(picked.clone()));
        h.now += Duration::from_millis(50);
        for b in &picked[..16] {
            h.msg(piece_msg(*b));
        }
        h.now += Duration::from_millis(950);
        h.tick(Duration::ZERO, 0);
        assert_eq!(h.proto.queue_target(), MIN_QUEUE);
        assert_eq!(h.proto.in_flight(), 16);
        h
    }

    #[test]
    fn a_waiting_read_cancels_the_newest_requests_beyond_the_path() {
        let mut h = slow_peer_with_requests_outstanding(false);
        let acts = h.cmd(Command::ReadWaiting {
            pieces: vec![7],
            share: 4,
            urgent: vec![],
        });
        // Keep the 4 oldest (the path's BDP: already on their way); cancel the 12 newest.
        let newest: Vec<BlockRef> = (20..32).rev().map(|i| blocks(32)[i]).collect();
        let mut want: Vec<Action> = newest
            .iter()
            .map(|b| Action::Send(Message::Cancel(request_of(*b))))
            .collect();
        want.push(Action::Withdrawn(newest.clone()));
        want.push(Action::WantBlocks(4));
        assert_eq!(acts, want);
        assert_eq!(h.proto.in_flight(), 4);
        assert_eq!(h.proto.cancelled_count(), 12);
        // A cancelled block that comes anyway is accepted once.
        assert!(matches!(
            h.msg(piece_msg(newest[0]))[0],
            Action::BlockArrived { .. }
        ));
    }

    #[test]
    fn a_waiting_read_leaves_the_requests_of_urgent_pieces_alone() {
        let mut h = slow_peer_with_requests_outstanding(false);
        // 12 requests beyond the path, but pieces 6 and 7 (blocks 24..32, the newest) are
        // wanted by reads: only the 8 bulk blocks before them are cancelled.
        let acts = h.cmd(Command::ReadWaiting {
            pieces: vec![7],
            share: 4,
            urgent: vec![6, 7],
        });
        let withdrawn: Vec<BlockRef> = (16..24).rev().map(|i| blocks(32)[i]).collect();
        assert!(acts.contains(&Action::Withdrawn(withdrawn)), "{acts:?}");
        assert_eq!(h.proto.in_flight(), 8);
    }

    #[test]
    fn background_requests_yield_while_unanticipated_reads_come_in() {
        let ms = Duration::from_millis;
        let mut h = Harness::unchoked_by_seed(false);
        let rate = 4.0 * 1048576.0;
        h.proto.path = PathEstimate {
            rtt: Some(ms(50)),
            rate,
        };
        h.proto.recent_rates.push_back(rate);
        h.tick(ms(1000), 0);
        assert_eq!(h.proto.queue_target(), 19, "BDP + 20 ms + a batch");
        h.cmd(Command::ReadWaiting {
            pieces: vec![0],
            share: 0,
            urgent: vec![],
        });
        assert_eq!(h.proto.queue_target(), 15, "BDP + 2 ms + a batch");
        h.tick(ms(1000), 0);
        assert_eq!(h.proto.queue_target(), 15, "still yielding");
        h.tick(ms(1500), 0);
        assert_eq!(h.proto.queue_target(), 19, "2 s after the read");
    }

    #[test]
    fn a_re_requested_block_is_no_round_trip_sample() {
        let mut h = slow_peer_with_requests_outstanding(false);
        let rtt = h.proto.path().rtt;
        assert_eq!(rtt, Some(Duration::from_millis(50)));
        h.cmd(Command::ReadWaiting {
            pieces: vec![0],
            share: 4,
            urgent: vec![],
        });
        // Cancelled, asked for again, and the copy already on its way arrives 1 ms later.
        let b = blocks(32)[31];
        h.cmd(Command::Picked(vec![b]));
        h.now += Duration::from_millis(1);
        assert!(matches!(
            h.msg(piece_msg(b))[0],
            Action::BlockArrived { .. }
        ));
        assert_eq!(h.proto.path().rtt, rtt);
    }

    #[test]
    fn a_block_cancelled_twice_may_arrive_twice() {
        let mut h = slow_peer_with_requests_outstanding(false);
        let b = blocks(32)[31];
        let read = Command::ReadWaiting {
            pieces: vec![0],
            share: 4,
            urgent: vec![],
        };
        // Requested, cancelled by a read, requested again, cancelled by the next read: a
        // peer that had served both requests before either cancel sends it twice.
        h.cmd(read.clone());
        h.cmd(Command::Picked(vec![b]));
        h.cmd(read);
        assert_eq!(h.proto.cancelled_count(), 12);
        for copy in 1..=2 {
            assert!(
                matches!(h.msg(piece_msg(b))[0], Action::BlockArrived { .. }),
                "copy {copy}"
            );
        }
        assert!(matches!(
            h.msg(piece_msg(b))[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn a_waiting_read_only_tops_up_a_peer_that_lacks_its_pieces_and_leaves_one_that_chokes_us() {
        let mut h = Harness::new(false, "........");
        h.msg(Message::Bitfield(Bytes::from_static(&[0x7f])));
        h.msg(Message::Unchoke);
        h.cmd(Command::Picked(blocks(8)));
        let read = Command::ReadWaiting {
            pieces: vec![0],
            share: 4,
            urgent: vec![],
        };
        assert_eq!(
            h.cmd(read.clone()),
            vec![Action::WantBlocks(INITIAL_QUEUE - 8)],
            "it lacks piece 0: no cancels"
        );
        h.msg(Message::Choke);
        h.msg(Message::Have(0));
        assert_eq!(h.cmd(read), vec![], "it chokes us");
    }

    #[test]
    fn a_request_cancelled_then_asked_again_may_arrive_twice_or_be_rejected() {
        let mut h = slow_peer_with_requests_outstanding(true);
        h.cmd(Command::ReadWaiting {
            pieces: vec![7],
            share: 4,
            urgent: vec![],
        });
        let b = blocks(32)[31];
        // The picker gives the withdrawn block back after the read's: requested again.
        assert_eq!(
            h.cmd(Command::Picked(vec![b])),
            vec![Action::Send(Message::Request(request_of(b)))]
        );
        // The copy the peer had sent before our cancel, then the one for the new request.
        for _ in 0..2 {
            let acts = h.msg(piece_msg(b));
            assert!(matches!(acts[0], Action::BlockArrived { .. }), "{acts:?}");
        }
        // BEP 6: a reject answers a cancel; it releases nothing that is still wanted.
        let c = blocks(32)[30];
        assert_eq!(h.msg(Message::Reject(request_of(c))), vec![]);
        assert!(matches!(
            h.msg(piece_msg(c))[..],
            [Action::Close(CloseReason::Violation(_))]
        ));
    }

    #[test]
    fn cancels_pause_toward_a_peer_whose_cancelled_blocks_come_anyway() {
        let mut h = slow_peer_with_requests_outstanding(false);
        let read = Command::ReadWaiting {
            pieces: vec![7],
            share: 4,
            urgent: vec![],
        };
        let acts = h.cmd(read.clone());
        let withdrawn = match acts.iter().find(|a| matches!(a, Action::Withdrawn(_))) {
            Some(Action::Withdrawn(w)) => w.clone(),
            _ => panic!("{acts:?}"),
        };
        // Its uplink had them already: every cancelled block arrives.
        for b in &withdrawn {
            h.msg(piece_msg(*b));
        }
        // The next read is asked for at once, with no cancels that would only waste the link.
        h.cmd(Command::Picked(blocks(16)[..12].to_vec()));
        assert!(h.proto.in_flight() > MIN_QUEUE);
        assert_eq!(h.cmd(read.clone()), vec![Action::WantBlocks(4)]);
        // Some seconds on (the judgement decays by a tenth a tick), cancels are tried again.
        for _ in 0..7 {
            h.tick(Duration::from_secs(1), 0);
        }
        let acts = h.cmd(read);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Send(Message::Cancel(_)))),
            "{acts:?}"
        );
    }

    #[test]
    fn cancels_go_on_toward_a_peer_that_rejects_what_we_cancel() {
        let mut h = slow_peer_with_requests_outstanding(true);
        let read = Command::ReadWaiting {
            pieces: vec![7],
            share: 4,
            urgent: vec![],
        };
        let acts = h.cmd(read.clone());
        let Some(Action::Withdrawn(withdrawn)) =
            acts.iter().find(|a| matches!(a, Action::Withdrawn(_)))
        else {
            panic!("{acts:?}");
        };
        for b in withdrawn {
            assert_eq!(h.msg(Message::Reject(request_of(*b))), vec![]);
        }
        h.cmd(Command::Picked(blocks(16)[..12].to_vec()));
        let acts = h.cmd(read);
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, Action::Send(Message::Cancel(_))))
                .count(),
            12,
            "{acts:?}"
        );
    }

    #[test]
    fn a_tick_with_little_delivered_does_not_shrink_the_queue() {
        let (mut p, _) = over_a_link(
            4.0 * 1048576.0,
            Duration::from_millis(50),
            Duration::from_secs(3),
        );
        let before = p.queue_target();
        // A second in which the peer sent nothing (we had nothing to ask, or hashing lagged).
        let later = Instant::now() + Duration::from_secs(4);
        p.handle(Input::Tick { uploaded: 0 }, later);
        assert_eq!(p.queue_target(), before);
    }
}
