//! The choker: which peers we upload to (tit-for-tat). Pure: the engine passes samples of its
//! peers and `now`; randomness comes from the seed given at construction.
//!
//! Rules:
//! - Every `round` (10 s) the `regular_slots` (4) interested peers with the best rate are
//!   unchoked: the rate they send to us while we download, the rate we send them while we seed.
//!   Ties go to peers already holding a regular slot, then to a seeded random order.
//! - Every `optimistic_round` (30 s) the optimistic unchoke moves to another interested peer that
//!   has no regular slot, peers connected within `new_peer_age` three times as likely. It is also
//!   replaced at once (at the next round) if it leaves, loses interest or earns a regular slot.
//! - While downloading, a peer that sent us no block for `snub_after` (60 s) of being unchoked by
//!   us (and connected that long) is snubbed: it gets no regular slot until it sends a block. It
//!   can still be the optimistic unchoke, so a free slot is not wasted on nobody. Seeding ignores
//!   snubs.
//! - Between rounds, a peer that becomes interested takes a free regular slot at once, and a
//!   slot left by a peer that lost interest or left goes at the next tick (every second) to the
//!   interested choked peer with the best rate: in a swarm where everyone wants something, no
//!   upload slot sits empty until the next round.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub use crate::core::picker::PeerKey;

/// Weight of a newly connected peer in the optimistic draw (others weigh 1).
const NEW_PEER_WEIGHT: u32 = 3;

#[derive(Clone, Debug)]
pub struct ChokerConfig {
    /// Peers unchoked for their rate (default 4).
    pub regular_slots: usize,
    /// How often the regular unchokes are recomputed (default 10 s).
    pub round: Duration,
    /// How often the optimistic unchoke moves (default 30 s).
    pub optimistic_round: Duration,
    /// No block for this long while unchoked (and connected this long) means snubbed (default 60 s).
    pub snub_after: Duration,
    /// Peers connected for less than this are "new": three times as likely to be the optimistic
    /// unchoke (default 60 s).
    pub new_peer_age: Duration,
}

impl Default for ChokerConfig {
    fn default() -> Self {
        ChokerConfig {
            regular_slots: 4,
            round: Duration::from_secs(10),
            optimistic_round: Duration::from_secs(30),
            snub_after: Duration::from_secs(60),
            new_peer_age: Duration::from_secs(60),
        }
    }
}

/// What the engine knows about one connected peer.
#[derive(Clone, Debug)]
pub struct PeerSample {
    pub peer: PeerKey,
    /// The peer is interested in us.
    pub interested: bool,
    /// Bytes/s it sends us.
    pub download_rate: u64,
    /// Bytes/s we send it.
    pub upload_rate: u64,
    pub connected_at: Instant,
    /// When it last sent us a block.
    pub last_block_received: Option<Instant>,
    /// We currently unchoke it.
    pub unchoked: bool,
}

/// The full set of peers to have unchoked now; everyone else is choked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChokeDecision {
    /// Sorted; includes the optimistic unchoke.
    pub unchoke: Vec<PeerKey>,
    pub optimistic: Option<PeerKey>,
}

#[derive(Debug)]
pub struct Choker {
    cfg: ChokerConfig,
    rng: StdRng,
    /// When the next regular round is due; `None` before the first.
    next_round: Option<Instant>,
    /// When the optimistic unchoke moves next; `None` when none was chosen yet.
    next_optimistic: Option<Instant>,
    /// Peers holding a regular slot: from the last round, plus those `on_interested` let in.
    regular: Vec<PeerKey>,
    optimistic: Option<PeerKey>,
    /// Snubbed peers and when they were found snubbed.
    snubbed: HashMap<PeerKey, Instant>,
    /// Since when each peer the samples say we unchoke has been unchoked (first tick seen so).
    unchoked_since: HashMap<PeerKey, Instant>,
    /// Whether the last tick was while seeding (snubs only count while downloading).
    seeding: bool,
}

