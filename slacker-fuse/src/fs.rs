//! [`DiskImageFs`]: a FUSE filesystem with one file, `disk.img`, backed by a
//! [`LazyVolume`].

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use slacker_core::ErrorKind;
use slacker_core::worker::LazyVolume;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

/// The name of the one file the filesystem shows.
pub const IMAGE_NAME: &str = "disk.img";

const IMAGE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);
/// Largest FUSE write the kernel may send (loop with direct IO sends up to 1 MiB).
const MAX_WRITE: u32 = 1 << 20;

/// Requests the filesystem served, for tests and reports.
#[derive(Debug, Default)]
pub(crate) struct FsCounters {
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    /// Reads being served now, and the most seen at once.
    pub(crate) reads_in_flight: AtomicU64,
    pub(crate) peak_reads_in_flight: AtomicU64,
    /// Whether the kernel agreed to send direct IO asynchronously (`FUSE_ASYNC_DIO`).
    pub(crate) async_dio: std::sync::atomic::AtomicBool,
    /// The `max_write` agreed at `INIT`.
    pub(crate) max_write: std::sync::atomic::AtomicU32,
}

/// How the filesystem serves reads (from [`FuseOptions`](crate::FuseOptions)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Serving {
    /// Ask the kernel for `FUSE_ASYNC_DIO`.
    pub(crate) async_dio: bool,
    /// Reads served at once (each a task on the runtime); also the kernel's limit of
    /// background requests (async direct IO is sent as background requests).
    pub(crate) max_reads: usize,
}

/// The FUSE side of a [`FuseSession`](crate::FuseSession): `/disk.img`, whose bytes are
/// the volume's. Reads and writes go to the [`LazyVolume`]; a write is acknowledged to the
/// kernel only after the volume acknowledged it (after the backend's `write_at`), so what
/// a writer saw succeed survives the death of this process. `flush` (each `close`) and
/// `fsync` call the volume's `flush` (backend durability).
///
/// The file is opened in direct-IO mode: the kernel keeps no page cache of it (the ext4
/// mounted from it above the loop device has its own), and every read reaches the lazy
/// volume, where the fetched bytes are counted.
///
/// fuser calls these methods on its own threads (blocking is allowed there). A read is
/// handed to a task on the tokio runtime the session owns, which replies when the volume
/// returns, so the thread goes back to the kernel for the next request at once: reads
/// the kernel sends together (the loop device's requests, with `FUSE_ASYNC_DIO`; several
/// processes) become concurrent volume reads, at most [`Serving::max_reads`] at a time
/// (the thread waits for a slot: back-pressure on the kernel). The volume coalesces and
/// single-flights their misses. Writes, `flush` and `fsync` `block_on` the volume call
/// on the thread, so a write is acknowledged only after the backend's `write_at`.
pub(crate) struct DiskImageFs {
    volume: LazyVolume,
    runtime: Arc<Runtime>,
    uid: u32,
    gid: u32,
    started: SystemTime,
    counters: Arc<FsCounters>,
    serving: Serving,
    read_slots: Arc<Semaphore>,
}

/// Ends one read's count in [`FsCounters::reads_in_flight`] when dropped.
struct ReadInFlight(Arc<FsCounters>);

impl ReadInFlight {
    fn start(counters: &Arc<FsCounters>) -> Self {
        let now = counters.reads_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        counters
            .peak_reads_in_flight
            .fetch_max(now, Ordering::Relaxed);
        Self(Arc::clone(counters))
    }
}

impl Drop for ReadInFlight {
    fn drop(&mut self) {
        self.0.reads_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DiskImageFs {
    pub(crate) fn new(
        volume: LazyVolume,
        runtime: Arc<Runtime>,
        uid: u32,
        gid: u32,
        counters: Arc<FsCounters>,
        serving: Serving,
    ) -> Self {
        let serving = Serving {
            max_reads: serving.max_reads.max(1),
            ..serving
        };
        Self {
            volume,
            runtime,
            uid,
            gid,
            started: SystemTime::now(),
            counters,
            read_slots: Arc::new(Semaphore::new(serving.max_reads)),
            serving,
        }
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, size, perm, nlink) = if ino == IMAGE_INO {
            let perm = if self.volume.is_read_only() {
                0o444
            } else {
                0o644
            };
            (FileType::RegularFile, self.volume.size(), perm, 1)
        } else {
            (FileType::Directory, 0, 0o755, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: self.volume.block_size().get(),
        }
    }
}

fn errno(e: &slacker_core::Error) -> Errno {
    match e.kind() {
        ErrorKind::OutOfRange => Errno::EINVAL,
        ErrorKind::InvalidInput => Errno::EROFS,
        _ => Errno::EIO,
    }
}

impl fuser::Filesystem for DiskImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Accept the nearest value the kernel allows.
        let max_write = match config.set_max_write(MAX_WRITE) {
            Ok(_) => MAX_WRITE,
            Err(nearest) => {
                let _ = config.set_max_write(nearest);
                nearest
            }
        };
        self.counters.max_write.store(max_write, Ordering::Relaxed);
        // The loop device (direct IO) submits its requests as async kiocbs. Without
        // FUSE_ASYNC_DIO the kernel turns each into a synchronous FUSE read, and the loop
        // worker waits for it before taking the next request: one demand miss at a time,
        // whatever the number of serving threads. With it, the requests reach us together
        // (as background requests, bounded by max_background).
        if self.serving.async_dio && config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_ok() {
            self.counters.async_dio.store(true, Ordering::Relaxed);
        }
        let background = u16::try_from(self.serving.max_reads).unwrap_or(u16::MAX);
        let _ = config.set_max_background(background.max(1));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == IMAGE_NAME {
            reply.entry(&TTL, &self.attr(IMAGE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == IMAGE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != IMAGE_INO && ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
        } else if size.is_some_and(|s| s != self.volume.size()) {
            // A disk image has a fixed size (O_TRUNC of an open for writing included).
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&TTL, &self.attr(ino));
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let writing = flags.acc_mode() != fuser::OpenAccMode::O_RDONLY;
        if writing && self.volume.is_read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMAGE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let end = self.volume.size();
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let len = u64::from(size).min(end - offset) as usize;
        // Wait for a slot here (back-pressure), then serve on the runtime and go back to
        // the kernel for the next request.
        let Ok(slot) = self.block_on(Arc::clone(&self.read_slots).acquire_owned()) else {
            reply.error(Errno::EIO);
            return;
        };
        let in_flight = ReadInFlight::start(&self.counters);
        let volume = self.volume.clone();
        self.runtime.spawn(async move {
            let result = volume.read_at(offset, len).await;
            drop((slot, in_flight));
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != IMAGE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if offset.saturating_add(data.len() as u64) > self.volume.size() {
            reply.error(Errno::ENOSPC);
            return;
        }
        // Acknowledged only after the backend's write_at returned.
        match self.block_on(self.volume.write_at(offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.block_on(self.volume.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match self.block_on(self.volume.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
