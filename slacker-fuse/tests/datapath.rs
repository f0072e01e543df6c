//! Tests of the worker data path (`slacker_core::worker`): sharing across clones,
//! in-flight dedup, coalescing, read-ahead, prefetch, writes, and a model-based property
//! test under eviction pressure. No root needed.
//!
//! They live here rather than in `slacker-core` because they drive the mem backend, which
//! `slacker-core`'s own unit tests cannot use as a `Backend` (it links the non-test build
//! of core).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use slacker_backend_mem::MemBackend;

use slacker_core::worker::{
    BlockCache, Counting, LazyVolume, LazyVolumeOptions, LinkProfile, Throttled,
};
use slacker_core::{
    Backend, BackendExt, BlockIndex, BlockRange, BlockSize, ErrorKind, SnapshotId, VolumeId,
    VolumeOptions,
};
use slacker_testkit::checks::noise;

const BS: u64 = 4096;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An image volume of `size` bytes with `pattern` content, snapshotted; returns the
/// snapshot and the content.
async fn image(b: &dyn Backend, size: u64, seed: u64) -> (SnapshotId, Vec<u8>) {
    let content = noise(size as usize, seed);
    let v = vid(&format!("image-{seed}"));
    b.create_volume(&v, &VolumeOptions::new(size))
        .await
        .unwrap();
    b.write_at(&v, 0, &content).await.unwrap();
    (b.snapshot(&v).await.unwrap(), content)
}

async fn clone_of(b: &dyn Backend, s: &SnapshotId, name: &str) -> VolumeId {
    let v = vid(name);
    b.clone_snapshot(s, &v).await.unwrap();
    v
}

/// A startup read set: scattered small and medium reads, as a process start does.
fn startup_set(size: u64) -> Vec<(u64, usize)> {
    let mut set = Vec::new();
    let mut off = 12_345u64;
    for i in 0..200u64 {
        let len = [512usize, 4096, 3000, 65536, 131_072][(i % 5) as usize];
        if off + len as u64 > size {
            off = (off * 7) % (size / 2);
        }
        set.push((off, len));
        off += 97 * BS + (i * 1237) % BS;
    }
    set
}

#[test]
fn two_containers_of_one_image_share_the_worker_cache() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(MemBackend::new()));
        let backend: Arc<dyn Backend> = counting.clone();
        let size = 64 << 20;
        let (snap, content) = image(&*backend, size, 1).await;
        let c1 = clone_of(&*backend, &snap, "c1").await;
        let c2 = clone_of(&*backend, &snap, "c2").await;
        let cache = Arc::new(BlockCache::new(256 << 20));
        let opts = LazyVolumeOptions::default();
        let v1 = LazyVolume::open(backend.clone(), c1, cache.clone(), opts.clone())
            .await
            .unwrap();
        let v2 = LazyVolume::open(backend.clone(), c2.clone(), cache.clone(), opts.clone())
            .await
            .unwrap();

        let set = startup_set(size);
        counting.reset();
        for &(off, len) in &set {
            let got = v1.read_at(off, len).await.unwrap();
            assert_eq!(
                &got[..],
                &content[off as usize..off as usize + len],
                "v1 {off}+{len}"
            );
        }
        let first = counting.counts().bytes_read();
        counting.reset();
        for &(off, len) in &set {
            let got = v2.read_at(off, len).await.unwrap();
            assert_eq!(
                &got[..],
                &content[off as usize..off as usize + len],
                "v2 {off}+{len}"
            );
        }
        let second = counting.counts().bytes_read();
        let read: u64 = set.iter().map(|s| s.1 as u64).sum();
        eprintln!("startup set {read} B: first container fetched {first} B, second {second} B");
        assert!(
            first >= read / 2,
            "the first container really fetched ({first})"
        );
        assert!(
            second * 100 <= first,
            "second fetched {second} B > 1% of {first} B"
        );
        assert_eq!(v2.metrics().cache_misses, 0);

        // A write in one never shows in the other.
        let (woff, wlen) = set[3];
        let new = vec![0xEEu8; wlen];
        v1.write_at(woff, &new).await.unwrap();
        assert_eq!(&v1.read_at(woff, wlen).await.unwrap()[..], &new[..]);
        let orig = &content[woff as usize..woff as usize + wlen];
        assert_eq!(&v2.read_at(woff, wlen).await.unwrap()[..], orig);
        let v2b = LazyVolume::open(backend.clone(), c2, cache.clone(), opts)
            .await
            .unwrap();
        assert_eq!(&v2b.read_at(woff, wlen).await.unwrap()[..], orig);
        assert_eq!(
            &backend.read_snapshot_at(&snap, woff, wlen).await.unwrap()[..],
            orig
        );
        // The written blocks are diverged: served from the volume, not the cache.
        let before = counting.counts().volume_reads;
        v1.read_at(woff, wlen).await.unwrap();
        assert_eq!(counting.counts().volume_reads, before + 1);
    });
}

