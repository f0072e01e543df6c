//! The fair link: the registry's traffic crosses the same emulated link as the storage's.
//!
//! Slacker's lazy paths read their storage through `Throttled` (a [`LinkProfile`]: latency
//! per request, bandwidth shared by concurrent requests). Without this module the registry
//! sat on loopback, unthrottled, which favoured the tar+gzip baseline (its pull is one big
//! registry download). [`FairLink`] is a small TCP proxy in front of the registry that
//! applies the same profile to every byte, for every path.
//!
//! ```text
//!  path (oci-client, containerd, ...) ──▶ FairLink::addr() ──[ LinkProfile ]──▶ registry
//! ```
//!
//! # Use
//!
//! ```no_run
//! # use std::time::Duration;
//! # use slacker_core::worker::LinkProfile;
//! # use slacker_hellobench::fairlink::FairLink;
//! # fn f(registry_addr: &str) -> slacker_hellobench::error::Result<()> {
//! let link = FairLink::start(registry_addr, Some(LinkProfile::new(Duration::from_micros(200), 1_000_000_000)))?;
//! let addr: &str = link.addr(); // the registry address every path must use (host:port)
//! # let _ = addr; Ok(()) }
//! ```
//!
//! The proxy is transparent at the TCP level (plain HTTP to `docker-registry`), so a client
//! only needs the address: `Host` headers and the registry's upload `Location`s name the
//! proxy, and every later request comes back through it. Dropping the value stops it.
//!
//! # What it emulates
//!
//! - **Latency**: every byte is delivered `latency / 2` after it was read, in each direction,
//!   so a request and its response cost one `latency`, like one `Throttled` call. A new
//!   connection costs one more `latency` before its first byte reaches the registry (the TCP
//!   handshake of a real network).
//! - **Bandwidth**: one virtual clock **per direction** (full duplex, as an Ethernet link):
//!   each chunk read reserves `len / bandwidth` on its direction's clock, shared by every
//!   connection, so concurrent transfers share the bandwidth and many small chunks add up to
//!   it exactly. Per direction rather than per link because request headers and TCP-level
//!   replies must not queue behind a download on a real full-duplex NIC; HelloBench's push
//!   (upstream) and pull (downstream) never overlap, so a single clock would give the same
//!   figures. The registry's clocks are its own: not the storage `Throttled`'s (that one is
//!   private to the worker's backend, and the registry is a different server; pull and run,
//!   the only phases that use both, happen one after the other).
//! - Delays are slept by the proxy's own threads (`std::thread::sleep`, precise to tens of
//!   µs), not tokio timers (1 ms resolution), so a 200 µs link costs 200 µs per request.
//!
//! The proxy counts the bytes it delivered each way ([`LinkStats`]); HelloBench reports them
//! next to the achieved throughput of the baseline's downloads.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slacker_core::worker::LinkProfile;

use crate::error::{Context, Result};

/// Largest chunk read (and delivered) at once: 64 KiB is 0.5 ms at 1 Gbit/s.
const CHUNK: usize = 64 << 10;
/// Chunks in flight per direction of a connection before the reader stops reading (then TCP
/// pushes back on the sender): 4 MiB.
const QUEUE: usize = 64;

/// Bytes the link delivered, per direction, and connections accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Client → registry (push uploads, requests).
    pub up_bytes: u64,
    /// Registry → client (pull downloads, responses).
    pub down_bytes: u64,
    /// TCP connections accepted.
    pub connections: u64,
}

impl LinkStats {
    /// What crossed the link between `earlier` and `self`.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            up_bytes: self.up_bytes.saturating_sub(earlier.up_bytes),
            down_bytes: self.down_bytes.saturating_sub(earlier.down_bytes),
            connections: self.connections.saturating_sub(earlier.connections),
        }
    }
}

/// What a run records about its fair link (in `results.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FairLinkReport {
    /// Latency per request/response, µs (0: none).
    pub latency_us: u64,
    /// Bandwidth, bytes per second (`None`: unlimited).
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// What crossed it during the run.
    pub stats: LinkStats,
}

