//! [`LazyVolume`]: a volume whose blocks are fetched from the backend on first read.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::cache::{BlockCache, Claim, ImageSlot, Lookup};
use super::join_all;
use super::metrics::{FetchKind, Metrics, MetricsRecorder};
use crate::backend::{Backend, check_range};
use crate::bitmap::BlockBitmap;
use crate::block::{BlockIndex, BlockRange, BlockSize};
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{SnapshotId, VolumeId};
use crate::merkle::MerkleVerifier;

/// How a [`LazyVolume`] reads.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LazyVolumeOptions {
    /// Blocks fetched beyond a read that misses the cache, in the same backend request
    /// (clean blocks only, stopping at the first block already cached or in flight).
    /// Default 4 (16 KiB of 4 KiB blocks); 0 turns this synchronous read-ahead off.
    pub read_ahead_blocks: u32,
    /// Largest window of *sequential* read-ahead. When reads follow each other, the
    /// window doubles (from 8 blocks) up to this, and the blocks ahead of the reader are
    /// fetched in the background, so a sequential reader finds them cached or in flight
    /// (the kernel's on-demand read-ahead, in the worker). A read elsewhere resets it.
    /// Default 256 (1 MiB of 4 KiB blocks); 0 turns it off.
    pub max_read_ahead_blocks: u32,
    /// Largest single backend request; longer runs of adjacent misses are split.
    /// Default 4 MiB.
    pub max_request_bytes: u64,
    /// Backend requests a [`prefetch`](LazyVolume::prefetch) keeps in flight at once.
    /// Default 4.
    pub prefetch_parallelism: usize,
    /// Largest backend request of a [`prefetch`](LazyVolume::prefetch) (a trace's runs are
    /// split into requests of at most this). Small enough that a demand miss arriving
    /// while a prefetch fills the link waits behind at most `prefetch_parallelism` of
    /// them, not behind the whole trace (a link serves requests in the order they were
    /// sent). Default 256 KiB (~2 ms at 1 Gbit/s; 4 in flight: at most ~8 ms ahead of a
    /// demand miss).
    pub prefetch_request_bytes: u64,
    /// Where to count; `None`: a recorder of this volume's own.
    pub metrics: Option<Arc<MetricsRecorder>>,
    /// Verifies every block fetched for the clean path (from the origin snapshot, or from
    /// the volume when the origin is gone) against the origin's Merkle root before it is
    /// served or cached; `None`: blocks are served unverified (a layer without a root).
    pub verifier: Option<Arc<MerkleVerifier>>,
}

impl Default for LazyVolumeOptions {
    fn default() -> Self {
        Self {
            read_ahead_blocks: 4,
            max_read_ahead_blocks: 256,
            max_request_bytes: 4 << 20,
            prefetch_parallelism: 4,
            prefetch_request_bytes: 256 << 10,
            metrics: None,
            verifier: None,
        }
    }
}

impl LazyVolumeOptions {
    /// Sets [`read_ahead_blocks`](Self::read_ahead_blocks).
    pub fn with_read_ahead(mut self, blocks: u32) -> Self {
        self.read_ahead_blocks = blocks;
        self
    }

    /// Sets [`max_read_ahead_blocks`](Self::max_read_ahead_blocks).
    pub fn with_max_read_ahead(mut self, blocks: u32) -> Self {
        self.max_read_ahead_blocks = blocks;
        self
    }

    /// Sets [`max_request_bytes`](Self::max_request_bytes) (at least one block is always
    /// requested).
    pub fn with_max_request_bytes(mut self, bytes: u64) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    /// Sets [`prefetch_parallelism`](Self::prefetch_parallelism) (at least 1).
    pub fn with_prefetch_parallelism(mut self, n: usize) -> Self {
        self.prefetch_parallelism = n.max(1);
        self
    }

    /// Sets [`prefetch_request_bytes`](Self::prefetch_request_bytes) (at least one block
    /// is always requested).
    pub fn with_prefetch_request_bytes(mut self, bytes: u64) -> Self {
        self.prefetch_request_bytes = bytes;
        self
    }

