//! Bounce feedback: suppression lists built from the event store.
//!
//! `broadside suppression build` scans a workspace's events for hard bounces,
//! complaints, unsubscribes and repeated soft bounces, plus its imported historical bounces
//! (`historical_bounces/`), its organisation blocklist (`blocklist/`, see
//! [`import_blocklist`]) and any bounce CSVs given, and writes one CSV per reason (header
//! `email`, addresses trimmed, lowercased, deduplicated, sorted) and a `snapshot.json`
//! describing them. The send path loads the CSVs as suppression lists and records the
//! snapshot's id in its run record; [`evidence`] finds what put an address on a list.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::{Array, TimestampMicrosecondArray};
use broadside_pipeline::store::write_atomic;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::columns::{opt, opt_ts, read_columns};
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
    /// Soft bounces at or over the [`SoftBouncePolicy`] threshold within its window.
    SoftBounceRepeated,
    /// On the workspace's organisation blocklist ([`import_blocklist`]).
    Blocklist,
}

impl SuppressionReason {
    /// Every reason.
    pub const ALL: [SuppressionReason; 5] = [
        SuppressionReason::HardBounce,
        SuppressionReason::Complaint,
        SuppressionReason::Unsubscribed,
        SuppressionReason::SoftBounceRepeated,
        SuppressionReason::Blocklist,
    ];

    /// The name used in file names and the snapshot.
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::HardBounce => "hard_bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Unsubscribed => "unsubscribed",
            SuppressionReason::SoftBounceRepeated => "soft_bounce_repeated",
            SuppressionReason::Blocklist => "blocklist",
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
    /// When soft bounces suppress.
    #[serde(default)]
    pub soft_bounces: SoftBouncePolicy,
}

/// Repeated soft bounces suppress: an address with at least `threshold` soft bounces (events
/// and imported historical bounces together) in the `window_days` days before the build goes on
/// the `soft_bounce_repeated` list. A `threshold` of 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftBouncePolicy {
    /// Soft bounces that suppress (default 3).
    pub threshold: u32,
    /// Days before the build they are counted in (default 30).
    pub window_days: u32,
}

impl SoftBouncePolicy {
    /// The first instant (µs since the epoch) whose soft bounces count for a build at `at`.
    pub fn since_us(&self, at: chrono::DateTime<chrono::Utc>) -> i64 {
        (at - chrono::Duration::days(i64::from(self.window_days))).timestamp_micros()
    }
}

impl Default for SoftBouncePolicy {
    fn default() -> Self {
        SoftBouncePolicy {
            threshold: 3,
            window_days: 30,
        }
    }
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
    /// Event Parquet files, historical bounce imports and bounce CSVs read.
    pub sources: Vec<SnapshotSource>,
    /// The soft-bounce policy applied.
    #[serde(default)]
    pub soft_bounces: SoftBouncePolicy,
}

impl SuppressionSnapshot {
    /// Reads a `snapshot.json`.
    pub fn load(path: &Path) -> Result<SuppressionSnapshot> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::state(path, format!("not a suppression snapshot: {e}")))
    }

    /// Addresses read from each kind of store source (before deduplication), and its files.
    pub fn source_counts(&self) -> SourceCounts {
        let mut c = SourceCounts::default();
        for s in &self.sources {
            let (rows, files) = if s.path.starts_with("events") {
                (&mut c.event_rows, &mut c.event_files)
            } else if s.path.starts_with(HISTORICAL_DIR) {
                (&mut c.historical_rows, &mut c.historical_files)
            } else if s.path.starts_with(BLOCKLIST_DIR) {
                (&mut c.blocklist_rows, &mut c.blocklist_files)
            } else {
                continue;
            };
            *rows += s.rows;
            *files += 1;
        }
        c
    }
}

/// What a snapshot read from the store, per kind of source ([`SuppressionSnapshot::source_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounts {
    /// Addresses read from the workspace's event files.
    pub event_rows: u64,
    /// Event files read.
    pub event_files: u64,
    /// Addresses read from imported historical bounces.
    pub historical_rows: u64,
    /// Historical import files read.
    pub historical_files: u64,
    /// Addresses read from the organisation blocklist.
    pub blocklist_rows: u64,
    /// Blocklist files read.
    pub blocklist_files: u64,
}

/// The store folder of imported historical bounces ([`crate::historical`]).
pub const HISTORICAL_DIR: &str = "historical_bounces";

/// The store folder of the organisation blocklists: `blocklist/workspace_id=W/<name>.csv`.
pub const BLOCKLIST_DIR: &str = "blocklist";

/// The folder of workspace `ws`'s blocklist files.
pub fn blocklist_dir(store: &Path, ws: &str) -> PathBuf {
    store.join(BLOCKLIST_DIR).join(format!("workspace_id={ws}"))
}

