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
//! - `GET /webhooks/stats`: the caller's workspace's counters and the server's refusals.
//!
//! Every credential ([`WebhookCredential`]) writes into exactly one workspace: an event
//! without `workspace_id` is filed under it, a request with an event naming another workspace
//! is refused whole (`403`, nothing stored). A credential is presented as
//! `Authorization: Bearer <secret>`, as `token=<secret>` in the query string (weaker: URLs
//! end up in proxy and access logs; for providers that can only call a URL), or as a body
//! signature `Broadside-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` keyed
//! with the credential's `sha256` value, within [`SIGNATURE_TOLERANCE`] of our clock. Bodies
//! over the configured size get `413`. Duplicated deliveries are dropped by event id
//! (callbacks get a content-derived id) within a bounded in-memory window; the store sink
//! also names files after the ids they hold, so a redelivered request rewrites the same file
//! rather than adding one.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use broadside_pipeline::event::{partition_dir, EventBatchBuilder};
use broadside_pipeline::store::{commit_file, create_dir_all, temp_name};
use chrono::NaiveDate;
use hmac::{Hmac, Mac};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::oneshot;
use xxhash_rust::xxh3::Xxh3;

use crate::attribution::Attribution;
use crate::credentials::{same_secret, token_hash};
use crate::decode::EventRow;
use crate::error::{Error, Result};
use crate::intake::{
    decode_batch_for, decode_callback_for, query_pairs, BatchRejection, CallbackRejection,
};

/// How far a `Broadside-Signature` timestamp may be from our clock (replay window).
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

/// Shortest secret accepted in the clear (`serve --webhook-secret`).
pub const MIN_SECRET_LEN: usize = 16;

/// One webhook credential: a secret whose events are filed under exactly one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCredential {
    /// A name for logs and answers (never the secret).
    pub name: String,
    /// The workspace its events belong to.
    pub workspace: String,
    /// Hex SHA-256 of the secret (`broadside token new --webhook` prints it). It is also the
    /// key of the signature form, so the file holding it is as secret as the secret.
    pub sha256: String,
}

impl WebhookCredential {
    /// The credential for a secret given in the clear (`serve --webhook-secret`); the secret
    /// needs [`MIN_SECRET_LEN`] characters.
    pub fn from_secret(name: &str, secret: &str, workspace: &str) -> Result<WebhookCredential> {
        let c = WebhookCredential {
            name: name.to_string(),
            workspace: workspace.to_string(),
            sha256: token_hash(secret),
        };
        let mut problems = c.problems(name);
        if secret.len() < MIN_SECRET_LEN {
            problems.push(format!(
                "{name}: the secret must be at least {MIN_SECRET_LEN} characters"
            ));
        }
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(Error::Config {
                what: "webhook",
                problems,
            })
        }
    }

    /// The key of the signature form: the ASCII of the lowercase hex `sha256`.
    pub fn signing_key(&self) -> String {
        self.sha256.to_ascii_lowercase()
    }

    fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.push(format!(
                "{at}: sha256 must be 64 hex digits (`broadside token new --webhook` prints one)"
            ));
        }
        if !crate::decode::valid_workspace_id(&self.workspace) {
            p.push(format!("{at}: invalid workspace {:?}", self.workspace));
        }
        p
    }
}

/// A webhook credentials file: `[[webhooks]]` entries with `name`, `workspace` and `sha256`
/// (see docs/events.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCredentials {
    /// The entries.
    pub webhooks: Vec<WebhookCredential>,
}

