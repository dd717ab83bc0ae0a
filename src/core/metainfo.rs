//! .torrent metainfo (BEP 3, BEP 12 tiers, BEP 47 pad files and attributes): parsing with
//! specific errors, and a deterministic builder. Magnet URIs live in [`crate::core::magnet`]
//! and are re-exported here.
//!
//! Parsing walks the input with the bounded reader of [`crate::core::bencode`], so no input can
//! make it panic, recurse without bound or allocate more than a small multiple of its own size.
//! The info-hash is the SHA-1 of the `info` dictionary's bytes exactly as they stand in the
//! input, so keys we do not know (and key orders we would not write) keep their hash.
//!
//! Hybrid v1+v2 torrents (BEP 52) are read through their v1 part; v2-only torrents are refused.
//!
//! Pad files (`attr` contains `p`, or BitComet's `_____padding_file_` names; libtorrent names
//! them `.pad/N`) stay in [`Info::files`] because they take up bytes of the piece stream, but
//! they are flagged and never shown; pads of the same size may share a path.
//!
//! # Names
//!
//! What libtorrent opens, we open, with the same paths: names and paths are never refused but
//! sanitized as libtorrent does (see [`crate::core::names`]), so every component is a single
//! safe name and no file can leave the torrent's root; colliding paths get a counter
//! (`bar.1.txt`). `name.utf-8` / `path.utf-8` are preferred when present with the right type.
//! [`Info::original_name`] and [`FileEntry::original`] keep what the torrent wrote when that
//! changed it. A single-file torrent whose name sanitizes to nothing is refused (so does
//! libtorrent); a directory name that does becomes the info-hash in hex.
//!
//! Trailing bytes after the top-level dictionary are ignored, as libtorrent ignores them.

use std::path::Path;

use sha1::{Digest, Sha1};

use crate::core::bencode::{self, BencodeError, Node, Owned};
use crate::core::layout::{LayoutError, Lengths};
use crate::core::names;

pub use crate::core::magnet::{Magnet, MagnetError};

/// SHA-1 of the exact bytes of the `info` dictionary.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub [u8; 20]);

impl InfoHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 40 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<InfoHash> {
        let mut out = [0u8; 20];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(InfoHash(out))
    }

    /// The SHA-1 of `info_bytes`.
    pub fn of_info(info_bytes: &[u8]) -> InfoHash {
        InfoHash(Sha1::digest(info_bytes).into())
    }
}

impl std::fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InfoHash({})", self.to_hex())
    }
}

impl std::fmt::Display for InfoHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One entry of the torrent's byte stream, in order. Pad files are kept (they take up bytes of
/// the stream) but flagged, and never shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path components below the torrent's root directory (for a single-file torrent: `[name]`).
    pub path: Vec<String>,
    pub length: u64,
    /// Offset of the file's first byte in the torrent's byte stream.
    pub offset: u64,
    /// BEP 47 `attr` contains `p`.
    pub pad: bool,
    /// BEP 47 `attr` contains `x`.
    pub executable: bool,
    /// BEP 47 `attr` contains `h`.
    pub hidden: bool,
    /// The path as the torrent wrote it (`/`-joined, invalid UTF-8 shown as U+FFFD), when
    /// sanitizing or de-duplicating changed it; never for pad files.
    pub original: Option<String>,
}

#[cfg(test)]
impl FileEntry {
    /// Files laid end to end from offset 0, from `(path, length, pad)`: a fixture for tests.
    pub(crate) fn laid_out(files: impl IntoIterator<Item = (Vec<String>, u64, bool)>) -> Vec<Self> {
        let mut offset = 0;
        files
            .into_iter()
            .map(|(path, length, pad)| {
                let e = FileEntry {
                    path,
                    length,
                    offset,
                    pad,
                    executable: false,
                    hidden: false,
                    original: None,
                };
                offset += length;
                e
            })
            .collect()
    }
}

impl FileEntry {
    /// The path components joined with `/` (components never contain `/`).
    pub fn display_path(&self) -> String {
        self.path.join("/")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The sanitized name: the file of a single-file torrent, the root directory of another.
    pub name: String,
    /// The name as the torrent wrote it, when sanitizing changed it.
    pub original_name: Option<String>,
    pub piece_length: u32,
    pub piece_hashes: Vec<[u8; 20]>,
    /// All entries including pad files, in stream order.
    pub files: Vec<FileEntry>,
    /// True for a multi-file torrent (`files` key), whose root is a directory called `name`.
    pub multi_file: bool,
    pub private: bool,
    pub lengths: Lengths,
}

impl Info {
    /// Parses a bare `info` dictionary (for example one received through BEP 9).
    pub fn from_bytes(info_bytes: &[u8]) -> Result<Info, MetainfoError> {
        parse_info(&bencode::decode(info_bytes)?)
    }

    /// The visible files whose path differs from what the torrent wrote.
    pub fn renamed_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.visible_files()
            .map(|(_, f)| f)
            .filter(|f| f.original.is_some())
    }

    /// The files users see (no pad files), with their index in [`Info::files`].
    pub fn visible_files(&self) -> impl Iterator<Item = (usize, &FileEntry)> {
        self.files.iter().enumerate().filter(|(_, f)| !f.pad)
    }

