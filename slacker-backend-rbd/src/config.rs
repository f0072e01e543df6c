//! [`RbdConfig`], [`RbdBuilder`] and [`SCHEME`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slacker_core::persist::CrashPlan;
use slacker_core::{Error, Result};

use crate::backend::RbdBackend;

/// The scheme of the snapshot ids this backend mints (`rbd:<image id>.<key>`).
pub const SCHEME: &str = "rbd";

fn default_user() -> String {
    "admin".to_owned()
}
fn default_pool() -> String {
    "rbd".to_owned()
}
fn default_object_size() -> u32 {
    64 * 1024
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_op_timeout_ms() -> u64 {
    30_000
}
fn default_gc_grace_secs() -> u64 {
    3600
}

/// How to reach the Ceph cluster and where slacker keeps its images (serde: unknown
/// fields are refused).
///
/// ```
/// use slacker_backend_rbd::RbdConfig;
/// let c: RbdConfig = serde_json::from_str(
///     r#"{"mon_host": "10.0.0.5:3300", "keyring": "/etc/ceph/ceph.client.admin.keyring",
///         "namespace": "ci"}"#,
/// )
/// .unwrap();
/// assert_eq!((c.pool.as_str(), c.user.as_str()), ("rbd", "admin"));
/// assert_eq!(c.object_size, 65536);
/// assert!(serde_json::from_str::<RbdConfig>(r#"{"mon_host": "h", "typo": 1}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RbdConfig {
    /// The monitors, as Ceph's `mon_host` option takes them
    /// (`10.0.0.5:3300`, `[v2:10.0.0.5:3300,v1:10.0.0.5:6789]`, several comma-separated).
    pub mon_host: String,
    /// The Ceph user, without `client.` (default `admin`).
    #[serde(default = "default_user")]
    pub user: String,
    /// The keyring file holding the user's key. `None` connects without authentication
    /// (a cluster with `auth client required = none`).
    #[serde(default)]
    pub keyring: Option<String>,
    /// A `ceph.conf` to read before the settings above (optional). It may override the
    /// client's thread counts, which default to one messenger thread
    /// (`ms_async_op_threads = 1`) and one asio thread (`librados_thread_count = 1`).
    #[serde(default)]
    pub conf_file: Option<String>,
    /// The pool (it must exist and be `rbd pool init`ed). Default `rbd`.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The RBD namespace inside the pool (created at build if missing); `None` is the
    /// pool's default namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The RBD object size of new images, a power of two from 4 KiB to 32 MiB. It is the
    /// granularity of the diverged bitmap and the copy-up cost of a first write into a
    /// clone's object (3.3 ms at 64 KiB, 19 ms at 4 MiB). Default 64 KiB.
    #[serde(default = "default_object_size")]
    pub object_size: u32,
    /// Time allowed to reach the monitors and authenticate; an unreachable cluster or a
    /// refused key fails `build` with a `Backend` error within it. Default 10 s.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time an operation may wait for an OSD or monitor before it fails (Ceph waits
    /// forever otherwise). Default 30 s.
    #[serde(default = "default_op_timeout_ms")]
    pub op_timeout_ms: u64,
    /// Leftovers of interrupted removals (volumes in the RBD trash) older than this are
    /// finished at build time. Default 3600 s.
    #[serde(default = "default_gc_grace_secs")]
    pub gc_grace_secs: u64,
    /// Which Ceph client of this process the backend uses. Backends with the same
    /// connection settings (monitors, user, keyring, conf file, timeouts) and the same
    /// `client_instance` share one client (`rados_t`), as a librbd process such as qemu
    /// or rbd-nbd does; a different value gets a client of its own, which the cluster
    /// sees as another host (its own exclusive locks, its own blocklist entry). Default
    /// `""`.
    ///
    /// A connected client stays up until the process exits (or until the cluster
    /// blocklists it, when the next build connects a new one): `rados_shutdown` frees the
    /// client even while librbd still finishes the teardown of a just-closed image on
    /// the client's threads, which aborted processes that opened and dropped backends
    /// often.
    #[serde(default)]
    pub client_instance: String,
}

impl RbdConfig {
    /// A configuration with defaults for everything but the monitors.
    pub fn new(mon_host: impl Into<String>) -> Self {
        Self {
            mon_host: mon_host.into(),
            user: default_user(),
            keyring: None,
            conf_file: None,
            pool: default_pool(),
            namespace: None,
            object_size: default_object_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            op_timeout_ms: default_op_timeout_ms(),
            gc_grace_secs: default_gc_grace_secs(),
            client_instance: String::new(),
        }
    }

