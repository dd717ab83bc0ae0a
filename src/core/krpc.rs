//! KRPC, the DHT's message format (BEP 5): one bencoded dictionary per UDP datagram, a query
//! (`y` = `q`), a response (`r`) or an error (`e`), matched by the transaction id `t`.
//!
//! Every decoder here takes bytes from any host on the Internet: it returns errors, never panics,
//! and keeps at most a bounded amount of what it reads ([`MAX_PACKET`], [`MAX_TID_LEN`],
//! [`MAX_NODES_READ`], [`MAX_VALUES_READ`], [`MAX_TOKEN_LEN`]). A query that is a dictionary with
//! a transaction id but bad arguments comes back as [`KrpcError::BadQuery`] with that id, so the
//! node can answer it with error 203; an unknown method decodes as [`Query::Unknown`] (answered
//! with 204).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::core::bencode::{self, BencodeError, Node, Owned};
use crate::core::compact;
use crate::core::routing::NodeId;

/// Larger datagrams are dropped unread (an Ethernet MTU; real messages are far smaller).
pub const MAX_PACKET: usize = 1500;
/// Longest transaction id accepted (BEP 5 suggests 2 bytes).
pub const MAX_TID_LEN: usize = 16;
/// Compact node infos read from one response; the rest are ignored.
pub const MAX_NODES_READ: usize = 16;
/// Peers read from one response; the rest are ignored.
pub const MAX_VALUES_READ: usize = 200;
/// Longest write token accepted.
pub const MAX_TOKEN_LEN: usize = 64;
/// Longest method name kept from an unknown query.
pub const MAX_METHOD_LEN: usize = 32;
/// Longest client version (`v`) kept; a longer one is ignored.
pub const MAX_VERSION_LEN: usize = 16;
/// A compact node info: 20-byte id, 4-byte IPv4 address, 2-byte port.
pub const NODE_INFO_LEN: usize = 26;

/// Error codes (BEP 5).
pub const ERROR_GENERIC: i64 = 201;
pub const ERROR_SERVER: i64 = 202;
pub const ERROR_PROTOCOL: i64 = 203;
pub const ERROR_METHOD_UNKNOWN: i64 = 204;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KrpcError {
    #[error("datagram of {0} bytes is larger than {MAX_PACKET}")]
    TooLarge(usize),
    #[error("bad bencode: {0}")]
    Bencode(#[from] BencodeError),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("transaction id of {0} bytes is longer than {MAX_TID_LEN}")]
    TidTooLong(usize),
    /// A query we can answer with error 203 (it has a transaction id).
    #[error("bad query: {reason}")]
    BadQuery { tid: Vec<u8>, reason: &'static str },
    #[error("compact node list of {0} bytes is not a multiple of {NODE_INFO_LEN}")]
    BadNodes(usize),
    #[error("token of {0} bytes is longer than {MAX_TOKEN_LEN}")]
    TokenTooLong(usize),
}

/// One KRPC message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transaction id, echoed in the answer.
    pub tid: Vec<u8>,
    /// Client version (`v`), if sent.
    pub version: Option<Vec<u8>>,
    /// The sender does not answer queries (BEP 43 `ro`): keep it out of routing tables.
    pub read_only: bool,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Query(Query),
    Response(Response),
    Error { code: i64, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Ping {
        id: NodeId,
    },
    FindNode {
        id: NodeId,
        target: NodeId,
    },
    GetPeers {
        id: NodeId,
        info_hash: [u8; 20],
    },
    AnnouncePeer {
        id: NodeId,
        info_hash: [u8; 20],
        port: u16,
        /// Use the datagram's source port instead of `port`.
        implied_port: bool,
        token: Vec<u8>,
    },
    /// A method we do not know (answered with 204).
    Unknown {
        id: NodeId,
        method: Vec<u8>,
    },
}

impl Query {
    /// The querying node's id.
    pub fn id(&self) -> NodeId {
        match self {
            Query::Ping { id }
            | Query::FindNode { id, .. }
            | Query::GetPeers { id, .. }
            | Query::AnnouncePeer { id, .. }
            | Query::Unknown { id, .. } => *id,
        }
    }

    pub fn method(&self) -> &[u8] {
        match self {
            Query::Ping { .. } => b"ping",
            Query::FindNode { .. } => b"find_node",
            Query::GetPeers { .. } => b"get_peers",
            Query::AnnouncePeer { .. } => b"announce_peer",
            Query::Unknown { method, .. } => method,
        }
    }
}

/// A response's named return values. Which keys are present depends on the query answered; the
/// node matches responses to queries by transaction id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: NodeId,
    /// Compact IPv4 node infos (at most [`MAX_NODES_READ`] read).
    pub nodes: Option<Vec<(NodeId, SocketAddr)>>,
    /// Compact IPv4 peers (at most [`MAX_VALUES_READ`] read; entries of other sizes skipped).
    pub values: Option<Vec<SocketAddr>>,
    pub token: Option<Vec<u8>>,
}

impl Response {
    /// A response carrying only the responder's id (ping, announce_peer).
    pub fn id_only(id: NodeId) -> Response {
        Response {
            id,
            nodes: None,
            values: None,
            token: None,
        }
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut top = vec![
            ("t", Owned::Bytes(self.tid.clone())),
            ("y", Owned::str(self.body.kind())),
        ];
        if let Some(v) = &self.version {
            top.push(("v", Owned::Bytes(v.clone())));
        }
        if self.read_only {
            top.push(("ro", Owned::Int(1)));
        }
        match &self.body {
            Body::Query(q) => {
                top.push(("q", Owned::Bytes(q.method().to_vec())));
                top.push(("a", encode_args(q)));
            }
            Body::Response(r) => top.push(("r", encode_response(r))),
            Body::Error { code, message } => top.push((
                "e",
                Owned::List(vec![Owned::Int(*code), Owned::str(message)]),
            )),
        }
        bencode::dict(top).encode()
    }
}

impl Body {
    fn kind(&self) -> &'static str {
        match self {
            Body::Query(_) => "q",
            Body::Response(_) => "r",
            Body::Error { .. } => "e",
        }
    }
}

