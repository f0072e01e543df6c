//! NFSv4.1 sessions (RFC 8881 §2.10): client id and session set-up, the slot
//! table, COMPOUND execution with SEQUENCE, retries, reconnection and lease
//! renewal.
//!
//! Slots: each slot remembers the last sequence id the server has for it. A
//! request on a slot uses that id + 1; when SEQUENCE succeeds the slot
//! advances. A request whose outcome is unknown (timeout, cancelled caller,
//! undecodable reply) leaves the slot *uncertain*: before the slot is used
//! again a SEQUENCE-only probe with the same id finds out whether the server
//! had executed it (replay answer) or not (executes the probe).
//!
//! When the TCP connection drops, the request is re-sent on a new
//! connection with the same slot and sequence id, so the server's reply cache
//! gives exactly-once semantics for non-idempotent operations (those are sent
//! with `cachethis`). If the server lost the session (restart), a new client
//! id and session are created and the request is retried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{Error, Nfs4Status, Result};
use super::ops::{self, ChannelAttrs, Op, OpRes};
use super::rpc::{self, AuthSys, CallFailure, RpcConn};
use super::xdr::Decoder;

/// Settings the session layer needs.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub addr: SocketAddr,
    pub minor_version: u32,
    pub auth: AuthSys,
    pub connect_timeout: Duration,
    pub rpc_timeout: Duration,
    pub retry_timeout: Duration,
    pub reconnect_timeout: Duration,
    pub slots: u32,
    pub max_io: u32,
}

#[derive(Debug, Default)]
struct SlotsInner {
    seqids: Vec<u32>,
    uncertain: Vec<bool>,
    busy: Vec<bool>,
}

/// The client's view of the session's fore-channel slots.
#[derive(Debug)]
pub(crate) struct SlotTable {
    sem: Arc<Semaphore>,
    inner: Mutex<SlotsInner>,
    n: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The server executed SEQUENCE with this sequence id.
    Advanced,
    /// The server did not execute it (SEQUENCE failed, or never sent).
    NotAdvanced,
    /// Unknown.
    Uncertain,
}

/// Exclusive use of one slot; returns it to the table on drop.
#[derive(Debug)]
pub(crate) struct SlotGuard {
    table: Arc<SlotTable>,
    id: u32,
    seqid: u32,
    was_uncertain: bool,
    outcome: Outcome,
    _permit: OwnedSemaphorePermit,
}

impl SlotTable {
    fn new(n: u32) -> Arc<Self> {
        let n = n.max(1);
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(n as usize)),
            inner: Mutex::new(SlotsInner {
                seqids: vec![0; n as usize],
                uncertain: vec![false; n as usize],
                busy: vec![false; n as usize],
            }),
            n,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn acquire(self: &Arc<Self>) -> SlotGuard {
        let permit = self
            .sem
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("the slot semaphore is never closed"));
        let mut g = self.lock();
        let id = g.busy.iter().position(|b| !b).unwrap_or(0);
        g.busy[id] = true;
        SlotGuard {
            table: self.clone(),
            id: id as u32,
            seqid: g.seqids[id].wrapping_add(1),
            was_uncertain: g.uncertain[id],
            outcome: Outcome::Uncertain,
            _permit: permit,
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut g = self.table.lock();
        let i = self.id as usize;
        match self.outcome {
            Outcome::Advanced => {
                g.seqids[i] = self.seqid;
                g.uncertain[i] = false;
            }
            Outcome::NotAdvanced => {}
            Outcome::Uncertain => g.uncertain[i] = true,
        }
        g.busy[i] = false;
    }
}

/// One established session on one connection. Replaced as a whole when the
/// connection or the session changes.
#[derive(Debug)]
struct Established {
    conn: Arc<RpcConn>,
    conn_gen: u64,
    session: [u8; 16],
    clientid: u64,
    slots: Arc<SlotTable>,
    sess_gen: u64,
    fore: ChannelAttrs,
}

/// A session with the server (reconnects and re-creates itself as needed).
#[derive(Debug)]
pub(crate) struct Session {
    cfg: SessionConfig,
    owner: Bytes,
    verifier: [u8; 8],
    state: RwLock<Arc<Established>>,
    recover: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

fn lost(op: &'static str) -> Error {
    Error::Io {
        op,
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "connection to the NFS server lost",
        ),
    }
}

fn call_error(op: &'static str, f: CallFailure, after: Duration) -> Error {
    match f {
        CallFailure::Disconnected => lost(op),
        CallFailure::TimedOut => Error::Timeout { op, after },
    }
}