    /// Verifies fetched clean blocks with `verifier` (built from the origin snapshot's
    /// [`MerkleRoot`](crate::merkle::MerkleRoot)): a block that does not match fails the
    /// read with `ErrorKind::Integrity` and is not cached. Share one verifier between the
    /// clones of an image.
    pub fn with_verifier(mut self, verifier: Arc<MerkleVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Counts into `recorder` (share one between the volumes of a worker).
    pub fn with_metrics(mut self, recorder: Arc<MetricsRecorder>) -> Self {
        self.metrics = Some(recorder);
        self
    }
}

/// What a [`LazyVolume::prefetch`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PrefetchReport {
    /// Blocks asked for (clipped to the volume).
    pub blocks_requested: u64,
    /// Blocks fetched from the backend into the shared cache.
    pub blocks_fetched: u64,
    /// Blocks skipped: cached already, in flight elsewhere, diverged, or (without an
    /// origin) known zeros.
    pub blocks_skipped: u64,
    /// Backend requests sent.
    pub requests: u64,
}

#[derive(Debug)]
enum Target {
    Volume(VolumeId),
    Snapshot,
}

struct Inner {
    backend: Arc<dyn Backend>,
    target: Target,
    size: u64,
    block_size: BlockSize,
    /// The snapshot whose blocks clean reads come from, and its slot in the cache.
    origin: Option<(SnapshotId, ImageSlot)>,
    cache: Arc<BlockCache>,
    diverged: RwLock<BlockBitmap>,
    present: Mutex<BlockBitmap>,
    options: LazyVolumeOptions,
    metrics: Arc<MetricsRecorder>,
    prefetch_permits: Arc<Semaphore>,
    stream: Mutex<Stream>,
}

/// The sequential-access detector behind background read-ahead.
#[derive(Debug, Default)]
struct Stream {
    /// One past the last block of the stream so far (`None`: no read yet).
    end: Option<u32>,
    /// The current read-ahead window, in blocks.
    window: u32,
    /// Read-ahead was requested up to here.
    ahead_until: u32,
}

/// The first window of a sequential stream.
const INITIAL_STREAM_WINDOW: u32 = 8;

/// A volume served block-wise, fetching each block from the backend on first read: the
/// worker side of lazy container images.
///
/// - **Clean blocks** (outside the volume's diverged bitmap) read, by the bitmap
///   invariant, as the origin snapshot's blocks. They are served from the worker's
///   shared [`BlockCache`] and, on a miss, fetched with `read_snapshot_at(origin)` and
///   put there, so every clone of that snapshot on the worker shares them (the paper's
///   loop-driver change, done in userspace). Concurrent readers of a block being fetched
///   wait for that one fetch; adjacent misses of a read are coalesced into one request,
///   extended by a few blocks of read-ahead; reads that follow each other grow a window
///   of read-ahead fetched in the background (up to 1 MiB by default), so a sequential
///   reader runs at the link's bandwidth; [`prefetch`](Self::prefetch) fetches a recorded
///   trace in the background. Without an origin, clean blocks are zeros and cost no
///   fetch.
/// - **Verified** (with [`LazyVolumeOptions::with_verifier`]): every clean block fetched
///   is checked against the origin's Merkle root (the tree blocks that prove it are
///   fetched alongside, see [`crate::merkle`]) before it is served or cached; a mismatch
///   fails the read with `ErrorKind::Integrity` and nothing is cached.
/// - **Diverged blocks** are never served from the shared cache: they are read from the
///   volume with `read_at` (adjacent ones in one request).
/// - **Writes** go to the backend volume with `write_at`; the blocks join the local
///   diverged bitmap *before* the backend write, so a write is acknowledged only once
///   both hold (a bitmap that is briefly a superset is allowed by the contract).
/// - The **present bitmap** records every block this handle has served: the startup read
///   set, to record as a prefetch trace ([`access_trace`](Self::access_trace)). The data
///   itself lives in the cache (clean) or the backend (diverged); an evicted block is
///   simply fetched again.
///
/// A `LazyVolume` must be the only writer of its volume while open (as a block device is
/// opened exclusively): it reads the diverged bitmap once, in [`open`](Self::open), and
/// keeps it up to date with its own writes. Cloning the handle is cheap and shares
/// everything.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
/// use slacker_core::{Backend, BackendExt, VolumeId};
/// let backend: Arc<dyn Backend> = Arc::new(slacker_backend_mem::MemBackend::new());
/// let image = VolumeId::new("image").unwrap();
/// backend.create_volume_with(&image, &[7u8; 8192]).await.unwrap();
/// let snap = backend.snapshot(&image).await.unwrap();
/// let c = VolumeId::new("c1").unwrap();
/// backend.clone_snapshot(&snap, &c).await.unwrap();
///
/// let cache = Arc::new(BlockCache::new(64 << 20)); // one per worker
/// let v = LazyVolume::open(backend, c, cache, LazyVolumeOptions::default()).await.unwrap();
/// assert_eq!(&v.read_at(4000, 200).await.unwrap()[..], &[7u8; 200][..]);
/// v.write_at(0, b"hi").await.unwrap();
/// assert_eq!(&v.read_at(0, 3).await.unwrap()[..], b"hi\x07");
/// assert_eq!(v.metrics().snapshot_requests, 1); // both blocks in one request
/// # });
/// ```
#[derive(Clone)]
pub struct LazyVolume {
    inner: Arc<Inner>,
}

