//! One peer connection: a thin select loop, socket -> codec -> `core::peer_proto` -> actions ->
//! socket / torrent. Every protocol decision is the state machine's; this file moves bytes,
//! inputs and actions, and owns the connection's two halves (the writer runs as a future in the
//! same task, so nothing outlives the connection).
//!
//! Bounds: everything queued for the socket is counted in the memory it holds (`SendQueue`: a
//! queued block holds its whole piece). Past `MAX_UPLOAD_QUEUE` new uploads are refused
//! (rejected); past `MAX_SEND_QUEUE` the peer, which is not reading what we send, is dropped. A write that makes no progress for `net::peer::WRITE_TIMEOUT` ends it too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::layout::Lengths;
use crate::core::metadata::{self, MetadataMessage};
use crate::core::peer_proto::{
    Action, CloseReason, Command, Input, PeerConfig, PeerProto, ANNOUNCED_REQUEST_QUEUE,
};
use crate::core::pex::{self, PexMessage, PexSent};
use crate::core::picker::PeerKey;
use crate::core::wire::{BlockRequest, Handshake, Message};
use crate::engine::torrent::Torrent;
use crate::engine::PeerSource;
use crate::net::peer::{self, Outgoing, PeerIoError, PeerReader, PeerWriter};

/// Upload memory queued for one peer (whole pieces) beyond which its requests are rejected.
const MAX_UPLOAD_QUEUE: usize = 16 << 20;
/// Blocks queued for one peer (requests accepted, not yet sent) beyond which it is dropped as
/// a flood: twice the `reqq` our extension handshake announces, which honest peers respect.
const MAX_QUEUED_ANSWERS: usize = 2 * ANNOUNCED_REQUEST_QUEUE;
/// Bytes queued for one peer beyond which it is dropped: it is not reading.
const MAX_SEND_QUEUE: usize = MAX_UPLOAD_QUEUE + (1 << 20);
/// How long a closing connection may take to send what it has queued.
const LINGER: Duration = Duration::from_secs(1);
/// How often the state machine gets a tick (rates, keep-alives, idle check, pipeline top-up).
const TICK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Io(#[from] PeerIoError),
    #[error("peer violated the protocol: {0}")]
    Violation(String),
    #[error("peer not accepted (self, duplicate, banned or full)")]
    NotAccepted,
    #[error("peer does not read what we send ({0} bytes queued)")]
    NotReading(usize),
    #[error("disconnected by us")]
    Dropped,
    #[error("our writer ended")]
    WriterGone,
}

impl PeerError {
    /// Whether the peer broke the protocol (after its handshake): worth a ban, not only a
    /// disconnect.
    fn is_misbehaviour(&self) -> bool {
        matches!(
            self,
            PeerError::Violation(_) | PeerError::Io(PeerIoError::Protocol(_))
        )
    }
}

pub async fn connect_and_run(t: Arc<Torrent>, addr: SocketAddr) -> Result<(), PeerError> {
    let ours = Handshake::new(t.info_hash.0, t.peer_id);
    let r = peer::connect(addr, t.local_ip, &ours).await;
    t.lock().connect_finished();
    let (theirs, reader, writer) = r?;
    run(t, addr, true, theirs, reader, writer).await
}

