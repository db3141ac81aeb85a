//! When a sending runs: none (draft), immediate, absolute (`at`) or relative (`in`), optionally
//! `prescheduled` so preparation starts a lead time before transmission.
//!
//! A relative `in` matches `^(\d+) (second|minute|hour|day|week|month|year)s?$`. Seconds to
//! weeks are fixed lengths (a week is 7 days, a day 86 400 s: UTC has no DST). Months and years
//! are calendar arithmetic on the UTC date (chrono `checked_add_months`): the same day of the
//! month N months later, clamped to the month's last day (Jan 31 + 1 month = Feb 28 or 29);
//! a year is 12 months (Feb 29 + 1 year = Feb 28).
//!
//! An absolute `at` is unix seconds (a JSON integer or a string of digits) or an ISO 8601 /
//! RFC 3339 instant with an offset (`2020-10-18T10:59:32.340Z`); a time without an offset is
//! refused rather than guessed. Instants outside years 0000-9999 are refused: RFC 3339 cannot
//! write them.

use chrono::{DateTime, Months, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Timing knobs of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Seconds before transmission that a prescheduled sending starts preparing (default 300).
    pub prepare_lead_secs: i64,
    /// Seconds after the desired time by which a sending must have finished, or it fails
    /// (default 1200).
    pub fail_after_secs: i64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            prepare_lead_secs: 5 * 60,
            fail_after_secs: 20 * 60,
        }
    }
}

impl ScheduleConfig {
    /// Reports every problem at once.
    pub fn validate(&self) -> std::result::Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !(0..=86_400).contains(&self.prepare_lead_secs) {
            problems.push(format!(
                "prepare_lead_secs: {} is outside 0..=86400",
                self.prepare_lead_secs
            ));
        }
        if !(1..=7 * 86_400).contains(&self.fail_after_secs) {
            problems.push(format!(
                "fail_after_secs: {} is outside 1..=604800",
                self.fail_after_secs
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A unit of a relative schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// 1 s.
    Second,
    /// 60 s.
    Minute,
    /// 3600 s.
    Hour,
    /// 86 400 s.
    Day,
    /// 7 days.
    Week,
    /// A calendar month.
    Month,
    /// 12 calendar months.
    Year,
}

impl Unit {
    const NAMES: [(&'static str, Unit); 7] = [
        ("second", Unit::Second),
        ("minute", Unit::Minute),
        ("hour", Unit::Hour),
        ("day", Unit::Day),
        ("week", Unit::Week),
        ("month", Unit::Month),
        ("year", Unit::Year),
    ];
}

/// When a sending should be transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum When {
    /// No schedule: the sending stays a draft.
    Draft,
    /// As soon as the scheduler sees it.
    Immediate,
    /// At a fixed instant (unix seconds).
    Absolute {
        /// Unix seconds.
        at: i64,
    },
    /// A number of units after the moment the schedule was accepted.
    Relative {
        /// How many units.
        amount: u32,
        /// Which unit.
        unit: Unit,
    },
}

/// A parsed `schedule` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// When to transmit.
    pub when: When,
    /// Start preparing [`ScheduleConfig::prepare_lead_secs`] before transmission.
    pub prescheduled: bool,
}

/// The instants a schedule resolves to (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// When transmission should start.
    pub desired_at: i64,
    /// When preparation may start (`desired_at`, or earlier when prescheduled).
    pub prepare_at: i64,
    /// After this instant an unfinished sending fails.
    pub fail_at: i64,
}

impl Schedule {
    /// The schedule as the API's answers write it (`null` for a draft): `type`, `at` or `in`,
    /// and `prescheduled`.
    pub fn to_json(&self) -> Value {
        let mut v = match self.when {
            When::Draft => return Value::Null,
            When::Immediate => serde_json::json!({"type": "immediate"}),
            When::Absolute { at } => {
                serde_json::json!({"type": "absolute", "at": format_instant(at)})
            }
            When::Relative { amount, unit } => {
                let unit = serde_json::to_value(unit).expect("unit serialises");
                let unit = unit.as_str().unwrap_or_default();
                let plural = if amount == 1 { "" } else { "s" };
                serde_json::json!({"type": "relative", "in": format!("{amount} {unit}{plural}")})
            }
        };
        v["prescheduled"] = serde_json::json!(self.prescheduled);
        v
    }

