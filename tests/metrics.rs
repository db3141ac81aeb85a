//! Prometheus metrics, scraped over TCP from the real binary: `serve`'s `/metrics` (HTTP by
//! route template, SQL refusals and memory, webhook outcomes by workspace), `send
//! --metrics-listen` while a send runs (decisions equal to the ledger's for the rows decided
//! so far), and `ingest --metrics-listen` against a real Kafka-protocol broker (records,
//! commits, buffered bytes and consumer lag).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{api_get, new_token, post_raw, Server};

/// One scrape: series (name and labels) → value.
#[derive(Debug)]
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>);

impl Scrape {
    /// The value of the series `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|s| s.2)
    }

    /// The sum over every series of `name` whose labels include these.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|s| s.2)
            .sum()
    }

    fn has_help(&self, text: &str, name: &str) -> bool {
        text.lines()
            .any(|l| l.starts_with(&format!("# HELP {name} ")))
    }
}

/// Parses the Prometheus text format (label values here never hold quotes or commas).
fn parse(text: &str) -> Scrape {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    Scrape(out)
}

/// `GET /metrics` over a fresh connection: (text, parsed).
fn scrape(addr: &str) -> (String, Scrape) {
    let (status, body) = api_get(addr, "/metrics", "-", "-");
    assert_eq!(status, 200, "{body}");
    let p = parse(&body);
    (body, p)
}

fn sql_body(q: &str) -> String {
    serde_json::json!({ "sql": q }).to_string()
}

fn status_of(raw: &str) -> u16 {
    raw[9..12].parse().unwrap()
}

