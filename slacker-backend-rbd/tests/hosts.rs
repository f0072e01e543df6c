//! Several hosts (separate Ceph clients) on one namespace: races decided by the cluster,
//! a crashed writer's lock taken over at once, and bad input failing with typed errors.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slacker_backend_rbd::{RbdBuilder, RbdConfig};
use slacker_core::{Backend, BlockSize, ErrorKind, SnapshotId, VolumeId, VolumeOptions};

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_racing_to_create_or_clone_one_name_exactly_one_wins() {
    let Some(h) = support::harness_for("race") else {
        return;
    };
    let ns = h.fresh_namespace();
    let (a, b) = (h.open_as(&ns, "a").await, h.open_as(&ns, "b").await);
    assert_ne!(a.client_id(), b.client_id(), "two hosts, two Ceph clients");
    for i in 0..6 {
        let v = vid(&format!("v{i}"));
        // Odd rounds take the create-rename path of a non-default block size.
        let o = if i % 2 == 0 {
            VolumeOptions::new(1 << 20)
        } else {
            VolumeOptions::new(1 << 20).with_block_size(BlockSize::new(512).unwrap())
        };
        let (ra, rb) = tokio::join!(a.create_volume(&v, &o), b.create_volume(&v, &o));
        let kinds = [
            ra.as_ref().err().map(|e| e.kind()),
            rb.as_ref().err().map(|e| e.kind()),
        ];
        assert!(
            kinds == [None, Some(ErrorKind::AlreadyExists)]
                || kinds == [Some(ErrorKind::AlreadyExists), None],
            "round {i}: {ra:?} / {rb:?}"
        );
        assert_eq!(b.stat_volume(&v).await.unwrap().block_size, o.block_size);
    }
    let base = vid("v0");
    a.write_at(&base, 0, b"base").await.unwrap();
    let s = a.snapshot(&base).await.unwrap();
    for i in 0..4 {
        let c = vid(&format!("c{i}"));
        let (ra, rb) = tokio::join!(a.clone_snapshot(&s, &c), b.clone_snapshot(&s, &c));
        assert!(ra.is_ok() != rb.is_ok(), "clone round {i}: {ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        let e = loser.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert_eq!(&b.read_at(&c, 0, 4).await.unwrap()[..], b"base");
    }
    // Nothing half-made is left: 6 volumes, 4 clones, no temporary image, empty trash.
    let (dir, trash) = a.rbd_listing().await.unwrap();
    assert_eq!(dir.len(), 10, "{dir:?} {:?}", a.list_volumes().await);
    assert!(trash.is_empty(), "{trash:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_racing_removal_exactly_one_wins_and_holds_are_seen_everywhere() {
    let Some(h) = support::harness_for("hold") else {
        return;
    };
    let ns = h.fresh_namespace();
    let (a, b) = (h.open_as(&ns, "a").await, h.open_as(&ns, "b").await);
    assert_ne!(a.client_id(), b.client_id(), "two hosts, two Ceph clients");
    let v = vid("v");
    a.create_volume(&v, &VolumeOptions::new(1 << 16))
        .await
        .unwrap();
    a.write_at(&v, 0, b"x").await.unwrap();
    let (mut held, mut removed) = (0, 0);
    for i in 0..8 {
        let s = a.snapshot(&v).await.unwrap();
        let (rh, rr) = tokio::join!(a.hold_snapshot(&s, "layer"), b.remove_snapshot(&s));
        match (&rh, &rr) {
            (Ok(()), Err(e)) if e.kind() == ErrorKind::InUse => {
                held += 1;
                assert_eq!(b.stat_snapshot(&s).await.unwrap().holds, vec!["layer"]);
                a.release_snapshot(&s, "layer").await.unwrap();
                b.remove_snapshot(&s).await.unwrap();
            }
            (Err(e), Ok(())) if e.kind() == ErrorKind::NotFound => {
                removed += 1;
                assert_eq!(
                    a.stat_snapshot(&s).await.unwrap_err().kind(),
                    ErrorKind::NotFound
                );
            }
            _ => panic!("round {i}: hold {rh:?}, remove {rr:?}"),
        }
    }
    println!("hold won {held} times, removal {removed} times");
    // Holds placed by two hosts at once are both durable and visible to a third.
    let s = a.snapshot(&v).await.unwrap();
    let (r1, r2) = tokio::join!(a.hold_snapshot(&s, "from-a"), b.hold_snapshot(&s, "from-b"));
    r1.unwrap();
    r2.unwrap();
    let c = h.open_as(&ns, "c").await;
    assert_eq!(
        c.stat_snapshot(&s).await.unwrap().holds,
        vec!["from-a", "from-b"]
    );
    assert_eq!(
        c.remove_snapshot(&s).await.unwrap_err().kind(),
        ErrorKind::InUse
    );
    assert!(a.list_snapshots().await.unwrap().contains(&s));
}

/// A host clones through the parent's handle it opened at the snapshot for an earlier
/// clone (and keeps for reads): when another host has since renamed the parent (its
/// volume removed) or removed the snapshot, the clone looks both up again, and a hold
/// placed after the handle was opened is still not copied into the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_through_a_kept_parent_handle_sees_other_hosts_changes() {
    let Some(h) = support::harness_for("kept") else {
        return;
    };
    let ns = h.fresh_namespace();
    let (a, b) = (h.open_as(&ns, "a").await, h.open_as(&ns, "b").await);
    let bs = BlockSize::new(512).unwrap();
    let v = vid("base");
    a.create_volume(&v, &VolumeOptions::new(1 << 20).with_block_size(bs))
        .await
        .unwrap();
    a.write_at(&v, 0, b"base").await.unwrap();
    let s = a.snapshot(&v).await.unwrap();
    a.clone_snapshot(&s, &vid("c1")).await.unwrap();
    assert_eq!(&a.read_snapshot_at(&s, 0, 4).await.unwrap()[..], b"base");

    // Another host holds the snapshot: the hold is image metadata, which RBD copies into
    // a clone; the clone must drop it.
    b.hold_snapshot(&s, "layer").await.unwrap();
    a.clone_snapshot(&s, &vid("c2")).await.unwrap();
    if h.cluster.dir.is_some() {
        let meta = support::cli(
            &h.cluster,
            "rbd",
            &[
                "image-meta",
                "list",
                "--pool",
                "rbd",
                "--namespace",
                &ns,
                "v.c2",
            ],
        )
        .unwrap();
        assert!(
            !meta.contains("slacker.hold."),
            "hold copied into c2: {meta}"
        );
    }
    b.release_snapshot(&s, "layer").await.unwrap();

    // Another host removes the parent volume (renamed; its snapshot lives on).
    b.remove_volume(&v).await.unwrap();
    a.clone_snapshot(&s, &vid("c3")).await.unwrap();
    let st = a.stat_volume(&vid("c3")).await.unwrap();
    assert_eq!((st.block_size, st.origin.as_ref()), (bs, Some(&s)));
    assert_eq!(&a.read_at(&vid("c3"), 0, 4).await.unwrap()[..], b"base");

    // Another host removes the snapshot: the clone fails as for an unknown snapshot and
    // leaves nothing behind.
    b.remove_snapshot(&s).await.unwrap();
    let e = a.clone_snapshot(&s, &vid("c4")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let vols = b.list_volumes().await.unwrap();
    assert_eq!(vols, vec![vid("c1"), vid("c2"), vid("c3")]);
    for c in ["c1", "c2", "c3"] {
        assert_eq!(&b.read_at(&vid(c), 0, 4).await.unwrap()[..], b"base");
    }
}

/// Not a test on its own: the crashed writer of `crashed_writers_lock_is_broken_at_once`
/// (runs only when the parent sets `SLACKER_RBD_CHILD_NS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_child() {
    let Ok(ns) = std::env::var("SLACKER_RBD_CHILD_NS") else {
        return;
    };
    let h = support::harness_for("child").unwrap();
    let b = h.open(&ns).await;
    let v = vid("locked");
    b.write_at(&v, 0, b"child wrote").await.unwrap();
    println!("READY");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_writers_lock_is_broken_at_once() {
    let Some(h) = support::harness_for("lock") else {
        return;
    };
    let ns = h.fresh_namespace();
    let b = h.open(&ns).await;
    let v = vid("locked");
    b.create_volume(&v, &VolumeOptions::new(1 << 20))
        .await
        .unwrap();
    drop(b);
    // A writer in another process takes the exclusive lock, then dies without releasing it.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
        .env("SLACKER_RBD_CHILD_NS", &ns)
        .env("SLACKER_RBD_MON", &h.cluster.mon)
        .env(
            "SLACKER_RBD_KEYRING",
            h.cluster.keyring.clone().unwrap_or_default(),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("READY"))),
        "the child writer never got ready"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let b = h.open(&ns).await;
    let t = Instant::now();
    b.write_at(&v, 100, b"after the crash").await.unwrap();
    let took = t.elapsed();
    let s = b.snapshot(&v).await.unwrap();
    assert_eq!(
        &b.read_snapshot_at(&s, 0, 11).await.unwrap()[..],
        b"child wrote"
    );
    assert_eq!(
        &b.read_snapshot_at(&s, 100, 15).await.unwrap()[..],
        b"after the crash"
    );
    println!("first write after the writer was SIGKILLed took {took:?}");
    // RBD alone waits for the dead client's watch to expire (about 30 s).
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}: the dead lock was waited out"
    );
}

