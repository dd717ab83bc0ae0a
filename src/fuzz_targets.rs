//! The bodies of the fuzz targets, in one place: the cargo-fuzz crate in `fuzz/` calls them (one
//! line per target) and the stable test `tests/fuzz_corpus.rs` replays the committed corpora and
//! seeded mutations through them, so both exercise exactly the same code.
//!
//! Each function takes arbitrary bytes from a peer, a file or a tracker. Parsers must return an
//! error, never panic; where an encoder exists the body also checks the round trip
//! (decode -> encode -> decode gives the same value). A panic here is either a parser bug or a
//! broken property: that is what the fuzzer reports. The state machines (`peer_proto`, `dht`)
//! are driven by a sequence of inputs read from the bytes and checked after every step.
//!
//! This module only calls into `core` (pure code); it is not used by the program itself.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::core::bencode::{self, Node, Owned, Value};
use crate::core::dht::{self, Dht, DhtConfig};
use crate::core::krpc;
use crate::core::layout::{Bitfield, BlockRef, Lengths, BLOCK_SIZE};
use crate::core::magnet::Magnet;
use crate::core::metadata::{self, MetadataAssembly, MetadataMessage};
use crate::core::metainfo::{build_torrent, Info, InfoHash, Metainfo, TorrentContent, TorrentSpec};
use crate::core::names;
use crate::core::peer_proto::{
    Action, Command, Input, PeerConfig, PeerProto, MAX_CANCELLED, MAX_QUEUE, MIN_QUEUE,
};
use crate::core::pex::PexMessage;
use crate::core::routing::NodeId;
use crate::core::tracker_proto::{self, AnnounceRequest};
use crate::core::udp_tracker::{self, RequestKind};
use crate::core::wire::{self, Decode, ExtendedHandshake, Handshake, Message, DEFAULT_MAX_FRAME};

/// A fuzz target's body: arbitrary bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Target)] = &[
    ("bencode", bencode),
    ("metainfo", metainfo),
    ("magnet", magnet),
    ("wire", wire),
    ("ext_handshake", ext_handshake),
    ("peer_proto", peer_proto),
    ("tracker_http", tracker_http),
    ("udp_tracker", udp_tracker),
    ("krpc", krpc),
    ("dht", dht),
    ("ut_metadata", ut_metadata),
    ("ut_pex", ut_pex),
];

// ---------------------------------------------------------------------------------------------
// bencode, metainfo, magnet

fn owned(node: &Node<'_>) -> Owned {
    match &node.value {
        Value::Int(i) => Owned::Int(*i),
        Value::Bytes(b) => Owned::Bytes(b.to_vec()),
        Value::List(items) => Owned::List(items.iter().map(owned).collect()),
        Value::Dict(entries) => {
            let map: BTreeMap<Vec<u8>, Owned> = entries
                .iter()
                .map(|(k, v)| (k.to_vec(), owned(v)))
                .collect();
            assert_eq!(map.len(), entries.len(), "a duplicate key was accepted");
            Owned::Dict(map)
        }
    }
}

/// The bounded reader: raw spans cover the input, and decode -> encode -> decode is the identity
/// (the encoding is canonical, so encoding it again gives the same bytes).
pub fn bencode(data: &[u8]) {
    if let Ok((node, used)) = bencode::decode_prefix(data) {
        assert_eq!(node.raw, &data[..used]);
    }
    let Ok(node) = bencode::decode(data) else {
        return;
    };
    assert_eq!(node.raw, data);
    let value = owned(&node);
    let encoded = value.encode();
    let again = bencode::decode(&encoded).expect("our encoding decodes");
    assert_eq!(owned(&again), value);
    assert_eq!(owned(&again).encode(), encoded);
}

