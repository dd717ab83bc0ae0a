//! Peers that misbehave, scripted by hand over TCP on 127.0.0.1 against the real binary: each
//! test is an attack or an awkward-but-legal peer, and fails without the defence it covers.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use swarmfs::core::metadata::{self, MetadataMessage};
use swarmfs::core::metainfo::Metainfo;
use swarmfs::core::wire::{
    self, BlockRequest, Decode, ExtendedHandshake, Handshake, Message, HANDSHAKE_LEN,
};

/// A watchdog, not a timing claim.
const WATCHDOG: Duration = Duration::from_secs(60);

/// One end of a peer connection, driven by the test.
struct Scripted {
    sock: TcpStream,
    buf: BytesMut,
}

impl Scripted {
    fn new(sock: TcpStream) -> Scripted {
        sock.set_read_timeout(Some(WATCHDOG)).unwrap();
        sock.set_nodelay(true).unwrap();
        Scripted {
            sock,
            buf: BytesMut::new(),
        }
    }

    /// Answers an incoming handshake with a plain one (no fast, no extension bits).
    fn accept_handshake(&mut self, peer_id: u8) -> Handshake {
        let mut got = [0u8; HANDSHAKE_LEN];
        self.sock.read_exact(&mut got).unwrap();
        let theirs = Handshake::decode(&got).unwrap();
        let mut ours = Handshake::new(theirs.info_hash, [peer_id; 20]);
        ours.reserved = [0; 8];
        self.sock.write_all(&ours.encode()).unwrap();
        theirs
    }

    fn send(&mut self, m: &Message) {
        let mut out = BytesMut::new();
        wire::encode(m, &mut out);
        self.sock.write_all(&out).unwrap();
    }

    /// The next message; None once the other side closed the connection.
    fn recv(&mut self) -> Option<Message> {
        loop {
            if let Decode::Message(m) = wire::decode(&mut self.buf, 1 << 20).unwrap() {
                return Some(m);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("watchdog: no message within {WATCHDOG:?}")
                }
                Err(_) => return None,
            }
        }
    }

    fn next_request(&mut self, who: &str) -> BlockRequest {
        loop {
            match self.recv() {
                Some(Message::Request(r)) => return r,
                Some(_) => {}
                None => panic!("swarmfs closed its connection to peer {who}"),
            }
        }
    }

    fn serve(&mut self, content: &[u8], piece_length: u32, r: BlockRequest) {
        let start = r.piece as usize * piece_length as usize + r.offset as usize;
        let data = Bytes::copy_from_slice(&content[start..start + r.length as usize]);
        self.send(&Message::Piece {
            piece: r.piece,
            offset: r.offset,
            data,
        });
    }
}

fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn make_torrent(dir: &Path, len: usize, piece_length: &str) -> (Vec<u8>, Metainfo) {
    let src = dir.join("src").join("blob");
    write_file(&src, len, 42);
    let torrent = dir.join("t.torrent");
    create_torrent(&src, &torrent, &["--piece-length", piece_length]);
    let meta = Metainfo::from_bytes(&std::fs::read(&torrent).unwrap()).unwrap();
    (std::fs::read(&src).unwrap(), meta)
}

/// The defect: a peer that choked us with requests outstanding left them in our "requested"
/// set; past 2,048 entries the whole set was cleared, and the next legitimate block looked
/// unrequested, so the honest peer was dropped. Peer A (a seed) chokes us with our first burst
/// of requests (`INITIAL_QUEUE`) outstanding, again and again until more than 2,048 were left
/// behind; after each choke peer B announces exactly those pieces and delivers them, so each
/// round's requests to A are new. Then A serves honestly and must be kept until the download
/// completes.
#[test]
fn a_peer_that_chokes_with_requests_outstanding_many_times_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let piece_length = 16 * 1024;
    let pieces = 2048 + 512;
    let (content, meta) = make_torrent(dir.path(), pieces * piece_length as usize, "16KiB");
    let (la, addr_a) = listen();
    let (lb, addr_b) = listen();
    let out = dir.path().join("out");
    let mut dl = download(
        &dir.path().join("t.torrent"),
        &out,
        &dir.path().join("download.log"),
        &["--peer", &addr_a.to_string(), "--peer", &addr_b.to_string()],
    );
    let mut a = Scripted::new(la.accept().unwrap().0);
    let mut b = Scripted::new(lb.accept().unwrap().0);
    assert_eq!(a.accept_handshake(b'a').info_hash, meta.info_hash.0);
    b.accept_handshake(b'b');
    a.send(&Message::Bitfield(Bytes::from(vec![0xff; pieces / 8])));
    b.send(&Message::Unchoke); // B has nothing yet
    let burst = swarmfs::core::peer_proto::INITIAL_QUEUE;
    for round in 0..2048 / burst + 8 {
        a.send(&Message::Unchoke);
        let asked: HashSet<BlockRequest> = (0..burst).map(|_| a.next_request("A")).collect();
        assert_eq!(
            asked.len(),
            burst,
            "round {round}: {burst} distinct requests"
        );
        a.send(&Message::Choke);
        for r in &asked {
            b.send(&Message::Have(r.piece));
        }
        let mut left = asked;
        while !left.is_empty() {
            let r = b.next_request("B");
            assert!(
                left.remove(&r),
                "B has only A's pieces, yet was asked for {r:?}"
            );
            b.serve(&content, piece_length, r);
        }
    }
    // Now A serves everything honestly.
    a.send(&Message::Unchoke);
    let status = std::thread::scope(|s| {
        s.spawn(|| {
            while let Some(m) = a.recv() {
                if let Message::Request(r) = m {
                    a.serve(&content, piece_length, r);
                }
            }
        });
        dl.wait_exit(Duration::from_secs(120))
    });
    assert!(status.success(), "download failed: {}", dl.stderr());
    let got = std::fs::read(out.join("blob")).unwrap();
    assert!(got == content, "downloaded bytes equal the original");
}

