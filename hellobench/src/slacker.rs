//! Slacker's path: the btrfs backend, snapshot-reference layers through the same registry
//! as the baseline, and a container run from a clone of the pulled snapshot.
//!
//! ```text
//!  prepare (untimed)  image tree ──import_dir (mke2fs -d)──▶ ext4 in a volume, snapshot held
//!                     └─ create: the developer's container = a writable clone of it
//!  push               LayerStore::diff (flush + snapshot) ─▶ 2 KiB reference layer + config
//!                     + manifest ─▶ docker-registry                  (builder store)
//!  pull               manifest + config + reference layer ─▶ apply_diff: a lazy layer,
//!                     the snapshot held, nothing cloned, no data read (worker store)
//!  run                get (clone) ─▶ mount the clone's ext4 ─▶ /proc, /dev, chroot, readiness
//!                       slacker:      losetup on the clone's local file (btrfs, no FUSE)
//!                       slacker-lazy: LazyVolume ─▶ FUSE disk.img ─▶ losetup (worker data path)
//!                       slacker-nfs:  as slacker-lazy, over an NfsBackend (knfsd, NFSv4.2)
//!  stop / clean       stop, unmount, put; remove the worker layer, the developer's layer and
//!                     the pushed snapshot (untimed)
//! ```
//!
//! **Mapping to the paper.** In Slacker a container's data already lives in a storage
//! volume (ext4 on a block device of the shared storage) when it is pushed: `docker push`
//! snapshots that volume and uploads a reference. Here the image starts as a directory tree
//! (as for the baseline), so an untimed `prepare` puts it into a volume once per image
//! ([`LayerStore::import_dir`]) and clones it into the developer's container for every
//! repetition; the timed push then does what Slacker's does (snapshot + reference layer +
//! manifest and config upload), and the baseline's timed push does what Docker's does (tar +
//! gzip of the tree + upload). Both start from data that is already on the developer's
//! host in its native form.
//!
//! **Storage.** Both "hosts" (the developer's builder and the worker) keep their layer stores
//! on one btrfs (see [`crate::storage`]): local shared storage, as the paper's NFS server
//! was shared by its workers and registry. The two run modes differ in how the worker reads
//! the clone:
//!
//! - `slacker`: the kernel path. The clone is a local file (`Backend::local_path`),
//!   loop-mounted directly; "read by the container" is what its loop device read
//!   (`/sys/block/loopN/stat`, sectors × 512, when ready). The storage is local, so those
//!   reads are counted as the bytes the run moved (a shared-storage deployment would fetch
//!   them over its network).
//! - `slacker-lazy`: the worker data path. A `LazyVolume` over the backend behind a
//!   `Counting` wrapper (and, by default, `Throttled` with a 1 Gbit/s, 0.2 ms link that
//!   emulates the network to the storage; this kernel has no netem) is served through FUSE
//!   and loop-mounted; one `BlockCache` serves every run of the path. Bytes fetched from the
//!   backend before readiness are the run's network bytes.
//! - `slacker-nfs`: networked shared storage. Its own [`Storage`] on an
//!   `slacker_backend_nfs::NfsBackend` (a directory of its own per run on the server;
//!   snapshot and clone are server-side CLONEs), read as in `slacker-lazy` through
//!   `Counting(NfsBackend)`: the real network path, no emulated link. The import in
//!   `prepare` writes the image over NFS once per image (untimed); the imports are removed
//!   at the end ([`Storage::remove_imports`]).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use slacker_backend_btrfs::BtrfsBuilder;
use slacker_backend_nfs::NfsBuilder;
use slacker_core::merkle::MerkleVerifier;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::worker::{
    BlockCache, Counting, LazyVolume, LazyVolumeOptions, LinkProfile, Throttled,
};
use slacker_core::{Backend, ErrorKind, LayerStore, LayerStoreOptions, SnapshotId};
use slacker_fuse::{Mount, MountOptions};
use slacker_oci::deploy::DeployOptions;
use slacker_oci::referrers::StartupTrace;
use slacker_oci::{ClientOptions, PushOptions, RegistryClient};

use crate::container::{self, Running};
use crate::corpus::BuiltImage;
use crate::error::{Context, Error, Result};
use crate::path::{Path as BenchPath, Step};
use crate::storage::{self, BtrfsImage};