/// .torrent parsing (also the BEP 9 path: the bytes as a bare info dictionary). A parsed torrent
/// keeps its info-hash and info when its info bytes are parsed alone, its magnet link round-trips,
/// and (without pad files, with sorted paths) building it again gives the same torrent.
pub fn metainfo(data: &[u8]) {
    if let Ok(info) = Info::from_bytes(data) {
        check_info(&info);
    }
    let Ok(m) = Metainfo::from_bytes(data) else {
        return;
    };
    check_info(&m.info);
    assert_eq!(m.info_hash, InfoHash::of_info(&m.info_bytes));
    let bare = Metainfo::from_info_bytes(&m.info_bytes).expect("the info bytes parse alone");
    assert_eq!(bare.info, m.info);
    assert_eq!(bare.info_hash, m.info_hash);
    magnet_round_trip(&m.magnet());

    let Some(spec) = rebuild_spec(&m) else {
        return;
    };
    let bytes = build_torrent(&spec).expect("a parsed torrent builds again");
    let again = Metainfo::from_bytes(&bytes).expect("the rebuilt torrent parses");
    let shape = |i: &Info| {
        let files: Vec<_> = i
            .files
            .iter()
            .map(|f| (f.path.clone(), f.length, f.offset, f.pad))
            .collect();
        (
            i.name.clone(),
            i.piece_length,
            i.piece_hashes.clone(),
            files,
            i.multi_file,
            i.private,
            i.lengths,
        )
    };
    assert_eq!(shape(&again.info), shape(&m.info));
    assert_eq!(again.trackers(), m.trackers());
    assert_eq!(again.comment, m.comment);
    assert_eq!(again.created_by, m.created_by);
    assert_eq!(again.creation_date, m.creation_date);
}

fn check_info(info: &Info) {
    let mut offset = 0u64;
    for f in &info.files {
        assert_eq!(f.offset, offset);
        offset += f.length;
    }
    assert_eq!(offset, info.total_length());
    assert_eq!(
        info.piece_hashes.len() as u64,
        u64::from(info.lengths.piece_count())
    );
    for (_, f) in info.visible_files() {
        assert!(!f.path.is_empty());
        for c in &f.path {
            assert!(!c.is_empty() && c != "." && c != "..");
            assert!(!c.contains(['/', '\\', '\0']), "unsafe component {c:?}");
        }
    }
}

/// What `build_torrent` would need to write `m` again, if it can express it (no pad files, paths
/// in the sorted order the builder insists on) and if its names are ones sanitizing keeps as
/// they are. libtorrent's sanitizing, which we follow, is not idempotent: a `_` that replaced an
/// invalid byte does not count towards the 240-byte cut, so a name sanitized once may be cut
/// again, elsewhere, when it is sanitized a second time.
fn rebuild_spec(m: &Metainfo) -> Option<TorrentSpec> {
    if m.info.files.iter().any(|f| f.pad) {
        return None;
    }
    let kept = |c: &String| names::sanitize_component(c.as_bytes()).as_ref() == Some(c);
    if !kept(&m.info.name) || !m.info.files.iter().flat_map(|f| &f.path).all(kept) {
        return None;
    }
    let content = if m.info.multi_file {
        let files: Vec<(Vec<String>, u64)> = m
            .info
            .files
            .iter()
            .map(|f| (f.path.clone(), f.length))
            .collect();
        if files.windows(2).any(|w| w[0].0 >= w[1].0) {
            return None;
        }
        TorrentContent::Directory { files }
    } else {
        TorrentContent::SingleFile {
            length: m.info.total_length(),
        }
    };
    Some(TorrentSpec {
        name: m.info.name.clone(),
        content,
        piece_length: m.info.piece_length,
        piece_hashes: m.info.piece_hashes.clone(),
        trackers: m.trackers(),
        private: m.info.private,
        comment: m.comment.clone(),
        created_by: m.created_by.clone(),
        creation_date: m.creation_date,
    })
}

fn magnet_round_trip(m: &Magnet) {
    let uri = m.to_uri();
    let again = Magnet::parse(&uri).unwrap_or_else(|e| panic!("{uri:?} does not parse: {e}"));
    assert_eq!(&again, m, "{uri:?}");
}

/// Magnet URIs: parse -> to_uri -> parse gives the same link.
pub fn magnet(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Magnet::parse(text) {
        magnet_round_trip(&m);
    }
}

// ---------------------------------------------------------------------------------------------
// The peer wire protocol

