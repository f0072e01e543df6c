//! Traditional layers (tar, tar+gzip, tar+zstd): the fallback path.
//!
//! A layer that is not a [reference layer](super::reference) is an ordinary OCI layer:
//! a tar, possibly compressed (detected by magic bytes: gzip `1f 8b`, zstd `28 b5 2f fd`;
//! bzip2 and xz are refused), with OCI whiteouts (`.wh.<name>` removes `<name>` from the
//! lower layers, `.wh..wh..opq` hides every lower entry of its directory).
//! [`unpack`] applies one onto a directory tree (the parent's files, already extracted),
//! checking every entry **before** it touches the tree and never following a link:
//!
//! - absolute paths and `..` components are refused;
//! - a path that passes through a symlink, or a hard link whose target is outside the tree,
//!   missing or a directory, is refused; a relative symlink whose target climbs above the
//!   root is refused (absolute symlink targets are kept: they resolve inside the
//!   container's root at run time, and extraction never follows them);
//! - device nodes are refused unless [`TarOptions::allow_devices`]; fifos are kept;
//! - GNU sparse files, multi-volume members, PAX `size` overrides and unknown entry types
//!   are refused; GNU long names and PAX `path`/`linkpath` are honoured up to
//!   [`TarOptions::max_extension_bytes`];
//! - at most [`TarOptions::max_entries`] headers and [`TarOptions::max_bytes`] of
//!   uncompressed tar are read (a decompression bomb stops there).
//!
//! Every refusal is [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) (a
//! truncated or corrupt stream too) and nothing outside the target directory is ever
//! written; the layer store unpacks into a scratch directory and changes nothing it stores
//! until the whole layer was read.
//!
//! Every path is resolved beneath the root directory's file descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`) and
//! every entry is created with `*at` calls on its parent's descriptor, so no step of an
//! apply can follow a symlink out of the tree, even one the layer itself just created.
//!
//! What is kept, per entry: type, content, mode including setuid, setgid and sticky bits,
//! owner, extended attributes (PAX `SCHILY.xattr.*`: `security.capability`, `user.*`,
//! POSIX ACLs `system.posix_acl_*`, ...), link target, device numbers, hard links (also
//! to files of lower layers) and access and modification times to the nanosecond (PAX
//! `mtime`/`atime`; symlinks too, with `AT_SYMLINK_NOFOLLOW`). The order per entry is
//! content, owner, extended attributes, mode, times: `chown` clears set-id bits and file
//! capabilities, an ACL rewrites the group bits. Directories get their mode and times
//! after the whole layer, deepest first, so adding their entries does not change them.
//!
//! [`unpack_mounted`] (the layer store as root, into the loop-mounted ext4 of a clone of
//! the parent) creates device nodes in place. [`unpack`] (the unprivileged fallback into
//! a scratch directory) returns device nodes in [`Unpacked::specials`] for
//! [`ext4::add_specials`](super::ext4::add_specials), and counts what the process may not
//! set (owners, privileged extended attributes) in [`Unpacked::losses`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
    XattrFlags,
};

use crate::error::{Error, Result};

/// Limits and switches for reading traditional layers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TarOptions {
    /// Most tar headers (entries and extension headers) read; default 1,000,000.
    pub max_entries: u64,
    /// Most uncompressed tar bytes read; default 64 GiB.
    pub max_bytes: u64,
    /// Longest path or link target, in bytes; default 4096.
    pub max_path_bytes: usize,
    /// Largest GNU long-name or PAX extension header, in bytes; default 64 KiB.
    pub max_extension_bytes: u64,
    /// Whether character and block device nodes are accepted; default `false`.
    pub allow_devices: bool,
}

impl Default for TarOptions {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
            max_path_bytes: 4096,
            max_extension_bytes: 64 << 10,
            allow_devices: false,
        }
    }
}

impl TarOptions {
    /// Sets [`max_entries`](Self::max_entries).
    pub fn with_max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }
    /// Sets [`max_bytes`](Self::max_bytes).
    pub fn with_max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }
    /// Sets [`allow_devices`](Self::allow_devices).
    pub fn with_allow_devices(mut self, allow: bool) -> Self {
        self.allow_devices = allow;
        self
    }
}

/// How a layer stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`), possibly several members.
    Gzip,
    /// zstd (`28 b5 2f fd`, or a skippable frame), possibly several frames.
    Zstd,
}

/// Detects the compression of a layer from its first bytes (at least 6 when available).
///
/// # Errors
/// `InvalidInput` for an empty stream and for bzip2 or xz.
pub fn detect_compression(prefix: &[u8]) -> Result<Compression> {
    match prefix {
        [] => Err(Error::invalid("layer is empty")),
        [0x1f, 0x8b, ..] => Ok(Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Ok(Compression::Zstd),
        [m, 0x2a, 0x4d, 0x18, ..] if m & 0xf0 == 0x50 => Ok(Compression::Zstd),
        [b'B', b'Z', b'h', ..] => Err(Error::invalid("bzip2 layers are not supported")),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Err(Error::invalid("xz layers are not supported")),
        _ => Ok(Compression::None),
    }
}

/// Wraps `reader` (whose first bytes are `prefix`, already read) in the decompressor its
/// magic bytes call for.
///
/// # Errors
/// As [`detect_compression`]; `InvalidInput` for a corrupt zstd frame header.
pub fn decompress<'a, R: Read + Send + 'a>(
    prefix: Vec<u8>,
    reader: R,
) -> Result<Box<dyn Read + Send + 'a>> {
    let compression = detect_compression(&prefix)?;
    let whole = io::Cursor::new(prefix).chain(reader);
    Ok(match compression {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => Box::new(ZstdFrames::new(io::BufReader::new(whole))?),
    })
}

