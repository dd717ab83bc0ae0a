//! The mount's directory tree, built once from the metainfo: inode numbers, lookup and readdir.
//! PURE (no fuser types), so the FUSE layer only translates.
//!
//! The mount root (ino 1) holds the torrent's `name`, as a download would lay it out: the file of
//! a single-file torrent or the directory of a multi-file one. Pad files are never shown.
//! Inode numbers are dense (1..=len) and assigned depth-first over names sorted byte-wise, so the
//! same torrent always gives the same numbers. The tree is built without recursion (paths come
//! from a file and may be arbitrarily deep).

use std::collections::{BTreeMap, HashMap};

use crate::core::metainfo::Info;

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir {
        /// Sorted by name.
        children: Vec<u64>,
    },
    File {
        /// Index into `Info.files`.
        file_index: usize,
        /// Offset of the file's first byte in the torrent byte stream.
        offset: u64,
        length: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub ino: u64,
    /// The root is its own parent.
    pub parent: u64,
    /// Empty for the root.
    pub name: String,
    pub kind: NodeKind,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// One entry of a directory listing, borrowing its name from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The readdir offset that resumes after this entry.
    pub next_offset: u64,
    pub ino: u64,
    pub is_dir: bool,
    pub name: &'a str,
}

pub struct InodeTable {
    /// `nodes[ino - 1]`.
    nodes: Vec<Node>,
    /// Per directory ino: child name -> child ino.
    by_name: HashMap<u64, HashMap<String, u64>>,
    file_count: usize,
    dir_count: usize,
}

/// A node under construction: an arena entry, so neither building nor dropping recurses.
struct Draft {
    name: String,
    parent: usize,
    kind: DraftKind,
}

enum DraftKind {
    Dir(BTreeMap<String, usize>),
    File {
        file_index: usize,
        offset: u64,
        length: u64,
    },
}

const ROOT_DRAFT: usize = 0;

struct Drafts(Vec<Draft>);

impl Drafts {
    fn new() -> Self {
        Drafts(vec![Draft {
            name: String::new(),
            parent: ROOT_DRAFT,
            kind: DraftKind::Dir(BTreeMap::new()),
        }])
    }

    fn children(&self, index: usize) -> Option<&BTreeMap<String, usize>> {
        match &self.0.get(index)?.kind {
            DraftKind::Dir(children) => Some(children),
            DraftKind::File { .. } => None,
        }
    }

    /// Appends a node under `parent` (a directory with no child of that name).
    fn push(&mut self, parent: usize, name: &str, kind: DraftKind) -> usize {
        let index = self.0.len();
        if let Some(Draft {
            kind: DraftKind::Dir(children),
            ..
        }) = self.0.get_mut(parent)
        {
            children.insert(name.to_owned(), index);
        }
        self.0.push(Draft {
            name: name.to_owned(),
            parent,
            kind,
        });
        index
    }

    /// Adds the node at `components` below the root (a file, or a directory if `file` is None),
    /// creating missing directories. Refuses, changing nothing, if the path exists or passes
    /// through a file.
    fn add(&mut self, components: &[&str], file: Option<DraftKind>) -> Result<(), &'static str> {
        let Some((leaf, dirs)) = components.split_last() else {
            return Err("empty path");
        };
        let mut current = ROOT_DRAFT;
        for dir in dirs {
            let children = self.children(current).ok_or("a parent is a file")?;
            current = match children.get(*dir) {
                Some(&child) => child,
                // Everything from here on is new, so nothing further can conflict.
                None => self.push(current, dir, DraftKind::Dir(BTreeMap::new())),
            };
        }
        let children = self.children(current).ok_or("a parent is a file")?;
        if children.contains_key(*leaf) {
            return Err("the path already exists");
        }
        self.push(
            current,
            leaf,
            file.unwrap_or_else(|| DraftKind::Dir(BTreeMap::new())),
        );
        Ok(())
    }
}

