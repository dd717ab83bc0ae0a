//! swarmfs seeding swarmfs on 127.0.0.1: byte-identical downloads, a peer-to-peer swarm, a
//! corrupt peer banned, a seeder killed mid-transfer.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use swarmfs::core::metainfo::Metainfo;
use swarmfs::core::wire::{self, Decode, Handshake, Message};

use common::*;

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

/// How many of `source`'s pieces are already in place in the file at `path` (0 if it is not
/// there yet). A download writes only verified pieces into a file created at full length.
fn pieces_in_place(path: &Path, source: &[u8], piece_length: usize) -> usize {
    let Ok(on_disk) = std::fs::read(path) else {
        return 0;
    };
    if on_disk.len() != source.len() {
        return 0;
    }
    on_disk
        .chunks(piece_length)
        .zip(source.chunks(piece_length))
        .filter(|(a, b)| a == b)
        .count()
}

#[test]
fn six_leechers_share_among_themselves() {
    const LEN: usize = 8 * 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let (_tracker, url) = tracker(&tmp.path().join("tracker.log"), &[]);
    let src = tmp.path().join("src");
    write_file(&src.join("swarm.bin"), LEN, 7);
    let t = tmp.path().join("swarm.torrent");
    create_torrent(&src.join("swarm.bin"), &t, &["--tracker", &url]);
    // Six copies at 2 MiB/s would take the seeder 24 s alone; the leechers must trade.
    let (_seed, _addr, seeder_id) = seeder_with_peer_id(
        &src,
        &t,
        &tmp.path().join("seed.log"),
        &["--upload-rate", "2MiB"],
    );
    let mut leechers: Vec<(Proc, std::path::PathBuf)> = (0..6)
        .map(|i| {
            let dst = tmp.path().join(format!("leecher{i}"));
            let d = download(&t, &dst, &tmp.path().join(format!("leecher{i}.log")), &[]);
            (d, dst)
        })
        .collect();
    for (i, (d, dst)) in leechers.iter_mut().enumerate() {
        let status = d.wait_exit(Duration::from_secs(180));
        assert!(status.success(), "leecher {i} failed: {}", d.stderr());
        assert_same_tree(&src.join("swarm.bin"), &dst.join("swarm.bin"));
        let out = d.stdout_to_end(Duration::from_secs(30));
        let sources = received_by_peer(&out);
        let total: u64 = sources.iter().map(|(_, _, n)| n).sum();
        let from_seeder: u64 = sources
            .iter()
            .filter(|(id, _, _)| *id == seeder_id)
            .map(|(_, _, n)| n)
            .sum();
        let from_others = total - from_seeder;
        // Printed for the curious (`--nocapture`), not asserted on.
        eprintln!("leecher {i}: {from_others} of {total} bytes from other leechers");
        assert!(
            total >= LEN as u64,
            "leecher {i} reports {total} bytes received in all, less than the {LEN} it holds: {out:#?}"
        );
        assert!(
            from_others * 5 >= total,
            "leecher {i} got only {from_others} of {total} bytes from peers other than the \
             seeder {seeder_id}: {out:#?}"
        );
    }
}

/// A peer that has every piece, unchokes at once and answers every request, but with the bytes
/// of the pieces `corrupt` picks inverted. Serves each connection on its own thread.
fn spawn_corrupt_peer(
    meta: &Metainfo,
    content: Arc<Vec<u8>>,
    corrupt: fn(u32) -> bool,
) -> SocketAddr {
    // An address of its own: bans are by IP, and the honest seeder is on 127.0.0.1.
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let info_hash = meta.info_hash.0;
    let piece_length = meta.info.piece_length as usize;
    let piece_count = meta.info.piece_hashes.len();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let content = content.clone();
            std::thread::spawn(move || {
                // Errors end the connection; the downloader's view of it is what the test checks.
                let _ = serve_corrupt(
                    stream,
                    info_hash,
                    &content,
                    piece_length,
                    piece_count,
                    corrupt,
                );
            });
        }
    });
    addr
}

