//! Lost replies: a fault-injecting TCP proxy between the backend and the knfsd VM lets a
//! request reach the server, lets the server execute it, and drops the reply (closing the
//! connection), once for every request of every publishing operation (create, clone,
//! snapshot, hold, release, remove volume, remove snapshot), in two flavours:
//!
//! - `Drop`: the client reconnects and re-sends on the same session; the server's reply
//!   cache must answer (exactly once).
//! - `DropAndLoseSession`: as if the server restarted between executing and replying: the
//!   re-sent request is answered `NFS4ERR_BADSESSION` (by the proxy, which does not
//!   forward it), so the client makes a new session and sends the operation again, and
//!   the server executes it a second time. LINK then meets `NFS4ERR_EXIST`, RENAME and
//!   REMOVE `NFS4ERR_NOENT`: the backend must recognise its own completed step.
//!
//! After each injected loss the outcome must be the model's (the operation succeeds) and
//! the store, read by a fresh backend without the proxy, must equal the model.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use slacker_backend_mem::State;
use slacker_backend_nfs::NfsBackend;
use slacker_core::{Backend, SnapshotId, VolumeId, VolumeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Drop,
    DropAndLoseSession,
}

/// The proxy's shared state.
#[derive(Default)]
struct Plan {
    /// Requests seen (all connections).
    requests: AtomicU64,
    /// Drop the reply to this request number (1-based; 0: never).
    drop_at: AtomicU64,
    /// Lose the session on the next request after a dropped reply.
    lose_session: AtomicU64,
    /// xids whose replies are to be dropped.
    doomed: Mutex<Vec<u32>>,
    /// Replies dropped so far.
    dropped: AtomicU64,
}

async fn read_record(s: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut rec = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).await?;
        let m = u32::from_be_bytes(mark);
        let len = (m & 0x7fff_ffff) as usize;
        let start = rec.len();
        rec.resize(start + len, 0);
        s.read_exact(&mut rec[start..]).await?;
        if m & 0x8000_0000 != 0 {
            return Ok(rec);
        }
    }
}

async fn write_record(s: &mut (impl AsyncWriteExt + Unpin), rec: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(rec.len() + 4);
    out.extend_from_slice(&(0x8000_0000u32 | rec.len() as u32).to_be_bytes());
    out.extend_from_slice(rec);
    s.write_all(&out).await
}

/// An RPC reply to `xid`: COMPOUND whose SEQUENCE failed with NFS4ERR_BADSESSION.
fn bad_session_reply(xid: u32) -> Vec<u8> {
    let mut r = Vec::new();
    for w in [xid, 1, 0, 0, 0, 0, 10052, 0, 1, 53, 10052] {
        r.extend_from_slice(&w.to_be_bytes());
    }
    r
}

async fn serve(client: TcpStream, upstream: String, plan: Arc<Plan>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    let p = Arc::clone(&plan);
    let cw2 = Arc::clone(&cw);
    let down = tokio::spawn(async move {
        let mut sr = sr;
        loop {
            let Ok(rec) = read_record(&mut sr).await else {
                return;
            };
            let xid = u32::from_be_bytes(rec[..4].try_into().unwrap());
            let doomed = {
                let mut d = p.doomed.lock().unwrap();
                d.iter().position(|x| *x == xid).map(|i| d.remove(i))
            };
            if doomed.is_some() {
                // Executed on the server; the reply is lost with the connection.
                p.dropped.fetch_add(1, Ordering::SeqCst);
                let _ = cw2.lock().await.shutdown().await;
                return;
            }
            if write_record(&mut *cw2.lock().await, &rec).await.is_err() {
                return;
            }
        }
    });
    loop {
        let Ok(rec) = read_record(&mut cr).await else {
            break;
        };
        let n = plan.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let xid = u32::from_be_bytes(rec[..4].try_into().unwrap());
        if plan.lose_session.swap(0, Ordering::SeqCst) == 1 {
            // The "restarted" server no longer knows the session.
            let _ = write_record(&mut *cw.lock().await, &bad_session_reply(xid)).await;
            continue;
        }
        if n == plan.drop_at.load(Ordering::SeqCst) {
            plan.doomed.lock().unwrap().push(xid);
        }
        if write_record(&mut sw, &rec).await.is_err() {
            break;
        }
    }
    down.abort();
}

