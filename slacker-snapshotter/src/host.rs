//! What the snapshotter asks of the host: loop devices, mounts, freezing a mounted
//! filesystem, making the empty ext4 every parentless snapshot starts from. Everything
//! goes through util-linux and e2fsprogs commands (no `unsafe`); all of it blocks, so
//! callers run it on `spawn_blocking`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command; an error carries its stderr.
///
/// # Errors
/// IO errors starting it; `Other` with the command line and stderr when it fails.
pub fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd} {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
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

/// Loop devices (`/dev/loopN`) whose backing file is `file`.
pub fn loop_devices_of(file: &Path) -> Vec<PathBuf> {
    let want = fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(back) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let back = back.trim_end_matches('\n');
        let back = back.strip_suffix(" (deleted)").unwrap_or(back);
        if Path::new(back) == want || Path::new(back) == file {
            out.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    out
}

/// Mount points (in this process's mount namespace) whose source is one of `devices`.
pub fn mount_points_of(devices: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split(' ').nth(4).map(unescape_mountinfo);
        let src = right.split(' ').nth(1).map(unescape_mountinfo);
        if let (Some(mp), Some(src)) = (mp, src)
            && devices.iter().any(|d| Path::new(&src) == d)
        {
            out.push(PathBuf::from(mp));
        }
    }
    out
}

/// Whether something is mounted at `dir` (in this process's mount namespace). Works on a
/// dead FUSE mount too (it compares the canonical parent plus the name).
pub fn is_mount_point(dir: &Path) -> bool {
    let want = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(n)) => fs::canonicalize(p)
            .map(|p| p.join(n))
            .unwrap_or_else(|_| dir.to_owned()),
        _ => dir.to_owned(),
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mountinfo(m)) == want)
}

/// Makes every filesystem mounted from `file` (through a loop device) consistent on
/// disk: `fsfreeze -f` flushes data and the journal and leaves it clean, `-u` thaws.
/// A snapshot taken afterwards mounts without journal recovery, read-only too.
///
/// # Errors
/// When freezing or thawing fails.
pub fn quiesce(file: &Path) -> io::Result<()> {
    let devs = loop_devices_of(file);
    if devs.is_empty() {
        return Ok(());
    }
    for mp in mount_points_of(&devs) {
        run("fsfreeze", &["-f".as_ref(), mp.as_os_str()])?;
        run("fsfreeze", &["-u".as_ref(), mp.as_os_str()])?;
    }
    // The loop devices' own writes reach the file's page cache; the backend's snapshot
    // flushes those.
    Ok(())
}

/// Mounts the ext4 in `file` at `dir` read-write through a loop device that goes away
/// with the mount (`-o loop` sets autoclear).
///
/// # Errors
/// When `mount` fails.
pub fn mount_ext4(file: &Path, dir: &Path) -> io::Result<()> {
    run(
        "mount",
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop".as_ref(),
            file.as_os_str(),
            dir.as_os_str(),
        ],
    )
}

/// Mounts the ext4 in `file` (a volume: a clone this process owns) at `dir` through a
/// loop device that goes away with the mount, read-only if `read_only`.
///
/// A read-only mount is made read-write and then remounted read-only: a snapshot
/// committed while something else still mounted its volume is marked as needing journal
/// recovery (a thawed ext4 is), and ext4 replays a journal only through a writable
/// device; the replay writes to this volume's own clone, never to the snapshot.
///
/// # Errors
/// When `mount` fails.
pub fn mount_ext4_at(file: &Path, dir: &Path, read_only: bool) -> io::Result<()> {
    mount_ext4(file, dir)?;
    if read_only
        && let Err(e) = run(
            "mount",
            &["-o".as_ref(), "remount,ro".as_ref(), dir.as_os_str()],
        )
    {
        let _ = unmount(dir);
        return Err(e);
    }
    Ok(())
}

/// Detaches the mount at `dir` now; the filesystem goes (and its loop device with it)
/// once nothing uses it any more (`umount -l`).
///
/// # Errors
/// When `umount` fails.
pub fn unmount_lazy(dir: &Path) -> io::Result<()> {
    run("umount", &["-l".as_ref(), dir.as_os_str()])
}

/// Unmounts `dir`.
///
/// # Errors
/// When `umount` fails.
pub fn unmount(dir: &Path) -> io::Result<()> {
    run("umount", &[dir.as_os_str()])
}

/// Makes an empty ext4 in `file` (which exists and has its final size): root directory
/// `0755` owned by root, no `lost+found` (a snapshot's tree is exactly what was
/// unpacked into it), inode tables initialised now so that no clone rewrites them.
///
/// # Errors
/// When `mkfs.ext4` or `debugfs` fail.
pub fn make_empty_ext4(file: &Path) -> io::Result<()> {
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0".as_ref(),
            file.as_os_str(),
        ],
    )?;
    run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-R".as_ref(),
            "rmdir lost+found".as_ref(),
            file.as_os_str(),
        ],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
    }
}
