//! The campaign API's outside input, parsed by pure functions: the `workspace_id` header and
//! query parameter, and the JSON bodies of the campaign, sending and audience routes into
//! typed requests. No server, runtime or store is involved (the handlers in [`crate::api`]
//! call these, then run the store work), so the `campaign_api` fuzz target (`fuzz/`) drives
//! exactly the code the API runs.
//!
//! The only outside-world type used is `axum::http::Uri` (the `http` crate, re-exported by
//! axum) to check callback URLs the way the HTTP stack reads them.
//!
//! Errors: [`InputError::Malformed`] is a 400 (the body is not JSON or not an object);
//! [`InputError::Field`] carries an [`Error::Invalid`] naming the field (a 422).

use serde_json::{Map, Value};

use crate::audience::{Condition, Recipients};
use crate::error::{Error, Result};
use crate::schedule::{format_instant, parse_instant, Schedule, ScheduleConfig, Timing};
use crate::state::{CampaignState, SendingStatus};
use crate::store::CampaignFields;

/// The fields `POST /campaign/{id}/sendings` accepts.
pub const SENDING_FIELDS: [&str; 6] = [
    "schedule",
    "draft",
    "audience",
    "recipients",
    "channels_preference",
    "exclude_sent",
];

/// The fields `PUT /campaign/{id}/sendings/{sid}` accepts.
pub const SENDING_UPDATE_FIELDS: [&str; 3] = ["schedule", "draft", "status"];

/// The fields `POST /audience` accepts.
pub const AUDIENCE_FIELDS: [&str; 2] = ["name", "conditions"];

/// The fields `POST /campaign` accepts (`PUT /campaign/{id}`: the same without `list`).
pub const CAMPAIGN_FIELDS: [&str; 8] = [
    "name",
    "domain",
    "segments",
    "segments[]",
    "state",
    "when",
    "event_callback",
    "list",
];

/// Why a request's input was refused.
#[derive(Debug)]
pub enum InputError {
    /// The body is not JSON or not a JSON object (400, `{"error"}`).
    Malformed(String),
    /// A field is missing, unknown or invalid (422, `{"error", "field"}`).
    Field(Error),
}

impl From<Error> for InputError {
    fn from(e: Error) -> Self {
        InputError::Field(e)
    }
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InputError::Malformed(m) => f.write_str(m),
            InputError::Field(e) => e.fmt(f),
        }
    }
}

/// The workspace a `workspace_id` header names: trimmed, 1 to 64 ASCII letters, digits, `_`
/// or `-`; `None` refuses it (403).
pub fn workspace_id(header: &str) -> Option<&str> {
    Some(header.trim()).filter(|w| {
        !w.is_empty()
            && w.len() <= 64
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// Checks a request's query string against the header's workspace: a `workspace_id` query
/// parameter that differs from it is refused (403, as in the analytics API) with the message
/// returned. Other parameters are not read by any campaign route.
pub fn check_query(query: Option<&str>, ws: &str) -> std::result::Result<(), String> {
    let differing = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "workspace_id")
        .map(|(_, v)| v.into_owned())
        .find(|v| *v != ws);
    match differing {
        Some(q) => Err(format!(
            "workspace_id query parameter {q:?} differs from the header {ws:?}"
        )),
        None => Ok(()),
    }
}

/// Parses a JSON object body: bad JSON is 400, anything but an object 400.
pub fn object(body: &[u8]) -> std::result::Result<Map<String, Value>, InputError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| InputError::Malformed(format!("body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(InputError::Malformed(format!(
            "body must be a JSON object, not {other}"
        ))),
    }
}

/// Refuses a key not in `allowed`, naming it.
pub fn check_keys(o: &Map<String, Value>, allowed: &[&str]) -> Result<()> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Error::invalid(
            k,
            format!("unknown field; allowed: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn opt_int(o: &Map<String, Value>, key: &str) -> Result<Option<Option<i64>>> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v
            .as_i64()
            .filter(|i| *i > 0)
            .map(|i| Some(Some(i)))
            .ok_or_else(|| Error::invalid(key, format!("{v} is not a positive integer id"))),
    }
}