/// Starts the proxy; returns its address.
async fn proxy(upstream: String, plan: Arc<Plan>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(serve(c, upstream.clone(), Arc::clone(&plan)));
        }
    });
    addr
}

/// Volumes (name -> content) and snapshots (sorted: holds, content).
type Dump = (BTreeMap<String, Vec<u8>>, Vec<(Vec<String>, Vec<u8>)>);

fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

/// The publishing operations, each on a store prepared by `setup`.
#[derive(Clone, Copy, Debug)]
enum Publish {
    Create,
    Clone,
    Snapshot,
    Hold,
    Release,
    RemoveVolume,
    RemoveSnapshot,
}

const ALL: [Publish; 7] = [
    Publish::Create,
    Publish::Clone,
    Publish::Snapshot,
    Publish::Hold,
    Publish::Release,
    Publish::RemoveVolume,
    Publish::RemoveSnapshot,
];

/// Prepares: volume `base` with data, snapshot `s` of it (held by `h0` for Release).
async fn setup(b: &NfsBackend, m: &mut State, op: Publish) -> (SnapshotId, SnapshotId) {
    let base = vid("base");
    let o = VolumeOptions::new(1 << 20);
    b.create_volume(&base, &o).await.unwrap();
    m.create_volume(&base, &o).unwrap();
    b.write_at(&base, 4096, b"lost replies").await.unwrap();
    m.write_at(&base, 4096, b"lost replies").unwrap();
    let (bs, ms) = (b.snapshot(&base).await.unwrap(), m.snapshot(&base).unwrap());
    if let Publish::Release = op {
        b.hold_snapshot(&bs, "h0").await.unwrap();
        m.hold_snapshot(&ms, "h0").unwrap();
    }
    (bs, ms)
}

async fn run(
    b: &NfsBackend,
    m: &mut State,
    op: Publish,
    (bs, ms): &(SnapshotId, SnapshotId),
) -> Result<(), String> {
    let o = VolumeOptions::new(1 << 20);
    let (rb, rm) = match op {
        Publish::Create => (
            b.create_volume(&vid("new"), &o).await,
            m.create_volume(&vid("new"), &o),
        ),
        Publish::Clone => (
            b.clone_snapshot(bs, &vid("c")).await,
            m.clone_snapshot(ms, &vid("c")),
        ),
        Publish::Snapshot => (
            b.snapshot(&vid("base")).await.map(drop),
            m.snapshot(&vid("base")).map(drop),
        ),
        Publish::Hold => (b.hold_snapshot(bs, "h1").await, m.hold_snapshot(ms, "h1")),
        Publish::Release => (
            b.release_snapshot(bs, "h0").await,
            m.release_snapshot(ms, "h0"),
        ),
        Publish::RemoveVolume => (
            b.remove_volume(&vid("base")).await,
            m.remove_volume(&vid("base")),
        ),
        Publish::RemoveSnapshot => (b.remove_snapshot(bs).await, m.remove_snapshot(ms)),
    };
    match (&rb, &rm) {
        (Ok(()), Ok(())) => Ok(()),
        _ => Err(format!(
            "{op:?}: backend {:?} vs model {:?}",
            rb.map_err(|e| e.to_string()),
            rm.map_err(|e| e.to_string())
        )),
    }
}

/// Volumes (name -> content) and snapshots (sorted: holds, content) of a store.
async fn dump_backend(b: &NfsBackend) -> Dump {
    let mut vols = BTreeMap::new();
    for v in b.list_volumes().await.unwrap() {
        let st = b.stat_volume(&v).await.unwrap();
        vols.insert(
            v.to_string(),
            b.read_at(&v, 0, st.size as usize).await.unwrap().to_vec(),
        );
    }
    let mut snaps = Vec::new();
    for s in b.list_snapshots().await.unwrap() {
        let st = b.stat_snapshot(&s).await.unwrap();
        let d = b
            .read_snapshot_at(&s, 0, st.size as usize)
            .await
            .unwrap()
            .to_vec();
        snaps.push((st.holds, d));
    }
    snaps.sort();
    (vols, snaps)
}

