//! Hostile peers against a mount that is reading its file at the same time (issue 9's list).
//! Each attack comes from an address of its own (127.0.0.x), so a ban of one does not touch the
//! next. For each: the attacker is dropped (and banned where it broke the protocol), the mount's
//! peak memory during that attack stays bounded, and every pass of the reader over the mount
//! returns the original bytes. The table of what happened is printed (`--nocapture`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use swarmfs::core::metainfo::Metainfo;
use swarmfs::core::wire::{self, BlockRequest, Decode, Handshake, Message, HANDSHAKE_LEN};

/// A watchdog, not a timing claim.
const WATCHDOG: Duration = Duration::from_secs(60);
const PIECE: usize = 256 * 1024;
/// 31 pieces: the bitfield's last byte has a spare bit.
const PIECES: u32 = 31;
const LEN: usize = PIECES as usize * PIECE - 1000;
/// The mount's peak memory during any one attack stays under this (its cache is 2 MiB).
const PEAK_BOUND: u64 = 64 << 20;

struct Target {
    addr: SocketAddr,
    info_hash: [u8; 20],
    pid: u32,
    /// The mount's log, shown when an attack's check fails.
    log: std::path::PathBuf,
}

/// The mount's log lines about 127.0.0.`host`, and its last lines, for a failure message.
fn log_about(t: &Target, host: u32) -> String {
    let text = std::fs::read_to_string(&t.log).unwrap_or_default();
    let ip = format!("{}", Ipv4Addr::from(0x7f00_0000 + host));
    let about: Vec<&str> = text.lines().filter(|l| l.contains(&ip)).collect();
    let last: Vec<&str> = text.lines().rev().take(30).collect();
    format!(
        "mount log about {ip}:\n{}\nlast lines:\n{}",
        about.join("\n"),
        last.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// A connection to the mount from 127.0.0.`host` (or 127.0.1.`host - 256`...).
fn dial(t: &Target, host: u32) -> TcpStream {
    let ip = Ipv4Addr::from(0x7f00_0000 + host);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    sock.connect_timeout(&t.addr.into(), WATCHDOG).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(WATCHDOG)).unwrap();
    s
}

/// Sends our handshake (a peer id of `host`'s own) and reads the mount's; false if it closed
/// instead.
fn handshake(s: &mut TcpStream, t: &Target, host: u32) -> bool {
    let mut id = *b"-XX0001-attacker0000";
    id[16..].copy_from_slice(&host.to_be_bytes());
    let ours = Handshake::new(t.info_hash, id);
    let mut theirs = [0u8; HANDSHAKE_LEN];
    s.write_all(&ours.encode()).is_ok() && s.read_exact(&mut theirs).is_ok()
}

fn send(s: &mut TcpStream, m: &Message) {
    let mut out = BytesMut::new();
    wire::encode(m, &mut out);
    let _ = s.write_all(&out); // a closed connection shows in `closed`
}

/// Whether the mount closes `s`: everything it sends is read and dropped until the end.
/// Panics when the watchdog runs out with the connection still open.
fn closed(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 64 * 1024];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("watchdog: the mount kept the connection for {WATCHDOG:?}")
            }
            Err(_) => return true, // reset
        }
    }
}

/// Reads messages until one satisfies `want`; None if the connection ends first.
fn recv_until(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    want: impl Fn(&Message) -> bool,
) -> Option<Message> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        while let Ok(Decode::Message(m)) = wire::decode(buf, 1 << 20) {
            if want(&m) {
                return Some(m);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("watchdog: no such message within {WATCHDOG:?}")
            }
            Err(_) => return None,
        }
    }
}

/// Whether a fresh connection from `host` is let in: after the handshake the mount talks to it
/// (its bitfield or have-none) instead of closing.
fn let_in(t: &Target, host: u32) -> bool {
    let mut s = dial(t, host);
    if !handshake(&mut s, t, host) {
        return false;
    }
    recv_until(&mut s, &mut BytesMut::new(), |_| true).is_some()
}

fn all_pieces() -> Message {
    let mut bits = vec![0xFFu8; (PIECES as usize).div_ceil(8)];
    *bits.last_mut().unwrap() &= 0xFE; // the spare bit stays clear
    Message::Bitfield(bits.into())
}

