//! Layers: the graph-driver operations a container runtime calls, over any [`Backend`].
//!
//! ```text
//!  diff(id) ──snapshot──▶ reference tar (2 KiB) ──registry──▶ apply_diff(id', parent, tar)
//!                                                                 │ records a lazy layer:
//!                                                                 │ hold on the snapshot,
//!                                                                 ▼ no clone, no data read
//!  create(c, Some(id')) ◀── clone ── snapshot ◀── first get(id') clones (lazy cloning)
//! ```
//!
//! A [`LayerStore`] keeps one small JSON record per layer in a [`MetaStore`], written
//! crash-safely: every operation first records what it is about to do (a *pending*
//! record), then changes the backend (idempotent steps), then records the outcome. When a
//! store is opened, pending records left by a crash are rolled back (create, clone, diff)
//! or forward (remove), so the store is always as before or as after each operation.
//!
//! Layers are flattened: a volume holds a whole filesystem (ext4), and a layer's snapshot
//! already contains everything below it. So only the layer a runtime actually uses (the
//! top of an image, or a container's writable layer) is ever cloned.
//!
//! | kind | made by | content | `get` |
//! |---|---|---|---|
//! | [`LayerKind::Writable`] | [`LayerStore::create`] | a volume cloned from the parent's snapshot (or a fresh one) | that volume |
//! | [`LayerKind::Lazy`] | [`LayerStore::apply_diff`] of a [reference layer](mod@reference) | the referenced snapshot, held | clones it on first use |
//! | [`LayerKind::Unpacked`] | [`LayerStore::apply_diff`] of a [traditional layer](traditional), [`LayerStore::import_dir`] | a snapshot of a volume the layer was unpacked into, held | clones it on first use |
//!
//! **Reference counting.** A recorded layer holds its snapshot under a holder name derived
//! from the store name and the layer id ([`LayerStore::holder`]), so the backend refuses
//! to remove it (`InUse`); removing the layer releases the hold. A layer with children
//! cannot be removed (`InUse`), nor can one that is in use through `get` without `put`.
//! Snapshots are never removed by `remove`: registries may still reference them (a
//! pushed image does not hold its snapshot); an unheld snapshot is left to the backend's
//! garbage collection.
//!
//! **Several workers on shared storage** each open their own store (own metadata, own
//! `name`); volume and holder names are prefixed with the store name, which must
//! therefore be unique among the stores sharing a backend.

pub mod archive;
pub mod ext4;
pub mod reference;
pub mod traditional;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, VolumeOptions};
use crate::block::BlockSize;
use crate::error::{Error, ErrorKind, ObjectKind, Result};
use crate::ids::{MAX_VOLUME_ID_LEN, SnapshotId, VolumeId};
use crate::merkle::{self, MerkleRoot};
use crate::persist::MetaStore;

pub use reference::Reference;
pub use traditional::TarOptions;

/// Longest store name, in bytes.
pub const MAX_STORE_NAME_LEN: usize = 16;
/// Longest layer id, in bytes.
pub const MAX_LAYER_ID_LEN: usize = MAX_VOLUME_ID_LEN;

const RECORD_VERSION: u32 = 1;
const STORE_DOC: &str = "store.json";
const IO_CHUNK: usize = 4 << 20;

/// How to open a [`LayerStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerStoreOptions {
    /// This store's name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 16 bytes, unique among the
    /// stores sharing a backend. It prefixes volume and holder names. Default `layers`.
    pub name: String,
    /// Size of fresh volumes (a `create` without parent, a traditional layer without
    /// parent; grown to fit the layer). Volumes are sparse. Default 1 GiB.
    pub volume_size: u64,
    /// Limits for traditional layers.
    pub tar: TarOptions,
    /// Where traditional layers are unpacked (default: the system temp directory).
    pub scratch_dir: Option<PathBuf>,
    /// How traditional layers are applied. Default [`ApplyMode::Auto`].
    pub apply: ApplyMode,
}

/// How [`LayerStore::apply_diff`] applies a traditional layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyMode {
    /// [`Mounted`](Self::Mounted) when the process runs as root, else
    /// [`Rebuilt`](Self::Rebuilt).
    #[default]
    Auto,
    /// Root only: clone the parent, loop-mount its ext4 and apply the tar in place.
    /// Lossless and O(layer) (on a backend with [`local_path`](crate::Backend::local_path);
    /// others are written back block by block, O(image) reads).
    Mounted,
    /// Extract the parent with `debugfs rdump`, unpack the layer over it in a scratch
    /// directory and rebuild the whole image with `mke2fs -d`: needs no privilege,
    /// O(image) per layer, and loses what [`Loss`] lists (reported in
    /// [`AppliedLayer::losses`]).
    Rebuilt,
}

/// How a layer was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyMethod {
    /// A reference layer: recorded lazily, nothing unpacked.
    Reference,
    /// A traditional layer applied into the mounted ext4 of a clone of its parent.
    Mounted,
    /// A traditional layer unpacked in a scratch directory and rebuilt with `mke2fs -d`.
    Rebuilt,
}

/// Something a traditional layer lost on the [rebuild](ApplyMode::Rebuilt) path (never
/// on the mounted one, except what the target filesystem refused).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Loss {
    /// Owners could not be set (not root): `entries` belong to the unpacking user.
    Owners {
        /// Entries affected.
        entries: u64,
    },
    /// Extended attributes refused (privileged names without root, or unsupported).
    Xattrs {
        /// Attributes dropped.
        count: u64,
    },
    /// `mke2fs -d` keeps whole seconds: entries whose timestamps had a sub-second part.
    SubsecondTimes {
        /// Entries affected.
        entries: u64,
    },
    /// Device nodes added afterwards with `debugfs`: their timestamps are not kept.
    DeviceTimes {
        /// Device nodes affected.
        entries: u64,
    },
    /// The parent's tree was read back with `debugfs rdump`, which drops its device
    /// nodes, fifos and sockets, its hard-link identity and sub-second timestamps.
    ParentTree,
}

impl Default for LayerStoreOptions {
    fn default() -> Self {
        Self {
            name: "layers".to_owned(),
            volume_size: 1 << 30,
            tar: TarOptions::default(),
            scratch_dir: None,
            apply: ApplyMode::Auto,
        }
    }
}

impl LayerStoreOptions {
    /// Options with store name `name` and defaults otherwise.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
    /// Sets [`volume_size`](Self::volume_size).
    pub fn with_volume_size(mut self, size: u64) -> Self {
        self.volume_size = size;
        self
    }
    /// Sets [`tar`](Self::tar).
    pub fn with_tar_options(mut self, tar: TarOptions) -> Self {
        self.tar = tar;
        self
    }
    /// Sets [`scratch_dir`](Self::scratch_dir).
    pub fn with_scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
        self
    }
    /// Sets [`apply`](Self::apply).
    pub fn with_apply_mode(mut self, mode: ApplyMode) -> Self {
        self.apply = mode;
        self
    }
}

/// What a layer is (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LayerKind {
    /// A writable layer with its own volume.
    Writable,
    /// A pulled reference layer: a held snapshot, cloned on first `get`.
    Lazy,
    /// A traditional layer unpacked into a snapshot, cloned on first `get`.
    Unpacked,
}

/// What [`LayerStore::layer`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerInfo {
    /// The layer id.
    pub id: String,
    /// The parent layer.
    pub parent: Option<String>,
    /// What it is.
    pub kind: LayerKind,
    /// The snapshot it holds (the layer's content for lazy and unpacked layers; the last
    /// `diff` for writable ones).
    pub snapshot: Option<SnapshotId>,
    /// Its volume, if it has one now (lazy layers get one on first `get`).
    pub volume: Option<VolumeId>,
    /// The Merkle root of `snapshot` and its tree, when known (from a version 2 reference
    /// layer, or computed by `diff`): what a worker verifies fetched blocks against.
    pub merkle: Option<MerkleRoot>,
    /// Logical size in bytes.
    pub size: u64,
    /// Open `get`s without a `put`, in this process.
    pub mounts: u32,
}

