//! NFSv4.1/4.2 COMPOUND operations: argument encoding and result decoding for
//! the subset this client uses (RFC 8881 §16–18, RFC 7862 §15).

use bytes::Bytes;

use super::error::{Error, Nfs4Status, Result};
use super::xdr::{Decoder, Encoder, XdrResult};

/// Operation numbers (`nfs_opnum4`).
#[allow(missing_docs)]
pub mod opnum {
    pub const CLOSE: u32 = 4;
    pub const COMMIT: u32 = 5;
    pub const CREATE: u32 = 6;
    pub const DELEGRETURN: u32 = 8;
    pub const GETATTR: u32 = 9;
    pub const GETFH: u32 = 10;
    pub const LINK: u32 = 11;
    pub const LOOKUP: u32 = 15;
    pub const OPEN: u32 = 18;
    pub const PUTFH: u32 = 22;
    pub const PUTROOTFH: u32 = 24;
    pub const READ: u32 = 25;
    pub const READDIR: u32 = 26;
    pub const REMOVE: u32 = 28;
    pub const RENAME: u32 = 29;
    pub const RESTOREFH: u32 = 31;
    pub const SAVEFH: u32 = 32;
    pub const SETATTR: u32 = 34;
    pub const WRITE: u32 = 38;
    pub const EXCHANGE_ID: u32 = 42;
    pub const CREATE_SESSION: u32 = 43;
    pub const DESTROY_SESSION: u32 = 44;
    pub const SEQUENCE: u32 = 53;
    pub const DESTROY_CLIENTID: u32 = 57;
    pub const RECLAIM_COMPLETE: u32 = 58;
    pub const ALLOCATE: u32 = 59;
    pub const COPY: u32 = 60;
    pub const DEALLOCATE: u32 = 62;
    pub const SEEK: u32 = 69;
    pub const CLONE: u32 = 71;
}

/// Attribute numbers (`fattr4_*`) this client encodes or decodes.
#[allow(missing_docs)]
pub mod attr {
    pub const TYPE: u32 = 1;
    pub const CHANGE: u32 = 3;
    pub const SIZE: u32 = 4;
    pub const FSID: u32 = 8;
    pub const LEASE_TIME: u32 = 10;
    pub const FILEID: u32 = 20;
    pub const MAXREAD: u32 = 30;
    pub const MAXWRITE: u32 = 31;
    pub const MODE: u32 = 33;
    pub const NUMLINKS: u32 = 35;
    pub const SPACE_USED: u32 = 45;
    pub const TIME_METADATA: u32 = 52;
    pub const TIME_MODIFY: u32 = 53;
}

/// Builds a `bitmap4` from attribute numbers.
pub fn bitmap(attrs: &[u32]) -> Vec<u32> {
    let mut words = Vec::new();
    for &a in attrs {
        let w = (a / 32) as usize;
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        words[w] |= 1 << (a % 32);
    }
    words
}

/// Maximum size of a file handle (`NFS4_FHSIZE`).
pub const FHSIZE: usize = 128;
const OPAQUE_LIMIT: usize = 1024;

/// Share access bits for OPEN.
pub const SHARE_ACCESS_READ: u32 = 1;
/// Share access bits for OPEN.
pub const SHARE_ACCESS_WRITE: u32 = 2;
/// Ask the server not to hand out a delegation (this client has no back channel).
pub const SHARE_ACCESS_WANT_NO_DELEG: u32 = 0x0400;

/// `stable_how4`.
pub const UNSTABLE4: u32 = 0;
/// `stable_how4`.
pub const FILE_SYNC4: u32 = 2;

/// `data_content4` for SEEK.
pub const CONTENT_DATA: u32 = 0;
/// `data_content4` for SEEK.
pub const CONTENT_HOLE: u32 = 1;

/// An NFSv4 file handle (opaque to the client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fh(pub Bytes);

/// A `stateid4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateId {
    /// Sequence number of the state.
    pub seqid: u32,
    /// Server-chosen identifier.
    pub other: [u8; 12],
}

impl StateId {
    /// The anonymous stateid (all zeros).
    pub const ANONYMOUS: Self = Self {
        seqid: 0,
        other: [0; 12],
    };

