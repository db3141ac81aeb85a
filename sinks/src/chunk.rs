//! Parquet column chunks assembled from pages this crate encodes itself.
//!
//! [`crate::coded`] (dictionary columns from their codes) and [`crate::delta`] (`DELTA_BYTE_ARRAY`
//! string columns) encode their data pages here rather than through parquet-rs's column
//! writers, which hash, compare or copy every value on the way. This module holds what both
//! share: the [`OwnColumn`] interface, the bookkeeping of a chunk's pages ([`Pages`]), the
//! RLE / bit-packed hybrid, `DELTA_BINARY_PACKED`, definition levels, and the assembly of a
//! chunk's pages, metadata and offset index, which
//! [`crate::parts::PartWriter`] splices into a row group next to the columns parquet-rs encodes.
//! Chunks are uncompressed (what the dictionary and delta encodings leave is a few bits or
//! bytes per row), except those of [`crate::text`], whose pages are LZ4_RAW like parquet-rs's.

use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, StringArray};
use arrow_buffer::{BooleanBuffer, BooleanBufferBuilder, NullBuffer};
use arrow_schema::DataType;
use broadside_pipeline::model::PackedKeys;
use bytes::Bytes;
use parquet::basic::{Compression, Encoding};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, OffsetIndexBuilder};
use parquet::file::statistics::Statistics;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

/// A column chunk this crate encodes itself, one row group at a time.
pub(crate) trait OwnColumn: Send {
    /// Appends a batch's column.
    fn append(&mut self, column: &ArrayRef) -> Result<()>;
    /// Appends the keys a worker packed as one page (see [`PackedKeys`]); only text columns
    /// take them.
    fn append_packed(&mut self, packed: &PackedKeys) -> Result<()> {
        let _ = packed;
        Err(ParquetError::General(
            "only a text column takes packed keys".into(),
        ))
    }
    /// Encodes the chunk and starts an empty one for the next row group.
    fn finish(&mut self) -> Result<(Bytes, ColumnCloseResult)>;
}

/// `column` as a `Utf8` string array, the only type a `kind` column (text, delta) takes.
pub(crate) fn utf8_strings<'a>(column: &'a ArrayRef, kind: &str) -> Result<&'a StringArray> {
    if column.data_type() != &DataType::Utf8 {
        return Err(ParquetError::General(format!(
            "a {kind} column takes Utf8 arrays, not {}",
            column.data_type()
        )));
    }
    Ok(column.as_string::<i32>())
}