    pub fn total_length(&self) -> u64 {
        self.lengths.total_length()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metainfo {
    pub info_hash: InfoHash,
    pub info: Info,
    /// The exact bytes of the `info` dictionary (for BEP 9 metadata exchange).
    pub info_bytes: Vec<u8>,
    pub announce: Option<String>,
    /// BEP 12 tiers; when absent, `[[announce]]`.
    pub announce_list: Vec<Vec<String>>,
    pub comment: Option<String>,
    pub created_by: Option<String>,
    pub creation_date: Option<i64>,
}

/// Largest .torrent file read (the pieces of a 1 TiB torrent at 16 KiB are 1.25 GiB, but real
/// torrents use larger pieces; 100 MiB covers far more than any seen in practice).
pub const MAX_TORRENT_FILE_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetainfoError {
    #[error("cannot read {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_TORRENT_FILE_BYTES} bytes; not a .torrent file")]
    FileTooLarge { path: String },
    #[error("not valid bencode: {0}")]
    Bencode(#[from] BencodeError),
    #[error("missing key '{0}'")]
    MissingKey(String),
    #[error("'{key}' should be a {expected}, found a {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("v2-only torrents are not supported yet")]
    V2Only,
    #[error("unknown 'meta version' {0}")]
    UnknownMetaVersion(i64),
    #[error("'info.file tree' without 'meta version' 2")]
    FileTreeWithoutMetaVersion,
    #[error("'info.file tree' {0}")]
    BadFileTree(String),
    #[error("piece length {0} of a v2 torrent is not a power of two of at least 16 KiB")]
    V2PieceLength(u32),
    #[error("the v1 and v2 file lists of this hybrid torrent disagree: {0}")]
    HybridMismatch(String),
    #[error("the name {0:?} is not a usable file name")]
    UnusableName(String),
    #[error("the torrent holds no data (its files add up to 0 bytes)")]
    NoData,
    #[error("'info.pieces' is {0} bytes long, not a multiple of 20")]
    PiecesNotMultipleOf20(usize),
    #[error("piece length is 0")]
    ZeroPieceLength,
    #[error("piece length {0} is too large")]
    PieceLengthTooLarge(i64),
    #[error("'{key}' is negative ({value})")]
    NegativeLength { key: String, value: i64 },
    #[error("the file lengths add up to more than 2^64 bytes")]
    LengthOverflow,
    #[error("info has both 'length' and 'files'")]
    LengthAndFiles,
    #[error("'info.files' is empty")]
    NoFiles,
    #[error("{key} has no path components")]
    EmptyPath { key: String },
    #[error("piece geometry: {0}")]
    Geometry(#[from] LayoutError),
}

impl Metainfo {
    pub fn from_bytes(bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
        // Bytes after the top-level dictionary are ignored (libtorrent ignores them).
        let (root, _) = bencode::decode_prefix(bytes)?;
        expect_kind(&root, "(top level)", "dictionary", root.as_dict().is_some())?;
        let info_node = root
            .get("info")
            .ok_or_else(|| MetainfoError::MissingKey("info".into()))?;
        let info = parse_info(info_node)?;

        let announce = optional_text(&root, "announce")?.filter(|s| !s.is_empty());
        let mut announce_list = Vec::new();
        if let Some(tiers) = root.get("announce-list") {
            let tiers = list_of(tiers, "announce-list")?;
            for (i, tier) in tiers.iter().enumerate() {
                let key = format!("announce-list[{i}]");
                let urls = list_of(tier, &key)?;
                let mut out = Vec::new();
                for (j, url) in urls.iter().enumerate() {
                    let url = bytes_of(url, &format!("{key}[{j}]"))?;
                    let url = String::from_utf8_lossy(url).into_owned();
                    if !url.is_empty() && !out.contains(&url) {
                        out.push(url);
                    }
                }
                if !out.is_empty() {
                    announce_list.push(out);
                }
            }
        }
        if announce_list.is_empty() {
            if let Some(a) = &announce {
                announce_list.push(vec![a.clone()]);
            }
        }
        let creation_date = match root.get("creation date") {
            None => None,
            Some(n) => Some(int_of(n, "creation date")?),
        };
        Ok(Metainfo {
            info_hash: InfoHash::of_info(info_node.raw),
            info,
            info_bytes: info_node.raw.to_vec(),
            announce,
            announce_list,
            comment: optional_text(&root, "comment")?,
            created_by: optional_text(&root, "created by")?,
            creation_date,
        })
    }

    /// Reads and parses a .torrent file of at most [`MAX_TORRENT_FILE_BYTES`].
    pub fn from_file(path: &Path) -> Result<Metainfo, MetainfoError> {
        use std::io::Read;
        let io_error = |source| MetainfoError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_TORRENT_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        if bytes.len() as u64 > MAX_TORRENT_FILE_BYTES {
            return Err(MetainfoError::FileTooLarge {
                path: path.display().to_string(),
            });
        }
        Metainfo::from_bytes(&bytes)
    }

    /// A metainfo made from a bare `info` dictionary (BEP 9), with no trackers.
    pub fn from_info_bytes(info_bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
        Ok(Metainfo {
            info_hash: InfoHash::of_info(info_bytes),
            info: Info::from_bytes(info_bytes)?,
            info_bytes: info_bytes.to_vec(),
            announce: None,
            announce_list: Vec::new(),
            comment: None,
            created_by: None,
            creation_date: None,
        })
    }

    /// Tracker tiers: `announce-list` when present, else `[[announce]]`, else none.
    pub fn trackers(&self) -> Vec<Vec<String>> {
        self.announce_list.clone()
    }

    /// A magnet link for this torrent (info-hash, name, trackers).
    pub fn magnet(&self) -> Magnet {
        // Each tracker once, in tier order: a link repeats none (and parsing one drops repeats).
        let mut seen = std::collections::HashSet::new();
        let trackers: Vec<String> = self
            .announce_list
            .iter()
            .flatten()
            .filter(|t| !t.is_empty() && seen.insert(t.as_str()))
            .cloned()
            .collect();
        Magnet {
            info_hash: self.info_hash,
            display_name: Some(self.info.name.clone()),
            trackers,
            peers: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers

fn expect_kind(
    node: &Node<'_>,
    key: &str,
    expected: &'static str,
    ok: bool,
) -> Result<(), MetainfoError> {
    if ok {
        Ok(())
    } else {
        Err(MetainfoError::WrongType {
            key: key.to_string(),
            expected,
            found: node.kind(),
        })
    }
}

fn int_of(node: &Node<'_>, key: &str) -> Result<i64, MetainfoError> {
    node.as_int().ok_or_else(|| MetainfoError::WrongType {
        key: key.to_string(),
        expected: "integer",
        found: node.kind(),
    })
}

fn bytes_of<'a>(node: &Node<'a>, key: &str) -> Result<&'a [u8], MetainfoError> {
    node.as_bytes().ok_or_else(|| MetainfoError::WrongType {
        key: key.to_string(),
        expected: "string",
        found: node.kind(),
    })
}

fn list_of<'n, 'a>(node: &'n Node<'a>, key: &str) -> Result<&'n [Node<'a>], MetainfoError> {
    node.as_list().ok_or_else(|| MetainfoError::WrongType {
        key: key.to_string(),
        expected: "list",
        found: node.kind(),
    })
}

/// Free text outside the info dictionary (comment, tracker URLs): lossy UTF-8 is fine there,
/// since it does not name files and does not enter the info-hash.
fn optional_text(dict: &Node<'_>, key: &str) -> Result<Option<String>, MetainfoError> {
    match dict.get(key) {
        None => Ok(None),
        Some(n) => Ok(Some(
            String::from_utf8_lossy(bytes_of(n, key)?).into_owned(),
        )),
    }
}

fn length_of(node: &Node<'_>, key: &str) -> Result<u64, MetainfoError> {
    let value = int_of(node, key)?;
    u64::try_from(value).map_err(|_| MetainfoError::NegativeLength {
        key: key.to_string(),
        value,
    })
}

/// Where libtorrent (and BitComet, which predates BEP 47) names pad files: a file whose path
/// contains this is a pad file even without `attr` `p`.
const BITCOMET_PAD_MARK: &str = "_____padding_file_";

/// Deepest directory nesting of a v2 `file tree` (libtorrent's limit).
const MAX_FILE_TREE_DEPTH: usize = 100;

/// libtorrent's largest piece length (`INT_MAX / 2`, headroom for its block arithmetic).
const MAX_PIECE_LENGTH: i64 = i32::MAX as i64 / 2;

/// Text for showing a name as the torrent wrote it (never used as a path).
fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The bytes of a name: `name.utf-8` when it is a string (libtorrent prefers it as more likely
/// to be well encoded), else `name`.
fn raw_name<'a>(info: &Node<'a>) -> Result<&'a [u8], MetainfoError> {
    if let Some(bytes) = info.get("name.utf-8").and_then(Node::as_bytes) {
        return Ok(bytes);
    }
    let name = info
        .get("name")
        .ok_or_else(|| MetainfoError::MissingKey("info.name".into()))?;
    bytes_of(name, "info.name")
}

/// The components of a file's path as written: `path.utf-8` when it is a list, else `path`.
fn raw_path<'a>(file: &Node<'a>, key: &str) -> Result<Option<Vec<&'a [u8]>>, MetainfoError> {
    let (list, list_key) = match file.get("path.utf-8").filter(|n| n.as_list().is_some()) {
        Some(n) => (n, format!("{key}.path.utf-8")),
        None => match file.get("path") {
            Some(n) => (n, format!("{key}.path")),
            None => return Ok(None),
        },
    };
    let parts = list_of(list, &list_key)?;
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        out.push(bytes_of(part, &format!("{list_key}[{j}]"))?);
    }
    Ok(Some(out))
}

