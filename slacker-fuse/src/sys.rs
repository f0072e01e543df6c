//! The system commands the data path runs (`mount -t fusectl`, `umount`, `chroot`) and
//! small `/proc` and fusectl helpers, through util-linux commands or plain file IO; the
//! system calls without a safe wrapper (`pidfd_getfd`, taking a descriptor from another
//! process; the loop device ioctls `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`, `LOOP_CLR_FD`)
//! are here too, each with its `// SAFETY:` note. All of it blocks.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Runs `program args...`, returning stdout; a non-zero exit is an error carrying stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> io::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The minor number of a `st_dev` (glibc's `minor()`): for a FUSE mount, its connection
/// number.
pub(crate) fn device_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)
}

/// Aborts FUSE connection `n` through fusectl, mounting fusectl first if needed.
pub(crate) fn fuse_abort(n: u64) -> io::Result<()> {
    let dir = Path::new(FUSECTL).join(n.to_string());
    if !dir.exists() {
        if !is_mountpoint(Path::new(FUSECTL)) {
            run("mount", ["-t", "fusectl", "fusectl", FUSECTL])?;
        }
        if !dir.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no FUSE connection {}", dir.display()),
            ));
        }
    }
    std::fs::write(dir.join("abort"), "1")
}

/// Unescapes the octal escapes (`\040`) of a `/proc/self/mountinfo` path.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is a mount point of this mount namespace (per `/proc/self/mountinfo`).
pub(crate) fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canonical(path);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape(m)) == want)
}

fn canonical(path: &Path) -> PathBuf {
    // A dead FUSE mount fails canonicalize (ENOTCONN); canonicalize the parent instead.
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// `umount path`, retried a few times while busy (a process may just be exiting).
pub(crate) fn umount(path: &Path) -> io::Result<()> {
    let mut last = None;
    for attempt in 0..10 {
        match run("umount", [path]) {
            Ok(_) => return Ok(()),
            Err(e) => {
                if !is_mountpoint(path) {
                    return Ok(());
                }
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Runs `cmd` chrooted into `root`, with a minimal environment.
pub(crate) fn chroot(root: &Path, cmd: &[&str]) -> io::Result<Output> {
    let Some((first, rest)) = cmd.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    Command::new("chroot")
        .arg(root)
        .arg(first)
        .args(rest)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .stdin(Stdio::null())
        .output()
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`, Linux
/// 5.6+; needs ptrace rights over `pid`, which root has): the same open file, as if it
/// had been passed over a unix socket. Close-on-exec.
#[allow(unsafe_code)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn pidfd_getfd(pid: u32, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes descriptors and flags by value and touches no memory of
    // ours; pidfd stays open for the call.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor (close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

// ---- loop devices without util-linux (`LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`) ----------

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel's sizes (x86_64 and every other Linux ABI: no padding in either struct).
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// What [`loop_configure`] sets up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopFlags {
    pub(crate) read_only: bool,
    pub(crate) direct_io: bool,
    pub(crate) autoclear: bool,
    /// Logical block size in bytes (0: the kernel's default).
    pub(crate) block_size: u32,
}

/// Attaches a free loop device to `file` in one `LOOP_CONFIGURE` call (the way
/// util-linux's `losetup` does it on Linux 5.8+), with no process started: the device's
/// path and an open descriptor of it. With `autoclear` the kernel detaches the device
/// when its last opener closes it, so keep the descriptor until something else (a
/// mount) holds the device. A free device taken by another process between
/// `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` (`EBUSY`) is retried with the next one.
#[doc(alias = "LOOP_CONFIGURE")]
#[allow(unsafe_code)]
pub(crate) fn loop_configure(
    file: &Path,
    flags: LoopFlags,
) -> io::Result<(PathBuf, std::os::fd::OwnedFd)> {
    use std::os::fd::AsRawFd;
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(!flags.read_only)
        .open(file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/loop-control: {e}")))?;
    let mut lo_flags = 0;
    if flags.read_only {
        lo_flags |= LO_FLAGS_READ_ONLY;
    }
    if flags.autoclear {
        lo_flags |= LO_FLAGS_AUTOCLEAR;
    }
    if flags.direct_io {
        lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    let mut last = None;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and touches no memory of ours.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(!flags.read_only)
            .open(&path)
        {
            Ok(d) => d,
            Err(e) => {
                last = Some(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                continue;
            }
        };
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: flags.block_size,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags,
                lo_file_name: name_field(file),
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is
        // (`repr(C)`, sizes asserted above), and keeps no pointer to it; `backing` and
        // `dev` stay open for the call (the kernel takes its own reference to `backing`).
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r == 0 {
            return Ok((path, dev.into()));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "LOOP_CONFIGURE {} on {}: {e}",
                    path.display(),
                    file.display()
                ),
            ));
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
}

/// `LOOP_CLR_FD`: detaches the loop device `dev` is open on (at once when nothing else
/// holds it, else as soon as the last opener closes it).
#[doc(alias = "LOOP_CLR_FD")]
#[allow(unsafe_code)]
pub(crate) fn loop_clear(dev: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: LOOP_CLR_FD takes no argument and touches no memory of ours.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The backing file's name as `lo_file_name` shows it (`losetup -l`, sysfs keeps the
/// full path separately): the last 63 bytes, NUL-terminated.
fn name_field(file: &Path) -> [u8; 64] {
    use std::os::unix::ffi::OsStrExt;
    let b = file.as_os_str().as_bytes();
    let b = &b[b.len().saturating_sub(63)..];
    let mut out = [0u8; 64];
    out[..b.len()].copy_from_slice(b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_and_unescape() {
        // makedev(0, 53) and makedev(0, 300)
        assert_eq!(device_minor(53), 53);
        assert_eq!(device_minor((300 & 0xff) | ((300 & !0xff) << 12)), 300);
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
