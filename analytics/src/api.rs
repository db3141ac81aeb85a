//! The analytics HTTP API (mounted by `broadside serve`): statistics, time series, events,
//! bounces, runs, recipient logs and analyst SQL, JSON by default. docs/openapi.json describes
//! every route and is served at `/openapi.json`.
//!
//! Every route but `/healthz` and `/openapi.json` needs `Authorization: Bearer <token>` and a
//! `workspace_id` header. Tokens are configured as SHA-256 hashes with the workspaces each may
//! read ([`TokenSet`]). No or unknown token: 401; a workspace the token may not read (or an
//! invalid id): 403; a `workspace_id` query parameter that differs from the header: 403. The
//! workspace then scopes the DataFusion session: its tables only list that workspace's files.
//!
//! `POST /sql` runs within the catalog's [`Limits`] (rows, bytes, memory, time) and behind a
//! concurrency gate ([`SqlConcurrency`]): past it the answer is `429` with `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::credentials::same_secret;
pub use crate::credentials::token_hash;
use crate::error::{Error, Result};
use crate::historical::{self, ImportReport, ImportRequest};
use crate::params::{
    self, parse_event_type, parse_instant, parse_tz, Granularity, ParamError, Params,
};
use crate::query::lists::{self, EventFilter, HistoricalFilter, LogFilter};
use crate::query::runs::{list_runs, load_runs, RunFilter};
use crate::query::sql::{run_sql, JsonRows, Truncation};
use crate::query::{Catalog, Limits, QueryError, Scope};
use crate::stats::{campaign_statistics, StatsQuery};
use crate::timeseries::{time_series, SeriesQuery};

/// The OpenAPI document (checked in as docs/openapi.json).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Seconds a caller turned away by the SQL concurrency gate is told to wait (`Retry-After`).
pub const SQL_RETRY_AFTER_SECS: u64 = 1;

/// One configured token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A name for logs (never the token).
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Workspaces the token may read.
    pub workspaces: Vec<String>,
}

/// The configured tokens (a TOML file of `[[tokens]]` entries; see docs/analytics.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSet {
    /// The entries.
    pub tokens: Vec<TokenEntry>,
}

impl TokenSet {
    /// Reads and checks a token file; every problem is listed.
    pub fn load(path: &Path) -> Result<TokenSet> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let set: TokenSet = toml::from_str(&text).map_err(|e| Error::Config {
            what: "token file",
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        let mut problems = Vec::new();
        for (i, t) in set.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!(
                    "tokens[{i}] ({}): sha256 must be 64 hex digits (`broadside token new` prints one)",
                    t.name
                ));
            }
            for w in &t.workspaces {
                if !crate::decode::valid_workspace_id(w) {
                    problems.push(format!("tokens[{i}] ({}): invalid workspace {w:?}", t.name));
                }
            }
        }
        if set.tokens.is_empty() {
            problems.push(format!("{}: no [[tokens]] entries", path.display()));
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(Error::Config {
                what: "token file",
                problems,
            })
        }
    }

    fn find(&self, token: &str) -> Option<&TokenEntry> {
        let h = token_hash(token);
        self.tokens
            .iter()
            .find(|t| same_secret(t.sha256.to_ascii_lowercase().as_bytes(), h.as_bytes()))
    }
}

/// Status of a background historical-bounce backfill.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillJob {
    /// Job id.
    pub job_id: String,
    /// Workspace.
    pub workspace_id: String,
    /// `running`, `done` or `failed`.
    pub status: &'static str,
    /// When it was started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// What it did, once done.
    pub report: Option<ImportReport>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Settings of the analytics API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The catalog (store and limits).
    pub catalog: Catalog,
    /// Accepted tokens.
    pub tokens: TokenSet,
    /// Root of historical bounce CSV exports: `POST /historical-bounces/backfill` imports the
    /// caller's folder `<bounce_history>/workspace_id=<W>/` only.
    pub bounce_history: Option<PathBuf>,
    /// How many `POST /sql` queries may run at once.
    pub sql: SqlConcurrency,
}

