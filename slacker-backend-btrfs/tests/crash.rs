//! Crash consistency: a workload crashed at every sync point in turn (metadata documents
//! and data-file steps alike), reopened, and compared with the mem model: the reopened
//! state must be the model's state before or after the interrupted operation, and
//! nothing acknowledged may be lost (bitmaps may only grow).

mod support;

use slacker_backend_btrfs::{BtrfsBuilder, Durability};
use slacker_backend_mem::State;
use slacker_core::persist::CrashPlan;
use slacker_core::{Backend, VolumeId, VolumeOptions};
use slacker_testkit::crash::{K, apply_backend, apply_model, matches, workload};

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

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
    let mut snaps = Vec::new();
    let mut model = State::new();
    for op in &ops {
        let bs = apply_backend(&b, op, &snaps).await.expect("clean run");
        let ms = apply_model(&mut model, op, &snaps);
        if let (Some(bs), Some(ms)) = (bs, ms) {
            snaps.push((bs, ms));
        }
    }
    let reopened = support::open(dir.path());
    drop(b);
    matches(&reopened, &model, &snaps, None)
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
        let b = support::open(dir.path());
        let before = model.clone();
        let mut after = model.clone();
        let pending = interrupted
            .as_ref()
            .and_then(|op| apply_model(&mut after, op, &snaps));
        let r_before = matches(&b, &before, &snaps, None).await;
        let r_after = matches(&b, &after, &snaps, pending.as_ref()).await;
        match (&r_before, &r_after) {
            (Ok(()), _) => as_before += 1,
            (_, Ok(())) => as_after += 1,
            _ => panic!(
                "crash at sync point {n} during {interrupted:?}: reopened state is neither \
                 before ({r_before:?}) nor after ({r_after:?})"
            ),
        }
        // The reopened backend works, and mints fresh ids.
        let z = vid("after-crash");
        b.create_volume(&z, &VolumeOptions::new(K)).await.unwrap();
        b.write_at(&z, 0, b"ok").await.unwrap();
        let s = b.snapshot(&z).await.unwrap();
        assert!(snaps.iter().all(|(x, _)| *x != s), "snapshot id reused");
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
