//! The snapshotter: containerd's snapshot semantics on slacker volumes.
//!
//! | containerd | here |
//! |---|---|
//! | `Prepare(key, parent)` | `clone_snapshot(parent's snapshot)` into a new volume (O(1)); mounts: on a backend with local files (btrfs) this process mounts the volume's ext4 (loop device over its file) under `<root>/mnt` and hands out a bind mount of it; otherwise ext4 on a loop device over the volume's file, which containerd mounts itself |
//! | `Prepare(extract-…, parent)` | a staging directory handed out as an overlay upper dir (no clone) |
//! | `View(key, parent)` | a clone, mounted read-only |
//! | `Commit(name, key)` | unmount this process's own mount; freeze every ext4 still alive on a loop device over the volume (mounted elsewhere, or unmounted lazily and still referenced: reached by mounting the device again) across `snapshot(volume)`; drop the volume; for a staging directory holding a slacker reference document: record the referenced storage snapshot (no copy, no clone); for a standard layer: clone the parent, merge the unpacked layer in, snapshot |
//! | `Remove(key)` | refused while children exist; drops the volume, snapshot or hold |
//! | `Walk`, `Stat`, `Update`, `Usage`, `Mounts`, `Cleanup` | from the metadata documents |
//!
//! **Metadata** is one small JSON document per snapshot in a [`DirStore`] under
//! `<root>/meta` (written atomically), named by an internal number, never by the key
//! (containerd's keys hold `/`). Every state change replaces exactly one document, after
//! the storage step it records: a crash leaves at most an unreferenced volume, staging
//! directory or snapshot, which the next start ([`SlackerSnapshotter::open`]) or
//! `Cleanup` removes. Mounts containerd made, and this process's own mounts of active and
//! view volumes (bind-mounted by containerd), are kernel mounts of loop devices over
//! volume files: a restart of this process does not touch them, and `Mounts` after a
//! restart reuses its mount (or mounts again after a reboot). This process must run in
//! the host's mount namespace (the shipped systemd unit does), as containerd does.
//!
//! **Durability.** Committed snapshots, views, label updates and removals are written
//! durably (fsync of the document and of its directory) before the RPC answers. An
//! *active* snapshot is scratch until `Commit` (containerd's overlayfs snapshotter does
//! not fsync its directories either): `Prepare` writes its document atomically but does
//! not wait for the disk. A process crash (kill -9) loses nothing (the page cache
//! survives); a power loss may lose active snapshots prepared just before it, never a
//! committed one. A document the power loss left empty (the rename reached the disk, its
//! data did not) is recognised at the next start and dropped, with the volume or staging
//! directory it named (removed as unreferenced).

// `tonic::Status` is the error type containerd-snapshots' `Snapshotter` trait requires;
// boxing it here would only move the conversion around.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info, Kind as CtrKind, Snapshotter, Usage};
use serde::{Deserialize, Serialize};
use slacker_core::layer::reference::{MAX_DOCUMENT_BYTES, Reference};
use slacker_core::persist::{DirStore, MetaStore, TEMP_SUFFIX};
use slacker_core::{Backend, Error, ErrorKind, SnapshotId, VolumeId, VolumeOptions};
use tokio::sync::Mutex;

use crate::config::{Config, FdKeeper};
use crate::datapath::DataPath;
use crate::filter::Filters;
use crate::remote::{Remote, RemoteError};
use crate::{apply, host, keeper};

/// Label containerd's unpacker puts on a layer's `Prepare`: the chain id it will
/// commit under.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Label CRI sends for remote snapshotters: the layer's digest.
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Label CRI sends for remote snapshotters: the image reference.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Active,
    View,
    Committed,
}

/// One snapshot's metadata document.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    id: u64,
    key: String,
    kind: Kind,
    parent: Option<String>,
    labels: BTreeMap<String, String>,
    created_ns: u64,
    updated_ns: u64,
    /// Active/view: the writable volume.
    volume: Option<String>,
    /// Committed: the storage snapshot holding its tree.
    snapshot: Option<String>,
    /// Committed from a reference document: the snapshot is held, not owned.
    #[serde(default)]
    lazy: bool,
    /// Active for an `extract-` key: a staging directory, no volume.
    #[serde(default)]
    staging: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseDoc {
    snapshot: String,
}

#[derive(Debug, Default)]
struct State {
    by_key: BTreeMap<String, Record>,
    next_id: u64,
    base: Option<SnapshotId>,
}

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Clones made (one per Prepare/View of a volume, one per standard layer).
    pub clones: AtomicU64,
    /// Snapshots committed lazily from a reference document.
    pub lazy_commits: AtomicU64,
    /// Standard layers merged into a volume.
    pub layers_merged: AtomicU64,
    /// Layers prepared from CRI's remote-snapshot labels (fetched by the snapshotter;
    /// containerd skipped the download).
    pub remote_snapshots: AtomicU64,
    /// Commits that found a filesystem still alive on the volume's loop device (mounted
    /// elsewhere, or unmounted lazily and still referenced) and froze it for the snapshot.
    pub frozen_commits: AtomicU64,
}

