//! The campaign HTTP API (seed 002 and 003), mounted by `broadside serve --campaigns FILE`.
//!
//! | route | does |
//! |---|---|
//! | `GET /campaign` | the workspace's campaigns |
//! | `POST /campaign` | creates one (201) |
//! | `GET / PUT / DELETE /campaign/{id}` | reads, edits, deletes one |
//! | `GET / POST /campaign/{id}/sendings` | lists or adds sendings |
//! | `GET / PUT / DELETE /campaign/{id}/sendings/{sid}` | reads, reschedules or cancels one |
//! | `POST /audience`, `GET /audience/{id}` | stores or reads an audience (conditions) |
//!
//! Bodies are JSON objects; unknown fields are refused. Errors are JSON
//! `{"error": "...", "field": "..."}`: malformed JSON 400, a bad field 422 (naming it), an
//! illegal state change 409 (with `"allowed"` listing the states it may go to), unknown id 404.
//! Every request names its workspace in the `workspace_id` header; with tokens configured it
//! also needs `Authorization: Bearer <token>` for a token allowed that workspace.
//!
//! The header, query string and bodies are parsed by the pure functions of
//! [`crate::api_input`] (fuzzed by `fuzz/fuzz_targets/campaign_api.rs`); the handlers here
//! add the store work.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api_input::{
    audience_request, campaign_request, check_query, resolve_sending_schedule, sending_request,
    sending_update, workspace_id, AudienceRequest, InputError, SendingRequest, SendingUpdate,
};
use crate::audience::{Audience, Conditions, FieldMap, Recipients};
use crate::error::{Error, Result};
use crate::schedule::{format_instant, ScheduleConfig};
use crate::scheduler::Prepared;
use crate::state::{CampaignState, SendingStatus};
use crate::store::{Campaign, CampaignFields, Sending, Store};

/// Moved to [`crate::api_input`] (request parsing without a server); kept here for callers.
pub use crate::api_input::{check_callback_url, sending_schedule};

/// The clock the API stamps and validates with (unix seconds); tests pass a fixed one.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp())
}

/// A token allowed to use some workspaces (the analytics token file's entries fit).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenGrant {
    /// A name for logs.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Workspaces it may use.
    pub workspaces: Vec<String>,
}

/// Who may call the API.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone who can reach the listener (a local or test setup); the workspace header is
    /// still required.
    Open,
    /// Bearer tokens.
    Tokens(Vec<TokenGrant>),
}

/// Settings of the campaign API.
#[derive(Clone)]
pub struct CampaignApiConfig {
    /// The store file.
    pub store: PathBuf,
    /// Schedule lead and failure window.
    pub schedule: ScheduleConfig,
    /// The fields audience conditions may use.
    pub fields: FieldMap,
    /// Who may call it.
    pub access: Access,
    /// The clock.
    pub clock: Clock,
    /// What keeps a campaign from being READY in this process (`None`: nothing is checked).
    pub ready_check: Option<ReadyCheck>,
    /// Where send configurations given through the API are checked and assembled (the
    /// campaign specs folder and its operator's sources file); `None`: this process does not
    /// send, and `PUT /campaign/{id}/spec` is refused.
    pub send_configs: Option<crate::send_config::SendConfigs>,
}

/// Says what keeps a campaign from being READY (an empty list: nothing). The binary checks
/// that the campaign's spec resolves: file, workspace, source, secrets, printer creatives.
pub type ReadyCheck = Arc<dyn Fn(&Campaign) -> Vec<String> + Send + Sync>;

/// Refuses a change that would make `c` READY while `check` finds something missing. A
/// campaign that is READY already is not checked again.
pub fn check_ready(
    check: Option<&ReadyCheck>,
    c: &Campaign,
    to: Option<CampaignState>,
) -> Result<()> {
    let Some(check) = check else {
        return Ok(());
    };
    if to != Some(CampaignState::Ready) || c.state == CampaignState::Ready {
        return Ok(());
    }
    let missing = check(c);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::NotReady { id: c.id, missing })
}

struct ApiState {
    store: Mutex<Store>,
    cfg: CampaignApiConfig,
}

#[derive(Debug, Clone)]
struct Ws(String);

