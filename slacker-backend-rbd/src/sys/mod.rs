//! The only `unsafe` of the crate: thin, blocking, safe wrappers over librados (declared
//! here: the connection, a pool context and its namespace) and librbd (through `rbd-sys`,
//! bindings generated from Debian's `librbd.h`, librbd 1.16).
//!
//! Every function returns `Err(errno)` (a positive `errno` value) where the C call returned a
//! negative one. All of them block on the network: callers run them on
//! `tokio::task::spawn_blocking`. Handles are closed in `Drop`; an [`Image`] keeps its
//! [`IoCtx`] alive and an [`IoCtx`] its [`Cluster`], so the C objects are torn down in the
//! order librados requires. A connected [`Cluster`] is in practice never dropped: the
//! backend keeps every one in a process-wide registry (see `backend::CLIENTS` for why).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;
use std::sync::Arc;

use rbd_sys as rbd;

/// A negative C return value, as a positive errno.
pub type Errno = i32;

/// librados' opaque cluster handle.
type RadosT = *mut c_void;

unsafe extern "C" {
    fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(
        cluster: RadosT,
        pool: *const c_char,
        io: *mut rbd::rados_ioctx_t,
    ) -> c_int;
    fn rados_ioctx_destroy(io: rbd::rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rbd::rados_ioctx_t, nspace: *const c_char);
    fn rados_get_instance_id(cluster: RadosT) -> u64;
    fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);
}

fn check(r: c_int) -> Result<c_int, Errno> {
    if r < 0 { Err(-r) } else { Ok(r) }
}

/// A C string from Rust; interior NULs are refused as `EINVAL`.
fn cstr(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| libc_einval())
}

const fn libc_einval() -> Errno {
    22
}

/// `ERANGE`: a buffer was too small.
const ERANGE: Errno = 34;

/// A connected cluster handle (`rados_t`).
#[derive(Debug)]
pub struct Cluster {
    raw: RadosT,
}

// SAFETY: librados cluster handles are documented as thread-safe ("a rados_t may be shared
// by threads"); this type only exposes calls on a connected handle.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// `rados_create(user)`, then `rados_conf_set(key, value)` of each of `defaults`, then
    /// `rados_conf_read_file(conf_file)` if given (which may override them), then each
    /// `rados_conf_set(key, value)` of `options`, then `rados_connect`.
    pub fn connect(
        user: &str,
        defaults: &[(&str, &str)],
        conf_file: Option<&str>,
        options: &[(&str, String)],
    ) -> Result<Self, Errno> {
        let user = cstr(user)?;
        let mut raw: RadosT = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; `user` is a NUL-terminated string that
        // outlives the call.
        check(unsafe { rados_create(&mut raw, user.as_ptr()) })?;
        let c = Cluster { raw };
        for (k, v) in defaults {
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: `c.raw` was created above and is not connected yet; key and value
            // are valid NUL-terminated strings.
            check(unsafe { rados_conf_set(c.raw, k.as_ptr(), v.as_ptr()) })?;
        }
        if let Some(path) = conf_file {
            let path = cstr(path)?;
            // SAFETY: `c.raw` was created above and is not connected yet; `path` is valid.
            check(unsafe { rados_conf_read_file(c.raw, path.as_ptr()) })?;
        }
        for (k, v) in options {
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: as above, with valid NUL-terminated key and value.
            check(unsafe { rados_conf_set(c.raw, k.as_ptr(), v.as_ptr()) })?;
        }
        // SAFETY: a configured, not yet connected handle.
        check(unsafe { rados_connect(c.raw) })?;
        Ok(c)
    }

    /// The global id of this client instance (`client.<id>` in lock owners).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: `self.raw` is connected (only `connect` builds a `Cluster`).
        unsafe { rados_get_instance_id(self.raw) }
    }
}

