//! `broadside serve` end to end: a real HTTP request to the webhook intake lands in the store.

mod common;

fn post(addr: &str, path: &str, token: Option<&str>, body: &str) -> String {
    let auth: Vec<String> = token
        .map(|t| format!("Authorization: Bearer {t}"))
        .into_iter()
        .collect();
    common::post_raw(addr, path, &auth, body)
}

#[test]
fn webhook_events_reach_the_store_and_need_the_secret() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let secret = "a-long-enough-test-secret";
    let server = common::Server::start(
        &["--store", store.to_str().unwrap()],
        &[("BROADSIDE_WEBHOOK_SECRET", secret)],
    );
    let addr = server.addr.clone();
    let body = r#"[{"event_id":"w-1","workspace_id":"demo","campaign_id":"c1","email":"a@example.com","event_type":"opened","ts":"2026-11-20T10:00:00Z"},
                  {"event_id":"w-2","workspace_id":"demo","campaign_id":"c1","email":"b@example.com","event_type":"clicked","url":"https://example.com/x","ts":"2026-11-20T10:01:00Z"}]"#;
    let denied = post(
        &addr,
        "/webhooks/events",
        Some("wrong-secret-wrong-secret"),
        body,
    );
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let ok = post(&addr, "/webhooks/events", Some(secret), body);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    drop(server);

    let day = store.join("events/workspace_id=demo/date=2026-11-20");
    let rows: i64 = std::fs::read_dir(&day)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .map(|p| {
            parquet::file::reader::SerializedFileReader::new(std::fs::File::open(p).unwrap())
                .map(|r| {
                    parquet::file::reader::FileReader::metadata(&r)
                        .file_metadata()
                        .num_rows()
                })
                .unwrap()
        })
        .sum();
    assert_eq!(rows, 2);
}

/// One HTTP/1.1 exchange over a fresh connection: (status, headers in lower case, body).
/// The socket times out rather than hang the test on a stuck server.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head[9..12].parse().unwrap();
    // JSON answers carry a Content-Length (no chunking).
    (status, head.to_ascii_lowercase(), rest.to_string())
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

