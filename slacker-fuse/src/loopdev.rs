//! Loop devices attached with one system call, without util-linux.
//!
//! `losetup` and `mount -o loop` each start a process (a few ms on a busy machine, and
//! the mount's share of a container start), and `mount -o loop` cannot ask for direct
//! IO. [`LoopDevice::attach`] does what `losetup` does on Linux 5.8+ (`LOOP_CTL_GET_FREE`,
//! then `LOOP_CONFIGURE` with the flags at once) from this process.
//!
//! **Direct IO** (the default): the loop device reads and writes its backing file with
//! `O_DIRECT`, so a block is cached once, in the page cache of the filesystem mounted
//! on the device, instead of twice (there and in the backing file's page cache), and a
//! cold read moves only the bytes asked for: over a btrfs file, buffered loop reads also
//! trigger btrfs's own read-ahead on the file, about twice the bytes (measured:
//! `BENCHMARKS.md`, "containerd + runc").
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use slacker_fuse::{LoopDevice, LoopOptions};
//! let dev = LoopDevice::attach("/var/lib/slacker/vol.img", &LoopOptions::default().with_autoclear(true))?;
//! // mount(2) the device here; with autoclear it detaches when the mount goes.
//! println!("{}", dev.path().display());
//! drop(dev);
//! # Ok(()) }
//! ```

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::sys;

/// How to attach a [`LoopDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoopOptions {
    /// A read-only device (`losetup -r`). Default `false`.
    pub read_only: bool,
    /// Direct IO on the backing file (`losetup --direct-io=on`). Default `true`. The
    /// kernel falls back to buffered IO when the backing file cannot do direct IO at the
    /// device's block size; [`LoopDevice::direct_io`] says what it chose.
    pub direct_io: bool,
    /// Detach the device when its last opener closes it (what `mount -o loop` sets).
    /// Default `false`.
    pub autoclear: bool,
    /// Logical block size in bytes: 512, 1024, 2048 or 4096. Default 4096, which a
    /// filesystem of 4 KiB blocks (every slacker volume) accepts and which lets direct
    /// IO work on backing filesystems with 4 KiB sectors (btrfs).
    pub block_size: u32,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct_io: true,
            autoclear: false,
            block_size: 4096,
        }
    }
}

impl LoopOptions {
    /// Sets [`read_only`](Self::read_only).
    pub fn with_read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Sets [`direct_io`](Self::direct_io).
    pub fn with_direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }

    /// Sets [`autoclear`](Self::autoclear).
    pub fn with_autoclear(mut self, on: bool) -> Self {
        self.autoclear = on;
        self
    }

    /// Sets [`block_size`](Self::block_size).
    pub fn with_block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self
    }
}

/// A loop device attached to a file, open in this process (root only).
///
/// Dropping it closes the descriptor: an [`autoclear`](LoopOptions::autoclear) device
/// then detaches once nothing else (a mount) holds it; any other stays attached until
/// [`detach`](Self::detach) (or `losetup -d`).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    fd: OwnedFd,
}

impl LoopDevice {
    /// Attaches a free loop device to `file`.
    ///
    /// # Errors
    /// `file` or `/dev/loop-control` cannot be opened (not root, no loop driver), no
    /// free device, or `LOOP_CONFIGURE` refused (Linux older than 5.8, a block size the
    /// backing file cannot take).
    pub fn attach(file: impl AsRef<Path>, options: &LoopOptions) -> io::Result<Self> {
        let (path, fd) = sys::loop_configure(
            file.as_ref(),
            sys::LoopFlags {
                read_only: options.read_only,
                direct_io: options.direct_io,
                autoclear: options.autoclear,
                block_size: options.block_size,
            },
        )?;
        Ok(Self { path, fd })
    }

    /// The device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel does direct IO on the backing file (sysfs `loop/dio`).
    pub fn direct_io(&self) -> bool {
        let name = self.path.file_name().unwrap_or_default();
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/dio"))
            .is_ok_and(|s| s.trim() == "1")
    }

    /// Detaches the device (`LOOP_CLR_FD`): at once if nothing else holds it, else when
    /// the last opener closes it.
    ///
    /// # Errors
    /// The ioctl failing.
    pub fn detach(self) -> io::Result<()> {
        sys::loop_clear(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        rustix_is_root() && Path::new("/dev/loop-control").exists()
    }

    fn rustix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
        })
    }

    fn backing_file(dev: &Path) -> Option<String> {
        let name = dev.file_name()?;
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Whether `dev` gets detached within 5 s: the kernel defers a detach while anything
    /// else has the device open (a parallel test scanning `/dev/loop*`, udev probing it).
    fn detached_soon(dev: &Path) -> bool {
        let t = std::time::Instant::now();
        while backing_file(dev).is_some() {
            if t.elapsed() > std::time::Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    #[test]
    fn attach_sets_the_flags_and_autoclear_detaches_on_close() {
        if !root() {
            if std::env::var_os("CI").is_some() {
                panic!("CI=true: needs root and /dev/loop-control");
            }
            eprintln!("SKIPPED: needs root and /dev/loop-control");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.img");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let canon = std::fs::canonicalize(&file).unwrap();

        let dev = LoopDevice::attach(&file, &LoopOptions::default().with_read_only(true)).unwrap();
        let name = dev.path().file_name().unwrap().to_owned();
        let sys = Path::new("/sys/block").join(&name);
        assert_eq!(backing_file(dev.path()).as_deref(), canon.to_str());
        assert_eq!(std::fs::read_to_string(sys.join("ro")).unwrap().trim(), "1");
        assert_eq!(
            std::fs::read_to_string(sys.join("queue/logical_block_size"))
                .unwrap()
                .trim(),
            "4096"
        );
        assert_eq!(
            std::fs::read_to_string(sys.join("loop/autoclear"))
                .unwrap()
                .trim(),
            "0"
        );
        assert!(
            dev.direct_io(),
            "direct IO asked for, on a filesystem that can do it"
        );
        let path = dev.path().to_owned();
        drop(dev);
        // Not autoclear: still attached after the close.
        assert_eq!(backing_file(&path).as_deref(), canon.to_str());
        let again = std::fs::OpenOptions::new().read(true).open(&path).unwrap();
        sys::loop_clear(&again.into()).unwrap();
        assert!(detached_soon(&path), "detached by LOOP_CLR_FD");

        let dev = LoopDevice::attach(
            &file,
            &LoopOptions::default()
                .with_autoclear(true)
                .with_direct_io(false),
        )
        .unwrap();
        let sys = Path::new("/sys/block").join(dev.path().file_name().unwrap());
        assert_eq!(
            std::fs::read_to_string(sys.join("loop/autoclear"))
                .unwrap()
                .trim(),
            "1"
        );
        assert!(!dev.direct_io());
        assert_eq!(std::fs::read_to_string(sys.join("ro")).unwrap().trim(), "0");
        let path = dev.path().to_owned();
        drop(dev);
        assert_eq!(
            backing_file(&path),
            None,
            "autoclear: detached on the last close"
        );
    }
}
