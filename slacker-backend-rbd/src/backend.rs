//! [`RbdBackend`]: the [`Backend`] trait over RBD images, snapshots and clones.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use slacker_core::backend::{check_range, validate_holder};
use slacker_core::persist::CrashPlan;
use slacker_core::{
    Backend, BackendInfo, BlockBitmap, BlockRange, BlockSize, Capabilities, DedupReport, Error,
    ObjectKind, Result, SnapshotId, SnapshotStat, Usage, VolumeId, VolumeOptions, VolumeStat,
};

use crate::config::{RbdConfig, SCHEME};
use crate::error::{EACCES, EEXIST, ENOENT, EPERM, ETIMEDOUT, RbdError, on};
use crate::sys::{Cluster, Errno, Image, IoCtx, OpenBy, SnapNamespace};

/// Image name prefix of a live volume: `v.<volume id>`.
const VOL: &str = "v.";
/// Image name prefix of a removed volume whose snapshots live on: `r.<image id>`.
const RETIRED: &str = "r.";
/// Snapshot name prefix: `s.<key>`.
const SNAP: &str = "s.";
/// Name of a snapshot being removed: `d.<key>` (the removal's linearization point).
const DYING: &str = "d.";
/// Image metadata: the volume's block size (absent = inherited from the parent, or 4 KiB).
const META_BLOCK_SIZE: &str = "slacker.block_size";
/// Image metadata: one key per hold, `slacker.hold.<snapshot key>.<holder>`.
const META_HOLD: &str = "slacker.hold.";
/// RBD features of new images: layering, exclusive-lock, object-map, fast-diff,
/// deep-flatten (object-map and fast-diff make the diverged bitmap cheap).
const FEATURES: u64 = rbd_sys::RBD_FEATURES_DEFAULT as u64;
/// How long a hold waits for a concurrent removal to decide before it rolls it back.
const REMOVAL_DECIDES: Duration = Duration::from_secs(5);

/// Volumes, snapshots and clones as RBD images, snapshots and clones (format 2, no
/// protect), shared by every host that reaches the cluster. See the crate docs.
#[derive(Debug, Clone)]
pub struct RbdBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RbdConfig,
    location: String,
    io: Arc<IoCtx>,
    cluster: Arc<Cluster>,
    crash: Option<Arc<CrashPlan>>,
    /// Open read-write handles of volumes (closed after a snapshot, so that the
    /// exclusive lock is not held while other hosts hold or remove its snapshots).
    vols: Mutex<HashMap<VolumeId, Arc<Vol>>>,
    /// Open read-only handles at snapshots, by snapshot key.
    snaps: Mutex<HashMap<String, Arc<Snap>>>,
    /// The origin of each clone image, by image id (it never changes: no flattening).
    origins: Mutex<HashMap<String, Option<SnapshotId>>>,
    /// The block size of images whose size is set, by image id: recorded at creation,
    /// else inherited from the parent, which never changes. Saves opening the parent
    /// chain of every clone (an `rbd_open` is a dozen OSD ops and most of a deploy's
    /// client CPU).
    block_sizes: Mutex<HashMap<String, BlockSize>>,
}

#[derive(Debug)]
struct Vol {
    image: Image,
    image_id: String,
    size: u64,
    block_size: BlockSize,
    /// Blocks this process wrote (joined with what RBD reports).
    written: Mutex<BlockBitmap>,
    /// The read-write handle, opened by the first change. Reads and stats go through the
    /// read-only `image`, which never takes the exclusive lock: a host that only reads a
    /// volume must not own (and so lose, blocklisted) the lock a writer takes over.
    writer: Mutex<Option<Arc<Image>>>,
}

#[derive(Debug)]
struct Snap {
    image: Image,
    image_id: String,
    hex: String,
    size: u64,
    block_size: BlockSize,
}

/// What [`RbdBackend::gc`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Interrupted volume removals finished (images deleted from the RBD trash).
    pub trash_removed: u64,
    /// Removed volumes whose last snapshot is gone, deleted.
    pub retired_removed: u64,
    /// Interrupted snapshot removals finished (or rolled back while held).
    pub snapshots_finished: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn vol_name(id: &VolumeId) -> String {
    format!("{VOL}{id}")
}

/// 128 random bits as 32 hex digits: blake3 of time, pid, a counter and the per-process
/// random seed of std's `RandomState`, so that ids minted by different hosts never collide.
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let mut h = blake3::Hasher::new();
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&t.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(&seed.to_le_bytes());
    h.finalize().to_hex()[..32].to_owned()
}

/// Splits a snapshot id into `(image id, key)`.
///
/// # Errors
/// `InvalidInput` for another scheme; `NotFound` for a key this backend never mints.
fn parse_snap(id: &SnapshotId) -> Result<(String, String)> {
    if id.scheme() != SCHEME {
        return Err(Error::invalid(format!(
            "snapshot {id} belongs to the {} backend, not {SCHEME}",
            id.scheme()
        )));
    }
    match id.key().split_once('.') {
        Some((img, hex))
            if !img.is_empty()
                && img.bytes().all(|b| b.is_ascii_alphanumeric())
                && hex.len() == 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok((img.to_owned(), hex.to_owned()))
        }
        _ => Err(Error::not_found(ObjectKind::Snapshot, id)),
    }
}

fn snap_id(image_id: &str, hex: &str) -> Result<SnapshotId> {
    SnapshotId::new(SCHEME, &format!("{image_id}.{hex}"))
}

fn hold_key(hex: &str, holder: &str) -> String {
    format!("{META_HOLD}{hex}.{holder}")
}

