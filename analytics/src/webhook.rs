//! Webhook intake: provider callbacks (seed 002's form) and JSON batches over HTTP.
//!
//! [`webhook_router`] returns an axum [`Router`] to mount in `broadside serve`:
//!
//! - `POST /webhooks/callback`: `application/x-www-form-urlencoded` with `event`, `when`,
//!   `email[n]` (and/or `telephone[n]`); the callback URL's query string is forwarded by
//!   the provider and carries `workspace_id`, `campaign_id`, `run_id`, `variant`.
//! - `POST /webhooks/events`: a JSON array of events, one JSON object, or NDJSON, in either
//!   accepted shape ([`crate::decode`]). All-or-nothing: one invalid item rejects the
//!   request with `400` and the per-item reasons, so the sender can fix and retry.
//!
//! Authentication: `Authorization: Bearer <secret>` or, for providers that can only call
//! a URL, `token=<secret>` in the query string. Duplicated deliveries are dropped by
//! event id (callbacks get a content-derived id) within a bounded in-memory window; the
//! store sink also names files after the ids they hold, so a redelivered request rewrites
//! the same file rather than adding one.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use broadside_pipeline::event::{partition_dir, EventBatchBuilder};
use broadside_pipeline::store::{commit_file, create_dir_all, temp_name};
use chrono::NaiveDate;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use xxhash_rust::xxh3::Xxh3;

use crate::decode::EventRow;
use crate::error::{Error, Result};
use crate::intake::{
    decode_batch, decode_callback, query_pairs, BatchRejection, CallbackRejection,
};

/// Configuration of the webhook endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Shared secret expected as bearer token or `token=` query parameter
    /// (CLI: `--webhook-secret`, env `BROADSIDE_WEBHOOK_SECRET`).
    pub secret: String,
    /// Event ids remembered for deduplication (oldest forgotten first).
    #[serde(default = "default_dedup")]
    pub dedup_window: usize,
    /// The printer's webhook signing secret; with it, `POST /webhooks/lob` takes Lob-style
    /// delivery tracking (CLI: `--lob-webhook-secret`, env `BROADSIDE_LOB_WEBHOOK_SECRET`).
    #[serde(default)]
    pub lob_secret: Option<String>,
}

fn default_dedup() -> usize {
    1_000_000
}

impl WebhookConfig {
    /// A config with the default dedup window.
    pub fn new(secret: impl Into<String>) -> Self {
        WebhookConfig {
            secret: secret.into(),
            dedup_window: default_dedup(),
            lob_secret: None,
        }
    }

    /// Enables `POST /webhooks/lob` with the printer's signing secret.
    pub fn with_lob_secret(mut self, secret: Option<String>) -> Self {
        self.lob_secret = secret;
        self
    }
}

