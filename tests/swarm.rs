//! swarmfs seeding swarmfs on 127.0.0.1: byte-identical downloads, a peer-to-peer swarm, a
//! corrupt peer banned, a seeder killed mid-transfer.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn download(
    torrent: &std::path::Path,
    dir: &std::path::Path,
    logs: &std::path::Path,
    extra: &[&str],
) -> Proc {
    Proc::spawn(
        "download",
        Command::new(bin())
            .arg("download")
            .arg(torrent)
            .arg("-d")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--no-dht"])
            .args(extra)
            .env("RUST_LOG", "swarmfs=info"),
        logs,
    )
}

#[test]
fn single_file_download_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("big.bin"), 5 * 1024 * 1024 + 12345, 1);
    let t = tmp.path().join("big.torrent");
    create_torrent(&src.join("big.bin"), &t, &[]);
    let (_seed, addr) = seeder(&src, &t, &tmp.path().join("seed.log"), &[]);
    let dst = tmp.path().join("dst");
    let mut d = download(
        &t,
        &dst,
        &tmp.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    let status = d.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "download failed: {}", d.stderr());
    assert_same_tree(&src.join("big.bin"), &dst.join("big.bin"));
}

#[test]
fn multi_file_download_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("src/set");
    write_file(&root.join("a.bin"), 300_000, 2);
    write_file(&root.join("empty"), 0, 3);
    write_file(&root.join("one"), 1, 4);
    write_file(&root.join("sub/deeper/c.bin"), 1_000_000, 5);
    write_file(&root.join("sub/b.txt"), 262_144, 6);
    let t = tmp.path().join("set.torrent");
    create_torrent(&root, &t, &[]);
    let (_seed, addr) = seeder(
        &tmp.path().join("src"),
        &t,
        &tmp.path().join("seed.log"),
        &[],
    );
    let dst = tmp.path().join("dst");
    let mut d = download(
        &t,
        &dst,
        &tmp.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    let status = d.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "download failed: {}", d.stderr());
    assert_same_tree(&root, &dst.join("set"));
}
