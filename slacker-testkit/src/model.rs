//! The model-based state-machine property test.
//!
//! Random sequences of operations (create volumes of up to 64 MiB, writes anywhere in them
//! from a few bytes to 3 MiB, zero writes, fragmenting scatter writes, reads, flush,
//! snapshot, clone, remove, holds, deliberately stale or never-minted ids, reopen, and pairs
//! of operations on two concurrent tasks) run against a backend and against the mem model
//! ([`State`], sparse: only written blocks cost memory); after every step the outcomes (Ok
//! vs [`ErrorKind`]) and returned data must agree (for a concurrent pair: those of one of
//! the two orders), and at the end of each sequence every volume and snapshot must read as
//! the model's, keep the bitmap invariant, and stat as the model's.
//!
//! # The diverged bitmap, bounded on both sides
//!
//! A backend's bitmap must contain every block the model wrote (else the shared cache
//! could serve stale data) and nothing beyond those blocks rounded out to the harness's
//! [`diverged_granule`](crate::Harness::diverged_granule) (else an "everything diverged"
//! backend would pass): exact for the mem backend, 4 KiB pages for btrfs (FIEMAP), 4 MiB
//! for NFS (the intent granule a reopen may still see pending). Once a volume's origin
//! snapshot is removed, the blocks holding data may also be reported (btrfs can only go by
//! the extent's sharing flag then). `stat_snapshot` is held to the same bounds, and its
//! size, parent and holds to the model's.
//!
//! Large volumes are compared at the blocks the model or the backend says hold data plus a
//! sample; volumes up to 1 MiB byte for byte.

use std::fmt;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use slacker_backend_mem::State;
use slacker_core::{
    Backend, BlockBitmap, BlockIndex, BlockRange, BlockSize, ErrorKind, Result, SnapshotId,
    VolumeId, VolumeOptions,
};

use crate::Harness;

const VOLUMES: u8 = 4;
const HOLDERS: u8 = 2;
const MIB: u32 = 1 << 20;
/// Largest volume the test creates (64 MiB): past NFS's 4 MiB intent granule and its
/// multi-chunk WRITE path, big enough for FIEMAP maps of more than 512 extents.
pub const MAX_VOLUME: u64 = 64 << 20;
/// Volumes up to this size are compared byte for byte at the end of a sequence; larger
/// ones at every block the model or the backend says holds data, plus a sample.
const FULL_COMPARE: u64 = 1 << 20;
/// Comparisons read up to this much at once: several NFS READ chunks of 1 MiB.
const READ_PIECE: u64 = 3 << 20;

