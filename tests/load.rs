//! Scenario 12 (issue 8), load: the analytics API under concurrent keep-alive clients over
//! loopback, and `broadside ingest --from` under sustained input with its memory sampled.
//!
//! Speed is measured and printed as `figure …` lines, never asserted: the assertions are
//! 0 errors, answers that agree with values computed up front, and ingest memory that does
//! not grow with the input (peak RSS at 4N events within 1.5× of the peak at N).
//! `BROADSIDE_LONG=1` runs the long variants (more clients and requests, millions of events).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use broadside_analytics::event::EventType;
use broadside_analytics::synth::EventSpec;
use chrono::NaiveDate;
use common::*;
use serde_json::Value;

const WS: &str = "demo";

fn long_run() -> bool {
    std::env::var("BROADSIDE_LONG").is_ok_and(|v| v == "1")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client that keeps its connection open between requests.

/// One keep-alive connection to the API, authenticated for one workspace.
struct Client {
    addr: String,
    auth: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: &str, token: &str) -> std::io::Result<Client> {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        // A stuck server shows up as an error, not a hung test.
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Client {
            addr: addr.to_string(),
            auth: format!("Bearer {token}"),
            writer: sock.try_clone()?,
            reader: BufReader::new(sock),
        })
    }

    /// Sends one request and reads its whole answer: (status, body).
    fn request(&mut self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nworkspace_id: {WS}\r\n",
            self.addr, self.auth
        );
        if method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.writer.write_all(req.as_bytes())?;

        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed before the answer".into()));
        }
        let status: u16 = line
            .get(9..12)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| bad(format!("status line {line:?}")))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            let (k, v) = (k.to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => close = v == "close",
                _ => {}
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| bad(format!("chunk size {line:?}")))?;
                let start = out.len();
                out.resize(start + n, 0);
                self.reader.read_exact(&mut out[start..])?;
                line.clear();
                self.reader.read_line(&mut line)?;
                if n == 0 {
                    break;
                }
            }
        } else {
            let n = length.ok_or_else(|| bad("answer without a length".into()))?;
            out.resize(n, 0);
            self.reader.read_exact(&mut out)?;
        }
        if close {
            return Err(bad(format!("server closed the connection after {path}")));
        }
        Ok((status, out))
    }
}

// ---------------------------------------------------------------------------------------------
// The store under load: synthetic events of three workspaces plus one real send.

/// Synthetic events of a workspace: 4 campaigns over 30 days.
fn spec(ws: &str, events: u64, seed: u64) -> EventSpec {
    EventSpec {
        workspace_id: ws.into(),
        campaigns: 4,
        recipients: 5_000,
        start: NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(),
        days: 30,
        events,
        seed,
    }
}

/// What the answers must say, computed from the generator before the server starts. The
/// other tenants use the same campaign ids, so a leak across workspaces changes the numbers.
struct Expected {
    /// Per campaign: (event type → count) over all of the caller's events.
    counts: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Per campaign: distinct recipients (case-insensitive) that opened, and that clicked.
    uniques: BTreeMap<String, (u64, u64)>,
    /// Rows of the real send's run.
    run_rows: u64,
}

impl Expected {
    fn total(&self, campaign: &str) -> u64 {
        self.counts[campaign].values().sum()
    }
}

