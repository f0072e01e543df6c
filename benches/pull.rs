//! Pull latency of a slacker image through a real registry on loopback, and where it goes:
//! the registry round trips (the manifest, which embeds the config and the reference
//! layer; for comparison the same image pushed without embedding, whose pull also fetches
//! the config and the reference layer at once, and those two requests alone) and the
//! layer store's durable writes (`apply_diff` of a reference layer: its
//! layer record, then the holds on the data and Merkle tree snapshots, batched through
//! `Backend::hold_snapshots`; the same holds one by one for comparison), with the unit
//! costs on the same file system (one durable document: temp file, fsync, rename,
//! directory fsync; one fsync).
//!
//! ```text
//! cargo bench -p slacker-benches --bench pull          # SLACKER_PULL_ITERS=40
//! ```
//!
//! With `SLACKER_NFS_ADDR=host:port` the same runs first on NFS (metadata on local disk).
//! Storage is a loop-mounted btrfs (root and `mkfs.btrfs`; the layer store's metadata on the
//! same btrfs: HelloBench keeps it on the host's file system, under its work directory,
//! and puts the storage behind an emulated link; its `SLACKER_TIMING=1` events give that
//! breakdown), else the mem backend with the metadata in a temporary directory (said in
//! the output). The registry is a local `docker-registry`
//! (`SLACKER_REGISTRY=host:port` to use another); without either the bench prints
//! `SKIPPED`. Every iteration pulls into a fresh layer store (a worker that never had the
//! image) through a client that has already talked to the registry (a daemon's steady
//! state); one extra figure gives a brand-new client's first pull.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use slacker_backend_btrfs::BtrfsBuilder;
use slacker_backend_mem::MemBackend;
use slacker_backend_nfs::NfsBuilder;
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

/// A [`DirStore`] that adds up the time its durable writes take (the layer store's
/// records).
#[derive(Debug)]
struct Timed {
    inner: DirStore,
    writes: AtomicU64,
    nanos: AtomicU64,
}

impl Timed {
    fn take(&self) -> (u64, f64) {
        let n = self.writes.swap(0, Ordering::SeqCst);
        let ns = self.nanos.swap(0, Ordering::SeqCst);
        (n, ns as f64 / 1e6)
    }
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.writes.fetch_add(1, Ordering::SeqCst);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(ns, Ordering::SeqCst);
        r
    }
}

impl MetaStore for Timed {
    fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.inner.read(name)
    }
    fn write(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.timed(|| self.inner.write(name, data))
    }
    fn create(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.timed(|| self.inner.create(name, data))
    }
    fn write_many(&self, docs: &[(&str, &[u8])]) -> std::io::Result<()> {
        self.timed(|| self.inner.write_many(docs))
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.timed(|| self.inner.remove(name))
    }
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
}

async fn store<B: Backend>(b: B, meta: &Path, name: &str) -> (LayerStore<B>, Arc<Timed>) {
    std::fs::create_dir_all(meta).expect("meta dir");
    let timed = Arc::new(Timed {
        inner: DirStore::open(meta).expect("meta"),
        writes: AtomicU64::new(0),
        nanos: AtomicU64::new(0),
    });
    let m: Arc<dyn MetaStore> = timed.clone();
    let s = LayerStore::open(b, m, LayerStoreOptions::new(name).with_volume_size(VOLUME))
        .await
        .expect("store");
    timed.take(); // the store document
    (s, timed)
}

/// Medians of every figure, in milliseconds.
#[derive(Default)]
struct Figures {
    pull: Vec<f64>,
    pull_unembedded: Vec<f64>,
    manifest: Vec<f64>,
    blobs: Vec<f64>,
    blobs_sequential: Vec<f64>,
    apply: Vec<f64>,
    record: Vec<f64>,
    record_writes: u64,
    holds_batched: Vec<f64>,
    holds_one_by_one: Vec<f64>,
    doc_write: Vec<f64>,
    fsync: Vec<f64>,
    dir_fsync: Vec<f64>,
}

