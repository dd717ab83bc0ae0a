//! `fuser::Filesystem` for the library of mounted torrents: translation only. Lookups and
//! listings come from the pure library and inode tables (behind a read lock, never the engine's);
//! a read is handed to the engine on the tokio runtime and answered from that task, so the FUSE
//! loop never waits on the network. Writes are refused with EROFS everywhere but in
//! `.swarmfs/add/` (a closed file there is handed to `Control::add`) and `.swarmfs/torrents/`
//! (an unlink there is `Control::remove`): the kernel mounts read-write so those reach us.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::core::units::format_size;
use crate::engine::reader::StreamId;
use crate::engine::torrent::Torrent;
use crate::fuse::inode::{NodeKind, ROOT_INO};
use crate::fuse::library::{Ino, Library, LibraryError, Listed};

/// A torrent's content never changes, so the kernel may cache attributes and entries for long.
const TTL: Duration = Duration::from_secs(3600);
/// The root's entries come and go as torrents are added and removed; control files change.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Entries one readdir call builds at most (the kernel's buffer holds fewer).
const READDIR_BATCH: usize = 1024;
/// Largest read we ask the kernel for.
const MAX_READ: u32 = 1 << 20;

pub const XATTR_PROGRESS: &str = "user.swarmfs.progress";
pub const XATTR_INFOHASH: &str = "user.swarmfs.infohash";
pub const XATTR_PIECES: &str = "user.swarmfs.pieces";
/// On a torrent's top entry (and the mount's root, when it holds one torrent): connected peers by source, and the DHT
/// routing table's size (`dht_nodes=N`) when the DHT is on.
pub const XATTR_PEERS: &str = "user.swarmfs.peers";

/// What the library keeps per torrent.
pub type Shelved = Arc<Torrent>;
pub type SharedLibrary = Arc<RwLock<Library<Shelved>>>;

pub fn read_library(l: &SharedLibrary) -> RwLockReadGuard<'_, Library<Shelved>> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write_library(l: &SharedLibrary) -> RwLockWriteGuard<'_, Library<Shelved>> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Told whether a control request worked; an `Err` is one line for `status`.
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What the control directory asks of whoever runs the mount.
pub trait Control: Send + Sync {
    /// A file written into `.swarmfs/add/` was closed: `bytes` is a .torrent or a magnet link.
    /// `done` hears whether it was taken (its close fails with EINVAL if not).
    fn add(&self, name: String, bytes: Vec<u8>, done: Done);
    /// `.swarmfs/torrents/<name>` was removed: stop the torrent in `slot`, which the library no
    /// longer lists.
    fn remove(&self, torrent: Shelved, done: Done);
}

/// The text of `.swarmfs/status` and `swarmfs status`: a line per torrent, a total, then magnets
/// being fetched and the latest errors.
pub fn status_text(library: &Library<Shelved>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>9} {:>6} {:>12} {:>12} {:>10}",
        "NAME", "SIZE", "VERIFIED", "PEERS", "DOWN", "UP", "CACHE"
    );
    let (mut size, mut have, mut peers, mut down, mut up, mut cache) = (0, 0u64, 0, 0.0, 0.0, 0);
    let mut count = 0;
    for (_, shelf) in library.shelves() {
        let t = &shelf.item;
        let s = t.snapshot();
        let total = t.lengths.total_length();
        let verified = total.saturating_sub(s.bytes_left);
        let _ = writeln!(
            out,
            "{:<40} {:>10} {:>8.1}% {:>6} {:>10}/s {:>10}/s {:>10}",
            shelf.name,
            format_size(total),
            100.0 * s.pieces_have as f64 / f64::from(s.pieces_total.max(1)),
            s.peers,
            format_size(s.down_rate as u64),
            format_size(s.up_rate as u64),
            format_size(s.cache_used),
        );
        count += 1;
        size += total;
        have += verified;
        peers += s.peers;
        down += s.down_rate;
        up += s.up_rate;
        cache += s.cache_used;
    }
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>8.1}% {:>6} {:>10}/s {:>10}/s {:>10}",
        format!(
            "total ({count} torrent{})",
            if count == 1 { "" } else { "s" }
        ),
        format_size(size),
        if size == 0 {
            100.0
        } else {
            100.0 * have as f64 / size as f64
        },
        peers,
        format_size(down as u64),
        format_size(up as u64),
        format_size(cache),
    );
    for f in library.fetching() {
        let _ = writeln!(out, "fetching {f}");
    }
    for n in library.notes() {
        let _ = writeln!(out, "{n}");
    }
    out
}

