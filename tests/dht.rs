//! The mainline DHT (BEP 5) end to end, on loopback only: bootstrap nodes are always ours.
//! - 100 in-process nodes on real UDP sockets: a newcomer finds what another node announced;
//!   with 30 of them stopped, lookups for announced info-hashes still succeed.
//! - swarmfs processes: a magnet with no tracker and no x.pe is downloaded through the DHT.
//! - libtorrent (python3-libtorrent) both ways: it finds our announce, we find its announce, and
//!   a magnet mount reads a libtorrent seeder found only through the DHT.
//! - A private torrent is never announced on the DHT.
//!
//! Processes get their own 127.0.0.x (libtorrent keeps one DHT node per IP otherwise).
// `one_at_a_time`'s guard is held for a whole test; each async test has a runtime of its own, on
// which nothing else waits for that lock.
#![allow(clippy::await_holding_lock)]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use swarmfs::core::dht::DhtConfig;
use swarmfs::net::dht::{DhtHandle, DhtNode, DhtSettings, LookupUpdate};

/// Generous bounds on waits (watchdogs, not timing claims).
const WATCHDOG: Duration = Duration::from_secs(120);

/// The tests of this file run one at a time: a hundred nodes starved of CPU by a libtorrent
/// swarm next door answer late, and a young network then forms worse than it would.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn test_config() -> DhtConfig {
    DhtConfig {
        // Every node is 127.0.0.1: a per-IP limit would throttle the whole network.
        rate_limit: 0,
        ..DhtConfig::default()
    }
}

async fn start_node(bootstrap: &[SocketAddr]) -> DhtHandle {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    DhtNode::start(
        socket,
        DhtSettings {
            config: test_config(),
            bootstrap: bootstrap.iter().map(|a| a.to_string()).collect(),
            state_file: None,
        },
    )
    .unwrap()
}

/// Waits until `cond` holds, polling; fails the test past the watchdog.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WATCHDOG;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchdog: {what} not within {WATCHDOG:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` nodes; the first is the others' only bootstrap contact. Returns once every node knows
/// at least 8 others.
async fn network(n: usize) -> Vec<DhtHandle> {
    let first = start_node(&[]).await;
    let contact = first.local_addr();
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(start_node(&[contact]).await);
        // Nodes join one after another, as in a network that grows, not all in one instant.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_until("every node knows 8 others", || {
        nodes.iter().all(|node| node.stats().nodes >= 8)
    })
    .await;
    // Then each looks its own id up, as a running node refreshes its neighbourhood: nodes that
    // joined first heard of few others, so without it some know the nodes nearest them only
    // after their first bucket refresh (15 min).
    for _ in 0..2 {
        let refreshes = nodes.iter().map(|node| async {
            let mut updates = node.find_node(node.id());
            while updates.recv().await.is_some() {}
        });
        tokio::time::timeout(WATCHDOG, futures_util::future::join_all(refreshes))
            .await
            .expect("watchdog: refresh lookups");
        // Newcomers to a table are pinged before they are handed out to others.
        wait_until("pings answered", || {
            nodes.iter().all(|n| n.stats().queries_pending == 0)
        })
        .await;
    }
    nodes
}

/// Runs one lookup to its end; returns the peers it found.
async fn lookup(node: &DhtHandle, info_hash: [u8; 20], announce: Option<u16>) -> Vec<SocketAddr> {
    let mut updates = node.get_peers(info_hash, announce);
    let mut peers = Vec::new();
    let run = async {
        while let Some(update) = updates.recv().await {
            match update {
                LookupUpdate::Peers(p) => peers.extend(p),
                LookupUpdate::Done(_) => return,
            }
        }
        panic!("the node ended during a lookup");
    };
    tokio::time::timeout(WATCHDOG, run)
        .await
        .expect("watchdog: lookup did not finish");
    peers
}

fn hash_of(i: u32) -> [u8; 20] {
    use sha1::{Digest, Sha1};
    Sha1::digest(format!("torrent {i}")).into()
}

