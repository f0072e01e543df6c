//! The FUSE descriptor keeper: a small process that holds every serving `/dev/fuse` file
//! of a snapshotter, so that its FUSE connections (and the containers on them) outlive a
//! crash or restart of the snapshotter (`docs/fuse-handover.md`, step 2).
//!
//! ```text
//!  slacker-snapshotter ──unix socket <root>/keeper.sock (SOCK_SEQPACKET, SCM_RIGHTS)──▶ keeper
//!    new FUSE session      keep {volume, negotiated} + the serving /dev/fuse file
//!    session stopped       forget {volume}                   (the keeper closes its copy)
//!    start (after a crash) list ──▶ item {volume, negotiated} + a copy of each file, end
//!                          resume the active volumes' connections, forget the rest
//! ```
//!
//! - **Started** by the snapshotter ([`KeeperClient::connect_or_start`]) when nothing
//!   answers at the socket: `PROGRAM --fd-keeper SOCKET`, stdio detached, its log in
//!   `<root>/keeper.log`. It calls `setsid` first, so nothing aimed at the snapshotter's
//!   session or process group (a terminal's hang-up, a `kill -9` of the snapshotter)
//!   reaches it. One keeper per socket, hence per snapshotter `root`: it holds an
//!   exclusive `flock` on `<root>/keeper.lock` for its lifetime; a second keeper started
//!   on the same socket waits up to 2 s for that lock and leaves if it stays taken.
//! - **A stale socket file** (a keeper that died, a previous boot) is harmless: connecting
//!   to it is refused, so the snapshotter starts a keeper, which takes the lock (locks die
//!   with their holder) and replaces the file.
//! - **Holds** one file per volume name (a second `keep` of a name replaces the first).
//!   It reads nothing from them: while the snapshotter is down, the kernel queues the
//!   connection's requests and the container's IO waits. It closes a file when told to
//!   (`forget`), and on its own when the connection ends (the file polls `POLLERR` once the
//!   FUSE mount is unmounted or aborted), so a snapshotter that dies for good leaves no
//!   open connection of an unmounted volume behind.
//! - **Exits** once it holds nothing and no client is connected, for [`IDLE_EXIT`] in a
//!   row (a running snapshotter stays connected). While it holds files it stays, even with
//!   no snapshotter: that is its job; killing it aborts the connections it holds (the
//!   containers on them then see `EIO`, as without a keeper).
//! - **Only the keeper's own user** (root) may talk to it: the socket is mode 0600 and
//!   each client's `SO_PEERCRED` uid is checked (a descriptor of `/dev/fuse` is the power
//!   to answer a filesystem's requests).
//!
//! The messages are small JSON documents, one per datagram; a file travels as
//! `SCM_RIGHTS` with the message that names it (rustix's safe `sendmsg`/`recvmsg`).

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::FlockOperation;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use slacker_fuse::Negotiated;

/// The keeper's socket, under the snapshotter's `root`.
pub const SOCKET_NAME: &str = "keeper.sock";

/// How long the keeper waits, holding nothing and with no client, before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);

/// The command-line flag that runs a program as the keeper: `PROGRAM --fd-keeper SOCKET`.
pub const FLAG: &str = "--fd-keeper";