/// The smallest volume an image is imported into (they are sparse; the ext4 is sized by
/// `slacker_core::layer::ext4::estimate_size`: twice the data plus metadata room).
const MIN_VOLUME: u64 = 64 << 20;
/// The worker's shared block cache (slacker-lazy).
const CACHE_BYTES: u64 = 1 << 30;
/// The byte bound of a trace prefetch (slacker-lazy-trace).
const TRACE_PREFETCH_BYTES: u64 = 256 << 20;

/// How the worker reads the clone it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Loop-mount the clone's local file (btrfs), no FUSE: `slacker`.
    Kernel,
    /// `LazyVolume` + FUSE + loop, counting (and optionally throttling) backend reads:
    /// `slacker-lazy`.
    Lazy,
    /// As [`Mode::Lazy`], on a fresh worker that fetches the image's startup trace (an OCI
    /// referrer) with the pull and prefetches it while the container starts:
    /// `slacker-lazy-trace`. The trace is recorded by an untimed deploy in `prepare`.
    LazyTrace,
    /// As [`Mode::Lazy`] with the worker's read-ahead off (none on a miss, no sequential
    /// window): what the container itself reads, the reference for the bytes a trace-guided
    /// start fetches: `slacker-lazy-nora`.
    LazyNoReadAhead,
    /// As [`Mode::Lazy`], over an NFS backend (the knfsd VM): the real network path, no
    /// emulated link: `slacker-nfs`.
    Nfs,
    /// As [`Mode::Nfs`], over a Ceph RBD backend: `slacker-rbd` (see `crate::rbd`).
    Rbd,
}

impl Mode {
    /// The path name in tables, JSON and the chart.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "slacker",
            Self::Lazy => "slacker-lazy",
            Self::LazyTrace => "slacker-lazy-trace",
            Self::LazyNoReadAhead => "slacker-lazy-nora",
            Self::Nfs => "slacker-nfs",
            Self::Rbd => "slacker-rbd",
        }
    }
}

/// What the modes on one backend share: the backend (btrfs, or NFS for `slacker-nfs`) and
/// the developer's (builder's) layer store with the images imported into it.
pub struct Storage {
    backend: Arc<dyn Backend>,
    builder: LayerStore<Arc<dyn Backend>>,
    imports: tokio::sync::Mutex<HashMap<String, String>>,
    registry: String,
    meta: PathBuf,
    scratch: PathBuf,
    description: String,
    /// Bytes allocated to a volume are read from its local file (btrfs); otherwise from
    /// the imported snapshot's written blocks (NFS has no local path).
    local: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("registry", &self.registry)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

fn dir_store(dir: &Path) -> Result<Arc<dyn MetaStore>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Arc::new(
        DirStore::open(dir).with_context(|| format!("opening {}", dir.display()))?,
    ))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::from)?
}

fn ignore_not_found(r: slacker_core::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map_err(Error::from),
    }
}

impl Storage {
    /// Opens the btrfs backend on `btrfs` and the builder's layer store (metadata and
    /// scratch space under `work`), pushing to `registry` (`host:port`).
    ///
    /// # Errors
    /// The backend or the store failing to open.
    pub async fn open(btrfs: &BtrfsImage, registry: &str, work: &Path) -> Result<Arc<Self>> {
        let root = btrfs.root().to_path_buf();
        let backend = blocking(move || Ok(BtrfsBuilder::new(root).build()?))
            .await
            .context("opening the btrfs backend")?;
        Self::with_backend(
            Arc::new(backend),
            btrfs.describe(),
            true,
            registry,
            &work.join("slacker-meta"),
            work,
        )
        .await
    }

    /// Opens an NFS backend on the server `addr` (`host:port`, NFSv4.2), in a directory of
    /// its own for this run (`hellobench-<pid>-<time>` under the export), and the
    /// builder's layer store on it.
    ///
    /// # Errors
    /// The server unreachable (within 10 s) or the store failing to open.
    pub async fn open_nfs(addr: &str, registry: &str, work: &Path) -> Result<Arc<Self>> {
        let (_, stamp) = crate::sys::now_utc();
        let dir = format!(
            "hellobench-{}-{}",
            std::process::id(),
            stamp.replace([':', '-'], "").to_lowercase()
        );
        let backend = NfsBuilder::new(addr)
            .dir(dir.clone())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .await
            .with_context(|| format!("connecting to the NFS server {addr}"))?;
        let clone = if backend.uses_clone() {
            "server-side CLONE"
        } else {
            "server-side COPY (the export cannot CLONE)"
        };
        let description = format!("NFSv4.2 server {addr}, directory /{dir} ({clone})");
        Self::with_backend(
            Arc::new(backend),
            description,
            false,
            registry,
            &work.join("slacker-meta-nfs"),
            work,
        )
        .await
    }

