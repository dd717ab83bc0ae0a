//! Magnet links end to end (BEP 9/10): the metadata is fetched from peers, verified against the
//! info-hash and served to others; download, info --fetch and mount take magnet links. Peers:
//! swarmfs seeders, python3-libtorrent, and scripted peers that refuse the metadata. All on
//! 127.0.0.1, without DHT.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use swarmfs::core::metadata::MetadataMessage;
use swarmfs::core::wire::{self, Decode, ExtendedHandshake, Handshake, Message};

struct Swarm {
    tmp: tempfile::TempDir,
    torrent: PathBuf,
    info_hash: String,
    name: String,
}

fn swarm() -> Swarm {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src/set");
    write_file(&src.join("a.bin"), 2 * 1024 * 1024 + 5, 81);
    write_file(&src.join("sub/b.bin"), 300_000, 82);
    let torrent = tmp.path().join("set.torrent");
    create_torrent(&src, &torrent, &[]);
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
    fn magnet(&self, peers: &[SocketAddr]) -> String {
        let mut m = format!("magnet:?xt=urn:btih:{}&dn=set", self.info_hash);
        for p in peers {
            m.push_str(&format!("&x.pe={p}"));
        }
        m
    }
    fn seeder(&self) -> (Proc, SocketAddr) {
        seeder(
            &self.path("src"),
            &self.torrent,
            &self.path("seed.log"),
            &[],
        )
    }
}

fn info_hash_of(torrent: &Path) -> String {
    let json = run_ok(Command::new(bin()).arg("info").arg("--json").arg(torrent));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["info_hash"].as_str().unwrap().to_string()
}

#[test]
fn download_from_a_magnet_keeps_the_metadata_and_a_restart_needs_no_peer() {
    let s = swarm();
    let (seed, addr) = s.seeder();
    let dir = s.path("dl");
    let saved = s.path("saved.torrent");
    let mut d = download(
        Path::new(&s.magnet(&[addr])),
        &dir,
        &s.path("dl.log"),
        &["--save-torrent", saved.to_str().unwrap()],
    );
    assert!(
        d.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        d.stderr()
    );
    assert_same_tree(&s.path("src/set"), &dir.join(&s.name));
    assert_eq!(info_hash_of(&saved), s.info_hash, "--save-torrent");
    let kept = dir.join(format!(".{}.torrent", s.info_hash));
    assert_eq!(
        info_hash_of(&kept),
        s.info_hash,
        "metadata kept in the data dir"
    );

    // No seeder now, and the only peer in the link is gone: the kept metadata is enough.
    drop(seed);
    let mut again = download(
        Path::new(&s.magnet(&[addr])),
        &dir,
        &s.path("dl2.log"),
        &["--metadata-timeout", "1"],
    );
    let status = again.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", again.stderr());
}

#[test]
fn info_fetch_shows_the_torrent_behind_a_magnet() {
    let s = swarm();
    let (_seed, addr) = s.seeder();
    let out = with_watchdog(Duration::from_secs(60), "info --fetch", {
        let magnet = s.magnet(&[]);
        move || {
            run_ok(Command::new(bin()).args([
                "info",
                "--json",
                "--fetch",
                &magnet,
                "--peer",
                &addr.to_string(),
                "--listen",
                "127.0.0.1:0",
                "--no-dht",
            ]))
        }
    });
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["info_hash"], s.info_hash);
    assert_eq!(v["name"], s.name);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
}

#[test]
fn a_magnet_mount_reads_every_file() {
    let s = swarm();
    let (_seed, addr) = s.seeder();
    let mnt = s.path("mnt");
    let m = Mount::start(
        Path::new(&s.magnet(&[addr])),
        &mnt,
        &s.path("mount.log"),
        &[],
    );
    for rel in ["a.bin", "sub/b.bin"] {
        let want = sha256_file(&s.path("src/set").join(rel));
        let path = mnt.join(&s.name).join(rel);
        let got = with_watchdog(Duration::from_secs(60), rel, move || sha256_file(&path));
        assert_eq!(got, want, "{rel}");
    }
    drop(m);
}

/// A peer that completes the handshakes, offers `ut_metadata` (or not), and rejects every
/// request. Serves connections until the test ends.
fn refusing_peer(info_hash: &str, offer_metadata: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut hash = [0u8; 20];
    hex::decode_to_slice(info_hash, &mut hash).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let _ = serve_refusals(&mut stream, hash, offer_metadata);
            });
        }
    });
    addr
}

