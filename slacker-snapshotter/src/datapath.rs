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
//! running container's root filesystem sits on holds the kernel's open file of the FUSE
//! connection it was made on, so that connection must not die with the process: every
//! session's serving `/dev/fuse` file is handed to a [keeper process](crate::keeper)
//! ([`DataPath::with_keeper`], config `fd_keeper`) as soon as the session starts. After a
//! crash (kill -9) the kernel keeps the connection while the keeper holds the file: the
//! container's requests wait instead of failing. The restarted process asks the keeper
//! for what it holds, resumes the connection of every volume that is still active
//! ([`FuseSession::resume`]: no `INIT`, then `FUSE_NOTIFY_RESEND` so that the requests
//! the dead process had read but not answered are served too) and tells it to close the
//! rest (that aborts those connections). A resumed session is stopped, unmounted and
//! released like any other. Nothing acknowledged is ever lost: writes are acknowledged
//! only once the storage has them.
//!
//! Without a keeper (`fd_keeper = "off"`, an embedding program that names none, the keeper
//! killed), the connection dies with the process; a new FUSE mount at the same path is a
//! new filesystem, and a container on the old one sees IO errors until it is restarted.
//! The dead mount is detached lazily (`umount -l`) so the path can be served again. On a
//! kernel before 6.9 (no `FUSE_NOTIFY_RESEND`) the few requests in flight at the crash
//! stay unanswered (their callers hang); every later request is served.
//! `docs/fuse-handover.md` has the design.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions, Metrics, MetricsRecorder};
use slacker_core::{Backend, VolumeId};
use slacker_fuse::{FuseOptions, FuseSession, Negotiated};
use tokio::sync::Mutex;

use crate::host;
use crate::keeper::{KeeperClient, KeeperError, Kept};

/// The keeper a data path hands its sessions' files to (see the [module docs](self)).
#[derive(Debug)]
struct Keeper {
    socket: PathBuf,
    program: PathBuf,
    client: std::sync::Mutex<Option<KeeperClient>>,
}

impl Keeper {
    /// Runs `f` on the connection, connecting (and starting a keeper) first if there is
    /// none; after a failure, once more on a new connection. The flag says whether the
    /// call went to a new connection (possibly a new keeper, which holds nothing yet).
    /// Blocking.
    fn call<T>(
        &self,
        f: impl Fn(&KeeperClient) -> Result<T, KeeperError>,
    ) -> Result<(T, bool), KeeperError> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = client.as_ref() {
            match f(c) {
                Ok(v) => return Ok((v, false)),
                Err(e) => {
                    tracing::warn!(error = %e, "fd keeper: the call failed; connecting again");
                    *client = None;
                }
            }
        }
        let c = KeeperClient::connect_or_start(&self.socket, &self.program)?;
        let r = f(&c);
        *client = Some(c);
        r.map(|v| (v, true))
    }
}

/// Serves volumes as files (see the [module docs](self)).
pub struct DataPath {
    backend: Arc<dyn Backend>,
    local: bool,
    dir: PathBuf,
    cache: Arc<BlockCache>,
    recorder: Arc<MetricsRecorder>,
    sessions: Mutex<HashMap<String, FuseSession>>,
    keeper: Option<Arc<Keeper>>,
}

