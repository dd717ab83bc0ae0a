//! The data dir (`-d, --data-dir DIR`): verified pieces kept in the torrent's normal file tree
//! `DIR/<name>`, written through as they verify and re-verified on the next run (resume).
//!
//! [`Store`] owns one open handle per file of the torrent, opened once by [`Store::open`] and
//! never replaced; pad files (BEP 47) get none and are never created: their bytes are zeros.
//! Which files a byte range touches comes from [`FileLayout`], the one mapping in `core`.
//!
//! No lock is held across any I/O: the handles sit in an immutable `Vec`, and every read and write
//! is positional (`pread` / `pwrite` through `FileExt`), which needs only `&File` and never moves
//! a shared file position. So any number of threads read and write at once, and one slow read
//! delays only its own caller, never a read of another piece.
//!
//! The methods block. Code on the rayon pool (`verify`) or already on a blocking thread calls
//! them directly; async code uses [`Store::read_piece`] and [`Store::write`], which run them
//! through `spawn_blocking` so a slow disk never stalls a runtime worker.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rayon::prelude::*;
use sha1::{Digest, Sha1};
use tokio::task::JoinError;

use crate::core::layout::{Bitfield, FileLayout, FileSlices, Lengths};
use crate::core::metainfo::Info;

/// Alignment of whole-piece buffers: the kernel copies page-cache data several times faster into
/// a page-aligned destination than into malloc's usual 16-byte offset.
const READ_ALIGN: usize = 4096;

/// One torrent's files under the data dir.
pub struct Store {
    root: PathBuf,
    lengths: Lengths,
    layout: FileLayout,
    /// One handle per file, in stream order (the indexes of `layout`); `None` for a pad file.
    files: Vec<Option<File>>,
    /// Files that were missing or empty before `open` (now sparse zeros): resume verification
    /// need not read them, which on a fresh 1 GiB download would hash a gigabyte of zeros.
    blank: Vec<AtomicBool>,
    /// Fault injection for tests: every blocking read and write sleeps this long first.
    io_delay_nanos: AtomicU64,
}

