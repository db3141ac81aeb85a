//! The campaign API's outside input (`campaigns/src/api_input.rs`, what the handlers of
//! `campaigns/src/api.rs` call): the `workspace_id` header and query string, and the JSON
//! bodies of `POST /campaign`, `PUT /campaign/{id}`, `POST /campaign/{id}/sendings`,
//! `PUT /campaign/{id}/sendings/{sid}` and `POST /audience`.
//!
//! Input: the first byte picks the route, the bytes up to the first `\n` are the query
//! string, the rest is the body.
//!
//! Asserted besides "no panic": a workspace header is accepted exactly when it is 1–64
//! letters, digits, `_` or `-` after trimming; the query is refused exactly when one of its
//! `workspace_id` values differs from the header's, with a message naming the parameter and
//! the value, and the same pairs re-encoded give the same answer; a body is a 400 exactly
//! when it is not a JSON object; every field error names the field (a key of the body or of
//! the route, possibly with `.sub` / `[i]`) and displays as `field: message`; an accepted
//! campaign written back as JSON (with `when` as ISO 8601 and as unix seconds) parses to the
//! same fields; an accepted sending's recipients survive their stored JSON form, its schedule
//! resolves to `prepare_at <= desired_at < fail_at` not in the past, and `draft: true` is a
//! draft; a cancel is exactly `status` = cancelled; an accepted audience has a non-blank name
//! and conditions that survive their JSON form.
#![no_main]

use broadside_campaigns::api_input::{
    audience_request, campaign_request, check_query, resolve_sending_schedule, sending_request,
    sending_update, workspace_id, InputError, AUDIENCE_FIELDS, CAMPAIGN_FIELDS, SENDING_FIELDS,
    SENDING_UPDATE_FIELDS,
};
use broadside_campaigns::audience::{Condition, Recipients};
use broadside_campaigns::error::Error;
use broadside_campaigns::schedule::{format_instant, Schedule, ScheduleConfig, When};
use broadside_campaigns::state::SendingStatus;
use broadside_campaigns::store::CampaignFields;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// The API's clock in this target (2025-12-02T12:00:00Z).
const NOW: i64 = 1_764_676_800;

fn check_workspace(header: &str) {
    match workspace_id(header) {
        Some(w) => {
            assert_eq!(w, header.trim());
            assert!((1..=64).contains(&w.len()), "{w:?}");
            assert!(w
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
        None => {
            let t = header.trim();
            assert!(
                t.is_empty()
                    || t.len() > 64
                    || !t
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{header:?} refused"
            );
        }
    }
}

fn check_query_string(query: &str) {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let values: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "workspace_id")
        .map(|(_, v)| v.as_str())
        .collect();
    // The header as a client would send it: the first value, or a plain one.
    let header = values.first().copied().unwrap_or("ws1");
    check_workspace(header);
    let Some(ws) = workspace_id(header) else {
        return;
    };
    let answer = check_query(Some(query), ws);
    match &answer {
        Ok(()) => assert!(values.iter().all(|v| *v == ws), "{query:?} accepted"),
        Err(m) => {
            let differing = values
                .iter()
                .find(|v| **v != ws)
                .expect("a differing value");
            assert!(m.starts_with("workspace_id query parameter "), "{m}");
            assert!(m.contains(&format!("{differing:?}")), "{m}");
        }
    }
    let again = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&pairs)
        .finish();
    assert_eq!(
        check_query(Some(&again), ws),
        answer,
        "{query:?} vs {again:?}"
    );
    assert_eq!(check_query(None, ws), Ok(()));
}

/// A field error names a field of the body or of the route (possibly `key.sub` / `key[i]`).
fn check_error(e: &InputError, body: &[u8], route_fields: &[&str]) {
    let parsed = serde_json::from_slice::<Value>(body);
    match e {
        InputError::Malformed(m) => {
            assert!(
                !matches!(parsed, Ok(Value::Object(_))),
                "an object refused as malformed: {m}"
            );
            assert!(m.starts_with("body "), "{m}");
        }
        InputError::Field(err) => {
            let Ok(Value::Object(o)) = &parsed else {
                panic!("a field error for a body that is not an object: {err}");
            };
            let Error::Invalid { field, message } = err else {
                panic!("not a field error: {err:?}");
            };
            assert!(!message.is_empty(), "{field}");
            assert_eq!(err.to_string(), format!("{field}: {message}"));
            let named = o
                .keys()
                .map(String::as_str)
                .chain(route_fields.iter().copied())
                .any(|k| {
                    field == k
                        || field
                            .strip_prefix(k)
                            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
                });
            assert!(named, "error names {field:?}, not a field of {o:?}");
        }
    }
}

fn fields_json(f: &CampaignFields, when_as_number: bool) -> Value {
    let mut o = Map::new();
    let opt = |v: Option<i64>| v.map(Value::from).unwrap_or(Value::Null);
    if let Some(n) = &f.name {
        o.insert("name".into(), json!(n));
    }
    if let Some(d) = f.domain {
        o.insert("domain".into(), opt(d));
    }
    if let Some(l) = f.list {
        o.insert("list".into(), opt(l));
    }
    if let Some(s) = &f.segments {
        o.insert("segments".into(), json!(s));
    }
    if let Some(s) = f.state {
        o.insert("state".into(), json!(s.as_str()));
    }
    if let Some(w) = f.when {
        let v = match w {
            None => Value::Null,
            Some(t) if when_as_number => json!(t),
            Some(t) => json!(format_instant(t)),
        };
        o.insert("when".into(), v);
    }
    if let Some(c) = &f.event_callback {
        o.insert("event_callback".into(), json!(c));
    }
    Value::Object(o)
}