/// Reads up to `n` bytes (fewer only at the end of the stream).
///
/// # Errors
/// `InvalidInput` when reading fails.
pub fn read_prefix<R: Read + ?Sized>(reader: &mut R, n: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    reader
        .take(n as u64)
        .read_to_end(&mut out)
        .map_err(stream_error)?;
    Ok(out)
}

fn stream_error(e: io::Error) -> Error {
    Error::invalid(format!("layer stream: {e}"))
}

fn fs_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::backend("layer-unpack", format!("{what} {}: {e}", path.display()))
}

/// A zstd stream of one or more frames (skippable frames are skipped).
struct ZstdFrames<R: io::BufRead> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    active: bool,
}

impl<R: io::BufRead> ZstdFrames<R> {
    fn new(source: R) -> Result<Self> {
        let mut me = Self {
            source,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            active: false,
        };
        if !me.start().map_err(stream_error)? {
            return Err(Error::invalid("empty zstd stream"));
        }
        Ok(me)
    }

    /// Starts the next data frame, skipping skippable frames; `Ok(false)` at the end of
    /// the stream.
    fn start(&mut self) -> io::Result<bool> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => {
                    self.active = true;
                    return Ok(true);
                }
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::other("truncated zstd skippable frame"));
                    }
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl<R: io::BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::BlockDecodingStrategy;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.active && !self.start()? {
                return Ok(0);
            }
            let d = &mut self.decoder;
            while d.can_collect() < buf.len() && !d.is_finished() {
                let want = buf.len() - d.can_collect();
                d.decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(want))
                    .map_err(io::Error::other)?;
            }
            let n = d.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if d.is_finished() && d.can_collect() == 0 {
                if let (Some(want), Some(got)) =
                    (d.get_checksum_from_data(), d.get_calculated_checksum())
                {
                    if want != got {
                        return Err(io::Error::other("zstd frame checksum mismatch"));
                    }
                }
                self.active = false;
            }
        }
    }
}

/// Counts and limits the bytes read from the uncompressed tar.
struct Limited<R> {
    inner: R,
    read: u64,
    max: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read >= self.max {
            // Allow reading exactly `max` bytes; refuse to go further.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            return Err(io::Error::other(format!(
                "layer is larger than the limit of {} uncompressed bytes",
                self.max
            )));
        }
        let room = (self.max - self.read).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A device node to add to the image after it is built (an unprivileged unpack cannot
/// create one).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Special {
    /// What it is.
    pub kind: SpecialKind,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The kind of a [`Special`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecialKind {
    /// A named pipe.
    Fifo,
    /// A character device (major, minor).
    Char(u32, u32),
    /// A block device (major, minor).
    Block(u32, u32),
}

/// What an unpack could not keep, in entries. All zero when unpacking as root onto a
/// filesystem with extended attributes (a mounted ext4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Losses {
    /// Entries whose owner could not be set (not root): they belong to the unpacking
    /// user.
    pub owners: u64,
    /// Extended attributes (including POSIX ACLs and file capabilities) that the target
    /// refused.
    pub xattrs: u64,
}

impl Losses {
    /// Whether nothing was lost.
    pub fn is_empty(&self) -> bool {
        self.owners == 0 && self.xattrs == 0
    }
}

/// What [`unpack`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unpacked {
    /// Tar headers read (entries, whiteouts and extension headers).
    pub headers: u64,
    /// Uncompressed tar bytes read.
    pub tar_bytes: u64,
    /// Bytes of regular-file data written.
    pub file_bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Entries whose timestamps have a sub-second part (kept on a mounted ext4, truncated
    /// by `mke2fs -d`).
    pub subsecond_times: u64,
    /// Extended attributes applied.
    pub xattrs: u64,
    /// Device nodes, by path relative to the root, to add to the image (only from
    /// [`unpack`]; [`unpack_mounted`] creates them).
    pub specials: BTreeMap<PathBuf, Special>,
    /// What could not be kept.
    pub losses: Losses,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const META_PREFIX: &[u8] = b".wh..wh.";
/// PAX key prefix of extended attributes (GNU tar, Go's archive/tar, Docker, containerd).
pub const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Every path is resolved component by component under the root fd, never through a
/// symlink, `..`, a magic link or a mount point.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A timestamp with nanoseconds.
type Time = (i64, u32);

/// Metadata carried from extension headers to the entry they describe.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Time>,
    atime: Option<Time>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.path.is_none()
            && self.link.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.mtime.is_none()
            && self.atime.is_none()
            && self.xattrs.is_empty()
    }
}

