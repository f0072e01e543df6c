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

use slacker_backend_mem::State;
use slacker_backend_nfs::client::{ClientOptions, NfsClient};
use slacker_backend_nfs::{NfsBackend, NfsBuilder};
use slacker_core::persist::CrashPlan;
use slacker_core::{Backend, VolumeId, VolumeOptions};
use slacker_testkit::crash::{K, apply_backend, apply_model, matches, workload};
use support::NfsHarness;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
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
