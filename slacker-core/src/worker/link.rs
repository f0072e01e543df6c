//! [`Throttled`]: a backend behind a slow link (latency and a bandwidth cap), in process.
//!
//! This machine's kernel has no `netem`, so examples and benchmarks emulate the network
//! between worker and storage here: every call waits one round trip, and data calls also
//! wait for their bytes to cross a link of limited bandwidth that all concurrent calls
//! share.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::backend::{Backend, BackendInfo, DedupReport, SnapshotStat, VolumeOptions, VolumeStat};
use crate::error::Result;
use crate::ids::{SnapshotId, VolumeId};

/// A link between a worker and its storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkProfile {
    /// Added to every call (one request/response round trip).
    pub latency: Duration,
    /// Bytes per second the link carries, shared by concurrent calls; `None`: unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
}

impl LinkProfile {
    /// A link with `latency` per call and `bits_per_sec` of bandwidth.
    pub fn new(latency: Duration, bits_per_sec: u64) -> Self {
        Self {
            latency,
            bandwidth_bytes_per_sec: Some((bits_per_sec / 8).max(1)),
        }
    }

    /// 1 ms per call and 1 Gbit/s: a datacenter link to a storage server.
    pub fn datacenter() -> Self {
        Self::new(Duration::from_millis(1), 1_000_000_000)
    }

    /// Only latency, unlimited bandwidth.
    pub fn latency_only(latency: Duration) -> Self {
        Self {
            latency,
            bandwidth_bytes_per_sec: None,
        }
    }

    /// How long `bytes` take to cross the link (zero when unlimited).
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        match self.bandwidth_bytes_per_sec {
            Some(rate) => Duration::from_secs_f64(bytes as f64 / rate as f64),
            None => Duration::ZERO,
        }
    }
}

/// A [`Backend`] that delegates to `B` after a [`LinkProfile`]'s delay: `latency` per
/// call, plus, for data (`read_at`, `read_snapshot_at`, `write_at`), the time its bytes
/// take on a link that concurrent calls share (a virtual clock reserves the link, so many
/// small requests add up to the bandwidth exactly, whatever the timer's resolution).
///
/// The inner call runs first and the wait follows, so a write is acknowledged only after
/// both. Uses `tokio::time` and `spawn_blocking`: run it inside a runtime with the time
/// driver enabled.
#[derive(Debug)]
pub struct Throttled<B> {
    inner: B,
    profile: LinkProfile,
    link_free_at: Mutex<Option<Instant>>,
}

impl<B: Backend> Throttled<B> {
    /// Puts `inner` behind `profile`.
    pub fn new(inner: B, profile: LinkProfile) -> Self {
        Self {
            inner,
            profile,
            link_free_at: Mutex::new(None),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The link.
    pub fn profile(&self) -> LinkProfile {
        self.profile
    }

    /// When a call that moves `bytes` and starts now completes.
    fn deadline(&self, bytes: u64) -> Instant {
        let now = Instant::now();
        let xfer = self.profile.transfer_time(bytes);
        let done = if xfer.is_zero() {
            now
        } else {
            let mut free = self.link_free_at.lock().unwrap_or_else(|e| e.into_inner());
            let start = free.map_or(now, |f| f.max(now));
            let end = start + xfer;
            *free = Some(end);
            end
        };
        done + self.profile.latency
    }

    /// Waits until `deadline`. tokio's timer has a 1 ms resolution and rounds up, which
    /// would add up to 1 ms to every emulated request; so the bulk of a wait is a tokio
    /// sleep and the last 2 ms a `std::thread::sleep` under `spawn_blocking` (precise to
    /// tens of µs, and it parks a blocking-pool thread, not a runtime worker).
    async fn wait(deadline: Instant) {
        const COARSE: Duration = Duration::from_millis(2);
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        if deadline - now > COARSE {
            tokio::time::sleep_until(deadline - COARSE).await;
        }
        let rest = deadline.saturating_duration_since(Instant::now());
        if !rest.is_zero() {
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for Throttled<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.create_volume(id, options).await;
        Self::wait(d).await;
        r
    }
    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        let d = self.deadline(len as u64);
        let r = self.inner.read_at(id, offset, len).await;
        Self::wait(d).await;
        r
    }
    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let d = self.deadline(data.len() as u64);
        let r = self.inner.write_at(id, offset, data).await;
        Self::wait(d).await;
        r
    }
    async fn flush(&self, id: &VolumeId) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.flush(id).await;
        Self::wait(d).await;
        r
    }
    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        let d = self.deadline(0);
        let r = self.inner.snapshot(id).await;
        Self::wait(d).await;
        r
    }
    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.clone_snapshot(snapshot, new).await;
        Self::wait(d).await;
        r
    }
    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        let d = self.deadline(len as u64);
        let r = self.inner.read_snapshot_at(id, offset, len).await;
        Self::wait(d).await;
        r
    }
    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        let d = self.deadline(0);
        let r = self.inner.stat_volume(id).await;
        Self::wait(d).await;
        r
    }
    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        let d = self.deadline(0);
        let r = self.inner.stat_snapshot(id).await;
        Self::wait(d).await;
        r
    }
    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.remove_volume(id).await;
        Self::wait(d).await;
        r
    }
    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.remove_snapshot(id).await;
        Self::wait(d).await;
        r
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        let d = self.deadline(0);
        let r = self.inner.list_volumes().await;
        Self::wait(d).await;
        r
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        let d = self.deadline(0);
        let r = self.inner.list_snapshots().await;
        Self::wait(d).await;
        r
    }
    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.hold_snapshot(id, holder).await;
        Self::wait(d).await;
        r
    }
    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.release_snapshot(id, holder).await;
        Self::wait(d).await;
        r
    }
    /// One request for the batch: one round trip, and the inner backend's batched hold
    /// (the trait's default would make it one round trip and one durable write per
    /// snapshot).
    async fn hold_snapshots(&self, ids: &[SnapshotId], holder: &str) -> Result<()> {
        let d = self.deadline(0);
        let r = self.inner.hold_snapshots(ids, holder).await;
        Self::wait(d).await;
        r
    }
    async fn local_path(&self, id: &VolumeId) -> Result<PathBuf> {
        self.inner.local_path(id).await
    }
    async fn dedup(&self) -> Result<DedupReport> {
        let d = self.deadline(0);
        let r = self.inner.dedup().await;
        Self::wait(d).await;
        r
    }
}