/// Status of the first operation of a COMPOUND reply (the SEQUENCE).
fn first_status(body: &Bytes) -> Result<Option<u32>> {
    let mut d = Decoder::new(body.clone());
    d.u32()?;
    d.opaque(1024)?;
    if d.u32()? == 0 {
        return Ok(None);
    }
    d.u32()?;
    Ok(Some(d.u32()?))
}

/// Encodes SEQUENCE followed by `ops`.
fn encode_with_sequence(minor: u32, seq: &Op, ops: &[Op]) -> Bytes {
    ops::encode_compound(minor, Some(seq), ops)
}

/// A COMPOUND without SEQUENCE (EXCHANGE_ID, CREATE_SESSION, DESTROY_*).
async fn sessionless(conn: &RpcConn, cfg: &SessionConfig, op: Op) -> Result<OpRes> {
    let name = ops::op_name(op.code());
    let ops = [op];
    let args = ops::encode_compound(cfg.minor_version, None, &ops);
    let deadline = Instant::now() + cfg.retry_timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        let rec = conn
            .call(
                rpc::NFS_PROGRAM,
                rpc::NFS_V4,
                rpc::PROC_COMPOUND,
                args.clone(),
                cfg.rpc_timeout,
            )
            .await
            .map_err(|f| call_error(name, f, cfg.rpc_timeout))?;
        let reply = ops::decode_compound(rpc::parse_reply(rec)?, &ops)?;
        match reply.failed {
            None => {
                return reply
                    .results
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Protocol(format!("{name}: empty reply")));
            }
            Some((_, Nfs4Status::Delay)) if Instant::now() + delay < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Some((code, status)) => {
                return Err(Error::Nfs {
                    op: ops::op_name(code),
                    status,
                });
            }
        }
    }
}

