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
//! Closed months (every day before the first of the current UTC month) are also compacted from
//! their day rollups into one file per table, sorted by campaign, with the month's uniques
//! deduplicated:
//!
//! - `rollups/hourly_monthly/workspace_id=W/month=YYYY-MM/hourly.parquet`,
//! - `rollups/uniques_monthly/workspace_id=W/month=YYYY-MM/uniques.parquet`,
//! - `rollups/hourly_monthly/workspace_id=W/month=YYYY-MM/_source.json`: the fingerprint of
//!   every day partition of the month it was built from.
//!
//! A query whose range holds every partition of a month reads the month's two files instead
//! of up to 62 day files, when every day of the month still has the recorded fingerprint (and
//! no day was added); otherwise it reads the month's days as before.
//!
//! Over the compacted months the refresh also counts, per (campaign, variant, event type) and per
//! (campaign, event type), the distinct recipients **first seen** in each month
//! (`rollups/uniques_monthly/workspace_id=W/_firsts.json`, with the fingerprint of every month
//! it read). Unique opens and clicks since the first month are then sums of those counts: a
//! statistics query without a lower bound reads the month uniques only for campaigns that also
//! have rows in days read by day or raw (see [`MonthFirsts`]). Each compacted month also keeps
//! its hourly counts summed over the month (`month=M/_totals.json`), which statistics read
//! instead of the month's hourly rows.
//!
//! Event files are immutable once committed (new data arrives as new files), so a rollup is
//! *current* exactly when the partition's file listing still has its fingerprint. Queries use
//! the rollup of current partitions and scan raw events for the others, in one plan, so answers
//! are always identical to a raw computation. Unique counts are exact up to 64-bit hash
//! collisions (expected collisions among n distinct addresses: n²/2⁶⁵, 3·10⁻⁶ at 10 million).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use broadside_pipeline::store::write_atomic;
use chrono::NaiveDate;
use datafusion::functions::expr_fn::date_trunc;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{cast, col, lit, Expr};
use datafusion::prelude::{DataFrame, SessionContext};
use serde::{Deserialize, Serialize};

use crate::derived::{
    event_dates, files_fingerprint, partition, read_sidecar, RollupWriter, ROLLUP_ROW_GROUP_ROWS,
};
pub use crate::query::catalog::{hourly_schema, uniques_schema};
use crate::query::catalog::{
    ts_type, ROLLUP_HOURLY, ROLLUP_HOURLY_MONTHLY, ROLLUP_UNIQUES, ROLLUP_UNIQUES_MONTHLY,
};
use crate::query::{collect, partition_values, Catalog, QueryError, QueryResult, Scope};

/// Event types whose distinct recipients the rollup keeps.
pub const UNIQUE_TYPES: [&str; 2] = ["opened", "clicked"];

/// The sidecar recording what a rollup was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    fingerprint: String,
    files: usize,
    rows_hourly: usize,
    rows_uniques: usize,
}

/// Fingerprint of the committed event files of one partition (names and sizes).
fn fingerprint(store: &Path, ws: &str, date: &str) -> QueryResult<(String, usize)> {
    files_fingerprint(&partition(store, "events", ws, date))
}

fn month_partition(store: &Path, table: &str, ws: &str, month: &str) -> PathBuf {
    store
        .join(table)
        .join(format!("workspace_id={ws}"))
        .join(format!("month={month}"))
}

fn month_source_path(store: &Path, ws: &str, month: &str) -> PathBuf {
    month_partition(store, ROLLUP_HOURLY_MONTHLY, ws, month).join("_source.json")
}

/// The sidecar of a month compaction: the rollup fingerprint of each of its days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MonthSource {
    days: BTreeMap<String, String>,
    rows_hourly: usize,
    rows_uniques: usize,
}

/// The fingerprint of a month compaction: a hash of the day fingerprints it was built from.
fn month_fingerprint(days: &BTreeMap<String, String>) -> String {
    let text = serde_json::to_string(days).expect("fingerprints serialise");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

fn firsts_path(store: &Path, ws: &str) -> PathBuf {
    store
        .join(ROLLUP_UNIQUES_MONTHLY)
        .join(format!("workspace_id={ws}"))
        .join("_firsts.json")
}

/// One first-seen count: campaign, variant, event type, recipients.
type VariantFirst = (String, Option<String>, String, u64);

/// `_firsts.json`: per compacted month, the distinct recipients first seen that month.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FirstsFile {
    /// Every compacted month read, in order, with its [`month_fingerprint`].
    basis: Vec<(String, String)>,
    /// Per month: `[campaign, variant, event type, recipients]` first seen that month among
    /// the campaign's rows of that variant and type.
    variants: BTreeMap<String, Vec<VariantFirst>>,
    /// Per month: `[campaign, event type, recipients]` first seen that month over all variants.
    campaigns: BTreeMap<String, Vec<(String, String, u64)>>,
}