impl fmt::Debug for LazyVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyVolume")
            .field("target", &self.inner.target)
            .field("size", &self.inner.size)
            .field("block_size", &self.inner.block_size)
            .field("origin", &self.inner.origin.as_ref().map(|o| &o.0))
            .finish_non_exhaustive()
    }
}

type Pieces = Vec<(u32, Bytes)>;
type PieceFuture<'a> = Pin<Box<dyn Future<Output = Result<Pieces>> + Send + 'a>>;

impl LazyVolume {
    /// Opens volume `id` of `backend` for lazy reads through `cache` (reads its size,
    /// origin and diverged bitmap with `stat_volume`).
    ///
    /// # Errors
    /// `NotFound` for an unknown volume; whatever `stat_volume` returns.
    pub async fn open(
        backend: Arc<dyn Backend>,
        id: VolumeId,
        cache: Arc<BlockCache>,
        options: LazyVolumeOptions,
    ) -> Result<Self> {
        let st = backend.stat_volume(&id).await?;
        let origin = st
            .origin
            .map(|s| (cache.image(&s, st.block_size), s))
            .map(|(slot, s)| (s, slot));
        Ok(Self::build(
            backend,
            Target::Volume(id),
            st.size,
            st.block_size,
            origin,
            st.diverged,
            cache,
            options,
        ))
    }

