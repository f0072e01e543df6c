//! A private containerd with this snapshotter as a proxy plugin: what the crate's tests
//! and HelloBench's `containerd` paths start, in one place.
//!
//! ```text
//!  Containerd::start(dir, [("slacker", socket)], namespace)
//!    dir/containerd/config.toml   root, state, grpc socket, [proxy_plugins.<name>]
//!    containerd --config ...      (Debian's containerd 1.6, runc)
//!  ctr(&["images", "pull", ...])  ctr -a <socket> -n <namespace> ...
//!  drop                           runc delete -f of the namespace's containers, kill,
//!                                 unmount what is left under dir
//! ```
//!
//! Every containerd runs with its own root, state and socket (nothing under
//! `/var/lib/containerd`), the CRI plugin disabled, and the built-in snapshotters (among
//! them `overlayfs`) beside the proxy plugins. runc keeps its state per namespace under
//! `/run/containerd/runc/<namespace>`, so two containerds on one host need different
//! namespaces. Needs root.
//!
//! [`SnapshotterProcess`] runs a snapshotter binary on a configuration file (see
//! [`write_config`]) and waits for its socket.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long [`Containerd::start`] and [`SnapshotterProcess::start`] wait for the socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

fn failed(cmd: &Command, out: &Output) -> io::Error {
    io::Error::other(format!(
        "{cmd:?} failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Runs `cmd`; its stdout, or an error that carries its exit status, stdout and stderr.
///
/// # Errors
/// The command not starting, or exiting unsuccessfully.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?} could not run: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(cmd, &out))
    }
}

/// Unmounts everything under `dir` (innermost first, twice over) and detaches loop
/// devices whose backing file is under it. Best effort.
pub fn unmount_under(dir: &Path) {
    let d = dir.to_string_lossy().into_owned();
    for _ in 0..2 {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut mps: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&d))
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            let _ = run(Command::new("umount").arg(m));
        }
        if let Ok(out) = run(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE", "-l"])) {
            for l in out.lines() {
                let mut it = l.split_whitespace();
                match (it.next(), it.next()) {
                    (Some(dev), Some(back)) if back.starts_with(&d) => {
                        let _ = run(Command::new("losetup").args(["-d", dev]));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A running containerd, killed (and its containers deleted through runc) on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    namespace: String,
}

impl Containerd {
    /// Starts `containerd` with root, state, socket and config under `dir/containerd`,
    /// a snapshot proxy plugin per `(name, socket)` of `proxies`, and waits (at most
    /// [`START_TIMEOUT`]) until `ctr version` answers. `ctr` calls use `namespace`.
    ///
    /// # Errors
    /// The directory or config not writable, containerd not starting or not answering
    /// (the error carries its log).
    pub fn start(dir: &Path, proxies: &[(&str, &Path)], namespace: &str) -> io::Result<Self> {
        let dir = dir.join("containerd");
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        let mut text = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [debug]\n  level = \"{level}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            level = std::env::var("SLACKER_CONTAINERD_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        );
        for (name, socket) in proxies {
            text.push_str(&format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        std::fs::write(&cfg, text)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("containerd does not start: {e}")))?;
        let mut c = Self {
            child,
            dir,
            sock,
            namespace: namespace.to_owned(),
        };
        let t = Instant::now();
        while c.ctr(&["version"]).is_err() {
            if let Some(status) = c.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "containerd exited ({status}): {}",
                    c.log_text()
                )));
            }
            if t.elapsed() > START_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "containerd did not answer within {START_TIMEOUT:?}: {}",
                        c.log_text()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    /// `ctr -a <socket> -n <namespace>`, to add arguments to and run or spawn.
    pub fn ctr_command(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.sock).args(["-n", &self.namespace]);
        c
    }

    /// Runs `ctr ARGS` and returns its stdout.
    ///
    /// # Errors
    /// ctr failing (the error carries its stderr).
    pub fn ctr(&self, args: &[&str]) -> io::Result<String> {
        run(self.ctr_command().args(args))
    }

    /// containerd's socket.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// The namespace `ctr` calls use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The directory holding containerd's root, state, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The root filesystem of the running task of container `id`, as the host sees it.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
            .join("rootfs")
    }

    /// Kills the task of container `id` (SIGKILL) if it has one, removes the task
    /// (retrying while it is still exiting, at most 20 s) and the container with its
    /// snapshot.
    ///
    /// # Errors
    /// The task not going away, or removing the container failing.
    pub fn remove_container(&self, id: &str) -> io::Result<()> {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let t = Instant::now();
        loop {
            match self.ctr(&["task", "rm", id]) {
                Ok(_) => break,
                // No task (it exited and was deleted, or never started).
                Err(e) if e.to_string().contains("not found") => break,
                Err(e) if t.elapsed() > Duration::from_secs(20) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        self.ctr(&["containers", "rm", id]).map(drop)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers left running hold mounts: stop them through runc.
        let root = format!("/run/containerd/runc/{}", self.namespace);
        if let Ok(ids) = run(Command::new("runc").args(["--root", &root, "list", "-q"])) {
            for id in ids.lines() {
                let _ = run(Command::new("runc").args(["--root", &root, "delete", "-f", id]));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_under(&self.dir);
    }
}

/// Writes `dir/config.toml` for a snapshotter whose socket is `dir/snapshotter.sock`,
/// root `dir/root`, volumes of 1 GiB, `[backend]` body `backend` (TOML) and `extra`
/// top-level keys; returns its path.
///
/// # Errors
/// The file not writable.
pub fn write_config(dir: &Path, backend: &str, extra: &str) -> io::Result<PathBuf> {
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "address = \"{}\"\nroot = \"{}\"\nvolume_bytes = 1073741824\n{extra}\n[backend]\n{backend}\n",
            dir.join("snapshotter.sock").display(),
            dir.join("root").display()
        ),
    )?;
    Ok(cfg)
}

/// Live (not zombie) processes running `--fd-keeper <socket>`: the keepers
/// ([`crate::keeper`]) of the snapshotter whose keeper socket is `socket`.
pub fn keeper_pids(socket: &Path) -> Vec<u32> {
    let want = format!("{}\0{}\0", crate::keeper::FLAG, socket.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(|st| st == "Z"))
            })
            .unwrap_or(true);
        if String::from_utf8_lossy(&cmdline).contains(&want) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// A running snapshotter process; killed (SIGKILL) on drop, with its fd keeper (if any:
