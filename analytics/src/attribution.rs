//! Attribution from the ledger: engagement events that arrive without a `variant` or a
//! `run_id` get them from the recipient log of the send that reached the recipient, when they
//! are written to the store (Kafka and file ingest, the webhook intake's own writes).
//!
//! The lookup is (workspace, campaign, normalised email) → the runs of the campaign that sent
//! to that address, with the variant each sent. An event that names its run takes that run's
//! variant; one that does not takes the latest run started at or before the event's `ts` (the
//! campaign's first run if the event is older than all of them). A value the event carries is
//! never replaced: when the provider echoes a variant that disagrees with the ledger, the
//! event's own value is what is stored (docs/events.md says so). Events of other workspaces,
//! other campaigns, `submitted` events and addresses the campaign never sent are left as they
//! came.
//!
//! Per campaign the index holds about 20 bytes per sent address (a 64-bit xxh3 of the address,
//! run and variant numbers, sorted, and a bucket directory over the hash's top bits), loaded
//! from the campaign's ledger parts the first time an event of the campaign needs it and topped
//! up with the parts that appeared since whenever a later batch needs it again (parts are
//! immutable once they have their final name). Campaigns not
//! used for longest are dropped when the indexes together pass the memory budget.
//!
//! Two sent addresses with one 64-bit hash could give each other's events the wrong variant:
//! with 10M sent addresses in one campaign the chance that any such pair exists is about 3 in
//! a million; it costs an event's variant, never a send decision.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use broadside_pipeline::run::campaign_runs;
use broadside_pipeline::store::StoreLayout;
use xxhash_rust::xxh3::xxh3_64;

use crate::columns::{opt, read_columns};
use crate::error::{Error, Result};
use crate::suppression::normalize_email;

/// Default memory budget of the indexes of one process (bytes).
pub const DEFAULT_BUDGET_BYTES: usize = 512 << 20;

/// One sent address of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    hash: u64,
    run: u32,
    variant: u32,
}

/// A run of the campaign, as the index knows it.
#[derive(Debug)]
struct RunRef {
    run_id: String,
    /// The run's start (µs since the epoch); `i64::MIN` when its record is missing.
    started_us: i64,
}

/// The sent addresses of one campaign.
#[derive(Debug, Default)]
struct CampaignIndex {
    /// Ledger parts already read.
    parts: BTreeSet<PathBuf>,
    runs: Vec<RunRef>,
    variants: Vec<String>,
    /// Sorted by hash (then run).
    entries: Vec<Entry>,
    /// `dir[b]` is the first entry whose hash's top `bits` bits are `b` or more (one more
    /// slot at the end): a lookup reads one slot pair and about one entry, two cache misses,
    /// where a binary search over 10M entries took over 20.
    dir: Vec<u32>,
    bits: u32,
    /// When it was last used (the cache's clock).
    used: u64,
}

