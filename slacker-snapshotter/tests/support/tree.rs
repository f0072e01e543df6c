//! Root trees for the runtime tests: made on disk with every kind of entry an image
//! carries, packed as layer tars, and compared entry by entry (path, type, mode incl.
//! setuid, owner, size, content hash, xattrs, link target).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One entry as compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desc {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub hash: String,
    pub xattrs: BTreeMap<String, String>,
    pub link: String,
    pub rdev: u64,
}

fn xattrs(p: &Path) -> BTreeMap<String, String> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut v = vec![0u8; 4096];
        if let Ok(k) = rustix::fs::lgetxattr(p, name.as_str(), &mut v[..]) {
            let hex: String = v[..k].iter().map(|b| format!("{b:02x}")).collect();
            out.insert(name, hex);
        }
    }
    out
}

/// Every entry under `root` (not `root` itself), keyed by relative path; `skip` names
/// top-level entries to leave out.
pub fn walk(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, Desc> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if rel.as_os_str().is_empty() && skip.iter().any(|s| e.file_name() == **s) {
                continue;
            }
            let p = root.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(r.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            out.insert(
                r,
                Desc {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if ft.is_file() { m.len() } else { 0 },
                    hash: if ft.is_file() {
                        blake3::hash(&std::fs::read(&p).unwrap())
                            .to_hex()
                            .to_string()
                    } else {
                        String::new()
                    },
                    xattrs: xattrs(&p),
                    link: if ft.is_symlink() {
                        std::fs::read_link(&p).unwrap().display().to_string()
                    } else {
                        String::new()
                    },
                    rdev: if ft.is_char_device() || ft.is_block_device() {
                        m.rdev()
                    } else {
                        0
                    },
                },
            );
        }
    }
    out
}

/// Asserts two walks are equal, naming the first differences.
pub fn assert_same(want: &BTreeMap<PathBuf, Desc>, got: &BTreeMap<PathBuf, Desc>, what: &str) {
    let mut diffs = Vec::new();
    for (p, d) in want {
        match got.get(p) {
            None => diffs.push(format!("missing {}", p.display())),
            Some(g) if g != d => diffs.push(format!("{}: want {d:?}\n   got {g:?}", p.display())),
            _ => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("unexpected {}", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{what}: trees differ ({} of {} entries):\n{}",
        diffs.len(),
        want.len(),
        diffs[..diffs.len().min(20)].join("\n")
    );
}

/// A capability xattr (`security.capability`, v2): cap_net_bind_service, effective.
pub const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0, 0, 0x02, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn write(root: &Path, rel: &str, data: &[u8], mode: u32) {
    let p = root.join(rel);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A busybox root: `sh`, `echo`, `cat`, `ls`, `sleep`, plus a setuid file, a file with
/// a capability, a hard link, a file owned by 1000:1000, a device node, and
/// `etc/gone` (which a second layer deletes).
pub fn busybox_root(root: &Path) {
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "usr/bin",
        "var/empty",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy(super::which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    for tool in ["sh", "echo", "cat", "ls", "sleep", "touch", "rm"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    write(root, "etc/hostname", b"slacker\n", 0o644);
    write(root, "etc/gone", b"deleted by the upper layer\n", 0o644);
    write(root, "usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755);
    write(root, "usr/bin/capped", b"#!/bin/sh\necho cap\n", 0o755);
    rustix::fs::lsetxattr(
        root.join("usr/bin/capped"),
        "security.capability",
        &CAP_NET_BIND_SERVICE,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::fs::hard_link(root.join("usr/bin/suid"), root.join("usr/bin/suid-again")).unwrap();
    write(root, "etc/owned", b"by 1000\n", 0o640);
    std::os::unix::fs::lchown(root.join("etc/owned"), Some(1000), Some(1000)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("dev/null0"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while format!("{len}").len() + body != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// Packs the tree at `root` as a layer tar (owners, modes, xattrs as PAX
/// `SCHILY.xattr.*`, hard links, device nodes), plus an empty regular file for every
/// path in `whiteouts` (`dir/.wh.name`).
pub fn layer_tar(root: &Path, whiteouts: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut seen: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut entries: Vec<PathBuf> = walk(root, &[]).into_keys().collect();
    entries.sort();
    for rel in entries {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
        let xa = xattrs(&p);
        if !xa.is_empty() {
            let recs: Vec<(String, Vec<u8>)> = xa
                .keys()
                .map(|k| {
                    let mut v = vec![0u8; 4096];
                    let n = rustix::fs::lgetxattr(&p, k.as_str(), &mut v[..]).unwrap();
                    (format!("SCHILY.xattr.{k}"), v[..n].to_vec())
                })
                .collect();
            let refs: Vec<(&str, &[u8])> = recs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let data = pax(&refs);
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_path("PaxHeaders/x").unwrap();
            x.set_size(data.len() as u64);
            x.set_mode(0o644);
            x.set_cksum();
            b.append(&x, &data[..]).unwrap();
        }
        let ft = m.file_type();
        if ft.is_file() && m.nlink() > 1 {
            if let Some(first) = seen.get(&(m.dev(), m.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &rel, first).unwrap();
                continue;
            }
            seen.insert((m.dev(), m.ino()), rel.clone());
        }
        if ft.is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            b.append_link(&mut h, &rel, &target).unwrap();
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            b.append_data(&mut h, &rel, &data[..]).unwrap();
        } else {
            h.set_size(0);
            if ft.is_char_device() || ft.is_block_device() {
                h.set_device_major(rustix::fs::major(m.rdev())).unwrap();
                h.set_device_minor(rustix::fs::minor(m.rdev())).unwrap();
            }
            b.append_data(&mut h, &rel, std::io::empty()).unwrap();
        }
    }
    for w in whiteouts {
        let p = Path::new(w);
        let name = format!(".wh.{}", p.file_name().unwrap().to_string_lossy());
        let rel = p.parent().unwrap().join(name);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, &rel, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}
