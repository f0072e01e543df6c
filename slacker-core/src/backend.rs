//! The [`Backend`] trait: volumes, snapshots and clones with block copy-on-write.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bitmap::BlockBitmap;
use crate::block::BlockSize;
use crate::error::{Error, Result};
use crate::ids::{SnapshotId, VolumeId};

/// How to create a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VolumeOptions {
    /// Logical size in bytes: a positive multiple of `block_size`. Volumes are sparse, so a
    /// large size costs nothing until written.
    pub size: u64,
    /// Copy-on-write granularity (4 KiB by default).
    pub block_size: BlockSize,
}

impl VolumeOptions {
    /// A volume of `size` bytes with the default block size.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            block_size: BlockSize::DEFAULT,
        }
    }

    /// Sets the block size.
    pub fn with_block_size(mut self, block_size: BlockSize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Checks the options every backend must refuse.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for a zero size, a size
    /// that is not a multiple of the block size, or more than 2^32 blocks.
    pub fn validate(&self) -> Result<()> {
        let bs = self.block_size.bytes();
        if self.size == 0 || self.size % bs != 0 {
            return Err(Error::invalid(format!(
                "volume size {} must be a positive multiple of the block size {bs}",
                self.size
            )));
        }
        if self.size / bs > u64::from(u32::MAX) {
            return Err(Error::invalid(format!(
                "volume size {} holds more than 2^32 blocks of {bs} bytes",
                self.size
            )));
        }
        Ok(())
    }
}

/// Space used by a volume, where the backend knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Bytes held by this volume alone (freed if it were removed).
    pub exclusive_bytes: Option<u64>,
    /// Bytes it shares with its origin snapshot, sibling clones or deduplicated data.
    pub shared_bytes: Option<u64>,
}

impl Usage {
    /// Usage with both figures known.
    pub fn new(exclusive_bytes: u64, shared_bytes: u64) -> Self {
        Self {
            exclusive_bytes: Some(exclusive_bytes),
            shared_bytes: Some(shared_bytes),
        }
    }
}

/// What [`Backend::stat_volume`] reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VolumeStat {
    /// The volume.
    pub id: VolumeId,
    /// Logical size in bytes.
    pub size: u64,
    /// Copy-on-write granularity.
    pub block_size: BlockSize,
    /// The snapshot this volume was cloned from, if any.
    pub origin: Option<SnapshotId>,
    /// Blocks that may differ from the origin (from zeros when there is no origin). A
    /// backend may report a superset, never a subset.
    pub diverged: BlockBitmap,
    /// Space used.
    pub usage: Usage,
}

impl VolumeStat {
    /// Builds a stat (for backends).
    pub fn new(
        id: VolumeId,
        size: u64,
        block_size: BlockSize,
        origin: Option<SnapshotId>,
        diverged: BlockBitmap,
        usage: Usage,
    ) -> Self {
        Self {
            id,
            size,
            block_size,
            origin,
            diverged,
            usage,
        }
    }
}

/// What [`Backend::stat_snapshot`] reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotStat {
    /// The snapshot.
    pub id: SnapshotId,
    /// Logical size in bytes.
    pub size: u64,
    /// Copy-on-write granularity.
    pub block_size: BlockSize,
    /// The origin of the volume it was taken from, if any.
    pub parent: Option<SnapshotId>,
    /// Blocks that may differ from `parent` (from zeros when there is none).
    pub diverged: BlockBitmap,
    /// Who holds it (see [`Backend::hold_snapshot`]), sorted.
    pub holds: Vec<String>,
}

impl SnapshotStat {
    /// Builds a stat (for backends).
    pub fn new(
        id: SnapshotId,
        size: u64,
        block_size: BlockSize,
        parent: Option<SnapshotId>,
        diverged: BlockBitmap,
        holds: Vec<String>,
    ) -> Self {
        Self {
            id,
            size,
            block_size,
            parent,
            diverged,
            holds,
        }
    }
}

