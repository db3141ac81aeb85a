//! Parquet files split into parts by input row range, each committed atomically.
//!
//! Part `k` holds what input rows `k·P .. (k+1)·P` produced, so part boundaries and names are
//! the same on every attempt of a run. A part already committed by an earlier attempt is not
//! rewritten; its row count (from the footer) is checked against what this attempt produced.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use broadside_pipeline::model::PackedKeys;
use broadside_pipeline::store::{commit_file, create_dir_all, dictionary_utf8};
use broadside_pipeline::{Error, Result};
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnWriter, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnDescPtr, ColumnPath};

use crate::chunk::OwnColumn;
use crate::coded::CodedColumn;
use crate::delta::DeltaColumn;
use crate::text::TextColumn;

/// A range of a batch that belongs to one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Part number.
    pub part: u64,
    /// First row within the batch.
    pub start: usize,
    /// One past the last row within the batch.
    pub end: usize,
    /// True when this segment's last row is the part's last row.
    pub completes: bool,
}

/// Splits input rows `first_row .. first_row + len` at multiples of `part_rows`.
pub fn segments(first_row: u64, len: usize, part_rows: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < len {
        let row = first_row + start as u64;
        let part = row / part_rows;
        let part_end = (part + 1) * part_rows;
        let end = ((part_end - first_row) as usize).min(len);
        out.push(Segment {
            part,
            start,
            end,
            completes: first_row + end as u64 == part_end,
        });
        start = end;
    }
    out
}

struct Current {
    part: u64,
    tmp: PathBuf,
    final_path: PathBuf,
    /// `None` when an earlier attempt committed this part: count rows, verify, write nothing.
    writer: Option<PartFile>,
    rows: u64,
}

/// Columns a part writer encodes itself rather than through parquet-rs's column writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Own {
    /// Dictionary-encoded from the keys of `Dictionary(Int32, Utf8)` arrays (see
    /// [`crate::coded`]), for columns of few distinct values.
    Dictionary,
    /// `DELTA_BYTE_ARRAY` from `Utf8` arrays (see [`crate::delta`]), for unique strings that
    /// share prefixes with the row before.
    DeltaStrings,
    /// `DELTA_LENGTH_BYTE_ARRAY` with LZ4_RAW pages from `Utf8` arrays (see [`crate::text`]),
    /// for unique strings that do not; never with statistics.
    Text,
}

impl Own {
    /// An empty chunk of column `descr` in this encoding.
    fn column(
        self,
        descr: ColumnDescPtr,
        page_rows: usize,
        statistics: bool,
    ) -> Box<dyn OwnColumn> {
        match self {
            Own::Dictionary => Box::new(CodedColumn::new(descr, page_rows, statistics)),
            Own::DeltaStrings => Box::new(DeltaColumn::new(descr, page_rows, statistics)),
            Own::Text => Box::new(TextColumn::new(descr, page_rows)),
        }
    }
}

/// How a part file's column is encoded; `statistics` as the writer properties say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encode {
    /// By parquet-rs's Arrow column writer.
    Arrow,
    /// By this crate.
    Own { own: Own, statistics: bool },
}

/// Keys packed on a worker ([`PackedKeys`]) that stand for the first rows of a text column
/// of the batch written with them: the column's own values in those rows are not read (a sink
/// may put placeholders there); its remaining rows follow the packed page as usual.
#[derive(Debug, Clone, Copy)]
pub struct Packed<'a> {
    /// Index of the column in the schema.
    pub column: usize,
    /// The page.
    pub keys: &'a PackedKeys,
}

/// One column's writer within the open row group.
enum Slot {
    /// Encoded by parquet-rs.
    Arrow(Box<ArrowColumnWriter>),
    /// Encoded by this crate (see [`Own`]).
    Own(Box<dyn OwnColumn>),
}

/// A Parquet file being written row group by row group. Columns of [`Own`] encodings are
/// built by [`CodedColumn`] or [`DeltaColumn`] and spliced in; the others go through
/// parquet-rs's Arrow column writers.
/// The footer carries the Arrow schema as `ArrowWriter` writes it, so readers see the
/// file schema's types.
struct PartFile {
    file: SerializedFileWriter<File>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    columns: Vec<Encode>,
    max_group_rows: usize,
    page_rows: usize,
    /// Column writers of the open row group, if any rows are in it.
    group: Option<Vec<Slot>>,
    group_rows: usize,
}

