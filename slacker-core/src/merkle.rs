//! A blake3 Merkle tree over a snapshot's blocks: what lets a worker verify every block it
//! fetches lazily against one 32-byte root carried by the reference layer.
//!
//! ```text
//!                         root = H_root(blocks, block size, H_node(top block))
//!                                      │
//!   level 2 (top)   [ h ]              one tree block
//!   level 1         [ h h h … h ]      a tree block holds block_size / 32 hashes (128 at 4 KiB)
//!   level 0         [ h h h … h ] [ h h h … h ] …   one leaf hash per data block
//!   data            ▢ ▢ ▢ … ▢ ▢ ▢ …                 the snapshot's blocks
//! ```
//!
//! **Shape.** The leaves are `H_leaf(block)`, one per data block; every level above holds,
//! per *tree block* of the level below (`block_size` bytes of hashes, an arity of
//! `block_size / 32`), the hash `H_node(level, entries)` of that tree block. A level with
//! one entry is the top; the root binds its tree block to the volume's block count and
//! block size. The three hashes are blake3 in keyed mode with keys derived from distinct
//! contexts (domain separation: a leaf can never pass for a node). It is bao's idea (a
//! blake3 tree, verified piece by piece) with a wide fan-out: one fetched tree block
//! verifies 128 data blocks (512 KiB), and a 1 GiB volume is only three levels deep.
//!
//! **Where the tree lives.** The tree is a snapshot of its own on the same storage as the
//! data ([`MerkleRoot::tree`]), levels laid out one after another, each starting on a
//! block boundary. Only the root travels through the registry (in the reference layer,
//! [`crate::Reference::merkle`]): it is the anchor of trust, and a worker needs nothing
//! else up front. A [`MerkleVerifier`] fetches tree blocks on demand, each verified against
//! its already verified parent (the top one against the root), and keeps them: a startup
//! that reads 20 MB fetches about 40 tree blocks of 4 KiB. Storage and wire are both
//! untrusted: a tampered tree block fails exactly like a tampered data block.
//!
//! **Sparse trees.** An entry that equals the hash of an all-zero subtree (a precomputed
//! constant per level) is *stored* as 32 zero bytes, so the tree of a mostly empty volume
//! is itself mostly holes, and a verifier never fetches a tree block whose parent entry
//! says "all zeros": it knows its content.
//!
//! **Cost of a push.** [`build`] updates a parent's tree (the tree of the snapshot the
//! new one was cloned from) by cloning it and rehashing only the blocks of the diverged
//! bitmap, then the tree blocks on their paths: O(written). A snapshot without a parent
//! (a first import) hashes its diverged blocks only, the rest being zeros; one whose
//! parent has no known tree hashes every block once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, SnapshotStat, VolumeOptions};
use crate::bitmap::BlockBitmap;
use crate::block::{BlockRange, BlockSize};
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{SnapshotId, VolumeId};

const HASH: usize = 32;
const DIGEST_PREFIX: &str = "blake3:";
/// Largest data read while building a tree (in blocks of 4 KiB: 1 MiB).
const BUILD_READ_BYTES: u64 = 1 << 20;

/// The Merkle root of a snapshot and where its tree lives: the optional field of a
/// reference layer that makes every lazily fetched block verifiable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MerkleRoot {
    /// `blake3:<64 lowercase hex>`: the root hash.
    pub root: String,
    /// The snapshot holding the tree's levels, on the same storage as the data.
    pub tree: SnapshotId,
}

impl MerkleRoot {
    /// A root from its hash and the tree snapshot.
    pub fn new(root: blake3::Hash, tree: SnapshotId) -> Self {
        Self {
            root: format!("{DIGEST_PREFIX}{}", root.to_hex()),
            tree,
        }
    }

    /// The root hash.
    ///
    /// # Errors
    /// `InvalidInput` unless `root` is `blake3:` and 64 lowercase hex digits.
    pub fn hash(&self) -> Result<blake3::Hash> {
        let hex = self
            .root
            .strip_prefix(DIGEST_PREFIX)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| {
                Error::invalid("Merkle root must be blake3: and 64 lowercase hex digits")
            })?;
        blake3::Hash::from_hex(hex).map_err(|e| Error::invalid(format!("Merkle root: {e}")))
    }
}

