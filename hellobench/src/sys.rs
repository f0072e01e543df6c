//! Processes, mounts and small host helpers, with cleanup that also runs on failure.
//!
//! Every mount made through [`Mounts`] and every process group started through [`spawn_group`]
//! is also recorded in a process-wide list, so [`emergency_cleanup`] (called by `main` on
//! Ctrl-C and after errors) can kill what still runs and unmount what is still mounted,
//! innermost first, even when the owning future was dropped mid-way.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{Pid, Signal};

use crate::error::{Context, Error, Result};

static LIVE_MOUNTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static LIVE_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Is this process running as root (needed for mounts, chroot, debootstrap)?
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Find `name` on `PATH` (plus the sbin directories, which a non-root `PATH` often lacks).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The host's `busybox` if it is statically linked (an ELF file without a `PT_INTERP`
/// program header), so it runs in a chroot on its own.
pub fn static_busybox() -> Option<PathBuf> {
    let p = which("busybox")?;
    let b = std::fs::read(&p).ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // 64-bit little-endian ELF only (what this benchmark runs on).
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return None;
        }
    }
    Some(p)
}

/// Does the running kernel know filesystem type `fs` (from `/proc/filesystems`)?
pub fn kernel_has_fs(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|s| s.lines().any(|l| l.split_whitespace().last() == Some(fs)))
}

/// Start `cmd` in its own process group, recorded for [`emergency_cleanup`].
pub fn spawn_group(cmd: &mut Command) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    LIVE_GROUPS.lock().unwrap().push(child.id() as i32);
    Ok(child)
}

/// Forget a process group started by [`spawn_group`] once it has been reaped.
fn forget_group(pid: u32) {
    LIVE_GROUPS.lock().unwrap().retain(|p| *p != pid as i32);
}

/// Send `sig` to the whole process group led by `child` (servers may fork).
pub fn signal_group(child: &Child, sig: Signal) {
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// Stop a server started with [`spawn_group`]: SIGTERM to its group, SIGKILL after `grace`.
pub fn stop_group(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    signal_group(child, Signal::TERM);
    let deadline = Instant::now() + grace;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            signal_group(child, Signal::KILL);
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // Reap stragglers of the group too (a forked worker would keep the mounts busy).
    signal_group(child, Signal::KILL);
    forget_group(child.id());
    Ok(status)
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Run `cmd` to completion with stdout/stderr captured, killing its process group after
/// `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = spawn_group(cmd)?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let Some(status) = status else {
        stop_group(&mut child, Duration::from_secs(2))?;
        crate::bail!("{what}: timed out after {timeout:?}");
    };
    signal_group(&child, Signal::KILL); // background leftovers would keep pipes and mounts busy
    forget_group(child.id());
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Run `cmd`, failing with its stderr tail unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_timeout(cmd, timeout)?;
    if !out.status.success() {
        let tail: Vec<&str> = out.stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        crate::bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(out)
}

/// Mounts made by one owner, unmounted in reverse order by [`Mounts::unmount_all`] or on drop.
#[derive(Debug, Default)]
pub struct Mounts {
    stack: Vec<PathBuf>,
}

impl Mounts {
    /// No mounts yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, target: &Path) {
        self.stack.push(target.to_path_buf());
        LIVE_MOUNTS.lock().unwrap().push(target.to_path_buf());
    }

    /// `mount -t proc proc target`.
    pub fn proc(&mut self, target: &Path) -> Result<()> {
        rustix::mount::mount(
            "proc",
            target,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        )
        .with_context(|| format!("mount proc on {}", target.display()))?;
        self.push(target);
        Ok(())
    }

    /// `mount --bind src target` (not recursive).
    pub fn bind(&mut self, src: &Path, target: &Path) -> Result<()> {
        rustix::mount::mount_bind(src, target)
            .with_context(|| format!("bind {} on {}", src.display(), target.display()))?;
        self.push(target);
        Ok(())
    }

    /// A tmpfs of at most `size_mib` MiB.
    pub fn tmpfs(&mut self, target: &Path, size_mib: u64) -> Result<()> {
        let data = std::ffi::CString::new(format!("size={size_mib}m,mode=0755")).expect("no NUL");
        rustix::mount::mount(
            "tmpfs",
            target,
            "tmpfs",
            MountFlags::empty(),
            Some(data.as_c_str()),
        )
        .with_context(|| format!("mount tmpfs on {}", target.display()))?;
        self.push(target);
        Ok(())
    }

    /// An overlayfs with one lower directory.
    pub fn overlay(
        &mut self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<()> {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        if opts.contains(',')
            && [lower, upper, work]
                .iter()
                .any(|p| p.to_string_lossy().contains(','))
        {
            crate::bail!("overlay paths must not contain ',': {opts}");
        }
        let data = std::ffi::CString::new(opts).map_err(Error::msg)?;
        rustix::mount::mount(
            "overlay",
            target,
            "overlay",
            MountFlags::empty(),
            Some(data.as_c_str()),
        )
        .with_context(|| format!("mount overlay on {}", target.display()))?;
        self.push(target);
        Ok(())
    }

    /// Unmount everything, innermost (latest) first. Busy mounts are retried briefly, then
    /// detached lazily (`MNT_DETACH`) so nothing stays visible.
    pub fn unmount_all(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some(t) = self.stack.pop() {
            if let Err(e) = unmount_robust(&t) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            eprintln!("hellobench: warning: {e}");
        }
    }
}

fn unmount_robust(target: &Path) -> Result<()> {
    let forget = || LIVE_MOUNTS.lock().unwrap().retain(|p| p != target);
    for attempt in 0..20 {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => {
                forget();
                return Ok(());
            }
            Err(rustix::io::Errno::BUSY) if attempt < 19 => {
                std::thread::sleep(Duration::from_millis(25))
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {
                forget(); // not a mount point (any more)
                return Ok(());
            }
            Err(_) => break,
        }
    }
    // Still busy (or another error): detach it lazily so it is gone from the namespace now.
    let r = rustix::mount::unmount(target, UnmountFlags::DETACH);
    forget();
    match r {
        Ok(()) => {
            eprintln!(
                "hellobench: warning: {} was busy; detached lazily",
                target.display()
            );
            Ok(())
        }
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::msg(format!("unmount {}: {e}", target.display()))),
    }
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Unmount everything at or below `dir`, deepest first. Returns what was unmounted.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    let found = mounts_under(dir);
    for m in &found {
        let _ = unmount_robust(m);
    }
    found
}

