//! Campaign statistics: event counts, unique opens and clicks, and rates, per campaign and variant.
//!
//! Definitions (docs/analytics.md):
//! - `opens`, `clicks`: events; `unique_opens`, `unique_clicks`: distinct recipients
//!   (`email_hash`: trimmed, lowercased address);
//! - `bounces` = `hard_bounces` + `soft_bounces` (+ bounces of unknown type);
//! - `delivery_rate` = delivered / submitted, `bounce_rate` = bounces / submitted,
//!   `open_rate` = unique_opens / delivered, `click_rate` = unique_clicks / delivered,
//!   `click_to_open_rate` = unique_clicks / unique_opens,
//!   `unsubscribe_rate` = unsubscribes / delivered, `complaint_rate` = complaints / delivered;
//!   a rate whose denominator is 0 is null.
//!
//! Counts come from the hourly rollup for current partitions and from raw events for the others
//! (see [`crate::rollup`]); a date range that does not fall on UTC midnights is answered from
//! raw events only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use chrono::{DateTime, NaiveDate, Timelike, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{cast, col, lit, when, Expr};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::query::catalog::{email_hash_expr, Catalog, Scope};
use crate::query::{and_time_range, for_each_batch, strings, QueryError, QueryResult};
use crate::rollup::{dates_filter, DatePlan, RollupKind, UNIQUE_TYPES};

/// Which events a statistics query covers.
#[derive(Debug, Clone, Default)]
pub struct StatsQuery {
    /// One campaign, or all.
    pub campaign_id: Option<String>,
    /// Events at or after this instant.
    pub from: Option<DateTime<Utc>>,
    /// Events before this instant.
    pub to: Option<DateTime<Utc>>,
    /// Answer from raw events only (for checking the rollups).
    pub raw_only: bool,
}

/// Counts of one campaign or variant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// `submitted` events.
    pub submitted: u64,
    /// `delivered` events.
    pub delivered: u64,
    /// `opened` events.
    pub opens: u64,
    /// Distinct recipients with an `opened` event.
    pub unique_opens: u64,
    /// `clicked` events.
    pub clicks: u64,
    /// Distinct recipients with a `clicked` event.
    pub unique_clicks: u64,
    /// `bounced` events of any type.
    pub bounces: u64,
    /// Hard bounces.
    pub hard_bounces: u64,
    /// Soft bounces.
    pub soft_bounces: u64,
    /// `unsubscribed` events.
    pub unsubscribes: u64,
    /// `complained` events.
    pub complaints: u64,
}

/// Rates derived from [`Counts`]; null when the denominator is 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rates {
    /// delivered / submitted.
    pub delivery_rate: Option<f64>,
    /// unique_opens / delivered.
    pub open_rate: Option<f64>,
    /// unique_clicks / delivered.
    pub click_rate: Option<f64>,
    /// unique_clicks / unique_opens.
    pub click_to_open_rate: Option<f64>,
    /// bounces / submitted.
    pub bounce_rate: Option<f64>,
    /// unsubscribes / delivered.
    pub unsubscribe_rate: Option<f64>,
    /// complaints / delivered.
    pub complaint_rate: Option<f64>,
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

impl Counts {
    /// The rates of these counts.
    pub fn rates(&self) -> Rates {
        Rates {
            delivery_rate: ratio(self.delivered, self.submitted),
            open_rate: ratio(self.unique_opens, self.delivered),
            click_rate: ratio(self.unique_clicks, self.delivered),
            click_to_open_rate: ratio(self.unique_clicks, self.unique_opens),
            bounce_rate: ratio(self.bounces, self.submitted),
            unsubscribe_rate: ratio(self.unsubscribes, self.delivered),
            complaint_rate: ratio(self.complaints, self.delivered),
        }
    }

    fn add_events(&mut self, event_type: &str, bounce_type: Option<&str>, n: u64) {
        match event_type {
            "submitted" => self.submitted += n,
            "delivered" => self.delivered += n,
            "opened" => self.opens += n,
            "clicked" => self.clicks += n,
            "bounced" => {
                self.bounces += n;
                match bounce_type {
                    Some("hard") => self.hard_bounces += n,
                    Some("soft") => self.soft_bounces += n,
                    _ => {}
                }
            }
            "unsubscribed" => self.unsubscribes += n,
            "complained" => self.complaints += n,
            _ => {}
        }
    }

