//! [`NfsConfig`], [`NfsBuilder`], [`CloneMode`] and [`SCHEME`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slacker_core::Result;
use slacker_core::persist::CrashPlan;

use crate::backend::NfsBackend;

/// The scheme of the snapshot ids this backend mints (`nfs:<key>`).
pub const SCHEME: &str = "nfs";

/// How snapshots and clones copy a volume's data on the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CloneMode {
    /// Use CLONE (shared extents, O(1) in the data size) if the server's file system can,
    /// else fall back to COPY. Decided at build time by cloning an empty probe file onto
    /// itself, and again if a CLONE ever answers `NFS4ERR_NOTSUPP`. The default.
    #[default]
    Auto,
    /// Always CLONE; a server that cannot fails snapshots and clones with `Unsupported`.
    Clone,
    /// Always COPY (server-side, synchronous, only the data segments SEEK finds): for
    /// servers without reflink support, and to measure the difference.
    Copy,
}

fn default_export() -> String {
    "/".to_owned()
}

fn default_dir() -> String {
    "slacker".to_owned()
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_rpc_timeout_ms() -> u64 {
    30_000
}

fn default_reconnect_timeout_ms() -> u64 {
    30_000
}

fn default_gc_grace_secs() -> u64 {
    3600
}

/// How to reach the NFS server and where slacker keeps its files (serde: unknown fields
/// are refused).
///
/// ```
/// use slacker_backend_nfs::{CloneMode, NfsConfig};
/// let c: NfsConfig = serde_json::from_str(
///     r#"{"server": "10.0.0.5:2049", "dir": "images", "clone_mode": "copy"}"#,
/// )
/// .unwrap();
/// assert_eq!(c.export, "/");
/// assert_eq!(c.clone_mode, CloneMode::Copy);
/// assert_eq!(c.connect_timeout_ms, 10_000);
/// assert!(serde_json::from_str::<NfsConfig>(r#"{"server": "h:1", "typo": 1}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NfsConfig {
    /// The server, `host:port` (NFSv4.2 over TCP; knfsd listens on 2049).
    pub server: String,
    /// The export, as a path in the server's NFSv4 namespace (`/` = the pseudo-root).
    #[serde(default = "default_export")]
    pub export: String,
    /// The directory under the export where this backend keeps `volumes/`, `snapshots/`
    /// and `tmp/` (created if missing). Every worker sharing snapshots uses the same one.
    #[serde(default = "default_dir")]
    pub dir: String,
    /// Time allowed to connect and set up the session; an unreachable server fails
    /// `build` with a `Backend` error within it. Default 10 s.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for one RPC to be answered. Default 30 s.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// How long an operation keeps trying to reconnect after the connection broke
    /// (e.g. a server restarting; zero fails at once), and to retry while the server
    /// answers `NFS4ERR_DELAY` or `NFS4ERR_GRACE` (at least 10 s). Default 30 s.
    #[serde(default = "default_reconnect_timeout_ms")]
    pub reconnect_timeout_ms: u64,
    /// CLONE or COPY for snapshots and clones.
    #[serde(default)]
    pub clone_mode: CloneMode,
    /// Leftovers of interrupted operations (data files no metadata names, temporary
    /// files) are removed at build time once they are older than this, by the server's
    /// clock. Younger ones may belong to another worker's operation in progress.
    /// Default 3600 s.
    #[serde(default = "default_gc_grace_secs")]
    pub gc_grace_secs: u64,
}

impl NfsConfig {
    /// A configuration with defaults for everything but the server.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            export: default_export(),
            dir: default_dir(),
            connect_timeout_ms: default_connect_timeout_ms(),
            rpc_timeout_ms: default_rpc_timeout_ms(),
            reconnect_timeout_ms: default_reconnect_timeout_ms(),
            clone_mode: CloneMode::default(),
            gc_grace_secs: default_gc_grace_secs(),
        }
    }

    /// `export/dir` as a path relative to the NFSv4 root, without leading or trailing
    /// slashes.
    pub fn base_path(&self) -> String {
        let mut parts: Vec<&str> = Vec::new();
        for p in self.export.split('/').chain(self.dir.split('/')) {
            if !p.is_empty() && p != "." {
                parts.push(p);
            }
        }
        parts.join("/")
    }
}