impl Store {
    /// Opens the content at `dir/<name>`, creating every (non-pad) file at its full length so a
    /// complete tree exists even for files whose pieces have not arrived (sparse), 0-byte files
    /// included. A file that cannot be opened for writing (a read-only copy to seed from) is
    /// opened read-only; then writes to it fail and reads work.
    pub fn open(dir: &Path, info: &Info) -> io::Result<Store> {
        let root = dir.join(&info.name);
        let layout = FileLayout::from_lengths(info.files.iter().map(|f| f.length))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if layout.total_length() != info.lengths.total_length() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file lengths do not add up to the torrent's length",
            ));
        }
        let mut files = Vec::with_capacity(info.files.len());
        let mut blank = Vec::with_capacity(info.files.len());
        for f in &info.files {
            if f.pad {
                files.push(None);
                blank.push(AtomicBool::new(true));
                continue;
            }
            let path = if info.multi_file {
                f.path.iter().fold(root.clone(), |p, c| p.join(c))
            } else {
                root.clone()
            };
            let was_empty = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
            files.push(Some(open_file(&path, f.length)?));
            blank.push(AtomicBool::new(was_empty));
        }
        Ok(Store {
            root,
            lengths: info.lengths,
            layout,
            files,
            blank,
            io_delay_nanos: AtomicU64::new(0),
        })
    }

    /// `dir/<name>`: the file (single-file torrent) or directory holding the content.
    pub fn content_path(&self) -> &Path {
        &self.root
    }

    /// Reads `buf.len()` bytes of the torrent's stream at `offset`. Pad bytes read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.wait_io_delay();
        for s in self.slices(offset, buf.len())? {
            let dst = &mut buf[s.buf_offset..s.buf_offset + s.len];
            match &self.files[s.file_index] {
                Some(file) => file.read_exact_at(dst, s.file_offset)?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (a whole piece) into a new page-aligned buffer, without
    /// zero-filling it first: the zeroing showed up as a tenth of a seeder's CPU time.
    pub fn read_aligned(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.wait_io_delay();
        let slices = self.slices(offset, len)?;
        let mut out = Vec::<u8>::with_capacity(len + READ_ALIGN);
        let skew = (READ_ALIGN - out.as_ptr() as usize % READ_ALIGN) % READ_ALIGN;
        let (head, piece) = out.spare_capacity_mut()[..skew + len].split_at_mut(skew);
        head.fill(MaybeUninit::new(0));
        let mut filled = 0;
        for s in slices {
            if s.buf_offset != filled {
                return Err(io::Error::other("gap in the file layout"));
            }
            let dst = &mut piece[s.buf_offset..s.buf_offset + s.len];
            match &self.files[s.file_index] {
                Some(file) => read_exact_at_uninit(file, dst, s.file_offset)?,
                None => dst.fill(MaybeUninit::new(0)),
            }
            filled += s.len;
        }
        if filled != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: the `skew` bytes of `head` were zeroed and the `len` bytes after them were all
        // written above (the slices were checked to be contiguous from 0 to `len`).
        unsafe { out.set_len(skew + len) };
        // `Bytes::from` keeps the allocation (no copy), so the slice stays aligned.
        Ok(Bytes::from(out).slice(skew..))
    }

    /// Writes `data` at `offset` of the torrent's stream (pad ranges skipped).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.wait_io_delay();
        for s in self.slices(offset, data.len())? {
            if let Some(file) = &self.files[s.file_index] {
                self.blank[s.file_index].store(false, Ordering::Relaxed);
                file.write_all_at(&data[s.buf_offset..s.buf_offset + s.len], s.file_offset)?;
            }
        }
        Ok(())
    }

    /// [`Store::read_aligned`] on a blocking thread.
    pub async fn read_piece(self: &Arc<Self>, offset: u64, len: usize) -> io::Result<Bytes> {
        let store = Arc::clone(self);
        run_blocking(move || store.read_aligned(offset, len)).await
    }

    /// [`Store::write_at`] on a blocking thread.
    pub async fn write(self: &Arc<Self>, offset: u64, data: Bytes) -> io::Result<()> {
        let store = Arc::clone(self);
        run_blocking(move || store.write_at(offset, &data)).await
    }

    /// Hashes every piece that is on disk (in parallel) and returns those that match.
    /// `progress` is called with the number of pieces checked so far.
    pub fn verify(&self, hashes: &[[u8; 20]], progress: &(dyn Fn(u32) + Sync)) -> Bitfield {
        let checked = AtomicU32::new(0);
        let good: Vec<bool> = (0..self.lengths.piece_count())
            .into_par_iter()
            .map(|i| {
                let good = self.piece_matches(i, hashes);
                progress(checked.fetch_add(1, Ordering::Relaxed) + 1);
                good
            })
            .collect();
        let mut have = Bitfield::new(self.lengths.piece_count());
        for (i, good) in good.into_iter().enumerate() {
            have.set(i as u32, good);
        }
        have
    }

    /// Makes every blocking read and write sleep `delay` first (a slow disk, for tests).
    #[doc(hidden)]
    pub fn set_io_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.io_delay_nanos.store(nanos, Ordering::Relaxed);
    }

    fn wait_io_delay(&self) {
        let nanos = self.io_delay_nanos.load(Ordering::Relaxed);
        if nanos > 0 {
            std::thread::sleep(Duration::from_nanos(nanos));
        }
    }

    /// The file slices of `[offset, offset + len)`, which must lie inside the torrent: then the
    /// layout covers every byte of it.
    fn slices(&self, offset: u64, len: usize) -> io::Result<FileSlices<'_>> {
        let total = self.layout.total_length();
        match offset.checked_add(len as u64) {
            Some(end) if end <= total => Ok(self.layout.slices(offset, len)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} go past the end of the torrent ({total} bytes)"),
            )),
        }
    }

    fn piece_matches(&self, index: u32, hashes: &[[u8; 20]]) -> bool {
        let (Some(piece), Some(expected)) = (self.lengths.piece(index), hashes.get(index as usize))
        else {
            return false;
        };
        let offset = self.lengths.piece_offset(piece);
        let len = self.lengths.piece_len(piece) as usize;
        let all_blank = self.slices(offset, len).is_ok_and(|mut slices| {
            slices.all(|s| self.blank[s.file_index].load(Ordering::Relaxed))
        });
        if all_blank {
            return false; // nothing was ever written there
        }
        match self.read_aligned(offset, len) {
            Ok(data) => Sha1::digest(&data)[..] == expected[..],
            Err(_) => false,
        }
    }
}