/// Optional features a backend may have. An operation whose capability is `false` fails
/// with [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) (checked by
/// `missing_capabilities_fail_unsupported`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`Backend::local_path`]: a volume is a local file a runtime can loop-mount.
    pub local_path: bool,
    /// [`Backend::dedup`]: identical blocks across volumes can be merged.
    pub dedup: bool,
    /// [`Usage`] figures are reported.
    pub usage: bool,
    /// Clones are O(1) in the data size (reflink, server-side clone, shared blocks).
    /// Backends without it fall back to copying.
    pub cheap_clone: bool,
    /// Several hosts can share the storage (a snapshot id minted on one resolves on all).
    pub shared: bool,
}

/// What a backend is and can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackendInfo {
    /// The scheme of the snapshot ids this backend mints (`mem`, `btrfs`, `nfs`).
    pub scheme: &'static str,
    /// Optional features.
    pub capabilities: Capabilities,
    /// A human description of where data lives (a path, a server).
    pub location: String,
}

impl BackendInfo {
    /// Builds an info report (for backends).
    pub fn new(scheme: &'static str, capabilities: Capabilities, location: String) -> Self {
        Self {
            scheme,
            capabilities,
            location,
        }
    }
}

/// What [`Backend::dedup`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DedupReport {
    /// Blocks compared.
    pub blocks_scanned: u64,
    /// Bytes that now share storage and did not before.
    pub bytes_deduplicated: u64,
}

