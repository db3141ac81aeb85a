//! Recipients from a Parquet file: mapped columns are projected and cast to strings.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_cast::cast;
use arrow_schema::DataType;
use broadside_pipeline::model::{RecipientBatch, RecipientLayout};
use broadside_pipeline::runner::Source;
use broadside_pipeline::{Error, Result};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use crate::csv::resolve_columns;
use crate::{SizeHint, BATCH_ROWS};

/// Streams a Parquet file in batches; never loads the whole file.
pub struct ParquetSource {
    origin: String,
    reader: ParquetRecordBatchReader,
    /// For each layout column, its position in the projected batches.
    order: Vec<usize>,
    layout: Arc<RecipientLayout>,
    next_row: u64,
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
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::source(&origin, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let header: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let idx = resolve_columns(&origin, &header, mapping)?;
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let order = idx
            .iter()
            .map(|i| sorted.binary_search(i).expect("present"))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), sorted);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| Error::source(&origin, e.to_string()))?;
        Ok(ParquetSource {
            origin,
            reader,
            order,
            layout,
            next_row: 0,
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

impl Source for ParquetSource {
    fn describe(&self) -> String {
        self.origin.clone()
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        let Some(batch) = self.reader.next() else {
            if self.next_row == 0 {
                return Err(Error::source(
                    &self.origin,
                    "the file has no recipient rows",
                ));
            }
            return Ok(None);
        };
        let batch = batch.map_err(|e| {
            Error::source(
                &self.origin,
                format!("reading rows after row {}: {e}", self.next_row),
            )
        })?;
        let arrays: Vec<ArrayRef> = self
            .order
            .iter()
            .map(|&i| {
                let col = batch.column(i);
                let name = batch.schema().field(i).name().clone();
                cast(col, &DataType::Utf8).map_err(|e| {
                    Error::source(
                        &self.origin,
                        format!("column {name:?} cannot be read as text: {e}"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let columns = RecordBatch::try_new(self.layout.schema(), arrays)
            .map_err(|e| Error::source(&self.origin, e.to_string()))?;
        let b = RecipientBatch::new(0, self.next_row, columns);
        self.next_row += b.len() as u64;
        Ok(Some(b))
    }
}
