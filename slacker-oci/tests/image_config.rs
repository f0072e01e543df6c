//! The original image config travels (push, pull, plain export, skopeo), and bad input
//! from a registry (a tampered blob, a config whose diff_ids lie, a registry that dies
//! mid-pull) is a typed error with nothing recorded.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use slacker_backend_mem::MemBackend;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::worker::Counting;
use slacker_core::{Backend, ErrorKind, LayerStore, LayerStoreOptions};
use slacker_oci::spec::{ConfigBuilder, HistoryBuilder, ImageConfigurationBuilder};
use slacker_oci::{
    ClientOptions, ImageConfiguration, LocalRegistry, PushLayer, PushOptions, RegistryClient,
    default_config,
};
use support::*;

async fn store(b: &MemBackend, dir: &Path, name: &str) -> LayerStore<MemBackend> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir).unwrap());
    let opts = LayerStoreOptions::new(name).with_volume_size(32 << 20);
    LayerStore::open(b.reopen(), meta, opts).await.unwrap()
}

fn client() -> RegistryClient {
    RegistryClient::new(ClientOptions::plain_http())
}

fn original_config() -> ImageConfiguration {
    let base = default_config();
    let c = ConfigBuilder::default()
        .entrypoint(vec!["/docker-entrypoint.sh".to_owned()])
        .cmd(vec![
            "nginx".to_owned(),
            "-g".to_owned(),
            "daemon off;".to_owned(),
        ])
        .env(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            "NGINX_VERSION=1.25.3".to_owned(),
        ])
        .user("101:101")
        .working_dir("/srv")
        .labels(HashMap::from([("maintainer".to_owned(), "x".to_owned())]))
        .exposed_ports(vec!["80/tcp".to_owned()])
        .build()
        .unwrap();
    ImageConfigurationBuilder::default()
        .architecture(base.architecture().clone())
        .os(base.os().clone())
        .config(c)
        .history(vec![
            HistoryBuilder::default()
                .created_by("/bin/sh -c #(nop) ADD file:base in /")
                .build()
                .unwrap(),
            HistoryBuilder::default()
                .created_by("/bin/sh -c apt-get install nginx")
                .build()
                .unwrap(),
        ])
        .build()
        .unwrap()
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(d.len() as u64);
        b.append_data(&mut h, p, *d).unwrap();
    }
    b.into_inner().unwrap()
}

fn two_layers() -> Vec<PushLayer> {
    vec![
        PushLayer::tar_gzip(&tar_of(&[("etc/hostname", b"base\n")]), 6),
        PushLayer::tar_gzip(&tar_of(&[("srv/index.html", b"hello\n")]), 6),
    ]
}

