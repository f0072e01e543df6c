//! Deploying an image with its startup trace: the one call a runtime makes to go from an
//! image reference to a lazily readable, verified container volume whose startup blocks
//! are already on their way.
//!
//! ```text
//!  deploy ─▶ manifest ┬─▶ config, reference layer (embedded) ─▶ apply_diff (lazy) ─▶ get (clone) ─▶ LazyVolume
//!                     └─▶ trace: referrers API ∥ sha256-<hex> tag (trace manifest, blob embedded) ─┐
//!                                                      LazyVolume::prefetch (bounded) ◀────────────────┘
//! ```
//!
//! [`RegistryClient::deploy`] pulls the image ([`RegistryClient::pull_image`]) and, once
//! the manifest names the image, fetches its [startup trace](crate::referrers) at the same
//! time as the config and the layers (the trace lookup cannot go out with the manifest
//! GET of a tag: the referrers are listed under the manifest's digest). It then clones the top layer
//! ([`LayerStore::get`]), opens the clone as a [`LazyVolume`] that verifies every fetched
//! block against the layer's Merkle root, and starts a background prefetch of the
//! trace's blocks, bounded by [`DeployOptions::prefetch_bytes`] and
//! [`DeployOptions::prefetch_parallelism`], while the runtime mounts the volume and
//! starts the container.
//!
//! **The trace is advisory.** An image without a trace deploys exactly as without this
//! module (same requests, same volume options). A trace that cannot be fetched, is
//! malformed or oversized, is attached to another manifest, or was recorded on a volume
//! of another size or block size is ignored with a `tracing` warning and reported in
//! [`Deployment::trace`]: it never fails a deploy. Only the pull itself can fail.
//!
//! **With a trace, blind read-ahead is off** (unless
//! [`DeployOptions::read_ahead_with_trace`]): the trace already names the blocks the
//! container will read, so fetching blocks next to each miss only adds bytes the
//! container never reads.
//!
//! The two halves are available separately for runtimes (and benchmarks) that time or
//! schedule them apart: [`RegistryClient::pull_with_trace`] and [`PulledImage::start`].

use std::sync::Arc;

use slacker_core::merkle::MerkleVerifier;
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions, PrefetchReport};
use slacker_core::{Backend, BlockRange, LayerStore, Result, VolumeId};

use crate::referrers::{PulledTrace, StartupTrace};
use crate::{PullReport, RegistryClient};

/// Default byte bound of a trace prefetch: 256 MiB.
pub const DEFAULT_PREFETCH_BYTES: u64 = 256 << 20;

/// How [`RegistryClient::deploy`] uses an image's startup trace and opens the volume.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeployOptions {
    /// Look for a startup trace and prefetch it (default true).
    pub use_trace: bool,
    /// At most this many bytes of the trace are prefetched, its first runs in block
    /// order (default [`DEFAULT_PREFETCH_BYTES`]).
    pub prefetch_bytes: u64,
    /// Backend requests the prefetch keeps in flight (default 4, at least 1).
    pub prefetch_parallelism: usize,
    /// Keep blind read-ahead on when a trace is used (default false: the trace replaces
    /// it). Without a trace, [`volume`](Self::volume)'s read-ahead always applies.
    pub read_ahead_with_trace: bool,
    /// The base options of the [`LazyVolume`] (read-ahead, request size, metrics); the
    /// deploy adds the Merkle verifier of the layer and the prefetch parallelism.
    pub volume: LazyVolumeOptions,
}

impl Default for DeployOptions {
    fn default() -> Self {
        Self {
            use_trace: true,
            prefetch_bytes: DEFAULT_PREFETCH_BYTES,
            prefetch_parallelism: LazyVolumeOptions::default().prefetch_parallelism,
            read_ahead_with_trace: false,
            volume: LazyVolumeOptions::default(),
        }
    }
}

impl DeployOptions {
    /// Sets [`use_trace`](Self::use_trace).
    pub fn with_trace(mut self, on: bool) -> Self {
        self.use_trace = on;
        self
    }
    /// Sets [`prefetch_bytes`](Self::prefetch_bytes).
    pub fn with_prefetch_bytes(mut self, bytes: u64) -> Self {
        self.prefetch_bytes = bytes;
        self
    }
    /// Sets [`prefetch_parallelism`](Self::prefetch_parallelism) (at least 1).
    pub fn with_prefetch_parallelism(mut self, n: usize) -> Self {
        self.prefetch_parallelism = n.max(1);
        self
    }
    /// Sets [`read_ahead_with_trace`](Self::read_ahead_with_trace).
    pub fn with_read_ahead_with_trace(mut self, on: bool) -> Self {
        self.read_ahead_with_trace = on;
        self
    }
    /// Sets [`volume`](Self::volume).
    pub fn with_volume_options(mut self, options: LazyVolumeOptions) -> Self {
        self.volume = options;
        self
    }
}