fn attributes(dict: &Node<'_>, key: &str) -> Result<(bool, bool, bool), MetainfoError> {
    match dict.get("attr") {
        None => Ok((false, false, false)),
        Some(n) => {
            let attr = bytes_of(n, key)?;
            Ok((
                attr.contains(&b'p'),
                attr.contains(&b'x'),
                attr.contains(&b'h'),
            ))
        }
    }
}

fn parse_info(info: &Node<'_>) -> Result<Info, MetainfoError> {
    expect_kind(info, "info", "dictionary", info.as_dict().is_some())?;

    // BEP 52: `meta version` 2 with a `file tree` is v2; with `pieces` as well, a hybrid.
    let version = info.get("meta version").and_then(Node::as_int);
    if let Some(v) = version.filter(|&v| v > 2) {
        return Err(MetainfoError::UnknownMetaVersion(v));
    }
    let v2 = version == Some(2);
    let file_tree = info.get("file tree").filter(|n| n.as_dict().is_some());
    match (v2, file_tree) {
        (true, None) => return Err(MetainfoError::MissingKey("info.file tree".into())),
        (false, Some(_)) => return Err(MetainfoError::FileTreeWithoutMetaVersion),
        _ => {}
    }

    let raw_name = raw_name(info)?;
    let sanitized_name = names::sanitize_component(raw_name);

    let piece_length = info
        .get("piece length")
        .ok_or_else(|| MetainfoError::MissingKey("info.piece length".into()))?;
    let piece_length = int_of(piece_length, "info.piece length")?;
    let piece_length = match piece_length {
        0 => return Err(MetainfoError::ZeroPieceLength),
        n if n < 0 => {
            return Err(MetainfoError::NegativeLength {
                key: "info.piece length".into(),
                value: n,
            })
        }
        n if n > MAX_PIECE_LENGTH => return Err(MetainfoError::PieceLengthTooLarge(n)),
        n => u32::try_from(n).map_err(|_| MetainfoError::PieceLengthTooLarge(n))?,
    };
    if v2 && (piece_length < 16 * 1024 || !piece_length.is_power_of_two()) {
        return Err(MetainfoError::V2PieceLength(piece_length));
    }

    let pieces = match info.get("pieces") {
        Some(p) => bytes_of(p, "info.pieces")?,
        None if v2 => return Err(MetainfoError::V2Only),
        None => return Err(MetainfoError::MissingKey("info.pieces".into())),
    };
    if !pieces.len().is_multiple_of(20) {
        return Err(MetainfoError::PiecesNotMultipleOf20(pieces.len()));
    }
    let piece_hashes: Vec<[u8; 20]> = pieces
        .chunks_exact(20)
        .map(|c| {
            let mut h = [0u8; 20];
            h.copy_from_slice(c);
            h
        })
        .collect();

    let private = match info.get("private") {
        None => false,
        Some(n) => int_of(n, "info.private")? == 1,
    };

    let (name, mut files, multi_file) = match (info.get("length"), info.get("files")) {
        (Some(_), Some(_)) => return Err(MetainfoError::LengthAndFiles),
        (Some(length), None) => {
            // The name is the file's own name here, so there is nothing to fall back on.
            let name = match sanitized_name {
                Some(name) if !raw_name.is_empty() => name,
                _ => return Err(MetainfoError::UnusableName(shown(raw_name))),
            };
            let length = length_of(length, "info.length")?;
            let (_, executable, hidden) = attributes(info, "info.attr")?;
            let entry = FileEntry {
                path: vec![name.clone()],
                length,
                offset: 0,
                pad: false,
                executable,
                hidden,
                original: None,
            };
            (name, vec![entry], false)
        }
        (None, Some(list)) => {
            // A directory name made of nothing usable: libtorrent names it by the info-hash.
            let name = sanitized_name.unwrap_or_else(|| InfoHash::of_info(info.raw).to_hex());
            (name, parse_files(list)?, true)
        }
        (None, None) => {
            return Err(MetainfoError::MissingKey(
                "info.length or info.files".into(),
            ))
        }
    };
    let original_name = Some(shown(raw_name)).filter(|raw| *raw != name);
    if !multi_file {
        files[0].original.clone_from(&original_name);
    }

    let total = files.last().map_or(0, |f| f.offset + f.length);
    let lengths = Lengths::new(total, piece_length, piece_hashes.len() as u64)?;
    if total == 0 {
        return Err(MetainfoError::NoData);
    }
    if let Some(tree) = file_tree {
        check_hybrid(&name, multi_file, &files, tree, piece_length)?;
    }
    // After the hybrid check, which (as libtorrent's) compares paths before de-duplication.
    resolve_duplicates(&mut files);
    Ok(Info {
        name,
        original_name,
        piece_length,
        piece_hashes,
        files,
        multi_file,
        private,
        lengths,
    })
}

fn parse_files(list: &Node<'_>) -> Result<Vec<FileEntry>, MetainfoError> {
    let items = list_of(list, "info.files")?;
    if items.is_empty() {
        return Err(MetainfoError::NoFiles);
    }
    let mut files = Vec::with_capacity(items.len());
    let mut offset: u64 = 0;
    for (i, item) in items.iter().enumerate() {
        let key = format!("info.files[{i}]");
        expect_kind(item, &key, "dictionary", item.as_dict().is_some())?;
        let (pad, executable, hidden) = attributes(item, &format!("{key}.attr"))?;
        let symlink = item
            .get("attr")
            .and_then(Node::as_bytes)
            .is_some_and(|a| a.contains(&b'l'));
        let length = match item.get("length") {
            Some(n) => length_of(n, &format!("{key}.length"))?,
            // BEP 47: symlinks may omit their (zero) length.
            None if symlink => 0,
            None => return Err(MetainfoError::MissingKey(format!("{key}.length"))),
        };
        let raw = raw_path(item, &key)?;
        if raw.is_none() && !pad {
            return Err(MetainfoError::MissingKey(format!("{key}.path")));
        }
        let raw = raw.unwrap_or_default();
        let (path, original) = if !raw.is_empty() {
            let path = names::sanitize_path(raw.iter().copied());
            let written: Vec<String> = raw.iter().map(|c| shown(c)).collect();
            (path, Some(written.join("/")))
        } else if pad {
            // libtorrent's name for a pad file without a path.
            (vec![".pad".to_string(), length.to_string()], None)
        } else {
            return Err(MetainfoError::EmptyPath { key });
        };
        let pad = pad || path.iter().any(|c| c.contains(BITCOMET_PAD_MARK));
        files.push(FileEntry {
            original: original.filter(|o| !pad && *o != path.join("/")),
            path,
            length,
            offset,
            pad,
            executable,
            hidden,
        });
        offset = offset
            .checked_add(length)
            .ok_or(MetainfoError::LengthOverflow)?;
    }
    Ok(files)
}

