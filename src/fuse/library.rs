//! The mount's root: every mounted torrent under its `name`, side by side, and the control
//! directory `.swarmfs/` (`add/`, `torrents/`, `status`). PURE: no fuser types, no I/O; `T` is
//! whatever the filesystem keeps per torrent (the engine's `Torrent` in use, a number in tests).
//!
//! Inode numbers: a torrent's own table (`InodeTable`, dense from 1) is placed at
//! `slot << SLOT_SHIFT`, slots counted from 1 and never reused while the mount lives, so an inode
//! of a removed torrent can only miss, never name a file of another one. Slot 0 holds the root
//! and the control entries. A torrent shows at the root its table's top entry (the file or
//! directory called `name`); when that name is taken, by another torrent or by `.swarmfs`, it
//! becomes `name-<first 8 hex digits of the info-hash>` (before the extension of a file), so the
//! names a set of torrents gets depend only on the order they were added in.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::fuse::inode::{InodeTable, Node, NodeKind, ROOT_INO};

/// The control directory's name at the root (hidden from `ls`, shown by `ls -a`).
pub const CONTROL_DIR: &str = ".swarmfs";
pub const ADD_DIR: &str = "add";
pub const TORRENTS_DIR: &str = "torrents";
pub const STATUS_FILE: &str = "status";

const CONTROL_INO: u64 = 2;
const ADD_INO: u64 = 3;
const TORRENTS_INO: u64 = 4;
const STATUS_INO: u64 = 5;
/// Files being written into `add/` take inodes from here up, in slot 0.
const FIRST_ADD_FILE_INO: u64 = 1 << 20;
const SLOT_SHIFT: u32 = 32;
/// Largest file accepted in `add/` (the cap on a .torrent file).
pub const MAX_ADD_FILE_BYTES: usize = crate::core::metainfo::MAX_TORRENT_FILE_BYTES as usize;
/// Files being written into `add/` at once.
pub const MAX_ADD_FILES: usize = 64;
/// Lines of errors and notices `status` keeps (the newest).
pub const MAX_NOTES: usize = 32;

/// What an inode number names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ino {
    Root,
    ControlDir,
    AddDir,
    TorrentsDir,
    Status,
    /// A file being written into `add/`.
    AddFile(u64),
    /// The entry of a torrent in `torrents/` (its content: the magnet link).
    TorrentLink(usize),
    /// A node of a torrent's own table.
    Node {
        slot: usize,
        local: u64,
    },
}

impl Ino {
    pub fn encode(self) -> u64 {
        match self {
            Ino::Root => ROOT_INO,
            Ino::ControlDir => CONTROL_INO,
            Ino::AddDir => ADD_INO,
            Ino::TorrentsDir => TORRENTS_INO,
            Ino::Status => STATUS_INO,
            Ino::AddFile(n) => FIRST_ADD_FILE_INO + n,
            Ino::TorrentLink(slot) => (slot as u64) << SLOT_SHIFT,
            Ino::Node { slot, local } => ((slot as u64) << SLOT_SHIFT) | local,
        }
    }

    pub fn decode(ino: u64) -> Option<Ino> {
        let slot = usize::try_from(ino >> SLOT_SHIFT).ok()?;
        let local = ino & ((1 << SLOT_SHIFT) - 1);
        Some(match (slot, local) {
            (0, ROOT_INO) => Ino::Root,
            (0, CONTROL_INO) => Ino::ControlDir,
            (0, ADD_INO) => Ino::AddDir,
            (0, TORRENTS_INO) => Ino::TorrentsDir,
            (0, STATUS_INO) => Ino::Status,
            (0, n) if n >= FIRST_ADD_FILE_INO => Ino::AddFile(n - FIRST_ADD_FILE_INO),
            (0, _) => return None,
            (slot, 0) => Ino::TorrentLink(slot),
            (slot, local) => Ino::Node { slot, local },
        })
    }
}

/// One mounted torrent.
pub struct Shelf<T> {
    /// Its name at the root (and in `torrents/`).
    pub name: String,
    pub info_hash: [u8; 20],
    pub inodes: InodeTable,
    pub item: T,
}

