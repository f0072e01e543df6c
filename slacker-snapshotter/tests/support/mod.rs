//! Real components for the snapshotter's tests: a loop-mounted btrfs, a registry, the
//! snapshotter process and containerd (both through the crate's `harness`, which
//! HelloBench's `containerd` paths share), containerd's Go suite binary. Without root or a tool, tests print
//! `SKIPPED: <why>`; under `CI=true` they fail instead.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use slacker_oci::LocalRegistry;

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
    harness::run(cmd).map_err(|e| e.to_string())
}

pub use slacker_snapshotter::harness::{self, Containerd, keeper_pids, unmount_under};

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

/// A running `slacker-snapshotter` (this crate's binary); killed (SIGKILL) on drop.
pub type Snapshotter = harness::SnapshotterProcess;

/// Writes a configuration file for `backend` (a TOML `[backend]` body) under `dir`.
pub fn write_config(dir: &Path, backend: &str, extra: &str) -> PathBuf {
    harness::write_config(dir, backend, extra).expect("the snapshotter's config is written")
}

/// Starts this crate's `slacker-snapshotter` on `config` and waits for its socket.
pub fn snapshotter(config: &Path) -> Snapshotter {
    Snapshotter::start(Path::new(env!("CARGO_BIN_EXE_slacker-snapshotter")), config)
        .unwrap_or_else(|e| panic!("slacker-snapshotter: {e}"))
}

/// Starts a containerd under `dir` with the snapshotter at `snapshotter_sock` as the
/// proxy plugin `slacker`; `ctr` calls use `namespace`.
pub fn containerd(dir: &Path, snapshotter_sock: &Path, namespace: &str) -> Containerd {
    Containerd::start(dir, &[("slacker", snapshotter_sock)], namespace)
        .unwrap_or_else(|e| panic!("containerd: {e}"))
}

/// A gRPC client of the snapshots API on the unix socket `sock`, retrying the
/// connection for up to 5 s (a restarted snapshotter takes a moment to listen).
pub async fn connect(sock: PathBuf) -> SnapshotsClient<Channel> {
    let mut last = None;
    for _ in 0..50 {
        let s = sock.clone();
        match Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(s.clone())
            }))
            .await
        {
            Ok(ch) => return SnapshotsClient::new(ch),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection to {}: {last:?}", sock.display());
}

/// The knfsd VM's address (`SLACKER_NFS_ADDR`), or `None` after `SKIPPED` (a failure
/// under `CI=true`).
pub fn nfs_addr() -> Option<String> {
    let addr = std::env::var("SLACKER_NFS_ADDR")
        .ok()
        .filter(|a| !a.is_empty());
    if addr.is_none() {
        skip_or_fail::<()>("SLACKER_NFS_ADDR is not set (the knfsd VM of .ci/test)");
    }
    addr
}

/// A registry (Debian's docker-registry on loopback), or `None` after `SKIPPED`.
pub fn registry() -> Option<LocalRegistry> {
    match LocalRegistry::start() {
        Ok(r) => Some(r),
        Err(e) => {
            skip_or_fail::<()>(format!("no registry: {e}"));
            None
        }
    }
}

/// A loop-mounted btrfs of `size` with two directories on it: `run` (configs, sockets,
/// containerd, scratch trees) and `data` (the storage the backend uses); or `None` after
/// `SKIPPED`.
pub fn btrfs_run(size: &str) -> Option<(Btrfs, PathBuf, PathBuf)> {
    let fs = match Btrfs::new(size) {
        Ok(fs) => fs,
        Err(why) => {
            skip_or_fail::<()>(format!("no btrfs: {why}"));
            return None;
        }
    };
    let dir = fs.dir.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let data = fs.mnt.join("data");
    std::fs::create_dir(&data).unwrap();
    Some((fs, dir, data))
}

/// The tests' tokio runtime (two workers, like the machine CI runs on).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
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
    // A name of this build's own: the btrfs and NFS suites run at once and, on an empty
    // cache, both build it; with one shared `.partial` name the second rename found it
    // gone (ENOENT, a failed CI run on a fresh machine). Both builds are the same binary,
    // so whichever rename lands last is as good as the first.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("containerd-suite-{tag}."))
        .suffix(".partial")
        .tempfile_in(cache_dir())
        .map_err(|e| e.to_string())?
        .into_temp_path();
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
    tmp.persist(&out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The snapshotter's configuration switch for the keeper in the tests: `fd_keeper =
/// "off"` when `SLACKER_TEST_FD_KEEPER=off` (to show a keeper test failing without the
/// keeper), else nothing (the default, `auto`).
pub fn fd_keeper_extra() -> &'static str {
    if std::env::var("SLACKER_TEST_FD_KEEPER").as_deref() == Ok("off") {
        eprintln!("SLACKER_TEST_FD_KEEPER=off: the snapshotter runs without its fd keeper");
        "fd_keeper = \"off\""
    } else {
        ""
    }
}

/// How many descriptors of `/dev/fuse` process `pid` holds.
pub fn fuse_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/fuse")))
        .count()
}

/// Waits (at most `timeout`) until `f` holds.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Kills the keepers of `socket` (SIGKILL: their FUSE connections abort, so processes
/// waiting on them get `EIO` and the mounts can go) and unmounts everything under `dir`,
/// on drop: the clean-up of a keeper test, also when it fails.
pub struct KeeperCleanup {
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Drop for KeeperCleanup {
    fn drop(&mut self) {
        for pid in keeper_pids(&self.socket) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        unmount_under(&self.dir);
    }
}

/// Mount points under `dir` (this mount namespace) and loop devices backed by files
/// under it.
pub fn mounts_and_loops_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(|m| format!("mount {m}"))
        .collect();
    if let Ok(o) = sh(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE", "-l"])) {
        out.extend(
            o.lines()
                .filter(|l| l.contains(&d))
                .map(|l| format!("loop {l}")),
        );
    }
    out
}
