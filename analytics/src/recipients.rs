//! One recipient's history — their events and their ledger rows in every campaign and run of a
//! workspace — without scanning the store.
//!
//! The recipient index keeps, beside the rollups, a copy of each event partition and of each
//! run's recipient log sorted by the recipient's hash:
//!
//! - `rollups/recipient_events/workspace_id=W/date=D/events.parquet`: the day's events with
//!   `email_hash` in front, sorted by (`email_hash`, `ts`, `event_id`);
//! - `rollups/recipient_ledger/workspace_id=W/campaign_id=C/run_id=R/ledger.parquet`: the run's
//!   ledger rows that have a key, with `key_hash` (`email_hash` of the key) in front, sorted by
//!   (`key_hash`, `row`);
//! - `_source.json` beside each: the fingerprint (names and sizes) of the event files or log
//!   parts it was built from.
//!
//! The files have data pages of [`INDEX_PAGE_ROWS`] rows and min/max statistics per page on
//! the hash only (the Parquet page index), so a lookup reads one page of each column in each
//! file, whatever the size of the day or run. A lookup reads the index of the partitions and
//! runs whose fingerprint still matches and scans the others raw, in one plan: answers are
//! always those of a full scan (the hash only finds candidates; rows are kept when their
//! normalised address or key is the one asked for, so hash collisions never mix people up).

use std::collections::BTreeMap;
use std::ops::Not;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMicrosecondType, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::logical_expr::{col, lit, Expr};
use datafusion::prelude::{DataFrame, SessionContext};
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::derived::{event_dates, files_fingerprint, partition, read_sidecar, RollupWriter};
use crate::query::catalog::{email_hash, email_hash_expr};
pub use crate::query::catalog::{
    events_index_schema, ledger_index_schema, ledger_month_schema, RECIPIENT_EVENTS,
    RECIPIENT_LEDGER, RECIPIENT_LEDGER_MONTHLY,
};
use crate::query::lists::{decode_time_cursor, encode_time_cursor, rows_to_json, Page};
use crate::query::runs::load_runs;
use crate::query::strings;
use crate::query::{collect, for_each_batch, partition_values, Catalog, QueryError, QueryResult};

/// Rows per data page of the index files: a lookup decodes one such page per column and file.
pub const INDEX_PAGE_ROWS: usize = 1024;
/// Columns with about one value per recipient or event, written without a dictionary.
const PLAIN_COLUMNS: [&str; 5] = ["event_id", "email", "url", "key", "detail"];
/// Rows per row group of the index files.
const INDEX_ROW_GROUP_ROWS: usize = 128 * 1024;

/// The sidecar recording what an index file was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    fingerprint: String,
    files: usize,
    rows: usize,
}

/// What an index refresh did.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct IndexReport {
    /// Event partitions whose index was (re)built.
    pub days_built: usize,
    /// Event partitions whose index was current.
    pub days_current: usize,
    /// Runs whose ledger index was (re)built.
    pub runs_built: usize,
    /// Runs whose ledger index was current.
    pub runs_current: usize,
    /// Closed months whose runs' ledger indexes were merged (again).
    pub months_built: usize,
    /// Closed months whose merged ledger index was current.
    pub months_current: usize,
    /// Partitions or runs that changed while being indexed (left for the next refresh).
    pub raced: usize,
    /// Seconds spent checking and building the index.
    pub secs: f64,
}

impl IndexReport {
    /// Adds another workspace's figures.
    pub fn add(&mut self, o: IndexReport) {
        self.days_built += o.days_built;
        self.days_current += o.days_current;
        self.runs_built += o.runs_built;
        self.runs_current += o.runs_current;
        self.months_built += o.months_built;
        self.months_current += o.months_current;
        self.raced += o.raced;
        self.secs += o.secs;
    }
}

/// A run's recipient log folder, named by campaign and run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RunDir {
    campaign_id: String,
    run_id: String,
}