impl<T> Shelf<T> {
    /// The local ino of the torrent's top entry, if its table has one.
    fn top(&self) -> Option<u64> {
        match &self.inodes.get(ROOT_INO)?.kind {
            NodeKind::Dir { children } => children.first().copied(),
            NodeKind::File { .. } => None,
        }
    }
}

/// A file written into `add/`, until it is closed.
#[derive(Debug, Default)]
pub struct AddFile {
    pub name: String,
    pub data: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("already mounted as {0}")]
    AlreadyMounted(String),
    #[error("a file of that name is being added")]
    Exists,
    #[error("too many files being added at once")]
    TooManyFiles,
    #[error("larger than a .torrent file may be")]
    TooLarge,
    #[error("no such file")]
    NotFound,
}

/// One entry of a listing: name, global ino, whether it is a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub ino: u64,
    pub is_dir: bool,
}

pub struct Library<T> {
    /// `slots[slot - 1]`; `None` once removed.
    slots: Vec<Option<Shelf<T>>>,
    by_name: BTreeMap<String, usize>,
    by_hash: HashMap<[u8; 20], usize>,
    adding: BTreeMap<u64, AddFile>,
    next_add_file: u64,
    /// Torrents whose metadata is being fetched: info-hash -> what `status` says of it.
    fetching: BTreeMap<[u8; 20], String>,
    notes: VecDeque<String>,
}

impl<T> Default for Library<T> {
    fn default() -> Self {
        Library {
            slots: Vec::new(),
            by_name: BTreeMap::new(),
            by_hash: HashMap::new(),
            adding: BTreeMap::new(),
            next_add_file: 0,
            fetching: BTreeMap::new(),
            notes: VecDeque::new(),
        }
    }
}

/// `name` with `-<tag>` before the extension of a file, or at the end of a directory's name.
fn tagged(name: &str, tag: &str, is_dir: bool) -> String {
    match name.rfind('.').filter(|&i| i > 0 && !is_dir) {
        Some(dot) => format!("{}-{tag}{}", &name[..dot], &name[dot..]),
        None => format!("{name}-{tag}"),
    }
}

impl<T> Library<T> {
    /// Puts a torrent at the root; refused, changing nothing, if its info-hash is mounted.
    /// Returns its slot.
    pub fn insert(
        &mut self,
        info_hash: [u8; 20],
        inodes: InodeTable,
        item: T,
    ) -> Result<usize, LibraryError> {
        if let Some(&slot) = self.by_hash.get(&info_hash) {
            let name = self.shelf(slot).map(|s| s.name.clone()).unwrap_or_default();
            return Err(LibraryError::AlreadyMounted(name));
        }
        let (wanted, is_dir) = inodes
            .get(ROOT_INO)
            .and_then(|root| match &root.kind {
                NodeKind::Dir { children } => children.first().copied(),
                NodeKind::File { .. } => None,
            })
            .and_then(|top| inodes.get(top))
            .map(|n: &Node| (n.name.clone(), n.is_dir()))
            .unwrap_or_else(|| (hex::encode(info_hash), true));
        let taken = |n: &str| n == CONTROL_DIR || self.by_name.contains_key(n);
        let mut name = wanted.clone();
        if taken(&name) {
            let tag = &hex::encode(info_hash)[..8];
            name = tagged(&wanted, tag, is_dir);
            let mut n = 1;
            while taken(&name) {
                name = tagged(&wanted, &format!("{tag}.{n}"), is_dir);
                n += 1;
            }
        }
        self.slots.push(Some(Shelf {
            name: name.clone(),
            info_hash,
            inodes,
            item,
        }));
        let slot = self.slots.len();
        self.by_name.insert(name, slot);
        self.by_hash.insert(info_hash, slot);
        self.fetching.remove(&info_hash);
        Ok(slot)
    }

    /// Takes a torrent off the root; its inodes miss from now on.
    pub fn remove(&mut self, slot: usize) -> Option<Shelf<T>> {
        let shelf = self.slots.get_mut(slot.checked_sub(1)?)?.take()?;
        self.by_name.remove(&shelf.name);
        self.by_hash.remove(&shelf.info_hash);
        Some(shelf)
    }