impl PartFile {
    fn create(
        path: &Path,
        schema: SchemaRef,
        props: WriterProperties,
        columns: &[Encode],
    ) -> parquet::errors::Result<Self> {
        let f = File::create(path)?;
        let max_group_rows = props.max_row_group_row_count().unwrap_or(1024 * 1024);
        let page_rows = props.data_page_row_count_limit();
        let (file, factory) =
            ArrowWriter::try_new(f, schema.clone(), Some(props))?.into_serialized_writer()?;
        Ok(PartFile {
            file,
            factory,
            schema,
            columns: columns.to_vec(),
            max_group_rows,
            page_rows,
            group: None,
            group_rows: 0,
        })
    }

    /// Appends `batch`; with `packed`, the first rows of column `packed.column` are the packed
    /// keys' page (that column's values in those rows are not read), and the batch goes into
    /// the open row group whole, which may then hold up to a batch more than the limit.
    fn write(
        &mut self,
        batch: &RecordBatch,
        packed: Option<Packed<'_>>,
    ) -> parquet::errors::Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = match packed {
                Some(_) => batch.num_rows(),
                None => (self.max_group_rows - self.group_rows).min(batch.num_rows() - offset),
            };
            if self.group.is_none() {
                let mut writers = self
                    .factory
                    .create_column_writers(self.file.flushed_row_groups().len())?;
                // Flat schemas only: one leaf writer per field, in order.
                let descr = self.file.schema_descr();
                let slots = self
                    .columns
                    .iter()
                    .zip(writers.drain(..))
                    .enumerate()
                    .map(|(i, (&encode, w))| match encode {
                        Encode::Own { own, statistics } => {
                            Slot::Own(own.column(descr.column(i), self.page_rows, statistics))
                        }
                        Encode::Arrow => Slot::Arrow(Box::new(w)),
                    })
                    .collect();
                self.group = Some(slots);
            }
            let slots = self.group.as_mut().expect("row group opened");
            for (i, ((slot, field), column)) in slots
                .iter_mut()
                .zip(self.schema.fields())
                .zip(batch.columns())
                .enumerate()
            {
                let column = column.slice(offset, take);
                match (slot, packed) {
                    (Slot::Own(c), Some(p)) if p.column == i => {
                        let k = p.keys.rows.len();
                        c.append_packed(p.keys)?;
                        c.append(&column.slice(k, take - k))?;
                    }
                    (Slot::Arrow(w), _) => {
                        for leaf in compute_leaves(field, &column)? {
                            w.write(&leaf)?;
                        }
                    }
                    (Slot::Own(c), _) => c.append(&column)?,
                }
            }
            self.group_rows += take;
            offset += take;
            if self.group_rows >= self.max_group_rows {
                self.flush_group()?;
            }
        }
        Ok(())
    }

    fn flush_group(&mut self) -> parquet::errors::Result<()> {
        let Some(slots) = self.group.take() else {
            return Ok(());
        };
        self.group_rows = 0;
        let mut group = self.file.next_row_group()?;
        for slot in slots {
            match slot {
                Slot::Arrow(w) => w.close()?.append_to_row_group(&mut group)?,
                Slot::Own(mut c) => {
                    let (bytes, close) = c.finish()?;
                    group.append_column(&bytes, close)?;
                }
            }
        }
        group.close()?;
        Ok(())
    }

    fn into_file(mut self) -> parquet::errors::Result<File> {
        self.flush_group()?;
        self.file.into_inner()
    }
}

/// Writes `<dir>/<prefix>-NNNNN.parquet` parts.
pub struct PartWriter {
    dir: PathBuf,
    prefix: String,
    schema: SchemaRef,
    props: WriterProperties,
    columns: Vec<Encode>,
    current: Option<Current>,
    committed: Vec<PathBuf>,
}