    /// The "current stateid" (RFC 8881 §16.2.3.1.2): stands for the stateid
    /// the previous operation of the same COMPOUND returned (e.g. OPEN's).
    pub const CURRENT: Self = Self {
        seqid: 1,
        other: [0; 12],
    };

    fn encode(&self, e: &mut Encoder) {
        e.u32(self.seqid).fixed(&self.other);
    }

    fn decode(d: &mut Decoder) -> XdrResult<Self> {
        Ok(Self {
            seqid: d.u32()?,
            other: d.array()?,
        })
    }
}

/// The type of a file system object (`nfs_ftype4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// Block device.
    BlockDevice,
    /// Character device.
    CharDevice,
    /// Symbolic link.
    Symlink,
    /// Socket.
    Socket,
    /// FIFO.
    Fifo,
    /// Any other type (named attributes and the like).
    Other(u32),
}

impl FileType {
    fn from_code(c: u32) -> Self {
        match c {
            1 => Self::Regular,
            2 => Self::Directory,
            3 => Self::BlockDevice,
            4 => Self::CharDevice,
            5 => Self::Symlink,
            6 => Self::Socket,
            7 => Self::Fifo,
            c => Self::Other(c),
        }
    }
}

/// Decoded attributes (`fattr4`); only what was requested and known is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    /// `type`.
    pub file_type: Option<FileType>,
    /// `change`.
    pub change: Option<u64>,
    /// `size`.
    pub size: Option<u64>,
    /// `fsid` (major, minor).
    pub fsid: Option<(u64, u64)>,
    /// `lease_time` in seconds.
    pub lease_time: Option<u32>,
    /// `fileid` (inode number).
    pub fileid: Option<u64>,
    /// `maxread`.
    pub maxread: Option<u64>,
    /// `maxwrite`.
    pub maxwrite: Option<u64>,
    /// `mode`.
    pub mode: Option<u32>,
    /// `numlinks`.
    pub numlinks: Option<u32>,
    /// `space_used` in bytes.
    pub space_used: Option<u64>,
    /// `time_metadata` (seconds, nanoseconds): the inode change time.
    pub time_metadata: Option<(i64, u32)>,
    /// `time_modify` (seconds, nanoseconds).
    pub time_modify: Option<(i64, u32)>,
}

impl Attrs {
    /// Decodes a `fattr4`.
    pub fn decode(d: &mut Decoder) -> XdrResult<Self> {
        let mask = d.u32_array(8)?;
        let list = d.opaque(1 << 20)?;
        let mut d = Decoder::new(list);
        let mut a = Self::default();
        for (w, word) in mask.iter().enumerate() {
            for bit in 0..32 {
                if word & (1 << bit) == 0 {
                    continue;
                }
                let n = w as u32 * 32 + bit;
                match n {
                    attr::TYPE => a.file_type = Some(FileType::from_code(d.u32()?)),
                    attr::CHANGE => a.change = Some(d.u64()?),
                    attr::SIZE => a.size = Some(d.u64()?),
                    attr::FSID => a.fsid = Some((d.u64()?, d.u64()?)),
                    attr::LEASE_TIME => a.lease_time = Some(d.u32()?),
                    attr::FILEID => a.fileid = Some(d.u64()?),
                    attr::MAXREAD => a.maxread = Some(d.u64()?),
                    attr::MAXWRITE => a.maxwrite = Some(d.u64()?),
                    attr::MODE => a.mode = Some(d.u32()?),
                    attr::NUMLINKS => a.numlinks = Some(d.u32()?),
                    attr::SPACE_USED => a.space_used = Some(d.u64()?),
                    attr::TIME_METADATA => a.time_metadata = Some((d.i64()?, d.u32()?)),
                    attr::TIME_MODIFY => a.time_modify = Some((d.i64()?, d.u32()?)),
                    // Not requested, size unknown: nothing after it can be decoded.
                    _ => return Ok(a),
                }
            }
        }
        Ok(a)
    }
}

/// Attributes to set (`fattr4` in SETATTR, OPEN and CREATE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttrs {
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New permission bits.
    pub mode: Option<u32>,
}

