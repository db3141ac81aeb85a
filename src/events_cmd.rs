//! `broadside ingest`, `broadside suppression build` and `broadside serve`: the event side,
//! wired to `broadside_analytics`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use broadside_analytics::api::{api_router, ApiConfig, SqlConcurrency, TokenSet};
use broadside_analytics::query::Catalog;
use broadside_analytics::suppression::{build_suppression, SuppressionBuildConfig};
use broadside_analytics::webhook::{
    webhook_router, WebhookConfig, WebhookCredential, WebhookCredentials, WebhookSink,
    DEFAULT_MAX_BODY,
};
use broadside_analytics::{
    ingest_file_until, run_kafka_ingest, FileIngestConfig, IngestHooks, IngestStats,
    KafkaIngestConfig, OnGap,
};

/// Set by SIGINT/SIGTERM: long-running commands commit what they hold and stop.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Sets [`SHUTDOWN`] on the first SIGINT or SIGTERM.
fn install_shutdown_handler() -> Result<()> {
    broadside_analytics::stop::set_on_stop_signal(&SHUTDOWN)
        .context("installing the SIGINT/SIGTERM handlers")
}

/// Options of `broadside ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestOptions {
    /// Store root; events land under `<store>/events/`.
    #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
    pub store: PathBuf,
    /// Ingest this NDJSON file (one event per line) instead of Kafka.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Identity of the file in the ingest state (default: derived from its path).
    #[arg(long)]
    pub source_id: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "BROADSIDE_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Consumer group: run one ingest process per group member.
    #[arg(long, default_value = "broadside-ingest")]
    pub group: String,
    /// Topic to consume (repeatable).
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Extra librdkafka property, `key=value` (repeatable).
    #[arg(short = 'X', value_parser = parse_kv)]
    pub kafka_options: Vec<(String, String)>,
    /// Commit after this many records per partition.
    #[arg(long)]
    pub max_records: Option<usize>,
    /// Commit at least this often, in milliseconds.
    #[arg(long)]
    pub max_latency_ms: Option<u64>,
    /// Stop once no record arrived for this long (ms); default: run until SIGINT.
    #[arg(long)]
    pub exit_when_idle_ms: Option<u64>,
    /// Kafka: threads that decode, encode and commit (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub writers: usize,
    /// Kafka: commit a partition once no record arrived for this long (ms; default 2000).
    #[arg(long)]
    pub idle_ms: Option<u64>,
    /// Kafka: when a partition's offsets do not continue from the store's position (records
    /// deleted by retention, topic re-created): `stop` with an error naming topic, partition
    /// and offsets, or `record` the gap in the `ingest_gaps` table and continue.
    #[arg(long, value_enum, default_value_t = OnGapArg::Stop)]
    pub on_gap: OnGapArg,
    /// Serve Prometheus metrics (`GET /metrics`: records, bytes, commits, dead letters,
    /// buffered bytes, consumer lag per partition) on this address; see docs/metrics.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// `--on-gap` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnGapArg {
    /// Stop with an error.
    Stop,
    /// Record the gap in `ingest_gaps` and continue.
    Record,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn print_stats(what: &str, s: &IngestStats) {
    println!(
        "{what}: {} records, {} event rows ({} attributed from the ledger), {} dead letters, {} files, {} commits ({} already committed, skipped; {} gaps recorded)",
        s.records, s.rows, s.attributed, s.dead_letters, s.files, s.commits, s.skipped_committed, s.gaps
    );
}

