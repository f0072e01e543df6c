//! The conformance checks. Each takes a [`Harness`], gets a fresh backend and asserts on
//! contents and [`ErrorKind`]s; a failing check panics with what went wrong.
//!
//! The names are the ones the `# Contract` section of [`slacker_core::Backend`] cites.

use std::sync::Arc;

use slacker_core::{
    Backend, BackendExt, BlockIndex, BlockRange, BlockSize, ErrorKind, Result, SnapshotId,
    VolumeId, VolumeOptions,
};

use crate::Harness;

const BS: u64 = 4096;

/// A volume id from a literal.
pub fn vid(name: &str) -> VolumeId {
    VolumeId::new(name).expect("valid volume id")
}

/// `len` bytes of a recognizable, seed-dependent, never-all-zero pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// `len` deterministic pseudo-random bytes (xorshift64 seeded with `seed`): data that
/// neither compresses nor repeats, for tests and benchmarks that move real volumes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts that `r` failed with `kind`.
#[track_caller]
pub fn assert_kind<T: std::fmt::Debug>(r: Result<T>, kind: ErrorKind) {
    match r {
        Ok(v) => panic!("expected {kind:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "expected {kind:?}, got {e}"),
    }
}

async fn volume<B: Backend + ?Sized>(b: &B, name: &str, blocks: u64) -> VolumeId {
    let id = vid(name);
    b.create_volume(&id, &VolumeOptions::new(blocks * BS))
        .await
        .expect("create volume");
    id
}

/// An id of the backend's scheme that no backend mints.
fn never_minted<B: Backend + ?Sized>(b: &B) -> SnapshotId {
    SnapshotId::new(b.info().scheme, "never-minted-0").expect("valid id")
}

/// Checks the bitmap invariant on every block of `v`.
async fn assert_invariant<B: Backend + ?Sized>(b: &B, v: &VolumeId) {
    let st = b.stat_volume(v).await.expect("stat");
    let bs = st.block_size.bytes();
    let blocks = (st.size / bs) as u32;
    for i in 0..blocks {
        if st.diverged.contains(BlockIndex(i)) {
            continue;
        }
        let off = u64::from(i) * bs;
        let mine = b.read_at(v, off, bs as usize).await.expect("read");
        let origin = match &st.origin {
            Some(s) => b
                .read_snapshot_at(s, off, bs as usize)
                .await
                .expect("read origin"),
            None => vec![0u8; bs as usize].into(),
        };
        assert!(
            mine == origin,
            "block {i} of {v} is outside the diverged bitmap but differs from its origin"
        );
    }
}

/// A new volume reads as zeros, at the start, the middle and the end.
pub async fn new_volume_reads_zeros<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 16).await;
    for (off, len) in [
        (0, 4096),
        (5000, 100),
        (16 * BS - 10, 10),
        (0, 16 * BS as usize),
    ] {
        let data = b.read_at(&v, off, len).await.expect("read");
        assert_eq!(data.len(), len);
        assert!(data.iter().all(|&x| x == 0), "new volume not zero at {off}");
    }
    assert!(b.stat_volume(&v).await.unwrap().diverged.is_empty());
}

/// Reads past the end fail with `OutOfRange`; a read ending exactly at the end works.
pub async fn read_past_end_is_out_of_range<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 2).await;
    b.read_at(&v, 2 * BS - 1, 1).await.expect("last byte");
    assert_kind(b.read_at(&v, 2 * BS - 1, 2).await, ErrorKind::OutOfRange);
    assert_kind(b.read_at(&v, 2 * BS, 1).await, ErrorKind::OutOfRange);
    assert_kind(b.read_at(&v, u64::MAX, 1).await, ErrorKind::OutOfRange);
    let s = b.snapshot(&v).await.unwrap();
    assert_kind(
        b.read_snapshot_at(&s, 2 * BS, 1).await,
        ErrorKind::OutOfRange,
    );
}

