//! Recipients from a Parquet file: the mapped columns are projected and decoded on the source
//! thread; a worker casts columns of other types to text and normalises them (trimmed, blank
//! values null; in place when only empty strings are blank), as the CSV source's workers
//! decode their chunks.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_cast::cast;
use arrow_schema::DataType;
use broadside_pipeline::model::{RecipientBatch, RecipientLayout};
use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::strings::normalised;
use broadside_pipeline::{Error, Result};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;

use crate::csv::resolve_columns;
use crate::{SizeHint, BATCH_ROWS};

/// Streams a Parquet file in batches; never loads the whole file.
pub struct ParquetSource {
    origin: Arc<str>,
    reader: ParquetRecordBatchReader,
    /// For each layout column, its position in the projected batches.
    order: Arc<[usize]>,
    layout: Arc<RecipientLayout>,
    /// Rows read so far, for messages.
    rows_read: u64,
    total_rows: u64,
}

impl ParquetSource {
    /// Opens the file and checks every mapped column is present.
    pub fn open(
        path: &Path,
        mapping: &[(String, String)],
        layout: Arc<RecipientLayout>,
    ) -> Result<Self> {
        let origin = path.display().to_string();
        let unreadable = |e: parquet::errors::ParquetError| {
            Error::source(&origin, format!("not a readable Parquet file: {e}"))
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta =
            ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(unreadable)?;
        let header: Vec<String> = meta
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let idx = resolve_columns(&origin, &header, mapping)?;
        let total_rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let order = idx
            .iter()
            .map(|i| sorted.binary_search(i).expect("present"))
            .collect();
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta);
        let mask = ProjectionMask::roots(builder.parquet_schema(), sorted);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| Error::source(&origin, e.to_string()))?;
        Ok(ParquetSource {
            origin: origin.into(),
            reader,
            order,
            layout,
            rows_read: 0,
            total_rows,
        })
    }

    /// Progress information: the row count from the footer.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint {
            total_rows: Some(self.total_rows),
            bytes: None,
        }
    }
}

/// The recipient batch of a projected Parquet batch: each layout column as normalised text.
fn recipients(
    batch: &RecordBatch,
    order: &[usize],
    layout: &RecipientLayout,
    origin: &str,
) -> Result<RecipientBatch> {
    let arrays: Vec<ArrayRef> = order
        .iter()
        .map(|&i| {
            let col = batch.column(i);
            let text = cast(col, &DataType::Utf8).map_err(|e| {
                let name = batch.schema().field(i).name().clone();
                Error::source(
                    origin,
                    format!("column {name:?} cannot be read as text: {e}"),
                )
            })?;
            let text = normalised(text.as_string::<i32>());
            Ok(Arc::new(text) as ArrayRef)
        })
        .collect::<Result<_>>()?;
    let columns = RecordBatch::try_new(layout.schema(), arrays)
        .map_err(|e| Error::source(origin, e.to_string()))?;
    let mut b = RecipientBatch::new(0, 0, columns);
    b.trimmed = true;
    Ok(b)
}

impl Source for ParquetSource {
    fn describe(&self) -> String {
        self.origin.to_string()
    }