fn serve_corrupt(
    mut stream: TcpStream,
    info_hash: [u8; 20],
    content: &[u8],
    piece_length: usize,
    piece_count: usize,
    corrupt: fn(u32) -> bool,
) -> std::io::Result<()> {
    // A watchdog on every read: a stuck test fails instead of hanging this thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut theirs = [0u8; wire::HANDSHAKE_LEN];
    stream.read_exact(&mut theirs)?;
    let hs = Handshake::decode(&theirs).map_err(std::io::Error::other)?;
    if hs.info_hash != info_hash {
        return Ok(());
    }
    // No extension bits: plain BEP 3, so a bitfield rather than have-all.
    let ours = Handshake {
        reserved: [0; 8],
        info_hash,
        peer_id: *b"-XX0001-corruptpeer0",
    };
    stream.write_all(&ours.encode())?;
    let mut bits = vec![0u8; piece_count.div_ceil(8)];
    for i in 0..piece_count {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    let mut out = BytesMut::new();
    wire::encode(&Message::Bitfield(bits.into()), &mut out);
    wire::encode(&Message::Unchoke, &mut out);
    stream.write_all(&out)?;
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = BytesMut::new();
        loop {
            match wire::decode(&mut buf, wire::DEFAULT_MAX_FRAME).map_err(std::io::Error::other)? {
                Decode::NeedMore(_) => break,
                Decode::Message(Message::Request(r)) => {
                    let start = r.piece as usize * piece_length + r.offset as usize;
                    let Some(block) = content.get(start..start + r.length as usize) else {
                        return Ok(()); // out of range: not a request our downloader makes
                    };
                    let mut data = block.to_vec();
                    if corrupt(r.piece) {
                        data.iter_mut().for_each(|b| *b = !*b);
                    }
                    wire::encode(
                        &Message::Piece {
                            piece: r.piece,
                            offset: r.offset,
                            data: data.into(),
                        },
                        &mut out,
                    );
                }
                Decode::Message(_) => {}
            }
        }
        stream.write_all(&out)?;
    }
}

#[test]
fn corrupt_peer_is_banned_and_download_is_intact() {
    const LEN: usize = 2 * 1024 * 1024 + 1000;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("bad.bin"), LEN, 8);
    let t = tmp.path().join("bad.torrent");
    create_torrent(&src.join("bad.bin"), &t, &["--piece-length", "64KiB"]);
    let meta = Metainfo::from_file(&t).unwrap();
    let content = Arc::new(std::fs::read(src.join("bad.bin")).unwrap());
    let bad = spawn_corrupt_peer(&meta, content, |piece| piece % 2 == 0);
    // The honest seeder is slow, so the fast corrupt peer gets most requests until it is banned.
    let (_seed, good) = seeder(
        &src,
        &t,
        &tmp.path().join("seed.log"),
        &["--upload-rate", "512KiB"],
    );
    let dst = tmp.path().join("dst");
    let mut d = Proc::spawn(
        "download",
        Command::new(bin())
            .arg("download")
            .arg(&t)
            .arg("-d")
            .arg(&dst)
            .args(["--listen", "127.0.0.1:0", "--no-dht"])
            .args(["--peer", &bad.to_string(), "--peer", &good.to_string()])
            .env("RUST_LOG", "swarmfs=info"),
        &tmp.path().join("dl.log"),
    );
    let status = d.wait_exit(Duration::from_secs(120));
    let log = d.stderr();
    assert!(status.success(), "download failed: {log}");
    assert_same_tree(&src.join("bad.bin"), &dst.join("bad.bin"));
    assert!(
        log.contains(&format!("banning peer {}", bad.ip())),
        "the corrupt peer at {bad} was not banned; download log:\n{log}"
    );
    assert!(
        !log.contains(&format!("banning peer {}", good.ip())),
        "the honest seeder at {good} was banned; download log:\n{log}"
    );
}

