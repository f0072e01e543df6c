//! Pull latency of a slacker image through a real registry on loopback, and where it goes:
//! the registry round trips (manifest, config, reference layer) and the layer store's
//! durable records and holds (`apply_diff` of a reference layer).
//!
//! ```text
//! cargo bench -p slacker-benches --bench pull          # SLACKER_PULL_ITERS=40
//! ```
//!
//! Storage is a loop-mounted btrfs (root and `mkfs.btrfs`; the layer store's metadata on the
//! same btrfs, as HelloBench keeps it), else the mem backend with the metadata in a
//! temporary directory (said in the output). The registry is a local `docker-registry`
//! (`SLACKER_REGISTRY=host:port` to use another); without either the bench prints
//! `SKIPPED`. Every iteration pulls into a fresh layer store (a worker that never had the
//! image) through a client that has already talked to the registry (a daemon's steady
//! state); one extra figure gives a brand-new client's first pull.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use slacker_backend_btrfs::BtrfsBuilder;
use slacker_backend_mem::MemBackend;
use slacker_benches::Scratch;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, LayerStore, LayerStoreOptions};
use slacker_oci::{ClientOptions, LocalRegistry, PushOptions, RegistryClient};

const VOLUME: u64 = 64 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

async fn store<B: Backend>(b: B, meta: &Path, name: &str) -> LayerStore<B> {
    std::fs::create_dir_all(meta).expect("meta dir");
    let m: Arc<dyn MetaStore> = Arc::new(DirStore::open(meta).expect("meta"));
    LayerStore::open(b, m, LayerStoreOptions::new(name).with_volume_size(VOLUME))
        .await
        .expect("store")
}

async fn run<B: Backend + Clone>(b: B, meta: &Path, addr: &str, iters: usize) {
    let pusher = store(b.clone(), &meta.join("push"), "push").await;
    let v = pusher.create("img", None).await.expect("create");
    b.write_at(&v, 4096, b"pull bench").await.expect("write");
    let image = format!("{addr}/bench/pull:latest");
    RegistryClient::new(ClientOptions::plain_http())
        .push_image(&pusher, "img", &image, &PushOptions::default())
        .await
        .expect("push");

    // A brand-new client's first pull.
    let first_client = RegistryClient::new(ClientOptions::plain_http());
    let w = store(b.clone(), &meta.join("first"), "first").await;
    let t = Instant::now();
    first_client.pull_image(&w, &image).await.expect("pull");
    let first = ms_since(t);

    let client = RegistryClient::new(ClientOptions::plain_http());
    client.pull_config(&image).await.expect("warm-up");
    let (mut pull, mut registry, mut apply) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for i in 0..iters {
        let name = format!("w{i}");
        let w = store(b.clone(), &meta.join(&name), &name).await;
        let t = Instant::now();
        let report = client.pull_image(&w, &image).await.expect("pull");
        pull.push(ms_since(t));
        bytes = report.bytes_downloaded();

        // The same registry requests alone, as pull_image made them before this issue
        // (one after the other), and the store's part alone.
        let t = Instant::now();
        let m = client.pull_manifest(&image, "reference").await.expect("m");
        client.pull_blob(&image, &m.config).await.expect("config");
        let layer = client.pull_blob(&image, &m.layers[0]).await.expect("layer");
        registry.push(ms_since(t));
        let name = format!("a{i}");
        let w = store(b.clone(), &meta.join(&name), &name).await;
        let t = Instant::now();
        w.apply_diff("top", None, std::io::Cursor::new(layer))
            .await
            .expect("apply");
        apply.push(ms_since(t));
    }
    println!(
        "pull_image (median of {iters}): {:.2} ms; {bytes} B moved",
        median(pull)
    );
    println!(
        "  manifest + config + reference, sequential: {:.2} ms",
        median(registry)
    );
    println!(
        "  apply_diff of the reference layer: {:.2} ms",
        median(apply)
    );
    println!("  first pull of a new client: {first:.2} ms");
}

fn main() {
    let iters = std::env::var("SLACKER_PULL_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let _local;
    let addr = match std::env::var("SLACKER_REGISTRY") {
        Ok(a) if !a.is_empty() => a,
        _ => match LocalRegistry::start() {
            Ok(r) => {
                let a = r.addr().to_owned();
                _local = r;
                a
            }
            Err(e) => {
                println!("SKIPPED: no registry (docker-registry: {e})");
                return;
            }
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    match Scratch::new("pull", "2G") {
        Ok(s) => {
            let root = s.mnt.join("slacker");
            std::fs::create_dir_all(&root).expect("btrfs root");
            let b = BtrfsBuilder::new(&root).build().expect("btrfs backend");
            println!("storage: btrfs on a loop device (metadata on the same btrfs)");
            rt.block_on(run(b, &s.mnt.join("meta"), &addr, iters));
        }
        Err(e) => {
            let meta = tempfile::tempdir().expect("tempdir");
            println!(
                "storage: mem backend, metadata in {} (no btrfs: {e})",
                meta.path().display()
            );
            rt.block_on(run(MemBackend::new(), meta.path(), &addr, iters));
        }
    }
}