/// A connection to `addr` that handshook as `hs`, said it is interested and was unchoked.
fn unchoked(addr: std::net::SocketAddr, hs: &Handshake) -> Scripted {
    let mut p = Scripted::new(TcpStream::connect(addr).unwrap());
    p.sock.write_all(&hs.encode()).unwrap();
    let mut got = [0u8; HANDSHAKE_LEN];
    p.sock.read_exact(&mut got).unwrap();
    p.send(&Message::Interested);
    while p.recv().expect("the seeder closed the connection") != Message::Unchoke {}
    p
}

/// Writes `requests` in one burst without reading, then drains what the seeder sent: the stream
/// must end (the peer dropped), not stay open.
fn flood_until_dropped(p: &mut Scripted, requests: impl Iterator<Item = BlockRequest>) {
    let mut burst = BytesMut::new();
    for r in requests {
        wire::encode(&Message::Request(r), &mut burst);
    }
    // Writing fails once swarmfs closes the connection, which is what we expect. (Our side
    // stays open for writing: closing it would end the connection from our end.)
    let _ = p.sock.write_all(&burst);
    let mut sink = Vec::new();
    if let Err(e) = p.sock.read_to_end(&mut sink) {
        // A reset by the peer also means closed.
        assert!(
            e.kind() != std::io::ErrorKind::WouldBlock,
            "watchdog: swarmfs kept a peer that does not read ({WATCHDOG:?})"
        );
    }
}

/// A peer that floods us with requests and never reads our answers made us queue answers
/// without bound. Now such a peer is dropped: past twice the `reqq` we announce in queued
/// blocks, with the send queue's byte bound behind that. (It is unchoked: a flood of requests
/// we cannot serve ends at `MAX_REFUSED_REQUESTS`.)
#[test]
fn a_peer_that_never_reads_is_dropped_when_our_send_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let (_, meta) = make_torrent(dir.path(), 1 << 20, "16KiB");
    let (_seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        &[],
    );
    let hs = Handshake::new(meta.info_hash.0, [b'f'; 20]); // fast bit set: we get rejects
    let mut p = unchoked(addr, &hs);
    // Blocks up to the upload bound, then rejects: all queued, since we never read.
    let requests = (0..1_000_000u32).map(|i| BlockRequest {
        piece: i % 64,
        offset: 0,
        length: 16 * 1024,
    });
    flood_until_dropped(&mut p, requests);
}

/// A peer that floods requests over more pieces than our upload memory may pin, and never
/// reads: past that memory its requests were answered with rejects, which piled up in the send
/// queue until the byte bound dropped it, after a long while and without a ban (attacks.rs
/// flaked on it whenever the mount had become a seed by then). Queued rejects now count as
/// answers like blocks: past twice the `reqq` we announce, it is a violation, and banned.
#[test]
fn a_flood_past_the_upload_memory_is_banned() {
    let dir = tempfile::tempdir().unwrap();
    // 128 pieces of 256 KiB: one block from each pins 32 MiB, twice the upload bound.
    let (_, meta) = make_torrent(dir.path(), 32 << 20, "256KiB");
    let (_seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        &[],
    );
    let hs = Handshake::new(meta.info_hash.0, [b'g'; 20]); // fast bit set: we get rejects
    let mut p = unchoked(addr, &hs);
    let requests = (0..200_000u32).map(|i| BlockRequest {
        piece: i % 128,
        offset: (i / 128 % 16) * 16 * 1024,
        length: 16 * 1024,
    });
    flood_until_dropped(&mut p, requests);
    // The address is banned: a new connection from it is closed before any message.
    let mut q = Scripted::new(TcpStream::connect(addr).unwrap());
    q.sock.write_all(&hs.encode()).unwrap();
    let mut got = [0u8; HANDSHAKE_LEN];
    let _ = q.sock.read_exact(&mut got);
    assert!(q.recv().is_none(), "the flooder was let back in");
}

