//! The backend's own failures, mapped into [`slacker_core::Error`].

use slacker_core::{Error, ObjectKind};

use crate::config::SCHEME;

/// What went wrong inside the RBD backend. Private: callers see [`slacker_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum RbdError {
    /// A librados or librbd call failed.
    #[error("{op} {what}: {} (errno {errno}, cluster {cluster})", errno_text(*errno))]
    Call {
        op: &'static str,
        what: String,
        errno: i32,
        cluster: String,
    },
    /// A simulated crash (see `RbdBuilder::crash_plan`).
    #[error("{what}: {source}")]
    Crash {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Image metadata slacker wrote is unreadable.
    #[error("image {image}: metadata {key} = {value:?} is not valid")]
    Metadata {
        image: String,
        key: String,
        value: String,
    },
}

impl RbdError {
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub(crate) const ENOENT: i32 = 2;
pub(crate) const EEXIST: i32 = 17;
pub(crate) const EBUSY: i32 = 16;
pub(crate) const ENOTEMPTY: i32 = 39;
pub(crate) const ETIMEDOUT: i32 = 110;
pub(crate) const EPERM: i32 = 1;
pub(crate) const EACCES: i32 = 13;

fn errno_text(e: i32) -> &'static str {
    match e {
        EPERM => "operation not permitted (wrong key or missing capabilities?)",
        ENOENT => "no such object",
        5 => "I/O error",
        EACCES => "permission denied (wrong key or missing capabilities?)",
        EBUSY => "busy (image has watchers or children)",
        EEXIST => "already exists",
        22 => "invalid argument",
        28 => "no space left",
        ENOTEMPTY => "not empty (image has snapshots)",
        108 => "client blocklisted (another writer took the image over)",
        ETIMEDOUT => "timed out",
        _ => "error",
    }
}

impl From<RbdError> for Error {
    fn from(e: RbdError) -> Self {
        Error::backend(SCHEME, e)
    }
}

/// Maps an error of an operation on a named object: `ENOENT` is `NotFound`, `EEXIST`
/// `AlreadyExists`, anything else a `Backend` error.
pub(crate) fn on(kind: ObjectKind, id: &str, e: RbdError) -> Error {
    match e.errno() {
        Some(ENOENT) => Error::not_found(kind, id),
        Some(EEXIST) => Error::already_exists(kind, id),
        _ => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::ErrorKind;

    fn call(errno: i32) -> RbdError {
        RbdError::Call {
            op: "rbd_open",
            what: "v.x".into(),
            errno,
            cluster: "10.0.0.1:3300".into(),
        }
    }

    #[test]
    fn errnos_map_to_kinds() {
        assert_eq!(
            on(ObjectKind::Volume, "x", call(ENOENT)).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            on(ObjectKind::Volume, "x", call(EEXIST)).kind(),
            ErrorKind::AlreadyExists
        );
        let e = on(ObjectKind::Volume, "x", call(ETIMEDOUT));
        assert_eq!(e.kind(), ErrorKind::Backend);
        let s = e.to_string();
        assert!(
            s.contains("rbd_open") && s.contains("10.0.0.1:3300") && s.contains("timed out"),
            "{s}"
        );
    }
}
