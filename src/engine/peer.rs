//! One peer connection's protocol logic: interest, requests, uploads, fast-extension rejects.
//! The socket work is `net::peer`; the torrent's shared state is `engine::torrent`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::core::layout::{Bitfield, BlockRef};
use crate::core::picker::PeerKey;
use crate::core::wire::{BlockRequest, ExtendedHandshake, Handshake, Message, MAX_REQUEST_LEN};
use crate::engine::torrent::{PeerCommand, Torrent, MAX_PENDING_VERIFY};
use crate::net::peer::{self, Outgoing, PeerIoError, PeerReader, PeerWriter};

/// A peer that sends nothing at all (not even keep-alives) for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(90);
/// Requests kept in flight to one peer: grows with its rate.
const MIN_QUEUE: usize = 64;
const MAX_QUEUE: usize = 512;
/// Upload bytes queued for one peer beyond which its requests are rejected.
const MAX_UPLOAD_QUEUE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Io(#[from] PeerIoError),
    #[error("peer violated the protocol: {0}")]
    Violation(String),
    #[error("peer not accepted (self, duplicate, banned or full)")]
    NotAccepted,
    #[error("disconnected by us")]
    Dropped,
}

pub async fn connect_and_run(t: Arc<Torrent>, addr: SocketAddr) -> Result<(), PeerError> {
    let ours = Handshake::new(t.info_hash.0, t.peer_id);
    let r = peer::connect(addr, &ours).await;
    t.connect_finished();
    let (theirs, reader, writer) = r?;
    run(t, addr, theirs, reader, writer).await
}

/// Runs an established connection until it ends.
pub async fn run(
    t: Arc<Torrent>,
    addr: SocketAddr,
    theirs: Handshake,
    reader: PeerReader,
    writer: PeerWriter,
) -> Result<(), PeerError> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let Some(key) = t.register_peer(addr, theirs.peer_id, cmd_tx) else {
        return Err(PeerError::NotAccepted);
    };
    log::debug!("peer {addr} connected ({})", client_name(&theirs.peer_id));
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let writer_task = tokio::spawn(write_loop(t.clone(), key, writer, out_rx, queued.clone()));
    let mut conn = Conn {
        t: t.clone(),
        key,
        fast: theirs.supports_fast(),
        extensions: theirs.supports_extensions(),
        bitfield: Bitfield::new(t.lengths.piece_count()),
        out: out_tx,
        queued,
        peer_choking: true,
        am_interested: false,
        got_first: false,
        requested: HashSet::new(),
        in_flight: 0,
        queue_target: MIN_QUEUE,
        last_sent: Instant::now(),
    };
    let result = conn.run(reader, cmd_rx).await;
    t.unregister_peer(key, &conn.bitfield);
    drop(conn);
    let _ = writer_task.await;
    if let Err(e) = &result {
        log::debug!("peer {addr}: {e}");
    }
    result
}

