//! One message per person per run: later rows repeating an earlier valid row's recipient key
//! (or, with `dedupe = "household"`, its household) are skipped as `duplicate`.
//!
//! The first valid occurrence in input order wins, whatever the number of workers. Workers
//! decide as they go against a shared table that keeps, for each key, the smallest input row
//! seen so far ([`Deduplicator`], before suppression, so a duplicate never reaches the
//! encoders). A worker can only be wrong when a smaller row of the same key is still in flight
//! on another worker; the row that smaller one later displaces from the table is flagged, and
//! the ordered path ([`DuplicateResolver`], which sees batches in input order after every
//! earlier batch has left the workers) looks such rows up again and corrects them. Displacements
//! are rare (two rows of one key in flight at once), so the ordered path costs almost nothing.
//!
//! Memory is 8 bytes per distinct key: a table slot holds the first row's input position and a
//! 24-bit tag of the key's 128-bit fingerprint (xxh3-128 keyed by the run id). The fingerprints
//! themselves go to a working file beside the run records, 16 bytes per row at the row's place,
//! written before the batch touches the table. A slot whose tag matches is confirmed by reading
//! its row's fingerprint back, so two keys are the same only when their full 128-bit
//! fingerprints are (the chance that two different keys of a 50M-recipient send share one is
//! below 2⁻⁷⁶). Reads happen for repeats and for the rare tag collisions (about one in 2²⁴
//! probes), never for a first occurrence that finds no match. The file is unlinked as soon as
//! it is created, so it disappears with the process.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, StringArray};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::OrderedStage;
use super::Stage;
use crate::error::{Error, Result};
pub use crate::model::DuplicateRow;
use crate::model::{Decision, Reason, RecipientBatch, RecipientLayout, StdField, NO_VARIANT};
use crate::spec::Dedupe;

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// How many rows ahead a shard's slot is prefetched.
const PROBE_AHEAD: usize = 8;
/// A row's place in the input, as workers know it before input row numbers are assigned:
/// the batch's sequence number, then the row within the batch (batches hold fewer than 2²⁰
/// rows). Stored plus one, so an all-zero slot is empty.
const POS_BITS: u32 = 40;
const POS_MASK: u64 = (1 << POS_BITS) - 1;
const IN_BATCH_BITS: u32 = 20;
/// Bits of a slot left for the key's tag.
const TAG_BITS: u32 = 64 - POS_BITS;

/// The input position of row `i` of batch `seq` (ordered like input rows).
fn position(seq: u64, i: usize) -> Result<u64> {
    if i >= 1 << IN_BATCH_BITS || seq >= (1 << (POS_BITS - IN_BATCH_BITS)) - 1 {
        return Err(Error::Stage {
            stage: "dedupe".into(),
            message: format!(
                "batch {seq} row {i} is beyond what deduplication can number (2^20 batches of 2^20 rows); set dedupe = false for this input"
            ),
        });
    }
    Ok(seq << IN_BATCH_BITS | i as u64)
}
/// Seed offset of the household fingerprints, so a key and an address never meet.
const HOUSEHOLD_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A recipient fingerprint: 128 bits (never 0); the shard and the tag are taken from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    full: u128,
}

impl Fingerprint {
    fn of(bytes: &[u8], seed: u64) -> Fingerprint {
        Fingerprint {
            full: xxh3_128_with_seed(bytes, seed).max(1),
        }
    }

    fn shard(&self) -> usize {
        (self.full >> (128 - SHARD_BITS)) as usize
    }

    fn tag(&self) -> u64 {
        (self.full >> 64) as u64 & ((1 << TAG_BITS) - 1)
    }
}

/// Huge pages: 2 MiB.
const HUGE_PAGE: usize = 2 << 20;
const SLOT_BYTES: usize = std::mem::size_of::<u64>();

