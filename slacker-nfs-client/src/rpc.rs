//! ONC RPC v2 (RFC 5531) over TCP with record marking, AUTH_SYS credentials.
//!
//! One [`RpcConn`] owns one TCP connection. A writer task sends whole records
//! (so a caller that gives up half-way never leaves a partial record on the
//! wire) and a reader task reassembles reply records and hands each one to
//! the caller waiting for its xid. Many calls can be in flight at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::error::{Error, Result};
use super::xdr::{Decoder, Encoder};

/// NFS program number.
pub const NFS_PROGRAM: u32 = 100_003;
/// NFS version 4.
pub const NFS_V4: u32 = 4;
/// NFSv4 procedure COMPOUND.
pub const PROC_COMPOUND: u32 = 1;

const AUTH_NONE: u32 = 0;
const AUTH_SYS: u32 = 1;
const LAST_FRAGMENT: u32 = 0x8000_0000;
/// Largest reply record accepted (a READ reply is about 1 MiB).
const MAX_RECORD: usize = 64 << 20;

/// AUTH_SYS credentials sent with every call.
#[derive(Debug, Clone)]
pub struct AuthSys {
    /// Client host name (informational).
    pub machine_name: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Default for AuthSys {
    fn default() -> Self {
        Self {
            machine_name: "slacker".to_owned(),
            uid: 0,
            gid: 0,
        }
    }
}

/// Why a call produced no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    /// The connection was closed or broke before the reply arrived.
    Disconnected,
    /// No reply within the timeout (the connection is still up).
    TimedOut,
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Bytes>>>>;

/// One TCP connection to the server.
#[derive(Debug)]
pub struct RpcConn {
    tx: mpsc::UnboundedSender<(Bytes, Bytes)>,
    pending: Pending,
    next_xid: AtomicU32,
    dead: Arc<AtomicBool>,
    auth: AuthSys,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for RpcConn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl RpcConn {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration, auth: AuthSys) -> Result<Self> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    op: "CONNECT",
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(Error::Io {
                    op: "CONNECT",
                    source: io::Error::new(e.kind(), format!("connect to {addr}: {e}")),
                });
            }
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true).map_err(|source| Error::Io {
            op: "CONNECT",
            source,
        })?;
        let (rd, wr) = stream.into_split();
        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(rd, pending.clone(), dead.clone()));
        let writer = tokio::spawn(write_loop(wr, rx, dead.clone()));
        // Start xids at a value that differs between connections, so a late
        // reply from an old connection can never be mistaken for a new one.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
            .unwrap_or(1);
        Ok(Self {
            tx,
            pending,
            next_xid: AtomicU32::new(seed),
            dead,
            auth,
            reader,
            writer,
        })
    }

    /// True once the connection has failed; every later call fails at once.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Starts a call: `args` is the procedure's argument body. Returns the
    /// xid and a receiver for the reply body (the part after the RPC reply
    /// header), or `Disconnected`.
    fn send(
        &self,
        prog: u32,
        vers: u32,
        proc_: u32,
        args: Bytes,
    ) -> Result<(u32, oneshot::Receiver<Bytes>), CallFailure> {
        if self.is_dead() {
            return Err(CallFailure::Disconnected);
        }
        let xid = self.next_xid.fetch_add(1, Ordering::Relaxed);
        let mut e = Encoder::with_capacity(128);
        e.u32(0); // record mark, patched below
        e.u32(xid).u32(0 /* CALL */).u32(2 /* RPC version */);
        e.u32(prog).u32(vers).u32(proc_);
        // credential: AUTH_SYS
        let mut cred = Encoder::with_capacity(64);
        cred.u32(0 /* stamp */)
            .str(&self.auth.machine_name)
            .u32(self.auth.uid)
            .u32(self.auth.gid)
            .u32_array(&[self.auth.gid]);
        let cred = cred.finish();
        e.u32(AUTH_SYS).opaque(&cred);
        // verifier: AUTH_NONE
        e.u32(AUTH_NONE).u32(0);
        let len = u32::try_from(e.len() - 4 + args.len()).map_err(|_| CallFailure::Disconnected)?;
        e.patch_u32(0, len | LAST_FRAGMENT);
        let rec = (e.finish(), args);

        let (rtx, rrx) = oneshot::channel();
        self.pending_map().insert(xid, rtx);
        if self.tx.send(rec).is_err() {
            self.pending_map().remove(&xid);
            return Err(CallFailure::Disconnected);
        }
        // The reader may have failed between the check above and the insert.
        if self.is_dead() {
            self.pending_map().remove(&xid);
            return Err(CallFailure::Disconnected);
        }
        Ok((xid, rrx))
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, oneshot::Sender<Bytes>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes one call and waits up to `timeout` for the reply. Returns the
    /// raw reply record (RPC header included; see [`parse_reply`]).
    pub async fn call(
        &self,
        prog: u32,
        vers: u32,
        proc_: u32,
        args: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallFailure> {
        let (xid, rx) = self.send(prog, vers, proc_, args)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallFailure::Disconnected),
            Err(_) => {
                self.pending_map().remove(&xid);
                Err(CallFailure::TimedOut)
            }
        }
    }
}

