//! Dictionary-encoded string column chunks written straight from dictionary keys.
//!
//! parquet-rs dictionary-encodes a string column by hashing and comparing every value, even
//! when the Arrow array already is a dictionary: on the send path that was about a tenth of
//! all CPU, for columns whose values the send already holds as small codes (decision,
//! reason, variant, list, IFUR file) or which are the same on every row of a file (campaign,
//! run, event type). A [`CodedColumn`] takes such a column as an Arrow dictionary array,
//! remaps the batch's dictionary to the chunk's once per batch, keeps one code per row, and
//! builds the column chunk itself: a PLAIN dictionary page, then RLE_DICTIONARY data pages
//! of about `page_rows` rows each (Parquet v1, uncompressed: the codes are a few bits per
//! row) with the definition levels and codes in the RLE / bit-packed hybrid, encoded as they
//! fill. [`crate::parts::PartWriter`] splices the chunk into the row group next to the
//! columns parquet-rs encodes.

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_array::{Array, ArrayRef, StringArray};
use arrow_buffer::BooleanBufferBuilder;
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::basic::{Compression, Encoding};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, OffsetIndexBuilder};
use parquet::file::statistics::Statistics;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

/// One row group's worth of a dictionary-encoded string column.
#[derive(Debug)]
pub struct CodedColumn {
    descr: ColumnDescPtr,
    /// Rows after which the open data page is encoded.
    page_rows: usize,
    /// The chunk's dictionary, in first-seen order.
    dict: Vec<Box<str>>,
    lookup: HashMap<Box<str>, u32>,
    /// The remap of the last batch dictionary seen (batches of one sink share it).
    last: Option<(StringArray, Vec<u32>)>,
    /// Open page: one code per non-null row.
    codes: Vec<u32>,
    /// Open page: validity, one bit per row.
    valid: BooleanBufferBuilder,
    /// Open page: rows.
    page_len: usize,
    /// Encoded data pages (levels, bit width, codes) and their row counts.
    pages: Vec<(Vec<u8>, usize)>,
    /// Whether the chunk carries min/max and null count.
    statistics: bool,
    /// Dictionary entries some row of the chunk uses (kept for statistics only).
    used: Vec<bool>,
    rows: usize,
    nulls: usize,
}

impl CodedColumn {
    /// An empty chunk of column `descr`, cut into data pages of about `page_rows` rows;
    /// `statistics` asks for chunk min/max (from the dictionary entries used) and null count.
    pub fn new(descr: ColumnDescPtr, page_rows: usize, statistics: bool) -> Self {
        CodedColumn {
            descr,
            page_rows: page_rows.max(1),
            statistics,
            dict: Vec::new(),
            lookup: HashMap::new(),
            last: None,
            codes: Vec::new(),
            valid: BooleanBufferBuilder::new(0),
            page_len: 0,
            pages: Vec::new(),
            used: Vec::new(),
            rows: 0,
            nulls: 0,
        }
    }

    /// Appends a `Dictionary(Int32, Utf8)` array (the only type this column takes).
    pub fn append(&mut self, column: &ArrayRef) -> Result<()> {
        let DataType::Dictionary(k, v) = column.data_type() else {
            return Err(unsupported(column.data_type()));
        };
        if **k != DataType::Int32 || **v != DataType::Utf8 {
            return Err(unsupported(column.data_type()));
        }
        let dict = column.as_dictionary::<Int32Type>();
        let values = dict.values().as_string::<i32>();
        let remap = self.remap(values);
        let keys = dict.keys();
        let n = keys.len();
        // Negative keys wrap to large ones; one pass finds any key out of range.
        let out_of_range = |max: Option<u32>| match max {
            Some(k) if k as usize >= remap.len() => Err(ParquetError::General(format!(
                "dictionary key {} out of range ({} values)",
                k as i32,
                remap.len()
            ))),
            _ => Ok(()),
        };
        match keys.nulls().filter(|nulls| nulls.null_count() > 0) {
            None => {
                out_of_range(keys.values().iter().map(|&k| k as u32).max())?;
                self.codes
                    .extend(keys.values().iter().map(|&k| remap[k as usize]));
                self.valid.append_n(n, true);
            }
            Some(nulls) => {
                out_of_range(nulls.valid_indices().map(|i| keys.values()[i] as u32).max())?;
                self.codes.extend(
                    nulls
                        .valid_indices()
                        .map(|i| remap[keys.values()[i] as usize]),
                );
                self.valid.append_buffer(nulls.inner());
            }
        }
        self.rows += n;
        self.page_len += n;
        if self.page_len >= self.page_rows {
            self.encode_page()?;
        }
        Ok(())
    }

