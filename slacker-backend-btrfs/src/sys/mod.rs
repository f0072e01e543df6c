//! The only place with `unsafe` code and raw ioctls: thin, documented wrappers around
//! the Linux calls the backend needs.
//!
//! | call | wrapper | unsafe? |
//! |---|---|---|
//! | `fstatfs(2)` magic | [`is_btrfs`] | no (rustix) |
//! | `ioctl(FICLONE)` | [`reflink`] | no (rustix) |
//! | `ioctl(FS_IOC_FIEMAP)` | [`fiemap`] | yes: a `#[repr(C)]` header with a trailing extent array |
//! | `ioctl(FIDEDUPERANGE)` | [`dedupe_range`] | yes: a `#[repr(C)]` header with a trailing info array |
//!
//! Every wrapper is blocking: callers run it on `tokio::task::spawn_blocking`.
#![allow(unsafe_code)]

mod dedupe;
mod fiemap;

use std::io;
use std::os::fd::AsFd;

pub(crate) use dedupe::{DedupeStatus, dedupe_range};
pub(crate) use fiemap::{Extent, fiemap};

/// `_IOC_SIZE(nr)`: the argument size the kernel encoded into an ioctl number, used to
/// assert our `#[repr(C)]` structs against the kernel headers at compile time.
const fn ioc_size(nr: u32) -> usize {
    ((nr >> 16) & 0x3fff) as usize
}

/// `fstatfs(fd).f_type == BTRFS_SUPER_MAGIC`: whether `fd` lives on btrfs.
///
/// Returns the filesystem magic when it is not btrfs.
///
/// See [`fstatfs(2)`](https://man7.org/linux/man-pages/man2/fstatfs.2.html).
///
/// # Errors
/// The `fstatfs` error.
#[doc(alias = "fstatfs")]
#[doc(alias = "BTRFS_SUPER_MAGIC")]
pub(crate) fn is_btrfs(fd: impl AsFd) -> io::Result<Result<(), u64>> {
    let st = rustix::fs::fstatfs(fd)?;
    // f_type is a signed word on some targets; the magic is the low 32 bits.
    let magic = (st.f_type as u64) & 0xffff_ffff;
    if magic == u64::from(linux_raw_sys::general::BTRFS_SUPER_MAGIC) {
        Ok(Ok(()))
    } else {
        Ok(Err(magic))
    }
}

/// `ioctl(dst, FICLONE, src)`: makes `dst` share all of `src`'s extents (a reflink); O(1)
/// in the data size when `src` is clean (the kernel first writes back `src`'s dirty
/// pages, so callers fsync first). `dst` must be open for writing; both on one btrfs.
///
/// See [`ioctl_ficlone(2)`](https://man7.org/linux/man-pages/man2/ioctl_ficlone.2.html).
///
/// # Errors
/// `EXDEV` across filesystems, `EOPNOTSUPP` where reflinks are not supported, `ENOSPC`
/// when metadata space runs out, `EINVAL` for unaligned ranges.
#[doc(alias = "FICLONE")]
pub(crate) fn reflink(dst: impl AsFd, src: impl AsFd) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioc_size_decodes_kernel_numbers() {
        assert_eq!(ioc_size(linux_raw_sys::ioctl::FS_IOC_FIEMAP), 32);
        assert_eq!(ioc_size(linux_raw_sys::ioctl::FIDEDUPERANGE), 24);
        assert_eq!(ioc_size(linux_raw_sys::ioctl::FICLONE), 4);
    }

    #[test]
    fn tmp_is_not_btrfs_or_is_reported() {
        // Whatever /proc is, it is never btrfs.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(is_btrfs(&f).unwrap().is_err());
    }
}