    pub(crate) async fn with_backend(
        backend: Arc<dyn Backend>,
        description: String,
        local: bool,
        registry: &str,
        meta: &Path,
        work: &Path,
    ) -> Result<Arc<Self>> {
        let meta = meta.to_path_buf();
        let scratch = work.join("slacker-scratch");
        std::fs::create_dir_all(&scratch)?;
        let builder = LayerStore::open(
            backend.clone(),
            dir_store(&meta.join("builder"))?,
            LayerStoreOptions::new("builder")
                .with_volume_size(MIN_VOLUME)
                .with_scratch_dir(&scratch),
        )
        .await
        .context("opening the builder's layer store")?;
        Ok(Arc::new(Self {
            backend,
            builder,
            imports: tokio::sync::Mutex::new(HashMap::new()),
            registry: registry.to_owned(),
            meta,
            scratch,
            description,
            local,
        }))
    }

    /// Removes the imported images (the builder's layers and their snapshots) from the
    /// storage: for storage that outlives the run (an NFS server). Best effort.
    pub async fn remove_imports(&self) {
        let layers: Vec<String> = self.imports.lock().await.drain().map(|(_, l)| l).collect();
        for l in layers {
            if let Err(e) = ignore_not_found(self.builder.remove(&l).await) {
                crate::progress!("storage: leaving imported layer {l}: {e}");
            }
        }
    }

    /// Bytes allocated to the developer's volume `vol`, a clone of the imported `base`.
    async fn used_bytes(&self, vol: &slacker_core::VolumeId, base: &str) -> Result<u64> {
        if self.local {
            let path = self.backend.local_path(vol).await?;
            return Ok(std::fs::metadata(&path)
                .with_context(|| format!("stat {}", path.display()))?
                .blocks()
                * 512);
        }
        // No local file: the blocks the import wrote (the clone shares them).
        let snap = self
            .builder
            .layer(base)
            .await?
            .snapshot
            .ok_or_else(|| Error::msg(format!("imported layer {base} has no snapshot")))?;
        let st = self.backend.stat_snapshot(&snap).await?;
        Ok(st.diverged.len() * st.block_size.bytes())
    }

    /// Where the storage is, for the results' notes.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The developer's (builder's) layer store.
    pub(crate) fn builder(&self) -> &LayerStore<Arc<dyn Backend>> {
        &self.builder
    }

    /// The builder's layer holding `image` as ext4, imported on first use (untimed).
    pub(crate) async fn import(&self, image: &BuiltImage) -> Result<(String, Option<f64>)> {
        let mut imports = self.imports.lock().await;
        if let Some(l) = imports.get(&image.spec.name) {
            return Ok((l.clone(), None));
        }
        let layer = format!("img-{}", image.spec.name);
        let t = Instant::now();
        let applied = self
            .builder
            .import_dir(&layer, &image.root)
            .await
            .with_context(|| format!("importing {} into a volume", image.root.display()))?;
        let secs = t.elapsed().as_secs_f64();
        crate::progress!(
            "storage: {} imported as ext4 into a {} volume in {secs:.1} s (untimed)",
            image.spec.name,
            crate::report::fmt_bytes(applied.size)
        );
        imports.insert(image.spec.name.clone(), layer.clone());
        Ok((layer, Some(secs)))
    }
}

/// Per-image state between phases. Field order is drop order: the container's mounts go
/// before the ext4 mount they live in.
#[derive(Default)]
struct State {
    running: Option<Running>,
    mount: Option<Mount>,
    /// The developer's container (builder store), pushed by `push`.
    dev_layer: Option<String>,
    /// Bytes allocated to the developer's volume (the image's used bytes).
    used_bytes: u64,
    image_ref: Option<String>,
    /// The snapshot `push` made.
    pushed: Option<SnapshotId>,
    /// The pulled top layer (worker store).
    top: Option<String>,
    /// `get` without `put`.
    got: bool,
    /// Backend bytes read before the run started (slacker-lazy).
    fetched_before: u64,
    /// Loop devices' read counters before the run attached one.
    loops_before: storage::LoopReads,
    /// Registry clients for this repetition's push and pull, built in `prepare`.
    push_client: Option<RegistryClient>,
    pull_client: Option<RegistryClient>,
    /// Clients `push` and `pull` used, dropped untimed by `clean` (see `crate::path::Path`).
    spent_clients: Vec<RegistryClient>,
    /// The run's Merkle verifier (lazy modes), for its stats.
    verifier: Option<Arc<MerkleVerifier>>,
    /// slacker-lazy-trace: the trace recorded in `prepare`, pushed by `push`.
    recorded: Option<StartupTrace>,
    /// slacker-lazy-trace: the trace `pull` fetched from the registry.
    trace: Option<StartupTrace>,
    /// Snapshots pushed by the recording deploy, removed by `clean`.
    extra_pushed: Vec<SnapshotId>,
}

