//! Walking an image's root tree: deterministic order, no symlink following, one filesystem.

use std::collections::HashSet;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};

/// One entry below the root.
#[derive(Debug)]
pub struct Entry {
    /// Path relative to the root (never empty: the root itself is not listed).
    pub rel: PathBuf,
    /// `lstat` of the entry.
    pub meta: Metadata,
}

/// Every entry below `root`, parents before children, siblings sorted by name. Does not
/// follow symlinks and does not descend into other filesystems (mount points are listed as
/// directories but not entered). Without root, unreadable directories are not entered.
pub fn walk(root: &Path) -> Result<Vec<Entry>> {
    let root_dev = std::fs::symlink_metadata(root)
        .with_context(|| format!("stat {}", root.display()))?
        .dev();
    let mut out = Vec::new();
    walk_dir(root, Path::new(""), root_dev, &mut out)?;
    Ok(out)
}

fn walk_dir(root: &Path, rel: &Path, dev: u64, out: &mut Vec<Entry>) -> Result<()> {
    let dir = root.join(rel);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        // Without root, root-only directories (e.g. /root) are listed but not entered.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !crate::sys::is_root() => {
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names: Vec<_> = rd
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for n in names {
        let rel = rel.join(&n);
        let meta = std::fs::symlink_metadata(root.join(&rel))?;
        let descend = meta.is_dir() && meta.dev() == dev;
        out.push(Entry {
            rel: rel.clone(),
            meta,
        });
        if descend {
            walk_dir(root, &rel, dev, out)?;
        }
    }
    Ok(())
}

/// Size and shape of a tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeStats {
    /// Bytes of regular-file contents, each inode counted once (hard links are free).
    pub file_bytes: u64,
    /// Regular files (distinct inodes).
    pub files: u64,
    /// Extra names of already-counted inodes.
    pub hardlinks: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Device nodes, fifos, sockets.
    pub special: u64,
    /// Bytes allocated on disk (`st_blocks * 512`), each inode once.
    pub allocated_bytes: u64,
}

/// Count `entries` (from [`walk`]).
pub fn stats(entries: &[Entry]) -> TreeStats {
    let mut s = TreeStats::default();
    let mut seen = HashSet::new();
    for e in entries {
        let ft = e.meta.file_type();
        if ft.is_dir() {
            s.dirs += 1;
            s.allocated_bytes += e.meta.blocks() * 512;
        } else if ft.is_symlink() {
            s.symlinks += 1;
        } else if ft.is_file() {
            if e.meta.nlink() > 1 && !seen.insert((e.meta.dev(), e.meta.ino())) {
                s.hardlinks += 1;
                continue;
            }
            s.files += 1;
            s.file_bytes += e.meta.len();
            s.allocated_bytes += e.meta.blocks() * 512;
        } else {
            s.special += 1;
        }
    }
    s
}