    /// The draft schedule (no `schedule` given).
    pub const DRAFT: Schedule = Schedule {
        when: When::Draft,
        prescheduled: false,
    };

    /// Parses a `schedule` object; `field` prefixes the field names in errors.
    ///
    /// `None` and JSON `null` mean draft.
    pub fn from_json(v: Option<&Value>, field: &str) -> Result<Schedule> {
        let obj = match v {
            None | Some(Value::Null) => return Ok(Schedule::DRAFT),
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(Error::invalid(
                    field,
                    format!("must be an object with a \"type\", not {other}"),
                ))
            }
        };
        let f = |name: &str| format!("{field}.{name}");
        let kind = match obj.get("type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(Error::invalid(
                    f("type"),
                    format!("must be a string, not {other}"),
                ))
            }
            None => {
                return Err(Error::invalid(
                    f("type"),
                    "missing; one of immediate, absolute, relative",
                ))
            }
        };
        let allowed: &[&str] = match kind {
            "immediate" => &["type", "prescheduled"],
            "absolute" => &["type", "prescheduled", "at"],
            "relative" => &["type", "prescheduled", "in"],
            other => {
                return Err(Error::invalid(
                    f("type"),
                    format!(
                        "unknown schedule type {other:?}; one of immediate, absolute, relative"
                    ),
                ))
            }
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::invalid(
                f(k),
                format!(
                    "unknown field for a {kind} schedule; allowed: {}",
                    allowed.join(", ")
                ),
            ));
        }
        let prescheduled = match obj.get("prescheduled") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::invalid(
                    f("prescheduled"),
                    format!("must be true or false, not {other}"),
                ))
            }
        };
        let when = match kind {
            "immediate" => When::Immediate,
            "absolute" => {
                let at = obj.get("at").ok_or_else(|| {
                    Error::invalid(f("at"), "missing; unix seconds or an ISO 8601 instant")
                })?;
                When::Absolute {
                    at: parse_instant(at, &f("at"))?,
                }
            }
            _ => match obj.get("in") {
                Some(Value::String(s)) => {
                    let (amount, unit) = parse_relative(s, &f("in"))?;
                    When::Relative { amount, unit }
                }
                Some(other) => {
                    return Err(Error::invalid(
                        f("in"),
                        format!("must be a string like \"5 minutes\", not {other}"),
                    ))
                }
                None => return Err(Error::invalid(f("in"), "missing; a string like \"2 days\"")),
            },
        };
        Ok(Schedule { when, prescheduled })
    }

    /// The instants this schedule means when accepted at `now`; `None` for a draft.
    ///
    /// `field` names the schedule in errors (a relative schedule can overflow the calendar).
    pub fn resolve(&self, now: i64, cfg: &ScheduleConfig, field: &str) -> Result<Option<Timing>> {
        let desired_at = match self.when {
            When::Draft => return Ok(None),
            When::Immediate => now,
            When::Absolute { at } => at,
            When::Relative { amount, unit } => {
                add_relative(now, amount, unit).ok_or_else(|| {
                    Error::invalid(format!("{field}.in"), "is beyond the calendar's range")
                })?
            }
        };
        let prepare_at = if self.prescheduled {
            desired_at - cfg.prepare_lead_secs
        } else {
            desired_at
        };
        Ok(Some(Timing {
            desired_at,
            prepare_at,
            fail_at: desired_at + cfg.fail_after_secs,
        }))
    }
}

/// Parses `^(\d+) (second|minute|hour|day|week|month|year)s?$` (exactly; no extra spaces).
pub fn parse_relative(s: &str, field: &str) -> Result<(u32, Unit)> {
    let bad = |why: &str| {
        Error::invalid(
            field,
            format!("{s:?} {why}; expected \"<number> <second|minute|hour|day|week|month|year>[s]\", e.g. \"30 minutes\""),
        )
    };
    let (num, unit) = s.split_once(' ').ok_or_else(|| bad("has no unit"))?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("does not start with a number"));
    }
    let amount: u32 = num
        .parse()
        .map_err(|_| bad("has a number that is too large"))?;
    let unit_name = unit.strip_suffix('s').unwrap_or(unit);
    let unit = Unit::NAMES
        .iter()
        .find(|(n, _)| *n == unit_name)
        .map(|(_, u)| *u)
        .ok_or_else(|| bad("has an unknown unit"))?;
    Ok((amount, unit))
}

