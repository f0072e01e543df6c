//! [`BtrfsConfig`], [`BtrfsBuilder`] and [`SCHEME`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slacker_core::Result;
use slacker_core::persist::CrashPlan;

use crate::backend::BtrfsBackend;

/// The scheme of the snapshot ids this backend mints (`btrfs:<key>`).
pub const SCHEME: &str = "btrfs";

/// When writes become durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Durability {
    /// `write_at` writes into the page cache and records the touched blocks in memory;
    /// `flush`, `snapshot` and `clone_snapshot` make data and metadata durable. A crash
    /// loses unflushed writes, never a snapshot or a bitmap entry of data that reached the
    /// disk (FIEMAP re-derives those, see the crate docs). The default.
    #[default]
    OnFlush,
    /// Every `write_at` also `fdatasync`s the volume and persists its bitmap before it
    /// returns: slower, for callers that never call `flush`.
    OnWrite,
}

/// How to open a btrfs backend (serde: unknown fields are refused).
///
/// ```
/// use slacker_backend_btrfs::{BtrfsConfig, Durability};
/// let c: BtrfsConfig = serde_json::from_str(r#"{"root": "/srv/slacker"}"#).unwrap();
/// assert_eq!(c.durability, Durability::OnFlush);
/// assert!(serde_json::from_str::<BtrfsConfig>(r#"{"root": "/x", "typo": 1}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BtrfsConfig {
    /// An existing directory on btrfs; the backend keeps `volumes/`, `snapshots/` and
    /// `meta/` under it.
    pub root: PathBuf,
    /// When writes become durable.
    #[serde(default)]
    pub durability: Durability,
}

impl BtrfsConfig {
    /// A configuration with defaults for everything but the root.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            durability: Durability::default(),
        }
    }
}

/// Builds a [`BtrfsBackend`].
///
/// ```no_run
/// use slacker_backend_btrfs::BtrfsBuilder;
/// let backend = BtrfsBuilder::new("/mnt/btrfs/slacker").build()?;
/// # Ok::<(), slacker_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BtrfsBuilder {
    config: BtrfsConfig,
    crash_plan: Option<Arc<CrashPlan>>,
}

impl BtrfsBuilder {
    /// A builder for a backend rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::from_config(BtrfsConfig::new(root))
    }

    /// A builder from a parsed configuration.
    pub fn from_config(config: BtrfsConfig) -> Self {
        Self {
            config,
            crash_plan: None,
        }
    }

    /// Sets the durability policy.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// Makes every sync point (metadata documents and data-file steps) pass through
    /// `plan`, so that a test can simulate a crash at each one (see
    /// [`CrashPlan`]). Not for production use.
    pub fn crash_plan(mut self, plan: Arc<CrashPlan>) -> Self {
        self.crash_plan = Some(plan);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// Opens the backend: checks that the root exists and is on btrfs, creates its
    /// subdirectories, loads the metadata and recovers from an interrupted run (removes
    /// data files that no metadata document names, which is what a crash between the
    /// two steps of a create, clone, snapshot or remove leaves).
    ///
    /// Blocking (a few syscalls per volume and snapshot): call it before starting a
    /// runtime or from `spawn_blocking`.
    ///
    /// # Errors
    /// `Config` for a missing root, a root that is not a directory or not on btrfs;
    /// `Integrity` for an unreadable metadata document; `Backend` for IO errors.
    pub fn build(self) -> Result<BtrfsBackend> {
        BtrfsBackend::open(self.config, self.crash_plan)
    }
}
