//! Compression vs deduplication, as in the paper's Figure 7: how much smaller the corpus gets
//! with per-image gzip -6, with file-level dedup and with 4 KiB block-level dedup, per image
//! ("local") and over all images together ("global").
//!
//! - **raw**: bytes of regular-file contents, each inode once (hard links are free, as in the
//!   layer tar, where a second name is a link entry).
//! - **gzip -6**: the size of the image's traditional layer (`tar | gzip -6`). gzip cannot share
//!   data between images, so its global ratio is Σraw / Σgz.
//! - **file dedup**: blake3 of each whole file; unique bytes = the sizes of distinct contents.
//! - **block dedup**: each file split into 4 KiB blocks at file offsets 0, 4096, ...; blake3 of
//!   each block. The last block of a file is usually partial. Two accountings:
//!   `block` hashes the partial tail as the short block it is and stores it at its real length
//!   (a tail equals only a tail of the same bytes and length); `block_padded` zero-pads the tail
//!   to 4 KiB, hashes that, and stores every unique block at 4 KiB, as a block store (ext4
//!   image on btrfs, slacker's volumes) would. Empty files have no blocks.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::corpus::BuiltImage;
use crate::error::{Context, Result};
use crate::tarball::{self, TarStats};
use crate::tree;

/// Block size of the block-level analysis.
pub const BLOCK: usize = 4096;

/// Sizes and ratios for one image or for the whole corpus.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DedupRow {
    /// Image name, or `all` for the corpus.
    pub name: String,
    /// Regular files (distinct inodes).
    pub files: u64,
    /// Raw bytes (file contents).
    pub raw_bytes: u64,
    /// Uncompressed layer tar bytes.
    pub tar_bytes: u64,
    /// gzip -6 layer bytes.
    pub gz_bytes: u64,
    /// Bytes after whole-file dedup.
    pub file_unique_bytes: u64,
    /// 4 KiB blocks (partial tails included).
    pub blocks: u64,
    /// Bytes after block dedup, partial tails at their length.
    pub block_unique_bytes: u64,
    /// Bytes after block dedup, every unique block stored at 4 KiB.
    pub block_unique_bytes_padded: u64,
    /// Files skipped as unreadable (only without root; 0 in a complete analysis).
    #[serde(default)]
    pub unreadable: u64,
    /// raw / gz.
    pub gzip_ratio: f64,
    /// raw / file_unique.
    pub file_dedup_ratio: f64,
    /// raw / block_unique.
    pub block_dedup_ratio: f64,
    /// (blocks × 4 KiB) / block_unique_padded: block dedup as a 4 KiB block store sees it.
    pub block_dedup_ratio_padded: f64,
}

/// The whole analysis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DedupReport {
    /// Per image ("local").
    pub images: Vec<DedupRow>,
    /// Across all images ("global").
    pub all: DedupRow,
    /// How the numbers were computed (copied into the JSON).
    pub method: String,
}

type Hash = [u8; 32];

#[derive(Default)]
struct Acc {
    row: DedupRow,
    files: HashSet<Hash>,
    blocks: HashSet<Hash>,
    padded: HashSet<Hash>,
}

impl Acc {
    fn add_file(&mut self, fh: Hash, len: u64, blocks: &[(Hash, Hash, u64)]) {
        self.row.files += 1;
        self.row.raw_bytes += len;
        if self.files.insert(fh) {
            self.row.file_unique_bytes += len;
        }
        for (h, hp, n) in blocks {
            self.row.blocks += 1;
            if self.blocks.insert(*h) {
                self.row.block_unique_bytes += n;
            }
            if self.padded.insert(*hp) {
                self.row.block_unique_bytes_padded += BLOCK as u64;
            }
        }
    }

    fn finish(mut self) -> DedupRow {
        let r = &mut self.row;
        let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        r.gzip_ratio = div(r.raw_bytes, r.gz_bytes);
        r.file_dedup_ratio = div(r.raw_bytes, r.file_unique_bytes);
        r.block_dedup_ratio = div(r.raw_bytes, r.block_unique_bytes);
        r.block_dedup_ratio_padded = div(r.blocks * BLOCK as u64, r.block_unique_bytes_padded);
        self.row
    }
}