/// One operation. Volumes are named by a small index, snapshots by their position in the
/// list of every snapshot minted so far (one past the end = an id nobody minted).
#[derive(Clone, Debug)]
pub enum Op {
    /// Create volume `vol` of `blocks` blocks (block size 512 B or 4 KiB).
    Create {
        /// Volume index.
        vol: u8,
        /// Size in blocks (0 is invalid on purpose; at most 64 MiB).
        blocks: u32,
        /// Use 512-byte blocks.
        small: bool,
    },
    /// Write `len` bytes of a pattern at `offset` (seed 0: zeros, which NFS turns into a
    /// hole punch from 64 KiB up).
    Write {
        /// Volume index.
        vol: u8,
        /// Byte offset (may be past the end).
        offset: u32,
        /// Length (up to 3 MiB: several NFS WRITE chunks, UNSTABLE + COMMIT).
        len: u32,
        /// Pattern seed.
        seed: u8,
    },
    /// As [`Op::Write`], but straight into the volume's file where the backend has one
    /// ([`Backend::local_path`]: a runtime writing its loop-mounted volume), so the bitmap
    /// must come from the file itself (btrfs: FIEMAP); elsewhere through `write_at`.
    WriteDirect {
        /// Volume index.
        vol: u8,
        /// Byte offset (may be past the end).
        offset: u32,
        /// Length.
        len: u32,
        /// Pattern seed.
        seed: u8,
    },
    /// `count` writes of 100 bytes, one every 8 KiB from `offset`: a fragmented file
    /// (btrfs FIEMAP maps of more than one 512-extent batch).
    Scatter {
        /// Volume index.
        vol: u8,
        /// Byte offset of the first write.
        offset: u32,
        /// Number of writes.
        count: u16,
        /// Pattern seed.
        seed: u8,
    },
    /// Read `len` bytes at `offset`.
    Read {
        /// Volume index.
        vol: u8,
        /// Byte offset.
        offset: u32,
        /// Length.
        len: u32,
    },
    /// Make a volume's acknowledged writes durable.
    Flush {
        /// Volume index.
        vol: u8,
    },
    /// Snapshot a volume.
    Snapshot {
        /// Volume index.
        vol: u8,
    },
    /// Clone a snapshot into a volume.
    Clone {
        /// Snapshot position.
        snap: u8,
        /// Volume index.
        vol: u8,
    },
    /// Read a snapshot.
    ReadSnapshot {
        /// Snapshot position.
        snap: u8,
        /// Byte offset.
        offset: u32,
        /// Length.
        len: u32,
    },
    /// Remove a volume.
    RemoveVolume {
        /// Volume index.
        vol: u8,
    },
    /// Remove a snapshot.
    RemoveSnapshot {
        /// Snapshot position.
        snap: u8,
    },
    /// Place a hold.
    Hold {
        /// Snapshot position.
        snap: u8,
        /// Holder index.
        holder: u8,
    },
    /// Release a hold.
    Release {
        /// Snapshot position.
        snap: u8,
        /// Holder index.
        holder: u8,
    },
    /// Stat a volume: size, origin, the bitmap within its bounds, the bitmap invariant.
    Stat {
        /// Volume index.
        vol: u8,
    },
    /// Stat a snapshot: size, parent, holds, the bitmap within its bounds.
    StatSnapshot {
        /// Snapshot position.
        snap: u8,
    },
    /// Two operations at once, on two tasks (never on the same volume). The outcome must
    /// be that of one of the two orders.
    Concurrent(Box<Op>, Box<Op>),
    /// Reopen the backend.
    Reopen,
}

impl Op {
    fn vol(&self) -> Option<u8> {
        self.clone().vol_mut().copied()
    }

    fn vol_mut(&mut self) -> Option<&mut u8> {
        match self {
            Op::Create { vol, .. }
            | Op::Write { vol, .. }
            | Op::WriteDirect { vol, .. }
            | Op::Scatter { vol, .. }
            | Op::Read { vol, .. }
            | Op::Flush { vol }
            | Op::Snapshot { vol }
            | Op::Clone { vol, .. }
            | Op::RemoveVolume { vol }
            | Op::Stat { vol } => Some(vol),
            _ => None,
        }
    }
}

fn offset() -> impl Strategy<Value = u32> {
    // Mostly where the small volumes are, often anywhere in a big one, sometimes at the
    // end of the largest.
    prop_oneof![
        3 => 0u32..6_000,
        2 => 0u32..2 * MIB,
        2 => 0u32..64 * MIB,
        1 => (64 * MIB - 4 * MIB)..64 * MIB,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..1_500,
        2 => 0u32..10_000,
        1 => 60_000u32..300_000,
        1 => MIB..3 * MIB,
    ]
}

fn blocks() -> impl Strategy<Value = (u32, bool)> {
    prop_oneof![
        3 => (0u32..12, any::<bool>()),
        1 => Just((256, false)),                 // 1 MiB
        1 => (2048u32..2100).prop_map(|b| (b, false)), // 8 MiB and a bit
        1 => Just((16384, false)),               // 64 MiB of 4 KiB blocks
        1 => Just((131_072, true)),              // 64 MiB of 512 B blocks
    ]
}

