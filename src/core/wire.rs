//! The peer wire protocol as a sans-IO codec: the 68-byte handshake (BEP 3), the length-prefixed
//! messages of BEP 3, BEP 6 (fast extension) and BEP 10 (extension protocol), and the BEP 10
//! extension handshake dictionary.
//!
//! `decode` works on whatever bytes have arrived so far: it returns a message and splits its frame
//! off the buffer, or says how many more bytes it needs. It never allocates or reserves based on a
//! length prefix, and bulk payloads (piece data, bitfields, extended payloads) are zero-copy slices
//! of the receive buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the BEP 3 handshake: pstrlen, pstr, reserved, info hash, peer id.
pub const HANDSHAKE_LEN: usize = 68;
/// Requests asking for more than this are abusive; the peer layer drops such peers.
pub const MAX_REQUEST_LEN: u32 = 128 * 1024;
/// Default cap on a frame's length prefix (covers a 16 KiB piece and bitfields of 8M pieces).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";

/// BEP 10: reserved[5] & 0x10 announces the extension protocol.
const EXTENSION_BYTE: usize = 5;
const EXTENSION_BIT: u8 = 0x10;
/// BEP 6: reserved[7] & 0x04 announces the fast extension.
const FAST_BYTE: usize = 7;
const FAST_BIT: u8 = 0x04;

/// Message ids (BEP 3, BEP 6, BEP 10).
mod id {
    pub const CHOKE: u8 = 0;
    pub const UNCHOKE: u8 = 1;
    pub const INTERESTED: u8 = 2;
    pub const NOT_INTERESTED: u8 = 3;
    pub const HAVE: u8 = 4;
    pub const BITFIELD: u8 = 5;
    pub const REQUEST: u8 = 6;
    pub const PIECE: u8 = 7;
    pub const CANCEL: u8 = 8;
    pub const PORT: u8 = 9;
    pub const SUGGEST: u8 = 0x0D;
    pub const HAVE_ALL: u8 = 0x0E;
    pub const HAVE_NONE: u8 = 0x0F;
    pub const REJECT: u8 = 0x10;
    pub const ALLOWED_FAST: u8 = 0x11;
    pub const EXTENDED: u8 = 20;
}

/// Size of the frame header of a piece message: length prefix, id, index, begin.
const PIECE_HEADER_LEN: usize = 13;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame length {len} exceeds the cap of {max} bytes")]
    FrameTooLong { len: u32, max: u32 },
    #[error("message id {id} with invalid frame length {len}")]
    BadLength { id: u8, len: u32 },
    #[error("handshake needs {HANDSHAKE_LEN} bytes, got {0}")]
    HandshakeTooShort(usize),
    #[error("not a BitTorrent handshake (protocol string mismatch)")]
    BadProtocol,
    #[error("malformed extension handshake: {0}")]
    BadExtendedHandshake(&'static str),
}

/// The BEP 3 handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub reserved: [u8; 8],
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
}

impl Handshake {
    /// Our handshake: announces the extension protocol (BEP 10) and the fast extension (BEP 6).
    /// The DHT bit is left to the caller, which knows whether DHT is enabled.
    pub fn new(info_hash: [u8; 20], peer_id: [u8; 20]) -> Self {
        let mut reserved = [0u8; 8];
        reserved[EXTENSION_BYTE] |= EXTENSION_BIT;
        reserved[FAST_BYTE] |= FAST_BIT;
        Handshake {
            reserved,
            info_hash,
            peer_id,
        }
    }

    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = [0u8; HANDSHAKE_LEN];
        out[0] = PROTOCOL.len() as u8;
        out[1..20].copy_from_slice(PROTOCOL);
        out[20..28].copy_from_slice(&self.reserved);
        out[28..48].copy_from_slice(&self.info_hash);
        out[48..68].copy_from_slice(&self.peer_id);
        out
    }

    /// Decodes the first `HANDSHAKE_LEN` bytes of `buf`; later bytes are ignored.
    pub fn decode(buf: &[u8]) -> Result<Handshake, WireError> {
        let Some(bytes) = buf.get(..HANDSHAKE_LEN) else {
            return Err(WireError::HandshakeTooShort(buf.len()));
        };
        if bytes[0] as usize != PROTOCOL.len() || &bytes[1..20] != PROTOCOL {
            return Err(WireError::BadProtocol);
        }
        let mut handshake = Handshake {
            reserved: [0; 8],
            info_hash: [0; 20],
            peer_id: [0; 20],
        };
        handshake.reserved.copy_from_slice(&bytes[20..28]);
        handshake.info_hash.copy_from_slice(&bytes[28..48]);
        handshake.peer_id.copy_from_slice(&bytes[48..68]);
        Ok(handshake)
    }

    pub fn supports_fast(&self) -> bool {
        self.reserved[FAST_BYTE] & FAST_BIT != 0
    }

    pub fn supports_extensions(&self) -> bool {
        self.reserved[EXTENSION_BYTE] & EXTENSION_BIT != 0
    }
}

