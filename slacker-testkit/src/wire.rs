//! A backend seen through a wire the test controls: it can flip a bit of a snapshot read
//! (a tampered server or a man in the middle) and it counts what crosses it.
//!
//! Tests of the worker's integrity checks and of its fetch behaviour wrap a real backend
//! in a [`Wire`] and hand the worker the wrapper:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use slacker_backend_mem::MemBackend;
//! use slacker_core::{Backend, BackendExt, VolumeId};
//! use slacker_testkit::wire::Wire;
//!
//! let wire = Wire::new(MemBackend::new());
//! let v = VolumeId::new("v").unwrap();
//! wire.create_volume_with(&v, &[7u8; 8192]).await.unwrap();
//! let s = wire.snapshot(&v).await.unwrap();
//! wire.tamper(&s, 4100);
//! let bad = wire.read_snapshot_at(&s, 4096, 4096).await.unwrap();
//! assert_eq!(bad[4], 7 ^ 0x01);
//! wire.heal();
//! assert_eq!(wire.read_snapshot_at(&s, 4096, 4096).await.unwrap()[4], 7);
//! assert_eq!(wire.snapshot_reads(), 2);
//! assert_eq!(wire.snapshot_bytes(), 8192);
//! # });
//! ```

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use slacker_core::{
    Backend, BackendInfo, DedupReport, Result, SnapshotId, SnapshotStat, VolumeId, VolumeOptions,
    VolumeStat,
};

/// Wraps a backend; snapshot reads cross a wire that can be tampered with and is metered.
/// Everything else passes straight through.
#[derive(Debug)]
pub struct Wire<B> {
    inner: B,
    target: Mutex<Option<(SnapshotId, u64)>>,
    snapshot_reads: AtomicU64,
    snapshot_bytes: AtomicU64,
}

impl<B> Wire<B> {
    /// A clean wire in front of `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            target: Mutex::new(None),
            snapshot_reads: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
        }
    }

    /// The backend behind the wire.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// From now on, every read of snapshot `s` that covers byte `at` arrives with the lowest
    /// bit of that byte flipped.
    pub fn tamper(&self, s: &SnapshotId, at: u64) {
        *self.target.lock().unwrap() = Some((s.clone(), at));
    }

    /// Stops tampering.
    pub fn heal(&self) {
        *self.target.lock().unwrap() = None;
    }

    /// Snapshot reads (`read_snapshot_at` calls) that crossed the wire so far.
    pub fn snapshot_reads(&self) -> u64 {
        self.snapshot_reads.load(Ordering::Relaxed)
    }

    /// Bytes of snapshot reads that crossed the wire so far.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<B: Backend> Backend for Wire<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    async fn create_volume(&self, id: &VolumeId, o: &VolumeOptions) -> Result<()> {
        self.inner.create_volume(id, o).await
    }
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read_at(id, offset, len).await
    }
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(id, offset, data).await
    }
    async fn flush(&self, id: &VolumeId) -> Result<()> {
        self.inner.flush(id).await
    }
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        self.inner.snapshot(id).await
    }
    async fn clone_snapshot(&self, s: &SnapshotId, new: &VolumeId) -> Result<()> {
        self.inner.clone_snapshot(s, new).await
    }
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let data = self.inner.read_snapshot_at(id, offset, len).await?;
        self.snapshot_reads.fetch_add(1, Ordering::Relaxed);
        self.snapshot_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let target = self.target.lock().unwrap().clone();
        match target {
            Some((s, at)) if &s == id && (offset..offset + data.len() as u64).contains(&at) => {
                let mut v = data.to_vec();
                v[(at - offset) as usize] ^= 0x01;
                Ok(Bytes::from(v))
            }
            _ => Ok(data),
        }
    }
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        self.inner.stat_volume(id).await
    }
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        self.inner.stat_snapshot(id).await
    }
    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.inner.remove_volume(id).await
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
