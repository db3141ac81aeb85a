//! The recipient log: one Parquet row per input recipient with its decision and where it went.

use std::path::Path;
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};
use arrow_select::take::take;
use broadside_pipeline::model::{
    Decision, PackedKeys, Reason, RecipientBatch, HOLDOUT_VARIANT, NO_VARIANT,
};
use broadside_pipeline::runner::Sink;
use broadside_pipeline::{Error, Result};
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::parts::{segments, Own, Packed, PartWriter};
use crate::text::sent_keys_packed;

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

/// A dictionary column whose row `j` is `values[key(order[j])]`, or null. The keys and
/// their validity are built as two whole buffers rather than pushed row by row.
fn coded(order: &[usize], key: impl Fn(usize) -> Option<i32>, values: Vec<&str>) -> ArrayRef {
    let keys = Int32Array::new(
        order.iter().map(|&i| key(i).unwrap_or(0)).collect(),
        nulls(order, |i| key(i).is_some()),
    );
    Arc::new(DictionaryArray::<Int32Type>::new(
        keys,
        Arc::new(StringArray::from(values)),
    ))
}

/// The validity buffer of rows `order`, or none when every row is valid.
fn nulls(order: &[usize], valid: impl Fn(usize) -> bool) -> Option<NullBuffer> {
    Some(NullBuffer::new(BooleanBuffer::collect_bool(
        order.len(),
        |j| valid(order[j]),
    )))
    .filter(|b| b.null_count() > 0)
}

/// Writes a run's recipient log under `<store>/recipient_logs/.../run_id=<r>/part-NNNNN.parquet`.
pub struct RecipientLogSink {
    parts: PartWriter,
    /// Index of the `key` column, where packed keys go.
    key_column: usize,
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
            key_column: schema()
                .index_of("key")
                .map_err(|e| Error::sink("recipient log", e.to_string()))?,
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

    /// Builds the log rows of one whole batch, in row order; or, with `packed` (keys packed
    /// for exactly the batch's sent rows, see [`sent_keys_packed`]), its sent rows first and
    /// then the others, each group in row order, with nulls in the key column where the
    /// packed page goes. The `row` column keeps each row's input position either way.
    pub fn log_batch(
        &self,
        b: &RecipientBatch,
        packed: Option<&PackedKeys>,
    ) -> Result<RecordBatch> {
        let n = b.len();
        let order: Vec<usize> = match packed {
            None => (0..n).collect(),
            Some(p) => {
                let mut order: Vec<usize> = Vec::with_capacity(n);
                order.extend(p.rows.iter().map(|&r| r as usize));
                order.extend((0..n).filter(|&i| b.decisions[i] != Decision::Sent));
                order
            }
        };
        if order.len() != n {
            // Packed rows that are not the sent ones would log some rows twice or not at all.
            return Err(Error::sink(
                "recipient log",
                format!(
                    "{} rows ordered for a batch of {n}: the packed keys are not its sent rows",
                    order.len()
                ),
            ));
        }
        let rows = UInt64Array::from_iter_values(order.iter().map(|&i| b.first_row + i as u64));
        let keys: ArrayRef = match (&b.keys, packed) {
            (Some(k), None) => Arc::new(k.clone()),
            (Some(k), Some(p)) => {
                let k_rows = p.rows.len();
                let rest = UInt32Array::from_iter(
                    order
                        .iter()
                        .enumerate()
                        .map(|(j, &i)| (j >= k_rows).then_some(i as u32)),
                );
                take(k, &rest, None).map_err(|e| Error::sink("recipient log", e.to_string()))?
            }
            (None, _) => Arc::new(StringArray::new_null(n)),
        };
        // Every column below is built over `order`: its row `j` is batch row `order[j]`.
        let variant = coded(
            &order,
            |i| {
                let (v, d) = (b.variants[i], b.decisions[i]);
                (d == Decision::Sent && v != NO_VARIANT && v != HOLDOUT_VARIANT).then_some(v as i32)
            },
            self.variants.iter().map(String::as_str).collect(),
        );
        let decision = coded(
            &order,
            |i| Some(b.decisions[i] as i32),
            Decision::ALL.iter().map(|d| d.as_str()).collect(),
        );
        let reason = coded(
            &order,
            |i| (b.reasons[i] != Reason::None).then_some(b.reasons[i] as i32),
            Reason::ALL.iter().map(|r| r.as_str()).collect(),
        );
        // Details are sparse (a few rows per batch): all-null unless there are some.
        let detail = if b.details.is_empty() {
            StringArray::new_null(n)
        } else {
            order.iter().map(|&i| b.detail(i)).collect()
        };
        let list = coded(
            &order,
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
            &order,
            |i| placed(i).then(|| b.placement_file[i] as i32),
            b.placement_files.iter().map(|s| &**s).collect(),
        );
        let line = UInt32Array::new(
            order
                .iter()
                .map(|&i| if placed(i) { b.placement_line[i] } else { 0 })
                .collect(),
            nulls(&order, placed),
        );
        let mail_state: ArrayRef = if b.mail_states.is_empty() {
            arrow_array::new_null_array(&broadside_pipeline::store::dictionary_utf8(), n)
        } else {
            Arc::new(
                order
                    .iter()
                    .map(|&i| b.mail_states[i])
                    .collect::<DictionaryArray<Int32Type>>(),
            )
        };
        let printer_id = if b.printer_ids.is_empty() {
            StringArray::new_null(n)
        } else {
            order
                .iter()
                .map(|&i| b.printer_ids.get(i).and_then(|p| p.as_deref()))
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
        // Reordered rows cannot be cut at a part boundary: a batch across one is logged in
        // row order, its keys encoded here.
        let packed = sent_keys_packed(b)
            .filter(|_| segments(b.first_row, b.len(), self.part_rows).len() == 1);
        let log = self.log_batch(b, packed)?;
        let key = self.key_column;
        self.parts
            .write_input_rows(b.first_row, b.len(), self.part_rows, |start, end| {
                let packed = packed.map(|keys| Packed { column: key, keys });
                Ok((log.slice(start, end - start), packed))
            })
    }

    fn finish(&mut self) -> Result<()> {
        self.parts.close_part()
    }

    fn abort(&mut self) {
        self.parts.abort();
    }
}