#[test]
fn serve_counts_requests_by_route_sql_refusals_and_webhook_outcomes_per_workspace() {
    let d = tempfile::tempdir().unwrap();
    let spec = common::generate(&d.path().join("gen"), 2_000, 50, &[]);
    common::run(&["send", spec.to_str().unwrap(), "--no-progress"], true);
    let store = d.path().join("gen/store");
    let (tokens, token) = new_token(d.path(), "demo");
    let secret = "s3cret-s3cret-s3cret";
    let s = Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--webhook-secret",
            secret,
            "--webhook-workspace",
            "demo",
            "--rollup-every",
            "0",
            "--query-memory-mb",
            "4",
        ],
        &[],
    );
    let bearer = format!("Authorization: Bearer {token}");
    let as_demo = [bearer.clone(), "workspace_id: demo".to_string()];

    // Two runs looked up by id: one found, one not; both count under the route template.
    let runs = common::api_get_ok(&s.addr, "/campaign-runs/", &token, "demo");
    let run_id = runs["items"][0]["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a run in {runs}"))
        .to_string();
    let (found, _) = api_get(&s.addr, &format!("/campaign-runs/{run_id}"), &token, "demo");
    assert_eq!(found, 200);
    let (missing, _) = api_get(&s.addr, "/campaign-runs/no-such-run", &token, "demo");
    assert_eq!(missing, 404);

    // One SQL answer, one stopped by the 4 MB memory limit.
    let ok = post_raw(
        &s.addr,
        "/sql",
        &as_demo,
        &sql_body("SELECT count(*) AS n FROM recipient_logs"),
    );
    assert_eq!(status_of(&ok), 200, "{ok}");
    let hungry = "SELECT count(*) AS n FROM \
        (SELECT a.key || b.key AS k FROM recipient_logs a, recipient_logs b) x JOIN \
        (SELECT a.key || b.key AS k FROM recipient_logs a, recipient_logs b) y ON x.k = y.k";
    let refused = post_raw(&s.addr, "/sql", &as_demo, &sql_body(hungry));
    assert_eq!(status_of(&refused), 422, "{refused}");

    // Webhooks: 3 events accepted, the same 3 again (duplicates), a wrong secret, and a
    // request naming another workspace (its 2 events refused).
    let event = |i: usize, ws: &str| {
        serde_json::json!({
            "event_id": format!("m-{i}"), "workspace_id": ws, "campaign_id": "c1",
            "event_type": "opened", "email": format!("p{i}@example.com"),
            "ts": "2026-12-01T10:00:00Z"
        })
    };
    let batch: Vec<_> = (0..3).map(|i| event(i, "demo")).collect();
    let batch = serde_json::Value::Array(batch).to_string();
    let auth = [format!("Authorization: Bearer {secret}")];
    for _ in 0..2 {
        let r = post_raw(&s.addr, "/webhooks/events", &auth, &batch);
        assert_eq!(status_of(&r), 200, "{r}");
    }
    let r = post_raw(
        &s.addr,
        "/webhooks/events",
        &["Authorization: Bearer wrong-wrong-wrong".into()],
        &batch,
    );
    assert_eq!(status_of(&r), 401, "{r}");
    let foreign = serde_json::json!([event(7, "rival"), event(8, "rival")]).to_string();
    let r = post_raw(&s.addr, "/webhooks/events", &auth, &foreign);
    assert_eq!(status_of(&r), 403, "{r}");

    let (text, m) = scrape(&s.addr);
    let http = |route: &str, method: &str, status: &str| {
        m.get(
            "broadside_http_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert_eq!(
        http("/campaign-runs/{id}", "GET", "200"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(http("/campaign-runs/{id}", "GET", "404"), Some(1.0));
    assert_eq!(http("/campaign-runs/", "GET", "200"), Some(1.0));
    assert_eq!(http("/sql", "POST", "200"), Some(1.0));
    assert_eq!(http("/sql", "POST", "422"), Some(1.0));
    assert_eq!(http("/webhooks/events", "POST", "200"), Some(2.0));
    assert_eq!(http("/webhooks/events", "POST", "401"), Some(1.0));
    assert_eq!(http("/webhooks/events", "POST", "403"), Some(1.0));
    // Concrete paths never become labels; scrapes are not counted.
    assert!(
        !text.contains("no-such-run") && !text.contains(&run_id),
        "{text}"
    );
    assert_eq!(
        m.sum("broadside_http_requests_total", &[("route", "/metrics")]),
        0.0
    );
    // Every answered request is in the latency histogram too.
    assert_eq!(
        m.sum("broadside_http_request_duration_seconds_count", &[]),
        m.sum("broadside_http_requests_total", &[])
    );
    assert_eq!(
        m.get(
            "broadside_http_request_duration_seconds_count",
            &[("route", "/sql"), ("method", "POST"), ("status", "422")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("broadside_http_requests_in_flight", &[]), Some(0.0));

    assert_eq!(
        m.get(
            "broadside_sql_queries_refused_total",
            &[("reason", "memory_limit")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("broadside_sql_queries_running", &[]), Some(0.0));
    // Every reservation of the finished queries was given back.
    assert_eq!(m.get("broadside_query_memory_bytes", &[]), Some(0.0));

    let wh = |outcome: &str| {
        m.get(
            "broadside_webhook_events_total",
            &[("workspace", "demo"), ("outcome", outcome)],
        )
    };
    assert_eq!(wh("accepted"), Some(3.0));
    assert_eq!(wh("duplicate"), Some(3.0));
    assert_eq!(wh("refused"), Some(2.0));
    assert_eq!(
        m.sum("broadside_webhook_events_total", &[("workspace", "rival")]),
        0.0
    );
    for (reason, n) in [("unauthorized", 1.0), ("foreign_workspace", 1.0)] {
        assert_eq!(
            m.get(
                "broadside_webhook_requests_refused_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}"
        );
    }
    for name in [
        "broadside_http_requests_total",
        "broadside_sql_queries_refused_total",
        "broadside_webhook_events_total",
    ] {
        assert!(m.has_help(&text, name), "no # HELP for {name}");
    }
}

#[test]
fn serve_metrics_listen_moves_the_endpoint_off_the_api_port() {
    let d = tempfile::tempdir().unwrap();
    let (tokens, token) = new_token(d.path(), "demo");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let s = Server::start(
        &[
            "--store",
            d.path().join("store").to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--rollup-every",
            "0",
            "--metrics-listen",
            &metrics,
        ],
        &[],
    );
    let (status, _) = api_get(&s.addr, "/campaign-runs/", &token, "demo");
    assert_eq!(status, 200);
    let (on_api, _) = api_get(&s.addr, "/metrics", &token, "demo");
    assert_eq!(on_api, 404, "/metrics must not be served on the API port");
    let (_, m) = scrape(&metrics);
    assert_eq!(
        m.get(
            "broadside_http_requests_total",
            &[
                ("route", "/campaign-runs/"),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        Some(1.0)
    );
}

/// Reads a child's stderr until the line announcing its metrics address; the rest is drained.
fn metrics_addr(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("exited before serving metrics")
            .unwrap();
        if let Some(rest) = line.strip_prefix("metrics on http://") {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(|l| eprintln!("child: {}", l.unwrap_or_default())));
    addr
}

/// Scrapes until `done` holds (the work runs in another process), at most `limit`.
fn scrape_until(addr: &str, limit: Duration, mut done: impl FnMut(&Scrape) -> bool) -> Scrape {
    let until = Instant::now() + limit;
    loop {
        let (_, m) = scrape(addr);
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < until,
            "metrics never reached the state: {m:?}"
        );
        // Polling another process's progress, not a synchronisation sleep.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn send_metrics_listen_shows_the_decisions_so_far_equal_to_the_ledger() {
    let d = tempfile::tempdir().unwrap();
    let gen = d.path().join("gen");
    let spec = common::generate(&gen, 60_000, 1_000, &[]);
    // The recipients come through a pipe: the send decides the first rows and waits for more.
    let csv = gen.join("recipients.csv");
    let all = std::fs::read_to_string(&csv).unwrap();
    std::fs::remove_file(&csv).unwrap();
    let rc = unsafe {
        let p = std::ffi::CString::new(csv.to_str().unwrap()).unwrap();
        libc::mkfifo(p.as_ptr(), 0o600)
    };
    assert_eq!(rc, 0, "mkfifo");
    let mut child = common::exe()
        .args(["send", spec.to_str().unwrap(), "--no-progress"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = metrics_addr(&mut child);
    let lines: Vec<&str> = all.lines().collect();
    let mut pipe = std::fs::OpenOptions::new().write(true).open(&csv).unwrap();
    let first = 30_001; // the header and 30 000 recipients
    pipe.write_all((lines[..first].join("\n") + "\n").as_bytes())
        .unwrap();
    pipe.flush().unwrap();

    // The send decides what it can of those rows, then waits for the pipe: scrape until two
    // scrapes in a row show the same decisions (the rate is published by the progress
    // reporter, a few times a second).
    let rows_total = |m: &Scrape| {
        let mut v: Vec<_> =
            m.0.iter()
                .filter(|s| s.0 == "broadside_send_rows_total")
                .map(|s| (s.1.clone(), s.2))
                .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut previous = Vec::new();
    let m = scrape_until(&addr, Duration::from_secs(60), |m| {
        let now = rows_total(m);
        let stable = !now.is_empty() && now == previous;
        previous = now;
        stable && m.get("broadside_send_rows_per_second", &[]).unwrap_or(0.0) > 0.0
    });
    let decided = m.sum("broadside_send_rows_total", &[]);
    assert!(
        decided <= 30_000.0,
        "decided {decided} of the 30 000 rows written"
    );
    assert_eq!(m.get("broadside_send_runs_running", &[]), Some(1.0));
    assert_eq!(
        m.get("broadside_send_stage_rows_total", &[("stage", "assign")]),
        Some(decided),
        "the last ordered stage saw every decided row"
    );
    assert!(m.sum("broadside_send_stage_busy_seconds", &[]) > 0.0);

    pipe.write_all((lines[first..].join("\n") + "\n").as_bytes())
        .unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let run_id = stdout
        .split_whitespace()
        .skip_while(|w| *w != "run")
        .nth(1)
        .unwrap()
        .to_string();

    // The scraped counts are those of the first `decided` rows of the ledger.
    let ledger = common::read_ledger(&gen.join("store"), "demo", "generated-42", &run_id);
    assert_eq!(ledger.len(), 60_000);
    let mut expected: HashMap<(String, String), f64> = HashMap::new();
    for r in &ledger[..decided as usize] {
        let reason = r
            .reason
            .clone()
            .filter(|r| !r.is_empty())
            .unwrap_or("none".into());
        *expected.entry((r.decision.clone(), reason)).or_default() += 1.0;
    }
    let mut scraped: HashMap<(String, String), f64> = HashMap::new();
    for (n, l, v) in &m.0 {
        if n == "broadside_send_rows_total" {
            scraped.insert((l["decision"].clone(), l["reason"].clone()), *v);
        }
    }
    assert_eq!(scraped, expected);
}

#[test]
fn a_metrics_address_in_use_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let spec = common::generate(&d.path().join("gen"), 100, 10, &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run(
        &["send", spec.to_str().unwrap(), "--metrics-listen", &addr],
        false,
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("--metrics-listen {addr}")), "{err}");
    assert!(
        !d.path().join("gen/store").exists(),
        "the send wrote its store"
    );
}

/// `noida-db` (a Kafka-protocol broker, installed by .ci/run) on a free 127.0.0.1 port.
struct Noida {
    child: Child,
    brokers: String,
    _dir: tempfile::TempDir,
}

impl Noida {
    fn start() -> Noida {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("noida.log")).unwrap();
        let mut child = Command::new("noida-db")
            .args([
                "start",
                "--only",
                "kafka",
                "--kafka-port",
                &port.to_string(),
            ])
            .args(["--host", "127.0.0.1", "--data-dir"])
            .arg(dir.path().join("data"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("noida-db on PATH (bash .ci/run installs it)");
        let brokers = format!("127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&brokers).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "noida-db exited");
            assert!(Instant::now() < until, "noida-db did not listen");
            // Back-off between connection attempts.
            std::thread::sleep(Duration::from_millis(20));
        }
        Noida {
            child,
            brokers,
            _dir: dir,
        }
    }
}

impl Drop for Noida {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_topic_and_produce(brokers: &str, topic: &str, payloads: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for r in rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap()
    {
        r.unwrap();
    }
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    for p in payloads {
        producer
            .send(
                BaseRecord::<(), str>::to(topic)
                    .payload(p.as_str())
                    .partition(0),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn ingest_metrics_listen_shows_records_commits_buffered_bytes_and_consumer_lag() {
    let broker = Noida::start();
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let payloads: Vec<String> = (0..100)
        .map(|i| {
            serde_json::json!({
                "event_id": format!("k-{i}"), "workspace_id": "demo", "campaign_id": "c1",
                "event_type": "opened", "email": format!("p{i}@example.com"),
                "ts": "2026-12-01T10:00:00Z"
            })
            .to_string()
        })
        .collect();
    create_topic_and_produce(&broker.brokers, "events", &payloads);
    let bytes: usize = payloads.iter().map(String::len).sum();
    let buffered: usize = payloads[60..].iter().map(String::len).sum();

    // 60 records commit; the other 40 stay buffered (no time-based commit for 10 minutes).
    let mut child = common::exe()
        .args(["ingest", "--store", store.to_str().unwrap()])
        .args([
            "--brokers",
            &broker.brokers,
            "--topic",
            "events",
            "--group",
            "m",
        ])
        .args([
            "--max-records",
            "60",
            "--max-latency-ms",
            "600000",
            "--idle-ms",
            "600000",
        ])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = metrics_addr(&mut child);
    let lag = |m: &Scrape| {
        m.get(
            "broadside_ingest_consumer_lag_records",
            &[("topic", "events"), ("partition", "0")],
        )
    };
    let m = scrape_until(&addr, Duration::from_secs(60), |m| {
        m.get("broadside_ingest_records_total", &[("source", "events")]) == Some(100.0)
            && m.get("broadside_ingest_commits_total", &[]) == Some(1.0)
            && lag(m) == Some(40.0)
    });
    let _ = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success());

    assert_eq!(
        m.get("broadside_ingest_bytes_total", &[("source", "events")]),
        Some(bytes as f64)
    );
    assert_eq!(m.get("broadside_ingest_event_rows_total", &[]), Some(60.0));
    assert_eq!(m.get("broadside_ingest_dead_letters_total", &[]), Some(0.0));
    assert_eq!(
        m.get("broadside_ingest_buffered_bytes", &[]),
        Some(buffered as f64)
    );
    assert_eq!(
        m.get("broadside_ingest_commit_duration_seconds_count", &[]),
        Some(1.0)
    );
    let last = m
        .get("broadside_ingest_last_commit_timestamp_seconds", &[])
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last <= now && now - last < 120.0,
        "last commit at {last}, now {now}"
    );
    // The shutdown committed the rest.
    let rows = common::run(
        &[
            "sql",
            "--store",
            store.to_str().unwrap(),
            "--workspace",
            "demo",
            "SELECT count(*) AS n FROM events",
        ],
        true,
    );
    assert!(
        String::from_utf8_lossy(&rows.stdout).contains("100"),
        "{rows:?}"
    );
}

/// The alert rules and scrape configuration in deploy/ pass `promtool` (installed by
/// `deploy/ci-setup.sh`), and the rules' unit tests fire on failing series and stay silent on
/// healthy ones.
#[test]
fn deploy_alert_rules_and_scrape_config_pass_promtool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for args in [
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(root)
            .output()
            .expect("promtool on PATH (bash deploy/ci-setup.sh installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The JSON log lines of `stderr` (other lines skipped).
fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The span named `name` among a JSON log line's spans.
fn span<'a>(line: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    line["spans"].as_array()?.iter().find(|s| s["name"] == name)
}

#[test]
fn json_logs_carry_the_send_span_with_workspace_campaign_and_run() {
    let d = tempfile::tempdir().unwrap();
    let spec = common::generate(&d.path().join("gen"), 3_000, 50, &[]);
    // Small IFUR files: some are finished by the writer stage while it runs, inside its span.
    common::set_spec(&spec, "ifur_roll_rows", "500");
    let out = common::run_env(
        &[
            "--log-format",
            "json",
            "send",
            spec.to_str().unwrap(),
            "--no-progress",
            "--run-id",
            "traced",
        ],
        &[("BROADSIDE_LOG", "debug")],
        true,
    );
    let lines = json_lines(&out.stderr);
    let finished: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "ifur file finished")
        .collect();
    assert!(
        !finished.is_empty(),
        "no `ifur file finished` line: {lines:?}"
    );
    for l in &finished {
        let s = span(l, "send").unwrap_or_else(|| panic!("no send span: {l}"));
        assert_eq!(s["run_id"], "traced", "{l}");
        assert_eq!(s["campaign_id"], "generated-42", "{l}");
        assert_eq!(s["workspace_id"], "demo", "{l}");
    }
    // Files rolled while the run goes are finished inside the writer stage's span.
    let in_stage: Vec<_> = finished.iter().filter_map(|l| span(l, "stage")).collect();
    assert!(
        !in_stage.is_empty(),
        "no line inside a stage span: {finished:?}"
    );
    assert!(
        in_stage.iter().all(|s| s["stage"] == "ifur-write"),
        "{in_stage:?}"
    );
}

#[test]
fn json_logs_carry_the_http_span_with_route_and_workspace() {
    let d = tempfile::tempdir().unwrap();
    let (tokens, token) = new_token(d.path(), "demo");
    let mut cmd = common::exe();
    cmd.args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--store", d.path().join("store").to_str().unwrap()])
        .args(["--tokens", tokens.to_str().unwrap(), "--rollup-every", "0"])
        .env("BROADSIDE_LOG", "info")
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some((_, rest)) = line
            .strip_prefix("serving ")
            .and_then(|l| l.split_once(" on http://"))
        {
            break rest.trim().to_string();
        }
    };
    // The token asks for a workspace it may not read: refused with a warning, logged inside
    // the request's span.
    let (status, _) = api_get(&addr, "/campaign-runs/", &token, "rival");
    assert_eq!(status, 403);
    let _ = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let rest: Vec<u8> = lines
        .map_while(Result::ok)
        .flat_map(|l| (l + "\n").into_bytes())
        .collect();
    child.wait().unwrap();
    let logged = json_lines(&rest);
    let refused = logged
        .iter()
        .find(|l| span(l, "http").is_some())
        .unwrap_or_else(|| panic!("no log line inside an http span: {logged:?}"));
    let s = span(refused, "http").unwrap();
    assert_eq!(s["route"], "/campaign-runs/", "{refused}");
    assert_eq!(s["method"], "GET");
    assert_eq!(s["workspace_id"], "rival");
}