#[test]
fn many_concurrent_readers_of_one_cold_block_cause_one_fetch() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(Duration::from_millis(30)),
        )));
        let backend: Arc<dyn Backend> = counting.clone();
        let (snap, content) = image(&*backend, 1 << 20, 2).await;
        let cache = Arc::new(BlockCache::new(1 << 20));
        let opts = LazyVolumeOptions::default()
            .with_read_ahead(0)
            .with_max_read_ahead(0);
        let mut vols = Vec::new();
        for i in 0..4 {
            let c = clone_of(&*backend, &snap, &format!("c{i}")).await;
            vols.push(
                LazyVolume::open(backend.clone(), c, cache.clone(), opts.clone())
                    .await
                    .unwrap(),
            );
        }
        counting.reset();
        let block = 37u64;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64 {
            let v = vols[i % vols.len()].clone();
            let off = block * BS + (i as u64 * 61) % 4000;
            tasks.spawn(async move { (off, v.read_at(off, 64).await.unwrap()) });
        }
        while let Some(r) = tasks.join_next().await {
            let (off, got) = r.unwrap();
            assert_eq!(&got[..], &content[off as usize..off as usize + 64]);
        }
        let counts = counting.counts();
        assert_eq!(counts.snapshot_reads, 1, "{counts:?}");
        assert_eq!(counts.snapshot_read_bytes, BS);
        assert_eq!(counts.volume_reads, 0);
        let joins: u64 = vols.iter().map(|v| v.metrics().in_flight_joins).sum();
        assert!(joins >= 1, "readers joined the fetch in flight");
    });
}

#[test]
fn an_abandoned_fetch_wakes_its_waiters_who_fetch_again() {
    rt().block_on(async {
        // A slow link (1 s per request) so that the leader's fetch is still in flight when
        // it is abandoned, however loaded the machine: the test waits for states, it never
        // races a timer against the link.
        let counting = Arc::new(Counting::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(Duration::from_secs(1)),
        )));
        let backend: Arc<dyn Backend> = counting.clone();
        let (snap, content) = image(&*backend, 1 << 20, 3).await;
        let cache = Arc::new(BlockCache::new(1 << 20));
        let c = clone_of(&*backend, &snap, "c").await;
        let v = LazyVolume::open(
            backend.clone(),
            c,
            cache.clone(),
            LazyVolumeOptions::default(),
        )
        .await
        .unwrap();
        let leader = v.clone();
        let leader = tokio::spawn(async move { leader.read_at(0, 10).await });
        while cache.stats().in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let w = v.clone();
        let waiter = tokio::spawn(async move { w.read_at(0, 10).await });
        while v.metrics().in_flight_joins == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The leader goes away with its fetch in flight (a reader killed mid-read).
        leader.abort();
        assert!(
            leader.await.unwrap_err().is_cancelled(),
            "the leader was abandoned before its fetch returned"
        );
        // A waiter left waiting on the abandoned fetch would hang: 30 s (30 link round
        // trips) turns that into a failure.
        let got = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the waiter was woken and fetched the block itself")
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &content[..10]);
        assert_eq!(cache.stats().in_flight, 0);
    });
}