    /// Checks what can be checked without the cluster.
    ///
    /// # Errors
    /// `Config` for an object size that is not a power of two in 4 KiB..=32 MiB, an empty
    /// monitor address, pool or user, or a namespace RBD would refuse.
    pub fn validate(&self) -> Result<()> {
        let os = self.object_size;
        if !os.is_power_of_two() || !(4096..=(32 << 20)).contains(&os) {
            return Err(Error::Config(format!(
                "rbd object_size {os} must be a power of two from 4096 to 33554432"
            )));
        }
        for (what, v) in [
            ("mon_host", &self.mon_host),
            ("pool", &self.pool),
            ("user", &self.user),
        ] {
            if v.is_empty() || v.contains('\0') {
                return Err(Error::Config(format!(
                    "rbd {what} must be a non-empty string"
                )));
            }
        }
        if let Some(ns) = &self.namespace {
            let ok = !ns.is_empty()
                && ns.len() <= 64
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(Error::Config(format!(
                    "rbd namespace {ns:?} must match [A-Za-z0-9._-]{{1,64}}"
                )));
            }
        }
        Ok(())
    }

    /// `log2(object_size)`, RBD's "order".
    pub(crate) fn order(&self) -> u8 {
        self.object_size.trailing_zeros() as u8
    }
}

/// Builds an [`RbdBackend`].
///
/// ```no_run
/// # async fn demo() -> slacker_core::Result<()> {
/// use std::time::Duration;
/// use slacker_backend_rbd::RbdBuilder;
/// let backend = RbdBuilder::new("10.0.0.5:3300")
///     .keyring("/etc/ceph/ceph.client.admin.keyring")
///     .pool("rbd")
///     .namespace("slacker")
///     .connect_timeout(Duration::from_secs(3))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RbdBuilder {
    config: RbdConfig,
    crash_plan: Option<Arc<CrashPlan>>,
}

impl RbdBuilder {
    /// A builder for the monitors at `mon_host` with default settings.
    pub fn new(mon_host: impl Into<String>) -> Self {
        Self::from_config(RbdConfig::new(mon_host))
    }

    /// A builder from a parsed configuration.
    pub fn from_config(config: RbdConfig) -> Self {
        Self {
            config,
            crash_plan: None,
        }
    }

    /// The configuration so far.
    pub fn config(&self) -> &RbdConfig {
        &self.config
    }

    /// Sets the Ceph user (without `client.`).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.config.user = user.into();
        self
    }

    /// Sets the keyring file.
    pub fn keyring(mut self, path: impl Into<String>) -> Self {
        self.config.keyring = Some(path.into());
        self
    }

    /// Sets the pool.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.config.pool = pool.into();
        self
    }

    /// Sets the RBD namespace.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.config.namespace = Some(ns.into());
        self
    }

    /// Sets the object size of new images.
    pub fn object_size(mut self, bytes: u32) -> Self {
        self.config.object_size = bytes;
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.config.connect_timeout_ms = millis(t);
        self
    }

    /// Sets the per-operation timeout.
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.config.op_timeout_ms = millis(t);
        self
    }

    /// Sets the age after which leftovers are finished at build time.
    pub fn gc_grace(mut self, grace: Duration) -> Self {
        self.config.gc_grace_secs = grace.as_secs();
        self
    }

    /// Sets which Ceph client of this process the backend uses (see
    /// [`RbdConfig::client_instance`]).
    pub fn client_instance(mut self, name: impl Into<String>) -> Self {
        self.config.client_instance = name.into();
        self
    }

    /// Makes every step that changes the cluster first pass a sync point of `plan`, so a
    /// test can simulate a crash of this process at each one. Not for production use.
    pub fn crash_plan(mut self, plan: Arc<CrashPlan>) -> Self {
        self.crash_plan = Some(plan);
        self
    }

    /// Connects, opens the pool and namespace (creating the namespace if missing) and
    /// finishes interrupted removals older than [`RbdConfig::gc_grace_secs`].
    ///
    /// # Errors
    /// `Config` for settings that cannot work (see [`RbdConfig::validate`]); `NotFound`
    /// for a pool that does not exist; `Backend` naming the operation and the monitors
    /// if the cluster is unreachable, refuses the key, or does not answer within the
    /// connect timeout.
    pub async fn build(self) -> Result<RbdBackend> {
        RbdBackend::open(self.config, self.crash_plan).await
    }
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::ErrorKind;

    #[test]
    fn validation_refuses_bad_settings() {
        let mut c = RbdConfig::new("127.0.0.1:3300");
        c.validate().unwrap();
        assert_eq!(c.order(), 16);
        c.object_size = 3000;
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::Config);
        c.object_size = 1 << 22;
        assert_eq!(c.order(), 22);
        c.namespace = Some("a/b".into());
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::Config);
        c.namespace = Some("ok-1".into());
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<RbdConfig>(&json).unwrap(), c);
    }
}