/// The operations that may run on one task (everything but reopen and concurrency).
fn simple_op() -> impl Strategy<Value = Op> {
    let vol = 0..VOLUMES;
    let snap = any::<u8>();
    prop_oneof![
        3 => (vol.clone(), blocks()).prop_map(|(vol, (blocks, small))| Op::Create { vol, blocks, small }),
        6 => (vol.clone(), offset(), len(), any::<u8>()).prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        2 => (vol.clone(), offset(), len(), any::<u8>()).prop_map(|(vol, offset, len, seed)| Op::WriteDirect { vol, offset, len, seed }),
        1 => (vol.clone(), offset(), 1u16..700, any::<u8>()).prop_map(|(vol, offset, count, seed)| Op::Scatter { vol, offset, count, seed }),
        2 => (vol.clone(), offset(), len()).prop_map(|(vol, offset, len)| Op::Read { vol, offset, len }),
        1 => vol.clone().prop_map(|vol| Op::Flush { vol }),
        3 => vol.clone().prop_map(|vol| Op::Snapshot { vol }),
        3 => (snap, vol.clone()).prop_map(|(snap, vol)| Op::Clone { snap, vol }),
        2 => (snap, offset(), len()).prop_map(|(snap, offset, len)| Op::ReadSnapshot { snap, offset, len }),
        1 => vol.clone().prop_map(|vol| Op::RemoveVolume { vol }),
        1 => snap.prop_map(|snap| Op::RemoveSnapshot { snap }),
        1 => (snap, 0..HOLDERS).prop_map(|(snap, holder)| Op::Hold { snap, holder }),
        1 => (snap, 0..HOLDERS).prop_map(|(snap, holder)| Op::Release { snap, holder }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => simple_op(),
        2 => (0..VOLUMES).prop_map(|vol| Op::Stat { vol }),
        1 => any::<u8>().prop_map(|snap| Op::StatSnapshot { snap }),
        3 => (simple_op(), simple_op(), 1..VOLUMES).prop_map(|(a, mut b, shift)| {
            // Never two operations on one volume: their order would be unobservable.
            if let (Some(va), Some(vb)) = (a.vol(), b.vol_mut()) {
                if *vb == va {
                    *vb = (va + shift) % VOLUMES;
                }
            }
            Op::Concurrent(Box::new(a), Box::new(b))
        }),
        1 => Just(Op::Reopen),
    ]
}

/// How many cases and steps to run.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Number of random sequences (`PROPTEST_CASES` overrides the default 256).
    pub cases: u32,
    /// Longest sequence.
    pub max_steps: usize,
    /// Where shrunk failures are recorded, relative to the test's working directory
    /// (the crate root under `cargo test`); `None` records nothing.
    pub regressions: Option<&'static str>,
    /// Use a fixed RNG seed (reproducible runs, for tests that must find a known bug);
    /// `false` draws a new seed each run, which explores more over time.
    pub deterministic: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            cases: Config::default().cases,
            max_steps: 40,
            regressions: Some("proptest-regressions/model.txt"),
            deterministic: false,
        }
    }
}

/// A failed property test, with the shrunk sequence.
#[derive(Debug)]
pub struct ModelFailure(pub String);

impl fmt::Display for ModelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn volume_name(i: u8) -> VolumeId {
    VolumeId::new(format!("m{i}")).expect("valid")
}

fn data(len: u32, seed: u8) -> Vec<u8> {
    if seed % 8 == 0 {
        vec![0; len as usize]
    } else {
        crate::checks::pattern(len as usize, seed)
    }
}

/// What one operation returned, reduced to what must agree between backend and model.
#[derive(Debug)]
enum Out {
    Unit(std::result::Result<(), ErrorKind>),
    Data(std::result::Result<Bytes, ErrorKind>),
    Snap(std::result::Result<SnapshotId, ErrorKind>),
}

impl Out {
    fn unit<T>(r: Result<T>) -> Self {
        Out::Unit(r.map(|_| ()).map_err(|e| e.kind()))
    }

    /// Same outcome (and for reads the same bytes); snapshot ids differ by backend.
    fn agrees(&self, other: &Out) -> bool {
        match (self, other) {
            (Out::Unit(a), Out::Unit(b)) => a == b,
            (Out::Data(a), Out::Data(b)) => a == b,
            (Out::Snap(a), Out::Snap(b)) => a.as_ref().err() == b.as_ref().err(),
            _ => false,
        }
    }

    fn short(&self) -> String {
        match self {
            Out::Unit(r) => format!("{r:?}"),
            Out::Data(r) => format!("{:?}", r.as_ref().map(|d| format!("{} bytes", d.len()))),
            Out::Snap(r) => format!("{r:?}"),
        }
    }
}

/// Resolves snapshot position `i` to (backend id, model id).
fn snap_at(snaps: &[(SnapshotId, SnapshotId)], scheme: &str, i: u8) -> (SnapshotId, SnapshotId) {
    let i = usize::from(i) % (snaps.len() + 1);
    match snaps.get(i) {
        Some(pair) => pair.clone(),
        None => (
            SnapshotId::new(scheme, "never-minted-0").expect("valid"),
            SnapshotId::new(slacker_backend_mem::SCHEME, "never-minted-0").expect("valid"),
        ),
    }
}

