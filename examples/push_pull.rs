//! Build an image from a directory tree, push it to an OCI registry as a 2 KiB snapshot
//! reference, pull it on a second worker sharing the storage (metadata only), clone it on
//! first use and read a file from the volume.
//!
//! ```text
//! cargo run --release -p slacker-examples --example push_pull [-- --json] [--mib N] [--plain]
//! ```
//!
//! The registry is `SLACKER_REGISTRY=host:port` (plain HTTP) when set; otherwise a
//! throwaway `docker-registry` is started on 127.0.0.1 (apt-get install docker-registry).
//! Needs e2fsprogs (`mke2fs -d` builds the ext4 image, `debugfs` reads it back). The
//! storage is the mem backend; the second worker is a `MemBackend::reopen()` handle on the
//! same state, as a second host on shared storage would be. `--plain` also pushes an
//! ordinary OCI image (tar+gzip of the tree) in an index with the slacker manifest.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use slacker_backend_mem::MemBackend;
use slacker_core::layer::ext4;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{BackendExt, LayerStore, LayerStoreOptions};
use slacker_examples::{human_bytes, print_table};
use slacker_oci::{ClientOptions, LocalRegistry, PushOptions, RegistryClient};

fn tree(root: &Path, bulk: usize) -> std::io::Result<u64> {
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::create_dir_all(root.join("usr/share/app"))?;
    std::fs::write(root.join("etc/hostname"), b"slacker-demo\n")?;
    std::fs::write(root.join("etc/os-release"), b"NAME=\"slacker demo\"\n")?;
    // Bulk data the container never reads at startup.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(bulk);
    while data.len() < bulk {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(bulk);
    std::fs::write(root.join("usr/share/app/data.bin"), &data)?;
    Ok(bulk as u64 + 34)
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json = std::env::args().any(|a| a == "--json");
    let plain = std::env::args().any(|a| a == "--plain");
    let mib: usize = arg_value("--mib").map_or(Ok(64), |v| v.parse())?;

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
                eprintln!(
                    "no registry: set SLACKER_REGISTRY=host:port (plain HTTP), or install \
                     docker-registry to have one started ({e})"
                );
                std::process::exit(2);
            }
        },
    };
    let work = tempfile::tempdir()?;
    let backend = MemBackend::new();
    let open = |name: &str, backend: MemBackend| {
        let dir = work.path().join(format!("meta-{name}"));
        let name = name.to_owned();
        async move {
            let store = DirStore::open(dir).map_err(|e| slacker_core::Error::backend("meta", e))?;
            let meta: Arc<dyn MetaStore> = Arc::new(store);
            let opts = LayerStoreOptions::new(name).with_volume_size(256 << 20);
            LayerStore::open(backend, meta, opts).await
        }
    };

    // Builder: directory tree -> ext4 (mke2fs -d) -> volume -> snapshot.
    let root = work.path().join("rootfs");
    let tree_bytes = tree(&root, mib << 20)?;
    let builder = open("builder", backend.reopen()).await?;
    let t = Instant::now();
    let built = builder.import_dir("demo", &root).await?;
    let build_ms = ms(t);

    // Push: a snapshot reference, a config and a manifest.
    let image = format!("{addr}/slacker/demo:{}", std::process::id());
    let client = RegistryClient::new(ClientOptions::plain_http());
    let t = Instant::now();
    let pushed = client
        .push_image(
            &builder,
            "demo",
            &image,
            &PushOptions::default().with_plain_export(plain),
        )
        .await?;
    let push_ms = ms(t);

    // A second worker on the same storage: pull (metadata only), get (clone), read.
    let worker = open("worker", backend.reopen()).await?;
    let t = Instant::now();
    let pulled = client.pull_image(&worker, &image).await?;
    let pull_ms = ms(t);
    let t = Instant::now();
    let vol = worker.get(&pulled.top_layer).await?;
    let get_ms = ms(t);
    let t = Instant::now();
    let img = work.path().join("volume.img");
    std::fs::write(&img, worker.backend().read_volume(&vol).await?)?;
    let hostname = ext4::cat(&img, "/etc/hostname")?;
    let read_ms = ms(t);
    worker.put(&pulled.top_layer).await?;
    let hostname = String::from_utf8_lossy(&hostname).trim().to_owned();
    assert_eq!(hostname, "slacker-demo");

    let rows = vec![
        vec![
            "build (mke2fs -d into a volume)".into(),
            format!("{build_ms:.1} ms"),
            human_bytes(built.size),
            "-".into(),
        ],
        vec![
            "push (snapshot + reference layer)".into(),
            format!("{push_ms:.1} ms"),
            human_bytes(pushed.bytes_uploaded()),
            format!("{} B of layers", pushed.layer_bytes_uploaded()),
        ],
        vec![
            "pull on worker 2 (lazy)".into(),
            format!("{pull_ms:.1} ms"),
            human_bytes(pulled.bytes_downloaded()),
            format!("{} B of layers", pulled.layer_bytes_downloaded()),
        ],
        vec![
            "first get (clone the snapshot)".into(),
            format!("{get_ms:.2} ms"),
            "0 B".into(),
            "-".into(),
        ],
        vec![
            "read /etc/hostname (whole volume + debugfs)".into(),
            format!("{read_ms:.1} ms"),
            "-".into(),
            format!("{hostname:?}"),
        ],
    ];
    if json {
        let v = serde_json::json!({
            "image": image,
            "tree_bytes": tree_bytes,
            "volume_bytes": built.size,
            "build_ms": build_ms,
            "push_ms": push_ms,
            "push_bytes": pushed.bytes_uploaded(),
            "push_layer_bytes": pushed.layer_bytes_uploaded(),
            "plain_export": plain,
            "pull_ms": pull_ms,
            "pull_bytes": pulled.bytes_downloaded(),
            "pull_layer_bytes": pulled.layer_bytes_downloaded(),
            "get_ms": get_ms,
            "read_ms": read_ms,
            "hostname": hostname,
            "manifest_digest": pushed.manifest_digest,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "image {image}: a {} tree in a {} ext4 volume",
            human_bytes(tree_bytes),
            human_bytes(built.size)
        );
        print_table(&["step", "time", "bytes moved", "detail"], &rows);
    }
    Ok(())
}
