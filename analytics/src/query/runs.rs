//! `campaign_runs`: the run records `broadside send` writes (one JSON file per run), as a table.
//!
//! Run records are few (one per send) and small, so they are read into memory per session.
//! The table flattens the counts analysts filter on and keeps the whole record in `record`
//! (JSON text) for the API's detail view.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use broadside_pipeline::run::RunRecord;
use datafusion::datasource::MemTable;

use crate::query::catalog::{schema_of, ts_type};
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