/// The metadata of one entry, applied after its content.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<Time>,
    atime: Option<Time>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn times(&self) -> Option<Timestamps> {
        let m = self.mtime?;
        let a = self.atime.unwrap_or(m);
        let ts = |(s, n): Time| Timespec {
            tv_sec: s,
            tv_nsec: i64::from(n),
        };
        Some(Timestamps {
            last_access: ts(a),
            last_modification: ts(m),
        })
    }
}

/// Applies the uncompressed tar `reader` onto the directory `root` (which must exist and
/// may hold the parent's tree), with OCI whiteouts. See the [module docs](self) for what
/// is refused. Device nodes are not created but returned in [`Unpacked::specials`] (for
/// an image built with `mke2fs -d`); owners and extended attributes the process may not
/// set are counted in [`Unpacked::losses`].
///
/// # Errors
/// `InvalidInput` for a hostile or malformed layer (the tree may then hold part of the
/// layer: unpack into a scratch directory); `Backend` for IO errors on the tree.
pub fn unpack<R: Read>(reader: R, root: &Path, options: &TarOptions) -> Result<Unpacked> {
    unpack_with(reader, root, options, false)
}

/// As [`unpack`], but device nodes are created in place (root only): for applying a
/// layer directly into a mounted ext4 with every attribute kept.
///
/// # Errors
/// As [`unpack`].
pub fn unpack_mounted<R: Read>(reader: R, root: &Path, options: &TarOptions) -> Result<Unpacked> {
    unpack_with(reader, root, options, true)
}

fn unpack_with<R: Read>(
    reader: R,
    root: &Path,
    options: &TarOptions,
    create_devices: bool,
) -> Result<Unpacked> {
    let mut limited = Limited {
        inner: reader,
        read: 0,
        max: options.max_bytes,
    };
    let root_fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fs_error("open", root, e.into()))?;
    let mut u = Unpacker {
        root: root_fd,
        root_path: root.to_path_buf(),
        options,
        create_devices,
        added: HashSet::new(),
        dirs: BTreeMap::new(),
        out: Unpacked::default(),
    };
    {
        let mut archive = tar::Archive::new(&mut limited);
        let entries = archive.entries().map_err(stream_error)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(stream_error)?;
            u.out.headers += 1;
            if u.out.headers > options.max_entries {
                return Err(Error::invalid(format!(
                    "layer has more than {} tar headers",
                    options.max_entries
                )));
            }
            let kind = entry.header().entry_type().as_byte();
            match kind {
                b'L' | b'K' => {
                    let data = u.read_extension(&mut entry)?;
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    let slot = if kind == b'L' {
                        &mut pending.path
                    } else {
                        &mut pending.link
                    };
                    if slot.is_some() {
                        return Err(Error::invalid("two GNU long names for one entry"));
                    }
                    *slot = Some(data[..end].to_vec());
                }
                b'x' => {
                    let data = u.read_extension(&mut entry)?;
                    apply_pax(&data, &mut pending)?;
                }
                b'g' => {
                    // Global PAX headers only carry defaults we do not use; read and drop.
                    u.read_extension(&mut entry)?;
                }
                _ => {
                    let p = std::mem::take(&mut pending);
                    u.entry(&mut entry, kind, p)?;
                }
            }
        }
        if !pending.is_empty() {
            return Err(Error::invalid(
                "layer ends with an extension header that describes no entry",
            ));
        }
    }
    // Drain what follows the end-of-archive blocks so the limit and stream errors apply
    // to the whole layer (and a trailing gzip member is verified).
    io::copy(&mut limited, &mut io::sink()).map_err(stream_error)?;
    u.out.tar_bytes = limited.read;
    u.finish_dirs()?;
    Ok(u.out)
}

/// What [`spool`] found in a layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Spooled {
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
    /// Bytes of regular-file data the entries declare.
    pub file_bytes: u64,
    /// Tar headers.
    pub entries: u64,
}

/// Copies the (already decompressed) tar `reader` into the new file `path`, reading the
/// whole stream (so a corrupt gzip or zstd stream fails here, before anything is
/// applied), and sums the sizes its headers declare (for sizing a fresh volume).
///
/// # Errors
/// `InvalidInput` for a corrupt stream, one over `options.max_bytes` or
/// `options.max_entries`, or an unreadable tar; `Backend` for IO errors on `path`.
pub fn spool<R: Read>(reader: R, path: &Path, options: &TarOptions) -> Result<Spooled> {
    let mut limited = Limited {
        inner: reader,
        read: 0,
        max: options.max_bytes,
    };
    let mut f = File::create_new(path).map_err(|e| fs_error("create", path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_error(e)),
        };
        f.write_all(&buf[..n])
            .map_err(|e| fs_error("write", path, e))?;
    }
    let mut out = Spooled {
        tar_bytes: limited.read,
        ..Spooled::default()
    };
    let f = File::open(path).map_err(|e| fs_error("open", path, e))?;
    let mut archive = tar::Archive::new(f);
    for entry in archive.entries_with_seek().map_err(stream_error)?.raw(true) {
        let entry = entry.map_err(stream_error)?;
        out.entries += 1;
        if out.entries > options.max_entries {
            return Err(Error::invalid(format!(
                "layer has more than {} tar headers",
                options.max_entries
            )));
        }
        if matches!(entry.header().entry_type().as_byte(), b'0' | 0 | b'7') {
            out.file_bytes += entry.header().entry_size().map_err(stream_error)?;
        }
    }
    Ok(out)
}

