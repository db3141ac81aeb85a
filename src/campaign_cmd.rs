//! `broadside campaign …` (ops twins of the campaign API) and the campaign parts of
//! `broadside serve`: the `/campaign` routes and the scheduler, wired to the send pipeline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use broadside_campaigns::api::{
    campaign_json, campaign_router, check_audience, check_ready, create_with_default_sending,
    schedule_draft, sending_detail, sending_json, sending_schedule, system_clock, Access,
    CampaignApiConfig, ReadyCheck, TokenGrant,
};
use broadside_campaigns::audience::{Audience, Condition, FieldMap, Recipients};
use broadside_campaigns::schedule::{parse_instant_text, ScheduleConfig};
use broadside_campaigns::scheduler::{Executor, Prepared, Scheduler, SchedulerConfig, StepError};
use broadside_campaigns::send_config::SendConfigs;
use broadside_campaigns::state::CampaignState;
use broadside_campaigns::store::{Campaign, CampaignFields, Sending, SendingRun, Store};
use broadside_campaigns::templates::{Template, TemplateSync};
use serde_json::{json, Value};

use arrow_array::{Array, StringArray, TimestampMicrosecondArray};
use broadside_campaigns::callbacks::{
    Address, CallbackConfig, CallbackEvent, CallbackQueue, LifecycleEvent,
};
use broadside_campaigns::relay::{EventRelay, RelayConfig};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

mod inline;

fn callback_clock() -> broadside_campaigns::callbacks::Clock {
    std::sync::Arc::new(|| chrono::Utc::now().timestamp())
}

/// `broadside serve` options for the campaign service.
#[derive(clap::Args, Debug, Clone)]
pub struct CampaignServeOptions {
    /// Campaign store: a SQLite file (created if missing), or a PostgreSQL database that
    /// several hosts share, `postgres://USER:PASSWORD@HOST:5432/DATABASE` (no TLS yet:
    /// `sslmode=disable`); serves `/campaign` routes. Needs --tokens unless listening on a
    /// loopback address.
    #[arg(long, value_name = "FILE.db|URL")]
    pub campaigns: Option<PathBuf>,
    /// Folder of campaign specs named `<campaign id>.toml`: runs the scheduler, which sends
    /// due sendings through the send pipeline.
    #[arg(long, value_name = "DIR", requires = "campaigns")]
    pub campaign_specs: Option<PathBuf>,
    /// Seconds between scheduler passes.
    #[arg(long, default_value_t = 10)]
    pub scheduler_every: u64,
    /// Fields audience conditions may use besides the member defaults: a JSON array of
    /// `{"group", "field", "column", "kind"}` (see docs/campaigns.md).
    #[arg(long, value_name = "FILE.json", requires = "campaigns")]
    pub audience_fields: Option<PathBuf>,
    /// Seconds between passes of the event-callback relay, which follows `--store`'s events
    /// and posts the delivered / opened / clicked / bounced events of sendings to their
    /// campaign's `event_callback` (0: no relay).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub callback_relay_every: u64,
    /// Seconds event callbacks are gathered before a POST (1-300).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub callback_window: i64,
    /// The email system's creative API: before a sending is prepared, each variant's template
    /// `content` is PUT to `<URL>/templates/<name>` when it changed (bearer token from
    /// `BROADSIDE_CREATIVE_TOKEN`).
    #[arg(long, env = "BROADSIDE_CREATIVE_API", value_name = "URL")]
    pub creative_api: Option<String>,
}