/// Slacker's path in one of its two [`Mode`]s.
pub struct SlackerPath {
    // Declared first: dropped (containers stopped, mounts torn down) before the stores.
    state: HashMap<String, State>,
    mode: Mode,
    storage: Arc<Storage>,
    worker: LayerStore<Arc<dyn Backend>>,
    /// What the worker reads through: the backend, or Counting(Throttled(backend)).
    data: Arc<dyn Backend>,
    counting: Option<Arc<Counting<Arc<dyn Backend>>>>,
    cache: Arc<BlockCache>,
    link: Option<LinkProfile>,
    timeout: Duration,
    mnt_dir: PathBuf,
    logs: PathBuf,
    counter: u64,
    run_tag: String,
}

impl SlackerPath {
    /// A path in `mode` whose worker store shares `storage`'s backend. `link` (slacker-lazy
    /// only) puts the worker's backend behind an emulated network link. Mounts and logs go
    /// under `work`.
    ///
    /// # Errors
    /// The worker's layer store failing to open.
    pub async fn new(
        mode: Mode,
        storage: Arc<Storage>,
        link: Option<LinkProfile>,
        timeout: Duration,
        work: &Path,
    ) -> Result<Self> {
        let (data, counting, link) = match mode {
            Mode::Kernel => (storage.backend.clone(), None, None),
            Mode::Nfs | Mode::Rbd => {
                let c = Arc::new(Counting::new(storage.backend.clone()));
                (c.clone() as Arc<dyn Backend>, Some(c), None)
            }
            Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead => {
                let inner: Arc<dyn Backend> = match link {
                    Some(p) => Arc::new(Throttled::new(storage.backend.clone(), p)),
                    None => storage.backend.clone(),
                };
                let c = Arc::new(Counting::new(inner));
                (c.clone() as Arc<dyn Backend>, Some(c), link)
            }
        };
        let store_name = match mode {
            Mode::Kernel => "worker",
            Mode::Lazy => "worker-lazy",
            Mode::LazyTrace => "worker-trace",
            Mode::LazyNoReadAhead => "worker-nora",
            Mode::Nfs => "worker-nfs",
            Mode::Rbd => "worker-rbd",
        };
        let worker = LayerStore::open(
            data.clone(),
            dir_store(&storage.meta.join(store_name))?,
            LayerStoreOptions::new(store_name)
                .with_volume_size(MIN_VOLUME)
                .with_scratch_dir(&storage.scratch),
        )
        .await
        .with_context(|| format!("opening the {store_name} layer store"))?;
        let mnt_dir = work.join("slacker-mnt");
        std::fs::create_dir_all(&mnt_dir)?;
        let (_, stamp) = crate::sys::now_utc();
        Ok(Self {
            state: HashMap::new(),
            mode,
            storage,
            worker,
            data,
            counting,
            cache: Arc::new(BlockCache::new(CACHE_BYTES)),
            link,
            timeout,
            mnt_dir,
            logs: work.to_path_buf(),
            counter: 0,
            run_tag: stamp.replace([':', '-'], "").to_lowercase(),
        })
    }