    /// Opens snapshot `id` read-only, through the same cache as its clones (a view of an
    /// image: every block is clean, served from and filled into the cache). Writes fail
    /// with `InvalidInput`.
    ///
    /// # Errors
    /// `NotFound` / `InvalidInput` for an unknown or foreign snapshot id.
    pub async fn open_snapshot(
        backend: Arc<dyn Backend>,
        id: SnapshotId,
        cache: Arc<BlockCache>,
        options: LazyVolumeOptions,
    ) -> Result<Self> {
        let st = backend.stat_snapshot(&id).await?;
        let slot = cache.image(&id, st.block_size);
        Ok(Self::build(
            backend,
            Target::Snapshot,
            st.size,
            st.block_size,
            Some((id, slot)),
            BlockBitmap::new(),
            cache,
            options,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        backend: Arc<dyn Backend>,
        target: Target,
        size: u64,
        block_size: BlockSize,
        origin: Option<(SnapshotId, ImageSlot)>,
        diverged: BlockBitmap,
        cache: Arc<BlockCache>,
        options: LazyVolumeOptions,
    ) -> Self {
        let metrics = options.metrics.clone().unwrap_or_default();
        let prefetch_permits = Arc::new(Semaphore::new(options.prefetch_parallelism.max(1)));
        Self {
            inner: Arc::new(Inner {
                backend,
                target,
                size,
                block_size,
                origin,
                cache,
                diverged: RwLock::new(diverged),
                present: Mutex::new(BlockBitmap::new()),
                options,
                metrics,
                prefetch_permits,
                stream: Mutex::new(Stream::default()),
            }),
        }
    }

    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Block size.
    pub fn block_size(&self) -> BlockSize {
        self.inner.block_size
    }

    /// The volume, or `None` for a snapshot view.
    pub fn volume_id(&self) -> Option<&VolumeId> {
        match &self.inner.target {
            Target::Volume(v) => Some(v),
            Target::Snapshot => None,
        }
    }

    /// The snapshot clean blocks come from (for a snapshot view: itself).
    pub fn origin(&self) -> Option<&SnapshotId> {
        self.inner.origin.as_ref().map(|o| &o.0)
    }

    /// Whether writes are refused (a snapshot view).
    pub fn is_read_only(&self) -> bool {
        matches!(self.inner.target, Target::Snapshot)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The shared cache.
    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.inner.cache
    }

    /// The blocks this handle treats as diverged (read from the volume, never from the
    /// cache): the bitmap at open plus every block written since.
    pub fn diverged(&self) -> BlockBitmap {
        read_lock(&self.inner.diverged).clone()
    }

    /// The present bitmap: every block this handle has served to a reader.
    pub fn present(&self) -> BlockBitmap {
        lock(&self.inner.present).clone()
    }

    /// The present bitmap as block runs: a trace to hand to [`prefetch`](Self::prefetch)
    /// on the next start of the same image.
    pub fn access_trace(&self) -> Vec<BlockRange> {
        lock(&self.inner.present).runs().collect()
    }

    /// The counters (this volume's, or the shared recorder's) and the cache's stats.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.snapshot(self.inner.cache.stats())
    }

    fn max_request_blocks(&self) -> u32 {
        self.blocks_of(self.inner.options.max_request_bytes)
    }

    /// `bytes` in whole blocks (at least one).
    fn blocks_of(&self, bytes: u64) -> u32 {
        let n = bytes / self.inner.block_size.bytes();
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }

    fn block_count(&self) -> u32 {
        (self.inner.size / self.inner.block_size.bytes()) as u32
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// `OutOfRange` past the end; backend errors of the fetches (a failed fetch is not
    /// cached: the next read tries again).
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len as u64, self.inner.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let bs = self.inner.block_size;
        let want = bs.blocks_touched(offset, len as u64);

        // Classify: diverged runs (volume reads) and clean blocks (cache / origin).
        let mut diverged_runs: Vec<BlockRange> = Vec::new();
        let mut clean: Vec<u32> = Vec::new();
        let mut read_ahead: Vec<u32> = Vec::new();
        {
            let d = read_lock(&self.inner.diverged);
            for b in want.iter() {
                if d.contains(b) {
                    match diverged_runs.last_mut() {
                        Some(r) if r.end == b.0 => r.end += 1,
                        _ => diverged_runs.push(BlockRange::new(b.0, b.0 + 1)),
                    }
                } else {
                    clean.push(b.0);
                }
            }
            if !clean.is_empty() && self.inner.origin.is_some() {
                let end = want
                    .end
                    .saturating_add(self.inner.options.read_ahead_blocks)
                    .min(self.block_count());
                read_ahead.extend((want.end..end).take_while(|&b| !d.contains(BlockIndex(b))));
            }
        }

        if self.inner.origin.is_some() {
            if let Some(ahead) = self.plan_stream(want) {
                self.read_ahead_in_background(ahead);
            }
        }

        let mut jobs: Vec<PieceFuture<'_>> = Vec::new();
        let max = self.max_request_blocks();
        for run in &diverged_runs {
            for piece in split(*run, max) {
                jobs.push(Box::pin(self.read_volume_run(piece)));
            }
        }
        if !clean.is_empty() {
            if self.inner.origin.is_some() {
                jobs.push(Box::pin(self.read_clean(clean, read_ahead)));
            } else {
                self.inner.metrics.zeros(clean.len() as u64);
            }
        }

        let mut pieces: Pieces = Vec::with_capacity(want.len() as usize);
        for result in join_all(jobs).await {
            pieces.extend(result?);
        }
        lock(&self.inner.present).insert_range(want);
        self.inner.metrics.read(len as u64);
        Ok(assemble(pieces, want, bs.bytes(), offset, len))
    }

    /// Updates the sequential-stream detector with a read of `want`; returns the blocks
    /// to fetch in the background, if the read continues a stream.
    fn plan_stream(&self, want: BlockRange) -> Option<BlockRange> {
        let max = self.inner.options.max_read_ahead_blocks;
        if max == 0 {
            return None;
        }
        let mut st = lock(&self.inner.stream);
        // Concurrent readers of one stream (loop, FUSE threads) arrive slightly out of
        // order: anything within a window of the stream's end continues it.
        let slack = st.window.max(INITIAL_STREAM_WINDOW);
        let sequential = st.end.is_some_and(|end| {
            want.start <= end.saturating_add(slack) && want.end.saturating_add(slack) >= end
        });
        if !sequential {
            *st = Stream {
                end: Some(want.end),
                window: 0,
                ahead_until: want.end,
            };
            return None;
        }
        st.window = st
            .window
            .saturating_mul(2)
            .clamp(INITIAL_STREAM_WINDOW.min(max), max);
        let end = st.end.unwrap_or(want.end).max(want.end);
        st.end = Some(end);
        // Top up only when the lead over the reader fell under half a window, and then by
        // a whole window: background requests stay window-sized.
        if st.ahead_until >= end.saturating_add(st.window / 2) {
            return None;
        }
        let start = st.ahead_until.max(want.end);
        let target = start.saturating_add(st.window).min(self.block_count());
        if target <= start {
            return None;
        }
        st.ahead_until = target;
        Some(BlockRange::new(start, target))
    }

    /// Fetches the clean, missing blocks of `range` into the cache on a background task
    /// (when called inside a tokio runtime; otherwise not at all). Readers that get there
    /// first join these fetches.
    fn read_ahead_in_background(&self, range: BlockRange) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        rt.spawn(async move {
            let blocks: Vec<u32> = {
                let d = read_lock(&this.inner.diverged);
                range
                    .iter()
                    .filter(|b| !d.contains(*b))
                    .map(|b| b.0)
                    .collect()
            };
            let slot = this.inner.origin.as_ref().expect("checked by caller").1;
            let claims = this.inner.cache.claim_missing(slot, &blocks);
            this.inner.metrics.read_ahead(claims.len() as u64);
            // Errors are not cached; a reader that needs a block fetches it again.
            let _ = this.fetch_claims(claims).await;
        });
    }