/// The creative API client from its URL, with the token from the environment.
fn creative(url: Option<&str>) -> Option<TemplateSync> {
    url.map(|u| TemplateSync {
        endpoint: u.to_string(),
        token: std::env::var("BROADSIDE_CREATIVE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    })
}

/// This process, as a lease holder.
fn holder() -> String {
    format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "broadside".into()),
        std::process::id()
    )
}

/// The campaign routes for `broadside serve`, the scheduler thread when specs are given and
/// the event-callback relay over `store`'s events.
pub fn serve_parts(
    o: &CampaignServeOptions,
    store: &Path,
    tokens: Option<&Path>,
    listen: &str,
    rt: &tokio::runtime::Handle,
) -> Result<Option<axum::Router>> {
    let Some(db) = &o.campaigns else {
        return Ok(None);
    };
    let access = match tokens {
        Some(path) => {
            let set = broadside_analytics::api::TokenSet::load(path)?;
            Access::Tokens(
                set.tokens
                    .into_iter()
                    .map(|t| TokenGrant {
                        name: t.name,
                        sha256: t.sha256,
                        workspaces: t.workspaces,
                    })
                    .collect(),
            )
        }
        None => {
            let loopback = listen
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false);
            if !loopback {
                bail!("--campaigns on {listen} needs --tokens (without tokens the campaign API is only served on a loopback address)");
            }
            Access::Open
        }
    };
    let fields = broadside_campaigns::send_audience::allowed_fields(o.audience_fields.as_deref())?;
    let router = campaign_router(CampaignApiConfig {
        store: db.clone(),
        schedule: ScheduleConfig::default(),
        fields: fields.clone(),
        access,
        clock: system_clock(),
        ready_check: o
            .campaign_specs
            .as_deref()
            .map(|specs| ready_check(specs, Some(store), o.creative_api.is_some())),
        send_configs: o.campaign_specs.as_deref().map(SendConfigs::new),
    })?;
    let cb = CallbackConfig {
        window_secs: o.callback_window,
        ..Default::default()
    };
    let (queue, worker) = CallbackQueue::new(cb, callback_clock())?;
    rt.spawn(worker.run());
    if o.callback_relay_every > 0 {
        let mut cfg = RelayConfig::new(holder());
        cfg.every_secs = o.callback_relay_every;
        cfg.lease_secs = (3 * o.callback_relay_every as i64).max(300);
        let relay = EventRelay::new(
            db,
            &broadside_pipeline::event::events_dir(store),
            queue.clone(),
            cfg,
        )?;
        let every = Duration::from_secs(o.callback_relay_every);
        std::thread::Builder::new()
            .name("callback-relay".into())
            .spawn(move || loop {
                match relay.relay_once(chrono::Utc::now().timestamp()) {
                    Ok(p) if p.files > 0 || p.unreadable > 0 => tracing::info!(
                        files = p.files,
                        events = p.events,
                        queued = p.queued,
                        unreadable = p.unreadable,
                        deferred = p.deferred,
                        "event callback relay pass"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "event callback relay pass failed"),
                }
                std::thread::sleep(every);
            })
            .context("starting the event callback relay")?;
    }
    if let Some(specs) = &o.campaign_specs {
        let sched = scheduler(
            db,
            specs,
            fields,
            Some(queue),
            creative(o.creative_api.as_deref()),
        )?;
        let every = Duration::from_secs(o.scheduler_every.max(1));
        std::thread::Builder::new()
            .name("campaign-scheduler".into())
            .spawn(move || loop {
                if let Err(e) = sched.tick(chrono::Utc::now().timestamp()) {
                    tracing::error!(error = %e, "campaign scheduler pass failed");
                }
                std::thread::sleep(every);
            })
            .context("starting the campaign scheduler")?;
    }
    Ok(Some(router))
}

fn scheduler(
    db: &Path,
    specs: &Path,
    fields: FieldMap,
    callbacks: Option<CallbackQueue>,
    creative: Option<TemplateSync>,
) -> Result<Scheduler<SpecExecutor>> {
    if !specs.is_dir() {
        bail!("--campaign-specs {}: not a folder", specs.display());
    }
    let mut cfg = SchedulerConfig::new(holder());
    // A send of millions of rows outlasts the 15-minute lease: keep it alive while it runs.
    cfg.heartbeat = Some(Duration::from_secs(60));
    Ok(Scheduler::new(
        Store::open(db)?,
        SpecExecutor {
            specs: specs.to_path_buf(),
            db: db.to_path_buf(),
            fields,
            callbacks,
            creative,
        },
        cfg,
    ))
}

/// Runs a sending as a send of the campaign's spec (`<specs>/<campaign id>.toml`), with run
/// id `sending-<id>-<created>`: the send pipeline resumes a run by id, so transmitting again after a
/// restart continues that run instead of sending twice.
pub struct SpecExecutor {
    specs: PathBuf,
    /// The campaign store (for each campaign's `event_callback`).
    db: PathBuf,
    /// The fields audience conditions may use.
    fields: FieldMap,
    /// Where `submitted` events go after a transmission, when callbacks run.
    callbacks: Option<CallbackQueue>,
    /// The creative API variants' template contents are synced to before a sending.
    creative: Option<TemplateSync>,
}

/// The run id the executor gives a sending's send.
fn run_id(s: &Sending) -> String {
    // With the creation time, a new campaign store reusing a spec's store never meets an old
    // finished run of the same sending id (which would silently do nothing).
    format!("sending-{}-{}", s.id, s.created_at)
}

impl SpecExecutor {
    /// The spec the sending's campaign is sent with ([`campaign_spec_path`]).
    fn spec(&self, s: &Sending) -> std::result::Result<PathBuf, StepError> {
        let campaign = Store::open(&self.db)?.campaign_by_id(s.campaign_id)?;
        Ok(campaign_spec_path(&self.specs, &campaign)?)
    }