/// A name the kernel can show: not empty, not `.` or `..`, no `/` or NUL.
fn valid_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl InodeTable {
    /// The mount root (ino 1) holds the torrent's `name`: the file of a single-file torrent or the
    /// directory of a multi-file one. Pad files are never shown. Entries whose path is unusable
    /// (an invalid component, or a conflict with an earlier entry: the same path, or a file where
    /// a directory is needed) are skipped with a warning; metainfo parsing sanitizes and
    /// de-duplicates paths, so they do not occur for a parsed torrent.
    pub fn new(info: &Info) -> InodeTable {
        let mut drafts = Drafts::new();
        if !valid_component(&info.name) {
            log::warn!(
                "torrent name {:?} is not a usable file name; the mount is empty",
                info.name
            );
        } else if info.multi_file {
            // The directory exists even when the torrent lists no (visible) file.
            if let Err(why) = drafts.add(&[info.name.as_str()], None) {
                log::warn!("cannot create directory {:?}: {why}", info.name);
            }
        }
        if valid_component(&info.name) {
            for (file_index, entry) in info.files.iter().enumerate() {
                if entry.pad {
                    continue;
                }
                let mut components: Vec<&str> = vec![info.name.as_str()];
                if info.multi_file {
                    components.extend(entry.path.iter().map(String::as_str));
                }
                let shown = || components.join("/");
                if info.multi_file && entry.path.is_empty() {
                    log::warn!("skipping file {file_index} of {:?}: empty path", shown());
                    continue;
                }
                if let Some(bad) = components.iter().find(|c| !valid_component(c)) {
                    log::warn!("skipping {:?}: invalid path component {bad:?}", shown());
                    continue;
                }
                let file = DraftKind::File {
                    file_index,
                    offset: entry.offset,
                    length: entry.length,
                };
                if let Err(why) = drafts.add(&components, Some(file)) {
                    log::warn!("skipping {:?}: {why}", shown());
                }
            }
        }
        Self::number(drafts)
    }

    /// Assigns inode numbers depth-first (pre-order, children by name) and freezes the tree.
    fn number(drafts: Drafts) -> InodeTable {
        let mut drafts = drafts.0;
        let mut order = Vec::with_capacity(drafts.len());
        let mut ino_of = vec![0u64; drafts.len()];
        let mut stack = vec![ROOT_DRAFT];
        while let Some(index) = stack.pop() {
            order.push(index);
            ino_of[index] = order.len() as u64;
            if let DraftKind::Dir(children) = &drafts[index].kind {
                stack.extend(children.values().rev());
            }
        }

        let mut nodes = Vec::with_capacity(order.len());
        let mut by_name = HashMap::new();
        let (mut file_count, mut dir_count) = (0, 0);
        for index in order {
            let draft = &mut drafts[index];
            let ino = ino_of[index];
            let kind = match std::mem::replace(&mut draft.kind, DraftKind::Dir(BTreeMap::new())) {
                DraftKind::Dir(children) => {
                    dir_count += 1;
                    let mut names = HashMap::with_capacity(children.len());
                    let mut inos = Vec::with_capacity(children.len());
                    for (name, child) in children {
                        inos.push(ino_of[child]);
                        names.insert(name, ino_of[child]);
                    }
                    by_name.insert(ino, names);
                    NodeKind::Dir { children: inos }
                }
                DraftKind::File {
                    file_index,
                    offset,
                    length,
                } => {
                    file_count += 1;
                    NodeKind::File {
                        file_index,
                        offset,
                        length,
                    }
                }
            };
            nodes.push(Node {
                ino,
                parent: ino_of[draft.parent],
                name: std::mem::take(&mut draft.name),
                kind,
            });
        }
        InodeTable {
            nodes,
            by_name,
            file_count,
            dir_count,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        let index = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(index)
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        let ino = *self.by_name.get(&parent)?.get(name)?;
        self.get(ino)
    }

    /// The entries of directory `ino` from `offset` on, "." and ".." first (as readdir wants),
    /// then the children by name; None if `ino` is not a directory. Offset `k` is the `k`th
    /// entry, so resuming is an index into the sorted children, and the iterator builds each
    /// entry only when asked, borrowing its name: a readdir call costs what it returns.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
    ) -> Option<impl Iterator<Item = DirEntry<'_>> + '_> {
        let node = self.get(ino)?;
        let NodeKind::Dir { children } = &node.kind else {
            return None;
        };
        // "." and "..".
        const DOT_ENTRIES: usize = 2;
        // An offset past the end (even past usize) starts an empty range.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = DOT_ENTRIES + children.len();
        Some((start..end).filter_map(move |index| {
            let (ino, is_dir, name) = match index {
                0 => (node.ino, true, "."),
                1 => (node.parent, true, ".."),
                _ => {
                    // Children are valid inos by construction; `get` keeps this panic-free.
                    let child = self.get(*children.get(index - DOT_ENTRIES)?)?;
                    (child.ino, child.is_dir(), child.name.as_str())
                }
            };
            Some(DirEntry {
                next_offset: index as u64 + 1,
                ino,
                is_dir,
                name,
            })
        }))
    }

    /// Number of nodes (directories, the root included, and files).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn file_count(&self) -> usize {
        self.file_count
    }

    /// Directories, the root included.
    pub fn dir_count(&self) -> usize {
        self.dir_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::layout::Lengths;
    use crate::core::metainfo::FileEntry;

    const PIECE: u32 = 16384;

    /// `(path with '/' separators, length, pad)` in stream order.
    fn info(name: &str, multi_file: bool, files: &[(&str, u64, bool)]) -> Info {
        let entries = FileEntry::laid_out(files.iter().map(|&(path, length, pad)| {
            (path.split('/').map(str::to_owned).collect(), length, pad)
        }));
        with_entries(name, multi_file, entries)
    }

    fn with_entries(name: &str, multi_file: bool, files: Vec<FileEntry>) -> Info {
        let total = files.iter().map(|f| f.length).sum();
        let lengths = Lengths::from_total(total, PIECE).unwrap();
        Info {
            name: name.to_owned(),
            original_name: None,
            piece_length: PIECE,
            piece_hashes: vec![[0; 20]; lengths.piece_count() as usize],
            files,
            multi_file,
            private: false,
            lengths,
        }
    }

    fn entry(path: &[&str], length: u64) -> FileEntry {
        FileEntry {
            path: path.iter().map(|s| s.to_string()).collect(),
            length,
            offset: 0,
            pad: false,
            executable: false,
            hidden: false,
            original: None,
        }
    }

    /// The node at a '/'-separated path below the root.
    fn at<'a>(t: &'a InodeTable, path: &str) -> Option<&'a Node> {
        let mut node = t.get(ROOT_INO)?;
        for name in path.split('/') {
            node = t.lookup(node.ino, name)?;
        }
        Some(node)
    }

    /// The whole listing of directory `ino` from `offset`.
    fn list(t: &InodeTable, ino: u64, offset: u64) -> Vec<DirEntry<'_>> {
        t.readdir(ino, offset)
            .unwrap_or_else(|| panic!("{ino} is not a directory"))
            .collect()
    }

    fn names(t: &InodeTable, ino: u64) -> Vec<&str> {
        list(t, ino, 0).into_iter().map(|e| e.name).collect()
    }

    /// `(next_offset, ino, is_dir, name)`, for short expected listings.
    fn entry_tuple(e: DirEntry<'_>) -> (u64, u64, bool, &str) {
        (e.next_offset, e.ino, e.is_dir, e.name)
    }

    #[test]
    fn single_file_torrent_is_one_file_under_the_root() {
        let t = InodeTable::new(&info("movie.mkv", false, &[("movie.mkv", 100_000, false)]));
        assert_eq!(t.len(), 2);
        assert_eq!((t.file_count(), t.dir_count()), (1, 1));
        let root = t.get(ROOT_INO).unwrap();
        assert_eq!(root.parent, ROOT_INO);
        assert_eq!(root.kind, NodeKind::Dir { children: vec![2] });
        let file = t.lookup(ROOT_INO, "movie.mkv").unwrap();
        assert_eq!(
            file,
            &Node {
                ino: 2,
                parent: ROOT_INO,
                name: "movie.mkv".into(),
                kind: NodeKind::File {
                    file_index: 0,
                    offset: 0,
                    length: 100_000
                },
            }
        );
        assert_eq!(
            list(&t, ROOT_INO, 0)
                .into_iter()
                .map(entry_tuple)
                .collect::<Vec<_>>(),
            [
                (1, 1, true, "."),
                (2, 1, true, ".."),
                (3, 2, false, "movie.mkv"),
            ]
        );
        assert!(t.readdir(2, 0).is_none());
        assert!(t.lookup(2, "x").is_none());
    }

    #[test]
    fn multi_file_tree_is_numbered_depth_first_by_name() {
        // Stream order differs from name order on purpose.
        let i = info(
            "data",
            true,
            &[
                ("top.txt", 10, false),
                ("b/c/d.txt", 20, false),
                ("a/y.bin", 30, false),
                ("a/x.bin", 40, false),
            ],
        );
        let t = InodeTable::new(&i);
        assert_eq!(t.len(), 9);
        assert_eq!((t.file_count(), t.dir_count()), (4, 5));
        let expected = [
            ("data", 2, 1),
            ("data/a", 3, 2),
            ("data/a/x.bin", 4, 3),
            ("data/a/y.bin", 5, 3),
            ("data/b", 6, 2),
            ("data/b/c", 7, 6),
            ("data/b/c/d.txt", 8, 7),
            ("data/top.txt", 9, 2),
        ];
        for (path, ino, parent) in expected {
            let node = at(&t, path).unwrap_or_else(|| panic!("{path} missing"));
            assert_eq!((node.ino, node.parent), (ino, parent), "{path}");
            assert_eq!(t.get(ino), Some(node));
        }
        assert_eq!(
            at(&t, "data/a/x.bin").unwrap().kind,
            NodeKind::File {
                file_index: 3,
                offset: 60,
                length: 40
            }
        );
        assert_eq!(
            at(&t, "data/b/c/d.txt").unwrap().kind,
            NodeKind::File {
                file_index: 1,
                offset: 10,
                length: 20
            }
        );
        assert_eq!(
            t.get(2).unwrap().kind,
            NodeKind::Dir {
                children: vec![3, 6, 9]
            }
        );
        assert_eq!(names(&t, 3), [".", "..", "x.bin", "y.bin"]);
        assert!(t.lookup(2, "c").is_none());
        assert!(t.get(0).is_none());
        assert!(t.get(10).is_none());
        assert!(t.get(u64::MAX).is_none());
    }

    #[test]
    fn numbering_is_stable_across_builds() {
        let i = info(
            "set",
            true,
            &[
                ("z/1", 5, false),
                ("a/b/c", 6, false),
                ("a/b/a", 7, false),
                ("m", 0, false),
                ("a/z", 8, false),
            ],
        );
        let (t1, t2) = (InodeTable::new(&i), InodeTable::new(&i));
        assert_eq!(t1.len(), t2.len());
        for ino in 1..=t1.len() as u64 {
            assert_eq!(t1.get(ino), t2.get(ino));
        }
        // Listing order and readdir agree with the numbering: names sorted, inos increasing.
        let a = at(&t1, "set/a").unwrap().ino;
        let listed = list(&t1, a, 2);
        assert_eq!(
            listed.iter().map(|e| e.name).collect::<Vec<_>>(),
            ["b", "z"]
        );
        assert!(listed[0].ino < listed[1].ino);
    }

    #[test]
    fn readdir_offsets_resume_where_they_left_off() {
        let i = info(
            "d",
            true,
            &[
                ("e", 1, false),
                ("b", 1, false),
                ("sub/x", 1, false),
                ("a", 1, false),
            ],
        );
        let t = InodeTable::new(&i);
        let dir = at(&t, "d").unwrap();
        let full = list(&t, dir.ino, 0);
        assert_eq!(
            full.iter().map(|e| (e.name, e.is_dir)).collect::<Vec<_>>(),
            [
                (".", true),
                ("..", true),
                ("a", false),
                ("b", false),
                ("e", false),
                ("sub", true)
            ]
        );
        assert_eq!(full[0].ino, dir.ino);
        assert_eq!(full[1].ino, ROOT_INO);
        for (k, entry) in full.iter().enumerate() {
            // Resuming at an entry's next_offset yields exactly the entries after it.
            assert_eq!(list(&t, dir.ino, entry.next_offset), full[k + 1..]);
            assert_eq!(list(&t, dir.ino, k as u64), full[k..]);
        }
        assert!(list(&t, dir.ino, full.len() as u64).is_empty());
        assert!(list(&t, dir.ino, u64::MAX).is_empty());
        assert!(t.readdir(at(&t, "d/a").unwrap().ino, 0).is_none());
        assert!(t.readdir(999, 0).is_none());
    }

    /// A multi-file torrent "big" whose directory "dir" holds `n` 1-byte files named by their
    /// number, zero-padded so that name order is number order; listed in reverse in the stream,
    /// so the table has to sort them.
    fn big_dir(n: usize) -> (InodeTable, u64) {
        let files = (0..n)
            .rev()
            .map(|i| entry(&["dir", &format!("{i:06}")], 1))
            .collect();
        let t = InodeTable::new(&with_entries("big", true, files));
        let dir = at(&t, "big/dir").unwrap().ino;
        (t, dir)
    }

    /// The name at readdir index `index` of a `big_dir` directory.
    fn big_dir_name(index: usize) -> String {
        match index {
            0 => ".".into(),
            1 => "..".into(),
            i => format!("{:06}", i - 2),
        }
    }

    #[test]
    fn readdir_resumed_at_every_offset_of_a_big_directory_yields_exactly_the_rest() {
        let n = 3_000;
        let (t, dir) = big_dir(n);
        let full = list(&t, dir, 0);
        assert_eq!(full.len(), n + 2);
        for (index, e) in full.iter().enumerate() {
            assert_eq!(e.name, big_dir_name(index));
            assert_eq!(e.next_offset, index as u64 + 1);
            assert_eq!(e.is_dir, index < 2);
        }
        for offset in 0..=full.len() {
            assert_eq!(
                list(&t, dir, offset as u64),
                full[offset..],
                "offset {offset}"
            );
        }
        assert!(list(&t, dir, u64::MAX).is_empty());
    }

    #[test]
    fn taking_a_few_entries_at_any_offset_of_a_100k_entry_directory_borrows_their_names() {
        let n = 100_000;
        let (t, dir) = big_dir(n);
        let taken = 3;
        for offset in [0, 1, 2, 3, 50_000, n - 1, n, n + 1, n + 2, n + 3] {
            let entries: Vec<_> = t.readdir(dir, offset as u64).unwrap().take(taken).collect();
            let expected: Vec<String> = (offset..(n + 2).min(offset + taken))
                .map(big_dir_name)
                .collect();
            assert_eq!(
                entries.iter().map(|e| e.name).collect::<Vec<_>>(),
                expected,
                "offset {offset}"
            );
            for (k, e) in entries.iter().enumerate() {
                assert_eq!(e.next_offset, (offset + k + 1) as u64);
                if !e.is_dir {
                    // The name is the table's own string, not a copy.
                    let node = t.get(e.ino).unwrap();
                    assert!(std::ptr::eq(e.name, node.name.as_str()), "{}", e.name);
                }
            }
        }
    }

    #[test]
    fn pad_files_are_hidden_and_keep_stream_offsets() {
        let i = info(
            "padded",
            true,
            &[
                ("one", 100, false),
                (".pad/16284", 16284, true),
                ("two", 5, false),
                ("dir/.pad", 3, true),
            ],
        );
        let t = InodeTable::new(&i);
        assert_eq!(t.file_count(), 2);
        assert_eq!(t.dir_count(), 2);
        assert_eq!(names(&t, 2), [".", "..", "one", "two"]);
        assert!(at(&t, "padded/.pad").is_none());
        assert!(at(&t, "padded/dir").is_none());
        assert_eq!(
            at(&t, "padded/two").unwrap().kind,
            NodeKind::File {
                file_index: 2,
                offset: 16384,
                length: 5
            }
        );
    }

    #[test]
    fn conflicting_paths_keep_the_earlier_entry() {
        let i = info(
            "c",
            true,
            &[
                ("a", 1, false),
                ("a/b", 2, false),
                ("x/y", 3, false),
                ("x", 4, false),
                ("d/e", 5, false),
                ("d/e", 6, false),
                ("ok", 7, false),
            ],
        );
        let t = InodeTable::new(&i);
        assert_eq!(t.file_count(), 4);
        assert!(matches!(
            at(&t, "c/a").unwrap().kind,
            NodeKind::File { file_index: 0, .. }
        ));
        assert!(at(&t, "c/a/b").is_none());
        assert!(at(&t, "c/x").unwrap().is_dir());
        assert!(matches!(
            at(&t, "c/x/y").unwrap().kind,
            NodeKind::File { file_index: 2, .. }
        ));
        assert!(matches!(
            at(&t, "c/d/e").unwrap().kind,
            NodeKind::File { file_index: 4, .. }
        ));
        assert!(matches!(
            at(&t, "c/ok").unwrap().kind,
            NodeKind::File { file_index: 6, .. }
        ));
        // Numbering stays dense.
        for ino in 1..=t.len() as u64 {
            assert_eq!(t.get(ino).unwrap().ino, ino);
        }
    }

    #[test]
    fn empty_files_and_unicode_names() {
        let i = info(
            "données",
            true,
            &[
                ("empty", 0, false),
                ("日本語/ファイル 1.txt", 12, false),
                ("émoji 🎉.bin", 3, false),
            ],
        );
        let t = InodeTable::new(&i);
        assert_eq!(
            at(&t, "données/empty").unwrap().kind,
            NodeKind::File {
                file_index: 0,
                offset: 0,
                length: 0
            }
        );
        let jp = at(&t, "données/日本語/ファイル 1.txt").unwrap();
        assert_eq!(jp.name, "ファイル 1.txt");
        assert!(matches!(
            jp.kind,
            NodeKind::File {
                offset: 0,
                length: 12,
                ..
            }
        ));
        assert!(at(&t, "données/émoji 🎉.bin").is_some());
        // Byte-wise order: ASCII before the accented and CJK names.
        assert_eq!(names(&t, 2), [".", "..", "empty", "émoji 🎉.bin", "日本語"]);
    }

    #[test]
    fn unusable_names_are_skipped_not_fatal() {
        let files = vec![
            entry(&["..", "x"], 1),
            entry(&["a/b"], 1),
            entry(&["nul\0"], 1),
            entry(&["a", "", "b"], 1),
            entry(&["."], 1),
            entry(&[], 1),
            entry(&["fine"], 1),
        ];
        let t = InodeTable::new(&with_entries("t", true, files));
        assert_eq!(t.file_count(), 1);
        assert_eq!(names(&t, 2), [".", "..", "fine"]);

        let t = InodeTable::new(&info("../evil", false, &[("../evil", 1, false)]));
        assert_eq!(t.len(), 1);
        assert_eq!(names(&t, ROOT_INO), [".", ".."]);
    }

    #[test]
    fn multi_file_torrent_without_visible_files_is_an_empty_directory() {
        let t = InodeTable::new(&info("only-pad", true, &[(".pad/1", 1, true)]));
        assert_eq!((t.len(), t.file_count(), t.dir_count()), (2, 0, 2));
        assert_eq!(names(&t, 2), [".", ".."]);
    }

    #[test]
    fn deep_paths_do_not_recurse() {
        let depth = 10_000;
        let path: Vec<&str> = vec!["d"; depth];
        let t = InodeTable::new(&with_entries("deep", true, vec![entry(&path, 1)]));
        assert_eq!(t.len(), depth + 2);
        assert_eq!(t.file_count(), 1);
        let last = t.get(t.len() as u64).unwrap();
        assert!(!last.is_dir());
        assert_eq!(last.parent, t.len() as u64 - 1);
    }
}
