//! Shared helpers for the layer tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use slacker_backend_mem::MemBackend;
use slacker_core::layer::TarOptions;
use slacker_core::persist::{CrashPlan, DirStore, MetaStore};
use slacker_core::{Backend, LayerStore, LayerStoreOptions};

/// Whether e2fsprogs is usable; otherwise `SKIPPED:` (or a panic under CI).
pub fn e2fsprogs() -> bool {
    let ok = ["mke2fs", "debugfs"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success() || !o.stderr.is_empty())
    });
    ok || slacker_testkit::skip_or_fail::<()>("e2fsprogs (mke2fs, debugfs) is not installed")
        .is_some()
}

/// Small volumes keep mke2fs fast.
pub fn options(name: &str) -> LayerStoreOptions {
    LayerStoreOptions::new(name)
        .with_volume_size(16 << 20)
        .with_tar_options(TarOptions::default())
}

pub async fn open_store(
    backend: MemBackend,
    dir: &Path,
    name: &str,
    plan: Option<Arc<CrashPlan>>,
) -> slacker_core::Result<LayerStore<MemBackend>> {
    let mut s = DirStore::open(dir).expect("meta dir");
    if let Some(p) = plan {
        s = s.with_crash_plan(p);
    }
    let meta: Arc<dyn MetaStore> = Arc::new(s);
    LayerStore::open(backend, meta, options(name)).await
}

/// A tar built with the tar crate from (path, content) files, (path, target) symlinks
/// and directories.
pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        ids(&mut h);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        ids(&mut h);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        ids(&mut h);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Link);
        h.set_mode(0o644);
        h.set_size(0);
        ids(&mut h);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.b.get_mut().extend_from_slice(bytes);
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

fn ids(h: &mut tar::Header) {
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
}

/// One raw ustar header (name set byte-for-byte, no validation) plus padded data.
pub fn raw_entry(name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    {
        let b = h.as_mut_bytes();
        let n = name.len().min(100);
        b[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        b[157..157 + l].copy_from_slice(&link[..l]);
    }
    h.set_mode(0o644);
    ids(&mut h);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// The two zero blocks that end a tar.
pub fn end() -> Vec<u8> {
    vec![0u8; 1024]
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Every path under `dir` with its kind and content, for "nothing changed" checks.
pub fn listing(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let desc = if m.file_type().is_symlink() {
                format!("link:{:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else {
                format!("file:{:?}", std::fs::read(&p).unwrap_or_default())
            };
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), desc);
        }
    }
    out
}

/// What a store and its backend hold, for "nothing stored changed" checks.
pub async fn store_state<B: Backend>(
    store: &LayerStore<B>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let layers = store
        .list()
        .await
        .into_iter()
        .map(|l| format!("{l:?}"))
        .collect();
    let b = store.backend();
    let vols = b
        .list_volumes()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    let mut snaps = Vec::new();
    for s in b.list_snapshots().await.unwrap() {
        let st = b.stat_snapshot(&s).await.unwrap();
        snaps.push(format!("{s} {:?}", st.holds));
    }
    (layers, vols, snaps)
}

/// Writes the whole content of a volume into a file (for debugfs).
pub async fn volume_to_file<B: Backend>(b: &B, vol: &slacker_core::VolumeId, path: &Path) {
    use slacker_core::BackendExt;
    let data = b.read_volume(vol).await.unwrap();
    std::fs::write(path, &data).unwrap();
}

/// Builds a small root tree: etc/hostname, usr/bin/tool, dir/old, dir/keep.
pub fn base_tree(root: &Path, hostname: &str) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    std::fs::write(root.join("etc/hostname"), hostname).unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    std::fs::write(root.join("dir/old"), b"old").unwrap();
    std::fs::write(root.join("dir/keep"), b"keep").unwrap();
    std::fs::write(root.join("dir/sub/deep"), b"deep").unwrap();
}
