//! The whole worker story on real components: an image built from a busybox root tree is
//! pushed as a snapshot reference through a real registry, pulled by a second, independent
//! layer store (a second worker on the same storage), cloned on `get`, served lazily
//! through FUSE, loop-mounted as ext4, and `/bin/sh -c 'echo hello'` runs in it. The bytes
//! fetched from the backend are a small fraction of the image.
//!
//! Needs root, busybox, e2fsprogs, /dev/fuse and `docker-registry` (or `SLACKER_REGISTRY`);
//! without them it prints `SKIPPED`, and under `CI=true` it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::worker::{BlockCache, Counting, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, LayerStore, LayerStoreOptions};
use slacker_fuse::{Mount, MountOptions};
use slacker_oci::{ClientOptions, LocalRegistry, PushOptions, RegistryClient};

const MIB: u64 = 1 << 20;

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A busybox root with `sh`/`echo`/`ls`, plus 24 MiB of data files nothing reads.
fn busybox_tree(root: &Path) {
    for d in ["bin", "dev", "proc", "tmp", "etc", "opt/data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    for tool in ["sh", "echo", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    std::fs::write(root.join("etc/hostname"), "pulled\n").unwrap();
    for i in 0..6u64 {
        let data: Vec<u8> = (0..4 * MIB)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> (i + 7)) as u8)
            .collect();
        std::fs::write(root.join(format!("opt/data/blob{i}.bin")), data).unwrap();
    }
}

async fn store<B: Backend>(backend: B, dir: &Path, name: &str) -> LayerStore<B> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir.join(name)).unwrap());
    let opts = LayerStoreOptions::new(name).with_volume_size(128 * MIB);
    LayerStore::open(backend, meta, opts).await.unwrap()
}

#[test]
fn pulled_image_runs_lazily_through_fuse() {
    if !is_root() {
        slacker_testkit::skip_or_fail::<()>("the pull-and-run test needs root");
        return;
    }
    for tool in ["busybox", "mke2fs", "debugfs", "losetup", "chroot"] {
        if which(tool).is_none() {
            slacker_testkit::skip_or_fail::<()>(format!("{tool} is not installed"));
            return;
        }
    }
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
                slacker_testkit::skip_or_fail::<()>(format!("no registry: {e}"));
                return;
            }
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let storage = MemBackend::new();
    let counting = Arc::new(Counting::new(storage.reopen()));

    // Builder worker: directory tree -> ext4 volume -> snapshot reference -> registry.
    let root = dir.path().join("rootfs");
    busybox_tree(&root);
    let image = format!("{addr}/slacker/pulled:{}", std::process::id());
    let client = RegistryClient::new(ClientOptions::plain_http());
    let pushed = rt.block_on(async {
        let builder = store(storage.reopen(), dir.path(), "builder").await;
        builder.import_dir("busybox", &root).await.unwrap();
        client
            .push_image(&builder, "busybox", &image, &PushOptions::default())
            .await
            .unwrap()
    });
    assert!(pushed.layer_bytes_uploaded() < 4096, "{pushed:?}");

    // Run worker: pull records a lazy layer; get clones; the data path fetches on demand.
    let (volume, pulled_bytes) = rt.block_on(async {
        let worker = store(counting.clone(), dir.path(), "worker").await;
        let pulled = client.pull_image(&worker, &image).await.unwrap();
        let vol = worker.get(&pulled.top_layer).await.unwrap();
        (vol, pulled.layer_bytes_downloaded())
    });
    assert!(pulled_bytes < 4096, "pull moved {pulled_bytes} layer bytes");
    assert_eq!(
        counting.counts().bytes_read(),
        0,
        "pull and get must read no image data"
    );
    let image_size = rt.block_on(counting.stat_volume(&volume)).unwrap().size;

    let backend: Arc<dyn Backend> = counting.clone();
    let lazy = rt
        .block_on(LazyVolume::open(
            backend,
            volume,
            Arc::new(BlockCache::new(256 * MIB)),
            LazyVolumeOptions::default(),
        ))
        .unwrap();
    let m = Mount::lazy(lazy, &MountOptions::default().with_work_dir(dir.path())).unwrap();
    let out = m.run(&["/bin/sh", "-c", "echo hello"]).unwrap();
    let host = m.run(&["/bin/cat", "/etc/hostname"]).unwrap();
    m.unmount().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&host.stdout), "pulled\n");

    let fetched = counting.counts().bytes_read();
    eprintln!(
        "pulled image of {} MiB: fetched {} KiB at startup ({:.2}%)",
        image_size / MIB,
        fetched / 1024,
        100.0 * fetched as f64 / image_size as f64
    );
    assert!(fetched > 0, "the container must have read something");
    assert!(
        fetched * 100 < image_size * 15,
        "fetched {fetched} of {image_size} bytes: not lazy"
    );
}
