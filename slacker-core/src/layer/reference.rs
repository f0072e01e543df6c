//! The snapshot-reference layer: what a push uploads instead of the layer's data.
//!
//! A reference layer is a deterministic tar (same snapshot → same bytes → same registry
//! digest) with exactly one entry, [`ENTRY_NAME`], holding one small, versioned JSON
//! document:
//!
//! ```json
//! {"version":1,"scheme":"btrfs","snapshot":"btrfs:s-0f3a","size":1073741824,
//!  "block_size":4096,"digest":"blake3:6c1f…"}
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `version` | format version, [`VERSION`] (decoders refuse others) |
//! | `scheme` | the backend scheme; equals the scheme of `snapshot` |
//! | `snapshot` | the [`SnapshotId`] any host sharing the storage resolves |
//! | `size` | logical size in bytes (a positive multiple of `block_size`) |
//! | `block_size` | copy-on-write granularity of the snapshot |
//! | `digest` | `blake3:<64 hex>`: a **metadata digest** of the snapshot, see below |
//! | `merkle` | version 2 only: `{"root":"blake3:<64 hex>","tree":"<snapshot id>"}`, the [Merkle root](crate::merkle) of the snapshot's blocks and the snapshot holding its tree |
//!
//! **Versions.** Version 1 documents (no `merkle`) still decode: their blocks are served
//! unverified, as before. Version 2 documents must carry `merkle`, version 1 ones must not;
//! a worker verifies every block it fetches for a version 2 layer against the root
//! ([`MerkleVerifier`](crate::merkle::MerkleVerifier)). Both stay strict: unknown fields are
//! refused.
//!
//! **The digest is a metadata digest, not a content digest.** It is blake3 over the
//! snapshot's stat ([`metadata_digest`]): id, size, block size, parent and diverged
//! bitmap (as runs), under a domain-separation prefix. Computing it costs O(bitmap runs),
//! so a push stays O(1) in the data size. It catches a reference resolved against the
//! wrong storage (two independent stores minting the same id for different snapshots) or
//! a snapshot that was replaced; it cannot detect bit rot inside the data. When the full
//! content digest is wanted, [`BackendExt::snapshot_digest`](crate::BackendExt::snapshot_digest)
//! reads the whole snapshot (O(size)).
//!
//! The tar is ustar, one regular-file entry, mode `0644`, uid/gid 0, empty user and group
//! names, mtime 0, followed by the two zero blocks that end an archive: 2 KiB in total for a
//! typical document. [`Reference::decode`] is strict: at most [`MAX_LAYER_BYTES`] in
//! total, exactly one entry, with exactly that name, a regular file of at most
//! [`MAX_DOCUMENT_BYTES`], a valid header checksum, only zero blocks after it, and a JSON
//! document without unknown fields. Anything else is
//! [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput); nothing panics.

use serde::{Deserialize, Serialize};

use crate::backend::SnapshotStat;
use crate::block::BlockSize;
use crate::error::{Error, Result};
use crate::ids::SnapshotId;
use crate::merkle::MerkleRoot;

/// The OCI layer media type of a reference layer.
pub const MEDIA_TYPE: &str = "application/vnd.slacker.reference.v1.tar";
/// The one entry of a reference layer.
pub const ENTRY_NAME: &str = "slacker/reference.json";
/// The document version this crate writes when the reference carries a Merkle root.
pub const VERSION: u32 = 2;
/// The document version without a Merkle root (still written by [`Reference::from_stat`]
/// and read).
pub const VERSION_NO_MERKLE: u32 = 1;
/// Largest reference layer [`Reference::decode`] accepts, in bytes.
pub const MAX_LAYER_BYTES: usize = 64 * 1024;
/// Largest JSON document [`Reference::decode`] accepts, in bytes.
pub const MAX_DOCUMENT_BYTES: u64 = 16 * 1024;

const BLOCK: usize = 512;
const DIGEST_PREFIX: &str = "blake3:";
const DOMAIN: &[u8] = b"slacker.snapshot-metadata.v1\0";

/// The JSON document of a reference layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Reference {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Backend scheme; equals `snapshot.scheme()`.
    pub scheme: String,
    /// The snapshot the layer stands for.
    pub snapshot: SnapshotId,
    /// Logical size of the snapshot in bytes.
    pub size: u64,
    /// Copy-on-write granularity of the snapshot.
    pub block_size: BlockSize,
    /// `blake3:<hex>` metadata digest of the snapshot ([`metadata_digest`]).
    pub digest: String,
    /// The Merkle root of the snapshot's blocks and its tree (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merkle: Option<MerkleRoot>,
}

