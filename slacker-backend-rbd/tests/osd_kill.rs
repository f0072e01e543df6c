//! The OSD is SIGKILLed in the middle of the shared crash workload and restarted: every
//! operation completes once it is back (the client resends), and the state read back by
//! a new client equals the model: nothing acknowledged is lost. In a test binary of its
//! own, because it takes the cluster's only OSD away from every test running beside it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use slacker_core::persist::CrashPlan;
use slacker_testkit::crash::{matches, run_until_crash, workload};

fn osd_pid(dir: &str) -> u32 {
    std::fs::read_to_string(format!("{dir}/run/osd.pid"))
        .expect("osd pid file")
        .trim()
        .parse()
        .expect("osd pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osd_sigkill_mid_workload_loses_nothing() {
    let Some(h) = support::harness_for("osd") else {
        return;
    };
    let Some(dir) = h.cluster.dir.clone() else {
        let _: Option<()> =
            slacker_testkit::skip_or_fail("the OSD kill test needs the cluster the tests start");
        return;
    };
    let restarted = Arc::new(AtomicBool::new(false));
    // Set while a workload round runs: the kill must land inside one. (A fixed delay
    // missed once the rounds got shorter: killed at 700 ms, between rounds.)
    let in_round = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let killer = {
        let (dir, restarted, in_round) =
            (dir.clone(), Arc::clone(&restarted), Arc::clone(&in_round));
        std::thread::spawn(move || {
            loop {
                while !in_round.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                // Into the round (a round takes hundreds of ms), then only if it still runs.
                std::thread::sleep(Duration::from_millis(60));
                if in_round.load(Ordering::SeqCst) {
                    break;
                }
            }
            let pid = osd_pid(&dir);
            let killed_at = started.elapsed();
            let ok = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .expect("kill")
                .success();
            assert!(ok, "kill -9 {pid} failed");
            std::thread::sleep(Duration::from_secs(1));
            let out = std::process::Command::new("bash")
                .arg(support::scripts().join("start.sh"))
                .env("CEPH_DIR", &dir)
                .output()
                .expect("start.sh");
            assert!(
                out.status.success(),
                "restart: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_ne!(osd_pid(&dir), pid, "the OSD was not restarted");
            restarted.store(true, Ordering::SeqCst);
            killed_at
        })
    };
    // Run the workload round after round until the OSD is back, then once more.
    let mut rounds = Vec::new();
    loop {
        let done = restarted.load(Ordering::SeqCst);
        let ns = h.fresh_namespace();
        let b = h.open(&ns).await;
        let t0 = started.elapsed();
        let never = CrashPlan::never();
        in_round.store(true, Ordering::SeqCst);
        let run = run_until_crash(&b, &workload(), &never).await;
        in_round.store(false, Ordering::SeqCst);
        assert!(
            run.interrupted.is_none(),
            "an operation failed: {:?}",
            run.interrupted
        );
        rounds.push((t0, started.elapsed()));
        drop(b);
        let again = h.open(&ns).await;
        matches(&again, &run.model, &run.snaps, None)
            .await
            .unwrap_or_else(|e| panic!("round {} after the OSD kill: {e}", rounds.len()));
        if done {
            break;
        }
    }
    let killed_at = killer.join().expect("killer thread");
    assert!(
        rounds
            .iter()
            .any(|(a, b)| *a <= killed_at && killed_at <= *b),
        "the kill at {killed_at:?} hit no workload round: {rounds:?}"
    );
    println!("OSD killed at {killed_at:?}; workload rounds {rounds:?}");
}
