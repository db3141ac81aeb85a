//! Files the store derives from its events and ledgers (the rollups, the recipient index):
//! their partition folders, the fingerprints of the files they were computed from, the JSON
//! sidecars recording those fingerprints, and the writer that commits them atomically.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use broadside_pipeline::store::{commit_file, create_dir_all, temp_name};
use chrono::NaiveDate;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::query::{dir_entries, partition_values, QueryError, QueryResult};

/// Rows per row group of the rollup files.
pub(crate) const ROLLUP_ROW_GROUP_ROWS: usize = 8 * 1024;

/// The dates (`YYYY-MM-DD`) that have an event partition in a workspace, sorted.
pub fn event_dates(store: &Path, ws: &str) -> QueryResult<Vec<String>> {
    let dir = broadside_pipeline::event::events_dir(store).join(format!("workspace_id={ws}"));
    partition_values(&dir, "date", |d| {
        NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok()
    })
}

/// Fingerprint of the committed Parquet files directly in `dir` (names and sizes) and their
/// number. Store files are immutable once committed, so equal fingerprints mean equal data.
///
/// Reading every file's size costs a `stat` per file (about 40 ms per query over the 18 000
/// files a real ingest leaves in 90 days), so the fingerprint of a folder is kept in memory
/// with the folder's modification time, which every commit (a rename into the folder) moves
/// on. It is reused only while that time is unchanged **and** was already [`SETTLED`] old when
/// the fingerprint was taken: a folder changed within the same clock tick as the reading is
/// read again, so a change can never hide behind an unchanged coarse timestamp (file systems
/// keep modification times to the nanosecond, a few milliseconds' tick, or two seconds).
pub(crate) fn files_fingerprint(dir: &Path) -> QueryResult<(String, usize)> {
    /// How old a folder's modification time must be for its fingerprint to be remembered.
    const SETTLED: Duration = Duration::from_secs(3);
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, SystemTime};
    type Remembered = (SystemTime, String, usize);
    static SEEN: OnceLock<Mutex<HashMap<PathBuf, Remembered>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let now = SystemTime::now();
    let modified = match std::fs::metadata(dir) {
        Ok(m) => Some(m.modified().map_err(|e| QueryError::io(dir, e))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(QueryError::io(dir, e)),
    };
    if let Some(m) = modified {
        let known = seen.lock().expect("fingerprint memo").get(dir).cloned();
        if let Some((_, fp, n)) = known.filter(|(at, _, _)| *at == m) {
            return Ok((fp, n));
        }
    }
    let (fp, n) = listed_fingerprint(dir)?;
    if let Some(m) = modified {
        let settled = now.duration_since(m).is_ok_and(|age| age > SETTLED);
        let mut memo = seen.lock().expect("fingerprint memo");
        if settled {
            memo.insert(dir.to_path_buf(), (m, fp.clone(), n));
        } else {
            memo.remove(dir);
        }
    }
    Ok((fp, n))
}

/// [`files_fingerprint`] from the listing and every file's size.
fn listed_fingerprint(dir: &Path) -> QueryResult<(String, usize)> {
    let mut files: Vec<(String, u64)> = Vec::new();
    for e in dir_entries(dir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            let len = e
                .metadata()
                .map_err(|err| QueryError::io(e.path(), err))?
                .len();
            files.push((name, len));
        }
    }
    files.sort();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (n, l) in &files {
        h.update(n.as_bytes());
        h.update(&[0]);
        h.update(&l.to_le_bytes());
    }
    Ok((format!("{:032x}", h.digest128()), files.len()))
}

pub(crate) fn partition(store: &Path, table: &str, ws: &str, date: &str) -> PathBuf {
    store
        .join(table)
        .join(format!("workspace_id={ws}"))
        .join(format!("date={date}"))
}

/// A sidecar, `None` when it is missing or unreadable (the rollup is then rebuilt).
pub(crate) fn read_sidecar<T: serde::de::DeserializeOwned>(path: &Path) -> QueryResult<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(QueryError::io(path, e)),
    };
    Ok(serde_json::from_str(&text).ok())
}

/// A rollup file being written under a temporary name; [`RollupWriter::finish`] fsyncs it and
/// renames it into place.
pub(crate) struct RollupWriter {
    path: PathBuf,
    tmp: PathBuf,
    schema: SchemaRef,
    w: ArrowWriter<File>,
    rows: usize,
}