/// We ask a throttled seeder for 32 blocks (8 s of its upload), then cancel them all. Blocks
/// still queued are not sent: each of those requests gets its one answer as a reject (BEP 6),
/// and the few already on their way arrive. (The seeder used to ignore cancels and send all.)
#[test]
fn a_seeder_drops_cancelled_blocks_it_has_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (_, meta) = make_torrent(dir.path(), 1 << 20, "256KiB");
    let (_seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        &["--upload-rate", "64KiB"],
    );
    let mut p = Scripted::new(TcpStream::connect(addr).unwrap());
    p.sock
        .write_all(&Handshake::new(meta.info_hash.0, [b'c'; 20]).encode())
        .unwrap();
    let mut got = [0u8; HANDSHAKE_LEN];
    p.sock.read_exact(&mut got).unwrap();
    p.send(&Message::Interested);
    while p.recv().expect("the seeder closed the connection") != Message::Unchoke {}
    let requests: Vec<BlockRequest> = (0..32u32)
        .map(|i| BlockRequest {
            piece: i / 16,
            offset: (i % 16) * 16 * 1024,
            length: 16 * 1024,
        })
        .collect();
    let mut burst = BytesMut::new();
    for r in &requests {
        wire::encode(&Message::Request(*r), &mut burst);
    }
    for r in &requests {
        wire::encode(&Message::Cancel(*r), &mut burst);
    }
    p.sock.write_all(&burst).unwrap();
    let (mut pieces, mut rejects) = (0, 0);
    while pieces + rejects < requests.len() {
        match p.recv().expect("the seeder closed the connection") {
            Message::Piece { .. } => pieces += 1,
            Message::Reject(r) => {
                assert!(requests.contains(&r), "a reject of {r:?}, never asked for");
                rejects += 1;
            }
            _ => {}
        }
    }
    eprintln!("{pieces} blocks sent, {rejects} cancelled");
    assert!(
        rejects >= 16,
        "only {rejects} of 32 cancelled requests were dropped ({pieces} blocks sent)"
    );
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:") * 1024
}

/// A peer that never reads asked for 16 KiB blocks to stall our writer, then for one byte of
/// every piece. Each answer is a slice of its whole piece, and the send queue counted the byte,
/// so the queue held the whole torrent in memory, whatever `--cache-size` said (a 160 MiB
/// torrent took the seeder past 170 MiB). Now a queued block counts its whole piece, and the
/// requests past the bound are refused.
#[test]
fn a_peer_asking_one_byte_of_every_piece_pins_no_more_than_the_queue_bound() {
    const PIECES: u32 = 160;
    const PIECE: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (_, meta) = make_torrent(dir.path(), PIECES as usize * PIECE, "1MiB");
    // Throttled, so what the writer has queued stays queued while we look.
    let (seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        &["--cache-size", "8MiB", "--upload-rate", "16KiB"],
    );
    let before = peak_rss(seeder.child.id());
    let mut p = Scripted::new(TcpStream::connect(addr).unwrap());
    let hs = Handshake::new(meta.info_hash.0, [b'p'; 20]);
    p.sock.write_all(&hs.encode()).unwrap();
    let mut got = [0u8; HANDSHAKE_LEN];
    p.sock.read_exact(&mut got).unwrap();
    let ours = ExtendedHandshake {
        extensions: vec![(metadata::EXTENSION_NAME.to_string(), 3)],
        ..Default::default()
    };
    p.send(&Message::Extended {
        id: 0,
        payload: ours.encode().into(),
    });
    p.send(&Message::Interested);
    let (mut unchoked, mut their_metadata_id) = (false, None);
    while !unchoked || their_metadata_id.is_none() {
        match p.recv().expect("the seeder closed the connection") {
            Message::Unchoke => unchoked = true,
            Message::Extended { id: 0, payload } => {
                let theirs = ExtendedHandshake::decode(&payload).unwrap();
                their_metadata_id = theirs
                    .extensions
                    .iter()
                    .find(|(name, _)| name == metadata::EXTENSION_NAME)
                    .map(|(_, id)| *id);
            }
            _ => {}
        }
    }
    let mut burst = BytesMut::new();
    for offset in (0..8).map(|i| i * 16 * 1024) {
        let r = BlockRequest {
            piece: 0,
            offset,
            length: 16 * 1024,
        };
        wire::encode(&Message::Request(r), &mut burst);
    }
    for piece in 1..PIECES {
        let r = BlockRequest {
            piece,
            offset: 0,
            length: 1,
        };
        wire::encode(&Message::Request(r), &mut burst);
    }
    // Answered out of the block queue's order, after every request before it was handled.
    let marker = MetadataMessage::Request { piece: 0 }.encode();
    wire::encode(
        &Message::Extended {
            id: their_metadata_id.unwrap(),
            payload: marker.into(),
        },
        &mut burst,
    );
    p.sock.write_all(&burst).unwrap();
    loop {
        match p.recv().expect("the seeder closed the connection") {
            Message::Extended { id: 3, .. } => break,
            _ => continue,
        }
    }
    let grown = peak_rss(seeder.child.id()).saturating_sub(before);
    eprintln!("seeder peak RSS grew by {} MiB", grown >> 20);
    // The queue bound (16 MiB, plus the piece that crosses it) and the cache (8 MiB), with
    // room for allocator slack; the whole torrent is 160 MiB.
    assert!(
        grown < 64 << 20,
        "the seeder's peak RSS grew by {} MiB while one peer's queue held its requests",
        grown >> 20
    );
}

