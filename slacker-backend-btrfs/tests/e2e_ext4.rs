//! End to end: ext4 built from a directory tree into a volume (mke2fs writes the volume
//! file directly), snapshot, clone, loop-mount the clone, read and write files, unmount;
//! the snapshot is unchanged and the clone's bitmap covers every block that differs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use slacker_core::{Backend, BackendExt, BlockIndex, VolumeId, VolumeOptions};
use support::sh;

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: &str) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A small but real tree: nested directories, files from 0 B to 3 MiB, a symlink.
fn make_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for (rel, len) in [
        ("etc/hostname", 12usize),
        ("etc/empty", 0),
        ("usr/bin/tool", 3 << 20),
        ("usr/lib/libx.so", 700_000),
        ("var/log/a/b/c/deep.txt", 5000),
        ("home/user/notes.md", 4096),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data = noise(len, rel);
        std::fs::write(&p, &data).unwrap();
        files.push((PathBuf::from(rel), data));
    }
    std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/tool-link")).unwrap();
    files
}

struct Mount(PathBuf);

impl Mount {
    fn new(image: &Path, at: &Path) -> Self {
        sh(Command::new("mount")
            .args(["-o", "loop", "-t", "ext4"])
            .arg(image)
            .arg(at))
        .expect("loop-mount the clone");
        Self(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if sh(Command::new("umount").arg(&self.0)).is_err() {
            let _ = sh(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

fn fsck_clean(image: &Path) {
    sh(Command::new("e2fsck").arg("-fn").arg(image)).expect("e2fsck -fn is clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_in_a_volume_snapshot_clone_mount() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    for tool in ["mke2fs", "e2fsck"] {
        if !support::have(tool) {
            slacker_testkit::skip_or_fail::<()>(format!(
                "{tool} is not installed (apt: e2fsprogs)"
            ));
            return;
        }
    }
    let b = support::open(dir.path());
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let files = make_tree(&tree);

    // Build the ext4 image straight into the volume file, outside the library.
    let base = VolumeId::new("base").unwrap();
    b.create_volume(&base, &VolumeOptions::new(64 << 20))
        .await
        .unwrap();
    let base_path = b.local_path(&base).await.unwrap();
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&base_path))
    .expect("mke2fs -d");
    // Every non-zero block mke2fs wrote must be in the bitmap, though no write went
    // through write_at (FIEMAP finds them).
    let st = b.stat_volume(&base).await.unwrap();
    let content = b.read_volume(&base).await.unwrap();
    let nonzero: Vec<u32> = content
        .chunks(4096)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&x| x != 0))
        .map(|(i, _)| i as u32)
        .collect();
    assert!(!nonzero.is_empty());
    for i in &nonzero {
        assert!(
            st.diverged.contains(BlockIndex(*i)),
            "mke2fs block {i} missing from bitmap"
        );
    }

    let snap = b.snapshot(&base).await.unwrap();
    let digest = b.snapshot_digest(&snap).await.unwrap();
    let clone = VolumeId::new("clone").unwrap();
    b.clone_snapshot(&snap, &clone).await.unwrap();
    assert!(b.stat_volume(&clone).await.unwrap().diverged.is_empty());

    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        let clone_path = b.local_path(&clone).await.unwrap();
        let _m = Mount::new(&clone_path, &mnt);
        for (rel, data) in &files {
            assert_eq!(
                &std::fs::read(mnt.join(rel)).unwrap(),
                data,
                "{}",
                rel.display()
            );
        }
        assert_eq!(
            std::fs::read_link(mnt.join("etc/tool-link")).unwrap(),
            PathBuf::from("../usr/bin/tool")
        );
        std::fs::write(mnt.join("home/user/new.bin"), noise(300_000, "new")).unwrap();
        sh(Command::new("sync").arg("-f").arg(&mnt)).unwrap();
    }

    // The snapshot did not change and is a clean ext4.
    assert_eq!(b.snapshot_digest(&snap).await.unwrap(), digest);
    let snap_file = b
        .root()
        .join("snapshots")
        .join(format!("{}.img", snap.key()));
    fsck_clean(&snap_file);
    fsck_clean(&b.local_path(&clone).await.unwrap());

    // The clone's bitmap covers every block that differs from the snapshot.
    let st = b.stat_volume(&clone).await.unwrap();
    let mine = b.read_volume(&clone).await.unwrap();
    let theirs = b.read_snapshot(&snap).await.unwrap();
    let differ: Vec<u32> = mine
        .chunks(4096)
        .zip(theirs.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect();
    let data_blocks = 300_000u64.div_ceil(4096);
    assert!(
        differ.len() as u64 >= data_blocks,
        "the new file's blocks differ"
    );
    for i in &differ {
        assert!(
            st.diverged.contains(BlockIndex(*i)),
            "differing block {i} missing from bitmap"
        );
    }
    let extra = st.diverged.len() - differ.len() as u64;
    eprintln!(
        "ext4 clone: {} blocks differ from the snapshot ({data_blocks} of them the new file's \
         data, the rest ext4 metadata and journal); the bitmap holds {} ({extra} more: blocks \
         the filesystem rewrote with identical bytes, which copy-on-write still moved)",
        differ.len(),
        st.diverged.len()
    );
    // Precise: nowhere near the 16384 blocks of the volume.
    assert!(st.diverged.len() < 4 * differ.len() as u64 + 64);
    let u = st.usage;
    eprintln!(
        "ext4 clone usage: exclusive {} KiB, shared {} KiB",
        u.exclusive_bytes.unwrap() >> 10,
        u.shared_bytes.unwrap() >> 10
    );
}