impl RunDir {
    fn log_dir(&self, store: &Path, ws: &str) -> PathBuf {
        self.under(store, "recipient_logs", ws)
    }

    fn under(&self, store: &Path, table: &str, ws: &str) -> PathBuf {
        store
            .join(table)
            .join(format!("workspace_id={ws}"))
            .join(format!("campaign_id={}", self.campaign_id))
            .join(format!("run_id={}", self.run_id))
    }
}

/// Every run with a recipient log in the workspace.
fn run_dirs(store: &Path, ws: &str) -> QueryResult<Vec<RunDir>> {
    run_dirs_under(store, "recipient_logs", ws)
}

/// Every `campaign_id=C/run_id=R` folder of a table of the workspace.
fn run_dirs_under(store: &Path, table: &str, ws: &str) -> QueryResult<Vec<RunDir>> {
    let root = store.join(table).join(format!("workspace_id={ws}"));
    let mut out = Vec::new();
    for c in partition_values(&root, "campaign_id", |_| true)? {
        let dir = root.join(format!("campaign_id={c}"));
        for r in partition_values(&dir, "run_id", |_| true)? {
            out.push(RunDir {
                campaign_id: c.clone(),
                run_id: r,
            });
        }
    }
    Ok(out)
}

fn indexed_fingerprint(dir: &Path) -> QueryResult<Option<String>> {
    Ok(read_sidecar::<Source>(&dir.join("_source.json"))?.map(|s| s.fingerprint))
}

/// The sidecar of a month's merged ledger index: the log fingerprint of each run it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MonthSource {
    runs: BTreeMap<String, String>,
    rows: usize,
}

/// `campaign_id/run_id`, the key of a run in filters and month sidecars (partition values hold
/// no `/`).
fn run_key(campaign_id: &str, run_id: &str) -> String {
    format!("{campaign_id}/{run_id}")
}

fn run_key_expr() -> Expr {
    datafusion::functions::string::expr_fn::concat_ws(
        lit("/"),
        vec![col("campaign_id"), col("run_id")],
    )
}

/// Every run with a recipient log in the workspace, with its log's current fingerprint.
fn run_logs(store: &Path, ws: &str) -> QueryResult<Vec<(RunDir, String)>> {
    run_dirs(store, ws)?
        .into_iter()
        .map(|r| {
            let fp = files_fingerprint(&r.log_dir(store, ws))?.0;
            Ok((r, fp))
        })
        .collect()
}

/// When each run of the workspace with a run record started, by [`run_key`].
fn run_starts(store: &Path, ws: &str) -> QueryResult<BTreeMap<String, DateTime<Utc>>> {
    Ok(load_runs(store, Some(ws))?
        .into_iter()
        .map(|r| (run_key(&r.campaign_id, &r.run_id), r.started_at))
        .collect())
}

/// The runs with a log, by the UTC month they started in, each with its log's fingerprint
/// (runs without a record are in no month).
fn runs_by_month(
    runs: &[(RunDir, String)],
    starts: &BTreeMap<String, DateTime<Utc>>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (r, fp) in runs {
        let key = run_key(&r.campaign_id, &r.run_id);
        if let Some(at) = starts.get(&key) {
            let month = at.format("%Y-%m").to_string();
            out.entry(month).or_default().insert(key, fp.clone());
        }
    }
    out
}

/// Whether a run's own ledger index was built from its log as it is now (`fp`).
fn own_index_current(store: &Path, ws: &str, r: &RunDir, fp: &str) -> QueryResult<bool> {
    Ok(indexed_fingerprint(&r.under(store, RECIPIENT_LEDGER, ws))?.as_deref() == Some(fp))
}

fn month_dir(store: &Path, ws: &str, month: &str) -> PathBuf {
    store
        .join(RECIPIENT_LEDGER_MONTHLY)
        .join(format!("workspace_id={ws}"))
        .join(format!("month={month}"))
}

