//! The campaign API through its router (tower `oneshot`) over a temporary SQLite file.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use broadside_campaigns::api::{campaign_router, Access, CampaignApiConfig, TokenGrant};
use broadside_campaigns::audience::FieldMap;
use broadside_campaigns::schedule::ScheduleConfig;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const T0: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z

fn app(dir: &tempfile::TempDir, access: Access) -> Router {
    campaign_router(CampaignApiConfig {
        store: dir.path().join("campaigns.db"),
        schedule: ScheduleConfig::default(),
        fields: FieldMap::member_defaults(),
        access,
        clock: Arc::new(|| T0),
        ready_check: None,
        send_configs: None,
    })
    .unwrap()
}

async fn call_as(
    app: &Router,
    ws: Option<&str>,
    token: Option<&str>,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ws) = ws {
        req = req.header("workspace_id", ws);
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    call_as(app, Some("ws1"), None, method, uri, body.as_deref()).await
}

#[tokio::test]
async fn campaign_lifecycle_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (s, a) = call(
        &app,
        "POST",
        "/audience",
        Some(
            json!({"name": "Oslo", "conditions": [{"condition_group": "member_properties",
                    "field": "city", "operator": "match", "value": "Oslo"}]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let (s, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "Spring", "domain": 3, "list": 7, "segments[]": [a["id"]],
                    "when": "2023-11-20T10:00:00+01:00", "event_callback": "http://cb.example/hook?k=v"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    // its `when` scheduled its default sending, to the list (and segment), which made it
    // SCHEDULED
    assert_eq!(c["state"], "SCHEDULED");
    assert_eq!(c["when"], "2023-11-20T09:00:00Z");
    assert_eq!(c["segments"], json!([a["id"]]));
    assert_eq!(c["spec"], Value::Null);
    assert_eq!(c["allowed_states"], json!(["DRAFT", "READY", "CANCELLED"]));
    let id = c["id"].as_i64().unwrap();
    let url = format!("/campaign/{id}");
    let (s, sendings) = call(&app, "GET", &format!("{url}/sendings"), None).await;
    assert_eq!(s, StatusCode::OK);
    let sendings = sendings.as_array().unwrap().clone();
    assert_eq!(sendings.len(), 1, "{sendings:?}");
    assert_eq!(c["default_sending"], sendings[0]["id"]);
    assert_eq!(
        (
            sendings[0]["status"].as_str(),
            sendings[0]["desired_at"].as_str(),
            &sendings[0]["audience"]
        ),
        (
            Some("scheduled"),
            Some("2023-11-20T09:00:00Z"),
            &Value::Null
        )
    );

    let (s, got) = call(&app, "GET", &url, None).await;
    assert_eq!((s, got.clone()), (StatusCode::OK, c.clone()));

    let (s, v) = call(&app, "PUT", &url, Some(json!({"state": "READY"}))).await;
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::OK, Some("READY")),
        "{v}"
    );
    // READY may not go back to DRAFT directly, and SENDING is the scheduler's
    for to in ["DRAFT", "SENDING", "DONE"] {
        let (s, v) = call(&app, "PUT", &url, Some(json!({"state": to}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{to}: {v}");
        assert_eq!(v["state"], "READY");
        assert_eq!(v["requested"], to);
        assert_eq!(v["allowed"], json!(["SCHEDULED", "CANCELLED"]));
    }
    let (s, v) = call(
        &app,
        "PUT",
        &url,
        Some(json!({"name": "Spring 2", "when": 1_700_100_000, "segments": []})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["name"].as_str(),
            v["when_unix"].as_i64(),
            v["segments"].clone()
        ),
        (Some("Spring 2"), Some(1_700_100_000), json!([]))
    );
    // the default sending moved with it
    let sid = c["default_sending"].as_i64().unwrap();
    let (_, sd) = call(&app, "GET", &format!("{url}/sendings/{sid}"), None).await;
    assert_eq!(sd["desired_at"], "2023-11-16T02:00:00Z", "{sd}");
    // and `when: null` cancels it
    let (s, v) = call(&app, "PUT", &url, Some(json!({"when": null}))).await;
    assert_eq!(
        (s, &v["default_sending"]),
        (StatusCode::OK, &Value::Null),
        "{v}"
    );
    let (_, sd) = call(&app, "GET", &format!("{url}/sendings/{sid}"), None).await;
    assert_eq!(sd["status"], "cancelled", "{sd}");

    let (s, list) = call(&app, "GET", "/campaign", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (s, v) = call(&app, "DELETE", &url, None).await;
    assert_eq!((s, v["id"].as_i64()), (StatusCode::OK, Some(id)));
    let (s, v) = call(&app, "GET", &url, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"], format!("campaign {id} not found"));
}

/// What a campaign's fields must resolve to: one stored segment, a list for `when`.
#[tokio::test]
async fn segments_and_when_that_sends_cannot_honour_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    for (body, field, words) in [
        (
            json!({"name": "x", "list": 7, "segments": [1, 2]}),
            "segments[1]",
            "at most one segment",
        ),
        (
            json!({"name": "x", "list": 7, "segments": [9]}),
            "segments[0]",
            "audience 9 does not exist in this workspace",
        ),
        (
            json!({"name": "x", "when": T0 + 3600}),
            "when",
            "the campaign has no list",
        ),
        (
            json!({"name": "x", "list": 7, "when": T0 - 86_400}),
            "when",
            "in the past",
        ),
    ] {
        let (s, v) = call(&app, "POST", "/campaign", Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{v}");
    }
    // nothing was created by the refusals
    let (_, list) = call(&app, "GET", "/campaign", None).await;
    assert_eq!(list, json!([]));
    // an audience of another workspace is not a segment here
    let (s, a) = call_as(
        &app,
        Some("ws2"),
        None,
        "POST",
        "/audience",
        Some(r#"{"name": "a", "conditions": []}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let (s, v) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "x", "list": 7, "segments": [a["id"]]})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("segments[0]")),
        "{v}"
    );
    // a campaign without a send-capable process cannot take a send configuration
    let (_, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "y", "list": 7})),
    )
    .await;
    let (s, v) = call_as(
        &app,
        Some("ws1"),
        None,
        "PUT",
        &format!("/campaign/{}/spec", c["id"]),
        Some("channel = \"email\""),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("spec")),
        "{v}"
    );
    let (s, v) = call(&app, "GET", &format!("/campaign/{}/spec", c["id"]), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn a_cancelled_campaign_is_final() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (_, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "x", "state": "SCHEDULED"})),
    )
    .await;
    let url = format!("/campaign/{}", c["id"]);
    let (s, v) = call(&app, "PUT", &url, Some(json!({"state": "CANCELLED"}))).await;
    assert_eq!(
        (s, v["allowed_states"].clone()),
        (StatusCode::OK, json!([]))
    );
    let (s, v) = call(&app, "PUT", &url, Some(json!({"state": "DRAFT"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["allowed"], json!([]));
    let (s, _) = call(&app, "PUT", &url, Some(json!({"name": "renamed"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "y", "state": "DONE"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn bad_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let table: Vec<(Value, &str, &str)> = vec![
        (json!({}), "name", "name: missing or empty"),
        (
            json!({"name": "  "}),
            "name",
            "name: must be a non-empty string",
        ),
        (
            json!({"name": "x", "when": "tomorrow"}),
            "when",
            "when: \"tomorrow\" is neither",
        ),
        (
            json!({"name": "x", "when": "2023-11-20T10:00:00"}),
            "when",
            "when: \"2023-11-20T10:00:00\" has no UTC offset",
        ),
        (
            json!({"name": "x", "segments": [1, "two"]}),
            "segments[1]",
            "segments[1]: \"two\" is not a positive integer id",
        ),
        (
            json!({"name": "x", "domain": -4}),
            "domain",
            "domain: -4 is not a positive integer id",
        ),
        (
            json!({"name": "x", "state": "LIVE"}),
            "state",
            "state: unknown value \"LIVE\"",
        ),
        (
            json!({"name": "x", "event_callback": "ftp://cb"}),
            "event_callback",
            "event_callback: \"ftp://cb\" must be an absolute http",
        ),
        (
            json!({"name": "x", "colour": "red"}),
            "colour",
            "colour: unknown field",
        ),
    ];
    for (body, field, msg) in table {
        let (s, v) = call(&app, "POST", "/campaign", Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().starts_with(msg), "{body}: {v}");
    }
    let (s, v) = call_as(
        &app,
        Some("ws1"),
        None,
        "POST",
        "/campaign",
        Some("{\"name\": "),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .starts_with("body is not valid JSON"));
    let (s, _) = call_as(&app, Some("ws1"), None, "POST", "/campaign", Some("[1]")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "x", "list": 3})),
    )
    .await;
    let (s, v) = call(
        &app,
        "PUT",
        &format!("/campaign/{}", c["id"]),
        Some(json!({"list": 4})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("list"))
    );
}

#[tokio::test]
async fn workspaces_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cret-token";
    let hash = broadside_campaigns::api::token_hash(token);
    let grants = vec![TokenGrant {
        name: "ops".into(),
        sha256: hash,
        workspaces: vec!["ws1".into()],
    }];
    let app = app(&dir, Access::Tokens(grants));
    let body = Some(r#"{"name": "x"}"#);
    let (s, _) = call_as(&app, Some("ws1"), None, "POST", "/campaign", body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call_as(&app, Some("ws1"), Some("wrong"), "POST", "/campaign", body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call_as(&app, Some("ws2"), Some(token), "POST", "/campaign", body).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call_as(&app, None, Some(token), "POST", "/campaign", body).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, c) = call_as(&app, Some("ws1"), Some(token), "POST", "/campaign", body).await;
    assert_eq!(s, StatusCode::CREATED);

    // another workspace never sees it, even with an open API
    let open = self::app(&dir, Access::Open);
    let url = format!("/campaign/{}", c["id"]);
    let (s, _) = call_as(&open, Some("ws2"), None, "GET", &url, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call_as(&open, Some("ws1"), None, "GET", &url, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn ready_is_refused_with_what_is_missing_until_the_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    // The check the binary plugs in looks for the campaign's spec; this one for a marker file.
    let markers = dir.path().to_path_buf();
    let check: broadside_campaigns::api::ReadyCheck = Arc::new(move |c| {
        let marker = markers.join(format!("{}.ok", c.id));
        match marker.is_file() {
            true => vec![],
            false => vec![format!("no marker {}", marker.display())],
        }
    });
    let app = campaign_router(CampaignApiConfig {
        store: dir.path().join("campaigns.db"),
        schedule: ScheduleConfig::default(),
        fields: FieldMap::member_defaults(),
        access: Access::Open,
        clock: Arc::new(|| T0),
        ready_check: Some(check),
        send_configs: None,
    })
    .unwrap();
    let (s, v) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "x", "state": "READY"})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("state")),
        "{v}"
    );
    let (_, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "x", "state": "SCHEDULED"})),
    )
    .await;
    let url = format!("/campaign/{}", c["id"]);
    let ready = Some(json!({"state": "READY"}));
    let (s, v) = call(&app, "PUT", &url, ready.clone()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let marker = dir.path().join(format!("{}.ok", c["id"]));
    assert_eq!(
        v["missing"],
        json!([format!("no marker {}", marker.display())])
    );
    assert_eq!(v["requested"], "READY");
    // refused, so still editable where it was
    let (_, now) = call(&app, "GET", &url, None).await;
    assert_eq!(now["state"], "SCHEDULED");
    std::fs::write(&marker, "").unwrap();
    let (s, v) = call(&app, "PUT", &url, ready).await;
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::OK, Some("READY")),
        "{v}"
    );
    // other edits of a READY campaign are not checked again
    std::fs::remove_file(&marker).unwrap();
    let (s, v) = call(&app, "PUT", &url, Some(json!({"name": "y"}))).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("y")), "{v}");
}