/// Runs an established connection (`outgoing`: we opened it) until it ends.
pub async fn run(
    t: Arc<Torrent>,
    addr: SocketAddr,
    outgoing: bool,
    theirs: Handshake,
    reader: PeerReader,
    writer: PeerWriter,
) -> Result<(), PeerError> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let cancel = t.tasks.token().child_token();
    let Some((key, ours)) = t.peer_joined(addr, outgoing, theirs.peer_id, cmd_tx, cancel.clone())
    else {
        return Err(PeerError::NotAccepted);
    };
    log::debug!("peer {addr} connected ({})", client_name(&theirs.peer_id));
    let ours_hs = Handshake::new(t.info_hash.0, t.peer_id);
    // BEP 27: a private torrent's peers come from its trackers only.
    let pex_enabled = !t.meta.info.private;
    let fast = theirs.supports_fast() && ours_hs.supports_fast();
    let cfg = PeerConfig {
        lengths: t.lengths,
        fast,
        extensions: theirs.supports_extensions() && ours_hs.supports_extensions(),
        listen_port: t.listen_port,
        client: format!("swarmfs {}", env!("CARGO_PKG_VERSION")),
        offered_extensions: if pex_enabled {
            vec![metadata::EXTENSION_NAME, pex::EXTENSION_NAME]
        } else {
            vec![metadata::EXTENSION_NAME]
        },
        metadata_size: Some(t.meta.info_bytes.len() as u64),
    };
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(SendQueue::new(t.lengths));
    let uploaded = Arc::new(AtomicU64::new(0));
    let mut conn = Conn {
        t: t.clone(),
        key,
        proto: PeerProto::new(cfg, ours, now()),
        out: out_tx,
        urgent: urgent_tx,
        queued: queued.clone(),
        uploaded: uploaded.clone(),
        uploaded_since_tick: 0,
        pex_enabled,
        pex: PexSent::default(),
        listen_port_known: false,
    };
    // The writer is its own task, so a blocked socket write never holds up reading. When it
    // fails it cancels `writer_gone`, which ends the read loop; it is aborted if this task is
    // dropped (cancelled), and otherwise given a moment to send what is left.
    let writer_gone = CancellationToken::new();
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(
        t.clone(),
        writer,
        Queues {
            data: out_rx,
            urgent: urgent_rx,
        },
        queued,
        uploaded,
        fast,
        writer_gone.clone(),
    )));
    let result = conn.run(reader, cmd_rx, &cancel, &writer_gone).await;
    // Banned before the socket closes: the peer must not get back in by redialling at once.
    if let Some(e) = result.as_ref().err().filter(|e| e.is_misbehaviour()) {
        log::info!(
            "banning peer {} for {:?}: {e}",
            addr.ip(),
            crate::engine::state::VIOLATION_BAN
        );
        t.lock().peer_misbehaved(addr.ip(), now());
    }
    // Leaving the torrent and closing the queue happen when `conn` drops, also when this task
    // is cancelled.
    drop(conn);
    let written = tokio::time::timeout(LINGER, &mut writer.0).await;
    let result = match (result, written) {
        (Err(PeerError::WriterGone), Ok(Ok(Err(e)))) => Err(e.into()),
        (r, _) => r,
    };
    match &result {
        Err(e) if !e.is_misbehaviour() => log::debug!("peer {addr}: {e}"),
        _ => {}
    }
    result
}

/// Aborts the task when dropped (the peer task was cancelled), so the writer never outlives it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// What is queued for the writer, counted in the memory it holds: each entry's payload plus the
/// entry itself (so a flood of small messages is bounded by the memory it takes, not by its few
/// bytes on the wire). A block is a slice of its whole piece, not a copy, so while any block of a
/// piece waits the whole piece stays in memory: it counts once, in full. Counting requested bytes
/// instead let a peer that asks for one byte of every piece and never reads pin the torrent.
///
/// It also knows which blocks are queued, so a cancel (BEP 3) drops a block not yet sent: the
/// peer wants something else sooner.
struct SendQueue {
    lengths: Lengths,
    bytes: AtomicUsize,
    /// Answers to the peer's requests not yet written: blocks, and rejects (what we send when
    /// a request cannot be served, also when the upload memory is full). A peer that keeps to
    /// the request queue we announce never has more than that many.
    answers: AtomicUsize,
    queued: Mutex<QueuedBlocks>,
}

#[derive(Default)]
struct QueuedBlocks {
    /// Queued blocks by piece.
    by_piece: HashMap<u32, u32>,
    /// Queued copies of each request, and how many of those the peer cancelled.
    requests: HashMap<BlockRequest, (u32, u32)>,
}

fn request_of(piece: u32, offset: u32, data: &bytes::Bytes) -> BlockRequest {
    BlockRequest {
        piece,
        offset,
        length: data.len() as u32,
    }
}

impl SendQueue {
    const ENTRY: usize = 64;