/// The body of `POST /campaign` (`creating`) or `PUT /campaign/{id}`.
pub fn campaign_request(
    body: &[u8],
    creating: bool,
) -> std::result::Result<CampaignFields, InputError> {
    Ok(campaign_fields(&object(body)?, creating)?)
}

/// The fields of a campaign body; `list` only when `creating`.
pub fn campaign_fields(o: &Map<String, Value>, creating: bool) -> Result<CampaignFields> {
    let mut allowed = vec![
        "name",
        "domain",
        "segments",
        "segments[]",
        "state",
        "when",
        "event_callback",
    ];
    if creating {
        allowed.push("list");
    } else if o.contains_key("list") {
        return Err(Error::invalid(
            "list",
            "cannot change after creation; create a new campaign",
        ));
    }
    check_keys(o, &allowed)?;
    let name = match o.get("name") {
        None => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(v) => {
            return Err(Error::invalid(
                "name",
                format!("must be a non-empty string, not {v}"),
            ))
        }
    };
    let segs = match (o.get("segments"), o.get("segments[]")) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "segments",
                "give segments or segments[], not both",
            ))
        }
        (Some(v), None) => Some(("segments", v)),
        (None, Some(v)) => Some(("segments[]", v)),
        (None, None) => None,
    };
    let segments = match segs {
        None => None,
        Some((_, Value::Null)) => Some(Vec::new()),
        Some((key, Value::Array(a))) => Some(
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_i64().filter(|i| *i > 0).ok_or_else(|| {
                        Error::invalid(
                            format!("{key}[{i}]"),
                            format!("{v} is not a positive integer id"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some((key, Value::Number(n))) => Some(vec![n
            .as_i64()
            .filter(|i| *i > 0)
            .ok_or_else(|| Error::invalid(key, format!("{n} is not a positive integer id")))?]),
        Some((key, v)) => {
            return Err(Error::invalid(
                key,
                format!("must be an array of ids, not {v}"),
            ))
        }
    };
    let state = match o.get("state") {
        None => None,
        Some(Value::String(s)) => Some(s.parse::<CampaignState>()?),
        Some(v) => {
            return Err(Error::invalid(
                "state",
                format!("must be a string, not {v}"),
            ))
        }
    };
    let when = match o.get("when") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(parse_instant(v, "when")?)),
    };
    let event_callback = match o.get("event_callback") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) if s.is_empty() => Some(None),
        Some(Value::String(s)) => Some(Some(check_callback_url(s)?)),
        Some(v) => {
            return Err(Error::invalid(
                "event_callback",
                format!("must be a URL string, not {v}"),
            ))
        }
    };
    Ok(CampaignFields {
        name,
        domain: opt_int(o, "domain")?,
        list: if creating { opt_int(o, "list")? } else { None },
        segments,
        state,
        when,
        event_callback,
    })
}

/// Checks a callback URL: absolute http(s) with a host.
pub fn check_callback_url(s: &str) -> Result<String> {
    let uri: axum::http::Uri = s
        .parse()
        .map_err(|e| Error::invalid("event_callback", format!("{s:?} is not a URL: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(s.to_string()),
        _ => Err(Error::invalid(
            "event_callback",
            format!("{s:?} must be an absolute http:// or https:// URL"),
        )),
    }
}

/// A sending's `schedule` / `draft`: `draft: true` keeps it a draft whatever `schedule` says.
pub fn parse_sending_schedule(o: &Map<String, Value>) -> Result<Schedule> {
    let draft = match o.get("draft") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::invalid(
                "draft",
                format!("must be true or false, not {v}"),
            ))
        }
    };
    if draft {
        Ok(Schedule::DRAFT)
    } else {
        Schedule::from_json(o.get("schedule"), "schedule")
    }
}

