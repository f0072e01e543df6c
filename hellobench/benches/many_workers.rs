//! Many workers deploying one freshly pushed image at once, on Ceph RBD and on NFS
//! (issue 15).
//!
//! N = 1, 2, 4, 8 worker processes, each in a network namespace of its own on one bridge
//! with the storage server, each with its own backend client and its own block cache,
//! deploy the same image at the same instant (all connect first, then all start).
//!
//! Two topologies (`--link`), both measured in one run by default:
//! - `shared`: ONE emulated link for all workers: the bridge's egress towards every
//!   worker is one `tbf` queue (the recipe of COMPONENTS.md section 5), so N workers
//!   share one 1 Gbit/s.
//! - `per-worker`: every worker host has a link of its own (its own NIC): the egress of
//!   each worker's bridge port is shaped with its own `tbf`; all reach one storage server.
//!
//! Either way every backend call also waits `--latency-us` (default 200 µs) in the
//! worker ([`Throttled`] with latency only): the kernel here has no `netem`. Together:
//! the project's emulated 1 Gbit/s / 200 µs link.
//!
//! A deploy is what a slacker worker does before the container's first instruction, as
//! `slacker_oci::deploy` does it for an image with a startup trace (HelloBench's
//! `slacker-lazy-trace`): clone the image's snapshot into a volume of its own, open it
//! lazily (`LazyVolume`) with blind read-ahead off, prefetch the trace's blocks in the
//! background (bounded parallelism, the library's default), and read the blocks the
//! container reads at startup (the trace, in the container's order, the same for every
//! worker). `--no-trace` deploys as without a trace (read-ahead on, no prefetch). The
//! container itself (FUSE, loop, ext4, the process) is left out: it costs the same on
//! both stores and does not touch storage beyond the trace.
//!
//! Reported per topology and N: deploy p50 and p99 over all workers and repetitions,
//! where a deploy's time goes (clone, open, reads; the worker's own CPU), bytes each
//! worker read from storage, and the storage server's CPU time during the deploys
//! (`ceph-osd` and `ceph-mon`; the knfsd VM's `qemu` process). Every repetition pushes a
//! fresh image first (a new volume written and snapshotted), so no worker finds it warm.
//!
//! ```text
//! sudo -E cargo bench -p slacker-hellobench --bench many_workers -- \
//!     [--backends rbd,nfs] [--workers 1,2,4,8] [--reps 3] [--image-mib 128] \
//!     [--startup-mib 4] [--rate 1gbit] [--latency-us 200] [--link shared,per-worker] \
//!     [--no-trace] [--ceph-debug-logs] [--keep-cluster] [--phase-ops] \
//!     [--client-conf key=value,...] [--osd-conf key=value,...]
//! ```
//!
//! RBD rows also give the OSD's client ops per deploy (its `osd.op` perf counter, read
//! from its admin socket before and after each round); `--phase-ops` splits one
//! deploy's ops into clone, open and reads (at N = 1). `--client-conf` and `--osd-conf`
//! set Ceph options of the workers' clients (a conf file read before connecting) or of
//! the OSD (restarted to read them), for A/B runs.
//!
//! Needs root (namespaces, veth, tc). RBD: a throw-away cluster of
//! `slacker-backend-rbd/cluster/start.sh` listening on the bridge (`/tmp/slacker-mw-ceph`,
//! monitor port 3610; purged at the end unless `--keep-cluster`), with Ceph's debug logging
//! off (as for any Ceph benchmark; `--ceph-debug-logs` keeps the defaults). NFS:
//! `SLACKER_NFS_ADDR=host:port` (the knfsd VM), reached from the namespaces through a
//! TCP relay on the bridge address; the VM's qemu process is `$NFSVM_RUN/qemu.pid` when
//! `NFSVM_RUN` is set (a private VM), else the first process with `-name nfsvm`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use slacker_backend_nfs::NfsBuilder;
use slacker_backend_rbd::{RbdBuilder, RbdConfig};
use slacker_core::worker::{
    BlockCache, Counting, LazyVolume, LazyVolumeOptions, LinkProfile, Throttled,
};
use slacker_core::{Backend, BlockRange, SnapshotId, VolumeId, VolumeOptions};

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

