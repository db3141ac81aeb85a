//! A local Lob test server: `POST /v1/postcards` and `POST /v1/letters` with the request and
//! answer shapes of Lob's public API (lob/lob-openapi), its error shape
//! `{"error": {"message", "status_code", "code"}}`, Basic auth with the API key as user, and
//! idempotency keys (`Idempotency-Key` header or `idempotency_key` query parameter): a key seen
//! before gets the first answer again, byte for byte (the first piece with the `metadata` it was
//! created with, whatever the repeated request carries), and no new mailpiece. Like Lob, it
//! sends no header or field marking an answer as a replay.
//!
//! Faults are injected by call number (0 = the first request the server receives, whatever
//! the endpoint): 429 with `Retry-After`, 500, a connection dropped before the request is
//! processed, or one dropped after the mailpiece was created (the answer is lost: the case
//! idempotency keys exist for). Binds 127.0.0.1 on a free port.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

/// A fault the server injects instead of (or after) handling a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 429 `rate_limit_exceeded` with `Retry-After: secs`; nothing is created.
    TooManyRequests {
        /// The header's value.
        retry_after_secs: u64,
    },
    /// 500 `internal_server_error`; nothing is created.
    ServerError,
    /// The connection is closed before the request is handled; nothing is created.
    ResetBeforeProcessing,
    /// The request is handled (the mailpiece is created) and the connection is closed
    /// instead of answering.
    DropAfterProcessing,
}

impl Fault {
    /// Every fault, for matrices.
    pub const ALL: [Fault; 4] = [
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Fault::ServerError,
        Fault::ResetBeforeProcessing,
        Fault::DropAfterProcessing,
    ];
}

type Plan = Box<dyn Fn(u64) -> Option<Fault> + Send + Sync>;

/// A mailpiece the server created.
#[derive(Debug, Clone)]
pub struct Piece {
    /// `psc_…` or `ltr_…`.
    pub id: String,
    /// The idempotency key it was created with.
    pub idempotency_key: Option<String>,
    /// The request body.
    pub request: Value,
}

#[derive(Default)]
struct Store {
    pieces: Vec<Piece>,
    /// Idempotency key → the answer given the first time.
    answers: HashMap<String, (StatusCode, Value)>,
}

struct Shared {
    auth: String,
    latency: Duration,
    calls: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    faults: Mutex<BTreeMap<u64, Fault>>,
    plan: Mutex<Option<Plan>>,
    store: Mutex<Store>,
}

/// The running server; stops when dropped.
pub struct LobServer {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LobServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LobServer {
    /// Starts a server accepting `api_key`, answering after `latency` (zero: at once).
    pub async fn start(api_key: &str, latency: Duration) -> LobServer {
        Self::start_at("127.0.0.1:0", api_key, latency).await
    }