    /// The chunk codes of a batch dictionary's entries, reused while batches share one
    /// dictionary array (its buffers are reference-counted, so comparing is cheap).
    fn remap(&mut self, values: &StringArray) -> Vec<u32> {
        if let Some((last, remap)) = &self.last {
            if last.to_data().ptr_eq(&values.to_data()) {
                return remap.clone();
            }
        }
        let remap: Vec<u32> = values
            .iter()
            .map(|v| {
                let v = v.unwrap_or_default();
                match self.lookup.get(v) {
                    Some(&c) => c,
                    None => {
                        let c = self.dict.len() as u32;
                        self.dict.push(v.into());
                        self.lookup.insert(v.into(), c);
                        c
                    }
                }
            })
            .collect();
        self.last = Some((values.clone(), remap.clone()));
        remap
    }

    /// Encodes the open page: definition levels (length-prefixed), bit width, codes. Each
    /// page has its own bit width, so pages are final before the dictionary is.
    fn encode_page(&mut self) -> Result<()> {
        let rows = self.page_len;
        if rows == 0 {
            return Ok(());
        }
        let nulls = rows - self.codes.len();
        let mut data = Vec::new();
        if self.descr.max_def_level() > 0 {
            let valid = self.valid.finish();
            let mut levels = Vec::new();
            if nulls == 0 || nulls == rows {
                rle(&mut levels, 1, rows, (nulls == 0) as u32);
            } else {
                // Levels of width 1 bit-packed LSB first are the validity bitmap itself.
                bitmap_packed(&mut levels, valid.values(), rows);
            }
            data.extend_from_slice(&(levels.len() as u32).to_le_bytes());
            data.extend_from_slice(&levels);
        } else if nulls > 0 {
            return Err(ParquetError::General(format!(
                "{nulls} nulls in required column {}",
                self.descr.path()
            )));
        }
        let width = bit_width(self.dict.len().saturating_sub(1) as u32);
        data.push(width);
        hybrid(&mut data, width, &self.codes);

        if self.statistics {
            self.used.resize(self.dict.len(), false);
            if self.dict.len() == 1 {
                self.used[0] |= !self.codes.is_empty();
            } else {
                for &c in &self.codes {
                    self.used[c as usize] = true;
                }
            }
        }
        self.pages.push((data, rows));
        self.nulls += nulls;
        self.codes.clear();
        self.valid = BooleanBufferBuilder::new(self.page_rows);
        self.page_len = 0;
        Ok(())
    }

