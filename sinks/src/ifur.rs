//! The IFUR merge-file format (documented in `docs/ifur.md`), its encoder and its reader.
//!
//! ```text
//! H|IFUR|1|<campaign_id>|<variant>|<template>|<file_seq>|<field>|<field>|...\r\n
//! D|<key>|<value>|<value>|...\r\n          one per recipient, values in header field order
//! T|<detail_count>|<checksum>\r\n         checksum = xxh3-64 (hex) of every D line, CRLF included
//! ```
//!
//! Escaping makes any value round-trip and guarantees that `|`, CR and LF never occur inside a
//! value: `\` → `\\`, `|` → `\p`, CR → `\r`, LF → `\n`. Absent values are empty.

use std::sync::Arc;

use arrow_array::{Array, StringArray};
use broadside_pipeline::model::{RecipientBatch, RecipientLayout};
use broadside_pipeline::stages::Stage;
use broadside_pipeline::strings::{append_short, copy_short};
use broadside_pipeline::Result;
use xxhash_rust::xxh3::Xxh3;

use crate::SinkError;

/// The format version written in headers.
pub const VERSION: u32 = 1;

/// Bytes that must be escaped.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    t[b'\\' as usize] = true;
    t[b'|' as usize] = true;
    t[b'\r' as usize] = true;
    t[b'\n' as usize] = true;
    t
};

/// Appends `value` escaped.
#[inline]
pub fn escape_into(out: &mut Vec<u8>, value: &str) {
    escape_bytes_into(out, value.as_bytes());
}

#[inline]
fn escape_bytes_into(out: &mut Vec<u8>, b: &[u8]) {
    if !b.iter().any(|c| NEEDS_ESCAPE[*c as usize]) {
        out.extend_from_slice(b);
        return;
    }
    for &c in b {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'|' => out.extend_from_slice(b"\\p"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(c),
        }
    }
}

/// Reverses [`escape_into`]; `None` for a dangling or unknown escape.
pub fn unescape(field: &str) -> Option<String> {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            'p' => '|',
            'r' => '\r',
            'n' => '\n',
            _ => return None,
        });
    }
    Some(out)
}

/// The header line of a file (CRLF included).
pub fn header_line(
    campaign: &str,
    variant: &str,
    template: &str,
    seq: u32,
    fields: &[String],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"H|IFUR|");
    out.extend_from_slice(VERSION.to_string().as_bytes());
    for v in [campaign, variant, template, &seq.to_string()] {
        out.push(b'|');
        escape_into(&mut out, v);
    }
    for f in fields {
        out.push(b'|');
        escape_into(&mut out, f);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The trailer line (CRLF included).
pub fn trailer_line(count: u64, checksum: u64) -> Vec<u8> {
    format!("T|{count}|{checksum:016x}\r\n").into_bytes()
}

/// Encodes the detail line of every row that will be sent (pending, with a variant).
/// Runs on the worker threads, so the ordered writer only copies bytes.
#[derive(Debug, Clone)]
pub struct IfurEncoder {
    layout: Arc<RecipientLayout>,
}

impl IfurEncoder {
    /// An encoder for batches of this layout.
    pub fn new(layout: Arc<RecipientLayout>) -> Self {
        IfurEncoder { layout }
    }
}

impl Stage for IfurEncoder {
    fn name(&self) -> &'static str {
        "ifur-encode"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        // Raw views of the columns: offsets and bytes, so the per-row loop does no Arrow
        // bookkeeping beyond a null-bit test.
        let ncols = self.layout.names().len();
        let arrays: Vec<StringArray> = (0..ncols).map(|c| batch.column(c).clone()).collect();
        let mut cols: Vec<RawStrings<'_>> = arrays.iter().map(RawStrings::new).collect();
        let keys = batch.keys.clone();
        if let Some(k) = keys.as_ref() {
            cols.insert(0, RawStrings::new(k));
        }
        let has_key = keys.is_some();
        let mut payload = std::mem::take(&mut batch.payload);
        payload.clear();
        let bytes: usize = cols.iter().map(|c| c.data.len()).sum();
        // Plus slack for the block copies of `append_short`.
        payload.reserve(bytes + batch.len() * (ncols + 4) + 64);
        let mut ends = std::mem::take(&mut batch.payload_ends);
        ends.clear();
        ends.reserve(batch.len());
        if cols.iter().all(|c| c.clean) {
            // Nothing to escape: each line is at most its values plus `ncols + 4` bytes (the
            // record type, a `|` per field and for a missing key, CRLF), all reserved above
            // with 64 bytes to spare for block copies, so it is written without a capacity
            // check per byte.
            let base = payload.as_mut_ptr();
            let mut len = payload.len();
            for i in 0..batch.len() {
                if batch.sendable(i) {
                    // SAFETY: `len` stays within the capacity reserved above (see the
                    // comment), block copies write at most 15 bytes past a value, within the
                    // 64 spare; the columns are other buffers than `payload`.
                    unsafe {
                        *base.add(len) = b'D';
                        len += 1;
                        if !has_key {
                            *base.add(len) = b'|';
                            len += 1;
                        }
                        for c in &cols {
                            *base.add(len) = b'|';
                            len += 1;
                            if let Some(v) = c.get(i) {
                                len += copy_short(base.add(len), v, c.data);
                            }
                        }
                        base.add(len).cast::<[u8; 2]>().write_unaligned(*b"\r\n");
                        len += 2;
                    }
                }
                ends.push(len as u32);
            }
            debug_assert!(len + 15 <= payload.capacity());
            // SAFETY: bytes up to `len` were all written above.
            unsafe { payload.set_len(len) };
            batch.payload = payload;
            batch.payload_ends = ends;
            return Ok(());
        }
        for i in 0..batch.len() {
            if batch.sendable(i) {
                payload.push(b'D');
                if !has_key {
                    payload.push(b'|');
                }
                for c in &cols {
                    payload.push(b'|');
                    match c.get(i) {
                        Some(v) if c.clean => append_short(&mut payload, v, c.data),
                        Some(v) => escape_bytes_into(&mut payload, v),
                        None => {}
                    }
                }
                payload.extend_from_slice(b"\r\n");
            }
            ends.push(payload.len() as u32);
        }
        batch.payload = payload;
        batch.payload_ends = ends;
        Ok(())
    }
}