/// a keeper holding connections of a test's mounts would make their teardown wait for a
/// snapshotter that is not coming back).
#[derive(Debug)]
pub struct SnapshotterProcess {
    /// The process.
    pub child: Child,
    /// Its socket (`address` of the configuration written by [`write_config`]).
    pub socket: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Its fd keeper's socket (`<root>/keeper.sock`).
    pub keeper_socket: Option<PathBuf>,
}

impl SnapshotterProcess {
    /// Runs `program --config <config>` (a configuration written by [`write_config`]:
    /// the socket and log are beside it) and waits (at most [`START_TIMEOUT`]) for its
    /// socket.
    ///
    /// # Errors
    /// The program not starting, exiting, or making no socket in time (the error carries
    /// its log).
    pub fn start(program: &Path, config: &Path) -> io::Result<Self> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let socket = dir.join("snapshotter.sock");
        let log = dir.join("snapshotter.log");
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let out = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} does not start: {e}", program.display()),
                )
            })?;
        let keeper_socket = crate::Config::load(config)
            .ok()
            .map(|c| c.root.join(crate::keeper::SOCKET_NAME));
        let mut s = Self {
            child,
            socket,
            config: config.to_owned(),
            log,
            keeper_socket,
        };
        let t = Instant::now();
        while !s.socket.exists() {
            if let Some(st) = s.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited ({st}): {}",
                    program.display(),
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                )));
            }
            if t.elapsed() > START_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{}: no socket after {START_TIMEOUT:?}", program.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    /// SIGKILLs the process and waits for it (its fd keeper stays: a restarted
    /// snapshotter resumes the connections it holds).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SnapshotterProcess {
    fn drop(&mut self) {
        self.kill();
        if let Some(socket) = &self.keeper_socket {
            for pid in keeper_pids(socket) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