fn add_relative(now: i64, amount: u32, unit: Unit) -> Option<i64> {
    let secs = |per: i64| {
        i64::from(amount)
            .checked_mul(per)
            .and_then(|d| now.checked_add(d))
    };
    match unit {
        Unit::Second => secs(1),
        Unit::Minute => secs(60),
        Unit::Hour => secs(3600),
        Unit::Day => secs(86_400),
        Unit::Week => secs(7 * 86_400),
        Unit::Month | Unit::Year => {
            let months = if unit == Unit::Year {
                amount.checked_mul(12)?
            } else {
                amount
            };
            let start = DateTime::<Utc>::from_timestamp(now, 0)?;
            Some(start.checked_add_months(Months::new(months))?.timestamp())
        }
    }
}

/// Parses an instant: unix seconds (JSON integer or digits) or ISO 8601 with an offset.
pub fn parse_instant(v: &Value, field: &str) -> Result<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| Error::invalid(field, format!("{n} is not whole unix seconds")))
            .and_then(|t| within_rfc3339(t, &n.to_string(), field)),
        Value::String(s) => parse_instant_text(s, field),
        other => Err(Error::invalid(
            field,
            format!("must be unix seconds or an ISO 8601 string, not {other}"),
        )),
    }
}

/// [`parse_instant`] for text (CLI arguments, form fields).
pub fn parse_instant_text(s: &str, field: &str) -> Result<i64> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map_err(|_| Error::invalid(field, format!("{s:?} is too large for unix seconds")))
            .and_then(|u| within_rfc3339(u, &format!("{s:?}"), field));
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return within_rfc3339(d.timestamp(), &format!("{s:?}"), field);
    }
    if NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        || NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").is_ok()
    {
        return Err(Error::invalid(
            field,
            format!("{s:?} has no UTC offset; add Z or +HH:MM (e.g. {t}Z)"),
        ));
    }
    Err(Error::invalid(
        field,
        format!("{s:?} is neither unix seconds nor an ISO 8601 instant like 2020-10-18T10:59:32Z"),
    ))
}

/// First and last second RFC 3339 can write (0000-01-01T00:00:00Z, 9999-12-31T23:59:59Z).
const RFC3339_RANGE: std::ops::RangeInclusive<i64> = -62_167_219_200..=253_402_300_799;

/// Refuses instants outside years 0000-9999: [`format_instant`] could not write them back as
/// an instant this parser takes, and near `i64::MAX` the scheduler's arithmetic would overflow
/// (found by the `schedule` fuzz target).
fn within_rfc3339(unix: i64, shown: &str, field: &str) -> Result<i64> {
    if RFC3339_RANGE.contains(&unix) {
        Ok(unix)
    } else {
        Err(Error::invalid(
            field,
            format!("{shown} is outside years 0000-9999"),
        ))
    }
}

