//! Lookup hops of the mainline DHT against network size, and against nodes leaving, on an
//! in-process network of real `core::dht::Dht` nodes (`core::dht::sim`: datagrams routed in memory
//! with a fixed one-way delay, simulated time, no sockets), beside the ring without shortcuts of
//! the course notes on the same node ids (each node knows only its two successors in id order; a
//! lookup walks clockwise to the key's owner).
//!
//! For each size n: nodes join in waves through nodes that already joined; `--lookups` info-hashes
//! are announced (get_peers + announce_peer) by random nodes; then each hash is looked up from a
//! random node. A lookup "routes" if the closest node that answered is the closest live node to
//! the key (for the ring: it reaches the key's live owner) and "finds" if the announced peer comes
//! back. Then the same lookups (same sources, same keys) on the same network after 10%, 30%, 50%
//! of the nodes leave without a word (nobody repairs anything first: a query to a node that left
//! times out, `query_timeout` 5 s; the ring waits as long before trying the second successor).
//! Each leave level rebuilds the network from the same seed, so levels do not learn from each
//! other.
//!
//!   cargo run --release --example dht_sim -- [--sizes 64,256,1024,4096] [--lookups 500]
//!       [--lookups-large 500 --large-from 8192] [--leave 10,30,50] [--data target/bench/dht-hops.dat]
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use swarmfs::core::dht::sim::SimNetwork;
use swarmfs::core::dht::{DhtConfig, DhtEvent, LookupId};
use swarmfs::core::routing::{NodeId, K};

#[derive(Parser, Debug)]
struct Args {
    /// Network sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    sizes: Vec<usize>,
    /// Lookups per size (each for its own announced info-hash).
    #[arg(long, default_value_t = 500)]
    lookups: usize,
    /// Lookups per size from `--large-from` nodes up (fewer keeps a large run short).
    #[arg(long, default_value_t = 500)]
    lookups_large: usize,
    #[arg(long, default_value_t = 8192)]
    large_from: usize,
    /// Percentages of nodes that leave.
    #[arg(long, value_delimiter = ',', default_value = "10,30,50")]
    leave: Vec<u32>,
    /// One-way delay of every datagram (a hop's RTT is twice this).
    #[arg(long, default_value_t = 25)]
    one_way_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write "n log2(n) dht_hops ring_hops" rows here, for the plot.
    #[arg(long)]
    data: Option<PathBuf>,
}

/// What one lookup came to.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    routed: bool,
    /// The announced peer came back (DHT only).
    found: bool,
    hops: u32,
    queries: u32,
    /// Until the lookup ended.
    millis: f64,
    /// Until the announced peer came back (DHT; NaN if it did not).
    peers_millis: f64,
}

/// The lookups of one size: who looks up which key, and who leaves in what order.
struct Plan {
    ids: Vec<NodeId>,
    /// Announcer of each key.
    announcers: Vec<usize>,
    keys: Vec<[u8; 20]>,
    /// Lookup sources; they never leave.
    sources: Vec<usize>,
    /// Nodes in leaving order: the first p% leave at level p.
    leaving: Vec<usize>,
}

impl Plan {
    fn new(n: usize, lookups: usize, max_leave: u32, seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).rotate_left(32));
        let ids = (0..n).map(|_| NodeId::random(&mut rng)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let leavers = n * max_leave as usize / 100;
        let stayers = order[leavers..].to_vec();
        Plan {
            ids,
            announcers: (0..lookups).map(|_| rng.gen_range(0..n)).collect(),
            keys: (0..lookups).map(|_| rng.gen()).collect(),
            sources: (0..lookups)
                .map(|_| stayers[rng.gen_range(0..stayers.len())])
                .collect(),
            leaving: order,
        }
    }

    fn left(&self, percent: u32) -> &[usize] {
        &self.leaving[..self.ids.len() * percent as usize / 100]
    }
}

fn cfg() -> DhtConfig {
    // Every simulated node is on 127.0.0.1 (distinct ports): no per-IP rate limit.
    DhtConfig {
        rate_limit: 0,
        ..DhtConfig::default()
    }
}