const MAX_MESSAGE: usize = 4096;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What the keeper and its clients fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeeperError {
    /// A system call on the keeper's socket, lock or log failed.
    #[error("fd keeper at {}: {what}: {source}", socket.display())]
    Io {
        /// The keeper's socket.
        socket: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A message that is not the protocol's, or the keeper's answer to a bad request.
    #[error("fd keeper at {}: {message}", socket.display())]
    Protocol {
        /// The keeper's socket.
        socket: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A keeper was started but did not answer in time.
    #[error("fd keeper at {}: {} {FLAG} did not answer within {START_TIMEOUT:?}: {why}", socket.display(), program.display())]
    NotStarted {
        /// The keeper's socket.
        socket: PathBuf,
        /// The program started as the keeper.
        program: PathBuf,
        /// The last connection error, or how the program exited.
        why: String,
    },
}

/// A file the keeper held, as [`KeeperClient::list`] hands it back.
#[derive(Debug)]
#[non_exhaustive]
pub struct Kept {
    /// The volume whose connection it is.
    pub volume: String,
    /// What the connection's first server agreed at `INIT`.
    pub negotiated: Negotiated,
    /// A descriptor of the serving `/dev/fuse` file (for [`slacker_fuse::FuseSession::resume`]).
    pub fd: OwnedFd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Keep {
        volume: String,
        negotiated: Negotiated,
    },
    Forget {
        volume: String,
    },
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    Done,
    Item {
        volume: String,
        negotiated: Negotiated,
    },
    End,
    Error {
        message: String,
    },
}

fn send(sock: BorrowedFd<'_>, msg: &impl Serialize, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for SCM_RIGHTS"));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// One datagram and the descriptors that came with it; `None` at end of stream.
fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if got.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message or its descriptors were truncated",
        ));
    }
    buf.truncate(got.bytes);
    Ok(Some((buf, fds)))
}

fn unix_addr(socket: &Path) -> io::Result<SocketAddrUnix> {
    SocketAddrUnix::new(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{} (a unix socket path is at most 107 bytes)", e),
        )
    })
}

/// The lock file beside `socket` that the live keeper holds.
fn lock_path(socket: &Path) -> PathBuf {
    socket.with_extension("lock")
}

/// The keeper's log beside `socket`.
pub fn log_path(socket: &Path) -> PathBuf {
    socket.with_extension("log")
}

/// Leaves the caller's session and process group (`setsid`), as the keeper process does
/// first: a hang-up of the snapshotter's terminal or a signal to its process group does
/// not reach it. Fails harmlessly when the process already leads a session.
pub fn detach() {
    let _ = rustix::process::setsid();
}

struct Held {
    negotiated: Negotiated,
    fd: OwnedFd,
}

/// The error of an IO step `what` on the keeper at `socket`, for `map_err`.
fn io_err<'a>(socket: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> KeeperError + 'a {
    move |e| KeeperError::Io {
        socket: socket.to_owned(),
        what,
        source: e,
    }
}

/// Runs the keeper on `socket` (what `slacker-snapshotter --fd-keeper SOCKET` does, after
/// [`detach`]): returns when it exits (see the [module docs](self)), after 2 s if another
/// keeper holds the socket's lock.
///
/// # Errors
/// The lock, socket or poll failing.
pub fn run(socket: &Path) -> Result<(), KeeperError> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(socket))
        .map_err(io_err(socket, "opening the lock file"))?;
    let t = Instant::now();
    loop {
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) if t.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                tracing::info!(socket = %socket.display(), "another fd keeper serves this socket");
                return Ok(());
            }
            Err(e) => return Err(io_err(socket, "locking")(e.into())),
        }
    }
    // Nobody listens on a socket file left behind: the lock says its keeper is gone.
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err(socket, "removing a stale socket file")(e));
        }
        _ => {}
    }
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| io_err(socket, "socket")(e.into()))?;
    let addr = unix_addr(socket).map_err(io_err(socket, "the socket path"))?;
    rustix::net::bind(&listener, &addr).map_err(|e| io_err(socket, "bind")(e.into()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(socket, "chmod 0600 of the socket"))?;
    }
    rustix::net::listen(&listener, 64).map_err(|e| io_err(socket, "listen")(e.into()))?;
    tracing::info!(socket = %socket.display(), pid = std::process::id(), "fd keeper serving");
    let r = serve(socket, &listener);
    // Only the lock holder removes the file, so no newer keeper's socket goes.
    let _ = std::fs::remove_file(socket);
    drop(lock);
    r
}

