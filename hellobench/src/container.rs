//! Starting a container in an already-mounted root and waiting for readiness, shared by every
//! [`crate::path::Path`]: `/proc` and `/dev` are mounted into the root, the readiness rule's
//! files are written, and its command runs under `chroot` with a clean environment.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::corpus::CHROOT_PATH;
use crate::error::{Context, Result};
use crate::spec::{FileSpec, Readiness};
use crate::sys::{self, Mounts};

/// A started container: its mounts inside the root and, for servers, the server process.
#[derive(Debug)]
pub struct Running {
    mounts: Mounts,
    server: Option<Child>,
    /// Where the server's stdout/stderr go.
    pub log: PathBuf,
    /// What the readiness probe saw (first line).
    pub answer: String,
}

impl Running {
    /// Stop the server (SIGTERM to its process group, SIGKILL after 5 s) and unmount `/dev`
    /// and `/proc`.
    pub fn stop(mut self) -> Result<()> {
        let r = match self.server.take() {
            Some(mut c) => sys::stop_group(&mut c, Duration::from_secs(5)).map(drop),
            None => Ok(()),
        };
        self.mounts.unmount_all()?;
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = sys::stop_group(&mut c, Duration::from_secs(1));
        }
        // `mounts` unmounts itself on drop.
    }
}

fn subst(s: &str, port: u16) -> String {
    s.replace("{port}", &port.to_string())
}

fn write_files(root: &Path, files: &[FileSpec], port: u16) -> Result<()> {
    for f in files {
        let rel = f.path.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            crate::bail!("readiness file {:?} escapes the container", f.path);
        }
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, subst(&f.content, port))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn chroot_cmd(root: &Path, argv: &[String]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", CHROOT_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb");
    c
}

/// Start a container in `root` (already mounted, writable) and wait until `readiness` holds,
/// at most `timeout`. Blocking: call it from `spawn_blocking`.
pub fn start_and_wait(
    root: &Path,
    readiness: &Readiness,
    timeout: Duration,
    log: &Path,
) -> Result<Running> {
    let mut mounts = Mounts::new();
    for d in ["proc", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    mounts.proc(&root.join("proc"))?;
    mounts.bind(Path::new("/dev"), &root.join("dev"))?;
    let port = sys::free_port()?;
    match readiness {
        Readiness::Command {
            files,
            argv,
            expect,
        } => {
            write_files(root, files, port)?;
            let argv: Vec<String> = argv.iter().map(|a| subst(a, port)).collect();
            let out = sys::run_timeout(&mut chroot_cmd(root, &argv), timeout)?;
            std::fs::write(log, format!("{}{}", out.stdout, out.stderr))?;
            if !out.status.success() || !out.stdout.contains(expect.as_str()) {
                crate::bail!(
                    "not ready: {argv:?} exited {} with stdout {:?} (want {expect:?}); stderr: {}",
                    out.status,
                    out.stdout.trim(),
                    out.stderr.trim()
                );
            }
            let answer = out.stdout.lines().next().unwrap_or_default().to_owned();
            Ok(Running {
                mounts,
                server: None,
                log: log.to_path_buf(),
                answer,
            })
        }
        Readiness::Serve {
            files,
            argv,
            send,
            expect,
        } => {
            write_files(root, files, port)?;
            let argv: Vec<String> = argv.iter().map(|a| subst(a, port)).collect();
            let logf = std::fs::File::create(log)?;
            let mut cmd = chroot_cmd(root, &argv);
            cmd.stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf);
            let server = sys::spawn_group(&mut cmd)?;
            let mut running = Running {
                mounts,
                server: Some(server),
                log: log.to_path_buf(),
                answer: String::new(),
            };
            let deadline = Instant::now() + timeout;
            let send = subst(send, port);
            loop {
                if let Some(a) = probe(port, &send, expect, deadline) {
                    running.answer = a;
                    return Ok(running);
                }
                if let Some(status) = running.server.as_mut().expect("set").try_wait()? {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    crate::bail!(
                        "server {argv:?} exited ({status}) before it was ready: {}",
                        tail.trim()
                    );
                }
                if Instant::now() >= deadline {
                    crate::bail!(
                        "server {argv:?} did not answer {send:?} with {expect:?} on 127.0.0.1:{port} within {timeout:?}"
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// One attempt: connect, send, read until `expect` shows up, EOF, or the deadline.
pub(crate) fn probe(port: u16, send: &str, expect: &str, deadline: Instant) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.write_all(send.as_bytes()).ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left.min(Duration::from_secs(2))))
            .ok()?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if text.contains(expect) {
                    return Some(text.lines().next().unwrap_or_default().to_owned());
                }
            }
            Err(_) => break,
        }
    }
    None
}
