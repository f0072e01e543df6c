//! Identifiers: [`SnapshotId`], [`VolumeId`], and `LayerId` (feature `digest`).
//!
//! All three are validated when parsed, display as the same text they parse from, and
//! serialize (serde) as that text, so they round-trip through JSON, tar layers and
//! registries unchanged.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Longest serialized [`SnapshotId`], in bytes.
pub const MAX_SNAPSHOT_ID_LEN: usize = 128;
/// Longest backend scheme, in bytes.
pub const MAX_SCHEME_LEN: usize = 16;
/// Longest [`VolumeId`], in bytes.
pub const MAX_VOLUME_ID_LEN: usize = 64;

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn validate_scheme(s: &str) -> Result<()> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > MAX_SCHEME_LEN {
        return Err(Error::invalid(format!(
            "scheme must be 1..={MAX_SCHEME_LEN} bytes, got {}",
            b.len()
        )));
    }
    if !b[0].is_ascii_lowercase()
        || !b
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Err(Error::invalid(format!(
            "scheme {s:?} must match [a-z][a-z0-9-]*"
        )));
    }
    Ok(())
}

/// Validates a name used as a file name component: `[A-Za-z0-9][A-Za-z0-9._-]*`.
fn validate_name(what: &str, s: &str, max: usize) -> Result<()> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > max {
        return Err(Error::invalid(format!(
            "{what} must be 1..={max} bytes, got {}",
            b.len()
        )));
    }
    if !b[0].is_ascii_alphanumeric() || !b.iter().all(|&c| is_key_byte(c)) {
        return Err(Error::invalid(format!(
            "{what} {s:?} must match [A-Za-z0-9][A-Za-z0-9._-]*"
        )));
    }
    Ok(())
}

/// The compact, portable name of a snapshot: a backend scheme plus an opaque key,
/// written `scheme:key` (at most [`MAX_SNAPSHOT_ID_LEN`] bytes).
///
/// Any host that shares the backend's storage resolves the same id to the same
/// snapshot; this is what a pushed image carries instead of its data.
///
/// ```
/// use slacker_core::SnapshotId;
/// let id: SnapshotId = "btrfs:s-0f3a".parse().unwrap();
/// assert_eq!(id.scheme(), "btrfs");
/// assert_eq!(id.key(), "s-0f3a");
/// assert_eq!(id.to_string(), "btrfs:s-0f3a");
/// assert!("btrfs:../../etc".parse::<SnapshotId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId {
    text: String,
    colon: usize,
}

impl SnapshotId {
    /// Builds an id from a scheme and a key, validating both.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) if the scheme is not
    /// `[a-z][a-z0-9-]*` (at most 16 bytes), the key is not `[A-Za-z0-9][A-Za-z0-9._-]*`,
    /// or the whole is longer than 128 bytes.
    pub fn new(scheme: &str, key: &str) -> Result<Self> {
        validate_scheme(scheme)?;
        validate_name("snapshot key", key, MAX_SNAPSHOT_ID_LEN)?;
        let text = format!("{scheme}:{key}");
        if text.len() > MAX_SNAPSHOT_ID_LEN {
            return Err(Error::invalid(format!(
                "snapshot id is {} bytes, at most {MAX_SNAPSHOT_ID_LEN} allowed",
                text.len()
            )));
        }
        Ok(Self {
            colon: scheme.len(),
            text,
        })
    }

    /// The backend scheme (`mem`, `btrfs`, `nfs`, ...).
    pub fn scheme(&self) -> &str {
        &self.text[..self.colon]
    }

    /// The backend-specific key.
    pub fn key(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    /// The serialized form, `scheme:key`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for SnapshotId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() > MAX_SNAPSHOT_ID_LEN {
            return Err(Error::invalid(format!(
                "snapshot id is {} bytes, at most {MAX_SNAPSHOT_ID_LEN} allowed",
                s.len()
            )));
        }
        let (scheme, key) = s
            .split_once(':')
            .ok_or_else(|| Error::invalid(format!("snapshot id {s:?} has no scheme: prefix")))?;
        Self::new(scheme, key)
    }
}

/// The name of a writable volume, chosen by the caller: `[A-Za-z0-9][A-Za-z0-9._-]*`,
/// at most 64 bytes (safe as a file name on every backend).
///
/// ```
/// use slacker_core::VolumeId;
/// assert!(VolumeId::new("web-1").is_ok());
/// assert!(VolumeId::new("../x").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(String);

impl VolumeId {
    /// Validates and wraps a volume name.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an empty, too long
    /// or otherwise malformed name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_name("volume id", &name, MAX_VOLUME_ID_LEN)?;
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VolumeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// A layer's id: a blake3 digest (feature `digest`, on by default through `layers`) (32 bytes), written as 64 lowercase hex digits.
#[cfg(feature = "digest")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId([u8; 32]);

#[cfg(feature = "digest")]
impl LayerId {
    /// The id of `content` (its blake3 digest).
    pub fn digest(content: &[u8]) -> Self {
        Self(*blake3::hash(content).as_bytes())
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-digit lowercase hex form.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

#[cfg(feature = "digest")]
impl FromStr for LayerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.strip_prefix("blake3:").unwrap_or(s);
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::invalid(format!(
                "layer id {s:?} must be 64 lowercase hex digits"
            )));
        }
        blake3::Hash::from_hex(s)
            .map(|h| Self(*h.as_bytes()))
            .map_err(|e| Error::invalid(format!("layer id {s:?}: {e}")))
    }
}

macro_rules! text_impls {
    ($t:ty, $name:literal, |$v:ident| $text:expr) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let $v = self;
                f.write_str(&$text)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", $name, self)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

text_impls!(SnapshotId, "SnapshotId", |v| v.text.as_str());
text_impls!(VolumeId, "VolumeId", |v| v.0.as_str());
#[cfg(feature = "digest")]
text_impls!(LayerId, "LayerId", |v| v.to_hex());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn snapshot_id_round_trips_and_rejects_garbage() {
        let id = SnapshotId::new("nfs", "snap-01.abc_DEF").unwrap();
        let text = id.to_string();
        assert_eq!(text.parse::<SnapshotId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), id);
        for bad in [
            "",
            "nfs",
            ":key",
            "nfs:",
            "NFS:key",
            "nfs:../x",
            "nfs:a/b",
            "nfs:.hidden",
            "nfs:a b",
            "averyveryverylongscheme:k",
        ] {
            let err = bad.parse::<SnapshotId>().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        let long = format!("mem:{}", "k".repeat(125));
        assert_eq!(long.len(), 129);
        assert!(long.parse::<SnapshotId>().is_err());
        assert!(long[..128].parse::<SnapshotId>().is_ok());
        assert!(serde_json::from_str::<SnapshotId>("\"x:../y\"").is_err());
    }

    #[test]
    fn volume_ids() {
        assert!(VolumeId::new("a").is_ok());
        assert!(VolumeId::new("").is_err());
        assert!(VolumeId::new("a".repeat(65)).is_err());
    }

    #[cfg(feature = "digest")]
    #[test]
    fn layer_ids() {
        let l = LayerId::digest(b"hello");
        assert_eq!(l.to_hex().parse::<LayerId>().unwrap(), l);
        assert_eq!(format!("blake3:{l}").parse::<LayerId>().unwrap(), l);
        assert!("zz".parse::<LayerId>().is_err());
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<LayerId>(&json).unwrap(), l);
    }
}