/// Dials `target` as a peer that has every piece, under `peer_id`, and answers requests with
/// junk until it has sent `budget` bytes; then hangs up.
fn attack_once(
    target: SocketAddr,
    info_hash: [u8; 20],
    piece_count: usize,
    peer_id: [u8; 20],
    budget: usize,
) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    // A watchdog on every read: a stuck test fails instead of hanging this thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let ours = Handshake {
        reserved: [0; 8],
        info_hash,
        peer_id,
    };
    stream.write_all(&ours.encode())?;
    let mut theirs = [0u8; wire::HANDSHAKE_LEN];
    stream.read_exact(&mut theirs)?;
    let mut bits = vec![0u8; piece_count.div_ceil(8)];
    for i in 0..piece_count {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    let mut out = BytesMut::new();
    wire::encode(&Message::Bitfield(bits.into()), &mut out);
    wire::encode(&Message::Unchoke, &mut out);
    stream.write_all(&out)?;
    let (mut buf, mut chunk, mut sent) = (BytesMut::new(), vec![0u8; 64 * 1024], 0);
    let mut junk = u64::from_le_bytes(peer_id[12..].try_into().unwrap()) | 1;
    while sent < budget {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = BytesMut::new();
        while let Decode::Message(m) =
            wire::decode(&mut buf, wire::DEFAULT_MAX_FRAME).map_err(std::io::Error::other)?
        {
            if let Message::Request(r) = m {
                let data: Vec<u8> = (0..r.length)
                    .map(|_| {
                        junk ^= junk << 13;
                        junk ^= junk >> 7;
                        junk ^= junk << 17;
                        junk as u8
                    })
                    .collect();
                sent += data.len();
                wire::encode(
                    &Message::Piece {
                        piece: r.piece,
                        offset: r.offset,
                        data: data.into(),
                    },
                    &mut out,
                );
            }
        }
        stream.write_all(&out)?;
    }
    Ok(())
}

/// An attacker dials the downloader again and again, each time under a fresh peer id, claims
/// every piece, sends junk for about a piece and hangs up. Strikes live on its address, so it is
/// banned once, for good; the honest (slow) seeder that shares pieces with it is never banned.
#[test]
fn an_attacker_reconnecting_under_fresh_peer_ids_is_banned_by_address() {
    const LEN: usize = 2 * 1024 * 1024;
    const PIECE: usize = 64 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("evade.bin"), LEN, 10);
    let t = tmp.path().join("evade.torrent");
    create_torrent(&src.join("evade.bin"), &t, &["--piece-length", "64KiB"]);
    let meta = Metainfo::from_file(&t).unwrap();
    // The honest seeder has an address of its own; the attacker dials from 127.0.0.1.
    let (_seed, good) = seeder(
        &src,
        &t,
        &tmp.path().join("seed.log"),
        &["--listen", "127.0.0.3:0", "--upload-rate", "512KiB"],
    );
    let dst = tmp.path().join("dst");
    let mut d = download(
        &t,
        &dst,
        &tmp.path().join("dl.log"),
        &["--peer", &good.to_string()],
    );
    let target = d.listen_addr();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let done = done.clone();
        let (info_hash, pieces) = (meta.info_hash.0, meta.info.piece_hashes.len());
        std::thread::spawn(move || {
            let mut dials = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && dials < 10_000 {
                dials += 1;
                let mut id = *b"-XX0001-evader000000";
                id[12..].copy_from_slice(&u64::from(dials).to_le_bytes());
                let _ = attack_once(target, info_hash, pieces, id, PIECE);
                std::thread::sleep(Duration::from_millis(20));
            }
            dials
        })
    };
    let status = d.wait_exit(Duration::from_secs(120));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let dials = attacker.join().unwrap();
    let log = d.stderr();
    assert!(status.success(), "download failed: {log}");
    assert_same_tree(&src.join("evade.bin"), &dst.join("evade.bin"));
    let bans: Vec<&str> = log.lines().filter(|l| l.contains("banning peer")).collect();
    assert_eq!(
        bans.len(),
        1,
        "one ban, of the attacker's address ({dials} dials); download log:\n{log}"
    );
    assert!(
        bans[0].contains("banning peer 127.0.0.1:"),
        "the attacker's address is banned, not the honest seeder's: {bans:?}"
    );
}

