//! Power cuts: the btrfs backend inside a VM, on a virtio disk with `cache=none` (guest
//! writes reach the host file only when the guest block layer submits them, O_DIRECT; the
//! guest page cache and everything not yet submitted die with qemu), killed with SIGKILL at
//! random points of a randomized workload, then booted again, recovered and compared with
//! the mem model.
//!
//! - The VM is the project's knfsd VM tooling (`slacker-backend-nfs/server/`: Debian kernel
//!   and qemu unpacked privately, busybox initramfs). This test appends a second cpio to
//!   that initramfs with its own `/init`, this very test binary and the libraries it links,
//!   and boots it on a fresh btrfs image.
//! - In the guest, the ignored test `guest_agent` runs the role the kernel command line
//!   names: `work` (run the seed's workload, printing `PC:ACK <i>` on the serial console
//!   after operation `i` returned), `recover` (open the backend: recovery), `check` (open,
//!   then dump every volume and snapshot with a content hash, and every file on disk that
//!   no listed object explains).
//! - The host kills qemu after a random number of acknowledged operations, then (for half
//!   the seeds) kills a `recover` boot a random few milliseconds after recovery started,
//!   then boots `check`. The recovered state must equal the model after some prefix of the
//!   workload at least as long as the acknowledged one: every acknowledged operation
//!   present (data is written with `write_at` + `flush`, acknowledged after the flush),
//!   nothing half-created, no orphan files.
//!
//! `SLACKER_POWERCUT_SEEDS` (default 4) sets how many seeds, `SLACKER_POWERCUT_SEED0` the
//! first. Needs root and the VM tooling (installed into `$SLACKER_CACHE/nfsvm` on first
//! use); otherwise `SKIPPED` (a failure under `CI=true`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use slacker_backend_btrfs::BtrfsBuilder;
use slacker_backend_mem::State;
use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};

const VOLUMES: u64 = 4;
const OPS: usize = 60;