fn expected(spec: &EventSpec, run_rows: u64) -> Expected {
    let mut counts: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut who: BTreeMap<(String, &'static str), BTreeSet<String>> = BTreeMap::new();
    for i in 0..spec.events {
        let e = spec.event(i);
        *counts
            .entry(e.campaign_id.clone())
            .or_default()
            .entry(e.event_type.as_str())
            .or_default() += 1;
        if matches!(e.event_type, EventType::Opened | EventType::Clicked) {
            who.entry((e.campaign_id, e.event_type.as_str()))
                .or_default()
                .insert(e.email.trim().to_lowercase());
        }
    }
    let unique = |c: &str, t: EventType| {
        who.get(&(c.to_string(), t.as_str()))
            .map_or(0, |s| s.len() as u64)
    };
    let uniques = counts
        .keys()
        .map(|c| {
            let u = (unique(c, EventType::Opened), unique(c, EventType::Clicked));
            (c.clone(), u)
        })
        .collect();
    Expected {
        counts,
        uniques,
        run_rows,
    }
}

/// Checks one answer; `Err` names what is wrong.
fn check(kind: &str, campaign: &str, body: &[u8], want: &Expected) -> Result<(), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let n = |x: &Value| x.as_u64().unwrap_or(u64::MAX);
    let c = &want.counts[campaign];
    let get = |t: EventType| c.get(t.as_str()).copied().unwrap_or(0);
    let ok = match kind {
        "statistics" => {
            let t = &v["totals"];
            n(&t["submitted"]) == get(EventType::Submitted)
                && n(&t["delivered"]) == get(EventType::Delivered)
                && n(&t["opens"]) == get(EventType::Opened)
                && n(&t["clicks"]) == get(EventType::Clicked)
                && n(&t["bounces"]) == get(EventType::Bounced)
                && n(&t["unsubscribes"]) == get(EventType::Unsubscribed)
                && n(&t["complaints"]) == get(EventType::Complained)
                && (n(&t["unique_opens"]), n(&t["unique_clicks"])) == want.uniques[campaign]
        }
        "series_day" | "series_hour" => {
            let buckets = v["buckets"].as_array().ok_or("no buckets")?;
            let sum: u64 = buckets
                .iter()
                .flat_map(|b| b["counts"].as_object().into_iter().flatten())
                .map(|(_, x)| n(x))
                .sum();
            sum == want.total(campaign)
        }
        "events" => {
            let items = v["items"].as_array().ok_or("no items")?;
            items.len() == 100 && items.iter().all(|i| i["campaign_id"] == campaign)
        }
        "runs" => v["status"] == "done" && n(&v["rows"]) == want.run_rows,
        "recipient_logs" => {
            let items = v["items"].as_array().ok_or("no items")?;
            items.len() == 50 && items.iter().all(|i| i["run_id"] == "r1")
        }
        "sql" => n(&v["rows"][0]["n"]) == want.total(campaign),
        other => return Err(format!("unknown request kind {other}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&body[..body.len().min(600)])
        ))
    }
}

/// Request `i` of client `c`: (kind, campaign, method, path, body). The mix cycles through
/// every kind, with the campaign varying so the clients do not all ask the same thing.
fn request_for(c: usize, i: usize) -> (&'static str, String, &'static str, String, String) {
    const KINDS: [&str; 7] = [
        "statistics",
        "series_day",
        "events",
        "runs",
        "series_hour",
        "recipient_logs",
        "sql",
    ];
    let kind = KINDS[(i + c) % KINDS.len()];
    let campaign = format!("c{:03}", (i / KINDS.len() + c) % 4);
    let get = |path: String| ("GET", path, String::new());
    let (method, path, body) = match kind {
        "statistics" => get(format!("/campaign-statistics/{campaign}")),
        "series_day" => get(format!(
            "/campaign-statistics/{campaign}/time-series?granularity=day"
        )),
        "series_hour" => get(format!(
            "/campaign-statistics/{campaign}/time-series?granularity=hour"
        )),
        "events" => get(format!(
            "/campaign-events/?campaign_id={campaign}&limit=100"
        )),
        "runs" => get("/campaign-runs/r1".into()),
        "recipient_logs" => get("/campaign-recipient-logs/?run_id=r1&limit=50".into()),
        _ => (
            "POST",
            "/sql".into(),
            format!(
                r#"{{"sql": "SELECT count(*) AS n FROM events WHERE campaign_id = '{campaign}'"}}"#
            ),
        ),
    };
    (kind, campaign, method, path, body)
}

/// Latency quantile (nearest rank) of sorted samples, in ms.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