/// A string column as its offsets, bytes and null bits.
struct RawStrings<'a> {
    offsets: &'a [i32],
    data: &'a [u8],
    nulls: Option<&'a arrow_buffer::NullBuffer>,
    /// No byte of the column needs escaping (the usual case), so values are copied as they
    /// are. One vectorised scan of the column replaces a table lookup per byte.
    clean: bool,
}

impl<'a> RawStrings<'a> {
    fn new(a: &'a StringArray) -> Self {
        let data = a.value_data();
        RawStrings {
            offsets: a.value_offsets(),
            data,
            nulls: a.nulls(),
            clean: memchr::memchr3(b'\\', b'|', b'\r', data).is_none()
                && memchr::memchr(b'\n', data).is_none(),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<&'a [u8]> {
        if self.nulls.is_some_and(|n| n.is_null(i)) {
            return None;
        }
        Some(&self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize])
    }
}

/// A parsed IFUR file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfurFile {
    /// Campaign id from the header.
    pub campaign: String,
    /// Variant name.
    pub variant: String,
    /// Template name.
    pub template: String,
    /// File sequence number within the variant.
    pub seq: u32,
    /// Field names (after the key).
    pub fields: Vec<String>,
    /// Detail records: key, then values.
    pub details: Vec<(String, Vec<String>)>,
    /// Checksum from the trailer.
    pub checksum: u64,
}

fn bad(msg: impl Into<String>) -> SinkError {
    SinkError::Format(msg.into())
}

/// Parses and verifies a whole IFUR file: header, details, count and checksum.
pub fn parse(bytes: &[u8]) -> std::result::Result<IfurFile, SinkError> {
    let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    if !text.ends_with("\r\n") {
        return Err(bad("the file does not end with CRLF (truncated?)"));
    }
    let lines: Vec<&str> = text[..text.len() - 2].split("\r\n").collect();
    if lines.len() < 2 {
        return Err(bad("a file needs at least a header and a trailer"));
    }
    let head: Vec<&str> = lines[0].split('|').collect();
    if head.len() < 7 || head[0] != "H" || head[1] != "IFUR" {
        return Err(bad("line 1 is not an IFUR header"));
    }
    if head[2] != VERSION.to_string() {
        return Err(bad(format!("unsupported IFUR version {}", head[2])));
    }
    let un =
        |s: &str, line: usize| unescape(s).ok_or_else(|| bad(format!("line {line}: bad escape")));
    let fields: Vec<String> = head[7..]
        .iter()
        .map(|f| un(f, 1))
        .collect::<std::result::Result<_, _>>()?;
    let mut hasher = Xxh3::new();
    let mut details = Vec::with_capacity(lines.len() - 2);
    for (n, line) in lines[1..lines.len() - 1].iter().enumerate() {
        let lineno = n + 2;
        let parts: Vec<&str> = line.split('|').collect();
        if parts[0] != "D" || parts.len() != fields.len() + 2 {
            return Err(bad(format!(
                "line {lineno}: expected a detail record with {} values",
                fields.len()
            )));
        }
        hasher.update(line.as_bytes());
        hasher.update(b"\r\n");
        let key = un(parts[1], lineno)?;
        let values = parts[2..]
            .iter()
            .map(|v| un(v, lineno))
            .collect::<std::result::Result<_, _>>()?;
        details.push((key, values));
    }
    let tail: Vec<&str> = lines[lines.len() - 1].split('|').collect();
    if tail.len() != 3 || tail[0] != "T" {
        return Err(bad("the last line is not a trailer (truncated?)"));
    }
    let count: usize = tail[1]
        .parse()
        .map_err(|_| bad("trailer count is not a number"))?;
    let checksum =
        u64::from_str_radix(tail[2], 16).map_err(|_| bad("trailer checksum is not hex"))?;
    if count != details.len() {
        return Err(bad(format!(
            "trailer says {count} records, the file has {}",
            details.len()
        )));
    }
    if checksum != hasher.digest() {
        return Err(bad("checksum mismatch"));
    }
    Ok(IfurFile {
        campaign: un(head[3], 1)?,
        variant: un(head[4], 1)?,
        template: un(head[5], 1)?,
        seq: head[6]
            .parse()
            .map_err(|_| bad("header file sequence is not a number"))?,
        fields,
        details,
        checksum,
    })
}