    /// Reads a run of diverged blocks from the volume.
    async fn read_volume_run(&self, run: BlockRange) -> Result<Pieces> {
        let Target::Volume(id) = &self.inner.target else {
            return Err(Error::invalid("a snapshot view has no diverged blocks"));
        };
        let bs = self.inner.block_size.bytes();
        let t = Instant::now();
        let data = self
            .inner
            .backend
            .read_at(id, u64::from(run.start) * bs, (run.len() * bs) as usize)
            .await?;
        self.check_len(&data, run)?;
        self.inner
            .metrics
            .fetch(FetchKind::Volume, data.len() as u64, run.len(), t.elapsed());
        Ok(split_blocks(&data, run, bs))
    }

    fn check_len(&self, data: &Bytes, run: BlockRange) -> Result<()> {
        let want = run.len() * self.inner.block_size.bytes();
        if data.len() as u64 != want {
            return Err(Error::Integrity(format!(
                "backend returned {} bytes for a {want}-byte block read",
                data.len()
            )));
        }
        Ok(())
    }

    /// Serves clean blocks through the cache: hits, waits on fetches in flight, and
    /// fetches the rest (with `read_ahead` appended) as coalesced runs.
    async fn read_clean(&self, mut pending: Vec<u32>, read_ahead: Vec<u32>) -> Result<Pieces> {
        let (_, slot) = self.inner.origin.as_ref().expect("checked by caller");
        let cache = &self.inner.cache;
        let m = &self.inner.metrics;
        let mut out: Pieces = Vec::with_capacity(pending.len());
        let mut read_ahead = Some(read_ahead);
        while !pending.is_empty() {
            let optional = read_ahead.take().unwrap_or_default();
            let lookups = cache.lookup_or_claim(*slot, &pending, &optional);
            let mut claims = Vec::new();
            let mut waits = Vec::new();
            let (mut hits, mut misses, mut ahead) = (0, 0, 0);
            for l in lookups {
                match l {
                    Lookup::Hit(b, data) => {
                        hits += 1;
                        out.push((b, data));
                    }
                    Lookup::Wait(b, rx) => waits.push((b, rx)),
                    Lookup::Claimed(c) => {
                        if pending.binary_search(&c.block()).is_ok() {
                            misses += 1;
                        } else {
                            ahead += 1;
                        }
                        claims.push(c);
                    }
                }
            }
            m.hits(hits);
            m.misses(misses);
            m.read_ahead(ahead);
            m.joins(waits.len() as u64);

            // Fetch our claims first (never wait while holding claims: no deadlock).
            let fetched = self.fetch_claims(claims).await;
            for r in fetched {
                let pieces = r?;
                out.extend(
                    pieces
                        .into_iter()
                        .filter(|(b, _)| pending.binary_search(b).is_ok()),
                );
            }
            pending.clear();
            for (b, mut rx) in waits {
                match rx.wait_for(Option::is_some).await {
                    Ok(v) => out.push((b, v.clone().expect("waited for Some"))),
                    // The fetcher failed or was cancelled: look the block up again.
                    Err(_) => pending.push(b),
                }
            }
        }
        Ok(out)
    }

