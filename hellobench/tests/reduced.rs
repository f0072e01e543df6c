//! The reduced corpus end to end, through every path: the `slacker-hellobench` binary runs
//! the busybox `shell` image through the baseline, `slacker` and `slacker-lazy` (a real
//! registry, a loop-mounted btrfs, FUSE), and its `results.json` must show that every phase
//! completed, readiness held, slacker's pull moved only a reference layer and its run
//! fetched less than the image. No timing assertions: speed is measured by the benchmark
//! itself, never by tests.
//!
//! With `SLACKER_NFS_ADDR=host:port` set (as `.ci/test` does, after starting the knfsd VM),
//! the run also includes `slacker-nfs` (the same checks, over the NFS backend); without it
//! that path is opt-in and not measured here. Where containerd, ctr and runc are installed
//! (CI), it includes the containerd pair: `containerd-overlayfs` (completed, ready) and
//! `containerd-slacker` (the slacker checks: a reference-sized pull, a partial read).
//!
//! Needs root, `docker-registry`, btrfs-progs, e2fsprogs, `/dev/fuse` and a static busybox
//! (or apt-get to download busybox-static). Without them it prints `SKIPPED`; under
//! `CI=true` it fails instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            .unwrap_or(false)
    })
}

/// Why this host cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !is_root() {
        return Some("the reduced HelloBench run needs root (mounts, loop devices, chroot)".into());
    }
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("mkfs.btrfs", "btrfs-progs"),
        ("mke2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("losetup", "mount"),
        ("chroot", "coreutils"),
    ] {
        if which(tool).is_none() {
            return Some(format!("{tool} is missing (apt-get install -y {package})"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (modprobe fuse)".into());
    }
    if which("busybox").is_none() && which("apt-get").is_none() {
        return Some("no busybox (apt-get install -y busybox-static)".into());
    }
    None
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {v}"))
}

/// Mount points and loop-device backing files that mention `needle`.
fn leftovers(needle: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            if let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file"))
                && f.contains(needle)
            {
                out.push(format!("{}: {}", e.file_name().to_string_lossy(), f.trim()));
            }
        }
    }
    out
}

