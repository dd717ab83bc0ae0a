//! .torrent metainfo (BEP 3, BEP 12, BEP 47 pad files) and magnet URIs (BEP 9).
//! STUB: the foundation helper replaces the bodies; the public types are the contract.

use crate::core::layout::Lengths;

/// SHA-1 of the exact bytes of the `info` dictionary.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub [u8; 20]);

impl InfoHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub piece_length: u32,
    pub piece_hashes: Vec<[u8; 20]>,
    /// All entries including pad files, in stream order.
    pub files: Vec<FileEntry>,
    /// True for a multi-file torrent (`files` key), whose root is a directory called `name`.
    pub multi_file: bool,
    pub private: bool,
    pub lengths: Lengths,
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

#[derive(Debug, thiserror::Error)]
pub enum MetainfoError {
    #[error("not implemented")]
    Unimplemented,
}

impl Metainfo {
    pub fn from_bytes(_bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
        Err(MetainfoError::Unimplemented)
    }
}