/// A containerd snapshotter on a slacker [`Backend`] (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct SlackerSnapshotter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    backend: Arc<dyn Backend>,
    meta: Arc<dyn MetaStore>,
    state: Mutex<State>,
    counters: Counters,
    staging: PathBuf,
    mnt: PathBuf,
    /// The metadata store's directory (for [`write_scratch`]).
    meta_dir: PathBuf,
    /// Serializes the mounts this process makes of active and view volumes.
    mounting: Mutex<()>,
    data: DataPath,
    remote: Remote,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn time_of(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The gRPC status containerd expects for a slacker error.
pub fn status(e: Error) -> Status {
    let m = e.to_string();
    match e.kind() {
        ErrorKind::NotFound => Status::not_found(m),
        ErrorKind::AlreadyExists => Status::already_exists(m),
        ErrorKind::InUse => Status::failed_precondition(m),
        ErrorKind::InvalidInput | ErrorKind::Integrity | ErrorKind::OutOfRange => {
            Status::invalid_argument(m)
        }
        ErrorKind::Unsupported => Status::unimplemented(m),
        _ => Status::internal(m),
    }
}

fn io_status(what: &str) -> impl Fn(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

fn doc_name(id: u64) -> String {
    format!("s-{id}")
}

/// Replaces document `name` in the [`DirStore`] at `dir` atomically but without waiting
/// for the disk (no fsync): the temporary file has the store's naming, so a crash's
/// leftover is removed by the next [`DirStore::open`]. A power loss may leave the old
/// document, none, or an empty one (see the module docs).
fn write_scratch(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}{TEMP_SUFFIX}"));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// `containerd`'s unpacker names the active snapshot of a layer being unpacked
/// `extract-<nonce>-<chain id>` (behind a `<namespace>/<n>/` prefix).
pub fn is_extract_key(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .unwrap_or(key)
        .starts_with("extract-")
}

/// Runs `f` and emits a `debug` event (target `slacker_snapshotter::timing`) with how
/// long it took: the breakdown of an RPC into its storage and metadata steps.
async fn timed<T>(step: &'static str, f: impl Future<Output = T>) -> T {
    let t = Instant::now();
    let out = f.await;
    tracing::debug!(target: "slacker_snapshotter::timing", step, us = t.elapsed().as_micros() as u64);
    out
}

/// As [`timed`], for a step that does not wait.
fn timed_sync<T>(step: &'static str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    tracing::debug!(target: "slacker_snapshotter::timing", step, us = t.elapsed().as_micros() as u64);
    out
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{what}: {e}")))?
        .map_err(io_status(what))
}

impl SlackerSnapshotter {
    /// Opens the storage named by `config.backend`, loads the metadata under
    /// `config.root` and removes what an interrupted run left behind (volumes of this
    /// instance and staging directories no document names).
    ///
    /// # Errors
    /// `Config` for an unusable backend or root; `Integrity` for an unreadable document;
    /// backend errors.
    pub async fn open(config: Config) -> slacker_core::Result<Self> {
        let backend = config.backend.open().await?;
        Self::with_backend(config, backend).await
    }

    /// As [`open`](Self::open), on a backend the caller opened.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn with_backend(
        config: Config,
        backend: Arc<dyn Backend>,
    ) -> slacker_core::Result<Self> {
        let cfg_err = |what: &str, e: std::io::Error| {
            Error::Config(format!("{what} under {}: {e}", config.root.display()))
        };
        let meta_dir = config.root.join("meta");
        let meta = DirStore::open(&meta_dir).map_err(|e| cfg_err("meta", e))?;
        let staging = config.root.join("staging");
        let mnt = config.root.join("mnt");
        std::fs::create_dir_all(&staging).map_err(|e| cfg_err("staging", e))?;
        std::fs::create_dir_all(&mnt).map_err(|e| cfg_err("mnt", e))?;
        let meta: Arc<dyn MetaStore> = Arc::new(meta);
        let config_plain_http = config.registry.plain_http.clone();
        let mut data = DataPath::new(
            Arc::clone(&backend),
            config.root.join("fuse"),
            config.cache.bytes,
        );
        if !data.is_local() {
            match config.fd_keeper.program() {
                Some(program) => {
                    data = data.with_keeper(config.root.join(keeper::SOCKET_NAME), program);
                }
                None if config.fd_keeper == FdKeeper::Off => {}
                None => tracing::warn!(
                    "fd_keeper = \"auto\" but this executable is not slacker-snapshotter: no fd keeper (name one in fd_keeper); a restart of this process breaks the IO of running containers"
                ),
            }
        }
        let mut state = State::default();
        for name in meta.list().map_err(|e| cfg_err("meta", e))? {
            let data = meta
                .read(&name)
                .map_err(|e| cfg_err("meta", e))?
                .unwrap_or_default();
            if name == "base" {
                let d: BaseDoc = serde_json::from_slice(&data)
                    .map_err(|e| Error::Integrity(format!("metadata document base: {e}")))?;
                state.base = Some(d.snapshot.parse()?);
            } else if name.starts_with("s-") {
                if data.is_empty() {
                    // Only a scratch write (an active snapshot's `Prepare`) can leave an
                    // empty document, and only through a power loss: that snapshot is
                    // gone; what it named is removed below as unreferenced.
                    eprintln!(
                        "slacker-snapshotter: metadata document {name} is empty (an active snapshot lost to a power loss): dropped"
                    );
                    meta.remove(&name).map_err(|e| cfg_err("meta", e))?;
                    continue;
                }
                let r: Record = serde_json::from_slice(&data)
                    .map_err(|e| Error::Integrity(format!("metadata document {name}: {e}")))?;
                state.next_id = state.next_id.max(r.id + 1);
                state.by_key.insert(r.key.clone(), r);
            }
        }
        let s = Self {
            inner: Arc::new(Inner {
                config,
                backend,
                meta,
                state: Mutex::new(state),
                counters: Counters::default(),
                staging,
                mnt,
                meta_dir,
                mounting: Mutex::new(()),
                data,
                remote: Remote::new(config_plain_http),
            }),
        };
        s.collect_garbage()
            .await
            .map_err(|st| Error::backend("snapshotter", st.message().to_owned()))?;
        // Without local files: serve every active volume again, at the path it had.
        let vols = s.owned_volumes().await;
        s.inner.data.reserve(&vols).await;
        Ok(s)
    }

    /// The storage.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Number of snapshots (active, view and committed).
    pub async fn snapshot_count(&self) -> usize {
        self.inner.state.lock().await.by_key.len()
    }

    /// Volumes of this instance that metadata names (plus none else after a cleanup).
    pub async fn owned_volumes(&self) -> Vec<VolumeId> {
        let st = self.inner.state.lock().await;
        st.by_key
            .values()
            .filter_map(|r| r.volume.as_deref())
            .filter_map(|v| VolumeId::new(v).ok())
            .collect()
    }

    fn prefix(&self) -> String {
        format!("{}-", self.inner.config.volume_prefix)
    }

    fn volume_id(&self, id: u64) -> Result<VolumeId, Status> {
        VolumeId::new(format!("{}{id}", self.prefix())).map_err(status)
    }

    fn holder(&self, id: u64) -> String {
        format!("{}{id}", self.prefix())
    }

    fn persist(&self, r: &Record) -> Result<(), Status> {
        let data = serde_json::to_vec(r).expect("records serialize");
        timed_sync("metadata write", || {
            self.inner
                .meta
                .write(&doc_name(r.id), &data)
                .map_err(io_status("writing metadata"))
        })
    }

    /// As [`persist`](Self::persist) for an active snapshot's first document: atomic, not
    /// durable (see the module docs).
    fn persist_scratch(&self, r: &Record) -> Result<(), Status> {
        let data = serde_json::to_vec(r).expect("records serialize");
        timed_sync("metadata write (scratch)", || {
            write_scratch(&self.inner.meta_dir, &doc_name(r.id), &data)
                .map_err(io_status("writing metadata"))
        })
    }

    /// Removes volumes of this instance and staging directories no document names.
    async fn collect_garbage(&self) -> Result<(), Status> {
        let st = self.inner.state.lock().await;
        let named: Vec<&str> = st
            .by_key
            .values()
            .filter_map(|r| r.volume.as_deref())
            .collect();
        // This process's mounts of snapshots that are gone (a crash between the
        // metadata step and the unmount): detach them first, so their volumes free up.
        let mounted: Vec<String> = st
            .by_key
            .values()
            .filter(|r| r.volume.is_some())
            .map(|r| format!("a{}", r.id))
            .collect();
        if let Ok(dir) = std::fs::read_dir(&self.inner.mnt) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('q') {
                    // A Commit's freeze mount (a crash before the thaw): thaw and go.
                    let p = e.path();
                    let r = blocking("thawing a leftover freeze", move || {
                        host::release_quiesce_mount(&p)
                    })
                    .await;
                    if let Err(e) = r {
                        eprintln!("slacker-snapshotter: {}", e.message());
                    }
                } else if name.starts_with('a') && !mounted.contains(&name) {
                    let p = e.path();
                    let r = blocking("unmounting a leftover mount", move || {
                        if host::is_mount_point(&p) {
                            host::unmount_lazy(&p)?;
                        }
                        std::fs::remove_dir(&p)
                    })
                    .await;
                    if let Err(e) = r {
                        eprintln!("slacker-snapshotter: {}", e.message());
                    }
                }
            }
        }
        let prefix = self.prefix();
        for v in self.inner.backend.list_volumes().await.map_err(status)? {
            if v.as_str().starts_with(&prefix) && !named.contains(&v.as_str()) {
                if self.inner.data.in_use(&v).await {
                    continue; // still mounted somewhere: leave it
                }
                self.inner.backend.remove_volume(&v).await.map_err(status)?;
            }
        }
        let staged: Vec<String> = st
            .by_key
            .values()
            .filter(|r| r.staging)
            .map(|r| r.id.to_string())
            .collect();
        if let Ok(dir) = std::fs::read_dir(&self.inner.staging) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !staged.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// The snapshot every parentless snapshot clones: an empty ext4, made once.
    async fn base(&self, st: &mut State) -> Result<SnapshotId, Status> {
        if let Some(b) = &st.base {
            return Ok(b.clone());
        }
        let b = &self.inner.backend;
        let vol = VolumeId::new(format!("{}base", self.prefix())).map_err(status)?;
        if b.stat_volume(&vol).await.is_ok() {
            b.remove_volume(&vol).await.map_err(status)?;
        }
        b.create_volume(&vol, &VolumeOptions::new(self.inner.config.volume_bytes))
            .await
            .map_err(status)?;
        self.inner
            .data
            .make_empty_ext4(&vol, &self.inner.config.root)
            .await
            .map_err(io_status("making the empty ext4"))?;
        let sid = b.snapshot(&vol).await.map_err(status)?;
        let doc = serde_json::to_vec(&BaseDoc {
            snapshot: sid.to_string(),
        })
        .expect("serializes");
        self.inner
            .meta
            .write("base", &doc)
            .map_err(io_status("writing metadata"))?;
        b.remove_volume(&vol).await.map_err(status)?;
        st.base = Some(sid.clone());
        Ok(sid)
    }

    async fn volume_file(&self, vol: &VolumeId) -> Result<PathBuf, Status> {
        self.inner
            .data
            .file(vol)
            .await
            .map_err(io_status("serving the volume"))
    }

    /// Stops serving `vol` and removes it; a volume something still mounts stays (the
    /// next `Cleanup` or start removes it once it is free).
    async fn drop_volume(&self, vol: &VolumeId) {
        match self.inner.data.release(vol).await {
            Ok(true) => {
                let _ = self.inner.backend.remove_volume(vol).await;
            }
            Ok(false) => {}
            Err(e) => eprintln!("slacker-snapshotter: releasing {vol}: {e}"),
        }
    }

    /// What the lazily served volumes fetched from the storage and found in the block
    /// cache (all zero on a backend with local files).
    pub fn data_metrics(&self) -> slacker_core::worker::Metrics {
        self.inner.data.metrics()
    }

    /// Where this process mounts active or view snapshot `id` (local backends).
    fn own_mount_dir(&self, id: u64) -> PathBuf {
        self.inner.mnt.join(format!("a{id}"))
    }

    /// Unmounts this process's mount of snapshot `id` (if any) and removes its directory;
    /// lazily if it is busy (a bind mount of it elsewhere keeps the filesystem until it
    /// goes).
    async fn drop_own_mount(&self, id: u64) {
        let dir = self.own_mount_dir(id);
        let reset = self.inner.config.read_ahead_kb > 0;
        let _one = self.inner.mounting.lock().await;
        let r = blocking("unmounting the volume", move || {
            if reset && host::is_mount_point(&dir) {
                // The loop device keeps its read-ahead after it goes back to the pool.
                host::reset_read_ahead_at(&dir)?;
            }
            if host::is_mount_point(&dir) && host::unmount(&dir).is_err() {
                host::unmount_lazy(&dir)?;
            }
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await;
        if let Err(e) = r {
            eprintln!("slacker-snapshotter: {}", e.message());
        }
    }

    fn staging_dir(&self, id: u64) -> PathBuf {
        self.inner.staging.join(id.to_string())
    }

    async fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, Status> {
        if r.staging {
            let d = self.staging_dir(r.id);
            let opt = |k: &str, p: &Path| format!("{k}={}", p.display());
            return Ok(vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    opt("workdir", &d.join("work")),
                    opt("upperdir", &d.join("fs")),
                    opt("lowerdir", &d.join("lower")),
                ],
            }]);
        }
        let vol = r
            .volume
            .as_deref()
            .ok_or_else(|| Status::failed_precondition(format!("{} is not active", r.key)))?;
        let file = self
            .volume_file(&VolumeId::new(vol).map_err(status)?)
            .await?;
        let rw = if r.kind == Kind::View { "ro" } else { "rw" };
        if self.inner.data.is_local() {
            // The snapshotter mounts the ext4 once and hands out bind mounts of it:
            // containerd mounts a container's rootfs twice (a temporary mount to read
            // /etc/group while building the spec, then the task's rootfs), and an ext4
            // over a loop device costs a loop attach, a journal start and flushes at
            // every mount and unmount, a bind mount nothing.
            let dir = self.own_mount_dir(r.id);
            let (d, read_only) = (dir.clone(), r.kind == Kind::View);
            let read_ahead_kb = self.inner.config.read_ahead_kb;
            let _one = self.inner.mounting.lock().await;
            timed(
                "mount: ext4 (own)",
                blocking("mounting the volume", move || {
                    if host::is_mount_point(&d) {
                        return Ok(());
                    }
                    std::fs::create_dir_all(&d)?;
                    host::mount_ext4_at(&file, &d, read_only, read_ahead_kb)
                }),
            )
            .await?;
            return Ok(vec![Mount {
                r#type: "bind".into(),
                source: dir.display().to_string(),
                target: String::new(),
                options: vec!["rbind".into(), rw.into()],
            }]);
        }
        Ok(vec![Mount {
            r#type: "ext4".into(),
            source: file.display().to_string(),
            target: String::new(),
            options: vec![rw.into(), "loop".into()],
        }])
    }

    fn origin_of(&self, st: &State, parent: &str) -> Result<Option<SnapshotId>, Status> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = st
            .by_key
            .get(parent)
            .ok_or_else(|| Status::not_found(format!("parent snapshot {parent:?} not found")))?;
        if p.kind != Kind::Committed {
            return Err(Status::invalid_argument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        let sid = p.snapshot.as_deref().unwrap_or_default();
        Ok(Some(sid.parse().map_err(status)?))
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("empty snapshot key"));
        }
        if kind == Kind::Active
            && let (Some(target), Some(digest), Some(image)) = (
                labels.get(LABEL_SNAPSHOT_REF),
                labels.get(LABEL_CRI_LAYER_DIGEST),
                labels.get(LABEL_CRI_IMAGE_REF),
            )
        {
            if self.inner.state.lock().await.by_key.contains_key(target) {
                return Err(Status::already_exists(format!(
                    "target snapshot {target:?} exists"
                )));
            }
            match self.inner.remote.fetch_reference(image, digest).await {
                Ok(Some(reference)) => {
                    return self
                        .commit_remote(target.clone(), parent, labels.clone(), reference)
                        .await;
                }
                // Not a reference layer: containerd downloads and unpacks it.
                Ok(None) => {}
                Err(RemoteError::BadReference(m)) => {
                    return Err(Status::invalid_argument(format!(
                        "layer {digest} of {image}: reference layer: {m}"
                    )));
                }
                Err(e) => {
                    eprintln!(
                        "slacker-snapshotter: layer {digest} of {image}: {e}; containerd downloads it"
                    );
                }
            }
        }
        let mut st = self.inner.state.lock().await;
        if st.by_key.contains_key(&key) {
            return Err(Status::already_exists(format!("snapshot {key:?} exists")));
        }
        let origin = self.origin_of(&st, &parent)?;
        let id = st.next_id;
        st.next_id += 1;
        let now = now_ns();
        let mut r = Record {
            id,
            key: key.clone(),
            kind,
            parent: (!parent.is_empty()).then_some(parent),
            labels: labels.into_iter().collect(),
            created_ns: now,
            updated_ns: now,
            volume: None,
            snapshot: None,
            lazy: false,
            staging: false,
        };
        if kind == Kind::Active && is_extract_key(&key) {
            let d = self.staging_dir(id);
            let _ = std::fs::remove_dir_all(&d);
            for sub in ["fs", "work", "lower"] {
                std::fs::create_dir_all(d.join(sub)).map_err(io_status("staging directory"))?;
            }
            std::fs::set_permissions(
                d.join("fs"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .map_err(io_status("staging directory"))?;
            r.staging = true;
            if let Err(e) = self.persist_scratch(&r) {
                let _ = std::fs::remove_dir_all(&d);
                return Err(e);
            }
        } else {
            let origin = match origin {
                Some(o) => o,
                None => self.base(&mut st).await?,
            };
            let vol = self.volume_id(id)?;
            timed(
                "prepare: clone",
                self.inner.backend.clone_snapshot(&origin, &vol),
            )
            .await
            .map_err(status)?;
            self.inner.counters.clones.fetch_add(1, Ordering::Relaxed);
            r.volume = Some(vol.to_string());
            let persisted = if kind == Kind::Active {
                self.persist_scratch(&r)
            } else {
                self.persist(&r)
            };
            if let Err(e) = persisted {
                let _ = self.inner.backend.remove_volume(&vol).await;
                return Err(e);
            }
        }
        match self.mounts_of(&r).await {
            Ok(mounts) => {
                st.by_key.insert(key, r);
                Ok(mounts)
            }
            Err(e) => {
                // Nothing half-created: containerd does not know this snapshot.
                if let Err(m) = self.inner.meta.remove(&doc_name(r.id)) {
                    eprintln!("slacker-snapshotter: removing metadata of {key:?}: {m}");
                }
                if r.staging {
                    let _ = std::fs::remove_dir_all(self.staging_dir(r.id));
                }
                if let Some(v) = r.volume.as_deref().and_then(|v| VolumeId::new(v).ok()) {
                    self.drop_own_mount(r.id).await;
                    self.drop_volume(&v).await;
                }
                Err(e)
            }
        }
    }

    /// Records `reference` as the committed snapshot `name` on `parent` (a remote
    /// snapshot: no data, no clone) and answers `AlreadyExists`, which tells containerd
    /// the layer is there and its download is skipped.
    async fn commit_remote(
        &self,
        name: String,
        parent: String,
        labels: HashMap<String, String>,
        reference: Reference,
    ) -> Result<Vec<Mount>, Status> {
        let mut st = self.inner.state.lock().await;
        if st.by_key.contains_key(&name) {
            return Err(Status::already_exists(format!("snapshot {name:?} exists")));
        }
        self.origin_of(&st, &parent)?;
        let b = &self.inner.backend;
        let stat = b.stat_snapshot(&reference.snapshot).await.map_err(status)?;
        reference.verify(&stat).map_err(status)?;
        let id = st.next_id;
        st.next_id += 1;
        b.hold_snapshot(&reference.snapshot, &self.holder(id))
            .await
            .map_err(status)?;
        let now = now_ns();
        let r = Record {
            id,
            key: name.clone(),
            kind: Kind::Committed,
            parent: (!parent.is_empty()).then_some(parent),
            labels: labels.into_iter().collect(),
            created_ns: now,
            updated_ns: now,
            volume: None,
            snapshot: Some(reference.snapshot.to_string()),
            lazy: true,
            staging: false,
        };
        if let Err(e) = self.persist(&r) {
            let _ = b
                .release_snapshot(&reference.snapshot, &self.holder(id))
                .await;
            return Err(e);
        }
        st.by_key.insert(name.clone(), r);
        self.inner
            .counters
            .lazy_commits
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .remote_snapshots
            .fetch_add(1, Ordering::Relaxed);
        Err(Status::already_exists(format!(
            "target snapshot {name:?}: fetched as a remote snapshot"
        )))
    }

    async fn commit_inner(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        let mut st = self.inner.state.lock().await;
        let r = st
            .by_key
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} not found")))?;
        if r.kind != Kind::Active {
            return Err(Status::failed_precondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        if st.by_key.contains_key(&name) {
            return Err(Status::already_exists(format!("snapshot {name:?} exists")));
        }
        let now = now_ns();
        let mut c = Record {
            id: r.id,
            key: name.clone(),
            kind: Kind::Committed,
            parent: r.parent.clone(),
            labels: labels.into_iter().collect(),
            created_ns: now,
            updated_ns: now,
            volume: None,
            snapshot: None,
            lazy: false,
            staging: false,
        };
        let mut drop_volume = None;
        if r.staging {
            let upper = self.staging_dir(r.id).join("fs");
            if let Some(reference) =
                timed_sync("commit: find reference", || find_reference(&upper))?
            {
                let b = &self.inner.backend;
                let stat = timed(
                    "commit: stat snapshot",
                    b.stat_snapshot(&reference.snapshot),
                )
                .await
                .map_err(status)?;
                reference.verify(&stat).map_err(status)?;
                timed(
                    "commit: hold snapshot",
                    b.hold_snapshot(&reference.snapshot, &self.holder(r.id)),
                )
                .await
                .map_err(status)?;
                c.snapshot = Some(reference.snapshot.to_string());
                c.lazy = true;
                self.inner
                    .counters
                    .lazy_commits
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                let origin = match self.origin_of(&st, r.parent.as_deref().unwrap_or(""))? {
                    Some(o) => o,
                    None => self.base(&mut st).await?,
                };
                let vol = self.volume_id(r.id)?;
                let b = &self.inner.backend;
                b.clone_snapshot(&origin, &vol).await.map_err(status)?;
                self.inner.counters.clones.fetch_add(1, Ordering::Relaxed);
                let merged = async {
                    let file = self.volume_file(&vol).await?;
                    let mnt = self.inner.mnt.join(r.id.to_string());
                    blocking("merging the layer", move || {
                        std::fs::create_dir_all(&mnt)?;
                        host::mount_ext4(&file, &mnt)?;
                        let res = apply::merge_upper(&upper, &mnt);
                        let un = host::unmount(&mnt);
                        let _ = std::fs::remove_dir(&mnt);
                        res.and(un)
                    })
                    .await?;
                    b.flush(&vol).await.map_err(status)?;
                    b.snapshot(&vol).await.map_err(status)
                }
                .await;
                self.drop_volume(&vol).await;
                c.snapshot = Some(merged?.to_string());
                self.inner
                    .counters
                    .layers_merged
                    .fetch_add(1, Ordering::Relaxed);
            }
        } else {
            let vol = VolumeId::new(r.volume.clone().unwrap_or_default()).map_err(status)?;
            // Our own mount goes first: an unmounted ext4 is clean. A filesystem that
            // is still alive on a loop device over the volume is frozen for the
            // snapshot (`host::freeze_all`): mounted elsewhere, or unmounted lazily
            // while something still references it (its delayed writes reach the
            // volume only at its teardown). `Mounts` mounts again if this Commit fails.
            self.drop_own_mount(r.id).await;
            let file = self.volume_file(&vol).await?;
            let (scratch, tag) = (self.inner.mnt.clone(), r.id.to_string());
            let frozen = timed(
                "commit: freeze",
                blocking("freezing the volume's filesystems", move || {
                    host::freeze_all(&file, &scratch, &tag)
                }),
            )
            .await?;
            if !frozen.is_empty() {
                eprintln!(
                    "slacker-snapshotter: commit of {key:?}: {} filesystem(s) still alive on the volume, {} of them with no mount point here (unmounted lazily and still referenced, or mounted in another namespace): frozen for the snapshot",
                    frozen.len(),
                    frozen.detached()
                );
                self.inner
                    .counters
                    .frozen_commits
                    .fetch_add(1, Ordering::Relaxed);
            }
            let b = &self.inner.backend;
            let taken = async {
                timed("commit: flush", b.flush(&vol))
                    .await
                    .map_err(status)?;
                timed("commit: snapshot", b.snapshot(&vol))
                    .await
                    .map_err(status)
            }
            .await;
            let thawed = blocking("thawing the volume's filesystems", move || frozen.thaw()).await;
            c.snapshot = Some(taken?.to_string());
            thawed?;
            drop_volume = Some(vol);
        }
        // The one durable step: the document now says committed.
        self.persist(&c)?;
        st.by_key.remove(&key);
        st.by_key.insert(name, c);
        if r.staging {
            // Off the RPC's path: a directory no document names any more is removed by
            // the next start or `Cleanup` if this does not finish.
            let d = self.staging_dir(r.id);
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d));
        }
        if let Some(vol) = drop_volume {
            // btrfs: a volume still loop-mounted stays readable through its open file;
            // FUSE: it stays served until nothing holds it.
            self.drop_volume(&vol).await;
        }
        Ok(())
    }

    async fn remove_inner(&self, key: String) -> Result<(), Status> {
        let mut st = self.inner.state.lock().await;
        let r = st
            .by_key
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} not found")))?;
        if let Some(child) = st
            .by_key
            .values()
            .find(|c| c.parent.as_deref() == Some(key.as_str()))
        {
            return Err(Status::failed_precondition(format!(
                "snapshot {key:?} has a child {:?}: remove it first",
                child.key
            )));
        }
        let b = &self.inner.backend;
        let owned_snapshot = match (&r.snapshot, r.lazy) {
            (Some(s), false) => {
                let sid: SnapshotId = s.parse().map_err(status)?;
                match b.stat_snapshot(&sid).await {
                    Ok(stat) if !stat.holds.is_empty() => {
                        return Err(Status::failed_precondition(format!(
                            "snapshot {key:?} is held by {:?}",
                            stat.holds
                        )));
                    }
                    _ => Some(sid),
                }
            }
            _ => None,
        };
        self.inner
            .meta
            .remove(&doc_name(r.id))
            .map_err(io_status("removing metadata"))?;
        st.by_key.remove(&key);
        if r.staging {
            let _ = std::fs::remove_dir_all(self.staging_dir(r.id));
        }
        if let Some(v) = &r.volume {
            self.drop_own_mount(r.id).await;
            self.drop_volume(&VolumeId::new(v.as_str()).map_err(status)?)
                .await;
        }
        if let Some(sid) = owned_snapshot {
            let _ = b.remove_snapshot(&sid).await;
        }
        if r.lazy
            && let Some(s) = &r.snapshot
        {
            let sid: SnapshotId = s.parse().map_err(status)?;
            let _ = b.release_snapshot(&sid, &self.holder(r.id)).await;
        }
        Ok(())
    }
}

