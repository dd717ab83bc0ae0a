//! The routing table of the mainline DHT (BEP 5, Kademlia): k-buckets over the 160-bit id space.
//!
//! # Shape
//! Bucket `i` (for all but the last) holds the nodes whose ids share exactly `i` leading bits with
//! ours; the last bucket holds every node that shares at least as many. That is BEP 5's "split the
//! bucket whose range contains our id" written as prefix lengths: only the last bucket splits.
//!
//! # Node states (BEP 5)
//! - good: answered one of our queries within [`GOOD_FOR`], or answered once and queried us within it;
//! - bad: failed [`BAD_AFTER_FAILURES`] queries in a row;
//! - questionable: everything else, including nodes that queried us but never answered ("unconfirmed").
//!
//! A full bucket takes a newcomer only in place of a bad node; otherwise the newcomer waits in the
//! bucket's replacement cache and the least recently seen questionable node is pinged (by the
//! caller; [`Heard::ping`] names it). When a pinged node turns bad, the best replacement takes its
//! place. Nodes are keyed by id and by exact socket address: several nodes may share one IP.
//!
//! Pure: time is a parameter; the caller sends the pings.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;

/// Nodes per bucket (BEP 5).
pub const K: usize = 8;
/// Bits in an id, and so the most buckets a table can have.
pub const ID_BITS: usize = 160;
/// A node that answered within this long is good (BEP 5).
pub const GOOD_FOR: Duration = Duration::from_secs(15 * 60);
/// Failed queries in a row that make a node bad (BEP 5 suggests trying once more).
pub const BAD_AFTER_FAILURES: u8 = 2;
/// Newcomers kept per full bucket, waiting for a slot.
pub const REPLACEMENTS_PER_BUCKET: usize = K;

/// A node id or an info-hash: a point in the 160-bit XOR space.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct NodeId(pub [u8; 20]);

impl NodeId {
    /// XOR distance; compare the arrays to order by distance (big-endian).
    pub fn distance(&self, other: &NodeId) -> [u8; 20] {
        let mut d = [0u8; 20];
        for (i, b) in d.iter_mut().enumerate() {
            *b = self.0[i] ^ other.0[i];
        }
        d
    }

    pub fn random(rng: &mut impl Rng) -> NodeId {
        NodeId(rng.gen())
    }

    /// The id in a 20-byte slice, or `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<NodeId> {
        bytes.try_into().ok().map(NodeId)
    }

    /// Leading bits shared with `other` (160 when equal).
    pub fn common_prefix_len(&self, other: &NodeId) -> usize {
        let d = self.distance(other);
        match d.iter().position(|&b| b != 0) {
            Some(i) => i * 8 + d[i].leading_zeros() as usize,
            None => ID_BITS,
        }
    }

    fn bit(&self, i: usize) -> bool {
        self.0[i / 8] & (0x80 >> (i % 8)) != 0
    }

    fn set_bit(&mut self, i: usize, value: bool) {
        let mask = 0x80 >> (i % 8);
        if value {
            self.0[i / 8] |= mask;
        } else {
            self.0[i / 8] &= !mask;
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeStatus {
    Good,
    Questionable,
    Bad,
}

/// How we heard from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// It answered one of our queries.
    Responded,
    /// It sent us a query (it may not accept queries itself).
    Queried,
}

/// What [`RoutingTable::heard_from`] did with a contact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Added to a bucket with room (after splitting ours if needed).
    Added,
    /// Already in the table: times refreshed.
    Updated,
    /// Took the place of a bad node.
    Replaced,
    /// The bucket is full: kept in its replacement cache.
    Cached,
    /// Our own id, a non-IPv4 or port-0 address, or an id/address clash with a live node.
    Ignored,
}

/// The result of offering a contact, and a node the caller should ping (a questionable node in a
/// full bucket, or an unconfirmed newcomer), already marked as being pinged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    pub outcome: Outcome,
    pub ping: Option<(NodeId, SocketAddr)>,
}

/// One contact in a bucket or a replacement cache.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: NodeId,
    pub addr: SocketAddr,
    last_response: Option<Instant>,
    last_query: Option<Instant>,
    failures: u8,
    /// A ping to it is outstanding, so it is not pinged twice.
    pinging: bool,
}

