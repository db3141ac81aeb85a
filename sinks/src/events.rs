//! `submitted` events for sent recipients, in the shared event schema, so analytics sees sends.
//!
//! They go to `<store>/events/workspace_id=<w>/date=<run start date>/submitted-<run>-NNNNN.parquet`,
//! parted like the recipient log (by input row range), and carry the run's start time, so the
//! partition date always matches the event time and a resumed run rewrites nothing.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{
    Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow_select::take::take;

use broadside_pipeline::event::{file_schema, partition_dir, EventType};
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
                writer_properties(&["event_id", "email"], &["ts"], &[]),
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
        let Some(keys) = b.keys.as_ref() else {
            return Ok(());
        };
        parts.write_input_rows(b.first_row, b.len(), *part_rows, |start, end| {
            // Columns are built whole: the emails are a `take` of the key column, constants
            // are repeated, ids are written without the formatting machinery.
            let sent: Vec<u32> = (start..end)
                .filter(|&i| b.decisions[i] == Decision::Sent && keys.is_valid(i))
                .map(|i| i as u32)
                .collect();
            let n = sent.len();
            let email = take(keys, &UInt32Array::from(sent.clone()), None)
                .map_err(|e| Error::sink("submitted events", e.to_string()))?;
            let prefix = format!("sub-{run_id}-");
            let mut ids = StringBuilder::with_capacity(n, n * (prefix.len() + 10));
            let mut digits = itoa_buf();
            for &i in &sent {
                ids.write_str(&prefix).expect("in-memory write");
                ids.write_str(format_u64(b.first_row + i as u64, &mut digits))
                    .expect("in-memory write");
                ids.append_value("");
            }
            let variant: StringArray = sent
                .iter()
                .map(|&i| {
                    variants
                        .get(b.variants[i as usize] as usize)
                        .map(String::as_str)
                })
                .collect();
            let repeat = |v: &str| -> ArrayRef { Arc::new(repeated(v, n)) };
            RecordBatch::try_new(
                file_schema(),
                vec![
                    Arc::new(ids.finish()),
                    repeat(campaign_id),
                    Arc::new(variant),
                    repeat(run_id),
                    email,
                    repeat(EventType::Submitted.as_str()),
                    Arc::new(StringArray::new_null(n)),
                    Arc::new(StringArray::new_null(n)),
                    Arc::new(
                        TimestampMicrosecondArray::from(vec![*ts_micros; n]).with_timezone("UTC"),
                    ),
                ],
            )
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

/// `n` copies of `v`: the bytes by doubling copies, the offsets by arithmetic (instead of a
/// copy and a capacity check per value).
fn repeated(v: &str, n: usize) -> StringArray {
    let len = i32::try_from(v.len()).expect("short constant");
    let offsets = OffsetBuffer::new(ScalarBuffer::from_iter((0..=n as i32).map(|i| i * len)));
    StringArray::new(offsets, Buffer::from_vec(v.as_bytes().repeat(n)), None)
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// Formats `v` in decimal into `buf` (u64 has at most 20 digits).
fn format_u64(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_is_n_copies() {
        for n in [0, 1, 5] {
            let a = repeated("camp-1", n);
            assert_eq!(a.len(), n);
            assert!(a.iter().all(|v| v == Some("camp-1")));
        }
        assert_eq!(repeated("", 3).value(2), "");
    }

    #[test]
    fn format_u64_matches_display() {
        let mut b = itoa_buf();
        for v in [0, 7, 10, 99, 1_234_567, u64::MAX] {
            assert_eq!(format_u64(v, &mut b), v.to_string());
        }
    }
}