    /// Encodes the chunk and resets this column for the next row group.
    pub fn finish(&mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.encode_page()?;
        // Dictionary page: PLAIN byte arrays.
        let mut plain = Vec::new();
        for v in &self.dict {
            plain.extend_from_slice(&(v.len() as u32).to_le_bytes());
            plain.extend_from_slice(v.as_bytes());
        }

        let mut sink = TrackedWrite::new(Vec::new());
        let mut writer = SerializedPageWriter::new(&mut sink);
        let dict_len = plain.len();
        let dict_page = writer.write_page(CompressedPage::new(
            Page::DictionaryPage {
                buf: Bytes::from(plain),
                num_values: self.dict.len() as u32,
                encoding: Encoding::PLAIN,
                is_sorted: false,
            },
            dict_len,
        ))?;
        let mut offsets = OffsetIndexBuilder::new();
        let mut first_data_page = None;
        for (data, rows) in std::mem::take(&mut self.pages) {
            let len = data.len();
            let spec = writer.write_page(CompressedPage::new(
                Page::DataPage {
                    buf: Bytes::from(data),
                    num_values: rows as u32,
                    encoding: Encoding::RLE_DICTIONARY,
                    def_level_encoding: Encoding::RLE,
                    rep_level_encoding: Encoding::RLE,
                    statistics: None,
                },
                len,
            ))?;
            first_data_page.get_or_insert(spec.offset);
            offsets.append_row_count(rows as i64);
            offsets.append_offset_and_size(spec.offset as i64, spec.bytes_written as i32);
        }
        writer.close()?;
        let buf = sink.into_inner()?;
        let total = buf.len() as i64;

        let mut meta = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(Compression::UNCOMPRESSED)
            .set_encodings(vec![
                Encoding::PLAIN,
                Encoding::RLE,
                Encoding::RLE_DICTIONARY,
            ])
            .set_num_values(self.rows as i64)
            .set_total_compressed_size(total)
            .set_total_uncompressed_size(total)
            .set_dictionary_page_offset(Some(dict_page.offset as i64))
            // With no rows there is no data page; point past the dictionary.
            .set_data_page_offset(first_data_page.unwrap_or(dict_page.bytes_written) as i64);
        if self.statistics {
            meta = meta.set_statistics(self.chunk_statistics());
        }
        let close = ColumnCloseResult {
            bytes_written: total as u64,
            rows_written: self.rows as u64,
            metadata: meta.build()?,
            bloom_filter: None,
            column_index: None,
            offset_index: Some(offsets.build()),
        };
        *self = CodedColumn::new(self.descr.clone(), self.page_rows, self.statistics);
        Ok((Bytes::from(buf), close))
    }

    /// Min and max over the dictionary entries some row uses, and the null count.
    fn chunk_statistics(&self) -> Statistics {
        let used = self.used.iter().copied();
        let mut it = self
            .dict
            .iter()
            .zip(used)
            .filter_map(|(v, u)| u.then_some(v.as_bytes()));
        let (min, max) = match it.next() {
            Some(first) => {
                let (min, max) = it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)));
                (Some(ByteArray::from(min)), Some(ByteArray::from(max)))
            }
            None => (None, None),
        };
        Statistics::byte_array(min, max, None, Some(self.nulls as u64), false)
    }
}

fn unsupported(t: &DataType) -> ParquetError {
    ParquetError::General(format!(
        "a coded column takes Dictionary(Int32, Utf8) arrays, not {t}"
    ))
}

/// Bits needed for values up to `max`.
fn bit_width(max: u32) -> u8 {
    (32 - max.leading_zeros()) as u8
}

