//! `broadside campaign …` end to end: a campaign scheduled from the CLI is sent through the
//! real send pipeline by a scheduler pass, exactly once, and its state follows.

mod common;

use serde_json::Value;

/// The workspace of the generated specs, where these tests' campaigns live.
const WS: &str = "demo";

fn campaign(db: &str, args: &[&str], ok: bool) -> (Value, String) {
    campaign_in(db, WS, args, ok)
}

fn campaign_in(db: &str, ws: &str, args: &[&str], ok: bool) -> (Value, String) {
    let mut all = vec!["campaign", "--db", db, "--workspace", ws];
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
    // preparation's decisions cover every resolved row
    let decided: u64 = sending["decisions"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(decided, 300, "{sending}");
    // the sending names its send run and leads to it in the analytics API
    let run = sending_run_id(sending);
    assert_eq!(sending["run_id"], run.as_str());
    assert_eq!(sending["ledger_campaign_id"], "generated-42");
    assert_eq!(
        sending["links"],
        serde_json::json!({
            "run": format!("/campaign-runs/{run}"),
            "statistics": "/campaign-statistics/generated-42",
            "recipient_logs": format!("/campaign-recipient-logs/?run_id={run}"),
        })
    );
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
fn a_later_sending_skips_whom_an_earlier_one_reached_unless_it_includes_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 300, 30, &[]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    let (c, _) = campaign(db, &["create", "--name", "Again", "--list", "7"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();

    // Three sendings of one campaign (a finished campaign takes no more), run in the order
    // they were added: the default, the default again, and one that includes everyone.
    let mut sendings = Vec::new();
    for extra in [&[][..], &[][..], &["--include-sent"][..]] {
        let mut args = vec!["schedule", &id, "--now", "--ready"];
        args.extend_from_slice(extra);
        let (s, _) = campaign(db, &args, true);
        assert_eq!(s["sending"]["exclude_sent"], extra.is_empty(), "{s}");
        sendings.push(s["sending"].clone());
    }
    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 6 steps"), "{log}");
    let ledger =
        |run: &str| common::read_ledger(&dir.path().join("store"), "demo", "generated-42", run);
    let count = |run: &str, decision: &str, reason: Option<&str>| {
        let ledger = ledger(run);
        assert_eq!(ledger.len(), 300);
        ledger
            .iter()
            .filter(|r| r.decision == decision && r.reason.as_deref() == reason)
            .count()
    };
    let runs: Vec<String> = sendings.iter().map(sending_run_id).collect();
    let sent = count(&runs[0], "sent", None);
    assert!(sent > 200, "{sent}");
    assert_eq!(count(&runs[1], "sent", None), 0);
    assert_eq!(count(&runs[1], "skipped", Some("already_sent")), sent);
    let first = format!("sent by run {}", runs[0]);
    assert!(ledger(&runs[1])
        .iter()
        .filter(|r| r.reason.as_deref() == Some("already_sent"))
        .all(|r| r.detail.as_deref() == Some(first.as_str())));
    assert_eq!(count(&runs[2], "sent", None), sent);
    assert_eq!(count(&runs[2], "skipped", Some("already_sent")), 0);
}

#[test]
fn a_spec_of_another_workspace_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 20, 0, &[]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    // a campaign of workspace `rival` whose spec file is the `demo` workspace's
    let (c, _) = campaign_in(db, "rival", &["create", "--name", "X", "--list", "7"], true);
    let id = c["id"].as_i64().unwrap();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    campaign_in(
        db,
        "rival",
        &["schedule", &id.to_string(), "--now", "--ready"],
        true,
    );
    campaign_in(db, "rival", &["run", "--specs", specs], true);
    let (st, _) = campaign_in(db, "rival", &["status", &id.to_string()], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "failed", "{st}");
    let err = sending["error"].as_str().unwrap();
    assert!(
        err.contains(&format!(
            "workspace_id \"demo\" is not the workspace of campaign {id} (\"rival\")"
        )),
        "{err}"
    );
    assert!(sending["run_id"].is_null(), "{sending}");
    // nothing was written for either workspace
    assert!(!dir.path().join("store").exists());
    assert!(!dir.path().join("megasys").exists());
}

#[test]
fn ready_is_refused_with_what_is_missing_until_the_spec_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 20, 0, &[]);
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let specs_s = specs.to_str().unwrap();
    let (c, _) = campaign(db, &["create", "--name", "R", "--list", "7"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    let target = specs.join(format!("{id}.toml"));

    let (_, err) = campaign(
        db,
        &["schedule", &id, "--now", "--ready", "--specs", specs_s],
        false,
    );
    assert!(
        err.contains(&format!(
            "campaign {id} is not ready: no campaign spec {}",
            target.display()
        )),
        "{err}"
    );
    // refused before anything changed: no sending, still a draft
    let (st, _) = campaign(db, &["status", &id], true);
    assert_eq!(st["campaign"]["state"], "DRAFT", "{st}");
    assert_eq!(st["sendings"], serde_json::json!([]));

    // the spec of another workspace, moved away from its source file: both are named
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &target,
        text.replace("workspace_id = \"demo\"", "workspace_id = \"rival\""),
    )
    .unwrap();
    campaign(db, &["schedule", &id, "--now"], true);
    let (_, err) = campaign(db, &["state", &id, "READY", "--specs", specs_s], false);
    assert!(
        err.contains(&format!(
            "workspace_id \"rival\" is not the workspace of campaign {id} (\"demo\")"
        )),
        "{err}"
    );
    let source = specs.join("recipients.csv");
    assert!(
        err.contains(&format!("source.path {} is not a file", source.display())),
        "{err}"
    );
    assert!(err.contains("suppression[0].path"), "{err}");
    let (st, _) = campaign(db, &["status", &id], true);
    assert_eq!(st["campaign"]["state"], "SCHEDULED", "{st}");

    // once it resolves, READY is taken
    // (relative paths resolve against the spec's folder)
    let fixed = text.replace("path = \"", &format!("path = \"{}/", dir.path().display()));
    std::fs::write(&target, fixed).unwrap();
    let (c, err) = campaign(db, &["state", &id, "READY", "--specs", specs_s], true);
    assert_eq!(c["state"], "READY", "{err}");
}

/// One HTTP/1.1 request in workspace `WS`; the status and the JSON body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let out = common::request_raw(addr, method, path, &[format!("workspace_id: {WS}")], body);
    let status = out[9..12].parse().unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn serve_refuses_ready_for_a_spec_writing_to_another_store() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 20, 0, &[]);
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let store = dir.path().join("store");
    let db = dir.path().join("campaigns.db");
    let server = common::Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--campaigns",
            db.to_str().unwrap(),
            "--campaign-specs",
            specs.to_str().unwrap(),
            "--rollup-every",
            "0",
        ],
        &[],
    );
    let (status, c) = http(
        &server.addr,
        "POST",
        "/campaign",
        r#"{"name": "S", "list": 7}"#,
    );
    assert_eq!(status, 201, "{c}");
    let url = format!("/campaign/{}", c["id"]);
    // the spec in the specs folder, its inputs found, but `store = "store"` now resolves to
    // <specs>/store, not the store this server reads
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("path = \"", &format!("path = \"{}/", dir.path().display()));
    let target = specs.join(format!("{}.toml", c["id"]));
    std::fs::write(&target, &text).unwrap();
    let (status, v) = http(&server.addr, "PUT", &url, r#"{"state": "SCHEDULED"}"#);
    assert_eq!(status, 200, "{v}");
    let (status, v) = http(&server.addr, "PUT", &url, r#"{"state": "READY"}"#);
    assert_eq!(status, 409, "{v}");
    let missing = v["missing"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{v}");
    let m = missing[0].as_str().unwrap();
    assert!(
        m.contains(&format!("output.store {}", specs.join("store").display()))
            && m.contains("is not the store this server reads"),
        "{m}"
    );
    // pointed at the served store, it is ready
    let fixed = text.replace(
        "store = \"store\"",
        &format!("store = {:?}", store.display().to_string()),
    );
    std::fs::write(&target, fixed).unwrap();
    let (status, v) = http(&server.addr, "PUT", &url, r#"{"state": "READY"}"#);
    assert_eq!((status, v["state"].as_str()), (200, Some("READY")), "{v}");
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
    let (rt, addr) = common::serve_local(app);
    let url = format!("http://{addr}/hook?source=broadside");
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

/// A run's ledger rows (campaign `generated-42` of workspace `demo`) and their
/// (row, key, decision).
fn ledger_keys(
    dir: &std::path::Path,
    run_id: &str,
) -> (Vec<common::LedgerRow>, Vec<(u64, String, String)>) {
    let ledger = common::read_ledger(&dir.join("store"), "demo", "generated-42", run_id);
    let keys = ledger
        .iter()
        .map(|r| (r.row, r.key.clone().unwrap(), r.decision.clone()))
        .collect();
    (ledger, keys)
}

/// Sets a finished run's record back to running, as if the process died before recording
/// the end.
fn mark_running(store: &std::path::Path, run_id: &str) {
    let rec = store.join(format!("campaign_runs/workspace_id=demo/{run_id}.json"));
    let json = std::fs::read_to_string(&rec).unwrap();
    assert!(json.contains("\"status\":\"done\""), "{json}");
    std::fs::write(
        &rec,
        json.replace("\"status\":\"done\"", "\"status\":\"running\""),
    )
    .unwrap();
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
            WS,
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
        // Each service campaign sends as its own campaign id (one id's sendings never reach
        // a key twice).
        copy_spec_as(
            &spec,
            &dir.path().join(format!("{id}.toml")),
            &format!("west-{id}"),
        );
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
        let ledger = common::read_ledger(&store, "demo", &format!("west-{id}"), &run_id);
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
            common::submitted_event_rows(&store, "demo", &format!("west-{id}"), &run_id)
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
    mark_running(&store, "pair");
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

/// The form posts a receiver got, as (query, event, addresses), in arrival order.
fn posts(got: &Received) -> Vec<(Option<String>, String, Vec<String>)> {
    got.lock()
        .unwrap()
        .iter()
        .map(|(q, body)| {
            let pairs = form_pairs(body);
            assert_eq!(pairs[0].0, "event", "{body}");
            assert_eq!(pairs[1].0, "when", "{body}");
            let addrs = pairs[2..]
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    assert_eq!(k, &format!("email[{i}]"), "{body}");
                    v.clone()
                })
                .collect();
            (q.clone(), pairs[0].1.clone(), addrs)
        })
        .collect()
}

/// One NDJSON event line.
fn event_line(ws: &str, campaign: &str, run: Option<&str>, email: &str, kind: &str) -> String {
    let mut v = serde_json::json!({
        "event_id": format!("e-{}", xxhash_rust::xxh3::xxh3_64(format!("{ws}{campaign}{run:?}{email}{kind}").as_bytes())),
        "workspace_id": ws, "campaign_id": campaign, "email": email,
        "event_type": kind, "ts": "2026-11-30T10:00:00Z"
    });
    if let Some(r) = run {
        v["run_id"] = r.into();
    }
    if kind == "bounced" {
        v["bounce_type"] = "hard".into();
    }
    if kind == "clicked" {
        v["url"] = "https://example.com/offer".into();
    }
    v.to_string()
}

#[test]
fn engagement_events_reach_the_event_callback_once_across_passes_and_restarts() {
    use broadside_campaigns::callbacks::{CallbackConfig, CallbackQueue};
    use broadside_campaigns::relay::{EventRelay, RelayConfig};

    let (rt, url, got) = callback_receiver();
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 40, 0, &["--invalid-share", "0"]);
    let db = dir.path().join("campaigns.db");
    let db_s = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    let store = dir.path().join("store");

    // campaign A has a callback, campaign B has none; both are sent through the same spec
    let mut runs = Vec::new();
    for (name, cb) in [("A", Some(url.as_str())), ("B", None)] {
        let mut args = vec!["create", "--name", name, "--list", "1"];
        if let Some(u) = cb {
            args.extend(["--event-callback", u]);
        }
        let (c, _) = campaign(db_s, &args, true);
        let id = c["id"].as_i64().unwrap().to_string();
        copy_spec_as(
            &spec,
            &dir.path().join(format!("{id}.toml")),
            &format!("cb-{id}"),
        );
        campaign(db_s, &["schedule", &id, "--now", "--ready"], true);
        runs.push(id);
    }
    campaign(db_s, &["run", "--specs", specs], true);
    let mut run_ids = Vec::new();
    for id in &runs {
        let (st, _) = campaign(db_s, &["status", id], true);
        assert_eq!(st["sendings"][0]["status"], "transmitted", "{st}");
        run_ids.push(sending_run_id(&st["sendings"][0]));
    }
    let (run_a, run_b) = (run_ids[0].as_str(), run_ids[1].as_str());
    let (cid_a, cid_b) = (format!("cb-{}", runs[0]), format!("cb-{}", runs[1]));
    let a: Vec<String> = common::submitted_event_rows(&store, "demo", &cid_a, run_a)
        .into_iter()
        .map(|(_, email, _)| email)
        .take(5)
        .collect();
    let b = common::submitted_event_rows(&store, "demo", &cid_b, run_b)[0]
        .1
        .clone();
    assert!(
        posts(&got).iter().all(|p| p.1 == "submitted"),
        "the scheduler pass relays submitted events only"
    );
    got.lock().unwrap().clear();

    let camp = cid_a.as_str();
    let lines = [
        event_line("demo", camp, Some(run_a), &a[0], "delivered"),
        event_line("demo", camp, Some(run_a), &a[1], "delivered"),
        event_line("demo", camp, Some(run_a), &a[2], "delivered"),
        event_line("demo", camp, Some(run_a), &a[0], "opened"),
        event_line("demo", camp, Some(run_a), &a[1], "clicked"),
        event_line("demo", camp, Some(run_a), &a[3], "bounced"),
        // not a callback event
        event_line("demo", camp, Some(run_a), &a[4], "unsubscribed"),
        // campaign B has no callback
        event_line("demo", &cid_b, Some(run_b), &b, "delivered"),
        // the run of A, but stored under another workspace or claiming another campaign
        event_line("other", camp, Some(run_a), "x1@elsewhere.test", "delivered"),
        event_line(
            "demo",
            "someone-else",
            Some(run_a),
            "x2@elsewhere.test",
            "delivered",
        ),
        // no sending's run
        event_line(
            "demo",
            camp,
            Some("sending-999-1"),
            "x3@elsewhere.test",
            "delivered",
        ),
        event_line("demo", camp, None, "x4@elsewhere.test", "opened"),
    ];
    let ingest = |name: &str, lines: &[String]| {
        let f = dir.path().join(name);
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let store = store.to_str().unwrap();
        common::run(
            &["ingest", "--store", store, "--from", f.to_str().unwrap()],
            true,
        );
    };
    ingest("events-1.ndjson", &lines);

    let cfg = CallbackConfig {
        window_secs: 300,
        backoff_ms: 1,
        ..Default::default()
    };
    let (queue, worker) = CallbackQueue::new(cfg.clone(), std::sync::Arc::new(|| 1_000)).unwrap();
    rt.spawn(worker.run());
    let relay = EventRelay::new(
        &db,
        &store.join("events"),
        queue.clone(),
        RelayConfig::new("relay-1"),
    )
    .unwrap();
    let pass = relay.relay_once(2_000).unwrap();
    assert_eq!(
        (pass.busy, pass.files, pass.queued, pass.unreadable),
        (false, 2, 6, 0),
        "one file per workspace; submitted files are not the relay's: {pass:?}"
    );
    let mut got_posts = posts(&got);
    got_posts.sort();
    let q = Some("source=broadside".to_string());
    let mut expect = vec![
        (q.clone(), "delivered".to_string(), a[..3].to_vec()),
        (q.clone(), "opened".to_string(), vec![a[0].clone()]),
        (q.clone(), "clicked".to_string(), vec![a[1].clone()]),
        (q.clone(), "bounced".to_string(), vec![a[3].clone()]),
    ];
    expect.sort();
    assert_eq!(got_posts, expect);

    // a second pass has nothing new
    let pass = relay.relay_once(2_100).unwrap();
    assert_eq!((pass.files, pass.queued), (0, 0), "{pass:?}");
    assert_eq!(got.lock().unwrap().len(), 4);

    // while it holds the lease, another process does not relay
    let (q2, w2) = CallbackQueue::new(cfg.clone(), std::sync::Arc::new(|| 1_000)).unwrap();
    rt.spawn(w2.run());
    let other =
        EventRelay::new(&db, &store.join("events"), q2, RelayConfig::new("relay-2")).unwrap();
    assert!(other.relay_once(2_200).unwrap().busy);
    drop(other);

    // a restart: a new relay (new queue, new holder) over the same campaign store
    drop(relay);
    let (q3, w3) = CallbackQueue::new(cfg, std::sync::Arc::new(|| 1_000)).unwrap();
    rt.spawn(w3.run());
    let relay =
        EventRelay::new(&db, &store.join("events"), q3, RelayConfig::new("relay-3")).unwrap();
    let pass = relay.relay_once(2_300).unwrap();
    assert_eq!(
        (pass.busy, pass.files, pass.queued),
        (false, 0, 0),
        "{pass:?}"
    );
    assert_eq!(
        got.lock().unwrap().len(),
        4,
        "nothing replayed after a restart"
    );

    // new events land in a new file: only they are posted
    ingest(
        "events-2.ndjson",
        &[event_line("demo", camp, Some(run_a), &a[4], "opened")],
    );
    let pass = relay.relay_once(2_400).unwrap();
    assert_eq!((pass.files, pass.queued), (1, 1), "{pass:?}");
    let all = posts(&got);
    assert_eq!(all.len(), 5);
    assert_eq!(
        all[4],
        (q.clone(), "opened".to_string(), vec![a[4].clone()])
    );

    // `broadside serve --campaigns` runs the relay over its --store on its own
    drop(relay);
    ingest(
        "events-3.ndjson",
        &[event_line("demo", camp, Some(run_a), &a[2], "clicked")],
    );
    let _serve = common::Server::start(
        &[
            "--campaigns",
            db_s,
            "--store",
            store.to_str().unwrap(),
            "--callback-relay-every",
            "1",
        ],
        &[],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while got.lock().unwrap().len() < 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let all = posts(&got);
    assert_eq!(
        all.len(),
        6,
        "the serving process relayed the new file: {all:?}"
    );
    assert_eq!(all[5], (q, "clicked".to_string(), vec![a[2].clone()]));
}

#[test]
fn inline_recipients_are_sent_with_their_properties() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, header, rows) = member_data(dir.path(), 50);
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let member = |k: usize, n: &str| rows[k][col(n)].trim().to_string();

    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    let (c, _) = campaign(db, &["create", "--name", "Inline"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    let recipients = serde_json::json!([
        {"email": "Ann.Inline@inline.test", "properties": {"first_name": "Ann", "points": 7, "tier": "gold"}},
        {"email": "bob@inline.test", "properties": {"last_name": "Builder, Jr.", "tier": "silver \"2\""}},
        {"member_id": 1003, "properties": {"tier": "member", "points": "99"}},
        {"member_id": 1004, "properties_mode": "replace", "properties": {"tier": "replaced"}}
    ]);
    let (s, _) = campaign(
        db,
        &[
            "schedule",
            &id,
            "--now",
            "--ready",
            "--recipients",
            &recipients.to_string(),
        ],
        true,
    );
    assert_eq!(s["sending"]["status"], "scheduled", "{s}");
    campaign(db, &["run", "--specs", specs], true);
    let (st, _) = campaign(db, &["status", &id], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "transmitted", "{st}");
    assert_eq!(sending["recipient_count"], 4, "{st}");
    let run_id = sending_run_id(sending);

    // one ledger row per inline recipient, in the order given, all sent
    let (_, keys) = ledger_keys(dir.path(), &run_id);
    let m3 = member(3, "email").to_lowercase();
    let m4 = member(4, "email").to_lowercase();
    let expect_keys = [
        "ann.inline@inline.test".to_string(),
        "bob@inline.test".into(),
        m3.clone(),
        m4.clone(),
    ];
    assert_eq!(
        keys,
        expect_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u64, k.clone(), "sent".to_string()))
            .collect::<Vec<_>>()
    );

    // exactly those recipients in the IFUR files, with their properties as merge fields
    let details = ifur_details(&dir.path().join("megasys/hot"), &run_id);
    assert_eq!(details.len(), 4, "{details:?}");
    let get = |k: &str, f: &str| details[k].get(f).cloned().unwrap_or_default();
    let ann = "ann.inline@inline.test";
    assert_eq!(
        (get(ann, "first_name"), get(ann, "points"), get(ann, "tier")),
        ("Ann".into(), "7".into(), "gold".into())
    );
    let bob = "bob@inline.test";
    assert_eq!(
        (get(bob, "last_name"), get(bob, "tier"), get(bob, "points")),
        ("Builder, Jr.".into(), "silver \"2\"".into(), String::new())
    );
    // a member keeps its data; properties extend it (a key given wins) ...
    assert_eq!(
        (
            get(&m3, "first_name"),
            get(&m3, "points"),
            get(&m3, "tier"),
            get(&m3, "member_id")
        ),
        (
            member(3, "first_name"),
            "99".into(),
            "member".into(),
            "1003".into()
        )
    );
    // ... or replace its merge fields
    assert_eq!(
        (
            get(&m4, "first_name"),
            get(&m4, "points"),
            get(&m4, "tier"),
            get(&m4, "member_id")
        ),
        (
            member(4, "first_name"),
            String::new(),
            "replaced".into(),
            String::new()
        )
    );

    // a member the source does not have fails the sending, naming the recipient
    let (c, _) = campaign(db, &["create", "--name", "Ghost"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    campaign(
        db,
        &[
            "schedule",
            &id,
            "--now",
            "--ready",
            "--recipients",
            r#"[{"email": "c@inline.test", "properties": {"first_name": "C"}}, {"member_id": 77}]"#,
        ],
        true,
    );
    campaign(db, &["run", "--specs", specs], true);
    let (st, _) = campaign(db, &["status", &id], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "failed", "{st}");
    let err = sending["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("recipients[1]: member 77 is not in the source"),
        "{st}"
    );
}

/// A generated data set of `rows` valid recipients, no holdout, whose source has a `member_id`
/// column (1000, 1001, … in file order) mapped as a merge field; returns the spec and the CSV's
/// header and rows as generated.
fn member_data(
    dir: &std::path::Path,
    rows: u64,
) -> (std::path::PathBuf, Vec<String>, Vec<Vec<String>>) {
    let spec = common::generate(dir, rows, 0, &["--invalid-share", "0"]);
    common::set_spec(&spec, "holdout_percent", "0.0");
    // members are found by a member_id merge field of the spec's source
    common::set_spec(&spec, "points", "\"points\"\nmember_id = \"member_id\"");
    let csv = dir.join("recipients.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut out = String::new();
    for (i, l) in text.lines().enumerate() {
        let extra = if i == 0 {
            "member_id".to_string()
        } else {
            (1000 + i - 1).to_string()
        };
        out.push_str(&format!("{l},{extra}\n"));
    }
    std::fs::write(&csv, out).unwrap();
    let mut lines = text.lines();
    let header = common::csv_fields(lines.next().unwrap());
    let rows = lines.map(common::csv_fields).collect();
    (spec, header, rows)
}

/// The IFUR lines of a run (by recipient key): merge field name → value; a key twice fails.
fn ifur_details(
    hot: &std::path::Path,
    run_id: &str,
) -> std::collections::HashMap<String, std::collections::HashMap<String, String>> {
    let mut details = std::collections::HashMap::new();
    for (name, f) in common::read_ifur_files(hot) {
        if !name.contains(&format!("_{run_id}_")) {
            continue;
        }
        for (key, values) in f.details {
            let fields: std::collections::HashMap<String, String> =
                f.fields.iter().cloned().zip(values).collect();
            assert!(details.insert(key.clone(), fields).is_none(), "{key} twice");
        }
    }
    details
}

/// Copies a SQLite campaign store (and its WAL files, if any) to `to` or back.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let (a, b) = (
            std::path::PathBuf::from(format!("{}{suffix}", from.display())),
            std::path::PathBuf::from(format!("{}{suffix}", to.display())),
        );
        let _ = std::fs::remove_file(&b);
        if a.exists() {
            std::fs::copy(&a, &b).unwrap();
        }
    }
}

#[test]
fn an_audience_and_inline_recipients_are_sent_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, header, rows) = member_data(dir.path(), 50);
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let member = |k: usize, n: &str| rows[k][col(n)].trim().to_string();
    let email = |k: usize| member(k, "email").to_lowercase();

    let db_path = dir.path().join("campaigns.db");
    let db = db_path.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    let (c, _) = campaign(db, &["create", "--name", "Both"], true);
    let id = c["id"].as_i64().unwrap().to_string();
    std::fs::copy(&spec, dir.path().join(format!("{id}.toml"))).unwrap();
    // the audience: members 1000-1009, the source's first ten rows
    let audience = serde_json::json!({"type": "inline", "conditions": [{"condition_group":
        "member_properties", "field": "member_id", "operator": "lt", "value": 1010}]});
    let recipients = serde_json::json!([
        // an audience member by address (in capitals): its properties over the member's row
        {"email": member(3, "email").to_uppercase(), "properties": {"first_name": "Override", "tier": "vip"}},
        // not in the source
        {"email": "new@inline.test", "properties": {"first_name": "New", "tier": "new"}},
        // an audience member by id, its merge fields replaced
        {"member_id": 1005, "properties_mode": "replace", "properties": {"tier": "replaced"}},
        // in the source but not in the audience: sent as given, not as the source's row
        {"email": member(20, "email"), "properties": {"first_name": "Twenty"}}
    ]);
    let (s, _) = campaign(
        db,
        &[
            "schedule",
            &id,
            "--now",
            "--ready",
            "--audience",
            &audience.to_string(),
            "--recipients",
            &recipients.to_string(),
        ],
        true,
    );
    assert_eq!(s["sending"]["status"], "scheduled", "{s}");
    // the store as it was before the pass, to replay a crashed transmission below
    let before = dir.path().join("before.db");
    copy_store(&db_path, &before);

    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 2 steps"), "{log}");
    let (st, _) = campaign(db, &["status", &id], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "transmitted", "{st}");
    // 10 audience members + 2 inline recipients who are not members of it
    assert_eq!(sending["recipient_count"], 12, "{st}");
    let run_id = sending_run_id(sending);

    // one ledger row each: the audience members that are not inline recipients in source
    // order, then the inline recipients in the order given; rows outside the audience (but
    // the inline one) have none
    let store = dir.path().join("store");
    let (ledger, keys) = ledger_keys(dir.path(), &run_id);
    let mut expect: Vec<String> = [0, 1, 2, 4, 6, 7, 8, 9].into_iter().map(email).collect();
    expect.extend([email(3), "new@inline.test".into(), email(5), email(20)]);
    assert_eq!(
        keys,
        expect
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u64, k.clone(), "sent".to_string()))
            .collect::<Vec<_>>()
    );
    let record = common::record(&store, "demo", &run_id);
    assert_eq!(record.rows, 12);
    // the audience is applied in the derived input, not as conditions of the send
    assert!(record.audience.is_none());
    assert_eq!(
        common::submitted_event_rows(&store, "demo", "generated-42", &run_id).len(),
        12
    );

    // the IFUR lines: once each, with the combined properties
    let hot = dir.path().join("megasys/hot");
    let details = ifur_details(&hot, &run_id);
    assert_eq!(details.len(), 12, "{details:?}");
    let get = |k: &str, f: &str| details[k].get(f).cloned().unwrap_or_default();
    let fields =
        |k: &str| ["first_name", "last_name", "points", "tier", "member_id"].map(|f| get(k, f));
    let (m0, m3, m5, m20) = (email(0), email(3), email(5), email(20));
    // an audience member on its own: its row
    assert_eq!(
        fields(&m0),
        [
            member(0, "first_name"),
            member(0, "last_name"),
            member(0, "points"),
            String::new(),
            "1000".into()
        ]
    );
    // extend: the member's row, the inline properties winning
    assert_eq!(
        fields(&m3),
        [
            "Override".into(),
            member(3, "last_name"),
            member(3, "points"),
            "vip".into(),
            "1003".into()
        ]
    );
    // replace: the member's standard fields, only the inline merge properties
    assert_eq!(
        fields(&m5),
        [
            member(5, "first_name"),
            member(5, "last_name"),
            String::new(),
            "replaced".into(),
            String::new()
        ]
    );
    assert_eq!(
        fields("new@inline.test"),
        [
            "New".into(),
            String::new(),
            String::new(),
            "new".into(),
            String::new()
        ]
    );
    assert_eq!(
        fields(&m20),
        [
            "Twenty".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new()
        ]
    );

    // A crash: the store back to before the pass, the sending taken to `transmitting` by a
    // process whose lease has expired, and the send's run as if it died after writing
    // everything. The next pass resumes it: the same input is derived again (the file is
    // left as it is), so the send resumes the run instead of refusing it or sending twice.
    let csv = dir
        .path()
        .join(format!("campaigns.db.sendings/{run_id}/recipients.csv"));
    let derived = dir.path().join(format!("{id}.{run_id}.toml"));
    let modified = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (csv_at, derived_at) = (modified(&csv), modified(&derived));
    copy_store(&before, &db_path);
    {
        use broadside_campaigns::state::SendingStatus as S;
        let st = broadside_campaigns::store::Store::open(&db_path).unwrap();
        let sid = sending["id"].as_i64().unwrap();
        let then = chrono::Utc::now().timestamp() - 3600;
        assert!(st.try_lease(sid, "dead", then, 60).unwrap());
        assert!(st.begin_execution(sid, "dead", then).unwrap());
        let handle = serde_json::to_string(&broadside_campaigns::scheduler::Prepared {
            recipients: 12,
            handle: run_id.clone(),
            decisions: Default::default(),
        })
        .unwrap();
        let patch = broadside_campaigns::store::StatusPatch {
            prepared: Some(&handle),
            recipient_count: Some(12),
            error: None,
        };
        assert!(st
            .advance(sid, "dead", S::Preparing, S::Prepared, then, &patch)
            .unwrap());
        let none = broadside_campaigns::store::StatusPatch::default();
        assert!(st
            .advance(sid, "dead", S::Prepared, S::Transmitting, then, &none)
            .unwrap());
    }
    mark_running(&store, &run_id);
    let (_, log) = campaign(db, &["run", "--specs", specs], true);
    assert!(log.contains("scheduler pass: 1 steps"), "{log}");
    let (st, _) = campaign(db, &["status", &id], true);
    let sending = &st["sendings"][0];
    assert_eq!(sending["status"], "transmitted", "{st}");
    assert_eq!(sending["runs"][0]["detail"], "resumed", "{st}");
    assert_eq!((modified(&csv), modified(&derived)), (csv_at, derived_at));
    let again = common::record(&store, "demo", &run_id);
    assert_eq!(again.status, broadside_pipeline::run::RunStatus::Done);
    assert_eq!((again.rows, again.attempts), (12, 2));
    assert_eq!(
        common::read_ledger(&store, "demo", "generated-42", &run_id),
        ledger
    );
    assert_eq!(ifur_details(&hot, &run_id), details);
}

