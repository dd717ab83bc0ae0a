//! Making a .torrent from files on disk: walk the tree, hash the pieces, hand the result to the
//! pure builder ([`crate::core::metainfo::build_torrent`]).
//!
//! Hashing: one reader thread fills large buffers (several pieces each) with the torrent's byte
//! stream, file after file, while the rayon pool hashes the pieces of the previous buffer in
//! parallel, so reading and every core's SHA-1 overlap. At most [`BUFFERS`] buffers exist.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context};
use rayon::prelude::*;
use sha1::{Digest, Sha1};

use crate::core::metainfo::{build_torrent, TorrentContent, TorrentSpec};

pub const DEFAULT_PIECE_LENGTH: u32 = 256 * 1024;
pub const MIN_PIECE_LENGTH: u64 = 16 * 1024;
pub const MAX_PIECE_LENGTH: u64 = 64 * 1024 * 1024;

/// Bytes read per buffer (rounded to whole pieces, at least one piece).
const BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Buffers in flight: one being filled, one queued, one being hashed.
const BUFFERS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub piece_length: u32,
    /// Tracker tiers; the first URL becomes `announce`.
    pub trackers: Vec<Vec<String>>,
    pub private: bool,
    pub comment: Option<String>,
    pub created_by: Option<String>,
    /// Seconds since the Unix epoch; `None` (the default) keeps the output reproducible.
    pub creation_date: Option<i64>,
    /// The torrent's name; default: the last component of the path.
    pub name: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            piece_length: DEFAULT_PIECE_LENGTH,
            trackers: Vec::new(),
            private: false,
            comment: None,
            created_by: Some(format!("swarmfs {}", env!("CARGO_PKG_VERSION"))),
            creation_date: None,
            name: None,
        }
    }
}

/// Checks a requested piece length: a power of two from 16 KiB to 64 MiB.
pub fn check_piece_length(bytes: u64) -> anyhow::Result<u32> {
    if !bytes.is_power_of_two() || !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&bytes) {
        bail!(
            "piece length {bytes} is not a power of two between 16 KiB and 64 MiB \
             (examples: 16KiB, 256KiB, 4MiB)"
        );
    }
    Ok(bytes as u32)
}

/// One file of the torrent and where its bytes are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path components below the torrent root (for a single-file torrent: `[name]`).
    pub path: Vec<String>,
    pub disk_path: PathBuf,
    pub length: u64,
}

/// The files a torrent will be made of, in stream order (sorted by path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    /// False when the path is a single file.
    pub multi_file: bool,
    pub files: Vec<SourceFile>,
    pub total_length: u64,
}

/// Lists the regular files under `path` (or `path` itself), sorted by their path components.
/// Symlinks to files are followed; symlinked directories and special files are skipped, so the
/// walk cannot loop.
pub fn scan(path: &Path) -> anyhow::Result<Source> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = file_name(path)?;
    let mut files = Vec::new();
    if meta.is_file() {
        files.push(SourceFile {
            path: vec![name.clone()],
            disk_path: path.to_path_buf(),
            length: meta.len(),
        });
    } else if meta.is_dir() {
        walk(path, &mut Vec::new(), &mut files)?;
        if files.is_empty() {
            bail!("{} contains no files", path.display());
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
    } else {
        bail!("{} is neither a file nor a directory", path.display());
    }
    let total_length = files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.length))
        .context("total size overflows")?;
    if total_length == 0 {
        // libtorrent and Transmission refuse torrents without a single byte.
        bail!("{} holds no data (all files are empty)", path.display());
    }
    Ok(Source {
        name,
        multi_file: meta.is_dir(),
        files,
        total_length,
    })
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    // `canonicalize` so that `.` or `dir/..` still give a real name.
    let canonical = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let name = canonical
        .file_name()
        .with_context(|| format!("{} has no name to use for the torrent", path.display()))?;
    name.to_str()
        .map(str::to_string)
        .with_context(|| format!("name of {} is not UTF-8", path.display()))
}

