//! The file behind a volume's loop device, for every backend.
//!
//! - A backend with a local file ([`Backend::local_path`], btrfs): that file.
//! - Any other backend (NFS): the volume opened as a [`LazyVolume`] over one
//!   [`BlockCache`] shared by every volume of the process, and served through FUSE
//!   ([`FuseSession`]) as `<root>/fuse/<volume>/disk.img`: one session per active or view
//!   volume, started when the volume is first handed out and stopped when it is committed
//!   or removed. Blocks are fetched from the storage on first read; writes are
//!   acknowledged only once the storage has them.
//!
//! **Restarts.** The path of a volume's file is a function of its name, so a restarted
//! process ([`DataPath::reserve`]) serves every active volume again at the same path:
//! `Mounts` answers what it answered before, and new mounts work. A loop device that a
//! running container's root filesystem sits on, however, holds the *old* FUSE file (the
//! kernel's open file of the dead connection); a new FUSE mount at the same path is a new
//! filesystem, and the kernel offers no way to hand a dead FUSE connection's open files
//! to a new daemon. Such a container sees IO errors until it is restarted; nothing
//! acknowledged is lost (it is on the storage, and a new mount of the same snapshot shows
//! it). The dead mount is detached lazily (`umount -l`) so the path can be served again.
//! The fix is to keep the connection from dying (a `FUSE_DEV_IOC_CLONE` descriptor held by
//! systemd's fd store or a keeper process, resumed without INIT, unanswered requests
//! replayed with `FUSE_NOTIFY_RESEND`): `docs/fuse-handover.md`, not built yet.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions, Metrics, MetricsRecorder};
use slacker_core::{Backend, VolumeId};
use slacker_fuse::{FuseOptions, FuseSession};
use tokio::sync::Mutex;

use crate::host;