/// How many analyst SQL queries may run at once. Each running query holds up to
/// [`Limits::memory_bytes`], so analyst SQL holds at most `overall` times that.
#[derive(Debug, Clone, Copy)]
pub struct SqlConcurrency {
    /// Queries running at once, all tokens together.
    pub overall: usize,
    /// Queries running at once for one token.
    pub per_token: usize,
}

impl Default for SqlConcurrency {
    fn default() -> Self {
        SqlConcurrency {
            overall: 4,
            per_token: 2,
        }
    }
}

/// Admits `POST /sql` queries within [`SqlConcurrency`]; never waits (a full gate is a 429).
struct SqlGate {
    limits: SqlConcurrency,
    overall: Arc<Semaphore>,
    per_token: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A running query's places in the gate, given back when dropped.
struct Admitted {
    _token: OwnedSemaphorePermit,
    _overall: OwnedSemaphorePermit,
}

impl SqlGate {
    fn new(limits: SqlConcurrency) -> SqlGate {
        SqlGate {
            limits,
            overall: Arc::new(Semaphore::new(limits.overall)),
            per_token: Mutex::new(HashMap::new()),
        }
    }

    fn enter(&self, token: &Caller) -> std::result::Result<Admitted, ApiError> {
        // Keyed by the token's hash: the map holds at most one entry per configured token.
        let mine = self
            .per_token
            .lock()
            .expect("sql gate lock")
            .entry(token.key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_token)))
            .clone();
        let busy = |msg: String| ApiError::busy(msg, SQL_RETRY_AFTER_SECS);
        let token_permit = mine.try_acquire_owned().map_err(|_| {
            metrics::counter!("broadside_sql_queries_refused_total", "reason" => "token_limit")
                .increment(1);
            busy(format!(
                "token {:?} already runs {} SQL queries (the per-token limit); retry when one ends",
                token.name, self.limits.per_token
            ))
        })?;
        let overall = self.overall.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("broadside_sql_queries_refused_total", "reason" => "overall_limit")
                .increment(1);
            busy(format!(
                "the server already runs {} SQL queries (the overall limit); retry shortly",
                self.limits.overall
            ))
        })?;
        Ok(Admitted {
            _token: token_permit,
            _overall: overall,
        })
    }
}

/// Analyst SQL runs on a runtime of its own (`bs-sql` threads). A CPU-bound plan yields
/// seldom; on the runtime that answers HTTP it would hold those threads, and every other
/// request (other tenants', health checks, webhooks) would wait for it, its time limit
/// included. Here the operating system shares the cores between both runtimes' threads.
fn sql_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("bs-sql")
            .enable_all()
            .build()
            .expect("starting the SQL runtime")
    })
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a running `POST /sql` query in `broadside_sql_queries_running` while it lives.
struct Running;

impl Running {
    fn sql() -> Running {
        metrics::gauge!("broadside_sql_queries_running").increment(1.0);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!("broadside_sql_queries_running").decrement(1.0);
    }
}

/// Finished backfill jobs kept for `GET /historical-bounces/backfill/{job_id}`; the oldest
/// finished are forgotten first. Records live in memory: a restart forgets them (the imported
/// rows stay in the store).
pub const BACKFILL_JOBS_KEPT: usize = 100;

struct ApiState {
    catalog: Catalog,
    tokens: TokenSet,
    bounce_history: Option<PathBuf>,
    jobs: Mutex<BTreeMap<String, BackfillJob>>,
    next_job: AtomicU64,
    sql_gate: SqlGate,
}

/// The workspace a request was authorised for.
#[derive(Debug, Clone)]
struct Ws(String);

/// The token a request was authorised with.
#[derive(Debug, Clone)]
struct Caller {
    /// The token's name (for messages and logs).
    name: String,
    /// The token's hash, lowercase (a key per token).
    key: String,
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError(StatusCode, String, Option<u64>);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(status, msg.into(), None)
    }

    /// `429 Too Many Requests` with `Retry-After: secs`.
    fn busy(msg: String, secs: u64) -> ApiError {
        ApiError(StatusCode::TOO_MANY_REQUESTS, msg, Some(secs))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({"error": self.1}))).into_response();
        if let Some(secs) = self.2 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let status = match &e {
            QueryError::BadRequest(_) => StatusCode::BAD_REQUEST,
            QueryError::NotFound(_) => StatusCode::NOT_FOUND,
            QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ if e.is_memory_limit() => StatusCode::UNPROCESSABLE_ENTITY,
            _ if e.is_client_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "query failed");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.0)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// The analytics routes; merge with the webhook routes in `broadside serve`.