/// What became of an image's startup trace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceOutcome {
    /// Not looked for ([`DeployOptions::use_trace`] off).
    NotAsked,
    /// The image has none: deployed as without traces.
    Absent,
    /// Fetched (and, after [`PulledImage::start`], prefetched).
    Used {
        /// Digest of the trace's artifact manifest.
        manifest_digest: String,
        /// Bytes downloaded for it (referrers list, manifest, blob).
        fetched_bytes: u64,
        /// Bytes of blocks it names.
        trace_bytes: u64,
        /// Bytes of blocks the prefetch covers (after [`DeployOptions::prefetch_bytes`]).
        prefetch_bytes: u64,
    },
    /// Found or looked for, but not used; why (also logged as a warning). The deploy
    /// went on as without a trace.
    Ignored(String),
}

/// An image pulled by [`RegistryClient::pull_with_trace`], with its trace if usable.
#[derive(Debug)]
#[non_exhaustive]
pub struct PulledImage {
    /// The pull.
    pub pull: PullReport,
    /// The trace fetched alongside, if any (checked against the image in
    /// [`start`](Self::start)).
    pub trace: Option<PulledTrace>,
    /// What became of the trace so far.
    pub outcome: TraceOutcome,
}

/// A deployed container volume, ready to mount (e.g. `slacker_fuse::Mount::lazy`).
#[derive(Debug)]
#[non_exhaustive]
pub struct Deployment {
    /// The container's lazily read volume (a clone of the image's top layer).
    pub volume: LazyVolume,
    /// Its id in the backend (from [`LayerStore::get`]).
    pub volume_id: VolumeId,
    /// The pull.
    pub pull: PullReport,
    /// What became of the startup trace.
    pub trace: TraceOutcome,
    /// The verifier of the layer's Merkle root (`None` for a layer without one): its
    /// [`stats`](MerkleVerifier::stats) give the checking cost.
    pub verifier: Option<Arc<MerkleVerifier>>,
    /// The background prefetch of the trace, when one runs.
    pub prefetch: Option<tokio::task::JoinHandle<Result<PrefetchReport>>>,
}

fn ignored(image: &str, why: String) -> TraceOutcome {
    tracing::warn!(image, reason = %why, "startup trace ignored; deploying without it");
    TraceOutcome::Ignored(why)
}

impl RegistryClient {
    /// Pulls `image` into `store` like [`pull_image`](Self::pull_image) and, with
    /// [`DeployOptions::use_trace`], fetches its startup trace at the same time (after
    /// the manifest, alongside the config and layers). A trace that cannot be fetched or
    /// decoded is ignored with a warning.
    ///
    /// # Errors
    /// Those of [`pull_image`](Self::pull_image); never because of the trace.
    pub async fn pull_with_trace<B: Backend>(
        &self,
        store: &LayerStore<B>,
        image: &str,
        options: &DeployOptions,
    ) -> Result<PulledImage> {
        let t = std::time::Instant::now();
        let m = self.image_manifest(image).await?;
        tracing::debug!(target: "slacker_oci::timing", step = "manifest", image, us = t.elapsed().as_micros() as u64);
        if !options.use_trace {
            let pull = self.pull_manifested(store, image, m).await?;
            return Ok(PulledImage {
                pull,
                trace: None,
                outcome: TraceOutcome::NotAsked,
            });
        }
        let subject = m.digest.clone();
        let (pull, trace) = tokio::join!(
            async {
                let r = self.pull_manifested(store, image, m).await;
                tracing::debug!(target: "slacker_oci::timing", step = "pull_manifested done", image, us = t.elapsed().as_micros() as u64);
                r
            },
            async {
                let r = self.pull_trace(image, &subject).await;
                tracing::debug!(target: "slacker_oci::timing", step = "pull_trace done", image, us = t.elapsed().as_micros() as u64);
                r
            }
        );
        tracing::debug!(target: "slacker_oci::timing", step = "pull_with_trace", image, us = t.elapsed().as_micros() as u64);
        let pull = pull?;
        let (trace, outcome) = match trace {
            Ok(None) => (None, TraceOutcome::Absent),
            Ok(Some(t)) => {
                let outcome = TraceOutcome::Used {
                    manifest_digest: t.manifest_digest.clone(),
                    fetched_bytes: t.bytes,
                    trace_bytes: t.trace.bytes(),
                    prefetch_bytes: 0,
                };
                (Some(t), outcome)
            }
            Err(e) => (None, ignored(image, format!("fetching it failed: {e}"))),
        };
        Ok(PulledImage {
            pull,
            trace,
            outcome,
        })
    }

