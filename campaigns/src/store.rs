//! The campaign store: campaigns, sendings, audiences, templates, run history and scheduler
//! leases, in one SQLite file (WAL) by default or in a PostgreSQL database that several
//! hosts share (a `postgres://` location).
//!
//! Migrations are numbered and applied in order, each in one transaction; SQLite tracks them
//! in `PRAGMA user_version`, PostgreSQL in a one-row `schema_version` table. The SQL sticks to
//! what both accept (`INSERT .. ON CONFLICT .. DO UPDATE .. WHERE`, `RETURNING`, integer unix
//! seconds, JSON kept as text), so each statement is written once: [`db`] rewrites the
//! placeholders (`?1` → `$1`) and `INTEGER PRIMARY KEY` (→ an identity column) for
//! PostgreSQL, and hands rows back in one form, so each row decoder exists once.
//!
//! Every write that reads first runs in a transaction that serialises with every other such
//! transaction across processes: `BEGIN IMMEDIATE` on SQLite, a transaction-wide advisory
//! lock on PostgreSQL ([`db::Conn::begin`] explains the choice).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audience::{Condition, Recipients};
use crate::error::{Error, Result, StoreError};
use crate::schedule::{Schedule, Timing};
use crate::state::{CampaignState, SendingStatus};

pub(crate) mod db;

use db::{values, Conn, Row};

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
    // 3: a campaign's send configuration given through the API (TOML text), and the sending
    // its `when` scheduled
    "ALTER TABLE campaigns ADD COLUMN send_spec TEXT;
    ALTER TABLE campaigns ADD COLUMN default_sending BIGINT;",
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
    /// Its send configuration as given through the API (`PUT /campaign/{id}/spec`, `broadside
    /// campaign import`): TOML text, validated when written. `None`: sent through the spec file
    /// `<campaign specs>/<id>.toml`, if any.
    pub send_spec: Option<String>,
    /// The sending its `when` scheduled (the campaign's default sending), if any.
    pub default_sending: Option<i64>,
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

/// A handle to the store: a SQLite file or a PostgreSQL database.
#[derive(Debug)]
pub struct Store {
    db: Conn,
    path: PathBuf,
    /// The location for messages: the path, or the URL without its password.
    location: String,
}

/// Whether a store location (`--db`, `--campaigns`) names a PostgreSQL database
/// (`postgres://…` or `postgresql://…`) rather than a SQLite file.
pub fn is_postgres_location(location: &Path) -> bool {
    location.to_str().is_some_and(db::is_postgres_url)
}

const SENDING_COLS: &str =
    "s.id, s.campaign_id, s.status, s.schedule, s.desired_at, s.prepare_at, \
     s.fail_at, s.recipients, s.prepared, s.recipient_count, s.error, s.created_at, s.updated_at";
const CAMPAIGN_COLS: &str = "id, workspace_id, name, domain, list_id, segments, state, send_at, \
     event_callback, created_at, updated_at, send_spec, default_sending";

impl Store {
    /// Opens (creating if needed) and migrates the store at `location`: a SQLite file, or a
    /// PostgreSQL database given as a `postgres://user:password@host:port/database` URL (the
    /// database must exist; its tables are created). TLS to PostgreSQL is not supported yet.
    pub fn open(location: &Path) -> Result<Store> {
        match location.to_str() {
            Some(url) if db::is_postgres_url(url) => Store::connect(url),
            _ => Store::open_sqlite(location),
        }
    }

    /// [`Store::open`] for a location given as text (a file path or a `postgres://` URL).
    pub fn connect(location: &str) -> Result<Store> {
        if !db::is_postgres_url(location) {
            return Store::open_sqlite(Path::new(location));
        }
        let redacted = db::redact_url(location);
        let pg = db::Pg::connect(location).map_err(|source| Error::Store {
            location: redacted.clone(),
            context: "connecting".into(),
            source,
        })?;
        let store = Store {
            db: Conn::Postgres(Box::new(pg)),
            path: PathBuf::from(location),
            location: redacted,
        };
        store.migrate()?;
        Ok(store)
    }

    fn open_sqlite(path: &Path) -> Result<Store> {
        let conn = rusqlite::Connection::open(path).map_err(|e| Error::Store {
            location: path.display().to_string(),
            context: "opening".into(),
            source: e.into(),
        })?;
        let store = Store {
            db: Conn::Sqlite(conn),
            path: path.to_path_buf(),
            location: path.display().to_string(),
        };
        store.setup_sqlite()?;
        store.migrate()?;
        Ok(store)
    }

