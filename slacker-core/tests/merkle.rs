//! The Merkle root of the reference layer: trees built from scratch and incrementally
//! match the root of the content; a worker verifies every fetched block, and a byte
//! flipped on the wire (in a block or in a tree block) fails the read with `Integrity`
//! and is never cached. (Flipping a byte on real storage: the btrfs backend's
//! `tests/merkle_tamper.rs`.)

mod common;

use std::sync::Arc;

use common::open_store;
use slacker_backend_mem::MemBackend;
use slacker_core::merkle::{self, MerkleVerifier, TreeLayout};
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
use slacker_core::{
    Backend, BackendExt, BlockSize, ErrorKind, SnapshotId, VolumeId, VolumeOptions,
};
use slacker_testkit::checks::noise;
use slacker_testkit::wire::Wire;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

/// A volume of `blocks` blocks of `bs` with noise in some blocks (the rest zeros),
/// snapshotted.
async fn image(b: &dyn Backend, name: &str, bs: u32, blocks: u64) -> (SnapshotId, Vec<u8>) {
    let bsz = u64::from(bs);
    let mut content = vec![0u8; (blocks * bsz) as usize];
    let v = vid(name);
    b.create_volume(
        &v,
        &VolumeOptions::new(blocks * bsz).with_block_size(BlockSize::new(bs).unwrap()),
    )
    .await
    .unwrap();
    for blk in (0..blocks).filter(|i| i % 7 == 0 || i % 11 == 3) {
        let data = noise(bs as usize, blk + 1);
        b.write_at(&v, blk * bsz, &data).await.unwrap();
        content[(blk * bsz) as usize..((blk + 1) * bsz) as usize].copy_from_slice(&data);
    }
    (b.snapshot(&v).await.unwrap(), content)
}

#[tokio::test]
async fn trees_from_scratch_match_the_content_root() {
    let b = MemBackend::new();
    // One block, one level of partial tree blocks, several levels (512-byte blocks: 16
    // hashes per tree block, so 1000 blocks are four levels deep).
    for (i, (bs, blocks)) in [(4096u32, 1u64), (4096, 300), (512, 1000), (512, 16)]
        .into_iter()
        .enumerate()
    {
        let (snap, content) = image(&b, &format!("img{i}"), bs, blocks).await;
        let stat = b.stat_snapshot(&snap).await.unwrap();
        let root = merkle::build(&b, &stat, None, &vid(&format!("t{i}")))
            .await
            .unwrap();
        let bsz = BlockSize::new(bs).unwrap();
        assert_eq!(
            root.hash().unwrap(),
            merkle::root_of_bytes(&content, bsz).unwrap(),
            "bs {bs} blocks {blocks}"
        );
        let layout = TreeLayout::new(content.len() as u64, bsz).unwrap();
        assert_eq!(
            b.stat_snapshot(&root.tree).await.unwrap().size,
            layout.tree_bytes()
        );
        // The scratch volume is gone; the tree snapshot stays.
        assert!(
            !b.list_volumes()
                .await
                .unwrap()
                .contains(&vid(&format!("t{i}")))
        );
        // Every block verifies; each flipped byte fails.
        let v = MerkleVerifier::open(Arc::new(b.reopen()), &root, content.len() as u64, bsz)
            .await
            .unwrap();
        v.verify(0, &content).await.unwrap();
        let mut bad = content.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x80;
        assert_eq!(
            v.verify(0, &bad).await.unwrap_err().kind(),
            ErrorKind::Integrity
        );
    }
    // An all-zero volume has the precomputed zero root and a tree of holes.
    let z = vid("zeros");
    b.create_volume(&z, &VolumeOptions::new(64 << 20))
        .await
        .unwrap();
    let zs = b.snapshot(&z).await.unwrap();
    let stat = b.stat_snapshot(&zs).await.unwrap();
    let root = merkle::build(&b, &stat, None, &vid("tz")).await.unwrap();
    let layout = TreeLayout::new(64 << 20, BlockSize::DEFAULT).unwrap();
    assert_eq!(root.hash().unwrap(), layout.zero_root());
    let tree = b.read_snapshot(&root.tree).await.unwrap();
    assert!(
        tree.iter().all(|&x| x == 0),
        "zero subtrees are stored as holes"
    );
}

