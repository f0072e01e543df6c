//! One error type for the benchmark: a message with the context chain that led to it.
//!
//! A benchmark binary reports errors to a person, so a string with context is enough; the
//! library crates keep their semantic error enums.

use std::fmt;

/// An error with human-readable context (outermost first).
#[derive(Debug)]
pub struct Error {
    msg: String,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn msg(msg: impl fmt::Display) -> Self {
        Self {
            msg: msg.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

macro_rules! from_source {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self { Self::msg(e) }
        }
    )*};
}
from_source!(
    std::io::Error,
    serde_json::Error,
    oci_client::errors::OciDistributionError,
    oci_client::ParseError,
    rustix::io::Errno,
    tokio::task::JoinError,
    slacker_core::Error
);

/// Adds context to errors: `op().context("pushing python3")?`.
pub trait Context<T> {
    /// Prefix the error with `what`.
    fn context(self, what: impl fmt::Display) -> Result<T>;
    /// Prefix the error with a lazily built message.
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::msg(format!("{what}: {e}")))
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::msg(format!("{}: {e}", f())))
    }
}

/// Return early with a formatted [`Error`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::msg(format!($($arg)*))) };
}
