//! The storage slacker's paths run on: a btrfs filesystem that hellobench makes and owns.
//!
//! ```text
//! $SLACKER_CACHE/hellobench/btrfs/<pid>/
//!   btrfs.img    sparse file, mkfs.btrfs'd
//!   mnt/         mount -t btrfs -o loop btrfs.img mnt   (autoclear loop device)
//!     slacker/   the BtrfsBackend root: volumes/, snapshots/, meta/
//! ```
//!
//! One filesystem holds the layer stores of both "hosts" (the developer's builder and the
//! worker that pulls and runs), as local shared storage. [`BtrfsImage::create`] first sweeps
//! what earlier runs left behind (a `<pid>` directory whose process is gone: its loop
//! devices are detached, the mount is unmounted and the image deleted); dropping the value
//! unmounts the filesystem and deletes the image. `SLACKER_BTRFS_ROOT=<dir on btrfs>` uses
//! an existing btrfs instead (no root needed, nothing mounted).
//!
//! Loop devices are read from sysfs: [`loop_read_bytes`] gives the bytes a container's
//! filesystem read from its block device, [`detach_loops_under`] detaches devices whose
//! backing file lives below a directory (the cleanup of a run that died).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Context, Result};
use crate::sys;

/// The environment variable naming an existing directory on btrfs to use instead of a
/// loop-mounted image.
pub const ENV_BTRFS_ROOT: &str = "SLACKER_BTRFS_ROOT";
const BTRFS_MAGIC: u64 = 0x9123_683e;

/// Directories of this process's btrfs filesystems, for [`emergency_cleanup`].
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Whether `p` is on btrfs.
pub fn is_btrfs(p: &Path) -> bool {
    rustix::fs::statfs(p).is_ok_and(|s| (s.f_type as u64 & 0xffff_ffff) == BTRFS_MAGIC)
}

/// A btrfs for the slacker paths: loop-mounted from an image under the cache (owned), or an
/// existing directory named by [`ENV_BTRFS_ROOT`].
#[derive(Debug)]
pub struct BtrfsImage {
    /// `.../btrfs/<pid>` (owned) or `$SLACKER_BTRFS_ROOT/hellobench-<pid>`.
    dir: PathBuf,
    /// The mount point (owned images only).
    mnt: Option<PathBuf>,
    /// The backend root.
    root: PathBuf,
    /// The image size in bytes (owned images only).
    size: u64,
}

impl BtrfsImage {
    /// Makes (or, with [`ENV_BTRFS_ROOT`], finds) the filesystem: a sparse image of
    /// `size` bytes under `cache_dir/btrfs/<pid>/`, `mkfs.btrfs`'d and loop-mounted.
    /// Sweeps leftovers of dead runs first. Blocking.
    ///
    /// # Errors
    /// Not root, `mkfs.btrfs` or `mount` failing, or `SLACKER_BTRFS_ROOT` not on btrfs.
    pub fn create(cache_dir: &Path, size: u64) -> Result<Self> {
        if let Some(root) = std::env::var_os(ENV_BTRFS_ROOT).filter(|v| !v.is_empty()) {
            let base = PathBuf::from(root);
            if !is_btrfs(&base) {
                crate::bail!("{ENV_BTRFS_ROOT}={} is not on btrfs", base.display());
            }
            let dir = base.join(format!("hellobench-{}", std::process::id()));
            sys::remove_tree(&dir)?;
            let root = dir.join("slacker");
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating {}", root.display()))?;
            LIVE.lock().unwrap().push(dir.clone());
            return Ok(Self {
                dir,
                mnt: None,
                root,
                size: 0,
            });
        }
        let parent = cache_dir.join("btrfs");
        sweep_leftovers(&parent);
        let dir = parent.join(std::process::id().to_string());
        let (img, mnt) = (dir.join("btrfs.img"), dir.join("mnt"));
        if dir.exists() {
            cleanup_dir(&dir);
        }
        std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        LIVE.lock().unwrap().push(dir.clone());
        let this = Self {
            dir: dir.clone(),
            mnt: Some(mnt.clone()),
            root: mnt.join("slacker"),
            size,
        };
        let f =
            std::fs::File::create(&img).with_context(|| format!("creating {}", img.display()))?;
        f.set_len(size)?;
        drop(f);
        sys::run_ok(
            Command::new("mkfs.btrfs").arg("-q").arg("-f").arg(&img),
            Duration::from_secs(120),
        )
        .context("mkfs.btrfs (apt-get install -y btrfs-progs)")?;
        sys::run_ok(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop"])
                .arg(&img)
                .arg(&mnt),
            Duration::from_secs(60),
        )
        .context("mount -t btrfs -o loop")?;
        if !is_btrfs(&mnt) {
            crate::bail!("{} is not btrfs after mounting", mnt.display());
        }
        std::fs::create_dir_all(&this.root)?;
        crate::progress!(
            "storage: btrfs of {} (sparse) loop-mounted on {}",
            crate::report::fmt_bytes(size),
            mnt.display()
        );
        Ok(this)
    }

