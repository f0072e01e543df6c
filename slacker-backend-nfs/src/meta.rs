//! The metadata documents (JSON, one file each) and the names of files on the export.
//!
//! ```text
//! <export>/<dir>/volumes/<id>.json            VolumeDoc (names the data file)
//!                volumes/<id>.<gen>.img       the volume's data; <gen> = 16 hex digits,
//!                                             new for every create/clone of <id>
//!                snapshots/<key>.json         SnapshotDoc
//!                snapshots/<key>.img          the snapshot's data (never written again)
//!                snapshots/<key>.holds/<h>    one empty file per hold, created GUARDED
//!                tmp/<nonce>.tmp              documents being written
//!                tmp/<key>.removing           a snapshot document during its removal
//!                .clone-probe                 empty file, CLONEd onto itself at build
//! ```

use serde::{Deserialize, Serialize};
use slacker_core::{BlockBitmap, BlockSize, Result, SnapshotId, VolumeId};

use crate::error::NfsError;

/// Version of the documents this build writes and reads.
pub(crate) const FORMAT: u32 = 1;

const DOC: &str = ".json";
const IMG: &str = ".img";
const HOLDS: &str = ".holds";
const REMOVING: &str = ".removing";
const TMP: &str = ".tmp";
/// Hex digits of a volume data file's generation.
pub(crate) const GEN_LEN: usize = 16;
/// Name of the probe file under the base directory.
pub(crate) const PROBE: &str = ".clone-probe";

/// `volumes/<id>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeDoc {
    pub format: u32,
    pub id: VolumeId,
    pub size: u64,
    pub block_size: BlockSize,
    pub origin: Option<SnapshotId>,
    /// The data file's name in `volumes/`.
    pub data: String,
    /// Blocks that may differ from the origin, as far as the last writer of this
    /// document knew.
    pub diverged: BlockBitmap,
    /// Blocks that writes in progress may be changing (a coarse superset, written
    /// *before* the data): a reader of this document must treat them as diverged too.
    /// Empty after a flush or snapshot.
    pub pending: BlockBitmap,
    /// Changes with every write of the document (`<writer nonce>-<counter>`), so that a
    /// backend can tell whether someone else rewrote it.
    pub stamp: String,
}

impl VolumeDoc {
    /// Every block a reader must treat as diverged.
    pub(crate) fn may_differ(&self) -> BlockBitmap {
        self.diverged.union(&self.pending)
    }
}

/// `snapshots/<key>.json`.
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
    /// The volume it was taken from (informational).
    pub source: VolumeId,
}

/// `<id>.json`.
pub(crate) fn volume_doc(id: &VolumeId) -> String {
    format!("{id}{DOC}")
}

/// `<id>.<gen>.img`.
pub(crate) fn volume_data(id: &VolumeId, generation: &str) -> String {
    format!("{id}.{generation}{IMG}")
}

/// `<key>.json`.
pub(crate) fn snapshot_doc(key: &str) -> String {
    format!("{key}{DOC}")
}

/// `<key>.img`.
pub(crate) fn snapshot_data(key: &str) -> String {
    format!("{key}{IMG}")
}

/// `<key>.holds` (a directory in `snapshots/`).
pub(crate) fn holds_dir(key: &str) -> String {
    format!("{key}{HOLDS}")
}

/// `<key>.removing` (in `tmp/`).
pub(crate) fn removing(key: &str) -> String {
    format!("{key}{REMOVING}")
}

/// `<nonce>.tmp` (in `tmp/`).
pub(crate) fn temp(nonce: &str) -> String {
    format!("{nonce}{TMP}")
}

/// What a name in `volumes/` is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum VolumeName {
    Doc(VolumeId),
    Data(VolumeId),
}

/// Parses a name in `volumes/`; `None` for names this backend does not write.
pub(crate) fn parse_volume_name(name: &str) -> Option<VolumeName> {
    if let Some(id) = name.strip_suffix(DOC) {
        return VolumeId::new(id).ok().map(VolumeName::Doc);
    }
    let stem = name.strip_suffix(IMG)?;
    let (id, generation) = stem.rsplit_once('.')?;
    if generation.len() != GEN_LEN || !generation.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    VolumeId::new(id).ok().map(VolumeName::Data)
}