/// All nodes joined (in waves, each through a node of an earlier wave) and the keys announced.
fn build_dht(plan: &Plan, one_way: Duration, seed: u64) -> SimNetwork {
    let n = plan.ids.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xd47);
    let mut net = SimNetwork::new(one_way, Instant::now());
    net.add_node(plan.ids[0], cfg(), seed);
    let mut joined = 1;
    while joined < n {
        let wave = joined.min(n - joined).min(256);
        for i in joined..joined + wave {
            net.add_node(plan.ids[i], cfg(), seed.wrapping_add(i as u64));
            let entry = SimNetwork::addr_of(rng.gen_range(0..joined));
            net.with(i, |d, now| d.bootstrap(&[entry], now));
        }
        for _ in 0..30 {
            net.run_for(Duration::from_secs(1));
            if (joined..joined + wave).all(|i| net.nodes[i].dht.stats().lookups_running == 0) {
                break;
            }
        }
        joined += wave;
    }
    net.run_for(Duration::from_secs(5));
    let announces: Vec<(usize, LookupId)> = plan
        .announcers
        .iter()
        .zip(&plan.keys)
        .enumerate()
        .map(|(j, (&a, key))| {
            let port = announce_port(j);
            (a, net.with(a, |d, now| d.get_peers(*key, Some(port), now)))
        })
        .collect();
    net.run_until(Duration::from_secs(600), |net| {
        announces
            .iter()
            .all(|&(a, l)| net.lookup_done(a, l).is_some())
    });
    net.run_for(Duration::from_secs(2));
    net
}

fn announce_port(j: usize) -> u16 {
    20_000 + j as u16
}

/// Runs the plan's lookups on `net` (in batches, concurrently within one).
fn dht_lookups(net: &mut SimNetwork, plan: &Plan) -> Vec<Outcome> {
    let alive: Vec<(NodeId, usize)> = (0..plan.ids.len())
        .filter(|&i| net.nodes[i].alive)
        .map(|i| (plan.ids[i], i))
        .collect();
    let mut outcomes = Vec::new();
    let jobs: Vec<usize> = (0..plan.keys.len()).collect();
    for batch in jobs.chunks(50) {
        let start = net.now();
        let started: Vec<(usize, LookupId)> = batch
            .iter()
            .map(|&j| {
                let s = plan.sources[j];
                let key = plan.keys[j];
                (s, net.with(s, |d, now| d.get_peers(key, None, now)))
            })
            .collect();
        net.run_until(Duration::from_secs(3600), |net| {
            started
                .iter()
                .all(|&(s, l)| net.lookup_done(s, l).is_some())
        });
        for (&j, &(s, lookup)) in batch.iter().zip(&started) {
            let Some(summary) = net.lookup_done(s, lookup).cloned() else {
                outcomes.push(Outcome {
                    routed: false,
                    found: false,
                    hops: 0,
                    queries: 0,
                    millis: f64::NAN,
                    peers_millis: f64::NAN,
                });
                continue;
            };
            let node = &net.nodes[s];
            let expected_peer = {
                let mut a = SimNetwork::addr_of(plan.announcers[j]);
                a.set_port(announce_port(j));
                a
            };
            let when = |wanted: &dyn Fn(&DhtEvent) -> bool| {
                node.events
                    .iter()
                    .zip(&node.event_times)
                    .find(|(e, _)| wanted(e))
                    .map(|(_, t)| (*t - start).as_secs_f64() * 1000.0)
                    .unwrap_or(f64::NAN)
            };
            let millis =
                when(&|e| matches!(e, DhtEvent::LookupDone { lookup: l, .. } if *l == lookup));
            let peers_millis = when(&|e| {
                matches!(e, DhtEvent::Peers { lookup: l, peers, .. }
                    if *l == lookup && peers.contains(&expected_peer))
            });
            let key = NodeId(plan.keys[j]);
            let owner = alive
                .iter()
                .filter(|(_, i)| *i != s)
                .min_by_key(|(id, _)| key.distance(id))
                .map(|(id, _)| *id);
            outcomes.push(Outcome {
                routed: summary.closest.first().map(|(id, _)| *id) == owner,
                found: !peers_millis.is_nan(),
                hops: summary.hops,
                queries: summary.queried,
                millis,
                peers_millis,
            });
        }
        // Keep event lists short: the next batch scans them.
        for &(s, _) in &started {
            net.nodes[s].events.clear();
            net.nodes[s].event_times.clear();
        }
    }
    outcomes
}