fn walk(dir: &Path, prefix: &mut Vec<String>, out: &mut Vec<SourceFile>) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let disk_path = entry.path();
        let component = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("file name {n:?} in {} is not UTF-8", dir.display()))?;
        let file_type = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", disk_path.display()))?;
        if file_type.is_dir() {
            prefix.push(component);
            walk(&disk_path, prefix, out)?;
            prefix.pop();
            continue;
        }
        // Follow symlinks to files; not to directories (no cycles).
        let meta = std::fs::metadata(&disk_path)
            .with_context(|| format!("cannot stat {}", disk_path.display()))?;
        if !meta.is_file() {
            log::warn!("skipping {} (not a regular file)", disk_path.display());
            continue;
        }
        let mut path = prefix.clone();
        path.push(component);
        out.push(SourceFile {
            path,
            disk_path,
            length: meta.len(),
        });
    }
    Ok(())
}

/// Hashes the pieces of `files` laid end to end. `progress` is called (on the calling thread)
/// with the number of bytes hashed so far.
pub fn hash_pieces(
    files: &[SourceFile],
    piece_length: u32,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<[u8; 20]>> {
    let piece_bytes = piece_length as usize;
    anyhow::ensure!(piece_bytes > 0, "piece length is 0");
    let buffer_bytes = (BUFFER_BYTES / piece_bytes).max(1) * piece_bytes;
    let (full_tx, full_rx) = mpsc::sync_channel::<anyhow::Result<Vec<u8>>>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        // Allocated lazily by the reader (resize), so small torrents stay small.
        let _ = empty_tx.send(Vec::new());
    }
    std::thread::scope(|scope| {
        scope.spawn(move || read_stream(files, buffer_bytes, empty_rx, full_tx));
        // Owns the receiving end and the recycling sender, so an early error drops them and
        // the reader stops instead of blocking the scope.
        consume(full_rx, empty_tx, piece_bytes, progress)
    })
}