impl Cluster {
    /// `rados_getaddrs`: this client's addresses (how lock owners name it).
    pub fn addrs(&self) -> Result<String, Errno> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer.
        check(unsafe { rados_getaddrs(self.raw, &mut p) })?;
        // SAFETY: librados returned a NUL-terminated string (or NULL).
        let s = unsafe { owned(p) };
        if !p.is_null() {
            // SAFETY: allocated by librados for the caller, freed once.
            unsafe { rados_buffer_free(p) };
        }
        Ok(s)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every IoCtx holds an Arc of this cluster, so none is alive any more;
        // the handle is shut down exactly once. (Only handles whose connect failed get
        // here: connected ones live in the backend's registry until the process exits.)
        unsafe { rados_shutdown(self.raw) }
    }
}

/// A pool context with a namespace (`rados_ioctx_t`).
#[derive(Debug)]
pub struct IoCtx {
    raw: rbd::rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados io contexts may be used from several threads at once, as long as the
// namespace is not changed concurrently; it is set once, in `IoCtx::open`, before sharing.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// `rados_ioctx_create(pool)` and `rados_ioctx_set_namespace(namespace)`.
    pub fn open(cluster: Arc<Cluster>, pool: &str, namespace: &str) -> Result<Self, Errno> {
        let pool = cstr(pool)?;
        let ns = cstr(namespace)?;
        let mut raw: rbd::rados_ioctx_t = ptr::null_mut();
        // SAFETY: `cluster.raw` is connected; `raw` is a valid out-pointer.
        check(unsafe { rados_ioctx_create(cluster.raw, pool.as_ptr(), &mut raw) })?;
        // SAFETY: `raw` was just created and is not shared yet.
        unsafe { rados_ioctx_set_namespace(raw, ns.as_ptr()) };
        Ok(IoCtx {
            raw,
            _cluster: cluster,
        })
    }

    /// `rbd_namespace_exists`.
    pub fn namespace_exists(&self, name: &str) -> Result<bool, Errno> {
        let name = cstr(name)?;
        let mut exists = false;
        // SAFETY: valid io context, string and out-pointer.
        check(unsafe { rbd::rbd_namespace_exists(self.raw, name.as_ptr(), &mut exists) })?;
        Ok(exists)
    }

    /// `rbd_namespace_create` (the pool must have been `rbd pool init`ed).
    pub fn namespace_create(&self, name: &str) -> Result<(), Errno> {
        let name = cstr(name)?;
        // SAFETY: valid io context and string.
        check(unsafe { rbd::rbd_namespace_create(self.raw, name.as_ptr()) }).map(drop)
    }

    /// `rbd_create4(name, size, {order, features})`.
    pub fn create(&self, name: &str, size: u64, order: u8, features: u64) -> Result<(), Errno> {
        let name = cstr(name)?;
        let opts = Options::new()?;
        opts.set(rbd::RBD_IMAGE_OPTION_ORDER as c_int, u64::from(order))?;
        opts.set(rbd::RBD_IMAGE_OPTION_FEATURES as c_int, features)?;
        // SAFETY: valid io context, name and options handle (destroyed after the call).
        check(unsafe { rbd::rbd_create4(self.raw, name.as_ptr(), size, opts.raw) }).map(drop)
    }

