//! What the webhook intake accepts, parsed without I/O: the provider callback form
//! (`POST /webhooks/callback`) and JSON event batches (`POST /webhooks/events`). The HTTP
//! side (auth, dedup, delivery) is in [`crate::webhook`].
//!
//! This file uses no module of the crate but [`crate::decode`] and neither DataFusion, axum
//! nor librdkafka, so the fuzz targets compile it on its own (`fuzz/src/lib.rs`); keep it so.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::decode::{decode_event, DeadLetterReason, EventRow};

/// The (name, value) pairs of a query string or form body (`None`: no `?`). Invalid UTF-8
/// and percent-escapes are decoded lossily, as browsers and providers expect.
pub fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    form_pairs(q.unwrap_or("").as_bytes())
}

fn form_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// True for the callback's recipient fields: `email`, `email[0]`, `email[]`…
pub fn is_email_key(k: &str) -> bool {
    k == "email" || (k.starts_with("email[") && k.ends_with(']'))
}

/// True for the callback's SMS recipient fields: `telephone`, `telephone[0]`…
pub fn is_telephone_key(k: &str) -> bool {
    k == "telephone" || (k.starts_with("telephone[") && k.ends_with(']'))
}

/// Why a callback was refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackRejection {
    /// Neither the body nor the query string has `event`.
    MissingEvent,
    /// The callback does not decode ([`decode_event`]'s reason).
    Invalid(DeadLetterReason),
    /// The callback names a workspace other than the credential's (the value given).
    ForeignWorkspace(String),
}

/// The callback as the JSON callback shape ([`crate::decode`]), so it goes through the one
/// decoder: body parameters first, the forwarded query string fills in what the body lacks;
/// every `email[n]` (and `telephone[n]`) collected into one array; `token` dropped.
pub fn callback_record(body: &[u8], query: &[(String, String)]) -> Map<String, Value> {
    let mut obj = Map::new();
    let mut emails = Vec::new();
    let mut phones = Vec::new();
    for (k, v) in form_pairs(body).into_iter().chain(query.iter().cloned()) {
        if k == "token" {
            continue;
        }
        if is_email_key(&k) {
            emails.push(Value::String(v));
        } else if is_telephone_key(&k) {
            phones.push(Value::String(v));
        } else if !obj.contains_key(&k) {
            obj.insert(k, Value::String(v));
        }
    }
    if !emails.is_empty() {
        obj.insert("email".into(), Value::Array(emails));
    }
    if !phones.is_empty() {
        obj.insert("telephone".into(), Value::Array(phones));
    }
    obj
}

/// Decodes a provider callback (form body plus the callback URL's query pairs): one row per
/// email, or the reason it is refused.
pub fn decode_callback(
    body: &[u8],
    query: &[(String, String)],
) -> Result<Vec<EventRow<'static>>, CallbackRejection> {
    decode_record(callback_record(body, query))
}

/// [`decode_callback`] for a credential bound to `workspace`: a callback without
/// `workspace_id` is filed under `workspace`, one naming another workspace is refused.
pub fn decode_callback_for(
    body: &[u8],
    query: &[(String, String)],
    workspace: &str,
) -> Result<Vec<EventRow<'static>>, CallbackRejection> {
    let mut obj = callback_record(body, query);
    match obj.get("workspace_id") {
        None => {
            obj.insert("workspace_id".into(), Value::String(workspace.into()));
        }
        Some(Value::String(w)) if w.trim() != workspace && !w.trim().is_empty() => {
            // A value the decoder refuses anyway (traversal, separators) keeps its reason.
            if crate::decode::valid_workspace_id(w.trim()) {
                return Err(CallbackRejection::ForeignWorkspace(w.clone()));
            }
        }
        Some(_) => {}
    }
    decode_record(obj)
}

fn decode_record(obj: Map<String, Value>) -> Result<Vec<EventRow<'static>>, CallbackRejection> {
    if !obj.contains_key("event") {
        return Err(CallbackRejection::MissingEvent);
    }
    let bytes = serde_json::to_vec(&obj).expect("a map of strings serialises");
    let decoded = decode_event(&bytes).map_err(CallbackRejection::Invalid)?;
    Ok(decoded
        .rows()
        .iter()
        .cloned()
        .map(EventRow::into_owned)
        .collect())
}

