//! The `slacker` binary end to end on real components: a Debian `docker-registry`, a
//! loop-mounted btrfs, root. A standard two-layer image (a busybox root, then the
//! image's own files, with a config) is converted, converted again (everything reused),
//! run with its config, listed, removed and garbage-collected.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use slacker_core::layer::archive::TreeTar;
use slacker_oci::spec::{ConfigBuilder, ImageConfigurationBuilder};
use slacker_oci::{ClientOptions, LocalRegistry, PushLayer, RegistryClient, default_config};
use slacker_testkit::skip_or_fail;
use slacker_testkit::tree::diff_layer;

/// A loop-mounted btrfs, unmounted when dropped.
struct Btrfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Btrfs {
    fn new() -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("btrfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let ok = Command::new("truncate")
            .args(["-s", "4G"])
            .arg(&img)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("mkfs.btrfs")
                .args(["-q", "-f"])
                .arg(&img)
                .status()
                .is_ok_and(|s| s.success())
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
        ok.then_some(Self { mnt, _dir: dir })
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn components() -> Option<(LocalRegistry, Btrfs)> {
    if !rustix::process::geteuid().is_root() {
        return skip_or_fail("the slacker CLI tests need root (loop mounts)");
    }
    if !Path::new("/bin/busybox").exists() {
        return skip_or_fail("/bin/busybox is missing (apt-get install busybox-static)");
    }
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(e) => return skip_or_fail(format!("no docker-registry: {e}")),
    };
    let Some(b) = Btrfs::new() else {
        return skip_or_fail("cannot make a loop-mounted btrfs (btrfs-progs, root)");
    };
    Some((reg, b))
}

fn busybox_root(root: &Path) {
    for d in ["bin", "etc", "dev", "proc", "srv"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for app in ["sh", "cat", "echo", "id", "pwd", "ls", "env", "stat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(app)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::create_dir(root.join("tmp")).unwrap();
    rustix::fs::chmod(root.join("tmp"), rustix::fs::Mode::from_raw_mode(0o1777)).unwrap();
}

fn slacker(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_slacker"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(config: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = slacker(config, &a);
    assert_eq!(code, 0, "slacker {args:?}: {out} {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn convert_run_ls_rm_gc_on_btrfs() {
    let Some((reg, btrfs)) = components() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (base, app) = (work.path().join("base"), work.path().join("app"));
    busybox_root(&base);
    assert!(
        Command::new("cp")
            .args(["-a", "--"])
            .arg(&base)
            .arg(&app)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(app.join("srv/hello.txt"), "hello world\n").unwrap();
    std::fs::write(app.join("bin/su-test"), "x").unwrap();
    rustix::fs::chmod(
        app.join("bin/su-test"),
        rustix::fs::Mode::from_raw_mode(0o4755),
    )
    .unwrap();
    let mut t = TreeTar::new(Vec::new());
    t.append_tree(&base, &[]).unwrap();
    let l1 = t.finish().unwrap();
    let l2 = diff_layer(&base, &app).unwrap();

    let d = default_config();
    let cfg = ImageConfigurationBuilder::default()
        .architecture(d.architecture().clone())
        .os(d.os().clone())
        .config(
            ConfigBuilder::default()
                .cmd(vec![
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    "cat hello.txt; echo \"$GREETING\"; pwd; id -u; stat -c %A /bin/su-test"
                        .to_owned(),
                ])
                .env(vec![
                    "PATH=/bin".to_owned(),
                    "GREETING=hi from the config".to_owned(),
                ])
                .working_dir("/srv")
                .user("app")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let src = format!("{}/std/app:v1", reg.addr());
    let dst = format!("{}/slacker/app:v1", reg.addr());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(
        RegistryClient::new(ClientOptions::plain_http()).push_layers(
            &src,
            vec![PushLayer::tar_gzip(&l1, 6), PushLayer::tar(l2)],
            Some(&cfg),
        ),
    )
    .unwrap();

    let state = work.path().join("state");
    let data = btrfs.mnt.join("slacker");
    std::fs::create_dir(&data).unwrap();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"btrfs\"\npath = \"{}\"\n\n[cli]\nstate = \"{}\"\nvolume_size = {}\n",
            data.display(),
            state.display(),
            64u64 << 20
        ),
    )
    .unwrap();

    // Convert: both layers downloaded and applied losslessly, the slacker image and its
    // plain export pushed.
    let v = json(&config, &["convert", "--plain-http", &src, &dst]);
    let layers = v["pull"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert!(layers.iter().all(|l| l["downloaded"] == true), "{v}");
    assert!(
        layers
            .iter()
            .all(|l| l["losses"].as_array().unwrap().is_empty())
    );
    assert_eq!(v["push"]["plain_export_lossless"], true);
    assert_eq!(v["push"]["plain_export_reused"], false);
    // Again: everything is reused, the plain export too (the volume is not read again).
    let v2 = json(&config, &["convert", "--plain-http", &src, &dst]);
    assert!(
        v2["pull"]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["downloaded"] == false),
        "{v2}"
    );
    assert_eq!(v2["push"]["blobs_uploaded"], 0, "{v2}");
    assert_eq!(v2["push"]["manifest_digest"], v["push"]["manifest_digest"]);
    assert_eq!(v2["push"]["plain_export_reused"], true, "{v2}");
    assert_eq!(v2["push"]["plain_export_lossless"], true, "{v2}");
    assert_eq!(v2["push"]["index_digest"], v["push"]["index_digest"]);
    assert_eq!(
        v2["push"]["plain_manifest_digest"],
        v["push"]["plain_manifest_digest"]
    );

    // Run with the image's Cmd, Env, WorkingDir and User.
    let (code, out, err) = slacker(&config, &["run", &dst]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "hello world",
            "hi from the config",
            "/srv",
            "1000",
            "-rwsr-xr-x"
        ],
        "{err}"
    );
    // A command of our own, and its exit code.
    let (code, out, _) = slacker(
        &config,
        &["run", &dst, "--", "/bin/sh", "-c", "echo own; exit 3"],
    );
    assert_eq!((code, out.trim()), (3, "own"));

    // A standard client sees the original config in the plain export.
    if let Ok(o) = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{dst}"))
        .output()
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let c: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(c["config"]["Env"][1], "GREETING=hi from the config");
        assert_eq!(c["config"]["User"], "app");
    } else {
        skip_or_fail::<()>("skopeo is not installed");
    }

    let ls = json(&config, &["ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["image"], dst.as_str());
    // gc keeps what a layer holds.
    let g = json(&config, &["gc"]);
    assert!(g["removed"].as_array().unwrap().is_empty(), "{g}");
    let r = json(&config, &["rm", &dst]);
    assert_eq!(r["removed_layers"].as_array().unwrap().len(), 2, "{r}");
    // Two layers, each a data snapshot plus its Merkle tree snapshot.
    let g = json(&config, &["gc", "--dry-run"]);
    assert_eq!(g["removed"].as_array().unwrap().len(), 4, "{g}");
    let g = json(&config, &["gc"]);
    assert_eq!(g["removed"].as_array().unwrap().len(), 4, "{g}");
    assert!(
        json(&config, &["gc"])["removed"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(json(&config, &["ls"]).as_array().unwrap().is_empty());
    // An unknown image is a clean error.
    let (code, _, err) = slacker(&config, &["run", &dst]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not found"), "{err}");
}
