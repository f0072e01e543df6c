//! Test support: finds or starts the knfsd test server VM (server/*.sh).
//!
//! - `SLACKER_NFS_ADDR=host:port`: use that server; nothing is started or
//!   stopped. `guest_exec` then uses `server/guest-exec.sh` with the caller's
//!   `NFSVM_RUN` (default run directory).
//! - Otherwise `server/test-vm.sh acquire <pid>` is run once per test
//!   process: it installs and builds the VM on first use (root only), starts
//!   it unless it is already running, and shares it between concurrently
//!   running test binaries (lock file in the run directory). A detached
//!   watcher stops the VM a few seconds after the last test process exits,
//!   if a test started it; a VM started by hand is left running.
//! - When no server can be had (not root, no apt/qemu), each test prints
//!   `SKIPPED: <reason>` and returns, except under `CI=true`, where that
//!   is a failure.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// A usable server.
#[derive(Debug)]
pub struct Server {
    /// `host:port` of the NFS server.
    pub addr: String,
    /// Run directory of the VM (for `guest-exec.sh`), if known.
    pub run_dir: Option<String>,
}

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("server")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn find() -> Result<Server, String> {
    if let Ok(addr) = std::env::var("SLACKER_NFS_ADDR") {
        if !addr.is_empty() {
            return Ok(Server {
                addr,
                run_dir: std::env::var("NFSVM_RUN").ok(),
            });
        }
    }
    let script = scripts().join("test-vm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("acquire")
        .arg(std::process::id().to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if out.status.code() == Some(77) {
        let reason = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("SKIPPED: "))
            .unwrap_or("test-vm.sh cannot run the server here");
        return Err(reason.to_owned());
    }
    if !out.status.success() {
        panic!(
            "{} acquire failed ({}):\n{stderr}",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    let addr = get("NFSVM_NFS_ADDR").ok_or_else(|| format!("no NFSVM_NFS_ADDR in {stdout:?}"))?;
    Ok(Server {
        addr,
        run_dir: get("NFSVM_RUN"),
    })
}

/// The shared server, or `None` after printing `SKIPPED: ...` (panics
/// instead under `CI=true`).
pub fn server() -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(find) {
        Ok(s) => Some(s),
        Err(reason) if in_ci() => panic!("no NFS test server under CI=true: {reason}"),
        Err(reason) => {
            // Once per process on the real stderr (the test harness captures
            // print!/eprint!), and in each test's captured output.
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

/// Runs a shell command in the server VM (`server/guest-exec.sh`).
pub fn guest_exec(server: &Server, cmd: &str) -> Result<String, String> {
    let mut c = Command::new("bash");
    c.arg(scripts().join("guest-exec.sh")).arg(cmd);
    if let Some(r) = &server.run_dir {
        c.env("NFSVM_RUN", r);
    }
    let out = c.output().map_err(|e| format!("guest-exec.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "guest-exec.sh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh directory name for one test (unique per process and test).
pub fn unique_dir(test: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!("t{}-{}", std::process::id(), t.as_millis())
    });
    format!("{run}/{test}")
}

/// Deterministic pseudo-random bytes (xorshift), shared with the other backends' tests.
#[allow(unused_imports)] // not every test binary that includes this module uses it
pub use slacker_testkit::checks::noise as pattern;

/// The backend's test harness: every `fresh()` is a new directory under one
/// directory per test process; `reopen` is a new backend (a new session) on
/// the same directory.
pub struct NfsHarness {
    /// `host:port`.
    pub addr: String,
    prefix: String,
    /// Extra configuration fields (JSON object members), e.g. `"clone_mode": "copy"`.
    extra: String,
}

impl NfsHarness {
    /// The configuration for directory `dir`, parsed from JSON as a user's would be.
    pub fn config(&self, dir: &str) -> slacker_backend_nfs::NfsConfig {
        let json = format!(
            r#"{{"server": "{}", "dir": "{dir}", "connect_timeout_ms": 10000{}}}"#,
            self.addr,
            if self.extra.is_empty() {
                String::new()
            } else {
                format!(", {}", self.extra)
            }
        );
        serde_json::from_str(&json).expect("valid test configuration")
    }

    /// The same harness (same directories) reaching the server at `addr`.
    pub fn clone_with_addr(&self, addr: String) -> Self {
        Self {
            addr,
            prefix: self.prefix.clone(),
            extra: self.extra.clone(),
        }
    }

    /// A new, empty directory name.
    pub fn fresh_dir(&self) -> String {
        // One counter per process: every test builds its own harness.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("{}/{n}", self.prefix)
    }

    /// A backend on `dir`.
    pub async fn open(&self, dir: &str) -> slacker_backend_nfs::NfsBackend {
        slacker_backend_nfs::NfsBuilder::from_config(self.config(dir))
            .build()
            .await
            .unwrap_or_else(|e| panic!("build NFS backend on {dir}: {e}"))
    }
}

#[async_trait::async_trait]
impl slacker_testkit::Harness for NfsHarness {
    type Backend = slacker_backend_nfs::NfsBackend;

    async fn fresh(&self) -> Self::Backend {
        let dir = self.fresh_dir();
        self.open(&dir).await
    }

    /// A write first makes the volume's document cover its 4 MiB intent granule; until a
    /// flush or snapshot writes the exact bitmap, a reopened backend reports the granule.
    fn diverged_granule(&self) -> u64 {
        4 << 20
    }

    /// Every call crosses to the (TCG) VM: 32 sequences (~2.5 min) unless
    /// `PROPTEST_CASES` asks for more.
    fn model_cases(&self) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32)
    }

    async fn reopen(&self, backend: Self::Backend) -> Self::Backend {
        let dir = backend.config().dir.clone();
        let _ = backend.close().await;
        drop(backend);
        self.open(&dir).await
    }
}

/// The harness, or `None` after `SKIPPED: ...` (a panic under `CI=true`).
pub fn harness() -> Option<NfsHarness> {
    harness_with("backend", "")
}

/// A harness whose backends get the extra configuration `extra` (JSON members).
pub fn harness_with(name: &str, extra: &str) -> Option<NfsHarness> {
    let srv = server()?;
    Some(NfsHarness {
        addr: srv.addr.clone(),
        prefix: unique_dir(name),
        extra: extra.to_owned(),
    })
}