#[test]
fn adjacent_misses_coalesce_and_read_ahead_extends_them() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(MemBackend::new()));
        let backend: Arc<dyn Backend> = counting.clone();
        let (snap, content) = image(&*backend, 4 << 20, 4).await;
        let c = clone_of(&*backend, &snap, "c").await;
        let cache = Arc::new(BlockCache::new(64 << 20));
        let opts = LazyVolumeOptions::default()
            .with_read_ahead(8)
            .with_max_read_ahead(0)
            .with_max_request_bytes(16 * BS);
        let v = LazyVolume::open(backend.clone(), c, cache, opts)
            .await
            .unwrap();
        counting.reset();
        // One cold block: one request of 1 + 8 read-ahead blocks.
        v.read_at(100 * BS + 5, 10).await.unwrap();
        assert_eq!(counting.counts().snapshot_reads, 1);
        assert_eq!(counting.counts().snapshot_read_bytes, 9 * BS);
        // The read-ahead blocks are hits.
        let got = v.read_at(101 * BS, 8 * BS as usize).await.unwrap();
        assert_eq!(&got[..], &content[(101 * BS) as usize..(109 * BS) as usize]);
        assert_eq!(counting.counts().snapshot_reads, 1);
        // 40 cold blocks (+8 read-ahead) with 16-block requests: 3 requests.
        counting.reset();
        let got = v.read_at(200 * BS, 40 * BS as usize).await.unwrap();
        assert_eq!(&got[..], &content[(200 * BS) as usize..(240 * BS) as usize]);
        assert_eq!(counting.counts().snapshot_reads, 3);
        assert_eq!(counting.counts().snapshot_read_bytes, 48 * BS);
        let m = v.metrics();
        assert_eq!(m.read_ahead_blocks, 16);
        assert_eq!(m.fetched_bytes, (9 + 48) * BS);
        assert!(m.cache_hits >= 8);
        // A read mixing diverged and clean blocks: the diverged run comes from the volume.
        v.write_at(300 * BS, &[1u8; BS as usize]).await.unwrap();
        counting.reset();
        let got = v.read_at(299 * BS, 3 * BS as usize).await.unwrap();
        assert_eq!(
            &got[..BS as usize],
            &content[(299 * BS) as usize..(300 * BS) as usize]
        );
        assert_eq!(&got[BS as usize..2 * BS as usize], &[1u8; BS as usize][..]);
        assert_eq!(
            &got[2 * BS as usize..],
            &content[(301 * BS) as usize..(302 * BS) as usize]
        );
        let counts = counting.counts();
        assert_eq!((counts.volume_reads, counts.volume_read_bytes), (1, BS));
        // 299 misses alone, 301 misses with read-ahead: two runs, two requests.
        assert_eq!(counts.snapshot_reads, 2);
    });
}

#[test]
fn sequential_reads_grow_a_background_read_ahead_window() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(Duration::from_millis(2)),
        )));
        let backend: Arc<dyn Backend> = counting.clone();
        let size = 8 << 20;
        let (snap, content) = image(&*backend, size, 8).await;
        let c = clone_of(&*backend, &snap, "c").await;
        let cache = Arc::new(BlockCache::new(64 << 20));
        let opts = LazyVolumeOptions::default().with_max_read_ahead(64);
        let v = LazyVolume::open(backend.clone(), c, cache, opts)
            .await
            .unwrap();
        counting.reset();
        let chunk = 16 * BS as usize;
        let mut off = 0;
        while off < size {
            let got = v.read_at(off, chunk).await.unwrap();
            assert!(
                got[..] == content[off as usize..off as usize + chunk],
                "at {off}"
            );
            off += chunk as u64;
        }
        let m = v.metrics();
        let counts = counting.counts();
        eprintln!("{} reads: {m:?} {counts:?}", size / chunk as u64);
        // The reader mostly finds blocks cached or in flight: far fewer reads missed
        // than were made, and nothing was fetched twice.
        assert!(m.read_ahead_blocks > size / BS / 2, "{m:?}");
        assert!(m.cache_misses < size / BS / 2, "{m:?}");
        assert!(counts.snapshot_read_bytes <= size + 64 * BS, "{counts:?}");
        // A read elsewhere resets the window: a random read fetches little.
        counting.reset();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fresh = Arc::new(BlockCache::new(64 << 20));
        let c2 = clone_of(&*backend, &snap, "c2").await;
        let v2 = LazyVolume::open(backend.clone(), c2, fresh, LazyVolumeOptions::default())
            .await
            .unwrap();
        counting.reset();
        v2.read_at(3 << 20, 4096).await.unwrap();
        v2.read_at(1 << 20, 4096).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(counting.counts().snapshot_read_bytes, 2 * 5 * BS);
    });
}

