//! The worker data path: lazy block fetch and a block cache shared by the clones of a
//! snapshot.
//!
//! ```text
//!  reader (FUSE disk.img, loop, ext4)
//!        │ read_at / write_at
//!        ▼
//!  LazyVolume ── diverged block? ──yes──▶ backend.read_at(volume)        (never cached)
//!        │ no (clean: reads as the origin snapshot, by the bitmap invariant)
//!        ▼
//!  BlockCache (one per worker, keyed by snapshot) ── miss ──▶ backend.read_snapshot_at(origin)
//!        hit / join a fetch in flight                         (adjacent misses + read-ahead
//!                                                              coalesced into one request)
//! ```
//!
//! - [`LazyVolume`]: a volume (or a read-only snapshot view) whose blocks are fetched on
//!   first read; writes go to the backend, updating the diverged bitmap before they are
//!   acknowledged; [`LazyVolume::prefetch`] replays a recorded startup trace with bounded
//!   parallelism.
//! - [`BlockCache`]: bounded (bytes), CLOCK eviction, shared by every clone of a
//!   snapshot on the worker; also deduplicates fetches in flight.
//! - [`Metrics`]: bytes, blocks and requests fetched, hits, misses, evictions, fetch latency
//!   (serde, for runtimes and benchmarks).
//! - [`Throttled`]: a backend behind an emulated link (latency + shared bandwidth), for
//!   examples and benchmarks; [`Counting`]: a backend wrapper that counts what reaches
//!   the backend, for tests.
//!
//! Everything here is async and non-blocking (no thread is parked on IO; locks are held
//! only for in-memory bookkeeping, never across an await). Blocking work, such as the
//! FUSE callbacks in `slacker-fuse` that call into a `LazyVolume`, runs on threads of its
//! own that `block_on` a runtime handle, or under `tokio::task::spawn_blocking`.

mod cache;
mod counting;
mod lazy;
mod link;
mod metrics;

pub use cache::{BlockCache, CacheStats};
pub use counting::{BackendCounts, Counting};
pub use lazy::{LazyVolume, LazyVolumeOptions, PrefetchReport};
pub use link::{LinkProfile, Throttled};
pub use metrics::{Metrics, MetricsRecorder};

/// Polls every future until all finish; outputs in input order. (A tiny `join_all`, so
/// core needs no futures crate.)
pub(crate) async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, o) in futs.iter_mut().zip(outs.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter().map(|o| o.expect("all ready")).collect()
}