/// Why a JSON batch was refused (`400`). All or nothing: no row of a refused batch is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRejection {
    /// The body starts with `[` but is not a JSON array.
    MalformedArray {
        /// The parser's message.
        detail: String,
    },
    /// A line of an NDJSON body (0-based, counting blank lines) is not JSON.
    MalformedLine {
        /// The line.
        index: usize,
        /// The parser's message.
        detail: String,
    },
    /// Items that do not decode, with their positions, in order.
    InvalidItems(Vec<(usize, DeadLetterReason)>),
    /// Items naming a workspace other than the credential's: positions and the value given.
    /// Takes precedence over [`BatchRejection::InvalidItems`].
    ForeignWorkspace(Vec<(usize, String)>),
}

/// Decodes a JSON batch: an array of events, one object, or NDJSON, each item in either
/// accepted shape. An empty body is an empty batch.
pub fn decode_batch(body: &[u8]) -> Result<Vec<EventRow<'static>>, BatchRejection> {
    let items = batch_items(body)?;
    let mut rows = Vec::new();
    let mut invalid = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match decode_event(item.get().as_bytes()) {
            Ok(d) => rows.extend(d.rows().iter().cloned().map(EventRow::into_owned)),
            Err(r) => invalid.push((i, r)),
        }
    }
    if invalid.is_empty() {
        Ok(rows)
    } else {
        Err(BatchRejection::InvalidItems(invalid))
    }
}

/// [`decode_batch`] for a credential bound to `workspace`: an item without `workspace_id` is
/// filed under `workspace`; items naming another (valid) workspace refuse the whole batch
/// with [`BatchRejection::ForeignWorkspace`]. Nothing of a refused batch is kept.
pub fn decode_batch_for(
    body: &[u8],
    workspace: &str,
) -> Result<Vec<EventRow<'static>>, BatchRejection> {
    let items = batch_items(body)?;
    let mut rows = Vec::new();
    let mut invalid = Vec::new();
    let mut foreign = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let decoded = match decode_event(item.get().as_bytes()) {
            Err(DeadLetterReason::MissingField {
                field: "workspace_id",
            }) => with_workspace(item.get(), workspace).and_then(|b| {
                decode_event(&b).map(|d| {
                    d.rows()
                        .iter()
                        .cloned()
                        .map(EventRow::into_owned)
                        .collect::<Vec<_>>()
                })
            }),
            other => other.map(|d| d.rows().iter().cloned().map(EventRow::into_owned).collect()),
        };
        match decoded {
            Ok(item_rows) => match item_rows.iter().find(|r| r.workspace_id != workspace) {
                Some(r) => foreign.push((i, r.workspace_id.to_string())),
                None => rows.extend(item_rows),
            },
            Err(r) => invalid.push((i, r)),
        }
    }
    if !foreign.is_empty() {
        Err(BatchRejection::ForeignWorkspace(foreign))
    } else if !invalid.is_empty() {
        Err(BatchRejection::InvalidItems(invalid))
    } else {
        Ok(rows)
    }
}

/// The item with `"workspace_id": workspace` added (it had none, or `null`).
fn with_workspace(item: &str, workspace: &str) -> Result<Vec<u8>, DeadLetterReason> {
    let mut obj: Map<String, Value> =
        serde_json::from_str(item).map_err(|e| DeadLetterReason::WrongType {
            detail: e.to_string(),
        })?;
    obj.insert("workspace_id".into(), Value::String(workspace.into()));
    Ok(serde_json::to_vec(&obj).expect("a JSON object serialises"))
}

