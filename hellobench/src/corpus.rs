//! The corpus of real images, built from Debian packages and cached outside the repository in
//! `${SLACKER_CACHE:-/var/cache/slacker}/hellobench/`:
//!
//! ```text
//! base/              debootstrap --variant=minbase <suite> (apt lists kept, for installs)
//! base.json          how and when base was built, and how long it took
//! images/<name>/     cp -a --reflink=auto base, then apt-get install in a chroot, apt lists removed
//! images/<name>.json BuildRecord: packages, build time, sizes
//! images/shell-busybox/  the reduced corpus when debootstrap is unavailable
//! ```
//!
//! A tree is reused when its record exists and names the same packages and apt source. Trees
//! are built under `*.partial` and renamed at the end, so a failed build never looks finished.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};
use crate::spec::ImageSpec;
use crate::sys::{self, Mounts};
use crate::tree::{self, TreeStats};

/// Longest a debootstrap or apt-get run may take.
const APT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `PATH` inside chroots.
pub const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `${SLACKER_CACHE:-/var/cache/slacker}`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("SLACKER_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/slacker"), PathBuf::from)
}

/// The Debian mirror and suite this machine's apt uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AptSource {
    /// e.g. `http://deb.debian.org/debian`
    pub mirror: String,
    /// e.g. `bookworm`
    pub suite: String,
}

impl AptSource {
    /// The first `URIs:`/`Suites:` pair of `/etc/apt/sources.list.d/*.sources` (deb822), else
    /// the first `deb` line of `/etc/apt/sources.list`.
    pub fn from_host() -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "sources"))
        {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            if let Some(s) = Self::parse_deb822(&text) {
                return Ok(s);
            }
        }
        let text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        Self::parse_one_line(&text).ok_or_else(|| {
            crate::error::Error::msg(
                "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list",
            )
        })
    }

    fn parse_deb822(text: &str) -> Option<Self> {
        // Stanzas are separated by blank lines; take the first with Types: deb.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix(name)
                            .map(|v| v.split_whitespace().next().map(str::to_owned))
                    })
                    .flatten()
            };
            let is_deb = stanza.lines().any(|l| {
                l.strip_prefix("Types:")
                    .is_some_and(|v| v.split_whitespace().any(|t| t == "deb"))
            });
            if let (true, Some(mirror), Some(suite)) = (is_deb, field("URIs:"), field("Suites:")) {
                return Some(Self { mirror, suite });
            }
        }
        None
    }

    fn parse_one_line(text: &str) -> Option<Self> {
        text.lines().map(str::trim).find_map(|l| {
            let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
            (w.next()? == "deb").then_some(())?;
            Some(Self {
                mirror: w.next()?.to_owned(),
                suite: w.next()?.to_owned(),
            })
        })
    }
}

/// How a tree was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TreeKind {
    /// debootstrap minbase (+ packages).
    Debootstrap,
    /// busybox-static with applet symlinks.
    Busybox,
}

/// What the cache records next to each tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Image name (`base` for the debootstrap tree).
    pub name: String,
    /// How it was made.
    pub kind: TreeKind,
    /// Packages installed on top of the base.
    pub packages: Vec<String>,
    /// Mirror and suite (`None` for busybox).
    pub source: Option<AptSource>,
    /// Wall-clock seconds to build this tree (for images: copy + install + clean up; the base
    /// tree's own time is in `base.json`).
    pub build_secs: f64,
    /// When it was built (UTC).
    pub built_at: String,
    /// Sizes.
    pub stats: TreeStats,
}

/// An image tree ready to measure.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Its spec.
    pub spec: ImageSpec,
    /// Root of the tree.
    pub root: PathBuf,
    /// Build record.
    pub record: BuildRecord,
    /// Reused from the cache (not built in this run).
    pub cached: bool,
}

/// Outcome of [`Store::ensure`].
#[derive(Debug)]
pub struct CorpusReport {
    /// The images, in spec order.
    pub images: Vec<BuiltImage>,
    /// The base tree's record, when debootstrap was used.
    pub base: Option<BuildRecord>,
    /// Seconds spent in this call (0-ish when everything was cached).
    pub secs_this_run: f64,
}

