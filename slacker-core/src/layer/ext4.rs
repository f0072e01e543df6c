//! ext4 images through e2fsprogs: `mke2fs -d` builds one from a directory tree,
//! `debugfs` reads one back (`rdump`, `cat`) and adds device nodes and fifos; and, as
//! root, [`Mounted`]: an image loop-mounted for a layer to be applied in place.
//!
//! The tools run as child processes on image *files* (no mount, no root needed); the
//! layer store calls these from `spawn_blocking`. `debugfs -R 'rdump / dir'` dumps
//! regular files, directories and symlinks with their modes, owners (when run as root)
//! and times; it does not dump device nodes, fifos or sockets, and it dumps hard-linked
//! files as separate copies. A traditional layer applied on top of an ext4 parent
//! therefore loses the parent's device nodes and fifos and its hard-link identity (the
//! layer's own are kept): this is the unprivileged fallback path (reported in
//! [`AppliedLayer::losses`](super::AppliedLayer::losses)); as root the layer store
//! mounts a clone of the parent instead and keeps everything.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

use super::traditional::{Special, SpecialKind};

/// The ext4 superblock magic (0xEF53) and where it lives.
const MAGIC_OFFSET: usize = 1024 + 56;

/// Whether `head` (the first 2 KiB or more of a volume) holds an ext2/3/4 superblock.
pub fn is_ext4(head: &[u8]) -> bool {
    head.len() >= MAGIC_OFFSET + 2 && head[MAGIC_OFFSET..MAGIC_OFFSET + 2] == [0x53, 0xef]
}

fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Config(format!(
                "{what}: e2fsprogs (mke2fs, debugfs) is not installed: {e}"
            ))
        } else {
            Error::backend("ext4", format!("{what}: {e}"))
        }
    })?;
    Ok(out)
}

/// The stderr lines of a debugfs run that report errors (it exits 0 regardless).
fn debugfs_errors(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .map(str::to_owned)
        .collect()
}

/// Builds an ext4 filesystem of `size` bytes (4 KiB blocks) holding `tree` into the file
/// `image` (created or truncated; sparse), with room for at least `entries` inodes (and
/// no fewer than one per 16 KiB).
///
/// # Errors
/// `Config` if mke2fs is missing; `InvalidInput` if mke2fs fails (most often: the tree
/// does not fit in `size`).
pub fn make_image(tree: &Path, image: &Path, size: u64, entries: u64) -> Result<()> {
    let f = File::create(image)
        .map_err(|e| Error::backend("ext4", format!("create {}: {e}", image.display())))?;
    f.set_len(size)
        .map_err(|e| Error::backend("ext4", format!("size {}: {e}", image.display())))?;
    drop(f);
    let inodes = (size / 16384).max(entries + entries / 4 + 1024);
    let out = run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N"])
            .arg(inodes.to_string())
            .arg("-d")
            .arg(tree)
            .arg(image),
        "mke2fs",
    )?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "mke2fs -d could not build a {size}-byte ext4 image of the layer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Dumps the whole tree of the ext4 `image` into the existing directory `dir` (without
/// `lost+found`).
///
/// # Errors
/// `InvalidInput` if `image` is not ext4; `Backend` if debugfs reports errors.
pub fn dump_tree(image: &Path, dir: &Path) -> Result<()> {
    let mut head = [0u8; 2048];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::backend("ext4", format!("read {}: {e}", image.display())))?;
    if !is_ext4(&head) {
        return Err(Error::invalid(
            "the parent volume does not hold an ext4 filesystem",
        ));
    }
    let mut req = b"rdump / ".to_vec();
    req.extend_from_slice(dir.as_os_str().as_bytes());
    if !debugfs_safe_name(dir.as_os_str().as_bytes()) {
        return Err(Error::Config(format!(
            "scratch directory {} has characters debugfs cannot quote",
            dir.display()
        )));
    }
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(std::ffi::OsStr::from_bytes(&req))
            .arg(image),
        "debugfs rdump",
    )?;
    let errors = debugfs_errors(&out.stderr);
    if !out.status.success() || !errors.is_empty() {
        return Err(Error::backend(
            "ext4",
            format!("debugfs rdump failed: {}", errors.join("; ")),
        ));
    }
    let lf = dir.join("lost+found");
    if lf.is_dir() {
        fs::remove_dir_all(&lf)
            .map_err(|e| Error::backend("ext4", format!("remove {}: {e}", lf.display())))?;
    }
    Ok(())
}

/// Reads file `path` (absolute inside the filesystem) from the ext4 `image`.
///
/// # Errors
/// `NotFound` if there is no such file; `Backend` for debugfs failures.
pub fn cat(image: &Path, path: &str) -> Result<Vec<u8>> {
    if !path.starts_with('/') || !debugfs_safe_name(path.as_bytes()) {
        return Err(Error::invalid(format!("path {path:?} for debugfs cat")));
    }
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat \"{path}\""))
            .arg(image),
        "debugfs cat",
    )?;
    let errors = debugfs_errors(&out.stderr);
    if let Some(e) = errors.first() {
        if e.contains("not found") {
            return Err(Error::not_found(crate::ObjectKind::Other, path));
        }
        return Err(Error::backend("ext4", format!("debugfs cat: {e}")));
    }
    Ok(out.stdout)
}