    /// `rbd_clone3(parent@snap -> child)` in this context, clone format 2 (no protect).
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child: &str,
        order: u8,
        features: u64,
    ) -> Result<(), Errno> {
        let (parent, snap, child) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let opts = Options::new()?;
        opts.set(rbd::RBD_IMAGE_OPTION_ORDER as c_int, u64::from(order))?;
        opts.set(rbd::RBD_IMAGE_OPTION_FEATURES as c_int, features)?;
        opts.set(rbd::RBD_IMAGE_OPTION_CLONE_FORMAT as c_int, 2)?;
        // SAFETY: valid io contexts (the same one twice), strings and options handle.
        check(unsafe {
            rbd::rbd_clone3(
                self.raw,
                parent.as_ptr(),
                snap.as_ptr(),
                self.raw,
                child.as_ptr(),
                opts.raw,
            )
        })
        .map(drop)
    }

    /// `rbd_rename(from, to)`; `EEXIST` if `to` exists.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (from, to) = (cstr(from)?, cstr(to)?);
        // SAFETY: valid io context and strings.
        check(unsafe { rbd::rbd_rename(self.raw, from.as_ptr(), to.as_ptr()) }).map(drop)
    }

    /// `rbd_trash_move(name, delay 0)`: the name disappears at once (atomic).
    pub fn trash_move(&self, name: &str) -> Result<(), Errno> {
        let name = cstr(name)?;
        // SAFETY: valid io context and string.
        check(unsafe { rbd::rbd_trash_move(self.raw, name.as_ptr(), 0) }).map(drop)
    }

    /// `rbd_trash_remove(id, force = false)`: deletes a trashed image's data.
    pub fn trash_remove(&self, id: &str) -> Result<(), Errno> {
        let id = cstr(id)?;
        // SAFETY: valid io context and string.
        check(unsafe { rbd::rbd_trash_remove(self.raw, id.as_ptr(), false) }).map(drop)
    }

    /// `rbd_trash_restore(id, name)`.
    pub fn trash_restore(&self, id: &str, name: &str) -> Result<(), Errno> {
        let (id, name) = (cstr(id)?, cstr(name)?);
        // SAFETY: valid io context and strings.
        check(unsafe { rbd::rbd_trash_restore(self.raw, id.as_ptr(), name.as_ptr()) }).map(drop)
    }

    /// `rbd_trash_list`: `(id, name, deletion time)` of every trashed image.
    pub fn trash_list(&self) -> Result<Vec<(String, String, i64)>, Errno> {
        let mut cap = 64usize;
        loop {
            // SAFETY: rbd_trash_image_info_t is plain C data; all-zero is a valid value.
            let mut v: Vec<rbd::rbd_trash_image_info_t> = vec![unsafe { std::mem::zeroed() }; cap];
            let mut n = cap;
            // SAFETY: `v` has room for `n` entries.
            let r = unsafe { rbd::rbd_trash_list(self.raw, v.as_mut_ptr(), &mut n) };
            if r == -ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            let count = check(r)? as usize;
            let out = v[..count]
                .iter()
                // SAFETY: librbd filled `count` entries with valid C strings.
                .map(|e| unsafe { (owned(e.id), owned(e.name), e.deletion_time) })
                .collect();
            // SAFETY: releases the strings of the `count` entries librbd filled.
            unsafe { rbd::rbd_trash_list_cleanup(v.as_mut_ptr(), count) };
            return Ok(out);
        }
    }

    /// `rbd_list2`: `(id, name)` of every image in the directory (not the trash).
    pub fn list(&self) -> Result<Vec<(String, String)>, Errno> {
        let mut cap = 64usize;
        loop {
            // SAFETY: rbd_image_spec_t is plain C data; all-zero is a valid value.
            let mut v: Vec<rbd::rbd_image_spec_t> = vec![unsafe { std::mem::zeroed() }; cap];
            let mut n = cap;
            // SAFETY: `v` has room for `n` entries.
            let r = unsafe { rbd::rbd_list2(self.raw, v.as_mut_ptr(), &mut n) };
            if r == -ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(r)?;
            let out = v[..n]
                .iter()
                // SAFETY: librbd filled `n` entries with valid C strings.
                .map(|e| unsafe { (owned(e.id), owned(e.name)) })
                .collect();
            // SAFETY: releases the strings of the `n` entries librbd filled.
            unsafe { rbd::rbd_image_spec_list_cleanup(v.as_mut_ptr(), n) };
            return Ok(out);
        }
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: every Image holds an Arc of this context, so none is open any more.
        unsafe { rados_ioctx_destroy(self.raw) }
    }
}

