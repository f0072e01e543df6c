//! Lossless traditional layers: a parent with device nodes, a fifo and hard links, and a
//! child layer with every attribute a real image carries (setuid, setgid, sticky, owners,
//! `security.capability`, `user.*`, a POSIX ACL, a hard link to a lower-layer file,
//! symlink and fifo times, nanosecond mtimes, whiteouts), applied as root into the
//! mounted ext4 of a clone of the parent; the volume's tree must match the source tree
//! entry by entry ([`slacker_testkit::tree::Manifest`]). The unprivileged rebuild path
//! must report what it loses.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags};
use slacker_backend_mem::MemBackend;
use slacker_core::layer::archive::TreeTar;
use slacker_core::layer::ext4::Mounted;
use slacker_core::layer::{ApplyMethod, ApplyMode, Loss, TarOptions};
use slacker_core::{LayerStore, LayerStoreOptions};
use slacker_testkit::tree::{Manifest, diff_layer};

/// Root with e2fsprogs and loop mounts; `SKIPPED` (or a CI failure) otherwise.
fn privileged() -> bool {
    if !e2fsprogs() {
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        return slacker_testkit::skip_or_fail::<()>("lossless apply needs root (loop mounts)")
            .is_some();
    }
    true
}

/// `cap_net_raw+ep` as the kernel stores it (VFS_CAP_REVISION_2 | EFFECTIVE).
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// `user::rw-, user:1000:r--, group::r--, mask::r--, other::---`.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

fn times(path: &Path, secs: i64, nanos: i64) {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    rfs::utimensat(
        rfs::CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn file(root: &Path, rel: &str, data: &[u8], mode: u32, uid: u32, gid: u32) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    rfs::chown(
        &p,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
    )
    .unwrap();
    rfs::chmod(&p, Mode::from_raw_mode(mode)).unwrap();
    p
}

fn node(root: &Path, rel: &str, t: FileType, dev: (u32, u32)) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    rfs::mknodat(
        rfs::CWD,
        &p,
        t,
        Mode::from_raw_mode(0o620),
        rfs::makedev(dev.0, dev.1),
    )
    .unwrap();
}

/// Gives every entry a distinct nanosecond mtime, directories last (deepest first).
fn stamp(root: &Path) {
    let m = Manifest::of(root).unwrap();
    let mut i = 0i64;
    let mut dirs = Vec::new();
    for (p, e) in &m.entries {
        i += 1;
        if e.kind == 'd' {
            dirs.push((p.clone(), i));
        } else {
            times(&root.join(p), 1_600_000_000 + i, 123_456_789 + i);
        }
    }
    for (p, i) in dirs.into_iter().rev() {
        times(&root.join(p), 1_500_000_000 + i, 987_654_321 - i);
    }
}

/// The parent: device nodes, a fifo, hard links, files to be changed and removed.
fn parent_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    file(
        root,
        "etc/passwd",
        b"root:x:0:0::/root:/bin/sh\n",
        0o644,
        0,
        0,
    );
    file(root, "usr/bin/perl", b"#!perl\n", 0o755, 0, 0);
    std::fs::hard_link(root.join("usr/bin/perl"), root.join("usr/bin/perl5.36")).unwrap();
    node(root, "dev/null", FileType::CharacterDevice, (1, 3));
    node(root, "dev/loop0", FileType::BlockDevice, (7, 0));
    node(root, "run/initctl", FileType::Fifo, (0, 0));
    file(root, "var/old/file", b"old", 0o600, 0, 0);
    file(root, "var/gone", b"gone", 0o600, 0, 0);
    file(root, "srv/a", b"a", 0o644, 0, 0);
    stamp(root);
}

