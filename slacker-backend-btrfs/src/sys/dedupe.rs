//! `FIDEDUPERANGE`: share identical ranges of two files.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd};

use linux_raw_sys::general::{file_dedupe_range, file_dedupe_range_info};
use linux_raw_sys::ioctl as k;
use rustix::ioctl::{Opcode, Updater, ioctl};

/// `FILE_DEDUPE_RANGE_SAME` from `<linux/fs.h>`.
const SAME: i32 = 0;
/// `FILE_DEDUPE_RANGE_DIFFERS` from `<linux/fs.h>`.
const DIFFERS: i32 = 1;

/// `struct file_dedupe_range_info` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DedupeInfo {
    dest_fd: i64,
    dest_offset: u64,
    bytes_deduped: u64,
    status: i32,
    reserved: u32,
}

/// `struct file_dedupe_range` with room for exactly one destination.
#[repr(C)]
#[derive(Debug, Default)]
struct DedupeOne {
    src_offset: u64,
    src_length: u64,
    dest_count: u16,
    reserved1: u16,
    reserved2: u32,
    info: [DedupeInfo; 1],
}

// FIDEDUPERANGE = _IOWR(0x94, 54, struct file_dedupe_range) encodes the 24-byte header;
// the info array follows it directly; both match the kernel's (bindgen) definitions.
const _: () = assert!(offset_of!(DedupeOne, info) == super::ioc_size(k::FIDEDUPERANGE));
const _: () = assert!(offset_of!(DedupeOne, info) == size_of::<file_dedupe_range>());
const _: () = assert!(size_of::<DedupeInfo>() == size_of::<file_dedupe_range_info>());
const _: () = assert!(size_of::<DedupeInfo>() == 32);

/// What the kernel did with one destination range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DedupeStatus {
    /// The ranges were identical; this many bytes now share storage.
    Same(u64),
    /// The ranges differ; nothing changed.
    Differs,
}

/// `ioctl(src, FIDEDUPERANGE, {src_offset, len, dest = (dst, dst_offset)})`: if the two
/// ranges hold identical bytes (the kernel compares them under lock), makes `dst` share
/// `src`'s extents. Offsets and `len` must be multiples of the filesystem block size
/// (except a range ending at EOF); btrfs caps one call at 16 MiB. `dst` may be open
/// read-only when the caller owns it.
///
/// See [`ioctl_fideduperange(2)`](https://man7.org/linux/man-pages/man2/ioctl_fideduperange.2.html).
///
/// # Errors
/// The ioctl's error, or the per-destination error the kernel reported in `status`.
#[doc(alias = "FIDEDUPERANGE")]
pub(crate) fn dedupe_range(
    src: impl AsFd,
    src_offset: u64,
    len: u64,
    dst: impl AsFd,
    dst_offset: u64,
) -> io::Result<DedupeStatus> {
    let mut arg = DedupeOne {
        src_offset,
        src_length: len,
        dest_count: 1,
        info: [DedupeInfo {
            dest_fd: i64::from(dst.as_fd().as_raw_fd()),
            dest_offset: dst_offset,
            ..DedupeInfo::default()
        }],
        ..DedupeOne::default()
    };
    // SAFETY: FIDEDUPERANGE reads the 24-byte header and `dest_count` (= 1) infos that
    // follow it, and writes `bytes_deduped`/`status` back into them; `arg` is a live,
    // exclusively borrowed `#[repr(C)]` value of that layout (asserted above), `dst` is
    // borrowed for the duration of the call so its fd stays open, and the opcode is the
    // kernel's own constant.
    unsafe {
        let op = Updater::<{ k::FIDEDUPERANGE as Opcode }, DedupeOne>::new(&mut arg);
        ioctl(src.as_fd(), op)?;
    }
    match arg.info[0].status {
        SAME => Ok(DedupeStatus::Same(arg.info[0].bytes_deduped)),
        DIFFERS => Ok(DedupeStatus::Differs),
        neg if neg < 0 => Err(io::Error::from_raw_os_error(-neg)),
        other => Err(io::Error::other(format!(
            "FIDEDUPERANGE returned unknown status {other}"
        ))),
    }
}
