//! A small NFSv4.1/4.2 client: pure Rust, async on tokio, no kernel mount and no
//! C library. Written from RFC 8881 (NFSv4.1) and RFC 7862 (NFSv4.2) for what
//! [slacker](https://github.com/slacker-rs/slacker) needs, and tested against
//! Linux knfsd exporting btrfs: files, directories, hard links, and the 4.2
//! server-side operations (CLONE, COPY, SEEK, ALLOCATE, DEALLOCATE) that make
//! snapshots and clones of large sparse files cost one round trip.
//!
//! # Connecting
//!
//! [`NfsClient::connect`] takes the server's `host:port` (2049 for knfsd) and
//! [`ClientOptions`]; it runs EXCHANGE_ID, CREATE_SESSION and RECLAIM_COMPLETE
//! and reads the server's limits. Credentials are AUTH_SYS (uid 0 by default):
//! the export must allow the client (`no_root_squash` for uid 0). Paths are
//! relative to the server's NFSv4 pseudo-root (`"export/dir/file"`; a leading
//! `/` is ignored, `..` is rejected).
//!
//! ```no_run
//! # async fn demo() -> slacker_nfs_client::Result<()> {
//! use slacker_nfs_client::{ClientOptions, NfsClient};
//! let nfs = NfsClient::connect("127.0.0.1:2049", ClientOptions::default()).await?;
//! nfs.mkdir_all("images/base").await?;
//! let f = nfs.create("images/base/layer.img").await?;
//! f.write_at(0, b"hello").await?;
//! let g = nfs.create("images/base/clone.img").await?;
//! nfs.clone_range(&f, &g, 0, 0, 0).await?; // whole file, shares extents
//! assert_eq!(&g.read_at(0, 5).await?[..], b"hello");
//! f.close().await?;
//! g.close().await?;
//! nfs.close().await?;
//! # Ok(()) }
//! ```
//!
//! # What it speaks
//!
//! | area | operations |
//! |---|---|
//! | sessions (RFC 8881 §2.10, §18.35–18.37, §18.46) | EXCHANGE_ID, CREATE_SESSION, SEQUENCE, RECLAIM_COMPLETE, DESTROY_SESSION, DESTROY_CLIENTID |
//! | names | PUTROOTFH, PUTFH, LOOKUP, GETFH, SAVEFH, RESTOREFH, CREATE (directories), LINK, REMOVE, RENAME, READDIR |
//! | files | OPEN (create unchecked/guarded, claim null or by handle), CLOSE, DELEGRETURN, READ, WRITE (`UNSTABLE4` or `FILE_SYNC4`), COMMIT, GETATTR, SETATTR (size, mode) |
//! | NFSv4.2 (RFC 7862 §15) | CLONE, COPY (synchronous, intra-server), SEEK, ALLOCATE, DEALLOCATE |
//!
//! Not implemented: RPCSEC_GSS/Kerberos, the back channel (so no delegations or
//! callbacks: OPEN asks for none, and any the server grants are returned),
//! byte-range locks, pNFS, asynchronous or inter-server COPY, ACLs and named
//! attributes, NFSv4.0. Data is read and written with the anonymous stateid,
//! so there is no open state to recover after a server restart.
//!
//! # Behaviour
//!
//! - Up to [`ClientOptions::slots`] COMPOUNDs are in flight at once; larger
//!   reads and writes are split into [`NfsClient::max_read_size`] /
//!   [`NfsClient::max_write_size`] pieces sent in parallel.
//! - `NFS4ERR_DELAY` and `NFS4ERR_GRACE` are retried with backoff for up to
//!   [`ClientOptions::retry_timeout`].
//! - A dropped connection is re-established for up to
//!   [`ClientOptions::reconnect_timeout`], and an in-flight request is re-sent on
//!   the same slot so the server's reply cache gives exactly-once semantics; a
//!   server that lost the session (restart) gets a new client id and session.
//! - The lease is renewed in the background while the client is open.
//! - Every failure is an [`Error`] naming the operation.
//!
//! # Layers, bottom up
//!
//! - [`xdr`]: XDR encoding and decoding.
//! - `rpc`: ONC RPC (RFC 5531) over TCP with record marking and AUTH_SYS.
//! - [`ops`]: COMPOUND operations (arguments and results), for callers that
//!   build their own compounds and run them with [`NfsClient::compound`].
//! - `session`: EXCHANGE_ID / CREATE_SESSION, the slot table, SEQUENCE,
//!   retries on `NFS4ERR_DELAY`/`NFS4ERR_GRACE`, reconnection, lease renewal.
//! - the crate root: [`NfsClient`], a path-based API, and [`NfsFile`], an open
//!   file.
//!
//! # Testing
//!
//! The integration tests live in `slacker-backend-nfs/tests/client.rs` of the
//! repository and run against a real Linux knfsd in a small VM
//! (`slacker-backend-nfs/server/`).

mod error;
pub mod ops;
mod rpc;
mod session;
pub mod xdr;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

pub use error::{Error, Nfs4Status, Result};
pub use ops::FileType;
use ops::{Attrs, Fh, Op, OpRes, OpenClaim, OpenHow, SetAttrs, StateId, attr, bitmap};
use session::{Session, SessionConfig};

