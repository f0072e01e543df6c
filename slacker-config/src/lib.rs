//! The `[backend]` table that every slacker program reads (the containerd snapshotter, the
//! `slacker` CLI, HelloBench): which storage holds the volumes and snapshots, and how to
//! open it as an [`Arc<dyn Backend>`](slacker_core::Backend).
//!
//! ```toml
//! [backend]
//! kind = "btrfs"              # volumes as files on a btrfs, snapshot/clone by reflink
//! path = "/var/lib/slacker"   # an existing directory on btrfs
//! ```
//!
//! ```toml
//! [backend]
//! kind = "nfs"                # NFSv4.2 server-side CLONE, storage shared by many hosts
//! server = "10.0.0.5:2049"
//! dir = "slacker"             # every worker sharing snapshots uses the same one
//! ```
//!
//! ```toml
//! [backend]
//! kind = "rbd"                # Ceph RBD layering (feature "rbd"), shared by many hosts
//! mon_host = "10.0.0.5:3300"
//! keyring = "/etc/ceph/ceph.client.admin.keyring"
//! pool = "rbd"
//! namespace = "slacker"       # optional
//! ```
//!
//! ```toml
//! [backend]
//! kind = "mem"                # in-process reference model: demos and tests only
//! ```
//!
//! Every table refuses unknown keys, so a typo fails at start instead of being ignored. The
//! `nfs` table takes every key of [`NfsConfig`] (timeouts, clone mode, ...).
//!
//! ```
//! use slacker_config::BackendConfig;
//! let cfg = BackendConfig::from_toml_table("kind = \"btrfs\"\npath = \"/srv/slacker\"\n")?;
//! assert_eq!(cfg.kind(), "btrfs");
//! assert!(BackendConfig::from_toml_table("kind = \"btrfs\"\npaht = \"/x\"\n").is_err());
//! # Ok::<(), slacker_core::Error>(())
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slacker_core::{Backend, Error, Result};

pub use slacker_backend_btrfs::Durability;
pub use slacker_backend_nfs::{CloneMode, NfsConfig};
#[cfg(feature = "rbd")]
pub use slacker_backend_rbd::RbdConfig;

/// Which backend holds the volumes and snapshots, and how to reach it: the `[backend]`
/// table (serde, tagged by `kind`; unknown keys are refused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendConfig {
    /// `kind = "mem"`: the in-memory reference backend. Nothing survives the process.
    Mem(MemTable),
    /// `kind = "btrfs"`: volumes as files on a local btrfs.
    Btrfs(BtrfsTable),
    /// `kind = "nfs"`: volumes as files on an NFSv4.2 server, shared by many workers.
    Nfs(NfsConfig),
    /// `kind = "rbd"`: volumes as Ceph RBD images, snapshot and clone by RBD layering,
    /// shared by many workers (crate feature `rbd`; without it the table is refused with a
    /// `Config` error that says so).
    #[cfg(feature = "rbd")]
    Rbd(RbdConfig),
}

/// The keys of a `kind = "mem"` table (none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemTable {}

/// The keys of a `kind = "btrfs"` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BtrfsTable {
    /// An existing directory on btrfs; the backend keeps its volumes, snapshots and
    /// metadata under it.
    pub path: PathBuf,
    /// When writes become durable (`on-flush`, the default, or `on-write`).
    #[serde(default)]
    pub durability: Durability,
}

impl BtrfsTable {
    /// A table for a backend rooted at `path`, with defaults for the rest.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
        }
    }
}

impl BackendConfig {
    /// A `kind = "mem"` configuration.
    pub fn mem() -> Self {
        BackendConfig::Mem(MemTable {})
    }

    /// A `kind = "btrfs"` configuration rooted at `path`.
    pub fn btrfs(path: impl Into<PathBuf>) -> Self {
        BackendConfig::Btrfs(BtrfsTable::new(path))
    }

    /// A `kind = "nfs"` configuration for `server` (`host:port`) and the directory `dir`
    /// under the export, with defaults for the rest.
    pub fn nfs(server: impl Into<String>, dir: impl Into<String>) -> Self {
        let mut c = NfsConfig::new(server);
        c.dir = dir.into();
        BackendConfig::Nfs(c)
    }

