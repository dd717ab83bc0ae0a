//! The fuzz targets under stable `cargo test`: every committed corpus file in
//! `fuzz/corpus/<target>/` is replayed through its target, then a few thousand seeded mutations
//! (`core::mutate`) of the corpus and of built-in seeds. Long runs are `scripts/fuzz.sh`.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus` (re)writes the built-in seeds
//! into the corpus directories (as `seed-<n>`), for a fresh fuzzing run to start from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, Rng, SeedableRng};

use swarmfs::core::bencode::{self, Owned};
use swarmfs::core::krpc::{self, Body, Query, Response};
use swarmfs::core::metadata::MetadataMessage;
use swarmfs::core::metainfo::{build_torrent, TorrentContent, TorrentSpec};
use swarmfs::core::mutate::mutate;
use swarmfs::core::pex::PexMessage;
use swarmfs::core::routing::NodeId;
use swarmfs::core::tracker_proto::{self, AnnounceEvent, AnnounceRequest, AnnounceResponse};
use swarmfs::core::udp_tracker;
use swarmfs::core::wire::{self, BlockRequest, ExtendedHandshake, Handshake, Message};
use swarmfs::fuzz_targets::TARGETS;

/// Mutations per target (each of a random corpus file or seed).
const MUTATIONS: usize = 3000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus file");
            (p.display().to_string(), bytes)
        })
        .collect();
    files.sort();
    files
}

fn wire_frames(messages: &[Message]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    for m in messages {
        wire::encode(m, &mut out);
    }
    out.to_vec()
}

fn torrent(multi: bool) -> Vec<u8> {
    let content = if multi {
        TorrentContent::Directory {
            files: vec![
                (vec!["a.txt".into()], 40_000),
                (vec!["dir".into(), "b.bin".into()], 30_000),
            ],
        }
    } else {
        TorrentContent::SingleFile { length: 70_000 }
    };
    build_torrent(&TorrentSpec {
        name: "root".into(),
        content,
        piece_length: 32 * 1024,
        piece_hashes: (0..3).map(|i| [i; 20]).collect(),
        trackers: vec![
            vec!["http://127.0.0.1:6969/announce".into()],
            vec!["udp://127.0.0.1:6969".into()],
        ],
        private: multi,
        comment: Some("fuzz seed".into()),
        created_by: None,
        creation_date: Some(1_700_000_000),
    })
    .expect("seed torrent builds")
}

fn announce_request() -> AnnounceRequest {
    AnnounceRequest {
        peer: tracker_proto::SwarmPeer {
            info_hash: [0x2B; 20],
            peer_id: *b"-SF0001-abcdefghijkl",
            port: 6881,
        },
        totals: tracker_proto::TransferTotals {
            uploaded: 1,
            downloaded: 2,
            left: 3,
        },
        event: Some(AnnounceEvent::Started),
        numwant: 50,
    }
}

fn krpc_message(tid: &[u8], body: Body) -> Vec<u8> {
    krpc::Message {
        tid: tid.to_vec(),
        version: Some(b"SF01".to_vec()),
        read_only: false,
        body,
    }
    .encode()
}

fn krpc_seeds() -> Vec<Vec<u8>> {
    let id = NodeId([0x11; 20]);
    let peer = |i: u8| std::net::SocketAddr::from(([127, 0, 0, i], 6881));
    vec![
        krpc_message(b"aa", Body::Query(Query::Ping { id })),
        krpc_message(
            b"ab",
            Body::Query(Query::FindNode {
                id,
                target: NodeId([0x55; 20]),
            }),
        ),
        krpc_message(
            b"ac",
            Body::Query(Query::GetPeers {
                id,
                info_hash: [0xAA; 20],
            }),
        ),
        krpc_message(
            b"ad",
            Body::Query(Query::AnnouncePeer {
                id,
                info_hash: [0xAA; 20],
                port: 6881,
                implied_port: true,
                token: b"token123".to_vec(),
            }),
        ),
        krpc_message(
            b"ae",
            Body::Response(Response {
                id,
                nodes: Some(vec![
                    (NodeId([0x22; 20]), peer(2)),
                    (NodeId([0x33; 20]), peer(3)),
                ]),
                values: Some(vec![peer(4), peer(5)]),
                token: Some(b"tok".to_vec()),
            }),
        ),
        krpc_message(
            b"af",
            Body::Error {
                code: krpc::ERROR_PROTOCOL,
                message: "bad".into(),
            },
        ),
    ]
}