/// The handshake and a stream of frames: every decoded frame encodes to exactly the bytes it was
/// decoded from (unknown ids lose their payload) and decodes again to the same message; a
/// `NeedMore(n)` is honest (once the length prefix is in, n more bytes complete the frame);
/// errors leave the buffer alone.
pub fn wire(data: &[u8]) {
    if let Ok(hs) = Handshake::decode(data) {
        assert_eq!(Handshake::decode(&hs.encode()), Ok(hs));
        assert_eq!(hs.encode()[..], data[..wire::HANDSHAKE_LEN]);
    }
    // A small cap too, so the frame-too-long path is reached with small inputs.
    for max_frame in [DEFAULT_MAX_FRAME, 64] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.clone();
            match wire::decode(&mut buf, max_frame) {
                Ok(Decode::Message(m)) => {
                    let consumed = &before[..before.len() - buf.len()];
                    let mut out = BytesMut::new();
                    wire::encode(&m, &mut out);
                    if !matches!(m, Message::Unknown { .. }) {
                        assert_eq!(&out[..], consumed, "{m:?}");
                    }
                    let mut again = out.clone();
                    assert_eq!(
                        wire::decode(&mut again, u32::MAX),
                        Ok(Decode::Message(m.clone()))
                    );
                    assert!(again.is_empty());
                }
                Ok(Decode::NeedMore(n)) => {
                    assert!(n > 0);
                    assert_eq!(buf, before);
                    // Past the length prefix, n more bytes complete the frame.
                    let mut more = buf.clone();
                    more.resize(buf.len() + n, 0);
                    let completed =
                        !matches!(wire::decode(&mut more, max_frame), Ok(Decode::NeedMore(_)));
                    assert!(completed || buf.len() < 4);
                    break;
                }
                Err(_) => {
                    assert_eq!(buf, before);
                    break;
                }
            }
        }
    }
}

/// The BEP 10 extension handshake: decode -> encode -> decode keeps every field (the encoder
/// sorts the extensions and keeps the first of a repeated name, as a bencode dictionary must).
pub fn ext_handshake(data: &[u8]) {
    let Ok(hs) = ExtendedHandshake::decode(data) else {
        return;
    };
    let mut expected = hs.clone();
    expected
        .extensions
        .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    expected.extensions.dedup_by(|a, b| a.0 == b.0);
    let encoded = hs.encode();
    let again = ExtendedHandshake::decode(&encoded).expect("our encoding decodes");
    assert_eq!(again, expected);
    assert_eq!(again.encode(), encoded);
}

/// Reads fuzz input as a sequence of small fields; past the end every read gives 0.
struct Cursor<'a> {
    data: &'a [u8],
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.data.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
    /// A piece index: mostly near the torrent's range, sometimes huge.
    fn piece(&mut self) -> u32 {
        match self.u8() {
            b @ 0..=239 => u32::from(b % 20),
            b => u32::MAX - u32::from(b - 240),
        }
    }
    /// A block: mostly well-formed, sometimes arbitrary.
    fn block(&mut self) -> wire::BlockRequest {
        let piece = self.piece();
        let offset = match self.u8() {
            b @ 0..=199 => u32::from(b % 4) * BLOCK_SIZE,
            _ => self.u32(),
        };
        let length = match self.u8() % 4 {
            0 | 1 => BLOCK_SIZE,
            2 => u32::from(self.u16()),
            _ => self.u32(),
        };
        wire::BlockRequest {
            piece,
            offset,
            length,
        }
    }
}

