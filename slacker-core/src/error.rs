//! One semantic error type for every backend and the layer store.

use std::fmt;

/// Result alias used throughout slacker.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ObjectKind {
    /// A writable volume.
    Volume,
    /// A read-only snapshot.
    Snapshot,
    /// A layer of the layer store.
    Layer,
    /// Anything else (a file, a blob, a hold).
    Other,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Layer => "layer",
            ObjectKind::Other => "object",
        })
    }
}

/// The error every slacker operation returns.
///
/// Variants are by *meaning*, not by where they came from: a backend maps its own
/// failures into these. Compare them in tests through [`Error::kind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The id is well formed but nothing by that id exists (or it was removed).
    #[error("{kind} not found: {id}")]
    NotFound {
        /// What was looked up.
        kind: ObjectKind,
        /// The id, as displayed.
        id: String,
    },
    /// Something by that id exists already.
    #[error("{kind} already exists: {id}")]
    AlreadyExists {
        /// What was to be created.
        kind: ObjectKind,
        /// The id, as displayed.
        id: String,
    },
    /// The object is still referenced and cannot be removed.
    #[error("{kind} {id} is in use by {by}")]
    InUse {
        /// What was to be removed.
        kind: ObjectKind,
        /// The id, as displayed.
        id: String,
        /// Who still holds it.
        by: String,
    },
    /// A read or write reached past the end of a volume or snapshot.
    #[error("range {offset}+{len} is out of range for size {size}")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the volume or snapshot.
        size: u64,
    },
    /// Stored data or metadata does not match what it should be (digest, magic, checksum).
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// The backend does not implement this operation.
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        /// The operation, as named in [`crate::Backend`].
        operation: &'static str,
        /// The backend's scheme.
        backend: &'static str,
    },
    /// A backend or store was configured wrongly (for example: a path not on btrfs).
    #[error("configuration error: {0}")]
    Config(String),
    /// An argument was malformed (a bad id, a bad size, a hostile layer).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The backend failed for a reason of its own (IO error, server gone, timeout).
    #[error("{backend} backend error: {source}")]
    Backend {
        /// The backend's scheme.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// The kind of an [`Error`], for comparing outcomes in tests and for matching in callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::AlreadyExists`].
    AlreadyExists,
    /// See [`Error::InUse`].
    InUse,
    /// See [`Error::OutOfRange`].
    OutOfRange,
    /// See [`Error::Integrity`].
    Integrity,
    /// See [`Error::Unsupported`].
    Unsupported,
    /// See [`Error::Config`].
    Config,
    /// See [`Error::InvalidInput`].
    InvalidInput,
    /// See [`Error::Backend`].
    Backend,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::InUse { .. } => ErrorKind::InUse,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Integrity(_) => ErrorKind::Integrity,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Config(_) => ErrorKind::Config,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// A not-found error for `kind` and `id`.
    pub fn not_found(kind: ObjectKind, id: impl fmt::Display) -> Self {
        Error::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// An already-exists error for `kind` and `id`.
    pub fn already_exists(kind: ObjectKind, id: impl fmt::Display) -> Self {
        Error::AlreadyExists {
            kind,
            id: id.to_string(),
        }
    }

    /// An invalid-input error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// A backend error wrapping `source`.
    pub fn backend(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Backend {
            backend,
            source: source.into(),
        }
    }
}
