//! The conformance suite and the model-based property test against a real Ceph cluster
//! (the crate's test cluster, see `support`). Every `fresh()` backend gets its own RBD
//! namespace; `reopen` is a new backend (a new Ceph client) on the same namespace.
//!
//! The property test runs 64 cases (`RbdHarness::model_cases`) (every step is a cluster round trip: 256 cases take
//! ~7 minutes on a loaded 2-core machine); `PROPTEST_CASES` overrides.

mod support;

slacker_testkit::conformance_suite!(support::harness());
