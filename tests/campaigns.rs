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

/// The run id the spec executor gives a sending.
fn sending_run_id(sending: &Value) -> String {
    let created = chrono::DateTime::parse_from_rfc3339(sending["created_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    format!("sending-{}-{created}", sending["id"])
}

#[test]
fn a_sending_with_conditions_sends_exactly_the_rows_they_select() {
    let dir = tempfile::tempdir().unwrap();
    // default invalid share: some rows are foreign (country CA) or have bad emails
    let spec = common::generate(dir.path(), 3000, 300, &[]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();

    // The same predicate, computed from the CSV on its own.
    let text = std::fs::read_to_string(dir.path().join("recipients.csv")).unwrap();
    let mut lines = text.lines();
    let header = common::csv_fields(lines.next().unwrap());
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let (email, points, country) = (col("email"), col("points"), col("country"));
    let mut expect: Vec<String> = Vec::new();
    let mut total = 0;
    for l in lines {
        let f = common::csv_fields(l);
        total += 1;
        let p: i64 = f[points].parse().unwrap();
        if f[country] == "US" && (100..1500).contains(&p) {
            expect.push(f[email].trim().to_lowercase());
        }
    }
    assert!(
        expect.len() > 100 && expect.len() < total / 2,
        "{} of {total}",
        expect.len()
    );
    expect.sort();

    // points is a merge field: allowed, as a number, by the fields file
    let fields = dir.path().join("fields.json");
    std::fs::write(
        &fields,
        r#"[{"group": "member_properties", "field": "points", "column": "points", "kind": "integer"}]"#,
    )
    .unwrap();
    let fields = fields.to_str().unwrap();
    let conditions = serde_json::json!([
        {"condition_group": "member_properties", "field": "country", "operator": "eq", "value": "US"},
        {"condition_group": "member_properties", "field": "points", "operator": "gte", "value": 100},
        {"condition_group": "member_properties", "field": "points", "operator": "lt", "value": "1500"}
    ]);
    // one campaign with the conditions inline, one with the same conditions stored
    let store = broadside_campaigns::store::Store::open(std::path::Path::new(db)).unwrap();
    let stored = store
        .create_audience(
            "default",
            "west",
            &serde_json::from_value::<Vec<broadside_campaigns::audience::Condition>>(
                conditions.clone(),
            )
            .unwrap(),
            0,
        )
        .unwrap();
    drop(store);
    let audiences = [
        serde_json::json!({"type": "inline", "conditions": conditions}),
        serde_json::json!({"type": "reference", "id": stored}),
    ];
    let mut ids = Vec::new();
    for (i, a) in audiences.iter().enumerate() {
        let (c, _) = campaign(
            db,
            &["create", "--name", &format!("West {i}"), "--list", "7"],
            true,
        );
        let id = c["id"].as_i64().unwrap().to_string();
        std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
        let (s, _) = campaign(
            db,
            &[
                "schedule",
                &id,
                "--now",
                "--ready",
                "--audience",
                &a.to_string(),
                "--audience-fields",
                fields,
            ],
            true,
        );
        assert_eq!(s["sending"]["audience"], *a, "{s}");
        ids.push(id);
    }
    campaign(
        db,
        &["run", "--specs", specs, "--audience-fields", fields],
        true,
    );

    for id in &ids {
        let (st, _) = campaign(db, &["status", id], true);
        let sending = &st["sendings"][0];
        assert_eq!(sending["status"], "transmitted", "{st}");
        assert_eq!(sending["recipient_count"], expect.len() as u64, "{st}");
        let run_id = sending_run_id(sending);
        let store = dir.path().join("store");
        // one ledger row per audience member, nobody else; rows numbered in source order
        let ledger = common::read_ledger(&store, "demo", "generated-42", &run_id);
        let rows: Vec<u64> = ledger.iter().map(|r| r.row).collect();
        assert_eq!(rows, (0..expect.len() as u64).collect::<Vec<_>>());
        let mut keys: Vec<String> = ledger
            .iter()
            .map(|r| r.key.clone().unwrap_or_default().trim().to_string())
            .collect();
        keys.sort();
        assert_eq!(keys, expect);
        let record = common::record(&store, "demo", &run_id);
        assert_eq!(record.rows, expect.len() as u64);
        assert!(record.audience.is_some());
        // everything sent went out as a submitted event, and only audience members
        let mut submitted: Vec<String> =
            common::submitted_event_rows(&store, "demo", "generated-42", &run_id)
                .into_iter()
                .map(|(_, email, _)| email.trim().to_lowercase())
                .collect();
        submitted.sort();
        let sent = ledger.iter().filter(|r| r.decision == "sent").count();
        assert!(sent > 0);
        assert_eq!(submitted.len(), sent);
        assert!(submitted.iter().all(|e| expect.binary_search(e).is_ok()));
    }

    // a field the campaign spec does not map fails the sending, naming the condition
    let (c, _) = campaign(db, &["create", "--name", "Lang", "--list", "7"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    let lang = serde_json::json!({"type": "inline", "conditions": [
        {"condition_group": "member_properties", "field": "country", "operator": "eq", "value": "US"},
        {"condition_group": "member_properties", "field": "language", "operator": "eq", "value": "en"}
    ]});
    campaign(
        db,
        &[
            "schedule",
            &id,
            "--now",
            "--ready",
            "--audience",
            &lang.to_string(),
        ],
        true,
    );
    campaign(db, &["run", "--specs", specs], true);
    let (st, _) = campaign(db, &["status", &id], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "failed", "{st}");
    let err = sending["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(
            "audience.conditions[1].field: member_properties.language is not a known field"
        ),
        "{st}"
    );
    // and a field outside the allow-list is refused when the sending is made
    let (_, err) = campaign(
        db,
        &[
            "schedule",
            &id,
            "--now",
            "--audience",
            r#"{"type": "inline", "conditions": [{"condition_group": "member_properties", "field": "points", "operator": "gte", "value": 100}]}"#,
        ],
        false,
    );
    assert!(
        err.contains("audience.conditions[0].field: member_properties.points is not a known field"),
        "{err}"
    );
}

#[test]
fn an_audience_leaving_batches_empty_sends_and_resumes_only_with_the_same_conditions() {
    let dir = tempfile::tempdir().unwrap();
    // ~4 CSV chunks: an audience of two rows leaves the middle ones empty
    let spec = common::generate(dir.path(), 30_000, 0, &["--invalid-share", "0"]);
    let text = std::fs::read_to_string(dir.path().join("recipients.csv")).unwrap();
    let mut lines = text.lines();
    let header = common::csv_fields(lines.next().unwrap());
    let email = header.iter().position(|h| h == "email").unwrap();
    let rows: Vec<Vec<String>> = lines.map(common::csv_fields).collect();
    let pick = [&rows[5][email], &rows[29_990][email]];
    let write = |name: &str, emails: &[&String]| {
        let p = dir.path().join(name);
        let conds = serde_json::json!([{"condition_group": "member_properties",
            "field": "email", "operator": "in", "value": emails}]);
        std::fs::write(&p, conds.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    let two = write("two.json", &pick);
    let one = write("one.json", &pick[..1]);
    let spec = spec.to_str().unwrap();
    common::run(
        &["send", spec, "--run-id", "pair", "--audience", &two],
        true,
    );
    let store = dir.path().join("store");
    let ledger = common::read_ledger(&store, "demo", "generated-42", "pair");
    let keys: Vec<(u64, String)> = ledger
        .iter()
        .map(|r| (r.row, r.key.clone().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            (0, pick[0].trim().to_lowercase()),
            (1, pick[1].trim().to_lowercase())
        ]
    );
    assert_eq!(common::record(&store, "demo", "pair").rows, 2);

    // As if the process died after writing everything: a resume with other conditions is
    // refused, one with the same conditions replays to the same files.
    let rec = store.join("campaign_runs/workspace_id=demo/pair.json");
    let json = std::fs::read_to_string(&rec).unwrap();
    assert!(json.contains("\"status\":\"done\""), "{json}");
    std::fs::write(
        &rec,
        json.replace("\"status\":\"done\"", "\"status\":\"running\""),
    )
    .unwrap();
    let out = common::run(
        &["send", spec, "--run-id", "pair", "--audience", &one],
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the sending's audience changed since the run started"),
        "{err}"
    );
    let out = common::run(&["send", spec, "--run-id", "pair"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the sending's audience changed since the run started"),
        "{err}"
    );
    common::run(
        &["send", spec, "--run-id", "pair", "--audience", &two],
        true,
    );
    let again = common::record(&store, "demo", "pair");
    assert_eq!(again.status, broadside_pipeline::run::RunStatus::Done);
    assert_eq!((again.rows, again.attempts), (2, 2));
    assert_eq!(
        common::read_ledger(&store, "demo", "generated-42", "pair"),
        ledger
    );
}
