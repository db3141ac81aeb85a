//! CSV reading on `csv-core`: records as byte fields with their line numbers, and the CSV
//! recipient source that turns them into Arrow batches with per-row errors as decisions.
//!
//! We do not use `arrow-csv` because it fails a whole batch on one malformed row; here a row
//! with the wrong field count or a non-UTF-8 field becomes an `errored` decision naming the
//! file, line and field, and the send goes on.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, RecipientLayout, RowDetail};
use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::strings::StringColumnBuilder;
use broadside_pipeline::{Error, Result};
use csv_core::{ReadRecordResult, ReaderBuilder};

use crate::SizeHint;

const READ_CHUNK: usize = 1 << 20;

/// csv-core with the buffers a record is decoded into, grown as records need.
struct CoreRecord {
    rdr: csv_core::Reader,
    out: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes and field ends of the record in progress (a record can span several inputs).
    outlen: usize,
    endlen: usize,
    /// Fields of the last complete record.
    nfields: usize,
    /// Set for input that starts mid-file (a chunk): csv-core drops a UTF-8 BOM it sees whole
    /// in its first input, and a BOM there is row data, as it is for rows not starting a
    /// chunk. The first input is then fed one byte at a time.
    keep_leading_bom: bool,
}

impl CoreRecord {
    fn new(delimiter: u8) -> Self {
        CoreRecord {
            rdr: ReaderBuilder::new().delimiter(delimiter).build(),
            out: vec![0; 4096],
            ends: vec![0; 64],
            outlen: 0,
            endlen: 0,
            nfields: 0,
            keep_leading_bom: false,
        }
    }

    /// Feeds `input` (empty: the data ended) until csv-core completes a record, wants more
    /// input or ends; returns its answer and the bytes it consumed.
    fn feed(&mut self, mut input: &[u8]) -> (ReadRecordResult, usize) {
        if std::mem::take(&mut self.keep_leading_bom) {
            input = &input[..input.len().min(1)];
        }
        let mut pos = 0;
        loop {
            let (res, nin, nout, nend) = self.rdr.read_record(
                &input[pos..],
                &mut self.out[self.outlen..],
                &mut self.ends[self.endlen..],
            );
            pos += nin;
            self.outlen += nout;
            self.endlen += nend;
            match res {
                ReadRecordResult::OutputFull => {
                    let n = self.out.len() * 2;
                    self.out.resize(n, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let n = self.ends.len() * 2;
                    self.ends.resize(n, 0);
                }
                ReadRecordResult::Record => {
                    self.nfields = std::mem::take(&mut self.endlen);
                    self.outlen = 0;
                    return (res, pos);
                }
                ReadRecordResult::InputEmpty | ReadRecordResult::End => return (res, pos),
            }
        }
    }

    /// Reads one record from `input` (which starts at a record and ends with the data);
    /// returns the bytes consumed, or `None` if `input` holds no record.
    fn read_one(&mut self, input: &[u8]) -> Option<usize> {
        let mut pos = 0;
        loop {
            let (res, nin) = self.feed(&input[pos..]);
            pos += nin;
            match res {
                ReadRecordResult::Record => return Some(pos),
                ReadRecordResult::End => return None,
                // Input used up: the next call passes the rest, or nothing, which tells
                // csv-core the data ended.
                _ => {}
            }
        }
    }

    /// Field `i` of the last complete record.
    #[inline]
    fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.out[start..self.ends[i]]
    }
}

/// Reads CSV records one at a time into reusable buffers.
pub struct CsvRecordReader<R> {
    core: CoreRecord,
    input: R,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    line: u64,
    /// Blank-line newlines consumed here rather than by `rdr` (whose `line()` misses them).
    skipped_newlines: u64,
    /// Added to line numbers (a chunk's records are numbered as in the whole file).
    line_offset: u64,
    bytes_read: Arc<AtomicU64>,
    origin: String,
}