/// An error response.
#[derive(Debug)]
pub struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Invalid { field, .. } => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": msg, "field": field}),
            ),
            Error::Transition {
                from, to, allowed, ..
            } => ApiError(
                StatusCode::CONFLICT,
                json!({"error": msg, "field": "state", "state": from, "requested": to, "allowed": allowed}),
            ),
            Error::NotFound { .. } => ApiError(StatusCode::NOT_FOUND, json!({"error": msg})),
            Error::BadSpec { problems, .. } => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": msg, "field": "spec", "problems": problems}),
            ),
            Error::NotReady { missing, .. } => ApiError(
                StatusCode::CONFLICT,
                json!({"error": msg, "field": "state", "requested": "READY", "missing": missing}),
            ),
            other => {
                tracing::error!(error = %other, "campaign API failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": msg}))
            }
        }
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// The campaign routes; merge with the analytics routes in `broadside serve`.
pub fn campaign_router(cfg: CampaignApiConfig) -> Result<Router> {
    let store = Store::open(&cfg.store)?;
    let state = Arc::new(ApiState {
        store: Mutex::new(store),
        cfg,
    });
    Ok(Router::new()
        .route("/campaign", get(list_campaigns).post(create_campaign))
        .route(
            "/campaign/{id}",
            get(get_campaign)
                .put(update_campaign)
                .delete(delete_campaign),
        )
        .route(
            "/campaign/{id}/spec",
            get(get_spec).put(put_spec).delete(delete_spec),
        )
        .route(
            "/campaign/{id}/sendings",
            get(list_sendings).post(create_sending),
        )
        .route(
            "/campaign/{id}/sendings/{sid}",
            get(get_sending).put(update_sending).delete(cancel_sending),
        )
        .route("/audience", post(create_audience))
        .route("/audience/{id}", get(get_audience))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state))
}

async fn auth(
    State(st): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> ApiResult<Response> {
    let deny = |code: StatusCode, m: String| ApiError(code, json!({"error": m}));
    let ws = req
        .headers()
        .get("workspace_id")
        .and_then(|v| v.to_str().ok())
        .and_then(workspace_id)
        .ok_or_else(|| {
            deny(
                StatusCode::FORBIDDEN,
                "missing or invalid workspace_id header".into(),
            )
        })?
        .to_string();
    if let Access::Tokens(grants) = &st.cfg.access {
        let token = bearer(req.headers()).ok_or_else(|| {
            deny(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer <token>".into(),
            )
        })?;
        let hash = token_hash(token);
        let grant = grants
            .iter()
            .find(|g| same(g.sha256.to_ascii_lowercase().as_bytes(), hash.as_bytes()))
            .ok_or_else(|| deny(StatusCode::UNAUTHORIZED, "unknown token".into()))?;
        if !grant.workspaces.contains(&ws) {
            return Err(deny(
                StatusCode::FORBIDDEN,
                format!("token {:?} may not use workspace {ws:?}", grant.name),
            ));
        }
    }
    // A `workspace_id` query parameter that contradicts the header is refused, as the
    // analytics API does: a caller never gets an answer for a workspace it did not mean.
    check_query(req.uri().query(), &ws).map_err(|m| deny(StatusCode::FORBIDDEN, m))?;
    req.extensions_mut().insert(Ws(ws));
    Ok(next.run(req).await)
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Hex SHA-256 of a token, as [`TokenGrant::sha256`] stores it.
pub fn token_hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares in constant time: how much of a guess matched must not show in the timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

impl ApiState {
    /// Runs store work off the reactor (SQLite may wait on another process's write lock).
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store, &CampaignApiConfig, i64) -> Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let st = self.clone();
        tokio::task::spawn_blocking(move || {
            let now = (st.cfg.clock)();
            let store = st.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&store, &st.cfg, now)
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            )
        })?
        .map_err(ApiError::from)
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        match e {
            InputError::Malformed(m) => ApiError(StatusCode::BAD_REQUEST, json!({"error": m})),
            InputError::Field(e) => e.into(),
        }
    }
}

/// The JSON view of a campaign.
pub fn campaign_json(c: &Campaign) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "domain": c.domain,
        "list": c.list,
        "segments": c.segments,
        "state": c.state,
        "allowed_states": c.state.client_targets(),
        "when": c.when.map(format_instant),
        "when_unix": c.when,
        "event_callback": c.event_callback,
        "spec": c.send_spec.as_ref().map(|_| format!("/campaign/{}/spec", c.id)),
        "default_sending": c.default_sending,
        "created_at": format_instant(c.created_at),
        "updated_at": format_instant(c.updated_at),
    })
}

