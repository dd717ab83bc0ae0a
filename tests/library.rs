//! One mount, many torrents (issue 10): sources side by side at the root, a watched directory,
//! torrents added and removed at runtime through `.swarmfs/`, and EROFS for every other write.
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Watchdog for anything that waits on the mount (not a timing claim).
const WATCHDOG: Duration = Duration::from_secs(60);

struct Seeded {
    torrent: PathBuf,
    src: PathBuf,
    addr: std::net::SocketAddr,
    info_hash: String,
    _seed: Proc,
}

/// A torrent of `name` (a directory of two files, or one file when `single`), seeded.
fn seeded(tmp: &Path, name: &str, single: bool, len: usize, seed: u64) -> Seeded {
    let base = tmp.join(format!("src-{name}"));
    let src = base.join(name);
    if single {
        write_file(&src, len, seed);
    } else {
        write_file(&src.join("a.bin"), len, seed);
        write_file(&src.join("sub/b.txt"), 3000, seed + 1);
    }
    let torrent = tmp.join(format!("{name}.torrent"));
    create_torrent(&src, &torrent, &[]);
    let json = run_ok(Command::new(bin()).arg("info").arg("--json").arg(&torrent));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let info_hash = v["info_hash"].as_str().unwrap().to_string();
    let (seed, addr) = seeder(&base, &torrent, &tmp.join(format!("seed-{name}.log")), &[]);
    Seeded {
        torrent,
        src,
        addr,
        info_hash,
        _seed: seed,
    }
}

