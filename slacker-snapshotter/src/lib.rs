//! `slacker-snapshotter`: containerd's snapshots API on slacker volumes, served on a
//! unix socket that containerd reaches as a proxy plugin.
//!
//! ```text
//! containerd ──gRPC (unix socket)──▶ SlackerSnapshotter ──▶ Backend (btrfs, ...)
//!   Prepare(key, parent)  ──▶ clone_snapshot(parent) : O(1)  ──▶ mounts: ext4 on loop
//!   Commit(name, key)     ──▶ snapshot(volume)
//!   ctr pull of a slacker image: the 2 KiB reference layer lands in a staging
//!   directory; Commit records the referenced storage snapshot (no copy, no clone)
//! ```
//!
//! containerd's configuration:
//!
//! ```toml
//! [proxy_plugins.slacker]
//!   type = "snapshot"
//!   address = "/run/slacker/snapshotter.sock"
//! ```
//!
//! then `ctr images pull --snapshotter slacker ...` and `ctr run --snapshotter slacker ...`.
//!
//! **Slacker images with unmodified `ctr`.** Push the reference layer of
//! [`LayerStore::diff`](slacker_core::LayerStore::diff) as an ordinary tar layer
//! (`slacker_oci::PushLayer::tar(diff.tar)`): containerd 1.6's unpacker only unpacks
//! layer media types, so the `application/vnd.slacker.reference.v1.tar` type that
//! `RegistryClient::push_image` uses is skipped by it. `ctr` downloads the 2 KiB layer and
//! unpacks it into the staging directory Prepare handed out; Commit recognises the
//! reference document and records the storage snapshot it names: no copy, no clone. The
//! storage must be the one the image was pushed from (shared, for NFS).
//!
//! **NFS (backends without a local file).** Every active or view volume is opened as a
//! [`LazyVolume`](slacker_core::worker::LazyVolume) over one shared block cache and served
//! by this process through FUSE as `<root>/fuse/<volume>/disk.img` (see [`datapath`]):
//! containerd loop-mounts that file, blocks are fetched from the storage on first read,
//! and `/metrics` counts the bytes fetched and the cache hits.
//!
//! **Remote snapshots (CRI, nerdctl).** A layer's `Prepare` carrying
//! `containerd.io/snapshot.ref`, `containerd.io/snapshot/cri.layer-digest` and
//! `containerd.io/snapshot/cri.image-ref` makes the snapshotter fetch the layer itself
//! ([`remote`]); a reference layer becomes the committed snapshot and the answer is
//! `AlreadyExists`, so containerd skips the download. `[registry] plain_http` lists
//! plain-HTTP registries.
//!
//! **Restarts.** Metadata is durable (see [`service`]); a restarted process serves every
//! snapshot again, and containerd's client reconnects after a short backoff (calls in
//! between fail with `Unavailable`). On btrfs, containers keep running through a restart:
//! their root filesystems are kernel loop mounts of volume files. On NFS (and RBD) they
//! sit on FUSE connections this process serves; a small [`keeper`] process
//! (`slacker-snapshotter --fd-keeper`, started on demand, config `fd_keeper`) holds every
//! connection's `/dev/fuse` file, so a crash or restart (kill -9 included) only pauses
//! the containers' IO: the restarted process resumes each active volume's connection
//! ([`datapath`], "Restarts"). Without a keeper, a container running across a restart
//! sees IO errors until it is restarted; nothing acknowledged is lost either way.
//! The semantics are in [`service`]; the configuration file in [`config`] (an example:
//! `slacker-snapshotter/examples/config.toml`, a systemd unit:
//! `slacker-snapshotter/slacker-snapshotter.service`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod apply;
pub mod config;
pub mod datapath;
pub mod filter;
pub mod harness;
pub mod host;
pub mod keeper;
pub mod metrics;
pub mod remote;
pub mod service;

use std::path::Path;
use std::sync::Arc;

pub use config::{BackendConfig, Config, ConfigError};
pub use containerd_snapshots;
pub use service::SlackerSnapshotter;

use containerd_snapshots::tonic::transport::Server;

/// Serves `snapshotter` on the unix socket at `address` (replacing a stale socket file)
/// until `shutdown` resolves.
///
/// # Errors
/// IO errors binding the socket; transport errors.
pub async fn serve(
    snapshotter: SlackerSnapshotter,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(address)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
