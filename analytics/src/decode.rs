//! Decoding and validating event records (JSON) into rows of the event schema.
//!
//! Two JSON shapes are accepted (docs/events.md has examples):
//! - the DESIGN.md shape: `event_id, workspace_id, campaign_id, variant, run_id, email,
//!   event_type, bounce_type, url, ts`;
//! - the provider callback shape (seed 002): `event`, `when`, `email` (a string or an
//!   array), with `workspace_id`/`campaign_id`/`run_id`/`variant` forwarded from the
//!   callback URL's query string. One callback may name several emails and then yields
//!   one event per email; its `event_id` is derived from the content, so a redelivered
//!   callback gets the same id.
//!
//! Unknown extra fields are ignored, so producers can add fields without breaking ingest.
//! A record either decodes completely or is rejected with a [`DeadLetterReason`]: a
//! callback with one bad email is rejected whole rather than half-landed.

use std::borrow::Cow;
use std::fmt;

use broadside_pipeline::event::{BounceType, Event, EventBatchBuilder, EventType};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use xxhash_rust::xxh3::Xxh3;

/// Why a record was sent to the dead letters. The [`code`](Self::code) is stored with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The bytes are not UTF-8.
    #[error("record is not valid UTF-8")]
    NotUtf8,
    /// The bytes are not JSON.
    #[error("malformed JSON: {detail}")]
    MalformedJson {
        /// The parser's message (with line/column).
        detail: String,
    },
    /// A field has the wrong JSON type, or the record is not an object.
    #[error("wrong type: {detail}")]
    WrongType {
        /// The parser's message.
        detail: String,
    },
    /// A required field is absent or null.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A required text field is empty or only whitespace.
    #[error("empty field `{field}`")]
    EmptyField {
        /// The field.
        field: &'static str,
    },
    /// `event_type` (or `event`) is not one of the known types.
    #[error("unknown event type `{value}`")]
    UnknownEventType {
        /// The value seen.
        value: String,
    },
    /// `bounce_type` is neither `hard` nor `soft`.
    #[error("unknown bounce type `{value}`")]
    UnknownBounceType {
        /// The value seen.
        value: String,
    },
    /// `ts` (or `when`) is not an RFC 3339 time or a Unix timestamp in range.
    #[error("invalid timestamp: {detail}")]
    InvalidTimestamp {
        /// What was wrong.
        detail: String,
    },
    /// `workspace_id` cannot be used as a partition folder name.
    #[error("invalid workspace_id `{value}` (allowed: letters, digits, `_`, `-`, `.`; not starting with `.`; at most 128 bytes)")]
    InvalidWorkspaceId {
        /// The value seen.
        value: String,
    },
    /// The email address is not plausibly an address.
    #[error("invalid email `{value}`")]
    InvalidEmail {
        /// The value seen.
        value: String,
    },
    /// A callback named no email (for example an SMS callback with only `telephone`):
    /// the event schema is keyed by email.
    #[error("callback names no email (telephone-only callbacks are not stored)")]
    NoEmail,
}

impl DeadLetterReason {
    /// A stable, machine-readable code (`malformed_json`, `missing_field`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            DeadLetterReason::NotUtf8 => "not_utf8",
            DeadLetterReason::MalformedJson { .. } => "malformed_json",
            DeadLetterReason::WrongType { .. } => "wrong_type",
            DeadLetterReason::MissingField { .. } => "missing_field",
            DeadLetterReason::EmptyField { .. } => "empty_field",
            DeadLetterReason::UnknownEventType { .. } => "unknown_event_type",
            DeadLetterReason::UnknownBounceType { .. } => "unknown_bounce_type",
            DeadLetterReason::InvalidTimestamp { .. } => "invalid_timestamp",
            DeadLetterReason::InvalidWorkspaceId { .. } => "invalid_workspace_id",
            DeadLetterReason::InvalidEmail { .. } => "invalid_email",
            DeadLetterReason::NoEmail => "no_email",
        }
    }
}

/// One decoded, validated event, borrowing from the record where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow<'a> {
    /// Unique id (given, or derived for callbacks).
    pub event_id: Cow<'a, str>,
    /// Tenant (the hive partition, not stored in the file).
    pub workspace_id: Cow<'a, str>,
    /// Campaign.
    pub campaign_id: Cow<'a, str>,
    /// A/B variant.
    pub variant: Option<Cow<'a, str>>,
    /// Send run.
    pub run_id: Option<Cow<'a, str>>,
    /// Recipient email, trimmed.
    pub email: Cow<'a, str>,
    /// What happened.
    pub event_type: EventType,
    /// Hard or soft, for bounces only.
    pub bounce_type: Option<BounceType>,
    /// Clicked URL.
    pub url: Option<Cow<'a, str>>,
    /// Event time, microseconds since the Unix epoch (UTC).
    pub ts_micros: i64,
}

