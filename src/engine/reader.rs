//! Reads of the torrent's byte stream for the mount: the pieces of a read become urgent (with
//! deadlines), a readahead window follows each sequential stream, and the read waits until the
//! pieces are verified, the read times out with no progress, or the torrent shuts down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::layout::PieceIndex;
use crate::engine::torrent::{ReadStream, Torrent};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("no progress for {0:?} waiting for pieces")]
    TimedOut(Duration),
    #[error("shutting down")]
    ShuttingDown,
    #[error("piece data unavailable")]
    Unavailable,
}

/// The first readahead window of a new sequential stream.
const INITIAL_WINDOW: u64 = 2 << 20;
/// Deadline of the first piece of a read, and the step between later ones.
const URGENT_DEADLINE: Duration = Duration::from_millis(300);
const DEADLINE_STEP: Duration = Duration::from_millis(50);

pub type StreamId = u64;

impl Torrent {
    /// Opens a readahead stream for a file spanning `[start, end)` of the torrent.
    pub fn open_stream(&self, start: u64, end: u64) -> StreamId {
        let mut st = self.lock();
        let id = st.next_stream;
        st.next_stream += 1;
        st.streams.insert(
            id,
            ReadStream {
                next_offset: start,
                window: 0,
                end,
            },
        );
        id
    }

    pub fn close_stream(&self, id: StreamId) {
        let mut st = self.lock();
        st.streams.remove(&id);
        self.apply_readahead(&mut st);
    }

    /// The largest readahead window: `--readahead`, but never more than half the cache without a
    /// data dir (or readahead would evict what it fetched before anyone reads it).
    fn max_window(&self) -> u64 {
        if self.store.is_some() {
            self.cfg.readahead
        } else {
            self.cfg.readahead.min(self.cfg.cache_size / 2)
        }
    }

    fn apply_readahead(&self, st: &mut crate::engine::torrent::State) {
        let mut pieces: Vec<PieceIndex> = Vec::new();
        for s in st.streams.values() {
            if s.window == 0 {
                continue;
            }
            let end = s.next_offset.saturating_add(s.window).min(s.end);
            if end <= s.next_offset {
                continue;
            }
            for i in self
                .lengths
                .pieces_for_range(s.next_offset, end - s.next_offset)
            {
                if let Some(p) = self.lengths.piece(i) {
                    if !st.picker.has(p) && !pieces.contains(&p) {
                        pieces.push(p);
                    }
                }
            }
        }
        st.picker.set_readahead(&pieces);
    }

    /// Reads `len` bytes at `offset` of the torrent's byte stream (clamped to its end).
    pub async fn read(
        self: &Arc<Self>,
        stream: Option<StreamId>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let total = self.lengths.total_length();
        let end = offset.saturating_add(len).min(total);
        if offset >= end {
            return Ok(Vec::new());
        }
        let range = self.lengths.pieces_for_range(offset, end - offset);
        let pieces: Vec<PieceIndex> = range.filter_map(|i| self.lengths.piece(i)).collect();
        let now = Instant::now();
        let mut missing: Vec<PieceIndex> = {
            let mut st = self.lock();
            if let Some(id) = stream {
                let max = self.max_window();
                if let Some(s) = st.streams.get_mut(&id) {
                    if offset == s.next_offset
                        || (offset > s.next_offset && offset - s.next_offset < (1 << 20))
                    {
                        s.window = if s.window == 0 {
                            INITIAL_WINDOW.min(max)
                        } else {
                            (s.window * 2).min(max)
                        };
                    } else {
                        // A seek: start over small.
                        s.window = 0;
                    }
                    s.next_offset = end;
                }
            }
            let mut missing = Vec::new();
            for (i, &p) in pieces.iter().enumerate() {
                st.cache.pin(p.get());
                *st.read_waiters.entry(p.get()).or_insert(0) += 1;
                if !st.picker.has(p) {
                    let deadline = now + URGENT_DEADLINE + DEADLINE_STEP * i as u32;
                    st.picker.set_deadline(p, deadline);
                    missing.push(p);
                }
            }
            self.apply_readahead(&mut st);
            if !missing.is_empty() {
                self.wake_peers(&st);
            }
            missing
        };
        let result = self.wait_for(&mut missing).await;
        let out = match result {
            Ok(()) => self.copy_out(&pieces, offset, end),
            Err(e) => Err(e),
        };
        let mut st = self.lock();
        for &p in &pieces {
            let evicted = st.cache.unpin(p.get());
            self.after_evict(&mut st, &evicted);
            let last = match st.read_waiters.get_mut(&p.get()) {
                Some(n) => {
                    *n -= 1;
                    *n == 0
                }
                None => true,
            };
            if last {
                st.read_waiters.remove(&p.get());
                st.picker.clear_deadline(p);
            }
        }
        out
    }

    async fn wait_for(&self, missing: &mut Vec<PieceIndex>) -> Result<(), ReadError> {
        let timeout = self.cfg.read_timeout;
        let mut last_progress = Instant::now();
        loop {
            let notified = self.piece_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_shutting_down() {
                return Err(ReadError::ShuttingDown);
            }
            let before = missing.len();
            {
                let st = self.lock();
                missing.retain(|p| !st.picker.has(*p));
            }
            if missing.is_empty() {
                return Ok(());
            }
            if missing.len() < before {
                last_progress = Instant::now();
            }
            let left = timeout.saturating_sub(last_progress.elapsed());
            if left.is_zero() {
                return Err(ReadError::TimedOut(timeout));
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    fn copy_out(&self, pieces: &[PieceIndex], offset: u64, end: u64) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::with_capacity((end - offset) as usize);
        for &p in pieces {
            let data = self.piece_data(p, true).ok_or(ReadError::Unavailable)?;
            let pstart = self.lengths.piece_offset(p);
            let from = offset.max(pstart) - pstart;
            let to = end.min(pstart + data.len() as u64) - pstart;
            let slice = data
                .get(from as usize..to as usize)
                .ok_or(ReadError::Unavailable)?;
            out.extend_from_slice(slice);
        }
        Ok(out)
    }
}