/// Analyse `images`. `known` supplies layer sizes already measured by a push in this run, so
/// the analysis does not gzip those images a second time.
pub fn analyze(images: &[BuiltImage], known: &HashMap<String, TarStats>) -> Result<DedupReport> {
    let mut global = Acc::default();
    global.row.name = "all".into();
    let mut rows = Vec::new();
    for img in images {
        let t = std::time::Instant::now();
        let mut local = Acc::default();
        local.row.name = img.spec.name.clone();
        let tar = match known.get(&img.spec.name) {
            Some(s) => *s,
            None => tarball::gz_size(&img.root)
                .with_context(|| format!("gzip size of {}", img.spec.name))?,
        };
        local.row.tar_bytes = tar.tar_bytes;
        local.row.gz_bytes = tar.gz_bytes;
        global.row.tar_bytes += tar.tar_bytes;
        global.row.gz_bytes += tar.gz_bytes;
        let mut seen = HashSet::new();
        let mut buf = Vec::new();
        for e in tree::walk(&img.root)? {
            if !e.meta.is_file() || !seen.insert((e.meta.dev(), e.meta.ino())) {
                continue;
            }
            let path = img.root.join(&e.rel);
            buf.clear();
            match std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut buf)) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::PermissionDenied
                        && !crate::sys::is_root() =>
                {
                    local.row.unreadable += 1;
                    global.row.unreadable += 1;
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
            let fh = *blake3::hash(&buf).as_bytes();
            let blocks: Vec<(Hash, Hash, u64)> = buf
                .chunks(BLOCK)
                .map(|c| {
                    let h = *blake3::hash(c).as_bytes();
                    let hp = if c.len() == BLOCK {
                        h
                    } else {
                        let mut p = [0u8; BLOCK];
                        p[..c.len()].copy_from_slice(c);
                        *blake3::hash(&p).as_bytes()
                    };
                    (h, hp, c.len() as u64)
                })
                .collect();
            local.add_file(fh, buf.len() as u64, &blocks);
            global.add_file(fh, buf.len() as u64, &blocks);
        }
        let row = local.finish();
        crate::progress!(
            "dedup: {}: raw {}, gzip {:.2}x, file dedup {:.2}x, 4 KiB block dedup {:.2}x ({:.1} s)",
            row.name,
            crate::report::fmt_bytes(row.raw_bytes),
            row.gzip_ratio,
            row.file_dedup_ratio,
            row.block_dedup_ratio,
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    Ok(DedupReport {
        images: rows,
        all: global.finish(),
        method: "raw = regular-file contents, each inode once; gzip = tar|gzip -6 layer size; \
                 file dedup = blake3 of whole files; block dedup = blake3 of 4 KiB blocks at file \
                 offsets, partial last block hashed and counted at its own length (block) or \
                 zero-padded to 4 KiB and counted as a full block (block_padded)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_count_duplicates_and_tails() {
        let mut a = Acc::default();
        let b = |x: u8| *blake3::hash(&[x]).as_bytes();
        // Two identical 2-block files: file dedup 2x, block dedup 2x.
        a.add_file(b(1), 8192, &[(b(10), b(10), 4096), (b(11), b(11), 4096)]);
        a.add_file(b(1), 8192, &[(b(10), b(10), 4096), (b(11), b(11), 4096)]);
        // A file sharing one block with them, plus a 100-byte tail.
        a.add_file(b(2), 4196, &[(b(10), b(10), 4096), (b(12), b(13), 100)]);
        a.row.gz_bytes = 10_290;
        let r = a.finish();
        assert_eq!(r.raw_bytes, 20_580);
        assert_eq!(r.file_unique_bytes, 8192 + 4196);
        assert_eq!(r.block_unique_bytes, 8192 + 100);
        assert_eq!(r.block_unique_bytes_padded, 3 * 4096);
        assert_eq!(r.blocks, 6);
        assert!((r.gzip_ratio - 2.0).abs() < 1e-9);
        assert!((r.block_dedup_ratio_padded - 2.0).abs() < 1e-9);
    }
}
