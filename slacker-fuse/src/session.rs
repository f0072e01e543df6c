//! [`FuseSession`]: a [`LazyVolume`] served as `<mountpoint>/disk.img`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::os::fd::{AsFd, OwnedFd};
use std::time::SystemTime;

use fuser::{Config, MountOption};
use serde::Serialize;
use slacker_core::worker::LazyVolume;

use crate::fs::{DiskImageFs, FsCounters, IMAGE_NAME, Serving};
use crate::resume::{self, Negotiated, Resumed};
use crate::sys;

/// Who serves the connection: fuser (after its own `INIT`) or the resume loop.
enum Server {
    Fuser(fuser::BackgroundSession),
    Resumed(Vec<std::thread::JoinHandle<io::Result<()>>>),
}

impl Server {
    fn join(self) -> io::Result<()> {
        match self {
            Self::Fuser(s) => s.join(),
            Self::Resumed(threads) => {
                let mut result = Ok(());
                for t in threads {
                    let r = t
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("serving thread panicked")));
                    if result.is_ok() {
                        result = r;
                    }
                }
                result
            }
        }
    }
}

/// How a [`FuseSession`] serves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FuseOptions {
    /// fuser event-loop threads: they take requests from the kernel. A read is handed to
    /// the runtime at once (see [`max_reads`](Self::max_reads)); a write, `flush` or
    /// `fsync` blocks its thread until the volume acknowledged it. Default 4.
    pub threads: usize,
    /// Reads served at once (volume reads in flight; their misses are coalesced and
    /// fetched once by the volume). Also the kernel's bound on pending background
    /// requests, which is how asynchronous direct IO reaches us. Default 64.
    pub max_reads: usize,
    /// Ask the kernel for asynchronous direct IO (`FUSE_ASYNC_DIO`): the loop device's
    /// requests then reach the volume concurrently instead of one after another, so
    /// the kernel's read-ahead and concurrent readers become concurrent fetches.
    /// Default true (false only to measure without it).
    pub async_dio: bool,
    /// Worker threads of the tokio runtime the session owns to run volume calls.
    /// Default 2.
    pub runtime_threads: usize,
    /// Source name shown in the mount table. Default `slacker`.
    pub fs_name: String,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            threads: 4,
            max_reads: 64,
            async_dio: true,
            runtime_threads: 2,
            fs_name: "slacker".to_owned(),
        }
    }
}

impl FuseOptions {
    /// Sets [`threads`](Self::threads) (at least 1).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Sets [`max_reads`](Self::max_reads) (at least 1).
    pub fn with_max_reads(mut self, n: usize) -> Self {
        self.max_reads = n.max(1);
        self
    }

    /// Sets [`async_dio`](Self::async_dio).
    pub fn with_async_dio(mut self, on: bool) -> Self {
        self.async_dio = on;
        self
    }
}

/// Requests a [`FuseSession`] served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FuseStats {
    /// FUSE read requests on `disk.img`.
    pub reads: u64,
    /// FUSE write requests on `disk.img`.
    pub writes: u64,
    /// FUSE fsync requests.
    pub fsyncs: u64,
    /// Most reads served at once.
    pub peak_reads_in_flight: u64,
    /// Whether the kernel sends direct IO asynchronously (`FUSE_ASYNC_DIO` agreed).
    pub async_dio: bool,
}

/// A [`LazyVolume`] exposed as one file, `<mountpoint>/disk.img`, through FUSE (`fuser`,
/// mounted with `mount(2)` as root: no `fusermount` needed), read-write unless the volume
/// is a read-only snapshot view.
///
/// The session owns a small tokio runtime. fuser's event-loop threads hand each read to
/// it as a task and go back to the kernel (reads are served concurrently, at most
/// [`FuseOptions::max_reads`]); they `block_on` writes, `flush` and `fsync` there. Dropping the
/// session unmounts it and joins its threads; unmounting fails while a loop device still
/// holds `disk.img`, so detach loop devices first (a [`Mount`](crate::Mount) does).
///
/// # When the serving process dies
///
/// A write reaches the kernel's caller as successful only after the volume acknowledged
/// it, that is after the backend's `write_at` returned, so no acknowledged write lives
/// only in this process. If the process dies (or [`abort`](Self::abort) is called,
/// which does to the kernel connection what a death does), pending and later requests
/// fail with `ENOTCONN` and the mount stays as a dead entry until unmounted (after
/// the loop device on it is detached). A new
/// session on the same backend volume (a fresh [`LazyVolume::open`], which re-reads the
/// diverged bitmap) serves every acknowledged write; the shared cache is only a cache of
/// immutable snapshot blocks, so losing it loses nothing. An ext4 mounted above sees IO
/// errors for the requests in flight and recovers from its journal on the next mount.
///
/// Unless the connection is kept: if another process holds a [`keep_fd`](Self::keep_fd)
/// descriptor when this one dies, the kernel keeps the connection, requests wait instead
/// of failing, and [`resume`](Self::resume) in a new process serves them (and the mount,
/// loop device and ext4 above keep working).
pub struct FuseSession {
    session: Option<Server>,
    /// A descriptor of the same open `/dev/fuse` file the server reads (see
    /// [`keep_fd`](Self::keep_fd)).
    kept: OwnedFd,
    mountpoint: PathBuf,
    connection: u64,
    volume: LazyVolume,
    counters: Arc<FsCounters>,
}

