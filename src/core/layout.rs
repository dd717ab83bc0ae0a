//! Piece and block geometry: which bytes of the torrent a piece or block covers, which pieces
//! cover a byte range, and which files hold it ([`FileLayout`]: the one "byte range -> file
//! slices" walk, shared by the disk store, resume checks and `create`). Built once from the
//! lengths; every index that leaves this module has been bounds-checked (`PieceIndex` can only
//! come from `Lengths`, a `FileSlice` only from a `FileLayout`).

use std::ops::Range;

/// The size of a request on the wire. Every block is this long except the last of a piece.
pub const BLOCK_SIZE: u32 = 16 * 1024;

/// A piece index known to be in range for the `Lengths` that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PieceIndex(u32);

impl PieceIndex {
    pub fn get(self) -> u32 {
        self.0
    }
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One block of one piece: what a `request` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRef {
    pub piece: u32,
    /// Byte offset inside the piece; a multiple of `BLOCK_SIZE`.
    pub offset: u32,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("piece length is 0")]
    ZeroPieceLength,
    #[error(
        "total length {total} needs {needed} pieces of {piece_length} bytes, metainfo has {count}"
    )]
    PieceCountMismatch {
        total: u64,
        piece_length: u32,
        needed: u64,
        count: u64,
    },
    #[error("torrent has too many pieces ({0})")]
    TooManyPieces(u64),
    #[error("total size of the files overflows")]
    TotalLengthOverflow,
}

/// The geometry of one torrent's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    total_length: u64,
    piece_length: u32,
    piece_count: u32,
}

impl Lengths {
    /// `piece_count` is what the metainfo claims; it must match the total length.
    pub fn new(
        total_length: u64,
        piece_length: u32,
        piece_count: u64,
    ) -> Result<Self, LayoutError> {
        if piece_length == 0 {
            return Err(LayoutError::ZeroPieceLength);
        }
        let needed = total_length.div_ceil(piece_length as u64);
        if needed != piece_count {
            return Err(LayoutError::PieceCountMismatch {
                total: total_length,
                piece_length,
                needed,
                count: piece_count,
            });
        }
        if needed > u32::MAX as u64 / 2 {
            return Err(LayoutError::TooManyPieces(needed));
        }
        Ok(Lengths {
            total_length,
            piece_length,
            piece_count: needed as u32,
        })
    }

    /// Lengths derived from the total alone (for building torrents).
    pub fn from_total(total_length: u64, piece_length: u32) -> Result<Self, LayoutError> {
        if piece_length == 0 {
            return Err(LayoutError::ZeroPieceLength);
        }
        Self::new(
            total_length,
            piece_length,
            total_length.div_ceil(piece_length as u64),
        )
    }

    pub fn total_length(&self) -> u64 {
        self.total_length
    }
    pub fn piece_length(&self) -> u32 {
        self.piece_length
    }
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// Checks an index that came from a peer, the kernel or a file.
    pub fn piece(&self, index: u32) -> Option<PieceIndex> {
        (index < self.piece_count).then_some(PieceIndex(index))
    }

    pub fn pieces(&self) -> impl Iterator<Item = PieceIndex> {
        (0..self.piece_count).map(PieceIndex)
    }

    pub fn piece_offset(&self, piece: PieceIndex) -> u64 {
        piece.0 as u64 * self.piece_length as u64
    }

    pub fn piece_len(&self, piece: PieceIndex) -> u32 {
        let start = self.piece_offset(piece);
        (self.total_length - start).min(self.piece_length as u64) as u32
    }

    pub fn blocks_in_piece(&self, piece: PieceIndex) -> u32 {
        self.piece_len(piece).div_ceil(BLOCK_SIZE)
    }

    /// The blocks of a piece, in order.
    pub fn blocks(&self, piece: PieceIndex) -> impl Iterator<Item = BlockRef> {
        let len = self.piece_len(piece);
        (0..len.div_ceil(BLOCK_SIZE)).map(move |i| {
            let offset = i * BLOCK_SIZE;
            BlockRef {
                piece: piece.0,
                offset,
                length: (len - offset).min(BLOCK_SIZE),
            }
        })
    }