/// Distinct recipients of opens and clicks over a run of compacted months starting at the
/// workspace's first one, from `_firsts.json`: sums of the recipients first seen in each month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthFirsts {
    /// (campaign, variant, event type) → distinct recipients.
    pub variants: std::collections::HashMap<(String, Option<String>, String), u64>,
    /// (campaign, event type) → distinct recipients over all variants.
    pub campaigns: std::collections::HashMap<(String, String), u64>,
}

/// The first-seen sums over the compacted months of `plan`, a plan **without a lower bound**,
/// when they hold: the months are, in order, the first ones `_firsts.json` was computed over,
/// each with the fingerprint it had then, and no partition the plan reads by day or raw lies
/// before the first of them (without a lower bound, the plan holds every earlier partition).
/// `None` otherwise.
pub fn month_firsts(store: &Path, ws: &str, plan: &DatePlan) -> QueryResult<Option<MonthFirsts>> {
    let months = &plan.months;
    let Some(first) = months.first() else {
        return Ok(None);
    };
    let Some(f) = read_sidecar::<FirstsFile>(&firsts_path(store, ws))? else {
        return Ok(None);
    };
    if f.basis.len() < months.len() {
        return Ok(None);
    }
    for (m, (bm, bfp)) in months.iter().zip(&f.basis) {
        if m != bm || plan.month_fingerprints.get(m) != Some(bfp) {
            return Ok(None);
        }
    }
    // No day of an earlier month may be read outside the compactions.
    if plan
        .rolled
        .iter()
        .chain(&plan.raw)
        .any(|d| month_of(d) < first.as_str())
    {
        return Ok(None);
    }
    let mut out = MonthFirsts::default();
    for m in months {
        for (c, v, t, n) in f.variants.get(m).into_iter().flatten() {
            *out.variants
                .entry((c.clone(), v.clone(), t.clone()))
                .or_default() += n;
        }
        for (c, t, n) in f.campaigns.get(m).into_iter().flatten() {
            *out.campaigns.entry((c.clone(), t.clone())).or_default() += n;
        }
    }
    Ok(Some(out))
}

