//! Every call the backend makes to the server, in one place, and the crash seam.
//!
//! Files are named relative to one of the backend's directories ([`Dir`]), whose file
//! handles are looked up once at build time; each call is one COMPOUND that starts
//! with `PUTFH <dir>` and LOOKUPs the name, so a file removed by another worker fails
//! with `NFS4ERR_NOENT` in the same round trip instead of being served from a stale
//! handle. Data is read and written with the anonymous stateid (no OPEN state to
//! recover after a server restart; a restarted server only needs a new session, which
//! the client creates by itself). Files are created by `OPEN` + `CLOSE` in one COMPOUND.
//!
//! Every call that changes something on the server is one COMPOUND, atomic and durable
//! there, and first passes a sync point of the [`CrashPlan`], if any: a test crashes
//! "the process" at every step boundary in turn.
//!
//! Durability does not rest on the export being `sync` alone: knfsd makes a namespace
//! change (OPEN-create, LINK, RENAME) durable through the file system's
//! `commit_metadata`/`write_inode`, which btrfs does not implement, so on btrfs such a
//! change reaches the disk only with the next transaction commit (up to 30 s later).
//! Every step that publishes a name therefore ends with a COMMIT of the file it names,
//! in the same COMPOUND: an fsync on the server, which logs the file together with its
//! new name. A name that must disappear durably is renamed into `tmp/` (and committed)
//! rather than removed; the REMOVE that follows may be lost to a crash, leaving garbage
//! for [`NfsBackend::gc`](crate::NfsBackend::gc), never a resurrected object.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use slacker_core::persist::CrashPlan;
use tokio::task::JoinSet;

use crate::client::ops::{self, Fh, Op, OpRes, OpenHow, SetAttrs, StateId, attr, bitmap};
use crate::client::{self, DirEntry, Error as ClientError, FileHandle, Nfs4Status, NfsClient};
use crate::error::NfsError;
use crate::meta;

type R<T> = std::result::Result<T, NfsError>;

/// One of the backend's directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Base,
    Volumes,
    Snapshots,
    Tmp,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Base => "",
            Dir::Volumes => "volumes",
            Dir::Snapshots => "snapshots",
            Dir::Tmp => "tmp",
        }
    }
}

/// The server, the directories and the crash plan.
#[derive(Debug)]
pub(crate) struct Remote {
    client: NfsClient,
    server: String,
    base: String,
    dirs: [Fh; 4],
    plan: Option<Arc<CrashPlan>>,
}

fn fh_of(r: &[OpRes]) -> Option<Fh> {
    r.iter().rev().find_map(|o| match o {
        OpRes::GetFh(f) => Some(f.clone()),
        _ => None,
    })
}

fn unexpected(op: &str, r: &[OpRes]) -> ClientError {
    ClientError::Protocol(format!("{op}: unexpected results {r:?}"))
}

/// Splits `a/b/c` into LOOKUPs of all but the last component, and the last.
fn split(path: &str) -> (Vec<Op>, String) {
    let mut comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let last = comps.pop().unwrap_or_default().to_owned();
    (
        comps
            .into_iter()
            .map(|c| Op::Lookup(c.to_owned()))
            .collect(),
        last,
    )
}

