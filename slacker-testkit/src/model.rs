//! The model-based state-machine property test.
//!
//! Random sequences of operations (create, writes at random offsets and lengths, reads,
//! snapshot, clone, remove, holds, deliberately stale or never-minted ids, reopen) run
//! against a backend and against the mem model ([`State`]); after every step the outcomes
//! (Ok vs [`ErrorKind`]) and returned data must agree, and at the end of each sequence
//! every volume and snapshot must read as the model's and keep the bitmap invariant.

use std::fmt;

use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use slacker_backend_mem::State;
use slacker_core::{
    Backend, BlockIndex, BlockSize, ErrorKind, Result, SnapshotId, VolumeId, VolumeOptions,
};

use crate::Harness;

const VOLUMES: u8 = 4;
const HOLDERS: u8 = 2;

/// One operation. Volumes are named by a small index, snapshots by their position in the
/// list of every snapshot minted so far (one past the end = an id nobody minted).
#[derive(Clone, Debug)]
pub enum Op {
    /// Create volume `vol` of `blocks` blocks (block size 512 B or 4 KiB).
    Create {
        /// Volume index.
        vol: u8,
        /// Size in blocks (0 is invalid on purpose).
        blocks: u8,
        /// Use 512-byte blocks.
        small: bool,
    },
    /// Write `len` bytes of a pattern at `offset`.
    Write {
        /// Volume index.
        vol: u8,
        /// Byte offset (may be past the end).
        offset: u32,
        /// Length.
        len: u16,
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
        len: u16,
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
        len: u16,
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
    /// Stat a volume and check the bitmap invariant on it.
    Stat {
        /// Volume index.
        vol: u8,
    },
    /// Reopen the backend.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let vol = 0..VOLUMES;
    let snap = any::<u8>();
    // Mostly small offsets and lengths, so that IO lands inside the small volumes (512-byte
    // blocks make volumes of at most 5.5 KiB) often enough; sometimes anywhere.
    let offset = || prop_oneof![3 => 0u32..6_000, 1 => 0u32..50_000];
    let len = || prop_oneof![3 => 0u16..1_500, 1 => 0u16..10_000];
    prop_oneof![
        3 => (vol.clone(), 0u8..12, any::<bool>()).prop_map(|(vol, blocks, small)| Op::Create { vol, blocks, small }),
        6 => (vol.clone(), offset(), len(), any::<u8>()).prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        2 => (vol.clone(), offset(), len()).prop_map(|(vol, offset, len)| Op::Read { vol, offset, len }),
        3 => vol.clone().prop_map(|vol| Op::Snapshot { vol }),
        3 => (snap, vol.clone()).prop_map(|(snap, vol)| Op::Clone { snap, vol }),
        2 => (snap, offset(), len()).prop_map(|(snap, offset, len)| Op::ReadSnapshot { snap, offset, len }),
        1 => vol.clone().prop_map(|vol| Op::RemoveVolume { vol }),
        1 => snap.prop_map(|snap| Op::RemoveSnapshot { snap }),
        1 => (snap, 0..HOLDERS).prop_map(|(snap, holder)| Op::Hold { snap, holder }),
        1 => (snap, 0..HOLDERS).prop_map(|(snap, holder)| Op::Release { snap, holder }),
        2 => vol.prop_map(|vol| Op::Stat { vol }),
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

fn data(len: u16, seed: u8) -> Vec<u8> {
    crate::checks::pattern(usize::from(len), seed)
}

fn outcome<T>(r: &Result<T>) -> std::result::Result<(), ErrorKind> {
    r.as_ref().map(|_| ()).map_err(|e| e.kind())
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

    fn snap(&self, i: u8) -> (SnapshotId, SnapshotId) {
        let i = usize::from(i) % (self.snaps.len() + 1);
        match self.snaps.get(i) {
            Some(pair) => pair.clone(),
            None => (
                SnapshotId::new(self.b().info().scheme, "never-minted-0").expect("valid"),
                SnapshotId::new(slacker_backend_mem::SCHEME, "never-minted-0").expect("valid"),
            ),
        }
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

    async fn step(&mut self, op: &Op) -> std::result::Result<(), String> {
        macro_rules! same {
            ($b:expr, $m:expr) => {{
                let (b, m) = ($b, $m);
                if outcome(&b) != outcome(&m) {
                    return Err(format!(
                        "{op:?}: backend {:?} vs model {:?}",
                        b.as_ref().map(|_| ()).map_err(|e| e.to_string()),
                        m.as_ref().map(|_| ()).map_err(|e| e.to_string())
                    ));
                }
                (b, m)
            }};
        }
        match *op {
            Op::Create { vol, blocks, small } => {
                let bs = if small {
                    BlockSize::MIN
                } else {
                    BlockSize::DEFAULT
                };
                let o = VolumeOptions::new(u64::from(blocks) * bs.bytes()).with_block_size(bs);
                let id = volume_name(vol);
                let _ = same!(
                    self.b().create_volume(&id, &o).await,
                    self.model.create_volume(&id, &o)
                );
            }
            Op::Write {
                vol,
                offset,
                len,
                seed,
            } => {
                let id = volume_name(vol);
                let d = data(len, seed);
                let _ = same!(
                    self.b().write_at(&id, u64::from(offset), &d).await,
                    self.model.write_at(&id, u64::from(offset), &d)
                );
            }
            Op::Read { vol, offset, len } => {
                let id = volume_name(vol);
                let (b, m) = same!(
                    self.b()
                        .read_at(&id, u64::from(offset), usize::from(len))
                        .await,
                    self.model.read_at(&id, u64::from(offset), usize::from(len))
                );
                if let (Ok(b), Ok(m)) = (b, m) {
                    if b != m {
                        return Err(format!("{op:?}: data differs from the model"));
                    }
                }
            }
            Op::Snapshot { vol } => {
                let id = volume_name(vol);
                let (b, m) = same!(self.b().snapshot(&id).await, self.model.snapshot(&id));
                if let (Ok(b), Ok(m)) = (b, m) {
                    if self.snaps.iter().any(|(x, _)| *x == b) {
                        return Err(format!("{op:?}: snapshot id {b} minted twice"));
                    }
                    self.snaps.push((b, m));
                }
            }
            Op::Clone { snap, vol } => {
                let (bs, ms) = self.snap(snap);
                let id = volume_name(vol);
                let _ = same!(
                    self.b().clone_snapshot(&bs, &id).await,
                    self.model.clone_snapshot(&ms, &id)
                );
            }
            Op::ReadSnapshot { snap, offset, len } => {
                let (bs, ms) = self.snap(snap);
                let (b, m) = same!(
                    self.b()
                        .read_snapshot_at(&bs, u64::from(offset), usize::from(len))
                        .await,
                    self.model
                        .read_snapshot_at(&ms, u64::from(offset), usize::from(len))
                );
                if let (Ok(b), Ok(m)) = (b, m) {
                    if b != m {
                        return Err(format!("{op:?}: snapshot data differs from the model"));
                    }
                }
            }
            Op::RemoveVolume { vol } => {
                let id = volume_name(vol);
                let _ = same!(
                    self.b().remove_volume(&id).await,
                    self.model.remove_volume(&id)
                );
            }
            Op::RemoveSnapshot { snap } => {
                let (bs, ms) = self.snap(snap);
                let _ = same!(
                    self.b().remove_snapshot(&bs).await,
                    self.model.remove_snapshot(&ms)
                );
            }
            Op::Hold { snap, holder } => {
                let (bs, ms) = self.snap(snap);
                let h = format!("h{holder}");
                let _ = same!(
                    self.b().hold_snapshot(&bs, &h).await,
                    self.model.hold_snapshot(&ms, &h)
                );
            }
            Op::Release { snap, holder } => {
                let (bs, ms) = self.snap(snap);
                let h = format!("h{holder}");
                let _ = same!(
                    self.b().release_snapshot(&bs, &h).await,
                    self.model.release_snapshot(&ms, &h)
                );
            }
            Op::Stat { vol } => {
                let id = volume_name(vol);
                let (b, m) = same!(self.b().stat_volume(&id).await, self.model.stat_volume(&id));
                if let (Ok(b), Ok(m)) = (b, m) {
                    if (b.size, b.block_size) != (m.size, m.block_size)
                        || self.to_model(&b.origin) != m.origin
                    {
                        return Err(format!("{op:?}: stat differs: {b:?} vs {m:?}"));
                    }
                    self.check_invariant(&id).await?;
                }
            }
            Op::Reopen => {
                let b = self.backend.take().expect("backend present");
                self.backend = Some(self.harness.reopen(b).await);
            }
        }
        Ok(())
    }

    async fn check_invariant(&self, id: &VolumeId) -> std::result::Result<(), String> {
        let b = self.b();
        let st = b.stat_volume(id).await.map_err(|e| e.to_string())?;
        let bs = st.block_size.bytes();
        for i in 0..(st.size / bs) as u32 {
            if st.diverged.contains(BlockIndex(i)) {
                continue;
            }
            let off = u64::from(i) * bs;
            let mine = b
                .read_at(id, off, bs as usize)
                .await
                .map_err(|e| e.to_string())?;
            let origin = match &st.origin {
                Some(s) => match b.read_snapshot_at(s, off, bs as usize).await {
                    Ok(d) => d,
                    // The origin was removed: nothing to compare with here; the
                    // content itself is compared with the model in `compare_all`.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.to_string()),
                },
                None => vec![0u8; bs as usize].into(),
            };
            if mine != origin {
                return Err(format!(
                    "bitmap invariant broken: block {i} of {id} is outside the diverged bitmap but differs from its origin"
                ));
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
            let size = self.model.stat_volume(v).map_err(|e| e.to_string())?.size as usize;
            let got = b.read_at(v, 0, size).await.map_err(|e| e.to_string())?;
            if got != self.model.read_at(v, 0, size).map_err(|e| e.to_string())? {
                return Err(format!("content of {v} differs from the model"));
            }
            self.check_invariant(v).await?;
        }
        let live = b.list_snapshots().await.map_err(|e| e.to_string())?;
        for (bs, ms) in &self.snaps {
            let in_model = self.model.stat_snapshot(ms).is_ok();
            if live.contains(bs) != in_model {
                return Err(format!(
                    "snapshot {bs} listed: {}, in model: {in_model}",
                    live.contains(bs)
                ));
            }
            if in_model {
                let size = self
                    .model
                    .stat_snapshot(ms)
                    .map_err(|e| e.to_string())?
                    .size as usize;
                let got = b
                    .read_snapshot_at(bs, 0, size)
                    .await
                    .map_err(|e| e.to_string())?;
                if got
                    != self
                        .model
                        .read_snapshot_at(ms, 0, size)
                        .map_err(|e| e.to_string())?
                {
                    return Err(format!("content of snapshot {bs} differs from the model"));
                }
            }
        }
        Ok(())
    }
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