async fn exec_backend<B: Backend>(b: &B, snaps: &[(SnapshotId, SnapshotId)], op: &Op) -> Out {
    let snap = |i| snap_at(snaps, b.info().scheme, i).0;
    match *op {
        Op::Create { vol, blocks, small } => Out::unit(
            b.create_volume(&volume_name(vol), &volume_options(blocks, small))
                .await,
        ),
        Op::Write {
            vol,
            offset,
            len,
            seed,
        } => Out::unit(
            b.write_at(&volume_name(vol), u64::from(offset), &data(len, seed))
                .await,
        ),
        Op::WriteDirect {
            vol,
            offset,
            len,
            seed,
        } => {
            Out::unit(write_direct(b, &volume_name(vol), u64::from(offset), &data(len, seed)).await)
        }
        Op::Scatter {
            vol,
            offset,
            count,
            seed,
        } => {
            let id = volume_name(vol);
            for (at, d) in scatter(offset, count, seed) {
                if let Err(e) = b.write_at(&id, at, &d).await {
                    return Out::Unit(Err(e.kind()));
                }
            }
            Out::Unit(Ok(()))
        }
        Op::Read { vol, offset, len } => Out::Data(
            b.read_at(&volume_name(vol), u64::from(offset), len as usize)
                .await
                .map_err(|e| e.kind()),
        ),
        Op::Flush { vol } => Out::unit(b.flush(&volume_name(vol)).await),
        Op::Snapshot { vol } => {
            Out::Snap(b.snapshot(&volume_name(vol)).await.map_err(|e| e.kind()))
        }
        Op::Clone { snap: s, vol } => {
            Out::unit(b.clone_snapshot(&snap(s), &volume_name(vol)).await)
        }
        Op::ReadSnapshot {
            snap: s,
            offset,
            len,
        } => Out::Data(
            b.read_snapshot_at(&snap(s), u64::from(offset), len as usize)
                .await
                .map_err(|e| e.kind()),
        ),
        Op::RemoveVolume { vol } => Out::unit(b.remove_volume(&volume_name(vol)).await),
        Op::RemoveSnapshot { snap: s } => Out::unit(b.remove_snapshot(&snap(s)).await),
        Op::Hold { snap: s, holder } => {
            Out::unit(b.hold_snapshot(&snap(s), &format!("h{holder}")).await)
        }
        Op::Release { snap: s, holder } => {
            Out::unit(b.release_snapshot(&snap(s), &format!("h{holder}")).await)
        }
        Op::Stat { vol } => Out::unit(b.stat_volume(&volume_name(vol)).await),
        Op::StatSnapshot { snap: s } => Out::unit(b.stat_snapshot(&snap(s)).await),
        Op::Concurrent(..) | Op::Reopen => unreachable!("handled by the caller"),
    }
}

fn exec_model(m: &mut State, snaps: &[(SnapshotId, SnapshotId)], op: &Op) -> Out {
    let snap = |i| snap_at(snaps, "x", i).1;
    match *op {
        Op::Create { vol, blocks, small } => {
            Out::unit(m.create_volume(&volume_name(vol), &volume_options(blocks, small)))
        }
        Op::Write {
            vol,
            offset,
            len,
            seed,
        } => Out::unit(m.write_at(&volume_name(vol), u64::from(offset), &data(len, seed))),
        Op::WriteDirect {
            vol,
            offset,
            len,
            seed,
        } => Out::unit(m.write_at(&volume_name(vol), u64::from(offset), &data(len, seed))),
        Op::Scatter {
            vol,
            offset,
            count,
            seed,
        } => {
            let id = volume_name(vol);
            for (at, d) in scatter(offset, count, seed) {
                if let Err(e) = m.write_at(&id, at, &d) {
                    return Out::Unit(Err(e.kind()));
                }
            }
            Out::Unit(Ok(()))
        }
        Op::Read { vol, offset, len } => Out::Data(
            m.read_at(&volume_name(vol), u64::from(offset), len as usize)
                .map_err(|e| e.kind()),
        ),
        Op::Flush { vol } => Out::unit(m.flush(&volume_name(vol))),
        Op::Snapshot { vol } => Out::Snap(m.snapshot(&volume_name(vol)).map_err(|e| e.kind())),
        Op::Clone { snap: s, vol } => Out::unit(m.clone_snapshot(&snap(s), &volume_name(vol))),
        Op::ReadSnapshot {
            snap: s,
            offset,
            len,
        } => Out::Data(
            m.read_snapshot_at(&snap(s), u64::from(offset), len as usize)
                .map_err(|e| e.kind()),
        ),
        Op::RemoveVolume { vol } => Out::unit(m.remove_volume(&volume_name(vol))),
        Op::RemoveSnapshot { snap: s } => Out::unit(m.remove_snapshot(&snap(s))),
        Op::Hold { snap: s, holder } => Out::unit(m.hold_snapshot(&snap(s), &format!("h{holder}"))),
        Op::Release { snap: s, holder } => {
            Out::unit(m.release_snapshot(&snap(s), &format!("h{holder}")))
        }
        Op::Stat { vol } => Out::unit(m.stat_volume(&volume_name(vol))),
        Op::StatSnapshot { snap: s } => Out::unit(m.stat_snapshot(&snap(s))),
        Op::Concurrent(..) | Op::Reopen => unreachable!("handled by the caller"),
    }
}