fn on_port(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_finds_what_another_node_of_a_hundred_announced() {
    let _serial = one_at_a_time();
    let nodes = network(100).await;
    let info_hash = hash_of(1);
    lookup(&nodes[37], info_hash, Some(4242)).await;

    // The newcomer knows only one node, not the announcer and not the first.
    let newcomer = start_node(&[nodes[80].local_addr()]).await;
    wait_until("the newcomer joined", || newcomer.stats().nodes >= 8).await;
    let found = lookup(&newcomer, info_hash, None).await;
    assert!(
        found.contains(&on_port(4242)),
        "the newcomer's lookup found {found:?}, not 127.0.0.1:4242"
    );
    // Nobody announced this one.
    let none = lookup(&newcomer, hash_of(999), None).await;
    assert!(
        none.is_empty(),
        "peers for a torrent nobody announced: {none:?}"
    );
    for node in nodes.iter().chain([&newcomer]) {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_succeed_after_thirty_of_a_hundred_nodes_leave() {
    let _serial = one_at_a_time();
    let nodes = network(100).await;
    // 20 torrents, each announced by a different node on its own port.
    let announces =
        (0..20u32).map(|i| lookup(&nodes[i as usize], hash_of(i), Some(5000 + i as u16)));
    futures_util::future::join_all(announces).await;
    // 30 nodes leave (among them 10 of the announcers: their records live on other nodes).
    for node in &nodes[10..40] {
        node.shutdown().await;
    }
    let survivors = &nodes[40..];
    let lookups = (0..20u32).map(|i| {
        let from = &survivors[(i as usize * 3) % survivors.len()];
        lookup(from, hash_of(i), None)
    });
    let results = futures_util::future::join_all(lookups).await;
    let found = (0..20u32)
        .zip(&results)
        .filter(|(i, peers)| peers.contains(&on_port(5000 + *i as u16)))
        .count();
    println!("after 30% churn: {found} of 20 lookups found the announced peer");
    assert!(
        found >= 19,
        "only {found} of 20 lookups succeeded after churn"
    );
    for node in survivors {
        node.shutdown().await;
    }
}

// ---- processes: swarmfs commands and python3-libtorrent ----

struct Swarm {
    tmp: tempfile::TempDir,
    torrent: PathBuf,
    info_hash: String,
    name: String,
}

fn swarm(private: bool) -> Swarm {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src/set");
    write_file(&src.join("a.bin"), 1024 * 1024 + 17, 91);
    write_file(&src.join("sub/b.bin"), 200_000, 92);
    let torrent = tmp.path().join("set.torrent");
    create_torrent(&src, &torrent, if private { &["--private"] } else { &[] });
    let json = run_ok(Command::new(bin()).arg("info").arg("--json").arg(&torrent));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    Swarm {
        info_hash: v["info_hash"].as_str().unwrap().to_string(),
        name: v["name"].as_str().unwrap().to_string(),
        torrent,
        tmp,
    }
}

impl Swarm {
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    /// A magnet with neither trackers nor peers: only the DHT can find them.
    fn bare_magnet(&self) -> String {
        format!("magnet:?xt=urn:btih:{}&dn=set", self.info_hash)
    }
}

/// `swarmfs dht --listen IP:0` (a swarm's first node) and its address.
fn dht_node(ip: &str, logs: &Path) -> (Proc, SocketAddr) {
    let mut p = Proc::spawn(
        "dht",
        Command::new(bin())
            .args([
                "dht",
                "--listen",
                &format!("{ip}:0"),
                "--dht-rate-limit",
                "0",
            ])
            .env("RUST_LOG", "swarmfs=debug"),
        logs,
    );
    let line = p.wait_line("dht node listening on ", Duration::from_secs(60));
    let addr = line
        .trim_start_matches("dht node listening on ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (p, addr)
}

/// The DHT options of a swarmfs process joining through `bootstrap` on its own IP.
fn dht_args(ip: &str, bootstrap: SocketAddr) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("{ip}:0"),
        "--dht-bootstrap".into(),
        bootstrap.to_string(),
        "--dht-rate-limit".into(),
        "0".into(),
        "--dht-announce-interval".into(),
        "1".into(),
    ]
}

fn swarmfs_seed(s: &Swarm, ip: &str, bootstrap: SocketAddr, log: &str) -> (Proc, SocketAddr) {
    let mut p = Proc::spawn(
        "seeder",
        Command::new(bin())
            .arg("seed")
            .arg(&s.torrent)
            .arg("-d")
            .arg(s.path("src"))
            .args(dht_args(ip, bootstrap))
            .env("RUST_LOG", "swarmfs=debug"),
        &s.path(log),
    );
    let addr = p.listen_addr();
    p.wait_line("seeding ", Duration::from_secs(60));
    (p, addr)
}

fn lt_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lt_client.py")
}

/// python3-libtorrent with its DHT on, joining through `bootstrap`, on `ip`.
fn libtorrent(args: &[&str], ip: &str, bootstrap: SocketAddr, log: &Path) -> Proc {
    Proc::spawn(
        "libtorrent",
        Command::new(PY).arg(lt_script()).args(args).args([
            "--listen",
            ip,
            "--dht-bootstrap",
            &bootstrap.to_string(),
        ]),
        log,
    )
}

/// The closing lines of `seed` / `download` (sent SIGTERM first when `stop`).
fn closing_lines(p: &mut Proc, stop: bool) -> Vec<String> {
    if stop {
        p.signal(libc::SIGTERM);
    }
    let status = p.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{} failed: {}", p.name, p.stderr());
    p.stdout_to_end(Duration::from_secs(10))
}

fn line_with<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:?}"))
}

