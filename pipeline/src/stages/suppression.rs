//! The suppression index: a split-block bloom filter in front of an exact set of 128-bit key fingerprints.
//!
//! Keys are normalised (trimmed, lowercased emails) and hashed once with xxh3-128. The bloom
//! filter (a few bits per key, cache-friendly) answers "certainly not suppressed" for most
//! recipients; only the rest probe the exact open-addressing table, whose 128-bit fingerprints
//! make a false suppression practically impossible (about n·m/2^128).

use std::sync::Arc;

use arrow_array::Array;
use xxhash_rust::xxh3::xxh3_128;

use super::Stage;
use crate::error::Result;
use crate::model::{Decision, Reason, RecipientBatch};

/// Suppression-list precedence when a key is on several lists: the first wins.
const PRECEDENCE: [Reason; 4] = [
    Reason::Blocklisted,
    Reason::Complaint,
    Reason::Unsubscribed,
    Reason::HardBounce,
];

fn rank(r: Reason) -> usize {
    PRECEDENCE
        .iter()
        .position(|p| *p == r)
        .unwrap_or(usize::MAX)
}

/// The fingerprint of a normalised key.
#[inline]
pub fn fingerprint(key: &str) -> u128 {
    xxh3_128(key.as_bytes())
}

#[inline]
fn fast_range(h: u64, n: usize) -> usize {
    ((h as u128 * n as u128) >> 64) as usize
}