impl std::fmt::Debug for FuseSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseSession")
            .field("mountpoint", &self.mountpoint)
            .field("connection", &self.connection)
            .field("volume", &self.volume)
            .finish_non_exhaustive()
    }
}

impl FuseSession {
    /// Mounts `volume` at `mountpoint` (an existing, empty directory) and serves it on
    /// background threads. Blocking: call it from a thread, or under
    /// `tokio::task::spawn_blocking` in async code.
    ///
    /// # Errors
    /// The mount failing (not root, no `/dev/fuse`, a bad mountpoint), or the runtime not
    /// starting.
    pub fn start(
        volume: LazyVolume,
        mountpoint: impl AsRef<Path>,
        options: &FuseOptions,
    ) -> io::Result<Self> {
        let mountpoint = mountpoint.as_ref().to_path_buf();
        let runtime = fs_runtime(options)?;
        let counters = Arc::new(FsCounters::default());
        let meta = std::fs::metadata(&mountpoint)?;
        // The filesystem owns the runtime: it lives as long as the serving threads.
        let fs = DiskImageFs::new(
            volume.clone(),
            runtime,
            meta.uid(),
            meta.gid(),
            Arc::clone(&counters),
            Serving {
                async_dio: options.async_dio,
                max_reads: options.max_reads,
            },
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(options.fs_name.clone()),
            MountOption::Subtype("slacker".to_owned()),
            if volume.is_read_only() {
                MountOption::RO
            } else {
                MountOption::RW
            },
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.n_threads = Some(options.threads.max(1));
        // All threads read the one open file (no FUSE_DEV_IOC_CLONE per thread): a
        // request read by a thread lives on that file's processing list, and only a file
        // that outlives this process (kept_fd) lets a successor get it resent.
        config.clone_fd = false;
        // Session::new mounts and answers INIT; the file is then kept before serving.
        let session = fuser::Session::new(fs, &mountpoint, &config)?;
        let kept = session.as_fd().try_clone_to_owned()?;
        let session = session.spawn()?;
        let connection = sys::device_minor(std::fs::metadata(&mountpoint)?.dev());
        Ok(Self {
            session: Some(Server::Fuser(session)),
            kept,
            mountpoint,
            connection,
            volume,
            counters,
        })
    }

    /// Serves an already-initialised connection again after its daemon died: `kept` is
    /// a descriptor of the `/dev/fuse` file the old session served (its
    /// [`keep_fd`](Self::keep_fd), held meanwhile by something that outlived the old
    /// process), `negotiated` what the old session agreed at `INIT`
    /// ([`negotiated`](Self::negotiated)), `mountpoint` where it is still mounted, and
    /// `volume` a fresh [`LazyVolume::open`] of the same backend volume.
    ///
    /// No `INIT` happens (the kernel sends it once per connection): the session runs its
    /// own request loop for the single-file filesystem (reads and writes are served one
    /// per thread, [`FuseOptions::threads`] of them). It then sends `FUSE_NOTIFY_RESEND`
    /// (Linux 6.9+) so that the requests the dead daemon had read but not answered are
    /// read again (they are idempotent: reads and writes at an offset, flush, getattr);
    /// on an older kernel those requests stay unanswered. Stopping and dropping work as
    /// for [`start`](Self::start).
    ///
    /// # Errors
    /// `mountpoint` not a FUSE mount, the descriptor not duplicable, or the runtime or
    /// threads not starting.
    pub fn resume(
        kept: OwnedFd,
        negotiated: Negotiated,
        volume: LazyVolume,
        mountpoint: impl AsRef<Path>,
        options: &FuseOptions,
    ) -> io::Result<Self> {
        let mountpoint = mountpoint.as_ref().to_path_buf();
        if !sys::is_mountpoint(&mountpoint) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not mounted", mountpoint.display()),
            ));
        }
        // The root's owner as the mount shows it (a stat of the mount is answered by the
        // kernel's cached attributes or by the loop below once it runs).
        let parent_meta = std::fs::metadata(mountpoint.parent().unwrap_or(Path::new("/")))?;
        let runtime = fs_runtime(options)?;
        let counters = Arc::new(FsCounters::default());
        counters
            .async_dio
            .store(negotiated.async_dio, Ordering::Relaxed);
        counters
            .max_write
            .store(negotiated.max_write, Ordering::Relaxed);
        let state = Arc::new(Resumed {
            volume: volume.clone(),
            runtime,
            uid: parent_meta.uid(),
            gid: parent_meta.gid(),
            started: SystemTime::now(),
            counters: Arc::clone(&counters),
            negotiated,
        });
        let mut threads = Vec::new();
        for (i, dev) in resume::files(&kept, options.threads)?
            .into_iter()
            .enumerate()
        {
            let state = Arc::clone(&state);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("slacker-fuse-{i}"))
                    .spawn(move || state.run(dev))?,
            );
        }
        let resent = resume::notify_resend(&std::fs::File::from(kept.try_clone()?));
        tracing::info!(mountpoint = %mountpoint.display(), resent, "FUSE session resumed");
        let connection = sys::device_minor(std::fs::metadata(&mountpoint)?.dev());
        Ok(Self {
            session: Some(Server::Resumed(threads)),
            kept,
            mountpoint,
            connection,
            volume,
            counters,
        })
    }

    /// A descriptor of the open `/dev/fuse` file this session serves, to hand to
    /// something that outlives this process (a keeper process, systemd's fd store).
    ///
    /// While any descriptor of that file is open, the kernel keeps the connection: if
    /// this process dies, requests wait (instead of failing with `EIO`) until a new
    /// process [`resume`](Self::resume)s on the kept descriptor. It is the same open
    /// file, not a `FUSE_DEV_IOC_CLONE` of it, on purpose: the kernel ends the requests
    /// a file has read but not answered (`ECONNABORTED`) when that file is released, so
    /// only a kept reference to the serving file itself keeps them for a resend.
    ///
    /// # Errors
    /// `dup` failing (out of descriptors).
    pub fn keep_fd(&self) -> io::Result<OwnedFd> {
        self.kept.try_clone()
    }

    /// What the kernel and this session agreed at `INIT`: store it next to the
    /// [`keep_fd`](Self::keep_fd) descriptor for [`resume`](Self::resume).
    pub fn negotiated(&self) -> Negotiated {
        Negotiated::new(
            self.counters.max_write.load(Ordering::Relaxed),
            self.counters.async_dio.load(Ordering::Relaxed),
        )
    }

    /// The directory the filesystem is mounted on.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// `<mountpoint>/disk.img`: the file to loop-mount.
    pub fn image_path(&self) -> PathBuf {
        self.mountpoint.join(IMAGE_NAME)
    }

    /// The volume served.
    pub fn volume(&self) -> &LazyVolume {
        &self.volume
    }

    /// The FUSE connection number (the directory under `/sys/fs/fuse/connections`).
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Requests served so far.
    pub fn stats(&self) -> FuseStats {
        FuseStats {
            reads: self.counters.reads.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
            fsyncs: self.counters.fsyncs.load(Ordering::Relaxed),
            peak_reads_in_flight: self.counters.peak_reads_in_flight.load(Ordering::Relaxed),
            async_dio: self.counters.async_dio.load(Ordering::Relaxed),
        }
    }

    /// Unmounts and waits for the serving threads to end.
    ///
    /// # Errors
    /// `EBUSY` while something (a loop device, an open file) still uses the mount; the
    /// threads are then left serving until the mount goes away.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        // `umount` with retries: a process forked elsewhere in this program may hold a
        // copy of an fd on the mount for a moment (until its exec closes it).
        if sys::is_mountpoint(&self.mountpoint) {
            sys::umount(&self.mountpoint)?;
        }
        match self.session.take() {
            // Unmounted: the event loops see ENODEV and return.
            Some(s) => s.join(),
            None => Ok(()),
        }
    }

    /// Ends the session abruptly, as if the serving process had died: aborts the kernel
    /// connection through fusectl (`/sys/fs/fuse/connections/N/abort`, mounting fusectl
    /// if needed) and lets the serving threads end. Requests fail from then on
    /// (`ENOTCONN`); the dead mount stays until [`stop`](Self::stop) or drop removes it
    /// (once nothing holds it: close open files and detach loop devices first).
    /// Acknowledged writes are already in the backend.
    ///
    /// # Errors
    /// fusectl unavailable.
    pub fn abort(&mut self) -> io::Result<()> {
        sys::fuse_abort(self.connection)?;
        if let Some(s) = self.session.take() {
            // The event loops see ENODEV and return; the dead mount stays.
            let _ = s.join();
        }
        Ok(())
    }
}

/// The tokio runtime a session's filesystem owns (it lives as long as the serving threads).
fn fs_runtime(options: &FuseOptions) -> io::Result<Arc<tokio::runtime::Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.runtime_threads.max(1))
            .thread_name("slacker-fuse-rt")
            .enable_all()
            .build()?,
    ))
}

impl Drop for FuseSession {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::error!(
                mountpoint = %self.mountpoint.display(),
                error = %e,
                "unmounting the FUSE file system failed; a loop device may still hold it"
            );
        }
    }
}
