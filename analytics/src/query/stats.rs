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

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use chrono::{DateTime, NaiveDate, Timelike, Utc};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, sum};
use datafusion::logical_expr::{cast, col, lit, Expr};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::query::catalog::{email_hash_expr, Catalog, Scope};
use crate::query::{collect, QueryResult};
use crate::rollup::{dates_filter, DatePlan, UNIQUE_TYPES};

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

    let raw = raw_events(&ctx, q, &plan).await?;
    let mut counts_df = raw.clone().aggregate(
        vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            col("bounce_type"),
        ],
        vec![count(lit(1)).alias("n")],
    )?;
    let mut uniques_df = raw
        .filter(col("event_type").in_list(UNIQUE_TYPES.iter().map(|t| lit(*t)).collect(), false))?
        .select(vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            email_hash_expr(col("email")).alias("email_hash"),
        ])?;
    if !plan.rolled.is_empty() {
        let mut f = dates_filter(&plan.rolled);
        if let Some(c) = &q.campaign_id {
            f = f.and(col("campaign_id").eq(lit(c.as_str())));
        }
        let hourly = ctx
            .table("rollup_hourly")
            .await?
            .filter(f.clone())?
            .select(vec![
                col("campaign_id"),
                col("variant"),
                col("event_type"),
                col("bounce_type"),
                col("n"),
            ])?;
        // Only rolled-up days: the raw side is empty, leave it out of the plan entirely.
        counts_df = if plan.raw.is_empty() {
            hourly
        } else {
            counts_df.union(hourly)?
        };
        let uniques = ctx.table("rollup_uniques").await?.filter(f)?.select(vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            col("email_hash"),
        ])?;
        uniques_df = if plan.raw.is_empty() {
            uniques
        } else {
            uniques_df.union(uniques)?
        };
    }
    let counts_df = counts_df.aggregate(
        vec![
            col("campaign_id"),
            col("variant"),
            col("event_type"),
            col("bounce_type"),
        ],
        vec![cast(sum(col("n")), DataType::Int64).alias("total")],
    )?;
    let per_variant = uniques_df.clone().aggregate(
        vec![col("campaign_id"), col("variant"), col("event_type")],
        vec![count_distinct(col("email_hash")).alias("n")],
    )?;
    let per_campaign = uniques_df.aggregate(
        vec![col("campaign_id"), col("event_type")],
        vec![count_distinct(col("email_hash")).alias("n")],
    )?;
    let limits = catalog.limits();
    let (counts, pv, pc) = futures::try_join!(
        collect(&limits, counts_df),
        collect(&limits, per_variant),
        collect(&limits, per_campaign)
    )?;

    let mut variants: BTreeMap<Key, Counts> = BTreeMap::new();
    let mut totals: BTreeMap<String, Counts> = BTreeMap::new();
    for b in &counts {
        let (c, v, t, bt, n) = (
            strings(b, "campaign_id")?,
            strings(b, "variant")?,
            strings(b, "event_type")?,
            strings(b, "bounce_type")?,
            b.column_by_name("total")
                .expect("total")
                .as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            let (c, t) = (c.value(i), t.value(i));
            let v = v.is_valid(i).then(|| v.value(i).to_string());
            let bt = bt.is_valid(i).then(|| bt.value(i));
            let n = n.value(i) as u64;
            variants
                .entry((c.to_string(), v))
                .or_default()
                .add_events(t, bt, n);
            totals
                .entry(c.to_string())
                .or_default()
                .add_events(t, bt, n);
        }
    }
    for b in &pv {
        let (c, v, t) = (
            strings(b, "campaign_id")?,
            strings(b, "variant")?,
            strings(b, "event_type")?,
        );
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let v = v.is_valid(i).then(|| v.value(i).to_string());
            variants
                .entry((c.value(i).to_string(), v))
                .or_default()
                .set_unique(t.value(i), n.value(i) as u64);
        }
    }
    for b in &pc {
        let (c, t) = (strings(b, "campaign_id")?, strings(b, "event_type")?);
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            totals
                .entry(c.value(i).to_string())
                .or_default()
                .set_unique(t.value(i), n.value(i) as u64);
        }
    }

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
    Ok(out)
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

/// Adds `from <= ts < to` to a filter.
pub(crate) fn and_time_range(
    mut f: Expr,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Expr {
    if let Some(t) = from {
        f = f.and(col("ts").gt_eq(ts_lit(t)));
    }
    if let Some(t) = to {
        f = f.and(col("ts").lt(ts_lit(t)));
    }
    f
}

/// A timestamp literal of the event `ts` type.
pub(crate) fn ts_lit(t: DateTime<Utc>) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t.timestamp_micros()),
        Some("UTC".into()),
    ))
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

/// A column as strings (casting dictionaries).
pub(crate) fn strings(b: &RecordBatch, name: &str) -> QueryResult<arrow_array::StringArray> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("query result lacks column {name}"));
    Ok(arrow_cast::cast(c, &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}
