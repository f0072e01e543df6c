//! What this host can do, and exactly what is missing for the rest.

use crate::sys;

/// One missing prerequisite.
#[derive(Debug, Clone)]
pub struct Missing {
    /// What is missing.
    pub what: String,
    /// What it is needed for.
    pub needed_for: String,
    /// How to get it.
    pub fix: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "missing {} (needed for {}); fix: {}",
            self.what, self.needed_for, self.fix
        )
    }
}

/// The host's capabilities.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// Running as root.
    pub root: bool,
    /// debootstrap + chroot + cp + root: can build the Debian corpus.
    pub debootstrap: bool,
    /// apt-get + dpkg-deb: can build the busybox stand-in for `shell`.
    pub busybox: bool,
    /// docker-registry: can push and pull.
    pub registry: bool,
    /// root + chroot + overlayfs + tmpfs: can run containers.
    pub run: bool,
    /// Everything that is missing.
    pub missing: Vec<Missing>,
}

fn tool(name: &str, package: &str, needed_for: &str, missing: &mut Vec<Missing>) -> bool {
    let ok = sys::which(name).is_some();
    if !ok {
        missing.push(Missing {
            what: format!("`{name}`"),
            needed_for: needed_for.into(),
            fix: format!("apt-get install -y {package}"),
        });
    }
    ok
}

/// Check this host.
pub fn check() -> Preflight {
    let mut m = Vec::new();
    let root = sys::is_root();
    if !root {
        m.push(Missing {
            what: "root".into(),
            needed_for: "debootstrap, chroot and the mounts of the run phase (overlayfs, /proc, tmpfs)".into(),
            fix: "run as root, e.g. `sudo -E env PATH=$PATH cargo run --release -p slacker-hellobench -- ...`".into(),
        });
    }
    let chroot = tool(
        "chroot",
        "coreutils",
        "building images and running containers",
        &mut m,
    );
    let deb = tool(
        "debootstrap",
        "debootstrap",
        "building the Debian corpus",
        &mut m,
    );
    let registry = tool(
        "docker-registry",
        "docker-registry",
        "push and pull (the local OCI registry)",
        &mut m,
    );
    let apt = sys::which("apt-get").is_some() && sys::which("dpkg-deb").is_some();
    let overlay = sys::kernel_has_fs("overlay");
    if !overlay {
        m.push(Missing {
            what: "overlayfs in the kernel".into(),
            needed_for: "the run phase of the traditional path".into(),
            fix: "modprobe overlay (or a kernel with CONFIG_OVERLAY_FS)".into(),
        });
    }
    Preflight {
        root,
        debootstrap: root && deb && chroot,
        busybox: apt,
        registry,
        run: root && chroot && overlay && sys::kernel_has_fs("tmpfs"),
        missing: m,
    }
}
