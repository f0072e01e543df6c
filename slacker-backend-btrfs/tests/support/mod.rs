//! Finding or making a btrfs for the tests.
//!
//! - `SLACKER_BTRFS_ROOT=<dir on btrfs>`: the tests make their directories under it.
//! - Otherwise, as root with `mkfs.btrfs`: once per test binary, a sparse 8 GiB image
//!   `truncate`d, `mkfs.btrfs -q`'d and `mount -o loop`ed under `/tmp/slacker-btrfs-<pid>-<n>/`.
//!   A detached watcher process unmounts it and deletes the image once the test binary
//!   exits; should the watcher die too, the next run unmounts and deletes leftovers
//!   whose pid is gone.
//! - Otherwise: `SKIPPED: <why>`, or a panic under `CI=true` ([`skip_or_fail`]).
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use async_trait::async_trait;
use slacker_backend_btrfs::{BtrfsBackend, BtrfsBuilder, BtrfsConfig};
use slacker_testkit::{Harness, skip_or_fail};

/// The environment variable naming a directory on btrfs to use instead of a loop mount.
pub const ENV_ROOT: &str = "SLACKER_BTRFS_ROOT";
const PREFIX: &str = "slacker-btrfs-";
const BTRFS_MAGIC: u64 = 0x9123_683e;

/// Whether `p` is on btrfs.
pub fn is_btrfs(p: &Path) -> bool {
    rustix::fs::statfs(p).is_ok_and(|s| (s.f_type as u64 & 0xffff_ffff) == BTRFS_MAGIC)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            .unwrap_or(false)
    })
}

/// Whether `tool` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs a command, returning stdout or a message with stderr.
pub fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?} could not run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&p)))
}

fn unmount(mnt: &Path) {
    if mounted(mnt) && sh(Command::new("umount").arg(mnt)).is_err() {
        let _ = sh(Command::new("umount").arg("-l").arg(mnt));
    }
}

/// Unmounts and deletes `/tmp/slacker-btrfs-<pid>-*` left by test processes that are gone.
fn clean_stale() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        unmount(&e.path().join("mnt"));
        if !mounted(&e.path().join("mnt")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A loop-mounted btrfs made from a sparse image.
#[derive(Debug)]
pub struct Mounted {
    /// `/tmp/slacker-btrfs-<pid>-<n>`: holds `img` and `mnt`.
    pub dir: PathBuf,
    /// The mount point.
    pub mnt: PathBuf,
}

impl Mounted {
    /// Makes a `size` (for `truncate -s`) btrfs and mounts it. A watcher unmounts it when
    /// this process exits; dropping the value unmounts it earlier.
    pub fn new(size: &str) -> Result<Self, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let (img, mnt) = (dir.join("img"), dir.join("mnt"));
        std::fs::create_dir_all(&mnt).map_err(|e| format!("mkdir {}: {e}", mnt.display()))?;
        let made = (|| {
            sh(Command::new("truncate").args(["-s", size]).arg(&img))?;
            sh(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&img))?;
            sh(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))?;
            Ok::<_, String>(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        // Detached watcher: when this process is gone, unmount and delete.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             umount '{m}' 2>/dev/null || umount -l '{m}' 2>/dev/null; rm -rf '{d}'",
            pid = std::process::id(),
            m = mnt.display(),
            d = dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        Ok(Self { dir, mnt })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount(&self.mnt);
        if !mounted(&self.mnt) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Why this machine cannot make a btrfs, if it cannot.
pub fn cannot_mount() -> Option<String> {
    if !is_root() {
        return Some(format!(
            "not root, so no loop-mounted btrfs can be made; set {ENV_ROOT} to a directory on btrfs"
        ));
    }
    for tool in ["mkfs.btrfs", "truncate", "mount", "umount"] {
        if !have(tool) {
            return Some(format!("{tool} is not installed (apt: btrfs-progs, mount)"));
        }
    }
    None
}

/// A directory on btrfs for this test binary (made once), or `None` after printing
/// `SKIPPED` (panics under `CI=true`).
pub fn base() -> Option<PathBuf> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BASE.get_or_init(|| {
        if let Some(root) = std::env::var_os(ENV_ROOT) {
            let root = PathBuf::from(root);
            return if is_btrfs(&root) {
                Ok(root)
            } else {
                Err(format!(
                    "{ENV_ROOT}={} is not a directory on btrfs",
                    root.display()
                ))
            };
        }
        if let Some(why) = cannot_mount() {
            return Err(why);
        }
        clean_stale();
        // Leaked on purpose: the watcher unmounts it when the process exits.
        let m = std::mem::ManuallyDrop::new(Mounted::new("8G")?);
        Ok(m.mnt.clone())
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(why) => skip_or_fail(why),
    }
}

/// A fresh, empty directory on the test btrfs (deleted when the value is dropped).
pub fn fresh_dir() -> Option<tempfile::TempDir> {
    let base = base()?;
    Some(
        tempfile::Builder::new()
            .prefix("t-")
            .tempdir_in(base)
            .expect("temp dir on btrfs"),
    )
}

/// Builds a backend on `root` through the same parsing path users take (JSON config).
pub fn open(root: &Path) -> BtrfsBackend {
    let json = serde_json::json!({ "root": root });
    let config: BtrfsConfig = serde_json::from_value(json).expect("config parses");
    BtrfsBuilder::from_config(config)
        .build()
        .expect("build btrfs backend")
}

/// The conformance harness: every `fresh()` is a new directory; `reopen` builds again on
/// the same directory.
#[derive(Debug)]
pub struct BtrfsHarness {
    base: PathBuf,
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

#[async_trait]
impl Harness for BtrfsHarness {
    type Backend = BtrfsBackend;

    async fn fresh(&self) -> BtrfsBackend {
        let dir = tempfile::Builder::new()
            .prefix("h-")
            .tempdir_in(&self.base)
            .expect("temp dir on btrfs");
        let b = open(dir.path());
        self.dirs.lock().unwrap().push(dir);
        b
    }

    /// FIEMAP reports extents in whole pages: a write to one 512-byte block shows the
    /// 4 KiB page around it as diverged.
    fn diverged_granule(&self) -> u64 {
        4096
    }

    async fn reopen(&self, backend: BtrfsBackend) -> BtrfsBackend {
        let root = backend.root().to_path_buf();
        drop(backend);
        open(&root)
    }
}

/// The harness, or `None` (after `SKIPPED`) without a btrfs.
pub fn harness() -> Option<BtrfsHarness> {
    Some(BtrfsHarness {
        base: base()?,
        dirs: Mutex::new(Vec::new()),
    })
}
