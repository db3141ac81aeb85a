//! Bounce feedback: suppression lists built from the event store.
//!
//! `broadside suppression build` scans a workspace's events for hard bounces,
//! complaints and unsubscribes (plus imported historical bounce CSVs) and writes one
//! CSV per reason (header `email`, addresses trimmed, lowercased, deduplicated, sorted)
//! and a `snapshot.json` describing them. The send path loads the CSVs as suppression
//! lists and records the snapshot's id in its run record.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::{Array, StringArray};
use broadside_pipeline::store::write_atomic;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::decode::valid_workspace_id;
use crate::error::{Error, Result};

/// Why an address is suppressed; each reason gets its own CSV file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// A hard (permanent) bounce; a `bounced` event without a bounce type counts as hard.
    HardBounce,
    /// A spam complaint.
    Complaint,
    /// An unsubscribe.
    Unsubscribed,
}

impl SuppressionReason {
    /// Every reason.
    pub const ALL: [SuppressionReason; 3] = [
        SuppressionReason::HardBounce,
        SuppressionReason::Complaint,
        SuppressionReason::Unsubscribed,
    ];

    /// The name used in file names and the snapshot.
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::HardBounce => "hard_bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Unsubscribed => "unsubscribed",
        }
    }

    /// The CSV file name in the output folder.
    pub fn file_name(self) -> String {
        format!("{}.csv", self.as_str())
    }
}

/// Configuration of `broadside suppression build`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionBuildConfig {
    /// Store root (CLI: `--store`).
    pub store: PathBuf,
    /// Workspace whose events are scanned (CLI: `--workspace`).
    pub workspace_id: String,
    /// Output folder for the CSVs and `snapshot.json` (CLI: `--out`).
    pub out_dir: PathBuf,
    /// Historical bounce exports: CSV with a header containing an `email` column; an
    /// optional `bounce_type`/`type` column whose value `soft` excludes the row
    /// (CLI: `--bounces FILE`, repeatable).
    #[serde(default)]
    pub bounce_csvs: Vec<PathBuf>,
}

/// One input of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSource {
    /// The file (relative to the store for event files).
    pub path: PathBuf,
    /// Addresses it contributed (before deduplication).
    pub rows: u64,
}

/// One output list of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// File name inside the output folder.
    pub file: String,
    /// Distinct addresses.
    pub count: u64,
    /// xxh3-64 of the file's bytes (hex), so a send can check it read this snapshot.
    pub xxh3: String,
}

/// `snapshot.json`: what a suppression build produced, recorded by the send that uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionSnapshot {
    /// Content id (`sup-<hex>`): equal lists give equal ids.
    pub snapshot_id: String,
    /// Workspace.
    pub workspace_id: String,
    /// When it was built (RFC 3339).
    pub created_at: String,
    /// Output lists by reason.
    pub lists: BTreeMap<SuppressionReason, SnapshotList>,
    /// Event Parquet files and bounce CSVs read.
    pub sources: Vec<SnapshotSource>,
}

/// Normalises an address for suppression: trimmed, lowercased.
pub fn normalize_email(e: &str) -> String {
    e.trim().to_lowercase()
}

