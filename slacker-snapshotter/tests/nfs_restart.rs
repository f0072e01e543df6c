//! kill -9 of the snapshotter on the NFS backend (volumes served through FUSE by the
//! snapshotter itself), against the project's knfsd VM (`SLACKER_NFS_ADDR`).
//!
//! A mount made before the kill keeps working across it: the snapshotter's fd keeper
//! (`slacker_snapshotter::keeper`) holds the FUSE connection while no snapshotter runs,
//! and the restarted one resumes it. The old mount keeps reading (data the new process
//! has not cached, fetched from the storage) and writing (with fsync) across the kill and
//! the restart; a large read in flight at the kill completes (the dead process's
//! unanswered requests are resent, `FUSE_NOTIFY_RESEND`). Afterwards every write is on
//! the storage (a new mount of a committed snapshot of the volume shows it), the
//! restarted process serves the same paths (`Mounts` answers what it answered before),
//! Walk and the storage's volume list agree, removing everything leaves no volume, and
//! nothing is left behind: no keeper process, no mount, no loop device, no `/dev/fuse`
//! descriptor. The connection of a snapshot removed while still mounted is not resumed
//! but closed (aborted). The first start finds a stale keeper socket file (a keeper of a previous
//! boot) and replaces it.
//!
//! `SLACKER_TEST_FD_KEEPER=off` runs the snapshotter with `fd_keeper = "off"` (the
//! behaviour before the keeper): the test then fails at the read in flight at the kill.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// The ext4 image Mounts hands out for `key` (a file the snapshotter serves through FUSE).
async fn mounts_of(c: &mut Client, key: &str) -> String {
    let m = mounts(c, key).await.unwrap();
    assert_eq!(m[0].r#type, "ext4", "{m:?}");
    m[0].source.clone()
}

fn mount(src: &str, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    sh(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop", src])
        .arg(dir))
    .unwrap();
}

/// `dd` with O_DIRECT on the side(s) on the mount (no page cache: the blocks go through
/// the loop device and FUSE), as a child to wait for with a deadline.
fn dd(from: &Path, to: &Path, direct: &str) -> Child {
    Command::new("dd")
        .arg(format!("if={}", from.display()))
        .arg(format!("of={}", to.display()))
        .args(["bs=4M", "status=none", direct])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits at most `timeout` for `child`; its exit and stderr, or `None` (then killed).
fn finish(mut child: Child, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            return Some((st, err));
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    sh(Command::new("cmp").arg(a).arg(b)).is_ok()
}

#[test]
fn kill_9_on_nfs_a_mount_made_before_keeps_reading_and_writing() {
    if let Some(why) = missing(&["mkfs.ext4", "debugfs", "fsfreeze", "losetup", "dd", "cmp"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some(nfs) = nfs_run("snaprestart") else {
        return;
    };
    let dir = &nfs.tmp;
    let cfg = write_config(dir.path(), &nfs.toml(), fd_keeper_extra());
    let socket = dir.path().join("root/keeper.sock");
    let _cleanup = KeeperCleanup {
        socket: socket.clone(),
        dir: dir.path().to_owned(),
    };
    let rt = runtime();
    let m1 = dir.path().join("m1");
    let m3 = dir.path().join("m3");
    let mz = dir.path().join("mz");
    // Local copies of what goes onto the mount.
    let local = |name: &str, seed: u64, len: usize| {
        let p = dir.path().join(name);
        std::fs::write(&p, slacker_testkit::checks::noise(len, seed)).unwrap();
        p
    };
    let big = local("big.expected", 1, 64 << 20);
    let cold = local("cold.expected", 2, 4 << 20);
    let during = local("during.expected", 3, 1 << 20);
    let after = local("after.expected", 4, 1 << 20);

    // A keeper of a previous boot left its socket file: nobody listens there.
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut snap = snapshotter(&cfg);
    let before = rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        prepare(&mut c, "a", "").await.unwrap();
        let src = mounts_of(&mut c, "a").await;
        assert!(src.ends_with("/disk.img"), "served through FUSE: {src}");
        mount(&src, &m1);
        std::fs::write(m1.join("before"), b"written before the kill\n").unwrap();
        for (from, name) in [(&big, "big"), (&cold, "cold")] {
            let (st, err) = finish(
                dd(from, &m1.join(name), "oflag=direct"),
                Duration::from_secs(300),
            )
            .expect("writing to the mount");
            assert!(st.success(), "{err}");
        }
        sh(Command::new("sync").arg("-f").arg(m1.join("before"))).unwrap();
        // A snapshot removed while still mounted: its volume and session stay (until
        // the mount goes), no document names it.
        prepare(&mut c, "z", "").await.unwrap();
        let z = mounts_of(&mut c, "z").await;
        mount(&z, &mz);
        std::fs::write(mz.join("z"), vec![9u8; 1 << 20]).unwrap();
        sh(Command::new("sync").arg("-f").arg(mz.join("z"))).unwrap();
        remove(&mut c, "z").await.unwrap();
        (src, z)
    });
    let (before, z) = before;
    let keepers = keeper_pids(&socket);
    eprintln!("keeper processes: {keepers:?}");

    // A large read in flight at the kill: O_DIRECT, so every block goes to the snapshotter
    // (diverged blocks: read from the storage). Kill once it has read a first part.
    let big_read = dir.path().join("big.read");
    let reader = dd(&m1.join("big"), &big_read, "iflag=direct");
    assert!(
        wait_until(Duration::from_secs(60), || std::fs::metadata(&big_read)
            .is_ok_and(|m| m.len() > 0)),
        "the read does not start"
    );
    snap.kill();
    let mut reader = reader;
    if let Some(st) = reader.try_wait().unwrap() {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut reader.stderr.take().unwrap(), &mut err);
        assert!(
            !st.success(),
            "the read ended before the kill (make the file larger)"
        );
        panic!("the read in flight at the kill failed at the kill ({st}): {err}");
    }
    // While no snapshotter runs: a write + fsync on the old mount waits, nothing fails.
    let writer = dd(&during, &m1.join("during"), "conv=fsync");
    std::thread::sleep(Duration::from_millis(1500));
    let down = (reader.try_wait().unwrap(), {
        let mut w = writer;
        let st = w.try_wait().unwrap();
        (w, st)
    });
    let (writer, writer_done) = down.1;
    assert!(
        down.0.is_none() && writer_done.is_none_or(|st| st.success()),
        "IO on the old mount failed while the snapshotter was down: read {:?}, write {:?}",
        down.0,
        writer_done
    );

    let snap = snapshotter(&cfg);
    let restarted = Instant::now();
    let (st, err) = finish(reader, Duration::from_secs(180))
        .expect("the read in flight at the kill completes after the restart");
    assert!(st.success(), "the read in flight at the kill failed: {err}");
    assert!(
        same_file(&big_read, &big),
        "the read in flight at the kill read wrong data"
    );
    eprintln!(
        "the read in flight at the kill completed {:?} after the restart began",
        restarted.elapsed()
    );
    let (st, err) = finish(writer, Duration::from_secs(120)).expect("the write completes");
    assert!(
        st.success(),
        "write + fsync across the restart failed: {err}"
    );
    // The old mount after the restart: data the new process has not cached (O_DIRECT, from
    // the storage), a write with fsync.
    assert_eq!(
        std::fs::read_to_string(m1.join("before")).unwrap(),
        "written before the kill\n"
    );
    let cold_read = dir.path().join("cold.read");
    let (st, err) = finish(
        dd(&m1.join("cold"), &cold_read, "iflag=direct"),
        Duration::from_secs(120),
    )
    .expect("reading the old mount after the restart");
    assert!(st.success() && same_file(&cold_read, &cold), "{err}");
    let (st, err) = finish(
        dd(&after, &m1.join("after"), "conv=fsync"),
        Duration::from_secs(120),
    )
    .expect("writing the old mount after the restart");
    assert!(st.success(), "{err}");
    assert_eq!(keepers.len(), 1, "one keeper: {keepers:?}");
    let log = std::fs::read_to_string(&snap.log).unwrap_or_default();
    assert!(
        log.contains("FUSE connection resumed from the fd keeper"),
        "the restarted snapshotter did not resume: {log}"
    );
    assert_eq!(
        keeper_pids(&socket),
        keepers,
        "the restarted snapshotter uses the same keeper"
    );
    // The removed snapshot's connection is not resumed: the restarted snapshotter had the
    // keeper close it (that aborts it), so its mount fails instead of waiting forever,
    // and the keeper holds only a's.
    let (st, _) = finish(
        dd(&mz.join("z"), &dir.path().join("z.read"), "iflag=direct"),
        Duration::from_secs(60),
    )
    .expect("a read of the removed snapshot's mount ends");
    assert!(
        !st.success(),
        "the removed snapshot's connection still serves"
    );
    assert_eq!(
        fuse_fds(keepers[0]),
        1,
        "the keeper holds a's connection only"
    );
    sh(Command::new("umount").arg(&mz)).unwrap();
    let z_fuse = Path::new(&z)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let left: Vec<String> = mounts_and_loops_under(dir.path())
        .into_iter()
        .filter(|m| m.contains(&z_fuse))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "the removed snapshot's dead FUSE mount"
    );

    rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        assert_eq!(walk(&mut c).await, [("a".to_owned(), 2)], "a, active");
        let again = mounts_of(&mut c, "a").await;
        assert_eq!(again, before, "the same path is served again");
        // The old mount goes (its loop device autoclears); the resumed session stops
        // like any other at the commit.
        sh(Command::new("umount").arg(&m1)).unwrap();
        commit(&mut c, "c1", "a").await.unwrap();
        // Every write is on the storage: a clone of the committed snapshot shows it.
        prepare(&mut c, "b", "c1").await.unwrap();
        let src = mounts_of(&mut c, "b").await;
        mount(&src, &m3);
        let text = std::fs::read_to_string(m3.join("before")).unwrap();
        let files = [
            (m3.join("big"), &big),
            (m3.join("cold"), &cold),
            (m3.join("during"), &during),
            (m3.join("after"), &after),
        ];
        let same: Vec<bool> = files.iter().map(|(a, b)| same_file(a, b)).collect();
        sh(Command::new("umount").arg(&m3)).unwrap();
        assert_eq!(text, "written before the kill\n");
        assert_eq!(same, [true; 4], "big, cold, during, after on the storage");
        // Walk and the storage agree; removing everything leaves no volume.
        assert_eq!(
            walk(&mut c).await,
            [("b".to_owned(), 2), ("c1".to_owned(), 3)],
            "b active, c1 committed"
        );
        assert_eq!(nfs.volumes().await.len(), 1, "b's volume");
        for k in ["b", "c1"] {
            remove(&mut c, k).await.unwrap();
        }
        assert!(walk(&mut c).await.is_empty());
        assert_eq!(nfs.volumes().await, Vec::<String>::new());
    });
    // Nothing left: no FUSE descriptor in the snapshotter or the keeper, no mount, no
    // loop device; once the snapshotter is gone, the keeper (holding nothing) exits.
    assert_no_fuse_fds(snap.child.id(), &keepers);
    assert_eq!(mounts_and_loops_under(dir.path()), Vec::<String>::new());
    // kill, not drop: dropping kills the keeper too.
    let mut snap = snap;
    snap.kill();
    assert_keeper_exits(&socket);
}
