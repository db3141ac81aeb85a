//! The recipient log: one Parquet row per input recipient with its decision and where it went.

use std::path::Path;
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, HOLDOUT_VARIANT, NO_VARIANT};
use broadside_pipeline::runner::Sink;
use broadside_pipeline::{Error, Result};
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::parts::{Own, PartWriter};

/// Arrow schema of recipient-log files (defined with the store layout, which analytics reads).
pub use broadside_pipeline::store::ledger_schema as schema;

/// Writer properties shared by the ledger and event parts: LZ4 (the send path writes these at
/// millions of rows per second; zstd cost ~10 % of the whole send), bounded row groups, no
/// dictionary for high-cardinality strings.
/// `delta` names integer columns (row numbers, timestamps) stored delta-encoded instead of
/// through a dictionary, which would hash every value for nothing. Low-cardinality string
/// columns are not encoded by parquet-rs at all: the part writer builds them from their
/// dictionary keys (see [`crate::coded`]), with statistics from the dictionary entries used.
pub fn writer_properties(no_dictionary: &[&str], delta: &[&str]) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_max_row_group_row_count(Some(256 * 1024));
    for c in no_dictionary {
        // Unique, unsorted strings: a dictionary never pays off and min/max statistics
        // cannot prune anything, while both cost a hash or a compare per value.
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(*c), false)
            .set_column_statistics_enabled(ColumnPath::from(*c), EnabledStatistics::None);
    }
    for c in delta {
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(*c), false)
            .set_column_encoding(ColumnPath::from(*c), Encoding::DELTA_BINARY_PACKED);
    }
    b.build()
}

/// A dictionary column of `n` rows whose row `i` is `values[key(i)]`, or null. The keys and
/// their validity are built as two whole buffers rather than pushed row by row.
fn coded(n: usize, key: impl Fn(usize) -> Option<i32>, values: Vec<&str>) -> ArrayRef {
    let keys = Int32Array::new(
        (0..n).map(|i| key(i).unwrap_or(0)).collect(),
        nulls(n, |i| key(i).is_some()),
    );
    Arc::new(DictionaryArray::<Int32Type>::new(
        keys,
        Arc::new(StringArray::from(values)),
    ))
}

/// The validity buffer of `n` rows, or none when every row is valid.
fn nulls(n: usize, valid: impl FnMut(usize) -> bool) -> Option<NullBuffer> {
    Some(NullBuffer::new(BooleanBuffer::collect_bool(n, valid))).filter(|b| b.null_count() > 0)
}

/// Writes a run's recipient log under `<store>/recipient_logs/.../run_id=<r>/part-NNNNN.parquet`.
pub struct RecipientLogSink {
    parts: PartWriter,
    part_rows: u64,
    variants: Vec<String>,
    lists: Vec<String>,
}

impl RecipientLogSink {
    /// A sink for one run; `dir` is the run's hive folder (workspace, campaign and run are its
    /// partition values, not file columns); `lists` names the suppression lists by id.
    pub fn new(
        dir: &Path,
        part_rows: u64,
        variants: Vec<String>,
        lists: Vec<String>,
    ) -> Result<Self> {
        Ok(RecipientLogSink {
            parts: PartWriter::new(
                dir,
                "part",
                schema(),
                writer_properties(&["key", "detail"], &["row", "ifur_line"]),
                &[
                    ("key", Own::Text),
                    ("variant", Own::Dictionary),
                    ("decision", Own::Dictionary),
                    ("reason", Own::Dictionary),
                    ("suppression_list", Own::Dictionary),
                    ("ifur_file", Own::Dictionary),
                    ("mail_state", Own::Dictionary),
                ],
            )?,
            part_rows,
            variants,
            lists,
        })
    }

    /// Builds the log rows of one whole batch.
    pub fn log_batch(&self, b: &RecipientBatch) -> Result<RecordBatch> {
        let n = b.len();
        let rows = UInt64Array::from_iter_values((0..n as u64).map(|i| b.first_row + i));
        let keys: ArrayRef = match &b.keys {
            Some(k) => Arc::new(k.clone()),
            None => Arc::new(StringArray::new_null(n)),
        };
        let variant = coded(
            n,
            |i| {
                let (v, d) = (b.variants[i], b.decisions[i]);
                (d == Decision::Sent && v != NO_VARIANT && v != HOLDOUT_VARIANT).then_some(v as i32)
            },
            self.variants.iter().map(String::as_str).collect(),
        );
        let decision = coded(
            n,
            |i| Some(b.decisions[i] as i32),
            Decision::ALL.iter().map(|d| d.as_str()).collect(),
        );
        let reason = coded(
            n,
            |i| (b.reasons[i] != Reason::None).then_some(b.reasons[i] as i32),
            Reason::ALL.iter().map(|r| r.as_str()).collect(),
        );
        // Details are sparse (a few rows per batch): all-null unless there are some.
        let detail = if b.details.is_empty() {
            StringArray::new_null(n)
        } else {
            (0..n).map(|i| b.detail(i)).collect()
        };
        let list = coded(
            n,
            |i| {
                (b.decisions[i] == Decision::Suppressed)
                    .then(|| b.lists.get(i).copied())
                    .flatten()
                    .filter(|l| (*l as usize) < self.lists.len())
                    .map(|l| l as i32)
            },
            self.lists.iter().map(String::as_str).collect(),
        );
        let placed = |i: usize| b.placement_file.get(i).is_some_and(|f| *f != u32::MAX);
        let file = coded(
            n,
            |i| placed(i).then(|| b.placement_file[i] as i32),
            b.placement_files.iter().map(|s| &**s).collect(),
        );
        let line = UInt32Array::new(
            (0..n)
                .map(|i| if placed(i) { b.placement_line[i] } else { 0 })
                .collect(),
            nulls(n, placed),
        );
        let mail_state: ArrayRef = if b.mail_states.is_empty() {
            arrow_array::new_null_array(&broadside_pipeline::store::dictionary_utf8(), n)
        } else {
            Arc::new(
                b.mail_states
                    .iter()
                    .copied()
                    .collect::<DictionaryArray<Int32Type>>(),
            )
        };
        let printer_id = if b.printer_ids.is_empty() {
            StringArray::new_null(n)
        } else {
            (0..n)
                .map(|i| b.printer_ids.get(i).and_then(|p| p.as_deref()))
                .collect()
        };
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(rows),
                keys,
                variant,
                decision,
                reason,
                Arc::new(detail),
                list,
                file,
                Arc::new(line),
                mail_state,
                Arc::new(printer_id),
            ],
        )
        .map_err(|e| Error::sink("recipient log", e.to_string()))
    }
}

impl Sink for RecipientLogSink {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn write(&mut self, b: &RecipientBatch) -> Result<()> {
        let log = self.log_batch(b)?;
        self.parts
            .write_input_rows(b.first_row, b.len(), self.part_rows, |start, end| {
                Ok(log.slice(start, end - start))
            })
    }

    fn finish(&mut self) -> Result<()> {
        self.parts.close_part()
    }

    fn abort(&mut self) {
        self.parts.abort();
    }
}
