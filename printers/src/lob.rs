//! A Lob-compatible printer client: creates postcards (`POST /v1/postcards`) and letters
//! (`POST /v1/letters`) with the shapes of Lob's public API (lob/lob-openapi).
//!
//! - **Exactly one mailpiece per recipient and run.** Every request carries an
//!   `Idempotency-Key` derived from workspace + campaign + run + recipient + piece
//!   ([`IdempotencyKey::derive`]), so a retry after a lost answer, or a resumed run, gets the
//!   first mailpiece back instead of a second one, and nothing else (another run, campaign or
//!   workspace) shares the key.
//! - **Pieces belong to their run.** The piece's `metadata` names its run and the attempt that
//!   made it ([`PieceOwner::metadata`]); Lob answers a repeated key with the first piece, its
//!   metadata included, so [`PieceOwner::origin`] tells a piece made now from one an earlier
//!   attempt of the run made, and refuses one made for another run
//!   ([`SubmitError::OtherRun`]).
//! - **Retries.** 429 waits `Retry-After` (delta-seconds, capped) and also holds back every
//!   other request to the same printer; 408, 5xx and transport failures (refused, reset, an
//!   answer cut short, a timeout) back off exponentially with deterministic jitter up to a cap.
//!   Any other 4xx is the printer refusing the piece: no retry ([`SubmitError::Rejected`]).
//! - **Limits.** At most `max_in_flight` requests are open to a printer at once, and requests
//!   start no faster than `requests_per_second` (an evenly spaced schedule, no burst).
//! - Authentication is HTTP Basic with the API key as the user and an empty password.
//!
//! Waiting goes through a [`Pause`] so tests can record the delays instead of sleeping.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::http::{self, Endpoint};
use crate::state::{ErrorMessage, RecipientState};

/// Settings for one Lob-compatible printer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LobConfig {
    /// Base URL without the `/v1` (default `https://api.lob.com`; tests use the local
    /// server's `http://` URL).
    pub base_url: String,
    /// Environment variable holding the API key (default `LOB_API_KEY`).
    pub api_key_env: String,
    /// Most requests open at once to this printer (default 8).
    pub max_in_flight: usize,
    /// Most requests started per second; absent means no limit (default 25).
    pub requests_per_second: Option<f64>,
    /// Attempts per mailpiece, the first included (default 8).
    pub max_attempts: u32,
    /// First retry delay in milliseconds, doubled per attempt (default 500).
    pub backoff_ms: u64,
    /// Longest retry delay in milliseconds (default 30 000).
    pub max_backoff_ms: u64,
    /// Longest `Retry-After` honoured, in seconds; longer ones are cut to this (default 300).
    pub max_retry_after_secs: u64,
    /// Milliseconds one request may take, answer included (default 30 000).
    pub timeout_ms: u64,
}

impl Default for LobConfig {
    fn default() -> Self {
        LobConfig {
            base_url: "https://api.lob.com".into(),
            api_key_env: "LOB_API_KEY".into(),
            max_in_flight: 8,
            requests_per_second: Some(25.0),
            max_attempts: 8,
            backoff_ms: 500,
            max_backoff_ms: 30_000,
            max_retry_after_secs: 300,
            timeout_ms: 30_000,
        }
    }
}

