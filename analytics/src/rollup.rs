//! Pre-aggregated event counts, kept beside the events and used when they are current.
//!
//! For each event partition `events/workspace_id=W/date=D/` the rollup holds
//!
//! - `rollups/hourly/workspace_id=W/date=D/hourly.parquet`: event counts per (campaign, variant,
//!   event type, bounce type, UTC hour);
//! - `rollups/uniques/workspace_id=W/date=D/uniques.parquet`: the distinct
//!   (campaign, variant, event type, `email_hash`) of opens and clicks that day;
//! - `rollups/hourly/workspace_id=W/date=D/_source.json`: the fingerprint (names and sizes) of
//!   the event files the rollup was computed from.
//!
//! Event files are immutable once committed (new data arrives as new files), so a rollup is
//! *current* exactly when the partition's file listing still has its fingerprint. Queries use
//! the rollup of current partitions and scan raw events for the others, in one plan, so answers
//! are always identical to a raw computation. Unique counts are exact up to 64-bit hash
//! collisions (expected collisions among n distinct addresses: n²/2⁶⁵, 3·10⁻⁶ at 10 million).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use broadside_pipeline::store::{commit_file, create_dir_all, temp_name, write_atomic};
use chrono::NaiveDate;
use datafusion::functions::expr_fn::date_trunc;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{cast, col, lit, Expr};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::query::catalog::{schema_of, ts_type, ROLLUP_HOURLY, ROLLUP_UNIQUES};
use crate::query::{
    collect, dir_entries, partition_values, Catalog, QueryError, QueryResult, Scope,
};

/// Rows per row group of the rollup files.
const ROLLUP_ROW_GROUP_ROWS: usize = 8 * 1024;

/// Event types whose distinct recipients the rollup keeps.
pub const UNIQUE_TYPES: [&str; 2] = ["opened", "clicked"];

/// Schema of `rollup_hourly`.
pub fn hourly_schema() -> SchemaRef {
    schema_of(&[
        ("campaign_id", DataType::Utf8, false),
        ("variant", DataType::Utf8, true),
        ("event_type", DataType::Utf8, false),
        ("bounce_type", DataType::Utf8, true),
        ("hour", ts_type(), false),
        ("n", DataType::Int64, false),
    ])
}

/// Schema of `rollup_uniques`.
pub fn uniques_schema() -> SchemaRef {
    schema_of(&[
        ("campaign_id", DataType::Utf8, false),
        ("variant", DataType::Utf8, true),
        ("event_type", DataType::Utf8, false),
        ("email_hash", DataType::UInt64, false),
    ])
}

/// The sidecar recording what a rollup was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    fingerprint: String,
    files: usize,
    rows_hourly: usize,
    rows_uniques: usize,
}

/// The dates (`YYYY-MM-DD`) that have an event partition in a workspace, sorted.
pub fn event_dates(store: &Path, ws: &str) -> QueryResult<Vec<String>> {
    let dir = store.join("events").join(format!("workspace_id={ws}"));
    partition_values(&dir, "date", |d| {
        NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok()
    })
}

/// Fingerprint of the committed event files of one partition (names and sizes).
fn fingerprint(store: &Path, ws: &str, date: &str) -> QueryResult<(String, usize)> {
    let dir = partition(store, "events", ws, date);
    let mut files: Vec<(String, u64)> = Vec::new();
    for e in dir_entries(&dir)? {
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

fn partition(store: &Path, table: &str, ws: &str, date: &str) -> PathBuf {
    store
        .join(table)
        .join(format!("workspace_id={ws}"))
        .join(format!("date={date}"))
}

fn source_path(store: &Path, ws: &str, date: &str) -> PathBuf {
    partition(store, ROLLUP_HOURLY, ws, date).join("_source.json")
}

/// Whether the rollup of a partition matches its current event files.
pub fn is_current(store: &Path, ws: &str, date: &str) -> QueryResult<bool> {
    let path = source_path(store, ws, date);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(QueryError::io(&path, e)),
    };
    let Ok(src) = serde_json::from_str::<Source>(&text) else {
        return Ok(false);
    };
    Ok(src.fingerprint == fingerprint(store, ws, date)?.0)
}

/// Which event partitions of a date range are answered from rollups and which from raw events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatePlan {
    /// Partitions whose rollup is current.
    pub rolled: Vec<String>,
    /// Partitions scanned raw.
    pub raw: Vec<String>,
}

impl DatePlan {
    /// Splits the workspace's partitions in `[from, to)` (whole days; `None` is open).
    /// With `use_rollups` false every partition is raw.
    pub fn new(
        store: &Path,
        ws: &str,
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
        use_rollups: bool,
    ) -> QueryResult<DatePlan> {
        let mut plan = DatePlan::default();
        for d in event_dates(store, ws)? {
            let day = NaiveDate::parse_from_str(&d, "%Y-%m-%d").expect("listed dates parse");
            if from.is_some_and(|f| day < f) || to.is_some_and(|t| day >= t) {
                continue;
            }
            if use_rollups && is_current(store, ws, &d)? {
                plan.rolled.push(d);
            } else {
                plan.raw.push(d);
            }
        }
        Ok(plan)
    }
}

/// `date IN (…)` over partition values (an always-false filter for an empty list).
pub fn dates_filter(dates: &[String]) -> Expr {
    if dates.is_empty() {
        lit(false)
    } else {
        col("date").in_list(dates.iter().map(|d| lit(d.as_str())).collect(), false)
    }
}