/// One block as named by `request`, `cancel` and `reject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRequest {
    pub piece: u32,
    pub offset: u32,
    pub length: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(Bytes),
    Request(BlockRequest),
    Piece {
        piece: u32,
        offset: u32,
        data: Bytes,
    },
    Cancel(BlockRequest),
    Port(u16),
    // BEP 6
    Suggest(u32),
    HaveAll,
    HaveNone,
    Reject(BlockRequest),
    AllowedFast(u32),
    /// BEP 10; `id` 0 is the extension handshake, others are the ids we assigned in ours.
    Extended {
        id: u8,
        payload: Bytes,
    },
    /// A message id we do not know. Its frame was consumed; BEP 3 says to ignore it.
    /// Encoding it writes the id with an empty payload.
    Unknown {
        id: u8,
    },
}

/// The result of `decode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decode {
    Message(Message),
    /// At least this many more bytes are needed before a frame is complete.
    NeedMore(usize),
}

/// Decodes one frame from the front of `buf`. On `Decode::Message` the frame's bytes have been
/// split off `buf` (piece data, bitfield and extended payloads are zero-copy slices of them).
/// Nothing is allocated or reserved based on a length prefix: a prefix over `max_frame` is an
/// error as soon as its four bytes are seen. On `NeedMore` or an error `buf` is left unchanged;
/// every error means the stream cannot be trusted and the peer should be dropped.
pub fn decode(buf: &mut BytesMut, max_frame: u32) -> Result<Decode, WireError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(Decode::NeedMore(4 - buf.len()));
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len > max_frame {
        return Err(WireError::FrameTooLong {
            len,
            max: max_frame,
        });
    }
    if len == 0 {
        buf.advance(4);
        return Ok(Decode::Message(Message::KeepAlive));
    }
    // u64 so that a prefix near u32::MAX cannot overflow a 32-bit usize.
    let frame_len = 4 + u64::from(len);
    let available = buf.len() as u64;
    if available < frame_len {
        // Bounded by max_frame + 4, so it fits in usize wherever a frame could be buffered.
        let missing = usize::try_from(frame_len - available).unwrap_or(usize::MAX);
        return Ok(Decode::NeedMore(missing));
    }
    let message_id = buf[4];
    check_length(message_id, len)?;
    let mut frame = buf.split_to(4 + len as usize).freeze();
    frame.advance(5); // length prefix and id; `frame` is now the payload
    Ok(Decode::Message(parse_payload(message_id, frame)))
}

/// Rejects a known message id whose frame length (id + payload) is impossible for it.
fn check_length(message_id: u8, len: u32) -> Result<(), WireError> {
    let valid = match message_id {
        id::CHOKE | id::UNCHOKE | id::INTERESTED | id::NOT_INTERESTED => len == 1,
        id::HAVE_ALL | id::HAVE_NONE => len == 1,
        id::HAVE | id::SUGGEST | id::ALLOWED_FAST => len == 5,
        id::REQUEST | id::CANCEL | id::REJECT => len == 13,
        id::PORT => len == 3,
        id::PIECE => len >= 9,
        id::EXTENDED => len >= 2,
        id::BITFIELD => true,
        _ => true,
    };
    if valid {
        Ok(())
    } else {
        Err(WireError::BadLength {
            id: message_id,
            len,
        })
    }
}

/// Builds the message from a payload whose length `check_length` has accepted.
fn parse_payload(message_id: u8, mut payload: Bytes) -> Message {
    match message_id {
        id::CHOKE => Message::Choke,
        id::UNCHOKE => Message::Unchoke,
        id::INTERESTED => Message::Interested,
        id::NOT_INTERESTED => Message::NotInterested,
        id::HAVE => Message::Have(payload.get_u32()),
        id::BITFIELD => Message::Bitfield(payload),
        id::REQUEST => Message::Request(get_block_request(&mut payload)),
        id::PIECE => {
            let piece = payload.get_u32();
            let offset = payload.get_u32();
            Message::Piece {
                piece,
                offset,
                data: payload,
            }
        }
        id::CANCEL => Message::Cancel(get_block_request(&mut payload)),
        id::PORT => Message::Port(payload.get_u16()),
        id::SUGGEST => Message::Suggest(payload.get_u32()),
        id::HAVE_ALL => Message::HaveAll,
        id::HAVE_NONE => Message::HaveNone,
        id::REJECT => Message::Reject(get_block_request(&mut payload)),
        id::ALLOWED_FAST => Message::AllowedFast(payload.get_u32()),
        id::EXTENDED => {
            let id = payload.get_u8();
            Message::Extended { id, payload }
        }
        other => Message::Unknown { id: other },
    }
}

fn get_block_request(payload: &mut Bytes) -> BlockRequest {
    BlockRequest {
        piece: payload.get_u32(),
        offset: payload.get_u32(),
        length: payload.get_u32(),
    }
}

