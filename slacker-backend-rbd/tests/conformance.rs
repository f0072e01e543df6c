//! The conformance suite and the model-based property test against a real Ceph cluster
//! (the crate's test cluster, see `support`). Every `fresh()` backend gets its own RBD
//! namespace; `reopen` is a new backend (a new Ceph client) on the same namespace.

mod support;

slacker_testkit::conformance_suite!(support::harness());