fn dump_model(m: &State) -> Dump {
    let mut vols = BTreeMap::new();
    for v in m.list_volumes() {
        let st = m.stat_volume(&v).unwrap();
        vols.insert(
            v.to_string(),
            m.read_at(&v, 0, st.size as usize).unwrap().to_vec(),
        );
    }
    let mut snaps = Vec::new();
    for s in m.list_snapshots() {
        let st = m.stat_snapshot(&s).unwrap();
        snaps.push((
            st.holds,
            m.read_snapshot_at(&s, 0, st.size as usize)
                .unwrap()
                .to_vec(),
        ));
    }
    snaps.sort();
    (vols, snaps)
}

fn lost_replies(fault: Fault) {
    let Some(mut h) = support::harness_with("lost-replies", "") else {
        return;
    };
    let upstream = h.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let plan = Arc::new(Plan::default());
        h.addr = proxy(upstream.clone(), Arc::clone(&plan)).await;
        let direct = support::NfsHarness::clone_with_addr(&h, upstream);
        let mut injected = 0;
        for op in ALL {
            // How many requests the operation sends, when nothing is lost.
            let dir = h.fresh_dir();
            let b = h.open(&dir).await;
            let mut m = State::new();
            let ids = setup(&b, &mut m, op).await;
            let before = plan.requests.load(Ordering::SeqCst);
            run(&b, &mut m, op, &ids).await.unwrap();
            let n = plan.requests.load(Ordering::SeqCst) - before;
            let _ = b.close().await;
            for i in 1..=n {
                let dir = h.fresh_dir();
                let b = h.open(&dir).await;
                let mut m = State::new();
                let ids = setup(&b, &mut m, op).await;
                let dropped = plan.dropped.load(Ordering::SeqCst);
                plan.drop_at
                    .store(plan.requests.load(Ordering::SeqCst) + i, Ordering::SeqCst);
                let armed = Arc::clone(&plan);
                let watcher = tokio::spawn(async move {
                    // Once the reply is dropped, the next request meets a lost session.
                    loop {
                        if armed.dropped.load(Ordering::SeqCst) > dropped {
                            if fault == Fault::DropAndLoseSession {
                                armed.lose_session.store(1, Ordering::SeqCst);
                            }
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                    }
                });
                let r = run(&b, &mut m, op, &ids).await;
                plan.drop_at.store(0, Ordering::SeqCst);
                watcher.abort();
                plan.lose_session.store(0, Ordering::SeqCst);
                let lost = plan.dropped.load(Ordering::SeqCst) > dropped;
                injected += u64::from(lost);
                if let Err(e) = r {
                    panic!("{fault:?}: reply to request {i} of {n} of {op:?} lost: {e}");
                }
                let _ = b.close().await;
                let fresh = direct.open(&dir).await;
                let got = dump_backend(&fresh).await;
                assert!(
                    got == dump_model(&m),
                    "{fault:?}: after losing the reply to request {i} of {n} of {op:?}, the \
                     store differs from the model: {:?} vs {:?}",
                    (
                        got.0.keys().collect::<Vec<_>>(),
                        got.1.iter().map(|s| &s.0).collect::<Vec<_>>()
                    ),
                    {
                        let w = dump_model(&m);
                        (
                            w.0.keys().cloned().collect::<Vec<_>>(),
                            w.1.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
                        )
                    }
                );
                let _ = fresh.close().await;
            }
        }
        eprintln!("{fault:?}: {injected} lost replies injected, every outcome as the model's");
        assert!(
            injected > 0,
            "the proxy lost no reply: the test tested nothing"
        );
    });
}

#[test]
fn a_lost_reply_is_answered_from_the_reply_cache() {
    lost_replies(Fault::Drop);
}

#[test]
fn a_lost_reply_and_session_re_executes_safely() {
    lost_replies(Fault::DropAndLoseSession);
}