/// The blocks of `size` bytes at `bs` covering the given byte extents.
fn blocks_of(extents: &[(u64, u64)], bs: BlockSize, size: u64) -> BlockBitmap {
    let mut b = BlockBitmap::new();
    let nblocks = size / bs.bytes();
    for &(off, len) in extents {
        if len == 0 || off >= size {
            continue;
        }
        let start = off / bs.bytes();
        let end = (off + len).min(size).div_ceil(bs.bytes()).min(nblocks);
        if end > start {
            b.insert_range(BlockRange::new(start as u32, end as u32));
        }
    }
    b
}

impl Inner {
    fn cluster_name(&self) -> String {
        self.config.mon_host.clone()
    }

    fn err(&self, op: &'static str, what: impl Into<String>, errno: Errno) -> RbdError {
        RbdError::Call {
            op,
            what: what.into(),
            errno,
            cluster: self.cluster_name(),
        }
    }

    /// Wraps a sys result.
    fn call<T>(
        &self,
        op: &'static str,
        what: &str,
        r: std::result::Result<T, Errno>,
    ) -> std::result::Result<T, RbdError> {
        r.map_err(|e| self.err(op, what, e))
    }

    /// A sync point of the crash plan, before a step that changes the cluster.
    fn point(&self, what: &str) -> Result<()> {
        if let Some(p) = &self.crash {
            p.point(what).map_err(|source| {
                Error::from(RbdError::Crash {
                    what: what.to_owned(),
                    source,
                })
            })?;
        }
        Ok(())
    }

    fn open(
        &self,
        by: OpenBy<'_>,
        snap: Option<&str>,
        read_only: bool,
    ) -> std::result::Result<Image, RbdError> {
        let what = match by {
            OpenBy::Name(n) => n.to_owned(),
            OpenBy::Id(i) => format!("id {i}"),
        };
        self.call(
            "rbd_open",
            &what,
            Image::open(&self.io, by, snap, read_only),
        )
    }

    /// The volume's handle, opened on first use.
    fn vol(&self, id: &VolumeId) -> Result<Arc<Vol>> {
        if let Some(v) = lock(&self.vols).get(id) {
            return Ok(Arc::clone(v));
        }
        let name = vol_name(id);
        let image = self
            .open(OpenBy::Name(&name), None, true)
            .map_err(|e| on(ObjectKind::Volume, id.as_str(), e))?;
        let image_id = self.call("rbd_get_id", &name, image.id())?;
        let size = self.call("rbd_get_size", &name, image.size())?;
        if size == 0 {
            // Being created (or a creation that crashed): not a volume yet.
            return Err(Error::not_found(ObjectKind::Volume, id));
        }
        let block_size = self.block_size_of(&image, &name)?;
        let v = Arc::new(Vol {
            image,
            image_id,
            size,
            block_size,
            written: Mutex::new(BlockBitmap::new()),
            writer: Mutex::new(None),
        });
        Ok(Arc::clone(lock(&self.vols).entry(id.clone()).or_insert(v)))
    }

    /// The block size recorded in the image's metadata, else its parent's, else 4 KiB.
    fn block_size_of(&self, image: &Image, what: &str) -> Result<BlockSize> {
        if let Some(bs) = self.block_size_meta(image, what)? {
            return Ok(bs);
        }
        match self.call("rbd_get_parent", what, image.parent())? {
            Some(p) => self.image_block_size(&p.image_id, what),
            None => Ok(BlockSize::DEFAULT),
        }
    }

    /// The block size in an image's own metadata, if any.
    fn block_size_meta(&self, image: &Image, what: &str) -> Result<Option<BlockSize>> {
        let Some(v) = self.call(
            "rbd_metadata_get",
            what,
            image.metadata_get(META_BLOCK_SIZE),
        )?
        else {
            return Ok(None);
        };
        v.parse::<u32>()
            .ok()
            .and_then(|b| BlockSize::new(b).ok())
            .map(Some)
            .ok_or_else(|| {
                RbdError::Metadata {
                    image: what.to_owned(),
                    key: META_BLOCK_SIZE.to_owned(),
                    value: v.clone(),
                }
                .into()
            })
    }

    /// The block size of the image with id `image_id` (a parent, or a snapshot's image:
    /// its size is set), from the cache or by walking its parent chain; every image of
    /// the walk is cached with the answer (they inherit it).
    fn image_block_size(&self, image_id: &str, what: &str) -> Result<BlockSize> {
        let mut walked: Vec<String> = Vec::new();
        let mut next = Some(image_id.to_owned());
        let bs = loop {
            let Some(id) = next.take() else {
                break BlockSize::DEFAULT;
            };
            if let Some(bs) = lock(&self.block_sizes).get(&id) {
                break *bs;
            }
            if walked.len() >= 64 {
                break BlockSize::DEFAULT;
            }
            let img = self.open(OpenBy::Id(&id), None, true)?;
            walked.push(id);
            if let Some(bs) = self.block_size_meta(&img, what)? {
                break bs;
            }
            next = self
                .call("rbd_get_parent", what, img.parent())?
                .map(|p| p.image_id);
        };
        let mut cache = lock(&self.block_sizes);
        for id in walked {
            cache.insert(id, bs);
        }
        Ok(bs)
    }

    /// The snapshot a clone image was made from (`None` for an image without parent).
    fn origin_of(&self, image: &Image, image_id: &str, what: &str) -> Result<Option<SnapshotId>> {
        if let Some(o) = lock(&self.origins).get(image_id) {
            return Ok(o.clone());
        }
        let origin = match self.call("rbd_get_parent", what, image.parent())? {
            None => None,
            Some(p) => {
                let name = match p.namespace {
                    SnapNamespace::Trash => {
                        let parent = self.open(OpenBy::Id(&p.image_id), None, true)?;
                        self.call(
                            "rbd_snap_get_trash_namespace",
                            what,
                            parent.snap_trash_original_name(p.snap_id),
                        )?
                    }
                    _ => p.snap_name.clone(),
                };
                let hex = name
                    .strip_prefix(SNAP)
                    .or_else(|| name.strip_prefix(DYING))
                    .unwrap_or(&name);
                Some(snap_id(&p.image_id, hex)?)
            }
        };
        lock(&self.origins).insert(image_id.to_owned(), origin.clone());
        Ok(origin)
    }

