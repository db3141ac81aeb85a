//! `broadside campaign …` end to end: a campaign scheduled from the CLI is sent through the
//! real send pipeline by a scheduler pass, exactly once, and its state follows.

mod common;

use serde_json::Value;

fn campaign(db: &str, args: &[&str], ok: bool) -> (Value, String) {
    let mut all = vec!["campaign", "--db", db];
    all.extend_from_slice(args);
    let out = common::run(&all, ok);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (serde_json::from_str(&text).unwrap_or(Value::Null), stderr)
}

#[test]
fn a_ready_campaign_is_sent_once_through_its_spec() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 300, 30, &[]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();

    let (c, _) = campaign(db, &["create", "--name", "Spring", "--list", "7"], true);
    assert_eq!(c["state"], "DRAFT");
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();

    let (s, _) = campaign(db, &["schedule", &id, "--now"], true);
    assert_eq!(s["campaign"]["state"], "SCHEDULED");
    assert_eq!(s["sending"]["status"], "scheduled");

    // not approved yet: the scheduler leaves it alone
    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 0 steps"), "{log}");

    let (c, _) = campaign(db, &["state", &id, "READY"], true);
    assert_eq!(c["state"], "READY");
    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 2 steps"), "{log}");

    let (st, _) = campaign(db, &["status", &id], true);
    assert_eq!(st["campaign"]["state"], "DONE");
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "transmitted");
    assert_eq!(sending["recipient_count"], 300);
    let steps: Vec<&str> = sending["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["prepare", "transmit"]);
    let sending_id = sending["id"].as_i64().unwrap();
    let ifur: Vec<_> = std::fs::read_dir(dir.path().join("megasys/hot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(&format!("_sending-{sending_id}-")) && n.ends_with(".ifur"))
        .collect();
    assert!(
        !ifur.is_empty(),
        "the send ran under run id sending-{sending_id}"
    );

    // a second pass has nothing to do, and a finished campaign cannot be cancelled
    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 0 steps"), "{log}");
    let (_, err) = campaign(db, &["cancel", &id], false);
    assert!(err.contains("cannot go from DONE to CANCELLED"), "{err}");
}

#[test]
fn schedule_errors_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let (c, _) = campaign(db, &["create", "--name", "No list"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    let (_, err) = campaign(db, &["schedule", &id, "--in", "3 fortnights"], false);
    assert!(
        err.contains("schedule.in: \"3 fortnights\" has an unknown unit"),
        "{err}"
    );
    let (_, err) = campaign(db, &["schedule", &id, "--now"], false);
    assert!(err.contains("no list to fall back to"), "{err}");
    let (_, err) = campaign(
        db,
        &["create", "--name", "x", "--when", "2030-01-01 10:00:00"],
        false,
    );
    assert!(
        err.contains("--when: \"2030-01-01 10:00:00\" has no UTC offset"),
        "{err}"
    );
}

/// Requests a callback receiver got: raw query string and body.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, String)>>>;

/// Starts an HTTP receiver on 127.0.0.1 in its own runtime; returns its URL and what it got.
fn callback_receiver() -> (tokio::runtime::Runtime, String, Received) {
    use axum::extract::{RawQuery, State};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let got: Received = Default::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(got): State<Received>, RawQuery(q): RawQuery, body: String| async move {
                    got.lock().unwrap().push((q, body));
                    "ok"
                },
            ),
        )
        .with_state(got.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!(
        "http://{}/hook?source=broadside",
        listener.local_addr().unwrap()
    );
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, url, got)
}

#[test]
fn submitted_events_reach_the_event_callback() {
    let (_rt, url, got) = callback_receiver();
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 40, 0, &["--invalid-share", "0"]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    let (c, _) = campaign(
        db,
        &[
            "create",
            "--name",
            "Cb",
            "--list",
            "1",
            "--event-callback",
            &url,
        ],
        true,
    );
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    campaign(db, &["schedule", &id, "--now", "--ready"], true);
    campaign(db, &["run", "--specs", specs], true);

    let (st, _) = campaign(db, &["status", &id], true);
    assert_eq!(st["sendings"][0]["status"], "transmitted");
    let sending = &st["sendings"][0];
    let created = chrono::DateTime::parse_from_rfc3339(sending["created_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let run_id = format!("sending-{}-{created}", sending["id"]);
    let mut submitted: Vec<String> =
        common::submitted_event_rows(&dir.path().join("store"), "demo", "generated-42", &run_id)
            .into_iter()
            .map(|(_, email, _)| email)
            .collect();
    let got = got.lock().unwrap().clone();
    assert!(
        !got.is_empty(),
        "the run flushes its callbacks before exiting"
    );
    let mut emails = Vec::new();
    for (query, body) in &got {
        assert_eq!(
            query.as_deref(),
            Some("source=broadside"),
            "query forwarded"
        );
        let pairs = form_pairs(body);
        assert_eq!(pairs[0], ("event".into(), "submitted".into()));
        assert_eq!(pairs[1].0, "when");
        for (i, (k, v)) in pairs[2..].iter().enumerate() {
            assert_eq!(k, &format!("email[{i}]"));
            emails.push(v.clone());
        }
    }
    // every submitted recipient exactly once, and nobody else
    emails.sort();
    submitted.sort();
    assert!(!submitted.is_empty());
    assert_eq!(emails, submitted);
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form_pairs(body: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}
