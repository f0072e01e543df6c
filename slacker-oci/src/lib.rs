//! OCI registry push/pull for slacker (in progress).