fn merged_runs(
    store: &Path,
    ws: &str,
    month: &str,
) -> QueryResult<Option<BTreeMap<String, String>>> {
    let path = month_dir(store, ws, month).join("_source.json");
    Ok(read_sidecar::<MonthSource>(&path)?.map(|m| m.runs))
}

/// Which event days and runs a lookup reads from the index, and which raw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexPlan {
    /// Event partitions whose index is current.
    pub days_indexed: Vec<String>,
    /// Event partitions scanned raw.
    pub days_raw: Vec<String>,
    /// Runs (campaign, run) whose ledger index is current.
    pub runs_indexed: Vec<(String, String)>,
    /// Runs whose recipient log is scanned raw.
    pub runs_raw: Vec<(String, String)>,
    /// Closed months whose merged ledger index is read (its runs are in no other list).
    pub ledger_months: Vec<String>,
    /// Indexed days whose index is not read: stale, or of a partition that is gone.
    pub days_unusable: Vec<String>,
    /// Runs with a ledger index that is not read: stale, or of a log that is gone.
    pub runs_unusable: Vec<(String, String)>,
    /// When each run with a run record started, by `campaign_id/run_id`: the time of its
    /// ledger rows in a history.
    pub run_starts: BTreeMap<String, DateTime<Utc>>,
}

impl IndexPlan {
    /// Compares every partition and run of the workspace with its index.
    pub fn new(store: &Path, ws: &str) -> QueryResult<IndexPlan> {
        let mut plan = IndexPlan::default();
        for d in event_dates(store, ws)? {
            let fp = files_fingerprint(&partition(store, "events", ws, &d))?.0;
            let idx = indexed_fingerprint(&partition(store, RECIPIENT_EVENTS, ws, &d))?;
            if idx.as_deref() == Some(fp.as_str()) {
                plan.days_indexed.push(d);
            } else {
                plan.days_raw.push(d);
            }
        }
        let runs = run_logs(store, ws)?;
        plan.run_starts = run_starts(store, ws)?;
        // A month's merged index stands in for its runs while it holds exactly the runs that
        // started that month, each with the log it was built from.
        let mut merged = std::collections::BTreeSet::new();
        for (month, now) in runs_by_month(&runs, &plan.run_starts) {
            if merged_runs(store, ws, &month)?.is_some_and(|m| m == now) {
                merged.extend(now.into_keys());
                plan.ledger_months.push(month);
            }
        }
        for (r, fp) in runs {
            if merged.contains(&run_key(&r.campaign_id, &r.run_id)) {
                continue;
            }
            let current = own_index_current(store, ws, &r, &fp)?;
            let pair = (r.campaign_id, r.run_id);
            if current {
                plan.runs_indexed.push(pair);
            } else {
                plan.runs_raw.push(pair);
            }
        }
        // The index files a lookup must leave out. A lookup reads the index tables whole but
        // for these (usually none), rather than naming every current day and run: a filter
        // naming hundreds of runs cost more to plan and apply per file than the lookup itself.
        let days: std::collections::BTreeSet<&String> = plan.days_indexed.iter().collect();
        let root = store
            .join(RECIPIENT_EVENTS)
            .join(format!("workspace_id={ws}"));
        plan.days_unusable = partition_values(&root, "date", |_| true)?
            .into_iter()
            .filter(|d| !days.contains(d))
            .collect();
        let runs: std::collections::BTreeSet<&(String, String)> =
            plan.runs_indexed.iter().collect();
        plan.runs_unusable = run_dirs_under(store, RECIPIENT_LEDGER, ws)?
            .into_iter()
            .map(|r| (r.campaign_id, r.run_id))
            .filter(|p| !runs.contains(p))
            .collect();
        Ok(plan)
    }
}

