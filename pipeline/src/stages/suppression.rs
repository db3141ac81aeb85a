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
const PRECEDENCE: [Reason; 5] = [
    Reason::Blocklisted,
    Reason::Complaint,
    Reason::Unsubscribed,
    Reason::HardBounce,
    Reason::SoftBounceRepeated,
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
/// Asks the CPU to bring `p`'s cache line in (x86_64; a no-op elsewhere).
#[inline(always)]
pub(crate) fn prefetch<T>(p: &T) {
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
        BlockBloom {
            blocks: vec![[0; 8]; (n * bits_per_key).div_ceil(256).max(1)],
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

    /// Sets the bits of `h` in `block`, which must be its block.
    #[inline]
    fn set(block: &mut [u32; 8], h: u128) {
        let m = Self::masks(h as u64);
        for i in 0..8 {
            block[i] |= m[i];
        }
    }

    /// Prefetches the block of `h` ahead of the real probe.
    #[inline]
    fn prefetch(&self, h: u128) {
        prefetch(&self.blocks[block_in(h, self.blocks.len())]);
    }

    #[inline]
    fn may_contain(&self, h: u128) -> bool {
        let b = block_in(h, self.blocks.len());
        let m = Self::masks(h as u64);
        let block = &self.blocks[b];
        (0..8).all(|i| block[i] & m[i] != 0)
    }
}

/// The block of fingerprint `h` in a bloom filter of `blocks` blocks.
#[inline]
fn block_in(h: u128, blocks: usize) -> usize {
    fast_range((h >> 64) as u64, blocks)
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

/// How many keys ahead the suppression stage prefetches the bloom block or table slot it
/// will test: the lines arrive while the keys before are tested, and are still in the first
/// level cache when their turn comes.
const PROBE_AHEAD: usize = 24;

/// Indexes of at least this many keys are built in two halves on two threads.
const PARALLEL_BUILD_KEYS: usize = 1 << 16;

/// What inserting a fingerprint into (part of) the table did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// It took an empty slot.
    New,
    /// It was there already (its reason kept or replaced by precedence).
    Existing,
    /// The probe reached the end of the part without finding it or an empty slot.
    Overflow,
}

/// A run of the table's slots, written by one thread during the build.
struct TablePart<'a> {
    keys: &'a mut [[u64; 2]],
    reasons: &'a mut [u8],
    lists: &'a mut [u16],
}

impl TablePart<'_> {
    /// Inserts key `k` probing from slot `i` of this part. With `wrap` (the part is the whole
    /// table) the probe goes on from slot 0 at the end; without, reaching the end is an
    /// [`Placed::Overflow`], left for a later insert into the whole table.
    fn place(
        &mut self,
        mut i: usize,
        k: [u64; 2],
        reason: Reason,
        list: u16,
        wrap: bool,
    ) -> Placed {
        loop {
            if self.keys[i] == [0, 0] {
                self.keys[i] = k;
                self.reasons[i] = reason as u8;
                self.lists[i] = list;
                return Placed::New;
            }
            if self.keys[i] == k {
                let old = Reason::ALL[self.reasons[i] as usize];
                if rank(reason) < rank(old) {
                    self.reasons[i] = reason as u8;
                    self.lists[i] = list;
                }
                return Placed::Existing;
            }
            i += 1;
            if i == self.keys.len() {
                if !wrap {
                    return Placed::Overflow;
                }
                i = 0;
            }
        }
    }
}

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
        slot_in(k, self.keys.len())
    }

    /// The table as one part (probes wrap around).
    fn whole(&mut self) -> TablePart<'_> {
        TablePart {
            keys: &mut self.keys,
            reasons: &mut self.reasons,
            lists: &mut self.lists,
        }
    }

    /// Two parts, split at slot `mid`.
    fn halves(&mut self, mid: usize) -> [TablePart<'_>; 2] {
        let (k0, k1) = self.keys.split_at_mut(mid);
        let (r0, r1) = self.reasons.split_at_mut(mid);
        let (l0, l1) = self.lists.split_at_mut(mid);
        [
            TablePart {
                keys: k0,
                reasons: r0,
                lists: l0,
            },
            TablePart {
                keys: k1,
                reasons: r1,
                lists: l1,
            },
        ]
    }

    /// Prefetches the first slot `get(h)` reads, with its reason and list.
    #[inline]
    fn prefetch(&self, h: u128) {
        prefetch_slot(
            &self.keys,
            &self.reasons,
            &self.lists,
            self.slot(Self::split(h)),
        );
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

/// Prefetches slot `i` of a table (or of a part of it): its key, reason and list.
#[inline]
fn prefetch_slot(keys: &[[u64; 2]], reasons: &[u8], lists: &[u16], i: usize) {
    prefetch(&keys[i]);
    prefetch(&reasons[i]);
    prefetch(&lists[i]);
}

/// Calls `visit` on each item in order, having first prefetched (with `prefetch`) what the
/// item `ahead` positions on will read, and the first `ahead` items' before starting: each
/// item's memory is on its way long before it is visited, and recent enough to be cached
/// still when it is.
#[inline(always)]
fn visit_prefetched<T: Copy>(
    items: &[T],
    ahead: usize,
    prefetch: impl Fn(T),
    mut visit: impl FnMut(usize, T),
) {
    items.iter().take(ahead).for_each(|&t| prefetch(t));
    for (i, &t) in items.iter().enumerate() {
        if let Some(&a) = items.get(i + ahead) {
            prefetch(a);
        }
        visit(i, t);
    }
}

/// The home slot of key `k` in a table of `slots` slots.
#[inline]
fn slot_in(k: [u64; 2], slots: usize) -> usize {
    // The bloom filter uses the high word for its block; use the low word here.
    fast_range(k[1].rotate_left(17) ^ k[0], slots)
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
    /// Fingerprints of each list, in the order they were added.
    fingerprints: Vec<Vec<u128>>,
    lists: Vec<SuppressionListInfo>,
}

/// One fingerprint bound for the table, with the list it came from.
#[derive(Debug, Clone, Copy)]
struct Entry {
    fp: u128,
    reason: Reason,
    list: u16,
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
        self.fingerprints.push(Vec::new());
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
        self.lists[list as usize].keys += 1;
        self.fingerprints[list as usize].push(fp);
    }

    /// Adds a list's computed fingerprints at once (the vector is kept, not copied).
    pub fn add_fingerprints(&mut self, list: u16, fps: Vec<u128>) {
        self.lists[list as usize].keys += fps.len() as u64;
        let held = &mut self.fingerprints[list as usize];
        if held.is_empty() {
            *held = fps;
        } else {
            held.extend_from_slice(&fps);
        }
    }

    /// Builds the index: on two threads when it is large, on this one otherwise.
    pub fn build(self) -> SuppressionIndex {
        let n: usize = self.fingerprints.iter().map(Vec::len).sum();
        let parts = if n >= PARALLEL_BUILD_KEYS { 2 } else { 1 };
        self.build_in(parts)
    }

    /// Builds the index in `parts` (1 or 2) halves of the bloom filter and the table. Both
    /// are far larger than the caches and written at random places, so the build is bound by
    /// memory, not arithmetic: each half is filled by its own thread, which goes through
    /// every key and inserts those whose block and home slot fall in its half, prefetching
    /// the place of the key BUILD_AHEAD positions on. A probe that runs past the end of its
    /// half is finished afterwards on the whole table, in list order. The table then differs
    /// from a one-thread build only in where colliding keys sit: every key is found from its
    /// home slot, and a key on several lists keeps the reason of the list that takes
    /// precedence (the first such list on a tie).
    fn build_in(self, parts: usize) -> SuppressionIndex {
        let n: usize = self.fingerprints.iter().map(Vec::len).sum();
        let mut bloom = BlockBloom::with_keys(n, 12);
        let mut table = FingerprintTable::with_capacity(n);
        let reasons: Vec<Reason> = self.lists.iter().map(|l| l.reason).collect();
        let entries = || {
            self.fingerprints
                .iter()
                .enumerate()
                .flat_map(|(l, fps)| fps.iter().map(move |&fp| (l as u16, fp)))
                .map(|(list, fp)| Entry {
                    fp,
                    reason: reasons[list as usize],
                    list,
                })
        };
        let (blocks, slots) = (bloom.blocks.len(), table.keys.len());
        let (mut len, overflow) = if parts <= 1 {
            fill_part(
                &mut bloom.blocks,
                table.whole(),
                (0, blocks),
                (0, slots),
                (blocks, slots),
                true,
                entries,
            )
        } else {
            let (mid_block, mid_slot) = (blocks / 2, slots / 2);
            let (b0, b1) = bloom.blocks.split_at_mut(mid_block);
            let [t0, t1] = table.halves(mid_slot);
            let (low, high) = std::thread::scope(|s| {
                let high = s.spawn(|| {
                    fill_part(
                        b1,
                        t1,
                        (mid_block, blocks),
                        (mid_slot, slots),
                        (blocks, slots),
                        false,
                        entries,
                    )
                });
                let low = fill_part(
                    b0,
                    t0,
                    (0, mid_block),
                    (0, mid_slot),
                    (blocks, slots),
                    false,
                    entries,
                );
                (low, high.join().expect("index builder panicked"))
            });
            // The copies of a key (one per list holding it) share a home slot, so they went
            // to the same half, in list order, and all overflowed if the first did.
            let mut overflow = low.1;
            overflow.extend(high.1);
            (low.0 + high.0, overflow)
        };
        let mut whole = table.whole();
        for e in overflow {
            let k = FingerprintTable::split(e.fp);
            if whole.place(slot_in(k, slots), k, e.reason, e.list, true) == Placed::New {
                len += 1;
            }
        }
        table.len = len;
        SuppressionIndex {
            bloom,
            table,
            lists: self.lists,
        }
    }
}

