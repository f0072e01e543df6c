//! [`NfsBackend`]: volumes as files on an NFSv4.2 export, snapshots and clones by
//! server-side CLONE (or COPY), metadata next to the data.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use slacker_core::backend::{check_range, validate_holder};
use slacker_core::persist::CrashPlan;
use slacker_core::{
    Backend, BackendInfo, BlockBitmap, BlockRange, Capabilities, DedupReport, Error, ObjectKind,
    Result, SnapshotId, SnapshotStat, Usage, VolumeId, VolumeOptions, VolumeStat,
};

use crate::client::{ClientOptions, FileType, NfsClient};
use crate::config::{CloneMode, NfsConfig, SCHEME};
use crate::error::NfsError;
use crate::meta::{self, FORMAT, SnapshotDoc, SnapshotName, VolumeDoc, VolumeName};
use crate::remote::{Dir, Remote};

/// Before a write touches blocks the volume's document does not yet cover, the
/// document is rewritten to cover them, rounded out to this many bytes, so that a
/// sequential writer rewrites it once per 4 MiB, not once per write.
const INTENT_GRANULE: u64 = 4 << 20;
/// All-zero writes at least this long punch a hole (DEALLOCATE) instead of writing.
const ZERO_HOLE_MIN: usize = 64 << 10;
/// How long `hold_snapshot` waits for a concurrent `remove_snapshot` to decide.
const REMOVAL_WAIT: Duration = Duration::from_secs(5);

/// What [`NfsBackend::gc`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Files and directories left behind by interrupted operations that were removed.
    pub removed: usize,
    /// Leftovers kept because they were younger than the grace period (they may belong
    /// to another worker's operation in progress).
    pub kept_young: usize,
}

/// A backend keeping volumes and snapshots as files on an NFSv4.2 server, shared by
/// every worker that mounts the same directory. See the [crate docs](crate) for the
/// layout, the order of steps that makes every operation crash-safe, and what several
/// workers may do at once.
///
/// Cheap to clone (the clones share the session and caches). Dropping the last clone
/// closes the session in the background; [`close`](Self::close) does it in the
/// foreground.
#[derive(Clone)]
pub struct NfsBackend {
    inner: Arc<Inner>,
}

struct Inner {
    remote: Remote,
    config: NfsConfig,
    /// CLONE (true) or COPY (false).
    cloning: AtomicBool,
    vols: Mutex<HashMap<VolumeId, Arc<Vol>>>,
    snaps: Mutex<HashMap<String, Arc<SnapshotDoc>>>,
    instance: String,
    counter: AtomicU64,
    seed: [u8; 32],
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.remote.client().clone();
            rt.spawn(async move {
                let _ = client.close().await;
            });
        }
    }
}

/// A volume this backend has loaded. `doc` holds what never changes for one
/// incarnation of the volume (size, block size, origin, data file).
struct Vol {
    doc: VolumeDoc,
    /// Writes take it shared; flush, snapshot and remove exclusively.
    io: tokio::sync::RwLock<()>,
    /// Serializes rewrites of the volume's document.
    persist: tokio::sync::Mutex<()>,
    st: Mutex<VolState>,
}

struct VolState {
    /// Blocks that may differ from the origin: everything the server's documents said
    /// plus everything written through this backend (including writes in flight).
    known: BlockBitmap,
    /// What the document on the server covers (its `diverged ∪ pending`), as last
    /// written or read by this backend. A write proceeds only inside it.
    covered: BlockBitmap,
    /// The `pending` set of the last document this backend wrote.
    pending: BlockBitmap,
    /// Stamp of the document on the server, as last written or read.
    stamp: String,
    removed: bool,
}

impl Vol {
    fn new(doc: VolumeDoc) -> Arc<Self> {
        let may = doc.may_differ();
        Arc::new(Self {
            st: Mutex::new(VolState {
                known: may.clone(),
                covered: may,
                pending: BlockBitmap::new(),
                stamp: doc.stamp.clone(),
                removed: false,
            }),
            doc,
            io: tokio::sync::RwLock::new(()),
            persist: tokio::sync::Mutex::new(()),
        })
    }

    fn st(&self) -> MutexGuard<'_, VolState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn doc_name(&self) -> String {
        meta::volume_doc(&self.doc.id)
    }
}

/// Why an operation on a loaded volume failed: the incarnation is gone (retry with a
/// fresh load), or a final error.
enum Fail {
    Gone,
    Err(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Err(e)
    }
}

impl From<NfsError> for Fail {
    fn from(e: NfsError) -> Self {
        Fail::Err(e.into())
    }
}

/// Maps "no such file" to [`Fail::Gone`].
fn gone(e: NfsError) -> Fail {
    if e.is_gone() {
        Fail::Gone
    } else {
        Fail::Err(e.into())
    }
}

