//! The btrfs backend for slacker: a volume is a sparse file, a snapshot is a read-only
//! reflink of it, a clone is a reflink of the snapshot — O(1) in the data size.
//!
//! ```text
//! <root>/                       (any directory on btrfs; checked with fstatfs at build)
//!   volumes/<volume-id>.img     sparse file, the volume's bytes; `local_path` returns it
//!   snapshots/<key>.img         FICLONE of a volume, mode 0444, never written again
//!   meta/volume.<id>.json       size, block size, origin, diverged bitmap   } DirStore:
//!   meta/snapshot.<key>.json    size, block size, parent, bitmap            } temp, fsync,
//!                                                                             rename, fsync dir
//!   meta/hold.<key>.<holder>.hold   empty: holder holds snapshot key        } created in
//!                                                                             place, fsync dir
//! ```
//!
//! ```no_run
//! # async fn demo() -> slacker_core::Result<()> {
//! use slacker_backend_btrfs::BtrfsBuilder;
//! use slacker_core::{Backend, VolumeId, VolumeOptions};
//!
//! let b = BtrfsBuilder::new("/mnt/btrfs/slacker").build()?; // Config error if not btrfs
//! let v = VolumeId::new("base")?;
//! b.create_volume(&v, &VolumeOptions::new(64 << 20)).await?;
//! b.write_at(&v, 0, b"hello").await?;
//! let s = b.snapshot(&v).await?;                   // fsync + FICLONE
//! b.clone_snapshot(&s, &VolumeId::new("web-1")?).await?; // FICLONE
//! let path = b.local_path(&VolumeId::new("web-1")?).await?; // loop-mount this
//! # Ok(()) }
//! ```
//!
//! # Capabilities
//!
//! `local_path`, `usage`, `dedup` and `cheap_clone`; not `shared` (one host). Snapshot ids
//! are `btrfs:s<unix-ms hex>-<16 hex of blake3(random seed, counter, time)>`: never reused,
//! not even after a reopen or once removed.
//!
//! # Crash safety
//!
//! Metadata goes through [`slacker_core::persist::DirStore`]. Every operation orders its
//! durable steps so that a crash at any point leaves the old or the new state:
//!
//! | operation | order |
//! |---|---|
//! | create, clone | data file (create/`FICLONE`, fsync, fsync dir), then its document |
//! | snapshot | fsync volume, `FICLONE` into the snapshot file (fsync, fsync dir), then its document |
//! | remove volume / snapshot | document first, then the data file |
//! | hold / release | create / remove the hold's marker document, then fsync the directory (a batch of holds: every marker, one fsync) |
//! | flush | fsync the volume, then persist its bitmap if it grew |
//!
//! A data file that no document names is the unfinished half of one of these; [`build`]
//! removes it, and a hold marker of a snapshot without a document too. A document whose
//! data file is missing or has the wrong size is kept (never silently dropped) and its
//! volume or snapshot answers `Integrity` errors until removed. The test `tests/crash.rs`
//! crashes a workload at every sync point (metadata and data steps alike, through
//! [`BtrfsBuilder::crash_plan`]) and checks the reopened state against the mem model,
//! once as a process crash and once as a power cut that loses every metadata change not
//! yet synced (`CrashPlan::power_cut_at`).
//!
//! Snapshot documents are format 2: their holds are the markers. A format 1 document
//! (written before markers) keeps its holds inside and is rewritten to change them; a
//! build that only knows format 1 refuses a format 2 document rather than miss its holds.
//!
//! # The diverged bitmap
//!
//! A runtime loop-mounts the volume file, so writes bypass the library. The bitmap
//! [`stat_volume`](slacker_core::Backend::stat_volume) reports is therefore
//!
//! > (blocks written through `write_at`) ∪ (blocks FIEMAP says may differ from the origin),
//!
//! clipped to the volume. The FIEMAP part compares the extent maps (`FS_IOC_FIEMAP`) of
//! the volume and its origin snapshot: a block is unchanged only where both map it to the
//! **same device address** (so it is the very same, shared, immutable bytes — btrfs never
//! overwrites a shared extent in place) or both have a hole; inline extents (tiny files)
//! are compared byte by byte. Comparing addresses rather than only testing
//! `FIEMAP_EXTENT_SHARED` matters: after a snapshot *of the volume*, blocks the volume
//! rewrote are shared — with that snapshot, not with the origin. Compressed extents are
//! unchanged only if both files map the very same extent. Without an origin, every
//! allocated block counts as diverged. Once the origin snapshot is removed, its clones'
//! derived blocks are first folded into their documents; afterwards only the sharing flag
//! is left to go by (unshared extents count as diverged; a hole punched by an outside
//! writer after that is not detected).
//!
//! Cost: `stat_volume` and `snapshot` call FIEMAP with `FIEMAP_FLAG_SYNC` on the volume
//! and FIEMAP on the origin: O(extents of both) plus writing back the volume's dirty
//! pages. The write-back is required: measured on Linux 6.18, a dirty, not yet written
//! back overwrite of a shared extent is still reported as the old shared extent.
//!
//! `write_at` adds the touched blocks to the in-memory bitmap before it returns (so
//! `stat_volume` sees them at once); the durable record is batched until `flush` (or every
//! write with [`Durability::OnWrite`]). That is safe because a write that reached the disk
//! before a crash is in a new, unshared extent that FIEMAP re-derives on the next stat.
//!
//! # Usage and dedup
//!
//! `Usage` per volume: bytes in extents flagged `FIEMAP_EXTENT_SHARED` vs the rest.
//! [`BtrfsBackend::usage_total`] counts shared extents once across everything.
//! [`dedup`](slacker_core::Backend::dedup) hashes every 4 KiB block of every volume and
//! snapshot file with blake3 and merges repeats with `FIDEDUPERANGE` (the kernel compares
//! the bytes, so a collision cannot corrupt): O(data), meant as offline maintenance; it
//! holds every volume's lock (reads continue, writes wait).
//!
//! # Blocking and concurrency
//!
//! Every syscall runs on `tokio::task::spawn_blocking`; use the backend inside a Tokio
//! runtime. IO on one volume is serialized by that volume's lock (a snapshot waits for
//! in-flight writes); different volumes proceed in parallel. Creates, clones and
//! removals reserve the name in the catalog and do their fsyncs outside the catalog lock,
//! so they never stall IO on other volumes; snapshot removal and `dedup` hold it. [`BtrfsBuilder::build`] itself is blocking. All `unsafe` code (the FIEMAP and
//! FIDEDUPERANGE ioctls) lives in the private `sys` module.
//!
//! [`build`]: BtrfsBuilder::build
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod dedup;
mod error;
mod extents;
mod meta;
mod sys;

pub use backend::{BtrfsBackend, TotalUsage};
pub use config::{BtrfsBuilder, BtrfsConfig, Durability, SCHEME};
