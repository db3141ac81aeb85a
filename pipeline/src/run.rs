//! The run record: one JSON document per send run, rewritten atomically as the run progresses.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Decision, Reason};
use crate::runner::{RunStats, StageStats};
use crate::store::write_atomic;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Started and not finished (or killed: resume it with the same run id).
    Running,
    /// Every recipient decided and every output committed.
    Done,
    /// Stopped by an error (see `error`); resumable once the cause is fixed.
    Failed,
}

/// A file (input or suppression list) as it was when the run first started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFingerprint {
    /// Path or description.
    pub path: String,
    /// Size in bytes (files only).
    pub bytes: Option<u64>,
    /// Modification time, nanoseconds since the epoch (files only).
    pub modified_ns: Option<i128>,
}

impl FileFingerprint {
    /// Fingerprints a file on disk, or just names a non-file source.
    pub fn of(path: &Path) -> Self {
        let meta = std::fs::metadata(path).ok();
        FileFingerprint {
            path: path.display().to_string(),
            bytes: meta.as_ref().map(|m| m.len()),
            modified_ns: meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128),
        }
    }

    /// A non-file input (synthetic, ERP): only its description.
    pub fn described(desc: impl Into<String>) -> Self {
        FileFingerprint {
            path: desc.into(),
            bytes: None,
            modified_ns: None,
        }
    }
}

/// Count of one (decision, reason) pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// Decision name.
    pub decision: String,
    /// Reason code (empty for sent).
    pub reason: String,
    /// Rows.
    pub count: u64,
}

/// Per-variant outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantCount {
    /// Variant name.
    pub name: String,
    /// Template.
    pub template: String,
    /// Recipients sent.
    pub sent: u64,
}

/// One IFUR file delivered by the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredFile {
    /// File name in the hot folder.
    pub file: String,
    /// Variant.
    pub variant: String,
    /// Detail lines.
    pub rows: u64,
    /// Checksum from the trailer (xxh3-64 of the detail lines, hex).
    pub checksum: String,
}

/// The record of one send run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Run id.
    pub run_id: String,
    /// Campaign.
    pub campaign_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Status.
    pub status: RunStatus,
    /// How many times the run was started (1 + resumes).
    pub attempts: u32,
    /// First start.
    pub started_at: DateTime<Utc>,
    /// Successful end.
    pub finished_at: Option<DateTime<Utc>>,
    /// xxh3-64 of the spec text: a resume must use the same spec.
    pub spec_hash: String,
    /// The recipient source as first seen.
    pub input: FileFingerprint,
    /// Suppression lists as first seen.
    pub suppression_lists: Vec<FileFingerprint>,
    /// The sending's audience (its compiled conditions), when it restricts the source: a
    /// resume with another audience would select other recipients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Ids of the suppression snapshots (`snapshot.json` beside a list, written by
    /// `broadside suppression build`) the lists came from.
    #[serde(default)]
    pub suppression_snapshots: Vec<String>,
    /// Input rows.
    pub rows: u64,
    /// Rows per decision.
    pub decisions: BTreeMap<String, u64>,
    /// Rows per decision and reason.
    pub reasons: Vec<ReasonCount>,
    /// Sent rows per variant.
    pub variants: Vec<VariantCount>,
    /// Holdout rows.
    pub holdout: u64,
    /// Distinct keys in the suppression index.
    pub suppression_keys: u64,
    /// Seconds spent loading the lists and building the suppression index.
    pub suppression_build_secs: f64,
    /// IFUR files delivered.
    pub files: Vec<DeliveredFile>,
    /// Files (IFUR files, the manifest) an earlier attempt delivered that were gone from the
    /// hot folder when this attempt started (taken by MegaSys), so were not delivered again.
    #[serde(default)]
    pub delivered_missing: Vec<String>,
    /// Per-stage throughput and back-pressure of the last attempt.
    pub stages: Vec<StageStats>,
    /// Wall-clock seconds of the last attempt.
    pub elapsed_secs: f64,
    /// Input rows per wall-clock second of the last attempt.
    pub rows_per_sec: f64,
    /// Why the run failed.
    pub error: Option<String>,
    /// How the run deduplicated its recipients (`key`, `household` or `off`); absent in
    /// records of runs that did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<String>,
    /// Earlier runs of the campaign whose sent keys this run skipped as `already_sent`
    /// (`--exclude-sent`); a resume skips the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_runs: Vec<String>,
    /// The suppression snapshot the run built from the store (`store_suppression`), with
    /// its counts; absent when the run did not use one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_suppression: Option<StoreSuppression>,
}

/// A run's suppression snapshot from the store: what it held and what it was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSuppression {
    /// The snapshot's id (also in `suppression_snapshots`).
    pub snapshot_id: String,
    /// Distinct addresses per list (`hard_bounce`, `complaint`, `unsubscribed`,
    /// `soft_bounce_repeated`, `blocklist`).
    pub lists: BTreeMap<String, u64>,
    /// Addresses read from the workspace's event files (before deduplication).
    pub event_rows: u64,
    /// Event files read.
    pub event_files: u64,
    /// Addresses read from imported historical bounces.
    pub historical_rows: u64,
    /// Historical import files read.
    pub historical_files: u64,
    /// Addresses read from the workspace's organisation blocklist files.
    #[serde(default)]
    pub blocklist_rows: u64,
    /// Blocklist files read.
    #[serde(default)]
    pub blocklist_files: u64,
    /// Seconds the build took (0 when a resume reused it).
    pub build_secs: f64,
}