impl Choker {
    pub fn new(cfg: ChokerConfig, seed: u64) -> Self {
        Choker {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            next_round: None,
            next_optimistic: None,
            regular: Vec::new(),
            optimistic: None,
            snubbed: HashMap::new(),
            unchoked_since: HashMap::new(),
            seeding: false,
        }
    }

    /// Called often (every second); returns Some at each regular round (every cfg.round) with the
    /// new unchoke set; the optimistic unchoke moves every cfg.optimistic_round. `seeding`: rank by
    /// upload_rate (our upload to them) instead of download_rate.
    pub fn tick(
        &mut self,
        now: Instant,
        peers: &[PeerSample],
        seeding: bool,
    ) -> Option<ChokeDecision> {
        self.seeding = seeding;
        self.update_snubs(now, peers);
        if self.next_round.is_some_and(|due| now < due) {
            if !self.refill(peers, seeding) {
                return None;
            }
            let mut unchoke = self.regular.clone();
            unchoke.extend(self.optimistic);
            unchoke.sort_unstable();
            unchoke.dedup();
            return Some(ChokeDecision {
                unchoke,
                optimistic: self.optimistic,
            });
        }
        self.next_round = Some(now.checked_add(self.cfg.round).unwrap_or(now));
        self.choose_regular(peers, seeding);
        self.choose_optimistic(now, peers);
        let mut unchoke = self.regular.clone();
        unchoke.extend(self.optimistic);
        unchoke.sort_unstable();
        Some(ChokeDecision {
            unchoke,
            optimistic: self.optimistic,
        })
    }

    /// A peer became interested between rounds: true if it should be unchoked at once (a regular
    /// slot is free, or it already holds one or the optimistic slot). No one waits 10 s while a
    /// slot is empty.
    pub fn on_interested(&mut self, _now: Instant, peer: PeerKey, peers: &[PeerSample]) -> bool {
        if self.regular.contains(&peer) || self.optimistic == Some(peer) {
            return true;
        }
        if self.is_snubbed(peer) {
            return false;
        }
        let used = self
            .regular
            .iter()
            .filter(|&&k| peers.iter().any(|p| p.peer == k && p.interested))
            .count();
        if used < self.cfg.regular_slots {
            self.regular.push(peer);
            true
        } else {
            false
        }
    }

    /// A peer connected: unchoked at once, before it says it is interested, while the regular
    /// slots (counting every peer in them, interested or not) have room. Saves it a round trip
    /// (interested, then unchoke) before its first request, as libtorrent does; a peer that
    /// never gets interested takes no slot from one that is.
    pub fn on_connected(&mut self, peer: PeerKey) -> bool {
        if self.regular.len() < self.cfg.regular_slots && !self.regular.contains(&peer) {
            self.regular.push(peer);
            true
        } else {
            false
        }
    }

    /// Forgets a disconnected peer; its slot is free at once.
    pub fn peer_gone(&mut self, peer: PeerKey) {
        self.regular.retain(|&k| k != peer);
        if self.optimistic == Some(peer) {
            self.optimistic = None;
        }
        self.snubbed.remove(&peer);
        self.unchoked_since.remove(&peer);
    }

    /// Whether `peer` is currently kept out of regular slots for snubbing us.
    pub fn is_snubbed(&self, peer: PeerKey) -> bool {
        !self.seeding && self.snubbed.contains_key(&peer)
    }

    fn update_snubs(&mut self, now: Instant, peers: &[PeerSample]) {
        // A snub ends when the peer sends a block (or leaves).
        self.snubbed.retain(|k, since| {
            peers
                .iter()
                .find(|p| p.peer == *k)
                .is_some_and(|p| p.last_block_received.is_none_or(|t| t <= *since))
        });
        self.unchoked_since
            .retain(|k, _| peers.iter().any(|p| p.peer == *k && p.unchoked));
        for p in peers.iter().filter(|p| p.unchoked) {
            self.unchoked_since.entry(p.peer).or_insert(now);
        }
        if self.seeding {
            return;
        }
        for p in peers {
            let Some(&unchoked_since) = self.unchoked_since.get(&p.peer) else {
                continue;
            };
            // Silent since the latest of: connecting, its last block, our unchoking it.
            let silent_since = p
                .last_block_received
                .unwrap_or(p.connected_at)
                .max(p.connected_at)
                .max(unchoked_since);
            if now.saturating_duration_since(silent_since) >= self.cfg.snub_after {
                self.snubbed.entry(p.peer).or_insert(now);
            }
        }
    }