impl WebhookCredentials {
    /// Reads and checks a credentials file; every problem is listed.
    pub fn load(path: &Path) -> Result<WebhookCredentials> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let set: WebhookCredentials = toml::from_str(&text).map_err(|e| Error::Config {
            what: "webhook credentials file",
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        let mut problems = set.validate();
        if set.webhooks.is_empty() {
            problems.push(format!("{}: no [[webhooks]] entries", path.display()));
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(Error::Config {
                what: "webhook credentials file",
                problems,
            })
        }
    }

    /// Every problem of the entries: malformed hashes, invalid workspaces, a secret listed twice.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, c) in self.webhooks.iter().enumerate() {
            problems.extend(c.problems(&format!("webhooks[{i}] ({})", c.name)));
            let dup = self.webhooks[..i]
                .iter()
                .any(|o| o.sha256.eq_ignore_ascii_case(&c.sha256));
            if dup {
                problems.push(format!(
                    "webhooks[{i}] ({}): the same secret is listed twice",
                    c.name
                ));
            }
        }
        problems
    }
}

/// Configuration of the webhook endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Accepted credentials, each bound to one workspace (CLI: `--webhook-tokens FILE`, and
    /// `--webhook-secret S --webhook-workspace W`).
    pub credentials: Vec<WebhookCredential>,
    /// Event ids remembered for deduplication (oldest forgotten first).
    #[serde(default = "default_dedup")]
    pub dedup_window: usize,
    /// Largest request body in bytes; larger ones get `413` (CLI: `--webhook-max-body`).
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// The printer's webhook signing secret; with it, `POST /webhooks/lob` takes Lob-style
    /// delivery tracking (CLI: `--lob-webhook-secret`, env `BROADSIDE_LOB_WEBHOOK_SECRET`).
    #[serde(default)]
    pub lob_secret: Option<String>,
    /// The one workspace the printer's tracking is filed under (CLI: `--lob-webhook-workspace`);
    /// required with `lob_secret`.
    #[serde(default)]
    pub lob_workspace: Option<String>,
}

fn default_dedup() -> usize {
    1_000_000
}

/// Default largest webhook body: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY
}

impl WebhookConfig {
    /// A config with these credentials and the default dedup window and body limit.
    pub fn new(credentials: Vec<WebhookCredential>) -> Self {
        WebhookConfig {
            credentials,
            dedup_window: default_dedup(),
            max_body: default_max_body(),
            lob_secret: None,
            lob_workspace: None,
        }
    }

    /// Enables `POST /webhooks/lob` with the printer's signing secret, filing tracking events
    /// under `workspace` only.
    pub fn with_lob_secret(mut self, secret: Option<String>, workspace: Option<String>) -> Self {
        self.lob_secret = secret;
        self.lob_workspace = workspace;
        self
    }

    /// Sets the largest accepted body.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Every problem of the configuration.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = WebhookCredentials {
            webhooks: self.credentials.clone(),
        }
        .validate();
        if self.credentials.is_empty() {
            problems.push("no webhook credentials".to_string());
        }
        if self.dedup_window == 0 {
            problems.push("dedup_window must be at least 1".to_string());
        }
        if self.max_body == 0 {
            problems.push("max_body must be at least 1 byte".to_string());
        }
        if self.lob_secret.as_ref().is_some_and(|s| s.is_empty()) {
            problems.push("lob_secret must not be empty".to_string());
        }
        match (&self.lob_secret, &self.lob_workspace) {
            (Some(_), None) => problems.push(
                "lob_secret needs lob_workspace, the one workspace its tracking is filed under"
                    .to_string(),
            ),
            (None, Some(_)) => problems.push("lob_workspace needs lob_secret".to_string()),
            (_, Some(w)) if !crate::decode::valid_workspace_id(w) => {
                problems.push(format!("lob_workspace {w:?} is not a valid workspace"))
            }
            _ => {}
        }
        problems
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
        /// Variant and run of events that lack them, from the ledger.
        attribution: Arc<Attribution>,
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
    /// The embedded default: events written to `<store>/events/`, attributed from the ledger.
    pub fn store(store: &Path) -> WebhookSink {
        WebhookSink::Store {
            store: store.to_path_buf(),
            attribution: Attribution::new(store),
        }
    }

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

