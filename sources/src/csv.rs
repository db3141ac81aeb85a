//! CSV reading on `csv-core`: records as byte fields with their line numbers, and the CSV
//! recipient source that turns them into Arrow batches with per-row errors as decisions.
//!
//! We do not use `arrow-csv` because it fails a whole batch on one malformed row; here a row
//! with the wrong field count or a non-UTF-8 field becomes an `errored` decision naming the
//! file, line and field, and the send goes on.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, RecipientLayout, RowDetail};
use broadside_pipeline::runner::Source;
use broadside_pipeline::{Error, Result};
use csv_core::{ReadRecordResult, ReaderBuilder};

use crate::{SizeHint, BATCH_ROWS};

const READ_CHUNK: usize = 1 << 20;

/// Reads CSV records one at a time into reusable buffers.
pub struct CsvRecordReader<R> {
    rdr: csv_core::Reader,
    input: R,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    out: Vec<u8>,
    ends: Vec<usize>,
    nfields: usize,
    line: u64,
    bytes_read: Arc<AtomicU64>,
    origin: String,
}

impl<R: Read> CsvRecordReader<R> {
    /// A reader over `input`; `origin` names it in errors.
    pub fn new(input: R, delimiter: u8, origin: impl Into<String>) -> Self {
        CsvRecordReader {
            rdr: ReaderBuilder::new().delimiter(delimiter).build(),
            input,
            buf: vec![0; READ_CHUNK],
            pos: 0,
            filled: 0,
            eof: false,
            out: vec![0; 4096],
            ends: vec![0; 64],
            nfields: 0,
            line: 1,
            bytes_read: Arc::new(AtomicU64::new(0)),
            origin: origin.into(),
        }
    }

    /// Shared counter of bytes consumed, for progress.
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        self.bytes_read.clone()
    }

    fn fill(&mut self) -> Result<()> {
        if self.pos < self.filled || self.eof {
            return Ok(());
        }
        loop {
            match self.input.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    self.filled = 0;
                    self.pos = 0;
                    return Ok(());
                }
                Ok(n) => {
                    self.filled = n;
                    self.pos = 0;
                    self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::source(
                        &self.origin,
                        format!("read failed near line {}: {e}", self.line),
                    ))
                }
            }
        }
    }

    /// Reads the next record; returns its starting line, or `None` at the end of input.
    pub fn read_record(&mut self) -> Result<Option<u64>> {
        let start_line = self.rdr.line().max(self.line);
        let mut outlen = 0;
        let mut endlen = 0;
        loop {
            self.fill()?;
            let input = &self.buf[self.pos..self.filled];
            let (res, nin, nout, nend) =
                self.rdr
                    .read_record(input, &mut self.out[outlen..], &mut self.ends[endlen..]);
            self.pos += nin;
            outlen += nout;
            endlen += nend;
            match res {
                ReadRecordResult::InputEmpty => continue,
                ReadRecordResult::OutputFull => {
                    let n = self.out.len() * 2;
                    self.out.resize(n, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let n = self.ends.len() * 2;
                    self.ends.resize(n, 0);
                }
                ReadRecordResult::Record => {
                    self.nfields = endlen;
                    self.line = self.rdr.line();
                    return Ok(Some(start_line));
                }
                ReadRecordResult::End => return Ok(None),
            }
        }
    }

    /// Number of fields in the current record.
    pub fn len(&self) -> usize {
        self.nfields
    }

    /// True when the current record has no fields.
    pub fn is_empty(&self) -> bool {
        self.nfields == 0
    }

    /// Field `i` of the current record, as raw bytes.
    #[inline]
    pub fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.out[start..self.ends[i]]
    }
}

/// Strips a UTF-8 byte-order mark (Excel writes one).
fn strip_bom(s: &[u8]) -> &[u8] {
    s.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(s)
}