impl CampaignIndex {
    fn bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.dir.capacity() * std::mem::size_of::<u32>()
    }

    /// Rebuilds [`CampaignIndex::dir`] over the sorted entries: about one entry per bucket.
    fn index_buckets(&mut self) {
        let n = self.entries.len().max(2);
        self.bits = (usize::BITS - (n - 1).leading_zeros()).clamp(1, 28);
        let buckets = 1usize << self.bits;
        self.dir.clear();
        self.dir.reserve_exact(buckets + 1);
        let mut at = 0usize;
        for b in 0..buckets {
            while at < self.entries.len()
                && ((self.entries[at].hash >> (64 - self.bits)) as usize) < b
            {
                at += 1;
            }
            self.dir.push(at as u32);
        }
        self.dir.push(self.entries.len() as u32);
    }

    fn run_index(&mut self, run_id: &str) -> u32 {
        match self.runs.iter().position(|r| r.run_id == run_id) {
            Some(i) => i as u32,
            None => {
                self.runs.push(RunRef {
                    run_id: run_id.to_string(),
                    started_us: i64::MIN,
                });
                (self.runs.len() - 1) as u32
            }
        }
    }

    fn variant_index(&mut self, v: &str) -> u32 {
        match self.variants.iter().position(|x| x == v) {
            Some(i) => i as u32,
            None => {
                self.variants.push(v.to_string());
                (self.variants.len() - 1) as u32
            }
        }
    }

    /// The (run, variant) an event of `email` gets: its own run's entry when it names a run,
    /// else the latest run started at or before `ts_us`, else the earliest.
    fn lookup(&self, email: &str, run_id: Option<&str>, ts_us: i64) -> Option<(&str, &str)> {
        let h = xxh3_64(email.as_bytes());
        let b = (h >> (64 - self.bits)) as usize;
        let (from, to) = (self.dir[b] as usize, self.dir[b + 1] as usize);
        let bucket = &self.entries[from..to];
        let first = bucket.partition_point(|e| e.hash < h);
        let hits = &bucket[first..first + bucket[first..].partition_point(|e| e.hash == h)];
        let pick = match run_id {
            Some(r) => hits
                .iter()
                .find(|e| self.runs[e.run as usize].run_id == r)?,
            None => {
                let start = |e: &Entry| self.runs[e.run as usize].started_us;
                hits.iter()
                    .filter(|e| start(e) <= ts_us)
                    .max_by_key(|e| start(e))
                    .or_else(|| hits.iter().min_by_key(|e| start(e)))?
            }
        };
        Some((
            &self.runs[pick.run as usize].run_id,
            &self.variants[pick.variant as usize],
        ))
    }
}

#[derive(Default)]
struct Cache {
    campaigns: HashMap<(String, String), CampaignIndex>,
    clock: u64,
}

/// Fills `variant` and `run_id` of events from the ledger; see the module docs. One per
/// process, shared by its writers.
pub struct Attribution {
    store: StoreLayout,
    budget: usize,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Attribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attribution")
            .field("store", &self.store.root())
            .field("budget", &self.budget)
            .finish()
    }
}

impl Attribution {
    /// Attribution from the ledger of the store at `store`, with the default budget.
    pub fn new(store: &Path) -> Arc<Attribution> {
        Self::with_budget(store, DEFAULT_BUDGET_BYTES)
    }

