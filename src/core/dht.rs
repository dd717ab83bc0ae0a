//! One mainline DHT node (BEP 5) as a pure state machine, in quinn-proto's shape: datagrams go in
//! through [`Dht::handle`], time through [`Dht::tick`] (when [`Dht::next_timeout`] says), and the
//! node's datagrams and events come out of [`Dht::poll_transmit`] and [`Dht::poll_event`]. No
//! sockets, no clock: `src/net/dht.rs` moves the bytes, and the tests run whole networks in memory
//! ([`sim`]).
//!
//! # What it does
//! - Answers ping, find_node, get_peers (a token, the K closest nodes, and stored peers if any)
//!   and announce_peer (the token must be one we gave that IP within two rotations, else 203);
//!   an unknown method gets 204, a malformed query 203.
//! - Offers every node that queries us (unless read-only) or answers us to the routing table, and
//!   pings the ones the table asks about (unconfirmed newcomers, questionable nodes in full buckets).
//! - Runs iterative lookups: `alpha` queries in flight, converging on the K closest nodes that
//!   answer; a get_peers lookup with an announce port then announces to the K closest that gave
//!   tokens. Bootstrap and bucket refresh are find_node lookups that report no events.
//!
//! # Bounds (everything a remote node can make us hold)
//! Pending queries [`MAX_PENDING_QUERIES`], running lookups [`MAX_LOOKUPS`], candidates per lookup
//! [`MAX_LOOKUP_CANDIDATES`], peers reported per lookup [`MAX_PEERS_PER_LOOKUP`], the peer store
//! (`max_torrents` x `max_peers_per_torrent`, oldest evicted, `peer_ttl`), rate-limit entries
//! [`MAX_RATE_TRACKED_IPS`], the routing table (K per bucket, 160 buckets), datagrams (1500 bytes).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha1::{Digest, Sha1};

use crate::core::bencode::{self, Node, Owned};
use crate::core::krpc::{self, Body, KrpcError, Message, Query, Response};
use crate::core::routing::{Contact, NodeId, RoutingTable, ID_BITS, K};

/// Queries awaiting an answer; past this, new queries are not sent.
pub const MAX_PENDING_QUERIES: usize = 2048;
/// Lookups running at once; a lookup asked for past this ends at once, empty.
pub const MAX_LOOKUPS: usize = 64;
/// Nodes a lookup remembers (the closest are kept).
pub const MAX_LOOKUP_CANDIDATES: usize = 128;
/// Distinct peers one lookup reports; more are ignored.
pub const MAX_PEERS_PER_LOOKUP: usize = 2000;
/// Peers we put in one get_peers answer (8 bytes each: the answer stays under 1500 bytes).
pub const MAX_VALUES_SENT: usize = 100;
/// Bootstrap contacts remembered.
pub const MAX_BOOTSTRAP_CONTACTS: usize = 32;
/// Source addresses tracked by the rate limiter.
pub const MAX_RATE_TRACKED_IPS: usize = 4096;
/// Write tokens: the first bytes of SHA-1(secret || IPv4 address).
pub const TOKEN_LEN: usize = 8;
/// Our client version in every message (`v`; "SF" is not a registered BEP 20 code).
pub const VERSION: &[u8] = b"SF01";
/// Largest saved state `load_saved` reads.
pub const MAX_SAVED_STATE: usize = 64 * 1024;
/// Most nodes a saved state can hold (a full table).
pub const MAX_SAVED_NODES: usize = ID_BITS * K;

/// How often tick does table upkeep (re-bootstrap, refresh, pings of questionable nodes).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// How often expired peers are swept out of the store.
const STORE_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Least time between two bootstraps while the table stays empty.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(30);
/// The first re-bootstrap comes sooner, and the wait doubles up to `BOOTSTRAP_RETRY`: nodes that
/// join a young swarm together (a private DHT, a test) first hear of few confirmed nodes.
const BOOTSTRAP_RETRY_FIRST: Duration = Duration::from_secs(5);
/// Questionable nodes pinged per maintenance round.
const PINGS_PER_MAINTENANCE: usize = 4;
/// Refresh lookups leave this many lookup slots for the user's lookups.
const LOOKUP_SLOTS_KEPT_FREE: usize = MAX_LOOKUPS / 2;
/// The rate limiter's window.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A full rate-limit map is purged of ended windows at most this often.
const RATE_PURGE_EVERY: Duration = Duration::from_millis(100);
/// A lookup query unanswered this long stops counting against alpha (it may still answer until
/// `query_timeout`), so one departed node does not stall a lookup for the whole timeout
/// (libtorrent's "short timeout").
pub const SLOW_QUERY_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct DhtConfig {
    /// Queries in flight per lookup.
    pub alpha: usize,
    pub query_timeout: Duration,
    /// Incoming queries per second per IP; 0 = off (tests).
    pub rate_limit: u32,
    /// Peer store: info-hashes kept.
    pub max_torrents: usize,
    pub max_peers_per_torrent: usize,
    pub peer_ttl: Duration,
    /// Token secrets rotate this often; the previous one is still accepted.
    pub token_rotation: Duration,
    /// A bucket untouched this long is refreshed with a lookup.
    pub refresh_after: Duration,
}

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            alpha: 3,
            query_timeout: Duration::from_secs(5),
            // libtorrent blocks an IP past 5/s; several nodes behind one NAT share an IP.
            rate_limit: 20,
            max_torrents: 4096,
            max_peers_per_torrent: 200,
            peer_ttl: Duration::from_secs(30 * 60),
            token_rotation: Duration::from_secs(5 * 60),
            refresh_after: Duration::from_secs(15 * 60),
        }
    }
}

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LookupId(pub u64);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LookupSummary {
    /// Longest chain of referrals to a node that answered; 1 = a node we knew before the lookup.
    pub hops: u32,
    /// Queries sent.
    pub queried: u32,
    pub answered: u32,
    /// The K closest nodes that answered, closest first.
    pub closest: Vec<(NodeId, SocketAddr)>,
}

#[derive(Clone, Debug)]
pub enum DhtEvent {
    /// Peers for a get_peers lookup, as they arrive (deduplicated per lookup).
    Peers {
        lookup: LookupId,
        info_hash: [u8; 20],
        peers: Vec<SocketAddr>,
    },
    /// A lookup converged (or ran out of nodes); for get_peers with announce_port, the
    /// announce_peer queries to the K closest nodes that gave tokens have been queued before this
    /// event.
    LookupDone {
        lookup: LookupId,
        target: [u8; 20],
        summary: LookupSummary,
    },
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DhtStats {
    /// Routing-table nodes that are not bad.
    pub nodes: usize,
    pub torrents_stored: usize,
    pub peers_stored: usize,
    pub lookups_running: usize,
    pub queries_pending: usize,
}

/// Running totals, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DhtCounters {
    /// Datagrams dropped: malformed, oversize, IPv6, or answers we did not ask for.
    pub dropped: u64,
    /// Queries dropped by the per-IP rate limit.
    pub rate_limited: u64,
    /// Queries we did not send because the pending table was full.
    pub queries_refused: u64,
    /// Our queries that timed out.
    pub timeouts: u64,
    /// Incoming queries answered (with a response or an error).
    pub answered: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Lookup(LookupId),
    /// Table upkeep: confirm a newcomer or check a questionable node.
    Ping,
    Announce,
}