/// `swarmfs download` of the swarm's bare magnet on `ip`, joining the DHT through `bootstrap`:
/// the download must finish with the same files; returns its closing lines.
fn download_bare_magnet(s: &Swarm, ip: &str, bootstrap: SocketAddr) -> Vec<String> {
    let dir = s.path("dl");
    let mut dl = Proc::spawn(
        "download",
        Command::new(bin())
            .arg("download")
            .arg(s.bare_magnet())
            .arg("-d")
            .arg(&dir)
            .args(dht_args(ip, bootstrap))
            .env("RUST_LOG", "swarmfs=debug"),
        &s.path("dl.log"),
    );
    let lines = with_watchdog(WATCHDOG, "download", move || {
        let lines = closing_lines(&mut dl, false);
        (lines, dl)
    })
    .0;
    assert_same_tree(&s.path("src/set"), &dir.join(&s.name));
    lines
}

#[test]
fn a_bare_magnet_downloads_from_a_swarmfs_seeder_found_through_the_dht() {
    let _serial = one_at_a_time();
    let s = swarm(false);
    let (_node, boot) = dht_node("127.0.0.2", &s.path("dht.log"));
    let (_seed, _) = swarmfs_seed(&s, "127.0.0.3", boot, "seed.log");
    let lines = download_bare_magnet(&s, "127.0.0.4", boot);
    // The seeder may also have dialled us after finding our announce (then "incoming 1").
    assert!(
        line_with(&lines, "peers by source: ").starts_with("peers by source: dht 1"),
        "{lines:?}"
    );
    assert!(line_with(&lines, "dht: ").ends_with(" nodes"), "{lines:?}");
}

#[test]
fn libtorrent_finds_our_announce_and_we_find_libtorrents() {
    let _serial = one_at_a_time();
    // Ours -> libtorrent: a swarmfs seeder announces; libtorrent's get_peers finds it.
    let s = swarm(false);
    let (_node, boot) = dht_node("127.0.0.12", &s.path("dht.log"));
    let (_seed, seed_addr) = swarmfs_seed(&s, "127.0.0.13", boot, "seed.log");
    let mut finder = libtorrent(
        &["dht-find", &s.info_hash, "-"],
        "127.0.0.14",
        boot,
        &s.path("lt-find.log"),
    );
    let want = format!("found {seed_addr}");
    let deadline = std::time::Instant::now() + WATCHDOG;
    loop {
        let line = finder.wait_line("found ", WATCHDOG);
        if line == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "libtorrent never found {seed_addr}"
        );
    }
    drop(finder);

    // libtorrent -> ours: libtorrent seeds another torrent and announces it; a swarmfs download
    // of its bare magnet finds it through the DHT alone.
    let t = swarm(false);
    let mut lt = libtorrent(
        &[
            "seed",
            t.torrent.to_str().unwrap(),
            t.path("src").to_str().unwrap(),
        ],
        "127.0.0.15",
        boot,
        &t.path("lt-seed.log"),
    );
    lt.wait_line("seeding", Duration::from_secs(60));
    let lines = download_bare_magnet(&t, "127.0.0.16", boot);
    assert!(
        line_with(&lines, "peers by source: ").contains("dht "),
        "{lines:?}"
    );
}

#[test]
fn a_magnet_mount_reads_a_libtorrent_seeder_found_only_through_the_dht() {
    let _serial = one_at_a_time();
    let s = swarm(false);
    let (_node, boot) = dht_node("127.0.0.22", &s.path("dht.log"));
    let mut lt = libtorrent(
        &[
            "seed",
            s.torrent.to_str().unwrap(),
            s.path("src").to_str().unwrap(),
        ],
        "127.0.0.23",
        boot,
        &s.path("lt-seed.log"),
    );
    lt.wait_line("seeding", Duration::from_secs(60));
    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut args = dht_args("127.0.0.24", boot);
    args.extend(["--metadata-timeout".to_string(), "100".to_string()]);
    let mut mount = Proc::spawn(
        "mount",
        Command::new(bin())
            .arg("mount")
            .arg("-f")
            .arg(s.bare_magnet())
            .arg(&mnt)
            .args(&args)
            .env("RUST_LOG", "swarmfs=debug"),
        &s.path("mount.log"),
    );
    mount.wait_line("mounted ", WATCHDOG);
    let guard = MountGuard(mnt.clone());
    // Connected peers by source, while the mount fetches (the seeder may leave once the mount
    // needs nothing more from it): the one peer came from the DHT.
    let top = mnt.join(&s.name);
    let peers = with_watchdog(WATCHDOG, "a peer from the DHT", move || loop {
        let value = run_ok(
            Command::new("getfattr")
                .args(["--only-values", "-n", "user.swarmfs.peers"])
                .arg(&top),
        );
        if !value.contains(" dht=0 ") {
            return value;
        }
        std::thread::sleep(Duration::from_millis(5));
    });
    assert!(
        peers.starts_with("direct=0 tracker=0 dht=1 pex=0 "),
        "user.swarmfs.peers: {peers}"
    );
    for rel in ["a.bin", "sub/b.bin"] {
        let want = sha256_file(&s.path("src/set").join(rel));
        let path = mnt.join(&s.name).join(rel);
        let got = with_watchdog(WATCHDOG, "read through the mount", move || {
            sha256_file(&path)
        });
        assert_eq!(got, want, "{rel}");
    }
    drop(guard);
}