/// Writes past the end fail with `OutOfRange` and change nothing.
pub async fn write_past_end_is_out_of_range<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 2).await;
    assert_kind(
        b.write_at(&v, 2 * BS - 2, b"abc").await,
        ErrorKind::OutOfRange,
    );
    assert_kind(
        b.write_at(&v, u64::MAX - 1, b"abc").await,
        ErrorKind::OutOfRange,
    );
    let all = b.read_at(&v, 0, 2 * BS as usize).await.unwrap();
    assert!(all.iter().all(|&x| x == 0), "a refused write changed data");
    b.write_at(&v, 2 * BS - 3, b"abc")
        .await
        .expect("write ending at the end");
}

/// Unaligned writes, writes inside one block and writes straddling blocks read back.
pub async fn partial_and_straddling_writes_read_back<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 8).await;
    let mut model = vec![0u8; 8 * BS as usize];
    for (off, len, seed) in [
        (1usize, 10usize, 1u8),
        (4090, 20, 2),
        (8191, 4098, 3),
        (3 * 4096, 4096, 4),
        (100, 3 * 4096 + 7, 5),
        (8 * 4096 - 1, 1, 6),
    ] {
        let data = pattern(len, seed);
        b.write_at(&v, off as u64, &data).await.expect("write");
        model[off..off + len].copy_from_slice(&data);
    }
    b.flush(&v).await.unwrap();
    assert_eq!(
        &b.read_at(&v, 0, model.len()).await.unwrap()[..],
        &model[..]
    );
    assert_eq!(
        &b.read_at(&v, 4093, 9000).await.unwrap()[..],
        &model[4093..4093 + 9000]
    );
    b.write_at(&v, 10, &[]).await.expect("empty write");
}

/// Zero sizes and sizes not a multiple of the block size are refused.
pub async fn invalid_volume_options_are_rejected<H: Harness>(h: &H) {
    let b = h.fresh().await;
    assert_kind(
        b.create_volume(&vid("z"), &VolumeOptions::new(0)).await,
        ErrorKind::InvalidInput,
    );
    assert_kind(
        b.create_volume(&vid("odd"), &VolumeOptions::new(BS + 1))
            .await,
        ErrorKind::InvalidInput,
    );
    assert_kind(
        b.create_volume(
            &vid("odd2"),
            &VolumeOptions::new(96 * 1024).with_block_size(BlockSize::new(65536).unwrap()),
        )
        .await,
        ErrorKind::InvalidInput,
    );
    assert!(
        b.list_volumes().await.unwrap().is_empty(),
        "refused volumes were created"
    );
}

/// The diverged bitmap counts in the volume's own block size (512 B and 64 KiB).
pub async fn block_sizes_are_respected<H: Harness>(h: &H) {
    let b = h.fresh().await;
    for (name, bs) in [("small", 512u32), ("big", 65536u32)] {
        let bsz = BlockSize::new(bs).unwrap();
        let id = vid(name);
        b.create_volume(
            &id,
            &VolumeOptions::new(4 * u64::from(bs)).with_block_size(bsz),
        )
        .await
        .unwrap();
        b.write_at(&id, u64::from(bs) + 1, b"x").await.unwrap();
        let st = b.stat_volume(&id).await.unwrap();
        assert_eq!(st.block_size, bsz);
        assert_eq!(st.size, 4 * u64::from(bs));
        assert!(
            st.diverged.contains(BlockIndex(1)),
            "{name}: written block missing"
        );
        let s = b.snapshot(&id).await.unwrap();
        assert_eq!(b.stat_snapshot(&s).await.unwrap().block_size, bsz);
        let c = vid(&format!("{name}-clone"));
        b.clone_snapshot(&s, &c).await.unwrap();
        assert_eq!(b.stat_volume(&c).await.unwrap().block_size, bsz);
        b.write_at(&c, 3 * u64::from(bs), b"y").await.unwrap();
        assert_invariant(&b, &c).await;
    }
}