/// The on-disk corpus cache.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    busybox: bool,
}

impl Store {
    /// The cache at `cache_root/hellobench`.
    pub fn new(cache_root: &Path) -> Self {
        Self {
            dir: cache_root.join("hellobench"),
            busybox: false,
        }
    }

    /// Use (and build) only busybox trees, even where debootstrap is available: the quick
    /// stand-in for package-less images (`--busybox`, for CI).
    pub fn with_busybox(mut self, on: bool) -> Self {
        self.busybox = on;
        self
    }

    /// Whether only busybox trees are used.
    pub fn busybox_only(&self) -> bool {
        self.busybox
    }

    /// The cache directory (for cleanup sweeps).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// Records of trees already in the cache for `specs`, without building anything.
    pub fn cached(&self, specs: &[ImageSpec]) -> Vec<Option<BuiltImage>> {
        specs
            .iter()
            .map(|s| {
                let busybox = format!("{}-busybox", s.name);
                let names = if self.busybox {
                    vec![busybox]
                } else {
                    vec![s.name.clone(), busybox]
                };
                for name in names {
                    let root = self.images_dir().join(&name);
                    if let Some(r) = read_record(&self.images_dir().join(format!("{name}.json")))
                        && r.packages == s.packages
                        && root.is_dir()
                    {
                        return Some(BuiltImage {
                            spec: s.clone(),
                            root,
                            record: r,
                            cached: true,
                        });
                    }
                }
                None
            })
            .collect()
    }

    /// Build (or reuse) every image in `specs`. With `debootstrap == false`, only a busybox
    /// `shell` can be built (package-less images are the only ones it can stand in for).
    pub fn ensure(&self, specs: &[ImageSpec], debootstrap: bool) -> Result<CorpusReport> {
        let t0 = Instant::now();
        std::fs::create_dir_all(self.images_dir())
            .with_context(|| format!("creating {}", self.images_dir().display()))?;
        let cached = self.cached(specs);
        let source = if debootstrap && !self.busybox {
            Some(AptSource::from_host()?)
        } else {
            None
        };
        let mut base = None;
        let mut images = Vec::new();
        for (spec, cached) in specs.iter().zip(cached) {
            // With debootstrap, only a tree from the same mirror/suite counts; without it, any tree.
            let usable = |c: &BuiltImage| source.is_none() || c.record.source == source;
            if let Some(c) = cached.filter(usable) {
                crate::progress!(
                    "corpus: {} cached ({}, {} files, built in {:.1} s)",
                    spec.name,
                    crate::report::fmt_bytes(c.record.stats.file_bytes),
                    c.record.stats.files,
                    c.record.build_secs
                );
                images.push(c);
                continue;
            }
            let img = match &source {
                Some(src) => {
                    if base.is_none() {
                        base = Some(self.ensure_base(src)?);
                    }
                    self.build_from_base(spec, src)?
                }
                None if spec.packages.is_empty() => self.build_busybox(spec)?,
                None => crate::bail!(
                    "image {} needs debootstrap (packages {:?}); install it: apt-get install -y debootstrap",
                    spec.name,
                    spec.packages
                ),
            };
            images.push(img);
        }
        if base.is_none() && !self.busybox {
            base = read_record(&self.dir.join("base.json"));
        }
        Ok(CorpusReport {
            images,
            base,
            secs_this_run: t0.elapsed().as_secs_f64(),
        })
    }

