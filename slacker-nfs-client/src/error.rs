//! The client's error type and the NFSv4 status codes (RFC 8881 §15, RFC 7862 §11).

use std::fmt;
use std::time::Duration;

macro_rules! nfs4_status {
    ($($(#[$m:meta])* $name:ident = $code:literal => $text:literal,)*) => {
        /// An NFSv4 status code (`nfsstat4`) other than `NFS4_OK`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Nfs4Status {
            $($(#[$m])* #[doc = $text] $name,)*
            /// A code this client does not know.
            Other(u32),
        }

        impl Nfs4Status {
            /// Maps a wire code (not 0) to a status.
            pub fn from_code(code: u32) -> Self {
                match code {
                    $($code => Self::$name,)*
                    c => Self::Other(c),
                }
            }

            /// The wire code.
            pub fn code(self) -> u32 {
                match self {
                    $(Self::$name => $code,)*
                    Self::Other(c) => c,
                }
            }

            /// The RFC name, e.g. `NFS4ERR_NOENT`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$name => $text,)*
                    Self::Other(_) => "NFS4ERR_?",
                }
            }
        }
    };
}

nfs4_status! {
    Perm = 1 => "NFS4ERR_PERM",
    NoEnt = 2 => "NFS4ERR_NOENT",
    Io = 5 => "NFS4ERR_IO",
    Nxio = 6 => "NFS4ERR_NXIO",
    Access = 13 => "NFS4ERR_ACCESS",
    Exist = 17 => "NFS4ERR_EXIST",
    Xdev = 18 => "NFS4ERR_XDEV",
    NotDir = 20 => "NFS4ERR_NOTDIR",
    IsDir = 21 => "NFS4ERR_ISDIR",
    Inval = 22 => "NFS4ERR_INVAL",
    FBig = 27 => "NFS4ERR_FBIG",
    NoSpc = 28 => "NFS4ERR_NOSPC",
    Rofs = 30 => "NFS4ERR_ROFS",
    Mlink = 31 => "NFS4ERR_MLINK",
    NameTooLong = 63 => "NFS4ERR_NAMETOOLONG",
    NotEmpty = 66 => "NFS4ERR_NOTEMPTY",
    Dquot = 69 => "NFS4ERR_DQUOT",
    Stale = 70 => "NFS4ERR_STALE",
    BadHandle = 10001 => "NFS4ERR_BADHANDLE",
    BadCookie = 10003 => "NFS4ERR_BAD_COOKIE",
    NotSupp = 10004 => "NFS4ERR_NOTSUPP",
    TooSmall = 10005 => "NFS4ERR_TOOSMALL",
    ServerFault = 10006 => "NFS4ERR_SERVERFAULT",
    BadType = 10007 => "NFS4ERR_BADTYPE",
    Delay = 10008 => "NFS4ERR_DELAY",
    Same = 10009 => "NFS4ERR_SAME",
    Denied = 10010 => "NFS4ERR_DENIED",
    Expired = 10011 => "NFS4ERR_EXPIRED",
    Locked = 10012 => "NFS4ERR_LOCKED",
    Grace = 10013 => "NFS4ERR_GRACE",
    FhExpired = 10014 => "NFS4ERR_FHEXPIRED",
    ShareDenied = 10015 => "NFS4ERR_SHARE_DENIED",
    WrongSec = 10016 => "NFS4ERR_WRONGSEC",
    ClidInUse = 10017 => "NFS4ERR_CLID_INUSE",
    Resource = 10018 => "NFS4ERR_RESOURCE",
    Moved = 10019 => "NFS4ERR_MOVED",
    NoFileHandle = 10020 => "NFS4ERR_NOFILEHANDLE",
    MinorVersMismatch = 10021 => "NFS4ERR_MINOR_VERS_MISMATCH",
    StaleClientId = 10022 => "NFS4ERR_STALE_CLIENTID",
    StaleStateId = 10023 => "NFS4ERR_STALE_STATEID",
    OldStateId = 10024 => "NFS4ERR_OLD_STATEID",
    BadStateId = 10025 => "NFS4ERR_BAD_STATEID",
    BadSeqId = 10026 => "NFS4ERR_BAD_SEQID",
    NotSame = 10027 => "NFS4ERR_NOT_SAME",
    LockRange = 10028 => "NFS4ERR_LOCK_RANGE",
    Symlink = 10029 => "NFS4ERR_SYMLINK",
    RestoreFh = 10030 => "NFS4ERR_RESTOREFH",
    LeaseMoved = 10031 => "NFS4ERR_LEASE_MOVED",
    AttrNotSupp = 10032 => "NFS4ERR_ATTRNOTSUPP",
    NoGrace = 10033 => "NFS4ERR_NO_GRACE",
    ReclaimBad = 10034 => "NFS4ERR_RECLAIM_BAD",
    ReclaimConflict = 10035 => "NFS4ERR_RECLAIM_CONFLICT",
    BadXdr = 10036 => "NFS4ERR_BADXDR",
    LocksHeld = 10037 => "NFS4ERR_LOCKS_HELD",
    OpenMode = 10038 => "NFS4ERR_OPENMODE",
    BadOwner = 10039 => "NFS4ERR_BADOWNER",
    BadChar = 10040 => "NFS4ERR_BADCHAR",
    BadName = 10041 => "NFS4ERR_BADNAME",
    BadRange = 10042 => "NFS4ERR_BAD_RANGE",
    LockNotSupp = 10043 => "NFS4ERR_LOCK_NOTSUPP",
    OpIllegal = 10044 => "NFS4ERR_OP_ILLEGAL",
    Deadlock = 10045 => "NFS4ERR_DEADLOCK",
    FileOpen = 10046 => "NFS4ERR_FILE_OPEN",
    AdminRevoked = 10047 => "NFS4ERR_ADMIN_REVOKED",
    CbPathDown = 10048 => "NFS4ERR_CB_PATH_DOWN",
    BadIoMode = 10049 => "NFS4ERR_BADIOMODE",
    BadLayout = 10050 => "NFS4ERR_BADLAYOUT",
    BadSessionDigest = 10051 => "NFS4ERR_BAD_SESSION_DIGEST",
    BadSession = 10052 => "NFS4ERR_BADSESSION",
    BadSlot = 10053 => "NFS4ERR_BADSLOT",
    CompleteAlready = 10054 => "NFS4ERR_COMPLETE_ALREADY",
    ConnNotBoundToSession = 10055 => "NFS4ERR_CONN_NOT_BOUND_TO_SESSION",
    DelegAlreadyWanted = 10056 => "NFS4ERR_DELEG_ALREADY_WANTED",
    BackChanBusy = 10057 => "NFS4ERR_BACK_CHAN_BUSY",
    LayoutTryLater = 10058 => "NFS4ERR_LAYOUTTRYLATER",
    LayoutUnavailable = 10059 => "NFS4ERR_LAYOUTUNAVAILABLE",
    NoMatchingLayout = 10060 => "NFS4ERR_NOMATCHING_LAYOUT",
    RecallConflict = 10061 => "NFS4ERR_RECALLCONFLICT",
    UnknownLayoutType = 10062 => "NFS4ERR_UNKNOWN_LAYOUTTYPE",
    SeqMisordered = 10063 => "NFS4ERR_SEQ_MISORDERED",
    SequencePos = 10064 => "NFS4ERR_SEQUENCE_POS",
    ReqTooBig = 10065 => "NFS4ERR_REQ_TOO_BIG",
    RepTooBig = 10066 => "NFS4ERR_REP_TOO_BIG",
    RepTooBigToCache = 10067 => "NFS4ERR_REP_TOO_BIG_TO_CACHE",
    RetryUncachedRep = 10068 => "NFS4ERR_RETRY_UNCACHED_REP",
    UnsafeCompound = 10069 => "NFS4ERR_UNSAFE_COMPOUND",
    TooManyOps = 10070 => "NFS4ERR_TOO_MANY_OPS",
    OpNotInSession = 10071 => "NFS4ERR_OP_NOT_IN_SESSION",
    HashAlgUnsupp = 10072 => "NFS4ERR_HASH_ALG_UNSUPP",
    ClientIdBusy = 10074 => "NFS4ERR_CLIENTID_BUSY",
    PnfsIoHole = 10075 => "NFS4ERR_PNFS_IO_HOLE",
    SeqFalseRetry = 10076 => "NFS4ERR_SEQ_FALSE_RETRY",
    BadHighSlot = 10077 => "NFS4ERR_BAD_HIGH_SLOT",
    DeadSession = 10078 => "NFS4ERR_DEADSESSION",
    EncrAlgUnsupp = 10079 => "NFS4ERR_ENCR_ALG_UNSUPP",
    PnfsNoLayout = 10080 => "NFS4ERR_PNFS_NO_LAYOUT",
    NotOnlyOp = 10081 => "NFS4ERR_NOT_ONLY_OP",
    WrongCred = 10082 => "NFS4ERR_WRONG_CRED",
    WrongType = 10083 => "NFS4ERR_WRONG_TYPE",
    DirDelegUnavail = 10084 => "NFS4ERR_DIRDELEG_UNAVAIL",
    RejectDeleg = 10085 => "NFS4ERR_REJECT_DELEG",
    ReturnConflict = 10086 => "NFS4ERR_RETURNCONFLICT",
    DelegRevoked = 10087 => "NFS4ERR_DELEG_REVOKED",
    PartnerNotSupp = 10088 => "NFS4ERR_PARTNER_NOTSUPP",
    PartnerNoAuth = 10089 => "NFS4ERR_PARTNER_NO_AUTH",
    UnionNotSupp = 10090 => "NFS4ERR_UNION_NOTSUPP",
    OffloadDenied = 10091 => "NFS4ERR_OFFLOAD_DENIED",
    WrongLfs = 10092 => "NFS4ERR_WRONG_LFS",
    BadLabel = 10093 => "NFS4ERR_BADLABEL",
    OffloadNoReqs = 10094 => "NFS4ERR_OFFLOAD_NO_REQS",
}

impl fmt::Display for Nfs4Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(c) => write!(f, "NFS4ERR_{c}"),
            s => write!(f, "{} ({})", s.name(), s.code()),
        }
    }
}

