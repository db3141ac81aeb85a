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

use crate::csv::{cut_records, read_header, resolve_columns, Chunker, CsvRecordReader, Records};

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

/// Fingerprints the key column of a list's records; stops at the first bad record.
struct ListKeys<'a> {
    list: &'a ListToLoad<'a>,
    origin: &'a str,
    fields: usize,
    col: usize,
    buf: String,
    out: Vec<u128>,
    error: Option<Error>,
}

impl Records for ListKeys<'_> {
    #[inline]
    fn record<'f>(&mut self, line: u64, got: usize, field: impl Fn(usize) -> &'f [u8]) {
        if got <= self.col {
            // A record of one empty field (a blank line, or `""`) holds no key.
            if got == 1 && field(0).is_empty() {
                return;
            }
            self.error = Some(Error::source(
                self.origin,
                format!("line {line}: expected {} fields, found {got}", self.fields),
            ));
            return;
        }
        let Ok(raw) = std::str::from_utf8(field(self.col)) else {
            self.error = Some(Error::source(
                self.origin,
                format!(
                    "line {line}: field {:?} is not valid UTF-8",
                    self.list.column
                ),
            ));
            return;
        };
        let key = normalize_key(raw, self.list.lowercase, &mut self.buf);
        if !key.is_empty() {
            self.out.push(fingerprint(key));
        }
    }

    fn wants_more(&self) -> bool {
        self.error.is_none()
    }
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
    let mut keys = ListKeys {
        list,
        origin: &origin,
        fields: header.len(),
        col,
        buf: String::new(),
        out: Vec::new(),
        error: None,
    };
    let mut chunks = Chunker::after_header(rdr, b',');
    let recycle = chunks.recycler();
    while let Some((chunk, first_line)) = chunks.next_chunk()? {
        cut_records(&chunk, first_line, b',', &mut keys);
        if let Some(e) = keys.error {
            return Err(e);
        }
        let _ = recycle.try_send(chunk);
    }
    Ok(keys.out)
}

/// A reader of the named columns of a Parquet file (`(what, column)` pairs name them in
/// errors), in file order.
fn read_parquet_columns(
    path: &Path,
    columns: &[(String, String)],
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    let origin = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::source(&origin, format!("not a readable Parquet file: {e}")))?;
    let header: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let cols = resolve_columns(&origin, &header, columns)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), cols);
    builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::source(&origin, e.to_string()))
}

fn load_parquet(list: &ListToLoad<'_>) -> Result<Vec<u128>> {
    let origin = list.path.display().to_string();
    let reader = read_parquet_columns(
        list.path,
        &[("suppression.column".into(), list.column.to_string())],
    )?;
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

/// The fingerprints of the keys a finished or partial run sent: every `sent` row of the
/// recipient-log parts in `dir` (a run's `run_id=` folder). Parts being written (`.tmp`) are
/// not read; a run without parts has sent nothing.
pub fn load_sent_keys(dir: &Path) -> Result<Vec<u128>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut parts: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    parts.sort();
    for path in parts {
        let origin = path.display().to_string();
        let reader = read_parquet_columns(
            &path,
            &[
                ("recipient log key".into(), "key".into()),
                ("recipient log decision".into(), "decision".into()),
            ],
        )?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::source(&origin, e.to_string()))?;
            let utf8 = |name: &str| -> Result<StringArray> {
                let col = batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::source(&origin, format!("no {name} column")))?;
                let arr = cast(col, &DataType::Utf8)
                    .map_err(|e| Error::source(&origin, e.to_string()))?;
                Ok(arr
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8")
                    .clone())
            };
            let (key, decision) = (utf8("key")?, utf8("decision")?);
            for i in 0..batch.num_rows() {
                if key.is_valid(i) && decision.is_valid(i) && decision.value(i) == "sent" {
                    out.push(fingerprint(key.value(i)));
                }
            }
        }
    }
    Ok(out)
}

/// A list already in memory (fingerprints), added to the index after the files.
#[derive(Debug, Clone)]
pub struct LoadedList {
    /// The list's name in the ledger and in `why` (for `already_sent`, the earlier run's id).
    pub name: String,
    /// What a match means.
    pub reason: Reason,
    /// Its keys' fingerprints.
    pub fingerprints: Vec<u128>,
}

/// Loads every list (in parallel, one thread each) and builds the index.
pub fn load_index(lists: &[ListToLoad<'_>]) -> Result<SuppressionIndex> {
    load_index_with(lists, Vec::new())
}

/// Loads every list file, then adds lists already in memory, and builds the index.
pub fn load_index_with(
    lists: &[ListToLoad<'_>],
    loaded_lists: Vec<LoadedList>,
) -> Result<SuppressionIndex> {
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
        builder.add_fingerprints(id, fps);
    }
    for l in loaded_lists {
        let id = builder.add_list(l.name, l.reason);
        builder.add_fingerprints(id, l.fingerprints);
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

    fn load_one(p: &Path) -> Result<SuppressionIndex> {
        load_index(&[ListToLoad {
            path: p,
            column: "email",
            reason: Reason::Unsubscribed,
            lowercase: true,
        }])
    }

    #[test]
    fn lists_spanning_chunks_with_quotes_crlf_and_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u.csv");
        let mut text = String::from("note,email\r\n");
        for i in 0..100_000 {
            match i % 4 {
                0 => text.push_str(&format!("x,User{i}@Example.com\r\n")),
                1 => text.push_str(&format!("\"a,b\",\"user{i}@example.com\"\n")),
                2 => text.push_str(&format!("\"say \"\"hi\"\"\", user{i}@example.com \n\n")),
                _ => text.push_str(&format!("\"multi\nline\",user{i}@example.com\n")),
            }
        }
        std::fs::write(&p, &text).unwrap();
        let idx = load_one(&p).unwrap();
        assert_eq!(idx.len(), 100_000);
        for i in [0, 1, 2, 3, 49_999, 99_999] {
            assert!(idx.lookup(&format!("user{i}@example.com")).is_some(), "{i}");
        }

        // A bad row deep in the file is reported with its line, counting quoted newlines.
        text.push_str("y,\"cafe\"\n");
        let mut bytes = text.into_bytes();
        let at = bytes.len() - 3;
        bytes[at] = 0xE9;
        std::fs::write(&p, &bytes).unwrap();
        let err = load_one(&p).unwrap_err().to_string();
        let line = 1 + 100_000 + 100_000 / 4 * 2 + 1;
        assert!(
            err.contains("u.csv")
                && err.contains(&format!("line {line}:"))
                && err.contains("UTF-8"),
            "{err}"
        );
    }
}
