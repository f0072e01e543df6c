//! The fair link (`slacker_hellobench::fairlink`): bytes cross it intact both ways, its
//! accounting matches what crossed, connections close cleanly, and a real registry works
//! through it (push and pull of a blob with oci-client, as every HelloBench path does).
//!
//! No timing assertions: the link's achieved throughput against its profile is shown in the
//! benchmark's report, never tested. The registry test needs `docker-registry`; without it
//! it prints `SKIPPED` (under `CI=true` it fails instead).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use slacker_core::worker::LinkProfile;
use slacker_hellobench::fairlink::{FairLink, LinkStats};
use slacker_testkit::checks::noise;

/// An upstream that, per connection, reads the request to EOF, then answers with
/// `noise(reply_len(request), seed-of-request)` and closes. Returns what it received.
fn upstream() -> (String, thread::JoinHandle<Vec<Vec<u8>>>, usize) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    const CONNS: usize = 4;
    let h = thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = l.accept().unwrap();
            handlers.push(thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                // The reply's length and seed come from the request's first byte.
                let n = got.first().copied().unwrap_or(0) as usize;
                s.write_all(&noise((n + 1) * 300_000, n as u64)).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                got
            }));
        }
        handlers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (addr, h, CONNS)
}

fn exchange_through(profile: Option<LinkProfile>) {
    let (up, server, conns) = upstream();
    let link = FairLink::start(&up, profile).unwrap();
    assert_ne!(link.addr(), up);
    let before = link.stats();
    // Concurrent connections share the link's clocks.
    let clients: Vec<_> = (0..conns)
        .map(|i| {
            let addr = link.addr().to_owned();
            thread::spawn(move || {
                let mut req = noise(1_000_000 + i * 123_457, 100 + i as u64);
                req[0] = i as u8;
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(&req).unwrap();
                s.shutdown(Shutdown::Write).unwrap(); // the half-close crosses the link
                let mut reply = Vec::new();
                s.read_to_end(&mut reply).unwrap();
                assert_eq!(
                    reply,
                    noise((i + 1) * 300_000, i as u64),
                    "connection {i}: the reply arrived altered"
                );
                (req, reply.len())
            })
        })
        .collect();
    let sent: Vec<(Vec<u8>, usize)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut received = server.join().unwrap();
    received.sort_by_key(|r| r[0]);
    for (i, (req, _)) in sent.iter().enumerate() {
        assert!(
            received[i] == *req,
            "connection {i}: the request arrived altered ({} of {} bytes)",
            received[i].len(),
            req.len()
        );
    }
    // Every reply was read to EOF, and the proxy forwards EOF only after counting the
    // bytes before it: the counters are final.
    let got = link.stats().since(&before);
    assert_eq!(
        got,
        LinkStats {
            up_bytes: sent.iter().map(|(r, _)| r.len() as u64).sum(),
            down_bytes: sent.iter().map(|(_, n)| *n as u64).sum(),
            connections: conns as u64,
        }
    );
}

#[test]
fn bytes_cross_an_emulated_link_intact_both_ways_and_are_counted() {
    // A fast link so the test is quick: 1 ms per round trip, 2 Gbit/s.
    exchange_through(Some(LinkProfile::new(
        Duration::from_millis(1),
        2_000_000_000,
    )));
}

#[test]
fn bytes_cross_a_pass_through_link_intact_and_are_counted() {
    exchange_through(None);
}

#[test]
fn a_dead_upstream_closes_the_client_and_a_dropped_link_cuts_open_connections() {
    // Upstream gone: the client's connection is closed, not left hanging.
    let gone = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = gone.local_addr().unwrap().to_string();
    drop(gone);
    let link = FairLink::start(&addr, None).unwrap();
    let mut s = TcpStream::connect(link.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(link.stats().connections, 0);
    drop(link);

    // An idle keep-alive connection is cut when the link is dropped.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap().to_string();
    let link = FairLink::start(
        &up,
        Some(LinkProfile::latency_only(Duration::from_millis(1))),
    )
    .unwrap();
    let mut c = TcpStream::connect(link.addr()).unwrap();
    let (mut srv, _) = l.accept().unwrap();
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    srv.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop(link);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
}

fn registry_missing() -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(std::path::PathBuf::from))
        .any(|d| d.join("docker-registry").is_file());
    (!found).then(|| "docker-registry is missing (apt-get install -y docker-registry)".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_registry_pushes_and_pulls_through_the_link() {
    if let Some(why) = registry_missing() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true: {why}");
        }
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile_dir();
    let registry = tokio::task::spawn_blocking({
        let d = dir.join("registry");
        move || slacker_hellobench::registry::Registry::start(&d)
    })
    .await
    .unwrap()
    .unwrap();
    let link = FairLink::start(
        registry.addr(),
        Some(LinkProfile::new(Duration::from_micros(200), 1_000_000_000)),
    )
    .unwrap();
    use oci_client::client::{ClientConfig, ClientProtocol};
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: true,
        ..Default::default()
    });
    let blob = noise(3 << 20, 7);
    let digest =
        oci_client::client::ImageLayer::new(blob.clone(), "x".into(), None).sha256_digest();
    let reference: oci_client::Reference = format!("{}/fairlink/test:latest", link.addr())
        .parse()
        .unwrap();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    client
        .auth(&reference, &auth, oci_client::RegistryOperation::Push)
        .await
        .unwrap();
    client
        .push_blob(&reference, blob.clone(), &digest)
        .await
        .unwrap();
    let after_push = link.stats();
    assert!(
        after_push.up_bytes >= blob.len() as u64,
        "the upload crossed the link: {after_push:?}"
    );
    let mut out = Vec::new();
    client
        .pull_blob(&reference, digest.as_str(), &mut out)
        .await
        .unwrap();
    assert!(out == blob, "the blob came back altered");
    let pulled = link.stats().since(&after_push);
    assert!(
        pulled.down_bytes >= blob.len() as u64,
        "the download crossed the link: {pulled:?}"
    );
    drop(link);
    drop(registry);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hellobench-fairlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
