//! Clone latency on the NFS backend (server-side CLONE) vs volume size, against the
//! same backend in COPY mode (server-side COPY of the data segments), a client-side
//! read + write copy, and one raw CLONE RPC.
//!
//! ```sh
//! cargo bench -p slacker-benches --bench nfs_clone
//! ```
//!
//! Needs `SLACKER_NFS_ADDR=host:port`, or starts (and later stops) the project's knfsd
//! test VM through `slacker-backend-nfs/server/test-vm.sh` (root; prints `SKIPPED`
//! otherwise). `NFS_BENCH_SIZES=64M,256M,1G` (the default) picks the sizes.
//!
//! Volumes are flat: fully written. The 64 MiB volume is written through the backend
//! (this also measures the link); larger ones are assembled on the server by CLONE-ing
//! that 64 MiB of data to every 64 MiB offset (as many extent items as a volume written
//! the same way, without moving a GiB over a ~10 MiB/s emulated link). The client-side
//! copy is only measured at 64 MiB (it moves every byte twice over the link; larger
//! sizes scale linearly with the link throughput printed). A hand-rolled timing loop
//! (`harness = false`): each figure is the median of several runs.

use std::process::Command;
use std::time::{Duration, Instant};

use slacker_backend_nfs::client::{ClientOptions, NfsClient};
use slacker_backend_nfs::{CloneMode, NfsBackend, NfsBuilder};
use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};

const MIB: u64 = 1 << 20;
const PIECE: u64 = 64 * MIB;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn parse_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().expect("size");
    match unit {
        "M" => n * MIB,
        "G" => n * 1024 * MIB,
        _ => panic!("size {s}: use M or G"),
    }
}

