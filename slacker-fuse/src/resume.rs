//! Serving an already-initialised FUSE connection (a kept `/dev/fuse` descriptor) without
//! `INIT`: the request loop of [`FuseSession::resume`](crate::FuseSession::resume).
//!
//! `fuser` answers every request before `INIT` with `EIO`, and the kernel never sends a
//! second `INIT` on a connection, so a new process cannot serve a kept connection through
//! fuser. The single-file filesystem needs few operations; this loop speaks them directly
//! (Linux FUSE ABI 7.x, `include/uapi/linux/fuse.h`): `LOOKUP`, `FORGET`/`BATCH_FORGET`,
//! `GETATTR`, `SETATTR`, `OPEN`, `READ`, `WRITE`, `STATFS`, `RELEASE`, `FSYNC`, `FLUSH`,
//! `OPENDIR`, `READDIR`, `RELEASEDIR`, `INTERRUPT`, `DESTROY`; anything else gets `ENOSYS`.
//! Node ids are the same constants as the fuser filesystem's (root 1, `disk.img` 2) and
//! any file handle is accepted (handles are not used), so the kernel's state from the old
//! daemon stays valid.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use slacker_core::ErrorKind;
use slacker_core::worker::LazyVolume;
use tokio::runtime::Runtime;

use crate::fs::{FsCounters, IMAGE_NAME};

/// What the kernel and the first daemon agreed on at `INIT`, stored next to a kept
/// descriptor so that a resumed session serves the connection with the same limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Negotiated {
    /// Largest write the kernel sends (`max_write`).
    pub max_write: u32,
    /// Whether `FUSE_ASYNC_DIO` was agreed.
    pub async_dio: bool,
}

impl Negotiated {
    /// Parameters as agreed at `INIT` (for a descriptor kept elsewhere, e.g. in a
    /// keeper process's record).
    pub fn new(max_write: u32, async_dio: bool) -> Self {
        Self {
            max_write,
            async_dio,
        }
    }
}

const ROOT_ID: u64 = 1;
const IMAGE_ID: u64 = 2;
const TTL_SECS: u64 = 3600;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel puts every request read but not answered
/// back on the pending queue.
const NOTIFY_RESEND: i32 = 7;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EINVAL: i32 = 22;
const EISDIR: i32 = 21;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const ENOSYS: i32 = 38;
const ENODEV: i32 = 19;

/// Asks the kernel to resend the requests the previous daemon read but never answered.
/// Returns whether the kernel accepted it (it does from Linux 6.9).
pub(crate) fn notify_resend(dev: &File) -> bool {
    let mut msg = Vec::with_capacity(OUT_HEADER);
    msg.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    msg.extend_from_slice(&NOTIFY_RESEND.to_le_bytes());
    msg.extend_from_slice(&0u64.to_le_bytes());
    (&*dev).write(&msg).is_ok()
}

/// The state a resumed serving thread needs.
pub(crate) struct Resumed {
    pub(crate) volume: LazyVolume,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) started: SystemTime,
    pub(crate) counters: Arc<FsCounters>,
    pub(crate) negotiated: Negotiated,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn errno(e: &slacker_core::Error) -> i32 {
    match e.kind() {
        ErrorKind::OutOfRange => EINVAL,
        ErrorKind::InvalidInput => EROFS,
        _ => EIO,
    }
}