/// Brings the recipient index of one workspace up to date.
pub async fn refresh_index(catalog: &Catalog, ws: &str) -> QueryResult<IndexReport> {
    let started = std::time::Instant::now();
    let store = catalog.store();
    let mut report = IndexReport::default();
    for d in event_dates(store, ws)? {
        let source = partition(store, "events", ws, &d);
        let target = partition(store, RECIPIENT_EVENTS, ws, &d);
        let filter = col("date").eq(lit(d.as_str()));
        match index_folder(catalog, ws, &EVENTS, &source, &target, filter).await? {
            Outcome::Current => report.days_current += 1,
            Outcome::Built => report.days_built += 1,
            Outcome::Raced => report.raced += 1,
        }
    }
    let runs = run_logs(store, ws)?;
    for (r, _) in &runs {
        let source = r.log_dir(store, ws);
        let target = r.under(store, RECIPIENT_LEDGER, ws);
        let filter = col("campaign_id")
            .eq(lit(r.campaign_id.as_str()))
            .and(col("run_id").eq(lit(r.run_id.as_str())))
            .and(col("key").is_not_null());
        match index_folder(catalog, ws, &LEDGER, &source, &target, filter).await? {
            Outcome::Current => report.runs_current += 1,
            Outcome::Built => report.runs_built += 1,
            Outcome::Raced => report.raced += 1,
        }
    }
    // Closed months: their runs' indexes merged into one file, so a lookup opens one file a
    // month instead of one a run.
    let this_month = Utc::now().format("%Y-%m").to_string();
    for (month, now) in runs_by_month(&runs, &run_starts(store, ws)?) {
        if month >= this_month {
            continue;
        }
        if merged_runs(store, ws, &month)?.as_ref() == Some(&now) {
            report.months_current += 1;
            continue;
        }
        // Every run of the month must have its own index, current, to be merged.
        let mut ready = true;
        for (r, fp) in &runs {
            if now.contains_key(&run_key(&r.campaign_id, &r.run_id)) {
                ready &= own_index_current(store, ws, r, fp)?;
            }
        }
        if !ready {
            continue;
        }
        let ctx = catalog.session(&crate::query::Scope::workspace(ws)?)?;
        let mut select = vec![col("key_hash"), col("campaign_id"), col("run_id")];
        select.extend(ledger_columns().into_iter().map(col));
        let keys: Vec<String> = now.keys().cloned().collect();
        let df = ctx
            .table("recipient_ledger")
            .await?
            .filter(one_of_expr(run_key_expr(), &keys))?
            .select(select)?
            .sort(
                ["key_hash", "campaign_id", "run_id", "row"]
                    .map(|c| col(c).sort(true, true))
                    .to_vec(),
            )?;
        let path = month_dir(store, ws, &month).join("ledger.parquet");
        let unchanged = || {
            let months = runs_by_month(&run_logs(store, ws)?, &run_starts(store, ws)?);
            Ok(months.get(&month) == Some(&now))
        };
        let sidecar = |rows| {
            serde_json::json!(MonthSource {
                runs: now.clone(),
                rows,
            })
        };
        let schema = ledger_month_schema();
        if write_index(catalog, df, &path, schema, "key_hash", unchanged, sidecar).await? {
            report.months_built += 1;
        } else {
            report.raced += 1;
        }
    }
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One of the two indexes: which table it copies, hashed on which column, sorted how.
struct IndexKind {
    table: &'static str,
    /// The column hashed, and the hash column's name.
    hashed: (&'static str, &'static str),
    /// Sort keys after the hash.
    then_by: &'static [&'static str],
    file: &'static str,
    schema: fn() -> SchemaRef,
    columns: fn() -> Vec<String>,
}

const EVENTS: IndexKind = IndexKind {
    table: "events",
    hashed: ("email", "email_hash"),
    then_by: &["ts", "event_id"],
    file: "events.parquet",
    schema: events_index_schema,
    columns: event_columns,
};

const LEDGER: IndexKind = IndexKind {
    table: "recipient_logs",
    hashed: ("key", "key_hash"),
    then_by: &["row"],
    file: "ledger.parquet",
    schema: ledger_index_schema,
    columns: ledger_columns,
};

/// What [`index_folder`] did.
enum Outcome {
    Current,
    Built,
    Raced,
}