/// One peer's state machine fed a sequence of messages, commands and ticks. After each step:
/// what it sends encodes and decodes to itself, its requests name real blocks, uploads lie in
/// their piece, and its bounded sets stay bounded. The harness answers `WantBlocks` as the picker
/// would.
pub fn peer_proto(data: &[u8]) {
    const EXTENSIONS: [&str; 2] = ["ut_metadata", "ut_pex"];
    let mut c = Cursor { data };
    let flags = c.u8();
    let shape = c.u8();
    let piece_count = 1 + u32::from(shape % 16);
    let piece_length = 2 * BLOCK_SIZE;
    let short = u64::from(shape / 16) * 1000; // a shorter last piece
    let total = u64::from(piece_count) * u64::from(piece_length) - short;
    let Ok(lengths) = Lengths::new(total, piece_length, u64::from(piece_count)) else {
        return;
    };
    let mut ours = match (flags >> 2) % 4 {
        0 => Bitfield::new(piece_count),
        1 => Bitfield::full(piece_count),
        _ => {
            let mut b = Bitfield::new(piece_count);
            for i in (0..piece_count).filter(|i| i % 2 == u32::from(flags >> 3 & 1)) {
                b.set(i, true);
            }
            b
        }
    };
    let cfg = PeerConfig {
        lengths,
        fast: flags & 1 != 0,
        extensions: flags & 2 != 0,
        listen_port: 6881,
        client: "swarmfs-fuzz".into(),
        offered_extensions: EXTENSIONS.to_vec(),
        metadata_size: (flags & 0x40 != 0).then_some(12345),
    };
    let mut now = Instant::now();
    let mut proto = PeerProto::new(cfg, ours.clone(), now);
    let mut picked: HashSet<BlockRef> = HashSet::new();
    let mut steps = 0;
    loop {
        // Drain and check every action; answer the picker's questions.
        let mut answers = Vec::new();
        while let Some(action) = proto.poll_action() {
            match action {
                Action::Send(m) => {
                    let mut out = BytesMut::new();
                    wire::encode(&m, &mut out);
                    assert_eq!(
                        wire::decode(&mut out, DEFAULT_MAX_FRAME),
                        Ok(Decode::Message(m.clone()))
                    );
                    if let Message::Request(r) | Message::Cancel(r) = &m {
                        assert!(
                            lengths.block(r.piece, r.offset, r.length).is_some(),
                            "{m:?}"
                        );
                    }
                }
                Action::Upload(r) => {
                    assert!(lengths.request_in_bounds(r.piece, r.offset, r.length));
                    if c.u8() & 1 == 1 {
                        answers.push(Command::UploadUnavailable(r));
                    }
                }
                Action::BlockArrived { block, data } => {
                    assert!(lengths
                        .block(block.piece, block.offset, block.length)
                        .is_some());
                    assert_eq!(data.len(), block.length as usize);
                }
                Action::Rejected(block) => {
                    assert!(lengths
                        .block(block.piece, block.offset, block.length)
                        .is_some());
                }
                Action::WantBlocks(n) => {
                    let theirs = proto.bitfield().clone();
                    let blocks: Vec<BlockRef> = lengths
                        .pieces()
                        .filter(|p| theirs.get(p.get()) && !ours.get(p.get()))
                        .flat_map(|p| lengths.blocks(p))
                        .filter(|b| !picked.contains(b))
                        .take(n)
                        .collect();
                    picked.extend(blocks.iter().copied());
                    answers.push(Command::Picked(blocks));
                }
                Action::Close(_) => return,
                _ => {}
            }
        }
        assert!(proto.in_flight() <= MAX_QUEUE);
        assert!(proto.cancelled_count() <= MAX_CANCELLED);
        assert!((MIN_QUEUE..=MAX_QUEUE).contains(&proto.queue_target()));
        assert_eq!(proto.bitfield().len(), piece_count);
        if !answers.is_empty() {
            for a in answers {
                proto.handle(Input::Command(a), now);
            }
            continue;
        }
        if c.done() || steps > 10_000 {
            return;
        }
        steps += 1;
        let input = match c.u8() % 21 {
            0 => Input::Message(Message::KeepAlive),
            1 => Input::Message(Message::Choke),
            2 => Input::Message(Message::Unchoke),
            3 => Input::Message(Message::Interested),
            4 => Input::Message(Message::NotInterested),
            5 => Input::Message(Message::Have(c.piece())),
            6 => {
                let n = usize::from(c.u8() % 8);
                Input::Message(Message::Bitfield(Bytes::copy_from_slice(c.bytes(n))))
            }
            7 => Input::Message(Message::Request(c.block())),
            8 => {
                let b = c.block();
                let len = (b.length as usize).min(2 * BLOCK_SIZE as usize);
                Input::Message(Message::Piece {
                    piece: b.piece,
                    offset: b.offset,
                    data: Bytes::from(vec![0xA5; len]),
                })
            }
            9 => Input::Message(Message::Cancel(c.block())),
            10 => Input::Message(Message::Port(c.u16())),
            11 => Input::Message(Message::Suggest(c.piece())),
            12 => Input::Message(Message::HaveAll),
            13 => Input::Message(Message::HaveNone),
            14 => Input::Message(Message::Reject(c.block())),
            15 => Input::Message(Message::AllowedFast(c.piece())),
            16 => {
                let id = c.u8() % 4;
                let n = usize::from(c.u8());
                Input::Message(Message::Extended {
                    id,
                    payload: Bytes::copy_from_slice(c.bytes(n)),
                })
            }
            17 => Input::Message(Message::Unknown { id: c.u8() }),
            18 => {
                now += Duration::from_millis(u64::from(c.u16()) * 10);
                Input::Tick {
                    uploaded: u64::from(c.u32()),
                }
            }
            19 => {
                let block_of = |r: wire::BlockRequest| BlockRef {
                    piece: r.piece,
                    offset: r.offset,
                    length: r.length,
                };
                Input::Command(match c.u8() % 9 {
                    0 => {
                        let p = c.piece();
                        if p < piece_count {
                            ours.set(p, true);
                        }
                        Command::Have(p)
                    }
                    1 => {
                        let p = c.piece();
                        if p < piece_count {
                            ours.set(p, false);
                        }
                        Command::Lost(p)
                    }
                    2 => Command::Choke,
                    3 => Command::Unchoke,
                    4 => Command::Cancel(block_of(c.block())),
                    5 => {
                        let n = c.u8() % 4;
                        Command::Expired((0..n).map(|_| block_of(c.block())).collect())
                    }
                    6 => Command::Fill,
                    7 => Command::UploadUnavailable(c.block()),
                    _ => {
                        let n = usize::from(c.u8());
                        Command::SendExtended {
                            name: EXTENSIONS[usize::from(c.u8() % 2)],
                            payload: Bytes::copy_from_slice(c.bytes(n)),
                        }
                    }
                })
            }
            _ => {
                // A peer-supplied extension handshake.
                let n = usize::from(c.u8());
                Input::Message(Message::Extended {
                    id: 0,
                    payload: Bytes::copy_from_slice(c.bytes(n)),
                })
            }
        };
        proto.handle(input, now);
    }
}