    /// The block of `piece` that starts at `offset`, if `offset` and `length` name exactly one
    /// block of our geometry (what we request, so what a `piece` message must carry).
    pub fn block(&self, piece: u32, offset: u32, length: u32) -> Option<BlockRef> {
        let p = self.piece(piece)?;
        let len = self.piece_len(p);
        if !offset.is_multiple_of(BLOCK_SIZE) || offset >= len {
            return None;
        }
        let expect = (len - offset).min(BLOCK_SIZE);
        (length == expect).then_some(BlockRef {
            piece,
            offset,
            length,
        })
    }

    /// Whether a peer's request for `length` bytes at `offset` of `piece` lies inside the piece.
    pub fn request_in_bounds(&self, piece: u32, offset: u32, length: u32) -> bool {
        match self.piece(piece) {
            Some(p) => length > 0 && (offset as u64 + length as u64) <= self.piece_len(p) as u64,
            None => false,
        }
    }

    /// The pieces that hold any byte of `[offset, offset + len)`; empty for an empty range or one
    /// past the end.
    pub fn pieces_for_range(&self, offset: u64, len: u64) -> Range<u32> {
        let end = offset.saturating_add(len).min(self.total_length);
        if offset >= end {
            return 0..0;
        }
        let pl = self.piece_length as u64;
        (offset / pl) as u32..end.div_ceil(pl) as u32
    }
}

/// Where the files of a torrent sit in its byte stream: laid end to end in order, from offset 0.
/// Built from the file lengths alone, so the files always cover `[0, total_length)` without gaps
/// and [`FileLayout::slices`] covers every byte of a range that lies inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// Stream offset of each file's first byte; `starts[i + 1]` is where file `i` ends, so there
    /// is one more entry than there are files.
    starts: Vec<u64>,
}

/// The part of one file that a byte range of the torrent covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSlice {
    pub file_index: usize,
    /// Offset inside the file.
    pub file_offset: u64,
    /// Offset inside the caller's buffer (relative to the range start).
    pub buf_offset: usize,
    pub len: usize,
}

impl FileLayout {
    /// Files of these lengths, in stream order (empty files and pads included: indexes match).
    pub fn from_lengths(lengths: impl IntoIterator<Item = u64>) -> Result<Self, LayoutError> {
        let mut starts = vec![0u64];
        let mut end = 0u64;
        for length in lengths {
            end = end
                .checked_add(length)
                .ok_or(LayoutError::TotalLengthOverflow)?;
            starts.push(end);
        }
        Ok(FileLayout { starts })
    }

    pub fn file_count(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn total_length(&self) -> u64 {
        self.starts[self.starts.len() - 1]
    }

    /// Which files hold `[offset, offset + len)`, in stream order; empty files are skipped. The
    /// slices are contiguous and cover the part of the range before `total_length`, so a range
    /// past the end yields fewer bytes than `len` (none when it starts at or after the end).
    pub fn slices(&self, offset: u64, len: usize) -> FileSlices<'_> {
        let end = offset.saturating_add(len as u64).min(self.total_length());
        // The first file that ends after `offset` (binary search: `create` calls this per piece).
        let next_file = self.starts[1..].partition_point(|&file_end| file_end <= offset);
        FileSlices {
            starts: &self.starts,
            next_file,
            range_start: offset,
            end,
        }
    }
}

/// The iterator of [`FileLayout::slices`].
#[derive(Debug, Clone)]
pub struct FileSlices<'a> {
    starts: &'a [u64],
    next_file: usize,
    range_start: u64,
    end: u64,
}

impl Iterator for FileSlices<'_> {
    type Item = FileSlice;

    fn next(&mut self) -> Option<FileSlice> {
        loop {
            let i = self.next_file;
            let (&file_start, &file_end) = (self.starts.get(i)?, self.starts.get(i + 1)?);
            if file_start >= self.end {
                return None;
            }
            self.next_file += 1;
            let start = self.range_start.max(file_start);
            let stop = self.end.min(file_end);
            if start < stop {
                return Some(FileSlice {
                    file_index: i,
                    file_offset: start - file_start,
                    buf_offset: (start - self.range_start) as usize,
                    len: (stop - start) as usize,
                });
            }
            // An empty file: nothing of the range is in it.
        }
    }
}