    fn ensure_base(&self, src: &AptSource) -> Result<BuildRecord> {
        let root = self.dir.join("base");
        let rec_path = self.dir.join("base.json");
        if let Some(r) = read_record(&rec_path)
            && r.source.as_ref() == Some(src)
            && root.is_dir()
        {
            crate::progress!(
                "corpus: base tree cached (debootstrap took {:.1} s)",
                r.build_secs
            );
            return Ok(r);
        }
        let partial = self.dir.join("base.partial");
        sys::remove_tree(&partial)?;
        sys::remove_tree(&root)?;
        crate::progress!(
            "corpus: debootstrap --variant=minbase {} {} (about a minute) ...",
            src.suite,
            src.mirror
        );
        let t = Instant::now();
        sys::run_ok(
            Command::new("debootstrap")
                .args(["--variant=minbase", &src.suite])
                .arg(&partial)
                .arg(&src.mirror)
                .env("PATH", CHROOT_PATH)
                .env("LC_ALL", "C"),
            APT_TIMEOUT,
        )
        .context("debootstrap")?;
        std::fs::rename(&partial, &root)?;
        let rec = BuildRecord {
            name: "base".into(),
            kind: TreeKind::Debootstrap,
            packages: vec![],
            source: Some(src.clone()),
            build_secs: t.elapsed().as_secs_f64(),
            built_at: sys::now_utc().1,
            stats: tree::stats(&tree::walk(&root)?),
        };
        write_record(&rec_path, &rec)?;
        crate::progress!("corpus: base tree built in {:.1} s", rec.build_secs);
        Ok(rec)
    }

    fn build_from_base(&self, spec: &ImageSpec, src: &AptSource) -> Result<BuiltImage> {
        let base = self.dir.join("base");
        let root = self.images_dir().join(&spec.name);
        let partial = self.images_dir().join(format!("{}.partial", spec.name));
        sys::remove_tree(&partial)?;
        sys::remove_tree(&root)?;
        crate::progress!(
            "corpus: {}: copy base + apt-get install {:?} ...",
            spec.name,
            spec.packages
        );
        let t = Instant::now();
        sys::run_ok(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&base)
                .arg(&partial),
            Duration::from_secs(600),
        )?;
        if !spec.packages.is_empty() {
            install_packages(&partial, &spec.packages)
                .with_context(|| format!("installing {:?} for {}", spec.packages, spec.name))?;
        }
        slim_apt(&partial)?;
        std::fs::rename(&partial, &root)?;
        let rec = BuildRecord {
            name: spec.name.clone(),
            kind: TreeKind::Debootstrap,
            packages: spec.packages.clone(),
            source: Some(src.clone()),
            build_secs: t.elapsed().as_secs_f64(),
            built_at: sys::now_utc().1,
            stats: tree::stats(&tree::walk(&root)?),
        };
        write_record(&self.images_dir().join(format!("{}.json", spec.name)), &rec)?;
        crate::progress!(
            "corpus: {} built in {:.1} s ({}, {} files)",
            spec.name,
            rec.build_secs,
            crate::report::fmt_bytes(rec.stats.file_bytes),
            rec.stats.files
        );
        Ok(BuiltImage {
            spec: spec.clone(),
            root,
            record: rec,
            cached: false,
        })
    }

    /// A busybox-static tree standing in for `shell` when debootstrap is unavailable.
    fn build_busybox(&self, spec: &ImageSpec) -> Result<BuiltImage> {
        let name = format!("{}-busybox", spec.name);
        let root = self.images_dir().join(&name);
        let partial = self.images_dir().join(format!("{name}.partial"));
        let dl = self.dir.join("busybox-deb");
        sys::remove_tree(&partial)?;
        sys::remove_tree(&root)?;
        sys::remove_tree(&dl)?;
        let t = Instant::now();
        // The host's static busybox if there is one (no download), else busybox-static's.
        let binary = match sys::static_busybox() {
            Some(b) => {
                crate::progress!(
                    "corpus: {}: busybox tree from the host's static {}",
                    spec.name,
                    b.display()
                );
                b
            }
            None => {
                std::fs::create_dir_all(&dl)?;
                crate::progress!(
                    "corpus: {}: apt-get download busybox-static (no debootstrap) ...",
                    spec.name
                );
                sys::run_ok(
                    Command::new("apt-get")
                        .args(["download", "busybox-static"])
                        .current_dir(&dl),
                    APT_TIMEOUT,
                )
                .context(
                    "apt-get download busybox-static (needs apt package lists: run apt-get update)",
                )?;
                let deb = std::fs::read_dir(&dl)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|e| e == "deb"))
                    .ok_or_else(|| crate::error::Error::msg("apt-get download left no .deb"))?;
                let x = dl.join("x");
                sys::run_ok(
                    Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x),
                    Duration::from_secs(120),
                )?;
                x.join("bin/busybox")
            }
        };
        for d in ["bin", "dev", "proc", "tmp", "etc", "root", "usr/bin", "sys"] {
            std::fs::create_dir_all(partial.join(d))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(partial.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        std::fs::copy(&binary, partial.join("bin/busybox"))?;
        let list = sys::run_ok(
            Command::new(partial.join("bin/busybox")).arg("--list"),
            Duration::from_secs(10),
        )?;
        for applet in list
            .stdout
            .lines()
            .filter(|a| !a.is_empty() && *a != "busybox")
        {
            std::os::unix::fs::symlink("busybox", partial.join("bin").join(applet))?;
        }
        std::fs::write(
            partial.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
        )?;
        sys::remove_tree(&dl)?;
        std::fs::rename(&partial, &root)?;
        let rec = BuildRecord {
            name: name.clone(),
            kind: TreeKind::Busybox,
            packages: spec.packages.clone(),
            source: None,
            build_secs: t.elapsed().as_secs_f64(),
            built_at: sys::now_utc().1,
            stats: tree::stats(&tree::walk(&root)?),
        };
        write_record(&self.images_dir().join(format!("{name}.json")), &rec)?;
        crate::progress!(
            "corpus: {} (busybox) built in {:.1} s",
            spec.name,
            rec.build_secs
        );
        Ok(BuiltImage {
            spec: spec.clone(),
            root,
            record: rec,
            cached: false,
        })
    }
}