/// One direction of the link: its virtual clock and its delivered-bytes counter.
#[derive(Debug, Default)]
struct Direction {
    free_at: Mutex<Option<Instant>>,
    bytes: AtomicU64,
}

impl Direction {
    /// Reserve the link for `bytes` starting no earlier than `not_before`; returns when the
    /// last byte has left (before propagation).
    fn reserve(&self, profile: Option<&LinkProfile>, bytes: u64, not_before: Instant) -> Instant {
        let xfer = profile.map_or(Duration::ZERO, |p| p.transfer_time(bytes));
        if xfer.is_zero() {
            return not_before;
        }
        let mut free = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
        let start = free.map_or(not_before, |f| f.max(not_before));
        let end = start + xfer;
        *free = Some(end);
        end
    }
}

#[derive(Debug)]
struct Shared {
    profile: Option<LinkProfile>,
    up: Direction,
    down: Direction,
    connections: AtomicU64,
    stop: AtomicBool,
    /// Both sockets of each open connection, to shut them down when the link stops.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
}

/// A throttling TCP proxy in front of a registry (see the module docs).
#[derive(Debug)]
pub struct FairLink {
    addr: String,
    upstream: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FairLink {
    /// Listen on a free `127.0.0.1` port and forward every connection to `upstream`
    /// (`host:port`) through `profile` (`None`: no delay, only counting).
    ///
    /// # Errors
    /// No port to listen on, or `upstream` is not a socket address.
    pub fn start(upstream: &str, profile: Option<LinkProfile>) -> Result<Self> {
        use std::net::ToSocketAddrs;
        let target = upstream
            .to_socket_addrs()
            .with_context(|| format!("fair link: upstream {upstream:?}"))?
            .next()
            .ok_or_else(|| {
                crate::error::Error::msg(format!("fair link: {upstream:?} has no address"))
            })?;
        let listener = TcpListener::bind("127.0.0.1:0").context("fair link: listening")?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared {
            profile,
            up: Direction::default(),
            down: Direction::default(),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
        });
        let accept = std::thread::Builder::new()
            .name("fairlink-accept".into())
            .spawn({
                let shared = shared.clone();
                move || accept_loop(&listener, target, &shared)
            })
            .context("fair link: spawning the accept thread")?;
        Ok(Self {
            addr,
            upstream: upstream.to_owned(),
            shared,
            accept: Some(accept),
        })
    }

    /// The registry address a path must use (`host:port`), instead of the registry's own.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry behind the link.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The emulated link (`None`: pass-through).
    pub fn profile(&self) -> Option<LinkProfile> {
        self.shared.profile
    }

    /// Bytes delivered so far, each way, and connections accepted.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up_bytes: self.shared.up.bytes.load(Ordering::Relaxed),
            down_bytes: self.shared.down.bytes.load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }

    /// The profile and the bytes moved so far, for `results.json`.
    pub fn report(&self) -> FairLinkReport {
        FairLinkReport {
            latency_us: self
                .shared
                .profile
                .map_or(0, |p| p.latency.as_micros() as u64),
            bandwidth_bytes_per_sec: self.shared.profile.and_then(|p| p.bandwidth_bytes_per_sec),
            stats: self.stats(),
        }
    }

    /// One line for the results' notes.
    pub fn describe(&self) -> String {
        match self.shared.profile {
            Some(p) => format!(
                "fair link: every path reaches the registry ({}) through a TCP proxy on {} with the storage link's profile: {} µs per request/response (half each way, +1 round trip per new connection), {}, one bandwidth clock per direction (full duplex) shared by all connections",
                self.upstream,
                self.addr,
                p.latency.as_micros(),
                p.bandwidth_bytes_per_sec.map_or_else(
                    || "unlimited bandwidth".to_owned(),
                    |b| format!("{} Mbit/s", b * 8 / 1_000_000)
                ),
            ),
            None => format!(
                "fair link off (--link-latency-us 0 --link-mbit 0): the registry ({}) is reached through a counting, non-delaying proxy on {}",
                self.upstream, self.addr
            ),
        }
    }
}

