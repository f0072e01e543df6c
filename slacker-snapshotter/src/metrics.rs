//! Prometheus text metrics on a small HTTP endpoint (`GET /metrics`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::SlackerSnapshotter;

/// The metrics in Prometheus text exposition format.
pub async fn render(s: &SlackerSnapshotter) -> String {
    let c = s.counters();
    let d = s.data_metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    metric(
        "slacker_snapshotter_snapshots",
        "gauge",
        "Snapshots (active, view, committed).",
        s.snapshot_count().await as u64,
    );
    metric(
        "slacker_snapshotter_clones_total",
        "counter",
        "Storage clones made.",
        c.clones.load(Ordering::Relaxed),
    );
    metric(
        "slacker_snapshotter_lazy_commits_total",
        "counter",
        "Layers committed from a slacker reference, without copying data.",
        c.lazy_commits.load(Ordering::Relaxed),
    );
    metric(
        "slacker_snapshotter_layers_merged_total",
        "counter",
        "Standard layers merged into a volume.",
        c.layers_merged.load(Ordering::Relaxed),
    );
    metric(
        "slacker_snapshotter_remote_snapshots_total",
        "counter",
        "Layers fetched by the snapshotter from CRI's remote-snapshot labels.",
        c.remote_snapshots.load(Ordering::Relaxed),
    );
    metric(
        "slacker_snapshotter_frozen_commits_total",
        "counter",
        "Commits that found a filesystem still alive on the volume (mounted elsewhere or unmounted lazily) and froze it for the snapshot.",
        c.frozen_commits.load(Ordering::Relaxed),
    );
    metric(
        "slacker_snapshotter_lazy_fetched_bytes_total",
        "counter",
        "Bytes fetched lazily from the storage by served volumes.",
        d.fetched_bytes,
    );
    metric(
        "slacker_snapshotter_cache_hits_total",
        "counter",
        "Block-cache hits of served volumes.",
        d.cache_hits,
    );
    out
}

/// Serves [`render`] on `addr` forever (one small request per connection).
///
/// # Errors
/// IO errors binding the address.
pub async fn serve(s: SlackerSnapshotter, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let s = s.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let resp = if req.starts_with("GET /metrics") {
                let body = render(&s).await;
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
            };
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