/// The server: `SLACKER_NFS_ADDR`, or the test VM (started if needed).
fn server() -> Result<String, String> {
    if let Ok(a) = std::env::var("SLACKER_NFS_ADDR") {
        if !a.is_empty() {
            return Ok(a);
        }
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../slacker-backend-nfs/server/test-vm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("acquire")
        .arg(std::process::id().to_string())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("NFSVM_NFS_ADDR=").map(str::to_owned))
        .ok_or_else(|| "test-vm.sh printed no address".into())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

async fn backend(addr: &str, dir: &str, mode: CloneMode) -> NfsBackend {
    NfsBuilder::new(addr)
        .dir(dir)
        .clone_mode(mode)
        .build()
        .await
        .expect("NFS backend")
}

struct Row {
    label: String,
    snapshot: Duration,
    clone: Duration,
    raw: Duration,
    copy_mode: Duration,
    client_copy: Option<Duration>,
}

async fn run(addr: String) {
    let dir = format!(
        "bench-nfs-clone-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let b = backend(&addr, &dir, CloneMode::Auto).await;
    assert!(b.uses_clone(), "the server cannot CLONE");
    let bc = backend(&addr, &dir, CloneMode::Copy).await;
    let nfs = NfsClient::connect(&addr, ClientOptions::default())
        .await
        .expect("client");
    let sizes: Vec<(String, u64)> = std::env::var("NFS_BENCH_SIZES")
        .unwrap_or_else(|_| "64M,256M,1G".into())
        .split(',')
        .map(|s| (s.to_owned(), parse_size(s)))
        .collect();

    // The 64 MiB of data every volume is made of, written through the backend.
    let v64 = VolumeId::new("data64").unwrap();
    b.create_volume(&v64, &VolumeOptions::new(PIECE))
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..8 {
        let piece = pattern((8 * MIB) as usize, i);
        b.write_at(&v64, i * 8 * MIB, &piece).await.unwrap();
    }
    b.flush(&v64).await.unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    for i in 0..8 {
        b.read_at(&v64, i * 8 * MIB, (8 * MIB) as usize)
            .await
            .unwrap();
    }
    let read = t.elapsed();
    let rate = |d: Duration| 64.0 / d.as_secs_f64();
    println!(
        "link: 64 MiB written through the backend in {} ({:.1} MiB/s), read in {} ({:.1} MiB/s)",
        fmt(write),
        rate(write),
        fmt(read),
        rate(read)
    );
    let data64 = b.volume_file(&v64).await.unwrap();

    let mut rows = Vec::new();
    for (label, size) in sizes {
        assert!(size % PIECE == 0, "sizes must be multiples of 64M");
        let v = VolumeId::new(format!("v{label}")).unwrap();
        b.create_volume(&v, &VolumeOptions::new(size))
            .await
            .unwrap();
        let t = Instant::now();
        {
            let src = nfs.open_read(&data64).await.unwrap();
            let dst = nfs.open(&b.volume_file(&v).await.unwrap()).await.unwrap();
            for i in 0..size / PIECE {
                nfs.clone_range(&src, &dst, 0, i * PIECE, PIECE)
                    .await
                    .unwrap();
            }
            src.close().await.unwrap();
            dst.close().await.unwrap();
        }
        let assembled = t.elapsed();

        let mut snaps: Vec<SnapshotId> = Vec::new();
        let mut snap_times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            snaps.push(b.snapshot(&v).await.unwrap());
            snap_times.push(t.elapsed());
        }
        let s = snaps[0].clone();

        let runs = 11;
        let mut clones = Vec::new();
        let mut clone_times = Vec::new();
        for i in 0..runs {
            let c = VolumeId::new(format!("c{label}-{i}")).unwrap();
            let t = Instant::now();
            b.clone_snapshot(&s, &c).await.unwrap();
            clone_times.push(t.elapsed());
            clones.push(c);
        }

        // One raw CLONE RPC of the same snapshot file into an empty file.
        let snap_file = b.snapshot_file(&s).await.unwrap();
        let src = nfs.open_read(&snap_file).await.unwrap();
        let mut raw = Vec::new();
        for i in 0..runs {
            let path = format!("{}/raw-{label}-{i}", b.config().base_path());
            let dst = nfs.create(&path).await.unwrap();
            let t = Instant::now();
            nfs.clone_range(&src, &dst, 0, 0, 0).await.unwrap();
            raw.push(t.elapsed());
            dst.close().await.unwrap();
            nfs.remove(&path).await.unwrap();
        }

        let mut copy_times = Vec::new();
        for i in 0..3 {
            let c = VolumeId::new(format!("copy{label}-{i}")).unwrap();
            let t = Instant::now();
            bc.clone_snapshot(&s, &c).await.unwrap();
            copy_times.push(t.elapsed());
            clones.push(c);
        }

        let client_copy = if size <= PIECE {
            let mut v = Vec::new();
            for i in 0..3 {
                let path = format!("{}/client-copy-{label}-{i}", b.config().base_path());
                let t = Instant::now();
                let dst = nfs.create(&path).await.unwrap();
                let mut off = 0;
                while off < size {
                    let chunk = src.read_at(off, (8 * MIB) as usize).await.unwrap();
                    dst.write_at(off, &chunk).await.unwrap();
                    off += chunk.len() as u64;
                }
                dst.commit().await.unwrap();
                dst.close().await.unwrap();
                v.push(t.elapsed());
                nfs.remove(&path).await.unwrap();
            }
            Some(median(v))
        } else {
            None
        };
        src.close().await.unwrap();

        let row = Row {
            label: label.clone(),
            snapshot: median(snap_times),
            clone: median(clone_times),
            raw: median(raw),
            copy_mode: median(copy_times),
            client_copy,
        };
        println!(
            "{label}: assembled in {}, snapshot {}, clone {}, raw CLONE {}, COPY-mode clone {}, client copy {}",
            fmt(assembled),
            fmt(row.snapshot),
            fmt(row.clone),
            fmt(row.raw),
            fmt(row.copy_mode),
            row.client_copy.map_or("-".into(), fmt)
        );
        rows.push(row);
        for c in clones {
            b.remove_volume(&c).await.unwrap();
        }
        for s in snaps {
            b.remove_snapshot(&s).await.unwrap();
        }
        b.remove_volume(&v).await.unwrap();
    }

    let first_clone = rows[0].clone;
    println!();
    println!(
        "| volume | snapshot | backend clone | raw CLONE RPC | clone / raw CLONE | clone / clone({}) | COPY-mode clone | COPY / CLONE | client read+write copy | client copy / CLONE |",
        rows[0].label
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let x = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        println!(
            "| {} | {} | {} | {} | {:.1}x | {:.2} | {} | {:.1}x | {} | {} |",
            r.label,
            fmt(r.snapshot),
            fmt(r.clone),
            fmt(r.raw),
            x(r.clone, r.raw),
            x(r.clone, first_clone),
            fmt(r.copy_mode),
            x(r.copy_mode, r.clone),
            r.client_copy.map_or("not run (see docs)".into(), fmt),
            r.client_copy
                .map_or("-".into(), |c| format!("{:.0}x", x(c, r.clone))),
        );
    }
    b.remove_volume(&v64).await.unwrap();
    let _ = nfs.close().await;
    let _ = b.close().await;
    let _ = bc.close().await;
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let addr = match server() {
        Ok(a) => a,
        Err(e) => {
            println!("SKIPPED: nfs_clone needs SLACKER_NFS_ADDR or the test VM (root): {e}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(addr));
}
