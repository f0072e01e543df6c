//! The conformance suite and the model-based property test on the mem backend.

slacker_testkit::conformance_suite!(Some(slacker_testkit::MemHarness));
