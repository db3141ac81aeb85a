//! Provider callbacks (`POST /webhooks/callback`): the form body (`event`, `when`,
//! `email[n]`, `telephone[n]`…) and the callback URL's forwarded query string, through
//! `decode_callback`. Input: the query string, a newline, then the body.
//!
//! Asserted: the body's pairs written back as a form decode to the same result (ids
//! included: dedup relies on a redelivered callback getting the same ids); an accepted
//! callback gives exactly one row per `email`/`email[n]` value, in order, with that email;
//! every row is valid and, produced to Kafka as `to_event` JSON, decodes to the same row;
//! bound to a workspace (`decode_callback_for`), every accepted row is that workspace's.
#![no_main]

use broadside_fuzz::decode::{decode_event, valid_workspace_id};
use broadside_fuzz::intake::{
    decode_callback, decode_callback_for, is_email_key, query_pairs, CallbackRejection,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (query, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    // axum hands the handler the query as text.
    let query = String::from_utf8_lossy(query);
    let query = query_pairs(Some(&query));
    let result = decode_callback(body, &query);
    if let Ok(rows) = decode_callback_for(body, &query, "fuzz") {
        assert!(rows.iter().all(|r| r.workspace_id == "fuzz"));
    }

    let body_pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let rewritten = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&body_pairs)
        .finish();
    assert_eq!(decode_callback(rewritten.as_bytes(), &query), result);

    let all = || {
        body_pairs
            .iter()
            .chain(&query)
            .filter(|(k, _)| k != "token")
    };
    match result {
        Ok(rows) => {
            let emails: Vec<&str> = all()
                .filter(|(k, _)| is_email_key(k))
                .map(|(_, v)| v.trim())
                .collect();
            assert_eq!(rows.len(), emails.len(), "one row per email");
            for (row, email) in rows.iter().zip(&emails) {
                assert_eq!(row.email, *email);
                assert!(valid_workspace_id(&row.workspace_id));
                assert!(!row.event_id.trim().is_empty(), "{:?}", row.event_id);
                let json = serde_json::to_vec(&row.to_event()).unwrap();
                match decode_event(&json) {
                    Ok(again) => assert_eq!(again.rows(), std::slice::from_ref(row)),
                    Err(e) => panic!(
                        "{row:?} produced as {} is refused: {e}",
                        String::from_utf8_lossy(&json)
                    ),
                }
            }
        }
        Err(CallbackRejection::MissingEvent) => assert!(!all().any(|(k, _)| k == "event")),
        Err(CallbackRejection::Invalid(reason)) => assert!(!reason.code().is_empty()),
        Err(CallbackRejection::ForeignWorkspace(_)) => unreachable!("no workspace is bound"),
    }
});