#[tokio::test]
async fn a_scheduled_sending_moves_a_draft_campaign_to_scheduled() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (_, c) = call(&app, "POST", "/campaign", Some(json!({"name": "x"}))).await;
    let url = format!("/campaign/{}", c["id"]);
    let state = || async { call(&app, "GET", &url, None).await.1["state"].clone() };
    // a draft sending (no schedule) leaves the campaign a draft
    let body = json!({"recipients": [{"email": "a@b.no"}]});
    let (s, _) = call(&app, "POST", &format!("{url}/sendings"), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(state().await, "DRAFT");
    let body = json!({"schedule": {"type": "immediate"}, "recipients": [{"email": "a@b.no"}]});
    let (s, sd) = call(&app, "POST", &format!("{url}/sendings"), Some(body)).await;
    assert_eq!(
        (s, sd["status"].as_str()),
        (StatusCode::CREATED, Some("scheduled"))
    );
    assert_eq!(state().await, "SCHEDULED");
    // the sending has not been prepared: no decisions, no send run yet
    let (_, one) = call(&app, "GET", &format!("{url}/sendings/{}", sd["id"]), None).await;
    assert_eq!(one["decisions"], Value::Null, "{one}");
    assert_eq!(one["run_id"], Value::Null, "{one}");
    assert_eq!(one["links"], Value::Null, "{one}");
    assert_eq!(one["runs"], json!([]), "{one}");
}

