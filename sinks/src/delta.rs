//! `DELTA_BYTE_ARRAY` string column chunks, for unique strings that share long prefixes.
//!
//! Event ids (`sub-<run>-<row>`) are unique, so a dictionary never pays, and in PLAIN they
//! are 30-odd bytes each that LZ4 then has to squeeze: on the send path that was the largest
//! single cost of the submitted events. Consecutive ids differ in their last digits only,
//! which is what `DELTA_BYTE_ARRAY` stores: per value the length of the prefix it shares
//! with the previous one and the rest (the suffix), the two lengths `DELTA_BINARY_PACKED`.
//! parquet-rs has this encoding, but its encoder keeps a reference-counted buffer per value
//! and was slower than PLAIN + LZ4; a [`DeltaColumn`] writes the pages directly (a byte
//! compare per value, the suffix bytes appended to the page), uncompressed: a few bytes per
//! row are left. Pages (about `page_rows` rows) stand alone: each starts from an empty
//! previous value, as readers that seek to a page expect.

use arrow_array::{Array, ArrayRef};
use bytes::Bytes;
use parquet::basic::Encoding;
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::Result;
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnDescPtr;

use crate::chunk::{delta_binary_packed, utf8_strings, OwnColumn, Pages};

/// One row group's worth of a `DELTA_BYTE_ARRAY` string column.
#[derive(Debug)]
pub struct DeltaColumn {
    /// Data pages (levels, prefix lengths, suffix lengths, suffixes), and the open page's
    /// validity.
    pages: Pages,
    statistics: bool,
    /// The open page's last value (empty at the start of a page).
    previous: Vec<u8>,
    /// Open page: per non-null value, the prefix length it shares with the previous value,
    /// the length of the rest, and the rests one after the other.
    prefixes: Vec<u32>,
    suffixes: Vec<u32>,
    bytes: Vec<u8>,
    min: Option<Vec<u8>>,
    max: Option<Vec<u8>>,
}

impl DeltaColumn {
    /// An empty chunk of column `descr`, cut into data pages of about `page_rows` rows;
    /// `statistics` asks for chunk min/max (a compare per value) and null count.
    pub fn new(descr: ColumnDescPtr, page_rows: usize, statistics: bool) -> Self {
        DeltaColumn {
            pages: Pages::new(descr, page_rows),
            statistics,
            previous: Vec::new(),
            prefixes: Vec::new(),
            suffixes: Vec::new(),
            bytes: Vec::new(),
            min: None,
            max: None,
        }
    }
}

impl OwnColumn for DeltaColumn {
    /// Appends a `Utf8` array (the only type this column takes).
    fn append(&mut self, column: &ArrayRef) -> Result<()> {
        let strings = utf8_strings(column, "delta")?;
        let n = strings.len();
        let offsets = strings.value_offsets();
        let data = strings.value_data();
        let value = |i: usize| &data[offsets[i] as usize..offsets[i + 1] as usize];
        let nulls = strings.nulls().filter(|b| b.null_count() > 0);
        match nulls {
            None => self.push_values((0..n).map(value)),
            Some(nulls) => self.push_values(nulls.valid_indices().map(value)),
        }
        if self.pages.add_rows(n, nulls) {
            self.encode_page()?;
        }
        Ok(())
    }

    /// Encodes the chunk and starts an empty one for the next row group.
    fn finish(&mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.encode_page()?;
        let fresh = DeltaColumn::new(
            self.pages.descr.clone(),
            self.pages.page_rows,
            self.statistics,
        );
        let done = std::mem::replace(self, fresh);
        let statistics = done.statistics.then(|| {
            Statistics::byte_array(
                done.min.map(ByteArray::from),
                done.max.map(ByteArray::from),
                None,
                Some(done.pages.nulls() as u64),
                false,
            )
        });
        done.pages
            .into_chunk(
                None,
                Encoding::DELTA_BYTE_ARRAY,
                vec![
                    Encoding::RLE,
                    Encoding::DELTA_BYTE_ARRAY,
                    Encoding::DELTA_BINARY_PACKED,
                ],
                statistics,
            )
            .write()
    }
}

impl DeltaColumn {
    /// Appends the non-null values to the open page, each against the one before it.
    fn push_values<'a>(&mut self, values: impl Iterator<Item = &'a [u8]>) {
        let mut previous = std::mem::take(&mut self.previous);
        let mut last: Option<&[u8]> = None;
        for v in values {
            let p = common_prefix(last.unwrap_or(&previous), v);
            self.prefixes.push(p as u32);
            self.suffixes.push((v.len() - p) as u32);
            self.bytes.extend_from_slice(&v[p..]);
            if self.statistics {
                self.widen(v);
            }
            last = Some(v);
        }
        if let Some(v) = last {
            previous.clear();
            previous.extend_from_slice(v);
        }
        self.previous = previous;
    }

    fn widen(&mut self, v: &[u8]) {
        if self.min.as_deref().is_none_or(|m| v < m) {
            self.min = Some(v.to_vec());
        }
        if self.max.as_deref().is_none_or(|m| v > m) {
            self.max = Some(v.to_vec());
        }
    }

    /// Encodes the open page: definition levels, prefix lengths, suffix lengths, suffixes.
    fn encode_page(&mut self) -> Result<()> {
        let (prefixes, suffixes, bytes) = (&self.prefixes, &self.suffixes, &self.bytes);
        self.pages.close(prefixes.len(), |data| {
            delta_binary_packed(data, prefixes);
            delta_binary_packed(data, suffixes);
            data.extend_from_slice(bytes);
        })?;
        self.prefixes.clear();
        self.suffixes.clear();
        self.bytes.clear();
        self.previous.clear();
        Ok(())
    }
}

/// The length of the longest common prefix of `a` and `b`, eight bytes at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let diff = x ^ y;
        if diff != 0 {
            return i + diff.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn common_prefix_is_the_shared_start(
            a in proptest::collection::vec(0u8..3, 0..40),
            b in proptest::collection::vec(0u8..3, 0..40),
        ) {
            let p = common_prefix(&a, &b);
            proptest::prop_assert_eq!(&a[..p], &b[..p]);
            proptest::prop_assert!(p == a.len() || p == b.len() || a[p] != b[p]);
        }
    }
}