/// Runs `$body` (an expression of type `Result<T, Fail>` that may use `?`) on the
/// loaded volume `$vol`; if the volume turns out to be gone (removed, or re-created by
/// another worker), drops it from the cache and tries once more with a fresh load.
macro_rules! on_volume {
    ($self:ident, $id:expr, |$vol:ident| $body:expr) => {{
        let id: &VolumeId = $id;
        let mut attempt = 0;
        loop {
            let $vol = $self.vol(id).await?;
            let r: std::result::Result<_, Fail> = async { $body }.await;
            match r {
                Ok(v) => break Ok(v),
                Err(Fail::Gone) => {
                    $self.evict_vol(id, &$vol);
                    if attempt > 0 {
                        break Err(Error::not_found(ObjectKind::Volume, id));
                    }
                    attempt += 1;
                }
                Err(Fail::Err(e)) => break Err(e),
            }
        }
    }};
}

fn snap_key(id: &SnapshotId) -> Result<&str> {
    if id.scheme() != SCHEME {
        return Err(Error::invalid(format!(
            "snapshot id {id} belongs to the {} backend, not {SCHEME}",
            id.scheme()
        )));
    }
    Ok(id.key())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl fmt::Debug for NfsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsBackend")
            .field("server", &self.inner.config.server)
            .field("base", &self.inner.config.base_path())
            .field("cloning", &self.inner.cloning.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl NfsBackend {
    pub(crate) async fn open(config: NfsConfig, plan: Option<Arc<CrashPlan>>) -> Result<Self> {
        if config.server.trim().is_empty() {
            return Err(NfsError::Config("the NFS server address is empty".into()).into());
        }
        let base = config.base_path();
        if base.split('/').any(|c| c == "..") {
            return Err(NfsError::Config(format!(
                "export {:?} / dir {:?} must not contain ..",
                config.export, config.dir
            ))
            .into());
        }
        let opts = ClientOptions {
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            rpc_timeout: Duration::from_millis(config.rpc_timeout_ms),
            reconnect_timeout: Duration::from_millis(config.reconnect_timeout_ms),
            retry_timeout: Duration::from_millis(config.reconnect_timeout_ms.max(10_000)),
            machine_name: format!("slacker@{}", hostname()),
            ..ClientOptions::default()
        };
        let client = NfsClient::connect(&config.server, opts)
            .await
            .map_err(|source| NfsError::Client {
                server: config.server.clone(),
                path: base.clone(),
                source,
            })?;
        let remote = Remote::open(client, config.server.clone(), base, plan).await?;

        let mut h = blake3::Hasher::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(hostname().as_bytes());
        h.update(&RandomState::new().build_hasher().finish().to_le_bytes());
        h.update(config.server.as_bytes());
        let seed = *h.finalize().as_bytes();

        let cloning = match config.clone_mode {
            CloneMode::Copy => false,
            CloneMode::Auto => remote.can_clone().await?,
            CloneMode::Clone => {
                if !remote.can_clone().await? {
                    return Err(Error::Unsupported {
                        operation: "CLONE on this server (clone_mode \"clone\")",
                        backend: SCHEME,
                    });
                }
                true
            }
        };
        let backend = Self {
            inner: Arc::new(Inner {
                remote,
                cloning: AtomicBool::new(cloning),
                vols: Mutex::default(),
                snaps: Mutex::default(),
                instance: hex(&seed[..6]),
                counter: AtomicU64::new(0),
                seed,
                config,
            }),
        };
        let grace = Duration::from_secs(backend.inner.config.gc_grace_secs);
        backend.gc(grace).await?;
        Ok(backend)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &NfsConfig {
        &self.inner.config
    }

    /// Whether snapshots and clones use CLONE (shared extents) rather than COPY.
    pub fn uses_clone(&self) -> bool {
        self.inner.cloning.load(Ordering::Relaxed)
    }

    /// The data file of a volume, as a path relative to the server's NFSv4 root (for
    /// inspecting it on the server).
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    pub async fn volume_file(&self, id: &VolumeId) -> Result<String> {
        let vol = self.vol(id).await?;
        Ok(self.inner.remote.path(Dir::Volumes, &vol.doc.data))
    }

    /// The data file of a snapshot, as a path relative to the server's NFSv4 root.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign id.
    pub async fn snapshot_file(&self, id: &SnapshotId) -> Result<String> {
        let key = snap_key(id)?;
        self.snap_doc(id, false).await?;
        Ok(self
            .inner
            .remote
            .path(Dir::Snapshots, &meta::snapshot_data(key)))
    }

    /// Destroys the session on the server. Further calls fail with a `Backend` error.
    ///
    /// # Errors
    /// `Backend` if the server cannot be told (the session then expires with its lease).
    pub async fn close(&self) -> Result<()> {
        self.inner.remote.client().close().await.map_err(|source| {
            NfsError::Client {
                server: self.inner.config.server.clone(),
                path: self.inner.config.base_path(),
                source,
            }
            .into()
        })
    }

    /// Removes what interrupted operations left behind (data files no metadata names,
    /// temporary files, the remains of a half-done snapshot removal) once it is at
    /// least `grace` old by the server's clock. Runs at build time with
    /// [`NfsConfig::gc_grace_secs`]. A zero grace is only safe when no other worker
    /// uses the directory at the same time.
    ///
    /// # Errors
    /// `Backend` when the server fails.
    pub async fn gc(&self, grace: Duration) -> Result<GcReport> {
        let r = &self.inner.remote;
        // (dir, name, changed, is the holds directory of a snapshot)
        let mut candidates: Vec<(Dir, String, SystemTime, bool)> = Vec::new();
        let mut finish_removal: Vec<(String, SystemTime)> = Vec::new();

        let vols = r.list(Dir::Volumes, None).await?;
        let mut docs = BTreeSet::new();
        let mut data: HashMap<VolumeId, Vec<(String, SystemTime)>> = HashMap::new();
        for e in &vols {
            match meta::parse_volume_name(&e.name) {
                Some(VolumeName::Doc(id)) => {
                    docs.insert(id);
                }
                Some(VolumeName::Data(id)) => data
                    .entry(id)
                    .or_default()
                    .push((e.name.clone(), e.changed)),
                None => {}
            }
        }
        for (id, files) in data {
            // A document names exactly one data file; only a name with several (a
            // leftover of an earlier incarnation) needs its document read.
            if files.len() == 1 && docs.contains(&id) {
                continue;
            }
            let live = if docs.contains(&id) {
                match r.read_file(Dir::Volumes, &meta::volume_doc(&id)).await? {
                    Some(b) => {
                        let doc: VolumeDoc = meta::decode(r.server(), &meta::volume_doc(&id), &b)?;
                        Some(doc.data)
                    }
                    None => None,
                }
            } else {
                None
            };
            for (name, changed) in files {
                if live.as_deref() != Some(name.as_str()) {
                    candidates.push((Dir::Volumes, name, changed, false));
                }
            }
        }

        let tmp = r.list(Dir::Tmp, None).await?;
        let removing: HashMap<String, SystemTime> = tmp
            .iter()
            .filter_map(|e| meta::parse_removing(&e.name).map(|k| (k.to_owned(), e.changed)))
            .collect();
        let snaps = r.list(Dir::Snapshots, None).await?;
        let snap_docs: BTreeSet<String> = snaps
            .iter()
            .filter_map(|e| match meta::parse_snapshot_name(&e.name) {
                Some(SnapshotName::Doc(k)) => Some(k),
                _ => None,
            })
            .collect();
        for e in &snaps {
            let (key, holds) = match meta::parse_snapshot_name(&e.name) {
                Some(SnapshotName::Data(k)) => (k, false),
                Some(SnapshotName::Holds(k)) => (k, true),
                _ => continue,
            };
            if snap_docs.contains(&key) || removing.contains_key(&key) {
                continue; // live, or handled with its removal marker below
            }
            candidates.push((Dir::Snapshots, e.name.clone(), e.changed, holds));
        }
        for e in &tmp {
            match meta::parse_removing(&e.name) {
                Some(key) => finish_removal.push((key.to_owned(), e.changed)),
                None => candidates.push((Dir::Tmp, e.name.clone(), e.changed, false)),
            }
        }
        let mut report = GcReport::default();
        if candidates.is_empty() && finish_removal.is_empty() {
            return Ok(report);
        }
        let now = r.server_time(&self.nonce()).await?;
        let old = |changed: SystemTime| {
            now.duration_since(changed)
                .map(|age| age >= grace)
                .unwrap_or(grace.is_zero())
        };
        for (dir, name, changed, holds) in candidates {
            if !old(changed) {
                report.kept_young += 1;
                continue;
            }
            let res = if holds {
                let key = name.trim_end_matches(".holds").to_owned();
                self.remove_holds_dir(&key).await
            } else {
                r.remove("collect garbage", dir, &name).await
            };
            match res {
                Ok(()) => report.removed += 1,
                Err(e) if e.is_gone() => {}
                Err(e) => return Err(e.into()),
            }
        }
        for (key, changed) in finish_removal {
            if !old(changed) {
                report.kept_young += 1;
                continue;
            }
            self.finish_snapshot_removal(&key).await?;
            report.removed += 1;
        }
        Ok(report)
    }

    fn nonce(&self) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = blake3::Hasher::new();
        h.update(&self.inner.seed);
        h.update(&n.to_le_bytes());
        h.update(&now.as_nanos().to_le_bytes());
        hex(&h.finalize().as_bytes()[..16])
    }

    fn stamp(&self) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::SeqCst);
        format!("{}-{n}", self.inner.instance)
    }

    // ---- volumes -------------------------------------------------------------------

    async fn vol(&self, id: &VolumeId) -> Result<Arc<Vol>> {
        if let Some(v) = self.vols().get(id) {
            return Ok(v.clone());
        }
        let r = &self.inner.remote;
        let name = meta::volume_doc(id);
        let bytes = r
            .read_file(Dir::Volumes, &name)
            .await?
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))?;
        let doc: VolumeDoc = meta::decode(r.server(), &name, &bytes)?;
        let v = Vol::new(doc);
        Ok(self.vols().entry(id.clone()).or_insert(v).clone())
    }

    fn vols(&self) -> MutexGuard<'_, HashMap<VolumeId, Arc<Vol>>> {
        self.inner.vols.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn evict_vol(&self, id: &VolumeId, vol: &Arc<Vol>) {
        let mut vols = self.vols();
        if vols.get(id).is_some_and(|v| Arc::ptr_eq(v, vol)) {
            vols.remove(id);
        }
    }

    /// Reads the volume's document and folds in what another writer recorded.
    async fn refresh(&self, vol: &Vol) -> std::result::Result<(), Fail> {
        let r = &self.inner.remote;
        let name = vol.doc_name();
        let Some(bytes) = r.read_file(Dir::Volumes, &name).await? else {
            return Err(Fail::Gone);
        };
        let doc: VolumeDoc = meta::decode(r.server(), &name, &bytes)?;
        if doc.data != vol.doc.data {
            return Err(Fail::Gone);
        }
        let mut st = vol.st();
        if doc.stamp != st.stamp {
            let may = doc.may_differ();
            st.known = st.known.union(&may);
            st.covered = may;
            st.stamp = doc.stamp;
        }
        Ok(())
    }

    /// Rewrites the volume's document (temporary file, then RENAME over the name).
    async fn write_volume_doc(
        &self,
        vol: &Vol,
        diverged: BlockBitmap,
        pending: BlockBitmap,
    ) -> std::result::Result<String, Fail> {
        let r = &self.inner.remote;
        let stamp = self.stamp();
        let doc = VolumeDoc {
            diverged,
            pending,
            stamp: stamp.clone(),
            ..vol.doc.clone()
        };
        let tmp = r
            .put_temp("write volume metadata", &self.nonce(), &meta::encode(&doc))
            .await?;
        if let Err(e) = r
            .rename(
                "publish volume metadata",
                (Dir::Tmp, &tmp),
                (Dir::Volumes, &vol.doc_name()),
            )
            .await
        {
            if !r.crashed() {
                let _ = r.remove("discard temporary file", Dir::Tmp, &tmp).await;
            }
            return Err(e.into());
        }
        Ok(stamp)
    }

    /// Makes the document cover `touched` (rounded out) before data is written there.
    async fn cover(&self, vol: &Vol, touched: BlockRange) -> std::result::Result<(), Fail> {
        let _p = vol.persist.lock().await;
        if vol.st().covered.contains_range(touched) {
            return Ok(());
        }
        self.refresh(vol).await?;
        let blocks = (vol.doc.size / vol.doc.block_size.bytes()) as u32;
        let g = (INTENT_GRANULE / vol.doc.block_size.bytes()).max(1) as u32;
        let round = BlockRange::new(
            touched.start / g * g,
            touched.end.div_ceil(g).saturating_mul(g).min(blocks),
        );
        let (known, mut pending) = {
            let st = vol.st();
            (st.known.clone(), st.pending.clone())
        };
        pending.insert_range(round);
        let stamp = self
            .write_volume_doc(vol, known.clone(), pending.clone())
            .await?;
        let mut st = vol.st();
        st.covered = known.union(&pending);
        st.pending = pending;
        st.stamp = stamp;
        Ok(())
    }

    /// Writes the exact bitmap into the document (nothing pending). Called with `io`
    /// held exclusively, so no write is in flight.
    async fn persist_exact(&self, vol: &Vol) -> std::result::Result<(), Fail> {
        let _p = vol.persist.lock().await;
        self.refresh(vol).await?;
        let known = {
            let st = vol.st();
            if st.pending.is_empty() && st.covered == st.known {
                return Ok(());
            }
            st.known.clone()
        };
        let stamp = self
            .write_volume_doc(vol, known.clone(), BlockBitmap::new())
            .await?;
        let mut st = vol.st();
        st.covered = known;
        st.pending = BlockBitmap::new();
        st.stamp = stamp;
        Ok(())
    }

    /// Publishes the document of a new volume whose data file exists: LINK of a
    /// temporary file to the name, which fails if the name exists (so that of two
    /// workers creating one name, exactly one succeeds).
    async fn publish_new_volume(&self, doc: &VolumeDoc) -> Result<()> {
        let r = &self.inner.remote;
        let name = meta::volume_doc(&doc.id);
        let tmp = r
            .put_temp("write volume metadata", &self.nonce(), &meta::encode(doc))
            .await?;
        match r
            .link(
                "publish volume metadata",
                (Dir::Tmp, &tmp),
                (Dir::Volumes, &name),
            )
            .await
        {
            Ok(()) => {}
            Err(e) => {
                if !r.crashed() {
                    let _ = r.remove("discard temporary file", Dir::Tmp, &tmp).await;
                    let _ = r.remove("discard data file", Dir::Volumes, &doc.data).await;
                }
                if e.is_exists() {
                    return Err(Error::already_exists(ObjectKind::Volume, &doc.id));
                }
                return Err(e.into());
            }
        }
        if let Err(e) = r.remove("remove temporary file", Dir::Tmp, &tmp).await {
            if r.crashed() {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// CLONE (or COPY) all of `src` onto the new, empty `dst`.
    async fn copy_data(
        &self,
        operation: &'static str,
        src: (Dir, &str),
        dst: (Dir, &str),
        size: u64,
    ) -> std::result::Result<(), NfsError> {
        let r = &self.inner.remote;
        if self.uses_clone() {
            match r.clone_file("clone data", src, dst).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_supported() => {
                    if self.inner.config.clone_mode == CloneMode::Clone {
                        let NfsError::Client { source, .. } = e else {
                            return Err(e);
                        };
                        return Err(NfsError::NoClone {
                            server: r.server().to_owned(),
                            operation,
                            source,
                        });
                    }
                    self.inner.cloning.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        r.copy_file("copy data", src, dst, size).await.map(drop)
    }

    // ---- snapshots -----------------------------------------------------------------

    fn snaps(&self) -> MutexGuard<'_, HashMap<String, Arc<SnapshotDoc>>> {
        self.inner.snaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot's document: from the cache unless `fresh`, else from the server.
    async fn snap_doc(&self, id: &SnapshotId, fresh: bool) -> Result<Arc<SnapshotDoc>> {
        let key = snap_key(id)?;
        if !fresh {
            if let Some(d) = self.snaps().get(key) {
                return Ok(d.clone());
            }
        }
        let r = &self.inner.remote;
        let name = meta::snapshot_doc(key);
        let Some(bytes) = r.read_file(Dir::Snapshots, &name).await? else {
            self.snaps().remove(key);
            return Err(Error::not_found(ObjectKind::Snapshot, id));
        };
        let doc: Arc<SnapshotDoc> = Arc::new(meta::decode(r.server(), &name, &bytes)?);
        self.snaps().insert(key.to_owned(), doc.clone());
        Ok(doc)
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        Ok(self
            .inner
            .remote
            .exists(Dir::Snapshots, &meta::snapshot_doc(key))
            .await?)
    }

    async fn holds(&self, key: &str) -> Result<Vec<String>> {
        match self
            .inner
            .remote
            .list(Dir::Snapshots, Some(&meta::holds_dir(key)))
            .await
        {
            Ok(entries) => {
                let mut v: Vec<String> = entries
                    .into_iter()
                    .filter(|e| {
                        e.file_type == FileType::Regular && validate_holder(&e.name).is_ok()
                    })
                    .map(|e| e.name)
                    .collect();
                v.sort();
                Ok(v)
            }
            Err(e) if e.is_gone() => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_holds_dir(&self, key: &str) -> std::result::Result<(), NfsError> {
        let r = &self.inner.remote;
        let dir = meta::holds_dir(key);
        let entries = match r.list(Dir::Snapshots, Some(&dir)).await {
            Ok(e) => e,
            Err(e) if e.is_gone() => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries {
            match r
                .remove("remove hold", Dir::Snapshots, &format!("{dir}/{}", e.name))
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_gone() => {}
                Err(e) => return Err(e),
            }
        }
        match r
            .remove("remove holds directory", Dir::Snapshots, &dir)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_gone() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The steps of a snapshot removal after its document was renamed away.
    async fn finish_snapshot_removal(&self, key: &str) -> Result<()> {
        let r = &self.inner.remote;
        match r
            .remove(
                "remove snapshot data",
                Dir::Snapshots,
                &meta::snapshot_data(key),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_gone() => {}
            Err(e) => return Err(e.into()),
        }
        match self.remove_holds_dir(key).await {
            Ok(()) => {}
            Err(e) if e.status() == Some(crate::client::Nfs4Status::NotEmpty) => {}
            Err(e) => return Err(e.into()),
        }
        match r
            .remove("remove snapshot metadata", Dir::Tmp, &meta::removing(key))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_gone() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl Backend for NfsBackend {
    fn info(&self) -> BackendInfo {
        let mut caps = Capabilities::default();
        caps.cheap_clone = self.uses_clone();
        caps.shared = true;
        BackendInfo::new(
            SCHEME,
            caps,
            format!(
                "nfs://{}/{}",
                self.inner.config.server,
                self.inner.config.base_path()
            ),
        )
    }

    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        options.validate()?;
        let r = &self.inner.remote;
        if r.exists(Dir::Volumes, &meta::volume_doc(id)).await? {
            return Err(Error::already_exists(ObjectKind::Volume, id));
        }
        let data = meta::volume_data(id, &self.nonce()[..meta::GEN_LEN]);
        r.create_own(
            "create volume data",
            Dir::Volumes,
            &data,
            Some(options.size),
        )
        .await?;
        let doc = VolumeDoc {
            format: FORMAT,
            id: id.clone(),
            size: options.size,
            block_size: options.block_size,
            origin: None,
            data,
            diverged: BlockBitmap::new(),
            pending: BlockBitmap::new(),
            stamp: self.stamp(),
        };
        self.publish_new_volume(&doc).await?;
        self.vols().insert(id.clone(), Vol::new(doc));
        Ok(())
    }

    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        on_volume!(self, id, |vol| {
            check_range(offset, len as u64, vol.doc.size)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            self.inner
                .remote
                .read((Dir::Volumes, &vol.doc.data), None, offset, len)
                .await
                .map_err(gone)
        })
    }

    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        on_volume!(self, id, |vol| {
            check_range(offset, data.len() as u64, vol.doc.size)?;
            if data.is_empty() {
                return Ok(());
            }
            let _io = vol.io.read().await;
            let touched = vol.doc.block_size.blocks_touched(offset, data.len() as u64);
            {
                let mut st = vol.st();
                if st.removed {
                    return Err(Fail::Gone);
                }
                st.known.insert_range(touched);
            }
            self.cover(&vol, touched).await?;
            let r = &self.inner.remote;
            if data.len() >= ZERO_HOLE_MIN && data.iter().all(|&b| b == 0) {
                r.deallocate(
                    "punch hole",
                    Dir::Volumes,
                    &vol.doc.data,
                    offset,
                    data.len() as u64,
                )
                .await
                .map_err(gone)
            } else {
                r.write("write data", Dir::Volumes, &vol.doc.data, offset, data)
                    .await
                    .map_err(gone)
            }
        })
    }

    async fn flush(&self, id: &VolumeId) -> Result<()> {
        on_volume!(self, id, |vol| {
            let _io = vol.io.write().await;
            if vol.st().removed {
                return Err(Fail::Gone);
            }
            self.persist_exact(&vol).await
        })
    }

    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        on_volume!(self, id, |vol| {
            let _io = vol.io.write().await;
            if vol.st().removed {
                return Err(Fail::Gone);
            }
            let r = &self.inner.remote;
            // The volume's own document first (exact bitmap): a failure here leaves
            // no snapshot behind, only an unreferenced data file at worst.
            self.persist_exact(&vol).await?;
            let key = self.nonce();
            let sid = SnapshotId::new(SCHEME, &key)?;
            let data = meta::snapshot_data(&key);
            r.create_own("create snapshot data", Dir::Snapshots, &data, None)
                .await?;
            if let Err(e) = self
                .copy_data(
                    "snapshot",
                    (Dir::Volumes, &vol.doc.data),
                    (Dir::Snapshots, &data),
                    vol.doc.size,
                )
                .await
            {
                if !r.crashed() {
                    let _ = r.remove("discard data file", Dir::Snapshots, &data).await;
                }
                return Err(gone(e));
            }
            let doc = SnapshotDoc {
                format: FORMAT,
                id: sid.clone(),
                size: vol.doc.size,
                block_size: vol.doc.block_size,
                parent: vol.doc.origin.clone(),
                diverged: vol.st().known.clone(),
                source: vol.doc.id.clone(),
            };
            let tmp = r
                .put_temp(
                    "write snapshot metadata",
                    &self.nonce(),
                    &meta::encode(&doc),
                )
                .await?;
            r.rename(
                "publish snapshot metadata",
                (Dir::Tmp, &tmp),
                (Dir::Snapshots, &meta::snapshot_doc(&key)),
            )
            .await?;
            self.snaps().insert(key, Arc::new(doc));
            Ok(sid)
        })
    }

    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        let key = snap_key(snapshot)?;
        let sdoc = self.snap_doc(snapshot, false).await?;
        let r = &self.inner.remote;
        if r.exists(Dir::Volumes, &meta::volume_doc(new)).await? {
            return Err(Error::already_exists(ObjectKind::Volume, new));
        }
        let data = meta::volume_data(new, &self.nonce()[..meta::GEN_LEN]);
        r.create_own("create volume data", Dir::Volumes, &data, None)
            .await?;
        if let Err(e) = self
            .copy_data(
                "clone_snapshot",
                (Dir::Snapshots, &meta::snapshot_data(key)),
                (Dir::Volumes, &data),
                sdoc.size,
            )
            .await
        {
            if !r.crashed() {
                let _ = r.remove("discard data file", Dir::Volumes, &data).await;
            }
            if e.is_gone() {
                self.snaps().remove(key);
                return Err(Error::not_found(ObjectKind::Snapshot, snapshot));
            }
            return Err(e.into());
        }
        let doc = VolumeDoc {
            format: FORMAT,
            id: new.clone(),
            size: sdoc.size,
            block_size: sdoc.block_size,
            origin: Some(snapshot.clone()),
            data,
            diverged: BlockBitmap::new(),
            pending: BlockBitmap::new(),
            stamp: self.stamp(),
        };
        self.publish_new_volume(&doc).await?;
        self.vols().insert(new.clone(), Vol::new(doc));
        Ok(())
    }

    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let key = snap_key(id)?;
        let doc = self.snap_doc(id, false).await?;
        check_range(offset, len as u64, doc.size)?;
        if len == 0 {
            return if self.snapshot_exists(key).await? {
                Ok(Bytes::new())
            } else {
                self.snaps().remove(key);
                Err(Error::not_found(ObjectKind::Snapshot, id))
            };
        }
        let doc_name = meta::snapshot_doc(key);
        match self
            .inner
            .remote
            .read(
                (Dir::Snapshots, &meta::snapshot_data(key)),
                Some((Dir::Snapshots, &doc_name)),
                offset,
                len,
            )
            .await
        {
            Ok(b) => Ok(b),
            Err(e) if e.is_gone() => {
                self.snaps().remove(key);
                Err(Error::not_found(ObjectKind::Snapshot, id))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        on_volume!(self, id, |vol| {
            {
                let _p = vol.persist.lock().await;
                self.refresh(&vol).await?;
            }
            let st = vol.st();
            if st.removed {
                return Err(Fail::Gone);
            }
            Ok(VolumeStat::new(
                id.clone(),
                vol.doc.size,
                vol.doc.block_size,
                vol.doc.origin.clone(),
                st.known.clone(),
                Usage::default(),
            ))
        })
    }

    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let doc = self.snap_doc(id, true).await?;
        let holds = self.holds(id.key()).await?;
        Ok(SnapshotStat::new(
            id.clone(),
            doc.size,
            doc.block_size,
            doc.parent.clone(),
            doc.diverged.clone(),
            holds,
        ))
    }

    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        on_volume!(self, id, |vol| {
            let _io = vol.io.write().await;
            if vol.st().removed {
                return Err(Fail::Gone);
            }
            let r = &self.inner.remote;
            r.remove_durably(
                "remove volume metadata",
                Dir::Volumes,
                &vol.doc_name(),
                &self.nonce(),
            )
            .await
            .map_err(gone)?;
            vol.st().removed = true;
            self.evict_vol(id, &vol);
            match r
                .remove("remove volume data", Dir::Volumes, &vol.doc.data)
                .await
            {
                Err(e) if r.crashed() => Err(e.into()),
                _ => Ok(()),
            }
        })
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let key = snap_key(id)?;
        if !self.snapshot_exists(key).await? {
            self.snaps().remove(key);
            return Err(Error::not_found(ObjectKind::Snapshot, id));
        }
        let in_use = |by: &str| Error::InUse {
            kind: ObjectKind::Snapshot,
            id: id.to_string(),
            by: by.to_owned(),
        };
        if let Some(by) = self.holds(key).await?.first() {
            return Err(in_use(by));
        }
        let r = &self.inner.remote;
        let doc = meta::snapshot_doc(key);
        let marker = meta::removing(key);
        // The linearization point: from here on the snapshot does not exist for anyone.
        match r
            .rename(
                "mark snapshot removed",
                (Dir::Snapshots, &doc),
                (Dir::Tmp, &marker),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_gone() => {
                self.snaps().remove(key);
                return Err(Error::not_found(ObjectKind::Snapshot, id));
            }
            Err(e) => return Err(e.into()),
        }
        // A hold placed concurrently (see hold_snapshot) wins: put the document back.
        if let Some(by) = self.holds(key).await?.first() {
            r.rename(
                "restore snapshot metadata",
                (Dir::Tmp, &marker),
                (Dir::Snapshots, &doc),
            )
            .await?;
            return Err(in_use(by));
        }
        self.snaps().remove(key);
        self.finish_snapshot_removal(key).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        let mut v: Vec<VolumeId> = self
            .inner
            .remote
            .list(Dir::Volumes, None)
            .await?
            .into_iter()
            .filter_map(|e| match meta::parse_volume_name(&e.name) {
                Some(VolumeName::Doc(id)) => Some(id),
                _ => None,
            })
            .collect();
        v.sort();
        Ok(v)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        let mut v: Vec<SnapshotId> = self
            .inner
            .remote
            .list(Dir::Snapshots, None)
            .await?
            .into_iter()
            .filter_map(|e| match meta::parse_snapshot_name(&e.name) {
                Some(SnapshotName::Doc(k)) => SnapshotId::new(SCHEME, &k).ok(),
                _ => None,
            })
            .collect();
        v.sort();
        Ok(v)
    }

    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        validate_holder(holder)?;
        let key = snap_key(id)?;
        let not_found = || Error::not_found(ObjectKind::Snapshot, id);
        if !self.snapshot_exists(key).await? {
            return Err(not_found());
        }
        let r = &self.inner.remote;
        let dir = meta::holds_dir(key);
        let file = format!("{dir}/{holder}");
        let mut created = false;
        for attempt in 0..2 {
            match r
                .mkdir("create holds directory", Dir::Snapshots, &dir)
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e.into()),
            }
            match r.create("place hold", Dir::Snapshots, &file, None).await {
                Ok(()) => {
                    created = true;
                    break;
                }
                Err(e) if e.is_exists() => break,
                // The directory vanished with a concurrent removal.
                Err(e) if e.is_gone() && attempt == 0 => continue,
                Err(e) if e.is_gone() => return Err(not_found()),
                Err(e) => return Err(e.into()),
            }
        }
        // The hold file is in place; the snapshot counts as held if its document still
        // exists now. A remover renames the document away *before* it looks for holds
        // a second time, so one of the two sees the other. The document goes
        // present -> renamed to the marker -> present again (the remover saw a hold) or
        // gone for good; while the marker exists, wait for the remover to decide.
        let deadline = tokio::time::Instant::now() + REMOVAL_WAIT;
        loop {
            if self.snapshot_exists(key).await? {
                return Ok(());
            }
            if !r.exists(Dir::Tmp, &meta::removing(key)).await? {
                // Restored between the two looks?
                if self.snapshot_exists(key).await? {
                    return Ok(());
                }
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if created && !r.crashed() {
            let _ = r.remove("withdraw hold", Dir::Snapshots, &file).await;
            // The remover could not remove the directory while our file was in it.
            let _ = r
                .remove("remove holds directory", Dir::Snapshots, &dir)
                .await;
        }
        Err(not_found())
    }

    /// The holds in parallel: each is a few RPCs on its own snapshot's holds directory,
    /// independent of the others. Returns once every one has finished (placed or failed),
    /// with the first error.
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        validate_holder(holder)?;
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let (b, id, holder) = (self.clone(), id.clone(), holder.to_owned());
            set.spawn(async move { b.hold_snapshot(&id, &holder).await });
        }
        let mut first = None;
        while let Some(r) = set.join_next().await {
            let r = r.map_err(|e| Error::backend(SCHEME, format!("hold task: {e}")))?;
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        let key = snap_key(id)?;
        if !self.snapshot_exists(key).await? {
            return Err(Error::not_found(ObjectKind::Snapshot, id));
        }
        let no_hold = || Error::not_found(ObjectKind::Other, format!("hold {holder:?} on {id}"));
        if validate_holder(holder).is_err() {
            return Err(no_hold());
        }
        let file = format!("{}/{holder}", meta::holds_dir(key));
        match self
            .inner
            .remote
            .remove_durably("release hold", Dir::Snapshots, &file, &self.nonce())
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_gone() => Err(no_hold()),
            Err(e) => Err(e.into()),
        }
    }

    async fn local_path(&self, _id: &VolumeId) -> Result<PathBuf> {
        Err(Error::Unsupported {
            operation: "local_path",
            backend: SCHEME,
        })
    }

    async fn dedup(&self) -> Result<DedupReport> {
        Err(Error::Unsupported {
            operation: "dedup",
            backend: SCHEME,
        })
    }
}