/// Delivery context: each produced record carries a channel its acknowledgement goes to.
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<std::result::Result<(), String>>>;

    fn delivery(&self, r: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let _ = ack.send(r.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// Where accepted events go.
#[derive(Clone)]
pub enum WebhookSink {
    /// Embedded default: straight into `<store>/events/` as Parquet.
    Store {
        /// Store root.
        store: PathBuf,
    },
    /// Produced to the events topic (JSON, DESIGN.md shape, keyed by event id), for
    /// `broadside ingest` to pick up.
    Kafka {
        /// The producer.
        producer: ThreadedProducer<AckContext>,
        /// Topic.
        topic: String,
    },
}

impl WebhookSink {
    /// A Kafka sink producing to `topic` on `brokers` (idempotent producer, acks=all).
    pub fn kafka(brokers: &str, topic: &str) -> Result<WebhookSink> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create_with_context(AckContext)
            .map_err(|e| Error::kafka(format!("creating producer for {brokers}"), e))?;
        Ok(WebhookSink::Kafka {
            producer,
            topic: topic.to_string(),
        })
    }
}

/// Recently seen event ids, bounded.
struct DedupWindow {
    seen: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl DedupWindow {
    /// Reserves the ids not seen yet and returns their positions in `ids`.
    fn reserve(&mut self, ids: &[&str]) -> Vec<usize> {
        let mut fresh = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if self.seen.insert(id.to_string()) {
                self.order.push_back(id.to_string());
                fresh.push(i);
            }
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        fresh
    }

    /// Forgets ids whose delivery failed, so the provider's retry is accepted.
    fn release(&mut self, ids: &[String]) {
        for id in ids {
            self.seen.remove(id);
        }
        self.order.retain(|o| !ids.contains(o));
    }
}

struct WebhookState {
    secret: String,
    lob_secret: Option<String>,
    sink: WebhookSink,
    dedup: Mutex<DedupWindow>,
}

/// The webhook routes (`/webhooks/callback`, `/webhooks/events`); see the module docs.
pub fn webhook_router(cfg: WebhookConfig, sink: WebhookSink) -> Result<Router> {
    let mut problems = Vec::new();
    if cfg.secret.len() < 16 {
        problems.push("secret must be at least 16 characters".to_string());
    }
    if cfg.dedup_window == 0 {
        problems.push("dedup_window must be at least 1".to_string());
    }
    if cfg.lob_secret.as_ref().is_some_and(|s| s.is_empty()) {
        problems.push("lob_secret must not be empty".to_string());
    }
    if !problems.is_empty() {
        return Err(Error::Config {
            what: "webhook",
            problems,
        });
    }
    let lob = cfg.lob_secret.is_some();
    let state = Arc::new(WebhookState {
        secret: cfg.secret,
        lob_secret: cfg.lob_secret,
        sink,
        dedup: Mutex::new(DedupWindow {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap: cfg.dedup_window,
        }),
    });
    let mut router = Router::new()
        .route("/webhooks/callback", post(callback))
        .route("/webhooks/events", post(events));
    if lob {
        router = router.route("/webhooks/lob", post(lob_tracking));
    }
    Ok(router.with_state(state))
}

/// Constant-time comparison, so response timing does not reveal the secret.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &WebhookState, headers: &HeaderMap, query: &[(String, String)]) -> bool {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = query
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.as_str());
    [bearer, token]
        .into_iter()
        .flatten()
        .any(|t| same_secret(t.as_bytes(), state.secret.as_bytes()))
}

/// The 401 response when the caller did not present the secret, else `None`.
fn require_secret(
    state: &WebhookState,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Option<Response> {
    (!authorized(state, headers, query)).then(|| {
        reject(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong webhook secret"}),
        )
    })
}

fn reject(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn callback(
    State(state): State<Arc<WebhookState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_pairs(q.as_deref());
    if let Some(denied) = require_secret(&state, &headers, &query) {
        return denied;
    }
    match decode_callback(&body, &query) {
        Ok(rows) => deliver(&state, rows).await,
        Err(CallbackRejection::MissingEvent) => reject(
            StatusCode::BAD_REQUEST,
            json!({"error": "missing field `event`", "reason": "missing_field"}),
        ),
        Err(CallbackRejection::Invalid(reason)) => reject(
            StatusCode::BAD_REQUEST,
            json!({"error": reason.to_string(), "reason": reason.code()}),
        ),
    }
}

async fn events(
    State(state): State<Arc<WebhookState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_pairs(q.as_deref());
    if let Some(denied) = require_secret(&state, &headers, &query) {
        return denied;
    }
    match decode_batch(&body) {
        Ok(rows) => deliver(&state, rows).await,
        Err(BatchRejection::MalformedArray { detail }) => reject(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("malformed JSON array: {detail}"), "reason": "malformed_json"}),
        ),
        Err(BatchRejection::MalformedLine { index, detail }) => reject(
            StatusCode::BAD_REQUEST,
            json!({"errors": [{"index": index, "reason": "malformed_json", "detail": detail}]}),
        ),
        Err(BatchRejection::InvalidItems(items)) => {
            let errors: Vec<Value> = items
                .iter()
                .map(|(i, r)| json!({"index": i, "reason": r.code(), "detail": r.to_string()}))
                .collect();
            reject(StatusCode::BAD_REQUEST, json!({ "errors": errors }))
        }
    }
}