struct Pending {
    to: SocketAddr,
    /// The id we expect to answer (unknown for bootstrap contacts).
    node: Option<NodeId>,
    deadline: Instant,
    /// When a lookup query turns slow (lookup queries only).
    slow_at: Option<Instant>,
    purpose: Purpose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LookupKind {
    FindNode,
    GetPeers { announce_port: Option<u16> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CandidateState {
    New,
    InFlight,
    Answered,
    Failed,
}

struct Candidate {
    /// Unknown for a bootstrap contact until it answers.
    id: Option<NodeId>,
    addr: SocketAddr,
    state: CandidateState,
    /// Referrals from a node we knew before the lookup (1) to this one.
    depth: u32,
    /// In flight past `SLOW_QUERY_AFTER`: no longer counted in `Lookup::in_flight`.
    slow: bool,
    token: Option<Vec<u8>>,
}

impl Candidate {
    /// Sort key: distance to the target; contacts of unknown id come first (queried first).
    fn key(&self, target: &NodeId) -> [u8; 20] {
        self.id.map_or([0; 20], |id| target.distance(&id))
    }
}

struct Lookup {
    target: NodeId,
    kind: LookupKind,
    /// Bootstrap and refresh lookups report no events.
    internal: bool,
    /// Sorted by `Candidate::key`.
    candidates: Vec<Candidate>,
    /// Queries in flight that are not slow: at most alpha.
    in_flight: usize,
    queried: u32,
    answered: u32,
    peers_seen: HashSet<SocketAddr>,
}

impl Lookup {
    fn add_candidate(&mut self, own: NodeId, id: Option<NodeId>, addr: SocketAddr, depth: u32) {
        if !addr.is_ipv4() || addr.port() == 0 || id == Some(own) {
            return;
        }
        if self
            .candidates
            .iter()
            .any(|c| c.addr == addr || (id.is_some() && c.id == id))
        {
            return;
        }
        let candidate = Candidate {
            id,
            addr,
            state: CandidateState::New,
            depth,
            slow: false,
            token: None,
        };
        self.insert_sorted(candidate);
        if self.candidates.len() > MAX_LOOKUP_CANDIDATES {
            // Forget the farthest one that is not awaiting an answer.
            if let Some(i) = self
                .candidates
                .iter()
                .rposition(|c| c.state != CandidateState::InFlight)
            {
                self.candidates.remove(i);
            }
        }
    }

    fn insert_sorted(&mut self, candidate: Candidate) {
        let key = candidate.key(&self.target);
        let at = self
            .candidates
            .partition_point(|c| c.key(&self.target) <= key);
        self.candidates.insert(at, candidate);
    }

    fn in_flight_at(&self, addr: SocketAddr) -> Option<usize> {
        self.candidates
            .iter()
            .position(|c| c.addr == addr && c.state == CandidateState::InFlight)
    }

    fn summary(&self) -> LookupSummary {
        let answered = self
            .candidates
            .iter()
            .filter(|c| c.state == CandidateState::Answered);
        LookupSummary {
            hops: answered.clone().map(|c| c.depth).max().unwrap_or(0),
            queried: self.queried,
            answered: self.answered,
            closest: answered
                .filter_map(|c| Some((c.id?, c.addr)))
                .take(K)
                .collect(),
        }
    }
}

struct StoredPeer {
    addr: SocketAddr,
    announced: Instant,
}

/// Peers announced to us, per info-hash: bounded both ways, oldest evicted first. Each torrent's
/// peers are kept oldest announce first, so eviction, expiry and "most recent first" need no sort
/// (the work an announce can cost us stays at one pass over the torrents).
#[derive(Default)]
struct PeerStore {
    torrents: HashMap<[u8; 20], VecDeque<StoredPeer>>,
    peers: usize,
}

impl PeerStore {
    fn announce(&mut self, info_hash: [u8; 20], addr: SocketAddr, now: Instant, cfg: &DhtConfig) {
        if cfg.max_torrents == 0 || cfg.max_peers_per_torrent == 0 {
            return;
        }
        if !self.torrents.contains_key(&info_hash) && self.torrents.len() >= cfg.max_torrents {
            // Evict the torrent announced least recently.
            let oldest = self
                .torrents
                .iter()
                .min_by_key(|(_, peers)| peers.back().map(|p| p.announced))
                .map(|(h, _)| *h);
            if let Some(gone) = oldest.and_then(|h| self.torrents.remove(&h)) {
                self.peers -= gone.len();
            }
        }
        let peers = self.torrents.entry(info_hash).or_default();
        if let Some(i) = peers.iter().position(|p| p.addr == addr) {
            peers.remove(i);
            self.peers -= 1;
        } else if peers.len() >= cfg.max_peers_per_torrent && peers.pop_front().is_some() {
            self.peers -= 1;
        }
        peers.push_back(StoredPeer {
            addr,
            announced: now,
        });
        self.peers += 1;
    }

    /// Up to `max` peers, the most recently announced first.
    fn get(&self, info_hash: &[u8; 20], max: usize) -> Vec<SocketAddr> {
        self.torrents.get(info_hash).map_or_else(Vec::new, |peers| {
            peers.iter().rev().take(max).map(|p| p.addr).collect()
        })
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        let mut removed = 0;
        self.torrents.retain(|_, peers| {
            while peers
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.announced) >= ttl)
            {
                peers.pop_front();
                removed += 1;
            }
            !peers.is_empty()
        });
        self.peers -= removed;
    }
}

struct TokenSecrets {
    current: [u8; 16],
    previous: [u8; 16],
    rotated_at: Instant,
}

fn make_token(secret: &[u8; 16], ip: Ipv4Addr) -> [u8; TOKEN_LEN] {
    let mut h = Sha1::new();
    h.update(secret);
    h.update(ip.octets());
    let digest = h.finalize();
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&digest[..TOKEN_LEN]);
    token
}

struct RateWindow {
    start: Instant,
    count: u32,
}

pub struct Dht {
    id: NodeId,
    cfg: DhtConfig,
    rng: StdRng,
    table: RoutingTable,
    bootstrap_contacts: Vec<SocketAddr>,
    bootstrap_lookup: Option<LookupId>,
    last_bootstrap: Option<Instant>,
    /// Wait before the next re-bootstrap while the table is short of K nodes.
    bootstrap_retry: Duration,
    pending: HashMap<u32, Pending>,
    /// (deadline, transaction id) of every pending query, earliest first.
    deadlines: BTreeSet<(Instant, u32)>,
    /// (slow_at, transaction id) of pending lookup queries not yet slow, earliest first.
    slow_marks: BTreeSet<(Instant, u32)>,
    lookups: HashMap<LookupId, Lookup>,
    next_lookup: u64,
    store: PeerStore,
    secrets: TokenSecrets,
    rate: HashMap<IpAddr, RateWindow>,
    rate_purge_after: Instant,
    next_maintenance: Instant,
    next_store_sweep: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DhtEvent>,
    counters: DhtCounters,
}