impl Nfs4Status {
    /// Returned by SEQUENCE: the session (not just this request) is gone and a
    /// new one is needed.
    pub(crate) fn is_session_lost(self) -> bool {
        matches!(
            self,
            Self::BadSession
                | Self::DeadSession
                | Self::StaleClientId
                | Self::ConnNotBoundToSession
                | Self::SeqMisordered
                | Self::BadSlot
        )
    }

    /// An open stateid is no longer valid (server restart, lease expiry).
    pub(crate) fn is_stateid_lost(self) -> bool {
        matches!(
            self,
            Self::BadStateId
                | Self::StaleStateId
                | Self::Expired
                | Self::AdminRevoked
                | Self::DelegRevoked
        )
    }
}

/// An error from the NFS client. Every variant names the operation that failed
/// where one is known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered `op` with an NFSv4 error status.
    #[error("NFS {op} failed: {status}")]
    Nfs {
        /// The operation, e.g. `"CLONE"` or `"LOOKUP"`.
        op: &'static str,
        /// The status the server returned.
        status: Nfs4Status,
    },
    /// A socket error: the server is unreachable, refused the connection, or
    /// the connection was lost and could not be re-established.
    #[error("NFS {op}: I/O error talking to the server: {source}")]
    Io {
        /// The operation that was in progress, or `"CONNECT"`.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the configured timeout.
    #[error("NFS {op}: no answer from the server within {after:?}")]
    Timeout {
        /// The operation, or `"CONNECT"`.
        op: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The server sent something this client cannot parse or did not expect
    /// (including RPC-level rejections).
    #[error("NFS protocol error: {0}")]
    Protocol(String),
    /// A path argument is not usable (empty component, `..`, too long).
    #[error("invalid path {0:?}")]
    InvalidPath(String),
    /// The client was closed.
    #[error("NFS client is closed")]
    Closed,
}

impl Error {
    /// The NFS status if this is an [`Error::Nfs`].
    pub fn status(&self) -> Option<Nfs4Status> {
        match self {
            Self::Nfs { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True if the server said the file or directory does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(Nfs4Status::NoEnt)
    }

    /// True if the server said the name already exists.
    pub fn is_exists(&self) -> bool {
        self.status() == Some(Nfs4Status::Exist)
    }

    /// True if the server does not support the operation (e.g. CLONE on ext4).
    pub fn is_not_supported(&self) -> bool {
        matches!(
            self.status(),
            Some(Nfs4Status::NotSupp | Nfs4Status::OpIllegal)
        )
    }
}

impl From<super::xdr::XdrError> for Error {
    fn from(e: super::xdr::XdrError) -> Self {
        Self::Protocol(e.0)
    }
}

/// Result type of the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(Nfs4Status::from_code(2), Nfs4Status::NoEnt);
        assert_eq!(Nfs4Status::from_code(10004), Nfs4Status::NotSupp);
        assert_eq!(Nfs4Status::from_code(10078), Nfs4Status::DeadSession);
        assert_eq!(Nfs4Status::from_code(10094), Nfs4Status::OffloadNoReqs);
        assert_eq!(Nfs4Status::from_code(4242), Nfs4Status::Other(4242));
        assert_eq!(Nfs4Status::Grace.code(), 10013);
        let e = Error::Nfs {
            op: "CLONE",
            status: Nfs4Status::NotSupp,
        };
        assert_eq!(e.to_string(), "NFS CLONE failed: NFS4ERR_NOTSUPP (10004)");
        assert!(e.is_not_supported());
    }
}