#[test]
fn prefetch_of_a_recorded_trace_makes_the_next_start_fetch_nothing() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(Duration::from_millis(5)),
        )));
        let backend: Arc<dyn Backend> = counting.clone();
        let size = 16 << 20;
        let (snap, content) = image(&*backend, size, 5).await;
        let set = startup_set(size);
        // First start on worker A records the trace.
        let a = Arc::new(BlockCache::new(64 << 20));
        let c1 = clone_of(&*backend, &snap, "c1").await;
        let v1 = LazyVolume::open(
            backend.clone(),
            c1,
            a,
            LazyVolumeOptions::default().with_read_ahead(0),
        )
        .await
        .unwrap();
        for &(off, len) in &set {
            v1.read_at(off, len).await.unwrap();
        }
        let trace = v1.access_trace();
        assert!(trace.len() > 10);
        // Worker B prefetches the trace (bounded parallelism), then starts: no fetch.
        let b = Arc::new(BlockCache::new(64 << 20));
        let c2 = clone_of(&*backend, &snap, "c2").await;
        let opts = LazyVolumeOptions::default()
            .with_prefetch_parallelism(3)
            .with_max_read_ahead(0)
            .with_max_request_bytes(8 * BS);
        let v2 = LazyVolume::open(backend.clone(), c2, b, opts)
            .await
            .unwrap();
        counting.reset();
        let report = v2.prefetch(trace.clone()).await.unwrap().unwrap();
        let traced: u64 = trace.iter().map(BlockRange::len).sum();
        assert_eq!(report.blocks_requested, traced);
        assert_eq!(report.blocks_fetched, traced);
        let counts = counting.counts();
        assert!(counts.peak_concurrent_reads <= 3, "{counts:?}");
        assert!(
            counts.peak_concurrent_reads >= 2,
            "prefetch ran in parallel: {counts:?}"
        );
        counting.reset();
        for &(off, len) in &set {
            let got = v2.read_at(off, len).await.unwrap();
            assert_eq!(&got[..], &content[off as usize..off as usize + len]);
        }
        assert_eq!(counting.counts().bytes_read(), 0);
        // Prefetching again fetches nothing.
        let again = v2.prefetch_now(trace).await.unwrap();
        assert_eq!((again.blocks_fetched, again.requests), (0, 0));
    });
}

