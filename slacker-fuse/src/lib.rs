//! Mount and run a slacker volume: a [`LazyVolume`](slacker_core::worker::LazyVolume)
//! exposed as one file, `disk.img`, through FUSE, so the ext4 inside can be loop-mounted
//! and a container process started in it with `chroot`.
//!
//! ```text
//!  chroot <root> /bin/sh            process
//!        │ files
//!  ext4 on <root>                   mount -t ext4 /dev/loopN <root>
//!        │ blocks
//!  /dev/loopN                       losetup -f --show --direct-io=on <fuse>/disk.img
//!        │ reads/writes (up to 1 MiB)
//!  FuseSession: <fuse>/disk.img     fuser, async direct IO; reads as tasks, writes block_on
//!        │
//!  LazyVolume + shared BlockCache   slacker_core::worker
//!        │
//!  Backend (mem, nfs, ...)
//! ```
//!
//! A btrfs volume skips FUSE: its file ([`Backend::local_path`](slacker_core::Backend::local_path))
//! is loop-mounted directly ([`Mount::local_file`], chosen by [`Mount::for_volume`]).
//!
//! - [`FuseSession`]: serves `disk.img`; its docs say what happens when the serving
//!   process dies (acknowledged writes are already in the backend).
//! - [`FuseSession::keep_fd`] / [`FuseSession::resume`]: keep the connection across the
//!   death of the serving process (a descriptor of its `/dev/fuse` file held by another
//!   process) and serve it again without `INIT`; see `docs/fuse-handover.md`.
//! - [`Mount`]: the guard for FUSE + loop + ext4 with ordered teardown (unmount ext4,
//!   detach the loop device, stop FUSE), also on drop and on failed setup.
//! - [`mount_and_run`]: mount, run one command, tear down.
//! - [`LoopDevice`]: a loop device attached from this process (`LOOP_CONFIGURE`, direct IO
//!   by default), without `losetup`.
//!
//! Everything needs root (`mount(2)` on `/dev/fuse`, `losetup`, `mount`); no
//! `fusermount` is needed.
#![warn(missing_docs)]

mod fs;
mod loopdev;
mod mount;
mod resume;
mod session;
mod sys;

pub use fs::IMAGE_NAME;
pub use loopdev::{LoopDevice, LoopOptions};
pub use mount::{Mount, MountOptions, mount_and_run};
pub use resume::Negotiated;
pub use session::{FuseOptions, FuseSession, FuseStats};
