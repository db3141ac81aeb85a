//! The exactly-once commit protocol shared by Kafka and file ingest.
//!
//! A *stream* (one Kafka partition, one input file) has a chain of commits. Commit `k`
//! covers offsets `[start, end]`, where `start` is the previous commit's `end + 1`, and
//! consists of Parquet files (one per `workspace_id`/`date`) plus an optional dead-letter
//! file. The steps, in order:
//!
//! 1. every file is written under `_ingest/<stream>/staging/` and fsynced;
//! 2. a manifest listing the files and the range is hard-linked to
//!    `_ingest/<stream>/<start>.json`. `link(2)` fails if the name exists, so this is a
//!    compare-and-set: of two writers that both resumed at `start` (a partition
//!    revoked from a stalled consumer and given to another), exactly one wins. The
//!    manifest appearing is the commit point;
//! 3. the staged files are renamed to their final names in the store.
//!
//! Recovery (on startup, on partition assignment) reads the newest manifest, redoes any
//! rename that step 3 did not finish (roll forward), deletes staged files that can no
//! longer be committed (roll back) and resumes at `end + 1`. Final names are
//! `<prefix>-<start>-<end>.parquet`; since ranges never overlap, names never collide.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow_array::RecordBatch;
use broadside_pipeline::event::{file_schema, partition_dir};
use broadside_pipeline::store::{commit_file, create_dir_all, sync_dir};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::attribution::Attribution;
use crate::buffer::{DeadLetter, Pending};
use crate::error::{Error, Result};

/// Manifests kept regardless of age (the newest ones).
const KEEP_MANIFESTS: usize = 8;
/// Older manifests are deleted only once this old: a writer stalled for longer than
/// this could otherwise re-create a pruned name. Kafka evicts a stalled group member
/// long before (`max.poll.interval.ms`, 5 minutes by default).
const MANIFEST_MIN_AGE: Duration = Duration::from_secs(15 * 60);

/// How Parquet files are written.
#[derive(Debug, Clone, Copy)]
pub struct WriteSettings {
    /// zstd level (1 is fast and already compresses event text well).
    pub zstd_level: i32,
    /// Maximum rows per row group.
    pub row_group_rows: usize,
}

impl Default for WriteSettings {
    fn default() -> Self {
        WriteSettings {
            zstd_level: 1,
            row_group_rows: 128 * 1024,
        }
    }
}

/// Where a stream keeps its state and how its files are named.
#[derive(Debug, Clone)]
pub(crate) struct StreamId {
    /// `_ingest/...` folder of the stream, relative to the store.
    pub(crate) state_rel: PathBuf,
    /// Dead-letter folder, relative to the store.
    pub(crate) dead_rel: PathBuf,
    /// Data file name prefix, unique per stream (`kafka-<topic>-<partition>`).
    pub(crate) prefix: String,
    /// For messages: `topic events partition 3`.
    pub(crate) describe: String,
    /// Fields identifying the source in every dead-letter record.
    pub(crate) dead_fields: serde_json::Map<String, serde_json::Value>,
    /// Name of the position field in dead letters (`offset` or `line`).
    pub(crate) offset_field: &'static str,
}

/// One file of a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ManifestFile {
    /// Staged name, relative to the store.
    staged: PathBuf,
    /// Final name, relative to the store.
    path: PathBuf,
    /// Rows (data files) or records (dead-letter file).
    rows: u64,
}

/// The commit record of one offset range.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    stream: String,
    start: i64,
    end: i64,
    files: Vec<ManifestFile>,
    #[serde(default)]
    dead_letters: Option<ManifestFile>,
    committed_at: String,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The range is committed.
    Committed {
        /// Event rows written.
        rows: u64,
        /// Dead letters written.
        dead_letters: u64,
        /// Data files written.
        files: u64,
        /// Event rows whose variant or run came from the ledger.
        attributed: u64,
    },
    /// Another writer committed from the same start first; nothing of ours was kept.
    /// Consumption must resume at `next`.
    Conflict {
        /// The offset after what is now committed.
        next: i64,
    },
}

/// Commits one stream's ranges; see the module docs for the protocol.
pub(crate) struct Committer {
    store: PathBuf,
    id: StreamId,
    initial: i64,
    next: i64,
    settings: WriteSettings,
    /// Fills events' missing variant and run from the ledger before they are written.
    attribution: Option<Arc<Attribution>>,
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A name part unique to this attempt, so two writers never share a staged file.
fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{:x}-{:x}-{}",
        std::process::id(),
        nanos,
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
}