fn worker_port(i: usize) -> String {
    format!("slkmw{i}b")
}

/// Where the emulated link's bandwidth limit sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Link {
    /// One queue for all workers: the bridge's own egress (everything the servers send
    /// to any worker leaves through it).
    Shared,
    /// A queue per worker: the egress of each worker's bridge port (its own NIC).
    PerWorker,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Shared => "shared",
            Link::PerWorker => "per-worker",
        }
    }
}

/// Puts the `tbf` limit(s) of `link` in place for `n` workers (and removes the other's).
fn shape(link: Link, n: usize, rate: &str) -> Res<()> {
    let tbf = |dev: &str| {
        run(
            "tc",
            &[
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
                "latency", "50ms",
            ],
        )
    };
    let _ = run("tc", &["qdisc", "del", "dev", BRIDGE, "root"]);
    for i in 0..n {
        let _ = run("tc", &["qdisc", "del", "dev", &worker_port(i), "root"]);
    }
    match link {
        Link::Shared => tbf(BRIDGE).map(drop),
        Link::PerWorker => (0..n).try_for_each(|i| tbf(&worker_port(i)).map(drop)),
    }
}

/// The bridge (the servers' side) and `n` worker namespaces, unshaped ([`shape`]).
fn net_up(n: usize) -> Res<()> {
    net_down(n);
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run(
        "ip",
        &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE],
    )?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    for i in 0..n {
        let ns = netns(i);
        let (inner, outer) = (format!("slkmw{i}a"), worker_port(i));
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
    Ok(ticks * 1000 / clk_tck())
}

fn clk_tck() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        run("getconf", &["CLK_TCK"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

fn cpu_ms_per_tick() -> u64 {
    1000 / clk_tck()
}

/// CPU ticks of every thread of this process, by thread name with digits dropped
/// (`msgr-worker-0` and `msgr-worker-1` are one `msgr-worker-`).
fn thread_ticks() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(')')) else {
            continue;
        };
        let name: String = head[open + 1..]
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name).or_insert(0) += t;
    }
    out
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

/// Client ops the OSD has served so far: `osd.op` of its perf counters, read from its
/// admin socket (`{"prefix": "perf dump"}`, answered as a 4-byte big-endian length and
/// JSON). Reading them is no OSD op.
fn osd_ops(asok: &str) -> Res<u64> {
    let mut s =
        std::os::unix::net::UnixStream::connect(asok).map_err(|e| format!("{asok}: {e}"))?;
    s.write_all(b"{\"prefix\": \"perf dump\"}\0")
        .map_err(|e| e.to_string())?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| e.to_string())?;
    v["osd"]["op"]
        .as_u64()
        .ok_or_else(|| format!("{asok}: no osd.op counter"))
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
    /// Per backend call, in the worker (the link's round trip).
    latency_us: u64,
    /// Deploy as `slacker_oci::deploy` with a trace: read-ahead off, trace prefetched.
    use_trace: bool,
    /// The OSD's admin socket: count its ops per phase (meaningful with one worker).
    osd_asok: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct WorkerResult {
    deploy_ms: f64,
    bytes_read: u64,
    read_requests: u64,
    /// From the spawn of the workers to this one's start (connects included).
    late_ms: u64,
    /// Where the deploy's time went: the clone, opening the lazy volume, the reads.
    clone_ms: f64,
    open_ms: f64,
    reads_ms: f64,
    /// CPU (user + system) the worker process spent during its deploy.
    cpu_ms: u64,
    /// The same by thread name (digits dropped), threads alive at the end.
    threads: Vec<(String, u64)>,
    /// OSD ops during the clone, the open and the reads (with `Job::osd_asok`).
    osd_ops: Option<[u64; 3]>,
}

