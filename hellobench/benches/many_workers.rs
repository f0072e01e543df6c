//! Many workers deploying one freshly pushed image at once, on Ceph RBD and on NFS
//! (issue 15).
//!
//! N = 1, 2, 4, 8 worker processes, each in a network namespace of its own behind one
//! shared emulated link (a bridge whose egress towards the workers is shaped with
//! `tbf`, the recipe of COMPONENTS.md section 5), each with its own backend client and
//! its own block cache, deploy the same image at the same instant. A deploy is what a
//! slacker worker does before the container's first instruction: clone the image's
//! snapshot into a volume of its own, open it lazily (`LazyVolume`) and read the blocks
//! the container reads at startup (a fixed trace, the same for every worker). The
//! container itself (FUSE, loop, ext4, the process) is left out: it costs the same on
//! both stores and does not touch storage beyond the trace.
//!
//! Reported per N: deploy p50 and p99 over all workers and repetitions, bytes each
//! worker read from storage, and the storage server's CPU time during the deploys (the
//! `ceph-osd` process; the knfsd VM's `qemu` process). Every repetition pushes a fresh
//! image first (a new volume written and snapshotted), so no worker finds it warm.
//!
//! ```text
//! sudo -E cargo bench --profile dev -p slacker-hellobench --bench many_workers -- \
//!     [--backends rbd,nfs] [--workers 1,2,4,8] [--reps 3] [--image-mib 128] \
//!     [--startup-mib 4] [--rate 1gbit] [--keep-cluster]
//! ```
//!
//! Needs root (namespaces, veth, tc). RBD: a throw-away cluster of
//! `slacker-backend-rbd/cluster/start.sh` listening on the bridge (`/tmp/slacker-mw-ceph`,
//! monitor port 3610; purged at the end unless `--keep-cluster`). NFS:
//! `SLACKER_NFS_ADDR=host:port` (the knfsd VM), reached from the namespaces through a
//! TCP relay on the bridge address; the VM's qemu process is found by its `-name nfsvm`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use slacker_backend_nfs::NfsBuilder;
use slacker_backend_rbd::{RbdBuilder, RbdConfig};
use slacker_core::worker::{BlockCache, Counting, LazyVolume, LazyVolumeOptions};
use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};

const BRIDGE: &str = "slkmwbr";
const BRIDGE_IP: &str = "10.231.15.1";
const NET: &str = "10.231.15.0/24";
const RBD_DIR: &str = "/tmp/slacker-mw-ceph";
const RBD_PORT: &str = "3610";
const RELAY_PORT: u16 = 20499;

type Res<T> = std::result::Result<T, String>;

fn netns(i: usize) -> String {
    format!("slkmw{i}")
}

/// Runs a command, failing with its stderr.
fn run(cmd: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn net_down(n: usize) {
    for i in 0..n {
        let _ = run("ip", &["netns", "del", &netns(i)]);
    }
    let _ = run("ip", &["link", "del", BRIDGE]);
}

/// The bridge (server side, shaped towards the workers) and `n` worker namespaces.
fn net_up(n: usize, rate: &str) -> Res<()> {
    net_down(n);
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run(
        "ip",
        &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE],
    )?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    // Everything the servers send to any worker leaves through this one queue.
    run(
        "tc",
        &[
            "qdisc", "add", "dev", BRIDGE, "root", "tbf", "rate", rate, "burst", "1mb", "latency",
            "50ms",
        ],
    )?;
    for i in 0..n {
        let ns = netns(i);
        let (inner, outer) = (format!("slkmw{i}a"), format!("slkmw{i}b"));
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ],
        )?;
        run("ip", &["link", "set", &inner, "netns", &ns])?;
        run("ip", &["link", "set", &outer, "master", BRIDGE, "up"])?;
        let ip = format!("10.231.15.{}/24", 10 + i);
        run("ip", &["-n", &ns, "addr", "add", &ip, "dev", &inner])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
    }
    Ok(())
}

/// CPU time (user + system) of a process, in milliseconds.
fn cpu_ms(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let rest = stat
        .rsplit_once(')')
        .ok_or("unreadable /proc stat")?
        .1
        .split_whitespace()
        .collect::<Vec<_>>();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: u64 = rest[11].parse::<u64>().unwrap_or(0) + rest[12].parse::<u64>().unwrap_or(0);
    let hz = run("getconf", &["CLK_TCK"])?
        .trim()
        .parse::<u64>()
        .unwrap_or(100);
    Ok(ticks * 1000 / hz)
}

