//! HelloBench-style comparison of slacker against the traditional image path, after the
//! FAST'16 Slacker paper's HelloBench (push / pull / run of 57 images).
//!
//! ```text
//!  images.json ──▶ corpus (debootstrap + apt in chroots, cached) ──▶ for each Path:
//!                                                                     push ─ pull ─ run ─ stop
//!                                        dedup analysis (Figure 7) ◀─┘   (timed by bench)
//!                                                         report: tables, results.json, SVG
//! ```
//!
//! A [`path::Path`] is one way of distributing images; [`baseline::Traditional`] is tar +
//! gzip -6 into a real registry, download + gunzip + untar, overlayfs;
//! [`slacker::SlackerPath`] is slacker's (btrfs snapshots, reference layers through the same
//! registry, clones run through the kernel's loop device or the lazy worker data path).
#![forbid(unsafe_code)]

pub mod baseline;
pub mod bench;
pub mod container;
pub mod containerd;
pub mod corpus;
pub mod dedup;
pub mod error;
pub mod fairlink;
pub mod goals;
pub mod nfs;
pub mod path;
pub mod preflight;
pub mod rbd;
pub mod registry;
pub mod report;
pub mod slacker;
pub mod spec;
pub mod storage;
pub mod sys;
pub mod tarball;
pub mod tree;

pub use path::{Path, Step};

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Seconds since the first progress line (or the first call).
pub fn elapsed_secs() -> f64 {
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

/// A progress line on stderr: `[hellobench   12.3s] ...`.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[hellobench {:7.1}s] {}", $crate::elapsed_secs(), format!($($arg)*))
    };
}
