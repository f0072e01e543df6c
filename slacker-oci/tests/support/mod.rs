//! The registry the integration tests talk to.
//!
//! `SLACKER_REGISTRY=host:port` names an existing registry (plain HTTP). Otherwise one
//! `docker-registry` is started for the whole test binary on a free 127.0.0.1 port (see
//! [`slacker_oci::LocalRegistry`]: its watchdog stops it when the binary exits). Without
//! the binary the tests print `SKIPPED: …` and pass, except under `CI=true`, where they
//! fail.
#![allow(dead_code)]

use std::sync::OnceLock;

use slacker_oci::LocalRegistry;

/// `host:port` of the test registry, or `None` (skipped).
pub fn registry() -> Option<String> {
    if let Ok(addr) = std::env::var("SLACKER_REGISTRY") {
        if !addr.is_empty() {
            return Some(addr);
        }
    }
    static LOCAL: OnceLock<Option<LocalRegistry>> = OnceLock::new();
    LOCAL
        .get_or_init(|| match LocalRegistry::start() {
            Ok(r) => Some(r),
            Err(e) => slacker_testkit::skip_or_fail(format!(
                "no OCI registry: set SLACKER_REGISTRY=host:port or install docker-registry ({e})"
            )),
        })
        .as_ref()
        .map(|r| r.addr().to_owned())
}

/// A unique repository name per test (tests share one registry).
pub fn image(addr: &str, test: &str, tag: &str) -> String {
    format!("{addr}/slacker-test/{test}-{}:{tag}", std::process::id())
}

/// Whether e2fsprogs is usable; otherwise `SKIPPED:` (or a panic under CI).
pub fn e2fsprogs() -> bool {
    let ok = ["mke2fs", "debugfs"]
        .iter()
        .all(|t| std::process::Command::new(t).arg("-V").output().is_ok());
    ok || slacker_testkit::skip_or_fail::<()>("e2fsprogs (mke2fs, debugfs) is not installed")
        .is_some()
}

/// Deterministic, incompressible-ish content of `n` bytes (xorshift).
pub fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}