/// Puts a CSV (header with an `email` column) on workspace `ws`'s organisation blocklist as
/// `name` (replacing an earlier file of that name), after reading it whole: a file with a bad
/// row is refused, naming the row, and the blocklist stays as it was. Returns the addresses
/// it holds. Every send's store suppression snapshot reads every blocklist file.
pub fn import_blocklist(store: &Path, ws: &str, name: &str, csv: &Path) -> Result<u64> {
    let bad = |m: String| Error::Config {
        what: "blocklist import",
        problems: vec![m],
    };
    if !valid_workspace_id(ws) {
        return Err(bad(format!(
            "workspace_id `{ws}` is not a valid workspace id"
        )));
    }
    if !valid_workspace_id(name) {
        return Err(bad(format!(
            "blocklist name `{name}` must be letters, digits, '-' or '_'"
        )));
    }
    let mut set = Vec::new();
    let rows = scan_blocklist_csv(csv, &mut set, |_, _| {})?;
    let bytes = std::fs::read(csv).map_err(|e| Error::io(csv, e))?;
    let dir = blocklist_dir(store, ws);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    write_atomic(&dir.join(format!("{name}.csv")), &bytes)?;
    Ok(rows)
}

/// Takes blocklist file `name` off workspace `ws`'s blocklist; false if there was none.
pub fn remove_blocklist(store: &Path, ws: &str, name: &str) -> Result<bool> {
    if !valid_workspace_id(ws) || !valid_workspace_id(name) {
        return Ok(false);
    }
    let path = blocklist_dir(store, ws).join(format!("{name}.csv"));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Reads a blocklist CSV's addresses (every row; blank addresses skipped), calling `each`
/// with each normalised address and its line.
fn scan_blocklist_csv(
    path: &Path,
    set: &mut Vec<String>,
    mut each: impl FnMut(&str, u64),
) -> Result<u64> {
    let mut csv = BounceCsv::open(path)?;
    let mut rows = 0;
    while let Some((n, fields)) = csv.next_row()? {
        let e = csv.email_field(n, &fields)?;
        let e = normalize_email(e);
        if !e.is_empty() {
            each(&e, n);
            set.push(e);
            rows += 1;
        }
    }
    Ok(rows)
}

/// The CSV files of a blocklist folder, sorted (none if it does not exist).
fn csv_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "csv") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
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
    let policy = cfg.soft_bounces;
    // One instant for the window and the snapshot's `created_at`, so `evidence` (which counts
    // back from `created_at`) sees the same window.
    let now = chrono::Utc::now();
    let since_us = policy.since_us(now);
    // Normalised addresses of the soft bounces inside the window, one per bounce.
    let mut soft: Vec<String> = Vec::new();

    let ws = format!("workspace_id={}", cfg.workspace_id);
    let ws_dir = broadside_pipeline::event::events_dir(&cfg.store).join(&ws);
    for file in parquet_files(&ws_dir)? {
        let rows = scan_event_file(&file, since_us, &mut sets, &mut soft)?;
        let rel = file.strip_prefix(&cfg.store).unwrap_or(&file).to_path_buf();
        sources.push(SnapshotSource { path: rel, rows });
    }
    for file in parquet_files(&cfg.store.join(HISTORICAL_DIR).join(&ws))? {
        let rows = scan_historical_file(&file, since_us, &mut sets, &mut soft)?;
        let rel = file.strip_prefix(&cfg.store).unwrap_or(&file).to_path_buf();
        sources.push(SnapshotSource { path: rel, rows });
    }
    for file in csv_files(&blocklist_dir(&cfg.store, &cfg.workspace_id))? {
        let rows = scan_blocklist_csv(
            &file,
            sets.get_mut(&SuppressionReason::Blocklist)
                .expect("all reasons"),
            |_, _| {},
        )?;
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

    if policy.threshold > 0 {
        soft.sort_unstable();
        let repeated = sets
            .get_mut(&SuppressionReason::SoftBounceRepeated)
            .expect("all reasons");
        for run in soft.chunk_by(|a, b| a == b) {
            if run.len() >= policy.threshold as usize {
                repeated.push(run[0].clone());
            }
        }
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
        created_at: now.to_rfc3339(),
        lists,
        sources,
        soft_bounces: policy,
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

/// The list an event puts its address on: a hard bounce (`bounced` without a bounce type
/// counts as hard), a complaint, an unsubscribe, or — for another bounce at or after `since_us`
/// — [`SuppressionReason::SoftBounceRepeated`], meaning one soft bounce counted toward the
/// policy. `None` for everything else.
fn event_list(
    event_type: &str,
    bounce_type: Option<&str>,
    ts_us: Option<i64>,
    since_us: i64,
) -> Option<SuppressionReason> {
    match (event_type, bounce_type) {
        ("bounced", None | Some("hard")) => Some(SuppressionReason::HardBounce),
        ("bounced", Some(_)) if ts_us.is_some_and(|t| t >= since_us) => {
            Some(SuppressionReason::SoftBounceRepeated)
        }
        ("complained", _) => Some(SuppressionReason::Complaint),
        ("unsubscribed", _) => Some(SuppressionReason::Unsubscribed),
        _ => None,
    }
}

/// The list an imported historical bounce puts its address on: a hard one (or one without a
/// type) always, a soft one only at or after `since_us` (counted toward the policy; without a
/// date it does not count).
fn historical_list(
    bounce_type: Option<&str>,
    bounced_at_us: Option<i64>,
    since_us: i64,
) -> Option<SuppressionReason> {
    match bounce_type {
        Some("soft") if bounced_at_us.is_some_and(|t| t >= since_us) => {
            Some(SuppressionReason::SoftBounceRepeated)
        }
        Some("soft") => None,
        _ => Some(SuppressionReason::HardBounce),
    }
}

/// Puts a normalised address on `list`, or, for a soft bounce, counts it toward the policy;
/// false (nothing added) when the address is blank.
fn add(
    email: &str,
    list: SuppressionReason,
    sets: &mut BTreeMap<SuppressionReason, Vec<String>>,
    soft: &mut Vec<String>,
) -> bool {
    let e = normalize_email(email);
    if e.is_empty() {
        return false;
    }
    match list {
        SuppressionReason::SoftBounceRepeated => soft.push(e),
        r => sets.get_mut(&r).expect("all reasons").push(e),
    }
    true
}

fn scan_event_file(
    path: &Path,
    since_us: i64,
    sets: &mut BTreeMap<SuppressionReason, Vec<String>>,
    soft: &mut Vec<String>,
) -> Result<u64> {
    let mut rows = 0;
    read_columns(
        path,
        &["email", "event_type", "bounce_type"],
        "ts",
        |c, ts| {
            let (emails, types, bounces) = (c[0], c[1], c[2]);
            let ts = ts.expect("asked for ts");
            for i in 0..emails.len() {
                if emails.is_null(i) || types.is_null(i) {
                    continue;
                }
                if let Some(list) =
                    event_list(types.value(i), opt(bounces, i), opt_ts(ts, i), since_us)
                {
                    rows += u64::from(add(emails.value(i), list, sets, soft));
                }
            }
            Ok(())
        },
    )?;
    Ok(rows)
}

/// Hard bounces of a historical import go on the hard-bounce list; soft ones inside the
/// window count toward the soft-bounce policy ([`historical_list`]).
fn scan_historical_file(
    path: &Path,
    since_us: i64,
    sets: &mut BTreeMap<SuppressionReason, Vec<String>>,
    soft: &mut Vec<String>,
) -> Result<u64> {
    let mut rows = 0;
    read_columns(path, &["email", "bounce_type"], "bounced_at", |c, ts| {
        let (emails, types) = (c[0], c[1]);
        let ts = ts.expect("asked for bounced_at");
        for i in 0..emails.len() {
            if emails.is_null(i) {
                continue;
            }
            if let Some(list) = historical_list(opt(types, i), opt_ts(ts, i), since_us) {
                rows += u64::from(add(emails.value(i), list, sets, soft));
            }
        }
        Ok(())
    })?;
    Ok(rows)
}

/// What put `email` on the snapshot's `reason` list: one line per event or imported bounce
/// among the files the snapshot read (bounce CSVs given to the build are not searched), in the
/// order the build read them. Empty when nothing did (the address is not on that list).
pub fn evidence(
    store: &Path,
    snapshot: &SuppressionSnapshot,
    email: &str,
    reason: SuppressionReason,
) -> Result<Vec<String>> {
    let key = normalize_email(email);
    let created = chrono::DateTime::parse_from_rfc3339(&snapshot.created_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| Error::state(store, format!("snapshot created_at: {e}")))?;
    let since_us = snapshot.soft_bounces.since_us(created);
    let when = |ts: Option<&TimestampMicrosecondArray>, i: usize| {
        ts.and_then(|t| opt_ts(t, i))
            .and_then(chrono::DateTime::from_timestamp_micros)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "an unknown time".into())
    };
    let mut out = Vec::new();
    for src in &snapshot.sources {
        let path = store.join(&src.path);
        if src.path.starts_with("events") {
            read_columns(
                &path,
                &["event_id", "email", "event_type", "bounce_type"],
                "ts",
                |c, ts| {
                    let t = ts.expect("asked for ts");
                    for i in 0..c[0].len() {
                        if c[1].is_null(i)
                            || c[2].is_null(i)
                            || normalize_email(c[1].value(i)) != key
                        {
                            continue;
                        }
                        let bounce = opt(c[3], i);
                        if event_list(c[2].value(i), bounce, opt_ts(t, i), since_us) == Some(reason)
                        {
                            let kind = bounce.map(|b| format!(" ({b})")).unwrap_or_default();
                            out.push(format!(
                                "event {}: {}{kind} at {}, in {}",
                                c[0].value(i),
                                c[2].value(i),
                                when(ts, i),
                                src.path.display()
                            ));
                        }
                    }
                    Ok(())
                },
            )?;
        } else if src.path.starts_with(BLOCKLIST_DIR) {
            if reason == SuppressionReason::Blocklist {
                scan_blocklist_csv(&path, &mut Vec::new(), |e, line| {
                    if e == key {
                        out.push(format!(
                            "on the organisation blocklist: {} line {line}",
                            src.path.display()
                        ));
                    }
                })?;
            }
        } else if src.path.starts_with(HISTORICAL_DIR) {
            read_columns(
                &path,
                &["email", "bounce_type", "source"],
                "bounced_at",
                |c, ts| {
                    let t = ts.expect("asked for bounced_at");
                    for i in 0..c[0].len() {
                        if c[0].is_null(i) || normalize_email(c[0].value(i)) != key {
                            continue;
                        }
                        let list = historical_list(opt(c[1], i), opt_ts(t, i), since_us);
                        if list == Some(reason) {
                            let kind = match list {
                                Some(SuppressionReason::SoftBounceRepeated) => "soft",
                                _ => "hard",
                            };
                            out.push(format!(
                                "imported {kind} bounce at {} (export {}), in {}",
                                when(ts, i),
                                opt(c[2], i).unwrap_or("?"),
                                src.path.display()
                            ));
                        }
                    }
                    Ok(())
                },
            )?;
        }
    }
    Ok(out)
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

    /// The email field of row `line`, or an error naming the row when it is too short.
    pub(crate) fn email_field<'f>(&self, line: u64, fields: &'f [String]) -> Result<&'f str> {
        fields.get(self.email).map(String::as_str).ok_or_else(|| {
            self.error(
                line,
                format!(
                    "row has {} fields, the email column is #{}",
                    fields.len(),
                    self.email + 1
                ),
            )
        })
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
    let kind = csv.column(&["bounce_type", "type"]);
    let mut rows = 0;
    while let Some((n, fields)) = csv.next_row()? {
        let e = csv.email_field(n, &fields)?;
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

    #[test]
    fn the_blocklist_is_in_every_snapshot_of_its_workspace_only_and_evidence_names_its_line() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        let csv = d.path().join("legal.csv");
        std::fs::write(&csv, "id,email\n1, Ann@X.io \n2,\n3,bob@x.io\n").unwrap();
        assert_eq!(import_blocklist(&store, "ws1", "legal", &csv).unwrap(), 2);
        // a bad file is refused whole, naming its row, and the list stays as it was
        std::fs::write(&csv, "id,email\n1,carl@x.io\n2\n").unwrap();
        let err = import_blocklist(&store, "ws1", "legal", &csv)
            .unwrap_err()
            .to_string();
        assert!(err.contains("legal.csv:3"), "{err}");
        assert!(import_blocklist(&store, "ws1", "../x", &csv).is_err());
        let build = |ws: &str, out: &str| {
            build_suppression(&SuppressionBuildConfig {
                store: store.clone(),
                workspace_id: ws.into(),
                out_dir: d.path().join(out),
                bounce_csvs: Vec::new(),
                soft_bounces: SoftBouncePolicy::default(),
            })
            .unwrap()
        };
        let snap = build("ws1", "s1");
        assert_eq!(snap.lists[&SuppressionReason::Blocklist].count, 2);
        let listed = std::fs::read_to_string(d.path().join("s1/blocklist.csv")).unwrap();
        assert_eq!(listed, "email\nann@x.io\nbob@x.io\n");
        assert_eq!(
            evidence(&store, &snap, "ANN@x.io", SuppressionReason::Blocklist).unwrap(),
            ["on the organisation blocklist: blocklist/workspace_id=ws1/legal.csv line 2"]
        );
        assert!(
            evidence(&store, &snap, "ann@x.io", SuppressionReason::HardBounce)
                .unwrap()
                .is_empty()
        );
        // another workspace's snapshot does not read it
        assert_eq!(
            build("ws2", "s2").lists[&SuppressionReason::Blocklist].count,
            0
        );
        assert!(remove_blocklist(&store, "ws1", "legal").unwrap());
        assert!(!remove_blocklist(&store, "ws1", "legal").unwrap());
        assert_eq!(
            build("ws1", "s3").lists[&SuppressionReason::Blocklist].count,
            0
        );
    }
}