impl RollupWriter {
    /// A writer of `path` with the rollup files' properties.
    pub(crate) fn create(path: &Path, schema: SchemaRef) -> QueryResult<RollupWriter> {
        let props = WriterProperties::builder()
            // LZ4: a one-campaign query opens one or two row groups in each of many files,
            // and a zstd codec allocates a compression and a decompression context per column
            // chunk read (about a fifth of such a query's time); LZ4 codecs are free to create.
            .set_compression(Compression::LZ4_RAW)
            // Rows are sorted by campaign; small row groups let a one-campaign query skip all
            // but the one or two groups holding that campaign (min/max statistics per group).
            .set_max_row_group_row_count(Some(ROLLUP_ROW_GROUP_ROWS))
            .build();
        Self::with_properties(path, schema, props)
    }

    /// A writer of `path` with these writer properties.
    pub(crate) fn with_properties(
        path: &Path,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> QueryResult<RollupWriter> {
        let dir = path.parent().expect("partition folder");
        create_dir_all(dir)
            .map_err(|e| QueryError::io(dir, std::io::Error::other(e.to_string())))?;
        let tmp = temp_name(path);
        let file = File::create(&tmp).map_err(|e| QueryError::io(&tmp, e))?;
        let w = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| Self::corrupt(&tmp, e))?;
        Ok(RollupWriter {
            path: path.to_path_buf(),
            tmp,
            schema,
            w,
            rows: 0,
        })
    }

    fn corrupt(tmp: &Path, e: parquet::errors::ParquetError) -> QueryError {
        QueryError::Corrupt {
            path: tmp.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// A batch with the file's column types (plans may produce other string or integer types).
    pub(crate) fn conform(&self, b: &RecordBatch) -> QueryResult<RecordBatch> {
        let cols = b
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| arrow_cast::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    pub(crate) fn write(&mut self, b: &RecordBatch) -> QueryResult<()> {
        self.w.write(b).map_err(|e| Self::corrupt(&self.tmp, e))?;
        self.rows += b.num_rows();
        Ok(())
    }

    pub(crate) fn finish(self) -> QueryResult<usize> {
        let file = self
            .w
            .into_inner()
            .map_err(|e| Self::corrupt(&self.tmp, e))?;
        file.sync_all().map_err(|e| QueryError::io(&self.tmp, e))?;
        drop(file);
        commit_file(&self.tmp, &self.path)
            .map_err(|e| QueryError::io(&self.path, std::io::Error::other(e.to_string())))?;
        Ok(self.rows)
    }

    /// Drops the file being written (its source changed meanwhile).
    pub(crate) fn abandon(self) -> QueryResult<()> {
        drop(self.w);
        std::fs::remove_file(&self.tmp).map_err(|e| QueryError::io(&self.tmp, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_fingerprint_is_remembered_only_once_its_folder_has_settled() {
        use std::time::{Duration, SystemTime};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("date=2026-01-01");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("a.parquet");
        std::fs::write(&file, b"one").unwrap();
        let age = |secs: u64| {
            let t = SystemTime::now() - Duration::from_secs(secs);
            File::open(&dir).unwrap().set_modified(t).unwrap();
        };
        // A folder changed just now is listed every time: a size changed in place is seen.
        let fresh = files_fingerprint(&dir).unwrap();
        std::fs::write(&file, b"three").unwrap();
        let grown = files_fingerprint(&dir).unwrap();
        assert_ne!(fresh, grown);
        // Settled: remembered, so a change that leaves the folder alone (never made by the
        // store, whose files are committed by rename) goes unseen...
        age(60);
        let settled = files_fingerprint(&dir).unwrap();
        assert_eq!(settled, grown);
        std::fs::write(&file, b"three more").unwrap();
        assert_eq!(files_fingerprint(&dir).unwrap(), settled);
        // ...while a commit (a rename into the folder) moves the folder's time on and is seen,
        // a new file as well as a file replaced under its own name.
        std::fs::write(dir.join("b.tmp"), b"x").unwrap();
        std::fs::rename(dir.join("b.tmp"), dir.join("b.parquet")).unwrap();
        let added = files_fingerprint(&dir).unwrap();
        assert_eq!(added.1, 2);
        age(60);
        assert_eq!(files_fingerprint(&dir).unwrap(), added);
        std::fs::write(dir.join("a.tmp"), b"replaced, longer").unwrap();
        std::fs::rename(dir.join("a.tmp"), &file).unwrap();
        let replaced = files_fingerprint(&dir).unwrap();
        assert_ne!(replaced, added);
        assert_eq!(replaced.1, 2);
    }
}