    fn next_item(&mut self) -> Result<Option<SourceItem>> {
        let Some(batch) = self.reader.next() else {
            if self.rows_read == 0 {
                return Err(Error::source(
                    &*self.origin,
                    "the file has no recipient rows",
                ));
            }
            return Ok(None);
        };
        let batch = batch.map_err(|e| {
            Error::source(
                &*self.origin,
                format!("reading rows after row {}: {e}", self.rows_read),
            )
        })?;
        self.rows_read += batch.num_rows() as u64;
        let (order, layout, origin) =
            (self.order.clone(), self.layout.clone(), self.origin.clone());
        Ok(Some(SourceItem::Raw(Box::new(move || {
            recipients(&batch, &order, &layout, &origin)
        }))))
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        let first_row = self.rows_read;
        let item = self.next_item()?;
        item.map(|i| {
            let mut b = i.into_batch()?;
            b.first_row = first_row;
            Ok(b)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int64Array, LargeStringArray, StringArray};
    use arrow_schema::{Field, Schema};
    use broadside_pipeline::model::StdField;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    /// A value of row `i`: padded, blank, empty, non-ASCII, long or plain.
    fn value(i: usize, salt: usize) -> Option<String> {
        let h = (i * 2_654_435_761 + salt * 40_503) % 97;
        match h {
            0..=5 => None,
            6..=10 => Some(String::new()),
            11..=15 => Some(" \t ".into()),
            16..=25 => Some(format!("  padded {i} ")),
            26..=30 => Some(format!("Zoë Ørsted-{i}\u{a0}")),
            31..=35 => Some(format!("{}-{i}", "long".repeat(h))),
            36..=60 => Some(format!("v{}", i % 50)),
            _ => Some(format!("row{i}@example.com")),
        }
    }

    fn normal(v: &Option<String>) -> Option<String> {
        v.as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    }

    /// Text columns stored as Utf8 (dictionary pages and plain pages) and LargeUtf8, and an
    /// integer column, across row groups and pages that do not line up with the source's
    /// batches, come out as the layout's text columns with every value normalised, in order.
    #[test]
    fn columns_come_out_normalised_in_order_whatever_their_storage() {
        let rows = 3 * BATCH_ROWS + 1_234;
        let email: Vec<Option<String>> = (0..rows).map(|i| value(i, 1)).collect();
        let first: Vec<Option<String>> = (0..rows).map(|i| value(i, 2)).collect();
        let points: Vec<Option<i64>> = (0..rows)
            .map(|i| (i % 11 != 0).then_some(i as i64 - 500))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("Points", DataType::Int64, true),
            Field::new("Mail", DataType::Utf8, true),
            Field::new("First", DataType::LargeUtf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(points.clone())),
                Arc::new(StringArray::from(email.clone())),
                Arc::new(LargeStringArray::from(first.clone())),
            ],
        )
        .unwrap();
        let layout = Arc::new(RecipientLayout::new(
            &[StdField::Email, StdField::FirstName],
            &["points".to_string()],
        ));
        let mapping = vec![
            ("email".to_string(), "Mail".to_string()),
            ("first_name".to_string(), "First".to_string()),
            ("points".to_string(), "Points".to_string()),
        ];
        for dictionary in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("r.parquet");
            let props = WriterProperties::builder()
                .set_dictionary_enabled(dictionary)
                .set_max_row_group_row_count(Some(7_000))
                .set_data_page_row_count_limit(1_000)
                .set_write_batch_size(500)
                .build();
            let mut w =
                ArrowWriter::try_new(File::create(&path).unwrap(), schema.clone(), Some(props))
                    .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();

            let mut src = ParquetSource::open(&path, &mapping, layout.clone()).unwrap();
            assert_eq!(src.size_hint().total_rows, Some(rows as u64));
            let mut at = 0;
            while let Some(b) = src.next_batch().unwrap() {
                assert!(b.trimmed);
                assert_eq!(b.first_row, at as u64);
                for i in 0..b.len() {
                    let got = |c: usize| {
                        let a = b.column(c);
                        a.is_valid(i).then(|| a.value(i).to_string())
                    };
                    let row = at + i;
                    assert_eq!(got(0), normal(&email[row]), "email of row {row}");
                    assert_eq!(got(1), normal(&first[row]), "first name of row {row}");
                    assert_eq!(got(2), points[row].map(|p| p.to_string()), "row {row}");
                }
                at += b.len();
            }
            assert_eq!(at, rows, "dictionary {dictionary}");
        }
    }

    #[test]
    fn a_missing_column_and_an_empty_file_are_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("empty.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("Mail", DataType::Utf8, true)]));
        let w = ArrowWriter::try_new(File::create(&path).unwrap(), schema, None).unwrap();
        w.close().unwrap();
        let layout = Arc::new(RecipientLayout::new(&[StdField::Email], &[]));
        let mapping = vec![("email".to_string(), "Mail".to_string())];
        let mut src = ParquetSource::open(&path, &mapping, layout.clone()).unwrap();
        let err = src.next_batch().unwrap_err().to_string();
        assert!(
            err.contains("empty.parquet") && err.contains("no recipient rows"),
            "{err}"
        );
        let wrong = vec![("email".to_string(), "Email".to_string())];
        let err = ParquetSource::open(&path, &wrong, layout)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("empty.parquet") && err.contains("Email"),
            "{err}"
        );
    }
}