/// What [`LayerStore::diff`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerDiff {
    /// The reference document.
    pub reference: Reference,
    /// The reference layer: a deterministic tar of about 2 KiB.
    pub tar: Vec<u8>,
}

/// What [`LayerStore::apply_diff`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppliedLayer {
    /// Lazy (a reference layer) or unpacked (a traditional one).
    pub kind: LayerKind,
    /// The snapshot the layer now holds.
    pub snapshot: SnapshotId,
    /// Logical size of the layer's volume.
    pub size: u64,
    /// Uncompressed tar bytes read (0 for a reference layer beyond its 2 KiB).
    pub tar_bytes: u64,
    /// Regular-file bytes unpacked (0 for a reference layer).
    pub file_bytes: u64,
    /// How it was applied.
    pub method: ApplyMethod,
    /// What was not kept (empty for reference layers and mounted applies as root).
    pub losses: Vec<Loss>,
}

/// An operation in flight, recorded before the backend is touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op", deny_unknown_fields)]
enum Pending {
    /// Creating the layer (create, apply_diff, import): rolled back after a crash.
    Create,
    /// Cloning the snapshot into the layer's volume (first get): rolled back.
    Clone,
    /// Replacing the held snapshot by `new` (diff of a writable layer): rolled back.
    Diff {
        new: SnapshotId,
        /// The Merkle tree of `new`, held with it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merkle: Option<MerkleRoot>,
    },
    /// Removing the layer: rolled forward.
    Remove,
}

/// The durable record of one layer (`layer.<id>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    id: String,
    parent: Option<String>,
    kind: LayerKind,
    snapshot: Option<SnapshotId>,
    volume: bool,
    size: u64,
    pending: Option<Pending>,
    /// The Merkle root of `snapshot` (held like it). Absent in records written before
    /// Merkle roots existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merkle: Option<MerkleRoot>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct StoreDoc {
    version: u32,
    name: String,
}

#[derive(Debug, Default)]
struct Inner {
    layers: BTreeMap<String, Record>,
    mounts: HashMap<String, u32>,
    poisoned: Option<String>,
}

/// Docker graph-driver operations over a [`Backend`], with durable, crash-safe metadata.
/// See the [module docs](self).
///
/// Operations are serialized by one async lock. Blocking work (metadata fsyncs,
/// unpacking, `mke2fs`) runs on `tokio::task::spawn_blocking`, so a Tokio runtime is
/// required.
#[derive(Debug)]
pub struct LayerStore<B: Backend> {
    backend: B,
    meta: Arc<dyn MetaStore>,
    options: LayerStoreOptions,
    inner: tokio::sync::Mutex<Inner>,
}

/// Checks a layer id: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes (like [`VolumeId`]).
///
/// # Errors
/// `InvalidInput` otherwise.
pub fn validate_layer_id(id: &str) -> Result<()> {
    VolumeId::new(id).map(|_| ()).map_err(|_| {
        Error::invalid(format!(
            "layer id {id:?} must match [A-Za-z0-9][A-Za-z0-9._-]* (at most {MAX_LAYER_ID_LEN} bytes)"
        ))
    })
}

fn validate_store_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_STORE_NAME_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "layer store name {name:?} must match [A-Za-z0-9][A-Za-z0-9_-]* (at most {MAX_STORE_NAME_LEN} bytes)"
        )))
    }
}

fn doc_name(id: &str) -> String {
    format!("layer.{id}.json")
}

/// Whether a record that does not parse is what a crash leaves of one written in place:
/// empty, all zero bytes, or a prefix of a record (the JSON ends early).
fn torn(bytes: &[u8], e: &serde_json::Error) -> bool {
    bytes.iter().all(|&b| b == 0) || e.classify() == serde_json::error::Category::Eof
}

fn meta_error(e: std::io::Error) -> Error {
    Error::backend("layer-meta", e)
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::backend("layer-store", format!("blocking task failed: {e}"))
}

fn ignore_not_found(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)?
}

/// Runs two futures concurrently until both are done (tokio's `join!` without its
/// `macros` feature).
async fn join2<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (
        ra.expect("polled to completion"),
        rb.expect("polled to completion"),
    )
}

/// A traditional layer read, unpacked and built into an ext4 image file.
struct Built {
    _scratch: tempfile::TempDir,
    image: PathBuf,
    size: u64,
    tar_bytes: u64,
    file_bytes: u64,
    losses: Vec<Loss>,
}

/// What the first bytes of a layer said it is.
enum Sniffed {
    Reference(Reference),
    Traditional(Box<dyn Read + Send>),
}