impl SetAttrs {
    fn encode(&self, e: &mut Encoder) {
        // Attributes go in ascending attribute-number order.
        let mut nums = Vec::new();
        let mut list = Encoder::default();
        if let Some(s) = self.size {
            nums.push(attr::SIZE);
            list.u64(s);
        }
        if let Some(m) = self.mode {
            nums.push(attr::MODE);
            list.u32(m);
        }
        e.u32_array(&bitmap(&nums));
        e.opaque(&list.finish());
    }
}

/// Fore/back channel attributes of a session (`channel_attrs4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelAttrs {
    /// `ca_headerpadsize`.
    pub header_pad: u32,
    /// `ca_maxrequestsize`.
    pub max_request: u32,
    /// `ca_maxresponsesize`.
    pub max_response: u32,
    /// `ca_maxresponsesize_cached`.
    pub max_response_cached: u32,
    /// `ca_maxoperations`.
    pub max_ops: u32,
    /// `ca_maxrequests` (number of slots).
    pub max_requests: u32,
}

impl ChannelAttrs {
    fn encode(&self, e: &mut Encoder) {
        e.u32(self.header_pad)
            .u32(self.max_request)
            .u32(self.max_response)
            .u32(self.max_response_cached)
            .u32(self.max_ops)
            .u32(self.max_requests)
            .u32_array(&[]);
    }

    fn decode(d: &mut Decoder) -> XdrResult<Self> {
        let a = Self {
            header_pad: d.u32()?,
            max_request: d.u32()?,
            max_response: d.u32()?,
            max_response_cached: d.u32()?,
            max_ops: d.u32()?,
            max_requests: d.u32()?,
        };
        d.u32_array(1)?;
        Ok(a)
    }
}

/// How OPEN creates (or not) the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenHow {
    /// Open an existing file.
    NoCreate,
    /// Create, or open if it exists; `attrs` are applied in both cases.
    Unchecked(SetAttrs),
    /// Create; fail with `NFS4ERR_EXIST` if it exists.
    Guarded(SetAttrs),
}

/// What OPEN opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenClaim {
    /// The name in the current (directory) file handle.
    Null(String),
    /// The current file handle itself (re-open after state loss).
    Fh,
}

/// One operation of a COMPOUND request.
#[derive(Debug, Clone)]
#[allow(missing_docs, dead_code)] // the protocol layer offers more than the API uses
pub enum Op {
    Sequence {
        session: [u8; 16],
        seqid: u32,
        slot: u32,
        highest_slot: u32,
        cache_this: bool,
    },
    ExchangeId {
        verifier: [u8; 8],
        owner: Bytes,
        flags: u32,
    },
    CreateSession {
        clientid: u64,
        sequence: u32,
        flags: u32,
        fore: ChannelAttrs,
        back: ChannelAttrs,
        cb_program: u32,
    },
    DestroySession([u8; 16]),
    DestroyClientId(u64),
    ReclaimComplete,
    PutRootFh,
    PutFh(Fh),
    Lookup(String),
    GetFh,
    GetAttr(Vec<u32>),
    SaveFh,
    RestoreFh,
    Open {
        share_access: u32,
        clientid: u64,
        owner: Bytes,
        how: OpenHow,
        claim: OpenClaim,
    },
    Close(StateId),
    DelegReturn(StateId),
    Read {
        stateid: StateId,
        offset: u64,
        count: u32,
    },
    Write {
        stateid: StateId,
        offset: u64,
        stable: u32,
        data: Bytes,
    },
    Commit {
        offset: u64,
        count: u32,
    },
    /// CREATE of a directory.
    Mkdir {
        name: String,
        mode: u32,
    },
    Remove(String),
    /// LINK: a new name `0` in the current (directory) file handle for the
    /// saved file handle.
    Link(String),
    Rename {
        old: String,
        new: String,
    },
    SetAttr {
        stateid: StateId,
        attrs: SetAttrs,
    },
    ReadDir {
        cookie: u64,
        verifier: [u8; 8],
        dircount: u32,
        maxcount: u32,
        attrs: Vec<u32>,
    },
    Allocate {
        stateid: StateId,
        offset: u64,
        length: u64,
    },
    Deallocate {
        stateid: StateId,
        offset: u64,
        length: u64,
    },
    Copy {
        src: StateId,
        dst: StateId,
        src_offset: u64,
        dst_offset: u64,
        count: u64,
    },
    Clone {
        src: StateId,
        dst: StateId,
        src_offset: u64,
        dst_offset: u64,
        count: u64,
    },
    Seek {
        stateid: StateId,
        offset: u64,
        what: u32,
    },
}