/// Copies a C string (NULL -> empty).
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `rbd_image_options_t`, destroyed on drop.
struct Options {
    raw: rbd::rbd_image_options_t,
}

impl Options {
    fn new() -> Result<Self, Errno> {
        let mut raw: rbd::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { rbd::rbd_image_options_create(&mut raw) };
        Ok(Options { raw })
    }

    fn set(&self, opt: c_int, v: u64) -> Result<(), Errno> {
        // SAFETY: `self.raw` is a live options handle.
        check(unsafe { rbd::rbd_image_options_set_uint64(self.raw, opt, v) }).map(drop)
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe { rbd::rbd_image_options_destroy(self.raw) }
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug)]
pub enum OpenBy<'a> {
    /// By its name in the directory.
    Name(&'a str),
    /// By its immutable id (works after renames, and for images in the trash).
    Id(&'a str),
}

/// The namespace of a snapshot (`rbd_snap_namespace_type_t`), as far as this crate cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapNamespace {
    /// A user snapshot.
    User,
    /// Removed while clones still use it (clone v2).
    Trash,
    /// Anything else (group, mirror).
    Other,
}

/// The parent of a clone: its image id and the snapshot's id and namespace.
#[derive(Clone, Debug)]
pub struct Parent {
    /// The parent image's id.
    pub image_id: String,
    /// The snapshot's name (a generated one for trashed snapshots).
    pub snap_name: String,
    /// The snapshot's id.
    pub snap_id: u64,
    /// Where the snapshot lives.
    pub namespace: SnapNamespace,
}

/// An open image (`rbd_image_t`), at its head or at a snapshot, closed on drop.
#[derive(Debug)]
pub struct Image {
    raw: rbd::rbd_image_t,
    _io: Arc<IoCtx>,
}