/// A demand miss during a trace prefetch waits behind at most the prefetch's requests in
/// flight (parallelism x `prefetch_request_bytes`), not behind the whole trace: the
/// prefetch goes out in small requests, so the link is never reserved far ahead. Shown by
/// the bytes the backend had served when the demand read returned (the link is FIFO per
/// request), not by timing. With prefetch requests as large as `max_request_bytes`
/// (4 MiB), the demand read waited for all 16 MiB of the trace.
#[test]
fn a_demand_miss_is_not_queued_behind_the_whole_prefetch() {
    rt().block_on(async {
        // 100 Mbit/s: a 256 KiB request occupies the link for ~21 ms.
        let counting = Arc::new(Counting::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::new(Duration::from_micros(200), 100_000_000),
        )));
        let backend: Arc<dyn Backend> = counting.clone();
        let size = 32 << 20;
        let (snap, content) = image(&*backend, size, 9).await;
        let c = clone_of(&*backend, &snap, "c").await;
        let opts = LazyVolumeOptions::default()
            .with_read_ahead(0)
            .with_max_read_ahead(0);
        let parallelism = opts.prefetch_parallelism as u64;
        let chunk = opts.prefetch_request_bytes;
        let v = LazyVolume::open(
            backend.clone(),
            c,
            Arc::new(BlockCache::new(64 << 20)),
            opts,
        )
        .await
        .unwrap();
        counting.reset();
        let traced = BlockRange::new(0, ((16 << 20) / BS) as u32);
        let prefetch = v.prefetch([traced]);
        // Wait until the prefetch has its requests on the link.
        while counting.counts().peak_concurrent_reads < parallelism {
            tokio::task::yield_now().await;
        }
        // A block outside the trace: a demand miss of its own.
        let at = 24u64 << 20;
        let got = v.read_at(at, 4096).await.unwrap();
        let served = counting.counts().snapshot_read_bytes;
        assert_eq!(&got[..], &content[at as usize..at as usize + 4096]);
        eprintln!(
            "the demand read returned after {} KiB of the 16 MiB trace had crossed the link",
            (served - 4096) >> 10
        );
        assert!(
            served <= (parallelism + 1) * chunk + 4096 && served < (16 << 20) / 4,
            "the demand miss waited behind {served} B of prefetch"
        );
        let report = prefetch.await.unwrap().unwrap();
        assert_eq!(report.blocks_fetched, traced.len());
        // The prefetched blocks are right, and cached.
        counting.reset();
        for off in [0u64, 5 << 20, (16 << 20) - 4096] {
            let got = v.read_at(off, 4096).await.unwrap();
            assert_eq!(&got[..], &content[off as usize..off as usize + 4096]);
        }
        assert_eq!(counting.counts().bytes_read(), 0);
    });
}

#[test]
fn volumes_without_origin_snapshot_views_and_removed_origins() {
    rt().block_on(async {
        let counting = Arc::new(Counting::new(MemBackend::new()));
        let backend: Arc<dyn Backend> = counting.clone();
        let cache = Arc::new(BlockCache::new(1 << 20));
        // No origin: clean blocks are zeros, no fetch.
        let plain = vid("plain");
        backend
            .create_volume(&plain, &VolumeOptions::new(1 << 20))
            .await
            .unwrap();
        backend.write_at(&plain, 5 * BS, b"data").await.unwrap();
        let v = LazyVolume::open(
            backend.clone(),
            plain,
            cache.clone(),
            LazyVolumeOptions::default(),
        )
        .await
        .unwrap();
        counting.reset();
        assert_eq!(&v.read_at(0, 100).await.unwrap()[..], &[0u8; 100][..]);
        assert_eq!(counting.counts().bytes_read(), 0);
        assert_eq!(&v.read_at(5 * BS, 4).await.unwrap()[..], b"data");
        assert_eq!(v.metrics().zero_blocks, 1);
        assert_eq!(
            v.read_at((1 << 20) - 1, 2).await.unwrap_err().kind(),
            ErrorKind::OutOfRange
        );

        // A snapshot view: reads through the cache, refuses writes.
        let (snap, content) = image(&*backend, 1 << 20, 6).await;
        let view = LazyVolume::open_snapshot(
            backend.clone(),
            snap.clone(),
            cache.clone(),
            LazyVolumeOptions::default(),
        )
        .await
        .unwrap();
        assert!(view.is_read_only());
        assert_eq!(&view.read_at(7, 9000).await.unwrap()[..], &content[7..9007]);
        assert!(cache.contains(&snap, BlockSize::DEFAULT, BlockIndex(1)));
        assert_eq!(
            view.write_at(0, b"x").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );

        // The origin snapshot is removed: the clone still reads (from itself).
        let c = clone_of(&*backend, &snap, "orphan").await;
        backend.remove_snapshot(&snap).await.unwrap();
        let fresh = Arc::new(BlockCache::new(1 << 20));
        let v = LazyVolume::open(
            backend.clone(),
            c,
            fresh.clone(),
            LazyVolumeOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            &v.read_at(100_000, 5000).await.unwrap()[..],
            &content[100_000..105_000]
        );
        assert_eq!(
            fresh.stats().resident_blocks,
            0,
            "fallback reads are not cached"
        );
    });
}

