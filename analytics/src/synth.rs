//! Deterministic synthetic events in the stored schema, for tests and the analytics benchmark.
//!
//! Event `i` of a spec is a pure function of `(seed, i)`: the tests recompute the expected
//! answers from the same events by brute force, and the benchmark writes 100 million of them.
//! Events are spread evenly over `days` days (event `i` falls on day `i / per_day`), so a
//! partition is written in one pass; within a day, times, campaigns, variants, recipients and
//! types are hashed. Addresses repeat (unique counts matter) and vary in case (uniques are
//! case-insensitive).

use std::fs::File;
use std::path::Path;

use broadside_pipeline::event::{partition_dir, BounceType, Event, EventBatchBuilder, EventType};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::error::{Error, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct EventSpec {
    /// Workspace of every event.
    pub workspace_id: String,
    /// Campaigns `c000`, `c001`, ….
    pub campaigns: usize,
    /// Distinct recipients per campaign.
    pub recipients: u64,
    /// First day.
    pub start: NaiveDate,
    /// Days covered.
    pub days: u32,
    /// Events in total.
    pub events: u64,
    /// Seed.
    pub seed: u64,
}

impl EventSpec {
    fn per_day(&self) -> u64 {
        self.events.div_ceil(self.days as u64).max(1)
    }

    /// The `i`-th event.
    pub fn event(&self, i: u64) -> Event {
        let h = |k: u64| xxh3_64_with_seed(&i.to_le_bytes(), self.seed ^ k);
        let day = (i / self.per_day()).min(self.days as u64 - 1);
        let secs = h(1) % 86_400;
        let ts = self.start.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
            + Duration::days(day as i64)
            + Duration::seconds(secs as i64);
        let campaign = h(2) % self.campaigns as u64;
        let r = h(3) % self.recipients;
        let variant = match h(4) % 20 {
            0 => None,
            v if v % 2 == 0 => Some("A".to_string()),
            _ => Some("B".to_string()),
        };
        let kind = h(5) % 100;
        let (event_type, bounce_type) = match kind {
            0..=29 => (EventType::Submitted, None),
            30..=56 => (EventType::Delivered, None),
            57..=76 => (EventType::Opened, None),
            77..=86 => (EventType::Clicked, None),
            87..=89 => (EventType::Bounced, Some(BounceType::Hard)),
            90..=92 => (EventType::Bounced, Some(BounceType::Soft)),
            93 => (EventType::Bounced, None),
            94..=97 => (EventType::Unsubscribed, None),
            _ => (EventType::Complained, None),
        };
        let email = if h(6) % 7 == 0 {
            format!("User{r}@Example.com")
        } else {
            format!("user{r}@example.com")
        };
        Event {
            event_id: format!("ev-{}-{i}", self.seed),
            workspace_id: self.workspace_id.clone(),
            campaign_id: format!("c{campaign:03}"),
            variant,
            run_id: Some(format!("run-{campaign:03}")),
            email,
            event_type,
            bounce_type,
            url: (event_type == EventType::Clicked)
                .then(|| format!("https://example.com/{}", h(7) % 5)),
            ts,
        }
    }

    /// Every event (for small specs).
    pub fn all(&self) -> Vec<Event> {
        (0..self.events).map(|i| self.event(i)).collect()
    }

    /// Writes events `range` of day `day` to one file per call, named `synth-<seed>-<first>.parquet`.
    fn write_day(&self, store: &Path, day: u32, row_group_rows: usize) -> Result<u64> {
        let per_day = self.per_day();
        let first = day as u64 * per_day;
        let last = ((day as u64 + 1) * per_day).min(self.events);
        if first >= last {
            return Ok(0);
        }
        let date = self.start + Duration::days(day as i64);
        let dir = partition_dir(store, &self.workspace_id, date);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("synth-{}-{first:012}.parquet", self.seed));
        let tmp = path.with_extension("tmp");
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
            .set_max_row_group_row_count(Some(row_group_rows))
            .build();
        let mut w =
            ArrowWriter::try_new(file, broadside_pipeline::event::file_schema(), Some(props))
                .map_err(|e| Error::parquet(&tmp, e))?;
        let mut b = EventBatchBuilder::new();
        for i in first..last {
            b.push(&self.event(i));
            if b.len() == 8192 {
                w.write(&b.finish()?).map_err(|e| Error::parquet(&tmp, e))?;
            }
        }
        if !b.is_empty() {
            w.write(&b.finish()?).map_err(|e| Error::parquet(&tmp, e))?;
        }
        w.close().map_err(|e| Error::parquet(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(last - first)
    }

    /// Writes the whole spec into a store, one file per day, on `threads` threads.
    pub fn write(&self, store: &Path, threads: usize, row_group_rows: usize) -> Result<u64> {
        let next = std::sync::atomic::AtomicU32::new(0);
        let total = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let d = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if d >= self.days {
                                return Ok(());
                            }
                            let n = self.write_day(store, d, row_group_rows)?;
                            total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("generator thread")?;
            }
            Ok(())
        })?;
        Ok(total.into_inner())
    }

    /// The end of the generated range (exclusive).
    pub fn end(&self) -> DateTime<Utc> {
        (self.start + Duration::days(self.days as i64))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
    }
}
