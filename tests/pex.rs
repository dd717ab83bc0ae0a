//! Peer exchange (BEP 11): a leecher that knows only the seeder learns the other leechers from
//! it and connects to them; a private torrent (BEP 27) never offers or sends PEX. All swarmfs,
//! on 127.0.0.1, without DHT or tracker.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use swarmfs::core::wire::{self, Decode, ExtendedHandshake, Handshake, Message};

fn torrent_of(tmp: &Path, extra: &[&str]) -> (PathBuf, String) {
    let src = tmp.join("src/set");
    write_file(&src.join("big.bin"), 8 * 1024 * 1024, 91);
    let torrent = tmp.join("set.torrent");
    create_torrent(&src, &torrent, extra);
    let json = run_ok(Command::new(bin()).arg("info").arg("--json").arg(&torrent));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    (torrent, v["info_hash"].as_str().unwrap().to_string())
}

fn peers_xattr(mount: &Path) -> String {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.swarmfs.peers"])
        .arg(mount.join("set"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The count of `source` in a `direct=1 tracker=0 ...` value.
fn count(value: &str, source: &str) -> u64 {
    value
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{source}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {source} in {value:?}"))
}

fn leecher(tmp: &Path, torrent: &Path, name: &str, seeder: SocketAddr) -> Mount {
    Mount::start(
        torrent,
        &tmp.join(name),
        &tmp.join(format!("{name}.log")),
        &["--peer", &seeder.to_string()],
    )
}

#[test]
fn a_leecher_that_knows_only_the_seeder_learns_the_other_leechers_through_pex() {
    let tmp = tempfile::tempdir().unwrap();
    let (torrent, _) = torrent_of(tmp.path(), &[]);
    // A slow seeder, so the leechers stay leechers (and connected) while the test looks.
    let (_seed, seed_addr) = seeder(
        &tmp.path().join("src"),
        &torrent,
        &tmp.path().join("seed.log"),
        &["--upload-rate", "256KiB"],
    );
    let l1 = leecher(tmp.path(), &torrent, "l1", seed_addr);
    let l2 = leecher(tmp.path(), &torrent, "l2", seed_addr);
    for l in [&l1, &l2] {
        let dir = l.dir.clone();
        with_watchdog(Duration::from_secs(30), "leecher connects", move || {
            while count(&peers_xattr(&dir), "direct") < 1 {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let l3 = leecher(tmp.path(), &torrent, "l3", seed_addr);
    let dir = l3.dir.clone();
    // l3 ends up with both leechers. It dials those PEX named to it; one of them may dial it
    // first (PEX named l3 to them too), and then that one is incoming. Without PEX neither
    // could happen: only the seeder's address is given to anyone.
    let value = with_watchdog(Duration::from_secs(45), "pex peers", move || loop {
        let v = peers_xattr(&dir);
        if count(&v, "pex") + count(&v, "incoming") >= 2 {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    assert_eq!(count(&value, "direct"), 1, "{value}");
    assert!(count(&value, "pex") >= 1, "{value}");
    assert_eq!(
        count(&value, "pex") + count(&value, "incoming"),
        2,
        "{value}"
    );
}

/// The `m` dictionary of the extension handshake `addr` sends for `info_hash`.
fn offered_extensions(addr: SocketAddr, info_hash: &str) -> Vec<String> {
    let mut hash = [0u8; 20];
    hex::decode_to_slice(info_hash, &mut hash).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&Handshake::new(hash, [5; 20]).encode())
        .unwrap();
    let mut theirs = [0u8; 68];
    s.read_exact(&mut theirs).unwrap();
    let mut out = BytesMut::new();
    let hs = ExtendedHandshake {
        extensions: vec![("ut_pex".into(), 1), ("ut_metadata".into(), 2)],
        ..ExtendedHandshake::default()
    };
    wire::encode(
        &Message::Extended {
            id: 0,
            payload: hs.encode().into(),
        },
        &mut out,
    );
    s.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        while let Ok(Decode::Message(m)) = wire::decode(&mut buf, 1 << 20) {
            if let Message::Extended { id: 0, payload } = m {
                let hs = ExtendedHandshake::decode(&payload).unwrap();
                return hs.extensions.into_iter().map(|(n, _)| n).collect();
            }
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before its extension handshake");
        buf.extend_from_slice(&chunk[..n]);
    }
    panic!("no extension handshake within 10 s");
}

#[test]
fn a_private_torrent_never_offers_or_sends_pex() {
    for private in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let flags: &[&str] = if private { &["--private"] } else { &[] };
        let (torrent, info_hash) = torrent_of(tmp.path(), flags);
        let (mut seed, seed_addr) = seeder(
            &tmp.path().join("src"),
            &torrent,
            &tmp.path().join("seed.log"),
            // Slow enough that both downloaders are connected at once for a few seconds.
            &["--upload-rate", "2MiB"],
        );
        let offered = offered_extensions(seed_addr, &info_hash);
        assert_eq!(
            offered.contains(&"ut_pex".to_string()),
            !private,
            "private={private}: {offered:?}"
        );
        // Two downloaders through the seeder: with PEX on, the seeder tells the second about
        // the first; private, it tells nobody anything.
        let mut d1 = download(
            &torrent,
            &tmp.path().join("d1"),
            &tmp.path().join("d1.log"),
            &["--peer", &seed_addr.to_string()],
        );
        let mut d2 = download(
            &torrent,
            &tmp.path().join("d2"),
            &tmp.path().join("d2.log"),
            &["--peer", &seed_addr.to_string()],
        );
        for d in [&mut d1, &mut d2] {
            let lines = d.stdout_to_end(Duration::from_secs(120));
            assert!(
                d.wait_exit(Duration::from_secs(10)).success(),
                "{}",
                d.stderr()
            );
            let pex = lines
                .iter()
                .find(|l| l.starts_with("pex messages:"))
                .unwrap();
            if private {
                assert_eq!(pex, "pex messages: 0 sent, 0 received", "{lines:?}");
            }
        }
        seed.signal(libc::SIGTERM);
        let lines = seed.stdout_to_end(Duration::from_secs(30));
        let pex = lines
            .iter()
            .find(|l| l.starts_with("pex messages:"))
            .unwrap();
        if private {
            assert_eq!(pex, "pex messages: 0 sent, 0 received", "{lines:?}");
        } else {
            assert_ne!(pex, "pex messages: 0 sent, 0 received", "{lines:?}");
        }
    }
}