/// Parses a PAX time (`seconds[.fraction]`, possibly negative) into seconds and
/// nanoseconds.
fn parse_time(v: &str) -> Option<Time> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: u32 = digits.parse().ok()?;
    Some(match (neg, nanos) {
        (false, n) => (secs, n),
        (true, 0) => (-secs, 0),
        (true, n) => (-secs - 1, 1_000_000_000 - n),
    })
}

fn apply_pax(data: &[u8], p: &mut Pending) -> Result<()> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| Error::invalid(format!("bad PAX record: {e}")))?;
        let key = ext
            .key()
            .map_err(|_| Error::invalid("PAX key is not UTF-8"))?;
        let text = || -> Result<&str> {
            ext.value()
                .map_err(|_| Error::invalid(format!("PAX {key} is not UTF-8")))
        };
        let num = || -> Result<u64> {
            let v = text()?;
            v.parse::<u64>()
                .map_err(|_| Error::invalid(format!("PAX {key}={v:?} is not a number")))
        };
        let time = || -> Result<Time> {
            let v = text()?;
            parse_time(v).ok_or_else(|| Error::invalid(format!("PAX {key}={v:?} is not a time")))
        };
        match key {
            "path" => p.path = Some(ext.value_bytes().to_vec()),
            "linkpath" => p.link = Some(ext.value_bytes().to_vec()),
            "uid" => p.uid = Some(num()?),
            "gid" => p.gid = Some(num()?),
            "mtime" => p.mtime = Some(time()?),
            "atime" => p.atime = Some(time()?),
            "size" => {
                return Err(Error::invalid(
                    "PAX size overrides are not supported (files over 8 GiB)",
                ));
            }
            k if k.starts_with("GNU.sparse.") => {
                return Err(Error::invalid("GNU sparse files are not supported"));
            }
            k if k.starts_with(PAX_XATTR_PREFIX) => {
                let name = &k[PAX_XATTR_PREFIX.len()..];
                if name.is_empty() || name.len() > 255 || name.contains('\0') {
                    return Err(Error::invalid(format!("bad extended attribute name {k:?}")));
                }
                p.xattrs
                    .push((name.as_bytes().to_vec(), ext.value_bytes().to_vec()));
            }
            _ => {}
        }
    }
    Ok(())
}

struct Unpacker<'o> {
    /// The root directory (`O_PATH`); every path is resolved beneath it.
    root: OwnedFd,
    root_path: PathBuf,
    options: &'o TarOptions,
    /// Create device nodes (root, mounted target) or return them as specials.
    create_devices: bool,
    /// Paths this layer created, and their ancestors (kept by opaque markers).
    added: HashSet<PathBuf>,
    /// Directories and their metadata, applied at the end, deepest first (a read-only
    /// directory must stay writable while the layer fills it, and adding entries changes
    /// a directory's mtime).
    dirs: BTreeMap<PathBuf, Meta>,
    out: Unpacked,
}

/// Splits a tar path into normal components. `None` for the root itself.
fn clean_path(raw: &[u8], max: usize) -> Result<Option<PathBuf>> {
    let shown = String::from_utf8_lossy(raw);
    if raw.is_empty() {
        return Err(Error::invalid("entry with an empty path"));
    }
    if raw.len() > max {
        return Err(Error::invalid(format!(
            "path of {} bytes is longer than {max}",
            raw.len()
        )));
    }
    if raw.contains(&0) {
        return Err(Error::invalid(format!("path {shown:?} contains NUL")));
    }
    if raw[0] == b'/' {
        return Err(Error::invalid(format!("absolute path {shown:?}")));
    }
    let mut out = PathBuf::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Error::invalid(format!("path {shown:?} contains .."))),
            c if c.len() > 255 => {
                return Err(Error::invalid(format!(
                    "path {shown:?} has a component longer than 255 bytes"
                )));
            }
            c => out.push(std::ffi::OsStr::from_bytes(c)),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Whether a relative symlink at `path` pointing to `target` stays inside the root.
fn symlink_stays_inside(path: &Path, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        // Resolved against the container's root at run time; never followed here.
        return true;
    }
    let mut depth = path.components().count() as i64 - 1;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

fn errno(e: rustix::io::Errno) -> io::Error {
    e.into()
}

fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// The last component of a cleaned path.
fn last(rel: &Path) -> &OsStr {
    rel.file_name().unwrap_or_else(|| OsStr::new("."))
}