/// Indexes the rows of `kind.table` selected by `filter` (the files of folder `source`) into
/// folder `target`, unless its index is current.
async fn index_folder(
    catalog: &Catalog,
    ws: &str,
    kind: &IndexKind,
    source: &Path,
    target: &Path,
    filter: Expr,
) -> QueryResult<Outcome> {
    let (fp, files) = files_fingerprint(source)?;
    if indexed_fingerprint(target)?.as_deref() == Some(fp.as_str()) {
        return Ok(Outcome::Current);
    }
    let ctx = catalog.session(&crate::query::Scope::workspace(ws)?)?;
    let (hashed, hash) = kind.hashed;
    let mut select = vec![email_hash_expr(col(hashed)).alias(hash)];
    select.extend((kind.columns)().into_iter().map(col));
    let mut order = vec![col(hash).sort(true, true)];
    order.extend(kind.then_by.iter().map(|c| col(*c).sort(true, true)));
    let df = ctx
        .table(kind.table)
        .await?
        .filter(filter)?
        .select(select)?
        .sort(order)?;
    let path = target.join(kind.file);
    let unchanged = || Ok(files_fingerprint(source)?.0 == fp);
    let sidecar = |rows| {
        serde_json::json!(Source {
            fingerprint: fp.clone(),
            files,
            rows,
        })
    };
    let built = write_index(
        catalog,
        df,
        &path,
        (kind.schema)(),
        hash,
        unchanged,
        sidecar,
    )
    .await?;
    Ok(if built {
        Outcome::Built
    } else {
        Outcome::Raced
    })
}

