//! One peer connection's socket: the handshake, then framed messages through the `core::wire`
//! codec. No protocol decisions here; the engine's peer task makes them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpSocket, TcpStream};

use crate::core::wire::{self, Decode, Handshake, Message, HANDSHAKE_LEN};

#[derive(Debug, thiserror::Error)]
pub enum PeerIoError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("peer sent a bad handshake: {0}")]
    BadHandshake(String),
    #[error("peer is for another torrent")]
    WrongInfoHash,
    #[error("protocol error: {0}")]
    Protocol(#[from] wire::WireError),
    #[error("connection closed by peer")]
    Closed,
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("peer read nothing we sent for {0:?}")]
    WriteTimeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write the peer does not make room for within this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Either half of a connection, whatever carries it (TCP today; uTP, encryption and in-memory
/// test pipes later), so the codec and engine above never name the transport.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens a connection (from `local_ip` when given and of `addr`'s family: the address we listen
/// on, so the peer sees the address others reach us at) and exchanges handshakes; the peer must
/// answer for `ours.info_hash`.
pub async fn connect(
    addr: SocketAddr,
    local_ip: Option<IpAddr>,
    ours: &Handshake,
) -> Result<(Handshake, PeerReader, PeerWriter), PeerIoError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, open_stream(addr, local_ip))
        .await
        .map_err(|_| PeerIoError::ConnectTimeout)??;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    handshake_outgoing(Box::new(rd), Box::new(wr), ours).await
}

async fn open_stream(addr: SocketAddr, local_ip: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// Our handshake first, then theirs, on an established stream.
pub async fn handshake_outgoing(
    mut rd: ReadHalf,
    mut wr: WriteHalf,
    ours: &Handshake,
) -> Result<(Handshake, PeerReader, PeerWriter), PeerIoError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, wr.write_all(&ours.encode()))
        .await
        .map_err(|_| PeerIoError::HandshakeTimeout)??;
    let theirs = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake(&mut rd))
        .await
        .map_err(|_| PeerIoError::HandshakeTimeout)??;
    if theirs.info_hash != ours.info_hash {
        return Err(PeerIoError::WrongInfoHash);
    }
    Ok((theirs, PeerReader::new(rd), PeerWriter::new(wr)))
}

/// The first half of an incoming connection: read the peer's handshake so the caller can find the
/// torrent it wants, then `answer`.
pub async fn accept(stream: TcpStream) -> Result<(Handshake, IncomingPeer), PeerIoError> {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    accept_stream(Box::new(rd), Box::new(wr)).await
}

/// Reads the peer's handshake on an established stream (see `accept`).
pub async fn accept_stream(
    mut rd: ReadHalf,
    wr: WriteHalf,
) -> Result<(Handshake, IncomingPeer), PeerIoError> {
    let theirs = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake(&mut rd))
        .await
        .map_err(|_| PeerIoError::HandshakeTimeout)??;
    Ok((theirs, IncomingPeer { rd, wr }))
}

pub struct IncomingPeer {
    rd: ReadHalf,
    wr: WriteHalf,
}

impl IncomingPeer {
    pub async fn answer(
        mut self,
        ours: &Handshake,
    ) -> Result<(PeerReader, PeerWriter), PeerIoError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.wr.write_all(&ours.encode()))
            .await
            .map_err(|_| PeerIoError::HandshakeTimeout)??;
        Ok((PeerReader::new(self.rd), PeerWriter::new(self.wr)))
    }
}

async fn read_handshake(rd: &mut ReadHalf) -> Result<Handshake, PeerIoError> {
    let mut buf = [0u8; HANDSHAKE_LEN];
    rd.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            PeerIoError::Closed
        } else {
            PeerIoError::Io(e)
        }
    })?;
    Handshake::decode(&buf).map_err(|e| PeerIoError::BadHandshake(e.to_string()))
}

/// Reads whole messages. The buffer never grows past one frame of at most `max_frame` bytes plus
/// one read's worth, whatever the peer sends.
pub struct PeerReader {
    rd: ReadHalf,
    buf: BytesMut,
    max_frame: u32,
    need: usize,
}