/// The JSON view of a sending.
pub fn sending_json(s: &Sending) -> Value {
    json!({
        "id": s.id,
        "campaign_id": s.campaign_id,
        "status": s.status,
        "schedule": s.schedule.to_json(),
        "desired_at": s.timing.map(|t| format_instant(t.desired_at)),
        "prepare_at": s.timing.map(|t| format_instant(t.prepare_at)),
        "fail_at": s.timing.map(|t| format_instant(t.fail_at)),
        "audience": s.recipients.audience,
        "recipients": s.recipients.recipients,
        "channels_preference": s.recipients.channels_preference,
        "exclude_sent": !s.recipients.include_sent,
        "recipient_count": s.recipient_count,
        "decisions": prepared_decisions(s),
        "error": s.error,
        "created_at": format_instant(s.created_at),
        "updated_at": format_instant(s.updated_at),
    })
}

/// How preparation decided the sending's recipients, when it recorded that (`null` before).
fn prepared_decisions(s: &Sending) -> Value {
    s.prepared
        .as_deref()
        .and_then(|p| serde_json::from_str::<Prepared>(p).ok())
        .filter(|p| !p.decisions.is_empty())
        .map_or(Value::Null, |p| json!(p.decisions))
}

/// A sending with what it did: its execution steps (`runs`), and its send run with the
/// analytics links that lead to it. The send run's `campaign_id` in the ledger, events and
/// statistics is the campaign spec's `campaign_id` (`ledger_campaign_id` here), which is not
/// the campaign service's numeric id.
pub fn sending_detail(store: &Store, s: &Sending) -> Result<Value> {
    let mut v = sending_json(s);
    v["runs"] = serde_json::to_value(store.runs(s.id)?).expect("runs serialise");
    // The binary's executor gives a sending one run id; the last recorded one is current.
    let send_runs = store.sending_runs(s.id)?;
    let latest = send_runs.last();
    v["run_id"] = json!(latest.map(|r| &r.run_id));
    v["ledger_campaign_id"] = json!(latest.map(|r| &r.campaign_key));
    // Run and campaign ids are letters, digits, '-' and '_' (the spec validator's rule): no
    // escaping needed in a path or a query.
    v["links"] = latest.map_or(Value::Null, |r| {
        json!({
            "run": format!("/campaign-runs/{}", r.run_id),
            "statistics": format!("/campaign-statistics/{}", r.campaign_key),
            "recipient_logs": format!("/campaign-recipient-logs/?run_id={}", r.run_id),
        })
    });
    Ok(v)
}

async fn list_campaigns(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
) -> ApiResult<Json<Value>> {
    let list = st.run(move |s, _, _| s.campaigns(&ws)).await?;
    Ok(Json(Value::Array(list.iter().map(campaign_json).collect())))
}

async fn create_campaign(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let fields = campaign_request(&body, true)?;
    let c = st
        .run(move |s, cfg, now| {
            if cfg.ready_check.is_some() && fields.state == Some(CampaignState::Ready) {
                // Its spec is found by its id, which it does not have yet.
                return Err(Error::Invalid {
                    field: "state".into(),
                    message: "a campaign becomes READY once its spec resolves: create it \
                              DRAFT or SCHEDULED, then set READY"
                        .into(),
                });
            }
            check_names(cfg, &ws, &fields)?;
            create_with_default_sending(s, &ws, &fields, &cfg.schedule, now)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(campaign_json(&c))))
}

/// In a process that sends, a campaign's `domain` must be a sender domain the operator defined
/// for the workspace (its templates are synced with it).
/// Likewise its `list` must be served by one of the workspace's named sources, where the
/// operator defined some.
fn check_names(cfg: &CampaignApiConfig, ws: &str, f: &CampaignFields) -> Result<()> {
    let Some(configs) = &cfg.send_configs else {
        return Ok(());
    };
    if let Some(Some(d)) = f.domain {
        configs
            .domain(ws, d)
            .map_err(|e| Error::invalid("domain", e.trim_start_matches("domain: ").to_string()))?;
    }
    if let Some(Some(list)) = f.list {
        configs
            .check_list(ws, list)
            .map_err(|e| Error::invalid("list", e))?;
    }
    Ok(())
}

