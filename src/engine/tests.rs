//! In-process engine tests: real torrents on one runtime, talking to scripted peers over
//! in-memory pipes (`tokio::io::duplex`), with tokio's clock paused where time matters: the
//! engine reads time only through `tokio::time::Instant`, so a 30 s timeout passes in no real
//! time, and a wait that never ends fails at its watchdog instead of hanging.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::core::layout::BLOCK_SIZE;
use crate::core::metainfo::Metainfo;
use crate::core::peer_proto::{INITIAL_QUEUE, MIN_QUEUE};
use crate::core::wire::{self, BlockRequest, Decode, Handshake, Message, HANDSHAKE_LEN};
use crate::engine::reader::ReadError;
use crate::engine::tasks::Failure;
use crate::engine::torrent::{Torrent, TorrentConfig};
use crate::net::peer;

/// A watchdog, not a timing claim: far longer than anything here should take.
const WATCHDOG: Duration = Duration::from_secs(60);

struct Fixture {
    _dir: tempfile::TempDir,
    content_dir: std::path::PathBuf,
    meta: Arc<Metainfo>,
    content: Vec<u8>,
}

/// A single-file torrent of `pieces` pieces of `piece_len` bytes (deterministic content).
fn fixture(pieces: usize, piece_len: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let content_dir = dir.path().join("data");
    std::fs::create_dir_all(&content_dir).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let content: Vec<u8> = (0..pieces * piece_len as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let file = content_dir.join("blob");
    std::fs::write(&file, &content).unwrap();
    let opts = crate::create::CreateOptions {
        piece_length: piece_len,
        ..Default::default()
    };
    let bytes = crate::create::create_torrent(&file, &opts, &|_| {}).unwrap();
    Fixture {
        meta: Arc::new(Metainfo::from_bytes(&bytes).unwrap()),
        content,
        content_dir,
        _dir: dir,
    }
}

/// A started torrent (no trackers), downloading into memory unless `seed_from_disk`.
fn torrent(fx: &Fixture, seed_from_disk: bool, cfg: TorrentConfig) -> Arc<Torrent> {
    let cfg = TorrentConfig {
        announce: false,
        data_dir: seed_from_disk.then(|| fx.content_dir.clone()),
        ..cfg
    };
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"-SF0100-");
    let t = Torrent::new(
        fx.meta.clone(),
        cfg,
        id,
        std::net::SocketAddr::from(([0, 0, 0, 0], 6881)),
        CancellationToken::new(),
        &|_| {},
    )
    .unwrap();
    t.start(None);
    t
}

/// The far end of a connection, speaking the wire protocol by hand.
struct ScriptedPeer {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    buf: BytesMut,
}

/// Connects a scripted peer to `t` (as if we had dialled it). `fast`: it sets the fast bit.
async fn attach(t: &Arc<Torrent>, fast: bool, pipe_bytes: usize) -> ScriptedPeer {
    let (ours, theirs) = tokio::io::duplex(pipe_bytes);
    let (ord, owr) = tokio::io::split(ours);
    let (mut trd, mut twr) = tokio::io::split(theirs);
    let mut hs = Handshake::new(t.info_hash.0, [b'p'; 20]);
    if !fast {
        hs.reserved = [0; 8];
    }
    twr.write_all(&hs.encode()).await.unwrap();
    let ours_hs = Handshake::new(t.info_hash.0, t.peer_id);
    let (their_hs, reader, writer) =
        peer::handshake_outgoing(Box::new(ord), Box::new(owr), &ours_hs)
            .await
            .unwrap();
    let mut got = [0u8; HANDSHAKE_LEN];
    trd.read_exact(&mut got).await.unwrap();
    assert_eq!(Handshake::decode(&got).unwrap().info_hash, t.info_hash.0);
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let tc = t.clone();
    t.tasks.spawn("test-peer", Failure::Routine, async move {
        crate::engine::peer::run(tc, addr, false, their_hs, reader, writer).await
    });
    ScriptedPeer {
        rd: trd,
        wr: twr,
        buf: BytesMut::new(),
    }
}

impl ScriptedPeer {
    async fn send(&mut self, m: &Message) {
        let mut out = BytesMut::new();
        wire::encode(m, &mut out);
        self.wr.write_all(&out).await.unwrap();
    }