/// Reads the header row and returns its column names.
pub fn read_header<R: Read>(rdr: &mut CsvRecordReader<R>) -> Result<Vec<String>> {
    if rdr.read_record()?.is_none() {
        return Err(Error::source(
            &rdr.origin,
            "the file is empty: expected a header row",
        ));
    }
    (0..rdr.len())
        .map(|i| {
            let raw = if i == 0 {
                strip_bom(rdr.field(0))
            } else {
                rdr.field(i)
            };
            std::str::from_utf8(raw)
                .map(|s| s.trim().to_string())
                .map_err(|_| {
                    Error::source(
                        &rdr.origin,
                        format!("line 1: header column {} is not valid UTF-8", i + 1),
                    )
                })
        })
        .collect()
}

/// Finds each wanted column in a header; the error lists all missing ones and what the header has.
pub fn resolve_columns(
    origin: &str,
    header: &[String],
    wanted: &[(String, String)],
) -> Result<Vec<usize>> {
    let mut missing = Vec::new();
    let idx: Vec<usize> = wanted
        .iter()
        .filter_map(|(field, col)| {
            let found = header
                .iter()
                .position(|h| h == col)
                .or_else(|| header.iter().position(|h| h.eq_ignore_ascii_case(col)));
            if found.is_none() {
                missing.push(format!("{col:?} (columns.{field})"));
            }
            found
        })
        .collect();
    if missing.is_empty() {
        Ok(idx)
    } else {
        Err(Error::source(
            origin,
            format!(
                "column {} not found; the header has: {}",
                missing.join(", "),
                header.join(", ")
            ),
        ))
    }
}

/// Recipients from a CSV file with a header row.
pub struct CsvSource {
    path: PathBuf,
    origin: String,
    records: CsvRecordReader<File>,
    layout: Arc<RecipientLayout>,
    header: Vec<String>,
    columns: Vec<usize>,
    next_row: u64,
    total_bytes: u64,
}

impl CsvSource {
    /// Opens the file, reads the header and checks every mapped column is there.
    pub fn open(
        path: &Path,
        delimiter: u8,
        mapping: &[(String, String)],
        layout: Arc<RecipientLayout>,
    ) -> Result<Self> {
        let origin = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let total_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut records = CsvRecordReader::new(file, delimiter, origin.clone());
        let header = read_header(&mut records)?;
        let columns = resolve_columns(&origin, &header, mapping)?;
        Ok(CsvSource {
            path: path.to_path_buf(),
            origin,
            records,
            layout,
            header,
            columns,
            next_row: 0,
            total_bytes,
        })
    }

