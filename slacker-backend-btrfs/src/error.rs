//! The backend's own failures, mapped into [`slacker_core::Error`].

use std::io;
use std::path::{Path, PathBuf};

use slacker_core::Error;

use crate::config::SCHEME;

/// What went wrong inside the btrfs backend. Private: callers see [`slacker_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum BtrfsError {
    /// The root is not on btrfs.
    #[error(
        "{} is on a filesystem with magic {magic:#x}, not btrfs (0x9123683e): the btrfs backend needs its root on btrfs",
        path.display()
    )]
    NotBtrfs { path: PathBuf, magic: u64 },
    /// The root is missing or unusable.
    #[error("root directory {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    /// The filesystem is full.
    #[error(
        "no space left on the btrfs filesystem while {op} {} (ENOSPC): free space or grow the filesystem",
        path.display()
    )]
    NoSpace { op: &'static str, path: PathBuf },
    /// A reflink or dedupe was refused because the files are not on one btrfs.
    #[error("{op} {}: reflinks are not possible here ({source})", path.display())]
    NoReflink {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Any other IO failure (including injected crashes).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A metadata document is unreadable or inconsistent.
    #[error("metadata document {doc}: {reason}")]
    Metadata { doc: String, reason: String },
    /// Metadata names a data file that is gone or damaged.
    #[error("{what} data file {}: {reason}", path.display())]
    Damaged {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl BtrfsError {
    /// Classifies an IO error of operation `op` on `path`.
    pub(crate) fn io(op: &'static str, path: &Path, e: io::Error) -> Self {
        let path = path.to_path_buf();
        match e.raw_os_error() {
            Some(ENOSPC | EDQUOT) => Self::NoSpace { op, path },
            Some(EXDEV | EOPNOTSUPP | ENOTTY) => Self::NoReflink {
                op,
                path,
                source: e,
            },
            _ => Self::Io {
                op,
                path,
                source: e,
            },
        }
    }
}

const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
const EDQUOT: i32 = rustix::io::Errno::DQUOT.raw_os_error();
const EXDEV: i32 = rustix::io::Errno::XDEV.raw_os_error();
const EOPNOTSUPP: i32 = rustix::io::Errno::OPNOTSUPP.raw_os_error();
const ENOTTY: i32 = rustix::io::Errno::NOTTY.raw_os_error();

/// `map_err` helper: `.map_err(io_err("reading", &path))`.
pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| BtrfsError::io(op, path, e).into()
}

impl From<BtrfsError> for Error {
    fn from(e: BtrfsError) -> Self {
        match e {
            BtrfsError::NotBtrfs { .. }
            | BtrfsError::Root { .. }
            | BtrfsError::NoReflink { .. } => Error::Config(e.to_string()),
            BtrfsError::Metadata { .. } | BtrfsError::Damaged { .. } => {
                Error::Integrity(e.to_string())
            }
            BtrfsError::NoSpace { .. } | BtrfsError::Io { .. } => Error::backend(SCHEME, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::ErrorKind;

    #[test]
    fn errno_classes_map_to_kinds() {
        let p = Path::new("/x");
        let kind = |errno: i32| {
            Error::from(BtrfsError::io("t", p, io::Error::from_raw_os_error(errno))).kind()
        };
        assert_eq!(kind(28), ErrorKind::Backend); // ENOSPC
        assert_eq!(kind(18), ErrorKind::Config); // EXDEV
        assert_eq!(kind(95), ErrorKind::Config); // EOPNOTSUPP
        assert_eq!(kind(5), ErrorKind::Backend); // EIO
        let e = Error::from(BtrfsError::io(
            "writing",
            p,
            io::Error::from_raw_os_error(28),
        ));
        assert!(e.to_string().contains("no space left"), "{e}");
    }
}
