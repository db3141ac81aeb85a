//! `broadside serve` end to end: real HTTP requests to the webhook intake land in the store,
//! each credential only in its own workspace, and a SIGTERM loses nothing acknowledged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broadside_analytics::webhook::{signature_header, WebhookCredential};

fn post(addr: &str, path: &str, token: Option<&str>, body: &str) -> String {
    let auth: Vec<String> = token
        .map(|t| format!("Authorization: Bearer {t}"))
        .into_iter()
        .collect();
    common::post_raw(addr, path, &auth, body)
}

/// The status code and JSON body of a raw HTTP answer.
fn answer(raw: &str) -> (u16, serde_json::Value) {
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn event(id: &str, workspace: Option<&str>, kind: &str) -> String {
    let ws = workspace
        .map(|w| format!(r#""workspace_id":{},"#, serde_json::json!(w)))
        .unwrap_or_default();
    format!(
        r#"{{"event_id":"{id}",{ws}"campaign_id":"c1","email":"{id}@example.com","event_type":"{kind}","ts":"2026-11-20T10:00:00Z"}}"#
    )
}

/// Event ids per workspace in the store, read by pyarrow (an independent Parquet reader;
/// analytics/ci-setup.sh installs it).
fn pyarrow_ids(store: &Path) -> BTreeMap<String, Vec<String>> {
    let events = store.join("events");
    if !events.exists() {
        return BTreeMap::new();
    }
    let script = r#"
import json, sys
import pyarrow.dataset as ds
t = ds.dataset(sys.argv[1], format="parquet", partitioning="hive").to_table(columns=["workspace_id", "event_id"])
out = {}
for w, e in zip(t.column("workspace_id").to_pylist(), t.column("event_id").to_pylist()):
    out.setdefault(w, []).append(e)
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&events)
        .output()
        .expect("running python3 (install pyarrow with analytics/ci-setup.sh)");
    assert!(
        out.status.success(),
        "pyarrow could not read the store (install it with analytics/ci-setup.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `broadside token new --webhook`: (secret, signing key, the `[[webhooks]]` entry).
fn new_webhook_credential(name: &str, workspace: &str) -> (String, String, String) {
    let out = common::exe()
        .args(["token", "new", "--webhook", "--name", name])
        .args(["--workspace", workspace])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let after = |label: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {label:?} in {stderr}"))
            .to_string()
    };
    (
        after("webhook secret"),
        after("signing key"),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn webhook_events_reach_the_store_and_need_the_secret() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let secret = "a-long-enough-test-secret";
    let server = common::Server::start(
        &["--store", store.to_str().unwrap()],
        &[
            ("BROADSIDE_WEBHOOK_SECRET", secret),
            ("BROADSIDE_WEBHOOK_WORKSPACE", "demo"),
        ],
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

/// Regression: one shared secret wrote into every workspace named in the body.
#[test]
fn a_secret_without_its_workspace_is_refused_at_start() {
    let out = common::exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--rollup-every", "0"])
        .env_remove("BROADSIDE_WEBHOOK_WORKSPACE")
        .env_remove("BROADSIDE_WEBHOOK_TOKENS")
        .env_remove("BROADSIDE_TOKENS")
        .env("BROADSIDE_WEBHOOK_SECRET", "a-long-enough-test-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--webhook-workspace"), "{err}");
}

/// Credential of workspace A × events naming A, B, none and traversal-looking ids, in every
/// credential form: only A's events are stored, the rest is refused with its own status and
/// counted.
#[test]
fn webhook_credentials_write_only_their_own_workspace() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let (acme, acme_key, acme_entry) = new_webhook_credential("acme-esp", "acme");
    let (rival, _, rival_entry) = new_webhook_credential("rival-esp", "rival");
    let creds = d.path().join("webhooks.toml");
    std::fs::write(&creds, format!("{acme_entry}\n{rival_entry}")).unwrap();
    let server = common::Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--rollup-every",
            "0",
            "--webhook-tokens",
            creds.to_str().unwrap(),
            "--webhook-max-body",
            "4096",
        ],
        &[],
    );
    let addr = server.addr.clone();
    let events =
        |token: &str, body: &str| answer(&post(&addr, "/webhooks/events", Some(token), body));
    let mut stored = BTreeSet::new();

    // Naming A, and naming none: filed under A.
    let (s, v) = events(&acme, &event("a-named", Some("acme"), "complained"));
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    stored.insert("a-named");
    let (s, v) = events(&acme, &event("a-none", None, "unsubscribed"));
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    stored.insert("a-none");

    // Naming B: refused whole (the A event in the same batch too), the field named, counted.
    let (s, v) = events(&acme, &event("b-named", Some("rival"), "complained"));
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        (
            v["reason"].as_str(),
            v["field"].as_str(),
            v["refused"].as_u64()
        ),
        (Some("foreign_workspace"), Some("workspace_id"), Some(1)),
        "{v}"
    );
    let mixed = format!(
        "[{},{},{}]",
        event("mix-a", Some("acme"), "complained"),
        event("mix-b1", Some("rival"), "complained"),
        event("mix-b2", Some(" rival "), "unsubscribed")
    );
    let (s, v) = events(&acme, &mixed);
    assert_eq!((s, v["refused"].as_u64()), (403, Some(2)), "{v}");
    assert_eq!(v["items"][0]["index"], 1, "{v}");

    // Traversal-looking ids never name a folder.
    for bad in [
        "../rival",
        "acme/../rival",
        "..",
        "rival/x",
        "acme\\..\\rival",
        ".acme",
    ] {
        let (s, v) = events(&acme, &event("t", Some(bad), "complained"));
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(
            v["errors"][0]["reason"], "invalid_workspace_id",
            "{bad}: {v}"
        );
    }

    // The callback form (`token=`, documented as weaker) follows the same rule.
    let form = "event=complained&when=1763632800&email=cb%40example.com";
    let cb = |q: &str| {
        answer(&common::post_raw(
            &addr,
            &format!("/webhooks/callback?{q}"),
            &[],
            form,
        ))
    };
    let (s, v) = cb(&format!("campaign_id=c1&workspace_id=rival&token={acme}"));
    assert_eq!((s, v["field"].as_str()), (403, Some("workspace_id")), "{v}");
    let (s, v) = cb(&format!("campaign_id=c1&token={acme}"));
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");

    // The signature form: A's key, A's event; a tampered body, a stale timestamp and
    // B's key naming A are refused.
    let key = WebhookCredential {
        name: "acme-esp".into(),
        workspace: "acme".into(),
        sha256: acme_key.clone(),
    };
    let signed = |cred: &WebhookCredential, t: i64, signed_body: &str, sent_body: &str| {
        let sig = format!(
            "Broadside-Signature: {}",
            signature_header(cred, t, signed_body.as_bytes())
        );
        answer(&common::post_raw(
            &addr,
            "/webhooks/events",
            &[sig],
            sent_body,
        ))
    };
    let now = chrono::Utc::now().timestamp();
    let body = event("a-signed", None, "complained");
    let (s, v) = signed(&key, now, &body, &body);
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    stored.insert("a-signed");
    let other = event("a-tampered", None, "complained");
    let (s, v) = signed(&key, now, &body, &other);
    assert_eq!(
        (s, v["reason"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let stale = event("a-stale", None, "complained");
    let (s, v) = signed(&key, now - 301, &stale, &stale);
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("300 s"), "{v}");
    let rival_key = WebhookCredential {
        name: "rival-esp".into(),
        workspace: "rival".into(),
        sha256: broadside_analytics::api::token_hash(&rival),
    };
    let into_a = event("r-into-a", Some("acme"), "complained");
    let (s, v) = signed(&rival_key, now, &into_a, &into_a);
    assert_eq!((s, v["workspace_id"].as_str()), (403, Some("rival")), "{v}");

    // Unknown credentials and oversized bodies.
    let (s, v) = events(
        "bswh_not-a-credential-at-all",
        &event("u", Some("acme"), "opened"),
    );
    assert_eq!(
        (s, v["reason"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (s, v) = answer(&common::post_raw(&addr, "/webhooks/events", &[], "[]"));
    assert_eq!(s, 401, "{v}");
    let big = format!("[{}]", vec![event("big", None, "opened"); 40].join(","));
    assert!(big.len() > 4096);
    // Answered before the body is read: the server may reset the connection after answering.
    let (s, v) = answer(&exchange(
        &addr,
        &format!(
            "POST /webhooks/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {acme}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
            big.len()
        ),
    ));
    assert_eq!(
        (s, v["reason"].as_str()),
        (413, Some("body_too_large")),
        "{v}"
    );

    // The counters the refusals went to.
    let stats = |token: &str| {
        answer(&exchange(
            &addr,
            &format!(
                "GET /webhooks/stats HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            ),
        ))
    };
    let (s, a) = stats(&acme);
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["workspace_id"], "acme");
    assert_eq!(a["counts"]["accepted"], 4, "{a}");
    assert_eq!(a["counts"]["refused_foreign_workspace"], 3, "{a}");
    assert_eq!(a["counts"]["refused_foreign_events"], 4, "{a}");
    assert_eq!(a["counts"]["refused_invalid"], 6, "{a}");
    assert_eq!(a["server"]["refused_unauthorized"], 4, "{a}");
    assert_eq!(a["server"]["refused_too_large"], 1, "{a}");
    let (_, r) = stats(&rival);
    assert_eq!(r["counts"]["accepted"], 0, "{r}");
    assert_eq!(r["counts"]["refused_foreign_workspace"], 1, "{r}");

    let mut server = server;
    assert!(server.terminate(Duration::from_secs(30)).success());
    let ids = pyarrow_ids(&store);
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["acme"], "{ids:?}");
    let mut acme_ids = ids["acme"].clone();
    acme_ids.sort();
    let cb_id = acme_ids
        .iter()
        .find(|i| i.starts_with("cb-"))
        .cloned()
        .expect("the callback's event");
    let mut want: Vec<String> = stored.iter().map(|s| s.to_string()).collect();
    want.push(cb_id);
    want.sort();
    assert_eq!(acme_ids, want);
    // Nothing outside the store's workspace folders either.
    let dirs: Vec<String> = std::fs::read_dir(store.join("events"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(dirs, ["workspace_id=acme"]);
    assert!(!store.join("rival").exists());
}

/// Sends a raw request and returns what was read until the server closed, even when it
/// closed with a reset (as after answering without reading a large body).
fn exchange(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(request.as_bytes());
    read_answer(&mut s)
}

fn read_answer(s: &mut std::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP POST that may fail: `Some(status)` when an answer was read.
fn try_post(addr: &str, auth: &str, body: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "POST /webhooks/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAuthorization: Bearer {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    read_answer(&mut s).split(' ').nth(1)?.parse().ok()
}

/// SIGTERM in the middle of a burst of webhook posts: `serve` stops accepting, answers what
/// it took, exits cleanly, and every event it acknowledged (2xx) is in the store.
#[test]
fn sigterm_during_a_webhook_burst_loses_nothing_acknowledged() {
    const SENDERS: usize = 6;
    const PER_REQUEST: usize = 20;
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let secret = "burst-test-secret-0123456789";
    let mut server = common::Server::start(
        &["--store", store.to_str().unwrap(), "--rollup-every", "0"],
        &[
            ("BROADSIDE_WEBHOOK_SECRET", secret),
            ("BROADSIDE_WEBHOOK_WORKSPACE", "acme"),
        ],
    );
    let addr = server.addr.clone();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let (addr, acked, answered, stop) =
                (addr.clone(), acked.clone(), answered.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut failures_in_a_row = 0;
                for r in 0.. {
                    if stop.load(Ordering::Relaxed) || failures_in_a_row >= 20 {
                        break;
                    }
                    let ids: Vec<String> = (0..PER_REQUEST)
                        .map(|i| format!("s{t}-r{r}-e{i}"))
                        .collect();
                    let body = format!(
                        "[{}]",
                        ids.iter()
                            .map(|id| event(id, None, "complained"))
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                    match try_post(&addr, secret, &body) {
                        Some(s) if (200..300).contains(&s) => {
                            failures_in_a_row = 0;
                            answered.fetch_add(1, Ordering::Relaxed);
                            acked.lock().unwrap().extend(ids);
                        }
                        Some(s) => panic!("serve answered {s} during the burst"),
                        // Refused or cut: the server is going away; nothing was acknowledged.
                        None => failures_in_a_row += 1,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::Relaxed) < 30 {
        assert!(Instant::now() < deadline, "the burst did not get going");
        std::thread::yield_now();
    }
    let status = server.terminate(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    assert!(status.success(), "serve exited with {status}");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 30 * PER_REQUEST);
    let ids = pyarrow_ids(&store);
    let stored: BTreeSet<&str> = ids["acme"].iter().map(|s| s.as_str()).collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events missing, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
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
        &[
            ("BROADSIDE_WEBHOOK_SECRET", secret),
            ("BROADSIDE_WEBHOOK_WORKSPACE", "stats"),
        ],
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

    // The gate itself: slow queries hold their places while they run; a third query of the same
    // token is turned away (per token), then one of another token once the server runs
    // `overall` queries. 10¹² rows: no host finishes them before the time limit, so each holds
    // its place for the whole of it (10⁹ rows could end early on a fast, idle host).
    let slow = format!("{v}SELECT max(a.x + b.x + c.x + d.x) AS m FROM v a, v b, v c, v d");
    let send = |token: &'static str, q: String| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let bearer = format!("Bearer token-{token}");
            let ws = token.replace('-', "_");
            let headers = [("Authorization", bearer.as_str()), ("workspace_id", &ws)];
            let body = serde_json::json!({ "sql": q }).to_string();
            http(&addr, "POST", "/sql", &headers, &body)
        })
    };
    // Until the server runs `n` SQL queries, as its metrics say (served by the HTTP runtime,
    // while the plans run on the SQL one).
    let running = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(timeout_secs / 2);
        loop {
            let (status, _, text) = http(&addr, "GET", "/metrics", &[], "");
            assert_eq!(status, 200, "{text}");
            if text
                .lines()
                .any(|l| l == format!("broadside_sql_queries_running {n}"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "never {n} SQL queries running");
            // Polling another thread's progress, not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // One more query of `token` is turned away at the gate, at once, naming the limit.
    let turned_away = |token: &str, word: &str| {
        let bearer = format!("Bearer token-{token}");
        let ws = token.replace('-', "_");
        let headers = [("Authorization", bearer.as_str()), ("workspace_id", &ws)];
        let (status, head, text) = http(
            &addr,
            "POST",
            "/sql",
            &headers,
            r#"{"sql": "SELECT 1 AS one"}"#,
        );
        assert_eq!(status, 429, "{token}: {text}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(text.contains(word), "{text}");
    };
    let held: Vec<_> = (0..per_token)
        .map(|_| send("flood-a", slow.clone()))
        .collect();
    running(per_token);
    turned_away("flood-a", "per-token limit");
    let held_b: Vec<_> = (0..overall - per_token)
        .map(|_| send("flood-b", slow.clone()))
        .collect();
    running(overall);
    turned_away("flood-b", "overall limit");
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
