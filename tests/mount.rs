//! Real FUSE mounts of torrents seeded on 127.0.0.1.
mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

/// A data set with the awkward cases: empty and 1-byte files, a file ending mid-piece, one
/// spanning many pieces, unicode and spaces in names, nesting.
fn awkward_set(root: &Path) {
    write_file(&root.join("empty"), 0, 1);
    write_file(&root.join("one byte"), 1, 2);
    write_file(&root.join("mid piece.bin"), 262_144 + 1000, 3);
    write_file(&root.join("many/pieces.bin"), 9 * 262_144 + 77, 4);
    write_file(&root.join("ünïcödé/日本語 name.txt"), 5000, 5);
    write_file(&root.join("many/deep/er/small"), 100, 6);
}

struct Swarm {
    tmp: tempfile::TempDir,
    torrent: std::path::PathBuf,
    seed: Option<Proc>,
    peer: String,
}

fn swarm_of(name: &str, build: impl FnOnce(&Path)) -> Swarm {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("src").join(name);
    build(&root);
    let torrent = tmp.path().join(format!("{name}.torrent"));
    create_torrent(&root, &torrent, &[]);
    let (seed, addr) = seeder(
        &tmp.path().join("src"),
        &torrent,
        &tmp.path().join("seed.log"),
        &[],
    );
    Swarm {
        torrent,
        seed: Some(seed),
        peer: addr.to_string(),
        tmp,
    }
}

#[test]
fn every_file_reads_correctly_through_the_mount() {
    let s = swarm_of("set", awkward_set);
    let mnt = s.tmp.path().join("mnt");
    let mut m = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount.log"),
        &["--peer", &s.peer],
    );
    let src = s.tmp.path().join("src/set");
    let mnt_set = mnt.join("set");
    let (src2, mnt2) = (src.clone(), mnt_set.clone());
    with_watchdog(Duration::from_secs(120), "reading the tree", move || {
        let mut want = files_under(&src2);
        let mut got = files_under(&mnt2);
        want.sort();
        got.sort();
        assert_eq!(want, got);
        for rel in want {
            assert_eq!(
                sha256_file(&src2.join(&rel)),
                sha256_file(&mnt2.join(&rel)),
                "{}",
                rel.display()
            );
        }
    });
    // Attributes: read-only files with exact sizes.
    let meta = std::fs::metadata(mnt_set.join("mid piece.bin")).unwrap();
    assert_eq!(meta.len(), 262_144 + 1000);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert!(
        std::fs::write(mnt_set.join("one byte"), b"x").is_err(),
        "mount must be read-only"
    );
    // Extended attributes.
    let out = run_ok(
        Command::new("getfattr")
            .args(["--only-values", "-n", "user.swarmfs.progress"])
            .arg(mnt_set.join("many/pieces.bin")),
    );
    assert_eq!(out.trim(), "1.0000");
    let out = run_ok(
        Command::new("getfattr")
            .args(["--only-values", "-n", "user.swarmfs.pieces"])
            .arg(mnt_set.join("empty")),
    );
    // A 0-byte file covers no piece.
    assert_eq!(out.trim(), "none");
    // `cp -r` of the tree.
    let copy = s.tmp.path().join("copy");
    run_ok(Command::new("cp").arg("-r").arg(&mnt_set).arg(&copy));
    assert_same_tree(&src, &copy);
    m.unmount();
    let status = m.proc.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "mount exited with {status}: {}",
        m.proc.stderr()
    );
    assert!(!is_mountpoint(&mnt));
}

#[test]
fn random_preads_match_the_original() {
    let s = swarm_of("rand", |root| {
        write_file(&root.join("data.bin"), 7 * 1024 * 1024 + 333, 9)
    });
    let mnt = s.tmp.path().join("mnt");
    let _m = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount.log"),
        &["--peer", &s.peer],
    );
    let orig = data(7 * 1024 * 1024 + 333, 9);
    let path = mnt.join("rand/data.bin");
    with_watchdog(Duration::from_secs(120), "random reads", move || {
        let f = std::fs::File::open(&path).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..200 {
            let off = rng.gen_range(0..orig.len() as u64);
            let len = rng.gen_range(1..300_000usize);
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off).unwrap();
            let end = (off as usize + len).min(orig.len());
            assert_eq!(n, end - off as usize, "short read at {off}");
            assert!(
                buf[..n] == orig[off as usize..end],
                "wrong bytes at {off}+{len}"
            );
        }
    });
}