async fn run<B: Backend + Clone>(b: B, meta: &Path, addr: &str, iters: usize) {
    let (pusher, _) = store(b.clone(), &meta.join("push"), "push").await;
    let v = pusher.create("img", None).await.expect("create");
    b.write_at(&v, 4096, b"pull bench").await.expect("write");
    let image = format!("{addr}/bench/pull:latest");
    RegistryClient::new(ClientOptions::plain_http())
        .push_image(&pusher, "img", &image, &PushOptions::default())
        .await
        .expect("push");
    // The same image with nothing embedded in its manifest (as before embedding).
    let unembedded = format!("{addr}/bench/pull:unembedded");
    RegistryClient::new(ClientOptions::plain_http())
        .push_image(
            &pusher,
            "img",
            &unembedded,
            &PushOptions::default().with_inline_max_bytes(0),
        )
        .await
        .expect("push");
    let reference = pusher.diff("img").await.expect("diff").reference;
    let mut held = vec![reference.snapshot.clone()];
    held.extend(reference.merkle.as_ref().map(|m| m.tree.clone()));

    // A brand-new client's first pull.
    let first_client = RegistryClient::new(ClientOptions::plain_http());
    let (w, _) = store(b.clone(), &meta.join("first"), "first").await;
    let t = Instant::now();
    first_client.pull_image(&w, &image).await.expect("pull");
    let first = ms_since(t);
    let first_client = RegistryClient::new(ClientOptions::plain_http());
    let (w, _) = store(b.clone(), &meta.join("first-u"), "first-u").await;
    let t = Instant::now();
    first_client
        .pull_image(&w, &unembedded)
        .await
        .expect("pull");
    let first_unembedded = ms_since(t);

    let client = RegistryClient::new(ClientOptions::plain_http());
    client.pull_config(&image).await.expect("warm-up");
    let mut f = Figures::default();
    let mut bytes = 0;
    let scratch_doc = DirStore::open(meta.join("scratch")).expect("scratch");
    for i in 0..iters {
        let name = format!("w{i}");
        let (w, _) = store(b.clone(), &meta.join(&name), &name).await;
        let t = Instant::now();
        let report = client.pull_image(&w, &image).await.expect("pull");
        f.pull.push(ms_since(t));
        bytes = report.bytes_downloaded();
        let name = format!("u{i}");
        let (w, _) = store(b.clone(), &meta.join(&name), &name).await;
        let t = Instant::now();
        client.pull_image(&w, &unembedded).await.expect("pull");
        f.pull_unembedded.push(ms_since(t));

        // The registry requests alone: the manifest; then what a pull without embedding
        // adds, the config and the reference layer at once (descriptors without `data`).
        let t = Instant::now();
        let m = client.pull_manifest(&image, "reference").await.expect("m");
        f.manifest.push(ms_since(t));
        let (mut config_desc, mut layer_desc) = (m.config.clone(), m.layers[0].clone());
        config_desc.set_data(None);
        layer_desc.set_data(None);
        let t = Instant::now();
        let (config, layer) = tokio::join!(
            client.pull_blob(&image, &config_desc),
            client.pull_blob(&image, &layer_desc)
        );
        config.expect("config");
        let layer = layer.expect("layer");
        f.blobs.push(ms_since(t));
        let t = Instant::now();
        client
            .pull_blob(&image, &config_desc)
            .await
            .expect("config");
        client.pull_blob(&image, &layer_desc).await.expect("layer");
        f.blobs_sequential.push(ms_since(t));

        // The store's part alone, and within it the layer record's durable write.
        let name = format!("a{i}");
        let (w, timed) = store(b.clone(), &meta.join(&name), &name).await;
        let t = Instant::now();
        w.apply_diff("top", None, std::io::Cursor::new(layer))
            .await
            .expect("apply");
        f.apply.push(ms_since(t));
        let (n, ms) = timed.take();
        f.record.push(ms);
        f.record_writes = n;

        // The holds alone: both snapshots held in one batch, and one after the other.
        let t = Instant::now();
        b.hold_snapshots(&held, &format!("probe-b{i}"))
            .await
            .expect("hold");
        f.holds_batched.push(ms_since(t));
        let t = Instant::now();
        for s in &held {
            b.hold_snapshot(s, &format!("probe-s{i}"))
                .await
                .expect("hold");
        }
        f.holds_one_by_one.push(ms_since(t));
        for s in &held {
            for h in [format!("probe-b{i}"), format!("probe-s{i}")] {
                b.release_snapshot(s, &h).await.expect("release");
            }
        }

        // The unit costs on the same file system: one durable document, one fsync.
        let t = Instant::now();
        scratch_doc.write("doc", &[b'x'; 300]).expect("doc");
        f.doc_write.push(ms_since(t));
        let path = scratch_doc.dir().join("fsync");
        std::fs::write(&path, [b'y'; 300]).expect("file");
        let file = std::fs::File::open(&path).expect("open");
        let t = Instant::now();
        file.sync_all().expect("fsync");
        f.fsync.push(ms_since(t));
        // A directory sync after a rename in it (what makes a document's new name durable).
        std::fs::rename(&path, scratch_doc.dir().join("renamed")).expect("rename");
        let dir = std::fs::File::open(scratch_doc.dir()).expect("dir");
        let t = Instant::now();
        dir.sync_all().expect("fsync dir");
        f.dir_fsync.push(ms_since(t));
    }
    println!(
        "pull_image (median of {iters}): {:.2} ms; {bytes} B moved (config and reference layer embedded in the manifest)",
        median(f.pull)
    );
    println!(
        "pull_image of the same image pushed without embedding: {:.2} ms",
        median(f.pull_unembedded)
    );
    println!(
        "  registry: manifest {:.2} ms; without embedding also config + reference layer at once {:.2} ms (one after the other: {:.2} ms)",
        median(f.manifest),
        median(f.blobs),
        median(f.blobs_sequential)
    );
    println!(
        "  apply_diff of the reference layer: {:.2} ms, of which the layer record ({} durable writes) {:.2} ms",
        median(f.apply),
        f.record_writes,
        median(f.record)
    );
    println!(
        "  holds on the data and Merkle tree snapshots: batched {:.2} ms, one by one {:.2} ms",
        median(f.holds_batched),
        median(f.holds_one_by_one)
    );
    println!(
        "  unit costs: one durable document {:.2} ms = fsync of its temp file {:.2} ms + fsync of the directory after the rename {:.2} ms",
        median(f.doc_write),
        median(f.fsync),
        median(f.dir_fsync)
    );
    println!(
        "  first pull of a new client: {first:.2} ms (without embedding: {first_unembedded:.2} ms)"
    );
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
    // With `SLACKER_NFS_ADDR=host:port`: the same on NFS (the layer store's metadata in a
    // local temporary directory, as a worker keeps it).
    if let Ok(nfs) = std::env::var("SLACKER_NFS_ADDR") {
        if !nfs.is_empty() {
            let meta = tempfile::tempdir().expect("tempdir");
            let dir = format!("bench-pull-{}", std::process::id());
            let b = rt
                .block_on(NfsBuilder::new(&nfs).dir(&dir).build())
                .expect("NFS backend");
            println!(
                "storage: NFS at {nfs} (directory {dir}), metadata in {}",
                meta.path().display()
            );
            rt.block_on(run(b, meta.path(), &addr, iters));
        }
    }
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