/// Counts the recipients first seen in each compacted month (every month with a compaction,
/// in order) and writes `_firsts.json`, unless it is current for them already. One pass over
/// the month uniques, one campaign at a time (the files are sorted by campaign). Returns
/// whether it was written.
fn build_firsts(store: &Path, ws: &str, months: &[String]) -> QueryResult<bool> {
    use std::collections::{HashMap, HashSet};
    let mut basis = Vec::new();
    for m in months {
        let Some(days) = month_days(store, ws, m)? else {
            break;
        };
        basis.push((m.clone(), month_fingerprint(&days)));
    }
    let path = firsts_path(store, ws);
    if read_sidecar::<FirstsFile>(&path)?.is_some_and(|f| f.basis == basis) {
        return Ok(false);
    }
    let mut cursors = basis
        .iter()
        .map(|(m, _)| {
            DayCursor::open(
                &month_partition(store, ROLLUP_UNIQUES_MONTHLY, ws, m).join("uniques.parquet"),
            )
        })
        .collect::<QueryResult<Vec<_>>>()?;
    let mut file = FirstsFile {
        basis: basis.clone(),
        ..Default::default()
    };
    loop {
        let Some(campaign) = next_campaign(&cursors)? else {
            break;
        };
        // Variants and types are numbered per campaign, so a seen row is three integers.
        let mut names: Vec<(Option<String>, String)> = Vec::new();
        let mut ids: HashMap<(Option<String>, String), u32> = HashMap::new();
        let mut types: Vec<String> = Vec::new();
        let mut seen_v: HashSet<(u32, u64)> = HashSet::new();
        let mut seen_c: HashSet<(u32, u64)> = HashSet::new();
        for (cursor, (month, _)) in cursors.iter_mut().zip(&basis) {
            let mut run = Vec::new();
            cursor.take_run(&campaign, &mut run)?;
            let mut new_v: BTreeMap<u32, u64> = BTreeMap::new();
            let mut new_c: BTreeMap<u32, u64> = BTreeMap::new();
            for b in &run {
                use arrow_array::cast::AsArray;
                use arrow_array::types::UInt64Type;
                use arrow_array::Array;
                let v = crate::query::strings(b, "variant")?;
                let t = crate::query::strings(b, "event_type")?;
                let h = b
                    .column_by_name("email_hash")
                    .expect("uniques schema")
                    .as_primitive::<UInt64Type>();
                let mut last: Option<(Option<&str>, &str, u32, u32)> = None;
                for i in 0..b.num_rows() {
                    let (variant, ty) = (v.is_valid(i).then(|| v.value(i)), t.value(i));
                    let (vid, tid) = match last {
                        Some((lv, lt, vid, tid)) if lv == variant && lt == ty => (vid, tid),
                        _ => {
                            let key = (variant.map(String::from), ty.to_string());
                            let vid = *ids.entry(key.clone()).or_insert_with(|| {
                                names.push(key);
                                names.len() as u32 - 1
                            });
                            let tid = match types.iter().position(|x| x == ty) {
                                Some(p) => p as u32,
                                None => {
                                    types.push(ty.to_string());
                                    types.len() as u32 - 1
                                }
                            };
                            last = Some((variant, ty, vid, tid));
                            (vid, tid)
                        }
                    };
                    let hash = h.value(i);
                    if seen_v.insert((vid, hash)) {
                        *new_v.entry(vid).or_default() += 1;
                    }
                    if seen_c.insert((tid, hash)) {
                        *new_c.entry(tid).or_default() += 1;
                    }
                }
            }
            let mut rows_v: Vec<VariantFirst> = new_v
                .into_iter()
                .map(|(vid, n)| {
                    let (v, t) = names[vid as usize].clone();
                    (campaign.clone(), v, t, n)
                })
                .collect();
            rows_v.sort();
            file.variants
                .entry(month.clone())
                .or_default()
                .extend(rows_v);
            let mut rows_c: Vec<(String, String, u64)> = new_c
                .into_iter()
                .map(|(tid, n)| (campaign.clone(), types[tid as usize].clone(), n))
                .collect();
            rows_c.sort();
            file.campaigns
                .entry(month.clone())
                .or_default()
                .extend(rows_c);
        }
    }
    write_atomic(&path, serde_json::to_string(&file)?.as_bytes())
        .map_err(|e| QueryError::io(&path, std::io::Error::other(e.to_string())))?;
    Ok(true)
}

fn totals_path(store: &Path, ws: &str, month: &str) -> PathBuf {
    month_partition(store, ROLLUP_HOURLY_MONTHLY, ws, month).join("_totals.json")
}

/// One row of a month's totals: campaign, variant, event type, bounce type, events.
pub type TotalRow = (String, Option<String>, String, Option<String>, u64);

/// `_totals.json` of a month compaction: its hourly rows summed over the month.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MonthTotals {
    /// The [`month_fingerprint`] of the compaction they were summed from.
    month: String,
    rows: Vec<TotalRow>,
}

/// The event counts per (campaign, variant, event type, bounce type) of a month `plan` reads
/// from its compaction, when its totals were summed from that compaction (`None` otherwise:
/// read its hourly rows).
pub fn month_totals(
    store: &Path,
    ws: &str,
    plan: &DatePlan,
    month: &str,
) -> QueryResult<Option<Vec<TotalRow>>> {
    let Some(fp) = plan.month_fingerprints.get(month) else {
        return Ok(None);
    };
    let Some(t) = read_sidecar::<MonthTotals>(&totals_path(store, ws, month))? else {
        return Ok(None);
    };
    Ok((t.month == *fp).then_some(t.rows))
}

