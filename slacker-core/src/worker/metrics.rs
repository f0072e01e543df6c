//! [`Metrics`]: what the worker data path fetched, served and evicted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cache::CacheStats;

const BUCKETS: usize = 28;

/// Live counters of one or more [`LazyVolume`](super::LazyVolume)s (atomics; cheap to
/// update from many tasks). Share one recorder between volumes through
/// [`LazyVolumeOptions::with_metrics`](super::LazyVolumeOptions::with_metrics) to count a
/// whole worker; read it with [`snapshot`](Self::snapshot).
#[derive(Debug, Default)]
pub struct MetricsRecorder {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    backend_requests: AtomicU64,
    fetched_bytes: AtomicU64,
    fetched_blocks: AtomicU64,
    snapshot_requests: AtomicU64,
    volume_requests: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    in_flight_joins: AtomicU64,
    read_ahead_blocks: AtomicU64,
    prefetched_blocks: AtomicU64,
    zero_blocks: AtomicU64,
    fetch_latency_total_us: AtomicU64,
    fetch_latency_count: AtomicU64,
    fetch_latency_buckets: [AtomicU64; BUCKETS],
}

/// Which backend call a fetch used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FetchKind {
    /// `read_snapshot_at` of the origin (clean blocks, through the shared cache).
    Snapshot,
    /// `read_at` of the volume (diverged blocks, or a fallback).
    Volume,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl MetricsRecorder {
    /// A recorder with every counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn read(&self, bytes: u64) {
        add(&self.reads, 1);
        add(&self.read_bytes, bytes);
    }

    pub(crate) fn write(&self, bytes: u64) {
        add(&self.writes, 1);
        add(&self.written_bytes, bytes);
    }

    pub(crate) fn flush(&self) {
        add(&self.flushes, 1);
    }

    pub(crate) fn fetch(&self, kind: FetchKind, bytes: u64, blocks: u64, latency: Duration) {
        add(&self.backend_requests, 1);
        add(&self.fetched_bytes, bytes);
        add(&self.fetched_blocks, blocks);
        add(
            match kind {
                FetchKind::Snapshot => &self.snapshot_requests,
                FetchKind::Volume => &self.volume_requests,
            },
            1,
        );
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        add(&self.fetch_latency_total_us, us);
        add(&self.fetch_latency_count, 1);
        add(&self.fetch_latency_buckets[bucket_of(us)], 1);
    }

    pub(crate) fn hits(&self, n: u64) {
        add(&self.cache_hits, n);
    }

    pub(crate) fn misses(&self, n: u64) {
        add(&self.cache_misses, n);
    }

    pub(crate) fn joins(&self, n: u64) {
        add(&self.in_flight_joins, n);
    }

    pub(crate) fn read_ahead(&self, n: u64) {
        add(&self.read_ahead_blocks, n);
    }

    pub(crate) fn prefetched(&self, n: u64) {
        add(&self.prefetched_blocks, n);
    }

    pub(crate) fn zeros(&self, n: u64) {
        add(&self.zero_blocks, n);
    }

    /// The counters now, with `cache` (the stats of the cache the volumes share).
    pub fn snapshot(&self, cache: CacheStats) -> Metrics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let fetch_latency_histogram_us = self
            .fetch_latency_buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| g(c) > 0)
            .map(|(i, c)| (bucket_upper_us(i), g(c)))
            .collect();
        Metrics {
            reads: g(&self.reads),
            read_bytes: g(&self.read_bytes),
            writes: g(&self.writes),
            written_bytes: g(&self.written_bytes),
            flushes: g(&self.flushes),
            backend_requests: g(&self.backend_requests),
            fetched_bytes: g(&self.fetched_bytes),
            fetched_blocks: g(&self.fetched_blocks),
            snapshot_requests: g(&self.snapshot_requests),
            volume_requests: g(&self.volume_requests),
            cache_hits: g(&self.cache_hits),
            cache_misses: g(&self.cache_misses),
            in_flight_joins: g(&self.in_flight_joins),
            read_ahead_blocks: g(&self.read_ahead_blocks),
            prefetched_blocks: g(&self.prefetched_blocks),
            zero_blocks: g(&self.zero_blocks),
            fetch_latency_total_us: g(&self.fetch_latency_total_us),
            fetch_latency_count: g(&self.fetch_latency_count),
            fetch_latency_histogram_us,
            cache,
        }
    }
}

