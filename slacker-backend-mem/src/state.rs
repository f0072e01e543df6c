//! The pure state of the mem backend (and the model of the property tests).

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use slacker_core::backend::{check_range, validate_holder};
use slacker_core::{
    BlockBitmap, BlockIndex, BlockSize, Error, ObjectKind, Result, SnapshotId, SnapshotStat, Usage,
    VolumeId, VolumeOptions, VolumeStat,
};

/// Blocks of one image: a missing block reads as zeros.
#[derive(Clone, Debug)]
struct Image {
    size: u64,
    block_size: BlockSize,
    blocks: BTreeMap<u32, Bytes>,
}

impl Image {
    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len as u64, self.size)?;
        let bs = self.block_size.bytes();
        let mut out = BytesMut::zeroed(len);
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let block = (abs / bs) as u32;
            let within = (abs % bs) as usize;
            let n = (bs as usize - within).min(len - pos);
            if let Some(data) = self.blocks.get(&block) {
                out[pos..pos + n].copy_from_slice(&data[within..within + n]);
            }
            pos += n;
        }
        Ok(out.freeze())
    }

    /// Writes `data`, replacing each touched block with a fresh one.
    fn write(&mut self, offset: u64, data: &[u8], diverged: &mut BlockBitmap) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let bs = self.block_size.bytes() as usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let block = (abs / bs as u64) as u32;
            let within = (abs % bs as u64) as usize;
            let n = (bs - within).min(data.len() - pos);
            let mut fresh = match self.blocks.get(&block) {
                Some(old) => BytesMut::from(&old[..]),
                None => BytesMut::zeroed(bs),
            };
            fresh[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.blocks.insert(block, fresh.freeze());
            diverged.insert(BlockIndex(block));
            pos += n;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Volume {
    image: Image,
    origin: Option<SnapshotId>,
    diverged: BlockBitmap,
}

#[derive(Clone, Debug)]
struct Snapshot {
    image: Image,
    parent: Option<SnapshotId>,
    diverged: BlockBitmap,
    holds: BTreeSet<String>,
}

/// The whole state of a mem backend: a plain value, cheap to clone (blocks are shared).
#[derive(Clone, Debug, Default)]
pub struct State {
    volumes: BTreeMap<VolumeId, Volume>,
    snapshots: BTreeMap<String, Snapshot>,
    next_snapshot: u64,
}

impl State {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn vol(&self, id: &VolumeId) -> Result<&Volume> {
        self.volumes
            .get(id)
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))
    }

    fn vol_mut(&mut self, id: &VolumeId) -> Result<&mut Volume> {
        self.volumes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))
    }

    fn snap_key(id: &SnapshotId) -> Result<&str> {
        if id.scheme() != crate::SCHEME {
            return Err(Error::invalid(format!(
                "snapshot id {id} belongs to the {} backend, not {}",
                id.scheme(),
                crate::SCHEME
            )));
        }
        Ok(id.key())
    }

    fn snap(&self, id: &SnapshotId) -> Result<&Snapshot> {
        self.snapshots
            .get(Self::snap_key(id)?)
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, id))
    }

    fn snap_mut(&mut self, id: &SnapshotId) -> Result<&mut Snapshot> {
        let key = Self::snap_key(id)?;
        self.snapshots
            .get_mut(key)
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, id))
    }

    /// See [`Backend::create_volume`](slacker_core::Backend::create_volume).
    pub fn create_volume(&mut self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        options.validate()?;
        if self.volumes.contains_key(id) {
            return Err(Error::already_exists(ObjectKind::Volume, id));
        }
        self.volumes.insert(
            id.clone(),
            Volume {
                image: Image {
                    size: options.size,
                    block_size: options.block_size,
                    blocks: BTreeMap::new(),
                },
                origin: None,
                diverged: BlockBitmap::new(),
            },
        );
        Ok(())
    }

    /// See [`Backend::read_at`](slacker_core::Backend::read_at).
    pub fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        self.vol(id)?.image.read(offset, len)
    }

    /// See [`Backend::write_at`](slacker_core::Backend::write_at).
    pub fn write_at(&mut self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let v = self.vol_mut(id)?;
        v.image.write(offset, data, &mut v.diverged)
    }

    /// See [`Backend::flush`](slacker_core::Backend::flush): checks the id, nothing to do.
    pub fn flush(&self, id: &VolumeId) -> Result<()> {
        self.vol(id).map(|_| ())
    }

    /// See [`Backend::snapshot`](slacker_core::Backend::snapshot).
    pub fn snapshot(&mut self, id: &VolumeId) -> Result<SnapshotId> {
        let v = self.vol(id)?;
        let snap = Snapshot {
            image: v.image.clone(),
            parent: v.origin.clone(),
            diverged: v.diverged.clone(),
            holds: BTreeSet::new(),
        };
        self.next_snapshot += 1;
        let key = format!("s{:08x}", self.next_snapshot);
        let sid = SnapshotId::new(crate::SCHEME, &key)?;
        self.snapshots.insert(key, snap);
        Ok(sid)
    }

    /// See [`Backend::clone_snapshot`](slacker_core::Backend::clone_snapshot).
    pub fn clone_snapshot(&mut self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        let image = self.snap(snapshot)?.image.clone();
        if self.volumes.contains_key(new) {
            return Err(Error::already_exists(ObjectKind::Volume, new));
        }
        self.volumes.insert(
            new.clone(),
            Volume {
                image,
                origin: Some(snapshot.clone()),
                diverged: BlockBitmap::new(),
            },
        );
        Ok(())
    }

    /// See [`Backend::read_snapshot_at`](slacker_core::Backend::read_snapshot_at).
    pub fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        self.snap(id)?.image.read(offset, len)
    }

    /// See [`Backend::stat_volume`](slacker_core::Backend::stat_volume).
    pub fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let v = self.vol(id)?;
        let bs = v.image.block_size.bytes();
        let exclusive = v.diverged.len() * bs;
        let shared = (v.image.blocks.len() as u64 * bs).saturating_sub(exclusive);
        Ok(VolumeStat::new(
            id.clone(),
            v.image.size,
            v.image.block_size,
            v.origin.clone(),
            v.diverged.clone(),
            Usage::new(exclusive, shared),
        ))
    }

    /// See [`Backend::stat_snapshot`](slacker_core::Backend::stat_snapshot).
    pub fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let s = self.snap(id)?;
        Ok(SnapshotStat::new(
            id.clone(),
            s.image.size,
            s.image.block_size,
            s.parent.clone(),
            s.diverged.clone(),
            s.holds.iter().cloned().collect(),
        ))
    }

    /// The blocks of volume `id` that hold data (written to it or inherited from its
    /// origin); every other block reads as zeros. For tests that compare a large, sparse
    /// volume block by block without reading all of it.
    ///
    /// # Errors
    /// `NotFound` for an unknown volume.
    pub fn volume_blocks(&self, id: &VolumeId) -> Result<BlockBitmap> {
        Ok(self
            .vol(id)?
            .image
            .blocks
            .keys()
            .map(|&b| BlockIndex(b))
            .collect())
    }

    /// As [`volume_blocks`](Self::volume_blocks), for a snapshot.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign id.
    pub fn snapshot_blocks(&self, id: &SnapshotId) -> Result<BlockBitmap> {
        Ok(self
            .snap(id)?
            .image
            .blocks
            .keys()
            .map(|&b| BlockIndex(b))
            .collect())
    }

    /// See [`Backend::remove_volume`](slacker_core::Backend::remove_volume).
    pub fn remove_volume(&mut self, id: &VolumeId) -> Result<()> {
        self.volumes
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))
    }

    /// See [`Backend::remove_snapshot`](slacker_core::Backend::remove_snapshot).
    pub fn remove_snapshot(&mut self, id: &SnapshotId) -> Result<()> {
        let s = self.snap(id)?;
        if let Some(by) = s.holds.iter().next() {
            return Err(Error::InUse {
                kind: ObjectKind::Snapshot,
                id: id.to_string(),
                by: by.clone(),
            });
        }
        self.snapshots.remove(id.key());
        Ok(())
    }

    /// See [`Backend::list_volumes`](slacker_core::Backend::list_volumes).
    pub fn list_volumes(&self) -> Vec<VolumeId> {
        self.volumes.keys().cloned().collect()
    }

    /// See [`Backend::list_snapshots`](slacker_core::Backend::list_snapshots).
    pub fn list_snapshots(&self) -> Vec<SnapshotId> {
        let mut v: Vec<SnapshotId> = self
            .snapshots
            .keys()
            .map(|k| SnapshotId::new(crate::SCHEME, k).expect("keys minted valid"))
            .collect();
        v.sort();
        v
    }

    /// See [`Backend::hold_snapshot`](slacker_core::Backend::hold_snapshot).
    pub fn hold_snapshot(&mut self, id: &SnapshotId, holder: &str) -> Result<()> {
        validate_holder(holder)?;
        self.snap_mut(id)?.holds.insert(holder.to_owned());
        Ok(())
    }

    /// See [`Backend::release_snapshot`](slacker_core::Backend::release_snapshot).
    pub fn release_snapshot(&mut self, id: &SnapshotId, holder: &str) -> Result<()> {
        if self.snap_mut(id)?.holds.remove(holder) {
            Ok(())
        } else {
            Err(Error::not_found(
                ObjectKind::Other,
                format!("hold {holder:?} on {id}"),
            ))
        }
    }
}
