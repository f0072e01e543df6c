//! [`BtrfsBackend`]: volumes as sparse files, snapshots and clones as reflinks.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use slacker_core::backend::{check_range, validate_holder};
use slacker_core::persist::{CrashPlan, DirStore, MetaStore};
use slacker_core::{
    Backend, BackendInfo, BlockBitmap, BlockSize, Capabilities, DedupReport, Error, ObjectKind,
    Result, SnapshotId, SnapshotStat, Usage, VolumeId, VolumeOptions, VolumeStat,
};

use crate::config::{BtrfsConfig, Durability, SCHEME};
use crate::error::{BtrfsError, io_err};
use crate::extents::{self, Origin};
use crate::meta::{self, DocName, FORMAT, SnapshotDoc, VolumeDoc};
use crate::sys::{self, Extent};

/// Space used by everything under a backend's root, from FIEMAP (see
/// [`BtrfsBackend::usage_total`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TotalUsage {
    /// Volume and snapshot files.
    pub files: u64,
    /// Sum of their logical sizes (what a copy without sharing or holes would take).
    pub logical_bytes: u64,
    /// Sum of their allocated extents (holes excluded), counting shared extents once per
    /// file that references them.
    pub referenced_bytes: u64,
    /// Distinct allocated bytes: shared extents counted once (the data space the backend
    /// really occupies; btrfs metadata not included).
    pub unique_bytes: u64,
}

/// A backend keeping volumes as sparse files on btrfs, with snapshot and clone by
/// reflink (`FICLONE`). See the [crate docs](crate) for the layout, the crash-safety
/// order of operations and how the diverged bitmap is derived.
///
/// Every operation runs its syscalls on `tokio::task::spawn_blocking`, so the backend
/// must be used from within a Tokio runtime. Cloning the handle shares the backend.
#[derive(Clone)]
pub struct BtrfsBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: BtrfsConfig,
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
    store: DirStore,
    plan: Option<Arc<CrashPlan>>,
    catalog: RwLock<Catalog>,
    minted: AtomicU64,
    seed: [u8; 32],
}

/// What exists. Lock order: the catalog first, then at most one volume's state (all of
/// them, in id order, only in `dedup`); never the catalog while holding a volume's state.
/// Creates, clones and volume removals hold the catalog only to reserve the name (in
/// `busy`) and to publish the result, not across their fsyncs, so that reads and writes
/// of other volumes never wait for them.
#[derive(Default)]
struct Catalog {
    volumes: BTreeMap<VolumeId, Arc<Vol>>,
    snapshots: BTreeMap<String, Arc<Snap>>,
    busy: BTreeSet<VolumeId>,
}

/// A volume name reserved in [`Catalog::busy`]; released on drop.
struct Reserved<'a> {
    inner: &'a Inner,
    id: VolumeId,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.inner.write_catalog().busy.remove(&self.id);
    }
}

struct Vol {
    id: VolumeId,
    size: u64,
    block_size: BlockSize,
    origin: Option<SnapshotId>,
    path: PathBuf,
    /// The open data file, or why it is unusable (found missing or damaged at open).
    file: std::result::Result<File, String>,
    state: Mutex<VolState>,
}

struct VolState {
    /// Blocks written through the library, including those not yet persisted.
    written: BlockBitmap,
    /// The bitmap as the volume's document holds it (a subset of `written`).
    persisted: BlockBitmap,
    /// Set by `remove_volume`, for operations that raced with it.
    removed: bool,
}

struct Snap {
    path: PathBuf,
    /// `holds` has every hold, wherever it is kept.
    doc: Mutex<SnapshotDoc>,
    /// The holds kept as marker documents (the rest are in the snapshot's document). Lock
    /// order: `doc` first. Both change only under the catalog's write lock.
    marked: Mutex<BTreeSet<String>>,
}

impl Snap {
    fn new(path: PathBuf, doc: SnapshotDoc) -> Self {
        Self {
            path,
            doc: Mutex::new(doc),
            marked: Mutex::new(BTreeSet::new()),
        }
    }
}

/// Where a new hold of `holder` on snapshot `key` (document `doc`) is kept: a marker
/// document (format 2), or `None` for inside the document (format 1).
fn marker_for(doc: &SnapshotDoc, key: &str, holder: &str) -> Option<String> {
    if doc.format >= meta::SNAPSHOT_FORMAT {
        meta::hold_doc(key, holder)
    } else {
        None
    }
}

/// The snapshot's document as its file holds it: the holds without a marker.
fn on_disk(doc: &SnapshotDoc, marked: &BTreeSet<String>) -> Vec<u8> {
    let mut d = doc.clone();
    d.holds.retain(|h| !marked.contains(h));
    meta::encode(&d)
}

impl Vol {
    fn file(&self) -> Result<&File> {
        self.file.as_ref().map_err(|reason| {
            BtrfsError::Damaged {
                what: "volume",
                path: self.path.clone(),
                reason: reason.clone(),
            }
            .into()
        })
    }