/// Sums a month compaction's hourly rows into `_totals.json`, unless they are current.
/// Returns whether it was written.
fn build_totals(store: &Path, ws: &str, month: &str) -> QueryResult<bool> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use arrow_array::Array;
    let Some(days) = month_days(store, ws, month)? else {
        return Ok(false);
    };
    let fp = month_fingerprint(&days);
    let path = totals_path(store, ws, month);
    if read_sidecar::<MonthTotals>(&path)?.is_some_and(|t| t.month == fp) {
        return Ok(false);
    }
    let mut cursor = DayCursor::open(
        &month_partition(store, ROLLUP_HOURLY_MONTHLY, ws, month).join("hourly.parquet"),
    )?;
    let mut sums: BTreeMap<(String, Option<String>, String, Option<String>), u64> = BTreeMap::new();
    while let Some(campaign) = cursor.campaign()? {
        let mut run = Vec::new();
        cursor.take_run(&campaign, &mut run)?;
        for b in &run {
            let v = crate::query::strings(b, "variant")?;
            let t = crate::query::strings(b, "event_type")?;
            let bt = crate::query::strings(b, "bounce_type")?;
            let n = b
                .column_by_name("n")
                .expect("hourly schema")
                .as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                let key = (
                    campaign.clone(),
                    v.is_valid(i).then(|| v.value(i).to_string()),
                    t.value(i).to_string(),
                    bt.is_valid(i).then(|| bt.value(i).to_string()),
                );
                *sums.entry(key).or_default() += n.value(i) as u64;
            }
        }
    }
    let totals = MonthTotals {
        month: fp,
        rows: sums
            .into_iter()
            .map(|((c, v, t, bt), n)| (c, v, t, bt, n))
            .collect(),
    };
    write_atomic(&path, serde_json::to_string(&totals)?.as_bytes())
        .map_err(|e| QueryError::io(&path, std::io::Error::other(e.to_string())))?;
    Ok(true)
}

/// `YYYY-MM` of a `YYYY-MM-DD` date.
fn month_of(date: &str) -> &str {
    &date[..7]
}

/// The day fingerprints of each month, kept while every day of the month seen has one: a
/// month with a day that is not current (or outside a query's range) has `None`.
#[derive(Default)]
struct MonthDays(BTreeMap<String, Option<BTreeMap<String, String>>>);

impl MonthDays {
    fn add(&mut self, date: &str, fp: Option<String>) {
        let days = self
            .0
            .entry(month_of(date).to_string())
            .or_insert_with(|| Some(BTreeMap::new()));
        match (days.as_mut(), fp) {
            (Some(days), Some(fp)) => {
                days.insert(date.to_string(), fp);
            }
            _ => *days = None,
        }
    }

    /// The months whose every day has a fingerprint, with them, in month order.
    fn complete(self) -> impl Iterator<Item = (String, BTreeMap<String, String>)> {
        self.0.into_iter().filter_map(|(m, d)| d.map(|d| (m, d)))
    }
}

/// The fingerprint a day's rollup was computed from (`None` without a readable sidecar).
fn rolled_fingerprint(store: &Path, ws: &str, date: &str) -> QueryResult<Option<String>> {
    Ok(read_sidecar::<Source>(&source_path(store, ws, date))?.map(|s| s.fingerprint))
}

/// The day fingerprints a month compaction was built from (`None` without one).
fn month_days(
    store: &Path,
    ws: &str,
    month: &str,
) -> QueryResult<Option<BTreeMap<String, String>>> {
    Ok(read_sidecar::<MonthSource>(&month_source_path(store, ws, month))?.map(|s| s.days))
}

fn source_path(store: &Path, ws: &str, date: &str) -> PathBuf {
    partition(store, ROLLUP_HOURLY, ws, date).join("_source.json")
}

/// Whether the rollup of a partition matches its current event files.
pub fn is_current(store: &Path, ws: &str, date: &str) -> QueryResult<bool> {
    Ok(current_fingerprint(store, ws, date)?.is_some())
}

/// The fingerprint of a partition when its rollup matches its current event files.
fn current_fingerprint(store: &Path, ws: &str, date: &str) -> QueryResult<Option<String>> {
    let Some(rolled) = rolled_fingerprint(store, ws, date)? else {
        return Ok(None);
    };
    Ok((rolled == fingerprint(store, ws, date)?.0).then_some(rolled))
}

/// Whether a month compaction exists and was built from exactly these day fingerprints.
fn month_matches(
    store: &Path,
    ws: &str,
    month: &str,
    days: &BTreeMap<String, String>,
) -> QueryResult<bool> {
    Ok(month_days(store, ws, month)?.is_some_and(|m| m == *days))
}