enum OpenHandle {
    /// A torrent's file: reads go to the engine (a torrent removed meanwhile fails them).
    File {
        torrent: Shelved,
        stream: StreamId,
        start: u64,
        len: u64,
    },
    /// A control file's text, as it was when opened.
    Text(Vec<u8>),
    /// A file being written into `add/` (its ino); handed over on the first flush.
    Adding(u64),
}

pub struct LibraryFs {
    library: SharedLibrary,
    control: Arc<dyn Control>,
    runtime: Handle,
    started: SystemTime,
    uid: u32,
    gid: u32,
    handles: Mutex<HashMap<u64, OpenHandle>>,
    next_handle: AtomicU64,
    /// Files currently open (the process exits after a lazy unmount once this reaches 0).
    pub open_files: Arc<AtomicU64>,
}

fn mtime_of(t: &Torrent) -> Option<SystemTime> {
    t.meta
        .creation_date
        .filter(|d| *d > 0)
        .map(|d| SystemTime::UNIX_EPOCH + Duration::from_secs(d as u64))
}

fn errno_of(e: &LibraryError) -> Errno {
    match e {
        LibraryError::Exists => Errno::EEXIST,
        LibraryError::TooManyFiles => Errno::ENFILE,
        LibraryError::TooLarge => Errno::EFBIG,
        LibraryError::NotFound => Errno::ENOENT,
        LibraryError::AlreadyMounted(_) => Errno::EEXIST,
    }
}

impl LibraryFs {
    pub fn new(library: SharedLibrary, control: Arc<dyn Control>, runtime: Handle) -> LibraryFs {
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        LibraryFs {
            library,
            control,
            runtime,
            started: SystemTime::now(),
            uid,
            gid,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            open_files: Arc::new(AtomicU64::new(0)),
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenHandle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_handle(&self, h: OpenHandle) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, h);
        self.open_files.fetch_add(1, Ordering::SeqCst);
        FileHandle(fh)
    }

