//! The campaign store: one SQLite file (WAL) holding campaigns, sendings, audiences, templates,
//! run history and scheduler leases.
//!
//! Migrations are numbered and tracked in `PRAGMA user_version`; each runs in one transaction.
//! The SQL sticks to what PostgreSQL also accepts (`INSERT .. ON CONFLICT .. DO UPDATE ..
//! WHERE`, `RETURNING`, integer unix seconds, JSON kept as text) so a Postgres-backed store can
//! reuse the statements; docs/campaigns.md lists the few differences.
//!
//! Every write that reads first runs in `BEGIN IMMEDIATE`, so two processes on one file
//! serialise instead of failing with a busy error halfway through.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::audience::{Condition, Recipients};
use crate::error::{Error, Result};
use crate::schedule::{Schedule, Timing};
use crate::state::{CampaignState, SendingStatus};

/// The schema, one entry per version; `user_version` counts the ones applied.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema
    "CREATE TABLE campaigns (
        id INTEGER PRIMARY KEY,
        workspace_id TEXT NOT NULL,
        name TEXT NOT NULL,
        domain BIGINT,
        list_id BIGINT,
        segments TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,
        send_at BIGINT,
        event_callback TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        deleted_at BIGINT
    );
    CREATE INDEX campaigns_workspace ON campaigns (workspace_id, id);
    CREATE TABLE audiences (
        id INTEGER PRIMARY KEY,
        workspace_id TEXT NOT NULL,
        name TEXT NOT NULL,
        conditions TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE sendings (
        id INTEGER PRIMARY KEY,
        campaign_id BIGINT NOT NULL REFERENCES campaigns (id),
        status TEXT NOT NULL,
        schedule TEXT NOT NULL,
        desired_at BIGINT,
        prepare_at BIGINT,
        fail_at BIGINT,
        recipients TEXT NOT NULL,
        prepared TEXT,
        recipient_count BIGINT,
        error TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX sendings_due ON sendings (status, prepare_at);
    CREATE INDEX sendings_campaign ON sendings (campaign_id);
    CREATE TABLE templates (
        id INTEGER PRIMARY KEY,
        workspace_id TEXT NOT NULL,
        name TEXT NOT NULL,
        content TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        synced_hash TEXT,
        synced_at BIGINT,
        UNIQUE (workspace_id, name)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        sending_id BIGINT NOT NULL REFERENCES sendings (id),
        step TEXT NOT NULL,
        holder TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        finished_at BIGINT,
        outcome TEXT,
        detail TEXT
    );
    CREATE INDEX runs_sending ON runs (sending_id, id);
    CREATE TABLE leases (
        sending_id BIGINT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );",
    // 2: the engagement-callback relay: which send run belongs to which sending (and where
    // its events are stored), and which event files were relayed
    "CREATE TABLE sending_runs (
        run_id TEXT PRIMARY KEY,
        sending_id BIGINT NOT NULL REFERENCES sendings (id),
        workspace_id TEXT NOT NULL,
        campaign_key TEXT NOT NULL,
        recorded_at BIGINT NOT NULL
    );
    CREATE INDEX sending_runs_sending ON sending_runs (sending_id);
    CREATE TABLE relayed_event_files (
        path TEXT PRIMARY KEY,
        events BIGINT NOT NULL,
        relayed_at BIGINT NOT NULL
    );",
];

/// The lease key the event relay takes in `leases` (sending ids start at 1), so one process
/// per store relays.
pub const RELAY_LEASE: i64 = 0;

/// Where a sending's send run stores its events, as recorded by the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendingRun {
    /// The send run id (`sending-<id>-<created>` for the binary's executor).
    pub run_id: String,
    /// The sending.
    pub sending_id: i64,
    /// The workspace the run's events are stored under (the campaign spec's `workspace_id`).
    pub workspace_id: String,
    /// The campaign id the run's events carry (the campaign spec's `campaign_id`).
    pub campaign_key: String,
}

/// Where a relayed event goes: the campaign and its callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCallback {
    /// The run as recorded.
    pub run: SendingRun,
    /// The campaign of the sending.
    pub campaign_id: i64,
    /// Its `event_callback`, if any (and the campaign is not deleted).
    pub event_callback: Option<String>,
}

/// A campaign as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    /// Numeric id.
    pub id: i64,
    /// The workspace that owns it.
    pub workspace_id: String,
    /// Name.
    pub name: String,
    /// Bounce domain id.
    pub domain: Option<i64>,
    /// Contact list id.
    pub list: Option<i64>,
    /// Segment ids within the list (empty: the whole list).
    pub segments: Vec<i64>,
    /// Lifecycle state.
    pub state: CampaignState,
    /// Scheduled send time (unix seconds).
    pub when: Option<i64>,
    /// URL lifecycle events are posted to.
    pub event_callback: Option<String>,
    /// Created (unix seconds).
    pub created_at: i64,
    /// Last changed (unix seconds).
    pub updated_at: i64,
}