pub fn api_router(cfg: ApiConfig) -> Router {
    let state = Arc::new(ApiState {
        catalog: cfg.catalog,
        tokens: cfg.tokens,
        bounce_history: cfg.bounce_history,
        jobs: Mutex::new(BTreeMap::new()),
        next_job: AtomicU64::new(1),
        sql_gate: SqlGate::new(cfg.sql),
    });
    let authed = Router::new()
        .route("/campaign-statistics/", get(statistics))
        .route("/campaign-statistics", get(statistics))
        .route("/campaign-statistics/{campaign_id}", get(campaign_stats))
        .route(
            "/campaign-statistics/{campaign_id}/time-series",
            get(series),
        )
        .route("/campaign-events/", get(events))
        .route("/campaign-events", get(events))
        .route("/bounce-events/", get(bounce_events))
        .route("/bounce-events", get(bounce_events))
        .route("/bounce-events/{id}", get(bounce_event))
        .route("/historical-bounces/", get(historical_list))
        .route("/historical-bounces", get(historical_list))
        .route("/historical-bounces/export", get(historical_export))
        .route("/historical-bounces/backfill", post(backfill))
        .route(
            "/historical-bounces/backfill/{job_id}",
            get(backfill_status),
        )
        .route("/campaign-runs/", get(runs))
        .route("/campaign-runs", get(runs))
        .route("/campaign-runs/{id}", get(run))
        .route("/campaign-recipient-logs/", get(logs))
        .route("/campaign-recipient-logs", get(logs))
        .route("/campaign-recipient-logs/{id}", get(log))
        .route("/recipients/{email}/history", get(history))
        .route("/sql", post(sql))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(authed)
}

/// The OpenAPI document of what one server mounts: the routes of the parts it serves
/// (by tag: `analytics`, `webhooks`, `campaigns`; `/webhooks/lob` only with the printer's
/// secret), plus `/healthz` and `/openapi.json`.
pub fn openapi_for(analytics: bool, webhooks: bool, lob: bool, campaigns: bool) -> Value {
    let mut doc: Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json parses");
    let paths = doc["paths"].as_object_mut().expect("paths");
    paths.retain(|path, ops| {
        let tagged = |t: &str| {
            ops.as_object()
                .is_some_and(|o| o.values().any(|op| op["tags"] == json!([t])))
        };
        match path.as_str() {
            "/healthz" | "/openapi.json" => true,
            "/webhooks/lob" => lob,
            _ if tagged("analytics") => analytics,
            _ if tagged("webhooks") => webhooks,
            _ if tagged("campaigns") => campaigns,
            _ => false,
        }
    });
    doc
}

async fn auth(
    State(state): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> std::result::Result<Response, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m.to_string());
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, m);
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("Authorization must be `Bearer <token>`"))?;
    let entry = state
        .tokens
        .find(token.trim())
        .ok_or_else(|| unauthorized("unknown token"))?;
    let ws = req
        .headers()
        .get("workspace_id")
        .ok_or_else(|| forbidden("missing workspace_id header".into()))?
        .to_str()
        .map_err(|_| forbidden("workspace_id header is not text".into()))?
        .to_string();
    if !entry.workspaces.contains(&ws) || Scope::workspace(&ws).is_err() {
        tracing::warn!(token = %entry.name, workspace = %ws, "workspace refused");
        return Err(forbidden(format!(
            "token {:?} may not read workspace {ws:?}",
            entry.name
        )));
    }
    let query_ws = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "workspace_id")
        .map(|(_, v)| v.into_owned())
        .find(|v| *v != ws);
    if let Some(q) = query_ws {
        return Err(forbidden(format!(
            "workspace_id query parameter {q:?} differs from the header {ws:?}"
        )));
    }
    let caller = Caller {
        name: entry.name.clone(),
        key: entry.sha256.to_ascii_lowercase(),
    };
    req.extensions_mut().insert(Ws(ws));
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

