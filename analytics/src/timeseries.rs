//! Event counts per time bucket (hour, day, week, month) in a time zone, with empty buckets
//! filled with zeros.
//!
//! Counts are first taken per UTC hour (from the hourly rollup for current partitions, from raw
//! events for the others) and then folded into the caller's buckets in Rust, so every
//! granularity and time zone shares one plan. A time zone whose offset in the range is not a
//! whole number of hours (India, Nepal, Chatham…) is bucketed from raw events per 15 minutes
//! instead. Weeks start on Monday (ISO 8601); days, weeks and months start at local midnight,
//! so a day of a DST change lasts 23 or 25 hours.

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_schema::DataType;
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc,
};
use chrono_tz::Tz;
use datafusion::functions::expr_fn::{date_bin, date_trunc};
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{cast, col, lit, Expr};
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::query::catalog::{ts_type, Catalog, Scope};
use crate::query::{and_time_range, strings, ts_lit};
use crate::query::{collect, QueryError, QueryResult};
use crate::rollup::{dates_filter, DatePlan, RollupKind};
use broadside_pipeline::event::EventType;

pub use crate::params::Granularity;

/// Most buckets one answer may have.
pub const MAX_BUCKETS: usize = 20_000;

/// A time-series request.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    /// The campaign.
    pub campaign_id: String,
    /// Bucket width.
    pub granularity: Granularity,
    /// Time zone of bucket boundaries (IANA name; UTC by default).
    pub time_zone: Tz,
    /// First instant (default: the campaign's first event).
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (default: just after the campaign's last event).
    pub to: Option<DateTime<Utc>>,
    /// Event types to count (default: all).
    pub event_types: Vec<EventType>,
    /// Answer from raw events only (for checking the rollups).
    pub raw_only: bool,
}

/// One bucket: its local start and a count per requested event type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Bucket start, RFC 3339 with the zone's offset.
    pub start: String,
    /// Count per event type, in the order of [`Series::event_types`].
    pub counts: BTreeMap<String, u64>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// The campaign.
    pub campaign_id: String,
    /// Bucket width.
    pub granularity: Granularity,
    /// Time zone of the buckets.
    pub time_zone: String,
    /// Event types counted.
    pub event_types: Vec<String>,
    /// Buckets in time order, empty ones included.
    pub buckets: Vec<Bucket>,
}

/// Computes a campaign's time series in a workspace.
pub async fn time_series(catalog: &Catalog, ws: &str, q: &SeriesQuery) -> QueryResult<Series> {
    let types: Vec<EventType> = if q.event_types.is_empty() {
        EventType::ALL.to_vec()
    } else {
        q.event_types.clone()
    };
    if let (Some(f), Some(t)) = (q.from, q.to) {
        if f >= t {
            // A range holding no instant has no bucket.
            return Ok(empty(q, &types));
        }
    }
    let ctx = catalog.session(&Scope::Workspace(ws.to_string()))?;
    let hour_aligned = [q.from, q.to]
        .iter()
        .flatten()
        .all(|t| t.timestamp() % 3600 == 0 && t.timestamp_subsec_nanos() == 0);
    let whole_hours = whole_hour_offsets(q.time_zone, q.from, q.to);
    let use_rollups = hour_aligned && whole_hours && !q.raw_only;
    let plan = DatePlan::new(
        catalog.store(),
        ws,
        q.from.map(|t| t.date_naive()),
        q.to.map(|t| (t - Duration::microseconds(1)).date_naive() + Duration::days(1)),
        use_rollups,
    )?;
    // Every stored event has one of the known types (ingest refuses others), so without an
    // event type filter the campaign alone selects the rows: no per-row type test in the scan.
    let campaign = col("campaign_id").eq(lit(q.campaign_id.as_str()));
    let campaign = if q.event_types.is_empty() {
        campaign
    } else {
        campaign
            .and(col("event_type").in_list(types.iter().map(|t| lit(t.as_str())).collect(), false))
    };

    // Counts per (slot start, event type); slots are UTC hours, or 15 minutes when the zone
    // needs it.
    let slot: Expr = if whole_hours {
        date_trunc(lit("hour"), col("ts"))
    } else {
        date_bin(
            lit(ScalarValue::new_interval_mdn(0, 0, 15 * 60 * 1_000_000_000)),
            col("ts"),
            lit(ScalarValue::TimestampMicrosecond(
                Some(0),
                Some("UTC".into()),
            )),
        )
    };
    let raw_filter = and_time_range(dates_filter(&plan.raw).and(campaign.clone()), q.from, q.to);
    let mut df = ctx
        .table("events")
        .await?
        .filter(raw_filter)?
        .aggregate(
            vec![slot.alias("slot"), col("event_type")],
            vec![count(lit(1)).alias("n")],
        )?
        .select(vec![
            cast(col("slot"), ts_type()).alias("slot"),
            col("event_type"),
            col("n"),
        ])?;
    let rolled = plan
        .rollup_rows(
            &ctx,
            RollupKind::Hourly,
            and_hours(campaign, q.from, q.to),
            vec![col("hour").alias("slot"), col("event_type"), col("n")],
        )
        .await?;
    if let Some(rolled) = rolled {
        df = if plan.raw.is_empty() {
            rolled
        } else {
            df.union(rolled)?
        };
    }
    let df = df.aggregate(
        vec![col("slot"), col("event_type")],
        vec![cast(sum(col("n")), DataType::Int64).alias("n")],
    )?;
    let batches = collect(&catalog.limits(), df).await?;
    bucketed(q, types, slot_counts(&batches)?)
}