/// Framed datagrams for the `dht` target: `[op][host][len u16][packet]`.
fn dht_seed() -> Vec<u8> {
    let mut out = vec![0]; // rate limit off
    for (i, packet) in krpc_seeds().iter().enumerate() {
        out.push(2);
        out.push(1 + i as u8 % 4);
        out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
        out.extend_from_slice(packet);
        out.extend_from_slice(&[0, 0, 50]); // a tick 5 s later
    }
    out
}

/// Valid messages for every target, built with our own encoders and from the captured fixtures.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "bencode" => vec![
            b"d1:ai-12e1:bl3:xyzi0ee1:cd1:d0:ee".to_vec(),
            b"li0ei-1ei9223372036854775807e0:e".to_vec(),
            fixture("libtorrent-pad.torrent"),
            fixture("tracker_dict_peers.bin"),
        ],
        "metainfo" => vec![fixture("libtorrent-pad.torrent"), torrent(false), torrent(true)],
        "magnet" => vec![
            b"magnet:?xt=urn:btih:c12fe1c06bba254a9dc9f519b335aa7c1367a88a&dn=Big+Buck%20Bunny&tr=udp%3A%2F%2F127.0.0.1%3A6969&tr.1=http://127.0.0.1/a&x.pe=127.0.0.1:6881&x.pe=[::1]:51413".to_vec(),
            b"magnet:?xt=urn:btih:YEX6DQDLXISUVHOJ6UM3GNNKPQJWPKEK&dn=x".to_vec(),
            b"magnet:?xt=urn:btmh:1220abcd".to_vec(),
        ],
        "wire" => {
            let mut hs = Handshake::new([0xAA; 20], [0xBB; 20]).encode().to_vec();
            let req = BlockRequest {
                piece: 1,
                offset: 16384,
                length: 16384,
            };
            let frames = wire_frames(&[
                Message::KeepAlive,
                Message::Choke,
                Message::Unchoke,
                Message::Interested,
                Message::NotInterested,
                Message::Have(7),
                Message::Bitfield(bytes::Bytes::from_static(&[0xF0, 0x0F])),
                Message::Request(req),
                Message::Piece {
                    piece: 1,
                    offset: 0,
                    data: bytes::Bytes::from_static(b"block data"),
                },
                Message::Cancel(req),
                Message::Port(6881),
                Message::Suggest(3),
                Message::HaveAll,
                Message::HaveNone,
                Message::Reject(req),
                Message::AllowedFast(2),
                Message::Extended {
                    id: 0,
                    payload: bytes::Bytes::from(ExtendedHandshake::default().encode()),
                },
                Message::Unknown { id: 42 },
            ]);
            let mut all = hs.clone();
            all.extend_from_slice(&frames);
            hs.truncate(40);
            vec![frames, all, hs]
        }
        "ext_handshake" => vec![
            ExtendedHandshake {
                extensions: vec![("ut_metadata".into(), 1), ("ut_pex".into(), 2)],
                client: Some("swarmfs 0.1".into()),
                listen_port: Some(6881),
                request_queue: Some(1024),
                metadata_size: Some(31_337),
            }
            .encode(),
            b"d1:md11:ut_metadatai3e6:ut_pexi0ee1:v13:\xce\xbcTorrent 3.5e".to_vec(),
        ],
        "peer_proto" => vec![
            // fast + extensions, 4 pieces; unchoke, have-all, pieces, commands, ticks
            vec![3, 3, 2, 12, 19, 6, 8, 0, 0, 0, 8, 0, 1, 0, 18, 0, 100, 0, 0, 1, 0],
            vec![1, 0x25, 6, 1, 0xF0, 2, 7, 1, 0, 0, 14, 1, 0, 0, 1, 19, 4, 1, 0, 0],
            vec![2, 7, 20, 30, b'd', b'1', b':', b'm', b'd', b'e', b'e', 16, 1, 2, 0, 0],
        ],
        "tracker_http" => vec![
            fixture("tracker_dict_peers.bin"),
            fixture("tracker_opentracker_compact.bin"),
            fixture("tracker_opentracker_failure.bin"),
            fixture("tracker_opentracker_scrape.bin"),
            fixture("tracker_peers6.bin"),
            tracker_proto::encode_announce_response(&AnnounceResponse {
                interval: 1800,
                min_interval: Some(60),
                peers: vec![
                    "127.0.0.1:6881".parse().expect("addr"),
                    "[::1]:6882".parse().expect("addr"),
                ],
                complete: Some(1),
                incomplete: Some(2),
                warning: Some("careful".into()),
            }),
            tracker_proto::announce_url("http://127.0.0.1/announce", &announce_request())
                .expect("url")
                .split_once('?')
                .expect("query")
                .1
                .as_bytes()
                .to_vec(),
        ],
        "udp_tracker" => {
            let mut connect = Vec::new();
            udp_tracker::encode_connect_response(7, 0x1234_5678_9ABC, &mut connect);
            let mut announce = Vec::new();
            let resp = AnnounceResponse {
                interval: 900,
                min_interval: None,
                peers: vec!["127.0.0.1:6881".parse().expect("addr")],
                complete: Some(3),
                incomplete: Some(4),
                warning: None,
            };
            udp_tracker::encode_announce_response(7, &resp, false, &mut announce);
            let mut scrape = Vec::new();
            udp_tracker::encode_scrape_response(
                7,
                &[tracker_proto::ScrapeStats {
                    complete: 1,
                    downloaded: 2,
                    incomplete: 3,
                }],
                &mut scrape,
            );
            let mut error = Vec::new();
            udp_tracker::encode_error(7, "unknown torrent", &mut error);
            vec![
                connect,
                announce,
                scrape,
                error,
                udp_tracker::encode_connect_request(9),
                udp_tracker::encode_announce_request(1, 9, &announce_request(), 0xDEAD),
                udp_tracker::encode_scrape_request(1, 9, &[[0xAA; 20], [0xBB; 20]])
                    .expect("two hashes"),
            ]
        }
        "krpc" => {
            let mut saved = BTreeMap::new();
            saved.insert(b"id".to_vec(), Owned::Bytes(vec![0x55; 20]));
            saved.insert(
                b"nodes".to_vec(),
                Owned::Bytes(krpc::encode_nodes(&[(
                    NodeId([1; 20]),
                    "127.0.0.1:6881".parse().expect("addr"),
                )])),
            );
            let mut seeds = krpc_seeds();
            seeds.push(Owned::Dict(saved).encode());
            seeds
        }
        "dht" => vec![dht_seed()],
        "ut_metadata" => vec![
            MetadataMessage::Request { piece: 0 }.encode(),
            MetadataMessage::Reject { piece: 1 }.encode(),
            MetadataMessage::Data {
                piece: 0,
                total_size: 10,
                data: b"d1:ai1ee..".to_vec(),
            }
            .encode(),
        ],
        "ut_pex" => vec![
            PexMessage {
                added: vec![
                    ("127.0.0.1:6881".parse().expect("addr"), 0x12),
                    ("[::1]:6882".parse().expect("addr"), 0x02),
                ],
                dropped: vec!["127.0.0.2:6881".parse().expect("addr")],
            }
            .encode(),
            bencode::dict([("added", Owned::Bytes(vec![127, 0, 0, 1, 0x1A, 0xE1]))]).encode(),
        ],
        other => panic!("no seeds for target {other}"),
    }
}

#[test]
fn corpora_and_mutations_do_not_break_any_target() {
    for (name, target) in TARGETS {
        let files = corpus(name);
        for (path, bytes) in &files {
            // A panic names the file through this context.
            eprintln!("replaying {path}");
            target(bytes);
        }
        let mut inputs: Vec<Vec<u8>> = files.into_iter().map(|(_, b)| b).collect();
        inputs.extend(seeds(name));
        for seed in seeds(name) {
            target(&seed);
        }
        let mut rng = StdRng::seed_from_u64(0x5EED_F022);
        for _ in 0..MUTATIONS {
            let base = &inputs[rng.gen_range(0..inputs.len())];
            let mutated = mutate(&mut rng, base);
            target(&mutated);
        }
    }
}

#[test]
fn every_target_has_a_committed_corpus() {
    for (name, _) in TARGETS {
        assert!(
            !corpus(name).is_empty(),
            "fuzz/corpus/{name} is empty (run this test file's write_seed_corpus)"
        );
    }
}

#[test]
#[ignore = "writes the seeds into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, seed) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("write seed");
        }
    }
}