impl Drop for FairLink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, then cut every open connection.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let open = std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|e| e.into_inner()));
        for [a, b] in open.into_values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: &TcpListener, target: std::net::SocketAddr, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let accepted = Instant::now();
        let Ok(server) = TcpStream::connect(target) else {
            // The registry is gone: the client sees the connection close.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        if let Err(e) = connect_pumps(id, client, server, accepted, shared) {
            crate::progress!("fair link: dropping a connection: {e}");
        }
    }
}

/// Start both directions of one connection (four threads: a reader and a writer each way).
fn connect_pumps(
    id: u64,
    client: TcpStream,
    server: TcpStream,
    accepted: Instant,
    shared: &Arc<Shared>,
) -> std::io::Result<()> {
    shared
        .open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, [client.try_clone()?, server.try_clone()?]);
    let handshake = shared.profile.map_or(Duration::ZERO, |p| p.latency);
    let remaining = Arc::new(AtomicU64::new(2));
    // Upstream: the first byte reaches the registry one round trip after connect.
    pump(
        id,
        client.try_clone()?,
        server.try_clone()?,
        Dir::Up,
        accepted + handshake,
        shared.clone(),
        remaining.clone(),
    )?;
    pump(
        id,
        server,
        client,
        Dir::Down,
        accepted,
        shared.clone(),
        remaining,
    )?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn of(self, shared: &Shared) -> &Direction {
        match self {
            Dir::Up => &shared.up,
            Dir::Down => &shared.down,
        }
    }
}

/// A chunk and when it may be delivered; `None` data: end of stream.
type Chunk = (Instant, Option<Vec<u8>>);

fn pump(
    id: u64,
    src: TcpStream,
    dst: TcpStream,
    dir: Dir,
    not_before: Instant,
    shared: Arc<Shared>,
    remaining: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (tx, rx) = sync_channel::<Chunk>(QUEUE);
    let src2 = src.try_clone()?;
    std::thread::Builder::new()
        .name("fairlink-read".into())
        .spawn({
            let shared = shared.clone();
            move || read_side(src, &tx, dir, not_before, &shared)
        })?;
    std::thread::Builder::new()
        .name("fairlink-write".into())
        .spawn(move || {
            write_side(dst, &src2, &rx, dir, &shared);
            if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                shared
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
        })?;
    Ok(())
}

fn read_side(
    mut src: TcpStream,
    tx: &SyncSender<Chunk>,
    dir: Dir,
    not_before: Instant,
    shared: &Shared,
) {
    let one_way = shared.profile.map_or(Duration::ZERO, |p| p.latency / 2);
    let d = dir.of(shared);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let now = Instant::now().max(not_before);
        if n == 0 {
            // End of stream: delivered after what was queued (the FIN travels too).
            let _ = tx.send((now + one_way, None));
            return;
        }
        let sent = d.reserve(shared.profile.as_ref(), n as u64, now);
        if tx.send((sent + one_way, Some(buf[..n].to_vec()))).is_err() {
            return; // the writer gave up (destination closed)
        }
    }
}

fn write_side(
    mut dst: TcpStream,
    src: &TcpStream,
    rx: &Receiver<Chunk>,
    dir: Dir,
    shared: &Shared,
) {
    let d = dir.of(shared);
    while let Ok((at, data)) = rx.recv() {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        match data {
            Some(data) => {
                if dst.write_all(&data).is_err() {
                    // The receiver is gone: stop reading from the sender too.
                    let _ = src.shutdown(Shutdown::Read);
                    let _ = dst.shutdown(Shutdown::Both);
                    return;
                }
                d.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            None => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direction_clock_serialises_concurrent_reservations() {
        let p = LinkProfile::new(Duration::ZERO, 8_000_000); // 1 MB/s
        let d = Direction::default();
        let t0 = Instant::now();
        let a = d.reserve(Some(&p), 1000, t0); // 1 ms
        let b = d.reserve(Some(&p), 1000, t0); // queued behind a
        assert_eq!(a - t0, Duration::from_millis(1));
        assert_eq!(b - t0, Duration::from_millis(2));
        // No bandwidth limit: nothing is reserved.
        assert_eq!(d.reserve(None, 1 << 30, t0), t0);
    }
}
