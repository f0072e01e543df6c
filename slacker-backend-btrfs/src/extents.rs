//! Pure analysis of FIEMAP extent maps: which byte ranges of a volume may differ from its
//! origin snapshot, and how much of it is shared.

use std::ops::Range;

use slacker_core::{BlockBitmap, BlockRange, BlockSize};

use crate::sys::Extent;

/// What the volume is compared with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Origin<'a> {
    /// No origin: the volume diverges from zeros wherever it holds data.
    Zeros,
    /// The origin snapshot's extent map.
    Present(&'a [Extent]),
    /// The origin was removed: only the sharing flag is left to go by.
    Missing,
}

/// The result of [`diverged_ranges`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Divergence {
    /// Byte ranges that may differ from the origin.
    pub differ: Vec<Range<u64>>,
    /// Byte ranges where both files hold inline (metadata-resident, tiny) data: no
    /// physical address to compare, so the caller compares the bytes.
    pub compare_bytes: Vec<Range<u64>>,
}

fn push_merged(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    match v.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => v.push(r),
    }
}

/// The extent of `list` (sorted by offset) covering byte `pos`, advancing `idx`.
fn covering<'e>(list: &'e [Extent], idx: &mut usize, pos: u64) -> Option<&'e Extent> {
    while *idx < list.len() && list[*idx].end() <= pos {
        *idx += 1;
    }
    list.get(*idx).filter(|e| e.logical <= pos)
}

fn sorted(list: &[Extent]) -> Vec<Extent> {
    let mut v = list.to_vec();
    v.sort_by_key(|e| e.logical);
    v
}

/// Whether a range where the volume maps `v` and the origin maps `o` reads the same in
/// both, judged by where the bytes live: equal device addresses at the same file offset
/// mean the very same bytes (btrfs never overwrites a shared extent in place).
/// `None`: both are inline, compare the bytes.
fn same_storage(v: &Extent, o: &Extent, at: u64) -> Option<bool> {
    if v.unknown() || o.unknown() {
        return Some(false);
    }
    if v.inline() || o.inline() {
        return if v.inline() && o.inline() {
            None
        } else {
            Some(false)
        };
    }
    if v.encoded() || o.encoded() {
        // A compressed extent reports the start of the whole compressed extent: only the
        // very same file extent (same offset, address and length) is known identical.
        return Some(
            v.shared() && (v.logical, v.physical, v.length) == (o.logical, o.physical, o.length),
        );
    }
    Some(v.shared() && v.physical_at(at) == o.physical_at(at))
}

/// The byte ranges of a volume (`0..size`, extent map `vol`) that may differ from
/// `origin`. O(extents of both); a superset of the truly differing ranges.
pub(crate) fn diverged_ranges(vol: &[Extent], origin: Origin<'_>, size: u64) -> Divergence {
    let vol = sorted(vol);
    let mut out = Divergence::default();
    let origin = match origin {
        Origin::Zeros => {
            for e in &vol {
                push_merged(&mut out.differ, e.logical.min(size)..e.end().min(size));
            }
            return out;
        }
        Origin::Missing => {
            for e in vol
                .iter()
                .filter(|e| !e.shared() || e.unknown() || e.inline())
            {
                push_merged(&mut out.differ, e.logical.min(size)..e.end().min(size));
            }
            return out;
        }
        Origin::Present(o) => sorted(o),
    };
    let mut pts: Vec<u64> = vec![0, size];
    for e in vol.iter().chain(origin.iter()) {
        for p in [e.logical, e.end()] {
            if p < size {
                pts.push(p);
            }
        }
    }
    pts.sort_unstable();
    pts.dedup();
    let (mut vi, mut oi) = (0, 0);
    for w in pts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let v = covering(&vol, &mut vi, a);
        let o = covering(&origin, &mut oi, a);
        match (v, o) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => push_merged(&mut out.differ, a..b),
            (Some(v), Some(o)) => match same_storage(v, o, a) {
                Some(true) => {}
                Some(false) => push_merged(&mut out.differ, a..b),
                None => push_merged(&mut out.compare_bytes, a..b),
            },
        }
    }
    out
}