/// The metadata digest of a snapshot: blake3 over a domain prefix, the id, size, block
/// size, parent and the diverged bitmap's runs. O(runs), independent of the data size;
/// holds and usage are not included (they change while the snapshot does not).
pub fn metadata_digest(stat: &SnapshotStat) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    let id = stat.id.as_str().as_bytes();
    h.update(&(id.len() as u64).to_le_bytes());
    h.update(id);
    h.update(&stat.size.to_le_bytes());
    h.update(&stat.block_size.get().to_le_bytes());
    match &stat.parent {
        Some(p) => {
            h.update(&[1]);
            h.update(&(p.as_str().len() as u64).to_le_bytes());
            h.update(p.as_str().as_bytes());
        }
        None => {
            h.update(&[0]);
        }
    }
    let runs: Vec<_> = stat.diverged.runs().collect();
    h.update(&(runs.len() as u64).to_le_bytes());
    for r in runs {
        h.update(&r.start.to_le_bytes());
        h.update(&r.end.to_le_bytes());
    }
    h.finalize()
}

impl Reference {
    /// The reference to a snapshot, from its stat (version 1: no Merkle root; see
    /// [`with_merkle`](Self::with_merkle)).
    pub fn from_stat(stat: &SnapshotStat) -> Self {
        Self {
            version: VERSION_NO_MERKLE,
            scheme: stat.id.scheme().to_owned(),
            snapshot: stat.id.clone(),
            size: stat.size,
            block_size: stat.block_size,
            digest: format!("{DIGEST_PREFIX}{}", metadata_digest(stat).to_hex()),
            merkle: None,
        }
    }

    /// The same reference carrying a Merkle root (version 2).
    pub fn with_merkle(mut self, merkle: MerkleRoot) -> Self {
        self.version = VERSION;
        self.merkle = Some(merkle);
        self
    }

    /// Checks the document on its own: version, scheme, size, digest syntax.
    ///
    /// # Errors
    /// `InvalidInput` naming the first problem.
    pub fn validate(&self) -> Result<()> {
        match (self.version, &self.merkle) {
            (VERSION_NO_MERKLE, None) => {}
            (VERSION, Some(m)) => {
                m.hash()?;
                if m.tree.scheme() != self.snapshot.scheme() {
                    return Err(Error::invalid(format!(
                        "reference Merkle tree {} is not on the snapshot's storage ({})",
                        m.tree, self.scheme
                    )));
                }
            }
            (VERSION_NO_MERKLE | VERSION, _) => {
                return Err(Error::invalid(format!(
                    "reference layer version {} {} a merkle field",
                    self.version,
                    if self.merkle.is_some() {
                        "must not carry"
                    } else {
                        "must carry"
                    }
                )));
            }
            (v, _) => {
                return Err(Error::invalid(format!(
                    "reference layer version {v} is not supported (only {VERSION_NO_MERKLE} and {VERSION})"
                )));
            }
        }
        if self.scheme != self.snapshot.scheme() {
            return Err(Error::invalid(format!(
                "reference scheme {:?} does not match snapshot {}",
                self.scheme, self.snapshot
            )));
        }
        if self.size == 0 || self.size % self.block_size.bytes() != 0 {
            return Err(Error::invalid(format!(
                "reference size {} is not a positive multiple of the block size {}",
                self.size, self.block_size
            )));
        }
        let hex = self
            .digest
            .strip_prefix(DIGEST_PREFIX)
            .ok_or_else(|| Error::invalid("reference digest must start with blake3:"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::invalid(
                "reference digest must be blake3: and 64 lowercase hex digits",
            ));
        }
        Ok(())
    }

    /// Checks that `stat` (of the snapshot as this host resolves it) is the snapshot the
    /// reference was made from.
    ///
    /// # Errors
    /// `Integrity` when the id, size, block size or metadata digest differ.
    pub fn verify(&self, stat: &SnapshotStat) -> Result<()> {
        let want = Self::from_stat(stat);
        if want.snapshot != self.snapshot
            || want.size != self.size
            || want.block_size != self.block_size
            || want.digest != self.digest
        {
            return Err(Error::Integrity(format!(
                "snapshot {} does not match the reference layer (size {} vs {}, digest {} vs {})",
                self.snapshot, stat.size, self.size, want.digest, self.digest
            )));
        }
        Ok(())
    }