fn key(context: &str, cell: &'static OnceLock<[u8; 32]>) -> &'static [u8; 32] {
    cell.get_or_init(|| blake3::derive_key(context, &[]))
}

fn leaf_key() -> &'static [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    key("slacker 2026 merkle leaf v1", &K)
}

fn node_key() -> &'static [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    key("slacker 2026 merkle node v1", &K)
}

fn root_key() -> &'static [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    key("slacker 2026 merkle root v1", &K)
}

/// The leaf hash of one data block.
pub fn leaf_hash(block: &[u8]) -> blake3::Hash {
    blake3::keyed_hash(leaf_key(), block)
}

/// The hash of a tree block of `level - 1` (its entries, padding included), as stored
/// in `level`.
fn node_hash(level: usize, entries: &[blake3::Hash]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(node_key());
    h.update(&(level as u64).to_le_bytes());
    for e in entries {
        h.update(e.as_bytes());
    }
    h.finalize()
}

/// The shape of the tree of a volume: level sizes, where each level starts in the tree
/// snapshot, and the all-zero constants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeLayout {
    blocks: u64,
    block_size: BlockSize,
    /// Entries per level, leaves first; the last has one.
    counts: Vec<u64>,
    /// First tree block of each level in the tree snapshot.
    starts: Vec<u64>,
    /// The hash of an all-zero subtree, per level.
    zeros: Vec<blake3::Hash>,
}

impl TreeLayout {
    /// The layout for a volume of `size` bytes in blocks of `block_size`.
    ///
    /// # Errors
    /// `InvalidInput` unless `size` is a positive multiple of the block size.
    pub fn new(size: u64, block_size: BlockSize) -> Result<Self> {
        let bs = block_size.bytes();
        if size == 0 || size % bs != 0 {
            return Err(Error::invalid(format!(
                "Merkle tree: size {size} is not a positive multiple of the block size {bs}"
            )));
        }
        let arity = bs / HASH as u64;
        let mut counts = vec![size / bs];
        while *counts.last().expect("one level") > 1 {
            let c = counts.last().expect("one level").div_ceil(arity);
            counts.push(c);
        }
        let mut starts = Vec::with_capacity(counts.len());
        let mut at = 0;
        for c in &counts {
            starts.push(at);
            at += c.div_ceil(arity);
        }
        let mut zeros = vec![leaf_hash(&vec![0u8; bs as usize])];
        for level in 1..counts.len() {
            let below = zeros[level - 1];
            zeros.push(node_hash(level, &vec![below; arity as usize]));
        }
        Ok(Self {
            blocks: size / bs,
            block_size,
            counts,
            starts,
            zeros,
        })
    }

    /// Hashes per tree block.
    pub fn arity(&self) -> u64 {
        self.block_size.bytes() / HASH as u64
    }

    /// Number of levels (leaves included).
    pub fn depth(&self) -> usize {
        self.counts.len()
    }

    /// Size of the tree snapshot in bytes (about `size / 128` at 4 KiB blocks).
    pub fn tree_bytes(&self) -> u64 {
        let last = self.depth() - 1;
        (self.starts[last] + 1) * self.block_size.bytes()
    }

    /// Data blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn top(&self) -> usize {
        self.depth() - 1
    }

    fn offset(&self, level: usize, idx: u64) -> u64 {
        (self.starts[level] + idx) * self.block_size.bytes()
    }

    fn root_of(&self, top_block: &[blake3::Hash]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(root_key());
        h.update(&self.blocks.to_le_bytes());
        h.update(&self.block_size.get().to_le_bytes());
        h.update(node_hash(self.depth(), top_block).as_bytes());
        h.finalize()
    }

    /// The root of an all-zero volume of this shape.
    pub fn zero_root(&self) -> blake3::Hash {
        self.root_of(&self.zero_block(self.top()))
    }

    fn zero_block(&self, level: usize) -> Vec<blake3::Hash> {
        vec![self.zeros[level]; self.arity() as usize]
    }

    fn decode(&self, level: usize, bytes: &[u8]) -> Vec<blake3::Hash> {
        bytes
            .chunks_exact(HASH)
            .map(|c| {
                let a: [u8; HASH] = c.try_into().expect("chunks of 32");
                if a == [0; HASH] {
                    self.zeros[level]
                } else {
                    blake3::Hash::from_bytes(a)
                }
            })
            .collect()
    }

    fn encode(&self, level: usize, entries: &[blake3::Hash], out: &mut Vec<u8>) {
        for e in entries {
            if *e == self.zeros[level] {
                out.extend_from_slice(&[0; HASH]);
            } else {
                out.extend_from_slice(e.as_bytes());
            }
        }
    }
}

