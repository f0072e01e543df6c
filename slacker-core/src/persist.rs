//! The persistence seam: small metadata documents written crash-safely.
//!
//! Backends and the layer store keep their metadata (origins, bitmaps, holds, layer
//! records) as small named documents in a [`MetaStore`]. [`DirStore`] writes each one
//! atomically: write a temporary file, fsync it, rename it over the name, fsync the
//! directory. Every step that matters for durability passes a named *sync point*; a
//! [`CrashPlan`] makes the store fail at the N-th point as if the process had died
//! there, so a test can crash a workload at every sync point, reopen from what is on
//! disk and compare with the model.
//!
//! A process crash keeps the page cache: everything done before the crash is still seen
//! after it, synced or not, so such a test cannot see a missing fsync. A *power cut*
//! (`CrashPlan::power_cut_at`, with `test-util`) also drops what was not synced: every
//! [`DirStore`] sharing the plan keeps a shadow of what its syncs made durable (a file's
//! content only through an fsync of the file, a name, rename or removal only through an
//! fsync of the directory: what POSIX promises, and less than ext4 or btrfs keep), and
//! [`CrashPlan::restore_power`] rewrites each directory to that. A missing or misordered
//! sync then shows as a lost or torn document. `CrashPlan::torn_power_cut_at` is the
//! other end of what a file system may keep: every name as it stood (a journal commit
//! made the directory durable) but file contents only as synced, so a file created and
//! not yet synced is there and empty (ext4's zero-length files).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// Writes the new document `name` (absent so far) durably. A crash before it returns
    /// may leave the document absent, empty, zero-filled or holding a prefix of `data`, so
    /// a reader must take such a document for one that was never written; once it has
    /// returned the document holds `data`. By default [`write`](Self::write) (which never
    /// leaves a torn document); [`DirStore`] writes in place: no temporary file or rename,
    /// one fsync of the file and one of the directory.
    ///
    /// # Errors
    /// IO errors, or an injected crash.
    fn create(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.write(name, data)
    }
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

/// Decides at which sync point a simulated crash (or power cut) happens.
///
/// Share one plan between a store and the test: `crash_at(n)` makes the n-th sync point
/// (counting from 0) and every later one fail with an error whose text contains
/// `injected crash`. `points()` tells how many points a workload passed, so a test can
/// first count them with a plan that never crashes, then crash at each in turn.
/// `power_cut_at(n)` fails the same way and also loses what was not synced: see
/// [`restore_power`](Self::restore_power).
///
/// The type is part of the seam (stores and backends accept an optional plan), but a
/// plan can only be made with the `test-util` feature: a production build cannot crash
/// on purpose.
pub struct CrashPlan {
    passed: AtomicU64,
    crash_at: AtomicU64,
    /// Power-cut plans: the stores whose unsynced changes the cut loses.
    power: Option<Mutex<Vec<Arc<Shadow>>>>,
    /// Torn power cuts: names survive as they stood, unsynced contents do not.
    keep_names: bool,
    /// Set when the power went: shadows record nothing after it.
    cut: AtomicBool,
}

impl std::fmt::Debug for CrashPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashPlan")
            .field("passed", &self.passed)
            .field("crash_at", &self.crash_at)
            .field("power_cut", &self.power.is_some())
            .finish_non_exhaustive()
    }
}

impl CrashPlan {
    #[cfg(any(test, feature = "test-util"))]
    fn make(n: u64, power: bool, keep_names: bool) -> Arc<Self> {
        Arc::new(Self {
            passed: AtomicU64::new(0),
            crash_at: AtomicU64::new(n),
            power: power.then(|| Mutex::new(Vec::new())),
            keep_names,
            cut: AtomicBool::new(false),
        })
    }

    /// A plan that never crashes (it still counts the sync points passed).
    #[cfg(any(test, feature = "test-util"))]
    pub fn never() -> Arc<Self> {
        Self::make(u64::MAX, false, false)
    }

    /// A plan that crashes at sync point `n` (0-based) and after.
    #[cfg(any(test, feature = "test-util"))]
    pub fn crash_at(n: u64) -> Arc<Self> {
        Self::make(n, false, false)
    }