impl<B: Backend> LayerStore<B> {
    /// Opens the store whose metadata lives in `meta`, over `backend`, and recovers from a
    /// crash: pending operations are rolled back (or, for removals, finished).
    ///
    /// # Errors
    /// `Config` for a bad name, or a name that differs from the one the metadata was
    /// created with; `Integrity` for an unreadable record; backend errors from recovery.
    pub async fn open(
        backend: B,
        meta: Arc<dyn MetaStore>,
        options: LayerStoreOptions,
    ) -> Result<Self> {
        validate_store_name(&options.name)?;
        VolumeOptions::new(options.volume_size).validate()?;
        let store = Self {
            backend,
            meta,
            options,
            inner: tokio::sync::Mutex::new(Inner::default()),
        };
        let meta = store.meta.clone();
        let name = store.options.name.clone();
        let records = blocking(move || {
            let doc = meta.read(STORE_DOC).map_err(meta_error)?;
            match doc {
                Some(bytes) => {
                    let d: StoreDoc = serde_json::from_slice(&bytes).map_err(|e| {
                        Error::Integrity(format!("layer store document {STORE_DOC}: {e}"))
                    })?;
                    if d.name != name || d.version != RECORD_VERSION {
                        return Err(Error::Config(format!(
                            "layer metadata belongs to store {:?} (version {}), not {name:?}",
                            d.name, d.version
                        )));
                    }
                }
                None => {
                    let d = StoreDoc {
                        version: RECORD_VERSION,
                        name: name.clone(),
                    };
                    meta.write(STORE_DOC, &serde_json::to_vec(&d).expect("serializes"))
                        .map_err(meta_error)?;
                }
            }
            let mut out = Vec::new();
            for doc in meta.list().map_err(meta_error)? {
                if doc == STORE_DOC {
                    continue;
                }
                let bytes = meta.read(&doc).map_err(meta_error)?.unwrap_or_default();
                let r: Record = match serde_json::from_slice(&bytes) {
                    Ok(r) => r,
                    // The first record of a create is written in place
                    // (`MetaStore::create`), before the backend is touched: a crash can
                    // leave it empty, zero-filled or cut short. Nothing was done yet.
                    Err(e) if torn(&bytes, &e) => {
                        tracing::info!(record = %doc, "removing the torn record of a create a crash interrupted");
                        meta.remove(&doc).map_err(meta_error)?;
                        continue;
                    }
                    Err(e) => return Err(Error::Integrity(format!("layer record {doc}: {e}"))),
                };
                if doc != doc_name(&r.id) || r.version != RECORD_VERSION {
                    return Err(Error::Integrity(format!(
                        "layer record {doc} names layer {:?} (version {})",
                        r.id, r.version
                    )));
                }
                out.push(r);
            }
            Ok(out)
        })
        .await?;
        {
            let mut inner = store.inner.lock().await;
            for r in records {
                inner.layers.insert(r.id.clone(), r);
            }
            let pending: Vec<Record> = inner
                .layers
                .values()
                .filter(|r| r.pending.is_some())
                .cloned()
                .collect();
            for r in pending {
                tracing::info!(
                    store = %store.options.name,
                    layer = %r.id,
                    pending = ?r.pending,
                    "settling an operation a crash interrupted"
                );
                store.recover(&mut inner, r).await?;
            }
        }
        Ok(store)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &LayerStoreOptions {
        &self.options
    }

    /// The backend name for layer `id`'s volume and hold: `<store>.<id>`, or, when that is
    /// longer than 64 bytes, `<store>..<blake3(id) hex>` cut to 64 bytes (a layer id never
    /// starts with `.`, so the two forms cannot collide).
    fn key(&self, id: &str) -> String {
        let name = &self.options.name;
        if name.len() + 1 + id.len() <= MAX_VOLUME_ID_LEN {
            format!("{name}.{id}")
        } else {
            let hex = blake3::hash(id.as_bytes()).to_hex();
            format!("{name}..{}", &hex[..MAX_VOLUME_ID_LEN - name.len() - 2])
        }
    }

    /// The volume layer `id` uses (whether or not it exists yet).
    ///
    /// # Errors
    /// `InvalidInput` for a malformed id.
    pub fn volume_id(&self, id: &str) -> Result<VolumeId> {
        validate_layer_id(id)?;
        VolumeId::new(self.key(id))
    }

    /// The holder name under which layer `id` holds its snapshot.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed id.
    pub fn holder(&self, id: &str) -> Result<String> {
        validate_layer_id(id)?;
        Ok(self.key(id))
    }

    fn check(&self, inner: &Inner) -> Result<()> {
        match &inner.poisoned {
            Some(why) => Err(Error::backend(
                "layer-store",
                format!("a metadata write failed ({why}); reopen the store to recover"),
            )),
            None => Ok(()),
        }
    }

    /// Writes a record durably; on failure the store is poisoned (what is on disk is
    /// unknown until a reopen recovers it).
    async fn write_record(&self, inner: &mut Inner, rec: &Record) -> Result<()> {
        self.put_record(inner, rec, false).await
    }

    /// Writes the first record of a layer being created (`Pending::Create`): in place
    /// ([`MetaStore::create`]: no temporary file or rename), since a crash that tears it
    /// happened before the backend was touched and `open` drops a torn record.
    async fn create_record(&self, inner: &mut Inner, rec: &Record) -> Result<()> {
        debug_assert_eq!(rec.pending, Some(Pending::Create));
        self.put_record(inner, rec, true).await
    }

    async fn put_record(&self, inner: &mut Inner, rec: &Record, new: bool) -> Result<()> {
        let meta = self.meta.clone();
        let name = doc_name(&rec.id);
        let bytes = serde_json::to_vec(rec).expect("a record always serializes");
        let r = blocking(move || {
            if new {
                meta.create(&name, &bytes)
            } else {
                meta.write(&name, &bytes)
            }
            .map_err(meta_error)
        })
        .await;
        match r {
            Ok(()) => {
                inner.layers.insert(rec.id.clone(), rec.clone());
                Ok(())
            }
            Err(e) => {
                inner.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    async fn delete_record(&self, inner: &mut Inner, id: &str) -> Result<()> {
        let meta = self.meta.clone();
        let name = doc_name(id);
        let r = blocking(move || meta.remove(&name).map_err(meta_error)).await;
        match r {
            Ok(()) => {
                inner.layers.remove(id);
                inner.mounts.remove(id);
                Ok(())
            }
            Err(e) => {
                inner.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Brings a record with a pending operation to a settled state: rolls back create,
    /// clone and diff, finishes remove. Every step is idempotent.
    /// Whether `holder` holds the layer's snapshot and, with a Merkle root, its tree.
    async fn holds_in_place(&self, rec: &Record, holder: &str) -> Result<bool> {
        let held = |r: Result<crate::SnapshotStat>| match r {
            Ok(st) => Ok(st.holds.iter().any(|h| h == holder)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        let Some(snap) = &rec.snapshot else {
            return Ok(false);
        };
        if !held(self.backend.stat_snapshot(snap).await)? {
            return Ok(false);
        }
        match &rec.merkle {
            Some(m) => held(self.backend.stat_snapshot(&m.tree).await),
            None => Ok(true),
        }
    }

    async fn recover(&self, inner: &mut Inner, rec: Record) -> Result<()> {
        let vol = VolumeId::new(self.key(&rec.id))?;
        let holder = self.key(&rec.id);
        if rec.pending == Some(Pending::Create)
            && rec.kind == LayerKind::Lazy
            && !rec.volume
            && self.holds_in_place(&rec, &holder).await?
        {
            // A lazy apply_diff that reached its holds took effect (see apply_reference).
            let mut r = rec;
            r.pending = None;
            return self.write_record(inner, &r).await;
        }
        match rec.pending.clone() {
            None => Ok(()),
            Some(Pending::Create) | Some(Pending::Remove) => {
                // Every create that makes a volume records `volume: true` first; a lazy
                // create makes none, and a volume of its name is not its own.
                if rec.volume {
                    ignore_not_found(self.backend.remove_volume(&vol).await)?;
                }
                if let Some(m) = &rec.merkle {
                    ignore_not_found(self.backend.release_snapshot(&m.tree, &holder).await)?;
                }
                if let Some(s) = &rec.snapshot {
                    ignore_not_found(self.backend.release_snapshot(s, &holder).await)?;
                    if rec.pending == Some(Pending::Create) && rec.kind != LayerKind::Lazy {
                        // Minted by this create and never published: remove it.
                        match self.backend.remove_snapshot(s).await {
                            Err(e)
                                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InUse) => {}
                            other => other?,
                        }
                    }
                }
                self.delete_record(inner, &rec.id).await
            }
            Some(Pending::Clone) => {
                ignore_not_found(self.backend.remove_volume(&vol).await)?;
                let mut r = rec;
                r.volume = false;
                r.pending = None;
                self.write_record(inner, &r).await
            }
            Some(Pending::Diff { new, merkle }) => {
                let mut r = rec;
                r.pending = None;
                let old_back = match &r.snapshot {
                    Some(old) => match self.backend.hold_snapshot(old, &holder).await {
                        Ok(()) => {
                            if let Some(m) = &r.merkle {
                                ignore_not_found(
                                    self.backend.hold_snapshot(&m.tree, &holder).await,
                                )?;
                            }
                            true
                        }
                        // The old snapshot was released and removed meanwhile: keep the
                        // new one instead (roll forward).
                        Err(e) if e.kind() == ErrorKind::NotFound => false,
                        Err(e) => return Err(e),
                    },
                    None => true,
                };
                if old_back {
                    let minted = std::iter::once(&new).chain(merkle.as_ref().map(|m| &m.tree));
                    for s in minted {
                        ignore_not_found(self.backend.release_snapshot(s, &holder).await)?;
                        match self.backend.remove_snapshot(s).await {
                            Err(e)
                                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InUse) => {}
                            other => other?,
                        }
                    }
                } else {
                    self.backend.hold_snapshot(&new, &holder).await?;
                    if let Some(m) = &merkle {
                        self.backend.hold_snapshot(&m.tree, &holder).await?;
                    }
                    r.snapshot = Some(new);
                    r.merkle = merkle;
                }
                self.write_record(inner, &r).await
            }
        }
    }

    /// After a backend step of an operation failed: roll its pending record back now
    /// (poisoning the store if that fails too), and return the original error.
    async fn abort(&self, inner: &mut Inner, rec: Record, err: Error) -> Error {
        let layer = rec.id.clone();
        if let Err(e) = self.recover(inner, rec).await {
            tracing::error!(
                store = %self.options.name,
                %layer,
                error = %e,
                cause = %err,
                "rolling back a failed operation failed: the store refuses work until reopened"
            );
            if inner.poisoned.is_none() {
                inner.poisoned = Some(format!("rollback failed: {e}"));
            }
        }
        err
    }

    fn record<'a>(&self, inner: &'a Inner, id: &str) -> Result<&'a Record> {
        validate_layer_id(id)?;
        inner
            .layers
            .get(id)
            .ok_or_else(|| Error::not_found(ObjectKind::Layer, id))
    }

    fn absent(&self, inner: &Inner, id: &str) -> Result<()> {
        validate_layer_id(id)?;
        if inner.layers.contains_key(id) {
            return Err(Error::already_exists(ObjectKind::Layer, id));
        }
        Ok(())
    }

    /// The parent's snapshot and size, for a new child.
    fn parent_snapshot(&self, inner: &Inner, parent: &str) -> Result<(SnapshotId, u64)> {
        let p = self.record(inner, parent)?;
        if p.pending == Some(Pending::Remove) {
            return Err(Error::not_found(ObjectKind::Layer, parent));
        }
        match &p.snapshot {
            Some(s) => Ok((s.clone(), p.size)),
            None => Err(Error::invalid(format!(
                "parent layer {parent} has no snapshot yet (diff it first)"
            ))),
        }
    }

    async fn volume_must_be_free(&self, vol: &VolumeId) -> Result<()> {
        match self.backend.stat_volume(vol).await {
            Ok(_) => Err(Error::already_exists(ObjectKind::Volume, vol)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates writable layer `id`: a volume cloned from `parent`'s snapshot, or a fresh
    /// volume of [`LayerStoreOptions::volume_size`].
    ///
    /// # Errors
    /// `AlreadyExists` if the layer (or a stray volume of its name) exists; `NotFound`
    /// for an unknown parent; `InvalidInput` for a malformed id or a parent without a
    /// snapshot; backend errors.
    pub async fn create(&self, id: &str, parent: Option<&str>) -> Result<VolumeId> {
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        self.absent(&inner, id)?;
        let origin = match parent {
            Some(p) => Some(self.parent_snapshot(&inner, p)?),
            None => None,
        };
        let vol = self.volume_id(id)?;
        self.volume_must_be_free(&vol).await?;
        let size = origin
            .as_ref()
            .map_or(self.options.volume_size, |(_, size)| *size);
        let mut rec = Record {
            version: RECORD_VERSION,
            id: id.to_owned(),
            parent: parent.map(str::to_owned),
            kind: LayerKind::Writable,
            snapshot: None,
            volume: true,
            size,
            pending: Some(Pending::Create),
            merkle: None,
        };
        self.create_record(&mut inner, &rec).await?;
        let made = match &origin {
            Some((snap, _)) => self.backend.clone_snapshot(snap, &vol).await,
            None => {
                self.backend
                    .create_volume(&vol, &VolumeOptions::new(size))
                    .await
            }
        };
        if let Err(e) = made {
            return Err(self.abort(&mut inner, rec, e).await);
        }
        rec.pending = None;
        self.write_record(&mut inner, &rec).await?;
        Ok(vol)
    }

    /// The volume of layer `id`, for the runtime to mount. A lazy or unpacked layer is
    /// cloned from its snapshot on the first call (lazy cloning); later calls return the
    /// same volume. Each call should be matched by a [`put`](Self::put).
    ///
    /// # Errors
    /// `NotFound` for an unknown layer; backend errors from the clone.
    pub async fn get(&self, id: &str) -> Result<VolumeId> {
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        let rec = self.record(&inner, id)?.clone();
        if rec.pending.is_some() {
            return Err(Error::not_found(ObjectKind::Layer, id));
        }
        let vol = self.volume_id(id)?;
        if !rec.volume {
            let snap = rec.snapshot.clone().ok_or_else(|| {
                Error::Integrity(format!("layer {id} has neither a volume nor a snapshot"))
            })?;
            let mut r = rec.clone();
            r.volume = true;
            r.pending = Some(Pending::Clone);
            self.write_record(&mut inner, &r).await?;
            if let Err(e) = self.backend.clone_snapshot(&snap, &vol).await {
                return Err(self.abort(&mut inner, r, e).await);
            }
            r.pending = None;
            self.write_record(&mut inner, &r).await?;
        }
        *inner.mounts.entry(id.to_owned()).or_default() += 1;
        Ok(vol)
    }

    /// Releases one [`get`](Self::get). A `put` without a matching `get` does nothing.
    ///
    /// # Errors
    /// `NotFound` for an unknown layer.
    pub async fn put(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.record(&inner, id)?;
        if let Some(n) = inner.mounts.get_mut(id) {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }

    /// Whether layer `id` exists.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed id.
    pub async fn exists(&self, id: &str) -> Result<bool> {
        validate_layer_id(id)?;
        let inner = self.inner.lock().await;
        Ok(inner
            .layers
            .get(id)
            .is_some_and(|r| r.pending != Some(Pending::Remove)))
    }

    /// Describes layer `id`.
    ///
    /// # Errors
    /// `NotFound` for an unknown layer.
    pub async fn layer(&self, id: &str) -> Result<LayerInfo> {
        let inner = self.inner.lock().await;
        let r = self.record(&inner, id)?;
        Ok(self.info(&inner, r))
    }

    /// Every layer, sorted by id.
    pub async fn list(&self) -> Vec<LayerInfo> {
        let inner = self.inner.lock().await;
        inner
            .layers
            .values()
            .map(|r| self.info(&inner, r))
            .collect()
    }

    fn info(&self, inner: &Inner, r: &Record) -> LayerInfo {
        LayerInfo {
            id: r.id.clone(),
            parent: r.parent.clone(),
            kind: r.kind,
            snapshot: r.snapshot.clone(),
            volume: r
                .volume
                .then(|| VolumeId::new(self.key(&r.id)).expect("layer keys are valid")),
            size: r.size,
            merkle: r.merkle.clone(),
            mounts: inner.mounts.get(&r.id).copied().unwrap_or(0),
        }
    }

    /// Removes layer `id`: its volume goes, its hold is released (the snapshot stays).
    ///
    /// # Errors
    /// `NotFound` for an unknown layer; `InUse` while it has children or open `get`s;
    /// backend errors (the removal is then finished by a retry or the next open).
    pub async fn remove(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        let rec = self.record(&inner, id)?.clone();
        if let Some(child) = inner
            .layers
            .values()
            .find(|r| r.parent.as_deref() == Some(id))
        {
            return Err(Error::InUse {
                kind: ObjectKind::Layer,
                id: id.to_owned(),
                by: format!("child layer {}", child.id),
            });
        }
        let mounts = inner.mounts.get(id).copied().unwrap_or(0);
        if mounts > 0 {
            return Err(Error::InUse {
                kind: ObjectKind::Layer,
                id: id.to_owned(),
                by: format!("{mounts} get(s) without put"),
            });
        }
        let mut r = rec;
        if r.pending != Some(Pending::Remove) {
            r.pending = Some(Pending::Remove);
            self.write_record(&mut inner, &r).await?;
        }
        self.recover(&mut inner, r).await
    }

    /// Pushes layer `id`: returns the reference layer of its snapshot. A writable layer is
    /// flushed and snapshotted now (the new snapshot replaces the one it held); a lazy or
    /// unpacked layer emits the snapshot it holds (immutable: the same bytes every time).
    /// O(1) in the data size.
    ///
    /// # Errors
    /// `NotFound` for an unknown layer; backend errors.
    pub async fn diff(&self, id: &str) -> Result<LayerDiff> {
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        let rec = self.record(&inner, id)?.clone();
        if rec.pending.is_some() {
            return Err(Error::not_found(ObjectKind::Layer, id));
        }
        let holder = self.key(id);
        let (stat, merkle) = match rec.kind {
            LayerKind::Lazy | LayerKind::Unpacked => {
                let snap = rec
                    .snapshot
                    .clone()
                    .ok_or_else(|| Error::Integrity(format!("image layer {id} has no snapshot")))?;
                let stat = self.backend.stat_snapshot(&snap).await?;
                let merkle = match &rec.merkle {
                    Some(m) => m.clone(),
                    None => {
                        // A layer recorded without a root (unpacked, or pulled from a
                        // version 1 reference): compute it once, hold it, record it.
                        let m = self.build_merkle(&inner, &stat).await?;
                        self.backend.hold_snapshot(&m.tree, &holder).await?;
                        let mut r = rec.clone();
                        r.merkle = Some(m.clone());
                        self.write_record(&mut inner, &r).await?;
                        m
                    }
                };
                (stat, merkle)
            }
            LayerKind::Writable => {
                let vol = self.volume_id(id)?;
                self.backend.flush(&vol).await?;
                let new = self.backend.snapshot(&vol).await?;
                let stat = self.backend.stat_snapshot(&new).await?;
                let merkle = self.build_merkle(&inner, &stat).await?;
                let mut r = rec.clone();
                r.pending = Some(Pending::Diff {
                    new: new.clone(),
                    merkle: Some(merkle.clone()),
                });
                self.write_record(&mut inner, &r).await?;
                let step = async {
                    self.backend
                        .hold_snapshots(&[new.clone(), merkle.tree.clone()], &holder)
                        .await?;
                    if let Some(old) = &rec.snapshot {
                        ignore_not_found(self.backend.release_snapshot(old, &holder).await)?;
                    }
                    if let Some(old) = &rec.merkle {
                        ignore_not_found(self.backend.release_snapshot(&old.tree, &holder).await)?;
                    }
                    Ok(())
                };
                if let Err(e) = step.await {
                    return Err(self.abort(&mut inner, r, e).await);
                }
                r.snapshot = Some(new.clone());
                r.merkle = Some(merkle.clone());
                r.pending = None;
                self.write_record(&mut inner, &r).await?;
                (stat, merkle)
            }
        };
        let reference = Reference::from_stat(&stat).with_merkle(merkle);
        let tar = reference.encode();
        Ok(LayerDiff { reference, tar })
    }

    /// The Merkle tree of `stat`: incrementally from the tree of its parent snapshot when a
    /// layer of this store holds that parent with a known root (O(diverged blocks)),
    /// else from scratch (O(written) for a snapshot without a parent, O(size) otherwise).
    async fn build_merkle(&self, inner: &Inner, stat: &crate::SnapshotStat) -> Result<MerkleRoot> {
        let base = stat.parent.as_ref().and_then(|p| {
            inner
                .layers
                .values()
                .filter(|r| r.pending.is_none() && r.snapshot.as_ref() == Some(p))
                .find_map(|r| r.merkle.clone())
        });
        // `{name}.-merkle` is no layer's key: layer ids start with a letter or digit.
        let scratch = VolumeId::new(format!("{}.-merkle", self.options.name))?;
        merkle::build(&self.backend, stat, base.as_ref(), &scratch).await
    }

    /// Pulls layer `id` on top of `parent` from a layer stream.
    ///
    /// A [reference layer](mod@reference) (recognized by its first tar header, also inside
    /// gzip/zstd) records a **lazy** layer: the snapshot is checked (`stat` + metadata
    /// digest) and held; nothing is cloned and no data is read. Anything else is a
    /// [traditional layer](traditional), applied as [`LayerStoreOptions::apply`] says:
    /// as root ([`ApplyMode::Mounted`]) the whole stream is first read and checked into
    /// a scratch file, then the parent's snapshot is cloned (or a fresh volume formatted),
    /// its ext4 loop-mounted and the tar applied in place with every attribute kept
    /// (O(layer)); without root ([`ApplyMode::Rebuilt`]) it is unpacked, with whiteouts,
    /// over the parent's file tree in a scratch directory, built into an ext4 image
    /// (`mke2fs -d`), written into a clone of the parent's snapshot (only blocks that
    /// differ) or a fresh volume, and what that loses is listed in
    /// [`AppliedLayer::losses`]. Either way the result is snapshotted and held; a failure
    /// rolls back the work volume.
    ///
    /// # Errors
    /// `AlreadyExists` if the layer exists; `NotFound` for an unknown parent or snapshot;
    /// `InvalidInput` for a malformed or hostile layer, or a traditional layer over a
    /// parent that is not ext4; `Integrity` when a referenced snapshot does not match its
    /// digest; `Config` without e2fsprogs; `Backend` when mounting fails or the layer
    /// does not fit the parent's volume. Nothing stored changes on error.
    pub async fn apply_diff<R: Read + Send + 'static>(
        &self,
        id: &str,
        parent: Option<&str>,
        layer: R,
    ) -> Result<AppliedLayer> {
        let origin = self.before_apply(id, parent).await?;
        let t = std::time::Instant::now();
        let sniffed = blocking(move || sniff(layer)).await?;
        tracing::debug!(target: "slacker_core::timing", step = "sniff", layer = id, us = t.elapsed().as_micros() as u64);
        self.apply_sniffed(id, parent, origin, sniffed).await
    }

    /// [`apply_diff`](Self::apply_diff) of a layer already in memory (as a registry client
    /// holds a small blob): the first bytes are looked at, and a reference layer decoded,
    /// on the calling task, without the hand-off to a blocking thread that a stream needs
    /// (it would cost more than reading 2 KiB). Anything else is applied as `apply_diff`
    /// does.
    ///
    /// # Errors
    /// As [`apply_diff`](Self::apply_diff).
    pub async fn apply_diff_bytes(
        &self,
        id: &str,
        parent: Option<&str>,
        layer: Vec<u8>,
    ) -> Result<AppliedLayer> {
        let origin = self.before_apply(id, parent).await?;
        let sniffed = sniff(std::io::Cursor::new(layer))?;
        self.apply_sniffed(id, parent, origin, sniffed).await
    }

    /// The checks before a layer is read: the store works, `id` is free, the parent has a
    /// snapshot (returned with its size).
    async fn before_apply(
        &self,
        id: &str,
        parent: Option<&str>,
    ) -> Result<Option<(SnapshotId, u64)>> {
        let inner = self.inner.lock().await;
        self.check(&inner)?;
        self.absent(&inner, id)?;
        match parent {
            Some(p) => Ok(Some(self.parent_snapshot(&inner, p)?)),
            None => Ok(None),
        }
    }

    async fn apply_sniffed(
        &self,
        id: &str,
        parent: Option<&str>,
        origin: Option<(SnapshotId, u64)>,
        sniffed: Sniffed,
    ) -> Result<AppliedLayer> {
        match sniffed {
            Sniffed::Reference(r) => self.apply_reference(id, parent, r).await,
            Sniffed::Traditional(stream) => {
                let mounted = match self.options.apply {
                    ApplyMode::Mounted => true,
                    ApplyMode::Rebuilt => false,
                    ApplyMode::Auto => rustix::process::geteuid().is_root(),
                };
                if mounted {
                    return self.apply_mounted(id, parent, stream).await;
                }
                let built = self.build(stream, origin.as_ref()).await?;
                let applied = self.install(id, parent, built).await?;
                Ok(applied)
            }
        }
    }

    async fn apply_reference(
        &self,
        id: &str,
        parent: Option<&str>,
        r: Reference,
    ) -> Result<AppliedLayer> {
        let t0 = std::time::Instant::now();
        let vol = self.volume_id(id)?;
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        self.absent(&inner, id)?;
        if let Some(p) = parent {
            self.parent_snapshot(&inner, p)?;
        }
        let mut rec = Record {
            version: RECORD_VERSION,
            id: id.to_owned(),
            parent: parent.map(str::to_owned),
            kind: LayerKind::Lazy,
            snapshot: Some(r.snapshot.clone()),
            volume: false,
            size: r.size,
            pending: Some(Pending::Create),
            merkle: r.merkle.clone(),
        };
        // The pending record is written while the backend is asked about the snapshot (its
        // stat, to verify the reference) and the layer's volume name (must be free), both
        // at once: one round trip to remote storage, hidden behind the record's syncs. A
        // pending create with no holds is rolled back by a reopen, so the record may well
        // come first; a refused reference takes it out again (and a crash before that
        // leaves a stray volume of this name alone: `recover` removes only volumes a
        // record says it made).
        let checks = async {
            let (stat, free) = join2(
                self.backend.stat_snapshot(&r.snapshot),
                self.volume_must_be_free(&vol),
            )
            .await;
            r.verify(&stat?)?;
            free
        };
        let (written, checked) = join2(self.create_record(&mut inner, &rec), checks).await;
        written?;
        let t_record = t0.elapsed();
        if let Err(e) = checked {
            if let Err(d) = self.delete_record(&mut inner, id).await {
                tracing::error!(store = %self.options.name, layer = %id, error = %d, "removing the record of a refused reference failed: the store refuses work until reopened");
            }
            return Err(e);
        }
        // The data snapshot and the Merkle tree snapshot in one batch: one durable write
        // where the backend can (btrfs: one directory sync for both documents).
        let held: Vec<SnapshotId> = std::iter::once(r.snapshot.clone())
            .chain(r.merkle.as_ref().map(|m| m.tree.clone()))
            .collect();
        if let Err(e) = self.backend.hold_snapshots(&held, &self.key(id)).await {
            return Err(self.abort(&mut inner, rec, e).await);
        }
        let t_holds = t0.elapsed();
        tracing::debug!(
            target: "slacker_core::timing",
            step = "apply_reference",
            layer = id,
            record_and_stats_us = t_record.as_micros() as u64,
            holds_us = (t_holds - t_record).as_micros() as u64,
        );
        // The holds are the commit point: the record stays `Pending::Create` on disk and
        // recovery rolls a lazy create whose holds are all in place forward (`recover`),
        // so a pull writes the record once instead of twice (two fsyncs fewer).
        rec.pending = None;
        inner.layers.insert(rec.id.clone(), rec.clone());
        Ok(AppliedLayer {
            kind: LayerKind::Lazy,
            snapshot: r.snapshot,
            size: r.size,
            tar_bytes: 0,
            file_bytes: 0,
            method: ApplyMethod::Reference,
            losses: Vec::new(),
        })
    }

    fn scratch(&self) -> Result<tempfile::TempDir> {
        let mut b = tempfile::Builder::new();
        b.prefix("slacker-layer-");
        match &self.options.scratch_dir {
            Some(d) => b.tempdir_in(d),
            None => b.tempdir(),
        }
        .map_err(|e| Error::backend("layer-unpack", format!("scratch directory: {e}")))
    }

    /// Unpacks a traditional layer over the parent's tree and builds the ext4 image.
    async fn build(
        &self,
        stream: Box<dyn Read + Send>,
        origin: Option<&(SnapshotId, u64)>,
    ) -> Result<Built> {
        let scratch = self.scratch()?;
        let root = scratch.path().join("root");
        std::fs::create_dir(&root)
            .map_err(|e| Error::backend("layer-unpack", format!("scratch root: {e}")))?;
        if let Some((snap, size)) = origin {
            let img = scratch.path().join("parent.img");
            self.export_snapshot(snap, *size, &img).await?;
            let (img2, root2) = (img.clone(), root.clone());
            blocking(move || ext4::dump_tree(&img2, &root2)).await?;
            std::fs::remove_file(&img)
                .map_err(|e| Error::backend("layer-unpack", format!("remove parent image: {e}")))?;
        }
        let opts = self.options.tar.clone();
        let min_size = self.options.volume_size;
        let fixed = origin.map(|(_, size)| *size);
        let image = scratch.path().join("layer.img");
        let (root2, image2) = (root.clone(), image.clone());
        let (size, unpacked) = blocking(move || {
            let unpacked = traditional::unpack(stream, &root2, &opts)?;
            let (bytes, entries) = tree_size(&root2)?;
            let entries = entries + unpacked.specials.len() as u64;
            let size = match fixed {
                Some(s) => s,
                None => min_size.max(ext4::estimate_size(bytes, entries)),
            };
            ext4::make_image(&root2, &image2, size, entries)?;
            ext4::add_specials(&image2, &unpacked.specials)?;
            std::fs::remove_dir_all(&root2)
                .map_err(|e| Error::backend("layer-unpack", format!("remove tree: {e}")))?;
            Ok((size, unpacked))
        })
        .await?;
        let mut losses = Vec::new();
        if unpacked.losses.owners > 0 {
            losses.push(Loss::Owners {
                entries: unpacked.losses.owners,
            });
        }
        if unpacked.losses.xattrs > 0 {
            losses.push(Loss::Xattrs {
                count: unpacked.losses.xattrs,
            });
        }
        if unpacked.subsecond_times > 0 {
            losses.push(Loss::SubsecondTimes {
                entries: unpacked.subsecond_times,
            });
        }
        if !unpacked.specials.is_empty() {
            losses.push(Loss::DeviceTimes {
                entries: unpacked.specials.len() as u64,
            });
        }
        if origin.is_some() {
            losses.push(Loss::ParentTree);
        }
        Ok(Built {
            _scratch: scratch,
            image,
            size,
            tar_bytes: unpacked.tar_bytes,
            file_bytes: unpacked.file_bytes,
            losses,
        })
    }

    /// Writes a snapshot into a (sparse) local file.
    async fn export_snapshot(&self, snap: &SnapshotId, size: u64, path: &Path) -> Result<()> {
        let f = File::create(path)
            .map_err(|e| Error::backend("layer-unpack", format!("{}: {e}", path.display())))?;
        f.set_len(size)
            .map_err(|e| Error::backend("layer-unpack", format!("{}: {e}", path.display())))?;
        let f = Arc::new(f);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(IO_CHUNK as u64) as usize;
            let data = self.backend.read_snapshot_at(snap, off, n).await?;
            if !is_zero(&data) {
                let f = f.clone();
                blocking(move || {
                    f.write_all_at(&data, off)
                        .map_err(|e| Error::backend("layer-unpack", format!("write image: {e}")))
                })
                .await?;
            }
            off += n as u64;
        }
        Ok(())
    }

    /// Records an unpacked layer from a built image: clone the parent (or a fresh
    /// volume), write the blocks that differ, snapshot, hold, drop the work volume.
    async fn install(&self, id: &str, parent: Option<&str>, built: Built) -> Result<AppliedLayer> {
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        self.absent(&inner, id)?;
        let origin = match parent {
            Some(p) => Some(self.parent_snapshot(&inner, p)?),
            None => None,
        };
        if let Some((_, psize)) = &origin {
            if *psize != built.size {
                return Err(Error::invalid(format!(
                    "parent {} changed size while the layer was built",
                    parent.unwrap_or_default()
                )));
            }
        }
        let vol = self.volume_id(id)?;
        self.volume_must_be_free(&vol).await?;
        let mut rec = Record {
            version: RECORD_VERSION,
            id: id.to_owned(),
            parent: parent.map(str::to_owned),
            kind: LayerKind::Unpacked,
            snapshot: None,
            volume: true,
            size: built.size,
            pending: Some(Pending::Create),
            merkle: None,
        };
        self.create_record(&mut inner, &rec).await?;
        let made = async {
            match &origin {
                Some((snap, _)) => self.backend.clone_snapshot(snap, &vol).await?,
                None => {
                    self.backend
                        .create_volume(&vol, &VolumeOptions::new(built.size))
                        .await?
                }
            }
            self.write_image(&vol, &built.image, built.size, origin.is_some())
                .await
        };
        if let Err(e) = made.await {
            return Err(self.abort(&mut inner, rec, e).await);
        }
        let snap = self.seal(&mut inner, &mut rec, &vol).await?;
        Ok(AppliedLayer {
            kind: LayerKind::Unpacked,
            snapshot: snap,
            size: built.size,
            tar_bytes: built.tar_bytes,
            file_bytes: built.file_bytes,
            method: ApplyMethod::Rebuilt,
            losses: built.losses,
        })
    }

    /// Finishes an unpacked layer whose volume holds its content: flush, snapshot, hold
    /// the snapshot, drop the work volume, settle the record. Rolls back on failure.
    async fn seal(
        &self,
        inner: &mut Inner,
        rec: &mut Record,
        vol: &VolumeId,
    ) -> Result<SnapshotId> {
        let made = async {
            self.backend.flush(vol).await?;
            self.backend.snapshot(vol).await
        };
        let snap = match made.await {
            Ok(s) => s,
            Err(e) => return Err(self.abort(inner, rec.clone(), e).await),
        };
        // The first import hashes the written blocks once (incrementally from the parent's
        // tree when there is one), so every later push of a clone is O(written).
        let merkle = async {
            let stat = self.backend.stat_snapshot(&snap).await?;
            self.build_merkle(inner, &stat).await
        };
        let merkle = match merkle.await {
            Ok(m) => m,
            Err(e) => {
                rec.snapshot = Some(snap.clone()); // minted here: the rollback removes it
                return Err(self.abort(inner, rec.clone(), e).await);
            }
        };
        rec.snapshot = Some(snap.clone());
        rec.merkle = Some(merkle.clone());
        self.write_record(inner, rec).await?;
        let finish = async {
            self.backend
                .hold_snapshots(&[snap.clone(), merkle.tree.clone()], &self.key(&rec.id))
                .await?;
            self.backend.remove_volume(vol).await
        };
        if let Err(e) = finish.await {
            return Err(self.abort(inner, rec.clone(), e).await);
        }
        rec.volume = false;
        rec.pending = None;
        self.write_record(inner, rec).await?;
        Ok(snap)
    }

    /// Applies a traditional layer in place (root): spool and check the whole stream,
    /// clone the parent (or create and format a fresh volume), loop-mount its ext4,
    /// unpack into it with [`traditional::unpack_mounted`], unmount, seal.
    async fn apply_mounted(
        &self,
        id: &str,
        parent: Option<&str>,
        stream: Box<dyn Read + Send>,
    ) -> Result<AppliedLayer> {
        let scratch = self.scratch()?;
        let tar_path = scratch.path().join("layer.tar");
        let opts = self.options.tar.clone();
        let tp = tar_path.clone();
        let spooled = blocking(move || traditional::spool(stream, &tp, &opts)).await?;
        let mut inner = self.inner.lock().await;
        self.check(&inner)?;
        self.absent(&inner, id)?;
        let origin = match parent {
            Some(p) => Some(self.parent_snapshot(&inner, p)?),
            None => None,
        };
        let size = match &origin {
            Some((_, size)) => *size,
            None => self
                .options
                .volume_size
                .max(ext4::estimate_size(spooled.file_bytes, spooled.entries)),
        };
        let vol = self.volume_id(id)?;
        self.volume_must_be_free(&vol).await?;
        let mut rec = Record {
            version: RECORD_VERSION,
            id: id.to_owned(),
            parent: parent.map(str::to_owned),
            kind: LayerKind::Unpacked,
            snapshot: None,
            volume: true,
            size,
            pending: Some(Pending::Create),
            merkle: None,
        };
        self.create_record(&mut inner, &rec).await?;
        let filled = self
            .fill_mounted(
                &vol,
                origin.as_ref(),
                size,
                spooled.entries,
                &tar_path,
                scratch.path(),
            )
            .await;
        let unpacked = match filled {
            Ok(u) => u,
            Err(e) => return Err(self.abort(&mut inner, rec, e).await),
        };
        let snap = self.seal(&mut inner, &mut rec, &vol).await?;
        let mut losses = Vec::new();
        if unpacked.losses.owners > 0 {
            losses.push(Loss::Owners {
                entries: unpacked.losses.owners,
            });
        }
        if unpacked.losses.xattrs > 0 {
            losses.push(Loss::Xattrs {
                count: unpacked.losses.xattrs,
            });
        }
        Ok(AppliedLayer {
            kind: LayerKind::Unpacked,
            snapshot: snap,
            size,
            tar_bytes: unpacked.tar_bytes,
            file_bytes: unpacked.file_bytes,
            method: ApplyMethod::Mounted,
            losses,
        })
    }

    /// The content step of [`apply_mounted`](Self::apply_mounted): makes the volume and
    /// applies the spooled tar into its mounted ext4.
    async fn fill_mounted(
        &self,
        vol: &VolumeId,
        origin: Option<&(SnapshotId, u64)>,
        size: u64,
        entries: u64,
        tar: &Path,
        scratch: &Path,
    ) -> Result<traditional::Unpacked> {
        match origin {
            Some((snap, _)) => self.backend.clone_snapshot(snap, vol).await?,
            None => {
                self.backend
                    .create_volume(vol, &VolumeOptions::new(size))
                    .await?
            }
        }
        let direct = self.backend.info().capabilities.local_path;
        let image = if direct {
            self.backend.local_path(vol).await?
        } else {
            let img = scratch.join("volume.img");
            match origin {
                Some((snap, s)) => self.export_snapshot(snap, *s, &img).await?,
                None => {
                    let f = File::create(&img).map_err(|e| {
                        Error::backend("layer-unpack", format!("{}: {e}", img.display()))
                    })?;
                    f.set_len(size).map_err(|e| {
                        Error::backend("layer-unpack", format!("{}: {e}", img.display()))
                    })?;
                }
            }
            img
        };
        let fresh = origin.is_none();
        let mnt = scratch.join("mnt");
        std::fs::create_dir(&mnt)
            .map_err(|e| Error::backend("layer-unpack", format!("{}: {e}", mnt.display())))?;
        let opts = self.options.tar.clone();
        let (img2, tar2) = (image.clone(), tar.to_path_buf());
        let unpacked = blocking(move || {
            if fresh {
                ext4::format(&img2, entries)?;
            }
            let mounted = ext4::Mounted::mount(&img2, &mnt)?;
            let f = File::open(&tar2)
                .map_err(|e| Error::backend("layer-unpack", format!("{}: {e}", tar2.display())))?;
            let r = traditional::unpack_mounted(
                std::io::BufReader::with_capacity(1 << 20, f),
                mounted.root(),
                &opts,
            );
            let u = mounted.unmount();
            let unpacked = r?;
            u?;
            Ok(unpacked)
        })
        .await?;
        if !direct {
            self.write_image(vol, &image, size, !fresh).await?;
        }
        Ok(unpacked)
    }

    /// Writes an image file into a volume: every non-zero block into a fresh volume, or
    /// only the blocks that differ from what a clone already holds.
    async fn write_image(
        &self,
        vol: &VolumeId,
        image: &Path,
        size: u64,
        cloned: bool,
    ) -> Result<()> {
        let f = Arc::new(
            File::open(image)
                .map_err(|e| Error::backend("layer-unpack", format!("open image: {e}")))?,
        );
        let bs = BlockSize::DEFAULT.bytes() as usize;
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(IO_CHUNK as u64) as usize;
            let f2 = f.clone();
            let data = blocking(move || {
                let mut buf = vec![0u8; n];
                f2.read_exact_at(&mut buf, off)
                    .map_err(|e| Error::backend("layer-unpack", format!("read image: {e}")))?;
                Ok(buf)
            })
            .await?;
            let old = if cloned {
                Some(self.backend.read_at(vol, off, n).await?)
            } else {
                None
            };
            // Coalesce runs of blocks to write.
            let mut i = 0;
            while i < n {
                let differs = |j: usize| {
                    let new = &data[j..(j + bs).min(n)];
                    match &old {
                        Some(o) => new != &o[j..(j + bs).min(n)],
                        None => !is_zero(new),
                    }
                };
                if !differs(i) {
                    i += bs;
                    continue;
                }
                let start = i;
                while i < n && differs(i) {
                    i += bs;
                }
                let end = i.min(n);
                self.backend
                    .write_at(vol, off + start as u64, &data[start..end])
                    .await?;
            }
            off += n as u64;
        }
        Ok(())
    }

    /// Imports a directory tree as unpacked layer `id` (no parent): `mke2fs -d` builds an
    /// ext4 image of it in a volume of at least [`LayerStoreOptions::volume_size`], which
    /// is snapshotted and held. How a base image gets into a store.
    ///
    /// # Errors
    /// `AlreadyExists` if the layer exists; `Config` without e2fsprogs; `InvalidInput` if
    /// mke2fs refuses the tree; backend errors.
    pub async fn import_dir(&self, id: &str, dir: &Path) -> Result<AppliedLayer> {
        {
            let inner = self.inner.lock().await;
            self.check(&inner)?;
            self.absent(&inner, id)?;
        }
        let scratch = self.scratch()?;
        let image = scratch.path().join("layer.img");
        let (dir2, image2) = (dir.to_path_buf(), image.clone());
        let min = self.options.volume_size;
        let (size, file_bytes) = blocking(move || {
            let (bytes, entries) = tree_size(&dir2)?;
            let size = min.max(ext4::estimate_size(bytes, entries));
            ext4::make_image(&dir2, &image2, size, entries)?;
            Ok((size, bytes))
        })
        .await?;
        self.install(
            id,
            None,
            Built {
                _scratch: scratch,
                image,
                size,
                tar_bytes: 0,
                file_bytes,
                losses: Vec::new(),
            },
        )
        .await
    }

    /// Extracts the file tree of layer `id` (its snapshot, or for a writable layer never
    /// diffed, its volume) into the existing directory `dir` with `debugfs rdump`; see
    /// [`ext4`] for what is kept. For exporting an image in the plain OCI format.
    ///
    /// # Errors
    /// `NotFound` for an unknown layer; `InvalidInput` if the layer is not ext4.
    pub async fn export_tree(&self, id: &str, dir: &Path) -> Result<()> {
        let (snap, vol, size) = {
            let inner = self.inner.lock().await;
            let r = self.record(&inner, id)?;
            (r.snapshot.clone(), self.volume_id(id)?, r.size)
        };
        let scratch = self.scratch()?;
        let img = scratch.path().join("export.img");
        match snap {
            Some(s) => self.export_snapshot(&s, size, &img).await?,
            None => {
                let tmp = self.backend.snapshot(&vol).await?;
                let r = self.export_snapshot(&tmp, size, &img).await;
                if let Err(e) = self.backend.remove_snapshot(&tmp).await {
                    tracing::warn!(snapshot = %tmp, error = %e, "temporary export snapshot left behind");
                }
                r?
            }
        }
        let dir = dir.to_path_buf();
        blocking(move || ext4::dump_tree(&img, &dir)).await
    }
}

impl<B: Backend> LayerStore<B> {
    /// Writes the file tree of layer `id` as an uncompressed tar into the new file `out`
    /// (without `lost+found`), for the plain OCI export of an image. As root the layer's
    /// ext4 is loop-mounted (read from a scratch copy) and written with
    /// [`archive::TreeTar`], keeping every attribute; otherwise the tree is extracted with
    /// `debugfs rdump` (see [`ext4`] for what that drops). Returns whether the export was
    /// lossless.
    ///
    /// # Errors
    /// `NotFound` for an unknown layer; `InvalidInput` if the layer is not ext4; backend
    /// and IO errors.
    pub async fn export_tar(&self, id: &str, out: &Path) -> Result<bool> {
        let root = rustix::process::geteuid().is_root();
        let scratch = self.scratch()?;
        let out = out.to_path_buf();
        let create = move |p: &Path| {
            File::create_new(p)
                .map_err(|e| Error::backend("layer-export", format!("{}: {e}", p.display())))
        };
        if !root {
            let tree = scratch.path().join("tree");
            std::fs::create_dir(&tree)
                .map_err(|e| Error::backend("layer-export", format!("{}: {e}", tree.display())))?;
            self.export_tree(id, &tree).await?;
            return blocking(move || {
                let mut t = archive::TreeTar::new(std::io::BufWriter::new(create(&out)?));
                t.append_tree(&tree, &["lost+found"])?;
                t.finish()?;
                Ok(false)
            })
            .await;
        }
        let (snap, vol, size) = {
            let inner = self.inner.lock().await;
            let r = self.record(&inner, id)?;
            (r.snapshot.clone(), self.volume_id(id)?, r.size)
        };
        let img = scratch.path().join("export.img");
        match snap {
            Some(s) => self.export_snapshot(&s, size, &img).await?,
            None => {
                let tmp = self.backend.snapshot(&vol).await?;
                let r = self.export_snapshot(&tmp, size, &img).await;
                let _ = self.backend.remove_snapshot(&tmp).await;
                r?
            }
        }
        let mnt = scratch.path().join("mnt");
        std::fs::create_dir(&mnt)
            .map_err(|e| Error::backend("layer-export", format!("{}: {e}", mnt.display())))?;
        blocking(move || {
            let m = ext4::Mounted::mount(&img, &mnt)?;
            let mut t = archive::TreeTar::new(std::io::BufWriter::new(create(&out)?));
            let r = t.append_tree(m.root(), &["lost+found"]);
            let u = m.unmount();
            r?;
            u?;
            let mut w = t.finish()?;
            std::io::Write::flush(&mut w)
                .map_err(|e| Error::backend("layer-export", format!("{}: {e}", out.display())))?;
            Ok(true)
        })
        .await
    }
}

/// Whether `data` is all zero bytes. Compared a page at a time with a zero page (a
/// `memcmp`), not byte by byte: the export and write-back paths scan whole volumes,
/// and a per-byte iterator is ~100x slower in the debug builds tests use.
fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// Bytes of regular files and number of entries under `dir`.
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| Error::invalid(format!("read {}: {e}", d.display())))?;
        for e in rd {
            let e = e.map_err(|e| Error::invalid(format!("read {}: {e}", d.display())))?;
            let m = e
                .metadata()
                .map_err(|er| Error::invalid(format!("stat {}: {er}", e.path().display())))?;
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((bytes, entries))
}

/// Reads the start of a layer: a reference layer (possibly compressed) is decoded, any
/// other stream is returned for unpacking.
fn sniff<R: Read + Send + 'static>(mut layer: R) -> Result<Sniffed> {
    let head = traditional::read_prefix(&mut layer, 6)?;
    let mut tar = traditional::decompress(head, layer)?;
    let first = traditional::read_prefix(&mut tar, 512)?;
    if Reference::looks_like(&first) {
        let mut all = first;
        let rest = traditional::read_prefix(
            &mut tar,
            reference::MAX_LAYER_BYTES + 1 - all.len().min(reference::MAX_LAYER_BYTES),
        )?;
        all.extend_from_slice(&rest);
        return Reference::decode(&all).map(Sniffed::Reference);
    }
    Ok(Sniffed::Traditional(Box::new(
        std::io::Cursor::new(first).chain(tar),
    )))
}

/// Decodes a reference layer that may be compressed (gzip, zstd), as
/// [`LayerStore::apply_diff`] does. For registries and tools that want the document
/// without a store.
///
/// # Errors
/// `InvalidInput` unless `layer` is a valid reference layer.
pub fn decode_reference_layer(layer: &[u8]) -> Result<Reference> {
    match sniff(std::io::Cursor::new(layer.to_vec()))? {
        Sniffed::Reference(r) => Ok(r),
        Sniffed::Traditional(_) => Err(Error::invalid("not a reference layer")),
    }
}

#[cfg(test)]
mod zero_tests {
    use super::is_zero;

    #[test]
    fn is_zero_sees_every_byte() {
        for n in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 5] {
            let mut v = vec![0u8; n];
            assert!(is_zero(&v), "{n} zero bytes");
            for at in [0, n / 2, n.saturating_sub(1), 4095, 4096] {
                if at < n {
                    v[at] = 1;
                    assert!(!is_zero(&v), "byte {at} of {n}");
                    v[at] = 0;
                }
            }
        }
    }
}
