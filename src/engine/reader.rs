//! Reads of the torrent's byte stream for the mount: the pieces of a read become urgent (with
//! deadlines), a readahead window follows each sequential stream, and the read waits until the
//! pieces are verified, the read times out with no progress, or the torrent shuts down.
//! A read's pins and deadlines are held by a guard, so a read future dropped midway (the kernel
//! interrupted it, the runtime is shutting down) leaks nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::layout::PieceIndex;
pub use crate::engine::state::StreamId;
use crate::engine::torrent::Torrent;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("no progress for {0:?} waiting for pieces")]
    TimedOut(Duration),
    #[error("shutting down")]
    ShuttingDown,
    #[error("piece data unavailable")]
    Unavailable,
}

/// The pieces one read has pinned and given deadlines; released on drop.
struct ReadGuard<'a> {
    torrent: &'a Torrent,
    pieces: Vec<PieceIndex>,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.torrent.lock().read_done(&self.pieces);
    }
}

impl Torrent {
    /// Opens a readahead stream for a file spanning `[start, end)` of the torrent.
    pub fn open_stream(&self, start: u64, end: u64) -> StreamId {
        self.lock().open_stream(start, end)
    }

    pub fn close_stream(&self, id: StreamId) {
        self.lock().close_stream(id);
    }

    /// Reads `len` bytes at `offset` of the torrent's byte stream (clamped to its end).
    pub async fn read(
        self: &Arc<Self>,
        stream: Option<StreamId>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ReadError> {
        // An idle torrent wakes for a reader (the wait below allows for the reconnecting).
        if self.is_asleep() {
            self.wake();
        }
        let total = self.lengths.total_length();
        let end = offset.saturating_add(len).min(total);
        if offset >= end {
            return Ok(Vec::new());
        }
        let pieces: Vec<PieceIndex> = self
            .lengths
            .pieces_for_range(offset, end - offset)
            .filter_map(|i| self.lengths.piece(i))
            .collect();
        let mut missing =
            self.lock()
                .read_wants(stream, offset, end, &pieces, Instant::now().into_std());
        let guard = ReadGuard {
            torrent: self,
            pieces,
        };
        self.wait_for(&mut missing).await?;
        self.copy_out(&guard.pieces, offset, end).await
    }

    async fn wait_for(&self, missing: &mut Vec<PieceIndex>) -> Result<(), ReadError> {
        let timeout = self.cfg.read_timeout;
        let mut last_progress = Instant::now();
        loop {
            let notified = self.piece_done_waiter();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_shutting_down() {
                return Err(ReadError::ShuttingDown);
            }
            let before = missing.len();
            {
                let st = self.lock();
                missing.retain(|p| !st.has(*p));
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

    async fn copy_out(
        &self,
        pieces: &[PieceIndex],
        offset: u64,
        end: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::with_capacity((end - offset) as usize);
        for &p in pieces {
            let data = self
                .piece_data(p, true)
                .await
                .ok_or(ReadError::Unavailable)?;
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