/// The pid of the first process whose command line contains every one of `needles`.
fn find_pid(needles: &[&str]) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) {
            return Some(pid);
        }
    }
    None
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A container's startup reads: `total` bytes in 4-64 KiB reads at fixed pseudo-random
/// 4 KiB-aligned offsets of an image of `size` bytes.
fn startup_trace(size: u64, total: u64) -> Vec<(u64, usize)> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    let mut sum = 0;
    while sum < total {
        let len = 4096 * (1 + next() % 16) as usize;
        let off = (next() % ((size - len as u64) / 4096)) * 4096;
        out.push((off, len));
        sum += len as u64;
    }
    out
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Job {
    kind: String,
    rbd: Option<RbdConfig>,
    nfs_addr: Option<String>,
    nfs_dir: Option<String>,
    snapshot: String,
    volume: String,
    trace: Vec<(u64, usize)>,
    start_at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct WorkerResult {
    deploy_ms: f64,
    bytes_read: u64,
    read_requests: u64,
    late_ms: u64,
}

async fn deploy<B: Backend + 'static>(b: B, job: &Job) -> Res<WorkerResult> {
    let b = Arc::new(Counting::new(b));
    let snap: SnapshotId = job
        .snapshot
        .parse()
        .map_err(|e: slacker_core::Error| e.to_string())?;
    let vol = VolumeId::new(&job.volume).map_err(|e| e.to_string())?;
    let wait = job.start_at_ms.saturating_sub(now_ms());
    let late_ms = now_ms().saturating_sub(job.start_at_ms);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    b.reset();
    let t = Instant::now();
    b.clone_snapshot(&snap, &vol)
        .await
        .map_err(|e| e.to_string())?;
    let dynb: Arc<dyn Backend> = b.clone();
    let lazy = LazyVolume::open(
        dynb,
        vol,
        Arc::new(BlockCache::new(256 << 20)),
        LazyVolumeOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    for &(off, len) in &job.trace {
        lazy.read_at(off, len).await.map_err(|e| e.to_string())?;
    }
    let deploy_ms = t.elapsed().as_secs_f64() * 1000.0;
    let c = b.counts();
    Ok(WorkerResult {
        deploy_ms,
        bytes_read: c.bytes_read(),
        read_requests: c.read_requests(),
        late_ms,
    })
}

async fn worker(job: Job) -> Res<WorkerResult> {
    match job.kind.as_str() {
        "rbd" => {
            let cfg = job.rbd.clone().ok_or("no rbd config")?;
            let b = RbdBuilder::from_config(cfg)
                .build()
                .await
                .map_err(|e| e.to_string())?;
            deploy(b, &job).await
        }
        "nfs" => {
            let b = NfsBuilder::new(job.nfs_addr.clone().ok_or("no nfs address")?)
                .dir(job.nfs_dir.clone().ok_or("no nfs dir")?)
                .connect_timeout(Duration::from_secs(10))
                .build()
                .await
                .map_err(|e| e.to_string())?;
            deploy(b, &job).await
        }
        k => Err(format!("unknown backend {k}")),
    }
}

/// Relays TCP connections from `listen` to `target` (thread per direction).
fn relay(listen: &str, target: String) -> Res<()> {
    let l = TcpListener::bind(listen).map_err(|e| format!("relay {listen}: {e}"))?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(s) = TcpStream::connect(&target) else {
                continue;
            };
            let _ = c.set_nodelay(true);
            let _ = s.set_nodelay(true);
            let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            let pipe = |mut a: TcpStream, mut b: TcpStream| {
                move || {
                    let mut buf = vec![0u8; 256 << 10];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                }
            };
            std::thread::spawn(pipe(c, s2));
            std::thread::spawn(pipe(s, c2));
        }
    });
    Ok(())
}

