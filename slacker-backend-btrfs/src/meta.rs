//! The metadata documents, one per volume and per snapshot, kept in a
//! [`DirStore`](slacker_core::persist::DirStore) under `meta/`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use slacker_core::{BlockBitmap, BlockSize, Result, SnapshotId, VolumeId};

use crate::error::BtrfsError;

/// Version of the documents this build writes and reads.
pub(crate) const FORMAT: u32 = 1;

const VOLUME_PREFIX: &str = "volume.";
const SNAPSHOT_PREFIX: &str = "snapshot.";
const SUFFIX: &str = ".json";

/// `meta/volume.<id>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeDoc {
    pub format: u32,
    pub id: VolumeId,
    pub size: u64,
    pub block_size: BlockSize,
    pub origin: Option<SnapshotId>,
    /// Blocks written through the library (and FIEMAP-derived blocks folded in at
    /// snapshot time), as of the last time the document was written.
    pub diverged: BlockBitmap,
}

/// `meta/snapshot.<key>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotDoc {
    pub format: u32,
    pub id: SnapshotId,
    pub size: u64,
    pub block_size: BlockSize,
    /// The origin of the volume it was taken from.
    pub parent: Option<SnapshotId>,
    /// Blocks that may differ from `parent`.
    pub diverged: BlockBitmap,
    pub holds: BTreeSet<String>,
    /// The volume it was taken from (informational).
    pub source: VolumeId,
}

/// What a document name names.
pub(crate) enum DocName {
    Volume(VolumeId),
    Snapshot(String),
}

/// The document name of volume `id` (never ends in `.tmp`, which `DirStore` reserves).
pub(crate) fn volume_doc(id: &VolumeId) -> String {
    format!("{VOLUME_PREFIX}{id}{SUFFIX}")
}

/// The document name of snapshot key `key`.
pub(crate) fn snapshot_doc(key: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{key}{SUFFIX}")
}

/// Parses a document name; `None` for names this backend did not write.
pub(crate) fn parse_doc_name(name: &str) -> Option<DocName> {
    let stem = name.strip_suffix(SUFFIX)?;
    if let Some(id) = stem.strip_prefix(VOLUME_PREFIX) {
        return VolumeId::new(id).ok().map(DocName::Volume);
    }
    let key = stem.strip_prefix(SNAPSHOT_PREFIX)?;
    SnapshotId::new(crate::SCHEME, key)
        .ok()
        .map(|_| DocName::Snapshot(key.to_owned()))
}

/// Serializes a document.
pub(crate) fn encode<T: Serialize>(doc: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(doc).expect("metadata documents always serialize")
}

/// Parses a document, checking its format version.
pub(crate) fn decode<T: for<'de> Deserialize<'de> + Format>(name: &str, bytes: &[u8]) -> Result<T> {
    let doc: T = serde_json::from_slice(bytes).map_err(|e| BtrfsError::Metadata {
        doc: name.to_owned(),
        reason: e.to_string(),
    })?;
    if doc.format() != FORMAT {
        return Err(BtrfsError::Metadata {
            doc: name.to_owned(),
            reason: format!("format {} is not the supported {FORMAT}", doc.format()),
        }
        .into());
    }
    Ok(doc)
}

/// Documents carry a format version.
pub(crate) trait Format {
    fn format(&self) -> u32;
}

impl Format for VolumeDoc {
    fn format(&self) -> u32 {
        self.format
    }
}

impl Format for SnapshotDoc {
    fn format(&self) -> u32 {
        self.format
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_avoid_tmp() {
        let v = VolumeId::new("x.tmp").unwrap();
        let n = volume_doc(&v);
        assert!(!n.ends_with(".tmp"));
        assert!(matches!(parse_doc_name(&n), Some(DocName::Volume(id)) if id == v));
        assert!(
            matches!(parse_doc_name(&snapshot_doc("s-1")), Some(DocName::Snapshot(k)) if k == "s-1")
        );
        assert!(parse_doc_name("other.json").is_none());
        assert!(parse_doc_name("volume.../x.json").is_none());
    }

    #[test]
    fn documents_round_trip_and_reject_garbage() {
        let mut diverged = BlockBitmap::new();
        diverged.insert_range(slacker_core::BlockRange::new(3, 9));
        let d = VolumeDoc {
            format: FORMAT,
            id: VolumeId::new("v").unwrap(),
            size: 8192,
            block_size: BlockSize::DEFAULT,
            origin: Some(SnapshotId::new("btrfs", "s1").unwrap()),
            diverged,
        };
        let back: VolumeDoc = decode("d", &encode(&d)).unwrap();
        assert_eq!(back, d);
        assert!(decode::<VolumeDoc>("d", b"{").is_err());
        let mut wrong = d.clone();
        wrong.format = 99;
        let e = decode::<VolumeDoc>("d", &encode(&wrong)).unwrap_err();
        assert_eq!(e.kind(), slacker_core::ErrorKind::Integrity);
    }
}