async fn statistics(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::STATISTICS_PARAMS)?;
    let (from, to) = p.range()?;
    let stats = campaign_statistics(
        &s.catalog,
        &ws,
        &StatsQuery {
            campaign_id: None,
            from,
            to,
            raw_only: false,
        },
    )
    .await?;
    Ok(Json(json!({ "items": stats })))
}

async fn campaign_stats(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(campaign_id): UrlPath<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::STATISTICS_PARAMS)?;
    let (from, to) = p.range()?;
    let stats = campaign_statistics(
        &s.catalog,
        &ws,
        &StatsQuery {
            campaign_id: Some(campaign_id.clone()),
            from,
            to,
            raw_only: false,
        },
    )
    .await?;
    let one = stats.into_iter().next().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no events of campaign {campaign_id:?}"),
        )
    })?;
    Ok(Json(serde_json::to_value(one).expect("stats serialise")))
}

async fn series(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(campaign_id): UrlPath<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::SERIES_PARAMS)?;
    let (from, to) = p.range()?;
    let granularity = Granularity::parse(&p.text("granularity").unwrap_or_else(|| "day".into()))?;
    let time_zone = parse_tz(&p.text("time_zone").unwrap_or_else(|| "UTC".into()))?;
    let event_types = p
        .get("event_type")
        .map(params::parse_event_types)
        .transpose()?
        .unwrap_or_default();
    let series = time_series(
        &s.catalog,
        &ws,
        &SeriesQuery {
            campaign_id,
            granularity,
            time_zone,
            from,
            to,
            event_types,
            raw_only: false,
        },
    )
    .await?;
    Ok(Json(
        serde_json::to_value(series).expect("series serialise"),
    ))
}

async fn events(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::EVENTS_PARAMS)?;
    let (from, to) = p.range()?;
    let filter = EventFilter {
        event_type: p
            .text("event_type")
            .map(|t| parse_event_type(&t).map(|e| e.as_str().to_string()))
            .transpose()?,
        campaign_id: p.text("campaign_id"),
        variant: p.text("variant"),
        email: p.text("email"),
        run_id: p.text("run_id"),
        bounce_type: None,
        from,
        to,
    };
    let page = lists::list_events(
        &s.catalog,
        &ws,
        "events",
        &filter,
        p.limit()?,
        p.get("cursor"),
    )
    .await?;
    Ok(Json(serde_json::to_value(page).expect("page serialises")))
}

async fn bounce_events(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::BOUNCE_EVENTS_PARAMS)?;
    let (from, to) = p.range()?;
    let filter = EventFilter {
        email: p.text("email"),
        campaign_id: p.text("campaign_id"),
        bounce_type: p.text("bounce_type"),
        from,
        to,
        ..Default::default()
    };
    let page = lists::list_events(
        &s.catalog,
        &ws,
        "bounce_events",
        &filter,
        p.limit()?,
        p.get("cursor"),
    )
    .await?;
    Ok(Json(serde_json::to_value(page).expect("page serialises")))
}

async fn bounce_event(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        lists::get_event(&s.catalog, &ws, "bounce_events", &id).await?,
    ))
}

fn historical_filter(q: Option<&str>, list: bool) -> ApiResult<(HistoricalFilter, Params)> {
    let allowed = if list {
        params::HISTORICAL_LIST_PARAMS
    } else {
        params::HISTORICAL_PARAMS
    };
    let p = Params::parse(q, allowed)?;
    let (from, to) = p.range()?;
    Ok((
        HistoricalFilter {
            email: p.text("email"),
            bounce_type: p.text("bounce_type"),
            account_number: p.text("account_number"),
            from,
            to,
        },
        p,
    ))
}

async fn historical_list(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let (filter, p) = historical_filter(q.as_deref(), true)?;
    let page =
        lists::list_historical(&s.catalog, &ws, &filter, p.limit()?, p.get("cursor")).await?;
    Ok(Json(serde_json::to_value(page).expect("page serialises")))
}