/// The editable fields of a campaign; `None` leaves a field as it is on update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CampaignFields {
    /// Name.
    pub name: Option<String>,
    /// Bounce domain id.
    pub domain: Option<Option<i64>>,
    /// Contact list id.
    pub list: Option<Option<i64>>,
    /// Segment ids.
    pub segments: Option<Vec<i64>>,
    /// New state (checked against the client transitions).
    pub state: Option<CampaignState>,
    /// Send time.
    pub when: Option<Option<i64>>,
    /// Callback URL.
    pub event_callback: Option<Option<String>>,
}

/// A sending as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sending {
    /// Numeric id.
    pub id: i64,
    /// Its campaign.
    pub campaign_id: i64,
    /// Status.
    pub status: SendingStatus,
    /// The schedule as given.
    pub schedule: Schedule,
    /// The instants it resolved to (none for a draft).
    pub timing: Option<Timing>,
    /// Who it goes to.
    pub recipients: Recipients,
    /// The executor's handle to the prepared dispatches.
    pub prepared: Option<String>,
    /// Recipients resolved by preparation.
    pub recipient_count: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Created (unix seconds).
    pub created_at: i64,
    /// Last changed (unix seconds).
    pub updated_at: i64,
}

/// One step of a sending's execution, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Row id.
    pub id: i64,
    /// The sending.
    pub sending_id: i64,
    /// `prepare` or `transmit`.
    pub step: String,
    /// The process that ran it.
    pub holder: String,
    /// Started (unix seconds).
    pub started_at: i64,
    /// Finished, if it did.
    pub finished_at: Option<i64>,
    /// `ok`, `skipped` or `failed`.
    pub outcome: Option<String>,
    /// Details (error text, counts).
    pub detail: Option<String>,
}

/// Extra columns set with a status change.
#[derive(Debug, Clone, Default)]
pub struct StatusPatch<'a> {
    /// Executor handle to store.
    pub prepared: Option<&'a str>,
    /// Recipient count to store.
    pub recipient_count: Option<i64>,
    /// Error to store.
    pub error: Option<&'a str>,
}

/// A handle to the store file.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SENDING_COLS: &str =
    "s.id, s.campaign_id, s.status, s.schedule, s.desired_at, s.prepare_at, \
     s.fail_at, s.recipients, s.prepared, s.recipient_count, s.error, s.created_at, s.updated_at";
const CAMPAIGN_COLS: &str = "id, workspace_id, name, domain, list_id, segments, state, send_at, \
     event_callback, created_at, updated_at";

