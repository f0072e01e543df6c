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

/// `curl` on the test registry: `(status, body)`.
fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/stderr", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    (String::from_utf8(out.stdout).unwrap(), out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_manifest_embedded_in_the_index_is_used_and_checked() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "push").await;
    let v = s.create("img", None).await.unwrap();
    b.write_at(&v, 0, &content(64 << 10, 3)).await.unwrap();
    let image = image(&addr, "referrers-embedded", "v1");
    let c = RegistryClient::new(ClientOptions::plain_http());
    c.push_image(&s, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    let subject = c.pull_manifest(&image, "reference").await.unwrap().digest;
    let t1 = StartupTrace::new(BlockSize::DEFAULT, 1024, [BlockRange::new(3, 30)]);
    let pushed = c.push_trace(&image, &t1).await.unwrap();

    // The fallback index's entry embeds the artifact manifest, byte for byte.
    let (host_repo, _) = image.rsplit_once(':').unwrap();
    let (host, repo) = host_repo.split_once('/').unwrap();
    let base = format!("http://{host}/v2/{repo}/manifests");
    let index_url = format!("{base}/{}", pushed.fallback_tag);
    let (code, idx) = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.index.v1+json",
        &index_url,
    ]);
    assert_eq!(code, "200");
    let original = idx.clone();
    let idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
    let entry = idx["manifests"][0].clone();
    let (code, manifest) = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("{base}/{}", pushed.manifest_digest),
    ]);
    assert_eq!(code, "200");
    assert_eq!(
        entry["data"].as_str(),
        Some(b64.encode(&manifest).as_str()),
        "{entry}"
    );

    // Checked: an index whose embedded manifest lies is refused (`Integrity`), never
    // used and never silently replaced by a fetch.
    let text = String::from_utf8(manifest.clone()).unwrap();
    let tampered = text.replacen(
        &format!("{TRACE_ARTIFACT_TYPE}\""),
        &format!(
            "{}2\"",
            &TRACE_ARTIFACT_TYPE[..TRACE_ARTIFACT_TYPE.len() - 1]
        ),
        1,
    );
    assert_eq!(tampered.len(), text.len());
    assert_ne!(tampered, text);
    let size = manifest.len() as u64;
    let put_index = |body: &[u8]| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), body).unwrap();
        let (code, out) = curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
            "--data-binary",
            &format!("@{}", f.path().display()),
            &index_url,
        ]);
        assert_eq!(code, "201", "{}", String::from_utf8_lossy(&out));
    };
    let cases: [(&str, String, u64); 4] = [
        ("same size, other bytes", b64.encode(&tampered), size),
        ("right bytes, wrong size", b64.encode(&manifest), size + 1),
        ("not base64", "!!not base64!!".to_owned(), size),
        ("far too long", b64.encode(vec![b' '; 64 << 10]), size),
    ];
    for (what, data, size) in cases {
        let mut e = entry.clone();
        e["data"] = data.into();
        e["size"] = size.into();
        let hostile = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [e],
        }))
        .unwrap();
        put_index(&hostile);
        let err = c.pull_trace(&image, &subject).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{what}: {err}");
    }

    put_index(&original);
    // Used (the good index back): with the artifact manifest deleted from the
    // registry, the trace is still found (from the index alone).
    let (code, _) = curl(&[
        "-X",
        "DELETE",
        &format!("{base}/{}", pushed.manifest_digest),
    ]);
    assert_eq!(code, "202");
    let got = c.pull_trace(&image, &subject).await.unwrap().unwrap();
    assert_eq!(got.trace, t1);
    assert_eq!(got.manifest_digest, pushed.manifest_digest);
}
