//! Prometheus metrics: the catalogue of every metric Broadside records, the recorder the
//! binary installs, the `GET /metrics` route and the HTTP request metrics.
//!
//! The libraries record through the `metrics` facade (a no-op until a recorder is installed:
//! `send` and `ingest` without `--metrics-listen` pay nothing); the names they use are listed
//! in [`CATALOGUE`], which gives each its help text and is checked against the sources and
//! against docs/metrics.md by tests.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

/// A metric's type, as Prometheus reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric of the catalogue.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Its labels, comma-separated (empty: none).
    pub labels: &'static str,
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, labels: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric Broadside records.
pub const CATALOGUE: &[Metric] = &[
    // HTTP (serve)
    m("broadside_http_requests_total", Counter, "route,method,status", "HTTP requests answered, by route template, method and status code."),
    m("broadside_http_request_duration_seconds", Histogram, "route,method,status", "Time from request to response head, by route template, method and status code."),
    m("broadside_http_requests_in_flight", Gauge, "", "HTTP requests being answered now."),
    // Queries
    m("broadside_sql_queries_running", Gauge, "", "POST /sql queries running now."),
    m("broadside_sql_queries_refused_total", Counter, "reason", "POST /sql queries refused or stopped: overall_limit and token_limit (429), memory_limit (422), timeout (504)."),
    m("broadside_query_memory_bytes", Gauge, "", "Memory the query engine holds for running queries (API and SQL), in bytes."),
    m("broadside_rollup_refreshes_total", Counter, "outcome", "Rollup refresh passes, by outcome (ok, failed)."),
    m("broadside_rollup_refresh_duration_seconds", Histogram, "", "Time one rollup refresh pass took."),
    m("broadside_rollup_last_success_timestamp_seconds", Gauge, "", "Unix time the rollups were last brought up to date; lag is time() minus this."),
    // Webhooks
    m("broadside_webhook_events_total", Counter, "workspace,outcome", "Webhook events by workspace and outcome: accepted (stored or produced), duplicate (a redelivery, dropped), refused (in a request refused for another workspace)."),
    m("broadside_webhook_requests_refused_total", Counter, "reason", "Webhook requests refused: unauthorized (401), too_large (413), invalid (400), foreign_workspace (403)."),
    m("broadside_webhook_delivery_failures_total", Counter, "", "Webhook requests whose events could not be stored or produced (503; the sender retries)."),
    // Callbacks
    m("broadside_callback_posts_total", Counter, "outcome", "Event callback POSTs, by outcome: posted (2xx), failed (given up after retries or refused)."),
    m("broadside_callback_events_total", Counter, "outcome", "Events in callback POSTs, by outcome: posted, failed, dropped (the queue was full)."),
    m("broadside_callback_retries_total", Counter, "", "Event callback POSTs retried."),
    m("broadside_callback_delay_seconds", Histogram, "", "From the earliest event of a callback POST to its successful delivery (window plus relay lag plus retries)."),
    m("broadside_callback_relay_files_total", Counter, "", "Event files the callback relay has read and queued."),
    m("broadside_callback_relay_last_pass_timestamp_seconds", Gauge, "", "Unix time the callback relay last finished a pass."),
    // Ingest
    m("broadside_ingest_records_total", Counter, "source", "Records consumed (Kafka topic, or file for --from)."),
    m("broadside_ingest_bytes_total", Counter, "source", "Payload bytes consumed."),
    m("broadside_ingest_commits_total", Counter, "", "Commits to the event store."),
    m("broadside_ingest_commit_duration_seconds", Histogram, "", "Time one commit took (encode, write, publish)."),
    m("broadside_ingest_event_rows_total", Counter, "", "Event rows committed."),
    m("broadside_ingest_dead_letters_total", Counter, "", "Records committed as dead letters."),
    m("broadside_ingest_commit_conflicts_total", Counter, "", "Commits that lost to another writer of the same stream (a zombie or a rebalance)."),
    m("broadside_ingest_last_commit_timestamp_seconds", Gauge, "", "Unix time of the last commit."),
    m("broadside_ingest_buffered_bytes", Gauge, "", "Payload bytes consumed and not yet committed."),
    m("broadside_ingest_consumer_lag_records", Gauge, "topic,partition", "Records in the partition past the store's position (last stable offset, the high watermark when no transaction is open, minus the next offset to commit)."),
    // Send
    m("broadside_send_runs_total", Counter, "outcome", "Sends finished, by outcome (done, failed)."),
    m("broadside_send_runs_running", Gauge, "", "Sends running now."),
    m("broadside_send_rows_total", Counter, "decision,reason", "Recipients decided, by decision and reason."),
    m("broadside_send_stage_rows_total", Counter, "stage", "Rows through each send stage."),
    m("broadside_send_stage_busy_seconds", Gauge, "stage", "Seconds spent inside each send stage, summed over threads (only grows; use rate())."),
    m("broadside_send_stage_blocked_seconds", Gauge, "stage", "Seconds each send stage's thread waited for downstream capacity (only grows; use rate())."),
    m("broadside_send_rows_per_second", Gauge, "", "Rows per second of the send running now (since it started)."),
    m("broadside_send_rows_expected", Gauge, "", "Rows the running send's source holds, when known (0: unknown)."),
    m("broadside_send_eta_seconds", Gauge, "", "Seconds the running send still needs at its current rate (0 when unknown or done)."),
];