#[test]
fn concurrent_readers_progress_independently() {
    let s = swarm_of("two", |root| {
        write_file(&root.join("a.bin"), 6 * 1024 * 1024, 11);
        write_file(&root.join("b.bin"), 6 * 1024 * 1024 + 5, 12);
    });
    let mnt = s.tmp.path().join("mnt");
    let _m = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount.log"),
        &["--peer", &s.peer],
    );
    let readers: Vec<_> = [
        ("a.bin", 11u64, 6 * 1024 * 1024),
        ("b.bin", 12, 6 * 1024 * 1024 + 5),
        ("a.bin", 11, 6 * 1024 * 1024),
    ]
    .into_iter()
    .map(|(name, seed, len)| {
        let p = mnt.join("two").join(name);
        std::thread::spawn(move || {
            let got = std::fs::read(&p).unwrap();
            assert!(got == data(len, seed), "{name} differs");
        })
    })
    .collect();
    with_watchdog(Duration::from_secs(120), "three readers", move || {
        for r in readers {
            r.join().unwrap();
        }
    });
}

#[test]
fn small_cache_reads_large_file_within_memory_bound_and_writes_nothing() {
    let s = swarm_of("big", |root| {
        write_file(&root.join("big.bin"), 64 * 1024 * 1024, 21)
    });
    let mnt = s.tmp.path().join("mnt");
    let m = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount.log"),
        &["--peer", &s.peer, "--cache-size", "4MiB"],
    );
    let before = m.write_bytes();
    let p = mnt.join("big/big.bin");
    let sum = with_watchdog(Duration::from_secs(180), "reading 64 MiB", move || {
        sha256_file(&p)
    });
    assert_eq!(sum, sha256(&data(64 * 1024 * 1024, 21)));
    let rss = m.peak_rss();
    assert!(
        rss < (4 + 40) << 20,
        "peak RSS {} MiB over cache + 40 MiB",
        rss >> 20
    );
    let written = m.write_bytes() - before;
    assert!(
        written < 1 << 20,
        "mount wrote {written} bytes to disk without --data-dir"
    );
}

#[test]
fn data_dir_resumes_without_any_seeder() {
    let mut s = swarm_of("keep", |root| {
        write_file(&root.join("x.bin"), 3 * 1024 * 1024 + 10, 31);
        write_file(&root.join("y/z.bin"), 500_000, 32);
    });
    let mnt = s.tmp.path().join("mnt");
    let data_dir = s.tmp.path().join("data");
    let mut m = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount1.log"),
        &["--peer", &s.peer, "-d", data_dir.to_str().unwrap()],
    );
    let (a, b) = (mnt.join("keep"), s.tmp.path().join("src/keep"));
    with_watchdog(Duration::from_secs(120), "first read", move || {
        assert_same_tree(&b, &a)
    });
    // With a data dir everything is fetched; the files on disk become complete.
    let (dd, src) = (data_dir.join("keep"), s.tmp.path().join("src/keep"));
    with_watchdog(
        Duration::from_secs(120),
        "data dir complete",
        move || loop {
            if files_under(&dd).len() == 2
                && std::fs::read(dd.join("x.bin")).ok() == std::fs::read(src.join("x.bin")).ok()
                && std::fs::read(dd.join("y/z.bin")).ok() == std::fs::read(src.join("y/z.bin")).ok()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        },
    );
    m.unmount();
    assert!(m.proc.wait_exit(Duration::from_secs(10)).success());
    drop(s.seed.take());
    let _m2 = Mount::start(
        &s.torrent,
        &mnt,
        &s.tmp.path().join("mount2.log"),
        &["-d", data_dir.to_str().unwrap(), "--read-timeout", "20"],
    );
    let (a, b) = (mnt.join("keep"), s.tmp.path().join("src/keep"));
    with_watchdog(Duration::from_secs(60), "read from disk", move || {
        assert_same_tree(&b, &a)
    });
}

/// A torrent nobody seeds: reads block until a signal, an unmount or the read timeout.
fn unseeded() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    write_file(&tmp.path().join("src/lonely.bin"), 1024 * 1024, 41);
    let t = tmp.path().join("lonely.torrent");
    create_torrent(&tmp.path().join("src/lonely.bin"), &t, &[]);
    (tmp, t)
}

