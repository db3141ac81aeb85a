//! Template sync against a creative API stand-in on 127.0.0.1 (an axum server the test starts).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use axum::{Json, Router};
use broadside_campaigns::store::Store;
use broadside_campaigns::templates::{content_hash, SyncOutcome, Template, TemplateSync};
use broadside_campaigns::Error;
use serde_json::Value;

/// One PUT: template name, Authorization header, JSON body.
type Put = (String, Option<String>, Value);

#[derive(Default)]
struct Creative {
    puts: Mutex<Vec<Put>>,
    /// Answer these statuses first, then 200.
    script: Mutex<Vec<StatusCode>>,
}

async fn put_template(
    State(c): State<Arc<Creative>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    c.puts.lock().unwrap().push((name, auth, body));
    let mut script = c.script.lock().unwrap();
    if script.is_empty() {
        StatusCode::OK
    } else {
        script.remove(0)
    }
}

async fn creative(script: Vec<StatusCode>) -> (Arc<Creative>, String) {
    let c = Arc::new(Creative {
        script: Mutex::new(script),
        ..Default::default()
    });
    let app = Router::new()
        .route("/api/templates/{name}", put(put_template))
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (c, format!("http://{addr}/api"))
}

const COLUMNS: &[&str] = &["first_name", "city", "email"];

#[tokio::test]
async fn content_is_synced_only_when_its_hash_changes() {
    let (c, endpoint) = creative(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    let sync = TemplateSync {
        endpoint,
        token: Some("creative-token".into()),
    };
    let v1 = "Hi {{first_name}} from {{ city }}";
    let out = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "spring-a",
                content: v1,
                sender_domain: None,
            },
            COLUMNS,
            1,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        SyncOutcome::Synced {
            content_hash: content_hash(v1)
        }
    );
    let out = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "spring-a",
                content: v1,
                sender_domain: None,
            },
            COLUMNS,
            2,
        )
        .await
        .unwrap();
    assert_eq!(out, SyncOutcome::Unchanged);
    let v2 = "Hello {{first_name}}";
    let out = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "spring-a",
                content: v2,
                sender_domain: None,
            },
            COLUMNS,
            3,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        SyncOutcome::Synced {
            content_hash: content_hash(v2)
        }
    );
    // the same name in another workspace is another template
    sync.sync(
        &store,
        "other",
        &Template {
            name: "spring-a",
            content: v2,
            sender_domain: None,
        },
        COLUMNS,
        4,
    )
    .await
    .unwrap();

    let puts = c.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 3, "unchanged content is not sent again");
    assert_eq!(puts[0].0, "spring-a");
    assert_eq!(puts[0].1.as_deref(), Some("Bearer creative-token"));
    assert_eq!(puts[0].2["content"], v1);
    assert_eq!(puts[0].2["content_hash"], content_hash(v1));
    assert_eq!(puts[1].2["content"], v2);
}

#[tokio::test]
async fn a_refused_sync_is_retried_on_the_next_call() {
    let (c, endpoint) = creative(vec![StatusCode::INTERNAL_SERVER_ERROR]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    let sync = TemplateSync {
        endpoint,
        token: None,
    };
    let e = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "t1",
                content: "{{email}}",
                sender_domain: None,
            },
            COLUMNS,
            1,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::CreativeSync { name, .. } if name == "t1"),
        "{e}"
    );
    assert!(e.to_string().contains("answered 500"), "{e}");
    let out = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "t1",
                content: "{{email}}",
                sender_domain: None,
            },
            COLUMNS,
            2,
        )
        .await
        .unwrap();
    assert!(matches!(out, SyncOutcome::Synced { .. }));
    assert_eq!(c.puts.lock().unwrap().len(), 2);
    assert_eq!(
        c.puts.lock().unwrap()[0].1,
        None,
        "no token configured, none sent"
    );
}

#[tokio::test]
async fn a_sender_domain_goes_with_the_content_and_a_new_one_syncs_again() {
    let (c, endpoint) = creative(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    let sync = TemplateSync {
        endpoint,
        token: None,
    };
    let v = "Hi {{first_name}}";
    for (domain, now, synced) in [
        (None, 1, true),
        (Some("news.example.com"), 2, true),
        (Some("news.example.com"), 3, false),
        (Some("offers.example.com"), 4, true),
    ] {
        let out = sync
            .sync(
                &store,
                "ws",
                &Template {
                    name: "t",
                    content: v,
                    sender_domain: domain,
                },
                COLUMNS,
                now,
            )
            .await
            .unwrap();
        assert_eq!(out != SyncOutcome::Unchanged, synced, "{domain:?} at {now}");
    }
    let puts = c.puts.lock().unwrap().clone();
    let domains: Vec<Option<&str>> = puts
        .iter()
        .map(|(_, _, body)| body.get("sender_domain").and_then(Value::as_str))
        .collect();
    assert_eq!(
        domains,
        [None, Some("news.example.com"), Some("offers.example.com")]
    );
    // the content hash the creative API gets is the content's, whatever the domain
    assert!(puts
        .iter()
        .all(|(_, _, body)| body["content_hash"] == content_hash(v)));
}

#[tokio::test]
async fn templates_with_unknown_tags_are_not_synced() {
    let (c, endpoint) = creative(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    let sync = TemplateSync {
        endpoint,
        token: None,
    };
    let e = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "t1",
                content: "Hi {{first_name}}\n{{voucher_code}}",
                sender_domain: None,
            },
            COLUMNS,
            1,
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "template t1: line 2: unknown merge tag {{voucher_code}}"
    );
    let e = sync
        .sync(
            &store,
            "ws",
            &Template {
                name: "../etc",
                content: "x",
                sender_domain: None,
            },
            COLUMNS,
            1,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("template: \"../etc\""), "{e}");
    assert!(c.puts.lock().unwrap().is_empty());
}