impl Unpacker<'_> {
    fn read_extension<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>> {
        let size = entry.header().entry_size().map_err(stream_error)?;
        if size > self.options.max_extension_bytes {
            return Err(Error::invalid(format!(
                "extension header of {size} bytes is larger than {}",
                self.options.max_extension_bytes
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(stream_error)?;
        if data.len() as u64 != size {
            return Err(Error::invalid("truncated extension header"));
        }
        Ok(data)
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.root_path.join(rel)
    }

    fn mark_added(&mut self, rel: &Path) {
        let mut p = rel.to_path_buf();
        loop {
            if !self.added.insert(p.clone()) {
                break;
            }
            if !p.pop() || p.as_os_str().is_empty() {
                break;
            }
        }
    }

    /// Opens the directory `rel` (`O_PATH`), resolved beneath the root without following
    /// any symlink.
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let p = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rfs::openat2(
            &self.root,
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(errno)
    }

    /// Makes sure every ancestor of `rel` is a real directory inside the root, creating
    /// missing ones; refuses to pass through symlinks or files. Returns the parent
    /// directory of `rel`, opened.
    fn prepare_parents(&mut self, rel: &Path) -> Result<OwnedFd> {
        let mut dir = self
            .open_dir(Path::new(""))
            .map_err(|e| fs_error("open", &self.root_path, e))?;
        let comps: Vec<&OsStr> = rel.iter().collect();
        let mut cur = PathBuf::new();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push(c);
            match rfs::statat(&dir, *c, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => {}
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    return Err(Error::invalid(format!(
                        "path {} passes through a symlink",
                        rel.display()
                    )));
                }
                Ok(_) => {
                    return Err(Error::invalid(format!(
                        "path {} passes through a non-directory",
                        rel.display()
                    )));
                }
                Err(rustix::io::Errno::NOENT) => {
                    rfs::mkdirat(&dir, *c, Mode::from_raw_mode(0o755))
                        .map_err(|e| fs_error("mkdir", &self.full(&cur), errno(e)))?;
                }
                Err(e) => return Err(fs_error("stat", &self.full(&cur), errno(e))),
            }
            dir = rfs::openat2(
                &dir,
                *c,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                RESOLVE,
            )
            .map_err(|e| fs_error("open", &self.full(&cur), errno(e)))?;
        }
        Ok(dir)
    }

    /// Removes whatever is at `rel` (never following a symlink); `keep_dir` keeps an
    /// existing directory (and returns `true`).
    fn clear(&mut self, parent: &OwnedFd, rel: &Path, keep_dir: bool) -> Result<bool> {
        self.out.specials.retain(|p, _| !p.starts_with(rel));
        let name = last(rel);
        match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if is_dir(&st) => {
                if keep_dir {
                    return Ok(true);
                }
                self.remove_tree(parent, name, rel)?;
            }
            Ok(_) => rfs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| fs_error("remove", &self.full(rel), errno(e)))?,
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(fs_error("stat", &self.full(rel), errno(e))),
        }
        Ok(false)
    }

    /// The names in directory `dir`, with their types.
    fn read_dir(&self, dir: &OwnedFd, rel: &Path) -> Result<Vec<(std::ffi::OsString, bool)>> {
        let fd = rfs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fs_error("open", &self.full(rel), errno(e)))?;
        let mut d = rfs::Dir::read_from(&fd)
            .map_err(|e| fs_error("read dir", &self.full(rel), errno(e)))?;
        let mut out = Vec::new();
        while let Some(e) = d.read() {
            let e = e.map_err(|e| fs_error("read dir", &self.full(rel), errno(e)))?;
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            let name = OsStr::from_bytes(n).to_os_string();
            let dir_type = match e.file_type() {
                FileType::Directory => true,
                FileType::Unknown => rfs::statat(&fd, &name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| is_dir(&st))
                    .map_err(|er| fs_error("stat", &self.full(&rel.join(&name)), errno(er)))?,
                _ => false,
            };
            out.push((name, dir_type));
        }
        Ok(out)
    }

    /// Removes directory `name` in `parent` and everything below it.
    fn remove_tree(&self, parent: &OwnedFd, name: &OsStr, rel: &Path) -> Result<()> {
        let fd = rfs::openat2(
            parent,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(|e| fs_error("open", &self.full(rel), errno(e)))?;
        for (n, dir) in self.read_dir(&fd, rel)? {
            if dir {
                self.remove_tree(&fd, &n, &rel.join(&n))?;
            } else {
                rfs::unlinkat(&fd, &n, AtFlags::empty())
                    .map_err(|e| fs_error("remove", &self.full(&rel.join(&n)), errno(e)))?;
            }
        }
        rfs::unlinkat(parent, name, AtFlags::REMOVEDIR)
            .map_err(|e| fs_error("remove", &self.full(rel), errno(e)))
    }

    /// Owner, extended attributes, mode, times (in this order: `chown` clears set-id
    /// bits and file capabilities, setting an ACL changes the mode) on an open file.
    fn set_meta_fd(&mut self, fd: &OwnedFd, rel: &Path, meta: &Meta, mode: bool) -> Result<()> {
        self.chown(
            rfs::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            ),
            rel,
        )?;
        for (k, v) in &meta.xattrs {
            let r = rfs::fsetxattr(fd, OsStr::from_bytes(k), v, XattrFlags::empty());
            self.xattr_result(r);
        }
        if mode {
            rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))
                .map_err(|e| fs_error("chmod", &self.full(rel), errno(e)))?;
            if let Some(t) = meta.times() {
                rfs::futimens(fd, &t)
                    .map_err(|e| fs_error("set times of", &self.full(rel), errno(e)))?;
            }
        }
        Ok(())
    }

    /// As [`set_meta_fd`](Self::set_meta_fd) for an entry that cannot be opened (a
    /// symlink, a device node, a fifo), by name in its parent, never following it.
    fn set_meta_at(
        &mut self,
        parent: &OwnedFd,
        rel: &Path,
        meta: &Meta,
        chmod: bool,
    ) -> Result<()> {
        let name = last(rel);
        self.chown(
            rfs::chownat(
                parent,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            ),
            rel,
        )?;
        if !meta.xattrs.is_empty() {
            // The parent through its fd (a magic link, but only as a directory on the
            // way), the entry itself not followed.
            let mut p = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            p.extend_from_slice(name.as_bytes());
            let p = PathBuf::from(OsStr::from_bytes(&p));
            for (k, v) in &meta.xattrs {
                let r = rfs::lsetxattr(&p, OsStr::from_bytes(k), v, XattrFlags::empty());
                self.xattr_result(r);
            }
        }
        if chmod {
            rfs::chmodat(
                parent,
                name,
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| fs_error("chmod", &self.full(rel), errno(e)))?;
        }
        if let Some(t) = meta.times() {
            rfs::utimensat(parent, name, &t, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| fs_error("set times of", &self.full(rel), errno(e)))?;
        }
        Ok(())
    }

    fn chown(&mut self, r: rustix::io::Result<()>, rel: &Path) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            // Not root: the entry keeps the unpacking user as owner (reported).
            Err(rustix::io::Errno::PERM) => {
                self.out.losses.owners += 1;
                Ok(())
            }
            Err(e) => Err(fs_error("chown", &self.full(rel), errno(e))),
        }
    }

    fn xattr_result(&mut self, r: rustix::io::Result<()>) {
        match r {
            Ok(()) => self.out.xattrs += 1,
            // Not permitted (security.*, trusted.* without root), not supported by the
            // target filesystem, or refused: counted, reported by the caller.
            Err(_) => self.out.losses.xattrs += 1,
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: u8,
        pending: Pending,
    ) -> Result<()> {
        let header = entry.header();
        let raw_path = match pending.path {
            Some(p) => p,
            None => header.path_bytes().into_owned(),
        };
        let mode = header.mode().map_err(stream_error)? & 0o7777;
        let uid = match pending.uid {
            Some(u) => u,
            None => header.uid().map_err(stream_error)?,
        };
        let gid = match pending.gid {
            Some(g) => g,
            None => header.gid().map_err(stream_error)?,
        };
        let mtime = pending.mtime.or_else(|| {
            header
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .map(|t| (t, 0))
        });
        let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(u), Ok(g)) => (u, g),
            _ => return Err(Error::invalid("uid or gid does not fit 32 bits")),
        };
        let link = match pending.link {
            Some(l) => Some(l),
            None => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let size = header.entry_size().map_err(stream_error)?;
        let device = (header.device_major(), header.device_minor());
        let meta = Meta {
            mode,
            uid,
            gid,
            mtime,
            atime: pending.atime,
            xattrs: pending.xattrs,
        };

        let Some(rel) = clean_path(&raw_path, self.options.max_path_bytes)? else {
            // The root directory itself: only a directory may stand for it.
            if kind != b'5' {
                return Err(Error::invalid("non-directory entry for the root"));
            }
            let fd = rfs::openat(
                &self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fs_error("open", &self.root_path, errno(e)))?;
            self.set_meta_fd(&fd, Path::new(""), &meta, false)?;
            self.dirs.insert(PathBuf::new(), meta);
            return Ok(());
        };
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();

        // Whiteouts.
        if name.starts_with(WHITEOUT_PREFIX) {
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            self.out.whiteouts += 1;
            if name == OPAQUE {
                return self.opaque(&dir);
            }
            if name.starts_with(META_PREFIX) {
                // Other AUFS metadata (.wh..wh.plnk, ...): ignored, as Docker does.
                return Ok(());
            }
            let target = &name[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Error::invalid(format!(
                    "bad whiteout {}",
                    String::from_utf8_lossy(&raw_path)
                )));
            }
            let target = dir.join(OsStr::from_bytes(target));
            let parent = self.prepare_parents(&target)?;
            self.clear(&parent, &target, false)?;
            return Ok(());
        }

        if meta.mtime.is_some_and(|(_, n)| n != 0) || meta.atime.is_some_and(|(_, n)| n != 0) {
            self.out.subsecond_times += 1;
        }
        let full = self.full(&rel);
        let fname = last(&rel).to_os_string();
        match kind {
            b'0' | 0 | b'7' if !raw_path.ends_with(b"/") => {
                let parent = self.prepare_parents(&rel)?;
                self.clear(&parent, &rel, false)?;
                let fd = rfs::openat(
                    &parent,
                    &fname,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| fs_error("create", &full, errno(e)))?;
                let mut f = File::from(fd);
                let written = copy_data(entry, &mut f, &full)?;
                if written != size {
                    return Err(Error::invalid(format!(
                        "truncated file {} ({written} of {size} bytes)",
                        rel.display()
                    )));
                }
                self.out.file_bytes += written;
                let fd = OwnedFd::from(f);
                self.set_meta_fd(&fd, &rel, &meta, true)?;
            }
            b'0' | 0 | b'7' | b'5' => {
                let parent = self.prepare_parents(&rel)?;
                if !self.clear(&parent, &rel, true)? {
                    rfs::mkdirat(&parent, &fname, Mode::from_raw_mode(0o755))
                        .map_err(|e| fs_error("mkdir", &full, errno(e)))?;
                }
                let fd = rfs::openat2(
                    &parent,
                    &fname,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                    RESOLVE,
                )
                .map_err(|e| fs_error("open", &full, errno(e)))?;
                // Owner and xattrs now; mode and times once the layer is complete.
                self.set_meta_fd(&fd, &rel, &meta, false)?;
                self.dirs.insert(rel.clone(), meta);
            }
            b'2' => {
                let target = link.ok_or_else(|| Error::invalid("symlink without a target"))?;
                if target.is_empty()
                    || target.len() > self.options.max_path_bytes
                    || target.contains(&0)
                {
                    return Err(Error::invalid(format!(
                        "symlink {} has a bad target",
                        rel.display()
                    )));
                }
                if !symlink_stays_inside(&rel, &target) {
                    return Err(Error::invalid(format!(
                        "symlink {} -> {} escapes the tree",
                        rel.display(),
                        String::from_utf8_lossy(&target)
                    )));
                }
                let parent = self.prepare_parents(&rel)?;
                self.clear(&parent, &rel, false)?;
                rfs::symlinkat(OsStr::from_bytes(&target), &parent, &fname)
                    .map_err(|e| fs_error("symlink", &full, errno(e)))?;
                self.set_meta_at(&parent, &rel, &meta, false)?;
            }
            b'1' => {
                let target = link.ok_or_else(|| Error::invalid("hard link without a target"))?;
                let target = if target.first() == Some(&b'/') {
                    return Err(Error::invalid(format!(
                        "hard link {} to an absolute path",
                        rel.display()
                    )));
                } else {
                    clean_path(&target, self.options.max_path_bytes)?
                        .ok_or_else(|| Error::invalid("hard link to the root"))?
                };
                let tparent = self.check_link_target(&rel, &target)?;
                let parent = self.prepare_parents(&rel)?;
                if target == rel {
                    return Err(Error::invalid(format!(
                        "hard link {} to itself",
                        rel.display()
                    )));
                }
                self.clear(&parent, &rel, false)?;
                rfs::linkat(&tparent, last(&target), &parent, &fname, AtFlags::empty())
                    .map_err(|e| fs_error("link", &full, errno(e)))?;
            }
            b'3' | b'4' | b'6' => {
                let (ftype, kind, dev) = match kind {
                    b'6' => (FileType::Fifo, SpecialKind::Fifo, 0),
                    k => {
                        if !self.options.allow_devices {
                            return Err(Error::invalid(format!(
                                "device node {} (devices are not allowed)",
                                rel.display()
                            )));
                        }
                        let major = device.0.ok().flatten().unwrap_or(0);
                        let minor = device.1.ok().flatten().unwrap_or(0);
                        let dev = rfs::makedev(major, minor);
                        if k == b'3' {
                            (
                                FileType::CharacterDevice,
                                SpecialKind::Char(major, minor),
                                dev,
                            )
                        } else {
                            (FileType::BlockDevice, SpecialKind::Block(major, minor), dev)
                        }
                    }
                };
                let parent = self.prepare_parents(&rel)?;
                self.clear(&parent, &rel, false)?;
                if ftype != FileType::Fifo && !self.create_devices {
                    if !super::ext4::debugfs_safe_name(rel.as_os_str().as_bytes()) {
                        return Err(Error::invalid(format!(
                            "special file name {:?} is not supported",
                            rel.display()
                        )));
                    }
                    self.out.specials.insert(
                        rel.clone(),
                        Special {
                            kind,
                            mode,
                            uid,
                            gid,
                        },
                    );
                } else {
                    rfs::mknodat(&parent, &fname, ftype, Mode::from_raw_mode(0o600), dev)
                        .map_err(|e| fs_error("mknod", &full, errno(e)))?;
                    self.set_meta_at(&parent, &rel, &meta, true)?;
                }
            }
            b'S' => return Err(Error::invalid("GNU sparse files are not supported")),
            other => {
                return Err(Error::invalid(format!(
                    "entry {} has unsupported type {:?}",
                    rel.display(),
                    other as char
                )));
            }
        }
        self.mark_added(&rel);
        Ok(())
    }

    /// Checks a hard link's target (it exists, is not a directory, is reached without a
    /// symlink) and returns its parent directory, opened.
    fn check_link_target(&self, rel: &Path, target: &Path) -> Result<OwnedFd> {
        let tdir = target.parent().unwrap_or(Path::new(""));
        let refused = |why: &str| {
            Error::invalid(format!(
                "hard link {} to {}, {why}",
                rel.display(),
                target.display()
            ))
        };
        let parent = match self.open_dir(tdir) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                return Err(refused("which does not exist"));
            }
            Err(_) => return Err(refused("which passes through a symlink or file")),
        };
        match rfs::statat(&parent, last(target), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if is_dir(&st) => Err(refused("a directory")),
            Ok(_) if self.out.specials.contains_key(target) => Err(refused("a special file")),
            Ok(_) => Ok(parent),
            Err(_) => Err(refused("which does not exist")),
        }
    }

    /// `.wh..wh..opq` in `dir`: removes every entry of `dir` this layer did not add (and,
    /// inside directories it added to, their lower entries).
    fn opaque(&mut self, dir: &Path) -> Result<()> {
        let fd = if dir.as_os_str().is_empty() {
            self.open_dir(dir)
                .map_err(|e| fs_error("open", &self.root_path, e))?
        } else {
            let parent = self.prepare_parents(dir)?;
            let full = self.full(dir);
            match rfs::statat(&parent, last(dir), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => {}
                Ok(_) => {
                    return Err(Error::invalid(format!(
                        "opaque marker in {}, which is not a directory",
                        dir.display()
                    )));
                }
                Err(rustix::io::Errno::NOENT) => {
                    rfs::mkdirat(&parent, last(dir), Mode::from_raw_mode(0o755))
                        .map_err(|e| fs_error("mkdir", &full, errno(e)))?;
                    return Ok(());
                }
                Err(e) => return Err(fs_error("stat", &full, errno(e))),
            }
            self.open_dir(dir).map_err(|e| fs_error("open", &full, e))?
        };
        self.prune(dir, &fd)?;
        let dir = dir.to_path_buf();
        self.out
            .specials
            .retain(|p, _| !p.starts_with(&dir) || self.added.contains(p));
        Ok(())
    }

    fn prune(&mut self, dir: &Path, fd: &OwnedFd) -> Result<()> {
        for (name, is_dir) in self.read_dir(fd, dir)? {
            let rel = dir.join(&name);
            if self.added.contains(&rel) {
                if is_dir {
                    let sub = self
                        .open_dir(&rel)
                        .map_err(|e| fs_error("open", &self.full(&rel), e))?;
                    self.prune(&rel, &sub)?;
                }
                continue;
            }
            if is_dir {
                self.remove_tree(fd, &name, &rel)?;
            } else {
                rfs::unlinkat(fd, &name, AtFlags::empty())
                    .map_err(|e| fs_error("remove", &self.full(&rel), errno(e)))?;
            }
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<()> {
        // Deepest first (reverse order puts every "a/..." before "a"), so a read-only
        // parent is set after its children and no later change touches its mtime.
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, meta) in dirs.into_iter().rev() {
            let at = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &rel
            };
            let fd = match rfs::openat2(
                &self.root,
                at,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(fd) => fd,
                Err(_) => continue, // removed or replaced by a later entry
            };
            let full = self.full(&rel);
            rfs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
                .map_err(|e| fs_error("chmod", &full, errno(e)))?;
            if let Some(t) = meta.times() {
                rfs::futimens(&fd, &t).map_err(|e| fs_error("set times of", &full, errno(e)))?;
            }
        }
        Ok(())
    }
}

