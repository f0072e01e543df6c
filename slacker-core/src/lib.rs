// The README (the crate's own, packaged with it) is the crate documentation; its
// examples use the layer store, so without `layers` a short summary stands in.
#![cfg_attr(feature = "layers", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "layers"),
    doc = "Lazy container images after the Slacker paper (FAST'16): ids, blocks, \
           [`BlockBitmap`], the [`Backend`] trait and its contract, [`Error`] and the \
           [`persist`] seam. The layer store (`layers`) and the worker data path \
           (`worker`) are default features; see the crate README."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bitmap;
pub mod block;
pub mod error;
pub mod ids;
#[cfg(feature = "layers")]
pub mod layer;
#[cfg(any(feature = "layers", feature = "worker"))]
pub mod merkle;
pub mod persist;
#[cfg(feature = "worker")]
pub mod worker;

pub use backend::{
    Backend, BackendExt, BackendInfo, Capabilities, DedupReport, SnapshotStat, Usage,
    VolumeOptions, VolumeStat,
};
pub use bitmap::BlockBitmap;
pub use block::{BlockIndex, BlockRange, BlockSize};
pub use error::{Error, ErrorKind, ObjectKind, Result};
#[cfg(feature = "digest")]
pub use ids::LayerId;
pub use ids::{SnapshotId, VolumeId};
#[cfg(feature = "layers")]
pub use layer::{
    AppliedLayer, ApplyMethod, ApplyMode, LayerDiff, LayerInfo, LayerKind, LayerStore,
    LayerStoreOptions, Loss, Reference,
};
#[cfg(feature = "worker")]
pub use worker::{BlockCache, LazyVolume, LazyVolumeOptions, Metrics};