/// The query's rows as (slot start in microseconds, event type, count).
fn slot_counts(batches: &[arrow_array::RecordBatch]) -> QueryResult<Vec<(i64, String, u64)>> {
    let mut slots: Vec<(i64, String, u64)> = Vec::new();
    for b in batches {
        let s = b
            .column_by_name("slot")
            .expect("slot")
            .as_primitive::<TimestampMicrosecondType>();
        let t = strings(b, "event_type")?;
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            slots.push((s.value(i), t.value(i).to_string(), n.value(i) as u64));
        }
    }
    Ok(slots)
}

/// The series' buckets from the slot counts: every bucket of the range (the query's, or the
/// span of the slots found), each slot's count added to the bucket holding it.
fn bucketed(
    q: &SeriesQuery,
    types: Vec<EventType>,
    slots: Vec<(i64, String, u64)>,
) -> QueryResult<Series> {
    let (from, to) = match (q.from, q.to) {
        (Some(f), Some(t)) => (f, t),
        _ => {
            let Some((lo, hi)) = slots.iter().map(|s| s.0).fold(None, |acc, v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
            }) else {
                return Ok(empty(q, &types));
            };
            let lo = DateTime::from_timestamp_micros(lo).expect("valid slot");
            let hi = DateTime::from_timestamp_micros(hi).expect("valid slot") + Duration::hours(1);
            (q.from.unwrap_or(lo), q.to.unwrap_or(hi))
        }
    };
    let starts = bucket_starts(q.granularity, q.time_zone, from, to)?;
    let mut buckets: Vec<Bucket> = starts
        .iter()
        .map(|s| Bucket {
            start: s.with_timezone(&q.time_zone).to_rfc3339(),
            counts: types.iter().map(|t| (t.as_str().to_string(), 0)).collect(),
        })
        .collect();
    let micros: Vec<i64> = starts.iter().map(|s| s.timestamp_micros()).collect();
    for (slot, t, n) in slots {
        // The bucket holding the slot: the last start at or before it.
        let i = micros.partition_point(|s| *s <= slot);
        if i == 0 {
            continue;
        }
        if let Some(c) = buckets[i - 1].counts.get_mut(&t) {
            *c += n;
        }
    }
    Ok(Series {
        campaign_id: q.campaign_id.clone(),
        granularity: q.granularity,
        time_zone: q.time_zone.name().to_string(),
        event_types: types.iter().map(|t| t.as_str().to_string()).collect(),
        buckets,
    })
}

fn empty(q: &SeriesQuery, types: &[EventType]) -> Series {
    Series {
        campaign_id: q.campaign_id.clone(),
        granularity: q.granularity,
        time_zone: q.time_zone.name().to_string(),
        event_types: types.iter().map(|t| t.as_str().to_string()).collect(),
        buckets: Vec::new(),
    }
}