impl LobConfig {
    /// Reports every problem at once.
    pub fn validate(&self) -> std::result::Result<(), Vec<String>> {
        let mut p = Vec::new();
        if let Err(e) = Endpoint::parse(&self.base_url) {
            p.push(format!("base_url: {e}"));
        }
        if self.max_in_flight == 0 {
            p.push("max_in_flight: must be at least 1".into());
        }
        if let Some(r) = self.requests_per_second {
            if !(r.is_finite() && r > 0.0) {
                p.push(format!(
                    "requests_per_second: {r} must be a positive number"
                ));
            }
        }
        if self.max_attempts == 0 {
            p.push("max_attempts: must be at least 1".into());
        }
        if self.backoff_ms > self.max_backoff_ms {
            p.push(format!(
                "backoff_ms: {} is more than max_backoff_ms {}",
                self.backoff_ms, self.max_backoff_ms
            ));
        }
        if self.timeout_ms == 0 {
            p.push("timeout_ms: must be at least 1".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

/// The run a mailpiece is made for: the scope of its idempotency key and what its metadata
/// names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunScope {
    /// The workspace.
    pub workspace_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// The run (a resume keeps it; `--new-run` makes another).
    pub run_id: String,
}

impl RunScope {
    /// The key of `recipient`'s `piece` in this run ([`IdempotencyKey::derive`]).
    pub fn key(&self, recipient: &str, piece: &str) -> IdempotencyKey {
        IdempotencyKey::derive(self, recipient, piece)
    }
}

/// The `Idempotency-Key` of one mailpiece: the same workspace, campaign, run, recipient and
/// piece always give the same key, on any machine and after any restart; anything else gives
/// another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// `bs2-` and 48 hex digits of SHA-256 over the length-prefixed parts workspace, campaign,
    /// run, recipient, piece (each part's byte length as a little-endian u64, then its bytes,
    /// so `("ab", "c")` and `("a", "bc")` differ). `piece` names the mailpiece within the
    /// recipient's run (e.g. `postcard` or a touch number) for campaigns that mail a recipient
    /// more than once. (`bs1-` keys were campaign + recipient + piece only, shared by every run
    /// of a campaign.)
    pub fn derive(run: &RunScope, recipient: &str, piece: &str) -> IdempotencyKey {
        let mut h = Sha256::new();
        for part in [
            run.workspace_id.as_str(),
            run.campaign_id.as_str(),
            run.run_id.as_str(),
            recipient,
            piece,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let mut key = String::with_capacity(52);
        key.push_str("bs2-");
        for b in &digest[..24] {
            key.push_str(&format!("{b:02x}"));
        }
        IdempotencyKey(key)
    }

    /// The header value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who makes a mailpiece: a run, and the attempt of it (one `broadside send` process; a resume
/// is another attempt of the same run). Written into the piece's metadata and checked against
/// every piece the printer answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceOwner {
    /// The run.
    pub run: RunScope,
    /// Unique to this attempt of the run.
    pub attempt_id: String,
}

/// Whether the piece the printer answered with was made now or earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Made by this attempt (by this request, or by an earlier request of this attempt whose
    /// answer was lost).
    Created,
    /// Made by an earlier attempt of the same run: the printer returned it for the key.
    Returned,
}

impl PieceOwner {
    /// The metadata keys naming the owner.
    pub const METADATA_KEYS: [&'static str; 4] =
        ["workspace_id", "campaign_id", "run_id", "attempt_id"];

    /// The metadata entries naming the owner, to put in every piece it creates.
    pub fn metadata(&self) -> [(&'static str, &str); 4] {
        let [w, c, r, a] = Self::METADATA_KEYS;
        [
            (w, self.run.workspace_id.as_str()),
            (c, self.run.campaign_id.as_str()),
            (r, self.run.run_id.as_str()),
            (a, self.attempt_id.as_str()),
        ]
    }

    /// Whose `created` (the printer's answer for `key`) is, by the metadata the printer keeps
    /// with it: this attempt's, an earlier attempt's of this run, or another run's (an error:
    /// the piece must not be counted as this run's).
    pub fn origin(
        &self,
        key: &IdempotencyKey,
        created: &Created,
    ) -> std::result::Result<Origin, SubmitError> {
        let meta = |k: &str| created.metadata.get(k).map(String::as_str);
        let [w, c, r, a] = Self::METADATA_KEYS;
        let ours = meta(w) == Some(self.run.workspace_id.as_str())
            && meta(c) == Some(self.run.campaign_id.as_str())
            && meta(r) == Some(self.run.run_id.as_str());
        if !ours {
            let named = |k: &str| meta(k).unwrap_or("(none)").to_string();
            return Err(SubmitError::OtherRun(Box::new(OtherRunPiece {
                key: key.to_string(),
                id: created.id.clone(),
                run_id: named(r),
                workspace_id: named(w),
                campaign_id: named(c),
                ours: self.run.run_id.clone(),
            })));
        }
        Ok(if meta(a) == Some(self.attempt_id.as_str()) {
            Origin::Created
        } else {
            Origin::Returned
        })
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is printed.
#[derive(Debug, Clone, PartialEq)]
pub enum Creative {
    /// A postcard: front and back as HTML, a URL or a template id (`tmpl_…`).
    Postcard {
        /// Front side.
        front: String,
        /// Back side (the address block is printed on it).
        back: String,
        /// `4x6`, `6x9` or `6x11`; the printer's default when absent.
        size: Option<String>,
    },
    /// A letter: one file (HTML, URL or template id).
    Letter {
        /// The letter's content.
        file: String,
        /// Whether it is printed in colour.
        color: bool,
    },
}

impl Creative {
    fn path(&self) -> &'static str {
        match self {
            Creative::Postcard { .. } => "/v1/postcards",
            Creative::Letter { .. } => "/v1/letters",
        }
    }
}

/// One mailpiece to create.
#[derive(Debug, Clone, PartialEq)]
pub struct MailPiece {
    /// Its idempotency key.
    pub key: IdempotencyKey,
    /// Internal description shown in the printer's dashboard.
    pub description: Option<String>,
    /// The recipient.
    pub to: Address,
    /// The sender (required by Lob for letters).
    pub from: Option<Address>,
    /// What is printed.
    pub creative: Creative,
    /// Values for the creative's `{{merge_tags}}`.
    pub merge_variables: serde_json::Map<String, serde_json::Value>,
    /// Up to 20 string pairs stored with the piece: its owner ([`PieceOwner::metadata`]) and
    /// recipient go here.
    pub metadata: BTreeMap<String, String>,
}

/// A mailpiece ready to submit: its key, endpoint and serialised request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPiece {
    /// Its idempotency key.
    pub key: IdempotencyKey,
    /// `/v1/postcards` or `/v1/letters`.
    pub path: &'static str,
    /// The JSON request body.
    pub body: Vec<u8>,
}

impl MailPiece {
    /// The piece serialised for [`LobClient::create_prepared`].
    pub fn prepare(&self) -> PreparedPiece {
        PreparedPiece {
            key: self.key.clone(),
            path: self.creative.path(),
            body: self.request_body().to_string().into_bytes(),
        }
    }

    /// The JSON body Lob's create endpoints take.
    pub fn request_body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        if let Some(d) = &self.description {
            body.insert("description".into(), d.clone().into());
        }
        body.insert(
            "to".into(),
            serde_json::to_value(&self.to).unwrap_or_default(),
        );
        if let Some(from) = &self.from {
            body.insert(
                "from".into(),
                serde_json::to_value(from).unwrap_or_default(),
            );
        }
        match &self.creative {
            Creative::Postcard { front, back, size } => {
                body.insert("front".into(), front.clone().into());
                body.insert("back".into(), back.clone().into());
                if let Some(size) = size {
                    body.insert("size".into(), size.clone().into());
                }
            }
            Creative::Letter { file, color } => {
                body.insert("file".into(), file.clone().into());
                body.insert("color".into(), (*color).into());
            }
        }
        if !self.merge_variables.is_empty() {
            body.insert(
                "merge_variables".into(),
                serde_json::Value::Object(self.merge_variables.clone()),
            );
        }
        if !self.metadata.is_empty() {
            body.insert(
                "metadata".into(),
                serde_json::to_value(&self.metadata).unwrap_or_default(),
            );
        }
        serde_json::Value::Object(body)
    }
}

/// The mailpiece the printer answered with: the one it created, or for a key it saw before,
/// the one it created then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The printer's id (`psc_…` or `ltr_…`).
    pub id: String,
    /// Requests it took, the successful one included.
    pub attempts: u32,
    /// The metadata the printer keeps with the piece (what it was created with; string values
    /// only). [`PieceOwner::origin`] reads whose piece it is from it.
    pub metadata: BTreeMap<String, String>,
}

/// Why a mailpiece was not created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The printer refused the piece (a 4xx other than 408/429): retrying cannot help.
    #[error("printer refused the mailpiece: HTTP {status} {code}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Lob's error `code` (`invalid`, `unauthorized`, ...), empty when absent.
        code: String,
        /// Lob's error `message`, or the start of the answer.
        message: String,
    },
    /// Every attempt failed with a retryable error.
    #[error("printer unreachable after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A 2xx answer without a mailpiece id.
    #[error("printer answered HTTP {status} without a mailpiece id: {body}")]
    BadAnswer {
        /// HTTP status.
        status: u16,
        /// The start of the answer.
        body: String,
    },
    /// The printer answered the key with a piece another run made ([`PieceOwner::origin`]):
    /// it is not this run's piece, and nothing was printed for this run.
    #[error(
        "idempotency key {} belongs to run {} (workspace {}, campaign {}): the printer returned \
         its mailpiece {}, which was not made for run {}",
        .0.key, .0.run_id, .0.workspace_id, .0.campaign_id, .0.id, .0.ours
    )]
    OtherRun(Box<OtherRunPiece>),
}