impl Op {
    /// The operation number.
    pub fn code(&self) -> u32 {
        use opnum::*;
        match self {
            Op::Sequence { .. } => SEQUENCE,
            Op::ExchangeId { .. } => EXCHANGE_ID,
            Op::CreateSession { .. } => CREATE_SESSION,
            Op::DestroySession(_) => DESTROY_SESSION,
            Op::DestroyClientId(_) => DESTROY_CLIENTID,
            Op::ReclaimComplete => RECLAIM_COMPLETE,
            Op::PutRootFh => PUTROOTFH,
            Op::PutFh(_) => PUTFH,
            Op::Lookup(_) => LOOKUP,
            Op::GetFh => GETFH,
            Op::GetAttr(_) => GETATTR,
            Op::SaveFh => SAVEFH,
            Op::RestoreFh => RESTOREFH,
            Op::Open { .. } => OPEN,
            Op::Close(_) => CLOSE,
            Op::DelegReturn(_) => DELEGRETURN,
            Op::Read { .. } => READ,
            Op::Write { .. } => WRITE,
            Op::Commit { .. } => COMMIT,
            Op::Mkdir { .. } => CREATE,
            Op::Remove(_) => REMOVE,
            Op::Link(_) => LINK,
            Op::Rename { .. } => RENAME,
            Op::SetAttr { .. } => SETATTR,
            Op::ReadDir { .. } => READDIR,
            Op::Allocate { .. } => ALLOCATE,
            Op::Deallocate { .. } => DEALLOCATE,
            Op::Copy { .. } => COPY,
            Op::Clone { .. } => CLONE,
            Op::Seek { .. } => SEEK,
        }
    }

    /// True if executing the operation twice differs from executing it once
    /// (the server should keep its reply for a retransmission).
    pub fn is_non_idempotent(&self) -> bool {
        matches!(
            self,
            Op::Open { .. }
                | Op::Close(_)
                | Op::Mkdir { .. }
                | Op::Remove(_)
                | Op::Rename { .. }
                | Op::Link(_)
        )
    }