/// How far a tracking webhook's signature timestamp may be from our clock.
const LOB_TOLERANCE: Duration = Duration::from_secs(300);

/// `POST /webhooks/lob`: a printer's delivery tracking webhook (docs/printers.md, "Delivery
/// tracking"). Signed with the printer's secret (401 otherwise); `delivered` becomes a
/// `delivered` event and `returned_to_sender` a hard `bounced` one, filed under the workspace,
/// campaign, run, variant and recipient the piece's metadata carries (set by `broadside send`).
/// Other milestones, and pieces without our metadata, are acknowledged and not recorded, so
/// the printer does not retry them.
async fn lob_tracking(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use broadside_printers::tracking::{verify_signature, TrackingUpdate};
    let Some(secret) = &state.lob_secret else {
        return reject(StatusCode::NOT_FOUND, json!({"error": "not configured"}));
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    if let Err(e) = verify_signature(
        secret.as_bytes(),
        &header("lob-signature-timestamp"),
        &header("lob-signature"),
        &body,
        now_ms,
        LOB_TOLERANCE,
    ) {
        return reject(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let update = match TrackingUpdate::parse(&body) {
        Ok(u) => u,
        Err(e) => return reject(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    match lob_event_row(&update) {
        Ok(row) => deliver(&state, vec![row]).await,
        Err(why) => (
            StatusCode::OK,
            Json(json!({"accepted": 0, "duplicates": 0, "ignored": why})),
        )
            .into_response(),
    }
}

/// The event a tracking update is recorded as, or why it is not recorded.
fn lob_event_row(
    u: &broadside_printers::tracking::TrackingUpdate,
) -> std::result::Result<EventRow<'static>, String> {
    use broadside_pipeline::event::{BounceType, EventType};
    let (event_type, bounce_type) = match u.event_type() {
        Some(("delivered", _)) => (EventType::Delivered, None),
        Some(("bounced", _)) => (EventType::Bounced, Some(BounceType::Hard)),
        _ => return Err(format!("{} is not recorded", u.event_type)),
    };
    let meta = |k: &str| u.metadata.get(k).filter(|v| !v.is_empty()).cloned();
    let (Some(workspace), Some(campaign), Some(recipient)) =
        (meta("workspace_id"), meta("campaign_id"), meta("recipient"))
    else {
        return Err(format!(
            "piece {} has no workspace_id, campaign_id and recipient metadata",
            u.piece_id
        ));
    };
    // The decoder's rules for what reaches the store: the workspace names a folder, and event
    // times stay within the years the store can write back.
    if !crate::decode::valid_workspace_id(&workspace) {
        return Err(format!(
            "piece {}: workspace_id {workspace:?} is not a valid workspace",
            u.piece_id
        ));
    }
    let ts = u
        .date_created
        .as_deref()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        .map(|t| t.timestamp_micros())
        .filter(|t| crate::decode::writable_year(*t))
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros());
    Ok(EventRow {
        event_id: format!("lob-{}", u.event_id).into(),
        workspace_id: workspace.into(),
        campaign_id: campaign.into(),
        variant: meta("variant").map(Into::into),
        run_id: meta("run_id").map(Into::into),
        email: recipient.into(),
        event_type,
        bounce_type,
        url: None,
        ts_micros: ts,
    })
}

async fn deliver(state: &Arc<WebhookState>, rows: Vec<EventRow<'static>>) -> Response {
    let fresh = {
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_ref()).collect();
        state
            .dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(&ids)
    };
    let duplicates = rows.len() - fresh.len();
    let keep: Vec<EventRow<'static>> = {
        let mut rows = rows.into_iter().map(Some).collect::<Vec<_>>();
        fresh.iter().filter_map(|&i| rows[i].take()).collect()
    };
    let ids: Vec<String> = keep.iter().map(|r| r.event_id.to_string()).collect();
    let accepted = keep.len();
    let result = if keep.is_empty() {
        Ok(())
    } else {
        match &state.sink {
            WebhookSink::Store { store } => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || write_rows(&store, &keep))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
            WebhookSink::Kafka { producer, topic } => produce_rows(producer, topic, &keep).await,
        }
    };
    match result {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"accepted": accepted, "duplicates": duplicates})),
        )
            .into_response(),
        Err(e) => {
            state
                .dedup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(&ids);
            tracing::error!(error = %e, "webhook delivery failed");
            reject(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": format!("could not store events: {e}")}),
            )
        }
    }
}