/// The items of a batch body, not yet decoded.
fn batch_items(body: &[u8]) -> Result<Vec<Box<RawValue>>, BatchRejection> {
    let trimmed = body.trim_ascii();
    let items: Vec<Box<RawValue>> = if trimmed.starts_with(b"[") {
        serde_json::from_slice(trimmed).map_err(|e| BatchRejection::MalformedArray {
            detail: e.to_string(),
        })?
    } else {
        let mut v = Vec::new();
        for (index, line) in trimmed.split(|b| *b == b'\n').enumerate() {
            if line.trim_ascii().is_empty() {
                continue;
            }
            v.push(
                serde_json::from_slice(line).map_err(|e| BatchRejection::MalformedLine {
                    index,
                    detail: e.to_string(),
                })?,
            );
        }
        v
    };
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        query_pairs(Some(q))
    }

    #[test]
    fn callback_gives_one_row_per_email_with_the_query_filling_in() {
        let rows = decode_callback(
            b"event=bounced&when=1772359200&email%5B0%5D=ann%40example.com&email%5B1%5D=bob%40example.com&campaign_id=body",
            &pairs("workspace_id=acme&campaign_id=42&token=secret"),
        )
        .unwrap();
        let emails: Vec<&str> = rows.iter().map(|r| r.email.as_ref()).collect();
        assert_eq!(emails, ["ann@example.com", "bob@example.com"]);
        assert!(rows.iter().all(|r| r.campaign_id == "body"));
        assert_ne!(rows[0].event_id, rows[1].event_id);
    }

    #[test]
    fn callback_without_event_is_refused() {
        assert_eq!(
            decode_callback(
                b"when=1&email=a%40b.co",
                &pairs("workspace_id=w&campaign_id=c")
            ),
            Err(CallbackRejection::MissingEvent)
        );
    }

    #[test]
    fn batch_names_every_bad_item() {
        let body = br#"[{"event_id":"x","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1},
            {"event_id":"y"},
            {"event_id":"z","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"nope","ts":1}]"#;
        match decode_batch(body) {
            Err(BatchRejection::InvalidItems(items)) => {
                assert_eq!(items.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_batch(b"{\"event_id\":1}\n{oops"),
            Err(BatchRejection::MalformedLine { index: 1, .. })
        ));
        assert_eq!(decode_batch(b"  \n "), Ok(Vec::new()));
    }

    #[test]
    fn bound_batch_fills_in_and_refuses_other_workspaces() {
        let item = |ws: &str| {
            format!(
                r#"{{"event_id":"e{ws}","campaign_id":"c","email":"a@b.co","event_type":"complained","ts":1{ws}}}"#
            )
        };
        let named = |id: &str, ws: &str| {
            format!(
                r#"{{"event_id":"{id}","workspace_id":"{ws}","campaign_id":"c","email":"a@b.co","event_type":"unsubscribed","ts":1}}"#
            )
        };
        let rows = decode_batch_for(
            format!("[{},{}]", item(""), named("a", "acme")).as_bytes(),
            "acme",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.workspace_id == "acme"));
        // `null` is no workspace either.
        let null = r#"{"event_id":"n","workspace_id":null,"campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1}"#;
        assert_eq!(
            decode_batch_for(null.as_bytes(), "acme").unwrap()[0].workspace_id,
            "acme"
        );
        let body = format!(
            "{}\n{}\n{}",
            named("a", "acme"),
            named("b", "rival"),
            named("c", "rival")
        );
        assert_eq!(
            decode_batch_for(body.as_bytes(), "acme"),
            Err(BatchRejection::ForeignWorkspace(vec![
                (1, "rival".into()),
                (2, "rival".into())
            ]))
        );
        // Traversal-looking ids are invalid before they are foreign.
        for bad in ["../acme", "acme/../rival", ".acme", "acme/x"] {
            match decode_batch_for(named("t", bad).as_bytes(), "acme") {
                Err(BatchRejection::InvalidItems(items)) => {
                    assert_eq!(items[0].1.code(), "invalid_workspace_id", "{bad}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn bound_callback_fills_in_and_refuses_other_workspaces() {
        let body = b"event=complained&when=1772359200&email=ann%40example.com";
        let rows = decode_callback_for(body, &pairs("campaign_id=42"), "acme").unwrap();
        assert_eq!(rows[0].workspace_id, "acme");
        assert_eq!(
            decode_callback_for(body, &pairs("workspace_id=rival&campaign_id=42"), "acme"),
            Err(CallbackRejection::ForeignWorkspace("rival".into()))
        );
        assert!(matches!(
            decode_callback_for(
                body,
                &pairs("workspace_id=..%2Facme&campaign_id=42"),
                "acme"
            ),
            Err(CallbackRejection::Invalid(
                DeadLetterReason::InvalidWorkspaceId { .. }
            ))
        ));
        assert_eq!(
            decode_callback_for(body, &pairs("workspace_id=acme&campaign_id=42"), "acme").unwrap()
                [0]
            .workspace_id,
            "acme"
        );
    }
}