/// What a name in `snapshots/` is (the key must be a valid snapshot key).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SnapshotName {
    Doc(String),
    Data(String),
    Holds(String),
}

/// Parses a name in `snapshots/`; `None` for names this backend does not write.
pub(crate) fn parse_snapshot_name(name: &str) -> Option<SnapshotName> {
    let (key, make): (&str, fn(String) -> SnapshotName) = if let Some(k) = name.strip_suffix(DOC) {
        (k, SnapshotName::Doc)
    } else if let Some(k) = name.strip_suffix(IMG) {
        (k, SnapshotName::Data)
    } else if let Some(k) = name.strip_suffix(HOLDS) {
        (k, SnapshotName::Holds)
    } else {
        return None;
    };
    SnapshotId::new(crate::SCHEME, key)
        .ok()
        .map(|_| make(key.to_owned()))
}

/// The key of a `tmp/<key>.removing` name.
pub(crate) fn parse_removing(name: &str) -> Option<&str> {
    name.strip_suffix(REMOVING)
}

/// Serializes a document.
pub(crate) fn encode<T: Serialize>(doc: &T) -> Vec<u8> {
    serde_json::to_vec(doc).expect("metadata documents always serialize")
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

/// Parses a document, checking its format version.
pub(crate) fn decode<T: for<'de> Deserialize<'de> + Format>(
    server: &str,
    name: &str,
    bytes: &[u8],
) -> Result<T> {
    let doc: T = serde_json::from_slice(bytes).map_err(|e| NfsError::Metadata {
        server: server.to_owned(),
        doc: name.to_owned(),
        reason: e.to_string(),
    })?;
    if doc.format() != FORMAT {
        return Err(NfsError::Metadata {
            server: server.to_owned(),
            doc: name.to_owned(),
            reason: format!("format {} is not the supported {FORMAT}", doc.format()),
        }
        .into());
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::{BlockRange, ErrorKind};

    #[test]
    fn names_round_trip() {
        let v = VolumeId::new("a.json").unwrap();
        assert_eq!(
            parse_volume_name(&volume_doc(&v)),
            Some(VolumeName::Doc(v.clone()))
        );
        let data = volume_data(&v, "0123456789abcdef");
        assert_eq!(parse_volume_name(&data), Some(VolumeName::Data(v)));
        assert_eq!(parse_volume_name("x.123.img"), None);
        assert_eq!(parse_volume_name(".x.json"), None);
        assert_eq!(
            parse_snapshot_name(&snapshot_doc("k1")),
            Some(SnapshotName::Doc("k1".into()))
        );
        assert_eq!(
            parse_snapshot_name(&snapshot_data("k1")),
            Some(SnapshotName::Data("k1".into()))
        );
        assert_eq!(
            parse_snapshot_name(&holds_dir("k1")),
            Some(SnapshotName::Holds("k1".into()))
        );
        assert_eq!(parse_snapshot_name("k1.other"), None);
        assert_eq!(parse_removing(&removing("k1")), Some("k1"));
    }

    #[test]
    fn documents_round_trip_and_reject_garbage() {
        let mut diverged = BlockBitmap::new();
        diverged.insert_range(BlockRange::new(3, 9));
        let d = VolumeDoc {
            format: FORMAT,
            id: VolumeId::new("v").unwrap(),
            size: 8192,
            block_size: BlockSize::DEFAULT,
            origin: Some(SnapshotId::new("nfs", "s1").unwrap()),
            data: "v.0123456789abcdef.img".into(),
            diverged,
            pending: BlockBitmap::new(),
            stamp: "w-1".into(),
        };
        let back: VolumeDoc = decode("srv", "d", &encode(&d)).unwrap();
        assert_eq!(back, d);
        let e = decode::<VolumeDoc>("srv", "d", b"{").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        let mut wrong = d.clone();
        wrong.format = 99;
        let e = decode::<VolumeDoc>("srv", "d", &encode(&wrong)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
    }
}
