//! A slacker backend written outside the slacker workspace: volumes and snapshots in
//! `HashMap`s, blocks shared between a snapshot and its clones through `Bytes`.
//!
//! It depends on `slacker-core` with `default-features = false` (the `Backend` trait and
//! its contract only) and proves it keeps the contract with
//! `slacker_testkit::conformance_suite!` (`tests/conformance.rs`).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use slacker_core::backend::{check_range, validate_holder};
use slacker_core::{
    Backend, BackendInfo, BlockBitmap, BlockIndex, BlockSize, Capabilities, DedupReport, Error,
    ObjectKind, Result, SnapshotId, SnapshotStat, Usage, VolumeId, VolumeOptions, VolumeStat,
};

/// The scheme of the snapshot ids this backend mints.
pub const SCHEME: &str = "hashmap";

#[derive(Clone, Debug)]
struct Image {
    size: u64,
    block_size: BlockSize,
    blocks: HashMap<u32, Bytes>,
}

impl Image {
    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len as u64, self.size)?;
        let bs = self.block_size.bytes();
        let mut out = BytesMut::zeroed(len);
        let mut pos = 0;
        while pos < len {
            let at = offset + pos as u64;
            let (block, within) = ((at / bs) as u32, (at % bs) as usize);
            let n = (bs as usize - within).min(len - pos);
            if let Some(b) = self.blocks.get(&block) {
                out[pos..pos + n].copy_from_slice(&b[within..within + n]);
            }
            pos += n;
        }
        Ok(out.freeze())
    }

    fn write(&mut self, offset: u64, data: &[u8], diverged: &mut BlockBitmap) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let bs = self.block_size.bytes();
        let mut pos = 0;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (block, within) = ((at / bs) as u32, (at % bs) as usize);
            let n = (bs as usize - within).min(data.len() - pos);
            // Copy on write: a block shared with a snapshot is never changed in place.
            let mut fresh = match self.blocks.get(&block) {
                Some(old) => BytesMut::from(&old[..]),
                None => BytesMut::zeroed(bs as usize),
            };
            fresh[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.blocks.insert(block, fresh.freeze());
            diverged.insert(BlockIndex(block));
            pos += n;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Volume {
    image: Image,
    origin: Option<SnapshotId>,
    diverged: BlockBitmap,
}

#[derive(Debug)]
struct Snapshot {
    image: Image,
    parent: Option<SnapshotId>,
    diverged: BlockBitmap,
    holds: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    volumes: HashMap<VolumeId, Volume>,
    snapshots: HashMap<String, Snapshot>,
    minted: u64,
}

impl State {
    fn volume(&mut self, id: &VolumeId) -> Result<&mut Volume> {
        self.volumes
            .get_mut(id)
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))
    }

    fn snapshot(&mut self, id: &SnapshotId) -> Result<&mut Snapshot> {
        if id.scheme() != SCHEME {
            return Err(Error::invalid(format!("{id} is not a {SCHEME} snapshot")));
        }
        self.snapshots
            .get_mut(id.key())
            .ok_or_else(|| Error::not_found(ObjectKind::Snapshot, id))
    }
}

/// Volumes and snapshots in `HashMap`s. Cloning the handle shares the storage, so a
/// clone is what a reopened persistent backend would show.
#[derive(Clone, Debug, Default)]
pub struct HashMapBackend {
    state: Arc<Mutex<State>>,
}

impl HashMapBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unsupported(operation: &'static str) -> Error {
    Error::Unsupported {
        operation,
        backend: SCHEME,
    }
}

#[async_trait]
impl Backend for HashMapBackend {
    fn info(&self) -> BackendInfo {
        let mut caps = Capabilities::default();
        caps.usage = true;
        caps.cheap_clone = true; // blocks are shared, a clone copies only the block map
        BackendInfo::new(SCHEME, caps, "a HashMap".to_owned())
    }

    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        options.validate()?;
        let mut s = self.lock();
        if s.volumes.contains_key(id) {
            return Err(Error::already_exists(ObjectKind::Volume, id));
        }
        let image = Image {
            size: options.size,
            block_size: options.block_size,
            blocks: HashMap::new(),
        };
        let diverged = BlockBitmap::new();
        s.volumes.insert(
            id.clone(),
            Volume {
                image,
                origin: None,
                diverged,
            },
        );
        Ok(())
    }

    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        self.lock().volume(id)?.image.read(offset, len)
    }

    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let mut s = self.lock();
        let v = s.volume(id)?;
        v.image.write(offset, data, &mut v.diverged)
    }

    async fn flush(&self, id: &VolumeId) -> Result<()> {
        self.lock().volume(id).map(drop)
    }

    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        let mut s = self.lock();
        let v = s.volume(id)?;
        let snap = Snapshot {
            image: v.image.clone(),
            parent: v.origin.clone(),
            diverged: v.diverged.clone(),
            holds: BTreeSet::new(),
        };
        s.minted += 1;
        let key = format!("k{}", s.minted);
        let sid = SnapshotId::new(SCHEME, &key)?;
        s.snapshots.insert(key, snap);
        Ok(sid)
    }

    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        let mut s = self.lock();
        let image = s.snapshot(snapshot)?.image.clone();
        if s.volumes.contains_key(new) {
            return Err(Error::already_exists(ObjectKind::Volume, new));
        }
        let origin = Some(snapshot.clone());
        let diverged = BlockBitmap::new();
        s.volumes.insert(
            new.clone(),
            Volume {
                image,
                origin,
                diverged,
            },
        );
        Ok(())
    }

    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        self.lock().snapshot(id)?.image.read(offset, len)
    }

    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let mut s = self.lock();
        let v = s.volume(id)?;
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

    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let mut s = self.lock();
        let snap = s.snapshot(id)?;
        Ok(SnapshotStat::new(
            id.clone(),
            snap.image.size,
            snap.image.block_size,
            snap.parent.clone(),
            snap.diverged.clone(),
            snap.holds.iter().cloned().collect(),
        ))
    }

    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.lock()
            .volumes
            .remove(id)
            .map(drop)
            .ok_or_else(|| Error::not_found(ObjectKind::Volume, id))
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let mut s = self.lock();
        if let Some(by) = s.snapshot(id)?.holds.iter().next() {
            return Err(Error::InUse {
                kind: ObjectKind::Snapshot,
                id: id.to_string(),
                by: by.clone(),
            });
        }
        s.snapshots.remove(id.key());
        Ok(())
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        let mut v: Vec<VolumeId> = self.lock().volumes.keys().cloned().collect();
        v.sort();
        Ok(v)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        let s = self.lock();
        let mut v = s
            .snapshots
            .keys()
            .map(|k| SnapshotId::new(SCHEME, k))
            .collect::<Result<Vec<_>>>()?;
        v.sort();
        Ok(v)
    }

    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        validate_holder(holder)?;
        self.lock().snapshot(id)?.holds.insert(holder.to_owned());
        Ok(())
    }

    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        if self.lock().snapshot(id)?.holds.remove(holder) {
            Ok(())
        } else {
            let what = format!("hold {holder:?} on {id}");
            Err(Error::not_found(ObjectKind::Other, what))
        }
    }

    async fn local_path(&self, _id: &VolumeId) -> Result<PathBuf> {
        Err(unsupported("local_path"))
    }

    async fn dedup(&self) -> Result<DedupReport> {
        Err(unsupported("dedup"))
    }
}