    /// A plan that cuts the power at sync point `n` (0-based): that point and every later
    /// one fail as with [`crash_at`](Self::crash_at), and what the stores on this plan had
    /// not synced by then is lost once [`restore_power`](Self::restore_power) is called.
    /// `u64::MAX` never cuts on its own (then `restore_power` cuts where the workload
    /// stands).
    #[cfg(any(test, feature = "test-util"))]
    pub fn power_cut_at(n: u64) -> Arc<Self> {
        Self::make(n, true, false)
    }

    /// As [`power_cut_at`](Self::power_cut_at), but the directories keep every name as it
    /// stood at the cut (created, renamed and removed entries alike, as if a journal
    /// commit had made them durable) while file contents are still only as synced: a file
    /// created and written but not synced is there, empty.
    #[cfg(any(test, feature = "test-util"))]
    pub fn torn_power_cut_at(n: u64) -> Arc<Self> {
        Self::make(n, true, true)
    }

    /// How many sync points were reached so far.
    pub fn points(&self) -> u64 {
        self.passed.load(Ordering::SeqCst)
    }

    /// Whether the crash has happened.
    pub fn crashed(&self) -> bool {
        self.points() > self.crash_at.load(Ordering::SeqCst)
    }

    /// Whether this plan models a power cut (unsynced changes lost), not only a crash.
    pub fn is_power_cut(&self) -> bool {
        self.power.is_some()
    }

    /// Passes sync point `what`: an error if the plan crashes here (or crashed before).
    ///
    /// # Errors
    /// `injected crash at sync point N (what)`.
    pub fn point(&self, what: &str) -> io::Result<()> {
        let n = self.passed.fetch_add(1, Ordering::SeqCst);
        if n >= self.crash_at.load(Ordering::SeqCst) {
            if self.power.is_some() {
                self.cut.store(true, Ordering::SeqCst);
            }
            return Err(io::Error::other(format!(
                "injected crash at sync point {n} ({what})"
            )));
        }
        Ok(())
    }

    /// Power-cut plans: cuts the power now if the plan has not yet, then rewrites every
    /// directory of a [`DirStore`] on this plan to what its syncs had made durable at the
    /// cut. Call it once the crashed workload has stopped and before reopening. A plain
    /// crash plan (nothing to lose) does nothing.
    ///
    /// # Errors
    /// IO errors rewriting a directory.
    pub fn restore_power(&self) -> io::Result<()> {
        let Some(power) = &self.power else {
            return Ok(());
        };
        self.cut.store(true, Ordering::SeqCst);
        let shadows = power.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for s in shadows {
            s.restore(self.keep_names)?;
        }
        Ok(())
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// What a [`DirStore`] on a power-cut plan has made durable, kept beside the directory.
#[derive(Debug)]
struct Shadow {
    dir: PathBuf,
    state: Mutex<ShadowState>,
}

/// Files by inode number, as POSIX sees them: a name points to an inode; an inode's
/// content is durable as of its last fsync, a name as of the directory's last fsync.
#[derive(Debug, Default)]
struct ShadowState {
    next_inode: u64,
    /// The directory now.
    names: BTreeMap<String, u64>,
    /// The directory as its last fsync left it.
    synced_names: BTreeMap<String, u64>,
    /// Every inode's content now.
    content: HashMap<u64, Vec<u8>>,
    /// Inodes' content as of their last fsync (absent: never synced, empty after a cut).
    synced: HashMap<u64, Vec<u8>>,
}

impl ShadowState {
    fn new_inode(&mut self, name: &str, data: &[u8]) {
        self.next_inode += 1;
        let i = self.next_inode;
        self.content.insert(i, data.to_vec());
        self.names.insert(name.to_owned(), i);
    }
}

impl Shadow {
    /// Starts from the directory as it is: everything in it counts as durable (a
    /// [`DirStore`] syncs its directory when it opens).
    fn of(dir: &Path) -> io::Result<Self> {
        let mut st = ShadowState::default();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let data = fs::read(e.path())?;
            st.new_inode(&name, &data);
            let i = st.next_inode;
            st.synced.insert(i, data);
        }
        st.synced_names = st.names.clone();
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(st),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ShadowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power comes back: the directory holds the names its last sync made durable
    /// (or, `keep_names`, every name as it stood), each with its inode's content as of
    /// that inode's last sync.
    fn restore(&self, keep_names: bool) -> io::Result<()> {
        let st = self.lock();
        for e in fs::read_dir(&self.dir)? {
            fs::remove_file(e?.path())?;
        }
        let names = if keep_names {
            &st.names
        } else {
            &st.synced_names
        };
        for (name, i) in names {
            let data = st.synced.get(i).map(Vec::as_slice).unwrap_or_default();
            fs::write(self.dir.join(name), data)?;
        }
        Ok(())
    }
}

/// A [`MetaStore`] in a directory, one file per document.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
    plan: Option<Arc<CrashPlan>>,
    /// With a power-cut plan: what the syncs made durable.
    shadow: Option<Arc<Shadow>>,
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
    /// Opens (creating) `dir`, removes temporary files a crash left behind, and syncs the
    /// directory: a process that crashed between a rename (or a removal) and its
    /// directory sync left a change that reads as done but is not yet durable; whoever
    /// acts on what it reads (a recovery) must not lose it to a power cut later.
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
        File::open(&dir)?.sync_all()?;
        Ok(Self {
            dir,
            plan: None,
            shadow: None,
        })
    }

