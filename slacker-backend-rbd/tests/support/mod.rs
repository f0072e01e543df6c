//! Test support: finds or starts the Ceph test cluster (`cluster/*.sh`) and hands out
//! backends, each in a namespace of its own.
//!
//! - `SLACKER_RBD_MON=host:port` (and `SLACKER_RBD_KEYRING=file`, empty for no auth):
//!   use that cluster; nothing is started.
//! - Otherwise `cluster/test-cluster.sh` is run once per test process: it installs the
//!   packages on first use (root only), starts the cluster unless it is running, and
//!   prints its settings. The cluster stays up for the next test binary.
//! - When no cluster can be had (not root, no apt), each test prints `SKIPPED: <reason>`
//!   and returns, except under `CI=true`, where that is a failure.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use slacker_backend_rbd::{RbdBackend, RbdBuilder, RbdConfig};
use slacker_testkit::Harness;

/// A usable cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `mon_host` for clients.
    pub mon: String,
    /// Keyring of client.admin, if the cluster uses cephx.
    pub keyring: Option<String>,
    /// The cluster's directory (for `ceph`/`rbd` CLI calls and the daemons' pids), if
    /// the tests started it.
    pub dir: Option<String>,
}

pub fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn find() -> Result<Cluster, String> {
    if let Ok(mon) = std::env::var("SLACKER_RBD_MON")
        && !mon.is_empty()
    {
        let keyring = std::env::var("SLACKER_RBD_KEYRING")
            .ok()
            .filter(|k| !k.is_empty());
        return Ok(Cluster {
            mon,
            keyring,
            dir: std::env::var("CEPH_DIR").ok(),
        });
    }
    let script = scripts().join("test-cluster.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        let reason = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("SKIPPED: "))
            .unwrap_or("test-cluster.sh cannot run the cluster here");
        return Err(reason.to_owned());
    }
    if !out.status.success() {
        panic!("{} failed ({}):\n{stderr}", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    Ok(Cluster {
        mon: get("SLACKER_RBD_MON").ok_or_else(|| format!("no SLACKER_RBD_MON in {stdout:?}"))?,
        keyring: get("SLACKER_RBD_KEYRING").filter(|k| !k.is_empty()),
        dir: get("CEPH_DIR"),
    })
}

/// The shared cluster, or `None` after printing `SKIPPED: ...` (panics instead under
/// `CI=true`).
pub fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(find) {
        Ok(c) => Some(c),
        Err(reason) if in_ci() => panic!("no Ceph test cluster under CI=true: {reason}"),
        Err(reason) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
            });
            println!("SKIPPED: {reason}");
            None
        }
    }
}

/// A namespace name unique to this process and call.
pub fn unique_namespace(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!("t{}-{}", std::process::id(), t.as_millis() % 100_000_000)
    });
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut ns = format!("{run}-{test}-{n}");
    ns.truncate(64);
    ns
}

/// Hands out a backend per check, each in its own namespace.
#[derive(Debug, Clone)]
pub struct RbdHarness {
    pub cluster: Cluster,
    pub test: &'static str,
}

impl RbdHarness {
    /// The configuration of namespace `ns`, built through the same serde path users take.
    pub fn config(&self, ns: &str) -> RbdConfig {
        let mut v = serde_json::json!({
            "mon_host": self.cluster.mon,
            "namespace": ns,
            "connect_timeout_ms": 10000,
            "op_timeout_ms": 60000,
        });
        if let Some(k) = &self.cluster.keyring {
            v["keyring"] = k.clone().into();
        }
        serde_json::from_value(v).expect("valid config")
    }

    pub async fn open(&self, ns: &str) -> RbdBackend {
        RbdBuilder::from_config(self.config(ns))
            .build()
            .await
            .unwrap_or_else(|e| panic!("open namespace {ns}: {e}"))
    }

    /// A backend on namespace `ns` through a Ceph client of its own, named `host`: to the
    /// cluster it is another host (its own locks, its own blocklist entry). Backends from
    /// [`RbdHarness::open`] share the process's one client.
    pub async fn open_as(&self, ns: &str, host: &str) -> RbdBackend {
        let mut c = self.config(ns);
        c.client_instance = format!("{ns}-{host}");
        RbdBuilder::from_config(c)
            .build()
            .await
            .unwrap_or_else(|e| panic!("open namespace {ns} as host {host}: {e}"))
    }

    pub fn fresh_namespace(&self) -> String {
        unique_namespace(self.test)
    }
}

#[async_trait]
impl Harness for RbdHarness {
    type Backend = RbdBackend;

    async fn fresh(&self) -> RbdBackend {
        self.open(&self.fresh_namespace()).await
    }

    async fn reopen(&self, backend: RbdBackend) -> RbdBackend {
        let ns = backend
            .config()
            .namespace
            .clone()
            .expect("tests use namespaces");
        drop(backend);
        self.open(&ns).await
    }

    /// RBD reports divergence per object (`diff_iterate2` with `whole_object`): the bitmap
    /// may cover the whole object around each written block, never more.
    fn diverged_granule(&self) -> u64 {
        u64::from(self.config("granule").object_size)
    }

    /// Every step is a cluster round trip: 64 sequences (256 take ~7 minutes on a loaded
    /// 2-core machine); `PROPTEST_CASES` overrides.
    fn model_cases(&self) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    }
}

/// The harness, or `None` (see [`cluster`]).
pub fn harness() -> Option<RbdHarness> {
    harness_for("c")
}

/// The harness with a name that prefixes its namespaces.
pub fn harness_for(test: &'static str) -> Option<RbdHarness> {
    cluster().map(|c| RbdHarness {
        cluster: c.clone(),
        test,
    })
}

/// Runs `ceph`/`rbd` CLI commands against the test cluster (when the tests started it).
pub fn cli(c: &Cluster, cmd: &str, args: &[&str]) -> Result<String, String> {
    let dir = c.dir.as_ref().ok_or("cluster directory unknown")?;
    let out = Command::new(cmd)
        .args(args)
        .env("CEPH_CONF", format!("{dir}/ceph.conf"))
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    slacker_testkit::checks::noise(len, seed)
}