    fn doc(&self, diverged: &BlockBitmap) -> VolumeDoc {
        VolumeDoc {
            format: FORMAT,
            id: self.id.clone(),
            size: self.size,
            block_size: self.block_size,
            origin: self.origin.clone(),
            diverged: diverged.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind these locks is only replaced whole after the durable step succeeded,
    // so a panic elsewhere cannot leave it half-updated: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found_volume(id: &VolumeId) -> Error {
    Error::not_found(ObjectKind::Volume, id)
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

impl Inner {
    fn read_catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_catalog(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Passes a data-file sync point of the crash plan, if any.
    fn point(&self, what: &'static str, path: &Path) -> Result<()> {
        match &self.plan {
            Some(p) => p.point(what).map_err(io_err(what, path)),
            None => Ok(()),
        }
    }

    /// Whether a simulated crash happened (then nothing may be cleaned up: a dead
    /// process would not have).
    fn crashed(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| p.crashed())
    }

    fn fsync_dir(&self, what: &'static str, dir: &Path) -> Result<()> {
        self.point(what, dir)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsyncing directory", dir))
    }

    fn vol_path(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir.join(format!("{id}.img"))
    }

    fn snap_path(&self, key: &str) -> PathBuf {
        self.snapshots_dir.join(format!("{key}.img"))
    }

    fn write_doc(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.store
            .write(name, bytes)
            .map_err(io_err("writing metadata", &self.store.dir().join(name)))
    }

    fn remove_doc(&self, name: &str) -> Result<()> {
        self.store
            .remove(name)
            .map_err(io_err("removing metadata", &self.store.dir().join(name)))
    }

    /// Removes a data file a failed operation created, unless a simulated crash is in
    /// progress (a crashed process leaves it for the next open to clean up).
    fn discard(&self, path: &Path) {
        if !self.crashed() {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "data file of a failed operation left behind");
            }
        }
    }

    /// Creates a new data file with `mode`. Called with the name reserved, so a file
    /// already there belongs to nobody (a failed operation's leftover): it is replaced.
    fn create_data_file(&self, path: &Path, mode: u32) -> Result<File> {
        self.point("creating data file", path)?;
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
        };
        match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::info!(path = %path.display(), "replacing a failed operation's leftover data file");
                fs::remove_file(path).map_err(io_err("removing leftover", path))?;
                open()
            }
            r => r,
        }
        .map_err(io_err("creating", path))
    }

    /// Reserves a name for a volume about to be created.
    fn reserve(&self, cat: &mut Catalog, id: &VolumeId) -> Result<Reserved<'_>> {
        if cat.volumes.contains_key(id) || cat.busy.contains(id) {
            return Err(Error::already_exists(ObjectKind::Volume, id));
        }
        cat.busy.insert(id.clone());
        Ok(Reserved {
            inner: self,
            id: id.clone(),
        })
    }

    fn get_vol(&self, id: &VolumeId) -> Result<Arc<Vol>> {
        self.read_catalog()
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| not_found_volume(id))
    }

    /// The volume and its origin snapshot (if it still exists), looked up together so
    /// that the catalog lock is released before the volume's state is locked.
    fn get_vol_with_origin(&self, id: &VolumeId) -> Result<(Arc<Vol>, Option<Arc<Snap>>)> {
        let cat = self.read_catalog();
        let vol = cat
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| not_found_volume(id))?;
        let origin = vol
            .origin
            .as_ref()
            .and_then(|o| cat.snapshots.get(o.key()).cloned());
        Ok((vol, origin))
    }

    fn get_snap(&self, id: &SnapshotId) -> Result<Arc<Snap>> {
        let key = snap_key(id)?;
        self.read_catalog()
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, id))
    }

    /// Opens a snapshot's data file read-only; a file gone behind the backend's back is
    /// an `Integrity` error.
    fn open_snap(&self, snap: &Snap) -> Result<File> {
        match File::open(&snap.path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BtrfsError::Damaged {
                what: "snapshot",
                path: snap.path.clone(),
                reason: "missing (removed outside the backend?)".into(),
            }
            .into()),
            Err(e) => Err(BtrfsError::io("opening", &snap.path, e).into()),
        }
    }

    /// The FIEMAP-derived diverged blocks of `vol` and its extent map (after writing back
    /// its dirty pages). `origin` is the origin snapshot if it is still in the catalog.
    fn derive(&self, vol: &Vol, origin: Option<&Snap>) -> Result<(BlockBitmap, Vec<Extent>)> {
        let file = vol.file()?;
        let mine = sys::fiemap(file, vol.size, true).map_err(io_err("FIEMAP", &vol.path))?;
        let origin_file = match (&vol.origin, origin) {
            (None, _) => None,
            (Some(_), Some(s)) => match File::open(&s.path) {
                Ok(f) => Some(Some(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some(None),
                Err(e) => return Err(BtrfsError::io("opening", &s.path, e).into()),
            },
            (Some(_), None) => Some(None),
        };
        let theirs = match &origin_file {
            Some(Some(f)) => {
                Some(sys::fiemap(f, vol.size, false).map_err(io_err("FIEMAP", &vol.path))?)
            }
            _ => None,
        };
        let mode = match (&origin_file, &theirs) {
            (None, _) => Origin::Zeros,
            (Some(_), Some(t)) => Origin::Present(t),
            (Some(_), None) => Origin::Missing,
        };
        let d = extents::diverged_ranges(&mine, mode, vol.size);
        let mut bits = extents::blocks_of(&d.differ, vol.block_size, vol.size);
        if let Some(Some(of)) = &origin_file {
            for r in &d.compare_bytes {
                let len = (r.end - r.start) as usize;
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                file.read_exact_at(&mut a, r.start)
                    .map_err(io_err("reading", &vol.path))?;
                of.read_exact_at(&mut b, r.start)
                    .map_err(io_err("reading origin of", &vol.path))?;
                let bs = vol.block_size.bytes();
                for blk in vol
                    .block_size
                    .blocks_touched(r.start, r.end - r.start)
                    .iter()
                {
                    let lo = vol.block_size.offset_of(blk).max(r.start);
                    let hi = (vol.block_size.offset_of(blk) + bs).min(r.end);
                    let (lo, hi) = ((lo - r.start) as usize, (hi - r.start) as usize);
                    if a[lo..hi] != b[lo..hi] {
                        bits.insert(blk);
                    }
                }
            }
        }
        Ok((bits, mine))
    }

    /// Persists `written` into the volume's document if it grew.
    fn persist_bitmap(&self, vol: &Vol, st: &mut VolState) -> Result<()> {
        if st.written != st.persisted {
            self.write_doc(
                &meta::volume_doc(&vol.id),
                &meta::encode(&vol.doc(&st.written)),
            )?;
            st.persisted = st.written.clone();
        }
        Ok(())
    }

    fn mint_key(&self) -> String {
        let n = self.minted.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = blake3::Hasher::new();
        h.update(&self.seed);
        h.update(&n.to_le_bytes());
        h.update(&now.as_nanos().to_le_bytes());
        let hex = h.finalize().to_hex();
        format!("s{:x}-{}", now.as_millis(), &hex[..16])
    }

    /// Makes a new volume's data file durable (file, then its directory), then writes its
    /// metadata document: data first, metadata last, so a crash leaves at worst an orphan
    /// data file that the next open removes.
    fn record_new_volume(
        &self,
        id: &VolumeId,
        size: u64,
        block_size: BlockSize,
        origin: Option<SnapshotId>,
        path: &Path,
        file: File,
    ) -> Result<Vol> {
        self.point("fsyncing volume file", path)?;
        file.sync_all().map_err(io_err("fsyncing", path))?;
        self.fsync_dir("fsyncing volumes directory", &self.volumes_dir)?;
        let vol = Vol {
            id: id.clone(),
            size,
            block_size,
            origin,
            path: path.to_path_buf(),
            file: Ok(file),
            state: Mutex::new(VolState {
                written: BlockBitmap::new(),
                persisted: BlockBitmap::new(),
                removed: false,
            }),
        };
        self.write_doc(
            &meta::volume_doc(id),
            &meta::encode(&vol.doc(&BlockBitmap::new())),
        )?;
        Ok(vol)
    }

    fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        let _name = self.reserve(&mut self.write_catalog(), id)?;
        let path = self.vol_path(id);
        let file = self.create_data_file(&path, 0o644)?;
        let made = (|| {
            file.set_len(options.size)
                .map_err(io_err("sizing", &path))?;
            self.record_new_volume(id, options.size, options.block_size, None, &path, file)
        })();
        self.publish(id, &path, made)
    }

    /// Publishes a created or cloned volume, or cleans up after a failed one.
    fn publish(&self, id: &VolumeId, path: &Path, made: Result<Vol>) -> Result<()> {
        match made {
            Ok(vol) => {
                self.write_catalog()
                    .volumes
                    .insert(id.clone(), Arc::new(vol));
                Ok(())
            }
            Err(e) => {
                self.discard(path);
                Err(e)
            }
        }
    }

    fn write_at(&self, vol: &Vol, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = lock(&vol.state);
        if st.removed {
            return Err(not_found_volume(&vol.id));
        }
        let file = vol.file()?;
        // Join the bitmap first: a write that fails half-way may have changed blocks.
        st.written
            .insert_range(vol.block_size.blocks_touched(offset, data.len() as u64));
        file.write_all_at(data, offset)
            .map_err(io_err("writing", &vol.path))?;
        if self.config.durability == Durability::OnWrite {
            self.point("fsyncing volume file", &vol.path)?;
            file.sync_data().map_err(io_err("fsyncing", &vol.path))?;
            self.persist_bitmap(vol, &mut st)?;
        }
        Ok(())
    }

    fn flush(&self, vol: &Vol) -> Result<()> {
        let mut st = lock(&vol.state);
        if st.removed {
            return Err(not_found_volume(&vol.id));
        }
        let file = vol.file()?;
        self.point("fsyncing volume file", &vol.path)?;
        file.sync_data().map_err(io_err("fsyncing", &vol.path))?;
        self.persist_bitmap(vol, &mut st)
    }

    fn snapshot(&self, vol: &Vol, origin: Option<&Snap>) -> Result<(SnapshotId, Arc<Snap>)> {
        let st = lock(&vol.state);
        if st.removed {
            return Err(not_found_volume(&vol.id));
        }
        let file = vol.file()?;
        // Clean source first: FICLONE writes back dirty pages itself, which would make
        // the clone O(dirty data) instead of O(1).
        self.point("fsyncing volume file", &vol.path)?;
        file.sync_data().map_err(io_err("fsyncing", &vol.path))?;
        let (derived, _) = self.derive(vol, origin)?;
        let diverged = st.written.union(&derived);
        let (key, path, snap_file) = loop {
            let key = self.mint_key();
            let path = self.snap_path(&key);
            self.point("creating snapshot file", &path)?;
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
            {
                Ok(f) => break (key, path, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BtrfsError::io("creating", &path, e).into()),
            }
        };
        let id = SnapshotId::new(SCHEME, &key)?;
        let doc = SnapshotDoc {
            format: meta::SNAPSHOT_FORMAT,
            id: id.clone(),
            size: vol.size,
            block_size: vol.block_size,
            parent: vol.origin.clone(),
            diverged,
            holds: BTreeSet::new(),
            source: vol.id.clone(),
        };
        let made = (|| {
            self.point("reflinking snapshot", &path)?;
            sys::reflink(&snap_file, file).map_err(io_err("reflinking into", &path))?;
            self.point("fsyncing snapshot file", &path)?;
            snap_file.sync_all().map_err(io_err("fsyncing", &path))?;
            self.fsync_dir("fsyncing snapshots directory", &self.snapshots_dir)?;
            self.write_doc(&meta::snapshot_doc(&key), &meta::encode(&doc))
        })();
        if let Err(e) = made {
            self.discard(&path);
            return Err(e);
        }
        Ok((id, Arc::new(Snap::new(path, doc))))
    }

    fn clone_snapshot(&self, sid: &SnapshotId, new: &VolumeId) -> Result<()> {
        let key = snap_key(sid)?;
        // Open the snapshot under the lock: once open, a concurrent removal cannot take
        // the data away from this clone.
        let (snap, src, _name) = {
            let mut cat = self.write_catalog();
            let snap = cat
                .snapshots
                .get(key)
                .cloned()
                .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, sid))?;
            let src = self.open_snap(&snap)?;
            // Last in the block: the guard must not drop while `cat` is held.
            let name = self.reserve(&mut cat, new)?;
            (snap, src, name)
        };
        let (size, block_size) = {
            let d = lock(&snap.doc);
            (d.size, d.block_size)
        };
        let len = src.metadata().map_err(io_err("stat", &snap.path))?.len();
        if len != size {
            return Err(BtrfsError::Damaged {
                what: "snapshot",
                path: snap.path.clone(),
                reason: format!("holds {len} bytes, its metadata says {size}"),
            }
            .into());
        }
        let path = self.vol_path(new);
        let file = self.create_data_file(&path, 0o644)?;
        let made = (|| {
            self.point("reflinking volume", &path)?;
            sys::reflink(&file, &src).map_err(io_err("reflinking into", &path))?;
            self.record_new_volume(new, size, block_size, Some(sid.clone()), &path, file)
        })();
        self.publish(new, &path, made)
    }

    fn read_snapshot_at(&self, snap: &Snap, offset: u64, len: usize) -> Result<Bytes> {
        let f = self.open_snap(snap)?;
        let mut buf = BytesMut::zeroed(len);
        f.read_exact_at(&mut buf, offset).map_err(|e| -> Error {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BtrfsError::Damaged {
                    what: "snapshot",
                    path: snap.path.clone(),
                    reason: "shorter than its metadata says".into(),
                }
                .into()
            } else {
                BtrfsError::io("reading", &snap.path, e).into()
            }
        })?;
        Ok(buf.freeze())
    }

    fn stat_volume(&self, vol: &Vol, origin: Option<&Snap>) -> Result<VolumeStat> {
        let st = lock(&vol.state);
        if st.removed {
            return Err(not_found_volume(&vol.id));
        }
        let (derived, map) = self.derive(vol, origin)?;
        let (exclusive, shared) = extents::usage(&map, vol.size);
        Ok(VolumeStat::new(
            vol.id.clone(),
            vol.size,
            vol.block_size,
            vol.origin.clone(),
            st.written.union(&derived),
            Usage::new(exclusive, shared),
        ))
    }

    fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        let (vol, _name) = {
            let mut cat = self.write_catalog();
            let vol = cat
                .volumes
                .get(id)
                .cloned()
                .filter(|_| !cat.busy.contains(id))
                .ok_or_else(|| not_found_volume(id))?;
            cat.busy.insert(id.clone());
            let name = Reserved {
                inner: self,
                id: id.clone(),
            };
            (vol, name)
        };
        {
            let mut st = lock(&vol.state);
            // Metadata first: a crash after this leaves an orphan data file, removed at
            // open.
            self.remove_doc(&meta::volume_doc(id))?;
            st.removed = true;
        }
        self.write_catalog().volumes.remove(id);
        self.point("unlinking volume file", &vol.path)?;
        match fs::remove_file(&vol.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BtrfsError::io("unlinking", &vol.path, e).into());
            }
            _ => {}
        }
        self.fsync_dir("fsyncing volumes directory", &self.volumes_dir)
    }

    /// Folds the FIEMAP-derived blocks of every clone of `snap` into their documents,
    /// while the snapshot is still there to compare with (afterwards only the sharing
    /// flag is left to go by).
    fn fold_clones(&self, cat: &Catalog, sid: &SnapshotId, snap: &Snap) -> Result<()> {
        for vol in cat.volumes.values() {
            if vol.origin.as_ref() != Some(sid) || vol.file.is_err() {
                continue;
            }
            let mut st = lock(&vol.state);
            let (derived, _) = self.derive(vol, Some(snap))?;
            st.written = st.written.union(&derived);
            self.persist_bitmap(vol, &mut st)?;
        }
        Ok(())
    }

    fn remove_snapshot(&self, sid: &SnapshotId) -> Result<()> {
        let key = snap_key(sid)?;
        let mut cat = self.write_catalog();
        let snap = cat
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, sid))?;
        if let Some(by) = lock(&snap.doc).holds.iter().next() {
            return Err(Error::InUse {
                kind: ObjectKind::Snapshot,
                id: sid.to_string(),
                by: by.clone(),
            });
        }
        self.fold_clones(&cat, sid, &snap)?;
        self.remove_doc(&meta::snapshot_doc(key))?;
        cat.snapshots.remove(key);
        self.point("unlinking snapshot file", &snap.path)?;
        match fs::remove_file(&snap.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BtrfsError::io("unlinking", &snap.path, e).into());
            }
            _ => {}
        }
        self.fsync_dir("fsyncing snapshots directory", &self.snapshots_dir)
    }

    /// Places or drops one hold: a marker document created (one directory sync) or
    /// removed, or, for a format 1 snapshot, its document rewritten.
    fn change_holds(&self, sid: &SnapshotId, holder: &str, hold: bool) -> Result<()> {
        let key = snap_key(sid)?;
        let cat = self.write_catalog();
        let snap = cat
            .snapshots
            .get(key)
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, sid))?;
        let mut doc = lock(&snap.doc);
        let mut marked = lock(&snap.marked);
        if doc.holds.contains(holder) == hold {
            return if hold {
                Ok(())
            } else {
                Err(Error::not_found(
                    ObjectKind::Other,
                    format!("hold {holder:?} on {sid}"),
                ))
            };
        }
        let marker = if hold {
            marker_for(&doc, key, holder)
        } else {
            marked
                .contains(holder)
                .then(|| meta::hold_doc(key, holder))
                .flatten()
        };
        let mut next = doc.clone();
        if hold {
            next.holds.insert(holder.to_owned());
        } else {
            next.holds.remove(holder);
        }
        match (&marker, hold) {
            (Some(m), true) => self
                .store
                .create_markers(&[m.as_str()])
                .map_err(io_err("writing metadata", &self.store.dir().join(m)))?,
            (Some(m), false) => self.remove_doc(m)?,
            (None, _) => {
                self.write_doc(&meta::snapshot_doc(key), &on_disk(&next, &marked))?;
            }
        }
        if marker.is_some() {
            if hold {
                marked.insert(holder.to_owned());
            } else {
                marked.remove(holder);
            }
        }
        *doc = next;
        Ok(())
    }

    /// Holds several snapshots for `holder` with one metadata write: a marker document
    /// per new hold, all made durable by one directory sync
    /// ([`DirStore::create_markers`]); format 1 snapshots (created before markers) get
    /// their documents rewritten ([`MetaStore::write_many`]: temps synced, renamed, one
    /// directory sync). A crash in between leaves some holds placed (the caller's
    /// recovery releases them).
    fn hold_many(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        let cat = self.write_catalog();
        let mut seen = BTreeSet::new();
        let mut markers: Vec<(String, &Arc<Snap>)> = Vec::new();
        let mut docs: Vec<(String, Vec<u8>, &Arc<Snap>)> = Vec::new();
        for sid in ids {
            let key = snap_key(sid)?;
            let snap = cat
                .snapshots
                .get(key)
                .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, sid))?;
            if !seen.insert(key) {
                continue;
            }
            // Only this function and `change_holds` change holds, both under the
            // catalog's write lock: what is read here stays current until published.
            let doc = lock(&snap.doc);
            if doc.holds.contains(holder) {
                continue;
            }
            match marker_for(&doc, key, holder) {
                Some(m) => markers.push((m, snap)),
                None => {
                    let mut next = doc.clone();
                    next.holds.insert(holder.to_owned());
                    let bytes = on_disk(&next, &lock(&snap.marked));
                    docs.push((meta::snapshot_doc(key), bytes, snap));
                }
            }
        }
        if !docs.is_empty() {
            let d: Vec<(&str, &[u8])> = docs
                .iter()
                .map(|(n, b, _)| (n.as_str(), b.as_slice()))
                .collect();
            self.store
                .write_many(&d)
                .map_err(io_err("writing metadata", self.store.dir()))?;
            for (_, _, snap) in &docs {
                lock(&snap.doc).holds.insert(holder.to_owned());
            }
        }
        if !markers.is_empty() {
            let names: Vec<&str> = markers.iter().map(|(m, _)| m.as_str()).collect();
            self.store
                .create_markers(&names)
                .map_err(io_err("writing metadata", self.store.dir()))?;
            for (_, snap) in &markers {
                lock(&snap.doc).holds.insert(holder.to_owned());
                lock(&snap.marked).insert(holder.to_owned());
            }
        }
        Ok(())
    }

    fn dedup(&self) -> Result<DedupReport> {
        let cat = self.write_catalog();
        let vols: Vec<&Arc<Vol>> = cat.volumes.values().filter(|v| v.file.is_ok()).collect();
        let mut guards: Vec<MutexGuard<'_, VolState>> =
            vols.iter().map(|v| lock(&v.state)).collect();
        // Volumes whose origin is gone keep only the sharing flag as evidence: fold it in
        // before dedup makes their exclusive extents shared.
        for (vol, st) in vols.iter().zip(guards.iter_mut()) {
            if let Some(o) = &vol.origin {
                if !cat.snapshots.contains_key(o.key()) {
                    let (derived, _) = self.derive(vol, None)?;
                    st.written = st.written.union(&derived);
                    self.persist_bitmap(vol, st)?;
                }
            }
        }
        let mut files: Vec<(File, u64, PathBuf)> = Vec::new();
        for vol in &vols {
            let f = vol.file()?;
            f.sync_data().map_err(io_err("fsyncing", &vol.path))?;
            let f = f.try_clone().map_err(io_err("dup", &vol.path))?;
            files.push((f, vol.size, vol.path.clone()));
        }
        for snap in cat.snapshots.values() {
            let size = lock(&snap.doc).size;
            match File::open(&snap.path) {
                Ok(f) => files.push((f, size, snap.path.clone())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BtrfsError::io("opening", &snap.path, e).into()),
            }
        }
        let report = crate::dedup::run(&files)?;
        drop(guards);
        Ok(report)
    }

    fn usage_total(&self) -> Result<TotalUsage> {
        let cat = self.read_catalog();
        let mut total = TotalUsage::default();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut add = |f: &File, size: u64, path: &Path, sync: bool| -> Result<()> {
            let map = sys::fiemap(f, size, sync).map_err(io_err("FIEMAP", path))?;
            total.files += 1;
            total.logical_bytes += size;
            for e in &map {
                let len = e.end().min(size).saturating_sub(e.logical.min(size));
                total.referenced_bytes += len;
                if e.inline() || e.unknown() {
                    total.unique_bytes += len;
                } else if len > 0 {
                    spans.push((e.physical, e.physical + len));
                }
            }
            Ok(())
        };
        for vol in cat.volumes.values() {
            if let Ok(f) = &vol.file {
                add(f, vol.size, &vol.path, true)?;
            }
        }
        for snap in cat.snapshots.values() {
            if let Ok(f) = File::open(&snap.path) {
                add(&f, lock(&snap.doc).size, &snap.path, false)?;
            }
        }
        spans.sort_unstable();
        let mut end = 0u64;
        for (s, e) in spans {
            let s = s.max(end);
            if e > s {
                total.unique_bytes += e - s;
                end = e;
            }
        }
        Ok(total)
    }
}

