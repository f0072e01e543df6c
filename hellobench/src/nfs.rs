//! The NFS server of the `slacker-nfs` path: `SLACKER_NFS_ADDR`, else the knfsd test VM of
//! `slacker-backend-nfs/server` (started or shared with `test-vm.sh acquire <pid>`).
//!
//! `test-vm.sh acquire` installs and builds the VM on first use (root, apt), starts it
//! unless it is running, and registers this process as a user; a detached watcher stops
//! the VM a few seconds after the last user exits, if it was started that way (a VM
//! started by hand with `start.sh` is left running). The VM runs under KVM when it can,
//! else TCG (~25-35 MiB/s through its NFS data path).

use std::path::PathBuf;
use std::process::Command;

/// The environment variable naming an NFSv4.2 server (`host:port`) to use.
pub const ENV_NFS_ADDR: &str = "SLACKER_NFS_ADDR";

/// How to get a server, for messages.
pub const HOW: &str = "set SLACKER_NFS_ADDR=host:port (an NFSv4.2 server exporting / with CLONE, e.g. the knfsd VM: `sudo slacker-backend-nfs/server/install.sh && slacker-backend-nfs/server/build.sh && slacker-backend-nfs/server/start.sh` prints its port), or run as root with `--paths ...,slacker-nfs` so that hellobench starts the VM itself (slacker-backend-nfs/server/test-vm.sh)";

/// A server to use.
#[derive(Debug, Clone)]
pub struct NfsServer {
    /// `host:port`.
    pub addr: String,
    /// How it was found, for the results' notes.
    pub how: String,
}

/// The configured server (`SLACKER_NFS_ADDR`), if any.
pub fn configured() -> Option<String> {
    std::env::var(ENV_NFS_ADDR).ok().filter(|v| !v.is_empty())
}

/// `slacker-backend-nfs/server` next to this crate (where the workspace was built).
fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../slacker-backend-nfs/server")
}

/// `SLACKER_NFS_ADDR`, else the knfsd VM via `test-vm.sh acquire <our pid>` (blocking; the
/// first use on a machine installs and builds it). `Err` says why there is none.
pub fn find() -> std::result::Result<NfsServer, String> {
    if let Some(addr) = configured() {
        return Ok(NfsServer {
            how: format!("{ENV_NFS_ADDR}={addr}"),
            addr,
        });
    }
    let script = scripts().join("test-vm.sh");
    if !script.is_file() {
        return Err(format!("{} not found", script.display()));
    }
    crate::progress!(
        "slacker-nfs: {ENV_NFS_ADDR} not set; starting or reusing the knfsd VM ({} acquire)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("acquire")
        .arg(std::process::id().to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    if !out.status.success() {
        let reason = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("SKIPPED: "))
            .map_or_else(
                || format!("test-vm.sh acquire failed ({})", out.status),
                str::to_owned,
            );
        return Err(reason);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let addr = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NFSVM_NFS_ADDR="))
        .map(str::to_owned)
        .ok_or_else(|| format!("test-vm.sh acquire printed no NFSVM_NFS_ADDR: {stdout:?}"))?;
    Ok(NfsServer {
        how: format!(
            "the knfsd VM of slacker-backend-nfs/server at {addr} (test-vm.sh acquire: stopped a few seconds after this run if it was started for it)"
        ),
        addr,
    })
}
