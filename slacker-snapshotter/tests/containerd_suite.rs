//! containerd's own snapshotter test suite (`testsuite.SnapshotterSuite`, Debian's
//! containerd 1.6.20 sources) against `slacker-snapshotter` over its socket, through
//! `proxy.NewSnapshotter`, as root: every check passes (Rename may skip, as it does for
//! containerd's own overlayfs on some kernels).

mod support;

use std::process::Command;

use support::*;

/// Runs the suite against a snapshotter on `backend`; asserts on its verdict.
fn run_suite(dir: &std::path::Path, backend: &str) {
    let suite = match containerd_suite() {
        Ok(p) => p,
        Err(why) => {
            skip_or_fail::<()>(why);
            return;
        }
    };
    let cfg = write_config(dir, backend, "");
    let snap = snapshotter(&cfg);
    let out = Command::new(&suite)
        .args([
            "-test.run",
            "TestProxy",
            "-test.root",
            "-test.v",
            "-test.timeout",
            "40m",
        ])
        .env("SUITE_SOCKET", &snap.socket)
        .env("TMPDIR", dir)
        .output()
        .expect("the suite runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(&snap.log).unwrap_or_default();
    drop(snap);
    unmount_under(dir);
    let passed = stdout.matches("--- PASS: TestProxy/").count();
    let skipped: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("--- SKIP: TestProxy/"))
        .collect();
    // Commits that found the layer's filesystem still alive after the suite's lazy
    // unmount (`MNT_DETACH`) and froze it: without that freeze their snapshots would
    // have missed the layer's delayed writes (tests/lazy_unmount.rs).
    let frozen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("frozen for the snapshot"))
        .collect();
    let detached = frozen
        .iter()
        .filter(|l| !l.contains(", 0 of them with no mount point"))
        .count();
    eprintln!(
        "containerd suite: {passed} passed, skipped {skipped:?}; {} Commits froze a filesystem still alive, {detached} of them with no mount point (unmounted lazily, still referenced)",
        frozen.len()
    );
    assert!(
        out.status.success() && !stdout.contains("--- FAIL"),
        "containerd's suite failed:\n{stdout}\n{}\nsnapshotter log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        skipped.iter().all(|l| l.contains("/Rename")),
        "only Rename may skip: {skipped:?}"
    );
    assert!(
        passed >= 20,
        "expected the 21 checks to run, {passed} passed:\n{stdout}"
    );
}

#[test]
fn containerd_suite_on_btrfs() {
    if let Some(why) = missing(&["mkfs.btrfs", "mkfs.ext4", "debugfs", "fsfreeze", "losetup"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some((_fs, dir, data)) = btrfs_run("8G") else {
        return;
    };
    run_suite(&dir, &btrfs_toml(&data));
}

/// The same suite on the NFS backend (`SLACKER_NFS_ADDR`, the project's knfsd VM): every
/// volume is served through FUSE by the snapshotter, ext4 on a loop device over it.
#[test]
fn containerd_suite_on_nfs() {
    if let Some(why) = missing(&["mkfs.ext4", "debugfs", "fsfreeze", "losetup"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some(nfs) = nfs_run("snapsuite") else {
        return;
    };
    run_suite(nfs.tmp.path(), &nfs.toml());
}