    /// [`LobServer::start`] on a given address (`127.0.0.1:8089`).
    pub async fn start_at(addr: &str, api_key: &str, latency: Duration) -> LobServer {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            auth: format!("Basic {}", base64(format!("{api_key}:").as_bytes())),
            latency,
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            faults: Mutex::new(BTreeMap::new()),
            plan: Mutex::new(None),
            store: Mutex::new(Store::default()),
        });
        let router = Router::new()
            .route("/v1/postcards", post(create_postcard))
            .route("/v1/letters", post(create_letter))
            .fallback(|| async {
                lob_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "The requested URL was not found",
                )
            })
            .with_state(shared.clone());
        let task = tokio::spawn(accept_loop(listener, shared.clone(), router));
        LobServer {
            base_url,
            shared,
            task,
        }
    }

    /// Injects `fault` at call number `call` (0-based, counted over all requests).
    pub fn fault_at(&self, call: u64, fault: Fault) {
        self.shared.faults.lock().unwrap().insert(call, fault);
    }

    /// Injects faults by a rule over the call number (after `fault_at` entries).
    pub fn fault_plan(&self, plan: impl Fn(u64) -> Option<Fault> + Send + Sync + 'static) {
        *self.shared.plan.lock().unwrap() = Some(Box::new(plan));
    }

    /// Requests received.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Requests being handled now (a killed client's last requests may still be finishing).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Most requests being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// The mailpieces created, in creation order.
    pub fn pieces(&self) -> Vec<Piece> {
        self.shared.store.lock().unwrap().pieces.clone()
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>, router: Router) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req| handle(shared.clone(), router.clone(), req));
            // A service error closes the connection without an answer: that is how faults
            // drop connections.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(s: &'a Shared) -> InFlight<'a> {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    shared: Arc<Shared>,
    router: Router,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<Response, std::io::Error> {
    let call = shared.calls.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&shared);
    if !shared.latency.is_zero() {
        // Simulated printer latency, so concurrent requests overlap.
        tokio::time::sleep(shared.latency).await;
    }
    let fault = shared
        .faults
        .lock()
        .unwrap()
        .get(&call)
        .copied()
        .or_else(|| {
            shared
                .plan
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|plan| plan(call))
        });
    let dropped = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected fault");
    match fault {
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            let mut resp = lob_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "Rate limit exceeded. Please wait and try again.",
            );
            resp.headers_mut()
                .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
            Ok(resp)
        }
        Some(Fault::ServerError) => Ok(lob_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "An internal server error occurred.",
        )),
        Some(Fault::ResetBeforeProcessing) => Err(dropped()),
        Some(Fault::DropAfterProcessing) => {
            let resp = router.oneshot(req).await.unwrap();
            // Read the answer fully so the piece is surely stored, then lose it.
            let _ = axum::body::to_bytes(resp.into_body(), usize::MAX).await;
            Err(dropped())
        }
        None => Ok(router.oneshot(req).await.unwrap()),
    }
}

fn lob_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(error_body(status, code, message))).into_response()
}

fn error_body(status: StatusCode, code: &str, message: &str) -> Value {
    json!({"error": {"message": message, "status_code": status.as_u16(), "code": code}})
}

#[derive(Clone, Copy)]
enum Kind {
    Postcard,
    Letter,
}

async fn create_postcard(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(&s, Kind::Postcard, &uri, &headers, &body)
}

async fn create_letter(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(&s, Kind::Letter, &uri, &headers, &body)
}

fn create(s: &Shared, kind: Kind, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(s.auth.as_str()) {
        return lob_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Your API key is not valid. Please sign up on lob.com to get a valid api key.",
        );
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            uri.query()?
                .split('&')
                .find_map(|kv| kv.strip_prefix("idempotency_key="))
                .map(str::to_string)
        });
    if let Some(k) = &key {
        if k.len() > 256 {
            return lob_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "idempotency key must be no longer than 256 characters",
            );
        }
    }
    // Checking and creating under one lock: concurrent retries with one key make one piece.
    let mut store = s.store.lock().unwrap();
    if let Some((status, answer)) = key.as_ref().and_then(|k| store.answers.get(k)) {
        return (*status, axum::Json(answer.clone())).into_response();
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return lob_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "The request body is not a JSON object",
            )
        }
    };
    if let Err(message) = validate(kind, &request) {
        return lob_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", &message);
    }
    let n = store.pieces.len() as u64 + 1;
    let (prefix, object) = match kind {
        Kind::Postcard => ("psc", "postcard"),
        Kind::Letter => ("ltr", "letter"),
    };
    let id = format!("{prefix}_{:016x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut answer = Map::new();
    answer.insert("id".into(), id.clone().into());
    answer.insert("object".into(), object.into());
    for field in [
        "description",
        "metadata",
        "merge_variables",
        "size",
        "color",
        "front",
        "back",
        "file",
    ] {
        if let Some(v) = request.get(field) {
            answer.insert(field.into(), v.clone());
        }
    }
    let mut to = request["to"].clone();
    to["id"] = format!("adr_{:016x}", n).into();
    to["object"] = "address".into();
    answer.insert("to".into(), to);
    if let Some(from) = request.get("from") {
        answer.insert("from".into(), from.clone());
    }
    answer.insert("carrier".into(), "USPS".into());
    answer.insert("mail_type".into(), "usps_first_class".into());
    answer.insert(
        "url".into(),
        format!("https://lob-assets.invalid/{id}.pdf").into(),
    );
    answer.insert("expected_delivery_date".into(), "2026-12-09".into());
    answer.insert("date_created".into(), "2026-12-02T10:00:00.000Z".into());
    answer.insert("deleted".into(), false.into());
    let answer = Value::Object(answer);
    if let Some(k) = &key {
        store
            .answers
            .insert(k.clone(), (StatusCode::OK, answer.clone()));
    }
    store.pieces.push(Piece {
        id,
        idempotency_key: key,
        request,
    });
    (StatusCode::OK, axum::Json(answer)).into_response()
}

