//! Micro-benchmarks of the hot pure code (criterion): the wire decoder on a 16 KiB block, the
//! picker choosing requests among 10,000 pieces and 50 peers, the piece cache, and SHA-1 of a
//! 256 KiB piece. `scripts/bench-criterion.sh` runs them and prints the figures.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sha1::{Digest, Sha1};

use swarmfs::core::cache::PieceCache;
use swarmfs::core::layout::{Bitfield, Lengths};
use swarmfs::core::picker::Picker;
use swarmfs::core::wire::{self, Decode, Message, DEFAULT_MAX_FRAME};

const PIECE: u32 = 256 * 1024;

fn wire_decode(c: &mut Criterion) {
    let mut frame = BytesMut::new();
    wire::encode(
        &Message::Piece {
            piece: 7,
            offset: 16384,
            data: Bytes::from(vec![0xA5; 16 * 1024]),
        },
        &mut frame,
    );
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode a 16 KiB piece message", |b| {
        b.iter_batched_ref(
            || frame.clone(),
            |buf| match wire::decode(buf, DEFAULT_MAX_FRAME) {
                Ok(Decode::Message(m)) => black_box(m),
                _ => unreachable!("a whole frame decodes"),
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn picker_next_request(c: &mut Criterion) {
    const PIECES: u32 = 10_000;
    const PEERS: u64 = 50;
    let lengths =
        Lengths::new(u64::from(PIECES) * u64::from(PIECE), PIECE, PIECES.into()).expect("geometry");
    let mut picker = Picker::new(lengths, 1);
    picker.set_background(true);
    let mut rng = StdRng::seed_from_u64(2);
    let peers: Vec<Bitfield> = (0..PEERS)
        .map(|_| {
            let mut bf = Bitfield::new(PIECES);
            for i in 0..PIECES {
                bf.set(i, rng.gen_bool(0.7));
            }
            picker.peer_has_bitfield(&bf);
            bf
        })
        .collect();
    // A swarm in progress: a third of the pieces held, some partial pieces in flight.
    for i in (0..PIECES).step_by(3) {
        picker.piece_verified(lengths.piece(i).expect("in range"));
    }
    let now = Instant::now();
    for (peer, bf) in peers.iter().enumerate() {
        picker.pick(peer as u64, bf, 8, now);
    }
    let mut next = 0usize;
    c.bench_function("picker: 16 blocks for one of 50 peers, 10k pieces", |b| {
        b.iter(|| {
            let peer = next % peers.len();
            next += 1;
            let blocks = picker.pick(peer as u64, &peers[peer], 16, now);
            // Given back, so every iteration starts from the same swarm.
            for block in &blocks {
                picker.block_rejected(peer as u64, *block);
            }
            black_box(blocks.len())
        })
    });
}

fn cache_get_insert(c: &mut Criterion) {
    let data = Bytes::from(vec![1u8; PIECE as usize]);
    // 256 MiB of 256 KiB pieces: 1,024 entries, full.
    let mut cache = PieceCache::new(256 << 20);
    for i in 0..1024 {
        cache.insert(i, data.clone());
    }
    let mut g = c.benchmark_group("cache");
    let mut i = 0u32;
    g.bench_function("get (hit) of 1,024 pieces", |b| {
        b.iter(|| {
            i = (i + 7) % 1024;
            black_box(cache.get(i))
        })
    });
    let mut next = 1024u32;
    g.bench_function("insert into a full cache (evicts one)", |b| {
        b.iter(|| {
            next += 1;
            black_box(cache.insert(next, data.clone()))
        })
    });
    g.finish();
}

fn sha1_piece(c: &mut Criterion) {
    let piece = vec![0x5Au8; PIECE as usize];
    let mut g = c.benchmark_group("sha1");
    g.throughput(Throughput::Bytes(PIECE.into()));
    g.bench_function("256 KiB piece", |b| {
        b.iter(|| Sha1::digest(black_box(&piece)))
    });
    g.finish();
}

criterion_group!(
    hot,
    wire_decode,
    picker_next_request,
    cache_get_insert,
    sha1_piece
);
criterion_main!(hot);
