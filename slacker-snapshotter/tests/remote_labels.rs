//! CRI's remote-snapshot labels over the real socket, against a real registry: a layer's
//! `Prepare` carrying `containerd.io/snapshot.ref`, `containerd.io/snapshot/cri.layer-digest`
//! and `containerd.io/snapshot/cri.image-ref` (as CRI's unpacker sends them) makes the
//! snapshotter fetch the layer itself. A slacker reference layer answers `AlreadyExists`
//! and the chain id is then a committed snapshot a container's `Prepare` clones and
//! mounts (the image's files are there); a standard tar+gzip layer, or an unreachable
//! registry, gets the ordinary staging mounts so containerd downloads it itself.

mod support;

use std::collections::HashMap;

use containerd_snapshots::api::snapshots::v1::*;
use slacker_oci::{ClientOptions, PushLayer, RegistryClient, sha256_digest};
use slacker_snapshotter::service::{
    LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_SNAPSHOT_REF,
};
use support::tree::{busybox_root, layer_tar};
use support::*;

fn cri_labels(chain: &str, digest: &str, image: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_SNAPSHOT_REF.to_owned(), chain.to_owned()),
        (LABEL_CRI_LAYER_DIGEST.to_owned(), digest.to_owned()),
        (LABEL_CRI_IMAGE_REF.to_owned(), image.to_owned()),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_owned(),
            "sha256:0000000000000000000000000000000000000000000000000000000000000000".to_owned(),
        ),
    ])
}

/// A layer's Prepare as CRI's unpacker sends it: the extract key for the layer of
/// `digest` in `image`, whose chain id is `chain`.
async fn prepare_layer(
    c: &mut Client,
    key: &str,
    parent: &str,
    (chain, digest, image): (&str, &str, &str),
) -> Result<Vec<containerd_snapshots::api::types::Mount>, Status> {
    prepare_labeled(c, key, parent, cri_labels(chain, digest, image)).await
}

#[test]
fn cri_labels_fetch_reference_layers_and_skip_the_download() {
    if let Some(why) = missing(&[
        "docker-registry",
        "busybox",
        "mkfs.btrfs",
        "mkfs.ext4",
        "debugfs",
        "fsfreeze",
        "curl",
    ]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some((_fs, dir, data)) = btrfs_run("4G") else {
        return;
    };
    let Some(registry) = registry() else {
        return;
    };
    let rt = runtime();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let addr = registry.addr().to_owned();
    let lower = dir.join("lower");
    busybox_root(&lower);
    std::fs::write(lower.join("etc/marker"), b"remote snapshot\n").unwrap();

    // The image: a reference layer (plain tar, as containerd's unpacker wants it) and a
    // standard tar+gzip layer on top.
    let image = format!("{addr}/slk/remote:1");
    let standard_tar = layer_tar(&lower, &[]);
    let standard = PushLayer::tar_gzip(&standard_tar, 1);
    let (ref_digest, std_digest) = rt.block_on(async {
        let reference = reference_layer(
            slacker_config::BackendConfig::btrfs(&data),
            &dir.join("builder"),
            256 << 20,
            &lower,
        )
        .await;
        let ref_digest = sha256_digest(&reference);
        let std_digest = sha256_digest(&standard.data);
        client
            .push_layers(&image, vec![PushLayer::tar(reference), standard], None)
            .await
            .expect("push the image");
        (ref_digest, std_digest)
    });

    let cfg = write_config(
        &dir,
        &btrfs_toml(&data),
        &format!("metrics_address = \"127.0.0.1:19139\"\n[registry]\nplain_http = [\"{addr}\"]"),
    );
    let snap = snapshotter(&cfg);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        // The reference layer: fetched by the snapshotter, AlreadyExists, committed.
        let chain1 = ("sha256:chain1", ref_digest.as_str(), image.as_str());
        let r = prepare_layer(&mut c, "k8s.io/1/extract-1-sha256:chain1", "", chain1).await;
        assert_eq!(code(r), Code::AlreadyExists);
        let info = c
            .stat(StatSnapshotRequest {
                snapshotter: "slacker".into(),
                key: "sha256:chain1".into(),
            })
            .await
            .expect("the chain id is a snapshot now")
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, 3, "committed: {info:?}");
        assert_eq!(
            info.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str),
            Some("sha256:chain1")
        );
        // Asked again (a second pull of the image): AlreadyExists, nothing new.
        let again = prepare_layer(&mut c, "k8s.io/1/extract-2-sha256:chain1", "", chain1).await;
        assert_eq!(code(again), Code::AlreadyExists);

        // The standard layer: not a reference; the ordinary staging mounts come back,
        // containerd downloads and unpacks it.
        let m = prepare_layer(
            &mut c,
            "k8s.io/1/extract-3-sha256:chain2",
            "sha256:chain1",
            ("sha256:chain2", &std_digest, &image),
        )
        .await
        .expect("a standard layer is unpacked by containerd");
        assert_eq!(m[0].r#type, "overlay", "{m:?}");
        // An unreachable registry: containerd downloads it too.
        let unreachable = prepare_layer(
            &mut c,
            "k8s.io/1/extract-4-sha256:chain3",
            "sha256:chain1",
            ("sha256:chain3", &ref_digest, "127.0.0.1:1/slk/remote:1"),
        )
        .await
        .expect("falls back to the download");
        assert_eq!(unreachable[0].r#type, "overlay");

        // A container on the remote snapshot: its files are the image's.
        let m = prepare(&mut c, "ctr-1", "sha256:chain1").await.unwrap();
        // On btrfs the snapshotter mounts the volume's ext4 itself and hands out a bind
        // mount of it.
        assert_eq!(m[0].r#type, "bind", "{m:?}");
        sh(std::process::Command::new("mount")
            .args(["--bind", &m[0].source])
            .arg(&mnt))
        .unwrap();
        let marker = std::fs::read_to_string(mnt.join("etc/marker"));
        sh(std::process::Command::new("umount").arg(&mnt)).unwrap();
        assert_eq!(marker.unwrap(), "remote snapshot\n");
    });
    let m = "127.0.0.1:19139";
    assert_eq!(metric(m, "slacker_snapshotter_remote_snapshots_total"), 1);
    assert_eq!(
        metric(m, "slacker_snapshotter_clones_total"),
        1,
        "only the container's prepare clones"
    );
    drop(snap);
    drop(registry);
}