fn manifest_name(start: i64) -> String {
    format!("{start:020}.json")
}

/// The start offset a manifest or staged file name begins with.
fn leading_offset(name: &str) -> Option<i64> {
    name.get(..20)?.parse().ok()
}

/// The final data file name of a range.
pub(crate) fn data_file_name(prefix: &str, start: i64, end: i64) -> String {
    format!("{prefix}-{start:020}-{end:020}.parquet")
}

impl Committer {
    /// Opens a stream: recovers its newest commit and positions at the offset after it
    /// (or `initial` when nothing was committed yet).
    pub(crate) fn open(
        store: &Path,
        id: StreamId,
        initial: i64,
        settings: WriteSettings,
    ) -> Result<Self> {
        let mut c = Committer {
            store: store.to_path_buf(),
            id,
            initial,
            next: initial,
            settings,
            attribution: None,
        };
        c.recover()?;
        Ok(c)
    }

    /// Attributes the events of each commit from the ledger ([`Attribution`]).
    pub(crate) fn with_attribution(mut self, a: Arc<Attribution>) -> Self {
        self.attribution = Some(a);
        self
    }

    /// The first offset not yet committed.
    pub(crate) fn next(&self) -> i64 {
        self.next
    }

    /// Human description of the stream.
    pub(crate) fn describe(&self) -> &str {
        &self.id.describe
    }

    fn state_dir(&self) -> PathBuf {
        self.store.join(&self.id.state_rel)
    }

    fn staging_dir(&self) -> PathBuf {
        self.state_dir().join("staging")
    }