/// What a refresh did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefreshReport {
    /// Partitions whose rollup was (re)built.
    pub built: usize,
    /// Partitions already current.
    pub current: usize,
    /// Partitions that changed while being rolled up (left for the next refresh).
    pub raced: usize,
}

/// Brings the rollups of one workspace (or of every workspace) up to date.
pub async fn refresh(catalog: &Catalog, ws: Option<&str>) -> QueryResult<RefreshReport> {
    let store = catalog.store();
    let workspaces: Vec<String> = match ws {
        Some(w) => vec![w.to_string()],
        None => list_workspaces(store)?,
    };
    let mut report = RefreshReport::default();
    for w in workspaces {
        let scope = Scope::workspace(&w)?;
        for d in event_dates(store, &w)? {
            if is_current(store, &w, &d)? {
                report.current += 1;
                continue;
            }
            if build_partition(catalog, &scope, &w, &d).await? {
                report.built += 1;
            } else {
                report.raced += 1;
            }
        }
    }
    Ok(report)
}

/// Workspaces that have events.
pub fn list_workspaces(store: &Path) -> QueryResult<Vec<String>> {
    partition_values(
        &store.join("events"),
        "workspace_id",
        crate::decode::valid_workspace_id,
    )
}

/// Rolls up one partition. Returns false (writing nothing) when files arrived meanwhile.
async fn build_partition(
    catalog: &Catalog,
    scope: &Scope,
    ws: &str,
    date: &str,
) -> QueryResult<bool> {
    let store = catalog.store();
    let (fp, files) = fingerprint(store, ws, date)?;
    let ctx = catalog.session(scope)?;
    let events = ctx
        .table("events")
        .await?
        .filter(col("date").eq(lit(date)))?;
    let hourly = events
        .clone()
        .aggregate(
            vec![
                col("campaign_id"),
                col("variant"),
                col("event_type"),
                col("bounce_type"),
                date_trunc(lit("hour"), col("ts")).alias("hour"),
            ],
            vec![count(lit(1)).alias("n")],
        )?
        .select(vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            col("bounce_type"),
            cast(col("hour"), ts_type()).alias("hour"),
            col("n"),
        ])?
        .sort(vec![
            col("campaign_id").sort(true, true),
            col("hour").sort(true, true),
        ])?;
    let uniques = events
        .filter(col("event_type").in_list(UNIQUE_TYPES.iter().map(|t| lit(*t)).collect(), false))?
        .select(vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            crate::query::catalog::email_hash_expr(col("email")).alias("email_hash"),
        ])?
        .distinct()?
        .sort(vec![
            col("campaign_id").sort(true, true),
            col("email_hash").sort(true, true),
        ])?;
    let limits = catalog.limits();
    let hourly = collect(&limits, hourly).await?;
    let uniques = collect(&limits, uniques).await?;
    if fingerprint(store, ws, date)?.0 != fp {
        return Ok(false);
    }
    let rows_hourly = write_parquet(
        &partition(store, ROLLUP_HOURLY, ws, date).join("hourly.parquet"),
        hourly_schema(),
        &hourly,
    )?;
    let rows_uniques = write_parquet(
        &partition(store, ROLLUP_UNIQUES, ws, date).join("uniques.parquet"),
        uniques_schema(),
        &uniques,
    )?;
    let src = Source {
        fingerprint: fp,
        files,
        rows_hourly,
        rows_uniques,
    };
    let path = source_path(store, ws, date);
    write_atomic(&path, serde_json::to_string(&src)?.as_bytes())
        .map_err(|e| QueryError::io(&path, std::io::Error::other(e.to_string())))?;
    Ok(true)
}

/// Writes batches (cast to `schema`) to `path` atomically: temp file, fsync, rename.
fn write_parquet(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> QueryResult<usize> {
    let dir = path.parent().expect("partition folder");
    create_dir_all(dir).map_err(|e| QueryError::io(dir, std::io::Error::other(e.to_string())))?;
    let tmp = temp_name(path);
    let file = File::create(&tmp).map_err(|e| QueryError::io(&tmp, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        // Rows are sorted by campaign; small row groups let a one-campaign query skip all
        // but the one or two groups holding that campaign (min/max statistics per group).
        .set_max_row_group_row_count(Some(ROLLUP_ROW_GROUP_ROWS))
        .build();
    let corrupt = |e: parquet::errors::ParquetError| QueryError::Corrupt {
        path: tmp.clone(),
        message: e.to_string(),
    };
    let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(corrupt)?;
    let mut rows = 0;
    for b in batches {
        let cols = b
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| arrow_cast::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)
            .map_err(corrupt)?;
        rows += b.num_rows();
    }
    let file = w.into_inner().map_err(corrupt)?;
    file.sync_all().map_err(|e| QueryError::io(&tmp, e))?;
    drop(file);
    commit_file(&tmp, path)
        .map_err(|e| QueryError::io(path, std::io::Error::other(e.to_string())))?;
    Ok(rows)
}

/// Keeps the rollups current in the background: one refresh every `every`.
pub fn spawn_refresher(catalog: Arc<Catalog>, every: std::time::Duration) {
    tokio::spawn(async move {
        loop {
            match refresh(&catalog, None).await {
                Ok(r) if r.built > 0 => tracing::info!(
                    built = r.built,
                    current = r.current,
                    raced = r.raced,
                    "rollups refreshed"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rollup refresh failed"),
            }
            tokio::time::sleep(every).await;
        }
    });
}