#[test]
fn seeder_killed_midway_other_seeder_finishes() {
    const LEN: usize = 8 * 1024 * 1024;
    const PIECE: usize = 256 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("churn.bin"), LEN, 9);
    let source = std::fs::read(src.join("churn.bin")).unwrap();
    let t = tmp.path().join("churn.torrent");
    create_torrent(&src.join("churn.bin"), &t, &["--piece-length", "256KiB"]);
    // Capped so the download takes seconds: there is a "midway" to kill a seeder at.
    let caps = ["--upload-rate", "1MiB"];
    let (doomed, doomed_addr) = seeder(&src, &t, &tmp.path().join("seed-a.log"), &caps);
    let (_survivor, survivor_addr) = seeder(&src, &t, &tmp.path().join("seed-b.log"), &caps);
    let dst = tmp.path().join("dst");
    let mut d = download(
        &t,
        &dst,
        &tmp.path().join("dl.log"),
        &[
            "--peer",
            &doomed_addr.to_string(),
            "--peer",
            &survivor_addr.to_string(),
        ],
    );
    // Kill one seeder (SIGKILL: no goodbye) once some pieces have arrived, but before the end.
    let watchdog = Instant::now() + Duration::from_secs(120);
    loop {
        let have = pieces_in_place(&dst.join("churn.bin"), &source, PIECE);
        if have >= 4 {
            assert!(
                have < LEN / PIECE,
                "the download finished before a seeder could be killed midway"
            );
            break;
        }
        if let Some(status) = d.child.try_wait().unwrap() {
            panic!(
                "download exited ({status}) before a seeder was killed: {}",
                d.stderr()
            );
        }
        assert!(
            Instant::now() < watchdog,
            "watchdog: no 4 pieces downloaded within 120 s; download log:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(doomed);
    let status = d.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "download failed: {}", d.stderr());
    assert_same_tree(&src.join("churn.bin"), &dst.join("churn.bin"));
    let out = d.stdout_to_end(Duration::from_secs(30));
    let from_survivor: u64 = received_by_peer(&out)
        .iter()
        .filter(|(_, addr, _)| *addr == survivor_addr.to_string())
        .map(|(_, _, n)| n)
        .sum();
    assert!(
        from_survivor > 0,
        "nothing came from the surviving seeder {survivor_addr}: {out:#?}"
    );
}

/// What a plain peer hears from `addr` within `quiet` after asking for a block: whether it was
/// unchoked, and whether the block came.
fn ask_for_a_block(addr: SocketAddr, info_hash: [u8; 20], quiet: Duration) -> (bool, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut ours = Handshake::new(info_hash, [b'q'; 20]);
    ours.reserved = [0; 8];
    s.write_all(&ours.encode()).unwrap();
    let mut out = BytesMut::new();
    wire::encode(&Message::Interested, &mut out);
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (mut buf, mut chunk) = (BytesMut::new(), [0u8; 64 * 1024]);
    let (mut unchoked, mut served, mut handshaken) = (false, false, false);
    let until = Instant::now() + quiet;
    while Instant::now() < until && !served {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue, // read timeout: keep listening until `quiet` is over
        }
        if !handshaken {
            if buf.len() < 68 {
                continue;
            }
            let _ = buf.split_to(68);
            handshaken = true;
        }
        while let Decode::Message(m) = wire::decode(&mut buf, 1 << 20).unwrap() {
            match m {
                Message::Unchoke if !unchoked => {
                    unchoked = true;
                    let mut req = BytesMut::new();
                    let block = wire::BlockRequest {
                        piece: 0,
                        offset: 0,
                        length: 16 * 1024,
                    };
                    wire::encode(&Message::Request(block), &mut req);
                    s.write_all(&req).unwrap();
                }
                Message::Piece { .. } => served = true,
                _ => {}
            }
        }
    }
    (unchoked, served)
}

