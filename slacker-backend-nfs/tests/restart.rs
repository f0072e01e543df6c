//! The server restarting under a running backend, on a VM of this test's own (own
//! `NFSVM_RUN`, fixed port, no guest shell), so that the VM the other tests share is
//! never disturbed: `stop.sh --keep-disk` cuts the power of the server while a worker
//! is cloning and snapshotting, an operation during the outage fails with a typed
//! error within the reconnect timeout, `start.sh --keep-disk` boots the server again on
//! the same disk and port, and then
//! - the same backend recovers its session by itself: new operations work;
//! - a new backend sees everything that was acknowledged, and everything it lists is
//!   complete (readable, with the right content): nothing half-written looks complete;
//! - garbage collection removes the leftovers of the interrupted operation only.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slacker_backend_nfs::{NfsBackend, NfsBuilder};
use slacker_core::{Backend, BackendExt, ErrorKind, SnapshotId, VolumeId, VolumeOptions};
use slacker_testkit::checks::pattern;

const MIB: u64 = 1 << 20;

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("server")
        .join(name)
}

/// A server VM of this test's own; stopped (and its disk deleted) on drop.
struct OwnVm {
    run: PathBuf,
    port: Option<u16>,
}

const RUN_PREFIX: &str = "slacker-nfs-restart-";

impl OwnVm {
    fn new() -> Self {
        Self::clean_stale();
        let run = std::env::temp_dir().join(format!("{RUN_PREFIX}{}", std::process::id()));
        Self { run, port: None }
    }

