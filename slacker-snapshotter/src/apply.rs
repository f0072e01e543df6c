//! Merging an unpacked layer into a snapshot's tree.
//!
//! Layers of standard images are unpacked by containerd's own applier into a staging
//! directory the snapshotter handed out as an overlay `upperdir`, so the applier writes
//! whiteouts the way overlayfs spells them: a character device `0:0` for a deleted path
//! and the `trusted.overlay.opaque = y` xattr on a directory whose lower contents are
//! hidden. [`merge_upper`] replays such an upper directory onto the mounted ext4 of the
//! snapshot being built: whiteouts delete, opaque directories are emptied, everything
//! else is copied with `cp -a` (owners, modes incl. setuid, xattrs incl. file
//! capabilities — coreutils sets ownership before xattrs —, hard links, device nodes,
//! symlinks, timestamps).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

const OPAQUE: &str = "trusted.overlay.opaque";

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_opaque(dir: &Path) -> bool {
    let mut buf = [0u8; 8];
    matches!(rustix::fs::lgetxattr(dir, OPAQUE, &mut buf[..]), Ok(n) if &buf[..n] == b"y")
}

/// Applies whiteouts and type changes of `upper` to `target`, recursively, and removes
/// the whiteout markers from `upper` so that a plain copy finishes the merge.
fn prepare(upper: &Path, target: &Path) -> io::Result<()> {
    for e in fs::read_dir(upper)? {
        let e = e?;
        let src = e.path();
        let dst = target.join(e.file_name());
        let m = fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_char_device() && m.rdev() == 0 {
            remove_any(&dst)?;
            fs::remove_file(&src)?;
            continue;
        }
        let existing = fs::symlink_metadata(&dst).ok();
        if ft.is_dir() {
            match existing {
                Some(t) if !t.is_dir() => fs::remove_file(&dst)?,
                Some(_) if is_opaque(&src) => {
                    for c in fs::read_dir(&dst)? {
                        remove_any(&c?.path())?;
                    }
                }
                _ => {}
            }
            if is_opaque(&src) {
                rustix::fs::lremovexattr(&src, OPAQUE).map_err(io::Error::from)?;
            }
            if fs::symlink_metadata(&dst).is_ok_and(|t| t.is_dir()) {
                prepare(&src, &dst)?;
            }
        } else if existing.is_some_and(|t| t.is_dir()) {
            fs::remove_dir_all(&dst)?;
        }
    }
    Ok(())
}

/// Replays the overlay upper directory `upper` onto the tree at `target` (see the
/// [module docs](self)). `upper` is consumed: whiteout markers are removed from it.
///
/// # Errors
/// IO errors, or `cp` failing.
pub fn merge_upper(upper: &Path, target: &Path) -> io::Result<()> {
    prepare(upper, target)?;
    let src = upper.join(".");
    crate::host::run(
        "cp",
        &[
            "-a".as_ref(),
            "--remove-destination".as_ref(),
            src.as_os_str(),
            target.as_os_str(),
        ],
    )
}