#[test]
fn reduced_corpus_runs_through_the_baseline_and_every_slacker_path() {
    if let Some(why) = missing() {
        slacker_testkit::skip_or_fail::<()>(why);
        return;
    }
    let out = std::env::temp_dir().join(format!("hellobench-reduced-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut child = Command::new(env!("CARGO_BIN_EXE_slacker-hellobench"))
        .args(["--corpus", "reduced", "--busybox", "--no-dedup", "--out"])
        .arg(&out)
        .stdout(Stdio::null()) // the tables; progress stays on stderr
        .spawn()
        .expect("the benchmark binary starts");
    let pid = child.id();
    let status = child.wait().expect("the benchmark binary runs");

    // Nothing of the run stays mounted or attached, whatever happened.
    for needle in [
        format!("slacker-hellobench-{pid}"),
        format!("hellobench/btrfs/{pid}"),
    ] {
        let left = leftovers(&needle);
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
    assert!(
        !Path::new(&format!("/var/tmp/slacker-hellobench-{pid}")).exists(),
        "scratch directory left behind"
    );
    assert!(status.success(), "slacker-hellobench exited with {status}");

    let json: Value = serde_json::from_slice(
        &std::fs::read(out.join("results.json")).expect("results.json written"),
    )
    .expect("results.json parses");
    assert!(out.join("results.svg").exists() && out.join("results.md").exists());
    assert_eq!(json["corpus"], "reduced");
    let paths = json["paths"].as_array().expect("paths");
    let names: Vec<&str> = paths.iter().filter_map(|p| p["path"].as_str()).collect();
    let nfs = std::env::var("SLACKER_NFS_ADDR").is_ok_and(|v| !v.is_empty());
    let rbd = std::env::var("SLACKER_RBD_MON").is_ok_and(|v| !v.is_empty());
    let mut expected = vec![
        "baseline",
        "slacker",
        "slacker-lazy",
        "slacker-lazy-trace",
        "slacker-lazy-nora",
    ];
    if nfs {
        expected.push("slacker-nfs");
    }
    if rbd {
        expected.push("slacker-rbd");
    }
    // The containerd pair runs wherever containerd, ctr and runc are installed (CI
    // installs them): a few seconds for the busybox image.
    let containerd = ["containerd", "ctr", "runc"]
        .iter()
        .all(|t| which(t).is_some());
    if containerd {
        expected.extend(["containerd-overlayfs", "containerd-slacker"]);
    }
    assert_eq!(names, expected);

    for p in paths {
        let name = p["path"].as_str().unwrap();
        let images = p["images"].as_array().expect("images");
        assert_eq!(images.len(), 1, "{name}: one image");
        assert_eq!(images[0]["image"], "shell");
        let reps = images[0]["reps"].as_array().expect("reps");
        assert!(!reps.is_empty(), "{name}: no repetition");
        for r in reps {
            assert!(r["error"].is_null(), "{name} failed: {}", r["error"]);
            for phase in ["push", "pull", "run", "stop"] {
                num(&r[phase]["secs"], &format!("{name} {phase} secs"));
            }
            let notes = r["run"]["step"]["notes"].as_array().expect("run notes");
            assert!(
                notes.iter().any(|n| n.as_str() == Some("ready: hello")),
                "{name}: readiness did not pass: {notes:?}"
            );
        }
        for field in ["push", "pull", "run", "deploy", "dev", "net_push_bytes"] {
            num(&p["median"][field], &format!("{name} median {field}"));
        }
        // The traditional sides: whole images, nothing lazy to check.
        if name == "baseline" || name == "containerd-overlayfs" {
            continue;
        }
        for r in reps {
            let pull = &r["pull"]["step"];
            let layer = num(&pull["layer_bytes"], &format!("{name} pull layer_bytes"));
            assert!(
                layer < 4096.0,
                "{name}: pull moved {layer} bytes of layer data"
            );
            let run = &r["run"]["step"];
            let fetched = num(&run["fetched_bytes"], &format!("{name} fetched_bytes"));
            let image = num(&run["image_bytes"], &format!("{name} image_bytes"));
            num(
                &run["image_used_bytes"],
                &format!("{name} image_used_bytes"),
            );
            num(&run["read_bytes"], &format!("{name} read_bytes"));
            assert!(fetched > 0.0, "{name}: the container read nothing");
            assert!(
                fetched < image,
                "{name}: fetched {fetched} bytes of a {image}-byte image"
            );
        }
        for field in [
            "fetched_bytes",
            "fetched_of_image",
            "fetched_of_used",
            "layer_pull_bytes",
        ] {
            num(&p["median"][field], &format!("{name} median {field}"));
        }
    }
    let speedups = json["speedups"].as_array().expect("speedups");
    assert_eq!(speedups.len(), expected.len() - 1);
    for s in speedups {
        for field in ["deploy", "dev", "push", "pull", "run"] {
            num(&s["of_medians"][field], &format!("speedup {field}"));
            num(&s["median_of_images"][field], &format!("speedup {field}"));
        }
    }
    // Issue 14: the registry sat behind the fair link, which carried the pushes and pulls,
    // and every goal has a value (all the paths it divides were measured).
    let link = &json["fair_link"];
    assert_eq!(num(&link["latency_us"], "fair link latency"), 200.0);
    let down = num(&link["stats"]["down_bytes"], "fair link bytes down");
    let pulled: f64 = paths
        .iter()
        .flat_map(|p| p["images"][0]["reps"].as_array().unwrap().iter())
        .map(|r| num(&r["pull"]["step"]["network_bytes"], "pull network bytes"))
        .sum();
    assert!(
        down >= pulled,
        "the pulls moved {pulled} B but only {down} B crossed the fair link"
    );
    let goals = json["goals"]["goals"].as_array().expect("goals");
    assert!(goals.len() >= 5);
    for g in goals {
        num(&g["value"], &format!("goal {} on {}", g["goal"], g["path"]));
    }
    let _ = std::fs::remove_dir_all(&out);
}