/// A piece another run made, returned for one of our keys ([`SubmitError::OtherRun`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherRunPiece {
    /// The key.
    pub key: String,
    /// The printer's id of the other run's piece.
    pub id: String,
    /// The run its metadata names (`(none)` when absent).
    pub run_id: String,
    /// The workspace its metadata names.
    pub workspace_id: String,
    /// The campaign its metadata names.
    pub campaign_id: String,
    /// Our run.
    pub ours: String,
}

impl SubmitError {
    /// The state the recipient (in `Sending`) moves to, with seed 004's message.
    pub fn recipient_state(&self) -> RecipientState {
        match self {
            SubmitError::Rejected {
                status,
                code,
                message,
            } => RecipientState::error(
                ErrorMessage::FailedToMakeMailPiece,
                &format!("{message} ({status} {code})"),
            ),
            other => {
                RecipientState::error(ErrorMessage::FailedSubmissionToPrinter, &other.to_string())
            }
        }
    }

    /// Whether the printer refused our credentials or account (401/403): every other piece
    /// will fail the same way, so the send should stop rather than mark each recipient.
    pub fn stops_the_printer(&self) -> bool {
        matches!(
            self,
            SubmitError::Rejected {
                status: 401 | 403,
                ..
            }
        )
    }
}

/// How the client waits (backoff, `Retry-After`, rate limit). Tests record instead of sleep.
pub trait Pause: Send + Sync + 'static {
    /// Waits for `d`.
    fn pause(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Waits on tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioPause;

impl Pause for TokioPause {
    fn pause(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// Counters for one printer, updated per request.
#[derive(Debug, Default)]
pub struct PrinterStats {
    requests: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    created: AtomicU64,
    refused: AtomicU64,
}

/// A copy of [`PrinterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrinterStatsSnapshot {
    /// Requests sent (every attempt).
    pub requests: u64,
    /// Attempts after the first.
    pub retries: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// 408 and 5xx answers.
    pub server_errors: u64,
    /// Requests that got no complete answer.
    pub transport_errors: u64,
    /// Mailpieces confirmed.
    pub created: u64,
    /// Mailpieces the printer refused.
    pub refused: u64,
}

impl PrinterStats {
    /// The current values.
    pub fn snapshot(&self) -> PrinterStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PrinterStatsSnapshot {
            requests: g(&self.requests),
            retries: g(&self.retries),
            rate_limited: g(&self.rate_limited),
            server_errors: g(&self.server_errors),
            transport_errors: g(&self.transport_errors),
            created: g(&self.created),
            refused: g(&self.refused),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Start times handed out at most `1/rate` apart. A 429 pushes the next free start past its
/// `Retry-After` for everyone, not only the request that got it.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    interval: Option<Duration>,
    next_free: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(requests_per_second: Option<f64>) -> RateLimiter {
        RateLimiter {
            interval: requests_per_second.map(|r| Duration::from_secs_f64(1.0 / r)),
            next_free: None,
        }
    }

    /// Takes the next start slot; returns how long to wait for it from `now`.
    pub(crate) fn reserve(&mut self, now: Instant) -> Duration {
        let slot = self.next_free.map_or(now, |t| t.max(now));
        let after = slot + self.interval.unwrap_or(Duration::ZERO);
        self.next_free = Some(after);
        slot - now
    }

    /// No request starts before `t`.
    pub(crate) fn hold_until(&mut self, t: Instant) {
        self.next_free = Some(self.next_free.map_or(t, |n| n.max(t)));
    }
}

/// Exponential backoff for the attempt that just failed (1 = the first), capped, with jitter
/// in the upper half derived from the key so concurrent retries spread out but tests repeat.
pub(crate) fn backoff(cfg: &LobConfig, key: &IdempotencyKey, attempt: u32) -> Duration {
    let exp = cfg
        .backoff_ms
        .saturating_mul(1u64 << (attempt.saturating_sub(1)).min(30));
    let full = exp.min(cfg.max_backoff_ms);
    let half = full / 2;
    let mut h = Sha256::new();
    h.update(key.as_str().as_bytes());
    h.update(attempt.to_le_bytes());
    let d = h.finalize();
    let r = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
    Duration::from_millis(half + if half == 0 { 0 } else { r % (full - half + 1) })
}

/// Reads `Retry-After` as delta-seconds (an HTTP date is not honoured: backoff is used).
pub(crate) fn retry_after(value: Option<&str>, max_secs: u64) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(max_secs)))
}