/// Builds the suppression lists of one workspace; see the module docs.
pub fn build_suppression(cfg: &SuppressionBuildConfig) -> Result<SuppressionSnapshot> {
    if !valid_workspace_id(&cfg.workspace_id) {
        return Err(Error::Config {
            what: "suppression build",
            problems: vec![format!(
                "workspace_id `{}` is not a valid workspace id",
                cfg.workspace_id
            )],
        });
    }
    // Collected as they come, sorted and deduplicated once at the end: inserting 2M addresses
    // into ordered sets spent most of the build comparing strings.
    let mut sets: BTreeMap<SuppressionReason, Vec<String>> = SuppressionReason::ALL
        .into_iter()
        .map(|r| (r, Vec::new()))
        .collect();
    let mut sources = Vec::new();

    let ws_dir = broadside_pipeline::event::events_dir(&cfg.store)
        .join(format!("workspace_id={}", cfg.workspace_id));
    for file in parquet_files(&ws_dir)? {
        let rows = scan_event_file(&file, &mut sets)?;
        let rel = file.strip_prefix(&cfg.store).unwrap_or(&file).to_path_buf();
        sources.push(SnapshotSource { path: rel, rows });
    }
    for csv in &cfg.bounce_csvs {
        let rows = scan_bounce_csv(
            csv,
            sets.get_mut(&SuppressionReason::HardBounce)
                .expect("all reasons"),
        )?;
        sources.push(SnapshotSource {
            path: csv.clone(),
            rows,
        });
    }

    let mut lists = BTreeMap::new();
    let mut id_hash = xxhash_rust::xxh3::Xxh3::new();
    for set in sets.values_mut() {
        set.sort_unstable();
        set.dedup();
    }
    for (reason, set) in &sets {
        let mut body = String::with_capacity(set.iter().map(|e| e.len() + 1).sum::<usize>() + 6);
        body.push_str("email\n");
        for e in set {
            body.push_str(&csv_field(e));
            body.push('\n');
        }
        let path = cfg.out_dir.join(reason.file_name());
        write_atomic(&path, body.as_bytes())?;
        let h = xxh3_64(body.as_bytes());
        id_hash.update(reason.as_str().as_bytes());
        id_hash.update(&h.to_le_bytes());
        lists.insert(
            *reason,
            SnapshotList {
                file: reason.file_name(),
                count: set.len() as u64,
                xxh3: format!("{h:016x}"),
            },
        );
    }
    let snapshot = SuppressionSnapshot {
        snapshot_id: format!("sup-{:016x}", id_hash.digest()),
        workspace_id: cfg.workspace_id.clone(),
        created_at: chrono::Utc::now().to_rfc3339(),
        lists,
        sources,
    };
    // Written last: a snapshot.json always describes complete lists.
    let json = serde_json::to_vec_pretty(&snapshot).expect("snapshot serializes");
    write_atomic(&cfg.out_dir.join("snapshot.json"), &json)?;
    Ok(snapshot)
}

/// Quotes a CSV field when it needs it (an address may legally contain `"` or `,`).
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&d, e)),
        };
        for e in rd {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet")
                && !p.file_name().is_some_and(|n| {
                    broadside_pipeline::event::is_submitted_file(&n.to_string_lossy())
                })
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn scan_event_file(
    path: &Path,
    sets: &mut BTreeMap<SuppressionReason, Vec<String>>,
) -> Result<u64> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| Error::parquet(path, e))?;
    let schema = builder.schema().clone();
    let idx = |name: &str| {
        schema
            .index_of(name)
            .map_err(|_| Error::state(path, format!("event file has no `{name}` column")))
    };
    let (email, etype, btype) = (idx("email")?, idx("event_type")?, idx("bounce_type")?);
    let mask = ProjectionMask::roots(builder.parquet_schema(), [email, etype, btype]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| {
            Error::parquet(
                path,
                parquet::errors::ParquetError::ArrowError(e.to_string()),
            )
        })?;
        let s = |i: usize| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| Error::state(path, "email/event_type/bounce_type must be utf8"))
        };
        // Projected columns come back in file order: email, event_type, bounce_type.
        let (emails, types, bounces) = (s(0)?, s(1)?, s(2)?);
        for i in 0..batch.num_rows() {
            if emails.is_null(i) || types.is_null(i) {
                continue;
            }
            let reason = match types.value(i) {
                "bounced" if bounces.is_null(i) || bounces.value(i) == "hard" => {
                    SuppressionReason::HardBounce
                }
                "complained" => SuppressionReason::Complaint,
                "unsubscribed" => SuppressionReason::Unsubscribed,
                _ => continue,
            };
            let e = normalize_email(emails.value(i));
            if !e.is_empty() {
                sets.get_mut(&reason).expect("all reasons").push(e);
                rows += 1;
            }
        }
    }
    Ok(rows)
}