impl Session {
    /// Connects and establishes a client id and a session, within the
    /// connect timeout.
    pub(crate) async fn connect(cfg: SessionConfig) -> Result<Arc<Self>> {
        let t = cfg.connect_timeout;
        match tokio::time::timeout(t, Self::connect_inner(cfg)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                op: "CONNECT",
                after: t,
            }),
        }
    }

    async fn connect_inner(cfg: SessionConfig) -> Result<Arc<Self>> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let owner = Bytes::from(format!(
            "slacker-nfs/{}/{}/{}.{}",
            cfg.auth.machine_name,
            std::process::id(),
            now.as_nanos(),
            n
        ));
        let verifier = (now.as_nanos() as u64 ^ n.rotate_left(32)).to_be_bytes();
        let conn =
            Arc::new(RpcConn::connect(cfg.addr, cfg.connect_timeout, cfg.auth.clone()).await?);
        let est = establish(&cfg, conn, &owner, verifier, 0, 1).await?;
        Ok(Arc::new(Self {
            cfg,
            owner,
            verifier,
            state: RwLock::new(Arc::new(est)),
            recover: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        }))
    }

    fn current(&self) -> Arc<Established> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn install(&self, est: Established) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(est);
    }

    /// Negotiated fore channel attributes.
    pub(crate) fn fore_channel(&self) -> ChannelAttrs {
        self.current().fore
    }

    /// Configuration.
    pub(crate) fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Runs `ops` after a SEQUENCE and returns their results. `label` names
    /// the request in timeout and connection errors.
    pub(crate) async fn compound(&self, label: &'static str, ops: &[Op]) -> Result<Vec<OpRes>> {
        let cache_this = ops.iter().any(Op::is_non_idempotent);
        let deadline = Instant::now() + self.cfg.retry_timeout;
        let mut delay = Duration::from_millis(10);
        let mut held: Option<(Arc<Established>, SlotGuard)> = None;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            let cur = self.current();
            let (st, mut slot, resent) = match held.take() {
                // Same session, new connection: re-send with the same slot and
                // sequence id (the server may answer from its reply cache).
                Some((old, g)) if old.sess_gen == cur.sess_gen => (cur, g, true),
                _ => {
                    let st = cur;
                    match self.acquire(&st, label).await {
                        Ok(g) => (st, g, false),
                        Err(Recovery::Reconnect) => {
                            self.reconnect(&st, label).await?;
                            continue;
                        }
                        Err(Recovery::NewSession) => {
                            self.new_session(&st).await?;
                            continue;
                        }
                        Err(Recovery::Fail(e)) => return Err(e),
                    }
                }
            };
            let seq = Op::Sequence {
                session: st.session,
                seqid: slot.seqid,
                slot: slot.id,
                highest_slot: st.slots.n - 1,
                cache_this,
            };
            let args = encode_with_sequence(self.cfg.minor_version, &seq, ops);
            let rec = match st
                .conn
                .call(
                    rpc::NFS_PROGRAM,
                    rpc::NFS_V4,
                    rpc::PROC_COMPOUND,
                    args.clone(),
                    self.cfg.rpc_timeout,
                )
                .await
            {
                Ok(rec) => rec,
                Err(CallFailure::TimedOut) => {
                    return Err(Error::Timeout {
                        op: label,
                        after: self.cfg.rpc_timeout,
                    });
                }
                Err(CallFailure::Disconnected) => {
                    self.reconnect(&st, label).await?;
                    held = Some((st, slot));
                    continue;
                }
            };
            let body = match rpc::parse_reply(rec) {
                Ok(b) => b,
                Err(e) => {
                    slot.outcome = Outcome::NotAdvanced;
                    return Err(e);
                }
            };
            let Some(seq_status) = first_status(&body)? else {
                slot.outcome = Outcome::NotAdvanced;
                return Err(Error::Protocol(format!(
                    "{label}: COMPOUND reply without results"
                )));
            };
            if seq_status != 0 {
                // SEQUENCE itself failed: nothing else was executed.
                slot.outcome = Outcome::NotAdvanced;
                let retry_ok = Instant::now() + delay < deadline;
                match Nfs4Status::from_code(seq_status) {
                    Nfs4Status::Delay if retry_ok => {
                        drop(slot);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    Nfs4Status::RetryUncachedRep | Nfs4Status::SeqFalseRetry if retry_ok => {
                        // The server had executed this sequence id already.
                        slot.outcome = Outcome::Advanced;
                        if resent && cache_this {
                            return Err(Error::Nfs {
                                op: label,
                                status: Nfs4Status::RetryUncachedRep,
                            });
                        }
                        continue;
                    }
                    s if s.is_session_lost() && retry_ok => {
                        drop(slot);
                        self.new_session(&st).await?;
                        continue;
                    }
                    s => {
                        return Err(Error::Nfs {
                            op: "SEQUENCE",
                            status: s,
                        });
                    }
                }
            }
            // SEQUENCE succeeded: the slot has advanced whatever follows.
            slot.outcome = Outcome::Advanced;
            drop(slot);
            let mut all = Vec::with_capacity(ops.len() + 1);
            all.push(seq);
            all.extend_from_slice(ops);
            let reply = ops::decode_compound(body, &all)?;
            match reply.failed {
                None => {
                    let mut r = reply.results;
                    r.remove(0);
                    return Ok(r);
                }
                Some((_, Nfs4Status::Delay | Nfs4Status::Grace))
                    if Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Some((code, status)) => {
                    return Err(Error::Nfs {
                        op: ops::op_name(code),
                        status,
                    });
                }
            }
        }
    }

    /// A slot that is safe to use (probing an uncertain one first).
    async fn acquire(&self, st: &Established, label: &'static str) -> Result<SlotGuard, Recovery> {
        let deadline = Instant::now() + self.cfg.retry_timeout;
        loop {
            let mut g = st.slots.acquire().await;
            if !g.was_uncertain {
                return Ok(g);
            }
            if st.conn.is_dead() {
                return Err(Recovery::Reconnect);
            }
            let seq = Op::Sequence {
                session: st.session,
                seqid: g.seqid,
                slot: g.id,
                highest_slot: st.slots.n - 1,
                cache_this: false,
            };
            let args = encode_with_sequence(self.cfg.minor_version, &seq, &[]);
            let rec = match st
                .conn
                .call(
                    rpc::NFS_PROGRAM,
                    rpc::NFS_V4,
                    rpc::PROC_COMPOUND,
                    args.clone(),
                    self.cfg.rpc_timeout,
                )
                .await
            {
                Ok(r) => r,
                Err(CallFailure::Disconnected) => return Err(Recovery::Reconnect),
                Err(f) => return Err(Recovery::Fail(call_error(label, f, self.cfg.rpc_timeout))),
            };
            let body = rpc::parse_reply(rec).map_err(Recovery::Fail)?;
            let status = first_status(&body)
                .map_err(Recovery::Fail)?
                .map(|c| (c == 0, Nfs4Status::from_code(c)));
            match status {
                Some((true, _) | (_, Nfs4Status::RetryUncachedRep | Nfs4Status::SeqFalseRetry)) => {
                    g.outcome = Outcome::Advanced;
                }
                Some((_, Nfs4Status::Delay)) if Instant::now() < deadline => {
                    drop(g);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some((_, s)) if s.is_session_lost() => return Err(Recovery::NewSession),
                Some((_, s)) => {
                    return Err(Recovery::Fail(Error::Nfs {
                        op: "SEQUENCE",
                        status: s,
                    }));
                }
                None => {
                    return Err(Recovery::Fail(Error::Protocol(
                        "empty SEQUENCE reply".into(),
                    )));
                }
            }
        }
    }

    /// Replaces a broken connection (same session), retrying until the
    /// reconnect timeout.
    async fn reconnect(&self, failed: &Established, label: &'static str) -> Result<()> {
        if self.cfg.reconnect_timeout.is_zero() {
            return Err(lost(label));
        }
        let _g = self.recover.lock().await;
        let cur = self.current();
        if cur.conn_gen != failed.conn_gen && !cur.conn.is_dead() {
            return Ok(());
        }
        let conn = self.new_conn(label).await?;
        self.install(Established {
            conn,
            conn_gen: cur.conn_gen + 1,
            session: cur.session,
            clientid: cur.clientid,
            slots: cur.slots.clone(),
            sess_gen: cur.sess_gen,
            fore: cur.fore,
        });
        Ok(())
    }

    async fn new_conn(&self, label: &'static str) -> Result<Arc<RpcConn>> {
        let deadline = Instant::now() + self.cfg.reconnect_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match RpcConn::connect(
                self.cfg.addr,
                left.min(self.cfg.connect_timeout),
                self.cfg.auth.clone(),
            )
            .await
            {
                Ok(c) => return Ok(Arc::new(c)),
                Err(e) if Instant::now() + Duration::from_millis(200) >= deadline => {
                    return Err(match e {
                        Error::Io { source, .. } => Error::Io { op: label, source },
                        Error::Timeout { .. } => Error::Timeout {
                            op: label,
                            after: self.cfg.reconnect_timeout,
                        },
                        e => e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Creates a new client id and session after the server lost ours.
    async fn new_session(&self, failed: &Established) -> Result<()> {
        let _g = self.recover.lock().await;
        let cur = self.current();
        if cur.sess_gen != failed.sess_gen {
            return Ok(());
        }
        let conn = if cur.conn.is_dead() {
            self.new_conn("CREATE_SESSION").await?
        } else {
            cur.conn.clone()
        };
        let est = establish(
            &self.cfg,
            conn,
            &self.owner,
            self.verifier,
            cur.conn_gen + 1,
            cur.sess_gen + 1,
        )
        .await?;
        self.install(est);
        Ok(())
    }

    /// Destroys the session and the client id (best effort: the first error
    /// is returned, the client is closed either way).
    pub(crate) async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let st = self.current();
        if st.conn.is_dead() {
            return Ok(());
        }
        let r1 = sessionless(&st.conn, &self.cfg, Op::DestroySession(st.session)).await;
        let r2 = sessionless(&st.conn, &self.cfg, Op::DestroyClientId(st.clientid)).await;
        r1.and(r2).map(|_| ())
    }

    /// True after [`Session::close`].
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The client id (for open owners).
    pub(crate) fn clientid(&self) -> u64 {
        self.current().clientid
    }

    /// Generation of the session; changes when the session was re-created
    /// (open stateids from an older generation are invalid).
    pub(crate) fn generation(&self) -> u64 {
        self.current().sess_gen
    }

    /// Sends a SEQUENCE every `period` while the session is alive, so the
    /// lease does not expire while the client is idle.
    pub(crate) fn spawn_renewal(self: &Arc<Self>, period: Duration) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(s) = weak.upgrade() else { return };
                if s.is_closed() {
                    return;
                }
                // Errors are not fatal here: the next real request reports them.
                let _ = s.compound("SEQUENCE", &[]).await;
            }
        });
    }
}