/// Unmounts (lazily) on drop, so a failed assertion leaves no mount behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_torrent_is_never_announced_on_the_dht() {
    let _serial = one_at_a_time();
    // Our observer node is the bootstrap of both seeders, and so among the few nodes any
    // announce of theirs reaches.
    let observer = start_node(&[]).await;
    let boot = observer.local_addr();
    let private = swarm(true);
    let public = swarm(false);
    // (Blocking waits on the test's own thread are fine: the nodes run on the runtime's workers.)
    let (mut private_seed, _) = swarmfs_seed(&private, "127.0.0.32", boot, "seed.log");
    wait_until("the private seeder's node joined", || {
        observer.stats().nodes >= 1
    })
    .await;
    // A public seeder started after it, announcing every second: once three of its announces
    // have reached the observer, the private seeder has had as long to announce.
    let (public_seed, _) = swarmfs_seed(&public, "127.0.0.33", boot, "seed.log");
    let public_hash: [u8; 20] = hex::decode(&public.info_hash).unwrap().try_into().unwrap();
    let deadline = tokio::time::Instant::now() + WATCHDOG;
    while lookup(&observer, public_hash, None).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchdog: the public torrent never reached the DHT"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the public torrent stored on the observer", || {
        observer.stats().torrents_stored >= 1
    })
    .await;
    // Three more announce intervals of both seeders.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        observer.stats().torrents_stored,
        1,
        "the observer stores more than the public torrent"
    );
    let private_hash: [u8; 20] = hex::decode(&private.info_hash).unwrap().try_into().unwrap();
    let found = lookup(&observer, private_hash, None).await;
    assert!(
        found.is_empty(),
        "the private torrent's peers are on the DHT: {found:?}"
    );
    let lines = tokio::task::spawn_blocking(move || closing_lines(&mut private_seed, true))
        .await
        .unwrap();
    assert_eq!(
        line_with(&lines, "dht: "),
        "dht: not used (private torrent)"
    );
    assert_eq!(
        line_with(&lines, "pex messages: "),
        "pex messages: 0 sent, 0 received"
    );
    drop(public_seed);
    observer.shutdown().await;
}

#[test]
fn the_table_is_kept_only_where_asked() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let xdg = tmp.path().join("xdg");
    let state = tmp.path().join("table.dat");
    // Prints the node's id, then stops it (SIGTERM) and returns that id.
    let run = |extra: &[&str], log: &str| {
        let mut p = Proc::spawn(
            "dht",
            Command::new(bin())
                .args(["dht", "--listen", "127.0.0.41:0"])
                .args(extra)
                .env("XDG_STATE_HOME", &xdg),
            &tmp.path().join(log),
        );
        let line = p.wait_line("dht node listening on ", Duration::from_secs(60));
        let lines = closing_lines(&mut p, true);
        assert!(
            line_with(&lines, "dht: ").ends_with("peers stored"),
            "{lines:?}"
        );
        line.split("(id ").nth(1).unwrap().to_string()
    };
    let state_arg = state.to_str().unwrap();
    let first = run(&["--dht-state", state_arg], "1.log");
    assert!(state.exists(), "--dht-state FILE was not written");
    let second = run(&["--dht-state", state_arg], "2.log");
    assert_eq!(
        first, second,
        "the node id did not come back from the saved table"
    );
    // A standalone node without --dht-state keeps nothing, not even in $XDG_STATE_HOME.
    let third = run(&[], "3.log");
    assert_ne!(third, first);
    assert!(!xdg.exists(), "a standalone node wrote to $XDG_STATE_HOME");
}
