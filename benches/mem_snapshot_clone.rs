//! Snapshot and clone on the mem backend cost O(blocks written), not O(logical size):
#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! 1 MiB written into 1 GiB and into 64 GiB volumes.
//!
//! `cargo bench -p slacker-benches --bench mem_snapshot_clone`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use slacker_backend_mem::MemBackend;
use slacker_benches::volume_with_data;
use slacker_core::{Backend, VolumeId};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("mem");
    for (label, size) in [("1GiB", 1u64 << 30), ("64GiB", 64u64 << 30)] {
        let b = MemBackend::new();
        let v = rt.block_on(volume_with_data(&b, "v", size, 1 << 20));
        g.bench_with_input(BenchmarkId::new("snapshot", label), &size, |bench, _| {
            bench.iter(|| rt.block_on(b.snapshot(&v)).expect("snapshot"));
        });
        let s = rt.block_on(b.snapshot(&v)).expect("snapshot");
        let mut n = 0u64;
        g.bench_with_input(BenchmarkId::new("clone", label), &size, |bench, _| {
            bench.iter(|| {
                n += 1;
                let c = VolumeId::new(format!("c{n}")).expect("id");
                rt.block_on(b.clone_snapshot(&s, &c)).expect("clone");
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