    /// The handle at a snapshot, opened on first use.
    fn snap(&self, id: &SnapshotId) -> Result<Arc<Snap>> {
        let (image_id, hex) = parse_snap(id)?;
        if let Some(s) = lock(&self.snaps).get(id.key()) {
            return Ok(Arc::clone(s));
        }
        let image = self
            .open(OpenBy::Id(&image_id), Some(&format!("{SNAP}{hex}")), true)
            .map_err(|e| on(ObjectKind::Snapshot, id.as_str(), e))?;
        let what = id.to_string();
        let size = self.call("rbd_get_size", &what, image.size())?;
        // The snapshot's image has the same block size (metadata is the image's).
        let cached = lock(&self.block_sizes).get(&image_id).copied();
        let block_size = match cached {
            Some(bs) => bs,
            None => {
                let bs = self.block_size_of(&image, &what)?;
                lock(&self.block_sizes).insert(image_id.clone(), bs);
                bs
            }
        };
        let s = Arc::new(Snap {
            image,
            image_id,
            hex,
            size,
            block_size,
        });
        Ok(Arc::clone(
            lock(&self.snaps).entry(id.key().to_owned()).or_insert(s),
        ))
    }

    /// The head of the image holding a snapshot, for metadata and snapshot changes.
    fn snap_image(&self, id: &SnapshotId) -> Result<(Image, String, String)> {
        let (image_id, hex) = parse_snap(id)?;
        let image = self
            .open(OpenBy::Id(&image_id), None, false)
            .map_err(|e| on(ObjectKind::Snapshot, id.as_str(), e))?;
        Ok((image, image_id, hex))
    }

    /// Breaks the exclusive lock of a crashed (or superseded) writer before the first
    /// change through this handle, instead of waiting ~30 s for its watch to expire. A
    /// volume has one writer at a time; whoever opens it to write takes it over (the old
    /// owner is blocklisted, so it cannot write behind our back).
    fn writer(&self, v: &Vol, what: &str) -> Result<Arc<Image>> {
        let mut w = lock(&v.writer);
        if let Some(img) = w.as_ref() {
            return Ok(Arc::clone(img));
        }
        let img = self.open(OpenBy::Id(&v.image_id), None, false)?;
        let owners = self.call("rbd_lock_get_owners", what, img.lock_owners())?;
        let mine = self.call("rados_getaddrs", what, self.cluster.addrs())?;
        for o in owners.into_iter().filter(|o| !mine.contains(o.as_str())) {
            match img.lock_break(&o) {
                Ok(()) | Err(ENOENT) => {}
                Err(e) => {
                    return Err(self
                        .err("rbd_lock_break", format!("{what} ({o})"), e)
                        .into());
                }
            }
        }
        let img = Arc::new(img);
        *w = Some(Arc::clone(&img));
        Ok(img)
    }

    fn holds(&self, image: &Image, hex: &str, what: &str) -> Result<Vec<String>> {
        let prefix = format!("{META_HOLD}{hex}.");
        let keys = self.call("rbd_metadata_list", what, image.metadata_keys(&prefix))?;
        let mut h: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        h.sort();
        Ok(h)
    }

    fn forget_image(&self, image_id: &str) {
        lock(&self.snaps).retain(|_, s| s.image_id != image_id);
    }

    /// Deletes a removed volume's image once it has no snapshot left: trash first (the
    /// name disappears atomically), then its data; if RBD refuses (trashed snapshots that
    /// clones still read, watchers), it goes back under its retired name.
    fn delete_image(&self, name: &str, image_id: &str, restore_as: &str) -> Result<bool> {
        self.point("rbd_trash_move")?;
        match self.io.trash_move(name) {
            Ok(()) => {}
            Err(ENOENT) => return Ok(false),
            Err(e) => return Err(self.err("rbd_trash_move", name, e).into()),
        }
        self.finish_trashed(image_id, restore_as)
    }

    fn finish_trashed(&self, image_id: &str, restore_as: &str) -> Result<bool> {
        self.point("rbd_trash_remove")?;
        match self.io.trash_remove(image_id) {
            Ok(()) | Err(ENOENT) => Ok(true),
            Err(_) => {
                self.point("rbd_trash_restore")?;
                match self.io.trash_restore(image_id, restore_as) {
                    Ok(()) | Err(ENOENT) | Err(EEXIST) => Ok(false),
                    Err(e) => Err(self.err("rbd_trash_restore", restore_as, e).into()),
                }
            }
        }
    }

    /// Every image of this backend: `(id, name)` of live and retired volumes.
    fn images(&self) -> Result<Vec<(String, String)>> {
        let mut v: Vec<(String, String)> = self
            .call("rbd_list2", &self.location, self.io.list())?
            .into_iter()
            .filter(|(_, n)| n.starts_with(VOL) || n.starts_with(RETIRED))
            .collect();
        v.sort();
        Ok(v)
    }