impl<R: Read> CsvRecordReader<R> {
    /// A reader over `input`; `origin` names it in errors.
    pub fn new(input: R, delimiter: u8, origin: impl Into<String>) -> Self {
        CsvRecordReader {
            core: CoreRecord::new(delimiter),
            input,
            buf: vec![0; READ_CHUNK],
            pos: 0,
            filled: 0,
            eof: false,
            line: 1,
            skipped_newlines: 0,
            line_offset: 0,
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
        // Blank lines before a record are skipped here, so that the line reported is the
        // one the record starts on (csv-core would skip them inside the record's read).
        loop {
            self.fill()?;
            match self.buf[self.pos..self.filled].first() {
                Some(b'\n') => self.skipped_newlines += 1,
                Some(b'\r') => {}
                _ => break,
            }
            self.pos += 1;
        }
        let start_line = self.core.rdr.line() + self.skipped_newlines;
        loop {
            self.fill()?;
            let (res, nin) = self.core.feed(&self.buf[self.pos..self.filled]);
            self.pos += nin;
            match res {
                ReadRecordResult::Record => {
                    self.line = self.core.rdr.line() + self.skipped_newlines;
                    return Ok(Some(start_line + self.line_offset));
                }
                ReadRecordResult::End => return Ok(None),
                _ => continue,
            }
        }
    }

    /// Number of fields in the current record.
    pub fn len(&self) -> usize {
        self.core.nfields
    }

    /// True when the current record has no fields.
    pub fn is_empty(&self) -> bool {
        self.core.nfields == 0
    }

    /// Field `i` of the current record, as raw bytes.
    #[inline]
    pub fn field(&self, i: usize) -> &[u8] {
        self.core.field(i)
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

/// Where a byte range of a CSV file should be cut so that it ends on a record boundary:
/// the offset just past the last record-ending `\n`, or `None` if the range holds no complete
/// record. Quote-aware in the way `csv-core` parses: a `"` opens a quoted field only at the
/// start of a field, `""` inside one is an escaped quote, and the field ends at the first
/// other `"`.
///
/// The work is proportional to the number of quotes, not bytes: `memchr` hops from quote to
/// quote to find the quoted regions, then `memrchr` finds the last newline outside them.
pub fn last_record_end(data: &[u8], delimiter: u8) -> Option<usize> {
    // Quoted regions as (opening quote, closing quote or data.len() if unclosed).
    let mut regions: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while let Some(q) = memchr::memchr(b'"', &data[at..]).map(|q| q + at) {
        let field_start =
            q == 0 || matches!(data[q - 1], b'\n' | b'\r') || data[q - 1] == delimiter;
        if !field_start {
            // A quote inside an unquoted field is a literal character.
            at = q + 1;
            continue;
        }
        let mut close = q + 1;
        let end = loop {
            match memchr::memchr(b'"', &data[close..]).map(|c| c + close) {
                Some(c) if data.get(c + 1) == Some(&b'"') => close = c + 2,
                Some(c) => break c,
                None => break data.len(),
            }
        };
        regions.push((q, end));
        at = end + 1;
        if at >= data.len() {
            break;
        }
    }
    let mut limit = data.len();
    loop {
        let p = memchr::memrchr(b'\n', &data[..limit])?;
        // The last region that opens before p: if p lies inside it, look before it.
        let i = regions.partition_point(|r| r.0 < p);
        match i.checked_sub(1).map(|i| regions[i]) {
            Some((open, close)) if p < close => limit = open,
            _ => return Some(p + 1),
        }
    }
}

/// Reads a file in chunks of whole records, remembering each chunk's first line number.
pub(crate) struct Chunker {
    input: File,
    chunk_bytes: usize,
    carry: Vec<u8>,
    eof: bool,
    next_line: u64,
    delimiter: u8,
    bytes_read: Arc<AtomicU64>,
    saw_data: bool,
    origin: String,
    /// Chunks handed back once decoded ([`Chunker::recycler`]): the next read goes into
    /// memory that is already mapped, rather than a fresh megabyte the kernel's copy has to
    /// fault in page by page.
    spare: Receiver<Vec<u8>>,
    recycle: SyncSender<Vec<u8>>,
}

/// Chunks kept for reuse at most; more are freed.
const SPARE_CHUNKS: usize = 4;

impl Chunker {
    /// Chunks of the records after the header `records` has read.
    pub(crate) fn after_header(records: CsvRecordReader<File>, delimiter: u8) -> Self {
        let (recycle, spare) = sync_channel(SPARE_CHUNKS);
        Chunker {
            spare,
            recycle,
            chunk_bytes: READ_CHUNK,
            carry: records.buf[records.pos..records.filled].to_vec(),
            eof: records.eof,
            next_line: records.line,
            delimiter,
            bytes_read: records.bytes_read(),
            saw_data: false,
            origin: records.origin,
            input: records.input,
        }
    }

    /// Where to hand chunks back once they are decoded (from any thread), for reuse.
    pub(crate) fn recycler(&self) -> SyncSender<Vec<u8>> {
        self.recycle.clone()
    }

    /// The next chunk of whole records and the line it starts on.
    pub(crate) fn next_chunk(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        let mut target = self.chunk_bytes;
        loop {
            while self.carry.len() < target && !self.eof {
                // Read into the vector's spare capacity: `read_to_end` on a `File` does not
                // zero it first (filling 1 MiB with zeros per chunk, only for the read to
                // overwrite it, was ≈ 3 % of a send's CPU).
                self.carry.reserve(self.chunk_bytes);
                let limit = self.chunk_bytes as u64;
                match (&mut self.input).take(limit).read_to_end(&mut self.carry) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        return Err(Error::source(
                            &self.origin,
                            format!("read failed after line {}: {e}", self.next_line),
                        ))
                    }
                }
            }
            if self.carry.is_empty() {
                return Ok(None);
            }
            let cut = if self.eof {
                Some(self.carry.len())
            } else {
                last_record_end(&self.carry, self.delimiter)
            };
            match cut {
                Some(c) => {
                    // The unfinished record moves to a buffer with room for the next read: a
                    // chunk handed back if there is one.
                    let mut rest = self.spare.try_recv().unwrap_or_default();
                    rest.clear();
                    rest.reserve(self.carry.len() - c + self.chunk_bytes);
                    rest.extend_from_slice(&self.carry[c..]);
                    self.carry.truncate(c);
                    let chunk = std::mem::replace(&mut self.carry, rest);
                    let first_line = self.next_line;
                    self.next_line += memchr::memchr_iter(b'\n', &chunk).count() as u64;
                    if !self.saw_data {
                        self.saw_data = chunk.iter().any(|b| !b.is_ascii_whitespace());
                    }
                    return Ok(Some((chunk, first_line)));
                }
                // One record longer than the buffer: read more before cutting.
                None => target = self.carry.len() * 2,
            }
        }
    }
}

/// What decoding a chunk needs to know about the file.
struct CsvContext {
    origin: String,
    header: Vec<String>,
    columns: Vec<usize>,
    layout: Arc<RecipientLayout>,
    delimiter: u8,
    /// Value bytes each column held in the last chunk decoded, to size the next chunk's
    /// builders: arrays keep their capacity down the pipeline, so reserving the whole chunk
    /// for every column would multiply the memory in flight.
    column_bytes: Vec<AtomicUsize>,
}

impl CsvContext {
    fn new(
        origin: String,
        header: Vec<String>,
        columns: Vec<usize>,
        layout: Arc<RecipientLayout>,
        delimiter: u8,
    ) -> Self {
        let column_bytes = columns.iter().map(|_| AtomicUsize::new(0)).collect();
        CsvContext {
            origin,
            header,
            columns,
            layout,
            delimiter,
            column_bytes,
        }
    }
}

/// Collects decoded records of one chunk into column builders and per-row errors.
struct ChunkBatch<'a> {
    ctx: &'a CsvContext,
    /// The chunk every field of the fast paths lies in (see `append_short`).
    chunk: &'a [u8],
    builders: Vec<StringColumnBuilder>,
    errors: Vec<(u32, Reason, String)>,
    n: usize,
    /// Fields are cut at ASCII delimiters and lose only ASCII quotes, so if the whole chunk is
    /// valid UTF-8 every field is too; per-field checks are only needed to find a bad one.
    chunk_is_utf8: bool,
}