fn serve_refusals(
    stream: &mut std::net::TcpStream,
    info_hash: [u8; 20],
    offer_metadata: bool,
) -> std::io::Result<()> {
    let mut theirs = [0u8; 68];
    stream.read_exact(&mut theirs)?;
    stream.write_all(&Handshake::new(info_hash, [7; 20]).encode())?;
    let hs = ExtendedHandshake {
        extensions: if offer_metadata {
            vec![("ut_metadata".into(), 3)]
        } else {
            vec![("ut_pex".into(), 2)]
        },
        metadata_size: Some(5000),
        ..ExtendedHandshake::default()
    };
    let mut out = BytesMut::new();
    wire::encode(
        &Message::Extended {
            id: 0,
            payload: hs.encode().into(),
        },
        &mut out,
    );
    stream.write_all(&out)?;
    let mut their_metadata_id = 0;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Ok(Decode::Message(m)) = wire::decode(&mut buf, 1 << 20) {
            match m {
                Message::Extended { id: 0, payload } => {
                    let hs = ExtendedHandshake::decode(&payload).unwrap();
                    their_metadata_id = hs
                        .extensions
                        .iter()
                        .find(|(n, _)| n == "ut_metadata")
                        .map_or(0, |e| e.1);
                }
                Message::Extended { id: 3, payload } => {
                    if let Ok(MetadataMessage::Request { piece }) =
                        MetadataMessage::decode(&payload)
                    {
                        let mut out = BytesMut::new();
                        let reject = MetadataMessage::Reject { piece }.encode();
                        wire::encode(
                            &Message::Extended {
                                id: their_metadata_id,
                                payload: reject.into(),
                            },
                            &mut out,
                        );
                        stream.write_all(&out)?;
                    }
                }
                _ => {}
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_magnet_whose_peers_refuse_the_metadata_fails_after_the_timeout_and_leaves_no_mount() {
    let s = swarm();
    let peers = [
        refusing_peer(&s.info_hash, true),
        refusing_peer(&s.info_hash, false),
    ];
    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let magnet = s.magnet(&peers);
    let mnt2 = mnt.clone();
    let log = s.path("bg.log");
    // Background mode: the command itself must return with the error.
    let out = with_watchdog(Duration::from_secs(60), "mount", move || {
        Command::new(bin())
            .arg("mount")
            .arg(&magnet)
            .arg(&mnt2)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--no-dht",
                "--metadata-timeout",
                "2",
            ])
            .arg("--log-file")
            .arg(&log)
            .output()
            .unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("no metadata for {} after 2 s", s.info_hash)),
        "{stderr}"
    );
    assert!(stderr.contains("2 connected"), "{stderr}");
    assert!(!is_mountpoint(&mnt), "nothing is left mounted");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
}

fn lt_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lt_client.py")
}

#[test]
fn metadata_comes_from_libtorrent_and_goes_to_libtorrent() {
    let s = swarm();
    // libtorrent seeds; a swarmfs magnet mount fetches the metadata and the files from it.
    let mut lt_seed = Proc::spawn(
        "libtorrent-seed",
        Command::new(PY)
            .arg(lt_script())
            .arg("seed")
            .arg(&s.torrent)
            .arg(s.path("src")),
        &s.path("lt-seed.log"),
    );
    let lt_addr = lt_seed.listen_addr();
    lt_seed.wait_line("seeding", Duration::from_secs(60));
    let mnt = s.path("mnt");
    let m = Mount::start(
        Path::new(&s.magnet(&[lt_addr])),
        &mnt,
        &s.path("mount.log"),
        &[],
    );
    let want = sha256_file(&s.path("src/set/a.bin"));
    let path = mnt.join(&s.name).join("a.bin");
    let got = with_watchdog(Duration::from_secs(60), "read", move || sha256_file(&path));
    assert_eq!(got, want);
    drop(m);

    // A swarmfs seeder serves the metadata to a libtorrent that has only the magnet.
    drop(lt_seed);
    let (_seed, addr) = s.seeder();
    let save = s.path("lt-dl");
    std::fs::create_dir_all(&save).unwrap();
    let mut lt = Proc::spawn(
        "libtorrent-download",
        Command::new(PY)
            .arg(lt_script())
            .arg("download")
            .arg(s.magnet(&[]))
            .arg(&save)
            .args(["--peer", &addr.to_string()]),
        &s.path("lt-dl.log"),
    );
    lt.wait_line("done", Duration::from_secs(120));
    assert_same_tree(&s.path("src/set"), &save.join(&s.name));
}