impl BtrfsBackend {
    /// Opens (see [`BtrfsBuilder::build`](crate::BtrfsBuilder::build)).
    pub(crate) fn open(config: BtrfsConfig, plan: Option<Arc<CrashPlan>>) -> Result<Self> {
        let root = config.root.clone();
        let root_err = |reason: String| -> Error {
            BtrfsError::Root {
                path: root.clone(),
                reason,
            }
            .into()
        };
        let md = fs::metadata(&root).map_err(|e| root_err(format!("cannot be used: {e}")))?;
        if !md.is_dir() {
            return Err(root_err("is not a directory".into()));
        }
        let dir = File::open(&root).map_err(|e| root_err(format!("cannot be opened: {e}")))?;
        if let Err(magic) = sys::is_btrfs(&dir).map_err(io_err("fstatfs", &root))? {
            return Err(BtrfsError::NotBtrfs { path: root, magic }.into());
        }
        let volumes_dir = root.join("volumes");
        let snapshots_dir = root.join("snapshots");
        for d in [&volumes_dir, &snapshots_dir] {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        let meta_dir = root.join("meta");
        let mut store = DirStore::open(&meta_dir).map_err(io_err("opening", &meta_dir))?;
        if let Some(p) = &plan {
            store = store.with_crash_plan(Arc::clone(p));
        }

        let mut vol_docs = BTreeMap::new();
        let mut snap_docs = BTreeMap::new();
        let mut markers = Vec::new();
        for name in store.list().map_err(io_err("listing", &meta_dir))? {
            let Some(kind) = meta::parse_doc_name(&name) else {
                continue;
            };
            if let DocName::Hold(key, holder) = kind {
                markers.push((key, holder, name));
                continue;
            }
            let Some(bytes) = store
                .read(&name)
                .map_err(io_err("reading", &meta_dir.join(&name)))?
            else {
                continue;
            };
            let mismatch = || -> Error {
                BtrfsError::Metadata {
                    doc: name.clone(),
                    reason: "the id inside does not match the document name".into(),
                }
                .into()
            };
            match kind {
                DocName::Volume(id) => {
                    let d: VolumeDoc = meta::decode(&name, &bytes)?;
                    if d.id != id {
                        return Err(mismatch());
                    }
                    vol_docs.insert(id, d);
                }
                DocName::Snapshot(key) => {
                    let d: SnapshotDoc = meta::decode(&name, &bytes)?;
                    if d.id.key() != key || d.id.scheme() != SCHEME {
                        return Err(mismatch());
                    }
                    snap_docs.insert(key, d);
                }
                DocName::Hold(..) => unreachable!("markers are taken above"),
            }
        }
        // Hold markers join their snapshots' holds. A marker of a snapshot that has no
        // document is no hold on anything (a snapshot is removed only once unheld, and
        // its document is durable before anyone can hold it): removed.
        let mut marked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (key, holder, name) in markers {
            match snap_docs.get_mut(&key) {
                Some(d) => {
                    d.holds.insert(holder.clone());
                    marked.entry(key).or_default().insert(holder);
                }
                None => {
                    tracing::warn!(marker = %name, "removing the hold marker of an unknown snapshot");
                    store
                        .remove(&name)
                        .map_err(io_err("removing", &meta_dir.join(&name)))?;
                }
            }
        }
        // Data files no document names are the first half of an interrupted create,
        // clone or snapshot, or the second half of an interrupted remove: roll back.
        remove_orphans(&volumes_dir, |stem| {
            VolumeId::new(stem).is_ok_and(|id| vol_docs.contains_key(&id))
        })?;
        remove_orphans(&snapshots_dir, |stem| snap_docs.contains_key(stem))?;

        let mut cat = Catalog::default();
        for (id, d) in vol_docs {
            let path = volumes_dir.join(format!("{id}.img"));
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => {
                    let len = f.metadata().map_err(io_err("stat", &path))?.len();
                    if len == d.size {
                        Ok(f)
                    } else {
                        Err(format!("holds {len} bytes, its metadata says {}", d.size))
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err("missing (removed outside the backend?)".to_owned())
                }
                Err(e) => return Err(BtrfsError::io("opening", &path, e).into()),
            };
            let vol = Vol {
                id: id.clone(),
                size: d.size,
                block_size: d.block_size,
                origin: d.origin,
                path,
                file,
                state: Mutex::new(VolState {
                    written: d.diverged.clone(),
                    persisted: d.diverged,
                    removed: false,
                }),
            };
            cat.volumes.insert(id, Arc::new(vol));
        }
        for (key, d) in snap_docs {
            let path = snapshots_dir.join(format!("{key}.img"));
            let snap = Snap::new(path, d);
            if let Some(m) = marked.remove(&key) {
                *lock(&snap.marked) = m;
            }
            cat.snapshots.insert(key, Arc::new(snap));
        }

        let mut seed = blake3::Hasher::new();
        seed.update(root.as_os_str().as_encoded_bytes());
        seed.update(&std::process::id().to_le_bytes());
        seed.update(&RandomState::new().build_hasher().finish().to_le_bytes());
        seed.update(
            &SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_le_bytes(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                volumes_dir,
                snapshots_dir,
                store,
                plan,
                catalog: RwLock::new(cat),
                minted: AtomicU64::new(0),
                seed: *seed.finalize().as_bytes(),
            }),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.config.root
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &BtrfsConfig {
        &self.inner.config
    }

    /// Space used by every volume and snapshot together, with shared extents counted
    /// once ([`TotalUsage::unique_bytes`]): what sharing and [`Backend::dedup`] save.
    /// O(extents of all files); writes back dirty volume pages first.
    ///
    /// # Errors
    /// `Backend` for IO errors.
    pub async fn usage_total(&self) -> Result<TotalUsage> {
        self.run(|i| i.usage_total()).await
    }

    /// Runs `f` on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::backend(SCHEME, e))?
    }
}

/// Removes the `*.img` files of `dir` whose stem `keep` rejects, then fsyncs `dir`.
fn remove_orphans(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    let mut removed = false;
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let e = e.map_err(io_err("listing", dir))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
            continue;
        };
        if !keep(stem) {
            fs::remove_file(e.path()).map_err(io_err("removing orphan", &e.path()))?;
            removed = true;
        }
    }
    if removed {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsyncing directory", dir))?;
    }
    Ok(())
}