const READ_CHUNK: usize = 256 * 1024;

impl PeerReader {
    fn new(rd: ReadHalf) -> Self {
        PeerReader {
            rd,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame: wire::DEFAULT_MAX_FRAME,
            need: 0,
        }
    }

    /// The next message, or an error; `idle` bounds the wait for any bytes at all.
    pub async fn next(&mut self, idle: Duration) -> Result<Message, PeerIoError> {
        loop {
            if let Some(m) = self.try_next()? {
                return Ok(m);
            }
            tokio::time::timeout(idle, self.fill())
                .await
                .map_err(|_| PeerIoError::Idle(idle))??;
        }
    }

    /// A message already buffered, if a whole one is there.
    pub fn try_next(&mut self) -> Result<Option<Message>, PeerIoError> {
        match wire::decode(&mut self.buf, self.max_frame)? {
            Decode::Message(m) => Ok(Some(m)),
            Decode::NeedMore(n) => {
                self.need = n;
                Ok(None)
            }
        }
    }

    /// Reads more bytes (one read). Cancel-safe: nothing is lost if the future is dropped.
    pub async fn fill(&mut self) -> Result<(), PeerIoError> {
        // Reserve a large chunk so a stream of 16 KiB blocks costs few syscalls; the decoder
        // already refused any frame over the cap, so `need` is bounded.
        self.buf.reserve(self.need.max(READ_CHUNK));
        let read = self.rd.read_buf(&mut self.buf).await?;
        if read == 0 {
            return Err(PeerIoError::Closed);
        }
        Ok(())
    }
}

/// What the writer task sends: an encoded frame, or a piece block whose payload is written
/// straight from the cache's buffer.
#[derive(Debug)]
pub enum Outgoing {
    Message(Message),
    Block {
        piece: u32,
        offset: u32,
        data: Bytes,
    },
}

pub struct PeerWriter {
    wr: BufWriter<WriteHalf>,
    scratch: BytesMut,
}

impl PeerWriter {
    fn new(wr: WriteHalf) -> Self {
        PeerWriter {
            wr: BufWriter::with_capacity(256 * 1024, wr),
            scratch: BytesMut::with_capacity(64),
        }
    }

    /// Buffers one item; call `flush` when the queue is empty. A peer that makes no room for
    /// `WRITE_TIMEOUT` fails the write. (Timing out costs one clock read when the write
    /// completes at once, the usual case with the buffer.)
    pub async fn write(&mut self, item: &Outgoing) -> Result<(), PeerIoError> {
        tokio::time::timeout(WRITE_TIMEOUT, self.write_untimed(item))
            .await
            .map_err(|_| PeerIoError::WriteTimeout(WRITE_TIMEOUT))?
            .map_err(PeerIoError::Io)
    }

    async fn write_untimed(&mut self, item: &Outgoing) -> io::Result<()> {
        match item {
            Outgoing::Message(m) => {
                self.scratch.clear();
                wire::encode(m, &mut self.scratch);
                self.wr.write_all(&self.scratch).await
            }
            Outgoing::Block {
                piece,
                offset,
                data,
            } => {
                let header = wire::encode_piece_header(*piece, *offset, data.len() as u32);
                self.wr.write_all(&header).await?;
                self.wr.write_all(data).await
            }
        }
    }

    pub async fn flush(&mut self) -> Result<(), PeerIoError> {
        tokio::time::timeout(WRITE_TIMEOUT, self.wr.flush())
            .await
            .map_err(|_| PeerIoError::WriteTimeout(WRITE_TIMEOUT))?
            .map_err(PeerIoError::Io)
    }

    /// Flushes what is buffered (bounded by `WRITE_TIMEOUT`) and closes our half.
    pub async fn shutdown(&mut self) {
        let close = async {
            let _ = self.wr.flush().await;
            let _ = self.wr.shutdown().await;
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, close).await;
    }
}