/// Connection settings of an [`NfsClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed to connect and set up the session. Default 10 s.
    pub connect_timeout: Duration,
    /// Time allowed for one RPC (one COMPOUND) to be answered. Default 30 s.
    pub rpc_timeout: Duration,
    /// How long to keep retrying an operation the server answers with
    /// `NFS4ERR_DELAY` or `NFS4ERR_GRACE` (backoff 10 ms .. 1 s). Default 60 s.
    pub retry_timeout: Duration,
    /// How long to try re-connecting after the connection broke; zero
    /// disables reconnection (the operation fails with [`Error::Io`]).
    /// Default 30 s.
    pub reconnect_timeout: Duration,
    /// Session slots requested, i.e. RPCs in flight at once. Default 8.
    pub slots: u32,
    /// Largest READ/WRITE payload used (the server may allow less). Default 1 MiB.
    pub max_io: u32,
    /// NFSv4 minor version, 1 or 2. CLONE, COPY, SEEK, ALLOCATE and
    /// DEALLOCATE need 2. Default 2.
    pub minor_version: u32,
    /// AUTH_SYS user id. Default 0.
    pub uid: u32,
    /// AUTH_SYS group id. Default 0.
    pub gid: u32,
    /// AUTH_SYS machine name. Default `"slacker"`.
    pub machine_name: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(60),
            reconnect_timeout: Duration::from_secs(30),
            slots: 8,
            max_io: 1 << 20,
            minor_version: 2,
            uid: 0,
            gid: 0,
            machine_name: "slacker".to_owned(),
        }
    }
}

/// An NFSv4 file handle (opaque, valid as long as the object exists).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(pub Fh);

impl FileHandle {
    /// The handle's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.0
    }
}

/// Attributes of a file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Object type.
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// File id (inode number).
    pub fileid: u64,
    /// Bytes allocated on the server's disk (0 if not reported).
    pub space_used: u64,
    /// Permission bits.
    pub mode: u32,
    /// Number of hard links.
    pub nlink: u32,
    /// Change attribute (changes on every modification).
    pub change: u64,
    /// Modification time.
    pub modified: SystemTime,
}

fn nfs_time(t: Option<(i64, u32)>) -> SystemTime {
    match t {
        Some((s, ns)) if s >= 0 => {
            SystemTime::UNIX_EPOCH + Duration::new(s as u64, ns.min(999_999_999))
        }
        Some((s, _)) => SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(s.unsigned_abs()))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        None => SystemTime::UNIX_EPOCH,
    }
}

impl Metadata {
    fn from_attrs(a: &Attrs) -> Self {
        let modified = nfs_time(a.time_modify);
        Self {
            file_type: a.file_type.unwrap_or(FileType::Other(0)),
            size: a.size.unwrap_or(0),
            fileid: a.fileid.unwrap_or(0),
            space_used: a.space_used.unwrap_or(0),
            mode: a.mode.unwrap_or(0),
            nlink: a.numlinks.unwrap_or(0),
            change: a.change.unwrap_or(0),
            modified,
        }
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == FileType::Directory
    }

    /// True for a regular file.
    pub fn is_file(&self) -> bool {
        self.file_type == FileType::Regular
    }
}

/// One entry of [`NfsClient::read_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name within the directory.
    pub name: String,
    /// Object type.
    pub file_type: FileType,
    /// File id (inode number).
    pub fileid: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (server clock).
    pub modified: SystemTime,
    /// Change time of the inode (server clock): also moves on RENAME and LINK.
    pub changed: SystemTime,
}

const META_ATTRS: &[u32] = &[
    attr::TYPE,
    attr::CHANGE,
    attr::SIZE,
    attr::FILEID,
    attr::MODE,
    attr::NUMLINKS,
    attr::SPACE_USED,
    attr::TIME_MODIFY,
];

#[derive(Debug)]
struct ClientInner {
    session: Arc<Session>,
    max_read: u32,
    max_write: u32,
    /// Operations allowed after SEQUENCE in one COMPOUND.
    max_ops: usize,
    lease: Duration,
    owners: AtomicU64,
}

/// A connection to one NFSv4.1/4.2 server. Cheap to clone; all clones share
/// the session. Safe to use from many tasks at once (up to
/// [`ClientOptions::slots`] RPCs are in flight, the rest wait).
#[derive(Debug, Clone)]
pub struct NfsClient {
    inner: Arc<ClientInner>,
}

fn components(path: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Error::InvalidPath(path.to_owned())),
            c if c.len() > 255 => return Err(Error::InvalidPath(path.to_owned())),
            c => out.push(c.to_owned()),
        }
    }
    Ok(out)
}

fn split_parent(path: &str) -> Result<(Vec<String>, String)> {
    let mut comps = components(path)?;
    let name = comps
        .pop()
        .ok_or_else(|| Error::InvalidPath(path.to_owned()))?;
    Ok((comps, name))
}

fn unexpected(op: &str, r: &[OpRes]) -> Error {
    Error::Protocol(format!("{op}: unexpected results {r:?}"))
}

