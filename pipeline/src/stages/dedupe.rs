//! One message per person per run: later rows repeating an earlier valid row's recipient key
//! (or, with `dedupe = "household"`, its household) are skipped as `duplicate`.
//!
//! The first valid occurrence in input order wins, whatever the number of workers. Workers
//! decide as they go against a shared table that keeps, for each key fingerprint, the smallest
//! input row seen so far ([`Deduplicator`], before suppression, so a duplicate never reaches the
//! encoders). A worker can only be wrong when a smaller row of the same key is still in flight
//! on another worker; the row that smaller one later displaces from the table is flagged, and
//! the ordered path ([`DuplicateResolver`], which sees batches in input order after every
//! earlier batch has left the workers) looks such rows up again and corrects them. Displacements
//! are rare (two rows of one key in flight at once), so the ordered path costs almost nothing.
//!
//! Keys are compared by a 128-bit fingerprint keyed by the run id (xxh3-128): 92 of its bits
//! are kept (64 + 20 stored, 8 choose the shard), so two different keys of a 50M-recipient send
//! share a fingerprint with probability below 2⁻⁴¹ (about 5·10⁻¹³). A table slot is 16 bytes
//! (fingerprint and the first row's input position); the table holds one slot per distinct
//! valid key and grows by doubling at 3/4 load.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, StringArray};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::Stage;
use crate::error::Result;
use crate::model::{Decision, Reason, RecipientBatch, RecipientLayout, StdField, NO_VARIANT};
use crate::runner::OrderedStage;
use crate::spec::Dedupe;

const SHARDS: usize = 256;
/// How many rows ahead a shard's slot is prefetched.
const PROBE_AHEAD: usize = 8;
/// A row's place in the input, as workers know it before input row numbers are assigned:
/// the batch's sequence number, then the row within the batch (batches hold fewer than 2²⁰
/// rows). Stored plus one, so an all-zero slot is empty.
const ROW_BITS: u32 = 44;
const ROW_MASK: u64 = (1 << ROW_BITS) - 1;
const IN_BATCH_BITS: u32 = 20;

/// The input position of row `i` of batch `seq` (ordered like input rows).
fn position(seq: u64, i: usize) -> Result<u64> {
    if i >= 1 << IN_BATCH_BITS || seq >= 1 << (ROW_BITS - IN_BATCH_BITS) {
        return Err(crate::error::Error::Stage {
            stage: "dedupe".into(),
            message: format!(
                "batch {seq} row {i} is beyond what deduplication can number (2^24 batches of 2^20 rows); set dedupe = false for this input"
            ),
        });
    }
    Ok(seq << IN_BATCH_BITS | i as u64)
}
/// Seed offset of the household fingerprints, so a key and an address never meet.
const HOUSEHOLD_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A recipient fingerprint: shard, the 64 bits that place it in its shard, 20 more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    shard: u8,
    a: u64,
    b: u32,
}

impl Fingerprint {
    fn of(bytes: &[u8], seed: u64) -> Fingerprint {
        let h = xxh3_128_with_seed(bytes, seed);
        let hi = (h >> 64) as u64;
        Fingerprint {
            shard: (hi >> 56) as u8,
            a: h as u64,
            b: ((hi >> 32) & 0xf_ffff) as u32,
        }
    }
}

/// One shard: open addressing with linear probing over `[a, b << 44 | position + 1]` slots.
#[derive(Default)]
struct Shard {
    slots: Vec<[u64; 2]>,
    len: usize,
}

