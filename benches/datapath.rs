//! Worker data path: time to first byte and throughput of sequential and random reads
//! through a `LazyVolume` (and, as root, through FUSE) over a mem backend behind an
//! emulated link, against reading a local file.
//!
//! ```sh
//! cargo bench -p slacker-benches --bench datapath
//! ```
//!
//! Environment: `SLACKER_BENCH_IMAGE_MIB` (image size, default 128),
//! `SLACKER_BENCH_LATENCY_US` (per request, default 1000), `SLACKER_BENCH_GBIT`
//! (bandwidth, default 1).
//!
//! "cold" = an empty worker cache (every block comes over the link); "warm" = the same
//! reads again, served from the shared cache. Local "cold" reads use `O_DIRECT` (the
//! disk), local "warm" reads the page cache.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slacker_backend_mem::MemBackend;
use slacker_core::worker::{BlockCache, LazyVolume, LazyVolumeOptions, LinkProfile, Throttled};
use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const O_DIRECT: i32 = 0o40000; // x86_64 Linux

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Something to read from, synchronously (many threads may read at once).
trait Source: Sync {
    fn read(&self, offset: u64, len: usize);
}

struct Lazy {
    rt: tokio::runtime::Handle,
    volume: LazyVolume,
}

impl Source for Lazy {
    fn read(&self, offset: u64, len: usize) {
        let data = self
            .rt
            .block_on(self.volume.read_at(offset, len))
            .expect("lazy read");
        assert_eq!(data.len(), len);
    }
}

struct Local {
    file: File,
}

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Source for Local {
    fn read(&self, offset: u64, len: usize) {
        // A reused, 4 KiB-aligned buffer (O_DIRECT needs aligned buffers, offsets, lengths).
        BUF.with_borrow_mut(|buf| {
            if buf.len() < len + 4096 {
                buf.resize(len + 4096, 0);
            }
            let at = buf.as_ptr().align_offset(4096);
            self.file
                .read_exact_at(&mut buf[at..at + len], offset)
                .expect("local read");
        });
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    /// One cold 4 KiB read at each of 20 far-apart offsets: latency per read.
    FirstByte,
    /// 4 KiB reads in order over the first 32 MiB.
    Seq4k,
    /// 1 MiB reads in order over the whole image (what loop with direct IO sends).
    Seq1m,
    /// 1000 random aligned 4 KiB reads, one at a time.
    Rand4k,
    /// 4000 random aligned 4 KiB reads, 8 at a time.
    Rand4kQd8,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::FirstByte => "time to first byte (4 KiB)",
            Pattern::Seq4k => "sequential 4 KiB reads",
            Pattern::Seq1m => "sequential 1 MiB reads",
            Pattern::Rand4k => "random 4 KiB reads, QD1",
            Pattern::Rand4kQd8 => "random 4 KiB reads, QD8",
        }
    }

    fn ops(self, size: u64) -> (Vec<(u64, usize)>, usize) {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rand_block = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / (4 * KIB))) * 4 * KIB
        };
        match self {
            Pattern::FirstByte => (
                (0..20).map(|i| ((i * size / 20) & !4095, 4096)).collect(),
                1,
            ),
            Pattern::Seq4k => (
                (0..(32 * MIB).min(size) / (4 * KIB))
                    .map(|i| (i * 4 * KIB, 4096))
                    .collect(),
                1,
            ),
            Pattern::Seq1m => (
                (0..size / MIB).map(|i| (i * MIB, MIB as usize)).collect(),
                1,
            ),
            Pattern::Rand4k => ((0..1000).map(|_| (rand_block(), 4096)).collect(), 1),
            Pattern::Rand4kQd8 => ((0..4000).map(|_| (rand_block(), 4096)).collect(), 8),
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Default)]
struct Run {
    elapsed: Duration,
    bytes: u64,
    ops: u64,
}