struct Args {
    backends: Vec<String>,
    workers: Vec<usize>,
    reps: usize,
    image_mib: u64,
    startup_mib: u64,
    rate: String,
    keep_cluster: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        backends: vec!["rbd".into(), "nfs".into()],
        workers: vec![1, 2, 4, 8],
        reps: 3,
        image_mib: 128,
        startup_mib: 4,
        rate: "1gbit".into(),
        keep_cluster: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--backends" => a.backends = val()?.split(',').map(str::to_owned).collect(),
            "--workers" => {
                a.workers = val()?
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("bad worker count {s}")))
                    .collect::<Res<_>>()?
            }
            "--reps" => a.reps = val()?.parse().map_err(|_| "bad --reps")?,
            "--image-mib" => a.image_mib = val()?.parse().map_err(|_| "bad --image-mib")?,
            "--startup-mib" => a.startup_mib = val()?.parse().map_err(|_| "bad --startup-mib")?,
            "--rate" => a.rate = val()?,
            "--keep-cluster" => a.keep_cluster = true,
            // cargo bench passes --bench
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn rbd_cluster() -> Res<(RbdConfig, u32)> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../slacker-backend-rbd/cluster/start.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CEPH_DIR", RBD_DIR)
        .env("MON_PORT", RBD_PORT)
        .env("MON_IP", BRIDGE_IP)
        .env("PUBLIC_NET", NET)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed", script.display()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    let mut c = RbdConfig::new(get("SLACKER_RBD_MON").ok_or("no monitors printed")?);
    c.keyring = get("SLACKER_RBD_KEYRING").filter(|k| !k.is_empty());
    c.namespace = Some(format!("mw-{}", std::process::id()));
    let pid = std::fs::read_to_string(format!("{RBD_DIR}/run/osd.pid"))
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|_| "bad osd pid")?;
    Ok((c, pid))
}

/// Pushes a fresh image: a volume of `mib` MiB of data, snapshotted.
async fn push(b: &dyn Backend, name: &str, mib: u64) -> Res<SnapshotId> {
    let v = VolumeId::new(name).map_err(|e| e.to_string())?;
    b.create_volume(&v, &VolumeOptions::new(mib << 20))
        .await
        .map_err(|e| e.to_string())?;
    for chunk in 0..mib / 4 {
        let data = slacker_testkit::checks::noise(4 << 20, chunk ^ now_ms());
        b.write_at(&v, chunk * (4 << 20), &data)
            .await
            .map_err(|e| e.to_string())?;
    }
    b.flush(&v).await.map_err(|e| e.to_string())?;
    b.snapshot(&v).await.map_err(|e| e.to_string())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[derive(Serialize)]
struct Row {
    backend: String,
    workers: usize,
    deploys: usize,
    p50_ms: f64,
    p99_ms: f64,
    bytes_per_worker_mean: u64,
    bytes_per_worker_max: u64,
    server_cpu_ms_per_round: f64,
}

async fn measure(
    args: &Args,
    kind: &str,
    admin: Arc<dyn Backend>,
    job_base: Job,
    server_pid: u32,
) -> Res<Vec<Row>> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let size = args.image_mib << 20;
    let trace = startup_trace(size, args.startup_mib << 20);
    let mut rows = Vec::new();
    for &n in &args.workers {
        let (mut times, mut bytes, mut cpu) = (Vec::new(), Vec::new(), 0u64);
        for rep in 0..args.reps {
            let img = format!("img-{n}-{rep}");
            let snap = push(admin.as_ref(), &img, args.image_mib).await?;
            let start_at = now_ms() + 4000;
            let mut children = Vec::new();
            for i in 0..n {
                let mut job = job_base.clone();
                job.snapshot = snap.to_string();
                job.volume = format!("w-{n}-{rep}-{i}");
                job.trace = trace.clone();
                job.start_at_ms = start_at;
                let json = serde_json::to_string(&job).map_err(|e| e.to_string())?;
                let child = Command::new("ip")
                    .args(["netns", "exec", &netns(i)])
                    .arg(&exe)
                    .args(["--worker", &json])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| e.to_string())?;
                children.push(child);
            }
            tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(now_ms()))).await;
            let cpu0 = cpu_ms(server_pid)?;
            for mut c in children {
                let out = BufReader::new(c.stdout.take().unwrap())
                    .lines()
                    .map_while(|l| l.ok())
                    .find_map(|l| l.strip_prefix("RESULT ").map(str::to_owned));
                let status = c.wait().map_err(|e| e.to_string())?;
                let r: WorkerResult =
                    serde_json::from_str(&out.ok_or(format!("{kind} worker failed ({status})"))?)
                        .map_err(|e| e.to_string())?;
                if r.late_ms > 0 {
                    eprintln!("note: a worker connected {} ms after the start", r.late_ms);
                }
                times.push(r.deploy_ms);
                bytes.push(r.bytes_read);
            }
            cpu += cpu_ms(server_pid)?.saturating_sub(cpu0);
            eprintln!("{kind} N={n} rep {rep}: done");
        }
        times.sort_by(f64::total_cmp);
        rows.push(Row {
            backend: kind.to_owned(),
            workers: n,
            deploys: times.len(),
            p50_ms: pct(&times, 50.0),
            p99_ms: pct(&times, 99.0),
            bytes_per_worker_mean: bytes.iter().sum::<u64>() / bytes.len().max(1) as u64,
            bytes_per_worker_max: bytes.iter().copied().max().unwrap_or(0),
            server_cpu_ms_per_round: cpu as f64 / args.reps as f64,
        });
    }
    // Leave nothing behind in the store.
    for v in admin.list_volumes().await.map_err(|e| e.to_string())? {
        let _ = admin.remove_volume(&v).await;
    }
    for s in admin.list_snapshots().await.map_err(|e| e.to_string())? {
        let _ = admin.remove_snapshot(&s).await;
    }
    Ok(rows)
}