impl Store {
    /// Opens (creating if needed) and migrates the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|e| Error::Store {
            path: path.to_path_buf(),
            context: "opening".into(),
            source: e,
        })?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.setup()?;
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn store_error(&self, context: String, source: rusqlite::Error) -> Error {
        Error::Store {
            path: self.path.clone(),
            context,
            source,
        }
    }

    fn err(&self, context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        let context = context.into();
        move |source| Error::Store {
            path: self.path.clone(),
            context,
            source,
        }
    }

    fn setup(&self) -> Result<()> {
        self.conn
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(self.err("setting the busy timeout"))?;
        // WAL lets readers (the API) run beside one writer (the scheduler); FULL sync because
        // a status change is a promise about what was sent.
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(self.err("enabling WAL"))?;
        self.conn
            .execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(self.err("setting pragmas"))?;
        self.tx(|c| {
            let version: usize = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(self.err("reading the schema version"))?;
            if version > MIGRATIONS.len() {
                return Err(Error::invalid(
                    "store",
                    format!(
                        "{} has schema version {version}, newer than this build knows ({}); upgrade broadside",
                        self.path.display(),
                        MIGRATIONS.len()
                    ),
                ));
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
                c.execute_batch(m)
                    .map_err(self.err(format!("applying migration {}", i + 1)))?;
                c.pragma_update(None, "user_version", i + 1)
                    .map_err(self.err("recording the schema version"))?;
            }
            Ok(())
        })
    }

    /// The schema version applied.
    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err("reading the schema version"))
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction (committed if it returns `Ok`).
    fn tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.err("starting a transaction"))?;
        match f(&self.conn) {
            Ok(v) => {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(self.err("committing"))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    // ---- campaigns ----

    /// Creates a campaign (DRAFT unless `fields.state` says SCHEDULED or READY).
    pub fn create_campaign(&self, ws: &str, fields: &CampaignFields, now: i64) -> Result<Campaign> {
        let name = fields
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| Error::invalid("name", "missing or empty"))?;
        let state = fields.state.unwrap_or(CampaignState::Draft);
        match state {
            CampaignState::Draft | CampaignState::Scheduled | CampaignState::Ready => {}
            other => {
                return Err(Error::Transition {
                    entity: "campaign",
                    id: 0,
                    from: "(new)".into(),
                    to: other.to_string(),
                    allowed: ["DRAFT", "SCHEDULED", "READY"].map(String::from).to_vec(),
                })
            }
        }
        let segments = serde_json::to_string(&fields.segments.clone().unwrap_or_default())
            .expect("ids serialise");
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO campaigns (workspace_id, name, domain, list_id, segments, state, send_at, event_callback, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) RETURNING id",
                params![
                    ws,
                    name,
                    fields.domain.flatten(),
                    fields.list.flatten(),
                    segments,
                    state.as_str(),
                    fields.when.flatten(),
                    fields.event_callback.clone().flatten(),
                    now
                ],
                |r| r.get(0),
            )
            .map_err(self.err("creating a campaign"))?;
        self.campaign(ws, id)
    }

    /// One campaign of a workspace.
    pub fn campaign(&self, ws: &str, id: i64) -> Result<Campaign> {
        self.conn
            .query_row(
                &format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE id = ?1 AND workspace_id = ?2 AND deleted_at IS NULL"),
                params![id, ws],
                campaign_row,
            )
            .optional()
            .map_err(self.err(format!("reading campaign {id}")))?
            .ok_or(Error::NotFound { what: "campaign", id })
    }

    /// A campaign by id alone, deleted or not (the scheduler's view).
    pub fn campaign_by_id(&self, id: i64) -> Result<Campaign> {
        self.conn
            .query_row(
                &format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE id = ?1"),
                params![id],
                campaign_row,
            )
            .optional()
            .map_err(self.err(format!("reading campaign {id}")))?
            .ok_or(Error::NotFound {
                what: "campaign",
                id,
            })
    }

    /// A workspace's campaigns, newest first.
    pub fn campaigns(&self, ws: &str) -> Result<Vec<Campaign>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE workspace_id = ?1 AND deleted_at IS NULL ORDER BY id DESC"))
            .map_err(self.err("listing campaigns"))?;
        let rows = st
            .query_map(params![ws], campaign_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.err("listing campaigns"))?;
        Ok(rows)
    }

    /// Changes a campaign; a state change must be a client transition (409 otherwise).
    /// Cancelling also cancels its draft and scheduled sendings.
    pub fn update_campaign(
        &self,
        ws: &str,
        id: i64,
        f: &CampaignFields,
        now: i64,
    ) -> Result<Campaign> {
        self.tx(|c| {
            let cur = self.campaign(ws, id)?;
            let state = match f.state {
                Some(s) => cur.state.client_transition(id, s)?,
                None => cur.state,
            };
            let edits = CampaignFields {
                state: None,
                ..f.clone()
            } != CampaignFields::default();
            if cur.state.is_final() && edits {
                // A finished campaign is history: its fields stay as they were when it ran.
                return Err(Error::Transition {
                    entity: "campaign",
                    id,
                    from: cur.state.to_string(),
                    to: "(edited)".into(),
                    allowed: Vec::new(),
                });
            }
            if f.name.as_ref().is_some_and(|n| n.trim().is_empty()) {
                return Err(Error::invalid("name", "is empty"));
            }
            let segments = f
                .segments
                .as_ref()
                .map(|s| serde_json::to_string(s).expect("ids serialise"));
            c.execute(
                "UPDATE campaigns SET
                    name = COALESCE(?3, name),
                    domain = CASE WHEN ?4 THEN ?5 ELSE domain END,
                    list_id = CASE WHEN ?6 THEN ?7 ELSE list_id END,
                    segments = COALESCE(?8, segments),
                    state = ?9,
                    send_at = CASE WHEN ?10 THEN ?11 ELSE send_at END,
                    event_callback = CASE WHEN ?12 THEN ?13 ELSE event_callback END,
                    updated_at = ?14
                 WHERE id = ?1 AND workspace_id = ?2",
                params![
                    id,
                    ws,
                    f.name,
                    f.domain.is_some(),
                    f.domain.flatten(),
                    f.list.is_some(),
                    f.list.flatten(),
                    segments,
                    state.as_str(),
                    f.when.is_some(),
                    f.when.flatten(),
                    f.event_callback.is_some(),
                    f.event_callback.clone().flatten(),
                    now
                ],
            )
            .map_err(self.err(format!("updating campaign {id}")))?;
            if state == CampaignState::Cancelled {
                self.cancel_pending_sendings(c, id, now)?;
            }
            self.campaign(ws, id)
        })
    }

    /// Deletes a campaign (kept for history, hidden from the API) and cancels its pending
    /// sendings; refused while it is SENDING.
    pub fn delete_campaign(&self, ws: &str, id: i64, now: i64) -> Result<Campaign> {
        self.tx(|c| {
            let cur = self.campaign(ws, id)?;
            if cur.state == CampaignState::Sending {
                return Err(Error::Transition {
                    entity: "campaign",
                    id,
                    from: cur.state.to_string(),
                    to: "(deleted)".into(),
                    allowed: cur
                        .state
                        .allowed_from()
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                });
            }
            c.execute(
                "UPDATE campaigns SET deleted_at = ?2, updated_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map_err(self.err(format!("deleting campaign {id}")))?;
            self.cancel_pending_sendings(c, id, now)?;
            Ok(cur)
        })
    }

    fn cancel_pending_sendings(&self, c: &Connection, campaign_id: i64, now: i64) -> Result<()> {
        c.execute(
            "UPDATE sendings SET status = 'cancelled', updated_at = ?2
             WHERE campaign_id = ?1 AND status IN ('draft', 'scheduled')",
            params![campaign_id, now],
        )
        .map_err(self.err(format!("cancelling the sendings of campaign {campaign_id}")))?;
        Ok(())
    }

    /// Moves a campaign along as its sendings progress: READY → SENDING when one starts,
    /// SENDING → DONE / ERROR when none is scheduled or executing any more.
    pub fn sync_campaign_state(&self, campaign_id: i64, now: i64) -> Result<Option<CampaignState>> {
        self.tx(|c| {
            let state: String = c
                .query_row("SELECT state FROM campaigns WHERE id = ?1", params![campaign_id], |r| r.get(0))
                .map_err(self.err(format!("reading campaign {campaign_id}")))?;
            let state: CampaignState = state.parse()?;
            let count = |statuses: &str| -> Result<i64> {
                c.query_row(
                    &format!("SELECT COUNT(*) FROM sendings WHERE campaign_id = ?1 AND status IN ({statuses})"),
                    params![campaign_id],
                    |r| r.get(0),
                )
                .map_err(self.err(format!("counting the sendings of campaign {campaign_id}")))
            };
            let started = count("'preparing', 'prepared', 'transmitting', 'transmitted', 'skipped', 'failed'")?;
            let open = count("'scheduled', 'preparing', 'prepared', 'transmitting'")?;
            let failed = count("'failed'")?;
            let next = match state {
                CampaignState::Ready if started > 0 => Some(CampaignState::Sending),
                _ => None,
            };
            let after = next.unwrap_or(state);
            let next = match after {
                CampaignState::Sending if open == 0 && failed > 0 => Some(CampaignState::Error),
                CampaignState::Sending if open == 0 => Some(CampaignState::Done),
                _ => next,
            };
            if let Some(n) = next {
                c.execute(
                    "UPDATE campaigns SET state = ?2, updated_at = ?3 WHERE id = ?1",
                    params![campaign_id, n.as_str(), now],
                )
                .map_err(self.err(format!("updating campaign {campaign_id}")))?;
            }
            Ok(next)
        })
    }

    // ---- audiences ----

    /// Stores an audience (conditions are checked by the caller against its field map).
    pub fn create_audience(
        &self,
        ws: &str,
        name: &str,
        conditions: &[Condition],
        now: i64,
    ) -> Result<i64> {
        let json = serde_json::to_string(conditions).expect("conditions serialise");
        self.conn
            .query_row(
                "INSERT INTO audiences (workspace_id, name, conditions, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![ws, name, json, now],
                |r| r.get(0),
            )
            .map_err(self.err("creating an audience"))
    }

    /// A stored audience's conditions.
    pub fn audience(&self, ws: &str, id: i64) -> Result<Vec<Condition>> {
        let json: String = self
            .conn
            .query_row(
                "SELECT conditions FROM audiences WHERE id = ?1 AND workspace_id = ?2",
                params![id, ws],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err(format!("reading audience {id}")))?
            .ok_or(Error::NotFound {
                what: "audience",
                id,
            })?;
        serde_json::from_str(&json)
            .map_err(|e| Error::invalid(format!("audience {id}"), e.to_string()))
    }

    // ---- sendings ----

    /// Adds a sending to a campaign; `timing` comes from resolving `schedule` at `now`.
    pub fn create_sending(
        &self,
        ws: &str,
        campaign_id: i64,
        schedule: &Schedule,
        timing: Option<Timing>,
        recipients: &Recipients,
        now: i64,
    ) -> Result<Sending> {
        self.tx(|c| {
            let camp = self.campaign(ws, campaign_id)?;
            if camp.state.is_final() {
                return Err(Error::Transition {
                    entity: "campaign",
                    id: campaign_id,
                    from: camp.state.to_string(),
                    to: "(new sending)".into(),
                    allowed: Vec::new(),
                });
            }
            if let Some(crate::audience::Audience::Reference { id }) = &recipients.audience {
                self.audience(ws, *id).map_err(|e| match e {
                    Error::NotFound { .. } => Error::invalid("audience.id", format!("audience {id} does not exist")),
                    other => other,
                })?;
            }
            let status = if timing.is_some() {
                SendingStatus::Scheduled
            } else {
                SendingStatus::Draft
            };
            let id: i64 = c
                .query_row(
                    "INSERT INTO sendings (campaign_id, status, schedule, desired_at, prepare_at, fail_at, recipients, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) RETURNING id",
                    params![
                        campaign_id,
                        status.as_str(),
                        serde_json::to_string(schedule).expect("schedule serialises"),
                        timing.map(|t| t.desired_at),
                        timing.map(|t| t.prepare_at),
                        timing.map(|t| t.fail_at),
                        serde_json::to_string(recipients).expect("recipients serialise"),
                        now
                    ],
                    |r| r.get(0),
                )
                .map_err(self.err(format!("adding a sending to campaign {campaign_id}")))?;
            self.sending(ws, id)
        })
    }

    /// One sending of a workspace.
    pub fn sending(&self, ws: &str, id: i64) -> Result<Sending> {
        self.conn
            .query_row(
                &format!("SELECT {SENDING_COLS} FROM sendings s JOIN campaigns c ON c.id = s.campaign_id WHERE s.id = ?1 AND c.workspace_id = ?2"),
                params![id, ws],
                sending_row,
            )
            .optional()
            .map_err(self.err(format!("reading sending {id}")))?
            .ok_or(Error::NotFound { what: "sending", id })
    }

    /// A sending by id alone (the scheduler's view).
    pub fn sending_by_id(&self, id: i64) -> Result<Sending> {
        self.conn
            .query_row(
                &format!("SELECT {SENDING_COLS} FROM sendings s WHERE s.id = ?1"),
                params![id],
                sending_row,
            )
            .optional()
            .map_err(self.err(format!("reading sending {id}")))?
            .ok_or(Error::NotFound {
                what: "sending",
                id,
            })
    }

    /// A campaign's sendings, oldest first.
    pub fn sendings(&self, ws: &str, campaign_id: i64) -> Result<Vec<Sending>> {
        self.campaign(ws, campaign_id)?;
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {SENDING_COLS} FROM sendings s WHERE s.campaign_id = ?1 ORDER BY s.id"
            ))
            .map_err(self.err("listing sendings"))?;
        let rows = st
            .query_map(params![campaign_id], sending_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.err("listing sendings"))?;
        Ok(rows)
    }

    /// Gives a draft or scheduled sending a new schedule (a draft schedule makes it a draft).
    /// Cancelled, failed and executing sendings are refused (409).
    pub fn reschedule_sending(
        &self,
        ws: &str,
        id: i64,
        schedule: &Schedule,
        timing: Option<Timing>,
        now: i64,
    ) -> Result<Sending> {
        self.tx(|c| {
            let cur = self.sending(ws, id)?;
            let to = if timing.is_some() {
                SendingStatus::Scheduled
            } else {
                SendingStatus::Draft
            };
            if !cur.status.reschedulable() {
                cur.status.transition(id, to)?;
            }
            c.execute(
                "UPDATE sendings SET status = ?2, schedule = ?3, desired_at = ?4, prepare_at = ?5, fail_at = ?6, updated_at = ?7
                 WHERE id = ?1 AND status IN ('draft', 'scheduled')",
                params![
                    id,
                    to.as_str(),
                    serde_json::to_string(schedule).expect("schedule serialises"),
                    timing.map(|t| t.desired_at),
                    timing.map(|t| t.prepare_at),
                    timing.map(|t| t.fail_at),
                    now
                ],
            )
            .map_err(self.err(format!("rescheduling sending {id}")))?;
            self.sending(ws, id)
        })
    }

    /// Cancels a draft or scheduled sending (409 once execution has started or it ended).
    pub fn cancel_sending(&self, ws: &str, id: i64, now: i64) -> Result<Sending> {
        self.tx(|c| {
            let cur = self.sending(ws, id)?;
            cur.status.transition(id, SendingStatus::Cancelled)?;
            c.execute(
                "UPDATE sendings SET status = 'cancelled', updated_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map_err(self.err(format!("cancelling sending {id}")))?;
            self.sending(ws, id)
        })
    }

    // ---- scheduler ----

    /// Sendings whose preparation time has come, of READY or SENDING campaigns, oldest due
    /// first; includes ones left preparing / prepared / transmitting by a stopped process.
    pub fn due_sendings(&self, now: i64, limit: usize) -> Result<Vec<Sending>> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {SENDING_COLS} FROM sendings s JOIN campaigns c ON c.id = s.campaign_id
                 WHERE s.status IN ('scheduled', 'preparing', 'prepared', 'transmitting')
                   AND s.prepare_at <= ?1 AND c.state IN ('READY', 'SENDING')
                 ORDER BY s.prepare_at, s.id LIMIT ?2"
            ))
            .map_err(self.err("finding due sendings"))?;
        let rows = st
            .query_map(params![now, limit as i64], sending_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.err("finding due sendings"))?;
        Ok(rows)
    }

    /// Fails sendings past their window that no live lease holds; returns their ids.
    pub fn fail_overdue(&self, now: i64) -> Result<Vec<(i64, i64)>> {
        let mut st = self
            .conn
            .prepare(
                "UPDATE sendings SET status = 'failed', updated_at = ?1,
                    error = 'not finished within the window after the desired time'
                 WHERE status IN ('scheduled', 'preparing', 'prepared', 'transmitting') AND fail_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.sending_id = sendings.id AND l.expires_at > ?1)
                 RETURNING id, campaign_id",
            )
            .map_err(self.err("failing overdue sendings"))?;
        let rows = st
            .query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.err("failing overdue sendings"))?;
        Ok(rows)
    }

    /// Takes (or renews) the lease on a sending until `now + ttl`; false when another holder
    /// has a lease that has not expired. One statement, so it is atomic across processes.
    pub fn try_lease(&self, sending_id: i64, holder: &str, now: i64, ttl: i64) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "INSERT INTO leases (sending_id, holder, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sending_id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.expires_at <= ?4 OR leases.holder = excluded.holder",
                params![sending_id, holder, now + ttl, now],
            )
            .map_err(self.err(format!("leasing sending {sending_id}")))?;
        Ok(n == 1)
    }

    /// Gives a lease back (only if `holder` still has it).
    pub fn release_lease(&self, sending_id: i64, holder: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM leases WHERE sending_id = ?1 AND holder = ?2",
                params![sending_id, holder],
            )
            .map_err(self.err(format!("releasing the lease on sending {sending_id}")))?;
        Ok(())
    }

    /// Moves a sending from `from` to `to` if it is still in `from` and `holder` still has a
    /// live lease on it; false otherwise (someone else moved it, or the lease was lost).
    pub fn advance(
        &self,
        id: i64,
        holder: &str,
        from: SendingStatus,
        to: SendingStatus,
        now: i64,
        patch: &StatusPatch<'_>,
    ) -> Result<bool> {
        from.transition(id, to)?;
        let n = self
            .conn
            .execute(
                "UPDATE sendings SET status = ?3, updated_at = ?4,
                    prepared = COALESCE(?5, prepared),
                    recipient_count = COALESCE(?6, recipient_count),
                    error = COALESCE(?7, error)
                 WHERE id = ?1 AND status = ?2
                   AND EXISTS (SELECT 1 FROM leases l WHERE l.sending_id = ?1 AND l.holder = ?8 AND l.expires_at > ?4)",
                params![
                    id,
                    from.as_str(),
                    to.as_str(),
                    now,
                    patch.prepared,
                    patch.recipient_count,
                    patch.error,
                    holder
                ],
            )
            .map_err(self.err(format!("moving sending {id} to {to}")))?;
        Ok(n == 1)
    }

    /// Starts executing a sending: `scheduled → preparing` and its campaign `READY → SENDING`
    /// in one transaction, only if the campaign is still READY (or already SENDING) and
    /// `holder` has a live lease. False when any of that no longer holds, e.g. the campaign
    /// was cancelled after the sending was found due.
    pub fn begin_execution(&self, id: i64, holder: &str, now: i64) -> Result<bool> {
        self.tx(|c| {
            let campaign_id: Option<i64> = c
                .query_row(
                    "SELECT s.campaign_id FROM sendings s JOIN campaigns c ON c.id = s.campaign_id
                     WHERE s.id = ?1 AND s.status = 'scheduled' AND c.state IN ('READY', 'SENDING')
                       AND c.deleted_at IS NULL",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.err(format!("reading sending {id}")))?;
            let Some(campaign_id) = campaign_id else {
                return Ok(false);
            };
            let none = StatusPatch::default();
            if !self.advance(id, holder, SendingStatus::Scheduled, SendingStatus::Preparing, now, &none)? {
                return Ok(false);
            }
            c.execute(
                "UPDATE campaigns SET state = 'SENDING', updated_at = ?2 WHERE id = ?1 AND state = 'READY'",
                params![campaign_id, now],
            )
            .map_err(self.err(format!("updating campaign {campaign_id}")))?;
            Ok(true)
        })
    }

    /// Records the start of an execution step; returns the run id.
    pub fn start_run(&self, sending_id: i64, step: &str, holder: &str, now: i64) -> Result<i64> {
        self.conn
            .query_row(
                "INSERT INTO runs (sending_id, step, holder, started_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![sending_id, step, holder, now],
                |r| r.get(0),
            )
            .map_err(self.err(format!("recording a run of sending {sending_id}")))
    }

    /// Records how a step ended.
    pub fn finish_run(
        &self,
        run_id: i64,
        now: i64,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3, detail = ?4 WHERE id = ?1",
                params![run_id, now, outcome, detail],
            )
            .map_err(self.err(format!("recording the end of run {run_id}")))?;
        Ok(())
    }

    // ---- event relay ----

    /// Records (or updates) which sending a send run belongs to and where its events are
    /// stored; the executor calls it before the run writes anything.
    pub fn record_sending_run(&self, run: &SendingRun, now: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO sending_runs (run_id, sending_id, workspace_id, campaign_key, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (run_id) DO UPDATE SET sending_id = excluded.sending_id,
                    workspace_id = excluded.workspace_id, campaign_key = excluded.campaign_key,
                    recorded_at = excluded.recorded_at",
                params![
                    run.run_id,
                    run.sending_id,
                    run.workspace_id,
                    run.campaign_key,
                    now
                ],
            )
            .map_err(self.err(format!("recording run {} of sending {}", run.run_id, run.sending_id)))?;
        Ok(())
    }

    /// The sending run with this id, its campaign and the campaign's callback (`None` for a
    /// deleted campaign); `None` when no sending recorded the run.
    pub fn run_callback(&self, run_id: &str) -> Result<Option<RunCallback>> {
        self.conn
            .query_row(
                "SELECT r.run_id, r.sending_id, r.workspace_id, r.campaign_key, c.id,
                        CASE WHEN c.deleted_at IS NULL THEN c.event_callback END
                 FROM sending_runs r JOIN sendings s ON s.id = r.sending_id
                 JOIN campaigns c ON c.id = s.campaign_id WHERE r.run_id = ?1",
                params![run_id],
                |r| {
                    Ok(RunCallback {
                        run: SendingRun {
                            run_id: r.get(0)?,
                            sending_id: r.get(1)?,
                            workspace_id: r.get(2)?,
                            campaign_key: r.get(3)?,
                        },
                        campaign_id: r.get(4)?,
                        event_callback: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(self.err(format!("looking up run {run_id}")))
    }

    /// Whether the relay already relayed this event file (path relative to the event root).
    pub fn is_relayed(&self, path: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT 1 FROM relayed_event_files WHERE path = ?1",
                params![path],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(self.err(format!("reading relay progress of {path}")))
    }

    /// Records event files as relayed (path, events queued), in one transaction.
    pub fn mark_relayed(&self, files: &[(String, u64)], now: i64) -> Result<()> {
        self.tx(|c| {
            for (path, events) in files {
                c.execute(
                    "INSERT INTO relayed_event_files (path, events, relayed_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (path) DO NOTHING",
                    params![path, *events as i64, now],
                )
                .map_err(self.err(format!("recording relay progress of {path}")))?;
            }
            Ok(())
        })
    }

    /// How many event files were relayed.
    pub fn relayed_files(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM relayed_event_files", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(self.err("counting relayed event files"))
    }

    /// A sending's run history, oldest first.
    pub fn runs(&self, sending_id: i64) -> Result<Vec<RunRecord>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, sending_id, step, holder, started_at, finished_at, outcome, detail
                 FROM runs WHERE sending_id = ?1 ORDER BY id",
            )
            .map_err(self.err("reading run history"))?;
        let rows = st
            .query_map(params![sending_id], |r| {
                Ok(RunRecord {
                    id: r.get(0)?,
                    sending_id: r.get(1)?,
                    step: r.get(2)?,
                    holder: r.get(3)?,
                    started_at: r.get(4)?,
                    finished_at: r.get(5)?,
                    outcome: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.err("reading run history"))?;
        Ok(rows)
    }
}

fn bad_column(i: usize, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.to_string().into())
}

fn campaign_row(r: &Row<'_>) -> rusqlite::Result<Campaign> {
    let segments: String = r.get(5)?;
    let state: String = r.get(6)?;
    Ok(Campaign {
        id: r.get(0)?,
        workspace_id: r.get(1)?,
        name: r.get(2)?,
        domain: r.get(3)?,
        list: r.get(4)?,
        segments: serde_json::from_str(&segments).map_err(|e| bad_column(5, e))?,
        state: state.parse().map_err(|e| bad_column(6, e))?,
        when: r.get(7)?,
        event_callback: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
    })
}

fn sending_row(r: &Row<'_>) -> rusqlite::Result<Sending> {
    let status: String = r.get(2)?;
    let schedule: String = r.get(3)?;
    let recipients: String = r.get(7)?;
    let desired_at: Option<i64> = r.get(4)?;
    let prepare_at: Option<i64> = r.get(5)?;
    let fail_at: Option<i64> = r.get(6)?;
    let timing = match (desired_at, prepare_at, fail_at) {
        (Some(desired_at), Some(prepare_at), Some(fail_at)) => Some(Timing {
            desired_at,
            prepare_at,
            fail_at,
        }),
        _ => None,
    };
    Ok(Sending {
        id: r.get(0)?,
        campaign_id: r.get(1)?,
        status: status.parse().map_err(|e| bad_column(2, e))?,
        schedule: serde_json::from_str(&schedule).map_err(|e| bad_column(3, e))?,
        timing,
        recipients: serde_json::from_str(&recipients).map_err(|e| bad_column(7, e))?,
        prepared: r.get(8)?,
        recipient_count: r.get(9)?,
        error: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleConfig, When};

    fn fields(name: &str) -> CampaignFields {
        CampaignFields {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn migrates_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let c = s.create_campaign("ws", &fields("spring"), 100).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.campaign("ws", c.id).unwrap().name, "spring");
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        s.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("schema version 99, newer than this build knows"),
            "{e}"
        );
    }

    #[test]
    fn campaigns_are_scoped_to_their_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db")).unwrap();
        let c = s.create_campaign("a", &fields("x"), 1).unwrap();
        assert!(matches!(
            s.campaign("b", c.id),
            Err(Error::NotFound {
                what: "campaign",
                ..
            })
        ));
        assert!(s.campaigns("b").unwrap().is_empty());
        assert_eq!(s.campaigns("a").unwrap().len(), 1);
        assert!(s.update_campaign("b", c.id, &fields("y"), 2).is_err());
        assert!(s.delete_campaign("b", c.id, 2).is_err());
        assert_eq!(s.campaign("a", c.id).unwrap().name, "x");
    }

    #[test]
    fn cancelling_a_campaign_cancels_its_pending_sendings_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db")).unwrap();
        let c = s.create_campaign("a", &fields("x"), 1).unwrap();
        let sched = Schedule {
            when: When::Immediate,
            prescheduled: false,
        };
        let t = sched
            .resolve(10, &ScheduleConfig::default(), "schedule")
            .unwrap();
        let draft = s
            .create_sending(
                "a",
                c.id,
                &Schedule::DRAFT,
                None,
                &Recipients::default(),
                10,
            )
            .unwrap();
        let due = s
            .create_sending("a", c.id, &sched, t, &Recipients::default(), 10)
            .unwrap();
        assert_eq!(
            (draft.status, due.status),
            (SendingStatus::Draft, SendingStatus::Scheduled)
        );
        let upd = CampaignFields {
            state: Some(CampaignState::Cancelled),
            ..Default::default()
        };
        assert_eq!(
            s.update_campaign("a", c.id, &upd, 20).unwrap().state,
            CampaignState::Cancelled
        );
        for sd in s.sendings("a", c.id).unwrap() {
            assert_eq!(sd.status, SendingStatus::Cancelled, "sending {}", sd.id);
        }
        let e = s
            .reschedule_sending("a", due.id, &sched, t, 30)
            .unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
    }

    #[test]
    fn a_recorded_run_maps_to_its_campaign_callback_and_relay_progress_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let s = Store::open(&path).unwrap();
        let c = s
            .create_campaign(
                "a",
                &CampaignFields {
                    event_callback: Some(Some("http://cb.test/hook?x=1".into())),
                    ..fields("x")
                },
                1,
            )
            .unwrap();
        let sd = s
            .create_sending("a", c.id, &Schedule::DRAFT, None, &Recipients::default(), 1)
            .unwrap();
        assert_eq!(s.run_callback("sending-1-1").unwrap(), None);
        let run = SendingRun {
            run_id: "sending-1-1".into(),
            sending_id: sd.id,
            workspace_id: "demo".into(),
            campaign_key: "spring".into(),
        };
        s.record_sending_run(&run, 2).unwrap();
        s.record_sending_run(&run, 3).unwrap();
        let rc = s.run_callback("sending-1-1").unwrap().unwrap();
        assert_eq!(
            (rc.run, rc.campaign_id, rc.event_callback.as_deref()),
            (run.clone(), c.id, Some("http://cb.test/hook?x=1"))
        );
        s.delete_campaign("a", c.id, 4).unwrap();
        let rc = s.run_callback("sending-1-1").unwrap().unwrap();
        assert_eq!(
            rc.event_callback, None,
            "a deleted campaign gets no callbacks"
        );

        assert!(!s
            .is_relayed("workspace_id=demo/date=2026-01-01/f.parquet")
            .unwrap());
        let files = vec![("workspace_id=demo/date=2026-01-01/f.parquet".to_string(), 3)];
        s.mark_relayed(&files, 5).unwrap();
        s.mark_relayed(&files, 6).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert!(s
            .is_relayed("workspace_id=demo/date=2026-01-01/f.parquet")
            .unwrap());
        assert_eq!(s.relayed_files().unwrap(), 1);
    }
}