/// Checks the fields a campaign is created or edited with against what sends can honour
/// (`cur`: the campaign being edited): its segments must be one stored audience of the
/// workspace (a sending to the list goes to that audience), and a `when` needs a list (it
/// schedules the default sending to the list). Returns the `when` schedule's timing.
pub fn check_campaign_fields(
    store: &Store,
    ws: &str,
    f: &CampaignFields,
    cur: Option<&Campaign>,
    cfg: &ScheduleConfig,
    now: i64,
) -> Result<Option<crate::schedule::Timing>> {
    if let Some(segments) = &f.segments {
        if segments.len() > 1 {
            return Err(Error::invalid(
                "segments[1]",
                "a campaign has at most one segment: a stored audience whose conditions select \
                 the list's recipients (conditions are ANDed; store one audience for the whole \
                 selection)",
            ));
        }
        for (i, id) in segments.iter().enumerate() {
            match store.audience(ws, *id) {
                Ok(_) => {}
                Err(Error::NotFound { .. }) => {
                    return Err(Error::invalid(
                        format!("segments[{i}]"),
                        format!("audience {id} does not exist in this workspace (POST /audience stores one)"),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }
    let Some(Some(at)) = f.when else {
        return Ok(None);
    };
    let list = match f.list {
        Some(l) => l,
        None => cur.and_then(|c| c.list),
    };
    if list.is_none() {
        return Err(Error::invalid(
            "when",
            "schedules the campaign's default sending to its list, and the campaign has no list: \
             give it a list, or leave `when` out and add sendings",
        ));
    }
    let schedule = default_schedule(at);
    resolve_sending_schedule(&schedule, cfg, now).map_err(|e| match e {
        Error::Invalid { message, .. } => Error::invalid("when", message),
        other => other,
    })
}

fn default_schedule(at: i64) -> crate::schedule::Schedule {
    crate::schedule::Schedule {
        when: crate::schedule::When::Absolute { at },
        prescheduled: false,
    }
}

/// Creates a campaign; with a `when`, also its default sending (to its list and segment, at
/// that instant), which makes it SCHEDULED.
pub fn create_with_default_sending(
    s: &Store,
    ws: &str,
    fields: &CampaignFields,
    cfg: &ScheduleConfig,
    now: i64,
) -> Result<Campaign> {
    let timing = check_campaign_fields(s, ws, fields, None, cfg, now)?;
    let c = s.create_campaign(ws, fields, now)?;
    match (fields.when.flatten(), timing) {
        (Some(at), Some(t)) => set_default_sending(s, &c, at, t, now),
        _ => Ok(c),
    }
}

/// Edits a campaign; a changed `when` reschedules its default sending (created if it has none
/// yet), and `when: null` cancels it. A default sending that already started cannot move.
pub fn update_with_default_sending(
    s: &Store,
    ws: &str,
    id: i64,
    fields: &CampaignFields,
    cfg: &ScheduleConfig,
    now: i64,
) -> Result<Campaign> {
    let cur = s.campaign(ws, id)?;
    let timing = check_campaign_fields(s, ws, fields, Some(&cur), cfg, now)?;
    if fields.when.is_some() {
        if let Some(sid) = cur.default_sending {
            let sd = s.sending(ws, sid)?;
            if !sd.status.reschedulable() && !sd.status.is_final() {
                return Err(Error::invalid(
                    "when",
                    format!(
                        "the default sending {sid} is already {}; its time cannot change",
                        sd.status.as_str()
                    ),
                ));
            }
        }
    }
    let c = s.update_campaign(ws, id, fields, now)?;
    match (fields.when, timing) {
        (Some(Some(at)), Some(t)) => set_default_sending(s, &c, at, t, now),
        (Some(None), _) => {
            if let Some(sid) = c.default_sending {
                if s.sending(ws, sid)?.status.reschedulable() {
                    s.cancel_sending(ws, sid, now)?;
                }
                s.set_default_sending(ws, c.id, None)?;
            }
            s.campaign(ws, c.id)
        }
        _ => Ok(c),
    }
}

/// Schedules campaign `c`'s default sending at `at`: reschedules the pending one, or creates
/// one (to the campaign's list and segment, default channels, earlier sendings' keys
/// excluded) and moves a DRAFT campaign to SCHEDULED.
fn set_default_sending(
    s: &Store,
    c: &Campaign,
    at: i64,
    timing: crate::schedule::Timing,
    now: i64,
) -> Result<Campaign> {
    let schedule = default_schedule(at);
    let pending = match c.default_sending {
        Some(sid) => Some(s.sending(&c.workspace_id, sid)?).filter(|sd| sd.status.reschedulable()),
        None => None,
    };
    match pending {
        Some(sd) => {
            s.reschedule_sending(&c.workspace_id, sd.id, &schedule, Some(timing), now)?;
        }
        None => {
            let recipients = sending_request(b"{}")
                .map_err(|e| Error::invalid("when", e.to_string()))?
                .recipients;
            let sd = s.create_sending(
                &c.workspace_id,
                c.id,
                &schedule,
                Some(timing),
                &recipients,
                now,
            )?;
            s.set_default_sending(&c.workspace_id, c.id, Some(sd.id))?;
        }
    }
    schedule_draft(s, &s.campaign(&c.workspace_id, c.id)?, now)
}

async fn get_campaign(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let c = st.run(move |s, _, _| s.campaign(&ws, id)).await?;
    Ok(Json(campaign_json(&c)))
}

async fn update_campaign(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let fields = campaign_request(&body, false)?;
    let c = st
        .run(move |s, cfg, now| {
            check_ready(
                cfg.ready_check.as_ref(),
                &s.campaign(&ws, id)?,
                fields.state,
            )?;
            check_names(cfg, &ws, &fields)?;
            update_with_default_sending(s, &ws, id, &fields, &cfg.schedule, now)
        })
        .await?;
    Ok(Json(campaign_json(&c)))
}

/// The TOML media type a send configuration is answered with.
const TOML: &str = "application/toml; charset=utf-8";

async fn get_spec(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Response> {
    let c = st.run(move |s, _, _| s.campaign(&ws, id)).await?;
    match c.send_spec {
        Some(text) => Ok(([(header::CONTENT_TYPE, TOML)], text).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": format!("campaign {id} has no send configuration (PUT /campaign/{id}/spec sets one)")}),
        )),
    }
}

/// Checks a send configuration (TOML text, or a JSON object with `Content-Type:
/// application/json`) for campaign `c`; the text to store.
pub fn check_spec(
    configs: Option<&crate::send_config::SendConfigs>,
    c: &Campaign,
    body: &[u8],
    json_body: bool,
) -> Result<String> {
    let Some(configs) = configs else {
        return Err(Error::invalid(
            "spec",
            "this server does not send campaigns (no campaign specs folder), so it cannot check a send configuration",
        ));
    };
    let bad = |problems| Error::BadSpec { id: c.id, problems };
    let text = if json_body {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| bad(vec![format!("body is not valid JSON: {e}")]))?;
        if !v.is_object() {
            return Err(bad(vec![
                "a JSON send configuration must be an object".into()
            ]));
        }
        crate::send_config::json_to_toml(&v).map_err(|e| bad(vec![e]))?
    } else {
        String::from_utf8(body.to_vec())
            .map_err(|_| bad(vec!["the configuration is not UTF-8 text".into()]))?
    };
    configs.assemble(c, &text).map_err(bad)?;
    Ok(text)
}

async fn put_spec(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let c = st
        .run(move |s, cfg, now| {
            let c = s.campaign(&ws, id)?;
            let text = check_spec(cfg.send_configs.as_ref(), &c, &body, json_body)?;
            s.set_send_spec(&ws, id, Some(&text), now)
        })
        .await?;
    let text = c.send_spec.unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, TOML)], text).into_response())
}