/// Lob's error answer: `{"error": {"message", "status_code", "code"}}`.
#[derive(Debug, Deserialize)]
struct LobErrorBody {
    error: LobErrorDetail,
}

#[derive(Debug, Deserialize)]
struct LobErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: String,
}

/// What one attempt's answer means.
enum Outcome {
    Created(String, BTreeMap<String, String>),
    Retry { why: String, wait: Option<Duration> },
    Fail(SubmitError),
}

/// A Lob-compatible printer client; share it (`Arc`) between the tasks submitting pieces.
pub struct LobClient {
    cfg: LobConfig,
    endpoint: Endpoint,
    auth: String,
    in_flight: Semaphore,
    limiter: Mutex<RateLimiter>,
    pause: Arc<dyn Pause>,
    stats: PrinterStats,
}

impl fmt::Debug for LobClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("LobClient")
            .field("base_url", &self.cfg.base_url)
            .finish_non_exhaustive()
    }
}

impl LobClient {
    /// A client waiting on tokio's timer.
    pub fn new(cfg: LobConfig, api_key: &str) -> Result<LobClient> {
        LobClient::with_pause(cfg, api_key, Arc::new(TokioPause))
    }

    /// A client waiting through `pause`.
    pub fn with_pause(cfg: LobConfig, api_key: &str, pause: Arc<dyn Pause>) -> Result<LobClient> {
        cfg.validate().map_err(|problems| Error::Config {
            what: "lob printer".into(),
            problems,
        })?;
        let endpoint = Endpoint::parse(&cfg.base_url).map_err(|e| Error::Config {
            what: "lob printer".into(),
            problems: vec![e],
        })?;
        Ok(LobClient {
            endpoint,
            auth: http::basic_auth(api_key),
            in_flight: Semaphore::new(cfg.max_in_flight),
            limiter: Mutex::new(RateLimiter::new(cfg.requests_per_second)),
            pause,
            stats: PrinterStats::default(),
            cfg,
        })
    }