/// Kill every process group still recorded, then unmount every mount still recorded and
/// anything left below `dirs`. Safe to call more than once.
pub fn emergency_cleanup(dirs: &[&Path]) {
    kill_groups();
    if !LIVE_MOUNTS.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(50)); // let the killed processes exit
    }
    let mut mounts: Vec<PathBuf> = std::mem::take(&mut *LIVE_MOUNTS.lock().unwrap());
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        if let Err(e) = unmount_robust(&m) {
            eprintln!("hellobench: cleanup: {e}");
        }
    }
    for d in dirs {
        for m in unmount_under(d) {
            eprintln!("hellobench: cleanup: unmounted leftover {}", m.display());
        }
    }
}

/// SIGKILL every process group started by [`spawn_group`] that has not been reaped yet.
pub fn kill_groups() {
    let groups: Vec<i32> = std::mem::take(&mut *LIVE_GROUPS.lock().unwrap());
    for g in groups {
        if let Some(pid) = Pid::from_raw(g) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a quiet host).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Remove a directory tree if it exists, refusing to cross into mounts below it.
pub fn remove_tree(dir: &Path) -> Result<()> {
    let m = mounts_under(dir);
    if !m.is_empty() {
        crate::bail!(
            "refusing to delete {}: {} is still mounted",
            dir.display(),
            m[0].display()
        );
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Flush dirty pages of every filesystem (`sync(2)`), between measurements.
pub fn sync_all() {
    rustix::fs::sync();
}

/// Seconds since the Unix epoch, and that instant as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> (u64, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    (secs, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn timeout_kills() {
        let t = Instant::now();
        let r = run_timeout(Command::new("sleep").arg("10"), Duration::from_millis(200));
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn date_format() {
        let (_, s) = now_utc();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20"));
    }
}