    /// A description of this mode for the results' notes.
    pub fn describe(&self) -> String {
        match self.mode {
            Mode::Kernel => format!(
                "{}: push = snapshot + reference layer + config + manifest to the registry; pull = manifest + config + reference layer, apply_diff (lazy: no data); run = get (btrfs clone) + losetup --direct-io on the clone's local file + mount ext4 + /proc, /dev, chroot, readiness; bytes read = the loop device's sectors read ×512 when ready (local storage, counted as the run's network bytes); storage: {}",
                self.mode.name(),
                self.storage.describe()
            ),
            Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead => format!(
                "{}: as slacker, but run = get + LazyVolume ({}) over Counting({}btrfs) + FUSE disk.img + losetup + mount ext4; one 1 GiB BlockCache shared by all runs of the path; fetched = backend bytes read before readiness; every fetched block verified against the reference layer's Merkle root{}",
                self.mode.name(),
                if self.mode == Mode::LazyNoReadAhead {
                    "read-ahead off: no read-ahead on a miss, no sequential window"
                } else {
                    "default options: 16 KiB read-ahead on a miss, sequential window up to 1 MiB"
                },
                match self.link {
                    Some(l) => format!(
                        "Throttled({} µs per request, {} Mbit/s: an emulated network to the storage; the registry is behind the same profile, see the fair link note), ",
                        l.latency.as_micros(),
                        l.bandwidth_bytes_per_sec.map_or(0, |b| b * 8 / 1_000_000)
                    ),
                    None => "no emulated link, ".into(),
                },
                if self.mode == Mode::LazyTrace {
                    format!(
                        "; with a startup trace: prepare records one by an untimed deploy (unthrottled), push attaches it to the pushed manifest as an OCI referrer (fallback tag sha256-<hex>), pull fetches it alongside the image (slacker_oci::deploy::pull_with_trace), run prefetches at most {} MiB of it ({} requests in flight) in the background while mounting and starting, with blind read-ahead off, on a cleared cache (a fresh worker)",
                        TRACE_PREFETCH_BYTES >> 20,
                        LazyVolumeOptions::default().prefetch_parallelism
                    )
                } else {
                    String::new()
                }
            ),
            Mode::Nfs => format!(
                "{}: push = snapshot (server-side) + reference layer + config + manifest; pull = manifest + config + reference layer, apply_diff (lazy: no data); run = get (server-side clone) + LazyVolume (default options) over Counting(NfsBackend) + FUSE disk.img + losetup + mount ext4 + /proc, /dev, chroot, readiness; the real network path to the NFS server, no emulated link; one 1 GiB BlockCache shared by all runs of the path; fetched = backend bytes read before readiness; prepare imports each image (ext4) into an NFS volume once (untimed); storage: {}",
                self.mode.name(),
                self.storage.describe()
            ),
            Mode::Rbd => format!(
                "{}: push = RBD snapshot + reference layer + config + manifest; pull = manifest + config + reference layer, apply_diff (lazy: no data); run = get (RBD clone, format 2) + LazyVolume (default options) over Counting(RbdBackend, librbd in process) + FUSE disk.img + losetup + mount ext4 + /proc, /dev, chroot, readiness; the real network path to the OSD, no emulated link; one 1 GiB BlockCache shared by all runs of the path; fetched = backend bytes read before readiness; prepare imports each image (ext4) into an RBD volume once (untimed); storage: {}",
                self.mode.name(),
                self.storage.describe()
            ),
        }
    }

    fn st(&mut self, image: &BuiltImage) -> &mut State {
        self.state.entry(image.spec.name.clone()).or_default()
    }

    fn fetched_so_far(&self) -> u64 {
        self.counting
            .as_ref()
            .map_or(0, |c| c.counts().bytes_read())
    }

    /// slacker-lazy-trace: one untimed deploy of `image` (this path's own push, pull, run
    /// to readiness and stop) whose read set becomes the startup trace. What it made is
    /// removed (its pushed snapshot by `clean`) and the worker's cache is cleared, so the
    /// timed deploy starts on a fresh worker.
    async fn record_trace(&mut self, image: &BuiltImage) -> Result<StartupTrace> {
        self.push(image).await?;
        self.pull(image).await?;
        self.run(image).await?;
        let trace = {
            let st = self.st(image);
            let v = st
                .mount
                .as_ref()
                .and_then(|m| m.volume())
                .ok_or_else(|| Error::msg("the recording deploy has no lazy volume"))?;
            let bs = v.block_size();
            StartupTrace::new(bs, (v.size() / bs.bytes()) as u32, v.access_trace())
        };
        self.stop(image).await?;
        let st = self.st(image);
        let (top, pushed) = (st.top.take(), st.pushed.take());
        st.image_ref = None;
        if let Some(top) = top {
            self.worker.remove(&top).await?;
        }
        if let Some(p) = pushed {
            self.st(image).extra_pushed.push(p);
        }
        self.cache.clear();
        Ok(trace)
    }

    fn mount_options(&self) -> MountOptions {
        MountOptions::default().with_work_dir(&self.mnt_dir)
    }
}

#[async_trait]
impl BenchPath for SlackerPath {
    fn name(&self) -> &str {
        self.mode.name()
    }

