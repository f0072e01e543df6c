//! [`Mount`]: a volume's ext4 loop-mounted, with ordered teardown that also runs on
//! failure.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, VolumeId};

use rustix::mount::{MountFlags, mount};

use crate::loopdev::{LoopDevice, LoopOptions};
use crate::session::{FuseOptions, FuseSession};
use crate::sys;

/// How to mount.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct MountOptions {
    /// Mount read-only (`losetup -r`, `mount -o ro`). Forced for a snapshot view.
    pub read_only: bool,
    /// Extra ext4 mount options (comma-separated), e.g. `noload`.
    pub ext4_options: String,
    /// Where to make the mount directories; default: the system temp directory.
    pub work_dir: Option<PathBuf>,
    /// How the FUSE session serves (FUSE route only).
    pub fuse: FuseOptions,
}

impl MountOptions {
    /// Sets [`read_only`](Self::read_only).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets [`work_dir`](Self::work_dir).
    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }
}

/// How the image reached the loop device.
#[derive(Debug)]
enum Route {
    /// Through FUSE: `<fuse dir>/disk.img` of a [`LazyVolume`].
    Fuse(FuseSession),
    /// Directly from a local file (a btrfs backend's volume).
    Local(PathBuf),
}

/// An ext4 filesystem from a volume, mounted and ready to run a process in (root only).
///
/// Two routes lead to it: a [`LazyVolume`] served as `disk.img` through FUSE
/// ([`Mount::lazy`]), or a local file such as a btrfs backend's volume
/// ([`Backend::local_path`], [`Mount::local_file`]), loop-mounted directly without FUSE.
/// [`Mount::for_volume`] picks the route from the backend's capabilities. Either way the
/// loop device is attached with direct IO from this process ([`LoopDevice`], what
/// `losetup -f --show --direct-io=on` does) and the filesystem mounted with `mount(2)`
/// (`mount -t ext4`): no process is started on the way to a container's root.
///
/// Teardown is ordered: unmount ext4, detach the loop device, stop FUSE, remove the
/// directories. It runs on [`unmount`](Self::unmount) (reporting errors), on drop
/// (after a panic too, reporting to stderr), and on a failure half-way through setup.
/// Every step here blocks: in async code, use [`mount_and_run`] or
/// `tokio::task::spawn_blocking`.
#[derive(Debug)]
pub struct Mount {
    root: PathBuf,
    root_mounted: bool,
    loop_device: Option<LoopDevice>,
    route: Option<Route>,
    dirs: Vec<PathBuf>,
    volume: Option<LazyVolume>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh_dir(base: &Path, what: &str) -> io::Result<PathBuf> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = base.join(format!("slacker-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Mount {
    fn empty(options: &MountOptions) -> io::Result<Self> {
        let base = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let root = fresh_dir(&base, "root")?;
        Ok(Self {
            dirs: vec![root.clone()],
            root,
            root_mounted: false,
            loop_device: None,
            route: None,
            volume: None,
        })
    }

    /// Serves `volume` through FUSE and mounts the ext4 inside it.
    ///
    /// # Errors
    /// Any step failing (FUSE, `losetup`, `mount`); what was set up is torn down.
    pub fn lazy(volume: LazyVolume, options: &MountOptions) -> io::Result<Self> {
        let mut m = Self::empty(options)?;
        let base = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let fuse_dir = fresh_dir(&base, "fuse")?;
        m.dirs.push(fuse_dir.clone());
        let read_only = options.read_only || volume.is_read_only();
        m.volume = Some(volume.clone());
        let session = FuseSession::start(volume, &fuse_dir, &options.fuse)?;
        let image = session.image_path();
        m.route = Some(Route::Fuse(session));
        m.attach_and_mount(&image, read_only, &options.ext4_options)?;
        Ok(m)
    }

    /// Loop-mounts the ext4 image in a local file (no FUSE): the btrfs route.
    ///
    /// # Errors
    /// `losetup` or `mount` failing; what was set up is torn down.
    pub fn local_file(path: impl AsRef<Path>, options: &MountOptions) -> io::Result<Self> {
        let mut m = Self::empty(options)?;
        let path = path.as_ref().to_path_buf();
        m.route = Some(Route::Local(path.clone()));
        m.attach_and_mount(&path, options.read_only, &options.ext4_options)?;
        Ok(m)
    }

    /// Mounts volume `id` of `backend` by the best route: directly from
    /// [`Backend::local_path`] when the backend has the `local_path` capability (btrfs),
    /// otherwise as a [`LazyVolume`] over `cache` through FUSE. The blocking setup runs
    /// under `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    /// Backend errors (as `io::Error::other`), or any setup step failing.
    pub async fn for_volume(
        backend: Arc<dyn Backend>,
        id: VolumeId,
        cache: Arc<BlockCache>,
        lazy: LazyVolumeOptions,
        options: MountOptions,
    ) -> io::Result<Self> {
        if backend.info().capabilities.local_path {
            let path = backend.local_path(&id).await.map_err(io::Error::other)?;
            return blocking(move || Self::local_file(path, &options)).await;
        }
        let volume = LazyVolume::open(backend, id, cache, lazy)
            .await
            .map_err(io::Error::other)?;
        blocking(move || Self::lazy(volume, &options)).await
    }

    fn attach_and_mount(&mut self, image: &Path, read_only: bool, extra: &str) -> io::Result<()> {
        let dev = LoopDevice::attach(image, &LoopOptions::default().with_read_only(read_only))?;
        let path = dev.path().to_owned();
        self.loop_device = Some(dev);
        let flags = if read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        let data = std::ffi::CString::new(extra).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "NUL in the ext4 mount options")
        })?;
        let data = (!extra.is_empty()).then_some(data.as_c_str());
        mount(&path, &self.root, "ext4", flags, data).map_err(|e| {
            io::Error::other(format!(
                "mount -t ext4 -o {extra:?} {} {}: {e}",
                path.display(),
                self.root.display()
            ))
        })?;
        self.root_mounted = true;
        Ok(())
    }

    /// The directory the ext4 is mounted on (the container's root).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The loop device, e.g. `/dev/loop3`.
    pub fn loop_device(&self) -> Option<&Path> {
        self.loop_device.as_ref().map(LoopDevice::path)
    }

    /// The lazy volume, on the FUSE route.
    pub fn volume(&self) -> Option<&LazyVolume> {
        self.volume.as_ref()
    }

    /// The FUSE session, on the FUSE route.
    pub fn fuse(&self) -> Option<&FuseSession> {
        match &self.route {
            Some(Route::Fuse(s)) => Some(s),
            _ => None,
        }
    }

    /// The file behind the loop device (`disk.img` on FUSE, or the local file).
    pub fn image_path(&self) -> Option<PathBuf> {
        match &self.route {
            Some(Route::Fuse(s)) => Some(s.image_path()),
            Some(Route::Local(p)) => Some(p.clone()),
            None => None,
        }
    }

    /// Runs `cmd` (program and arguments) chrooted into [`root`](Self::root) with a
    /// minimal environment, and waits for it.
    ///
    /// # Errors
    /// The command not starting (a non-zero exit is in the returned status).
    pub fn run(&self, cmd: &[&str]) -> io::Result<Output> {
        sys::chroot(&self.root, cmd)
    }

    /// Tears down in order (unmount ext4, detach the loop device, stop FUSE, remove the
    /// directories) and reports the first error; later steps are still attempted.
    ///
    /// # Errors
    /// The first step that failed.
    pub fn unmount(mut self) -> io::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> io::Result<()> {
        let mut first: Option<io::Error> = None;
        let mut note = |r: io::Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if std::mem::take(&mut self.root_mounted) {
            note(sys::umount(&self.root));
        }
        if let Some(dev) = self.loop_device.take() {
            note(dev.detach());
        }
        if let Some(Route::Fuse(session)) = self.route.take() {
            note(session.stop());
        }
        for dir in std::mem::take(&mut self.dirs).into_iter().rev() {
            if !sys::is_mountpoint(&dir) {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(
                root = %self.root.display(),
                error = %e,
                "teardown of a mount failed (ext4, loop device or FUSE may remain)"
            );
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Mounts `volume` (FUSE, loop, ext4), runs `cmd` chrooted into it, tears everything down
/// and returns the command's output. The blocking work (FUSE setup, `losetup`, `mount`,
/// the process, teardown) runs under `tokio::task::spawn_blocking`, so this is safe to
/// await on any runtime. Root only.
///
/// # Errors
/// Setup failing, the command not starting, or teardown failing.
pub async fn mount_and_run(volume: LazyVolume, cmd: &[&str]) -> io::Result<Output> {
    let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
    blocking(move || {
        let m = Mount::lazy(volume, &MountOptions::default())?;
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = m.run(&args)?;
        m.unmount()?;
        Ok(out)
    })
    .await
}
