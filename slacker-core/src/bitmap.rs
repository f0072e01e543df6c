//! [`BlockBitmap`]: sets of blocks, over `roaring`.

use std::io::Cursor;
use std::ops::{BitAnd, BitOr, Sub};

use roaring::RoaringBitmap;

use crate::block::{BlockIndex, BlockRange};
use crate::error::{Error, Result};

/// Magic bytes at the start of a serialized [`BlockBitmap`].
pub const BITMAP_MAGIC: [u8; 4] = *b"SLKB";
/// Version of the serialized form this build writes and reads. Version 1 (never
/// persisted by any backend) ended in a truncated blake3 digest; 2 ends in a CRC-64, so
/// the model needs no hash crate.
pub const BITMAP_VERSION: u16 = 2;
const HEADER_LEN: usize = 4 + 2 + 2 + 8;
const CHECKSUM_LEN: usize = 8;

/// A set of blocks: for a volume, the blocks that may differ from its origin snapshot.
///
/// The invariant every backend keeps: *a block outside a volume's bitmap reads exactly
/// as the same block of its origin snapshot* (or as zeros when it has no origin).
///
/// ```
/// use slacker_core::{BlockBitmap, BlockRange, BlockIndex};
/// let mut b = BlockBitmap::new();
/// b.insert_range(BlockRange::new(2, 5));
/// b.insert(BlockIndex(9));
/// assert_eq!(b.runs().collect::<Vec<_>>(), vec![BlockRange::new(2, 5), BlockRange::new(9, 10)]);
/// let bytes = b.to_bytes();
/// assert_eq!(BlockBitmap::from_bytes(&bytes).unwrap(), b);
/// assert!(BlockBitmap::from_bytes(b"garbage").is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockBitmap(RoaringBitmap);

impl BlockBitmap {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one block.
    pub fn insert(&mut self, i: BlockIndex) -> bool {
        self.0.insert(i.0)
    }

    /// Adds every block of `r`.
    pub fn insert_range(&mut self, r: BlockRange) {
        if !r.is_empty() {
            self.0.insert_range(r.start..r.end);
        }
    }

    /// Removes every block of `r`.
    pub fn remove_range(&mut self, r: BlockRange) {
        if !r.is_empty() {
            self.0.remove_range(r.start..r.end);
        }
    }

    /// Whether block `i` is in the set.
    pub fn contains(&self, i: BlockIndex) -> bool {
        self.0.contains(i.0)
    }

    /// Whether every block of `r` is in the set (true for an empty range).
    pub fn contains_range(&self, r: BlockRange) -> bool {
        r.is_empty() || self.0.contains_range(r.start..r.end)
    }

    /// Whether any block of `r` is in the set.
    pub fn intersects_range(&self, r: BlockRange) -> bool {
        !r.is_empty() && self.0.range_cardinality(r.start..r.end) > 0
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The blocks, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = BlockIndex> + '_ {
        self.0.iter().map(BlockIndex)
    }

