//! Block-level deduplication across volume and snapshot files with `FIDEDUPERANGE`.
//!
//! Every allocated, 4 KiB-aligned block of every file is hashed with blake3; a block whose
//! hash was seen before at a different device address becomes a candidate to share the
//! first occurrence's storage. Consecutive candidates are merged into runs of up to
//! 16 MiB (the btrfs per-call cap) and handed to the kernel, which compares the bytes
//! under lock and shares them only if they are identical: a hash collision can never
//! corrupt data. O(data) reads and one 32-byte hash per distinct block in memory.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use slacker_core::{DedupReport, Result};

use crate::error::io_err;
use crate::sys::{self, DedupeStatus};

/// Dedup granularity: the btrfs sector size (and the paper's 4 KiB block).
pub(crate) const CHUNK: u64 = 4096;
/// Longest range one `FIDEDUPERANGE` call may cover on btrfs.
const MAX_RUN: u64 = 16 << 20;
/// Read size while hashing.
const READ: u64 = 1 << 20;

struct First {
    file: usize,
    offset: u64,
    physical: Option<u64>,
}

/// A candidate: `len` bytes of `dst_file` at `dst` may share `src_file`'s bytes at `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    src_file: usize,
    src: u64,
    dst_file: usize,
    dst: u64,
    len: u64,
}

impl Run {
    fn extend(&mut self, next: &Run) -> bool {
        if self.src_file == next.src_file
            && self.dst_file == next.dst_file
            && self.src + self.len == next.src
            && self.dst + self.len == next.dst
            && self.len + next.len <= MAX_RUN
        {
            self.len += next.len;
            true
        } else {
            false
        }
    }
}

/// Deduplicates `files` (open file, logical size, path for messages). The caller keeps
/// them from changing meanwhile.
pub(crate) fn run(files: &[(File, u64, PathBuf)]) -> Result<DedupReport> {
    let mut report = DedupReport::default();
    let mut seen: HashMap<[u8; 32], First> = HashMap::new();
    let mut runs: Vec<Run> = Vec::new();
    let mut buf = vec![0u8; READ as usize];
    for (fi, (file, size, path)) in files.iter().enumerate() {
        let map = sys::fiemap(file, *size, true).map_err(io_err("FIEMAP", path))?;
        for e in map.iter().filter(|e| !e.inline() && !e.unknown()) {
            let start = e.logical.next_multiple_of(CHUNK);
            let end = e.end().min(*size) / CHUNK * CHUNK;
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(READ);
                let piece = &mut buf[..n as usize];
                file.read_exact_at(piece, pos)
                    .map_err(io_err("reading for dedup", path))?;
                for (k, block) in piece.chunks_exact(CHUNK as usize).enumerate() {
                    let off = pos + k as u64 * CHUNK;
                    report.blocks_scanned += 1;
                    let physical = e.physical_at(off);
                    match seen.entry(*blake3::hash(block).as_bytes()) {
                        Entry::Vacant(v) => {
                            v.insert(First {
                                file: fi,
                                offset: off,
                                physical,
                            });
                        }
                        Entry::Occupied(o) => {
                            let f = o.get();
                            if physical.is_some() && f.physical == physical {
                                continue; // already the same storage
                            }
                            let next = Run {
                                src_file: f.file,
                                src: f.offset,
                                dst_file: fi,
                                dst: off,
                                len: CHUNK,
                            };
                            if !runs.last_mut().is_some_and(|r| r.extend(&next)) {
                                runs.push(next);
                            }
                        }
                    }
                }
                pos += n;
            }
        }
    }
    for r in runs {
        let (src, src_path) = (&files[r.src_file].0, &files[r.src_file].2);
        let dst = &files[r.dst_file].0;
        match sys::dedupe_range(src, r.src, r.len, dst, r.dst)
            .map_err(io_err("FIDEDUPERANGE from", src_path))?
        {
            DedupeStatus::Same(n) => report.bytes_deduplicated += n,
            DedupeStatus::Differs => {}
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_only_when_both_sides_are_contiguous() {
        let mut a = Run {
            src_file: 0,
            src: 0,
            dst_file: 1,
            dst: 8192,
            len: CHUNK,
        };
        assert!(a.extend(&Run {
            src: CHUNK,
            dst: 8192 + CHUNK,
            ..a
        }));
        assert_eq!(a.len, 2 * CHUNK);
        assert!(!a.extend(&Run {
            src: 0,
            dst: 8192 + 2 * CHUNK,
            len: CHUNK,
            ..a
        }));
        let mut big = Run { len: MAX_RUN, ..a };
        assert!(!big.extend(&Run {
            src: MAX_RUN,
            dst: 8192 + MAX_RUN,
            len: CHUNK,
            ..a
        }));
    }
}