async fn produce_rows(
    producer: &ThreadedProducer<AckContext>,
    topic: &str,
    rows: &[EventRow<'static>],
) -> std::result::Result<(), String> {
    let mut acks = Vec::with_capacity(rows.len());
    for r in rows {
        let payload = serde_json::to_vec(&r.to_event()).expect("event serializes");
        let (tx, rx) = oneshot::channel();
        let rec = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(r.event_id.as_bytes())
            .payload(&payload);
        producer
            .send(rec)
            .map_err(|(e, _)| format!("producing to {topic}: {e}"))?;
        acks.push(rx);
    }
    for rx in acks {
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(format!("producing to {topic}: {e}")),
            Ok(Err(_)) => return Err(format!("producing to {topic}: delivery report lost")),
            Err(_) => {
                return Err(format!(
                    "producing to {topic}: no acknowledgement within 30 s"
                ))
            }
        }
    }
    Ok(())
}

/// Writes accepted rows as one Parquet file per partition, named after the ids it holds.
fn write_rows(store: &Path, rows: &[EventRow<'static>]) -> Result<()> {
    let mut groups: Vec<(&str, NaiveDate, Vec<&EventRow<'static>>)> = Vec::new();
    for r in rows {
        let d = r.date();
        match groups
            .iter_mut()
            .find(|g| g.0 == r.workspace_id.as_ref() && g.1 == d)
        {
            Some(g) => g.2.push(r),
            None => groups.push((r.workspace_id.as_ref(), d, vec![r])),
        }
    }
    for (ws, date, rows) in groups {
        let mut ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_ref()).collect();
        ids.sort_unstable();
        let mut h = Xxh3::new();
        for id in &ids {
            h.update(id.as_bytes());
            h.update(&[0x1f]);
        }
        let dir = partition_dir(store, ws, date);
        create_dir_all(&dir)?;
        let path = dir.join(format!("webhook-{:032x}.parquet", h.digest128()));
        let mut b = EventBatchBuilder::new();
        for r in &rows {
            r.push_into(&mut b);
        }
        let batch = b.finish()?;
        let tmp = temp_name(&path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let sync = file.try_clone().map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(|e| Error::parquet(&tmp, e))?;
        w.write(&batch).map_err(|e| Error::parquet(&tmp, e))?;
        w.close().map_err(|e| Error::parquet(&tmp, e))?;
        sync.sync_all().map_err(|e| Error::io(&tmp, e))?;
        commit_file(&tmp, &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use broadside_printers::tracking::TrackingUpdate;

    fn update(workspace: &str, date: &str) -> TrackingUpdate {
        TrackingUpdate::parse(
            json!({
                "id": "evt_1",
                "event_type": {"id": "postcard.delivered"},
                "date_created": date,
                "body": {"id": "psc_1", "metadata": {
                    "workspace_id": workspace, "campaign_id": "c", "recipient": "A00001"
                }},
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn tracking_events_keep_the_decoders_rules() {
        let ok = lob_event_row(&update("acme", "2026-12-01T10:00:00Z")).unwrap();
        assert_eq!(ok.workspace_id, "acme");
        assert_eq!(ok.ts_micros, 1_796_119_200_000_000);
        // A workspace that is no folder name is not filed anywhere.
        for bad in ["../other", "a/b", ".hidden"] {
            let e = lob_event_row(&update(bad, "2026-12-01T10:00:00Z")).unwrap_err();
            assert!(e.contains("not a valid workspace"), "{bad}: {e}");
        }
        // A time the store could not write back is replaced by the receiving time.
        let far = lob_event_row(&update("acme", "-0001-01-01T00:00:00Z")).unwrap();
        assert!(crate::decode::writable_year(far.ts_micros));
    }
}