/// Runs `broadside ingest`.
pub fn ingest(o: &IngestOptions) -> Result<()> {
    if let Some(addr) = &o.metrics_listen {
        crate::metrics::listen(addr)?;
    }
    let hooks = IngestHooks {
        on_commit: Some(Box::new(|c| {
            tracing::info!(stream = %c.stream, start = c.start, end = c.end, rows = c.rows, dead_letters = c.dead_letters, "committed");
        })),
        ..Default::default()
    };
    if let Some(path) = &o.from {
        let mut cfg = FileIngestConfig::new(path, &o.store);
        cfg.source_id = o.source_id.clone();
        if let Some(n) = o.max_records {
            cfg.flush.max_records = n;
        }
        install_shutdown_handler()?;
        let stats = ingest_file_until(&cfg, &hooks, &SHUTDOWN)
            .with_context(|| format!("ingesting {}", path.display()))?;
        print_stats(&format!("ingested {}", path.display()), &stats);
        return Ok(());
    }
    let Some(brokers) = &o.brokers else {
        bail!("give --from FILE.ndjson, or --brokers (or BROADSIDE_KAFKA_BROKERS) and --topic for Kafka");
    };
    if o.topics.is_empty() {
        bail!("--topic is needed for Kafka ingest");
    }
    let topics: Vec<&str> = o.topics.iter().map(String::as_str).collect();
    let mut cfg = KafkaIngestConfig::new(brokers, &o.group, &topics, &o.store);
    cfg.kafka_options = o.kafka_options.iter().cloned().collect();
    if let Some(n) = o.max_records {
        cfg.flush.max_records = n;
    }
    if let Some(ms) = o.max_latency_ms {
        cfg.flush.max_latency_ms = ms;
    }
    if let Some(ms) = o.idle_ms {
        cfg.flush.idle_ms = ms;
    }
    cfg.exit_when_idle_ms = o.exit_when_idle_ms;
    cfg.writers = o.writers;
    cfg.on_gap = match o.on_gap {
        OnGapArg::Stop => OnGap::Stop,
        OnGapArg::Record => OnGap::Record,
    };
    install_shutdown_handler()?;
    let stats = run_kafka_ingest(&cfg, hooks, &SHUTDOWN)?;
    print_stats(&format!("ingested {}", o.topics.join(",")), &stats);
    Ok(())
}

/// Runs `broadside suppression build`.
pub fn suppression_build(
    store: PathBuf,
    workspace: String,
    out: PathBuf,
    bounces: Vec<PathBuf>,
) -> Result<()> {
    let snap = build_suppression(&SuppressionBuildConfig {
        store,
        workspace_id: workspace,
        out_dir: out.clone(),
        bounce_csvs: bounces,
        soft_bounces: Default::default(),
    })?;
    println!(
        "suppression snapshot {} in {}",
        snap.snapshot_id,
        out.display()
    );
    for (reason, list) in &snap.lists {
        println!(
            "  {:<20} {:>10} addresses  {}",
            reason.as_str(),
            list.count,
            list.file
        );
    }
    Ok(())
}

