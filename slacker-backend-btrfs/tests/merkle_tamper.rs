//! A byte flipped on the storage itself (the snapshot's file on btrfs, or the file of its
//! Merkle tree) fails a verified lazy read with `Integrity`, and the block is never
//! cached; untouched blocks are still served.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use slacker_core::merkle::{self, MerkleVerifier};
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, BlockSize, ErrorKind, SnapshotId, VolumeId, VolumeOptions};
use slacker_testkit::checks::pattern;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

/// Flips one bit of the file behind snapshot `s` at `at` (behind the backend's back).
fn flip(root: &Path, s: &SnapshotId, at: u64) {
    let p = root.join("snapshots").join(format!("{}.img", s.key()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_on_btrfs_fails_the_verified_read() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = Arc::new(support::open(dir.path()));
    let bs = 4096u64;
    let v = vid("img");
    b.create_volume(&v, &VolumeOptions::new(256 * bs))
        .await
        .unwrap();
    let content = pattern((64 * bs) as usize, 9);
    b.write_at(&v, 0, &content).await.unwrap();
    let snap = b.snapshot(&v).await.unwrap();
    let stat = b.stat_snapshot(&snap).await.unwrap();
    let root = merkle::build(&*b, &stat, None, &vid("tree")).await.unwrap();

    let backend: Arc<dyn Backend> = b.clone();
    let open = |verifier: Option<Arc<MerkleVerifier>>, cache: Arc<BlockCache>| {
        let mut o = LazyVolumeOptions::default()
            .with_read_ahead(0)
            .with_max_read_ahead(0);
        if let Some(v) = verifier {
            o = o.with_verifier(v);
        }
        // A view of the image: every block comes from the snapshot. (A clone opened after
        // the flip would see block 20 as diverged: btrfs notices that the extents no
        // longer match and reads the clone's own, intact copy.)
        LazyVolume::open_snapshot(backend.clone(), snap.clone(), cache, o)
    };
    let verifier = || async {
        Arc::new(
            MerkleVerifier::open(backend.clone(), &root, 256 * bs, BlockSize::DEFAULT)
                .await
                .unwrap(),
        )
    };

    // Untampered: verified reads serve the content.
    let cache = Arc::new(BlockCache::new(16 << 20));
    let lazy = open(Some(verifier().await), cache.clone()).await.unwrap();
    assert_eq!(
        &lazy.read_at(0, (8 * bs) as usize).await.unwrap()[..],
        &content[..(8 * bs) as usize]
    );

    // Flip a byte of block 20 in the snapshot's file.
    flip(dir.path(), &snap, 20 * bs + 1234);
    let cache = Arc::new(BlockCache::new(16 << 20));
    let lazy = open(Some(verifier().await), cache.clone()).await.unwrap();
    let err = lazy.read_at(20 * bs, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert_eq!(cache.stats().resident_blocks, 0, "never cached");
    assert_eq!(
        lazy.read_at(20 * bs, 10).await.unwrap_err().kind(),
        ErrorKind::Integrity
    );
    // Its neighbours are fine.
    assert_eq!(
        &lazy.read_at(21 * bs, bs as usize).await.unwrap()[..],
        &content[(21 * bs) as usize..(22 * bs) as usize]
    );
    // Unverified, the flipped byte reaches the reader: what verification prevents.
    let plain = open(None, Arc::new(BlockCache::new(16 << 20)))
        .await
        .unwrap();
    assert_ne!(
        &plain.read_at(20 * bs, bs as usize).await.unwrap()[..],
        &content[(20 * bs) as usize..(21 * bs) as usize]
    );

    // A byte flipped in the tree's file fails verification of the blocks below it.
    flip(dir.path(), &snap, 20 * bs + 1234); // restore the data
    flip(dir.path(), &root.tree, 40);
    let lazy = open(Some(verifier().await), Arc::new(BlockCache::new(16 << 20)))
        .await
        .unwrap();
    let err = lazy.read_at(0, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
}
