//! The `ingest_gaps` table: offset ranges of a Kafka partition that the store will never
//! hold, recorded when `broadside ingest --on-gap record` carries on past them.
//!
//! A gap is found when a partition is assigned (never per record): the partition's first
//! available offset is beyond the store's committed position (`retention`: the broker
//! deleted records the store never saw) or its high watermark is below it (`recreated`:
//! the topic was deleted and created again). Without `--on-gap record` the ingest stops
//! with [`crate::Error::IngestGap`] instead.
//!
//! Each gap is one small Parquet file under `<store>/ingest_gaps/`, named by topic,
//! partition, generation and the store's position, so that seeing the same gap again
//! (a restart before anything after it was committed) replaces the row instead of adding
//! one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;

use crate::error::{Error, Result};

/// Folder of the `ingest_gaps` table, under the store.
pub const GAPS_DIR: &str = "ingest_gaps";

/// Why a partition's records are missing from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// The partition's first available offset is beyond the store's position: records
    /// `from..to` were deleted (retention, delete-records) before the store read them.
    Retention,
    /// The partition's high watermark is below the store's position: the topic was
    /// re-created. The store read the old topic up to `from - 1`; the ingest goes on with
    /// the new topic from offset `to` (its first available offset) in a new generation.
    Recreated,
}

impl GapKind {
    /// `retention` or `recreated`, as stored in the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            GapKind::Retention => "retention",
            GapKind::Recreated => "recreated",
        }
    }
}

/// One row of `ingest_gaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestGap {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// What happened.
    pub kind: GapKind,
    /// The store's position: the first offset it had not committed.
    pub from: i64,
    /// The offset the ingest continues at.
    pub to: i64,
    /// The stream generation the gap was seen in (0 until a topic is first re-created).
    pub generation: u32,
    /// When the gap was seen, microseconds since the epoch (UTC).
    pub seen_at_us: i64,
}

/// Schema of the `ingest_gaps` files.
pub fn gaps_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("from_offset", DataType::Int64, false),
        Field::new("to_offset", DataType::Int64, false),
        Field::new("generation", DataType::Int32, false),
        Field::new(
            "seen_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Writes `gap` to `<store>/ingest_gaps/` (written to a temporary name, fsynced, renamed).
pub fn record_gap(store: &Path, gap: &IngestGap) -> Result<PathBuf> {
    let dir = store.join(GAPS_DIR);
    broadside_pipeline::store::create_dir_all(&dir)?;
    let name = format!(
        "gap-{}-{}-g{}-{:020}.parquet",
        gap.topic, gap.partition, gap.generation, gap.from
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let batch = RecordBatch::try_new(
        gaps_schema(),
        vec![
            Arc::new(StringArray::from(vec![gap.topic.as_str()])),
            Arc::new(Int32Array::from(vec![gap.partition])),
            Arc::new(StringArray::from(vec![gap.kind.as_str()])),
            Arc::new(Int64Array::from(vec![gap.from])),
            Arc::new(Int64Array::from(vec![gap.to])),
            Arc::new(Int32Array::from(vec![gap.generation as i32])),
            Arc::new(TimestampMicrosecondArray::from(vec![gap.seen_at_us]).with_timezone("UTC")),
        ],
    )?;
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let sync = file.try_clone().map_err(|e| Error::io(&tmp, e))?;
    let mut w =
        ArrowWriter::try_new(file, gaps_schema(), None).map_err(|e| Error::parquet(&tmp, e))?;
    w.write(&batch).map_err(|e| Error::parquet(&tmp, e))?;
    w.close().map_err(|e| Error::parquet(&tmp, e))?;
    sync.sync_all().map_err(|e| Error::io(&tmp, e))?;
    broadside_pipeline::store::commit_file(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_gap_seen_twice_is_one_file() {
        let d = tempfile::tempdir().unwrap();
        let mut gap = IngestGap {
            topic: "events".into(),
            partition: 2,
            kind: GapKind::Retention,
            from: 10,
            to: 40,
            generation: 0,
            seen_at_us: 1_700_000_000_000_000,
        };
        let a = record_gap(d.path(), &gap).unwrap();
        gap.to = 55;
        let b = record_gap(d.path(), &gap).unwrap();
        assert_eq!(a, b);
        let names: Vec<_> = std::fs::read_dir(d.path().join(GAPS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
