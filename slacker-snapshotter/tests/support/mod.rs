//! Real components for the snapshotter's tests: a loop-mounted btrfs, a registry, the
//! snapshotter process and containerd (both through the crate's `harness`, which
//! HelloBench's `containerd` paths share), containerd's Go suite binary. Without root or a tool, tests print
//! `SKIPPED: <why>`; under `CI=true` they fail instead.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
pub use containerd_snapshots::tonic::{Code, Status};
use slacker_config::BackendConfig;
use slacker_core::layer::LayerStoreOptions;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, LayerStore};
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

/// The `[backend]` body of a configuration for the btrfs backend on `data`.
pub fn btrfs_toml(data: &Path) -> String {
    format!("kind = \"btrfs\"\npath = \"{}\"", data.display())
}

/// The `[backend]` body of a configuration for the NFS backend on `server`'s `dir`.
pub fn nfs_toml(server: &str, dir: &str) -> String {
    format!("kind = \"nfs\"\nserver = \"{server}\"\ndir = \"{dir}\"")
}

/// The volumes of the snapshotter (`ctrd-*`) in the btrfs backend's directory `data`,
/// sorted.
pub fn btrfs_volumes(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ctrd-"))
        .collect();
    v.sort();
    v
}

/// A test's place on the knfsd VM: a local temporary directory `slk-snap-<tag>-…` (the
/// run directory: configs, sockets, containerd) and a directory `<tag>-<pid>-<ms>` of its
/// own on the server (the storage).
pub struct NfsRun {
    pub tmp: tempfile::TempDir,
    pub server: String,
    pub dir: String,
}

impl NfsRun {
    /// The `[backend]` body of a configuration on this storage.
    pub fn toml(&self) -> String {
        nfs_toml(&self.server, &self.dir)
    }

    /// The same storage, as a program other than the snapshotter opens it.
    pub fn backend(&self) -> BackendConfig {
        BackendConfig::nfs(self.server.clone(), self.dir.clone())
    }

    /// The snapshotter's volumes on this storage (`ctrd-*` but its base volume), sorted.
    pub async fn volumes(&self) -> Vec<String> {
        let backend = self.backend().open().await.unwrap();
        let mut v: Vec<String> = backend
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.to_string())
            .filter(|v| v.starts_with("ctrd-") && v != "ctrd-base")
            .collect();
        v.sort();
        v
    }
}

/// An [`NfsRun`] (`/dev/fuse` and `SLACKER_NFS_ADDR` needed), or `None` after `SKIPPED`.
pub fn nfs_run(tag: &str) -> Option<NfsRun> {
    if !Path::new("/dev/fuse").exists() {
        skip_or_fail::<()>("/dev/fuse is missing");
        return None;
    }
    let server = nfs_addr()?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("slk-snap-{tag}-"))
        .tempdir()
        .unwrap();
    let dir = format!(
        "{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    Some(NfsRun { tmp, server, dir })
}

/// A builder's layer store on `backend` (its documents under `meta`, volumes of
/// `volume_size` bytes) imports `root` as a layer; returns the layer's reference tar
/// (what slacker-oci pushes as a slacker layer).
pub async fn reference_layer(
    backend: BackendConfig,
    meta: &Path,
    volume_size: u64,
    root: &Path,
) -> Vec<u8> {
    let backend = backend.open().await.unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(meta).unwrap());
    let store = LayerStore::open(
        backend,
        meta,
        LayerStoreOptions::new("builder").with_volume_size(volume_size),
    )
    .await
    .unwrap();
    store.import_dir("busybox", root).await.unwrap();
    store.diff("busybox").await.unwrap().tar
}

/// The value of the counter `name` the snapshotter's metrics endpoint at `addr` serves.
pub fn metric(addr: &str, name: &str) -> u64 {
    let body = sh(Command::new("curl").args(["-fsS", &format!("http://{addr}/metrics")])).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {body}"))
}

/// No `/dev/fuse` descriptor is left in the snapshotter (`snapshotter`, its pid) and,
/// within 5 s, none in the `keepers`.
pub fn assert_no_fuse_fds(snapshotter: u32, keepers: &[u32]) {
    assert_eq!(
        fuse_fds(snapshotter),
        0,
        "the snapshotter's /dev/fuse files"
    );
    for &k in keepers {
        assert!(
            wait_until(Duration::from_secs(5), || fuse_fds(k) == 0),
            "the keeper still holds {} /dev/fuse files",
            fuse_fds(k)
        );
    }
}

/// Once no snapshotter runs, the keeper of `socket` (holding nothing) exits.
pub fn assert_keeper_exits(socket: &Path) {
    assert!(
        wait_until(
            slacker_snapshotter::keeper::IDLE_EXIT + Duration::from_secs(5),
            || keeper_pids(socket).is_empty()
        ),
        "the keeper did not exit: {:?}",
        keeper_pids(socket)
    );
}

// The snapshots API over the socket, as containerd calls it: one request each, with the
// proxy plugin's name and no labels unless asked.

/// The proxy plugin's name, the `snapshotter` of every request.
pub const SN: &str = "slacker";

/// A client of the snapshots API ([`connect`]).
pub type Client = SnapshotsClient<Channel>;

/// The gRPC status code of a call's outcome (`Ok` for a success).
pub fn code<T>(r: Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Prepare `key` on `parent` (`""`: none) with `labels`; the mounts it hands out.
pub async fn prepare_labeled(
    c: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: SN.into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Prepare `key` on `parent` (`""`: none); the mounts it hands out.
pub async fn prepare(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
    prepare_labeled(c, key, parent, HashMap::new()).await
}

/// View `key` of `parent`; the mounts it hands out.
pub async fn view(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
    c.view(ViewSnapshotRequest {
        snapshotter: SN.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Commit the active snapshot `key` as `name`.
pub async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: SN.into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .map(drop)
}

/// Remove the snapshot `key`.
pub async fn remove(c: &mut Client, key: &str) -> Result<(), Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: SN.into(),
        key: key.into(),
    })
    .await
    .map(drop)
}

/// The mounts of the active or view snapshot `key`.
pub async fn mounts(c: &mut Client, key: &str) -> Result<Vec<Mount>, Status> {
    c.mounts(MountsRequest {
        snapshotter: SN.into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Every snapshot List (containerd's Walk) streams: name and kind (1 view, 2 active,
/// 3 committed), sorted.
pub async fn walk(c: &mut Client) -> Vec<(String, i32)> {
    use tokio_stream::StreamExt;
    let mut s = c
        .list(ListSnapshotsRequest {
            snapshotter: SN.into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.extend(r.unwrap().info.into_iter().map(|i| (i.name, i.kind)));
    }
    out.sort();
    out
}
