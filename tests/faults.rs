//! Faults around a mount (issue 9): seeders dying mid-read, a swarm with no seeder until one
//! returns, a data dir damaged between runs, and the mountpoint's parent moved away.
mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const PIECE: usize = 256 * 1024;

/// Drops `path`'s pages from the kernel's cache, so the next read reaches the mount.
fn forget_cached(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a valid open descriptor; fadvise only drops clean cached pages.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

/// Two throttled seeders; one is killed while a read is under way and the read completes from
/// the other. Then the other dies too: a read fails with EIO after `--read-timeout`, and
/// succeeds once a seeder is back at the address the mount was given.
#[test]
fn reads_outlive_a_dying_seeder_and_wait_for_one_to_return() {
    const LEN: usize = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("churn.bin"), LEN, 91);
    let original = std::fs::read(src.join("churn.bin")).unwrap();
    let t = tmp.path().join("churn.torrent");
    create_torrent(&src.join("churn.bin"), &t, &["--piece-length", "256KiB"]);
    let caps = ["--upload-rate", "2MiB"];
    let (doomed, a) = seeder(&src, &t, &tmp.path().join("seed-a.log"), &caps);
    let (mut other, b) = seeder(&src, &t, &tmp.path().join("seed-b.log"), &caps);
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &[
            "--peer",
            &a.to_string(),
            "--peer",
            &b.to_string(),
            "--cache-size",
            "1MiB",
            "--read-timeout",
            "3",
        ],
    );
    let file = mnt.join("churn.bin");
    let reader = {
        let file = file.clone();
        std::thread::spawn(move || std::fs::read(file))
    };
    // Midway (the whole read takes about 2 s at the two seeders' 4 MiB/s).
    std::thread::sleep(Duration::from_millis(700));
    doomed.signal(libc::SIGKILL);
    let got = with_watchdog(
        Duration::from_secs(120),
        "read after a seeder died",
        move || reader.join().unwrap(),
    )
    .expect("the read completes from the other seeder");
    assert!(got == original, "wrong bytes after a seeder died");

    other.signal(libc::SIGKILL);
    other.wait_exit(Duration::from_secs(30));
    forget_cached(&file);
    let f = file.clone();
    let err = with_watchdog(Duration::from_secs(60), "read with no seeder", move || {
        read_at(&f, 0, 4096)
    })
    .expect_err("no seeder: the read fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // A seeder comes back where the mount was told to look; the mount dials it again.
    let (_back, _) = seeder(
        &src,
        &t,
        &tmp.path().join("seed-b2.log"),
        &["--listen", &b.to_string()],
    );
    let f = file.clone();
    let head = with_watchdog(
        Duration::from_secs(120),
        "read once a seeder is back",
        move || {
            let started = Instant::now();
            loop {
                match read_at(&f, 0, 4096) {
                    Ok(bytes) => return bytes,
                    // Until the mount has reconnected (explicit peers are retried every 5 s).
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        assert!(
                            started.elapsed() < Duration::from_secs(60),
                            "never reconnected"
                        );
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        },
    );
    assert_eq!(head, original[..4096]);
    assert!(m.is_mounted());
}

/// A data dir truncated and corrupted between runs: the next mount verifies it again, fetches
/// what is missing or wrong, and leaves the file whole.
#[test]
fn a_damaged_data_dir_is_verified_again_and_repaired() {
    const LEN: usize = 4 * PIECE + 1234;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("fix.bin"), LEN, 92);
    let original = std::fs::read(src.join("fix.bin")).unwrap();
    let t = tmp.path().join("fix.torrent");
    create_torrent(&src.join("fix.bin"), &t, &["--piece-length", "256KiB"]);
    let (_seed, addr) = seeder(&src, &t, &tmp.path().join("seed.log"), &[]);
    let data_dir = tmp.path().join("data");
    let mut d = download(
        &t,
        &data_dir,
        &tmp.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    assert!(
        d.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        d.stderr()
    );
    // Damage: one byte of piece 0 flipped, and the file cut in the middle of piece 2.
    let on_disk = data_dir.join("fix.bin");
    let mut damaged = std::fs::read(&on_disk).unwrap();
    damaged[1000] ^= 0xFF;
    damaged.truncate(2 * PIECE + 77);
    std::fs::write(&on_disk, &damaged).unwrap();

    let mnt = tmp.path().join("mnt");
    let mut m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &[
            "--peer",
            &addr.to_string(),
            "-d",
            data_dir.to_str().unwrap(),
        ],
    );
    let p = mnt.join("fix.bin");
    let got = with_watchdog(
        Duration::from_secs(120),
        "read of the damaged data",
        move || {
            let mut f = std::fs::File::open(p).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            v
        },
    );
    assert!(got == original, "wrong bytes through a damaged data dir");
    // Everything is fetched with a data dir; once complete, unmount and look at the file.
    let (dd, want) = (on_disk.clone(), original.clone());
    with_watchdog(
        Duration::from_secs(120),
        "data dir repaired",
        move || loop {
            if std::fs::read(&dd).ok().as_deref() == Some(&want[..]) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        },
    );
    m.unmount();
    assert!(m.proc.wait_exit(Duration::from_secs(30)).success());
}

/// The mountpoint's parent is renamed while mounted: reads go on through the new path, and the
/// mount unmounts and exits cleanly from there.
#[test]
fn a_mountpoint_whose_parent_is_moved_keeps_working_and_unmounts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("moved.bin"), 300_000, 93);
    let t = tmp.path().join("moved.torrent");
    create_torrent(&src.join("moved.bin"), &t, &[]);
    let (_seed, addr) = seeder(&src, &t, &tmp.path().join("seed.log"), &[]);
    let mnt = tmp.path().join("parent/mnt");
    let mut m = Mount::start(
        &t,
        &mnt,
        &tmp.path().join("mount.log"),
        &["--peer", &addr.to_string()],
    );
    let moved = tmp.path().join("elsewhere");
    std::fs::rename(tmp.path().join("parent"), &moved).unwrap();
    let p = moved.join("mnt/moved.bin");
    let got = with_watchdog(Duration::from_secs(60), "read at the new path", move || {
        std::fs::read(p).unwrap()
    });
    assert!(got == data(300_000, 93));
    run_ok(Command::new("fusermount3").arg("-u").arg(moved.join("mnt")));
    let status = m.proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", m.proc.stderr());
    assert!(!is_mountpoint(&moved.join("mnt")));
}