    /// Reads the newest manifest, finishes its renames and clears dead staged files.
    pub(crate) fn recover(&mut self) -> Result<()> {
        let dir = self.state_dir();
        create_dir_all(&self.staging_dir())?;
        let newest = list_manifests(&dir)?.into_iter().max();
        self.next = match newest {
            None => self.initial,
            Some(start) => {
                let path = dir.join(manifest_name(start));
                let m = read_manifest(&path)?;
                self.roll_forward(&path, &m)?;
                m.end + 1
            }
        };
        // Staged files starting before `next` can never be committed (that start is
        // taken); ones at `next` may belong to a writer still in flight and are left.
        let staging = self.staging_dir();
        for entry in fs::read_dir(&staging).map_err(|e| Error::io(&staging, e))? {
            let entry = entry.map_err(|e| Error::io(&staging, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if leading_offset(&name).is_some_and(|s| s < self.next) {
                let p = entry.path();
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&p, e)),
                }
            }
        }
        Ok(())
    }

    fn roll_forward(&self, manifest_path: &Path, m: &Manifest) -> Result<()> {
        for f in m.files.iter().chain(m.dead_letters.iter()) {
            let staged = self.store.join(&f.staged);
            let fin = self.store.join(&f.path);
            if staged.exists() {
                create_dir_all(fin.parent().unwrap_or(&self.store))?;
                match commit_file(&staged, &fin) {
                    Ok(()) => {}
                    // Another process finishing the same commit renamed it first.
                    Err(_) if !staged.exists() && fin.exists() => {}
                    Err(e) => return Err(e.into()),
                }
            } else if !fin.exists() {
                return Err(Error::state(
                    manifest_path,
                    format!(
                        "{}: committed file {} is neither staged nor in place",
                        self.id.describe,
                        f.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Commits `[next, end]` with the given rows and dead letters.
    pub(crate) fn commit(&mut self, end: i64, pending: Pending) -> Result<CommitOutcome> {
        let _span = tracing::info_span!(
            "commit",
            stream = %self.id.describe,
            start = self.next,
            end
        )
        .entered();
        let started = std::time::Instant::now();
        let outcome = self.commit_range(end, pending)?;
        match &outcome {
            CommitOutcome::Committed {
                rows, dead_letters, ..
            } => {
                metrics::counter!("broadside_ingest_commits_total").increment(1);
                metrics::counter!("broadside_ingest_event_rows_total").increment(*rows);
                metrics::counter!("broadside_ingest_dead_letters_total").increment(*dead_letters);
                metrics::histogram!("broadside_ingest_commit_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("broadside_ingest_last_commit_timestamp_seconds")
                    .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
            }
            CommitOutcome::Conflict { .. } => {
                metrics::counter!("broadside_ingest_commit_conflicts_total").increment(1)
            }
        }
        Ok(outcome)
    }

    fn commit_range(&mut self, end: i64, mut pending: Pending) -> Result<CommitOutcome> {
        let start = self.next;
        if end < start {
            return Err(Error::state(
                self.state_dir(),
                format!(
                    "{}: commit range {start}..={end} is empty or goes backwards",
                    self.id.describe
                ),
            ));
        }
        let n = nonce();
        let staging_rel = self.id.state_rel.join("staging");
        let mut files = Vec::with_capacity(pending.partitions.len());
        let mut total_rows = 0u64;
        let mut attributed = 0u64;
        if let Some(a) = &self.attribution {
            for part in &mut pending.partitions {
                for b in &mut part.batches {
                    let taken = std::mem::replace(b, RecordBatch::new_empty(file_schema()));
                    let (batch, n) = a.apply(&part.workspace_id, taken)?;
                    *b = batch;
                    attributed += n;
                }
            }
        }
        for (i, part) in pending.partitions.iter().enumerate() {
            let staged = staging_rel.join(format!("{start:020}-{end:020}-{n}-{i}.parquet"));
            let fin = partition_dir(Path::new(""), &part.workspace_id, part.date)
                .join(data_file_name(&self.id.prefix, start, end));
            self.write_parquet(&self.store.join(&staged), &part.batches)?;
            total_rows += part.rows as u64;
            files.push(ManifestFile {
                staged,
                path: fin,
                rows: part.rows as u64,
            });
        }
        let dead_letters = if pending.dead.is_empty() {
            None
        } else {
            let staged = staging_rel.join(format!("{start:020}-{end:020}-{n}-dl.ndjson"));
            let fin = self
                .id
                .dead_rel
                .join(format!("dl-{start:020}-{end:020}.ndjson"));
            self.write_dead_letters(&self.store.join(&staged), &pending.dead)?;
            Some(ManifestFile {
                staged,
                path: fin,
                rows: pending.dead.len() as u64,
            })
        };
        sync_dir(&self.staging_dir())?;

        let manifest = Manifest {
            version: 1,
            stream: self.id.describe.clone(),
            start,
            end,
            files,
            dead_letters,
            committed_at: chrono::Utc::now().to_rfc3339(),
        };
        let dir = self.state_dir();
        let final_path = dir.join(manifest_name(start));
        let tmp = dir.join(format!(".{start:020}-{n}.tmp"));
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_synced(&tmp, &bytes)?;
        let linked = fs::hard_link(&tmp, &final_path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                for f in manifest.files.iter().chain(manifest.dead_letters.iter()) {
                    let _ = fs::remove_file(self.store.join(&f.staged));
                }
                tracing::warn!(
                    stream = %self.id.describe,
                    start,
                    "another writer committed this range first; resuming after its commit"
                );
                self.recover()?;
                return Ok(CommitOutcome::Conflict { next: self.next });
            }
            Err(e) => return Err(Error::io(&final_path, e)),
        }
        self.roll_forward(&final_path, &manifest)?;
        self.next = end + 1;
        self.prune(&dir)?;
        Ok(CommitOutcome::Committed {
            rows: total_rows,
            dead_letters: pending.dead.len() as u64,
            files: manifest.files.len() as u64,
            attributed,
        })
    }

    fn write_parquet(&self, path: &Path, batches: &[arrow_array::RecordBatch]) -> Result<()> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let sync_handle = file.try_clone().map_err(|e| Error::io(path, e))?;
        let level =
            ZstdLevel::try_new(self.settings.zstd_level).map_err(|e| Error::parquet(path, e))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(self.settings.row_group_rows));
        // Event ids are unique and emails nearly so within a file: a dictionary never pays
        // off for them and costs a hash per value (a seventh of the ingest's CPU). Min/max
        // statistics of unsorted ids prune nothing; emails keep theirs for the raw filters.
        for column in ["event_id", "email"] {
            props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        props = props
            .set_column_statistics_enabled(ColumnPath::from("event_id"), EnabledStatistics::None);
        let props = props.build();
        let mut w = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            file_schema(),
            Some(props),
        )
        .map_err(|e| Error::parquet(path, e))?;
        for b in batches {
            w.write(b).map_err(|e| Error::parquet(path, e))?;
        }
        w.close().map_err(|e| Error::parquet(path, e))?;
        sync_handle.sync_all().map_err(|e| Error::io(path, e))
    }

    fn write_dead_letters(&self, path: &Path, dead: &[DeadLetter]) -> Result<()> {
        let mut out = Vec::with_capacity(dead.iter().map(|d| d.payload.len() + 200).sum());
        for d in dead {
            let mut rec = self.id.dead_fields.clone();
            rec.insert(self.id.offset_field.into(), d.offset.into());
            rec.insert("reason".into(), d.reason.code().into());
            rec.insert("detail".into(), d.reason.to_string().into());
            match std::str::from_utf8(&d.payload) {
                Ok(s) => rec.insert("payload".into(), s.into()),
                Err(_) => rec.insert("payload_base64".into(), STANDARD.encode(&d.payload).into()),
            };
            serde_json::to_writer(&mut out, &rec).expect("dead letter serializes");
            out.push(b'\n');
        }
        write_synced(path, &out)
    }

    /// Deletes manifests that are neither among the newest nor young.
    fn prune(&self, dir: &Path) -> Result<()> {
        let mut starts = list_manifests(dir)?;
        if starts.len() <= KEEP_MANIFESTS {
            return Ok(());
        }
        starts.sort_unstable();
        let now = SystemTime::now();
        for s in &starts[..starts.len() - KEEP_MANIFESTS] {
            let p = dir.join(manifest_name(*s));
            let old = fs::metadata(&p)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= MANIFEST_MIN_AGE)
                .unwrap_or(false);
            if old {
                let _ = fs::remove_file(&p);
            }
        }
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn list_manifests(dir: &Path) -> Result<Vec<i64>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.len() == 25 && name.ends_with(".json") {
            if let Some(s) = leading_offset(&name) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::state(path, format!("unreadable manifest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::StreamBuffer;
    use std::time::Instant;

    fn id(p: u32) -> StreamId {
        StreamId {
            state_rel: PathBuf::from(format!("_ingest/test/p={p}")),
            dead_rel: PathBuf::from(format!("dead_letters/test/p={p}")),
            prefix: format!("test-{p}"),
            describe: format!("test stream {p}"),
            dead_fields: serde_json::Map::new(),
            offset_field: "offset",
        }
    }

    fn pending(offsets: std::ops::Range<i64>) -> Pending {
        let mut b = StreamBuffer::default();
        for o in offsets {
            let json = format!(
                r#"{{"event_id":"e{o}","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1700000000}}"#
            );
            b.push_record(o, json.as_bytes(), Instant::now()).unwrap();
        }
        b.push_record(offsets_end_marker(), b"junk", Instant::now())
            .unwrap();
        b.take().unwrap()
    }

    fn offsets_end_marker() -> i64 {
        -1
    }

    #[test]
    fn second_writer_from_same_start_conflicts_and_resumes_after_winner() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Committer::open(d.path(), id(0), 0, WriteSettings::default()).unwrap();
        let mut b = Committer::open(d.path(), id(0), 0, WriteSettings::default()).unwrap();
        assert!(matches!(
            a.commit(9, pending(0..10)).unwrap(),
            CommitOutcome::Committed {
                rows: 10,
                dead_letters: 1,
                files: 1,
                attributed: 0
            }
        ));
        assert_eq!(
            b.commit(4, pending(0..5)).unwrap(),
            CommitOutcome::Conflict { next: 10 }
        );
        assert_eq!(b.next(), 10);
        // The loser left nothing behind.
        let staged = fs::read_dir(d.path().join("_ingest/test/p=0/staging"))
            .unwrap()
            .count();
        assert_eq!(staged, 0);
        let files: Vec<_> = fs::read_dir(d.path().join("events/workspace_id=w/date=2023-11-14"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, vec![data_file_name("test-0", 0, 9)]);
    }

    #[test]
    fn recovery_rolls_forward_a_commit_whose_renames_did_not_happen() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Committer::open(d.path(), id(1), 0, WriteSettings::default()).unwrap();
        a.commit(9, pending(0..10)).unwrap();
        // Simulate a crash between manifest link and rename: move the file back to staging.
        let m = read_manifest(&d.path().join("_ingest/test/p=1").join(manifest_name(0))).unwrap();
        fs::rename(
            d.path().join(&m.files[0].path),
            d.path().join(&m.files[0].staged),
        )
        .unwrap();
        // And leave an orphan from an attempt that never got its manifest.
        let orphan = d
            .path()
            .join("_ingest/test/p=1/staging")
            .join(format!("{:020}-x.parquet", 3));
        fs::write(&orphan, b"x").unwrap();
        let c = Committer::open(d.path(), id(1), 0, WriteSettings::default()).unwrap();
        assert_eq!(c.next(), 10);
        assert!(d.path().join(&m.files[0].path).exists());
        assert!(!orphan.exists());
        assert!(d.path().join(&m.dead_letters.unwrap().path).exists());
    }
}
