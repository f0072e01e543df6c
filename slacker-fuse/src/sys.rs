//! The system commands the data path runs (`losetup`, `mount`, `umount`, `chroot`) and
//! small `/proc` and fusectl helpers, through util-linux commands or plain file IO; the
//! one system call without a safe wrapper (`pidfd_getfd`, taking a descriptor from
//! another process) is here too, with its `// SAFETY:` note. All of it blocks.

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

/// `losetup -f --show --direct-io=on [-r] file`: attaches a free loop device.
pub(crate) fn losetup_attach(file: &Path, read_only: bool) -> io::Result<PathBuf> {
    let mut args: Vec<&OsStr> = vec!["-f".as_ref(), "--show".as_ref(), "--direct-io=on".as_ref()];
    if read_only {
        args.push("-r".as_ref());
    }
    args.push(file.as_os_str());
    let dev = run("losetup", args)?;
    let dev = dev.trim();
    if !dev.starts_with("/dev/loop") {
        return Err(io::Error::other(format!("losetup printed {dev:?}")));
    }
    Ok(PathBuf::from(dev))
}

/// `losetup -d dev`, retried a few times while busy.
pub(crate) fn losetup_detach(dev: &Path) -> io::Result<()> {
    let mut last = None;
    for attempt in 0..5 {
        match run("losetup", [OsStr::new("-d"), dev.as_os_str()]) {
            Ok(_) => return Ok(()),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20 << attempt));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// `mount -t ext4 [-o opts] dev dir` (always `-t ext4`: probing reads much more).
pub(crate) fn mount_ext4(dev: &Path, dir: &Path, options: &str) -> io::Result<()> {
    let mut args: Vec<&OsStr> = vec!["-t".as_ref(), "ext4".as_ref()];
    if !options.is_empty() {
        args.push("-o".as_ref());
        args.push(options.as_ref());
    }
    args.push(dev.as_os_str());
    args.push(dir.as_os_str());
    run("mount", args).map(|_| ())
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
