//! `RegistryClient::deploy` against a real registry (Debian's distribution 2.8: traces are
//! found through the fallback tag): an image without a trace deploys as before, a trace
//! is fetched with the pull and prefetched within its bounds with blind read-ahead off,
//! and a bad trace is ignored without failing the deploy.

mod support;

use std::path::Path;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::worker::{BlockCache, Counting};
use slacker_core::{Backend, BlockRange, BlockSize, LayerStore, LayerStoreOptions};
use slacker_oci::deploy::{DeployOptions, Deployment, TraceOutcome};
use slacker_oci::referrers::StartupTrace;
use slacker_oci::{ClientOptions, PushOptions, RegistryClient};
use support::*;

const VOLUME: u64 = 4 << 20;
const BLOCKS: u32 = (VOLUME / 4096) as u32;
const BS: u64 = 4096;

async fn store(b: &MemBackend, dir: &Path, name: &str) -> LayerStore<MemBackend> {
    let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(dir).unwrap());
    let opts = LayerStoreOptions::new(name).with_volume_size(VOLUME);
    LayerStore::open(b.reopen(), meta, opts).await.unwrap()
}

/// Pushes an image whose 4 MiB volume holds `content(VOLUME, seed)`; returns its
/// reference and the content.
async fn pushed_image(
    b: &MemBackend,
    dir: &Path,
    addr: &str,
    test: &str,
    seed: u64,
) -> (String, Vec<u8>) {
    let s = store(b, dir, "push").await;
    let v = s.create("img", None).await.unwrap();
    let data = content(VOLUME as usize, seed);
    b.write_at(&v, 0, &data).await.unwrap();
    let image = image(addr, test, "v1");
    RegistryClient::new(ClientOptions::plain_http())
        .push_image(&s, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    (image, data)
}

/// A fresh worker: its own layer store on the same storage, a counted data path and an
/// empty cache.
struct Worker {
    store: LayerStore<MemBackend>,
    data: Arc<Counting<MemBackend>>,
    cache: Arc<BlockCache>,
    _dir: tempfile::TempDir,
}

async fn worker(b: &MemBackend, name: &str) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    Worker {
        store: store(b, dir.path(), name).await,
        data: Arc::new(Counting::new(b.reopen())),
        cache: Arc::new(BlockCache::new(64 << 20)),
        _dir: dir,
    }
}

impl Worker {
    /// Deploys `image` from `c` onto this worker, as a runtime would.
    async fn deploy(&self, c: &RegistryClient, image: &str, opts: &DeployOptions) -> Deployment {
        c.deploy(
            &self.store,
            self.data.clone(),
            self.cache.clone(),
            image,
            opts,
        )
        .await
        .unwrap()
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(ClientOptions::plain_http())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_a_trace_deploys_as_before() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, data) = pushed_image(&b, d.path(), &addr, "deploy-plain", 1).await;
    let w = worker(&b, "w").await;
    let dep = w.deploy(&client(), &image, &DeployOptions::default()).await;
    assert_eq!(dep.trace, TraceOutcome::Absent);
    assert!(dep.prefetch.is_none());
    assert!(
        dep.verifier.is_some(),
        "a pushed layer carries a Merkle root"
    );
    assert_eq!(dep.volume.size(), VOLUME);
    let got = dep.volume.read_at(8192, 100).await.unwrap();
    assert_eq!(&got[..], &data[8192..8292]);
    // Read-ahead as without traces: the miss fetched its neighbours too.
    let m = dep.volume.metrics();
    assert!(m.read_ahead_blocks > 0, "{m:?}");
    assert_eq!(dep.verifier.unwrap().stats().blocks, m.fetched_blocks);
}

