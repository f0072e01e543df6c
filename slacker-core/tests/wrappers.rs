//! The backend wrappers in this crate and the testkit pass every call on as the same call:
//! a wrapper that fell back to a trait default would silently change what reaches the
//! backend (a batched hold split into one hold, and on btrfs one durable write, per
//! snapshot, as HelloBench's `Counting(Throttled(btrfs))` did).

use std::sync::Arc;
use std::time::Duration;

use slacker_backend_mem::MemBackend;
use slacker_core::worker::{Counting, LinkProfile, Throttled};
use slacker_core::{Backend, BackendExt, SnapshotId, VolumeId};
use slacker_testkit::faulty::{Fault, FaultyBackend};
use slacker_testkit::wire::Wire;

/// Two snapshots on `b`.
async fn two_snapshots(b: &impl Backend) -> Vec<SnapshotId> {
    let v = VolumeId::new("v").unwrap();
    b.create_volume_with(&v, b"data").await.unwrap();
    vec![b.snapshot(&v).await.unwrap(), b.snapshot(&v).await.unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_hold_reaches_the_backend_as_one_call_through_every_wrapper() {
    let probe = Arc::new(Counting::new(MemBackend::new()));
    let snaps = two_snapshots(&probe).await;
    let wrapped: Vec<(&str, Box<dyn Backend>)> = vec![
        ("Counting", Box::new(Counting::new(probe.clone()))),
        (
            "Throttled",
            Box::new(Throttled::new(
                probe.clone(),
                LinkProfile::latency_only(Duration::from_micros(1)),
            )),
        ),
        ("Wire", Box::new(Wire::new(probe.clone()))),
        (
            "FaultyBackend",
            Box::new(FaultyBackend::new(probe.clone(), Fault::ForgetfulBitmap)),
        ),
    ];
    let mut split = Vec::new();
    for (i, (name, b)) in wrapped.iter().enumerate() {
        let before = probe.counts().other_calls;
        let holder = format!("h{i}");
        b.hold_snapshots(&snaps, &holder).await.unwrap();
        if probe.counts().other_calls - before != 1 {
            split.push(*name);
        }
        for s in &snaps {
            let holds = probe.stat_snapshot(s).await.unwrap().holds;
            assert!(holds.contains(&holder), "{name}: {s} not held");
        }
    }
    assert!(
        split.is_empty(),
        "split a batched hold of {} snapshots into one call each: {split:?}",
        snaps.len()
    );
}