impl RunRecord {
    /// Reads a run record.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Resume {
            run_id: path.display().to_string(),
            message: format!("run record is not readable: {e}"),
        })
    }

    /// Writes the record atomically (one line of JSON, so the folder reads as NDJSON).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string(self).expect("run record serialises");
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Fills the counts from a finished run.
    pub fn apply_stats(&mut self, stats: &RunStats, variant_names: &[(String, String)]) {
        self.rows = stats.rows;
        self.decisions = Decision::ALL
            .into_iter()
            .filter(|d| *d != Decision::Pending)
            .map(|d| (d.as_str().to_string(), stats.decided(d)))
            .collect();
        self.reasons = stats
            .counts
            .iter()
            .map(|((d, r), n)| ReasonCount {
                decision: d.as_str().into(),
                reason: r.as_str().into(),
                count: *n,
            })
            .collect();
        self.variants = variant_names
            .iter()
            .zip(&stats.sent_per_variant)
            .map(|((name, template), sent)| VariantCount {
                name: name.clone(),
                template: template.clone(),
                sent: *sent,
            })
            .collect();
        self.holdout = stats.holdout;
        self.stages = stats.stages.clone();
        self.elapsed_secs = stats.elapsed_secs;
        self.rows_per_sec = stats.rows as f64 / stats.elapsed_secs.max(1e-9);
    }

    /// The count for one (decision, reason).
    pub fn count(&self, d: Decision, r: Reason) -> u64 {
        self.reasons
            .iter()
            .find(|c| c.decision == d.as_str() && c.reason == r.as_str())
            .map_or(0, |c| c.count)
    }
}

/// The run id without a shard suffix (`-sIofN`): the shards of one send share it.
pub fn base_run_id(run_id: &str) -> &str {
    if let Some(at) = run_id.rfind("-s") {
        let tail = &run_id[at + 2..];
        if let Some((i, n)) = tail.split_once("of") {
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if digits(i) && digits(n) {
                return &run_id[..at];
            }
        }
    }
    run_id
}

/// The run records of one campaign in a workspace's run folder, oldest first. Records that
/// cannot be read are errors naming the file: a run that cannot be seen cannot be excluded.
pub fn campaign_runs(runs_dir: &Path, campaign_id: &str) -> Result<Vec<RunRecord>> {
    let entries = match std::fs::read_dir(runs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(runs_dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let path = e.map_err(|e| Error::io(runs_dir, e))?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let r = RunRecord::load(&path)?;
        if r.campaign_id == campaign_id {
            out.push(r);
        }
    }
    out.sort_by(|a, b| (a.started_at, &a.run_id).cmp(&(b.started_at, &b.run_id)));
    Ok(out)
}

/// Who holds a run lock: written into the lock file by its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Host name of the holder.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it took the lock.
    pub since: DateTime<Utc>,
}

/// An exclusive lock on a run (or a campaign), held by this process until dropped.
///
/// It is an advisory `flock` on a file in the store: the kernel releases it when the process
/// ends, however it ends (`kill -9` included), so a stale lock never blocks a resume. It holds
/// between processes of one host; on a store shared between hosts it holds only where the
/// file system implements `flock` across hosts (NFS v4 does, most FUSE and SMB mounts do not).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock at `path` (created if missing) or refuses at once, naming the holder.
    pub fn acquire(path: &Path, what: &str) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        crate::store::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match serde_json::from_str::<LockHolder>(text.trim()) {
                    Ok(h) => format!(
                        "process {} on host {} since {}",
                        h.pid,
                        h.host,
                        h.since.to_rfc3339()
                    ),
                    Err(_) => "a process that is just starting".to_string(),
                };
                return Err(Error::Locked {
                    what: what.to_string(),
                    holder,
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
        let me = LockHolder {
            host: host_name(),
            pid: std::process::id(),
            since: Utc::now(),
        };
        let text = serde_json::to_string(&me).expect("lock holder serialises");
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| Error::io(path, e))?;
        Ok(RunLock { _file: file })
    }
}

/// This host's name (the kernel's), or `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn shard_suffix_is_stripped_only_when_it_is_one() {
        assert_eq!(base_run_id("r1-s0of4"), "r1");
        assert_eq!(base_run_id("spring-sale"), "spring-sale");
        assert_eq!(base_run_id("a-s1ofx"), "a-s1ofx");
        assert_eq!(base_run_id("a-sof2"), "a-sof2");
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_a_drop_releases() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.lock");
        let held = RunLock::acquire(&p, "run r").unwrap();
        let err = RunLock::acquire(&p, "run r").unwrap_err().to_string();
        assert!(err.contains("run r"), "{err}");
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(held);
        RunLock::acquire(&p, "run r").unwrap();
    }
}