impl Remote {
    /// Looks up (creating where missing) the base directory and its subdirectories.
    pub(crate) async fn open(
        client: NfsClient,
        server: String,
        base: String,
        plan: Option<Arc<CrashPlan>>,
    ) -> R<Self> {
        let wrap = |path: &str, source| NfsError::Client {
            server: server.clone(),
            path: path.to_owned(),
            source,
        };
        let base_fh = match client.lookup(&base).await {
            Ok(f) => f.0,
            Err(e) if e.is_not_found() => {
                client.mkdir_all(&base).await.map_err(|e| wrap(&base, e))?;
                client.lookup(&base).await.map_err(|e| wrap(&base, e))?.0
            }
            Err(e) => return Err(wrap(&base, e)),
        };
        // The usual case (reopen): one round trip.
        let mut all = Vec::new();
        for d in [Dir::Volumes, Dir::Snapshots, Dir::Tmp] {
            all.extend([
                Op::PutFh(base_fh.clone()),
                Op::Lookup(d.name().into()),
                Op::GetFh,
            ]);
        }
        let subs: Vec<Fh> = match client.compound("LOOKUP", &all).await {
            Ok(r) => r
                .iter()
                .filter_map(|o| match o {
                    OpRes::GetFh(f) => Some(f.clone()),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_not_found() => {
                let mut v = Vec::new();
                for d in [Dir::Volumes, Dir::Snapshots, Dir::Tmp] {
                    let path = format!("{base}/{}", d.name());
                    client.mkdir_all(&path).await.map_err(|e| wrap(&path, e))?;
                    v.push(client.lookup(&path).await.map_err(|e| wrap(&path, e))?.0);
                }
                v
            }
            Err(e) => return Err(wrap(&base, e)),
        };
        let [v, s, t] = <[Fh; 3]>::try_from(subs)
            .map_err(|r| wrap(&base, ClientError::Protocol(format!("LOOKUP: {r:?}"))))?;
        Ok(Self {
            client,
            server,
            base,
            dirs: [base_fh, v, s, t],
            plan,
        })
    }

    /// The client (for closing it).
    pub(crate) fn client(&self) -> &NfsClient {
        &self.client
    }

    /// `host:port`.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// The path of `name` in `dir`, relative to the NFSv4 root.
    pub(crate) fn path(&self, dir: Dir, name: &str) -> String {
        match dir {
            Dir::Base => format!("{}/{name}", self.base),
            d => format!("{}/{}/{name}", self.base, d.name()),
        }
    }

    fn fh(&self, dir: Dir) -> Fh {
        self.dirs[dir as usize].clone()
    }

    fn err(&self, dir: Dir, name: &str, source: ClientError) -> NfsError {
        NfsError::Client {
            server: self.server.clone(),
            path: self.path(dir, name),
            source,
        }
    }

    /// `PUTFH dir` and LOOKUPs down to (but not including) the last component.
    fn parent(&self, dir: Dir, path: &str) -> (Vec<Op>, String) {
        let (lookups, last) = split(path);
        let mut ops = vec![Op::PutFh(self.fh(dir))];
        ops.extend(lookups);
        (ops, last)
    }

    /// `PUTFH dir` and LOOKUPs of every component.
    fn locate(&self, dir: Dir, path: &str) -> Vec<Op> {
        let (mut ops, last) = self.parent(dir, path);
        ops.push(Op::Lookup(last));
        ops
    }

    /// Passes a sync point of the crash plan.
    pub(crate) fn point(&self, what: &'static str, dir: Dir, name: &str) -> R<()> {
        match &self.plan {
            Some(p) => p.point(what).map_err(|source| NfsError::Crash {
                what,
                path: self.path(dir, name),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Whether a simulated crash has happened (nothing may be cleaned up after it).
    pub(crate) fn crashed(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| p.crashed())
    }

    async fn run(&self, label: &'static str, dir: Dir, name: &str, ops: &[Op]) -> R<Vec<OpRes>> {
        self.client
            .compound(label, ops)
            .await
            .map_err(|e| self.err(dir, name, e))
    }

    /// Reads a whole (small) file; `None` if it does not exist.
    pub(crate) async fn read_file(&self, dir: Dir, name: &str) -> R<Option<Bytes>> {
        let max = self.client.max_read_size();
        let mut ops = self.locate(dir, name);
        ops.extend([
            Op::GetFh,
            Op::Read {
                stateid: StateId::ANONYMOUS,
                offset: 0,
                count: max,
            },
        ]);
        let r = match self.run("READ", dir, name, &ops).await {
            Ok(r) => r,
            Err(e) if e.is_gone() => return Ok(None),
            Err(e) => return Err(e),
        };
        let fh = fh_of(&r);
        let Some(OpRes::Read { eof, data }) = r.last() else {
            return Err(self.err(dir, name, unexpected("READ", &r)));
        };
        if *eof || data.len() < max as usize {
            return Ok(Some(data.clone()));
        }
        let mut out = BytesMut::from(&data[..]);
        let fh = fh.ok_or_else(|| self.err(dir, name, unexpected("READ", &r)))?;
        loop {
            let r = self
                .run(
                    "READ",
                    dir,
                    name,
                    &[
                        Op::PutFh(fh.clone()),
                        Op::Read {
                            stateid: StateId::ANONYMOUS,
                            offset: out.len() as u64,
                            count: max,
                        },
                    ],
                )
                .await?;
            let Some(OpRes::Read { eof, data }) = r.last() else {
                return Err(self.err(dir, name, unexpected("READ", &r)));
            };
            out.extend_from_slice(data);
            if *eof || data.is_empty() {
                return Ok(Some(out.freeze()));
            }
        }
    }

    /// Whether `name` exists in `dir`.
    pub(crate) async fn exists(&self, dir: Dir, name: &str) -> R<bool> {
        match self.run("LOOKUP", dir, name, &self.locate(dir, name)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_gone() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates an empty file (sparse, of `size` bytes if given), failing with
    /// `NFS4ERR_EXIST` if the name exists.
    pub(crate) async fn create(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        size: Option<u64>,
    ) -> R<()> {
        self.point(what, dir, name)?;
        let (mut ops, last) = self.parent(dir, name);
        ops.push(self.client.open_op(
            last,
            OpenHow::Guarded(SetAttrs {
                size,
                mode: Some(0o644),
            }),
        ));
        ops.push(Op::GetFh);
        ops.push(Op::Close(StateId::CURRENT));
        ops.push(commit_all());
        let r = self.run("OPEN", dir, name, &ops).await?;
        self.return_delegation(&r).await;
        Ok(())
    }

    /// As [`create`](Self::create), for a name that carries this backend's own nonce:
    /// `NFS4ERR_EXIST` can then only mean that this request was executed already and its
    /// reply lost (a re-send after a lost session executes it again), so it is success.
    pub(crate) async fn create_own(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        size: Option<u64>,
    ) -> R<()> {
        match self.create(what, dir, name, size).await {
            Err(e) if e.is_exists() => {
                if let Some(size) = size {
                    self.set_size("size re-created file", dir, name, size)
                        .await?;
                }
                Ok(())
            }
            r => r,
        }
    }

    /// Gives back a delegation the server handed out although it was asked not to.
    async fn return_delegation(&self, r: &[OpRes]) {
        let deleg = r.iter().find_map(|o| match o {
            OpRes::Open {
                delegation: Some(d),
                ..
            } => Some(*d),
            _ => None,
        });
        if let (Some(d), Some(fh)) = (deleg, fh_of(r)) {
            let _ = self
                .client
                .compound("DELEGRETURN", &[Op::PutFh(fh), Op::DelegReturn(d)])
                .await;
        }
    }

    /// Writes `data` durably into a new temporary file in `tmp/`; returns its name.
    pub(crate) async fn put_temp(&self, what: &'static str, nonce: &str, data: &[u8]) -> R<String> {
        let name = meta::temp(nonce);
        self.point(what, Dir::Tmp, &name)?;
        let max = self.client.max_write_size() as usize;
        let head = Bytes::copy_from_slice(&data[..data.len().min(max)]);
        let ops = [
            Op::PutFh(self.fh(Dir::Tmp)),
            self.client.open_op(
                name.clone(),
                OpenHow::Guarded(SetAttrs {
                    size: None,
                    mode: Some(0o644),
                }),
            ),
            Op::GetFh,
            Op::Write {
                stateid: StateId::CURRENT,
                offset: 0,
                stable: ops::FILE_SYNC4,
                data: head.clone(),
            },
            Op::Close(StateId::CURRENT),
        ];
        let r = match self.run("WRITE", Dir::Tmp, &name, &ops).await {
            Ok(r) => r,
            // The name carries our nonce: it exists only because this very request was
            // executed once already (its reply lost with the session, then re-sent).
            // Write the data again into it.
            Err(e) if e.is_exists() => {
                self.write_data(Dir::Tmp, &name, 0, data).await?;
                return Ok(name);
            }
            Err(e) => return Err(e),
        };
        self.return_delegation(&r).await;
        let written = r.iter().find_map(|o| match o {
            OpRes::Write { count, .. } => Some(*count as usize),
            _ => None,
        });
        let done = written.ok_or_else(|| self.err(Dir::Tmp, &name, unexpected("WRITE", &r)))?;
        if done < data.len() {
            self.write_data(Dir::Tmp, &name, done as u64, &data[done..])
                .await?;
        }
        Ok(name)
    }

    /// RENAME `from_dir/from` over `to_dir/to` (atomic, replaces `to`).
    pub(crate) async fn rename(
        &self,
        what: &'static str,
        (from_dir, from): (Dir, &str),
        (to_dir, to): (Dir, &str),
    ) -> R<()> {
        self.point(what, to_dir, to)?;
        let ops = [
            Op::PutFh(self.fh(from_dir)),
            Op::SaveFh,
            Op::PutFh(self.fh(to_dir)),
            Op::Rename {
                old: from.to_owned(),
                new: to.to_owned(),
            },
            Op::Lookup(to.to_owned()),
            commit_all(),
        ];
        match self.run("RENAME", from_dir, from, &ops).await {
            // Our source (a name with our nonce) is gone and the target is there: this
            // RENAME was executed already, its reply lost and the request re-sent.
            Err(e) if e.is_gone() && self.renamed(from_dir, from, to_dir, to).await? => Ok(()),
            r => r.map(drop),
        }
    }

    /// Whether `from` is gone and `to` exists (a RENAME that already happened).
    async fn renamed(&self, from_dir: Dir, from: &str, to_dir: Dir, to: &str) -> R<bool> {
        Ok(!self.exists(from_dir, from).await? && self.exists(to_dir, to).await?)
    }

    /// The file handle of `dir/name`, `None` if it does not exist.
    async fn handle(&self, dir: Dir, name: &str) -> R<Option<Fh>> {
        let mut ops = self.locate(dir, name);
        ops.push(Op::GetFh);
        match self.run("LOOKUP", dir, name, &ops).await {
            Ok(r) => Ok(fh_of(&r)),
            Err(e) if e.is_gone() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a file so that it stays removed after a crash: RENAME into `tmp/` (and
    /// COMMIT), then REMOVE there (which a crash may undo: garbage, not a comeback).
    pub(crate) async fn remove_durably(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        nonce: &str,
    ) -> R<()> {
        let gone = meta::temp(nonce);
        let (parent, last) = self.parent(dir, name);
        self.point(what, dir, name)?;
        let mut ops = parent;
        ops.extend([
            Op::SaveFh,
            Op::PutFh(self.fh(Dir::Tmp)),
            Op::Rename {
                old: last,
                new: gone.clone(),
            },
            Op::Lookup(gone.clone()),
            commit_all(),
        ]);
        match self.run("RENAME", dir, name, &ops).await {
            Ok(_) => {}
            // Executed already (reply lost, request re-sent): the file is in tmp/.
            Err(e) if e.is_gone() && self.renamed(dir, name, Dir::Tmp, &gone).await? => {}
            Err(e) => return Err(e),
        }
        match self.remove("remove renamed file", Dir::Tmp, &gone).await {
            // `gone` carries our nonce: nobody else removes it, so it is our own REMOVE.
            Err(e) if e.is_gone() => Ok(()),
            r => r,
        }
    }

    /// LINK `from_dir/from` as `to_dir/to` (atomic; `NFS4ERR_EXIST` if `to` exists).
    pub(crate) async fn link(
        &self,
        what: &'static str,
        (from_dir, from): (Dir, &str),
        (to_dir, to): (Dir, &str),
    ) -> R<()> {
        self.point(what, to_dir, to)?;
        let ops = [
            Op::PutFh(self.fh(from_dir)),
            Op::Lookup(from.to_owned()),
            Op::SaveFh,
            Op::PutFh(self.fh(to_dir)),
            Op::Link(to.to_owned()),
            Op::Lookup(to.to_owned()),
            commit_all(),
        ];
        match self.run("LINK", to_dir, to, &ops).await {
            // `to` exists: if it is the very file `from` names (same file handle), this
            // LINK was executed already, its reply lost and the request re-sent.
            Err(e) if e.is_exists() => {
                let (a, b) = (
                    self.handle(from_dir, from).await?,
                    self.handle(to_dir, to).await?,
                );
                if a.is_some() && a == b {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            r => r.map(drop),
        }
    }

    /// Removes a file or an empty directory.
    pub(crate) async fn remove(&self, what: &'static str, dir: Dir, name: &str) -> R<()> {
        self.point(what, dir, name)?;
        let (mut ops, last) = self.parent(dir, name);
        ops.push(Op::Remove(last));
        self.run("REMOVE", dir, name, &ops).await.map(drop)
    }

    /// Creates a directory (`NFS4ERR_EXIST` if the name exists).
    pub(crate) async fn mkdir(&self, what: &'static str, dir: Dir, name: &str) -> R<()> {
        self.point(what, dir, name)?;
        let (mut ops, last) = self.parent(dir, name);
        ops.push(Op::Mkdir {
            name: last,
            mode: 0o755,
        });
        self.run("CREATE", dir, name, &ops).await.map(drop)
    }

    /// Entries of `dir/sub` (or of `dir` itself).
    pub(crate) async fn list(&self, dir: Dir, sub: Option<&str>) -> R<Vec<DirEntry>> {
        let name = sub.unwrap_or("");
        let fh = match sub {
            None => FileHandle(self.fh(dir)),
            Some(s) => {
                let mut ops = self.locate(dir, s);
                ops.push(Op::GetFh);
                let r = self.run("LOOKUP", dir, s, &ops).await?;
                FileHandle(fh_of(&r).ok_or_else(|| self.err(dir, s, unexpected("LOOKUP", &r)))?)
            }
        };
        self.client
            .read_dir_fh(&fh)
            .await
            .map_err(|e| self.err(dir, name, e))
    }

    /// Reads `len` bytes at `offset` of `dir/name` (zeros past its end), in parallel
    /// READs of at most the server's maximum. With `guard`, every READ first LOOKUPs
    /// that name too, so that the read fails with `NOENT` once it is gone.
    pub(crate) async fn read(
        &self,
        (dir, name): (Dir, &str),
        guard: Option<(Dir, &str)>,
        offset: u64,
        len: usize,
    ) -> R<Bytes> {
        let mut prefix = Vec::new();
        if let Some((gd, gn)) = guard {
            prefix.extend(self.locate(gd, gn));
        }
        prefix.extend(self.locate(dir, name));
        let prefix = Arc::new(prefix);
        let chunk = self.client.max_read_size() as usize;
        let n = len.div_ceil(chunk);
        let mut parts: Vec<Option<Bytes>> = vec![None; n];
        let mut set = JoinSet::new();
        let mut next = 0;
        while next < n || !set.is_empty() {
            while next < n && set.len() < self.client.slots() {
                let off = next * chunk;
                let count = chunk.min(len - off) as u32;
                let (client, prefix, i) = (self.client.clone(), prefix.clone(), next);
                set.spawn(async move {
                    let mut ops = (*prefix).clone();
                    ops.push(Op::Read {
                        stateid: StateId::ANONYMOUS,
                        offset: offset + off as u64,
                        count,
                    });
                    (i, client.compound("READ", &ops).await)
                });
                next += 1;
            }
            if let Some(res) = set.join_next().await {
                let (i, r) = res.map_err(|e| {
                    self.err(dir, name, ClientError::Protocol(format!("READ task: {e}")))
                })?;
                let r = r.map_err(|e| self.err(dir, name, e))?;
                match r.last() {
                    Some(OpRes::Read { data, .. }) => parts[i] = Some(data.clone()),
                    _ => return Err(self.err(dir, name, unexpected("READ", &r))),
                }
            }
        }
        let mut out = BytesMut::zeroed(len);
        for (i, p) in parts.into_iter().enumerate() {
            let p = p.unwrap_or_default();
            let at = i * chunk;
            let n = p.len().min(len - at);
            out[at..at + n].copy_from_slice(&p[..n]);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset` of `dir/name` durably: one `FILE_SYNC` WRITE if it
    /// fits, else parallel `UNSTABLE` WRITEs and a COMMIT (re-sent `FILE_SYNC` if the
    /// server's write verifier changed in between, i.e. it restarted).
    pub(crate) async fn write(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> R<()> {
        self.point(what, dir, name)?;
        self.write_data(dir, name, offset, data).await
    }

    async fn write_data(&self, dir: Dir, name: &str, offset: u64, data: &[u8]) -> R<()> {
        let prefix = Arc::new(self.locate(dir, name));
        let chunk = self.client.max_write_size() as usize;
        let data = Bytes::copy_from_slice(data);
        let single = data.len() <= chunk;
        for stable in [ops::UNSTABLE4, ops::FILE_SYNC4] {
            let stable = if single { ops::FILE_SYNC4 } else { stable };
            let n = data.len().div_ceil(chunk);
            let mut set = JoinSet::new();
            let mut next = 0;
            let mut verifiers = Vec::with_capacity(n);
            let mut all_sync = true;
            while next < n || !set.is_empty() {
                while next < n && set.len() < self.client.slots() {
                    let off = next * chunk;
                    let piece = data.slice(off..data.len().min(off + chunk));
                    let (client, prefix) = (self.client.clone(), prefix.clone());
                    set.spawn(write_piece(
                        client,
                        prefix,
                        offset + off as u64,
                        piece,
                        stable,
                    ));
                    next += 1;
                }
                if let Some(res) = set.join_next().await {
                    let (committed, v) = res
                        .map_err(|e| {
                            self.err(dir, name, ClientError::Protocol(format!("WRITE task: {e}")))
                        })?
                        .map_err(|e| self.err(dir, name, e))?;
                    all_sync &= committed == ops::FILE_SYNC4;
                    verifiers.push(v);
                }
            }
            if all_sync {
                return Ok(());
            }
            let mut ops = (*prefix).clone();
            ops.push(Op::Commit {
                offset,
                count: u32::try_from(data.len()).unwrap_or(0),
            });
            let r = self.run("COMMIT", dir, name, &ops).await?;
            let Some(OpRes::Commit { verifier }) = r.last() else {
                return Err(self.err(dir, name, unexpected("COMMIT", &r)));
            };
            if verifiers.iter().all(|w| w == verifier) {
                return Ok(());
            }
        }
        Err(self.err(
            dir,
            name,
            ClientError::Protocol("WRITE: the write verifier kept changing".into()),
        ))
    }

    /// Punches a hole (DEALLOCATE): the range reads as zeros.
    pub(crate) async fn deallocate(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        offset: u64,
        length: u64,
    ) -> R<()> {
        self.point(what, dir, name)?;
        let mut ops = self.locate(dir, name);
        ops.push(Op::Deallocate {
            stateid: StateId::ANONYMOUS,
            offset,
            length,
        });
        ops.push(commit_all());
        self.run("DEALLOCATE", dir, name, &ops).await.map(drop)
    }

    /// Sets the size (SETATTR): truncates, or extends sparsely.
    pub(crate) async fn set_size(
        &self,
        what: &'static str,
        dir: Dir,
        name: &str,
        size: u64,
    ) -> R<()> {
        self.point(what, dir, name)?;
        let mut ops = self.locate(dir, name);
        ops.push(Op::SetAttr {
            stateid: StateId::ANONYMOUS,
            attrs: SetAttrs {
                size: Some(size),
                mode: None,
            },
        });
        self.run("SETATTR", dir, name, &ops).await.map(drop)
    }

    fn src_dst(&self, src: (Dir, &str), dst: (Dir, &str)) -> Vec<Op> {
        let mut ops = self.locate(src.0, src.1);
        ops.push(Op::SaveFh);
        ops.extend(self.locate(dst.0, dst.1));
        ops
    }

    /// CLONE of the whole of `src` onto the (empty) `dst`: shares its extents.
    pub(crate) async fn clone_file(
        &self,
        what: &'static str,
        src: (Dir, &str),
        dst: (Dir, &str),
    ) -> R<()> {
        self.point(what, dst.0, dst.1)?;
        let mut ops = self.src_dst(src, dst);
        ops.push(Op::Clone {
            src: StateId::ANONYMOUS,
            dst: StateId::ANONYMOUS,
            src_offset: 0,
            dst_offset: 0,
            count: 0,
        });
        ops.push(commit_all());
        self.run("CLONE", dst.0, dst.1, &ops).await.map(drop)
    }

    async fn seek(
        &self,
        (dir, name): (Dir, &str),
        offset: u64,
        what: u32,
        size: u64,
    ) -> R<Option<u64>> {
        let mut ops = self.locate(dir, name);
        ops.push(Op::Seek {
            stateid: StateId::ANONYMOUS,
            offset,
            what,
        });
        match self.run("SEEK", dir, name, &ops).await {
            Err(e) if e.status() == Some(Nfs4Status::Nxio) => Ok(None),
            Err(e) => Err(e),
            // knfsd reports "no more data" as eof with the offset at the size.
            Ok(r) => match r.last() {
                Some(OpRes::Seek { offset, .. }) if *offset >= size => Ok(None),
                Some(OpRes::Seek { offset, .. }) => Ok(Some(*offset)),
                _ => Err(self.err(dir, name, unexpected("SEEK", &r))),
            },
        }
    }

    /// Server-side COPY of `src` (of `size` bytes) onto the empty `dst`: sizes `dst`
    /// first (sparse), then copies only the data segments SEEK finds, looping over
    /// short copies, and commits. The sizing is this step's sync point; the copy and the
    /// commit change nothing another reader could take for complete (the caller
    /// publishes `dst` only afterwards).
    pub(crate) async fn copy_file(
        &self,
        what: &'static str,
        src: (Dir, &str),
        dst: (Dir, &str),
        size: u64,
    ) -> R<u64> {
        self.set_size(what, dst.0, dst.1, size).await?;
        let mut pos = 0;
        let mut copied = 0;
        while pos < size {
            let Some(start) = self.seek(src, pos, ops::CONTENT_DATA, size).await? else {
                break;
            };
            let end = self
                .seek(src, start, ops::CONTENT_HOLE, size)
                .await?
                .unwrap_or(size)
                .min(size);
            let mut at = start;
            while at < end {
                let mut ops = self.src_dst(src, dst);
                ops.push(Op::Copy {
                    src: StateId::ANONYMOUS,
                    dst: StateId::ANONYMOUS,
                    src_offset: at,
                    dst_offset: at,
                    count: end - at,
                });
                let r = self.run("COPY", dst.0, dst.1, &ops).await?;
                let Some(OpRes::Copy { count, .. }) = r.last() else {
                    return Err(self.err(dst.0, dst.1, unexpected("COPY", &r)));
                };
                if *count == 0 {
                    return Err(self.err(
                        dst.0,
                        dst.1,
                        ClientError::Protocol(format!("COPY: nothing copied at {at}")),
                    ));
                }
                at += count;
                copied += count;
            }
            pos = end;
        }
        // Always, even when every COPY was FILE_SYNC or nothing was copied: the size
        // set above is a metadata change of its own.
        let mut ops = self.locate(dst.0, dst.1);
        ops.push(commit_all());
        self.run("COMMIT", dst.0, dst.1, &ops).await?;
        Ok(copied)
    }

    /// Whether the server's file system can CLONE: an empty probe file is cloned onto
    /// itself (nothing to share, but unsupported file systems refuse before looking).
    pub(crate) async fn can_clone(&self) -> R<bool> {
        match self
            .create("create clone probe", Dir::Base, meta::PROBE, None)
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(e),
        }
        let p = (Dir::Base, meta::PROBE);
        let mut ops = self.src_dst(p, p);
        ops.push(Op::Clone {
            src: StateId::ANONYMOUS,
            dst: StateId::ANONYMOUS,
            src_offset: 0,
            dst_offset: 0,
            count: 0,
        });
        match self.run("CLONE", Dir::Base, meta::PROBE, &ops).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_supported() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The server's clock: the modification time of a file created just now.
    pub(crate) async fn server_time(&self, nonce: &str) -> R<SystemTime> {
        let name = format!("{nonce}.clock");
        let ops = [
            Op::PutFh(self.fh(Dir::Tmp)),
            self.client.open_op(
                name.clone(),
                OpenHow::Guarded(SetAttrs {
                    size: None,
                    mode: Some(0o644),
                }),
            ),
            Op::GetFh,
            Op::GetAttr(bitmap(&[attr::TIME_MODIFY])),
            Op::Close(StateId::CURRENT),
        ];
        let r = self.run("OPEN", Dir::Tmp, &name, &ops).await?;
        self.return_delegation(&r).await;
        let t = r.iter().find_map(|o| match o {
            OpRes::GetAttr(a) => a.time_modify,
            _ => None,
        });
        let _ = self
            .run(
                "REMOVE",
                Dir::Tmp,
                &name,
                &[Op::PutFh(self.fh(Dir::Tmp)), Op::Remove(name.clone())],
            )
            .await;
        match t {
            Some((s, ns)) if s >= 0 => {
                Ok(SystemTime::UNIX_EPOCH + Duration::new(s as u64, ns.min(999_999_999)))
            }
            _ => Err(self.err(Dir::Tmp, &name, unexpected("GETATTR", &r))),
        }
    }
}

/// COMMIT of the whole current file (an fsync on the server).
fn commit_all() -> Op {
    Op::Commit {
        offset: 0,
        count: 0,
    }
}

async fn write_piece(
    client: NfsClient,
    prefix: Arc<Vec<Op>>,
    offset: u64,
    data: Bytes,
    stable: u32,
) -> client::Result<(u32, [u8; 8])> {
    let mut done = 0usize;
    let mut committed = ops::FILE_SYNC4;
    let mut verifier = [0; 8];
    while done < data.len() {
        let mut ops = (*prefix).clone();
        ops.push(Op::Write {
            stateid: StateId::ANONYMOUS,
            offset: offset + done as u64,
            stable,
            data: data.slice(done..),
        });
        let r = client.compound("WRITE", &ops).await?;
        let Some(OpRes::Write {
            count,
            committed: c,
            verifier: v,
        }) = r.last()
        else {
            return Err(unexpected("WRITE", &r));
        };
        if *count == 0 {
            return Err(ClientError::Protocol("WRITE: server wrote 0 bytes".into()));
        }
        done += *count as usize;
        committed = committed.min(*c);
        verifier = *v;
    }
    Ok((committed, verifier))
}
