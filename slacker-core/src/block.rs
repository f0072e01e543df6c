//! Blocks: [`BlockSize`], [`BlockIndex`], [`BlockRange`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The copy-on-write granularity of a volume: a power of two from 512 B to 64 KiB,
/// 4 KiB by default.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

impl BlockSize {
    /// The smallest block size, 512 bytes.
    pub const MIN: BlockSize = BlockSize(512);
    /// The largest block size, 64 KiB.
    pub const MAX: BlockSize = BlockSize(64 * 1024);
    /// The default block size, 4 KiB (the page and ext4 block size).
    pub const DEFAULT: BlockSize = BlockSize(4096);

    /// Validates a block size.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) unless `bytes` is a power
    /// of two in `512..=65536`.
    pub fn new(bytes: u32) -> Result<Self> {
        if bytes.is_power_of_two() && (Self::MIN.0..=Self::MAX.0).contains(&bytes) {
            Ok(Self(bytes))
        } else {
            Err(Error::invalid(format!(
                "block size {bytes} must be a power of two from 512 to 65536"
            )))
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes, as `u64`.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// The block that holds byte `offset`.
    pub fn block_of(self, offset: u64) -> BlockIndex {
        BlockIndex((offset / self.bytes()) as u32)
    }

    /// The blocks that the byte range `offset..offset + len` touches (empty for `len == 0`).
    pub fn blocks_touched(self, offset: u64, len: u64) -> BlockRange {
        if len == 0 {
            let b = (offset / self.bytes()) as u32;
            return BlockRange::new(b, b);
        }
        let first = offset / self.bytes();
        let last = (offset + len - 1) / self.bytes();
        BlockRange::new(first as u32, last as u32 + 1)
    }

    /// The byte offset of block `index`.
    pub fn offset_of(self, index: BlockIndex) -> u64 {
        u64::from(index.0) * self.bytes()
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = Error;
    fn try_from(v: u32) -> Result<Self> {
        Self::new(v)
    }
}

impl From<BlockSize> for u32 {
    fn from(b: BlockSize) -> u32 {
        b.0
    }
}

impl fmt::Debug for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockSize({})", self.0)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

/// The index of a block within a volume (block `i` covers bytes `i*bs..(i+1)*bs`).
///
/// Volumes hold at most 2^32 blocks (16 TiB at 4 KiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockIndex(pub u32);

/// A half-open range of blocks, `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockRange {
    /// First block in the range.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}

impl BlockRange {
    /// The range `start..end` (`end < start` is treated as empty).
    pub fn new(start: u32, end: u32) -> Self {
        Self {
            start,
            end: end.max(start),
        }
    }

    /// Number of blocks in the range.
    pub fn len(&self) -> u64 {
        u64::from(self.end - self.start)
    }

    /// Whether the range holds no block.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether block `i` is in the range.
    pub fn contains(&self, i: BlockIndex) -> bool {
        (self.start..self.end).contains(&i.0)
    }

    /// The blocks of the range, in order.
    pub fn iter(&self) -> impl Iterator<Item = BlockIndex> + use<> {
        (self.start..self.end).map(BlockIndex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_validation_and_math() {
        assert!(BlockSize::new(4096).is_ok());
        for bad in [0, 1, 256, 3000, 128 * 1024] {
            assert!(BlockSize::new(bad).is_err(), "{bad}");
        }
        let bs = BlockSize::DEFAULT;
        assert_eq!(bs.blocks_touched(0, 4096), BlockRange::new(0, 1));
        assert_eq!(bs.blocks_touched(4095, 2), BlockRange::new(0, 2));
        assert_eq!(bs.blocks_touched(8192, 1), BlockRange::new(2, 3));
        assert!(bs.blocks_touched(100, 0).is_empty());
        assert_eq!(bs.offset_of(BlockIndex(3)), 12288);
    }
}