    fn make_attr(&self, ino: u64, dir: bool, perm: u16, size: u64, mtime: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 1 << 20,
        }
    }

    /// The attributes of `ino` and how long the kernel may keep them.
    fn attr(&self, lib: &Library<Shelved>, ino: u64) -> Option<(FileAttr, Duration)> {
        let control = |dir, perm, size| {
            Some((
                self.make_attr(ino, dir, perm, size, self.started),
                SHORT_TTL,
            ))
        };
        match Ino::decode(ino)? {
            Ino::Root | Ino::ControlDir | Ino::TorrentsDir => control(true, 0o555, 0),
            Ino::AddDir => control(true, 0o755, 0),
            Ino::Status => control(false, 0o444, status_text(lib).len() as u64),
            Ino::AddFile(_) => control(false, 0o644, lib.add_file(ino)?.data.len() as u64),
            Ino::TorrentLink(slot) => {
                let t = &lib.shelf(slot)?.item;
                control(false, 0o444, link_text(t).len() as u64)
            }
            Ino::Node { .. } => {
                let (_, shelf, node) = lib.node(ino)?;
                let mtime = mtime_of(&shelf.item).unwrap_or(self.started);
                let ttl = if node.parent == ROOT_INO {
                    SHORT_TTL
                } else {
                    TTL
                };
                let attr = match &node.kind {
                    NodeKind::Dir { .. } => self.make_attr(ino, true, 0o555, 0, mtime),
                    NodeKind::File { length, .. } => {
                        self.make_attr(ino, false, 0o444, *length, mtime)
                    }
                };
                Some((attr, ttl))
            }
        }
    }

    /// The torrent whose attributes `ino` carries: its own nodes, or the root of a mount holding
    /// one torrent.
    fn xattr_value(&self, ino: u64, name: &str) -> Result<Vec<u8>, Errno> {
        let lib = read_library(&self.library);
        let (torrent, pieces, top) = match Ino::decode(ino) {
            Some(Ino::Root) if lib.len() == 1 => {
                let (_, shelf) = lib.shelves().next().ok_or(Errno::NO_XATTR)?;
                let t = shelf.item.clone();
                let all = 0..t.lengths.piece_count();
                (t, all, true)
            }
            Some(Ino::Node { .. }) => {
                let (_, shelf, node) = lib.node(ino).ok_or(Errno::ENOENT)?;
                let t = shelf.item.clone();
                let pieces = match &node.kind {
                    NodeKind::File { offset, length, .. } => {
                        t.lengths.pieces_for_range(*offset, *length)
                    }
                    NodeKind::Dir { .. } => 0..t.lengths.piece_count(),
                };
                (t, pieces, node.parent == ROOT_INO)
            }
            Some(_) => return Err(Errno::NO_XATTR),
            None => return Err(Errno::ENOENT),
        };
        drop(lib);
        match name {
            XATTR_INFOHASH => Ok(torrent.info_hash.to_hex().into_bytes()),
            XATTR_PROGRESS => Ok(format!("{:.4}", torrent.progress_of(pieces)).into_bytes()),
            XATTR_PIECES if pieces.is_empty() => Ok(b"none".to_vec()),
            XATTR_PIECES => Ok(format!("{}-{}", pieces.start, pieces.end - 1).into_bytes()),
            XATTR_PEERS if top => {
                let s = torrent.snapshot();
                let mut text = s.sources.key_values();
                if let Some(n) = s.dht_nodes {
                    text.push_str(&format!(" dht_nodes={n}"));
                }
                Ok(text.into_bytes())
            }
            _ => Err(Errno::NO_XATTR),
        }
    }

    /// "." and ".." then the children, from readdir offset `offset` (entry `k` resumes at `k+1`).
    fn listing(&self, ino: u64, offset: u64) -> Result<Vec<(u64, Listed)>, Errno> {
        let lib = read_library(&self.library);
        let parent = lib.parent(ino).ok_or(Errno::ENOENT)?;
        let skip = usize::try_from(offset.saturating_sub(2)).unwrap_or(usize::MAX);
        let mut children = lib.children(ino, skip).ok_or(Errno::ENOTDIR)?;
        children.truncate(READDIR_BATCH);
        let dots = [(".", ino), ("..", parent)]
            .into_iter()
            .map(|(name, ino)| Listed {
                name: name.into(),
                ino,
                is_dir: true,
            });
        let listed: Vec<Listed> = dots.skip(offset.min(2) as usize).chain(children).collect();
        Ok(listed
            .into_iter()
            .enumerate()
            .map(|(i, l)| (offset + i as u64 + 1, l))
            .collect())
    }

    /// Hands a file written into `add/` over to `Control::add`; the reply waits for its word.
    fn submit(&self, ino: u64, reply: ReplyEmpty) {
        let Some(file) = write_library(&self.library).take_add_file(ino) else {
            return reply.ok(); // already handed over (a second flush of a dup'd descriptor)
        };
        let library = self.library.clone();
        let name = file.name.clone();
        self.control.add(
            file.name,
            file.data,
            Box::new(move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => {
                    write_library(&library).note(format!("error: add/{name}: {e}"));
                    reply.error(Errno::EINVAL)
                }
            }),
        );
    }
}

/// A torrent's entry in `torrents/`: its magnet link.
fn link_text(t: &Torrent) -> Vec<u8> {
    let mut text = t.meta.magnet().to_uri().into_bytes();
    text.push(b'\n');
    text
}