/// `download --seed` keeps serving once complete and says how much it sent; with `--no-upload`
/// it never unchokes an interested peer, and sends nothing. The same run without the flag is the
/// control: there the peer is unchoked and served within the same window.
#[test]
fn a_no_upload_downloader_never_unchokes_anyone() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("f.bin"), 1 << 20, 5);
    let t = tmp.path().join("f.torrent");
    create_torrent(&src.join("f.bin"), &t, &[]);
    let info_hash = Metainfo::from_bytes(&std::fs::read(&t).unwrap())
        .unwrap()
        .info_hash
        .0;
    let (_seed, seeder_addr) = seeder(&src, &t, &tmp.path().join("seed.log"), &[]);
    for no_upload in [false, true] {
        let dst = tmp.path().join(format!("dst-{no_upload}"));
        let peer = seeder_addr.to_string();
        let mut args = vec!["--peer", &peer, "--seed"];
        if no_upload {
            args.push("--no-upload");
        }
        let mut d = download(&t, &dst, &tmp.path().join("dl.log"), &args);
        let addr = d.listen_addr();
        d.wait_line("seeding until interrupted", Duration::from_secs(60));
        // Within 3 s a complete peer unchokes an interested one (at once, a free slot) and
        // answers its request; the window is for the negative case.
        let (unchoked, served) = ask_for_a_block(addr, info_hash, Duration::from_secs(3));
        d.signal(libc::SIGTERM);
        let uploaded = d.wait_line("uploaded ", Duration::from_secs(30));
        assert_eq!(d.wait_exit(Duration::from_secs(30)).code(), Some(0));
        if no_upload {
            assert!(
                !unchoked && !served,
                "--no-upload unchoked or served a peer"
            );
            assert_eq!(uploaded, "uploaded 0 bytes");
        } else {
            assert!(unchoked && served, "the control was not served");
            assert_eq!(uploaded, "uploaded 16384 bytes");
        }
    }
}

/// With `--listen` on one address, peer connections and tracker announces leave from it: a
/// peer or tracker hands others the address that reaches us (each peer of a loopback swarm on
/// its own 127.0.0.x, as scripts/bench-distribution.sh runs them).
#[test]
fn connections_and_announces_leave_from_the_listen_address() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("f.bin"), 100_000, 6);
    let t = tmp.path().join("f.torrent");
    create_torrent(&src.join("f.bin"), &t, &[]);
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let tracker = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_arg = peer.local_addr().unwrap().to_string();
    let tracker_arg = format!("http://{}/announce", tracker.local_addr().unwrap());
    let _d = Proc::spawn(
        "download",
        Command::new(bin())
            .arg("download")
            .arg(&t)
            .arg("-d")
            .arg(tmp.path().join("dst"))
            .args(["--listen", "127.0.0.7:0", "--no-dht", "--peer", &peer_arg])
            .args(["--tracker", &tracker_arg]),
        &tmp.path().join("dl.log"),
    );
    for (what, listener) in [("peer", &peer), ("tracker", &tracker)] {
        let (_conn, from) = with_watchdog(Duration::from_secs(60), what, {
            let l = listener.try_clone().unwrap();
            move || l.accept().unwrap()
        });
        assert_eq!(
            from.ip(),
            "127.0.0.7".parse::<std::net::IpAddr>().unwrap(),
            "the {what} connection came from {from}"
        );
    }
}
