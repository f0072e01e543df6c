//! A block that fails Merkle verification reaches the container as EIO, through the real
//! kernel path (process → ext4 → loop device → FUSE → `LazyVolume`), and is never cached:
//! once the wire is clean again, the same read returns the right bytes.
//!
//! Root, busybox, mke2fs and /dev/fuse; otherwise `SKIPPED` (a failure under `CI=true`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::merkle::{self, MerkleVerifier};
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, BlockSize, VolumeId, VolumeOptions};
use slacker_fuse::{Mount, MountOptions};
use slacker_testkit::checks::noise;
use slacker_testkit::wire::Wire;

const IMAGE_SIZE: u64 = 64 << 20;
const FILE_SIZE: usize = 1 << 20;

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

fn ready() -> Option<()> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return slacker_testkit::skip_or_fail("slacker-fuse mount tests need root");
    }
    for tool in ["mke2fs", "losetup", "mount", "umount", "chroot", "busybox"] {
        if which(tool).is_none() {
            return slacker_testkit::skip_or_fail(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return slacker_testkit::skip_or_fail("/dev/fuse is missing");
    }
    Some(())
}

/// A busybox root with `/opt/secret.bin`, as a 64 MiB ext4 image.
fn image(dir: &Path, secret: &[u8]) -> PathBuf {
    let tree = dir.join("tree");
    for d in ["bin", "dev", "proc", "tmp", "etc", "opt"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(which("busybox").unwrap(), tree.join("bin/busybox")).unwrap();
    for tool in ["sh", "cat"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(tool)).unwrap();
    }
    std::fs::write(tree.join("opt/secret.bin"), secret).unwrap();
    let img = dir.join("rootfs.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    img
}

#[test]
fn a_tampered_block_reaches_the_container_as_eio_and_is_never_cached() {
    if ready().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = noise(FILE_SIZE, 7);
    let img = image(dir.path(), &secret);
    let bytes = std::fs::read(&img).unwrap();
    // Where the file's second block landed in the image (ext4 stores data block-aligned).
    let probe = &secret[4096..8192];
    let at = (0..bytes.len() / 4096)
        .map(|b| b * 4096)
        .find(|&o| &bytes[o..o + 4096] == probe)
        .expect("the file's block is in the image") as u64;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let wire = Arc::new(Wire::new(MemBackend::new()));
    let backend: Arc<dyn Backend> = wire.clone();
    let (snap, volume) = rt.block_on(async {
        let v = VolumeId::new("image").unwrap();
        backend
            .create_volume(&v, &VolumeOptions::new(IMAGE_SIZE))
            .await
            .unwrap();
        for (i, chunk) in bytes.chunks(4 << 20).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                backend.write_at(&v, (i as u64) << 22, chunk).await.unwrap();
            }
        }
        let snap = backend.snapshot(&v).await.unwrap();
        let stat = backend.stat_snapshot(&snap).await.unwrap();
        let root = merkle::build(&*backend, &stat, None, &VolumeId::new("tree").unwrap())
            .await
            .unwrap();
        let verifier = Arc::new(
            MerkleVerifier::open(backend.clone(), &root, IMAGE_SIZE, BlockSize::DEFAULT)
                .await
                .unwrap(),
        );
        let c = VolumeId::new("c1").unwrap();
        backend.clone_snapshot(&snap, &c).await.unwrap();
        let cache = Arc::new(BlockCache::new(256 << 20));
        let volume = LazyVolume::open(
            backend.clone(),
            c,
            cache,
            LazyVolumeOptions::default().with_verifier(verifier),
        )
        .await
        .unwrap();
        (snap, volume)
    });

    let _guard = rt.enter();
    let m = Mount::lazy(
        volume.clone(),
        &MountOptions::default().with_work_dir(dir.path()),
    )
    .unwrap();
    // The wire now lies about one byte of the file's second block.
    wire.tamper(&snap, at + 100);
    let out = m.run(&["/bin/cat", "/opt/secret.bin"]).unwrap();
    assert!(!out.status.success(), "cat succeeded on a tampered block");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}"); // strerror(EIO)
    assert!(
        out.stdout.len() < FILE_SIZE && secret.starts_with(&out.stdout),
        "only verified bytes reached the container ({} B)",
        out.stdout.len()
    );
    let block = slacker_core::BlockIndex((at / 4096) as u32);
    assert!(
        !volume.present().contains(block),
        "the tampered block was served"
    );
    let m1 = volume.metrics();
    assert!(m1.fetched_blocks > 0);

    // The wire is clean again: the same read fetches the block again and succeeds, so
    // nothing of the tampered fetch was kept (not in the worker's cache, not in the
    // kernel's page cache).
    wire.heal();
    let out = m.run(&["/bin/cat", "/opt/secret.bin"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == secret, "the file reads back intact");
    assert!(volume.present().contains(block));
    assert!(volume.metrics().fetched_blocks > m1.fetched_blocks);
    m.unmount().unwrap();
}
