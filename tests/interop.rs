//! Interop with real clients we did not write (python3-libtorrent, aria2c), through direct
//! connections, our built-in tracker and Debian's opentracker. All on 127.0.0.1 with DHT, LSD,
//! UPnP and NAT-PMP off.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn lt_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lt_client.py")
}

fn libtorrent(
    mode: &str,
    torrent: &Path,
    save: &Path,
    logs: &Path,
    extra: &[String],
) -> (Proc, std::net::SocketAddr) {
    std::fs::create_dir_all(save).unwrap();
    let mut p = Proc::spawn(
        &format!("libtorrent-{mode}"),
        Command::new(PY)
            .arg(lt_script())
            .arg(mode)
            .arg(torrent)
            .arg(save)
            .args(extra),
        logs,
    );
    let addr = p.listen_addr();
    if mode == "seed" {
        p.wait_line("seeding", Duration::from_secs(60));
    }
    (p, addr)
}

fn dataset(root: &Path) {
    write_file(&root.join("a.bin"), 3 * 1024 * 1024 + 17, 71);
    write_file(&root.join("sub/b.bin"), 700_000, 72);
    write_file(&root.join("sub/empty"), 0, 73);
}

fn swarmfs_download(torrent: &Path, dir: &Path, logs: &Path, extra: &[&str]) {
    let mut d = download(torrent, dir, logs, extra);
    let status = d.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "download failed: {}", d.stderr());
}

#[test]
fn libtorrent_seeds_swarmfs_downloads() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("src/set"));
    let t = tmp.path().join("set.torrent");
    create_torrent(&tmp.path().join("src/set"), &t, &[]);
    let (_lt, addr) = libtorrent(
        "seed",
        &t,
        &tmp.path().join("src"),
        &tmp.path().join("lt.log"),
        &[],
    );
    swarmfs_download(
        &t,
        &tmp.path().join("dst"),
        &tmp.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    assert_same_tree(&tmp.path().join("src/set"), &tmp.path().join("dst/set"));
}

#[test]
fn swarmfs_seeds_libtorrent_downloads() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("src/set"));
    let t = tmp.path().join("set.torrent");
    create_torrent(&tmp.path().join("src/set"), &t, &[]);
    let (_seed, addr) = seeder(
        &tmp.path().join("src"),
        &t,
        &tmp.path().join("seed.log"),
        &[],
    );
    let (mut lt, _) = libtorrent(
        "download",
        &t,
        &tmp.path().join("dst"),
        &tmp.path().join("lt.log"),
        &["--peer".into(), addr.to_string()],
    );
    lt.wait_line("done", Duration::from_secs(180));
    assert_same_tree(&tmp.path().join("src/set"), &tmp.path().join("dst/set"));
}

/// Our built-in tracker on a free port; returns it and its announce URL.
fn builtin_tracker(logs: &Path) -> (Proc, String) {
    let mut p = Proc::spawn(
        "tracker",
        Command::new(bin()).args(["tracker", "--listen", "127.0.0.1:0"]),
        logs,
    );
    let line = p.wait_line("tracker listening on ", Duration::from_secs(30));
    let url = line
        .trim_start_matches("tracker listening on ")
        .trim()
        .to_string();
    (p, url)
}

fn aria2c_download(torrent: &Path, dir: &Path, logs: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let mut a = Proc::spawn(
        "aria2c",
        Command::new("aria2c")
            .args([
                "--enable-dht=false",
                "--enable-dht6=false",
                "--bt-enable-lpd=false",
                "--enable-peer-exchange=false",
                "--seed-time=0",
                "--file-allocation=none",
                "--disable-ipv6=true",
                "--summary-interval=0",
                "--console-log-level=warn",
            ])
            .arg(format!("--listen-port={port}"))
            .arg(format!("--dir={}", dir.display()))
            .arg(torrent),
        logs,
    );
    let status = a.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "aria2c failed: {}", a.stderr());
}

#[test]
fn swarmfs_seeds_aria2c_downloads_through_builtin_tracker() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("src/set"));
    let (_tracker, url) = builtin_tracker(&tmp.path().join("tracker.log"));
    let t = tmp.path().join("set.torrent");
    create_torrent(&tmp.path().join("src/set"), &t, &["--tracker", &url]);
    let (_seed, _) = seeder(
        &tmp.path().join("src"),
        &t,
        &tmp.path().join("seed.log"),
        &[],
    );
    aria2c_download(&t, &tmp.path().join("dst"), &tmp.path().join("aria2.log"));
    assert_same_tree(&tmp.path().join("src/set"), &tmp.path().join("dst/set"));
}