/// Splits one CSV line (RFC 4180 quoting; no embedded newlines in bounce exports).
pub(crate) fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// A bounce export being read: its header (trimmed, lowercased names; the `email` column is
/// required) and then its non-blank data rows, each with its 1-based line number.
pub(crate) struct BounceCsv {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line: u64,
    /// Column names.
    pub(crate) cols: Vec<String>,
    /// Index of the `email` column.
    pub(crate) email: usize,
}

impl BounceCsv {
    /// Opens a file and reads its header.
    pub(crate) fn open(path: &Path) -> Result<BounceCsv> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut csv = BounceCsv {
            path: path.to_path_buf(),
            lines: BufReader::new(f).lines(),
            line: 1,
            cols: Vec::new(),
            email: 0,
        };
        let header = match csv.lines.next() {
            Some(h) => h.map_err(|e| csv.error(1, e.to_string()))?,
            None => {
                return Err(csv.error(
                    1,
                    "empty file: expected a header with an `email` column".into(),
                ))
            }
        };
        csv.cols = split_csv(header.trim_start_matches('\u{feff}'))
            .into_iter()
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        csv.email = csv
            .column(&["email"])
            .ok_or_else(|| csv.error(1, format!("no `email` column in header {:?}", csv.cols)))?;
        Ok(csv)
    }

    /// The first column with one of these names.
    pub(crate) fn column(&self, names: &[&str]) -> Option<usize> {
        self.cols.iter().position(|c| names.contains(&c.as_str()))
    }

    /// An error naming the file and line.
    pub(crate) fn error(&self, line: u64, message: String) -> Error {
        Error::Input {
            path: self.path.clone(),
            line,
            message,
        }
    }

    /// The next non-blank row: its line number and fields.
    pub(crate) fn next_row(&mut self) -> Result<Option<(u64, Vec<String>)>> {
        for line in self.lines.by_ref() {
            self.line += 1;
            let n = self.line;
            let line = line.map_err(|e| Error::Input {
                path: self.path.clone(),
                line: n,
                message: e.to_string(),
            })?;
            if !line.trim().is_empty() {
                return Ok(Some((n, split_csv(&line))));
            }
        }
        Ok(None)
    }
}

fn scan_bounce_csv(path: &Path, set: &mut Vec<String>) -> Result<u64> {
    let mut csv = BounceCsv::open(path)?;
    let (email, kind) = (csv.email, csv.column(&["bounce_type", "type"]));
    let mut rows = 0;
    while let Some((n, fields)) = csv.next_row()? {
        let Some(e) = fields.get(email) else {
            return Err(csv.error(
                n,
                format!(
                    "row has {} fields, the email column is #{}",
                    fields.len(),
                    email + 1
                ),
            ));
        };
        if kind
            .and_then(|k| fields.get(k))
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("soft"))
        {
            continue;
        }
        let e = normalize_email(e);
        if !e.is_empty() {
            set.push(e);
            rows += 1;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_split_handles_quotes() {
        assert_eq!(split_csv(r#"a,"b,c","d""e""#), vec!["a", "b,c", "d\"e"]);
        assert_eq!(csv_field("a\"b@x"), "\"a\"\"b@x\"");
    }

    #[test]
    fn bounce_csv_needs_an_email_column_and_skips_soft() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.csv");
        std::fs::write(&p, "Type,EMAIL\nhard, A@X.io \nsoft,b@x.io\nHARD,a@x.io\n").unwrap();
        let mut set = Vec::new();
        assert_eq!(scan_bounce_csv(&p, &mut set).unwrap(), 2);
        // both hard rows, normalised (deduplicated when the snapshot is written)
        assert_eq!(set, vec!["a@x.io", "a@x.io"]);
        std::fs::write(&p, "address\nx@y.z\n").unwrap();
        let err = scan_bounce_csv(&p, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.csv:1") && err.contains("email"), "{err}");
    }
}