/// Whether a path can be passed to debugfs inside double quotes: printable ASCII without
/// `"` and `\`.
pub fn debugfs_safe_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Adds device nodes and fifos to the ext4 `image` (paths relative to its root; their
/// directories must exist).
///
/// # Errors
/// `InvalidInput` for a name debugfs cannot take; `Backend` if debugfs reports errors.
pub fn add_specials(image: &Path, specials: &BTreeMap<PathBuf, Special>) -> Result<()> {
    if specials.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    for (rel, s) in specials {
        let bytes = rel.as_os_str().as_bytes();
        if !debugfs_safe_name(bytes) {
            return Err(Error::invalid(format!(
                "special file name {:?} is not supported",
                rel.display()
            )));
        }
        let dir = rel.parent().map(|p| p.to_string_lossy().into_owned());
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (spec, ty) = match s.kind {
            SpecialKind::Fifo => ("p".to_owned(), 0o010000),
            SpecialKind::Char(a, b) => (format!("c {a} {b}"), 0o020000),
            SpecialKind::Block(a, b) => (format!("b {a} {b}"), 0o060000),
        };
        script.push_str(&format!(
            "cd \"/{}\"\nmknod \"{name}\" {spec}\nsif \"{name}\" mode 0{:o}\nsif \"{name}\" uid {}\nsif \"{name}\" gid {}\n",
            dir.unwrap_or_default(),
            ty | (s.mode & 0o7777),
            s.uid,
            s.gid
        ));
    }
    let mut child = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg("-")
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Config(format!("debugfs: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| Error::backend("ext4", format!("debugfs script: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::backend("ext4", format!("debugfs: {e}")))?;
    let errors: Vec<String> = debugfs_errors(&out.stderr)
        .into_iter()
        .filter(|l| !l.starts_with("Allocated inode"))
        .collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(Error::backend(
            "ext4",
            format!("debugfs mknod failed: {}", errors.join("; ")),
        ));
    }
    Ok(())
}

/// A generous size for an ext4 filesystem holding `file_bytes` of data in `entries`
/// entries: twice the data, 8 KiB per entry and 16 MiB of metadata, in whole MiB.
pub fn estimate_size(file_bytes: u64, entries: u64) -> u64 {
    let raw = file_bytes
        .saturating_mul(2)
        .saturating_add(entries.saturating_mul(8192))
        .saturating_add(16 << 20);
    raw.div_ceil(1 << 20).saturating_mul(1 << 20)
}

/// Formats the existing file `image` (its whole size, 4 KiB blocks) as an empty ext4
/// filesystem with room for at least `entries` inodes (and no fewer than one per 16
/// KiB). The file is not truncated: it may be a backend's volume file.
///
/// # Errors
/// `Config` if mke2fs is missing; `InvalidInput` if mke2fs fails.
pub fn format(image: &Path, entries: u64) -> Result<()> {
    let size = fs::metadata(image)
        .map_err(|e| Error::backend("ext4", format!("stat {}: {e}", image.display())))?
        .len();
    let inodes = (size / 16384).max(entries + entries / 4 + 1024);
    let out = run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N"])
            .arg(inodes.to_string())
            .arg(image),
        "mke2fs",
    )?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "mke2fs could not format a {size}-byte ext4 image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// An ext4 image file loop-mounted read-write (root only), for applying a layer in
/// place. Mounted `nosuid,nodev,noexec`: nothing in it runs or opens devices while it
/// is being written. [`unmount`](Self::unmount) syncs and unmounts; dropping the guard
/// unmounts too (lazily if busy), so an error path never leaves a mount behind.
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
    active: bool,
}

impl Mounted {
    /// Mounts the ext4 in `image` on the existing empty directory `dir` with
    /// `mount -t ext4 -o loop` (the loop device is released on unmount).
    ///
    /// # Errors
    /// `InvalidInput` if `image` holds no ext4; `Config` if `mount` is missing;
    /// `Backend` if mounting fails (for example without root).
    pub fn mount(image: &Path, dir: &Path) -> Result<Self> {
        let mut head = [0u8; 2048];
        File::open(image)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(|e| Error::backend("ext4", format!("read {}: {e}", image.display())))?;
        if !is_ext4(&head) {
            return Err(Error::invalid(
                "the parent volume does not hold an ext4 filesystem",
            ));
        }
        let out = Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noexec"])
            .arg(image)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Config(format!("mount: {e}")))?;
        if !out.status.success() {
            return Err(Error::backend(
                "ext4",
                format!(
                    "mount -o loop {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            active: true,
        })
    }

    /// The mounted filesystem's root.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// Syncs and unmounts.
    ///
    /// # Errors
    /// `Backend` if `umount` fails (the guard then detaches lazily when dropped).
    pub fn unmount(mut self) -> Result<()> {
        if let Ok(d) = File::open(&self.dir) {
            let _ = rustix::fs::syncfs(&d);
        }
        // "target is busy" can be transient: a process another thread of this program is
        // forking holds a copy of every descriptor until it execs. Retry briefly.
        let mut attempt = 0;
        let out = loop {
            let out = Command::new("umount")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Config(format!("umount: {e}")))?;
            attempt += 1;
            if out.status.success() || attempt >= 20 {
                break out;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if !out.status.success() {
            return Err(Error::backend(
                "ext4",
                format!(
                    "umount {}: {}",
                    self.dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        self.active = false;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.dir)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