fn reply_bytes(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LibraryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // max_write sets the kernel's max_pages, which bounds read sizes too: ask for 1 MiB reads.
        let _ = config.set_max_write(MAX_READ);
        let _ = config.set_max_readahead(MAX_READ);
        // Listings carry each entry's attributes (`ls -l`, `find -size` on a 100,000-file
        // torrent: one request per directory page instead of one lookup per file). AUTO lets
        // the kernel fall back to plain readdir when nobody looks at the attributes.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let lib = read_library(&self.library);
        match lib
            .lookup(parent.0, name)
            .and_then(|ino| self.attr(&lib, ino))
        {
            Some((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let lib = read_library(&self.library);
        match self.attr(&lib, ino.0) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let lib = read_library(&self.library);
        let opened = match Ino::decode(ino.0) {
            Some(Ino::AddFile(_)) if lib.add_file(ino.0).is_some() => OpenHandle::Adding(ino.0),
            _ if write => return reply.error(Errno::EROFS),
            Some(Ino::Status) => OpenHandle::Text(status_text(&lib).into_bytes()),
            Some(Ino::TorrentLink(slot)) => match lib.shelf(slot) {
                Some(shelf) => OpenHandle::Text(link_text(&shelf.item)),
                None => return reply.error(Errno::ENOENT),
            },
            Some(Ino::Node { .. }) => match lib.node(ino.0) {
                Some((_, shelf, node)) => match &node.kind {
                    NodeKind::File { offset, length, .. } => {
                        let torrent = shelf.item.clone();
                        let stream = torrent.open_stream(*offset, offset + length);
                        OpenHandle::File {
                            torrent,
                            stream,
                            start: *offset,
                            len: *length,
                        }
                    }
                    NodeKind::Dir { .. } => return reply.error(Errno::EISDIR),
                },
                None => return reply.error(Errno::ENOENT),
            },
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        drop(lib);
        // Control files change: read them afresh on every open, past the size getattr gave.
        let flags = match opened {
            OpenHandle::File { .. } => FopenFlags::FOPEN_KEEP_CACHE,
            _ => FopenFlags::FOPEN_DIRECT_IO,
        };
        reply.opened(self.new_handle(opened), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (torrent, stream, start, len) = match self.handles().get(&fh.0) {
            Some(OpenHandle::File {
                torrent,
                stream,
                start,
                len,
            }) => (torrent.clone(), *stream, *start, *len),
            Some(OpenHandle::Text(text)) => {
                let from = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(text.len());
                let to = from.saturating_add(size as usize).min(text.len());
                return reply.data(&text[from..to]);
            }
            Some(OpenHandle::Adding(ino)) => {
                let lib = read_library(&self.library);
                let data = lib.add_file(*ino).map(|f| f.data.as_slice()).unwrap_or(&[]);
                let from = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let to = from.saturating_add(size as usize).min(data.len());
                return reply.data(&data[from..to]);
            }
            None => return reply.error(Errno::EBADF),
        };
        if offset >= len {
            return reply.data(&[]);
        }
        let n = (size as u64).min(len - offset);
        self.runtime.spawn(async move {
            match torrent.read(Some(stream), start + offset, n).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    log::warn!("read of {n} bytes at {offset} failed: {e}");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let ino = match self.handles().get(&fh.0) {
            Some(OpenHandle::Adding(ino)) => *ino,
            Some(_) => return reply.error(Errno::EBADF),
            None => return reply.error(Errno::EBADF),
        };
        match write_library(&self.library).write_add_file(ino, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let adding = match self.handles().get(&fh.0) {
            Some(OpenHandle::Adding(ino)) => Some(*ino),
            _ => None,
        };
        match adding {
            Some(ino) => self.submit(ino, reply),
            None => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles().remove(&fh.0);
        match &handle {
            Some(OpenHandle::File {
                torrent, stream, ..
            }) => torrent.close_stream(*stream),
            Some(OpenHandle::Adding(ino)) => {
                // Closed without a flush (no close(2) reached us): nothing is added.
                write_library(&self.library).take_add_file(*ino);
            }
            Some(OpenHandle::Text(_)) | None => {}
        }
        if handle.is_some() {
            self.open_files.fetch_sub(1, Ordering::SeqCst);
        }
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if Ino::decode(parent.0) != Some(Ino::AddDir) {
            return reply.error(Errno::EROFS);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        let mut lib = write_library(&self.library);
        let ino = match lib.create_add_file(name) {
            Ok(ino) => ino,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let Some((attr, ttl)) = self.attr(&lib, ino) else {
            return reply.error(Errno::EIO);
        };
        drop(lib);
        let fh = self.new_handle(OpenHandle::Adding(ino));
        reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut lib = write_library(&self.library);
        // Only a file being added may change, and only its length (O_TRUNC, truncate); times
        // (`touch`, `cp -p`) are let pass unchanged.
        if lib.add_file(ino.0).is_none() || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EROFS);
        }
        if let Some(len) = size {
            if let Err(e) = lib.truncate_add_file(ino.0, len) {
                return reply.error(errno_of(&e));
            }
        }
        match self.attr(&lib, ino.0) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let mut lib = write_library(&self.library);
        match Ino::decode(parent.0) {
            Some(Ino::TorrentsDir) => {
                let Some(slot) = lib.slot_named(name) else {
                    return reply.error(Errno::ENOENT);
                };
                let Some(shelf) = lib.remove(slot) else {
                    return reply.error(Errno::ENOENT);
                };
                drop(lib);
                self.control.remove(
                    shelf.item,
                    Box::new(move |r| match r {
                        Ok(()) => reply.ok(),
                        Err(_) => reply.error(Errno::EIO),
                    }),
                );
            }
            Some(Ino::AddDir) => match lib.lookup(parent.0, name) {
                Some(ino) => {
                    lib.take_add_file(ino);
                    reply.ok()
                }
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::EROFS),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let lib = read_library(&self.library);
        // A torrent's directories never change; the root and the control directories do.
        let keep = matches!(Ino::decode(ino.0), Some(Ino::Node { .. }));
        match lib.is_dir(ino.0) {
            true if keep => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            true => reply.opened(FileHandle(0), FopenFlags::empty()),
            false if self.attr(&lib, ino.0).is_some() => reply.error(Errno::ENOTDIR),
            false => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.listing(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        // Stopping at the first entry that does not fit leaves the rest for the next call.
        for (next, entry) in entries {
            let kind = if entry.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(entry.ino), next, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.listing(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let lib = read_library(&self.library);
        for (next, entry) in entries {
            let Some((attr, ttl)) = self.attr(&lib, entry.ino) else {
                continue;
            };
            if reply.add(
                INodeNo(entry.ino),
                next,
                &entry.name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let lib = read_library(&self.library);
        let (mut total, mut files) = (0u64, 0u64);
        for (_, shelf) in lib.shelves() {
            total += shelf.item.lengths.total_length();
            files += shelf.inodes.len() as u64;
        }
        reply.statfs(total.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::NO_XATTR);
        };
        match self.xattr_value(ino.0, name) {
            Ok(v) => reply_bytes(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let lib = read_library(&self.library);
        let top = match Ino::decode(ino.0) {
            Some(Ino::Root) if lib.len() == 1 => true,
            Some(Ino::Node { .. }) => match lib.node(ino.0) {
                Some((_, _, node)) => node.parent == ROOT_INO,
                None => return reply.error(Errno::ENOENT),
            },
            Some(_) => return reply_bytes(reply, size, &[]),
            None => return reply.error(Errno::ENOENT),
        };
        let mut list = Vec::new();
        for n in [XATTR_PROGRESS, XATTR_INFOHASH, XATTR_PIECES, XATTR_PEERS] {
            if n == XATTR_PEERS && !top {
                continue;
            }
            list.extend_from_slice(n.as_bytes());
            list.push(0);
        }
        reply_bytes(reply, size, &list);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let lib = read_library(&self.library);
        let writable = matches!(
            Ino::decode(ino.0),
            Some(Ino::AddDir | Ino::AddFile(_) | Ino::TorrentsDir)
        );
        if self.attr(&lib, ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.bits() & libc::W_OK != 0 && !writable {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}