#[tokio::test]
async fn sendings_schedules_audiences_and_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (_, c) = call(&app, "POST", "/campaign", Some(json!({"name": "x"}))).await;
    let base = format!("/campaign/{}/sendings", c["id"]);

    let (s, sd) = call(
        &app,
        "POST",
        &base,
        Some(json!({
            "schedule": {"type": "relative", "in": "2 days", "prescheduled": true},
            "audience": {"type": "inline", "conditions": [
                {"condition_group": "member_properties", "field": "first_name", "operator": "match", "value": "Piotr"}
            ]},
            "recipients": [{"member_id": 150, "properties": {"name": "Piotr"}}, {"email": "jan@example.com"}],
            "channels_preference": ["sms", "email"]
        })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{sd}");
    assert_eq!(sd["status"], "scheduled");
    assert_eq!(sd["desired_at"], "2023-11-16T22:13:20Z");
    assert_eq!(sd["prepare_at"], "2023-11-16T22:08:20Z");
    assert_eq!(
        sd["schedule"],
        json!({"type": "relative", "in": "2 days", "prescheduled": true})
    );
    assert_eq!(sd["recipients"].as_array().unwrap().len(), 2);
    let one = format!("{base}/{}", sd["id"]);

    let (s, draft) = call(
        &app,
        "POST",
        &base,
        Some(json!({"recipients": [{"email": "a@b.no"}]})),
    )
    .await;
    assert_eq!(
        (s, draft["status"].as_str()),
        (StatusCode::CREATED, Some("draft"))
    );

    let (s, v) = call(&app, "PUT", &one, Some(json!({"draft": true}))).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("draft")),
        "{v}"
    );
    let (s, v) = call(
        &app,
        "PUT",
        &one,
        Some(json!({"schedule": {"type": "absolute", "at": T0 + 60}})),
    )
    .await;
    assert_eq!(
        (s, v["status"].as_str(), v["desired_at"].as_str()),
        (
            StatusCode::OK,
            Some("scheduled"),
            Some("2023-11-14T22:14:20Z")
        )
    );

    let (s, v) = call(&app, "DELETE", &one, None).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    // cancelled sendings cannot be rescheduled
    let (s, v) = call(
        &app,
        "PUT",
        &one,
        Some(json!({"schedule": {"type": "immediate"}})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["state"], "cancelled");
    let (s, v) = call(&app, "GET", &one, None).await;
    assert_eq!(
        (s, v["status"].as_str(), v["runs"].clone()),
        (StatusCode::OK, Some("cancelled"), json!([]))
    );

    let (s, list) = call(&app, "GET", &base, None).await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 2));

    // stored audiences by reference
    let (s, a) = call(
        &app,
        "POST",
        "/audience",
        Some(json!({"name": "oslo", "conditions": [
            {"condition_group": "member_properties", "field": "city", "operator": "eq", "value": "Oslo"}
        ]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let (s, v) = call(&app, "POST", &base, Some(json!({"schedule": {"type": "immediate"}, "audience": {"type": "reference", "id": a["id"]}}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["audience"], json!({"type": "reference", "id": a["id"]}));
}

#[tokio::test]
async fn bad_sendings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (_, c) = call(&app, "POST", "/campaign", Some(json!({"name": "x"}))).await;
    let base = format!("/campaign/{}/sendings", c["id"]);
    let cond = |field: &str| json!({"condition_group": "member_properties", "field": field, "operator": "eq", "value": "x"});
    let table: Vec<(Value, &str, StatusCode)> = vec![
        (json!({}), "audience", StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"audience": {"type": "inline", "conditions": [cond("city"), cond("password")]}}),
            "audience.conditions[1].field",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"audience": {"type": "inline", "id": 999}}),
            "audience.id",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"recipients": [{"email": "a@b.no"}], "schedule": {"type": "relative", "in": "2 fortnights"}}),
            "schedule.in",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"recipients": [{"email": "a@b.no"}], "schedule": {"type": "absolute", "at": T0 - 3600}}),
            "schedule.at",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"recipients": [{"msisdn": "4740769126"}]}),
            "recipients[0]",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"recipients": [{"email": "a@b.no"}], "when": 5}),
            "when",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, field, status) in table {
        let (s, v) = call(&app, "POST", &base, Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (s, _) = call(
        &app,
        "POST",
        "/campaign/999/sendings",
        Some(json!({"recipients": [{"email": "a@b.no"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// docs/openapi.json describes exactly the routes the campaign router declares, each method
/// included, under the `campaigns` tag.
#[test]
fn openapi_documents_every_campaign_route() {
    let source = include_str!("../src/api.rs");
    let router = &source[source.find("Ok(Router::new()").expect("the router")..];
    let router = &router[..router.find(".route_layer(").expect("the auth layer")];
    let mut declared = std::collections::BTreeSet::new();
    for part in router.split(".route(").skip(1) {
        let path = part.trim_start().trim_start_matches('"');
        let path = &path[..path.find('"').unwrap()];
        for (m, name) in [
            ("get(", "get"),
            ("post(", "post"),
            ("put(", "put"),
            ("delete(", "delete"),
        ] {
            if part.contains(m) {
                declared.insert(format!("{name} {path}"));
            }
        }
    }
    let doc: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if op["tags"] == json!(["campaigns"]) {
                documented.insert(format!("{method} {path}"));
            }
        }
    }
    assert!(declared.len() >= 12, "{declared:?}");
    assert_eq!(declared, documented);
}

/// The request parsing the fuzz target drives (`api_input`) is what the routes answer with:
/// the same status, `error` and `field` for refused bodies and queries, sent through the
/// router and given to the pure functions; an unknown campaign is still a 404 before its
/// sending's schedule is looked at.
#[tokio::test]
async fn api_input_is_what_the_routes_answer() {
    use broadside_campaigns::api_input::{
        audience_request, campaign_request, check_query, resolve_sending_schedule, sending_request,
        sending_update, workspace_id, InputError,
    };
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir, Access::Open);
    let (s, c) = call(
        &app,
        "POST",
        "/campaign",
        Some(json!({"name": "c", "list": 3})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let id = c["id"].as_i64().unwrap();
    let (s, sd) = call(
        &app,
        "POST",
        &format!("/campaign/{id}/sendings"),
        Some(json!({"schedule": {"type": "immediate"}})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{sd}");
    let sid = sd["id"].as_i64().unwrap();

    type Parse = fn(&[u8]) -> Result<(), InputError>;
    let create: Parse = |b| campaign_request(b, true).map(drop);
    let update: Parse = |b| campaign_request(b, false).map(drop);
    // The schedule error is part of what the route answers once the campaign exists.
    let sending: Parse = |b| {
        let s = sending_request(b)?.schedule?;
        resolve_sending_schedule(&s, &ScheduleConfig::default(), T0)?;
        Ok(())
    };
    let resched: Parse = |b| {
        let s = sending_update(b)?.schedule?;
        resolve_sending_schedule(&s, &ScheduleConfig::default(), T0)?;
        Ok(())
    };
    let audience: Parse = |b| audience_request(b).map(drop);
    let campaign_url = format!("/campaign/{id}");
    let sendings_url = format!("/campaign/{id}/sendings");
    let sending_url = format!("/campaign/{id}/sendings/{sid}");
    let cases: Vec<(&str, &str, Parse, &str)> = vec![
        ("POST", "/campaign", create, "{\"name\":"),
        ("POST", "/campaign", create, "[1]"),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","when":"2023-11-20T10:00:00"}"#,
        ),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","when":99999999999999}"#,
        ),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","segments":[1,-2]}"#,
        ),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","event_callback":"ftp://h/x"}"#,
        ),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","state":"PAUSED"}"#,
        ),
        (
            "POST",
            "/campaign",
            create,
            r#"{"name":"x","colour":"red"}"#,
        ),
        ("PUT", campaign_url.as_str(), update, r#"{"list":4}"#),
        ("PUT", campaign_url.as_str(), update, r#"{"name":"  "}"#),
        (
            "POST",
            &sendings_url,
            sending,
            r#"{"schedule":{"type":"soon"}}"#,
        ),
        ("POST", sendings_url.as_str(), sending, r#"{"draft":"yes"}"#),
        (
            "POST",
            &sendings_url,
            sending,
            r#"{"schedule":{"type":"absolute","at":1}}"#,
        ),
        (
            "POST",
            &sendings_url,
            sending,
            r#"{"recipients":[{"email":"nope"}]}"#,
        ),
        (
            "POST",
            &sendings_url,
            sending,
            r#"{"channels_preference":[]}"#,
        ),
        ("PUT", sending_url.as_str(), resched, r#"{"status":"sent"}"#),
        ("PUT", sending_url.as_str(), resched, r#"{"status":7}"#),
        (
            "PUT",
            &sending_url,
            resched,
            r#"{"schedule":{"type":"relative","in":"soon"}}"#,
        ),
        ("POST", "/audience", audience, r#"{"conditions":[]}"#),
        (
            "POST",
            "/audience",
            audience,
            r#"{"name":"a","conditions":{}}"#,
        ),
        ("POST", "/audience", audience, "12"),
    ];
    for (method, uri, parse, body) in cases {
        let (s, v) = call_as(&app, Some("ws1"), None, method, uri, Some(body)).await;
        let want = match parse(body.as_bytes()).expect_err(body) {
            InputError::Malformed(m) => (StatusCode::BAD_REQUEST, json!({"error": m})),
            InputError::Field(e @ broadside_campaigns::Error::Invalid { .. }) => {
                let broadside_campaigns::Error::Invalid { field, .. } = &e else {
                    unreachable!()
                };
                let field = field.clone();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"error": e.to_string(), "field": field}),
                )
            }
            InputError::Field(other) => panic!("{body}: {other:?}"),
        };
        assert_eq!((s, v), want, "{method} {uri} {body}");
    }

    // An unknown campaign: 404 whatever the sending's schedule says.
    let (s, v) = call_as(
        &app,
        Some("ws1"),
        None,
        "POST",
        "/campaign/999/sendings",
        Some(r#"{"schedule":{"type":"soon"}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    // The workspace header and query parameter.
    assert_eq!(workspace_id(" ws1 "), Some("ws1"));
    for bad in ["", "  ", "ws 1", "ws/1", &"w".repeat(65)] {
        assert_eq!(workspace_id(bad), None, "{bad:?}");
    }
    let (s, v) = call_as(
        &app,
        Some("ws1"),
        None,
        "GET",
        "/campaign?workspace_id=ws2",
        None,
    )
    .await;
    let m = check_query(Some("workspace_id=ws2"), "ws1").unwrap_err();
    assert_eq!((s, v), (StatusCode::FORBIDDEN, json!({"error": m})));
    assert_eq!(
        m,
        r#"workspace_id query parameter "ws2" differs from the header "ws1""#
    );
    assert_eq!(check_query(Some("workspace_id=ws1&x=1"), "ws1"), Ok(()));
    assert!(check_query(Some("workspace_id=ws1&workspace_id=ws1%20"), "ws1").is_err());
}
