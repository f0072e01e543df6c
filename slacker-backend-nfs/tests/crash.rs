//! Crash consistency against the real server: a workload is crashed at every sync point
//! in turn (every step that changes something on the server passes one, see
//! `NfsBuilder::crash_plan`), a new backend is opened on the same directory, and its
//! state is compared with the mem model: it must be the model's state before or after
//! the interrupted operation, nothing acknowledged may be lost (bitmaps may only grow),
//! and the bitmap invariant must hold. Then garbage collection (grace 0) must remove
//! every leftover of the interrupted operation and nothing else.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use slacker_backend_mem::State;
use slacker_backend_nfs::client::{ClientOptions, NfsClient};
use slacker_backend_nfs::{NfsBackend, NfsBuilder};
use slacker_core::persist::CrashPlan;
use slacker_core::{
    Backend, BackendExt, BlockIndex, BlockSize, Result, SnapshotId, VolumeId, VolumeOptions,
};
use slacker_testkit::checks::pattern;
use support::NfsHarness;

#[derive(Clone, Debug)]
enum Op {
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

const K: u64 = 4096;

fn workload() -> Vec<Op> {
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
    VolumeId::new(s).unwrap()
}

/// Applies `op` to the model; returns the snapshot it minted, if any.
fn apply_model(m: &mut State, op: &Op, snaps: &[(SnapshotId, SnapshotId)]) -> Option<SnapshotId> {
    let r: Result<Option<SnapshotId>> = match op {
        Op::Create(v, size, bs) => m
            .create_volume(
                &vid(v),
                &VolumeOptions::new(*size).with_block_size(BlockSize::new(*bs).unwrap()),
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

async fn apply_backend(
    b: &NfsBackend,
    op: &Op,
    snaps: &[(SnapshotId, SnapshotId)],
) -> Result<Option<SnapshotId>> {
    Ok(match op {
        Op::Create(v, size, bs) => {
            let o = VolumeOptions::new(*size).with_block_size(BlockSize::new(*bs).unwrap());
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

/// Checks that `b` holds exactly the model's state. `snaps` maps the ids the workload
/// saw; `pending` is the model id of a snapshot whose backend id was never returned
/// (the interrupted operation).
async fn matches(
    b: &NfsBackend,
    m: &State,
    snaps: &[(SnapshotId, SnapshotId)],
    pending: Option<&SnapshotId>,
) -> std::result::Result<(), String> {
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

/// Every name under the backend's directory, except the clone probe.
async fn files(nfs: &NfsClient, base: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in ["volumes", "snapshots", "tmp"] {
        for e in nfs.read_dir(&format!("{base}/{d}")).await.unwrap() {
            if e.name.ends_with(".holds") {
                for h in nfs
                    .read_dir(&format!("{base}/{d}/{}", e.name))
                    .await
                    .unwrap()
                {
                    out.insert(format!("{d}/{}/{}", e.name, h.name));
                }
            }
            out.insert(format!("{d}/{}", e.name));
        }
    }
    out
}

/// The files the state of `b` needs: documents, data files, hold files.
async fn needed(b: &NfsBackend, base: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in b.list_volumes().await.unwrap() {
        out.insert(format!("volumes/{v}.json"));
        let data = b.volume_file(&v).await.unwrap();
        out.insert(data.strip_prefix(&format!("{base}/")).unwrap().to_owned());
    }
    for s in b.list_snapshots().await.unwrap() {
        let k = s.key();
        out.insert(format!("snapshots/{k}.json"));
        out.insert(format!("snapshots/{k}.img"));
        let holds = b.stat_snapshot(&s).await.unwrap().holds;
        for h in &holds {
            out.insert(format!("snapshots/{k}.holds/{h}"));
        }
    }
    out
}

struct Outcome {
    before: bool,
}

async fn crash_at(h: Arc<NfsHarness>, n: u64) -> Outcome {
    let ops = workload();
    let dir = h.fresh_dir();
    let plan = CrashPlan::crash_at(n);
    let b = NfsBuilder::from_config(h.config(&dir))
        .crash_plan(plan.clone())
        .build()
        .await
        .unwrap();
    let (mut snaps, mut model) = (Vec::new(), State::new());
    let mut interrupted = None;
    for op in &ops {
        match apply_backend(&b, op, &snaps).await {
            Ok(bs) => {
                assert!(
                    !plan.crashed(),
                    "crash {n}: {op:?} succeeded after the crash"
                );
                if let (Some(bs), Some(ms)) = (bs, apply_model(&mut model, op, &snaps)) {
                    snaps.push((bs, ms));
                }
            }
            Err(e) => {
                assert!(
                    plan.crashed() && e.to_string().contains("injected crash"),
                    "crash {n}: {op:?} failed for another reason: {e}"
                );
                interrupted = Some(op.clone());
                break;
            }
        }
    }
    drop(b); // the "dead" process
    let b = h.open(&dir).await;
    let before = model.clone();
    let mut after = model.clone();
    let pending = interrupted
        .as_ref()
        .and_then(|op| apply_model(&mut after, op, &snaps));
    let r_before = matches(&b, &before, &snaps, None).await;
    let r_after = matches(&b, &after, &snaps, pending.as_ref()).await;
    let (outcome, state) = match (&r_before, &r_after) {
        (Ok(()), _) => (Outcome { before: true }, before),
        (_, Ok(())) => (Outcome { before: false }, after),
        _ => panic!(
            "crash at sync point {n} during {interrupted:?}: reopened state is neither \
             before ({r_before:?}) nor after ({r_after:?})"
        ),
    };
    // Garbage collection removes every leftover and nothing that is needed.
    let base = h.config(&dir).base_path();
    b.gc(std::time::Duration::ZERO).await.unwrap();
    let nfs = NfsClient::connect(&h.addr, ClientOptions::default())
        .await
        .unwrap();
    let have = files(&nfs, &base).await;
    let mut want = needed(&b, &base).await;
    for f in &have {
        // Empty holds directories may stay; they are harmless.
        if f.ends_with(".holds") {
            want.insert(f.clone());
        }
    }
    assert_eq!(have, want, "crash {n}: files after gc");
    let _ = nfs.close().await;
    let pending = if outcome.before { None } else { pending };
    matches(&b, &state, &snaps, pending.as_ref())
        .await
        .unwrap_or_else(|e| panic!("crash {n}: gc changed the state: {e}"));
    // The reopened backend works, and mints fresh ids.
    let z = vid("after-crash");
    b.create_volume(&z, &VolumeOptions::new(K)).await.unwrap();
    b.write_at(&z, 0, b"ok").await.unwrap();
    let s = b.snapshot(&z).await.unwrap();
    assert!(snaps.iter().all(|(x, _)| *x != s), "snapshot id reused");
    let _ = b.close().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point() {
    let Some(h) = support::harness_with("crash", "") else {
        return;
    };
    let h = Arc::new(h);
    // Count the sync points of a clean run.
    let ops = workload();
    let dir = h.fresh_dir();
    let count = CrashPlan::never();
    let b = NfsBuilder::from_config(h.config(&dir))
        .crash_plan(count.clone())
        .build()
        .await
        .unwrap();
    let built = count.points();
    let mut snaps = Vec::new();
    let mut model = State::new();
    for op in &ops {
        let bs = apply_backend(&b, op, &snaps).await.expect("clean run");
        let ms = apply_model(&mut model, op, &snaps);
        if let (Some(bs), Some(ms)) = (bs, ms) {
            snaps.push((bs, ms));
        }
    }
    let reopened = h.open(&dir).await;
    drop(b);
    matches(&reopened, &model, &snaps, None)
        .await
        .expect("clean run reopens as the model");
    let total = count.points();
    assert!(total > 50, "only {total} sync points?");

    // Crash at each point after the build, a few at a time (each in its own directory).
    let mut set = tokio::task::JoinSet::new();
    let (mut as_before, mut as_after) = (0, 0);
    let mut next = built;
    while next < total || !set.is_empty() {
        while next < total && set.len() < 4 {
            set.spawn(crash_at(h.clone(), next));
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            if r.expect("crash task").before {
                as_before += 1;
            } else {
                as_after += 1;
            }
        }
    }
    println!(
        "{} sync points crashed at; reopened as the state before the interrupted operation \
         {as_before} times, after it {as_after} times",
        total - built
    );
    assert!(as_before > 0 && as_after > 0);
}
