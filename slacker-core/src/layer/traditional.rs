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
//! Device nodes and fifos are not created on the host: they are returned in
//! [`Unpacked::specials`] and added to the ext4 image afterwards (see
//! [`ext4::add_specials`](super::ext4::add_specials)). Extended attributes are not kept.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

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

/// A device node or fifo to add to the image after it is built.
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
    /// Device nodes and fifos, by path relative to the root, to add to the image.
    pub specials: BTreeMap<PathBuf, Special>,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const META_PREFIX: &[u8] = b".wh..wh.";

/// Metadata carried from extension headers to the entry they describe.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.path.is_none()
            && self.link.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.mtime.is_none()
    }
}

/// Applies the uncompressed tar `reader` onto the directory `root` (which must exist and
/// may hold the parent's tree), with OCI whiteouts. See the [module docs](self) for what
/// is refused.
///
/// # Errors
/// `InvalidInput` for a hostile or malformed layer (the tree may then hold part of the
/// layer: unpack into a scratch directory); `Backend` for IO errors on the tree.
pub fn unpack<R: Read>(reader: R, root: &Path, options: &TarOptions) -> Result<Unpacked> {
    let mut limited = Limited {
        inner: reader,
        read: 0,
        max: options.max_bytes,
    };
    let mut u = Unpacker {
        root: root.to_path_buf(),
        options,
        added: HashSet::new(),
        dirs: Vec::new(),
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

fn apply_pax(data: &[u8], p: &mut Pending) -> Result<()> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| Error::invalid(format!("bad PAX record: {e}")))?;
        let key = ext
            .key()
            .map_err(|_| Error::invalid("PAX key is not UTF-8"))?;
        let num = || -> Result<u64> {
            let v = ext
                .value()
                .map_err(|_| Error::invalid(format!("PAX {key} is not UTF-8")))?;
            // mtime may carry a fraction: keep the seconds.
            let int = v.split('.').next().unwrap_or("");
            int.parse::<u64>()
                .map_err(|_| Error::invalid(format!("PAX {key}={v:?} is not a number")))
        };
        match key {
            "path" => p.path = Some(ext.value_bytes().to_vec()),
            "linkpath" => p.link = Some(ext.value_bytes().to_vec()),
            "uid" => p.uid = Some(num()?),
            "gid" => p.gid = Some(num()?),
            "mtime" => p.mtime = Some(num()?),
            "size" => {
                return Err(Error::invalid(
                    "PAX size overrides are not supported (files over 8 GiB)",
                ));
            }
            k if k.starts_with("GNU.sparse.") => {
                return Err(Error::invalid("GNU sparse files are not supported"));
            }
            _ => {}
        }
    }
    Ok(())
}