fn same_runtime_config(a: &ImageConfiguration, b: &ImageConfiguration) {
    let (a, b) = (a.config().as_ref().unwrap(), b.config().as_ref().unwrap());
    assert_eq!(a.entrypoint(), b.entrypoint());
    assert_eq!(a.cmd(), b.cmd());
    assert_eq!(a.env(), b.env());
    assert_eq!(a.user(), b.user());
    assert_eq!(a.working_dir(), b.working_dir());
    assert_eq!(a.labels(), b.labels());
    assert_eq!(a.exposed_ports(), b.exposed_ports());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_config_travels_through_pull_push_and_the_plain_export() {
    let Some(addr) = registry() else { return };
    if !e2fsprogs() {
        return;
    }
    let original = original_config();
    let src = image(&addr, "cfg-src", "v1");
    let c = client();
    c.push_layers(&src, two_layers(), Some(&original))
        .await
        .unwrap();

    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "cfg").await;
    let pulled = c.pull_image(&s, &src).await.unwrap();
    same_runtime_config(&pulled.config, &original);
    assert_eq!(pulled.layers.len(), 2);

    let dst = image(&addr, "cfg-dst", "v1");
    let opts = PushOptions::default()
        .with_plain_export(true)
        .with_config(pulled.config.clone());
    let pushed = c
        .push_image(&s, &pulled.top_layer, &dst, &opts)
        .await
        .unwrap();
    assert!(pushed.index_digest.is_some());

    // slacker's pull returns it, from the reference manifest.
    let d2 = tempfile::tempdir().unwrap();
    let w = store(&b, d2.path(), "cfg2").await;
    let again = c.pull_image(&w, &dst).await.unwrap();
    assert_eq!(again.picked_from_index.as_deref(), Some("reference"));
    same_runtime_config(&again.config, &original);
    let h = again.config.history().as_ref().unwrap();
    assert_eq!(h.len(), 3, "original history kept, one entry appended");
    assert_eq!(
        h[1].created_by().as_deref(),
        Some("/bin/sh -c apt-get install nginx")
    );
    // The plain manifest carries it too.
    let plain = c.pull_manifest(&dst, "plain").await.unwrap();
    let cfg = c.pull_blob(&dst, &plain.config).await.unwrap();
    let cfg = ImageConfiguration::from_reader(&cfg[..]).unwrap();
    same_runtime_config(&cfg, &original);
    assert_eq!(cfg.rootfs().diff_ids().len(), 1);

    // A standard client (skopeo) sees the original Cmd and Env in the plain export,
    // and copies it.
    let skopeo = std::process::Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{dst}"))
        .output();
    match skopeo {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["config"]["Cmd"][0], "nginx");
            assert_eq!(v["config"]["Env"][1], "NGINX_VERSION=1.25.3");
            assert_eq!(v["config"]["WorkingDir"], "/srv");
            let dir = tempfile::tempdir().unwrap();
            let copy = std::process::Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false"])
                .arg(format!("docker://{dst}"))
                .arg(format!("oci:{}:copy", dir.path().display()))
                .output()
                .unwrap();
            assert!(
                copy.status.success(),
                "skopeo copy: {}",
                String::from_utf8_lossy(&copy.stderr)
            );
        }
        Ok(out) => panic!("skopeo inspect: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            slacker_testkit::skip_or_fail::<()>(format!("skopeo is not installed: {e}"));
        }
    }
}

async fn nothing_recorded(s: &LayerStore<MemBackend>, b: &MemBackend) {
    assert!(s.list().await.is_empty(), "{:?}", s.list().await);
    assert!(b.list_volumes().await.unwrap().is_empty());
    assert!(b.list_snapshots().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_whose_diff_ids_disagree_with_the_layers_records_nothing() {
    let Some(addr) = registry() else { return };
    let src = image(&addr, "lying-config", "v1");
    let c = client();
    let mut layers = two_layers();
    // The second layer claims the first layer's diff_id.
    layers[1].diff_id = layers[0].diff_id.clone();
    c.push_layers(&src, layers, None).await.unwrap();
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "lie").await;
    let err = c.pull_image(&s, &src).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    nothing_recorded(&s, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_records_nothing() {
    // Its own registry: the test tampers with the registry's storage.
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(e) => {
            slacker_testkit::skip_or_fail::<()>(format!("no docker-registry: {e}"));
            return;
        }
    };
    let src = format!("{}/slacker-test/tampered:v1", reg.addr());
    let c = client();
    let layers = two_layers();
    let pushed = c.push_layers(&src, layers, None).await.unwrap();
    let victim = &pushed.blobs[1].digest;
    let hex = victim.trim_start_matches("sha256:");
    let data = reg
        .dir()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n - 9] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "tamper").await;
    let err = c.pull_image(&s, &src).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    nothing_recorded(&s, &b).await;
}

/// A TCP proxy to `upstream` that passes `budget` bytes of responses, then cuts every
/// connection and stops listening: a registry that goes down mid-pull.
fn dying_proxy(upstream: String, budget: u64) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let sent = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(client) = conn else { break };
            if sent.load(Ordering::SeqCst) >= budget {
                break; // down: the listener is dropped
            }
            let Ok(server) = TcpStream::connect(&upstream) else {
                break;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            let sent = sent.clone();
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let mut buf = [0u8; 8192];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                    if total > budget {
                        let keep = n.saturating_sub((total - budget) as usize);
                        let _ = client.write_all(&buf[..keep]);
                        break;
                    }
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_goes_down_mid_pull_records_nothing() {
    let Some(addr) = registry() else { return };
    let repo = format!("slacker-test/dying-{}:v1", std::process::id());
    let c = client();
    // A 4 MiB incompressible second layer: the proxy dies inside it.
    let big = content(4 << 20, 7);
    let layers = vec![
        PushLayer::tar_gzip(&tar_of(&[("etc/hostname", b"base\n")]), 6),
        PushLayer::tar(tar_of(&[("big.bin", &big)])),
    ];
    c.push_layers(&format!("{addr}/{repo}"), layers, None)
        .await
        .unwrap();
    let proxy = dying_proxy(addr.clone(), 1 << 20);
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "dying").await;
    let err = client()
        .pull_image(&s, &format!("{proxy}/{repo}"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Backend | ErrorKind::Integrity),
        "{err}"
    );
    nothing_recorded(&s, &b).await;
}

