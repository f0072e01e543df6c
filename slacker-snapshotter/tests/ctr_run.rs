//! A real runtime: Debian's containerd 1.6 + runc, started by the test with the
//! snapshotter as a proxy plugin, and Debian's docker-registry. `ctr images pull
//! --snapshotter slacker` then `ctr run --snapshotter slacker IMAGE ID /bin/sh -c 'echo
//! hello'` prints hello for (a) a standard image of two tar+gzip layers with a whiteout,
//! a setuid file, a file capability, a hard link, an owned file and a device node, and
//! (b) a slacker image pushed with slacker-oci (a 2 KiB reference layer): its pull moves
//! at most 4 KiB of layer data and makes no clone. In both, the container's root tree
//! equals the image's tree.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slacker_core::LayerStore;
use slacker_core::layer::LayerStoreOptions;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_oci::{ClientOptions, PushLayer, RegistryClient};
use support::tree::{assert_same, busybox_root, layer_tar, walk};
use support::*;

/// The containerd namespace: per test process, so runc state never collides.
fn ns() -> String {
    // Per test thread too: tests of this binary run in parallel, each with its own
    // containerd, but runc's state directory is per namespace.
    let t: String = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    format!("slk{}t{t}", std::process::id())
}

/// Pulls `image`, runs `echo hello` in it, then runs it detached and returns the
/// container's root tree as the host sees it.
fn pull_and_run(
    ctrd: &Containerd,
    image: &str,
) -> std::collections::BTreeMap<PathBuf, support::tree::Desc> {
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "slacker",
        image,
    ])
    .expect("ctr images pull");
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "slacker",
            image,
            "hello",
            "/bin/sh",
            "-c",
            "echo hello",
        ])
        .expect("ctr run");
    assert_eq!(out, "hello\n", "ctr run printed {out:?}");
    ctrd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "slacker",
        image,
        "tree",
        "/bin/sleep",
        "300",
    ])
    .expect("ctr run -d");
    let tree = walk(&ctrd.rootfs("tree"), &[]);
    ctrd.remove_container("tree").expect("ctr containers rm");
    tree
}

fn metric(addr: &str, name: &str) -> u64 {
    let body = sh(Command::new("curl").args(["-fsS", &format!("http://{addr}/metrics")])).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {body}"))
}