    /// Gives regular slots not held by an interested peer to the interested peers that are
    /// choked (and not snubbed), best rate first. True if any was given.
    fn refill(&mut self, peers: &[PeerSample], seeding: bool) -> bool {
        let interested = |k: &PeerKey| peers.iter().any(|p| p.peer == *k && p.interested);
        let held = self.regular.iter().filter(|k| interested(k)).count();
        let free = self.cfg.regular_slots.saturating_sub(held);
        if free == 0 {
            return false;
        }
        let mut candidates: Vec<&PeerSample> = peers
            .iter()
            .filter(|p| {
                p.interested
                    && !self.regular.contains(&p.peer)
                    && self.optimistic != Some(p.peer)
                    && !self.is_snubbed(p.peer)
            })
            .collect();
        if candidates.is_empty() {
            return false;
        }
        candidates.shuffle(&mut self.rng);
        candidates.sort_by_key(|p| {
            std::cmp::Reverse(if seeding {
                p.upload_rate
            } else {
                p.download_rate
            })
        });
        // The slots of peers that lost interest go to the newcomers.
        self.regular.retain(|k| interested(k));
        self.regular
            .extend(candidates.iter().take(free).map(|p| p.peer));
        true
    }

    fn choose_regular(&mut self, peers: &[PeerSample], seeding: bool) {
        let mut candidates: Vec<&PeerSample> = peers
            .iter()
            .filter(|p| p.interested && !self.is_snubbed(p.peer))
            .collect();
        // Random order first so that the stable sort breaks remaining ties at random.
        candidates.shuffle(&mut self.rng);
        let rate = |p: &PeerSample| {
            if seeding {
                p.upload_rate
            } else {
                p.download_rate
            }
        };
        let held = &self.regular;
        candidates.sort_by_key(|p| (std::cmp::Reverse(rate(p)), !held.contains(&p.peer)));
        self.regular = candidates
            .iter()
            .take(self.cfg.regular_slots)
            .map(|p| p.peer)
            .collect();
    }

    fn choose_optimistic(&mut self, now: Instant, peers: &[PeerSample]) {
        let eligible = |k: PeerKey, regular: &[PeerKey]| {
            !regular.contains(&k) && peers.iter().any(|p| p.peer == k && p.interested)
        };
        let current = self.optimistic.filter(|&k| eligible(k, &self.regular));
        let due = self.next_optimistic.is_none_or(|t| now >= t);
        if current.is_some() && !due {
            return;
        }
        let mut candidates: Vec<(PeerKey, u32)> = peers
            .iter()
            .filter(|p| eligible(p.peer, &self.regular))
            .map(|p| {
                let new = now.saturating_duration_since(p.connected_at) < self.cfg.new_peer_age;
                (p.peer, if new { NEW_PEER_WEIGHT } else { 1 })
            })
            .collect();
        // Move to another peer when there is one.
        if candidates.len() > 1 {
            candidates.retain(|&(k, _)| Some(k) != current);
        }
        self.optimistic = self.weighted_choice(&candidates);
        self.next_optimistic = self
            .optimistic
            .map(|_| now.checked_add(self.cfg.optimistic_round).unwrap_or(now));
    }