/// A peer that has every piece and unchokes: the reading mount soon asks it for blocks.
fn offer_everything(t: &Target, host: u32) -> (TcpStream, BytesMut, BlockRequest) {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    send(&mut s, &all_pieces());
    send(&mut s, &Message::Unchoke);
    let mut buf = BytesMut::new();
    let Some(Message::Request(r)) =
        recv_until(&mut s, &mut buf, |m| matches!(m, Message::Request(_)))
    else {
        panic!("the mount closed the connection before asking for a block");
    };
    (s, buf, r)
}

fn reset_peak(pid: u32) {
    // Writing 5 resets the peak resident set size (VmHWM) to the current one.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn peak(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:") * 1024
}

/// After a protocol violation: dropped, and the address may not come back.
fn dropped_and_banned(t: &Target, s: &mut TcpStream, host: u32) -> String {
    assert!(closed(s));
    assert!(
        !let_in(t, host),
        "127.0.0.{host} was not banned\n{}",
        log_about(t, host)
    );
    "dropped, banned".into()
}

fn request(s: &mut TcpStream, piece: u32, offset: u32, length: u32) {
    let r = BlockRequest {
        piece,
        offset,
        length,
    };
    send(s, &Message::Request(r));
}

/// An attack from its host; returns what the mount did (asserting it).
type Attack = fn(&Target, u32) -> String;

fn garbage_handshake(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    let _ = s.write_all(&[0x5A; HANDSHAKE_LEN]);
    assert!(closed(&mut s));
    assert!(let_in(t, host), "a bad handshake is not worth a ban");
    "closed".into()
}

fn wrong_info_hash(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    let _ = s.write_all(&Handshake::new([7; 20], [8; 20]).encode());
    assert!(closed(&mut s));
    assert!(let_in(t, host));
    "closed".into()
}

fn length_prefix(prefix: u32) -> impl Fn(&Target, u32) -> String {
    move |t, host| {
        let mut s = dial(t, host);
        assert!(handshake(&mut s, t, host));
        let _ = s.write_all(&prefix.to_be_bytes());
        dropped_and_banned(t, &mut s, host)
    }
}

fn length_2_31(t: &Target, host: u32) -> String {
    length_prefix(1 << 31)(t, host)
}

fn length_2_32_minus_1(t: &Target, host: u32) -> String {
    length_prefix(u32::MAX)(t, host)
}

/// A 16 MiB piece message declared, its body sent a byte at a time.
fn slow_16_mib_message(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    let _ = s.write_all(&(16u32 << 20).to_be_bytes());
    for b in [7u8, 0, 0, 0] {
        if s.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    dropped_and_banned(t, &mut s, host)
}

fn bitfield_of_the_wrong_size(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    send(&mut s, &Message::Bitfield(vec![0xFF; 2].into()));
    dropped_and_banned(t, &mut s, host)
}

fn bitfield_with_spare_bits_set(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    send(&mut s, &Message::Bitfield(vec![0xFF; 4].into()));
    dropped_and_banned(t, &mut s, host)
}

fn have_piece_2_32_minus_1(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    send(&mut s, &Message::Have(u32::MAX));
    dropped_and_banned(t, &mut s, host)
}

fn bad_request(piece: u32, offset: u32, length: u32) -> impl Fn(&Target, u32) -> String {
    move |t, host| {
        let mut s = dial(t, host);
        assert!(handshake(&mut s, t, host));
        request(&mut s, piece, offset, length);
        dropped_and_banned(t, &mut s, host)
    }
}

fn request_of_length_0(t: &Target, host: u32) -> String {
    bad_request(0, 0, 0)(t, host)
}

fn request_over_128_kib(t: &Target, host: u32) -> String {
    bad_request(0, 0, 128 * 1024 + 1)(t, host)
}

fn request_past_the_piece_end(t: &Target, host: u32) -> String {
    bad_request(0, PIECE as u32 - 16 * 1024, 32 * 1024)(t, host)
}

fn request_of_a_piece_out_of_range(t: &Target, host: u32) -> String {
    bad_request(PIECES, 0, 16 * 1024)(t, host)
}

/// 100,000 requests at once, never reading the answers.
fn request_flood(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    let mut burst = BytesMut::new();
    for i in 0..100_000u32 {
        let r = BlockRequest {
            piece: i % PIECES,
            offset: 0,
            length: 16 * 1024,
        };
        wire::encode(&Message::Request(r), &mut burst);
    }
    let _ = s.write_all(&burst);
    dropped_and_banned(t, &mut s, host)
}

fn piece_data_never_requested(t: &Target, host: u32) -> String {
    let mut s = dial(t, host);
    assert!(handshake(&mut s, t, host));
    send(
        &mut s,
        &Message::Piece {
            piece: 0,
            offset: 0,
            data: vec![0; 16 * 1024].into(),
        },
    );
    dropped_and_banned(t, &mut s, host)
}

fn a_block_larger_than_requested(t: &Target, host: u32) -> String {
    let (mut s, _, r) = offer_everything(t, host);
    send(
        &mut s,
        &Message::Piece {
            piece: r.piece,
            offset: r.offset,
            data: vec![0; r.length as usize * 2].into(),
        },
    );
    dropped_and_banned(t, &mut s, host)
}

/// Claims every piece and hangs up, 200 times over.
fn announce_all_and_disconnect_in_a_loop(t: &Target, host: u32) -> String {
    for _ in 0..200 {
        let mut s = dial(t, host);
        if handshake(&mut s, t, host) {
            send(&mut s, &all_pieces());
        }
    }
    // The mount may still be closing the last few of those connections (and a torrent takes
    // at most MAX_PEERS_PER_IP from one address): let in once they are gone. A ban would keep
    // the address out for 10 minutes, far past this watchdog.
    let until = Instant::now() + WATCHDOG;
    while !let_in(t, host) {
        assert!(
            Instant::now() < until,
            "churn is no misbehaviour, but the address stayed out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    "each connection ended; not banned".into()
}

/// Unchokes, takes requests and never sends a block (keep-alives only).
fn unchoke_and_never_send(t: &Target, host: u32) -> String {
    let (mut s, _, _) = offer_everything(t, host);
    let started = Instant::now();
    let mut sink = [0u8; 64 * 1024];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        assert!(
            started.elapsed() < WATCHDOG,
            "watchdog: the silent peer was kept"
        );
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                send(&mut s, &Message::KeepAlive);
            }
            Err(_) => break,
        }
    }
    "dropped once its requests stalled".into()
}