/// Creating a volume twice fails with `AlreadyExists` and keeps the first one's data;
/// so does cloning onto an existing name.
pub async fn create_existing_volume_fails<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 2).await;
    b.write_at(&v, 0, b"keep").await.unwrap();
    assert_kind(
        b.create_volume(&v, &VolumeOptions::new(BS)).await,
        ErrorKind::AlreadyExists,
    );
    let s = b.snapshot(&v).await.unwrap();
    assert_kind(b.clone_snapshot(&s, &v).await, ErrorKind::AlreadyExists);
    assert_eq!(&b.read_at(&v, 0, 4).await.unwrap()[..], b"keep");
    assert_eq!(b.stat_volume(&v).await.unwrap().size, 2 * BS);
}

/// A 64 GiB volume with one block written snapshots and clones, and reads zeros at its end.
pub async fn huge_sparse_volume<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = vid("huge");
    let size = 64u64 << 30;
    b.create_volume(&v, &VolumeOptions::new(size))
        .await
        .unwrap();
    b.write_at(&v, size / 2, b"middle").await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("huge-clone");
    b.clone_snapshot(&s, &c).await.unwrap();
    assert_eq!(&b.read_at(&c, size / 2, 6).await.unwrap()[..], b"middle");
    assert!(
        b.read_at(&c, size - BS, BS as usize)
            .await
            .unwrap()
            .iter()
            .all(|&x| x == 0)
    );
    assert_eq!(b.stat_volume(&c).await.unwrap().size, size);
}

/// A snapshot reads as the volume did when taken, whatever happens to the volume later.
pub async fn snapshot_is_frozen<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 4).await;
    let before = pattern(4 * BS as usize, 7);
    b.write_at(&v, 0, &before).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    b.write_at(&v, 10, &pattern(9000, 8)).await.unwrap();
    b.write_at(&v, 3 * BS, &pattern(BS as usize, 9))
        .await
        .unwrap();
    assert_eq!(&b.read_snapshot(&s).await.unwrap()[..], &before[..]);
    let s2 = b.snapshot(&v).await.unwrap();
    assert_ne!(s, s2, "two snapshots must have distinct ids");
    assert_ne!(
        b.read_snapshot(&s2).await.unwrap(),
        b.read_snapshot(&s).await.unwrap()
    );
}

/// Removing a volume leaves its snapshots readable and unchanged.
pub async fn snapshot_survives_volume_removal<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 3).await;
    let data = pattern(3 * BS as usize, 11);
    b.write_at(&v, 0, &data).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    b.remove_volume(&v).await.unwrap();
    assert_eq!(&b.read_snapshot(&s).await.unwrap()[..], &data[..]);
    let again = volume(&b, "v", 1).await;
    assert!(
        b.read_at(&again, 0, 16)
            .await
            .unwrap()
            .iter()
            .all(|&x| x == 0)
    );
    assert_eq!(&b.read_snapshot(&s).await.unwrap()[..], &data[..]);
}

/// A snapshot of a clone reads as the clone; its clone reads as it; origins chain.
pub async fn snapshot_of_clone<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 4).await;
    b.write_at(&v, 0, &pattern(4 * BS as usize, 1))
        .await
        .unwrap();
    let s1 = b.snapshot(&v).await.unwrap();
    let c1 = vid("c1");
    b.clone_snapshot(&s1, &c1).await.unwrap();
    b.write_at(&c1, BS, &pattern(100, 2)).await.unwrap();
    let s2 = b.snapshot(&c1).await.unwrap();
    assert_eq!(
        b.stat_snapshot(&s2).await.unwrap().parent.as_ref(),
        Some(&s1)
    );
    let c2 = vid("c2");
    b.clone_snapshot(&s2, &c2).await.unwrap();
    let expect = b.read_volume(&c1).await.unwrap();
    b.write_at(&c1, 0, &pattern(50, 3)).await.unwrap();
    assert_eq!(b.read_volume(&c2).await.unwrap(), expect);
    assert_eq!(b.read_snapshot(&s2).await.unwrap(), expect);
    assert_eq!(b.stat_volume(&c2).await.unwrap().origin.as_ref(), Some(&s2));
    assert_invariant(&b, &c2).await;
}