/// Reads just the trailer (count, checksum) of a file on disk, for resume checks.
pub fn read_trailer(path: &std::path::Path) -> std::result::Result<(u64, u64), SinkError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let take = len.min(64);
    f.seek(SeekFrom::Start(len - take))
        .map_err(|e| bad(e.to_string()))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&tail);
    let line = text
        .trim_end_matches("\r\n")
        .rsplit("\r\n")
        .next()
        .unwrap_or_default();
    let parts: Vec<&str> = line.split('|').collect();
    if parts.len() != 3 || parts[0] != "T" {
        return Err(bad(format!("{}: no trailer", path.display())));
    }
    let count = parts[1].parse().map_err(|_| bad("trailer count"))?;
    let sum = u64::from_str_radix(parts[2], 16).map_err(|_| bad("trailer checksum"))?;
    Ok((count, sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn escaping_round_trips_anything(s in "\\PC*|[\\\\|\r\n]{0,8}") {
            let mut out = Vec::new();
            escape_into(&mut out, &s);
            let enc = String::from_utf8(out).unwrap();
            prop_assert!(!enc.contains('|') && !enc.contains('\r') && !enc.contains('\n'));
            prop_assert_eq!(unescape(&enc).unwrap(), s);
        }
    }

    /// A test row: email, first name, note, and whether it is sent.
    type TestRow = (String, Option<String>, Option<String>, bool);

    /// A batch of `rows`, keyed by the lowercased email, with a variant per row, after the
    /// encoder.
    fn encoded(rows: &[TestRow]) -> RecipientBatch {
        use arrow_array::{ArrayRef, RecordBatch};
        use broadside_pipeline::model::{Decision, Reason, StdField};
        let layout = Arc::new(RecipientLayout::new(
            &[StdField::Email, StdField::FirstName],
            &["note".to_string()],
        ));
        let col = |f: &dyn Fn(&TestRow) -> Option<String>| {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef
        };
        let columns = RecordBatch::try_new(
            layout.schema(),
            vec![
                col(&|r| Some(r.0.clone())),
                col(&|r| r.1.clone()),
                col(&|r| r.2.clone()),
            ],
        )
        .unwrap();
        let mut b = RecipientBatch::new(0, 0, columns);
        b.keys = Some(StringArray::from(
            rows.iter()
                .map(|r| Some(r.0.to_lowercase()))
                .collect::<Vec<_>>(),
        ));
        for (i, r) in rows.iter().enumerate() {
            b.variants[i] = (i % 2) as u8;
            if !r.3 {
                b.decide(i, Decision::Suppressed, Reason::HardBounce);
            }
        }
        IfurEncoder::new(layout).process(&mut b).unwrap();
        b
    }

    proptest! {
        /// Each row's line is its fields escaped, in order, and only sendable rows have one,
        /// across blocks of gathered spans and whatever the nulls; with `plain`, no field
        /// needs escaping (the encoder's unchecked path).
        #[test]
        fn lines_are_the_rows_fields(
            plain in proptest::bool::ANY,
            rows in proptest::collection::vec(
                (
                    "[a-zA-Z@.]{1,12}",
                    proptest::option::of("[a-z|\\\\\r\n ]{0,6}"),
                    proptest::option::of("[a-zé]{0,40}"),
                    proptest::bool::weighted(0.8),
                ),
                0..300,
            ),
        ) {
            let mut rows = rows;
            if plain {
                for r in &mut rows {
                    r.1 = r.1.take().map(|v| v.replace(['|', '\\', '\r', '\n'], "x"));
                }
            }
            let b = encoded(&rows);
            let mut want = Vec::new();
            for (i, (email, first, note, sendable)) in rows.iter().enumerate() {
                if *sendable {
                    want.extend_from_slice(b"D|");
                    escape_into(&mut want, &email.to_lowercase());
                    for v in [Some(email), first.as_ref(), note.as_ref()] {
                        want.push(b'|');
                        escape_into(&mut want, v.map_or("", |v| v.as_str()));
                    }
                    want.extend_from_slice(b"\r\n");
                }
                prop_assert_eq!(b.payload_ends[i] as usize, want.len(), "row {}", i);
            }
            prop_assert_eq!(String::from_utf8_lossy(&b.payload), String::from_utf8_lossy(&want));
        }
    }

    #[test]
    fn unescape_rejects_dangling_escape() {
        assert_eq!(unescape("abc\\"), None);
        assert_eq!(unescape("\\x"), None);
    }
}