/// Lob's documented constraints on the create requests (the subset the client sends).
fn validate(kind: Kind, req: &Value) -> Result<(), String> {
    validate_address("to", req.get("to"))?;
    match kind {
        Kind::Postcard => {
            for side in ["front", "back"] {
                if !req.get(side).is_some_and(Value::is_string) {
                    return Err(format!("{side} is required"));
                }
            }
            if let Some(size) = req.get("size") {
                if !matches!(size.as_str(), Some("4x6" | "6x9" | "6x11")) {
                    return Err("size must be one of [4x6, 6x9, 6x11]".into());
                }
            }
            if req.get("from").is_some() {
                validate_address("from", req.get("from"))?;
            }
        }
        Kind::Letter => {
            validate_address("from", req.get("from"))?;
            if !req.get("file").is_some_and(Value::is_string) {
                return Err("file is required".into());
            }
            if !req.get("color").is_some_and(Value::is_boolean) {
                return Err("color is required".into());
            }
        }
    }
    if let Some(m) = req.get("merge_variables") {
        if !m.is_object() {
            return Err("merge_variables must be an object".into());
        }
    }
    if let Some(m) = req.get("metadata") {
        let Some(m) = m.as_object() else {
            return Err("metadata must be an object".into());
        };
        if m.len() > 20 {
            return Err("metadata must have at most 20 keys".into());
        }
        for (k, v) in m {
            if k.chars().count() > 40 {
                return Err(format!("metadata key {k:?} must be at most 40 characters"));
            }
            match v.as_str() {
                Some(v) if v.chars().count() <= 500 => {}
                _ => {
                    return Err(format!(
                        "metadata.{k} must be a string of at most 500 characters"
                    ))
                }
            }
        }
    }
    Ok(())
}

fn validate_address(which: &str, a: Option<&Value>) -> Result<(), String> {
    let Some(a) = a.and_then(Value::as_object) else {
        return Err(format!("{which} is required"));
    };
    let text = |f: &str| a.get(f).and_then(Value::as_str).filter(|s| !s.is_empty());
    if text("name").is_none() && text("company").is_none() {
        return Err(format!("{which} must have a name or a company"));
    }
    for (field, max) in [
        ("name", 40),
        ("company", 40),
        ("address_line1", 64),
        ("address_line2", 64),
        ("address_city", 200),
    ] {
        if let Some(v) = text(field) {
            if v.chars().count() > max {
                return Err(format!(
                    "{which}.{field} length must be less than or equal to {max} characters long"
                ));
            }
        }
    }
    if text("address_line1").is_none() {
        return Err(format!("{which}.address_line1 is required"));
    }
    let country = text("address_country").unwrap_or("US");
    if country == "US" {
        if text("address_city").is_none() {
            return Err(format!("{which}.address_city is required"));
        }
        if !text("address_state")
            .is_some_and(|s| s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(format!(
                "{which}.address_state must be a 2 letter state code"
            ));
        }
        let zip_ok = text("address_zip").is_some_and(|z| {
            let b = z.as_bytes();
            (b.len() == 5 && b.iter().all(u8::is_ascii_digit))
                || (b.len() == 10
                    && b[..5].iter().all(u8::is_ascii_digit)
                    && b[5] == b'-'
                    && b[6..].iter().all(u8::is_ascii_digit))
        });
        if !zip_ok {
            return Err(format!(
                "{which}.address_zip must be in the format 12345 or 12345-1234"
            ));
        }
    }
    Ok(())
}

fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                A[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}