/// A clone reads exactly as its snapshot.
pub async fn clone_reads_as_snapshot<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 5).await;
    b.write_at(&v, 3, &pattern(2 * BS as usize, 4))
        .await
        .unwrap();
    b.write_at(&v, 4 * BS, &pattern(BS as usize, 5))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    assert_eq!(
        b.read_volume(&c).await.unwrap(),
        b.read_snapshot(&s).await.unwrap()
    );
    let st = b.stat_volume(&c).await.unwrap();
    assert_eq!(st.size, 5 * BS);
    assert_eq!(st.origin, Some(s));
}

/// Writes to a clone reach neither the snapshot, the volume, nor a sibling clone.
pub async fn clone_writes_are_private<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 4).await;
    let base = pattern(4 * BS as usize, 12);
    b.write_at(&v, 0, &base).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let (c1, c2) = (vid("c1"), vid("c2"));
    b.clone_snapshot(&s, &c1).await.unwrap();
    b.clone_snapshot(&s, &c2).await.unwrap();
    b.write_at(&c1, 100, b"only in c1").await.unwrap();
    b.write_at(&c1, 2 * BS - 3, &pattern(BS as usize, 13))
        .await
        .unwrap();
    assert_eq!(&b.read_snapshot(&s).await.unwrap()[..], &base[..]);
    assert_eq!(&b.read_volume(&c2).await.unwrap()[..], &base[..]);
    assert_eq!(&b.read_volume(&v).await.unwrap()[..], &base[..]);
    assert_eq!(&b.read_at(&c1, 100, 10).await.unwrap()[..], b"only in c1");
    b.write_at(&v, 0, b"volume").await.unwrap();
    assert_eq!(&b.read_at(&c2, 0, 6).await.unwrap()[..], &base[..6]);
    assert_eq!(&b.read_snapshot_at(&s, 0, 6).await.unwrap()[..], &base[..6]);
}

/// Eight concurrent clones of one snapshot all succeed and read as the snapshot.
pub async fn concurrent_clones_of_one_snapshot<H: Harness>(h: &H) {
    let b = Arc::new(h.fresh().await);
    let v = volume(&*b, "v", 4).await;
    b.write_at(&v, 0, &pattern(4 * BS as usize, 14))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (b, s) = (Arc::clone(&b), s.clone());
        tasks.push(tokio::spawn(async move {
            let c = vid(&format!("c{i}"));
            b.clone_snapshot(&s, &c).await.map(|_| c)
        }));
    }
    let want = b.read_snapshot(&s).await.unwrap();
    for t in tasks {
        let c = t.await.expect("task").expect("concurrent clone");
        assert_eq!(b.read_volume(&c).await.unwrap(), want);
    }
    assert_eq!(b.list_volumes().await.unwrap().len(), 9);
}

/// Every block a write touches is in the bitmap after the write returns.
pub async fn bitmap_covers_writes<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 8).await;
    b.write_at(&v, BS - 1, b"ab").await.unwrap();
    b.write_at(&v, 5 * BS + 7, b"c").await.unwrap();
    let st = b.stat_volume(&v).await.unwrap();
    for i in [0, 1, 5] {
        assert!(
            st.diverged.contains(BlockIndex(i)),
            "block {i} written but not in bitmap"
        );
    }
    assert_invariant(&b, &v).await;
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    b.write_at(&c, 3 * BS, &pattern(2 * BS as usize, 15))
        .await
        .unwrap();
    let st = b.stat_volume(&c).await.unwrap();
    assert!(
        st.diverged.contains_range(BlockRange::new(3, 5)),
        "clone write not in bitmap"
    );
    assert_invariant(&b, &c).await;
}

/// A fresh clone has an empty bitmap (it is all origin).
pub async fn fresh_clone_has_empty_bitmap<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 4).await;
    b.write_at(&v, 0, &pattern(4 * BS as usize, 16))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    let st = b.stat_volume(&c).await.unwrap();
    assert!(
        st.diverged.is_empty(),
        "fresh clone reports diverged blocks: {:?}",
        st.diverged
    );
}