#[test]
fn ctr_pulls_and_runs_standard_and_slacker_images() {
    if let Some(why) = missing(&[
        "containerd",
        "ctr",
        "runc",
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
    let Some((_fs, dir, data)) = btrfs_run("8G") else {
        return;
    };
    let Some(registry) = registry() else {
        return;
    };
    let rt = runtime();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let addr = registry.addr().to_owned();

    // (a) A standard image: two tar+gzip layers, the second deleting etc/gone.
    let lower = dir.join("lower");
    busybox_root(&lower);
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/added"), b"by layer 2\n").unwrap();
    std::fs::write(upper.join("etc/hostname"), b"replaced\n").unwrap();
    let l1 = layer_tar(&lower, &[]);
    let l2 = layer_tar(&upper, &["etc/gone"]);
    let standard = format!("{addr}/slk/standard:1");
    rt.block_on(client.push_layers(
        &standard,
        vec![PushLayer::tar_gzip(&l1, 6), PushLayer::tar_gzip(&l2, 6)],
        None,
    ))
    .expect("push the standard image");
    // The image's tree: lower, then upper, minus the whiteout.
    let expected = dir.join("expected");
    sh(Command::new("cp").arg("-a").arg(&lower).arg(&expected)).unwrap();
    sh(Command::new("cp")
        .arg("-a")
        .arg(upper.join("."))
        .arg(&expected))
    .unwrap();
    std::fs::remove_file(expected.join("etc/gone")).unwrap();
    let want_a = walk(&expected, &[]);

    // (b) A slacker image: the same busybox root imported into a layer store on the
    // snapshotter's storage, pushed as a 2 KiB reference layer (a plain tar to
    // containerd). Done before the snapshotter opens the storage.
    let slacker_image = format!("{addr}/slk/slacker:1");
    let pushed_layer_bytes = rt.block_on(async {
        let backend = slacker_config::BackendConfig::btrfs(&data)
            .open()
            .await
            .unwrap();
        let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir.join("builder")).unwrap());
        let store = LayerStore::open(
            backend,
            meta,
            LayerStoreOptions::new("builder").with_volume_size(256 << 20),
        )
        .await
        .unwrap();
        store.import_dir("busybox", &lower).await.unwrap();
        let diff = store.diff("busybox").await.unwrap();
        let report = client
            .push_layers(&slacker_image, vec![PushLayer::tar(diff.tar.clone())], None)
            .await
            .expect("push the slacker image");
        report.layer_bytes_uploaded()
    });
    assert!(
        pushed_layer_bytes <= 4096,
        "reference layer of {pushed_layer_bytes} bytes"
    );

    let cfg = write_config(
        &dir,
        &format!("kind = \"btrfs\"\npath = \"{}\"", data.display()),
        "metrics_address = \"127.0.0.1:19137\"",
    );
    let snap = snapshotter(&cfg);
    let ctrd = containerd(&dir, &snap.socket, &ns());
    let m = "127.0.0.1:19137";

    let got_a = pull_and_run(&ctrd, &standard);
    assert_same(&want_a, &got_a, "standard image");

    let clones_before = metric(m, "slacker_snapshotter_clones_total");
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "slacker",
        &slacker_image,
    ])
    .expect("pull the slacker image");
    assert_eq!(
        metric(m, "slacker_snapshotter_clones_total"),
        clones_before,
        "pulling a slacker image must not clone"
    );
    assert_eq!(metric(m, "slacker_snapshotter_lazy_commits_total"), 1);
    let got_b = pull_and_run(&ctrd, &slacker_image);
    // The image's tree is the imported directory (the ext4 also holds lost+found).
    assert_same(
        &walk(&lower, &[]),
        &got_b
            .into_iter()
            .filter(|(p, _)| p != Path::new("lost+found"))
            .collect(),
        "slacker image",
    );
    drop(ctrd);
    drop(snap);
    drop(registry);
}

/// Volumes of the snapshotter (`ctrd-*`) in the btrfs backend's directory.
fn backend_volumes(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ctrd-"))
        .collect();
    v.sort();
    v
}

/// Active and view snapshots that own a volume (layers being unpacked own none), from
/// `ctr snapshots ls` (containerd's Walk through the proxy).
fn walked_volume_owners(ctrd: &Containerd) -> usize {
    let out = ctrd
        .ctr(&["snapshots", "--snapshotter", "slacker", "ls"])
        .unwrap();
    out.lines()
        .skip(1)
        .filter(|l| {
            let kind = l.split_whitespace().last().unwrap_or("");
            (kind == "Active" || kind == "View") && !l.contains("extract-")
        })
        .count()
}