/// Options of `broadside serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Store root: events are written here (unless --brokers is given) and queried from here.
    #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
    pub store: PathBuf,
    /// Token file for the analytics API (`[[tokens]]` with sha256 and workspaces; see
    /// `broadside token new`). Without it the analytics routes are not served.
    #[arg(long, env = "BROADSIDE_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Webhook credentials file (`[[webhooks]]` with name, workspace and sha256; see
    /// `broadside token new --webhook`). With it (or --webhook-secret) the webhook routes are
    /// served.
    #[arg(long, env = "BROADSIDE_WEBHOOK_TOKENS")]
    pub webhook_tokens: Option<PathBuf>,
    /// One webhook secret given in the clear (16+ characters), bound to --webhook-workspace.
    #[arg(long, env = "BROADSIDE_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
    /// The one workspace events sent with --webhook-secret are filed under.
    #[arg(long, env = "BROADSIDE_WEBHOOK_WORKSPACE")]
    pub webhook_workspace: Option<String>,
    /// Largest webhook request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY)]
    pub webhook_max_body: usize,
    /// The printer's webhook signing secret: serves `POST /webhooks/lob` (delivery tracking,
    /// checked by `Lob-Signature`) next to the other webhook routes.
    #[arg(long, env = "BROADSIDE_LOB_WEBHOOK_SECRET")]
    pub lob_webhook_secret: Option<String>,
    /// The one workspace the printer's tracking events are filed under (needed with
    /// --lob-webhook-secret).
    #[arg(long, env = "BROADSIDE_LOB_WEBHOOK_WORKSPACE")]
    pub lob_webhook_workspace: Option<String>,
    /// Produce accepted webhook events to Kafka instead of writing the store.
    #[arg(long, env = "BROADSIDE_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Topic for produced events.
    #[arg(long, default_value = "broadside.events")]
    pub webhook_topic: String,
    /// Root of historical bounce CSV exports: `POST /historical-bounces/backfill` imports the
    /// caller's folder `<DIR>/workspace_id=<W>/` only.
    #[arg(long)]
    pub bounce_history: Option<PathBuf>,
    /// Seconds between rollup refreshes (0: never; queries then scan raw events).
    #[arg(long, default_value_t = 60)]
    pub rollup_every: u64,
    #[command(flatten)]
    pub limits: crate::analytics_cmd::LimitOptions,
    /// `POST /sql` queries running at once, all tokens together (more get 429 with
    /// Retry-After). Analyst SQL holds at most this many times --query-memory-mb.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub sql_concurrency: u64,
    /// `POST /sql` queries running at once for one token (more get 429 with Retry-After).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub sql_concurrency_per_token: u64,
    #[command(flatten)]
    pub campaigns: crate::campaign_cmd::CampaignServeOptions,
    /// Serve `GET /metrics` on this address instead of on --listen (for a scrape port that
    /// is not exposed with the API); see docs/metrics.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Runs `broadside serve` (analytics API and/or webhook intake) until SIGINT/SIGTERM.
pub fn serve(o: &ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let mut app = axum::Router::new();
    let mut served = Vec::new();
    let metrics = crate::metrics::install()?;
    let credentials = webhook_credentials(o)?;
    let webhooks_served = !credentials.is_empty();
    if !credentials.is_empty() {
        let sink = match &o.brokers {
            Some(b) => WebhookSink::kafka(b, &o.webhook_topic)?,
            None => WebhookSink::store(&o.store),
        };
        let cfg = WebhookConfig::new(credentials)
            .with_max_body(o.webhook_max_body)
            .with_lob_secret(
                o.lob_webhook_secret.clone(),
                o.lob_webhook_workspace.clone(),
            );
        app = app.merge(webhook_router(cfg, sink)?);
        served.push(if o.lob_webhook_secret.is_some() {
            "webhooks (/webhooks/callback, /webhooks/events, /webhooks/lob)"
        } else {
            "webhooks (/webhooks/callback, /webhooks/events)"
        });
    } else if o.lob_webhook_secret.is_some() {
        bail!("--lob-webhook-secret needs the webhook intake: give --webhook-tokens FILE or --webhook-secret S --webhook-workspace W");
    }
    if let Some(tokens) = &o.tokens {
        let tokens = TokenSet::load(tokens)?;
        let catalog = Catalog::new(&o.store).with_limits(o.limits.limits());
        if o.rollup_every > 0 {
            let c = std::sync::Arc::new(catalog.clone());
            let every = std::time::Duration::from_secs(o.rollup_every);
            rt.spawn(async move { broadside_analytics::rollup::spawn_refresher(c, every) });
        }
        app = app.merge(api_router(ApiConfig {
            catalog,
            tokens,
            bounce_history: o.bounce_history.clone(),
            sql: SqlConcurrency {
                overall: o.sql_concurrency as usize,
                per_token: o.sql_concurrency_per_token as usize,
            },
        }));
        served.push("analytics API (see /openapi.json)");
        app = app.merge(crate::ui::router());
        served.push("dashboard (/)");
    }
    let campaigns = crate::campaign_cmd::serve_parts(
        &o.campaigns,
        &o.store,
        o.tokens.as_deref(),
        &o.listen,
        rt.handle(),
    )?;
    let campaigns_served = campaigns.is_some();
    if let Some(r) = campaigns {
        app = app.merge(r);
        served.push("campaign API (/campaign)");
    }
    if served.is_empty() {
        bail!("nothing to serve: give --tokens FILE (analytics API), --webhook-tokens FILE (webhooks) and/or --campaigns FILE.db (campaign API)");
    }
    // The API document of exactly the routes mounted here.
    let doc = broadside_analytics::api::openapi_for(
        o.tokens.is_some(),
        webhooks_served,
        webhooks_served && o.lob_webhook_secret.is_some(),
        campaigns_served,
    )
    .to_string();
    app = app.route(
        "/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    doc,
                )
            }
        }),
    );
    // Unknown paths and methods answer in the API's JSON error shape.
    app = app
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // Every routed request is counted and timed by its route template; /metrics itself is
    // merged after, so scrapes are not.
    app = app.route_layer(axum::middleware::from_fn(crate::metrics::track_http));
    // Errors raised before a handler runs (a path segment that is not a number, a body over
    // the limit) come as text from axum: give them the API's JSON error shape too.
    app = app.layer(axum::middleware::map_response(json_errors));
    match &o.metrics_listen {
        None => {
            crate::metrics::spawn_upkeep(rt.handle(), metrics.clone());
            app = app.merge(crate::metrics::router(metrics));
            served.push("metrics (/metrics)");
        }
        // The endpoint's own thread runs the recorder's upkeep.
        Some(addr) => {
            crate::metrics::listen(addr)?;
        }
    }
    rt.block_on(async {
        // Installed before listening, so a SIGTERM right after start is a graceful stop too.
        let stop = stop_signal()?;
        let listener = tokio::net::TcpListener::bind(&o.listen)
            .await
            .with_context(|| format!("listening on {}", o.listen))?;
        eprintln!(
            "serving {} on http://{}",
            served.join(" and "),
            listener.local_addr()?
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .context("serving HTTP")?;
        eprintln!("stopped: requests in flight were answered");
        Ok(())
    })
}