    fn set_unique(&mut self, event_type: &str, n: u64) {
        match event_type {
            "opened" => self.unique_opens = n,
            "clicked" => self.unique_clicks = n,
            _ => {}
        }
    }
}

/// Counts and rates together (serialised flat).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// The counts.
    #[serde(flatten)]
    pub counts: Counts,
    /// The rates.
    #[serde(flatten)]
    pub rates: Rates,
}

impl From<Counts> for Figures {
    fn from(counts: Counts) -> Self {
        Figures {
            rates: counts.rates(),
            counts,
        }
    }
}

/// One variant's figures; `variant` is null for events that carry none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantStats {
    /// Variant name.
    pub variant: Option<String>,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
    /// Relative difference of this variant's click rate from the campaign's first variant
    /// (the control, in name order); null for the control and when undefined.
    pub click_rate_lift_vs_control: Option<f64>,
}

/// One campaign's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignStats {
    /// Campaign.
    pub campaign_id: String,
    /// All variants together.
    pub totals: Figures,
    /// Per variant, in name order.
    pub variants: Vec<VariantStats>,
}

type Key = (String, Option<String>);

/// Statistics of the campaigns in a workspace matching the query, in campaign order.
pub async fn campaign_statistics(
    catalog: &Catalog,
    ws: &str,
    q: &StatsQuery,
) -> QueryResult<Vec<CampaignStats>> {
    let ctx = catalog.session(&Scope::Workspace(ws.to_string()))?;
    let day_aligned = [q.from, q.to].iter().flatten().all(|t| is_midnight(*t));
    let plan = DatePlan::new(
        catalog.store(),
        ws,
        q.from.map(|t| t.date_naive()),
        q.to.map(day_ceil),
        day_aligned && !q.raw_only,
    )?;

    // One plan, one pass over each file: rows of (campaign, variant, event type, bounce type,
    // email_hash, n). Raw events are pre-aggregated to one row per count key and, for opens
    // and clicks, one row per distinct recipient; rollup rows come as they are stored. The
    // sums and distinct sets are folded here, so neither the raw events nor the rollups are
    // scanned twice.
    let raw_rows = raw_rows(raw_events(&ctx, q, &plan).await?)?;
    let mut rows = (!plan.raw.is_empty() || !plan.any_rolled()).then_some(raw_rows);
    let f = match &q.campaign_id {
        Some(c) => col("campaign_id").eq(lit(c.as_str())),
        None => lit(true),
    };
    // Without a lower bound, unique recipients of the compacted months come from their
    // first-seen counts, except for campaigns that also have unique rows in days read by day
    // or raw: for those, the month uniques are read and folded with the rest.
    let firsts = match (q.from, q.raw_only) {
        (None, false) => crate::rollup::month_firsts(catalog.store(), ws, &plan)?,
        _ => None,
    };
    let unique_select = || fold_columns(lit(ScalarValue::Utf8(None)), col("email_hash"), lit(0i64));
    // Whole months are counted from their totals where they have them (one row per campaign,
    // variant, type and bounce type instead of one per hour).
    let mut totals_rows = Vec::new();
    let mut hourly_months = Vec::new();
    for m in &plan.months {
        match crate::rollup::month_totals(catalog.store(), ws, &plan, m)? {
            Some(rows) => totals_rows.extend(
                rows.into_iter()
                    .filter(|r| q.campaign_id.as_ref().is_none_or(|c| *c == r.0)),
            ),
            None => hourly_months.push(m.clone()),
        }
    }
    let hourly = DatePlan {
        months: hourly_months,
        ..plan.clone()
    }
    .rollup_rows(
        &ctx,
        RollupKind::Hourly,
        f.clone(),
        fold_columns(col("bounce_type"), no_hash(), col("n")),
    )
    .await?;
    let uniques_plan = match firsts {
        Some(_) => DatePlan {
            months: Vec::new(),
            ..plan.clone()
        },
        None => plan.clone(),
    };
    let uniques = uniques_plan
        .rollup_rows(&ctx, RollupKind::Uniques, f.clone(), unique_select())
        .await?;
    for rolled in [hourly, uniques].into_iter().flatten() {
        rows = Some(match rows {
            Some(r) => r.union(rolled)?,
            None => rolled,
        });
    }

    let limits = catalog.limits();
    let mut fold = Fold::new(limits.memory_bytes);
    if !totals_rows.is_empty() {
        fold.add(&totals_batch(&totals_rows)?)?;
    }
    // Every partition may be a month answered from its totals and first-seen counts alone.
    if let Some(rows) = rows {
        for_each_batch(&limits, rows, |b| fold.add(b)).await?;
    }
    let mut mixed = Vec::new();
    if firsts.is_some() {
        mixed = fold.campaigns_with_uniques();
        if !mixed.is_empty() {
            let months = DatePlan {
                rolled: Vec::new(),
                raw: Vec::new(),
                ..plan.clone()
            };
            let in_mixed =
                col("campaign_id").in_list(mixed.iter().map(|c| lit(c.as_str())).collect(), false);
            if let Some(rows) = months
                .rollup_rows(&ctx, RollupKind::Uniques, f.and(in_mixed), unique_select())
                .await?
            {
                for_each_batch(&limits, rows, |b| fold.add(b)).await?;
            }
        }
    }
    let (mut variants, mut totals) = fold.finish();
    if let Some(firsts) = &firsts {
        apply_firsts(firsts, &mixed, &mut variants, &mut totals);
    }

    Ok(answers(variants, totals))
}

