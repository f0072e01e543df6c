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
    /// Slacker's push and pull: a btrfs (root + mkfs.btrfs + mount, or `SLACKER_BTRFS_ROOT`)
    /// and e2fsprogs (images are imported as ext4).
    pub slacker: bool,
    /// Slacker's run, kernel path: root + losetup + chroot + ext4.
    pub slacker_run: bool,
    /// Slacker's run through the lazy data path: also `/dev/fuse`.
    pub slacker_lazy_run: bool,
    /// `slacker-nfs` push and pull: e2fsprogs (the NFS server is found separately).
    pub slacker_nfs: bool,
    /// `slacker-nfs` run: root + losetup + chroot + ext4 + `/dev/fuse` (no btrfs needed).
    pub slacker_nfs_run: bool,
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
            needed_for: "debootstrap, chroot, the mounts of the run phase (overlayfs, /proc, tmpfs) and the slacker paths' btrfs, loop and FUSE mounts".into(),
            fix: "run as root, or as a user with sudo: the binary re-runs itself through sudo (`cargo run --release -p slacker-hellobench`)".into(),
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
    // Slacker: btrfs storage, ext4 images, loop devices, FUSE.
    let env_btrfs = std::env::var_os(crate::storage::ENV_BTRFS_ROOT).is_some_and(|v| !v.is_empty());
    let mut btrfs = env_btrfs;
    if !env_btrfs {
        let mkfs = tool(
            "mkfs.btrfs",
            "btrfs-progs",
            "the slacker paths' storage (a loop-mounted btrfs)",
            &mut m,
        );
        let kbtrfs = sys::kernel_has_fs("btrfs");
        if !kbtrfs {
            m.push(Missing {
                what: "btrfs in the kernel".into(),
                needed_for: "the slacker paths' storage".into(),
                fix: "modprobe btrfs, or point SLACKER_BTRFS_ROOT at a directory on btrfs".into(),
            });
        }
        let mount = tool("mount", "mount", "loop-mounting btrfs and ext4", &mut m);
        btrfs = root && mkfs && kbtrfs && mount;
    }
    let e2fs = tool(
        "mke2fs",
        "e2fsprogs",
        "the slacker paths (images are imported as ext4 volumes)",
        &mut m,
    ) & tool("debugfs", "e2fsprogs", "the slacker paths", &mut m);
    let losetup = tool(
        "losetup",
        "mount",
        "the slacker paths' run phase (loop devices)",
        &mut m,
    );
    let ext4 = sys::kernel_has_fs("ext4");
    if !ext4 {
        m.push(Missing {
            what: "ext4 in the kernel".into(),
            needed_for: "the slacker paths' run phase".into(),
            fix: "modprobe ext4".into(),
        });
    }
    let fuse = std::path::Path::new("/dev/fuse").exists() && sys::kernel_has_fs("fuse");
    if !fuse {
        m.push(Missing {
            what: "/dev/fuse (FUSE in the kernel)".into(),
            needed_for: "the slacker-lazy path's run phase (the worker data path)".into(),
            fix: "modprobe fuse".into(),
        });
    }
    let slacker = btrfs && e2fs;
    let slacker_run = slacker && root && losetup && chroot && ext4;
    Preflight {
        root,
        debootstrap: root && deb && chroot,
        busybox: apt || sys::static_busybox().is_some(),
        registry,
        run: root && chroot && overlay && sys::kernel_has_fs("tmpfs"),
        slacker,
        slacker_run,
        slacker_lazy_run: slacker_run && fuse,
        slacker_nfs: e2fs,
        slacker_nfs_run: e2fs && root && losetup && chroot && ext4 && fuse,
        missing: m,
    }
}