impl<'a> ChunkBatch<'a> {
    /// A batch for `chunk`, which holds `newlines` newline bytes.
    fn new(ctx: &'a CsvContext, chunk: &'a [u8], newlines: u64) -> Self {
        let rows_hint = newlines as usize + 1;
        ChunkBatch {
            ctx,
            chunk,
            builders: ctx
                .column_bytes
                .iter()
                .map(|last| {
                    // The last chunk's size plus an eighth; before any, an even share.
                    let bytes = match last.load(Ordering::Relaxed) {
                        0 => chunk.len() / ctx.header.len().max(1),
                        n => n + n / 8,
                    };
                    StringColumnBuilder::with_capacity(rows_hint, bytes.min(chunk.len()))
                })
                .collect(),
            errors: Vec::new(),
            n: 0,
            chunk_is_utf8: std::str::from_utf8(chunk).is_ok(),
        }
    }

    fn finish(self) -> Result<RecipientBatch> {
        for (b, last) in self.builders.iter().zip(&self.ctx.column_bytes) {
            last.store(b.values_len(), Ordering::Relaxed);
        }
        let arrays: Vec<ArrayRef> = self
            .builders
            .into_iter()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let columns = RecordBatch::try_new(self.ctx.layout.schema(), arrays)
            .map_err(|e| Error::source(&self.ctx.origin, e.to_string()))?;
        let mut batch = RecipientBatch::new(0, 0, columns);
        batch.trimmed = true;
        for (row, reason, text) in self.errors {
            batch.decide(row as usize, Decision::Errored, reason);
            batch.details.push(RowDetail { row, text });
        }
        Ok(batch)
    }
}