/// The blocks a "container" reads: scattered single blocks, plus one run.
fn container_reads() -> Vec<BlockRange> {
    let mut r: Vec<BlockRange> = (0..20)
        .map(|i| BlockRange::new(i * 37, i * 37 + 1))
        .collect();
    r.push(BlockRange::new(800, 832));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_is_fetched_with_the_pull_prefetched_and_replaces_read_ahead() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, data) = pushed_image(&b, d.path(), &addr, "deploy-trace", 2).await;
    let c = client();
    let trace = StartupTrace::new(BlockSize::DEFAULT, BLOCKS, container_reads());
    c.push_trace(&image, &trace).await.unwrap();
    let traced_bytes = trace.bytes();
    assert_eq!(traced_bytes, (20 + 32) * BS);

    // With the trace and its defaults: prefetched, read-ahead off.
    let w = worker(&b, "wt").await;
    let mut dep = w.deploy(&c, &image, &DeployOptions::default()).await;
    match &dep.trace {
        TraceOutcome::Used {
            trace_bytes,
            prefetch_bytes,
            ..
        } => {
            assert_eq!(*trace_bytes, traced_bytes);
            assert_eq!(*prefetch_bytes, traced_bytes);
        }
        other => panic!("trace not used: {other:?}"),
    }
    let report = dep.prefetch.take().unwrap().await.unwrap().unwrap();
    assert_eq!(report.blocks_fetched, 52);
    // The container's reads hit the cache; one read the trace did not foresee fetches
    // exactly its block (no blind read-ahead).
    for r in container_reads() {
        let off = u64::from(r.start) * BS;
        let got = dep
            .volume
            .read_at(off, (r.len() * BS) as usize)
            .await
            .unwrap();
        assert_eq!(&got[..], &data[off as usize..(off + r.len() * BS) as usize]);
    }
    let m = dep.volume.metrics();
    assert_eq!(m.cache_misses, 0, "{m:?}");
    let off = 900 * BS;
    let got = dep.volume.read_at(off, 4096).await.unwrap();
    assert_eq!(&got[..], &data[off as usize..off as usize + 4096]);
    let m = dep.volume.metrics();
    assert_eq!(m.read_ahead_blocks, 0, "{m:?}");
    assert_eq!(m.fetched_bytes, traced_bytes + BS, "{m:?}");
    let with_trace = w.data.counts().bytes_read();

    // The same trace with blind read-ahead kept on: more bytes for the same reads.
    let w2 = worker(&b, "wr").await;
    let mut dep2 = w2
        .deploy(
            &c,
            &image,
            &DeployOptions::default().with_read_ahead_with_trace(true),
        )
        .await;
    dep2.prefetch.take().unwrap().await.unwrap().unwrap();
    for r in container_reads() {
        let off = u64::from(r.start) * BS;
        dep2.volume
            .read_at(off, (r.len() * BS) as usize)
            .await
            .unwrap();
    }
    dep2.volume.read_at(900 * BS, 4096).await.unwrap();
    let with_read_ahead = w2.data.counts().bytes_read();
    assert!(
        with_trace < with_read_ahead,
        "trace without read-ahead fetched {with_trace} B, with read-ahead {with_read_ahead} B"
    );
    assert!(dep2.volume.metrics().read_ahead_blocks > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_stays_within_its_byte_bound() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, _) = pushed_image(&b, d.path(), &addr, "deploy-bound", 3).await;
    let c = client();
    let trace = StartupTrace::new(BlockSize::DEFAULT, BLOCKS, [BlockRange::new(0, 512)]);
    c.push_trace(&image, &trace).await.unwrap();
    let w = worker(&b, "wb").await;
    let opts = DeployOptions::default()
        .with_prefetch_bytes(40 * BS)
        .with_prefetch_parallelism(2);
    let mut dep = w.deploy(&c, &image, &opts).await;
    assert!(
        matches!(dep.trace, TraceOutcome::Used { prefetch_bytes, .. } if prefetch_bytes == 40 * BS),
        "{:?}",
        dep.trace
    );
    let report = dep.prefetch.take().unwrap().await.unwrap().unwrap();
    assert_eq!(report.blocks_fetched, 40);
    assert_eq!(dep.volume.metrics().fetched_blocks, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_for_another_volume_or_a_malformed_one_is_ignored() {
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, data) = pushed_image(&b, d.path(), &addr, "deploy-bad", 4).await;
    let c = client();

    // Recorded on a volume of another size: ignored, deploy as without.
    let foreign = StartupTrace::new(BlockSize::DEFAULT, BLOCKS * 2, [BlockRange::new(0, 8)]);
    c.push_trace(&image, &foreign).await.unwrap();
    let w = worker(&b, "wf").await;
    let dep = w.deploy(&c, &image, &DeployOptions::default()).await;
    assert!(
        matches!(&dep.trace, TraceOutcome::Ignored(why) if why.contains("blocks")),
        "{:?}",
        dep.trace
    );
    assert!(dep.prefetch.is_none());
    assert_eq!(&dep.volume.read_at(0, 10).await.unwrap()[..], &data[..10]);
    assert!(
        dep.volume.metrics().read_ahead_blocks > 0,
        "read-ahead stays on"
    );

    // A malformed trace blob (pushed by hand: push_trace only writes good ones): the
    // fetch fails to decode, the deploy goes on.
    let manifest = c.pull_manifest(&image, "reference").await.unwrap();
    push_raw_trace(
        &addr,
        &image,
        &manifest.digest,
        b"{\"version\":1,\"oops\":true}",
    );
    let w = worker(&b, "wm").await;
    let dep = w.deploy(&c, &image, &DeployOptions::default()).await;
    assert!(
        matches!(&dep.trace, TraceOutcome::Ignored(why) if why.contains("startup trace")),
        "{:?}",
        dep.trace
    );
    assert!(dep.prefetch.is_none());
    assert_eq!(&dep.volume.read_at(0, 10).await.unwrap()[..], &data[..10]);

    // Not asked: the registry is not even asked for referrers.
    let w = worker(&b, "wn").await;
    let dep = w
        .deploy(&c, &image, &DeployOptions::default().with_trace(false))
        .await;
    assert_eq!(dep.trace, TraceOutcome::NotAsked);
}

