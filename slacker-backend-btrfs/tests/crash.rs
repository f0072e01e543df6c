//! Crash consistency: a workload crashed at every sync point in turn (metadata documents
//! and data-file steps alike), reopened, and compared with the mem model: the reopened
//! state must be the model's state before or after the interrupted operation, and
//! nothing acknowledged may be lost (bitmaps may only grow).

mod support;

use slacker_backend_btrfs::{BtrfsBuilder, Durability};
use slacker_core::persist::CrashPlan;
use slacker_testkit::crash::{matches, run_until_crash, workload};

async fn crash_everywhere(durability: Durability) {
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
        let plan = CrashPlan::crash_at(n);
        let b = BtrfsBuilder::new(dir.path())
            .durability(durability)
            .crash_plan(plan.clone())
            .build()
            .unwrap();
        let run = run_until_crash(&b, &ops, &plan).await;
        drop(b); // the "dead" process
        let b = support::open(dir.path());
        if run.check_reopened(&b).await.before {
            as_before += 1;
        } else {
            as_after += 1;
        }
        run.check_still_works(&b).await;
    }
    eprintln!(
        "{durability:?}: {total} sync points; reopened as the state before the interrupted \
         operation {as_before} times, after it {as_after} times"
    );
    assert!(as_before > 0 && as_after > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point_on_flush_durability() {
    crash_everywhere(Durability::OnFlush).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_sync_point_on_write_durability() {
    crash_everywhere(Durability::OnWrite).await;
}