fn check_campaign(body: &[u8], creating: bool) {
    let fields: &[&str] = if creating {
        &CAMPAIGN_FIELDS
    } else {
        &CAMPAIGN_FIELDS[..7]
    };
    let f = match campaign_request(body, creating) {
        Ok(f) => f,
        Err(e) => return check_error(&e, body, fields),
    };
    if let Some(n) = &f.name {
        assert!(!n.is_empty() && n.trim() == n, "{n:?}");
    }
    for id in [f.domain, f.list].into_iter().flatten().flatten() {
        assert!(id > 0);
    }
    if !creating {
        assert_eq!(f.list, None);
    }
    if let Some(s) = &f.segments {
        assert!(s.iter().all(|i| *i > 0), "{s:?}");
    }
    for when_as_number in [false, true] {
        let again = fields_json(&f, when_as_number).to_string();
        match campaign_request(again.as_bytes(), creating) {
            Ok(g) => assert_eq!(g, f, "{again}"),
            Err(e) => panic!("{again} refused: {e}"),
        }
    }
    if let Some(Some(t)) = f.when {
        assert_eq!(
            broadside_campaigns::schedule::parse_instant_text(&format_instant(t), "when").ok(),
            Some(t)
        );
    }
}

fn check_schedule(s: &Schedule, o: &Map<String, Value>) {
    if o.get("draft") == Some(&Value::Bool(true)) {
        assert_eq!(*s, Schedule::DRAFT);
    }
    let cfg = ScheduleConfig::default();
    match resolve_sending_schedule(s, &cfg, NOW) {
        Ok(None) => assert_eq!(s.when, When::Draft),
        Ok(Some(t)) => {
            assert!(
                t.prepare_at <= t.desired_at && t.desired_at < t.fail_at,
                "{t:?}"
            );
            assert!(t.fail_at >= NOW, "{t:?}");
        }
        Err(Error::Invalid { field, .. }) => assert!(field.starts_with("schedule"), "{field}"),
        Err(e) => panic!("{e:?}"),
    }
}

fn object_of(body: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => o,
        _ => panic!("accepted a body that is not an object"),
    }
}

fn check_sending(body: &[u8]) {
    let r = match sending_request(body) {
        Ok(r) => r,
        Err(e) => return check_error(&e, body, &SENDING_FIELDS),
    };
    let o = object_of(body);
    assert!(!r.recipients.channels_preference.is_empty());
    // The store keeps recipients as their JSON; what it reads back must be the same.
    let stored = serde_json::to_string(&r.recipients).unwrap();
    assert_eq!(
        serde_json::from_str::<Recipients>(&stored).unwrap(),
        r.recipients,
        "{stored}"
    );
    match &r.schedule {
        Ok(s) => {
            check_schedule(s, &o);
            // Written back as a request in the shape the API answers with (`schedule` as
            // `sending_json` writes it, recipients as stored), it is the same sending.
            let mut again = serde_json::to_value(&r.recipients).unwrap();
            match s.to_json() {
                Value::Null => again["draft"] = json!(true),
                v => again["schedule"] = v,
            }
            let text = again.to_string();
            match sending_request(text.as_bytes()) {
                Ok(r2) => {
                    assert_eq!(r2.recipients, r.recipients, "{text}");
                    assert_eq!(r2.schedule.ok().as_ref(), Some(s), "{text}");
                }
                Err(e) => panic!("{text} refused: {e}"),
            }
        }
        Err(e) => check_error(&InputError::Field(clone_err(e)), body, &SENDING_FIELDS),
    }
}

fn check_sending_update(body: &[u8]) {
    let u = match sending_update(body) {
        Ok(u) => u,
        Err(e) => return check_error(&e, body, &SENDING_UPDATE_FIELDS),
    };
    let o = object_of(body);
    let status = o.get("status").and_then(Value::as_str);
    assert_eq!(
        u.cancel,
        status.is_some_and(|s| s.parse::<SendingStatus>().ok() == Some(SendingStatus::Cancelled))
    );
    match &u.schedule {
        Ok(s) => check_schedule(s, &o),
        Err(e) => check_error(
            &InputError::Field(clone_err(e)),
            body,
            &SENDING_UPDATE_FIELDS,
        ),
    }
}

fn check_audience(body: &[u8]) {
    let a = match audience_request(body) {
        Ok(a) => a,
        Err(e) => return check_error(&e, body, &AUDIENCE_FIELDS),
    };
    assert!(!a.name.trim().is_empty());
    let text = serde_json::to_string(&a.conditions).unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<Condition>>(&text).unwrap(),
        a.conditions,
        "{text}"
    );
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::Invalid { field, message } => Error::invalid(field.clone(), message.clone()),
        other => panic!("not a field error: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, rest)) = data.split_first() else {
        return;
    };
    let (query, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    check_query_string(&String::from_utf8_lossy(query));
    match route % 5 {
        0 => check_campaign(body, true),
        1 => check_campaign(body, false),
        2 => check_sending(body),
        3 => check_sending_update(body),
        _ => check_audience(body),
    }
});