/// Builds an [`NfsBackend`].
///
/// ```no_run
/// # async fn demo() -> slacker_core::Result<()> {
/// use std::time::Duration;
/// use slacker_backend_nfs::NfsBuilder;
/// let backend = NfsBuilder::new("10.0.0.5:2049")
///     .dir("slacker")
///     .connect_timeout(Duration::from_secs(3))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct NfsBuilder {
    config: NfsConfig,
    crash_plan: Option<Arc<CrashPlan>>,
}

impl NfsBuilder {
    /// A builder for server `host:port` with default settings.
    pub fn new(server: impl Into<String>) -> Self {
        Self::from_config(NfsConfig::new(server))
    }

    /// A builder from a parsed configuration.
    pub fn from_config(config: NfsConfig) -> Self {
        Self {
            config,
            crash_plan: None,
        }
    }

    /// The configuration so far.
    pub fn config(&self) -> &NfsConfig {
        &self.config
    }

    /// Sets the export path.
    pub fn export(mut self, export: impl Into<String>) -> Self {
        self.config.export = export.into();
        self
    }

    /// Sets the directory under the export.
    pub fn dir(mut self, dir: impl Into<String>) -> Self {
        self.config.dir = dir.into();
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.config.connect_timeout_ms = millis(t);
        self
    }

    /// Sets the per-RPC timeout.
    pub fn rpc_timeout(mut self, t: Duration) -> Self {
        self.config.rpc_timeout_ms = millis(t);
        self
    }

    /// Sets how long to try reconnecting after the connection broke.
    pub fn reconnect_timeout(mut self, t: Duration) -> Self {
        self.config.reconnect_timeout_ms = millis(t);
        self
    }

    /// Sets CLONE or COPY.
    pub fn clone_mode(mut self, mode: CloneMode) -> Self {
        self.config.clone_mode = mode;
        self
    }

    /// Sets the age after which leftovers are garbage-collected at build time.
    pub fn gc_grace(mut self, grace: Duration) -> Self {
        self.config.gc_grace_secs = grace.as_secs();
        self
    }

    /// Makes every step that changes something on the server (each one atomic and
    /// durable there) first pass a sync point of `plan`, so that a test can simulate a
    /// crash of this process at each one (see [`CrashPlan`]). Not for production use.
    pub fn crash_plan(mut self, plan: Arc<CrashPlan>) -> Self {
        self.crash_plan = Some(plan);
        self
    }

    /// Connects (one NFSv4.2 session per backend), creates the directories if needed,
    /// detects CLONE support and garbage-collects leftovers of interrupted operations
    /// older than [`NfsConfig::gc_grace_secs`].
    ///
    /// # Errors
    /// `Config` for a malformed address or directory; `Backend` (naming the operation
    /// and the server) if the server is unreachable or does not answer within the
    /// connect timeout, or fails otherwise; `Unsupported` for [`CloneMode::Clone`] on a
    /// server that cannot clone.
    pub async fn build(self) -> Result<NfsBackend> {
        NfsBackend::open(self.config, self.crash_plan).await
    }
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_path_joins_export_and_dir() {
        let mut c = NfsConfig::new("h:1");
        assert_eq!(c.base_path(), "slacker");
        c.export = "/srv/nfs/".into();
        c.dir = "a//b/".into();
        assert_eq!(c.base_path(), "srv/nfs/a/b");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<NfsConfig>(&json).unwrap(), c);
        assert!(serde_json::from_str::<NfsConfig>(r#"{"server":"h:1","clone_mode":"x"}"#).is_err());
    }
}