/// The blocks (of `block_size`) that the byte ranges touch, clipped to `size`.
pub(crate) fn blocks_of(ranges: &[Range<u64>], block_size: BlockSize, size: u64) -> BlockBitmap {
    let bs = block_size.bytes();
    let mut b = BlockBitmap::new();
    for r in ranges {
        let end = r.end.min(size);
        if r.start >= end {
            continue;
        }
        b.insert_range(BlockRange::new(
            (r.start / bs) as u32,
            end.div_ceil(bs) as u32,
        ));
    }
    b
}

/// (exclusive, shared) bytes of an extent map within `0..size`: extents flagged
/// `FIEMAP_EXTENT_SHARED` are shared; every other allocated byte (including delalloc and
/// inline data) is exclusive; holes count for nothing.
pub(crate) fn usage(vol: &[Extent], size: u64) -> (u64, u64) {
    let (mut exclusive, mut shared) = (0, 0);
    for e in vol {
        let len = e.end().min(size).saturating_sub(e.logical.min(size));
        if e.shared() {
            shared += len;
        } else {
            exclusive += len;
        }
    }
    (exclusive, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: u32 = linux_raw_sys::ioctl::FIEMAP_EXTENT_SHARED;
    const INLINE: u32 = linux_raw_sys::ioctl::FIEMAP_EXTENT_DATA_INLINE;
    const DELALLOC: u32 = linux_raw_sys::ioctl::FIEMAP_EXTENT_DELALLOC;
    const K: u64 = 4096;

    fn e(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn fresh_clone_has_no_divergence() {
        let m = [e(0, 1000 * K, 16 * K, SHARED)];
        let d = diverged_ranges(&m, Origin::Present(&m), 16 * K);
        assert_eq!(d, Divergence::default());
    }

    #[test]
    fn overwritten_block_and_holes_differ() {
        let origin = [e(0, 1000 * K, 8 * K, SHARED), e(12 * K, 2000 * K, 4 * K, 0)];
        // block 3 rewritten (new exclusive extent), origin's data at 12..16 punched out,
        // new data at 9.
        let vol = [
            e(0, 1000 * K, 3 * K, SHARED),
            e(3 * K, 5000 * K, K, 0),
            e(4 * K, 1004 * K, 4 * K, SHARED),
            e(9 * K, 6000 * K, K, DELALLOC),
        ];
        let d = diverged_ranges(&vol, Origin::Present(&origin), 16 * K);
        assert_eq!(d.differ, vec![3 * K..4 * K, 9 * K..10 * K, 12 * K..16 * K]);
        let b = blocks_of(&d.differ, BlockSize::DEFAULT, 16 * K);
        assert_eq!(
            b.iter().map(|i| i.0).collect::<Vec<_>>(),
            vec![3, 9, 12, 13, 14, 15]
        );
        let big = blocks_of(&d.differ, BlockSize::new(65536).unwrap(), 16 * K);
        assert_eq!(big.len(), 1);
    }

    #[test]
    fn shared_with_someone_else_at_another_address_differs() {
        // The volume's block 1 is shared (say, with a snapshot of the volume) but is not
        // the origin's block 1.
        let origin = [e(0, 1000 * K, 2 * K, SHARED)];
        let vol = [e(0, 1000 * K, K, SHARED), e(K, 7000 * K, K, SHARED)];
        let d = diverged_ranges(&vol, Origin::Present(&origin), 2 * K);
        assert_eq!(d.differ, vec![K..2 * K]);
        // With the origin gone only the flag is left: shared reads as "unchanged".
        let d = diverged_ranges(&vol, Origin::Missing, 2 * K);
        assert!(d.differ.is_empty());
    }

    #[test]
    fn inline_data_is_compared_by_bytes_and_zeros_origin_counts_data() {
        let origin = [e(0, 0, K, INLINE)];
        let vol = [e(0, 0, K, INLINE)];
        let d = diverged_ranges(&vol, Origin::Present(&origin), 1024);
        assert_eq!(d.compare_bytes, vec![0..1024]);
        let d = diverged_ranges(&vol, Origin::Zeros, 1024);
        assert_eq!(d.differ, vec![0..1024]);
        assert_eq!(usage(&vol, 1024), (1024, 0));
    }

    #[test]
    fn usage_splits_shared_and_exclusive() {
        let vol = [e(0, 0, 8 * K, SHARED), e(8 * K, 9 * K, 2 * K, 0)];
        assert_eq!(usage(&vol, 10 * K), (2 * K, 8 * K));
        assert_eq!(usage(&vol, 9 * K), (K, 8 * K));
    }
}