    /// The spec a sending is sent with and the audience restricting its source: the campaign
    /// spec with the sending's audience, or, with inline recipients, a spec derived from it
    /// whose source is a CSV of the audience's rows (when it has one) followed by the inline
    /// recipients ([`inline::materialise`]; the audience is then applied already).
    fn plan(&self, s: &Sending) -> Result<(PathBuf, Option<Vec<Condition>>)> {
        let spec = self.spec(s).map_err(|e| anyhow::anyhow!("{e}"))?;
        let audience = self.audience(s)?;
        if s.recipients.recipients.is_empty() {
            return Ok((spec, audience));
        }
        let dir = self.inline_dir(s);
        let with = audience.as_deref().map(|conditions| inline::WithAudience {
            conditions,
            fields: &self.fields,
        });
        Ok((inline::materialise(s, &run_id(s), &spec, &dir, with)?, None))
    }

    /// Where a sending's inline recipients are written: `<campaign store>.sendings/<run id>/`,
    /// or `<specs>/sendings/<run id>/` for a PostgreSQL store, which has no folder.
    fn inline_dir(&self, s: &Sending) -> PathBuf {
        if broadside_campaigns::store::is_postgres_location(&self.db) {
            return self.specs.join("sendings").join(run_id(s));
        }
        let name = self
            .db
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "campaigns.db".into());
        self.db
            .with_file_name(format!("{name}.sendings"))
            .join(run_id(s))
    }

    /// The sending's audience conditions: inline, or the stored audience it references (read
    /// at every step; a resumed transmission whose audience changed is refused by the send).
    /// `None` sends to the whole spec source.
    fn audience(&self, s: &Sending) -> Result<Option<Vec<Condition>>> {
        Ok(match &s.recipients.audience {
            // A sending to the campaign's list goes to its segment, when it has one.
            None if s.recipients.recipients.is_empty() => {
                let store = Store::open(&self.db)?;
                let c = store.campaign_by_id(s.campaign_id)?;
                match c.segments.as_slice() {
                    [] => None,
                    [id] => Some(
                        store
                            .audience(&c.workspace_id, *id)
                            .with_context(|| format!("campaign {}: segment {id}", c.id))?,
                    ),
                    more => bail!(
                        "campaign {}: {} segments; a sending honours one (segments[1] and later cannot be combined)",
                        c.id,
                        more.len()
                    ),
                }
            }
            None => None,
            Some(Audience::Inline { conditions }) => Some(conditions.clone()),
            Some(Audience::Reference { id }) => {
                let store = Store::open(&self.db)?;
                let ws = store.campaign_by_id(s.campaign_id)?.workspace_id;
                Some(
                    store
                        .audience(&ws, *id)
                        .with_context(|| format!("sending {}: audience {id}", s.id))?,
                )
            }
        })
    }
}

/// The spec campaign `c` is sent with: the one assembled from its send configuration given
/// through the API (written as `<specs>/<id>.api.toml`, see
/// [`broadside_campaigns::send_config`]), else the spec file `<specs>/<id>.toml`.
pub fn campaign_spec_path(specs: &Path, c: &Campaign) -> std::result::Result<PathBuf, String> {
    if let Some(p) = SendConfigs::new(specs).write_spec(c)? {
        return Ok(p);
    }
    let p = specs.join(format!("{}.toml", c.id));
    if !p.is_file() {
        return Err(format!(
            "no campaign spec {} and no send configuration (PUT /campaign/{}/spec)",
            p.display(),
            c.id
        ));
    }
    Ok(p)
}

impl SpecExecutor {
    /// With a creative API, checks each variant's template content against the spec's columns
    /// and PUTs it there when its hash changed since the last sync (the campaign store keeps
    /// the hashes). A refused sync fails the preparation: the email system would merge an
    /// outdated template.
    fn sync_templates(&self, s: &Sending, spec: &Path) -> Result<()> {
        // Without a creative API there is nothing to sync: the dry-run send of the preparation
        // checks the templates' tags (and READY refused a campaign with a sender domain).
        let Some(api) = &self.creative else {
            return Ok(());
        };
        let campaign = Store::open(&self.db)?.campaign_by_id(s.campaign_id)?;
        let domain = SendConfigs::new(&self.specs)
            .sender_domain(&campaign)
            .map_err(|e| anyhow::anyhow!("campaign {}: {e}", campaign.id))?;
        let loaded = broadside_pipeline::spec::CampaignSpec::load(spec)?;
        let contents = crate::send::check_templates(&loaded)?;
        if contents.is_empty() {
            return Ok(());
        }
        let layout = loaded.columns.layout();
        let columns: Vec<&str> = layout.names().iter().map(String::as_str).collect();
        let store = Store::open(&self.db)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the template sync runtime")?;
        for (name, content) in contents {
            let outcome = rt.block_on(api.sync(
                &store,
                &loaded.workspace_id,
                &Template {
                    name: &name,
                    content: &content,
                    sender_domain: domain.as_deref(),
                },
                &columns,
                chrono::Utc::now().timestamp(),
            ))?;
            tracing::info!(template = %name, ?outcome, "template checked against the creative API");
        }
        Ok(())
    }
}

