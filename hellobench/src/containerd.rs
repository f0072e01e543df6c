//! The `containerd` pair: the same images pulled and run by a real runtime (containerd +
//! runc, driven with `ctr`), once as plain tar+gzip images on containerd's `overlayfs`
//! snapshotter (what a user has today) and once as slacker images on slacker-snapshotter.
//!
//! ```text
//!  containerd-overlayfs  push: tar + gzip -6 of the tree, one layer ─▶ registry
//!                        pull: ctr --debug images pull --snapshotter overlayfs (no progress
//!                              display; download, gunzip, untar into an overlayfs snapshot)
//!                        run:  ctr run --snapshotter overlayfs ... until the readiness rule
//!  containerd-slacker    prepare (untimed): import the tree as ext4 into a volume, clone it
//!                              (the developer's container)
//!                        push: LayerStore::diff (snapshot) ─▶ 2 KiB reference layer (plain
//!                              tar) ─▶ registry
//!                        pull: ctr --debug images pull --snapshotter slacker (2 KiB; Commit
//!                              records the referenced snapshot: no copy, no clone)
//!                        run:  ctr run --snapshotter slacker ... (Prepare = O(1) clone,
//!                              containerd mounts ext4 on a loop device over its file)
//!  both                  stop/clean (untimed): kill + rm the container, ctr images rm
//!                        --sync (containerd's GC drops content and snapshots)
//! ```
//!
//! One containerd serves both paths (its own root, state and socket, from
//! [`slacker_snapshotter::harness`], as the snapshotter's tests start it). The
//! snapshotter runs inside this process on its own tokio runtime and threads, sharing
//! the btrfs backend with the developer's layer store: on btrfs, one backend instance
//! owns the storage (a second process would not see snapshots pushed after it started),
//! so builder and worker share the storage here as they share an NFS server in the paper.
//! Its volumes are local files the kernel's loop device reads: the kernel path's
//! analogue (no lazy fetch over a link).
//!
//! The readiness rule runs as the container's process: `kind = command` is `ctr run` with
//! the rule's argv, ready when its stdout shows `expect`; `kind = serve` is `ctr run -d
//! --net-host` with the server's argv, ready when `127.0.0.1:{port}` answers. A rule's
//! files are bind-mounted read-only into the container (`ctr run --mount`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use slacker_backend_btrfs::BtrfsBuilder;
use slacker_core::{Backend, ErrorKind};
use slacker_oci::{ClientOptions, PushLayer, RegistryClient};
use slacker_snapshotter::harness::Containerd;
use slacker_snapshotter::{Config, SlackerSnapshotter};

use crate::bench::{self, Plan};
use crate::corpus::BuiltImage;
use crate::error::{Context, Error, Result};
use crate::path::{Path as BenchPath, Step};
use crate::preflight::Preflight;
use crate::report::Results;
use crate::slacker::Storage;
use crate::spec::{FileSpec, Readiness};
use crate::storage::{self, BtrfsImage};
use crate::sys;

/// The traditional side of the pair.
pub const OVERLAYFS: &str = "containerd-overlayfs";
/// The slacker side of the pair.
pub const SLACKER: &str = "containerd-slacker";
/// The snapshotter's name in containerd's configuration (`[proxy_plugins.slacker]`).
const PLUGIN: &str = "slacker";
/// The ctr namespace (runc's state directory is per namespace).
fn namespace() -> String {
    format!("hellobench{}", std::process::id())
}

/// Tools the pair needs besides what the other paths need.
const TOOLS: [&str; 3] = ["containerd", "ctr", "runc"];

/// Why the pair cannot run here, if it cannot.
pub fn missing(pf: &Preflight) -> Option<String> {
    if !pf.slacker_run {
        return Some("needs root, btrfs, losetup and ext4 (see the missing lines above)".into());
    }
    TOOLS
        .iter()
        .find(|t| sys::which(t).is_none())
        .map(|t| format!("{t} is missing (apt-get install -y containerd runc)"))
}

/// The snapshotter served inside this process, on its own runtime and threads.
struct InProcess {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    log: PathBuf,
}