/// Each campaign's statistics from the folded counts, with each variant's click-rate lift
/// against the first variant (the control).
fn answers(
    variants: BTreeMap<Key, Counts>,
    totals: BTreeMap<String, Counts>,
) -> Vec<CampaignStats> {
    let mut out = Vec::with_capacity(totals.len());
    for (campaign_id, total) in totals {
        let mut vs: Vec<VariantStats> = variants
            .range((campaign_id.clone(), None)..)
            .take_while(|((c, _), _)| *c == campaign_id)
            .map(|((_, v), counts)| VariantStats {
                variant: v.clone(),
                figures: counts.clone().into(),
                click_rate_lift_vs_control: None,
            })
            .collect();
        let control = vs
            .iter()
            .find(|v| v.variant.is_some())
            .and_then(|v| v.figures.rates.click_rate);
        let mut first = true;
        for v in vs.iter_mut().filter(|v| v.variant.is_some()) {
            if !first {
                v.click_rate_lift_vs_control = match (v.figures.rates.click_rate, control) {
                    (Some(r), Some(c)) if c > 0.0 => Some(r / c - 1.0),
                    _ => None,
                };
            }
            first = false;
        }
        out.push(CampaignStats {
            campaign_id,
            totals: total.into(),
            variants: vs,
        });
    }
    out
}

/// A null `email_hash`, for rows that count events rather than recipients.
fn no_hash() -> Expr {
    cast(lit(ScalarValue::UInt64(None)), DataType::UInt64)
}

/// The raw events of the plan as statistics rows: one per count key, and for opens and
/// clicks one per distinct recipient (`email_hash`).
fn raw_rows(raw: DataFrame) -> QueryResult<DataFrame> {
    let unique_type =
        col("event_type").in_list(UNIQUE_TYPES.iter().map(|t| lit(*t)).collect(), false);
    let hash = when(unique_type, email_hash_expr(col("email"))).otherwise(no_hash())?;
    Ok(raw
        .aggregate(
            vec![
                col("campaign_id"),
                col("variant"),
                col("event_type"),
                col("bounce_type"),
                hash.alias("email_hash"),
            ],
            vec![count(lit(1)).alias("n")],
        )?
        .select(fold_columns(
            col("bounce_type"),
            col("email_hash"),
            col("n"),
        ))?)
}