/// The snapshotter's metadata documents of staging (extract) snapshots.
fn staging_docs(meta: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(meta)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("s-"))
                        && std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"staging\":true"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn lines_in(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn kill_9_during_a_pull_and_while_a_container_runs() {
    if let Some(why) = missing(&[
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "busybox",
        "mkfs.btrfs",
        "mkfs.ext4",
        "debugfs",
        "fsfreeze",
    ]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some((_fs, dir, data)) = btrfs_run("8G") else {
        return;
    };
    let Some(registry) = registry() else {
        return;
    };
    let rt = runtime();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let addr = registry.addr().to_owned();
    let root = dir.join("rootfs");
    busybox_root(&root);
    let small = format!("{addr}/slk/small:1");
    rt.block_on(client.push_layers(
        &small,
        vec![PushLayer::tar_gzip(&layer_tar(&root, &[]), 1)],
        None,
    ))
    .unwrap();
    // A second image with a 96 MiB layer, so that a pull takes long enough to be killed.
    let big = dir.join("big");
    std::fs::create_dir_all(big.join("opt")).unwrap();
    let noise: Vec<u8> = (0..96u64 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(big.join("opt/blob"), noise).unwrap();
    let large = format!("{addr}/slk/large:1");
    rt.block_on(client.push_layers(
        &large,
        vec![
            PushLayer::tar_gzip(&layer_tar(&root, &[]), 1),
            PushLayer::tar(layer_tar(&big, &[])),
        ],
        None,
    ))
    .unwrap();

    let cfg = write_config(
        &dir,
        &format!("kind = \"btrfs\"\npath = \"{}\"", data.display()),
        "",
    );
    let mut snap = snapshotter(&cfg);
    let ctrd = containerd(&dir, &snap.socket, &ns());
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "slacker",
        &small,
    ])
    .unwrap();
    ctrd.ctr(&[
        "run", "-d", "--snapshotter", "slacker", &small, "writer", "/bin/sh", "-c",
        "i=0; while true; do echo $i >> /tmp/log; cat /etc/hostname > /tmp/read.new; mv /tmp/read.new /tmp/read; i=$((i+1)); sleep 0.05; done",
    ])
    .unwrap();
    let log = ctrd.rootfs("writer").join("tmp/log");
    std::thread::sleep(Duration::from_millis(500));

    // kill -9 during a pull.
    let mut pull = ctrd
        .ctr_command()
        .args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "slacker",
            &large,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while staging_docs(&dir.join("root/meta")).is_empty() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    snap.kill();
    let killed_pull = pull.wait().unwrap();
    eprintln!("pull interrupted by kill -9: {killed_pull}");
    // A power loss right after that Prepare: its document (written without fsync, an
    // active snapshot being scratch) may reach the disk as a rename without data, an
    // empty file. The restarted snapshotter must drop it, not refuse to start.
    let lost = staging_docs(&dir.join("root/meta"));
    assert!(!lost.is_empty(), "the pull was killed before its Prepare");
    for doc in &lost {
        std::fs::write(doc, b"").unwrap();
    }
    let before = lines_in(&log);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        lines_in(&log) > before,
        "the container stopped writing while the snapshotter was down"
    );

    let snap2 = snapshotter(&cfg);
    // containerd's gRPC client reconnects to the new process with a backoff: the first
    // retries may see `Unavailable`, as with any snapshotter restart.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ctrd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "slacker",
            &large,
        ]) {
            Ok(_) => break,
            Err(e) if attempts < 20 && e.to_string().contains("unavailable") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("the retried pull failed (attempt {attempts}): {e}"),
        }
    }
    eprintln!("retried pull succeeded at attempt {attempts}");
    for doc in &lost {
        // Dropped at the start (its number may since name a new snapshot's document).
        assert!(
            std::fs::read(doc).map_or(true, |d| !d.is_empty()),
            "{} was not dropped",
            doc.display()
        );
    }
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "slacker",
            &large,
            "after",
            "/bin/sh",
            "-c",
            "echo hello; ls /opt",
        ])
        .unwrap();
    assert_eq!(out, "hello\nblob\n");
    let before = lines_in(&log);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        lines_in(&log) > before,
        "the container stopped writing after the restart"
    );
    assert_eq!(
        std::fs::read_to_string(ctrd.rootfs("writer").join("tmp/read")).unwrap(),
        "slacker\n"
    );

    // Walk and the storage agree: one volume per active/view snapshot, nothing leaked.
    ctrd.ctr(&["task", "kill", "-s", "SIGKILL", "writer"])
        .unwrap();
    let t = Instant::now();
    while ctrd.ctr(&["task", "rm", "writer"]).is_err() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(walked_volume_owners(&ctrd), 1, "the writer's snapshot");
    assert_eq!(
        backend_volumes(&data).len(),
        1,
        "{:?}",
        backend_volumes(&data)
    );
    ctrd.ctr(&["containers", "rm", "writer"]).unwrap();
    assert_eq!(walked_volume_owners(&ctrd), 0);
    // containerd's garbage collector removes the snapshot shortly after.
    let t = Instant::now();
    while !backend_volumes(&data).is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        backend_volumes(&data),
        Vec::<String>::new(),
        "a volume leaked"
    );
    drop(ctrd);
    drop(snap2);
    drop(snap);
}