impl InProcess {
    /// Serves a snapshotter rooted at `dir/root` on `dir/snapshotter.sock`, on `backend`
    /// (whose directory on btrfs is `path`). Blocking: waits for the socket.
    fn start(dir: &Path, path: &Path, backend: Arc<dyn Backend>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("snapshotter.sock");
        let log = dir.join("snapshotter.log");
        let config = Config::from_toml(&format!(
            "address = \"{}\"\nroot = \"{}\"\n[backend]\nkind = \"btrfs\"\npath = \"{}\"\n",
            socket.display(),
            dir.join("root").display(),
            path.display()
        ))
        .map_err(|e| Error::msg(format!("snapshotter config: {e}")))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
        let sock = socket.clone();
        let logf = log.clone();
        let thread = std::thread::Builder::new()
            .name("slacker-snapshotter".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("slacker-snapshotter")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let s = match SlackerSnapshotter::with_backend(config, backend).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let served = slacker_snapshotter::serve(s, &sock, async {
                        let _ = rx.await;
                    });
                    let _ = ready_tx.send(Ok(()));
                    if let Err(e) = served.await {
                        let _ = std::fs::write(&logf, format!("serve: {e}\n"));
                    }
                });
            })?;
        let this = Self {
            shutdown: Some(tx),
            thread: Some(thread),
            socket,
            log,
        };
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| Error::msg(format!("the snapshotter did not start: {e}")))?
            .map_err(|e| Error::msg(format!("the snapshotter did not start: {e}")))?;
        let t = Instant::now();
        while !this.socket.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                crate::bail!(
                    "the snapshotter made no socket at {} ({})",
                    this.socket.display(),
                    std::fs::read_to_string(&this.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(this)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-image state between phases.
#[derive(Default)]
struct State {
    reference: Option<String>,
    /// Layer blob bytes pushed (what a pull downloads).
    layer_bytes: u64,
    /// containerd-slacker: the developer's container (builder store).
    dev_layer: Option<String>,
    /// The running (serve) or exited (command) container.
    container: Option<String>,
    /// Host files bind-mounted into the container.
    files_dir: Option<PathBuf>,
    push_client: Option<RegistryClient>,
}

/// One side of the pair.
pub struct ContainerdPath {
    slacker: bool,
    ctrd: Arc<Containerd>,
    /// containerd-slacker: the developer's layer store and the storage the snapshotter
    /// serves.
    storage: Option<Arc<Storage>>,
    /// Where the snapshotter's volumes are (loop devices backed by files below it).
    volumes: Option<PathBuf>,
    registry: String,
    timeout: Duration,
    work: PathBuf,
    state: HashMap<String, State>,
    counter: u64,
    run_tag: String,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::from)?
}

/// Now, in nanoseconds since the Unix epoch: a step's start in the notes, to line it up
/// with containerd's debug log and the snapshotter's timing events (`SLACKER_TIMING`).
fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn ctr_err(e: std::io::Error) -> Error {
    Error::msg(e.to_string())
}

impl ContainerdPath {
    fn snapshotter(&self) -> &'static str {
        if self.slacker { PLUGIN } else { "overlayfs" }
    }

    fn st(&mut self, image: &BuiltImage) -> &mut State {
        self.state.entry(image.spec.name.clone()).or_default()
    }

    /// What this side does, for the results' notes.
    pub fn describe(&self) -> String {
        if self.slacker {
            format!(
                "{SLACKER}: push = LayerStore::diff (btrfs snapshot) + a 2 KiB reference layer pushed as a plain tar (+ config + manifest); pull = `ctr --debug images pull --snapshotter slacker` (progress display off) (the reference layer unpacks into a staging directory, Commit records the snapshot: no copy, no clone); run = `ctr run --snapshotter slacker` until the readiness rule holds (Prepare = an O(1) btrfs clone; containerd mounts ext4 on a loop device over the clone's file: the kernel path, storage local, no emulated link); slacker-snapshotter in process, on its own 2-thread runtime, sharing the btrfs backend with the developer's store; registry {}",
                self.registry
            )
        } else {
            format!(
                "{OVERLAYFS}: push = tar + gzip -6 of the tree as one layer (+ config + manifest); pull = `ctr --debug images pull --snapshotter overlayfs` (progress display off) (download, gunzip + untar into an overlayfs snapshot, on the host filesystem); run = `ctr run --snapshotter overlayfs` until the readiness rule holds; registry {}",
                self.registry
            )
        }
    }
}