/// Month totals as rows of the statistics plan (no distinct recipients).
fn totals_batch(rows: &[crate::rollup::TotalRow]) -> QueryResult<RecordBatch> {
    use arrow_array::{Int64Array, StringArray, UInt64Array};
    use std::sync::Arc;
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("campaign_id", DataType::Utf8, false),
        arrow_schema::Field::new("variant", DataType::Utf8, true),
        arrow_schema::Field::new("event_type", DataType::Utf8, false),
        arrow_schema::Field::new("bounce_type", DataType::Utf8, true),
        arrow_schema::Field::new("email_hash", DataType::UInt64, true),
        arrow_schema::Field::new("n", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
            Arc::new(rows.iter().map(|r| r.1.as_deref()).collect::<StringArray>()),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.2))),
            Arc::new(rows.iter().map(|r| r.3.as_deref()).collect::<StringArray>()),
            Arc::new(UInt64Array::new_null(rows.len())),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.4 as i64),
            )),
        ],
    )?)
}

/// Unique opens and clicks of the campaigns the fold holds no distinct recipients for, from
/// the months' first-seen counts (the fold's own counts stand for the others).
fn apply_firsts(
    firsts: &crate::rollup::MonthFirsts,
    mixed: &[String],
    variants: &mut BTreeMap<Key, Counts>,
    totals: &mut BTreeMap<String, Counts>,
) {
    let folded: HashSet<&String> = mixed.iter().collect();
    for ((c, t), n) in &firsts.campaigns {
        if folded.contains(c) {
            continue;
        }
        if let Some(total) = totals.get_mut(c) {
            total.set_unique(t, *n);
        }
    }
    for ((c, v, t), n) in &firsts.variants {
        if folded.contains(c) {
            continue;
        }
        if let Some(counts) = variants.get_mut(&(c.clone(), v.clone())) {
            counts.set_unique(t, *n);
        }
    }
}

/// The columns every row of the statistics plan has, in order and with one type each.
fn fold_columns(bounce_type: Expr, email_hash: Expr, n: Expr) -> Vec<Expr> {
    vec![
        cast(col("campaign_id"), DataType::Utf8).alias("campaign_id"),
        cast(col("variant"), DataType::Utf8).alias("variant"),
        cast(col("event_type"), DataType::Utf8).alias("event_type"),
        cast(bounce_type, DataType::Utf8).alias("bounce_type"),
        cast(email_hash, DataType::UInt64).alias("email_hash"),
        cast(n, DataType::Int64).alias("n"),
    ]
}

/// A hasher for values that are already uniform 64-bit hashes (`email_hash`).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashSet64 = HashSet<u64, BuildHasherDefault<PassThrough>>;

/// Sums counts and collects distinct recipients per campaign and variant from the plan's rows.
struct Fold {
    /// Distinct values of campaign, variant and event type, numbered.
    names: HashMap<String, u32>,
    variants: HashMap<(u32, Option<u32>), Counts>,
    totals: HashMap<u32, Counts>,
    variant_sets: HashMap<(u32, Option<u32>, u32), HashSet64>,
    campaign_sets: HashMap<(u32, u32), HashSet64>,
    /// Hashes held in the sets, and how many the memory limit allows.
    held: usize,
    max_held: usize,
}