impl EventRow<'_> {
    /// Appends this row to an event batch (its workspace is the batch's partition).
    pub fn push_into(&self, b: &mut EventBatchBuilder) {
        b.push_parts(
            &self.event_id,
            &self.campaign_id,
            self.variant.as_deref(),
            self.run_id.as_deref(),
            &self.email,
            self.event_type,
            self.bounce_type,
            self.url.as_deref(),
            self.ts_micros,
        );
    }

    /// The `date=` partition (UTC day of `ts`).
    pub fn date(&self) -> NaiveDate {
        DateTime::<Utc>::from_timestamp_micros(self.ts_micros)
            .map(|t| t.date_naive())
            .unwrap_or_default()
    }

    /// An owned [`Event`].
    pub fn to_event(&self) -> Event {
        Event {
            event_id: self.event_id.to_string(),
            workspace_id: self.workspace_id.to_string(),
            campaign_id: self.campaign_id.to_string(),
            variant: self.variant.as_deref().map(str::to_string),
            run_id: self.run_id.as_deref().map(str::to_string),
            email: self.email.to_string(),
            event_type: self.event_type,
            bounce_type: self.bounce_type,
            url: self.url.as_deref().map(str::to_string),
            ts: DateTime::<Utc>::from_timestamp_micros(self.ts_micros).unwrap_or_default(),
        }
    }

    /// The same row, owning its strings.
    pub fn into_owned(self) -> EventRow<'static> {
        fn own(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        EventRow {
            event_id: own(self.event_id),
            workspace_id: own(self.workspace_id),
            campaign_id: own(self.campaign_id),
            variant: self.variant.map(own),
            run_id: self.run_id.map(own),
            email: own(self.email),
            event_type: self.event_type,
            bounce_type: self.bounce_type,
            url: self.url.map(own),
            ts_micros: self.ts_micros,
        }
    }
}

/// What one record decodes to: almost always one event; a multi-email callback gives several.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<'a> {
    /// One event (no allocation beyond escaped strings).
    One(EventRow<'a>),
    /// A callback naming several emails.
    Many(Vec<EventRow<'a>>),
}

impl<'a> Decoded<'a> {
    /// The events, in record order.
    pub fn rows(&self) -> &[EventRow<'a>] {
        match self {
            Decoded::One(r) => std::slice::from_ref(r),
            Decoded::Many(v) => v,
        }
    }
}

/// `email` as a string or (callback shape) an array of strings.
#[derive(Debug)]
enum Emails<'a> {
    One(Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Emails<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Emails<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Emails::One(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Emails::One(Cow::Owned(v.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<BorrowedStr<'a>>()? {
                    out.push(s.0);
                }
                Ok(Emails::Many(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A string that borrows from the input when it has no escapes.
#[derive(Debug)]
struct BorrowedStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = BorrowedStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// `ts`/`when`: RFC 3339 text, or a Unix timestamp as a number or numeric text.
#[derive(Debug)]
enum TimeValue<'a> {
    Int(i64),
    Float(f64),
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for TimeValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = TimeValue<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or a Unix timestamp")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(TimeValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(TimeValue::Int)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(TimeValue::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TimeValue::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TimeValue::Text(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

mod fast;

/// The wire record: every field optional so a missing one gets a precise reason.
#[derive(Debug, Default, Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow, default)]
    event_id: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    workspace_id: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    campaign_id: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    variant: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    run_id: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    email: Option<Emails<'a>>,
    #[serde(borrow, default)]
    event_type: Option<BorrowedStr<'a>>,
    /// Callback shape's name for `event_type`.
    #[serde(borrow, default)]
    event: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    bounce_type: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    url: Option<BorrowedStr<'a>>,
    #[serde(borrow, default)]
    ts: Option<TimeValue<'a>>,
    /// Callback shape's name for `ts`.
    #[serde(borrow, default)]
    when: Option<TimeValue<'a>>,
    /// Callback shape: SMS recipients (not stored; only noticed for the reason).
    #[serde(default)]
    telephone: Option<IgnoredAny>,
}

/// [`WireEvent`] with plain `Cow`s. (serde's `borrow` does not reach a `Cow` inside an
/// `Option`, hence [`BorrowedStr`] on the wire.)
struct Wire<'a> {
    event_id: Option<Cow<'a, str>>,
    workspace_id: Option<Cow<'a, str>>,
    campaign_id: Option<Cow<'a, str>>,
    variant: Option<Cow<'a, str>>,
    run_id: Option<Cow<'a, str>>,
    email: Option<Emails<'a>>,
    event_type: Option<Cow<'a, str>>,
    event: Option<Cow<'a, str>>,
    bounce_type: Option<Cow<'a, str>>,
    url: Option<Cow<'a, str>>,
    ts: Option<TimeValue<'a>>,
    when: Option<TimeValue<'a>>,
    telephone: Option<IgnoredAny>,
}

/// Decodes one record (one Kafka message value, one NDJSON line, one webhook item).
pub fn decode_event(bytes: &[u8]) -> Result<Decoded<'_>, DeadLetterReason> {
    let wire = match fast::read(bytes) {
        Some(wire) => wire,
        None => serde_json::from_slice(bytes).map_err(|e| classify(bytes, e))?,
    };
    validate(wire)
}

fn classify(bytes: &[u8], e: serde_json::Error) -> DeadLetterReason {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => DeadLetterReason::WrongType {
            detail: e.to_string(),
        },
        // Checked only on failure so valid records are scanned once.
        _ if std::str::from_utf8(bytes).is_err() => DeadLetterReason::NotUtf8,
        _ => DeadLetterReason::MalformedJson {
            detail: e.to_string(),
        },
    }
}

fn required<'a>(
    v: Option<Cow<'a, str>>,
    field: &'static str,
) -> Result<Cow<'a, str>, DeadLetterReason> {
    match v {
        None => Err(DeadLetterReason::MissingField { field }),
        Some(s) if s.trim().is_empty() => Err(DeadLetterReason::EmptyField { field }),
        Some(s) => Ok(s),
    }
}

