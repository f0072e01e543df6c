//! The one conformance suite every slacker backend runs, and the model-based property test.
//!
//! A backend crate writes a [`Harness`] (how to make a fresh, isolated backend and how to
//! reopen one) and stamps out the suite with one line:
//!
//! ```text
//! slacker_testkit::conformance_suite!(my_harness()); // my_harness() -> Option<MyHarness>
//! ```
//!
//! That generates one named `#[test]` per check in [`checks`] (the same list for every
//! backend) plus `model_property_test`, which drives the backend and the mem model
//! ([`slacker_backend_mem::State`]) with the same random operations and compares them.
//! A harness constructor returns `None` when its real component is unavailable; it must
//! print `SKIPPED: <why>` and, under `CI=true`, panic instead (see [`skip_or_fail`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use async_trait::async_trait;
use slacker_backend_mem::MemBackend;
use slacker_core::Backend;

pub mod checks;
pub mod crash;
pub mod faulty;
pub mod model;
#[cfg(feature = "tree")]
pub mod tree;
pub mod wire;

/// A boxed future returned by the generated check wrappers.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A check, as a function pointer (see [`all_checks`]).
pub type CheckFn<H> = for<'a> fn(&'a H) -> BoxFuture<'a, ()>;

/// Gives each check a fresh, isolated backend.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The backend under test.
    type Backend: Backend + 'static;

    /// A new backend with no volumes and no snapshots, isolated from every other.
    async fn fresh(&self) -> Self::Backend;

    /// Drops `backend` and opens the same storage again, as a restarted process would.
    async fn reopen(&self, backend: Self::Backend) -> Self::Backend;

    /// How far the backend's diverged bitmap may over-approximate the written blocks, in
    /// bytes: the model test accepts a bitmap within the written blocks rounded out to
    /// whole granules of this size (see [`model`]). 0 (the default): exact, at the
    /// volume's block size. Declare the backend's real unit (btrfs: its 4 KiB page, as
    /// FIEMAP reports; NFS: its 4 MiB intent granule), never more.
    fn diverged_granule(&self) -> u64 {
        0
    }

    /// Sequences `model_property_test` runs (default: proptest's, 256 or
    /// `PROPTEST_CASES`). A backend whose every call crosses a slow link may run fewer,
    /// but must still honour `PROPTEST_CASES`.
    fn model_cases(&self) -> u32 {
        model::ModelConfig::default().cases
    }
}

/// The harness of the mem backend (reopen = a new handle on the same state).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemHarness;

#[async_trait]
impl Harness for MemHarness {
    type Backend = MemBackend;
    async fn fresh(&self) -> MemBackend {
        MemBackend::new()
    }
    async fn reopen(&self, backend: MemBackend) -> MemBackend {
        let again = backend.reopen();
        drop(backend);
        again
    }
}

/// Reports a missing real component: prints `SKIPPED: <why>` and returns `None`, or, when
/// the environment variable `CI` is `true`, panics (under CI nothing may skip).
pub fn skip_or_fail<T>(why: impl std::fmt::Display) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true but a required component is missing: {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Runs one check on a multi-threaded runtime of its own.
pub fn run_check<H: Harness>(h: &H, check: CheckFn<H>) {
    runtime().block_on(check(h));
}

/// Runs one check and reports whether it passed (a panic is a failure), for tests that
/// prove the suite catches broken backends.
pub fn check_passes<H: Harness>(h: &H, check: CheckFn<H>) -> bool {
    std::panic::catch_unwind(AssertUnwindSafe(|| run_check(h, check))).is_ok()
}

/// A runtime for checks: two workers, all drivers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[macro_export]
#[doc(hidden)]
macro_rules! __stamp_list {
    ([] $($name:ident),* $(,)?) => {
        /// Every check of the suite, by name, in the order of the list.
        pub fn all_checks<H: $crate::Harness>() -> Vec<(&'static str, $crate::CheckFn<H>)> {
            $(
                fn $name<H: $crate::Harness>(h: &H) -> $crate::BoxFuture<'_, ()> {
                    Box::pin($crate::checks::$name(h))
                }
            )*
            vec![$((stringify!($name), $name::<H> as $crate::CheckFn<H>)),*]
        }
    };
}
crate::__check_list!(@with __stamp_list;);

/// The list of checks: the one place it is written. Invoked by [`conformance_suite!`].
#[macro_export]
#[doc(hidden)]
macro_rules! __check_list {
    (tests; $($arg:tt)*) => {
        $crate::__check_list!(@with __stamp_tests; $($arg)*);
    };
    (@with $cb:ident; $($arg:tt)*) => {
        $crate::$cb! { [$($arg)*]
            new_volume_reads_zeros,
            read_past_end_is_out_of_range,
            write_past_end_is_out_of_range,
            partial_and_straddling_writes_read_back,
            invalid_volume_options_are_rejected,
            block_sizes_are_respected,
            create_existing_volume_fails,
            huge_sparse_volume,
            snapshot_is_frozen,
            snapshot_survives_volume_removal,
            snapshot_of_clone,
            clone_reads_as_snapshot,
            clone_writes_are_private,
            concurrent_clones_of_one_snapshot,
            bitmap_covers_writes,
            fresh_clone_has_empty_bitmap,
            bitmap_invariant_over_a_workload,
            removing_snapshot_keeps_clones,
            held_snapshot_cannot_be_removed,
            release_unknown_hold_fails,
            unknown_volume_is_not_found,
            unknown_snapshot_is_not_found,
            removed_ids_are_not_found,
            foreign_snapshot_id_is_invalid,
            reopen_keeps_acknowledged_state,
            list_reports_everything,
            stat_reports_size_and_origin,
            usage_reports_exclusive_and_shared,
            local_path_reads_as_volume,
            missing_capabilities_fail_unsupported,
            dyn_backend_works,
        }
    };
}

/// Stamps out one `#[test]` per conformance check, plus `model_property_test`, for the
/// harness that `$make` (an expression of type `Option<impl Harness>`) builds. The property
/// test runs [`Harness::model_cases`] sequences and accepts the bitmap over-approximation
/// that [`Harness::diverged_granule`] declares.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::__check_list!(tests; $make);
        #[test]
        fn model_property_test() {
            if let Some(h) = $make {
                let config = $crate::model::ModelConfig {
                    cases: $crate::Harness::model_cases(&h),
                    ..$crate::model::ModelConfig::default()
                };
                if let Err(e) = $crate::model::run_model_test(&h, config) {
                    panic!("model-based property test failed: {e}");
                }
            }
        }
    };
}

/// Generates the `#[test]` functions (used by [`conformance_suite!`]).
#[macro_export]
#[doc(hidden)]
macro_rules! __stamp_tests {
    ([$make:expr] $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(h) = $make {
                    fn wrap<H: $crate::Harness>(h: &H) -> $crate::BoxFuture<'_, ()> {
                        ::std::boxed::Box::pin($crate::checks::$name(h))
                    }
                    $crate::run_check(&h, wrap::<_>);
                }
            }
        )*
    };
}
