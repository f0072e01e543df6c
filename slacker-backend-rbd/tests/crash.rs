//! Crash consistency against the real cluster: the shared workload is crashed at every
//! sync point in turn (every step that changes the cluster passes one, see
//! `RbdBuilder::crash_plan`), the crashed backend is dropped (its images closed, as a
//! process exit would) and a new one is opened on the same namespace. Its state must be
//! the mem model's before or after the interrupted operation, with nothing acknowledged
//! lost and the bitmap invariant holding. Then garbage collection (grace 0) must leave no
//! leaked image, trash entry or half-made volume, and change nothing the model knows.
//!
//! Four crash points run at once, each building and dropping backends: this is also the
//! test that found librados freeing a Ceph client under librbd's feet (see `churn.rs`).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use slacker_backend_rbd::{RbdBackend, RbdBuilder};
use slacker_core::Backend;
use slacker_core::persist::CrashPlan;
use slacker_testkit::crash::{crash_every_point, matches, run_until_crash, workload};
use support::RbdHarness;

/// The image ids some live object still needs: those of live snapshots, and the parents
/// of volumes and snapshots (clones read them).
async fn needed_image_ids(b: &RbdBackend) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let id_of = |s: &slacker_core::SnapshotId| s.key().split('.').next().unwrap().to_owned();
    for s in b.list_snapshots().await.unwrap() {
        ids.insert(id_of(&s));
        if let Some(p) = b.stat_snapshot(&s).await.unwrap().parent {
            ids.insert(id_of(&p));
        }
    }
    for v in b.list_volumes().await.unwrap() {
        if let Some(o) = b.stat_volume(&v).await.unwrap().origin {
            ids.insert(id_of(&o));
        }
    }
    ids
}

/// Asserts that the namespace holds exactly what the state needs.
async fn assert_no_leftovers(b: &RbdBackend, n: u64) {
    let (dir, trash) = b.rbd_listing().await.unwrap();
    assert!(
        trash.is_empty(),
        "crash {n}: RBD trash not empty after gc: {trash:?}"
    );
    let vols: BTreeSet<String> = b
        .list_volumes()
        .await
        .unwrap()
        .iter()
        .map(RbdBackend::image_name)
        .collect();
    let needed = needed_image_ids(b).await;
    for (id, name) in &dir {
        let ok = vols.contains(name) || (name.starts_with("r.") && needed.contains(id));
        assert!(
            ok,
            "crash {n}: leaked image {name} (id {id}); listing {dir:?}"
        );
    }
}

struct Outcome {
    before: bool,
}

async fn crash_at(h: Arc<RbdHarness>, n: u64) -> Outcome {
    let ops = workload();
    let ns = h.fresh_namespace();
    let plan = CrashPlan::crash_at(n);
    let b = RbdBuilder::from_config(h.config(&ns))
        .crash_plan(plan.clone())
        .build()
        .await
        .unwrap();
    let run = run_until_crash(&b, &ops, &plan).await;
    drop(b); // the "dead" process: its client goes away
    let b = h.open(&ns).await;
    let recovered = run.check_reopened(&b).await;
    b.gc(std::time::Duration::ZERO).await.unwrap();
    assert_no_leftovers(&b, n).await;
    matches(&b, &recovered.state, &run.snaps, recovered.pending.as_ref())
        .await
        .unwrap_or_else(|e| panic!("crash {n}: gc changed the state: {e}"));
    run.check_still_works(&b).await;
    Outcome {
        before: recovered.before,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point() {
    let Some(h) = support::harness_for("crash") else {
        return;
    };
    let h = Arc::new(h);
    let ops = workload();
    let ns = h.fresh_namespace();
    let count = CrashPlan::never();
    let b = RbdBuilder::from_config(h.config(&ns))
        .crash_plan(count.clone())
        .build()
        .await
        .unwrap();
    let built = count.points();
    let clean = run_until_crash(&b, &ops, &count).await;
    assert!(clean.interrupted.is_none());
    drop(b);
    let reopened = h.open(&ns).await;
    matches(&reopened, &clean.model, &clean.snaps, None)
        .await
        .expect("clean run reopens as the model");
    reopened.gc(std::time::Duration::ZERO).await.unwrap();
    assert_no_leftovers(&reopened, u64::MAX).await;
    let total = count.points();
    assert!(total > 20, "only {total} sync points?");

    crash_every_point(built..total, 4, |n| {
        let h = h.clone();
        async move { crash_at(h, n).await.before }
    })
    .await;
}