/// The invariant holds on every volume after a fixed mixed workload.
pub async fn bitmap_invariant_over_a_workload<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 6).await;
    b.write_at(&v, 0, &pattern(6 * BS as usize, 17))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let mut live = vec![v.clone()];
    for i in 0..4u8 {
        let c = vid(&format!("c{i}"));
        b.clone_snapshot(&s, &c).await.unwrap();
        b.write_at(
            &c,
            u64::from(i) * 5000,
            &pattern(3000 + usize::from(i) * 1000, i),
        )
        .await
        .unwrap();
        if i % 2 == 1 {
            let si = b.snapshot(&c).await.unwrap();
            let cc = vid(&format!("cc{i}"));
            b.clone_snapshot(&si, &cc).await.unwrap();
            b.write_at(&cc, 5 * BS, b"tail").await.unwrap();
            live.push(cc);
        }
        live.push(c);
    }
    b.write_at(&v, BS, b"after").await.unwrap();
    for v in &live {
        assert_invariant(&b, v).await;
    }
}

/// Removing a snapshot leaves its clones readable and unchanged.
pub async fn removing_snapshot_keeps_clones<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 3).await;
    b.write_at(&v, 0, &pattern(3 * BS as usize, 18))
        .await
        .unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    b.write_at(&c, 5, b"mine").await.unwrap();
    let want = b.read_volume(&c).await.unwrap();
    b.remove_snapshot(&s).await.unwrap();
    b.remove_volume(&v).await.unwrap();
    assert_eq!(b.read_volume(&c).await.unwrap(), want);
    b.write_at(&c, 2 * BS, b"more").await.unwrap();
    assert_eq!(&b.read_at(&c, 2 * BS, 4).await.unwrap()[..], b"more");
    assert_eq!(&b.read_at(&c, 5, 4).await.unwrap()[..], b"mine");
}

/// A held snapshot cannot be removed (`InUse`) until every hold is released.
pub async fn held_snapshot_cannot_be_removed<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 1).await;
    let s = b.snapshot(&v).await.unwrap();
    b.hold_snapshot(&s, "layer-a").await.unwrap();
    b.hold_snapshot(&s, "layer-a")
        .await
        .expect("hold is idempotent");
    b.hold_snapshot(&s, "layer-b").await.unwrap();
    assert_kind(b.hold_snapshot(&s, "../bad").await, ErrorKind::InvalidInput);
    assert_eq!(
        b.stat_snapshot(&s).await.unwrap().holds,
        vec!["layer-a", "layer-b"]
    );
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::InUse);
    b.release_snapshot(&s, "layer-a").await.unwrap();
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::InUse);
    b.read_snapshot_at(&s, 0, 1)
        .await
        .expect("still there after a refused remove");
    b.release_snapshot(&s, "layer-b").await.unwrap();
    b.remove_snapshot(&s).await.unwrap();
    assert_kind(b.stat_snapshot(&s).await, ErrorKind::NotFound);
}

/// Releasing a hold nobody placed fails with `NotFound`.
pub async fn release_unknown_hold_fails<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 1).await;
    let s = b.snapshot(&v).await.unwrap();
    assert_kind(b.release_snapshot(&s, "nobody").await, ErrorKind::NotFound);
    assert_kind(
        b.hold_snapshot(&never_minted(&b), "x").await,
        ErrorKind::NotFound,
    );
}

/// Every volume operation on an unknown id fails with `NotFound`.
pub async fn unknown_volume_is_not_found<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let x = vid("nope");
    assert_kind(b.read_at(&x, 0, 1).await, ErrorKind::NotFound);
    assert_kind(b.write_at(&x, 0, b"a").await, ErrorKind::NotFound);
    assert_kind(b.flush(&x).await, ErrorKind::NotFound);
    assert_kind(b.snapshot(&x).await, ErrorKind::NotFound);
    assert_kind(b.stat_volume(&x).await, ErrorKind::NotFound);
    assert_kind(b.remove_volume(&x).await, ErrorKind::NotFound);
}

/// Every snapshot operation on an unknown id fails with `NotFound`.
pub async fn unknown_snapshot_is_not_found<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let s = never_minted(&b);
    assert_kind(b.read_snapshot_at(&s, 0, 1).await, ErrorKind::NotFound);
    assert_kind(b.clone_snapshot(&s, &vid("c")).await, ErrorKind::NotFound);
    assert_kind(b.stat_snapshot(&s).await, ErrorKind::NotFound);
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::NotFound);
    assert!(
        b.list_volumes().await.unwrap().is_empty(),
        "failed clone left a volume"
    );
}

