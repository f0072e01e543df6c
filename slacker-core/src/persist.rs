//! The persistence seam: small metadata documents written crash-safely.
//!
//! Backends and the layer store keep their metadata (origins, bitmaps, holds, layer
//! records) as small named documents in a [`MetaStore`]. [`DirStore`] writes each one
//! atomically: write a temporary file, fsync it, rename it over the name, fsync the
//! directory. Every step that matters for durability passes a named *sync point*; a
//! [`CrashPlan`] makes the store fail at the N-th point as if the process had died
//! there, so a test can crash a workload at every sync point, reopen from what is on
//! disk and compare with the model.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of temporary files; a reopen removes any left behind by a crash.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Where small metadata documents live.
pub trait MetaStore: Send + Sync + std::fmt::Debug {
    /// Reads document `name`, `None` if absent.
    ///
    /// # Errors
    /// IO errors.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces document `name` atomically and durably: after a crash it holds either the
    /// old or the new content, never a mix.
    ///
    /// # Errors
    /// IO errors, or an injected crash.
    fn write(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Replaces several documents, each atomically and durably as
    /// [`write`](Self::write) does; the set as a whole is not atomic (after a crash any of
    /// them may hold its old or its new content). By default one `write` after the other;
    /// [`DirStore`] shares one directory sync among them.
    ///
    /// # Errors
    /// IO errors, or an injected crash.
    fn write_many(&self, docs: &[(&str, &[u8])]) -> io::Result<()> {
        for (name, data) in docs {
            self.write(name, data)?;
        }
        Ok(())
    }
    /// Removes document `name` durably (absent is fine).
    ///
    /// # Errors
    /// IO errors, or an injected crash.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Names of all documents, sorted.
    ///
    /// # Errors
    /// IO errors.
    fn list(&self) -> io::Result<Vec<String>>;
}

/// Decides at which sync point a simulated crash happens.
///
/// Share one plan between a store and the test: `crash_at(n)` makes the n-th sync point
/// (counting from 0) and every later one fail with an error whose text contains
/// `injected crash`. `points()` tells how many points a workload passed, so a test can
/// first count them with a plan that never crashes, then crash at each in turn.
///
/// The type is part of the seam (stores and backends accept an optional plan), but a
/// plan can only be made with the `test-util` feature: a production build cannot crash
/// on purpose.
#[derive(Debug)]
pub struct CrashPlan {
    passed: AtomicU64,
    crash_at: AtomicU64,
}

impl CrashPlan {
    /// A plan that never crashes (it still counts the sync points passed).
    #[cfg(any(test, feature = "test-util"))]
    pub fn never() -> Arc<Self> {
        Arc::new(Self {
            passed: AtomicU64::new(0),
            crash_at: AtomicU64::new(u64::MAX),
        })
    }

    /// A plan that crashes at sync point `n` (0-based) and after.
    #[cfg(any(test, feature = "test-util"))]
    pub fn crash_at(n: u64) -> Arc<Self> {
        Arc::new(Self {
            passed: AtomicU64::new(0),
            crash_at: AtomicU64::new(n),
        })
    }

    /// How many sync points were reached so far.
    pub fn points(&self) -> u64 {
        self.passed.load(Ordering::SeqCst)
    }

    /// Whether the crash has happened.
    pub fn crashed(&self) -> bool {
        self.points() > self.crash_at.load(Ordering::SeqCst)
    }

    /// Passes sync point `what`: an error if the plan crashes here (or crashed before).
    ///
    /// # Errors
    /// `injected crash at sync point N (what)`.
    pub fn point(&self, what: &str) -> io::Result<()> {
        let n = self.passed.fetch_add(1, Ordering::SeqCst);
        if n >= self.crash_at.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "injected crash at sync point {n} ({what})"
            )));
        }
        Ok(())
    }
}

/// A [`MetaStore`] in a directory, one file per document.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
    plan: Option<Arc<CrashPlan>>,
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.ends_with(TEMP_SUFFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad metadata document name {name:?}"),
        ))
    }
}