enum Recovery {
    Reconnect,
    NewSession,
    Fail(Error),
}

/// EXCHANGE_ID + CREATE_SESSION + RECLAIM_COMPLETE on `conn`.
async fn establish(
    cfg: &SessionConfig,
    conn: Arc<RpcConn>,
    owner: &Bytes,
    verifier: [u8; 8],
    conn_gen: u64,
    sess_gen: u64,
) -> Result<Established> {
    // Flags 0: knfsd rejects argument flags outside EXCHGID4_FLAG_MASK_A
    // with NFS4ERR_INVAL (e.g. the reply-only SUPP_FENCE_OPS bit).
    let (clientid, sequence) = match sessionless(
        &conn,
        cfg,
        Op::ExchangeId {
            verifier,
            owner: owner.clone(),
            flags: 0,
        },
    )
    .await?
    {
        OpRes::ExchangeId {
            clientid, sequence, ..
        } => (clientid, sequence),
        r => {
            return Err(Error::Protocol(format!(
                "EXCHANGE_ID: unexpected result {r:?}"
            )));
        }
    };
    // Room for one maximal WRITE/READ plus headers.
    let msg = cfg.max_io.saturating_add(8192);
    let fore = ChannelAttrs {
        header_pad: 0,
        max_request: msg,
        max_response: msg,
        max_response_cached: 4096,
        max_ops: 32,
        max_requests: cfg.slots.max(1),
    };
    let back = ChannelAttrs {
        header_pad: 0,
        max_request: 8192,
        max_response: 8192,
        max_response_cached: 0,
        max_ops: 2,
        max_requests: 1,
    };
    let (session, fore) = match sessionless(
        &conn,
        cfg,
        Op::CreateSession {
            clientid,
            sequence,
            flags: 0,
            fore,
            back,
            cb_program: 0x4000_0000,
        },
    )
    .await?
    {
        OpRes::CreateSession { session, fore } => (session, fore),
        r => {
            return Err(Error::Protocol(format!(
                "CREATE_SESSION: unexpected result {r:?}"
            )));
        }
    };
    let slots = SlotTable::new(fore.max_requests.min(cfg.slots));
    // RECLAIM_COMPLETE: this client has no state to reclaim.
    let mut g = slots.acquire().await;
    let seq = Op::Sequence {
        session,
        seqid: g.seqid,
        slot: g.id,
        highest_slot: slots.n - 1,
        cache_this: false,
    };
    let ops = [seq.clone(), Op::ReclaimComplete];
    let args = encode_with_sequence(cfg.minor_version, &seq, &ops[1..]);
    let rec = conn
        .call(
            rpc::NFS_PROGRAM,
            rpc::NFS_V4,
            rpc::PROC_COMPOUND,
            args.clone(),
            cfg.rpc_timeout,
        )
        .await
        .map_err(|f| call_error("RECLAIM_COMPLETE", f, cfg.rpc_timeout))?;
    let reply = ops::decode_compound(rpc::parse_reply(rec)?, &ops)?;
    if !reply.results.is_empty() {
        g.outcome = Outcome::Advanced;
    } else {
        g.outcome = Outcome::NotAdvanced;
    }
    drop(g);
    match reply.failed {
        None | Some((_, Nfs4Status::CompleteAlready)) => {}
        Some((code, status)) => {
            return Err(Error::Nfs {
                op: ops::op_name(code),
                status,
            });
        }
    }
    Ok(Established {
        conn,
        conn_gen,
        session,
        clientid,
        slots,
        sess_gen,
        fore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slot_table_sequence_ids() {
        let t = SlotTable::new(2);
        let mut a = t.acquire().await;
        let b = t.acquire().await;
        assert_eq!((a.id, a.seqid), (0, 1));
        assert_eq!((b.id, b.seqid), (1, 1));
        a.outcome = Outcome::Advanced;
        drop(a);
        drop(b); // uncertain
        let a = t.acquire().await;
        assert_eq!((a.id, a.seqid, a.was_uncertain), (0, 2, false));
        let b = t.acquire().await;
        assert_eq!((b.id, b.seqid, b.was_uncertain), (1, 1, true));
        // A third acquire waits until one is released.
        let t2 = t.clone();
        let h = tokio::spawn(async move { t2.acquire().await.id });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished());
        drop(b);
        assert_eq!(h.await.unwrap(), 1);
        drop(a);
    }

    #[test]
    fn sequence_is_spliced_first() {
        let seq = Op::Sequence {
            session: [7; 16],
            seqid: 3,
            slot: 1,
            highest_slot: 1,
            cache_this: false,
        };
        let body = encode_with_sequence(2, &seq, &[Op::PutRootFh, Op::GetFh]);
        let mut d = Decoder::new(body);
        assert_eq!(d.u32().unwrap(), 0); // tag
        assert_eq!(d.u32().unwrap(), 2); // minor
        assert_eq!(d.u32().unwrap(), 3); // ops
        assert_eq!(d.u32().unwrap(), ops::opnum::SEQUENCE);
    }
}
