//! A crash-consistency workload shared by the backends' crash tests.
//!
//! A backend test runs [`workload`] once with a [`CrashPlan`](slacker_core::persist::CrashPlan)
//! that never fires to count its sync points, then once per sync point with a plan that
//! crashes there, reopens the storage, and asks [`matches()`] whether what it finds equals
//! the mem model before or after the interrupted operation ([`apply_model`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;

use slacker_backend_mem::State;
use slacker_core::{
    Backend, BackendExt, BlockIndex, BlockSize, Result, SnapshotId, VolumeId, VolumeOptions,
};

use crate::checks::pattern;

/// One step of the crash workload. Snapshots are named by their position in the list of
/// snapshots the workload minted.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    Create(&'static str, u64, u32),
    Write(&'static str, u64, usize, u8),
    Flush(&'static str),
    Snapshot(&'static str),
    Clone(usize, &'static str),
    Hold(usize, &'static str),
    Release(usize, &'static str),
    RemoveVolume(&'static str),
    RemoveSnapshot(usize),
}

/// Bytes in a 4 KiB block.
pub const K: u64 = 4096;

/// A workload touching every kind of metadata update: create, write, flush, snapshot,
/// clone, hold, release and both removes, over 4 KiB and 512-byte block sizes.
pub fn workload() -> Vec<Op> {
    use Op::*;
    vec![
        Create("a", 8 * K, 4096),
        Write("a", 100, 3 * K as usize, 1),
        Flush("a"),
        Snapshot("a"), // s0
        Clone(0, "b"),
        Write("b", 2 * K + 5, 10, 2),
        Hold(0, "layer-x"),
        Snapshot("b"), // s1
        Write("a", 5 * K, K as usize, 3),
        Flush("b"),
        Create("c", 4 * 512, 512),
        Write("c", 700, 100, 4),
        Snapshot("c"), // s2
        Clone(2, "e"),
        Release(0, "layer-x"),
        RemoveVolume("a"),
        RemoveSnapshot(0),
        Clone(1, "d"),
        Write("d", 0, 50, 5),
        Flush("d"),
        RemoveVolume("b"),
        Hold(1, "keep"),
        RemoveSnapshot(2),
    ]
}

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).expect("valid volume id")
}

/// Applies `op` to the model; returns the snapshot it minted, if any.
///
/// # Panics
/// If the workload is invalid on the model.
pub fn apply_model(
    m: &mut State,
    op: &Op,
    snaps: &[(SnapshotId, SnapshotId)],
) -> Option<SnapshotId> {
    let r: Result<Option<SnapshotId>> = match op {
        Op::Create(v, size, bs) => m
            .create_volume(
                &vid(v),
                &VolumeOptions::new(*size)
                    .with_block_size(BlockSize::new(*bs).expect("valid block size")),
            )
            .map(|_| None),
        Op::Write(v, off, len, seed) => m
            .write_at(&vid(v), *off, &pattern(*len, *seed))
            .map(|_| None),
        Op::Flush(v) => m.flush(&vid(v)).map(|_| None),
        Op::Snapshot(v) => m.snapshot(&vid(v)).map(Some),
        Op::Clone(s, v) => m.clone_snapshot(&snaps[*s].1, &vid(v)).map(|_| None),
        Op::Hold(s, h) => m.hold_snapshot(&snaps[*s].1, h).map(|_| None),
        Op::Release(s, h) => m.release_snapshot(&snaps[*s].1, h).map(|_| None),
        Op::RemoveVolume(v) => m.remove_volume(&vid(v)).map(|_| None),
        Op::RemoveSnapshot(s) => m.remove_snapshot(&snaps[*s].1).map(|_| None),
    };
    r.expect("the workload is valid on the model")
}

/// Applies `op` to a backend; returns the snapshot it minted, if any. `snaps` pairs the
/// backend and model ids of the snapshots minted so far.
///
/// # Errors
/// Whatever the backend returns (for example an injected crash).
pub async fn apply_backend<B: Backend + ?Sized>(
    b: &B,
    op: &Op,
    snaps: &[(SnapshotId, SnapshotId)],
) -> Result<Option<SnapshotId>> {
    Ok(match op {
        Op::Create(v, size, bs) => {
            let o = VolumeOptions::new(*size)
                .with_block_size(BlockSize::new(*bs).expect("valid block size"));
            b.create_volume(&vid(v), &o).await?;
            None
        }
        Op::Write(v, off, len, seed) => {
            b.write_at(&vid(v), *off, &pattern(*len, *seed)).await?;
            None
        }
        Op::Flush(v) => {
            b.flush(&vid(v)).await?;
            None
        }
        Op::Snapshot(v) => Some(b.snapshot(&vid(v)).await?),
        Op::Clone(s, v) => {
            b.clone_snapshot(&snaps[*s].0, &vid(v)).await?;
            None
        }
        Op::Hold(s, h) => {
            b.hold_snapshot(&snaps[*s].0, h).await?;
            None
        }
        Op::Release(s, h) => {
            b.release_snapshot(&snaps[*s].0, h).await?;
            None
        }
        Op::RemoveVolume(v) => {
            b.remove_volume(&vid(v)).await?;
            None
        }
        Op::RemoveSnapshot(s) => {
            b.remove_snapshot(&snaps[*s].0).await?;
            None
        }
    })
}

/// Checks that a (reopened) backend holds exactly the model's state: same volumes and
/// snapshots, sizes, origins, holds and contents, no diverged block lost, and the bitmap
/// invariant. `snaps` maps the ids the workload saw; `pending` is the model id of a
/// snapshot whose backend id was never returned (the interrupted operation).
///
/// # Errors
/// What differs.
pub async fn matches<B: Backend + ?Sized>(
    b: &B,
    m: &State,
    snaps: &[(SnapshotId, SnapshotId)],
    pending: Option<&SnapshotId>,
) -> std::result::Result<(), String> {
    // Map backend snapshot ids to model ids.
    let mut to_model: BTreeMap<SnapshotId, SnapshotId> = snaps.iter().cloned().collect();
    let live = b.list_snapshots().await.map_err(|e| e.to_string())?;
    let unknown: Vec<_> = live.iter().filter(|s| !to_model.contains_key(s)).collect();
    match (unknown.as_slice(), pending) {
        ([], _) => {}
        ([one], Some(p)) => {
            to_model.insert((*one).clone(), p.clone());
        }
        (more, _) => return Err(format!("unexpected snapshots {more:?}")),
    }
    let mut mapped: Vec<SnapshotId> = live.iter().map(|s| to_model[s].clone()).collect();
    mapped.sort();
    if mapped != m.list_snapshots() {
        return Err(format!(
            "snapshots {mapped:?} vs model {:?}",
            m.list_snapshots()
        ));
    }
    for s in &live {
        let (bs, ms) = (
            b.stat_snapshot(s).await.map_err(|e| e.to_string())?,
            m.stat_snapshot(&to_model[s]).unwrap(),
        );
        if bs.holds != ms.holds || bs.size != ms.size || bs.block_size != ms.block_size {
            return Err(format!("snapshot {s}: {bs:?} vs {ms:?}"));
        }
        if !ms.diverged.is_subset(&bs.diverged) {
            return Err(format!("snapshot {s} lost diverged blocks"));
        }
        let data = b.read_snapshot(s).await.map_err(|e| e.to_string())?;
        if data
            != m.read_snapshot_at(&to_model[s], 0, ms.size as usize)
                .unwrap()
        {
            return Err(format!("snapshot {s} content differs"));
        }
    }
    let vols = b.list_volumes().await.map_err(|e| e.to_string())?;
    if vols != m.list_volumes() {
        return Err(format!("volumes {vols:?} vs model {:?}", m.list_volumes()));
    }
    for v in &vols {
        let (bs, ms) = (
            b.stat_volume(v).await.map_err(|e| e.to_string())?,
            m.stat_volume(v).unwrap(),
        );
        let origin = bs.origin.as_ref().map(|o| to_model.get(o).cloned());
        if (bs.size, bs.block_size, origin) != (ms.size, ms.block_size, ms.origin.clone().map(Some))
        {
            return Err(format!("volume {v}: {bs:?} vs {ms:?}"));
        }
        if !ms.diverged.is_subset(&bs.diverged) {
            return Err(format!("volume {v} lost diverged blocks"));
        }
        let data = b.read_volume(v).await.map_err(|e| e.to_string())?;
        if data != m.read_at(v, 0, ms.size as usize).unwrap() {
            return Err(format!("volume {v} content differs"));
        }
        // Bitmap invariant against the origin (when it still exists) or zeros.
        let bsz = bs.block_size.bytes() as usize;
        let origin_data = match &bs.origin {
            Some(o) => b.read_snapshot(o).await.ok(),
            None => Some(vec![0u8; bs.size as usize].into()),
        };
        if let Some(od) = origin_data {
            for i in 0..(bs.size as usize / bsz) {
                let r = i * bsz..(i + 1) * bsz;
                if !bs.diverged.contains(BlockIndex(i as u32)) && data[r.clone()] != od[r] {
                    return Err(format!("volume {v}: block {i} outside the bitmap differs"));
                }
            }
        }
    }
    Ok(())
}

/// What a workload run that was crashed (or not) left behind, in the model's terms.
#[derive(Debug)]
pub struct CrashedRun {
    /// Backend and model ids of the snapshots minted before the crash.
    pub snaps: Vec<(SnapshotId, SnapshotId)>,
    /// The model after every acknowledged operation.
    pub model: State,
    /// The operation the crash interrupted, if any.
    pub interrupted: Option<Op>,
}

/// Runs `ops` on `b` until the injected crash: every operation before it must succeed,
/// the one it hits must fail with "injected crash", and none may run after it.
///
/// # Panics
/// If an operation succeeds after the crash or fails for another reason.
pub async fn run_until_crash<B: Backend + ?Sized>(
    b: &B,
    ops: &[Op],
    plan: &slacker_core::persist::CrashPlan,
) -> CrashedRun {
    let (mut snaps, mut model) = (Vec::new(), State::new());
    for op in ops {
        match apply_backend(b, op, &snaps).await {
            Ok(bs) => {
                assert!(!plan.crashed(), "{op:?} succeeded after the crash");
                if let (Some(bs), Some(ms)) = (bs, apply_model(&mut model, op, &snaps)) {
                    snaps.push((bs, ms));
                }
            }
            Err(e) => {
                assert!(
                    plan.crashed() && e.to_string().contains("injected crash"),
                    "{op:?} failed for another reason: {e}"
                );
                return CrashedRun {
                    snaps,
                    model,
                    interrupted: Some(op.clone()),
                };
            }
        }
    }
    CrashedRun {
        snaps,
        model,
        interrupted: None,
    }
}

/// Which state a reopened backend was found in.
#[derive(Debug)]
pub struct Recovered {
    /// `true`: the state before the interrupted operation; `false`: after it.
    pub before: bool,
    /// The model state the backend matches.
    pub state: State,
    /// The model id of a snapshot the interrupted operation minted (when `!before`).
    pub pending: Option<SnapshotId>,
}

impl CrashedRun {
    /// Checks that the reopened backend `b` holds the model's state before or after the
    /// interrupted operation, and says which.
    ///
    /// # Panics
    /// If it matches neither state.
    pub async fn check_reopened<B: Backend + ?Sized>(&self, b: &B) -> Recovered {
        let before = self.model.clone();
        let mut after = self.model.clone();
        let pending = self
            .interrupted
            .as_ref()
            .and_then(|op| apply_model(&mut after, op, &self.snaps));
        let r_before = matches(b, &before, &self.snaps, None).await;
        let r_after = matches(b, &after, &self.snaps, pending.as_ref()).await;
        match (&r_before, &r_after) {
            (Ok(()), _) => Recovered {
                before: true,
                state: before,
                pending: None,
            },
            (_, Ok(())) => Recovered {
                before: false,
                state: after,
                pending,
            },
            _ => panic!(
                "crash during {:?}: reopened state is neither before ({r_before:?}) nor \
                 after ({r_after:?})",
                self.interrupted
            ),
        }
    }

    /// Checks that the reopened backend still works: it creates, writes and snapshots a new
    /// volume, and the snapshot id is none minted before the crash. (Run it last: it adds
    /// a volume and a snapshot the model does not know.)
    ///
    /// # Panics
    /// If any of that fails.
    pub async fn check_still_works<B: Backend + ?Sized>(&self, b: &B) {
        let z = vid("after-crash");
        b.create_volume(&z, &VolumeOptions::new(K))
            .await
            .expect("create after reopen");
        b.write_at(&z, 0, b"ok").await.expect("write after reopen");
        let s = b.snapshot(&z).await.expect("snapshot after reopen");
        assert!(
            self.snaps.iter().all(|(x, _)| *x != s),
            "snapshot id reused after a crash"
        );
    }
}

/// Crashes at every sync point of `points`, at most `parallel` at a time (each one a
/// tokio task running `crash_at(point)`, which returns [`Recovered::before`] of its
/// run), prints how many reopened as the state before the interrupted operation and how
/// many after it, and returns those two counts.
///
/// # Panics
/// If a crash task panics, or if no point reopened as "before" or none as "after" (a
/// workload that never interrupts an operation half-way tests nothing).
pub async fn crash_every_point<F, Fut>(
    points: Range<u64>,
    parallel: usize,
    mut crash_at: F,
) -> (u64, u64)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let (mut as_before, mut as_after) = (0, 0);
    let (mut next, total) = (points.start, points.end);
    while next < total || !set.is_empty() {
        while next < total && set.len() < parallel.max(1) {
            set.spawn(crash_at(next));
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            if r.expect("crash task") {
                as_before += 1;
            } else {
                as_after += 1;
            }
        }
    }
    println!(
        "{} sync points crashed at; reopened as the state before the interrupted operation \
         {as_before} times, after it {as_after} times",
        total - points.start
    );
    assert!(as_before > 0 && as_after > 0);
    (as_before, as_after)
}
