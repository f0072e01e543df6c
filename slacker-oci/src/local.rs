//! [`LocalRegistry`]: a throwaway OCI distribution registry on 127.0.0.1, for tests,
//! examples and benchmarks.
//!
//! It runs Debian's `docker-registry` (distribution 2.8) with a config written into a
//! temporary directory: filesystem storage there, deletes enabled, no auth (the
//! package's default config turns on htpasswd auth and listens on every interface, so it
//! is never used), listening on a free loopback port.
//!
//! The registry is started under a small `sh` watchdog that kills it (and removes its
//! directory) when the [`LocalRegistry`] is dropped **or** when the process that started
//! it exits, so a registry kept in a `static` for a whole test binary does not outlive it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry binary this module runs.
pub const REGISTRY_BINARY: &str = "docker-registry";

/// A running local registry; stopped when dropped.
#[derive(Debug)]
pub struct LocalRegistry {
    addr: String,
    dir: PathBuf,
    watchdog: Child,
}

impl LocalRegistry {
    /// Starts a registry on a free 127.0.0.1 port and waits (up to 10 s) until `/v2/`
    /// answers.
    ///
    /// # Errors
    /// `NotFound` if `docker-registry` is not installed; other IO errors if it does not
    /// start or does not become ready (the log is quoted).
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(None)
    }

    /// [`start`](Self::start), with htpasswd authentication: `htpasswd` is the file's
    /// content (`user:<bcrypt hash>` lines). Every request then needs basic credentials
    /// (over plain HTTP: for tests only).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with_htpasswd(htpasswd: &str) -> std::io::Result<Self> {
        Self::start_with(Some(htpasswd))
    }

    fn start_with(htpasswd: Option<&str>) -> std::io::Result<Self> {
        let which = Command::new(REGISTRY_BINARY)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = which {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{REGISTRY_BINARY} is not runnable: {e} (apt-get install docker-registry)"),
            ));
        }
        let dir = std::env::temp_dir().join(format!(
            "slacker-registry-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(dir.join("data"))?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        let mut yaml = config_yaml(&dir.join("data"), &addr);
        if let Some(h) = htpasswd {
            let path = dir.join("htpasswd");
            std::fs::write(&path, h)?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: slacker-test\n    path: {}\n",
                path.display()
            ));
        }
        std::fs::write(&config, yaml)?;
        let log = dir.join("registry.log");
        // $0 config, $1 log, $2 the pid to watch, $3 the directory to remove.
        let script = r#"
"$REGISTRY" serve "$0" >"$1" 2>&1 &
r=$!
trap 'kill $r 2>/dev/null; wait $r 2>/dev/null; rm -rf "$3"; exit 0' EXIT INT TERM HUP
while kill -0 "$2" 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.2; done
"#;
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&config)
            .arg(&log)
            .arg(std::process::id().to_string())
            .arg(&dir)
            .env("REGISTRY", REGISTRY_BINARY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let me = Self {
            addr,
            dir,
            watchdog,
        };
        me.wait_ready(Duration::from_secs(10))?;
        Ok(me)
    }

    /// `host:port` of the registry.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The directory holding its config, data and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn wait_ready(&self, timeout: Duration) -> std::io::Result<()> {
        let start = Instant::now();
        loop {
            if v2_status(&self.addr).is_some_and(|s| s == 200 || s == 401) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let log =
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "registry on {} not ready after {timeout:?}: {log}",
                    self.addr
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        // SIGTERM makes the watchdog's trap stop the registry and remove the directory.
        let _ = Command::new("kill")
            .arg(self.watchdog.id().to_string())
            .status();
        let _ = self.watchdog.wait();
    }
}

/// The registry config: filesystem storage in `data`, deletes on, no auth, `addr`.
pub fn config_yaml(data: &Path, addr: &str) -> String {
    format!(
        "version: 0.1\nlog:\n  level: warn\n  fields:\n    service: registry\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
        data.display()
    )
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `GET /v2/` on `addr` answers 200.
pub fn v2_ok(addr: &str) -> bool {
    v2_status(addr) == Some(200)
}

/// The status `GET /v2/` on `addr` answers, if it answers HTTP.
fn v2_status(addr: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    if !head.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