/// Requests a creative API got: path and JSON body.
type Puts = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A local creative API (`PUT /templates/{name}`) in its own runtime; returns its URL.
fn creative_api() -> (tokio::runtime::Runtime, String, Puts) {
    use axum::extract::{Path, State};
    let got: Puts = Default::default();
    let app = axum::Router::new()
        .route(
            "/api/templates/{name}",
            axum::routing::put(
                |State(got): State<Puts>, Path(name): Path<String>, body: String| async move {
                    got.lock()
                        .unwrap()
                        .push((name, serde_json::from_str(&body).unwrap()));
                    "{}"
                },
            ),
        )
        .with_state(got.clone());
    let (rt, addr) = common::serve_local(app);
    let url = format!("http://{addr}/api");
    (rt, url, got)
}

#[test]
fn template_contents_are_checked_and_synced_when_they_change() {
    let (_rt, api, puts) = creative_api();
    let dir = tempfile::tempdir().unwrap();
    let spec = common::generate(dir.path(), 50, 5, &[]);
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            "template = \"spring-a\"",
            "template = \"spring-a\"\ncontent = \"a.html\"",
        )
        .replace(
            "template = \"spring-b\"",
            "template = \"spring-b\"\ncontent = \"b.html\"",
        );
    std::fs::write(
        dir.path().join("a.html"),
        "Hi {{first_name}}, {{points}} points",
    )
    .unwrap();
    std::fs::write(dir.path().join("b.html"), "Hello {{ last_name }}").unwrap();
    let db = dir.path().join("campaigns.db");
    let db = db.to_str().unwrap();
    let specs = dir.path().to_str().unwrap();
    // One campaign through the scheduler: create, spec, schedule, approve, one pass.
    let send_one = || {
        let (c, _) = campaign(db, &["create", "--name", "T", "--list", "7"], true);
        let id = c["id"].as_i64().unwrap().to_string();
        std::fs::write(dir.path().join(format!("{id}.toml")), &text).unwrap();
        campaign(db, &["schedule", &id, "--now"], true);
        campaign(db, &["state", &id, "READY"], true);
        campaign(db, &["run", "--specs", specs, "--creative-api", &api], true);
        let (st, _) = campaign(db, &["status", &id], true);
        st["sendings"][0].clone()
    };

    let s = send_one();
    assert_eq!(s["status"], "transmitted", "{s}");
    let got = puts.lock().unwrap().clone();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["spring-a", "spring-b"]);
    assert_eq!(got[0].1["content"], "Hi {{first_name}}, {{points}} points");
    assert_eq!(got[0].1["content_hash"].as_str().unwrap().len(), 64);

    // Unchanged contents are not sent again; a changed one is, alone.
    assert_eq!(send_one()["status"], "transmitted");
    assert_eq!(puts.lock().unwrap().len(), 2);
    std::fs::write(dir.path().join("b.html"), "Hello again {{last_name}}").unwrap();
    assert_eq!(send_one()["status"], "transmitted");
    let got = puts.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].0, "spring-b");
    assert_eq!(got[2].1["content"], "Hello again {{last_name}}");

    // A tag the source does not have fails the sending before anything is sent or synced.
    std::fs::write(dir.path().join("a.html"), "Hi {{first_name}}\n{{voucher}}").unwrap();
    let s = send_one();
    assert_eq!(s["status"], "failed", "{s}");
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("line 2: unknown merge tag {{voucher}}"),
        "{err}"
    );
    assert_eq!(puts.lock().unwrap().len(), 3);
    // `broadside send` refuses it the same way, naming the variant and file.
    let out = common::run(
        &["send", dir.path().join("1.toml").to_str().unwrap()],
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("variant A") && err.contains("{{voucher}}"),
        "{err}"
    );
}

/// Copies a generated spec under another campaign id.
fn copy_spec_as(spec: &std::path::Path, to: &std::path::Path, campaign_id: &str) {
    let text = std::fs::read_to_string(spec).unwrap();
    assert!(text.contains("campaign_id = \"generated-42\""));
    let text = text.replace(
        "campaign_id = \"generated-42\"",
        &format!("campaign_id = \"{campaign_id}\""),
    );
    std::fs::write(to, text).unwrap();
}
