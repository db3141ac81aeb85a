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

use arrow_array::{Array, ArrayRef};
use bytes::Bytes;
use parquet::basic::Encoding;
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::Result;
use parquet::schema::types::ColumnDescPtr;

use broadside_pipeline::model::{Decision, PackedKeys, RecipientBatch};
use broadside_pipeline::stages::Stage;
use broadside_pipeline::strings::append_short;

use crate::chunk::{delta_binary_packed, lz4_block, utf8_strings, OwnColumn, Pages};

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
        self.pages
            .close(lengths.len(), |data| encode_body(data, lengths, bytes))?;
        self.lengths.clear();
        self.bytes.clear();
        Ok(())
    }
}

impl OwnColumn for TextColumn {
    /// Appends a `Utf8` array (the only type this column takes).
    fn append(&mut self, column: &ArrayRef) -> Result<()> {
        let strings = utf8_strings(column, "text")?;
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

    /// Closes the open page, then adds the packed keys as a page of their own.
    fn append_packed(&mut self, packed: &PackedKeys) -> Result<()> {
        self.encode_page()?;
        self.pages
            .push_packed(packed.rows.len(), &packed.block, packed.raw_len)
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

/// A page body after its definition levels: the lengths, then the values back to back.
fn encode_body(data: &mut Vec<u8>, lengths: &[u32], bytes: &[u8]) {
    delta_binary_packed(data, lengths);
    data.extend_from_slice(bytes);
}

/// The batch's packed keys if they are exactly its sent rows' keys: every row the ordered
/// stages left sendable was sent, and every sent row has a key. Otherwise (billing cap or
/// printer decisions, no packer) the sinks encode the keys themselves.
pub fn sent_keys_packed(b: &RecipientBatch) -> Option<&PackedKeys> {
    let packed = b.packed_keys.as_ref()?;
    let mut expected = packed.rows.iter();
    for (i, d) in b.decisions.iter().enumerate() {
        if *d == Decision::Sent && expected.next() != Some(&(i as u32)) {
            return None;
        }
    }
    expected.next().is_none().then_some(packed)
}

/// Packs the keys of each batch's sendable rows into one compressed page body
/// ([`PackedKeys`]), on the worker threads. The recipient log and the submitted events both
/// store these keys in this order (the log puts a batch's sent rows first), so the two sinks
/// splice the same block into their files instead of each compressing every address.
/// A row the ordered stages later decide not to send (billing cap, printer) makes the block
/// unusable for that batch; the sinks then encode the keys themselves.
#[derive(Debug, Default)]
pub struct KeyPacker {
    lengths: Vec<u32>,
    bytes: Vec<u8>,
    raw: Vec<u8>,
    packed: Vec<u8>,
}

impl KeyPacker {
    /// A packer with empty buffers (kept from batch to batch).
    pub fn new() -> Self {
        KeyPacker::default()
    }
}

impl Stage for KeyPacker {
    fn name(&self) -> &'static str {
        "pack-keys"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> broadside_pipeline::Result<()> {
        batch.packed_keys = None;
        let Some(keys) = batch.keys.as_ref() else {
            return Ok(());
        };
        let (offsets, data) = (keys.value_offsets(), keys.value_data());
        let mut rows = Vec::with_capacity(batch.len());
        self.lengths.clear();
        self.bytes.clear();
        // Room for every key plus the block copies of `append_short`.
        self.bytes.reserve(data.len() + 64);
        for i in 0..batch.len() {
            if batch.sendable(i) && keys.is_valid(i) {
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                rows.push(i as u32);
                self.lengths.push((end - start) as u32);
                append_short(&mut self.bytes, &data[start..end], data);
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        self.raw.clear();
        encode_body(&mut self.raw, &self.lengths, &self.bytes);
        let block = lz4_block(&self.raw, &mut self.packed).map_err(|e| {
            broadside_pipeline::Error::Stage {
                stage: "pack-keys".into(),
                message: format!("LZ4: {e}"),
            }
        })?;
        batch.packed_keys = Some(PackedKeys {
            rows,
            block,
            raw_len: self.raw.len(),
        });
        Ok(())
    }
}