impl Records for ChunkBatch<'_> {
    #[inline]
    fn record<'f>(&mut self, line: u64, got: usize, field: impl Fn(usize) -> &'f [u8]) {
        let ctx = self.ctx;
        // A record of one empty field (csv-core's reading of a blank line, or of `""`) is
        // not a recipient; skip those.
        if got == 1 && field(0).is_empty() {
            return;
        }
        if got != ctx.header.len() {
            self.errors.push((
                self.n as u32,
                Reason::MalformedRow,
                format!(
                    "{}:{line}: expected {} fields, found {got}",
                    ctx.origin,
                    ctx.header.len()
                ),
            ));
            self.builders.iter_mut().for_each(|b| b.append_null());
            self.n += 1;
            return;
        }
        // Each mapped field is validated exactly once, then appended without re-checking.
        let bad = if self.chunk_is_utf8 {
            None
        } else {
            ctx.columns
                .iter()
                .position(|&c| std::str::from_utf8(field(c)).is_err())
        };
        match bad {
            None => {
                for (b, &c) in self.builders.iter_mut().zip(&ctx.columns) {
                    // Trimmed here, while the bytes are copied anyway, so the validate stage
                    // has no second copy to make.
                    // SAFETY: the field is valid UTF-8: either the whole chunk is (see
                    // `chunk_is_utf8`) or the field was checked just above.
                    b.append_trimmed(
                        unsafe { std::str::from_utf8_unchecked(field(c)) },
                        self.chunk,
                    );
                }
            }
            Some(k) => {
                let c = ctx.columns[k];
                self.errors.push((
                    self.n as u32,
                    Reason::InvalidUtf8,
                    format!(
                        "{}:{line}: field {:?} (column {}) is not valid UTF-8",
                        ctx.origin,
                        ctx.header[c],
                        c + 1
                    ),
                ));
                self.builders.iter_mut().for_each(|b| b.append_null());
            }
        }
        self.n += 1;
    }
}

/// Splits one line (terminator removed) into field ranges, if it is simple: no CR, and every
/// `"` that opens a field closes it right before a delimiter or the end of the line with no
/// `"` in between. That covers almost every real row; anything else (escaped quotes, quoted
/// newlines, text after a closing quote, bare CR) returns false and goes to csv-core.
#[inline]
fn split_simple(l: &[u8], delimiter: u8, fields: &mut Vec<(usize, usize)>) -> bool {
    fields.clear();
    if memchr::memchr(b'\r', l).is_some() {
        return false;
    }
    let mut i = 0;
    loop {
        if l.get(i) == Some(&b'"') {
            let Some(close) = memchr::memchr(b'"', &l[i + 1..]).map(|c| c + i + 1) else {
                return false;
            };
            match l.get(close + 1) {
                None => {
                    fields.push((i + 1, close));
                    return true;
                }
                Some(&d) if d == delimiter => {
                    fields.push((i + 1, close));
                    i = close + 2;
                    continue;
                }
                Some(_) => return false,
            }
        }
        // A quote later in an unquoted field is a literal character, as in csv-core.
        match l[i..].iter().position(|&b| b == delimiter) {
            Some(d) => {
                fields.push((i, i + d));
                i += d + 1;
            }
            None => {
                fields.push((i, l.len()));
                return true;
            }
        }
    }
}