/// Which event partitions of a date range are answered from rollups and which from raw events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatePlan {
    /// Partitions whose day rollup is read.
    pub rolled: Vec<String>,
    /// Whole months (`YYYY-MM`) read from their month compaction; their days are in no
    /// other list.
    pub months: Vec<String>,
    /// Partitions scanned raw.
    pub raw: Vec<String>,
    /// The [`month_fingerprint`] of each month in `months`: the compaction the plan checked
    /// against the current day rollups.
    pub month_fingerprints: BTreeMap<String, String>,
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
        let mut months = MonthDays::default();
        for d in event_dates(store, ws)? {
            let day = NaiveDate::parse_from_str(&d, "%Y-%m-%d").expect("listed dates parse");
            if from.is_some_and(|f| day < f) || to.is_some_and(|t| day >= t) {
                months.add(&d, None);
                continue;
            }
            let fp = if use_rollups {
                current_fingerprint(store, ws, &d)?
            } else {
                None
            };
            if fp.is_some() {
                plan.rolled.push(d.clone());
            } else {
                plan.raw.push(d.clone());
            }
            months.add(&d, fp);
        }
        // A month compaction holds exactly its days' rollups, so it stands in for them when
        // every partition the month has is in the range and current with the fingerprint it
        // was built from (a month with a partition outside the range is read by days).
        for (month, days) in months.complete() {
            if month_matches(store, ws, &month, &days)? {
                plan.rolled.retain(|d| month_of(d) != month);
                plan.month_fingerprints
                    .insert(month.clone(), month_fingerprint(&days));
                plan.months.push(month);
            }
        }
        Ok(plan)
    }

    /// Rows of one rollup (`hourly` or `uniques`) for the plan's rolled days and months,
    /// filtered by `filter` and projected by `select`; `None` when nothing is rolled up.
    pub async fn rollup_rows(
        &self,
        ctx: &SessionContext,
        kind: RollupKind,
        filter: Expr,
        select: Vec<Expr>,
    ) -> QueryResult<Option<DataFrame>> {
        let (day_table, month_table) = match kind {
            RollupKind::Hourly => ("rollup_hourly", "rollup_hourly_monthly"),
            RollupKind::Uniques => ("rollup_uniques", "rollup_uniques_monthly"),
        };
        let mut out: Option<DataFrame> = None;
        for (table, col_name, values) in [
            (day_table, "date", &self.rolled),
            (month_table, "month", &self.months),
        ] {
            if values.is_empty() {
                continue;
            }
            let part = partition_filter(col_name, values);
            let df = ctx
                .table(table)
                .await?
                .filter(part.and(filter.clone()))?
                .select(select.clone())?;
            out = Some(match out {
                Some(o) => o.union(df)?,
                None => df,
            });
        }
        Ok(out)
    }

    /// Whether any partition is answered from rollups.
    pub fn any_rolled(&self) -> bool {
        !self.rolled.is_empty() || !self.months.is_empty()
    }
}

/// The two rollup tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollupKind {
    /// Counts per campaign, variant, event type, bounce type and hour.
    Hourly,
    /// Distinct recipients of opens and clicks.
    Uniques,
}

/// `date IN (…)` over partition values (an always-false filter for an empty list).
pub fn dates_filter(dates: &[String]) -> Expr {
    partition_filter("date", dates)
}