impl fmt::Debug for BtrfsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BtrfsBackend")
            .field("root", &self.inner.config.root)
            .field("durability", &self.inner.config.durability)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Backend for BtrfsBackend {
    fn info(&self) -> BackendInfo {
        let mut caps = Capabilities::default();
        caps.local_path = true;
        caps.dedup = true;
        caps.usage = true;
        caps.cheap_clone = true;
        BackendInfo::new(SCHEME, caps, self.root().display().to_string())
    }

    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        options.validate()?;
        let (id, options) = (id.clone(), options.clone());
        self.run(move |i| i.create_volume(&id, &options)).await
    }

    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        let vol = self.inner.get_vol(id)?;
        check_range(offset, len as u64, vol.size)?;
        self.run(move |_| {
            let file = vol.file()?;
            let mut buf = BytesMut::zeroed(len);
            file.read_exact_at(&mut buf, offset)
                .map_err(io_err("reading", &vol.path))?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let vol = self.inner.get_vol(id)?;
        check_range(offset, data.len() as u64, vol.size)?;
        if data.is_empty() {
            return Ok(());
        }
        let data = data.to_vec();
        self.run(move |i| i.write_at(&vol, offset, &data)).await
    }

    async fn flush(&self, id: &VolumeId) -> Result<()> {
        let vol = self.inner.get_vol(id)?;
        self.run(move |i| i.flush(&vol)).await
    }

    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        let (vol, origin) = self.inner.get_vol_with_origin(id)?;
        self.run(move |i| {
            let (sid, snap) = i.snapshot(&vol, origin.as_deref())?;
            i.write_catalog()
                .snapshots
                .insert(sid.key().to_owned(), snap);
            Ok(sid)
        })
        .await
    }

    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        snap_key(snapshot)?;
        let (sid, new) = (snapshot.clone(), new.clone());
        self.run(move |i| i.clone_snapshot(&sid, &new)).await
    }

    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let snap = self.inner.get_snap(id)?;
        let size = lock(&snap.doc).size;
        check_range(offset, len as u64, size)?;
        self.run(move |i| i.read_snapshot_at(&snap, offset, len))
            .await
    }

    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let (vol, origin) = self.inner.get_vol_with_origin(id)?;
        self.run(move |i| i.stat_volume(&vol, origin.as_deref()))
            .await
    }

    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let snap = self.inner.get_snap(id)?;
        let d = lock(&snap.doc);
        Ok(SnapshotStat::new(
            id.clone(),
            d.size,
            d.block_size,
            d.parent.clone(),
            d.diverged.clone(),
            d.holds.iter().cloned().collect(),
        ))
    }

    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        let id = id.clone();
        self.run(move |i| i.remove_volume(&id)).await
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        snap_key(id)?;
        let id = id.clone();
        self.run(move |i| i.remove_snapshot(&id)).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        Ok(self.inner.read_catalog().volumes.keys().cloned().collect())
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        let mut v: Vec<SnapshotId> = self
            .inner
            .read_catalog()
            .snapshots
            .values()
            .map(|s| lock(&s.doc).id.clone())
            .collect();
        v.sort();
        Ok(v)
    }

    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        validate_holder(holder)?;
        snap_key(id)?;
        let (id, holder) = (id.clone(), holder.to_owned());
        self.run(move |i| i.change_holds(&id, &holder, true)).await
    }

    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        validate_holder(holder)?;
        for id in ids {
            snap_key(id)?;
        }
        let (ids, holder) = (ids.to_vec(), holder.to_owned());
        self.run(move |i| i.hold_many(&ids, &holder)).await
    }

    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        snap_key(id)?;
        let (id, holder) = (id.clone(), holder.to_owned());
        self.run(move |i| i.change_holds(&id, &holder, false)).await
    }

    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf> {
        let vol = self.inner.get_vol(id)?;
        vol.file()?;
        Ok(vol.path.clone())
    }

    async fn dedup(&self) -> Result<DedupReport> {
        self.run(|i| i.dedup()).await
    }
}
