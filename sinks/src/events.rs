//! `submitted` events for sent recipients, in the shared event schema, so analytics sees sends.
//!
//! They go to `<store>/events/workspace_id=<w>/date=<run start date>/submitted-<run>-NNNNN.parquet`,
//! parted like the recipient log (by input row range), and carry the run's start time, so the
//! partition date always matches the event time and a resumed run rewrites nothing.

use std::fmt::Write as _;
use std::path::Path;

use broadside_pipeline::event::{file_schema, partition_dir, EventBatchBuilder, EventType};
use broadside_pipeline::model::{Decision, RecipientBatch};
use broadside_pipeline::runner::Sink;
use broadside_pipeline::{Error, Result};
use chrono::{DateTime, Utc};

use crate::ledger::writer_properties;
use crate::parts::PartWriter;

/// Writes the `submitted` events of one run.
pub struct SubmittedEventSink {
    parts: PartWriter,
    part_rows: u64,
    run_id: String,
    campaign_id: String,
    variants: Vec<String>,
    ts_micros: i64,
}

impl SubmittedEventSink {
    /// A sink for one run started at `started_at`.
    pub fn new(
        store: &Path,
        workspace_id: &str,
        campaign_id: &str,
        run_id: &str,
        variants: Vec<String>,
        started_at: DateTime<Utc>,
        part_rows: u64,
    ) -> Result<Self> {
        let dir = partition_dir(store, workspace_id, started_at.date_naive());
        Ok(SubmittedEventSink {
            parts: PartWriter::new(
                &dir,
                format!("submitted-{run_id}"),
                file_schema(),
                writer_properties(&["event_id", "email"], &["ts"]),
            )?,
            part_rows,
            run_id: run_id.into(),
            campaign_id: campaign_id.into(),
            variants,
            ts_micros: started_at.timestamp_micros(),
        })
    }
}

impl Sink for SubmittedEventSink {
    fn name(&self) -> &'static str {
        "events"
    }

    fn write(&mut self, b: &RecipientBatch) -> Result<()> {
        let SubmittedEventSink {
            parts,
            part_rows,
            run_id,
            campaign_id,
            variants,
            ts_micros,
        } = self;
        let mut builder = EventBatchBuilder::new();
        let mut id = String::new();
        parts.write_input_rows(b.first_row, b.len(), *part_rows, |start, end| {
            for i in start..end {
                if b.decisions[i] != Decision::Sent {
                    continue;
                }
                let Some(email) = b.key(i) else { continue };
                id.clear();
                // Unique across runs (run ids are unique) and stable across resumes.
                let _ = write!(id, "sub-{run_id}-{}", b.first_row + i as u64);
                builder.push_parts(
                    &id,
                    campaign_id,
                    variants.get(b.variants[i] as usize).map(String::as_str),
                    Some(run_id),
                    email,
                    EventType::Submitted,
                    None,
                    None,
                    *ts_micros,
                );
            }
            builder
                .finish()
                .map_err(|e| Error::sink("submitted events", e.to_string()))
        })
    }

    fn finish(&mut self) -> Result<()> {
        self.parts.close_part()
    }

    fn abort(&mut self) {
        self.parts.abort();
    }
}
