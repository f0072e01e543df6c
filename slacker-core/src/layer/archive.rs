//! Writing traditional layers from file trees, keeping everything
//! [`traditional::unpack_mounted`](super::traditional::unpack_mounted) applies: type,
//! content, mode with set-id and sticky bits, owner, extended attributes (PAX
//! `SCHILY.xattr.*`), link target, device numbers, hard links (by inode), and
//! modification and access times to the nanosecond (PAX `mtime`/`atime`). Sockets are
//! skipped (tar has no type for them). For the plain OCI export of a volume and for
//! building test images.
//!
//! ```no_run
//! # fn main() -> slacker_core::Result<()> {
//! use slacker_core::layer::archive::TreeTar;
//! let mut t = TreeTar::new(Vec::new());
//! t.append_tree(std::path::Path::new("/srv/rootfs"), &["lost+found"])?;
//! let tar: Vec<u8> = t.finish()?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use super::traditional::PAX_XATTR_PREFIX;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::backend("layer-tar", format!("{what} {}: {e}", path.display()))
}

/// Every extended attribute of `path` (not following a symlink), sorted by name.
///
/// # Errors
/// `Backend` for IO errors other than "not supported".
pub fn xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list xattrs of", path, e.into())),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..]) {
                Ok(l) => break l,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(e) => return Err(io_error("read xattr of", path, e.into())),
            }
        };
        value.truncate(len);
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// A PAX extended header body from records.
fn pax_body(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body_len = k.len() + v.len() + 3; // " " "=" "\n"
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len = len.to_string().len() + body_len;
        }
        data.extend_from_slice(format!("{len} ").as_bytes());
        data.extend_from_slice(k);
        data.push(b'=');
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    data
}

fn time_text(secs: i64, nanos: i64) -> String {
    if nanos == 0 {
        secs.to_string()
    } else if secs >= 0 {
        format!("{secs}.{nanos:09}")
    } else {
        // -1.25 is 1.25 s before the epoch: secs = -2, nanos = 750_000_000.
        let (s, n) = (secs + 1, 1_000_000_000 - nanos);
        format!("-{}.{n:09}", -s)
    }
}

/// A tar stream being written from file trees.
pub struct TreeTar<W: Write> {
    b: tar::Builder<W>,
    /// First path written of each multiply-linked inode, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> std::fmt::Debug for TreeTar<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeTar").finish_non_exhaustive()
    }
}

