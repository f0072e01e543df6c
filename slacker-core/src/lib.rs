#![doc = include_str!("../../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bitmap;
pub mod block;
pub mod error;
pub mod ids;
pub mod layer;
pub mod persist;
pub mod worker;

pub use backend::{
    Backend, BackendExt, BackendInfo, Capabilities, DedupReport, SnapshotStat, Usage,
    VolumeOptions, VolumeStat,
};
pub use bitmap::BlockBitmap;
pub use block::{BlockIndex, BlockRange, BlockSize};
pub use error::{Error, ErrorKind, ObjectKind, Result};
pub use ids::{LayerId, SnapshotId, VolumeId};
pub use layer::{
    AppliedLayer, ApplyMethod, ApplyMode, LayerDiff, LayerInfo, LayerKind, LayerStore,
    LayerStoreOptions, Loss, Reference,
};
pub use worker::{BlockCache, LazyVolume, LazyVolumeOptions, Metrics};
