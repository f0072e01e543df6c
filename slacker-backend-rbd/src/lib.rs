//! Ceph RBD backend for slacker: volumes are RBD images, snapshots are RBD snapshots and
//! clones are RBD clones (format 2: copy-on-write per object, parents need no protect),
//! shared by every host that reaches the cluster.
//!
//! ```text
//!  worker A ──┐  librbd/librados in process (src/sys, the only unsafe)     Ceph cluster
//!  worker B ──┼──────────────────────────────────────────────────────▶  pool[/namespace]
//!  registry ──┘  create, clone3, snap_create, diff_iterate2, metadata      v.<volume> images
//! ```
//!
//! ```no_run
//! # async fn demo() -> slacker_core::Result<()> {
//! use slacker_backend_rbd::RbdBuilder;
//! use slacker_core::{Backend, VolumeId, VolumeOptions};
//!
//! let rbd = RbdBuilder::new("10.0.0.5:3300")
//!     .keyring("/etc/ceph/ceph.client.admin.keyring")
//!     .namespace("slacker")
//!     .build()
//!     .await?;
//! let v = VolumeId::new("base")?;
//! rbd.create_volume(&v, &VolumeOptions::new(1 << 30)).await?; // thin
//! rbd.write_at(&v, 0, b"layer data").await?;
//! let snap = rbd.snapshot(&v).await?; // "rbd:<image id>.<32 hex digits>", valid on every host
//! rbd.clone_snapshot(&snap, &VolumeId::new("container-1")?).await?; // O(1)
//! # Ok(()) }
//! ```
//!
//! # Mapping
//!
//! | slacker | RBD |
//! |---|---|
//! | volume `x` | image `v.x` in the configured pool and namespace, object size [`RbdConfig::object_size`] (64 KiB) |
//! | block size other than 4 KiB | image metadata `slacker.block_size` (clones inherit it) |
//! | snapshot `rbd:<image id>.<key>` | snapshot `s.<key>` of the image with that id (ids survive renames) |
//! | clone | `rbd_clone3`, clone format 2: the parent needs no protect, and its snapshot can be removed while clones read it (RBD moves it to the trash namespace) |
//! | diverged bitmap | the objects `rbd_diff_iterate2(from = NULL, include_parent = 0, whole_object = 1)` says the image owns (exact per object with fast-diff, sub-millisecond), joined with this process's own writes |
//! | hold | image metadata `slacker.hold.<key>.<holder>`: durable, seen by every host |
//! | removed volume with snapshots | the image is renamed `r.<image id>` and deleted with its last snapshot |
//! | usage | `rbd du`: objects the image owns (exclusive) and those it reads from its parents (shared) |
//!
//! `local_path` and `dedup` are `Unsupported` (there are no krbd or nbd devices here:
//! containers reach a volume through `LazyVolume` + FUSE + loop). Nothing is ever
//! flattened.
//!
//! # Atomicity and many hosts
//!
//! Each step is one RBD call that is atomic on the cluster; steps are ordered so that a
//! crash leaves the state before or after an operation:
//!
//! - create: `rbd_create4` refuses an existing name, so of two hosts creating one volume
//!   exactly one wins. With a non-default block size the image is created with size 0
//!   (invisible: no volume has that size), the block size recorded, then the image grown
//!   to its size. (Not a temporary name and `rbd_rename`: two concurrent renames onto one
//!   name both succeed, measured on 16.2.15.)
//! - clone: `rbd_clone3` (refuses an existing name). The parent's metadata RBD copies
//!   into the clone (holds) is dropped afterwards.
//! - remove volume: without snapshots, `rbd_trash_move` (the linearization point) then
//!   `rbd_trash_remove`; with snapshots, one rename to `r.<image id>`.
//! - remove snapshot: check holds, rename `s.<key>` to `d.<key>` (the linearization
//!   point), check holds again (renaming back if one appeared), remove. A hold sets its
//!   key and then checks that `s.<key>` still exists, waiting while a removal decides: of
//!   a concurrent hold and removal exactly one succeeds.
//! - writes are acknowledged by the OSDs (`rbd_cache = false`), so `flush` loses nothing.
//!
//! Leftovers of interrupted operations are finished by [`RbdBackend::gc`] at build time.
//!
//! A volume is written by one backend at a time (as a block device is mounted by one
//! host). RBD's exclusive lock enforces it: reads and stats use a read-only handle (which
//! never takes the lock), and the first write through a backend breaks the lock of any
//! other owner (`rbd_lock_get_owners` + `rbd_lock_break`, which blocklists
//! that client), so a crashed writer's volume is taken over at once instead of after
//! RBD's 30 s watch timeout. After a snapshot the backend closes the volume's image (and
//! releases its lock), so that other hosts holding or removing the snapshot never wait
//! for a writer that went away.
//!
//! # Failures
//!
//! An unreachable cluster fails `build` with a `Backend` error naming `rados_connect` and
//! the monitors within [`RbdConfig::connect_timeout_ms`]; a refused key or an unknown
//! pool fail with `Config`. An operation waiting for an OSD fails after
//! [`RbdConfig::op_timeout_ms`]; an OSD that restarts within it (SIGKILLed and back in
//! ~7 s) only delays it.
//!
//! All librbd calls block: they run on `tokio::task::spawn_blocking`.
//!
//! # Ceph clients
//!
//! Backends built with the same connection settings share one Ceph client (`rados_t`) per
//! process, which stays connected until the process exits; [`RbdConfig::client_instance`]
//! gives a backend a client of its own (to the cluster, another host). Shutting a client
//! down while librbd still finishes closing an image on its threads let librados free
//! memory in use: processes that built and dropped many backends aborted
//! (`std::system_error: Invalid argument`) or crashed in the next `rbd_open`.
//!
//! # Test cluster
//!
//! `cluster/` holds the scripts the tests and `.ci/test` use: `install.sh` (Debian
//! packages), `start.sh` (1 mon, 1 mgr, 1 bluestore OSD on a sparse file, cephx, ready in
//! 5-9 s), `stop.sh`.
#![warn(missing_docs)]

mod backend;
mod config;
mod error;
mod sys;

pub use backend::{GcReport, RbdBackend};
pub use config::{RbdBuilder, RbdConfig, SCHEME};