impl Run {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    fn us_per_op(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.ops as f64
    }
    /// The figure that matters for the pattern: µs per read for first-byte, MB/s else.
    fn figure(&self, p: Pattern) -> String {
        match p {
            Pattern::FirstByte => format!("{:.0} µs", self.us_per_op()),
            _ => format!("{:.0} MB/s", self.mb_per_s()),
        }
    }
    /// How many times slower than `base` (>1: slower).
    fn slowdown(&self, base: &Run, p: Pattern) -> f64 {
        match p {
            Pattern::FirstByte => self.us_per_op() / base.us_per_op(),
            _ => base.mb_per_s() / self.mb_per_s(),
        }
    }
}

/// The median of `n` runs (for warm reads, which CPU noise on a shared machine skews).
fn median_run(source: &dyn Source, p: Pattern, size: u64, n: usize) -> Run {
    let mut runs: Vec<Run> = (0..n).map(|_| run(source, p, size)).collect();
    runs.sort_by_key(|r| r.elapsed);
    runs[n / 2]
}

fn run(source: &dyn Source, p: Pattern, size: u64) -> Run {
    let (ops, qd) = p.ops(size);
    let bytes = ops.iter().map(|o| o.1 as u64).sum();
    let t = Instant::now();
    if qd == 1 {
        for &(off, len) in &ops {
            source.read(off, len);
        }
    } else {
        std::thread::scope(|s| {
            for chunk in ops.chunks(ops.len().div_ceil(qd)) {
                s.spawn(move || {
                    for &(off, len) in chunk {
                        source.read(off, len);
                    }
                });
            }
        });
    }
    Run {
        elapsed: t.elapsed(),
        bytes,
        ops: ops.len() as u64,
    }
}

fn pattern_bytes(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size as usize);
    while (v.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size as usize);
    v
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
        && Path::new("/dev/fuse").exists()
}

struct Setup {
    rt: tokio::runtime::Runtime,
    backend: Arc<dyn Backend>,
    snap: SnapshotId,
    clones: std::cell::Cell<u32>,
}