/// Issue 13: after the origin snapshot is removed, a clone's reader falls back to its own
/// volume. Those bytes are that clone's, not the snapshot's: they must never reach another
/// clone's reader waiting on the same shared cache slot. Here clone A's reader claims
/// block 0 (slow link), A then writes block 0, and B's reader joins the claim in flight;
/// B must read the image's bytes, not A's private write.
#[test]
fn after_the_origin_is_removed_one_clones_bytes_never_reach_another() {
    rt().block_on(async {
        let backend: Arc<dyn Backend> = Arc::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(Duration::from_millis(150)),
        ));
        let (snap, content) = image(&*backend, 64 * BS, 13).await;
        let a = clone_of(&*backend, &snap, "a").await;
        let b = clone_of(&*backend, &snap, "b").await;
        backend.remove_snapshot(&snap).await.unwrap();
        let cache = Arc::new(BlockCache::new(1 << 20));
        let open = |v: VolumeId| {
            LazyVolume::open(
                backend.clone(),
                v,
                cache.clone(),
                LazyVolumeOptions::default().with_read_ahead(0),
            )
        };
        let (la, lb) = (open(a).await.unwrap(), open(b).await.unwrap());

        // t=0: A's reader claims block 0 of the snapshot's slot; the snapshot read fails
        // (NotFound, answered at 150 ms), then A's volume is read (executed at 150 ms).
        let reader = la.clone();
        let a_read = tokio::spawn(async move { reader.read_at(0, BS as usize).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        // t=30 ms: A writes block 0 (executed at once), before A's fallback read runs.
        let private = vec![0xAA; BS as usize];
        la.write_at(0, &private).await.unwrap();
        // t=180 ms (the write is acknowledged): A's fallback read is in flight until
        // 300 ms, so B's reader of block 0 joins A's claim.
        let b_read = {
            let lb = lb.clone();
            tokio::spawn(async move { lb.read_at(0, BS as usize).await })
        };
        let got_a = a_read.await.unwrap().unwrap();
        let got_b = b_read.await.unwrap().unwrap();
        assert!(
            got_a[..] == private[..] || got_a[..] == content[..BS as usize],
            "A reads its write or the image"
        );
        assert!(
            got_b[..] == content[..BS as usize],
            "B must read the image's block 0, never clone A's private write (got {:?}..)",
            &got_b[..8]
        );
        assert_eq!(cache.stats().resident_blocks, 0, "nothing of A or B cached");
        assert_eq!(&lb.read_at(0, 16).await.unwrap()[..], &content[..16]);
    });
}

