//! A private OCI registry for the run: Debian's `docker-registry` (distribution 2.8) on a free
//! 127.0.0.1 port, with a config written into the run's directory (the packaged default
//! config turns on htpasswd auth and listens on every interface; COMPONENTS.md §1).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::sys;

/// A running registry, stopped (by its pid) on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    addr: String,
    dir: PathBuf,
}

impl Registry {
    /// Start `docker-registry serve` with storage under `dir` and wait (≤ 10 s) until `/v2/`
    /// answers.
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let port = sys::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: hellobench-local-only\n",
            dir.join("data").display()
        );
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, config)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = sys::spawn_group(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let mut reg = Self {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let t = Instant::now();
        while !reg.answers() {
            if let Some(c) = reg.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                crate::bail!(
                    "docker-registry exited ({status}); see {}",
                    reg.dir.join("registry.log").display()
                );
            }
            if t.elapsed() > Duration::from_secs(10) {
                crate::bail!("docker-registry did not answer on {} within 10 s", reg.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        crate::progress!(
            "registry: docker-registry on {} ready in {:.2} s",
            reg.addr,
            t.elapsed().as_secs_f64()
        );
        Ok(reg)
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Bytes stored under the registry's root directory.
    pub fn stored_bytes(&self) -> u64 {
        crate::tree::walk(&self.dir.join("data"))
            .map(|e| crate::tree::stats(&e).file_bytes)
            .unwrap_or(0)
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200")
    }

    /// Stop the registry (SIGTERM, then SIGKILL after 2 s).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            sys::stop_group(&mut c, Duration::from_secs(2)).context("stopping docker-registry")?;
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