    /// Stops VMs (and deletes disks) of earlier runs of this test whose process is gone
    /// (killed before its `Drop` ran).
    fn clean_stale() {
        let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(RUN_PREFIX) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let stale = OwnVm {
                    run: e.path(),
                    port: None,
                };
                drop(stale);
            }
        }
    }

    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(script(name))
            .env("NFSVM_RUN", &self.run)
            .env("NFSVM_CTRL", "0");
        if let Some(p) = self.port {
            c.env("NFSVM_PORT", p.to_string());
        }
        c
    }

    /// Starts the VM (on the kept disk with `keep_disk`); returns its address.
    fn start(&mut self, keep_disk: bool) -> Result<String, String> {
        let mut c = self.cmd("start.sh");
        if keep_disk {
            c.arg("--keep-disk");
        }
        let out = c.output().map_err(|e| format!("start.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "start.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("start.sh printed no port: {e}"))?;
        self.port = Some(port);
        Ok(format!("127.0.0.1:{port}"))
    }

    fn stop(&self, keep_disk: bool) -> Result<(), String> {
        let mut c = self.cmd("stop.sh");
        if keep_disk {
            c.arg("--keep-disk");
        }
        let out = c.output().map_err(|e| format!("stop.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("stop.sh: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }
}

impl Drop for OwnVm {
    fn drop(&mut self) {
        if let Err(e) = self.stop(false) {
            eprintln!("{e}");
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

async fn backend(addr: &str) -> NfsBackend {
    NfsBuilder::new(addr)
        .dir("restart")
        .connect_timeout(Duration::from_secs(5))
        .rpc_timeout(Duration::from_secs(10))
        .reconnect_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap_or_else(|e| panic!("backend on {addr}: {e}"))
}

/// What the churning worker had acknowledged before the power cut, and what it was
/// doing when it went.
#[derive(Debug, Default)]
struct Churn {
    volumes: BTreeSet<VolumeId>,
    removed_volumes: BTreeSet<VolumeId>,
    snapshots: BTreeSet<SnapshotId>,
    removed_snapshots: BTreeSet<SnapshotId>,
    held: BTreeSet<SnapshotId>,
    acknowledged: usize,
    /// The object of the operation in progress (its state may be either).
    in_progress: String,
}

impl Churn {
    fn start(m: &Mutex<Self>, what: String) {
        m.lock().unwrap().in_progress = what;
    }

    fn done(m: &Mutex<Self>, f: impl FnOnce(&mut Self)) {
        let mut c = m.lock().unwrap();
        f(&mut c);
        c.acknowledged += 1;
        c.in_progress.clear();
    }
}

/// Clones, snapshots, holds, releases and removes in a loop until an error.
async fn churn(b: NfsBackend, s0: SnapshotId, log: Arc<Mutex<Churn>>) -> slacker_core::Error {
    let mut prev: Option<(VolumeId, SnapshotId)> = None;
    for i in 0.. {
        let k = vid(&format!("k{i}"));
        Churn::start(&log, k.to_string());
        if let Err(e) = b.clone_snapshot(&s0, &k).await {
            return e;
        }
        Churn::done(&log, |c| {
            c.volumes.insert(k.clone());
        });
        Churn::start(&log, format!("a snapshot of {k}"));
        let s = match b.snapshot(&k).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        Churn::done(&log, |c| {
            c.snapshots.insert(s.clone());
        });
        Churn::start(&log, s.to_string());
        if let Err(e) = b.hold_snapshot(&s, "h").await {
            return e;
        }
        Churn::done(&log, |c| {
            c.held.insert(s.clone());
        });
        if let Some((pk, ps)) = prev.take() {
            Churn::start(&log, ps.to_string());
            if let Err(e) = b.release_snapshot(&ps, "h").await {
                return e;
            }
            Churn::done(&log, |c| {
                c.held.remove(&ps);
            });
            Churn::start(&log, ps.to_string());
            if let Err(e) = b.remove_snapshot(&ps).await {
                return e;
            }
            Churn::done(&log, |c| {
                c.snapshots.remove(&ps);
                c.removed_snapshots.insert(ps.clone());
            });
            Churn::start(&log, pk.to_string());
            if let Err(e) = b.remove_volume(&pk).await {
                return e;
            }
            Churn::done(&log, |c| {
                c.volumes.remove(&pk);
                c.removed_volumes.insert(pk.clone());
            });
        }
        prev = Some((k, s));
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run() {
    // Makes sure the VM is installed and built (or prints SKIPPED).
    if std::env::var("SLACKER_NFS_ADDR").is_err() && support::server().is_none() {
        return;
    }
    let mut vm = OwnVm::new();
    let addr = match vm.start(false) {
        Ok(a) => a,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("{e}"),
        Err(e) => {
            println!("SKIPPED: cannot start a server VM of this test's own: {e}");
            return;
        }
    };
    let b = backend(&addr).await;
    let base = vid("base");
    let content = pattern(MIB as usize, 1);
    b.create_volume(&base, &VolumeOptions::new(MIB))
        .await
        .unwrap();
    b.write_at(&base, 0, &content).await.unwrap();
    let s0 = b.snapshot(&base).await.unwrap();
    let c0 = vid("c0");
    b.clone_snapshot(&s0, &c0).await.unwrap();
    b.write_at(&c0, 5000, b"clone data").await.unwrap();
    b.flush(&c0).await.unwrap();
    let c0_content = b.read_volume(&c0).await.unwrap();

    // A worker clones, snapshots, holds, releases and removes in a loop while the
    // power goes.
    let log = Arc::new(Mutex::new(Churn::default()));
    let churn = tokio::spawn(churn(b.clone(), s0.clone(), log.clone()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    vm.stop(true).expect("power cut");
    let t = Instant::now();
    let e = b.read_at(&base, 0, 4096).await.unwrap_err();
    let took = t.elapsed();
    println!("during the outage ({took:?}): {e}");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains(&addr), "{e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let churn_err = churn.await.unwrap();
    assert_eq!(churn_err.kind(), ErrorKind::Backend, "{churn_err}");
    let log = std::mem::take(&mut *log.lock().unwrap());
    println!(
        "{} operations acknowledged before the power cut; the next (on {}) failed with: {churn_err}",
        log.acknowledged, log.in_progress
    );
    assert!(
        log.acknowledged >= 6,
        "the churn did not get going: {log:?}"
    );

    let t = Instant::now();
    let again = vm.start(true).expect("restart on the same disk");
    assert_eq!(again, addr);
    println!("server back after {:?}", t.elapsed());

    // The same backend recovers its session: new operations work.
    assert_eq!(&b.read_volume(&base).await.unwrap()[..], &content[..]);
    let s1 = b.snapshot(&c0).await.unwrap();
    b.clone_snapshot(&s1, &vid("after")).await.unwrap();
    assert_eq!(b.read_volume(&vid("after")).await.unwrap(), c0_content);
    b.write_at(&base, 0, b"after the restart").await.unwrap();

    // A new backend sees everything acknowledged (creations, holds, releases and
    // removals alike), and nothing incomplete.
    let b2 = backend(&addr).await;
    let vols = b2.list_volumes().await.unwrap();
    let snaps = b2.list_snapshots().await.unwrap();
    let open = |name: &str| log.in_progress == name;
    for v in &log.volumes {
        assert!(
            vols.contains(v) || open(v.as_str()),
            "acknowledged {v} lost"
        );
    }
    for v in &log.removed_volumes {
        assert!(!vols.contains(v), "removed {v} is back");
    }
    for s in &log.snapshots {
        assert!(
            snaps.contains(s) || open(s.as_str()),
            "acknowledged {s} lost"
        );
    }
    for s in &log.removed_snapshots {
        assert!(!snaps.contains(s), "removed {s} is back");
    }
    for s in &snaps {
        if *s == s0 || *s == s1 || open(s.as_str()) {
            continue;
        }
        let holds = b2.stat_snapshot(s).await.unwrap().holds;
        let want: Vec<String> = if log.held.contains(s) {
            vec!["h".into()]
        } else {
            Vec::new()
        };
        assert_eq!(holds, want, "holds of {s}");
    }
    let check_all = |b2: NfsBackend, vols: Vec<VolumeId>, snaps: Vec<SnapshotId>| {
        let (content, c0_content, s1) = (content.clone(), c0_content.clone(), s1.clone());
        async move {
            for v in &vols {
                let data = b2.read_volume(v).await.unwrap();
                let want = match v.as_str() {
                    "base" => {
                        let mut w = content.clone();
                        w[..17].copy_from_slice(b"after the restart");
                        w
                    }
                    "c0" | "after" => c0_content.to_vec(),
                    _ => content.clone(), // k*: clones of s0
                };
                assert!(data[..] == want[..], "volume {v} is not complete");
                b2.stat_volume(v).await.unwrap();
            }
            for s in &snaps {
                let data = b2.read_snapshot(s).await.unwrap();
                let want = if *s == s1 {
                    &c0_content[..]
                } else {
                    &content[..]
                };
                assert!(data[..] == want[..], "snapshot {s} is not complete");
            }
        }
    };
    check_all(b2.clone(), vols.clone(), snaps.clone()).await;
    let report = b2.gc(Duration::ZERO).await.unwrap();
    println!("gc after the restart: {report:?}");
    assert_eq!(b2.list_volumes().await.unwrap(), vols);
    assert_eq!(b2.list_snapshots().await.unwrap(), snaps);
    check_all(b2.clone(), vols, snaps).await;
    let _ = b2.close().await;
    let _ = b.close().await;
}
