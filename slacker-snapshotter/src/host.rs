//! What the snapshotter asks of the host: loop devices, mounts, freezing a mounted
//! filesystem, making the empty ext4 every parentless snapshot starts from. Loop devices
//! are attached by [`slacker_fuse::LoopDevice`] and mounts made with `mount(2)`; the rest
//! goes through util-linux and e2fsprogs commands (no `unsafe` here); all of it blocks,
//! so callers run it on `spawn_blocking`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use slacker_fuse::{LoopDevice, LoopOptions};

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

/// The kernel's read-ahead of a block device, in KiB (`VM_READAHEAD_PAGES`).
pub const KERNEL_READ_AHEAD_KB: u32 = 128;

fn write_read_ahead(dev: &Path, kb: u32) -> io::Result<()> {
    let Some(name) = dev.file_name() else {
        return Ok(());
    };
    let attr = Path::new("/sys/block")
        .join(name)
        .join("queue/read_ahead_kb");
    fs::write(&attr, kb.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", attr.display())))
}

/// Sets the read-ahead (`queue/read_ahead_kb`) of every loop device over `file`.
///
/// A loop device keeps its read-ahead after it is detached, so whoever sets it puts the
/// kernel's value back before letting the device go ([`reset_read_ahead_at`]).
///
/// # Errors
/// When the sysfs attribute cannot be written.
pub fn set_read_ahead(file: &Path, kb: u32) -> io::Result<()> {
    for dev in loop_devices_of(file) {
        write_read_ahead(&dev, kb)?;
    }
    Ok(())
}

/// Puts the kernel's read-ahead back on the loop device mounted at `dir`, if one is.
///
/// # Errors
/// When the sysfs attribute cannot be written.
pub fn reset_read_ahead_at(dir: &Path) -> io::Result<()> {
    let want = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split(' ').nth(4).map(unescape_mountinfo);
        let src = right.split(' ').nth(1).map(unescape_mountinfo);
        if let (Some(mp), Some(src)) = (mp, src)
            && Path::new(&mp) == want
            && src.starts_with("/dev/loop")
        {
            write_read_ahead(Path::new(&src), KERNEL_READ_AHEAD_KB)?;
        }
    }
    Ok(())
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

/// Filesystems on the loop devices over a volume's file, frozen by [`freeze_all`] until
/// [`thaw`](Self::thaw) (or drop).
#[derive(Debug, Default)]
#[must_use = "a frozen filesystem blocks its writers until thawed"]
pub struct Frozen {
    /// Our mount of each frozen filesystem, and the open loop device that keeps the
    /// device bound to the file (autoclear waits for the last close).
    held: Vec<(PathBuf, fs::File)>,
    /// How many of them had no mount point in this process's mount namespace before
    /// ours (unmounted lazily and still referenced, or mounted in another namespace).
    detached: usize,
}

impl Frozen {
    /// How many filesystems are frozen.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// How many frozen filesystems had no mount point in this process's mount
    /// namespace (unmounted lazily and still referenced, or mounted in another one).
    pub fn detached(&self) -> usize {
        self.detached
    }

    /// Whether nothing is frozen.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Thaws every filesystem, unmounts our mounts of them and lets their loop devices
    /// go (an autoclear device whose filesystem is gone detaches now).
    ///
    /// # Errors
    /// The first thaw or unmount that failed (the others are still tried).
    pub fn thaw(mut self) -> io::Result<()> {
        self.release()
    }

    fn release(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        for (dir, device) in self.held.drain(..) {
            let r = release_quiesce_mount(&dir);
            drop(device);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("slacker-snapshotter: thawing: {e}");
        }
    }
}

/// Thaws (if frozen) and unmounts a mount [`freeze_all`] made, and removes its directory.
///
/// # Errors
/// When `umount` fails.
pub fn release_quiesce_mount(dir: &Path) -> io::Result<()> {
    if !is_mount_point(dir) {
        let _ = fs::remove_dir(dir);
        return Ok(());
    }
    // Fails harmlessly (EINVAL) when it is not frozen.
    let _ = run("fsfreeze", &["-u".as_ref(), dir.as_os_str()]);
    let r = unmount(dir).or_else(|_| unmount_lazy(dir));
    let _ = fs::remove_dir(dir);
    r
}

/// Freezes every filesystem that lives on a loop device over `file`, and keeps it frozen
/// until the returned guard is thawed: a snapshot of `file` taken meanwhile has every
/// write made so far and a clean ext4 (`fsfreeze` flushes data and the journal and
/// clears the needs-recovery flag; a thawed ext4 sets it again, and a snapshot needing
/// recovery cannot be mounted read-only through a read-only loop device).
///
/// Each filesystem is reached through a mount of its loop device at a directory of
/// `scratch` (`q<tag>-<device>`), not through the mount points containerd made: the
/// filesystem may be mounted in another mount namespace, or unmounted lazily
/// (`MNT_DETACH`, as containerd's snapshotter suite does) and still alive because
/// something references it. Such a filesystem has no mount point anywhere, and only its
/// teardown, whenever that comes, would write its delayed data. Mounting the device
/// again reaches the same superblock; if that superblock is being torn down, the mount
/// waits for the teardown to finish (so everything is written) and mounts afresh. The
/// loop device is held open meanwhile, so autoclear cannot detach it and give its number
/// to another file in between (it detaches at [`Frozen::thaw`] instead).
///
/// A read-only loop device is skipped (nothing on it can be dirty), as is a filesystem
/// mounted read-only (it cannot be mounted again read-write; it has nothing dirty).
///
/// # Errors
/// When a device's filesystem cannot be mounted or frozen (what was frozen is thawed).
pub fn freeze_all(file: &Path, scratch: &Path, tag: &str) -> io::Result<Frozen> {
    let mut frozen = Frozen::default();
    for dev in loop_devices_of(file) {
        let Ok(device) = fs::File::open(&dev) else {
            continue; // gone meanwhile
        };
        // Held open now: the binding can no longer change. Still over our file?
        if !loop_devices_of(file).contains(&dev) {
            continue;
        }
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read_only =
            fs::read_to_string(format!("/sys/block/{name}/ro")).is_ok_and(|r| r.trim() == "1");
        if read_only {
            continue;
        }
        let visible = has_mount_point(&dev);
        let dir = scratch.join(format!("q{tag}-{name}"));
        fs::create_dir_all(&dir)?;
        let mounted = run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                "rw".as_ref(),
                dev.as_os_str(),
                dir.as_os_str(),
            ],
        );
        if let Err(e) = mounted {
            // A filesystem mounted read-only refuses a read-write mount; it has nothing
            // to flush. Anything else is an error.
            let ro = run(
                "mount",
                &[
                    "-t".as_ref(),
                    "ext4".as_ref(),
                    "-o".as_ref(),
                    "ro".as_ref(),
                    dev.as_os_str(),
                    dir.as_os_str(),
                ],
            );
            let _ = release_quiesce_mount(&dir);
            match ro {
                Ok(_) => continue,
                Err(_) => return Err(e),
            }
        }
        if let Err(e) = run("fsfreeze", &["-f".as_ref(), dir.as_os_str()]) {
            let _ = release_quiesce_mount(&dir);
            return Err(e);
        }
        frozen.held.push((dir, device));
        frozen.detached += usize::from(!visible);
    }
    Ok(frozen)
}