/// Inserts into one part of the bloom filter (`blocks`, which are blocks `block_range` of
/// `totals.0`) and of the table (`part`, slots `slot_range` of `totals.1`) the entries whose
/// block and home slot fall in them. Returns the keys it added to the table and the entries
/// whose probe ran past the part's end (none when `wrap`).
fn fill_part<I: Iterator<Item = Entry>>(
    blocks: &mut [[u32; 8]],
    mut part: TablePart<'_>,
    block_range: (usize, usize),
    slot_range: (usize, usize),
    totals: (usize, usize),
    wrap: bool,
    entries: impl Fn() -> I,
) -> (usize, Vec<Entry>) {
    let block_of = |fp: u128| block_in(fp, totals.0);
    let slot_of = |k: [u64; 2]| slot_in(k, totals.1);
    let mine = |i: usize, r: (usize, usize)| i >= r.0 && i < r.1;
    // Write the part in order before probing it. The memory is fresh from the allocator,
    // and when a page's first touch is a read (a probe) the kernel maps the shared zero page,
    // so the write that follows costs a second fault and a TLB shootdown on every CPU the
    // process runs on: one per 4 KiB page, ≈ 80 ms for 2M keys on this project's VM.
    blocks.fill([0; 8]);
    part.keys.fill([0, 0]);
    part.reasons.fill(0);
    part.lists.fill(0);
    let mut len = 0;
    let mut overflow = Vec::new();
    let mut ahead = entries().skip(BUILD_AHEAD);
    for e in entries() {
        if let Some(a) = ahead.next() {
            let b = block_of(a.fp);
            if mine(b, block_range) {
                prefetch(&blocks[b - block_range.0]);
            }
            let i = slot_of(FingerprintTable::split(a.fp));
            if mine(i, slot_range) {
                prefetch_slot(part.keys, part.reasons, part.lists, i - slot_range.0);
            }
        }
        let b = block_of(e.fp);
        if mine(b, block_range) {
            BlockBloom::set(&mut blocks[b - block_range.0], e.fp);
        }
        let k = FingerprintTable::split(e.fp);
        let i = slot_of(k);
        if mine(i, slot_range) {
            match part.place(i - slot_range.0, k, e.reason, e.list, wrap) {
                Placed::New => len += 1,
                Placed::Existing => {}
                Placed::Overflow => overflow.push(e),
            }
        }
    }
    (len, overflow)
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
        // Three passes, so that memory is waited on as little as possible: hash every key;
        // test the bloom filter, its block for the key PROBE_AHEAD on prefetched; probe the
        // table for the keys that may be on a list, prefetched the same way. (Prefetching a
        // whole batch's blocks at once evicts the first before they are tested.)
        let index = &*self.index;
        let fps: Vec<u128> = (0..batch.len())
            .map(|i| {
                if batch.decisions[i] != Decision::Pending || keys.is_null(i) {
                    0
                } else {
                    fingerprint(keys.value(i))
                }
            })
            .collect();
        let mut maybe = Vec::new();
        visit_prefetched(
            &fps,
            PROBE_AHEAD,
            |fp| index.bloom.prefetch(fp),
            |i, fp| {
                if fp != 0 && index.bloom.may_contain(fp) {
                    maybe.push(i);
                }
            },
        );
        visit_prefetched(
            &maybe,
            PROBE_AHEAD,
            |i| index.table.prefetch(fps[i]),
            |_, i| {
                if let Some((reason, list)) = index.table.get(fps[i]) {
                    if reason == Reason::AlreadySent {
                        // An earlier run's ledger: skipped, naming that run.
                        batch.decide(i, Decision::Skipped, reason);
                        let run = &index.lists[list as usize].name;
                        batch.add_detail(i, format!("sent by run {run}"));
                    } else {
                        batch.decide(i, Decision::Suppressed, reason);
                        batch.lists[i] = list;
                    }
                }
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

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

    /// What a lookup must answer: per key, the reason of the highest-precedence list holding
    /// it, and the first such list.
    fn model(lists: &[(Reason, Vec<String>)]) -> HashMap<&str, (Reason, u16)> {
        let mut m: HashMap<&str, (Reason, u16)> = HashMap::new();
        for (l, (reason, keys)) in lists.iter().enumerate() {
            for k in keys {
                let e = m.entry(k.as_str()).or_insert((*reason, l as u16));
                if rank(*reason) < rank(e.0) {
                    *e = (*reason, l as u16);
                }
            }
        }
        m
    }

    fn builder(lists: &[(Reason, Vec<String>)]) -> SuppressionIndexBuilder {
        let mut b = SuppressionIndexBuilder::new();
        for (i, (reason, keys)) in lists.iter().enumerate() {
            let l = b.add_list(format!("list{i}"), *reason);
            if i % 2 == 0 {
                b.add_fingerprints(l, keys.iter().map(|k| fingerprint(k)).collect());
            } else {
                for k in keys {
                    b.add(l, k);
                }
            }
        }
        b
    }

    #[test]
    fn large_index_built_in_halves_finds_every_key() {
        // Enough keys for the two-thread build, with keys on several lists and many probes
        // running past the middle and the end of the table.
        let key = |i: usize| format!("user{i}@example.com");
        let lists = vec![
            (Reason::HardBounce, (0..60_000).map(key).collect::<Vec<_>>()),
            (Reason::Blocklisted, (50_000..70_000).map(key).collect()),
            (Reason::Unsubscribed, (65_000..90_000).map(key).collect()),
        ];
        let idx = builder(&lists).build();
        let want = model(&lists);
        assert_eq!(idx.len(), want.len());
        for (k, v) in &want {
            assert_eq!(idx.lookup(k), Some(*v), "{k}");
        }
        for i in 90_000..100_000 {
            assert_eq!(idx.lookup(&key(i)), None);
        }
        assert_eq!(idx.lists()[1].keys, 20_000);
    }

    proptest! {
        /// The index built in two halves answers like the model and like the one-thread
        /// build, whatever the overlap between lists (small tables: many probes cross the
        /// middle and the end).
        #[test]
        fn halves_build_like_one(
            lists in proptest::collection::vec(
                (
                    proptest::sample::select(PRECEDENCE.to_vec()),
                    proptest::collection::vec("[a-e]{1,3}@x\\.co", 0..60),
                ),
                1..4,
            ),
            probes in proptest::collection::vec("[a-e]{1,3}@x\\.co", 0..40),
        ) {
            let want = model(&lists);
            let one = builder(&lists).build_in(1);
            let two = builder(&lists).build_in(2);
            prop_assert_eq!(one.len(), want.len());
            prop_assert_eq!(two.len(), want.len());
            for p in probes.iter().chain(lists.iter().flat_map(|l| l.1.iter())) {
                let w = want.get(p.as_str()).copied();
                prop_assert_eq!(two.lookup(p), w);
                prop_assert_eq!(one.lookup(p), w);
                prop_assert_eq!(two.lookup_exact(p), w);
            }
        }

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