async fn coordinator(args: Args) -> Res<()> {
    let nmax = args.workers.iter().copied().max().unwrap_or(1);
    net_up(nmax, &args.rate)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average at start: {}", load.trim());
    let mut rows = Vec::new();
    let result = async {
        for kind in &args.backends {
            match kind.as_str() {
                "rbd" => {
                    let (cfg, osd) = rbd_cluster()?;
                    let admin = RbdBuilder::from_config(cfg.clone())
                        .build()
                        .await
                        .map_err(|e| e.to_string())?;
                    let job = Job {
                        kind: "rbd".into(),
                        rbd: Some(cfg),
                        nfs_addr: None,
                        nfs_dir: None,
                        snapshot: String::new(),
                        volume: String::new(),
                        trace: Vec::new(),
                        start_at_ms: 0,
                    };
                    rows.extend(measure(&args, "rbd", Arc::new(admin), job, osd).await?);
                }
                "nfs" => {
                    let addr = std::env::var("SLACKER_NFS_ADDR")
                        .map_err(|_| "nfs needs SLACKER_NFS_ADDR=host:port (the knfsd VM)")?;
                    let qemu = find_pid(&["qemu-system", "-name nfsvm"])
                        .ok_or("no qemu process with -name nfsvm (the knfsd VM)")?;
                    let listen = format!("{BRIDGE_IP}:{RELAY_PORT}");
                    relay(&listen, addr.clone())?;
                    let dir = format!("manyworkers-{}", std::process::id());
                    let admin = NfsBuilder::new(addr)
                        .dir(dir.clone())
                        .connect_timeout(Duration::from_secs(10))
                        .build()
                        .await
                        .map_err(|e| e.to_string())?;
                    let job = Job {
                        kind: "nfs".into(),
                        rbd: None,
                        nfs_addr: Some(listen),
                        nfs_dir: Some(dir),
                        snapshot: String::new(),
                        volume: String::new(),
                        trace: Vec::new(),
                        start_at_ms: 0,
                    };
                    rows.extend(measure(&args, "nfs", Arc::new(admin), job, qemu).await?);
                }
                k => return Err(format!("unknown backend {k}")),
            }
        }
        Ok(())
    }
    .await;
    net_down(nmax);
    if args.backends.iter().any(|b| b == "rbd") && !args.keep_cluster {
        let stop = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../slacker-backend-rbd/cluster/stop.sh");
        let _ = Command::new("bash")
            .arg(stop)
            .arg("--purge")
            .env("CEPH_DIR", RBD_DIR)
            .status();
    }
    result?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "many workers: image {} MiB, startup reads {} MiB, link {} (tbf), {} reps; load at end {}",
        args.image_mib,
        args.startup_mib,
        args.rate,
        args.reps,
        load.trim()
    );
    println!(
        "| backend | N | deploys | p50 ms | p99 ms | p99 / p50(N=1) | read per worker (mean / max) | server CPU ms per round |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.backend == r.backend && b.workers == 1)
            .map_or(f64::NAN, |b| b.p50_ms);
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} MB | {:.0} |",
            r.backend,
            r.workers,
            r.deploys,
            r.p50_ms,
            r.p99_ms,
            r.p99_ms / base,
            r.bytes_per_worker_mean as f64 / 1e6,
            r.bytes_per_worker_max as f64 / 1e6,
            r.server_cpu_ms_per_round
        );
    }
    println!(
        "{}",
        serde_json::to_string(&rows).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if argv.get(1).map(String::as_str) == Some("--worker") {
        let job: Job = serde_json::from_str(&argv[2]).expect("worker job");
        match rt.block_on(worker(job)) {
            Ok(r) => println!("RESULT {}", serde_json::to_string(&r).unwrap()),
            Err(e) => {
                eprintln!("worker: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if rustix_is_root() {
        let args = match parse_args() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("many_workers: {e}");
                std::process::exit(2);
            }
        };
        if let Err(e) = rt.block_on(coordinator(args)) {
            eprintln!("many_workers: {e}");
            std::process::exit(1);
        }
    } else {
        eprintln!("many_workers: needs root (network namespaces, veth, tc)");
        std::process::exit(2);
    }
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}