    /// Encodes the operation (number and arguments).
    pub fn encode(&self, e: &mut Encoder) {
        e.u32(self.code());
        match self {
            Op::Sequence {
                session,
                seqid,
                slot,
                highest_slot,
                cache_this,
            } => {
                e.fixed(session)
                    .u32(*seqid)
                    .u32(*slot)
                    .u32(*highest_slot)
                    .bool(*cache_this);
            }
            Op::ExchangeId {
                verifier,
                owner,
                flags,
            } => {
                e.fixed(verifier).opaque(owner).u32(*flags);
                e.u32(0); // state_protect4_a: SP4_NONE
                e.u32(0); // client_impl_id<1>: none
            }
            Op::CreateSession {
                clientid,
                sequence,
                flags,
                fore,
                back,
                cb_program,
            } => {
                e.u64(*clientid).u32(*sequence).u32(*flags);
                fore.encode(e);
                back.encode(e);
                e.u32(*cb_program);
                e.u32(1).u32(0); // csa_sec_parms: [AUTH_NONE]
            }
            Op::DestroySession(s) => {
                e.fixed(s);
            }
            Op::DestroyClientId(c) => {
                e.u64(*c);
            }
            Op::ReclaimComplete => {
                e.bool(false); // rca_one_fs
            }
            Op::PutRootFh | Op::GetFh | Op::SaveFh | Op::RestoreFh => {}
            Op::PutFh(fh) => {
                e.opaque(&fh.0);
            }
            Op::Lookup(name) | Op::Remove(name) | Op::Link(name) => {
                e.str(name);
            }
            Op::GetAttr(bits) => {
                e.u32_array(bits);
            }
            Op::Open {
                share_access,
                clientid,
                owner,
                how,
                claim,
            } => {
                e.u32(0).u32(*share_access).u32(0 /* deny none */);
                e.u64(*clientid).opaque(owner);
                match how {
                    OpenHow::NoCreate => {
                        e.u32(0);
                    }
                    OpenHow::Unchecked(a) => {
                        e.u32(1).u32(0);
                        a.encode(e);
                    }
                    OpenHow::Guarded(a) => {
                        e.u32(1).u32(1);
                        a.encode(e);
                    }
                }
                match claim {
                    OpenClaim::Null(name) => {
                        e.u32(0).str(name);
                    }
                    OpenClaim::Fh => {
                        e.u32(4);
                    }
                }
            }
            Op::Close(s) => {
                e.u32(0);
                s.encode(e);
            }
            Op::DelegReturn(s) => s.encode(e),
            Op::Read {
                stateid,
                offset,
                count,
            } => {
                stateid.encode(e);
                e.u64(*offset).u32(*count);
            }
            Op::Write {
                stateid,
                offset,
                stable,
                data,
            } => {
                stateid.encode(e);
                e.u64(*offset).u32(*stable).opaque(data);
            }
            Op::Commit { offset, count } => {
                e.u64(*offset).u32(*count);
            }
            Op::Mkdir { name, mode } => {
                e.u32(2 /* NF4DIR */).str(name);
                SetAttrs {
                    size: None,
                    mode: Some(*mode),
                }
                .encode(e);
            }
            Op::Rename { old, new } => {
                e.str(old).str(new);
            }
            Op::SetAttr { stateid, attrs } => {
                stateid.encode(e);
                attrs.encode(e);
            }
            Op::ReadDir {
                cookie,
                verifier,
                dircount,
                maxcount,
                attrs,
            } => {
                e.u64(*cookie)
                    .fixed(verifier)
                    .u32(*dircount)
                    .u32(*maxcount)
                    .u32_array(attrs);
            }
            Op::Allocate {
                stateid,
                offset,
                length,
            }
            | Op::Deallocate {
                stateid,
                offset,
                length,
            } => {
                stateid.encode(e);
                e.u64(*offset).u64(*length);
            }
            Op::Copy {
                src,
                dst,
                src_offset,
                dst_offset,
                count,
            } => {
                src.encode(e);
                dst.encode(e);
                e.u64(*src_offset).u64(*dst_offset).u64(*count);
                e.bool(true); // ca_consecutive
                e.bool(true); // ca_synchronous
                e.u32(0); // ca_source_server<>: intra-server copy
            }
            Op::Clone {
                src,
                dst,
                src_offset,
                dst_offset,
                count,
            } => {
                src.encode(e);
                dst.encode(e);
                e.u64(*src_offset).u64(*dst_offset).u64(*count);
            }
            Op::Seek {
                stateid,
                offset,
                what,
            } => {
                stateid.encode(e);
                e.u64(*offset).u32(*what);
            }
        }
    }
}

/// Name of an operation number, for error messages.
pub fn op_name(code: u32) -> &'static str {
    use opnum::*;
    match code {
        CLOSE => "CLOSE",
        COMMIT => "COMMIT",
        CREATE => "CREATE",
        DELEGRETURN => "DELEGRETURN",
        GETATTR => "GETATTR",
        GETFH => "GETFH",
        LINK => "LINK",
        LOOKUP => "LOOKUP",
        OPEN => "OPEN",
        PUTFH => "PUTFH",
        PUTROOTFH => "PUTROOTFH",
        READ => "READ",
        READDIR => "READDIR",
        REMOVE => "REMOVE",
        RENAME => "RENAME",
        RESTOREFH => "RESTOREFH",
        SAVEFH => "SAVEFH",
        SETATTR => "SETATTR",
        WRITE => "WRITE",
        EXCHANGE_ID => "EXCHANGE_ID",
        CREATE_SESSION => "CREATE_SESSION",
        DESTROY_SESSION => "DESTROY_SESSION",
        SEQUENCE => "SEQUENCE",
        DESTROY_CLIENTID => "DESTROY_CLIENTID",
        RECLAIM_COMPLETE => "RECLAIM_COMPLETE",
        ALLOCATE => "ALLOCATE",
        COPY => "COPY",
        DEALLOCATE => "DEALLOCATE",
        SEEK => "SEEK",
        CLONE => "CLONE",
        _ => "UNKNOWN_OP",
    }
}