    fn gc(&self, grace: Duration) -> Result<GcReport> {
        let mut report = GcReport::default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        // Volume removals interrupted between trash move and delete.
        for (id, name, when) in self.call("rbd_trash_list", &self.location, self.io.trash_list())? {
            let ours = name.starts_with(VOL) || name.starts_with(RETIRED);
            if ours && now - when >= grace.as_secs() as i64 {
                let restore = format!("{RETIRED}{id}");
                if self.finish_trashed(&id, &restore)? {
                    report.trash_removed += 1;
                }
            }
        }
        // Creations with a block size interrupted before the image got its size.
        for (image_id, name) in self.images()? {
            if !name.starts_with(VOL) {
                continue;
            }
            let Ok(image) = Image::open(&self.io, OpenBy::Id(&image_id), None, true) else {
                continue;
            };
            if self.call("rbd_get_size", &name, image.size())? != 0 {
                continue;
            }
            let born = self.call("rbd_get_create_timestamp", &name, image.create_time())?;
            drop(image);
            if now - born >= grace.as_secs() as i64 && self.delete_image(&name, &image_id, &name)? {
                report.trash_removed += 1;
            }
        }
        for (image_id, name) in self.images()? {
            let Ok(image) = Image::open(&self.io, OpenBy::Id(&image_id), None, false) else {
                continue;
            };
            let snaps = self.call("rbd_snap_list", &name, image.snap_list())?;
            // Snapshot removals interrupted after the rename (only with grace 0: a
            // removal in progress on another host decides within milliseconds, and RBD
            // keeps no time of the rename).
            if grace.is_zero() {
                for (_, _, sname) in &snaps {
                    if let Some(hex) = sname.strip_prefix(DYING) {
                        if self.holds(&image, hex, &name)?.is_empty() {
                            self.point("rbd_snap_remove")?;
                            self.call("rbd_snap_remove", sname, image.snap_remove(sname))?;
                        } else {
                            self.point("rbd_snap_rename")?;
                            let back = format!("{SNAP}{hex}");
                            self.call("rbd_snap_rename", sname, image.snap_rename(sname, &back))?;
                        }
                        report.snapshots_finished += 1;
                    }
                }
            }
            if name.starts_with(RETIRED) {
                let left = self.call("rbd_snap_list", &name, image.snap_list())?;
                if left.is_empty() {
                    drop(image);
                    if self.delete_image(&name, &image_id, &name)? {
                        report.retired_removed += 1;
                    }
                }
            }
        }
        Ok(report)
    }
}

impl RbdBackend {
    pub(crate) async fn open(config: RbdConfig, crash: Option<Arc<CrashPlan>>) -> Result<Self> {
        config.validate()?;
        if let Some(k) = &config.keyring
            && !std::path::Path::new(k).is_file()
        {
            return Err(Error::Config(format!(
                "rbd keyring {k} is not a readable file"
            )));
        }
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let c2 = config.clone();
        let task = tokio::task::spawn_blocking(move || connect(&c2));
        // librados honours client_mount_timeout; the outer bound only guards against a
        // library that does not.
        let (cluster, io) =
            match tokio::time::timeout(connect_timeout + Duration::from_secs(5), task).await {
                Ok(joined) => joined.map_err(|e| Error::backend(SCHEME, e))??,
                Err(_) => {
                    return Err(RbdError::Call {
                        op: "rados_connect",
                        what: format!("pool {}", config.pool),
                        errno: ETIMEDOUT,
                        cluster: config.mon_host.clone(),
                    }
                    .into());
                }
            };
        let location = format!(
            "rbd://{}/{}/{}",
            config.mon_host,
            config.pool,
            config.namespace.as_deref().unwrap_or("")
        );
        let grace = Duration::from_secs(config.gc_grace_secs);
        let b = RbdBackend {
            inner: Arc::new(Inner {
                config,
                location,
                io,
                cluster,
                crash,
                vols: Mutex::new(HashMap::new()),
                snaps: Mutex::new(HashMap::new()),
                origins: Mutex::new(HashMap::new()),
                block_sizes: Mutex::new(HashMap::new()),
            }),
        };
        b.gc(grace).await?;
        Ok(b)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::backend(SCHEME, e))?
    }

    /// The configuration this backend was built with.
    pub fn config(&self) -> &RbdConfig {
        &self.inner.config
    }

    /// The RBD image name of a volume (`v.<id>`), for tools like `rbd info`.
    pub fn image_name(id: &VolumeId) -> String {
        vol_name(id)
    }

    /// The global id of this backend's Ceph client (`client.<id>`).
    pub fn client_id(&self) -> u64 {
        self.inner.cluster.instance_id()
    }

    /// Finishes what interrupted operations left behind: volume removals stuck in the
    /// RBD trash for longer than `grace`, removed volumes whose last snapshot is gone,
    /// and (with `grace` zero only) snapshot removals interrupted after their rename.
    /// Runs at build with [`RbdConfig::gc_grace_secs`].
    ///
    /// # Errors
    /// `Backend` if the cluster fails.
    pub async fn gc(&self, grace: Duration) -> Result<GcReport> {
        self.run(move |i| i.gc(grace)).await
    }

    /// Every RBD image in the backend's pool and namespace, `(id, name)`, and the names
    /// in its RBD trash: for tests and operators checking that nothing leaked.
    ///
    /// # Errors
    /// `Backend` if the cluster fails.
    pub async fn rbd_listing(&self) -> Result<(Vec<(String, String)>, Vec<String>)> {
        self.run(|i| {
            let mut dir = i.call("rbd_list2", &i.location, i.io.list())?;
            dir.sort();
            let mut trash: Vec<String> = i
                .call("rbd_trash_list", &i.location, i.io.trash_list())?
                .into_iter()
                .map(|(_, n, _)| n)
                .collect();
            trash.sort();
            Ok((dir, trash))
        })
        .await
    }

    /// Drops every open image handle (releasing exclusive locks), as a process exit
    /// would. The backend stays usable: handles are reopened on demand.
    pub fn close_images(&self) {
        lock(&self.inner.vols).clear();
        lock(&self.inner.snaps).clear();
    }
}