/// Adds the range to a filter on the rollup's `hour` column (hour-aligned bounds only).
fn and_hours(mut f: Expr, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Expr {
    if let Some(t) = from {
        f = f.and(col("hour").gt_eq(ts_lit(t)));
    }
    if let Some(t) = to {
        f = f.and(col("hour").lt(ts_lit(t)));
    }
    f
}

/// Whether the zone's UTC offset is a whole number of hours on every day of the range (or, with
/// an open range, in every rule the zone has had since 1970 — checked twice a year).
fn whole_hour_offsets(tz: Tz, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> bool {
    let from = from.unwrap_or(DateTime::from_timestamp(0, 0).expect("epoch"));
    let to = to.unwrap_or_else(|| Utc::now() + Duration::days(366));
    let step = if to - from > Duration::days(3 * 366) {
        Duration::days(30)
    } else {
        Duration::hours(12)
    };
    let mut t = from;
    while t <= to {
        if tz
            .offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
            % 3600
            != 0
        {
            return false;
        }
        t += step;
    }
    tz.offset_from_utc_datetime(&to.naive_utc())
        .fix()
        .local_minus_utc()
        % 3600
        == 0
}

/// Local midnight of a date (the earliest instant that date begins, across DST gaps).
fn local_midnight(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    let mut t: NaiveDateTime = d.and_hms_opt(0, 0, 0).expect("midnight");
    loop {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return x.with_timezone(&Utc),
            LocalResult::Ambiguous(a, _) => return a.with_timezone(&Utc),
            // Midnight skipped by a DST jump: the day starts at the first existing minute.
            LocalResult::None => t += Duration::minutes(15),
        }
    }
}

/// The bucket containing `t`: its start.
fn bucket_floor(g: Granularity, tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    let local = t.with_timezone(&tz).date_naive();
    match g {
        Granularity::Hour => {
            let off = tz
                .offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc() as i64;
            let s = t.timestamp();
            let floored = (s + off).div_euclid(3600) * 3600 - off;
            DateTime::from_timestamp(floored, 0).expect("in range")
        }
        Granularity::Day => local_midnight(tz, local),
        Granularity::Week => local_midnight(
            tz,
            local - Duration::days(local.weekday().num_days_from_monday() as i64),
        ),
        Granularity::Month => local_midnight(tz, local.with_day(1).expect("day 1")),
    }
}

fn next_bucket(g: Granularity, tz: Tz, start: DateTime<Utc>) -> DateTime<Utc> {
    let local = start.with_timezone(&tz).date_naive();
    match g {
        Granularity::Hour => bucket_floor(g, tz, start + Duration::hours(1)),
        Granularity::Day => local_midnight(tz, local + Duration::days(1)),
        Granularity::Week => local_midnight(tz, local + Duration::days(7)),
        Granularity::Month => {
            let (y, m) = if local.month() == 12 {
                (local.year() + 1, 1)
            } else {
                (local.year(), local.month() + 1)
            };
            local_midnight(
                tz,
                NaiveDate::from_ymd_opt(y, m, 1).expect("first of month"),
            )
        }
    }
}

/// Starts of the buckets covering `[from, to)`.
pub fn bucket_starts(
    g: Granularity,
    tz: Tz,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> QueryResult<Vec<DateTime<Utc>>> {
    let mut out = Vec::new();
    let mut s = bucket_floor(g, tz, from);
    while s < to {
        if out.len() == MAX_BUCKETS {
            return Err(QueryError::BadRequest(format!(
                "more than {MAX_BUCKETS} buckets: narrow the date range or use a coarser granularity"
            )));
        }
        out.push(s);
        s = next_bucket(g, tz, s);
    }
    Ok(out)
}

pub use crate::params::parse_tz;

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weeks_start_on_monday_at_local_midnight() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        // Wednesday 2026-03-04 12:00 UTC → week of Monday 2026-03-02, 00:00 Paris = 23:00 UTC.
        let s = bucket_floor(Granularity::Week, tz, utc("2026-03-04T12:00:00Z"));
        assert_eq!(s, utc("2026-03-01T23:00:00Z"));
    }

    #[test]
    fn dst_days_last_23_and_25_hours() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        let s = bucket_starts(
            Granularity::Day,
            tz,
            utc("2026-03-28T23:00:00Z"),
            utc("2026-03-30T22:00:00Z"),
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1] - s[0], Duration::hours(23));
        let s = bucket_starts(
            Granularity::Day,
            tz,
            utc("2026-10-24T22:00:00Z"),
            utc("2026-10-26T23:00:00Z"),
        )
        .unwrap();
        assert_eq!(s[1] - s[0], Duration::hours(25));
    }

    #[test]
    fn months_have_their_lengths() {
        let tz = Tz::UTC;
        let s = bucket_starts(
            Granularity::Month,
            tz,
            utc("2024-01-15T00:00:00Z"),
            utc("2024-04-01T00:00:00Z"),
        )
        .unwrap();
        let days: Vec<i64> = s.windows(2).map(|w| (w[1] - w[0]).num_days()).collect();
        assert_eq!(days, vec![31, 29]); // January, leap February
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn half_hour_zones_are_detected() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let (f, t) = (utc("2026-01-01T00:00:00Z"), utc("2026-12-31T00:00:00Z"));
        assert!(!whole_hour_offsets(kolkata, Some(f), Some(t)));
        assert!(whole_hour_offsets(paris, Some(f), Some(t)));
    }

    #[test]
    fn hour_buckets_follow_the_zone_offset() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        // 10:20 UTC = 15:50 IST → bucket 15:00 IST = 09:30 UTC.
        let s = bucket_floor(Granularity::Hour, kolkata, utc("2026-01-01T10:20:00Z"));
        assert_eq!(s, utc("2026-01-01T09:30:00Z"));
    }
}