    /// Progress information: bytes read of the file's size.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint {
            total_rows: None,
            bytes: Some((self.total_bytes, self.records.bytes_read())),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for CsvSource {
    fn describe(&self) -> String {
        self.origin.clone()
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        let ncols = self.columns.len();
        let mut builders: Vec<StringBuilder> = (0..ncols)
            .map(|_| StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 16))
            .collect();
        let mut errors: Vec<(u32, Reason, String)> = Vec::new();
        let mut n = 0usize;
        while n < BATCH_ROWS {
            let Some(line) = self.records.read_record()? else {
                break;
            };
            let got = self.records.len();
            // csv-core reports a blank line as a record of one empty field; skip those.
            if got == 1 && self.records.field(0).is_empty() {
                continue;
            }
            if got != self.header.len() {
                errors.push((
                    n as u32,
                    Reason::MalformedRow,
                    format!(
                        "{}:{line}: expected {} fields, found {got}",
                        self.origin,
                        self.header.len()
                    ),
                ));
                builders.iter_mut().for_each(|b| b.append_null());
                n += 1;
                continue;
            }
            // Each mapped field is validated exactly once, then appended without re-checking.
            let bad = self
                .columns
                .iter()
                .position(|&c| std::str::from_utf8(self.records.field(c)).is_err());
            if bad.is_none() {
                for (b, &c) in builders.iter_mut().zip(&self.columns) {
                    // SAFETY: validated as UTF-8 just above; the buffer is unchanged since.
                    let s = unsafe { std::str::from_utf8_unchecked(self.records.field(c)) };
                    b.append_value(s);
                }
            } else {
                let k = self.columns[bad.unwrap_or(0)];
                errors.push((
                    n as u32,
                    Reason::InvalidUtf8,
                    format!(
                        "{}:{line}: field {:?} (column {}) is not valid UTF-8",
                        self.origin,
                        self.header[k],
                        k + 1
                    ),
                ));
                builders.iter_mut().for_each(|b| b.append_null());
            }
            n += 1;
        }
        if n == 0 {
            if self.next_row == 0 {
                return Err(Error::source(
                    &self.origin,
                    "the file has a header but no recipient rows",
                ));
            }
            return Ok(None);
        }
        let arrays: Vec<ArrayRef> = builders
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let columns = RecordBatch::try_new(self.layout.schema(), arrays)
            .map_err(|e| Error::source(&self.origin, e.to_string()))?;
        let mut batch = RecipientBatch::new(0, self.next_row, columns);
        for (row, reason, text) in errors {
            batch.decide(row as usize, Decision::Errored, reason);
            batch.details.push(RowDetail { row, text });
        }
        self.next_row += n as u64;
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use std::io::Cursor;

    #[test]
    fn records_carry_their_starting_line() {
        let data = b"a,b\n1,\"x\ny\"\n3,4\n";
        let mut r = CsvRecordReader::new(Cursor::new(&data[..]), b',', "t.csv");
        assert_eq!(r.read_record().unwrap(), Some(1));
        assert_eq!(r.read_record().unwrap(), Some(2));
        assert_eq!(r.field(1), b"x\ny");
        assert_eq!(r.read_record().unwrap(), Some(4));
        assert_eq!(r.field(0), b"3");
        assert_eq!(r.read_record().unwrap(), None);
    }

    #[test]
    fn malformed_and_non_utf8_rows_become_errored_decisions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.csv");
        let mut data = b"\xEF\xBB\xBFEmail,First\nA@B.CO,Ann\nonly-one-field\nx@y.co,".to_vec();
        data.extend_from_slice(b"\xff\xfe\n\nc@d.co,Cy\n");
        std::fs::write(&p, data).unwrap();
        let layout = Arc::new(RecipientLayout::new(
            &[
                broadside_pipeline::model::StdField::Email,
                broadside_pipeline::model::StdField::FirstName,
            ],
            &[],
        ));
        let mapping = vec![
            ("email".to_string(), "Email".to_string()),
            ("first_name".to_string(), "First".to_string()),
        ];
        let mut src = CsvSource::open(&p, b',', &mapping, layout).unwrap();
        let b = src.next_batch().unwrap().unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b.column(0).value(0), "A@B.CO");
        assert_eq!(b.decisions[1], Decision::Errored);
        assert_eq!(b.reasons[1], Reason::MalformedRow);
        assert!(b
            .detail(1)
            .unwrap()
            .contains("r.csv:3: expected 2 fields, found 1"));
        assert_eq!(b.reasons[2], Reason::InvalidUtf8);
        assert!(b
            .detail(2)
            .unwrap()
            .contains(":4: field \"First\" (column 2)"));
        assert!(b.column(0).is_null(2));
        assert_eq!(b.column(1).value(3), "Cy");
        assert!(src.next_batch().unwrap().is_none());
    }

    #[test]
    fn missing_columns_are_all_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.csv");
        std::fs::write(&p, "Mail,First\n").unwrap();
        let layout = Arc::new(RecipientLayout::new(&[], &[]));
        let mapping = vec![
            ("email".to_string(), "Email".to_string()),
            ("zip".to_string(), "Zip".to_string()),
        ];
        let err = CsvSource::open(&p, b',', &mapping, layout)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("\"Email\" (columns.email)"), "{err}");
        assert!(err.contains("\"Zip\" (columns.zip)"), "{err}");
        assert!(err.contains("the header has: Mail, First"), "{err}");
    }

    #[test]
    fn empty_file_and_header_only_file_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let layout = Arc::new(RecipientLayout::new(&[], &[]));
        let p = d.path().join("empty.csv");
        std::fs::write(&p, "").unwrap();
        let err = CsvSource::open(&p, b',', &[], layout.clone())
            .err()
            .unwrap();
        assert!(err.to_string().contains("empty.csv"), "{err}");
        let p = d.path().join("header.csv");
        std::fs::write(&p, "Email\n").unwrap();
        let mut s = CsvSource::open(&p, b',', &[], layout).unwrap();
        let err = s.next_batch().unwrap_err().to_string();
        assert!(err.contains("no recipient rows"), "{err}");
    }
}