// ---------------------------------------------------------------------------------------------
// Trackers

/// HTTP tracker replies (announce and scrape bodies) and, server side, the query strings of
/// announce and scrape requests. Replies round-trip through our encoders.
pub fn tracker_http(data: &[u8]) {
    if let Ok(resp) = tracker_proto::parse_announce_response(data) {
        let again =
            tracker_proto::parse_announce_response(&tracker_proto::encode_announce_response(&resp))
                .expect("our announce response parses");
        // The encoder writes IPv4 peers (`peers`) before IPv6 ones (`peers6`).
        let mut expected = resp.clone();
        expected.peers.sort_by_key(|p| p.is_ipv6());
        assert_eq!(again, expected);
    }
    if let Ok(resp) = tracker_proto::parse_scrape_response(data) {
        let again =
            tracker_proto::parse_scrape_response(&tracker_proto::encode_scrape_response(&resp))
                .expect("our scrape response parses");
        assert_eq!(again, resp);
    }
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tracker_proto::parse_scrape_query(query);
    if let Ok(q) = tracker_proto::parse_announce_query(query) {
        // What a client would send for the same announce parses back to the same fields.
        let req = AnnounceRequest {
            peer: q.peer,
            totals: q.totals,
            event: q.event,
            numwant: q.numwant.unwrap_or(50),
        };
        let url = tracker_proto::announce_url("http://127.0.0.1:6969/announce", &req)
            .expect("a valid tracker URL");
        let (_, query) = url.split_once('?').expect("the URL has a query");
        let again = tracker_proto::parse_announce_query(query).expect("our announce parses");
        assert_eq!(again.peer, q.peer);
        assert_eq!(again.totals, q.totals);
        assert_eq!(again.event, q.event);
        assert_eq!(again.numwant, Some(req.numwant));
    }
}