/// Writes into the volume's local file when it has one, else through `write_at`.
async fn write_direct<B: Backend>(b: &B, id: &VolumeId, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    match b.local_path(id).await {
        Ok(path) => {
            let st = b.stat_volume(id).await?;
            slacker_core::backend::check_range(offset, data.len() as u64, st.size)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| slacker_core::Error::backend("model test", e))?;
            f.write_all_at(data, offset)
                .map_err(|e| slacker_core::Error::backend("model test", e))
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => b.write_at(id, offset, data).await,
        Err(e) => Err(e),
    }
}

fn volume_options(blocks: u32, small: bool) -> VolumeOptions {
    let bs = if small {
        BlockSize::MIN
    } else {
        BlockSize::DEFAULT
    };
    VolumeOptions::new(u64::from(blocks) * bs.bytes()).with_block_size(bs)
}

fn scatter(offset: u32, count: u16, seed: u8) -> impl Iterator<Item = (u64, Vec<u8>)> {
    (0..u64::from(count)).map(move |i| (u64::from(offset) + i * 8192, data(100, seed.max(1))))
}

/// Rounds every run of `b` out to whole granules of `granule` blocks, within `blocks`.
fn round_out(b: &BlockBitmap, granule: u32, blocks: u32) -> BlockBitmap {
    let g = granule.max(1);
    let mut out = BlockBitmap::new();
    for r in b.runs() {
        out.insert_range(BlockRange::new(
            r.start / g * g,
            r.end.div_ceil(g).saturating_mul(g).min(blocks),
        ));
    }
    out
}

struct Run<'h, H: Harness> {
    harness: &'h H,
    backend: Option<H::Backend>,
    model: State,
    /// (backend id, model id) of every snapshot minted, in order.
    snaps: Vec<(SnapshotId, SnapshotId)>,
}