/// Result of a successful SEQUENCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceRes {
    /// `sr_highest_slotid`.
    pub highest_slot: u32,
    /// `sr_target_highest_slotid`.
    pub target_highest_slot: u32,
    /// `sr_status_flags`.
    pub status_flags: u32,
}

/// One directory entry from READDIR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDirEntry {
    /// Cookie to continue after this entry.
    pub cookie: u64,
    /// Entry name.
    pub name: String,
    /// Requested attributes.
    pub attrs: Attrs,
}

/// The result of one successful operation.
#[derive(Debug, Clone)]
#[allow(missing_docs, dead_code)] // decoded in full, not all used
pub enum OpRes {
    Sequence(SequenceRes),
    ExchangeId {
        clientid: u64,
        sequence: u32,
        flags: u32,
    },
    CreateSession {
        session: [u8; 16],
        fore: ChannelAttrs,
    },
    /// An operation whose result carries nothing this client uses.
    Done,
    GetFh(Fh),
    GetAttr(Attrs),
    Open {
        stateid: StateId,
        delegation: Option<StateId>,
    },
    Read {
        eof: bool,
        data: Bytes,
    },
    Write {
        count: u32,
        committed: u32,
        verifier: [u8; 8],
    },
    Commit {
        verifier: [u8; 8],
    },
    ReadDir {
        verifier: [u8; 8],
        entries: Vec<RawDirEntry>,
        eof: bool,
    },
    Copy {
        count: u64,
        committed: u32,
        verifier: [u8; 8],
    },
    Seek {
        eof: bool,
        offset: u64,
    },
}

fn skip_change_info(d: &mut Decoder) -> XdrResult<()> {
    d.bool()?;
    d.u64()?;
    d.u64()?;
    Ok(())
}

fn skip_nfsace(d: &mut Decoder) -> XdrResult<()> {
    d.u32()?;
    d.u32()?;
    d.u32()?;
    d.opaque(OPAQUE_LIMIT)?;
    Ok(())
}

fn decode_delegation(d: &mut Decoder) -> Result<Option<StateId>> {
    match d.u32()? {
        0 => Ok(None),
        1 => {
            let s = StateId::decode(d)?;
            d.bool()?;
            skip_nfsace(d)?;
            Ok(Some(s))
        }
        2 => {
            let s = StateId::decode(d)?;
            d.bool()?;
            match d.u32()? {
                1 => {
                    d.u64()?;
                }
                2 => {
                    d.u32()?;
                    d.u32()?;
                }
                l => return Err(Error::Protocol(format!("OPEN: unknown space limit {l}"))),
            }
            skip_nfsace(d)?;
            Ok(Some(s))
        }
        3 => {
            let why = d.u32()?;
            if why == 1 || why == 2 {
                d.bool()?;
            }
            Ok(None)
        }
        t => Err(Error::Protocol(format!(
            "OPEN: unknown delegation type {t}"
        ))),
    }
}