    /// Deploys `image`: [`pull_with_trace`](Self::pull_with_trace), then
    /// [`PulledImage::start`]. `data` is the backend the worker reads the image's blocks
    /// through (the store's storage, possibly wrapped: counted, throttled); `cache` the
    /// worker's block cache.
    ///
    /// # Errors
    /// Those of the pull, of [`LayerStore::get`], and of opening the volume and its
    /// Merkle verifier (`Integrity` for a missing or wrong-sized tree); never because of
    /// the trace.
    pub async fn deploy<B: Backend>(
        &self,
        store: &LayerStore<B>,
        data: Arc<dyn Backend>,
        cache: Arc<BlockCache>,
        image: &str,
        options: &DeployOptions,
    ) -> Result<Deployment> {
        let pulled = self.pull_with_trace(store, image, options).await?;
        pulled.start(store, data, cache, image, options).await
    }
}

impl PulledImage {
    /// Clones the top layer ([`LayerStore::get`]), opens it as a [`LazyVolume`] with the
    /// layer's Merkle verifier, and, when the trace fits the volume (same block size and
    /// block count), starts prefetching it in the background with blind read-ahead off
    /// (see [`DeployOptions`]). A trace that does not fit is ignored with a warning.
    /// `image` only names the image in warnings.
    ///
    /// # Errors
    /// Those of [`LayerStore::get`], [`MerkleVerifier::open`] and [`LazyVolume::open`].
    pub async fn start<B: Backend>(
        self,
        store: &LayerStore<B>,
        data: Arc<dyn Backend>,
        cache: Arc<BlockCache>,
        image: &str,
        options: &DeployOptions,
    ) -> Result<Deployment> {
        let top = self.pull.top_layer.clone();
        let info = store.layer(&top).await?;
        let volume_id = store.get(&top).await?;
        let st = data.stat_volume(&volume_id).await?;
        let mut vopts = options
            .volume
            .clone()
            .with_prefetch_parallelism(options.prefetch_parallelism);
        let mut verifier = None;
        if let Some(root) = &info.merkle {
            let v =
                Arc::new(MerkleVerifier::open(data.clone(), root, info.size, st.block_size).await?);
            vopts = vopts.with_verifier(v.clone());
            verifier = Some(v);
        }
        let mut outcome = self.outcome;
        let blocks = st.size.div_ceil(st.block_size.bytes());
        let trace: Option<StartupTrace> = match self.trace {
            Some(t)
                if t.trace.block_size != st.block_size || u64::from(t.trace.blocks) != blocks =>
            {
                outcome = ignored(
                    image,
                    format!(
                        "it was recorded on {} blocks of {}, the volume has {blocks} of {}",
                        t.trace.blocks, t.trace.block_size, st.block_size
                    ),
                );
                None
            }
            other => other.map(|t| t.trace),
        };
        let ranges: Vec<BlockRange> = match &trace {
            Some(t) => t.clipped(options.prefetch_bytes),
            None => Vec::new(),
        };
        if trace.is_some() && !options.read_ahead_with_trace {
            vopts = vopts.with_read_ahead(0).with_max_read_ahead(0);
        }
        let volume = LazyVolume::open(data, volume_id.clone(), cache, vopts).await?;
        let prefetch = if trace.is_some() && !ranges.is_empty() {
            if let TraceOutcome::Used { prefetch_bytes, .. } = &mut outcome {
                *prefetch_bytes =
                    ranges.iter().map(BlockRange::len).sum::<u64>() * st.block_size.bytes();
            }
            Some(volume.prefetch(ranges))
        } else {
            None
        };
        Ok(Deployment {
            volume,
            volume_id,
            pull: self.pull,
            trace: outcome,
            verifier,
            prefetch,
        })
    }
}