/// An error answer that is not JSON (axum's extractor rejections are plain text) becomes
/// `{"error": "<its text>"}` with the same status and headers.
async fn json_errors(res: axum::response::Response) -> axum::response::Response {
    use axum::http::header;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    parts.headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::from(serde_json::json!({ "error": error }).to_string()),
    )
}

/// `404` for a path no route serves, as `{"error": …}`.
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": format!("no route {}", uri.path())})),
    )
        .into_response()
}

/// `405` for a method a route does not take, as `{"error": …}` (axum adds `Allow`).
async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({
            "error": format!("{} does not take {method}", uri.path())
        })),
    )
        .into_response()
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM; axum then stops accepting and finishes the
/// requests in flight.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let which = futures::future::select(Box::pin(term.recv()), Box::pin(int.recv())).await;
        let name = match which {
            futures::future::Either::Left(_) => "SIGTERM",
            futures::future::Either::Right(_) => "SIGINT",
        };
        eprintln!("{name}: stopping, finishing requests in flight");
    })
}

/// The webhook credentials of `serve`: the --webhook-tokens file, plus --webhook-secret bound
/// to --webhook-workspace. A secret without its workspace is refused.
fn webhook_credentials(o: &ServeOptions) -> Result<Vec<WebhookCredential>> {
    let mut out = match &o.webhook_tokens {
        Some(path) => WebhookCredentials::load(path)?.webhooks,
        None => Vec::new(),
    };
    match (&o.webhook_secret, &o.webhook_workspace) {
        (Some(secret), Some(ws)) => {
            out.push(WebhookCredential::from_secret("--webhook-secret", secret, ws)?)
        }
        (Some(_), None) => bail!(
            "--webhook-secret (or BROADSIDE_WEBHOOK_SECRET) writes into one workspace only: add --webhook-workspace W (or BROADSIDE_WEBHOOK_WORKSPACE), or use --webhook-tokens FILE (broadside token new --webhook)"
        ),
        (None, Some(_)) => bail!("--webhook-workspace needs --webhook-secret"),
        (None, None) => {}
    }
    Ok(out)
}
