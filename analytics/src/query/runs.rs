//! `campaign_runs`: the run records `broadside send` writes (one JSON file per run), as a table.
//!
//! Run records are few (one per send) and small, so they are read into memory per session.
//! The table flattens the counts analysts filter on and keeps the whole record in `record`
//! (JSON text) for the API's detail view. The API's list ([`list_runs`]) reads the records one
//! at a time and keeps only the page it answers with.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use broadside_pipeline::run::RunRecord;
use datafusion::datasource::MemTable;

use chrono::{DateTime, Utc};

use crate::query::catalog::{schema_of, ts_type};
use crate::query::lists::{decode_time_cursor, encode_time_cursor, Page, MAX_PAGE};
use crate::query::{dir_entries, QueryError, QueryResult};

/// Schema of the `campaign_runs` table.
pub fn runs_schema(with_workspace: bool) -> SchemaRef {
    let mut f = vec![
        ("run_id", DataType::Utf8, false),
        ("campaign_id", DataType::Utf8, false),
        ("status", DataType::Utf8, false),
        ("attempts", DataType::UInt32, false),
        ("started_at", ts_type(), false),
        ("finished_at", ts_type(), true),
        ("rows", DataType::UInt64, false),
        ("sent", DataType::UInt64, false),
        ("suppressed", DataType::UInt64, false),
        ("skipped", DataType::UInt64, false),
        ("holdout", DataType::UInt64, false),
        ("errored", DataType::UInt64, false),
        ("elapsed_secs", DataType::Float64, false),
        ("error", DataType::Utf8, true),
        ("record", DataType::Utf8, false),
    ];
    if with_workspace {
        f.insert(0, ("workspace_id", DataType::Utf8, false));
    }
    schema_of(&f)
}

/// Every run record of a workspace (or of all, `ws = None`), oldest first.
pub fn load_runs(store: &Path, ws: Option<&str>) -> QueryResult<Vec<RunRecord>> {
    let root = store.join("campaign_runs");
    let dirs: Vec<std::path::PathBuf> = match ws {
        Some(w) => vec![root.join(format!("workspace_id={w}"))],
        None => dir_entries(&root)?
            .iter()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
    };
    let mut runs = Vec::new();
    for dir in dirs {
        for entry in dir_entries(&dir)? {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "json") {
                let r = RunRecord::load(&path).map_err(|e| QueryError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                runs.push(r);
            }
        }
    }
    runs.sort_by(|a, b| (a.started_at, &a.run_id).cmp(&(b.started_at, &b.run_id)));
    Ok(runs)
}

/// Filters of the run list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Campaign.
    pub campaign_id: Option<String>,
    /// Status (`running`, `done`, `failed`).
    pub status: Option<String>,
}

/// A run in the list's order: newest start first, then run id (descending).
struct Listed {
    key: (DateTime<Utc>, String),
    record: RunRecord,
}