fn connect(config: &RbdConfig) -> Result<(Arc<Cluster>, Arc<IoCtx>)> {
    let secs = |ms: u64| format!("{}", ms.div_ceil(1000).max(1));
    let mut opts: Vec<(&str, String)> = vec![
        ("mon_host", config.mon_host.clone()),
        ("client_mount_timeout", secs(config.connect_timeout_ms)),
        ("rados_mon_op_timeout", secs(config.op_timeout_ms)),
        ("rados_osd_op_timeout", secs(config.op_timeout_ms)),
        // Acknowledged writes are on the OSDs: flush has nothing to lose.
        ("rbd_cache", "false".to_owned()),
        // Notice a restarted OSD after ~2 s instead of 10 s.
        ("objecter_timeout", "2".to_owned()),
        ("log_to_stderr", "false".to_owned()),
        ("err_to_stderr", "false".to_owned()),
    ];
    match &config.keyring {
        Some(k) => opts.push(("keyring", k.clone())),
        None => opts.push(("auth_client_required", "none".to_owned())),
    }
    let call_err = |op: &'static str, what: String, errno: Errno| RbdError::Call {
        op,
        what,
        errno,
        cluster: config.mon_host.clone(),
    };
    let connect_err = |errno: Errno| -> Error {
        let e = call_err("rados_connect", format!("as client.{}", config.user), errno);
        match errno {
            EPERM | EACCES => Error::Config(format!(
                "the cluster refused the key of client.{} ({e})",
                config.user
            )),
            _ => e.into(),
        }
    };
    let pool_err = |errno: Errno| -> Error {
        match errno {
            ENOENT => Error::Config(format!(
                "rbd pool {:?} does not exist on {}",
                config.pool, config.mon_host
            )),
            _ => call_err("rados_ioctx_create", format!("pool {}", config.pool), errno).into(),
        }
    };
    let key = format!(
        "{}\0{:?}\0{opts:?}\0{}",
        config.user, config.conf_file, config.client_instance
    );
    let ns = config.namespace.clone().unwrap_or_default();
    loop {
        let (cluster, cached) = shared_client(&key, || {
            Cluster::connect(
                &config.user,
                CLIENT_DEFAULTS,
                config.conf_file.as_deref(),
                &opts,
            )
            .map_err(connect_err)
        })?;
        if !ns.is_empty() {
            let root = IoCtx::open(Arc::clone(&cluster), &config.pool, "").map_err(pool_err)?;
            let exists = match root.namespace_exists(&ns) {
                Err(EBLOCKLISTED) if cached => {
                    forget_client(&key, &cluster);
                    continue;
                }
                r => r.map_err(|e| call_err("rbd_namespace_exists", ns.clone(), e))?,
            };
            if !exists {
                match root.namespace_create(&ns) {
                    Ok(()) | Err(EEXIST) => {}
                    Err(e) => return Err(call_err("rbd_namespace_create", ns.clone(), e).into()),
                }
            }
        }
        let io = IoCtx::open(Arc::clone(&cluster), &config.pool, &ns).map_err(pool_err)?;
        if cached && ns.is_empty() && io.list() == Err(EBLOCKLISTED) {
            forget_client(&key, &cluster);
            continue;
        }
        return Ok((cluster, Arc::new(io)));
    }
}

/// Client settings a [`RbdConfig::conf_file`] may override: one messenger thread and one
/// asio thread (Ceph's defaults are 3 and 2). A slacker host reads a few MB per deploy;
/// handing each op between more threads only costs CPU: measured with 8 workers deploying
/// at once on 2 cores (hellobench `many_workers`, issue 15), a deploy's client CPU fell
/// 10-18% and no phase got slower.
const CLIENT_DEFAULTS: &[(&str, &str)] =
    &[("ms_async_op_threads", "1"), ("librados_thread_count", "1")];

/// `ESHUTDOWN`: what the OSDs and monitors answer a blocklisted client.
const EBLOCKLISTED: Errno = 108;

/// The process's connected Ceph clients, by connection settings and
/// [`RbdConfig::client_instance`].
///
/// A client is never shut down: librbd finishes closing an image on the client's own
/// threads after `rbd_close` returns, and `rados_shutdown` frees the client regardless,
/// so a backend dropped right after its last image closed could free memory those
/// threads were about to use (the process died with `std::system_error: Invalid argument`
/// from a destroyed mutex, or a segfault in the next `rbd_open`). One client per settings
/// is also what a librbd process is meant to have; the cluster sees one host.
static CLIENTS: LazyLock<Mutex<HashMap<String, Arc<Cluster>>>> = LazyLock::new(Default::default);

/// The client for `key`, connected with `connect` if there is none yet (connections are
/// made one at a time), and whether it was there already.
fn shared_client(
    key: &str,
    connect: impl FnOnce() -> Result<Cluster>,
) -> Result<(Arc<Cluster>, bool)> {
    let mut clients = lock(&CLIENTS);
    if let Some(c) = clients.get(key) {
        return Ok((Arc::clone(c), true));
    }
    let c = Arc::new(connect()?);
    clients.insert(key.to_owned(), Arc::clone(&c));
    Ok((c, false))
}

/// Drops a blocklisted client from the registry (it stays alive for the backends that
/// still use it, which fail until they are rebuilt), so that the next build connects anew.
fn forget_client(key: &str, cluster: &Arc<Cluster>) {
    let mut clients = lock(&CLIENTS);
    if clients.get(key).is_some_and(|c| Arc::ptr_eq(c, cluster)) {
        clients.remove(key);
    }
}