/// Empty optional text is treated as absent, so `"variant": ""` and a missing variant agree.
fn optional(v: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    v.filter(|s| !s.is_empty())
}

/// True when `w` is safe as a `workspace_id=` folder name (no traversal, no separators).
pub fn valid_workspace_id(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 128
        && !w.starts_with('.')
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn trim_cow(c: Cow<'_, str>) -> Cow<'_, str> {
    match c {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) if s.trim().len() == s.len() => Cow::Owned(s),
        Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
    }
}

fn check_email(e: Cow<'_, str>) -> Result<Cow<'_, str>, DeadLetterReason> {
    let e = trim_cow(e);
    let ok = match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !e
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        }
        None => false,
    };
    if ok {
        Ok(e)
    } else {
        Err(DeadLetterReason::InvalidEmail {
            value: e.into_owned(),
        })
    }
}

/// Unix timestamps above this are taken as milliseconds (in seconds it is year 5138).
const MILLIS_THRESHOLD: i64 = 100_000_000_000;

/// Event times are kept within years 0000–9999: what RFC 3339 can write, so an event written
/// back as JSON (the webhook's Kafka sink, exports) decodes again, and its `date=` partition
/// is a plain `YYYY-MM-DD`.
pub(crate) fn writable_year(micros: i64) -> bool {
    DateTime::<Utc>::from_timestamp_micros(micros).is_some_and(|t| (0..=9999).contains(&t.year()))
}

fn parse_time(t: TimeValue<'_>) -> Result<i64, DeadLetterReason> {
    let bad = |detail: String| DeadLetterReason::InvalidTimestamp { detail };
    let micros = parse_time_unchecked(t)?;
    if writable_year(micros) {
        Ok(micros)
    } else {
        let shown = DateTime::<Utc>::from_timestamp_micros(micros)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| format!("{micros} µs"));
        Err(bad(format!("{shown} is outside the years 0000–9999")))
    }
}

fn parse_time_unchecked(t: TimeValue<'_>) -> Result<i64, DeadLetterReason> {
    let bad = |detail: String| DeadLetterReason::InvalidTimestamp { detail };
    let from_secs = |s: i64| -> Result<i64, DeadLetterReason> {
        let micros = if s.abs() >= MILLIS_THRESHOLD {
            s.checked_mul(1_000)
        } else {
            s.checked_mul(1_000_000)
        };
        micros
            .filter(|m| DateTime::<Utc>::from_timestamp_micros(*m).is_some())
            .ok_or_else(|| bad(format!("{s} is out of range")))
    };
    match t {
        TimeValue::Int(s) => from_secs(s),
        TimeValue::Float(f) if f.is_finite() && f.abs() < MILLIS_THRESHOLD as f64 => {
            Ok((f * 1_000_000.0).round() as i64)
        }
        TimeValue::Float(f) => Err(bad(format!("{f} is out of range"))),
        TimeValue::Text(s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<i64>() {
                return from_secs(n);
            }
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc).timestamp_micros())
                .map_err(|e| bad(format!("`{s}`: {e}")))
        }
    }
}

