//! File-tree fidelity: an mtree-like [`Manifest`] of a directory tree and a comparer, for
//! tests that check an image arrives intact (a tree applied into a volume, exported,
//! converted), plus [`diff_layer`], which writes the traditional layer that turns one
//! tree into another.
//!
//! Per entry the manifest holds: type, mode with set-id and sticky bits, uid, gid, size
//! and blake3 content hash (regular files), every extended attribute, link target, device
//! numbers, hard-link group (the first path, in sorted order, sharing the inode) and
//! mtime to the nanosecond. Directory sizes, link counts, atimes and ctimes are not
//! compared (they differ between filesystems and on every read).
//!
//! ```no_run
//! use slacker_testkit::tree::Manifest;
//! let a = Manifest::of(std::path::Path::new("/srv/source")).unwrap();
//! let b = Manifest::of(std::path::Path::new("/mnt/volume")).unwrap();
//! a.assert_same(&b);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use slacker_core::layer::archive::{TreeTar, xattrs};

/// What one path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `f` file, `d` directory, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits with set-id and sticky bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a regular file (0 otherwise).
    pub size: u64,
    /// blake3 of a regular file's content.
    pub hash: Option<String>,
    /// Every extended attribute.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// A symlink's target.
    pub link: Option<PathBuf>,
    /// A device's (major, minor).
    pub rdev: Option<(u32, u32)>,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// For a non-directory with several links in the tree: the first of its paths.
    pub link_group: Option<PathBuf>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04o} {}:{} size={} mtime={}.{:09}",
            self.kind, self.mode, self.uid, self.gid, self.size, self.mtime.0, self.mtime.1
        )?;
        if let Some(h) = &self.hash {
            write!(f, " hash={}", &h[..16])?;
        }
        if let Some(l) = &self.link {
            write!(f, " -> {}", l.display())?;
        }
        if let Some((a, b)) = self.rdev {
            write!(f, " dev={a},{b}")?;
        }
        if let Some(g) = &self.link_group {
            write!(f, " hardlink={}", g.display())?;
        }
        for (k, v) in &self.xattrs {
            write!(f, " {k}={}", hex(v))?;
        }
        Ok(())
    }
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to leave out of a manifest.
#[derive(Clone, Debug, Default)]
pub struct ManifestOptions {
    /// Top-level names to skip (`lost+found` by default through [`Manifest::of`]).
    pub skip_top: Vec<String>,
    /// Leave the root directory's own entry out.
    pub skip_root: bool,
}

/// An mtree-like listing of a tree: path (relative, the root is `""`) to [`Entry`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The entries, sorted by path.
    pub entries: BTreeMap<PathBuf, Entry>,
}

impl Manifest {
    /// The manifest of `root`, without a top-level `lost+found`.
    ///
    /// # Errors
    /// IO errors reading the tree.
    pub fn of(root: &Path) -> std::io::Result<Self> {
        Self::of_with(
            root,
            &ManifestOptions {
                skip_top: vec!["lost+found".to_owned()],
                skip_root: false,
            },
        )
    }

