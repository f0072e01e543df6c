//! Commit after a *lazy* unmount (`umount -l`, `MNT_DETACH`: what containerd's own
//! snapshotter suite does before every Commit). A lazily unmounted filesystem lives on
//! while anything still references it (an open file, a process's working directory, or
//! only for a moment: another process's path walk through the mount point), and only its
//! teardown writes ext4's delayed data and journal to the loop device. A Commit that
//! snapshots the volume before that teardown records the parent's tree: the child shows
//! the data of two layers back (the intermittent `128LayersMount` failure on NFS).
//!
//! Each test builds a chain of layers like `128LayersMount` (`/overwriteme`,
//! `/ADDHERE/file-<i>`, `/ONLYME/file-<i>` alone) through the snapshotter's socket,
//! mounting what Prepare returns with `mount` and checking every child's tree before
//! writing to it:
//! - `…_while_held`: a file of the mount stays open across the lazy unmount and the
//!   Commit (deterministic: the filesystem is certainly alive at Commit).
//! - `…_under_walkers`: several chains at once with nothing held, while walker threads
//!   open every mounted directory of the test in a loop, each for 20 ms
//!   (like `find` or `du` in other processes; libmount's path resolution does the same
//!   for microseconds): the race as it happens, counted.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use containerd_snapshots::api::types::Mount;
use support::*;