#[tokio::test]
async fn incremental_trees_hash_only_the_diverged_blocks() {
    let b = Arc::new(Wire::new(MemBackend::new()));
    let blocks = 4096u64; // 16 MiB: 32 tree blocks of leaves
    let (base, mut content) = image(&*b, "base", 4096, blocks).await;
    let base_stat = b.stat_snapshot(&base).await.unwrap();
    let base_root = merkle::build(&*b, &base_stat, None, &vid("t"))
        .await
        .unwrap();

    let c = vid("c");
    b.clone_snapshot(&base, &c).await.unwrap();
    for blk in [5u64, 6, 2000, 4095] {
        let data = noise(4096, 1000 + blk);
        b.write_at(&c, blk * 4096, &data).await.unwrap();
        content[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
    }
    let snap = b.snapshot(&c).await.unwrap();
    let stat = b.stat_snapshot(&snap).await.unwrap();
    assert_eq!(stat.parent.as_ref(), Some(&base));
    let before = b.snapshot_bytes();
    let root = merkle::build(&*b, &stat, Some(&base_root), &vid("t"))
        .await
        .unwrap();
    assert_eq!(
        root.hash().unwrap(),
        merkle::root_of_bytes(&content, BlockSize::DEFAULT).unwrap()
    );
    // Read: the 4 diverged blocks, plus the base tree blocks on their paths (3 leaf tree
    // blocks and the top ones), never the whole image.
    let read = b.snapshot_bytes() - before;
    assert!(read <= 4 * 4096 + 6 * 4096, "read {read} bytes");
    assert!(read >= 4 * 4096, "the diverged blocks were hashed");

    // A tampered base tree is refused, not folded into the new root.
    let c2 = vid("c2");
    b.clone_snapshot(&base, &c2).await.unwrap();
    b.write_at(&c2, 0, b"x").await.unwrap();
    let s2 = b.snapshot(&c2).await.unwrap();
    let st2 = b.stat_snapshot(&s2).await.unwrap();
    b.tamper(&base_root.tree, 10);
    let err = merkle::build(&*b, &st2, Some(&base_root), &vid("t"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
}

#[tokio::test]
async fn layer_store_push_carries_a_root_that_the_worker_verifies() {
    let wire = Arc::new(Wire::new(MemBackend::new()));
    let dir = tempfile::tempdir().unwrap();
    // Builder and worker share the (wire-wrapped) storage.
    let mem = wire.inner().reopen();
    let b_store = open_store(mem.reopen(), &dir.path().join("b"), "builder", None)
        .await
        .unwrap();
    let vol = b_store.create("base", None).await.unwrap();
    let content = noise(64 * 4096, 3);
    b_store.backend().write_at(&vol, 0, &content).await.unwrap();
    let pushed = b_store.diff("base").await.unwrap();
    assert_eq!(
        pushed.reference.version,
        slacker_core::layer::reference::VERSION
    );
    let m = pushed
        .reference
        .merkle
        .clone()
        .expect("a version 2 reference");
    assert!(pushed.tar.len() <= 4096);

    // A child layer's push is incremental from the parent's tree and still exact.
    let child = b_store.create("child", Some("base")).await.unwrap();
    b_store
        .backend()
        .write_at(&child, 4096 * 3, b"changed")
        .await
        .unwrap();
    let child_diff = b_store.diff("child").await.unwrap();
    let full = b_store
        .backend()
        .read_snapshot(&child_diff.reference.snapshot)
        .await
        .unwrap();
    assert_eq!(
        child_diff
            .reference
            .merkle
            .as_ref()
            .unwrap()
            .hash()
            .unwrap(),
        merkle::root_of_bytes(&full, BlockSize::DEFAULT).unwrap()
    );

    // Pull on the worker: the record carries the root and holds the tree.
    let w_store = open_store(mem.reopen(), &dir.path().join("w"), "worker", None)
        .await
        .unwrap();
    w_store
        .apply_diff("img", None, std::io::Cursor::new(pushed.tar.clone()))
        .await
        .unwrap();
    let info = w_store.layer("img").await.unwrap();
    assert_eq!(info.merkle.as_ref(), Some(&m));
    let holds = mem.stat_snapshot(&m.tree).await.unwrap().holds;
    assert!(holds.iter().any(|h| h.starts_with("worker.")), "{holds:?}");
    let cvol = w_store.create("ctr", Some("img")).await.unwrap();

    // Read through the tampering wire, verified.
    let backend: Arc<dyn Backend> = wire.clone();
    let verifier = Arc::new(
        MerkleVerifier::open(backend.clone(), &m, info.size, BlockSize::DEFAULT)
            .await
            .unwrap(),
    );
    let cache = Arc::new(BlockCache::new(64 << 20));
    let open = |cache: Arc<BlockCache>| {
        LazyVolume::open(
            backend.clone(),
            cvol.clone(),
            cache,
            LazyVolumeOptions::default()
                .with_read_ahead(0)
                .with_max_read_ahead(0)
                .with_verifier(verifier.clone()),
        )
    };
    let lazy = open(cache.clone()).await.unwrap();
    wire.tamper(&pushed.reference.snapshot, 5 * 4096 + 17);
    let err = lazy.read_at(5 * 4096, 100).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert_eq!(verifier.stats().failures, 1);
    // Not cached: the next read goes to the wire again and fails again.
    let err = lazy.read_at(5 * 4096, 100).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert_eq!(
        cache.stats().resident_bytes,
        0,
        "a tampered block is never cached"
    );
    // Other blocks are served and verified.
    assert_eq!(
        &lazy.read_at(8 * 4096, 4096).await.unwrap()[..],
        &content[8 * 4096..9 * 4096]
    );
    // The wire heals: the block reads correctly (it was never cached tampered).
    wire.heal();
    assert_eq!(
        &lazy.read_at(5 * 4096, 4096).await.unwrap()[..],
        &content[5 * 4096..6 * 4096]
    );
    assert!(verifier.stats().blocks >= 2);

    // A flipped byte in a tree block fails the same way, on a fresh worker.
    let verifier2 = Arc::new(
        MerkleVerifier::open(backend.clone(), &m, info.size, BlockSize::DEFAULT)
            .await
            .unwrap(),
    );
    wire.tamper(&m.tree, 100);
    let lazy2 = LazyVolume::open(
        backend.clone(),
        cvol.clone(),
        Arc::new(BlockCache::new(64 << 20)),
        LazyVolumeOptions::default().with_verifier(verifier2),
    )
    .await
    .unwrap();
    let err = lazy2.read_at(0, 4096).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    wire.heal();

    // Without a verifier, the same tamper goes unnoticed: what the root buys.
    wire.tamper(&pushed.reference.snapshot, 9 * 4096);
    let unverified = LazyVolume::open(
        backend.clone(),
        cvol.clone(),
        Arc::new(BlockCache::new(64 << 20)),
        LazyVolumeOptions::default(),
    )
    .await
    .unwrap();
    assert_ne!(
        &unverified.read_at(9 * 4096, 4096).await.unwrap()[..],
        &content[9 * 4096..10 * 4096]
    );
    wire.heal();

    // Removing the layer releases the tree's hold.
    w_store.remove("ctr").await.unwrap();
    w_store.remove("img").await.unwrap();
    let holds = mem.stat_snapshot(&m.tree).await.unwrap().holds;
    assert!(!holds.iter().any(|h| h.starts_with("worker.")), "{holds:?}");
}