fn encode_args(q: &Query) -> Owned {
    let id = ("id", Owned::Bytes(q.id().0.to_vec()));
    match q {
        Query::Ping { .. } | Query::Unknown { .. } => bencode::dict([id]),
        Query::FindNode { target, .. } => {
            bencode::dict([id, ("target", Owned::Bytes(target.0.to_vec()))])
        }
        Query::GetPeers { info_hash, .. } => {
            bencode::dict([id, ("info_hash", Owned::Bytes(info_hash.to_vec()))])
        }
        Query::AnnouncePeer {
            info_hash,
            port,
            implied_port,
            token,
            ..
        } => bencode::dict([
            id,
            ("implied_port", Owned::Int(i64::from(*implied_port))),
            ("info_hash", Owned::Bytes(info_hash.to_vec())),
            ("port", Owned::Int(i64::from(*port))),
            ("token", Owned::Bytes(token.clone())),
        ]),
    }
}

fn encode_response(r: &Response) -> Owned {
    let mut entries = vec![("id", Owned::Bytes(r.id.0.to_vec()))];
    if let Some(nodes) = &r.nodes {
        entries.push(("nodes", Owned::Bytes(encode_nodes(nodes))));
    }
    if let Some(values) = &r.values {
        let list = values
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| {
                let mut b = Vec::with_capacity(compact::V4_LEN);
                compact::encode_peer(a, &mut b);
                Owned::Bytes(b)
            })
            .collect();
        entries.push(("values", Owned::List(list)));
    }
    if let Some(token) = &r.token {
        entries.push(("token", Owned::Bytes(token.clone())));
    }
    bencode::dict(entries)
}

/// Compact node infos, IPv4 only (others are skipped).
pub fn encode_nodes(nodes: &[(NodeId, SocketAddr)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nodes.len() * NODE_INFO_LEN);
    for (id, addr) in nodes.iter().filter(|(_, a)| a.is_ipv4()) {
        out.extend_from_slice(&id.0);
        compact::encode_peer(addr, &mut out);
    }
    out
}