#[test]
fn eviction_keeps_the_cache_within_its_bound() {
    rt().block_on(async {
        let backend: Arc<dyn Backend> = Arc::new(MemBackend::new());
        let (snap, content) = image(&*backend, 1 << 20, 7).await;
        let c = clone_of(&*backend, &snap, "c").await;
        let cache = Arc::new(BlockCache::new(10 * BS));
        let v = LazyVolume::open(
            backend,
            c,
            cache.clone(),
            LazyVolumeOptions::default().with_read_ahead(4),
        )
        .await
        .unwrap();
        for round in 0..3 {
            for i in (0..200u64).rev() {
                let off = (i * 5 * BS + round * 77) % ((1 << 20) - 9000);
                let got = v.read_at(off, 9000).await.unwrap();
                assert_eq!(&got[..], &content[off as usize..off as usize + 9000]);
            }
        }
        let st = cache.stats();
        assert!(st.resident_bytes <= 10 * BS, "{st:?}");
        assert!(st.evictions > 100, "{st:?}");
        // A cache smaller than one block caches nothing, and reads still work.
        let none = Arc::new(BlockCache::new(100));
        let c2 = VolumeId::new("c2").unwrap();
        v.backend().clone_snapshot(&snap, &c2).await.unwrap();
        let v2 = LazyVolume::open(
            v.backend().clone(),
            c2,
            none.clone(),
            LazyVolumeOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(&v2.read_at(0, 20000).await.unwrap()[..], &content[..20000]);
        assert_eq!(none.stats().resident_bytes, 0);
    });
}

#[test]
fn throttled_link_adds_latency_and_caps_bandwidth() {
    rt().block_on(async {
        let link = LinkProfile::new(Duration::from_millis(2), 80_000_000); // 10 MB/s
        let b = Throttled::new(MemBackend::new(), link);
        let v = vid("v");
        b.create_volume(&v, &VolumeOptions::new(4 << 20))
            .await
            .unwrap();
        let t = std::time::Instant::now();
        b.read_at(&v, 0, 1).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(2));
        let t = std::time::Instant::now();
        // 4 concurrent 256 KiB reads share the link: ~105 ms in all, not ~26 ms.
        let (r0, r1, r2, r3) = tokio::join!(
            b.read_at(&v, 0, 1 << 18),
            b.read_at(&v, 1 << 18, 1 << 18),
            b.read_at(&v, 2 << 18, 1 << 18),
            b.read_at(&v, 3 << 18, 1 << 18),
        );
        for r in [r0, r1, r2, r3] {
            r.unwrap();
        }
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(400), "{took:?}");
    });
}

// ---- model-based property test ------------------------------------------------------

const BLOCKS: u64 = 24;
const CLONES: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// target: 0..CLONES are the clones, CLONES is the snapshot view.
    Read {
        target: usize,
        offset: u64,
        len: usize,
    },
    Write {
        clone: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    /// Two reads at once (in-flight sharing under eviction).
    ReadPair {
        a: (usize, u64, usize),
        b: (usize, u64, usize),
    },
    Prefetch {
        clone: usize,
        start: u32,
        len: u32,
    },
    /// Drop the handle and open the volume again (bitmap from the backend).
    Reopen {
        clone: usize,
    },
    Flush {
        clone: usize,
    },
}

fn span() -> impl Strategy<Value = (u64, usize)> {
    (0..BLOCKS * BS, 1usize..(3 * BS as usize)).prop_map(|(o, l)| {
        let l = l.min((BLOCKS * BS - o) as usize);
        (o, l)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=CLONES, span()).prop_map(|(target, (offset, len))| Op::Read { target, offset, len }),
        3 => (0..CLONES, span(), any::<u8>()).prop_map(|(clone, (offset, len), byte)| Op::Write { clone, offset, len, byte }),
        2 => ((0..=CLONES, span()), (0..=CLONES, span()))
            .prop_map(|((t1, (o1, l1)), (t2, (o2, l2)))| Op::ReadPair { a: (t1, o1, l1), b: (t2, o2, l2) }),
        1 => (0..CLONES, 0..BLOCKS as u32, 1u32..8).prop_map(|(clone, start, len)| Op::Prefetch { clone, start, len }),
        1 => (0..CLONES).prop_map(|clone| Op::Reopen { clone }),
        1 => (0..CLONES).prop_map(|clone| Op::Flush { clone }),
    ]
}