/// A set of pieces in wire order (bit 7 of byte 0 is piece 0), as the `bitfield` message has it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: u32,
}

impl Bitfield {
    pub fn new(len: u32) -> Self {
        Bitfield {
            bytes: vec![0; (len as usize).div_ceil(8)],
            len,
        }
    }

    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i, true);
        }
        b
    }

    /// From a peer's `bitfield` payload: the byte count must match and the spare bits be clear.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Option<Self> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let spare = (8 - len % 8) % 8;
        if spare > 0 {
            let mask = (1u8 << spare) - 1;
            if bytes.last().is_some_and(|b| b & mask != 0) {
                return None;
            }
        }
        Some(Bitfield {
            bytes: bytes.to_vec(),
            len,
        })
    }

    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32, v: bool) {
        if i >= self.len {
            return;
        }
        let byte = &mut self.bytes[(i / 8) as usize];
        if v {
            *byte |= 0x80 >> (i % 8);
        } else {
            *byte &= !(0x80 >> (i % 8));
        }
    }

    pub fn count_ones(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    pub fn all(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Whether this set holds a piece `other` lacks (a peer has something we want).
    pub fn has_any_not_in(&self, other: &Bitfield) -> bool {
        self.bytes
            .iter()
            .zip(other.bytes.iter().chain(std::iter::repeat(&0)))
            .any(|(a, b)| a & !b != 0)
    }

    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(move |&i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_a_short_last_piece() {
        let l = Lengths::new(100_000, 32768, 4).unwrap();
        let last = l.piece(3).unwrap();
        assert_eq!(l.piece_len(last), 100_000 - 3 * 32768);
        assert_eq!(l.blocks_in_piece(last), 1);
        let blocks: Vec<_> = l.blocks(l.piece(0).unwrap()).collect();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1].offset, BLOCK_SIZE);
        assert!(l.piece(4).is_none());
    }

    #[test]
    fn piece_count_must_match() {
        assert!(matches!(
            Lengths::new(100, 10, 11),
            Err(LayoutError::PieceCountMismatch { .. })
        ));
        assert_eq!(Lengths::new(1, 0, 1), Err(LayoutError::ZeroPieceLength));
        assert!(Lengths::new(0, 16, 0).is_ok());
    }

    #[test]
    fn block_must_match_our_geometry() {
        let l = Lengths::new(40_000, 32768, 2).unwrap();
        assert!(l.block(0, 0, BLOCK_SIZE).is_some());
        assert!(l.block(0, 1, BLOCK_SIZE).is_none());
        assert!(l.block(1, 0, 40_000 - 32768).is_some());
        assert!(l.block(1, 0, BLOCK_SIZE).is_none());
        assert!(l.block(2, 0, 1).is_none());
    }

    #[test]
    fn ranges_map_to_pieces() {
        let l = Lengths::new(100, 10, 10).unwrap();
        assert_eq!(l.pieces_for_range(0, 10), 0..1);
        assert_eq!(l.pieces_for_range(5, 10), 0..2);
        assert_eq!(l.pieces_for_range(95, 100), 9..10);
        assert_eq!(l.pieces_for_range(100, 1), 0..0);
        assert_eq!(l.pieces_for_range(3, 0), 0..0);
    }

    fn slice(file_index: usize, file_offset: u64, buf_offset: usize, len: usize) -> FileSlice {
        FileSlice {
            file_index,
            file_offset,
            buf_offset,
            len,
        }
    }

    fn slices(layout: &FileLayout, offset: u64, len: usize) -> Vec<FileSlice> {
        layout.slices(offset, len).collect()
    }

    #[test]
    fn slices_cross_file_boundaries_and_skip_empty_files() {
        // 10 bytes, an empty file, a 5-byte pad, 20 bytes.
        let layout = FileLayout::from_lengths([10, 0, 5, 20]).unwrap();
        assert_eq!(layout.total_length(), 35);
        assert_eq!(layout.file_count(), 4);
        assert_eq!(
            slices(&layout, 8, 10),
            [slice(0, 8, 0, 2), slice(2, 0, 2, 5), slice(3, 0, 7, 3)]
        );
        // Starting exactly where the empty file sits: it is skipped, the pad comes first.
        assert_eq!(
            slices(&layout, 10, 6),
            [slice(2, 0, 0, 5), slice(3, 0, 5, 1)]
        );
        assert!(slices(&layout, 35, 4).is_empty());
        assert!(slices(&layout, 3, 0).is_empty());
    }

    #[test]
    fn a_piece_can_span_three_files() {
        let lengths = Lengths::new(40, 16, 3).unwrap();
        let layout = FileLayout::from_lengths([14, 1, 25]).unwrap();
        let p0 = lengths.piece(0).unwrap();
        let got = slices(
            &layout,
            lengths.piece_offset(p0),
            lengths.piece_len(p0) as usize,
        );
        assert_eq!(
            got,
            [slice(0, 0, 0, 14), slice(1, 0, 14, 1), slice(2, 0, 15, 1)]
        );
        let p2 = lengths.piece(2).unwrap();
        let got = slices(
            &layout,
            lengths.piece_offset(p2),
            lengths.piece_len(p2) as usize,
        );
        assert_eq!(got, [slice(2, 17, 0, 8)]);
    }

    #[test]
    fn pads_are_ordinary_slices_between_files() {
        // BEP 47: a pad fills the rest of the piece, so the next file starts on a piece boundary.
        let layout = FileLayout::from_lengths([10, 6, 20]).unwrap();
        assert_eq!(slices(&layout, 10, 6), [slice(1, 0, 0, 6)]);
        assert_eq!(slices(&layout, 16, 16), [slice(2, 0, 0, 16)]);
        assert_eq!(
            slices(&layout, 0, 36).iter().map(|s| s.len).sum::<usize>(),
            36
        );
    }

    #[test]
    fn empty_files_anywhere_yield_nothing() {
        let layout = FileLayout::from_lengths([0, 0, 4, 0, 3, 0]).unwrap();
        assert_eq!(
            slices(&layout, 0, 7),
            [slice(2, 0, 0, 4), slice(4, 0, 4, 3)]
        );
        assert_eq!(slices(&layout, 4, 1), [slice(4, 0, 0, 1)]);
        let only_empty = FileLayout::from_lengths([0, 0]).unwrap();
        assert_eq!(only_empty.total_length(), 0);
        assert!(slices(&only_empty, 0, 10).is_empty());
        let no_files = FileLayout::from_lengths([]).unwrap();
        assert!(slices(&no_files, 0, 1).is_empty());
    }

    #[test]
    fn a_range_past_the_end_is_cut_at_the_end() {
        let layout = FileLayout::from_lengths([10, 5]).unwrap();
        assert_eq!(slices(&layout, 12, 100), [slice(1, 2, 0, 3)]);
        assert!(slices(&layout, 15, 1).is_empty());
        assert!(slices(&layout, u64::MAX - 1, 10).is_empty());
        assert_eq!(
            FileLayout::from_lengths([u64::MAX, 1]),
            Err(LayoutError::TotalLengthOverflow)
        );
    }

    #[test]
    fn bitfield_rejects_spare_bits_and_wrong_size() {
        assert!(Bitfield::from_bytes(&[0xff], 8).is_some());
        assert!(Bitfield::from_bytes(&[0xff], 7).is_none());
        assert!(Bitfield::from_bytes(&[0xfe], 7).is_some());
        assert!(Bitfield::from_bytes(&[0xff, 0], 8).is_none());
        let mut b = Bitfield::new(10);
        b.set(9, true);
        assert_eq!(b.as_bytes(), &[0, 0x40]);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![9]);
        assert!(Bitfield::full(10).all());
        assert!(Bitfield::full(10).has_any_not_in(&b));
        assert!(!b.has_any_not_in(&Bitfield::full(10)));
        assert!(!b.has_any_not_in(&b));
    }
}