fn serve(socket: &Path, listener: &OwnedFd) -> Result<(), KeeperError> {
    let uid = rustix::process::geteuid();
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut idle_since = Some(Instant::now());
    loop {
        if held.is_empty() && clients.is_empty() {
            if idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_EXIT {
                tracing::info!(socket = %socket.display(), "fd keeper exits: it holds nothing and no snapshotter is connected");
                return Ok(());
            }
        } else {
            idle_since = None;
        }
        let revents: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(1 + clients.len() + held.len());
            fds.push(PollFd::new(listener, PollFlags::IN));
            fds.extend(clients.iter().map(|c| PollFd::new(c, PollFlags::IN)));
            // No events asked of a /dev/fuse file: only POLLERR (connection ended).
            fds.extend(
                held.values()
                    .map(|h| PollFd::new(&h.fd, PollFlags::empty())),
            );
            let timeout = Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(KeeperError::Io {
                        socket: socket.to_owned(),
                        what: "poll",
                        source: e.into(),
                    });
                }
            }
            fds.iter().map(PollFd::revents).collect()
        };
        let ended = PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL;
        let names: Vec<String> = held.keys().cloned().collect();
        for (name, r) in names.iter().zip(&revents[1 + clients.len()..]) {
            if r.intersects(ended) {
                held.remove(name);
                tracing::info!(volume = %name, "FUSE connection ended (unmounted or aborted): closed");
            }
        }
        let mut gone = Vec::new();
        for (i, r) in revents[1..1 + clients.len()].iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            match serve_one(clients[i].as_fd(), &mut held) {
                Ok(true) => {}
                Ok(false) => gone.push(i),
                Err(e) => {
                    tracing::warn!(error = %e, "fd keeper: dropping a client");
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if revents[0].contains(PollFlags::IN) {
            loop {
                match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
                    Ok(c) => match rustix::net::sockopt::socket_peercred(&c) {
                        Ok(cred) if cred.uid == uid => {
                            let _ = rustix::net::sockopt::set_socket_timeout(
                                &c,
                                rustix::net::sockopt::Timeout::Send,
                                Some(CALL_TIMEOUT),
                            );
                            clients.push(c);
                        }
                        Ok(cred) => tracing::warn!(
                            uid = cred.uid.as_raw(),
                            "fd keeper: refused a client of another user"
                        ),
                        Err(e) => tracing::warn!(error = %e, "fd keeper: no peer credentials"),
                    },
                    Err(rustix::io::Errno::WOULDBLOCK) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "fd keeper: accept");
                        break;
                    }
                }
            }
        }
    }
}

/// Serves one request of `client`; `Ok(false)` when it hung up.
fn serve_one(client: BorrowedFd<'_>, held: &mut BTreeMap<String, Held>) -> io::Result<bool> {
    let Some((bytes, mut fds)) = recv(client)? else {
        return Ok(false);
    };
    let req: Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("not a request: {e}");
            send(client, &Reply::Error { message }, None)?;
            return Ok(true);
        }
    };
    match req {
        Request::Keep { volume, negotiated } => {
            if fds.len() != 1 {
                let message = format!("keep {volume}: {} descriptors, not 1", fds.len());
                return send(client, &Reply::Error { message }, None).map(|()| true);
            }
            let fd = fds.remove(0);
            tracing::info!(volume = %volume, "keeping a FUSE connection");
            held.insert(volume, Held { negotiated, fd });
            send(client, &Reply::Done, None)?;
        }
        Request::Forget { volume } => {
            if held.remove(&volume).is_some() {
                tracing::info!(volume = %volume, "forgot a FUSE connection");
            }
            send(client, &Reply::Done, None)?;
        }
        Request::List => {
            for (volume, h) in held.iter() {
                let item = Reply::Item {
                    volume: volume.clone(),
                    negotiated: h.negotiated,
                };
                send(client, &item, Some(h.fd.as_fd()))?;
            }
            send(client, &Reply::End, None)?;
        }
    }
    Ok(true)
}

/// A connection to a keeper (the snapshotter's side). Blocking calls, each bounded by a
/// 10 s socket timeout; call them off the async runtime (`spawn_blocking`).
#[derive(Debug)]
pub struct KeeperClient {
    socket: PathBuf,
    sock: OwnedFd,
}

