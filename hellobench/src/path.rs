//! The one seam between the harness and a way of distributing images.
//!
//! The harness ([`crate::bench`]) times each call with the same clock and computes the cycles;
//! an implementation only does the work and reports bytes. Phase 1 has
//! [`crate::baseline::Traditional`] (tar + gzip -6 into a registry, download + gunzip + untar,
//! overlayfs). Phase 2 adds slacker's path (btrfs backend + snapshot-reference layers + lazy
//! data path) as a second implementation; nothing else changes.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::corpus::BuiltImage;
use crate::error::Result;

/// What one phase reports besides its duration (which the harness measures around the call).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Step {
    /// Bytes that crossed the network between this host and the registry (blobs, configs and
    /// manifests; HTTP headers not counted). For slacker, include lazily fetched blocks here
    /// in the phase that fetched them.
    pub network_bytes: u64,
    /// Run phase only: image bytes the container had to have read or fetched before it was
    /// ready. Traditional: the whole image (all file contents), since pull materialised it;
    /// slacker: the bytes its data path fetched.
    pub read_bytes: Option<u64>,
    /// Sub-phase seconds for the tables, e.g. `("tar+gzip", 12.1)`, `("upload", 2.0)`.
    pub parts: Vec<(String, f64)>,
    /// Free-form facts worth keeping in the JSON (sizes, layer digests, filesystem types).
    pub notes: Vec<String>,
}

/// One way of pushing, pulling and running an image.
///
/// # Contract
///
/// - `push` starts from the built tree on this host (`image.root`) and leaves the image
///   pullable from the registry under a reference the implementation remembers. Every call is
///   a fresh push (a new tag); nothing from an earlier push may be reused except what the
///   real system would reuse (document it in a note).
/// - `pull` starts from a worker that holds nothing of this image and leaves it runnable.
/// - `run` starts a container and returns once `image.spec.readiness` holds (bounded by the
///   readiness timeout), leaving it running; `stop` stops it and releases every mount.
/// - `clean` removes what `pull`/`run` left on the worker (untimed). After `clean` (or a
///   failed phase followed by `stop` + `clean`), nothing of this image is mounted or running.
/// - Blocking work (compression, unpacking, mounts, child processes) runs on
///   `tokio::task::spawn_blocking`, so the harness's timers and Ctrl-C handling stay live.
#[async_trait]
pub trait Path: Send {
    /// Short name for tables, JSON and the chart: `baseline`, `slacker`.
    fn name(&self) -> &str;
    /// Publish the image to the registry.
    async fn push(&mut self, image: &BuiltImage) -> Result<Step>;
    /// Fetch the image to this worker so that it can run.
    async fn pull(&mut self, image: &BuiltImage) -> Result<Step>;
    /// Start a container and wait until it is ready.
    async fn run(&mut self, image: &BuiltImage) -> Result<Step>;
    /// Stop the container started by `run` and unmount its filesystems.
    async fn stop(&mut self, image: &BuiltImage) -> Result<Step>;
    /// Remove the pulled image and container leftovers from the worker.
    async fn clean(&mut self, image: &BuiltImage) -> Result<()>;
}