/// What one workspace's credentials did since the server started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkspaceCounts {
    /// Events stored (or produced).
    pub accepted: u64,
    /// Events dropped as redeliveries.
    pub duplicates: u64,
    /// Requests refused because an event named another workspace (`403`).
    pub refused_foreign_workspace: u64,
    /// Events refused with them: every event of those requests.
    pub refused_foreign_events: u64,
    /// Requests refused as invalid (`400`).
    pub refused_invalid: u64,
}

/// Refusals no workspace can be charged with: no or unknown credential, bodies too large.
#[derive(Debug, Default)]
struct ServerCounts {
    unauthorized: AtomicU64,
    too_large: AtomicU64,
}

impl ServerCounts {
    /// A missing, unknown or badly signed credential (401), here and in the metrics.
    fn refused_unauthorized(&self) {
        self.unauthorized.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("broadside_webhook_requests_refused_total", "reason" => "unauthorized")
            .increment(1);
    }

    /// A body over the limit (413), here and in the metrics.
    fn refused_too_large(&self) {
        self.too_large.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("broadside_webhook_requests_refused_total", "reason" => "too_large")
            .increment(1);
    }
}

struct WebhookState {
    credentials: Vec<WebhookCredential>,
    lob_secret: Option<String>,
    lob_workspace: Option<String>,
    max_body: usize,
    sink: WebhookSink,
    dedup: Mutex<DedupWindow>,
    server: ServerCounts,
    workspaces: Mutex<BTreeMap<String, WorkspaceCounts>>,
}

impl WebhookState {
    fn count(&self, workspace: &str, f: impl FnOnce(&mut WorkspaceCounts)) {
        let mut m = self.workspaces.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(workspace.to_string()).or_default());
    }
}

/// The webhook routes (`/webhooks/callback`, `/webhooks/events`, `/webhooks/stats`, and
/// `/webhooks/lob` with a printer secret); see the module docs.
pub fn webhook_router(cfg: WebhookConfig, sink: WebhookSink) -> Result<Router> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(Error::Config {
            what: "webhook",
            problems,
        });
    }
    let lob = cfg.lob_secret.is_some();
    let state = Arc::new(WebhookState {
        credentials: cfg.credentials,
        lob_secret: cfg.lob_secret,
        lob_workspace: cfg.lob_workspace,
        max_body: cfg.max_body,
        sink,
        dedup: Mutex::new(DedupWindow {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap: cfg.dedup_window,
        }),
        server: ServerCounts::default(),
        workspaces: Mutex::new(BTreeMap::new()),
    });
    let mut router = Router::new()
        .route("/webhooks/callback", post(callback))
        .route("/webhooks/events", post(events))
        .route("/webhooks/stats", get(stats));
    if lob {
        router = router.route("/webhooks/lob", post(lob_tracking));
    }
    Ok(router.with_state(state))
}

/// The credential a request presents, with its body read (at most `max_body` bytes), or the
/// refusal: `413` for a larger body, `401` for a missing, unknown or badly signed credential.
/// A bearer or `token=` credential is checked before the body is read.
async fn authenticate(
    state: &WebhookState,
    query: &[(String, String)],
    req: Request,
) -> std::result::Result<(WebhookCredential, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let body = read_body(state, &parts.headers, body).await?;
    let unauthorized = |m: String| {
        state.server.refused_unauthorized();
        tracing::warn!(reason = %m, "webhook credential refused");
        reject(
            StatusCode::UNAUTHORIZED,
            json!({"error": m, "reason": "unauthorized"}),
        )
    };
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = query
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.as_str());
    if let Some(secret) = bearer.or(token) {
        let h = token_hash(secret.trim());
        return match state
            .credentials
            .iter()
            .find(|c| same_secret(c.sha256.to_ascii_lowercase().as_bytes(), h.as_bytes()))
        {
            Some(c) => Ok((c.clone(), body)),
            None => Err(unauthorized("unknown webhook credential".into())),
        };
    }
    let Some(sig) = parts
        .headers
        .get("broadside-signature")
        .map(|v| v.to_str().unwrap_or_default())
    else {
        return Err(unauthorized(
            "missing credential: Authorization: Bearer <secret> or Broadside-Signature".into(),
        ));
    };
    let now = chrono::Utc::now().timestamp();
    match verify_signature(&state.credentials, sig, &body, now) {
        Ok(c) => Ok((c.clone(), body)),
        Err(m) => Err(unauthorized(format!("Broadside-Signature: {m}"))),
    }
}

