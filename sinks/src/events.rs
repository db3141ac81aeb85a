//! `submitted` events for sent recipients, in the shared event schema, so analytics sees sends.
//!
//! They go to `<store>/events/workspace_id=<w>/date=<run start date>/submitted-<run>-NNNNN.parquet`,
//! parted like the recipient log (by input row range), and carry the run's start time, so the
//! partition date always matches the event time and a resumed run rewrites nothing.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{
    Array, ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array,
};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_schema::SchemaRef;
use arrow_select::take::take;

use broadside_pipeline::event::{file_schema, partition_dir, EventType};
use broadside_pipeline::model::{Decision, RecipientBatch};
use broadside_pipeline::runner::Sink;
use broadside_pipeline::{Error, Result};
use chrono::{DateTime, Utc};

use crate::ledger::writer_properties;
use crate::parts::{Own, Packed, PartWriter};
use crate::text::sent_keys_packed;

/// Writes the `submitted` events of one run.
pub struct SubmittedEventSink {
    parts: PartWriter,
    part_rows: u64,
    run_id: String,
    /// One-value dictionaries of the constant columns.
    campaign: ArrayRef,
    run: ArrayRef,
    event_type: ArrayRef,
    /// Dictionary of the variant column (variant names in index order).
    variants: ArrayRef,
    batch_schema: SchemaRef,
    ts_micros: i64,
    /// Index of the `email` column, where packed keys go.
    email_column: usize,
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
        let parts = PartWriter::new(
            &dir,
            broadside_pipeline::event::submitted_file_stem(run_id),
            file_schema(),
            writer_properties(&["event_id", "email"], &["ts"]),
            &[
                ("event_id", Own::DeltaStrings),
                ("campaign_id", Own::Dictionary),
                ("variant", Own::Dictionary),
                ("run_id", Own::Dictionary),
                ("event_type", Own::Dictionary),
                ("email", Own::Text),
            ],
        )?;
        let one = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v])) };
        let batch_schema = parts.batch_schema();
        Ok(SubmittedEventSink {
            email_column: batch_schema
                .index_of("email")
                .map_err(|e| Error::sink("submitted events", e.to_string()))?,
            batch_schema,
            parts,
            part_rows,
            run_id: run_id.into(),
            campaign: one(campaign_id),
            run: one(run_id),
            event_type: one(EventType::Submitted.as_str()),
            variants: Arc::new(StringArray::from(variants)),
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
            campaign,
            run,
            event_type,
            variants,
            batch_schema,
            ts_micros,
            email_column,
        } = self;
        let Some(keys) = b.keys.as_ref() else {
            return Ok(());
        };
        let packed = sent_keys_packed(b);
        parts.write_input_rows(b.first_row, b.len(), *part_rows, |start, end| {
            // Columns are built whole: the emails are the packed keys' page, or else a `take`
            // of the key column; ids are written without the formatting machinery; the
            // variant and the constants are dictionary keys (the part writer encodes them
            // from the keys).
            let whole = packed.filter(|_| (start, end) == (0, b.len()));
            let sent: Vec<u32> = match whole {
                Some(p) => p.rows.clone(),
                None => (start..end)
                    .filter(|&i| b.decisions[i] == Decision::Sent && keys.is_valid(i))
                    .map(|i| i as u32)
                    .collect(),
            };
            let n = sent.len();
            let email: ArrayRef = match whole {
                // Placeholders (empty strings): the page holds every row's email.
                Some(_) => Arc::new(StringArray::new(
                    OffsetBuffer::new_zeroed(n),
                    Buffer::from_vec(Vec::<u8>::new()),
                    None,
                )),
                None => take(keys, &UInt32Array::from(sent.clone()), None)
                    .map_err(|e| Error::sink("submitted events", e.to_string()))?,
            };
            let packed = whole.map(|keys| Packed {
                column: *email_column,
                keys,
            });
            let prefix = format!("sub-{run_id}-");
            let mut ids = StringBuilder::with_capacity(n, n * (prefix.len() + 10));
            let mut digits = itoa_buf();
            for &i in &sent {
                ids.write_str(&prefix).expect("in-memory write");
                ids.write_str(format_u64(b.first_row + i as u64, &mut digits))
                    .expect("in-memory write");
                ids.append_value("");
            }
            let variant = Int32Array::from_iter(sent.iter().map(|&i| {
                let v = b.variants[i as usize] as usize;
                (v < variants.len()).then_some(v as i32)
            }));
            let variant = DictionaryArray::<Int32Type>::new(variant, variants.clone());
            let constant = |values: &ArrayRef| -> ArrayRef {
                Arc::new(DictionaryArray::<Int32Type>::new(
                    Int32Array::from(vec![0; n]),
                    values.clone(),
                ))
            };
            RecordBatch::try_new(
                batch_schema.clone(),
                vec![
                    Arc::new(ids.finish()),
                    constant(campaign),
                    Arc::new(variant),
                    constant(run),
                    email,
                    constant(event_type),
                    Arc::new(StringArray::new_null(n)),
                    Arc::new(StringArray::new_null(n)),
                    Arc::new(
                        TimestampMicrosecondArray::from(vec![*ts_micros; n]).with_timezone("UTC"),
                    ),
                ],
            )
            .map(|batch| (batch, packed))
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
    // SAFETY: the bytes from `i` on were all written above as ASCII digits.
    unsafe { std::str::from_utf8_unchecked(&buf[i..]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_u64_matches_display() {
        let mut b = itoa_buf();
        for v in [0, 7, 10, 99, 1_234_567, u64::MAX] {
            assert_eq!(format_u64(v, &mut b), v.to_string());
        }
    }
}
