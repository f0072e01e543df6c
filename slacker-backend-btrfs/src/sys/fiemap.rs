//! `FS_IOC_FIEMAP`: the extent map of a file.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsFd;

use linux_raw_sys::ioctl as k;
use rustix::ioctl::{Opcode, Updater, ioctl};

/// Extents fetched per ioctl call (the buffer is heap-allocated: 512 * 56 B = 28 KiB).
const BATCH: usize = 512;

/// `struct fiemap` from `<linux/fiemap.h>` without its flexible array member.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent` from `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// The ioctl argument: the header followed by room for [`BATCH`] extents, as the kernel
/// reads it (`fm_extent_count` tells it how many fit).
#[repr(C)]
struct FiemapRequest {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

// The layouts the kernel expects: FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap) encodes
// sizeof(struct fiemap) = 32; struct fiemap_extent is 56 bytes; the array follows the
// header directly.
const _: () = assert!(size_of::<FiemapHeader>() == super::ioc_size(k::FS_IOC_FIEMAP));
const _: () = assert!(size_of::<FiemapHeader>() == 32);
const _: () = assert!(size_of::<FiemapExtent>() == 56);
const _: () = assert!(offset_of!(FiemapRequest, extents) == 32);
const _: () = assert!(offset_of!(FiemapExtent, fe_flags) == 40);

/// One extent of a file, as FIEMAP reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Byte offset in the file.
    pub logical: u64,
    /// Byte address on the device (btrfs: in its logical address space); 0 when unknown.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    /// Referenced by more than one file or offset (`FIEMAP_EXTENT_SHARED`).
    pub fn shared(&self) -> bool {
        self.flags & k::FIEMAP_EXTENT_SHARED != 0
    }

    /// Stored inline in metadata: no physical address (`FIEMAP_EXTENT_DATA_INLINE`).
    pub fn inline(&self) -> bool {
        self.flags & k::FIEMAP_EXTENT_DATA_INLINE != 0
    }

    /// Location unknown: delayed allocation (`FIEMAP_EXTENT_UNKNOWN`/`_DELALLOC`).
    pub fn unknown(&self) -> bool {
        self.flags & (k::FIEMAP_EXTENT_UNKNOWN | k::FIEMAP_EXTENT_DELALLOC) != 0
    }

    /// Compressed: `physical` is the start of the compressed extent, not of this range
    /// (`FIEMAP_EXTENT_ENCODED`).
    pub fn encoded(&self) -> bool {
        self.flags & (k::FIEMAP_EXTENT_ENCODED | k::FIEMAP_EXTENT_DATA_ENCRYPTED) != 0
    }

    /// The device address of file byte `offset` (which must lie in this extent), when it
    /// is meaningful (not inline, unknown or encoded).
    pub fn physical_at(&self, offset: u64) -> Option<u64> {
        if self.inline() || self.unknown() || self.encoded() {
            None
        } else {
            Some(self.physical + (offset - self.logical))
        }
    }
}

/// `ioctl(fd, FS_IOC_FIEMAP, ...)` over bytes `0..len`: every extent, in file order,
/// fetched in batches. With `sync`, passes `FIEMAP_FLAG_SYNC` so the kernel writes back
/// dirty pages first: on btrfs a dirty overwrite of a shared extent is otherwise still
/// reported as the old, shared extent (measured on Linux 6.18).
///
/// See [FIEMAP](https://www.kernel.org/doc/html/latest/filesystems/fiemap.html) and
/// [`ioctl(2)`](https://man7.org/linux/man-pages/man2/ioctl.2.html).
///
/// # Errors
/// The ioctl's error (`EOPNOTSUPP` where FIEMAP is not implemented).
#[doc(alias = "FS_IOC_FIEMAP")]
#[doc(alias = "FIEMAP")]
pub(crate) fn fiemap(fd: impl AsFd, len: u64, sync: bool) -> io::Result<Vec<Extent>> {
    let fd = fd.as_fd();
    let mut out = Vec::new();
    let mut req = Box::new(FiemapRequest {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); BATCH],
    });
    let mut start = 0u64;
    let mut first = true;
    while start < len {
        req.header = FiemapHeader {
            fm_start: start,
            fm_length: len - start,
            fm_flags: if sync && first {
                k::FIEMAP_FLAG_SYNC
            } else {
                0
            },
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
        };
        first = false;
        // SAFETY: FS_IOC_FIEMAP reads a `struct fiemap` and writes at most
        // `fm_extent_count` (= BATCH) `struct fiemap_extent`s right after it; `req` is a
        // live, exclusively borrowed `#[repr(C)]` buffer of exactly that layout (asserted
        // above), and the opcode is the kernel's own constant.
        unsafe {
            let op = Updater::<{ k::FS_IOC_FIEMAP as Opcode }, FiemapRequest>::new(&mut req);
            ioctl(fd, op)?;
        }
        let n = (req.header.fm_mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &req.extents[..n] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
            last |= e.fe_flags & k::FIEMAP_EXTENT_LAST != 0;
        }
        let next = out.last().map_or(len, Extent::end);
        if last || next <= start {
            break;
        }
        start = next;
    }
    Ok(out)
}