/// UDP tracker packets (BEP 15), both sides. Responses are read with the transaction id they
/// carry (so the id check passes) and round-trip through the server's encoders; requests
/// round-trip through the client's.
pub fn udp_tracker(data: &[u8]) {
    let tid = data
        .get(4..8)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if let Ok(id) = udp_tracker::decode_connect_response(data, tid) {
        let mut out = Vec::new();
        udp_tracker::encode_connect_response(tid, id, &mut out);
        assert_eq!(udp_tracker::decode_connect_response(&out, tid), Ok(id));
    }
    for ipv6 in [false, true] {
        if let Ok(resp) = udp_tracker::decode_announce_response(data, tid, ipv6) {
            assert!(resp
                .peers
                .iter()
                .all(|p| p.is_ipv6() == ipv6 && p.port() != 0));
            if data.len() <= udp_tracker::MAX_DATAGRAM {
                let mut out = Vec::new();
                udp_tracker::encode_announce_response(tid, &resp, ipv6, &mut out);
                assert_eq!(
                    udp_tracker::decode_announce_response(&out, tid, ipv6),
                    Ok(resp)
                );
            }
        }
    }
    let hashes: Vec<[u8; 20]> = (0..data.first().map_or(0, |n| n % 8))
        .map(|i| [i; 20])
        .collect();
    match udp_tracker::decode_scrape_response(data, tid, &hashes) {
        Ok(resp) => {
            let stats: Vec<_> = resp.files.values().copied().collect();
            let mut out = Vec::new();
            udp_tracker::encode_scrape_response(tid, &stats, &mut out);
            let known: Vec<[u8; 20]> = resp.files.keys().copied().collect();
            assert_eq!(
                udp_tracker::decode_scrape_response(&out, tid, &known),
                Ok(resp)
            );
        }
        Err(udp_tracker::UdpTrackerError::Tracker(message)) => {
            if message.len() <= udp_tracker::MAX_ERROR_MESSAGE {
                let mut out = Vec::new();
                udp_tracker::encode_error(tid, &message, &mut out);
                assert_eq!(
                    udp_tracker::decode_scrape_response(&out, tid, &hashes),
                    Err(udp_tracker::UdpTrackerError::Tracker(message))
                );
            }
        }
        Err(_) => {}
    }

    let _ = udp_tracker::request_transaction_id(data);
    let Ok(req) = udp_tracker::decode_request(data) else {
        return;
    };
    let encoded = match &req.kind {
        RequestKind::Connect => udp_tracker::encode_connect_request(req.transaction_id),
        RequestKind::Announce { query, key } => {
            let Some(numwant) = query.numwant else {
                return; // a negative numwant (-1: "default") has no u32 form
            };
            let announce = AnnounceRequest {
                peer: query.peer,
                totals: query.totals,
                event: query.event,
                numwant,
            };
            udp_tracker::encode_announce_request(
                req.connection_id,
                req.transaction_id,
                &announce,
                *key,
            )
        }
        RequestKind::Scrape(hashes) => {
            udp_tracker::encode_scrape_request(req.connection_id, req.transaction_id, hashes)
                .expect("at most MAX_SCRAPE_HASHES were read")
        }
    };
    let mut again = udp_tracker::decode_request(&encoded).expect("our request decodes");
    if let (RequestKind::Announce { query, .. }, RequestKind::Announce { query: orig, .. }) =
        (&mut again.kind, &req.kind)
    {
        // The client never sends an IP address (0: use the packet's source).
        assert_eq!(query.ip, None);
        query.ip.clone_from(&orig.ip);
    }
    assert_eq!(again, req);
}

// ---------------------------------------------------------------------------------------------
// DHT

