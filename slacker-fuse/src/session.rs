//! [`FuseSession`]: a [`LazyVolume`] served as `<mountpoint>/disk.img`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{Config, MountOption};
use serde::Serialize;
use slacker_core::worker::LazyVolume;

use crate::fs::{DiskImageFs, FsCounters, IMAGE_NAME, Serving};
use crate::sys;

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
pub struct FuseSession {
    session: Option<fuser::BackgroundSession>,
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
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(options.runtime_threads.max(1))
                .thread_name("slacker-fuse-rt")
                .enable_all()
                .build()?,
        );
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
        config.clone_fd = options.threads > 1;
        let session = fuser::spawn_mount(fs, &mountpoint, &config)?;
        let connection = sys::device_minor(std::fs::metadata(&mountpoint)?.dev());
        Ok(Self {
            session: Some(session),
            mountpoint,
            connection,
            volume,
            counters,
        })
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