fn blocked_reader(path: std::path::PathBuf) -> std::sync::mpsc::Receiver<std::io::Result<usize>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&path).and_then(|f| {
            let mut buf = vec![0u8; 4096];
            f.read_at(&mut buf, 0)
        });
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn sigterm_fails_a_blocked_read_with_eio_and_exits_cleanly() {
    let (tmp, t) = unseeded();
    let mnt = tmp.path().join("mnt");
    let mut m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &["--read-timeout", "600"],
    );
    let rx = blocked_reader(mnt.join("lonely.bin"));
    // The read must still be blocked (no peer has the piece).
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "read returned without data"
    );
    m.proc.signal(libc::SIGTERM);
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watchdog: read still blocked 30 s after SIGTERM");
    let err = r.expect_err("read should fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let status = m.proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", m.proc.stderr());
    assert!(!is_mountpoint(&mnt), "mount left behind");
}

#[test]
fn lazy_unmount_and_read_timeout_end_a_blocked_read() {
    let (tmp, t) = unseeded();
    let mnt = tmp.path().join("mnt");
    let mut m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &["--read-timeout", "3"],
    );
    let rx = blocked_reader(mnt.join("lonely.bin"));
    assert!(
        rx.recv_timeout(Duration::from_millis(1000)).is_err(),
        "read returned without data"
    );
    // A busy mount cannot be unmounted plainly.
    let plain = Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain unmount of a busy mount succeeded"
    );
    run_ok(Command::new("fusermount3").arg("-uz").arg(&mnt));
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watchdog: read blocked past --read-timeout");
    assert_eq!(
        r.expect_err("read should fail").raw_os_error(),
        Some(libc::EIO)
    );
    let status = m.proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", m.proc.stderr());
}

#[test]
fn background_mount_is_live_when_the_command_returns() {
    let s = swarm_of("bg", |root| write_file(&root.join("f.txt"), 1000, 51));
    let mnt = s.tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&s.torrent)
        .arg(&mnt)
        .args(["--listen", "127.0.0.1:0", "--no-dht", "--peer", &s.peer])
        .arg("--log-file")
        .arg(s.tmp.path().join("bg.log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No waiting: the mount is there as soon as the command returned (`.swarmfs`, the control
    // directory, is hidden as dot files are).
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".swarmfs")
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("bg")]);
    let p = mnt.join("bg/f.txt");
    let got = with_watchdog(Duration::from_secs(60), "read", move || {
        std::fs::read(p).unwrap()
    });
    assert!(got == data(1000, 51));
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(!is_mountpoint(&mnt));
}

#[test]
fn bad_input_gives_one_clear_line_and_no_mount() {
    let (tmp, t) = unseeded();
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![t.clone().into(), tmp.path().join("nope").into()],
            "does not exist",
        ),
        (
            vec![t.clone().into(), tmp.path().join("src/lonely.bin").into()],
            "not a directory",
        ),
        (
            vec![t.clone().into(), tmp.path().join("src").into()],
            "not empty",
        ),
        (
            vec![tmp.path().join("src/lonely.bin").into(), tmp.path().into()],
            "not a valid torrent",
        ),
        (
            vec![tmp.path().join("missing.torrent").into(), tmp.path().into()],
            "cannot read",
        ),
    ];
    for (args, expect) in cases {
        let out = Command::new(bin())
            .arg("mount")
            .args(&args)
            .arg("--no-dht")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err:?}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: more than one line: {err}"
        );
    }
}

#[test]
fn a_dead_mountpoint_gets_a_message_naming_fusermount() {
    let (tmp, t) = unseeded();
    let mnt = tmp.path().join("mnt");
    let mut m = Mount::start(&t, &mnt, &tmp.path().join("mount.log"), &[]);
    // A crash: the process dies without unmounting.
    m.proc.signal(libc::SIGKILL);
    m.proc.wait_exit(Duration::from_secs(10));
    let out = Command::new(bin())
        .arg("mount")
        .arg(&t)
        .arg(&mnt)
        .arg("--no-dht")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("fusermount -u"), "{err}");
}

