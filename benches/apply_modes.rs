//! Applying a stack of small traditional layers on a real image: the mounted apply
//! (root: clone the parent, loop-mount its ext4, apply the tar in place, O(layer)) vs
//! the rebuilt apply (`debugfs rdump` of the parent, unpack, `mke2fs -d` of the whole
//! tree, write back the blocks that differ: O(image)), both on the btrfs backend.
//!
//! ```sh
//! cargo bench -p slacker-benches --bench apply_modes      # root
//! APPLY_BENCH_TREE=/var/cache/slacker/hellobench/images/gcc APPLY_BENCH_LAYERS=3 \
//!     cargo bench -p slacker-benches --bench apply_modes
//! ```
//!
//! The bottom layer is a HelloBench corpus image's whole tree (default
//! `$SLACKER_CACHE/hellobench/images/python3`, made by `slacker-hellobench corpus
//! --corpus full`), written losslessly by `TreeTar`; on top of it come
//! `APPLY_BENCH_LAYERS` (default 5) layers of ~1 MiB each (new files, a rewritten file, a
//! whiteout), like a Dockerfile's `RUN` steps. Each mode gets its own layer store on one
//! loop-mounted btrfs; every layer's apply is timed. Needs root (loop mounts); prints
//! `SKIPPED` otherwise or without the tree. A hand-rolled timing loop (`harness =
//! false`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slacker_backend_btrfs::BtrfsBuilder;
use slacker_benches::Scratch;
use slacker_core::layer::TarOptions;
use slacker_core::layer::archive::TreeTar;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{ApplyMode, LayerStore, LayerStoreOptions};

/// Layer `i` of the stack: 16 new files of 64 KiB, one rewritten file, one whiteout of
/// the previous layer's first file.
fn small_layer(i: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000 + i as u64);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).expect("tar");
    };
    let mut buf = vec![0u8; 64 << 10];
    for f in 0..16 {
        blake3::Hasher::new()
            .update(format!("layer {i} file {f}").as_bytes())
            .finalize_xof()
            .fill(&mut buf);
        add(&format!("opt/step{i}/file{f}"), &buf);
    }
    add("etc/motd", format!("step {i}\n").as_bytes());
    if i > 0 {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_data(&mut h, format!("opt/step{}/.wh.file0", i - 1), &[][..])
            .expect("tar");
    }
    b.into_inner().expect("tar")
}

fn fmt(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn stack(
    root: &Path,
    mode: ApplyMode,
    base: &[u8],
    layers: &[Vec<u8>],
) -> (Duration, Vec<Duration>, String) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let backend = BtrfsBuilder::new(&data).build().expect("btrfs backend");
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(root.join("meta")).expect("meta store"));
    let store = LayerStore::open(
        backend,
        meta,
        LayerStoreOptions::new("bench")
            .with_apply_mode(mode)
            .with_tar_options(TarOptions::default().with_allow_devices(true))
            .with_volume_size(1 << 30)
            .with_scratch_dir(root),
    )
    .await
    .expect("layer store");
    let t = Instant::now();
    let a = store
        .apply_diff("l0", None, std::io::Cursor::new(base.to_vec()))
        .await
        .expect("apply the image");
    let t_base = t.elapsed();
    let method = format!("{:?}", a.method);
    let mut times = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let parent = format!("l{i}");
        let t = Instant::now();
        store
            .apply_diff(
                &format!("l{}", i + 1),
                Some(&parent),
                std::io::Cursor::new(l.clone()),
            )
            .await
            .expect("apply a small layer");
        times.push(t.elapsed());
    }
    (t_base, times, method)
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED: apply_modes needs root (loop mounts)");
        return;
    }
    let cache = std::env::var_os("SLACKER_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/slacker"), PathBuf::from);
    let tree = std::env::var_os("APPLY_BENCH_TREE")
        .map_or_else(|| cache.join("hellobench/images/python3"), PathBuf::from);
    if !tree.is_dir() {
        println!(
            "SKIPPED: no image tree at {} (run `slacker-hellobench corpus --corpus full` \
             or set APPLY_BENCH_TREE)",
            tree.display()
        );
        return;
    }
    let n: usize = std::env::var("APPLY_BENCH_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let scratch = match Scratch::new("apply", "16G") {
        Ok(s) => s,
        Err(e) => {
            println!("SKIPPED: cannot make a loop-mounted btrfs: {e}");
            return;
        }
    };
    let mut t = TreeTar::new(Vec::new());
    t.append_tree(&tree, &["lost+found"]).expect("tar the tree");
    let base = t.finish().expect("tar the tree");
    let layers: Vec<Vec<u8>> = (0..n).map(small_layer).collect();
    let layer_bytes = layers.iter().map(Vec::len).sum::<usize>() / n.max(1);
    println!(
        "image {} ({} MiB tar), {n} layers of ~{} KiB each; load before: {}",
        tree.display(),
        base.len() >> 20,
        layer_bytes >> 10,
        load()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for (name, mode) in [
        ("mounted", ApplyMode::Mounted),
        ("rebuilt", ApplyMode::Rebuilt),
    ] {
        let (t_base, times, method) =
            rt.block_on(stack(&scratch.mnt.join(name), mode, &base, &layers));
        println!(
            "{name:8} ({method}): image layer {}, small layers {} (median {}), load {}",
            fmt(t_base),
            times.iter().map(|d| fmt(*d)).collect::<Vec<_>>().join(", "),
            fmt(median(times.clone())),
            load()
        );
        rows.push((t_base, median(times)));
    }
    let (m, r) = (rows[0].1, rows[1].1);
    println!(
        "small layer apply, median: mounted {} vs rebuilt {}: rebuilt / mounted = {:.1}x",
        fmt(m),
        fmt(r),
        r.as_secs_f64() / m.as_secs_f64()
    );
}