/// Resolves a sending's schedule at `now`; a time so far in the past that it would fail at
/// once is refused.
pub fn resolve_sending_schedule(
    schedule: &Schedule,
    cfg: &ScheduleConfig,
    now: i64,
) -> Result<Option<Timing>> {
    let timing = schedule.resolve(now, cfg, "schedule")?;
    if let Some(t) = timing {
        if t.fail_at < now {
            return Err(Error::invalid(
                "schedule.at",
                format!(
                    "{} is more than {} s in the past; it would fail at once",
                    format_instant(t.desired_at),
                    cfg.fail_after_secs
                ),
            ));
        }
    }
    Ok(timing)
}

/// Parses and checks a sending's `schedule` / `draft`; `draft: true` keeps it a draft, and a
/// time so far in the past that it would fail at once is refused.
pub fn sending_schedule(
    o: &Map<String, Value>,
    cfg: &ScheduleConfig,
    now: i64,
) -> Result<(Schedule, Option<Timing>)> {
    let schedule = parse_sending_schedule(o)?;
    let timing = resolve_sending_schedule(&schedule, cfg, now)?;
    Ok((schedule, timing))
}

/// The body of `POST /campaign/{id}/sendings`.
#[derive(Debug)]
pub struct SendingRequest {
    /// Audience, inline recipients and channels.
    pub recipients: Recipients,
    /// The parsed `schedule` / `draft`. Its error is reported only after the campaign was
    /// found (an unknown campaign is a 404 whatever the schedule says).
    pub schedule: Result<Schedule>,
}

/// Parses the body of `POST /campaign/{id}/sendings`.
pub fn sending_request(body: &[u8]) -> std::result::Result<SendingRequest, InputError> {
    let o = object(body)?;
    check_keys(&o, &SENDING_FIELDS)?;
    let recipients = Recipients::from_json(&o)?;
    Ok(SendingRequest {
        recipients,
        schedule: parse_sending_schedule(&o),
    })
}

/// The body of `PUT /campaign/{id}/sendings/{sid}`.
#[derive(Debug)]
pub struct SendingUpdate {
    /// `{"status": "cancelled"}`: cancel it (the schedule is then not used).
    pub cancel: bool,
    /// The parsed `schedule` / `draft`, reported after the sending was found.
    pub schedule: Result<Schedule>,
}

/// Parses the body of `PUT /campaign/{id}/sendings/{sid}`.
pub fn sending_update(body: &[u8]) -> std::result::Result<SendingUpdate, InputError> {
    let o = object(body)?;
    check_keys(&o, &SENDING_UPDATE_FIELDS)?;
    let cancel = match o.get("status") {
        None => false,
        Some(Value::String(s)) => match s.parse::<SendingStatus>()? {
            SendingStatus::Cancelled => true,
            other => {
                return Err(Error::invalid(
                    "status",
                    format!("only \"cancelled\" can be set by a client, not {other:?}; use schedule or draft to reschedule"),
                )
                .into())
            }
        },
        Some(v) => return Err(Error::invalid("status", format!("must be a string, not {v}")).into()),
    };
    Ok(SendingUpdate {
        cancel,
        schedule: parse_sending_schedule(&o),
    })
}

/// The body of `POST /audience` (its conditions are compiled against the configured fields
/// by the handler).
#[derive(Debug, Clone, PartialEq)]
pub struct AudienceRequest {
    /// The audience's name (not blank).
    pub name: String,
    /// Its conditions.
    pub conditions: Vec<Condition>,
}

/// Parses the body of `POST /audience`.
pub fn audience_request(body: &[u8]) -> std::result::Result<AudienceRequest, InputError> {
    let o = object(body)?;
    check_keys(&o, &AUDIENCE_FIELDS)?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| Error::invalid("name", "missing or empty"))?
        .to_string();
    let conditions: Vec<Condition> =
        serde_json::from_value(o.get("conditions").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::invalid("conditions", e.to_string()))?;
    Ok(AudienceRequest { name, conditions })
}