/// Renames files whose paths collide (see [`names::resolve_duplicates`]), remembering what the
/// torrent called them.
fn resolve_duplicates(files: &mut [FileEntry]) {
    let mut paths: Vec<Vec<String>> = files.iter().map(|f| f.path.clone()).collect();
    let pad_lengths: Vec<Option<u64>> = files.iter().map(|f| f.pad.then_some(f.length)).collect();
    for i in names::resolve_duplicates(&mut paths, &pad_lengths) {
        let file = &mut files[i];
        let before = std::mem::replace(&mut file.path, std::mem::take(&mut paths[i]));
        if !file.pad && file.original.is_none() {
            file.original = Some(before.join("/"));
        }
    }
}

/// A file of a v2 `file tree` as libtorrent lists it: full path (with the torrent's name for a
/// multi-file torrent) and length; `None` for the pad that aligns the next file to a piece.
type TreeFile = (Option<String>, u64);

/// libtorrent reads a hybrid torrent's files from its v2 `file tree` and refuses it unless the
/// v1 `files` say the same: same number of entries (v2 pads every file to a piece boundary),
/// same total, and the same path, length and offset for every non-empty file that is not a pad.
fn check_hybrid(
    name: &str,
    multi_file: bool,
    v1: &[FileEntry],
    tree: &Node<'_>,
    piece_length: u32,
) -> Result<(), MetainfoError> {
    let mut listed = Vec::new();
    walk_file_tree(tree, name, multi_file, 0, &mut listed)?;
    let piece_length = u64::from(piece_length);
    let mut v2: Vec<(TreeFile, u64)> = Vec::with_capacity(listed.len() * 2);
    let mut total: u64 = 0;
    for (path, length) in listed {
        v2.push(((path, length), total));
        total = total
            .checked_add(length)
            .ok_or(MetainfoError::LengthOverflow)?;
        if length > 0 && !total.is_multiple_of(piece_length) {
            let pad = piece_length - total % piece_length;
            v2.push(((None, pad), total));
            total += pad;
        }
    }
    // Hybrids from libtorrent before 2.0.8 have no pad after the last file.
    if v2.len() == v1.len() + 1 {
        if let Some(last) = v2.iter().rposition(|((_, length), _)| *length > 0) {
            if v2[last].0 .0.is_none() {
                let ((_, pad), _) = v2.remove(last);
                total -= pad;
                for entry in &mut v2[last..] {
                    entry.1 = total;
                }
            }
        }
    }
    let mismatch = |what: String| Err(MetainfoError::HybridMismatch(what));
    if v2.len() != v1.len() {
        return mismatch(format!("{} v1 files, {} in v2", v1.len(), v2.len()));
    }
    let v1_total = v1.last().map_or(0, |f| f.offset + f.length);
    if total != v1_total {
        return mismatch(format!("{v1_total} bytes in v1, {total} in v2"));
    }
    for (f1, ((path2, length2), offset2)) in v1.iter().zip(&v2) {
        let relevant1 = !f1.pad && f1.length > 0;
        let relevant2 = path2.is_some() && *length2 > 0;
        let path1 = if multi_file {
            format!("{name}/{}", f1.display_path())
        } else {
            name.to_string()
        };
        if relevant1 != relevant2
            || relevant1
                && (path2.as_deref() != Some(path1.as_str())
                    || f1.length != *length2
                    || f1.offset != *offset2)
        {
            return mismatch(format!(
                "v1 has {path1} ({} bytes at {}), v2 {} ({length2} bytes at {offset2})",
                f1.length,
                f1.offset,
                path2.as_deref().unwrap_or("a pad"),
            ));
        }
    }
    Ok(())
}

/// Lists the files of a v2 `file tree` in order, named as libtorrent names them.
fn walk_file_tree(
    tree: &Node<'_>,
    dir: &str,
    has_files: bool,
    depth: usize,
    out: &mut Vec<TreeFile>,
) -> Result<(), MetainfoError> {
    let bad = |why: &str| MetainfoError::BadFileTree(why.to_string());
    let entries = tree
        .as_dict()
        .ok_or_else(|| bad("has a directory that is not a dictionary"))?;
    if depth > MAX_FILE_TREE_DEPTH {
        return Err(bad("is nested too deep"));
    }
    for (key, node) in entries {
        let children = node
            .as_dict()
            .filter(|_| !key.is_empty())
            .ok_or_else(|| bad("has an entry that is not a named dictionary"))?;
        let leaf = children.len() == 1 && children[0].0.is_empty();
        // A lone file at the top of a tree without v1 `files` is the torrent itself, not a
        // file in its directory.
        let single = leaf && depth == 0 && !has_files && entries.len() == 1;
        let mut path = if single {
            String::new()
        } else {
            dir.to_string()
        };
        if let Some(component) = names::sanitize_component(key) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&component);
        }
        if !leaf {
            walk_file_tree(node, &path, true, depth + 1, out)?;
            continue;
        }
        let file = &children[0].1;
        expect_kind(
            file,
            "info.file tree",
            "dictionary",
            file.as_dict().is_some(),
        )?;
        let attr = file
            .get("attr")
            .and_then(Node::as_bytes)
            .unwrap_or_default();
        if attr.contains(&b'p') {
            return Err(bad("lists a pad file"));
        }
        let length = if attr.contains(&b'l') {
            0
        } else {
            let n = file.get("length").ok_or_else(|| {
                MetainfoError::MissingKey(format!("info.file tree: {path}: length"))
            })?;
            length_of(n, &format!("info.file tree: {path}: length"))?
        };
        if length > 0 {
            let root = file.get("pieces root").and_then(Node::as_bytes);
            if !root.is_some_and(|r| r.len() == 32 && r.iter().any(|&b| b != 0)) {
                return Err(bad("has a file without a 'pieces root'"));
            }
        }
        out.push((Some(path), length));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Building

/// What a torrent holds: one file called `name`, or a directory `name` with files below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentContent {
    SingleFile {
        length: u64,
    },
    /// `(path components below the root, length)`, in the order their bytes were hashed.
    /// Callers sort them by path (as `Vec<String>`) first; the builder insists on it, so the
    /// same input always gives the same torrent.
    Directory {
        files: Vec<(Vec<String>, u64)>,
    },
}

/// Everything that goes into a new .torrent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorrentSpec {
    pub name: String,
    pub content: TorrentContent,
    pub piece_length: u32,
    pub piece_hashes: Vec<[u8; 20]>,
    /// Tiers of tracker URLs; the first URL becomes `announce`.
    pub trackers: Vec<Vec<String>>,
    pub private: bool,
    pub comment: Option<String>,
    pub created_by: Option<String>,
    /// Seconds since the Unix epoch; `None` keeps the output reproducible.
    pub creation_date: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("files must be sorted by path ({0} is out of order)")]
    UnsortedFiles(String),
    #[error("a torrent needs at least one file")]
    NoFiles,
    #[error("{0} does not fit in a bencode integer")]
    TooLarge(u64),
    #[error("the built torrent does not parse: {0}")]
    Invalid(#[from] MetainfoError),
}