fn config(h: &support::RbdHarness) -> RbdConfig {
    h.config(&h.fresh_namespace())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_typed_errors() {
    let Some(h) = support::harness_for("bad") else {
        return;
    };
    // Unknown pool.
    let mut c = config(&h);
    c.pool = "no-such-pool".into();
    let e = RbdBuilder::from_config(c).build().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("no-such-pool"), "{e}");

    // A keyring with a key the cluster does not know.
    if h.cluster.keyring.is_some() {
        let key = Command::new("ceph-authtool")
            .arg("--gen-print-key")
            .output()
            .expect("ceph-authtool");
        let key = String::from_utf8(key.stdout).unwrap();
        let dir = std::env::temp_dir().join(format!("slacker-rbd-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kr = dir.join("keyring");
        std::fs::write(&kr, format!("[client.admin]\n\tkey = {}\n", key.trim())).unwrap();
        let mut c = config(&h);
        c.keyring = Some(kr.to_string_lossy().into_owned());
        c.connect_timeout_ms = 5000;
        let t = Instant::now();
        let e = RbdBuilder::from_config(c).build().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains("refused the key"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(11), "{:?}", t.elapsed());
        let mut c = config(&h);
        c.keyring = Some(dir.join("missing").to_string_lossy().into_owned());
        let e = RbdBuilder::from_config(c).build().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Nobody listens: a Backend error naming the call and the monitors, within the timeout.
    let mut c = config(&h);
    c.mon_host = "127.0.0.1:9".into();
    c.connect_timeout_ms = 2000;
    let t = Instant::now();
    let e = RbdBuilder::from_config(c).build().await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.to_string().contains("rados_connect") && e.to_string().contains("127.0.0.1:9"),
        "{e}"
    );
    assert!(
        took < Duration::from_secs(6),
        "unreachable cluster took {took:?}"
    );

    // Settings that cannot work.
    let mut c = config(&h);
    c.object_size = 3000;
    assert_eq!(
        RbdBuilder::from_config(c).build().await.unwrap_err().kind(),
        ErrorKind::Config
    );
    assert!(serde_json::from_str::<RbdConfig>(r#"{"mon_host":"h","pool_name":"x"}"#).is_err());

    // Snapshot ids of another scheme, and malformed ones of ours; nothing stored is lost.
    let b = h.open(&h.fresh_namespace()).await;
    let v = vid("keep");
    b.create_volume(&v, &VolumeOptions::new(4096))
        .await
        .unwrap();
    b.write_at(&v, 0, b"kept").await.unwrap();
    let nfs = SnapshotId::new("nfs", "0123456789abcdef0123456789abcdef").unwrap();
    assert_eq!(
        b.clone_snapshot(&nfs, &vid("c")).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        b.hold_snapshot(&nfs, "h").await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        b.release_snapshot(&nfs, "h").await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        b.remove_snapshot(&nfs).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let ours = SnapshotId::new("rbd", "zzzz.0123456789abcdef0123456789abcdef").unwrap();
    assert_eq!(
        b.stat_snapshot(&ours).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        b.clone_snapshot(&ours, &vid("c")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(&b.read_at(&v, 0, 4).await.unwrap()[..], b"kept");
    assert_eq!(b.list_volumes().await.unwrap(), vec![v]);
}