async fn write_loop(
    wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Bytes, Bytes)>,
    dead: Arc<AtomicBool>,
) {
    // Small records are coalesced in the buffer; large payloads bypass it.
    let mut wr = tokio::io::BufWriter::with_capacity(64 << 10, wr);
    while let Some(mut rec) = rx.recv().await {
        let ok = loop {
            if wr.write_all(&rec.0).await.is_err() || wr.write_all(&rec.1).await.is_err() {
                break false;
            }
            match rx.try_recv() {
                Ok(next) => rec = next,
                Err(_) => break wr.flush().await.is_ok(),
            }
        };
        if !ok {
            dead.store(true, Ordering::Release);
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop(mut rd: OwnedReadHalf, pending: Pending, dead: Arc<AtomicBool>) {
    let _ = read_records(&mut rd, &pending).await;
    dead.store(true, Ordering::Release);
    // Dropping the senders wakes every waiter with "disconnected".
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

async fn read_records(rd: &mut OwnedReadHalf, pending: &Pending) -> io::Result<()> {
    let mut record = BytesMut::new();
    loop {
        let mark = rd.read_u32().await?;
        let len = (mark & !LAST_FRAGMENT) as usize;
        if record.len() + len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "RPC record too large",
            ));
        }
        let start = record.len();
        record.resize(start + len, 0);
        rd.read_exact(&mut record[start..]).await?;
        if mark & LAST_FRAGMENT == 0 {
            continue;
        }
        let rec = std::mem::take(&mut record).freeze();
        if rec.len() < 8 {
            continue;
        }
        let xid = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let msg_type = u32::from_be_bytes([rec[4], rec[5], rec[6], rec[7]]);
        if msg_type != 1 {
            // A call from the server (back channel): none was negotiated.
            continue;
        }
        let waiter = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&xid);
        if let Some(w) = waiter {
            let _ = w.send(rec);
        }
    }
}

/// Checks an RPC reply header and returns the procedure's result body.
pub fn parse_reply(rec: Bytes) -> Result<Bytes> {
    let mut d = Decoder::new(rec);
    let _xid = d.u32()?;
    let _msg_type = d.u32()?;
    match d.u32()? {
        0 => {
            // MSG_ACCEPTED: verifier, accept_stat
            let _flavor = d.u32()?;
            let _body = d.opaque(400)?;
            match d.u32()? {
                0 => {
                    let n = d.remaining();
                    Ok(d.fixed(n - n % 4)?)
                }
                1 => Err(Error::Protocol(
                    "RPC: program unavailable (not an NFS server?)".into(),
                )),
                2 => {
                    let lo = d.u32()?;
                    let hi = d.u32()?;
                    Err(Error::Protocol(format!(
                        "RPC: NFS version 4 not supported (server supports {lo}..={hi})"
                    )))
                }
                3 => Err(Error::Protocol("RPC: procedure unavailable".into())),
                4 => Err(Error::Protocol(
                    "RPC: server could not decode the arguments (GARBAGE_ARGS)".into(),
                )),
                5 => Err(Error::Protocol("RPC: system error on the server".into())),
                s => Err(Error::Protocol(format!("RPC: unknown accept status {s}"))),
            }
        }
        1 => match d.u32()? {
            0 => Err(Error::Protocol("RPC: version mismatch".into())),
            1 => {
                let why = d.u32()?;
                Err(Error::Protocol(format!("RPC: authentication error {why}")))
            }
            s => Err(Error::Protocol(format!("RPC: call denied ({s})"))),
        },
        s => Err(Error::Protocol(format!("RPC: unknown reply status {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A tiny fake server: answers each call with an accepted, successful
    /// reply whose body echoes the call's last 4 bytes, split over two
    /// fragments.
    async fn fake_server(l: TcpListener) {
        let (mut s, _) = l.accept().await.unwrap();
        loop {
            let Ok(mark) = s.read_u32().await else { return };
            let len = (mark & !LAST_FRAGMENT) as usize;
            let mut buf = vec![0; len];
            s.read_exact(&mut buf).await.unwrap();
            let xid = &buf[0..4];
            let tail = &buf[len - 4..];
            let mut body = Vec::new();
            body.extend_from_slice(xid);
            body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            body.extend_from_slice(tail);
            let (a, b) = body.split_at(10);
            s.write_all(&(a.len() as u32).to_be_bytes()).await.unwrap();
            s.write_all(a).await.unwrap();
            s.write_all(&((b.len() as u32) | LAST_FRAGMENT).to_be_bytes())
                .await
                .unwrap();
            s.write_all(b).await.unwrap();
        }
    }

    #[tokio::test]
    async fn call_roundtrip_and_disconnect() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(fake_server(l));
        let c = RpcConn::connect(addr, Duration::from_secs(5), AuthSys::default())
            .await
            .unwrap();
        for i in 0..3u32 {
            let rec = c
                .call(
                    1,
                    2,
                    3,
                    Bytes::copy_from_slice(&i.to_be_bytes()),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            let body = parse_reply(rec).unwrap();
            assert_eq!(&body[..], &i.to_be_bytes());
        }
        srv.abort();
        let _ = srv.await;
        let r = c
            .call(1, 2, 3, Bytes::from_static(&[0; 4]), Duration::from_secs(5))
            .await;
        assert_eq!(r, Err(CallFailure::Disconnected));
        assert!(c.is_dead());
    }

    #[tokio::test]
    async fn call_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let c = RpcConn::connect(addr, Duration::from_secs(5), AuthSys::default())
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let r = c
            .call(
                1,
                2,
                3,
                Bytes::from_static(&[0; 4]),
                Duration::from_millis(200),
            )
            .await;
        assert_eq!(r, Err(CallFailure::TimedOut));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
