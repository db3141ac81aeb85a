//! The embedded default: ingest an NDJSON file into the same store, without Kafka.
//!
//! Exactly once by file and line: the file is a stream whose offsets are 1-based line
//! numbers, committed with the same protocol as a Kafka partition
//! ([`crate::commit`]). Re-running on the same file resumes after the last committed
//! line, so a crash mid-file neither loses nor duplicates lines, and re-running on a
//! finished file writes nothing.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::buffer::StreamBuffer;
use crate::commit::{CommitOutcome, Committer, StreamId};
use crate::error::{Error, Result};
use crate::kafka::{CommitInfo, FlushPolicy, IngestHooks, IngestStats};

/// Configuration of `broadside ingest --from FILE.ndjson`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIngestConfig {
    /// The NDJSON file, one event per line (CLI: `--from`).
    pub path: PathBuf,
    /// Store root (CLI: `--store`).
    pub store: PathBuf,
    /// Identity of the file in the store's ingest state. Defaults to the file stem plus
    /// a hash of its absolute path; give one explicitly when the same file may be
    /// ingested from another path (CLI: `--source-id`).
    #[serde(default)]
    pub source_id: Option<String>,
    /// Commit sizes (only `max_records`, `max_bytes`, `zstd_level` and `row_group_rows` apply).
    #[serde(default)]
    pub flush: FlushPolicy,
}

impl FileIngestConfig {
    /// A config with defaults.
    pub fn new(path: impl Into<PathBuf>, store: impl Into<PathBuf>) -> Self {
        FileIngestConfig {
            path: path.into(),
            store: store.into(),
            source_id: None,
            flush: FlushPolicy::default(),
        }
    }

    /// The source id used in file names and state folders.
    pub fn resolved_source_id(&self) -> Result<String> {
        if let Some(id) = &self.source_id {
            let ok = !id.is_empty()
                && id.len() <= 100
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(Error::Config {
                    what: "file ingest",
                    problems: vec![format!(
                        "source_id `{id}` may only use letters, digits, `_`, `-`, `.` (at most 100)"
                    )],
                });
            }
            return Ok(id.clone());
        }
        let abs = std::fs::canonicalize(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let stem: String = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        Ok(format!(
            "{stem}.{:016x}",
            xxh3_64(abs.as_os_str().as_encoded_bytes())
        ))
    }
}

/// Ingests one NDJSON file into `<store>/events/`, exactly once by line; bad lines go
/// to `<store>/dead_letters/file/source=<id>/`. Empty lines are skipped.
pub fn ingest_file(cfg: &FileIngestConfig, hooks: &IngestHooks) -> Result<IngestStats> {
    let mut problems = Vec::new();
    cfg.flush.problems(&mut problems);
    if !problems.is_empty() {
        return Err(Error::Config {
            what: "file ingest",
            problems,
        });
    }
    let source_id = cfg.resolved_source_id()?;
    let mut dead_fields = serde_json::Map::new();
    dead_fields.insert("source".into(), "file".into());
    dead_fields.insert("file".into(), cfg.path.display().to_string().into());
    let id = StreamId {
        state_rel: PathBuf::from("_ingest/file").join(format!("source={source_id}")),
        dead_rel: PathBuf::from("dead_letters/file").join(format!("source={source_id}")),
        prefix: format!("file-{source_id}"),
        describe: format!("file {}", cfg.path.display()),
        dead_fields,
        offset_field: "line",
    };
    let mut committer = Committer::open(&cfg.store, id, 1, cfg.flush.write_settings())?;
    let f = File::open(&cfg.path).map_err(|e| Error::io(&cfg.path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let mut stats = IngestStats::default();
    let mut buffer = StreamBuffer::default();
    let mut line = Vec::with_capacity(4096);
    let mut line_no: i64 = 0;
    let resume_at = committer.next();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::Input {
                path: cfg.path.clone(),
                line: line_no as u64 + 1,
                message: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if line_no < resume_at {
            stats.skipped_committed += 1;
            continue;
        }
        let mut rec: &[u8] = &line;
        while let Some((last, rest)) = rec.split_last() {
            if matches!(last, b'\n' | b'\r') {
                rec = rest;
            } else {
                break;
            }
        }
        if !rec.iter().all(u8::is_ascii_whitespace) {
            buffer.push_record(line_no, rec, Instant::now())?;
        }
        if buffer.records >= cfg.flush.max_records || buffer.bytes >= cfg.flush.max_bytes {
            commit(&mut committer, &mut buffer, line_no, &mut stats, hooks)?;
        }
    }
    if line_no >= committer.next() {
        // Also commits a trailing run of empty lines, so a re-run skips them.
        commit(&mut committer, &mut buffer, line_no, &mut stats, hooks)?;
    }
    Ok(stats)
}

fn commit(
    committer: &mut Committer,
    buffer: &mut StreamBuffer,
    end: i64,
    stats: &mut IngestStats,
    hooks: &IngestHooks,
) -> Result<()> {
    let start = committer.next();
    let records = buffer.records as u64;
    let pending = buffer.take()?;
    match committer.commit(end, pending)? {
        CommitOutcome::Committed {
            rows,
            dead_letters,
            files,
        } => {
            stats.add_commit(records, rows, dead_letters, files);
            if let Some(h) = &hooks.on_commit {
                h(&CommitInfo {
                    stream: committer.describe().to_string(),
                    start,
                    end,
                    rows,
                    dead_letters,
                });
            }
            Ok(())
        }
        CommitOutcome::Conflict { next } => Err(Error::state(
            Path::new(committer.describe()),
            format!(
                "another process is ingesting this file concurrently (it committed up to line {})",
                next - 1
            ),
        )),
    }
}
