//! `slacker run`: a writable layer cloned from the image's top layer, its ext4
//! loop-mounted (root), `/proc` and `/dev` inside, and the command run with the image's
//! Env, WorkingDir and User through util-linux `unshare --root --wd --setuid --setgid`
//! (no `unsafe` here: the chroot, chdir and id changes happen in that helper). Everything
//! is torn down and the layer removed when the command exits.
//!
//! The clone reaches the loop device by [`slacker_fuse::Mount::for_volume`]'s route: on a
//! backend with local volume files (btrfs) directly; otherwise (NFS, RBD) as a
//! [`LazyVolume`](slacker_core::worker::LazyVolume) served through FUSE, so blocks are
//! fetched from shared storage as the container reads them, each verified against the
//! layer's Merkle root when it has one (the worker data path HelloBench's slacker-lazy
//! path measures).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use slacker_core::merkle::MerkleVerifier;
use slacker_core::worker::{BlockCache, LazyVolumeOptions};
use slacker_core::{BlockSize, Error, Result};
use slacker_fuse::{Mount, MountOptions};

use crate::Ctx;

/// Block cache of a lazily read clone (FUSE route only): the run's working set.
const RUN_CACHE_BYTES: u64 = 256 << 20;

/// Mount points to unmount, innermost last.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], src: &Path, dst: &Path) -> Result<()> {
        let out = Command::new("mount")
            .args(args)
            .arg(src)
            .arg(dst)
            .output()
            .map_err(|e| Error::Config(format!("mount: {e}")))?;
        if !out.status.success() {
            return Err(Error::backend(
                "run",
                format!(
                    "mount {args:?} {} {}: {}",
                    src.display(),
                    dst.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        self.0.push(dst.to_path_buf());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(m) = self.0.pop() {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

/// Resolves `user[:group]` (names or numbers) against the image's `/etc/passwd` and
/// `/etc/group`.
fn resolve_user(root: &Path, spec: &str) -> Result<(u32, u32)> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let table = |file: &str| -> Vec<Vec<String>> {
        std::fs::read_to_string(root.join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect()
    };
    let passwd = table("etc/passwd");
    let (uid, primary) = match user.parse::<u32>() {
        Ok(u) => (
            u,
            passwd
                .iter()
                .find(|f| f.get(2).is_some_and(|x| x == user))
                .and_then(|f| f.get(3)?.parse().ok())
                .unwrap_or(u),
        ),
        Err(_) => {
            let f = passwd
                .iter()
                .find(|f| f.first().is_some_and(|n| n == user))
                .ok_or_else(|| {
                    Error::invalid(format!("user {user} is not in the image's /etc/passwd"))
                })?;
            let num = |i: usize| -> Result<u32> {
                f.get(i)
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| Error::invalid(format!("bad /etc/passwd entry for {user}")))
            };
            (num(2)?, num(3)?)
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => table("etc/group")
                .iter()
                .find(|f| f.first().is_some_and(|n| n == g))
                .and_then(|f| f.get(2)?.parse().ok())
                .ok_or_else(|| {
                    Error::invalid(format!("group {g} is not in the image's /etc/group"))
                })?,
        },
    };
    Ok((uid, gid))
}

struct Plan {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<String>,
    workdir: String,
}

fn run_in(root: &Mount, plan: Plan) -> Result<i32> {
    let dir = root.root();
    let io = |e: std::io::Error| Error::backend("run", format!("{}: {e}", dir.display()));
    let mut mounts = Mounts(Vec::new());
    let proc = dir.join("proc");
    if !proc.exists() {
        std::fs::create_dir(&proc).map_err(io)?;
    }
    mounts.mount(&["-t", "proc"], Path::new("proc"), &proc)?;
    let dev = dir.join("dev");
    if dev.is_dir() {
        mounts.mount(&["--bind"], Path::new("/dev"), &dev)?;
    }
    let mut cmd = Command::new("unshare");
    cmd.arg(format!("--root={}", dir.display()))
        .arg(format!("--wd={}", plan.workdir));
    if let Some(u) = &plan.user {
        let (uid, gid) = resolve_user(dir, u)?;
        cmd.args(["--setgid", &gid.to_string(), "--setuid", &uid.to_string()]);
    }
    cmd.arg("--").args(&plan.argv).env_clear().envs(plan.env);
    let status = cmd
        .status()
        .map_err(|e| Error::Config(format!("unshare (util-linux): {e}")))?;
    drop(mounts);
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// What a run did.
pub struct RunReport {
    /// The command's exit code (128 + signal if it was killed).
    pub exit_code: i32,
    /// How the clone reached the loop device: `local` (the backend's file) or `fuse`
    /// (a lazy volume over shared storage).
    pub route: &'static str,
    /// Bytes the lazy volume fetched from the backend (FUSE route).
    pub fetched_bytes: Option<u64>,
}

/// Runs `cmd` (or the image's Entrypoint + Cmd) in a fresh clone of local image `image`;
/// returns the command's exit code and the data path it took.
///
/// # Errors
/// `NotFound` for an unknown image; `InvalidInput` without a command; `Integrity` when
/// the layer's Merkle tree is missing; FUSE, loop, mount and store errors.
pub async fn run(ctx: &Ctx, image: &str, cmd: &[String]) -> Result<RunReport> {
    let rec = ctx.images.get(image)?;
    let cfg = rec.config.config().clone().unwrap_or_default();
    let mut argv: Vec<String> = cfg.entrypoint().clone().unwrap_or_default();
    if cmd.is_empty() {
        argv.extend(cfg.cmd().clone().unwrap_or_default());
    } else {
        argv.extend(cmd.iter().cloned());
    }
    if argv.is_empty() {
        return Err(Error::invalid(format!(
            "image {image} has no Entrypoint or Cmd: give a command after --"
        )));
    }
    let mut env: Vec<(String, String)> = cfg
        .env()
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ));
    }
    let plan = Plan {
        argv,
        env,
        user: cfg.user().clone().filter(|u| !u.is_empty()),
        workdir: cfg
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_owned()),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let cid = format!("run-{}-{nanos}", std::process::id());
    ctx.store.create(&cid, Some(&rec.top)).await?;
    let result: Result<RunReport> = async {
        let vol = ctx.store.get(&cid).await?;
        let backend = ctx.store.backend().clone();
        let mut lazy = LazyVolumeOptions::default();
        if !backend.info().capabilities.local_path {
            let info = ctx.store.layer(&rec.top).await?;
            if let Some(m) = &info.merkle {
                let v =
                    MerkleVerifier::open(backend.clone(), m, info.size, BlockSize::DEFAULT).await?;
                lazy = lazy.with_verifier(Arc::new(v));
            }
        }
        let work = ctx.state.join("run");
        std::fs::create_dir_all(&work)
            .map_err(|e| Error::backend("run", format!("{}: {e}", work.display())))?;
        let mount = Mount::for_volume(
            backend,
            vol,
            Arc::new(BlockCache::new(RUN_CACHE_BYTES)),
            lazy,
            MountOptions::default().with_work_dir(work),
        )
        .await
        .map_err(|e| Error::backend("run", format!("mounting the container's clone: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let code = run_in(&mount, plan);
            let fetched = mount.volume().map(|v| v.metrics().fetched_bytes);
            let down = mount
                .unmount()
                .map_err(|e| Error::backend("run", format!("teardown: {e}")));
            let code = code?;
            down?;
            Ok(RunReport {
                exit_code: code,
                route: if fetched.is_some() { "fuse" } else { "local" },
                fetched_bytes: fetched,
            })
        })
        .await
        .map_err(|e| Error::backend("run", e.to_string()))?
    }
    .await;
    let _ = ctx.store.put(&cid).await;
    let removed = ctx.store.remove(&cid).await;
    let report = result?;
    removed?;
    Ok(report)
}