/// Encodes a torrent deterministically (sorted keys, sorted paths, no date unless given) and
/// checks that it parses back with the same geometry.
pub fn build_torrent(spec: &TorrentSpec) -> Result<Vec<u8>, BuildError> {
    let int = |v: u64| {
        i64::try_from(v)
            .map(Owned::Int)
            .map_err(|_| BuildError::TooLarge(v))
    };
    let mut pieces = Vec::with_capacity(spec.piece_hashes.len() * 20);
    for h in &spec.piece_hashes {
        pieces.extend_from_slice(h);
    }
    let mut info = bencode::dict([
        ("name", Owned::str(&spec.name)),
        ("piece length", Owned::Int(spec.piece_length as i64)),
        ("pieces", Owned::Bytes(pieces)),
    ]);
    let Owned::Dict(info_map) = &mut info else {
        unreachable!("dict() builds a dictionary")
    };
    match &spec.content {
        TorrentContent::SingleFile { length } => {
            info_map.insert(b"length".to_vec(), int(*length)?);
        }
        TorrentContent::Directory { files } => {
            if files.is_empty() {
                return Err(BuildError::NoFiles);
            }
            if let Some(w) = files.windows(2).find(|w| w[0].0 >= w[1].0) {
                return Err(BuildError::UnsortedFiles(w[1].0.join("/")));
            }
            let mut list = Vec::with_capacity(files.len());
            for (path, length) in files {
                list.push(bencode::dict([
                    ("length", int(*length)?),
                    (
                        "path",
                        Owned::List(path.iter().map(|c| Owned::str(c)).collect()),
                    ),
                ]));
            }
            info_map.insert(b"files".to_vec(), Owned::List(list));
        }
    }
    if spec.private {
        info_map.insert(b"private".to_vec(), Owned::Int(1));
    }

    let mut top = bencode::dict([("info", info)]);
    let Owned::Dict(top_map) = &mut top else {
        unreachable!("dict() builds a dictionary")
    };
    let tiers: Vec<Vec<String>> = spec
        .trackers
        .iter()
        .map(|t| {
            t.iter()
                .filter(|u| !u.is_empty())
                .cloned()
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(first) = tiers.first().and_then(|t| t.first()) {
        top_map.insert(b"announce".to_vec(), Owned::str(first));
    }
    if tiers.iter().map(Vec::len).sum::<usize>() > 1 {
        let list = tiers
            .iter()
            .map(|t| Owned::List(t.iter().map(|u| Owned::str(u)).collect()))
            .collect();
        top_map.insert(b"announce-list".to_vec(), Owned::List(list));
    }
    if let Some(c) = &spec.comment {
        top_map.insert(b"comment".to_vec(), Owned::str(c));
    }
    if let Some(c) = &spec.created_by {
        top_map.insert(b"created by".to_vec(), Owned::str(c));
    }
    if let Some(d) = spec.creation_date {
        top_map.insert(b"creation date".to_vec(), Owned::Int(d));
    }
    let bytes = top.encode();
    Metainfo::from_bytes(&bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn hashes(n: usize) -> Vec<[u8; 20]> {
        (0..n).map(|i| [i as u8; 20]).collect()
    }

    fn multi_spec() -> TorrentSpec {
        TorrentSpec {
            name: "root".into(),
            content: TorrentContent::Directory {
                files: vec![
                    (vec!["a.txt".into()], 40_000),
                    (vec!["d".into(), "e".into(), "f.bin".into()], 0),
                    (vec!["d".into(), "g".into()], 30_000),
                ],
            },
            piece_length: 16384,
            piece_hashes: hashes(5),
            trackers: vec![
                vec!["http://127.0.0.1:1/a".into(), "http://127.0.0.1:2/a".into()],
                vec!["udp://127.0.0.1:3".into()],
            ],
            private: true,
            comment: Some("hello".into()),
            created_by: Some("swarmfs test".into()),
            creation_date: Some(1_700_000_000),
        }
    }

    fn single_spec() -> TorrentSpec {
        TorrentSpec {
            name: "file.iso".into(),
            content: TorrentContent::SingleFile { length: 50_000 },
            piece_length: 16384,
            piece_hashes: hashes(4),
            trackers: vec![vec!["http://127.0.0.1:1/announce".into()]],
            private: false,
            comment: None,
            created_by: None,
            creation_date: None,
        }
    }

    #[test]
    fn builds_and_parses_multi_file() {
        let bytes = build_torrent(&multi_spec()).unwrap();
        let m = Metainfo::from_bytes(&bytes).unwrap();
        assert_eq!(m.info.name, "root");
        assert!(m.info.multi_file && m.info.private);
        assert_eq!(m.info.piece_length, 16384);
        assert_eq!(m.info.lengths.piece_count(), 5);
        assert_eq!(m.info.total_length(), 70_000);
        let offsets: Vec<u64> = m.info.files.iter().map(|f| f.offset).collect();
        assert_eq!(offsets, [0, 40_000, 40_000]);
        assert_eq!(m.info.files[1].path, ["d", "e", "f.bin"]);
        assert_eq!(m.announce.as_deref(), Some("http://127.0.0.1:1/a"));
        assert_eq!(m.trackers().len(), 2);
        assert_eq!(m.trackers()[0].len(), 2);
        assert_eq!(m.comment.as_deref(), Some("hello"));
        assert_eq!(m.created_by.as_deref(), Some("swarmfs test"));
        assert_eq!(m.creation_date, Some(1_700_000_000));
        assert_eq!(m.info_hash, InfoHash::of_info(&m.info_bytes));
        // The info span really is the info dictionary of the file.
        let start = bytes.windows(6).position(|w| w == b"4:info").unwrap() + 6;
        assert_eq!(&bytes[start..start + m.info_bytes.len()], &m.info_bytes[..]);
        // Deterministic.
        assert_eq!(build_torrent(&multi_spec()).unwrap(), bytes);
    }

    #[test]
    fn builds_and_parses_single_file() {
        let bytes = build_torrent(&single_spec()).unwrap();
        let m = Metainfo::from_bytes(&bytes).unwrap();
        assert!(!m.info.multi_file);
        assert_eq!(m.info.files.len(), 1);
        assert_eq!(m.info.files[0].path, ["file.iso"]);
        assert_eq!(m.info.files[0].length, 50_000);
        assert_eq!(
            m.trackers(),
            vec![vec!["http://127.0.0.1:1/announce".to_string()]]
        );
        // A single tracker is written as `announce` only.
        assert!(!bytes.windows(13).any(|w| w == b"announce-list"));
        assert!(!bytes.windows(13).any(|w| w == b"creation date"));
    }

    #[test]
    fn builder_refuses_unsorted_or_inconsistent_input() {
        let mut spec = multi_spec();
        if let TorrentContent::Directory { files } = &mut spec.content {
            files.swap(0, 2);
        }
        assert!(matches!(
            build_torrent(&spec),
            Err(BuildError::UnsortedFiles(_))
        ));
        let mut spec = multi_spec();
        spec.piece_hashes.pop();
        assert!(matches!(
            build_torrent(&spec),
            Err(BuildError::Invalid(MetainfoError::Geometry(_)))
        ));
    }

    #[test]
    fn info_hash_is_of_the_raw_span_with_unknown_keys() {
        // Unknown keys inside and outside info, and an unsorted info dict.
        let info = b"d6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaa1:zi7e1:ai1ee";
        let mut bytes = b"d8:announce3:foo5:extra4:junk4:info".to_vec();
        bytes.extend_from_slice(info);
        bytes.push(b'e');
        let m = Metainfo::from_bytes(&bytes).unwrap();
        assert_eq!(m.info_bytes, info);
        assert_eq!(m.info_hash.0, <[u8; 20]>::from(Sha1::digest(info)));
        assert_eq!(m.info.files[0].length, 5);
    }

    #[test]
    fn pad_files_count_in_geometry_but_are_hidden() {
        let pieces = "a".repeat(40);
        let info = format!(
            "d5:filesld6:lengthi10e4:pathl1:aeed4:attr1:p6:lengthi16374e4:pathl4:.pad5:16374eed6:lengthi3e4:pathl1:beed4:attr1:p6:lengthi16374e4:pathl4:.pad5:16374eed4:attr2:xh6:lengthi1e4:pathl1:ceee4:name1:r12:piece lengthi16384e6:pieces40:{pieces}e"
        );
        // 10 + 16374 + 3 + 16374 + 1 = 32762 -> 2 pieces of 16384.
        let bytes = format!("d4:info{info}e");
        let m = Metainfo::from_bytes(bytes.as_bytes()).unwrap();
        assert_eq!(m.info.files.len(), 5);
        let visible: Vec<(usize, String)> = m
            .info
            .visible_files()
            .map(|(i, f)| (i, f.display_path()))
            .collect();
        assert_eq!(visible, [(0, "a".into()), (2, "b".into()), (4, "c".into())]);
        assert_eq!(m.info.files[2].offset, 16384);
        assert!(m.info.files[4].executable && m.info.files[4].hidden);
        assert!(!m.info.files[0].executable);
    }

    #[test]
    fn hybrid_uses_v1_and_v2_only_is_refused() {
        let hybrid = format!(
            "d4:infod9:file treed1:xd0:d6:lengthi5e11:pieces root32:{}eee6:lengthi5e12:meta versioni2e4:name1:x12:piece lengthi16384e6:pieces20:{}ee",
            "r".repeat(32),
            "p".repeat(20)
        );
        let m = Metainfo::from_bytes(hybrid.as_bytes()).unwrap();
        assert_eq!(m.info.files[0].length, 5);
        let v2 = format!(
            "d4:infod9:file treed1:xd0:d6:lengthi5e11:pieces root32:{}eee12:meta versioni2e4:name1:x12:piece lengthi16384eee",
            "r".repeat(32)
        );
        let err = Metainfo::from_bytes(v2.as_bytes()).unwrap_err();
        assert!(matches!(err, MetainfoError::V2Only));
        assert_eq!(err.to_string(), "v2-only torrents are not supported yet");
    }

    #[test]
    fn names_prefer_utf8_variants_and_replace_invalid_bytes() {
        let mut bytes = b"d4:infod5:filesld6:lengthi1e4:pathl2:\xff%ee".to_vec();
        bytes.extend_from_slice(b"d6:lengthi1e4:pathl1:qe10:path.utf-8l3:\xc3\xa9teee");
        bytes.extend_from_slice(b"4:name2:ok10:name.utf-82:\xfe\xfe");
        bytes.extend_from_slice(b"12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee");
        let m = Metainfo::from_bytes(&bytes).unwrap();
        // libtorrent takes `name.utf-8` whenever it is a string, well encoded or not.
        assert_eq!(m.info.name, "__");
        assert_eq!(m.info.original_name.as_deref(), Some("\u{fffd}\u{fffd}"));
        assert_eq!(m.info.files[0].path, ["_%"]);
        assert_eq!(m.info.files[0].original.as_deref(), Some("\u{fffd}%"));
        assert_eq!(m.info.files[1].path, ["ét"]);
        assert_eq!(m.info.files[1].original, None);
    }

    /// A multi-file torrent of 1-byte files at these raw paths, named `name`.
    fn with_paths(name: &[u8], paths: &[&[&[u8]]], trailer: &[u8]) -> Vec<u8> {
        let mut files = b"l".to_vec();
        for path in paths {
            files.extend_from_slice(b"d6:lengthi1e4:pathl");
            for c in *path {
                files.extend_from_slice(format!("{}:", c.len()).as_bytes());
                files.extend_from_slice(c);
            }
            files.extend_from_slice(b"ee");
        }
        files.push(b'e');
        let mut out = b"d4:infod5:files".to_vec();
        out.extend_from_slice(&files);
        out.extend_from_slice(format!("4:name{}:", name.len()).as_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(b"12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee");
        out.extend_from_slice(trailer);
        out
    }

    fn paths_of(m: &Metainfo) -> Vec<String> {
        m.info.files.iter().map(FileEntry::display_path).collect()
    }

    #[test]
    fn unsafe_paths_are_sanitized_inside_the_root() {
        let m = Metainfo::from_bytes(&with_paths(
            b"/root",
            &[
                &[b"..", b"..", b"etc", b"passwd"],
                &[b"", b"b"],
                &[b"a/b"],
                &[b"..\\c"],
                &[b".", b".."],
                &[b"ab"],
                &[b"x\x01y"],
            ],
            b"",
        ))
        .unwrap();
        assert_eq!(m.info.name, "root");
        assert_eq!(m.info.original_name.as_deref(), Some("/root"));
        assert_eq!(
            paths_of(&m),
            // `./..` leaves `_`, taken by the directory `_`.
            ["etc/passwd", "_/b", "ab", "..c", "_.1", "ab.1", "x_y"]
        );
        let originals: Vec<Option<&str>> =
            m.info.files.iter().map(|f| f.original.as_deref()).collect();
        assert_eq!(
            originals,
            [
                Some("../../etc/passwd"),
                Some("/b"),
                Some("a/b"),
                Some("..\\c"),
                Some("./.."),
                Some("ab"),
                Some("x\u{1}y"),
            ]
        );
        assert_eq!(m.info.renamed_files().count(), 7);
        for f in &m.info.files {
            assert!(f
                .path
                .iter()
                .all(|c| !c.is_empty() && c != "." && c != ".."));
            assert!(f.path.iter().all(|c| !c.contains(['/', '\\', '\0'])));
        }
    }

    #[test]
    fn duplicate_paths_are_numbered_not_refused() {
        let m = Metainfo::from_bytes(&with_paths(
            b"r",
            &[
                &[b"bar.txt"],
                &[b"bar.txt"],
                &[b"a"],
                &[b"a", b"b"],
                &[b"BAR.txt"],
            ],
            b"",
        ))
        .unwrap();
        assert_eq!(
            paths_of(&m),
            ["bar.txt", "bar.1.txt", "a.1", "a/b", "BAR.2.txt"]
        );
        assert_eq!(m.info.files[1].original.as_deref(), Some("bar.txt"));
        assert_eq!(m.info.files[0].original, None);
    }

    #[test]
    fn a_directory_name_of_nothing_becomes_the_info_hash() {
        for name in [&b".."[..], b".", b"/"] {
            let m = Metainfo::from_bytes(&with_paths(name, &[&[b"f"]], b"")).unwrap();
            assert_eq!(m.info.name, m.info_hash.to_hex());
            assert_eq!(
                m.info.original_name.as_deref(),
                Some(&*String::from_utf8_lossy(name))
            );
        }
        // An empty component (the name included) is `_`, as in libtorrent.
        let m = Metainfo::from_bytes(&with_paths(b"", &[&[b"f"]], b"")).unwrap();
        assert_eq!(m.info.name, "_");
    }

    #[test]
    fn bitcomet_pads_and_pads_without_paths_are_hidden() {
        let mark = b"_____padding_file_0_if you see this file, please update to BitComet 0.85 or above____";
        let m = Metainfo::from_bytes(&with_paths(b"r", &[&[b"a"], &[mark], &[b"d", mark]], b""))
            .unwrap();
        let pads: Vec<bool> = m.info.files.iter().map(|f| f.pad).collect();
        assert_eq!(pads, [false, true, true]);
        assert_eq!(m.info.visible_files().count(), 1);

        let bytes = b"d4:infod5:filesld6:lengthi5e4:pathl1:aeed4:attr1:p6:lengthi3eee4:name1:r12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee";
        let m = Metainfo::from_bytes(bytes).unwrap();
        assert_eq!(m.info.files[1].path, [".pad", "3"]);
        assert!(m.info.files[1].pad);
    }

    #[test]
    fn bytes_after_the_torrent_are_ignored() {
        let clean = with_paths(b"r", &[&[b"a"]], b"");
        let m = Metainfo::from_bytes(&with_paths(b"r", &[&[b"a"]], b"\x00garbage e")).unwrap();
        assert_eq!(m, Metainfo::from_bytes(&clean).unwrap());
        // A bare info dictionary (BEP 9) must still be exactly one value: it is hashed whole.
        assert!(Info::from_bytes(&[&m.info_bytes[..], b"x"].concat()).is_err());
    }

    /// A single-file hybrid: v1 `name`/`length` 5 and a v2 tree of one file `tree_name`.
    fn hybrid_single(name: &str, tree_name: &str, tree_length: u64, piece_length: u32) -> Vec<u8> {
        format!(
            "d4:infod9:file treed{}:{tree_name}d0:d6:lengthi{tree_length}e11:pieces root32:{}eee6:lengthi5e12:meta versioni2e4:name{}:{name}12:piece lengthi{piece_length}e6:pieces20:{}ee",
            tree_name.len(),
            "r".repeat(32),
            name.len(),
            "p".repeat(20)
        )
        .into_bytes()
    }

    #[test]
    fn announce_list_falls_back_to_announce() {
        let m = Metainfo::from_bytes(
            b"d8:announce4:http13:announce-listle4:infod6:lengthi1e4:name1:x12:piece lengthi1e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
        )
        .unwrap();
        assert_eq!(m.trackers(), vec![vec!["http".to_string()]]);
    }

    type Check = fn(&MetainfoError) -> bool;

    /// A valid multi-file info dictionary with `{files}` and `{extra}` substituted.
    fn with_files(files: &str, extra: &str, pieces: usize) -> Vec<u8> {
        format!(
            "d4:infod5:files{files}4:name4:root12:piece lengthi16384e6:pieces{}:{}{extra}ee",
            pieces * 20,
            "h".repeat(pieces * 20)
        )
        .into_bytes()
    }

    fn single(name: &str, length: &str, piece_length: &str, pieces: usize) -> Vec<u8> {
        format!(
            "d4:infod6:length{length}4:name{}:{name}12:piece length{piece_length}6:pieces{}:{}ee",
            name.len(),
            pieces,
            "h".repeat(pieces)
        )
        .into_bytes()
    }

    #[test]
    fn malformed_inputs_give_specific_errors() {
        use MetainfoError as E;
        let ok_file = "d6:lengthi1e4:pathl1:aee";
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("empty", vec![], |e| matches!(e, E::Bencode(BencodeError::UnexpectedEnd(0)))),
            ("truncated", single("x", "i5e", "i16384e", 20)[..30].to_vec(), |e| {
                matches!(e, E::Bencode(BencodeError::UnexpectedEnd(_)))
            }),
            ("string longer than input", b"d4:info99999999:x".to_vec(), |e| {
                matches!(e, E::Bencode(BencodeError::LengthPastEnd { .. }))
            }),
            ("huge length prefix", b"d4:infod4:name18446744073709551615:".to_vec(), |e| {
                matches!(e, E::Bencode(BencodeError::IntegerOverflow(_)))
            }),
            ("top level list", b"le".to_vec(), |e| matches!(e, E::WrongType { .. })),
            ("no info", b"d8:announce1:xe".to_vec(), |e| matches!(e, E::MissingKey(k) if k == "info")),
            ("info is a string", b"d4:info1:xe".to_vec(), |e| {
                matches!(e, E::WrongType { key, expected: "dictionary", .. } if key == "info")
            }),
            ("no name", b"d4:infod6:lengthi1e12:piece lengthi1e6:pieces20:aaaaaaaaaaaaaaaaaaaaee".to_vec(), |e| {
                matches!(e, E::MissingKey(k) if k == "info.name")
            }),
            ("name is int", b"d4:infod4:namei1eee".to_vec(), |e| {
                matches!(e, E::WrongType { key, .. } if key == "info.name")
            }),
            ("piece length is string", single("x", "i5e", "1:x", 20), |e| {
                matches!(e, E::WrongType { key, expected: "integer", .. } if key == "info.piece length")
            }),
            ("piece length 0", single("x", "i5e", "i0e", 20), |e| matches!(e, E::ZeroPieceLength)),
            ("piece length negative", single("x", "i5e", "i-16e", 20), |e| {
                matches!(e, E::NegativeLength { value: -16, .. })
            }),
            ("piece length huge", single("x", "i5e", "i4294967296e", 20), |e| {
                matches!(e, E::PieceLengthTooLarge(_))
            }),
            ("pieces not multiple of 20", single("x", "i5e", "i16384e", 19), |e| {
                matches!(e, E::PiecesNotMultipleOf20(19))
            }),
            ("too few pieces", single("x", "i40000e", "i16384e", 40), |e| {
                matches!(e, E::Geometry(LayoutError::PieceCountMismatch { needed: 3, count: 2, .. }))
            }),
            ("too many pieces", single("x", "i5e", "i16384e", 40), |e| {
                matches!(e, E::Geometry(LayoutError::PieceCountMismatch { needed: 1, count: 2, .. }))
            }),
            ("negative length", single("x", "i-5e", "i16384e", 20), |e| {
                matches!(e, E::NegativeLength { key, .. } if key == "info.length")
            }),
            ("length overflow", with_files(
                "ld6:lengthi9223372036854775807e4:pathl1:aeed6:lengthi9223372036854775807e4:pathl1:beed6:lengthi9e4:pathl1:ceee", "", 1), |e| {
                matches!(e, E::LengthOverflow)
            }),
            ("integer overflow", single("x", "i99999999999999999999e", "i16384e", 20), |e| {
                matches!(e, E::Bencode(BencodeError::IntegerOverflow(_)))
            }),
            ("no pieces", b"d4:infod6:lengthi5e4:name1:x12:piece lengthi16384eee".to_vec(), |e| {
                matches!(e, E::MissingKey(k) if k == "info.pieces")
            }),
            ("v2 only", b"d4:infod9:file treede12:meta versioni2e4:name1:x12:piece lengthi16384eee".to_vec(), |e| {
                matches!(e, E::V2Only)
            }),
            ("length and files", with_files(&format!("l{ok_file}e"), "6:lengthi1e", 1), |e| {
                matches!(e, E::LengthAndFiles)
            }),
            ("neither length nor files", b"d4:infod4:name1:x12:piece lengthi16384e6:pieces0:ee".to_vec(), |e| {
                matches!(e, E::MissingKey(k) if k.contains("files"))
            }),
            ("empty file list", with_files("le", "", 0), |e| matches!(e, E::NoFiles)),
            ("files not a list", with_files("i1e", "", 0), |e| {
                matches!(e, E::WrongType { expected: "list", .. })
            }),
            ("file not a dict", with_files("li1ee", "", 0), |e| {
                matches!(e, E::WrongType { key, expected: "dictionary", .. } if key == "info.files[0]")
            }),
            ("file without length", with_files("ld4:pathl1:aeee", "", 0), |e| {
                matches!(e, E::MissingKey(k) if k == "info.files[0].length")
            }),
            ("file without path", with_files("ld6:lengthi1eee", "", 1), |e| {
                matches!(e, E::MissingKey(k) if k == "info.files[0].path")
            }),
            ("path component not a string", with_files("ld6:lengthi1e4:pathli1eeee", "", 1), |e| {
                matches!(e, E::WrongType { key, .. } if key == "info.files[0].path[0]")
            }),
            ("empty path", with_files("ld6:lengthi1e4:pathleee", "", 1), |e| {
                matches!(e, E::EmptyPath { .. })
            }),
            ("dotdot single-file name", single("..", "i5e", "i16384e", 20), |e| {
                matches!(e, E::UnusableName(n) if n == "..")
            }),
            ("empty single-file name", single("", "i5e", "i16384e", 20), |e| {
                matches!(e, E::UnusableName(n) if n.is_empty())
            }),
            ("no data", single("x", "i0e", "i16384e", 0), |e| matches!(e, E::NoData)),
            ("no data in files", with_files("ld6:lengthi0e4:pathl1:aeee", "", 0), |e| {
                matches!(e, E::NoData)
            }),
            ("piece length above libtorrent's", single("x", "i5e", "i1073741824e", 20), |e| {
                matches!(e, E::PieceLengthTooLarge(1_073_741_824))
            }),
            ("meta version 3", with_files(&format!("l{ok_file}e"), "12:meta versioni3e", 1), |e| {
                matches!(e, E::UnknownMetaVersion(3))
            }),
            ("file tree without meta version", with_files(&format!("l{ok_file}e"), "9:file treede", 1), |e| {
                matches!(e, E::FileTreeWithoutMetaVersion)
            }),
            ("meta version 2 without file tree", with_files(&format!("l{ok_file}e"), "12:meta versioni2e", 1), |e| {
                matches!(e, E::MissingKey(k) if k == "info.file tree")
            }),
            ("v2 piece length not a power of two", hybrid_single("x", "x", 5, 16385), |e| {
                matches!(e, E::V2PieceLength(16385))
            }),
            ("hybrid names disagree", hybrid_single("x", "y", 5, 16384), |e| {
                matches!(e, E::HybridMismatch(_))
            }),
            ("hybrid lengths disagree", hybrid_single("x", "x", 6, 16384), |e| {
                matches!(e, E::HybridMismatch(_))
            }),
            ("too deep", [b"d4:info".to_vec(), vec![b'l'; 1000]].concat(), |e| {
                matches!(e, E::Bencode(BencodeError::TooDeep(_)))
            }),
            ("announce-list not a list", [single("x", "i5e", "i16384e", 20)[..1].to_vec(),
                b"13:announce-listi1e".to_vec(), single("x", "i5e", "i16384e", 20)[1..].to_vec()].concat(), |e| {
                matches!(e, E::WrongType { key, .. } if key == "announce-list")
            }),
            ("attr not a string", with_files("ld4:attri1e6:lengthi1e4:pathl1:aeee", "", 1), |e| {
                matches!(e, E::WrongType { key, .. } if key == "info.files[0].attr")
            }),
        ];
        for (what, input, check) in cases {
            match Metainfo::from_bytes(&input) {
                Ok(_) => panic!("{what}: parsed, expected an error"),
                Err(e) => assert!(check(&e), "{what}: unexpected error {e:?}"),
            }
        }
        // The fixtures of the table are only wrong where they mean to be.
        assert!(Metainfo::from_bytes(&with_files(&format!("l{ok_file}e"), "", 1)).is_ok());
        assert!(Metainfo::from_bytes(&single("x", "i5e", "i16384e", 20)).is_ok());
    }

    #[test]
    fn random_mutations_never_panic() {
        let seeds = [
            build_torrent(&multi_spec()).unwrap(),
            build_torrent(&single_spec()).unwrap(),
            include_bytes!("../../tests/fixtures/libtorrent-pad.torrent").to_vec(),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_f00d);
        let mut parsed_ok = 0;
        for round in 0..6000 {
            let mut input = seeds[round % seeds.len()].clone();
            for _ in 0..rng.gen_range(1..4) {
                let len = input.len();
                let at = rng.gen_range(0..=len);
                match rng.gen_range(0..7) {
                    0 if at < len => input[at] = rng.gen(),
                    1 if at < len => input[at] = b"0123456789iled:-"[rng.gen_range(0..16)],
                    2 => input.insert(at, rng.gen()),
                    3 => {
                        let end = (at + rng.gen_range(1..16)).min(len);
                        input.drain(at..end);
                    }
                    4 => input.truncate(at),
                    5 => {
                        let end = (at + rng.gen_range(1..32)).min(len);
                        let copy = input[at..end].to_vec();
                        let to = rng.gen_range(0..=input.len());
                        input.splice(to..to, copy);
                    }
                    _ if at < len => input[at] ^= 1 << rng.gen_range(0..8),
                    _ => {}
                }
            }
            if let Ok(m) = Metainfo::from_bytes(&input) {
                parsed_ok += 1;
                // Whatever parses is consistent.
                let total: u64 = m.info.files.iter().map(|f| f.length).sum();
                assert_eq!(total, m.info.total_length());
                assert_eq!(
                    m.info.piece_hashes.len(),
                    m.info.lengths.piece_count() as usize
                );
                assert_eq!(m.info_hash, InfoHash::of_info(&m.info_bytes));
                let _ = Info::from_bytes(&m.info_bytes).unwrap();
            }
        }
        // Some mutations (e.g. in piece hashes or comments) leave the torrent valid.
        assert!(parsed_ok > 0);
    }

    #[test]
    fn libtorrent_hybrid_with_pad_files() {
        // Made by python3-libtorrent 2.0 create_torrent (default flags: hybrid v1+v2, pads).
        let m = Metainfo::from_bytes(include_bytes!(
            "../../tests/fixtures/libtorrent-pad.torrent"
        ))
        .unwrap();
        assert_eq!(
            m.info_hash.to_hex(),
            "ddde2fda68414a34ee25e12511f29f60759bcfca"
        );
        assert_eq!(m.info.lengths.piece_count(), 4);
        let all: Vec<(String, u64, u64, bool)> = m
            .info
            .files
            .iter()
            .map(|f| (f.display_path(), f.length, f.offset, f.pad))
            .collect();
        let expected = [
            ("a.bin", 1000, 0, false),
            (".pad/15384", 15384, 1000, true),
            ("c.txt", 5, 16384, false),
            (".pad/16379", 16379, 16389, true),
            ("sub/b.bin", 20000, 32768, false),
            (".pad/12768", 12768, 52768, true),
        ];
        let expected: Vec<(String, u64, u64, bool)> = expected
            .iter()
            .map(|(p, l, o, pad)| (p.to_string(), *l, *o, *pad))
            .collect();
        assert_eq!(all, expected);
        assert_eq!(m.info.visible_files().count(), 3);
        assert_eq!(
            m.trackers(),
            vec![vec!["http://127.0.0.1:6969/announce".to_string()]]
        );
    }

    #[test]
    fn info_hash_hex_round_trip() {
        let h = InfoHash([0xab; 20]);
        assert_eq!(InfoHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(InfoHash::from_hex(&h.to_hex().to_uppercase()), Some(h));
        assert_eq!(InfoHash::from_hex("abc"), None);
    }
}