/// Serves volumes as files (see the [module docs](self)).
pub struct DataPath {
    backend: Arc<dyn Backend>,
    local: bool,
    dir: PathBuf,
    cache: Arc<BlockCache>,
    recorder: Arc<MetricsRecorder>,
    sessions: Mutex<HashMap<String, FuseSession>>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("local", &self.local)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl DataPath {
    /// A data path on `backend`; FUSE mounts (if any) live under `dir`, the shared block
    /// cache holds at most `cache_bytes`.
    pub fn new(backend: Arc<dyn Backend>, dir: PathBuf, cache_bytes: u64) -> Self {
        let local = backend.info().capabilities.local_path;
        Self {
            backend,
            local,
            dir,
            cache: Arc::new(BlockCache::new(cache_bytes)),
            recorder: Arc::new(MetricsRecorder::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether volumes are local files (no FUSE).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// What the lazily served volumes fetched and found in the cache, so far.
    pub fn metrics(&self) -> Metrics {
        self.recorder.snapshot(self.cache.stats())
    }

    /// Where volume `vol`'s file is (served or not).
    pub fn fuse_image(&self, vol: &VolumeId) -> PathBuf {
        self.dir.join(vol.as_str()).join(slacker_fuse::IMAGE_NAME)
    }

    /// The file to loop-mount for `vol`, serving it through FUSE first if needed.
    ///
    /// # Errors
    /// Backend errors; the FUSE mount failing.
    pub async fn file(&self, vol: &VolumeId) -> io::Result<PathBuf> {
        if self.local {
            return self.backend.local_path(vol).await.map_err(other);
        }
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(vol.as_str()) {
            return Ok(s.image_path());
        }
        let mountpoint = self.dir.join(vol.as_str());
        let volume = LazyVolume::open(
            Arc::clone(&self.backend),
            vol.clone(),
            Arc::clone(&self.cache),
            LazyVolumeOptions::default().with_metrics(Arc::clone(&self.recorder)),
        )
        .await
        .map_err(other)?;
        let session = tokio::task::spawn_blocking(move || {
            detach_stale(&mountpoint)?;
            std::fs::create_dir_all(&mountpoint)?;
            FuseSession::start(volume, &mountpoint, &FuseOptions::default())
        })
        .await
        .map_err(other)??;
        let image = session.image_path();
        sessions.insert(vol.as_str().to_owned(), session);
        Ok(image)
    }

    /// Serves every volume of `vols` again (after a restart). A volume that fails is
    /// reported and skipped: `Mounts` of it tries again.
    pub async fn reserve(&self, vols: &[VolumeId]) {
        if self.local {
            return;
        }
        for v in vols {
            if let Err(e) = self.file(v).await {
                eprintln!("slacker-snapshotter: serving {v} again: {e}");
            }
        }
    }

    /// Whether `vol` is served, or its file still backs a loop device.
    pub async fn in_use(&self, vol: &VolumeId) -> bool {
        if self.local {
            return self
                .backend
                .local_path(vol)
                .await
                .is_ok_and(|f| !host::loop_devices_of(&f).is_empty());
        }
        self.sessions.lock().await.contains_key(vol.as_str())
    }

    /// Stops serving `vol` once no loop device holds its file (waiting up to 5 s for
    /// autoclear loop devices to go away after containerd's unmount). `Ok(false)` when
    /// something still holds it: the session stays (the volume must stay too).
    ///
    /// # Errors
    /// Unmounting failing for another reason.
    pub async fn release(&self, vol: &VolumeId) -> io::Result<bool> {
        if self.local {
            return Ok(true);
        }
        let mut sessions = self.sessions.lock().await;
        let Some(session) = sessions.remove(vol.as_str()) else {
            return Ok(true);
        };
        let (session, freed) = tokio::task::spawn_blocking(move || {
            let image = session.image_path();
            let t = Instant::now();
            while !host::loop_devices_of(&image).is_empty() {
                if t.elapsed() > Duration::from_secs(5) {
                    return (Some(session), Ok(false));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mountpoint = session.mountpoint().to_owned();
            let r = session.stop();
            let _ = std::fs::remove_dir(&mountpoint);
            (None, r.map(|()| true))
        })
        .await
        .map_err(other)?;
        if let Some(s) = session {
            sessions.insert(vol.as_str().to_owned(), s);
        }
        freed
    }

    /// Writes a fresh ext4 into the new, all-zero volume `vol`: `mkfs` on a local sparse
    /// file under `scratch`, then only the blocks that are not zero go to the storage
    /// (for a local file: `mkfs` in place).
    ///
    /// # Errors
    /// `mkfs`/`debugfs` failing; IO and backend errors.
    pub async fn make_empty_ext4(&self, vol: &VolumeId, scratch: &Path) -> io::Result<()> {
        if self.local {
            let file = self.backend.local_path(vol).await.map_err(other)?;
            return tokio::task::spawn_blocking(move || host::make_empty_ext4(&file))
                .await
                .map_err(other)?;
        }
        let size = self.backend.stat_volume(vol).await.map_err(other)?.size;
        let tmp = scratch.join(format!("base-{}.img", std::process::id()));
        let t = tmp.clone();
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::create(&t)?;
            f.set_len(size)?;
            drop(f);
            host::make_empty_ext4(&t)
        })
        .await
        .map_err(other)??;
        let res = async {
            let mut f = std::fs::File::open(&tmp)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let n = read_full(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                // One write per run of non-zero blocks.
                let blocks: Vec<bool> = buf[..n]
                    .chunks(4096)
                    .map(|b| b.iter().any(|&x| x != 0))
                    .collect();
                let mut i = 0;
                while i < blocks.len() {
                    if !blocks[i] {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < blocks.len() && blocks[i] {
                        i += 1;
                    }
                    let end = (i * 4096).min(n);
                    self.backend
                        .write_at(vol, off + (start as u64) * 4096, &buf[start * 4096..end])
                        .await
                        .map_err(other)?;
                }
                off += n as u64;
            }
            self.backend.flush(vol).await.map_err(other)
        }
        .await;
        let _ = std::fs::remove_file(&tmp);
        res
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Lazily unmounts whatever is mounted at `dir` (a dead FUSE mount of a previous run: a
/// plain unmount fails while a loop device holds it).
fn detach_stale(dir: &Path) -> io::Result<()> {
    if host::is_mount_point(dir) {
        host::run("umount", &["-l".as_ref(), dir.as_os_str()])?;
    }
    Ok(())
}