/// Appends one frame for `msg` to `out`. Piece data is copied; to send a piece without copying,
/// write `encode_piece_header` and then the data.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    match msg {
        Message::KeepAlive => out.put_u32(0),
        Message::Choke => put_bare(out, id::CHOKE),
        Message::Unchoke => put_bare(out, id::UNCHOKE),
        Message::Interested => put_bare(out, id::INTERESTED),
        Message::NotInterested => put_bare(out, id::NOT_INTERESTED),
        Message::Have(piece) => put_u32_message(out, id::HAVE, *piece),
        Message::Bitfield(bits) => {
            put_header(out, id::BITFIELD, bits.len());
            out.put_slice(bits);
        }
        Message::Request(request) => put_block_request(out, id::REQUEST, request),
        Message::Piece {
            piece,
            offset,
            data,
        } => {
            out.reserve(PIECE_HEADER_LEN + data.len());
            out.put_slice(&encode_piece_header(*piece, *offset, frame_u32(data.len())));
            out.put_slice(data);
        }
        Message::Cancel(request) => put_block_request(out, id::CANCEL, request),
        Message::Port(port) => {
            put_header(out, id::PORT, 2);
            out.put_u16(*port);
        }
        Message::Suggest(piece) => put_u32_message(out, id::SUGGEST, *piece),
        Message::HaveAll => put_bare(out, id::HAVE_ALL),
        Message::HaveNone => put_bare(out, id::HAVE_NONE),
        Message::Reject(request) => put_block_request(out, id::REJECT, request),
        Message::AllowedFast(piece) => put_u32_message(out, id::ALLOWED_FAST, *piece),
        Message::Extended { id, payload } => {
            put_header(out, id::EXTENDED, 1 + payload.len());
            out.put_u8(*id);
            out.put_slice(payload);
        }
        Message::Unknown { id } => put_bare(out, *id),
    }
}

/// The 13-byte header of a piece message carrying `data_len` bytes; the payload follows it.
pub fn encode_piece_header(piece: u32, offset: u32, data_len: u32) -> [u8; 13] {
    let mut header = [0u8; PIECE_HEADER_LEN];
    header[0..4].copy_from_slice(&(9u32.wrapping_add(data_len)).to_be_bytes());
    header[4] = id::PIECE;
    header[5..9].copy_from_slice(&piece.to_be_bytes());
    header[9..13].copy_from_slice(&offset.to_be_bytes());
    header
}

/// Our own payloads are far below 4 GiB (frames are capped at `max_frame`); a larger one is a bug.
fn frame_u32(len: usize) -> u32 {
    debug_assert!(len <= (u32::MAX - 13) as usize, "payload of {len} bytes");
    len as u32
}

/// Length prefix and id for a payload of `payload_len` bytes (not counting the id).
fn put_header(out: &mut BytesMut, message_id: u8, payload_len: usize) {
    out.reserve(5 + payload_len);
    out.put_u32(frame_u32(payload_len).wrapping_add(1));
    out.put_u8(message_id);
}

fn put_bare(out: &mut BytesMut, message_id: u8) {
    put_header(out, message_id, 0);
}

fn put_u32_message(out: &mut BytesMut, message_id: u8, value: u32) {
    put_header(out, message_id, 4);
    out.put_u32(value);
}

fn put_block_request(out: &mut BytesMut, message_id: u8, request: &BlockRequest) {
    put_header(out, message_id, 12);
    out.put_u32(request.piece);
    out.put_u32(request.offset);
    out.put_u32(request.length);
}

/// The BEP 10 extension handshake (the payload of `Message::Extended { id: 0, .. }`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtendedHandshake {
    /// The "m" dictionary: extension name -> the id the sender wants to receive it as.
    /// Id 0 means the sender disabled that extension.
    pub extensions: Vec<(String, u8)>,
    /// "v": client name and version.
    pub client: Option<String>,
    /// "p": the sender's TCP listen port.
    pub listen_port: Option<u16>,
    /// "reqq": how many outstanding requests the sender accepts.
    pub request_queue: Option<u32>,
    /// "metadata_size" (BEP 9): size of the info dictionary in bytes.
    pub metadata_size: Option<u64>,
}

/// Nesting deeper than this in an extension handshake is rejected rather than recursed into.
const MAX_BENCODE_DEPTH: usize = 32;