/// Asks the CPU to bring the cache line holding `p` in, without waiting for it: a load would
/// stall the core on every miss (these tables are larger than the caches), a prefetch
/// retires at once and lets the misses of a whole batch overlap.
#[inline(always)]
fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults and changes no memory.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((p as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Split-block bloom filter (as in Parquet): 256-bit blocks, one bit set in each of 8 words.
#[derive(Debug, Clone)]
struct BlockBloom {
    blocks: Vec<[u32; 8]>,
}

const SALT: [u32; 8] = [
    0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31,
];

impl BlockBloom {
    fn with_keys(n: usize, bits_per_key: usize) -> Self {
        let blocks = (n * bits_per_key).div_ceil(256).max(1);
        BlockBloom {
            blocks: vec![[0; 8]; blocks],
        }
    }

    #[inline]
    fn masks(h: u64) -> [u32; 8] {
        let x = h as u32;
        let mut m = [0u32; 8];
        for i in 0..8 {
            m[i] = 1 << (x.wrapping_mul(SALT[i]) >> 27);
        }
        m
    }

    #[inline]
    fn insert(&mut self, h: u128) {
        let b = fast_range((h >> 64) as u64, self.blocks.len());
        let m = Self::masks(h as u64);
        let block = &mut self.blocks[b];
        for i in 0..8 {
            block[i] |= m[i];
        }
    }

    /// Prefetches the block of `h` ahead of the real probe.
    #[inline]
    fn prefetch(&self, h: u128) {
        prefetch(&self.blocks[fast_range((h >> 64) as u64, self.blocks.len())]);
    }

    #[inline]
    fn may_contain(&self, h: u128) -> bool {
        let b = fast_range((h >> 64) as u64, self.blocks.len());
        let m = Self::masks(h as u64);
        let block = &self.blocks[b];
        (0..8).all(|i| block[i] & m[i] != 0)
    }
}

/// Open-addressing table of fingerprints with linear probing; `[0, 0]` marks an empty slot.
#[derive(Debug, Clone)]
struct FingerprintTable {
    keys: Vec<[u64; 2]>,
    reasons: Vec<u8>,
    lists: Vec<u16>,
    len: usize,
}

/// How many keys ahead the index build prefetches: enough to cover a memory access at the
/// rate inserts go, few enough that the lines are still cached when written.
const BUILD_AHEAD: usize = 16;

impl FingerprintTable {
    fn with_capacity(n: usize) -> Self {
        // Load factor at most 2/3, never fewer than 16 slots.
        let slots = (n * 3 / 2).max(16);
        FingerprintTable {
            keys: vec![[0, 0]; slots],
            reasons: vec![0; slots],
            lists: vec![0; slots],
            len: 0,
        }
    }

    #[inline]
    fn split(h: u128) -> [u64; 2] {
        let k = [(h >> 64) as u64, h as u64];
        if k == [0, 0] {
            [0, 1]
        } else {
            k
        }
    }

    #[inline]
    fn slot(&self, k: [u64; 2]) -> usize {
        // The bloom filter uses the high word for its block; use the low word here.
        fast_range(k[1].rotate_left(17) ^ k[0], self.keys.len())
    }

    fn insert(&mut self, h: u128, reason: Reason, list: u16) {
        let k = Self::split(h);
        let mut i = self.slot(k);
        loop {
            if self.keys[i] == [0, 0] {
                self.keys[i] = k;
                self.reasons[i] = reason as u8;
                self.lists[i] = list;
                self.len += 1;
                return;
            }
            if self.keys[i] == k {
                let old = Reason::ALL[self.reasons[i] as usize];
                if rank(reason) < rank(old) {
                    self.reasons[i] = reason as u8;
                    self.lists[i] = list;
                }
                return;
            }
            i += 1;
            if i == self.keys.len() {
                i = 0;
            }
        }
    }

    /// Prefetches the first slot `get(h)` reads, with its reason and list.
    #[inline]
    fn prefetch(&self, h: u128) {
        let i = self.slot(Self::split(h));
        prefetch(&self.keys[i]);
        prefetch(&self.reasons[i]);
        prefetch(&self.lists[i]);
    }

    #[inline]
    fn get(&self, h: u128) -> Option<(Reason, u16)> {
        let k = Self::split(h);
        let mut i = self.slot(k);
        loop {
            let s = self.keys[i];
            if s == k {
                return Some((Reason::ALL[self.reasons[i] as usize], self.lists[i]));
            }
            if s == [0, 0] {
                return None;
            }
            i += 1;
            if i == self.keys.len() {
                i = 0;
            }
        }
    }
}

/// Where a suppression list came from, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuppressionListInfo {
    /// File path (or other origin).
    pub name: String,
    /// The reason a match carries.
    pub reason: Reason,
    /// Keys read from it (before de-duplication across lists).
    pub keys: u64,
}

/// Builds a [`SuppressionIndex`] from keys of several lists.
#[derive(Debug, Default)]
pub struct SuppressionIndexBuilder {
    hashes: Vec<(u128, u8, u16)>,
    lists: Vec<SuppressionListInfo>,
}

impl SuppressionIndexBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a list and returns its id for [`SuppressionIndexBuilder::add`].
    pub fn add_list(&mut self, name: impl Into<String>, reason: Reason) -> u16 {
        self.lists.push(SuppressionListInfo {
            name: name.into(),
            reason,
            keys: 0,
        });
        (self.lists.len() - 1) as u16
    }

    /// Adds one normalised key to a list.
    #[inline]
    pub fn add(&mut self, list: u16, key: &str) {
        self.add_fingerprint(list, fingerprint(key));
    }

    /// Adds an already computed fingerprint to a list.
    #[inline]
    pub fn add_fingerprint(&mut self, list: u16, fp: u128) {
        let info = &mut self.lists[list as usize];
        info.keys += 1;
        self.hashes.push((fp, info.reason as u8, list));
    }

    /// Builds the index. The bloom filter and the exact table are independent, so they are
    /// filled on two threads (both are bound by cache misses, not by arithmetic).
    pub fn build(self) -> SuppressionIndex {
        let n = self.hashes.len();
        let hashes = &self.hashes;
        // Both structures are far larger than the caches and written at random places, so
        // each insert would stall on a miss; the place of the key BUILD_AHEAD positions on is
        // prefetched first, and its line has arrived by the time it is written.
        let ahead = |i: usize| hashes.get(i + BUILD_AHEAD).map(|(h, _, _)| *h);
        let (bloom, table) = std::thread::scope(|s| {
            let bloom = s.spawn(move || {
                let mut bloom = BlockBloom::with_keys(n, 12);
                for (i, (h, _, _)) in hashes.iter().enumerate() {
                    if let Some(a) = ahead(i) {
                        bloom.prefetch(a);
                    }
                    bloom.insert(*h);
                }
                bloom
            });
            let mut table = FingerprintTable::with_capacity(n);
            for (i, (h, r, l)) in hashes.iter().enumerate() {
                if let Some(a) = ahead(i) {
                    table.prefetch(a);
                }
                table.insert(*h, Reason::ALL[*r as usize], *l);
            }
            (bloom.join().expect("bloom builder panicked"), table)
        });
        SuppressionIndex {
            bloom,
            table,
            lists: self.lists,
        }
    }
}

/// Answers "is this key suppressed, and why" for normalised keys.
#[derive(Debug, Clone)]
pub struct SuppressionIndex {
    bloom: BlockBloom,
    table: FingerprintTable,
    lists: Vec<SuppressionListInfo>,
}

impl SuppressionIndex {
    /// An index that suppresses nothing.
    pub fn empty() -> Self {
        SuppressionIndexBuilder::new().build()
    }

    /// Distinct keys in the index.
    pub fn len(&self) -> usize {
        self.table.len
    }

    /// True when nothing is suppressed.
    pub fn is_empty(&self) -> bool {
        self.table.len == 0
    }