/// `column IN (…)` over partition values (an always-false filter for an empty list).
fn partition_filter(column: &str, values: &[String]) -> Expr {
    if values.is_empty() {
        lit(false)
    } else {
        col(column).in_list(values.iter().map(|v| lit(v.as_str())).collect(), false)
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
    /// Closed months compacted (again).
    pub months_built: usize,
    /// Closed months whose compaction was already current.
    pub months_current: usize,
    /// Workspaces whose first-seen counts over the compacted months were (re)computed.
    pub firsts_built: usize,
    /// Months whose event totals were (re)summed from their compaction.
    pub totals_built: usize,
    /// The recipient index (see [`crate::recipients`]).
    pub recipients: crate::recipients::IndexReport,
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
        let mut months = MonthDays::default();
        for d in event_dates(store, &w)? {
            let fp = match current_fingerprint(store, &w, &d)? {
                Some(fp) => {
                    report.current += 1;
                    Some(fp)
                }
                None if build_partition(catalog, &scope, &w, &d).await? => {
                    report.built += 1;
                    current_fingerprint(store, &w, &d)?
                }
                None => {
                    report.raced += 1;
                    None
                }
            };
            months.add(&d, fp);
        }
        // Closed months only: the current one still gets new days.
        let this_month = chrono::Utc::now().format("%Y-%m").to_string();
        let all_months: Vec<String> = months.0.keys().cloned().collect();
        let mut compacted = Vec::new();
        for (month, days) in months.complete() {
            if month >= this_month {
                continue;
            }
            if month_matches(store, &w, &month, &days)? {
                report.months_current += 1;
            } else {
                build_month(catalog, &w, &month, days).await?;
                report.months_built += 1;
            }
            compacted.push(month);
        }
        // The first-seen counts run over the leading months that are compacted and current.
        let leading: Vec<String> = all_months
            .iter()
            .zip(&compacted)
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.clone())
            .collect();
        let (store_dir, ws_id) = (store.to_path_buf(), w.clone());
        let (firsts, totals) =
            tokio::task::spawn_blocking(move || -> QueryResult<(bool, usize)> {
                let mut totals = 0;
                for m in &compacted {
                    totals += usize::from(build_totals(&store_dir, &ws_id, m)?);
                }
                let firsts = !leading.is_empty() && build_firsts(&store_dir, &ws_id, &leading)?;
                Ok((firsts, totals))
            })
            .await
            .map_err(|e| QueryError::io(Path::new(""), std::io::Error::other(e.to_string())))??;
        report.firsts_built += usize::from(firsts);
        report.totals_built += totals;
        let index = crate::recipients::refresh_index(catalog, &w).await?;
        report.recipients.add(index);
    }
    Ok(report)
}

/// Compacts the day rollups of a closed month into one file per table. `days` are the
/// fingerprints the day rollups had when the refresh found them current; a day rebuilt
/// meanwhile makes the recorded fingerprints differ from the listing, so queries do not use
/// the month until the next refresh rebuilds it.
///
/// Day files are sorted by campaign, so the month is a merge of them one campaign at a time:
/// memory holds one campaign's rows of the month and one batch per day, whatever the month's
/// size (a month of 30 M unique rows does not fit a sort in the query memory limit).
async fn build_month(
    catalog: &Catalog,
    ws: &str,
    month: &str,
    days: BTreeMap<String, String>,
) -> QueryResult<()> {
    let store = catalog.store().to_path_buf();
    let (ws, month) = (ws.to_string(), month.to_string());
    tokio::task::spawn_blocking(move || {
        let day_files = |table: &str, file: &str| -> Vec<PathBuf> {
            days.keys()
                .map(|d| partition(&store, table, &ws, d).join(file))
                .collect()
        };
        let rows_hourly = merge_by_campaign(
            &day_files(ROLLUP_HOURLY, "hourly.parquet"),
            &month_partition(&store, ROLLUP_HOURLY_MONTHLY, &ws, &month).join("hourly.parquet"),
            hourly_schema(),
            false,
        )?;
        let rows_uniques = merge_by_campaign(
            &day_files(ROLLUP_UNIQUES, "uniques.parquet"),
            &month_partition(&store, ROLLUP_UNIQUES_MONTHLY, &ws, &month).join("uniques.parquet"),
            uniques_schema(),
            true,
        )?;
        let src = MonthSource {
            days,
            rows_hourly,
            rows_uniques,
        };
        let path = month_source_path(&store, &ws, &month);
        write_atomic(&path, serde_json::to_string(&src)?.as_bytes())
            .map_err(|e| QueryError::io(&path, std::io::Error::other(e.to_string())))
    })
    .await
    .map_err(|e| QueryError::io(Path::new(""), std::io::Error::other(e.to_string())))?
}

/// One day file read in order, positioned at its next row.
struct DayCursor {
    path: PathBuf,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    row: usize,
}

