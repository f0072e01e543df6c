//! The backend's own failures, mapped into [`slacker_core::Error`].

use slacker_core::{Error, ObjectKind};

use crate::client::{self, Nfs4Status};
use crate::config::SCHEME;

/// What went wrong inside the NFS backend. Private: callers see [`slacker_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum NfsError {
    /// A call to the server failed (the client error names the NFS operation).
    #[error("{source} (server {server}, {path})")]
    Client {
        server: String,
        path: String,
        #[source]
        source: client::Error,
    },
    /// A simulated crash (see `NfsBuilder::crash_plan`).
    #[error("{what} {path}: {source}")]
    Crash {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A metadata document is unreadable or inconsistent.
    #[error("metadata document {doc} on {server}: {reason}")]
    Metadata {
        server: String,
        doc: String,
        reason: String,
    },
    /// The server cannot CLONE and the configuration insists on it.
    #[error("the NFS server {server} cannot CLONE ({source}); use clone_mode \"auto\" or \"copy\"")]
    NoClone {
        server: String,
        operation: &'static str,
        #[source]
        source: client::Error,
    },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
}

impl NfsError {
    /// The NFS status, for a call the server answered with an error.
    pub(crate) fn status(&self) -> Option<Nfs4Status> {
        match self {
            NfsError::Client { source, .. } => source.status(),
            _ => None,
        }
    }

    /// The object named does not exist (any more).
    pub(crate) fn is_gone(&self) -> bool {
        matches!(self.status(), Some(Nfs4Status::NoEnt | Nfs4Status::Stale))
    }

    /// The name exists already.
    pub(crate) fn is_exists(&self) -> bool {
        self.status() == Some(Nfs4Status::Exist)
    }

    /// The server cannot do the operation.
    pub(crate) fn is_not_supported(&self) -> bool {
        matches!(self, NfsError::Client { source, .. } if source.is_not_supported())
    }
}

impl From<NfsError> for Error {
    fn from(e: NfsError) -> Self {
        match &e {
            NfsError::Client { source, path, .. } => match source.status() {
                Some(Nfs4Status::NoEnt | Nfs4Status::Stale) => {
                    Error::not_found(ObjectKind::Other, path)
                }
                Some(Nfs4Status::Exist) => Error::already_exists(ObjectKind::Other, path),
                Some(Nfs4Status::NotSupp | Nfs4Status::OpIllegal) => Error::Unsupported {
                    operation: client_op(source),
                    backend: SCHEME,
                },
                _ => Error::backend(SCHEME, e),
            },
            NfsError::NoClone { operation, .. } => Error::Unsupported {
                operation,
                backend: SCHEME,
            },
            NfsError::Crash { .. } => Error::backend(SCHEME, e),
            NfsError::Metadata { .. } => Error::Integrity(e.to_string()),
            NfsError::Config(_) => Error::Config(e.to_string()),
        }
    }
}

fn client_op(e: &client::Error) -> &'static str {
    match e {
        client::Error::Nfs { op, .. }
        | client::Error::Io { op, .. }
        | client::Error::Timeout { op, .. } => op,
        _ => "NFS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slacker_core::ErrorKind;
    use std::time::Duration;

    fn client_err(source: client::Error) -> Error {
        NfsError::Client {
            server: "10.0.0.1:2049".into(),
            path: "slacker/volumes/v.json".into(),
            source,
        }
        .into()
    }

    #[test]
    fn statuses_map_to_kinds() {
        let nfs = |status| client::Error::Nfs { op: "OPEN", status };
        assert_eq!(
            client_err(nfs(Nfs4Status::NoEnt)).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            client_err(nfs(Nfs4Status::Stale)).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            client_err(nfs(Nfs4Status::Exist)).kind(),
            ErrorKind::AlreadyExists
        );
        let e = client_err(client::Error::Nfs {
            op: "CLONE",
            status: Nfs4Status::NotSupp,
        });
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("CLONE"), "{e}");
        assert_eq!(
            client_err(nfs(Nfs4Status::NoSpc)).kind(),
            ErrorKind::Backend
        );
    }

    #[test]
    fn timeouts_and_io_name_the_operation_and_server() {
        let e = client_err(client::Error::Timeout {
            op: "READ",
            after: Duration::from_secs(3),
        });
        assert_eq!(e.kind(), ErrorKind::Backend);
        let s = e.to_string();
        assert!(s.contains("READ") && s.contains("10.0.0.1:2049"), "{s}");
        let e = client_err(client::Error::Io {
            op: "CONNECT",
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        });
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.to_string().contains("CONNECT"), "{e}");
    }
}
