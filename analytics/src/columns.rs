//! Reading a few columns of a Parquet file of the store, batch by batch: the shared reader of
//! the suppression build, its evidence search and the ledger attribution index.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, StringArray, TimestampMicrosecondArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Result};

/// The columns `names` as text (dictionary and other string encodings cast to Utf8) and,
/// unless `ts` is empty, the µs timestamp column `ts` of a Parquet file, batch by batch.
pub(crate) fn read_columns(
    path: &Path,
    names: &[&str],
    ts: &str,
    mut each: impl FnMut(&[&StringArray], Option<&TimestampMicrosecondArray>) -> Result<()>,
) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| Error::parquet(path, e))?;
    let schema = builder.schema().clone();
    let idx = |name: &str| {
        schema
            .index_of(name)
            .map_err(|_| Error::state(path, format!("file has no `{name}` column")))
    };
    let mut roots = names.iter().map(|n| idx(n)).collect::<Result<Vec<_>>>()?;
    if !ts.is_empty() {
        roots.push(idx(ts)?);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| {
            Error::parquet(
                path,
                parquet::errors::ParquetError::ArrowError(e.to_string()),
            )
        })?;
        let cols = names
            .iter()
            .map(|n| {
                let c = batch.column_by_name(n).expect("projected");
                let c = arrow_cast::cast(c, &DataType::Utf8)
                    .map_err(|e| Error::state(path, format!("column `{n}`: {e}")))?;
                Ok(c.as_string::<i32>().clone())
            })
            .collect::<Result<Vec<StringArray>>>()?;
        let cols: Vec<&StringArray> = cols.iter().collect();
        let t = match ts {
            "" => None,
            n => Some(
                batch
                    .column_by_name(n)
                    .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                    .ok_or_else(|| Error::state(path, format!("`{n}` must be a µs timestamp")))?,
            ),
        };
        each(&cols, t)?;
    }
    Ok(())
}

/// The value of row `i` of a nullable text column.
pub(crate) fn opt(c: &StringArray, i: usize) -> Option<&str> {
    (!c.is_null(i)).then(|| c.value(i))
}

/// The value of row `i` of a nullable timestamp column.
pub(crate) fn opt_ts(c: &TimestampMicrosecondArray, i: usize) -> Option<i64> {
    (!c.is_null(i)).then(|| c.value(i))
}