/// Finds a slacker reference document in an unpacked layer: the upper directory holds
/// exactly `slacker/reference.json`. `None` when the layer is anything else.
///
/// # Errors
/// `InvalidArgument` when the document is there but malformed, too big or invalid.
fn find_reference(upper: &Path) -> Result<Option<Reference>, Status> {
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    if names(upper) != ["slacker"] {
        return Ok(None);
    }
    let dir = upper.join("slacker");
    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
        || names(&dir) != ["reference.json"]
    {
        return Ok(None);
    }
    let doc = dir.join("reference.json");
    let m = std::fs::symlink_metadata(&doc).map_err(io_status("reading the reference"))?;
    if !m.is_file() {
        return Ok(None);
    }
    if m.len() == 0 || m.len() > MAX_DOCUMENT_BYTES {
        return Err(Status::invalid_argument(format!(
            "reference layer: document of {} bytes, 1..={MAX_DOCUMENT_BYTES} allowed",
            m.len()
        )));
    }
    let data = std::fs::read(&doc).map_err(io_status("reading the reference"))?;
    let r: Reference = serde_json::from_slice(&data).map_err(|e| {
        Status::invalid_argument(format!("reference layer: not a valid reference: {e}"))
    })?;
    r.validate().map_err(status)?;
    Ok(Some(r))
}