fn parse_event_type(s: &str) -> Result<EventType, DeadLetterReason> {
    EventType::parse(s.trim()).ok_or_else(|| DeadLetterReason::UnknownEventType {
        value: s.to_string(),
    })
}

fn validate(w: WireEvent<'_>) -> Result<Decoded<'_>, DeadLetterReason> {
    let w = Wire {
        event_id: w.event_id.map(|b| b.0),
        workspace_id: w.workspace_id.map(|b| b.0),
        campaign_id: w.campaign_id.map(|b| b.0),
        variant: w.variant.map(|b| b.0),
        run_id: w.run_id.map(|b| b.0),
        email: w.email,
        event_type: w.event_type.map(|b| b.0),
        event: w.event.map(|b| b.0),
        bounce_type: w.bounce_type.map(|b| b.0),
        url: w.url.map(|b| b.0),
        ts: w.ts,
        when: w.when,
        telephone: w.telephone,
    };
    let callback = w.event_type.is_none() && w.event.is_some();
    let event_type = if callback {
        parse_event_type(w.event.as_deref().unwrap_or_default())?
    } else {
        parse_event_type(&required(w.event_type, "event_type")?)?
    };
    let workspace_id = trim_cow(required(w.workspace_id, "workspace_id")?);
    if !valid_workspace_id(&workspace_id) {
        return Err(DeadLetterReason::InvalidWorkspaceId {
            value: workspace_id.into_owned(),
        });
    }
    let campaign_id = trim_cow(required(w.campaign_id, "campaign_id")?);
    let bounce_type = match (event_type, optional(w.bounce_type)) {
        (EventType::Bounced, Some(b)) => Some(BounceType::parse(b.trim()).ok_or_else(|| {
            DeadLetterReason::UnknownBounceType {
                value: b.to_string(),
            }
        })?),
        // Seed 002 defines a callback `bounced` as a permanent failure.
        (EventType::Bounced, None) if callback => Some(BounceType::Hard),
        // Bounce types on other events carry no meaning; they are not stored.
        _ => None,
    };
    let ts = if callback {
        w.when.or(w.ts)
    } else {
        w.ts.or(w.when)
    };
    let ts_micros = parse_time(ts.ok_or(DeadLetterReason::MissingField {
        field: if callback { "when" } else { "ts" },
    })?)?;
    let variant = optional(w.variant);
    let run_id = optional(w.run_id);
    let url = optional(w.url);

    if !callback {
        let event_id = trim_cow(required(w.event_id, "event_id")?);
        let email = match w.email {
            None => return Err(DeadLetterReason::MissingField { field: "email" }),
            Some(Emails::One(e)) => check_email(e)?,
            Some(Emails::Many(mut v)) if v.len() == 1 => check_email(v.remove(0))?,
            Some(Emails::Many(_)) => {
                return Err(DeadLetterReason::WrongType {
                    detail: "`email` must be one string when `event_type` is given".into(),
                })
            }
        };
        return Ok(Decoded::One(EventRow {
            event_id,
            workspace_id,
            campaign_id,
            variant,
            run_id,
            email,
            event_type,
            bounce_type,
            url,
            ts_micros,
        }));
    }

    let emails = match w.email {
        Some(Emails::One(e)) => vec![e],
        Some(Emails::Many(v)) => v,
        None => Vec::new(),
    };
    if emails.is_empty() {
        return Err(if w.telephone.is_some() {
            DeadLetterReason::NoEmail
        } else {
            DeadLetterReason::MissingField { field: "email" }
        });
    }
    let mut rows = Vec::with_capacity(emails.len());
    for e in emails {
        let email = check_email(e)?;
        // Trimmed like the DESIGN.md shape's id, so the row written back as that shape (the
        // webhook's Kafka sink) keeps its id; a blank id counts as absent.
        let event_id = match optional(w.event_id.clone().map(trim_cow)) {
            // A given id is made per-email so a multi-email callback keeps ids unique.
            Some(id) if rows.capacity() == 1 => id,
            Some(id) => Cow::Owned(format!("{id}:{}", email.to_ascii_lowercase())),
            None => Cow::Owned(callback_event_id(
                &workspace_id,
                &campaign_id,
                run_id.as_deref(),
                variant.as_deref(),
                event_type,
                ts_micros,
                &email,
                url.as_deref(),
            )),
        };
        rows.push(EventRow {
            event_id,
            workspace_id: workspace_id.clone(),
            campaign_id: campaign_id.clone(),
            variant: variant.clone(),
            run_id: run_id.clone(),
            email,
            event_type,
            bounce_type,
            url: url.clone(),
            ts_micros,
        });
    }
    Ok(if rows.len() == 1 {
        Decoded::One(rows.pop().expect("one row"))
    } else {
        Decoded::Many(rows)
    })
}

/// The id of a callback event that carries none: a hash of what identifies the event, so
/// a provider's redelivery of the same callback maps to the same id.
#[allow(clippy::too_many_arguments)]
pub fn callback_event_id(
    workspace_id: &str,
    campaign_id: &str,
    run_id: Option<&str>,
    variant: Option<&str>,
    event_type: EventType,
    ts_micros: i64,
    email: &str,
    url: Option<&str>,
) -> String {
    let mut h = Xxh3::new();
    for part in [
        workspace_id,
        campaign_id,
        run_id.unwrap_or(""),
        variant.unwrap_or(""),
        event_type.as_str(),
        &email.to_ascii_lowercase(),
        url.unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        // A separator that cannot occur in the parts keeps ("ab","c") and ("a","bc") apart.
        h.update(&[0x1f]);
    }
    h.update(&ts_micros.to_le_bytes());
    format!("cb-{:032x}", h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(json: &str) -> EventRow<'_> {
        match decode_event(json.as_bytes()).expect("decodes") {
            Decoded::One(r) => r,
            Decoded::Many(v) => panic!("expected one row, got {}", v.len()),
        }
    }

    fn reason(json: &[u8]) -> DeadLetterReason {
        decode_event(json).expect_err("must be rejected")
    }

    const GOOD: &str = r#"{"event_id":"e1","workspace_id":"acme","campaign_id":"c1","variant":"A","run_id":"r1","email":" Ann@Example.com ","event_type":"bounced","bounce_type":"hard","url":null,"ts":"2026-03-01T10:00:00Z","extra":{"x":[1,2]}}"#;

    #[test]
    fn design_shape_decodes_and_tolerates_extra_fields() {
        let r = one(GOOD);
        assert_eq!(r.event_id, "e1");
        assert_eq!(r.workspace_id, "acme");
        assert_eq!(r.email, "Ann@Example.com");
        assert_eq!(r.event_type, EventType::Bounced);
        assert_eq!(r.bounce_type, Some(BounceType::Hard));
        assert_eq!(r.url, None);
        assert_eq!(r.date(), NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        assert!(
            matches!(r.event_id, Cow::Borrowed(_)),
            "no copy for plain strings"
        );
    }

    #[test]
    fn unix_seconds_and_millis_agree() {
        let s = one(
            r#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1700000000}"#,
        );
        let ms = one(
            r#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1700000000000}"#,
        );
        assert_eq!(s.ts_micros, 1_700_000_000_000_000);
        assert_eq!(s.ts_micros, ms.ts_micros);
    }

    /// Found by fuzzing (`webhook_callback`): a callback `when` of `-77235772359200` (taken
    /// as milliseconds: year -478) was accepted, but the webhook's Kafka sink writes it as
    /// `"-0478-07-01T10:47:20.800Z"`, which no RFC 3339 reader (ingest included) takes back.
    #[test]
    fn fuzz_times_outside_years_0000_to_9999_are_refused() {
        let with_ts = |ts: &str| {
            format!(
                r#"{{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":{ts}}}"#
            )
        };
        for ts in [
            "-77235772359200",
            "8000000000000000",
            "-62167219201",
            "-99999999999.5",
            "\"9999-12-31T23:00:00-05:00\"",
            "\"0000-01-01T00:30:00+01:00\"",
        ] {
            let json = with_ts(ts);
            match decode_event(json.as_bytes()) {
                Err(DeadLetterReason::InvalidTimestamp { .. }) => {}
                other => panic!("{ts}: {other:?}"),
            }
        }
        let cb = br#"{"event":"bounced","when":-77235772359200,"email":["ann@example.com"],"workspace_id":"acma","campaign_id":"42"}"#;
        assert!(matches!(
            decode_event(cb),
            Err(DeadLetterReason::InvalidTimestamp { .. })
        ));
        // The edges of the range are kept.
        for ts in [
            "-62167219200",
            "\"9999-12-31T23:59:59.999999Z\"",
            "\"0000-01-01T00:00:00Z\"",
        ] {
            assert!(decode_event(with_ts(ts).as_bytes()).is_ok(), "{ts}");
        }
    }

    /// Found by fuzzing (`webhook_callback`): a callback's own `event_id` was kept untrimmed
    /// (`"cb-1\n "`), while the same event produced to Kafka (DESIGN.md shape) is read back
    /// with a trimmed id: the ingest stored `cb-1`, the webhook's dedup window knew
    /// `"cb-1\n "`. A blank id (`" "`) was kept as the id.
    #[test]
    fn fuzz_callback_event_ids_are_trimmed_like_design_shape_ids() {
        let cb = |id: &str| {
            let json = format!(
                r#"{{"event":"opened","when":1772359200,"email":"ann@example.com","workspace_id":"acme","campaign_id":"42"{id}}}"#
            );
            match decode_event(json.as_bytes()).unwrap() {
                Decoded::One(r) => r.event_id.into_owned(),
                Decoded::Many(_) => unreachable!(),
            }
        };
        assert_eq!(cb(r#","event_id":"cb-1\n ""#), "cb-1");
        assert_eq!(cb(r#","event_id":" ""#), cb(""));
        let two = br#"{"event":"opened","when":1772359200,"email":["a@x.io","b@x.io"],"workspace_id":"acme","campaign_id":"42","event_id":" cb-2 "}"#;
        let ids: Vec<String> = decode_event(two)
            .unwrap()
            .rows()
            .iter()
            .map(|r| r.event_id.to_string())
            .collect();
        assert_eq!(ids, ["cb-2:a@x.io", "cb-2:b@x.io"]);
    }

    #[test]
    fn callback_shape_fans_out_with_stable_ids() {
        let json = r#"{"event":"bounced","when":"1700000000","email":["a@x.io","b@x.io"],"workspace_id":"w","campaign_id":"42"}"#;
        let d = decode_event(json.as_bytes()).unwrap();
        let rows = d.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].bounce_type, Some(BounceType::Hard));
        assert_ne!(rows[0].event_id, rows[1].event_id);
        let again = decode_event(json.as_bytes()).unwrap();
        assert_eq!(
            again.rows()[1].event_id,
            rows[1].event_id,
            "redelivery keeps ids"
        );
    }

    #[test]
    fn rejections_have_precise_reasons() {
        assert_eq!(reason(b"{not json").code(), "malformed_json");
        assert_eq!(reason(b"\xff\xfe{}").code(), "not_utf8");
        assert_eq!(reason(b"[1,2]").code(), "wrong_type");
        assert_eq!(
            reason(br#"{"event_id":1,"workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1}"#).code(),
            "wrong_type"
        );
        assert_eq!(
            reason(
                br#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","ts":1}"#
            ),
            DeadLetterReason::MissingField {
                field: "event_type"
            }
        );
        assert_eq!(
            reason(br#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"exploded","ts":1}"#),
            DeadLetterReason::UnknownEventType { value: "exploded".into() }
        );
        assert_eq!(
            reason(br#"{"event_id":"e","workspace_id":"../etc","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1}"#).code(),
            "invalid_workspace_id"
        );
        assert_eq!(
            reason(br#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"nobody","event_type":"opened","ts":1}"#).code(),
            "invalid_email"
        );
        assert_eq!(
            reason(br#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":"yesterday"}"#).code(),
            "invalid_timestamp"
        );
        assert_eq!(
            reason(br#"{"event_id":"e","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"bounced","bounce_type":"medium","ts":1}"#).code(),
            "unknown_bounce_type"
        );
        assert_eq!(
            reason(br#"{"event":"delivered","when":1,"telephone":["+3312"],"workspace_id":"w","campaign_id":"c"}"#),
            DeadLetterReason::NoEmail
        );
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let r = one(
            r#"{"event_id":"e\u0031","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"clicked","url":"https://x/?a=1\u0026b=2","ts":1}"#,
        );
        assert_eq!(r.event_id, "e1");
        assert_eq!(r.url.as_deref(), Some("https://x/?a=1&b=2"));
    }

    proptest::proptest! {
        /// The decoder is fed outside input: it must never panic, whatever the bytes.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode_event(&bytes);
        }
    }
}