    /// The value of `kind`: the backend's name, which is also the scheme of the snapshot ids
    /// it mints.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Mem(_) => slacker_backend_mem::SCHEME,
            BackendConfig::Btrfs(_) => slacker_backend_btrfs::SCHEME,
            BackendConfig::Nfs(_) => slacker_backend_nfs::SCHEME,
            #[cfg(feature = "rbd")]
            BackendConfig::Rbd(_) => slacker_backend_rbd::SCHEME,
        }
    }

    /// Parses the body of a `[backend]` table (the lines under the header, as TOML).
    ///
    /// # Errors
    /// `Config`, naming the offending key or value, for malformed TOML, an unknown `kind`,
    /// a missing required key or an unknown key.
    pub fn from_toml_table(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            if !cfg!(feature = "rbd") && is_rbd_table(text) {
                return Error::Config(
                    "[backend]: kind = \"rbd\" needs slacker-config's feature \"rbd\" \
                     (this program was built without Ceph RBD support)"
                        .to_owned(),
                );
            }
            Error::Config(format!("[backend]: {e}"))
        })
    }

    /// The table as TOML (the body, without the `[backend]` header).
    pub fn to_toml_table(&self) -> String {
        // A tagged enum of plain structs always serializes.
        toml::to_string(self).unwrap_or_default()
    }

    /// Opens the backend this table names. For btrfs the directory must exist on a btrfs;
    /// for NFS the server must answer within the configured connect timeout.
    ///
    /// # Errors
    /// Whatever the backend's builder returns: `Config` (a path not on btrfs, a malformed
    /// server address), `Backend` (server unreachable), `Unsupported` (a server that
    /// cannot clone with `clone_mode = "clone"`).
    pub async fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            BackendConfig::Mem(_) => Arc::new(slacker_backend_mem::MemBackend::new()),
            BackendConfig::Btrfs(t) => {
                let mut c = slacker_backend_btrfs::BtrfsConfig::new(&t.path);
                c.durability = t.durability;
                Arc::new(slacker_backend_btrfs::BtrfsBuilder::from_config(c).build()?)
            }
            BackendConfig::Nfs(c) => Arc::new(
                slacker_backend_nfs::NfsBuilder::from_config(c.clone())
                    .build()
                    .await?,
            ),
            #[cfg(feature = "rbd")]
            BackendConfig::Rbd(c) => Arc::new(
                slacker_backend_rbd::RbdBuilder::from_config(c.clone())
                    .build()
                    .await?,
            ),
        })
    }
}

/// Whether a table that failed to parse says `kind = "rbd"`.
fn is_rbd_table(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    toml::from_str::<Kind>(text).is_ok_and(|k| k.kind.as_deref() == Some("rbd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::ErrorKind;

    #[test]
    fn tables_parse_and_refuse_unknown_keys() {
        let b = BackendConfig::from_toml_table("kind = \"btrfs\"\npath = \"/b\"\n").unwrap();
        assert_eq!(b, BackendConfig::btrfs("/b"));
        let n = BackendConfig::from_toml_table(
            "kind = \"nfs\"\nserver = \"127.0.0.1:2049\"\ndir = \"w\"\nconnect_timeout_ms = 5\n",
        )
        .unwrap();
        let BackendConfig::Nfs(c) = &n else {
            panic!("not nfs: {n:?}")
        };
        assert_eq!((c.dir.as_str(), c.connect_timeout_ms), ("w", 5));
        assert_eq!(n.kind(), "nfs");
        assert_eq!(
            BackendConfig::from_toml_table("kind = \"mem\"\n").unwrap(),
            BackendConfig::mem()
        );
        for bad in [
            "kind = \"btrfs\"\npath = \"/b\"\ntypo = 1\n",
            "kind = \"nfs\"\nserver = \"h:1\"\ntypo = 1\n",
            "kind = \"mem\"\npath = \"/b\"\n",
            "kind = \"zfs\"\n",
            "path = \"/b\"\n",
            "kind = \"btrfs\"\n",
            "kind = \"btrfs\"\npath = \"/b\"\ndurability = \"sometimes\"\n",
        ] {
            let e = BackendConfig::from_toml_table(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad:?} -> {e}");
        }
    }

    #[test]
    fn round_trips_through_toml() {
        for c in [
            BackendConfig::mem(),
            BackendConfig::btrfs("/srv/x"),
            BackendConfig::nfs("10.0.0.5:2049", "images"),
        ] {
            let text = c.to_toml_table();
            assert_eq!(BackendConfig::from_toml_table(&text).unwrap(), c, "{text}");
        }
    }

    #[test]
    fn rbd_tables_need_the_feature() {
        let text = "kind = \"rbd\"\nmon_host = \"127.0.0.1:3300\"\nnamespace = \"w\"\n";
        let r = BackendConfig::from_toml_table(text);
        #[cfg(feature = "rbd")]
        {
            let c = r.unwrap();
            assert_eq!(c.kind(), "rbd");
            let BackendConfig::Rbd(rc) = &c else {
                panic!("not rbd: {c:?}")
            };
            assert_eq!(
                (rc.pool.as_str(), rc.namespace.as_deref()),
                ("rbd", Some("w"))
            );
            assert_eq!(
                BackendConfig::from_toml_table(&c.to_toml_table()).unwrap(),
                c
            );
            let e = BackendConfig::from_toml_table(&format!("{text}typo = 1\n")).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        }
        #[cfg(not(feature = "rbd"))]
        {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains("feature"), "{e}");
        }
    }

    #[tokio::test]
    async fn opens_mem_and_refuses_a_path_that_is_not_btrfs() {
        let b = BackendConfig::mem().open().await.unwrap();
        assert_eq!(b.info().scheme, "mem");
        let dir = std::env::temp_dir();
        let e = BackendConfig::btrfs(&dir).open().await.err();
        // /tmp is on btrfs only on unusual machines; then opening it must succeed instead.
        if let Some(e) = e {
            assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        }
    }
}