type TreeBlock = Arc<Vec<blake3::Hash>>;

/// Tree blocks fetched from a tree snapshot, each verified against its parent before it
/// is kept.
#[derive(Debug)]
struct TreeCache {
    layout: TreeLayout,
    tree: SnapshotId,
    root: blake3::Hash,
    blocks: Mutex<HashMap<(usize, u64), TreeBlock>>,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
}

impl TreeCache {
    fn new(layout: TreeLayout, root: &MerkleRoot) -> Result<Self> {
        Ok(Self {
            layout,
            tree: root.tree.clone(),
            root: root.hash()?,
            blocks: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        })
    }

    fn cached(&self, level: usize, idx: u64) -> Option<TreeBlock> {
        lock(&self.blocks).get(&(level, idx)).cloned()
    }

    /// Tree block `idx` of `level`, verified up to the root.
    async fn block(&self, backend: &dyn Backend, level: usize, idx: u64) -> Result<TreeBlock> {
        let arity = self.layout.arity();
        // Walk up to the first cached ancestor (or past the top: the root).
        let mut chain = Vec::new();
        let (mut l, mut j) = (level, idx);
        let mut parent = loop {
            if let Some(b) = self.cached(l, j) {
                break Some(b);
            }
            chain.push((l, j));
            if l == self.layout.top() {
                break None;
            }
            l += 1;
            j /= arity;
        };
        // Then down, verifying each block against the entry its parent holds for it.
        while let Some((l, j)) = chain.pop() {
            let expected = parent.as_ref().map(|p| p[(j % arity) as usize]);
            let entries = if l < self.layout.top() && expected == Some(self.layout.zeros[l + 1]) {
                self.layout.zero_block(l) // an all-zero subtree: nothing to fetch
            } else {
                let bs = self.layout.block_size.bytes();
                let data = backend
                    .read_snapshot_at(&self.tree, self.layout.offset(l, j), bs as usize)
                    .await
                    .map_err(|e| match e.kind() {
                        ErrorKind::NotFound => Error::Integrity(format!(
                            "the Merkle tree {} is gone: blocks cannot be verified ({e})",
                            self.tree
                        )),
                        _ => e,
                    })?;
                self.fetches.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if data.len() as u64 != bs {
                    return Err(Error::Integrity(format!(
                        "Merkle tree {}: {} bytes for a {bs}-byte tree block",
                        self.tree,
                        data.len()
                    )));
                }
                let entries = self.layout.decode(l, &data);
                let ok = match expected {
                    Some(want) => node_hash(l + 1, &entries) == want,
                    None => self.layout.root_of(&entries) == self.root,
                };
                if !ok {
                    return Err(Error::Integrity(format!(
                        "Merkle tree {}: tree block {j} of level {l} does not match the root",
                        self.tree
                    )));
                }
                entries
            };
            let b = Arc::new(entries);
            lock(&self.blocks).insert((l, j), Arc::clone(&b));
            parent = Some(b);
        }
        Ok(parent.expect("the chain ends at the requested block"))
    }
}

/// What a [`MerkleVerifier`] did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VerifyStats {
    /// Data blocks verified.
    pub blocks: u64,
    /// Data blocks that failed verification.
    pub failures: u64,
    /// Time spent hashing and comparing data blocks, in nanoseconds (all threads).
    pub hash_nanos: u64,
    /// Tree blocks fetched from the tree snapshot.
    pub tree_fetches: u64,
    /// Bytes of tree blocks fetched.
    pub tree_bytes: u64,
}

