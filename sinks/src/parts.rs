//! Parquet files split into parts by input row range, each committed atomically.
//!
//! Part `k` holds what input rows `k·P .. (k+1)·P` produced, so part boundaries and names are
//! the same on every attempt of a run. A part already committed by an earlier attempt is not
//! rewritten; its row count (from the footer) is checked against what this attempt produced.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use broadside_pipeline::store::{commit_file, create_dir_all};
use broadside_pipeline::{Error, Result};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};

/// A range of a batch that belongs to one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Part number.
    pub part: u64,
    /// First row within the batch.
    pub start: usize,
    /// One past the last row within the batch.
    pub end: usize,
    /// True when this segment's last row is the part's last row.
    pub completes: bool,
}

/// Splits input rows `first_row .. first_row + len` at multiples of `part_rows`.
pub fn segments(first_row: u64, len: usize, part_rows: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < len {
        let row = first_row + start as u64;
        let part = row / part_rows;
        let part_end = (part + 1) * part_rows;
        let end = ((part_end - first_row) as usize).min(len);
        out.push(Segment {
            part,
            start,
            end,
            completes: first_row + end as u64 == part_end,
        });
        start = end;
    }
    out
}

struct Current {
    part: u64,
    tmp: PathBuf,
    final_path: PathBuf,
    /// `None` when an earlier attempt committed this part: count rows, verify, write nothing.
    writer: Option<ArrowWriter<File>>,
    rows: u64,
}

/// Writes `<dir>/<prefix>-NNNNN.parquet` parts.
pub struct PartWriter {
    dir: PathBuf,
    prefix: String,
    schema: SchemaRef,
    props: WriterProperties,
    current: Option<Current>,
    committed: Vec<PathBuf>,
}

impl PartWriter {
    /// A writer into `dir` (created if missing).
    pub fn new(
        dir: &Path,
        prefix: impl Into<String>,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> Result<Self> {
        create_dir_all(dir)?;
        Ok(PartWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
            schema,
            props,
            current: None,
            committed: Vec::new(),
        })
    }

    /// The final path of part `k`.
    pub fn part_path(&self, part: u64) -> PathBuf {
        self.dir.join(format!("{}-{part:05}.parquet", self.prefix))
    }

    /// Parts committed (or verified) so far.
    pub fn committed(&self) -> &[PathBuf] {
        &self.committed
    }

    fn open(&mut self, part: u64) -> Result<()> {
        let final_path = self.part_path(part);
        let tmp = broadside_pipeline::store::temp_name(&final_path);
        let writer = if final_path.exists() {
            None
        } else {
            let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            Some(
                ArrowWriter::try_new(f, self.schema.clone(), Some(self.props.clone()))
                    .map_err(|e| Error::sink(tmp.display().to_string(), e.to_string()))?,
            )
        };
        self.current = Some(Current {
            part,
            tmp,
            final_path,
            writer,
            rows: 0,
        });
        Ok(())
    }

    /// Appends rows to part `part`, opening it first if needed. Parts must come in order.
    pub fn write(&mut self, part: u64, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match &self.current {
            Some(c) if c.part == part => {}
            Some(c) => {
                return Err(Error::sink(
                    c.final_path.display().to_string(),
                    format!("part {part} started before part {} was closed", c.part),
                ))
            }
            None => self.open(part)?,
        }
        let c = self.current.as_mut().expect("opened");
        if let Some(w) = c.writer.as_mut() {
            w.write(batch)
                .map_err(|e| Error::sink(c.tmp.display().to_string(), e.to_string()))?;
        }
        c.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Writes what input rows `first_row .. first_row + len` produced, split at part
    /// boundaries (parts of `part_rows` input rows): `build(start, end)` returns the output
    /// rows for batch rows `start .. end`. Parts that end inside this range are committed.
    pub fn write_input_rows(
        &mut self,
        first_row: u64,
        len: usize,
        part_rows: u64,
        mut build: impl FnMut(usize, usize) -> Result<RecordBatch>,
    ) -> Result<()> {
        for s in segments(first_row, len, part_rows) {
            let batch = build(s.start, s.end)?;
            self.write(s.part, &batch)?;
            if s.completes {
                self.close_part()?;
            }
        }
        Ok(())
    }

    /// Commits the open part (if any): footer, fsync, rename. For a part an earlier attempt
    /// committed, checks its row count instead.
    pub fn close_part(&mut self) -> Result<()> {
        let Some(mut c) = self.current.take() else {
            return Ok(());
        };
        match c.writer.take() {
            Some(w) => {
                let file = w
                    .into_inner()
                    .map_err(|e| Error::sink(c.tmp.display().to_string(), e.to_string()))?;
                file.sync_all().map_err(|e| Error::io(&c.tmp, e))?;
                drop(file);
                commit_file(&c.tmp, &c.final_path)?;
            }
            None => {
                let have = File::open(&c.final_path)
                    .map_err(|e| Error::io(&c.final_path, e))
                    .and_then(|f| {
                        SerializedFileReader::new(f).map_err(|e| {
                            Error::sink(c.final_path.display().to_string(), e.to_string())
                        })
                    })?
                    .metadata()
                    .file_metadata()
                    .num_rows() as u64;
                if have != c.rows {
                    return Err(Error::sink(
                        c.final_path.display().to_string(),
                        format!(
                            "an earlier attempt committed {have} rows here, this attempt produced {}: \
                             the input changed since the run started",
                            c.rows
                        ),
                    ));
                }
            }
        }
        self.committed.push(c.final_path);
        Ok(())
    }

    /// Drops the open part without committing it.
    pub fn abort(&mut self) {
        if let Some(c) = self.current.take() {
            drop(c.writer);
            let _ = std::fs::remove_file(&c.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_part_boundaries() {
        assert_eq!(
            segments(8, 10, 10),
            vec![
                Segment {
                    part: 0,
                    start: 0,
                    end: 2,
                    completes: true
                },
                Segment {
                    part: 1,
                    start: 2,
                    end: 10,
                    completes: false
                },
            ]
        );
        assert_eq!(
            segments(0, 10, 10),
            vec![Segment {
                part: 0,
                start: 0,
                end: 10,
                completes: true
            }]
        );
        assert_eq!(segments(0, 25, 10).len(), 3);
    }
}
