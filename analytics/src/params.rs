//! Query parameters of the analytics API: the names each route accepts, date ranges, page
//! sizes, event types, time-series granularity and time zones.
//!
//! This file depends on no other module of the crate and on neither DataFusion, axum nor
//! librdkafka, so the fuzz targets compile it on its own (`fuzz/src/lib.rs`); keep it so.

use std::collections::HashMap;

use broadside_pipeline::event::EventType;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// Most rows one page of a list may have (`limit`).
pub const MAX_PAGE: usize = 1000;

/// Rows per page when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// Parameters of the statistics routes.
pub const STATISTICS_PARAMS: &[&str] = &["date_from", "date_to"];

/// Parameters of `/campaign-statistics/{campaign_id}/time-series`.
pub const SERIES_PARAMS: &[&str] = &[
    "granularity",
    "date_from",
    "date_to",
    "event_type",
    "time_zone",
];

/// Parameters of `/campaign-events/`.
pub const EVENTS_PARAMS: &[&str] = &[
    "event_type",
    "date_from",
    "date_to",
    "campaign_id",
    "variant",
    "email",
    "run_id",
    "limit",
    "cursor",
];

/// Parameters of `/bounce-events/`.
pub const BOUNCE_EVENTS_PARAMS: &[&str] = &[
    "email",
    "campaign_id",
    "bounce_type",
    "date_from",
    "date_to",
    "limit",
    "cursor",
];

/// Parameters of `/historical-bounces/export` (the list also takes `limit` and `cursor`).
pub const HISTORICAL_PARAMS: &[&str] = &[
    "email",
    "bounce_type",
    "account_number",
    "date_from",
    "date_to",
];

/// Parameters of `/historical-bounces/`.
pub const HISTORICAL_LIST_PARAMS: &[&str] = &[
    "email",
    "bounce_type",
    "account_number",
    "date_from",
    "date_to",
    "limit",
    "cursor",
];

/// Parameters of `/campaign-runs/`.
pub const RUNS_PARAMS: &[&str] = &["campaign_id", "status", "limit", "cursor"];

/// Parameters of `/campaign-recipient-logs/`.
pub const LOGS_PARAMS: &[&str] = &[
    "campaign_id",
    "variant",
    "run_id",
    "decision",
    "reason",
    "suppression_reason",
    "key",
    "limit",
    "cursor",
];

/// Parameters of `/recipients/{email}/history`.
pub const HISTORY_PARAMS: &[&str] = &["limit", "cursor"];

/// Every route's parameter list (the `api_params` fuzz target walks them).
pub const ROUTE_PARAMS: [&[&str]; 9] = [
    STATISTICS_PARAMS,
    SERIES_PARAMS,
    EVENTS_PARAMS,
    BOUNCE_EVENTS_PARAMS,
    HISTORICAL_PARAMS,
    HISTORICAL_LIST_PARAMS,
    RUNS_PARAMS,
    LOGS_PARAMS,
    HISTORY_PARAMS,
];

/// A query parameter the API refuses: answered with `400` and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

fn bad(msg: impl Into<String>) -> ParamError {
    ParamError(msg.into())
}

/// An optional `[from, to)` instant range.
pub type Range = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Query parameters, checked against the names a route accepts. `workspace_id` is skipped
/// (the auth layer compares it with the header); empty values count as absent; of repeated
/// names the last non-empty value wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params(HashMap<String, String>);

impl Params {
    /// Parses a raw query string (`None`: no `?`), refusing names the route does not accept.
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, ParamError> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if k == "workspace_id" {
                continue;
            }
            if !allowed.contains(&k.as_ref()) {
                return Err(bad(format!(
                    "unknown query parameter {k:?}; this route accepts: {}",
                    allowed.join(", ")
                )));
            }
            if v.is_empty() {
                continue;
            }
            map.insert(k.into_owned(), v.into_owned());
        }
        Ok(Params(map))
    }

    /// A parameter's value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A parameter's value, owned.
    pub fn text(&self, k: &str) -> Option<String> {
        self.0.get(k).cloned()
    }

    /// Every (name, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `date_from` (inclusive) and `date_to` (a date is inclusive of the whole day; an instant
    /// is exclusive). A range whose `from` is not before its `to` holds no instant: it selects
    /// nothing (not an error, so that every well-formed pair of dates is an answerable question).
    pub fn range(&self) -> Result<Range, ParamError> {
        let from = self
            .get("date_from")
            .map(|s| parse_instant(s, false))
            .transpose()?;
        let to = self
            .get("date_to")
            .map(|s| parse_instant(s, true))
            .transpose()?;
        Ok((from, to))
    }

    /// `limit`: 1..=[`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
    pub fn limit(&self) -> Result<usize, ParamError> {
        match self.get("limit") {
            None => Ok(DEFAULT_PAGE),
            Some(s) => s
                .parse()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| bad(format!("limit {s:?}: expected 1..={MAX_PAGE}"))),
        }
    }
}