/// Reads a request body of at most `max_body` bytes, or answers `413`.
async fn read_body(
    state: &WebhookState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> std::result::Result<Bytes, Response> {
    let too_large = || {
        state.server.refused_too_large();
        reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({
                "error": format!("request body over {} bytes", state.max_body),
                "reason": "body_too_large",
                "max_body": state.max_body,
            }),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, state.max_body).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                Err(too_large())
            } else {
                Err(reject(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("reading the body: {e}"), "reason": "body_unreadable"}),
                ))
            }
        }
    }
}

/// Checks `Broadside-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]` against every
/// credential's signing key; the credential whose key made one of the signatures, or why none.
fn verify_signature<'a>(
    credentials: &'a [WebhookCredential],
    header: &str,
    body: &[u8],
    now: i64,
) -> std::result::Result<&'a WebhookCredential, String> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.trim()),
            Some(("v1", v)) => sigs.push(decode_hex(v.trim()).ok_or("v1 is not hex")?),
            _ => {}
        }
    }
    let t = t.ok_or("no t=<unix seconds>")?;
    let ts: i64 = t.parse().map_err(|_| format!("t={t:?} is not a number"))?;
    if ts.abs_diff(now) > SIGNATURE_TOLERANCE.as_secs() {
        return Err(format!(
            "t={ts} is more than {} s from now",
            SIGNATURE_TOLERANCE.as_secs()
        ));
    }
    if sigs.is_empty() {
        return Err("no v1=<hex HMAC-SHA256>".into());
    }
    credentials
        .iter()
        .find(|c| {
            let mac = signed_mac(c, t, body);
            // `verify_slice` compares in constant time.
            sigs.iter().any(|s| mac.clone().verify_slice(s).is_ok())
        })
        .ok_or_else(|| "matches no webhook credential".to_string())
}