/// Storage that can snapshot and clone block-addressed volumes cheaply.
///
/// A **volume** is a writable, sparse, byte-addressed range; a **snapshot** is a frozen,
/// read-only copy of a volume, named by a portable [`SnapshotId`]; `clone_snapshot`
/// makes a new volume whose content is the snapshot's, with copy-on-write at block
/// granularity. Per volume, the backend tracks the [`BlockBitmap`] of blocks that may
/// have diverged from the origin snapshot.
///
/// The trait is dyn-compatible: `Arc<dyn Backend>` works. Blocking work (syscalls,
/// fsync, large copies) runs on `tokio::task::spawn_blocking` inside implementations.
///
/// # Contract
///
/// Every backend keeps these; each names the `slacker-testkit` check that enforces it.
///
/// 1. A new volume reads as zeros (`new_volume_reads_zeros`). Reads and writes that reach
///    past the end fail with `OutOfRange` (`read_past_end_is_out_of_range`,
///    `write_past_end_is_out_of_range`); byte-addressed IO may be partial and straddle
///    blocks (`partial_and_straddling_writes_read_back`); options are validated
///    (`invalid_volume_options_are_rejected`, `block_sizes_are_respected`); names are
///    unique (`create_existing_volume_fails`); a volume of a huge logical size costs what
///    is written (`huge_sparse_volume`).
/// 2. After `snapshot(v)`, the snapshot reads as `v` did at that moment, forever; later
///    writes to `v` or to any clone change nothing in it (`snapshot_is_frozen`,
///    `snapshot_survives_volume_removal`, `snapshot_of_clone`).
/// 3. `clone_snapshot(s)` reads as `s`; writes to the clone are visible only in the clone
///    (`clone_reads_as_snapshot`, `clone_writes_are_private`,
///    `concurrent_clones_of_one_snapshot`).
/// 4. A block outside a volume's diverged bitmap reads exactly as the same block of the
///    origin snapshot, or as zeros without one, after any sequence of writes, snapshots
///    and clones (`bitmap_covers_writes`, `fresh_clone_has_empty_bitmap`,
///    `bitmap_invariant_over_a_workload`, and the model-based property test).
/// 5. Removing a snapshot never changes an existing clone
///    (`removing_snapshot_keeps_clones`). A held snapshot cannot be removed: `InUse`
///    (`held_snapshot_cannot_be_removed`, `release_unknown_hold_fails`).
/// 6. Unknown, removed or malformed ids fail with `NotFound` / `InvalidInput`, never a
///    panic (`unknown_volume_is_not_found`, `unknown_snapshot_is_not_found`,
///    `removed_ids_are_not_found`, `foreign_snapshot_id_is_invalid`).
/// 7. What a call acknowledged survives a reopen of the backend
///    (`reopen_keeps_acknowledged_state`); listings and stats are truthful
///    (`list_reports_everything`, `stat_reports_size_and_origin`,
///    `usage_reports_exclusive_and_shared`, `local_path_reads_as_volume`).
/// 8. Unsupported operations fail with `Unsupported` naming the operation and backend
///    (`missing_capabilities_fail_unsupported`).
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The scheme, capabilities and location of this backend.
    fn info(&self) -> BackendInfo;

    /// Creates an empty volume (reads as zeros).
    ///
    /// # Errors
    /// `AlreadyExists` if `id` names a volume; `InvalidInput` for bad options.
    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()>;

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume; `OutOfRange` if `offset + len` exceeds the size.
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes>;

    /// Writes `data` at `offset`. Blocks touched join the diverged bitmap before the call
    /// returns.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume; `OutOfRange` if the write exceeds the size.
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes acknowledged writes durable.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    async fn flush(&self, id: &VolumeId) -> Result<()>;

    /// Freezes the volume's current content into a new snapshot.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId>;

    /// Creates volume `new` whose content is the snapshot's, with an empty diverged
    /// bitmap and `origin = snapshot`.
    ///
    /// # Errors
    /// `NotFound` for an unknown snapshot; `InvalidInput` for a snapshot id of another
    /// scheme; `AlreadyExists` if `new` exists.
    #[doc(alias = "clone")]
    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()>;

    /// Reads `len` bytes of a snapshot at `offset`.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at), for snapshots.
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes>;

    /// Reports a volume's size, origin, diverged bitmap and usage.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat>;

    /// Reports a snapshot's size, parent, bitmap and holds.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign id.
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat>;

    /// Removes a volume. Its snapshots stay.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    async fn remove_volume(&self, id: &VolumeId) -> Result<()>;

    /// Removes a snapshot. Clones of it stay readable and unchanged.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign id; `InUse` while held.
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()>;

    /// Every volume, sorted.
    async fn list_volumes(&self) -> Result<Vec<VolumeId>>;

    /// Every snapshot, sorted.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>>;

    /// Records that `holder` (for example a lazy layer) references the snapshot; a held
    /// snapshot cannot be removed. Holding twice under one name is idempotent. Holds are
    /// durable and, on shared storage, seen by every host.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign id or a malformed holder
    /// (`[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes).
    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()>;

    /// Drops `holder`'s hold.
    ///
    /// # Errors
    /// `NotFound` for an unknown snapshot or a holder that holds nothing.
    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()>;

    /// Holds every snapshot of `ids` for `holder`: by default
    /// [`hold_snapshot`](Self::hold_snapshot) on each in turn. A backend that can make
    /// several holds durable with fewer syncs overrides it (a lazy layer holds its data
    /// snapshot and its Merkle tree snapshot at once); a wrapper passes the batch on as one
    /// call (`slacker-core/tests/wrappers.rs`). Each hold is all-or-nothing, the batch is
    /// not: after an error or a crash some of the holds may be in place, so a caller that
    /// needs all or none releases them again (as after a failed `hold_snapshot`).
    ///
    /// # Errors
    /// As [`hold_snapshot`](Self::hold_snapshot), for the first snapshot that fails.
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        for id in ids {
            self.hold_snapshot(id, holder).await?;
        }
        Ok(())
    }

    /// The local file holding the volume, for a runtime to loop-mount directly.
    ///
    /// # Errors
    /// `Unsupported` unless [`Capabilities::local_path`]; `NotFound` for an unknown volume.
    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf>;

    /// Merges identical blocks across all volumes and snapshots.
    ///
    /// # Errors
    /// `Unsupported` unless [`Capabilities::dedup`].
    async fn dedup(&self) -> Result<DedupReport>;
}