/// The common row, cut 16 bytes at a time: finds the newline ending the line that starts
/// `rest` and the delimiters before it with SSE2 compares (part of every x86-64 CPU), and
/// fills `fields` (a CR before the newline is dropped). Returns the newline's index, or `None`
/// when the line holds a quote or another CR, or its newline is not within the whole 16-byte
/// blocks of `rest`; such lines take the general path.
#[cfg(target_arch = "x86_64")]
#[inline]
fn scan_plain_line(rest: &[u8], delimiter: u8, fields: &mut Vec<(usize, usize)>) -> Option<usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    if matches!(delimiter, b'\n' | b'\r' | b'"') {
        return None;
    }
    fields.clear();
    let mut field_start = 0;
    let mut base = 0;
    while base + 16 <= rest.len() {
        // SAFETY: SSE2 is in the x86-64 baseline; the load reads rest[base..base + 16].
        let (nl, odd, delims) = unsafe {
            let v = _mm_loadu_si128(rest.as_ptr().add(base).cast());
            let eq = |b: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8));
            (
                _mm_movemask_epi8(eq(b'\n')) as u32,
                _mm_movemask_epi8(_mm_or_si128(eq(b'"'), eq(b'\r'))) as u32,
                _mm_movemask_epi8(eq(delimiter)) as u32,
            )
        };
        // Bits of the bytes before the newline, if the block has one.
        let within = if nl == 0 {
            0xFFFF
        } else {
            (1u32 << nl.trailing_zeros()) - 1
        };
        let odd = odd & within;
        let at = |bit: u32| base + bit as usize;
        if odd != 0 {
            // The one CR allowed is the CRLF terminator's, right before the newline (which
            // may open the next block).
            let last = 31 - odd.leading_zeros();
            let crlf = odd == 1 << last
                && rest[at(last)] == b'\r'
                && rest.get(at(last) + 1) == Some(&b'\n');
            if !crlf {
                return None;
            }
        }
        let mut d = delims & within;
        while d != 0 {
            let p = at(d.trailing_zeros());
            fields.push((field_start, p));
            field_start = p + 1;
            d &= d - 1;
        }
        if nl != 0 {
            let eol = at(nl.trailing_zeros());
            let end = if eol > field_start && rest[eol - 1] == b'\r' {
                eol - 1
            } else {
                eol
            };
            fields.push((field_start, end));
            return Some(eol);
        }
        base += 16;
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn scan_plain_line(_: &[u8], _: u8, _: &mut Vec<(usize, usize)>) -> Option<usize> {
    None
}

/// Receives the records of a chunk, in order.
pub(crate) trait Records {
    /// One record of `got` fields starting on `line`; `field(i)` gives field i's bytes
    /// (quotes removed). Blank lines are skipped before they get here, but a record of one
    /// empty field (a line holding only `""`) arrives, as csv-core reads it.
    fn record<'f>(&mut self, line: u64, got: usize, field: impl Fn(usize) -> &'f [u8]);

    /// False once the receiver wants no more records (it met an error).
    fn wants_more(&self) -> bool {
        true
    }
}

