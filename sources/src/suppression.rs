//! Loads suppression lists (CSV or Parquet) into a [`SuppressionIndex`].

use std::fs::File;
use std::path::Path;

use arrow_array::{Array, StringArray};
use arrow_cast::cast;
use arrow_schema::DataType;
use broadside_pipeline::model::Reason;
use broadside_pipeline::stages::suppression::fingerprint;
use broadside_pipeline::stages::{SuppressionIndex, SuppressionIndexBuilder};
use broadside_pipeline::{Error, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::csv::{read_header, resolve_columns, CsvRecordReader};

/// One list to load.
#[derive(Debug, Clone)]
pub struct ListToLoad<'a> {
    /// File path (CSV with a header, or `.parquet`).
    pub path: &'a Path,
    /// Column holding the key.
    pub column: &'a str,
    /// What a match means.
    pub reason: Reason,
    /// Lowercase keys (emails); account-number keys are only trimmed.
    pub lowercase: bool,
}

/// Normalises a key the way the validate stage does: trimmed, lowercased for emails.
#[inline]
pub fn normalize_key<'b>(raw: &str, lowercase: bool, buf: &'b mut String) -> &'b str {
    buf.clear();
    let t = raw.trim();
    if !lowercase {
        buf.push_str(t);
    } else if t.is_ascii() {
        buf.push_str(t);
        buf.make_ascii_lowercase();
    } else {
        buf.push_str(&t.to_lowercase());
    }
    buf
}

fn load_csv(list: &ListToLoad<'_>) -> Result<Vec<u128>> {
    let origin = list.path.display().to_string();
    let file = File::open(list.path).map_err(|e| Error::io(list.path, e))?;
    let mut rdr = CsvRecordReader::new(file, b',', origin.clone());
    let header = read_header(&mut rdr)?;
    let col = resolve_columns(
        &origin,
        &header,
        &[("suppression.column".into(), list.column.to_string())],
    )?[0];
    let mut out = Vec::new();
    let mut buf = String::new();
    while let Some(line) = rdr.read_record()? {
        if rdr.len() <= col {
            if rdr.len() == 1 && rdr.field(0).is_empty() {
                continue;
            }
            return Err(Error::source(
                &origin,
                format!(
                    "line {line}: expected {} fields, found {}",
                    header.len(),
                    rdr.len()
                ),
            ));
        }
        let raw = std::str::from_utf8(rdr.field(col)).map_err(|_| {
            Error::source(
                &origin,
                format!("line {line}: field {:?} is not valid UTF-8", list.column),
            )
        })?;
        let key = normalize_key(raw, list.lowercase, &mut buf);
        if !key.is_empty() {
            out.push(fingerprint(key));
        }
    }
    Ok(out)
}

fn load_parquet(list: &ListToLoad<'_>) -> Result<Vec<u128>> {
    let origin = list.path.display().to_string();
    let file = File::open(list.path).map_err(|e| Error::io(list.path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::source(&origin, format!("not a readable Parquet file: {e}")))?;
    let header: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let col = resolve_columns(
        &origin,
        &header,
        &[("suppression.column".into(), list.column.to_string())],
    )?[0];
    let mask = ProjectionMask::roots(builder.parquet_schema(), [col]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::source(&origin, e.to_string()))?;
    let mut out = Vec::new();
    let mut buf = String::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::source(&origin, e.to_string()))?;
        let arr = cast(batch.column(0), &DataType::Utf8)
            .map_err(|e| Error::source(&origin, e.to_string()))?;
        let arr = arr
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8");
        for i in 0..arr.len() {
            if arr.is_valid(i) {
                let key = normalize_key(arr.value(i), list.lowercase, &mut buf);
                if !key.is_empty() {
                    out.push(fingerprint(key));
                }
            }
        }
    }
    Ok(out)
}

/// Loads every list (in parallel, one thread each) and builds the index.
pub fn load_index(lists: &[ListToLoad<'_>]) -> Result<SuppressionIndex> {
    let loaded: Vec<Result<Vec<u128>>> = std::thread::scope(|s| {
        let handles: Vec<_> = lists
            .iter()
            .map(|l| {
                s.spawn(move || {
                    let is_parquet = l
                        .path
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
                    if is_parquet {
                        load_parquet(l)
                    } else {
                        load_csv(l)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("suppression loader panicked"))
            .collect()
    });
    let mut builder = SuppressionIndexBuilder::new();
    for (list, fps) in lists.iter().zip(loaded) {
        let fps = fps?;
        let id = builder.add_list(list.path.display().to_string(), list.reason);
        for fp in fps {
            builder.add_fingerprint(id, fp);
        }
    }
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lists_are_normalised_and_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.csv");
        std::fs::write(&p, "id,Email\n1, Ann@Example.COM \n2,\n").unwrap();
        let idx = load_index(&[ListToLoad {
            path: &p,
            column: "email",
            reason: Reason::HardBounce,
            lowercase: true,
        }])
        .unwrap();
        assert_eq!(idx.len(), 1);
        assert!(idx.lookup("ann@example.com").is_some());

        std::fs::write(&p, "id,Email\n1,a@b.co\n2\n").unwrap();
        let err = load_index(&[ListToLoad {
            path: &p,
            column: "email",
            reason: Reason::HardBounce,
            lowercase: true,
        }])
        .unwrap_err()
        .to_string();
        assert!(err.contains("b.csv") && err.contains("line 3"), "{err}");
    }
}