impl Dht {
    /// `secret_seed` seeds the token secrets and transaction ids (tests pass fixed ones).
    pub fn new(id: NodeId, cfg: DhtConfig, secret_seed: u64, now: Instant) -> Dht {
        let mut rng = StdRng::seed_from_u64(secret_seed);
        let secrets = TokenSecrets {
            current: rng.gen(),
            previous: rng.gen(),
            rotated_at: now,
        };
        Dht {
            id,
            table: RoutingTable::new(id, cfg.refresh_after, now),
            cfg,
            rng,
            bootstrap_contacts: Vec::new(),
            bootstrap_lookup: None,
            last_bootstrap: None,
            bootstrap_retry: BOOTSTRAP_RETRY_FIRST,
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
            slow_marks: BTreeSet::new(),
            lookups: HashMap::new(),
            next_lookup: 1,
            store: PeerStore::default(),
            secrets,
            rate: HashMap::new(),
            rate_purge_after: now,
            next_maintenance: now + MAINTENANCE_EVERY,
            next_store_sweep: now + STORE_SWEEP_EVERY,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: DhtCounters::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Remembers these contacts as bootstrap nodes and starts a find_node lookup of our own id
    /// through them (bootstrap nodes are queried but, like libtorrent, they may be added to the
    /// table only if they answer). The node bootstraps again by itself (from tick) when its table
    /// is empty and it has bootstrap contacts (and, every 30 s, while it holds fewer than K live
    /// nodes).
    pub fn bootstrap(&mut self, contacts: &[SocketAddr], now: Instant) {
        for &c in contacts {
            if c.is_ipv4()
                && c.port() != 0
                && !self.bootstrap_contacts.contains(&c)
                && self.bootstrap_contacts.len() < MAX_BOOTSTRAP_CONTACTS
            {
                self.bootstrap_contacts.push(c);
            }
        }
        self.start_bootstrap(now);
    }

    fn start_bootstrap(&mut self, now: Instant) {
        if self
            .bootstrap_lookup
            .is_some_and(|l| self.lookups.contains_key(&l))
        {
            return;
        }
        self.last_bootstrap = Some(now);
        let own = self.id;
        let contacts = self.bootstrap_contacts.clone();
        self.bootstrap_lookup = self.start_lookup(own, LookupKind::FindNode, true, &contacts, now);
    }

    /// One incoming datagram; malformed input is dropped (counted), never panics.
    pub fn handle(&mut self, from: SocketAddr, packet: &[u8], now: Instant) {
        self.rotate_secrets(now);
        if packet.len() > krpc::MAX_PACKET || !from.is_ipv4() || from.port() == 0 {
            self.counters.dropped += 1;
            return;
        }
        match krpc::decode(packet) {
            Ok(msg) => match msg.body {
                Body::Query(query) => self.handle_query(from, msg.tid, msg.read_only, query, now),
                Body::Response(r) => self.handle_reply(from, &msg.tid, Some(r), now),
                Body::Error { .. } => self.handle_reply(from, &msg.tid, None, now),
            },
            Err(KrpcError::BadQuery { tid, .. }) => {
                if self.allow_query(from.ip(), now) {
                    self.send_error(from, tid, krpc::ERROR_PROTOCOL, "Protocol Error");
                }
            }
            Err(_) => self.counters.dropped += 1,
        }
    }

    fn handle_query(
        &mut self,
        from: SocketAddr,
        tid: Vec<u8>,
        read_only: bool,
        query: Query,
        now: Instant,
    ) {
        if !self.allow_query(from.ip(), now) {
            self.counters.rate_limited += 1;
            return;
        }
        let sender = query.id();
        // BEP 43: a read-only node does not answer queries, so it has no place in a table.
        if !read_only {
            self.offer(sender, from, Contact::Queried, now);
        }
        let response = match query {
            Query::Ping { .. } => Response::id_only(self.id),
            Query::FindNode { target, .. } => Response {
                nodes: Some(self.table.closest(&target, K)),
                ..Response::id_only(self.id)
            },
            Query::GetPeers { info_hash, .. } => {
                let values = self.store.get(&info_hash, MAX_VALUES_SENT);
                Response {
                    id: self.id,
                    nodes: Some(self.table.closest(&NodeId(info_hash), K)),
                    values: (!values.is_empty()).then_some(values),
                    token: self.token_for(from.ip()).map(|t| t.to_vec()),
                }
            }
            Query::AnnouncePeer {
                info_hash,
                port,
                implied_port,
                token,
                ..
            } => {
                if !self.token_valid(from.ip(), &token) {
                    self.send_error(from, tid, krpc::ERROR_PROTOCOL, "Bad token");
                    return;
                }
                let port = if implied_port { from.port() } else { port };
                let peer = SocketAddr::new(from.ip(), port);
                self.store.announce(info_hash, peer, now, &self.cfg);
                Response::id_only(self.id)
            }
            Query::Unknown { .. } => {
                self.send_error(from, tid, krpc::ERROR_METHOD_UNKNOWN, "Method Unknown");
                return;
            }
        };
        self.counters.answered += 1;
        self.send(from, tid, Body::Response(response));
    }

    /// A response (`Some`) or an error (`None`) to one of our queries.
    fn handle_reply(
        &mut self,
        from: SocketAddr,
        tid: &[u8],
        response: Option<Response>,
        now: Instant,
    ) {
        let Some(tid) = <[u8; 4]>::try_from(tid).ok().map(u32::from_be_bytes) else {
            self.counters.dropped += 1;
            return;
        };
        // Only the address we asked may answer: anyone else guessing the id is ignored.
        if self.pending.get(&tid).is_none_or(|p| p.to != from) {
            self.counters.dropped += 1;
            return;
        }
        let Some(pending) = self.pending.remove(&tid) else {
            return;
        };
        self.forget_timers(tid, &pending);
        let Some(response) = response else {
            // An error: the node is alive, but the query failed.
            if let Some(id) = pending.node {
                self.offer(id, from, Contact::Responded, now);
            }
            if let Purpose::Lookup(lookup) = pending.purpose {
                self.lookup_failed(lookup, from, now);
            }
            return;
        };
        if pending.node.is_some_and(|id| id != response.id) {
            // Another node now lives at that address: the one we asked is gone.
            self.query_failed(pending, now);
            return;
        }
        if response.id == self.id {
            // Our own id from another address: a reflection or a liar, not a node to use.
            self.query_failed(pending, now);
            return;
        }
        self.offer(response.id, from, Contact::Responded, now);
        if let Purpose::Lookup(lookup) = pending.purpose {
            self.lookup_answered(lookup, from, response, now);
        }
    }

    /// Offers a contact to the routing table and pings whom the table asks about.
    fn offer(&mut self, id: NodeId, addr: SocketAddr, contact: Contact, now: Instant) {
        let heard = self.table.heard_from(id, addr, contact, now);
        if let Some((id, addr)) = heard.ping {
            self.ping(id, addr, now);
        }
    }

    fn ping(&mut self, id: NodeId, addr: SocketAddr, now: Instant) {
        let query = Query::Ping { id: self.id };
        if !self.send_query(addr, Some(id), query, Purpose::Ping, now) {
            // Not sent (too many pending): the table may ask again later.
            self.table.ping_not_sent(addr);
        }
    }

    /// Sends a query unless the pending table is full.
    fn send_query(
        &mut self,
        to: SocketAddr,
        node: Option<NodeId>,
        query: Query,
        purpose: Purpose,
        now: Instant,
    ) -> bool {
        if self.pending.len() >= MAX_PENDING_QUERIES {
            self.counters.queries_refused += 1;
            return false;
        }
        let tid = loop {
            let tid: u32 = self.rng.gen();
            if !self.pending.contains_key(&tid) {
                break tid;
            }
        };
        let deadline = now + self.cfg.query_timeout;
        let slow_at = match purpose {
            Purpose::Lookup(_) => Some(now + SLOW_QUERY_AFTER).filter(|&t| t < deadline),
            Purpose::Ping | Purpose::Announce => None,
        };
        self.pending.insert(
            tid,
            Pending {
                to,
                node,
                deadline,
                slow_at,
                purpose,
            },
        );
        self.deadlines.insert((deadline, tid));
        if let Some(t) = slow_at {
            self.slow_marks.insert((t, tid));
        }
        self.send(to, tid.to_be_bytes().to_vec(), Body::Query(query));
        true
    }

    fn forget_timers(&mut self, tid: u32, pending: &Pending) {
        self.deadlines.remove(&(pending.deadline, tid));
        if let Some(t) = pending.slow_at {
            self.slow_marks.remove(&(t, tid));
        }
    }

    fn send(&mut self, to: SocketAddr, tid: Vec<u8>, body: Body) {
        let bytes = Message {
            tid,
            version: Some(VERSION.to_vec()),
            read_only: false,
            body,
        }
        .encode();
        self.transmits.push_back(Transmit { to, bytes });
    }

    fn send_error(&mut self, to: SocketAddr, tid: Vec<u8>, code: i64, message: &str) {
        self.counters.answered += 1;
        let body = Body::Error {
            code,
            message: message.to_owned(),
        };
        self.send(to, tid, body);
    }

    fn query_failed(&mut self, pending: Pending, now: Instant) {
        if let Some((id, addr)) = self.table.failed(pending.to, now) {
            self.ping(id, addr, now);
        }
        if let Purpose::Lookup(lookup) = pending.purpose {
            self.lookup_failed(lookup, pending.to, now);
        }
    }

    /// Timeouts of pending queries, lookups advancing, bucket refresh, pings of questionable
    /// nodes, token rotation, peer-store expiry.
    pub fn tick(&mut self, now: Instant) {
        self.rotate_secrets(now);
        while let Some(&(deadline, tid)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(pending) = self.pending.remove(&tid) {
                self.forget_timers(tid, &pending);
                self.counters.timeouts += 1;
                self.query_failed(pending, now);
            }
        }
        while let Some(&(slow_at, tid)) = self.slow_marks.first() {
            if slow_at > now {
                break;
            }
            self.slow_marks.pop_first();
            if let Some(&Pending {
                to,
                purpose: Purpose::Lookup(lookup),
                ..
            }) = self.pending.get(&tid)
            {
                self.lookup_slow(lookup, to, now);
            }
        }
        if now >= self.next_store_sweep {
            self.next_store_sweep = now + STORE_SWEEP_EVERY;
            self.store.expire(now, self.cfg.peer_ttl);
        }
        if now >= self.next_maintenance {
            self.next_maintenance = now + MAINTENANCE_EVERY;
            self.maintain_table(now);
        }
    }

    fn maintain_table(&mut self, now: Instant) {
        // An empty table, or one short of K nodes (we joined through a node that knew few
        // others): bootstrap again, now and then.
        let live = self.table.live_len();
        if live >= K {
            self.bootstrap_retry = BOOTSTRAP_RETRY_FIRST;
        } else {
            let retry_due = self
                .last_bootstrap
                .is_none_or(|t| now.saturating_duration_since(t) >= self.bootstrap_retry);
            if !self.bootstrap_contacts.is_empty() && retry_due {
                self.start_bootstrap(now);
                self.bootstrap_retry = (self.bootstrap_retry * 2).min(BOOTSTRAP_RETRY);
            }
            if live == 0 {
                return;
            }
        }
        for target in self.table.due_for_refresh(now, &mut self.rng) {
            if self.lookups.len() + LOOKUP_SLOTS_KEPT_FREE < MAX_LOOKUPS {
                self.start_lookup(target, LookupKind::FindNode, true, &[], now);
            }
        }
        for (id, addr) in self.table.questionable_to_ping(now, PINGS_PER_MAINTENANCE) {
            self.ping(id, addr, now);
        }
    }

    /// When `tick` next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let rotation = self.secrets.rotated_at + self.cfg.token_rotation;
        let mut next = self
            .next_maintenance
            .min(self.next_store_sweep)
            .min(rotation);
        if let Some(&(deadline, _)) = self.deadlines.first() {
            next = next.min(deadline);
        }
        if let Some(&(slow_at, _)) = self.slow_marks.first() {
            next = next.min(slow_at);
        }
        Some(next)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<DhtEvent> {
        self.events.pop_front()
    }

    /// Starts an iterative get_peers lookup (alpha in flight, converging on the K closest). With
    /// `announce_port`, ends by sending announce_peer (port given explicitly, implied_port 0) to
    /// the K closest that returned tokens. With [`MAX_LOOKUPS`] running, it ends at once, empty.
    pub fn get_peers(
        &mut self,
        info_hash: [u8; 20],
        announce_port: Option<u16>,
        now: Instant,
    ) -> LookupId {
        let kind = LookupKind::GetPeers { announce_port };
        self.start_user_lookup(NodeId(info_hash), kind, now)
    }

    pub fn find_node(&mut self, target: NodeId, now: Instant) -> LookupId {
        self.start_user_lookup(target, LookupKind::FindNode, now)
    }

    fn start_user_lookup(&mut self, target: NodeId, kind: LookupKind, now: Instant) -> LookupId {
        match self.start_lookup(target, kind, false, &[], now) {
            Some(id) => id,
            None => {
                let lookup = self.new_lookup_id();
                self.events.push_back(DhtEvent::LookupDone {
                    lookup,
                    target: target.0,
                    summary: LookupSummary::default(),
                });
                lookup
            }
        }
    }

    fn new_lookup_id(&mut self) -> LookupId {
        let id = LookupId(self.next_lookup);
        self.next_lookup += 1;
        id
    }

    /// Starts a lookup from the K closest nodes of our table (and the bootstrap contacts when
    /// the table is short of K, or `extra` contacts); `None` when too many are running.
    fn start_lookup(
        &mut self,
        target: NodeId,
        kind: LookupKind,
        internal: bool,
        extra: &[SocketAddr],
        now: Instant,
    ) -> Option<LookupId> {
        if self.lookups.len() >= MAX_LOOKUPS {
            return None;
        }
        let id = self.new_lookup_id();
        let mut lookup = Lookup {
            target,
            kind,
            internal,
            candidates: Vec::new(),
            in_flight: 0,
            queried: 0,
            answered: 0,
            peers_seen: HashSet::new(),
        };
        let known = self.table.closest(&target, K);
        for &(node, addr) in &known {
            lookup.add_candidate(self.id, Some(node), addr, 1);
        }
        let contacts = if known.len() < K {
            &self.bootstrap_contacts[..]
        } else {
            &[]
        };
        for &addr in extra.iter().chain(contacts) {
            lookup.add_candidate(self.id, None, addr, 1);
        }
        self.lookups.insert(id, lookup);
        self.advance_lookup(id, now);
        Some(id)
    }

    /// Sends queries while fewer than alpha are in flight (slow ones not counted), to the closest
    /// not-yet-queried nodes among the K closest that have not failed (slow ones not counted);
    /// finishes when those K have all answered.
    fn advance_lookup(&mut self, id: LookupId, now: Instant) {
        loop {
            let Some(lookup) = self.lookups.get_mut(&id) else {
                return;
            };
            // The window: the K closest that have not failed, looking past slow ones (they may
            // well have left, so the nodes behind them are worth asking meanwhile).
            let mut next = None;
            let mut unfinished = false;
            let mut room = K;
            for (i, c) in lookup.candidates.iter().enumerate() {
                if room == 0 {
                    break;
                }
                match c.state {
                    CandidateState::Failed => continue,
                    CandidateState::New => {
                        unfinished = true;
                        next = next.or(Some(i));
                    }
                    CandidateState::InFlight => {
                        unfinished = true;
                        if c.slow {
                            continue;
                        }
                    }
                    CandidateState::Answered => {}
                }
                room -= 1;
            }
            if !unfinished {
                self.finish_lookup(id, now);
                return;
            }
            let Some(i) = next.filter(|_| lookup.in_flight < self.cfg.alpha.max(1)) else {
                return;
            };
            let c = &lookup.candidates[i];
            let (to, node) = (c.addr, c.id);
            let query = match lookup.kind {
                LookupKind::FindNode => Query::FindNode {
                    id: self.id,
                    target: lookup.target,
                },
                LookupKind::GetPeers { .. } => Query::GetPeers {
                    id: self.id,
                    info_hash: lookup.target.0,
                },
            };
            let sent = self.send_query(to, node, query, Purpose::Lookup(id), now);
            let Some(lookup) = self.lookups.get_mut(&id) else {
                return;
            };
            if sent {
                lookup.candidates[i].state = CandidateState::InFlight;
                lookup.in_flight += 1;
                lookup.queried += 1;
            } else {
                lookup.candidates[i].state = CandidateState::Failed;
            }
        }
    }

    fn lookup_answered(
        &mut self,
        id: LookupId,
        from: SocketAddr,
        response: Response,
        now: Instant,
    ) {
        let own = self.id;
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        let Some(i) = lookup.in_flight_at(from) else {
            return;
        };
        if !lookup.candidates[i].slow {
            lookup.in_flight -= 1;
        }
        lookup.answered += 1;
        let mut candidate = lookup.candidates.remove(i);
        candidate.state = CandidateState::Answered;
        candidate.id = Some(response.id);
        candidate.token = response.token;
        let depth = candidate.depth;
        // A bootstrap contact's place changes once its id is known.
        lookup.insert_sorted(candidate);
        for (node, addr) in response.nodes.unwrap_or_default() {
            lookup.add_candidate(own, Some(node), addr, depth + 1);
        }
        if let (LookupKind::GetPeers { .. }, Some(values)) = (lookup.kind, response.values) {
            let mut fresh = Vec::new();
            for peer in values {
                if lookup.peers_seen.len() >= MAX_PEERS_PER_LOOKUP {
                    break;
                }
                if lookup.peers_seen.insert(peer) {
                    fresh.push(peer);
                }
            }
            if !fresh.is_empty() && !lookup.internal {
                self.events.push_back(DhtEvent::Peers {
                    lookup: id,
                    info_hash: lookup.target.0,
                    peers: fresh,
                });
            }
        }
        self.advance_lookup(id, now);
    }

    fn lookup_failed(&mut self, id: LookupId, addr: SocketAddr, now: Instant) {
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        let Some(i) = lookup.in_flight_at(addr) else {
            return;
        };
        if !lookup.candidates[i].slow {
            lookup.in_flight -= 1;
        }
        lookup.candidates[i].state = CandidateState::Failed;
        self.advance_lookup(id, now);
    }

    /// A lookup query is slow: it frees its slot for another (it may still answer).
    fn lookup_slow(&mut self, id: LookupId, addr: SocketAddr, now: Instant) {
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        let Some(i) = lookup.in_flight_at(addr) else {
            return;
        };
        if !lookup.candidates[i].slow {
            lookup.candidates[i].slow = true;
            lookup.in_flight -= 1;
            self.advance_lookup(id, now);
        }
    }

    fn finish_lookup(&mut self, id: LookupId, now: Instant) {
        let Some(lookup) = self.lookups.remove(&id) else {
            return;
        };
        if self.bootstrap_lookup == Some(id) {
            self.bootstrap_lookup = None;
            self.refresh_far_buckets(now);
        }
        if let LookupKind::GetPeers {
            announce_port: Some(port),
        } = lookup.kind
        {
            let with_tokens: Vec<(NodeId, SocketAddr, Vec<u8>)> = lookup
                .candidates
                .iter()
                .filter(|c| c.state == CandidateState::Answered)
                .filter_map(|c| Some((c.id?, c.addr, c.token.clone()?)))
                .take(K)
                .collect();
            for (node, addr, token) in with_tokens {
                let query = Query::AnnouncePeer {
                    id: self.id,
                    info_hash: lookup.target.0,
                    port,
                    implied_port: false,
                    token,
                };
                self.send_query(addr, Some(node), query, Purpose::Announce, now);
            }
        }
        if !lookup.internal {
            self.events.push_back(DhtEvent::LookupDone {
                lookup: id,
                target: lookup.target.0,
                summary: lookup.summary(),
            });
        }
    }

    /// Kademlia's join, after the lookup of our own id: a lookup of a random id in each bucket
    /// farther than our own, so those buckets hold nodes from the start and lookups for any
    /// target can descend (otherwise they fill only through queries that happen to reach us,
    /// or at their refresh 15 min later, and a young swarm's lookups stop short of the closest
    /// nodes).
    fn refresh_far_buckets(&mut self, now: Instant) {
        let far = self.table.bucket_count().saturating_sub(1);
        for b in 0..far {
            if self.lookups.len() + LOOKUP_SLOTS_KEPT_FREE >= MAX_LOOKUPS {
                break;
            }
            let target = self.table.random_id_in_bucket(b, &mut self.rng);
            self.start_lookup(target, LookupKind::FindNode, true, &[], now);
        }
    }

    pub fn stats(&self) -> DhtStats {
        DhtStats {
            nodes: self.table.live_len(),
            torrents_stored: self.store.torrents.len(),
            peers_stored: self.store.peers,
            lookups_running: self.lookups.len(),
            queries_pending: self.pending.len(),
        }
    }

    pub fn counters(&self) -> DhtCounters {
        self.counters
    }

    /// The routing table, read-only (for status displays and tests).
    pub fn routing_table(&self) -> &RoutingTable {
        &self.table
    }

    /// The routing table's good nodes and our id, for saving (`$XDG_STATE_HOME/swarmfs/dht.dat`):
    /// a bencoded dict {id: 20 bytes, nodes: compact node infos}. [`load_saved`] parses it back.
    pub fn save(&self) -> Vec<u8> {
        let nodes = self.table.closest(&self.id, MAX_SAVED_NODES);
        bencode::dict([
            ("id", Owned::Bytes(self.id.0.to_vec())),
            ("nodes", Owned::Bytes(krpc::encode_nodes(&nodes))),
        ])
        .encode()
    }

    fn rotate_secrets(&mut self, now: Instant) {
        let rotation = self.cfg.token_rotation;
        let elapsed = now.saturating_duration_since(self.secrets.rotated_at);
        if elapsed < rotation {
            return;
        }
        // After two rotations' silence, tokens made with the current secret are too old too.
        self.secrets.previous = if elapsed >= rotation.saturating_mul(2) {
            self.rng.gen()
        } else {
            self.secrets.current
        };
        self.secrets.current = self.rng.gen();
        self.secrets.rotated_at = now;
    }

    fn token_for(&self, ip: IpAddr) -> Option<[u8; TOKEN_LEN]> {
        match ip {
            IpAddr::V4(ip) => Some(make_token(&self.secrets.current, ip)),
            IpAddr::V6(_) => None,
        }
    }

    fn token_valid(&self, ip: IpAddr, token: &[u8]) -> bool {
        let IpAddr::V4(ip) = ip else {
            return false;
        };
        token == make_token(&self.secrets.current, ip)
            || token == make_token(&self.secrets.previous, ip)
    }

    /// Per-IP rate limit on incoming queries: `rate_limit` per one-second window.
    fn allow_query(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.cfg.rate_limit == 0 {
            return true;
        }
        if self.rate.len() >= MAX_RATE_TRACKED_IPS && !self.rate.contains_key(&ip) {
            // Full: forget the IPs whose window ended, at most every RATE_PURGE_EVERY (a flood
            // of new source addresses must not cost a pass over the map each).
            if now >= self.rate_purge_after {
                self.rate_purge_after = now + RATE_PURGE_EVERY;
                self.rate
                    .retain(|_, w| now.saturating_duration_since(w.start) < RATE_WINDOW);
            }
            if self.rate.len() >= MAX_RATE_TRACKED_IPS {
                // Every tracked IP is busy this second: refuse newcomers for now.
                return false;
            }
        }
        let window = self.rate.entry(ip).or_insert(RateWindow {
            start: now,
            count: 0,
        });
        if now.saturating_duration_since(window.start) >= RATE_WINDOW {
            window.start = now;
            window.count = 0;
        }
        if window.count >= self.cfg.rate_limit {
            return false;
        }
        window.count += 1;
        true
    }

    #[cfg(debug_assertions)]
    pub fn check_invariants(&self) {
        self.table.check_invariants();
        assert!(self.pending.len() <= MAX_PENDING_QUERIES);
        assert_eq!(self.deadlines.len(), self.pending.len());
        for (deadline, tid) in &self.deadlines {
            assert_eq!(self.pending.get(tid).map(|p| p.deadline), Some(*deadline));
        }
        for (slow_at, tid) in &self.slow_marks {
            assert_eq!(
                self.pending.get(tid).and_then(|p| p.slow_at),
                Some(*slow_at)
            );
        }
        assert!(self.lookups.len() <= MAX_LOOKUPS);
        for lookup in self.lookups.values() {
            assert!(lookup.candidates.len() <= MAX_LOOKUP_CANDIDATES + 1);
            let keys: Vec<[u8; 20]> = lookup
                .candidates
                .iter()
                .map(|c| c.key(&lookup.target))
                .collect();
            assert!(keys.windows(2).all(|w| w[0] <= w[1]), "candidates unsorted");
            let in_flight = lookup
                .candidates
                .iter()
                .filter(|c| c.state == CandidateState::InFlight && !c.slow)
                .count();
            assert_eq!(in_flight, lookup.in_flight);
            assert!(lookup.peers_seen.len() <= MAX_PEERS_PER_LOOKUP);
        }
        assert!(self.store.torrents.len() <= self.cfg.max_torrents);
        let mut peers = 0;
        for stored in self.store.torrents.values() {
            assert!(!stored.is_empty() && stored.len() <= self.cfg.max_peers_per_torrent);
            peers += stored.len();
        }
        assert_eq!(peers, self.store.peers);
        assert!(self.rate.len() <= MAX_RATE_TRACKED_IPS);
        assert!(self.bootstrap_contacts.len() <= MAX_BOOTSTRAP_CONTACTS);
    }
}

/// Parses what [`Dht::save`] wrote: our id and the saved nodes' addresses (bounded; errors, not
/// panics, on anything else).
pub fn load_saved(bytes: &[u8]) -> Result<(NodeId, Vec<SocketAddr>), KrpcError> {
    if bytes.len() > MAX_SAVED_STATE {
        return Err(KrpcError::Malformed("saved DHT state is too large"));
    }
    let root = bencode::decode(bytes)?;
    let id = root
        .get("id")
        .and_then(Node::as_bytes)
        .and_then(NodeId::from_slice)
        .ok_or(KrpcError::Malformed("saved DHT state has no 20-byte id"))?;
    let nodes = match root.get("nodes") {
        None => Vec::new(),
        Some(n) => krpc::decode_nodes(
            n.as_bytes()
                .ok_or(KrpcError::Malformed("saved nodes are not a string"))?,
            MAX_SAVED_NODES,
        )?,
    };
    Ok((id, nodes.into_iter().map(|(_, addr)| addr).collect()))
}

/// An in-memory network of [`Dht`] nodes with a simulated clock, for tests and
/// `examples/dht_sim.rs`: every datagram from `poll_transmit` reaches its addressee after a fixed
/// one-way delay (or is lost if the addressee left); timers fire at `next_timeout`.
pub mod sim {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use super::{Dht, DhtConfig, DhtEvent, LookupId, LookupSummary};
    use crate::core::routing::NodeId;

    pub struct SimNode {
        pub dht: Dht,
        pub addr: SocketAddr,
        pub alive: bool,
        /// Events polled from the node, oldest first.
        pub events: Vec<DhtEvent>,
        /// When each of `events` came out (parallel to it).
        pub event_times: Vec<Instant>,
        /// The earliest timer queued for it, if any.
        timer: Option<Instant>,
    }

    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct Datagram {
        at: Instant,
        seq: u64,
        to: usize,
        from: SocketAddr,
        bytes: Vec<u8>,
    }

    pub struct SimNetwork {
        pub nodes: Vec<SimNode>,
        by_addr: HashMap<SocketAddr, usize>,
        now: Instant,
        one_way: Duration,
        datagrams: BinaryHeap<Reverse<Datagram>>,
        timers: BinaryHeap<Reverse<(Instant, usize)>>,
        seq: u64,
        /// Datagrams delivered to a live node.
        pub delivered: u64,
        /// Datagrams to an address nobody has, or to a node that left.
        pub lost: u64,
    }

    impl SimNetwork {
        pub fn new(one_way_delay: Duration, start: Instant) -> SimNetwork {
            SimNetwork {
                nodes: Vec::new(),
                by_addr: HashMap::new(),
                now: start,
                one_way: one_way_delay,
                datagrams: BinaryHeap::new(),
                timers: BinaryHeap::new(),
                seq: 0,
                delivered: 0,
                lost: 0,
            }
        }

        pub fn now(&self) -> Instant {
            self.now
        }

        /// The address node `i` gets: 127.0.0.1 and up, ports from 10000 (many nodes per IP).
        pub fn addr_of(i: usize) -> SocketAddr {
            let ip = u32::from(Ipv4Addr::new(127, 0, 0, 1)) + (i / 50_000) as u32;
            SocketAddr::from((Ipv4Addr::from(ip), 10_000 + (i % 50_000) as u16))
        }

        pub fn add_node(&mut self, id: NodeId, cfg: DhtConfig, seed: u64) -> usize {
            let i = self.nodes.len();
            let addr = Self::addr_of(i);
            self.nodes.push(SimNode {
                dht: Dht::new(id, cfg, seed, self.now),
                addr,
                alive: true,
                events: Vec::new(),
                event_times: Vec::new(),
                timer: None,
            });
            self.by_addr.insert(addr, i);
            self.flush(i);
            i
        }

        /// Calls `f` on node `i` at the current time, then routes what it sent.
        pub fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Dht, Instant) -> R) -> R {
            let now = self.now;
            let r = f(&mut self.nodes[i].dht, now);
            self.flush(i);
            r
        }

        /// The node leaves without a word: what it was sent is lost from now on.
        pub fn kill(&mut self, i: usize) {
            self.nodes[i].alive = false;
        }

        fn flush(&mut self, i: usize) {
            let from = self.nodes[i].addr;
            while let Some(t) = self.nodes[i].dht.poll_transmit() {
                match self.by_addr.get(&t.to) {
                    Some(&to) => {
                        self.seq += 1;
                        self.datagrams.push(Reverse(Datagram {
                            at: self.now + self.one_way,
                            seq: self.seq,
                            to,
                            from,
                            bytes: t.bytes,
                        }));
                    }
                    None => self.lost += 1,
                }
            }
            let node = &mut self.nodes[i];
            while let Some(e) = node.dht.poll_event() {
                node.events.push(e);
                node.event_times.push(self.now);
            }
            if let Some(t) = node.dht.next_timeout() {
                if node.timer.is_none_or(|s| t < s) {
                    node.timer = Some(t);
                    self.timers.push(Reverse((t, i)));
                }
            }
        }

        /// Runs one datagram or timer due at or before `deadline`; false if there is none.
        pub fn step(&mut self, deadline: Instant) -> bool {
            let next_datagram = self.datagrams.peek().map(|d| d.0.at);
            let next_timer = self.timers.peek().map(|t| t.0 .0);
            let datagram_first = match (next_datagram, next_timer) {
                (None, None) => return false,
                (Some(d), Some(t)) => d <= t,
                (d, _) => d.is_some(),
            };
            if datagram_first {
                let Some(Reverse(d)) = self.datagrams.pop() else {
                    return false;
                };
                if d.at > deadline {
                    self.datagrams.push(Reverse(d));
                    return false;
                }
                self.now = self.now.max(d.at);
                if !self.nodes[d.to].alive {
                    self.lost += 1;
                    return true;
                }
                self.delivered += 1;
                let now = self.now;
                self.nodes[d.to].dht.handle(d.from, &d.bytes, now);
                self.flush(d.to);
            } else {
                let Some(Reverse((at, i))) = self.timers.pop() else {
                    return false;
                };
                if at > deadline {
                    self.timers.push(Reverse((at, i)));
                    return false;
                }
                self.now = self.now.max(at);
                if self.nodes[i].timer == Some(at) {
                    self.nodes[i].timer = None;
                }
                if !self.nodes[i].alive {
                    return true;
                }
                let now = self.now;
                if self.nodes[i].dht.next_timeout().is_some_and(|t| t <= now) {
                    self.nodes[i].dht.tick(now);
                }
                self.flush(i);
            }
            true
        }

        /// Runs until `done` holds (checked after every step) or `limit` of simulated time
        /// passes; returns whether `done` held.
        pub fn run_until(
            &mut self,
            limit: Duration,
            mut done: impl FnMut(&SimNetwork) -> bool,
        ) -> bool {
            let deadline = self.now + limit;
            loop {
                if done(self) {
                    return true;
                }
                if !self.step(deadline) {
                    self.now = self.now.max(deadline);
                    return done(self);
                }
            }
        }

        pub fn run_for(&mut self, d: Duration) {
            self.run_until(d, |_| false);
        }

        /// The summary of lookup `lookup` of node `i`, once done.
        pub fn lookup_done(&self, i: usize, lookup: LookupId) -> Option<&LookupSummary> {
            self.nodes[i].events.iter().find_map(|e| match e {
                DhtEvent::LookupDone {
                    lookup: l, summary, ..
                } if *l == lookup => Some(summary),
                _ => None,
            })
        }

        /// Every peer node `i` heard of in lookup `lookup`.
        pub fn lookup_peers(&self, i: usize, lookup: LookupId) -> Vec<SocketAddr> {
            self.nodes[i]
                .events
                .iter()
                .filter_map(|e| match e {
                    DhtEvent::Peers {
                        lookup: l, peers, ..
                    } if *l == lookup => Some(peers),
                    _ => None,
                })
                .flatten()
                .copied()
                .collect()
        }

        /// Runs until lookup `lookup` of node `i` is done (or `limit` passes).
        pub fn wait_lookup(
            &mut self,
            i: usize,
            lookup: LookupId,
            limit: Duration,
        ) -> Option<LookupSummary> {
            self.run_until(limit, |net| net.lookup_done(i, lookup).is_some());
            self.lookup_done(i, lookup).cloned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sim::SimNetwork;
    use super::*;

    const RTT_HALF: Duration = Duration::from_millis(25);

    fn test_cfg() -> DhtConfig {
        DhtConfig {
            rate_limit: 0,
            ..DhtConfig::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// `n` nodes with seeded random ids; each joins through node 0 once the previous joins are
    /// done, as nodes arrive in a real network.
    fn build_network(n: usize, seed: u64) -> SimNetwork {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut net = SimNetwork::new(RTT_HALF, Instant::now());
        for i in 0..n {
            let id = NodeId::random(&mut rng);
            net.add_node(id, test_cfg(), seed.wrapping_mul(1000) + i as u64);
            if i > 0 {
                // A node that has finished joining (an earlier batch), as a real router would be.
                let joined = (i - i % 10).max(1);
                let entry = SimNetwork::addr_of(rng.gen_range(0..joined));
                net.with(i, |d, now| d.bootstrap(&[entry], now));
            }
            if i % 10 == 9 {
                net.run_for(Duration::from_secs(2));
            }
        }
        net.run_for(Duration::from_secs(10));
        for node in &net.nodes {
            node.dht.check_invariants();
        }
        net
    }

    fn true_closest(net: &SimNetwork, target: &NodeId, except: usize) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = net
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.alive && *i != except)
            .map(|(_, n)| n.dht.id())
            .collect();
        ids.sort_by_key(|id| target.distance(id));
        ids.truncate(K);
        ids
    }

    #[test]
    fn a_newcomer_fills_every_far_bucket_the_network_can_fill_when_it_joins() {
        let mut net = build_network(100, 3);
        let newcomer = net.add_node(NodeId([0x3c; 20]), test_cfg(), 77);
        net.with(newcomer, |d, now| {
            d.bootstrap(&[SimNetwork::addr_of(42)], now)
        });
        net.run_for(Duration::from_secs(3));
        let own = net.nodes[newcomer].dht.id();
        let table = net.nodes[newcomer].dht.routing_table();
        let far = table.bucket_count() - 1;
        let mut missing = Vec::new();
        for b in 0..far {
            let exists = net
                .nodes
                .iter()
                .any(|n| n.alive && n.dht.id() != own && own.common_prefix_len(&n.dht.id()) == b);
            let known = table.nodes().any(|n| own.common_prefix_len(&n.id) == b);
            if exists && !known {
                missing.push(b);
            }
        }
        assert!(
            missing.is_empty(),
            "far buckets left empty after the join: {missing:?} of {far}"
        );
        net.nodes[newcomer].dht.check_invariants();
    }

    #[test]
    fn a_newcomer_finds_announced_peers_and_the_true_k_closest() {
        let mut net = build_network(60, 1);
        let info_hash = [0x5a; 20];
        let announce = net.with(5, |d, now| d.get_peers(info_hash, Some(7000), now));
        let summary = net
            .wait_lookup(5, announce, Duration::from_secs(60))
            .unwrap();
        assert_eq!(summary.closest.len(), K);
        net.run_for(Duration::from_secs(1));
        let holders = net
            .nodes
            .iter()
            .filter(|n| n.dht.stats().peers_stored > 0)
            .count();
        assert_eq!(holders, K, "announced to the K closest that gave tokens");

        // A newcomer that knows one node.
        let newcomer = net.add_node(NodeId([0xa5; 20]), test_cfg(), 99);
        net.with(newcomer, |d, now| {
            d.bootstrap(&[SimNetwork::addr_of(17)], now)
        });
        net.run_for(Duration::from_secs(10));
        assert!(net.nodes[newcomer].dht.stats().nodes >= K);
        let lookup = net.with(newcomer, |d, now| d.get_peers(info_hash, None, now));
        let summary = net
            .wait_lookup(newcomer, lookup, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            net.lookup_peers(newcomer, lookup),
            vec![addr("127.0.0.1:7000")]
        );
        let expected = true_closest(&net, &NodeId(info_hash), newcomer);
        let got: Vec<NodeId> = summary.closest.iter().map(|(id, _)| *id).collect();
        assert_eq!(got, expected);
        assert!(summary.hops >= 1 && summary.answered >= K as u32);
        assert!(summary.queried >= summary.answered);

        // find_node converges on the true K closest too.
        let target = NodeId([0x33; 20]);
        let lookup = net.with(newcomer, |d, now| d.find_node(target, now));
        let summary = net
            .wait_lookup(newcomer, lookup, Duration::from_secs(60))
            .unwrap();
        let got: Vec<NodeId> = summary.closest.iter().map(|(id, _)| *id).collect();
        let want = true_closest(&net, &target, newcomer);
        assert_eq!(got, want);
        for node in &net.nodes {
            node.dht.check_invariants();
        }
    }

    #[test]
    fn lookups_still_succeed_after_30_of_100_nodes_leave() {
        let mut net = build_network(100, 2);
        let mut rng = StdRng::seed_from_u64(22);
        let hashes: Vec<[u8; 20]> = (0..20).map(|_| rng.gen()).collect();
        for (h, info_hash) in hashes.iter().enumerate() {
            let node = h * 5;
            let port = 8000 + h as u16;
            let lookup = net.with(node, |d, now| d.get_peers(*info_hash, Some(port), now));
            assert!(net
                .wait_lookup(node, lookup, Duration::from_secs(60))
                .is_some());
        }
        net.run_for(Duration::from_secs(1));
        let mut order: Vec<usize> = (0..100).collect();
        rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
        for &i in &order[..30] {
            net.kill(i);
        }
        let alive = &order[30..];
        let mut found = 0;
        for (h, info_hash) in hashes.iter().enumerate() {
            let from = alive[rng.gen_range(0..alive.len())];
            let lookup = net.with(from, |d, now| d.get_peers(*info_hash, None, now));
            let summary = net.wait_lookup(from, lookup, Duration::from_secs(300));
            assert!(summary.is_some(), "lookup {h} never ended");
            let expected = SocketAddr::from(([127, 0, 0, 1], 8000 + h as u16));
            if net.lookup_peers(from, lookup).contains(&expected) {
                found += 1;
            }
        }
        assert!(found >= 19, "only {found} of 20 lookups found their peers");
        for &i in alive {
            net.nodes[i].dht.check_invariants();
        }
    }

    /// A lone node and a hand-driven client: queries in, answers out.
    struct Probe {
        dht: Dht,
        now: Instant,
    }

    impl Probe {
        fn new(cfg: DhtConfig) -> Probe {
            let now = Instant::now();
            Probe {
                dht: Dht::new(NodeId([0x80; 20]), cfg, 7, now),
                now,
            }
        }

        fn query(&mut self, from: &str, query: Query) -> Option<Message> {
            let m = Message {
                tid: b"tt".to_vec(),
                version: None,
                read_only: true,
                body: Body::Query(query),
            };
            self.dht.handle(addr(from), &m.encode(), self.now);
            self.dht.check_invariants();
            let mut reply = None;
            while let Some(t) = self.dht.poll_transmit() {
                if t.to == addr(from) {
                    reply = Some(krpc::decode(&t.bytes).unwrap());
                }
            }
            reply
        }

        fn token(&mut self, from: &str, info_hash: [u8; 20]) -> Vec<u8> {
            let reply = self.query(
                from,
                Query::GetPeers {
                    id: NodeId([1; 20]),
                    info_hash,
                },
            );
            match reply.map(|m| m.body) {
                Some(Body::Response(Response { token: Some(t), .. })) => t,
                other => panic!("no token: {other:?}"),
            }
        }

        fn announce(&mut self, from: &str, info_hash: [u8; 20], token: Vec<u8>) -> Body {
            let q = Query::AnnouncePeer {
                id: NodeId([1; 20]),
                info_hash,
                port: 6881,
                implied_port: false,
                token,
            };
            self.query(from, q).unwrap().body
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.dht.tick(self.now);
        }
    }

    fn is_error(body: &Body, code: i64) -> bool {
        matches!(body, Body::Error { code: c, .. } if *c == code)
    }

    #[test]
    fn tokens_bind_the_ip_and_outlive_one_rotation_only() {
        let mut p = Probe::new(test_cfg());
        let h = [9; 20];
        let token = p.token("10.0.0.1:5000", h);
        assert_eq!(token.len(), TOKEN_LEN);
        // Another IP cannot use it; a garbled one is refused.
        assert!(is_error(
            &p.announce("10.0.0.2:5000", h, token.clone()),
            203
        ));
        assert!(is_error(
            &p.announce("10.0.0.1:5000", h, b"garbage!".to_vec()),
            203
        ));
        assert_eq!(p.dht.stats().peers_stored, 0);
        // One rotation later (the previous secret) it still works, from any port of that IP.
        p.advance(DhtConfig::default().token_rotation);
        assert!(matches!(
            p.announce("10.0.0.1:5001", h, token.clone()),
            Body::Response(_)
        ));
        assert_eq!(p.dht.stats().peers_stored, 1);
        let reply = p.query(
            "10.0.0.9:1",
            Query::GetPeers {
                id: NodeId([2; 20]),
                info_hash: h,
            },
        );
        let Some(Body::Response(r)) = reply.map(|m| m.body) else {
            panic!()
        };
        assert_eq!(r.values, Some(vec![addr("10.0.0.1:6881")]));
        // Two rotations later it is refused.
        p.advance(DhtConfig::default().token_rotation);
        assert!(is_error(&p.announce("10.0.0.1:5000", h, token), 203));
        // A long silence is two rotations too: a fresh token dies with it.
        let fresh = p.token("10.0.0.1:5000", h);
        p.advance(DhtConfig::default().token_rotation * 3);
        assert!(is_error(&p.announce("10.0.0.1:5000", h, fresh), 203));
    }

    #[test]
    fn answers_each_query_and_refuses_unknown_or_malformed_ones() {
        let mut p = Probe::new(test_cfg());
        let r = p
            .query(
                "10.0.0.1:1",
                Query::Ping {
                    id: NodeId([1; 20]),
                },
            )
            .unwrap();
        assert_eq!(r.tid, b"tt");
        assert_eq!(r.version.as_deref(), Some(VERSION));
        assert_eq!(
            r.body,
            Body::Response(Response::id_only(NodeId([0x80; 20])))
        );
        let r = p
            .query(
                "10.0.0.1:1",
                Query::FindNode {
                    id: NodeId([1; 20]),
                    target: NodeId([3; 20]),
                },
            )
            .unwrap();
        assert!(matches!(
            r.body,
            Body::Response(Response { nodes: Some(_), .. })
        ));
        let r = p
            .query(
                "10.0.0.1:1",
                Query::Unknown {
                    id: NodeId([1; 20]),
                    method: b"vote".to_vec(),
                },
            )
            .unwrap();
        assert!(is_error(&r.body, 204));
        // Malformed query with a transaction id: 203.
        p.dht.handle(
            addr("10.0.0.1:1"),
            b"d1:ad2:id3:abce1:q4:ping1:t2:xy1:y1:qe",
            p.now,
        );
        let t = p.dht.poll_transmit().unwrap();
        let m = krpc::decode(&t.bytes).unwrap();
        assert_eq!(m.tid, b"xy");
        assert!(is_error(&m.body, 203));
        // IPv6 senders, port 0, and garbage: dropped without a word.
        let ping = Message {
            tid: b"tt".to_vec(),
            version: None,
            read_only: false,
            body: Body::Query(Query::Ping {
                id: NodeId([1; 20]),
            }),
        }
        .encode();
        p.dht.handle(addr("[::1]:5"), &ping, p.now);
        p.dht.handle(addr("10.0.0.1:0"), &ping, p.now);
        p.dht.handle(addr("10.0.0.1:1"), b"garbage", p.now);
        assert_eq!(p.dht.poll_transmit(), None);
        assert_eq!(p.dht.counters().dropped, 3);
        // A querying node (not read-only) is offered to the table and pinged to confirm it.
        p.dht.handle(addr("10.0.0.7:7"), &ping, p.now);
        let sent: Vec<Transmit> = std::iter::from_fn(|| p.dht.poll_transmit()).collect();
        assert_eq!(sent.len(), 2, "an answer and a ping");
        assert!(sent.iter().all(|t| t.to == addr("10.0.0.7:7")));
    }

    #[test]
    fn the_rate_limit_drops_a_flooding_ip_only_for_its_second() {
        let mut p = Probe::new(DhtConfig {
            rate_limit: 5,
            ..test_cfg()
        });
        let ping = Query::Ping {
            id: NodeId([1; 20]),
        };
        let answered = (0..10)
            .filter(|_| p.query("10.0.0.1:1", ping.clone()).is_some())
            .count();
        assert_eq!(answered, 5);
        assert_eq!(p.dht.counters().rate_limited, 5);
        assert!(
            p.query("10.0.0.2:1", ping.clone()).is_some(),
            "other IPs are served"
        );
        p.now += Duration::from_millis(999);
        assert!(p.query("10.0.0.1:1", ping.clone()).is_none());
        p.now += Duration::from_millis(1);
        assert!(p.query("10.0.0.1:1", ping).is_some(), "a new second");
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_the_rate_map_bounded() {
        let mut p = Probe::new(DhtConfig {
            rate_limit: 5,
            ..test_cfg()
        });
        let ping = Message {
            tid: b"tt".to_vec(),
            version: None,
            read_only: true,
            body: Body::Query(Query::Ping {
                id: NodeId([1; 20]),
            }),
        }
        .encode();
        let from = |i: usize| SocketAddr::from(([10, 5, (i >> 8) as u8, i as u8], 1));
        for i in 0..MAX_RATE_TRACKED_IPS + 1000 {
            p.dht.handle(from(i), &ping, p.now);
        }
        let answered = std::iter::from_fn(|| p.dht.poll_transmit()).count();
        assert_eq!(answered, MAX_RATE_TRACKED_IPS);
        assert_eq!(p.dht.counters().rate_limited, 1000);
        p.dht.check_invariants();
        // A second later the old windows are forgotten and newcomers are served again.
        p.now += Duration::from_secs(1);
        p.dht
            .handle(from(MAX_RATE_TRACKED_IPS + 5000), &ping, p.now);
        assert!(p.dht.poll_transmit().is_some());
        p.dht.check_invariants();
    }

    #[test]
    fn the_peer_store_is_bounded_and_expires() {
        let cfg = DhtConfig {
            max_torrents: 3,
            max_peers_per_torrent: 4,
            ..test_cfg()
        };
        let ttl = cfg.peer_ttl;
        let mut p = Probe::new(cfg);
        let t0 = p.now;
        // 10 peers for one torrent: the 4 most recent are kept.
        for i in 0..10 {
            let from = format!("10.0.1.{i}:1");
            let token = p.token(&from, [1; 20]);
            p.now += Duration::from_secs(1);
            assert!(matches!(
                p.announce(&from, [1; 20], token),
                Body::Response(_)
            ));
        }
        assert_eq!(p.dht.stats().peers_stored, 4);
        let kept = p.dht.store.get(&[1; 20], 100);
        assert_eq!(kept[0], addr("10.0.1.9:6881"));
        assert!(!kept.contains(&addr("10.0.1.5:6881")));
        // 5 torrents: the 3 announced last are kept.
        for h in 2..=5u8 {
            let token = p.token("10.0.2.1:1", [h; 20]);
            p.now += Duration::from_secs(1);
            p.announce("10.0.2.1:1", [h; 20], token);
        }
        let stats = p.dht.stats();
        assert_eq!((stats.torrents_stored, stats.peers_stored), (3, 3));
        assert!(p.dht.store.get(&[1; 20], 100).is_empty());
        // The TTL: everything expires at the next sweep after it.
        p.advance(ttl - (p.now - t0) - Duration::from_secs(100));
        assert_eq!(p.dht.stats().peers_stored, 3);
        p.advance(Duration::from_secs(200));
        assert_eq!(p.dht.stats().peers_stored, 0);
        p.dht.check_invariants();
    }

    #[test]
    fn pending_queries_and_lookups_are_bounded() {
        let mut p = Probe::new(test_cfg());
        for i in 0..3000u32 {
            let a = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 1));
            p.dht.ping(NodeId([2; 20]), a, p.now);
        }
        assert_eq!(p.dht.stats().queries_pending, MAX_PENDING_QUERIES);
        assert_eq!(
            p.dht.counters().queries_refused,
            3000 - MAX_PENDING_QUERIES as u64
        );
        p.advance(Duration::from_secs(6));
        assert_eq!(p.dht.stats().queries_pending, 0);

        p.dht.bootstrap(&[addr("10.9.9.9:1")], p.now);
        let ids: Vec<LookupId> = (0..100u8)
            .map(|i| p.dht.get_peers([i; 20], None, p.now))
            .collect();
        assert_eq!(p.dht.stats().lookups_running, MAX_LOOKUPS);
        let done: Vec<LookupId> = std::iter::from_fn(|| p.dht.poll_event())
            .filter_map(|e| match e {
                DhtEvent::LookupDone {
                    lookup, summary, ..
                } => {
                    assert_eq!(summary, LookupSummary::default());
                    Some(lookup)
                }
                _ => None,
            })
            .collect();
        // One slot went to the bootstrap lookup.
        assert_eq!(done, ids[MAX_LOOKUPS - 1..].to_vec());
        p.dht.check_invariants();
        // Unanswered, every lookup ends with its timeouts (a re-bootstrap, the table being
        // short of K nodes, may have started one more).
        p.advance(Duration::from_secs(6));
        assert!(p.dht.stats().lookups_running <= 1);
        p.dht.check_invariants();
    }

    #[test]
    fn bootstraps_again_while_the_table_is_empty() {
        let mut p = Probe::new(test_cfg());
        let router = addr("10.0.0.1:6881");
        p.dht.bootstrap(&[router], p.now);
        let first: Vec<Transmit> = std::iter::from_fn(|| p.dht.poll_transmit()).collect();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].to, router);
        assert!(matches!(
            krpc::decode(&first[0].bytes).unwrap().body,
            Body::Query(Query::FindNode { target, .. }) if target == p.dht.id()
        ));
        // No answer: the same query again after 5 s (the query itself times out at 5 s too).
        p.advance(Duration::from_secs(5));
        let again: Vec<Transmit> = std::iter::from_fn(|| p.dht.poll_transmit()).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].to, router);
        // The router answers (with nobody): it joins the table; a table short of K nodes still
        // bootstraps again, after 10 s, then 20 s, then every BOOTSTRAP_RETRY.
        let tid = krpc::decode(&again[0].bytes).unwrap().tid;
        let answer = Message {
            tid,
            version: None,
            read_only: false,
            body: Body::Response(Response {
                nodes: Some(vec![]),
                ..Response::id_only(NodeId([3; 20]))
            }),
        };
        p.dht.handle(router, &answer.encode(), p.now);
        assert_eq!(p.dht.stats().nodes, 1);
        assert_eq!(p.dht.poll_transmit(), None);
        let mut retries_at = Vec::new();
        for step in 1..=24 {
            p.advance(Duration::from_secs(5));
            for t in std::iter::from_fn(|| p.dht.poll_transmit()) {
                assert_eq!(t.to, router);
                retries_at.push(step * 5);
            }
        }
        assert_eq!(
            retries_at,
            vec![10, 30, 60, 90, 120],
            "back-off 10, 20, then 30 s"
        );
    }

    #[test]
    fn a_silent_node_frees_its_lookup_slot_after_a_second_but_may_still_answer() {
        let mut p = Probe::new(test_cfg());
        let contacts: Vec<SocketAddr> = (1..=5)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 1)))
            .collect();
        let lookup = p.dht.find_node(NodeId([1; 20]), p.now);
        assert!(
            p.dht.poll_transmit().is_none(),
            "no nodes, no contacts: nothing to ask"
        );
        assert!(
            matches!(p.dht.poll_event(), Some(DhtEvent::LookupDone { lookup: l, .. }) if l == lookup)
        );
        p.dht.bootstrap(&contacts, p.now);
        let first: Vec<Transmit> = std::iter::from_fn(|| p.dht.poll_transmit()).collect();
        assert_eq!(first.len(), 3, "alpha in flight");
        assert_eq!(p.dht.next_timeout(), Some(p.now + SLOW_QUERY_AFTER));
        p.advance(SLOW_QUERY_AFTER);
        let second: Vec<Transmit> = std::iter::from_fn(|| p.dht.poll_transmit()).collect();
        assert_eq!(second.len(), 2, "the slow ones no longer hold their slots");
        p.dht.check_invariants();
        // A slow node that answers late still counts.
        let tid = krpc::decode(&first[0].bytes).unwrap().tid;
        let answer = Message {
            tid,
            version: None,
            read_only: false,
            body: Body::Response(Response {
                nodes: Some(vec![]),
                ..Response::id_only(NodeId([3; 20]))
            }),
        };
        p.now += Duration::from_secs(2);
        p.dht.handle(first[0].to, &answer.encode(), p.now);
        assert_eq!(p.dht.stats().nodes, 1);
        p.dht.check_invariants();
        // The user's lookup ended; only a re-bootstrap (the table is short of K) may run.
        p.advance(Duration::from_secs(5));
        assert!(p.dht.stats().lookups_running <= 1);
        p.dht.check_invariants();
    }

    #[test]
    fn answers_from_elsewhere_or_with_another_id_are_not_trusted() {
        let mut p = Probe::new(test_cfg());
        let node = addr("10.0.0.1:1");
        p.dht.ping(NodeId([4; 20]), node, p.now);
        let tid = krpc::decode(&p.dht.poll_transmit().unwrap().bytes)
            .unwrap()
            .tid;
        let answer = |id: NodeId| {
            Message {
                tid: tid.clone(),
                version: None,
                read_only: false,
                body: Body::Response(Response::id_only(id)),
            }
            .encode()
        };
        p.dht
            .handle(addr("10.0.0.2:1"), &answer(NodeId([4; 20])), p.now);
        assert_eq!(
            p.dht.stats().queries_pending,
            1,
            "another address cannot answer"
        );
        p.dht.handle(node, &answer(NodeId([5; 20])), p.now);
        assert_eq!(p.dht.stats().queries_pending, 0);
        assert_eq!(
            p.dht.stats().nodes,
            0,
            "a different id at that address is not our node"
        );
    }

    #[test]
    fn saved_state_round_trips_and_bad_state_is_an_error() {
        let net = build_network(20, 3);
        let dht = &net.nodes[4].dht;
        let saved = dht.save();
        let (id, nodes) = load_saved(&saved).unwrap();
        assert_eq!(id, dht.id());
        assert_eq!(nodes.len(), dht.stats().nodes);
        assert!(!nodes.is_empty());
        for bad in [
            &b""[..],
            b"le",
            b"d2:id3:abce",
            b"d2:id20:abcdefghij01234567895:nodes3:abce",
            b"d2:id20:abcdefghij01234567895:nodesi1ee",
        ] {
            assert!(load_saved(bad).is_err(), "{bad:?}");
        }
        assert!(load_saved(&vec![b'x'; MAX_SAVED_STATE + 1]).is_err());
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..2000 {
            let _ = load_saved(&crate::core::mutate::mutate(&mut rng, &saved));
        }
    }

    #[test]
    fn twenty_thousand_random_packets_never_panic() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut p = Probe::new(test_cfg());
        // Queries of ours in flight, so mutated answers reach the response paths.
        let routers: Vec<SocketAddr> = (1..=8)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 1)))
            .collect();
        p.dht.bootstrap(&routers, p.now);
        p.dht.get_peers([7; 20], Some(1), p.now);
        let mut ours: Vec<(SocketAddr, Vec<u8>)> = std::iter::from_fn(|| p.dht.poll_transmit())
            .map(|t| (t.to, krpc::decode(&t.bytes).unwrap().tid))
            .collect();
        let nodes: Vec<(NodeId, SocketAddr)> = (0..16u8)
            .map(|i| (NodeId([i; 20]), SocketAddr::from(([10, 2, 0, i], 1))))
            .collect();
        let samples = |tid: &[u8]| -> Vec<Vec<u8>> {
            let m = |body| Message {
                tid: tid.to_vec(),
                version: Some(b"XX01".to_vec()),
                read_only: false,
                body,
            };
            vec![
                m(Body::Response(Response {
                    id: NodeId([9; 20]),
                    nodes: Some(nodes.clone()),
                    values: Some(vec![addr("1.2.3.4:5")]),
                    token: Some(vec![1; 8]),
                }))
                .encode(),
                m(Body::Error {
                    code: 202,
                    message: "x".into(),
                })
                .encode(),
                m(Body::Query(Query::AnnouncePeer {
                    id: NodeId([9; 20]),
                    info_hash: [7; 20],
                    port: 1,
                    implied_port: true,
                    token: vec![0; 8],
                }))
                .encode(),
                m(Body::Query(Query::GetPeers {
                    id: NodeId([9; 20]),
                    info_hash: [7; 20],
                }))
                .encode(),
            ]
        };
        for i in 0..20_000 {
            let (from, packet) = match i % 4 {
                0 => {
                    let len = rng.gen_range(0..64);
                    let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    (SocketAddr::from(([10, 3, 0, rng.gen()], rng.gen())), junk)
                }
                _ if !ours.is_empty() => {
                    let (to, tid) = ours[rng.gen_range(0..ours.len())].clone();
                    let s = samples(&tid);
                    let sample = &s[rng.gen_range(0..s.len())];
                    let packet = if rng.gen_bool(0.3) {
                        sample.clone()
                    } else {
                        crate::core::mutate::mutate(&mut rng, sample)
                    };
                    (to, packet)
                }
                _ => (addr("10.0.0.1:1"), samples(b"aa")[0].clone()),
            };
            p.dht.handle(from, &packet, p.now);
            ours.extend(
                std::iter::from_fn(|| p.dht.poll_transmit()).filter_map(|t| {
                    let m = krpc::decode(&t.bytes).ok()?;
                    matches!(m.body, Body::Query(_)).then_some((t.to, m.tid))
                }),
            );
            if ours.len() > 500 {
                ours.drain(..250);
            }
            while p.dht.poll_event().is_some() {}
            if i % 1000 == 0 {
                p.advance(Duration::from_secs(2));
                p.dht.check_invariants();
            }
        }
        p.dht.check_invariants();
    }
}
