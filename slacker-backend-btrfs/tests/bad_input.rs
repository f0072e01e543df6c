//! Bad input and a hostile environment: roots that are not btrfs, data files removed or
//! planted behind the backend's back, corrupt metadata, a full filesystem.

mod support;

use std::path::Path;

use slacker_backend_btrfs::{BtrfsBackend, BtrfsBuilder, BtrfsConfig};
use slacker_core::{Backend, BackendExt, ErrorKind, Result, SnapshotId, VolumeId, VolumeOptions};
use slacker_testkit::checks::{assert_kind, pattern};

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

fn build(root: &Path) -> Result<BtrfsBackend> {
    BtrfsBuilder::new(root).build()
}

#[test]
fn roots_that_are_not_btrfs_are_config_errors() {
    // /tmp is the root filesystem here (ext4 on this machine type), /dev/shm is tmpfs.
    let tmp = tempfile::tempdir().unwrap();
    for dir in [tmp.path(), Path::new("/dev/shm"), Path::new("/proc")] {
        if dir.exists() && !support::is_btrfs(dir) {
            let e = build(dir).expect_err("not btrfs must be refused at build");
            assert_eq!(e.kind(), ErrorKind::Config, "{}: {e}", dir.display());
            assert!(e.to_string().contains("not btrfs"), "{e}");
        }
    }
    assert!(
        !tmp.path().join("volumes").exists(),
        "a refused root must not be written to"
    );
    assert_kind(build(&tmp.path().join("missing")), ErrorKind::Config);
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert_kind(build(&file), ErrorKind::Config);
    // Unknown configuration fields are refused when parsing.
    assert!(serde_json::from_str::<BtrfsConfig>(r#"{"root": "/x", "roots": "/y"}"#).is_err());
    assert!(
        serde_json::from_str::<BtrfsConfig>(r#"{"root": "/x", "durability": "on-write"}"#).is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_removed_behind_the_backends_back_is_an_integrity_error() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(4 * 4096))
        .await
        .unwrap();
    b.write_at(&v, 0, &pattern(4096, 1)).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    let snap_file = dir
        .path()
        .join("snapshots")
        .join(format!("{}.img", s.key()));
    std::fs::remove_file(&snap_file).unwrap();
    assert_kind(b.read_snapshot_at(&s, 0, 1).await, ErrorKind::Integrity);
    assert_kind(b.clone_snapshot(&s, &vid("c")).await, ErrorKind::Integrity);
    assert!(!b.list_volumes().await.unwrap().contains(&vid("c")));
    // The volume itself is unaffected.
    assert_eq!(
        &b.read_at(&v, 0, 4096).await.unwrap()[..],
        &pattern(4096, 1)[..]
    );

    // Remove the volume's file too, then reopen: both are kept (never silently lost) and
    // answer Integrity until removed.
    std::fs::remove_file(b.local_path(&v).await.unwrap()).unwrap();
    drop(b);
    let b = support::open(dir.path());
    assert_eq!(b.list_volumes().await.unwrap(), vec![v.clone()]);
    assert_eq!(b.list_snapshots().await.unwrap(), vec![s.clone()]);
    assert_kind(b.read_at(&v, 0, 1).await, ErrorKind::Integrity);
    assert_kind(b.write_at(&v, 0, b"x").await, ErrorKind::Integrity);
    assert_kind(b.snapshot(&v).await, ErrorKind::Integrity);
    assert_kind(b.local_path(&v).await, ErrorKind::Integrity);
    assert_kind(b.read_snapshot_at(&s, 0, 1).await, ErrorKind::Integrity);
    b.remove_snapshot(&s).await.unwrap();
    b.remove_volume(&v).await.unwrap();
    assert!(b.list_volumes().await.unwrap().is_empty());
    assert!(b.list_snapshots().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_removed_and_corrupt_metadata_is_refused() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(4096))
        .await
        .unwrap();
    drop(b);
    // A data file nobody's metadata names: what a crash mid-create leaves.
    let ghost = dir.path().join("volumes").join("ghost.img");
    std::fs::write(&ghost, b"half-created").unwrap();
    let orphan_snap = dir.path().join("snapshots").join("s1-dead.img");
    std::fs::write(&orphan_snap, b"half-snapshotted").unwrap();
    let stray = dir.path().join("volumes").join("README");
    std::fs::write(&stray, b"not ours").unwrap();
    let b = support::open(dir.path());
    assert!(
        !ghost.exists() && !orphan_snap.exists(),
        "orphans removed at open"
    );
    assert!(stray.exists(), "files that are not ours are left alone");
    assert_eq!(b.list_volumes().await.unwrap(), vec![v.clone()]);
    drop(b);

    let doc = dir.path().join("meta").join("volume.v.json");
    std::fs::write(&doc, b"{ not json").unwrap();
    assert_kind(build(dir.path()), ErrorKind::Integrity);
    std::fs::write(&doc, br#"{"format": 1, "id": "other", "size": 4096, "block_size": 4096, "origin": null, "diverged": []}"#).unwrap();
    assert_kind(build(dir.path()), ErrorKind::Integrity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_unknown_ids() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let b = support::open(dir.path());
    let mem: SnapshotId = "mem:s00000001".parse().unwrap();
    assert_kind(
        b.read_snapshot_at(&mem, 0, 1).await,
        ErrorKind::InvalidInput,
    );
    assert_kind(
        b.clone_snapshot(&mem, &vid("c")).await,
        ErrorKind::InvalidInput,
    );
    let unknown: SnapshotId = "btrfs:s1-0000".parse().unwrap();
    assert_kind(b.release_snapshot(&unknown, "h").await, ErrorKind::NotFound);
    assert_kind(b.local_path(&vid("nope")).await, ErrorKind::NotFound);
    assert_kind(b.flush(&vid("nope")).await, ErrorKind::NotFound);
}

/// A full filesystem mid-write and mid-clone/snapshot: typed errors, nothing existing
/// damaged, and everything works again once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_filesystem_gives_typed_errors_and_damages_nothing() {
    if support::base().is_none() {
        return;
    }
    if let Some(why) = support::cannot_mount() {
        // A directory given through SLACKER_BTRFS_ROOT cannot be filled safely.
        slacker_testkit::skip_or_fail::<()>(format!(
            "ENOSPC test needs its own small btrfs: {why}"
        ));
        return;
    }
    let small = support::Mounted::new("256M").expect("small btrfs");
    let b = support::open(&small.mnt);
    let keep = vid("keep");
    b.create_volume(&keep, &VolumeOptions::new(1 << 20))
        .await
        .unwrap();
    let keep_data = pattern(1 << 20, 7);
    b.write_at(&keep, 0, &keep_data).await.unwrap();
    let s = b.snapshot(&keep).await.unwrap();
    let digest = b.snapshot_digest(&s).await.unwrap();

    // Fill the filesystem through write_at.
    let big = vid("big");
    b.create_volume(&big, &VolumeOptions::new(1 << 30))
        .await
        .unwrap();
    let chunk = pattern(1 << 20, 9);
    let mut written = 0u64;
    let err = loop {
        match b.write_at(&big, written, &chunk).await {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 1 << 30, "a 256 MiB filesystem took 1 GiB");
    };
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    eprintln!("write_at failed after {} MiB: {err}", written >> 20);
    // Flushing the full volume may fail too, with a typed error.
    if let Err(e) = b.flush(&big).await {
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    }

    // Clones and snapshots on the full filesystem: each either works or fails typed,
    // leaving no half-made volume behind.
    let mut made = vec![keep.clone(), big.clone()];
    let mut failures = 0;
    let mut first_failure = None;
    for i in 0..64 {
        let c = vid(&format!("c{i}"));
        match b.clone_snapshot(&s, &c).await {
            Ok(()) => made.push(c.clone()),
            Err(e) => {
                failures += 1;
                assert_eq!(e.kind(), ErrorKind::Backend, "clone on a full fs: {e}");
                first_failure.get_or_insert(e.to_string());
            }
        }
        if b.list_volumes().await.unwrap().contains(&c) {
            let w = b.write_at(&c, 0, &pattern(64 << 10, 3)).await;
            if let Err(e) = w {
                assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
            }
        }
    }
    made.sort();
    assert_eq!(
        b.list_volumes().await.unwrap(),
        made,
        "failed clones left volumes"
    );
    eprintln!(
        "on the full filesystem {failures} of 64 clones failed (typed), first: {first_failure:?}"
    );

    // Nothing existing is damaged.
    assert_eq!(b.snapshot_digest(&s).await.unwrap(), digest);
    assert_eq!(
        &b.read_at(&keep, 0, 1 << 20).await.unwrap()[..],
        &keep_data[..]
    );

    // Free space, and everything works again; a reopen sees the same state.
    b.remove_volume(&big).await.unwrap();
    sh_sync(&small.mnt);
    let after = vid("after");
    b.create_volume(&after, &VolumeOptions::new(1 << 20))
        .await
        .unwrap();
    b.write_at(&after, 0, &chunk).await.unwrap();
    b.flush(&after).await.unwrap();
    let s2 = b.snapshot(&after).await.unwrap();
    let vols = b.list_volumes().await.unwrap();
    drop(b);
    let b = support::open(&small.mnt);
    assert_eq!(b.list_volumes().await.unwrap(), vols);
    assert_eq!(b.snapshot_digest(&s).await.unwrap(), digest);
    assert_eq!(&b.read_snapshot(&s2).await.unwrap()[..], &chunk[..]);
    drop(b);
    drop(small);
}

/// Commits the transaction so freed space is really free.
fn sh_sync(p: &Path) {
    let _ = support::sh(std::process::Command::new("sync").arg("-f").arg(p));
}

/// Holds are marker documents (`meta/hold.<key>.<holder>.hold`, snapshot documents of
/// format 2). A snapshot document of format 1, as builds before markers wrote it, keeps
/// its holds inside: they are read, and holding or releasing it rewrites that document
/// (no marker), across reopens. A marker whose snapshot has no document is removed at
/// open; a document of an unknown format is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_1_snapshots_keep_their_holds_inside_and_stray_markers_go() {
    let Some(dir) = support::fresh_dir() else {
        return;
    };
    let meta = dir.path().join("meta");
    let b = support::open(dir.path());
    let v = vid("v");
    b.create_volume(&v, &VolumeOptions::new(4096))
        .await
        .unwrap();
    let (old, new) = (b.snapshot(&v).await.unwrap(), b.snapshot(&v).await.unwrap());
    b.hold_snapshot(&new, "h1").await.unwrap();
    drop(b);
    let doc_of = |s: &SnapshotId| meta.join(format!("snapshot.{}.json", s.key()));
    let marker_of = |s: &SnapshotId, h: &str| meta.join(format!("hold.{}.{h}.hold", s.key()));
    assert!(marker_of(&new, "h1").exists(), "a hold is a marker");
    let json = |s: &SnapshotId| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(doc_of(s)).unwrap()).unwrap()
    };
    assert_eq!(json(&new)["format"], 2);
    assert_eq!(json(&new)["holds"], serde_json::json!([]));
    // `old` as a build before markers left it: format 1, one hold inside.
    let mut d = json(&old);
    d["format"] = 1.into();
    d["holds"] = serde_json::json!(["legacy"]);
    std::fs::write(doc_of(&old), serde_json::to_vec(&d).unwrap()).unwrap();
    // A marker of a snapshot that does not exist.
    let stray = meta.join("hold.s1-0000.ghost.hold");
    std::fs::write(&stray, b"").unwrap();

    let b = support::open(dir.path());
    assert!(!stray.exists(), "the stray marker is removed at open");
    let holds = |b: BtrfsBackend, s: SnapshotId| async move {
        let h = b.stat_snapshot(&s).await.unwrap().holds;
        (b, h)
    };
    let (b, h) = holds(b, old.clone()).await;
    assert_eq!(h, ["legacy"]);
    b.hold_snapshots(&[old.clone(), new.clone()], "h2")
        .await
        .unwrap();
    assert!(!marker_of(&old, "h2").exists(), "format 1: no marker");
    assert_eq!(json(&old)["holds"], serde_json::json!(["h2", "legacy"]));
    assert!(marker_of(&new, "h2").exists());
    assert_kind(b.remove_snapshot(&old).await, ErrorKind::InUse);
    drop(b);
    let b = support::open(dir.path());
    let (b, h) = holds(b, old.clone()).await;
    assert_eq!(h, ["h2", "legacy"]);
    let (b, h) = holds(b, new.clone()).await;
    assert_eq!(h, ["h1", "h2"]);
    for (s, h) in [(&old, "h2"), (&old, "legacy"), (&new, "h1"), (&new, "h2")] {
        b.release_snapshot(s, h).await.unwrap();
    }
    assert_eq!(json(&old)["holds"], serde_json::json!([]));
    assert!(!marker_of(&new, "h1").exists() && !marker_of(&new, "h2").exists());
    b.remove_snapshot(&old).await.unwrap();
    b.remove_snapshot(&new).await.unwrap();
    let s = b.snapshot(&v).await.unwrap();
    drop(b);
    let mut d = json(&s);
    d["format"] = 3.into();
    std::fs::write(doc_of(&s), serde_json::to_vec(&d).unwrap()).unwrap();
    assert_kind(build(dir.path()), ErrorKind::Integrity);
}