    /// The JSON document (compact, fields in declaration order: deterministic).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reference always serializes")
    }

    /// The deterministic reference-layer tar.
    pub fn encode(&self) -> Vec<u8> {
        let doc = self.to_json();
        let mut header = tar::Header::new_ustar();
        header
            .set_path(ENTRY_NAME)
            .expect("the entry name fits a ustar header");
        header.set_size(doc.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header
            .set_username("")
            .expect("empty user name fits a ustar header");
        header
            .set_groupname("")
            .expect("empty group name fits a ustar header");
        header.set_cksum();
        let padded = doc.len().div_ceil(BLOCK) * BLOCK;
        let mut out = Vec::with_capacity(BLOCK + padded + 2 * BLOCK);
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&doc);
        out.resize(BLOCK + padded + 2 * BLOCK, 0);
        out
    }

    /// Parses a reference layer strictly (see the [module docs](self)).
    ///
    /// # Errors
    /// `InvalidInput` for anything but one well-formed entry named [`ENTRY_NAME`] holding a
    /// valid document.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::invalid(format!("reference layer: {m}"));
        if bytes.len() > MAX_LAYER_BYTES {
            return Err(bad(format!(
                "{} bytes, at most {MAX_LAYER_BYTES} allowed",
                bytes.len()
            )));
        }
        if bytes.len() % BLOCK != 0 || bytes.len() < 3 * BLOCK {
            return Err(bad(format!(
                "{} bytes is not a whole tar of at least three 512-byte blocks",
                bytes.len()
            )));
        }
        let h = &bytes[..BLOCK];
        check_header_checksum(h).map_err(bad)?;
        if &h[257..263] != b"ustar\0" || &h[263..265] != b"00" {
            return Err(bad("not a ustar header".into()));
        }
        if h[156] != b'0' {
            return Err(bad(format!(
                "entry type {:?} is not a regular file",
                h[156] as char
            )));
        }
        if !field_is(&h[0..100], ENTRY_NAME.as_bytes()) {
            return Err(bad(format!("the only entry must be named {ENTRY_NAME}")));
        }
        if !field_is(&h[345..500], b"") || !field_is(&h[157..257], b"") {
            return Err(bad("prefix and link name must be empty".into()));
        }
        let size = parse_octal(&h[124..136]).map_err(bad)?;
        if size == 0 || size > MAX_DOCUMENT_BYTES {
            return Err(bad(format!(
                "document of {size} bytes, 1..={MAX_DOCUMENT_BYTES} allowed"
            )));
        }
        let size = size as usize; // at most 16 KiB
        let padded = size.div_ceil(BLOCK) * BLOCK;
        if BLOCK + padded + 2 * BLOCK > bytes.len() {
            return Err(bad(
                "truncated: the document or the end-of-archive blocks are missing".into(),
            ));
        }
        let doc = &bytes[BLOCK..BLOCK + size];
        if bytes[BLOCK + size..].iter().any(|&b| b != 0) {
            return Err(bad(
                "bytes after the document must be padding and end-of-archive zero blocks (one entry only)"
                    .into(),
            ));
        }
        let reference: Reference = serde_json::from_slice(doc)
            .map_err(|e| bad(format!("document is not a valid reference: {e}")))?;
        reference.validate()?;
        Ok(reference)
    }

    /// Whether `prefix` (the first bytes of an uncompressed layer, at least one 512-byte
    /// block) starts like a reference layer: a valid ustar header of a file named
    /// [`ENTRY_NAME`]. A layer that looks like one must then [`decode`](Self::decode).
    pub fn looks_like(prefix: &[u8]) -> bool {
        prefix.len() >= BLOCK
            && check_header_checksum(&prefix[..BLOCK]).is_ok()
            && field_is(&prefix[0..100], ENTRY_NAME.as_bytes())
    }
}

/// Whether a NUL-padded header field holds exactly `want`.
fn field_is(field: &[u8], want: &[u8]) -> bool {
    field.len() >= want.len()
        && &field[..want.len()] == want
        && field[want.len()..].iter().all(|&b| b == 0)
}

fn check_header_checksum(h: &[u8]) -> std::result::Result<(), String> {
    let stored = parse_octal(&h[148..156])?;
    let sum: u64 = h[..148]
        .iter()
        .chain(&h[156..BLOCK])
        .map(|&b| u64::from(b))
        .sum::<u64>()
        + 8 * u64::from(b' ');
    if sum != stored {
        return Err(format!("header checksum {stored} does not match {sum}"));
    }
    Ok(())
}