    /// The directory the btrfs backend is rooted at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The mount point, for an image this value owns.
    pub fn mount_point(&self) -> Option<&Path> {
        self.mnt.as_deref()
    }

    /// A description for the results' notes.
    pub fn describe(&self) -> String {
        match &self.mnt {
            Some(m) => format!(
                "btrfs on a {} sparse image, loop-mounted on {} (host filesystem underneath)",
                crate::report::fmt_bytes(self.size),
                m.display()
            ),
            None => format!("btrfs directory {} ({ENV_BTRFS_ROOT})", self.root.display()),
        }
    }
}

impl Drop for BtrfsImage {
    fn drop(&mut self) {
        cleanup_dir(&self.dir);
        LIVE.lock().unwrap().retain(|d| d != &self.dir);
    }
}

/// Detach loop devices backed by files below `mnt`, unmount `mnt` (lazily if still busy)
/// and delete `dir`, for an owned image; remove the directory for an external btrfs.
fn cleanup_dir(dir: &Path) {
    let mnt = dir.join("mnt");
    if mnt.exists() {
        for d in detach_loops_under(&mnt) {
            eprintln!("hellobench: storage: detached leftover {}", d.display());
        }
        sys::unmount_under(&mnt);
    }
    if let Err(e) = sys::remove_tree(dir) {
        eprintln!("hellobench: storage: leaving {}: {e}", dir.display());
    }
}

/// Unmount and delete `parent/<pid>` directories whose process is gone.
fn sweep_leftovers(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        crate::progress!(
            "storage: removing leftovers of run {pid} ({})",
            e.path().display()
        );
        // Containers of that run (default scratch directory) still mounted on its loops.
        sys::unmount_under(Path::new(&format!("/var/tmp/slacker-hellobench-{pid}")));
        cleanup_dir(&e.path());
    }
}

/// Tear down every btrfs this process made (after Ctrl-C or an error, once the containers
/// and their mounts are gone). Safe to call more than once.
pub fn emergency_cleanup() {
    let dirs: Vec<PathBuf> = std::mem::take(&mut *LIVE.lock().unwrap());
    for d in dirs {
        cleanup_dir(&d);
    }
}

/// `/dev/loopN` devices and their backing files (from `/sys/block/loop*/loop/backing_file`).
pub fn loop_devices() -> Vec<(PathBuf, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let f = f.trim_end_matches('\n').trim_end_matches(" (deleted)");
            out.push((PathBuf::from(format!("/dev/{name}")), PathBuf::from(f)));
        }
    }
    out
}

/// Detach (`losetup -d`) every loop device whose backing file is below `dir`. Returns the
/// devices detached.
pub fn detach_loops_under(dir: &Path) -> Vec<PathBuf> {
    let mut done = Vec::new();
    for (dev, file) in loop_devices() {
        if file.starts_with(dir) {
            // Whatever still uses the device (a lazily detached mount) keeps it until it
            // lets go; the kernel then frees it (autoclear).
            let _ = sys::run_timeout(
                Command::new("losetup").arg("-d").arg(&dev),
                Duration::from_secs(30),
            );
            done.push(dev);
        }
    }
    done
}

/// Bytes read from block device `dev` (e.g. `/dev/loop3`) since boot: sectors read (the
/// third field of `/sys/block/<dev>/stat`) × 512. A loop device keeps its counters across
/// detach and attach, so callers subtract a [`LoopReads`] taken before attaching.
///
/// # Errors
/// The device has no stat file.
pub fn loop_read_bytes(dev: &Path) -> Result<u64> {
    let name = dev
        .file_name()
        .ok_or_else(|| crate::error::Error::msg(format!("{} is not a device", dev.display())))?;
    let p = Path::new("/sys/block").join(name).join("stat");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let sectors: u64 = s
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| crate::error::Error::msg(format!("{}: unexpected {s:?}", p.display())))?;
    Ok(sectors * 512)
}

/// The read counters of every loop device at one moment, to subtract from a later reading
/// of the device a mount attaches in between (`losetup -f` picks any free one).
#[derive(Debug, Clone, Default)]
pub struct LoopReads(std::collections::HashMap<PathBuf, u64>);

impl LoopReads {
    /// Read every `/dev/loopN`'s counter now.
    pub fn now() -> Self {
        let mut m = std::collections::HashMap::new();
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("loop") {
                    let dev = PathBuf::from(format!("/dev/{name}"));
                    if let Ok(b) = loop_read_bytes(&dev) {
                        m.insert(dev, b);
                    }
                }
            }
        }
        Self(m)
    }

    /// Bytes `dev` read since [`now`](Self::now) (a device created since counts from 0).
    ///
    /// # Errors
    /// The device has no stat file.
    pub fn since(&self, dev: &Path) -> Result<u64> {
        let now = loop_read_bytes(dev)?;
        Ok(now.saturating_sub(self.0.get(dev).copied().unwrap_or(0)))
    }
}