/// Bytes the store's backend has been asked to read so far.
fn read_so_far(s: &LayerStore<Counting<MemBackend>>) -> u64 {
    s.backend().counts().bytes_read()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_the_same_image_again_reuses_its_plain_export() {
    if !e2fsprogs() {
        return;
    }
    // Its own registry: the test removes a blob from the registry's storage.
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(e) => {
            slacker_testkit::skip_or_fail::<()>(format!("no docker-registry: {e}"));
            return;
        }
    };
    let c = client();
    let src = format!("{}/slacker-test/reuse-src:v1", reg.addr());
    c.push_layers(&src, two_layers(), Some(&original_config()))
        .await
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(d.path()).unwrap());
    let s = LayerStore::open(
        Counting::new(MemBackend::new()),
        meta,
        LayerStoreOptions::new("reuse").with_volume_size(32 << 20),
    )
    .await
    .unwrap();
    let pulled = c.pull_image(&s, &src).await.unwrap();
    let dst = format!("{}/slacker-test/reuse-dst:v1", reg.addr());
    let opts = PushOptions::default()
        .with_plain_export(true)
        .with_config(pulled.config.clone());

    // First push: the volume is exported (read from the backend) and uploaded.
    let r0 = read_so_far(&s);
    let first = c
        .push_image(&s, &pulled.top_layer, &dst, &opts)
        .await
        .unwrap();
    let r1 = read_so_far(&s);
    assert!(!first.plain_export_reused);
    assert!(r1 > r0, "the first push exports the volume");
    assert!(first.layer_bytes_uploaded() > 0);

    // Again: the plain export is reused; the volume is not read, nothing is uploaded.
    let second = c
        .push_image(&s, &pulled.top_layer, &dst, &opts)
        .await
        .unwrap();
    assert!(second.plain_export_reused, "{second:?}");
    assert_eq!(read_so_far(&s), r1, "no export work the second time");
    assert!(second.blobs.iter().all(|b| !b.transferred), "{second:?}");
    assert_eq!(second.index_digest, first.index_digest);
    assert_eq!(second.plain_manifest_digest, first.plain_manifest_digest);
    assert_eq!(second.plain_export_lossless, first.plain_export_lossless);
    let plain = c.pull_manifest(&dst, "plain").await.unwrap();
    assert_eq!(Some(&plain.digest), first.plain_manifest_digest.as_ref());

    // The registry lost the plain layer: it is exported and uploaded again, not trusted.
    let hex = plain.layers[0].digest().to_string();
    let hex = hex.trim_start_matches("sha256:").to_owned();
    std::fs::remove_dir_all(
        reg.dir()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(&hex),
    )
    .unwrap();
    let third = c
        .push_image(&s, &pulled.top_layer, &dst, &opts)
        .await
        .unwrap();
    assert!(!third.plain_export_reused, "{third:?}");
    assert!(read_so_far(&s) > r1, "exported again");
    assert!(third.layer_bytes_uploaded() > 0);
    let got = c.pull_manifest(&dst, "plain").await.unwrap();
    c.pull_blob(&dst, &got.layers[0]).await.unwrap();

    // Another image under the same tag (a layer on top): exported, not reused.
    s.create("extra", Some(&pulled.top_layer)).await.unwrap();
    s.put("extra").await.unwrap();
    let r3 = read_so_far(&s);
    let other = c.push_image(&s, "extra", &dst, &opts).await.unwrap();
    assert!(!other.plain_export_reused, "{other:?}");
    assert_ne!(other.manifest_digest, first.manifest_digest);
    assert!(read_so_far(&s) > r3);
}