impl PartialEq for Listed {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Listed {}
impl PartialOrd for Listed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Listed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

/// One page of a workspace's runs, newest first, keyset-paginated like the other lists
/// (`next_cursor` names the last run's start and id). Records are read one at a time and at
/// most `limit + 1` are held.
pub fn list_runs(
    store: &Path,
    ws: &str,
    filter: &RunFilter,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(QueryError::BadRequest(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let before = cursor.map(decode_cursor).transpose()?;
    let dir = store
        .join("campaign_runs")
        .join(format!("workspace_id={ws}"));
    // The `limit + 1` newest matching runs: a min-heap whose top is the oldest kept.
    let mut kept: BinaryHeap<Reverse<Listed>> = BinaryHeap::with_capacity(limit + 2);
    for entry in dir_entries(&dir)? {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let r = RunRecord::load(&path).map_err(|e| QueryError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if filter
            .campaign_id
            .as_ref()
            .is_some_and(|c| *c != r.campaign_id)
        {
            continue;
        }
        if let Some(st) = &filter.status {
            if serde_json::to_value(r.status)?.as_str() != Some(st.as_str()) {
                continue;
            }
        }
        let key = (r.started_at, r.run_id.clone());
        if before.as_ref().is_some_and(|b| key >= *b) {
            continue;
        }
        kept.push(Reverse(Listed { key, record: r }));
        if kept.len() > limit + 1 {
            kept.pop();
        }
    }
    let mut runs: Vec<Listed> = kept.into_iter().map(|Reverse(l)| l).collect();
    runs.sort_by(|a, b| b.cmp(a));
    let next_cursor = if runs.len() > limit {
        runs.truncate(limit);
        runs.last().map(|l| encode_cursor(&l.key)).transpose()?
    } else {
        None
    };
    let items = runs
        .into_iter()
        .map(|l| serde_json::to_value(l.record))
        .collect::<Result<_, _>>()?;
    Ok(Page { items, next_cursor })
}

/// `MICROS.HEX(run id)`, the event lists' cursor shape.
fn encode_cursor((at, id): &(DateTime<Utc>, String)) -> QueryResult<String> {
    Ok(encode_time_cursor(at.timestamp_micros(), id))
}

fn decode_cursor(cursor: &str) -> QueryResult<(DateTime<Utc>, String)> {
    let bad = || QueryError::BadRequest(format!("invalid cursor {cursor:?}"));
    let (us, id) = decode_time_cursor(cursor).ok_or_else(bad)?;
    Ok((DateTime::from_timestamp_micros(us).ok_or_else(bad)?, id))
}

/// The `campaign_runs` table of a scope.
pub fn campaign_runs_table(store: &Path, ws: Option<&str>) -> QueryResult<MemTable> {
    let runs = load_runs(store, ws)?;
    let schema = runs_schema(ws.is_none());
    let n = runs.len();
    let mut wsb = StringBuilder::with_capacity(n, n * 8);
    let mut run_id = StringBuilder::with_capacity(n, n * 16);
    let mut campaign = StringBuilder::with_capacity(n, n * 16);
    let mut status = StringBuilder::with_capacity(n, n * 8);
    let mut attempts = UInt32Builder::with_capacity(n);
    let mut started = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut finished = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut counts: Vec<UInt64Builder> = (0..6).map(|_| UInt64Builder::with_capacity(n)).collect();
    let mut elapsed = Float64Builder::with_capacity(n);
    let mut error = StringBuilder::new();
    let mut record = StringBuilder::new();
    for r in &runs {
        wsb.append_value(&r.workspace_id);
        run_id.append_value(&r.run_id);
        campaign.append_value(&r.campaign_id);
        status.append_value(
            serde_json::to_value(r.status)?
                .as_str()
                .unwrap_or("unknown"),
        );
        attempts.append_value(r.attempts);
        started.append_value(r.started_at.timestamp_micros());
        finished.append_option(r.finished_at.map(|t| t.timestamp_micros()));
        counts[0].append_value(r.rows);
        for (i, d) in ["sent", "suppressed", "skipped", "holdout", "errored"]
            .iter()
            .enumerate()
        {
            counts[i + 1].append_value(r.decisions.get(*d).copied().unwrap_or(0));
        }
        elapsed.append_value(r.elapsed_secs);
        error.append_option(r.error.as_deref());
        record.append_value(serde_json::to_string(r)?);
    }
    let mut cols: Vec<ArrayRef> = Vec::new();
    if ws.is_none() {
        cols.push(Arc::new(wsb.finish()));
    }
    cols.push(Arc::new(run_id.finish()));
    cols.push(Arc::new(campaign.finish()));
    cols.push(Arc::new(status.finish()));
    cols.push(Arc::new(attempts.finish()));
    cols.push(Arc::new(started.finish()));
    cols.push(Arc::new(finished.finish()));
    for mut c in counts {
        cols.push(Arc::new(c.finish()));
    }
    cols.push(Arc::new(elapsed.finish()));
    cols.push(Arc::new(error.finish()));
    cols.push(Arc::new(record.finish()));
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

impl From<serde_json::Error> for QueryError {
    fn from(e: serde_json::Error) -> Self {
        QueryError::BadRequest(format!("JSON: {e}"))
    }
}