impl Resumed {
    /// `struct fuse_attr` (88 bytes).
    fn attr(&self, id: u64, out: &mut Vec<u8>) {
        let (size, mode, nlink) = if id == IMAGE_ID {
            let perm = if self.volume.is_read_only() {
                0o444
            } else {
                0o644
            };
            (self.volume.size(), 0o100_000 | perm, 1u32)
        } else {
            (0, 0o040_000 | 0o755, 2)
        };
        let t = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        for v in [
            id,
            size,
            size.div_ceil(512),
            t.as_secs(),
            t.as_secs(),
            t.as_secs(),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let ns = t.subsec_nanos();
        for v in [
            ns,
            ns,
            ns,
            mode,
            nlink,
            self.uid,
            self.gid,
            0,
            self.volume.block_size().get(),
            0,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// `struct fuse_entry_out` for `disk.img`.
    fn entry(&self, out: &mut Vec<u8>) {
        for v in [IMAGE_ID, 0, TTL_SECS, TTL_SECS] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0; 8]);
        self.attr(IMAGE_ID, out);
    }

    /// `struct fuse_attr_out`.
    fn attr_out(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&TTL_SECS.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        self.attr(id, out);
    }

    /// Serves one request: `Ok(None)` when no reply is due, else the error (negative
    /// errno in the header) and the reply body.
    fn serve(&self, opcode: u32, node: u64, arg: &[u8]) -> Option<(i32, Vec<u8>)> {
        let mut out = Vec::new();
        let err = match opcode {
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => return None,
            op::LOOKUP => {
                let name = arg.split(|b| *b == 0).next().unwrap_or_default();
                if node == ROOT_ID && name == IMAGE_NAME.as_bytes() {
                    self.entry(&mut out);
                    0
                } else {
                    ENOENT
                }
            }
            op::GETATTR => self.known(node, || self.attr_out(node, &mut out)),
            op::SETATTR => {
                // fuse_setattr_in: valid u32, padding u32, fh u64, size u64, ...
                const FATTR_SIZE: u32 = 1 << 3;
                if u32_at(arg, 0) & FATTR_SIZE != 0 && u64_at(arg, 16) != self.volume.size() {
                    EINVAL
                } else {
                    self.known(node, || self.attr_out(node, &mut out))
                }
            }
            op::OPEN => {
                const O_ACCMODE: u32 = 3;
                if node != IMAGE_ID {
                    EISDIR
                } else if u32_at(arg, 0) & O_ACCMODE != 0 && self.volume.is_read_only() {
                    EROFS
                } else {
                    // fuse_open_out: fh, open_flags (FOPEN_DIRECT_IO), padding.
                    out.extend_from_slice(&0u64.to_le_bytes());
                    out.extend_from_slice(&1u32.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes());
                    0
                }
            }
            op::OPENDIR | op::RELEASEDIR | op::RELEASE => {
                if opcode == op::OPENDIR {
                    out.extend_from_slice(&[0; 16]);
                }
                0
            }
            op::READDIR => {
                // fuse_read_in: fh, offset, size, ...
                let offset = u64_at(arg, 8);
                let size = u32_at(arg, 16) as usize;
                let entries: [(u64, u32, &[u8]); 3] = [
                    (ROOT_ID, 4, b"."),
                    (ROOT_ID, 4, b".."),
                    (IMAGE_ID, 8, IMAGE_NAME.as_bytes()),
                ];
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    let len = (24 + name.len()).next_multiple_of(8);
                    if out.len() + len > size {
                        break;
                    }
                    out.extend_from_slice(&ino.to_le_bytes());
                    out.extend_from_slice(&(i as u64 + 1).to_le_bytes());
                    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                    out.extend_from_slice(&kind.to_le_bytes());
                    out.extend_from_slice(name);
                    out.resize(out.len() + len - 24 - name.len(), 0);
                }
                0
            }
            op::READ => {
                if node != IMAGE_ID {
                    EISDIR
                } else {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    let offset = u64_at(arg, 8);
                    let end = self.volume.size();
                    let len = u64::from(u32_at(arg, 16)).min(end.saturating_sub(offset)) as usize;
                    if len == 0 {
                        0
                    } else {
                        match self.runtime.block_on(self.volume.read_at(offset, len)) {
                            Ok(data) => {
                                out.extend_from_slice(&data);
                                0
                            }
                            Err(e) => errno(&e),
                        }
                    }
                }
            }
            op::WRITE => {
                // fuse_write_in (40 bytes): fh, offset, size, write_flags, lock_owner,
                // flags, padding; then the data.
                let offset = u64_at(arg, 8);
                let size = u32_at(arg, 16) as usize;
                let data = arg.get(40..40 + size);
                if node != IMAGE_ID {
                    EISDIR
                } else if let Some(data) = data {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                    if offset.saturating_add(size as u64) > self.volume.size() {
                        ENOSPC
                    } else {
                        match self.runtime.block_on(self.volume.write_at(offset, data)) {
                            Ok(()) => {
                                out.extend_from_slice(&(size as u32).to_le_bytes());
                                out.extend_from_slice(&0u32.to_le_bytes());
                                0
                            }
                            Err(e) => errno(&e),
                        }
                    }
                } else {
                    EINVAL
                }
            }
            op::FLUSH | op::FSYNC => {
                if opcode == op::FSYNC {
                    self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                match self.runtime.block_on(self.volume.flush()) {
                    Ok(()) => 0,
                    Err(e) => errno(&e),
                }
            }
            op::STATFS => {
                // fuse_kstatfs: blocks, bfree, bavail, files, ffree (u64); bsize,
                // namelen, frsize, padding, spare[6] (u32).
                let bsize = u64::from(self.volume.block_size().get());
                for v in [self.volume.size() / bsize, 0, 0, 2, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [bsize as u32, 255, bsize as u32, 0, 0, 0, 0, 0, 0, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                0
            }
            op::DESTROY => 0,
            // A connection is initialised once; a resumed session never sees INIT.
            op::INIT => EIO,
            _ => ENOSYS,
        };
        Some((err, if err == 0 { out } else { Vec::new() }))
    }

    fn known(&self, node: u64, f: impl FnOnce()) -> i32 {
        if node == ROOT_ID || node == IMAGE_ID {
            f();
            0
        } else {
            ENOENT
        }
    }

    /// One serving thread: reads requests from `dev` until the connection goes away
    /// (`ENODEV`: unmounted or aborted).
    pub(crate) fn run(self: Arc<Self>, dev: File) -> io::Result<()> {
        // A request is at most a header, a fuse_write_in and max_write bytes; the kernel
        // wants room for at least 8 KiB.
        let cap = (self.negotiated.max_write as usize).max(1 << 20) + 64 * 1024;
        let mut buf = vec![0u8; cap];
        loop {
            let n = match (&dev).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(ENODEV) => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) || e.raw_os_error() == Some(ENOENT) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n < IN_HEADER {
                continue;
            }
            let req = &buf[..n];
            let opcode = u32_at(req, 4);
            let unique = u64_at(req, 8);
            let node = u64_at(req, 16);
            let Some((err, body)) = self.serve(opcode, node, &req[IN_HEADER..]) else {
                continue;
            };
            let mut reply = Vec::with_capacity(OUT_HEADER + body.len());
            reply.extend_from_slice(&((OUT_HEADER + body.len()) as u32).to_le_bytes());
            reply.extend_from_slice(&(-err).to_le_bytes());
            reply.extend_from_slice(&unique.to_le_bytes());
            reply.extend_from_slice(&body);
            match (&dev).write(&reply) {
                Ok(_) => {}
                // ENOENT: the request was interrupted meanwhile.
                Err(e) if e.raw_os_error() == Some(ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(ENODEV) => return Ok(()),
                Err(e) => tracing::warn!(error = %e, opcode, "FUSE reply failed"),
            }
            if opcode == op::DESTROY {
                return Ok(());
            }
        }
    }
}

/// Duplicates `fd` into a `File` per serving thread (all on the same open file: its
/// unanswered requests survive the death of any one holder, see `FuseSession::keep_fd`).
pub(crate) fn files(fd: &OwnedFd, n: usize) -> io::Result<Vec<File>> {
    (0..n.max(1))
        .map(|_| fd.try_clone().map(File::from))
        .collect()
}

#[cfg(test)]
mod tests {
    //! The handover across an abrupt death of the serving process: a child process (this
    //! test binary again) mounts and serves a volume with fuser; the test takes a
    //! descriptor of its `/dev/fuse` file (`pidfd_getfd`, as a keeper would receive
    //! it), kills the child with SIGKILL, and resumes on the kept descriptor. Root only;
    //! `SKIPPED` otherwise, a failure under `CI=true`.
    use std::os::unix::fs::FileExt;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::time::Duration;

    use slacker_backend_mem::MemBackend;
    use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions, LinkProfile, Throttled};
    use slacker_core::{Backend, BackendExt, VolumeId};

    use crate::{FuseOptions, FuseSession, Negotiated};

    const CHILD_ENV: &str = "SLACKER_FUSE_RESUME_CHILD";
    const SIZE: usize = 8 << 20;

    fn content() -> Vec<u8> {
        (0..SIZE).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A mem-backend clone of a snapshot holding [`content`]: the same bytes in the
    /// child and in the test (a mem backend lives in one process).
    /// `latency`: each backend call of the child waits that long, so that a read is
    /// still in flight when the child is killed.
    fn volume(
        rt: &tokio::runtime::Runtime,
        latency: Duration,
    ) -> (Arc<dyn Backend>, VolumeId, LazyVolume) {
        let backend: Arc<dyn Backend> = Arc::new(Throttled::new(
            MemBackend::new(),
            LinkProfile::latency_only(latency),
        ));
        let img = VolumeId::new("img").unwrap();
        let c = VolumeId::new("c").unwrap();
        let v = rt.block_on(async {
            backend.create_volume_with(&img, &content()).await.unwrap();
            let s = backend.snapshot(&img).await.unwrap();
            backend.clone_snapshot(&s, &c).await.unwrap();
            LazyVolume::open(
                backend.clone(),
                c.clone(),
                Arc::new(BlockCache::new(1 << 20)),
                LazyVolumeOptions::default(),
            )
            .await
            .unwrap()
        });
        (backend, c, v)
    }

    /// The child: serves the volume at `$SLACKER_FUSE_RESUME_CHILD` until killed.
    #[test]
    fn resume_child_serves_until_killed() {
        let Ok(mnt) = std::env::var(CHILD_ENV) else {
            return; // only as the child of the test below
        };
        let rt = rt();
        let (_backend, _id, v) = volume(&rt, Duration::from_millis(400));
        let s = FuseSession::start(v, &mnt, &FuseOptions::default()).unwrap();
        let n = s.negotiated();
        // A duplicate that lives as long as this process, for pidfd_getfd.
        let kept = s.keep_fd().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&kept);
        let ready = format!(
            "READY {} {} {} {}\n",
            std::process::id(),
            fd,
            n.max_write,
            n.async_dio
        );
        std::fs::write(format!("{mnt}.ready"), ready).unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    fn reader_again(file: &std::fs::File) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        file.read_exact_at(&mut b, 8192).unwrap();
        b
    }

    fn ready() -> Option<()> {
        // Root: the effective uid in /proc/self/status.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0");
        if !root {
            return slacker_testkit::skip_or_fail("the FUSE resume test needs root");
        }
        if !std::path::Path::new("/dev/fuse").exists() {
            return slacker_testkit::skip_or_fail("/dev/fuse is missing");
        }
        Some(())
    }

    #[test]
    fn a_kept_connection_is_resumed_after_sigkill_of_the_server() {
        if ready().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("fuse");
        std::fs::create_dir(&mnt).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "resume::tests::resume_child_serves_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &mnt)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let ready = dir.path().join("fuse.ready");
        let mut line = String::new();
        for _ in 0..600 {
            line = std::fs::read_to_string(&ready).unwrap_or_default();
            if line.ends_with('\n') || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            line.starts_with("READY "),
            "the child does not serve: {line:?}"
        );
        let f: Vec<&str> = line.split_whitespace().collect();
        let (pid, fd): (u32, i32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        let negotiated = Negotiated::new(f[3].parse().unwrap(), f[4].parse().unwrap());
        assert!(negotiated.max_write >= 4096, "{negotiated:?}");
        // What a keeper holds: the child's serving file, received from outside it.
        let kept = crate::sys::pidfd_getfd(pid, fd).unwrap();

        let expected = content();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join(crate::IMAGE_NAME))
            .unwrap();
        let mut buf = vec![0u8; 8192];
        file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, expected[4096..4096 + 8192]);
        file.write_all_at(b"child", 0).unwrap();

        // A read the child has taken from the kernel but not answered when it dies (its
        // backend answers after 400 ms): the resumed session gets it resent.
        let in_flight = {
            let file = file.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 65536];
                file.read_exact_at(&mut b, 5 << 20).map(|()| b)
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        assert!(!in_flight.is_finished());

        // The serving process dies abruptly (its own descriptors close; ours stays).
        child.kill().unwrap();
        child.wait().unwrap();

        // A reader while nobody serves: it waits instead of failing.
        let reader = {
            let file = file.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                file.read_exact_at(&mut b, 3 << 20).map(|()| b)
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !reader.is_finished(),
            "a read failed while the server was down"
        );

        // A new "process": a fresh volume handle (the same bytes) on the kept connection.
        let rt = rt();
        let (backend, id, v) = volume(&rt, Duration::ZERO);
        let s = FuseSession::resume(kept, negotiated, v, &mnt, &FuseOptions::default()).unwrap();
        let got = reader.join().unwrap().expect("the waiting read is served");
        assert_eq!(got, expected[3 << 20..(3 << 20) + 4096]);
        let got = in_flight
            .join()
            .unwrap()
            .expect("the read in flight at the kill is resent and served");
        assert_eq!(got, expected[5 << 20..(5 << 20) + 65536]);
        let got = reader_again(&file);
        assert_eq!(got, expected[8192..8192 + 4096]);
        // The old open file keeps reading and writing.
        let mut all = vec![0u8; SIZE];
        file.read_exact_at(&mut all, 0).unwrap();
        assert!(
            all[5..] == expected[5..],
            "data read after the resume differs"
        );
        let data = vec![7u8; 70_000];
        file.write_all_at(&data, (1 << 20) + 17).unwrap();
        file.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, (1 << 20) + 17).unwrap();
        assert_eq!(back, data);
        assert!(
            s.stats().writes >= 1 && s.stats().fsyncs >= 1,
            "{:?}",
            s.stats()
        );
        // A new open, a stat and a directory listing work too.
        assert_eq!(
            std::fs::metadata(mnt.join(crate::IMAGE_NAME))
                .unwrap()
                .len(),
            SIZE as u64
        );
        let names: Vec<_> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [crate::IMAGE_NAME]);
        drop(file);
        s.stop().unwrap();
        let vol = rt.block_on(backend.read_volume(&id)).unwrap();
        assert_eq!(&vol[(1 << 20) + 17..(1 << 20) + 17 + data.len()], &data[..]);
        assert!(!crate::sys::is_mountpoint(&mnt));
    }
}