    async fn prepare(&mut self, image: &BuiltImage) -> Result<Step> {
        let (base, import_secs) = self.storage.import(image).await?;
        self.counter += 1;
        let dev = format!("dev-{}-{}", self.mode.name(), self.counter);
        let builder = &self.storage.builder;
        let vol = builder.create(&dev, Some(&base)).await?;
        let used = self.storage.used_bytes(&vol, &base).await?;
        let st = self.st(image);
        st.dev_layer = Some(dev.clone());
        st.used_bytes = used;
        // Fresh clients, built here untimed (see `crate::path::Path::prepare`).
        st.push_client = Some(RegistryClient::new(ClientOptions::plain_http()));
        st.pull_client = Some(RegistryClient::new(ClientOptions::plain_http()));
        let mut parts = Vec::new();
        if let Some(s) = import_secs {
            parts.push(("import (mke2fs -d + write)".to_string(), s));
        }
        if self.mode == Mode::LazyTrace {
            let t = Instant::now();
            let trace = self.record_trace(image).await?;
            parts.push((
                "record a startup trace (untimed deploy)".into(),
                t.elapsed().as_secs_f64(),
            ));
            let st = self.st(image);
            st.recorded = Some(trace);
            st.push_client = Some(RegistryClient::new(ClientOptions::plain_http()));
            st.pull_client = Some(RegistryClient::new(ClientOptions::plain_http()));
        }
        Ok(Step {
            parts,
            notes: vec![format!(
                "developer's container: layer {dev} cloned from {base}; {} allocated",
                crate::report::fmt_bytes(used)
            )],
            ..Step::default()
        })
    }

    async fn push(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let dev = self
            .st(image)
            .dev_layer
            .clone()
            .ok_or_else(|| Error::msg("push before prepare"))?;
        let reference = format!(
            "{}/hellobench-slacker/{}:{}-{}",
            self.storage.registry, image.spec.name, self.run_tag, self.counter
        );
        let client = self
            .st(image)
            .push_client
            .take()
            .ok_or_else(|| Error::msg("push before prepare"))?;
        let report = client
            .push_image(
                &self.storage.builder,
                &dev,
                &reference,
                &PushOptions::default(),
            )
            .await
            .with_context(|| format!("pushing {reference}"))?;
        let snapshot = self.storage.builder.layer(&dev).await?.snapshot;
        let mut trace_note = None;
        if let Some(trace) = self.st(image).recorded.take() {
            let t = client
                .push_trace(&reference, &trace)
                .await
                .with_context(|| format!("attaching the startup trace to {reference}"))?;
            trace_note = Some(format!(
                "startup trace ({} B of blocks) attached as {} (fallback tag {})",
                trace.bytes(),
                t.manifest_digest,
                t.fallback_tag
            ));
        }
        let st = self.st(image);
        st.spent_clients.push(client);
        st.image_ref = Some(reference);
        st.pushed = snapshot.clone();
        let mut notes = vec![format!(
            "manifest {}; snapshot {}",
            report.manifest_digest,
            snapshot.map_or_else(|| "?".into(), |s| s.to_string())
        )];
        notes.extend(trace_note);
        Ok(Step {
            network_bytes: report.bytes_uploaded(),
            layer_bytes: Some(report.layer_bytes_uploaded()),
            notes,
            ..Step::default()
        })
    }

    async fn pull(&mut self, image: &BuiltImage) -> Result<Step> {
        let reference = self
            .st(image)
            .image_ref
            .clone()
            .ok_or_else(|| Error::msg("pull before push"))?;
        let client = self
            .st(image)
            .pull_client
            .take()
            .ok_or_else(|| Error::msg("pull before prepare"))?;
        // slacker-lazy-trace deploys the way a runtime would (slacker_oci::deploy): the
        // trace is fetched alongside the pull, after the manifest.
        let (report, pulled_trace) = if self.mode == Mode::LazyTrace {
            let p = client
                .pull_with_trace(&self.worker, &reference, &DeployOptions::default())
                .await
                .with_context(|| format!("pulling {reference} with its startup trace"))?;
            (p.pull, Some(p.trace))
        } else {
            let report = client
                .pull_image(&self.worker, &reference)
                .await
                .with_context(|| format!("pulling {reference}"))?;
            (report, None)
        };
        self.st(image).spent_clients.push(client);
        let kinds: Vec<String> = report
            .layers
            .iter()
            .map(|l| format!("{:?} {} B", l.kind, l.blob.size))
            .collect();
        self.st(image).top = Some(report.top_layer.clone());
        let mut notes = vec![format!(
            "manifest {} B, config {} B, layers: {}",
            report.manifest_bytes,
            report.config_bytes,
            kinds.join(", ")
        )];
        let mut trace_bytes = 0;
        if let Some(pulled) = pulled_trace {
            match pulled {
                Some(p) => {
                    trace_bytes = p.bytes;
                    notes.push(format!(
                        "startup trace {} ({} B fetched, {} B of blocks)",
                        p.manifest_digest,
                        p.bytes,
                        p.trace.bytes()
                    ));
                    self.st(image).trace = Some(p.trace);
                }
                None => notes.push("no startup trace: runs as slacker-lazy".into()),
            }
        }
        Ok(Step {
            network_bytes: report.bytes_downloaded() + trace_bytes,
            layer_bytes: Some(report.layer_bytes_downloaded()),
            notes,
            ..Step::default()
        })
    }