    fn weighted_choice(&mut self, candidates: &[(PeerKey, u32)]) -> Option<PeerKey> {
        let total: u32 = candidates.iter().map(|&(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.rng.gen_range(0..total);
        for &(k, w) in candidates {
            if ticket < w {
                return Some(k);
            }
            ticket -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated swarm seen from our side, ticked once per simulated second.
    struct Sim {
        choker: Choker,
        start: Instant,
        peers: Vec<PeerSample>,
        /// Never sends us a block, whatever rate it reports.
        silent: Vec<bool>,
        /// Reconnects all the time, so it always counts as newly connected.
        always_new: Vec<bool>,
        seeding: bool,
    }

    /// Compact fixture: one char per peer (its key is its index): `i` interested, `.` not
    /// interested, `n` interested and connected at second 0, `N` interested and always newly
    /// connected, `z` interested but never sends us a block. Other peers connected 10 minutes before
    /// second 0. `rates[i]` is both its download and upload rate; a peer with rate 0 sends nothing.
    fn swarm(spec: &str, rates: &[u64]) -> Sim {
        swarm_seeded(spec, rates, 1)
    }

    fn swarm_seeded(spec: &str, rates: &[u64], seed: u64) -> Sim {
        assert_eq!(spec.len(), rates.len());
        let base = Instant::now();
        let start = base + Duration::from_secs(600);
        let peers = spec
            .chars()
            .zip(rates)
            .enumerate()
            .map(|(i, (c, &rate))| PeerSample {
                peer: i as PeerKey,
                interested: c != '.',
                download_rate: rate,
                upload_rate: rate,
                connected_at: if matches!(c, 'n' | 'N') { start } else { base },
                last_block_received: None,
                unchoked: false,
            })
            .collect();
        Sim {
            choker: Choker::new(ChokerConfig::default(), seed),
            start,
            peers,
            silent: spec.chars().map(|c| c == 'z').collect(),
            always_new: spec.chars().map(|c| c == 'N').collect(),
            seeding: false,
        }
    }

    impl Sim {
        fn at(&self, second: u64) -> Instant {
            self.start + Duration::from_secs(second)
        }

        /// Ticks every second of `seconds`; applies and returns each decision with its second.
        fn run(&mut self, seconds: std::ops::Range<u64>) -> Vec<(u64, ChokeDecision)> {
            let mut decisions = Vec::new();
            for s in seconds {
                let now = self.at(s);
                for (i, p) in self.peers.iter_mut().enumerate() {
                    if p.download_rate > 0 && !self.silent[i] {
                        p.last_block_received = Some(now);
                    }
                    if self.always_new[i] {
                        p.connected_at = now;
                    }
                }
                if let Some(d) = self.choker.tick(now, &self.peers, self.seeding) {
                    for p in &mut self.peers {
                        p.unchoked = d.unchoke.contains(&p.peer);
                    }
                    decisions.push((s, d));
                }
            }
            decisions
        }
    }

    /// The regular unchokes of a decision (the optimistic one left out).
    fn regular(d: &ChokeDecision) -> Vec<PeerKey> {
        d.unchoke
            .iter()
            .copied()
            .filter(|&k| Some(k) != d.optimistic)
            .collect()
    }

    #[test]
    fn every_round_the_four_fastest_interested_peers_are_unchoked() {
        let mut sim = swarm("iiiiii.", &[10, 60, 50, 40, 30, 20, 99]);
        let decisions = sim.run(0..60);
        let seconds: Vec<u64> = decisions.iter().map(|(s, _)| *s).collect();
        assert_eq!(seconds, vec![0, 10, 20, 30, 40, 50]);
        for (s, d) in &decisions {
            assert_eq!(regular(d), vec![1, 2, 3, 4], "second {s}");
            assert!(
                matches!(d.optimistic, Some(0) | Some(5)),
                "second {s}: {d:?}"
            );
            assert!(!d.unchoke.contains(&6), "not interested");
        }
    }

    #[test]
    fn a_slot_left_by_a_peer_that_lost_interest_goes_to_a_waiting_peer_within_a_second() {
        let mut sim = swarm("iiiiiii", &[60, 50, 40, 30, 20, 10, 5]);
        let first = sim.run(0..1);
        assert_eq!(regular(&first[0].1), vec![0, 1, 2, 3]);
        let optimistic = first[0].1.optimistic.expect("an optimistic unchoke");
        sim.peers[1].interested = false;
        let d = sim.run(1..2);
        assert_eq!(d.len(), 1, "a decision at second 1, not at the round at 10");
        let best_waiting = [4, 5, 6].into_iter().find(|&k| k != optimistic).unwrap();
        let mut want = vec![0, 2, 3, best_waiting];
        want.sort_unstable();
        assert_eq!(regular(&d[0].1), want);
        assert!(!d[0].1.unchoke.contains(&1));
        // Full again: nothing more until the round.
        assert!(sim.run(2..10).is_empty());
    }

    #[test]
    fn rates_change_the_next_round() {
        let mut sim = swarm("iiiii", &[50, 40, 30, 20, 10]);
        assert_eq!(regular(&sim.run(0..10)[0].1), vec![0, 1, 2, 3]);
        sim.peers[4].download_rate = 100;
        sim.peers[0].download_rate = 1;
        let d = sim.run(10..11);
        assert_eq!(regular(&d[0].1), vec![1, 2, 3, 4]);
    }

    #[test]
    fn seeding_ranks_by_our_upload_rate() {
        let mut sim = swarm("iiiiii", &[0; 6]);
        for (p, up) in sim.peers.iter_mut().zip([5, 1, 9, 8, 2, 7]) {
            p.upload_rate = up;
        }
        sim.seeding = true;
        for (_, d) in sim.run(0..40) {
            assert_eq!(regular(&d), vec![0, 2, 3, 5]);
        }
    }

    #[test]
    fn equal_rates_keep_the_current_unchokes() {
        let mut sim = swarm("iiiiiiii", &[1; 8]);
        let decisions = sim.run(0..120);
        let first = regular(&decisions[0].1);
        assert_eq!(first.len(), 4);
        assert!(decisions.iter().all(|(_, d)| regular(d) == first));
        // The tie-break is random per seed.
        let firsts: std::collections::HashSet<Vec<PeerKey>> = (0..6)
            .map(|seed| regular(&swarm_seeded("iiiiiiii", &[1; 8], seed).run(0..1)[0].1))
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn optimistic_unchoke_moves_every_30_s_to_another_choked_peer() {
        let mut sim = swarm("iiiiiii.", &[90, 80, 70, 60, 1, 1, 1, 1]);
        let decisions = sim.run(0..300);
        let mut last = None;
        for (s, d) in &decisions {
            let opt = d.optimistic.expect("a choked interested peer exists");
            assert!([4, 5, 6].contains(&opt), "second {s}: {d:?}");
            assert_eq!(regular(d), vec![0, 1, 2, 3]);
            if s % 30 == 0 {
                assert_ne!(Some(opt), last, "second {s}: must move");
            } else {
                assert_eq!(Some(opt), last, "second {s}: must stay");
            }
            last = Some(opt);
        }
    }

    #[test]
    fn optimistic_unchoke_is_replaced_when_it_earns_a_regular_slot() {
        let mut sim = swarm("iiiiii", &[90, 80, 70, 60, 1, 1]);
        let opt = sim.run(0..1)[0].1.optimistic.unwrap();
        sim.peers[opt as usize].download_rate = 1000;
        let d = &sim.run(1..11)[0].1;
        assert!(regular(d).contains(&opt));
        assert!(d.optimistic.is_some() && d.optimistic != Some(opt));
    }

    /// Share of optimistic rounds won by peer 4 over 3000 rounds.
    fn optimistic_share(spec: &str) -> f64 {
        let mut sim = swarm(spec, &[90, 80, 70, 60, 1, 1, 1, 1]);
        let rounds = 3000;
        let decisions = sim.run(0..rounds * 30);
        let wins = decisions
            .iter()
            .filter(|(s, d)| s % 30 == 0 && d.optimistic == Some(4))
            .count();
        wins as f64 / rounds as f64
    }

    #[test]
    fn new_peers_are_three_times_as_likely_to_be_optimistic() {
        // Candidates 4..=7, the current one excluded each move. Equal weights: peer 4 wins 1/4 of
        // the rounds; weight 3 for a new peer 4: 3/8 in the long run.
        let old = optimistic_share("iiiiiiii");
        let new = optimistic_share("iiiiNiii");
        assert!((0.21..0.29).contains(&old), "old peer share {old}");
        assert!((0.33..0.42).contains(&new), "new peer share {new}");
    }

    #[test]
    fn a_peer_silent_for_60_s_while_unchoked_loses_its_regular_slot() {
        // Peer 3 reports the best rate but sends no block.
        let mut sim = swarm("iiizi", &[50, 40, 30, 90, 5]);
        let decisions = sim.run(0..100);
        for (s, d) in &decisions {
            // Unchoked from second 0 (seen from the 1st); snubbed at 61; choked at the round of 70.
            let expect_slot = *s < 70;
            assert_eq!(regular(d).contains(&3), expect_slot, "second {s}: {d:?}");
        }
        assert!(sim.choker.is_snubbed(3));
        // It may still be the optimistic unchoke (the only choked interested peer).
        assert_eq!(decisions.last().unwrap().1.optimistic, Some(3));
        // It sends a block: the snub ends and it earns its slot back at the next round.
        sim.silent[3] = false;
        let after = sim.run(100..111);
        assert!(!sim.choker.is_snubbed(3));
        assert!(regular(&after[0].1).contains(&3));
    }

    #[test]
    fn silence_counts_only_while_we_unchoke_the_peer() {
        // Peer 2 is silent from the start, but only becomes unchoked when a slot frees up at 30 s.
        let mut sim = swarm("iizi", &[50, 40, 0, 30]);
        sim.choker.cfg.regular_slots = 3;
        sim.peers[2].interested = false;
        sim.run(0..30);
        sim.peers[2].interested = true;
        sim.peers[3].interested = false;
        let decisions = sim.run(30..120);
        for (s, d) in &decisions {
            let snubbed_by_now = *s >= 100; // unchoked from 30 (seen at 31), snubbed at 91
            assert_eq!(
                !regular(d).contains(&2),
                snubbed_by_now,
                "second {s}: {d:?}"
            );
        }
    }

    #[test]
    fn seeding_never_snubs() {
        let mut sim = swarm("iiz", &[50, 40, 90]);
        sim.seeding = true;
        for (s, d) in sim.run(0..200) {
            assert_eq!(regular(&d), vec![0, 1, 2], "second {s}");
        }
        assert!(!sim.choker.is_snubbed(2));
    }

    #[test]
    fn a_newly_interested_peer_takes_a_free_slot_at_once() {
        let mut sim = swarm("iii...", &[30, 20, 10, 5, 5, 5]);
        let d = sim.run(0..3);
        assert_eq!(d[0].1.unchoke, vec![0, 1, 2]);
        let now = sim.at(3);
        sim.peers[3].interested = true;
        assert!(sim.choker.on_interested(now, 3, &sim.peers));
        assert!(
            sim.choker.on_interested(now, 3, &sim.peers),
            "already holds the slot"
        );
        sim.peers[4].interested = true;
        assert!(
            !sim.choker.on_interested(now, 4, &sim.peers),
            "all four slots taken"
        );
        sim.choker.peer_gone(0);
        sim.peers.remove(0);
        assert!(sim.choker.on_interested(now, 4, &sim.peers));
        // A peer that lost interest frees its slot too.
        sim.peers[0].interested = false; // key 1
        sim.peers[4].interested = true; // key 5
        assert!(sim.choker.on_interested(now, 5, &sim.peers));
        // The next round keeps them: they are among the best four interested peers.
        let d = sim.run(4..11);
        assert_eq!(regular(&d[0].1), vec![2, 3, 4, 5]);
    }

    #[test]
    fn new_peers_are_unchoked_before_they_ask_while_slots_last() {
        let mut sim = swarm("......", &[0; 6]);
        let now = sim.at(0);
        for k in 0..4 {
            assert!(sim.choker.on_connected(k), "peer {k}");
        }
        assert!(!sim.choker.on_connected(4), "four slots, all given");
        // None of them got interested: an interested newcomer still gets a slot at once.
        sim.peers[5].interested = true;
        assert!(sim.choker.on_interested(now, 5, &sim.peers));
        // The next round keeps only interested peers.
        let d = sim.run(1..2);
        assert_eq!(regular(&d[0].1), vec![5]);
    }
}
