//! `DELTA_LENGTH_BYTE_ARRAY` string column chunks with LZ4_RAW pages, for unique strings
//! (email addresses) that share no prefix with the row before.
//!
//! The recipient log's `key` and the submitted events' `email` are the largest columns the
//! send writes, and compressing them is the largest single cost of the send. parquet-rs
//! writes them PLAIN, a 4-byte length before each value, and LZ4 then has to get through
//! the lengths as well as the addresses (about 15 % more bytes, and the lengths break the
//! runs it could match). A [`TextColumn`] writes the lengths apart, `DELTA_BINARY_PACKED`
//! (a few bits per value), followed by the values back to back, and compresses the page with
//! the same LZ4 block codec. An array without nulls is copied as one slice. Min/max
//! statistics are never kept: unsorted unique strings cannot prune anything.

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::basic::Encoding;
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result};
use parquet::schema::types::ColumnDescPtr;

use crate::chunk::{delta_binary_packed, OwnColumn, Pages};

/// One row group's worth of a `DELTA_LENGTH_BYTE_ARRAY` string column.
#[derive(Debug)]
pub struct TextColumn {
    /// Data pages (levels, lengths, values; LZ4_RAW), and the open page's validity.
    pages: Pages,
    /// Open page: the length of each non-null value, and the values one after the other.
    lengths: Vec<u32>,
    bytes: Vec<u8>,
}

impl TextColumn {
    /// An empty chunk of column `descr`, cut into data pages of about `page_rows` rows.
    pub fn new(descr: ColumnDescPtr, page_rows: usize) -> Self {
        TextColumn {
            pages: Pages::new(descr, page_rows).lz4(),
            lengths: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Encodes the open page: definition levels, lengths, values.
    fn encode_page(&mut self) -> Result<()> {
        let (lengths, bytes) = (&self.lengths, &self.bytes);
        self.pages.close(lengths.len(), |data| {
            delta_binary_packed(data, lengths);
            data.extend_from_slice(bytes);
        })?;
        self.lengths.clear();
        self.bytes.clear();
        Ok(())
    }
}

impl OwnColumn for TextColumn {
    /// Appends a `Utf8` array (the only type this column takes).
    fn append(&mut self, column: &ArrayRef) -> Result<()> {
        if column.data_type() != &DataType::Utf8 {
            return Err(ParquetError::General(format!(
                "a text column takes Utf8 arrays, not {}",
                column.data_type()
            )));
        }
        let strings = column.as_string::<i32>();
        let offsets = strings.value_offsets();
        let data = strings.value_data();
        let nulls = strings.nulls().filter(|b| b.null_count() > 0);
        match nulls {
            None => {
                let (first, last) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
                self.bytes.extend_from_slice(&data[first..last]);
                self.lengths
                    .extend(offsets.windows(2).map(|w| (w[1] - w[0]) as u32));
            }
            Some(nulls) => {
                for i in nulls.valid_indices() {
                    let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                    self.bytes.extend_from_slice(&data[start..end]);
                    self.lengths.push((end - start) as u32);
                }
            }
        }
        if self.pages.add_rows(strings.len(), nulls) {
            self.encode_page()?;
        }
        Ok(())
    }

    /// Encodes the chunk and starts an empty one for the next row group.
    fn finish(&mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.encode_page()?;
        let mut fresh = TextColumn {
            pages: Pages::new(self.pages.descr.clone(), self.pages.page_rows).lz4(),
            lengths: std::mem::take(&mut self.lengths),
            bytes: std::mem::take(&mut self.bytes),
        };
        fresh.pages.reuse_buffers(&mut self.pages);
        let done = std::mem::replace(self, fresh);
        done.pages
            .into_chunk(
                None,
                Encoding::DELTA_LENGTH_BYTE_ARRAY,
                vec![
                    Encoding::RLE,
                    Encoding::DELTA_LENGTH_BYTE_ARRAY,
                    Encoding::DELTA_BINARY_PACKED,
                ],
                None,
            )
            .write()
    }
}