/// Ids of removed volumes and snapshots fail with `NotFound`, and are not reused.
pub async fn removed_ids_are_not_found<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 1).await;
    let s = b.snapshot(&v).await.unwrap();
    b.remove_snapshot(&s).await.unwrap();
    b.remove_volume(&v).await.unwrap();
    assert_kind(b.read_at(&v, 0, 1).await, ErrorKind::NotFound);
    assert_kind(b.read_snapshot_at(&s, 0, 1).await, ErrorKind::NotFound);
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::NotFound);
    assert_kind(b.clone_snapshot(&s, &vid("c")).await, ErrorKind::NotFound);
    let v2 = volume(&b, "v2", 1).await;
    let s2 = b.snapshot(&v2).await.unwrap();
    assert_ne!(s, s2, "a removed snapshot id was minted again");
}

/// A snapshot id of another backend's scheme fails with `InvalidInput`.
pub async fn foreign_snapshot_id_is_invalid<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let scheme = if b.info().scheme == "zz" { "yy" } else { "zz" };
    let s = SnapshotId::new(scheme, "s1").unwrap();
    assert_kind(b.read_snapshot_at(&s, 0, 1).await, ErrorKind::InvalidInput);
    assert_kind(
        b.clone_snapshot(&s, &vid("c")).await,
        ErrorKind::InvalidInput,
    );
    assert_kind(b.stat_snapshot(&s).await, ErrorKind::InvalidInput);
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::InvalidInput);
    assert_kind(b.hold_snapshot(&s, "h").await, ErrorKind::InvalidInput);
}

/// Volumes, snapshots, clones, bitmaps and holds survive a reopen.
pub async fn reopen_keeps_acknowledged_state<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 4).await;
    let data = pattern(4 * BS as usize, 19);
    b.write_at(&v, 0, &data).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    b.hold_snapshot(&s, "keeper").await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    b.write_at(&c, BS + 1, b"clone data").await.unwrap();
    b.flush(&c).await.unwrap();
    b.flush(&v).await.unwrap();
    let before = b.stat_volume(&c).await.unwrap();
    let b = h.reopen(b).await;
    assert_eq!(&b.read_volume(&v).await.unwrap()[..], &data[..]);
    assert_eq!(&b.read_snapshot(&s).await.unwrap()[..], &data[..]);
    assert_eq!(&b.read_at(&c, BS + 1, 10).await.unwrap()[..], b"clone data");
    let after = b.stat_volume(&c).await.unwrap();
    assert_eq!(after.origin, before.origin);
    assert!(
        before.diverged.is_subset(&after.diverged),
        "reopen lost diverged blocks"
    );
    assert_invariant(&b, &c).await;
    assert_kind(b.remove_snapshot(&s).await, ErrorKind::InUse);
    let s2 = b.snapshot(&v).await.unwrap();
    assert_ne!(s, s2, "a reopened backend minted an existing id again");
}

/// `list_*` report every live volume and snapshot, sorted, and nothing removed.
pub async fn list_reports_everything<H: Harness>(h: &H) {
    let b = h.fresh().await;
    assert!(b.list_volumes().await.unwrap().is_empty());
    assert!(b.list_snapshots().await.unwrap().is_empty());
    let a = volume(&b, "b-vol", 1).await;
    let z = volume(&b, "a-vol", 1).await;
    let s1 = b.snapshot(&a).await.unwrap();
    let s2 = b.snapshot(&z).await.unwrap();
    let c = vid("c-vol");
    b.clone_snapshot(&s1, &c).await.unwrap();
    assert_eq!(
        b.list_volumes().await.unwrap(),
        vec![z.clone(), a.clone(), c.clone()]
    );
    let mut want = vec![s1.clone(), s2.clone()];
    want.sort();
    assert_eq!(b.list_snapshots().await.unwrap(), want);
    b.remove_volume(&a).await.unwrap();
    b.remove_snapshot(&s2).await.unwrap();
    assert_eq!(b.list_volumes().await.unwrap(), vec![z, c]);
    assert_eq!(b.list_snapshots().await.unwrap(), vec![s1]);
}

