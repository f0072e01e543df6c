//! NFSv4.2 backend for slacker: volumes and snapshots are files on an NFS export that
//! every worker (and the registry) mounts; snapshot and clone are one server-side CLONE
//! each, so they cost the same for 64 MiB and 64 GiB.
//!
//! ```text
//!  worker A ──┐  NFSv4.2 session (`slacker-nfs-client`)            knfsd on btrfs/xfs
//!  worker B ──┼──────────────────────────────────────────────▶  <export>/<dir>/
//!  registry ──┘  CLONE / COPY / SEEK / DEALLOCATE / LINK / RENAME    volumes/ snapshots/ tmp/
//! ```
//!
//! ```no_run
//! # async fn demo() -> slacker_core::Result<()> {
//! use slacker_backend_nfs::NfsBuilder;
//! use slacker_core::{Backend, VolumeId, VolumeOptions};
//!
//! let nfs = NfsBuilder::new("10.0.0.5:2049").dir("slacker").build().await?;
//! let v = VolumeId::new("base")?;
//! nfs.create_volume(&v, &VolumeOptions::new(1 << 30)).await?; // sparse
//! nfs.write_at(&v, 0, b"layer data").await?;
//! let snap = nfs.snapshot(&v).await?; // "nfs:<32 hex digits>", valid on every worker
//! nfs.clone_snapshot(&snap, &VolumeId::new("container-1")?).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! Under `<export>/<dir>` ([`NfsConfig`]):
//!
//! | name | what |
//! |---|---|
//! | `volumes/<id>.json` | the volume's metadata: size, block size, origin, diverged bitmap, data file name |
//! | `volumes/<id>.<gen>.img` | its data, a sparse file; `<gen>` is new for every create or clone of `<id>` |
//! | `snapshots/<key>.json` | the snapshot's metadata: size, block size, parent, diverged bitmap |
//! | `snapshots/<key>.img` | its data (never written after the snapshot) |
//! | `snapshots/<key>.holds/<holder>` | one empty file per hold |
//! | `tmp/` | metadata documents being written; `<key>.removing` during a snapshot removal |
//!
//! Snapshot keys are 128 random bits (blake3 of time, pid, host, a per-process random
//! seed and a counter), so ids minted by different workers never collide and are never
//! reused. Volume data files carry a generation so that a name removed and re-created
//! (perhaps by another worker) never reaches the old file.
//!
//! # Crash safety
//!
//! Every step that changes the server is one COMPOUND, atomic and durable there before
//! the call returns: data is written `FILE_SYNC` (or `UNSTABLE` and committed, checking
//! the write verifier), metadata documents are written whole into a temporary file and
//! then renamed (or linked) over their name, and every step that makes a name appear
//! ends with a COMMIT (an fsync on the server) of the file it names. That last part is
//! not optional: knfsd makes namespace changes durable through the file system's
//! `commit_metadata`, which btrfs lacks, so on a btrfs export a LINK or RENAME would
//! otherwise reach the disk only with the next transaction commit, up to 30 s later
//! (`tests/restart.rs` loses acknowledged clones, holds and removals without it). For
//! the same reason a name that must stay gone is renamed into `tmp/` and committed, and
//! only then removed. Steps are ordered so that a crash of the worker or a power cut of
//! the server leaves the old or the new state, never a half-written object that looks
//! complete:
//!
//! - create, clone, snapshot: the data file first (created, then sized, cloned or copied),
//!   then its document. A data file without a document is invisible (listings go by
//!   documents) and is collected later. A new volume's document is published with LINK,
//!   which fails if the name exists: of two workers creating one name, exactly one wins.
//! - removals: the document first (renamed into `tmp/`, the linearization point), then
//!   the data.
//! - writes: before a write touches blocks the volume's document does not cover yet,
//!   the document is rewritten with those blocks (rounded out to 4 MiB) marked
//!   *pending*; the exact bitmap, with nothing pending, is written on `flush` and
//!   `snapshot`. So after any crash the bitmap on the server is a superset of the blocks
//!   that really differ (the invariant holds), at the price of one metadata rewrite per
//!   4 MiB region first written after each flush. Writes through this library are the
//!   only writers the bitmap knows about: do not write to the `.img` files directly.
//!
//! Leftovers of interrupted operations (data files no document names, temporary files,
//! half-done snapshot removals) are collected by [`NfsBackend::gc`], which runs at build
//! time for leftovers older than [`NfsConfig::gc_grace_secs`] by the server's clock
//! (younger ones may belong to another worker's operation in progress).
//! `tests/crash.rs` crashes a workload at each of its steps in turn
//! ([`NfsBuilder::crash_plan`]) and compares the reopened state with the mem model;
//! `tests/restart.rs` cuts the server's power in the middle of a busy worker.
//!
//! # Many workers
//!
//! Backends on different hosts (each with its own session) share one directory:
//!
//! - a snapshot id minted by one resolves on every other; any number of workers may
//!   clone one snapshot at the same time;
//! - holds are files created GUARDED, atomic across clients. `remove_snapshot` checks for
//!   holds, renames the document away, and checks again; `hold_snapshot` creates its file
//!   and then checks that the document is still there (waiting while a removal decides).
//!   Of a concurrent hold and removal exactly one succeeds;
//! - a removed snapshot or volume fails with `NotFound` on every worker at once: each
//!   read or write LOOKUPs the file by name in the same COMPOUND, so no stale handle
//!   reaches a removed file.
//!
//! A volume is written through one backend at a time (as a block device is mounted by
//! one host). Handing it over works: each backend merges the bitmap it finds on the
//! server into the one it writes, and `stat_volume` reads the server's. Two backends
//! writing one volume at the same time, or removing a volume that another one is
//! writing, are not supported (a bitmap update can be lost, a removed volume's document
//! can be written again).
//!
//! # Failures
//!
//! An unreachable server fails `build` with a `Backend` error naming the operation and
//! the server within [`NfsConfig::connect_timeout_ms`]. When the connection breaks, each
//! call retries to connect for [`NfsConfig::reconnect_timeout_ms`] and then fails the
//! same way; once the server is back, the client re-creates its session by itself (data
//! is read and written with the anonymous stateid: there is no open state to recover).
//! `tests/restart.rs` cuts the power of the server in the middle of a clone loop and
//! checks both.
//!
//! # Capabilities
//!
//! | capability | |
//! |---|---|
//! | `cheap_clone` | true when the server can CLONE (btrfs, xfs); [`CloneMode::Auto`] probes at build and falls back to COPY |
//! | `shared` | true |
//! | `usage` | false: NFS reports allocated bytes per file, not which are shared |
//! | `local_path`, `dedup` | false (`Unsupported`) |
//!
//! The server must speak NFSv4.2 (CLONE, COPY, SEEK, DEALLOCATE) and export with `sync`.
//! `server/` holds scripts that run knfsd on btrfs in a small VM for the tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod error;
mod meta;
mod remote;

/// The NFSv4.1/4.2 client this backend runs on (the [`slacker_nfs_client`] crate).
pub use slacker_nfs_client as client;

pub use backend::{GcReport, NfsBackend};
pub use config::{CloneMode, NfsBuilder, NfsConfig, SCHEME};
