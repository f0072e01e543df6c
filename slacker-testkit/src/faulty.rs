//! Deliberately broken backends, to prove that the suite and the property test bite.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use slacker_core::{
    Backend, BackendInfo, BlockBitmap, DedupReport, Result, SnapshotId, SnapshotStat, VolumeId,
    VolumeOptions, VolumeStat,
};

use crate::Harness;

/// A write to a clone, leaked into its origin snapshot: (offset, data).
type Leak = (u64, Vec<u8>);

/// Which bug to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The diverged bitmap forgets every write (the shared cache would serve stale blocks).
    ForgetfulBitmap,
    /// A clone shares a mutable block with its snapshot: writes to the clone show through
    /// in reads of the snapshot it came from.
    SharedCloneBlock,
    /// Every block of every volume is reported diverged: safe for the shared cache but it
    /// defeats it (and diffs), and only an upper bound on the bitmap catches it.
    EverythingDiverged,
}

/// Wraps a correct backend and breaks it as [`Fault`] says.
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    fault: Fault,
    /// Per volume: blocks its writes touched (ForgetfulBitmap).
    written: Mutex<HashMap<VolumeId, BlockBitmap>>,
    /// Per clone: its origin; per snapshot: writes leaked into it (SharedCloneBlock).
    origins: Mutex<HashMap<VolumeId, SnapshotId>>,
    leaks: Mutex<HashMap<SnapshotId, Vec<Leak>>>,
}

impl<B> FaultyBackend<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, fault: Fault) -> Self {
        Self {
            inner,
            fault,
            written: Mutex::default(),
            origins: Mutex::default(),
            leaks: Mutex::default(),
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for FaultyBackend<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        self.inner.create_volume(id, options).await
    }
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read_at(id, offset, len).await
    }
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(id, offset, data).await?;
        if !data.is_empty() {
            let st = self.inner.stat_volume(id).await?;
            let range = st.block_size.blocks_touched(offset, data.len() as u64);
            self.written
                .lock()
                .unwrap()
                .entry(id.clone())
                .or_default()
                .insert_range(range);
            if self.fault == Fault::SharedCloneBlock {
                if let Some(origin) = self.origins.lock().unwrap().get(id) {
                    self.leaks
                        .lock()
                        .unwrap()
                        .entry(origin.clone())
                        .or_default()
                        .push((offset, data.to_vec()));
                }
            }
        }
        Ok(())
    }
    async fn flush(&self, id: &VolumeId) -> Result<()> {
        self.inner.flush(id).await
    }
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        self.inner.snapshot(id).await
    }
    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        self.inner.clone_snapshot(snapshot, new).await?;
        self.origins
            .lock()
            .unwrap()
            .insert(new.clone(), snapshot.clone());
        self.written.lock().unwrap().remove(new);
        Ok(())
    }
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let data = self.inner.read_snapshot_at(id, offset, len).await?;
        let leaks = self.leaks.lock().unwrap();
        let Some(list) = leaks.get(id) else {
            return Ok(data);
        };
        let mut out = BytesMut::from(&data[..]);
        for (woff, wdata) in list {
            let (start, end) = (
                (*woff).max(offset),
                (woff + wdata.len() as u64).min(offset + len as u64),
            );
            if start < end {
                out[(start - offset) as usize..(end - offset) as usize]
                    .copy_from_slice(&wdata[(start - woff) as usize..(end - woff) as usize]);
            }
        }
        Ok(out.freeze())
    }
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let mut st = self.inner.stat_volume(id).await?;
        if self.fault == Fault::ForgetfulBitmap {
            if let Some(w) = self.written.lock().unwrap().get(id) {
                st.diverged = st.diverged.difference(w);
            }
        }
        if self.fault == Fault::EverythingDiverged {
            let blocks = (st.size / st.block_size.bytes()) as u32;
            st.diverged
                .insert_range(slacker_core::BlockRange::new(0, blocks));
        }
        Ok(st)
    }
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        self.inner.stat_snapshot(id).await
    }
    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.inner.remove_volume(id).await?;
        self.written.lock().unwrap().remove(id);
        self.origins.lock().unwrap().remove(id);
        Ok(())
    }
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.inner.remove_snapshot(id).await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        self.inner.list_volumes().await
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        self.inner.list_snapshots().await
    }
    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.inner.hold_snapshot(id, holder).await
    }
    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.inner.release_snapshot(id, holder).await
    }
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        self.inner.hold_snapshots(ids, holder).await
    }
    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf> {
        self.inner.local_path(id).await
    }
    async fn dedup(&self) -> Result<DedupReport> {
        self.inner.dedup().await
    }
}

/// A harness that wraps another harness's backends in [`FaultyBackend`].
#[derive(Debug)]
pub struct FaultyHarness<H> {
    inner: H,
    fault: Fault,
}

impl<H> FaultyHarness<H> {
    /// Wraps `inner`'s backends with `fault`.
    pub fn new(inner: H, fault: Fault) -> Self {
        Self { inner, fault }
    }
}

#[async_trait]
impl<H: Harness> Harness for FaultyHarness<H> {
    type Backend = FaultyBackend<H::Backend>;
    async fn fresh(&self) -> Self::Backend {
        FaultyBackend::new(self.inner.fresh().await, self.fault)
    }
    fn diverged_granule(&self) -> u64 {
        self.inner.diverged_granule()
    }
    async fn reopen(&self, backend: Self::Backend) -> Self::Backend {
        // The bug persists across a reopen, as a real one would.
        let FaultyBackend {
            inner,
            fault,
            written,
            origins,
            leaks,
        } = backend;
        FaultyBackend {
            inner: self.inner.reopen(inner).await,
            fault,
            written,
            origins,
            leaks,
        }
    }
}