/// Buckets for latency histograms (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for the callback delay (a window is up to five minutes).
const DELAY_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("broadside_callback_delay_seconds".into()),
            DELAY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    for d in CATALOGUE {
        let help = match d.labels {
            "" => d.help.to_string(),
            labels => format!("{} Labels: {}.", d.help, labels.replace(',', ", ")),
        };
        match d.kind {
            Counter => metrics::describe_counter!(d.name, help),
            Gauge => metrics::describe_gauge!(d.name, help),
            Histogram => metrics::describe_histogram!(d.name, help),
        }
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// `GET /metrics`: the Prometheus text exposition.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let h = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    h.render(),
                )
                    .into_response()
            }
        }),
    )
}

/// Drains the histograms' old samples now and then (the recorder's upkeep).
pub fn spawn_upkeep(rt: &tokio::runtime::Handle, handle: PrometheusHandle) {
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Records requests and their latency by route template (`/campaign-runs/{id}`, never the
/// concrete path, so the label's values are as many as the routes). Apply with
/// `Router::route_layer`: requests no route matched are not recorded.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let in_flight = metrics::gauge!("broadside_http_requests_in_flight");
    in_flight.increment(1.0);
    let workspace = req
        .headers()
        .get("workspace_id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let span =
        tracing::info_span!("http", method = %method, route = %route, workspace_id = %workspace);
    let started = Instant::now();
    let response = next.run(req).instrument(span).await;
    in_flight.decrement(1.0);
    let labels = [
        ("route", route),
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("broadside_http_requests_total", &labels).increment(1);
    metrics::histogram!("broadside_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Installs the recorder and serves `GET /metrics` on `listen` from a thread of its own
/// until the process ends (`--metrics-listen`). The address is bound before this returns, so
/// a taken port is an error here; the bound address is printed and returned.
pub fn listen(listen: &str) -> Result<SocketAddr> {
    let handle = install()?;
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("--metrics-listen {listen}: binding"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("bs-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics endpoint: starting its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                spawn_upkeep(&tokio::runtime::Handle::current(), handle.clone());
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics endpoint: listening");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, router(handle)).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        })
        .context("starting the metrics endpoint thread")?;
    eprintln!("metrics on http://{addr}/metrics");
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every `broadside_…` metric name recorded in the sources, found by reading them.
    fn recorded_names() -> BTreeSet<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = BTreeSet::new();
        let mut dirs = vec![root.join("src")];
        for c in [
            "pipeline",
            "analytics",
            "campaigns",
            "sinks",
            "sources",
            "printers",
            "net",
        ] {
            dirs.push(root.join(c).join("src"));
        }
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") || p.ends_with("src/metrics.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_name) {
                        let rest = text[i + macro_name.len()..].trim_start();
                        let Some(rest) = rest.strip_prefix('"') else {
                            panic!("{}: a metric named by a non-literal", p.display())
                        };
                        let name = &rest[..rest.find('"').unwrap()];
                        out.insert(name.to_string());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_recorded_metric_is_in_the_catalogue_and_the_other_way_round() {
        let recorded = recorded_names();
        let catalogue: BTreeSet<String> = CATALOGUE.iter().map(|m| m.name.to_string()).collect();
        // The HTTP metrics are recorded in this module.
        let mut recorded = recorded;
        for n in [
            "broadside_http_requests_total",
            "broadside_http_request_duration_seconds",
            "broadside_http_requests_in_flight",
        ] {
            recorded.insert(n.into());
        }
        let missing: Vec<_> = recorded.difference(&catalogue).collect();
        assert!(
            missing.is_empty(),
            "recorded but not in CATALOGUE: {missing:?}"
        );
        let unused: Vec<_> = catalogue.difference(&recorded).collect();
        assert!(
            unused.is_empty(),
            "in CATALOGUE but never recorded: {unused:?}"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for d in CATALOGUE {
            assert!(d.name.starts_with("broadside_"), "{}", d.name);
            assert_eq!(
                d.kind == Counter,
                d.name.ends_with("_total"),
                "{}: only counters end in _total",
                d.name
            );
            if d.kind == Histogram {
                assert!(
                    d.name.ends_with("_seconds"),
                    "{}: histograms are of seconds",
                    d.name
                );
            }
        }
    }

    /// The dashboard and the alert rules in deploy/ use catalogued names only (a histogram's
    /// `_bucket`, `_sum` and `_count` series included).
    #[test]
    fn deploy_dashboard_and_rules_use_catalogued_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut series: BTreeSet<String> = BTreeSet::new();
        for d in CATALOGUE {
            series.insert(d.name.to_string());
            if d.kind == Histogram {
                for s in ["_bucket", "_sum", "_count"] {
                    series.insert(format!("{}{s}", d.name));
                }
            }
        }
        for f in [
            "deploy/grafana/broadside.json",
            "deploy/prometheus/alerts.yml",
            "deploy/prometheus/alerts_test.yml",
        ] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let mut used = 0;
            for (i, _) in text.match_indices("broadside_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // Job names (`broadside-serve`) use dashes and never match; the dashboard's
                // variables select `{__name__=~"broadside_.+"}`.
                if name == "broadside_" {
                    continue;
                }
                assert!(
                    series.contains(&name),
                    "{f}: {name} is not a catalogued metric"
                );
                used += 1;
            }
            assert!(used > 0, "{f} uses no metric");
        }
    }

    #[test]
    fn docs_metrics_md_lists_every_metric_with_its_type_and_labels() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
        let rows: BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `broadside_"))
            .map(|l| format!("broadside_{}", &l[..l.find('`').unwrap()]))
            .collect();
        let catalogue: BTreeSet<String> = CATALOGUE.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(
            rows, catalogue,
            "docs/metrics.md's table rows vs the catalogue"
        );
        for d in CATALOGUE {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}`", d.name)))
                .unwrap();
            let kind = match d.kind {
                Counter => "counter",
                Gauge => "gauge",
                Histogram => "histogram",
            };
            assert!(
                row.contains(&format!("| {kind} |")),
                "{}: type {kind}",
                d.name
            );
            for l in d.labels.split(',').filter(|l| !l.is_empty()) {
                assert!(row.contains(&format!("`{l}`")), "{}: label {l}", d.name);
            }
        }
    }
}