/// Peers that handshake and then only send a keep-alive a second held every slot of a seeder,
/// so an honest downloader could never get in. Now a peer that is neither interested nor
/// sending data for a few seconds gives its slot to a newcomer.
#[test]
fn idle_connections_holding_every_slot_make_room_for_an_honest_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (content, meta) = make_torrent(dir.path(), 1 << 20, "64KiB");
    let (_seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        &["--max-peers", "10"],
    );
    // As many as it lets in: each that the seeder keeps hears its opening messages.
    let mut idle = Vec::new();
    for i in 0..10u8 {
        let mut p = Scripted::new(TcpStream::connect(addr).unwrap());
        p.sock
            .write_all(&Handshake::new(meta.info_hash.0, [b'i' + i; 20]).encode())
            .unwrap();
        let mut got = [0u8; HANDSHAKE_LEN];
        if p.sock.read_exact(&mut got).is_ok() && p.recv().is_some() {
            idle.push(p);
        }
    }
    assert!(!idle.is_empty(), "the seeder kept none of the idle peers");
    let held = idle.len();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keepalive = {
        let stop = stop.clone();
        let mut socks: Vec<TcpStream> = idle.iter().map(|p| p.sock.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut socks {
                    let _ = s.write_all(&[0, 0, 0, 0]); // dropped ones fail: fine
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let dst = dir.path().join("dst");
    let mut d = download(
        &dir.path().join("t.torrent"),
        &dst,
        &dir.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    let status = d.wait_exit(WATCHDOG);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keepalive.join().unwrap();
    assert!(status.success(), "download failed: {}", d.stderr());
    assert_eq!(std::fs::read(dst.join("blob")).unwrap(), content);
    eprintln!("{held} idle peers held slots");
}

/// Whether swarmfs closed `s` at once: its first read ends (EOF or reset) within the watchdog.
/// A read that times out means the connection was kept, and fails the test.
fn closed_by_swarmfs(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WATCHDOG)).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            panic!("watchdog: the connection stayed open for {WATCHDOG:?}")
        }
        Err(_) => true,
    }
}

/// Whether `s` is still open with nothing to read (swarmfs has neither closed nor answered it).
fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    matches!(s.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A seeder of a small torrent with `extra` options, and `held` idle connections to it followed
/// by one more; returns (connections within the cap still open, whether the extra one was closed).
fn hold_connections(extra: &[&str], held: usize) -> (usize, bool) {
    let dir = tempfile::tempdir().unwrap();
    make_torrent(dir.path(), 64 * 1024, "16KiB");
    let (_seeder, addr) = seeder(
        &dir.path().join("src"),
        &dir.path().join("t.torrent"),
        &dir.path().join("seeder.log"),
        extra,
    );
    let mut within: Vec<TcpStream> = (0..held)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let mut next = TcpStream::connect(addr).unwrap();
    let closed = closed_by_swarmfs(&mut next);
    // Checked after the extra one closed, and well before their handshake timeout (10 s).
    let open = within.iter_mut().map(still_open).filter(|&o| o).count();
    (open, closed)
}

/// Incoming connections are capped before their handshake: past `--max-incoming` a new one is
/// closed at once while the earlier ones stay open.
#[test]
fn incoming_connections_past_the_cap_are_closed_at_once() {
    let (open, closed) = hold_connections(&["--max-incoming", "2"], 2);
    assert!(
        closed,
        "the connection past the cap is closed without a word"
    );
    assert_eq!(open, 2, "the connections within the cap stay open");
}

/// At most `MAX_HANDSHAKES` (32) connections may sit in their handshake at once.
#[test]
fn connections_stuck_in_their_handshake_are_capped() {
    let (open, closed) = hold_connections(&[], 32);
    assert!(closed, "the 33rd is closed");
    assert_eq!(open, 32, "the 32 in their handshake stay open");
}