    async fn run(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let name = image.spec.name.clone();
        let top = self
            .st(image)
            .top
            .clone()
            .ok_or_else(|| Error::msg("run before pull"))?;
        let before = self.fetched_so_far();
        self.st(image).fetched_before = before;
        let log = self
            .logs
            .join(format!("{}-{name}-{}.log", self.mode.name(), self.counter));
        let readiness = image.spec.readiness.clone();
        let timeout = self.timeout;
        let opts = self.mount_options();

        let t = Instant::now();
        let vol = self.worker.get(&top).await?;
        self.st(image).got = true;
        let loops = storage::LoopReads::now();
        self.st(image).loops_before = loops.clone();
        let t_get = t.elapsed().as_secs_f64();
        let image_bytes = self.worker.layer(&top).await?.size;
        // Mount the clone by this mode's route and start the container; if anything fails,
        // the guards tear down on this blocking thread.
        let started = match self.mode {
            Mode::Kernel => {
                let path = self.data.local_path(&vol).await?;
                blocking(move || {
                    let t = Instant::now();
                    let m = Mount::local_file(&path, &opts)
                        .with_context(|| format!("loop-mounting {}", path.display()))?;
                    let t_mount = t.elapsed().as_secs_f64();
                    start(m, t_mount, &loops, &readiness, timeout, &log)
                })
                .await
            }
            Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead | Mode::Nfs | Mode::Rbd => {
                let info = self.worker.layer(&top).await?;
                let mut options = LazyVolumeOptions::default();
                if self.mode == Mode::LazyNoReadAhead {
                    options = options.with_read_ahead(0).with_max_read_ahead(0);
                }
                if let Some(m) = &info.merkle {
                    let v = MerkleVerifier::open(
                        self.data.clone(),
                        m,
                        info.size,
                        slacker_core::BlockSize::DEFAULT,
                    )
                    .await?;
                    let v = Arc::new(v);
                    self.st(image).verifier = Some(v.clone());
                    options = options.with_verifier(v);
                }
                if self.st(image).trace.is_some() && !DeployOptions::default().read_ahead_with_trace
                {
                    // As slacker_oci::deploy does: the trace names the blocks the start
                    // reads, so blind read-ahead would only add bytes.
                    options = options.with_read_ahead(0).with_max_read_ahead(0);
                }
                let lazy =
                    LazyVolume::open(self.data.clone(), vol, self.cache.clone(), options).await?;
                if let Some(trace) = self.st(image).trace.take() {
                    // In the background, while FUSE, loop, mount and the container start.
                    drop(lazy.prefetch(trace.clipped(TRACE_PREFETCH_BYTES)));
                }
                blocking(move || {
                    let t = Instant::now();
                    let m = Mount::lazy(lazy, &opts).context("FUSE + loop mount")?;
                    let t_mount = t.elapsed().as_secs_f64();
                    start(m, t_mount, &loops, &readiness, timeout, &log)
                })
                .await
            }
        };
        let (mount, running, read, t_mount) = started.with_context(|| format!("running {name}"))?;
        let mut parts_verify: Option<f64> = None;
        let total = t.elapsed().as_secs_f64();
        let fetched = self.fetched_so_far() - before;
        let mut notes = vec![format!("ready: {}", running.answer)];
        if let Some(v) = self.st(image).verifier.take() {
            let s = v.stats();
            notes.push(format!(
                "verified {} blocks against the Merkle root: {:.2} ms hashing, {} tree blocks fetched ({} B)",
                s.blocks,
                s.hash_nanos as f64 / 1e6,
                s.tree_fetches,
                s.tree_bytes
            ));
            parts_verify = Some(s.hash_nanos as f64 / 1e9);
        }
        if let Some(v) = mount.volume() {
            let m = v.metrics();
            notes.push(format!(
                "data path: {} reads ({} B), {} backend requests fetching {} B, cache hits {} / misses {} (blocks), {} read-ahead blocks",
                m.reads,
                m.read_bytes,
                m.backend_requests,
                m.fetched_bytes,
                m.cache_hits,
                m.cache_misses,
                m.read_ahead_blocks
            ));
        }
        if let Some(f) = mount.fuse() {
            let f = f.stats();
            notes.push(format!(
                "FUSE: {} reads, at most {} served at once (async direct IO: {})",
                f.reads, f.peak_reads_in_flight, f.async_dio
            ));
        }
        let st = self.st(image);
        let used = st.used_bytes;
        st.mount = Some(mount);
        st.running = Some(running);
        // Kernel path: the storage is local, so what the loop device read from the clone is
        // what a shared-storage deployment would have fetched.
        let fetched = match self.mode {
            Mode::Kernel => read,
            Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead | Mode::Nfs | Mode::Rbd => fetched,
        };
        Ok(Step {
            network_bytes: fetched,
            read_bytes: Some(read),
            fetched_bytes: Some(fetched),
            image_bytes: Some(image_bytes),
            image_used_bytes: Some(used),
            parts: vec![
                ("get (clone)".into(), t_get),
                (
                    match self.mode {
                        Mode::Kernel => "loop mount".into(),
                        Mode::Lazy
                        | Mode::LazyTrace
                        | Mode::LazyNoReadAhead
                        | Mode::Nfs
                        | Mode::Rbd => "FUSE + loop mount".into(),
                    },
                    t_mount,
                ),
                ("start+ready".into(), total - t_get - t_mount),
            ]
            .into_iter()
            .chain(parts_verify.map(|s| ("of which verify (hash, all threads)".to_string(), s)))
            .collect(),
            notes,
            ..Step::default()
        })
    }