    fn new(lengths: Lengths) -> SendQueue {
        SendQueue {
            lengths,
            bytes: AtomicUsize::new(0),
            answers: AtomicUsize::new(0),
            queued: Mutex::new(QueuedBlocks::default()),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, QueuedBlocks> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer cancelled `r`: a queued copy of it is not sent. Returns whether one was queued.
    fn cancel(&self, r: &BlockRequest) -> bool {
        match self.queued().requests.get_mut(r) {
            Some((copies, cancelled)) if *cancelled < *copies => {
                *cancelled += 1;
                true
            }
            _ => false,
        }
    }

    /// Whether the writer should skip this block (it was cancelled); consumes the cancel.
    fn take_cancelled(&self, r: &BlockRequest) -> bool {
        match self.queued().requests.get_mut(r) {
            Some((_, cancelled)) if *cancelled > 0 => {
                *cancelled -= 1;
                true
            }
            _ => false,
        }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn piece_len(&self, piece: u32) -> usize {
        self.lengths
            .piece(piece)
            .map_or(0, |p| self.lengths.piece_len(p) as usize)
    }

    /// The memory queueing a block of `piece` would add (its piece, unless already pinned),
    /// and whether nothing is pinned yet.
    fn block_cost(&self, piece: u32) -> (usize, bool) {
        let queued = self.queued();
        let piece_bytes = match queued.by_piece.contains_key(&piece) {
            true => 0,
            false => self.piece_len(piece),
        };
        (Self::ENTRY + piece_bytes, queued.by_piece.is_empty())
    }

    /// Counts an item being queued; returns the bytes queued before it and its own.
    fn add(&self, item: &Outgoing) -> (usize, usize) {
        let size = match item {
            Outgoing::Block {
                piece,
                offset,
                data,
            } => {
                self.answers.fetch_add(1, Ordering::Relaxed);
                let mut queued = self.queued();
                queued
                    .requests
                    .entry(request_of(*piece, *offset, data))
                    .or_insert((0, 0))
                    .0 += 1;
                let n = queued.by_piece.entry(*piece).or_insert(0);
                *n += 1;
                Self::ENTRY + if *n == 1 { self.piece_len(*piece) } else { 0 }
            }
            Outgoing::Message(m) => {
                if matches!(m, Message::Reject(_)) {
                    self.answers.fetch_add(1, Ordering::Relaxed);
                }
                Self::ENTRY + message_payload(m)
            }
        };
        (self.bytes.fetch_add(size, Ordering::Relaxed), size)
    }

    /// Uncounts an item the writer has written.
    fn remove(&self, item: &Outgoing) {
        let size = match item {
            Outgoing::Block {
                piece,
                offset,
                data,
            } => {
                self.answers.fetch_sub(1, Ordering::Relaxed);
                let mut queued = self.queued();
                let r = request_of(*piece, *offset, data);
                if let Some((copies, cancelled)) = queued.requests.get_mut(&r) {
                    *copies -= 1;
                    *cancelled = (*cancelled).min(*copies);
                    if *copies == 0 {
                        queued.requests.remove(&r);
                    }
                }
                let last = match queued.by_piece.get_mut(piece) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    Some(_) => queued.by_piece.remove(piece).is_some(),
                    None => false,
                };
                Self::ENTRY + if last { self.piece_len(*piece) } else { 0 }
            }
            Outgoing::Message(m) => {
                if matches!(m, Message::Reject(_)) {
                    self.answers.fetch_sub(1, Ordering::Relaxed);
                }
                Self::ENTRY + message_payload(m)
            }
        };
        self.bytes.fetch_sub(size, Ordering::Relaxed);
    }
}

fn message_payload(m: &Message) -> usize {
    match m {
        Message::Bitfield(b) => b.len(),
        Message::Extended { payload, .. } => payload.len(),
        _ => 0,
    }
}

/// Whether a message may overtake queued blocks: anything but the data and the messages about
/// serving it. The opening bitfield jumps too, so it stays ahead of every `Have`.
fn jumps_the_queue(item: &Outgoing) -> bool {
    match item {
        Outgoing::Block { .. } => false,
        Outgoing::Message(m) => !matches!(
            m,
            Message::Choke
                | Message::Unchoke
                | Message::Reject(_)
                | Message::AllowedFast(_)
                | Message::Suggest(_)
        ),
    }
}

/// The writer's two queues (see `Conn::urgent`).
struct Queues {
    data: mpsc::UnboundedReceiver<Outgoing>,
    urgent: mpsc::UnboundedReceiver<Outgoing>,
}

impl Queues {
    async fn recv(&mut self) -> Option<Outgoing> {
        tokio::select! {
            biased;
            Some(m) = self.urgent.recv() => Some(m),
            m = self.data.recv() => m,
        }
    }

    fn try_recv(&mut self) -> Option<Outgoing> {
        self.urgent
            .try_recv()
            .or_else(|_| self.data.try_recv())
            .ok()
    }
}

/// A batch of writes that never runs dry still counts its bytes this often.
const COUNT_EVERY: u64 = 1 << 20;

/// Adds block bytes written to the torrent's total and the connection's (once per batch, not
/// per block: the counters are shared atomics).
fn count_uploaded(t: &Torrent, uploaded: &AtomicU64, sent: u64) {
    if sent > 0 {
        t.counters.uploaded.fetch_add(sent, Ordering::Relaxed);
        uploaded.fetch_add(sent, Ordering::Relaxed);
    }
}

/// Writes queued messages and blocks; flushes when the queues run dry (or before waiting for
/// the upload cap).
async fn write_loop(
    t: Arc<Torrent>,
    mut writer: PeerWriter,
    mut rx: Queues,
    queued: Arc<SendQueue>,
    uploaded: Arc<AtomicU64>,
    fast: bool,
    gone: CancellationToken,
) -> Result<(), PeerIoError> {
    let _gone = gone.drop_guard();
    while let Some(item) = rx.recv().await {
        let mut next = Some(item);
        let mut sent = 0u64;
        while let Some(item) = next.take() {
            if let Outgoing::Block {
                piece,
                offset,
                data,
            } = &item
            {
                let r = request_of(*piece, *offset, data);
                if queued.take_cancelled(&r) {
                    // Cancelled while queued: not sent. A fast peer gets its one answer (BEP 6).
                    queued.remove(&item);
                    if fast {
                        writer.write(&Outgoing::Message(Message::Reject(r))).await?;
                    }
                    next = rx.try_recv();
                    continue;
                }
                if let Some(wait) = t.upload_limit.as_ref().and_then(|l| l.take(data.len())) {
                    // What is written goes out before we sleep, and is counted: under a cap
                    // the queues never run dry, and nothing would be flushed or counted.
                    writer.flush().await?;
                    count_uploaded(&t, &uploaded, std::mem::take(&mut sent));
                    tokio::time::sleep(wait).await;
                }
            }
            writer.write(&item).await?;
            queued.remove(&item);
            if let Outgoing::Block { data, .. } = &item {
                sent += data.len() as u64;
                if sent >= COUNT_EVERY {
                    count_uploaded(&t, &uploaded, std::mem::take(&mut sent));
                }
            }
            next = rx.try_recv();
        }
        writer.flush().await?;
        count_uploaded(&t, &uploaded, sent);
    }
    writer.shutdown().await;
    Ok(())
}

struct Conn {
    t: Arc<Torrent>,
    key: PeerKey,
    proto: PeerProto,
    /// Blocks and the messages whose order relative to them matters (choke, unchoke, reject).
    out: mpsc::UnboundedSender<Outgoing>,
    /// Everything else (requests, haves, extension messages): sent before queued blocks, so
    /// under an upload cap our requests and PEX do not wait behind megabytes of piece data.
    urgent: mpsc::UnboundedSender<Outgoing>,
    /// What is queued for the writer and not yet written.
    queued: Arc<SendQueue>,
    /// Block bytes the writer sent; taken at each tick.
    uploaded: Arc<AtomicU64>,
    uploaded_since_tick: u64,
    /// PEX (BEP 11) runs on this connection: the torrent is not private.
    pex_enabled: bool,
    pex: PexSent,
    /// The peer's listen port went to the torrent (for PEX contacts).
    listen_port_known: bool,
}

impl Conn {
    async fn run(
        &mut self,
        mut reader: PeerReader,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        cancel: &CancellationToken,
        writer_gone: &CancellationToken,
    ) -> Result<(), PeerError> {
        self.apply().await?; // the opening messages
        let mut tick = tokio::time::interval_at(Instant::now() + TICK_EVERY, TICK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One select per read or command batch, not per message: at full speed a read carries
        // dozens of blocks, and re-arming every branch per block would cost more than the data.
        loop {
            while let Some(msg) = reader.try_next()? {
                self.proto.handle(Input::Message(msg), now());
                self.apply().await?;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(PeerError::Dropped),
                _ = writer_gone.cancelled() => return Err(PeerError::WriterGone),
                cmd = cmd_rx.recv() => {
                    let Some(mut c) = cmd else {
                        return Err(PeerError::Dropped);
                    };
                    loop {
                        self.proto.handle(Input::Command(c), now());
                        match cmd_rx.try_recv() {
                            Ok(next) => c = next,
                            Err(_) => break,
                        }
                    }
                    self.apply().await?;
                }
                r = reader.fill() => r?,
                _ = tick.tick() => {
                    self.uploaded_since_tick = self.uploaded.swap(0, Ordering::Relaxed);
                    let uploaded = self.uploaded_since_tick;
                    self.proto.handle(Input::Tick { uploaded }, now());
                    self.exchange_peers();
                    self.apply().await?;
                }
            }
        }
    }

    /// Carries out the state machine's actions (which may feed it more inputs).
    async fn apply(&mut self) -> Result<(), PeerError> {
        while let Some(action) = self.proto.poll_action() {
            let key = self.key;
            match action {
                Action::Send(m) => self.send(Outgoing::Message(m))?,
                Action::Upload(r) => self.upload(r).await?,
                Action::CancelUpload(r) => {
                    self.queued.cancel(&r);
                }
                Action::PeerHas(p) => self.t.lock().peer_has(p),
                Action::PeerBitfield(bf) => self.t.lock().peer_bitfield(&bf),
                Action::PeerIsSeed => self.t.lock().peer_is_seed(key),
                Action::PeerInterested(on) => self.t.lock().peer_interested(key, on, now()),
                Action::ChokedUs => self.t.lock().peer_choked_us(key),
                Action::UnchokedUs => self.t.lock().peer_unchoked_us(key),
                Action::Rejected(b) => self.t.lock().block_rejected(key, b),
                Action::Withdrawn(blocks) => self.t.lock().requests_withdrawn(key, &blocks),
                Action::BlockArrived { block, data } => {
                    if let Some(l) = &self.t.download_limit {
                        l.acquire(data.len()).await;
                    }
                    self.t.block_arrived(key, block, &data);
                }
                Action::WantBlocks(n) => {
                    let blocks = self.t.pick(key, self.proto.bitfield(), n);
                    if !blocks.is_empty() {
                        self.proto
                            .handle(Input::Command(Command::Picked(blocks)), now());
                    }
                }
                Action::PathEstimated { rtt, rate } => {
                    log::trace!(
                        "peer {key:?}: round trip {rtt:?}, {rate} B/s, queue target {}, {} in flight",
                        self.proto.queue_target(),
                        self.proto.in_flight()
                    );
                    self.t.lock().peer_path(key, rtt, rate)
                }
                Action::Rates { download, upload } => {
                    let sent = self.uploaded_since_tick;
                    self.t.lock().peer_rates(key, download, upload, sent);
                }
                Action::Extended { name, payload } if name == metadata::EXTENSION_NAME => {
                    // BEP 9: answer requests for our info dictionary; ignore the rest.
                    if let Ok(MetadataMessage::Request { piece }) =
                        MetadataMessage::decode(&payload)
                    {
                        let answer = metadata::answer_request(&self.t.meta.info_bytes, piece);
                        let payload = answer.encode().into();
                        self.proto.handle(
                            Input::Command(Command::SendExtended { name, payload }),
                            now(),
                        );
                    }
                }
                Action::Extended { name, payload } if name == pex::EXTENSION_NAME => {
                    match PexMessage::decode(&payload) {
                        Ok(msg) => self.peers_exchanged(msg),
                        Err(e) => log::debug!("peer {key}: {e}"),
                    }
                }
                Action::Extended { name, .. } => {
                    log::debug!("peer {key}: {name} message, which nothing handles yet");
                }
                Action::Close(CloseReason::Violation(what)) => {
                    return Err(PeerError::Violation(what))
                }
                Action::Close(CloseReason::Idle(d)) => return Err(PeerIoError::Idle(d).into()),
            }
        }
        Ok(())
    }

    /// Once a tick: tells the torrent the peer's listen port when it first knows it, and sends
    /// a PEX message when one is due.
    fn exchange_peers(&mut self) {
        if !self.listen_port_known {
            if let Some(port) = self.proto.their_listen_port() {
                self.t.lock().peer_listen_port(self.key, port);
                self.listen_port_known = true;
            }
        }
        if !self.pex_enabled || self.proto.their_extension_id(pex::EXTENSION_NAME).is_none() {
            return;
        }
        let contacts = self.t.lock().pex_contacts(self.key);
        if let Some(msg) = self.pex.next(&contacts, now()) {
            self.t.counters.pex_sent.fetch_add(1, Ordering::Relaxed);
            let payload = msg.encode().into();
            let name = pex::EXTENSION_NAME;
            self.proto.handle(
                Input::Command(Command::SendExtended { name, payload }),
                now(),
            );
        }
    }

    /// A PEX message arrived: its added contacts become candidates.
    fn peers_exchanged(&mut self, msg: PexMessage) {
        if !self.pex_enabled {
            return;
        }
        self.t.counters.pex_received.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.t.lock();
            for (addr, _flags) in msg.added {
                st.add_candidate(addr, PeerSource::Pex);
            }
        }
        self.t.connect_more();
    }

    fn send(&mut self, item: Outgoing) -> Result<(), PeerError> {
        let (before, size) = self.queued.add(&item);
        // Blocks are bounded where they are accepted (`upload`); the rest only by this.
        if before + size > MAX_SEND_QUEUE && !matches!(item, Outgoing::Block { .. }) {
            return Err(PeerError::NotReading(before));
        }
        let queue = if jumps_the_queue(&item) {
            &self.urgent
        } else {
            &self.out
        };
        queue.send(item).map_err(|_| PeerError::Dropped)
    }

    /// Serves a request the state machine accepted, from the cache or the disk.
    async fn upload(&mut self, r: BlockRequest) -> Result<(), PeerError> {
        let answers = self.queued.answers.load(Ordering::Relaxed);
        if answers >= MAX_QUEUED_ANSWERS {
            return Err(PeerError::Violation(format!(
                "{answers} answers to its requests queued, past the {ANNOUNCED_REQUEST_QUEUE} requests we accept"
            )));
        }
        // One piece may always be queued, even one larger than the bound.
        let (cost, nothing_pinned) = self.queued.block_cost(r.piece);
        let data = if self.queued.bytes() + cost > MAX_UPLOAD_QUEUE && !nothing_pinned {
            None
        } else {
            match self.t.lengths.piece(r.piece) {
                Some(p) => self.t.piece_data(p, false).await,
                None => None,
            }
        };
        let start = r.offset as usize;
        let block = data.and_then(|d| {
            let end = start.checked_add(r.length as usize)?;
            (end <= d.len()).then(|| d.slice(start..end))
        });
        match block {
            Some(data) => self.send(Outgoing::Block {
                piece: r.piece,
                offset: r.offset,
                data,
            }),
            None => {
                self.proto
                    .handle(Input::Command(Command::UploadUnavailable(r)), now());
                Ok(())
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.t.lock().peer_left(self.key, self.proto.bitfield());
    }
}

/// A readable client name from an Azureus-style peer id (`-lt0D60-`), for logs.
fn client_name(peer_id: &[u8; 20]) -> String {
    if peer_id[0] == b'-' && peer_id[7] == b'-' {
        String::from_utf8_lossy(&peer_id[1..7]).into_owned()
    } else {
        "unknown client".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(piece: u32, offset: u32) -> Outgoing {
        Outgoing::Block {
            piece,
            offset,
            data: bytes::Bytes::from(vec![0u8; 16 * 1024]),
        }
    }

    fn request(piece: u32, offset: u32) -> BlockRequest {
        BlockRequest {
            piece,
            offset,
            length: 16 * 1024,
        }
    }

    #[test]
    fn a_cancel_drops_one_queued_copy_and_nothing_else() {
        let lengths = Lengths::new(4 << 20, 1 << 20, 4).unwrap();
        let q = SendQueue::new(lengths);
        let (a, b) = (block(0, 0), block(0, 16 * 1024));
        q.add(&a);
        q.add(&a); // asked twice
        q.add(&b);
        assert_eq!(
            q.bytes(),
            3 * SendQueue::ENTRY + (1 << 20),
            "one piece pinned"
        );
        assert!(!q.cancel(&request(1, 0)), "not queued: nothing to cancel");
        assert!(q.cancel(&request(0, 0)));
        assert!(q.cancel(&request(0, 0)));
        assert!(!q.cancel(&request(0, 0)), "only as many cancels as copies");
        // The writer meets the copies: both skipped, then the other block is sent.
        assert!(q.take_cancelled(&request(0, 0)));
        q.remove(&a);
        assert!(q.take_cancelled(&request(0, 0)));
        q.remove(&a);
        assert!(!q.take_cancelled(&request(0, 16 * 1024)));
        q.remove(&b);
        assert_eq!(q.bytes(), 0);
        // A cancel after the block went out is not kept for a later request of it.
        q.add(&a);
        assert!(!q.take_cancelled(&request(0, 0)));
        q.remove(&a);
        assert!(!q.cancel(&request(0, 0)));
        q.add(&a);
        assert!(!q.take_cancelled(&request(0, 0)), "a new request is served");
    }
}