fn run_model(
    ops: Vec<Op>,
    cache_blocks: u64,
    read_ahead: (u32, u32),
    max_req_blocks: u64,
    seed: u64,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mem = MemBackend::new();
        let backend: Arc<dyn Backend> = Arc::new(mem.clone());
        let (snap, base) = image(&*backend, BLOCKS * BS, seed).await;
        let cache = Arc::new(BlockCache::new(cache_blocks * BS));
        let opts = LazyVolumeOptions::default()
            .with_read_ahead(read_ahead.0)
            .with_max_read_ahead(read_ahead.1)
            .with_max_request_bytes(max_req_blocks * BS)
            .with_prefetch_parallelism(2);
        let mut ids = Vec::new();
        let mut vols = Vec::new();
        let mut model: Vec<Vec<u8>> = Vec::new();
        for i in 0..CLONES {
            let id = clone_of(&*backend, &snap, &format!("c{i}")).await;
            vols.push(
                LazyVolume::open(backend.clone(), id.clone(), cache.clone(), opts.clone())
                    .await
                    .unwrap(),
            );
            ids.push(id);
            model.push(base.clone());
        }
        vols.push(
            LazyVolume::open_snapshot(backend.clone(), snap.clone(), cache.clone(), opts.clone())
                .await
                .unwrap(),
        );
        model.push(base.clone());

        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Read {
                    target,
                    offset,
                    len,
                } => {
                    let got = vols[target].read_at(offset, len).await.unwrap();
                    assert_eq!(
                        &got[..],
                        &model[target][offset as usize..offset as usize + len],
                        "step {step}: read {target} {offset}+{len}"
                    );
                }
                Op::Write {
                    clone,
                    offset,
                    len,
                    byte,
                } => {
                    let data = vec![byte; len];
                    vols[clone].write_at(offset, &data).await.unwrap();
                    model[clone][offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::ReadPair { a, b } => {
                    let (va, vb) = (vols[a.0].clone(), vols[b.0].clone());
                    let ta = tokio::spawn(async move { va.read_at(a.1, a.2).await.unwrap() });
                    let tb = tokio::spawn(async move { vb.read_at(b.1, b.2).await.unwrap() });
                    let (ga, gb): (Bytes, Bytes) = (ta.await.unwrap(), tb.await.unwrap());
                    assert_eq!(
                        &ga[..],
                        &model[a.0][a.1 as usize..a.1 as usize + a.2],
                        "step {step}: pair a"
                    );
                    assert_eq!(
                        &gb[..],
                        &model[b.0][b.1 as usize..b.1 as usize + b.2],
                        "step {step}: pair b"
                    );
                }
                Op::Prefetch { clone, start, len } => {
                    vols[clone]
                        .prefetch_now([BlockRange::new(start, start + len)])
                        .await
                        .unwrap();
                }
                Op::Reopen { clone } => {
                    vols[clone] = LazyVolume::open(
                        backend.clone(),
                        ids[clone].clone(),
                        cache.clone(),
                        opts.clone(),
                    )
                    .await
                    .unwrap();
                }
                Op::Flush { clone } => vols[clone].flush().await.unwrap(),
            }
            let st = cache.stats();
            assert!(
                st.resident_bytes <= cache_blocks * BS,
                "step {step}: {st:?}"
            );
        }
        // The backend agrees with the model, and the snapshot never changed.
        for i in 0..CLONES {
            assert_eq!(
                &mem.read_volume(&ids[i]).await.unwrap()[..],
                &model[i][..],
                "clone {i} at the backend"
            );
            let fresh =
                LazyVolume::open(backend.clone(), ids[i].clone(), cache.clone(), opts.clone())
                    .await
                    .unwrap();
            let all = fresh.read_at(0, (BLOCKS * BS) as usize).await.unwrap();
            assert_eq!(&all[..], &model[i][..], "clone {i} through a fresh handle");
        }
        assert!(mem.read_snapshot(&snap).await.unwrap() == base);
        // Background read-ahead finishes (mem fetches are instant) and leaves nothing
        // in flight.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(cache.stats().in_flight, 0);
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn lazy_volumes_match_the_model_under_eviction_pressure(
        ops in proptest::collection::vec(op(), 1..60),
        cache_blocks in 0u64..6,
        read_ahead in (0u32..5, prop_oneof![Just(0u32), 1u32..20]),
        max_req_blocks in 1u64..5,
        seed in 1u64..1000,
    ) {
        run_model(ops, cache_blocks, read_ahead, max_req_blocks, seed);
    }
}