impl Fold {
    fn new(memory_bytes: usize) -> Fold {
        Fold {
            names: HashMap::new(),
            variants: HashMap::new(),
            totals: HashMap::new(),
            variant_sets: HashMap::new(),
            campaign_sets: HashMap::new(),
            held: 0,
            // A set entry costs about 16 bytes with the table's spare room.
            max_held: memory_bytes / 16,
        }
    }

    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.names.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.insert(name.to_string(), id);
        id
    }

    /// [`Fold::id`] through a one-entry memo: rows come sorted or grouped by campaign, so a
    /// column mostly repeats the previous row's value.
    fn id_memo<'a>(&mut self, memo: &mut Option<(&'a str, u32)>, name: &'a str) -> u32 {
        match memo {
            Some((last, id)) if *last == name => *id,
            _ => {
                let id = self.id(name);
                *memo = Some((name, id));
                id
            }
        }
    }

    fn add(&mut self, b: &RecordBatch) -> QueryResult<()> {
        let (c, v, t, bt) = (
            strings(b, "campaign_id")?,
            strings(b, "variant")?,
            strings(b, "event_type")?,
            strings(b, "bounce_type")?,
        );
        let h = b
            .column_by_name("email_hash")
            .expect("email_hash")
            .as_primitive::<UInt64Type>();
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>();
        let (mut mc, mut mv, mut mt) = (None, None, None);
        for i in 0..b.num_rows() {
            let (ci, ti) = (self.id_memo(&mut mc, c.value(i)), t.value(i));
            let vi = v.is_valid(i).then(|| self.id_memo(&mut mv, v.value(i)));
            let count = n.value(i) as u64;
            if count > 0 {
                let bt = bt.is_valid(i).then(|| bt.value(i));
                self.variants
                    .entry((ci, vi))
                    .or_default()
                    .add_events(ti, bt, count);
                self.totals.entry(ci).or_default().add_events(ti, bt, count);
            }
            if h.is_valid(i) {
                let (hash, tid) = (h.value(i), self.id_memo(&mut mt, ti));
                let added = u64::from(
                    self.variant_sets
                        .entry((ci, vi, tid))
                        .or_default()
                        .insert(hash),
                ) + u64::from(
                    self.campaign_sets
                        .entry((ci, tid))
                        .or_default()
                        .insert(hash),
                );
                self.held += added as usize;
                if self.held > self.max_held {
                    return Err(QueryError::DataFusion(
                        datafusion::error::DataFusionError::ResourcesExhausted(format!(
                            "statistics hold more than {} distinct recipients (memory limit)",
                            self.max_held
                        )),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The campaigns the fold holds distinct recipients of.
    fn campaigns_with_uniques(&self) -> Vec<String> {
        let ids: HashSet<u32> = self.campaign_sets.keys().map(|(c, _)| *c).collect();
        let mut out: Vec<String> = self
            .names
            .iter()
            .filter(|(_, id)| ids.contains(id))
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Counts per (campaign, variant) and per campaign, uniques included.
    fn finish(self) -> (BTreeMap<Key, Counts>, BTreeMap<String, Counts>) {
        let mut names = vec![String::new(); self.names.len()];
        for (name, id) in self.names {
            names[id as usize] = name;
        }
        let mut variants: BTreeMap<Key, Counts> = self
            .variants
            .into_iter()
            .map(|((c, v), n)| {
                (
                    (
                        names[c as usize].clone(),
                        v.map(|v| names[v as usize].clone()),
                    ),
                    n,
                )
            })
            .collect();
        let mut totals: BTreeMap<String, Counts> = self
            .totals
            .into_iter()
            .map(|(c, n)| (names[c as usize].clone(), n))
            .collect();
        for ((c, v, t), set) in self.variant_sets {
            let key = (
                names[c as usize].clone(),
                v.map(|v| names[v as usize].clone()),
            );
            variants
                .entry(key)
                .or_default()
                .set_unique(&names[t as usize], set.len() as u64);
        }
        for ((c, t), set) in self.campaign_sets {
            totals
                .entry(names[c as usize].clone())
                .or_default()
                .set_unique(&names[t as usize], set.len() as u64);
        }
        (variants, totals)
    }
}

/// Raw events of the plan's raw partitions matching the query.
pub(crate) async fn raw_events(
    ctx: &SessionContext,
    q: &StatsQuery,
    plan: &DatePlan,
) -> QueryResult<DataFrame> {
    let mut f = dates_filter(&plan.raw);
    if let Some(c) = &q.campaign_id {
        f = f.and(col("campaign_id").eq(lit(c.as_str())));
    }
    f = and_time_range(f, q.from, q.to);
    Ok(ctx.table("events").await?.filter(f)?)
}

fn is_midnight(t: DateTime<Utc>) -> bool {
    t.num_seconds_from_midnight() == 0 && t.timestamp_subsec_nanos() == 0
}

/// The first day not before `t` (exclusive day bound covering every instant before `t`).
fn day_ceil(t: DateTime<Utc>) -> NaiveDate {
    let d = t.date_naive();
    if is_midnight(t) {
        d
    } else {
        d.succ_opt().unwrap_or(d)
    }
}