    async fn stop(&mut self, image: &BuiltImage) -> Result<Step> {
        let before = self.st(image).fetched_before;
        let st = self.st(image);
        let loops = std::mem::take(&mut st.loops_before);
        let (running, mount) = (st.running.take(), st.mount.take());
        let got = std::mem::take(&mut st.got);
        let top = st.top.clone();
        let read = blocking(move || {
            let r = running.map_or(Ok(()), Running::stop);
            let mut read = None;
            if let Some(m) = mount {
                read = m.loop_device().and_then(|d| loops.since(d).ok());
                m.unmount().context("unmounting the container's ext4")?;
            }
            r.map(|()| read)
        })
        .await?;
        if got && let Some(top) = top {
            self.worker.put(&top).await?;
        }
        let mut notes = Vec::new();
        if let Some(r) = read {
            notes.push(format!("loop device read {r} B in all (until stop)"));
        }
        if self.counting.is_some() {
            notes.push(format!(
                "fetched {} B in all (until stop)",
                self.fetched_so_far() - before
            ));
        }
        Ok(Step {
            notes,
            ..Step::default()
        })
    }

    async fn clean(&mut self, image: &BuiltImage) -> Result<()> {
        let st = self.state.remove(&image.spec.name).unwrap_or_default();
        let State {
            running,
            mount,
            dev_layer,
            pushed,
            top,
            got,
            extra_pushed,
            ..
        } = st;
        blocking(move || {
            drop(running);
            drop(mount);
            Ok(())
        })
        .await?;
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(top) = &top {
            if got {
                note(ignore_not_found(self.worker.put(top).await));
            }
            note(
                ignore_not_found(self.worker.remove(top).await)
                    .context("removing the pulled layer"),
            );
        }
        if let Some(dev) = &dev_layer {
            note(
                ignore_not_found(self.storage.builder.remove(dev).await)
                    .context("removing the developer's layer"),
            );
        }
        for s in &extra_pushed {
            note(
                ignore_not_found(self.storage.backend.remove_snapshot(s).await)
                    .context("removing the recording deploy's snapshot"),
            );
        }
        if let Some(s) = &pushed {
            note(
                ignore_not_found(self.storage.backend.remove_snapshot(s).await)
                    .context("removing the pushed snapshot"),
            );
        }
        first.map_or(Ok(()), Err)
    }
}

/// Start the container in `m`'s root; on failure `m` is torn down here. Also returns the
/// bytes its loop device read (since `loops` was taken, just before attaching).
fn start(
    m: Mount,
    t_mount: f64,
    loops: &storage::LoopReads,
    readiness: &crate::spec::Readiness,
    timeout: Duration,
    log: &Path,
) -> Result<(Mount, Running, u64, f64)> {
    let running = container::start_and_wait(m.root(), readiness, timeout, log)?;
    let read = match m.loop_device() {
        Some(d) => loops.since(d)?,
        None => 0,
    };
    Ok((m, running, read, t_mount))
}
