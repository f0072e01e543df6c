//! The traditional layer format: a tar of the image tree, gzip -6 compressed (what `docker push`
//! uploads), and its inverse (what `docker pull` does after downloading).
//!
//! Regular files, directories, symlinks and hard links (as link entries) are archived with
//! their mode, owner and mtime. Device nodes, fifos and sockets are skipped and counted, as
//! image layers do not carry them: the runtime provides `/dev`. Extended attributes are not
//! archived.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use tar::{EntryType, Header, HeaderMode};

use crate::error::{Context, Result};
use crate::tree;

/// The gzip level of `docker push` and of `gzip -6`.
pub const GZIP_LEVEL: u32 = 6;

/// Sizes seen while packing or unpacking.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TarStats {
    /// Archive entries.
    pub entries: u64,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
    /// Bytes of the gzip stream.
    pub gz_bytes: u64,
    /// Entries skipped (device nodes, fifos, sockets).
    pub skipped_special: u64,
    /// Regular files skipped because they could not be opened (only when not root, e.g.
    /// `/etc/shadow`); a complete layer has 0.
    #[serde(default)]
    pub skipped_unreadable: u64,
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// Archive `root` into any writer (tar, no compression). Returns entries and skipped counts.
pub fn write_tar<W: Write>(root: &Path, out: W) -> Result<(W, TarStats)> {
    let entries = tree::walk(root)?;
    let mut b = tar::Builder::new(out);
    let mut first_name: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut st = TarStats::default();
    for e in &entries {
        let ft = e.meta.file_type();
        let mut h = Header::new_gnu();
        h.set_metadata_in_mode(&e.meta, HeaderMode::Complete);
        let path = root.join(&e.rel);
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &e.rel, io::empty())?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            h.set_entry_type(EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &e.rel, &target)?;
        } else if ft.is_file() {
            let key = (e.meta.dev(), e.meta.ino());
            if e.meta.nlink() > 1
                && let Some(first) = first_name.get(&key)
            {
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &e.rel, first)?;
            } else {
                if e.meta.nlink() > 1 {
                    first_name.insert(key, e.rel.clone());
                }
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    // Root-only files in an image tree when running without root: skip and count.
                    Err(e)
                        if e.kind() == io::ErrorKind::PermissionDenied
                            && !crate::sys::is_root() =>
                    {
                        st.skipped_unreadable += 1;
                        continue;
                    }
                    Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
                };
                b.append_data(&mut h, &e.rel, f)
                    .with_context(|| format!("archiving {}", path.display()))?;
            }
        } else {
            st.skipped_special += 1;
            continue;
        }
        st.entries += 1;
    }
    Ok((b.into_inner()?, st))
}

/// `tar c root | gzip -6` into memory.
pub fn pack_gz(root: &Path) -> Result<(Vec<u8>, TarStats)> {
    let enc = GzEncoder::new(Vec::with_capacity(64 << 20), Compression::new(GZIP_LEVEL));
    let (counting, st) = write_tar(root, Counting { inner: enc, n: 0 })?;
    let tar_bytes = counting.n;
    let gz = counting.inner.finish()?;
    let gz_bytes = gz.len() as u64;
    Ok((
        gz,
        TarStats {
            tar_bytes,
            gz_bytes,
            ..st
        },
    ))
}

/// Size of `tar c root | gzip -6` without keeping the output (for the dedup analysis).
pub fn gz_size(root: &Path) -> Result<TarStats> {
    let enc = GzEncoder::new(
        Counting {
            inner: io::sink(),
            n: 0,
        },
        Compression::new(GZIP_LEVEL),
    );
    let (counting, st) = write_tar(root, Counting { inner: enc, n: 0 })?;
    let tar_bytes = counting.n;
    let gz = counting.inner.finish()?;
    Ok(TarStats {
        tar_bytes,
        gz_bytes: gz.n,
        ..st
    })
}

/// `gunzip | tar x -C dst` with permissions and mtimes preserved, and owners too when root.
pub fn unpack_gz(gz: &[u8], dst: &Path) -> Result<TarStats> {
    std::fs::create_dir_all(dst)?;
    let mut raw = Counting { inner: gz, n: 0 };
    let mut tar_count = Counting {
        inner: GzDecoder::new(&mut raw),
        n: 0,
    };
    let mut a = tar::Archive::new(&mut tar_count);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(crate::sys::is_root());
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a.set_unpack_xattrs(false);
    let mut entries = 0;
    for e in a.entries()? {
        let mut e = e?;
        e.unpack_in(dst)
            .with_context(|| format!("unpacking into {}", dst.display()))?;
        entries += 1;
    }
    // `a` borrows `tar_count`; it is not used past this point.
    // Drain the tar end-of-archive padding so the counts cover the whole stream.
    io::copy(&mut tar_count, &mut io::sink())?;
    Ok(TarStats {
        entries,
        tar_bytes: tar_count.n,
        gz_bytes: raw.n,
        ..TarStats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = std::env::temp_dir().join(format!("hb-tar-src-{}", std::process::id()));
        let dst = std::env::temp_dir().join(format!("hb-tar-dst-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(src.join("usr/bin")).unwrap();
        std::fs::write(src.join("usr/bin/a"), b"hello".repeat(1000)).unwrap();
        std::fs::set_permissions(
            src.join("usr/bin/a"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(src.join("usr/bin/a"), src.join("usr/bin/b")).unwrap();
        std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
        let (gz, st) = pack_gz(&src).unwrap();
        assert_eq!(st.entries, 5);
        assert!(st.gz_bytes < st.tar_bytes);
        assert_eq!(gz_size(&src).unwrap(), st);
        let un = unpack_gz(&gz, &dst).unwrap();
        assert_eq!(un.entries, 5);
        assert_eq!(un.tar_bytes, st.tar_bytes);
        assert_eq!(un.gz_bytes, st.gz_bytes);
        assert_eq!(
            std::fs::read(dst.join("usr/bin/b")).unwrap(),
            b"hello".repeat(1000)
        );
        let m = std::fs::metadata(dst.join("usr/bin/a")).unwrap();
        assert_eq!(m.nlink(), 2);
        if crate::sys::is_root() {
            assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
        }
        assert_eq!(
            std::fs::read_link(dst.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_dir_all(&dst).unwrap();
    }
}
