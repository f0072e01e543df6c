//! The one seam between the harness and a way of distributing images.
//!
//! The harness ([`crate::bench`]) times each call with the same clock and computes the cycles;
//! an implementation only does the work and reports bytes. Phase 1 has
//! [`crate::baseline::Traditional`] (tar + gzip -6 into a registry, download + gunzip + untar,
//! overlayfs). Phase 2 adds slacker's paths ([`crate::slacker::SlackerPath`]: btrfs backend +
//! snapshot-reference layers, run through the kernel's loop device or the lazy worker data
//! path).

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
    /// Push/pull: layer blob bytes moved (without config and manifests), where the path
    /// knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_bytes: Option<u64>,
    /// Run: image bytes fetched from image storage before the container was ready (also
    /// counted in `network_bytes`): slacker's lazily fetched blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_bytes: Option<u64>,
    /// Run: the image's size in storage (slacker: the volume's logical size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
    /// Run: the image's used bytes in storage (slacker: bytes allocated to the volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_used_bytes: Option<u64>,
    /// Free-form facts worth keeping in the JSON (sizes, layer digests, filesystem types).
    pub notes: Vec<String>,
}

/// One way of pushing, pulling and running an image.
///
/// # Contract
///
/// - `prepare` (untimed, before every `push`) puts the image where the developer's host
///   keeps it for this path, e.g. slacker imports the tree into a volume (the traditional
///   path starts from the tree on disk), and builds this repetition's registry clients.
///   Building an HTTP client loads the system CA store several times (~0.1 s here): a cost
///   a daemon pays once at start, not per push or pull. The clients make no request before
///   their phase, so the pull still starts without a connection or token to reuse. For the
///   same reason a phase keeps the clients it used and `clean` drops them: freeing a client
///   frees its CA stores (with OpenSSL about 1 ms per HTTP client, and a `RegistryClient`
///   has two), a cost a daemon pays once at exit.
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
    /// Short name for tables, JSON and the chart: `baseline`, `slacker`, `slacker-lazy`.
    fn name(&self) -> &str;
    /// Untimed set-up before `push` (see the contract). Default: nothing.
    async fn prepare(&mut self, _image: &BuiltImage) -> Result<Step> {
        Ok(Step::default())
    }
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