impl NfsClient {
    /// Connects to `addr` (`"host:port"`), creates a session and reads the
    /// server's limits. Fails with [`Error::Io`] (e.g. connection refused)
    /// or [`Error::Timeout`] within [`ClientOptions::connect_timeout`].
    pub async fn connect(addr: &str, opts: ClientOptions) -> Result<Self> {
        let t = opts.connect_timeout;
        let resolved = match tokio::time::timeout(t, tokio::net::lookup_host(addr)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    op: "CONNECT",
                    after: t,
                });
            }
            Ok(Err(e)) => {
                return Err(Error::Io {
                    op: "CONNECT",
                    source: std::io::Error::new(e.kind(), format!("resolve {addr}: {e}")),
                });
            }
            Ok(Ok(mut it)) => it.next().ok_or_else(|| Error::Io {
                op: "CONNECT",
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{addr} resolves to no address"),
                ),
            })?,
        };
        let cfg = SessionConfig {
            addr: resolved,
            minor_version: opts.minor_version,
            auth: rpc::AuthSys {
                machine_name: opts.machine_name.clone(),
                uid: opts.uid,
                gid: opts.gid,
            },
            connect_timeout: opts.connect_timeout,
            rpc_timeout: opts.rpc_timeout,
            retry_timeout: opts.retry_timeout,
            reconnect_timeout: opts.reconnect_timeout,
            slots: opts.slots.clamp(1, 64),
            max_io: opts.max_io.clamp(4096, 64 << 20),
        };
        let session = Session::connect(cfg).await?;
        let r = session
            .compound(
                "GETATTR",
                &[
                    Op::PutRootFh,
                    Op::GetAttr(bitmap(&[attr::LEASE_TIME, attr::MAXREAD, attr::MAXWRITE])),
                ],
            )
            .await?;
        let a = match r.as_slice() {
            [OpRes::Done, OpRes::GetAttr(a)] => a.clone(),
            r => return Err(unexpected("GETATTR", r)),
        };
        let fore = session.fore_channel();
        let cap = session.config().max_io;
        let limit = |attr_max: Option<u64>, msg: u32| -> u32 {
            let v = attr_max
                .unwrap_or(u64::MAX)
                .min(u64::from(cap))
                .min(u64::from(msg.saturating_sub(1024)));
            let v = v as u32;
            if v >= 8192 { v & !4095 } else { v.max(512) }
        };
        let lease = Duration::from_secs(u64::from(a.lease_time.unwrap_or(90).max(3)));
        let inner = ClientInner {
            max_read: limit(a.maxread, fore.max_response),
            max_write: limit(a.maxwrite, fore.max_request),
            max_ops: (fore.max_ops.saturating_sub(1) as usize).clamp(4, 64),
            lease,
            session: session.clone(),
            owners: AtomicU64::new(0),
        };
        session.spawn_renewal(lease / 3);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Destroys the session and the client id on the server. Open files
    /// should be closed first. Further calls fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        self.inner.session.close().await
    }

    /// Largest READ payload per RPC (larger reads are split).
    pub fn max_read_size(&self) -> u32 {
        self.inner.max_read
    }

    /// Largest WRITE payload per RPC (larger writes are split).
    pub fn max_write_size(&self) -> u32 {
        self.inner.max_write
    }

    /// The server's lease time.
    pub fn lease_time(&self) -> Duration {
        self.inner.lease
    }

    /// Runs one COMPOUND (after SEQUENCE): the low-level entry point for
    /// callers that build their own compounds from [`ops`].
    ///
    /// # Errors
    ///
    /// [`Error::Nfs`] with the first failing operation's status, [`Error::Io`]
    /// or [`Error::Timeout`] when the server cannot be reached in time.
    pub async fn compound(&self, label: &'static str, ops: &[Op]) -> Result<Vec<OpRes>> {
        self.inner.session.compound(label, ops).await
    }

    /// RPCs the session runs at once.
    pub fn slots(&self) -> usize {
        self.inner.session.config().slots as usize
    }

    /// The server address this client was connected to.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        self.inner.session.config().addr
    }

    /// Operations that make `comps` the current file handle, leaving room for
    /// `extra` more operations in the COMPOUND. Long paths are resolved in
    /// several round trips.
    async fn walk(&self, comps: &[String], extra: usize) -> Result<Vec<Op>> {
        let room = self.inner.max_ops.saturating_sub(extra + 1).max(1);
        if comps.len() <= room {
            let mut ops = Vec::with_capacity(comps.len() + 1 + extra);
            ops.push(Op::PutRootFh);
            ops.extend(comps.iter().cloned().map(Op::Lookup));
            return Ok(ops);
        }
        let mut fh: Option<Fh> = None;
        let step = self.inner.max_ops.saturating_sub(2).max(1);
        let mut rest = comps;
        while rest.len() > room {
            let (now, later) = rest.split_at(step.min(rest.len() - room));
            let mut ops = vec![match &fh {
                None => Op::PutRootFh,
                Some(f) => Op::PutFh(f.clone()),
            }];
            ops.extend(now.iter().cloned().map(Op::Lookup));
            ops.push(Op::GetFh);
            let r = self.compound("LOOKUP", &ops).await?;
            match r.last() {
                Some(OpRes::GetFh(f)) => fh = Some(f.clone()),
                _ => return Err(unexpected("LOOKUP", &r)),
            }
            rest = later;
        }
        let mut ops = Vec::with_capacity(rest.len() + 1 + extra);
        ops.push(Op::PutFh(
            fh.unwrap_or_else(|| unreachable!("resolved above")),
        ));
        ops.extend(rest.iter().cloned().map(Op::Lookup));
        Ok(ops)
    }

    /// The file handle of `path`. A missing path fails with
    /// `Error::Nfs { op: "LOOKUP", status: Nfs4Status::NoEnt }`.
    pub async fn lookup(&self, path: &str) -> Result<FileHandle> {
        let mut ops = self.walk(&components(path)?, 1).await?;
        ops.push(Op::GetFh);
        let r = self.compound("LOOKUP", &ops).await?;
        match r.last() {
            Some(OpRes::GetFh(f)) => Ok(FileHandle(f.clone())),
            _ => Err(unexpected("LOOKUP", &r)),
        }
    }

    /// Attributes of `path`.
    pub async fn metadata(&self, path: &str) -> Result<Metadata> {
        let mut ops = self.walk(&components(path)?, 1).await?;
        ops.push(Op::GetAttr(bitmap(META_ATTRS)));
        let r = self.compound("GETATTR", &ops).await?;
        match r.last() {
            Some(OpRes::GetAttr(a)) => Ok(Metadata::from_attrs(a)),
            _ => Err(unexpected("GETATTR", &r)),
        }
    }

    /// Attributes of the object with handle `fh`.
    pub async fn metadata_fh(&self, fh: &FileHandle) -> Result<Metadata> {
        let r = self
            .compound(
                "GETATTR",
                &[Op::PutFh(fh.0.clone()), Op::GetAttr(bitmap(META_ATTRS))],
            )
            .await?;
        match r.last() {
            Some(OpRes::GetAttr(a)) => Ok(Metadata::from_attrs(a)),
            _ => Err(unexpected("GETATTR", &r)),
        }
    }

    /// True if `path` exists; other errors are returned.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.lookup(path).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates the directory `path` (mode 0755); its parent must exist.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        let (parent, name) = split_parent(path)?;
        let mut ops = self.walk(&parent, 1).await?;
        ops.push(Op::Mkdir { name, mode: 0o755 });
        self.compound("CREATE", &ops).await.map(drop)
    }

    /// Creates `path` and any missing parents; succeeds if it already is a
    /// directory.
    pub async fn mkdir_all(&self, path: &str) -> Result<()> {
        let comps = components(path)?;
        match self.metadata(path).await {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(Error::Nfs {
                    op: "CREATE",
                    status: Nfs4Status::Exist,
                });
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        for i in 1..=comps.len() {
            match self.mkdir(&comps[..i].join("/")).await {
                Ok(()) => {}
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e),
            }
        }
        if self.metadata(path).await?.is_dir() {
            Ok(())
        } else {
            Err(Error::Nfs {
                op: "CREATE",
                status: Nfs4Status::NotDir,
            })
        }
    }

    fn new_owner(&self) -> Bytes {
        let n = self.inner.owners.fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!("slacker-open-{n}"))
    }

    /// An OPEN (read and write, no delegation) of `name` in the current
    /// directory handle, with a fresh open owner: for compounds (see
    /// [`NfsClient::compound`]) that OPEN, use the file and CLOSE it in one round trip.
    pub fn open_op(&self, name: String, how: OpenHow) -> Op {
        Op::Open {
            share_access: ops::SHARE_ACCESS_READ
                | ops::SHARE_ACCESS_WRITE
                | ops::SHARE_ACCESS_WANT_NO_DELEG,
            clientid: self.inner.session.clientid(),
            owner: self.new_owner(),
            how,
            claim: OpenClaim::Null(name),
        }
    }

    async fn open_with(&self, path: &str, access: u32, how: OpenHow) -> Result<NfsFile> {
        let (parent, name) = split_parent(path)?;
        let owner = self.new_owner();
        let mut ops = self.walk(&parent, 2).await?;
        ops.push(Op::Open {
            share_access: access | ops::SHARE_ACCESS_WANT_NO_DELEG,
            clientid: self.inner.session.clientid(),
            owner: owner.clone(),
            how,
            claim: OpenClaim::Null(name),
        });
        ops.push(Op::GetFh);
        let generation = self.inner.session.generation();
        let r = self.compound("OPEN", &ops).await?;
        let n = r.len();
        match (r.get(n.wrapping_sub(2)), r.last()) {
            (
                Some(OpRes::Open {
                    stateid,
                    delegation,
                }),
                Some(OpRes::GetFh(fh)),
            ) => {
                if let Some(d) = delegation {
                    // Not asked for and no back channel to recall it: give it back.
                    let _ = self
                        .compound("DELEGRETURN", &[Op::PutFh(fh.clone()), Op::DelegReturn(*d)])
                        .await;
                }
                Ok(NfsFile {
                    inner: Arc::new(FileInner {
                        client: self.clone(),
                        fh: fh.clone(),
                        access,
                        owner,
                        state: Mutex::new((*stateid, generation)),
                        reopen: tokio::sync::Mutex::new(()),
                        closed: AtomicBool::new(false),
                    }),
                })
            }
            _ => Err(unexpected("OPEN", &r)),
        }
    }

    /// Creates `path` (mode 0644) or truncates it if it exists, and opens it
    /// for reading and writing.
    pub async fn create(&self, path: &str) -> Result<NfsFile> {
        let attrs = SetAttrs {
            size: Some(0),
            mode: Some(0o644),
        };
        self.open_with(
            path,
            ops::SHARE_ACCESS_READ | ops::SHARE_ACCESS_WRITE,
            OpenHow::Unchecked(attrs),
        )
        .await
    }

    /// Creates `path` (mode 0644), failing with `NFS4ERR_EXIST` if it exists,
    /// and opens it for reading and writing.
    pub async fn create_new(&self, path: &str) -> Result<NfsFile> {
        let attrs = SetAttrs {
            size: None,
            mode: Some(0o644),
        };
        self.open_with(
            path,
            ops::SHARE_ACCESS_READ | ops::SHARE_ACCESS_WRITE,
            OpenHow::Guarded(attrs),
        )
        .await
    }

    /// Opens the existing file `path` for reading and writing.
    pub async fn open(&self, path: &str) -> Result<NfsFile> {
        self.open_with(
            path,
            ops::SHARE_ACCESS_READ | ops::SHARE_ACCESS_WRITE,
            OpenHow::NoCreate,
        )
        .await
    }

    /// Opens the existing file `path` for reading only.
    pub async fn open_read(&self, path: &str) -> Result<NfsFile> {
        self.open_with(path, ops::SHARE_ACCESS_READ, OpenHow::NoCreate)
            .await
    }

    /// Removes the file or empty directory `path`.
    pub async fn remove(&self, path: &str) -> Result<()> {
        let (parent, name) = split_parent(path)?;
        let mut ops = self.walk(&parent, 1).await?;
        ops.push(Op::Remove(name));
        self.compound("REMOVE", &ops).await.map(drop)
    }

    /// Renames `from` to `to` (replacing a file at `to`).
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from_dir, old) = split_parent(from)?;
        let (to_dir, new) = split_parent(to)?;
        let mut ops = Vec::new();
        if from_dir.len() + to_dir.len() + 4 <= self.inner.max_ops {
            ops.push(Op::PutRootFh);
            ops.extend(from_dir.iter().cloned().map(Op::Lookup));
            ops.push(Op::SaveFh);
            ops.push(Op::PutRootFh);
            ops.extend(to_dir.iter().cloned().map(Op::Lookup));
        } else {
            // Deep paths: resolve both directories to handles first.
            let from_fh = self.lookup(&from_dir.join("/")).await?;
            let to_fh = self.lookup(&to_dir.join("/")).await?;
            ops.extend([Op::PutFh(from_fh.0), Op::SaveFh, Op::PutFh(to_fh.0)]);
        }
        ops.push(Op::Rename { old, new });
        self.compound("RENAME", &ops).await.map(drop)
    }

    /// Names (and basic attributes) of the entries of directory `path`.
    pub async fn read_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let dir = self.lookup(path).await?;
        self.read_dir_fh(&dir).await
    }

    /// Names (and basic attributes) of the entries of the directory with
    /// handle `dir`.
    pub async fn read_dir_fh(&self, dir: &FileHandle) -> Result<Vec<DirEntry>> {
        let maxcount = self
            .inner
            .session
            .fore_channel()
            .max_response
            .saturating_sub(1024)
            .min(256 << 10);
        let mut out = Vec::new();
        let mut cookie = 0;
        let mut verifier = [0u8; 8];
        loop {
            let r = self
                .compound(
                    "READDIR",
                    &[
                        Op::PutFh(dir.0.clone()),
                        Op::ReadDir {
                            cookie,
                            verifier,
                            dircount: maxcount / 2,
                            maxcount,
                            attrs: bitmap(&[
                                attr::TYPE,
                                attr::SIZE,
                                attr::FILEID,
                                attr::TIME_METADATA,
                                attr::TIME_MODIFY,
                            ]),
                        },
                    ],
                )
                .await?;
            let Some(OpRes::ReadDir {
                verifier: v,
                entries,
                eof,
            }) = r.last()
            else {
                return Err(unexpected("READDIR", &r));
            };
            verifier = *v;
            for e in entries {
                cookie = e.cookie;
                out.push(DirEntry {
                    name: e.name.clone(),
                    file_type: e.attrs.file_type.unwrap_or(FileType::Other(0)),
                    fileid: e.attrs.fileid.unwrap_or(0),
                    size: e.attrs.size.unwrap_or(0),
                    modified: nfs_time(e.attrs.time_modify),
                    changed: nfs_time(e.attrs.time_metadata),
                });
            }
            if *eof || entries.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Makes `to` a new name (hard link) of the existing file `from` (LINK).
    /// Fails with `NFS4ERR_EXIST` if `to` exists, so a fully written file can
    /// be published under a name atomically *and* exclusively (RENAME would
    /// replace an existing name).
    pub async fn link(&self, from: &str, to: &str) -> Result<()> {
        let src = self.lookup(from).await?;
        let (to_dir, new) = split_parent(to)?;
        let mut ops = self.walk(&to_dir, 3).await?;
        ops.insert(0, Op::SaveFh);
        ops.insert(0, Op::PutFh(src.0));
        ops.push(Op::Link(new));
        self.compound("LINK", &ops).await.map(drop)
    }

    /// Server-side CLONE (RFC 7862 §15.13): makes `count` bytes of `dst` at
    /// `dst_offset` share storage with `src` at `src_offset`; `count` 0 means
    /// to the end of `src`. Offsets and count must be multiples of the
    /// file system block size (except a range ending at EOF). Fails with
    /// `Error::Nfs { op: "CLONE", status: NotSupp }` where the server's file
    /// system cannot clone.
    pub async fn clone_range(
        &self,
        src: &NfsFile,
        dst: &NfsFile,
        src_offset: u64,
        dst_offset: u64,
        count: u64,
    ) -> Result<()> {
        stateful(self, &[&src.inner, &dst.inner], "CLONE", |ids| {
            vec![
                Op::PutFh(src.inner.fh.clone()),
                Op::SaveFh,
                Op::PutFh(dst.inner.fh.clone()),
                Op::Clone {
                    src: ids[0],
                    dst: ids[1],
                    src_offset,
                    dst_offset,
                    count,
                },
            ]
        })
        .await
        .map(drop)
    }

    /// Server-side synchronous COPY (RFC 7862 §15.2) of `count` bytes (0 =
    /// to the end of `src`). The server may copy less per call (knfsd: 4 MiB);
    /// this loops until done or `src` ends. Returns the bytes copied.
    pub async fn copy_range(
        &self,
        src: &NfsFile,
        dst: &NfsFile,
        src_offset: u64,
        dst_offset: u64,
        count: u64,
    ) -> Result<u64> {
        let mut done = 0u64;
        let mut unstable = false;
        loop {
            let want = if count == 0 { 0 } else { count - done };
            let r = stateful(self, &[&src.inner, &dst.inner], "COPY", |ids| {
                vec![
                    Op::PutFh(src.inner.fh.clone()),
                    Op::SaveFh,
                    Op::PutFh(dst.inner.fh.clone()),
                    Op::Copy {
                        src: ids[0],
                        dst: ids[1],
                        src_offset: src_offset + done,
                        dst_offset: dst_offset + done,
                        count: want,
                    },
                ]
            })
            .await?;
            let Some(OpRes::Copy {
                count: n,
                committed,
                ..
            }) = r.last()
            else {
                return Err(unexpected("COPY", &r));
            };
            done += n;
            unstable |= *committed != ops::FILE_SYNC4;
            if *n == 0 || (count != 0 && done >= count) {
                break;
            }
        }
        if unstable && done > 0 {
            dst.commit().await?;
        }
        Ok(done)
    }

    /// Creates (or truncates) `dst` and clones all of `src` into it.
    pub async fn clone_file(&self, src: &str, dst: &str) -> Result<()> {
        let s = self.open_read(src).await?;
        let d = self.create(dst).await?;
        let r = self.clone_range(&s, &d, 0, 0, 0).await;
        let c1 = s.close().await;
        let c2 = d.close().await;
        r.and(c1).and(c2)
    }

    /// Reads all of `path`.
    pub async fn read_file(&self, path: &str) -> Result<Bytes> {
        let f = self.open_read(path).await?;
        let size = f.size().await?;
        let r = f.read_at(0, size as usize).await;
        let c = f.close().await;
        let data = r?;
        c?;
        Ok(data)
    }

    /// Creates or truncates `path` and writes `data` to it.
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let f = self.create(path).await?;
        let r = f.write_at(0, data).await;
        let c = f.close().await;
        r.and(c)
    }

    /// Opens an existing file by handle for reading and writing.
    pub async fn open_fh(&self, fh: &FileHandle) -> Result<NfsFile> {
        let access = ops::SHARE_ACCESS_READ | ops::SHARE_ACCESS_WRITE;
        let f = NfsFile {
            inner: Arc::new(FileInner {
                client: self.clone(),
                fh: fh.0.clone(),
                access,
                owner: self.new_owner(),
                state: Mutex::new((StateId::ANONYMOUS, u64::MAX)),
                reopen: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
        };
        f.inner.reopen(StateId::ANONYMOUS).await?;
        Ok(f)
    }
}

#[derive(Debug)]
struct FileInner {
    client: NfsClient,
    fh: Fh,
    access: u32,
    owner: Bytes,
    /// Open stateid and the session generation it belongs to.
    state: Mutex<(StateId, u64)>,
    reopen: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

impl FileInner {
    fn current(&self) -> (StateId, u64) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the file again by handle (after the server lost our state),
    /// unless someone else already did since `seen` was current.
    async fn reopen(&self, seen: StateId) -> Result<()> {
        let _g = self.reopen.lock().await;
        if self.current().0 != seen {
            return Ok(());
        }
        let session = &self.client.inner.session;
        let generation = session.generation();
        let r = session
            .compound(
                "OPEN",
                &[
                    Op::PutFh(self.fh.clone()),
                    Op::Open {
                        share_access: self.access | ops::SHARE_ACCESS_WANT_NO_DELEG,
                        clientid: session.clientid(),
                        owner: self.owner.clone(),
                        how: OpenHow::NoCreate,
                        claim: OpenClaim::Fh,
                    },
                ],
            )
            .await?;
        match r.last() {
            Some(OpRes::Open { stateid, .. }) => {
                *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (*stateid, generation);
                Ok(())
            }
            _ => Err(unexpected("OPEN", &r)),
        }
    }
}

/// Runs a COMPOUND built from the files' open stateids; re-opens the files
/// and retries once if the server lost the open state.
async fn stateful(
    client: &NfsClient,
    files: &[&Arc<FileInner>],
    label: &'static str,
    build: impl Fn(&[StateId]) -> Vec<Op>,
) -> Result<Vec<OpRes>> {
    let mut attempt = 0;
    loop {
        let generation = client.inner.session.generation();
        for f in files {
            let (s, g) = f.current();
            if g != generation {
                f.reopen(s).await?;
            }
        }
        let ids: Vec<StateId> = files.iter().map(|f| f.current().0).collect();
        match client.compound(label, &build(&ids)).await {
            Err(Error::Nfs { status, .. }) if attempt == 0 && status.is_stateid_lost() => {
                attempt += 1;
                for (f, s) in files.iter().zip(&ids) {
                    f.reopen(*s).await?;
                }
            }
            r => return r,
        }
    }
}

/// An open regular file. Close it with [`NfsFile::close`]; dropping it
/// without closing sends CLOSE in the background.
#[derive(Debug)]
pub struct NfsFile {
    inner: Arc<FileInner>,
}

impl Drop for NfsFile {
    fn drop(&mut self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            rt.spawn(async move {
                let _ = close_file(&inner).await;
            });
        }
    }
}

async fn close_file(f: &FileInner) -> Result<()> {
    let (s, g) = f.current();
    let session = &f.client.inner.session;
    if session.is_closed() || g != session.generation() {
        return Ok(()); // the state is gone with the session
    }
    match session
        .compound("CLOSE", &[Op::PutFh(f.fh.clone()), Op::Close(s)])
        .await
    {
        Err(Error::Nfs { status, .. }) if status.is_stateid_lost() => Ok(()),
        r => r.map(drop),
    }
}

async fn read_chunk(f: Arc<FileInner>, offset: u64, count: u32) -> Result<(bool, Bytes)> {
    let client = f.client.clone();
    let r = stateful(&client, &[&f], "READ", |ids| {
        vec![
            Op::PutFh(f.fh.clone()),
            Op::Read {
                stateid: ids[0],
                offset,
                count,
            },
        ]
    })
    .await?;
    match r.last() {
        Some(OpRes::Read { eof, data }) => Ok((*eof, data.clone())),
        _ => Err(unexpected("READ", &r)),
    }
}

async fn write_chunk(
    f: Arc<FileInner>,
    offset: u64,
    data: Bytes,
    stable: u32,
) -> Result<(u32, [u8; 8])> {
    let client = f.client.clone();
    let mut done = 0usize;
    let mut committed = ops::FILE_SYNC4;
    let mut verifier = [0; 8];
    while done < data.len() {
        let piece = data.slice(done..);
        let at = offset + done as u64;
        let r = stateful(&client, &[&f], "WRITE", |ids| {
            vec![
                Op::PutFh(f.fh.clone()),
                Op::Write {
                    stateid: ids[0],
                    offset: at,
                    stable,
                    data: piece.clone(),
                },
            ]
        })
        .await?;
        let Some(OpRes::Write {
            count,
            committed: c,
            verifier: v,
        }) = r.last()
        else {
            return Err(unexpected("WRITE", &r));
        };
        if *count == 0 {
            return Err(Error::Protocol("WRITE: server wrote 0 bytes".into()));
        }
        done += *count as usize;
        committed = committed.min(*c);
        verifier = *v;
    }
    Ok((committed, verifier))
}

impl NfsFile {
    /// The file's handle.
    pub fn handle(&self) -> FileHandle {
        FileHandle(self.inner.fh.clone())
    }

    fn client(&self) -> &NfsClient {
        &self.inner.client
    }

    async fn run(
        &self,
        label: &'static str,
        build: impl Fn(StateId) -> Vec<Op>,
    ) -> Result<Vec<OpRes>> {
        stateful(self.client(), &[&self.inner], label, |ids| build(ids[0])).await
    }

    /// Reads up to `len` bytes at `offset`; shorter only at end of file.
    /// Large reads are split into `max_read_size` RPCs run in parallel.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let chunk = self.client().inner.max_read as usize;
        if len <= chunk {
            return Ok(read_chunk(self.inner.clone(), offset, len as u32).await?.1);
        }
        let window = self.client().inner.session.config().slots as usize;
        let n = len.div_ceil(chunk);
        let mut parts: Vec<Option<Bytes>> = vec![None; n];
        let mut set = JoinSet::new();
        let mut next = 0;
        while next < n || !set.is_empty() {
            while next < n && set.len() < window {
                let off = next * chunk;
                let cnt = chunk.min(len - off);
                let f = self.inner.clone();
                let i = next;
                set.spawn(async move { (i, read_chunk(f, offset + off as u64, cnt as u32).await) });
                next += 1;
            }
            if let Some(res) = set.join_next().await {
                let (i, r) = res.map_err(|e| Error::Protocol(format!("READ task failed: {e}")))?;
                parts[i] = Some(r?.1);
            }
        }
        let mut out = BytesMut::with_capacity(len);
        for (i, p) in parts.into_iter().enumerate() {
            let p = p.unwrap_or_default();
            let full = p.len() == chunk.min(len - i * chunk);
            out.extend_from_slice(&p);
            if !full {
                break;
            }
        }
        Ok(out.freeze())
    }

    /// Writes all of `data` at `offset` and makes it durable: one FILE_SYNC
    /// WRITE if it fits, else parallel UNSTABLE WRITEs of `max_write_size`
    /// followed by COMMIT (re-written with FILE_SYNC if the server's write
    /// verifier changed in between, e.g. it restarted).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let chunk = self.client().inner.max_write as usize;
        let data = Bytes::copy_from_slice(data);
        if data.len() <= chunk {
            write_chunk(self.inner.clone(), offset, data, ops::FILE_SYNC4).await?;
            return Ok(());
        }
        for stable in [ops::UNSTABLE4, ops::FILE_SYNC4] {
            let window = self.client().inner.session.config().slots as usize;
            let n = data.len().div_ceil(chunk);
            let mut set = JoinSet::new();
            let mut next = 0;
            let mut verifiers = Vec::with_capacity(n);
            let mut all_sync = true;
            while next < n || !set.is_empty() {
                while next < n && set.len() < window {
                    let off = next * chunk;
                    let piece = data.slice(off..data.len().min(off + chunk));
                    let f = self.inner.clone();
                    set.spawn(write_chunk(f, offset + off as u64, piece, stable));
                    next += 1;
                }
                if let Some(res) = set.join_next().await {
                    let (committed, v) =
                        res.map_err(|e| Error::Protocol(format!("WRITE task failed: {e}")))??;
                    all_sync &= committed == ops::FILE_SYNC4;
                    verifiers.push(v);
                }
            }
            if all_sync {
                return Ok(());
            }
            let v = self.commit_range(offset, data.len() as u64).await?;
            if verifiers.iter().all(|w| *w == v) {
                return Ok(());
            }
        }
        Err(Error::Protocol(
            "WRITE: write verifier kept changing".into(),
        ))
    }

    async fn commit_range(&self, offset: u64, len: u64) -> Result<[u8; 8]> {
        let count = u32::try_from(len).unwrap_or(0); // 0 = to end of file
        let fh = self.inner.fh.clone();
        let r = self
            .client()
            .compound("COMMIT", &[Op::PutFh(fh), Op::Commit { offset, count }])
            .await?;
        match r.last() {
            Some(OpRes::Commit { verifier }) => Ok(*verifier),
            _ => Err(unexpected("COMMIT", &r)),
        }
    }

    /// Flushes all unstable data of the file to stable storage (COMMIT).
    pub async fn commit(&self) -> Result<()> {
        self.commit_range(0, 0).await.map(drop)
    }

    /// Attributes of the file.
    pub async fn metadata(&self) -> Result<Metadata> {
        self.client().metadata_fh(&self.handle()).await
    }

    /// Current size of the file.
    pub async fn size(&self) -> Result<u64> {
        let r = self
            .client()
            .compound(
                "GETATTR",
                &[
                    Op::PutFh(self.inner.fh.clone()),
                    Op::GetAttr(bitmap(&[attr::SIZE])),
                ],
            )
            .await?;
        match r.last() {
            Some(OpRes::GetAttr(Attrs { size: Some(s), .. })) => Ok(*s),
            _ => Err(unexpected("GETATTR", &r)),
        }
    }

    /// Truncates or extends (sparsely) the file to `size` bytes (SETATTR).
    pub async fn set_size(&self, size: u64) -> Result<()> {
        let fh = self.inner.fh.clone();
        self.run("SETATTR", |stateid| {
            vec![
                Op::PutFh(fh.clone()),
                Op::SetAttr {
                    stateid,
                    attrs: SetAttrs {
                        size: Some(size),
                        mode: None,
                    },
                },
            ]
        })
        .await
        .map(drop)
    }

    async fn seek(&self, offset: u64, what: u32) -> Result<Option<u64>> {
        let fh = self.inner.fh.clone();
        let r = self
            .run("SEEK", |stateid| {
                vec![
                    Op::PutFh(fh.clone()),
                    Op::Seek {
                        stateid,
                        offset,
                        what,
                    },
                ]
            })
            .await;
        match r {
            Err(Error::Nfs {
                status: Nfs4Status::Nxio,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
            Ok(r) => match r.last() {
                Some(OpRes::Seek { eof, offset }) => {
                    // knfsd reports "no more data" as eof with offset = size.
                    if *eof && what == ops::CONTENT_DATA {
                        let size = self.size().await?;
                        if *offset >= size {
                            return Ok(None);
                        }
                    }
                    Ok(Some(*offset))
                }
                _ => Err(unexpected("SEEK", &r)),
            },
        }
    }

    /// Offset of the first byte of data at or after `offset`, or `None` if
    /// there is no data after it (SEEK, `NFS4_CONTENT_DATA`).
    pub async fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(offset, ops::CONTENT_DATA).await
    }

    /// Offset of the first hole at or after `offset` (the end of the file
    /// counts as a hole), or `None` if `offset` is beyond the end (SEEK,
    /// `NFS4_CONTENT_HOLE`).
    pub async fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(offset, ops::CONTENT_HOLE).await
    }

    /// Punches a hole: `length` bytes at `offset` read back as zeros and
    /// release their storage (DEALLOCATE). The size does not change.
    pub async fn deallocate(&self, offset: u64, length: u64) -> Result<()> {
        let fh = self.inner.fh.clone();
        self.run("DEALLOCATE", |stateid| {
            vec![
                Op::PutFh(fh.clone()),
                Op::Deallocate {
                    stateid,
                    offset,
                    length,
                },
            ]
        })
        .await
        .map(drop)
    }

    /// Reserves storage for `length` bytes at `offset`, extending the file if
    /// needed (ALLOCATE).
    pub async fn allocate(&self, offset: u64, length: u64) -> Result<()> {
        let fh = self.inner.fh.clone();
        self.run("ALLOCATE", |stateid| {
            vec![
                Op::PutFh(fh.clone()),
                Op::Allocate {
                    stateid,
                    offset,
                    length,
                },
            ]
        })
        .await
        .map(drop)
    }

    /// Closes the file (CLOSE).
    pub async fn close(self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        close_file(&self.inner).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components() {
        assert_eq!(components("/a//b/./c/").unwrap(), vec!["a", "b", "c"]);
        assert!(components("").unwrap().is_empty());
        assert!(components("a/../b").is_err());
        assert!(split_parent("/").is_err());
        assert_eq!(
            split_parent("x/y").unwrap(),
            (vec!["x".to_owned()], "y".to_owned())
        );
    }

    #[tokio::test]
    async fn connect_refused_is_typed_and_fast() {
        // Bind then drop a listener: the port is (very likely) closed now.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let e = NfsClient::connect(&addr, opts).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{e}");
        assert!(
            matches!(
                e,
                Error::Io { op: "CONNECT", .. } | Error::Timeout { op: "CONNECT", .. }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        // Accepts the connection but never answers (like slirp with no guest).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let _srv = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let opts = ClientOptions {
            connect_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let e = NfsClient::connect(&addr, opts).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(matches!(e, Error::Timeout { op: "CONNECT", .. }), "{e:?}");
    }
}

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