/// Streams matching historical bounces as CSV (header first), batch by batch.
async fn historical_export(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Response> {
    let (filter, _) = historical_filter(q.as_deref(), false)?;
    let ctx = s.catalog.session(&Scope::Workspace(ws.clone()))?;
    let df = ctx
        .table("historical_bounces")
        .await
        .map_err(QueryError::from)?
        .filter(filter.expr())
        .map_err(QueryError::from)?
        .select_columns(&lists::HISTORICAL_COLUMNS)
        .map_err(QueryError::from)?
        .sort(vec![
            datafusion::logical_expr::col("bounced_at").sort(true, false),
            datafusion::logical_expr::col("email").sort(true, false),
        ])
        .map_err(QueryError::from)?;
    let stream = df.execute_stream().await.map_err(QueryError::from)?;
    let body = stream.map(|batch| -> std::result::Result<Bytes, std::io::Error> {
        let batch =
            lists::plain(&batch.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
        let mut buf = Vec::new();
        {
            let mut w = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(false)
                .build(&mut buf);
            w.write(&batch).map_err(std::io::Error::other)?;
        }
        Ok(Bytes::from(buf))
    });
    let header = Bytes::from(format!("{}\n", lists::HISTORICAL_COLUMNS.join(",")));
    let header = futures::stream::once(async move { Ok(header) });
    let name = format!("attachment; filename=\"historical-bounces-{ws}.csv\"");
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        Body::from_stream(header.chain(body)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    #[serde(default)]
    full_backfill: bool,
    since: Option<String>,
}

async fn backfill(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: BackfillBody = serde_json::from_slice(if body.is_empty() { b"{}" } else { &body })
        .map_err(|e| {
            bad(format!(
                "body: {e} (expected {{\"full_backfill\": true}} or {{\"since\": \"YYYY-MM-DD\"}})"
            ))
        })?;
    let since = b
        .since
        .as_deref()
        .map(|t| parse_instant(t, false))
        .transpose()?;
    if b.full_backfill == since.is_some() {
        return Err(bad("give exactly one of full_backfill: true or since"));
    }
    let Some(root) = s.bounce_history.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no bounce history source configured (broadside serve --bounce-history DIR)",
        ));
    };
    // Only the caller's own folder: the root holds every workspace's exports.
    let source = historical::workspace_source(&root, &ws);
    if !source.is_dir() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("no bounce history for workspace {ws:?} (folder workspace_id={ws} under --bounce-history)"),
        ));
    }
    let id = format!("bf-{}", s.next_job.fetch_add(1, Ordering::Relaxed));
    {
        let jobs = s.jobs.lock().expect("jobs lock");
        if let Some(j) = jobs
            .values()
            .find(|j| j.workspace_id == ws && j.status == "running")
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("backfill {} of this workspace is still running", j.job_id),
            ));
        }
    }
    let job = BackfillJob {
        job_id: id.clone(),
        workspace_id: ws.clone(),
        status: "running",
        started_at: Utc::now(),
        finished_at: None,
        report: None,
        error: None,
    };
    s.jobs
        .lock()
        .expect("jobs lock")
        .insert(id.clone(), job.clone());
    let state = s.clone();
    let store = s.catalog.store().to_path_buf();
    let full = b.full_backfill;
    let job_id = id.clone();
    tokio::task::spawn_blocking(move || {
        let result = historical::source_files(&source).and_then(|files| {
            historical::import(
                &store,
                &ImportRequest {
                    workspace_id: ws,
                    files,
                    since,
                    full_backfill: full,
                },
            )
        });
        let mut jobs = state.jobs.lock().expect("jobs lock");
        if let Some(j) = jobs.get_mut(&job_id) {
            j.finished_at = Some(Utc::now());
            match result {
                Ok(r) => {
                    j.status = "done";
                    j.report = Some(r);
                }
                Err(e) => {
                    tracing::warn!(job = %job_id, error = %e, "backfill failed");
                    j.status = "failed";
                    j.error = Some(e.to_string());
                }
            }
        }
        prune_jobs(&mut jobs, BACKFILL_JOBS_KEPT);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "job_id": id,
            "status": "running",
            "status_url": format!("/historical-bounces/backfill/{id}"),
        })),
    ))
}

/// Forgets the oldest finished jobs beyond `keep`; running jobs stay.
fn prune_jobs(jobs: &mut BTreeMap<String, BackfillJob>, keep: usize) {
    let mut finished: Vec<(DateTime<Utc>, String)> = jobs
        .values()
        .filter_map(|j| j.finished_at.map(|t| (t, j.job_id.clone())))
        .collect();
    if finished.len() <= keep {
        return;
    }
    finished.sort();
    for (_, id) in &finished[..finished.len() - keep] {
        jobs.remove(id);
    }
}