/// Host files for a rule's `files`, and the `--mount` arguments that bind them.
fn bind_files(dir: &Path, files: &[FileSpec], port: u16) -> Result<Vec<String>> {
    let mut args = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
            crate::bail!("readiness file {:?} escapes the container", f.path);
        }
        std::fs::create_dir_all(dir)?;
        let host = dir.join(format!("file-{i}"));
        std::fs::write(&host, f.content.replace("{port}", &port.to_string()))?;
        args.push("--mount".into());
        args.push(format!(
            "type=bind,src={},dst={},options=rbind:ro",
            host.display(),
            f.path
        ));
    }
    Ok(args)
}

/// Watches, until finished, which loop devices have a backing file under a directory:
/// containerd attaches one when it mounts a container's ext4 and detaches it when the
/// task is deleted, which for a `command` rule happens right after it is ready.
struct LoopWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<PathBuf, PathBuf>>>,
}

impl LoopWatch {
    fn start(dir: PathBuf) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = HashMap::new();
            loop {
                for (dev, file) in storage::loop_devices() {
                    if file.starts_with(&dir) {
                        seen.insert(dev, file);
                    }
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The devices seen (device, backing file).
    fn finish(mut self) -> HashMap<PathBuf, PathBuf> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for LoopWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Spawns `cmd` (stdout piped) and waits until its stdout contains `expect`: the
/// process's exit status after that (or an error), and what it printed.
fn run_until(cmd: &mut Command, expect: &str, timeout: Duration) -> Result<(Duration, String)> {
    let t = Instant::now();
    let mut child = sys::spawn_group(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let mut out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    if tx.send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut got = Vec::new();
    let mut ready = None;
    while ready.is_none() {
        let left = timeout.saturating_sub(t.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(Some(b)) => {
                got.extend_from_slice(&b);
                if String::from_utf8_lossy(&got).contains(expect) {
                    ready = Some(t.elapsed());
                }
            }
            Ok(None) => break,
            Err(_) => {
                let _ = sys::stop_group(&mut child, Duration::from_secs(2));
                crate::bail!("{cmd:?}: no {expect:?} on stdout within {timeout:?}");
            }
        }
    }
    // ctr exits once the task has ended and been deleted.
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout + Duration::from_secs(10) {
            break sys::stop_group(&mut child, Duration::from_secs(2))?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    match ready {
        Some(d) if status.success() => Ok((d, text)),
        _ => crate::bail!(
            "not ready: {cmd:?} exited {status} with stdout {:?} (want {expect:?}); stderr: {}",
            text.trim(),
            err.trim()
        ),
    }
}

#[async_trait]
impl BenchPath for ContainerdPath {
    fn name(&self) -> &str {
        if self.slacker { SLACKER } else { OVERLAYFS }
    }

    async fn prepare(&mut self, image: &BuiltImage) -> Result<Step> {
        let mut step = Step::default();
        if let Some(storage) = self.storage.clone() {
            let (base, import_secs) = storage.import(image).await?;
            if let Some(s) = import_secs {
                step.parts
                    .push(("import (mke2fs -d + write)".to_string(), s));
            }
            self.counter += 1;
            let dev = format!("dev-{SLACKER}-{}", self.counter);
            storage.builder().create(&dev, Some(&base)).await?;
            step.notes.push(format!(
                "developer's container: layer {dev} cloned from {base}"
            ));
            self.st(image).dev_layer = Some(dev);
        }
        self.st(image).push_client = Some(RegistryClient::new(ClientOptions::plain_http()));
        Ok(step)
    }

    async fn push(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let reference = format!(
            "{}/hellobench-{}/{}:{}-{}",
            self.registry,
            self.name(),
            image.spec.name,
            self.run_tag,
            self.counter
        );
        let client = self
            .st(image)
            .push_client
            .take()
            .ok_or_else(|| Error::msg("push before prepare"))?;
        let mut parts = Vec::new();
        let t = Instant::now();
        let layer = match self.storage.clone() {
            Some(storage) => {
                let dev = self
                    .st(image)
                    .dev_layer
                    .clone()
                    .ok_or_else(|| Error::msg("push before prepare"))?;
                let diff = storage.builder().diff(&dev).await?;
                parts.push((
                    "snapshot + reference".to_string(),
                    t.elapsed().as_secs_f64(),
                ));
                PushLayer::tar(diff.tar)
            }
            None => {
                let root = image.root.clone();
                let layer = blocking(move || {
                    let (tar, _) = crate::tarball::write_tar(&root, Vec::new())?;
                    Ok(PushLayer::tar_gzip(&tar, 6))
                })
                .await
                .context("tar + gzip")?;
                parts.push(("tar+gzip+sha256".to_string(), t.elapsed().as_secs_f64()));
                layer
            }
        };
        let t = Instant::now();
        let report = client
            .push_layers(&reference, vec![layer], None)
            .await
            .with_context(|| format!("pushing {reference}"))?;
        parts.push(("upload".into(), t.elapsed().as_secs_f64()));
        let st = self.st(image);
        st.reference = Some(reference);
        st.layer_bytes = report.layer_bytes_uploaded();
        Ok(Step {
            network_bytes: report.bytes_uploaded(),
            layer_bytes: Some(report.layer_bytes_uploaded()),
            parts,
            notes: vec![format!("manifest {}", report.manifest_digest)],
            ..Step::default()
        })
    }

    async fn pull(&mut self, image: &BuiltImage) -> Result<Step> {
        let reference = self
            .st(image)
            .reference
            .clone()
            .ok_or_else(|| Error::msg("pull before push"))?;
        let ctrd = self.ctrd.clone();
        let snapshotter = self.snapshotter();
        let started = unix_ns();
        // `--debug` is how ctr turns its progress display off. Left on, ctr holds every
        // pull after the fetch until the display's next 100 ms tick (`ShowProgress` in
        // ctr's content/fetch.go marks itself done and waits for the ticker): 0-100 ms of
        // UI per pull that neither snapshotter causes and CRI clients do not have. Both
        // paths run the same command.
        let out = blocking(move || {
            ctrd.ctr(&[
                "--debug",
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &reference,
            ])
            .map_err(ctr_err)
        })
        .await?;
        let layer_bytes = self.st(image).layer_bytes;
        let mut notes: Vec<String> = out
            .lines()
            .filter(|l| l.starts_with("unpacking") || l.starts_with("done"))
            .map(str::to_owned)
            .collect();
        notes.push(format!("started at {started} ns (unix)"));
        Ok(Step {
            network_bytes: layer_bytes,
            layer_bytes: Some(layer_bytes),
            notes,
            ..Step::default()
        })
    }

    async fn run(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let id = format!("hb-{}-{}", image.spec.name, self.counter);
        let reference = self
            .st(image)
            .reference
            .clone()
            .ok_or_else(|| Error::msg("run before pull"))?;
        let files_dir = self.work.join("ctr-files").join(&id);
        {
            let st = self.st(image);
            st.container = Some(id.clone());
            st.files_dir = Some(files_dir.clone());
        }
        let ctrd = self.ctrd.clone();
        let snapshotter = self.snapshotter();
        let readiness = image.spec.readiness.clone();
        let timeout = self.timeout;
        let loops = storage::LoopReads::now();
        let watch = self.volumes.clone().map(LoopWatch::start);
        let started = unix_ns();
        let ran = blocking(move || {
            let port = sys::free_port()?;
            let (files, argv) = match &readiness {
                Readiness::Command { files, argv, .. } | Readiness::Serve { files, argv, .. } => {
                    (files, argv)
                }
            };
            let argv: Vec<String> = argv
                .iter()
                .map(|a| a.replace("{port}", &port.to_string()))
                .collect();
            let mounts = bind_files(&files_dir, files, port)?;
            let mut cmd = ctrd.ctr_command();
            cmd.arg("run").args(["--snapshotter", snapshotter]);
            match &readiness {
                Readiness::Command { expect, .. } => {
                    cmd.args(&mounts).arg(&reference).arg(&id).args(&argv);
                    cmd.stdin(Stdio::null());
                    let (d, out) = run_until(&mut cmd, expect, timeout)?;
                    Ok((d, out.lines().next().unwrap_or_default().to_owned()))
                }
                Readiness::Serve { send, expect, .. } => {
                    let t = Instant::now();
                    cmd.args(["-d", "--net-host"])
                        .args(&mounts)
                        .arg(&reference)
                        .arg(&id)
                        .args(&argv);
                    sys::run_ok(&mut cmd, timeout)?;
                    let send = send.replace("{port}", &port.to_string());
                    let deadline = t + timeout;
                    loop {
                        if let Some(a) = crate::container::probe(port, &send, expect, deadline) {
                            return Ok((t.elapsed(), a));
                        }
                        if Instant::now() >= deadline {
                            crate::bail!(
                                "{argv:?} did not answer {send:?} with {expect:?} on 127.0.0.1:{port} within {timeout:?}"
                            );
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .await;
        // Read the counters as soon as the container is ready (or failed).
        let seen = watch.map(LoopWatch::finish);
        let (secs, answer) = ran?;
        let mut step = Step {
            parts: vec![("ctr run until ready".into(), secs.as_secs_f64())],
            notes: vec![
                format!("ready: {answer}"),
                format!("started at {started} ns (unix)"),
            ],
            ..Step::default()
        };
        if let Some(seen) = seen {
            // The bytes the container's loop device read until it was ready (local
            // storage: what a shared-storage deployment would move).
            let read: u64 = seen.keys().filter_map(|d| loops.since(d).ok()).sum();
            step.read_bytes = Some(read);
            step.fetched_bytes = Some(read);
            step.network_bytes = read;
            let (size, used) = volume_bytes(seen.values());
            step.image_bytes = Some(size);
            step.image_used_bytes = Some(used);
            step.notes.push(format!(
                "loop devices: {}",
                seen.iter()
                    .map(|(d, f)| format!("{} on {}", d.display(), f.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else {
            step.read_bytes = Some(image.record.stats.file_bytes);
        }
        Ok(step)
    }

    async fn stop(&mut self, image: &BuiltImage) -> Result<Step> {
        let st = self.st(image);
        let (id, files) = (st.container.take(), st.files_dir.take());
        let ctrd = self.ctrd.clone();
        blocking(move || {
            if let Some(id) = id {
                ctrd.remove_container(&id).map_err(ctr_err)?;
            }
            if let Some(f) = files {
                sys::remove_tree(&f)?;
            }
            Ok(())
        })
        .await?;
        Ok(Step::default())
    }

    async fn clean(&mut self, image: &BuiltImage) -> Result<()> {
        let st = self.state.remove(&image.spec.name).unwrap_or_default();
        let ctrd = self.ctrd.clone();
        let (id, reference) = (st.container, st.reference);
        blocking(move || {
            if let Some(id) = id {
                let _ = ctrd.remove_container(&id);
            }
            if let Some(r) = reference {
                // --sync: containerd's GC removes the content and the snapshots now, so
                // the next pull starts from nothing.
                ctrd.ctr(&["images", "rm", "--sync", &r]).map_err(ctr_err)?;
            }
            Ok(())
        })
        .await?;
        if let (Some(storage), Some(dev)) = (&self.storage, st.dev_layer) {
            match storage.builder().remove(&dev).await {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    crate::progress!("{SLACKER}: leaving the developer's layer {dev}: {e}")
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The logical size and the allocated bytes of the largest of `files` (the container's
/// clone).
fn volume_bytes<'a>(files: impl Iterator<Item = &'a PathBuf>) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    files
        .filter_map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.len(), m.blocks() * 512))
        })
        .max()
        .unwrap_or((0, 0))
}

/// Measures both sides of the pair on `images`, pushing to `registry` (`host:port`; the
/// one place its address comes from): a containerd and the in-process snapshotter on a
/// btrfs of its own, then `containerd-overlayfs` and `containerd-slacker` one after the
/// other. Empty (with a line in `skipped`) when the pair cannot run here.
///
/// # Errors
/// The btrfs, the stores, the snapshotter or containerd failing to start.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    pf: &Preflight,
    registry: &str,
    images: &[BuiltImage],
    timeout: Duration,
    work: &Path,
    plan: impl Fn(bool) -> Plan,
    skipped: &mut Vec<String>,
    results: &mut Results,
) -> Result<Vec<bench::PathResults>> {
    if let Some(why) = missing(pf) {
        skipped.push(format!("{OVERLAYFS}, {SLACKER}: {why}"));
        return Ok(Vec::new());
    }
    let size = (images
        .iter()
        .map(|i| i.record.stats.allocated_bytes)
        .sum::<u64>()
        * 3
        + (4 << 30))
        .max(8 << 30)
        .div_ceil(1 << 30)
        * (1 << 30);
    let cache_dir = crate::corpus::cache_root();
    let btrfs = blocking(move || BtrfsImage::create(&cache_dir, size)).await?;
    let root = btrfs.root().to_path_buf();
    let backend: Arc<dyn Backend> = {
        let root = root.clone();
        Arc::new(blocking(move || Ok(BtrfsBuilder::new(root).build()?)).await?)
    };
    let storage = Storage::with_backend(
        backend.clone(),
        btrfs.describe(),
        true,
        registry,
        &work.join("slacker-meta-containerd"),
        work,
    )
    .await?;
    let dir = work.join("containerd-pair");
    let snap = {
        let (d, r, b) = (dir.join("snapshotter"), root.clone(), backend.clone());
        blocking(move || InProcess::start(&d, &r, b)).await?
    };
    let ctrd = {
        let (d, s) = (dir.clone(), snap.socket.clone());
        Arc::new(
            blocking(move || Containerd::start(&d, &[(PLUGIN, &s)], &namespace()).map_err(ctr_err))
                .await?,
        )
    };
    let (_, stamp) = sys::now_utc();
    let run_tag = stamp.replace([':', '-'], "").to_lowercase();
    let mut out = Vec::new();
    for slacker in [false, true] {
        let mut path = ContainerdPath {
            slacker,
            ctrd: ctrd.clone(),
            storage: slacker.then(|| storage.clone()),
            volumes: slacker.then(|| root.clone()),
            registry: registry.to_owned(),
            timeout,
            work: work.to_path_buf(),
            state: HashMap::new(),
            counter: 0,
            run_tag: run_tag.clone(),
        };
        results.notes.push(path.describe());
        out.push(bench::measure(&mut path, images, plan(true)).await);
        // Containers a failed phase left behind go before the storage does.
        for id in path.state.values().filter_map(|s| s.container.clone()) {
            let c = ctrd.clone();
            let _ = blocking(move || c.remove_container(&id).map_err(ctr_err)).await;
        }
    }
    storage.remove_imports().await;
    let dir2 = dir.clone();
    blocking(move || {
        drop(ctrd);
        drop(snap);
        sys::unmount_under(&dir2);
        storage::detach_loops_under(&dir2);
        drop(btrfs);
        Ok(())
    })
    .await?;
    Ok(out)
}

/// The pair's table: deployment (pull + run) and its parts per image, and the ratio of
/// `containerd-overlayfs` to `containerd-slacker` (goal: at least 20x on the median
/// image). Empty when the run did not measure both.
pub fn pair_markdown(r: &Results) -> String {
    use std::fmt::Write as _;
    let (Some(o), Some(s)) = (
        r.paths.iter().find(|p| p.path == OVERLAYFS),
        r.paths.iter().find(|p| p.path == SLACKER),
    ) else {
        return String::new();
    };
    let secs = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.2} s"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let fmt_ratio = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.1}×"));
    let mut md = format!(
        "### containerd + runc: {OVERLAYFS} vs {SLACKER}\n\n| image | pull overlayfs | run overlayfs | deploy overlayfs | pull slacker | run slacker | deploy slacker | deploy speedup | pull speedup | run speedup |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut per_image = Vec::new();
    let row = |md: &mut String, name: &str, a: &bench::Summary, b: &bench::Summary| {
        let d = ratio(a.deploy, b.deploy);
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            secs(a.pull),
            secs(a.run),
            secs(a.deploy),
            secs(b.pull),
            secs(b.run),
            secs(b.deploy),
            fmt_ratio(d),
            fmt_ratio(ratio(a.pull, b.pull)),
            fmt_ratio(ratio(a.run, b.run)),
        );
        d
    };
    for img in &o.images {
        if let Some(si) = s.images.iter().find(|i| i.image == img.image) {
            per_image.push(row(&mut md, &img.image, &img.median, &si.median));
        }
    }
    let of_medians = row(&mut md, "**median**", &o.median, &s.median);
    let median_of_images = bench::median(per_image);
    let _ = writeln!(
        md,
        "\nDeployment (pull + run until ready, as ctr sees them) speedup on the median image: {} (ratio of medians), {} (median of per-image ratios); goal: at least 20× ({}).\n",
        fmt_ratio(of_medians),
        fmt_ratio(median_of_images),
        if of_medians.is_some_and(|v| v >= 20.0) {
            "met"
        } else {
            "not met"
        }
    );
    md
}