/// Bucket `i` holds latencies in `[2^(i-1), 2^i)` µs (bucket 0: under 1 µs); the last
/// bucket holds everything longer.
fn bucket_of(us: u64) -> usize {
    ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1)
}

fn bucket_upper_us(i: usize) -> u64 {
    if i == BUCKETS - 1 {
        u64::MAX
    } else {
        1u64 << i
    }
}

/// A snapshot of the worker data path's counters: what a runtime reads to report, and
/// what benchmarks print (serde: JSON a program can read).
///
/// "Fetched" always means *received from the backend* (the network, in a deployment):
/// clean blocks through the shared cache's origin-snapshot fetches plus diverged blocks
/// read from the volume. Writes are counted apart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Metrics {
    /// `read_at` calls served.
    pub reads: u64,
    /// Bytes returned to callers of `read_at`.
    pub read_bytes: u64,
    /// `write_at` calls acknowledged.
    pub writes: u64,
    /// Bytes written (sent to the backend's `write_at`).
    pub written_bytes: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// Data requests sent to the backend (`read_snapshot_at` + `read_at`).
    pub backend_requests: u64,
    /// Bytes received from the backend.
    pub fetched_bytes: u64,
    /// Blocks received from the backend.
    pub fetched_blocks: u64,
    /// Of `backend_requests`: origin-snapshot fetches (`read_snapshot_at`).
    pub snapshot_requests: u64,
    /// Of `backend_requests`: volume reads (`read_at`, diverged blocks).
    pub volume_requests: u64,
    /// Clean blocks a read found in the shared cache.
    pub cache_hits: u64,
    /// Clean blocks a read had to fetch itself.
    pub cache_misses: u64,
    /// Clean blocks a read waited for because another reader was already fetching them.
    pub in_flight_joins: u64,
    /// Blocks fetched by read-ahead beyond what a read asked for (synchronous, with the
    /// read, and sequential, in the background).
    pub read_ahead_blocks: u64,
    /// Blocks fetched by [`prefetch`](super::LazyVolume::prefetch).
    pub prefetched_blocks: u64,
    /// Clean blocks of a volume without origin, served as zeros without a fetch.
    pub zero_blocks: u64,
    /// Sum of backend fetch latencies, in µs.
    pub fetch_latency_total_us: u64,
    /// Number of backend fetches timed.
    pub fetch_latency_count: u64,
    /// Fetch latency histogram: `(upper bound in µs, exclusive; count)`, non-empty
    /// power-of-two buckets only.
    pub fetch_latency_histogram_us: Vec<(u64, u64)>,
    /// The shared cache's occupancy and counters.
    pub cache: CacheStats,
}

impl Metrics {
    /// Mean backend fetch latency, if anything was fetched.
    pub fn mean_fetch_latency(&self) -> Option<Duration> {
        (self.fetch_latency_count > 0)
            .then(|| Duration::from_micros(self.fetch_latency_total_us / self.fetch_latency_count))
    }

    /// Share of clean-block lookups served by the cache (hits / (hits + misses + joins)).
    pub fn hit_ratio(&self) -> Option<f64> {
        let all = self.cache_hits + self.cache_misses + self.in_flight_joins;
        (all > 0).then(|| self.cache_hits as f64 / all as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(1000), 10);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        let r = MetricsRecorder::new();
        r.fetch(FetchKind::Snapshot, 4096, 1, Duration::from_micros(1500));
        r.fetch(FetchKind::Volume, 8192, 2, Duration::from_micros(500));
        let m = r.snapshot(CacheStats::default());
        assert_eq!(m.backend_requests, 2);
        assert_eq!(m.fetched_bytes, 12288);
        assert_eq!(m.fetch_latency_histogram_us, vec![(512, 1), (2048, 1)]);
        assert_eq!(m.mean_fetch_latency(), Some(Duration::from_micros(1000)));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"fetched_bytes\":12288"));
    }
}
