//! What the btrfs backend adds beyond the suite: bitmaps that see writes made outside the
//! library, dedup, total usage, and the on-write durability policy.

mod support;

use std::os::unix::fs::FileExt;

use slacker_backend_btrfs::{BtrfsBuilder, Durability};
use slacker_core::{Backend, BackendExt, BlockIndex, VolumeId, VolumeOptions};
use slacker_testkit::checks::pattern;

const K: u64 = 4096;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

/// Deterministic pseudo-random bytes (no two 4 KiB blocks alike, unlike `pattern`).
fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes through `local_path` (as a loop device would) show up in the bitmap, dirty or
/// not, and stay there after the volume is snapshotted (its rewritten extents are then
/// shared — with the new snapshot, not with the origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_outside_the_library_join_the_bitmap() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(64 * K))
        .await
        .unwrap();
    b.write_at(&v, 0, &pattern(64 * K as usize, 1))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    let path = b.local_path(&c).await.unwrap();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&pattern(K as usize, 2), 3 * K).unwrap();
        f.write_all_at(b"x", 40 * K + 17).unwrap();
        // No fsync: the pages are dirty when stat runs.
    }
    let st = b.stat_volume(&c).await.unwrap();
    let got: Vec<u32> = st.diverged.iter().map(|i| i.0).collect();
    assert_eq!(got, vec![3, 40], "outside writes, exactly");

    // Snapshot the clone: blocks 3 and 40 are now shared with s2, yet still differ from s.
    let s2 = b.snapshot(&c).await.unwrap();
    let st = b.stat_volume(&c).await.unwrap();
    assert!(st.diverged.contains(BlockIndex(3)) && st.diverged.contains(BlockIndex(40)));
    assert_eq!(st.diverged.len(), 2);
    let ss = b.stat_snapshot(&s2).await.unwrap();
    assert_eq!(ss.parent.as_ref(), Some(&s));
    assert_eq!(
        ss.diverged.iter().map(|i| i.0).collect::<Vec<_>>(),
        vec![3, 40]
    );

    // Remove the origin: the derived blocks were folded into the clone's metadata first.
    b.remove_snapshot(&s).await.unwrap();
    let st = b.stat_volume(&c).await.unwrap();
    assert!(st.diverged.contains(BlockIndex(3)) && st.diverged.contains(BlockIndex(40)));
    drop(b);
    let b = support::open(dir.path());
    let st = b.stat_volume(&c).await.unwrap();
    assert!(
        st.diverged.contains(BlockIndex(3)) && st.diverged.contains(BlockIndex(40)),
        "folded bitmap survives a reopen: {:?}",
        st.diverged
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_merges_identical_blocks_and_changes_no_content() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let same = noise(1 << 20, 5);
    let mut vols = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let v = vid(name);
        b.create_volume(&v, &VolumeOptions::new(2 << 20))
            .await
            .unwrap();
        b.write_at(&v, 0, &same).await.unwrap();
        b.write_at(&v, 1 << 20, &noise(64 << 10, 10 + i as u8))
            .await
            .unwrap();
        b.flush(&v).await.unwrap();
        vols.push(v);
    }
    let s = b.snapshot(&vols[0]).await.unwrap();
    let before_total = b.usage_total().await.unwrap();
    let contents: Vec<_> = {
        let mut c = Vec::new();
        for v in &vols {
            c.push(b.read_volume(v).await.unwrap());
        }
        c
    };
    let r = b.dedup().await.unwrap();
    assert!(r.blocks_scanned >= 4 * 256, "{r:?}");
    assert_eq!(
        r.bytes_deduplicated,
        2 << 20,
        "b and c now share a's 1 MiB: {r:?}"
    );
    let after_total = b.usage_total().await.unwrap();
    eprintln!("dedup: {r:?}; usage before {before_total:?}; after {after_total:?}");
    assert_eq!(before_total.unique_bytes, 3 * ((1 << 20) + (64 << 10)));
    assert_eq!(after_total.unique_bytes, (1 << 20) + 3 * (64 << 10));
    assert_eq!(after_total.logical_bytes, before_total.logical_bytes);
    for (v, c) in vols.iter().zip(&contents) {
        assert_eq!(&b.read_volume(v).await.unwrap(), c, "dedup changed {v}");
        let u = b.stat_volume(v).await.unwrap().usage;
        assert!(u.shared_bytes.unwrap() >= 1 << 20, "{v}: {u:?}");
    }
    assert_eq!(b.read_snapshot(&s).await.unwrap(), contents[0]);
    // Nothing left to merge.
    assert_eq!(b.dedup().await.unwrap().bytes_deduplicated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_total_counts_shared_extents_once() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(8 << 20))
        .await
        .unwrap();
    b.write_at(&v, 0, &pattern(4 << 20, 1)).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    for i in 0..5 {
        b.clone_snapshot(&s, &vid(&format!("c{i}"))).await.unwrap();
    }
    let t = b.usage_total().await.unwrap();
    assert_eq!(t.files, 7);
    assert_eq!(t.logical_bytes, 7 * (8 << 20));
    assert_eq!(t.referenced_bytes, 7 * (4 << 20));
    assert_eq!(t.unique_bytes, 4 << 20, "{t:?}");
}