async fn deploy<B: Backend + 'static>(b: B, job: &Job) -> Res<WorkerResult> {
    let link = LinkProfile::latency_only(Duration::from_micros(job.latency_us));
    let b = Arc::new(Counting::new(Throttled::new(b, link)));
    let snap: SnapshotId = job
        .snapshot
        .parse()
        .map_err(|e: slacker_core::Error| e.to_string())?;
    let vol = VolumeId::new(&job.volume).map_err(|e| e.to_string())?;
    // Connected: wait until every worker is, then start together.
    println!("READY");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(|| {
        let mut go = String::new();
        std::io::stdin().read_line(&mut go)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let late_ms = now_ms().saturating_sub(job.start_at_ms);
    let me = std::process::id();
    let cpu0 = cpu_ms(me)?;
    let threads0 = thread_ticks();
    let ops = || job.osd_asok.as_deref().map(osd_ops).transpose();
    let mut ops_at = vec![ops()?];
    b.reset();
    let t = Instant::now();
    b.clone_snapshot(&snap, &vol)
        .await
        .map_err(|e| e.to_string())?;
    let clone_ms = t.elapsed().as_secs_f64() * 1000.0;
    ops_at.push(ops()?);
    let dynb: Arc<dyn Backend> = b.clone();
    // What `slacker_oci::deploy` does for an image with a trace: blind read-ahead off,
    // the trace's blocks prefetched in the background (default parallelism).
    let mut opts = LazyVolumeOptions::default();
    if job.use_trace {
        opts = opts.with_read_ahead(0).with_max_read_ahead(0);
    }
    let lazy = LazyVolume::open(dynb, vol, Arc::new(BlockCache::new(256 << 20)), opts)
        .await
        .map_err(|e| e.to_string())?;
    let open_ms = t.elapsed().as_secs_f64() * 1000.0 - clone_ms;
    ops_at.push(ops()?);
    let prefetch = job.use_trace.then(|| {
        let bs = lazy.block_size().bytes();
        lazy.prefetch(job.trace.iter().map(|&(off, len)| {
            BlockRange::new((off / bs) as u32, (off + len as u64).div_ceil(bs) as u32)
        }))
    });
    for &(off, len) in &job.trace {
        lazy.read_at(off, len).await.map_err(|e| e.to_string())?;
    }
    let deploy_ms = t.elapsed().as_secs_f64() * 1000.0;
    if let Some(p) = prefetch {
        p.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let cpu_ms = cpu_ms(me)?.saturating_sub(cpu0);
    ops_at.push(ops()?);
    let osd_ops = match ops_at[..] {
        [Some(a), Some(b), Some(c), Some(d)] => Some([b - a, c - b, d - c]),
        _ => None,
    };
    // Threads that ended during the deploy are missing here (their CPU is in cpu_ms).
    let hz = cpu_ms_per_tick();
    let threads = thread_ticks()
        .into_iter()
        .map(|(k, t)| {
            let before = threads0.get(&k).copied().unwrap_or(0);
            (k, t.saturating_sub(before) * hz)
        })
        .filter(|(_, ms)| *ms > 0)
        .collect();
    let c = b.counts();
    Ok(WorkerResult {
        deploy_ms,
        bytes_read: c.bytes_read(),
        read_requests: c.read_requests(),
        late_ms,
        clone_ms,
        open_ms,
        reads_ms: deploy_ms - clone_ms - open_ms,
        cpu_ms,
        threads,
        osd_ops,
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
    latency_us: u64,
    links: Vec<Link>,
    use_trace: bool,
    ceph_quiet: bool,
    keep_cluster: bool,
    /// Count OSD ops per phase of a deploy (N = 1).
    phase_ops: bool,
    /// Ceph options for the workers' clients (`key=value`), for A/B runs.
    client_conf: Vec<String>,
    /// Ceph options for the OSD (`key=value`), for A/B runs.
    osd_conf: Vec<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        backends: vec!["rbd".into(), "nfs".into()],
        workers: vec![1, 2, 4, 8],
        reps: 3,
        image_mib: 128,
        startup_mib: 4,
        rate: "1gbit".into(),
        latency_us: 200,
        links: vec![Link::Shared, Link::PerWorker],
        use_trace: true,
        ceph_quiet: true,
        keep_cluster: false,
        phase_ops: false,
        client_conf: Vec::new(),
        osd_conf: Vec::new(),
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
            "--latency-us" => a.latency_us = val()?.parse().map_err(|_| "bad --latency-us")?,
            "--link" => {
                a.links = val()?
                    .split(',')
                    .map(|l| match l {
                        "shared" => Ok(Link::Shared),
                        "per-worker" => Ok(Link::PerWorker),
                        _ => Err(format!("bad --link {l} (shared, per-worker)")),
                    })
                    .collect::<Res<_>>()?
            }
            "--no-trace" => a.use_trace = false,
            "--ceph-debug-logs" => a.ceph_quiet = false,
            "--keep-cluster" => a.keep_cluster = true,
            "--phase-ops" => a.phase_ops = true,
            "--client-conf" | "--osd-conf" => {
                let kvs: Vec<String> = val()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = kvs.iter().find(|kv| !kv.contains('=')) {
                    return Err(format!("bad {k} {bad} (key=value,...)"));
                }
                if k == "--osd-conf" {
                    a.osd_conf = kvs;
                } else {
                    a.client_conf = kvs;
                }
            }
            // cargo bench passes --bench
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// The cluster's config and its storage server processes (OSD, monitor, manager).
/// `quiet`: Ceph's debug logging off, daemons and clients.
/// `client_conf`: `key=value` options every client reads from a conf file of its own
/// (before it connects: thread counts cannot come from the monitor's config database).
/// `osd_conf`: `key=value` options of the OSD (in the monitor's config database; the OSD
/// is restarted to read them).
fn rbd_cluster(
    quiet: bool,
    client_conf: &[String],
    osd_conf: &[String],
) -> Res<(RbdConfig, Vec<(String, u32)>)> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../slacker-backend-rbd/cluster/start.sh");
    // Starts what is not running (the script is idempotent) and waits until it is ready.
    let start = || -> Res<String> {
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
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let stdout = start()?;
    if !osd_conf.is_empty() {
        let conf = format!("{RBD_DIR}/osd.conf");
        std::fs::write(&conf, format!("[osd]\n{}\n", osd_conf.join("\n")))
            .map_err(|e| e.to_string())?;
        let ceph_conf = format!("{RBD_DIR}/ceph.conf");
        run(
            "ceph",
            &["-c", &ceph_conf, "config", "assimilate-conf", "-i", &conf],
        )?;
        let pid =
            std::fs::read_to_string(format!("{RBD_DIR}/run/osd.pid")).map_err(|e| e.to_string())?;
        let pid = pid.trim();
        run("kill", &[pid])?;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
        start()?;
    }
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    let mut c = RbdConfig::new(get("SLACKER_RBD_MON").ok_or("no monitors printed")?);
    c.keyring = get("SLACKER_RBD_KEYRING").filter(|k| !k.is_empty());
    c.namespace = Some(format!("mw-{}", std::process::id()));
    if !client_conf.is_empty() {
        let conf = format!("{RBD_DIR}/client.conf");
        let mut text = String::from("[global]\n");
        for kv in client_conf {
            text.push_str(&format!("{kv}\n"));
        }
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        c.conf_file = Some(conf);
    }
    if quiet {
        // Debug logging off (Ceph gathers levels up to 5 in memory by default: CPU on
        // every op), in the monitor's config database: daemons apply it at once and
        // every client gets it when it connects.
        let conf = format!("{RBD_DIR}/quiet.conf");
        let mut text = String::from("[global]\n");
        for sub in [
            "ms",
            "osd",
            "bluestore",
            "bluefs",
            "bdev",
            "rocksdb",
            "objecter",
            "rados",
            "rbd",
            "auth",
            "monc",
            "mon",
            "paxos",
            "finisher",
            "journaler",
            "objectcacher",
            "client",
            "optracker",
            "asok",
            "throttle",
            "refs",
            "crush",
            "mgrc",
            "perfcounter",
        ] {
            text.push_str(&format!("debug_{sub} = 0/0\n"));
        }
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        run(
            "ceph",
            &[
                "-c",
                &format!("{RBD_DIR}/ceph.conf"),
                "config",
                "assimilate-conf",
                "-i",
                &conf,
            ],
        )?;
    }
    let mut pids = Vec::new();
    for d in ["osd", "mon", "mgr"] {
        let pid = std::fs::read_to_string(format!("{RBD_DIR}/run/{d}.pid"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|_| format!("bad {d} pid"))?;
        pids.push((format!("ceph-{d}"), pid));
    }
    Ok((c, pids))
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
    link: &'static str,
    workers: usize,
    deploys: usize,
    p50_ms: f64,
    p99_ms: f64,
    clone_ms_mean: f64,
    open_ms_mean: f64,
    reads_ms_mean: f64,
    worker_cpu_ms_mean: f64,
    /// Worker CPU per deploy by thread name (mean), largest first.
    worker_threads_ms_mean: Vec<(String, f64)>,
    bytes_per_worker_mean: u64,
    bytes_per_worker_max: u64,
    requests_per_worker_mean: u64,
    /// Per server process: CPU ms per round.
    server_cpu_ms_per_round: Vec<(String, f64)>,
    /// OSD client ops per deploy (RBD).
    osd_ops_per_deploy: Option<f64>,
    /// OSD ops of one deploy's clone, open and reads (`--phase-ops`, N = 1 only).
    osd_ops_phases: Option<[f64; 3]>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    sum / n.max(1) as f64
}

async fn measure(
    args: &Args,
    link: Link,
    kind: &str,
    admin: &dyn Backend,
    job_base: &Job,
    server: &[(String, u32)],
    osd_asok: Option<&str>,
) -> Res<Vec<Row>> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let size = args.image_mib << 20;
    let trace = startup_trace(size, args.startup_mib << 20);
    let mut rows = Vec::new();
    let lname = link.name();
    for &n in &args.workers {
        let (mut results, mut cpu) = (Vec::new(), vec![0u64; server.len()]);
        let mut ops = 0;
        for rep in 0..args.reps {
            let img = format!("img-{lname}-{n}-{rep}");
            let snap = push(admin, &img, args.image_mib).await?;
            let start_at = now_ms();
            let mut children = Vec::new();
            for i in 0..n {
                let mut job = job_base.clone();
                job.snapshot = snap.to_string();
                job.volume = format!("w-{lname}-{n}-{rep}-{i}");
                job.trace = trace.clone();
                job.start_at_ms = start_at;
                job.osd_asok = osd_asok
                    .filter(|_| args.phase_ops && n == 1)
                    .map(str::to_owned);
                let json = serde_json::to_string(&job).map_err(|e| e.to_string())?;
                let child = Command::new("ip")
                    .args(["netns", "exec", &netns(i)])
                    .arg(&exe)
                    .args(["--worker", &json])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| e.to_string())?;
                children.push(child);
            }
            // Every worker connects its client first (seconds under load); the deploys
            // start together once all have.
            let mut outs = Vec::new();
            for c in &mut children {
                let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
                if !lines.any(|l| l.is_ok_and(|l| l == "READY")) {
                    return Err(format!("a {kind} worker died before it was ready"));
                }
                outs.push(lines);
            }
            let connected_ms = now_ms() - start_at;
            let cpu0 = server
                .iter()
                .map(|(_, p)| cpu_ms(*p))
                .collect::<Res<Vec<_>>>()?;
            let ops0 = osd_asok.map(osd_ops).transpose()?;
            for c in &mut children {
                let mut stdin = c.stdin.take().unwrap();
                stdin.write_all(b"go\n").map_err(|e| e.to_string())?;
            }
            for (mut c, mut lines) in children.into_iter().zip(outs) {
                let out = lines
                    .by_ref()
                    .map_while(|l| l.ok())
                    .find_map(|l| l.strip_prefix("RESULT ").map(str::to_owned));
                let status = c.wait().map_err(|e| e.to_string())?;
                let r: WorkerResult =
                    serde_json::from_str(&out.ok_or(format!("{kind} worker failed ({status})"))?)
                        .map_err(|e| e.to_string())?;
                results.push(r);
            }
            for (k, (_, p)) in server.iter().enumerate() {
                cpu[k] += cpu_ms(*p)?.saturating_sub(cpu0[k]);
            }
            if let (Some(a), Some(o0)) = (osd_asok, ops0) {
                ops += osd_ops(a)? - o0;
            }
            let last: Vec<String> = results[results.len() - n..]
                .iter()
                .map(|r| format!("{:.0}", r.deploy_ms))
                .collect();
            eprintln!(
                "{kind} {lname} N={n} rep {rep}: connected after {connected_ms} ms, deploys {} ms",
                last.join(" ")
            );
        }
        let mut times: Vec<f64> = results.iter().map(|r| r.deploy_ms).collect();
        times.sort_by(f64::total_cmp);
        let bytes: Vec<u64> = results.iter().map(|r| r.bytes_read).collect();
        rows.push(Row {
            backend: kind.to_owned(),
            link: lname,
            workers: n,
            deploys: times.len(),
            p50_ms: pct(&times, 50.0),
            p99_ms: pct(&times, 99.0),
            clone_ms_mean: mean(results.iter().map(|r| r.clone_ms)),
            open_ms_mean: mean(results.iter().map(|r| r.open_ms)),
            reads_ms_mean: mean(results.iter().map(|r| r.reads_ms)),
            worker_cpu_ms_mean: mean(results.iter().map(|r| r.cpu_ms as f64)),
            worker_threads_ms_mean: {
                let mut by = std::collections::BTreeMap::<String, u64>::new();
                for (k, ms) in results.iter().flat_map(|r| &r.threads) {
                    *by.entry(k.clone()).or_insert(0) += ms;
                }
                let mut v: Vec<(String, f64)> = by
                    .into_iter()
                    .map(|(k, ms)| (k, ms as f64 / results.len().max(1) as f64))
                    .collect();
                v.sort_by(|a, b| b.1.total_cmp(&a.1));
                v
            },
            bytes_per_worker_mean: bytes.iter().sum::<u64>() / bytes.len().max(1) as u64,
            bytes_per_worker_max: bytes.iter().copied().max().unwrap_or(0),
            requests_per_worker_mean: results.iter().map(|r| r.read_requests).sum::<u64>()
                / results.len().max(1) as u64,
            server_cpu_ms_per_round: server
                .iter()
                .zip(&cpu)
                .map(|((name, _), c)| (name.clone(), *c as f64 / args.reps as f64))
                .collect(),
            osd_ops_per_deploy: osd_asok.map(|_| ops as f64 / results.len().max(1) as f64),
            osd_ops_phases: {
                let p: Vec<[u64; 3]> = results.iter().filter_map(|r| r.osd_ops).collect();
                (!p.is_empty())
                    .then(|| std::array::from_fn(|k| mean(p.iter().map(|x| x[k] as f64))))
            },
        });
    }
    Ok(rows)
}

/// Removes every volume and snapshot the runs left in the store.
async fn clean(admin: &dyn Backend) -> Res<()> {
    for v in admin.list_volumes().await.map_err(|e| e.to_string())? {
        let _ = admin.remove_volume(&v).await;
    }
    for s in admin.list_snapshots().await.map_err(|e| e.to_string())? {
        let _ = admin.remove_snapshot(&s).await;
    }
    Ok(())
}

/// Measures every topology of `args.links` on one backend.
async fn measure_links(
    args: &Args,
    nmax: usize,
    kind: &str,
    admin: &dyn Backend,
    job: &Job,
    server: &[(String, u32)],
    osd_asok: Option<&str>,
) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for &link in &args.links {
        shape(link, nmax, &args.rate)?;
        rows.extend(measure(args, link, kind, admin, job, server, osd_asok).await?);
    }
    clean(admin).await?;
    Ok(rows)
}

async fn coordinator(args: Args) -> Res<()> {
    let nmax = args.workers.iter().copied().max().unwrap_or(1);
    net_up(nmax)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average at start: {}", load.trim());
    let mut rows = Vec::new();
    let job = Job {
        kind: String::new(),
        rbd: None,
        nfs_addr: None,
        nfs_dir: None,
        snapshot: String::new(),
        volume: String::new(),
        trace: Vec::new(),
        start_at_ms: 0,
        latency_us: args.latency_us,
        use_trace: args.use_trace,
        osd_asok: None,
    };
    let result = async {
        for kind in &args.backends {
            match kind.as_str() {
                "rbd" => {
                    let (cfg, server) =
                        rbd_cluster(args.ceph_quiet, &args.client_conf, &args.osd_conf)?;
                    let admin = RbdBuilder::from_config(cfg.clone())
                        .build()
                        .await
                        .map_err(|e| e.to_string())?;
                    let job = Job {
                        kind: "rbd".into(),
                        rbd: Some(cfg),
                        ..job.clone()
                    };
                    let asok = format!("{RBD_DIR}/run/ceph-osd.0.asok");
                    rows.extend(
                        measure_links(&args, nmax, "rbd", &admin, &job, &server, Some(&asok))
                            .await?,
                    );
                }
                "nfs" => {
                    let addr = std::env::var("SLACKER_NFS_ADDR")
                        .map_err(|_| "nfs needs SLACKER_NFS_ADDR=host:port (the knfsd VM)")?;
                    let qemu = match std::env::var("NFSVM_RUN") {
                        Ok(run) => std::fs::read_to_string(format!("{run}/qemu.pid"))
                            .ok()
                            .and_then(|p| p.trim().parse().ok()),
                        Err(_) => find_pid(&["qemu-system", "-name nfsvm"]),
                    }
                    .ok_or("no qemu process of the knfsd VM (NFSVM_RUN/qemu.pid, -name nfsvm)")?;
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
                        nfs_addr: Some(listen),
                        nfs_dir: Some(dir),
                        ..job.clone()
                    };
                    let server = [("qemu".to_owned(), qemu)];
                    rows.extend(
                        measure_links(&args, nmax, "nfs", &admin, &job, &server, None).await?,
                    );
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
        "many workers: image {} MiB, startup reads {} MiB, link {} (tbf) + {} us per call, \
         deploy {}, ceph debug logs {}, client conf {:?}, osd conf {:?}, {} reps; \
         load at end {}",
        args.image_mib,
        args.startup_mib,
        args.rate,
        args.latency_us,
        if args.use_trace {
            "with trace (read-ahead off, prefetch)"
        } else {
            "without trace (read-ahead on)"
        },
        if args.ceph_quiet { "off" } else { "default" },
        args.client_conf,
        args.osd_conf,
        args.reps,
        load.trim()
    );
    println!(
        "| backend | link | N | deploys | p50 ms | p99 ms | p99 / p50(N=1) | clone / open / reads ms (mean) | worker CPU ms | read per worker (mean / max) | requests | server CPU ms per round |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.backend == r.backend && b.link == r.link && b.workers == 1)
            .map_or(f64::NAN, |b| b.p50_ms);
        let server: Vec<String> = r
            .server_cpu_ms_per_round
            .iter()
            .map(|(n, c)| format!("{n} {c:.0}"))
            .collect();
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} | {:.2} / {:.2} MB | {} | {} |",
            r.backend,
            r.link,
            r.workers,
            r.deploys,
            r.p50_ms,
            r.p99_ms,
            r.p99_ms / base,
            r.clone_ms_mean,
            r.open_ms_mean,
            r.reads_ms_mean,
            r.worker_cpu_ms_mean,
            r.bytes_per_worker_mean as f64 / 1e6,
            r.bytes_per_worker_max as f64 / 1e6,
            r.requests_per_worker_mean,
            server.join(" + ")
        );
    }
    println!("OSD client ops per deploy (clone / open / reads of one deploy with --phase-ops):");
    for r in rows.iter().filter(|r| r.osd_ops_per_deploy.is_some()) {
        let phases = r
            .osd_ops_phases
            .map(|[c, o, d]| format!(" ({c:.0} / {o:.0} / {d:.0})"))
            .unwrap_or_default();
        println!(
            "  {} {} N={}: {:.0}{phases}",
            r.backend,
            r.link,
            r.workers,
            r.osd_ops_per_deploy.unwrap_or(0.0)
        );
    }
    println!("worker CPU per deploy by thread (mean ms; threads alive at the end):");
    for r in &rows {
        let top: Vec<String> = r
            .worker_threads_ms_mean
            .iter()
            .take(8)
            .map(|(k, ms)| format!("{k} {ms:.0}"))
            .collect();
        println!(
            "  {} {} N={}: {}",
            r.backend,
            r.link,
            r.workers,
            top.join(", ")
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