impl<W: Write> TreeTar<W> {
    /// A tar written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            b: tar::Builder::new(out),
            links: HashMap::new(),
        }
    }

    /// Appends the entry `rel` of the tree `root` (`rel` empty: the root directory,
    /// written as `./`). Directories are not descended into.
    ///
    /// # Errors
    /// `Backend` for IO errors.
    pub fn append(&mut self, root: &Path, rel: &Path) -> Result<()> {
        let full = root.join(rel);
        let io = |e| io_error("tar", &full, e);
        let m = std::fs::symlink_metadata(&full).map_err(io)?;
        let ft = m.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        let name: PathBuf = if rel.as_os_str().is_empty() {
            PathBuf::from("./")
        } else {
            rel.to_path_buf()
        };
        let mut h = tar::Header::new_ustar();
        h.set_mode(m.mode() & 0o7777);
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let (uid, gid) = (u64::from(m.uid()), u64::from(m.gid()));
        h.set_uid(uid.min(0o7777777));
        h.set_gid(gid.min(0o7777777));
        if uid > 0o7777777 {
            pax.push((b"uid".to_vec(), uid.to_string().into_bytes()));
        }
        if gid > 0o7777777 {
            pax.push((b"gid".to_vec(), gid.to_string().into_bytes()));
        }
        h.set_mtime(u64::try_from(m.mtime()).unwrap_or(0));
        if m.mtime_nsec() != 0 || m.mtime() < 0 {
            pax.push((
                b"mtime".to_vec(),
                time_text(m.mtime(), m.mtime_nsec()).into_bytes(),
            ));
        }
        pax.push((
            b"atime".to_vec(),
            time_text(m.atime(), m.atime_nsec()).into_bytes(),
        ));
        for (k, v) in xattrs(&full)? {
            let mut key = PAX_XATTR_PREFIX.as_bytes().to_vec();
            key.extend_from_slice(&k);
            pax.push((key, v));
        }
        h.set_size(0);
        let hard = !ft.is_dir() && m.nlink() > 1;
        if hard {
            if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                let first = first.clone();
                self.pax(&pax)?;
                return self.b.append_link(&mut h, &name, &first).map_err(io);
            }
            self.links.insert((m.dev(), m.ino()), name.clone());
        }
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            self.pax(&pax)?;
            self.b.append_data(&mut h, &name, &[][..]).map_err(io)
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = std::fs::read_link(&full).map_err(io)?;
            self.pax(&pax)?;
            self.b.append_link(&mut h, &name, &target).map_err(io)
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(m.len());
            let f = File::open(&full).map_err(io)?;
            self.pax(&pax)?;
            self.b.append_data(&mut h, &name, f).map_err(io)
        } else {
            let (t, rdev) = if ft.is_fifo() {
                (tar::EntryType::Fifo, 0)
            } else if ft.is_char_device() {
                (tar::EntryType::Char, m.rdev())
            } else {
                (tar::EntryType::Block, m.rdev())
            };
            h.set_entry_type(t);
            h.set_device_major(rustix::fs::major(rdev)).map_err(io)?;
            h.set_device_minor(rustix::fs::minor(rdev)).map_err(io)?;
            self.pax(&pax)?;
            self.b.append_data(&mut h, &name, &[][..]).map_err(io)
        }
    }

    fn pax(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let body = pax_body(records);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(body.len() as u64);
        h.set_path("././@PaxHeader")
            .map_err(|e| Error::backend("layer-tar", e.to_string()))?;
        h.set_cksum();
        self.b
            .append(&h, &body[..])
            .map_err(|e| Error::backend("layer-tar", e.to_string()))
    }

    /// Appends an OCI whiteout for `rel` (`dir/.wh.name`: `name` is removed from the
    /// layers below).
    ///
    /// # Errors
    /// `Backend` for IO errors; `InvalidInput` for an empty path.
    pub fn whiteout(&mut self, rel: &Path) -> Result<()> {
        let name = rel
            .file_name()
            .ok_or_else(|| Error::invalid("whiteout of the root"))?;
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name.as_bytes());
        let path = rel
            .parent()
            .unwrap_or(Path::new(""))
            .join(OsStr::from_bytes(&wh));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        self.b
            .append_data(&mut h, &path, &[][..])
            .map_err(|e| Error::backend("layer-tar", e.to_string()))
    }

    /// Appends the whole tree under `root`, the root directory first, then every entry in
    /// sorted order (parents before children); `skip` names top-level entries to leave
    /// out (such as `lost+found`).
    ///
    /// # Errors
    /// `Backend` for IO errors.
    pub fn append_tree(&mut self, root: &Path, skip: &[&str]) -> Result<()> {
        self.append(root, Path::new(""))?;
        let mut stack = vec![PathBuf::new()];
        while let Some(dir) = stack.pop() {
            let full = root.join(&dir);
            let mut names: Vec<_> = std::fs::read_dir(&full)
                .map_err(|e| io_error("read dir", &full, e))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| io_error("read dir", &full, e))?;
            names.sort();
            let mut subdirs = Vec::new();
            for n in names {
                if dir.as_os_str().is_empty() && skip.iter().any(|s| OsStr::new(s) == n) {
                    continue;
                }
                let rel = dir.join(&n);
                self.append(root, &rel)?;
                if std::fs::symlink_metadata(root.join(&rel))
                    .map_err(|e| io_error("stat", &root.join(&rel), e))?
                    .is_dir()
                {
                    subdirs.push(rel);
                }
            }
            // Depth first, in order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// Ends the archive and returns the writer.
    ///
    /// # Errors
    /// `Backend` for IO errors.
    pub fn finish(self) -> Result<W> {
        self.b
            .into_inner()
            .map_err(|e| Error::backend("layer-tar", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_formatted_for_pax() {
        assert_eq!(time_text(5, 0), "5");
        assert_eq!(time_text(5, 123), "5.000000123");
        assert_eq!(time_text(-2, 750_000_000), "-1.250000000");
    }
}