async fn backfill_status(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<BackfillJob>> {
    let jobs = s.jobs.lock().expect("jobs lock");
    jobs.get(&id)
        .filter(|j| j.workspace_id == ws)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no backfill job {id:?}")))
}

async fn runs(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::RUNS_PARAMS)?;
    let filter = RunFilter {
        campaign_id: p.text("campaign_id"),
        status: p.text("status"),
    };
    let (limit, cursor) = (p.limit()?, p.get("cursor").map(str::to_string));
    let store = s.catalog.store().to_path_buf();
    let page = tokio::task::spawn_blocking(move || {
        list_runs(&store, &ws, &filter, limit, cursor.as_deref())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(serde_json::to_value(page).expect("page serialises")))
}

async fn run(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let store = s.catalog.store().to_path_buf();
    let runs = tokio::task::spawn_blocking(move || load_runs(&store, Some(&ws)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    runs.into_iter()
        .find(|r| r.run_id == id)
        .map(|r| Json(serde_json::to_value(r).expect("run serialises")))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))
}

async fn logs(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::LOGS_PARAMS)?;
    let filter = LogFilter {
        campaign_id: p.text("campaign_id"),
        run_id: p.text("run_id"),
        variant: p.text("variant"),
        decision: p.text("decision"),
        reason: p.text("reason").or_else(|| p.text("suppression_reason")),
        key: p.text("key"),
    };
    let page = lists::list_logs(&s.catalog, &ws, &filter, p.limit()?, p.get("cursor")).await?;
    Ok(Json(serde_json::to_value(page).expect("page serialises")))
}

async fn log(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(lists::get_log(&s.catalog, &ws, &id).await?))
}

/// `GET /recipients/{email}/history`: one recipient's events and ledger rows, newest first.
async fn history(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    UrlPath(email): UrlPath<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let p = Params::parse(q.as_deref(), params::HISTORY_PARAMS)?;
    if email.trim().is_empty() {
        return Err(bad("recipient: expected an address or account number"));
    }
    let page =
        crate::recipients::recipient_history(&s.catalog, &ws, &email, p.limit()?, p.get("cursor"))
            .await?;
    let mut v = serde_json::to_value(page).expect("page serialises");
    v["recipient"] = json!(email.trim());
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlBody {
    sql: String,
}

/// `POST /sql` with `{"sql": "..."}` (or the statement as a text body): the caller's workspace
/// only, read-only, within the catalog's [`Limits`] and the [`SqlConcurrency`] gate.
async fn sql(
    State(s): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let text = if is_json {
        serde_json::from_slice::<SqlBody>(&body)
            .map_err(|e| bad(format!("body: {e} (expected {{\"sql\": \"SELECT …\"}})")))?
            .sql
    } else {
        String::from_utf8(body.to_vec()).map_err(|_| bad("body is not UTF-8"))?
    };
    drop(body);
    let _admitted = s.sql_gate.enter(&caller)?;
    let _running = Running::sql();
    let limits: Limits = s.catalog.limits();
    // The plan runs on the SQL runtime; the task is aborted if this request is dropped (the
    // client went away), as the plan was when it ran here.
    let catalog = s.catalog.clone();
    let task = sql_runtime().spawn(async move {
        let mut rows = JsonRows::after(b"{\"rows\":[");
        let answer = run_sql(&catalog, &Scope::Workspace(ws), &text, &mut rows).await;
        (answer, rows)
    });
    let abort = AbortOnDrop(task.abort_handle());
    let (answer, rows) = task
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("SQL task: {e}")))?;
    drop(abort);
    let answer = answer.inspect_err(|e| {
        let reason = match e {
            QueryError::Timeout(_) => "timeout",
            _ if e.is_memory_limit() => "memory_limit",
            _ => return,
        };
        metrics::counter!("broadside_sql_queries_refused_total", "reason" => reason).increment(1);
    })?;
    let columns: Vec<&String> = answer.schema.fields().iter().map(|f| f.name()).collect();
    let reason = answer.truncated.map(|t| match t {
        Truncation::RowLimit => format!(
            "row limit: the answer holds the first {} rows",
            limits.max_rows
        ),
        Truncation::ByteLimit => format!(
            "byte limit: the next row would take the rows past {} bytes of JSON",
            limits.max_bytes
        ),
    });
    let tail = json!({
        "columns": columns,
        "row_count": answer.rows,
        "truncated": answer.truncated.is_some(),
        "truncated_by": answer.truncated,
        "truncated_reason": reason,
    })
    .to_string();
    // `],` then the tail object's fields (its braces dropped) close the answer object.
    let suffix = format!("],{}", &tail[1..]);
    let text = rows.finish(suffix.as_bytes(), &answer.reservation)?;
    // The reservation travels with the bytes: the answer counts against the pool until the
    // connection has written it.
    let body = Bytes::from_owner(ReservedText {
        text,
        _reservation: answer.reservation,
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response())
}

