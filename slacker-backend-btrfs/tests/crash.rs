//! Crash consistency: a workload crashed at every sync point in turn (metadata documents
//! and data-file steps alike), reopened, and compared with the mem model: the reopened
//! state must be the model's state before or after the interrupted operation, and
//! nothing acknowledged may be lost (bitmaps may only grow).
//!
//! Each test runs twice: as a process crash (the page cache survives: what was done is
//! seen, synced or not) and as a power cut at the same point (`CrashPlan::power_cut_at`:
//! the metadata directory keeps only what its syncs made durable, as POSIX promises;
//! data files are not reverted, `power_cut.rs` covers those on a real disk).

mod support;

use slacker_backend_btrfs::{BtrfsBuilder, Durability};
use slacker_core::persist::CrashPlan;
use slacker_testkit::crash::{matches, run_until_crash, workload};

fn plan_at(n: u64, power: bool) -> std::sync::Arc<CrashPlan> {
    if power {
        CrashPlan::power_cut_at(n)
    } else {
        CrashPlan::crash_at(n)
    }
}

async fn crash_everywhere(durability: Durability, power: bool) {
    let ops = workload();
    // Count the sync points of a clean run.
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let count = CrashPlan::never();
    let b = BtrfsBuilder::new(dir.path())
        .durability(durability)
        .crash_plan(count.clone())
        .build()
        .unwrap();
    let clean = run_until_crash(&b, &ops, &count).await;
    assert!(
        clean.interrupted.is_none(),
        "a plan that never fires interrupted the run"
    );
    let reopened = support::open(dir.path());
    drop(b);
    matches(&reopened, &clean.model, &clean.snaps, None)
        .await
        .expect("clean run reopens as the model");
    let total = count.points();
    assert!(total > 50, "only {total} sync points?");

    let (mut as_before, mut as_after) = (0, 0);
    for n in 0..total {
        let dir = support::fresh_dir().unwrap();
        let plan = plan_at(n, power);
        let b = BtrfsBuilder::new(dir.path())
            .durability(durability)
            .crash_plan(plan.clone())
            .build()
            .unwrap();
        let run = run_until_crash(&b, &ops, &plan).await;
        drop(b); // the "dead" process
        plan.restore_power().unwrap();
        let b = support::open(dir.path());
        if run.check_reopened(&b).await.before {
            as_before += 1;
        } else {
            as_after += 1;
        }
        run.check_still_works(&b).await;
    }
    eprintln!(
        "{durability:?}, power cut {power}: {total} sync points; reopened as the state before \
         the interrupted operation {as_before} times, after it {as_after} times"
    );
    assert!(as_before > 0 && as_after > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point_on_flush_durability() {
    crash_everywhere(Durability::OnFlush, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_at_every_sync_point_on_flush_durability() {
    crash_everywhere(Durability::OnFlush, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point_on_write_durability() {
    crash_everywhere(Durability::OnWrite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_at_every_sync_point_on_write_durability() {
    crash_everywhere(Durability::OnWrite, true).await;
}

/// A batched hold (`hold_snapshots`: one marker document per new hold, then one
/// directory sync) crashed at each of its sync points: after a reopen every snapshot
/// still opens, each is held by the new holder or not, holds placed before stay, and once
/// the call has returned all of its holds survive a reopen and a power cut. After a power
/// cut at any of its points none of the new holds is there (only the directory sync makes
/// them durable); after a process crash some are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_hold_crashed_anywhere_leaves_each_hold_placed_or_absent() {
    use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};

    async fn setup(b: &slacker_backend_btrfs::BtrfsBackend) -> Vec<SnapshotId> {
        let v = VolumeId::new("v").unwrap();
        b.create_volume(&v, &VolumeOptions::new(1 << 20))
            .await
            .unwrap();
        let mut snaps = Vec::new();
        for i in 0..3u8 {
            b.write_at(&v, 0, &[i; 4096]).await.unwrap();
            snaps.push(b.snapshot(&v).await.unwrap());
        }
        b.hold_snapshot(&snaps[2], "other").await.unwrap();
        b.hold_snapshot(&snaps[1], "layer").await.unwrap(); // already held: unchanged
        snaps
    }
    async fn holders(
        b: &slacker_backend_btrfs::BtrfsBackend,
        snaps: &[SnapshotId],
    ) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for s in snaps {
            let mut h = b.stat_snapshot(s).await.expect("snapshot survives").holds;
            h.sort();
            out.push(h);
        }
        out
    }
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let all = vec![
        vec!["layer".to_owned()],
        vec!["layer".to_owned()],
        vec!["layer".to_owned(), "other".to_owned()],
    ];
    // A clean run, then a power cut once the call returned: every hold survives.
    let count = CrashPlan::power_cut_at(u64::MAX);
    let b = BtrfsBuilder::new(dir.path())
        .crash_plan(count.clone())
        .build()
        .unwrap();
    let snaps = setup(&b).await;
    let base = count.points();
    b.hold_snapshots(&snaps, "layer").await.unwrap();
    let points = count.points() - base;
    drop(b);
    count.restore_power().unwrap();
    let b = support::open(dir.path());
    assert_eq!(holders(&b, &snaps).await, all, "holds lost by a power cut");
    // Two new holds (the second snapshot was held already): two markers created, one
    // directory sync.
    assert_eq!(points, 2 + 1);

    for power in [false, true] {
        let mut partial = 0;
        for n in 0..points {
            let dir = support::fresh_dir().unwrap();
            let plan = plan_at(base + n, power);
            let b = BtrfsBuilder::new(dir.path())
                .crash_plan(plan.clone())
                .build()
                .unwrap();
            let snaps = setup(&b).await;
            let err = b.hold_snapshots(&snaps, "layer").await.unwrap_err();
            assert!(err.to_string().contains("injected crash"), "{err}");
            drop(b);
            plan.restore_power().unwrap();
            let b = support::open(dir.path());
            let got = holders(&b, &snaps).await;
            assert_eq!(
                got[1], all[1],
                "crash at {n}: a hold placed before was lost"
            );
            assert!(
                got[0].is_empty() || got[0] == all[0],
                "crash at {n}: first snapshot {:?}",
                got[0]
            );
            assert!(
                got[2] == ["other"] || got[2] == all[2],
                "crash at {n}: third snapshot {:?}",
                got[2]
            );
            if power {
                assert!(
                    got[0].is_empty() && got[2] == ["other"],
                    "power cut at {n}: a hold survived without its directory sync: {got:?}"
                );
            }
            if got[0].is_empty() != (got[2].len() == 1) {
                partial += 1;
            }
            // What a layer store does after such a crash: release what was placed.
            for s in [&snaps[0], &snaps[2]] {
                let _ = b.release_snapshot(s, "layer").await;
            }
            assert_eq!(holders(&b, &snaps).await[0], Vec::<String>::new());
        }
        // After a process crash the batch is not atomic as a whole: some crash left one
        // of the two new holds.
        assert_eq!(
            partial > 0,
            !power,
            "power cut {power}: {partial} partial batches"
        );
    }
}

/// The pull path end to end on btrfs: a worker's layer store (its records in a
/// `DirStore` on the same btrfs) applies two reference layers, clones one, and removes
/// both, crashed and power-cut at every sync point of its records and of the backend's
/// documents and hold markers alike (both stores share the plan). After recovery the
/// store is as before or after the interrupted operation, every recorded snapshot and
/// Merkle tree is held by its layer, no hold or volume of the store is left without a
/// record, and the workload carries on to the clean run's end state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_pulls_survive_a_crash_or_power_cut_at_every_sync_point() {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use slacker_backend_btrfs::BtrfsBackend;
    use slacker_core::persist::{DirStore, MetaStore};
    use slacker_core::{Backend, LayerStore, LayerStoreOptions, Result, VolumeId};

    const OPS: usize = 6;
    type Model = BTreeMap<String, (bool, bool)>; // layer -> (has a snapshot, has a volume)

    async fn worker(
        b: BtrfsBackend,
        dir: &Path,
        plan: Option<Arc<CrashPlan>>,
    ) -> Result<LayerStore<BtrfsBackend>> {
        let mut meta = DirStore::open(dir.join("worker-meta")).unwrap();
        if let Some(p) = plan {
            meta = meta.with_crash_plan(p);
        }
        let meta: Arc<dyn MetaStore> = Arc::new(meta);
        LayerStore::open(
            b,
            meta,
            LayerStoreOptions::new("w").with_volume_size(1 << 20),
        )
        .await
    }
    /// What a builder pushed: the reference layers of a base and of an app on top.
    async fn pushed(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let b = BtrfsBuilder::new(dir).build().unwrap();
        let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir.join("builder-meta")).unwrap());
        let s = LayerStore::open(
            b,
            meta,
            LayerStoreOptions::new("b").with_volume_size(1 << 20),
        )
        .await
        .unwrap();
        let v = s.create("base", None).await.unwrap();
        s.backend().write_at(&v, 4096, b"base").await.unwrap();
        let base = s.diff("base").await.unwrap().tar;
        let v = s.create("app", Some("base")).await.unwrap();
        s.backend().write_at(&v, 8192, b"app").await.unwrap();
        (base, s.diff("app").await.unwrap().tar)
    }
    async fn run_op(
        s: &LayerStore<BtrfsBackend>,
        k: usize,
        refs: &(Vec<u8>, Vec<u8>),
    ) -> Result<()> {
        let cur = |v: &Vec<u8>| std::io::Cursor::new(v.clone());
        match k {
            0 => s.apply_diff("base", None, cur(&refs.0)).await.map(|_| ()),
            1 => s
                .apply_diff("app", Some("base"), cur(&refs.1))
                .await
                .map(|_| ()),
            2 => s.get("app").await.map(|_| ()),
            3 => s.put("app").await,
            4 => s.remove("app").await,
            5 => s.remove("base").await,
            _ => unreachable!(),
        }
    }
    async fn observe(s: &LayerStore<BtrfsBackend>) -> Model {
        s.list()
            .await
            .into_iter()
            .map(|l| (l.id, (l.snapshot.is_some(), l.volume.is_some())))
            .collect()
    }
    /// Every recorded snapshot and tree held by its layer; no other hold or volume of
    /// the store.
    async fn check_invariants(s: &LayerStore<BtrfsBackend>, at: &str) {
        let b = s.backend();
        let mut want = Vec::new();
        for l in s.list().await {
            let h = s.holder(&l.id).unwrap();
            want.extend(l.snapshot.map(|x| (x, h.clone())));
            want.extend(l.merkle.map(|m| (m.tree, h.clone())));
        }
        let mut got = Vec::new();
        for snap in b.list_snapshots().await.unwrap() {
            for h in b.stat_snapshot(&snap).await.unwrap().holds {
                if h.starts_with("w.") {
                    got.push((snap.clone(), h));
                }
            }
        }
        want.sort();
        got.sort();
        assert_eq!(got, want, "{at}: stray or missing holds");
        let want: Vec<VolumeId> = s
            .list()
            .await
            .into_iter()
            .filter_map(|l| l.volume)
            .collect();
        let got: Vec<VolumeId> = b
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .filter(|v| v.as_str().starts_with("w."))
            .collect();
        assert_eq!(got, want, "{at}: stray or missing volumes");
    }

    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let refs = pushed(dir.path()).await;
    let count = CrashPlan::never();
    let b = BtrfsBuilder::new(dir.path())
        .crash_plan(count.clone())
        .build()
        .unwrap();
    let s = worker(b, dir.path(), Some(count.clone())).await.unwrap();
    let start = count.points();
    let mut model = vec![observe(&s).await];
    for k in 0..OPS {
        run_op(&s, k, &refs).await.unwrap();
        check_invariants(&s, "clean run").await;
        model.push(observe(&s).await);
    }
    let total = count.points();
    drop(s);

    type PlanAt = fn(u64) -> Arc<CrashPlan>;
    let modes: [(&str, PlanAt); 3] = [
        ("crash", CrashPlan::crash_at),
        ("power cut", CrashPlan::power_cut_at),
        ("torn power cut", CrashPlan::torn_power_cut_at),
    ];
    for (power, plan_at) in modes {
        let (mut as_before, mut as_after) = (0, 0);
        for n in start..total {
            let dir = support::fresh_dir().unwrap();
            let refs = pushed(dir.path()).await;
            let plan = plan_at(n);
            let b = BtrfsBuilder::new(dir.path())
                .crash_plan(plan.clone())
                .build()
                .unwrap();
            let s = worker(b, dir.path(), Some(plan.clone())).await.unwrap();
            let mut crashed_at = None;
            for k in 0..OPS {
                if let Err(e) = run_op(&s, k, &refs).await {
                    assert!(plan.crashed(), "op {k} failed without a crash: {e}");
                    crashed_at = Some(k);
                    break;
                }
            }
            let k = crashed_at.unwrap_or_else(|| panic!("no crash at point {n}"));
            drop(s);
            plan.restore_power().unwrap();
            let at = format!("{power}, point {n} (op {k})");
            let s = worker(support::open(dir.path()), dir.path(), None)
                .await
                .unwrap_or_else(|e| panic!("{at}: recovery failed: {e}"));
            check_invariants(&s, &at).await;
            let got = observe(&s).await;
            let resume = if got == model[k] {
                as_before += 1;
                k
            } else {
                assert_eq!(got, model[k + 1], "{at}: neither before nor after");
                as_after += 1;
                k + 1
            };
            for j in resume..OPS {
                run_op(&s, j, &refs)
                    .await
                    .unwrap_or_else(|e| panic!("{at}: op {j} after recovery: {e}"));
                check_invariants(&s, &at).await;
            }
            assert_eq!(observe(&s).await, model[OPS], "{at}");
        }
        eprintln!(
            "{power}: {} sync points; as before {as_before}, as after {as_after}",
            total - start
        );
        assert!(as_before > 0 && as_after > 0);
    }
}