/// Writes one index file and its sidecar (`sidecar` of the rows written); false (nothing
/// written) when `unchanged` says its sources changed while they were read.
async fn write_index(
    catalog: &Catalog,
    df: DataFrame,
    path: &Path,
    schema: SchemaRef,
    hash_column: &str,
    unchanged: impl Fn() -> QueryResult<bool>,
    sidecar: impl FnOnce(usize) -> serde_json::Value,
) -> QueryResult<bool> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_max_row_group_row_count(Some(INDEX_ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(INDEX_PAGE_ROWS)
        .set_write_batch_size(INDEX_PAGE_ROWS)
        // Only the hash has statistics, per page: the footer stays small and the page
        // index finds a recipient's pages.
        .set_statistics_enabled(EnabledStatistics::None)
        .set_column_statistics_enabled(ColumnPath::from(hash_column), EnabledStatistics::Page);
    // A lookup reads one page per column, but a dictionary-encoded column also its row
    // group's whole dictionary page: for columns with a value per recipient that page is up to
    // the 1 MiB dictionary limit, decompressed in every file for a few rows.
    for column in PLAIN_COLUMNS {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    let props = props.build();
    let mut w = RollupWriter::with_properties(path, schema, props)?;
    let written = for_each_batch(&catalog.limits(), df, |b| {
        let b = w.conform(b)?;
        w.write(&b)
    })
    .await;
    if let Err(e) = written {
        w.abandon()?;
        return Err(e);
    }
    if !unchanged()? {
        w.abandon()?;
        return Ok(false);
    }
    let rows = w.finish()?;
    let sidecar_path = path.with_file_name("_source.json");
    let text = serde_json::to_string(&sidecar(rows))?;
    broadside_pipeline::store::write_atomic(&sidecar_path, text.as_bytes())
        .map_err(|e| QueryError::io(&sidecar_path, std::io::Error::other(e.to_string())))?;
    Ok(true)
}

fn event_columns() -> Vec<String> {
    names(&broadside_pipeline::event::file_schema())
}

fn ledger_columns() -> Vec<String> {
    names(&broadside_pipeline::store::ledger_schema())
}

fn names(schema: &Schema) -> Vec<String> {
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

/// An address as the event store identifies a recipient (`email_hash`): trimmed, ASCII
/// letters lowercased.
pub fn event_identity(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// A recipient key as a send writes it to the ledger: an address trimmed and lowercased, an
/// account number trimmed.
pub fn ledger_key(key: &str) -> String {
    if key.contains('@') {
        key.trim().to_lowercase()
    } else {
        key.trim().to_string()
    }
}

/// `column IN (…)` (an always-false filter for an empty list).
fn one_of(column: &str, values: &[String]) -> Expr {
    one_of_expr(col(column), values)
}

/// `e IN (…)` (an always-false filter for an empty list).
fn one_of_expr(e: Expr, values: &[String]) -> Expr {
    if values.is_empty() {
        lit(false)
    } else {
        e.in_list(values.iter().map(|v| lit(v.as_str())).collect(), false)
    }
}

/// Runs as one filter on the `campaign_id` and `run_id` columns: a set lookup per row or
/// partition, however many runs (a disjunction of hundreds of runs cost more to plan and
/// apply than the lookup itself).
fn runs_filter(runs: &[(String, String)]) -> Expr {
    let keys: Vec<String> = runs.iter().map(|(c, r)| run_key(c, r)).collect();
    one_of_expr(run_key_expr(), &keys)
}

/// One entry of a history with its sort key (newest first, then by id).
struct Entry {
    at: i64,
    id: String,
    item: serde_json::Value,
}

/// One recipient's events and ledger rows in the workspace, newest first: events by `ts`,
/// ledger rows by their run's start; ties by id (`event_id`, or `run_id:row`). Keyset
/// paginated like the other lists (`cursor` is a page's `next_cursor`).
pub async fn recipient_history(
    catalog: &Catalog,
    ws: &str,
    recipient: &str,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    let after = match cursor {
        None => None,
        Some(c) => Some(decode_time_cursor(c).ok_or_else(|| {
            QueryError::BadRequest(format!("cursor {c:?}: not a cursor of this list"))
        })?),
    };
    let store = catalog.store();
    let plan = IndexPlan::new(store, ws)?;
    let ctx = catalog.session(&crate::query::Scope::workspace(ws)?)?;
    let mut entries = history_events(catalog, &ctx, &plan, recipient).await?;
    let mut decisions = history_decisions(catalog, &ctx, &plan, recipient).await?;
    // Mail rows: the state now, moved on by the printer's tracking events (as the log list).
    let mut items: Vec<serde_json::Value> = decisions.iter_mut().map(|e| e.item.take()).collect();
    crate::query::lists::add_mail_states(catalog, ws, &mut items).await?;
    for (e, item) in decisions.iter_mut().zip(items) {
        e.item = item;
    }
    entries.extend(decisions);
    entries.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
    if let Some((at, id)) = &after {
        entries.retain(|e| (e.at, &e.id) < (*at, id));
    }
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next_cursor = more
        .then(|| entries.last().map(|e| encode_time_cursor(e.at, &e.id)))
        .flatten();
    Ok(Page {
        items: entries.into_iter().map(|e| e.item).collect(),
        next_cursor,
    })
}

async fn history_events(
    catalog: &Catalog,
    ctx: &SessionContext,
    plan: &IndexPlan,
    recipient: &str,
) -> QueryResult<Vec<Entry>> {
    let identity = event_identity(recipient);
    let h = email_hash(&identity);
    let mut cols: Vec<Expr> = event_columns().into_iter().map(col).collect();
    cols.push(col("date"));
    let mut df: Option<DataFrame> = None;
    if !plan.days_indexed.is_empty() {
        df = Some(
            ctx.table("recipient_events")
                .await?
                .filter(
                    one_of("date", &plan.days_unusable)
                        .not()
                        .and(col("email_hash").eq(lit(h))),
                )?
                .select(cols.clone())?,
        );
    }
    if !plan.days_raw.is_empty() {
        let raw = ctx
            .table("events")
            .await?
            .filter(one_of("date", &plan.days_raw).and(email_hash_expr(col("email")).eq(lit(h))))?
            .select(cols)?;
        df = Some(union(df, raw)?);
    }
    let Some(df) = df else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for b in collect(&catalog.limits(), df).await? {
        let email = strings(&b, "email")?;
        let ts = b
            .column_by_name("ts")
            .expect("selected")
            .as_primitive::<TimestampMicrosecondType>();
        let ids = strings(&b, "event_id")?;
        let keep: Vec<usize> = (0..b.num_rows())
            .filter(|&i| event_identity(email.value(i)) == identity)
            .collect();
        let items = rows_to_json(&[take_rows(&b, &keep)?])?;
        for (i, mut item) in keep.into_iter().zip(items) {
            if let Some(o) = item.as_object_mut() {
                o.insert("kind".into(), "event".into());
                o.insert("at".into(), o.get("ts").cloned().unwrap_or_default());
            }
            out.push(Entry {
                at: ts.value(i),
                id: ids.value(i).to_string(),
                item,
            });
        }
    }
    Ok(out)
}

async fn history_decisions(
    catalog: &Catalog,
    ctx: &SessionContext,
    plan: &IndexPlan,
    recipient: &str,
) -> QueryResult<Vec<Entry>> {
    let key = ledger_key(recipient);
    let h = email_hash(&key);
    let mut cols: Vec<Expr> = ledger_columns().into_iter().map(col).collect();
    cols.push(col("campaign_id"));
    cols.push(col("run_id"));
    let mut df: Option<DataFrame> = None;
    if !plan.runs_indexed.is_empty() {
        df = Some(
            ctx.table("recipient_ledger")
                .await?
                .filter(
                    runs_filter(&plan.runs_unusable)
                        .not()
                        .and(col("key_hash").eq(lit(h))),
                )?
                .select(cols.clone())?,
        );
    }
    if !plan.ledger_months.is_empty() {
        let months = ctx
            .table("recipient_ledger_monthly")
            .await?
            .filter(one_of("month", &plan.ledger_months).and(col("key_hash").eq(lit(h))))?
            .select(cols.clone())?;
        df = Some(union(df, months)?);
    }
    if !plan.runs_raw.is_empty() {
        let raw = ctx
            .table("recipient_logs")
            .await?
            .filter(runs_filter(&plan.runs_raw).and(col("key").eq(lit(key.as_str()))))?
            .select(cols)?;
        df = Some(union(df, raw)?);
    }
    let Some(df) = df else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for b in collect(&catalog.limits(), df).await? {
        let keys = strings(&b, "key")?;
        let campaigns = strings(&b, "campaign_id")?;
        let runs = strings(&b, "run_id")?;
        let rows = b
            .column_by_name("row")
            .expect("selected")
            .as_primitive::<UInt64Type>();
        let keep: Vec<usize> = (0..b.num_rows())
            .filter(|&i| keys.is_valid(i) && keys.value(i) == key)
            .collect();
        let items = rows_to_json(&[take_rows(&b, &keep)?])?;
        for (i, mut item) in keep.into_iter().zip(items) {
            let run = runs.value(i);
            let at = plan.run_starts.get(&run_key(campaigns.value(i), run));
            let id = format!("{run}:{}", rows.value(i));
            if let Some(o) = item.as_object_mut() {
                o.insert("kind".into(), "decision".into());
                o.insert("id".into(), id.clone().into());
                o.insert(
                    "at".into(),
                    at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                        .into(),
                );
            }
            out.push(Entry {
                at: at.map_or(i64::MIN, |t| t.timestamp_micros()),
                id,
                item,
            });
        }
    }
    Ok(out)
}

/// `more` after `df`, when there is one.
fn union(df: Option<DataFrame>, more: DataFrame) -> QueryResult<DataFrame> {
    Ok(match df {
        Some(d) => d.union(more)?,
        None => more,
    })
}

fn take_rows(b: &RecordBatch, rows: &[usize]) -> QueryResult<RecordBatch> {
    let idx = arrow_array::UInt32Array::from_iter_values(rows.iter().map(|&i| i as u32));
    Ok(datafusion::arrow::compute::take_record_batch(b, &idx)?)
}