/// An answer's text and its memory reservation, freed together.
struct ReservedText {
    text: Vec<u8>,
    _reservation: datafusion::execution::memory_pool::MemoryReservation,
}

impl AsRef<[u8]> for ReservedText {
    fn as_ref(&self) -> &[u8] {
        &self.text
    }
}

/// The route paths (for checking the OpenAPI document covers them).
pub const ROUTES: [&str; 18] = [
    "/healthz",
    "/openapi.json",
    "/campaign-statistics/",
    "/campaign-statistics/{campaign_id}",
    "/campaign-statistics/{campaign_id}/time-series",
    "/campaign-events/",
    "/bounce-events/",
    "/bounce-events/{id}",
    "/historical-bounces/",
    "/historical-bounces/export",
    "/historical-bounces/backfill",
    "/historical-bounces/backfill/{job_id}",
    "/campaign-runs/",
    "/campaign-runs/{id}",
    "/campaign-recipient-logs/",
    "/campaign-recipient-logs/{id}",
    "/recipients/{email}/history",
    "/sql",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        for r in ROUTES {
            assert!(
                doc["paths"].get(r).is_some(),
                "{r} missing from docs/openapi.json"
            );
        }
        // The document also describes the campaign API (tag `campaigns`, served by the
        // campaigns crate and checked there); the rest is these routes plus the three webhook
        // routes (callback, events, stats, lob).
        let analytics = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .filter(|ops| {
                !ops.as_object()
                    .unwrap()
                    .values()
                    .any(|op| op["tags"] == serde_json::json!(["campaigns"]))
            })
            .count();
        assert_eq!(analytics, ROUTES.len() + 4);
        for w in [
            "/webhooks/callback",
            "/webhooks/events",
            "/webhooks/stats",
            "/webhooks/lob",
        ] {
            assert!(
                doc["paths"].get(w).is_some(),
                "{w} missing from docs/openapi.json"
            );
        }
    }

    /// The document's `time_zone` values are exactly the zones the server parses.
    #[test]
    fn openapi_time_zones_are_the_servers() {
        let names: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name()).collect();
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["TimeZone"]["enum"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            listed,
            names,
            "components.schemas.TimeZone.enum should be {}",
            serde_json::to_string(&names).unwrap()
        );
    }

    #[test]
    fn finished_backfill_jobs_are_pruned_oldest_first() {
        let job = |n: i64, done: bool| BackfillJob {
            job_id: format!("bf-{n}"),
            workspace_id: "acme".into(),
            status: if done { "done" } else { "running" },
            started_at: DateTime::from_timestamp(n, 0).unwrap(),
            finished_at: done.then(|| DateTime::from_timestamp(1000 + n, 0).unwrap()),
            report: None,
            error: None,
        };
        let mut jobs: BTreeMap<String, BackfillJob> = (1..=12)
            .map(|n| job(n, n != 3))
            .map(|j| (j.job_id.clone(), j))
            .collect();
        prune_jobs(&mut jobs, 4);
        let mut left: Vec<&str> = jobs.keys().map(|k| k.as_str()).collect();
        left.sort_by_key(|k| k[3..].parse::<u32>().unwrap());
        assert_eq!(left, ["bf-3", "bf-9", "bf-10", "bf-11", "bf-12"]);
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
