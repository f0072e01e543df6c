//! The conformance suite and the model-based property test against a real knfsd (the
//! project's test VM, see `support`). Every `fresh()` backend gets its own directory on
//! the export; `reopen` is a new backend with a new session on the same directory.

mod support;

slacker_testkit::conformance_suite!(support::harness());