impl Node {
    fn new(id: NodeId, addr: SocketAddr, contact: Contact, now: Instant) -> Node {
        let mut node = Node {
            id,
            addr,
            last_response: None,
            last_query: None,
            failures: 0,
            pinging: false,
        };
        node.touch(contact, now);
        node
    }

    fn touch(&mut self, contact: Contact, now: Instant) {
        match contact {
            Contact::Responded => {
                self.last_response = Some(now);
                self.failures = 0;
                self.pinging = false;
            }
            Contact::Queried => self.last_query = Some(now),
        }
    }

    pub fn status(&self, now: Instant) -> NodeStatus {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < GOOD_FOR);
        if self.failures >= BAD_AFTER_FAILURES {
            NodeStatus::Bad
        } else if recent(self.last_response) || (self.confirmed() && recent(self.last_query)) {
            NodeStatus::Good
        } else {
            NodeStatus::Questionable
        }
    }

    /// It has answered us at least once.
    pub fn confirmed(&self) -> bool {
        self.last_response.is_some()
    }

    fn last_seen(&self) -> Option<Instant> {
        self.last_response.max(self.last_query)
    }
}

struct Bucket {
    nodes: Vec<Node>,
    replacements: Vec<Node>,
    /// BEP 5's "last changed": a node added or replaced, or a node of it answered.
    last_changed: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            nodes: Vec::with_capacity(K),
            replacements: Vec::new(),
            last_changed: now,
        }
    }

    /// Keeps `node` as a replacement, evicting the least recently seen one when full.
    fn add_replacement(&mut self, node: Node) {
        if let Some(r) = self.replacements.iter_mut().find(|r| r.id == node.id) {
            if r.addr == node.addr {
                r.last_response = r.last_response.max(node.last_response);
                r.last_query = r.last_query.max(node.last_query);
            }
            return;
        }
        self.replacements.retain(|r| r.addr != node.addr);
        if self.replacements.len() == REPLACEMENTS_PER_BUCKET {
            let oldest = (0..self.replacements.len())
                .min_by_key(|&i| replacement_rank(&self.replacements[i]))
                .unwrap_or(0);
            self.replacements.swap_remove(oldest);
        }
        self.replacements.push(node);
    }

    /// Removes and returns the best replacement: one that answered us, most recently seen.
    fn take_best_replacement(&mut self) -> Option<Node> {
        let best = (0..self.replacements.len())
            .max_by_key(|&i| replacement_rank(&self.replacements[i]))?;
        Some(self.replacements.swap_remove(best))
    }
}

fn replacement_rank(n: &Node) -> (bool, Option<Instant>) {
    (n.confirmed(), n.last_seen())
}

pub struct RoutingTable {
    own: NodeId,
    buckets: Vec<Bucket>,
    refresh_after: Duration,
}

impl RoutingTable {
    pub fn new(own: NodeId, refresh_after: Duration, now: Instant) -> RoutingTable {
        RoutingTable {
            own,
            buckets: vec![Bucket::new(now)],
            refresh_after,
        }
    }

    pub fn own_id(&self) -> NodeId {
        self.own
    }

    fn bucket_index(&self, id: &NodeId) -> usize {
        self.own.common_prefix_len(id).min(self.buckets.len() - 1)
    }

    fn find_by_id(&self, id: &NodeId) -> Option<(usize, usize)> {
        let b = self.bucket_index(id);
        let i = self.buckets[b].nodes.iter().position(|n| n.id == *id)?;
        Some((b, i))
    }

    fn find_by_addr(&self, addr: &SocketAddr) -> Option<(usize, usize)> {
        self.buckets.iter().enumerate().find_map(|(b, bucket)| {
            let i = bucket.nodes.iter().position(|n| n.addr == *addr)?;
            Some((b, i))
        })
    }

