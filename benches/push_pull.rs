//! Push and pull latency through a real OCI registry: the slacker reference path (a
//! snapshot and a 2 KiB reference layer; pull records a lazy layer) against the
//! traditional path (tar + gzip level 6 with flate2, upload; pull = download, gunzip and
//! untar into a directory), for 10 MiB, 100 MiB and 1 GiB images, in the same run.
//!
//! ```text
//! cargo bench -p slacker-benches --bench push_pull            # SLACKER_BENCH_SIZES=10,100,1024 (MiB)
//! ```
//!
//! The registry is `SLACKER_REGISTRY=host:port` when set, else a local `docker-registry`
//! (skipped with a message when neither is available). Content is text-like (about 3x
//! with gzip -6; DESIGN.md's median image is 2.5x), new for every iteration so no blob
//! is ever already in the registry. The mem backend holds the volumes. Client and registry
//! share the machine's cores over loopback.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use sha2::Digest;

use slacker_backend_mem::MemBackend;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, LayerStore, LayerStoreOptions};
use slacker_oci::{
    ClientOptions, LocalRegistry, PushLayer, PushOptions, RegistryClient, sha256_digest,
};

const WORDS: [&[u8]; 16] = [
    b"usr/",
    b"lib",
    b"share",
    b"/bin",
    b"config",
    b"the ",
    b"0x",
    b"libc.so.6",
    b"\n",
    b"#include",
    b"{\n",
    b"return",
    b"ELF",
    b"\0\0\0\0",
    b"debian",
    b"python3",
];

/// `n` bytes of text-like content (gzip -6 makes it about 3x smaller).
fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x & 15) as usize]);
        if x & 0x300 == 0 {
            out.extend_from_slice(&x.to_le_bytes()[..3]);
        }
    }
    out.truncate(n);
    out
}

/// A traditional layer: a tar holding `data.bin`, gzipped at level 6, streamed (the tar is
/// never materialized).
fn traditional_layer(data: &[u8]) -> PushLayer {
    let mut h = tar::Header::new_ustar();
    h.set_path("data.bin").expect("path");
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let pad = vec![0u8; (512 - data.len() % 512) % 512 + 1024];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    let mut sha = sha2::Sha256::new();
    for part in [h.as_bytes().as_slice(), data, &pad] {
        gz.write_all(part).expect("vec");
        sha.update(part);
    }
    let mut diff_id = String::from("sha256:");
    for b in sha.finalize() {
        diff_id.push_str(&format!("{b:02x}"));
    }
    PushLayer::new(
        slacker_oci::LAYER_MEDIA_TYPES[2],
        gz.finish().expect("vec"),
        diff_id,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

struct Row {
    mib: usize,
    ref_push: f64,
    ref_pull: f64,
    ref_get: f64,
    ref_bytes: (u64, u64),
    trad_push: f64,
    trad_pull: f64,
    trad_bytes: (u64, u64),
    iters: (usize, usize),
}

async fn open_store(
    b: &MemBackend,
    dir: &std::path::Path,
    name: &str,
    size: u64,
) -> LayerStore<MemBackend> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir).expect("meta dir"));
    LayerStore::open(
        b.reopen(),
        meta,
        LayerStoreOptions::new(name).with_volume_size(size),
    )
    .await
    .expect("store")
}