/// Reads `--audience FILE.json`: an audience object with inline conditions, or a conditions
/// array.
pub fn audience_file(path: &Path) -> Result<Vec<Condition>> {
    let text =
        std::fs::read(path).with_context(|| format!("reading --audience {}", path.display()))?;
    let v: Value = serde_json::from_slice(&text)
        .with_context(|| format!("--audience {}: not JSON", path.display()))?;
    let audience = if v.is_array() {
        json!({"type": "inline", "conditions": v})
    } else {
        v
    };
    match Audience::from_json(&audience, "audience")
        .with_context(|| format!("--audience {}", path.display()))?
    {
        Audience::Inline { conditions } => Ok(conditions),
        Audience::Reference { id } => bail!(
            "--audience {}: audience {id} is stored in a campaign store; give its conditions",
            path.display()
        ),
    }
}

impl SpecExecutor {
    /// Queues the run's `submitted` events (its Parquet event files) for the campaign's
    /// `event_callback`; returns how many. A transmission resumed after a crash replays them
    /// again: callbacks are at least once.
    fn replay_submitted(
        &self,
        queue: &CallbackQueue,
        s: &Sending,
        spec_path: &Path,
        run_id: &str,
    ) -> Result<u64> {
        let campaign = Store::open(&self.db)?.campaign_by_id(s.campaign_id)?;
        let Some(url) = campaign.event_callback else {
            return Ok(0);
        };
        let spec = broadside_pipeline::spec::CampaignSpec::load(spec_path)?;
        let events = broadside_pipeline::event::events_dir(&spec.resolve(&spec.output.store));
        let prefix = format!(
            "{}-",
            broadside_pipeline::event::submitted_file_stem(run_id)
        );
        let mut n = 0;
        for file in files_under(&events, 2)? {
            let name = file
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            if !name.starts_with(&prefix) || !name.ends_with(".parquet") {
                continue;
            }
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .and_then(|b| b.build())
                .with_context(|| format!("reading {}", file.display()))?;
            for batch in reader {
                let batch = batch.with_context(|| format!("reading {}", file.display()))?;
                let email = batch
                    .column_by_name("email")
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .with_context(|| format!("{}: no text email column", file.display()))?;
                let ts = batch
                    .column_by_name("ts")
                    .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                    .with_context(|| format!("{}: no microsecond ts column", file.display()))?;
                for i in 0..batch.num_rows() {
                    let ev = LifecycleEvent {
                        campaign_id: s.campaign_id,
                        url: url.clone(),
                        event: CallbackEvent::Submitted,
                        when: ts.value(i).div_euclid(1_000_000),
                        address: Address::Email(email.value(i).to_string()),
                    };
                    if !queue.notify_blocking(ev) {
                        bail!("the callback worker stopped");
                    }
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Files `depth` folders below `dir` (none if it does not exist).
fn files_under(dir: &Path, depth: usize) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let p = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if depth == 0 {
            if p.is_file() {
                out.push(p);
            }
        } else if p.is_dir() {
            out.extend(files_under(&p, depth - 1)?);
        }
    }
    out.sort();
    Ok(out)
}

impl SpecExecutor {
    /// Records the sending's send run (its id, the spec's workspace and campaign id), after
    /// checking that the spec belongs to the campaign's workspace: a send is never recorded
    /// under another tenant.
    fn record_run(
        &self,
        s: &Sending,
        run: &str,
        spec: &Path,
    ) -> std::result::Result<(), StepError> {
        let loaded = broadside_pipeline::spec::CampaignSpec::load(spec)?;
        let store = Store::open(&self.db)?;
        let campaign = store.campaign_by_id(s.campaign_id)?;
        if let Some(wrong) = other_workspace(spec, &loaded, &campaign) {
            return Err(wrong.into());
        }
        store.record_sending_run(
            &SendingRun {
                run_id: run.to_string(),
                sending_id: s.id,
                workspace_id: loaded.workspace_id,
                campaign_key: loaded.campaign_id,
            },
            chrono::Utc::now().timestamp(),
        )?;
        Ok(())
    }
}

/// Why a campaign's spec may not be sent for it: a spec of another workspace (`None`: none).
fn other_workspace(
    path: &Path,
    spec: &broadside_pipeline::spec::CampaignSpec,
    c: &Campaign,
) -> Option<String> {
    (spec.workspace_id != c.workspace_id).then(|| {
        format!(
            "{}: workspace_id {:?} is not the workspace of campaign {} ({:?})",
            path.display(),
            spec.workspace_id,
            c.id,
            c.workspace_id
        )
    })
}

/// What keeps campaign `c` from being READY in this process, in words (empty: nothing): its
/// spec `<specs>/<id>.toml` must exist, be valid and belong to the campaign's workspace; a
/// file source and every suppression list must exist; the ERP password and the printer's API key must be where the spec
/// says (an environment variable of this process, or a readable file); printer creatives must
/// fit the columns. The source itself is not read: that is preparation's work.
/// With `store` (the store a `serve` reads), the spec must write its runs there too, or its
/// links, statistics and event callbacks would never find them.
pub fn readiness(specs: &Path, store: Option<&Path>, creative: bool, c: &Campaign) -> Vec<String> {
    use broadside_pipeline::spec::{CampaignSpec, SourceSpec};
    let path = match campaign_spec_path(specs, c) {
        Ok(p) => p,
        Err(e) => return vec![e],
    };
    let spec = match CampaignSpec::load(&path) {
        Ok(spec) => spec,
        Err(e) => return vec![e.to_string()],
    };
    let mut missing: Vec<String> = other_workspace(&path, &spec, c).into_iter().collect();
    match SendConfigs::new(specs).sender_domain(c) {
        Err(e) => missing.push(e),
        Ok(Some(d)) if !creative => missing.push(format!(
            "domain: the sender domain {d} reaches the email system through the creative API, and this process has none (--creative-api)"
        )),
        Ok(_) => {}
    }
    if let Some(store) = store {
        let same = |p: &Path| {
            std::fs::canonicalize(p)
                .or_else(|_| std::path::absolute(p))
                .ok()
        };
        let writes = spec.resolve(&spec.output.store);
        if same(&writes) != same(store) {
            missing.push(format!(
                "{}: output.store {} is not the store this server reads ({}): its runs and events would not be found",
                path.display(),
                writes.display(),
                store.display()
            ));
        }
    }
    let file = |p: &Path, what: &str, missing: &mut Vec<String>| {
        let full = spec.resolve(p);
        if !full.is_file() {
            missing.push(format!(
                "{}: {what} {} is not a file",
                path.display(),
                full.display()
            ));
        }
    };
    match &spec.source {
        SourceSpec::Csv(s) => file(&s.path, "source.path", &mut missing),
        SourceSpec::Parquet(s) => file(&s.path, "source.path", &mut missing),
        SourceSpec::Erp(e) => {
            if let Some(var) = &e.password_env {
                if std::env::var_os(var).is_none() {
                    missing.push(format!(
                        "{}: source.password_env {var} is not set in this process",
                        path.display()
                    ));
                }
            }
            if let Some(f) = &e.password_file {
                file(f, "source.password_file", &mut missing);
            }
        }
        SourceSpec::Synthetic(_) => {}
    }
    for (i, list) in spec.suppression.iter().enumerate() {
        file(&list.path, &format!("suppression[{i}].path"), &mut missing);
    }
    if let Err(e) = crate::mail::MailPlan::load(&spec, &spec.columns.layout(), "readiness") {
        missing.push(format!("{}: {e:#}", path.display()));
    }
    missing
}

/// Whether the creative API a `campaign run` of this environment would sync templates to is
/// set (`BROADSIDE_CREATIVE_API`): the CLI's READY check counts a sender domain as honoured
/// only then.
fn creative_api_configured() -> bool {
    std::env::var_os("BROADSIDE_CREATIVE_API").is_some_and(|v| !v.is_empty())
}

/// The READY check of a process that sends through the specs in `specs` (and serves `store`).
fn ready_check(specs: &Path, store: Option<&Path>, creative: bool) -> ReadyCheck {
    let specs = specs.to_path_buf();
    let store = store.map(Path::to_path_buf);
    Arc::new(move |c| readiness(&specs, store.as_deref(), creative, c))
}

/// What a sending's run does about earlier runs of its campaign: skip the keys they sent
/// (`already_sent`) unless the sending says `"exclude_sent": false`.
fn repeat_of(s: &Sending) -> crate::send::Repeat {
    if s.recipients.include_sent {
        crate::send::Repeat::NewRun
    } else {
        crate::send::Repeat::ExcludeSentIfAny
    }
}

impl Executor for SpecExecutor {
    fn prepare(&self, s: &Sending) -> std::result::Result<Prepared, StepError> {
        let (spec, audience) = self.plan(s).map_err(|e| format!("{e:#}"))?;
        // Recorded before anything is sent, so the sending shows its run id from here on.
        self.record_run(s, &run_id(s), &spec)?;
        self.sync_templates(s, &spec)
            .map_err(|e| format!("{e:#}"))?;
        let record = crate::send::send(&crate::send::SendOptions {
            spec,
            dry_run: true,
            audience,
            audience_fields: Some(self.fields.clone()),
            repeat: repeat_of(s),
            ..Default::default()
        })
        .map_err(|e| format!("{e:#}"))?;
        Ok(Prepared {
            recipients: record.rows,
            handle: run_id(s),
            decisions: record.decisions,
        })
    }

    fn transmit(
        &self,
        s: &Sending,
        p: &Prepared,
        _resumed: bool,
    ) -> std::result::Result<(), StepError> {
        let (spec, audience) = self.plan(s).map_err(|e| format!("{e:#}"))?;
        // Before the run writes an event: the relay maps the run's events to this sending by
        // run id, workspace and campaign id (the spec may have changed since preparation).
        self.record_run(s, &p.handle, &spec)?;
        crate::send::send(&crate::send::SendOptions {
            spec: spec.clone(),
            run_id: Some(p.handle.clone()),
            audience,
            audience_fields: Some(self.fields.clone()),
            repeat: repeat_of(s),
            ..Default::default()
        })
        .map_err(|e| format!("{e:#}"))?;
        if let Some(queue) = &self.callbacks {
            // The send is done whatever happens to its callbacks: log, do not fail it.
            match self.replay_submitted(queue, s, &spec, &p.handle) {
                Ok(n) if n > 0 => tracing::info!(
                    sending = s.id,
                    events = n,
                    "submitted events queued for the event callback"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(sending = s.id, error = %format!("{e:#}"), "submitted events not sent to the event callback")
                }
            }
        }
        Ok(())
    }
}

/// `broadside campaign` options.
#[derive(clap::Args, Debug)]
pub struct CampaignOptions {
    /// Campaign store: a SQLite file, or a PostgreSQL URL
    /// `postgres://USER:PASSWORD@HOST:5432/DATABASE` (no TLS yet: `sslmode=disable`).
    #[arg(
        long,
        global = true,
        default_value = "campaigns.db",
        value_name = "FILE.db|URL"
    )]
    pub db: PathBuf,
    /// Workspace.
    #[arg(long, global = true, default_value = "default")]
    pub workspace: String,
    /// Fields audience conditions may use besides the member defaults: a JSON array of
    /// `{"group", "field", "column", "kind"}` (see docs/campaigns.md).
    #[arg(long, global = true, value_name = "FILE.json")]
    pub audience_fields: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CampaignCommand,
}

/// `broadside campaign schedule`: what the sending is and when it runs.
#[derive(Debug, clap::Args)]
pub struct ScheduleArgs {
    /// Campaign id.
    pub id: i64,
    /// Send now.
    #[arg(long, conflicts_with_all = ["at", "in_"])]
    pub now: bool,
    /// Send at: unix seconds or ISO 8601.
    #[arg(long)]
    pub at: Option<String>,
    /// Send in: "30 minutes", "2 days", "1 month".
    #[arg(long = "in", id = "in_")]
    pub in_: Option<String>,
    /// Start preparing ahead of the send time.
    #[arg(long)]
    pub prescheduled: bool,
    /// Also approve it (READY): the scheduler only runs READY campaigns.
    #[arg(long)]
    pub ready: bool,
    /// The sending's audience as JSON, as the API takes it:
    /// `{"type": "reference", "id": 5}` or `{"type": "inline", "conditions": [...]}`.
    #[arg(long, value_name = "JSON")]
    pub audience: Option<String>,
    /// Inline recipients as JSON, as the API takes them:
    /// `[{"email": "ann@example.com", "properties": {"first_name": "Ann"}}, {"member_id": 7}]`.
    #[arg(long, value_name = "JSON")]
    pub recipients: Option<String>,
    /// Send to everyone again, including those an earlier sending of the campaign reached
    /// (`"exclude_sent": false`); by default they are skipped as `already_sent`.
    #[arg(long)]
    pub include_sent: bool,
    /// Folder of campaign specs: READY is refused, naming what is missing, until the
    /// campaign's spec resolves (as `serve --campaign-specs` checks it).
    #[arg(long, env = "BROADSIDE_CAMPAIGN_SPECS", value_name = "DIR")]
    pub specs: Option<PathBuf>,
}

/// `broadside campaign` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CampaignCommand {
    /// List the workspace's campaigns.
    List,
    /// Create a campaign (prints it as JSON).
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Contact list id.
        #[arg(long)]
        list: Option<i64>,
        /// Segment id (repeatable).
        #[arg(long = "segment")]
        segments: Vec<i64>,
        /// Bounce domain id.
        #[arg(long)]
        domain: Option<i64>,
        /// Send time: unix seconds or ISO 8601.
        #[arg(long)]
        when: Option<String>,
        /// URL lifecycle events are posted to.
        #[arg(long)]
        event_callback: Option<String>,
    },
    /// Add a sending to a campaign and move the campaign to SCHEDULED (READY with --ready).
    Schedule(ScheduleArgs),
    /// Move a campaign to another state (DRAFT, SCHEDULED, READY, CANCELLED), as `PUT` does.
    State {
        /// Campaign id.
        id: i64,
        /// The state.
        state: String,
        /// Folder of campaign specs: READY is refused, naming what is missing, until the
        /// campaign's spec resolves (as `serve --campaign-specs` checks it).
        #[arg(long, env = "BROADSIDE_CAMPAIGN_SPECS", value_name = "DIR")]
        specs: Option<PathBuf>,
    },
    /// Print a campaign's send configuration (TOML, as `GET /campaign/{id}/spec` answers), for
    /// review in version control.
    Export {
        /// Campaign id.
        id: i64,
        /// Write it to this file instead of standard output.
        #[arg(long, value_name = "FILE.toml")]
        out: Option<PathBuf>,
    },
    /// Set a campaign's send configuration from a TOML file (as `PUT /campaign/{id}/spec`
    /// does), checked against the operator's sources file in the specs folder.
    Import {
        /// Campaign id.
        id: i64,
        /// The configuration (`broadside campaign export` writes one).
        file: PathBuf,
        /// Folder of campaign specs holding the operator's `sources.toml`.
        #[arg(long, env = "BROADSIDE_CAMPAIGN_SPECS", value_name = "DIR")]
        specs: PathBuf,
    },
    /// Cancel a campaign (and its pending sendings), or one sending.
    Cancel {
        /// Campaign id.
        id: i64,
        /// Only this sending.
        #[arg(long)]
        sending: Option<i64>,
    },
    /// A campaign, its sendings and their run history, as JSON.
    Status {
        /// Campaign id.
        id: i64,
    },
    /// Run one scheduler pass now (cron-style), sending due sendings through their specs.
    Run {
        /// Folder of campaign specs named `<campaign id>.toml`.
        #[arg(long)]
        specs: PathBuf,
        /// The email system's creative API (see `serve --creative-api`).
        #[arg(long, env = "BROADSIDE_CREATIVE_API", value_name = "URL")]
        creative_api: Option<String>,
    },
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `broadside campaign schedule`: adds the sending (checked as the API checks it) and moves
/// the campaign to SCHEDULED, or READY with `--ready`.
fn schedule_sending(
    store: &Store,
    ws: &str,
    audience_fields: Option<&Path>,
    now: i64,
    args: ScheduleArgs,
) -> Result<()> {
    let ScheduleArgs {
        id,
        now: immediate,
        at,
        in_,
        prescheduled,
        ready,
        audience,
        recipients,
        include_sent,
        specs,
    } = args;
    let schedule = match (immediate, at, in_) {
        (true, _, _) => json!({"type": "immediate", "prescheduled": prescheduled}),
        (_, Some(at), _) => {
            json!({"type": "absolute", "at": parse_instant_text(&at, "--at")?, "prescheduled": prescheduled})
        }
        (_, _, Some(rel)) => {
            json!({"type": "relative", "in": rel, "prescheduled": prescheduled})
        }
        _ => bail!("give --now, --at TIME or --in \"N units\""),
    };
    let mut payload = json!({"schedule": schedule});
    if let Some(a) = audience {
        payload["audience"] = serde_json::from_str(&a)
            .map_err(|e| anyhow::anyhow!("audience: --audience is not JSON: {e}"))?;
    }
    if let Some(r) = recipients {
        payload["recipients"] = serde_json::from_str(&r)
            .map_err(|e| anyhow::anyhow!("recipients: --recipients is not JSON: {e}"))?;
    }
    if include_sent {
        payload["exclude_sent"] = json!(false);
    }
    let obj = payload.as_object().expect("an object");
    let (schedule, timing) = sending_schedule(obj, &ScheduleConfig::default(), now)?;
    let recipients = Recipients::from_json(obj)?;
    let campaign = store.campaign(ws, id)?;
    let fields = broadside_campaigns::send_audience::allowed_fields(audience_fields)?;
    check_audience(&recipients, &fields, &campaign)?;
    let check = specs
        .as_deref()
        .map(|specs| ready_check(specs, None, creative_api_configured()));
    if ready {
        // Before the sending is added: a refusal leaves the campaign as it was.
        let mut would_be = campaign.clone();
        would_be.state = CampaignState::Scheduled;
        check_ready(check.as_ref(), &would_be, Some(CampaignState::Ready))?;
    }
    let sending = store.create_sending(ws, id, &schedule, timing, &recipients, now)?;
    let mut c = schedule_draft(store, &campaign, now)?;
    if ready && c.state == CampaignState::Scheduled {
        let f = CampaignFields {
            state: Some(CampaignState::Ready),
            ..Default::default()
        };
        c = store.update_campaign(ws, id, &f, now)?;
    }
    print(&json!({"campaign": campaign_json(&c), "sending": sending_json(&sending)}));
    Ok(())
}