fn signed_mac(c: &WebhookCredential, t: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(c.signing_key().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Broadside-Signature` header a sender holding `c`'s signing key puts on `body` at
/// Unix time `t` (for tools and tests).
pub fn signature_header(c: &WebhookCredential, t: i64, body: &[u8]) -> String {
    let mac = signed_mac(c, &t.to_string(), body).finalize().into_bytes();
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn reject(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// The `403` for a request whose events name `named` workspaces other than `c`'s.
fn foreign(state: &WebhookState, c: &WebhookCredential, items: Value, events: usize) -> Response {
    state.count(&c.workspace, |n| {
        n.refused_foreign_workspace += 1;
        n.refused_foreign_events += events as u64;
    });
    metrics::counter!("broadside_webhook_requests_refused_total", "reason" => "foreign_workspace")
        .increment(1);
    metrics::counter!(
        "broadside_webhook_events_total",
        "workspace" => c.workspace.clone(),
        "outcome" => "refused"
    )
    .increment(events as u64);
    tracing::warn!(credential = %c.name, workspace = %c.workspace, events, "webhook events for another workspace refused");
    reject(
        StatusCode::FORBIDDEN,
        json!({
            "error": format!(
                "field `workspace_id`: credential {:?} writes into workspace {:?} only; nothing of this request was stored",
                c.name, c.workspace
            ),
            "reason": "foreign_workspace",
            "field": "workspace_id",
            "workspace_id": c.workspace,
            "refused": events,
            "items": items,
        }),
    )
}

fn invalid(state: &WebhookState, c: &WebhookCredential, body: Value) -> Response {
    state.count(&c.workspace, |n| n.refused_invalid += 1);
    metrics::counter!("broadside_webhook_requests_refused_total", "reason" => "invalid")
        .increment(1);
    reject(StatusCode::BAD_REQUEST, body)
}

async fn callback(
    State(state): State<Arc<WebhookState>>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Response {
    let query = query_pairs(q.as_deref());
    let (cred, body) = match authenticate(&state, &query, req).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    match decode_callback_for(&body, &query, &cred.workspace) {
        Ok(rows) => deliver(&state, &cred.workspace, rows).await,
        Err(CallbackRejection::MissingEvent) => invalid(
            &state,
            &cred,
            json!({"error": "missing field `event`", "reason": "missing_field"}),
        ),
        Err(CallbackRejection::Invalid(reason)) => invalid(
            &state,
            &cred,
            json!({"error": reason.to_string(), "reason": reason.code()}),
        ),
        Err(CallbackRejection::ForeignWorkspace(w)) => {
            foreign(&state, &cred, json!([{"index": 0, "workspace_id": w}]), 1)
        }
    }
}

async fn events(
    State(state): State<Arc<WebhookState>>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Response {
    let query = query_pairs(q.as_deref());
    let (cred, body) = match authenticate(&state, &query, req).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    match decode_batch_for(&body, &cred.workspace) {
        Ok(rows) => deliver(&state, &cred.workspace, rows).await,
        Err(BatchRejection::MalformedArray { detail }) => invalid(
            &state,
            &cred,
            json!({"error": format!("malformed JSON array: {detail}"), "reason": "malformed_json"}),
        ),
        Err(BatchRejection::MalformedLine { index, detail }) => invalid(
            &state,
            &cred,
            json!({"errors": [{"index": index, "reason": "malformed_json", "detail": detail}]}),
        ),
        Err(BatchRejection::InvalidItems(items)) => {
            let errors: Vec<Value> = items
                .iter()
                .map(|(i, r)| json!({"index": i, "reason": r.code(), "detail": r.to_string()}))
                .collect();
            invalid(&state, &cred, json!({ "errors": errors }))
        }
        Err(BatchRejection::ForeignWorkspace(items)) => {
            let n = items.len();
            let items: Vec<Value> = items
                .iter()
                .map(|(i, w)| json!({"index": i, "workspace_id": w}))
                .collect();
            foreign(&state, &cred, Value::Array(items), n)
        }
    }
}

/// `GET /webhooks/stats`: the caller's workspace's counters and the refusals no workspace can
/// be charged with.
async fn stats(
    State(state): State<Arc<WebhookState>>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Response {
    let query = query_pairs(q.as_deref());
    let (cred, _) = match authenticate(&state, &query, req).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let counts = state
        .workspaces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&cred.workspace)
        .cloned()
        .unwrap_or_default();
    Json(json!({
        "workspace_id": cred.workspace,
        "counts": counts,
        "server": {
            "refused_unauthorized": state.server.unauthorized.load(Ordering::Relaxed),
            "refused_too_large": state.server.too_large.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}

/// How far a tracking webhook's signature timestamp may be from our clock.
const LOB_TOLERANCE: Duration = Duration::from_secs(300);

/// `POST /webhooks/lob`: a printer's delivery tracking webhook (docs/printers.md, "Delivery
/// tracking"). Signed with the printer's secret (401 otherwise); `delivered` becomes a
/// `delivered` event and `returned_to_sender` a hard `bounced` one, filed under the workspace,
/// campaign, run, variant and recipient the piece's metadata carries (set by `broadside send`).
/// Other milestones, and pieces without our metadata, are acknowledged and not recorded, so
/// the printer does not retry them.
async fn lob_tracking(State(state): State<Arc<WebhookState>>, req: Request) -> Response {
    use broadside_tracking::tracking::{verify_signature, TrackingUpdate};
    let (Some(secret), Some(workspace)) = (&state.lob_secret, &state.lob_workspace) else {
        return reject(StatusCode::NOT_FOUND, json!({"error": "not configured"}));
    };
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = match read_body(&state, &headers, body).await {
        Ok(b) => b,
        Err(refused) => return refused,
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
        state.server.refused_unauthorized();
        return reject(
            StatusCode::UNAUTHORIZED,
            json!({"error": e.to_string(), "reason": "unauthorized"}),
        );
    }
    let update = match TrackingUpdate::parse(&body) {
        Ok(u) => u,
        Err(e) => return reject(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    let printer = WebhookCredential {
        name: "printer".into(),
        workspace: workspace.clone(),
        sha256: String::new(),
    };
    match lob_event_row(&update) {
        Ok(row) if row.workspace_id != workspace.as_str() => foreign(
            &state,
            &printer,
            json!([{"index": 0, "workspace_id": row.workspace_id}]),
            1,
        ),
        Ok(row) => deliver(&state, workspace, vec![row]).await,
        Err(why) => (
            StatusCode::OK,
            Json(json!({"accepted": 0, "duplicates": 0, "ignored": why})),
        )
            .into_response(),
    }
}

/// The prefix of the event id of every printer tracking event (`lob-<printer event id>`), by
/// which the mail state readers ([`crate::query::mail`]) find them.
pub const LOB_EVENT_PREFIX: &str = "lob-";

/// The event a tracking update is recorded as, or why it is not recorded.
fn lob_event_row(
    u: &broadside_tracking::tracking::TrackingUpdate,
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
        event_id: format!("{LOB_EVENT_PREFIX}{}", u.event_id).into(),
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

async fn deliver(
    state: &Arc<WebhookState>,
    workspace: &str,
    rows: Vec<EventRow<'static>>,
) -> Response {
    // Ids are remembered per workspace: one tenant's ids must not shadow another's events.
    let key = |r: &EventRow<'_>| format!("{}\u{1f}{}", r.workspace_id, r.event_id);
    let fresh = {
        let keys: Vec<String> = rows.iter().map(key).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        state
            .dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(&keys)
    };
    let duplicates = rows.len() - fresh.len();
    let keep: Vec<EventRow<'static>> = {
        let mut rows = rows.into_iter().map(Some).collect::<Vec<_>>();
        fresh.iter().filter_map(|&i| rows[i].take()).collect()
    };
    let ids: Vec<String> = keep.iter().map(key).collect();
    let accepted = keep.len();
    let result = if keep.is_empty() {
        Ok(())
    } else {
        match &state.sink {
            WebhookSink::Store { store, attribution } => {
                let (store, attribution) = (store.clone(), attribution.clone());
                tokio::task::spawn_blocking(move || write_rows(&store, &attribution, &keep))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
            WebhookSink::Kafka { producer, topic } => produce_rows(producer, topic, &keep).await,
        }
    };
    match result {
        Ok(()) => {
            state.count(workspace, |n| {
                n.accepted += accepted as u64;
                n.duplicates += duplicates as u64;
            });
            for (outcome, n) in [("accepted", accepted), ("duplicate", duplicates)] {
                metrics::counter!(
                    "broadside_webhook_events_total",
                    "workspace" => workspace.to_string(),
                    "outcome" => outcome
                )
                .increment(n as u64);
            }
            (
                StatusCode::OK,
                Json(json!({"accepted": accepted, "duplicates": duplicates})),
            )
                .into_response()
        }
        Err(e) => {
            state
                .dedup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(&ids);
            tracing::error!(error = %e, "webhook delivery failed");
            metrics::counter!("broadside_webhook_delivery_failures_total").increment(1);
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
fn write_rows(store: &Path, attribution: &Attribution, rows: &[EventRow<'static>]) -> Result<()> {
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
        let (batch, _) = attribution.apply(ws, b.finish()?)?;
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
    use broadside_tracking::tracking::TrackingUpdate;

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
