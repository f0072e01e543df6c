//! The conformance suite and the model-based property test every slacker backend runs,
//! stamped out for a backend written outside the slacker workspace.

use async_trait::async_trait;
use hashmap_backend::HashMapBackend;
use slacker_testkit::Harness;

struct HashMapHarness;

#[async_trait]
impl Harness for HashMapHarness {
    type Backend = HashMapBackend;

    async fn fresh(&self) -> HashMapBackend {
        HashMapBackend::new()
    }

    async fn reopen(&self, backend: HashMapBackend) -> HashMapBackend {
        // The storage outlives the handle, as files or a server would.
        let again = backend.clone();
        drop(backend);
        again
    }
}

fn harness() -> Option<HashMapHarness> {
    Some(HashMapHarness)
}

slacker_testkit::conformance_suite!(harness());