/// A session's kept file, as the keeper gets it.
fn kept_of(name: &str, s: &FuseSession) -> io::Result<(String, Negotiated, OwnedFd)> {
    Ok((name.to_owned(), s.negotiated(), s.keep_fd()?))
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("local", &self.local)
            .field("dir", &self.dir)
            .field("keeper", &self.keeper.as_ref().map(|k| &k.socket))
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
            keeper: None,
        }
    }

    /// Hands every FUSE session's serving file to the keeper at `socket`, started as
    /// `program --fd-keeper socket` when none answers there (see the [module docs](self)).
    /// No effect on a backend with local files (no FUSE: nothing to keep).
    pub fn with_keeper(mut self, socket: PathBuf, program: PathBuf) -> Self {
        if !self.local {
            self.keeper = Some(Arc::new(Keeper {
                socket,
                program,
                client: std::sync::Mutex::new(None),
            }));
        }
        self
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
        let volume = self.open_volume(vol).await?;
        let session = tokio::task::spawn_blocking(move || {
            detach_stale(&mountpoint)?;
            std::fs::create_dir_all(&mountpoint)?;
            FuseSession::start(volume, &mountpoint, &FuseOptions::default())
        })
        .await
        .map_err(other)??;
        if let Some(k) = &self.keeper {
            let mine = kept_of(vol.as_str(), &session)?;
            let k1 = Arc::clone(k);
            let fresh = tokio::task::spawn_blocking(move || {
                let (name, negotiated, fd) = &mine;
                k1.call(|c| c.keep(name, *negotiated, fd.as_fd()))
                    .map(|((), fresh)| fresh)
            })
            .await
            .map_err(other)?;
            match fresh {
                // A new connection, maybe a new keeper (the old one killed): it gets every
                // other session's file too.
                Ok(true) if !sessions.is_empty() => {
                    let others = sessions
                        .iter()
                        .map(|(v, s)| kept_of(v, s))
                        .collect::<io::Result<Vec<_>>>()?;
                    let k = Arc::clone(k);
                    let r = tokio::task::spawn_blocking(move || {
                        others.iter().try_for_each(|(v, n, fd)| {
                            k.call(|c| c.keep(v, *n, fd.as_fd())).map(drop)
                        })
                    })
                    .await
                    .map_err(other)?;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "fd keeper: handing it the other sessions failed");
                    }
                }
                Ok(_) => {}
                // Without it the session still serves; only a crash would break it.
                Err(e) => {
                    tracing::warn!(volume = %vol, error = %e, "fd keeper: the FUSE connection is not kept; a crash of this process would break its container's IO")
                }
            }
        }
        let image = session.image_path();
        sessions.insert(vol.as_str().to_owned(), session);
        Ok(image)
    }

    async fn open_volume(&self, vol: &VolumeId) -> io::Result<LazyVolume> {
        LazyVolume::open(
            Arc::clone(&self.backend),
            vol.clone(),
            Arc::clone(&self.cache),
            LazyVolumeOptions::default().with_metrics(Arc::clone(&self.recorder)),
        )
        .await
        .map_err(other)
    }

    /// Resumes the kept connection `kept` of active volume `vol` (its mount still there).
    async fn resume(&self, vol: &VolumeId, kept: Kept) -> io::Result<()> {
        let mut sessions = self.sessions.lock().await;
        let mountpoint = self.dir.join(vol.as_str());
        let volume = self.open_volume(vol).await?;
        let Kept { negotiated, fd, .. } = kept;
        let session = tokio::task::spawn_blocking(move || {
            FuseSession::resume(fd, negotiated, volume, &mountpoint, &FuseOptions::default())
        })
        .await
        .map_err(other)??;
        sessions.insert(vol.as_str().to_owned(), session);
        Ok(())
    }

    /// Tells the keeper (if any) to close what it holds for `vol`. Blocking.
    fn forget(keeper: Option<&Keeper>, vol: &str) {
        let Some(k) = keeper else {
            return;
        };
        if let Err(e) = k.call(|c| c.forget(vol)) {
            tracing::warn!(volume = %vol, error = %e, "fd keeper: forgetting a connection failed (it closes it itself once the connection ends)");
        }
    }

    /// Serves every volume of `vols` (the active and view volumes) again after a
    /// restart: the keeper's connection of each, resumed, where it holds one; else a new
    /// FUSE session (over a lazily detached dead mount). The keeper's connections of
    /// other volumes are closed (aborted) and their mounts detached lazily. A volume that
    /// fails is reported and skipped: `Mounts` of it tries again.
    pub async fn reserve(&self, vols: &[VolumeId]) {
        if self.local {
            return;
        }
        if let Some(k) = &self.keeper {
            let k2 = Arc::clone(k);
            let listed = tokio::task::spawn_blocking(move || k2.call(|c| c.list())).await;
            let kept = match listed {
                Ok(Ok((kept, _))) => kept,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "fd keeper: nothing to resume");
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fd keeper: nothing to resume");
                    Vec::new()
                }
            };
            for kept in kept {
                let name = kept.volume.clone();
                let active = vols.iter().find(|v| v.as_str() == name);
                let resumed = match active {
                    Some(v) => match self.resume(v, kept).await {
                        Ok(()) => {
                            tracing::info!(volume = %name, "FUSE connection resumed from the fd keeper");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(volume = %name, error = %e, "resuming the kept FUSE connection failed; serving it anew");
                            false
                        }
                    },
                    None => false,
                };
                if !resumed {
                    let k = Arc::clone(k);
                    // Not an active volume (removed while still mounted): its dead mount
                    // is detached too, as `file` detaches an active volume's.
                    let stale = active.is_none().then(|| self.dir.join(&name));
                    let r = tokio::task::spawn_blocking(move || {
                        Self::forget(Some(&k), &name);
                        match stale {
                            Some(mp) => detach_stale(&mp).and_then(|()| {
                                std::fs::remove_dir(&mp).or_else(|e| match e.kind() {
                                    io::ErrorKind::NotFound => Ok(()),
                                    _ => Err(e),
                                })
                            }),
                            None => Ok(()),
                        }
                    })
                    .await;
                    if let Ok(Err(e)) = r {
                        tracing::warn!(error = %e, "detaching the mount of a volume no longer served");
                    }
                }
            }
        }
        for v in vols {
            if let Err(e) = self.file(v).await {
                tracing::warn!(volume = %v, error = %e, "serving the volume again failed");
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
        let keeper = self.keeper.clone();
        let name = vol.as_str().to_owned();
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
            if r.is_ok() {
                // Unmounted: the connection is gone; the keeper's file of it goes too.
                Self::forget(keeper.as_deref(), &name);
            }
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