/// Opens (creating it and its directories) `path` for reading and writing at `length` bytes;
/// if that fails, read-only as it is. Errors name the path.
fn open_file(path: &Path, length: u64) -> io::Result<File> {
    let read_write = || -> io::Result<File> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() != length {
            file.set_len(length)?;
        }
        Ok(file)
    };
    read_write().or_else(|write_error| {
        File::open(path).map_err(|_| {
            io::Error::new(
                write_error.kind(),
                format!("{}: {write_error}", path.display()),
            )
        })
    })
}

/// Like `FileExt::read_exact_at`, into memory that may be uninitialized (whole-piece buffers
/// need no zero-fill first).
fn read_exact_at_uninit(file: &File, dst: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < dst.len() {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        let rest = &mut dst[done..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes for the whole call; pread writes
        // at most that many and never reads them, so uninitialized memory is fine.
        let n = unsafe { libc::pread(file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Runs `op` on tokio's blocking pool. A task that panicked or was cancelled (the runtime is
/// shutting down), or no runtime at all, is an I/O error for the caller, not a panic.
async fn run_blocking<T: Send + 'static>(
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    joined(runtime.spawn_blocking(op).await)
}

fn joined<T>(result: Result<io::Result<T>, JoinError>) -> io::Result<T> {
    result.unwrap_or_else(|e| Err(io::Error::other(format!("disk task failed: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metainfo::FileEntry;
    use std::time::Instant;

    /// A multi-file torrent `t` of files with these (length, pad) in order, named `f<offset>`.
    fn info(files: &[(u64, bool)], piece_length: u32, hashes: Vec<[u8; 20]>) -> Info {
        let mut files =
            FileEntry::laid_out(files.iter().map(|&(length, pad)| (vec![], length, pad)));
        for f in &mut files {
            f.path = vec![format!("f{}", f.offset)];
        }
        let offset: u64 = files.iter().map(|f| f.length).sum();
        let count = offset.div_ceil(piece_length as u64);
        let hashes = if hashes.is_empty() {
            vec![[0; 20]; count as usize]
        } else {
            hashes
        };
        Info {
            name: "t".into(),
            original_name: None,
            piece_length,
            piece_hashes: hashes,
            files,
            multi_file: true,
            private: false,
            lengths: Lengths::new(offset, piece_length, count).unwrap(),
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn reads_and_writes_across_files_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            &info(&[(10, false), (6, true), (20, false)], 16, vec![]),
        )
        .unwrap();
        let data: Vec<u8> = (1..=36).collect();
        store.write_at(0, &data).unwrap();
        let mut want = data.clone();
        want[10..16].fill(0); // pad bytes read as zeros
        let piece = store.read_aligned(0, 36).unwrap();
        assert_eq!(&piece[..], &want[..]);
        assert_eq!(piece.as_ptr() as usize % READ_ALIGN, 0, "not page-aligned");
        let mut buf = vec![0u8; 12];
        store.read_at(8, &mut buf).unwrap();
        assert_eq!(buf, want[8..20]);
        assert_eq!(&store.read_aligned(14, 4).unwrap()[..], &want[14..18]);
        assert_eq!(std::fs::read(dir.path().join("t/f0")).unwrap(), &data[..10]);
        assert_eq!(
            std::fs::read(dir.path().join("t/f16")).unwrap(),
            &data[16..]
        );
        assert!(
            !dir.path().join("t/f10").exists(),
            "pad files are never created"
        );
    }

    #[test]
    fn open_creates_every_file_at_full_length_and_keeps_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut info = info(&[(5, false), (0, false), (7, false)], 16, vec![]);
        info.files[2].path = vec!["sub".into(), "dir".into(), "last".into()];
        let store = Store::open(dir.path(), &info).unwrap();
        assert_eq!(store.content_path(), dir.path().join("t"));
        let len = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().len();
        assert_eq!((len("t/f0"), len("t/f5"), len("t/sub/dir/last")), (5, 0, 7));
        store.write_at(0, b"hello, world").unwrap();
        drop(store);
        let store = Store::open(dir.path(), &info).unwrap();
        let mut buf = [0u8; 12];
        store.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello, world");
    }

    #[test]
    fn verify_skips_files_that_were_missing_or_empty() {
        // All-zero content: on fresh sparse files every piece would hash right, but nothing was
        // written there, and reading a fresh download's gigabyte of zeros costs seconds.
        let dir = tempfile::tempdir().unwrap();
        let zeros: [u8; 20] = Sha1::digest([0u8; 16]).into();
        let t = info(&[(16, false), (16, false)], 16, vec![zeros, zeros]);
        std::fs::create_dir_all(dir.path().join("t")).unwrap();
        std::fs::write(dir.path().join("t/f16"), [0u8; 16]).unwrap(); // existed: checked
        let store = Store::open(dir.path(), &t).unwrap();
        let have = store.verify(&t.piece_hashes, &|_| {});
        assert_eq!(have.iter_ones().collect::<Vec<_>>(), [1]);
        // Once written, a file is checked like any other.
        store.write_at(0, &[0u8; 16]).unwrap();
        assert_eq!(store.verify(&t.piece_hashes, &|_| {}).count_ones(), 2);
    }

    #[test]
    fn verify_finds_the_pieces_that_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(40);
        let store = Store::open(
            dir.path(),
            &info(&[(14, false), (2, true), (24, false)], 16, vec![]),
        )
        .unwrap();
        // Piece 0 (a file and a pad: the pad bytes of a real torrent are zeros) and the short
        // piece 2 are written; piece 1 reads as the zeros of a fresh sparse file.
        let mut piece0 = data[..16].to_vec();
        piece0[14..].fill(0);
        let hashes: Vec<[u8; 20]> = [&piece0[..], &data[16..32], &data[32..]]
            .iter()
            .map(|p| Sha1::digest(p).into())
            .collect();
        store.write_at(0, &piece0).unwrap();
        store.write_at(32, &data[32..]).unwrap();
        let calls = AtomicU32::new(0);
        let most = AtomicU32::new(0);
        let have = store.verify(&hashes, &|n| {
            calls.fetch_add(1, Ordering::Relaxed);
            most.fetch_max(n, Ordering::Relaxed);
        });
        assert_eq!(have.iter_ones().collect::<Vec<_>>(), [0, 2]);
        assert_eq!((calls.into_inner(), most.into_inner()), (3, 3));
        // Too few hashes: the pieces without one are not there.
        assert_eq!(store.verify(&hashes[..1], &|_| {}).iter_ones().count(), 1);
    }

    #[test]
    fn ranges_past_the_end_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(dir.path(), &info(&[(20, false), (16, false)], 16, vec![])).unwrap();
        let mut buf = [0u8; 10];
        for offset in [30, 36, u64::MAX - 3] {
            let e = store.read_at(offset, &mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(store.read_aligned(offset, 10).is_err());
            assert!(store.write_at(offset, &buf).is_err());
        }
        assert!(store.read_aligned(26, 10).is_ok());
    }

    #[test]
    fn a_file_that_is_not_writable_is_opened_read_only() {
        // Even root cannot open a running executable for writing (ETXTBSY): our own test binary
        // stands in for a read-only copy to seed from.
        let exe = std::env::current_exe().unwrap();
        let mut exe_bytes = [0u8; 164];
        File::open(&exe)
            .unwrap()
            .read_exact_at(&mut exe_bytes, 0)
            .unwrap();
        let exe_len = std::fs::metadata(&exe).unwrap().len();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&exe, dir.path().join("t")).unwrap();
        let mut info = info(&[(exe_len, false)], 1 << 20, vec![]);
        info.multi_file = false;
        let store = Store::open(dir.path(), &info).unwrap();
        let mut buf = [0u8; 64];
        store.read_at(100, &mut buf).unwrap();
        assert_eq!(buf, exe_bytes[100..164]);
        assert!(store.write_at(0, b"not an ELF").is_err());
    }

    #[test]
    fn concurrent_reads_of_different_files_return_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            (70_001, false),
            (1, false),
            (12_287, true),
            (100_000, false),
            (33_333, false),
        ];
        let store = Store::open(dir.path(), &info(&sizes, 16384, vec![])).unwrap();
        let mut data = pattern(sizes.iter().map(|s| s.0 as usize).sum());
        data[70_002..70_002 + 12_287].fill(0);
        store.write_at(0, &data).unwrap();
        let (store, data) = (&store, &data);
        std::thread::scope(|scope| {
            for thread in 0..6u64 {
                scope.spawn(move || {
                    // Each thread walks its own sequence of ranges, so threads hit different
                    // files and different offsets of the same file at once.
                    let mut x = thread * 0x9e37_79b9 + 1;
                    for _ in 0..300 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let offset = (x >> 33) as usize % data.len();
                        let len = ((x >> 13) as usize % 40_000).min(data.len() - offset);
                        let want = &data[offset..offset + len];
                        let got = store.read_aligned(offset as u64, len).unwrap();
                        assert!(&got[..] == want, "read_aligned({offset}, {len})");
                        let mut buf = vec![0u8; len];
                        store.read_at(offset as u64, &mut buf).unwrap();
                        assert!(buf == want, "read_at({offset}, {len})");
                    }
                });
            }
        });
    }

    #[test]
    fn set_io_delay_delays_every_read_and_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &info(&[(32, false)], 16, vec![])).unwrap();
        let delay = Duration::from_millis(40);
        store.set_io_delay(delay);
        let timed = |op: &dyn Fn()| {
            let start = Instant::now();
            op();
            start.elapsed()
        };
        assert!(timed(&|| store.write_at(0, &[1; 16]).unwrap()) >= delay);
        assert!(timed(&|| store.read_at(0, &mut [0; 16]).unwrap()) >= delay);
        assert!(timed(&|| drop(store.read_aligned(0, 16).unwrap())) >= delay);
    }

    #[tokio::test]
    async fn async_write_and_read_piece_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(dir.path(), &info(&[(20, false), (12, false)], 16, vec![])).unwrap(),
        );
        let data = Bytes::from(pattern(32));
        store.write(0, data.clone()).await.unwrap();
        assert_eq!(store.read_piece(0, 32).await.unwrap(), data);
        assert_eq!(store.read_piece(16, 16).await.unwrap(), data.slice(16..));
        let e = store.read_piece(16, 17).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(store.write(30, data).await.is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_disk_does_not_stall_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &info(&[(32, false)], 16, vec![])).unwrap());
        store.write_at(0, &pattern(32)).unwrap();
        store.set_io_delay(Duration::from_millis(300));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let reader = Arc::clone(&store);
        let read = tokio::spawn(async move {
            let _ = started_tx.send(());
            reader.read_piece(0, 32).await
        });
        // On this one-thread runtime we only run again once the read task yields: if the read
        // blocked the thread, it would be finished by then.
        started_rx.await.unwrap();
        assert!(!read.is_finished(), "the read ran on the runtime thread");
        assert_eq!(&read.await.unwrap().unwrap()[..], &pattern(32)[..]);
    }

    #[tokio::test]
    async fn a_failed_blocking_task_is_an_io_error() {
        let panicked = tokio::task::spawn_blocking(|| -> io::Result<()> { panic!("disk bug") });
        let e = joined(panicked.await).unwrap_err();
        assert!(e.to_string().contains("disk task failed"), "{e}");
    }
}