/// (a) and (b) on the NFS backend: every volume is served by the snapshotter through
/// FUSE (a LazyVolume), containerd loop-mounts it, runc runs in it. The containers' trees
/// equal the images'; the slacker image's pull moves <= 4 KiB of layer data and makes no
/// clone; the data path's metrics are real (the containers' reads fetched bytes).
#[test]
fn ctr_pulls_and_runs_standard_and_slacker_images_on_nfs() {
    if let Some(why) = missing(&[
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "busybox",
        "mkfs.ext4",
        "debugfs",
        "fsfreeze",
        "curl",
    ]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some(addr) = nfs_addr() else {
        return;
    };
    let Some(registry) = registry() else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("slk-snap-ctrnfs-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_owned();
    let rt = runtime();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let lower = dir.join("lower");
    busybox_root(&lower);
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/added"), b"by layer 2\n").unwrap();
    let standard = format!("{}/slk/standard-nfs:1", registry.addr());
    rt.block_on(client.push_layers(
        &standard,
        vec![
            PushLayer::tar_gzip(&layer_tar(&lower, &[]), 6),
            PushLayer::tar_gzip(&layer_tar(&upper, &["etc/gone"]), 6),
        ],
        None,
    ))
    .expect("push the standard image");
    let expected = dir.join("expected");
    sh(Command::new("cp").arg("-a").arg(&lower).arg(&expected)).unwrap();
    sh(Command::new("cp")
        .arg("-a")
        .arg(upper.join("."))
        .arg(&expected))
    .unwrap();
    std::fs::remove_file(expected.join("etc/gone")).unwrap();
    let want = walk(&expected, &[]);

    let nfs_dir = format!("ctrnfs-{}", ns());
    let cfg = write_config(
        &dir,
        &format!("kind = \"nfs\"\nserver = \"{addr}\"\ndir = \"{nfs_dir}\""),
        "metrics_address = \"127.0.0.1:19141\"",
    );
    let snap = snapshotter(&cfg);
    let ctrd = containerd(&dir, &snap.socket, &ns());
    let got = pull_and_run(&ctrd, &standard);
    assert_same(&want, &got, "standard image on NFS");
    let m = "127.0.0.1:19141";
    let fetched = metric(m, "slacker_snapshotter_lazy_fetched_bytes_total");
    assert!(
        fetched > 0,
        "the containers read through the lazy data path"
    );
    eprintln!("NFS, standard image: {fetched} bytes fetched lazily");

    // A slacker image whose storage is the same NFS directory (shared storage: a
    // builder's layer store there, the snapshotter on it): the pull moves the 2 KiB
    // reference layer, makes no clone, and the container runs lazily through FUSE.
    let slacker_image = format!("{}/slk/slacker-nfs:1", registry.addr());
    let pushed = rt.block_on(async {
        let backend = slacker_config::BackendConfig::nfs(addr.clone(), nfs_dir.clone())
            .open()
            .await
            .unwrap();
        let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir.join("builder")).unwrap());
        let store = LayerStore::open(
            backend,
            meta,
            LayerStoreOptions::new("builder").with_volume_size(128 << 20),
        )
        .await
        .unwrap();
        store.import_dir("busybox", &lower).await.unwrap();
        let diff = store.diff("busybox").await.unwrap();
        client
            .push_layers(&slacker_image, vec![PushLayer::tar(diff.tar.clone())], None)
            .await
            .expect("push the slacker image")
            .layer_bytes_uploaded()
    });
    assert!(pushed <= 4096, "reference layer of {pushed} bytes");
    let clones_before = metric(m, "slacker_snapshotter_clones_total");
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "slacker",
        &slacker_image,
    ])
    .expect("pull the slacker image");
    assert_eq!(
        metric(m, "slacker_snapshotter_clones_total"),
        clones_before,
        "no clone on pull"
    );
    assert_eq!(metric(m, "slacker_snapshotter_lazy_commits_total"), 1);
    let got_b = pull_and_run(&ctrd, &slacker_image);
    assert_same(
        &walk(&lower, &[]),
        &got_b
            .into_iter()
            .filter(|(p, _)| p != Path::new("lost+found"))
            .collect(),
        "slacker image on NFS",
    );
    let fetched_b = metric(m, "slacker_snapshotter_lazy_fetched_bytes_total") - fetched;
    eprintln!("NFS, slacker image: {fetched_b} bytes fetched lazily (volume of 128 MiB)");
    drop(ctrd);
    drop(snap);
    unmount_under(&dir);
    drop(registry);
}

