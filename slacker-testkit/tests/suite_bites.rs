//! The suite and the property test catch broken backends.

use slacker_testkit::faulty::{Fault, FaultyHarness};
use slacker_testkit::model::{ModelConfig, run_model_test};
use slacker_testkit::{MemHarness, all_checks, check_passes};

fn failing_checks(fault: Fault) -> Vec<&'static str> {
    let h = FaultyHarness::new(MemHarness, fault);
    all_checks::<FaultyHarness<MemHarness>>()
        .into_iter()
        .filter(|(_, check)| !check_passes(&h, *check))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn the_correct_backend_passes_every_check() {
    for (name, check) in all_checks::<MemHarness>() {
        assert!(
            check_passes(&MemHarness, check),
            "{name} fails on the mem backend"
        );
    }
}

#[test]
fn suite_catches_a_forgetful_bitmap() {
    let failed = failing_checks(Fault::ForgetfulBitmap);
    assert!(
        failed.contains(&"bitmap_covers_writes"),
        "failed: {failed:?}"
    );
    assert!(
        failed.contains(&"bitmap_invariant_over_a_workload"),
        "failed: {failed:?}"
    );
}

#[test]
fn suite_catches_a_clone_sharing_a_mutable_block() {
    let failed = failing_checks(Fault::SharedCloneBlock);
    assert!(
        failed.contains(&"clone_writes_are_private"),
        "failed: {failed:?}"
    );
}

fn model_config() -> ModelConfig {
    ModelConfig {
        // Not recorded: these failures are expected, not regressions to replay. A fixed seed
        // and more cases make "the property test finds the bug" reproducible, not lucky.
        regressions: None,
        deterministic: true,
        cases: 1024,
        ..ModelConfig::default()
    }
}

#[test]
fn property_test_catches_a_forgetful_bitmap() {
    let err = run_model_test(
        &FaultyHarness::new(MemHarness, Fault::ForgetfulBitmap),
        model_config(),
    )
    .expect_err("the property test must fail on a forgetful bitmap");
    assert!(err.0.contains("bitmap invariant"), "{err}");
}

#[test]
fn property_test_catches_a_clone_sharing_a_mutable_block() {
    let err = run_model_test(
        &FaultyHarness::new(MemHarness, Fault::SharedCloneBlock),
        model_config(),
    )
    .expect_err("the property test must fail when clone writes leak into the snapshot");
    assert!(err.0.contains("differs from the model"), "{err}");
}

#[test]
fn property_test_catches_an_everything_diverged_bitmap() {
    let err = run_model_test(
        &FaultyHarness::new(MemHarness, Fault::EverythingDiverged),
        model_config(),
    )
    .expect_err("the property test must bound the bitmap from above");
    assert!(err.0.contains("beyond the model's writes"), "{err}");
}