    /// Attribution with a memory budget for its indexes.
    pub fn with_budget(store: &Path, budget: usize) -> Arc<Attribution> {
        Arc::new(Attribution {
            store: StoreLayout::new(store),
            budget,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Fills the missing `variant` and `run_id` of the events in `batch` (of
    /// [`broadside_pipeline::event::file_schema`]), all of workspace `workspace`. Returns the
    /// batch (unchanged when nothing needed or got attribution) and how many rows got a value.
    pub fn apply(&self, workspace: &str, batch: RecordBatch) -> Result<(RecordBatch, u64)> {
        let col = |name: &str| -> Result<&StringArray> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| {
                    Error::state(
                        self.store.root(),
                        format!("event batch has no utf8 `{name}` column"),
                    )
                })
        };
        let (campaign, variant, run, email, etype) = (
            col("campaign_id")?,
            col("variant")?,
            col("run_id")?,
            col("email")?,
            col("event_type")?,
        );
        let ts = batch
            .column_by_name("ts")
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| Error::state(self.store.root(), "event batch has no `ts` column"))?;
        let wants = |i: usize| {
            (variant.is_null(i) || run.is_null(i))
                && !campaign.is_null(i)
                && !campaign.value(i).is_empty()
                && !email.is_null(i)
                && etype.value(i) != "submitted"
        };
        // The batch's distinct campaigns (a handful; consecutive rows mostly share one).
        let mut seen: std::collections::HashSet<&str> = Default::default();
        let mut campaigns: Vec<&str> = Vec::new();
        for i in (0..batch.num_rows()).filter(|&i| wants(i)) {
            let c = campaign.value(i);
            if campaigns.last() != Some(&c) && seen.insert(c) {
                campaigns.push(c);
            }
        }
        if campaigns.is_empty() {
            return Ok((batch, 0));
        }
        campaigns.sort_unstable();

        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let protect = cache.clock + 1;
        for c in &campaigns {
            self.refresh(&mut cache, workspace, c, protect)?;
        }
        let indexes: Vec<Option<&CampaignIndex>> = campaigns
            .iter()
            .map(|c| cache.campaigns.get(&(workspace.to_string(), c.to_string())))
            .collect();
        let mut new_variant: Vec<Option<&str>> = Vec::with_capacity(batch.num_rows());
        let mut new_run: Vec<Option<&str>> = Vec::with_capacity(batch.num_rows());
        let mut filled = 0u64;
        for i in 0..batch.num_rows() {
            let (own_variant, own_run) = (opt(variant, i), opt(run, i));
            let mut got = None;
            if wants(i) {
                let at = campaigns
                    .binary_search(&campaign.value(i))
                    .expect("every wanted campaign is listed");
                if let Some(idx) = indexes[at].filter(|x| !x.entries.is_empty()) {
                    let key = normalize_email(email.value(i));
                    got = idx.lookup(&key, own_run, ts.value(i));
                }
            }
            match got {
                Some((r, v)) => {
                    filled += 1;
                    new_variant.push(own_variant.or(Some(v)));
                    new_run.push(own_run.or(Some(r)));
                }
                None => {
                    new_variant.push(own_variant);
                    new_run.push(own_run);
                }
            }
        }
        if filled == 0 {
            return Ok((batch, 0));
        }
        let schema = batch.schema();
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        let vi = schema.index_of("variant").expect("checked above");
        let ri = schema.index_of("run_id").expect("checked above");
        cols[vi] = Arc::new(StringArray::from(new_variant));
        cols[ri] = Arc::new(StringArray::from(new_run));
        let out = RecordBatch::try_new(schema, cols)
            .map_err(|e| Error::state(self.store.root(), format!("attributed event batch: {e}")))?;
        Ok((out, filled))
    }

    /// Brings the index of one campaign up to date with its ledger parts, and evicts the
    /// campaigns used least recently while the indexes exceed the budget (never one used at
    /// or after clock `protect`: those of the batch being attributed).
    fn refresh(
        &self,
        cache: &mut Cache,
        workspace: &str,
        campaign: &str,
        protect: u64,
    ) -> Result<()> {
        cache.clock += 1;
        let clock = cache.clock;
        let k = (workspace.to_string(), campaign.to_string());
        let idx = cache.campaigns.entry(k).or_default();
        idx.used = clock;
        let parts = ledger_parts(&self.store, workspace, campaign)?;
        let fresh: Vec<(String, PathBuf)> = parts
            .into_iter()
            .filter(|(_, p)| !idx.parts.contains(p))
            .collect();
        if !fresh.is_empty() {
            if fresh
                .iter()
                .any(|(r, _)| !idx.runs.iter().any(|x| &x.run_id == r))
            {
                for rec in campaign_runs(&self.store.runs_dir(workspace), campaign)
                    .map_err(|e| Error::state(self.store.runs_dir(workspace), e.to_string()))?
                {
                    let i = idx.run_index(&rec.run_id) as usize;
                    idx.runs[i].started_us = rec.started_at.timestamp_micros();
                }
            }
            for (run_id, path) in fresh {
                let run = idx.run_index(&run_id);
                read_part(&path, run, idx)?;
                idx.parts.insert(path);
            }
            idx.entries.sort_unstable();
            idx.index_buckets();
            tracing::debug!(
                workspace,
                campaign,
                addresses = idx.entries.len(),
                "attribution index loaded from the ledger"
            );
        }
        // Evict least recently used campaigns (never the one just refreshed) over budget.
        loop {
            let total: usize = cache.campaigns.values().map(CampaignIndex::bytes).sum();
            if total <= self.budget {
                break;
            }
            let victim = cache
                .campaigns
                .iter()
                .filter(|(_, v)| v.used < protect)
                .min_by_key(|(_, v)| v.used)
                .map(|(key, _)| key.clone());
            match victim {
                Some(v) => {
                    cache.campaigns.remove(&v);
                }
                None => break,
            }
        }
        Ok(())
    }
}

/// The committed ledger parts of a campaign: (run id, part file), in name order.
fn ledger_parts(
    store: &StoreLayout,
    workspace: &str,
    campaign: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let dir = store.campaign_log_dir(workspace, campaign);
    let mut out = Vec::new();
    let runs = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    for r in runs {
        let r = r.map_err(|e| Error::io(&dir, e))?;
        let name = r.file_name().to_string_lossy().into_owned();
        let Some(run_id) = name.strip_prefix("run_id=") else {
            continue;
        };
        let rd = std::fs::read_dir(r.path()).map_err(|e| Error::io(r.path(), e))?;
        for p in rd {
            let p = p.map_err(|e| Error::io(r.path(), e))?.path();
            let part = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"));
            if part && p.extension().is_some_and(|x| x == "parquet") {
                out.push((run_id.to_string(), p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Adds the sent rows of one ledger part to the index.
fn read_part(path: &Path, run: u32, idx: &mut CampaignIndex) -> Result<()> {
    read_columns(path, &["key", "variant", "decision"], "", |c, _| {
        let (keys, variants, decisions) = (c[0], c[1], c[2]);
        for i in 0..keys.len() {
            if decisions.is_null(i)
                || decisions.value(i) != "sent"
                || keys.is_null(i)
                || variants.is_null(i)
            {
                continue;
            }
            let variant = idx.variant_index(variants.value(i));
            idx.entries.push(Entry {
                hash: xxh3_64(keys.value(i).as_bytes()),
                run,
                variant,
            });
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket directory finds exactly what a scan of all entries finds, for addresses
    /// present (in one or several runs) and absent, at sizes around bucket-count boundaries.
    #[test]
    fn bucket_lookup_equals_a_full_scan() {
        for n in [1usize, 2, 3, 7, 64, 1000, 4097] {
            let mut idx = CampaignIndex::default();
            let (r1, r2) = (idx.run_index("r1"), idx.run_index("r2"));
            idx.runs[r1 as usize].started_us = 10;
            idx.runs[r2 as usize].started_us = 20;
            let (a, b) = (idx.variant_index("A"), idx.variant_index("B"));
            for i in 0..n {
                let hash = xxh3_64(format!("k{i}@x.io").as_bytes());
                idx.entries.push(Entry {
                    hash,
                    run: r1,
                    variant: if i % 2 == 0 { a } else { b },
                });
                if i % 3 == 0 {
                    idx.entries.push(Entry {
                        hash,
                        run: r2,
                        variant: a,
                    });
                }
            }
            idx.entries.sort_unstable();
            idx.index_buckets();
            for i in 0..n + 50 {
                let key = format!("k{i}@x.io");
                let h = xxh3_64(key.as_bytes());
                let scan: Vec<&Entry> = idx.entries.iter().filter(|e| e.hash == h).collect();
                let want_late = scan
                    .iter()
                    .max_by_key(|e| idx.runs[e.run as usize].started_us)
                    .map(|e| {
                        (
                            idx.runs[e.run as usize].run_id.as_str(),
                            idx.variants[e.variant as usize].as_str(),
                        )
                    });
                assert_eq!(idx.lookup(&key, None, 25), want_late, "n={n} {key}");
                let want_r1 = scan
                    .iter()
                    .find(|e| e.run == r1)
                    .map(|e| ("r1", idx.variants[e.variant as usize].as_str()));
                assert_eq!(idx.lookup(&key, Some("r1"), 25), want_r1, "n={n} {key}");
                // before every run: the earliest
                assert_eq!(idx.lookup(&key, None, 0), want_r1, "n={n} {key}");
            }
        }
    }
}