/// Formats unix seconds as RFC 3339 UTC (`2020-10-18T10:59:32Z`).
pub fn format_instant(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn relative_table() {
        let ok: &[(&str, u32, Unit)] = &[
            ("30 minutes", 30, Unit::Minute),
            ("1 day", 1, Unit::Day),
            ("1 days", 1, Unit::Day),
            ("5 months", 5, Unit::Month),
            ("0 seconds", 0, Unit::Second),
            ("2 weeks", 2, Unit::Week),
            ("1 year", 1, Unit::Year),
            ("3 hours", 3, Unit::Hour),
        ];
        for (s, n, u) in ok {
            assert_eq!(parse_relative(s, "schedule.in").unwrap(), (*n, *u), "{s}");
        }
        let bad = [
            "",
            "5",
            "minutes",
            "5minutes",
            "5  minutes",
            " 5 minutes",
            "5 minutes ",
            "-5 minutes",
            "5.5 hours",
            "5 fortnights",
            "5 Minutes",
            "5 minutess",
            "99999999999 seconds",
        ];
        for s in bad {
            let e = parse_relative(s, "schedule.in").unwrap_err().to_string();
            assert!(e.starts_with("schedule.in: "), "{s:?}: {e}");
        }
    }

    #[test]
    fn resolve_table() {
        let cfg = ScheduleConfig::default();
        let now = ts("2024-01-31T10:00:00Z");
        let rel = |amount, unit| When::Relative { amount, unit };
        let table: &[(When, bool, i64, i64)] = &[
            (When::Immediate, false, now, now),
            (When::Immediate, true, now, now - 300),
            (When::Absolute { at: now + 50 }, false, now + 50, now + 50),
            (rel(30, Unit::Minute), false, now + 1800, now + 1800),
            (
                rel(2, Unit::Day),
                true,
                now + 2 * 86_400,
                now + 2 * 86_400 - 300,
            ),
            (
                rel(1, Unit::Week),
                false,
                now + 7 * 86_400,
                now + 7 * 86_400,
            ),
            // calendar months clamp to the month's end: 2024 is a leap year
            (
                rel(1, Unit::Month),
                false,
                ts("2024-02-29T10:00:00Z"),
                ts("2024-02-29T10:00:00Z"),
            ),
            (
                rel(3, Unit::Month),
                false,
                ts("2024-04-30T10:00:00Z"),
                ts("2024-04-30T10:00:00Z"),
            ),
            (
                rel(1, Unit::Year),
                false,
                ts("2025-01-31T10:00:00Z"),
                ts("2025-01-31T10:00:00Z"),
            ),
        ];
        for (when, pre, desired, prepare) in table {
            let s = Schedule {
                when: *when,
                prescheduled: *pre,
            };
            let t = s.resolve(now, &cfg, "schedule").unwrap().unwrap();
            assert_eq!(t.desired_at, *desired, "{when:?}");
            assert_eq!(t.prepare_at, *prepare, "{when:?}");
            assert_eq!(t.fail_at, desired + 1200, "{when:?}");
        }
        assert_eq!(
            Schedule::DRAFT.resolve(now, &cfg, "schedule").unwrap(),
            None
        );
        let leap = ts("2024-02-29T00:00:00Z");
        let s = Schedule {
            when: rel(1, Unit::Year),
            prescheduled: false,
        };
        let t = s.resolve(leap, &cfg, "schedule").unwrap().unwrap();
        assert_eq!(t.desired_at, ts("2025-02-28T00:00:00Z"));
        let huge = Schedule {
            when: rel(u32::MAX, Unit::Year),
            prescheduled: false,
        };
        let e = huge.resolve(now, &cfg, "schedule").unwrap_err().to_string();
        assert!(e.starts_with("schedule.in: "), "{e}");
        let custom = ScheduleConfig {
            prepare_lead_secs: 60,
            fail_after_secs: 30,
        };
        let t = Schedule {
            when: When::Immediate,
            prescheduled: true,
        }
        .resolve(now, &custom, "schedule")
        .unwrap()
        .unwrap();
        assert_eq!((t.prepare_at, t.fail_at), (now - 60, now + 30));
    }

    #[test]
    fn schedule_json_table() {
        let at = ts("2020-10-18T10:59:32Z");
        let ok: &[(Value, Schedule)] = &[
            (Value::Null, Schedule::DRAFT),
            (
                json!({"type": "immediate"}),
                Schedule {
                    when: When::Immediate,
                    prescheduled: false,
                },
            ),
            (
                json!({"type": "absolute", "at": "2020-10-18T10:59:32.340Z"}),
                Schedule {
                    when: When::Absolute { at },
                    prescheduled: false,
                },
            ),
            (
                json!({"type": "absolute", "at": "2020-10-18T12:59:32+02:00", "prescheduled": true}),
                Schedule {
                    when: When::Absolute { at },
                    prescheduled: true,
                },
            ),
            (
                json!({"type": "absolute", "at": at}),
                Schedule {
                    when: When::Absolute { at },
                    prescheduled: false,
                },
            ),
            (
                json!({"type": "absolute", "at": at.to_string()}),
                Schedule {
                    when: When::Absolute { at },
                    prescheduled: false,
                },
            ),
            (
                json!({"type": "relative", "in": "5 minutes"}),
                Schedule {
                    when: When::Relative {
                        amount: 5,
                        unit: Unit::Minute,
                    },
                    prescheduled: false,
                },
            ),
        ];
        for (v, expect) in ok {
            assert_eq!(
                Schedule::from_json(Some(v), "schedule").unwrap(),
                *expect,
                "{v}"
            );
        }
        assert_eq!(
            Schedule::from_json(None, "schedule").unwrap(),
            Schedule::DRAFT
        );
        let bad: &[(Value, &str)] = &[
            (json!("immediate"), "schedule: must be an object"),
            (json!({}), "schedule.type: missing"),
            (json!({"type": 1}), "schedule.type: must be a string"),
            (
                json!({"type": "weekly"}),
                "schedule.type: unknown schedule type \"weekly\"",
            ),
            (json!({"type": "absolute"}), "schedule.at: missing"),
            (
                json!({"type": "absolute", "at": "2020-10-18T10:59:32"}),
                "schedule.at: \"2020-10-18T10:59:32\" has no UTC offset",
            ),
            (
                json!({"type": "absolute", "at": "tomorrow"}),
                "schedule.at: \"tomorrow\" is neither",
            ),
            (
                json!({"type": "absolute", "at": 1.5}),
                "schedule.at: 1.5 is not whole unix seconds",
            ),
            (
                json!({"type": "absolute", "at": true}),
                "schedule.at: must be unix seconds",
            ),
            (json!({"type": "relative"}), "schedule.in: missing"),
            (
                json!({"type": "relative", "in": 5}),
                "schedule.in: must be a string",
            ),
            (
                json!({"type": "relative", "in": "5 fortnights"}),
                "schedule.in: \"5 fortnights\" has an unknown unit",
            ),
            (
                json!({"type": "immediate", "at": 5}),
                "schedule.at: unknown field for a immediate schedule",
            ),
            (
                json!({"type": "relative", "in": "1 day", "prescheduled": "yes"}),
                "schedule.prescheduled: must be true or false",
            ),
        ];
        for (v, prefix) in bad {
            let e = Schedule::from_json(Some(v), "schedule")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(prefix), "{v}: {e}");
        }
    }

    #[test]
    fn config_validation_lists_every_problem() {
        assert!(ScheduleConfig::default().validate().is_ok());
        let p = ScheduleConfig {
            prepare_lead_secs: -1,
            fail_after_secs: 0,
        }
        .validate()
        .unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("prepare_lead_secs") && p[1].starts_with("fail_after_secs"));
    }

    #[test]
    fn instants_round_trip_through_text() {
        assert_eq!(
            format_instant(ts("2020-10-18T10:59:32Z")),
            "2020-10-18T10:59:32Z"
        );
        assert_eq!(
            parse_instant_text("1603018772", "when").unwrap(),
            1_603_018_772
        );
    }

    /// Fuzz find (`schedule` target): digits for year 192238 were accepted, and
    /// `format_instant` then wrote `+192238-07-14T17:06:18Z`, which no parser here takes back;
    /// `i64::MAX` as `at` overflowed `resolve`'s `desired_at + fail_after_secs`.
    #[test]
    fn fuzz_instants_beyond_year_9999_are_refused() {
        for text in ["6004294967178", "9999-12-31T23:59:59-01:00"] {
            let e = parse_instant_text(text, "at").unwrap_err();
            assert!(e.to_string().contains("outside years 0000-9999"), "{e}");
        }
        for at in [
            json!(i64::MAX),
            json!(i64::MIN),
            json!("9223372036854775807"),
        ] {
            let v = json!({"type": "absolute", "at": at});
            assert!(Schedule::from_json(Some(&v), "schedule").is_err(), "{v}");
        }
        let last = parse_instant_text("9999-12-31T23:59:59Z", "at").unwrap();
        assert_eq!(
            parse_instant_text(&format_instant(last), "at").unwrap(),
            last
        );
        let first = parse_instant(&json!(-62_167_219_200i64), "at").unwrap();
        assert_eq!(
            parse_instant_text(&format_instant(first), "at").unwrap(),
            first
        );
    }
}
