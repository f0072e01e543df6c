//! What verifying lazily fetched blocks costs: blake3 leaf hashing per block, a cold
//! `LazyVolume` read with and without a `MerkleVerifier` (no emulated link: the worst
//! case, where verification is not hidden behind the network), and building a tree from
//! scratch against updating a parent's.
//!
//! ```sh
//! cargo bench -p slacker-benches --bench merkle
//! ```

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use slacker_backend_mem::MemBackend;
use slacker_core::merkle::{self, MerkleRoot, MerkleVerifier};
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, BlockSize, SnapshotId, VolumeId, VolumeOptions};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 64 * MIB;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Fixture {
    backend: Arc<dyn Backend>,
    snap: SnapshotId,
    root: MerkleRoot,
}

async fn fixture() -> Fixture {
    let mem = MemBackend::new();
    let v = VolumeId::new("img").unwrap();
    mem.create_volume(&v, &VolumeOptions::new(IMAGE))
        .await
        .unwrap();
    mem.write_at(&v, 0, &noise(IMAGE as usize, 7))
        .await
        .unwrap();
    let snap = mem.snapshot(&v).await.unwrap();
    let stat = mem.stat_snapshot(&snap).await.unwrap();
    let root = merkle::build(&mem, &stat, None, &VolumeId::new("tree").unwrap())
        .await
        .unwrap();
    Fixture {
        backend: Arc::new(mem),
        snap,
        root,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(fixture());

    let mut g = c.benchmark_group("merkle_verify");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    let block = noise(4096, 3);
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("leaf_hash_4KiB", |b| b.iter(|| merkle::leaf_hash(&block)));
    let verifier = rt.block_on(async {
        let v = MerkleVerifier::open(f.backend.clone(), &f.root, IMAGE, BlockSize::DEFAULT)
            .await
            .unwrap();
        v.warm().await.unwrap();
        v
    });
    let data = rt
        .block_on(f.backend.read_snapshot_at(&f.snap, 0, MIB as usize))
        .unwrap();
    g.throughput(Throughput::Bytes(MIB));
    g.bench_function("verify_1MiB_tree_cached", |b| {
        b.iter(|| rt.block_on(verifier.verify(0, &data)).unwrap())
    });
    g.finish();

    // A cold read of the whole image through a LazyVolume (fresh cache and verifier per
    // iteration), 1 MiB at a time.
    let mut g = c.benchmark_group("lazy_cold_read_64MiB");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(IMAGE));
    for verified in [false, true] {
        let name = if verified { "verified" } else { "plain" };
        g.bench_with_input(
            BenchmarkId::from_parameter(name),
            &verified,
            |b, &verified| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut o = LazyVolumeOptions::default();
                        if verified {
                            let v = MerkleVerifier::open(
                                f.backend.clone(),
                                &f.root,
                                IMAGE,
                                BlockSize::DEFAULT,
                            )
                            .await
                            .unwrap();
                            o = o.with_verifier(Arc::new(v));
                        }
                        let lazy = LazyVolume::open_snapshot(
                            f.backend.clone(),
                            f.snap.clone(),
                            Arc::new(BlockCache::new(2 * IMAGE)),
                            o,
                        )
                        .await
                        .unwrap();
                        for off in (0..IMAGE).step_by(MIB as usize) {
                            lazy.read_at(off, MIB as usize).await.unwrap();
                        }
                    })
                })
            },
        );
    }
    g.finish();

    // Building: the whole image from scratch, against a child with 64 diverged blocks.
    let mut g = c.benchmark_group("merkle_build_64MiB");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(10);
    let stat = rt.block_on(f.backend.stat_snapshot(&f.snap)).unwrap();
    let scratch = VolumeId::new("tree").unwrap();
    g.bench_function("from_scratch", |b| {
        b.iter(|| {
            rt.block_on(merkle::build(&*f.backend, &stat, None, &scratch))
                .unwrap()
        })
    });
    let child = rt.block_on(async {
        let c = VolumeId::new("child").unwrap();
        f.backend.clone_snapshot(&f.snap, &c).await.unwrap();
        for i in 0..64u64 {
            f.backend
                .write_at(&c, i * 97 * 4096, b"diverged")
                .await
                .unwrap();
        }
        let s = f.backend.snapshot(&c).await.unwrap();
        f.backend.stat_snapshot(&s).await.unwrap()
    });
    g.bench_function("incremental_64_blocks", |b| {
        b.iter(|| {
            rt.block_on(merkle::build(&*f.backend, &child, Some(&f.root), &scratch))
                .unwrap()
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
