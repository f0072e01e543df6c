//! Getting a fresh host ready for the main command, so that the README's
//! `cargo run --release -p slacker-hellobench` works as root and as a user with sudo:
//!
//! - not root: re-run only this (already built) binary through `sudo`, so cargo, rustup
//!   and the build stay the user's (root's `PATH` usually has no cargo);
//! - root: install the Debian packages the benchmark needs with apt-get, as `.ci/test`
//!   does for the tests;
//! - the real corpus or nothing: a run that cannot build the Debian images fails with the
//!   fix, instead of measuring a busybox stand-in as the main result (`--quick` asks for
//!   that stand-in explicitly).

use std::ffi::OsString;
use std::process::{Command, ExitCode};

use slacker_hellobench::error::{Error, Result};
use slacker_hellobench::{progress, sys};

/// Environment variables the elevated run keeps (sudo resets the environment).
const KEEP_ENV: [&str; 5] = ["CI", "RUST_LOG", "RUST_BACKTRACE", "NO_COLOR", "TMPDIR"];

/// If not root and `sudo` exists, runs this binary again through `sudo` with the same
/// arguments and the `SLACKER_*` settings, and returns its exit code. `None`: carry on in
/// this process (already root, `--no-sudo`, or no sudo: preflight then says what is
/// missing).
pub fn elevate() -> Option<ExitCode> {
    if sys::is_root() {
        return None;
    }
    let Some(sudo) = sys::which("sudo") else {
        progress!(
            "not root and no sudo: run this as root (the binary alone needs root, e.g. `su -c {}`)",
            std::env::current_exe().map_or_else(|_| "<binary>".into(), |p| p.display().to_string())
        );
        return None;
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            progress!("cannot find this binary to re-run it with sudo: {e}");
            return None;
        }
    };
    let mut env: Vec<OsString> = Vec::new();
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("SLACKER_") || KEEP_ENV.contains(&name.as_ref()) {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(&v);
            env.push(kv);
        }
    }
    progress!(
        "not root: re-running {} with sudo (only this binary runs as root; --no-sudo to stay a user)",
        exe.display()
    );
    // `sudo -- env K=V ... <binary> <args>`: no `-E` (it needs SETENV in sudoers).
    let status = Command::new(sudo)
        .arg("--")
        .arg("env")
        .args(&env)
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .status();
    Some(match status {
        Ok(s) => ExitCode::from(s.code().map_or(1, |c| u8::try_from(c).unwrap_or(1))),
        Err(e) => {
            eprintln!("slacker-hellobench: running sudo: {e}");
            ExitCode::FAILURE
        }
    })
}

/// `(tool, Debian package)`: what the benchmark runs, by the package that provides it.
fn wanted(quick: bool) -> Vec<(&'static str, &'static str)> {
    let mut w = vec![
        ("docker-registry", "docker-registry"),
        ("mkfs.btrfs", "btrfs-progs"),
        ("mke2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ];
    if quick {
        // The busybox stand-in: the host's static busybox, else busybox-static's.
        if sys::static_busybox().is_none() {
            w.push(("busybox", "busybox-static"));
        }
    } else {
        w.push(("debootstrap", "debootstrap"));
    }
    w
}

/// Debian packages this run needs that are not installed (by the tools they provide).
pub fn missing_packages(quick: bool) -> Vec<&'static str> {
    let mut pkgs: Vec<&'static str> = wanted(quick)
        .into_iter()
        .filter(|(tool, _)| match *tool {
            "busybox" => sys::static_busybox().is_none(),
            t => sys::which(t).is_none(),
        })
        .map(|(_, p)| p)
        .collect();
    pkgs.dedup();
    pkgs
}

/// As root on a host with apt-get: installs the packages this run needs (one
/// `apt-get update` + `install`, only when something is missing).
///
/// # Errors
/// apt-get failed (no network, a held lock for more than 10 minutes, ...): the message
/// names the command to run by hand.
pub fn install_packages(quick: bool) -> Result<()> {
    let pkgs = missing_packages(quick);
    if pkgs.is_empty() || !sys::is_root() || sys::which("apt-get").is_none() {
        return Ok(());
    }
    let fix = format!("apt-get install -y {}", pkgs.join(" "));
    progress!(
        "installing {} with apt-get (as .ci/test does; --no-install to skip) ...",
        pkgs.join(" ")
    );
    let apt = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "-qq"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| Error::msg(format!("running apt-get: {e}; fix: {fix}")))?;
        if st.success() {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "apt-get {} failed ({st}); fix: {fix}",
                args.join(" ")
            )))
        }
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&pkgs);
    apt(&install)?;
    let still = missing_packages(quick);
    if !still.is_empty() {
        return Err(Error::msg(format!(
            "still missing after apt-get install: {}",
            still.join(" ")
        )));
    }
    Ok(())
}

/// The error of a run that cannot build the real corpus: what is wrong and how to fix it.
pub fn corpus_unavailable(reasons: &[String]) -> Error {
    let mut msg = String::from(
        "cannot build the real corpus (Debian images), so there is nothing honest to measure:\n",
    );
    for r in reasons {
        msg.push_str(&format!("  - {r}\n"));
    }
    msg.push_str(
        "fix: run as root (as a user, the binary re-runs itself with sudo), on Debian/Ubuntu with \
         network access to the apt mirror: it installs debootstrap, docker-registry, btrfs-progs \
         and e2fsprogs itself; or by hand: apt-get install -y debootstrap docker-registry \
         btrfs-progs e2fsprogs\n\
         for a quick smoke run on a busybox stand-in (not the benchmark): \
         cargo run --release -p slacker-hellobench -- --quick",
    );
    Error::msg(msg)
}