/// Scenario 12, API half.
#[test]
fn api_under_concurrent_clients() {
    let (clients, per_client, time_limit, own_events, other_events) = if long_run() {
        (8, 1_500, Duration::from_secs(300), 1_000_000u64, 200_000u64)
    } else {
        (4, 300, Duration::from_secs(35), 100_000, 20_000)
    };
    let started = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");

    // The caller's events and two other tenants', written straight as Parquet.
    let own = spec(WS, own_events, 12);
    own.write(&store, 2, 32_768).unwrap();
    spec("tenant-b", other_events, 13)
        .write(&store, 2, 32_768)
        .unwrap();
    spec("tenant-c", other_events, 14)
        .write(&store, 2, 32_768)
        .unwrap();

    // A real send for the run and recipient-log routes.
    let send_dir = d.path().join("send");
    std::fs::create_dir_all(&send_dir).unwrap();
    let spec_file = generate(&send_dir, 2_000, 200, &[]);
    set_spec(&spec_file, "store", &format!("\"{}\"", store.display()));
    run(&["send", s(&spec_file), "--run-id", "r1"], true);
    let run_rows = read_ledger(&store, WS, "generated-42", "r1").len() as u64;
    // Rollups current, as `serve`'s refresher keeps them in production: statistics and time
    // series read them; events pages, recipient logs and SQL scan the raw files.
    run(&["rollup", "--store", s(&store)], true);
    let want = expected(&own, run_rows);

    let out = run(&["token", "new", "--name", "load", "--workspace", WS], true);
    let tokens = d.path().join("tokens.toml");
    std::fs::write(&tokens, &out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let token = stderr.split_whitespace().last().unwrap().to_string();
    assert!(token.starts_with("bs_"), "{stderr}");

    let server = Server::start(
        &[
            "--store",
            s(&store),
            "--tokens",
            s(&tokens),
            "--rollup-every",
            "0",
            // Every client shares one token and may ask SQL: the per-token gate (tested in
            // tests/serve.rs) is opened wide so the load measures the API, not the gate.
            "--sql-concurrency",
            "256",
            "--sql-concurrency-per-token",
            "256",
        ],
        &[],
    );
    let setup = started.elapsed();

    // Every kind of request is answered correctly once before the load starts.
    {
        let mut c = Client::connect(&server.addr, &token).unwrap();
        for i in 0..7 {
            let (kind, campaign, method, path, body) = request_for(0, i);
            let (status, answer) = c.request(method, &path, &body).unwrap();
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
            check(kind, &campaign, &answer, &want).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }

    let load_started = Instant::now();
    let deadline = load_started + time_limit;
    type ClientResult<'a> = (Vec<(&'a str, Duration)>, Vec<String>, bool);
    let results: Vec<ClientResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (addr, token, want) = (&server.addr, &token, &want);
                scope.spawn(move || {
                    let mut latencies: Vec<(&str, Duration)> = Vec::with_capacity(per_client);
                    let mut errors = Vec::new();
                    let mut conn = match Client::connect(addr, token) {
                        Ok(conn) => conn,
                        Err(e) => return (latencies, vec![format!("connect: {e}")], false),
                    };
                    let mut timed_out = false;
                    for i in 0..per_client {
                        if Instant::now() >= deadline {
                            timed_out = true;
                            break;
                        }
                        let (kind, campaign, method, path, body) = request_for(c, i);
                        let t = Instant::now();
                        let answer = conn.request(method, &path, &body);
                        latencies.push((kind, t.elapsed()));
                        match answer {
                            Ok((200, answer)) => {
                                if let Err(e) = check(kind, &campaign, &answer, want) {
                                    errors.push(format!("{path}: {e}"));
                                }
                            }
                            Ok((status, answer)) => errors.push(format!(
                                "{path}: {status} {}",
                                String::from_utf8_lossy(&answer)
                            )),
                            Err(e) => {
                                // The connection is unusable after an I/O error: count it and
                                // go on with a new one.
                                errors.push(format!("{path}: {e}"));
                                match Client::connect(addr, token) {
                                    Ok(fresh) => conn = fresh,
                                    Err(e) => {
                                        errors.push(format!("reconnect: {e}"));
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    (latencies, errors, timed_out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = load_started.elapsed();

    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for (kind, t) in results.iter().flat_map(|r| r.0.iter()) {
        by_kind.entry(kind).or_default().push(*t);
    }
    let mut latencies: Vec<Duration> = by_kind.values().flatten().copied().collect();
    let errors: Vec<String> = results.iter().flat_map(|r| r.1.clone()).collect();
    let stopped_by_time = results.iter().any(|r| r.2);
    latencies.sort();
    let requests = latencies.len();
    println!(
        "figure api_load clients={clients} requests={requests} errors={} p50_ms={:.1} p99_ms={:.1} \
         max_ms={:.1} rps={:.1} stopped_by={} events={} load_secs={:.1} setup_secs={:.1}",
        errors.len(),
        quantile_ms(&latencies, 0.50),
        quantile_ms(&latencies, 0.99),
        quantile_ms(&latencies, 1.0),
        requests as f64 / wall.as_secs_f64(),
        if stopped_by_time { "time" } else { "count" },
        own_events + 2 * other_events,
        wall.as_secs_f64(),
        setup.as_secs_f64(),
    );
    for (kind, ts) in &mut by_kind {
        ts.sort();
        println!(
            "figure api_load_kind kind={kind} requests={} p50_ms={:.1} p99_ms={:.1}",
            ts.len(),
            quantile_ms(ts, 0.50),
            quantile_ms(ts, 0.99)
        );
    }
    assert!(
        errors.is_empty(),
        "{} errors: {:#?}",
        errors.len(),
        &errors[..errors.len().min(20)]
    );
    assert!(requests >= clients, "the clients made no requests");

    // The server is still healthy after the load.
    let mut c = Client::connect(&server.addr, &token).unwrap();
    let (status, _) = c.request("GET", "/healthz", "").unwrap();
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// Ingest under sustained input: memory follows the configured buffer, not the input size.

/// Writes `events` NDJSON events over two workspaces and three days.
fn write_ndjson(path: &Path, events: u64) {
    let mut w = BufWriter::new(File::create(path).unwrap());
    let kinds = ["delivered", "opened", "clicked", "bounced", "submitted"];
    for i in 0..events {
        let ws = if i % 4 == 0 { "tenant-b" } else { WS };
        let kind = kinds[(i % 5) as usize];
        let extra = match kind {
            "bounced" => r#","bounce_type":"hard""#,
            "clicked" => r#","url":"https://example.com/offer""#,
            _ => "",
        };
        writeln!(
            w,
            r#"{{"event_id":"ld-{i}","workspace_id":"{ws}","campaign_id":"c{:03}","run_id":"r-{}","variant":"{}","email":"user{}@example.com","event_type":"{kind}"{extra},"ts":"2026-11-{:02}T{:02}:{:02}:00Z"}}"#,
            i % 6,
            i % 6,
            if i % 2 == 0 { "A" } else { "B" },
            i % 50_000,
            10 + i % 3,
            i % 24,
            i % 60,
        )
        .unwrap();
    }
    w.flush().unwrap();
}

/// `VmRSS` / `VmHWM` of a live process, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// One ingest run's measurements.
struct IngestRun {
    events: u64,
    /// `--max-records`, or `None` for the default buffer.
    max_records: Option<usize>,
    /// Peak RSS (MiB), from the kernel's accounting of the reaped child.
    peak_mb: f64,
    /// RSS samples (MiB) taken while it ran.
    samples: Vec<f64>,
    secs: f64,
}

impl IngestRun {
    fn print(&self) {
        // RSS over the second half of the run against the first: growth shows as a rising tail.
        let half = self.samples.len() / 2;
        let max_of = |xs: &[f64]| xs.iter().copied().fold(0.0, f64::max);
        println!(
            "figure ingest_memory events={} max_records={} peak_rss_mb={:.1} \
             rss_first_half_max_mb={:.1} rss_second_half_max_mb={:.1} samples={} \
             events_per_s={:.0} secs={:.1}",
            self.events,
            self.max_records
                .map_or("default".to_string(), |n| n.to_string()),
            self.peak_mb,
            max_of(&self.samples[..half]),
            max_of(&self.samples[half..]),
            self.samples.len(),
            self.events as f64 / self.secs,
            self.secs,
        );
    }
}

/// Runs `broadside ingest --from input` (`events` lines) into a fresh store, sampling the
/// child's RSS until it exits.
fn ingest_run(dir: &Path, input: &Path, events: u64, max_records: Option<usize>) -> IngestRun {
    let tag = format!("{events}-{}", max_records.unwrap_or(0));
    let store = dir.join(format!("store-{tag}"));
    let mut args = vec![
        "ingest".to_string(),
        "--store".into(),
        s(&store).into(),
        "--from".into(),
        s(input).into(),
    ];
    if let Some(n) = max_records {
        args.extend(["--max-records".to_string(), n.to_string()]);
    }
    let log = |name: &str| File::create(dir.join(format!("{name}-{tag}.log"))).unwrap();
    let started = Instant::now();
    // Output goes to files: a full pipe would stall the child and distort its timing.
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which std cannot see
    let mut child = exe()
        .args(&args)
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut samples, mut hwm_kib) = (Vec::new(), 0u64);
    let deadline = Instant::now() + Duration::from_secs(if long_run() { 3_600 } else { 300 });
    // Reaped with wait4 so the kernel's own peak (ru_maxrss) of this one child is read; the
    // /proc samples show the shape over time.
    let (status, maxrss_kib) = loop {
        if let Some((rss, hwm)) = rss_kib(pid) {
            samples.push(rss as f64 / 1024.0);
            hwm_kib = hwm_kib.max(hwm);
        }
        let mut status = 0;
        // SAFETY: plain syscall on our own child's pid with valid out-pointers.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid as i32 {
            break (status, usage.ru_maxrss as u64);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("ingest of {events} events stalled");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = started.elapsed().as_secs_f64();
    let read = |name: &str| std::fs::read_to_string(dir.join(format!("{name}-{tag}.log"))).unwrap();
    let (stdout, stderr) = (read("stdout"), read("stderr"));
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "ingest of {events} events failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!(
            "{events} event rows (0 attributed from the ledger), 0 dead letters"
        )),
        "{stdout}"
    );
    std::fs::remove_dir_all(&store).unwrap();
    let run = IngestRun {
        events,
        max_records,
        peak_mb: maxrss_kib.max(hwm_kib) as f64 / 1024.0,
        samples,
        secs,
    };
    run.print();
    run
}

/// Scenario 12, ingest half: N and 4N events through the same configured buffer peak at the
/// same RSS. A control run of the 4N input with the default buffer (500 000 records, more
/// than the short input) shows the measurement does see a buffer that grows.
#[test]
fn ingest_memory_is_flat_under_sustained_input() {
    // The configured buffer: a commit every `max_records` lines.
    let (n, max_records) = if long_run() {
        (1_000_000u64, 50_000usize)
    } else {
        (50_000, 5_000)
    };
    let d = tempfile::tempdir().unwrap();
    let input = |events: u64| {
        let path = d.path().join(format!("events-{events}.ndjson"));
        write_ndjson(&path, events);
        path
    };
    let small_input = input(n);
    let small = ingest_run(d.path(), &small_input, n, Some(max_records));
    std::fs::remove_file(small_input).unwrap();
    let large_input = input(4 * n);
    let large = ingest_run(d.path(), &large_input, 4 * n, Some(max_records));
    let control = ingest_run(d.path(), &large_input, 4 * n, None);

    let ratio = large.peak_mb / small.peak_mb;
    let control_ratio = control.peak_mb / large.peak_mb;
    println!(
        "figure ingest_memory_ratio events={}/{} max_records={max_records} peak_ratio={ratio:.2} \
         default_buffer_peak_ratio={control_ratio:.2}",
        large.events, small.events
    );
    assert!(
        ratio <= 1.5,
        "peak RSS grew with the input: {:.1} MiB at {} events, {:.1} MiB at {} events",
        small.peak_mb,
        small.events,
        large.peak_mb,
        large.events
    );
    assert!(
        control_ratio >= 1.25,
        "the default buffer did not show in the peak RSS ({:.1} vs {:.1} MiB): the \
         measurement does not see the buffer",
        control.peak_mb,
        large.peak_mb
    );
}
