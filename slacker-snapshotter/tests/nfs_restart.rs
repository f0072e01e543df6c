//! kill -9 of the snapshotter on the NFS backend (volumes served through FUSE by the
//! snapshotter itself), against the project's knfsd VM (`SLACKER_NFS_ADDR`).
//!
//! What holds: the restarted process serves every active volume again at the same path
//! (`Mounts` answers what it answered before), a new mount of it shows every write that
//! was synced before the kill, it commits, and its children clone and mount; Walk and the
//! storage's volume list agree, and removing everything leaves no volume.
//!
//! What does not (the kernel offers no way to hand a dead FUSE connection's open files
//! to a new daemon): the loop device under a mount made before the kill keeps the old,
//! dead FUSE file, so that mount sees IO errors. The test records what it sees there.

mod support;

use std::collections::HashMap;
use std::process::Command;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::tonic::transport::Channel;
use slacker_core::Backend;
use support::*;

fn req(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "slacker".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

async fn mounts_of(c: &mut SnapshotsClient<Channel>, key: &str) -> String {
    let m = c
        .mounts(MountsRequest {
            snapshotter: "slacker".into(),
            key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "ext4", "{m:?}");
    m[0].source.clone()
}

async fn walk(c: &mut SnapshotsClient<Channel>) -> Vec<String> {
    use tokio_stream::StreamExt;
    let mut s = c
        .list(ListSnapshotsRequest {
            snapshotter: "slacker".into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.extend(r.unwrap().info.into_iter().map(|i| i.name));
    }
    out.sort();
    out
}

fn mount(src: &str, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    sh(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop", src])
        .arg(dir))
    .unwrap();
}

#[test]
fn kill_9_on_nfs_serves_the_same_paths_again() {
    if let Some(why) = missing(&["mkfs.ext4", "debugfs", "fsfreeze", "losetup"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some(addr) = nfs_addr() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("slk-snap-nfsr-")
        .tempdir()
        .unwrap();
    let nfs_dir = format!(
        "snaprestart-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let cfg = write_config(
        dir.path(),
        &format!("kind = \"nfs\"\nserver = \"{addr}\"\ndir = \"{nfs_dir}\""),
        "",
    );
    let rt = runtime();
    let m1 = dir.path().join("m1");
    let m2 = dir.path().join("m2");
    let m3 = dir.path().join("m3");

    let mut snap = snapshotter(&cfg);
    let before = rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        c.prepare(req("a", "")).await.unwrap();
        let src = mounts_of(&mut c, "a").await;
        assert!(src.ends_with("/disk.img"), "served through FUSE: {src}");
        mount(&src, &m1);
        std::fs::write(m1.join("before"), b"written before the kill\n").unwrap();
        sh(Command::new("sync").arg("-f").arg(m1.join("before"))).unwrap();
        src
    });
    snap.kill();

    // The old mount: its loop device holds the dead FUSE file.
    let write = std::fs::write(m1.join("during"), vec![7u8; 1 << 20])
        .and_then(|()| std::fs::File::open(m1.join("during"))?.sync_all());
    eprintln!("old mount after kill -9: write+fsync -> {write:?}");

    let snap = snapshotter(&cfg);
    rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        assert_eq!(walk(&mut c).await, vec!["a".to_owned()]);
        let again = mounts_of(&mut c, "a").await;
        assert_eq!(again, before, "the same path is served again");
        // The old mount goes away (its loop device autoclears).
        let _ = sh(Command::new("umount").arg(&m1));
        // A new mount over the re-served file: what was synced before the kill is there.
        mount(&again, &m2);
        assert_eq!(
            std::fs::read_to_string(m2.join("before")).unwrap(),
            "written before the kill\n"
        );
        std::fs::write(m2.join("after"), b"written after the restart\n").unwrap();
        sh(Command::new("umount").arg(&m2)).unwrap();
        c.commit(CommitSnapshotRequest {
            snapshotter: "slacker".into(),
            name: "c1".into(),
            key: "a".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap();
        c.prepare(req("b", "c1")).await.unwrap();
        let src = mounts_of(&mut c, "b").await;
        mount(&src, &m3);
        let got = (
            std::fs::read_to_string(m3.join("before")).unwrap(),
            std::fs::read_to_string(m3.join("after")).unwrap(),
        );
        sh(Command::new("umount").arg(&m3)).unwrap();
        assert_eq!(
            got,
            (
                "written before the kill\n".to_owned(),
                "written after the restart\n".to_owned()
            )
        );
        // Walk and the storage agree; removing everything leaves no volume.
        assert_eq!(walk(&mut c).await, vec!["b".to_owned(), "c1".to_owned()]);
        let backend = slacker_config::BackendConfig::nfs(addr.clone(), nfs_dir.clone())
            .open()
            .await
            .unwrap();
        let owned = |v: Vec<slacker_core::VolumeId>| {
            v.into_iter()
                .map(|v| v.to_string())
                .filter(|v| v.starts_with("ctrd-") && v != "ctrd-base")
                .collect::<Vec<_>>()
        };
        assert_eq!(
            owned(backend.list_volumes().await.unwrap()).len(),
            1,
            "b's volume"
        );
        for k in ["b", "c1"] {
            c.remove(RemoveSnapshotRequest {
                snapshotter: "slacker".into(),
                key: k.into(),
            })
            .await
            .unwrap();
        }
        assert!(walk(&mut c).await.is_empty());
        assert_eq!(
            owned(backend.list_volumes().await.unwrap()),
            Vec::<String>::new()
        );
    });
    drop(snap);
    unmount_under(dir.path());
}