/// Writes to `out` the LZ4 block `block` with the bytes `prefix` in front of what it
/// decompresses to. The prefix joins the literals of the block's first sequence (only that
/// sequence's header is rewritten); the matches after it copy from distances back in the
/// output, which do not change, and the end-of-block rules count from the end, which does not
/// move either.
pub(crate) fn prepend_literals(block: &[u8], prefix: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let truncated = || ParquetError::General("LZ4 block: truncated first sequence".into());
    let token = *block.first().ok_or_else(truncated)?;
    let mut at = 1;
    let mut literals = usize::from(token >> 4);
    if literals == 15 {
        loop {
            let b = *block.get(at).ok_or_else(truncated)?;
            at += 1;
            literals += usize::from(b);
            if b != 255 {
                break;
            }
        }
    }
    let total = literals + prefix.len();
    out.push(((total.min(15) as u8) << 4) | (token & 0x0F));
    if total >= 15 {
        let mut rest = total - 15;
        while rest >= 255 {
            out.push(255);
            rest -= 255;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(prefix);
    out.extend_from_slice(&block[at..]);
    Ok(())
}

/// `raw` compressed as one LZ4 block, through `scratch`, an output buffer kept by the caller
/// from call to call (a fresh buffer of this size is a fresh mapping, faulted in page by
/// page); returns a copy of the compressed bytes only.
pub(crate) fn lz4_block(
    raw: &[u8],
    scratch: &mut Vec<u8>,
) -> std::result::Result<Vec<u8>, lz4_flex::block::CompressError> {
    let bound = lz4_flex::block::get_maximum_output_size(raw.len());
    if scratch.len() < bound {
        scratch.resize(bound, 0);
    }
    let n = lz4_flex::block::compress_into(raw, scratch)?;
    Ok(scratch[..n].to_vec())
}

/// The data pages of a column chunk being written: the open page's validity and row count,
/// the pages encoded so far, and the chunk's row and null counts. The column keeps the open
/// page's values and encodes them when [`Pages::close`] asks.
#[derive(Debug)]
pub(crate) struct Pages {
    pub descr: ColumnDescPtr,
    /// Rows after which the open page is encoded.
    pub page_rows: usize,
    /// Open page: validity, one bit per row.
    valid: BooleanBufferBuilder,
    /// Open page: rows.
    open_rows: usize,
    /// Encoded data pages (compressed if `lz4`), their row counts and uncompressed sizes.
    done: Vec<(Vec<u8>, usize, usize)>,
    rows: usize,
    nulls: usize,
    /// Pages are compressed with LZ4_RAW.
    lz4: bool,
    /// The open page encoded (kept for the next page when `lz4`), and compressed.
    raw: Vec<u8>,
    packed: Vec<u8>,
}

impl Pages {
    /// No pages yet, of column `descr`, cut at about `page_rows` rows.
    pub fn new(descr: ColumnDescPtr, page_rows: usize) -> Self {
        Pages {
            descr,
            page_rows: page_rows.max(1),
            valid: BooleanBufferBuilder::new(0),
            open_rows: 0,
            done: Vec::new(),
            rows: 0,
            nulls: 0,
            lz4: false,
            raw: Vec::new(),
            packed: Vec::new(),
        }
    }

    /// The same, with every page compressed with LZ4_RAW.
    pub fn lz4(mut self) -> Self {
        self.lz4 = true;
        self
    }

    /// Adds `n` rows to the open page, null where `nulls` says (none when `None`); true
    /// once the page holds `page_rows` rows or more.
    pub fn add_rows(&mut self, n: usize, nulls: Option<&NullBuffer>) -> bool {
        match nulls {
            None => self.valid.append_n(n, true),
            Some(nulls) => self.valid.append_buffer(nulls.inner()),
        }
        self.rows += n;
        self.open_rows += n;
        self.open_rows >= self.page_rows
    }

    /// Encodes the open page, if it has rows, of which `values` are not null: its
    /// definition levels, then what `encode` writes (the values).
    pub fn close(&mut self, values: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let rows = self.open_rows;
        if rows == 0 {
            return Ok(());
        }
        let nulls = rows - values;
        let raw = &mut self.raw;
        raw.clear();
        def_levels(raw, &self.descr, &self.valid.finish(), rows, nulls)?;
        encode(raw);
        let size = raw.len();
        let data = if self.lz4 {
            // Compressed from and into buffers kept from page to page.
            lz4_block(raw, &mut self.packed)
                .map_err(|e| ParquetError::General(format!("LZ4: {e}")))?
        } else {
            // Uncompressed pages are small: the page keeps the buffer itself.
            std::mem::take(raw)
        };
        self.done.push((data, rows, size));
        self.nulls += nulls;
        self.valid = BooleanBufferBuilder::new(self.page_rows);
        self.open_rows = 0;
        Ok(())
    }

    /// Adds a whole page of `rows` non-null values whose body (what follows the definition
    /// levels) is the LZ4 block `block` of `raw_len` bytes; the open page must be empty. The
    /// levels, if the column has any, are spliced in front of the block as literals.
    pub fn push_packed(&mut self, rows: usize, block: &[u8], raw_len: usize) -> Result<()> {
        if !self.lz4 || self.open_rows > 0 {
            return Err(ParquetError::General(format!(
                "column {}: a packed page needs an LZ4 column with no open page",
                self.descr.path()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let levels = &mut self.raw;
        levels.clear();
        def_levels(levels, &self.descr, &BooleanBuffer::new_set(0), rows, 0)?;
        let mut page = Vec::with_capacity(block.len() + levels.len() + 8);
        prepend_literals(block, levels, &mut page)?;
        self.done.push((page, rows, raw_len + levels.len()));
        self.rows += rows;
        Ok(())
    }

    /// Takes over the encoding buffers of `old` (a chunk that is done), so that the next
    /// chunk does not fault its own in.
    pub fn reuse_buffers(&mut self, old: &mut Pages) {
        self.raw = std::mem::take(&mut old.raw);
        self.packed = std::mem::take(&mut old.packed);
    }

    /// Null rows in the pages encoded so far.
    pub fn nulls(&self) -> usize {
        self.nulls
    }

    /// The chunk of the pages encoded so far.
    pub fn into_chunk(
        self,
        dictionary: Option<(Vec<u8>, u32)>,
        encoding: Encoding,
        encodings: Vec<Encoding>,
        statistics: Option<Statistics>,
    ) -> Chunk {
        Chunk {
            descr: self.descr,
            compression: if self.lz4 {
                Compression::LZ4_RAW
            } else {
                Compression::UNCOMPRESSED
            },
            dictionary,
            pages: self.done,
            encoding,
            encodings,
            rows: self.rows,
            statistics,
        }
    }
}

/// A column chunk whose pages are encoded.
pub(crate) struct Chunk {
    descr: ColumnDescPtr,
    /// Of the data pages (a dictionary page is never compressed here).
    compression: Compression,
    /// A PLAIN dictionary page and its number of entries.
    dictionary: Option<(Vec<u8>, u32)>,
    /// Data pages (Parquet v1: levels, then values, compressed as a whole), their row counts
    /// and uncompressed sizes.
    pages: Vec<(Vec<u8>, usize, usize)>,
    /// The encoding of the data pages' values.
    encoding: Encoding,
    /// Every encoding the chunk uses, for its metadata.
    encodings: Vec<Encoding>,
    rows: usize,
    statistics: Option<Statistics>,
}

impl Chunk {
    /// The chunk's bytes (offsets relative to its start) and what the row group needs to
    /// splice it in.
    pub fn write(self) -> Result<(Bytes, ColumnCloseResult)> {
        let mut sink = TrackedWrite::new(Vec::new());
        let mut writer = SerializedPageWriter::new(&mut sink);
        let dictionary = match self.dictionary {
            Some((plain, entries)) => {
                let len = plain.len();
                Some(writer.write_page(CompressedPage::new(
                    Page::DictionaryPage {
                        buf: Bytes::from(plain),
                        num_values: entries,
                        encoding: Encoding::PLAIN,
                        is_sorted: false,
                    },
                    len,
                ))?)
            }
            None => None,
        };
        let mut offsets = OffsetIndexBuilder::new();
        let mut first_data_page = None;
        // Sizes with page headers, as the chunk's metadata counts them.
        let mut uncompressed = dictionary.as_ref().map_or(0, |d| d.uncompressed_size);
        for (data, rows, size) in self.pages {
            let spec = writer.write_page(CompressedPage::new(
                Page::DataPage {
                    buf: Bytes::from(data),
                    num_values: rows as u32,
                    encoding: self.encoding,
                    def_level_encoding: Encoding::RLE,
                    rep_level_encoding: Encoding::RLE,
                    statistics: None,
                },
                size,
            ))?;
            uncompressed += spec.uncompressed_size;
            first_data_page.get_or_insert(spec.offset);
            offsets.append_row_count(rows as i64);
            offsets.append_offset_and_size(spec.offset as i64, spec.bytes_written as i32);
        }
        writer.close()?;
        let buf = sink.into_inner()?;
        let total = buf.len() as i64;

        // With no rows there is no data page; point past the dictionary, if any.
        let end_of_dictionary = dictionary.as_ref().map_or(0, |d| d.bytes_written);
        let mut meta = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(self.compression)
            .set_encodings(self.encodings)
            .set_num_values(self.rows as i64)
            .set_total_compressed_size(total)
            .set_total_uncompressed_size(uncompressed as i64)
            .set_dictionary_page_offset(dictionary.map(|d| d.offset as i64))
            .set_data_page_offset(first_data_page.unwrap_or(end_of_dictionary) as i64);
        if let Some(s) = self.statistics {
            meta = meta.set_statistics(s);
        }
        Ok((
            Bytes::from(buf),
            ColumnCloseResult {
                bytes_written: total as u64,
                rows_written: self.rows as u64,
                metadata: meta.build()?,
                bloom_filter: None,
                column_index: None,
                offset_index: Some(offsets.build()),
            },
        ))
    }
}

/// Appends the definition levels of a page of `rows` rows of which `nulls` are null
/// (length-prefixed, RLE / bit-packed hybrid at width 1), or refuses nulls in a required
/// column. `valid` is the page's validity bitmap.
fn def_levels(
    data: &mut Vec<u8>,
    descr: &ColumnDescPtr,
    valid: &BooleanBuffer,
    rows: usize,
    nulls: usize,
) -> Result<()> {
    if descr.max_def_level() > 0 {
        let mut levels = Vec::new();
        if nulls == 0 || nulls == rows {
            rle(&mut levels, 1, rows, (nulls == 0) as u32);
        } else {
            // Levels of width 1 bit-packed LSB first are the validity bitmap itself.
            bitmap_packed(&mut levels, valid.values(), rows);
        }
        data.extend_from_slice(&(levels.len() as u32).to_le_bytes());
        data.extend_from_slice(&levels);
        Ok(())
    } else if nulls > 0 {
        Err(ParquetError::General(format!(
            "{nulls} nulls in required column {}",
            descr.path()
        )))
    } else {
        Ok(())
    }
}

/// Bits needed for values up to `max`.
pub(crate) fn bit_width(max: u32) -> u8 {
    (32 - max.leading_zeros()) as u8
}

/// Appends `values` (each below `2^width`) in Parquet's RLE / bit-packed hybrid encoding: a
/// run of 8 or more equal values is one RLE run, anything else goes into bit-packed groups of
/// 8 (the last group padded with zeros; readers stop at the value count).
pub(crate) fn hybrid(out: &mut Vec<u8>, width: u8, values: &[u32]) {
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

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn rle(out: &mut Vec<u8>, width: u8, count: usize, v: u32) {
    varint(out, (count as u64) << 1);
    out.extend_from_slice(&v.to_le_bytes()[..(width as usize).div_ceil(8)]);
}

/// Most groups of 8 per bit-packed run header (what parquet-rs writes; readers take more).
const MAX_GROUPS: usize = 63;

/// Bit-packs `values` (padded to a multiple of 8) in runs with the hybrid's headers.
fn bit_packed(out: &mut Vec<u8>, width: u8, values: &[u32]) {
    for run in values.chunks(MAX_GROUPS * 8) {
        let groups = run.len().div_ceil(8);
        varint(out, ((groups as u64) << 1) | 1);
        pack(out, width, run, groups * 8);
    }
}

/// Packs `values`, then zeros up to `count` values (`count · width` a multiple of 8), at
/// `width` bits each, LSB first.
fn pack(out: &mut Vec<u8>, width: u8, values: &[u32], count: usize) {
    let (mut acc, mut bits) = (0u64, 0u32);
    let padding = std::iter::repeat_n(&0, count - values.len());
    for &v in values.iter().chain(padding) {
        acc |= (v as u64) << bits;
        bits += width as u32;
        if bits >= 32 {
            out.extend_from_slice(&(acc as u32).to_le_bytes());
            acc >>= 32;
            bits -= 32;
        }
    }
    out.extend_from_slice(&acc.to_le_bytes()[..bits as usize / 8]);
}

/// Bit-packs the first `n` bits of an LSB-first bitmap at width 1: the bytes as they are.
fn bitmap_packed(out: &mut Vec<u8>, bitmap: &[u8], n: usize) {
    for run in bitmap[..n.div_ceil(8)].chunks(MAX_GROUPS) {
        varint(out, ((run.len() as u64) << 1) | 1);
        out.extend_from_slice(run);
    }
}

/// Values per `DELTA_BINARY_PACKED` block, and per miniblock (what parquet-rs writes).
const DELTA_BLOCK: usize = 128;
const DELTA_MINIBLOCK: usize = 32;

/// Appends `values` (lengths, so below `2^31`) as `DELTA_BINARY_PACKED` INT32: a header
/// (block size, miniblocks per block, value count, first value), then per block of 128 deltas
/// the smallest delta and four miniblocks of 32 deltas above it, each bit-packed at its own
/// width. The last miniblock is padded with zeros; miniblocks past the last delta are left
/// out with width 0, as the format allows.
pub(crate) fn delta_binary_packed(out: &mut Vec<u8>, values: &[u32]) {
    let miniblocks = DELTA_BLOCK / DELTA_MINIBLOCK;
    varint(out, DELTA_BLOCK as u64);
    varint(out, miniblocks as u64);
    varint(out, values.len() as u64);
    varint(out, zigzag(values.first().map_or(0, |&v| v as i64)));
    let deltas: Vec<i64> = values
        .windows(2)
        .map(|w| w[1] as i64 - w[0] as i64)
        .collect();
    let mut adjusted = [0u32; DELTA_MINIBLOCK];
    for block in deltas.chunks(DELTA_BLOCK) {
        let min = *block.iter().min().expect("blocks are not empty");
        varint(out, zigzag(min));
        let widths = out.len();
        out.resize(widths + miniblocks, 0);
        for (m, mini) in block.chunks(DELTA_MINIBLOCK).enumerate() {
            // Values below 2^31 keep every delta above the minimum within 32 bits.
            for (a, &d) in adjusted.iter_mut().zip(mini) {
                *a = (d - min) as u32;
            }
            let max = adjusted[..mini.len()].iter().copied().max().unwrap_or(0);
            let width = bit_width(max);
            out[widths + m] = width;
            pack(out, width, &adjusted[..mini.len()], DELTA_MINIBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A straightforward decoder of the hybrid encoding, to check the encoder against.
    fn decode(mut buf: &[u8], width: u8, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
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
                out.extend(unpack(&mut buf, width, count));
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out.truncate(n);
        out
    }

    fn read_varint(buf: &mut &[u8]) -> u64 {
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
    }

    /// Reads `count` values of `width` bits, LSB first, bit by bit.
    fn unpack(buf: &mut &[u8], width: u8, count: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(count);
        for k in 0..count {
            let mut v = 0u32;
            for b in 0..width as usize {
                let bit = k * width as usize + b;
                v |= (((buf[bit / 8] >> (bit % 8)) & 1) as u32) << b;
            }
            out.push(v);
        }
        *buf = &buf[count * width as usize / 8..];
        out
    }

    /// A decoder of `DELTA_BINARY_PACKED` written from the format's description.
    fn decode_delta(mut buf: &[u8]) -> Vec<u32> {
        let unzigzag = |v: u64| (v >> 1) as i64 ^ -((v & 1) as i64);
        let block = read_varint(&mut buf) as usize;
        let miniblocks = read_varint(&mut buf) as usize;
        let total = read_varint(&mut buf) as usize;
        let mut last = unzigzag(read_varint(&mut buf));
        let mut out = Vec::new();
        if total > 0 {
            out.push(last as u32);
        }
        while out.len() < total {
            let min = unzigzag(read_varint(&mut buf));
            let widths = buf[..miniblocks].to_vec();
            buf = &buf[miniblocks..];
            for w in widths {
                if out.len() == total {
                    break;
                }
                for d in unpack(&mut buf, w, block / miniblocks) {
                    if out.len() < total {
                        last += min + d as i64;
                        out.push(last as u32);
                    }
                }
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
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
            let mut b = arrow_buffer::BooleanBufferBuilder::new(0);
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

    proptest::proptest! {
        /// Any lengths, including runs, jumps across the whole range and counts around block
        /// and miniblock edges.
        #[test]
        fn delta_binary_packed_round_trips(
            values in proptest::collection::vec(
                proptest::prop_oneof![0u32..40, 0u32..=i32::MAX as u32], 0..700),
        ) {
            let mut buf = Vec::new();
            delta_binary_packed(&mut buf, &values);
            proptest::prop_assert_eq!(decode_delta(&buf), values);
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

    #[test]
    fn equal_deltas_pack_at_width_0() {
        let mut buf = Vec::new();
        delta_binary_packed(&mut buf, &[7, 9, 11, 13, 15]);
        // Header 128, 4, 5, zigzag(7); min delta zigzag(2); four widths of 0; no bodies.
        assert_eq!(buf, vec![0x80, 0x01, 4, 5, 14, 4, 0, 0, 0, 0]);
    }

    /// Bytes with repeats, so that the compressor finds matches (also at the very start).
    fn repetitive() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                3 => "[a-c]{1,6}".prop_map(String::into_bytes),
                1 => proptest::collection::vec(any::<u8>(), 0..40),
            ],
            0..200,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A block with literals spliced in front decompresses to the prefix followed by the
        /// original input, whatever the lengths (first sequences of 0, under 15, 15 and over
        /// 255 literals; prefixes crossing the same thresholds).
        #[test]
        fn prepended_literals_decompress_in_front(
            data in repetitive(),
            prefix in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let block = lz4_flex::block::compress(&data);
            let mut out = Vec::new();
            prepend_literals(&block, &prefix, &mut out).unwrap();
            let back = lz4_flex::block::decompress(&out, prefix.len() + data.len()).unwrap();
            prop_assert_eq!(&back[..prefix.len()], &prefix[..]);
            prop_assert_eq!(&back[prefix.len()..], &data[..]);
            if prefix.is_empty() {
                prop_assert_eq!(out, block);
            }
        }
    }

    #[test]
    fn a_truncated_first_sequence_is_an_error() {
        let mut out = Vec::new();
        assert!(prepend_literals(&[], b"x", &mut out).is_err());
        // 15 literals announced, then the length bytes end.
        assert!(prepend_literals(&[0xF0, 255], b"x", &mut out).is_err());
    }
}