#[test]
fn a_second_mount_of_the_same_data_dir_is_refused() {
    let s = swarm_of("locked", |root| {
        write_file(&root.join("f.bin"), 100_000, 61)
    });
    let data_dir = s.tmp.path().join("data");
    let mnt1 = s.tmp.path().join("mnt1");
    let _m = Mount::start(
        &s.torrent,
        &mnt1,
        &s.tmp.path().join("m1.log"),
        &["--peer", &s.peer, "-d", data_dir.to_str().unwrap()],
    );
    let mnt2 = s.tmp.path().join("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&s.torrent)
        .arg(&mnt2)
        .args([
            "-d",
            data_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-dht",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "second mount of the same data dir succeeded"
    );
    assert!(err.contains("in use by another swarmfs"), "{err}");
    assert!(!is_mountpoint(&mnt2));
}

#[test]
fn a_full_data_dir_degrades_to_memory_and_reads_stay_correct() {
    let s = swarm_of("full", |root| {
        write_file(&root.join("f.bin"), 6 * 1024 * 1024, 62)
    });
    // A 1 MiB filesystem for a 6 MiB torrent: writes fail with ENOSPC part way.
    let data_dir = s.tmp.path().join("tiny");
    std::fs::create_dir_all(&data_dir).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&data_dir),
    );
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Umount(data_dir.clone());
    let mnt = s.tmp.path().join("mnt");
    let log = s.tmp.path().join("mount.log");
    let m = Mount::start(
        &s.torrent,
        &mnt,
        &log,
        &["--peer", &s.peer, "-d", data_dir.to_str().unwrap()],
    );
    let p = mnt.join("full/f.bin");
    let got = with_watchdog(
        Duration::from_secs(120),
        "read with a full data dir",
        move || std::fs::read(p).unwrap(),
    );
    assert!(
        got == data(6 * 1024 * 1024, 62),
        "wrong bytes with a full data dir"
    );
    assert!(
        m.proc.stderr().contains("continuing in memory only"),
        "no warning: {}",
        m.proc.stderr()
    );
}

#[test]
fn readdir_of_a_20000_file_directory_lists_every_name_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 20_000;
    let root = tmp.path().join("src/many");
    std::fs::create_dir_all(&root).unwrap();
    // Long names of many lengths: about 2.5 MiB of entries, so the listing spans several of the
    // kernel's readdir requests (up to 1 MiB each) and resumes mid-directory at uneven offsets.
    let names: Vec<String> = (0..n)
        // At most 236 bytes: libtorrent (and so swarmfs) cut a component at 240.
        .map(|i| format!("{i:05}-{}", "n".repeat(i % 231)))
        .collect();
    for name in &names {
        std::fs::write(root.join(name), b"x").unwrap();
    }
    let torrent = tmp.path().join("many.torrent");
    create_torrent(&root, &torrent, &["--piece-length", "16KiB"]);
    // Listing needs no piece data, so no seeder.
    let mnt = tmp.path().join("mnt");
    let mut m = Mount::start(&torrent, &mnt, &tmp.path().join("mount.log"), &[]);
    let listed_dir = mnt.join("many");
    let (listed, ls_order) = with_watchdog(Duration::from_secs(120), "listing", move || {
        // Each entry's attributes too (readdirplus hands them over with the names).
        let mut listed: Vec<String> = std::fs::read_dir(&listed_dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                assert!(
                    meta.is_file() && meta.len() == 1,
                    "{:?}: {meta:?}",
                    e.path()
                );
                e.file_name().into_string().unwrap()
            })
            .collect();
        listed.sort();
        // `ls -f`: directory order, "." and ".." included.
        let ls = run_ok(Command::new("ls").arg("-1f").arg(&listed_dir));
        (listed, ls.lines().map(str::to_owned).collect::<Vec<_>>())
    });
    let mut expected = names;
    expected.sort();
    assert_eq!(listed.len(), n, "read_dir returned {} names", listed.len());
    assert!(
        listed == expected,
        "read_dir names differ from the torrent's"
    );
    // Our order: ".", "..", then the names sorted byte-wise.
    let dots = [".".to_string(), "..".to_string()];
    assert!(
        ls_order.len() == n + 2 && ls_order[..2] == dots && ls_order[2..] == expected[..],
        "ls -f listed {} entries, first {:?}",
        ls_order.len(),
        &ls_order[..ls_order.len().min(4)]
    );
    m.unmount();
    let status = m.proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", m.proc.stderr());
}
