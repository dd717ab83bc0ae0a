//! `fuser::Filesystem` for one torrent: translation only. Lookups and listings come from the pure
//! inode table; a read is handed to the engine on the tokio runtime and answered from that task,
//! so the FUSE loop never waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use crate::engine::reader::StreamId;
use crate::engine::torrent::Torrent;
use crate::fuse::inode::{InodeTable, Node, NodeKind, ROOT_INO};

/// The content never changes, so the kernel may cache attributes and entries for long.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read we ask the kernel for.
const MAX_READ: u32 = 1 << 20;

pub const XATTR_PROGRESS: &str = "user.swarmfs.progress";
pub const XATTR_INFOHASH: &str = "user.swarmfs.infohash";
pub const XATTR_PIECES: &str = "user.swarmfs.pieces";
/// On the torrent's top entry (and the mount's root): connected peers by source, and the DHT
/// routing table's size (`dht_nodes=N`) when the DHT is on.
pub const XATTR_PEERS: &str = "user.swarmfs.peers";

pub struct TorrentFs {
    torrent: Arc<Torrent>,
    inodes: InodeTable,
    runtime: Handle,
    mtime: SystemTime,
    uid: u32,
    gid: u32,
    handles: Mutex<HashMap<u64, StreamId>>,
    next_handle: AtomicU64,
    /// Files currently open (the process exits after a lazy unmount once this reaches 0).
    pub open_files: Arc<AtomicU64>,
}

impl TorrentFs {
    pub fn new(torrent: Arc<Torrent>, runtime: Handle) -> TorrentFs {
        let inodes = InodeTable::new(&torrent.meta.info);
        let mtime = torrent
            .meta
            .creation_date
            .filter(|d| *d > 0)
            .map(|d| SystemTime::UNIX_EPOCH + Duration::from_secs(d as u64))
            .unwrap_or_else(SystemTime::now);
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        TorrentFs {
            torrent,
            inodes,
            runtime,
            mtime,
            uid,
            gid,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            open_files: Arc::new(AtomicU64::new(0)),
        }
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink) = match &node.kind {
            NodeKind::Dir { .. } => (FileType::Directory, 0o555, 0, 2),
            NodeKind::File { length, .. } => (FileType::RegularFile, 0o444, *length, 1),
        };
        FileAttr {
            ino: INodeNo(node.ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 1 << 20,
        }
    }

    fn file_range(&self, ino: u64) -> Result<(u64, u64), Errno> {
        match self.inodes.get(ino).map(|n| &n.kind) {
            Some(NodeKind::File { offset, length, .. }) => Ok((*offset, *length)),
            Some(NodeKind::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn xattr_value(&self, ino: u64, name: &str) -> Result<Vec<u8>, Errno> {
        let node = self.inodes.get(ino).ok_or(Errno::ENOENT)?;
        let lengths = self.torrent.lengths;
        let pieces = match &node.kind {
            NodeKind::File { offset, length, .. } => lengths.pieces_for_range(*offset, *length),
            NodeKind::Dir { .. } => 0..lengths.piece_count(),
        };
        match name {
            XATTR_INFOHASH => Ok(self.torrent.info_hash.to_hex().into_bytes()),
            XATTR_PROGRESS => Ok(format!("{:.4}", self.torrent.progress_of(pieces)).into_bytes()),
            XATTR_PIECES if pieces.is_empty() => Ok(b"none".to_vec()),
            XATTR_PIECES => Ok(format!("{}-{}", pieces.start, pieces.end - 1).into_bytes()),
            XATTR_PEERS if node.parent == ROOT_INO => {
                let s = self.torrent.snapshot();
                let mut text = s.sources.key_values();
                if let Some(n) = s.dht_nodes {
                    text.push_str(&format!(" dht_nodes={n}"));
                }
                Ok(text.into_bytes())
            }
            _ => Err(Errno::NO_XATTR),
        }
    }
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

impl Filesystem for TorrentFs {
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
        match self.inodes.lookup(parent.0, name) {
            Some(node) => reply.entry(&TTL, &self.attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inodes.get(ino.0) {
            Some(node) => reply.attr(&TTL, &self.attr(node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (start, len) = match self.file_range(ino.0) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let stream = self.torrent.open_stream(start, start + len);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, stream);
        self.open_files.fetch_add(1, Ordering::SeqCst);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (start, len) = match self.file_range(ino.0) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        if offset >= len {
            return reply.data(&[]);
        }
        let n = (size as u64).min(len - offset);
        let stream = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .copied();
        let torrent = self.torrent.clone();
        self.runtime.spawn(async move {
            match torrent.read(stream, start + offset, n).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    log::warn!("read of {n} bytes at {offset} failed: {e}");
                    reply.error(Errno::EIO)
                }
            }
        });
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
        let stream = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        if let Some(s) = stream {
            self.torrent.close_stream(s);
            self.open_files.fetch_sub(1, Ordering::SeqCst);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inodes.get(ino.0).map(|n| &n.kind) {
            Some(NodeKind::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
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
        let Some(entries) = self.inodes.readdir(ino.0, offset) else {
            return reply.error(Errno::ENOTDIR);
        };
        // The entries are built lazily: stopping at the first one that does not fit leaves the
        // rest of the directory untouched until the kernel asks again from that offset.
        for entry in entries {
            let kind = if entry.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(entry.ino), entry.next_offset, kind, entry.name) {
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
        let Some(entries) = self.inodes.readdir(ino.0, offset) else {
            return reply.error(Errno::ENOTDIR);
        };
        for entry in entries {
            let Some(node) = self.inodes.get(entry.ino) else {
                continue;
            };
            let attr = self.attr(node);
            if reply.add(
                INodeNo(entry.ino),
                entry.next_offset,
                entry.name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total = self.torrent.lengths.total_length();
        let files = self.inodes.len() as u64;
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
        let Some(node) = self.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let top = node.parent == ROOT_INO;
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
        if self.inodes.get(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.bits() & libc::W_OK != 0 {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}