// SAFETY: librbd image handles serialize their own state (ImageCtx locks); the C API may
// be called on one handle from several threads at once (librbd's own tests and qemu do).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// `rbd_open[_by_id][_read_only](.., snap)`.
    pub fn open(
        io: &Arc<IoCtx>,
        by: OpenBy<'_>,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Self, Errno> {
        let snap = snap.map(cstr).transpose()?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: rbd::rbd_image_t = ptr::null_mut();
        let r = match by {
            OpenBy::Name(n) => {
                let n = cstr(n)?;
                if read_only {
                    // SAFETY: valid io context, strings (or NULL snap) and out-pointer.
                    unsafe { rbd::rbd_open_read_only(io.raw, n.as_ptr(), &mut raw, snap_ptr) }
                } else {
                    // SAFETY: as above.
                    unsafe { rbd::rbd_open(io.raw, n.as_ptr(), &mut raw, snap_ptr) }
                }
            }
            OpenBy::Id(i) => {
                let i = cstr(i)?;
                if read_only {
                    // SAFETY: as above.
                    unsafe { rbd::rbd_open_by_id_read_only(io.raw, i.as_ptr(), &mut raw, snap_ptr) }
                } else {
                    // SAFETY: as above.
                    unsafe { rbd::rbd_open_by_id(io.raw, i.as_ptr(), &mut raw, snap_ptr) }
                }
            }
        };
        check(r)?;
        Ok(Image {
            raw,
            _io: Arc::clone(io),
        })
    }

    /// `rbd_get_size` (of the head or of the snapshot opened).
    pub fn size(&self) -> Result<u64, Errno> {
        let mut s = 0u64;
        // SAFETY: open image, valid out-pointer.
        check(unsafe { rbd::rbd_get_size(self.raw, &mut s) })?;
        Ok(s)
    }

    /// `rbd_get_id`.
    pub fn id(&self) -> Result<String, Errno> {
        self.string_out(|raw, buf, len| {
            let mut l = len;
            // SAFETY: `buf` has room for `len` bytes.
            let r = unsafe { rbd::rbd_get_id(raw, buf, l) };
            if r == -ERANGE {
                l = 4096;
            }
            (r, l)
        })
    }

    /// `rbd_get_name`: the current name (after renames).
    pub fn name(&self) -> Result<String, Errno> {
        self.string_out(|raw, buf, len| {
            let mut l = len;
            // SAFETY: `buf` has room for `l` bytes; librbd writes the needed size back.
            let r = unsafe { rbd::rbd_get_name(raw, buf, &mut l) };
            (r, l)
        })
    }

    fn string_out(
        &self,
        f: impl Fn(rbd::rbd_image_t, *mut c_char, usize) -> (c_int, usize),
    ) -> Result<String, Errno> {
        let mut cap = 128usize;
        loop {
            let mut buf = vec![0u8; cap];
            let (r, need) = f(self.raw, buf.as_mut_ptr().cast(), cap);
            if r == -ERANGE && need > cap {
                cap = need;
                continue;
            }
            check(r)?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
    }

    /// `rbd_read` until `buf` is full (librbd reads holes as zeros).
    pub fn read(&self, mut off: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a writable buffer of `rest.len()` bytes.
            let r = unsafe { rbd::rbd_read(self.raw, off, rest.len(), rest.as_mut_ptr().cast()) };
            if r < 0 {
                return Err(-(r as i32));
            }
            if r == 0 {
                return Err(5); // EIO: librbd never reads short inside the image
            }
            done += r as usize;
            off += r as u64;
        }
        Ok(())
    }

    /// `rbd_write` until all of `data` is written.
    pub fn write(&self, mut off: u64, data: &[u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            // SAFETY: `rest` is a readable buffer of `rest.len()` bytes.
            let r = unsafe { rbd::rbd_write(self.raw, off, rest.len(), rest.as_ptr().cast()) };
            if r < 0 {
                return Err(-(r as i32));
            }
            if r == 0 {
                return Err(5);
            }
            done += r as usize;
            off += r as u64;
        }
        Ok(())
    }

    /// `rbd_resize`.
    pub fn resize(&self, size: u64) -> Result<(), Errno> {
        // SAFETY: open image.
        check(unsafe { rbd::rbd_resize(self.raw, size) }).map(drop)
    }

    /// `rbd_flush`.
    pub fn flush(&self) -> Result<(), Errno> {
        // SAFETY: open image.
        check(unsafe { rbd::rbd_flush(self.raw) }).map(drop)
    }

    /// `rbd_snap_create`.
    pub fn snap_create(&self, name: &str) -> Result<(), Errno> {
        let name = cstr(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd::rbd_snap_create(self.raw, name.as_ptr()) }).map(drop)
    }

    /// `rbd_snap_rename`.
    pub fn snap_rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (from, to) = (cstr(from)?, cstr(to)?);
        // SAFETY: open image, valid strings.
        check(unsafe { rbd::rbd_snap_rename(self.raw, from.as_ptr(), to.as_ptr()) }).map(drop)
    }

    /// `rbd_snap_remove` (a snapshot with clones moves to the trash namespace).
    pub fn snap_remove(&self, name: &str) -> Result<(), Errno> {
        let name = cstr(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd::rbd_snap_remove(self.raw, name.as_ptr()) }).map(drop)
    }

    /// `rbd_snap_exists`.
    pub fn snap_exists(&self, name: &str) -> Result<bool, Errno> {
        let name = cstr(name)?;
        let mut e = false;
        // SAFETY: open image, valid string and out-pointer.
        check(unsafe { rbd::rbd_snap_exists(self.raw, name.as_ptr(), &mut e) })?;
        Ok(e)
    }

    /// `rbd_snap_list`: `(id, size, name)` of the user snapshots.
    pub fn snap_list(&self) -> Result<Vec<(u64, u64, String)>, Errno> {
        let mut cap: c_int = 16;
        loop {
            // SAFETY: rbd_snap_info_t is plain C data; all-zero is a valid value.
            let mut v: Vec<rbd::rbd_snap_info_t> =
                vec![unsafe { std::mem::zeroed() }; cap as usize + 1];
            let mut n = cap;
            // SAFETY: `v` has room for `n` entries (plus the terminator librbd writes).
            let r = unsafe { rbd::rbd_snap_list(self.raw, v.as_mut_ptr(), &mut n) };
            if r == -ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            let count = check(r)? as usize;
            let out = v[..count]
                .iter()
                // SAFETY: librbd filled `count` entries with valid C strings.
                .map(|s| (s.id, s.size, unsafe { owned(s.name) }))
                .collect();
            // SAFETY: releases the names librbd allocated in `v`.
            unsafe { rbd::rbd_snap_list_end(v.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// `rbd_snap_get_trash_namespace`: the name a trashed snapshot had.
    pub fn snap_trash_original_name(&self, snap_id: u64) -> Result<String, Errno> {
        let mut buf = vec![0u8; 512];
        // SAFETY: `buf` has room for 512 bytes.
        check(unsafe {
            rbd::rbd_snap_get_trash_namespace(self.raw, snap_id, buf.as_mut_ptr().cast(), buf.len())
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf.truncate(end);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// `rbd_get_parent`: `None` for an image without parent (`ENOENT`).
    pub fn parent(&self) -> Result<Option<Parent>, Errno> {
        // SAFETY: plain C structs; all-zero is a valid value.
        let mut img: rbd::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: rbd::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image, valid out-pointers.
        let r = unsafe { rbd::rbd_get_parent(self.raw, &mut img, &mut snap) };
        if r == -2 {
            return Ok(None);
        }
        check(r)?;
        let namespace = if snap.namespace_type
            == rbd::rbd_snap_namespace_type_t::RBD_SNAP_NAMESPACE_TYPE_USER
        {
            SnapNamespace::User
        } else if snap.namespace_type
            == rbd::rbd_snap_namespace_type_t::RBD_SNAP_NAMESPACE_TYPE_TRASH
        {
            SnapNamespace::Trash
        } else {
            SnapNamespace::Other
        };
        // SAFETY: librbd filled both structs with valid C strings.
        let p = unsafe {
            Parent {
                image_id: owned(img.image_id),
                snap_name: owned(snap.name),
                snap_id: snap.id,
                namespace,
            }
        };
        // SAFETY: releases what rbd_get_parent allocated, once each.
        unsafe {
            rbd::rbd_linked_image_spec_cleanup(&mut img);
            rbd::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(p))
    }

    /// `rbd_diff_iterate2(from = NULL, 0..len, include_parent, whole_object = 1)`: the
    /// `(offset, length)` of every object the image (at the snapshot opened) holds.
    pub fn owned_extents(&self, len: u64, include_parent: bool) -> Result<Vec<(u64, u64)>, Errno> {
        unsafe extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `&mut Vec` passed below, alive for the whole call.
            let v = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
            if exists != 0 {
                v.push((off, len as u64));
            }
            0
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        // SAFETY: open image; `cb` matches the callback type and only touches `out`,
        // which outlives the (synchronous) call.
        check(unsafe {
            rbd::rbd_diff_iterate2(
                self.raw,
                ptr::null(),
                0,
                len,
                u8::from(include_parent),
                1,
                Some(cb),
                (&mut out as *mut Vec<(u64, u64)>).cast(),
            )
        })?;
        Ok(out)
    }

    /// `rbd_metadata_get`; `None` if the key is missing.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, Errno> {
        let key = cstr(key)?;
        let mut cap = 256usize;
        loop {
            let mut buf = vec![0u8; cap];
            let mut l = cap;
            // SAFETY: `buf` has room for `l` bytes.
            let r = unsafe {
                rbd::rbd_metadata_get(self.raw, key.as_ptr(), buf.as_mut_ptr().cast(), &mut l)
            };
            if r == -ERANGE && l > cap {
                cap = l;
                continue;
            }
            if r == -2 {
                return Ok(None);
            }
            check(r)?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }

    /// `rbd_metadata_set`.
    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), Errno> {
        let (key, value) = (cstr(key)?, cstr(value)?);
        // SAFETY: open image, valid strings.
        check(unsafe { rbd::rbd_metadata_set(self.raw, key.as_ptr(), value.as_ptr()) }).map(drop)
    }

    /// `rbd_metadata_remove`.
    pub fn metadata_remove(&self, key: &str) -> Result<(), Errno> {
        let key = cstr(key)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd::rbd_metadata_remove(self.raw, key.as_ptr()) }).map(drop)
    }

    /// `rbd_metadata_list`: every key starting with `prefix`, sorted.
    pub fn metadata_keys(&self, prefix: &str) -> Result<Vec<String>, Errno> {
        let mut out = Vec::new();
        let mut start = String::new();
        loop {
            let start_c = cstr(&start)?;
            let (mut kcap, mut vcap) = (8192usize, 8192usize);
            let (keys, n) = loop {
                let mut keys = vec![0u8; kcap];
                let mut vals = vec![0u8; vcap];
                let (mut kl, mut vl) = (kcap, vcap);
                // SAFETY: `keys` and `vals` have room for `kl` and `vl` bytes.
                let r = unsafe {
                    rbd::rbd_metadata_list(
                        self.raw,
                        start_c.as_ptr(),
                        64,
                        keys.as_mut_ptr().cast(),
                        &mut kl,
                        vals.as_mut_ptr().cast(),
                        &mut vl,
                    )
                };
                if r == -ERANGE {
                    kcap = kl.max(kcap * 2);
                    vcap = vl.max(vcap * 2);
                    continue;
                }
                check(r)?;
                keys.truncate(kl);
                break (keys, r);
            };
            let batch: Vec<String> = keys
                .split(|&b| b == 0)
                .filter(|k| !k.is_empty())
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let last = batch.last().cloned();
            out.extend(batch.into_iter().filter(|k| k.starts_with(prefix)));
            match last {
                Some(l) if n >= 64 => start = l,
                _ => break,
            }
        }
        Ok(out)
    }

    /// `rbd_lock_get_owners` for the exclusive lock: the owners' names (empty if none).
    pub fn lock_owners(&self) -> Result<Vec<String>, Errno> {
        let mut mode = rbd::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n = owners.len();
        // SAFETY: `owners` has room for `n` pointers; valid out-pointers.
        let r =
            unsafe { rbd::rbd_lock_get_owners(self.raw, &mut mode, owners.as_mut_ptr(), &mut n) };
        if r == -2 {
            return Ok(Vec::new());
        }
        check(r)?;
        // SAFETY: librbd filled `n` valid C strings.
        let out = owners[..n].iter().map(|&p| unsafe { owned(p) }).collect();
        // SAFETY: releases the `n` strings librbd allocated.
        unsafe { rbd::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        Ok(out)
    }

    /// `rbd_lock_break(exclusive, owner)`: blocklists the owner and frees the lock.
    pub fn lock_break(&self, owner: &str) -> Result<(), Errno> {
        let owner = cstr(owner)?;
        // SAFETY: open image, valid string.
        check(unsafe {
            rbd::rbd_lock_break(
                self.raw,
                rbd::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE,
                owner.as_ptr(),
            )
        })
        .map(drop)
    }

    /// `rbd_get_create_timestamp`, in seconds since the epoch.
    pub fn create_time(&self) -> Result<i64, Errno> {
        // SAFETY: plain C struct; all-zero is a valid value.
        let mut ts: rbd::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: open image, valid out-pointer.
        check(unsafe { rbd::rbd_get_create_timestamp(self.raw, &mut ts) })?;
        Ok(ts.tv_sec)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed exactly once; releases the exclusive lock.
        unsafe { rbd::rbd_close(self.raw) };
    }
}