    /// The manifest of `root` with `options`.
    ///
    /// # Errors
    /// IO errors reading the tree.
    pub fn of_with(root: &Path, options: &ManifestOptions) -> std::io::Result<Self> {
        let mut entries = BTreeMap::new();
        let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        if !options.skip_root {
            entries.insert(PathBuf::new(), entry(root, &mut inodes, Path::new(""))?);
        }
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(root.join(&dir))? {
                let e = e?;
                let name = e.file_name();
                if dir.as_os_str().is_empty()
                    && options
                        .skip_top
                        .iter()
                        .any(|s| std::ffi::OsStr::new(s) == name)
                {
                    continue;
                }
                let rel = dir.join(&name);
                let en = entry(root, &mut inodes, &rel)?;
                if en.kind == 'd' {
                    stack.push(rel.clone());
                }
                entries.insert(rel, en);
            }
        }
        for mut paths in inodes.into_values() {
            if paths.len() > 1 {
                paths.sort();
                let first = paths[0].clone();
                for p in paths {
                    if let Some(e) = entries.get_mut(&p) {
                        e.link_group = Some(first.clone());
                    }
                }
            }
        }
        Ok(Self { entries })
    }

    /// Every difference between `self` (expected) and `other` (actual), one line each.
    pub fn diff(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        for (p, a) in &self.entries {
            match other.entries.get(p) {
                None => out.push(format!("missing  /{}: {a}", p.display())),
                Some(b) if a != b => out.push(format!(
                    "differs  /{}:\n   want {a}\n   got  {b}",
                    p.display()
                )),
                Some(_) => {}
            }
        }
        for (p, b) in &other.entries {
            if !self.entries.contains_key(p) {
                out.push(format!("extra    /{}: {b}", p.display()));
            }
        }
        out
    }

    /// Panics with the first differences unless `other` matches.
    pub fn assert_same(&self, other: &Self) {
        let d = self.diff(other);
        assert!(
            d.is_empty(),
            "trees differ in {} of {} entries:\n{}",
            d.len(),
            self.entries.len(),
            d.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

fn entry(
    root: &Path,
    inodes: &mut HashMap<(u64, u64), Vec<PathBuf>>,
    rel: &Path,
) -> std::io::Result<Entry> {
    let full = root.join(rel);
    let m = std::fs::symlink_metadata(&full)?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    if kind != 'd' && m.nlink() > 1 {
        inodes
            .entry((m.dev(), m.ino()))
            .or_default()
            .push(rel.to_path_buf());
    }
    let hash = if kind == 'f' {
        let mut h = blake3::Hasher::new();
        let mut f = std::fs::File::open(&full)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Some(h.finalize().to_hex().to_string())
    } else {
        None
    };
    let xattrs = xattrs(&full)
        .map_err(std::io::Error::other)?
        .into_iter()
        .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
        .collect();
    Ok(Entry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if kind == 'f' { m.len() } else { 0 },
        hash,
        xattrs,
        link: if kind == 'l' {
            Some(std::fs::read_link(&full)?)
        } else {
            None
        },
        rdev: matches!(kind, 'c' | 'b')
            .then(|| (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()))),
        mtime: (m.mtime(), m.mtime_nsec()),
        link_group: None,
    })
}

/// The traditional layer (an uncompressed tar with OCI whiteouts) that turns tree
/// `lower` into tree `upper`, as `docker commit` would write it: every entry of `upper`
/// that is new or differs (by [`Manifest`]), every member of a hard-link group one of
/// whose members is written, the directories on the way to them (so their times are
/// set), and a whiteout for each removed path (not for what is under it).
///
/// # Errors
/// IO errors reading the trees.
pub fn diff_layer(lower: &Path, upper: &Path) -> std::io::Result<Vec<u8>> {
    let opts = ManifestOptions {
        skip_top: vec!["lost+found".to_owned()],
        skip_root: false,
    };
    let lo = Manifest::of_with(lower, &opts)?;
    let up = Manifest::of_with(upper, &opts)?;
    let mut write: BTreeSet<PathBuf> = BTreeSet::new();
    for (p, e) in &up.entries {
        if lo.entries.get(p) != Some(e) {
            write.insert(p.clone());
        }
    }
    // Whole hard-link groups.
    let groups: BTreeSet<PathBuf> = write
        .iter()
        .filter_map(|p| up.entries[p].link_group.clone())
        .collect();
    for (p, e) in &up.entries {
        if e.link_group.as_ref().is_some_and(|g| groups.contains(g)) {
            write.insert(p.clone());
        }
    }
    // Removed paths whose parent survives.
    let removed: Vec<PathBuf> = lo
        .entries
        .keys()
        .filter(|p| !up.entries.contains_key(*p))
        .filter(|p| {
            p.parent()
                .is_none_or(|d| d.as_os_str().is_empty() || up.entries.contains_key(d))
        })
        .cloned()
        .collect();
    // Parents of everything written or whited out.
    let mut all: BTreeSet<PathBuf> = write.clone();
    for p in write.iter().chain(removed.iter()) {
        let mut d = p.parent();
        while let Some(x) = d {
            all.insert(x.to_path_buf());
            d = x.parent();
        }
    }
    let mut t = TreeTar::new(Vec::new());
    // Sorted order puts parents first; the link group's first path (smallest) is
    // written before its other members.
    for p in &all {
        t.append(upper, p).map_err(std::io::Error::other)?;
    }
    for p in &removed {
        t.whiteout(p).map_err(std::io::Error::other)?;
    }
    t.finish().map_err(std::io::Error::other)
}