/// Writes queued messages and blocks; flushes when the queue runs dry.
async fn write_loop(
    t: Arc<Torrent>,
    key: PeerKey,
    mut writer: PeerWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(item) = rx.recv().await {
        let mut next = Some(item);
        let mut uploaded = 0u64;
        while let Some(item) = next.take() {
            if let Outgoing::Block { data, .. } = &item {
                if let Some(l) = &t.upload_limit {
                    l.acquire(data.len()).await;
                }
            }
            if writer.write(&item).await.is_err() {
                return;
            }
            if let Outgoing::Block { data, .. } = &item {
                queued.fetch_sub(data.len(), Ordering::Relaxed);
                uploaded += data.len() as u64;
            }
            next = rx.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
        // Counted once per batch: the torrent's lock is not taken per block.
        if uploaded > 0 {
            t.counters.uploaded.fetch_add(uploaded, Ordering::Relaxed);
            if let Some(p) = t.lock().peers.get_mut(&key) {
                p.uploaded += uploaded;
            }
        }
    }
    writer.shutdown().await;
}

struct Conn {
    t: Arc<Torrent>,
    key: PeerKey,
    fast: bool,
    extensions: bool,
    bitfield: Bitfield,
    out: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
    peer_choking: bool,
    am_interested: bool,
    got_first: bool,
    /// Blocks we asked this peer for and may still receive (cancelled ones included).
    requested: HashSet<BlockRef>,
    in_flight: usize,
    queue_target: usize,
    last_sent: Instant,
}

impl Conn {
    fn send(&mut self, m: Message) {
        self.last_sent = Instant::now();
        let _ = self.out.send(Outgoing::Message(m));
    }

    async fn run(
        &mut self,
        mut reader: PeerReader,
        mut cmd_rx: mpsc::UnboundedReceiver<PeerCommand>,
    ) -> Result<(), PeerError> {
        // Tell the peer what we have.
        let have = self.t.lock().picker.have().clone();
        if self.fast && have.all() {
            self.send(Message::HaveAll);
        } else if self.fast && have.count_ones() == 0 {
            self.send(Message::HaveNone);
        } else if have.count_ones() > 0 {
            self.send(Message::Bitfield(bytes::Bytes::copy_from_slice(
                have.as_bytes(),
            )));
        }
        if self.extensions {
            let hs = ExtendedHandshake {
                client: Some(format!("swarmfs {}", env!("CARGO_PKG_VERSION"))),
                listen_port: Some(self.t.listen_port),
                request_queue: Some(MAX_QUEUE as u32 * 2),
                ..ExtendedHandshake::default()
            };
            self.send(Message::Extended {
                id: 0,
                payload: bytes::Bytes::from(hs.encode()),
            });
        }
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut last_received = Instant::now();
        // One select per read or command batch, not per message: at full speed a read carries
        // dozens of blocks, and re-arming every branch per block would cost more than the data.
        // Shutdown arrives as a Disconnect command.
        loop {
            while let Some(msg) = reader.try_next()? {
                self.on_message(msg).await?;
            }
            tokio::select! {
                cmd = cmd_rx.recv() => {
                    let mut cmd = cmd;
                    loop {
                        match cmd {
                            None | Some(PeerCommand::Disconnect) => return Err(PeerError::Dropped),
                            Some(c) => self.on_command(c),
                        }
                        match cmd_rx.try_recv() {
                            Ok(c) => cmd = Some(c),
                            Err(_) => break,
                        }
                    }
                }
                r = reader.fill() => {
                    r?;
                    last_received = Instant::now();
                }
                _ = tick.tick() => {
                    if self.t.is_shutting_down() {
                        return Ok(());
                    }
                    if last_received.elapsed() >= IDLE_TIMEOUT {
                        return Err(PeerIoError::Idle(IDLE_TIMEOUT).into());
                    }
                    if self.last_sent.elapsed() >= KEEPALIVE_EVERY {
                        self.send(Message::KeepAlive);
                    }
                    self.fill_requests();
                }
            }
        }
    }

    fn on_command(&mut self, c: PeerCommand) {
        match c {
            PeerCommand::Have(p) => {
                self.send(Message::Have(p));
                // We may have lost interest.
                if self.am_interested && !self.peer_has_something_we_lack() {
                    self.am_interested = false;
                    self.send(Message::NotInterested);
                }
            }
            PeerCommand::Choke => self.send(Message::Choke),
            PeerCommand::Unchoke => self.send(Message::Unchoke),
            PeerCommand::Cancel(b) => {
                if self.requested.contains(&b) {
                    self.send(Message::Cancel(BlockRequest {
                        piece: b.piece,
                        offset: b.offset,
                        length: b.length,
                    }));
                }
            }
            PeerCommand::FillRequests => {
                self.update_interest();
                self.fill_requests();
            }
            PeerCommand::Disconnect => {}
        }
    }

    /// Interest follows what the peer has, not what we fetch right now: a mount whose cache is
    /// full stays interested so its next read does not wait for an unchoke round trip.
    fn peer_has_something_we_lack(&self) -> bool {
        self.bitfield.has_any_not_in(self.t.lock().picker.have())
    }

    fn update_interest(&mut self) {
        let wants = self.peer_has_something_we_lack();
        if wants != self.am_interested {
            self.am_interested = wants;
            self.send(if wants {
                Message::Interested
            } else {
                Message::NotInterested
            });
        }
    }

    fn fill_requests(&mut self) {
        if self.peer_choking || !self.am_interested {
            return;
        }
        if self.t.pending_verify.load(Ordering::SeqCst) >= MAX_PENDING_VERIFY {
            return; // the hashing / disk backlog wakes us when it drains
        }
        let now = Instant::now();
        let blocks = {
            let mut st = self.t.lock();
            // Deepen the pipeline for fast peers: a quarter second of their rate in blocks.
            if let Some(p) = st.peers.get(&self.key) {
                let by_rate = (p.down_rate / 4.0 / 16384.0) as usize;
                self.queue_target = by_rate.clamp(MIN_QUEUE, MAX_QUEUE);
            }
            self.in_flight = st.picker.in_flight(self.key);
            if self.in_flight * 2 > self.queue_target {
                return;
            }
            let want = self.queue_target - self.in_flight;
            st.picker.pick(self.key, &self.bitfield, want, now)
        };
        if self.requested.len() > 4 * MAX_QUEUE {
            // Requests a choke discarded that the peer never answered: forget them.
            self.requested.clear();
        }
        for b in blocks {
            self.requested.insert(b);
            self.in_flight += 1;
            self.send(Message::Request(BlockRequest {
                piece: b.piece,
                offset: b.offset,
                length: b.length,
            }));
        }
    }

    fn violation(&self, what: impl Into<String>) -> PeerError {
        PeerError::Violation(what.into())
    }

    async fn on_message(&mut self, msg: Message) -> Result<(), PeerError> {
        // A bitfield (or have-all / have-none) must come before any other statement of what the
        // peer has. Clients differ in what they send before it (libtorrent its extension
        // handshake, aria2 allowed-fast messages), so only the availability messages count.
        let first = !self.got_first;
        if matches!(
            msg,
            Message::Bitfield(_) | Message::HaveAll | Message::HaveNone | Message::Have(_)
        ) {
            self.got_first = true;
        }
        let n = self.t.lengths.piece_count();
        match msg {
            Message::KeepAlive => {}
            Message::Bitfield(bytes) => {
                let bf = Bitfield::from_bytes(&bytes, n)
                    .ok_or_else(|| self.violation("bitfield of the wrong size"))?;
                self.merge_bitfield(bf, first);
            }
            Message::HaveAll | Message::HaveNone if !self.fast => {
                return Err(self.violation("fast-extension message without the fast bit"));
            }
            Message::HaveAll => self.merge_bitfield(Bitfield::full(n), first),
            Message::HaveNone => {}
            Message::Have(i) => {
                let p = self
                    .t
                    .lengths
                    .piece(i)
                    .ok_or_else(|| self.violation(format!("have for piece {i} of {n}")))?;
                if !self.bitfield.get(i) {
                    self.bitfield.set(i, true);
                    let mut st = self.t.lock();
                    st.picker.peer_has(p);
                    if self.bitfield.all() {
                        if let Some(e) = st.peers.get_mut(&self.key) {
                            e.is_seed = true;
                        }
                    }
                    drop(st);
                    if !self.am_interested {
                        self.update_interest();
                    }
                    self.fill_requests();
                }
            }
            Message::Choke => {
                self.peer_choking = true;
                let released = self.t.lock().picker.peer_choked(self.key);
                self.in_flight = 0;
                if !released.is_empty() {
                    let st = self.t.lock();
                    self.t.wake_peers(&st);
                }
            }
            Message::Unchoke => {
                self.peer_choking = false;
                self.fill_requests();
            }
            Message::Interested => self.t.on_peer_interested(self.key, true),
            Message::NotInterested => self.t.on_peer_interested(self.key, false),
            Message::Request(r) => self.on_request(r)?,
            Message::Piece {
                piece,
                offset,
                data,
            } => {
                let block = self
                    .t
                    .lengths
                    .block(piece, offset, data.len() as u32)
                    .ok_or_else(|| self.violation("piece message outside our block geometry"))?;
                if !self.requested.remove(&block) {
                    return Err(
                        self.violation(format!("piece {piece}@{offset} that we did not request"))
                    );
                }
                if let Some(l) = &self.t.download_limit {
                    l.acquire(data.len()).await;
                }
                let cancels = self.t.on_block(self.key, block, &data);
                for (tx, b) in cancels {
                    let _ = tx.send(PeerCommand::Cancel(b));
                }
                self.fill_requests();
            }
            Message::Cancel(_) => {
                // Blocks already queued go out anyway; cheap, and the peer ignores extras.
            }
            Message::Reject(r) => {
                if !self.fast {
                    return Err(self.violation("reject without the fast bit"));
                }
                if let Some(b) = self.t.lengths.block(r.piece, r.offset, r.length) {
                    if self.requested.remove(&b) {
                        self.t.lock().picker.block_rejected(self.key, b);
                    }
                }
            }
            Message::Port(_)
            | Message::Suggest(_)
            | Message::AllowedFast(_)
            | Message::Extended { .. }
            | Message::Unknown { .. } => {}
        }
        Ok(())
    }

    /// A bitfield or have-all. Normally the first statement of what the peer has; some clients
    /// (aria2 after have-none) send one later, which only adds pieces.
    fn merge_bitfield(&mut self, bf: Bitfield, first: bool) {
        if !first {
            for i in bf.iter_ones().collect::<Vec<_>>() {
                if !self.bitfield.get(i) {
                    self.bitfield.set(i, true);
                    if let Some(p) = self.t.lengths.piece(i) {
                        self.t.lock().picker.peer_has(p);
                    }
                }
            }
            let bf = self.bitfield.clone();
            return self.set_bitfield(bf, false);
        }
        self.set_bitfield(bf, true);
    }

    fn set_bitfield(&mut self, bf: Bitfield, count: bool) {
        {
            let mut st = self.t.lock();
            if count {
                st.picker.peer_has_bitfield(&bf);
            }
            if bf.all() {
                if let Some(e) = st.peers.get_mut(&self.key) {
                    e.is_seed = true;
                }
            }
        }
        self.bitfield = bf;
        self.update_interest();
        self.fill_requests();
    }

    fn on_request(&mut self, r: BlockRequest) -> Result<(), PeerError> {
        if r.length > MAX_REQUEST_LEN {
            return Err(self.violation(format!("request of {} bytes", r.length)));
        }
        if !self
            .t
            .lengths
            .request_in_bounds(r.piece, r.offset, r.length)
        {
            return Err(self.violation("request outside the torrent"));
        }
        let choking = self
            .t
            .lock()
            .peers
            .get(&self.key)
            .is_none_or(|p| p.am_choking);
        let data = if choking || self.queued.load(Ordering::Relaxed) > MAX_UPLOAD_QUEUE {
            None
        } else {
            self.t
                .lengths
                .piece(r.piece)
                .and_then(|p| self.t.piece_data(p, false))
        };
        match data {
            Some(d) => {
                let start = r.offset as usize;
                let end = start + r.length as usize;
                if end > d.len() {
                    return Err(self.violation("request past the piece end"));
                }
                self.queued.fetch_add(r.length as usize, Ordering::Relaxed);
                let _ = self.out.send(Outgoing::Block {
                    piece: r.piece,
                    offset: r.offset,
                    data: d.slice(start..end),
                });
            }
            None => {
                if self.fast {
                    self.send(Message::Reject(r));
                }
            }
        }
        Ok(())
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