    /// The next message; None when the engine closed the connection.
    async fn recv(&mut self) -> Option<Message> {
        let next = async {
            loop {
                if let Decode::Message(m) = wire::decode(&mut self.buf, 1 << 20).unwrap() {
                    return Some(m);
                }
                if self.rd.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        };
        tokio::time::timeout(WATCHDOG, next)
            .await
            .expect("watchdog: no message from the engine")
    }

    /// Skips messages until one matches.
    async fn recv_until(&mut self, want: impl Fn(&Message) -> bool) -> Message {
        loop {
            match self.recv().await {
                Some(m) if want(&m) => return m,
                Some(_) => {}
                None => panic!("the engine closed the connection"),
            }
        }
    }

    /// Collects `n` requests (other messages are skipped).
    async fn requests(&mut self, n: usize) -> Vec<BlockRequest> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Message::Request(r) = self.recv_until(|m| matches!(m, Message::Request(_))).await
            {
                out.push(r);
            }
        }
        out
    }

    async fn serve(&mut self, fx: &Fixture, r: BlockRequest) {
        let start = r.piece as usize * fx.meta.info.piece_length as usize + r.offset as usize;
        let data = Bytes::copy_from_slice(&fx.content[start..start + r.length as usize]);
        self.send(&Message::Piece {
            piece: r.piece,
            offset: r.offset,
            data,
        })
        .await;
    }
}

/// Serves `pending` and every later request until the torrent holds every piece and the engine
/// has said so; returns whether it sent not-interested on the way.
async fn serve_until_complete(
    t: &Arc<Torrent>,
    fx: &Fixture,
    p: &mut ScriptedPeer,
    mut pending: Vec<BlockRequest>,
) -> bool {
    let mut not_interested = false;
    loop {
        for r in pending.drain(..) {
            p.serve(fx, r).await;
        }
        if t.is_complete() && not_interested {
            return true;
        }
        match p.recv().await {
            Some(Message::Request(r)) => pending.push(r),
            Some(Message::NotInterested) => not_interested = true,
            Some(_) => {}
            None => panic!("the engine closed the connection"),
        }
    }
}

fn full_bitfield(fx: &Fixture) -> Message {
    let n = fx.meta.info.lengths.piece_count();
    Message::Bitfield(Bytes::copy_from_slice(
        crate::core::layout::Bitfield::full(n).as_bytes(),
    ))
}

/// Waits (under the watchdog) until `cond` holds, yielding to the engine's tasks.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WATCHDOG, wait)
        .await
        .unwrap_or_else(|_| panic!("watchdog: {what}"));
}