fn copy_data<R: Read>(entry: &mut R, f: &mut File, path: &Path) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_error(e)),
        };
        f.write_all(&buf[..n])
            .map_err(|e| fs_error("write", path, e))?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_or_refused() {
        let ok = |s: &str| clean_path(s.as_bytes(), 4096).unwrap();
        assert_eq!(ok("./a/b/"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("a//./b"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("./"), None);
        for bad in ["/etc/passwd", "a/../../x", "..", "", "a/\0b"] {
            assert!(clean_path(bad.as_bytes(), 4096).is_err(), "{bad:?}");
        }
        assert!(clean_path(&[b'a'; 300], 4096).is_err());
        assert!(clean_path(&[b'a'; 30], 16).is_err());
    }

    #[test]
    fn symlink_escape_is_lexical() {
        assert!(symlink_stays_inside(Path::new("a/b"), b"../c"));
        assert!(!symlink_stays_inside(Path::new("a/b"), b"../../c"));
        assert!(!symlink_stays_inside(Path::new("a"), b".."));
        assert!(symlink_stays_inside(Path::new("a"), b"/etc/passwd"));
        assert!(symlink_stays_inside(Path::new("a/b"), b"x/../../c"));
    }

    #[test]
    fn zstd_streams_of_several_frames_decode_whole() {
        use ruzstd::encoding::{CompressionLevel, compress_to_vec};
        let a: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let b = b"second frame".to_vec();
        let mut stream = compress_to_vec(&a[..], CompressionLevel::Fastest);
        // A skippable frame between the two data frames.
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        stream.extend(compress_to_vec(&b[..], CompressionLevel::Fastest));
        let mut out = Vec::new();
        let head = stream[..6].to_vec();
        decompress(head, &stream[6..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, [a, b].concat());
        // Truncated: an error, not a hang or a panic.
        let cut = &stream[..stream.len() - 4];
        let r = decompress(cut[..6].to_vec(), &cut[6..]).and_then(|mut d| {
            let mut v = Vec::new();
            d.read_to_end(&mut v).map_err(stream_error)
        });
        assert!(r.is_err());
    }

    #[test]
    fn compression_is_detected() {
        assert_eq!(
            detect_compression(&[0x1f, 0x8b, 8]).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            detect_compression(&[0x28, 0xb5, 0x2f, 0xfd]).unwrap(),
            Compression::Zstd
        );
        assert_eq!(detect_compression(b"hello").unwrap(), Compression::None);
        assert!(detect_compression(b"").is_err());
        assert!(detect_compression(b"BZh91AY").is_err());
    }
}