/// `apt-get install -y --no-install-recommends` in a chroot with /proc and /dev mounted and
/// service starts refused by a temporary `policy-rc.d`. Mounts are gone when this returns.
fn install_packages(root: &Path, packages: &[String]) -> Result<()> {
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::write(
        &policy,
        "#!/bin/sh\n# hellobench: never start services while building images\nexit 101\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))?;
    let mut mounts = Mounts::new();
    mounts.proc(&root.join("proc"))?;
    mounts.bind(Path::new("/dev"), &root.join("dev"))?;
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("chroot");
        cmd.arg(root)
            .arg("apt-get")
            .args(args)
            .env_clear()
            .env("PATH", CHROOT_PATH)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("HOME", "/root");
        sys::run_ok(&mut cmd, APT_TIMEOUT).map(drop)
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(packages.iter().map(String::as_str));
    let r = apt(&install).or_else(|e| {
        // Stale lists in the base tree (mirror moved on): refresh once and retry.
        crate::progress!("corpus: install failed ({e}); apt-get update and retry");
        apt(&["update"])?;
        apt(&install)
    });
    mounts.unmount_all()?;
    std::fs::remove_file(&policy)?;
    r
}

/// What a Dockerfile's `apt-get clean && rm -rf /var/lib/apt/lists/*` leaves.
fn slim_apt(root: &Path) -> Result<()> {
    let lists = root.join("var/lib/apt/lists");
    for e in std::fs::read_dir(&lists)? {
        let p = e?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    std::fs::create_dir_all(lists.join("partial"))?;
    for sub in ["var/cache/apt/archives"] {
        let d = root.join(sub);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "deb") {
                    std::fs::remove_file(&p)?;
                }
            }
        }
    }
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = std::fs::remove_file(root.join(f));
    }
    Ok(())
}

fn read_record(p: &Path) -> Option<BuildRecord> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn write_record(p: &Path, r: &BuildRecord) -> Result<()> {
    std::fs::write(p, serde_json::to_vec_pretty(r)?)
        .with_context(|| format!("writing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_deb822_and_one_line_sources() {
        let d = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://x/y\nSuites: z\n";
        assert_eq!(
            AptSource::parse_deb822(d),
            Some(AptSource {
                mirror: "http://deb.debian.org/debian".into(),
                suite: "bookworm".into()
            })
        );
        assert_eq!(
            AptSource::parse_deb822("Types: deb-src\nURIs: a\nSuites: b\n"),
            None
        );
        let l = "# x\ndeb [arch=amd64] http://m/debian trixie main\n";
        assert_eq!(
            AptSource::parse_one_line(l),
            Some(AptSource {
                mirror: "http://m/debian".into(),
                suite: "trixie".into()
            })
        );
    }
}