/// The child: the parent plus every attribute a real image carries.
fn child_tree(parent: &Path, root: &Path) {
    let ok = Command::new("cp")
        .args(["-a", "--"])
        .arg(parent)
        .arg(root)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a");
    file(root, "usr/bin/su", b"su binary", 0o4755, 0, 0);
    file(root, "usr/bin/wall", b"wall binary", 0o2755, 0, 5);
    file(root, "usr/bin/both", b"both", 0o6750, 0, 42);
    let ping = file(root, "usr/bin/ping", b"ping binary", 0o755, 0, 0);
    rfs::setxattr(
        &ping,
        "security.capability",
        &CAP_NET_RAW,
        XattrFlags::empty(),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    rfs::chmod(root.join("tmp"), Mode::from_raw_mode(0o1777)).unwrap();
    let u = file(root, "home/user/notes", b"user file", 0o640, 1000, 1000);
    rfs::setxattr(&u, "user.comment", b"kept \x00 binary", XattrFlags::empty()).unwrap();
    let a = file(root, "srv/acl", b"acl", 0o640, 0, 0);
    rfs::setxattr(&a, "system.posix_acl_access", &acl(), XattrFlags::empty()).unwrap();
    rfs::chmod(&a, Mode::from_raw_mode(0o640)).unwrap();
    std::fs::hard_link(root.join("usr/bin/perl"), root.join("usr/local-perl")).unwrap();
    symlink("../usr/bin/su", root.join("srv/su-link")).unwrap();
    symlink("/etc/passwd", root.join("srv/abs-link")).unwrap();
    node(root, "srv/pipe", FileType::Fifo, (0, 0));
    node(root, "dev/zero", FileType::CharacterDevice, (1, 5));
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/bash\n").unwrap();
    std::fs::remove_dir_all(root.join("var/old")).unwrap();
    std::fs::remove_file(root.join("var/gone")).unwrap();
    stamp(root);
}

fn store_options(name: &str, mode: ApplyMode) -> LayerStoreOptions {
    LayerStoreOptions::new(name)
        .with_volume_size(64 << 20)
        .with_tar_options(TarOptions::default().with_allow_devices(true))
        .with_apply_mode(mode)
}

async fn open(b: &MemBackend, dir: &Path, name: &str, mode: ApplyMode) -> LayerStore<MemBackend> {
    let meta: Arc<dyn slacker_core::persist::MetaStore> =
        Arc::new(slacker_core::persist::DirStore::open(dir).unwrap());
    LayerStore::open(b.reopen(), meta, store_options(name, mode))
        .await
        .unwrap()
}

/// Mounts layer `id`'s content and returns its manifest.
async fn manifest_of(s: &LayerStore<MemBackend>, id: &str, scratch: &Path) -> Manifest {
    let v = s.get(id).await.unwrap();
    let img = scratch.join(format!("{id}.img"));
    volume_to_file(s.backend(), &v, &img).await;
    s.put(id).await.unwrap();
    let mnt = scratch.join(format!("{id}.mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::mount(&img, &mnt).unwrap();
    let manifest = Manifest::of(m.root()).unwrap();
    m.unmount().unwrap();
    manifest
}

fn trees(work: &Path) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    let (p, c) = (work.join("parent"), work.join("child"));
    parent_tree(&p);
    child_tree(&p, &c);
    let mut t = TreeTar::new(Vec::new());
    t.append_tree(&p, &[]).unwrap();
    let base = t.finish().unwrap();
    let top = diff_layer(&p, &c).unwrap();
    (p, c, base, top)
}

#[tokio::test]
async fn every_attribute_survives_a_mounted_apply_on_a_parent_with_devices_and_hard_links() {
    if !privileged() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (p, c, base, top) = trees(work.path());
    let b = MemBackend::new();
    let meta = tempfile::tempdir().unwrap();
    let s = open(&b, meta.path(), "ll", ApplyMode::Mounted).await;
    let a = s
        .apply_diff("p", None, std::io::Cursor::new(base))
        .await
        .unwrap();
    assert_eq!(a.method, ApplyMethod::Mounted);
    assert_eq!(a.losses, Vec::<Loss>::new());
    let a = s
        .apply_diff("c", Some("p"), std::io::Cursor::new(gzip(&top)))
        .await
        .unwrap();
    assert_eq!(a.method, ApplyMethod::Mounted);
    assert_eq!(a.losses, Vec::<Loss>::new());

    let want_p = Manifest::of(&p).unwrap();
    let want_c = Manifest::of(&c).unwrap();
    // The source really has what the test claims (the comparer sees it).
    let e = &want_c.entries;
    assert_eq!(e[Path::new("usr/bin/su")].mode, 0o4755);
    assert_eq!(e[Path::new("usr/bin/wall")].mode, 0o2755);
    assert_eq!(e[Path::new("tmp")].mode, 0o1777);
    assert!(
        e[Path::new("usr/bin/ping")]
            .xattrs
            .contains_key("security.capability")
    );
    assert!(
        e[Path::new("srv/acl")]
            .xattrs
            .contains_key("system.posix_acl_access")
    );
    assert_eq!(
        e[Path::new("usr/local-perl")].link_group.as_deref(),
        Some(Path::new("usr/bin/perl"))
    );
    assert_eq!(e[Path::new("dev/null")].rdev, Some((1, 3)));
    assert_ne!(e[Path::new("srv/su-link")].mtime.1, 0);

    let scratch = tempfile::tempdir().unwrap();
    want_p.assert_same(&manifest_of(&s, "p", scratch.path()).await);
    want_c.assert_same(&manifest_of(&s, "c", scratch.path()).await);
}

#[tokio::test]
async fn the_rebuild_path_reports_what_it_loses() {
    if !privileged() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_p, c, base, top) = trees(work.path());
    let b = MemBackend::new();
    let meta = tempfile::tempdir().unwrap();
    let s = open(&b, meta.path(), "rb", ApplyMode::Rebuilt).await;
    let a = s
        .apply_diff("p", None, std::io::Cursor::new(base))
        .await
        .unwrap();
    assert_eq!(a.method, ApplyMethod::Rebuilt);
    assert!(
        a.losses
            .iter()
            .any(|l| matches!(l, Loss::SubsecondTimes { entries } if *entries > 5)),
        "{:?}",
        a.losses
    );
    assert!(
        a.losses
            .iter()
            .any(|l| matches!(l, Loss::DeviceTimes { entries: 2 })),
        "{:?}",
        a.losses
    );
    let a = s
        .apply_diff("c", Some("p"), std::io::Cursor::new(top))
        .await
        .unwrap();
    assert!(a.losses.contains(&Loss::ParentTree), "{:?}", a.losses);
    // And the losses are real: the trees differ.
    let scratch = tempfile::tempdir().unwrap();
    let got = manifest_of(&s, "c", scratch.path()).await;
    assert!(!Manifest::of(&c).unwrap().diff(&got).is_empty());
}

#[tokio::test]
async fn opaque_directories_and_whiteouts_apply_into_the_mount() {
    if !privileged() {
        return;
    }
    let b = MemBackend::new();
    let meta = tempfile::tempdir().unwrap();
    let s = open(&b, meta.path(), "op", ApplyMode::Mounted).await;
    let base = TarBuilder::new()
        .file("opq/lower", b"l")
        .file("opq/lowerdir/x", b"x")
        .file("dir/old", b"o")
        .file("dir/keep", b"k")
        .finish();
    s.apply_diff("b", None, std::io::Cursor::new(base))
        .await
        .unwrap();
    let top = TarBuilder::new()
        .file("opq/.wh..wh..opq", b"")
        .file("opq/mine", b"m")
        .file("dir/.wh.old", b"")
        .finish();
    s.apply_diff("t", Some("b"), std::io::Cursor::new(top))
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let m = manifest_of(&s, "t", scratch.path()).await;
    let has = |p: &str| m.entries.contains_key(Path::new(p));
    assert!(has("opq/mine") && has("dir/keep"));
    assert!(!has("opq/lower") && !has("opq/lowerdir") && !has("dir/old"));
    assert!(
        !m.entries
            .keys()
            .any(|p| p.to_string_lossy().contains(".wh."))
    );
}

#[tokio::test]
async fn a_hostile_layer_changes_nothing_stored_on_the_mounted_path() {
    if !privileged() {
        return;
    }
    let b = MemBackend::new();
    let meta = tempfile::tempdir().unwrap();
    let s = open(&b, meta.path(), "ho", ApplyMode::Mounted).await;
    let base = TarBuilder::new().file("a", b"a").finish();
    s.apply_diff("b", None, std::io::Cursor::new(base))
        .await
        .unwrap();
    let before = store_state(&s).await;
    // A symlink to the host's /tmp, then a write through it: refused half-way through the
    // apply (the symlink already exists in the mount), rolled back.
    let mut evil = TarBuilder::new().symlink("d", "/tmp").finish();
    evil.truncate(evil.len() - 1024);
    evil.extend(raw_entry(b"d/slacker-evil", b'0', b"pwned", b""));
    evil.extend(end());
    let err = s
        .apply_diff("t", Some("b"), std::io::Cursor::new(evil))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), slacker_core::ErrorKind::InvalidInput, "{err}");
    assert!(!Path::new("/tmp/slacker-evil").exists());
    assert_eq!(store_state(&s).await, before);
}