/// Whether a filesystem from `device` is mounted somewhere in this process's mount
/// namespace.
fn has_mount_point(device: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split_once(" - ").map(|(_, r)| r))
        .filter_map(|r| r.split(' ').nth(1))
        .any(|src| Path::new(&unescape_mountinfo(src)) == device)
}

/// Mounts the ext4 in `file` at `dir` read-write through a loop device that goes away
/// with the mount (autoclear), attached with direct IO (see [`mount_ext4_at`]).
///
/// # Errors
/// When attaching or mounting fails.
pub fn mount_ext4(file: &Path, dir: &Path) -> io::Result<()> {
    mount_ext4_at(file, dir, false, 0)
}

/// Mounts the ext4 in `file` (a volume: a clone this process owns) at `dir` through a
/// loop device that goes away with the mount, read-only if `read_only`, with the
/// device's read-ahead set to `read_ahead_kb` first (0: the kernel's).
///
/// The device is attached from this process ([`LoopDevice`], `LOOP_CONFIGURE`) and the
/// filesystem mounted with `mount(2)`: no `mount` process (a few ms of a container's
/// Prepare). It does **direct IO** on `file`: a block is cached once, by the ext4 on the
/// device, not a second time in `file`'s page cache, and a cold read moves only what
/// ext4 asked for (over a buffered loop, btrfs's read-ahead on the file doubled the
/// bytes read from the disk; `BENCHMARKS.md`, "containerd + runc").
///
/// A read-only mount is made read-write and then remounted read-only: a snapshot
/// committed while something else still mounted its volume is marked as needing journal
/// recovery (a thawed ext4 is), and ext4 replays a journal only through a writable
/// device; the replay writes to this volume's own clone, never to the snapshot.
///
/// # Errors
/// When attaching or mounting fails (nothing is left attached or mounted then).
pub fn mount_ext4_at(
    file: &Path,
    dir: &Path,
    read_only: bool,
    read_ahead_kb: u32,
) -> io::Result<()> {
    use rustix::mount::{MountFlags, mount, mount_remount};
    let dev = LoopDevice::attach(file, &LoopOptions::default().with_autoclear(true))?;
    if read_ahead_kb > 0 {
        write_read_ahead(dev.path(), read_ahead_kb)?;
    }
    let mounted = mount(dev.path(), dir, "ext4", MountFlags::empty(), None).map_err(|e| {
        io::Error::other(format!(
            "mount {} on {}: {e}",
            dev.path().display(),
            dir.display()
        ))
    });
    if let Err(e) = mounted {
        // Never mounted: the device would keep the read-ahead for its next user.
        let _ = write_read_ahead(dev.path(), KERNEL_READ_AHEAD_KB);
        return Err(e);
    }
    // The mount holds the device now; autoclear detaches it when the mount goes.
    drop(dev);
    if read_only && let Err(e) = mount_remount(dir, MountFlags::RDONLY, "") {
        let _ = unmount(dir);
        return Err(io::Error::other(format!(
            "remount {} read-only: {e}",
            dir.display()
        )));
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