fn decode_ok(code: u32, d: &mut Decoder) -> Result<OpRes> {
    use opnum::*;
    Ok(match code {
        SEQUENCE => {
            let _session: [u8; 16] = d.array()?;
            let _seqid = d.u32()?;
            let _slot = d.u32()?;
            OpRes::Sequence(SequenceRes {
                highest_slot: d.u32()?,
                target_highest_slot: d.u32()?,
                status_flags: d.u32()?,
            })
        }
        EXCHANGE_ID => {
            let clientid = d.u64()?;
            let sequence = d.u32()?;
            let flags = d.u32()?;
            match d.u32()? {
                0 => {}
                1 => {
                    d.u32_array(8)?;
                    d.u32_array(8)?;
                }
                p => {
                    return Err(Error::Protocol(format!(
                        "EXCHANGE_ID: unsupported state protection {p}"
                    )));
                }
            }
            d.u64()?; // so_minor_id
            d.opaque(OPAQUE_LIMIT)?; // so_major_id
            d.opaque(OPAQUE_LIMIT)?; // server scope
            let n = d.u32()?;
            for _ in 0..n.min(1) {
                d.opaque(OPAQUE_LIMIT)?;
                d.opaque(OPAQUE_LIMIT)?;
                d.i64()?;
                d.u32()?;
            }
            OpRes::ExchangeId {
                clientid,
                sequence,
                flags,
            }
        }
        CREATE_SESSION => {
            let session = d.array()?;
            let _seq = d.u32()?;
            let _flags = d.u32()?;
            let fore = ChannelAttrs::decode(d)?;
            let _back = ChannelAttrs::decode(d)?;
            OpRes::CreateSession { session, fore }
        }
        GETFH => OpRes::GetFh(Fh(d.opaque(FHSIZE)?)),
        GETATTR => OpRes::GetAttr(Attrs::decode(d)?),
        OPEN => {
            let stateid = StateId::decode(d)?;
            skip_change_info(d)?;
            let _rflags = d.u32()?;
            d.u32_array(8)?;
            let delegation = decode_delegation(d)?;
            OpRes::Open {
                stateid,
                delegation,
            }
        }
        CLOSE => {
            StateId::decode(d)?;
            OpRes::Done
        }
        READ => {
            let eof = d.bool()?;
            let data = d.opaque(usize::MAX)?;
            OpRes::Read { eof, data }
        }
        WRITE => OpRes::Write {
            count: d.u32()?,
            committed: d.u32()?,
            verifier: d.array()?,
        },
        COMMIT => OpRes::Commit {
            verifier: d.array()?,
        },
        CREATE => {
            skip_change_info(d)?;
            d.u32_array(8)?;
            OpRes::Done
        }
        REMOVE | LINK => {
            skip_change_info(d)?;
            OpRes::Done
        }
        RENAME => {
            skip_change_info(d)?;
            skip_change_info(d)?;
            OpRes::Done
        }
        SETATTR => {
            d.u32_array(8)?;
            OpRes::Done
        }
        READDIR => {
            let verifier = d.array()?;
            let mut entries = Vec::new();
            while d.bool()? {
                let cookie = d.u64()?;
                let name = d.string(OPAQUE_LIMIT * 4)?;
                let attrs = Attrs::decode(d)?;
                entries.push(RawDirEntry {
                    cookie,
                    name,
                    attrs,
                });
            }
            let eof = d.bool()?;
            OpRes::ReadDir {
                verifier,
                entries,
                eof,
            }
        }
        COPY => {
            let callbacks = d.u32()?;
            if callbacks > 0 {
                return Err(Error::Protocol(
                    "COPY: the server answered asynchronously".into(),
                ));
            }
            let r = OpRes::Copy {
                count: d.u64()?,
                committed: d.u32()?,
                verifier: d.array()?,
            };
            d.bool()?;
            d.bool()?;
            r
        }
        SEEK => OpRes::Seek {
            eof: d.bool()?,
            offset: d.u64()?,
        },
        PUTFH | PUTROOTFH | LOOKUP | SAVEFH | RESTOREFH | DESTROY_SESSION | DESTROY_CLIENTID
        | RECLAIM_COMPLETE | ALLOCATE | DEALLOCATE | CLONE | DELEGRETURN => OpRes::Done,
        c => {
            return Err(Error::Protocol(format!(
                "cannot decode result of operation {c}"
            )));
        }
    })
}

/// Encodes COMPOUND arguments (tag empty): `first` (e.g. SEQUENCE), if
/// any, then `ops`.
pub fn encode_compound(minor: u32, first: Option<&Op>, ops: &[Op]) -> Bytes {
    let size: usize = ops
        .iter()
        .map(|o| match o {
            Op::Write { data, .. } => data.len() + 64,
            _ => 64,
        })
        .sum();
    let mut e = Encoder::with_capacity(size + 128);
    let n = ops.len() + usize::from(first.is_some());
    e.str("").u32(minor).u32(n as u32);
    for op in first.into_iter().chain(ops) {
        op.encode(&mut e);
    }
    e.finish()
}