#[tokio::test(start_paused = true)]
async fn interest_choke_and_pipelining_follow_the_peer() {
    let fx = fixture(64, 2 * BLOCK_SIZE); // 128 blocks
    let t = torrent(&fx, false, TorrentConfig::default());
    let mut p = attach(&t, false, 1 << 20).await;
    p.send(&full_bitfield(&fx)).await;
    p.recv_until(|m| *m == Message::Interested).await;
    // Unchoked: a whole pipeline of requests arrives before we answer any.
    p.send(&Message::Unchoke).await;
    let first = p.requests(INITIAL_QUEUE).await;
    let distinct: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(
        distinct.len(),
        INITIAL_QUEUE,
        "pipelined requests are distinct"
    );
    // Choked: those are void; unchoked again, they are asked for again.
    p.send(&Message::Choke).await;
    p.send(&Message::Unchoke).await;
    let pending = p.requests(INITIAL_QUEUE).await;
    // Serve everything asked until the torrent is complete; we then lose interest.
    let lost_interest = serve_until_complete(&t, &fx, &mut p, pending).await;
    assert!(lost_interest, "not interested once we have everything");
    let all = t.read(None, 0, fx.content.len() as u64).await.unwrap();
    assert!(all == fx.content, "downloaded bytes equal the original");
    t.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_read_blocked_at_shutdown_fails_and_shutdown_waits_for_every_task() {
    let fx = fixture(8, 2 * BLOCK_SIZE);
    let t = torrent(&fx, false, TorrentConfig::default());
    let _peer = attach(&t, false, 1 << 20).await; // a peer that has nothing
    let reader = {
        let t = t.clone();
        tokio::spawn(async move { t.read(None, 0, 100).await })
    };
    until("the read is waiting", || t.lock().reads_waiting() == 1).await;
    t.shutdown().await;
    assert_eq!(reader.await.unwrap(), Err(ReadError::ShuttingDown));
    assert!(t.tasks.is_empty(), "every task of the torrent is gone");
    assert_eq!(t.lock().reads_waiting(), 0);
    assert_eq!(t.snapshot().peers, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_read_releases_its_pins_and_deadlines() {
    let fx = fixture(8, 2 * BLOCK_SIZE);
    let t = torrent(&fx, false, TorrentConfig::default());
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        t.read(None, 0, 3 * BLOCK_SIZE as u64),
    );
    assert!(
        r.await.is_err(),
        "nobody has the data: the read is still waiting"
    );
    assert_eq!(t.lock().reads_waiting(), 0, "the guard released the read");
    t.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_our_uploads_is_dropped_by_the_write_timeout() {
    let fx = fixture(16, 4 * BLOCK_SIZE);
    let t = torrent(&fx, true, TorrentConfig::default());
    assert!(t.is_complete(), "seeding from the data dir");
    // A 64 KiB pipe that the peer never reads from.
    let mut p = attach(&t, true, 64 << 10).await;
    p.send(&Message::Interested).await;
    p.recv_until(|m| *m == Message::Unchoke).await;
    for piece in 0..16u32 {
        for b in 0..4u32 {
            p.send(&Message::Request(BlockRequest {
                piece,
                offset: b * BLOCK_SIZE,
                length: BLOCK_SIZE,
            }))
            .await;
        }
    }
    until("the engine drops the peer", || t.snapshot().peers == 0).await;
    t.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_fast_peer_that_chokes_with_requests_outstanding_and_rejects_them_keeps_working() {
    let fx = fixture(32, 2 * BLOCK_SIZE);
    let t = torrent(&fx, false, TorrentConfig::default());
    let mut p = attach(&t, true, 1 << 20).await;
    p.send(&Message::HaveAll).await;
    p.recv_until(|m| *m == Message::Interested).await;
    for _ in 0..50 {
        p.send(&Message::Unchoke).await;
        let asked = p.requests(INITIAL_QUEUE).await;
        p.send(&Message::Choke).await;
        for r in asked {
            p.send(&Message::Reject(r)).await;
        }
    }
    p.send(&Message::Unchoke).await;
    let pending = p.requests(INITIAL_QUEUE).await;
    serve_until_complete(&t, &fx, &mut p, pending).await;
    t.shutdown().await;
}

/// Disk reads run on the blocking pool: with a slow disk, a one-thread runtime keeps running
/// its other tasks (a peer's messages, timers) while a read waits for the disk.
#[test]
fn a_slow_disk_does_not_stall_the_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fx = fixture(8, 2 * BLOCK_SIZE);
        let t = torrent(&fx, true, TorrentConfig::default());
        assert!(
            t.is_complete(),
            "seeding from the data dir; the cache is empty"
        );
        t.store().unwrap().set_io_delay(Duration::from_millis(300));
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let got = t.read(None, 0, 100).await.unwrap();
        assert_eq!(got, fx.content[..100]);
        let during = ticks.load(std::sync::atomic::Ordering::SeqCst);
        assert!(during > 0, "other tasks ran while the disk read was slow");
        ticker.abort();
        t.shutdown().await;
    });
}

/// A read's blocks do not wait behind a full queue of bulk requests: the peer is told to
/// cancel the newest of them (nothing is known of its path yet, so all but the floor) and the
/// read's blocks are requested at once, before the peer has served anything. On the old code
/// they were requested only once half of the bulk queue had been served (or had expired).
#[tokio::test(start_paused = true)]
async fn a_read_cancels_queued_bulk_requests_and_its_blocks_go_out_first() {
    let fx = fixture(64, 2 * BLOCK_SIZE); // 128 blocks
    let t = torrent(&fx, false, TorrentConfig::default());
    let mut p = attach(&t, true, 1 << 20).await;
    p.send(&full_bitfield(&fx)).await;
    p.recv_until(|m| *m == Message::Interested).await;
    p.send(&Message::Unchoke).await;
    // The background fill takes the whole pipeline; the peer serves none of it.
    let bulk = p.requests(INITIAL_QUEUE).await;
    let piece_len = fx.meta.info.piece_length as u64;
    let read_piece = (0..64u32)
        .find(|i| bulk.iter().all(|r| r.piece != *i))
        .expect("a piece the bulk requests do not touch");
    let reader = {
        let t = t.clone();
        tokio::spawn(async move { t.read(None, read_piece as u64 * piece_len, 100).await })
    };
    let mut cancelled = Vec::new();
    let mut asked = Vec::new();
    while asked.len() < 2 {
        match p.recv().await {
            Some(Message::Cancel(r)) => {
                assert!(bulk.contains(&r), "only requests made are cancelled");
                assert!(asked.is_empty(), "cancels go before the read's requests");
                cancelled.push(r);
            }
            Some(Message::Request(r)) if r.piece == read_piece => asked.push(r),
            Some(Message::Request(r)) => panic!("a bulk request {r:?} before the read's blocks"),
            Some(_) => {}
            None => panic!("the engine closed the connection"),
        }
    }
    assert_eq!(
        cancelled.len(),
        INITIAL_QUEUE - MIN_QUEUE,
        "all but the floor"
    );
    // The newest were cancelled: the oldest requests still stand.
    assert!(bulk[..MIN_QUEUE].iter().all(|r| !cancelled.contains(r)));
    // BEP 6: the peer rejects what it will not send; the read completes.
    for r in &cancelled {
        p.send(&Message::Reject(*r)).await;
    }
    for r in asked {
        p.serve(&fx, r).await;
    }
    let got = tokio::time::timeout(WATCHDOG, reader)
        .await
        .expect("watchdog: the read")
        .unwrap()
        .unwrap();
    let start = read_piece as usize * piece_len as usize;
    assert_eq!(got, fx.content[start..start + 100]);
    t.shutdown().await;
}