impl<H: Harness> Run<'_, H> {
    fn b(&self) -> &H::Backend {
        self.backend.as_ref().expect("backend present")
    }

    fn to_model(&self, s: &Option<SnapshotId>) -> Option<SnapshotId> {
        s.as_ref().map(|s| {
            self.snaps
                .iter()
                .find(|(b, _)| b == s)
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| SnapshotId::new("unknown", "x").expect("valid"))
        })
    }

    fn record(&mut self, op: &Op, b: Out, m: Out) -> std::result::Result<(), String> {
        if let (Op::Snapshot { .. }, Out::Snap(Ok(b)), Out::Snap(Ok(m))) = (op, b, m) {
            if self.snaps.iter().any(|(x, _)| *x == b) {
                return Err(format!("{op:?}: snapshot id {b} minted twice"));
            }
            self.snaps.push((b, m));
        }
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> std::result::Result<(), String> {
        match op {
            Op::Reopen => {
                let b = self.backend.take().expect("backend present");
                self.backend = Some(self.harness.reopen(b).await);
                return Ok(());
            }
            Op::Concurrent(a, b) => return self.concurrent(a, b).await,
            _ => {}
        }
        let b = exec_backend(self.b(), &self.snaps, op).await;
        let m = exec_model(&mut self.model, &self.snaps, op);
        if !b.agrees(&m) {
            return Err(match (&b, &m) {
                (Out::Data(Ok(_)), Out::Data(Ok(_))) => {
                    format!("{op:?}: data differs from the model")
                }
                _ => format!("{op:?}: backend {} vs model {}", b.short(), m.short()),
            });
        }
        match *op {
            Op::Stat { vol } if matches!(b, Out::Unit(Ok(()))) => {
                self.check_volume_stat(&volume_name(vol)).await?;
                self.check_invariant(&volume_name(vol)).await?;
            }
            Op::StatSnapshot { snap } if matches!(b, Out::Unit(Ok(()))) => {
                let pair = snap_at(&self.snaps, self.b().info().scheme, snap);
                self.check_snapshot_stat(&pair).await?;
            }
            _ => {}
        }
        self.record(op, b, m)
    }

    /// Runs `a` and `b` on two tasks at once; the outcomes must be those of `a` then `b`
    /// or of `b` then `a` in the model, whose state then follows that order.
    async fn concurrent(&mut self, a: &Op, b: &Op) -> std::result::Result<(), String> {
        let backend = self.b();
        let (ra, rb) = tokio::join!(
            exec_backend(backend, &self.snaps, a),
            exec_backend(backend, &self.snaps, b)
        );
        let mut ab = self.model.clone();
        let (ma1, mb1) = (
            exec_model(&mut ab, &self.snaps, a),
            exec_model(&mut ab, &self.snaps, b),
        );
        if ra.agrees(&ma1) && rb.agrees(&mb1) {
            self.model = ab;
            self.record(a, ra, ma1)?;
            return self.record(b, rb, mb1);
        }
        let mut ba = self.model.clone();
        let mb2 = exec_model(&mut ba, &self.snaps, b);
        let ma2 = exec_model(&mut ba, &self.snaps, a);
        if ra.agrees(&ma2) && rb.agrees(&mb2) {
            self.model = ba;
            self.record(b, rb, mb2)?;
            return self.record(a, ra, ma2);
        }
        Err(format!(
            "concurrent {a:?} || {b:?}: backend ({}, {}) matches neither order of the model \
             (a;b: {}, {}; b;a: {}, {}) - data differs from the model or outcomes do",
            ra.short(),
            rb.short(),
            ma1.short(),
            mb1.short(),
            ma2.short(),
            mb2.short()
        ))
    }

    /// The backend's bitmap must hold every block the model wrote, and no block beyond
    /// those rounded out to the harness's declared granule (plus, once the origin is
    /// gone, the blocks holding data, which a backend may no longer tell apart).
    #[allow(clippy::too_many_arguments)]
    fn check_bitmap(
        &self,
        what: &str,
        got: &BlockBitmap,
        model: &BlockBitmap,
        populated: &BlockBitmap,
        origin_alive: bool,
        size: u64,
        bs: BlockSize,
    ) -> std::result::Result<(), String> {
        let missing = model.difference(got);
        if !missing.is_empty() {
            return Err(format!(
                "bitmap invariant broken: the diverged bitmap of {what} misses written blocks {:?}",
                missing.runs().take(4).collect::<Vec<_>>()
            ));
        }
        let blocks = (size / bs.bytes()) as u32;
        let granule = (self.harness.diverged_granule() / bs.bytes()).max(1) as u32;
        let mut allowed = round_out(model, granule, blocks);
        if !origin_alive {
            allowed = allowed.union(&round_out(populated, granule, blocks));
        }
        let extra = got.difference(&allowed);
        if !extra.is_empty() {
            return Err(format!(
                "the diverged bitmap of {what} reports {} blocks beyond the model's writes \
                 rounded out to the declared granule of {} bytes: {:?}",
                extra.len(),
                self.harness.diverged_granule(),
                extra.runs().take(4).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    async fn check_volume_stat(&self, id: &VolumeId) -> std::result::Result<(), String> {
        let b = self.b().stat_volume(id).await.map_err(|e| e.to_string())?;
        let m = self.model.stat_volume(id).map_err(|e| e.to_string())?;
        if (b.size, b.block_size) != (m.size, m.block_size) || self.to_model(&b.origin) != m.origin
        {
            return Err(format!("stat of {id} differs: {b:?} vs {m:?}"));
        }
        let alive = m
            .origin
            .as_ref()
            .is_none_or(|o| self.model.stat_snapshot(o).is_ok());
        let populated = self.model.volume_blocks(id).map_err(|e| e.to_string())?;
        self.check_bitmap(
            &format!("volume {id}"),
            &b.diverged,
            &m.diverged,
            &populated,
            alive,
            m.size,
            m.block_size,
        )
    }

    async fn check_snapshot_stat(
        &self,
        (bs, ms): &(SnapshotId, SnapshotId),
    ) -> std::result::Result<(), String> {
        let b = self
            .b()
            .stat_snapshot(bs)
            .await
            .map_err(|e| e.to_string())?;
        let m = self.model.stat_snapshot(ms).map_err(|e| e.to_string())?;
        if (b.size, b.block_size, &b.holds) != (m.size, m.block_size, &m.holds)
            || self.to_model(&b.parent) != m.parent
        {
            return Err(format!("stat of snapshot {bs} differs: {b:?} vs {m:?}"));
        }
        let alive = m
            .parent
            .as_ref()
            .is_none_or(|o| self.model.stat_snapshot(o).is_ok());
        let populated = self.model.snapshot_blocks(ms).map_err(|e| e.to_string())?;
        self.check_bitmap(
            &format!("snapshot {bs}"),
            &b.diverged,
            &m.diverged,
            &populated,
            alive,
            m.size,
            m.block_size,
        )
    }

    /// The blocks of a volume worth comparing: every block for a small volume; for a
    /// large one the blocks holding data in the model, those the backend reports
    /// diverged, and a sample (first, last, a spread in between).
    fn probe(&self, size: u64, bs: BlockSize, extra: &[&BlockBitmap]) -> BlockBitmap {
        let blocks = (size / bs.bytes()) as u32;
        let mut p = BlockBitmap::new();
        if size <= FULL_COMPARE {
            p.insert_range(BlockRange::new(0, blocks));
            return p;
        }
        for e in extra {
            p = p.union(e);
        }
        for i in 0..8u32 {
            p.insert(BlockIndex(
                (u64::from(blocks - 1) * u64::from(i) / 7) as u32,
            ));
        }
        p.remove_range(BlockRange::new(blocks, u32::MAX));
        p
    }

    /// A block outside the bitmap reads as the origin's (checked on the probed blocks).
    async fn check_invariant(&self, id: &VolumeId) -> std::result::Result<(), String> {
        let b = self.b();
        let st = b.stat_volume(id).await.map_err(|e| e.to_string())?;
        let bs = st.block_size.bytes();
        let populated = self.model.volume_blocks(id).map_err(|e| e.to_string())?;
        let probe = self.probe(st.size, st.block_size, &[&populated]);
        for run in probe.difference(&st.diverged).runs() {
            for piece in split(run, (READ_PIECE / bs) as u32) {
                let (off, len) = (u64::from(piece.start) * bs, (piece.len() * bs) as usize);
                let mine = b.read_at(id, off, len).await.map_err(|e| e.to_string())?;
                let origin = match &st.origin {
                    Some(s) => match b.read_snapshot_at(s, off, len).await {
                        Ok(d) => d,
                        // The origin was removed: nothing to compare with here; the
                        // content itself is compared with the model in `compare_all`.
                        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                        Err(e) => return Err(e.to_string()),
                    },
                    None => vec![0u8; len].into(),
                };
                if mine != origin {
                    return Err(format!(
                        "bitmap invariant broken: blocks {piece:?} of {id} are outside the diverged bitmap but differ from its origin"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn compare_volume(&self, v: &VolumeId) -> std::result::Result<(), String> {
        let b = self.b();
        let st = b.stat_volume(v).await.map_err(|e| e.to_string())?;
        let bs = st.block_size.bytes();
        let populated = self.model.volume_blocks(v).map_err(|e| e.to_string())?;
        for run in self
            .probe(st.size, st.block_size, &[&populated, &st.diverged])
            .runs()
        {
            for piece in split(run, (READ_PIECE / bs) as u32) {
                let (off, len) = (u64::from(piece.start) * bs, (piece.len() * bs) as usize);
                let got = b.read_at(v, off, len).await.map_err(|e| e.to_string())?;
                if got != self.model.read_at(v, off, len).map_err(|e| e.to_string())? {
                    return Err(format!(
                        "content of {v} differs from the model at {piece:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn compare_snapshot(
        &self,
        (bs, ms): &(SnapshotId, SnapshotId),
    ) -> std::result::Result<(), String> {
        let st = self.model.stat_snapshot(ms).map_err(|e| e.to_string())?;
        let got = self
            .b()
            .stat_snapshot(bs)
            .await
            .map_err(|e| e.to_string())?;
        let blk = st.block_size.bytes();
        let populated = self.model.snapshot_blocks(ms).map_err(|e| e.to_string())?;
        for run in self
            .probe(st.size, st.block_size, &[&populated, &got.diverged])
            .runs()
        {
            for piece in split(run, (READ_PIECE / blk) as u32) {
                let (off, len) = (u64::from(piece.start) * blk, (piece.len() * blk) as usize);
                let data = self
                    .b()
                    .read_snapshot_at(bs, off, len)
                    .await
                    .map_err(|e| e.to_string())?;
                let want = self
                    .model
                    .read_snapshot_at(ms, off, len)
                    .map_err(|e| e.to_string())?;
                if data != want {
                    return Err(format!(
                        "content of snapshot {bs} differs from the model at {piece:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn compare_all(&self) -> std::result::Result<(), String> {
        let b = self.b();
        let vols = b.list_volumes().await.map_err(|e| e.to_string())?;
        if vols != self.model.list_volumes() {
            return Err(format!(
                "volumes differ: {vols:?} vs {:?}",
                self.model.list_volumes()
            ));
        }
        for v in &vols {
            self.compare_volume(v).await?;
            self.check_volume_stat(v).await?;
            self.check_invariant(v).await?;
        }
        let live = b.list_snapshots().await.map_err(|e| e.to_string())?;
        for pair in &self.snaps {
            let in_model = self.model.stat_snapshot(&pair.1).is_ok();
            if live.contains(&pair.0) != in_model {
                return Err(format!(
                    "snapshot {} listed: {}, in model: {in_model}",
                    pair.0,
                    live.contains(&pair.0)
                ));
            }
            if in_model {
                self.compare_snapshot(pair).await?;
                self.check_snapshot_stat(pair).await?;
            }
        }
        Ok(())
    }
}

/// Splits `run` into pieces of at most `max` blocks.
fn split(run: BlockRange, max: u32) -> impl Iterator<Item = BlockRange> {
    let max = max.max(1);
    (run.start..run.end)
        .step_by(max as usize)
        .map(move |s| BlockRange::new(s, s.saturating_add(max).min(run.end)))
}

/// Runs one sequence; `Err` describes the first divergence.
pub async fn run_sequence<H: Harness>(h: &H, ops: &[Op]) -> std::result::Result<(), String> {
    let mut run = Run {
        harness: h,
        backend: Some(h.fresh().await),
        model: State::new(),
        snaps: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        run.step(op).await.map_err(|e| format!("step {i}: {e}"))?;
    }
    run.compare_all()
        .await
        .map_err(|e| format!("after {} steps: {e}", ops.len()))
}

/// Runs the property test: `config.cases` random sequences, shrinking any failure.
///
/// # Errors
/// The shrunk failing sequence and what diverged.
pub fn run_model_test<H: Harness>(
    h: &H,
    config: ModelConfig,
) -> std::result::Result<(), ModelFailure> {
    let mut cfg = Config {
        cases: config.cases,
        failure_persistence: config
            .regressions
            .map(|p| Box::new(FileFailurePersistence::Direct(p)) as Box<_>),
        ..Config::default()
    };
    cfg.max_shrink_iters = 2048;
    let rt = crate::runtime();
    let mut runner = if config.deterministic {
        TestRunner::new_with_rng(cfg, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    } else {
        TestRunner::new(cfg)
    };
    let strategy = proptest::collection::vec(op(), 1..=config.max_steps);
    match runner.run(&strategy, |ops| {
        rt.block_on(run_sequence(h, &ops))
            .map_err(TestCaseError::fail)
    }) {
        Ok(()) => Ok(()),
        Err(TestError::Fail(why, ops)) => Err(ModelFailure(format!(
            "{why}\nminimal failing sequence: {ops:#?}"
        ))),
        Err(TestError::Abort(why)) => Err(ModelFailure(format!("aborted: {why}"))),
    }
}