/// Appends `values` (each below `2^width`) in Parquet's RLE / bit-packed hybrid encoding: a
/// run of 8 or more equal values is one RLE run, anything else goes into bit-packed groups of
/// 8 (the last group padded with zeros; readers stop at the value count).
fn hybrid(out: &mut Vec<u8>, width: u8, values: &[u32]) {
    let n = values.len();
    let mut i = 0;
    // Start of values not yet written (they go bit-packed).
    let mut pending = 0;
    while i < n {
        let v = values[i];
        let mut j = i + 1;
        while j < n && values[j] == v {
            j += 1;
        }
        // A run long enough for RLE once the pending values are filled up to a group of 8.
        let fill = (8 - (i - pending) % 8) % 8;
        if j - i >= fill + 8 {
            let start = i + fill;
            bit_packed(out, width, &values[pending..start]);
            rle(out, width, j - start, v);
            pending = j;
        }
        i = j;
    }
    bit_packed(out, width, &values[pending..]);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn rle(out: &mut Vec<u8>, width: u8, count: usize, v: u32) {
    varint(out, (count as u64) << 1);
    out.extend_from_slice(&v.to_le_bytes()[..(width as usize).div_ceil(8)]);
}

/// Most groups of 8 per bit-packed run header (what parquet-rs writes; readers take more).
const MAX_GROUPS: usize = 63;

/// Bit-packs `values` (padded to a multiple of 8), LSB first.
fn bit_packed(out: &mut Vec<u8>, width: u8, values: &[u32]) {
    for run in values.chunks(MAX_GROUPS * 8) {
        let groups = run.len().div_ceil(8);
        varint(out, ((groups as u64) << 1) | 1);
        let (mut acc, mut bits) = (0u64, 0u32);
        let padding = std::iter::repeat_n(&0, groups * 8 - run.len());
        for &v in run.iter().chain(padding) {
            acc |= (v as u64) << bits;
            bits += width as u32;
            if bits >= 32 {
                out.extend_from_slice(&(acc as u32).to_le_bytes());
                acc >>= 32;
                bits -= 32;
            }
        }
        // groups * 8 * width bits is a whole number of bytes.
        out.extend_from_slice(&acc.to_le_bytes()[..bits as usize / 8]);
    }
}

/// Bit-packs the first `n` bits of an LSB-first bitmap at width 1: the bytes as they are.
fn bitmap_packed(out: &mut Vec<u8>, bitmap: &[u8], n: usize) {
    for run in bitmap[..n.div_ceil(8)].chunks(MAX_GROUPS) {
        varint(out, ((run.len() as u64) << 1) | 1);
        out.extend_from_slice(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A straightforward decoder of the hybrid encoding, to check the encoder against.
    fn decode(mut buf: &[u8], width: u8, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let read_varint = |buf: &mut &[u8]| {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let b = buf[0];
                *buf = &buf[1..];
                v |= ((b & 0x7f) as u64) << shift;
                shift += 7;
                if b < 0x80 {
                    return v;
                }
            }
        };
        while out.len() < n {
            let h = read_varint(&mut buf);
            if h & 1 == 0 {
                let bytes = (width as usize).div_ceil(8);
                let mut v = [0u8; 4];
                v[..bytes].copy_from_slice(&buf[..bytes]);
                buf = &buf[bytes..];
                out.extend(std::iter::repeat_n(
                    u32::from_le_bytes(v),
                    (h >> 1) as usize,
                ));
            } else {
                let count = (h >> 1) as usize * 8;
                let bytes = count * width as usize / 8;
                for k in 0..count {
                    let mut v = 0u32;
                    for b in 0..width as usize {
                        let bit = k * width as usize + b;
                        v |= (((buf[bit / 8] >> (bit % 8)) & 1) as u32) << b;
                    }
                    out.push(v);
                }
                buf = &buf[bytes..];
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out.truncate(n);
        out
    }

    proptest::proptest! {
        #[test]
        fn hybrid_round_trips(
            width in 0u8..12,
            runs in proptest::collection::vec((0u32..4096, 1usize..40), 0..60),
        ) {
            let mask = if width == 0 { 0 } else { (1u32 << width) - 1 };
            let values: Vec<u32> = runs
                .iter()
                .flat_map(|&(v, n)| std::iter::repeat_n(v & mask, n))
                .collect();
            let mut buf = Vec::new();
            hybrid(&mut buf, width, &values);
            proptest::prop_assert_eq!(decode(&buf, width, values.len()), values);
        }
    }

    proptest::proptest! {
        #[test]
        fn validity_bitmaps_are_width_1_levels(bits in proptest::collection::vec(proptest::bool::ANY, 0..2000)) {
            let mut b = BooleanBufferBuilder::new(0);
            for &v in &bits {
                b.append(v);
            }
            let b = b.finish();
            let mut buf = Vec::new();
            bitmap_packed(&mut buf, b.values(), bits.len());
            let expected: Vec<u32> = bits.iter().map(|&v| v as u32).collect();
            proptest::prop_assert_eq!(decode(&buf, 1, bits.len()), expected);
        }
    }

    #[test]
    fn long_runs_are_rle_and_short_ones_bit_packed() {
        let mut buf = Vec::new();
        hybrid(&mut buf, 1, &[1; 1000]);
        assert_eq!(buf, vec![0xd0, 0x0f, 1], "one RLE run of 1000 ones");
        let mut buf = Vec::new();
        hybrid(&mut buf, 2, &[0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(
            buf,
            vec![0x03, 0b1110_0100, 0b1110_0100],
            "one bit-packed group"
        );
    }
}