/// The regression of `POST /sql` with `SELECT * FROM range(100000000)` growing the server to
/// 24 GB: floods of unbounded and cross-join queries against a real `serve` over TCP are each
/// answered within the limits (a 4xx, or a truncated answer), the server's peak RSS stays
/// within twice the memory analyst SQL may hold plus 200 MB, and another workspace's
/// statistics keep answering throughout.
#[test]
fn analyst_sql_floods_stay_within_the_limits_and_other_tenants_keep_answering() {
    use std::time::{Duration, Instant};

    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let hash = broadside_analytics::api::token_hash;
    let tokens = d.path().join("tokens.toml");
    let entry = |name: &str, token: &str, ws: &str| {
        format!(
            "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nworkspaces = [\"{ws}\"]\n",
            hash(token)
        )
    };
    std::fs::write(
        &tokens,
        [
            entry("flood-a", "token-flood-a", "flood_a"),
            entry("flood-b", "token-flood-b", "flood_b"),
            entry("dashboard", "token-dashboard", "stats"),
        ]
        .concat(),
    )
    .unwrap();
    let secret = "a-long-enough-test-secret";
    // Analyst SQL may hold at most sql-concurrency × query-memory-mb.
    let (memory_mb, overall, per_token, max_mb) = (128u64, 3u64, 2u64, 4u64);
    let timeout_secs = 30u64;
    let server = common::Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--rollup-every",
            "0",
            "--query-memory-mb",
            &memory_mb.to_string(),
            "--query-timeout-secs",
            &timeout_secs.to_string(),
            "--sql-max-mb",
            &max_mb.to_string(),
            "--sql-concurrency",
            &overall.to_string(),
            "--sql-concurrency-per-token",
            &per_token.to_string(),
        ],
        &[("BROADSIDE_WEBHOOK_SECRET", secret)],
    );
    let addr = server.addr.clone();
    let pool_bytes = overall * (memory_mb << 20);

    // The other tenant's data, and its statistics once they answer.
    let events: Vec<String> = (0..200)
        .map(|i| {
            format!(
                r#"{{"event_id":"s-{i}","workspace_id":"stats","campaign_id":"c1","email":"r{i}@example.com","event_type":"{}","ts":"2026-11-20T10:00:00Z"}}"#,
                if i % 2 == 0 { "opened" } else { "clicked" }
            )
        })
        .collect();
    let auth = format!("Bearer {secret}");
    let (status, _, text) = http(
        &addr,
        "POST",
        "/webhooks/events",
        &[("Authorization", &auth)],
        &format!("[{}]", events.join(",")),
    );
    assert_eq!(status, 200, "{text}");
    let dashboard = [
        ("Authorization", "Bearer token-dashboard"),
        ("workspace_id", "stats"),
    ];
    let stats = |addr: &str| -> (u16, String, Duration) {
        let t = Instant::now();
        let (status, _, text) = http(addr, "GET", "/campaign-statistics/", &dashboard, "");
        (status, text, t.elapsed())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text, _) = stats(&addr);
        assert_eq!(status, 200, "{text}");
        if text.contains("\"c1\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "statistics never saw the events: {text}"
        );
    }

    // 1000 rows of VALUES: three of them cross-joined make 10⁹ rows.
    let values: Vec<String> = (0..1000).map(|i| format!("({i})")).collect();
    let v = format!("WITH v(x) AS (VALUES {}) ", values.join(","));
    let mut floods: Vec<(&str, &str, String)> = Vec::new();
    for i in 0..8 {
        let token = if i % 2 == 0 { "flood-a" } else { "flood-b" };
        floods.push(("range", token, "SELECT * FROM range(300000000)".into()));
    }
    floods.push((
        "generate_series",
        "flood-a",
        "SELECT count(*) FROM generate_series(1, 300000000)".into(),
    ));
    floods.push((
        "cross-join-rows",
        "flood-a",
        format!("{v}SELECT a.x AS a, b.x AS b, c.x AS c FROM v a, v b, v c"),
    ));
    floods.push((
        "cross-join-bytes",
        "flood-b",
        format!(
            "{v}SELECT a.x AS a, b.x AS b, c.x AS c, repeat('x', 2000) AS pad FROM v a, v b, v c"
        ),
    ));
    floods.push((
        "cross-join-sorted",
        "flood-b",
        format!("{v}SELECT a.x * 1000 + b.x AS k FROM v a, v b ORDER BY k DESC"),
    ));
    floods.push((
        "cross-join-memory",
        "flood-a",
        format!(
            "{v}SELECT count(DISTINCT a.x * 1000000 + b.x * 1000 + c.x) AS n FROM v a, v b, v c"
        ),
    ));

    // Every flood query in parallel; a 429 is retried after its Retry-After, as a client should.
    let started = Instant::now();
    let workers: Vec<_> = floods
        .into_iter()
        .map(|(name, token, q)| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let bearer = format!("Bearer token-{token}");
                let ws = token.replace('-', "_");
                let headers = [("Authorization", bearer.as_str()), ("workspace_id", &ws)];
                let body = serde_json::json!({ "sql": q }).to_string();
                let mut busy = 0;
                loop {
                    let t = Instant::now();
                    let (status, head, text) = http(&addr, "POST", "/sql", &headers, &body);
                    if status != 429 {
                        return (name, status, text, t.elapsed(), busy);
                    }
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert!(
                        v["error"].as_str().unwrap().contains("SQL queries"),
                        "{text}"
                    );
                    let retry: u64 = head
                        .lines()
                        .find_map(|l| l.strip_prefix("retry-after:"))
                        .expect("429 has Retry-After")
                        .trim()
                        .parse()
                        .unwrap();
                    busy += 1;
                    assert!(busy < 200, "{name}: never admitted");
                    std::thread::sleep(Duration::from_secs(retry));
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    while !workers.iter().all(|w| w.is_finished()) {
        let (status, text, took) = stats(&addr);
        assert_eq!(status, 200, "statistics failed during the flood: {text}");
        assert!(text.contains("\"c1\""), "{text}");
        latencies.push(took);
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the flood never ended"
        );
    }
    let mut busy_total = 0;
    for w in workers {
        let (name, status, text, took, busy) = w.join().unwrap();
        busy_total += busy;
        eprintln!(
            "{name}: {status} in {:.2} s after {busy} × 429: {}",
            took.as_secs_f64(),
            &text[..text.len().min(200)]
        );
        // Each admitted query is answered within its time limit (plus slack for a busy host).
        assert!(
            took < Duration::from_secs(timeout_secs + 20),
            "{name} took {took:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {}", &text[..text.len().min(300)]));
        match name {
            "range" | "generate_series" => {
                assert_eq!(status, 400, "{name}: {text}");
                assert!(v["error"].as_str().unwrap().contains(name), "{text}");
            }
            "cross-join-memory" => {
                assert_eq!(status, 422, "{name}: {text}");
                assert!(v["error"].as_str().unwrap().contains("esources exhausted"));
            }
            _ => {
                assert_eq!(status, 200, "{name}: {text}");
                assert_eq!(v["truncated"], true, "{name}");
                let rows = v["rows"].as_array().unwrap();
                assert_eq!(v["row_count"], rows.len());
                assert!(rows.len() <= 10_000, "{name}: {} rows", rows.len());
                assert!(
                    text.len() as u64 <= (max_mb << 20) + 4096,
                    "{name}: {} bytes",
                    text.len()
                );
                let by = match name {
                    "cross-join-bytes" => "byte_limit",
                    _ => "row_limit",
                };
                assert_eq!(v["truncated_by"], by, "{name}");
                if by == "row_limit" {
                    assert_eq!(rows.len(), 10_000, "{name}");
                }
                if name == "cross-join-sorted" {
                    // A top-N sort: the largest keys, in order.
                    assert_eq!(rows[0]["k"], 999_999, "{name}");
                    assert_eq!(rows[9_999]["k"], 990_000, "{name}");
                }
            }
        }
    }

    // The gate itself: slow queries (10⁹ rows) hold their places while they run; a third query of the same token is turned away (per token), then one of another token
    // once the server runs `overall` queries.
    let slow = format!("{v}SELECT max(a.x + b.x + c.x) AS m FROM v a, v b, v c");
    let send = |token: &'static str, q: String| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let bearer = format!("Bearer token-{token}");
            let ws = token.replace('-', "_");
            let headers = [("Authorization", bearer.as_str()), ("workspace_id", &ws)];
            let body = serde_json::json!({ "sql": q }).to_string();
            // A probe may hold the place for a moment: come back after Retry-After.
            loop {
                let answer = http(&addr, "POST", "/sql", &headers, &body);
                if answer.0 != 429 {
                    return answer;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let busy_until = |token: &str, word: &str| {
        let bearer = format!("Bearer token-{token}");
        let ws = token.replace('-', "_");
        let headers = [("Authorization", bearer.as_str()), ("workspace_id", &ws)];
        let deadline = Instant::now() + Duration::from_secs(timeout_secs / 2);
        loop {
            let (status, head, text) = http(
                &addr,
                "POST",
                "/sql",
                &headers,
                r#"{"sql": "SELECT 1 AS one"}"#,
            );
            if status == 429 {
                assert!(head.contains("retry-after: 1"), "{head}");
                assert!(text.contains(word), "{text}");
                return;
            }
            assert_eq!(status, 200, "{text}");
            assert!(
                Instant::now() < deadline,
                "{token}: never turned away ({word})"
            );
            // Leave the gate open most of the time, so the slow queries get in.
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let held: Vec<_> = (0..per_token)
        .map(|_| send("flood-a", slow.clone()))
        .collect();
    busy_until("flood-a", "per-token limit");
    let held_b: Vec<_> = (0..overall - per_token)
        .map(|_| send("flood-b", slow.clone()))
        .collect();
    busy_until("flood-b", "overall limit");
    let (status, text, _) = stats(&addr);
    assert_eq!(status, 200, "statistics while the gate is full: {text}");
    for h in held.into_iter().chain(held_b) {
        let (status, _, text) = h.join().unwrap();
        // Done within its time limit, or cancelled by it.
        assert!(status == 200 || status == 504, "{status} {text}");
    }

    let peak = peak_rss(server.pid());
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "figure sql_flood_tcp peak_rss_mb={} bound_mb={} statistics_answers={} statistics_p50_ms={:.1} statistics_max_ms={:.1} answers_429={busy_total}",
        peak >> 20,
        (2 * pool_bytes + (200 << 20)) >> 20,
        latencies.len(),
        ms(latencies[latencies.len() / 2]),
        ms(*latencies.last().unwrap()),
    );
    assert!(
        peak <= 2 * pool_bytes + (200 << 20),
        "peak RSS {} MiB over the bound",
        peak >> 20
    );
    assert!(
        !latencies.is_empty(),
        "no statistics answered during the flood"
    );
    assert!(
        *latencies.last().unwrap() < Duration::from_secs(15),
        "statistics answered too slowly during the flood: {:?}",
        latencies.last()
    );
}