    /// Fetches claimed blocks from the origin, adjacent ones in one request each (at most
    /// `max_request_bytes`), all requests concurrently.
    async fn fetch_claims<'c>(&self, mut claims: Vec<Claim<'c>>) -> Vec<Result<Pieces>> {
        claims.sort_by_key(Claim::block);
        let max = self.max_request_blocks() as usize;
        let mut runs: Vec<Vec<Claim<'c>>> = Vec::new();
        for c in claims {
            match runs.last_mut() {
                Some(run)
                    if run.len() < max && run.last().map(|l| l.block() + 1) == Some(c.block()) =>
                {
                    run.push(c)
                }
                _ => runs.push(vec![c]),
            }
        }
        join_all(runs.into_iter().map(|r| self.fetch_origin_run(r)).collect()).await
    }

    async fn fetch_origin_run(&self, run: Vec<Claim<'_>>) -> Result<Pieces> {
        let (snap, _) = self
            .inner
            .origin
            .as_ref()
            .expect("clean fetch needs an origin");
        let bs = self.inner.block_size.bytes();
        let first = run[0].block();
        let range = BlockRange::new(first, first + run.len() as u32);
        let (off, len) = (u64::from(first) * bs, (range.len() * bs) as usize);
        let t = Instant::now();
        // The tree blocks that verify this run are fetched alongside the data.
        let verifier = self.inner.options.verifier.as_deref();
        let (fetched, prepared) =
            join2(self.inner.backend.read_snapshot_at(snap, off, len), async {
                match verifier {
                    Some(v) => v.prepare(range).await,
                    None => Ok(()),
                }
            })
            .await;
        let data = match fetched {
            Ok(d) => d,
            // The origin snapshot was removed (clones stay readable): by the bitmap
            // invariant the volume's own clean blocks equal it, but only for this volume
            // and only until it writes them. So those bytes are this reader's alone:
            // never put in the snapshot's shared slot, never handed to the readers
            // waiting on our claims (they may be other clones of the snapshot, or read
            // after a write of ours raced with this fetch). Dropping the claims first
            // wakes them to fetch for themselves.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                drop(run);
                let Target::Volume(id) = &self.inner.target else {
                    return Err(e);
                };
                let data = self.inner.backend.read_at(id, off, len).await?;
                self.check_len(&data, range)?;
                if let Some(v) = verifier {
                    // Clean blocks equal the snapshot's (the bitmap invariant), so they
                    // verify against its tree like any fetched block.
                    prepared?;
                    v.verify(first, &data).await?;
                }
                self.inner.metrics.fetch(
                    FetchKind::Volume,
                    data.len() as u64,
                    range.len(),
                    t.elapsed(),
                );
                return Ok(split_blocks(&data, range, bs));
            }
            Err(e) => return Err(e),
        };
        self.check_len(&data, range)?;
        if let Some(v) = verifier {
            // Not served, not cached unless it matches the root (the claims are dropped on
            // error: waiters retry and fail the same way).
            prepared?;
            v.verify(first, &data).await?;
        }
        self.inner.metrics.fetch(
            FetchKind::Snapshot,
            data.len() as u64,
            range.len(),
            t.elapsed(),
        );
        let pieces = split_blocks(&data, range, bs);
        self.inner
            .cache
            .fill(run.into_iter().zip(pieces.iter().map(|(_, d)| d.clone())));
        Ok(pieces)
    }

    /// Writes `data` at `offset`. The touched blocks join the diverged bitmap before the
    /// backend write; the call returns (acknowledges) only after the backend's `write_at`
    /// did.
    ///
    /// # Errors
    /// `InvalidInput` for a snapshot view; `OutOfRange` past the end; backend errors.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let Target::Volume(id) = &self.inner.target else {
            return Err(Error::invalid(
                "a snapshot view is read-only: clone the snapshot to write",
            ));
        };
        check_range(offset, data.len() as u64, self.inner.size)?;
        if data.is_empty() {
            return Ok(());
        }
        let blocks = self
            .inner
            .block_size
            .blocks_touched(offset, data.len() as u64);
        write_lock(&self.inner.diverged).insert_range(blocks);
        self.inner.backend.write_at(id, offset, data).await?;
        self.inner.metrics.write(data.len() as u64);
        Ok(())
    }

    /// Makes acknowledged writes durable (the backend's `flush`); a no-op for a snapshot
    /// view.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn flush(&self) -> Result<()> {
        if let Target::Volume(id) = &self.inner.target {
            self.inner.backend.flush(id).await?;
        }
        self.inner.metrics.flush();
        Ok(())
    }

    /// Fetches the clean blocks of `ranges` into the shared cache in the background, with
    /// at most [`prefetch_parallelism`](LazyVolumeOptions::prefetch_parallelism) backend
    /// requests in flight (per volume handle), each of at most
    /// [`prefetch_request_bytes`](LazyVolumeOptions::prefetch_request_bytes). Reads racing
    /// with it join its fetches instead of repeating them; a read that misses a block the
    /// prefetch has not sent yet fetches it itself, without waiting for a permit, and its
    /// request follows at most the prefetch's requests in flight. Must be called inside a
    /// tokio runtime (it spawns).
    pub fn prefetch(
        &self,
        ranges: impl IntoIterator<Item = BlockRange>,
    ) -> tokio::task::JoinHandle<Result<PrefetchReport>> {
        let this = self.clone();
        let ranges: Vec<BlockRange> = ranges.into_iter().collect();
        tokio::spawn(async move { this.prefetch_now(ranges).await })
    }

    /// As [`prefetch`](Self::prefetch), but waits for the fetches to finish.
    ///
    /// # Errors
    /// The first backend error of a fetch (the other fetches still complete).
    pub async fn prefetch_now(
        &self,
        ranges: impl IntoIterator<Item = BlockRange>,
    ) -> Result<PrefetchReport> {
        let nblocks = self.block_count();
        let mut report = PrefetchReport::default();
        let mut wanted = BlockBitmap::new();
        for r in ranges {
            wanted.insert_range(BlockRange::new(r.start.min(nblocks), r.end.min(nblocks)));
        }
        report.blocks_requested = wanted.len();
        if self.inner.origin.is_none() {
            report.blocks_skipped = wanted.len();
            return Ok(report);
        }
        let clean = wanted.difference(&read_lock(&self.inner.diverged));
        // Small requests, so demand misses are never queued far behind the prefetch.
        let max = self
            .blocks_of(self.inner.options.prefetch_request_bytes)
            .min(self.max_request_blocks());
        let mut tasks = JoinSet::new();
        for run in clean.runs() {
            for piece in split(run, max) {
                let this = self.clone();
                let permits = Arc::clone(&self.inner.prefetch_permits);
                tasks.spawn(async move {
                    let _permit = permits.acquire_owned().await.expect("never closed");
                    let blocks: Vec<u32> = (piece.start..piece.end).collect();
                    let slot = this.inner.origin.as_ref().expect("checked above").1;
                    let claims = this.inner.cache.claim_missing(slot, &blocks);
                    let n = claims.len() as u64;
                    let results = this.fetch_claims(claims).await;
                    let requests = results.len() as u64;
                    results.into_iter().collect::<Result<Vec<_>>>()?;
                    this.inner.metrics.prefetched(n);
                    Ok::<_, Error>((n, requests))
                });
            }
        }
        let mut first_err = None;
        let mut fetched = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok((n, requests))) => {
                    fetched += n;
                    report.requests += requests;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(join) => {
                    first_err.get_or_insert(Error::backend("worker", join));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        report.blocks_fetched = fetched;
        report.blocks_skipped = report.blocks_requested - fetched;
        Ok(report)
    }
}