async fn delete_spec(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let c = st
        .run(move |s, _, now| s.set_send_spec(&ws, id, None, now))
        .await?;
    Ok(Json(campaign_json(&c)))
}

async fn delete_campaign(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let c = st
        .run(move |s, _, now| s.delete_campaign(&ws, id, now))
        .await?;
    Ok(Json(campaign_json(&c)))
}

/// Checks the conditions of an inline audience; a sending with neither audience nor
/// recipients goes to the campaign's list (and segments), so it needs one.
pub fn check_audience(r: &Recipients, fields: &FieldMap, campaign: &Campaign) -> Result<()> {
    if let Some(Audience::Inline { conditions }) = &r.audience {
        Conditions::compile(conditions, fields, "audience.conditions")?;
    }
    if r.audience.is_none() && r.recipients.is_empty() && campaign.list.is_none() {
        return Err(Error::invalid(
            "audience",
            format!(
                "give an audience, recipients, or both (campaign {} has no list to fall back to)",
                campaign.id
            ),
        ));
    }
    Ok(())
}

async fn list_sendings(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let list = st.run(move |s, _, _| s.sendings(&ws, id)).await?;
    Ok(Json(Value::Array(list.iter().map(sending_json).collect())))
}

async fn create_sending(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let SendingRequest {
        recipients,
        schedule,
    } = sending_request(&body)?;
    let sd = st
        .run(move |s, cfg, now| {
            let campaign = s.campaign(&ws, id)?;
            check_audience(&recipients, &cfg.fields, &campaign)?;
            let schedule = schedule?;
            let timing = resolve_sending_schedule(&schedule, &cfg.schedule, now)?;
            let sending = s.create_sending(&ws, id, &schedule, timing, &recipients, now)?;
            if sending.status != SendingStatus::Draft {
                schedule_draft(s, &campaign, now)?;
            }
            Ok(sending)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(sending_json(&sd))))
}

