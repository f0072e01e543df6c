//! The snapshotter's configuration file (TOML; unknown keys are refused).
//!
//! ```toml
//! address = "/run/slacker/snapshotter.sock"   # the unix socket containerd dials
//! root = "/var/lib/slacker-snapshotter"      # the snapshotter's own state
//! volume_bytes = 8589934592                   # logical size of every volume (sparse)
//! volume_prefix = "ctrd"                      # names of the volumes this instance owns
//! metrics_address = "127.0.0.1:9137"          # optional: Prometheus text on GET /metrics
//! read_ahead_kb = 1024                        # read-ahead of a local volume's loop device
//! fd_keeper = "auto"                          # keep FUSE connections across restarts (NFS, RBD)
//!
//! [backend]                                   # where volumes live
//! kind = "btrfs"
//! path = "/srv/btrfs/slacker"
//!
//! [cache]
//! bytes = 268435456                           # block cache of the lazy data path
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use slacker_config::BackendConfig;

/// Every key of the configuration file, one line each (what `--help` prints).
pub const KEYS_HELP: &str = "\
Configuration file keys (TOML; unknown keys are refused):
  address          path of the unix socket containerd dials (required)
                   containerd: [proxy_plugins.slacker] type = \"snapshot\" address = <this>
  root             directory for the snapshotter's own state: metadata documents,
                   staging directories of layers being unpacked, mount points (required)
  volume_bytes     logical size of every volume, in bytes (sparse; default 8 GiB)
  volume_prefix    prefix of the names of the volumes this instance owns, [a-z0-9]{1,8}
                   (default \"ctrd\"); give every host sharing one storage its own
  metrics_address  optional host:port; GET /metrics answers Prometheus text: snapshots,
                   clones, bytes fetched lazily, cache hits
  read_ahead_kb    read-ahead, in KiB, of the loop device under the ext4 of a volume
                   with a local file (btrfs), set when the snapshotter mounts it
                   (default 1024; 0 leaves the device alone). A container's first reads
                   of large binaries then go through the loop in fewer, larger requests;
                   the kernel's 128 is put back when the snapshotter unmounts it
  fd_keeper        who holds the FUSE connections of volumes served by this process
                   (backends without local files: NFS, RBD), so that running
                   containers keep their IO across a crash or restart of it:
                   \"auto\" (default): a keeper process, this executable run as
                   `--fd-keeper <root>/keeper.sock`, started when none answers there
                   (none when the executable is not slacker-snapshotter, e.g. a program
                   embedding the library: name the binary then); \"off\": none (a
                   restart then breaks running containers' IO); or the path of a
                   slacker-snapshotter binary to run as the keeper
  [backend]        where volumes live (the table every slacker program shares):
    kind = \"btrfs\", path = DIR        a directory on a btrfs (volumes are local files)
    kind = \"nfs\", server = HOST:PORT, dir = NAME
                                       NFSv4.2 storage shared by many hosts; every active
                                       volume is served by this process through FUSE
                                       (a LazyVolume: blocks fetched on first read)
    kind = \"mem\"                      in-process (tests only; nothing survives)
  [cache]
    bytes          capacity of the block cache shared by lazily served volumes
                   (default 256 MiB; volumes of backends without local files)
  [registry]       where reference layers are fetched from when containerd's CRI sends
                   the remote-snapshot labels (containerd.io/snapshot.ref,
                   containerd.io/snapshot/cri.layer-digest, .../cri.image-ref)
    plain_http     list of registry hosts (host:port) spoken to over plain HTTP
                   (default none: HTTPS everywhere)
";

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Unix socket path containerd dials.
    pub address: PathBuf,
    /// The snapshotter's own state directory.
    pub root: PathBuf,
    /// Logical size of every volume, in bytes.
    #[serde(default = "default_volume_bytes")]
    pub volume_bytes: u64,
    /// Prefix of the names of volumes this instance owns.
    #[serde(default = "default_prefix")]
    pub volume_prefix: String,
    /// Where to serve Prometheus metrics, if anywhere.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// Read-ahead in KiB of the loop device under a local volume's ext4 (btrfs), set
    /// when the snapshotter mounts it (and put back to the kernel's 128 KiB when it
    /// unmounts it: a loop device keeps its read-ahead after detach); 0 leaves the
    /// device alone.
    #[serde(default = "default_read_ahead_kb")]
    pub read_ahead_kb: u32,
    /// Who holds the FUSE connections across restarts (backends without local files).
    #[serde(default)]
    pub fd_keeper: FdKeeper,
    /// Where volumes live: the shared `[backend]` table of [`slacker_config`].
    pub backend: BackendConfig,
    /// The block cache of the lazy data path.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Registries the snapshotter fetches reference layers from (remote snapshots).
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// The `fd_keeper` key: which program, if any, runs the [`keeper`](crate::keeper)
/// process that holds the FUSE connections of lazily served volumes (backends without
/// local files) across a crash or restart of the snapshotter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
#[non_exhaustive]
pub enum FdKeeper {
    /// `"auto"`: this executable, when it is `slacker-snapshotter`; none otherwise.
    #[default]
    Auto,
    /// `"off"`: no keeper (a restart breaks running containers' IO, as before step 2 of
    /// `docs/fuse-handover.md`).
    Off,
    /// A path: that `slacker-snapshotter` binary.
    Program(PathBuf),
}

impl TryFrom<String> for FdKeeper {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            p if Path::new(p).is_absolute() => Ok(Self::Program(PathBuf::from(p))),
            other => Err(format!(
                "fd_keeper {other:?}: \"auto\", \"off\" or an absolute path of slacker-snapshotter"
            )),
        }
    }
}

