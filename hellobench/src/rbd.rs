//! The `slacker-rbd` path: the store on Ceph RBD (`slacker-backend-rbd`), containers run
//! through `LazyVolume` + FUSE + loop exactly as on `slacker-nfs` (there is no krbd here).
//!
//! The cluster: `SLACKER_RBD_MON=host:port` (with `SLACKER_RBD_KEYRING=<file>`, empty for
//! a cluster without cephx, and optionally `SLACKER_RBD_POOL`), else, as root, the test
//! cluster of `slacker-backend-rbd/cluster` (installed and started on first use). A
//! cluster this run started is stopped when the run ends ([`stop_if_started`]: its data
//! stays for the next run, `cluster/stop.sh --purge` removes it); one already running is
//! left alone. Each run uses an RBD namespace of its own, removed image by image at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use slacker_backend_rbd::{RbdBuilder, RbdConfig};

use crate::bench::{self, Plan};
use crate::corpus::BuiltImage;
use crate::error::Result;
use crate::preflight::Preflight;
use crate::report::Results;
use crate::slacker::{Mode, SlackerPath, Storage};

/// The environment variable naming the monitors of a Ceph cluster to use.
pub const ENV_RBD_MON: &str = "SLACKER_RBD_MON";

/// How to get a cluster, for messages.
pub const HOW: &str = "set SLACKER_RBD_MON=host:port and SLACKER_RBD_KEYRING=<keyring of client.admin> (a Ceph cluster with an rbd pool, e.g. `sudo slacker-backend-rbd/cluster/test-cluster.sh` prints them), or run as root with `--paths ...,slacker-rbd` so that hellobench starts that test cluster itself";

/// The test cluster's directory, when this run started it (see [`stop_if_started`]).
static STARTED: OnceLock<PathBuf> = OnceLock::new();

/// The test cluster's directory (as `cluster/test-cluster.sh` picks it).
fn cluster_dir() -> PathBuf {
    std::env::var_os("CEPH_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/tmp/slacker-rbd-cluster"), PathBuf::from)
}

/// Whether the test cluster's monitor in `dir` is running (its recorded pid is alive).
fn mon_running(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("run/mon.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Stops the test cluster if this run started it, so that nothing of the run stays up
/// (its monitor would hold port 3300, which `.ci/test`'s own cluster needs). Its data is
/// kept: the next run starts it again in seconds.
pub fn stop_if_started() {
    let Some(dir) = STARTED.get() else {
        return;
    };
    crate::progress!("slacker-rbd: stopping the test cluster this run started");
    let stopped = Command::new("bash")
        .arg(scripts().join("stop.sh"))
        .env("CEPH_DIR", dir)
        .output();
    match stopped {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "slacker-hellobench: stopping the Ceph test cluster in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("slacker-hellobench: cannot run stop.sh: {e}"),
    }
}

/// The configured monitors, if any.
pub fn configured() -> Option<String> {
    std::env::var(ENV_RBD_MON).ok().filter(|v| !v.is_empty())
}

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../slacker-backend-rbd/cluster")
}

/// The cluster's configuration (namespace `ns`) and how it was found, or why there is none.
pub fn find(ns: &str) -> std::result::Result<(RbdConfig, String), String> {
    let (mon, keyring, how) = match configured() {
        Some(mon) => {
            let k = std::env::var("SLACKER_RBD_KEYRING")
                .ok()
                .filter(|k| !k.is_empty());
            (mon.clone(), k, format!("{ENV_RBD_MON}={mon}"))
        }
        None => {
            let script = scripts().join("test-cluster.sh");
            crate::progress!(
                "slacker-rbd: {ENV_RBD_MON} not set; starting or reusing the test cluster ({})",
                script.display()
            );
            let dir = cluster_dir();
            let was_running = mon_running(&dir);
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !was_running && mon_running(&dir) {
                let _ = STARTED.set(dir);
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(format!(
                    "{} failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ));
            }
            let get = |k: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                    .map(str::to_owned)
            };
            let mon = get(ENV_RBD_MON).ok_or("the test cluster printed no monitors")?;
            let k = get("SLACKER_RBD_KEYRING").filter(|k| !k.is_empty());
            (mon, k, "the test cluster of slacker-backend-rbd".to_owned())
        }
    };
    let mut c = RbdConfig::new(mon);
    c.keyring = keyring;
    if let Ok(p) = std::env::var("SLACKER_RBD_POOL") {
        c.pool = p;
    }
    c.namespace = Some(ns.to_owned());
    Ok((c, how))
}

/// Measures `slacker-rbd`: find (or start) the cluster, import, measure, remove the
/// imports. `None` (with a line in `skipped`) when it cannot be measured here.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    pf: &Preflight,
    registry: &str,
    images: &[BuiltImage],
    timeout: Duration,
    work: &Path,
    plan: impl Fn(bool) -> Plan,
    skipped: &mut Vec<String>,
    results: &mut Results,
) -> Result<Option<bench::PathResults>> {
    if !pf.slacker_nfs {
        skipped.push("slacker-rbd: needs e2fsprogs (images are imported as ext4)".into());
        return Ok(None);
    }
    let (_, stamp) = crate::sys::now_utc();
    let ns = format!(
        "hellobench-{}-{}",
        std::process::id(),
        stamp.replace([':', '-'], "").to_lowercase()
    );
    let (config, how) = match tokio::task::spawn_blocking(move || find(&ns)).await? {
        Ok(c) => c,
        Err(why) => {
            skipped.push(format!("slacker-rbd: no Ceph cluster ({why}); fix: {HOW}"));
            return Ok(None);
        }
    };
    if !pf.slacker_nfs_run {
        skipped.push(
            "slacker-rbd run phase: needs root, losetup, ext4 and /dev/fuse (see the missing lines above)"
                .into(),
        );
    }
    let description = format!(
        "Ceph RBD {} pool {} namespace {} ({} KiB objects, clone format 2)",
        config.mon_host,
        config.pool,
        config.namespace.as_deref().unwrap_or(""),
        config.object_size / 1024
    );
    let backend = match RbdBuilder::from_config(config).build().await {
        Ok(b) => b,
        Err(e) => {
            skipped.push(format!("slacker-rbd: {e}; fix: {HOW}"));
            return Ok(None);
        }
    };
    let storage = Storage::with_backend(
        Arc::new(backend),
        description,
        false,
        registry,
        &work.join("slacker-meta-rbd"),
        work,
    )
    .await?;
    let mut path = SlackerPath::new(Mode::Rbd, storage.clone(), None, timeout, work).await?;
    results
        .notes
        .push(format!("{} (cluster: {how})", path.describe()));
    let pr = bench::measure(&mut path, images, plan(pf.slacker_nfs_run)).await;
    drop(path);
    storage.remove_imports().await;
    Ok(Some(pr))
}