/// `push` and `pull` are separate clients, as a builder and a worker would be.
async fn bench_size(
    push_client: &RegistryClient,
    pull_client: &RegistryClient,
    addr: &str,
    mib: usize,
    run: u64,
) -> Row {
    let n = mib << 20;
    let volume = ((n as u64) + (1 << 20)).next_multiple_of(1 << 20);
    let ref_iters = 5;
    let trad_iters = if mib >= 512 { 1 } else { 3 };
    let work = tempfile::tempdir().expect("tempdir");

    // Reference path.
    let b = MemBackend::new();
    let pusher = open_store(&b, &work.path().join("push"), "push", volume).await;
    let v = pusher.create("img", None).await.expect("create");
    let data = content(n, run);
    for (i, chunk) in data.chunks(8 << 20).enumerate() {
        b.write_at(&v, (i * (8 << 20)) as u64, chunk)
            .await
            .expect("write");
    }
    drop(data);
    let (mut push, mut pull, mut get) = (Vec::new(), Vec::new(), Vec::new());
    let mut ref_bytes = (0, 0);
    for i in 0..ref_iters {
        // Change a block so each push is a new snapshot (a new reference blob).
        b.write_at(&v, 0, &(run * 1000 + i as u64).to_le_bytes())
            .await
            .expect("write");
        let image = format!("{addr}/bench/ref-{mib}:{run}-{i}");
        let t = Instant::now();
        let pushed = push_client
            .push_image(&pusher, "img", &image, &PushOptions::default())
            .await
            .expect("push");
        push.push(t.elapsed().as_secs_f64() * 1e3);
        let worker = open_store(
            &b,
            &work.path().join(format!("w{i}")),
            &format!("w{i}"),
            volume,
        )
        .await;
        let t = Instant::now();
        let pulled = pull_client.pull_image(&worker, &image).await.expect("pull");
        pull.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        worker.get(&pulled.top_layer).await.expect("get");
        get.push(t.elapsed().as_secs_f64() * 1e3);
        ref_bytes = (pushed.bytes_uploaded(), pulled.bytes_downloaded());
    }
    drop(pusher);
    drop(b);

    // Traditional path.
    let (mut tpush, mut tpull) = (Vec::new(), Vec::new());
    let mut trad_bytes = (0, 0);
    for i in 0..trad_iters {
        let data = content(n, run * 1000 + 500 + i as u64);
        let image = format!("{addr}/bench/trad-{mib}:{run}-{i}");
        let t = Instant::now();
        let layer = tokio::task::spawn_blocking(move || traditional_layer(&data))
            .await
            .expect("gzip");
        let pushed = push_client
            .push_layers(&image, vec![layer], None)
            .await
            .expect("push");
        tpush.push(t.elapsed().as_secs_f64() * 1e3);
        let dest = work.path().join(format!("untar-{i}"));
        std::fs::create_dir(&dest).expect("mkdir");
        let t = Instant::now();
        let m = pull_client
            .pull_manifest(&image, "plain")
            .await
            .expect("manifest");
        let config = pull_client
            .pull_blob(&image, &m.config)
            .await
            .expect("config");
        let blob = pull_client
            .pull_blob(&image, &m.layers[0])
            .await
            .expect("blob");
        let got = blob.len() as u64 + config.len() as u64 + m.bytes;
        let d2 = dest.clone();
        tokio::task::spawn_blocking(move || {
            let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
            ar.unpack(&d2).expect("untar");
        })
        .await
        .expect("untar");
        tpull.push(t.elapsed().as_secs_f64() * 1e3);
        let mut f = std::fs::File::open(dest.join("data.bin")).expect("unpacked");
        let mut first = [0u8; 8];
        f.read_exact(&mut first).expect("read");
        std::fs::remove_dir_all(&dest).expect("cleanup");
        trad_bytes = (pushed.bytes_uploaded(), got);
    }
    Row {
        mib,
        ref_push: median(push),
        ref_pull: median(pull),
        ref_get: median(get),
        ref_bytes,
        trad_push: median(tpush),
        trad_pull: median(tpull),
        trad_bytes,
        iters: (ref_iters, trad_iters),
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SLACKER_BENCH_SIZES")
        .unwrap_or_else(|_| "10,100,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
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
                println!(
                    "SKIPPED: push_pull bench needs a registry: set SLACKER_REGISTRY or install docker-registry ({e})"
                );
                return;
            }
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let push_client = RegistryClient::new(ClientOptions::plain_http());
    let pull_client = RegistryClient::new(ClientOptions::plain_http());
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    // Warm the connection and the registry once.
    rt.block_on(async {
        let layer = PushLayer::tar(vec![0u8; 1024]);
        let _ = sha256_digest(&layer.data);
        let image = format!("{addr}/bench/warmup:{run}");
        push_client
            .push_layers(&image, vec![layer], None)
            .await
            .expect("warm-up push");
        pull_client
            .pull_manifest(&image, "plain")
            .await
            .expect("warm-up pull");
    });
    let mut rows = Vec::new();
    for mib in sizes {
        eprintln!("push_pull: {mib} MiB ...");
        rows.push(rt.block_on(bench_size(&push_client, &pull_client, &addr, mib, run)));
    }
    println!(
        "\n{:>8}  {:<11}  {:>10}  {:>10}  {:>12}  {:>12}  {:>5}",
        "image", "path", "push", "pull", "pushed", "pulled", "iters"
    );
    for r in &rows {
        println!(
            "{:>5} MiB  {:<11}  {:>10}  {:>10}  {:>10} B  {:>10} B  {:>5}",
            r.mib,
            "reference",
            fmt_ms(r.ref_push),
            fmt_ms(r.ref_pull),
            r.ref_bytes.0,
            r.ref_bytes.1,
            r.iters.0
        );
        println!(
            "{:>5} MiB  {:<11}  {:>10}  {:>10}  {:>10} B  {:>10} B  {:>5}",
            r.mib,
            "tar+gzip",
            fmt_ms(r.trad_push),
            fmt_ms(r.trad_pull),
            r.trad_bytes.0,
            r.trad_bytes.1,
            r.iters.1
        );
    }
    println!("\nratios (traditional / reference, medians):");
    for r in &rows {
        println!(
            "{:>5} MiB: push {:.0}x, pull {:.0}x, bytes pushed {:.0}x, bytes pulled {:.0}x; first get (clone) {}",
            r.mib,
            r.trad_push / r.ref_push,
            r.trad_pull / r.ref_pull,
            r.trad_bytes.0 as f64 / r.ref_bytes.0.max(1) as f64,
            r.trad_bytes.1 as f64 / r.ref_bytes.1.max(1) as f64,
            fmt_ms(r.ref_get),
        );
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"mib\":{},\"ref_push_ms\":{:.2},\"ref_pull_ms\":{:.2},\"ref_get_ms\":{:.3},\"ref_push_bytes\":{},\"ref_pull_bytes\":{},\"trad_push_ms\":{:.1},\"trad_pull_ms\":{:.1},\"trad_push_bytes\":{},\"trad_pull_bytes\":{}}}",
                r.mib, r.ref_push, r.ref_pull, r.ref_get, r.ref_bytes.0, r.ref_bytes.1, r.trad_push, r.trad_pull, r.trad_bytes.0, r.trad_bytes.1
            )
        })
        .collect();
    println!("\njson: [{}]", json.join(","));
}