/// Mounts what Prepare/View returned at `dir` with util-linux `mount` (`-o loop` sets
/// autoclear, as containerd's own loop setup does).
fn mount_all(mounts: &[Mount], dir: &Path) -> Result<(), String> {
    for m in mounts {
        let mut cmd = Command::new("mount");
        if m.r#type != "bind" {
            cmd.args(["-t", &m.r#type]);
        }
        cmd.args(["-o", &m.options.join(",")])
            .arg(&m.source)
            .arg(dir);
        sh(&mut cmd).map_err(|e| format!("mounting {m:?}: {e}"))?;
    }
    Ok(())
}

fn unmount_lazily(dir: &Path) {
    sh(Command::new("umount").arg("-l").arg(dir)).unwrap();
}

/// What layer `i`'s tree shows, in the files the chain writes (`None`: before layer 0).
fn expect_layer(root: &Path, i: Option<usize>) -> Result<(), String> {
    let over = std::fs::read_to_string(root.join("overwriteme")).ok();
    let only: Option<Vec<String>> = std::fs::read_dir(root.join("ONLYME")).ok().map(|d| {
        let mut v: Vec<String> = d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    });
    let added = std::fs::read_dir(root.join("ADDHERE")).map_or(0, |d| d.count());
    let want = match i {
        None => (None, None, 0),
        Some(i) => (
            Some(format!("{i} WAS HERE!\n")),
            Some(vec![format!("file-{i}")]),
            i + 1,
        ),
    };
    if (over.clone(), only.clone(), added) == want {
        Ok(())
    } else {
        Err(format!(
            "expected layer {i:?}'s tree: /overwriteme {:?}, /ONLYME {:?}, {} in /ADDHERE; found {over:?}, {only:?}, {added}",
            want.0, want.1, want.2
        ))
    }
}

/// Writes layer `i` over layer `i - 1` (the changes of `128LayersMount`).
fn write_layer(root: &Path, i: usize) {
    std::fs::write(root.join("overwriteme"), format!("{i} WAS HERE!\n")).unwrap();
    std::fs::create_dir_all(root.join("ADDHERE")).unwrap();
    std::fs::write(root.join(format!("ADDHERE/file-{i}")), "same\n").unwrap();
    let _ = std::fs::remove_dir_all(root.join("ONLYME"));
    std::fs::create_dir(root.join("ONLYME")).unwrap();
    std::fs::write(root.join(format!("ONLYME/file-{i}")), "only me!\n").unwrap();
}

/// One chain of `layers` layers under `work`: Prepare on the previous layer, mount,
/// check the tree, write, (open a file if `hold`), `umount -l`, Commit, (close). Returns
/// the layers whose Prepare showed a tree other than their parent's.
async fn chain(c: &mut Client, work: &Path, name: &str, layers: usize, hold: bool) -> Vec<String> {
    let mut stale = Vec::new();
    let mut parent = String::new();
    for i in 0..layers {
        let key = format!("{name}/prepare-{i}");
        let dir = work.join(format!("{name}-prepare-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mounts = prepare(c, &key, &parent)
            .await
            .unwrap_or_else(|e| panic!("prepare {key} on {parent}: {e}"));
        if let Err(e) = mount_all(&mounts, &dir) {
            stale.push(format!("{name} layer {i}: {e}"));
            return stale;
        }
        let fresh = expect_layer(&dir, i.checked_sub(1));
        write_layer(&dir, i);
        match fresh {
            Ok(()) => expect_layer(&dir, Some(i)).expect("the mount shows what was written"),
            Err(e) => stale.push(format!("{name} layer {i}: {e}")),
        }
        let held = hold.then(|| std::fs::File::open(dir.join("overwriteme")).unwrap());
        // containerd's suite compares the tree with its flat copy here: walkers have
        // time to find the mount.
        std::thread::sleep(std::time::Duration::from_millis(20));
        unmount_lazily(&dir);
        let committed = format!("{name}/committed-{i}");
        commit(c, &committed, &key)
            .await
            .unwrap_or_else(|e| panic!("commit {key} as {committed}: {e}"));
        drop(held);
        parent = committed;
    }
    let view = work.join(format!("{name}-view"));
    std::fs::create_dir_all(&view).unwrap();
    let mounts = support::view(c, &format!("{name}/view"), &parent)
        .await
        .unwrap();
    // A snapshot of a live ext4 needs journal recovery, which a read-only loop device
    // cannot give: the View does not mount.
    match mount_all(&mounts, &view) {
        Err(e) => stale.push(format!("{name} view of the last layer: {e}")),
        Ok(()) => {
            if let Err(e) = expect_layer(&view, layers.checked_sub(1)) {
                stale.push(format!("{name} view of the last layer: {e}"));
            }
            unmount_lazily(&view);
        }
    }
    stale
}

/// The snapshotter on `backend` with its run directory `dir`; runs `f` with its socket.
/// `f` gets the socket and the snapshotter's log file.
fn with_snapshotter(dir: &Path, backend: &str, f: impl FnOnce(PathBuf, &Path)) {
    let cfg = write_config(dir, backend, "");
    let snap = snapshotter(&cfg);
    let sock = snap.socket.clone();
    let log = snap.log.clone();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(sock, &log)));
    drop(snap);
    unmount_under(dir);
    if let Err(p) = res {
        eprintln!(
            "snapshotter log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(p);
    }
}

fn held_chain(dir: &Path, backend: &str, layers: usize) {
    with_snapshotter(dir, backend, |sock, _| {
        let work = dir.join("work");
        runtime().block_on(async {
            let mut c = connect(sock).await;
            let stale = chain(&mut c, &work, "held", layers, true).await;
            assert!(
                stale.is_empty(),
                "a Commit after a lazy unmount lost the layer's writes:\n{}",
                stale.join("\n")
            );
        });
    });
}

/// `chains` chains of `layers` layers at once, nothing held, while three walker
/// threads open every directory mounted under `work` in a loop, 20 ms each. Every stale layer is counted.
fn walked_chains(dir: &Path, backend: &str, chains: usize, layers: usize) {
    with_snapshotter(dir, backend, |sock, log| {
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let walks = Arc::new(AtomicU64::new(0));
        let walkers: Vec<_> = (0..3)
            .map(|_| {
                let (stop, walks, work) = (stop.clone(), walks.clone(), work.clone());
                std::thread::spawn(move || {
                    let w = work.to_string_lossy().into_owned();
                    while !stop.load(Ordering::Relaxed) {
                        let info = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
                        for mp in info.lines().filter_map(|l| l.split(' ').nth(1)) {
                            if !mp.starts_with(&w) {
                                continue;
                            }
                            if let Ok(mut d) = std::fs::read_dir(mp) {
                                // A slow walker: the directory stays open a moment.
                                let _ = d.next();
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                let _ = d.count();
                                walks.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        let runs: Vec<_> = (0..chains)
            .map(|n| {
                let (sock, work) = (sock.clone(), work.clone());
                std::thread::spawn(move || {
                    runtime().block_on(async {
                        let mut c = connect(sock).await;
                        chain(&mut c, &work, &format!("walked{n}"), layers, false).await
                    })
                })
            })
            .collect();
        let mut stale = Vec::new();
        for r in runs {
            stale.extend(r.join().expect("a chain panicked"));
        }
        stop.store(true, Ordering::Relaxed);
        for w in walkers {
            w.join().unwrap();
        }
        let frozen = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("frozen for the snapshot")
            .count();
        eprintln!(
            "{chains} chains x {layers} layers ({} Commits), {} directory walks: {} stale or unmountable; {frozen} Commits froze a filesystem still alive",
            chains * layers,
            walks.load(Ordering::Relaxed),
            stale.len()
        );
        assert!(
            stale.is_empty(),
            "Commits after lazy unmounts lost writes:\n{}",
            stale.join("\n")
        );
    });
}

fn btrfs_backend() -> Option<(Btrfs, PathBuf, String)> {
    if let Some(why) = missing(&["mkfs.btrfs", "mkfs.ext4", "debugfs", "fsfreeze", "losetup"]) {
        skip_or_fail::<()>(why);
        return None;
    }
    let (fs, dir, data) = btrfs_run("4G")?;
    Some((fs, dir, btrfs_toml(&data)))
}

fn nfs_backend() -> Option<(tempfile::TempDir, String)> {
    if let Some(why) = missing(&["mkfs.ext4", "debugfs", "fsfreeze", "losetup"]) {
        skip_or_fail::<()>(why);
        return None;
    }
    let nfs = nfs_run("lazy")?;
    let backend = nfs.toml();
    Some((nfs.tmp, backend))
}

#[test]
fn commit_after_a_lazy_unmount_while_held_on_btrfs() {
    let Some((_fs, dir, backend)) = btrfs_backend() else {
        return;
    };
    held_chain(&dir, &backend, 4);
}

#[test]
fn commit_after_a_lazy_unmount_while_held_on_nfs() {
    let Some((dir, backend)) = nfs_backend() else {
        return;
    };
    held_chain(dir.path(), &backend, 3);
}

#[test]
fn commit_after_lazy_unmounts_under_walkers_on_btrfs() {
    let Some((_fs, dir, backend)) = btrfs_backend() else {
        return;
    };
    walked_chains(&dir, &backend, 3, 25);
}

#[test]
fn commit_after_lazy_unmounts_under_walkers_on_nfs() {
    let Some((dir, backend)) = nfs_backend() else {
        return;
    };
    walked_chains(dir.path(), &backend, 2, 8);
}
