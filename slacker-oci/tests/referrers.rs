//! Startup traces attached to images as OCI referrers, against a real registry
//! (Debian's distribution 2.8, which lacks the referrers API: the fallback tag is what
//! makes them findable).

mod support;

use std::path::Path;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, BlockRange, BlockSize, ErrorKind, LayerStore, LayerStoreOptions};
use slacker_oci::referrers::{StartupTrace, TRACE_ARTIFACT_TYPE, fallback_tag};
use slacker_oci::{ClientOptions, PushOptions, RegistryClient};
use support::*;

async fn store(b: &MemBackend, dir: &Path, name: &str) -> LayerStore<MemBackend> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir).unwrap());
    let opts = LayerStoreOptions::new(name).with_volume_size(4 << 20);
    LayerStore::open(b.reopen(), meta, opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_is_attached_found_and_leaves_the_image_unchanged() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "push").await;
    let v = s.create("img", None).await.unwrap();
    b.write_at(&v, 0, &content(64 << 10, 1)).await.unwrap();
    let image = image(&addr, "referrers", "v1");
    let c = RegistryClient::new(ClientOptions::plain_http());
    c.push_image(&s, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    let before = c.pull_manifest(&image, "reference").await.unwrap();

    // No trace yet: None, as for any image pushed before traces existed.
    assert_eq!(c.pull_trace(&image, &before.digest).await.unwrap(), None);

    let t1 = StartupTrace::new(
        BlockSize::DEFAULT,
        1024,
        [BlockRange::new(0, 16), BlockRange::new(100, 140)],
    );
    let pushed = c.push_trace(&image, &t1).await.unwrap();
    assert_eq!(pushed.subject_digest, before.digest);
    assert_eq!(pushed.fallback_tag, fallback_tag(&before.digest));
    assert!(pushed.fallback_tag.starts_with("sha256-"));

    // The image is untouched: same manifest digest, same layers.
    let after = c.pull_manifest(&image, "reference").await.unwrap();
    assert_eq!(after.digest, before.digest);
    assert_eq!(
        format!("{:?}", after.layers),
        format!("{:?}", before.layers)
    );

    let got = c.pull_trace(&image, &before.digest).await.unwrap().unwrap();
    assert_eq!(got.trace, t1);
    assert_eq!(got.manifest_digest, pushed.manifest_digest);
    // The small trace rides in its manifest too (`data`), and is a blob as well.
    let (repo, _) = image.rsplit_once(':').unwrap();
    let tm = c
        .pull_manifest(&format!("{repo}@{}", pushed.manifest_digest), "reference")
        .await
        .unwrap();
    let embedded = tm.layers[0].clone();
    assert!(embedded.data().is_some(), "{embedded:?}");
    let mut blob = embedded.clone();
    blob.set_data(None);
    assert_eq!(
        c.pull_blob(&image, &blob).await.unwrap(),
        c.pull_blob(&image, &embedded).await.unwrap()
    );
    assert_eq!(
        StartupTrace::decode(&c.pull_blob(&image, &blob).await.unwrap()).unwrap(),
        t1
    );

    // The fallback tag is an image index listing the artifact with its artifactType.
    // Read it as any registry client would (curl: the test does not reach into slacker-oci).
    let (host_repo, _) = image.rsplit_once(':').unwrap();
    let (host, repo) = host_repo.split_once('/').unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-fsS",
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json",
            &format!("http://{host}/v2/{repo}/manifests/{}", pushed.fallback_tag),
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let idx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifests = idx["manifests"].as_array().expect("an image index");
    assert_eq!(manifests.len(), 1);
    assert_eq!(
        manifests[0]["artifactType"].as_str(),
        Some(TRACE_ARTIFACT_TYPE)
    );

    // A newer trace wins; the index keeps both.
    let t2 = StartupTrace::new(BlockSize::DEFAULT, 1024, [BlockRange::new(7, 9)]);
    c.push_trace(&image, &t2).await.unwrap();
    let got = c.pull_trace(&image, &before.digest).await.unwrap().unwrap();
    assert_eq!(got.trace, t2);
    // Pushing the same trace again adds no duplicate entry.
    c.push_trace(&image, &t2).await.unwrap();
    let got2 = c.pull_trace(&image, &before.digest).await.unwrap().unwrap();
    assert_eq!(got2.manifest_digest, got.manifest_digest);

    // Another image's digest has no trace.
    let other = image_with_other_content(&c, &s, &b, &addr).await;
    assert_eq!(c.pull_trace(&image, &other).await.unwrap(), None);
    // A malformed subject digest is a typed error, not a panic.
    let err = c.pull_trace(&image, "sha256:zz").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

async fn image_with_other_content(
    c: &RegistryClient,
    s: &LayerStore<MemBackend>,
    b: &MemBackend,
    addr: &str,
) -> String {
    let v = s.create("other", None).await.unwrap();
    b.write_at(&v, 0, b"other").await.unwrap();
    let image = image(addr, "referrers", "other");
    c.push_image(s, "other", &image, &PushOptions::default())
        .await
        .unwrap();
    c.pull_manifest(&image, "reference").await.unwrap().digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushers_do_not_lose_each_others_index_entries() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "push").await;
    let v = s.create("img", None).await.unwrap();
    b.write_at(&v, 0, &content(64 << 10, 9)).await.unwrap();
    let image = image(&addr, "referrers-race", "v1");
    let c = RegistryClient::new(ClientOptions::plain_http());
    c.push_image(&s, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    // Eight runtimes attach their traces to the same image at the same moment.
    let pushers: Vec<_> = (0..8u32)
        .map(|i| {
            let image = image.clone();
            tokio::spawn(async move {
                let t = StartupTrace::new(BlockSize::DEFAULT, 1024, [BlockRange::new(i, i + 1)]);
                RegistryClient::new(ClientOptions::plain_http())
                    .push_trace(&image, &t)
                    .await
            })
        })
        .collect();
    let mut pushed = Vec::new();
    for p in pushers {
        pushed.push(p.await.unwrap().unwrap());
    }
    let (host_repo, _) = image.rsplit_once(':').unwrap();
    let (host, repo) = host_repo.split_once('/').unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-fsS",
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json",
            &format!(
                "http://{host}/v2/{repo}/manifests/{}",
                pushed[0].fallback_tag
            ),
        ])
        .output()
        .expect("curl");
    assert!(out.status.success());
    let idx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["digest"].as_str())
        .collect();
    for p in &pushed {
        assert!(
            listed.contains(&p.manifest_digest.as_str()),
            "{} lost: {listed:?}",
            p.manifest_digest
        );
    }
    assert_eq!(listed.len(), 8, "no duplicates: {listed:?}");
}