/// Debian's opentracker on a free port, whitelisting `info_hash_hex`; returns once it accepts
/// an announce for that hash (it loads its whitelist after it starts listening).
fn opentracker(dir: &Path, info_hash_hex: &str, logs: &Path) -> (Proc, String) {
    // opentracker chroots to -d and reads the whitelist from there, so the name is relative.
    std::fs::write(dir.join("whitelist"), format!("{info_hash_hex}\n")).unwrap();
    let port = free_port();
    let p = Proc::spawn(
        "opentracker",
        Command::new("opentracker")
            .args([
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-P",
                &port.to_string(),
                "-w",
                "whitelist",
                "-d",
            ])
            .arg(dir)
            .current_dir(dir),
        logs,
    );
    let hash = hex_decode(info_hash_hex);
    let escaped: String = hash.iter().map(|b| format!("%{b:02x}")).collect();
    let probe = format!(
        "GET /announce?info_hash={escaped}&peer_id=-XX0000-000000000000&port=1&uploaded=0&downloaded=0&left=0&event=stopped&compact=1 HTTP/1.0\r\n\r\n"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "opentracker did not start: {}",
            p.stderr()
        );
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let mut body = Vec::new();
            if c.write_all(probe.as_bytes()).is_ok() && c.read_to_end(&mut body).is_ok() {
                let body = String::from_utf8_lossy(&body);
                if body.starts_with("HTTP/1.")
                    && body.contains(" 200 ")
                    && !body.contains("failure reason")
                {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, format!("http://127.0.0.1:{port}/announce"))
}

fn hex_decode(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn info_hash_of(torrent: &Path) -> String {
    let out = run_ok(Command::new(bin()).arg("info").arg("--json").arg(torrent));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["info_hash"]
        .as_str()
        .expect("info --json has info_hash")
        .to_string()
}

#[test]
fn libtorrent_seeds_swarmfs_downloads_through_opentracker() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("src/set"));
    // The announce URL must be known before the torrent exists: pick the port first.
    let t0 = tmp.path().join("probe.torrent");
    create_torrent(&tmp.path().join("src/set"), &t0, &[]);
    let hash = info_hash_of(&t0);
    let (_ot, url) = opentracker(tmp.path(), &hash, &tmp.path().join("ot.log"));
    let (_lt, _) = libtorrent(
        "seed",
        &t0,
        &tmp.path().join("src"),
        &tmp.path().join("lt.log"),
        &["--tracker".into(), url.clone()],
    );
    // Trackers given on the command line; the info-hash is unchanged.
    swarmfs_download(
        &t0,
        &tmp.path().join("dst"),
        &tmp.path().join("dl.log"),
        &["--tracker", &url],
    );
    assert_same_tree(&tmp.path().join("src/set"), &tmp.path().join("dst/set"));
}

#[test]
fn mount_reads_from_libtorrent_and_libtorrent_downloads_from_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("src/set"));
    let t = tmp.path().join("set.torrent");
    create_torrent(&tmp.path().join("src/set"), &t, &[]);
    let (lt_seed, addr) = libtorrent(
        "seed",
        &t,
        &tmp.path().join("src"),
        &tmp.path().join("lt-seed.log"),
        &[],
    );
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &["--peer", &addr.to_string()],
    );
    let (a, b) = (tmp.path().join("src/set"), mnt.join("set"));
    with_watchdog(
        Duration::from_secs(120),
        "reading through the mount",
        move || assert_same_tree(&a, &b),
    );
    // The mount now holds every piece in its cache; with the libtorrent seeder gone, a second
    // libtorrent can only get them from the mount.
    drop(lt_seed);
    let mount_addr = m.listen_addr.expect("mount printed its listen address");
    let (mut lt, _) = libtorrent(
        "download",
        &t,
        &tmp.path().join("dst"),
        &tmp.path().join("lt-dl.log"),
        &["--peer".into(), mount_addr.to_string()],
    );
    lt.wait_line("done", Duration::from_secs(120));
    assert_same_tree(&tmp.path().join("src/set"), &tmp.path().join("dst/set"));
}