/// Verifies data blocks of one snapshot against its [`MerkleRoot`], fetching the tree
/// lazily (see the [module docs](self)). Cheap to share: one per image on a worker.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use slacker_core::merkle::{self, MerkleVerifier};
/// use slacker_core::{Backend, BackendExt, VolumeId};
/// let backend: Arc<dyn Backend> = Arc::new(slacker_backend_mem::MemBackend::new());
/// let image = VolumeId::new("image").unwrap();
/// backend.create_volume_with(&image, &[7u8; 8192]).await.unwrap();
/// let snap = backend.snapshot(&image).await.unwrap();
/// let stat = backend.stat_snapshot(&snap).await.unwrap();
/// let scratch = VolumeId::new("tree").unwrap();
/// let root = merkle::build(&*backend, &stat, None, &scratch).await.unwrap();
///
/// let v = MerkleVerifier::open(backend, &root, 8192, stat.block_size).await.unwrap();
/// v.verify(1, &[7u8; 4096]).await.unwrap();
/// assert!(v.verify(1, &[8u8; 4096]).await.is_err()); // ErrorKind::Integrity
/// # });
/// ```
pub struct MerkleVerifier {
    backend: Arc<dyn Backend>,
    cache: TreeCache,
    blocks: AtomicU64,
    failures: AtomicU64,
    hash_nanos: AtomicU64,
}

impl std::fmt::Debug for MerkleVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleVerifier")
            .field("tree", &self.cache.tree)
            .field("root", &self.cache.root)
            .finish_non_exhaustive()
    }
}