impl DirStore {
    /// Opens (creating) `dir`, and removes temporary files a crash left behind.
    ///
    /// # Errors
    /// IO errors.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                fs::remove_file(e.path())?;
            }
        }
        Ok(Self { dir, plan: None })
    }

    /// The same store, crashing as `plan` says (for tests).
    pub fn with_crash_plan(mut self, plan: Arc<CrashPlan>) -> Self {
        self.plan = Some(plan);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn point(&self, what: &str) -> io::Result<()> {
        match &self.plan {
            Some(p) => p.point(what),
            None => Ok(()),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl MetaStore for DirStore {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        match fs::read(self.dir.join(name)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, name: &str, data: &[u8]) -> io::Result<()> {
        // One document: temp written and synced, renamed, directory synced.
        self.write_many(&[(name, data)])
    }

    /// Every document's temporary file is written and synced, then all are renamed, then
    /// the directory is synced once: `2 + n` fsyncs for `n` documents instead of `2n`.
    fn write_many(&self, docs: &[(&str, &[u8])]) -> io::Result<()> {
        let mut temps = Vec::with_capacity(docs.len());
        for (name, data) in docs {
            check_name(name)?;
            let tmp = self.dir.join(format!(".{name}{TEMP_SUFFIX}"));
            self.point("create temp")?;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            self.point("fsync temp")?;
            f.sync_all()?;
            temps.push((tmp, self.dir.join(name)));
        }
        if temps.is_empty() {
            return Ok(());
        }
        for (tmp, dst) in &temps {
            self.point("rename")?;
            fs::rename(tmp, dst)?;
        }
        self.point("fsync dir")?;
        self.sync_dir()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.point("unlink")?;
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        self.point("fsync dir")?;
        self.sync_dir()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_atomic_at_every_crash_point() {
        let dir = tempfile::tempdir().unwrap();
        let count = CrashPlan::never();
        let s = DirStore::open(dir.path())
            .unwrap()
            .with_crash_plan(count.clone());
        s.write("doc", b"old").unwrap();
        let base = count.points();
        s.write("doc", b"new").unwrap();
        let per_write = count.points() - base;
        assert_eq!(per_write, 4);
        for n in 0..per_write {
            let d = tempfile::tempdir().unwrap();
            DirStore::open(d.path())
                .unwrap()
                .write("doc", b"old")
                .unwrap();
            let plan = CrashPlan::crash_at(n);
            let s = DirStore::open(d.path())
                .unwrap()
                .with_crash_plan(plan.clone());
            let err = s.write("doc", b"new").unwrap_err();
            assert!(err.to_string().contains("injected crash"));
            let again = DirStore::open(d.path()).unwrap();
            let got = again.read("doc").unwrap().unwrap();
            assert!(
                got == b"old" || got == b"new",
                "torn document after crash at {n}"
            );
            assert_eq!(
                again.list().unwrap(),
                vec!["doc".to_string()],
                "temp left behind"
            );
        }
    }

    #[test]
    fn write_many_leaves_each_document_old_or_new_at_every_crash_point() {
        let docs: [(&str, &[u8]); 3] = [("a", b"new a"), ("b", b"new b"), ("c", b"new c")];
        let old = |d: &DirStore| {
            d.write("a", b"old a").unwrap();
            d.write("b", b"old b").unwrap(); // "c" is new
        };
        let dir = tempfile::tempdir().unwrap();
        let count = CrashPlan::never();
        let s = DirStore::open(dir.path())
            .unwrap()
            .with_crash_plan(count.clone());
        old(&s);
        let base = count.points();
        s.write_many(&docs).unwrap();
        let points = count.points() - base;
        // Three temp files created and synced, three renames, one directory sync.
        assert_eq!(points, 3 * 2 + 3 + 1);
        for (name, data) in docs {
            assert_eq!(s.read(name).unwrap().as_deref(), Some(data));
        }
        let mut seen_new = [false; 3];
        for n in 0..points {
            let d = tempfile::tempdir().unwrap();
            old(&DirStore::open(d.path()).unwrap());
            let plan = CrashPlan::crash_at(n);
            let s = DirStore::open(d.path())
                .unwrap()
                .with_crash_plan(plan.clone());
            let err = s.write_many(&docs).unwrap_err();
            assert!(err.to_string().contains("injected crash"));
            let again = DirStore::open(d.path()).unwrap();
            for (i, (name, data)) in docs.iter().enumerate() {
                let got = again.read(name).unwrap();
                let before = match *name {
                    "a" => Some(&b"old a"[..]),
                    "b" => Some(&b"old b"[..]),
                    _ => None,
                };
                assert!(
                    got.as_deref() == before || got.as_deref() == Some(*data),
                    "torn {name} after a crash at {n}: {got:?}"
                );
                seen_new[i] |= got.as_deref() == Some(*data);
            }
            let names: Vec<String> = fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                names.iter().all(|n| ["a", "b", "c"].contains(&n.as_str())),
                "temp left behind after a crash at {n}: {names:?}"
            );
        }
        // Some crash point left each document renamed into place.
        assert_eq!(seen_new, [true; 3]);
    }

    #[test]
    fn names_are_checked_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path()).unwrap();
        assert!(s.write("../escape", b"x").is_err());
        assert!(s.write(".hidden", b"x").is_err());
        assert_eq!(s.read("missing").unwrap(), None);
        s.write("a", b"1").unwrap();
        s.remove("a").unwrap();
        s.remove("a").unwrap();
        assert!(s.list().unwrap().is_empty());
    }
}
