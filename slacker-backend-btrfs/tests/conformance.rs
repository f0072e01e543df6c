//! The conformance suite and the model-based property test on a real btrfs (see
//! `support` for how the btrfs is found or made).

mod support;

slacker_testkit::conformance_suite!(support::harness());