/// Issue 10's acceptance point 3 on NFS, where every container's root filesystem is
/// ext4 on a loop device over a file the snapshotter serves through FUSE: kill -9 during
/// a pull and while a container runs; start again; the retried pull succeeds and the
/// running container keeps reading (O_DIRECT, through the resumed FUSE connection, from
/// a cold cache) and writing (with `sync`) — the fd keeper held its connection while no
/// snapshotter ran. `SLACKER_TEST_FD_KEEPER=off` runs without the keeper: the container's
/// IO then fails and the test fails at "the container stopped writing after the restart".
#[test]
fn kill_9_during_a_pull_and_while_a_container_runs_on_nfs() {
    if let Some(why) = missing(&[
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "busybox",
        "mkfs.ext4",
        "debugfs",
        "fsfreeze",
    ]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some(nfs) = nfs_addr() else {
        return;
    };
    let Some(registry) = registry() else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("slk-snap-ctrk9-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_owned();
    let rt = runtime();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let addr = registry.addr().to_owned();
    let root = dir.join("rootfs");
    busybox_root(&root);
    // Read by the container with O_DIRECT in every round (from the storage, through FUSE).
    std::fs::create_dir_all(root.join("opt")).unwrap();
    std::fs::write(
        root.join("opt/data"),
        (0..1u32 << 20).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let small = format!("{addr}/slk/small-nfs:1");
    rt.block_on(client.push_layers(
        &small,
        vec![PushLayer::tar_gzip(&layer_tar(&root, &[]), 1)],
        None,
    ))
    .unwrap();
    // A second image with a 24 MiB layer, so that a pull takes long enough to be killed.
    let big = dir.join("big");
    std::fs::create_dir_all(big.join("big")).unwrap();
    let noise: Vec<u8> = (0..24u64 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(big.join("big/blob"), noise).unwrap();
    let large = format!("{addr}/slk/large-nfs:1");
    rt.block_on(client.push_layers(
        &large,
        vec![
            PushLayer::tar_gzip(&layer_tar(&root, &[]), 1),
            PushLayer::tar(layer_tar(&big, &[])),
        ],
        None,
    ))
    .unwrap();

    let nfs_dir = format!("ctrk9-{}", ns());
    let cfg = write_config(
        &dir,
        &format!("kind = \"nfs\"\nserver = \"{nfs}\"\ndir = \"{nfs_dir}\""),
        fd_keeper_extra(),
    );
    let mut snap = snapshotter(&cfg);
    let ctrd = containerd(&dir, &snap.socket, &ns());
    // Dropped before containerd: a failed run kills the keeper first, so that processes
    // waiting on its connections get EIO and containerd's teardown does not hang.
    let socket = dir.join("root/keeper.sock");
    let _cleanup = KeeperCleanup {
        socket: socket.clone(),
        dir: dir.clone(),
    };
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "slacker",
        &small,
    ])
    .unwrap();
    ctrd.ctr(&[
        "run", "-d", "--snapshotter", "slacker", &small, "writer", "/bin/sh", "-c",
        "i=0; while true; do echo $i >> /tmp/log; busybox sync; \
         busybox dd if=/opt/data of=/dev/null bs=1M iflag=direct 2>/dev/null && echo $i >> /tmp/reads; \
         cat /etc/hostname > /tmp/read.new; mv /tmp/read.new /tmp/read; i=$((i+1)); sleep 0.05; done",
    ])
    .unwrap();
    let rootfs = ctrd.rootfs("writer");
    let (log, reads) = (rootfs.join("tmp/log"), rootfs.join("tmp/reads"));
    assert!(
        wait_until(Duration::from_secs(60), || lines_in(&reads) >= 2),
        "the container does not run"
    );
    let keepers = keeper_pids(&socket);

    // kill -9 during a pull.
    let mut pull = ctrd
        .ctr_command()
        .args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "slacker",
            &large,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while staging_docs(&dir.join("root/meta")).is_empty() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    snap.kill();
    let killed_pull = pull.wait().unwrap();
    eprintln!("pull interrupted by kill -9: {killed_pull}");
    assert!(
        !staging_docs(&dir.join("root/meta")).is_empty(),
        "the pull was killed before its Prepare"
    );
    std::thread::sleep(Duration::from_millis(1000));

    let snap2 = snapshotter(&cfg);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ctrd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "slacker",
            &large,
        ]) {
            Ok(_) => break,
            Err(e) if attempts < 20 && e.to_string().contains("unavailable") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("the retried pull failed (attempt {attempts}): {e}"),
        }
    }
    eprintln!("retried pull succeeded at attempt {attempts}");
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "slacker",
            &large,
            "after",
            "/bin/sh",
            "-c",
            "echo hello; ls /big",
        ])
        .unwrap();
    assert_eq!(out, "hello\nblob\n");
    // The container that ran across the kill: it writes (and syncs) and reads again.
    let (log_before, reads_before) = (lines_in(&log), lines_in(&reads));
    assert!(
        wait_until(Duration::from_secs(30), || lines_in(&log) > log_before + 3
            && lines_in(&reads) > reads_before + 3),
        "the container stopped writing after the restart: log {} -> {}, reads {} -> {}",
        log_before,
        lines_in(&log),
        reads_before,
        lines_in(&reads)
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/read")).unwrap(),
        "slacker\n"
    );
    assert_eq!(keepers.len(), 1, "one keeper: {keepers:?}");
    assert_eq!(keeper_pids(&socket), keepers, "the same keeper");

    // Walk and the storage agree: one volume per active/view snapshot, nothing leaked.
    ctrd.remove_container("writer").unwrap();
    assert_eq!(walked_volume_owners(&ctrd), 0);
    let backend_volumes = || {
        rt.block_on(async {
            let b = slacker_config::BackendConfig::nfs(nfs.clone(), nfs_dir.clone())
                .open()
                .await
                .unwrap();
            b.list_volumes()
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.to_string())
                .filter(|v| v.starts_with("ctrd-") && v != "ctrd-base")
                .collect::<Vec<_>>()
        })
    };
    // containerd's garbage collector removes the snapshot shortly after.
    assert!(
        wait_until(Duration::from_secs(30), || backend_volumes().is_empty()),
        "a volume leaked: {:?}",
        backend_volumes()
    );
    assert_eq!(
        fuse_fds(snap2.child.id()),
        0,
        "the snapshotter's /dev/fuse files"
    );
    for &k in &keepers {
        assert!(
            wait_until(Duration::from_secs(5), || fuse_fds(k) == 0),
            "the keeper still holds {} /dev/fuse files",
            fuse_fds(k)
        );
    }
    drop(ctrd);
    // kill, not drop: dropping kills the keeper too.
    let mut snap2 = snap2;
    snap2.kill();
    assert!(
        wait_until(
            slacker_snapshotter::keeper::IDLE_EXIT + Duration::from_secs(5),
            || keeper_pids(&socket).is_empty()
        ),
        "the keeper did not exit: {:?}",
        keeper_pids(&socket)
    );
    assert_eq!(mounts_and_loops_under(&dir), Vec::<String>::new());
    drop(registry);
}