/// One workload operation; snapshots by their index among the snapshots taken so far.
#[derive(Clone, Debug)]
enum Op {
    Create {
        vol: u64,
        size: u64,
    },
    WriteFlush {
        vol: u64,
        offset: u64,
        len: usize,
        seed: u64,
    },
    Snapshot {
        vol: u64,
    },
    Clone {
        snap: usize,
        vol: u64,
    },
    RemoveVolume {
        vol: u64,
    },
    RemoveSnapshot {
        snap: usize,
    },
    Hold {
        snap: usize,
    },
    Release {
        snap: usize,
    },
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn vid(i: u64) -> VolumeId {
    VolumeId::new(format!("v{i}")).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// The seed's workload: only operations that succeed on the model (so the guest can
/// treat any error as a failure), generated against the model itself.
fn workload(seed: u64) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut m = State::new();
    let mut snaps: Vec<SnapshotId> = Vec::new();
    let mut held: Vec<bool> = Vec::new();
    let mut ops = Vec::new();
    while ops.len() < OPS {
        let vol = r.below(VOLUMES);
        let exists = m.stat_volume(&vid(vol)).ok();
        let live: Vec<usize> = (0..snaps.len())
            .filter(|&i| m.stat_snapshot(&snaps[i]).is_ok())
            .collect();
        let op = match r.below(10) {
            0 | 1 if exists.is_none() => Op::Create {
                vol,
                size: (1 + r.below(8)) << 20,
            },
            2..=5 if exists.is_some() => {
                let size = exists.as_ref().unwrap().size;
                let max = if r.below(4) == 0 { 1 << 20 } else { 20_000 };
                let len = 1 + r.below(max) as usize;
                let len = len.min(size as usize);
                Op::WriteFlush {
                    vol,
                    offset: r.below(size - len as u64 + 1),
                    len,
                    seed: r.next(),
                }
            }
            6 if exists.is_some() => Op::Snapshot { vol },
            7 if exists.is_none() && !live.is_empty() => Op::Clone {
                snap: live[r.below(live.len() as u64) as usize],
                vol,
            },
            8 if exists.is_some() && r.below(3) == 0 => Op::RemoveVolume { vol },
            9 if !live.is_empty() => {
                let s = live[r.below(live.len() as u64) as usize];
                match (held[s], r.below(3)) {
                    (true, _) => Op::Release { snap: s },
                    (false, 0) => Op::RemoveSnapshot { snap: s },
                    (false, _) => Op::Hold { snap: s },
                }
            }
            _ => continue,
        };
        apply_model(&mut m, &mut snaps, &op).expect("generated against the model");
        if let Op::Snapshot { .. } = op {
            held.push(false);
        }
        match op {
            Op::Hold { snap } => held[snap] = true,
            Op::Release { snap } => held[snap] = false,
            _ => {}
        }
        ops.push(op);
    }
    ops
}

fn apply_model(m: &mut State, snaps: &mut Vec<SnapshotId>, op: &Op) -> slacker_core::Result<()> {
    match *op {
        Op::Create { vol, size } => m.create_volume(&vid(vol), &VolumeOptions::new(size)),
        Op::WriteFlush {
            vol,
            offset,
            len,
            seed,
        } => m.write_at(&vid(vol), offset, &pattern(len, seed)),
        Op::Snapshot { vol } => {
            snaps.push(m.snapshot(&vid(vol))?);
            Ok(())
        }
        Op::Clone { snap, vol } => m.clone_snapshot(&snaps[snap], &vid(vol)),
        Op::RemoveVolume { vol } => m.remove_volume(&vid(vol)),
        Op::RemoveSnapshot { snap } => m.remove_snapshot(&snaps[snap]),
        Op::Hold { snap } => m.hold_snapshot(&snaps[snap], "h"),
        Op::Release { snap } => m.release_snapshot(&snaps[snap], "h"),
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// What a recovered store holds, comparable with the model: volumes by name (size,
/// content hash), snapshots as a sorted list (size, holds, content hash).
#[derive(Debug, PartialEq, Eq, Default)]
struct Dump {
    volumes: BTreeMap<String, (u64, u64)>,
    snapshots: Vec<(u64, String, u64)>,
}

fn model_dump(m: &State) -> Dump {
    let mut d = Dump::default();
    for v in m.list_volumes() {
        let size = m.stat_volume(&v).unwrap().size;
        let h = fnv(&m.read_at(&v, 0, size as usize).unwrap());
        d.volumes.insert(v.to_string(), (size, h));
    }
    for s in m.list_snapshots() {
        let st = m.stat_snapshot(&s).unwrap();
        let h = fnv(&m.read_snapshot_at(&s, 0, st.size as usize).unwrap());
        d.snapshots.push((st.size, st.holds.join(","), h));
    }
    d.snapshots.sort();
    d
}

// ---------------------------------------------------------------------------------------
// Guest side.

fn cmdline(key: &str) -> Option<String> {
    let c = std::fs::read_to_string("/proc/cmdline").ok()?;
    c.split_whitespace().find_map(|a| {
        a.strip_prefix(&format!("powercut.{key}="))
            .map(str::to_owned)
    })
}

/// Runs inside the VM only (ignored on the host).
#[test]
#[ignore = "runs inside the power-cut VM, started by power_cut_at_random_points"]
fn guest_agent() {
    let role = cmdline("role").expect("powercut.role on the kernel command line");
    let seed: u64 = cmdline("seed").unwrap().parse().unwrap();
    let root = PathBuf::from("/data/store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let say = |s: String| {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        writeln!(o, "PC:{s}").unwrap();
        o.flush().unwrap();
    };
    match role.as_str() {
        "work" => {
            std::fs::create_dir_all(&root).unwrap();
            let b = BtrfsBuilder::new(&root).build().unwrap();
            let mut snaps: Vec<SnapshotId> = Vec::new();
            say("WORK-START".into());
            for (i, op) in workload(seed).iter().enumerate() {
                rt.block_on(async {
                    match *op {
                        Op::Create { vol, size } => b
                            .create_volume(&vid(vol), &VolumeOptions::new(size))
                            .await
                            .unwrap(),
                        Op::WriteFlush {
                            vol,
                            offset,
                            len,
                            seed,
                        } => {
                            b.write_at(&vid(vol), offset, &pattern(len, seed))
                                .await
                                .unwrap();
                            b.flush(&vid(vol)).await.unwrap();
                        }
                        Op::Snapshot { vol } => snaps.push(b.snapshot(&vid(vol)).await.unwrap()),
                        Op::Clone { snap, vol } => {
                            b.clone_snapshot(&snaps[snap], &vid(vol)).await.unwrap()
                        }
                        Op::RemoveVolume { vol } => b.remove_volume(&vid(vol)).await.unwrap(),
                        Op::RemoveSnapshot { snap } => {
                            b.remove_snapshot(&snaps[snap]).await.unwrap()
                        }
                        Op::Hold { snap } => b.hold_snapshot(&snaps[snap], "h").await.unwrap(),
                        Op::Release { snap } => {
                            b.release_snapshot(&snaps[snap], "h").await.unwrap()
                        }
                    }
                });
                say(format!("ACK {i}"));
            }
            say("WORK-DONE".into());
        }
        "recover" => {
            say("RECOVER-START".into());
            let _b = BtrfsBuilder::new(&root).build().unwrap();
            say("RECOVER-DONE".into());
        }
        "check" => {
            let b = BtrfsBuilder::new(&root).build().unwrap();
            rt.block_on(async {
                let mut files = 0;
                for v in b.list_volumes().await.unwrap() {
                    let st = b.stat_volume(&v).await.unwrap();
                    let data = b.read_at(&v, 0, st.size as usize).await.unwrap();
                    say(format!("VOL {v} {} {}", st.size, fnv(&data)));
                    files += 1;
                }
                for s in b.list_snapshots().await.unwrap() {
                    let st = b.stat_snapshot(&s).await.unwrap();
                    let data = b.read_snapshot_at(&s, 0, st.size as usize).await.unwrap();
                    say(format!(
                        "SNAP {} {} {}",
                        st.size,
                        if st.holds.is_empty() {
                            "-".into()
                        } else {
                            st.holds.join(",")
                        },
                        fnv(&data)
                    ));
                    files += 1;
                }
                // Data files: exactly one per listed object, nothing else.
                let mut on_disk = 0;
                for dir in ["volumes", "snapshots"] {
                    for e in std::fs::read_dir(root.join(dir)).unwrap() {
                        let e = e.unwrap();
                        if e.path().extension().is_some_and(|x| x == "img") {
                            on_disk += 1;
                        } else {
                            say(format!("STRAY {}", e.path().display()));
                        }
                    }
                }
                say(format!("FILES {files} {on_disk}"));
            });
            say("CHECK-DONE".into());
        }
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Host side.

fn skip(why: &str) {
    let _: Option<()> = slacker_testkit::skip_or_fail(why);
}

struct Vm {
    work: PathBuf,
    accel: Vec<String>,
}

impl Vm {
    fn root(&self) -> PathBuf {
        self.work.join("root")
    }

    /// Boots `role` on `disk`; returns the child and a channel of its console lines.
    fn boot(
        &self,
        dir: &Path,
        disk: &Path,
        role: &str,
        seed: u64,
    ) -> (Child, mpsc::Receiver<String>) {
        let root = self.root();
        let mut child = Command::new(root.join("usr/bin/qemu-system-x86_64"))
            .args(["-name", "slacker-powercut", "-machine", "q35"])
            .args(&self.accel)
            .args(["-smp", "1", "-m", "512", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-vga", "none", "-no-reboot"])
            .arg("-L")
            .arg(root.join("usr/share/qemu"))
            .arg("-L")
            .arg(root.join("usr/share/seabios"))
            .arg("-kernel")
            .arg(self.work.join("build/vmlinux"))
            .arg("-initrd")
            .arg(dir.join("initrd"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 powercut.role={role} powercut.seed={seed}"
            ))
            .arg("-drive")
            // cache=none: no host page cache between the guest and the image; what the
            // guest did not submit (its page cache, btrfs's uncommitted transaction) is
            // lost when qemu dies.
            .arg(format!(
                "file={},if=none,id=d0,format=raw,cache=none,aio=threads",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .args(["-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(mut line) = line else { break };
                // libtest prints "test guest_agent ... " without a newline before the
                // test's own output: start our lines at their marker.
                if let Some(at) = line.find("PC:") {
                    line.drain(..at);
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// Installs/builds the VM tooling (cached) and the guest initramfs; `None` after SKIPPED.
fn setup(dir: &Path) -> Option<Vm> {
    if !rustix_is_root() {
        skip("the power-cut test needs root (qemu tooling install, mkfs.btrfs)");
        return None;
    }
    if which("mkfs.btrfs").is_none() {
        skip("mkfs.btrfs is not installed");
        return None;
    }
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../slacker-backend-nfs/server");
    let work = std::env::var_os("NFSVM_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("SLACKER_CACHE")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("/var/cache/slacker"), PathBuf::from)
                .join("nfsvm")
        });
    if !work.join("build/initramfs.cpio").exists() {
        for script in ["install.sh", "build.sh"] {
            let ok = Command::new("bash")
                .arg(server.join(script))
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                skip(&format!("{script} of the VM tooling failed"));
                return None;
            }
        }
    }
    // The overlay: our /init, this binary, the libraries it links.
    let stage = dir.join("stage");
    std::fs::create_dir_all(stage.join("lib/x86_64-linux-gnu")).unwrap();
    std::fs::create_dir_all(stage.join("data")).unwrap();
    let exe = std::env::current_exe().unwrap();
    std::fs::copy(&exe, stage.join("powercut")).unwrap();
    let ldd = Command::new("ldd").arg(&exe).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(p) = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            let p = Path::new(p);
            if p.is_absolute() {
                let name = p.file_name().unwrap();
                std::fs::copy(p, stage.join("lib/x86_64-linux-gnu").join(name)).unwrap();
            }
        }
    }
    // The dynamic loader of the host libc we just copied (the base image has the Debian
    // package's; they must match).
    let ld = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").unwrap();
    std::fs::copy(ld, stage.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")).unwrap();
    std::fs::write(stage.join("init"), GUEST_INIT).unwrap();
    sh(Command::new("chmod").arg("755").arg(stage.join("init")));
    let busybox = work.join("root/bin/busybox");
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | sort | '{}' cpio -o -H newc 2>/dev/null",
            stage.display(),
            busybox.display()
        ))
        .output()
        .unwrap();
    assert!(cpio.status.success());
    let mut initrd = std::fs::read(work.join("build/initramfs.cpio")).unwrap();
    initrd.extend_from_slice(&cpio.stdout);
    std::fs::write(dir.join("initrd"), initrd).unwrap();
    let kvm = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.contains(" vmx") || c.contains(" svm"));
    let accel = if kvm {
        vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]
    } else {
        vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "Nehalem".into(),
        ]
    };
    Some(Vm { work, accel })
}

const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe -a virtio_pci virtio_blk crc32c_generic btrfs 2>/dev/null
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
mount -t btrfs /dev/vda /data || { echo "PC:FAILED mount"; poweroff -f; }
RUST_BACKTRACE=1 /powercut --exact guest_agent --ignored --nocapture --test-threads=1 2>&1
echo "PC:EXIT $?"
umount /data
poweroff -f
"#;

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.exists())
    })
}

/// Waits for a console line satisfying `f` (or the VM's end / the deadline).
fn wait_for(rx: &mpsc::Receiver<String>, log: &mut Vec<String>, f: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = f(&line);
                log.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One seed: work (cut), maybe recover (cut), check. Returns (acked ops, cut during
/// recovery) or a description of what was lost.
fn one_seed(vm: &Vm, dir: &Path, seed: u64) -> Result<(usize, bool), String> {
    let disk = dir.join("disk.img");
    let _ = std::fs::remove_file(&disk);
    sh(Command::new("truncate").arg("-s").arg("2G").arg(&disk));
    sh(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&disk));
    let mut r = Rng(seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
    let cut_after = r.below(OPS as u64) as usize;
    let extra_ms = r.below(40);

    let mut log = Vec::new();
    let (mut child, rx) = vm.boot(dir, &disk, "work", seed);
    let reached = wait_for(&rx, &mut log, |l| {
        l.strip_prefix("PC:ACK ")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= cut_after)
            || l.starts_with("PC:WORK-DONE")
            || l.starts_with("PC:EXIT")
    });
    std::thread::sleep(Duration::from_millis(extra_ms));
    kill(&mut child);
    while let Ok(l) = rx.try_recv() {
        log.push(l);
    }
    if !reached || log.iter().any(|l| l.contains("panicked")) {
        return Err(format!("work boot failed:\n{}", log.join("\n")));
    }
    let acked = log
        .iter()
        .filter_map(|l| l.strip_prefix("PC:ACK "))
        .filter_map(|n| n.parse::<usize>().ok())
        .max()
        .map_or(0, |n| n + 1);

    // Half the seeds: a power cut during recovery too.
    let cut_recovery = r.below(2) == 0;
    if cut_recovery {
        let mut rlog = Vec::new();
        let (mut child, rx) = vm.boot(dir, &disk, "recover", seed);
        let ok = wait_for(&rx, &mut rlog, |l| l.starts_with("PC:RECOVER-START"));
        std::thread::sleep(Duration::from_millis(r.below(30)));
        kill(&mut child);
        if !ok {
            return Err(format!("recover boot failed:\n{}", rlog.join("\n")));
        }
    }

    let mut clog = Vec::new();
    let (mut child, rx) = vm.boot(dir, &disk, "check", seed);
    let ok = wait_for(&rx, &mut clog, |l| {
        l.starts_with("PC:CHECK-DONE") || l.starts_with("PC:EXIT")
    });
    kill(&mut child);
    if !ok || !clog.iter().any(|l| l == "PC:CHECK-DONE") {
        return Err(format!("check boot failed:\n{}", clog.join("\n")));
    }
    let mut got = Dump::default();
    for l in &clog {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["PC:VOL", name, size, h] => {
                got.volumes
                    .insert((*name).into(), (size.parse().unwrap(), h.parse().unwrap()));
            }
            ["PC:SNAP", size, holds, h] => got.snapshots.push((
                size.parse().unwrap(),
                if *holds == "-" {
                    String::new()
                } else {
                    (*holds).into()
                },
                h.parse().unwrap(),
            )),
            ["PC:STRAY", p] => return Err(format!("stray file after recovery: {p}")),
            ["PC:FILES", listed, on_disk] if listed != on_disk => {
                return Err(format!(
                    "orphans after recovery: {on_disk} data files for {listed} objects"
                ));
            }
            _ => {}
        }
    }
    got.snapshots.sort();

    // The model after every prefix at least as long as the acknowledged one.
    let ops = workload(seed);
    let mut m = State::new();
    let mut snaps = Vec::new();
    for op in &ops[..acked] {
        apply_model(&mut m, &mut snaps, op).unwrap();
    }
    let mut tried = Vec::new();
    for j in acked..=ops.len() {
        if j > acked {
            apply_model(&mut m, &mut snaps, &ops[j - 1]).unwrap();
        }
        let want = model_dump(&m);
        if want == got {
            return Ok((acked, cut_recovery));
        }
        tried.push(j);
    }
    Err(format!(
        "seed {seed}: the recovered state matches no prefix of >= {acked} acknowledged \
         operations (the next ones: {:?})\nrecovered: {got:?}\nmodel after {acked}: {:?}\n\
         acknowledged: {:?}",
        &ops[acked..ops.len().min(acked + 2)],
        {
            let mut m = State::new();
            let mut s = Vec::new();
            for op in &ops[..acked] {
                apply_model(&mut m, &mut s, op).unwrap();
            }
            model_dump(&m)
        },
        &ops[..acked]
    ))
}

#[test]
fn power_cut_at_random_points() {
    let base = std::env::var_os("SLACKER_POWERCUT_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("slacker-powercut-")
        .tempdir_in(&base)
        .unwrap();
    let Some(vm) = setup(dir.path()) else { return };
    let seeds: u64 = std::env::var("SLACKER_POWERCUT_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed0: u64 = std::env::var("SLACKER_POWERCUT_SEED0")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (mut cuts, mut recovery_cuts, mut acked_total) = (0, 0, 0);
    for seed in seed0..seed0 + seeds {
        match one_seed(&vm, dir.path(), seed) {
            Ok((acked, rec)) => {
                cuts += 1;
                recovery_cuts += usize::from(rec);
                acked_total += acked;
                eprintln!(
                    "seed {seed}: cut after {acked} acknowledged ops; recovery cut: {rec}; nothing lost"
                );
            }
            Err(e) => {
                if std::env::var_os("SLACKER_POWERCUT_KEEP").is_some() {
                    eprintln!("kept {}", dir.keep().display());
                }
                panic!("seed {seed}: {e}")
            }
        }
    }
    eprintln!(
        "power cuts survived: {cuts} seeds ({cuts} cuts mid-workload + {recovery_cuts} mid-recovery), {acked_total} acknowledged ops checked"
    );
}
