//! Push and pull against a real OCI distribution registry (see `support`).

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::layer::ext4;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, BackendExt, ErrorKind, LayerKind, LayerStore, LayerStoreOptions};
use slacker_oci::{
    ClientOptions, KIND_ANNOTATION, PushLayer, PushOptions, REFERENCE_MEDIA_TYPE, RegistryClient,
};
use support::*;

async fn store(b: &MemBackend, dir: &Path, name: &str, volume_size: u64) -> LayerStore<MemBackend> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir).unwrap());
    let opts = LayerStoreOptions::new(name).with_volume_size(volume_size);
    LayerStore::open(b.reopen(), meta, opts).await.unwrap()
}

fn client() -> RegistryClient {
    RegistryClient::new(ClientOptions::plain_http())
}

async fn reference_image_moves_under_4k(size: usize, test: &str) {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let volume = (size as u64 + (1 << 20)).next_multiple_of(1 << 20);
    let pusher = store(&b, d1.path(), "push", volume).await;
    let v = pusher.create("img", None).await.unwrap();
    let data = content(size, size as u64);
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        b.write_at(&v, (i * (4 << 20)) as u64, chunk).await.unwrap();
    }
    let image = image(&addr, test, "v1");
    let c = client();
    let pushed = c
        .push_image(&pusher, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    assert!(pushed.layer_bytes_uploaded() > 0);
    assert!(pushed.layer_bytes_uploaded() < 4096, "{pushed:?}");
    assert!(pushed.bytes_uploaded() < 8192, "{pushed:?}");

    // What the registry stores: the manifest's layer descriptors.
    let m = c.pull_manifest(&image, "reference").await.unwrap();
    assert_eq!(m.layers.len(), 1);
    assert_eq!(m.layers[0].media_type().to_string(), REFERENCE_MEDIA_TYPE);
    let stored: u64 = m.layers.iter().map(|l| l.size()).sum();
    assert!(stored < 4096, "registry holds {stored} bytes of layers");

    // A second worker on the same storage pulls it: metadata only.
    let worker = store(&b, d2.path(), "work", volume).await;
    let vols = b.list_volumes().await.unwrap();
    let pulled = c.pull_image(&worker, &image).await.unwrap();
    assert!(pulled.layer_bytes_downloaded() < 4096, "{pulled:?}");
    assert_eq!(pulled.layers[0].kind, LayerKind::Lazy);
    assert_eq!(
        b.list_volumes().await.unwrap(),
        vols,
        "pull cloned something"
    );
    // The first get clones; the content is the pushed content.
    let got = worker.get(&pulled.top_layer).await.unwrap();
    let back = b.read_at(&got, 0, size).await.unwrap();
    assert!(back[..] == data[..], "pulled volume differs");

    // Pushing the pulled image again uploads no layer: same reference, same digest.
    let again = c
        .push_image(&worker, &pulled.top_layer, &image, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(again.layer_bytes_uploaded(), 0, "{again:?}");
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
    // Pulling again moves no layer data: the layer is in the store.
    let second = c.pull_image(&worker, &image).await.unwrap();
    assert_eq!(second.layer_bytes_downloaded(), 0);
    assert_eq!(second.top_layer, pulled.top_layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_image_of_10_mib_moves_under_4_kib() {
    reference_image_moves_under_4k(10 << 20, "ten").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_image_of_200_mib_moves_under_4_kib() {
    reference_image_moves_under_4k(200 << 20, "twohundred").await;
}

fn base_tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"base\n").unwrap();
    std::fs::write(root.join("etc/old.conf"), b"old\n").unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"tool\n").unwrap();
}

fn top_layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/hostname", b"top\n");
    add("app/run", b"run\n");
    add("etc/.wh.old.conf", b"");
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_image_reference_base_and_traditional_top_pulls_and_reads() {
    let Some(addr) = registry() else { return };
    if !e2fsprogs() {
        return;
    }
    let b = MemBackend::new();
    let (d1, d2, tree) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    base_tree(tree.path());
    let pusher = store(&b, d1.path(), "push", 32 << 20).await;
    pusher.import_dir("base", tree.path()).await.unwrap();
    let diff = pusher.diff("base").await.unwrap();
    let image = image(&addr, "mixed", "v1");
    let c = client();
    let pushed = c
        .push_layers(
            &image,
            vec![
                PushLayer::reference(&diff),
                PushLayer::tar_gzip(&top_layer_tar(), 6),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(pushed.blobs.len(), 3);

    let worker = store(&b, d2.path(), "work", 32 << 20).await;
    let pulled = c.pull_image(&worker, &image).await.unwrap();
    let kinds: Vec<_> = pulled.layers.iter().map(|l| l.kind).collect();
    assert_eq!(kinds, vec![LayerKind::Lazy, LayerKind::Unpacked]);
    assert_eq!(
        worker.layer(&pulled.layers[0].id).await.unwrap().volume,
        None,
        "the base is never cloned"
    );
    let v = worker.get(&pulled.top_layer).await.unwrap();
    let img = tree.path().join("top.img");
    std::fs::write(&img, b.read_volume(&v).await.unwrap()).unwrap();
    assert_eq!(ext4::cat(&img, "/etc/hostname").unwrap(), b"top\n");
    assert_eq!(ext4::cat(&img, "/app/run").unwrap(), b"run\n");
    assert_eq!(ext4::cat(&img, "/usr/bin/tool").unwrap(), b"tool\n");
    assert_eq!(
        ext4::cat(&img, "/etc/old.conf").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_export_is_an_ordinary_image_in_the_same_index() {
    let Some(addr) = registry() else { return };
    if !e2fsprogs() {
        return;
    }
    let b = MemBackend::new();
    let (d1, d2, tree) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    base_tree(tree.path());
    let pusher = store(&b, d1.path(), "push", 32 << 20).await;
    pusher.import_dir("base", tree.path()).await.unwrap();
    let image = image(&addr, "plain", "v1");
    let c = client();
    let pushed = c
        .push_image(
            &pusher,
            "base",
            &image,
            &PushOptions::default().with_plain_export(true),
        )
        .await
        .unwrap();
    assert!(pushed.index_digest.is_some());

    // An ordinary client resolves the index by platform and gets the plain image.
    let plain = c.pull_manifest(&image, "plain").await.unwrap();
    assert_eq!(plain.layers.len(), 1);
    assert_eq!(
        plain.layers[0].media_type().to_string(),
        slacker_oci::IMAGE_LAYER_GZIP_MEDIA_TYPE
    );
    assert_eq!(
        plain.manifest.annotations().as_ref().unwrap()[KIND_ANNOTATION],
        "plain"
    );
    let plain = c.pull_manifest(&image, "plain").await.unwrap();
    let gz = c.pull_blob(&image, &plain.layers[0]).await.unwrap();
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut tar)
        .unwrap();
    let mut found = None;
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let mut e = e.unwrap();
        if &*e.path_bytes() == b"etc/hostname" {
            let mut s = Vec::new();
            e.read_to_end(&mut s).unwrap();
            found = Some(s);
        }
    }
    assert_eq!(found.as_deref(), Some(&b"base\n"[..]));

    // Slacker picks the reference entry and pulls lazily.
    let worker = store(&b, d2.path(), "work", 32 << 20).await;
    let pulled = c.pull_image(&worker, &image).await.unwrap();
    assert_eq!(pulled.picked_from_index.as_deref(), Some("reference"));
    assert_eq!(pulled.layers[0].kind, LayerKind::Lazy);
    assert!(pulled.layer_bytes_downloaded() < 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_layer_in_the_registry_changes_nothing() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let image = image(&addr, "hostile", "v1");
    let c = client();
    let mut evil = tar::Header::new_ustar();
    {
        let raw = evil.as_mut_bytes();
        raw[..11].copy_from_slice(b"/etc/passwd");
    }
    evil.set_size(5);
    evil.set_mode(0o644);
    evil.set_uid(0);
    evil.set_gid(0);
    evil.set_mtime(0);
    evil.set_cksum();
    let mut tar = evil.as_bytes().to_vec();
    tar.write_all(b"pwned").unwrap();
    tar.resize(512 * 2 + 1024, 0);
    c.push_layers(&image, vec![PushLayer::tar(tar)], None)
        .await
        .unwrap();
    let worker = store(&b, d.path(), "work", 16 << 20).await;
    let err = c.pull_image(&worker, &image).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(worker.list().await.is_empty());
    assert!(b.list_volumes().await.unwrap().is_empty());
}

/// Runtimes pushing the same image (or images sharing a layer) at the same moment upload
/// the same blobs at once; distribution 2.8 can answer all but one of such uploads with a
/// 500. Every push must still succeed and every image pull intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_images_sharing_blobs_all_succeed() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let pusher = Arc::new(store(&b, d.path(), "push", 4 << 20).await);
    const PUSHERS: usize = 8;
    const ROUNDS: u64 = 4;
    for round in 0..ROUNDS {
        // A new layer each round, so that its blobs are new to the registry.
        let layer = format!("img{round}");
        let v = pusher.create(&layer, None).await.unwrap();
        b.write_at(&v, 0, &content(64 << 10, 100 + round))
            .await
            .unwrap();
        // A traditional layer shared by images of different configs (a common base).
        let shared = PushLayer::tar(tar_of_one("big.bin", &content(4 << 20, 200 + round)));
        let tasks: Vec<_> = (0..PUSHERS)
            .map(|i| {
                let (pusher, layer, shared) = (pusher.clone(), layer.clone(), shared.clone());
                let image_ref = image(&addr, "shared-blobs", &format!("r{round}-{i}"));
                let layers_ref = image(&addr, "shared-layer", &format!("r{round}-{i}"));
                tokio::spawn(async move {
                    let c = client();
                    let mut config = slacker_oci::default_config();
                    config.set_author(Some(format!("pusher {i}")));
                    let opts = PushOptions::default();
                    let (a, b) = tokio::join!(
                        c.push_image(&pusher, &layer, &image_ref, &opts),
                        c.push_layers(&layers_ref, vec![shared], Some(&config))
                    );
                    (image_ref, layers_ref, a, b)
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut pushed = Vec::new();
        for t in tasks {
            let (image_ref, layers_ref, a, b) = t.await.unwrap();
            if let Err(e) = &a {
                failures.push(format!("push_image {image_ref}: {e}"));
            }
            if let Err(e) = &b {
                failures.push(format!("push_layers {layers_ref}: {e}"));
            }
            pushed.push((image_ref, layers_ref));
        }
        assert!(failures.is_empty(), "round {round}: {failures:#?}");
        let c = client();
        for (i, (image_ref, layers_ref)) in pushed.iter().enumerate() {
            let d = tempfile::tempdir().unwrap();
            let w = store(&b, d.path(), &format!("w{round}-{i}"), 4 << 20).await;
            let got = c.pull_image(&w, image_ref).await.unwrap();
            assert_eq!(got.layers.len(), 1);
            let cfg = c.pull_config(layers_ref).await.unwrap();
            assert_eq!(
                cfg.author().as_deref(),
                Some(format!("pusher {i}").as_str())
            );
        }
    }
}

fn tar_of_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, name, data).unwrap();
    t.into_inner().unwrap()
}

/// `curl` with `args`; its stdout (panics on failure).
fn curl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("curl")
        .arg("-fsS")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A slacker manifest embeds its config and reference layer as `data`, and also pushes
/// them as blobs (for clients that ignore `data`). A pull takes them from the manifest,
/// checked like downloaded blobs: embedded data of the wrong bytes, the wrong size or
/// not base64 is an `Integrity` error and nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_blobs_are_used_and_checked_like_downloaded_ones() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let pusher = store(&b, d.path(), "push", 4 << 20).await;
    let v = pusher.create("img", None).await.unwrap();
    b.write_at(&v, 0, &content(64 << 10, 9)).await.unwrap();
    let image = image(&addr, "embedded", "v1");
    let c = client();
    let pushed = c
        .push_image(&pusher, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    assert!(pushed.blobs.iter().all(|t| t.embedded), "{pushed:?}");

    // Embedded and pushed: the blob fetched without `data` is the embedded one.
    let m = c.pull_manifest(&image, "reference").await.unwrap();
    for desc in std::iter::once(&m.config).chain(&m.layers) {
        let data = desc.data().clone().expect("embedded");
        let mut plain = desc.clone();
        plain.set_data(None);
        assert_eq!(
            c.pull_blob(&image, &plain).await.unwrap(),
            b64.decode(data).unwrap()
        );
    }
    let dw = tempfile::tempdir().unwrap();
    let w = store(&b, dw.path(), "good", 4 << 20).await;
    let pulled = c.pull_image(&w, &image).await.unwrap();
    assert!(pulled.layers[0].blob.embedded && pulled.layers[0].blob.transferred);
    assert_eq!(pulled.layer_bytes_downloaded(), 0, "{pulled:?}");
    assert_eq!(pulled.config_bytes, 0);
    assert_eq!(pulled.config.rootfs().diff_ids().len(), 1);

    // Hostile manifests: the same blobs in the registry, lying `data`.
    let (host_repo, _) = image.rsplit_once(':').unwrap();
    let repo = host_repo.split_once('/').unwrap().1;
    let url = |name: &str| format!("http://{addr}/v2/{repo}/manifests/{name}");
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let raw = curl(&["-H", &format!("Accept: {mt}"), &url(&m.digest)]);
    let good: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let layer = b64
        .decode(good["layers"][0]["data"].as_str().unwrap())
        .unwrap();
    let mut other = layer.clone();
    other[100] ^= 1;
    let config = b64
        .decode(good["config"]["data"].as_str().unwrap())
        .unwrap();
    let other_config = String::from_utf8(config)
        .unwrap()
        .replacen("\"linux\"", "\"LINUX\"", 1);
    assert!(other_config.contains("LINUX"));
    let cases: [(&str, &str, String); 5] = [
        (
            "layers",
            "another layer of the same size",
            b64.encode(&other),
        ),
        (
            "layers",
            "the layer one byte short",
            b64.encode(&layer[1..]),
        ),
        ("layers", "not base64", "!!not base64!!".to_owned()),
        (
            "layers",
            "far longer than the size",
            b64.encode(vec![0u8; 64 << 10]),
        ),
        ("config", "another valid config", b64.encode(other_config)),
    ];
    for (i, (field, what, data)) in cases.into_iter().enumerate() {
        let mut bad = good.clone();
        if field == "config" {
            bad["config"]["data"] = data.into();
        } else {
            bad["layers"][0]["data"] = data.into();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), serde_json::to_vec(&bad).unwrap()).unwrap();
        let tag = format!("bad{i}");
        curl(&[
            "-X",
            "PUT",
            "-o",
            "/dev/null",
            "-H",
            &format!("Content-Type: {mt}"),
            "--data-binary",
            &format!("@{}", f.path().display()),
            &url(&tag),
        ]);
        let dw = tempfile::tempdir().unwrap();
        let w = store(&b, dw.path(), &format!("bad{i}"), 4 << 20).await;
        let err = c
            .pull_image(&w, &format!("{host_repo}:{tag}"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{what}: {err}");
        assert!(w.list().await.is_empty(), "{what}: something was recorded");
    }
}
