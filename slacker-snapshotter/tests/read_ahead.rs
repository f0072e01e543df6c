//! The loop device under a local volume's ext4 gets the configured read-ahead
//! (`read_ahead_kb`), set after the snapshotter's own mount, and the kernel's 128 KiB
//! back when the snapshotter lets the device go (a loop device keeps its read-ahead
//! after detach: the next user of `/dev/loopN` would inherit it). Checked on the device
//! itself, through sysfs. The same device reads the volume's file with direct IO
//! (`loop/dio`), so the clone's blocks are not cached twice.

mod support;

use std::path::Path;

use support::*;

/// The loop device mounted at `dir` (through the bind mount Prepare handed out, whose
/// source is the snapshotter's own mount of the volume).
fn device_at(dir: &str) -> std::path::PathBuf {
    let src = sh(std::process::Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "--target"])
        .arg(dir))
    .unwrap();
    let dev = src.trim();
    let name = Path::new(dev)
        .file_name()
        .unwrap_or_else(|| panic!("no device under {dir}: {src:?}"));
    assert!(
        name.to_string_lossy().starts_with("loop"),
        "{dir} is not on a loop device: {dev}"
    );
    Path::new(dev).to_owned()
}

fn direct_io_of(dev: &Path) -> bool {
    let attr = Path::new("/sys/block")
        .join(dev.file_name().unwrap())
        .join("loop/dio");
    std::fs::read_to_string(&attr).unwrap().trim() == "1"
}

fn read_ahead_of(dev: &Path) -> u32 {
    let attr = Path::new("/sys/block")
        .join(dev.file_name().unwrap())
        .join("queue/read_ahead_kb");
    std::fs::read_to_string(&attr)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The read-ahead of a prepared volume's loop device, and of the same device after the
/// snapshot was removed; whether the device did direct IO.
fn prepared_read_ahead(extra: &str) -> Option<(u32, u32, bool)> {
    let (_fs, dir, data) = btrfs_run("2G")?;
    let cfg = write_config(&dir, &btrfs_toml(&data), extra);
    let snap = snapshotter(&cfg);
    let sock = snap.socket.clone();
    let got = runtime().block_on(async {
        let mut c = connect(sock).await;
        let mounts = prepare(&mut c, "ra", "").await.expect("prepare");
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
        let dev = device_at(&mounts[0].source);
        let mounted = read_ahead_of(&dev);
        let dio = direct_io_of(&dev);
        remove(&mut c, "ra").await.expect("remove");
        (mounted, read_ahead_of(&dev), dio)
    });
    drop(snap);
    unmount_under(&dir);
    Some(got)
}

#[test]
fn a_local_volume_s_loop_device_gets_the_configured_read_ahead() {
    if let Some(why) = missing(&["mkfs.btrfs", "mkfs.ext4", "losetup", "findmnt"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some((configured, after, dio)) = prepared_read_ahead("read_ahead_kb = 2048") else {
        return;
    };
    assert_eq!(configured, 2048);
    assert!(
        dio,
        "the loop device reads the volume's file with direct IO"
    );
    assert_eq!(
        after, 128,
        "the kernel's read-ahead back once the device is let go"
    );
    let Some((default, _, _)) = prepared_read_ahead("") else {
        return;
    };
    assert_eq!(default, 1024, "the default read-ahead");
}
