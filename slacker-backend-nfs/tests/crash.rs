//! Crash consistency against the real server: a workload is crashed at every sync point
//! in turn (every step that changes something on the server passes one, see
//! `NfsBuilder::crash_plan`), a new backend is opened on the same directory, and its
//! state is compared with the mem model: it must be the model's state before or after
//! the interrupted operation, nothing acknowledged may be lost (bitmaps may only grow),
//! and the bitmap invariant must hold. Then garbage collection (grace 0) must remove
//! every leftover of the interrupted operation and nothing else.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use slacker_backend_nfs::client::{ClientOptions, NfsClient};
use slacker_backend_nfs::{NfsBackend, NfsBuilder};
use slacker_core::Backend;
use slacker_core::persist::CrashPlan;
use slacker_testkit::crash::{crash_every_point, matches, run_until_crash, workload};
use support::NfsHarness;

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
    let run = run_until_crash(&b, &ops, &plan).await;
    drop(b); // the "dead" process
    let b = h.open(&dir).await;
    let recovered = run.check_reopened(&b).await;
    let outcome = Outcome {
        before: recovered.before,
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
    matches(&b, &recovered.state, &run.snaps, recovered.pending.as_ref())
        .await
        .unwrap_or_else(|e| panic!("crash {n}: gc changed the state: {e}"));
    run.check_still_works(&b).await;
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
    let clean = run_until_crash(&b, &ops, &count).await;
    assert!(
        clean.interrupted.is_none(),
        "a plan that never fires interrupted the run"
    );
    let reopened = h.open(&dir).await;
    drop(b);
    matches(&reopened, &clean.model, &clean.snaps, None)
        .await
        .expect("clean run reopens as the model");
    let total = count.points();
    assert!(total > 50, "only {total} sync points?");

    // Crash at each point after the build, a few at a time (each in its own directory).
    crash_every_point(built..total, 4, |n| {
        let h = h.clone();
        async move { crash_at(h, n).await.before }
    })
    .await;
}
