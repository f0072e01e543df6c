//! Shared setup for the slacker benchmarks.

use std::path::PathBuf;
use std::process::Command;

use slacker_core::{Backend, VolumeId, VolumeOptions};

/// Runs `args[0]` with the rest as arguments; its stderr on failure.
///
/// # Errors
/// The command could not start or exited unsuccessfully.
pub fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A loop-mounted btrfs on a sparse image in the temp dir, unmounted and deleted on drop.
/// Needs root.
pub struct Scratch {
    dir: PathBuf,
    /// Where the btrfs is mounted.
    pub mnt: PathBuf,
}

impl Scratch {
    /// A fresh btrfs of `size` (as `truncate -s` reads it, e.g. `"2G"`) in
    /// `slacker-<name>-bench-<pid>` under the temp dir.
    ///
    /// # Errors
    /// A command (`truncate`, `mkfs.btrfs`, `mount`) failed.
    pub fn new(name: &str, size: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("slacker-{name}-bench-{}", std::process::id()));
        let (img, mnt) = (dir.join("img"), dir.join("mnt"));
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let s = Self { dir, mnt };
        sh(&["truncate", "-s", size, &img.to_string_lossy()])?;
        sh(&["mkfs.btrfs", "-q", "-f", &img.to_string_lossy()])?;
        sh(&[
            "mount",
            "-o",
            "loop",
            &img.to_string_lossy(),
            &s.mnt.to_string_lossy(),
        ])?;
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let m = self.mnt.to_string_lossy().into_owned();
        if sh(&["umount", &m]).is_err() {
            let _ = sh(&["umount", "-l", &m]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates volume `name` of `size` bytes and writes `written` bytes of data spread over it
/// in 64 KiB pieces.
pub async fn volume_with_data<B: Backend>(b: &B, name: &str, size: u64, written: u64) -> VolumeId {
    let id = VolumeId::new(name).expect("valid id");
    b.create_volume(&id, &VolumeOptions::new(size))
        .await
        .expect("create");
    let piece = vec![0xA5u8; 64 * 1024];
    let pieces = written / piece.len() as u64;
    let stride = (size / pieces.max(1)) & !4095;
    for i in 0..pieces {
        b.write_at(&id, i * stride, &piece).await.expect("write");
    }
    id
}