impl ExtendedHandshake {
    /// Bencodes the dictionary, keys sorted as bencode requires.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(b'd');
        // Keys in byte order: m, metadata_size, p, reqq, v.
        out.extend_from_slice(b"1:md");
        let mut extensions: Vec<&(String, u8)> = self.extensions.iter().collect();
        extensions.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        extensions.dedup_by(|a, b| a.0 == b.0); // a bencode dict cannot repeat a key
        for (name, ext_id) in extensions {
            put_bencode_bytes(&mut out, name.as_bytes());
            put_bencode_int(&mut out, i64::from(*ext_id));
        }
        out.push(b'e');
        if let Some(size) = self.metadata_size {
            put_bencode_bytes(&mut out, b"metadata_size");
            put_bencode_int(&mut out, i64::try_from(size).unwrap_or(i64::MAX));
        }
        if let Some(port) = self.listen_port {
            put_bencode_bytes(&mut out, b"p");
            put_bencode_int(&mut out, i64::from(port));
        }
        if let Some(reqq) = self.request_queue {
            put_bencode_bytes(&mut out, b"reqq");
            put_bencode_int(&mut out, i64::from(reqq));
        }
        if let Some(client) = &self.client {
            put_bencode_bytes(&mut out, b"v");
            put_bencode_bytes(&mut out, client.as_bytes());
        }
        out.push(b'e');
        out
    }

    /// Parses the dictionary. Malformed bencode is an error; fields of an unexpected type or out
    /// of range are ignored (treated as absent), as are unknown keys, for interoperability.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut parser = BencodeParser {
            input: payload,
            pos: 0,
        };
        let mut handshake = ExtendedHandshake::default();
        parser.expect(b'd')?;
        while !parser.eat(b'e')? {
            let key = parser.bytes()?;
            match key {
                b"m" if parser.peek()? == b'd' => {
                    parser.expect(b'd')?;
                    while !parser.eat(b'e')? {
                        let name = parser.bytes()?;
                        let value = parser.value(0)?;
                        if let (Ok(name), BencodeValue::Int(ext_id)) =
                            (std::str::from_utf8(name), value)
                        {
                            if let Ok(ext_id) = u8::try_from(ext_id) {
                                handshake.extensions.push((name.to_owned(), ext_id));
                            }
                        }
                    }
                }
                b"v" => {
                    if let BencodeValue::Bytes(client) = parser.value(0)? {
                        handshake.client = Some(String::from_utf8_lossy(client).into_owned());
                    }
                }
                b"p" => handshake.listen_port = parser.int_field()?,
                b"reqq" => handshake.request_queue = parser.int_field()?,
                b"metadata_size" => handshake.metadata_size = parser.int_field()?,
                _ => {
                    parser.value(0)?;
                }
            }
        }
        Ok(handshake)
    }
}

fn put_bencode_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

fn put_bencode_int(out: &mut Vec<u8>, value: i64) {
    out.push(b'i');
    out.extend_from_slice(value.to_string().as_bytes());
    out.push(b'e');
}

/// A parsed bencode value; containers are skipped, not kept.
enum BencodeValue<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    Container,
}