/// Reads compact node infos, at most `max` (the rest ignored); entries with port 0 are skipped.
pub fn decode_nodes(bytes: &[u8], max: usize) -> Result<Vec<(NodeId, SocketAddr)>, KrpcError> {
    if !bytes.len().is_multiple_of(NODE_INFO_LEN) {
        return Err(KrpcError::BadNodes(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(NODE_INFO_LEN)
        .filter_map(|c| {
            let id = NodeId::from_slice(&c[..20])?;
            let ip = Ipv4Addr::new(c[20], c[21], c[22], c[23]);
            let port = u16::from_be_bytes([c[24], c[25]]);
            (port != 0).then_some((id, SocketAddr::new(IpAddr::V4(ip), port)))
        })
        .take(max)
        .collect())
}

/// Decodes one datagram.
pub fn decode(packet: &[u8]) -> Result<Message, KrpcError> {
    if packet.len() > MAX_PACKET {
        return Err(KrpcError::TooLarge(packet.len()));
    }
    let root = bencode::decode(packet)?;
    if root.as_dict().is_none() {
        return Err(KrpcError::Malformed("not a dictionary"));
    }
    let tid = root
        .get("t")
        .ok_or(KrpcError::Malformed("no transaction id"))?
        .as_bytes()
        .ok_or(KrpcError::Malformed("transaction id is not a string"))?;
    if tid.len() > MAX_TID_LEN {
        return Err(KrpcError::TidTooLong(tid.len()));
    }
    let tid = tid.to_vec();
    let version = root
        .get("v")
        .and_then(Node::as_bytes)
        .filter(|v| v.len() <= MAX_VERSION_LEN)
        .map(<[u8]>::to_vec);
    let read_only = root.get("ro").and_then(Node::as_int) == Some(1);
    let kind = root
        .get("y")
        .and_then(Node::as_bytes)
        .ok_or(KrpcError::Malformed("no message type"))?;
    let body = match kind {
        b"q" => Body::Query(decode_query(&root).map_err(|reason| KrpcError::BadQuery {
            tid: tid.clone(),
            reason,
        })?),
        b"r" => Body::Response(decode_response(
            root.get("r")
                .ok_or(KrpcError::Malformed("response without r"))?,
        )?),
        b"e" => {
            let list = root
                .get("e")
                .and_then(Node::as_list)
                .ok_or(KrpcError::Malformed("error without a list"))?;
            let code = list
                .first()
                .and_then(Node::as_int)
                .ok_or(KrpcError::Malformed("error without a code"))?;
            let message = list
                .get(1)
                .and_then(Node::as_bytes)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            Body::Error { code, message }
        }
        _ => return Err(KrpcError::Malformed("unknown message type")),
    };
    Ok(Message {
        tid,
        version,
        read_only,
        body,
    })
}

fn id_arg(args: &Node, key: &'static str) -> Result<[u8; 20], &'static str> {
    args.get(key)
        .and_then(Node::as_bytes)
        .and_then(|b| <[u8; 20]>::try_from(b).ok())
        .ok_or(match key {
            "id" => "id is missing or not 20 bytes",
            "target" => "target is missing or not 20 bytes",
            _ => "info_hash is missing or not 20 bytes",
        })
}

fn decode_query(root: &Node) -> Result<Query, &'static str> {
    let method = root
        .get("q")
        .and_then(Node::as_bytes)
        .ok_or("no method name")?;
    let args = root.get("a").ok_or("no arguments")?;
    if args.as_dict().is_none() {
        return Err("arguments are not a dictionary");
    }
    let id = NodeId(id_arg(args, "id")?);
    Ok(match method {
        b"ping" => Query::Ping { id },
        b"find_node" => Query::FindNode {
            id,
            target: NodeId(id_arg(args, "target")?),
        },
        b"get_peers" => Query::GetPeers {
            id,
            info_hash: id_arg(args, "info_hash")?,
        },
        b"announce_peer" => {
            let implied_port = match args.get("implied_port") {
                None => false,
                Some(v) => v.as_int().ok_or("implied_port is not an integer")? != 0,
            };
            let port = args
                .get("port")
                .and_then(Node::as_int)
                .ok_or("port is missing")?;
            let port = match u16::try_from(port) {
                Ok(p) if p != 0 => p,
                // With implied_port the source port is used, so the argument does not matter.
                _ if implied_port => 0,
                _ => return Err("port out of range"),
            };
            let token = args
                .get("token")
                .and_then(Node::as_bytes)
                .ok_or("token is missing")?;
            if token.len() > MAX_TOKEN_LEN {
                return Err("token too long");
            }
            Query::AnnouncePeer {
                id,
                info_hash: id_arg(args, "info_hash")?,
                port,
                implied_port,
                token: token.to_vec(),
            }
        }
        other => Query::Unknown {
            id,
            method: other[..other.len().min(MAX_METHOD_LEN)].to_vec(),
        },
    })
}

fn decode_response(r: &Node) -> Result<Response, KrpcError> {
    if r.as_dict().is_none() {
        return Err(KrpcError::Malformed("r is not a dictionary"));
    }
    let id = NodeId(id_arg(r, "id").map_err(KrpcError::Malformed)?);
    let nodes = match r.get("nodes") {
        None => None,
        Some(n) => Some(decode_nodes(
            n.as_bytes()
                .ok_or(KrpcError::Malformed("nodes is not a string"))?,
            MAX_NODES_READ,
        )?),
    };
    let values = match r.get("values") {
        None => None,
        Some(v) => {
            let list = v
                .as_list()
                .ok_or(KrpcError::Malformed("values is not a list"))?;
            // IPv6 (18-byte) entries may appear; only 6-byte ones are IPv4 peers.
            let peers = list
                .iter()
                .filter_map(Node::as_bytes)
                .filter(|b| b.len() == compact::V4_LEN)
                .filter_map(|b| compact::decode_peers(b, false, 1).ok()?.pop())
                .take(MAX_VALUES_READ)
                .collect();
            Some(peers)
        }
    };
    let token = match r.get("token") {
        None => None,
        Some(t) => {
            let t = t
                .as_bytes()
                .ok_or(KrpcError::Malformed("token is not a string"))?;
            if t.len() > MAX_TOKEN_LEN {
                return Err(KrpcError::TokenTooLong(t.len()));
            }
            Some(t.to_vec())
        }
    };
    Ok(Response {
        id,
        nodes,
        values,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &[u8; 20] = b"abcdefghij0123456789";
    const ID_M: &[u8; 20] = b"mnopqrstuvwxyz123456";

    fn msg(tid: &[u8], body: Body) -> Message {
        Message {
            tid: tid.to_vec(),
            version: None,
            read_only: false,
            body,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The example packets of BEP 5, byte for byte, both ways.
    #[test]
    fn bep5_examples_decode_and_encode_byte_for_byte() {
        let q = |query| msg(b"aa", Body::Query(query));
        let r = |response| msg(b"aa", Body::Response(response));
        let fixtures: Vec<(&[u8], Message)> = vec![
            (
                b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee",
                msg(
                    b"aa",
                    Body::Error {
                        code: 201,
                        message: "A Generic Error Ocurred".into(),
                    },
                ),
            ),
            (
                b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe",
                q(Query::Ping { id: NodeId(*ID_A) }),
            ),
            (
                b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re",
                r(Response::id_only(NodeId(*ID_M))),
            ),
            (
                b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz123456e1:q9:find_node1:t2:aa1:y1:qe",
                q(Query::FindNode {
                    id: NodeId(*ID_A),
                    target: NodeId(*ID_M),
                }),
            ),
            (
                b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz123456e1:q9:get_peers1:t2:aa1:y1:qe",
                q(Query::GetPeers {
                    id: NodeId(*ID_A),
                    info_hash: *ID_M,
                }),
            ),
            (
                b"d1:rd2:id20:abcdefghij01234567895:token8:aoeusnth6:valuesl6:axje.u6:idhtnmee1:t2:aa1:y1:re",
                r(Response {
                    id: NodeId(*ID_A),
                    nodes: None,
                    // "axje.u" is 97.120.106.101 port 0x2e75.
                    values: Some(vec![
                        addr("97.120.106.101:11893"),
                        addr("105.100.104.116:28269"),
                    ]),
                    token: Some(b"aoeusnth".to_vec()),
                }),
            ),
            (
                b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe",
                q(Query::AnnouncePeer {
                    id: NodeId(*ID_A),
                    info_hash: *ID_M,
                    port: 6881,
                    implied_port: true,
                    token: b"aoeusnth".to_vec(),
                }),
            ),
        ];
        for (bytes, expected) in fixtures {
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(decode(bytes).as_ref(), Ok(&expected), "{text}");
            assert_eq!(expected.encode(), bytes, "{text}");
        }
        // BEP 5's find_node and get_peers responses abbreviate `nodes` ("def456...", 9 bytes):
        // not a whole number of node infos, so refused.
        assert_eq!(
            decode(b"d1:rd2:id20:0123456789abcdefghij5:nodes9:def456...e1:t2:aa1:y1:re"),
            Err(KrpcError::BadNodes(9))
        );
    }

    #[test]
    fn every_message_round_trips() {
        let id = NodeId([7; 20]);
        let nodes: Vec<(NodeId, SocketAddr)> = (0..16u8)
            .map(|i| {
                (
                    NodeId([i; 20]),
                    SocketAddr::from(([10, 0, 0, i], 6881 + u16::from(i))),
                )
            })
            .collect();
        let bodies = vec![
            Body::Query(Query::Ping { id }),
            Body::Query(Query::FindNode {
                id,
                target: NodeId([1; 20]),
            }),
            Body::Query(Query::GetPeers {
                id,
                info_hash: [2; 20],
            }),
            Body::Query(Query::AnnouncePeer {
                id,
                info_hash: [3; 20],
                port: 51413,
                implied_port: false,
                token: vec![0xff; 8],
            }),
            Body::Query(Query::Unknown {
                id,
                method: b"vote".to_vec(),
            }),
            Body::Response(Response::id_only(id)),
            Body::Response(Response {
                id,
                nodes: Some(nodes),
                values: None,
                token: Some(vec![1, 2, 3]),
            }),
            Body::Response(Response {
                id,
                nodes: Some(vec![]),
                values: Some(
                    (1..100u16)
                        .map(|p| SocketAddr::from(([1, 2, 3, 4], p)))
                        .collect(),
                ),
                token: Some(vec![]),
            }),
            Body::Error {
                code: ERROR_METHOD_UNKNOWN,
                message: "Method Unknown".into(),
            },
        ];
        for body in bodies {
            for (read_only, version) in [(false, None), (true, Some(b"SF01".to_vec()))] {
                let m = Message {
                    tid: vec![0, 1, 2, 3],
                    version,
                    read_only,
                    body: body.clone(),
                };
                let bytes = m.encode();
                assert!(bytes.len() <= MAX_PACKET);
                assert_eq!(decode(&bytes), Ok(m));
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let long_tid = format!("d1:t17:{}1:y1:ee", "x".repeat(17));
        let many_nodes = {
            let nodes = vec![0x41u8; NODE_INFO_LEN * 40];
            let r = bencode::dict([
                ("id", Owned::Bytes(vec![0; 20])),
                ("nodes", Owned::Bytes(nodes)),
            ]);
            bencode::dict([("t", Owned::str("aa")), ("y", Owned::str("r")), ("r", r)]).encode()
        };
        let long_token = format!(
            "d1:rd2:id20:{}5:token65:{}e1:t2:aa1:y1:re",
            "i".repeat(20),
            "k".repeat(65)
        );
        let oversize = vec![b'x'; MAX_PACKET + 1];
        type Check = fn(&KrpcError) -> bool;
        let bad_query: Check = |e| matches!(e, KrpcError::BadQuery { tid, .. } if tid == b"aa");
        let cases: Vec<(&[u8], Check)> = vec![
            (b"", |e| matches!(e, KrpcError::Bencode(_))),
            (b"le", |e| *e == KrpcError::Malformed("not a dictionary")),
            (b"d1:y1:qe", |e| *e == KrpcError::Malformed("no transaction id")),
            (b"d1:ti1e1:y1:qe", |e| matches!(e, KrpcError::Malformed(_))),
            (long_tid.as_bytes(), |e| *e == KrpcError::TidTooLong(17)),
            (b"d1:t2:aae", |e| *e == KrpcError::Malformed("no message type")),
            (b"d1:t2:aa1:y1:xe", |e| matches!(e, KrpcError::Malformed(_))),
            (b"d1:t2:aa1:y1:qe", bad_query),
            (b"d1:ade1:q4:ping1:t2:aa1:y1:qe", bad_query),
            (b"d1:ali1ee1:q4:ping1:t2:aa1:y1:qe", bad_query),
            (b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe", bad_query),
            (b"d1:ad2:idi5ee1:q4:ping1:t2:aa1:y1:qe", bad_query),
            (
                b"d1:ad2:id20:abcdefghij01234567896:target5:shorte1:q9:find_node1:t2:aa1:y1:qe",
                bad_query,
            ),
            (
                b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti0e5:token1:xe1:q13:announce_peer1:t2:aa1:y1:qe",
                bad_query,
            ),
            (
                b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti70000e5:token1:xe1:q13:announce_peer1:t2:aa1:y1:qe",
                bad_query,
            ),
            (
                b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti1ee1:q13:announce_peer1:t2:aa1:y1:qe",
                bad_query,
            ),
            (b"d1:t2:aa1:y1:re", |e| matches!(e, KrpcError::Malformed(_))),
            (b"d1:rle1:t2:aa1:y1:re", |e| matches!(e, KrpcError::Malformed(_))),
            (b"d1:rd2:id19:abcdefghij012345678e1:t2:aa1:y1:re", |e| {
                matches!(e, KrpcError::Malformed(_))
            }),
            (b"d1:rd2:id20:abcdefghij01234567895:nodes27:abcdefghij0123456789abcdefge1:t2:aa1:y1:re", |e| {
                *e == KrpcError::BadNodes(27)
            }),
            (b"d1:rd2:id20:abcdefghij01234567895:nodesi1ee1:t2:aa1:y1:re", |e| {
                matches!(e, KrpcError::Malformed(_))
            }),
            (b"d1:rd2:id20:abcdefghij01234567896:values6:axje.ue1:t2:aa1:y1:re", |e| {
                matches!(e, KrpcError::Malformed(_))
            }),
            (long_token.as_bytes(), |e| *e == KrpcError::TokenTooLong(65)),
            (b"d1:e3:abc1:t2:aa1:y1:ee", |e| matches!(e, KrpcError::Malformed(_))),
            (b"d1:ele1:t2:aa1:y1:ee", |e| matches!(e, KrpcError::Malformed(_))),
            (b"d1:t2:aa1:y1:ree", |e| matches!(e, KrpcError::Bencode(_))),
            (&oversize, |e| *e == KrpcError::TooLarge(MAX_PACKET + 1)),
        ];
        for (bytes, check) in cases {
            let got = decode(bytes);
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
            match got {
                Err(e) => assert!(check(&e), "{text}: got {e:?}"),
                Ok(m) => panic!("{text}: decoded {m:?}"),
            }
        }
        // More than MAX_NODES_READ nodes: the rest are ignored.
        let m = decode(&many_nodes).unwrap();
        let Body::Response(r) = m.body else { panic!() };
        assert_eq!(r.nodes.unwrap().len(), MAX_NODES_READ);
    }

    #[test]
    fn lenient_where_harmless() {
        // Unknown methods decode (answered with 204); odd-sized values are skipped; a long `v`
        // is ignored; implied_port makes port irrelevant.
        let m = decode(
            b"d1:ad2:id20:abcdefghij0123456789e1:q4:vote1:t2:aa1:v17:xxxxxxxxxxxxxxxxx1:y1:qe",
        )
        .unwrap();
        assert_eq!(
            m.body,
            Body::Query(Query::Unknown {
                id: NodeId(*ID_A),
                method: b"vote".to_vec()
            })
        );
        assert_eq!(m.version, None);
        let m = decode(b"d1:rd2:id20:abcdefghij01234567896:valuesl6:axje.u3:abc18:012345678901234567ee1:t2:aa1:y1:re").unwrap();
        let Body::Response(r) = m.body else { panic!() };
        assert_eq!(r.values, Some(vec![addr("97.120.106.101:11893")]));
        let m = decode(b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti0e5:token1:xe1:q13:announce_peer1:t2:aa1:y1:qe").unwrap();
        assert!(matches!(
            m.body,
            Body::Query(Query::AnnouncePeer {
                implied_port: true,
                ..
            })
        ));
        // Over-long values lists are cut at the bound.
        let values = (0..300u16)
            .map(|p| Owned::Bytes(vec![1, 2, 3, 4, (p >> 8) as u8, p as u8 | 1]))
            .collect();
        let r = bencode::dict([
            ("id", Owned::Bytes(vec![0; 20])),
            ("values", Owned::List(values)),
        ]);
        let bytes =
            bencode::dict([("t", Owned::str("a")), ("y", Owned::str("r")), ("r", r)]).encode();
        if bytes.len() <= MAX_PACKET {
            let Body::Response(r) = decode(&bytes).unwrap().body else {
                panic!()
            };
            assert_eq!(r.values.unwrap().len(), MAX_VALUES_READ);
        } else {
            assert_eq!(decode(&bytes), Err(KrpcError::TooLarge(bytes.len())));
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let seeds: Vec<Vec<u8>> = vec![
            b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567895:token8:aoeusnth6:valuesl6:axje.u6:idhtnmee1:t2:aa1:y1:re".to_vec(),
            b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee".to_vec(),
            Message {
                tid: vec![1, 2],
                version: Some(b"SF01".to_vec()),
                read_only: true,
                body: Body::Response(Response {
                    id: NodeId([9; 20]),
                    nodes: Some(vec![(NodeId([1; 20]), addr("1.2.3.4:5"))]),
                    values: None,
                    token: Some(vec![1; 8]),
                }),
            }
            .encode(),
        ];
        for i in 0..20_000 {
            let m = crate::core::mutate::mutate(&mut rng, &seeds[i % seeds.len()]);
            if let Ok(decoded) = decode(&m) {
                // What decodes re-encodes to something that decodes the same.
                assert_eq!(decode(&decoded.encode()), Ok(decoded));
            }
        }
    }
}