    /// Maximal runs of consecutive blocks, in increasing order.
    pub fn runs(&self) -> impl Iterator<Item = BlockRange> + '_ {
        let mut it = self.0.iter().peekable();
        std::iter::from_fn(move || {
            let start = it.next()?;
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end += 1;
                it.next();
            }
            Some(BlockRange::new(start, end + 1))
        })
    }

    /// Blocks in either set.
    pub fn union(&self, other: &Self) -> Self {
        Self(&self.0 | &other.0)
    }

    /// Blocks in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        Self(&self.0 & &other.0)
    }

    /// Blocks in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        Self(&self.0 - &other.0)
    }

    /// Whether every block of `self` is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The versioned, little-endian serialized form:
    /// `"SLKB" | version: u16 | reserved: u16 | payload_len: u64 | payload (roaring portable
    /// format) | CRC-64/XZ of the payload, little-endian`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(self.0.serialized_size());
        self.0
            .serialize_into(&mut payload)
            .expect("writing to a Vec cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
        out.extend_from_slice(&BITMAP_MAGIC);
        out.extend_from_slice(&BITMAP_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&crc64(&payload).to_le_bytes());
        out
    }

    /// Parses the form written by [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`ErrorKind::Integrity`](crate::ErrorKind::Integrity) for a wrong magic, an unknown
    /// version, a length or checksum mismatch, or a payload roaring rejects.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| Error::Integrity(format!("block bitmap: {m}"));
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(bad("too short"));
        }
        if bytes[..4] != BITMAP_MAGIC {
            return Err(bad("bad magic"));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != BITMAP_VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        if bytes[6..8] != [0, 0] {
            return Err(bad("reserved bits set"));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if len != (bytes.len() - HEADER_LEN - CHECKSUM_LEN) as u64 {
            return Err(bad("length mismatch"));
        }
        let payload = &bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN];
        if crc64(payload).to_le_bytes()[..] != bytes[bytes.len() - CHECKSUM_LEN..] {
            return Err(bad("checksum mismatch"));
        }
        let mut cur = Cursor::new(payload);
        let map = RoaringBitmap::deserialize_from(&mut cur).map_err(|e| bad(&e.to_string()))?;
        if cur.position() != payload.len() as u64 {
            return Err(bad("trailing bytes in payload"));
        }
        Ok(Self(map))
    }
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout all ones): detects every
/// burst error up to 64 bits, which is what a checksum of a stored bitmap is for.
fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0xC96C_5795_D787_0F42; // 0x42F0E1EBA9EA3693 reflected
    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u64;
    for &b in data {
        crc = TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

impl FromIterator<BlockIndex> for BlockBitmap {
    fn from_iter<T: IntoIterator<Item = BlockIndex>>(iter: T) -> Self {
        Self(iter.into_iter().map(|b| b.0).collect())
    }
}

impl BitOr for &BlockBitmap {
    type Output = BlockBitmap;
    fn bitor(self, rhs: Self) -> BlockBitmap {
        self.union(rhs)
    }
}

impl BitAnd for &BlockBitmap {
    type Output = BlockBitmap;
    fn bitand(self, rhs: Self) -> BlockBitmap {
        self.intersection(rhs)
    }
}

impl Sub for &BlockBitmap {
    type Output = BlockBitmap;
    fn sub(self, rhs: Self) -> BlockBitmap {
        self.difference(rhs)
    }
}

impl serde::Serialize for BlockBitmap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let runs: Vec<(u32, u32)> = self.runs().map(|r| (r.start, r.end)).collect();
        runs.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for BlockBitmap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let runs = Vec::<(u32, u32)>::deserialize(d)?;
        let mut b = BlockBitmap::new();
        for (s, e) in runs {
            if e < s {
                return Err(serde::de::Error::custom("bitmap run end before start"));
            }
            b.insert_range(BlockRange::new(s, e));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc64_matches_the_catalogue_check_value() {
        // CRC-64/XZ check value from the CRC catalogue (reveng), input "123456789".
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64(b""), 0);
    }

    fn bitmap() -> impl Strategy<Value = BlockBitmap> {
        proptest::collection::vec((0u32..5000, 0u32..40), 0..20).prop_map(|rs| {
            let mut b = BlockBitmap::new();
            for (s, l) in rs {
                b.insert_range(BlockRange::new(s, s + l));
            }
            b
        })
    }

    proptest! {
        #[test]
        fn serialized_form_round_trips(b in bitmap()) {
            prop_assert_eq!(BlockBitmap::from_bytes(&b.to_bytes()).unwrap(), b.clone());
            let json = serde_json::to_string(&b).unwrap();
            prop_assert_eq!(serde_json::from_str::<BlockBitmap>(&json).unwrap(), b);
        }

        #[test]
        fn garbage_is_rejected_not_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BlockBitmap::from_bytes(&bytes);
        }

        #[test]
        fn flipped_bytes_are_rejected(b in bitmap(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = b.to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(BlockBitmap::from_bytes(&bytes).is_err());
        }

        #[test]
        fn runs_cover_exactly_the_set(b in bitmap()) {
            let rebuilt: BlockBitmap = b.runs().flat_map(|r| r.iter()).collect();
            prop_assert_eq!(&rebuilt, &b);
            let runs: Vec<_> = b.runs().collect();
            for w in runs.windows(2) {
                prop_assert!(w[0].end < w[1].start, "runs must be maximal and ordered");
            }
        }

        #[test]
        fn set_algebra(a in bitmap(), b in bitmap()) {
            let u = a.union(&b);
            let i = a.intersection(&b);
            let d = a.difference(&b);
            prop_assert!(a.is_subset(&u) && b.is_subset(&u));
            prop_assert!(i.is_subset(&a) && i.is_subset(&b));
            prop_assert!(d.intersection(&b).is_empty());
            prop_assert_eq!(d.union(&i), a.clone());
            prop_assert_eq!(&(&a | &b), &u);
        }
    }

    #[test]
    fn range_queries() {
        let mut b = BlockBitmap::new();
        b.insert_range(BlockRange::new(10, 20));
        assert!(b.contains_range(BlockRange::new(10, 20)));
        assert!(!b.contains_range(BlockRange::new(9, 20)));
        assert!(b.intersects_range(BlockRange::new(0, 11)));
        assert!(!b.intersects_range(BlockRange::new(0, 10)));
        b.remove_range(BlockRange::new(12, 14));
        assert_eq!(b.len(), 8);
    }
}