/// The bytes `offset..offset + len` from the blocks of `want` (`pieces`: some of them, in
/// any order; missing blocks read as zeros). One block is sliced without a copy.
fn assemble(mut pieces: Pieces, want: BlockRange, bs: u64, offset: u64, len: usize) -> Bytes {
    let end = offset + len as u64;
    let part = |b: u32| {
        let start = u64::from(b) * bs;
        let lo = offset.max(start) - start;
        let hi = end.min(start + bs) - start;
        (lo as usize, hi as usize)
    };
    if want.len() == 1 && pieces.len() == 1 {
        let (b, data) = pieces.pop().expect("one piece");
        let (lo, hi) = part(b);
        return data.slice(lo..hi);
    }
    pieces.sort_unstable_by_key(|p| p.0);
    let mut out = BytesMut::with_capacity(len);
    let mut it = pieces.into_iter().peekable();
    for b in want.start..want.end {
        let (lo, hi) = part(b);
        match it.next_if(|p| p.0 == b) {
            Some((_, data)) => out.extend_from_slice(&data[lo..hi]),
            None => out.resize(out.len() + (hi - lo), 0),
        }
    }
    out.freeze()
}

/// Polls both futures until both finish (core has no futures crate).
async fn join2<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (Box::pin(a), Box::pin(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    (ra.expect("ready"), rb.expect("ready"))
}

/// Splits `run` into pieces of at most `max` blocks.
fn split(run: BlockRange, max: u32) -> impl Iterator<Item = BlockRange> {
    let max = max.max(1);
    (run.start..run.end)
        .step_by(max as usize)
        .map(move |s| BlockRange::new(s, s.saturating_add(max).min(run.end)))
}

/// Cuts the data of `run` into its blocks (zero-copy).
fn split_blocks(data: &Bytes, run: BlockRange, bs: u64) -> Pieces {
    let bs = bs as usize;
    run.iter()
        .enumerate()
        .map(|(i, b)| (b.0, data.slice(i * bs..(i + 1) * bs)))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
