//! Registry credentials the way docker, skopeo and containerd's `ctr` find them: the
//! docker client config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`),
//! its `auths` (`auth`: base64 of `user:password`, or `username`/`password`,
//! `identitytoken`), and credential helpers (`credHelpers` per registry, `credsStore`
//! for all): `docker-credential-<name> get` with the registry on stdin, answering
//! `{"Username": .., "Secret": ..}`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;
use slacker_core::{Error, Result};

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// No credentials: anonymous access.
    #[default]
    Anonymous,
    /// User name and password (or token as password).
    Basic {
        /// The user name.
        username: String,
        /// The password or token.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The docker config file in effect: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The keys a registry may be stored under (`docker.io` has historical spellings).
fn keys(registry: &str) -> Vec<String> {
    let mut k = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ];
    if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        k.push("https://index.docker.io/v1/".to_owned());
        k.push("index.docker.io".to_owned());
        k.push("docker.io".to_owned());
    }
    k
}

/// Credentials for `registry` (`host[:port]`) from the docker config at `path` (a
/// missing file means anonymous).
///
/// # Errors
/// `Config` for an unreadable or malformed config, a bad `auth` value, or a credential
/// helper that fails.
pub fn credentials_from(path: &Path, registry: &str) -> Result<Credentials> {
    lookup(path, registry, None)
}

/// As [`credentials_from`], with credential helpers looked up in `helper_dir` instead of
/// `PATH`.
fn lookup(path: &Path, registry: &str, helper_dir: Option<&Path>) -> Result<Credentials> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
    };
    let cfg: DockerConfig = serde_json::from_slice(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    for k in keys(registry) {
        if let Some(helper) = cfg.cred_helpers.get(&k) {
            return helper_get(helper, registry, helper_dir);
        }
    }
    for k in keys(registry) {
        if let Some(a) = cfg.auths.get(&k) {
            if let Some(b64) = a.auth.as_deref().filter(|s| !s.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| Error::Config(format!("auth for {registry}: {e}")))?;
                let raw = String::from_utf8(raw)
                    .map_err(|_| Error::Config(format!("auth for {registry} is not UTF-8")))?;
                let (u, p) = raw.split_once(':').ok_or_else(|| {
                    Error::Config(format!("auth for {registry} is not user:password"))
                })?;
                return Ok(Credentials::Basic {
                    username: u.to_owned(),
                    password: p.to_owned(),
                });
            }
            if let (Some(u), Some(p)) = (&a.username, &a.password) {
                return Ok(Credentials::Basic {
                    username: u.clone(),
                    password: p.clone(),
                });
            }
            if let Some(t) = &a.identity_token {
                return Ok(Credentials::Basic {
                    username: "<token>".to_owned(),
                    password: t.clone(),
                });
            }
        }
    }
    match &cfg.creds_store {
        Some(store) if !store.is_empty() => match helper_get(store, registry, helper_dir) {
            // A store without an entry for this registry: anonymous.
            Err(Error::NotFound { .. }) => Ok(Credentials::Anonymous),
            other => other,
        },
        _ => Ok(Credentials::Anonymous),
    }
}

/// Credentials for `registry` from the docker config in effect.
///
/// # Errors
/// As [`credentials_from`].
pub fn credentials(registry: &str) -> Result<Credentials> {
    match docker_config_path() {
        Some(p) => credentials_from(&p, registry),
        None => Ok(Credentials::Anonymous),
    }
}

/// Runs `docker-credential-<helper> get`.
fn helper_get(helper: &str, registry: &str, dir: Option<&Path>) -> Result<Credentials> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Error::Config(format!("credential helper name {helper:?}")));
    }
    let bin = format!("docker-credential-{helper}");
    let program = match dir {
        Some(d) => d.join(&bin),
        None => PathBuf::from(&bin),
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Config(format!("{bin}: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(registry.as_bytes())
        .map_err(|e| Error::Config(format!("{bin}: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Config(format!("{bin}: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if msg.contains("credentials not found") {
            return Err(Error::not_found(
                slacker_core::ObjectKind::Other,
                format!("credentials for {registry}"),
            ));
        }
        return Err(Error::Config(format!(
            "{bin} get failed: {msg} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let a: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Config(format!("{bin} answered: {e}")))?;
    Ok(Credentials::Basic {
        username: a.username,
        password: a.secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_and_helpers_are_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        assert_eq!(
            credentials_from(&p, "r.example").unwrap(),
            Credentials::Anonymous
        );
        std::fs::write(
            &p,
            r#"{"auths":{"r.example":{"auth":"dXNlcjpwYXNz"},"https://s.example":{"username":"a","password":"b"}},
                "credHelpers":{"h.example":"slacker-test-none"}}"#,
        )
        .unwrap();
        assert_eq!(
            credentials_from(&p, "r.example").unwrap(),
            Credentials::Basic {
                username: "user".into(),
                password: "pass".into()
            }
        );
        assert_eq!(
            credentials_from(&p, "s.example").unwrap(),
            Credentials::Basic {
                username: "a".into(),
                password: "b".into()
            }
        );
        assert_eq!(
            credentials_from(&p, "other.example").unwrap(),
            Credentials::Anonymous
        );
        // A helper that does not exist is a config error, not anonymous access.
        let e = credentials_from(&p, "h.example").unwrap_err();
        assert_eq!(e.kind(), slacker_core::ErrorKind::Config);
        assert!(!format!("{:?}", credentials_from(&p, "r.example").unwrap()).contains("\"pass\""));
    }

    #[test]
    fn a_credential_helper_is_run() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("docker-credential-slackertest");
        std::fs::write(
            &bin,
            "#!/bin/sh\nread r\necho \"{\\\"Username\\\":\\\"u-$r\\\",\\\"Secret\\\":\\\"s\\\"}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = d.path().join("config.json");
        std::fs::write(&p, r#"{"credsStore":"slackertest"}"#).unwrap();
        let got = lookup(&p, "reg.example:5000", Some(d.path())).unwrap();
        assert_eq!(
            got,
            Credentials::Basic {
                username: "u-reg.example:5000".into(),
                password: "s".into()
            }
        );
    }
}