/// Uploads `blob` as a trace artifact of `subject` and makes the fallback tag list only
/// it, with curl (as a foreign client would).
fn push_raw_trace(addr: &str, image: &str, subject: &str, blob: &[u8]) {
    use slacker_oci::referrers::{EMPTY_MEDIA_TYPE, TRACE_ARTIFACT_TYPE, TRACE_MEDIA_TYPE};
    let (host_repo, _) = image.rsplit_once(':').unwrap();
    let repo = host_repo.split_once('/').unwrap().1;
    let put_blob = |data: &[u8]| -> String {
        let digest = slacker_oci::sha256_digest(data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        let out = std::process::Command::new("curl")
            .args([
                "-fsS",
                "-X",
                "POST",
                "-o",
                "/dev/null",
                "-w",
                "%header{location}",
                &format!("http://{addr}/v2/{repo}/blobs/uploads/"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let loc = String::from_utf8(out.stdout).unwrap();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let url = if loc.starts_with("http") {
            loc.clone()
        } else {
            format!("http://{addr}{loc}")
        };
        let out = std::process::Command::new("curl")
            .args([
                "-fsS",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &format!("@{}", f.path().display()),
                &format!("{url}{sep}digest={digest}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        digest
    };
    let put_manifest = |reference: &str, media_type: &str, body: &[u8]| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), body).unwrap();
        let out = std::process::Command::new("curl")
            .args([
                "-fsS",
                "-X",
                "PUT",
                "-H",
                &format!("Content-Type: {media_type}"),
                "--data-binary",
                &format!("@{}", f.path().display()),
                &format!("http://{addr}/v2/{repo}/manifests/{reference}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let cfg = put_blob(b"{}");
    let layer = put_blob(blob);
    let subject_size = {
        let out = std::process::Command::new("curl")
            .args([
                "-fsS",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://{addr}/v2/{repo}/manifests/{subject}"),
            ])
            .output()
            .unwrap();
        out.stdout.len()
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": TRACE_ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": cfg, "size": 2},
        "layers": [{"mediaType": TRACE_MEDIA_TYPE, "digest": layer, "size": blob.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_size},
    }))
    .unwrap();
    let digest = slacker_oci::sha256_digest(&manifest);
    put_manifest(
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(), "artifactType": TRACE_ARTIFACT_TYPE}],
    }))
    .unwrap();
    put_manifest(
        &subject.replacen(':', "-", 1),
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
}

/// A TCP proxy to `upstream` counting connections and `GET` requests (HTTP/1.1: the
/// requests of a connection follow each other; GETs have no body).
fn counting_proxy(
    upstream: String,
) -> (
    String,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    let (addr, conns, gets, _) = counting_proxy_with_probes(upstream);
    (addr, conns, gets)
}

/// [`counting_proxy`], also counting the `GET /v2/` probes alone.
fn counting_proxy_with_probes(
    upstream: String,
) -> (
    String,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (conns, gets) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let probes = Arc::new(AtomicU64::new(0));
    let (c2, g2, p2) = (conns.clone(), gets.clone(), probes.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(client) = conn else { break };
            let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                break;
            };
            c2.fetch_add(1, Ordering::SeqCst);
            let (mut cr, mut sw) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (g, p) = (g2.clone(), p2.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                // Each pattern keeps one byte less than itself of the previous read, so
                // a match split across reads counts once and none counts twice.
                let (mut tail, mut ptail): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
                loop {
                    let n = match cr.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    tail.extend_from_slice(&buf[..n]);
                    ptail.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&tail);
                    let found = text.matches("GET /v2/").count() as u64;
                    g.fetch_add(found, Ordering::SeqCst);
                    let probed = String::from_utf8_lossy(&ptail)
                        .matches("GET /v2/ HTTP")
                        .count() as u64;
                    p.fetch_add(probed, Ordering::SeqCst);
                    let keep = tail.len().min(7);
                    tail = tail[tail.len() - keep..].to_vec();
                    let keep = ptail.len().min(12);
                    ptail = ptail[ptail.len() - keep..].to_vec();
                    if sw.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown(std::net::Shutdown::Write);
            });
            let (mut sr, mut cw) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut sr, &mut cw);
                let _ = cw.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, conns, gets, probes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_asks_whether_the_registry_wants_authentication_once() {
    use std::sync::atomic::Ordering;
    let Some(addr) = registry() else { return };
    let (proxy, _, _, probes) = counting_proxy_with_probes(addr.clone());
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "push").await;
    let c = client();
    for i in 0..3u64 {
        let layer = format!("img{i}");
        let v = s.create(&layer, None).await.unwrap();
        b.write_at(&v, 0, &content(64 << 10, 40 + i)).await.unwrap();
        let image = image(&proxy, "push-probes", &format!("v{i}"));
        let pushed = c
            .push_image(&s, &layer, &image, &PushOptions::default())
            .await
            .unwrap();
        assert!(pushed.blobs.iter().all(|t| t.transferred), "new blobs");
        // The image is whole: a worker pulls it directly from the registry.
        let w = worker(&b, &format!("p{i}")).await;
        client()
            .pull_image(&w.store, &image.replacen(&proxy, &addr, 1))
            .await
            .unwrap();
    }
    // oci-client asked before every HEAD, POST and PUT (about 7 times per push).
    assert_eq!(
        probes.load(Ordering::SeqCst),
        1,
        "GET /v2/ probes for 3 pushes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_asks_each_document_once_over_kept_connections() {
    use std::sync::atomic::Ordering;
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, _) = pushed_image(&b, d.path(), &addr, "deploy-requests", 5).await;
    let (proxy, conns, gets) = counting_proxy(addr.clone());
    let via = image.replacen(&addr, &proxy, 1);
    let c = client();
    // Even the first pull of a client is one request: no `GET /v2/` probe (the
    // manifest GET's answer tells that the registry wants no authentication), and the
    // manifest embeds the config and the reference layer.
    let w = worker(&b, "r1").await;
    c.pull_image(&w.store, &via).await.unwrap();
    assert_eq!(gets.load(Ordering::SeqCst), 1, "manifest only");
    // Later pulls: one request each, on a connection kept open. Without kept
    // connections every request opens its own.
    for i in 0..3 {
        let w = worker(&b, &format!("r{}", i + 2)).await;
        c.pull_image(&w.store, &via).await.unwrap();
    }
    assert_eq!(gets.load(Ordering::SeqCst), 1 + 3);
    let n = conns.load(Ordering::SeqCst);
    assert!(n <= 2, "{n} connections for 4 requests");

    // An image whose manifest embeds nothing (pushed by another tool): one request per
    // document, the config and the reference layer at once, so one or two connections
    // per pull; a pooled connection handed back a moment late (a loaded machine) can
    // cost one more.
    let s = store(&b, d.path(), "push").await;
    let plain = image.replace(":v1", ":v2");
    c.push_image(
        &s,
        "img",
        &plain,
        &PushOptions::default().with_inline_max_bytes(0),
    )
    .await
    .unwrap();
    let via = plain.replacen(&addr, &proxy, 1);
    let (g0, c0) = (gets.load(Ordering::SeqCst), conns.load(Ordering::SeqCst));
    for i in 0..3 {
        let w = worker(&b, &format!("s{}", i + 2)).await;
        c.pull_image(&w.store, &via).await.unwrap();
    }
    assert_eq!(
        gets.load(Ordering::SeqCst) - g0,
        3 * 3,
        "manifest, config, reference"
    );
    let n = conns.load(Ordering::SeqCst) - c0;
    assert!(n <= 3, "{n} new connections for 9 requests");
}

/// htpasswd line for `slacker:s3cret` (bcrypt, cost 4, made with python3's
/// `crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))`).
const HTPASSWD: &str = "slacker:$2b$04$4T1saEXgGFfxi6HgeYcn0OfzAtwGxPb45/8iwbBnMmGSnshLF8imm\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_wants_credentials_is_pulled_from_with_them_only() {
    use slacker_core::ErrorKind;
    use slacker_oci::{Credentials, LocalRegistry};
    // Its own registry: every request needs basic credentials.
    let reg = match LocalRegistry::start_with_htpasswd(HTPASSWD) {
        Ok(r) => r,
        Err(e) => {
            slacker_testkit::skip_or_fail::<()>(format!("no docker-registry: {e}"));
            return;
        }
    };
    let creds = Credentials::Basic {
        username: "slacker".into(),
        password: "s3cret".into(),
    };
    let with = || RegistryClient::new(ClientOptions::plain_http().with_credentials(creds.clone()));
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = store(&b, d.path(), "push").await;
    let v = s.create("img", None).await.unwrap();
    b.write_at(&v, 0, &content(VOLUME as usize, 9))
        .await
        .unwrap();
    let image = format!("{}/slacker-test/auth:v1", reg.addr());
    with()
        .push_image(&s, "img", &image, &PushOptions::default())
        .await
        .unwrap();
    // A new client with the credentials pulls.
    let w = worker(&b, "auth1").await;
    let pulled = with().pull_image(&w.store, &image).await.unwrap();
    assert!(w.store.get(&pulled.top_layer).await.is_ok());
    // Without them, the manifest GET is refused: a clear error, nothing recorded.
    let anon =
        RegistryClient::new(ClientOptions::plain_http().with_credentials(Credentials::Anonymous));
    let w = worker(&b, "auth2").await;
    for _ in 0..2 {
        let err = anon.pull_image(&w.store, &image).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
        let text = err.to_string().to_lowercase();
        assert!(text.contains("not authorized"), "{err}");
    }
    assert!(w.store.get(&pulled.top_layer).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_with_its_trace_asks_the_registry_three_times() {
    use std::sync::atomic::Ordering;
    let Some(addr) = registry() else { return };
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let (image, _) = pushed_image(&b, d.path(), &addr, "deploy-trace-requests", 6).await;
    let trace = StartupTrace::new(BlockSize::DEFAULT, BLOCKS, container_reads());
    client().push_trace(&image, &trace).await.unwrap();
    let (proxy, _, gets) = counting_proxy(addr.clone());
    let via = image.replacen(&addr, &proxy, 1);
    // A new client: the manifest (config and reference layer embedded), then at once
    // the referrers API (distribution 2.8: 404) and the fallback index, which embeds
    // the trace's artifact manifest, which embeds the trace.
    let w = worker(&b, "t1").await;
    let pulled = client()
        .pull_with_trace(&w.store, &via, &DeployOptions::default())
        .await
        .unwrap();
    assert_eq!(pulled.trace.as_ref().map(|t| &t.trace), Some(&trace));
    assert_eq!(
        gets.load(Ordering::SeqCst),
        3,
        "manifest, referrers, fallback index"
    );
}