impl PartWriter {
    /// A writer into `dir` (created if missing). Batches follow `schema`, except that the
    /// columns named `Own::Dictionary` in `own` arrive as `Dictionary(Int32, Utf8)` arrays
    /// whatever their string type in `schema` (see [`PartWriter::batch_schema`]).
    pub fn new(
        dir: &Path,
        prefix: impl Into<String>,
        schema: SchemaRef,
        props: WriterProperties,
        own: &[(&str, Own)],
    ) -> Result<Self> {
        create_dir_all(dir)?;
        let columns = schema
            .fields()
            .iter()
            .map(|f| match own.iter().find(|(name, _)| name == f.name()) {
                Some(&(name, own)) => Encode::Own {
                    own,
                    statistics: props.statistics_enabled(&ColumnPath::from(name))
                        != EnabledStatistics::None,
                },
                None => Encode::Arrow,
            })
            .collect();
        Ok(PartWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
            schema,
            props,
            columns,
            current: None,
            committed: Vec::new(),
        })
    }

    /// The schema batches follow: the file schema with coded columns as dictionaries.
    pub fn batch_schema(&self) -> SchemaRef {
        let fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .zip(&self.columns)
            .map(|(f, encode)| match encode {
                Encode::Own {
                    own: Own::Dictionary,
                    ..
                } => Arc::new(f.as_ref().clone().with_data_type(dictionary_utf8())),
                _ => f.clone(),
            })
            .collect();
        Arc::new(Schema::new_with_metadata(
            fields,
            self.schema.metadata().clone(),
        ))
    }

    /// The final path of part `k`.
    pub fn part_path(&self, part: u64) -> PathBuf {
        self.dir.join(format!("{}-{part:05}.parquet", self.prefix))
    }

    /// Parts committed (or verified) so far.
    pub fn committed(&self) -> &[PathBuf] {
        &self.committed
    }

    fn open(&mut self, part: u64) -> Result<()> {
        let final_path = self.part_path(part);
        let tmp = broadside_pipeline::store::temp_name(&final_path);
        let writer = if final_path.exists() {
            None
        } else {
            Some(
                PartFile::create(&tmp, self.schema.clone(), self.props.clone(), &self.columns)
                    .map_err(|e| Error::sink(tmp.display().to_string(), e.to_string()))?,
            )
        };
        self.current = Some(Current {
            part,
            tmp,
            final_path,
            writer,
            rows: 0,
        });
        Ok(())
    }

    /// Appends rows to part `part`, opening it first if needed. Parts must come in order.
    /// With `packed`, see [`Packed`].
    pub fn write(
        &mut self,
        part: u64,
        batch: &RecordBatch,
        packed: Option<Packed<'_>>,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match &self.current {
            Some(c) if c.part == part => {}
            Some(c) => {
                return Err(Error::sink(
                    c.final_path.display().to_string(),
                    format!("part {part} started before part {} was closed", c.part),
                ))
            }
            None => self.open(part)?,
        }
        let c = self.current.as_mut().expect("opened");
        if let Some(p) = packed {
            let k = p.keys.rows.len();
            let own = matches!(
                self.columns.get(p.column),
                Some(Encode::Own { own: Own::Text, .. })
            );
            if !own || k > batch.num_rows() {
                return Err(Error::sink(
                    c.final_path.display().to_string(),
                    format!(
                        "packed keys for column {} ({k} rows) do not fit this batch",
                        p.column
                    ),
                ));
            }
        }
        if let Some(w) = c.writer.as_mut() {
            w.write(batch, packed)
                .map_err(|e| Error::sink(c.tmp.display().to_string(), e.to_string()))?;
        }
        c.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Writes what input rows `first_row .. first_row + len` produced, split at part
    /// boundaries (parts of `part_rows` input rows): `build(start, end)` returns the output
    /// rows for batch rows `start .. end`, and the keys packed for them if any. Parts that end
    /// inside this range are committed.
    pub fn write_input_rows<'a>(
        &mut self,
        first_row: u64,
        len: usize,
        part_rows: u64,
        mut build: impl FnMut(usize, usize) -> Result<(RecordBatch, Option<Packed<'a>>)>,
    ) -> Result<()> {
        for s in segments(first_row, len, part_rows) {
            let (batch, packed) = build(s.start, s.end)?;
            self.write(s.part, &batch, packed)?;
            if s.completes {
                self.close_part()?;
            }
        }
        Ok(())
    }

    /// Commits the open part (if any): footer, fsync, rename. For a part an earlier attempt
    /// committed, checks its row count instead.
    pub fn close_part(&mut self) -> Result<()> {
        let Some(mut c) = self.current.take() else {
            return Ok(());
        };
        match c.writer.take() {
            Some(w) => {
                let file = w
                    .into_file()
                    .map_err(|e| Error::sink(c.tmp.display().to_string(), e.to_string()))?;
                file.sync_all().map_err(|e| Error::io(&c.tmp, e))?;
                drop(file);
                commit_file(&c.tmp, &c.final_path)?;
            }
            None => {
                let have = File::open(&c.final_path)
                    .map_err(|e| Error::io(&c.final_path, e))
                    .and_then(|f| {
                        SerializedFileReader::new(f).map_err(|e| {
                            Error::sink(c.final_path.display().to_string(), e.to_string())
                        })
                    })?
                    .metadata()
                    .file_metadata()
                    .num_rows() as u64;
                if have != c.rows {
                    return Err(Error::sink(
                        c.final_path.display().to_string(),
                        format!(
                            "an earlier attempt committed {have} rows here, this attempt produced {}: \
                             the input changed since the run started",
                            c.rows
                        ),
                    ));
                }
            }
        }
        self.committed.push(c.final_path);
        Ok(())
    }

    /// Drops the open part without committing it.
    pub fn abort(&mut self) {
        if let Some(c) = self.current.take() {
            drop(c.writer);
            let _ = std::fs::remove_file(&c.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_part_boundaries() {
        assert_eq!(
            segments(8, 10, 10),
            vec![
                Segment {
                    part: 0,
                    start: 0,
                    end: 2,
                    completes: true
                },
                Segment {
                    part: 1,
                    start: 2,
                    end: 10,
                    completes: false
                },
            ]
        );
        assert_eq!(
            segments(0, 10, 10),
            vec![Segment {
                part: 0,
                start: 0,
                end: 10,
                completes: true
            }]
        );
        assert_eq!(segments(0, 25, 10).len(), 3);
    }
}

#[cfg(test)]
mod coded_tests {
    use super::*;
    use arrow_array::types::Int32Type;
    use arrow_array::{Array, ArrayRef, DictionaryArray, Int32Array, StringArray, UInt64Array};
    use arrow_schema::{DataType, Field};
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    use parquet::file::metadata::PageIndexPolicy;
    use parquet::file::statistics::Statistics;

    /// A writer of `t-NNNNN.parquet` parts with row groups and data pages of the given sizes.
    fn writer(
        dir: &Path,
        schema: &SchemaRef,
        group_rows: usize,
        page_rows: usize,
        own: &[(&str, Own)],
    ) -> PartWriter {
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group_rows))
            .set_data_page_row_count_limit(page_rows)
            .build();
        PartWriter::new(dir, "t", schema.clone(), props, own).unwrap()
    }

    fn dict(keys: Vec<Option<i32>>, values: &[&str]) -> ArrayRef {
        Arc::new(DictionaryArray::<Int32Type>::new(
            Int32Array::from(keys),
            Arc::new(StringArray::from(values.to_vec())),
        ))
    }

    /// Coded columns (Utf8 and dictionary-typed in the file, nullable or not, with changing
    /// batch dictionaries, runs and noise, an all-null column) read back as written, across
    /// row groups split inside batches.
    #[test]
    fn coded_columns_read_back_as_written() {
        let d = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("row", DataType::UInt64, false),
            Field::new("kind", DataType::Utf8, false),
            Field::new("variant", dictionary_utf8(), true),
            Field::new("empty", DataType::Utf8, true),
        ]));
        let mut w = writer(
            d.path(),
            &schema,
            1000,
            300,
            &[
                ("kind", Own::Dictionary),
                ("variant", Own::Dictionary),
                ("empty", Own::Dictionary),
            ],
        );
        let batch_schema = w.batch_schema();
        let mut expected: Vec<(u64, String, Option<String>)> = Vec::new();
        let mut row = 0u64;
        for (b, len) in [700usize, 900, 1, 1400, 37].into_iter().enumerate() {
            // Each batch has its own dictionary, in a different order.
            let kinds: Vec<String> = (0..=b).rev().map(|k| format!("kind-{k}")).collect();
            let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
            let variants = if b % 2 == 0 {
                ["A", "B", "C"]
            } else {
                ["C", "A", "B"]
            };
            let kind_keys: Vec<Option<i32>> = (0..len)
                .map(|i| Some(((i / 50) % kinds.len()) as i32))
                .collect();
            let variant_keys: Vec<Option<i32>> = (0..len)
                .map(|i| match (i * 7 + b) % 11 {
                    0 | 1 => None,
                    k if i % 100 < 40 => Some((k % 3) as i32),
                    _ => Some(1),
                })
                .collect();
            for i in 0..len {
                expected.push((
                    row + i as u64,
                    kinds[kind_keys[i].unwrap() as usize].to_string(),
                    variant_keys[i].map(|k| variants[k as usize].to_string()),
                ));
            }
            let batch = RecordBatch::try_new(
                batch_schema.clone(),
                vec![
                    Arc::new(UInt64Array::from_iter_values(row..row + len as u64)),
                    dict(kind_keys, &kinds),
                    dict(variant_keys, &variants),
                    dict(vec![None; len], &[]),
                ],
            )
            .unwrap();
            w.write(0, &batch, None).unwrap();
            row += len as u64;
        }
        w.close_part().unwrap();

        let f = File::open(w.part_path(0)).unwrap();
        let options = ArrowReaderOptions::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .with_offset_index_policy(PageIndexPolicy::Required);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(f, options).unwrap();
        let meta = reader.metadata().clone();
        assert_eq!(meta.num_row_groups(), 4, "3038 rows in groups of 1000");
        // Pages close once they reach 300 rows, at batch or row-group ends.
        let pages = |group: usize| {
            meta.offset_index().unwrap()[group][1]
                .page_locations()
                .iter()
                .map(|p| p.first_row_index)
                .collect::<Vec<_>>()
        };
        assert_eq!(pages(0), vec![0, 700]);
        assert_eq!(pages(1), vec![0, 600]);
        assert_eq!(pages(3), vec![0], "38 rows left for the last group");
        let mut got = Vec::new();
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            assert_eq!(
                batch.schema().fields(),
                schema.fields(),
                "file schema types"
            );
            let rows = batch
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap();
            let kinds = batch
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let variants = dictionary_strings(batch.column(2));
            assert_eq!(batch.column(3).null_count(), batch.num_rows());
            for (i, variant) in variants.into_iter().enumerate() {
                got.push((rows.value(i), kinds.value(i).to_string(), variant));
            }
        }
        assert_eq!(got, expected);

        // Chunk statistics come from the dictionary entries the group uses.
        let first = meta.row_group(0);
        let Some(Statistics::ByteArray(s)) = first.column(1).statistics() else {
            panic!("kind statistics: {:?}", first.column(1).statistics());
        };
        let in_group: Vec<&str> = expected[..1000].iter().map(|e| e.1.as_str()).collect();
        assert_eq!(
            s.min_opt().unwrap().as_utf8().unwrap(),
            *in_group.iter().min().unwrap()
        );
        assert_eq!(
            s.max_opt().unwrap().as_utf8().unwrap(),
            *in_group.iter().max().unwrap()
        );
        let nulls = expected[..1000].iter().filter(|e| e.2.is_none()).count() as u64;
        assert_eq!(
            first.column(2).statistics().unwrap().null_count_opt(),
            Some(nulls)
        );
    }

    fn dictionary_strings(a: &ArrayRef) -> Vec<Option<String>> {
        let d = a
            .as_any()
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .unwrap();
        let values = d.values().as_any().downcast_ref::<StringArray>().unwrap();
        d.keys()
            .iter()
            .map(|k| k.map(|k| values.value(k as usize).to_string()))
            .collect()
    }

    #[test]
    fn a_coded_column_refuses_plain_strings() {
        let d = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("kind", DataType::Utf8, false)]));
        let mut w = PartWriter::new(
            d.path(),
            "t",
            schema.clone(),
            WriterProperties::builder().build(),
            &[("kind", Own::Dictionary)],
        )
        .unwrap();
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["a"]))]).unwrap();
        let err = w.write(0, &batch, None).unwrap_err().to_string();
        assert!(err.contains("Dictionary(Int32, Utf8)"), "{err}");
        assert!(err.contains("t-00000.parquet"), "{err}");
    }

    fn id_strategy() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u64..3000).prop_map(|n| Some(format!("sub-20261203T141436-ab12-{n}"))),
            2 => "[a-zé\\-]{0,12}".prop_map(Some),
            1 => Just(Some(String::new())),
            1 => Just(None),
        ]
    }

    fn address_strategy() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        use proptest::prelude::*;
        prop_oneof![
            6 => "[a-z0-9.]{1,20}@(example\\.com|mail\\.co|d[0-9]{1,3}\\.org)".prop_map(Some),
            1 => "[^\\x00]{0,40}".prop_map(Some),
            1 => Just(Some(String::new())),
            2 => Just(None),
        ]
    }

    /// Writes `batches` as a part with a row number column `n` and a nullable string column
    /// `s` in encoding `own`, in row groups and pages of the given sizes, and reads it back:
    /// the strings read (the row numbers are checked to come back in order) and the file's
    /// metadata; `None` when there were no rows.
    fn write_strings_and_read_back(
        own: Own,
        batches: &[Vec<Option<String>>],
        page_rows: usize,
        group_rows: usize,
    ) -> Option<(
        Vec<Option<String>>,
        parquet::file::metadata::ParquetMetaData,
    )> {
        let d = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::UInt64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        let mut w = writer(d.path(), &schema, group_rows, page_rows, &[("s", own)]);
        let mut n = 0u64;
        for b in batches {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(UInt64Array::from_iter_values(n..n + b.len() as u64)),
                    Arc::new(StringArray::from(b.clone())),
                ],
            )
            .unwrap();
            n += b.len() as u64;
            w.write(0, &batch, None).unwrap();
        }
        w.close_part().unwrap();
        if n == 0 {
            return None;
        }
        let f = File::open(w.part_path(0)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        let meta = reader.metadata().as_ref().clone();
        let mut got: Vec<Option<String>> = Vec::new();
        let mut rows = 0u64;
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            let ns = batch
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap();
            assert!(ns.values().iter().copied().eq(rows..rows + ns.len() as u64));
            rows += ns.len() as u64;
            let strings = batch
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            got.extend(strings.iter().map(|v| v.map(str::to_string)));
        }
        Some((got, meta))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Text columns (nullable, empty strings, non-ASCII, batches sliced at row-group
        /// ends) read back as written across pages and row groups, `DELTA_LENGTH_BYTE_ARRAY`
        /// in LZ4_RAW pages, with the chunk sizes the pages add up to.
        #[test]
        fn text_columns_read_back_as_written(
            batches in proptest::collection::vec(
                proptest::collection::vec(address_strategy(), 0..400), 1..6),
            page_rows in 1usize..200,
            group_rows in 1usize..700,
        ) {
            let Some((got, meta)) =
                write_strings_and_read_back(Own::Text, &batches, page_rows, group_rows)
            else {
                return Ok(());
            };
            proptest::prop_assert_eq!(&got, &batches.concat());
            for group in meta.row_groups() {
                let column = group.column(1);
                proptest::prop_assert_eq!(column.compression(), parquet::basic::Compression::LZ4_RAW);
                proptest::prop_assert!(column
                    .encodings()
                    .any(|e| e == parquet::basic::Encoding::DELTA_LENGTH_BYTE_ARRAY));
                proptest::prop_assert!(column.statistics().is_none());
                proptest::prop_assert_eq!(
                    column.compressed_size(),
                    column.byte_range().1 as i64
                );
                proptest::prop_assert!(column.uncompressed_size() > 0);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Delta-encoded string columns (nullable, with shared prefixes, empty strings,
        /// non-ASCII) read back as written across pages and row groups, with statistics.
        #[test]
        fn delta_string_columns_read_back_as_written(
            batches in proptest::collection::vec(
                proptest::collection::vec(id_strategy(), 0..400), 1..6),
            page_rows in 1usize..200,
            group_rows in 1usize..700,
        ) {
            let Some((got, meta)) =
                write_strings_and_read_back(Own::DeltaStrings, &batches, page_rows, group_rows)
            else {
                return Ok(());
            };
            let expected = batches.concat();
            proptest::prop_assert_eq!(&got, &expected);
            let mut first = 0;
            for group in meta.row_groups() {
                let column = group.column(1);
                proptest::prop_assert!(column
                    .encodings()
                    .any(|e| e == parquet::basic::Encoding::DELTA_BYTE_ARRAY));
                let rows = &expected[first..first + group.num_rows() as usize];
                first += rows.len();
                let stats = column.statistics().unwrap();
                proptest::prop_assert_eq!(
                    stats.null_count_opt(),
                    Some(rows.iter().filter(|r| r.is_none()).count() as u64)
                );
                let Statistics::ByteArray(s) = stats else {
                    panic!("statistics {stats:?}");
                };
                let values = rows.iter().flatten().map(|v| v.as_bytes());
                proptest::prop_assert_eq!(s.min_opt().map(|m| m.data()), values.clone().min());
                proptest::prop_assert_eq!(s.max_opt().map(|m| m.data()), values.max());
            }
        }
    }
}