impl Shard {
    /// The smallest row recorded for `fp` before this call, after recording `row` (which
    /// replaces a larger one). Returns `(previous smallest, displaced row)`.
    fn insert_min(&mut self, fp: Fingerprint, row: u64) -> (Option<u64>, Option<u64>) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let tag = (fp.b as u64) << ROW_BITS;
        let i = self.probe(fp);
        let s = &mut self.slots[i];
        if s[1] == 0 {
            *s = [fp.a, tag | (row + 1)];
            self.len += 1;
            return (None, None);
        }
        let old = (s[1] & ROW_MASK) - 1;
        if row < old {
            s[1] = tag | (row + 1);
            return (Some(old), Some(old));
        }
        (Some(old), None)
    }

    /// The slot holding `fp`, or the empty slot where it would go (the table is never full).
    fn probe(&self, fp: Fingerprint) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (fp.a as usize) & mask;
        let tag = (fp.b as u64) << ROW_BITS;
        loop {
            let s = &self.slots[i];
            if s[1] == 0 || (s[0] == fp.a && s[1] & !ROW_MASK == tag) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Brings the slot `fp` starts probing at into the cache.
    #[inline]
    fn prefetch(&self, fp: Fingerprint) {
        if let Some(s) = self
            .slots
            .get((fp.a as usize) & self.slots.len().wrapping_sub(1))
        {
            super::suppression::prefetch(s);
        }
    }

    /// The smallest row recorded for `fp`.
    fn get(&self, fp: Fingerprint) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let s = &self.slots[self.probe(fp)];
        (s[1] != 0).then(|| (s[1] & ROW_MASK) - 1)
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(64);
        let old = std::mem::replace(&mut self.slots, vec![[0, 0]; cap]);
        let mask = cap - 1;
        for s in old.into_iter().filter(|s| s[1] != 0) {
            let mut i = (s[0] as usize) & mask;
            while self.slots[i][1] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }
}

/// The run's table of recipients seen so far, shared by the workers and the ordered path.
pub struct SeenRecipients {
    mode: Dedupe,
    seed: u64,
    layout: Arc<RecipientLayout>,
    shards: Box<[Mutex<Shard>]>,
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
    /// An empty table for one run; `run_id` keys the fingerprints (a resume gets the same).
    /// Rows are compared by the key the validate stage derived (`RecipientBatch::keys`).
    pub fn new(mode: Dedupe, run_id: &str, layout: Arc<RecipientLayout>) -> Arc<Self> {
        Arc::new(SeenRecipients {
            mode,
            seed: xxhash_rust::xxh3::xxh3_64(run_id.as_bytes()),
            layout,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            displaced: Mutex::default(),
        })
    }

    /// Distinct fingerprints recorded (keys plus households).
    pub fn distinct(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len).sum()
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

/// A batch row found to repeat an earlier row: `(row in batch, input position of the earliest
/// occurrence, the positions the worker compared with)`; the ordered path turns it into the
/// ledger's detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateRow {
    /// Row within the batch.
    pub row: u32,
    /// Input position (batch sequence and row) of the earlier occurrence it repeats.
    pub first: u64,
    /// The smallest positions the table held for each fingerprint when the worker looked.
    seen: [Option<u64>; 2],
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
        // Group the rows' fingerprints by shard (a stable counting sort: rows stay ascending
        // within each), so each shard is locked once per batch and rows of one key are seen
        // in input order.
        let mut found: Vec<(u32, u8, Fingerprint)> = Vec::with_capacity(n);
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
                    counts[fp.shard as usize + 1] += 1;
                    found.push((i as u32, k as u8, fp));
                }
            }
        }
        for s in 1..=SHARDS {
            counts[s] += counts[s - 1];
        }
        let mut entries = vec![
            (
                0u32,
                0u8,
                Fingerprint {
                    shard: 0,
                    a: 0,
                    b: 0
                }
            );
            found.len()
        ];
        let mut next = counts;
        for e in found {
            let at = &mut next[e.2.shard as usize];
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
            for (x, &(i, k, fp)) in group.iter().enumerate() {
                if let Some(ahead) = group.get(x + PROBE_AHEAD) {
                    s.prefetch(ahead.2);
                }
                let row = position(b.seq, i as usize)?;
                let (prev, lost) = s.insert_min(fp, row);
                if let Some(l) = lost {
                    displaced.push(l);
                }
                if let Some(p) = prev.filter(|p| *p < row) {
                    earlier.push((i, k, p));
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
    fn earliest(&mut self, b: &RecipientBatch, i: usize) -> Option<u64> {
        let row = position(b.seq, i).ok()?;
        self.seen
            .fingerprints(b, i, &mut self.buf)
            .into_iter()
            .flatten()
            .filter_map(|fp| lock(&self.seen.shards[fp.shard as usize]).get(fp))
            .filter(|first| *first < row)
            .min()
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
            let Some(first) = self.earliest(b, i) else {
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
        let seen = SeenRecipients::new(mode, "run-1", layout());
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
    fn the_table_grows_and_keeps_every_key() {
        let seen = SeenRecipients::new(Dedupe::Key, "r", layout());
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