/// Cuts a chunk of whole records (first on `first_line`) and hands each to `out`.
///
/// Rows are cut by hand (find the line end, split at delimiters, unwrap simply quoted
/// fields), which is several times faster than csv-core's byte-at-a-time state machine; a row
/// that is not that simple is read by csv-core from where it starts, so the result is
/// csv-core's in every case (a property test compares the two on arbitrary input).
pub(crate) fn cut_records(chunk: &[u8], first_line: u64, delimiter: u8, out: &mut impl Records) {
    // csv-core, for the rows `split_simple` declines.
    let mut core: Option<CoreRecord> = None;
    let mut fields: Vec<(usize, usize)> = Vec::with_capacity(16);
    let mut line = first_line;
    let mut pos = 0;
    while pos < chunk.len() && out.wants_more() {
        // Blank lines before a record belong to no record, but count towards line numbers.
        match chunk[pos] {
            b'\n' => {
                line += 1;
                pos += 1;
                continue;
            }
            b'\r' => {
                pos += 1;
                continue;
            }
            _ => {}
        }
        let rest = &chunk[pos..];
        if let Some(eol) = scan_plain_line(rest, delimiter, &mut fields) {
            out.record(line, fields.len(), |i| &rest[fields[i].0..fields[i].1]);
            line += 1;
            pos += eol + 1;
            continue;
        }
        let (eol, next) = match memchr::memchr(b'\n', rest) {
            Some(e) => (e, e + 1),
            None => (rest.len(), rest.len()),
        };
        let l = &rest[..eol];
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if split_simple(l, delimiter, &mut fields) {
            out.record(line, fields.len(), |i| &l[fields[i].0..fields[i].1]);
            line += (next > eol) as u64;
            pos += next;
            continue;
        }
        let core = core.get_or_insert_with(|| CoreRecord {
            keep_leading_bom: true,
            ..CoreRecord::new(delimiter)
        });
        let Some(used) = core.read_one(rest) else {
            break;
        };
        out.record(line, core.nfields, |i| core.field(i));
        line += memchr::memchr_iter(b'\n', &rest[..used]).count() as u64;
        pos += used;
    }
}

/// Decodes one chunk of whole records into a batch (runs on a worker thread).
fn decode_chunk(
    ctx: &CsvContext,
    chunk: &[u8],
    first_line: u64,
    newlines: u64,
) -> Result<RecipientBatch> {
    let mut out = ChunkBatch::new(ctx, chunk, newlines);
    cut_records(chunk, first_line, ctx.delimiter, &mut out);
    out.finish()
}