impl MerkleVerifier {
    /// A verifier of the `size`-byte snapshot whose tree `root` names, reading tree blocks
    /// from `backend`. Checks that the tree snapshot exists and has the expected size;
    /// fetches nothing else.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed root or size; `Integrity` when the tree snapshot is
    /// missing or of the wrong size; backend errors.
    pub async fn open(
        backend: Arc<dyn Backend>,
        root: &MerkleRoot,
        size: u64,
        block_size: BlockSize,
    ) -> Result<Self> {
        let layout = TreeLayout::new(size, block_size)?;
        let st = match backend.stat_snapshot(&root.tree).await {
            Ok(st) => st,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::Integrity(format!(
                    "the Merkle tree {} is missing: blocks cannot be verified",
                    root.tree
                )));
            }
            Err(e) => return Err(e),
        };
        if st.size != layout.tree_bytes() || st.block_size != block_size {
            return Err(Error::Integrity(format!(
                "the Merkle tree {} is {} bytes in blocks of {}, not {} in blocks of {block_size}",
                root.tree,
                st.size,
                st.block_size,
                layout.tree_bytes()
            )));
        }
        Ok(Self {
            backend,
            cache: TreeCache::new(layout, root)?,
            blocks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            hash_nanos: AtomicU64::new(0),
        })
    }

    /// The tree's shape.
    pub fn layout(&self) -> &TreeLayout {
        &self.cache.layout
    }

    /// Fetches (and verifies) the tree blocks that verifying `range` needs, so that a
    /// later [`verify`](Self::verify) costs no round trip. Worth calling concurrently with
    /// the data fetch.
    ///
    /// # Errors
    /// As [`verify`](Self::verify), for the tree blocks.
    pub async fn prepare(&self, range: BlockRange) -> Result<()> {
        let arity = self.cache.layout.arity();
        if range.is_empty() || u64::from(range.end) > self.cache.layout.blocks {
            return Ok(()); // verify reports the range error
        }
        let (a, b) = (
            u64::from(range.start) / arity,
            u64::from(range.end - 1) / arity,
        );
        for j in a..=b {
            self.cache.block(&*self.backend, 0, j).await?;
        }
        Ok(())
    }

    /// Fetches every tree block above the leaves (about `size / 16384` bytes at 4 KiB
    /// blocks: 64 KiB for 1 GiB), so that each later verification needs at most one
    /// tree fetch.
    ///
    /// # Errors
    /// As [`verify`](Self::verify), for the tree blocks.
    pub async fn warm(&self) -> Result<()> {
        let l = &self.cache.layout;
        for level in (1..l.depth()).rev() {
            for j in 0..l.counts[level].div_ceil(l.arity()) {
                self.cache.block(&*self.backend, level, j).await?;
            }
        }
        Ok(())
    }

    /// Verifies `data`, whole blocks starting at block `first`.
    ///
    /// # Errors
    /// `Integrity` naming the first block (or tree block) that does not match the root;
    /// `InvalidInput` when `data` is not whole blocks inside the volume; backend errors of
    /// tree fetches.
    pub async fn verify(&self, first: u32, data: &[u8]) -> Result<()> {
        let l = &self.cache.layout;
        let bs = l.block_size.bytes() as usize;
        let n = (data.len() / bs) as u64;
        if data.len() % bs != 0 || u64::from(first) + n > l.blocks {
            return Err(Error::invalid(format!(
                "verify: {} bytes at block {first} are not whole blocks inside {} blocks",
                data.len(),
                l.blocks
            )));
        }
        let arity = l.arity();
        let mut at = 0u64;
        while at < n {
            let b = u64::from(first) + at;
            let leaves = self.cache.block(&*self.backend, 0, b / arity).await?;
            let end = (n - at).min(arity - b % arity);
            let t = Instant::now();
            let mut bad = None;
            for i in 0..end {
                let blk = b + i;
                let chunk = &data[((at + i) as usize) * bs..((at + i + 1) as usize) * bs];
                if leaf_hash(chunk) != leaves[(blk % arity) as usize] {
                    bad = Some(blk);
                    break;
                }
            }
            self.hash_nanos
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Some(blk) = bad {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Integrity(format!(
                    "block {blk} of the snapshot does not match its Merkle root {} (tree {})",
                    self.cache.root.to_hex(),
                    self.cache.tree
                )));
            }
            self.blocks.fetch_add(end, Ordering::Relaxed);
            at += end;
        }
        Ok(())
    }

    /// What this verifier did so far.
    pub fn stats(&self) -> VerifyStats {
        VerifyStats {
            blocks: self.blocks.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            hash_nanos: self.hash_nanos.load(Ordering::Relaxed),
            tree_fetches: self.cache.fetches.load(Ordering::Relaxed),
            tree_bytes: self.cache.fetched_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Builds the tree of `snapshot` into a new tree snapshot, using `scratch` as a temporary
/// volume (removed first if a crashed build left it, and removed again at the end).
///
/// With `base`, the tree of `snapshot.parent`, only the blocks of `snapshot.diverged` are
/// hashed (every tree block of the base that is reused is verified against the base's
/// root first); without it, a snapshot without a parent hashes its diverged blocks (the
/// rest are zeros) and one with a parent hashes every block.
///
/// # Errors
/// `InvalidInput` for a base of another shape; `Integrity` when a base tree block does not
/// match its root; backend errors. The scratch volume may be left behind on error.
pub async fn build(
    backend: &dyn Backend,
    snapshot: &SnapshotStat,
    base: Option<&MerkleRoot>,
    scratch: &VolumeId,
) -> Result<MerkleRoot> {
    let layout = TreeLayout::new(snapshot.size, snapshot.block_size)?;
    let bs = layout.block_size.bytes();
    let base = match base {
        Some(b) if snapshot.parent.is_some() => {
            let st = backend.stat_snapshot(&b.tree).await?;
            if st.size != layout.tree_bytes() || st.block_size != layout.block_size {
                return Err(Error::invalid(format!(
                    "Merkle base tree {} has another shape than snapshot {}",
                    b.tree, snapshot.id
                )));
            }
            Some(TreeCache::new(layout.clone(), b)?)
        }
        _ => None,
    };
    match backend.remove_volume(scratch).await {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let dirty = match (&base, &snapshot.parent) {
        (Some(b), _) => {
            backend.clone_snapshot(&b.tree, scratch).await?;
            snapshot.diverged.clone()
        }
        (None, parent) => {
            backend
                .create_volume(
                    scratch,
                    &VolumeOptions::new(layout.tree_bytes()).with_block_size(layout.block_size),
                )
                .await?;
            match parent {
                None => snapshot.diverged.clone(),
                Some(_) => {
                    let mut all = BlockBitmap::new();
                    all.insert_range(BlockRange::new(0, layout.blocks as u32));
                    all
                }
            }
        }
    };

    // Leaves: hash the dirty data blocks, a run (at most 1 MiB) at a time.
    let mut updates: BTreeMap<u64, blake3::Hash> = BTreeMap::new();
    let max = (BUILD_READ_BYTES / bs).max(1) as u32;
    for run in dirty.runs() {
        let end = run.end.min(layout.blocks as u32);
        let mut s = run.start;
        while s < end {
            let e = s.saturating_add(max).min(end);
            let data = backend
                .read_snapshot_at(
                    &snapshot.id,
                    u64::from(s) * bs,
                    (u64::from(e - s) * bs) as usize,
                )
                .await?;
            if data.len() as u64 != u64::from(e - s) * bs {
                return Err(Error::Integrity(format!(
                    "snapshot {}: short read while hashing",
                    snapshot.id
                )));
            }
            for (i, chunk) in data.chunks_exact(bs as usize).enumerate() {
                updates.insert(u64::from(s) + i as u64, leaf_hash(chunk));
            }
            s = e;
        }
    }

    // Then level by level: rewrite the touched tree blocks, collect their new hashes.
    let arity = layout.arity();
    let mut top_block: Option<Vec<blake3::Hash>> = None;
    for level in 0..layout.depth() {
        if updates.is_empty() {
            break;
        }
        let mut next: BTreeMap<u64, blake3::Hash> = BTreeMap::new();
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_start: Option<u64> = None;
        let mut last_j: Option<u64> = None;
        let touched: Vec<u64> = {
            let mut t: Vec<u64> = updates.keys().map(|i| i / arity).collect();
            t.dedup();
            t
        };
        for j in touched {
            let mut entries = match &base {
                Some(b) => b.block(backend, level, j).await?.as_ref().clone(),
                None => layout.zero_block(level),
            };
            for (i, h) in updates.range(j * arity..(j + 1) * arity) {
                entries[(i % arity) as usize] = *h;
            }
            if level == layout.top() {
                top_block = Some(entries.clone());
            } else {
                next.insert(j, node_hash(level + 1, &entries));
            }
            if last_j.is_some_and(|p| p + 1 != j) || batch.len() as u64 >= BUILD_READ_BYTES {
                flush_batch(
                    backend,
                    scratch,
                    &layout,
                    level,
                    &mut batch_start,
                    &mut batch,
                )
                .await?;
            }
            batch_start.get_or_insert(j);
            layout.encode(level, &entries, &mut batch);
            last_j = Some(j);
        }
        flush_batch(
            backend,
            scratch,
            &layout,
            level,
            &mut batch_start,
            &mut batch,
        )
        .await?;
        updates = next;
    }
    let top = match (top_block, &base) {
        (Some(t), _) => t,
        (None, Some(b)) => b.block(backend, layout.top(), 0).await?.as_ref().clone(),
        (None, None) => layout.zero_block(layout.top()),
    };
    let root = layout.root_of(&top);
    backend.flush(scratch).await?;
    let tree = backend.snapshot(scratch).await?;
    backend.remove_volume(scratch).await?;
    Ok(MerkleRoot::new(root, tree))
}

async fn flush_batch(
    backend: &dyn Backend,
    scratch: &VolumeId,
    layout: &TreeLayout,
    level: usize,
    start: &mut Option<u64>,
    batch: &mut Vec<u8>,
) -> Result<()> {
    if let Some(j) = start.take() {
        if !batch.is_empty() {
            backend
                .write_at(scratch, layout.offset(level, j), batch)
                .await?;
        }
    }
    batch.clear();
    Ok(())
}

/// The root of `data` (a whole volume in memory): what [`build`] computes, for tests and
/// tools.
///
/// # Errors
/// `InvalidInput` unless `data` is a positive number of whole blocks.
pub fn root_of_bytes(data: &[u8], block_size: BlockSize) -> Result<blake3::Hash> {
    let layout = TreeLayout::new(data.len() as u64, block_size)?;
    let arity = layout.arity() as usize;
    let mut level: Vec<blake3::Hash> = data
        .chunks_exact(block_size.bytes() as usize)
        .map(leaf_hash)
        .collect();
    for l in 0..layout.top() {
        level = level
            .chunks(arity)
            .map(|c| {
                let mut e = c.to_vec();
                e.resize(arity, layout.zeros[l]);
                node_hash(l + 1, &e)
            })
            .collect();
    }
    let mut top = level;
    top.resize(arity, layout.zeros[layout.top()]);
    Ok(layout.root_of(&top))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