/// A DRAFT campaign that gets a scheduled sending moves to SCHEDULED, through the API as through
/// `broadside campaign schedule`; it still needs READY before the scheduler sends.
pub fn schedule_draft(store: &Store, campaign: &Campaign, now: i64) -> Result<Campaign> {
    if campaign.state != CampaignState::Draft {
        return Ok(campaign.clone());
    }
    let fields = CampaignFields {
        state: Some(CampaignState::Scheduled),
        ..Default::default()
    };
    store.update_campaign(&campaign.workspace_id, campaign.id, &fields, now)
}

async fn get_sending(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path((id, sid)): Path<(i64, i64)>,
) -> ApiResult<Json<Value>> {
    let v = st
        .run(move |s, _, _| {
            let sd = s.sending(&ws, sid)?;
            if sd.campaign_id != id {
                return Err(Error::NotFound {
                    what: "sending",
                    id: sid,
                });
            }
            sending_detail(s, &sd)
        })
        .await?;
    Ok(Json(v))
}

async fn update_sending(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path((id, sid)): Path<(i64, i64)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let SendingUpdate { cancel, schedule } = sending_update(&body)?;
    let sd = st
        .run(move |s, cfg, now| {
            let cur = s.sending(&ws, sid)?;
            if cur.campaign_id != id {
                return Err(Error::NotFound {
                    what: "sending",
                    id: sid,
                });
            }
            if cancel {
                return s.cancel_sending(&ws, sid, now);
            }
            let schedule = schedule?;
            let timing = resolve_sending_schedule(&schedule, &cfg.schedule, now)?;
            s.reschedule_sending(&ws, sid, &schedule, timing, now)
        })
        .await?;
    Ok(Json(sending_json(&sd)))
}

async fn cancel_sending(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path((id, sid)): Path<(i64, i64)>,
) -> ApiResult<Json<Value>> {
    let sd = st
        .run(move |s, _, now| {
            if s.sending(&ws, sid)?.campaign_id != id {
                return Err(Error::NotFound {
                    what: "sending",
                    id: sid,
                });
            }
            s.cancel_sending(&ws, sid, now)
        })
        .await?;
    Ok(Json(sending_json(&sd)))
}

async fn create_audience(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let AudienceRequest { name, conditions } = audience_request(&body)?;
    let (id, conditions) = st
        .run(move |s, cfg, now| {
            Conditions::compile(&conditions, &cfg.fields, "conditions")?;
            Ok((s.create_audience(&ws, &name, &conditions, now)?, conditions))
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "conditions": conditions})),
    ))
}

async fn get_audience(
    State(st): State<Arc<ApiState>>,
    Extension(Ws(ws)): Extension<Ws>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let conditions = st.run(move |s, _, _| s.audience(&ws, id)).await?;
    Ok(Json(json!({"id": id, "conditions": conditions})))
}
