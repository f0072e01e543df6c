//! Backends opened, used and dropped by many tasks at once in one process, as the crash
//! workload and a long-lived embedder (a snapshotter opening a backend per request) do.
//!
//! When every backend connected a Ceph client of its own and shut it down on drop, such a
//! process died now and then: `terminate called after throwing std::system_error:
//! Invalid argument` on one of librados' own threads (a mutex of a freed object), or a
//! segfault inside the next `rbd_open` (a corrupted heap). `rados_shutdown` deletes the
//! client whatever still refers to it. Backends now share one client per settings that
//! lives as long as the process; this test checks the sharing and keeps the churn in CI.

mod support;

use std::sync::Arc;

use slacker_core::{Backend, VolumeId, VolumeOptions};
use support::pattern;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_opened_and_dropped_concurrently_keep_the_process_alive() {
    let Some(h) = support::harness_for("churn") else {
        return;
    };
    let h = Arc::new(h);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..4u64 {
        let h = h.clone();
        set.spawn(async move {
            let ns = h.fresh_namespace();
            for r in 0..4u64 {
                let b = h.open(&ns).await;
                let (v, c) = (
                    VolumeId::new(format!("v{r}")).unwrap(),
                    VolumeId::new(format!("c{r}")).unwrap(),
                );
                let data = pattern(8192, t * 100 + r);
                b.create_volume(&v, &VolumeOptions::new(1 << 20))
                    .await
                    .unwrap();
                b.write_at(&v, 4096, &data).await.unwrap();
                let s = b.snapshot(&v).await.unwrap();
                b.clone_snapshot(&s, &c).await.unwrap();
                assert_eq!(
                    &b.read_at(&c, 4096, data.len()).await.unwrap()[..],
                    &data[..]
                );
                let st = b.stat_volume(&v).await.unwrap();
                assert!(st.diverged.len() >= 2, "task {t} round {r}: {st:?}");
                drop(b);
            }
            // A new backend sees everything the dropped ones did.
            let b = h.open(&ns).await;
            assert_eq!(b.list_volumes().await.unwrap().len(), 8, "task {t}");
            b.client_id()
        });
    }
    let mut clients = std::collections::BTreeSet::new();
    while let Some(r) = set.join_next().await {
        clients.insert(r.expect("churn task"));
    }
    // Backends with the same settings share the process's one Ceph client.
    assert_eq!(clients.len(), 1, "{clients:?}");
}