/// Parses `YYYY-MM-DD` or RFC 3339; a date used as an end bound covers its whole day.
///
/// The instant must lie within the years 0000–9999, so it can be written back as RFC 3339
/// (answers, cursors, logs) and read again; stored events are within those years too.
/// (chrono reads signed and five-digit years with `%Y`, and the day after its last date
/// does not exist.)
pub fn parse_instant(s: &str, end: bool) -> Result<DateTime<Utc>, ParamError> {
    let refuse = || {
        bad(format!(
            "{s:?}: expected YYYY-MM-DD or an RFC 3339 time within the years 0000-9999"
        ))
    };
    let t = match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) => {
            let d = if end {
                d.succ_opt().ok_or_else(refuse)?
            } else {
                d
            };
            d.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
        }
        Err(_) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| refuse())?
            .with_timezone(&Utc),
    };
    if (0..=9999).contains(&t.year()) {
        Ok(t)
    } else {
        Err(refuse())
    }
}

/// Accepts the stored event type names and the seed's short forms (`open`, `click`…).
pub fn parse_event_type(s: &str) -> Result<EventType, ParamError> {
    let full = match s {
        "submit" => "submitted",
        "deliver" | "delivery" => "delivered",
        "open" => "opened",
        "click" => "clicked",
        "bounce" => "bounced",
        "unsubscribe" => "unsubscribed",
        "complaint" | "complain" => "complained",
        other => other,
    };
    EventType::parse(full).ok_or_else(|| {
        bad(format!(
            "event_type {s:?}: expected one of submitted, delivered, opened, clicked, bounced, unsubscribed, complained"
        ))
    })
}

/// A comma-separated list of event types (the time series' `event_type`).
pub fn parse_event_types(s: &str) -> Result<Vec<EventType>, ParamError> {
    s.split(',').map(|x| parse_event_type(x.trim())).collect()
}

/// Bucket width of a time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One hour.
    Hour,
    /// One local day.
    Day,
    /// One ISO week (Monday to Sunday).
    Week,
    /// One calendar month.
    Month,
}

impl Granularity {
    /// Parses `hour`, `day`, `week` or `month`.
    pub fn parse(s: &str) -> Result<Granularity, ParamError> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "week" => Ok(Granularity::Week),
            "month" => Ok(Granularity::Month),
            _ => Err(bad(format!(
                "granularity {s:?}: expected hour, day, week or month"
            ))),
        }
    }

    /// The parameter value naming it.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
        }
    }
}

/// Parses an IANA time zone name (`time_zone`).
pub fn parse_tz(s: &str) -> Result<Tz, ParamError> {
    s.parse::<Tz>()
        .map_err(|_| bad(format!("unknown time zone {s:?} (IANA name expected)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_refused_and_empty_values_ignored() {
        let err = Params::parse(Some("date_from=2026-03-01&nope=1"), STATISTICS_PARAMS);
        assert!(err.unwrap_err().0.contains("\"nope\""));
        let p = Params::parse(Some("date_from=&workspace_id=x"), STATISTICS_PARAMS).unwrap();
        assert_eq!(p.iter().count(), 0);
    }

    #[test]
    fn a_date_as_end_bound_covers_its_day() {
        let p = Params::parse(
            Some("date_from=2026-03-01&date_to=2026-03-01"),
            STATISTICS_PARAMS,
        )
        .unwrap();
        let (from, to) = p.range().unwrap();
        assert_eq!(to.unwrap() - from.unwrap(), chrono::TimeDelta::days(1));
        // Reversed: an empty range, not an error.
        let p = Params::parse(
            Some("date_from=2026-03-02&date_to=2026-03-01"),
            STATISTICS_PARAMS,
        );
        // (The end of 2026-03-01 is the start of 2026-03-02: the range holds nothing.)
        let (from, to) = p.unwrap().range().unwrap();
        assert!(from.unwrap() >= to.unwrap());
    }

    /// Found by fuzzing (`api_params`): `%Y` reads signed and five-digit years, so
    /// `-026-03-02` was accepted as year -26, which RFC 3339 cannot write back; and the end
    /// bound of chrono's last date (`+262142-12-31`) overflowed `d + 1 day`, a panic.
    #[test]
    fn fuzz_instants_outside_years_0000_to_9999_are_refused() {
        for (s, end) in [
            ("-026-03-02", true),
            ("-0001-12-31", false),
            ("+10000-01-01", false),
            ("+262142-12-31", true),
            ("9999-12-31", true),
            ("9999-12-31T23:00:00-05:00", false),
            ("0000-01-01T00:30:00+01:00", false),
        ] {
            assert!(parse_instant(s, end).is_err(), "{s} accepted");
        }
        assert!(parse_instant("9999-12-31", false).is_ok());
        assert!(parse_instant("0000-01-01", true).is_ok());
        let q = Params::parse(Some("date_to=%2B262142-12-31"), STATISTICS_PARAMS).unwrap();
        assert!(q.range().is_err());
    }

    #[test]
    fn limit_and_names_are_checked() {
        let limit = |q: &str| Params::parse(Some(q), EVENTS_PARAMS).unwrap().limit();
        assert_eq!(limit(""), Ok(DEFAULT_PAGE));
        assert_eq!(limit("limit=1000"), Ok(1000));
        assert!(limit("limit=0").is_err() && limit("limit=1001").is_err());
        assert_eq!(Granularity::parse("week").unwrap().as_str(), "week");
        assert_eq!(parse_event_types("open, click").unwrap().len(), 2);
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