/// A minimal bencode reader over a borrowed slice: no allocation, bounded recursion.
struct BencodeParser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> BencodeParser<'a> {
    fn peek(&self) -> Result<u8, WireError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(WireError::BadExtendedHandshake("truncated"))
    }

    fn expect(&mut self, byte: u8) -> Result<(), WireError> {
        if self.peek()? != byte {
            return Err(WireError::BadExtendedHandshake("unexpected byte"));
        }
        self.pos += 1;
        Ok(())
    }

    /// Consumes `byte` if it is next; errors at end of input.
    fn eat(&mut self, byte: u8) -> Result<bool, WireError> {
        let found = self.peek()? == byte;
        if found {
            self.pos += 1;
        }
        Ok(found)
    }

    /// Digits up to (not including) `terminator`, which is consumed.
    fn digits_until(&mut self, terminator: u8) -> Result<&'a [u8], WireError> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|&b| b == terminator)
            .ok_or(WireError::BadExtendedHandshake("truncated"))?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn int(&mut self) -> Result<i64, WireError> {
        self.expect(b'i')?;
        let text = self.digits_until(b'e')?;
        let (negative, digits) = match text.split_first() {
            Some((b'-', digits)) => (true, digits),
            _ => (false, text),
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(WireError::BadExtendedHandshake("bad integer"));
        }
        let mut value: i64 = 0;
        for &digit in digits {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i64::from(digit - b'0')))
                .ok_or(WireError::BadExtendedHandshake("integer overflow"))?;
        }
        Ok(if negative { -value } else { value })
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let text = self.digits_until(b':')?;
        if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
            return Err(WireError::BadExtendedHandshake("bad string length"));
        }
        // The length is checked against what is left before anything is sliced.
        let remaining = self.input.len() - self.pos;
        let mut len: usize = 0;
        for &digit in text {
            len = len
                .checked_mul(10)
                .and_then(|v| v.checked_add(usize::from(digit - b'0')))
                .filter(|&v| v <= remaining)
                .ok_or(WireError::BadExtendedHandshake(
                    "string longer than payload",
                ))?;
        }
        let bytes = &self.input[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    fn value(&mut self, depth: usize) -> Result<BencodeValue<'a>, WireError> {
        if depth > MAX_BENCODE_DEPTH {
            return Err(WireError::BadExtendedHandshake("nested too deeply"));
        }
        match self.peek()? {
            b'i' => self.int().map(BencodeValue::Int),
            b'0'..=b'9' => self.bytes().map(BencodeValue::Bytes),
            b'l' => {
                self.pos += 1;
                while !self.eat(b'e')? {
                    self.value(depth + 1)?;
                }
                Ok(BencodeValue::Container)
            }
            b'd' => {
                self.pos += 1;
                while !self.eat(b'e')? {
                    self.bytes()?;
                    self.value(depth + 1)?;
                }
                Ok(BencodeValue::Container)
            }
            _ => Err(WireError::BadExtendedHandshake("unexpected byte")),
        }
    }

    /// An integer field: `None` if the value is not an integer or does not fit `T`.
    fn int_field<T: TryFrom<i64>>(&mut self) -> Result<Option<T>, WireError> {
        Ok(match self.value(0)? {
            BencodeValue::Int(value) => T::try_from(value).ok(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn encoded(msg: &Message) -> BytesMut {
        let mut out = BytesMut::new();
        encode(msg, &mut out);
        out
    }

    fn decode_one(bytes: &[u8]) -> Result<Decode, WireError> {
        decode(&mut BytesMut::from(bytes), DEFAULT_MAX_FRAME)
    }

    fn request(piece: u32, offset: u32, length: u32) -> BlockRequest {
        BlockRequest {
            piece,
            offset,
            length,
        }
    }

    fn every_kind() -> Vec<Message> {
        vec![
            Message::KeepAlive,
            Message::Choke,
            Message::Unchoke,
            Message::Interested,
            Message::NotInterested,
            Message::Have(0xDEAD_BEEF),
            Message::Bitfield(Bytes::from_static(&[0xFF, 0x80])),
            Message::Bitfield(Bytes::new()),
            Message::Request(request(1, 16384, 16384)),
            Message::Piece {
                piece: 7,
                offset: 32768,
                data: Bytes::from(vec![0xAB; 16384]),
            },
            Message::Piece {
                piece: 0,
                offset: 0,
                data: Bytes::new(),
            },
            Message::Cancel(request(2, 0, 100)),
            Message::Port(6881),
            Message::Suggest(3),
            Message::HaveAll,
            Message::HaveNone,
            Message::Reject(request(u32::MAX, u32::MAX, u32::MAX)),
            Message::AllowedFast(9),
            Message::Extended {
                id: 0,
                payload: Bytes::from_static(b"d1:md11:ut_metadatai1eee"),
            },
            Message::Extended {
                id: 3,
                payload: Bytes::new(),
            },
            Message::Unknown { id: 21 },
        ]
    }

    #[test]
    fn every_message_kind_round_trips() {
        for msg in every_kind() {
            let mut buf = encoded(&msg);
            let decoded = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decoded, Decode::Message(msg.clone()), "{msg:?}");
            assert!(buf.is_empty(), "frame not fully consumed for {msg:?}");
        }
    }

    #[test]
    fn known_encodings_match_the_specs() {
        assert_eq!(&encoded(&Message::KeepAlive)[..], [0, 0, 0, 0]);
        assert_eq!(&encoded(&Message::Interested)[..], [0, 0, 0, 1, 2]);
        assert_eq!(&encoded(&Message::Have(5))[..], [0, 0, 0, 5, 4, 0, 0, 0, 5]);
        assert_eq!(
            &encoded(&Message::Port(0x1AE1))[..],
            [0, 0, 0, 3, 9, 0x1A, 0xE1]
        );
        assert_eq!(&encoded(&Message::HaveAll)[..], [0, 0, 0, 1, 0x0E]);
        assert_eq!(&encoded(&Message::HaveNone)[..], [0, 0, 0, 1, 0x0F]);
        assert_eq!(
            &encoded(&Message::Suggest(1))[..],
            [0, 0, 0, 5, 0x0D, 0, 0, 0, 1]
        );
        assert_eq!(
            &encoded(&Message::AllowedFast(1))[..],
            [0, 0, 0, 5, 0x11, 0, 0, 0, 1]
        );
        assert_eq!(
            &encoded(&Message::Reject(request(1, 2, 3)))[..],
            [0, 0, 0, 13, 0x10, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]
        );
        assert_eq!(
            &encoded(&Message::Extended {
                id: 2,
                payload: Bytes::from_static(b"xy")
            })[..],
            [0, 0, 0, 4, 20, 2, b'x', b'y']
        );
    }

    #[test]
    fn piece_header_matches_the_encoded_piece() {
        let data = Bytes::from_static(b"hello");
        let full = encoded(&Message::Piece {
            piece: 4,
            offset: 16384,
            data: data.clone(),
        });
        let header = encode_piece_header(4, 16384, data.len() as u32);
        assert_eq!(&full[..13], &header);
        assert_eq!(&full[13..], &data[..]);
    }

    #[test]
    fn piece_data_is_a_zero_copy_slice_of_the_buffer() {
        let mut buf = encoded(&Message::Piece {
            piece: 1,
            offset: 0,
            data: Bytes::from(vec![7u8; 16384]),
        });
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let Decode::Message(Message::Piece { data, .. }) =
            decode(&mut buf, DEFAULT_MAX_FRAME).unwrap()
        else {
            panic!("expected a piece");
        };
        let data_start = data.as_ptr() as usize;
        assert_eq!(data.len(), 16384);
        assert_eq!(
            data_start,
            start + 13,
            "data does not point into the receive buffer"
        );
        assert_eq!(data_start + data.len(), end);
    }

    #[test]
    fn byte_by_byte_feeding_needs_more_until_each_frame_is_complete() {
        let messages = every_kind();
        let mut stream = BytesMut::new();
        for msg in &messages {
            encode(msg, &mut stream);
        }
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for &byte in stream.iter() {
            buf.put_u8(byte);
            loop {
                match decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                    Decode::Message(msg) => decoded.push(msg),
                    Decode::NeedMore(n) => {
                        assert!(n >= 1);
                        break;
                    }
                }
            }
        }
        assert_eq!(decoded, messages);
        assert!(buf.is_empty());
    }

    #[test]
    fn need_more_counts_the_missing_bytes() {
        assert_eq!(decode_one(&[]), Ok(Decode::NeedMore(4)));
        assert_eq!(decode_one(&[0, 0]), Ok(Decode::NeedMore(2)));
        assert_eq!(decode_one(&[0, 0, 0, 5]), Ok(Decode::NeedMore(5)));
        assert_eq!(decode_one(&[0, 0, 0, 5, 4, 0]), Ok(Decode::NeedMore(3)));
        // A partial frame is left untouched.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 4, 0][..]);
        decode(&mut buf, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&buf[..], [0, 0, 0, 5, 4, 0]);
    }

    #[test]
    fn several_frames_in_one_buffer_decode_in_order() {
        let mut buf = BytesMut::new();
        encode(&Message::Unchoke, &mut buf);
        encode(&Message::Have(3), &mut buf);
        encode(&Message::KeepAlive, &mut buf);
        buf.put_slice(&[0, 0, 0, 5, 4]); // the start of another have
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Ok(Decode::Message(Message::Unchoke))
        );
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Ok(Decode::Message(Message::Have(3)))
        );
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Ok(Decode::Message(Message::KeepAlive))
        );
        assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME), Ok(Decode::NeedMore(4)));
    }

    #[test]
    fn length_prefix_over_the_cap_is_an_error_before_buffering() {
        let mut buf = BytesMut::with_capacity(4);
        buf.put_u32(u32::MAX);
        let capacity = buf.capacity();
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Err(WireError::FrameTooLong {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME
            })
        );
        assert_eq!(buf.capacity(), capacity, "decode grew the buffer");
        assert_eq!(buf.len(), 4);
        // Exactly at the cap is fine (and merely needs more).
        let mut buf = BytesMut::new();
        buf.put_u32(100);
        assert_eq!(decode(&mut buf, 100), Ok(Decode::NeedMore(100)));
        buf[3] = 101;
        assert_eq!(
            decode(&mut buf, 100),
            Err(WireError::FrameTooLong { len: 101, max: 100 })
        );
    }

    #[test]
    fn wrong_lengths_for_fixed_size_messages_are_errors() {
        let cases: &[(u8, u32)] = &[
            (0, 2),
            (1, 5),
            (2, 2),
            (3, 2),
            (4, 4),
            (4, 6),
            (6, 12),
            (6, 14),
            (7, 8),
            (8, 1),
            (9, 2),
            (9, 5),
            (0x0D, 1),
            (0x0E, 2),
            (0x0F, 5),
            (0x10, 9),
            (0x11, 3),
            (20, 1),
        ];
        for &(message_id, len) in cases {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.put_u8(message_id);
            buf.put_bytes(0, len as usize - 1);
            let before = buf.clone();
            assert_eq!(
                decode(&mut buf, DEFAULT_MAX_FRAME),
                Err(WireError::BadLength {
                    id: message_id,
                    len
                }),
                "id {message_id} len {len}"
            );
            assert_eq!(buf, before, "an error must leave the buffer alone");
        }
    }

    #[test]
    fn unknown_ids_are_consumed_whatever_their_payload() {
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.put_u8(0x42);
        buf.put_slice(b"abc");
        encode(&Message::Choke, &mut buf);
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Ok(Decode::Message(Message::Unknown { id: 0x42 }))
        );
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Ok(Decode::Message(Message::Choke))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn handshake_round_trips_and_sets_our_bits() {
        let ours = Handshake::new([1; 20], [2; 20]);
        assert!(ours.supports_fast());
        assert!(ours.supports_extensions());
        assert_eq!(ours.reserved, [0, 0, 0, 0, 0, 0x10, 0, 0x04]);
        assert_eq!(
            ours.reserved[7] & 0x01,
            0,
            "DHT bit must not be set by default"
        );
        let bytes = ours.encode();
        assert_eq!(bytes[0], 19);
        assert_eq!(&bytes[1..20], b"BitTorrent protocol");
        assert_eq!(Handshake::decode(&bytes), Ok(ours));
        // Trailing bytes (the first message) are ignored.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0, 0, 0, 1, 1]);
        assert_eq!(Handshake::decode(&longer), Ok(ours));

        let plain = Handshake {
            reserved: [0; 8],
            ..ours
        };
        assert!(!plain.supports_fast());
        assert!(!plain.supports_extensions());
    }

    #[test]
    fn bad_handshakes_are_rejected() {
        let good = Handshake::new([1; 20], [2; 20]).encode();
        assert_eq!(
            Handshake::decode(&good[..67]),
            Err(WireError::HandshakeTooShort(67))
        );
        assert_eq!(Handshake::decode(&[]), Err(WireError::HandshakeTooShort(0)));
        let mut bad_len = good;
        bad_len[0] = 18;
        assert_eq!(Handshake::decode(&bad_len), Err(WireError::BadProtocol));
        let mut bad_pstr = good;
        bad_pstr[1] = b'b';
        assert_eq!(Handshake::decode(&bad_pstr), Err(WireError::BadProtocol));
        // An HTTP request is not a handshake.
        let mut http = [b' '; HANDSHAKE_LEN];
        http[..14].copy_from_slice(b"GET / HTTP/1.1");
        assert_eq!(Handshake::decode(&http), Err(WireError::BadProtocol));
    }

    /// A hand-written capture of what a libtorrent-style peer sends first: handshake (extension,
    /// fast and DHT bits), extension handshake, bitfield, allowed-fast, unchoke, keep-alive and a piece.
    #[test]
    fn captured_frame_sequence_decodes() {
        let capture = concat!(
            // handshake: pstrlen, pstr, reserved, info hash, peer id "-LT2090-abcdefghijkl"
            "13426974546f7272656e742070726f746f636f6c",
            "0000000000100005",
            "0123456789abcdef0123456789abcdef01234567",
            "2d4c54323039302d6162636465666768696a6b6c",
            // extended handshake (length 0x66, id 20, ext id 0):
            // d1:md11:ut_metadatai2e6:ut_pexi1ee13:metadata_sizei31235e1:pi6881e4:reqqi500e
            // 1:v16:libtorrent/2.0.9e
            "000000661400",
            "64313a6d6431313a75745f6d65746164617461693265363a75745f7065786931",
            "656531333a6d657461646174615f73697a6569333132333565313a7069363838",
            "3165343a726571716935303065313a7631363a6c6962746f7272656e742f322e",
            "302e3965",
            // bitfield of 11 pieces: ff e0
            "0000000305ffe0",
            // allowed fast 3, unchoke, keep-alive
            "000000051100000003",
            "0000000101",
            "00000000",
            // piece 3 offset 0x4000 data "abcd"
            "0000000d07000000030000400061626364",
        );
        let bytes = hex::decode(capture).unwrap();
        let handshake = Handshake::decode(&bytes).unwrap();
        assert!(handshake.supports_extensions());
        assert!(handshake.supports_fast());
        assert_eq!(handshake.reserved[7] & 0x01, 0x01); // DHT
        assert_eq!(&handshake.peer_id[..8], b"-LT2090-");
        assert_eq!(handshake.info_hash[0], 0x01);

        let mut buf = BytesMut::from(&bytes[HANDSHAKE_LEN..]);
        let mut messages = Vec::new();
        while let Decode::Message(msg) = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            messages.push(msg);
        }
        assert!(buf.is_empty());
        assert_eq!(messages.len(), 6, "{messages:?}");
        let Message::Extended { id: 0, payload } = &messages[0] else {
            panic!("expected the extension handshake, got {:?}", messages[0]);
        };
        let ext = ExtendedHandshake::decode(payload).unwrap();
        assert_eq!(
            ext,
            ExtendedHandshake {
                extensions: vec![("ut_metadata".into(), 2), ("ut_pex".into(), 1)],
                client: Some("libtorrent/2.0.9".into()),
                listen_port: Some(6881),
                request_queue: Some(500),
                metadata_size: Some(31235),
            }
        );
        assert_eq!(
            &messages[1..],
            &[
                Message::Bitfield(Bytes::from_static(&[0xFF, 0xE0])),
                Message::AllowedFast(3),
                Message::Unchoke,
                Message::KeepAlive,
                Message::Piece {
                    piece: 3,
                    offset: 0x4000,
                    data: Bytes::from_static(b"abcd")
                },
            ]
        );
    }

    #[test]
    fn extended_handshake_round_trips_with_sorted_keys() {
        let ext = ExtendedHandshake {
            extensions: vec![("ut_pex".into(), 1), ("ut_metadata".into(), 2)],
            client: Some("swarmfs 0.1.0".into()),
            listen_port: Some(6881),
            request_queue: Some(250),
            metadata_size: Some(1234),
        };
        let bytes = ext.encode();
        assert_eq!(
            bytes,
            b"d1:md11:ut_metadatai2e6:ut_pexi1ee13:metadata_sizei1234e1:pi6881e\
              4:reqqi250e1:v13:swarmfs 0.1.0e"
        );
        let mut sorted = ext.clone();
        sorted.extensions.sort();
        assert_eq!(ExtendedHandshake::decode(&bytes), Ok(sorted));

        let empty = ExtendedHandshake::default();
        assert_eq!(empty.encode(), b"d1:mdee");
        assert_eq!(ExtendedHandshake::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn extended_handshake_ignores_unknown_and_mistyped_fields() {
        let payload = b"d1:md6:ut_pexi0e3:badi300e4:listli1eee\
                        1:pi70000e6:yourip4:\x7f\x00\x00\x01\
                        1:v3:\xffab4:reqq3:abce";
        let ext = ExtendedHandshake::decode(payload).unwrap();
        assert_eq!(ext.extensions, vec![("ut_pex".to_owned(), 0)]);
        assert_eq!(ext.listen_port, None); // out of range for a port
        assert_eq!(ext.request_queue, None); // not an integer
        assert_eq!(ext.client.as_deref(), Some("\u{FFFD}ab"));
        // "m" that is not a dict is ignored too.
        let ext = ExtendedHandshake::decode(b"d1:mi5ee").unwrap();
        assert!(ext.extensions.is_empty());
    }

    #[test]
    fn malformed_extended_handshakes_are_errors() {
        let bad: &[&[u8]] = &[
            b"",
            b"d",
            b"le",
            b"d1:m",
            b"d1:pi12",
            b"d1:pi1x2ee",
            b"d1:pie",
            b"d1:p-e",
            b"d1:v99999999999999999999999:xe",
            b"d1:v5:abce",
            b"d1:pi99999999999999999999ee",
            b"d1:xqe",
        ];
        for payload in bad {
            assert!(
                ExtendedHandshake::decode(payload).is_err(),
                "{:?}",
                String::from_utf8_lossy(payload)
            );
        }
        // Deep nesting is refused instead of recursing without bound.
        let mut deep = b"d1:x".to_vec();
        deep.extend(std::iter::repeat_n(b'l', 100_000));
        deep.extend(std::iter::repeat_n(b'e', 100_001));
        assert_eq!(
            ExtendedHandshake::decode(&deep),
            Err(WireError::BadExtendedHandshake("nested too deeply"))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5EED_0001);
        for _ in 0..5000 {
            let len = rng.gen_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Plausible length prefixes and ids reach deeper into the decoder than pure noise.
            if len >= 5 && rng.gen_bool(0.7) {
                let frame_len = rng.gen_range(0..len as u32);
                bytes[..4].copy_from_slice(&frame_len.to_be_bytes());
                bytes[4] = rng.gen_range(0..24);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let max_frame = rng.gen_range(0..128);
            // Decode until it stops making progress; every step must consume or stop.
            while let Ok(Decode::Message(_)) = decode(&mut buf, max_frame) {}
            let _ = Handshake::decode(&bytes);
            let _ = ExtendedHandshake::decode(&bytes);
            // Bencode-flavoured noise for the extension handshake parser.
            let alphabet = b"dlie0123456789:-mpvx";
            let noise: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = ExtendedHandshake::decode(&noise);
        }
    }

    fn random_message(rng: &mut StdRng) -> Message {
        let random_bytes = |rng: &mut StdRng, max: usize| {
            let len = rng.gen_range(0..=max);
            Bytes::from((0..len).map(|_| rng.gen()).collect::<Vec<u8>>())
        };
        let random_request = |rng: &mut StdRng| request(rng.gen(), rng.gen(), rng.gen());
        match rng.gen_range(0..19) {
            0 => Message::KeepAlive,
            1 => Message::Choke,
            2 => Message::Unchoke,
            3 => Message::Interested,
            4 => Message::NotInterested,
            5 => Message::Have(rng.gen()),
            6 => Message::Bitfield(random_bytes(rng, 40)),
            7 => Message::Request(random_request(rng)),
            8 => Message::Piece {
                piece: rng.gen(),
                offset: rng.gen(),
                data: random_bytes(rng, 300),
            },
            9 => Message::Cancel(random_request(rng)),
            10 => Message::Port(rng.gen()),
            11 => Message::Suggest(rng.gen()),
            12 => Message::HaveAll,
            13 => Message::HaveNone,
            14 => Message::Reject(random_request(rng)),
            15 => Message::AllowedFast(rng.gen()),
            16 | 17 => Message::Extended {
                id: rng.gen(),
                payload: random_bytes(rng, 60),
            },
            _ => {
                let unknown = [10u8, 11, 12, rng.gen_range(21..=255)];
                Message::Unknown {
                    id: unknown[rng.gen_range(0..unknown.len())],
                }
            }
        }
    }

    #[test]
    fn decode_of_encode_is_identity_over_random_messages() {
        let mut rng = StdRng::seed_from_u64(0x5EED_0002);
        for _ in 0..200 {
            let messages: Vec<Message> = (0..rng.gen_range(1..20))
                .map(|_| random_message(&mut rng))
                .collect();
            let mut stream = BytesMut::new();
            for msg in &messages {
                encode(msg, &mut stream);
            }
            // Deliver the stream in random chunks.
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let take = rng.gen_range(1..=rest.len().min(50));
                buf.put_slice(&rest[..take]);
                rest = &rest[take..];
                while let Decode::Message(msg) = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                    decoded.push(msg);
                }
            }
            assert_eq!(decoded, messages);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn random_extended_handshakes_round_trip() {
        let mut rng = StdRng::seed_from_u64(0x5EED_0003);
        for _ in 0..500 {
            let mut extensions: Vec<(String, u8)> = (0..rng.gen_range(0..5))
                .map(|i| (format!("x{i}_{}", rng.gen::<u16>()), rng.gen()))
                .collect();
            extensions.sort();
            let ext = ExtendedHandshake {
                extensions,
                client: rng.gen_bool(0.5).then(|| format!("c{}", rng.gen::<u32>())),
                listen_port: rng.gen_bool(0.5).then(|| rng.gen()),
                request_queue: rng.gen_bool(0.5).then(|| rng.gen()),
                metadata_size: rng.gen_bool(0.5).then(|| rng.gen_range(0..i64::MAX as u64)),
            };
            assert_eq!(ExtendedHandshake::decode(&ext.encode()), Ok(ext));
        }
    }
}