/// `stat` reports sizes, block sizes and origins.
pub async fn stat_reports_size_and_origin<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let v = volume(&b, "v", 7).await;
    let st = b.stat_volume(&v).await.unwrap();
    assert_eq!(
        (st.size, st.block_size, st.origin),
        (7 * BS, BlockSize::DEFAULT, None)
    );
    let s = b.snapshot(&v).await.unwrap();
    let ss = b.stat_snapshot(&s).await.unwrap();
    assert_eq!(
        (ss.size, ss.parent.clone(), ss.holds.len()),
        (7 * BS, None, 0)
    );
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    let cs = b.stat_volume(&c).await.unwrap();
    assert_eq!(cs.id, c);
    assert_eq!(cs.origin, Some(s));
    assert_eq!(cs.size, 7 * BS);
}

/// Where usage is a capability: a clone is mostly shared, its writes are exclusive.
pub async fn usage_reports_exclusive_and_shared<H: Harness>(h: &H) {
    let b = h.fresh().await;
    if !b.info().capabilities.usage {
        return;
    }
    let v = volume(&b, "v", 64).await;
    b.write_at(&v, 0, &pattern(64 * BS as usize, 20))
        .await
        .unwrap();
    b.flush(&v).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let c = vid("c");
    b.clone_snapshot(&s, &c).await.unwrap();
    b.write_at(&c, 0, &pattern(2 * BS as usize, 21))
        .await
        .unwrap();
    b.flush(&c).await.unwrap();
    let u = b.stat_volume(&c).await.unwrap().usage;
    let (ex, sh) = (
        u.exclusive_bytes.expect("exclusive bytes reported"),
        u.shared_bytes.expect("shared bytes reported"),
    );
    assert!(
        (2 * BS..32 * BS).contains(&ex),
        "exclusive {ex} not about the 2 blocks written"
    );
    assert!(
        sh >= 32 * BS,
        "shared {sh} should cover most of the 64 blocks"
    );
}

/// Where local paths are a capability: the file holds the volume's bytes.
pub async fn local_path_reads_as_volume<H: Harness>(h: &H) {
    let b = h.fresh().await;
    if !b.info().capabilities.local_path {
        return;
    }
    let v = volume(&b, "v", 3).await;
    b.write_at(&v, 5, b"on disk").await.unwrap();
    b.flush(&v).await.unwrap();
    let p = b.local_path(&v).await.unwrap();
    let file = std::fs::read(&p).expect("read local path");
    assert_eq!(file.len() as u64, 3 * BS);
    assert_eq!(&file[5..12], b"on disk");
    assert_kind(b.local_path(&vid("nope")).await, ErrorKind::NotFound);
}

/// Every capability reported missing fails with `Unsupported` naming the operation.
pub async fn missing_capabilities_fail_unsupported<H: Harness>(h: &H) {
    let b = h.fresh().await;
    let caps = b.info().capabilities;
    let v = volume(&b, "v", 1).await;
    if !caps.local_path {
        let e = b.local_path(&v).await.expect_err("local_path must fail");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("local_path"), "{e}");
    }
    if !caps.dedup {
        let e = b.dedup().await.expect_err("dedup must fail");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("dedup"), "{e}");
    }
    if caps.dedup {
        b.dedup().await.expect("dedup is a capability");
    }
}

/// The backend works as `Arc<dyn Backend>`.
pub async fn dyn_backend_works<H: Harness>(h: &H) {
    let b: Arc<dyn Backend> = Arc::new(h.fresh().await);
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(BS)).await.unwrap();
    b.write_at(&v, 0, b"dyn").await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let again: Arc<dyn Backend> = Arc::clone(&b);
    assert_eq!(&again.read_snapshot_at(&s, 0, 3).await.unwrap()[..], b"dyn");
    assert_eq!(again.read_volume(&v).await.unwrap().len(), BS as usize);
}