/// A shard's slots, zeroed and resident, in a mapping of their own that goes back to the system
/// when the shard grows (through the allocator, freed tables stayed resident in its arenas).
/// Past 2 MiB they start on a 2 MiB boundary and the kernel is asked to back them with huge
/// pages: probes land at random in a table far larger than the caches, and with 4 KiB pages
/// each one also missed the TLB (perf put half of the stage's time on the page walks behind
/// its prefetches).
struct Slots {
    map: *mut libc::c_void,
    map_len: usize,
    slots: *mut u64,
    len: usize,
}

// SAFETY: `Slots` owns its mapping exclusively, like a `Box<[u64]>`.
unsafe impl Send for Slots {}
// SAFETY: shared access only reads through `&[u64]`.
unsafe impl Sync for Slots {}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            map: std::ptr::null_mut(),
            map_len: 0,
            slots: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }
}

impl Slots {
    fn zeroed(len: usize) -> Slots {
        let bytes = len * SLOT_BYTES;
        let huge = bytes >= HUGE_PAGE;
        let map_len = bytes + if huge { HUGE_PAGE } else { 0 };
        // SAFETY: an anonymous private mapping; the result is checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<u64>(len).expect("a table size"),
            );
        }
        let skip = if huge {
            (map as usize).next_multiple_of(HUGE_PAGE) - map as usize
        } else {
            0
        };
        // SAFETY: `skip + bytes <= map_len`, inside the mapping.
        let slots = unsafe { map.cast::<u8>().add(skip) }.cast::<u64>();
        #[cfg(target_os = "linux")]
        if huge {
            // SAFETY: the range lies inside the mapping; the advice changes how the kernel
            // backs the pages, not their contents. A refusal is harmless.
            unsafe { libc::madvise(slots.cast(), bytes & !(HUGE_PAGE - 1), libc::MADV_HUGEPAGE) };
        }
        // Each page is written once before any probe reads it: a probe reading it first maps
        // the shared zero page, and the write after it then copies the page and shoots down
        // every core's TLB entry for it (perf: 6 % of a 10M send's CPU).
        for i in (0..len).step_by(4096 / SLOT_BYTES) {
            // SAFETY: `i < len`, inside the slots, which nothing else references yet.
            unsafe { std::ptr::write_volatile(slots.add(i), 0) };
        }
        Slots {
            map,
            map_len,
            slots,
            len,
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if !self.map.is_null() {
            // SAFETY: the mapping was made by `zeroed` and nothing borrows it any more.
            unsafe { libc::munmap(self.map, self.map_len) };
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `len` initialised (zeroed) slots owned by `self`.
        unsafe { std::slice::from_raw_parts(self.slots, self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as for `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.slots, self.len) }
    }
}

/// One shard: open addressing with linear probing over `tag << 40 | position + 1` slots, the
/// home slot chosen by the tag. Grows by half at 85 % load.
#[derive(Default)]
struct Shard {
    slots: Slots,
    len: usize,
}

impl Shard {
    fn home(&self, tag: u64) -> usize {
        (((tag << POS_BITS) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    /// Brings the slot `fp` starts probing at into the cache.
    #[inline]
    fn prefetch(&self, fp: &Fingerprint) {
        if !self.slots.is_empty() {
            super::suppression::prefetch(&self.slots[self.home(fp.tag())]);
        }
    }

    fn make_room(&mut self) {
        if (self.len + 1) * 20 > self.slots.len() * 17 {
            let cap = (self.slots.len() * 3 / 2).max(64);
            let old = std::mem::replace(&mut self.slots, Slots::zeroed(cap));
            for &s in old.iter().filter(|s| **s != 0) {
                let mut i = self.home(s >> POS_BITS);
                while self.slots[i] != 0 {
                    i = if i + 1 == cap { 0 } else { i + 1 };
                }
                self.slots[i] = s;
            }
        }
    }
}

/// The fingerprints of every batch's rows, at `offset(batch) + row * stride`, in a file that
/// exists only while the process holds it.
struct Fingerprints {
    file: File,
    /// Bytes per row: 16 per fingerprint kind (key; household).
    stride: u64,
    end: AtomicU64,
    /// Where each batch's rows start, by sequence number (`u64::MAX`: not written).
    offsets: Mutex<Vec<u64>>,
    /// Its name, for messages (unlinked at once where the platform allows).
    path: std::path::PathBuf,
    /// Whether it is still linked, to be removed on drop.
    linked: bool,
}

impl Fingerprints {
    fn create(dir: &Path, run_id: &str, kinds: u64) -> Result<Fingerprints> {
        let fail = |what: &str, e: std::io::Error| Error::Stage {
            stage: "dedupe".into(),
            message: format!("{what} its working file in {}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail("creating the folder of", e))?;
        let safe: String = run_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!(".dedupe-{safe}-{}.tmp", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| fail("creating", e))?;
        // Unlinked at once where the platform allows: it goes with the process, killed or not.
        let linked = std::fs::remove_file(&path).is_err();
        Ok(Fingerprints {
            file,
            stride: 16 * kinds,
            end: AtomicU64::new(0),
            offsets: Mutex::default(),
            path,
            linked,
        })
    }

    /// Writes one batch's rows: `bytes[(row * kinds + kind) * 16..][..16]` is the row's
    /// fingerprint of that kind, little-endian (0 where a row has none).
    fn write(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        let at = self.end.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| Error::Stage {
                stage: "dedupe".into(),
                message: format!("writing its working file {}: {e}", self.path.display()),
            })?;
        let mut o = lock(&self.offsets);
        if o.len() <= seq as usize {
            o.resize(seq as usize + 1, u64::MAX);
        }
        o[seq as usize] = at;
        Ok(())
    }

    /// Whether the row at input position `pos` has fingerprint `full`.
    fn row_has(&self, pos: u64, full: u128) -> Result<bool> {
        let (seq, row) = (pos >> IN_BATCH_BITS, pos & ((1 << IN_BATCH_BITS) - 1));
        let start = lock(&self.offsets)
            .get(seq as usize)
            .copied()
            .filter(|o| *o != u64::MAX)
            .ok_or_else(|| Error::Stage {
                stage: "dedupe".into(),
                message: format!("batch {seq} is in the table but not in the working file"),
            })?;
        let mut buf = [0u8; 32];
        let buf = &mut buf[..self.stride as usize];
        self.file
            .read_exact_at(buf, start + row * self.stride)
            .map_err(|e| Error::Stage {
                stage: "dedupe".into(),
                message: format!("reading its working file {}: {e}", self.path.display()),
            })?;
        Ok(buf
            .chunks_exact(16)
            .any(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")) == full))
    }
}

impl Drop for Fingerprints {
    fn drop(&mut self) {
        if self.linked {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The run's table of recipients seen so far, shared by the workers and the ordered path.
pub struct SeenRecipients {
    mode: Dedupe,
    seed: u64,
    layout: Arc<RecipientLayout>,
    shards: Box<[Mutex<Shard>]>,
    fingerprints: Fingerprints,
    /// Rows that lost their table slot to a smaller row after a worker had decided them.
    displaced: Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for SeenRecipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenRecipients")
            .field("mode", &self.mode)
            .field("distinct", &self.distinct())
            .finish()
    }
}

impl SeenRecipients {
    /// An empty table for one run; `run_id` keys the fingerprints (a resume gets the same),
    /// and `work_dir` holds the working file of fingerprints while the run lasts. Rows are
    /// compared by the key the validate stage derived (`RecipientBatch::keys`).
    pub fn new(
        mode: Dedupe,
        run_id: &str,
        layout: Arc<RecipientLayout>,
        work_dir: &Path,
    ) -> Result<Arc<Self>> {
        let kinds = if mode == Dedupe::Household { 2 } else { 1 };
        Ok(Arc::new(SeenRecipients {
            mode,
            seed: xxhash_rust::xxh3::xxh3_64(run_id.as_bytes()),
            layout,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            fingerprints: Fingerprints::create(work_dir, run_id, kinds)?,
            displaced: Mutex::default(),
        }))
    }

    /// Distinct keys recorded (keys plus households).
    pub fn distinct(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len).sum()
    }

    /// Fingerprint kinds per row: the key, and with `dedupe = "household"` the household.
    fn kinds(&self) -> usize {
        self.fingerprints.stride as usize / 16
    }

    /// The fingerprints of row `i` (key, then household), if it has them.
    fn fingerprints(
        &self,
        b: &RecipientBatch,
        i: usize,
        buf: &mut Vec<u8>,
    ) -> [Option<Fingerprint>; 2] {
        let key = b.key(i).map(|k| Fingerprint::of(k.as_bytes(), self.seed));
        let household = match self.mode {
            Dedupe::Household => household_key(b, &self.layout, i, buf)
                .then(|| Fingerprint::of(buf, self.seed ^ HOUSEHOLD_SEED)),
            _ => None,
        };
        [key, household]
    }

    /// The slot holding `fp` with the smallest position recorded for it, or the empty slot
    /// where it would go (the table is never full).
    fn find(&self, s: &Shard, fp: &Fingerprint) -> Result<(usize, Option<u64>)> {
        let cap = s.slots.len();
        let tag = fp.tag();
        let mut i = s.home(tag);
        loop {
            let v = s.slots[i];
            if v == 0 {
                return Ok((i, None));
            }
            if v >> POS_BITS == tag {
                let pos = (v & POS_MASK) - 1;
                if self.fingerprints.row_has(pos, fp.full)? {
                    return Ok((i, Some(pos)));
                }
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
    }

    /// The smallest position recorded for `fp` before this call, after recording `pos` (which
    /// replaces a larger one). Returns `(previous smallest, displaced position)`.
    fn insert_min(
        &self,
        s: &mut Shard,
        fp: &Fingerprint,
        pos: u64,
    ) -> Result<(Option<u64>, Option<u64>)> {
        s.make_room();
        let (i, old) = self.find(s, fp)?;
        let slot = fp.tag() << POS_BITS | (pos + 1);
        Ok(match old {
            None => {
                s.slots[i] = slot;
                s.len += 1;
                (None, None)
            }
            Some(old) if pos < old => {
                s.slots[i] = slot;
                (Some(old), Some(old))
            }
            Some(old) => (Some(old), None),
        })
    }

    /// The smallest position recorded for `fp`.
    fn get(&self, fp: &Fingerprint) -> Result<Option<u64>> {
        let s = lock(&self.shards[fp.shard()]);
        if s.slots.is_empty() {
            return Ok(None);
        }
        Ok(self.find(&s, fp)?.1)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The normalised household of row `i` into `buf`: address1 lowercased with its spaces
/// collapsed, then the zip lowercased without spaces or dashes. False when either is absent.
fn household_key(
    b: &RecipientBatch,
    layout: &RecipientLayout,
    i: usize,
    buf: &mut Vec<u8>,
) -> bool {
    let value = |f: StdField| -> Option<&str> {
        let c: &StringArray = b.column(layout.index(f)?);
        c.is_valid(i).then(|| c.value(i))
    };
    let (Some(addr), Some(zip)) = (value(StdField::Address1), value(StdField::Zip)) else {
        return false;
    };
    buf.clear();
    for (n, word) in addr.split_whitespace().enumerate() {
        if n > 0 {
            buf.push(b' ');
        }
        buf.extend(word.to_lowercase().bytes());
    }
    buf.push(0x1f);
    buf.extend(
        zip.chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
            .bytes(),
    );
    !addr.trim().is_empty() && buf.len() > 1
}

/// Worker stage: decides rows repeating an earlier valid row as `skipped` / `duplicate`.
pub struct Deduplicator {
    seen: Arc<SeenRecipients>,
    buf: Vec<u8>,
}

impl Deduplicator {
    /// A worker's stage over the run's shared table.
    pub fn new(seen: Arc<SeenRecipients>) -> Self {
        Deduplicator {
            seen,
            buf: Vec::new(),
        }
    }
}

impl Stage for Deduplicator {
    fn name(&self) -> &'static str {
        "dedupe"
    }

    fn process(&mut self, b: &mut RecipientBatch) -> Result<()> {
        let n = b.len();
        let kinds = self.seen.kinds();
        // Every row's fingerprints go to the working file before the batch touches the table,
        // so any slot naming one of its rows can be confirmed.
        let mut fps = vec![0u8; n * kinds * 16];
        // Group the rows' fingerprints by shard (a stable counting sort: rows stay ascending
        // within each), so each shard is locked once per batch and rows of one key are seen
        // in input order.
        let mut found: Vec<(Fingerprint, u32, u8)> = Vec::with_capacity(n);
        let mut counts = [0u32; SHARDS + 1];
        for i in 0..n {
            if b.decisions[i] != Decision::Pending {
                continue;
            }
            for (k, fp) in self
                .seen
                .fingerprints(b, i, &mut self.buf)
                .into_iter()
                .enumerate()
            {
                if let Some(fp) = fp {
                    counts[fp.shard() + 1] += 1;
                    fps[(i * kinds + k) * 16..][..16].copy_from_slice(&fp.full.to_le_bytes());
                    found.push((fp, i as u32, k as u8));
                }
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        position(b.seq, n.saturating_sub(1))?;
        self.seen.fingerprints.write(b.seq, &fps)?;
        drop(fps);
        for s in 1..=SHARDS {
            counts[s] += counts[s - 1];
        }
        let mut entries = vec![(Fingerprint { full: 0 }, 0u32, 0u8); found.len()];
        let mut next = counts;
        for e in found {
            let at = &mut next[e.0.shard()];
            entries[*at as usize] = e;
            *at += 1;
        }
        // (row in batch, fingerprint, the smaller row the table held for it)
        let mut earlier: Vec<(u32, u8, u64)> = Vec::new();
        let mut displaced = Vec::new();
        for shard in 0..SHARDS {
            let group = &entries[counts[shard] as usize..counts[shard + 1] as usize];
            if group.is_empty() {
                continue;
            }
            let mut s = lock(&self.seen.shards[shard]);
            for (x, (fp, i, k)) in group.iter().enumerate() {
                if let Some(ahead) = group.get(x + PROBE_AHEAD) {
                    s.prefetch(&ahead.0);
                }
                let row = position(b.seq, *i as usize)?;
                let (prev, lost) = self.seen.insert_min(&mut s, fp, row)?;
                if let Some(l) = lost {
                    displaced.push(l);
                }
                if let Some(p) = prev.filter(|p| *p < row) {
                    earlier.push((*i, *k, p));
                }
            }
        }
        if !displaced.is_empty() {
            lock(&self.seen.displaced).extend(displaced);
        }
        earlier.sort_unstable();
        for (x, &(i, k, p)) in earlier.iter().enumerate() {
            if x > 0 && earlier[x - 1].0 == i {
                let d = b.duplicates.last_mut().expect("pushed for this row");
                d.seen[k as usize] = Some(p);
                d.first = d.first.min(p);
                continue;
            }
            b.decide(i as usize, Decision::Skipped, Reason::Duplicate);
            b.variants[i as usize] = NO_VARIANT;
            let mut seen = [None; 2];
            seen[k as usize] = Some(p);
            b.duplicates.push(DuplicateRow {
                row: i,
                first: p,
                seen,
            });
        }
        Ok(())
    }
}

/// Ordered stage: corrects the rare rows a worker decided while a smaller row of the same key
/// was still in flight, and writes each duplicate's detail (the earliest row it repeats).
pub struct DuplicateResolver {
    seen: Arc<SeenRecipients>,
    buf: Vec<u8>,
    /// Input row number of each batch's first row, by sequence number (batches come in order).
    first_rows: Vec<u64>,
}

impl DuplicateResolver {
    /// The ordered stage over the run's shared table.
    pub fn new(seen: Arc<SeenRecipients>) -> Self {
        DuplicateResolver {
            seen,
            buf: Vec::new(),
            first_rows: Vec::new(),
        }
    }

    /// The earliest input row before `row` with one of the row's fingerprints: every such row
    /// is in the table, as every earlier batch has left the workers.
    fn earliest(&mut self, b: &RecipientBatch, i: usize) -> Result<Option<u64>> {
        let row = position(b.seq, i)?;
        let mut first: Option<u64> = None;
        for fp in self
            .seen
            .fingerprints(b, i, &mut self.buf)
            .into_iter()
            .flatten()
        {
            if let Some(p) = self.seen.get(&fp)?.filter(|p| *p < row) {
                first = Some(first.map_or(p, |f| f.min(p)));
            }
        }
        Ok(first)
    }
}

impl Stage for DuplicateResolver {
    fn name(&self) -> &'static str {
        "dedupe-order"
    }

    fn process(&mut self, b: &mut RecipientBatch) -> Result<()> {
        let seq = b.seq as usize;
        if self.first_rows.len() <= seq {
            self.first_rows.resize(seq + 1, 0);
        }
        self.first_rows[seq] = b.first_row;
        let lo = position(b.seq, 0)?;
        let hi = lo + b.len() as u64;
        // Rows to look up again: those that lost their slot to a smaller row (a worker may have
        // let them through, or named a later first row), and duplicates whose earlier row lost
        // its slot (an even earlier row may exist).
        let mut again: Vec<usize> = {
            let d = lock(&self.seen.displaced);
            if d.is_empty() {
                Vec::new()
            } else {
                let mut v: Vec<usize> = d
                    .iter()
                    .filter(|r| (lo..hi).contains(*r))
                    .map(|r| (r - lo) as usize)
                    .collect();
                v.extend(
                    b.duplicates
                        .iter()
                        .filter(|x| x.seen.iter().flatten().any(|s| d.contains(s)))
                        .map(|x| x.row as usize),
                );
                v
            }
        };
        again.sort_unstable();
        again.dedup();
        for i in again {
            let Some(first) = self.earliest(b, i)? else {
                continue;
            };
            match b.duplicates.binary_search_by_key(&(i as u32), |d| d.row) {
                Ok(x) => b.duplicates[x].first = first,
                Err(x) => {
                    b.decisions[i] = Decision::Skipped;
                    b.reasons[i] = Reason::Duplicate;
                    b.variants[i] = NO_VARIANT;
                    if let Ok(at) = b.details.binary_search_by_key(&(i as u32), |d| d.row) {
                        b.details.remove(at);
                    }
                    if let Some(m) = b.mail_states.get_mut(i) {
                        *m = "";
                    }
                    b.duplicates.insert(
                        x,
                        DuplicateRow {
                            row: i as u32,
                            first,
                            seen: [None; 2],
                        },
                    );
                }
            }
        }
        for x in 0..b.duplicates.len() {
            let (i, first) = (b.duplicates[x].row as usize, b.duplicates[x].first);
            let (seq, at) = (first >> IN_BATCH_BITS, first & ((1 << IN_BATCH_BITS) - 1));
            let row = self.first_rows[seq as usize] + at;
            // 1-based, as `why` numbers input rows.
            b.add_detail(i, format!("same recipient as input row {}", row + 1));
        }
        Ok(())
    }
}

impl OrderedStage for DuplicateResolver {}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, RecordBatch};
    use proptest::prelude::*;

    fn layout() -> Arc<RecipientLayout> {
        Arc::new(RecipientLayout::new(
            &[StdField::Email, StdField::Address1, StdField::Zip],
            &[],
        ))
    }

    /// One input row: key (already normalised), address1, zip, valid.
    type Row = (Option<String>, Option<String>, Option<String>, bool);

    fn batch(rows: &[Row], first_row: u64, seq: u64) -> RecipientBatch {
        let col = |f: fn(&Row) -> Option<String>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let cols = RecordBatch::try_new(
            layout().schema(),
            vec![
                col(|r| r.0.clone()),
                col(|r| r.1.clone()),
                col(|r| r.2.clone()),
            ],
        )
        .unwrap();
        let mut b = RecipientBatch::new(seq, first_row, cols);
        b.keys = Some(rows.iter().map(|r| r.0.clone()).collect());
        for (i, r) in rows.iter().enumerate() {
            if !r.3 {
                b.decide(i, Decision::Skipped, Reason::MissingName);
            }
        }
        b
    }

    fn household(r: &Row) -> Option<String> {
        let (a, z) = (r.1.as_ref()?, r.2.as_ref()?);
        let a: Vec<String> = a.split_whitespace().map(str::to_lowercase).collect();
        let z: String = z
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .flat_map(char::to_lowercase)
            .collect();
        (!a.is_empty() && !z.is_empty()).then(|| format!("{}|{z}", a.join(" ")))
    }

    /// The answer by brute force: for each row, the earliest earlier valid row it repeats.
    fn model(rows: &[Row], mode: Dedupe) -> Vec<Option<u64>> {
        (0..rows.len())
            .map(|r| {
                if !rows[r].3 {
                    return None;
                }
                (0..r)
                    .find(|&e| {
                        rows[e].3
                            && ((rows[e].0.is_some() && rows[e].0 == rows[r].0)
                                || (mode == Dedupe::Household
                                    && household(&rows[e]).is_some()
                                    && household(&rows[e]) == household(&rows[r])))
                    })
                    .map(|e| e as u64)
            })
            .collect()
    }

    /// Runs the stages as the runner may: workers take batches in `order`, the ordered path
    /// takes each batch once it and every earlier one left the workers.
    fn run(rows: &[Row], cuts: &[usize], order: &[usize], mode: Dedupe) -> Vec<Option<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let seen = SeenRecipients::new(mode, "run-1", layout(), dir.path()).unwrap();
        let mut batches: Vec<RecipientBatch> = Vec::new();
        let mut start = 0;
        for (seq, &end) in cuts.iter().chain(std::iter::once(&rows.len())).enumerate() {
            batches.push(batch(&rows[start..end], start as u64, seq as u64));
            start = end;
        }
        let mut worker = Deduplicator::new(seen.clone());
        let mut resolver = DuplicateResolver::new(seen);
        let mut done = vec![false; batches.len()];
        let mut next = 0;
        for &k in order {
            worker.process(&mut batches[k]).unwrap();
            done[k] = true;
            while next < batches.len() && done[next] {
                resolver.process(&mut batches[next]).unwrap();
                next += 1;
            }
        }
        let mut out = Vec::new();
        for b in &batches {
            for i in 0..b.len() {
                out.push(if b.reasons[i] == Reason::Duplicate {
                    assert_eq!(b.decisions[i], Decision::Skipped);
                    assert_eq!(b.variants[i], NO_VARIANT);
                    let d = b.detail(i).expect("a duplicate names its row");
                    let first: u64 = d
                        .strip_prefix("same recipient as input row ")
                        .unwrap()
                        .parse()
                        .unwrap();
                    Some(first - 1)
                } else {
                    None
                });
            }
        }
        out
    }

    fn rows_strategy() -> impl Strategy<Value = Vec<Row>> {
        let key =
            prop::option::weighted(0.9, (0..12u8).prop_map(|k| format!("user{k}@example.com")));
        let addr = prop::option::weighted(
            0.8,
            (0..6u8, prop::bool::ANY).prop_map(|(a, spaced)| {
                if spaced {
                    format!("  {a}  Main   St ")
                } else {
                    format!("{a} main st")
                }
            }),
        );
        let zip = prop::option::weighted(
            0.9,
            (0..2u8, prop::bool::ANY).prop_map(|(z, dash)| match dash {
                true => format!("1000-{z}"),
                false => format!("1000 {z}"),
            }),
        );
        prop::collection::vec((key, addr, zip, prop::bool::weighted(0.85)), 1..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the batch cuts and the order workers finish in, each row is decided as the
        /// brute-force answer says: the first valid occurrence wins and every later one names
        /// the earliest.
        #[test]
        fn first_valid_occurrence_wins_in_any_worker_order(
            rows in rows_strategy(),
            cut_seed in prop::collection::vec(0..300usize, 0..12),
            order_seed in any::<u64>(),
            household_mode in any::<bool>(),
        ) {
            let mode = if household_mode { Dedupe::Household } else { Dedupe::Key };
            let mut cuts: Vec<usize> = cut_seed.into_iter().map(|c| c % rows.len()).filter(|c| *c > 0).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let n = cuts.len() + 1;
            // A permutation of the batches from the seed.
            let mut order: Vec<usize> = (0..n).collect();
            let mut x = order_seed | 1;
            for i in (1..n).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let expect = model(&rows, mode);
            prop_assert_eq!(run(&rows, &cuts, &order, mode), expect.clone());
            // One batch, one worker: the same answer.
            prop_assert_eq!(run(&rows, &[], &[0], mode), expect);
        }
    }

    #[test]
    fn a_later_valid_row_is_not_shadowed_by_an_earlier_invalid_one() {
        let k = Some("a@x.co".to_string());
        let rows = vec![
            (k.clone(), None, None, false),
            (k.clone(), None, None, true),
            (k, None, None, true),
        ];
        assert_eq!(
            run(&rows, &[1], &[1, 0], Dedupe::Key),
            vec![None, None, Some(1)]
        );
    }

    #[test]
    fn large_slot_arrays_start_on_a_huge_page_and_are_zeroed() {
        for len in [64, HUGE_PAGE / SLOT_BYTES, 3 << 18] {
            let mut s = Slots::zeroed(len);
            assert_eq!(s.len(), len);
            assert!(s.iter().all(|x| *x == 0));
            if len * SLOT_BYTES >= HUGE_PAGE {
                assert_eq!(s.as_ptr() as usize % HUGE_PAGE, 0, "{len}");
            }
            s[len - 1] = 7;
            assert_eq!(s[len - 1], 7);
        }
    }

    #[test]
    fn keys_sharing_a_tag_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let seen = SeenRecipients::new(Dedupe::Key, "r", layout(), dir.path()).unwrap();
        let a = Fingerprint::of(b"ann@x.org", seen.seed);
        // Another key forced into the same shard with the same tag: only the working file's
        // full fingerprint tells them apart.
        let same_tag = |other: &[u8]| {
            let o = Fingerprint::of(other, seen.seed).full;
            let mask = (((1u128 << TAG_BITS) - 1) << 64)
                | (((1u128 << SHARD_BITS) - 1) << (128 - SHARD_BITS));
            Fingerprint {
                full: (o & !mask) | (a.full & mask),
            }
        };
        let b = same_tag(b"bob@x.org");
        assert_eq!((b.shard(), b.tag()), (a.shard(), a.tag()));
        assert_ne!(a.full, b.full);
        let bytes: Vec<u8> = [a.full, b.full, a.full]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        seen.fingerprints.write(0, &bytes).unwrap();
        let mut s = lock(&seen.shards[a.shard()]);
        assert_eq!(seen.insert_min(&mut s, &a, 0).unwrap(), (None, None));
        assert_eq!(seen.insert_min(&mut s, &b, 1).unwrap(), (None, None));
        assert_eq!(seen.insert_min(&mut s, &a, 2).unwrap(), (Some(0), None));
        assert_eq!(s.len, 2);
        drop(s);
        assert_eq!(seen.get(&a).unwrap(), Some(0));
        assert_eq!(seen.get(&b).unwrap(), Some(1));
        let c = same_tag(b"cy@x.org");
        assert_eq!(seen.get(&c).unwrap(), None);
    }

    #[test]
    fn the_table_grows_and_keeps_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let seen = SeenRecipients::new(Dedupe::Key, "r", layout(), dir.path()).unwrap();
        let rows: Vec<Row> = (0..20_000)
            .map(|i| (Some(format!("k{}", i % 15_000)), None, None, true))
            .collect();
        let mut b = batch(&rows, 0, 0);
        Deduplicator::new(seen.clone()).process(&mut b).unwrap();
        assert_eq!(seen.distinct(), 15_000);
        let dups = (0..b.len())
            .filter(|&i| b.reasons[i] == Reason::Duplicate)
            .count();
        assert_eq!(dups, 5_000);
        assert_eq!(b.duplicates[0].first, 0);
        assert_eq!(b.duplicates[0].row, 15_000);
    }
}