    pub fn shelf(&self, slot: usize) -> Option<&Shelf<T>> {
        self.slots.get(slot.checked_sub(1)?)?.as_ref()
    }

    pub fn slot_of(&self, info_hash: &[u8; 20]) -> Option<usize> {
        self.by_hash.get(info_hash).copied()
    }

    pub fn slot_named(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The mounted torrents, by name.
    pub fn shelves(&self) -> impl Iterator<Item = (usize, &Shelf<T>)> + '_ {
        self.by_name
            .values()
            .filter_map(|&slot| Some((slot, self.shelf(slot)?)))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The torrent and node an ino names, if it is a node of a mounted torrent.
    pub fn node(&self, ino: u64) -> Option<(usize, &Shelf<T>, &Node)> {
        let Some(Ino::Node { slot, local }) = Ino::decode(ino) else {
            return None;
        };
        let shelf = self.shelf(slot)?;
        if local == ROOT_INO {
            return None; // a torrent's own root is the mount's root
        }
        Some((slot, shelf, shelf.inodes.get(local)?))
    }

    /// The global ino of a torrent's node, and the ino of its parent as the mount shows it.
    fn global(&self, slot: usize, node: &Node) -> (u64, u64) {
        let parent = match node.parent {
            ROOT_INO => ROOT_INO,
            p => Ino::Node { slot, local: p }.encode(),
        };
        (
            Ino::Node {
                slot,
                local: node.ino,
            }
            .encode(),
            parent,
        )
    }

    /// The parent of a directory, as `..` shows it.
    pub fn parent(&self, ino: u64) -> Option<u64> {
        Some(match Ino::decode(ino)? {
            Ino::Root | Ino::ControlDir => ROOT_INO,
            Ino::AddDir | Ino::TorrentsDir | Ino::Status | Ino::AddFile(_) => CONTROL_INO,
            Ino::TorrentLink(_) => TORRENTS_INO,
            Ino::Node { .. } => {
                let (slot, _, node) = self.node(ino)?;
                self.global(slot, node).1
            }
        })
    }

    /// Whether `ino` is a directory of the mount.
    pub fn is_dir(&self, ino: u64) -> bool {
        match Ino::decode(ino) {
            Some(Ino::Root | Ino::ControlDir | Ino::AddDir | Ino::TorrentsDir) => true,
            Some(Ino::Node { .. }) => self.node(ino).is_some_and(|(_, _, n)| n.is_dir()),
            _ => false,
        }
    }

    /// The child `name` of directory `parent`: its global ino.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match Ino::decode(parent)? {
            Ino::Root if name == CONTROL_DIR => Some(CONTROL_INO),
            Ino::Root => {
                let slot = *self.by_name.get(name)?;
                let top = self.shelf(slot)?.top()?;
                Some(Ino::Node { slot, local: top }.encode())
            }
            Ino::ControlDir => match name {
                ADD_DIR => Some(ADD_INO),
                TORRENTS_DIR => Some(TORRENTS_INO),
                STATUS_FILE => Some(STATUS_INO),
                _ => None,
            },
            Ino::AddDir => self
                .adding
                .iter()
                .find(|(_, f)| f.name == name)
                .map(|(&n, _)| Ino::AddFile(n).encode()),
            Ino::TorrentsDir => Some(Ino::TorrentLink(*self.by_name.get(name)?).encode()),
            Ino::Node { slot, local } => {
                let child = self.shelf(slot)?.inodes.lookup(local, name)?;
                Some(
                    Ino::Node {
                        slot,
                        local: child.ino,
                    }
                    .encode(),
                )
            }
            _ => None,
        }
    }

    /// The entries of directory `ino` after "." and "..", in order; None if it is no directory.
    /// A torrent's directories list lazily from `skip` on (a huge directory costs what a
    /// readdir call returns); the root and the control directories are small and listed whole.
    pub fn children(&self, ino: u64, skip: usize) -> Option<Vec<Listed>> {
        let all: Vec<Listed> = match Ino::decode(ino)? {
            Ino::Root => {
                let mut v = vec![Listed {
                    name: CONTROL_DIR.into(),
                    ino: CONTROL_INO,
                    is_dir: true,
                }];
                for (slot, shelf) in self.shelves() {
                    let Some(node) = shelf.top().and_then(|t| shelf.inodes.get(t)) else {
                        continue;
                    };
                    v.push(Listed {
                        name: shelf.name.clone(),
                        ino: self.global(slot, node).0,
                        is_dir: node.is_dir(),
                    });
                }
                v
            }
            Ino::ControlDir => vec![
                Listed {
                    name: ADD_DIR.into(),
                    ino: ADD_INO,
                    is_dir: true,
                },
                Listed {
                    name: STATUS_FILE.into(),
                    ino: STATUS_INO,
                    is_dir: false,
                },
                Listed {
                    name: TORRENTS_DIR.into(),
                    ino: TORRENTS_INO,
                    is_dir: true,
                },
            ],
            Ino::AddDir => self
                .adding
                .iter()
                .map(|(&n, f)| Listed {
                    name: f.name.clone(),
                    ino: Ino::AddFile(n).encode(),
                    is_dir: false,
                })
                .collect(),
            Ino::TorrentsDir => self
                .shelves()
                .map(|(slot, shelf)| Listed {
                    name: shelf.name.clone(),
                    ino: Ino::TorrentLink(slot).encode(),
                    is_dir: false,
                })
                .collect(),
            Ino::Node { .. } => {
                let (slot, shelf, node) = self.node(ino)?;
                let entries = shelf
                    .inodes
                    .readdir(node.ino, (skip as u64).saturating_add(2))?;
                return Some(
                    entries
                        .map(|e| Listed {
                            name: e.name.to_owned(),
                            ino: Ino::Node { slot, local: e.ino }.encode(),
                            is_dir: e.is_dir,
                        })
                        .collect(),
                );
            }
            Ino::Status | Ino::AddFile(_) | Ino::TorrentLink(_) => return None,
        };
        Some(all.into_iter().skip(skip).collect())
    }

    // ---- files being written into add/ ----

    pub fn create_add_file(&mut self, name: &str) -> Result<u64, LibraryError> {
        if self.adding.values().any(|f| f.name == name) {
            return Err(LibraryError::Exists);
        }
        if self.adding.len() >= MAX_ADD_FILES {
            return Err(LibraryError::TooManyFiles);
        }
        let n = self.next_add_file;
        self.next_add_file += 1;
        self.adding.insert(
            n,
            AddFile {
                name: name.to_owned(),
                data: Vec::new(),
            },
        );
        Ok(Ino::AddFile(n).encode())
    }

    pub fn add_file(&self, ino: u64) -> Option<&AddFile> {
        match Ino::decode(ino)? {
            Ino::AddFile(n) => self.adding.get(&n),
            _ => None,
        }
    }

    fn add_file_mut(&mut self, ino: u64) -> Option<&mut AddFile> {
        match Ino::decode(ino)? {
            Ino::AddFile(n) => self.adding.get_mut(&n),
            _ => None,
        }
    }

    /// Writes `data` at `offset` of a file in `add/` (a hole is zeros); returns the bytes written.
    pub fn write_add_file(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, LibraryError> {
        let file = self.add_file_mut(ino).ok_or(LibraryError::NotFound)?;
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&end| end <= MAX_ADD_FILE_BYTES)
            .ok_or(LibraryError::TooLarge)?;
        if file.data.len() < end {
            file.data.resize(end, 0);
        }
        let start = end - data.len();
        file.data[start..end].copy_from_slice(data);
        Ok(data.len())
    }

    /// Cuts or extends a file in `add/` (`O_TRUNC`, `truncate`).
    pub fn truncate_add_file(&mut self, ino: u64, len: u64) -> Result<(), LibraryError> {
        let file = self.add_file_mut(ino).ok_or(LibraryError::NotFound)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_ADD_FILE_BYTES)
            .ok_or(LibraryError::TooLarge)?;
        file.data.resize(len, 0);
        Ok(())
    }

    /// Takes a file out of `add/` (it was closed, or unlinked).
    pub fn take_add_file(&mut self, ino: u64) -> Option<AddFile> {
        match Ino::decode(ino)? {
            Ino::AddFile(n) => self.adding.remove(&n),
            _ => None,
        }
    }

    // ---- what status says besides the torrents ----

    /// A magnet whose metadata is being fetched (listed in `status` until it is mounted).
    pub fn set_fetching(&mut self, info_hash: [u8; 20], what: String) {
        self.fetching.insert(info_hash, what);
    }

    pub fn clear_fetching(&mut self, info_hash: &[u8; 20]) {
        self.fetching.remove(info_hash);
    }

    pub fn fetching(&self) -> impl Iterator<Item = &str> + '_ {
        self.fetching.values().map(String::as_str)
    }

    /// An error or notice for `status` (the newest `MAX_NOTES` are kept).
    pub fn note(&mut self, line: String) {
        if self.notes.len() == MAX_NOTES {
            self.notes.pop_front();
        }
        self.notes.push_back(line);
    }

    pub fn notes(&self) -> impl Iterator<Item = &str> + '_ {
        self.notes.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::layout::Lengths;
    use crate::core::metainfo::{FileEntry, Info};

    fn table(name: &str, files: &[&str]) -> InodeTable {
        let multi = !files.is_empty();
        let entries = if multi {
            FileEntry::laid_out(
                files
                    .iter()
                    .map(|p| (p.split('/').map(str::to_owned).collect(), 1000u64, false)),
            )
        } else {
            FileEntry::laid_out([(vec![name.to_owned()], 1000u64, false)])
        };
        let total = entries.iter().map(|f| f.length).sum();
        let lengths = Lengths::from_total(total, 16384).unwrap();
        InodeTable::new(&Info {
            name: name.to_owned(),
            original_name: None,
            piece_length: 16384,
            piece_hashes: vec![[0; 20]; lengths.piece_count() as usize],
            files: entries,
            multi_file: multi,
            private: false,
            lengths,
        })
    }

    fn names(lib: &Library<u32>, ino: u64) -> Vec<String> {
        lib.children(ino, 0)
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    }

    fn path(lib: &Library<u32>, path: &str) -> Option<u64> {
        let mut ino = ROOT_INO;
        for c in path.split('/') {
            ino = lib.lookup(ino, c)?;
        }
        Some(ino)
    }

    #[test]
    fn inode_numbers_round_trip_and_slot_zero_is_the_control_space() {
        for ino in [
            Ino::Root,
            Ino::ControlDir,
            Ino::AddDir,
            Ino::TorrentsDir,
            Ino::Status,
            Ino::AddFile(7),
            Ino::TorrentLink(3),
            Ino::Node { slot: 3, local: 9 },
        ] {
            assert_eq!(Ino::decode(ino.encode()), Some(ino));
        }
        assert_eq!(Ino::decode(0), None);
        assert_eq!(Ino::decode(17), None);
    }

    #[test]
    fn torrents_sit_side_by_side_under_their_names() {
        let mut lib = Library::default();
        let a = lib.insert([1; 20], table("movie.mkv", &[]), 10).unwrap();
        let b = lib
            .insert([2; 20], table("set", &["x.txt", "d/y.txt"]), 20)
            .unwrap();
        assert_eq!(names(&lib, ROOT_INO), [".swarmfs", "movie.mkv", "set"]);
        let y = path(&lib, "set/d/y.txt").unwrap();
        let (slot, shelf, node) = lib.node(y).unwrap();
        assert_eq!((slot, shelf.item, node.name.as_str()), (b, 20, "y.txt"));
        let d = path(&lib, "set/d").unwrap();
        assert_eq!(lib.parent(y), Some(d));
        assert_eq!(lib.parent(path(&lib, "set").unwrap()), Some(ROOT_INO));
        assert_eq!(lib.node(path(&lib, "movie.mkv").unwrap()).unwrap().0, a);
        assert_eq!(names(&lib, path(&lib, "set").unwrap()), ["d", "x.txt"]);
        // `torrents/` lists the same names.
        assert_eq!(
            names(&lib, path(&lib, ".swarmfs/torrents").unwrap()),
            ["movie.mkv", "set"]
        );
    }

    #[test]
    fn the_same_info_hash_is_refused_and_colliding_names_get_a_stable_tag() {
        let mut lib = Library::default();
        lib.insert([0xab; 20], table("movie.mkv", &[]), 1).unwrap();
        assert_eq!(
            lib.insert([0xab; 20], table("other", &[]), 2),
            Err(LibraryError::AlreadyMounted("movie.mkv".into()))
        );
        let second = lib.insert([0xcd; 20], table("movie.mkv", &[]), 3).unwrap();
        assert_eq!(lib.shelf(second).unwrap().name, "movie-cdcdcdcd.mkv");
        lib.insert([0x01; 20], table("set", &["a"]), 4).unwrap();
        let dir = lib.insert([0x02; 20], table("set", &["b"]), 5).unwrap();
        assert_eq!(lib.shelf(dir).unwrap().name, "set-02020202");
        // A torrent called like the control directory does not hide it.
        let hidden = lib
            .insert([0x03; 20], table(".swarmfs", &["c"]), 6)
            .unwrap();
        assert_eq!(lib.shelf(hidden).unwrap().name, ".swarmfs-03030303");
        assert_eq!(path(&lib, ".swarmfs/status"), Some(STATUS_INO));
    }

    #[test]
    fn a_removed_torrent_s_inodes_miss_and_its_slot_is_not_reused() {
        let mut lib = Library::default();
        let a = lib.insert([1; 20], table("set", &["x"]), 1).unwrap();
        let x = path(&lib, "set/x").unwrap();
        assert_eq!(lib.remove(a).unwrap().item, 1);
        assert!(lib.node(x).is_none() && lib.lookup(ROOT_INO, "set").is_none());
        assert!(lib.remove(a).is_none());
        let b = lib.insert([1; 20], table("set", &["x"]), 2).unwrap();
        assert_ne!(a, b);
        assert_ne!(path(&lib, "set/x"), Some(x));
        assert_eq!(lib.shelf(b).unwrap().name, "set");
    }

    #[test]
    fn files_written_into_add_are_bounded_and_taken_whole() {
        let mut lib: Library<u32> = Library::default();
        let add = path(&lib, ".swarmfs/add").unwrap();
        let f = lib.create_add_file("x.torrent").unwrap();
        assert_eq!(lib.create_add_file("x.torrent"), Err(LibraryError::Exists));
        assert_eq!(lib.lookup(add, "x.torrent"), Some(f));
        assert_eq!(names(&lib, add), ["x.torrent"]);
        assert_eq!(lib.parent(f), Some(CONTROL_INO));
        assert_eq!(lib.write_add_file(f, 0, b"d4:"), Ok(3));
        assert_eq!(lib.write_add_file(f, 5, b"e"), Ok(1));
        assert_eq!(lib.add_file(f).unwrap().data, b"d4:\0\0e");
        assert_eq!(
            lib.write_add_file(f, MAX_ADD_FILE_BYTES as u64, b"x"),
            Err(LibraryError::TooLarge)
        );
        assert_eq!(
            lib.write_add_file(f, u64::MAX, b"x"),
            Err(LibraryError::TooLarge)
        );
        lib.truncate_add_file(f, 2).unwrap();
        assert_eq!(lib.take_add_file(f).unwrap().data, b"d4");
        assert!(lib.lookup(add, "x.torrent").is_none());
        for i in 0..MAX_ADD_FILES {
            lib.create_add_file(&i.to_string()).unwrap();
        }
        assert_eq!(
            lib.create_add_file("one more"),
            Err(LibraryError::TooManyFiles)
        );
    }

    #[test]
    fn notes_keep_the_newest() {
        let mut lib: Library<u32> = Library::default();
        for i in 0..MAX_NOTES + 5 {
            lib.note(format!("line {i}"));
        }
        assert_eq!(lib.notes().count(), MAX_NOTES);
        assert_eq!(lib.notes().next(), Some("line 5"));
        lib.set_fetching([9; 20], "magnet x: fetching".into());
        assert_eq!(lib.fetching().collect::<Vec<_>>(), ["magnet x: fetching"]);
        lib.insert([9; 20], table("x", &[]), 1).unwrap();
        assert_eq!(lib.fetching().count(), 0);
    }
}