/// Parses a NUL/space-terminated octal header field (no base-256 extension).
fn parse_octal(field: &[u8]) -> std::result::Result<u64, String> {
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() || text.len() > 12 || !text.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(format!("bad octal field {field:?}"));
    }
    let mut v = 0u64;
    for b in text {
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| "octal field overflows".to_string())?;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::bitmap::BlockBitmap;
    use crate::block::BlockRange;

    fn stat() -> SnapshotStat {
        let mut d = BlockBitmap::new();
        d.insert_range(BlockRange::new(0, 10));
        SnapshotStat::new(
            "mem:s-7".parse().unwrap(),
            1 << 20,
            BlockSize::DEFAULT,
            None,
            d,
            vec![],
        )
    }

    #[test]
    fn encode_is_deterministic_and_round_trips() {
        let r = Reference::from_stat(&stat());
        let a = r.encode();
        assert_eq!(a, Reference::from_stat(&stat()).encode());
        assert_eq!(a.len(), 2048);
        assert_eq!(Reference::decode(&a).unwrap(), r);
        assert!(Reference::looks_like(&a));
        r.verify(&stat()).unwrap();
        // The tar crate reads it as one regular file with fixed metadata.
        let mut ar = tar::Archive::new(&a[..]);
        let entries: Vec<_> = ar.entries().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(entries.len(), 1);
        let h = entries[0].header();
        assert_eq!(&*entries[0].path_bytes(), ENTRY_NAME.as_bytes());
        assert_eq!(
            (h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
            (0o644, 0, 0)
        );
        assert_eq!(h.mtime().unwrap(), 0);
    }

    #[test]
    fn digest_changes_with_metadata() {
        let a = stat();
        let mut b = stat();
        b.diverged.insert(crate::BlockIndex(99));
        assert_ne!(metadata_digest(&a), metadata_digest(&b));
        let err = Reference::from_stat(&a).verify(&b).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity);
        let mut c = stat();
        c.holds.push("x".into());
        assert_eq!(metadata_digest(&a), metadata_digest(&c));
    }

    #[test]
    fn version_2_carries_a_merkle_root_and_version_1_still_decodes() {
        let m = MerkleRoot::new(blake3::hash(b"root"), "mem:s-8".parse().unwrap());
        let r = Reference::from_stat(&stat()).with_merkle(m.clone());
        let tar = r.encode();
        let back = Reference::decode(&tar).unwrap();
        assert_eq!(back.version, VERSION);
        assert_eq!(back.merkle, Some(m));
        back.verify(&stat()).unwrap();
        // A document written before Merkle roots existed (a literal, as old pushes wrote it).
        let old = Reference::from_stat(&stat());
        let json = format!(
            r#"{{"version":1,"scheme":"mem","snapshot":"mem:s-7","size":1048576,"block_size":4096,"digest":"{}"}}"#,
            old.digest
        );
        assert_eq!(old.to_json(), json.as_bytes());
        let decoded = Reference::decode(&old.encode()).unwrap();
        assert_eq!(decoded.merkle, None);
        // Unknown fields in the new object are refused (strict).
        let text = String::from_utf8(r.to_json())
            .unwrap()
            .replace(r#""tree":"mem:s-8""#, r#""tree":"mem:s-8","extra":1"#);
        let err = serde_json::from_str::<Reference>(&text).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }

    #[test]
    fn documents_are_validated() {
        let good = Reference::from_stat(&stat());
        let mut v2 = good.clone();
        v2.version = 2; // version 2 without a merkle field
        let mut v3 = good.clone();
        v3.version = 3;
        let mut v1_with_root = good.clone();
        v1_with_root.merkle = Some(MerkleRoot::new(
            blake3::hash(b"x"),
            "mem:s-8".parse().unwrap(),
        ));
        let mut foreign_tree = good.clone().with_merkle(MerkleRoot::new(
            blake3::hash(b"x"),
            "btrfs:s-8".parse().unwrap(),
        ));
        foreign_tree.version = VERSION;
        let mut bad_root = good.clone().with_merkle(MerkleRoot::new(
            blake3::hash(b"x"),
            "mem:s-8".parse().unwrap(),
        ));
        bad_root.merkle.as_mut().unwrap().root = "blake3:XYZ".into();
        let mut scheme = good.clone();
        scheme.scheme = "btrfs".into();
        let mut size = good.clone();
        size.size = 4097;
        let mut digest = good.clone();
        digest.digest = "sha256:00".into();
        for r in [
            v2,
            v3,
            v1_with_root,
            foreign_tree,
            bad_root,
            scheme,
            size,
            digest,
        ] {
            let err = Reference::decode(&r.encode()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{r:?}");
        }
    }
}