struct Unpacker<'o> {
    root: PathBuf,
    options: &'o TarOptions,
    /// Paths this layer created, and their ancestors (kept by opaque markers).
    added: HashSet<PathBuf>,
    /// Directories and their modes, applied at the end (a read-only directory must stay
    /// writable while the layer fills it).
    dirs: Vec<(PathBuf, u32, Option<u64>)>,
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

    /// Makes sure every ancestor of `rel` is a real directory inside the root, creating
    /// missing ones; refuses to pass through symlinks or files.
    fn prepare_parents(&mut self, rel: &Path) -> Result<()> {
        let mut cur = self.root.clone();
        let comps: Vec<Component<'_>> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
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
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(|e| fs_error("mkdir", &cur, e))?;
                }
                Err(e) => return Err(fs_error("stat", &cur, e)),
            }
        }
        Ok(())
    }

    /// Removes whatever is at `rel` (never following a symlink); `keep_dir` keeps an
    /// existing directory.
    fn clear(&mut self, rel: &Path, keep_dir: bool) -> Result<bool> {
        let full = self.root.join(rel);
        self.out.specials.retain(|p, _| !p.starts_with(rel));
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_dir() => {
                if keep_dir {
                    return Ok(true);
                }
                fs::remove_dir_all(&full).map_err(|e| fs_error("remove", &full, e))?;
            }
            Ok(_) => fs::remove_file(&full).map_err(|e| fs_error("remove", &full, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_error("stat", &full, e)),
        }
        Ok(false)
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
        let mtime = pending.mtime.or_else(|| header.mtime().ok());
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

        let Some(rel) = clean_path(&raw_path, self.options.max_path_bytes)? else {
            // The root directory itself: only a directory may stand for it.
            if kind != b'5' {
                return Err(Error::invalid("non-directory entry for the root"));
            }
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
            let target = dir.join(std::ffi::OsStr::from_bytes(target));
            self.prepare_parents(&target)?;
            self.clear(&target, false)?;
            return Ok(());
        }

        let full = self.root.join(&rel);
        match kind {
            b'0' | 0 | b'7' if !raw_path.ends_with(b"/") => {
                self.prepare_parents(&rel)?;
                self.clear(&rel, false)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&full)
                    .map_err(|e| fs_error("create", &full, e))?;
                let written = copy_data(entry, &mut f, &full)?;
                if written != size {
                    return Err(Error::invalid(format!(
                        "truncated file {} ({written} of {size} bytes)",
                        rel.display()
                    )));
                }
                self.out.file_bytes += written;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| fs_error("chmod", &full, e))?;
                if let Some(t) = mtime {
                    let _ = f.set_modified(UNIX_EPOCH + Duration::from_secs(t));
                }
                drop(f);
                set_owner(&full, uid, gid)?;
            }
            b'0' | 0 | b'7' | b'5' => {
                self.prepare_parents(&rel)?;
                if !self.clear(&rel, true)? {
                    fs::create_dir(&full).map_err(|e| fs_error("mkdir", &full, e))?;
                }
                set_owner(&full, uid, gid)?;
                self.dirs.push((rel.clone(), mode, mtime));
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
                self.prepare_parents(&rel)?;
                self.clear(&rel, false)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &full)
                    .map_err(|e| fs_error("symlink", &full, e))?;
                set_owner(&full, uid, gid)?;
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
                self.check_link_target(&rel, &target)?;
                self.prepare_parents(&rel)?;
                if target == rel {
                    return Err(Error::invalid(format!(
                        "hard link {} to itself",
                        rel.display()
                    )));
                }
                self.clear(&rel, false)?;
                let src = self.root.join(&target);
                fs::hard_link(&src, &full).map_err(|e| fs_error("link", &full, e))?;
            }
            b'3' | b'4' | b'6' => {
                let kind = match kind {
                    b'6' => SpecialKind::Fifo,
                    k => {
                        if !self.options.allow_devices {
                            return Err(Error::invalid(format!(
                                "device node {} (devices are not allowed)",
                                rel.display()
                            )));
                        }
                        let major = device.0.ok().flatten().unwrap_or(0);
                        let minor = device.1.ok().flatten().unwrap_or(0);
                        if k == b'3' {
                            SpecialKind::Char(major, minor)
                        } else {
                            SpecialKind::Block(major, minor)
                        }
                    }
                };
                if !super::ext4::debugfs_safe_name(rel.as_os_str().as_bytes()) {
                    return Err(Error::invalid(format!(
                        "special file name {:?} is not supported",
                        rel.display()
                    )));
                }
                self.prepare_parents(&rel)?;
                self.clear(&rel, false)?;
                self.out.specials.insert(
                    rel.clone(),
                    Special {
                        kind,
                        mode,
                        uid,
                        gid,
                    },
                );
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

    fn check_link_target(&self, rel: &Path, target: &Path) -> Result<()> {
        let mut cur = self.root.clone();
        let comps: Vec<_> = target.components().collect();
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            let m = fs::symlink_metadata(&cur).map_err(|_| {
                Error::invalid(format!(
                    "hard link {} to {}, which does not exist",
                    rel.display(),
                    target.display()
                ))
            })?;
            let last = i + 1 == comps.len();
            if !last && !m.file_type().is_dir() {
                return Err(Error::invalid(format!(
                    "hard link {} to {} passes through a symlink or file",
                    rel.display(),
                    target.display()
                )));
            }
            if last && m.file_type().is_dir() {
                return Err(Error::invalid(format!(
                    "hard link {} to directory {}",
                    rel.display(),
                    target.display()
                )));
            }
        }
        if self.out.specials.contains_key(target) {
            return Err(Error::invalid(format!(
                "hard link {} to special file {}",
                rel.display(),
                target.display()
            )));
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: removes every entry of `dir` this layer did not add (and,
    /// inside directories it added to, their lower entries).
    fn opaque(&mut self, dir: &Path) -> Result<()> {
        if !dir.as_os_str().is_empty() {
            self.prepare_parents(&dir.join("x"))?;
        }
        let full = self.root.join(dir);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid(format!(
                    "opaque marker in {}, which is not a directory",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&full).map_err(|e| fs_error("mkdir", &full, e))?;
                return Ok(());
            }
            Err(e) => return Err(fs_error("stat", &full, e)),
        }
        self.prune(dir)?;
        let dir = dir.to_path_buf();
        self.out
            .specials
            .retain(|p, _| !p.starts_with(&dir) || self.added.contains(p));
        Ok(())
    }

    fn prune(&mut self, dir: &Path) -> Result<()> {
        let full = self.root.join(dir);
        let rd = fs::read_dir(&full).map_err(|e| fs_error("read dir", &full, e))?;
        for e in rd {
            let e = e.map_err(|e| fs_error("read dir", &full, e))?;
            let rel = dir.join(e.file_name());
            if self.added.contains(&rel) {
                let ft = e
                    .file_type()
                    .map_err(|er| fs_error("stat", &e.path(), er))?;
                if ft.is_dir() {
                    self.prune(&rel)?;
                }
                continue;
            }
            let p = e.path();
            let ft = e.file_type().map_err(|er| fs_error("stat", &p, er))?;
            if ft.is_dir() {
                fs::remove_dir_all(&p).map_err(|er| fs_error("remove", &p, er))?;
            } else {
                fs::remove_file(&p).map_err(|er| fs_error("remove", &p, er))?;
            }
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<()> {
        // Deepest first, so a read-only parent is set after its children.
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (rel, mode, mtime) in dirs {
            let full = self.root.join(&rel);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_dir() => {}
                _ => continue, // removed or replaced by a later entry
            }
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .map_err(|e| fs_error("chmod", &full, e))?;
            if let (Some(t), Ok(f)) = (mtime, File::open(&full)) {
                let _ = f.set_modified(UNIX_EPOCH + Duration::from_secs(t));
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

/// Sets the owner (without following symlinks). Without the privilege to do so the
/// owner stays the current user's (best effort: unpack as root for faithful owners).
fn set_owner(path: &Path, uid: u32, gid: u32) -> Result<()> {
    match lchown(path, Some(uid), Some(gid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(fs_error("chown", path, e)),
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