fn consume(
    full_rx: mpsc::Receiver<anyhow::Result<Vec<u8>>>,
    empty_tx: mpsc::Sender<Vec<u8>>,
    piece_bytes: usize,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<[u8; 20]>> {
    let mut hashes = Vec::new();
    let mut done = 0u64;
    for buffer in full_rx {
        let buffer = buffer?;
        let batch: Vec<[u8; 20]> = buffer
            .par_chunks(piece_bytes)
            .map(|piece| Sha1::digest(piece).into())
            .collect();
        hashes.extend(batch);
        done += buffer.len() as u64;
        progress(done);
        let _ = empty_tx.send(buffer);
    }
    Ok(hashes)
}

/// Reader thread: sends full buffers (the last one may be short) and stops on the first error
/// or when the consumer goes away.
fn read_stream(
    files: &[SourceFile],
    buffer_bytes: usize,
    empty_rx: mpsc::Receiver<Vec<u8>>,
    full_tx: mpsc::SyncSender<anyhow::Result<Vec<u8>>>,
) {
    let next_buffer = || -> Option<Vec<u8>> {
        let mut b = empty_rx.recv().ok()?;
        b.resize(buffer_bytes, 0);
        Some(b)
    };
    let Some(mut buffer) = next_buffer() else {
        return;
    };
    let mut filled = 0usize;
    for file in files {
        let result = (|| -> anyhow::Result<()> {
            let mut handle = File::open(&file.disk_path)
                .with_context(|| format!("cannot open {}", file.disk_path.display()))?;
            let mut left = file.length;
            while left > 0 {
                let want = (buffer_bytes - filled).min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = handle
                    .read(&mut buffer[filled..filled + want])
                    .with_context(|| format!("cannot read {}", file.disk_path.display()))?;
                if n == 0 {
                    bail!(
                        "{} shrank while it was being hashed",
                        file.disk_path.display()
                    );
                }
                filled += n;
                left -= n as u64;
                if filled == buffer_bytes {
                    let full = std::mem::take(&mut buffer);
                    if full_tx.send(Ok(full)).is_err() {
                        bail!("stopped");
                    }
                    buffer = next_buffer().context("stopped")?;
                    filled = 0;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = full_tx.send(Err(e));
            return;
        }
    }
    if filled > 0 {
        buffer.truncate(filled);
        let _ = full_tx.send(Ok(buffer));
    }
}

/// Makes a .torrent from a scanned source.
pub fn create_from_source(
    source: &Source,
    opts: &CreateOptions,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<u8>> {
    let piece_hashes = hash_pieces(&source.files, opts.piece_length, progress)?;
    let content = if source.multi_file {
        TorrentContent::Directory {
            files: source
                .files
                .iter()
                .map(|f| (f.path.clone(), f.length))
                .collect(),
        }
    } else {
        TorrentContent::SingleFile {
            length: source.total_length,
        }
    };
    let spec = TorrentSpec {
        name: opts.name.clone().unwrap_or_else(|| source.name.clone()),
        content,
        piece_length: opts.piece_length,
        piece_hashes,
        trackers: opts.trackers.clone(),
        private: opts.private,
        comment: opts.comment.clone(),
        created_by: opts.created_by.clone(),
        creation_date: opts.creation_date,
    };
    Ok(build_torrent(&spec)?)
}

/// Makes a .torrent of the file or directory at `path`; returns its bytes.
pub fn create_torrent(
    path: &Path,
    opts: &CreateOptions,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<u8>> {
    let source = scan(path)?;
    create_from_source(&source, opts, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metainfo::Metainfo;
    use std::cell::Cell;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn hashes_the_concatenated_stream_across_buffers_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        // Sizes chosen to cross piece and buffer boundaries inside files.
        let a = pattern(BUFFER_BYTES + 12_345, 1);
        let b = pattern(0, 2);
        let c = pattern(70_001, 3);
        write(&root.join("z/c.bin"), &c);
        write(&root.join("a.bin"), &a);
        write(&root.join("b.empty"), &b);
        let source = scan(&root).unwrap();
        let paths: Vec<String> = source.files.iter().map(|f| f.path.join("/")).collect();
        assert_eq!(paths, ["a.bin", "b.empty", "z/c.bin"]);
        let last = Cell::new(0u64);
        let hashes = hash_pieces(&source.files, 16384, &|n| {
            assert!(n > last.get());
            last.set(n);
        })
        .unwrap();
        let stream = [a, b, c].concat();
        assert_eq!(last.get(), stream.len() as u64);
        let expected: Vec<[u8; 20]> = stream
            .chunks(16384)
            .map(|p| Sha1::digest(p).into())
            .collect();
        assert_eq!(hashes, expected);
    }

    #[test]
    fn creates_parseable_deterministic_torrents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("one.bin");
        write(&file, &pattern(300_000, 9));
        let opts = CreateOptions {
            trackers: vec![vec!["http://127.0.0.1:1/announce".into()]],
            ..Default::default()
        };
        let bytes = create_torrent(&file, &opts, &|_| {}).unwrap();
        assert_eq!(create_torrent(&file, &opts, &|_| {}).unwrap(), bytes);
        let m = Metainfo::from_bytes(&bytes).unwrap();
        assert!(!m.info.multi_file);
        assert_eq!(m.info.name, "one.bin");
        assert_eq!(m.info.lengths.piece_count(), 2);
        assert!(m.creation_date.is_none());
    }

    #[test]
    fn refuses_bad_piece_lengths_and_empty_dirs() {
        assert_eq!(check_piece_length(16384).unwrap(), 16384);
        assert_eq!(check_piece_length(4 << 20).unwrap(), 4 << 20);
        for bad in [0, 8192, 300_000, 128 << 20] {
            assert!(check_piece_length(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let err = scan(&dir.path().join("empty")).unwrap_err();
        assert!(err.to_string().contains("no files"), "{err}");
        write(&dir.path().join("zeros/a"), b"");
        let err = scan(&dir.path().join("zeros")).unwrap_err();
        assert!(err.to_string().contains("no data"), "{err}");
    }

    #[test]
    fn reports_a_file_that_shrank() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        write(&file, &pattern(1000, 0));
        let mut source = scan(&file).unwrap();
        source.files[0].length = 5000;
        let err = hash_pieces(&source.files, 16384, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("shrank"), "{err}");
    }
}