/// `broadside campaign run`: one scheduler pass over the campaign store, then the callbacks it
/// queued are delivered before returning.
fn scheduler_pass(
    db: &Path,
    specs: &Path,
    creative_api: Option<&str>,
    audience_fields: Option<&Path>,
    now: i64,
) -> Result<()> {
    // The callback worker needs a reactor; the pass itself runs on this thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the callback runtime")?;
    let (queue, worker) = CallbackQueue::new(CallbackConfig::default(), callback_clock())?;
    rt.spawn(worker.run());
    let fields = broadside_campaigns::send_audience::allowed_fields(audience_fields)?;
    let sched = scheduler(
        db,
        specs,
        fields,
        Some(queue.clone()),
        creative(creative_api),
    )?;
    let r = sched.tick(now);
    // Deliver what the pass queued before exiting (windows or not).
    rt.block_on(queue.flush());
    let r = r?;
    eprintln!(
        "scheduler pass: {} steps, {} held by another process, {} failed as overdue",
        r.advanced, r.busy, r.overdue
    );
    Ok(())
}

/// Runs `broadside campaign …`.
pub fn run(o: CampaignOptions) -> Result<()> {
    let now = chrono::Utc::now().timestamp();
    let ws = o.workspace.as_str();
    let store = Store::open(&o.db)?;
    match o.command {
        CampaignCommand::List => {
            for c in store.campaigns(ws)? {
                let sendings = store.sendings(ws, c.id)?.len();
                println!(
                    "{:>6}  {:<10} {:<22} {:>3} sendings  {}",
                    c.id,
                    c.state.as_str(),
                    c.when
                        .map(broadside_campaigns::schedule::format_instant)
                        .unwrap_or_else(|| "-".into()),
                    sendings,
                    c.name
                );
            }
        }
        CampaignCommand::Create {
            name,
            list,
            segments,
            domain,
            when,
            event_callback,
        } => {
            let fields = CampaignFields {
                name: Some(name),
                domain: Some(domain),
                list: Some(list),
                segments: Some(segments),
                state: None,
                when: Some(when.map(|w| parse_instant_text(&w, "--when")).transpose()?),
                event_callback: Some(
                    event_callback
                        .map(|u| broadside_campaigns::api::check_callback_url(&u))
                        .transpose()?,
                ),
            };
            let c =
                create_with_default_sending(&store, ws, &fields, &ScheduleConfig::default(), now)?;
            print(&campaign_json(&c));
        }
        CampaignCommand::Export { id, out } => {
            let c = store.campaign(ws, id)?;
            let Some(text) = c.send_spec else {
                bail!(
                    "campaign {id} has no send configuration (broadside campaign import sets one)"
                );
            };
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
        }
        CampaignCommand::Import { id, file, specs } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let c = store.campaign(ws, id)?;
            let text = broadside_campaigns::api::check_spec(
                Some(&SendConfigs::new(&specs)),
                &c,
                &body,
                false,
            )
            .with_context(|| format!("{}", file.display()))?;
            print(&campaign_json(&store.set_send_spec(
                ws,
                id,
                Some(&text),
                now,
            )?));
        }
        CampaignCommand::Schedule(args) => {
            schedule_sending(&store, ws, o.audience_fields.as_deref(), now, args)?
        }
        CampaignCommand::State { id, state, specs } => {
            let f = CampaignFields {
                state: Some(state.parse()?),
                ..Default::default()
            };
            let check = specs
                .as_deref()
                .map(|specs| ready_check(specs, None, creative_api_configured()));
            check_ready(check.as_ref(), &store.campaign(ws, id)?, f.state)?;
            print(&campaign_json(&store.update_campaign(ws, id, &f, now)?));
        }
        CampaignCommand::Cancel { id, sending } => match sending {
            Some(sid) => {
                let s = store.sending(ws, sid)?;
                if s.campaign_id != id {
                    bail!(
                        "sending {sid} belongs to campaign {}, not {id}",
                        s.campaign_id
                    );
                }
                print(&sending_json(&store.cancel_sending(ws, sid, now)?));
            }
            None => {
                let f = CampaignFields {
                    state: Some(CampaignState::Cancelled),
                    ..Default::default()
                };
                print(&campaign_json(&store.update_campaign(ws, id, &f, now)?));
            }
        },
        CampaignCommand::Status { id } => {
            let c = store.campaign(ws, id)?;
            let mut sendings = Vec::new();
            for s in store.sendings(ws, id)? {
                sendings.push(sending_detail(&store, &s)?);
            }
            print(&json!({"campaign": campaign_json(&c), "sendings": sendings}));
        }
        CampaignCommand::Run {
            specs,
            creative_api,
        } => {
            drop(store);
            scheduler_pass(
                &o.db,
                &specs,
                creative_api.as_deref(),
                o.audience_fields.as_deref(),
                now,
            )?
        }
    }
    Ok(())
}