    /// The location as given to [`Store::open`]: the store file, or the PostgreSQL URL
    /// (with its password: print [`Store::location`] instead).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The location for messages and logs: the file, or the URL without its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether this store is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self.db, Conn::Postgres(_))
    }

    pub(crate) fn db(&self) -> &Conn {
        &self.db
    }

    pub(crate) fn store_error(&self, context: String, source: StoreError) -> Error {
        Error::Store {
            location: self.location.clone(),
            context,
            source,
        }
    }

    fn err(&self, context: impl Into<String>) -> impl FnOnce(StoreError) -> Error + '_ {
        let context = context.into();
        move |source| self.store_error(context, source)
    }

    fn setup_sqlite(&self) -> Result<()> {
        let Conn::Sqlite(conn) = &self.db else {
            return Ok(());
        };
        let err = |context: &str| {
            let context = context.to_string();
            move |e: rusqlite::Error| self.store_error(context, e.into())
        };
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err("setting the busy timeout"))?;
        // WAL lets readers (the API) run beside one writer (the scheduler); FULL sync because
        // a status change is a promise about what was sent.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err("enabling WAL"))?;
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(err("setting pragmas"))?;
        Ok(())
    }

    /// Applies the migrations this store lacks, in one transaction; refuses a store whose
    /// schema is newer than this build.
    fn migrate(&self) -> Result<()> {
        self.tx(|| {
            if self.is_postgres() {
                // Inside the transaction's advisory lock: two processes starting on an empty
                // database do not both create it. (Without the notice "already exists,
                // skipping" at every open.)
                self.db
                    .batch(
                        "SET LOCAL client_min_messages = warning;
                        CREATE TABLE IF NOT EXISTS schema_version (
                            id INTEGER PRIMARY KEY CHECK (id = 1),
                            version BIGINT NOT NULL
                        )",
                    )
                    .map_err(self.err("creating the schema_version table"))?;
            }
            let version = self.schema_version()?;
            if version > MIGRATIONS.len() as i64 {
                return Err(Error::invalid(
                    "store",
                    format!(
                        "{} has schema version {version}, newer than this build knows ({}); upgrade broadside",
                        self.location,
                        MIGRATIONS.len()
                    ),
                ));
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                let context = format!("applying migration {}", i + 1);
                match &self.db {
                    Conn::Sqlite(_) => self.db.batch(m),
                    Conn::Postgres(_) => self.db.batch(&db::postgres_ddl(m)),
                }
                .map_err(self.err(context))?;
                self.set_schema_version(i as i64 + 1)?;
            }
            Ok(())
        })
    }

    fn set_schema_version(&self, version: i64) -> Result<()> {
        match &self.db {
            Conn::Sqlite(c) => c
                .pragma_update(None, "user_version", version)
                .map_err(StoreError::from),
            Conn::Postgres(_) => self
                .db
                .execute(
                    "INSERT INTO schema_version (id, version) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    values![version],
                )
                .map(drop),
        }
        .map_err(self.err("recording the schema version"))
    }

    /// The schema version applied.
    pub fn schema_version(&self) -> Result<i64> {
        let sql = match &self.db {
            Conn::Sqlite(_) => "PRAGMA user_version",
            Conn::Postgres(_) => "SELECT version FROM schema_version WHERE id = 1",
        };
        self.db
            .query_opt(sql, &[])
            .and_then(|r| r.map_or(Ok(0), |r| r.get(0)))
            .map_err(self.err("reading the schema version"))
    }

    /// Runs `f` in a transaction that serialises with the store's other transactions across
    /// processes (committed if it returns `Ok`); see [`db::Conn::begin`].
    fn tx<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.db
            .begin()
            .map_err(self.err("starting a transaction"))?;
        match f() {
            Ok(v) => {
                self.db.end(true).map_err(self.err("committing"))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.db.end(false);
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
            .db
            .query_one(
                "INSERT INTO campaigns (workspace_id, name, domain, list_id, segments, state, send_at, event_callback, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) RETURNING id",
                values![
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
            )
            .and_then(|r| r.get(0))
            .map_err(self.err("creating a campaign"))?;
        self.campaign(ws, id)
    }

    /// One campaign of a workspace.
    pub fn campaign(&self, ws: &str, id: i64) -> Result<Campaign> {
        self.db
            .query_opt(
                &format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE id = ?1 AND workspace_id = ?2 AND deleted_at IS NULL"),
                values![id, ws],
            )
            .and_then(|r| r.as_ref().map(campaign_row).transpose())
            .map_err(self.err(format!("reading campaign {id}")))?
            .ok_or(Error::NotFound { what: "campaign", id })
    }

    /// A campaign by id alone, deleted or not (the scheduler's view).
    pub fn campaign_by_id(&self, id: i64) -> Result<Campaign> {
        self.db
            .query_opt(
                &format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE id = ?1"),
                values![id],
            )
            .and_then(|r| r.as_ref().map(campaign_row).transpose())
            .map_err(self.err(format!("reading campaign {id}")))?
            .ok_or(Error::NotFound {
                what: "campaign",
                id,
            })
    }

    /// A workspace's campaigns, newest first.
    pub fn campaigns(&self, ws: &str) -> Result<Vec<Campaign>> {
        self.db
            .query(
                &format!("SELECT {CAMPAIGN_COLS} FROM campaigns WHERE workspace_id = ?1 AND deleted_at IS NULL ORDER BY id DESC"),
                values![ws],
            )
            .and_then(|rows| rows.iter().map(campaign_row).collect())
            .map_err(self.err("listing campaigns"))
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
        self.tx(|| {
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
            self.db
                .execute(
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
                    values![
                        id,
                        ws,
                        f.name.as_deref(),
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
                self.cancel_pending_sendings(id, now)?;
            }
            self.campaign(ws, id)
        })
    }

    /// Sets (or with `None` removes) a campaign's send configuration, already validated by the
    /// caller. Only while the campaign is DRAFT or SCHEDULED: a READY campaign was checked with
    /// the configuration it has (take it back to SCHEDULED to change it), and from SENDING on
    /// its configuration is history.
    pub fn set_send_spec(
        &self,
        ws: &str,
        id: i64,
        spec: Option<&str>,
        now: i64,
    ) -> Result<Campaign> {
        self.tx(|| {
            let cur = self.campaign(ws, id)?;
            if !matches!(cur.state, CampaignState::Draft | CampaignState::Scheduled) {
                return Err(Error::Transition {
                    entity: "campaign",
                    id,
                    from: cur.state.to_string(),
                    to: "(send configuration edited)".into(),
                    allowed: Vec::new(),
                });
            }
            self.db
                .execute(
                    "UPDATE campaigns SET send_spec = ?3, updated_at = ?4 WHERE id = ?1 AND workspace_id = ?2",
                    values![id, ws, spec, now],
                )
                .map_err(self.err(format!("setting campaign {id}'s send configuration")))?;
            self.campaign(ws, id)
        })
    }

    /// Records the sending a campaign's `when` scheduled (`None`: none any more).
    pub fn set_default_sending(&self, ws: &str, id: i64, sending: Option<i64>) -> Result<()> {
        self.db
            .execute(
                "UPDATE campaigns SET default_sending = ?3 WHERE id = ?1 AND workspace_id = ?2",
                values![id, ws, sending],
            )
            .map_err(self.err(format!("recording campaign {id}'s default sending")))?;
        Ok(())
    }

    /// Deletes a campaign (kept for history, hidden from the API) and cancels its pending
    /// sendings; refused while it is SENDING.
    pub fn delete_campaign(&self, ws: &str, id: i64, now: i64) -> Result<Campaign> {
        self.tx(|| {
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
            self.db
                .execute(
                    "UPDATE campaigns SET deleted_at = ?2, updated_at = ?2 WHERE id = ?1",
                    values![id, now],
                )
                .map_err(self.err(format!("deleting campaign {id}")))?;
            self.cancel_pending_sendings(id, now)?;
            Ok(cur)
        })
    }

    fn cancel_pending_sendings(&self, campaign_id: i64, now: i64) -> Result<()> {
        self.db
            .execute(
                "UPDATE sendings SET status = 'cancelled', updated_at = ?2
                 WHERE campaign_id = ?1 AND status IN ('draft', 'scheduled')",
                values![campaign_id, now],
            )
            .map_err(self.err(format!("cancelling the sendings of campaign {campaign_id}")))?;
        Ok(())
    }

    /// Moves a campaign along as its sendings progress: READY → SENDING when one starts,
    /// SENDING → DONE / ERROR when none is scheduled or executing any more.
    pub fn sync_campaign_state(&self, campaign_id: i64, now: i64) -> Result<Option<CampaignState>> {
        self.tx(|| {
            let state: String = self
                .db
                .query_one("SELECT state FROM campaigns WHERE id = ?1", values![campaign_id])
                .and_then(|r| r.get(0))
                .map_err(self.err(format!("reading campaign {campaign_id}")))?;
            let state: CampaignState = state.parse()?;
            let count = |statuses: &str| -> Result<i64> {
                self.db
                    .query_one(
                        &format!("SELECT COUNT(*) FROM sendings WHERE campaign_id = ?1 AND status IN ({statuses})"),
                        values![campaign_id],
                    )
                    .and_then(|r| r.get(0))
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
                self.db
                    .execute(
                        "UPDATE campaigns SET state = ?2, updated_at = ?3 WHERE id = ?1",
                        values![campaign_id, n.as_str(), now],
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
        self.db
            .query_one(
                "INSERT INTO audiences (workspace_id, name, conditions, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                values![ws, name, json, now],
            )
            .and_then(|r| r.get(0))
            .map_err(self.err("creating an audience"))
    }

    /// A stored audience's conditions.
    pub fn audience(&self, ws: &str, id: i64) -> Result<Vec<Condition>> {
        let json: String = self
            .db
            .query_opt(
                "SELECT conditions FROM audiences WHERE id = ?1 AND workspace_id = ?2",
                values![id, ws],
            )
            .and_then(|r| r.map(|r| r.get(0)).transpose())
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
        self.tx(|| {
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
            let id: i64 = self
                .db
                .query_one(
                    "INSERT INTO sendings (campaign_id, status, schedule, desired_at, prepare_at, fail_at, recipients, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) RETURNING id",
                    values![
                        campaign_id,
                        status.as_str(),
                        serde_json::to_string(schedule).expect("schedule serialises"),
                        timing.map(|t| t.desired_at),
                        timing.map(|t| t.prepare_at),
                        timing.map(|t| t.fail_at),
                        serde_json::to_string(recipients).expect("recipients serialise"),
                        now
                    ],
                )
                .and_then(|r| r.get(0))
                .map_err(self.err(format!("adding a sending to campaign {campaign_id}")))?;
            self.sending(ws, id)
        })
    }

    /// One sending of a workspace.
    pub fn sending(&self, ws: &str, id: i64) -> Result<Sending> {
        self.db
            .query_opt(
                &format!("SELECT {SENDING_COLS} FROM sendings s JOIN campaigns c ON c.id = s.campaign_id WHERE s.id = ?1 AND c.workspace_id = ?2"),
                values![id, ws],
            )
            .and_then(|r| r.as_ref().map(sending_row).transpose())
            .map_err(self.err(format!("reading sending {id}")))?
            .ok_or(Error::NotFound { what: "sending", id })
    }

    /// A sending by id alone (the scheduler's view).
    pub fn sending_by_id(&self, id: i64) -> Result<Sending> {
        self.db
            .query_opt(
                &format!("SELECT {SENDING_COLS} FROM sendings s WHERE s.id = ?1"),
                values![id],
            )
            .and_then(|r| r.as_ref().map(sending_row).transpose())
            .map_err(self.err(format!("reading sending {id}")))?
            .ok_or(Error::NotFound {
                what: "sending",
                id,
            })
    }

    /// A campaign's sendings, oldest first.
    pub fn sendings(&self, ws: &str, campaign_id: i64) -> Result<Vec<Sending>> {
        self.campaign(ws, campaign_id)?;
        self.db
            .query(
                &format!(
                    "SELECT {SENDING_COLS} FROM sendings s WHERE s.campaign_id = ?1 ORDER BY s.id"
                ),
                values![campaign_id],
            )
            .and_then(|rows| rows.iter().map(sending_row).collect())
            .map_err(self.err("listing sendings"))
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
        self.tx(|| {
            let cur = self.sending(ws, id)?;
            let to = if timing.is_some() {
                SendingStatus::Scheduled
            } else {
                SendingStatus::Draft
            };
            if !cur.status.reschedulable() {
                cur.status.transition(id, to)?;
            }
            self.db
                .execute(
                    "UPDATE sendings SET status = ?2, schedule = ?3, desired_at = ?4, prepare_at = ?5, fail_at = ?6, updated_at = ?7
                     WHERE id = ?1 AND status IN ('draft', 'scheduled')",
                    values![
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
        self.tx(|| {
            let cur = self.sending(ws, id)?;
            cur.status.transition(id, SendingStatus::Cancelled)?;
            // Still conditional: on PostgreSQL a single-statement change (`fail_overdue`,
            // `advance`) may commit between the read above and this write.
            self.db
                .execute(
                    "UPDATE sendings SET status = 'cancelled', updated_at = ?2
                     WHERE id = ?1 AND status IN ('draft', 'scheduled')",
                    values![id, now],
                )
                .map_err(self.err(format!("cancelling sending {id}")))?;
            self.sending(ws, id)
        })
    }

    // ---- scheduler ----

    /// Sendings whose preparation time has come, of READY or SENDING campaigns, oldest due
    /// first; includes ones left preparing / prepared / transmitting by a stopped process.
    pub fn due_sendings(&self, now: i64, limit: usize) -> Result<Vec<Sending>> {
        self.db
            .query(
                &format!(
                    "SELECT {SENDING_COLS} FROM sendings s JOIN campaigns c ON c.id = s.campaign_id
                     WHERE s.status IN ('scheduled', 'preparing', 'prepared', 'transmitting')
                       AND s.prepare_at <= ?1 AND c.state IN ('READY', 'SENDING')
                     ORDER BY s.prepare_at, s.id LIMIT ?2"
                ),
                values![now, limit as i64],
            )
            .and_then(|rows| rows.iter().map(sending_row).collect())
            .map_err(self.err("finding due sendings"))
    }

    /// Fails sendings past their window that no live lease holds; returns their ids.
    pub fn fail_overdue(&self, now: i64) -> Result<Vec<(i64, i64)>> {
        // In a store transaction so that on PostgreSQL, too, it does not interleave with a
        // transaction that reads a sending and then changes it.
        self.tx(|| {
            self.db
                .query(
                    "UPDATE sendings SET status = 'failed', updated_at = ?1,
                        error = 'not finished within the window after the desired time'
                     WHERE status IN ('scheduled', 'preparing', 'prepared', 'transmitting') AND fail_at < ?1
                       AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.sending_id = sendings.id AND l.expires_at > ?1)
                     RETURNING id, campaign_id",
                    values![now],
                )
                .and_then(|rows| rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect())
                .map_err(self.err("failing overdue sendings"))
        })
    }

    /// Takes (or renews) the lease on a sending until `now + ttl`; false when another holder
    /// has a lease that has not expired. One statement, so it is atomic across processes (on
    /// PostgreSQL the conflicting row is locked and its `WHERE` checked against the latest
    /// version, so of two racing holders only one changes the row).
    pub fn try_lease(&self, sending_id: i64, holder: &str, now: i64, ttl: i64) -> Result<bool> {
        let n = self
            .db
            .execute(
                "INSERT INTO leases (sending_id, holder, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sending_id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.expires_at <= ?4 OR leases.holder = excluded.holder",
                values![sending_id, holder, now + ttl, now],
            )
            .map_err(self.err(format!("leasing sending {sending_id}")))?;
        Ok(n == 1)
    }

    /// Gives a lease back (only if `holder` still has it).
    pub fn release_lease(&self, sending_id: i64, holder: &str) -> Result<()> {
        self.db
            .execute(
                "DELETE FROM leases WHERE sending_id = ?1 AND holder = ?2",
                values![sending_id, holder],
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
            .db
            .execute(
                "UPDATE sendings SET status = ?3, updated_at = ?4,
                    prepared = COALESCE(?5, prepared),
                    recipient_count = COALESCE(?6, recipient_count),
                    error = COALESCE(?7, error)
                 WHERE id = ?1 AND status = ?2
                   AND EXISTS (SELECT 1 FROM leases l WHERE l.sending_id = ?1 AND l.holder = ?8 AND l.expires_at > ?4)",
                values![
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
        self.tx(|| {
            let campaign_id: Option<i64> = self
                .db
                .query_opt(
                    "SELECT s.campaign_id FROM sendings s JOIN campaigns c ON c.id = s.campaign_id
                     WHERE s.id = ?1 AND s.status = 'scheduled' AND c.state IN ('READY', 'SENDING')
                       AND c.deleted_at IS NULL",
                    values![id],
                )
                .and_then(|r| r.map(|r| r.get(0)).transpose())
                .map_err(self.err(format!("reading sending {id}")))?;
            let Some(campaign_id) = campaign_id else {
                return Ok(false);
            };
            let none = StatusPatch::default();
            if !self.advance(id, holder, SendingStatus::Scheduled, SendingStatus::Preparing, now, &none)? {
                return Ok(false);
            }
            self.db
                .execute(
                    "UPDATE campaigns SET state = 'SENDING', updated_at = ?2 WHERE id = ?1 AND state = 'READY'",
                    values![campaign_id, now],
                )
                .map_err(self.err(format!("updating campaign {campaign_id}")))?;
            Ok(true)
        })
    }

    /// Records the start of an execution step; returns the run id.
    pub fn start_run(&self, sending_id: i64, step: &str, holder: &str, now: i64) -> Result<i64> {
        self.db
            .query_one(
                "INSERT INTO runs (sending_id, step, holder, started_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                values![sending_id, step, holder, now],
            )
            .and_then(|r| r.get(0))
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
        self.db
            .execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3, detail = ?4 WHERE id = ?1",
                values![run_id, now, outcome, detail],
            )
            .map_err(self.err(format!("recording the end of run {run_id}")))?;
        Ok(())
    }

    // ---- event relay ----

    /// Records (or updates) which sending a send run belongs to and where its events are
    /// stored; the executor calls it before the run writes anything.
    pub fn record_sending_run(&self, run: &SendingRun, now: i64) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO sending_runs (run_id, sending_id, workspace_id, campaign_key, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (run_id) DO UPDATE SET sending_id = excluded.sending_id,
                    workspace_id = excluded.workspace_id, campaign_key = excluded.campaign_key,
                    recorded_at = excluded.recorded_at",
                values![
                    &run.run_id,
                    run.sending_id,
                    &run.workspace_id,
                    &run.campaign_key,
                    now
                ],
            )
            .map_err(self.err(format!("recording run {} of sending {}", run.run_id, run.sending_id)))?;
        Ok(())
    }

    /// The send runs recorded for a sending, oldest first.
    pub fn sending_runs(&self, sending_id: i64) -> Result<Vec<SendingRun>> {
        self.db
            .query(
                "SELECT run_id, sending_id, workspace_id, campaign_key FROM sending_runs
                 WHERE sending_id = ?1 ORDER BY recorded_at, run_id",
                values![sending_id],
            )
            .and_then(|rows| {
                rows.iter()
                    .map(|r| {
                        Ok(SendingRun {
                            run_id: r.get(0)?,
                            sending_id: r.get(1)?,
                            workspace_id: r.get(2)?,
                            campaign_key: r.get(3)?,
                        })
                    })
                    .collect()
            })
            .map_err(self.err(format!("listing the runs of sending {sending_id}")))
    }

    /// The sending run with this id, its campaign and the campaign's callback (`None` for a
    /// deleted campaign); `None` when no sending recorded the run.
    pub fn run_callback(&self, run_id: &str) -> Result<Option<RunCallback>> {
        self.db
            .query_opt(
                "SELECT r.run_id, r.sending_id, r.workspace_id, r.campaign_key, c.id,
                        CASE WHEN c.deleted_at IS NULL THEN c.event_callback END
                 FROM sending_runs r JOIN sendings s ON s.id = r.sending_id
                 JOIN campaigns c ON c.id = s.campaign_id WHERE r.run_id = ?1",
                values![run_id],
            )
            .and_then(|r| {
                r.map(|r| {
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
                })
                .transpose()
            })
            .map_err(self.err(format!("looking up run {run_id}")))
    }

    /// Whether the relay already relayed this event file (path relative to the event root).
    pub fn is_relayed(&self, path: &str) -> Result<bool> {
        self.db
            .query_opt(
                "SELECT 1 FROM relayed_event_files WHERE path = ?1",
                values![path],
            )
            .map(|r| r.is_some())
            .map_err(self.err(format!("reading relay progress of {path}")))
    }

    /// Records event files as relayed (path, events queued), in one transaction.
    pub fn mark_relayed(&self, files: &[(String, u64)], now: i64) -> Result<()> {
        self.tx(|| {
            for (path, events) in files {
                self.db
                    .execute(
                        "INSERT INTO relayed_event_files (path, events, relayed_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (path) DO NOTHING",
                        values![path, *events as i64, now],
                    )
                    .map_err(self.err(format!("recording relay progress of {path}")))?;
            }
            Ok(())
        })
    }

    /// How many event files were relayed.
    pub fn relayed_files(&self) -> Result<u64> {
        self.db
            .query_one("SELECT COUNT(*) FROM relayed_event_files", &[])
            .and_then(|r| r.get::<i64>(0))
            .map(|n| n as u64)
            .map_err(self.err("counting relayed event files"))
    }

    /// A sending's run history, oldest first.
    pub fn runs(&self, sending_id: i64) -> Result<Vec<RunRecord>> {
        self.db
            .query(
                "SELECT id, sending_id, step, holder, started_at, finished_at, outcome, detail
                 FROM runs WHERE sending_id = ?1 ORDER BY id",
                values![sending_id],
            )
            .and_then(|rows| {
                rows.iter()
                    .map(|r| {
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
                    .collect()
            })
            .map_err(self.err("reading run history"))
    }
}

fn bad_column(column: usize, e: impl std::fmt::Display) -> StoreError {
    StoreError::Column {
        column,
        message: e.to_string(),
    }
}

fn campaign_row(r: &Row) -> std::result::Result<Campaign, StoreError> {
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
        send_spec: r.get(11)?,
        default_sending: r.get(12)?,
    })
}

fn sending_row(r: &Row) -> std::result::Result<Sending, StoreError> {
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
    use crate::testing::{on_both_backends, TestStore};

    fn fields(name: &str) -> CampaignFields {
        CampaignFields {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    const NOW: Schedule = Schedule {
        when: When::Immediate,
        prescheduled: false,
    };

    /// A campaign in `state` with one sending scheduled now (at `t`).
    fn campaign_with_sending(s: &Store, state: CampaignState, t: i64) -> (Campaign, Sending) {
        let c = s
            .create_campaign(
                "ws",
                &CampaignFields {
                    state: Some(state),
                    ..fields("x")
                },
                t,
            )
            .unwrap();
        let timing = NOW
            .resolve(t, &ScheduleConfig::default(), "schedule")
            .unwrap();
        let sd = s
            .create_sending("ws", c.id, &NOW, timing, &Recipients::default(), t)
            .unwrap();
        (c, sd)
    }

    on_both_backends!(
        migrates_once_and_reopens,
        campaigns_are_scoped_to_their_workspace,
        cancelling_a_campaign_cancels_its_pending_sendings_only,
        a_recorded_run_maps_to_its_campaign_callback_and_relay_progress_is_kept,
        campaign_fields_and_states_change_only_as_the_state_machine_allows,
        sendings_are_rescheduled_cancelled_and_found_due,
        overdue_sendings_fail_unless_a_live_lease_holds_them,
        only_one_of_two_handles_holds_a_lease_until_it_expires,
        execution_begins_once_across_two_handles,
        run_history_and_templates_are_kept,
    );

    fn migrates_once_and_reopens(ts: &TestStore) {
        let s = ts.open();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let c = s.create_campaign("ws", &fields("spring"), 100).unwrap();
        drop(s);
        let s = ts.open();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(s.campaign("ws", c.id).unwrap().name, "spring");
        let next = s.create_campaign("ws", &fields("summer"), 101).unwrap();
        assert!(next.id > c.id, "ids keep counting after a reopen");
        if let Conn::Sqlite(conn) = &s.db {
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        s.set_schema_version(99).unwrap();
        drop(s);
        let e = Store::open(ts.path()).unwrap_err().to_string();
        assert!(
            e.contains("schema version 99, newer than this build knows"),
            "{e}"
        );
    }

    fn campaigns_are_scoped_to_their_workspace(ts: &TestStore) {
        let s = ts.open();
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

    fn cancelling_a_campaign_cancels_its_pending_sendings_only(ts: &TestStore) {
        let s = ts.open();
        let c = s.create_campaign("a", &fields("x"), 1).unwrap();
        let t = NOW
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
            .create_sending("a", c.id, &NOW, t, &Recipients::default(), 10)
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
        let e = s.reschedule_sending("a", due.id, &NOW, t, 30).unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
    }

    fn a_recorded_run_maps_to_its_campaign_callback_and_relay_progress_is_kept(ts: &TestStore) {
        let s = ts.open();
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
        let s = ts.open();
        assert!(s
            .is_relayed("workspace_id=demo/date=2026-01-01/f.parquet")
            .unwrap());
        assert_eq!(s.relayed_files().unwrap(), 1);
    }

    fn campaign_fields_and_states_change_only_as_the_state_machine_allows(ts: &TestStore) {
        let s = ts.open();
        let c = s
            .create_campaign(
                "ws",
                &CampaignFields {
                    domain: Some(Some(3)),
                    list: Some(Some(7)),
                    segments: Some(vec![1, 2]),
                    when: Some(Some(500)),
                    ..fields("spring")
                },
                10,
            )
            .unwrap();
        assert_eq!(
            (c.state, c.domain, c.list, c.segments.clone(), c.when),
            (
                CampaignState::Draft,
                Some(3),
                Some(7),
                vec![1, 2],
                Some(500)
            )
        );
        let e = s
            .create_campaign(
                "ws",
                &CampaignFields {
                    state: Some(CampaignState::Done),
                    ..fields("late")
                },
                10,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");

        // `None` leaves a field alone, `Some(None)` clears it.
        let edit = CampaignFields {
            name: Some("spring sale".into()),
            domain: Some(None),
            state: Some(CampaignState::Scheduled),
            ..Default::default()
        };
        let u = s.update_campaign("ws", c.id, &edit, 20).unwrap();
        assert_eq!(
            (
                u.name.as_str(),
                u.domain,
                u.list,
                u.when,
                u.state,
                u.updated_at
            ),
            (
                "spring sale",
                None,
                Some(7),
                Some(500),
                CampaignState::Scheduled,
                20
            )
        );
        let to = |state| CampaignFields {
            state: Some(state),
            ..Default::default()
        };
        let e = s
            .update_campaign("ws", c.id, &to(CampaignState::Done), 21)
            .unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
        assert_eq!(
            s.campaign("ws", c.id).unwrap().state,
            CampaignState::Scheduled,
            "a refused change changes nothing"
        );
        let e = s.update_campaign("ws", c.id, &fields(" "), 21).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");

        // A SENDING campaign cannot be deleted; a READY one can, and is hidden afterwards.
        let (sending, sd) = campaign_with_sending(&s, CampaignState::Ready, 30);
        assert!(s.try_lease(sd.id, "p", 30, 60).unwrap());
        assert!(s.begin_execution(sd.id, "p", 30).unwrap());
        let e = s.delete_campaign("ws", sending.id, 31).unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
        s.update_campaign("ws", c.id, &to(CampaignState::Ready), 32)
            .unwrap();
        s.delete_campaign("ws", c.id, 33).unwrap();
        assert!(matches!(
            s.campaign("ws", c.id),
            Err(Error::NotFound { .. })
        ));
        assert_eq!(s.campaign_by_id(c.id).unwrap().id, c.id);
        let listed: Vec<i64> = s.campaigns("ws").unwrap().iter().map(|c| c.id).collect();
        assert_eq!(listed, vec![sending.id]);
    }

    fn sendings_are_rescheduled_cancelled_and_found_due(ts: &TestStore) {
        let s = ts.open();
        let c = s
            .create_campaign(
                "ws",
                &CampaignFields {
                    state: Some(CampaignState::Ready),
                    ..fields("x")
                },
                1,
            )
            .unwrap();
        let cfg = ScheduleConfig::default();
        let draft = s
            .create_sending(
                "ws",
                c.id,
                &Schedule::DRAFT,
                None,
                &Recipients::default(),
                1,
            )
            .unwrap();
        assert_eq!((draft.status, draft.timing), (SendingStatus::Draft, None));
        assert!(s.due_sendings(i64::MAX / 2, 10).unwrap().is_empty());

        let later = Schedule {
            when: When::Absolute { at: 1000 },
            prescheduled: false,
        };
        let t = later.resolve(1, &cfg, "schedule").unwrap().unwrap();
        let r = s
            .reschedule_sending("ws", draft.id, &later, Some(t), 2)
            .unwrap();
        assert_eq!(
            (r.status, r.timing, r.schedule),
            (SendingStatus::Scheduled, Some(t), later)
        );
        let soon = NOW.resolve(5, &cfg, "schedule").unwrap();
        let other = s
            .create_sending("ws", c.id, &NOW, soon, &Recipients::default(), 5)
            .unwrap();
        let due: Vec<i64> = s
            .due_sendings(t.prepare_at, 10)
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(due, vec![other.id, draft.id], "oldest due first");
        assert_eq!(s.due_sendings(t.prepare_at - 1, 10).unwrap().len(), 1);
        assert_eq!(s.due_sendings(t.prepare_at, 1).unwrap().len(), 1, "limit");

        let x = s.cancel_sending("ws", other.id, 6).unwrap();
        assert_eq!(x.status, SendingStatus::Cancelled);
        let e = s.cancel_sending("ws", other.id, 7).unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
        let e = s
            .reschedule_sending("ws", other.id, &NOW, soon, 7)
            .unwrap_err();
        assert!(matches!(e, Error::Transition { .. }), "{e}");
        let due: Vec<i64> = s
            .due_sendings(t.prepare_at, 10)
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(due, vec![draft.id]);
        // A campaign that is not READY or SENDING has nothing due.
        let back = CampaignFields {
            state: Some(CampaignState::Scheduled),
            ..Default::default()
        };
        s.update_campaign("ws", c.id, &back, 8).unwrap();
        assert!(s.due_sendings(t.prepare_at, 10).unwrap().is_empty());
        assert!(matches!(
            s.sending("other-ws", draft.id),
            Err(Error::NotFound { .. })
        ));
        assert_eq!(s.sendings("ws", c.id).unwrap().len(), 2);
    }

    fn overdue_sendings_fail_unless_a_live_lease_holds_them(ts: &TestStore) {
        let s = ts.open();
        let (c, a) = campaign_with_sending(&s, CampaignState::Ready, 100);
        let b = s
            .create_sending("ws", c.id, &NOW, a.timing, &Recipients::default(), 100)
            .unwrap();
        let fail_at = a.timing.unwrap().fail_at;
        assert!(s.fail_overdue(fail_at).unwrap().is_empty(), "not before");
        assert!(s.try_lease(a.id, "p", fail_at, 60).unwrap());
        assert_eq!(s.fail_overdue(fail_at + 1).unwrap(), vec![(b.id, c.id)]);
        let b = s.sending_by_id(b.id).unwrap();
        assert_eq!(b.status, SendingStatus::Failed);
        assert!(b.error.unwrap().contains("window"));
        assert_eq!(
            s.sending_by_id(a.id).unwrap().status,
            SendingStatus::Scheduled,
            "leased: left alone"
        );
        assert_eq!(
            s.fail_overdue(fail_at + 60).unwrap(),
            vec![(a.id, c.id)],
            "once the lease expired"
        );
        assert!(s.fail_overdue(fail_at + 61).unwrap().is_empty());
        assert_eq!(
            s.sync_campaign_state(c.id, fail_at + 61).unwrap(),
            Some(CampaignState::Error),
            "a campaign whose sendings all failed ends in ERROR"
        );
    }

    fn only_one_of_two_handles_holds_a_lease_until_it_expires(ts: &TestStore) {
        let (one, two) = (ts.open(), ts.open());
        let (_, sd) = campaign_with_sending(&one, CampaignState::Ready, 100);
        assert!(one.try_lease(sd.id, "one", 100, 60).unwrap());
        assert!(!two.try_lease(sd.id, "two", 101, 60).unwrap());
        assert!(one.try_lease(sd.id, "one", 150, 60).unwrap(), "renewed");
        assert!(
            !two.try_lease(sd.id, "two", 200, 60).unwrap(),
            "renewal holds"
        );
        two.release_lease(sd.id, "two").unwrap();
        assert!(
            !two.try_lease(sd.id, "two", 209, 60).unwrap(),
            "not released by another holder"
        );
        assert!(
            two.try_lease(sd.id, "two", 210, 60).unwrap(),
            "expired: taken over"
        );
        assert!(!one.try_lease(sd.id, "one", 211, 60).unwrap());
        let none = StatusPatch::default();
        assert!(
            !one.advance(
                sd.id,
                "one",
                SendingStatus::Scheduled,
                SendingStatus::Preparing,
                211,
                &none
            )
            .unwrap(),
            "a lost lease moves nothing"
        );
        two.release_lease(sd.id, "two").unwrap();
        assert!(one.try_lease(sd.id, "one", 212, 60).unwrap(), "released");

        // Racing: many holders on their own handles, one lease each round.
        let rounds = 20;
        let holders = 4;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(holders));
        let winners: Vec<Vec<i64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..holders)
                .map(|h| {
                    let barrier = barrier.clone();
                    scope.spawn(move || {
                        let s = ts.open();
                        let mut won = Vec::new();
                        for round in 0..rounds {
                            barrier.wait();
                            // each round starts after the last lease (ttl 10) expired
                            let now = 1_000 + 10 * round;
                            if s.try_lease(sd.id, &format!("h{h}"), now, 10).unwrap() {
                                won.push(round);
                            }
                        }
                        won
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<i64> = winners.concat();
        all.sort();
        assert_eq!(
            all,
            (0..rounds).collect::<Vec<_>>(),
            "exactly one winner per round"
        );
    }

    fn execution_begins_once_across_two_handles(ts: &TestStore) {
        let (one, two) = (ts.open(), ts.open());
        let (c, sd) = campaign_with_sending(&one, CampaignState::Ready, 100);
        assert!(!two.begin_execution(sd.id, "two", 100).unwrap(), "no lease");
        // The same holder name on both handles has a live lease on both: the status
        // compare-and-set alone must let only one begin.
        assert!(one.try_lease(sd.id, "proc", 100, 60).unwrap());
        // Each thread has a handle of its own (a store is used by one thread at a time).
        let barrier = std::sync::Barrier::new(2);
        let started: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let s = ts.open();
                        barrier.wait();
                        s.begin_execution(sd.id, "proc", 101).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(started.iter().filter(|b| **b).count(), 1, "{started:?}");
        assert!(!one.begin_execution(sd.id, "proc", 102).unwrap());
        assert_eq!(
            two.sending_by_id(sd.id).unwrap().status,
            SendingStatus::Preparing
        );
        assert_eq!(
            two.campaign("ws", c.id).unwrap().state,
            CampaignState::Sending
        );
        let patch = StatusPatch {
            prepared: Some("handle"),
            recipient_count: Some(0),
            error: None,
        };
        assert!(two
            .advance(
                sd.id,
                "proc",
                SendingStatus::Preparing,
                SendingStatus::Skipped,
                103,
                &patch
            )
            .unwrap());
        let s = one.sending_by_id(sd.id).unwrap();
        assert_eq!(
            (s.status, s.prepared.as_deref(), s.recipient_count),
            (SendingStatus::Skipped, Some("handle"), Some(0))
        );
        assert_eq!(
            one.sync_campaign_state(c.id, 104).unwrap(),
            Some(CampaignState::Done)
        );
    }

    fn run_history_and_templates_are_kept(ts: &TestStore) {
        let s = ts.open();
        let (_, sd) = campaign_with_sending(&s, CampaignState::Ready, 100);
        let a = s.start_run(sd.id, "prepare", "p", 101).unwrap();
        s.finish_run(a, 102, "ok", Some("3 recipients")).unwrap();
        let b = s.start_run(sd.id, "transmit", "q", 103).unwrap();
        let runs = s.runs(sd.id).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[0],
            RunRecord {
                id: a,
                sending_id: sd.id,
                step: "prepare".into(),
                holder: "p".into(),
                started_at: 101,
                finished_at: Some(102),
                outcome: Some("ok".into()),
                detail: Some("3 recipients".into()),
            }
        );
        assert_eq!((runs[1].id, runs[1].finished_at), (b, None));

        assert_eq!(s.save_template("ws", "t", "v1", "h1", 1).unwrap(), None);
        s.mark_template_synced("ws", "t", "h1", 2).unwrap();
        assert_eq!(
            s.save_template("ws", "t", "v2", "h2", 3)
                .unwrap()
                .as_deref(),
            Some("h1")
        );
        assert_eq!(s.save_template("other", "t", "v1", "h1", 4).unwrap(), None);
    }

    #[test]
    fn placeholders_and_passwords_are_rewritten() {
        assert_eq!(
            db::postgres_sql(
                "SELECT '?1', \"a?2\" FROM t WHERE a = ?1 AND b IN (?12, ?3) AND c = '?'"
            ),
            "SELECT '?1', \"a?2\" FROM t WHERE a = $1 AND b IN ($12, $3) AND c = '?'"
        );
        assert_eq!(
            db::postgres_ddl("id INTEGER PRIMARY KEY, s BIGINT PRIMARY KEY"),
            "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, s BIGINT PRIMARY KEY"
        );
        assert_eq!(
            db::redact_url("postgres://broadside:S3cr%40t@db.example:5432/broadside?sslmode=disable&password=x"),
            "postgres://broadside@db.example:5432/broadside?sslmode=disable"
        );
        assert_eq!(
            db::redact_url("postgresql://h/db?password=x"),
            "postgresql://h/db"
        );
        assert!(is_postgres_location(Path::new("POSTGRES://h/db")));
        assert!(is_postgres_location(Path::new("postgresql://h/db")));
        assert!(!is_postgres_location(Path::new("campaigns.db")));
        assert!(!is_postgres_location(Path::new("./postgres/c.db")));
    }

    #[test]
    fn an_unreachable_server_is_named_without_its_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // nothing listens on the port once the listener above is dropped
        let url = format!("postgres://broadside:Secret-Pw@127.0.0.1:{port}/broadside");
        let e = Store::open(Path::new(&url)).unwrap_err().to_string();
        assert!(!e.contains("Secret-Pw"), "{e}");
        assert!(
            e.starts_with(&format!(
                "campaign store postgres://broadside@127.0.0.1:{port}/broadside: connecting: error connecting to server"
            )),
            "{e}"
        );
        let e = Store::connect("postgres://u:pw@127.0.0.1:1/db?sslmode=require")
            .unwrap_err()
            .to_string();
        assert!(e.contains("TLS to PostgreSQL is not supported yet"), "{e}");
        assert!(!e.contains(":pw@"), "{e}");
    }

    #[test]
    fn postgres_refuses_a_wrong_password_and_names_the_store() {
        let ts = TestStore::postgres();
        let server = ts.pg_server().unwrap();
        let Some(port) = server.own_port() else {
            eprintln!("BROADSIDE_PG_URL server: its authentication is not ours to set up");
            return;
        };
        let (role, password) = crate::testing::PASSWORD_ROLE;
        let db = database_name(&ts);
        let url = |pw: &str| format!("postgres://{role}:{pw}@127.0.0.1:{port}/{db}");
        let e = Store::open(Path::new(&url("Wrong-Guess")))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("Wrong-Guess"), "{e}");
        assert!(
            e.starts_with(&format!(
                "campaign store postgres://{role}@127.0.0.1:{port}/{db}: connecting: "
            )),
            "{e}"
        );
        assert!(e.contains("password authentication failed"), "{e}");
        // The right password gets in (as the database's owner, who may create the tables in
        // `public` from PostgreSQL 15 on).
        server
            .admin()
            .batch_execute(&format!("ALTER DATABASE {db} OWNER TO {role}"))
            .unwrap();
        let s = Store::open(Path::new(&url(password))).unwrap();
        assert_eq!(
            s.location(),
            format!("postgres://{role}@127.0.0.1:{port}/{db}")
        );
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    /// The database name of a PostgreSQL test store's URL.
    fn database_name(ts: &TestStore) -> String {
        let url = ts.path().to_str().unwrap();
        let last = url.rsplit('/').next().unwrap();
        last.split('?').next().unwrap().to_string()
    }

    #[test]
    fn postgres_stores_opened_at_once_on_an_empty_database_migrate_once() {
        let ts = TestStore::postgres();
        let versions: Vec<i64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| ts.open().schema_version().unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(versions, vec![MIGRATIONS.len() as i64; 4]);
        let s = ts.open();
        assert!(s.is_postgres());
        let rows =
            s.db.query("SELECT version FROM schema_version", &[])
                .unwrap();
        assert_eq!(rows.len(), 1, "one row");
    }

    #[test]
    fn postgres_reconnects_after_the_server_closed_the_connection() {
        let ts = TestStore::postgres();
        let s = ts.open();
        let c = s.create_campaign("ws", &fields("x"), 1).unwrap();
        let db = database_name(&ts);
        let ended = ts
            .pg_server()
            .unwrap()
            .admin()
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .unwrap();
        assert_eq!(ended.len(), 1, "the store's one connection");
        // The first call may see the closed connection; the next one connects again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match s.campaign("ws", c.id) {
                Ok(back) => {
                    assert_eq!(back.name, "x");
                    break;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(!e.contains("password"), "{e}");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "never reconnected: {e}"
                    );
                }
            }
        }
    }
}
