//! The enrichment client against a local provider speaking the protocol in
//! `printers/src/enrichment.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use broadside_printers::enrichment::{EnrichmentClient, EnrichmentConfig, EnrichmentRecord};
use broadside_printers::lob::Pause;
use broadside_printers::{Address, RecipientState, SkipReason};
use serde_json::{json, Value};

#[derive(Default)]
struct Provider {
    calls: AtomicU64,
    /// Calls answered 503 before the real answer.
    fail_first: u64,
    batches: Mutex<Vec<usize>>,
}

async fn lookup(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let call = p.calls.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer secret") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "bad token"})),
        );
    }
    if call < p.fail_first {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
    }
    let records = body["records"].as_array().unwrap();
    p.batches.lock().unwrap().push(records.len());
    let results: Vec<Value> = records
        .iter()
        .filter_map(|r| {
            let key = r["key"].as_str().unwrap();
            match key.split('-').next().unwrap() {
                "found" => Some(json!({"key": key, "address": {
                    "address_line1": format!("1 {} St", r["address_zip"].as_str().unwrap_or("?")),
                    "address_city": "Springfield", "address_state": "IL", "confidence": 0.9}})),
                "none" => Some(json!({"key": key, "address": null})),
                "partial" => Some(json!({"key": key, "address": {"address_city": "Springfield"}})),
                _ => None,
            }
        })
        .collect();
    (StatusCode::OK, Json(json!({ "results": results })))
}

async fn start(provider: Arc<Provider>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/lookup", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/lookup", post(lookup))
        .with_state(provider);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[derive(Default)]
struct RecordingPause(Mutex<Vec<Duration>>);

impl Pause for RecordingPause {
    fn pause(
        &self,
        d: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.0.lock().unwrap().push(d);
        Box::pin(async {})
    }
}

fn config(url: String) -> EnrichmentConfig {
    toml::from_str(&format!(
        "url = {url:?}\nbatch_size = 3\nmax_attempts = 3\nbackoff_ms = 10\n"
    ))
    .unwrap()
}

fn record(key: &str) -> EnrichmentRecord {
    EnrichmentRecord {
        key: key.into(),
        address: Address {
            name: Some("Ada".into()),
            address_zip: Some("62701".into()),
            ..Address::default()
        },
    }
}

#[tokio::test]
async fn batches_are_enriched_after_a_retry() {
    let provider = Arc::new(Provider {
        fail_first: 1,
        ..Provider::default()
    });
    let url = start(provider.clone()).await;
    let pause = Arc::new(RecordingPause::default());
    let client = EnrichmentClient::new(config(url), "secret", pause.clone()).unwrap();
    let records: Vec<_> = ["found-1", "none-1", "partial-1", "silent-1", "found-2"]
        .into_iter()
        .map(record)
        .collect();
    let mut outcomes = Vec::new();
    for batch in records.chunks(client.batch_size()) {
        outcomes.extend(client.enrich(batch).await.unwrap());
    }
    let states: Vec<_> = outcomes.iter().map(|o| o.state.clone()).collect();
    assert_eq!(
        states,
        [
            RecipientState::Pending,
            RecipientState::skipped(SkipReason::EnrichmentFailed),
            RecipientState::skipped(SkipReason::NoAddress),
            RecipientState::skipped(SkipReason::EnrichmentFailed),
            RecipientState::Pending,
        ]
    );
    let enriched = outcomes[0].address.as_ref().unwrap();
    assert_eq!(enriched.address_line1.as_deref(), Some("1 62701 St"));
    assert_eq!(enriched.name.as_deref(), Some("Ada"));
    assert_eq!(*provider.batches.lock().unwrap(), [3, 2]);
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        3,
        "one 503, then two batches"
    );
    assert_eq!(*pause.0.lock().unwrap(), [Duration::from_millis(10)]);
    for o in &outcomes {
        assert!(RecipientState::AddressEnriching.allowed(&o.state));
    }
}

#[tokio::test]
async fn an_unreachable_provider_leaves_the_batch_for_later() {
    let provider = Arc::new(Provider {
        fail_first: u64::MAX,
        ..Provider::default()
    });
    let url = start(provider.clone()).await;
    let pause = Arc::new(RecordingPause::default());
    let client = EnrichmentClient::new(config(url), "secret", pause.clone()).unwrap();
    let err = client.enrich(&[record("found-1")]).await.unwrap_err();
    assert!(err.contains("after 3 attempts: HTTP 503"), "{err}");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        *pause.0.lock().unwrap(),
        [Duration::from_millis(10), Duration::from_millis(20)]
    );
}

#[tokio::test]
async fn a_refused_token_is_not_retried_and_bad_config_is_reported() {
    let provider = Arc::new(Provider::default());
    let url = start(provider.clone()).await;
    let client =
        EnrichmentClient::new(config(url), "wrong", Arc::new(RecordingPause::default())).unwrap();
    let err = client.enrich(&[record("found-1")]).await.unwrap_err();
    assert!(err.contains("HTTP 401"), "{err}");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    let bad: EnrichmentConfig =
        toml::from_str("url = \"ftp://x\"\nbatch_size = 0\nmax_attempts = 0\n").unwrap();
    let err = EnrichmentClient::new(bad, "t", Arc::new(RecordingPause::default())).unwrap_err();
    match err {
        broadside_printers::Error::Config { problems, .. } => assert_eq!(problems.len(), 3),
        other => panic!("{other}"),
    }
    assert!(toml::from_str::<EnrichmentConfig>("url = \"http://x\"\nbatch = 3\n").is_err());
}
