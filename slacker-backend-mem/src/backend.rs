//! [`MemBackend`]: the pure [`State`] behind the async [`Backend`] trait.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use slacker_core::{
    Backend, BackendInfo, Capabilities, DedupReport, Error, Result, SnapshotId, SnapshotStat,
    VolumeId, VolumeOptions, VolumeStat,
};

use crate::state::State;

/// The scheme of snapshot ids the mem backend mints.
pub const SCHEME: &str = "mem";

/// The in-memory reference backend. Cloning the handle shares the state.
#[derive(Clone, Debug, Default)]
pub struct MemBackend {
    state: Arc<Mutex<State>>,
}

impl MemBackend {
    /// A backend with no volumes and no snapshots.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, independent handle on the same state: what a persistent backend shows after a
    /// restart (everything acknowledged is there).
    pub fn reopen(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
        }
    }

    /// A copy of the current state.
    pub fn state(&self) -> State {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters more than the panic itself; keep serving.
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
impl Backend for MemBackend {
    fn info(&self) -> BackendInfo {
        let mut caps = Capabilities::default();
        caps.usage = true;
        caps.cheap_clone = true;
        BackendInfo::new(SCHEME, caps, "process memory".to_owned())
    }

    async fn create_volume(&self, id: &VolumeId, options: &VolumeOptions) -> Result<()> {
        self.lock().create_volume(id, options)
    }

    async fn read_at(&self, id: &VolumeId, offset: u64, len: usize) -> Result<Bytes> {
        self.lock().read_at(id, offset, len)
    }

    async fn write_at(&self, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.lock().write_at(id, offset, data)
    }

    async fn flush(&self, id: &VolumeId) -> Result<()> {
        self.lock().flush(id)
    }

    async fn snapshot(&self, id: &VolumeId) -> Result<SnapshotId> {
        self.lock().snapshot(id)
    }

    async fn clone_snapshot(&self, snapshot: &SnapshotId, new: &VolumeId) -> Result<()> {
        self.lock().clone_snapshot(snapshot, new)
    }

    async fn read_snapshot_at(&self, id: &SnapshotId, offset: u64, len: usize) -> Result<Bytes> {
        self.lock().read_snapshot_at(id, offset, len)
    }

    async fn stat_volume(&self, id: &VolumeId) -> Result<VolumeStat> {
        self.lock().stat_volume(id)
    }

    async fn stat_snapshot(&self, id: &SnapshotId) -> Result<SnapshotStat> {
        self.lock().stat_snapshot(id)
    }

    async fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.lock().remove_volume(id)
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.lock().remove_snapshot(id)
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeId>> {
        Ok(self.lock().list_volumes())
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        Ok(self.lock().list_snapshots())
    }

    async fn hold_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.lock().hold_snapshot(id, holder)
    }

    async fn release_snapshot(&self, id: &SnapshotId, holder: &str) -> Result<()> {
        self.lock().release_snapshot(id, holder)
    }

    async fn local_path(&self, _id: &VolumeId) -> Result<PathBuf> {
        Err(unsupported("local_path"))
    }

    async fn dedup(&self) -> Result<DedupReport> {
        Err(unsupported("dedup"))
    }
}
