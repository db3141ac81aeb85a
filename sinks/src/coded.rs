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
//! fill (see [`crate::chunk`]).

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_array::{Array, ArrayRef, StringArray};
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::basic::Encoding;
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnDescPtr;

use crate::chunk::{bit_width, hybrid, OwnColumn, Pages};

/// One row group's worth of a dictionary-encoded string column.
#[derive(Debug)]
pub struct CodedColumn {
    /// Data pages (levels, bit width, codes), and the open page's validity.
    pages: Pages,
    /// The chunk's dictionary, in first-seen order.
    dict: Vec<Box<str>>,
    lookup: HashMap<Box<str>, u32>,
    /// The remap of the last batch dictionary seen (batches of one sink share it).
    last: Option<(StringArray, Vec<u32>)>,
    /// Open page: one code per non-null row.
    codes: Vec<u32>,
    /// Whether the chunk carries min/max and null count.
    statistics: bool,
    /// Dictionary entries some row of the chunk uses (kept for statistics only).
    used: Vec<bool>,
}

impl CodedColumn {
    /// An empty chunk of column `descr`, cut into data pages of about `page_rows` rows;
    /// `statistics` asks for chunk min/max (from the dictionary entries used) and null count.
    pub fn new(descr: ColumnDescPtr, page_rows: usize, statistics: bool) -> Self {
        CodedColumn {
            pages: Pages::new(descr, page_rows),
            statistics,
            dict: Vec::new(),
            lookup: HashMap::new(),
            last: None,
            codes: Vec::new(),
            used: Vec::new(),
        }
    }
}

impl OwnColumn for CodedColumn {
    /// Appends a `Dictionary(Int32, Utf8)` array (the only type this column takes).
    fn append(&mut self, column: &ArrayRef) -> Result<()> {
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
        let nulls = keys.nulls().filter(|nulls| nulls.null_count() > 0);
        match nulls {
            None => {
                out_of_range(keys.values().iter().map(|&k| k as u32).max())?;
                self.codes
                    .extend(keys.values().iter().map(|&k| remap[k as usize]));
            }
            Some(nulls) => {
                out_of_range(nulls.valid_indices().map(|i| keys.values()[i] as u32).max())?;
                self.codes.extend(
                    nulls
                        .valid_indices()
                        .map(|i| remap[keys.values()[i] as usize]),
                );
            }
        }
        if self.pages.add_rows(n, nulls) {
            self.encode_page()?;
        }
        Ok(())
    }

    /// Encodes the chunk and starts an empty one for the next row group.
    fn finish(&mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.encode_page()?;
        let fresh = CodedColumn::new(
            self.pages.descr.clone(),
            self.pages.page_rows,
            self.statistics,
        );
        let done = std::mem::replace(self, fresh);
        let statistics = done.statistics.then(|| done.chunk_statistics());
        // Dictionary page: PLAIN byte arrays.
        let mut plain = Vec::new();
        for v in &done.dict {
            plain.extend_from_slice(&(v.len() as u32).to_le_bytes());
            plain.extend_from_slice(v.as_bytes());
        }
        let entries = done.dict.len() as u32;
        done.pages
            .into_chunk(
                Some((plain, entries)),
                Encoding::RLE_DICTIONARY,
                vec![Encoding::PLAIN, Encoding::RLE, Encoding::RLE_DICTIONARY],
                statistics,
            )
            .write()
    }
}

impl CodedColumn {
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

    /// Encodes the open page: definition levels, bit width, codes. Each page has its own
    /// bit width, so pages are final before the dictionary is.
    fn encode_page(&mut self) -> Result<()> {
        let width = bit_width(self.dict.len().saturating_sub(1) as u32);
        let codes = &self.codes;
        self.pages.close(codes.len(), |data| {
            data.push(width);
            hybrid(data, width, codes);
        })?;
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
        self.codes.clear();
        Ok(())
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
        Statistics::byte_array(min, max, None, Some(self.pages.nulls() as u64), false)
    }
}

fn unsupported(t: &DataType) -> ParquetError {
    ParquetError::General(format!(
        "a coded column takes Dictionary(Int32, Utf8) arrays, not {t}"
    ))
}