    /// A node answered us or queried us: refresh it, add it, or keep it as a replacement.
    pub fn heard_from(
        &mut self,
        id: NodeId,
        addr: SocketAddr,
        contact: Contact,
        now: Instant,
    ) -> Heard {
        let ignored = Heard {
            outcome: Outcome::Ignored,
            ping: None,
        };
        if id == self.own || !addr.is_ipv4() || addr.port() == 0 {
            return ignored;
        }
        if let Some((b, i)) = self.find_by_id(&id) {
            let node = &self.buckets[b].nodes[i];
            if node.addr != addr {
                // The same id from another address: keep the one we know unless it went bad
                // (otherwise anyone could move a node of our table by claiming its id).
                if node.status(now) != NodeStatus::Bad || self.find_by_addr(&addr).is_some() {
                    return ignored;
                }
                self.buckets[b].nodes[i] = Node::new(id, addr, contact, now);
                for bucket in &mut self.buckets {
                    bucket.replacements.retain(|r| r.addr != addr);
                }
            } else {
                self.buckets[b].nodes[i].touch(contact, now);
            }
            if contact == Contact::Responded {
                self.buckets[b].last_changed = now;
            }
            return Heard {
                outcome: Outcome::Updated,
                ping: None,
            };
        }
        if let Some((b, i)) = self.find_by_addr(&addr) {
            // The address is known under another id: a restarted node, or someone lying.
            // An answering old node keeps its place.
            let old = &self.buckets[b].nodes[i];
            if old.confirmed() && old.status(now) != NodeStatus::Bad {
                return ignored;
            }
            self.buckets[b].nodes.remove(i);
        }
        let mut node = Node::new(id, addr, contact, now);
        // A replacement heard from again keeps what we knew of it.
        let b = self.bucket_index(&id);
        let cache = &mut self.buckets[b].replacements;
        if let Some(r) = cache.iter().position(|r| r.id == id) {
            let old = cache.swap_remove(r);
            if old.addr == addr {
                node.last_response = node.last_response.max(old.last_response);
                node.last_query = node.last_query.max(old.last_query);
            }
        }
        let heard = self.insert_new(node, now);
        if matches!(heard.outcome, Outcome::Added | Outcome::Replaced) {
            // One address, one node: a cached contact at this address must never be promoted.
            for bucket in &mut self.buckets {
                bucket.replacements.retain(|r| r.addr != addr);
            }
        }
        heard
    }

    fn insert_new(&mut self, mut node: Node, now: Instant) -> Heard {
        loop {
            let b = self.bucket_index(&node.id);
            let last = self.buckets.len() - 1;
            if self.buckets[b].nodes.len() >= K && b == last && self.buckets.len() < ID_BITS {
                self.split_last(now);
                continue;
            }
            let bucket = &mut self.buckets[b];
            // An unconfirmed newcomer is pinged at once so it can be confirmed (or dropped).
            let ping_new = |n: &mut Node| {
                if n.confirmed() {
                    None
                } else {
                    n.pinging = true;
                    Some((n.id, n.addr))
                }
            };
            if bucket.nodes.len() < K {
                let ping = ping_new(&mut node);
                bucket.nodes.push(node);
                bucket.last_changed = now;
                return Heard {
                    outcome: Outcome::Added,
                    ping,
                };
            }
            if let Some(bad) = (0..bucket.nodes.len())
                .filter(|&i| bucket.nodes[i].status(now) == NodeStatus::Bad)
                .max_by_key(|&i| bucket.nodes[i].failures)
            {
                let ping = ping_new(&mut node);
                bucket.nodes[bad] = node;
                bucket.last_changed = now;
                return Heard {
                    outcome: Outcome::Replaced,
                    ping,
                };
            }
            bucket.add_replacement(node);
            let ping = (0..bucket.nodes.len())
                .filter(|&i| {
                    let n = &bucket.nodes[i];
                    !n.pinging && n.status(now) == NodeStatus::Questionable
                })
                .min_by_key(|&i| bucket.nodes[i].last_seen())
                .map(|i| {
                    let n = &mut bucket.nodes[i];
                    n.pinging = true;
                    (n.id, n.addr)
                });
            return Heard {
                outcome: Outcome::Cached,
                ping,
            };
        }
    }

    /// Splits the last bucket (the one holding our id) in two.
    fn split_last(&mut self, now: Instant) {
        let last = self.buckets.len() - 1;
        let own = self.own;
        let mut next = Bucket::new(now);
        next.last_changed = self.buckets[last].last_changed;
        let old = &mut self.buckets[last];
        let moves = |n: &Node| own.common_prefix_len(&n.id) > last;
        next.nodes = old.nodes.iter().filter(|n| moves(n)).cloned().collect();
        old.nodes.retain(|n| !moves(n));
        next.replacements = old
            .replacements
            .iter()
            .filter(|n| moves(n))
            .cloned()
            .collect();
        old.replacements.retain(|n| !moves(n));
        self.buckets.push(next);
        // A half that lost nodes gets them back from its replacement cache.
        for b in [last, last + 1] {
            let bucket = &mut self.buckets[b];
            while bucket.nodes.len() < K {
                match bucket.take_best_replacement() {
                    Some(r) => bucket.nodes.push(r),
                    None => break,
                }
            }
        }
    }