/// `swarmfs mount -f SOURCES... MNT` on 127.0.0.1 without the DHT, dialling every `peers`
/// seeder, with `extra` options and `XDG_RUNTIME_DIR` if given; running once it says "mounted".
fn mount(
    sources: &[&Path],
    mnt: &Path,
    peers: &[&Seeded],
    extra: &[&str],
    runtime_dir: Option<&Path>,
    log: &Path,
) -> Proc {
    std::fs::create_dir_all(mnt).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("-f")
        .args(sources)
        .arg(mnt)
        .args(["--listen", "127.0.0.1:0", "--no-dht"])
        .args(extra)
        .env("RUST_LOG", "swarmfs=info");
    for s in peers {
        cmd.args(["--peer", &s.addr.to_string()]);
    }
    if let Some(dir) = runtime_dir {
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
    let mut p = Proc::spawn("mount", &mut cmd, log);
    p.wait_line("mounted ", WATCHDOG);
    p
}

fn visible_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Waits (watchdog) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool + Send + 'static) {
    with_watchdog(WATCHDOG, what, move || {
        while !f() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

fn same_tree(mounted: &Path, original: &Path) {
    let m = mounted.to_path_buf();
    let o = original.to_path_buf();
    with_watchdog(WATCHDOG, "reading a tree through the mount", move || {
        if o.is_file() {
            assert_eq!(sha256_file(&m), sha256_file(&o), "{}", m.display());
        } else {
            assert_same_tree(&m, &o);
        }
    });
}

fn status(mnt: &Path) -> String {
    std::fs::read_to_string(mnt.join(".swarmfs/status")).unwrap()
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn a_library_of_torrents_grows_and_shrinks_at_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let alpha = seeded(t, "alpha", false, 300_000, 1);
    let beta = seeded(t, "beta.bin", true, 200_000, 2);
    let gamma = seeded(t, "gamma", false, 100_000, 3);
    let delta = seeded(t, "delta", true, 4 << 20, 4);
    let eps = seeded(t, "eps", false, 150_000, 5);
    let zeta = seeded(t, "zeta", true, 50_000, 6);
    // A watched directory holding gamma's torrent.
    let watched = t.join("watched");
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::copy(&gamma.torrent, watched.join("gamma.torrent")).unwrap();

    let mnt = t.join("mnt");
    let mut mount = mount(
        &[&alpha.torrent, &beta.torrent, &watched],
        &mnt,
        &[&alpha, &beta, &gamma, &delta, &zeta],
        &[],
        None,
        &t.join("mount.log"),
    );
    let _guard = Unmount(mnt.clone());

    // Three sources, side by side, each under its name; the control directory is hidden.
    assert_eq!(visible_names(&mnt), ["alpha", "beta.bin", "gamma"]);
    assert!(mnt.join(".swarmfs/add").is_dir());
    same_tree(&mnt.join("alpha"), &alpha.src);
    same_tree(&mnt.join("beta.bin"), &beta.src);
    same_tree(&mnt.join("gamma"), &gamma.src);

    // Added by copying its .torrent into add/: there when cp returns.
    run_ok(
        Command::new("cp")
            .arg(&delta.torrent)
            .arg(mnt.join(".swarmfs/add/")),
    );
    assert_eq!(visible_names(&mnt), ["alpha", "beta.bin", "delta", "gamma"]);
    // Added by writing a magnet link there: there once its metadata is fetched.
    let link = format!("magnet:?xt=urn:btih:{}&x.pe={}\n", eps.info_hash, eps.addr);
    std::fs::write(mnt.join(".swarmfs/add/eps-link"), link).unwrap();
    let m = mnt.clone();
    eventually("the magnet's files to appear", move || {
        m.join("eps").exists()
    });
    same_tree(&mnt.join("eps"), &eps.src);
    // A magnet nobody has yet: listed as fetching in status until its metadata comes.
    let nobody = format!("magnet:?xt=urn:btih:{}&dn=nowhere", "5a".repeat(20));
    std::fs::write(mnt.join(".swarmfs/add/nowhere"), nobody).unwrap();
    let m = mnt.clone();
    eventually("status to list the magnet as fetching", move || {
        status(&m)
            .lines()
            .any(|l| l.starts_with("fetching nowhere"))
    });
    // An info-hash already mounted changes nothing, and says so.
    run_ok(
        Command::new("cp")
            .arg(&alpha.torrent)
            .arg(mnt.join(".swarmfs/add/again.torrent")),
    );
    assert!(
        status(&mnt).contains("already mounted as alpha"),
        "{}",
        status(&mnt)
    );

    // A bad .torrent: the close fails with EINVAL, status has the error, nothing else changes.
    let bad = t.join("bad.torrent");
    std::fs::write(&bad, b"d4:infod4:name3:badee").unwrap();
    let out = Command::new("cp")
        .arg(&bad)
        .arg(mnt.join(".swarmfs/add/"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Invalid argument"), "{stderr}");
    let st = status(&mnt);
    assert!(st.contains("error: add/bad.torrent"), "{st}");
    assert_eq!(
        visible_names(&mnt),
        ["alpha", "beta.bin", "delta", "eps", "gamma"]
    );
    for name in ["alpha", "beta.bin", "delta", "eps", "gamma"] {
        assert!(st.lines().any(|l| l.starts_with(name)), "{name}: {st}");
    }
    assert!(st.contains("total (5 torrents)"), "{st}");
    // torrents/ holds one entry per torrent: its magnet link.
    let entry = std::fs::read_to_string(mnt.join(".swarmfs/torrents/delta")).unwrap();
    assert!(entry.starts_with("magnet:?xt=urn:btih:"), "{entry}");
    assert!(entry.contains(&delta.info_hash), "{entry}");

    // Every other write is EROFS.
    let erofs = Some(libc::EROFS);
    assert_eq!(errno(std::fs::write(mnt.join("new"), b"x")), erofs);
    assert_eq!(errno(std::fs::create_dir(mnt.join("alpha/d"))), erofs);
    assert_eq!(errno(std::fs::remove_file(mnt.join("alpha/a.bin"))), erofs);
    assert_eq!(
        errno(std::fs::rename(
            mnt.join("alpha/a.bin"),
            mnt.join("alpha/c")
        )),
        erofs
    );
    assert_eq!(
        errno(
            std::fs::OpenOptions::new()
                .write(true)
                .open(mnt.join("beta.bin"))
        ),
        erofs
    );
    assert_eq!(errno(std::fs::remove_dir(mnt.join("gamma/sub"))), erofs);

    // A torrent removed while one of its files is open: its reads fail with EIO, the handle
    // stays valid until closed.
    let open = std::fs::File::open(mnt.join("delta")).unwrap();
    let mut head = [0u8; 4096];
    open.read_exact_at(&mut head, 0).unwrap();
    std::fs::remove_file(mnt.join(".swarmfs/torrents/delta")).unwrap();
    let mut far = [0u8; 4096];
    assert_eq!(
        open.read_exact_at(&mut far, 3 << 20)
            .err()
            .and_then(|e| e.raw_os_error()),
        Some(libc::EIO)
    );
    drop(open);
    assert!(!mnt.join(".swarmfs/torrents/delta").exists());
    let m = mnt.clone();
    eventually("delta to leave the root", move || {
        !visible_names(&m).contains(&"delta".to_string())
    });

    // The watched directory: a new .torrent appears, a removed one takes its torrent along.
    std::fs::copy(&zeta.torrent, watched.join("zeta.torrent")).unwrap();
    std::fs::remove_file(watched.join("gamma.torrent")).unwrap();
    let m = mnt.clone();
    eventually("zeta in, gamma out", move || {
        visible_names(&m) == ["alpha", "beta.bin", "eps", "zeta"]
    });
    same_tree(&mnt.join("zeta"), &zeta.src);

    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
}

/// Lazily unmounts on drop, if a failed assertion left the mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mountpoint(&self.0) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.0).status();
        }
    }
}

#[test]
fn two_torrents_of_one_name_are_told_apart_and_a_write_elsewhere_is_erofs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let one = seeded(&t.join("1"), "same.bin", true, 40_000, 7);
    let two = seeded(&t.join("2"), "same.bin", true, 50_000, 8);
    let mnt = t.join("mnt");
    let mut mount = mount(
        &[&one.torrent, &two.torrent],
        &mnt,
        &[&one, &two],
        &[],
        None,
        &t.join("mount.log"),
    );
    let _guard = Unmount(mnt.clone());
    let tagged = format!("same-{}.bin", &two.info_hash[..8]);
    let mut both = vec!["same.bin".to_string(), tagged.clone()];
    both.sort();
    assert_eq!(visible_names(&mnt), both);
    same_tree(&mnt.join("same.bin"), &one.src);
    same_tree(&mnt.join(&tagged), &two.src);
    assert_eq!(
        errno(std::fs::write(mnt.join(".swarmfs/status"), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::write(mnt.join(".swarmfs/torrents/x"), b"x")),
        Some(libc::EROFS)
    );
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
}

#[test]
fn swarmfs_add_remove_and_status_talk_to_the_mount_and_refuse_other_users() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let one = seeded(t, "one", false, 100_000, 9);
    let two = seeded(t, "two.bin", true, 120_000, 10);
    // The sockets' directory: reachable by anyone, so only the uid check can refuse `nobody`.
    let runtime = t.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [t, runtime.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mnt = t.join("mnt");
    let mut mount = mount(
        &[&one.torrent],
        &mnt,
        &[&one, &two],
        &[],
        Some(&runtime),
        &t.join("mount.log"),
    );
    let _guard = Unmount(mnt.clone());
    let swarmfs = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(bin());
        c.args(args).env("XDG_RUNTIME_DIR", &runtime);
        c
    };
    let m = mnt.as_os_str();

    let out = run_ok(&mut swarmfs(&["add".as_ref(), m, two.torrent.as_os_str()]));
    assert_eq!(out.trim(), "mounted two.bin");
    assert_eq!(visible_names(&mnt), ["one", "two.bin"]);
    same_tree(&mnt.join("two.bin"), &two.src);
    let out = run_ok(&mut swarmfs(&["add".as_ref(), m, two.torrent.as_os_str()]));
    assert!(out.contains("already mounted as two.bin"), "{out}");

    let status = run_ok(&mut swarmfs(&["status".as_ref(), m]));
    assert!(status.lines().any(|l| l.starts_with("one ")), "{status}");
    assert!(
        status.lines().any(|l| l.starts_with("two.bin ")),
        "{status}"
    );
    assert!(status.contains("total (2 torrents)"), "{status}");
    // Without a mountpoint: every mount of this user.
    let all = run_ok(&mut swarmfs(&["status".as_ref()]));
    assert!(all.contains(&format!("{}:", mnt.display())), "{all}");

    let out = run_ok(&mut swarmfs(&["remove".as_ref(), m, "two.bin".as_ref()]));
    assert_eq!(out.trim(), "removed two.bin");
    let mm = mnt.clone();
    eventually("two.bin to leave the root", move || {
        visible_names(&mm) == ["one"]
    });
    let out = swarmfs(&["remove".as_ref(), m, "nothing".as_ref()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no torrent called \"nothing\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another user reaches the socket (its directory and the socket let anyone in) and is
    // refused by uid.
    let dir = runtime.join("swarmfs");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(bin())
        .arg("status")
        .arg(&mnt)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refused: uid 65534"), "{stderr}");
    assert_eq!(visible_names(&mnt), ["one"]);

    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
}

/// The counts of `user.swarmfs.peers` (`direct=1 tracker=0 ...`), summed.
fn connected_peers(top: &Path) -> u64 {
    let v = run_ok(
        Command::new("getfattr")
            .args(["--only-values", "-n", "user.swarmfs.peers"])
            .arg(top),
    );
    v.split_whitespace()
        .filter(|kv| !kv.starts_with("dht_nodes="))
        .filter_map(|kv| kv.split('=').nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_idle_torrent_closes_its_connections_and_a_read_wakes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let big = seeded(t, "big.bin", true, 4 << 20, 11);
    let mnt = t.join("mnt");
    let log = t.join("mount.log");
    // A cache of 4 pieces: most of the file must come from the swarm after waking.
    let mut mount = mount(
        &[&big.torrent],
        &mnt,
        &[&big],
        &["--idle-timeout", "1", "--cache-size", "1MiB"],
        None,
        &log,
    );
    let _guard = Unmount(mnt.clone());
    let file = mnt.join("big.bin");
    let mut head = [0u8; 4096];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(&head[..], &std::fs::read(&big.src).unwrap()[..4096]);
    let f = file.clone();
    eventually("the idle torrent's connections to close", move || {
        connected_peers(&f) == 0
    });
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("big.bin: idle"));
    same_tree(&file, &big.src);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("big.bin: woken"), "{text}");
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
}

#[test]
fn a_data_dir_brings_the_same_torrents_back_on_the_next_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let first = seeded(t, "first", false, 90_000, 12);
    let second = seeded(t, "second.bin", true, 70_000, 13);
    let data = t.join("data");
    let mnt = t.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let data_arg = data.to_str().unwrap().to_owned();
    let start = |sources: &[&Path], log: &str| {
        let extra = ["-d", data_arg.as_str()];
        mount(
            sources,
            &mnt,
            &[&first, &second],
            &extra,
            None,
            &t.join(log),
        )
    };
    let mut mount = start(&[first.torrent.as_path()], "mount1.log");
    let guard = Unmount(mnt.clone());
    run_ok(
        Command::new("cp")
            .arg(&second.torrent)
            .arg(mnt.join(".swarmfs/add/")),
    );
    assert_eq!(visible_names(&mnt), ["first", "second.bin"]);
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
    drop(guard);

    // No source this time: the data dir's library brings both back, with the same names.
    let mut mount = start(&[], "mount2.log");
    let _guard = Unmount(mnt.clone());
    assert_eq!(visible_names(&mnt), ["first", "second.bin"]);
    same_tree(&mnt.join("first"), &first.src);
    same_tree(&mnt.join("second.bin"), &second.src);
    // Removing one forgets it for the next mount too.
    std::fs::remove_file(mnt.join(".swarmfs/torrents/second.bin")).unwrap();
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
    let mut mount = start(&[], "mount3.log");
    assert_eq!(visible_names(&mnt), ["first"]);
    // The data stays under -d.
    assert!(data.join("second.bin").is_file());
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(mount.wait_exit(WATCHDOG).success(), "{}", mount.stderr());
}

#[test]
fn a_100000_file_torrent_lists_and_finds_every_name() {
    use swarmfs::core::metainfo::{build_torrent, TorrentContent, TorrentSpec};
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // 100,000 one-byte files in 1,000 directories; the first directory holds a tenth of them.
    let mut files: Vec<(Vec<String>, u64)> = Vec::with_capacity(100_000);
    for i in 0..100_000u32 {
        let dir = if i < 10_000 {
            0
        } else {
            1 + (i - 10_000) % 999
        };
        files.push((vec![format!("dir{dir:04}"), format!("f{i:06}")], 1));
    }
    files.sort();
    let expected: Vec<String> = std::iter::once("huge".to_string())
        .chain((0..1000).map(|d| format!("huge/dir{d:04}")))
        .chain(files.iter().map(|(p, _)| format!("huge/{}", p.join("/"))))
        .collect();
    let piece_length = 16 * 1024u32;
    let pieces = 100_000u64.div_ceil(piece_length as u64) as usize;
    let bytes = build_torrent(&TorrentSpec {
        name: "huge".into(),
        content: TorrentContent::Directory { files },
        piece_length,
        piece_hashes: vec![[0; 20]; pieces],
        trackers: Vec::new(),
        private: false,
        comment: None,
        created_by: None,
        creation_date: None,
    })
    .unwrap();
    let torrent = t.join("huge.torrent");
    std::fs::write(&torrent, bytes).unwrap();
    // Listing needs no piece data: no seeder.
    let mnt = t.join("mnt");
    let mut m = Mount::start(&torrent, &mnt, &t.join("mount.log"), &[]);
    let root = mnt.clone();
    let found = with_watchdog(Duration::from_secs(120), "find", move || {
        run_ok(Command::new("find").arg("huge").current_dir(&root))
    });
    let mut found: Vec<String> = found.lines().map(str::to_owned).collect();
    found.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(found.len(), 101_001);
    assert!(
        found == expected,
        "find lists other names than the torrent's"
    );
    let biggest = mnt.join("huge/dir0000");
    let listed = with_watchdog(Duration::from_secs(120), "ls -f", move || {
        run_ok(Command::new("ls").arg("-1f").arg(&biggest))
    });
    // 10,000 files, "." and "..".
    assert_eq!(listed.lines().count(), 10_002);
    m.unmount();
    assert!(m.proc.wait_exit(WATCHDOG).success());
}