/// The decoded COMPOUND reply: results of the operations that succeeded and,
/// if one failed, its number and status (processing stops there).
#[derive(Debug)]
pub struct CompoundReply {
    /// Results of the leading successful operations.
    pub results: Vec<OpRes>,
    /// The failing operation, if any.
    pub failed: Option<(u32, Nfs4Status)>,
}

/// Decodes a COMPOUND reply for the request `ops`.
pub fn decode_compound(body: Bytes, ops: &[Op]) -> Result<CompoundReply> {
    let mut d = Decoder::new(body);
    let _status = d.u32()?;
    d.opaque(OPAQUE_LIMIT)?; // tag
    let n = d.u32()? as usize;
    if n > ops.len() {
        return Err(Error::Protocol(format!(
            "COMPOUND: {n} results for {} operations",
            ops.len()
        )));
    }
    let mut results = Vec::with_capacity(n);
    for op in ops.iter().take(n) {
        let code = d.u32()?;
        if code != op.code() {
            if code == 10044 {
                // OP_ILLEGAL result: the server does not know the operation.
                let status = d.u32()?;
                return Ok(CompoundReply {
                    results,
                    failed: Some((op.code(), Nfs4Status::from_code(status))),
                });
            }
            return Err(Error::Protocol(format!(
                "COMPOUND: result for operation {code} where {} was expected",
                op.code()
            )));
        }
        let status = d.u32()?;
        if status != 0 {
            return Ok(CompoundReply {
                results,
                failed: Some((code, Nfs4Status::from_code(status))),
            });
        }
        results.push(decode_ok(code, &mut d)?);
    }
    if results.len() < ops.len() {
        return Err(Error::Protocol(format!(
            "COMPOUND: only {} of {} results and no error",
            results.len(),
            ops.len()
        )));
    }
    Ok(CompoundReply {
        results,
        failed: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps() {
        assert_eq!(bitmap(&[attr::TYPE, attr::SIZE]), vec![0b10010]);
        assert_eq!(bitmap(&[attr::SIZE, attr::MODE]), vec![1 << 4, 1 << 1]);
        assert_eq!(bitmap(&[attr::TIME_MODIFY]), vec![0, 1 << 21]);
    }

    #[test]
    fn exchange_id_flags_are_zero() {
        let op = Op::ExchangeId {
            verifier: [1; 8],
            owner: Bytes::from_static(b"abc"),
            flags: 0,
        };
        let mut e = Encoder::default();
        op.encode(&mut e);
        let b = e.finish();
        // opnum, verifier(8), owner len + 3 bytes + pad, flags, sp4, impl_id count
        assert_eq!(b.len(), 4 + 8 + 8 + 4 + 4 + 4);
        assert_eq!(&b[20..24], &[0, 0, 0, 0]);
    }

    #[test]
    fn attrs_decode() {
        let mut list = Encoder::default();
        list.u32(1).u64(4096).u64(77).u64(8192);
        let mut e = Encoder::default();
        e.u32_array(&bitmap(&[
            attr::TYPE,
            attr::SIZE,
            attr::FILEID,
            attr::SPACE_USED,
        ]));
        e.opaque(&list.finish());
        let a = Attrs::decode(&mut Decoder::new(e.finish())).unwrap();
        assert_eq!(a.file_type, Some(FileType::Regular));
        assert_eq!(a.size, Some(4096));
        assert_eq!(a.fileid, Some(77));
        assert_eq!(a.space_used, Some(8192));
        assert_eq!(a.mode, None);
    }

    #[test]
    fn compound_error_stops() {
        let ops = [Op::PutRootFh, Op::Lookup("x".into()), Op::GetFh];
        let mut e = Encoder::default();
        e.u32(2).str("").u32(2);
        e.u32(opnum::PUTROOTFH).u32(0);
        e.u32(opnum::LOOKUP).u32(2);
        let r = decode_compound(e.finish(), &ops).unwrap();
        assert_eq!(r.results.len(), 1);
        assert_eq!(r.failed, Some((opnum::LOOKUP, Nfs4Status::NoEnt)));
    }
}
