//! [`BlockCache`]: one per worker, shared by every clone of a snapshot.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::block::{BlockIndex, BlockSize};
use crate::ids::SnapshotId;

/// What a [`BlockCache`] holds and did, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// The bound, in bytes.
    pub capacity_bytes: u64,
    /// Bytes of block data held now.
    pub resident_bytes: u64,
    /// Blocks held now.
    pub resident_blocks: u64,
    /// Blocks inserted since the cache was made.
    pub insertions: u64,
    /// Blocks evicted to stay within the bound.
    pub evictions: u64,
    /// Blocks being fetched right now (in flight).
    pub in_flight: u64,
}

/// A bounded, shared cache of snapshot blocks with CLOCK eviction (second chance: an
/// approximation of least-recently-used whose hits cost O(1), only setting a bit).
///
/// Keyed by `(SnapshotId, block index, block size)`. Snapshots are immutable, so an entry
/// is valid forever; eviction only costs a refetch. It also tracks blocks being fetched
/// *right now*, so concurrent readers of one cold block (from one clone or from many
/// clones of the same snapshot) wait for a single backend fetch instead of issuing their
/// own (in-flight deduplication).
///
/// Only blocks of snapshots live here. A [`LazyVolume`](super::LazyVolume) serves a block
/// from the cache only when it lies outside the volume's diverged bitmap (where, by the
/// bitmap invariant, the volume reads as its origin snapshot); a diverged block is always
/// read from the volume itself.
///
/// ```
/// use slacker_core::worker::BlockCache;
/// let cache = BlockCache::new(64 << 20);
/// assert_eq!(cache.stats().capacity_bytes, 64 << 20);
/// assert_eq!(cache.stats().resident_bytes, 0);
/// ```
pub struct BlockCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockCache")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The index of one `(snapshot, block size)` image inside the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ImageSlot(usize);

#[derive(Default)]
struct Inner {
    images: HashMap<(SnapshotId, BlockSize), usize>,
    slots: Vec<Image>,
    /// The CLOCK ring of cached blocks; `None` frames are free (listed in `free`).
    ring: Vec<Option<Frame>>,
    free: Vec<usize>,
    hand: usize,
    next_claim: u64,
    bytes: u64,
    insertions: u64,
    evictions: u64,
    in_flight: u64,
}

#[derive(Default)]
struct Image {
    /// Block -> frame of the ring.
    blocks: HashMap<u32, usize>,
    in_flight: HashMap<u32, InFlight>,
}

struct Frame {
    image: usize,
    block: u32,
    data: Bytes,
    referenced: bool,
}

struct InFlight {
    claim: u64,
    rx: watch::Receiver<Option<Bytes>>,
}

/// The outcome of looking one block up.
pub(crate) enum Lookup<'a> {
    /// The block was cached.
    Hit(u32, Bytes),
    /// Someone else is fetching it: wait on the receiver (`None` forever / closed means
    /// that fetch failed or was abandoned: look again).
    Wait(u32, watch::Receiver<Option<Bytes>>),
    /// The caller now owns the fetch of this block and must [`BlockCache::fill`] it (or
    /// drop the claim, which wakes the waiters to retry).
    Claimed(Claim<'a>),
}

/// The right, and duty, to fetch one block. Dropping it unfilled releases the block so
/// waiters retry.
pub(crate) struct Claim<'a> {
    cache: &'a BlockCache,
    image: usize,
    block: u32,
    id: u64,
    tx: watch::Sender<Option<Bytes>>,
    done: bool,
}

impl Claim<'_> {
    /// The claimed block.
    pub(crate) fn block(&self) -> u32 {
        self.block
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut inner = self.cache.lock();
            inner.release(self.image, self.block, self.id);
        }
        // Dropping `tx` closes the channel: waiters see the fetch was abandoned.
    }
}

impl Inner {
    fn release(&mut self, image: usize, block: u32, claim: u64) {
        let img = &mut self.slots[image];
        if img.in_flight.get(&block).is_some_and(|f| f.claim == claim) {
            img.in_flight.remove(&block);
            self.in_flight -= 1;
        }
    }

    fn touch(&mut self, image: usize, block: u32) -> Option<Bytes> {
        let &frame = self.slots[image].blocks.get(&block)?;
        let f = self.ring[frame]
            .as_mut()
            .expect("indexed frames are in use");
        f.referenced = true;
        Some(f.data.clone())
    }

    fn cached(&self, image: usize, block: u32) -> bool {
        self.slots[image].blocks.contains_key(&block)
    }

    /// Evicts one block: the hand sweeps the ring, clearing reference bits, and takes
    /// the first frame without one. Returns false when nothing is cached.
    fn evict_one(&mut self) -> bool {
        if self.ring.len() == self.free.len() {
            return false;
        }
        loop {
            if self.hand >= self.ring.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            match &mut self.ring[i] {
                Some(f) if f.referenced => f.referenced = false,
                Some(_) => {
                    let f = self.ring[i].take().expect("matched Some");
                    self.slots[f.image].blocks.remove(&f.block);
                    self.bytes -= f.data.len() as u64;
                    self.free.push(i);
                    self.evictions += 1;
                    return true;
                }
                None => {}
            }
        }
    }

