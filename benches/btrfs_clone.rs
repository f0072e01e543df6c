//! Clone latency on the btrfs backend vs a full copy vs one raw `FICLONE` syscall, for
//! fully written volumes of 64 MiB, 1 GiB and 8 GiB.
//!
//! ```sh
//! cargo bench -p slacker-benches --bench btrfs_clone
//! ```
//!
//! Needs root (it makes and loop-mounts a sparse 24 GiB btrfs image under `/tmp`), or
//! `SLACKER_BTRFS_ROOT` naming a directory on btrfs with 12 GiB free; prints `SKIPPED`
//! otherwise. `BTRFS_BENCH_SIZES=64M,1G` limits the sizes. A hand-rolled timing loop
//! (`harness = false`): each figure is the median of several runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use slacker_backend_btrfs::BtrfsBuilder;
use slacker_benches::Scratch;
use slacker_core::{Backend, VolumeId, VolumeOptions};

const MIB: u64 = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Fills `path` (already `size` bytes long) with non-zero data in 8 MiB writes.
fn fill(path: &Path, size: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open volume");
    let mut buf = vec![0u8; (8 * MIB) as usize];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut buf);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        buf[..8].copy_from_slice(&off.to_le_bytes());
        f.write_all_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
}

/// A byte-for-byte copy (what `cp --reflink=never` does), fsynced.
fn full_copy(src: &Path, dst: &Path) {
    let s = File::open(src).expect("open src");
    let d = File::create(dst).expect("create dst");
    let mut buf = vec![0u8; (8 * MIB) as usize];
    let mut off = 0;
    loop {
        let n = s.read_at(&mut buf, off).expect("read");
        if n == 0 {
            break;
        }
        d.write_all_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
    d.sync_all().expect("fsync copy");
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

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let scratch;
    let base = match std::env::var_os("SLACKER_BTRFS_ROOT") {
        Some(p) => PathBuf::from(p),
        None => match Scratch::new("btrfs", "24G") {
            Ok(s) => {
                scratch = s;
                scratch.mnt.clone()
            }
            Err(e) => {
                println!(
                    "SKIPPED: btrfs_clone needs root and btrfs-progs (or SLACKER_BTRFS_ROOT): {e}"
                );
                return;
            }
        },
    };
    let root = base.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("bench dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let b = BtrfsBuilder::new(&root).build().expect("btrfs backend");
    let sizes: Vec<(String, u64)> = std::env::var("BTRFS_BENCH_SIZES")
        .unwrap_or_else(|_| "64M,1G,8G".into())
        .split(',')
        .map(|s| (s.to_owned(), parse_size(s)))
        .collect();

    println!(
        "| volume | write + fsync | snapshot | backend clone | raw FICLONE | FICLONE + 2 fsyncs | full copy + fsync | clone / FICLONE | copy / clone |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, size) in sizes {
        let v = VolumeId::new(format!("v{label}")).unwrap();
        rt.block_on(b.create_volume(&v, &VolumeOptions::new(size)))
            .expect("create");
        let path = rt.block_on(b.local_path(&v)).expect("path");
        let t = Instant::now();
        fill(&path, size);
        rt.block_on(b.flush(&v)).expect("flush");
        let write = t.elapsed();

        let mut snaps = Vec::new();
        let mut snap_times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            snaps.push(rt.block_on(b.snapshot(&v)).expect("snapshot"));
            snap_times.push(t.elapsed());
        }
        let s = snaps[0].clone();

        let runs = 21;
        let mut clone_times = Vec::new();
        for i in 0..runs {
            let c = VolumeId::new(format!("c{label}-{i}")).unwrap();
            let t = Instant::now();
            rt.block_on(b.clone_snapshot(&s, &c)).expect("clone");
            clone_times.push(t.elapsed());
        }

        let snap_file = root.join("snapshots").join(format!("{}.img", s.key()));
        let src = File::open(&snap_file).expect("snapshot file");
        let raw_dir = root.join("raw");
        std::fs::create_dir_all(&raw_dir).unwrap();
        let (mut raw, mut raw_durable) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let dst = File::create(raw_dir.join(format!("{label}-{i}"))).unwrap();
            let t = Instant::now();
            rustix::fs::ioctl_ficlone(&dst, &src).expect("FICLONE");
            raw.push(t.elapsed());
            dst.sync_all().unwrap();
            File::open(&raw_dir).unwrap().sync_all().unwrap();
            raw_durable.push(t.elapsed());
        }

        let copy = if size <= 1024 * MIB {
            let n = if size <= 64 * MIB { 5 } else { 2 };
            let mut v = Vec::new();
            for i in 0..n {
                let dst = raw_dir.join(format!("copy-{label}-{i}"));
                let t = Instant::now();
                full_copy(&snap_file, &dst);
                v.push(t.elapsed());
                std::fs::remove_file(&dst).unwrap();
            }
            Some(median(v))
        } else {
            None
        };
        let (clone, raw) = (median(clone_times), median(raw));
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {:.0}x | {} |",
            fmt(write),
            fmt(median(snap_times)),
            fmt(clone),
            fmt(raw),
            fmt(median(raw_durable)),
            copy.map_or("skipped (too slow)".into(), fmt),
            clone.as_secs_f64() / raw.as_secs_f64(),
            copy.map_or("-".into(), |c| format!(
                "{:.0}x",
                c.as_secs_f64() / clone.as_secs_f64()
            )),
        );
        // Free the space before the next size.
        for i in 0..runs {
            let c = VolumeId::new(format!("c{label}-{i}")).unwrap();
            rt.block_on(b.remove_volume(&c)).expect("remove clone");
            let _ = std::fs::remove_file(raw_dir.join(format!("{label}-{i}")));
        }
        for s in snaps {
            rt.block_on(b.remove_snapshot(&s)).expect("remove snapshot");
        }
        rt.block_on(b.remove_volume(&v)).expect("remove volume");
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
}