/// KRPC datagrams (and the saved DHT state): decode -> encode -> decode gives the same message
/// whenever the encoding fits in a datagram.
pub fn krpc(data: &[u8]) {
    if let Ok((id, nodes)) = dht::load_saved(data) {
        assert!(nodes.len() <= dht::MAX_SAVED_NODES);
        let _ = id;
    }
    let Ok(msg) = krpc::decode(data) else {
        return;
    };
    let encoded = msg.encode();
    if encoded.len() > krpc::MAX_PACKET {
        return;
    }
    let again = krpc::decode(&encoded).unwrap_or_else(|e| panic!("{msg:?} re-decodes: {e}"));
    assert_eq!(again, msg);
}

/// A DHT node fed datagrams from a few loopback addresses, with time passing and ticks: it never
/// panics, its invariants hold after every step, everything it sends is a valid KRPC message,
/// and its saved state loads again.
pub fn dht(data: &[u8]) {
    let mut c = Cursor { data };
    let mut now = Instant::now();
    let cfg = DhtConfig {
        rate_limit: u32::from(c.u8() % 4) * 5,
        ..DhtConfig::default()
    };
    let id = NodeId([0x55; 20]);
    let mut node = Dht::new(id, cfg, 7, now);
    let contacts: Vec<SocketAddr> = (1..=4)
        .map(|i| SocketAddr::from((Ipv4Addr::new(127, 0, 0, i), 6881)))
        .collect();
    node.bootstrap(&contacts, now);
    node.get_peers([0xAA; 20], Some(6881), now);
    let mut steps = 0;
    loop {
        while let Some(t) = node.poll_transmit() {
            assert!(t.bytes.len() <= krpc::MAX_PACKET);
            krpc::decode(&t.bytes).unwrap_or_else(|e| panic!("we sent bad KRPC: {e}"));
        }
        while node.poll_event().is_some() {}
        #[cfg(debug_assertions)]
        node.check_invariants();
        if c.done() || steps > 2_000 {
            break;
        }
        steps += 1;
        let op = c.u8();
        match op % 8 {
            0 => {
                now += Duration::from_millis(u64::from(c.u16()) * 100);
                node.tick(now);
            }
            1 => {
                let _ = node.find_node(NodeId([c.u8(); 20]), now);
            }
            _ => {
                let host = c.u8();
                let from = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host % 8), 6881));
                let len = usize::from(c.u16() % 1600);
                let packet = c.bytes(len).to_vec();
                node.handle(from, &packet, now);
            }
        }
    }
    let saved = node.save();
    let (saved_id, _) = dht::load_saved(&saved).expect("our saved state loads");
    assert_eq!(saved_id, id);
}

// ---------------------------------------------------------------------------------------------
// Extension messages

/// BEP 9 `ut_metadata`: decode -> encode -> decode is the identity; a data message is fed to an
/// assembly, and a request is answered from the input taken as an info dictionary.
pub fn ut_metadata(data: &[u8]) {
    let Ok(msg) = MetadataMessage::decode(data) else {
        return;
    };
    let encoded = msg.encode();
    assert_eq!(MetadataMessage::decode(&encoded), Ok(msg.clone()));
    match msg {
        MetadataMessage::Data {
            piece,
            total_size,
            data: bytes,
        } => {
            let mut assembly = MetadataAssembly::new(InfoHash([0; 20]), Duration::from_secs(5));
            if assembly.peer_offers(total_size).is_ok() {
                let now = Instant::now();
                let _ = assembly.next_request(1, now);
                let _ = assembly.piece_arrived(1, piece, total_size, &bytes);
                let _ = assembly.progress();
            }
        }
        MetadataMessage::Request { piece } => {
            let answer = metadata::answer_request(data, piece);
            assert_eq!(MetadataMessage::decode(&answer.encode()), Ok(answer));
        }
        MetadataMessage::Reject { .. } => {}
    }
}

/// BEP 11 `ut_pex`: decode -> encode -> decode gives the same contacts (IPv4 before IPv6, as
/// the encoder groups them).
pub fn ut_pex(data: &[u8]) {
    let Ok(msg) = PexMessage::decode(data) else {
        return;
    };
    let again = PexMessage::decode(&msg.encode()).expect("our encoding decodes");
    let mut expected = msg.clone();
    expected.added.sort_by_key(|(a, _)| a.is_ipv6());
    expected.dropped.sort_by_key(|a| a.is_ipv6());
    assert_eq!(again, expected);
}