/// Checks a holder name for [`Backend::hold_snapshot`].
///
/// # Errors
/// `InvalidInput` unless `holder` matches `[A-Za-z0-9][A-Za-z0-9._-]*` and is at most 64
/// bytes.
pub fn validate_holder(holder: &str) -> Result<()> {
    VolumeId::new(holder).map(|_| ()).map_err(|_| {
        Error::invalid(format!(
            "holder {holder:?} must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 64 bytes)"
        ))
    })
}

/// Checks that a byte range lies within `size`.
///
/// # Errors
/// `OutOfRange` when `offset + len > size` (or overflows).
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Conveniences on every [`Backend`].
#[async_trait]
pub trait BackendExt: Backend {
    /// Reads a whole volume.
    async fn read_volume(&self, id: &VolumeId) -> Result<Bytes> {
        let st = self.stat_volume(id).await?;
        let len = usize::try_from(st.size)
            .map_err(|_| Error::invalid("volume too large to read whole"))?;
        self.read_at(id, 0, len).await
    }

    /// Reads a whole snapshot.
    async fn read_snapshot(&self, id: &SnapshotId) -> Result<Bytes> {
        let st = self.stat_snapshot(id).await?;
        let len = usize::try_from(st.size)
            .map_err(|_| Error::invalid("snapshot too large to read whole"))?;
        self.read_snapshot_at(id, 0, len).await
    }

    /// Creates a volume and writes `content` at offset 0 (the size is rounded up to whole
    /// blocks of the default size).
    async fn create_volume_with(&self, id: &VolumeId, content: &[u8]) -> Result<()> {
        let bs = BlockSize::DEFAULT.bytes();
        let size = (content.len() as u64).div_ceil(bs).max(1) * bs;
        self.create_volume(id, &VolumeOptions::new(size)).await?;
        self.write_at(id, 0, content).await
    }

    /// The blake3 digest of a snapshot's content, read in 1 MiB pieces. O(size): meant for
    /// verification, not for the push path. Needs the `digest` feature (on by default).
    #[cfg(feature = "digest")]
    async fn snapshot_digest(&self, id: &SnapshotId) -> Result<blake3::Hash> {
        let st = self.stat_snapshot(id).await?;
        let mut h = blake3::Hasher::new();
        let mut off = 0;
        while off < st.size {
            let n = (st.size - off).min(1 << 20);
            h.update(&self.read_snapshot_at(id, off, n as usize).await?);
            off += n;
        }
        Ok(h.finalize())
    }
}

impl<B: Backend + ?Sized> BackendExt for B {}

#[async_trait]
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn info(&self) -> BackendInfo {
        (**self).info()
    }
    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        (**self).create_volume(id, options).await
    }
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        (**self).read_at(id, offset, len).await
    }
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write_at(id, offset, data).await
    }
    async fn flush(&self, id: &VolumeId) -> Result<()> {
        (**self).flush(id).await
    }
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        (**self).snapshot(id).await
    }
    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        (**self).clone_snapshot(snapshot, new).await
    }
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        (**self).read_snapshot_at(id, offset, len).await
    }
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        (**self).stat_volume(id).await
    }
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        (**self).stat_snapshot(id).await
    }
    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        (**self).remove_volume(id).await
    }
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        (**self).remove_snapshot(id).await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        (**self).list_volumes().await
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        (**self).list_snapshots().await
    }
    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        (**self).hold_snapshot(id, holder).await
    }
    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        (**self).release_snapshot(id, holder).await
    }
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        (**self).hold_snapshots(ids, holder).await
    }
    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf> {
        (**self).local_path(id).await
    }
    async fn dedup(&self) -> Result<DedupReport> {
        (**self).dedup().await
    }
}