/// 50 connections, each sending its handshake at a byte a second.
fn slow_loris_on_50_connections(t: &Target, host: u32) -> String {
    let hs = Handshake::new(t.info_hash, [3; 20]).encode();
    let mut socks: Vec<TcpStream> = (0..50).map(|i| dial(t, host + i)).collect();
    let started = Instant::now();
    let mut open = socks.len();
    let mut sent = 0;
    while open > 0 {
        assert!(
            started.elapsed() < WATCHDOG,
            "watchdog: {open} slow connections kept"
        );
        open = 0;
        for s in &mut socks {
            s.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let gone = match s.read(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            if !gone {
                open += 1;
                let _ = s.write_all(&hs[sent % hs.len()..][..1]);
            }
        }
        sent += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    format!("all 50 closed within {} s", started.elapsed().as_secs())
}

/// 500 connections that handshake and then say nothing, from 500 addresses.
fn five_hundred_silent_connections(t: &Target, host: u32) -> String {
    let mut joined = Vec::new();
    let mut refused = 0;
    for i in 0..500 {
        let mut s = dial(t, host + i);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = BytesMut::new();
        if handshake(&mut s, t, host + i) && recv_until_or_timeout(&mut s, &mut buf) {
            joined.push(s);
        } else {
            refused += 1;
        }
    }
    // Once they are idle, an honest newcomer takes one's slot.
    let started = Instant::now();
    while !let_in(t, host + 600) {
        assert!(
            started.elapsed() < WATCHDOG,
            "watchdog: no room for an honest peer"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    format!(
        "{} let in, {refused} refused; a newcomer got in after {} s",
        joined.len(),
        started.elapsed().as_secs()
    )
}

/// Whether a message arrives within the socket's read timeout (the mount kept us).
fn recv_until_or_timeout(s: &mut TcpStream, buf: &mut BytesMut) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Decode::Message(_)) = wire::decode(buf, 1 << 20) {
            return true;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn hostile_peers_are_dropped_while_a_mount_reads_correct_bytes() {
    // scripts/test.sh runs the suite with a soft limit of 256 descriptors; this test's own 550
    // attacking sockets need more, and the mount is given back the suite's limit below.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max.min(4096),
            rlim_max: limit.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("target.bin"), LEN, 77);
    let original = Arc::new(std::fs::read(src.join("target.bin")).unwrap());
    let torrent = tmp.path().join("target.torrent");
    create_torrent(
        &src.join("target.bin"),
        &torrent,
        &["--piece-length", "256KiB"],
    );
    let meta = Metainfo::from_file(&torrent).unwrap();
    // Throttled, so each pass of the reader takes a while and the mount keeps fetching.
    let (_seed, seeder_addr) = seeder(
        &src,
        &torrent,
        &tmp.path().join("seed.log"),
        &["--upload-rate", "8MiB"],
    );
    let mount = Mount::start(
        &torrent,
        &tmp.path().join("mnt"),
        &tmp.path().join("mount.log"),
        &["--peer", &seeder_addr.to_string(), "--cache-size", "2MiB"],
    );
    // SAFETY: a plain system call on a child of ours, with a valid struct.
    unsafe {
        let pid = mount.proc.child.id() as libc::pid_t;
        libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut());
    }
    let t = Target {
        addr: mount.listen_addr.expect("the mount says where it listens"),
        info_hash: meta.info_hash.0,
        pid: mount.proc.child.id(),
        log: tmp.path().join("mount.log"),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, passes, original) = (stop.clone(), passes.clone(), original.clone());
        let file = mount.dir.join("target.bin");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut f = std::fs::File::open(&file).expect("opening the file in the mount");
                let mut got = Vec::new();
                f.read_to_end(&mut got).expect("reading through the mount");
                assert!(
                    got == *original,
                    "a pass through the mount read wrong bytes"
                );
                // Out of the kernel's page cache, so the next pass reaches the mount again.
                // SAFETY: a valid open descriptor; fadvise only drops clean cached pages.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
                passes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let attacks: Vec<(&str, Attack)> = vec![
        ("garbage handshake", garbage_handshake),
        ("wrong info-hash", wrong_info_hash),
        ("length prefix 2^31", length_2_31),
        ("length prefix 2^32-1", length_2_32_minus_1),
        ("16 MiB message sent slowly", slow_16_mib_message),
        ("bitfield of the wrong size", bitfield_of_the_wrong_size),
        ("bitfield with spare bits set", bitfield_with_spare_bits_set),
        ("have for piece 2^32-1", have_piece_2_32_minus_1),
        ("request of length 0", request_of_length_0),
        ("request over 128 KiB", request_over_128_kib),
        ("request past the piece end", request_past_the_piece_end),
        ("request out of range", request_of_a_piece_out_of_range),
        ("100,000 requests at once", request_flood),
        ("piece data never requested", piece_data_never_requested),
        (
            "a block larger than requested",
            a_block_larger_than_requested,
        ),
        (
            "announce all, disconnect, x200",
            announce_all_and_disconnect_in_a_loop,
        ),
        ("unchoke and never send", unchoke_and_never_send),
        ("slow-loris on 50 connections", slow_loris_on_50_connections),
        ("500 silent connections", five_hundred_silent_connections),
    ];
    let rows = Arc::new(Mutex::new(Vec::new()));
    // Hosts: 127.0.0.10 onwards, one per attack; the many-connection ones get ranges of their own.
    let mut host = 10;
    // `ATTACKS=slow` runs only the attacks whose names contain "slow" (when debugging one).
    let only = std::env::var("ATTACKS").unwrap_or_default();
    for (name, attack) in attacks {
        if !name.contains(only.as_str()) {
            continue;
        }
        reset_peak(t.pid);
        let passes_before = passes.load(Ordering::Relaxed);
        let started = Instant::now();
        let outcome = attack(&t, host);
        eprintln!(
            "{name} (127.0.0.{host}): {outcome}, {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let peak = peak(t.pid);
        rows.lock().unwrap().push((
            name,
            outcome,
            peak >> 20,
            passes.load(Ordering::Relaxed) - passes_before,
        ));
        assert!(
            peak < PEAK_BOUND,
            "{name}: the mount's peak RSS reached {} MiB",
            peak >> 20
        );
        host += if name.contains("500") || name.contains("50 ") {
            1024
        } else {
            1
        };
    }
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("every pass through the mount read the original bytes");
    eprintln!(
        "{:<32} | {:<55} | peak RSS | reader passes",
        "attack", "what the mount did"
    );
    for (name, outcome, peak_mib, read) in rows.lock().unwrap().iter() {
        eprintln!("{name:<32} | {outcome:<55} | {peak_mib:>4} MiB | {read}");
    }
    assert!(
        passes.load(Ordering::Relaxed) >= 1,
        "the reader never finished a pass"
    );
}