    /// The same store, crashing as `plan` says (for tests). With a power-cut plan
    /// (`CrashPlan::power_cut_at`) the store keeps track of what its syncs made durable,
    /// for [`CrashPlan::restore_power`]; the directory counts as durable as it is now.
    ///
    /// # Panics
    /// With a power-cut plan, if the directory cannot be read.
    pub fn with_crash_plan(mut self, plan: Arc<CrashPlan>) -> Self {
        if let Some(shadows) = &plan.power {
            let shadow = Arc::new(Shadow::of(&self.dir).expect("reading the store directory"));
            shadows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Arc::clone(&shadow));
            self.shadow = Some(shadow);
        }
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
        File::open(&self.dir)?.sync_all()?;
        self.record(|s| s.synced_names = s.names.clone());
        Ok(())
    }

    /// Notes a change in the power-cut shadow (nothing after the cut: the power is off).
    fn record(&self, f: impl FnOnce(&mut ShadowState)) {
        if let (Some(shadow), Some(plan)) = (&self.shadow, &self.plan) {
            let mut st = shadow.lock();
            if !plan.is_cut() {
                f(&mut st);
            }
        }
    }

    /// Creates the empty documents `names` that do not exist yet, then syncs the directory
    /// once: `1 + 0` fsyncs for any number of new documents (an empty file has no content
    /// to sync; the directory sync makes its name durable). For facts that a document's
    /// existence tells, such as a hold; removed again with [`MetaStore::remove`]. After a
    /// crash each new document exists or not.
    ///
    /// # Errors
    /// IO errors, or an injected crash.
    pub fn create_markers(&self, names: &[&str]) -> io::Result<()> {
        let mut created = false;
        for name in names {
            check_name(name)?;
            self.point("create marker")?;
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.dir.join(name))
            {
                Ok(_) => {
                    created = true;
                    self.record(|s| s.new_inode(name, b""));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        if !created {
            return Ok(());
        }
        self.point("fsync dir")?;
        self.sync_dir()
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

    /// Created in place (`O_EXCL`), written, synced, then the directory synced: 2 fsyncs
    /// and no rename where [`write`](MetaStore::write) has a temporary file. A document
    /// that exists already is replaced by `write` instead.
    fn create(&self, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        self.point("create doc")?;
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return self.write(name, data),
            Err(e) => return Err(e),
        };
        f.write_all(data)?;
        self.record(|s| s.new_inode(name, data));
        self.point("fsync doc")?;
        f.sync_all()?;
        self.record(|s| {
            let i = s.names[name];
            s.synced.insert(i, data.to_vec());
        });
        self.point("fsync dir")?;
        self.sync_dir()
    }

    /// Every document's temporary file is written and synced, then all are renamed, then
    /// the directory is synced once: `2 + n` fsyncs for `n` documents instead of `2n`.
    fn write_many(&self, docs: &[(&str, &[u8])]) -> io::Result<()> {
        let mut temps = Vec::with_capacity(docs.len());
        for (name, data) in docs {
            check_name(name)?;
            let tmp = self.dir.join(format!(".{name}{TEMP_SUFFIX}"));
            let tmp_name = format!(".{name}{TEMP_SUFFIX}");
            self.point("create temp")?;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            self.record(|s| match s.names.get(&tmp_name) {
                // O_TRUNC on a temp a failed write left: the same inode, new content.
                Some(&i) => {
                    s.content.insert(i, data.to_vec());
                }
                None => s.new_inode(&tmp_name, data),
            });
            self.point("fsync temp")?;
            f.sync_all()?;
            self.record(|s| {
                let i = s.names[&tmp_name];
                let data = s.content[&i].clone();
                s.synced.insert(i, data);
            });
            temps.push((tmp, self.dir.join(name), tmp_name, *name));
        }
        if temps.is_empty() {
            return Ok(());
        }
        for (tmp, dst, tmp_name, name) in &temps {
            self.point("rename")?;
            fs::rename(tmp, dst)?;
            self.record(|s| {
                if let Some(i) = s.names.remove(tmp_name) {
                    s.names.insert((*name).to_owned(), i);
                }
            });
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
        self.record(|s| {
            s.names.remove(name);
        });
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

    /// Every sync point of one `write` over an old document, as a process crash and as a
    /// power cut: the document reads old or new, never torn or empty, and no temporary
    /// file is left. The two differ exactly where they must: at the directory sync the
    /// renamed document is there after a crash (the page cache kept it) but gone after a
    /// power cut (only the sync would have made the rename durable).
    #[test]
    fn write_is_atomic_and_durable_at_every_crash_and_power_cut_point() {
        const POINTS: u64 = 4; // create temp, fsync temp, rename, fsync dir
        for power in [false, true] {
            let mut got_at = Vec::new();
            for n in 0..POINTS {
                let d = tempfile::tempdir().unwrap();
                DirStore::open(d.path())
                    .unwrap()
                    .write("doc", b"old")
                    .unwrap();
                let plan = if power {
                    CrashPlan::power_cut_at(n)
                } else {
                    CrashPlan::crash_at(n)
                };
                let s = DirStore::open(d.path())
                    .unwrap()
                    .with_crash_plan(plan.clone());
                let err = s.write("doc", b"new").unwrap_err();
                assert!(err.to_string().contains("injected crash"));
                plan.restore_power().unwrap();
                let again = DirStore::open(d.path()).unwrap();
                let got = again.read("doc").unwrap().unwrap();
                assert!(
                    got == b"old" || got == b"new",
                    "torn after point {n}: {got:?}"
                );
                assert_eq!(again.list().unwrap(), ["doc"], "temp left behind");
                got_at.push(got);
            }
            let last = got_at.last().unwrap().as_slice();
            assert_eq!(last, if power { &b"old"[..] } else { &b"new"[..] });
            // Once `write` returned, the new document survives a power cut.
            let d = tempfile::tempdir().unwrap();
            let plan = CrashPlan::power_cut_at(u64::MAX);
            let s = DirStore::open(d.path())
                .unwrap()
                .with_crash_plan(plan.clone());
            s.write("doc", b"new").unwrap();
            plan.restore_power().unwrap();
            let again = DirStore::open(d.path()).unwrap();
            assert_eq!(again.read("doc").unwrap().as_deref(), Some(&b"new"[..]));
        }
    }

    /// The shadow is strict: a document written without its syncs (here: before the store
    /// was put on the plan, then changed behind its back) is what the plan's start saw,
    /// and an acknowledged `write_many`, `remove` and `create_markers` all survive a cut.
    #[test]
    fn acknowledged_changes_survive_a_power_cut_and_unsynced_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let plan = CrashPlan::power_cut_at(u64::MAX);
        let s = DirStore::open(d.path()).unwrap();
        s.write("gone", b"1").unwrap();
        s.write("kept", b"1").unwrap();
        let s = s.with_crash_plan(plan.clone());
        s.write_many(&[("a", b"a"), ("b", b"b")]).unwrap();
        s.remove("gone").unwrap();
        s.create_markers(&["m1", "m2"]).unwrap();
        s.create_markers(&["m1"]).unwrap(); // exists: nothing to do
        // Not through the store: never synced, so a cut loses it.
        fs::write(d.path().join("kept"), b"changed behind the store's back").unwrap();
        fs::write(d.path().join("stray"), b"x").unwrap();
        plan.restore_power().unwrap();
        let again = DirStore::open(d.path()).unwrap();
        assert_eq!(again.list().unwrap(), ["a", "b", "kept", "m1", "m2"]);
        assert_eq!(again.read("a").unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(again.read("kept").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(again.read("m1").unwrap().as_deref(), Some(&b""[..]));
    }

    /// `create` of a new document at each of its sync points, as a crash and as a power
    /// cut: absent, or (power cut before its syncs) present but empty, or complete; never
    /// anything else. Complete once it returned, also after a power cut.
    #[test]
    fn create_in_place_leaves_the_document_absent_empty_or_complete() {
        const POINTS: u64 = 3; // create doc, fsync doc, fsync dir
        let data = b"{\"new\": true}";
        for mode in ["crash", "power cut", "torn power cut"] {
            let mut seen = Vec::new();
            for n in 0..=POINTS {
                let d = tempfile::tempdir().unwrap();
                let plan = match mode {
                    "crash" => CrashPlan::crash_at(n),
                    "power cut" => CrashPlan::power_cut_at(n),
                    _ => CrashPlan::torn_power_cut_at(n),
                };
                let s = DirStore::open(d.path())
                    .unwrap()
                    .with_crash_plan(plan.clone());
                let r = s.create("doc", data);
                assert_eq!(r.is_ok(), n == POINTS, "point {n}: {r:?}");
                plan.restore_power().unwrap();
                let got = DirStore::open(d.path()).unwrap().read("doc").unwrap();
                match got.as_deref() {
                    None => seen.push("absent"),
                    Some(b"") => seen.push("empty"),
                    Some(g) if g == data => seen.push("complete"),
                    Some(g) => panic!("point {n}: torn {g:?}"),
                }
            }
            let want: &[&str] = match mode {
                "crash" => &["absent", "complete", "complete", "complete"],
                // The name is durable only through the directory sync, the last point.
                "power cut" => &["absent", "absent", "absent", "complete"],
                // Every name kept: created but cut before its fsync, the file is empty.
                _ => &["absent", "empty", "complete", "complete"],
            };
            assert_eq!(seen, want, "{mode}");
        }
        // An existing document is replaced atomically instead.
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        s.write("doc", b"old").unwrap();
        s.create("doc", b"new").unwrap();
        assert_eq!(s.read("doc").unwrap().as_deref(), Some(&b"new"[..]));
    }

    /// `create_markers` at each of its sync points: each marker exists or not, and the
    /// ones that exist after a power cut are exactly those the directory sync covered.
    #[test]
    fn markers_at_every_crash_and_power_cut_point() {
        let count = CrashPlan::never();
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path())
            .unwrap()
            .with_crash_plan(count.clone());
        s.create_markers(&["x", "y"]).unwrap();
        let points = count.points();
        assert_eq!(points, 2 + 1, "one point per marker, one directory sync");
        for power in [false, true] {
            for n in 0..points {
                let d = tempfile::tempdir().unwrap();
                let plan = if power {
                    CrashPlan::power_cut_at(n)
                } else {
                    CrashPlan::crash_at(n)
                };
                let s = DirStore::open(d.path())
                    .unwrap()
                    .with_crash_plan(plan.clone());
                assert!(s.create_markers(&["x", "y"]).is_err());
                plan.restore_power().unwrap();
                let got = DirStore::open(d.path()).unwrap().list().unwrap();
                let want: &[&str] = match (power, n) {
                    (true, _) => &[],
                    (false, 0) => &[],
                    (false, 1) => &["x"],
                    (false, _) => &["x", "y"],
                };
                assert_eq!(got, want, "power cut {power}, point {n}");
            }
        }
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
