//! Historical bounces: bounce records from the email system's full history, imported from its
//! CSV exports into `historical_bounces/workspace_id=W/import-<id>.parquet`.
//!
//! An import reads every CSV of a source folder (the email system's export folder, or the files
//! given), keeps the rows at or after `since` (or all, for a full backfill) and commits them as
//! one Parquet file named after the import's inputs, so running the same import twice adds
//! nothing. A full backfill then removes the files of earlier imports. Rows are validated as a
//! whole before anything is committed: a bad row names its file and line and the store is left
//! as it was.
//!
//! CSV columns (header names, case-insensitive; extra columns ignored): `email` (required),
//! `bounce_type` or `type` (`hard` | `soft`, default `hard`), `account_number` (optional),
//! `bounced_at`, `date` or `timestamp` (RFC 3339, `YYYY-MM-DD HH:MM:SS` UTC or `YYYY-MM-DD`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use broadside_pipeline::store::{commit_file, create_dir_all, temp_name};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use crate::error::{Error, Result};
pub use crate::query::catalog::historical_schema;
use crate::suppression::{normalize_email, BounceCsv};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// Workspace the bounces belong to.
    pub workspace_id: String,
    /// CSV files to read.
    pub files: Vec<PathBuf>,
    /// Keep rows bounced at or after this instant (rows without a date are kept).
    pub since: Option<DateTime<Utc>>,
    /// Replace every earlier import of the workspace.
    pub full_backfill: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// Files read.
    pub files: usize,
    /// Rows read.
    pub rows_read: u64,
    /// Rows kept (after `since`).
    pub rows_imported: u64,
    /// Committed file (relative to the store), if rows were kept.
    pub file: Option<String>,
    /// True when the same import had already been committed.
    pub already_imported: bool,
    /// Earlier import files a full backfill removed.
    pub replaced: usize,
}

/// A workspace's own folder of bounce exports under a root shared by workspaces:
/// `<root>/workspace_id=<workspace>/` (`workspace` must be a valid workspace id).
pub fn workspace_source(root: &Path, workspace: &str) -> PathBuf {
    root.join(format!("workspace_id={workspace}"))
}

/// The CSV files of a source folder, sorted (or the path itself when it is a file).
pub fn source_files(source: &Path) -> Result<Vec<PathBuf>> {
    if source.is_file() {
        return Ok(vec![source.to_path_buf()]);
    }
    let rd = std::fs::read_dir(source).map_err(|e| Error::io(source, e))?;
    let mut out = Vec::new();
    for e in rd {
        let p = e.map_err(|e| Error::io(source, e))?.path();
        if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

struct Row {
    email: String,
    hard: bool,
    account: Option<String>,
    at: Option<i64>,
    source: String,
}

/// Runs an import (blocking: call it off the async runtime).
pub fn import(store: &Path, req: &ImportRequest) -> Result<ImportReport> {
    if !crate::decode::valid_workspace_id(&req.workspace_id) {
        return Err(Error::Config {
            what: "historical bounce import",
            problems: vec![format!("invalid workspace id {:?}", req.workspace_id)],
        });
    }
    let mut report = ImportReport {
        files: req.files.len(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut id = xxhash_rust::xxh3::Xxh3::new();
    for f in &req.files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        id.update(f.to_string_lossy().as_bytes());
        id.update(&meta.len().to_le_bytes());
        if let Ok(m) = meta.modified() {
            id.update(format!("{m:?}").as_bytes());
        }
        report.rows_read += read_csv(f, &mut rows)?;
    }
    id.update(format!("{:?}", req.since.map(|t| t.timestamp_micros())).as_bytes());
    id.update(&[req.full_backfill as u8]);
    if let Some(since) = req.since {
        let s = since.timestamp_micros();
        rows.retain(|r| r.at.is_none_or(|t| t >= s));
    }
    report.rows_imported = rows.len() as u64;

    let dir = store
        .join("historical_bounces")
        .join(format!("workspace_id={}", req.workspace_id));
    let name = format!("import-{:032x}.parquet", id.digest128());
    let path = dir.join(&name);
    if path.exists() {
        report.already_imported = true;
    } else if !rows.is_empty() {
        write(&path, &rows)?;
    }
    if path.exists() {
        report.file = Some(format!(
            "historical_bounces/workspace_id={}/{name}",
            req.workspace_id
        ));
    }
    if req.full_backfill {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("import-") && n.ends_with(".parquet") && n != name {
                    std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
                    report.replaced += 1;
                }
            }
        }
    }
    Ok(report)
}

fn read_csv(path: &Path, out: &mut Vec<Row>) -> Result<u64> {
    let mut csv = BounceCsv::open(path)?;
    let input = |line: u64, message: String| Error::Input {
        path: path.to_path_buf(),
        line,
        message,
    };
    let find = |names: &[&str]| csv.column(names);
    let email = csv.email;
    let kind = find(&["bounce_type", "type"]);
    let account = find(&["account_number", "account"]);
    let at = find(&["bounced_at", "date", "timestamp"]);
    let source = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut n_rows = 0;
    while let Some((n, fields)) = csv.next_row()? {
        let get = |c: Option<usize>| c.and_then(|c| fields.get(c)).map(|s| s.trim());
        let e = normalize_email(get(Some(email)).ok_or_else(|| {
            input(
                n,
                format!("row has {} fields, `email` is #{}", fields.len(), email + 1),
            )
        })?);
        if e.is_empty() || !e.contains('@') {
            return Err(input(n, format!("email {e:?} is not an address")));
        }
        let hard = match get(kind).map(|s| s.to_ascii_lowercase()) {
            None => true,
            Some(k) if k.is_empty() || k == "hard" => true,
            Some(k) if k == "soft" => false,
            Some(k) => {
                return Err(input(
                    n,
                    format!("bounce_type {k:?}: expected hard or soft"),
                ))
            }
        };
        let at = match get(at).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                parse_time(s)
                    .ok_or_else(|| input(n, format!("bounced_at {s:?}: not a date or time")))?
                    .timestamp_micros(),
            ),
        };
        out.push(Row {
            email: e,
            hard,
            account: get(account).filter(|s| !s.is_empty()).map(str::to_string),
            at,
            source: source.clone(),
        });
        n_rows += 1;
    }
    Ok(n_rows)
}

/// RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC) or `YYYY-MM-DD` (UTC midnight).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Some(t.and_utc());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
}

fn write(path: &Path, rows: &[Row]) -> Result<()> {
    let dir = path.parent().expect("workspace folder");
    create_dir_all(dir)?;
    let schema = historical_schema();
    let mut email = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut account = StringBuilder::new();
    let mut at = TimestampMicrosecondBuilder::with_capacity(rows.len()).with_timezone("UTC");
    let mut source = StringBuilder::new();
    for r in rows {
        email.append_value(&r.email);
        kind.append_value(if r.hard { "hard" } else { "soft" });
        account.append_option(r.account.as_deref());
        at.append_option(r.at);
        source.append_value(&r.source);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(email.finish()),
        Arc::new(kind.finish()),
        Arc::new(account.finish()),
        Arc::new(at.finish()),
        Arc::new(source.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    let tmp = temp_name(path);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .build();
    let mut w =
        ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Error::parquet(&tmp, e))?;
    w.write(&batch).map_err(|e| Error::parquet(&tmp, e))?;
    let file = w.into_inner().map_err(|e| Error::parquet(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    commit_file(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_is_idempotent_and_names_bad_rows() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("bounces.csv");
        std::fs::write(
            &csv,
            "Email,Type,Account_Number,Date\nAnn@X.co,hard,A1,2026-01-02\nbob@x.co,soft,,2026-03-01 10:00:00\n",
        )
        .unwrap();
        let req = ImportRequest {
            workspace_id: "acme".into(),
            files: vec![csv.clone()],
            since: None,
            full_backfill: false,
        };
        let r = import(d.path(), &req).unwrap();
        assert_eq!(
            (r.rows_read, r.rows_imported, r.already_imported),
            (2, 2, false)
        );
        let again = import(d.path(), &req).unwrap();
        assert!(again.already_imported);
        assert_eq!(again.file, r.file);

        let since = ImportRequest {
            since: parse_time("2026-02-01"),
            ..req.clone()
        };
        assert_eq!(import(d.path(), &since).unwrap().rows_imported, 1);

        let full = ImportRequest {
            full_backfill: true,
            ..req
        };
        assert_eq!(import(d.path(), &full).unwrap().replaced, 2);

        std::fs::write(&csv, "email,type\nann@x.co,permanent\n").unwrap();
        let err = import(
            d.path(),
            &ImportRequest {
                workspace_id: "acme".into(),
                files: vec![csv],
                since: None,
                full_backfill: false,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bounces.csv:2") && err.contains("permanent"),
            "{err}"
        );
    }
}