    fn insert(&mut self, capacity: u64, image: usize, block: u32, data: Bytes) {
        let len = data.len() as u64;
        if len > capacity {
            return;
        }
        if let Some(&i) = self.slots[image].blocks.get(&block) {
            // Already cached (same snapshot block: same bytes); keep it.
            if let Some(f) = self.ring[i].as_mut() {
                f.referenced = true;
            }
            return;
        }
        while self.bytes + len > capacity {
            if !self.evict_one() {
                break;
            }
        }
        let frame = Frame {
            image,
            block,
            data,
            referenced: true,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.ring[i] = Some(frame);
                i
            }
            None => {
                self.ring.push(Some(frame));
                self.ring.len() - 1
            }
        };
        self.slots[image].blocks.insert(block, i);
        self.bytes += len;
        self.insertions += 1;
    }
}

impl BlockCache {
    /// A cache holding at most `capacity_bytes` of block data. A capacity smaller than one
    /// block caches nothing (reads still work, and still deduplicate in-flight fetches).
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The bound, in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Counters and occupancy now.
    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            capacity_bytes: self.capacity,
            resident_bytes: inner.bytes,
            resident_blocks: (inner.ring.len() - inner.free.len()) as u64,
            insertions: inner.insertions,
            evictions: inner.evictions,
            in_flight: inner.in_flight,
        }
    }

    /// Whether block `index` of `snapshot` (at `block_size`) is cached now.
    pub fn contains(
        &self,
        snapshot: &SnapshotId,
        block_size: BlockSize,
        index: BlockIndex,
    ) -> bool {
        let inner = self.lock();
        inner
            .images
            .get(&(snapshot.clone(), block_size))
            .is_some_and(|&i| inner.cached(i, index.0))
    }

    /// Drops every cached block (fetches in flight finish normally).
    pub fn clear(&self) {
        let mut inner = self.lock();
        for img in &mut inner.slots {
            img.blocks.clear();
        }
        inner.ring.clear();
        inner.free.clear();
        inner.hand = 0;
        inner.bytes = 0;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves Inner consistent before anything can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `(snapshot, block_size)`, made on first use.
    pub(crate) fn image(&self, snapshot: &SnapshotId, block_size: BlockSize) -> ImageSlot {
        let mut inner = self.lock();
        if let Some(&i) = inner.images.get(&(snapshot.clone(), block_size)) {
            return ImageSlot(i);
        }
        let i = inner.slots.len();
        inner.slots.push(Image::default());
        inner.images.insert((snapshot.clone(), block_size), i);
        ImageSlot(i)
    }

    /// Looks up each of `required` (hit / wait / claim) and, if at least one of them was
    /// claimed, also claims the blocks of `optional` (read-ahead) in order, stopping at the
    /// first one that is cached or in flight. Optional blocks are returned only as claims.
    pub(crate) fn lookup_or_claim(
        &self,
        image: ImageSlot,
        required: &[u32],
        optional: &[u32],
    ) -> Vec<Lookup<'_>> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(required.len());
        let mut claimed_any = false;
        for &b in required {
            if let Some(data) = inner.touch(image.0, b) {
                out.push(Lookup::Hit(b, data));
            } else if let Some(f) = inner.slots[image.0].in_flight.get(&b) {
                out.push(Lookup::Wait(b, f.rx.clone()));
            } else {
                out.push(Lookup::Claimed(self.claim_locked(&mut inner, image.0, b)));
                claimed_any = true;
            }
        }
        if claimed_any {
            for &b in optional {
                if inner.cached(image.0, b) || inner.slots[image.0].in_flight.contains_key(&b) {
                    break;
                }
                out.push(Lookup::Claimed(self.claim_locked(&mut inner, image.0, b)));
            }
        }
        out
    }

    /// Claims every block of `blocks` that is neither cached nor in flight (prefetch).
    pub(crate) fn claim_missing(&self, image: ImageSlot, blocks: &[u32]) -> Vec<Claim<'_>> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for &b in blocks {
            if !inner.cached(image.0, b) && !inner.slots[image.0].in_flight.contains_key(&b) {
                out.push(self.claim_locked(&mut inner, image.0, b));
            }
        }
        out
    }

    fn claim_locked(&self, inner: &mut Inner, image: usize, block: u32) -> Claim<'_> {
        inner.next_claim += 1;
        let id = inner.next_claim;
        let (tx, rx) = watch::channel(None);
        inner.slots[image]
            .in_flight
            .insert(block, InFlight { claim: id, rx });
        inner.in_flight += 1;
        Claim {
            cache: self,
            image,
            block,
            id,
            tx,
            done: false,
        }
    }

    /// Completes claims with their data, which must be the image's own blocks (read from
    /// the snapshot): inserts each block, ends its in-flight entry and hands the data to
    /// every waiter. Bytes read from anything else must not come here: drop the claims.
    pub(crate) fn fill<'a>(&self, claims: impl IntoIterator<Item = (Claim<'a>, Bytes)>) {
        let mut inner = self.lock();
        for (mut claim, data) in claims {
            inner.release(claim.image, claim.block, claim.id);
            inner.insert(self.capacity, claim.image, claim.block, data.clone());
            claim.tx.send_replace(Some(data));
            claim.done = true;
        }
    }
}