impl KeeperClient {
    /// Connects to the keeper at `socket`.
    ///
    /// # Errors
    /// No keeper listens there (`ENOENT`, `ECONNREFUSED`), or the socket calls fail.
    pub fn connect(socket: &Path) -> Result<Self, KeeperError> {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| io_err(socket, "socket")(e.into()))?;
        let addr = unix_addr(socket).map_err(io_err(socket, "the socket path"))?;
        rustix::net::connect(&sock, &addr).map_err(|e| io_err(socket, "connect")(e.into()))?;
        for dir in [
            rustix::net::sockopt::Timeout::Send,
            rustix::net::sockopt::Timeout::Recv,
        ] {
            rustix::net::sockopt::set_socket_timeout(&sock, dir, Some(CALL_TIMEOUT))
                .map_err(|e| io_err(socket, "socket timeout")(e.into()))?;
        }
        Ok(Self {
            socket: socket.to_owned(),
            sock,
        })
    }

    /// Connects to the keeper at `socket`, first starting one (`program --fd-keeper
    /// socket`, stderr appended to [`log_path`]) if none answers, and waits up to 10 s for
    /// it.
    ///
    /// # Errors
    /// The program not starting, or no keeper answering in time.
    pub fn connect_or_start(socket: &Path, program: &Path) -> Result<Self, KeeperError> {
        if let Ok(c) = Self::connect(socket) {
            return Ok(c);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(socket))
            .map_err(io_err(socket, "opening the keeper's log"))?;
        let mut child = Command::new(program)
            .arg(FLAG)
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io_err(socket, "starting the keeper"))?;
        tracing::info!(socket = %socket.display(), pid = child.id(), "started an fd keeper");
        let t = Instant::now();
        let result = loop {
            match Self::connect(socket) {
                Ok(c) => break Ok(c),
                Err(e) if t.elapsed() > START_TIMEOUT => {
                    break Err(KeeperError::NotStarted {
                        socket: socket.to_owned(),
                        program: program.to_owned(),
                        why: e.to_string(),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // Reap the keeper whenever it exits (it outlives this process unless it idles out
        // or loses the race for the lock).
        std::thread::Builder::new()
            .name("slacker-keeper-reap".into())
            .spawn(move || {
                let _ = child.wait();
            })
            .map_err(io_err(socket, "a thread to reap the keeper"))?;
        result
    }

    fn call(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Reply, KeeperError> {
        send(self.sock.as_fd(), req, fd).map_err(|e| self.io("sending a request", e))?;
        self.reply().map(|(r, _)| r)
    }

    fn reply(&self) -> Result<(Reply, Vec<OwnedFd>), KeeperError> {
        let (bytes, fds) = recv(self.sock.as_fd())
            .map_err(|e| self.io("reading a reply", e))?
            .ok_or_else(|| self.protocol("the keeper hung up".into()))?;
        let reply: Reply = serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(format!("not a reply: {e}")))?;
        match reply {
            Reply::Error { message } => Err(self.protocol(message)),
            r => Ok((r, fds)),
        }
    }

    fn io(&self, what: &'static str, source: io::Error) -> KeeperError {
        KeeperError::Io {
            socket: self.socket.clone(),
            what,
            source,
        }
    }

    fn protocol(&self, message: String) -> KeeperError {
        KeeperError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }

    fn done(&self, r: Reply) -> Result<(), KeeperError> {
        match r {
            Reply::Done => Ok(()),
            other => Err(self.protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Hands the keeper a descriptor of `volume`'s serving `/dev/fuse` file (it keeps its
    /// own copy; replaces what it held for `volume`).
    ///
    /// # Errors
    /// The keeper gone or refusing.
    pub fn keep(
        &self,
        volume: &str,
        negotiated: Negotiated,
        fd: BorrowedFd<'_>,
    ) -> Result<(), KeeperError> {
        let req = Request::Keep {
            volume: volume.to_owned(),
            negotiated,
        };
        let r = self.call(&req, Some(fd))?;
        self.done(r)
    }

    /// Tells the keeper to close what it holds for `volume` (nothing if it holds nothing):
    /// the session stopped, or is not to be resumed (closing the last descriptor of a
    /// connection aborts it).
    ///
    /// # Errors
    /// The keeper gone or refusing.
    pub fn forget(&self, volume: &str) -> Result<(), KeeperError> {
        let req = Request::Forget {
            volume: volume.to_owned(),
        };
        let r = self.call(&req, None)?;
        self.done(r)
    }

    /// A copy of every descriptor the keeper holds, with its volume and parameters (the
    /// keeper keeps its own).
    ///
    /// # Errors
    /// The keeper gone, refusing, or an item without its descriptor.
    pub fn list(&self) -> Result<Vec<Kept>, KeeperError> {
        send(self.sock.as_fd(), &Request::List, None)
            .map_err(|e| self.io("sending a request", e))?;
        let mut out = Vec::new();
        loop {
            match self.reply()? {
                (Reply::End, _) => return Ok(out),
                (Reply::Item { volume, negotiated }, mut fds) if fds.len() == 1 => {
                    out.push(Kept {
                        volume,
                        negotiated,
                        fd: fds.remove(0),
                    });
                }
                (other, fds) => {
                    return Err(self.protocol(format!(
                        "unexpected reply {other:?} with {} descriptors",
                        fds.len()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The keeper's protocol on a real unix socket and real descriptors (sockets stand in
    //! for `/dev/fuse` files: the keeper only holds, polls and passes them). The keeper
    //! runs on a thread here; the snapshotter's tests run it as its own process.
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn start(dir: &Path) -> (PathBuf, std::thread::JoinHandle<Result<(), KeeperError>>) {
        let socket = dir.join(SOCKET_NAME);
        let s = socket.clone();
        let t = std::thread::spawn(move || run(&s));
        let t0 = Instant::now();
        while KeeperClient::connect(&socket).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(5), "no keeper");
            std::thread::sleep(Duration::from_millis(10));
        }
        (socket, t)
    }

    #[test]
    fn keeps_lists_forgets_and_exits_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        // A stale socket file (a keeper of a previous boot): replaced.
        std::fs::write(dir.path().join(SOCKET_NAME), b"").unwrap();
        let (socket, keeper) = start(dir.path());
        let n = Negotiated::new(1 << 20, true);
        let (mut r, w) = UnixStream::pair().unwrap();
        {
            let c = KeeperClient::connect(&socket).unwrap();
            c.keep("ctrd-1", n, w.as_fd()).unwrap();
            drop(w); // the keeper's copy keeps the socket open
            let kept = c.list().unwrap();
            assert_eq!(kept.len(), 1);
            assert_eq!((kept[0].volume.as_str(), kept[0].negotiated), ("ctrd-1", n));
            // The same open file: what is written on the received copy reaches the peer.
            std::fs::File::from(kept.into_iter().next().unwrap().fd)
                .write_all(b"x")
                .unwrap();
            let mut b = [0u8; 1];
            r.read_exact(&mut b).unwrap();
            c.forget("ctrd-1").unwrap();
            assert!(c.list().unwrap().is_empty());
        }
        // Every copy of the other end closed: EOF (the keeper closed its copy).
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        // Nothing held, nobody connected: it exits after IDLE_EXIT and removes its socket.
        keeper.join().unwrap().unwrap();
        assert!(!socket.exists());
    }

    #[test]
    fn a_second_keeper_on_the_same_socket_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, first) = start(dir.path());
        let c = KeeperClient::connect(&socket).unwrap();
        let t = Instant::now();
        run(&socket).unwrap();
        assert!(
            t.elapsed() >= Duration::from_secs(2),
            "it waited for the lock"
        );
        // The first still serves.
        assert!(c.list().unwrap().is_empty());
        drop(c);
        first.join().unwrap().unwrap();
    }

    #[test]
    fn a_connection_that_ends_is_closed_by_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, keeper) = start(dir.path());
        let c = KeeperClient::connect(&socket).unwrap();
        // A socket polls POLLHUP once its peer is gone, as a /dev/fuse file polls
        // POLLERR once its connection is aborted or unmounted.
        let (r, w) = UnixStream::pair().unwrap();
        c.keep("ctrd-2", Negotiated::new(4096, false), w.as_fd())
            .unwrap();
        drop(w);
        drop(r);
        let t = Instant::now();
        while !c.list().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "still held");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(c);
        keeper.join().unwrap().unwrap();
    }
}