impl Setup {
    /// A fresh clone of the image, opened lazily over an empty cache of its own.
    fn cold_volume(&self) -> LazyVolume {
        let n = self.clones.get() + 1;
        self.clones.set(n);
        let id = VolumeId::new(format!("c{n}")).expect("id");
        self.rt.block_on(async {
            self.backend
                .clone_snapshot(&self.snap, &id)
                .await
                .expect("clone");
            LazyVolume::open(
                self.backend.clone(),
                id,
                Arc::new(BlockCache::new(1 << 30)),
                LazyVolumeOptions::default(),
            )
            .await
            .expect("open")
        })
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let size = env_u64("SLACKER_BENCH_IMAGE_MIB", 128) * MIB;
    let latency = Duration::from_micros(env_u64("SLACKER_BENCH_LATENCY_US", 1000));
    let gbit = env_u64("SLACKER_BENCH_GBIT", 1);
    let link = LinkProfile::new(latency, gbit * 1_000_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let data = pattern_bytes(size, 42);
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(Throttled::new(mem.clone(), link));
    let snap = rt.block_on(async {
        let img = VolumeId::new("image").expect("id");
        mem.create_volume(&img, &VolumeOptions::new(size))
            .await
            .expect("create");
        mem.write_at(&img, 0, &data).await.expect("write");
        mem.snapshot(&img).await.expect("snapshot")
    });
    let setup = Setup {
        rt,
        backend,
        snap,
        clones: std::cell::Cell::new(0),
    };

    let dir = std::env::temp_dir().join(format!("slacker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let local_path = dir.join("image.bin");
    std::fs::write(&local_path, &data).expect("local file");
    drop(data);
    let warm_file = File::open(&local_path).expect("open");
    let local_warm = Local { file: warm_file };
    run(&local_warm, Pattern::Seq1m, size); // into the page cache
    let local_cold = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(&local_path)
        .map(|file| Local { file })
        .ok();

    let root = is_root();
    println!(
        "# worker data path: {} MiB image, link {} µs/request, {gbit} Gbit/s; 4 KiB blocks, default LazyVolumeOptions; warm figures: median of 5",
        size / MIB,
        latency.as_micros()
    );
    println!(
        "| pattern | local page cache | local O_DIRECT | lazy cold | lazy warm | lazy warm / local page cache | lazy cold / local O_DIRECT |{}",
        if root {
            " FUSE cold | FUSE warm | FUSE warm / local page cache |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if root { "---|---|---|" } else { "" }
    );
    let mut json = Vec::new();
    for p in [
        Pattern::FirstByte,
        Pattern::Seq4k,
        Pattern::Seq1m,
        Pattern::Rand4k,
        Pattern::Rand4kQd8,
    ] {
        let lw = median_run(&local_warm, p, size, 5);
        let lc = local_cold.as_ref().map(|l| run(l, p, size));
        let v = setup.cold_volume();
        let lazy = Lazy {
            rt: setup.rt.handle().clone(),
            volume: v.clone(),
        };
        let cold = run(&lazy, p, size);
        let fetched = v.metrics();
        let warm = median_run(&lazy, p, size, 5);
        let (fc, fw) = if root {
            let fv = setup.cold_volume();
            let mnt = dir.join(format!("fuse-{}", setup.clones.get()));
            std::fs::create_dir_all(&mnt).expect("mnt");
            let session =
                slacker_fuse::FuseSession::start(fv, &mnt, &slacker_fuse::FuseOptions::default())
                    .expect("fuse");
            let file = Local {
                file: File::open(session.image_path()).expect("disk.img"),
            };
            let c = run(&file, p, size);
            let w = median_run(&file, p, size, 5);
            drop(file);
            session.stop().expect("stop fuse");
            (Some(c), Some(w))
        } else {
            (None, None)
        };
        let lc_fig = lc.map_or("n/a".to_owned(), |r| r.figure(p));
        let cold_vs_disk = lc.map_or("n/a".to_owned(), |r| {
            format!("{:.2}x", cold.slowdown(&r, p))
        });
        let mut line = format!(
            "| {} | {} | {} | {} | {} | {:.2}x | {} |",
            p.name(),
            lw.figure(p),
            lc_fig,
            cold.figure(p),
            warm.figure(p),
            warm.slowdown(&lw, p),
            cold_vs_disk,
        );
        if let (Some(fc), Some(fw)) = (fc, fw) {
            line += &format!(
                " {} | {} | {:.2}x |",
                fc.figure(p),
                fw.figure(p),
                fw.slowdown(&lw, p)
            );
        }
        println!("{line}");
        json.push(format!(
            "{{\"pattern\":\"{}\",\"local_warm_s\":{:.6},\"local_direct_s\":{},\"lazy_cold_s\":{:.6},\"lazy_warm_s\":{:.6},\"fuse_cold_s\":{},\"fuse_warm_s\":{},\"bytes\":{},\"ops\":{},\"cold_fetched_bytes\":{},\"cold_backend_requests\":{}}}",
            p.name(),
            lw.elapsed.as_secs_f64(),
            lc.map_or("null".to_owned(), |r| format!("{:.6}", r.elapsed.as_secs_f64())),
            cold.elapsed.as_secs_f64(),
            warm.elapsed.as_secs_f64(),
            fc.map_or("null".to_owned(), |r| format!("{:.6}", r.elapsed.as_secs_f64())),
            fw.map_or("null".to_owned(), |r| format!("{:.6}", r.elapsed.as_secs_f64())),
            cold.bytes,
            cold.ops,
            fetched.fetched_bytes,
            fetched.backend_requests,
        ));
    }
    if !root {
        println!("(FUSE columns need root and /dev/fuse)");
    }
    println!("[{}]", json.join(","));
    let _ = std::fs::remove_dir_all(&dir);
}