/// With `Durability::OnWrite`, the bitmap document is written before `write_at` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_write_durability_persists_the_bitmap_at_once() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = BtrfsBuilder::new(dir.path())
        .durability(Durability::OnWrite)
        .build()
        .unwrap();
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(16 * K))
        .await
        .unwrap();
    b.write_at(&v, 5 * K, b"durable").await.unwrap();
    let doc = std::fs::read_to_string(dir.path().join("meta/volume.v.json")).unwrap();
    assert!(
        doc.contains("5") && doc.contains("6"),
        "bitmap [5, 6) persisted: {doc}"
    );
    let on_flush = support::open(dir.path());
    let doc = std::fs::read_to_string(dir.path().join("meta/volume.v.json")).unwrap();
    on_flush.write_at(&v, 9 * K, b"later").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("meta/volume.v.json")).unwrap(),
        doc,
        "on-flush durability batches the bitmap until flush"
    );
    on_flush.flush(&v).await.unwrap();
    let st = support::open(dir.path()).stat_volume(&v).await.unwrap();
    assert!(st.diverged.contains(BlockIndex(5)) && st.diverged.contains(BlockIndex(9)));
}

/// Creates, clones, snapshots, removals, IO, stats and a dedup racing each other on a few
/// names: every outcome is Ok or a typed error, nothing deadlocks, and a reopen agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_neither_deadlock_nor_corrupt() {
    use std::sync::Arc;
    use std::time::Duration;

    use slacker_core::ErrorKind;

    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = Arc::new(support::open(dir.path()));
    let base = vid("base");
    b.create_volume(&base, &VolumeOptions::new(32 * K))
        .await
        .unwrap();
    b.write_at(&base, 0, &noise(32 * K as usize, 1))
        .await
        .unwrap();
    let s = b.snapshot(&base).await.unwrap();
    let work = async {
        let mut tasks = Vec::new();
        for t in 0..6u8 {
            let (b, s, base) = (Arc::clone(&b), s.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..12u8 {
                    let name = vid(&format!("n{}", (t + i) % 4));
                    let r = match (t + i) % 6 {
                        0 => b.clone_snapshot(&s, &name).await,
                        1 => b.create_volume(&name, &VolumeOptions::new(8 * K)).await,
                        2 => b.write_at(&name, K, &noise(100, i)).await,
                        3 => b.remove_volume(&name).await,
                        4 => match b.snapshot(&name).await {
                            Ok(x) => b.remove_snapshot(&x).await,
                            Err(e) => Err(e),
                        },
                        _ => b.stat_volume(&name).await.map(|_| ()),
                    };
                    if let Err(e) = r {
                        assert!(
                            matches!(e.kind(), ErrorKind::NotFound | ErrorKind::AlreadyExists),
                            "unexpected error: {e}"
                        );
                    }
                    b.read_at(&base, 0, K as usize).await.unwrap();
                }
            }));
        }
        let b2 = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b2.dedup().await.unwrap();
        }));
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("no deadlock");
    let vols = b.list_volumes().await.unwrap();
    let snaps = b.list_snapshots().await.unwrap();
    let mut contents = Vec::new();
    for v in &vols {
        contents.push(b.read_volume(v).await.unwrap());
    }
    let again = support::open(dir.path());
    assert_eq!(again.list_volumes().await.unwrap(), vols);
    assert_eq!(again.list_snapshots().await.unwrap(), snaps);
    for (v, c) in vols.iter().zip(&contents) {
        assert_eq!(&again.read_volume(v).await.unwrap(), c);
    }
    assert_eq!(
        b.read_snapshot(&s).await.unwrap(),
        noise(32 * K as usize, 1)
    );
}