    /// This printer's counters.
    pub fn stats(&self) -> PrinterStatsSnapshot {
        self.stats.snapshot()
    }

    /// Creates the mailpiece, retrying what can be retried. Safe to call again for the same
    /// piece (after a crash, say): the key makes the printer return the first mailpiece.
    pub async fn create(&self, piece: &MailPiece) -> std::result::Result<Created, SubmitError> {
        self.create_prepared(&piece.prepare()).await
    }

    /// [`LobClient::create`] for a piece whose request body was built beforehand (the send
    /// pipeline renders and serialises pieces on its worker threads).
    pub async fn create_prepared(
        &self,
        piece: &PreparedPiece,
    ) -> std::result::Result<Created, SubmitError> {
        let body = &piece.body;
        let path = piece.path;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = {
                // The permit comes first and the start slot second, so a request never waits
                // for a permit after its slot: starts stay at least 1/rate apart.
                // (The semaphore is never closed, so acquiring cannot fail.)
                let _permit = self.in_flight.acquire().await.ok();
                let wait = self
                    .limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reserve(Instant::now());
                if !wait.is_zero() {
                    self.pause.pause(wait).await;
                }
                bump(&self.stats.requests);
                if attempt > 1 {
                    bump(&self.stats.retries);
                }
                let headers = [
                    ("authorization", self.auth.as_str()),
                    ("idempotency-key", piece.key.as_str()),
                ];
                let sent = tokio::time::timeout(
                    Duration::from_millis(self.cfg.timeout_ms),
                    http::post_json(&self.endpoint, path, &headers, body.clone()),
                )
                .await;
                match sent {
                    Err(_) => {
                        bump(&self.stats.transport_errors);
                        Outcome::Retry {
                            why: format!("no answer within {} ms", self.cfg.timeout_ms),
                            wait: None,
                        }
                    }
                    Ok(Err(e)) => {
                        bump(&self.stats.transport_errors);
                        Outcome::Retry { why: e, wait: None }
                    }
                    Ok(Ok(answer)) => self.classify(answer),
                }
            };
            match outcome {
                Outcome::Created(id, metadata) => {
                    bump(&self.stats.created);
                    return Ok(Created {
                        id,
                        attempts: attempt,
                        metadata,
                    });
                }
                Outcome::Fail(e) => {
                    if matches!(e, SubmitError::Rejected { .. }) {
                        bump(&self.stats.refused);
                    }
                    tracing::warn!(key = %piece.key, error = %e, "mailpiece not created");
                    return Err(e);
                }
                Outcome::Retry { why, wait } => {
                    if attempt >= self.cfg.max_attempts {
                        return Err(SubmitError::GaveUp {
                            attempts: attempt,
                            last: why,
                        });
                    }
                    let delay = match wait {
                        Some(d) => {
                            self.limiter
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .hold_until(Instant::now() + d);
                            d
                        }
                        None => backoff(&self.cfg, &piece.key, attempt),
                    };
                    tracing::debug!(key = %piece.key, attempt, ?delay, %why, "retrying mailpiece");
                    self.pause.pause(delay).await;
                }
            }
        }
    }

    fn classify(&self, answer: http::Answer) -> Outcome {
        let status = answer.status;
        let text =
            || String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)]).into_owned();
        if (200..300).contains(&status) {
            let piece = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
            let id = piece
                .as_ref()
                .and_then(|v| v.get("id")?.as_str())
                .map(str::to_string);
            return match id {
                Some(id) => {
                    let metadata = piece
                        .as_ref()
                        .and_then(|v| v.get("metadata")?.as_object())
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                                .collect()
                        })
                        .unwrap_or_default();
                    Outcome::Created(id, metadata)
                }
                None => Outcome::Fail(SubmitError::BadAnswer {
                    status,
                    body: text(),
                }),
            };
        }
        let (code, message) = match serde_json::from_slice::<LobErrorBody>(&answer.body) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (String::new(), text()),
        };
        let wait = retry_after(answer.retry_after.as_deref(), self.cfg.max_retry_after_secs);
        match status {
            429 => {
                bump(&self.stats.rate_limited);
                Outcome::Retry {
                    why: format!("HTTP 429 {code}: {message}"),
                    wait,
                }
            }
            408 | 500..=599 => {
                bump(&self.stats.server_errors);
                Outcome::Retry {
                    why: format!("HTTP {status} {code}: {message}"),
                    wait: if status == 503 { wait } else { None },
                }
            }
            _ => Outcome::Fail(SubmitError::Rejected {
                status,
                code,
                message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(workspace: &str, campaign: &str, run: &str) -> RunScope {
        RunScope {
            workspace_id: workspace.into(),
            campaign_id: campaign.into(),
            run_id: run.into(),
        }
    }

    #[test]
    fn keys_are_deterministic_and_distinct_per_run() {
        let r1 = run("acme", "c1", "run-1");
        let a = r1.key("r1", "postcard");
        assert_eq!(a, IdempotencyKey::derive(&r1, "r1", "postcard"));
        assert_eq!(a.as_str().len(), 52);
        assert!(a.as_str().starts_with("bs2-"));
        assert_ne!(a, r1.key("r2", "postcard"));
        assert_ne!(a, r1.key("r1", "letter"));
        // Another run (`--new-run`), campaign or workspace never shares a key.
        assert_ne!(a, run("acme", "c1", "run-2").key("r1", "postcard"));
        assert_ne!(a, run("acme", "c2", "run-1").key("r1", "postcard"));
        assert_ne!(a, run("other", "c1", "run-1").key("r1", "postcard"));
        assert_ne!(
            run("ab", "c", "r").key("", ""),
            run("a", "bc", "r").key("", "")
        );
        assert_ne!(
            run("w", "c", "r").key("ab", "c"),
            run("w", "c", "r").key("a", "bc")
        );
        // Pinned: a change here would print every in-flight recipient twice after an upgrade.
        // (Computed independently: Python hashlib over the same length-prefixed parts.)
        assert_eq!(
            run("acme", "spring", "20261207T030000-ab12")
                .key("42", "postcard")
                .to_string(),
            "bs2-f716439e3ad2502ec3ec8d33b33ffa3595caa86f11e4bfd4"
        );
    }

    #[test]
    fn origin_tells_this_attempt_an_earlier_one_and_another_run() {
        let owner = PieceOwner {
            run: run("acme", "spring", "r1"),
            attempt_id: "a2".into(),
        };
        let key = owner.run.key("42", "postcard");
        let piece = |meta: &[(&str, &str)]| Created {
            id: "psc_1".into(),
            attempts: 1,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mine: Vec<(&str, &str)> = owner.metadata().to_vec();
        assert_eq!(owner.origin(&key, &piece(&mine)), Ok(Origin::Created));
        let earlier: Vec<(&str, &str)> = mine
            .iter()
            .map(|&(k, v)| (k, if k == "attempt_id" { "a1" } else { v }))
            .collect();
        assert_eq!(owner.origin(&key, &piece(&earlier)), Ok(Origin::Returned));
        let other: Vec<(&str, &str)> = mine
            .iter()
            .map(|&(k, v)| (k, if k == "run_id" { "r0" } else { v }))
            .collect();
        let e = owner.origin(&key, &piece(&other)).unwrap_err();
        assert!(matches!(&e, SubmitError::OtherRun(p) if p.run_id == "r0" && p.ours == "r1"));
        let msg = e.to_string();
        assert!(
            msg.contains("belongs to run r0") && msg.contains("psc_1") && msg.contains("run r1"),
            "{msg}"
        );
        assert!(!e.stops_the_printer());
        // A piece without our metadata is not ours either.
        let e = owner.origin(&key, &piece(&[])).unwrap_err();
        assert!(e.to_string().contains("belongs to run (none)"), "{e}");
        let ws: Vec<(&str, &str)> = mine
            .iter()
            .map(|&(k, v)| (k, if k == "workspace_id" { "beta" } else { v }))
            .collect();
        assert!(owner.origin(&key, &piece(&ws)).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let cfg = LobConfig {
            backoff_ms: 100,
            max_backoff_ms: 1000,
            ..LobConfig::default()
        };
        let key = run("w", "c", "run").key("r", "p");
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = backoff(&cfg, &key, attempt).as_millis() as u64;
            assert!((full / 2..=full).contains(&d), "attempt {attempt}: {d} ms");
            assert_eq!(backoff(&cfg, &key, attempt), backoff(&cfg, &key, attempt));
        }
    }

    #[test]
    fn retry_after_is_seconds_and_capped() {
        assert_eq!(retry_after(Some("7"), 300), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(Some(" 0 "), 300), Some(Duration::ZERO));
        assert_eq!(
            retry_after(Some("9999"), 300),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), 300),
            None
        );
        assert_eq!(retry_after(None, 300), None);
    }

    #[test]
    fn rate_limiter_spaces_starts_and_honours_holds() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(10.0));
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(l.reserve(t0)), 0);
        assert_eq!(ms(l.reserve(t0)), 100);
        assert_eq!(ms(l.reserve(t0)), 200);
        // Idle time is not banked as a burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(ms(l.reserve(later)), 0);
        assert_eq!(ms(l.reserve(later)), 100);
        l.hold_until(later + Duration::from_secs(5));
        assert_eq!(ms(l.reserve(later)), 5000);
        let mut unlimited = RateLimiter::new(None);
        assert!((0..100).all(|_| unlimited.reserve(t0).is_zero()));
    }

    #[test]
    fn config_validation_lists_every_problem() {
        let cfg = LobConfig {
            base_url: "ftp://x".into(),
            max_in_flight: 0,
            requests_per_second: Some(0.0),
            max_attempts: 0,
            backoff_ms: 10,
            max_backoff_ms: 5,
            timeout_ms: 0,
            ..LobConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().len(), 6);
        // The real service's https URL is a valid default.
        assert_eq!(LobConfig::default().validate(), Ok(()));
        assert!(LobClient::new(cfg, "k").is_err());
    }

    #[test]
    fn request_bodies_have_lobs_shape() {
        let to = Address {
            name: Some("Harry Zhang".into()),
            address_line1: Some("210 King St".into()),
            address_city: Some("San Francisco".into()),
            address_state: Some("CA".into()),
            address_zip: Some("94107".into()),
            ..Address::default()
        };
        let mut merge = serde_json::Map::new();
        merge.insert("first_name".into(), "Harry".into());
        let piece = MailPiece {
            key: run("w", "c", "run").key("r", "p"),
            description: Some("spring".into()),
            to: to.clone(),
            from: None,
            creative: Creative::Postcard {
                front: "<html>{{first_name}}</html>".into(),
                back: "tmpl_abc".into(),
                size: Some("4x6".into()),
            },
            merge_variables: merge,
            metadata: [("campaign".to_string(), "c".to_string())].into(),
        };
        assert_eq!(
            piece.request_body(),
            serde_json::json!({
                "description": "spring",
                "to": {"name": "Harry Zhang", "address_line1": "210 King St",
                       "address_city": "San Francisco", "address_state": "CA", "address_zip": "94107"},
                "front": "<html>{{first_name}}</html>",
                "back": "tmpl_abc",
                "size": "4x6",
                "merge_variables": {"first_name": "Harry"},
                "metadata": {"campaign": "c"},
            })
        );
        let letter = MailPiece {
            creative: Creative::Letter {
                file: "<html>hi</html>".into(),
                color: false,
            },
            from: Some(to),
            merge_variables: serde_json::Map::new(),
            metadata: BTreeMap::new(),
            description: None,
            ..piece
        };
        let body = letter.request_body();
        assert_eq!(body["color"], false);
        assert!(body.get("from").is_some() && body.get("merge_variables").is_none());
        assert_eq!(letter.creative.path(), "/v1/letters");
    }

    #[test]
    fn submit_errors_map_to_seed_004_messages() {
        let rejected = SubmitError::Rejected {
            status: 422,
            code: "invalid".into(),
            message: "to.address_line1 is too long".into(),
        };
        assert_eq!(
            rejected.recipient_state(),
            RecipientState::Error {
                message: "Failed to make mail piece for this recipient: to.address_line1 is too long (422 invalid)".into()
            }
        );
        assert!(!rejected.stops_the_printer());
        let gave_up = SubmitError::GaveUp {
            attempts: 3,
            last: "HTTP 503".into(),
        };
        match gave_up.recipient_state() {
            RecipientState::Error { message } => {
                assert!(
                    message.starts_with("Failed submission to Printer: "),
                    "{message}"
                )
            }
            other => panic!("{other}"),
        }
        assert!(SubmitError::Rejected {
            status: 401,
            code: "unauthorized".into(),
            message: String::new()
        }
        .stops_the_printer());
    }
}