/// The ring without shortcuts: ids in numeric order, each node knows its two successors; a
/// lookup hops clockwise to the key's owner (its live successor). A departed successor costs a
/// timeout before the next one is tried; with both gone the lookup fails.
fn ring_lookups(plan: &Plan, left: &[usize], rtt: Duration, timeout: Duration) -> Vec<Outcome> {
    let n = plan.ids.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| plan.ids[i]);
    let mut position = vec![0; n];
    for (p, &i) in order.iter().enumerate() {
        position[i] = p;
    }
    let mut alive = vec![true; n];
    for &i in left {
        alive[i] = false;
    }
    let alive_at = |p: usize| alive[order[p % n]];
    // The key's owner: the first live node at or after the key, clockwise.
    let owner_of = |key: &NodeId| -> Option<usize> {
        let first = order.partition_point(|&i| plan.ids[i] < *key);
        (0..n).map(|k| (first + k) % n).find(|&p| alive_at(p))
    };
    plan.keys
        .iter()
        .zip(&plan.sources)
        .map(|(key, &source)| {
            let key = NodeId(*key);
            let owner = owner_of(&key);
            let (mut at, mut hops, mut timeouts) = (position[source], 0u32, 0u32);
            let routed = loop {
                if Some(at) == owner {
                    break true;
                }
                // The first live one of our two successors.
                let next = (1..=2).map(|k| (at + k) % n).find(|&p| {
                    let up = alive_at(p);
                    timeouts += u32::from(!up);
                    up
                });
                match next {
                    Some(p) => {
                        at = p;
                        hops += 1;
                    }
                    None => break false,
                }
                if hops as usize > 2 * n {
                    break false;
                }
            };
            Outcome {
                routed,
                found: routed,
                hops,
                queries: hops + timeouts,
                millis: (rtt * hops + timeout * timeouts).as_secs_f64() * 1000.0,
                peers_millis: f64::NAN,
            }
        })
        .collect()
}

struct Figures {
    routed: f64,
    found: f64,
    mean_hops: f64,
    p95_hops: u32,
    max_hops: u32,
    mean_queries: f64,
    median_ms: f64,
    /// Until the announced peer came back, over the lookups that found it.
    median_peers_ms: f64,
}

/// Hop and time figures count the lookups that routed.
fn figures(outcomes: &[Outcome]) -> Figures {
    let total = outcomes.len().max(1) as f64;
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.routed).collect();
    let mut hops: Vec<u32> = ok.iter().map(|o| o.hops).collect();
    hops.sort_unstable();
    let median = |mut v: Vec<f64>| {
        v.retain(|x| !x.is_nan());
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let pick = |v: &[u32], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Figures {
        routed: 100.0 * ok.len() as f64 / total,
        found: 100.0 * outcomes.iter().filter(|o| o.found).count() as f64 / total,
        mean_hops: if hops.is_empty() {
            f64::NAN
        } else {
            hops.iter().map(|&h| h as f64).sum::<f64>() / hops.len() as f64
        },
        p95_hops: pick(&hops, 0.95),
        max_hops: hops.last().copied().unwrap_or(0),
        mean_queries: outcomes.iter().map(|o| o.queries as f64).sum::<f64>() / total,
        median_ms: median(ok.iter().map(|o| o.millis).collect()),
        median_peers_ms: median(outcomes.iter().map(|o| o.peers_millis).collect()),
    }
}

const BASE_WIDTHS: &[usize] = &[6, 7, 7, 8, 4, 4, 7, 7, 7, 8, 8, 9, 5, 8];
/// Columns after which a bar separates the DHT's figures and the ring's.
const BASE_BARS: &[usize] = &[2, 10];
const CHURN_WIDTHS: &[usize] = &[6, 5, 7, 7, 7, 8, 7, 8, 8, 7, 9, 8];
const CHURN_BARS: &[usize] = &[2, 8];

/// One table row, right-aligned.
fn row<S: AsRef<str>>(cells: &[S], widths: &[usize], bars: &[usize]) -> String {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i > 0 {
            line.push(' ');
        }
        write!(line, "{:>width$}", cell.as_ref()).unwrap();
        if bars.contains(&i) {
            line.push_str(" |");
        }
    }
    line
}

/// A figure, or "-" when no lookup routed.
fn num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.decimals$}")
    }
}