    /// A query to `addr` went unanswered. Returns a node to ping if a replacement that never
    /// answered us took the failed node's place.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) -> Option<(NodeId, SocketAddr)> {
        let Some((b, i)) = self.find_by_addr(&addr) else {
            for bucket in &mut self.buckets {
                bucket.replacements.retain(|r| r.addr != addr);
            }
            return None;
        };
        let bucket = &mut self.buckets[b];
        let node = &mut bucket.nodes[i];
        node.failures = node.failures.saturating_add(1);
        node.pinging = false;
        if node.status(now) != NodeStatus::Bad {
            return None;
        }
        let mut replacement = bucket.take_best_replacement()?;
        let ping = if replacement.confirmed() {
            None
        } else {
            replacement.pinging = true;
            Some((replacement.id, replacement.addr))
        };
        bucket.nodes[i] = replacement;
        bucket.last_changed = now;
        ping
    }

    /// The ping a `Heard::ping` or `questionable_to_ping` asked for was not sent: the node may be
    /// asked about again.
    pub fn ping_not_sent(&mut self, addr: SocketAddr) {
        if let Some((b, i)) = self.find_by_addr(&addr) {
            self.buckets[b].nodes[i].pinging = false;
        }
    }

    /// The `n` nodes closest to `target` that have answered us and are not bad, closest first.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<(NodeId, SocketAddr)> {
        let mut found: Vec<&Node> = self
            .buckets
            .iter()
            .flat_map(|b| &b.nodes)
            .filter(|node| node.confirmed() && node.failures < BAD_AFTER_FAILURES)
            .collect();
        found.sort_unstable_by_key(|node| target.distance(&node.id));
        found
            .into_iter()
            .take(n)
            .map(|node| (node.id, node.addr))
            .collect()
    }

    /// Questionable nodes not seen for the longest, at most `max`, marked as being pinged: the
    /// caller pings them (BEP 5: keep the table full of live nodes).
    pub fn questionable_to_ping(&mut self, now: Instant, max: usize) -> Vec<(NodeId, SocketAddr)> {
        let mut found: Vec<(Option<Instant>, usize, usize)> = Vec::new();
        for (b, bucket) in self.buckets.iter().enumerate() {
            for (i, n) in bucket.nodes.iter().enumerate() {
                if !n.pinging && n.status(now) == NodeStatus::Questionable {
                    found.push((n.last_seen(), b, i));
                }
            }
        }
        found.sort_unstable();
        found
            .into_iter()
            .take(max)
            .map(|(_, b, i)| {
                let n = &mut self.buckets[b].nodes[i];
                n.pinging = true;
                (n.id, n.addr)
            })
            .collect()
    }

    /// For each bucket unchanged for `refresh_after`, a random id in its range to look up; those
    /// buckets count as refreshed from now.
    pub fn due_for_refresh(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<NodeId> {
        let mut due = Vec::new();
        for b in 0..self.buckets.len() {
            if now.saturating_duration_since(self.buckets[b].last_changed) >= self.refresh_after {
                self.buckets[b].last_changed = now;
                due.push(self.random_id_in_bucket(b, rng));
            }
        }
        due
    }

    /// A random id that falls in bucket `b`: our first `b` bits, then (but for the last
    /// bucket) the opposite of our bit `b`, then random bits.
    pub fn random_id_in_bucket(&self, b: usize, rng: &mut impl Rng) -> NodeId {
        let mut id = NodeId::random(rng);
        for i in 0..b.min(ID_BITS) {
            id.set_bit(i, self.own.bit(i));
        }
        if b < self.buckets.len() - 1 {
            id.set_bit(b, !self.own.bit(b));
        }
        id
    }

    /// Nodes in buckets, bad ones included.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.nodes.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nodes in buckets that are not bad.
    pub fn live_len(&self) -> usize {
        self.nodes()
            .filter(|n| n.failures < BAD_AFTER_FAILURES)
            .count()
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Every node in a bucket.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.buckets.iter().flat_map(|b| &b.nodes)
    }

    pub fn get(&self, id: &NodeId) -> Option<&Node> {
        let (b, i) = self.find_by_id(id)?;
        Some(&self.buckets[b].nodes[i])
    }

    pub fn in_replacements(&self, id: &NodeId) -> bool {
        self.buckets[self.bucket_index(id)]
            .replacements
            .iter()
            .any(|r| r.id == *id)
    }

    #[cfg(debug_assertions)]
    pub fn check_invariants(&self) {
        use std::collections::HashSet;
        assert!(!self.buckets.is_empty() && self.buckets.len() <= ID_BITS);
        let last = self.buckets.len() - 1;
        let (mut ids, mut addrs) = (HashSet::new(), HashSet::new());
        for (b, bucket) in self.buckets.iter().enumerate() {
            assert!(
                bucket.nodes.len() <= K,
                "bucket {b} holds {}",
                bucket.nodes.len()
            );
            assert!(bucket.replacements.len() <= REPLACEMENTS_PER_BUCKET);
            for n in bucket.nodes.iter().chain(&bucket.replacements) {
                let cpl = self.own.common_prefix_len(&n.id);
                assert!(n.id != self.own, "our own id is in the table");
                assert!(
                    if b == last { cpl >= b } else { cpl == b },
                    "node in the wrong bucket"
                );
                assert!(n.addr.is_ipv4() && n.addr.port() != 0);
            }
            for n in &bucket.nodes {
                assert!(ids.insert(n.id), "id {} twice", n.id);
                assert!(addrs.insert(n.addr), "address {} twice", n.addr);
            }
            for r in &bucket.replacements {
                assert!(
                    !bucket.nodes.iter().any(|n| n.id == r.id),
                    "a replacement is also in the bucket"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn id_with_prefix(own: &NodeId, cpl: usize, rng: &mut StdRng) -> NodeId {
        let mut id = NodeId::random(rng);
        for i in 0..cpl {
            id.set_bit(i, own.bit(i));
        }
        id.set_bit(cpl, !own.bit(cpl));
        id
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn heard(t: &mut RoutingTable, id: NodeId, port: u16, contact: Contact, now: Instant) -> Heard {
        let h = t.heard_from(id, addr(port), contact, now);
        t.check_invariants();
        h
    }

    #[test]
    fn distance_and_prefix() {
        let a = NodeId([0u8; 20]);
        let mut b = NodeId([0u8; 20]);
        b.0[19] = 1;
        assert_eq!(a.common_prefix_len(&a), 160);
        assert_eq!(a.common_prefix_len(&b), 159);
        b.0[0] = 0x10;
        assert_eq!(a.common_prefix_len(&b), 3);
        assert_eq!(a.distance(&b)[0], 0x10);
        assert_eq!(NodeId::from_slice(&[1; 19]), None);
        assert_eq!(NodeId::from_slice(&[1; 20]), Some(NodeId([1; 20])));
    }

    #[test]
    fn splits_only_our_bucket_and_keeps_k_per_bucket() {
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        let own = NodeId::random(&mut rng);
        let mut t = RoutingTable::new(own, GOOD_FOR, now);
        // 20 nodes in the far half: one bucket of K, the rest cached.
        for p in 0..20 {
            let id = id_with_prefix(&own, 0, &mut rng);
            heard(&mut t, id, 1000 + p, Contact::Responded, now);
        }
        assert_eq!(t.bucket_count(), 2);
        assert_eq!(t.len(), K);
        // Nodes ever closer to us: our bucket keeps splitting.
        for cpl in 1..30 {
            for p in 0..3 {
                let id = id_with_prefix(&own, cpl, &mut rng);
                heard(
                    &mut t,
                    id,
                    2000 + (cpl * 10 + p) as u16,
                    Contact::Responded,
                    now,
                );
            }
        }
        assert!(t.bucket_count() > 20);
        assert_eq!(t.len(), K + 29 * 3);
        // Our own id and non-IPv4 addresses are refused.
        assert_eq!(
            t.heard_from(own, addr(1), Contact::Responded, now).outcome,
            Outcome::Ignored
        );
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(
            t.heard_from(NodeId::random(&mut rng), v6, Contact::Responded, now)
                .outcome,
            Outcome::Ignored
        );
        t.check_invariants();
    }

    #[test]
    fn closest_is_sorted_by_xor_distance_and_skips_unconfirmed() {
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        let own = NodeId::random(&mut rng);
        let mut t = RoutingTable::new(own, GOOD_FOR, now);
        let mut ids = Vec::new();
        for p in 0..200u16 {
            let id = NodeId::random(&mut rng);
            if heard(&mut t, id, 3000 + p, Contact::Responded, now).outcome == Outcome::Added {
                ids.push(id);
            }
        }
        let queried_only = id_with_prefix(&own, 100, &mut rng);
        let h = heard(&mut t, queried_only, 9, Contact::Queried, now);
        assert_eq!(h.outcome, Outcome::Added);
        assert_eq!(
            h.ping,
            Some((queried_only, addr(9))),
            "an unconfirmed node is pinged"
        );
        let target = NodeId::random(&mut rng);
        let got = t.closest(&target, K);
        ids.sort_by_key(|id| target.distance(id));
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids[..K]);
        assert!(!t
            .closest(&queried_only, 200)
            .iter()
            .any(|(id, _)| *id == queried_only));
    }

    #[test]
    fn full_bucket_pings_questionable_and_bad_nodes_are_replaced() {
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let own = NodeId([0u8; 20]);
        let mut t = RoutingTable::new(own, GOOD_FOR, t0);
        // Fill bucket 0 (and force the split) with good nodes.
        let far: Vec<NodeId> = (0..K).map(|_| id_with_prefix(&own, 0, &mut rng)).collect();
        for (p, id) in far.iter().enumerate() {
            heard(&mut t, *id, 100 + p as u16, Contact::Responded, t0);
        }
        for p in 0..K as u16 {
            heard(
                &mut t,
                id_with_prefix(&own, 1, &mut rng),
                200 + p,
                Contact::Responded,
                t0,
            );
        }
        assert_eq!(t.bucket_count(), 2);
        // A full bucket of good nodes: the newcomer is cached, nobody is pinged.
        let new1 = id_with_prefix(&own, 0, &mut rng);
        let h = heard(&mut t, new1, 300, Contact::Responded, t0);
        assert_eq!(
            h,
            Heard {
                outcome: Outcome::Cached,
                ping: None
            }
        );
        assert!(t.in_replacements(&new1));
        // 16 minutes later everyone is questionable: the least recently seen is pinged, once.
        let t1 = t0 + GOOD_FOR + Duration::from_secs(60);
        heard(&mut t, far[1], 101, Contact::Responded, t1);
        let new2 = id_with_prefix(&own, 0, &mut rng);
        let h = heard(&mut t, new2, 301, Contact::Responded, t1);
        assert_eq!(h.outcome, Outcome::Cached);
        let (pinged, pinged_addr) = h.ping.unwrap();
        assert_ne!(pinged, far[1], "a node that just answered is good");
        let h2 = heard(
            &mut t,
            NodeId::random(&mut rng),
            302,
            Contact::Responded,
            t1,
        );
        assert_ne!(h2.ping.map(|p| p.0), Some(pinged), "not pinged twice");
        // It fails once: still there. Twice: bad, and the best replacement takes its place.
        assert_eq!(t.failed(pinged_addr, t1), None);
        t.check_invariants();
        assert!(t.get(&pinged).is_some());
        assert_eq!(t.failed(pinged_addr, t1), None);
        t.check_invariants();
        assert!(t.get(&pinged).is_none());
        assert!(t.get(&new2).is_some() || t.get(&new1).is_some());
        assert_eq!(t.len(), 2 * K);
    }

    #[test]
    fn bad_node_without_replacement_stays_until_a_newcomer_takes_its_slot() {
        let mut rng = StdRng::seed_from_u64(4);
        let t0 = Instant::now();
        let own = NodeId([0u8; 20]);
        let mut t = RoutingTable::new(own, GOOD_FOR, t0);
        let far: Vec<NodeId> = (0..K).map(|_| id_with_prefix(&own, 0, &mut rng)).collect();
        for (p, id) in far.iter().enumerate() {
            heard(&mut t, *id, 100 + p as u16, Contact::Responded, t0);
        }
        heard(
            &mut t,
            id_with_prefix(&own, 1, &mut rng),
            99,
            Contact::Responded,
            t0,
        );
        t.failed(addr(100), t0);
        t.failed(addr(100), t0);
        t.check_invariants();
        assert_eq!(t.get(&far[0]).unwrap().status(t0), NodeStatus::Bad);
        assert_eq!(t.live_len(), K);
        assert!(!t.closest(&far[0], 100).iter().any(|(id, _)| *id == far[0]));
        let new = id_with_prefix(&own, 0, &mut rng);
        assert_eq!(
            heard(&mut t, new, 500, Contact::Responded, t0).outcome,
            Outcome::Replaced
        );
        assert!(t.get(&far[0]).is_none());
    }

    #[test]
    fn many_nodes_on_one_ip_and_address_or_id_clashes() {
        let mut rng = StdRng::seed_from_u64(5);
        let now = Instant::now();
        let own = NodeId::random(&mut rng);
        let mut t = RoutingTable::new(own, GOOD_FOR, now);
        for p in 0..100u16 {
            heard(
                &mut t,
                NodeId::random(&mut rng),
                4000 + p,
                Contact::Responded,
                now,
            );
        }
        assert!(
            t.len() >= 20,
            "only {} of 100 nodes on one IP kept",
            t.len()
        );
        let (id, a) = t.closest(&own, 1)[0];
        // Another id claiming a live node's address, and the same id from another address: ignored.
        let liar = id_with_prefix(&own, own.common_prefix_len(&id), &mut rng);
        assert_eq!(
            t.heard_from(liar, a, Contact::Responded, now).outcome,
            Outcome::Ignored
        );
        assert_eq!(
            t.heard_from(id, addr(7), Contact::Responded, now).outcome,
            Outcome::Ignored
        );
        assert_eq!(
            t.heard_from(id, a, Contact::Queried, now).outcome,
            Outcome::Updated
        );
        t.check_invariants();
    }

    #[test]
    fn untouched_buckets_are_due_for_refresh_with_an_id_in_range() {
        let mut rng = StdRng::seed_from_u64(6);
        let t0 = Instant::now();
        let own = NodeId::random(&mut rng);
        let mut t = RoutingTable::new(own, Duration::from_secs(900), t0);
        for p in 0..60u16 {
            heard(
                &mut t,
                NodeId::random(&mut rng),
                5000 + p,
                Contact::Responded,
                t0,
            );
        }
        let buckets = t.bucket_count();
        assert!(t
            .due_for_refresh(t0 + Duration::from_secs(899), &mut rng)
            .is_empty());
        let t1 = t0 + Duration::from_secs(900);
        // Touch bucket 0 by an answer from one of its nodes.
        let in_zero = t
            .nodes()
            .find(|n| own.common_prefix_len(&n.id) == 0)
            .map(|n| (n.id, n.addr));
        if let Some((id, a)) = in_zero {
            t.heard_from(id, a, Contact::Responded, t1);
        }
        let due = t.due_for_refresh(t1, &mut rng);
        assert_eq!(due.len(), buckets - usize::from(in_zero.is_some()));
        for id in &due {
            let cpl = own.common_prefix_len(id);
            assert!(cpl > 0 || in_zero.is_none());
        }
        // Each bucket's random id falls in that bucket.
        for b in 0..buckets {
            let id = t.random_id_in_bucket(b, &mut rng);
            assert_eq!(t.bucket_index(&id), b);
        }
        assert!(
            t.due_for_refresh(t1, &mut rng).is_empty(),
            "refreshed buckets are not due again"
        );
    }

    #[test]
    fn random_contacts_keep_invariants() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut now = Instant::now();
        let own = NodeId::random(&mut rng);
        let mut t = RoutingTable::new(own, GOOD_FOR, now);
        let pool: Vec<NodeId> = (0..300).map(|_| NodeId::random(&mut rng)).collect();
        for step in 0..5000 {
            let i = rng.gen_range(0..pool.len());
            let port = 1 + rng.gen_range(0..320) as u16;
            match rng.gen_range(0..4) {
                0 => {
                    t.heard_from(pool[i], addr(port), Contact::Queried, now);
                }
                1 => {
                    t.failed(addr(port), now);
                }
                _ => {
                    t.heard_from(pool[i], addr(i as u16 + 1), Contact::Responded, now);
                }
            }
            if step % 100 == 0 {
                now += Duration::from_secs(60);
                t.questionable_to_ping(now, 3);
            }
            t.check_invariants();
        }
    }
}
