//! [`Counting`]: a backend wrapper that counts the data requests and bytes it passes on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendInfo, DedupReport, SnapshotStat, VolumeOptions, VolumeStat};
use crate::error::Result;
use crate::ids::{SnapshotId, VolumeId};

/// What a [`Counting`] backend passed on, counted at the backend side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackendCounts {
    /// `read_at` calls.
    pub volume_reads: u64,
    /// Bytes returned by `read_at`.
    pub volume_read_bytes: u64,
    /// `read_snapshot_at` calls.
    pub snapshot_reads: u64,
    /// Bytes returned by `read_snapshot_at`.
    pub snapshot_read_bytes: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// Bytes sent to `write_at`.
    pub written_bytes: u64,
    /// Every other call (metadata: stat, snapshot, clone, flush, ...).
    pub other_calls: u64,
    /// Most read calls (`read_at` + `read_snapshot_at`) seen in flight at once.
    pub peak_concurrent_reads: u64,
}

impl BackendCounts {
    /// Bytes read from the backend, volumes and snapshots together.
    pub fn bytes_read(&self) -> u64 {
        self.volume_read_bytes + self.snapshot_read_bytes
    }

    /// Read requests, volumes and snapshots together.
    pub fn read_requests(&self) -> u64 {
        self.volume_reads + self.snapshot_reads
    }
}

#[derive(Debug, Default)]
struct Counters {
    volume_reads: AtomicU64,
    volume_read_bytes: AtomicU64,
    snapshot_reads: AtomicU64,
    snapshot_read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    other_calls: AtomicU64,
    reads_in_flight: AtomicU64,
    peak_concurrent_reads: AtomicU64,
}

/// A [`Backend`] that delegates to `B` and counts data requests and bytes (successful
/// calls only), so tests can assert on what reached the backend.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use slacker_core::worker::Counting;
/// use slacker_core::{Backend, BackendExt, VolumeId};
/// let b = Counting::new(slacker_backend_mem::MemBackend::new());
/// let v = VolumeId::new("v").unwrap();
/// b.create_volume_with(&v, b"hello").await.unwrap();
/// b.read_at(&v, 0, 5).await.unwrap();
/// assert_eq!(b.counts().volume_read_bytes, 5);
/// # });
/// ```
#[derive(Debug)]
pub struct Counting<B> {
    inner: B,
    c: Counters,
}

/// Decrements the in-flight read gauge when the read ends (or is cancelled).
struct InFlightRead<'a>(&'a AtomicU64);

impl Drop for InFlightRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl<B: Backend> Counting<B> {
    /// Counts what passes to `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            c: Counters::default(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The counts so far.
    pub fn counts(&self) -> BackendCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BackendCounts {
            volume_reads: g(&self.c.volume_reads),
            volume_read_bytes: g(&self.c.volume_read_bytes),
            snapshot_reads: g(&self.c.snapshot_reads),
            snapshot_read_bytes: g(&self.c.snapshot_read_bytes),
            writes: g(&self.c.writes),
            written_bytes: g(&self.c.written_bytes),
            other_calls: g(&self.c.other_calls),
            peak_concurrent_reads: g(&self.c.peak_concurrent_reads),
        }
    }

    /// Sets every count back to zero.
    pub fn reset(&self) {
        for c in [
            &self.c.volume_reads,
            &self.c.volume_read_bytes,
            &self.c.snapshot_reads,
            &self.c.snapshot_read_bytes,
            &self.c.writes,
            &self.c.written_bytes,
            &self.c.other_calls,
            &self.c.peak_concurrent_reads,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn read_started(&self) -> InFlightRead<'_> {
        let now = self.c.reads_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.c
            .peak_concurrent_reads
            .fetch_max(now, Ordering::Relaxed);
        InFlightRead(&self.c.reads_in_flight)
    }

    fn other(&self) {
        inc(&self.c.other_calls, 1);
    }
}

#[async_trait]
impl<B: Backend> Backend for Counting<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        self.other();
        self.inner.create_volume(id, options).await
    }
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        let _gauge = self.read_started();
        let r = self.inner.read_at(id, offset, len).await?;
        inc(&self.c.volume_reads, 1);
        inc(&self.c.volume_read_bytes, r.len() as u64);
        Ok(r)
    }
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(id, offset, data).await?;
        inc(&self.c.writes, 1);
        inc(&self.c.written_bytes, data.len() as u64);
        Ok(())
    }
    async fn flush(&self, id: &VolumeId) -> Result<()> {
        self.other();
        self.inner.flush(id).await
    }
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        self.other();
        self.inner.snapshot(id).await
    }
    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        self.other();
        self.inner.clone_snapshot(snapshot, new).await
    }
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let _gauge = self.read_started();
        let r = self.inner.read_snapshot_at(id, offset, len).await?;
        inc(&self.c.snapshot_reads, 1);
        inc(&self.c.snapshot_read_bytes, r.len() as u64);
        Ok(r)
    }
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        self.other();
        self.inner.stat_volume(id).await
    }
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        self.other();
        self.inner.stat_snapshot(id).await
    }
    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.other();
        self.inner.remove_volume(id).await
    }
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.other();
        self.inner.remove_snapshot(id).await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        self.other();
        self.inner.list_volumes().await
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        self.other();
        self.inner.list_snapshots().await
    }
    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.other();
        self.inner.hold_snapshot(id, holder).await
    }
    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.other();
        self.inner.release_snapshot(id, holder).await
    }
    /// Passed on as one batch (the trait's default would split it into one hold per
    /// snapshot: one durable write each on btrfs).
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        self.other();
        self.inner.hold_snapshots(ids, holder).await
    }
    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf> {
        self.other();
        self.inner.local_path(id).await
    }
    async fn dedup(&self) -> Result<DedupReport> {
        self.other();
        self.inner.dedup().await
    }
}
