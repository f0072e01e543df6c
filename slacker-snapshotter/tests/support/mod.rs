//! Real components for the snapshotter's tests: a loop-mounted btrfs, the snapshotter
//! process, containerd's Go suite binary. Without root or a tool, tests print
//! `SKIPPED: <why>`; under `CI=true` they fail instead.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod tree;

pub use slacker_testkit::skip_or_fail;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            .unwrap_or(false)
    })
}

/// The path of `tool` on the usual directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(tool))
    .find(|p| p.exists())
}

/// Checks root and tools; `Some(why)` when something is missing.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, mounts)".into());
    }
    tools
        .iter()
        .find(|t| which(t).is_none())
        .map(|t| format!("{t} is not installed"))
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
            "{cmd:?} failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Unmounts everything under `dir` (innermost first) and detaches loop devices whose
/// backing file is under it.
pub fn unmount_under(dir: &Path) {
    let d = dir.to_string_lossy().into_owned();
    for _ in 0..2 {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut mps: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&d))
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            let _ = sh(Command::new("umount").arg(m));
        }
        if let Ok(out) = sh(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE", "-l"])) {
            for l in out.lines() {
                let mut it = l.split_whitespace();
                if let (Some(dev), Some(back)) = (it.next(), it.next())
                    && back.starts_with(&d)
                {
                    let _ = sh(Command::new("losetup").args(["-d", dev]));
                }
            }
        }
    }
}

/// A loop-mounted btrfs in a temporary directory; dropping it unmounts everything
/// under it.
pub struct Btrfs {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl Btrfs {
    pub fn new(size: &str) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("slk-snap-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let img = dir.path().join("img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        sh(Command::new("truncate").args(["-s", size]).arg(&img))?;
        sh(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&img))?;
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(Self { dir, mnt })
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

/// A running `slacker-snapshotter`; killed (SIGKILL) on drop.
pub struct Snapshotter {
    pub child: Child,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// Writes a configuration file for `backend` (a TOML `[backend]` body) under `dir`.
pub fn write_config(dir: &Path, backend: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "address = \"{}\"\nroot = \"{}\"\nvolume_bytes = 1073741824\n{extra}\n[backend]\n{backend}\n",
            dir.join("snapshotter.sock").display(),
            dir.join("root").display()
        ),
    )
    .unwrap();
    cfg
}

impl Snapshotter {
    /// Starts the binary on `config` and waits for its socket.
    pub fn start(config: &Path) -> Self {
        let dir = config.parent().unwrap();
        let socket = dir.join("snapshotter.sock");
        let log = dir.join("snapshotter.log");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_slacker-snapshotter"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("slacker-snapshotter starts");
        let mut s = Self {
            child,
            socket,
            config: config.to_owned(),
            log,
        };
        let t = Instant::now();
        while !s.socket.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "slacker-snapshotter exited ({st}): {}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no socket after 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// SIGKILLs the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where built artefacts are cached across runs (`$SLACKER_CACHE`, default
/// `/var/cache/slacker`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SLACKER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/slacker"))
}

/// Builds containerd's snapshotter suite (GOPATH mode) once per content of
/// `suite_test.go` and returns the binary.
pub fn containerd_suite() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("containerd-suite/suite_test.go");
    let code = std::fs::read(&src).map_err(|e| e.to_string())?;
    let tag = blake3::hash(&code).to_hex()[..16].to_owned();
    let out = cache_dir().join(format!("containerd-suite-{tag}.test"));
    if out.exists() {
        return Ok(out);
    }
    if which("go").is_none() {
        return Err("go is not installed (apt: golang-go)".into());
    }
    let testsuite =
        Path::new("/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite");
    if !testsuite.exists() {
        return Err("containerd's Go sources are not installed (apt: golang-github-containerd-containerd-dev)".into());
    }
    let gp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pkg = gp.path().join("src/suite");
    std::fs::create_dir_all(&pkg).map_err(|e| e.to_string())?;
    std::fs::copy(&src, pkg.join("suite_test.go")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(cache_dir()).map_err(|e| e.to_string())?;
    let tmp = out.with_extension("partial");
    sh(Command::new("go")
        .args(["test", "-c", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&pkg)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gp.path().display()),
        )
        .env("GOCACHE", gp.path().join("cache"))
        .env("GOFLAGS", ""))?;
    std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    Ok(out)
}