fn main() {
    let args = Args::parse();
    let one_way = Duration::from_millis(args.one_way_ms);
    let rtt = one_way * 2;
    let timeout = cfg().query_timeout;
    let max_leave = args.leave.iter().copied().max().unwrap_or(0).min(90);
    println!(
        "DHT: core::dht::Dht nodes in one process (K={K}, alpha={}, query timeout {} s), every \
         datagram {} ms one way ({} ms RTT per hop), simulated clock, no sockets.",
        cfg().alpha,
        timeout.as_secs(),
        args.one_way_ms,
        rtt.as_millis()
    );
    println!(
        "Ring: the same node ids in numeric order, each node knows only its two successors; a \
         lookup walks clockwise to the key's owner."
    );
    println!(
        "DHT hops: the longest chain of referrals to a node that answered (1 = a node the \
         searcher already knew); ring hops: messages forwarded. Hops and \"ms done\" (median \
         simulated time to the lookup's end) count the lookups that routed; \"ms peers\": median \
         time until the announced peer came back.\n"
    );
    let mut base = String::new();
    let mut churn = String::new();
    let mut data = String::from("# n log2(n) dht_mean_hops ring_mean_hops\n");
    let base_header = [
        "n",
        "log2(n)",
        "lookups",
        "DHT hops",
        "p95",
        "max",
        "queries",
        "routed",
        "found",
        "ms peers",
        "ms done",
        "ring hops",
        "max",
        "ms done",
    ];
    writeln!(base, "{}", row(&base_header, BASE_WIDTHS, BASE_BARS)).unwrap();
    let churn_header = [
        "n",
        "left",
        "lookups",
        "routed",
        "found",
        "DHT hops",
        "queries",
        "ms peers",
        "ms done",
        "routed",
        "ring hops",
        "ms done",
    ];
    writeln!(churn, "{}", row(&churn_header, CHURN_WIDTHS, CHURN_BARS)).unwrap();
    for &n in &args.sizes {
        let lookups = if n >= args.large_from {
            args.lookups_large
        } else {
            args.lookups
        };
        let wall = Instant::now();
        let plan = Plan::new(n, lookups, max_leave, args.seed);
        let mut net = build_dht(&plan, one_way, args.seed);
        let dht = figures(&dht_lookups(&mut net, &plan));
        let ring = figures(&ring_lookups(&plan, &[], rtt, timeout));
        let cells = [
            n.to_string(),
            format!("{:.1}", (n as f64).log2()),
            lookups.to_string(),
            num(dht.mean_hops, 2),
            dht.p95_hops.to_string(),
            dht.max_hops.to_string(),
            format!("{:.1}", dht.mean_queries),
            format!("{:.1}%", dht.routed),
            format!("{:.1}%", dht.found),
            num(dht.median_peers_ms, 0),
            num(dht.median_ms, 0),
            num(ring.mean_hops, 1),
            ring.max_hops.to_string(),
            num(ring.median_ms, 0),
        ];
        writeln!(base, "{}", row(&cells, BASE_WIDTHS, BASE_BARS)).unwrap();
        writeln!(
            data,
            "{n} {:.3} {:.3} {:.3}",
            (n as f64).log2(),
            dht.mean_hops,
            ring.mean_hops
        )
        .unwrap();
        for &percent in &args.leave {
            let percent = percent.min(max_leave);
            let left = plan.left(percent);
            let mut net = build_dht(&plan, one_way, args.seed);
            for &i in left {
                net.kill(i);
            }
            let dht = figures(&dht_lookups(&mut net, &plan));
            let ring = figures(&ring_lookups(&plan, left, rtt, timeout));
            let cells = [
                n.to_string(),
                format!("{percent}%"),
                lookups.to_string(),
                format!("{:.1}%", dht.routed),
                format!("{:.1}%", dht.found),
                num(dht.mean_hops, 2),
                format!("{:.1}", dht.mean_queries),
                num(dht.median_peers_ms, 0),
                num(dht.median_ms, 0),
                format!("{:.1}%", ring.routed),
                num(ring.mean_hops, 1),
                num(ring.median_ms, 0),
            ];
            writeln!(churn, "{}", row(&cells, CHURN_WIDTHS, CHURN_BARS)).unwrap();
        }
        eprintln!(
            "dht_sim: n={n}: {lookups} lookups x {} networks in {:.1} s",
            1 + args.leave.len(),
            wall.elapsed().as_secs_f64()
        );
    }
    println!("Lookup hops against network size (all nodes up):");
    print!("{base}");
    println!("\nThe same lookups after nodes leave (no repair before the lookups):");
    print!("{churn}");
    if let Some(path) = &args.data {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(path, data) {
            eprintln!("dht_sim: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