#[async_trait]
impl Backend for RbdBackend {
    fn info(&self) -> BackendInfo {
        let mut caps = Capabilities::default();
        caps.usage = true;
        caps.cheap_clone = true;
        caps.shared = true;
        BackendInfo::new(SCHEME, caps, self.inner.location.clone())
    }

    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        options.validate()?;
        let (id, options) = (id.clone(), options.clone());
        self.run(move |i| {
            let name = vol_name(&id);
            let bs = options.block_size;
            if bs == BlockSize::DEFAULT {
                // One atomic call: of two hosts creating one name, exactly one wins.
                i.point("rbd_create4")?;
                return i
                    .call(
                        "rbd_create4",
                        &name,
                        i.io.create(&name, options.size, i.config.order(), FEATURES),
                    )
                    .map_err(|e| on(ObjectKind::Volume, id.as_str(), e));
            }
            // A block size other than the default is image metadata, which cannot be
            // written together with the image. So the image is created empty (size 0:
            // no volume has that size, so it is invisible and counts as "being
            // created"), which decides a race atomically; then the block size is
            // recorded and the image grown to its size, which makes it a volume. A crash
            // leaves an invisible empty image that gc removes. (A temporary name and
            // rbd_rename would not do: two concurrent renames onto one name both succeed.)
            i.point("rbd_create4")?;
            i.call(
                "rbd_create4",
                &name,
                i.io.create(&name, 0, i.config.order(), FEATURES),
            )
            .map_err(|e| on(ObjectKind::Volume, id.as_str(), e))?;
            let img = i.open(OpenBy::Name(&name), None, false)?;
            i.point("rbd_metadata_set")?;
            i.call(
                "rbd_metadata_set",
                &name,
                img.metadata_set(META_BLOCK_SIZE, &bs.get().to_string()),
            )?;
            i.point("rbd_resize")?;
            i.call("rbd_resize", &name, img.resize(options.size))?;
            Ok(())
        })
        .await
    }

    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        let id = id.clone();
        self.run(move |i| {
            let v = i.vol(&id)?;
            check_range(offset, len as u64, v.size)?;
            let mut buf = vec![0u8; len];
            i.call("rbd_read", &vol_name(&id), v.image.read(offset, &mut buf))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let (id, data) = (id.clone(), data.to_vec());
        self.run(move |i| {
            let v = i.vol(&id)?;
            check_range(offset, data.len() as u64, v.size)?;
            if data.is_empty() {
                return Ok(());
            }
            let name = vol_name(&id);
            let w = i.writer(&v, &name)?;
            i.point("rbd_write")?;
            i.call("rbd_write", &name, w.write(offset, &data))?;
            lock(&v.written).insert_range(v.block_size.blocks_touched(offset, data.len() as u64));
            Ok(())
        })
        .await
    }

    async fn flush(&self, id: &VolumeId) -> Result<()> {
        let id = id.clone();
        self.run(move |i| {
            let v = i.vol(&id)?;
            // Writes are not cached (rbd_cache = false): only a writer can have any in
            // flight.
            let w = lock(&v.writer).clone();
            match w {
                Some(w) => i
                    .call("rbd_flush", &vol_name(&id), w.flush())
                    .map_err(Error::from),
                None => Ok(()),
            }
        })
        .await
    }

    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        let id = id.clone();
        self.run(move |i| {
            let v = i.vol(&id)?;
            let name = vol_name(&id);
            let w = i.writer(&v, &name)?;
            let hex = random_hex();
            i.point("rbd_snap_create")?;
            i.call(
                "rbd_snap_create",
                &name,
                w.snap_create(&format!("{SNAP}{hex}")),
            )
            .map_err(|e| on(ObjectKind::Volume, id.as_str(), e))?;
            // Release the exclusive lock: other hosts hold and remove this snapshot
            // through the image's owner, and a writer that goes away must not leave them
            // waiting for its lock to expire.
            drop(w);
            lock(&i.vols).remove(&id);
            snap_id(&v.image_id, &hex)
        })
        .await
    }

    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        let (snapshot, new) = (snapshot.clone(), new.clone());
        self.run(move |i| {
            let (image_id, hex) = parse_snap(&snapshot)?;
            let sname = format!("{SNAP}{hex}");
            let child = vol_name(&new);
            let mut tries = 0;
            loop {
                // The parent's handle at the snapshot (opening it fails with NotFound
                // if the snapshot is gone), the one the clone's clean reads go through
                // next: opened once per snapshot and process, not once per clone.
                let parent = i.snap(&snapshot)?;
                let pname = i.call("rbd_get_name", &image_id, parent.image.name())?;
                // Metadata is read at the image's head, whatever snapshot the handle is at.
                let copied_holds = !i
                    .call(
                        "rbd_metadata_list",
                        &pname,
                        parent.image.metadata_keys(META_HOLD),
                    )?
                    .is_empty();
                drop(parent);
                i.point("rbd_clone3")?;
                match i
                    .io
                    .clone_image(&pname, &sname, &child, i.config.order(), FEATURES)
                {
                    Ok(()) => {
                        if copied_holds {
                            // RBD copies the parent's metadata into the clone; holds
                            // name the parent's snapshots only, so drop the copies.
                            let c = i.open(OpenBy::Name(&child), None, false)?;
                            for k in
                                i.call("rbd_metadata_list", &child, c.metadata_keys(META_HOLD))?
                            {
                                i.call("rbd_metadata_remove", &child, c.metadata_remove(&k))?;
                            }
                        }
                        return Ok(());
                    }
                    Err(EEXIST) => return Err(Error::already_exists(ObjectKind::Volume, &new)),
                    // The parent was renamed (its volume removed) or is between trash
                    // and restore, or the snapshot is gone (the cached handle is
                    // stale): look both up again.
                    Err(ENOENT) if tries < 50 => {
                        tries += 1;
                        lock(&i.snaps).remove(snapshot.key());
                        if tries > 1 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    Err(e) => {
                        return Err(on(
                            ObjectKind::Snapshot,
                            snapshot.as_str(),
                            i.err("rbd_clone3", format!("{pname}@{sname} -> {child}"), e),
                        ));
                    }
                }
            }
        })
        .await
    }

    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let id = id.clone();
        self.run(move |i| {
            let s = i.snap(&id)?;
            check_range(offset, len as u64, s.size)?;
            let mut buf = vec![0u8; len];
            i.call("rbd_read", id.as_str(), s.image.read(offset, &mut buf))
                .map_err(|e| on(ObjectKind::Snapshot, id.as_str(), e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let id = id.clone();
        self.run(move |i| {
            let v = i.vol(&id)?;
            let name = vol_name(&id);
            let origin = i.origin_of(&v.image, &v.image_id, &name)?;
            let own = i.call(
                "rbd_diff_iterate2",
                &name,
                v.image.owned_extents(v.size, false),
            )?;
            let mut diverged = blocks_of(&own, v.block_size, v.size);
            diverged = diverged.union(&lock(&v.written));
            let exclusive: u64 = own.iter().map(|e| e.1).sum();
            let shared = if origin.is_some() {
                let all = i.call(
                    "rbd_diff_iterate2",
                    &name,
                    v.image.owned_extents(v.size, true),
                )?;
                let own_set: std::collections::HashSet<u64> = own.iter().map(|e| e.0).collect();
                all.iter()
                    .filter(|e| !own_set.contains(&e.0))
                    .map(|e| e.1)
                    .sum()
            } else {
                0
            };
            Ok(VolumeStat::new(
                id,
                v.size,
                v.block_size,
                origin,
                diverged,
                Usage::new(exclusive, shared),
            ))
        })
        .await
    }

    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let id = id.clone();
        self.run(move |i| {
            let s = i.snap(&id)?;
            let what = id.to_string();
            let parent = i.origin_of(&s.image, &format!("{}@{}", s.image_id, s.hex), &what)?;
            let own = i
                .call(
                    "rbd_diff_iterate2",
                    &what,
                    s.image.owned_extents(s.size, false),
                )
                .map_err(|e| on(ObjectKind::Snapshot, &what, e))?;
            let holds = i.holds(&s.image, &s.hex, &what)?;
            Ok(SnapshotStat::new(
                id,
                s.size,
                s.block_size,
                parent,
                blocks_of(&own, s.block_size, s.size),
                holds,
            ))
        })
        .await
    }

    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        let id = id.clone();
        self.run(move |i| {
            let name = vol_name(&id);
            lock(&i.vols).remove(&id);
            let image = i
                .open(OpenBy::Name(&name), None, true)
                .map_err(|e| on(ObjectKind::Volume, id.as_str(), e))?;
            let image_id = i.call("rbd_get_id", &name, image.id())?;
            let snaps = i.call("rbd_snap_list", &name, image.snap_list())?;
            drop(image);
            i.forget_image(&image_id);
            let retired = format!("{RETIRED}{image_id}");
            if snaps.is_empty() {
                // No snapshot: delete (trash first: the name goes atomically).
                i.delete_image(&name, &image_id, &retired)?;
                return Ok(());
            }
            // Its snapshots live on: keep the image under a name no volume can have.
            i.point("rbd_rename")?;
            i.call("rbd_rename", &name, i.io.rename(&name, &retired))
                .map_err(|e| on(ObjectKind::Volume, id.as_str(), e))
        })
        .await
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let id = id.clone();
        self.run(move |i| {
            let (image, image_id, hex) = i.snap_image(&id)?;
            let what = id.to_string();
            let (live, dying) = (format!("{SNAP}{hex}"), format!("{DYING}{hex}"));
            let in_use = |by: &[String]| Error::InUse {
                kind: ObjectKind::Snapshot,
                id: what.clone(),
                by: by.join(", "),
            };
            let h = i.holds(&image, &hex, &what)?;
            if !h.is_empty() {
                return Err(in_use(&h));
            }
            // Rename first: from here on a new hold sees the removal and waits for it;
            // then look for holds placed before the rename.
            i.point("rbd_snap_rename")?;
            i.call("rbd_snap_rename", &what, image.snap_rename(&live, &dying))
                .map_err(|e| on(ObjectKind::Snapshot, &what, e))?;
            lock(&i.snaps).remove(id.key());
            let h = i.holds(&image, &hex, &what)?;
            if !h.is_empty() {
                i.point("rbd_snap_rename")?;
                i.call("rbd_snap_rename", &what, image.snap_rename(&dying, &live))?;
                return Err(in_use(&h));
            }
            i.point("rbd_snap_remove")?;
            match image.snap_remove(&dying) {
                Ok(()) => {}
                // A hold that waited too long rolled the removal back.
                Err(ENOENT) => return Err(in_use(&i.holds(&image, &hex, &what)?)),
                Err(e) => return Err(i.err("rbd_snap_remove", &what, e).into()),
            }
            let name = i.call("rbd_get_name", &what, image.name())?;
            if name.starts_with(RETIRED) {
                let left = i.call("rbd_snap_list", &name, image.snap_list())?;
                drop(image);
                if left.is_empty() {
                    i.delete_image(&name, &image_id, &name)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        self.run(|i| {
            let mut v = Vec::new();
            for (image_id, name) in i.images()? {
                let Some(id) = name.strip_prefix(VOL).and_then(|s| VolumeId::new(s).ok()) else {
                    continue;
                };
                if lock(&i.vols).contains_key(&id) {
                    v.push(id);
                    continue;
                }
                // Hide images being created (size 0).
                match Image::open(&i.io, OpenBy::Id(&image_id), None, true) {
                    Ok(img) if i.call("rbd_get_size", &name, img.size())? > 0 => v.push(id),
                    Ok(_) | Err(ENOENT) => {}
                    Err(e) => return Err(i.err("rbd_open", &name, e).into()),
                }
            }
            v.sort();
            Ok(v)
        })
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        self.run(|i| {
            let mut out = Vec::new();
            for (image_id, name) in i.images()? {
                let image = match Image::open(&i.io, OpenBy::Id(&image_id), None, true) {
                    Ok(img) => img,
                    Err(ENOENT) => continue,
                    Err(e) => return Err(i.err("rbd_open", &name, e).into()),
                };
                for (_, _, s) in i.call("rbd_snap_list", &name, image.snap_list())? {
                    if let Some(hex) = s.strip_prefix(SNAP) {
                        out.push(snap_id(&image_id, hex)?);
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        parse_snap(id)?;
        validate_holder(holder)?;
        let (id, holder) = (id.clone(), holder.to_owned());
        self.run(move |i| {
            let (image, image_id, hex) = i.snap_image(&id)?;
            let what = id.to_string();
            let (live, dying) = (format!("{SNAP}{hex}"), format!("{DYING}{hex}"));
            // Which names exist, read from a freshly opened handle: a long-lived one may
            // not have seen a concurrent rename yet.
            let names = || -> Result<(bool, bool)> {
                let fresh = i.open(OpenBy::Id(&image_id), None, true)?;
                let l = i.call("rbd_snap_exists", &what, fresh.snap_exists(&live))?;
                let d = i.call("rbd_snap_exists", &what, fresh.snap_exists(&dying))?;
                Ok((l, d))
            };
            if names()? == (false, false) {
                return Err(Error::not_found(ObjectKind::Snapshot, &id));
            }
            let key = hold_key(&hex, &holder);
            i.point("rbd_metadata_set")?;
            i.call("rbd_metadata_set", &what, image.metadata_set(&key, ""))?;
            // The hold is in place; it counts if the snapshot still exists. While a
            // removal is deciding (renamed to `d.`), wait for its decision. Both names
            // absent twice in a row means removed (one absence can be a rename back
            // between the two lookups).
            let start = Instant::now();
            let mut absent = 0;
            loop {
                match names()? {
                    (true, _) => return Ok(()),
                    (false, false) => {
                        absent += 1;
                        if absent >= 2 {
                            break;
                        }
                        continue;
                    }
                    (false, true) => absent = 0,
                }
                if start.elapsed() > REMOVAL_DECIDES {
                    // The remover died between rename and decision: roll it back.
                    i.point("rbd_snap_rename")?;
                    match image.snap_rename(&dying, &live) {
                        Ok(()) => return Ok(()),
                        Err(ENOENT) => continue,
                        Err(e) => return Err(i.err("rbd_snap_rename", &what, e).into()),
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = image.metadata_remove(&key);
            Err(Error::not_found(ObjectKind::Snapshot, &id))
        })
        .await
    }

    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        parse_snap(id)?;
        let (id, holder) = (id.clone(), holder.to_owned());
        self.run(move |i| {
            let (image, _, hex) = i.snap_image(&id)?;
            let what = id.to_string();
            let live = format!("{SNAP}{hex}");
            if !i.call("rbd_snap_exists", &what, image.snap_exists(&live))? {
                return Err(Error::not_found(ObjectKind::Snapshot, &id));
            }
            let key = hold_key(&hex, &holder);
            if i.call("rbd_metadata_get", &what, image.metadata_get(&key))?
                .is_none()
            {
                return Err(Error::not_found(
                    ObjectKind::Other,
                    format!("hold {holder} on {id}"),
                ));
            }
            i.point("rbd_metadata_remove")?;
            match image.metadata_remove(&key) {
                Ok(()) => Ok(()),
                Err(ENOENT) => Err(Error::not_found(
                    ObjectKind::Other,
                    format!("hold {holder} on {id}"),
                )),
                Err(e) => Err(i.err("rbd_metadata_remove", &what, e).into()),
            }
        })
        .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::{BlockIndex, ErrorKind};

    #[test]
    fn snapshot_ids_parse() {
        let hex = "0123456789abcdef0123456789abcdef";
        let id = snap_id("1031ea0a2b6d", hex).unwrap();
        assert_eq!(
            parse_snap(&id).unwrap(),
            ("1031ea0a2b6d".into(), hex.into())
        );
        let bad = SnapshotId::new(SCHEME, "never-minted-0").unwrap();
        assert_eq!(parse_snap(&bad).unwrap_err().kind(), ErrorKind::NotFound);
        let other = SnapshotId::new("nfs", &format!("x.{hex}")).unwrap();
        assert_eq!(
            parse_snap(&other).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_ne!(random_hex(), random_hex());
    }

    #[test]
    fn object_extents_map_to_blocks() {
        let bs = BlockSize::DEFAULT;
        // One 64 KiB object at 64 KiB, and a truncated last object.
        let b = blocks_of(&[(65536, 65536), (10 * 4096, 1)], bs, 40 * 4096);
        assert!(b.contains(BlockIndex(16)) && b.contains(BlockIndex(31)));
        assert!(!b.contains(BlockIndex(15)) && !b.contains(BlockIndex(32)));
        assert!(b.contains(BlockIndex(10)));
        // Blocks larger than the extent: the block holding it.
        let big = BlockSize::new(65536).unwrap();
        let b = blocks_of(&[(69632, 4096)], big, 4 * 65536);
        assert_eq!((b.len(), b.contains(BlockIndex(1))), (1, true));
        assert!(blocks_of(&[(8 << 20, 65536)], big, 4 * 65536).is_empty());
    }
}