impl DayCursor {
    fn open(path: &Path) -> QueryResult<DayCursor> {
        let file = File::open(path).map_err(|e| QueryError::io(path, e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.with_batch_size(ROLLUP_ROW_GROUP_ROWS).build())
            .map_err(|e| QueryError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let mut c = DayCursor {
            path: path.to_path_buf(),
            reader,
            batch: None,
            row: 0,
        };
        c.advance()?;
        Ok(c)
    }

    /// Loads the next non-empty batch when the current one is used up.
    fn advance(&mut self) -> QueryResult<()> {
        while self.batch.as_ref().is_none_or(|b| self.row >= b.num_rows()) {
            self.row = 0;
            self.batch = match self.reader.next() {
                None => {
                    self.batch = None;
                    return Ok(());
                }
                Some(b) => Some(b.map_err(|e| QueryError::Corrupt {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?),
            };
        }
        Ok(())
    }

    /// The campaign of the next row (`None` at the end).
    fn campaign(&self) -> QueryResult<Option<String>> {
        let Some(b) = self.batch.as_ref().filter(|b| self.row < b.num_rows()) else {
            return Ok(None);
        };
        Ok(Some(
            crate::query::strings(b, "campaign_id")?
                .value(self.row)
                .to_string(),
        ))
    }

    /// Moves the rows of `campaign` (a run, since the file is sorted) to `out`.
    fn take_run(&mut self, campaign: &str, out: &mut Vec<RecordBatch>) -> QueryResult<()> {
        while let Some(b) = self.batch.as_ref().filter(|b| self.row < b.num_rows()) {
            let ids = crate::query::strings(b, "campaign_id")?;
            let start = self.row;
            let mut end = start;
            while end < b.num_rows() && ids.value(end) == campaign {
                end += 1;
            }
            if end == start {
                return Ok(());
            }
            out.push(b.slice(start, end - start));
            self.row = end;
            self.advance()?;
        }
        Ok(())
    }
}

/// The smallest campaign at the cursors' next rows (`None` when all are used up): the next
/// campaign of a merge of files sorted by campaign.
fn next_campaign(cursors: &[DayCursor]) -> QueryResult<Option<String>> {
    let mut next: Option<String> = None;
    for c in cursors {
        if let Some(id) = c.campaign()? {
            if next.as_ref().is_none_or(|n| id < *n) {
                next = Some(id);
            }
        }
    }
    Ok(next)
}

/// Merges day rollup files (each sorted by campaign) into one file sorted by campaign, the
/// days' rows of a campaign in day order; with `dedup`, a campaign's rows are made distinct
/// and ordered by `email_hash` (the uniques). Returns the rows written.
fn merge_by_campaign(
    days: &[PathBuf],
    path: &Path,
    schema: SchemaRef,
    dedup: bool,
) -> QueryResult<usize> {
    let mut cursors = days
        .iter()
        .map(|p| DayCursor::open(p))
        .collect::<QueryResult<Vec<_>>>()?;
    let mut w = RollupWriter::create(path, schema.clone())?;
    loop {
        let Some(campaign) = next_campaign(&cursors)? else {
            break;
        };
        let mut run = Vec::new();
        for c in &mut cursors {
            c.take_run(&campaign, &mut run)?;
        }
        let cast = run
            .iter()
            .map(|b| w.conform(b))
            .collect::<QueryResult<Vec<_>>>()?;
        let batch = datafusion::arrow::compute::concat_batches(&schema, &cast)?;
        let batch = if dedup {
            distinct_uniques(&batch)?
        } else {
            batch
        };
        w.write(&batch)?;
    }
    w.finish()
}

/// The distinct rows of one campaign's uniques, ordered by `email_hash` (then variant, type).
fn distinct_uniques(b: &RecordBatch) -> QueryResult<RecordBatch> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    use arrow_array::Array;
    let v = crate::query::strings(b, "variant")?;
    let t = crate::query::strings(b, "event_type")?;
    let h = b
        .column_by_name("email_hash")
        .expect("uniques schema")
        .as_primitive::<UInt64Type>();
    let key = |i: usize| (h.value(i), v.is_valid(i).then(|| v.value(i)), t.value(i));
    let mut order: Vec<u32> = (0..b.num_rows() as u32).collect();
    order.sort_unstable_by(|a, c| key(*a as usize).cmp(&key(*c as usize)));
    order.dedup_by(|a, c| key(*a as usize) == key(*c as usize));
    let idx = arrow_array::UInt32Array::from(order);
    Ok(datafusion::arrow::compute::take_record_batch(b, &idx)?)
}
/// Workspaces that have events.
pub fn list_workspaces(store: &Path) -> QueryResult<Vec<String>> {
    partition_values(
        &broadside_pipeline::event::events_dir(store),
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
    let mut w = RollupWriter::create(path, schema)?;
    for b in batches {
        let b = w.conform(b)?;
        w.write(&b)?;
    }
    w.finish()
}

/// Keeps the rollups current in the background: one refresh every `every`.
pub fn spawn_refresher(catalog: Arc<Catalog>, every: std::time::Duration) {
    tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            let outcome = refresh(&catalog, None).await;
            metrics::histogram!("broadside_rollup_refresh_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            let label = if outcome.is_ok() { "ok" } else { "failed" };
            metrics::counter!("broadside_rollup_refreshes_total", "outcome" => label).increment(1);
            if outcome.is_ok() {
                metrics::gauge!("broadside_rollup_last_success_timestamp_seconds")
                    .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
            }
            match outcome {
                Ok(r) if r.built + r.months_built > 0 => tracing::info!(
                    built = r.built,
                    current = r.current,
                    raced = r.raced,
                    months_built = r.months_built,
                    months_current = r.months_current,
                    "rollups refreshed"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rollup refresh failed"),
            }
            tokio::time::sleep(every).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, StringArray, UInt64Array};

    /// (campaign, variant, event type, email hash)
    type Row<'a> = (&'a str, Option<&'a str>, &'a str, u64);

    fn uniques(rows: &[Row]) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.3))),
        ];
        RecordBatch::try_new(uniques_schema(), cols).unwrap()
    }

    fn read(path: &Path) -> Vec<(String, Option<String>, String, u64)> {
        let mut c = DayCursor::open(path).unwrap();
        let mut out = Vec::new();
        while let Some(b) = c.batch.take() {
            let b = b.slice(c.row, b.num_rows() - c.row);
            let s = |n| crate::query::strings(&b, n).unwrap();
            let (ci, v, t) = (s("campaign_id"), s("variant"), s("event_type"));
            let h = b.column(3).as_any().downcast_ref::<UInt64Array>().unwrap();
            for i in 0..b.num_rows() {
                use arrow_array::Array;
                out.push((
                    ci.value(i).to_string(),
                    v.is_valid(i).then(|| v.value(i).to_string()),
                    t.value(i).to_string(),
                    h.value(i),
                ));
            }
            c.advance().unwrap();
        }
        out
    }

    #[test]
    fn months_merge_day_files_by_campaign_with_distinct_uniques() {
        let dir = tempfile::tempdir().unwrap();
        // Three sorted day files; campaigns missing on some days, a recipient on several
        // days, the same hash under two variants and two event types.
        let days: Vec<Vec<Row>> = vec![
            vec![
                ("a", Some("A"), "opened", 5),
                ("a", Some("A"), "opened", 9),
                ("c", None, "clicked", 1),
            ],
            vec![("b", Some("B"), "opened", 3), ("b", Some("A"), "opened", 3)],
            vec![
                ("a", Some("A"), "opened", 5),
                ("a", Some("A"), "clicked", 5),
                ("b", Some("B"), "opened", 3),
                ("b", Some("B"), "opened", 2),
            ],
        ];
        let mut files = Vec::new();
        for (i, rows) in days.iter().enumerate() {
            let p = dir.path().join(format!("d{i}/uniques.parquet"));
            // Several batches per file: runs of a campaign cross batch boundaries.
            let batches: Vec<RecordBatch> = rows.iter().map(|r| uniques(&[*r])).collect();
            assert_eq!(
                write_parquet(&p, uniques_schema(), &batches).unwrap(),
                rows.len()
            );
            files.push(p);
        }
        let out = dir.path().join("m/uniques.parquet");
        let n = merge_by_campaign(&files, &out, uniques_schema(), true).unwrap();
        let got = read(&out);
        assert_eq!(n, got.len());
        let want: Vec<(String, Option<String>, String, u64)> = [
            ("a", Some("A"), "clicked", 5),
            ("a", Some("A"), "opened", 5),
            ("a", Some("A"), "opened", 9),
            ("b", Some("B"), "opened", 2),
            ("b", Some("A"), "opened", 3),
            ("b", Some("B"), "opened", 3),
            ("c", None, "clicked", 1),
        ]
        .iter()
        .map(|(c, v, t, h)| (c.to_string(), v.map(String::from), t.to_string(), *h))
        .collect();
        assert_eq!(got, want);

        // Without dedup (hourly counts): every row kept, days in order within a campaign.
        let all = dir.path().join("m/all.parquet");
        let n = merge_by_campaign(&files, &all, uniques_schema(), false).unwrap();
        assert_eq!(n, 9);
        let got = read(&all);
        let campaigns: Vec<&str> = got.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(campaigns, ["a", "a", "a", "a", "b", "b", "b", "b", "c"]);
        assert_eq!(
            got.iter()
                .filter(|r| r.0 == "a")
                .map(|r| r.3)
                .collect::<Vec<_>>(),
            [5, 9, 5, 5]
        );
    }
}