    /// The lists the index was built from, by id.
    pub fn lists(&self) -> &[SuppressionListInfo] {
        &self.lists
    }

    /// Looks a fingerprint up: the reason and list id of the highest-precedence list holding it.
    #[inline]
    pub fn lookup_fingerprint(&self, fp: u128) -> Option<(Reason, u16)> {
        if !self.bloom.may_contain(fp) {
            return None;
        }
        self.table.get(fp)
    }

    /// Looks a normalised key up.
    #[inline]
    pub fn lookup(&self, key: &str) -> Option<(Reason, u16)> {
        self.lookup_fingerprint(fingerprint(key))
    }

    /// Looks a key up in the exact table only (no bloom filter): for tests and benchmarks.
    pub fn lookup_exact(&self, key: &str) -> Option<(Reason, u16)> {
        self.table.get(fingerprint(key))
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bloom.blocks.len() * 32 + self.table.keys.len() * 19
    }
}

/// The suppression stage: decides pending rows whose key is on a list.
#[derive(Debug, Clone)]
pub struct Suppressor {
    index: Arc<SuppressionIndex>,
}

impl Suppressor {
    /// A stage over a shared index.
    pub fn new(index: Arc<SuppressionIndex>) -> Self {
        Suppressor { index }
    }
}

impl Stage for Suppressor {
    fn name(&self) -> &'static str {
        "suppress"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        let Some(keys) = batch.keys.clone() else {
            return Ok(());
        };
        batch.lists.resize(batch.len(), u16::MAX);
        // Three passes, so that memory is waited on once per batch rather than once per
        // recipient: hash every key and prefetch its bloom block; test the bloom filter and
        // prefetch the table slots of the keys that may be on a list; probe those.
        let index = &*self.index;
        let mut fps = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let fp = if batch.decisions[i] != Decision::Pending || keys.is_null(i) {
                0
            } else {
                let fp = fingerprint(keys.value(i));
                index.bloom.prefetch(fp);
                fp
            };
            fps.push(fp);
        }
        let mut maybe = Vec::new();
        for (i, &fp) in fps.iter().enumerate() {
            if fp != 0 && index.bloom.may_contain(fp) {
                index.table.prefetch(fp);
                maybe.push(i);
            }
        }
        for i in maybe {
            if let Some((reason, list)) = index.table.get(fps[i]) {
                batch.decide(i, Decision::Suppressed, reason);
                batch.lists[i] = list;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn precedence_keeps_blocklist_over_bounce() {
        let mut b = SuppressionIndexBuilder::new();
        let bounce = b.add_list("b.csv", Reason::HardBounce);
        let block = b.add_list("block.csv", Reason::Blocklisted);
        b.add(bounce, "x@y.co");
        b.add(block, "x@y.co");
        b.add(bounce, "z@y.co");
        let idx = b.build();
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.lookup("x@y.co"), Some((Reason::Blocklisted, block)));
        assert_eq!(idx.lookup("z@y.co"), Some((Reason::HardBounce, bounce)));
        assert_eq!(idx.lookup("q@y.co"), None);
        assert_eq!(idx.lists()[bounce as usize].keys, 2);
    }

    #[test]
    fn bloom_false_positive_rate_is_low() {
        let mut b = SuppressionIndexBuilder::new();
        let l = b.add_list("l", Reason::HardBounce);
        for i in 0..100_000 {
            b.add(l, &format!("in{i}@x.co"));
        }
        let idx = b.build();
        let fp = (0..100_000)
            .filter(|i| idx.bloom.may_contain(fingerprint(&format!("out{i}@x.co"))))
            .count();
        // 12 bits per key gives well under 1 % false positives.
        assert!(fp < 1_000, "false positives: {fp}");
    }

    proptest! {
        /// Bloom filter + exact set answers exactly like the exact set alone.
        #[test]
        fn bloom_plus_set_equals_set(
            members in proptest::collection::vec("[a-z0-9.]{1,12}@[a-z]{1,6}\\.[a-z]{2,3}", 0..300),
            probes in proptest::collection::vec("[a-z0-9.]{1,12}@[a-z]{1,6}\\.[a-z]{2,3}", 0..300),
        ) {
            let mut b = SuppressionIndexBuilder::new();
            let l = b.add_list("l", Reason::Unsubscribed);
            for m in &members {
                b.add(l, m);
            }
            let idx = b.build();
            let set: std::collections::HashSet<&String> = members.iter().collect();
            for p in probes.iter().chain(members.iter()) {
                prop_assert_eq!(idx.lookup(p).is_some(), set.contains(p));
                prop_assert_eq!(idx.lookup(p), idx.lookup_exact(p));
            }
        }
    }
}
