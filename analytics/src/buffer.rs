//! Per-stream buffering: decoded rows grouped by hive partition, plus dead letters.
//!
//! A stream is one Kafka partition or one input file. Its buffer holds everything
//! consumed since the last commit, as Arrow batches of [`BATCH_ROWS`] rows, so memory
//! is columnar and bounded by the flush policy.

use std::time::Instant;

use arrow_array::RecordBatch;
use broadside_pipeline::event::EventBatchBuilder;
use chrono::NaiveDate;

use crate::decode::{decode_event, DeadLetterReason, EventRow};
use crate::error::Result;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Rows per Arrow batch handed to the Parquet writer.
pub const BATCH_ROWS: usize = 8192;

/// One record that could not be decoded, kept with its original bytes.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Kafka offset or 1-based line number.
    pub offset: i64,
    /// The record exactly as received.
    pub payload: Vec<u8>,
    /// Why it was rejected.
    pub reason: DeadLetterReason,
}

/// Rows of one `(workspace_id, date)` partition.
pub(crate) struct PartitionRows {
    pub(crate) workspace_id: String,
    pub(crate) date: NaiveDate,
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) rows: usize,
    builder: EventBatchBuilder,
}

impl PartitionRows {
    fn new(workspace_id: &str, date: NaiveDate) -> Self {
        PartitionRows {
            workspace_id: workspace_id.to_string(),
            date,
            batches: Vec::new(),
            rows: 0,
            builder: EventBatchBuilder::new(),
        }
    }

    fn push(&mut self, r: &EventRow<'_>) -> Result<()> {
        r.push_into(&mut self.builder);
        self.rows += 1;
        if self.builder.len() >= BATCH_ROWS {
            self.batches.push(self.builder.finish()?);
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<()> {
        if !self.builder.is_empty() {
            self.batches.push(self.builder.finish()?);
        }
        Ok(())
    }
}

/// Everything a commit writes: rows per partition and dead letters.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) partitions: Vec<PartitionRows>,
    pub(crate) dead: Vec<DeadLetter>,
}

/// Records consumed from one stream since its last commit.
#[derive(Default)]
pub(crate) struct StreamBuffer {
    pending: Pending,
    /// Index of the partition the last row went to: consecutive records usually share one.
    last: usize,
    /// The last row's UTC day number since the epoch and its date (consecutive records
    /// usually share a day; the calendar conversion is a few percent of decoding).
    last_day: Option<(i64, NaiveDate)>,
    /// Records consumed (good or dead).
    pub(crate) records: usize,
    /// Payload bytes consumed, the flush-by-size measure.
    pub(crate) bytes: usize,
    /// When the oldest buffered record arrived (flush-by-latency).
    pub(crate) first_at: Option<Instant>,
    /// When the newest buffered record arrived (idle flush).
    pub(crate) last_at: Option<Instant>,
}

impl StreamBuffer {
    /// Decodes one record and buffers its rows, or keeps it as a dead letter.
    pub(crate) fn push_record(&mut self, offset: i64, payload: &[u8], now: Instant) -> Result<()> {
        match decode_event(payload) {
            Ok(decoded) => {
                for r in decoded.rows() {
                    let day = r.ts_micros.div_euclid(MICROS_PER_DAY);
                    let date = match self.last_day {
                        Some((d, date)) if d == day => date,
                        _ => {
                            let date = r.date();
                            self.last_day = Some((day, date));
                            date
                        }
                    };
                    let idx = match self.pending.partitions.get(self.last) {
                        Some(p) if p.date == date && p.workspace_id == *r.workspace_id => self.last,
                        _ => match self
                            .pending
                            .partitions
                            .iter()
                            .position(|p| p.date == date && p.workspace_id == *r.workspace_id)
                        {
                            Some(i) => i,
                            None => {
                                self.pending
                                    .partitions
                                    .push(PartitionRows::new(&r.workspace_id, date));
                                self.pending.partitions.len() - 1
                            }
                        },
                    };
                    self.last = idx;
                    self.pending.partitions[idx].push(r)?;
                }
            }
            Err(reason) => self.pending.dead.push(DeadLetter {
                offset,
                payload: payload.to_vec(),
                reason,
            }),
        }
        self.records += 1;
        self.bytes += payload.len();
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
        Ok(())
    }

    /// True when nothing was consumed since the last take.
    pub(crate) fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Hands over the buffered rows (as sealed batches) and resets.
    pub(crate) fn take(&mut self) -> Result<Pending> {
        for p in &mut self.pending.partitions {
            p.seal()?;
        }
        let out = std::mem::take(&mut self.pending);
        *self = StreamBuffer::default();
        Ok(out)
    }

    /// Drops everything buffered (the records will be consumed again).
    pub(crate) fn discard(&mut self) {
        *self = StreamBuffer::default();
    }
}
