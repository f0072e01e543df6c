//! The metadata documents, one per volume and per snapshot, and one empty marker per hold,
//! kept in a [`DirStore`](slacker_core::persist::DirStore) under `meta/`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use slacker_core::{BlockBitmap, BlockSize, Result, SnapshotId, VolumeId};

use crate::error::BtrfsError;

/// Version of the volume documents this build writes and reads, and of snapshot documents
/// that keep their holds inside (written before hold markers; still read and updated).
pub(crate) const FORMAT: u32 = 1;
/// Version of the snapshot documents this build writes: holds are not in the document
/// but one empty marker document each ([`hold_doc`]), placed with a single directory
/// sync. A build that knows only format 1 refuses such a document instead of overlooking
/// the holds.
pub(crate) const SNAPSHOT_FORMAT: u32 = 2;

const VOLUME_PREFIX: &str = "volume.";
const SNAPSHOT_PREFIX: &str = "snapshot.";
const SUFFIX: &str = ".json";
const HOLD_PREFIX: &str = "hold.";
const HOLD_SUFFIX: &str = ".hold";

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
    /// Format 1: the holds. Format 2: always empty in the file (the holds are markers);
    /// in memory, every hold.
    pub holds: BTreeSet<String>,
    /// The volume it was taken from (informational).
    pub source: VolumeId,
}

/// What a document name names.
pub(crate) enum DocName {
    Volume(VolumeId),
    Snapshot(String),
    /// A hold marker: snapshot key, holder.
    Hold(String, String),
}

/// The document name of volume `id` (never ends in `.tmp`, which `DirStore` reserves).
pub(crate) fn volume_doc(id: &VolumeId) -> String {
    format!("{VOLUME_PREFIX}{id}{SUFFIX}")
}

/// The document name of snapshot key `key`.
pub(crate) fn snapshot_doc(key: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{key}{SUFFIX}")
}

/// The marker document of `holder`'s hold on snapshot key `key`, or `None` for a key
/// with a `.` (the name could not be split back; this backend mints none, see
/// `mint_key`): such a snapshot keeps its holds in its document.
pub(crate) fn hold_doc(key: &str, holder: &str) -> Option<String> {
    (!key.contains('.')).then(|| format!("{HOLD_PREFIX}{key}.{holder}{HOLD_SUFFIX}"))
}

/// Parses a document name; `None` for names this backend did not write.
pub(crate) fn parse_doc_name(name: &str) -> Option<DocName> {
    if let Some(rest) = name
        .strip_prefix(HOLD_PREFIX)
        .and_then(|n| n.strip_suffix(HOLD_SUFFIX))
    {
        let (key, holder) = rest.split_once('.')?;
        SnapshotId::new(crate::SCHEME, key).ok()?;
        slacker_core::backend::validate_holder(holder).ok()?;
        return Some(DocName::Hold(key.to_owned(), holder.to_owned()));
    }
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
    if !T::SUPPORTED.contains(&doc.format()) {
        return Err(BtrfsError::Metadata {
            doc: name.to_owned(),
            reason: format!(
                "format {} is not one of the supported {:?}",
                doc.format(),
                T::SUPPORTED
            ),
        }
        .into());
    }
    Ok(doc)
}

/// Documents carry a format version.
pub(crate) trait Format {
    /// The versions this build reads.
    const SUPPORTED: &'static [u32];
    fn format(&self) -> u32;
}

impl Format for VolumeDoc {
    const SUPPORTED: &'static [u32] = &[FORMAT];
    fn format(&self) -> u32 {
        self.format
    }
}

impl Format for SnapshotDoc {
    const SUPPORTED: &'static [u32] = &[FORMAT, SNAPSHOT_FORMAT];
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
        let h = hold_doc("s1-ab", "worker.layer.x").unwrap();
        assert!(!h.ends_with(".tmp"));
        assert!(
            matches!(parse_doc_name(&h), Some(DocName::Hold(k, who)) if k == "s1-ab" && who == "worker.layer.x")
        );
        assert!(hold_doc("s.1", "h").is_none());
        assert!(parse_doc_name("hold.s1.hold").is_none(), "no holder");
        assert!(parse_doc_name("hold.s1..x.hold").is_none(), "bad holder");
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