impl FdKeeper {
    /// The program to run as the keeper, if any (for `Auto`: this process's executable
    /// when its name is `slacker-snapshotter`; after an upgrade replaced it on disk, the
    /// new binary at the same path).
    pub fn program(&self) -> Option<PathBuf> {
        match self {
            Self::Off => None,
            Self::Program(p) => Some(p.clone()),
            Self::Auto => {
                let exe = std::env::current_exe().ok()?;
                // Replaced on disk since it started (an upgrade): the path names the new
                // binary, which is the one to run.
                let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
                    Some(p) => PathBuf::from(p),
                    None => exe,
                };
                let name = exe.file_name()?.to_string_lossy().into_owned();
                name.starts_with("slacker-snapshotter").then_some(exe)
            }
        }
    }
}

/// The `[registry]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// Registry hosts (`host:port`, as in image references) spoken to over plain HTTP;
    /// every other registry over HTTPS.
    #[serde(default)]
    pub plain_http: Vec<String>,
}

/// The `[cache]` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Capacity in bytes.
    #[serde(default = "default_cache_bytes")]
    pub bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            bytes: default_cache_bytes(),
        }
    }
}

fn default_volume_bytes() -> u64 {
    8 << 30
}

fn default_read_ahead_kb() -> u32 {
    1024
}

fn default_cache_bytes() -> u64 {
    256 << 20
}

fn default_prefix() -> String {
    "ctrd".to_owned()
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses and validates a configuration from TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for malformed TOML or unknown keys,
    /// [`ConfigError::Invalid`] for values out of range.
    ///
    /// ```
    /// use slacker_snapshotter::Config;
    /// let c = Config::from_toml(r#"
    ///     address = "/run/slacker/snapshotter.sock"
    ///     root = "/var/lib/slacker-snapshotter"
    ///     [backend]
    ///     kind = "btrfs"
    ///     path = "/srv/btrfs"
    /// "#).unwrap();
    /// assert_eq!(c.volume_prefix, "ctrd");
    /// assert!(Config::from_toml("address = \"/s\"\nroot = \"/r\"\ntypo = 1\n[backend]\nkind = \"btrfs\"\npath = \"/b\"").is_err());
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Path::new("<config>"))
    }

    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    /// As [`from_toml`](Self::from_toml), plus [`ConfigError::Read`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values the types cannot.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.volume_prefix;
        if p.is_empty()
            || p.len() > 8
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(ConfigError::Invalid(format!(
                "volume_prefix {p:?} must be 1 to 8 of [a-z0-9]"
            )));
        }
        if self.volume_bytes < (64 << 20) || self.volume_bytes % 4096 != 0 {
            return Err(ConfigError::Invalid(format!(
                "volume_bytes {} must be at least 64 MiB and a multiple of 4096",
                self.volume_bytes
            )));
        }
        if !self.address.is_absolute() || !self.root.is_absolute() {
            return Err(ConfigError::Invalid(
                "address and root must be absolute paths".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../examples/config.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.volume_bytes, 8 << 30);
        assert_eq!(c.read_ahead_kb, 1024);
        assert_eq!(c.backend.kind(), "btrfs");
        assert_eq!(c.registry.plain_http, ["127.0.0.1:5000"]);
    }

    #[test]
    fn bad_values_are_refused() {
        let base = "address = \"/s\"\nroot = \"/r\"\n";
        for extra in [
            "volume_prefix = \"UPPER\"\n",
            "volume_bytes = 1000\n",
            "[cache]\nbites = 1\n",
            "fd_keeper = \"relative/path\"\n",
            "fd_keeper = true\n",
        ] {
            let text = format!("{base}{extra}[backend]\nkind = \"btrfs\"\npath = \"/b\"\n");
            assert!(Config::from_toml(&text).is_err(), "{extra}");
        }
        let keeper = |v: &str| {
            let text =
                format!("{base}fd_keeper = {v}\n[backend]\nkind = \"btrfs\"\npath = \"/b\"\n");
            Config::from_toml(&text).unwrap().fd_keeper
        };
        assert_eq!(keeper("\"off\""), FdKeeper::Off);
        assert_eq!(keeper("\"auto\""), FdKeeper::Auto);
        assert_eq!(
            keeper("\"/usr/bin/slacker-snapshotter\""),
            FdKeeper::Program("/usr/bin/slacker-snapshotter".into())
        );
        // This test binary is not slacker-snapshotter: "auto" names no keeper for it, as
        // for any program embedding the library.
        assert_eq!(FdKeeper::Auto.program(), None);
        assert_eq!(FdKeeper::Off.program(), None);
        let unknown_kind = format!("{base}[backend]\nkind = \"floppy\"\n");
        assert!(Config::from_toml(&unknown_kind).is_err());
    }
}