fn info_of(r: &Record) -> Info {
    Info {
        kind: match r.kind {
            Kind::Active => CtrKind::Active,
            Kind::View => CtrKind::View,
            Kind::Committed => CtrKind::Committed,
        },
        name: r.key.clone(),
        parent: r.parent.clone().unwrap_or_default(),
        labels: r.labels.clone().into_iter().collect(),
        created_at: time_of(r.created_ns),
        updated_at: time_of(r.updated_ns),
    }
}

fn field_of(r: &Record, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str) {
        Some("name") => Some(r.key.clone()),
        Some("parent") => r.parent.clone(),
        Some("kind") => Some(
            match r.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            }
            .to_owned(),
        ),
        Some("labels") => {
            if path.len() == 1 {
                (!r.labels.is_empty()).then(String::new)
            } else {
                r.labels.get(&path[1..].join(".")).cloned()
            }
        }
        _ => None,
    }
}

/// The stream `Walk` answers with.
pub type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for SlackerSnapshotter {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        tracing::debug!(target: "slacker_snapshotter::timing", step = "rpc stat", us = 0u64);
        let st = self.inner.state.lock().await;
        st.by_key
            .get(&key)
            .map(info_of)
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} not found")))
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        tracing::debug!(target: "slacker_snapshotter::timing", step = "rpc update", us = 0u64);
        let mut st = self.inner.state.lock().await;
        let mut r = st
            .by_key
            .get(&info.name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {:?} not found", info.name)))?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            r.labels = info.labels.into_iter().collect();
        } else {
            for p in &paths {
                if p == "labels" {
                    r.labels = info.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => {
                            r.labels.insert(k.to_owned(), v.clone());
                        }
                        None => {
                            r.labels.remove(k);
                        }
                    }
                } else {
                    return Err(Status::invalid_argument(format!(
                        "cannot update {p:?} of snapshot {:?}: only labels are mutable",
                        info.name
                    )));
                }
            }
        }
        r.updated_ns = now_ns().max(r.created_ns + 1);
        self.persist(&r)?;
        let out = info_of(&r);
        st.by_key.insert(r.key.clone(), r);
        Ok(out)
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        tracing::debug!(target: "slacker_snapshotter::timing", step = "rpc usage", us = 0u64);
        let r = {
            let st = self.inner.state.lock().await;
            st.by_key
                .get(&key)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("snapshot {key:?} not found")))?
        };
        let b = &self.inner.backend;
        let size = if let Some(v) = &r.volume {
            let s = b
                .stat_volume(&VolumeId::new(v.as_str()).map_err(status)?)
                .await
                .map_err(status)?;
            s.usage
                .exclusive_bytes
                .unwrap_or(s.diverged.len() * s.block_size.bytes())
        } else if let (Some(s), false) = (&r.snapshot, r.lazy) {
            let s = b
                .stat_snapshot(&s.parse().map_err(status)?)
                .await
                .map_err(status)?;
            s.diverged.len() * s.block_size.bytes()
        } else {
            0
        };
        Ok(Usage {
            inodes: 0,
            size: size as i64,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        let r = {
            let st = self.inner.state.lock().await;
            st.by_key
                .get(&key)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("snapshot {key:?} not found")))?
        };
        if r.kind == Kind::Committed {
            return Err(Status::failed_precondition(format!(
                "snapshot {key:?} is committed: it has no mounts"
            )));
        }
        timed("rpc mounts", self.mounts_of(&r)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        timed(
            "rpc prepare",
            self.create(Kind::Active, key, parent, labels),
        )
        .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        timed("rpc view", self.create(Kind::View, key, parent, labels)).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        timed("rpc commit", self.commit_inner(name, key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        timed("rpc remove", self.remove_inner(key)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.collect_garbage().await
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Status> {
        tracing::debug!(target: "slacker_snapshotter::timing", step = "rpc walk", us = 0u64);
        let f = Filters::parse(&filters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let st = self.inner.state.lock().await;
        let out: Vec<Result<Info, Status>> = st
            .by_key
            .values()
            .filter(|r| f.matches(&|p: &[String]| field_of(r, p)))
            .map(|r| Ok(info_of(r)))
            .collect();
        Ok(tokio_stream::iter(out))
    }
}