/// Recipients from a CSV file with a header row. The source thread only cuts the file into
/// chunks of whole records; worker threads decode them ([`Source::next_item`]).
pub struct CsvSource {
    path: PathBuf,
    ctx: Arc<CsvContext>,
    chunker: Chunker,
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
            chunker: Chunker::after_header(records, delimiter),
            ctx: Arc::new(CsvContext::new(origin, header, columns, layout, delimiter)),
            total_bytes,
        })
    }

    /// Sets the chunk size handed to each worker (default 1 MiB, about 8 000 rows).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunker.chunk_bytes = bytes.max(1);
        self
    }

    /// Progress information: bytes read of the file's size.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint {
            total_rows: None,
            bytes: Some((self.total_bytes, self.chunker.bytes_read.clone())),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for CsvSource {
    fn describe(&self) -> String {
        self.ctx.origin.clone()
    }

    fn next_item(&mut self) -> Result<Option<SourceItem>> {
        match self.chunker.next_chunk()? {
            Some((chunk, first_line)) => {
                let ctx = self.ctx.clone();
                // The chunker counted the chunk's newlines to number the next one.
                let newlines = self.chunker.next_line - first_line;
                let recycle = self.chunker.recycler();
                Ok(Some(SourceItem::Raw(Box::new(move || {
                    let batch = decode_chunk(&ctx, &chunk, first_line, newlines);
                    // The batch holds copies of the values: the chunk can be read into again.
                    let _ = recycle.try_send(chunk);
                    batch
                }))))
            }
            None if !self.chunker.saw_data => Err(Error::source(
                &self.ctx.origin,
                "the file has a header but no recipient rows",
            )),
            None => Ok(None),
        }
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        self.next_item()?.map(SourceItem::into_batch).transpose()
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
    fn blank_lines_before_a_record_count_towards_its_line() {
        // Found by the chunking property test: the record after blank lines was reported on
        // the first blank line when read whole, and on its own line when read in chunks.
        let data = b"a,b\n\n\r\n\n1,2\r\n\r\n\"x\n";
        let mut r = CsvRecordReader::new(Cursor::new(&data[..]), b',', "t.csv");
        assert_eq!(r.read_record().unwrap(), Some(1));
        assert_eq!(r.read_record().unwrap(), Some(5));
        assert_eq!(r.field(1), b"2");
        assert_eq!(r.read_record().unwrap(), Some(7));
        assert_eq!(r.field(0), b"x\n");
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
    fn record_ends_respect_quotes() {
        assert_eq!(last_record_end(b"a,b\nc,d", b','), Some(4));
        assert_eq!(last_record_end(b"a,\"x\ny\"\nc", b','), Some(8));
        assert_eq!(last_record_end(b"a,\"x\ny", b','), None);
        // A stray quote inside an unquoted field does not open a quoted field.
        assert_eq!(
            last_record_end(b"5\" tall,b\nc,\"q\nq\"\nd", b','),
            Some(18)
        );
        // An escaped quote keeps the field open.
        assert_eq!(last_record_end(b"\"a\"\"\nb\"\n", b','), Some(8));
    }

    /// Fuzz find (`csv_records` target): a row starting with a UTF-8 BOM (files concatenated
    /// from Excel exports) lost the BOM when the row began a chunk and kept it otherwise, so
    /// the email read depended on where the file was cut.
    #[test]
    fn fuzz_bom_at_a_chunk_start_is_kept_like_anywhere_else() {
        // The header reader takes the first READ_CHUNK bytes, which here end on a row, so the
        // BOM row starts the next chunk.
        let rows = (READ_CHUNK - 4) / 9;
        assert_eq!(4 + rows * 9, READ_CHUNK);
        let mut text = b"e,f\n".to_vec();
        text.extend(b"a@x.io,A\n".repeat(rows));
        text.extend(b"\xEF\xBB\xBFb@x.io,B\n");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.csv");
        std::fs::write(&p, &text).unwrap();
        let layout = Arc::new(RecipientLayout::new(
            &[
                broadside_pipeline::model::StdField::Email,
                broadside_pipeline::model::StdField::FirstName,
            ],
            &[],
        ));
        let whole = decode_all(&p, 1 << 20, layout.clone()).unwrap();
        assert_eq!(whole[rows].0[0].as_deref(), Some("\u{feff}b@x.io"));
        let chunked = decode_all(&p, 64, layout).unwrap();
        assert_eq!(chunked[rows].0[0].as_deref(), Some("\u{feff}b@x.io"));
        assert!(chunked == whole);
    }

    type Decoded = Vec<(Vec<Option<String>>, Decision, Option<String>)>;

    fn decode_all(
        path: &Path,
        chunk: usize,
        layout: Arc<RecipientLayout>,
    ) -> std::result::Result<Decoded, String> {
        let mapping = vec![
            ("email".to_string(), "e".to_string()),
            ("first_name".to_string(), "f".to_string()),
        ];
        let mut src = CsvSource::open(path, b',', &mapping, layout)
            .unwrap()
            .with_chunk_bytes(chunk);
        let mut out = Vec::new();
        let mut row = 0u64;
        while let Some(b) = src.next_batch().map_err(|e| e.to_string())? {
            for i in 0..b.len() {
                let vals = (0..2)
                    .map(|c| {
                        b.column(c)
                            .is_valid(i)
                            .then(|| b.column(c).value(i).to_string())
                    })
                    .collect();
                out.push((vals, b.decisions[i], b.detail(i).map(str::to_string)));
            }
            row += b.len() as u64;
        }
        assert_eq!(row as usize, out.len());
        Ok(out)
    }

    proptest::proptest! {
        /// Cutting the file into tiny chunks decodes exactly like reading it whole:
        /// same rows, values, errors and line numbers.
        #[test]
        fn chunked_decoding_equals_whole_file(
            rows in proptest::collection::vec(
                proptest::collection::vec("[a-z\",\n ]{0,6}", 1..4), 1..40),
            chunk in 1usize..64,
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("r.csv");
            let mut text = String::from("e,f\n");
            for r in &rows {
                let fields: Vec<String> = r
                    .iter()
                    .map(|f| {
                        if f.contains([',', '\n', '"']) && !f.starts_with('x') {
                            format!("\"{}\"", f.replace('"', "\"\""))
                        } else {
                            f.clone()
                        }
                    })
                    .collect();
                text.push_str(&fields.join(","));
                text.push('\n');
            }
            std::fs::write(&p, &text).unwrap();
            let layout = Arc::new(RecipientLayout::new(
                &[broadside_pipeline::model::StdField::Email, broadside_pipeline::model::StdField::FirstName],
                &[],
            ));
            let whole = decode_all(&p, 1 << 20, layout.clone());
            let chunked = decode_all(&p, chunk, layout);
            proptest::prop_assert_eq!(whole, chunked);
        }
    }

    /// Decoding a chunk record by record with csv-core alone (how chunks were decoded before
    /// the hand-cut fast path): the reference `decode_chunk` must agree with.
    fn decode_chunk_with_csv_core(
        ctx: &CsvContext,
        chunk: &[u8],
        first_line: u64,
    ) -> RecipientBatch {
        let mut records = CsvRecordReader::new(chunk, ctx.delimiter, ctx.origin.clone());
        records.line_offset = first_line - 1;
        records.core.keep_leading_bom = true;
        let newlines = memchr::memchr_iter(b'\n', chunk).count() as u64;
        let mut out = ChunkBatch::new(ctx, chunk, newlines);
        while let Some(line) = records.read_record().unwrap() {
            out.record(line, records.len(), |i| records.field(i));
        }
        out.finish().unwrap()
    }

    fn batch_rows(b: &RecipientBatch) -> Decoded {
        (0..b.len())
            .map(|i| {
                let vals = (0..b.columns.num_columns())
                    .map(|c| {
                        b.column(c)
                            .is_valid(i)
                            .then(|| b.column(c).value(i).to_string())
                    })
                    .collect();
                (vals, b.decisions[i], b.detail(i).map(str::to_string))
            })
            .collect()
    }

    proptest::proptest! {
        /// The hand-cut fast path decodes any chunk exactly as csv-core does: values, blank
        /// lines, CR/CRLF/LF endings, quotes in every position, BOMs, bad UTF-8, field counts
        /// and line numbers.
        #[test]
        fn fast_path_decodes_like_csv_core(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-c ]{1,4}",
                    proptest::strategy::Just(",".to_string()),
                    proptest::strategy::Just(";".to_string()),
                    proptest::strategy::Just("\"".to_string()),
                    proptest::strategy::Just("\"\"".to_string()),
                    proptest::strategy::Just("\n".to_string()),
                    proptest::strategy::Just("\r\n".to_string()),
                    proptest::strategy::Just("\r".to_string()),
                    proptest::strategy::Just("\u{feff}".to_string()),
                    proptest::strategy::Just(" é\u{a0}".to_string()),
                ],
                0..60),
            bad_utf8 in proptest::option::of(0usize..60),
            delimiter in proptest::sample::select(vec![b',', b';']),
            first_line in 1u64..1000,
        ) {
            let mut chunk: Vec<u8> = parts.concat().into_bytes();
            if let Some(at) = bad_utf8 {
                chunk.insert(at.min(chunk.len()), 0xff);
            }
            let layout = Arc::new(RecipientLayout::new(
                &[
                    broadside_pipeline::model::StdField::Email,
                    broadside_pipeline::model::StdField::FirstName,
                ],
                &[],
            ));
            let ctx = CsvContext::new(
                "p.csv".into(),
                vec!["e".into(), "x".into(), "f".into()],
                vec![0, 2],
                layout,
                delimiter,
            );
            let newlines = memchr::memchr_iter(b'\n', &chunk).count() as u64;
            let fast = decode_chunk(&ctx, &chunk, first_line, newlines).unwrap();
            let reference = decode_chunk_with_csv_core(&ctx, &chunk, first_line);
            proptest::prop_assert_eq!(batch_rows(&fast), batch_rows(&reference), "{:?}", String::from_utf8_lossy(&chunk));
        }
    }

    #[test]
    fn simple_rows_are_cut_by_hand_and_the_rest_by_csv_core() {
        let mut f = Vec::new();
        assert!(split_simple(b"a,\"b c\",,d", b',', &mut f));
        assert_eq!(f, [(0, 1), (3, 6), (8, 8), (9, 10)]);
        assert!(split_simple(b"5\" tall,x", b',', &mut f));
        assert_eq!(f, [(0, 7), (8, 9)]);
        for declined in [&b"\"a\"\"b\",c"[..], b"\"open", b"\"a\" ,b", b"a\rb"] {
            assert!(!split_simple(declined, b',', &mut f), "{declined:?}");
        }
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
