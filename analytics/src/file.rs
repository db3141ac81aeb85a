//! The embedded default: ingest an NDJSON file into the same store, without Kafka.
//!
//! Exactly once by file and line: the file is a stream whose offsets are 1-based line
//! numbers, committed with the same protocol as a Kafka partition
//! ([`crate::commit`]). Re-running on the same file resumes after the last committed
//! line, so a crash mid-file neither loses nor duplicates lines, and re-running on a
//! finished file writes nothing.
//!
//! A file is known by its identity, not its path: device, inode and a fingerprint of its
//! first line ([`FileIdentity`]). A file rotated or replaced at the same path is a new
//! stream and is read from its first line; a file moved within its file system keeps its
//! position. A last line without its newline may still be being written: it is left for
//! the next run, which reads it once it is complete.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::attribution::Attribution;
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
    /// Identity of the file in the store's ingest state. Defaults to `f` and a hash of the
    /// file's [`FileIdentity`] (device, inode, first line), so a file rotated
    /// at the same path is a new source. Give one explicitly when a copy of the file (another
    /// inode or machine) continues the same source; its first line is then checked against
    /// the one the source was started with (CLI: `--source-id`).
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

    /// The source id used in file names and state folders, for a file of `identity`.
    pub fn resolved_source_id(&self, identity: &FileIdentity) -> Result<String> {
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
        // No part of the path: a file renamed by a rotation keeps its source (and position).
        Ok(format!("f{:016x}", identity.hash()))
    }
}

/// Longest first line the fingerprint covers (bytes).
const FINGERPRINT_BYTES: usize = 4096;

/// What makes a file the same file across runs, whatever its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the file system holding it.
    pub device: u64,
    /// Inode number.
    pub inode: u64,
    /// xxh3-64 of its first line (up to [`FINGERPRINT_BYTES`] bytes, newline excluded): a
    /// file truncated and rewritten in place keeps its inode but not, usually, its first line.
    pub fingerprint: u64,
}

impl FileIdentity {
    /// The identity of an open file, or `None` while it has no complete first line (or, past
    /// 4 KiB, no first 4 KiB) yet: then there is nothing to ingest.
    pub fn of(file: &File, path: &Path) -> Result<Option<FileIdentity>> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let mut head = Vec::with_capacity(FINGERPRINT_BYTES);
        file.take(FINGERPRINT_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        let first = match head.iter().position(|&b| b == b'\n') {
            Some(i) => &head[..i],
            None if head.len() == FINGERPRINT_BYTES => &head[..],
            None => return Ok(None),
        };
        Ok(Some(FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
            fingerprint: xxh3_64(first),
        }))
    }

    fn hash(&self) -> u64 {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.device.to_le_bytes());
        b[8..16].copy_from_slice(&self.inode.to_le_bytes());
        b[16..].copy_from_slice(&self.fingerprint.to_le_bytes());
        xxh3_64(&b)
    }
}

/// Ingests one NDJSON file into `<store>/events/`, exactly once by line; bad lines go
/// to `<store>/dead_letters/file/source=<id>/`. Empty lines are skipped; a last line
/// without its newline is left for the next run.
pub fn ingest_file(cfg: &FileIngestConfig, hooks: &IngestHooks) -> Result<IngestStats> {
    ingest_file_until(cfg, hooks, &AtomicBool::new(false))
}

/// [`ingest_file`] that stops early once `shutdown` is set, after committing every line
/// read so far (the next run resumes after them).
pub fn ingest_file_until(
    cfg: &FileIngestConfig,
    hooks: &IngestHooks,
    shutdown: &AtomicBool,
) -> Result<IngestStats> {
    let mut problems = Vec::new();
    cfg.flush.problems(&mut problems);
    if !problems.is_empty() {
        return Err(Error::Config {
            what: "file ingest",
            problems,
        });
    }
    let f = File::open(&cfg.path).map_err(|e| Error::io(&cfg.path, e))?;
    let Some(identity) = FileIdentity::of(&f, &cfg.path)? else {
        // Not even one complete line yet: nothing to commit, no state to create.
        return Ok(IngestStats::default());
    };
    let source_id = cfg.resolved_source_id(&identity)?;
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
    let state_dir = cfg.store.join(&id.state_rel);
    let mut committer = Committer::open(&cfg.store, id, 1, cfg.flush.write_settings())?
        .with_attribution(Attribution::new(&cfg.store));
    check_fingerprint(&state_dir, &identity, &source_id, &cfg.path)?;
    let mut f = f;
    std::io::Seek::rewind(&mut f).map_err(|e| Error::io(&cfg.path, e))?;
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
        if n == 0 || line.last() != Some(&b'\n') {
            // End of file, or a last line still being written: the next run reads it whole.
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
        if shutdown.load(Ordering::Relaxed) {
            break;
        }
    }
    if line_no >= committer.next() {
        // Also commits a trailing run of empty lines, so a re-run skips them.
        commit(&mut committer, &mut buffer, line_no, &mut stats, hooks)?;
    }
    Ok(stats)
}

/// Keeps the first line's fingerprint in the source's state folder, and refuses a file whose
/// first line differs from the one the source was started with (an explicit `--source-id`
/// given to another file, or a file rewritten in place): its lines would be taken for
/// ones already committed.
fn check_fingerprint(
    state_dir: &Path,
    identity: &FileIdentity,
    source_id: &str,
    path: &Path,
) -> Result<()> {
    let file = state_dir.join("fingerprint");
    let ours = format!("{:016x}\n", identity.fingerprint);
    match std::fs::read_to_string(&file) {
        Ok(theirs) if theirs == ours => Ok(()),
        Ok(theirs) => Err(Error::state(
            &file,
            format!(
                "{} is not the file source `{source_id}` was started with: its first line's \
                 fingerprint is {} but the source's is {}; give it another --source-id",
                path.display(),
                ours.trim(),
                theirs.trim()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = state_dir.join(format!(".fingerprint.{}.tmp", std::process::id()));
            std::fs::write(&tmp, ours.as_bytes())
                .and_then(|()| File::open(&tmp)?.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            broadside_pipeline::store::commit_file(&tmp, &file)?;
            Ok(())
        }
        Err(e) => Err(Error::io(&file, e)),
    }
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
    metrics::counter!("broadside_ingest_records_total", "source" => "file").increment(records);
    metrics::counter!("broadside_ingest_bytes_total", "source" => "file")
        .increment(buffer.bytes as u64);
    let pending = buffer.take()?;
    match committer.commit(end, pending)? {
        CommitOutcome::Committed {
            rows,
            dead_letters,
            files,
            attributed,
        } => {
            stats.add_commit(records, rows, dead_letters, files);
            stats.attributed += attributed;
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
