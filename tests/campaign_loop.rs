//! One campaign loop through the public interfaces only: a campaign configured through the
//! HTTP API is sent by `serve`'s scheduler, engagement and bounce events (half without the
//! variant) are ingested by `broadside ingest`, the statistics under the API's campaign id are
//! right per variant, and a second campaign to the same list suppresses the hard bounces (and
//! the organisation blocklist) with no manual step, `why` naming the bounce event.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const WS: &str = "demo";

/// One request to the server with the workspace and the token: status and JSON body (or the
/// text as a JSON string when it is not JSON). A body starting with `{` goes as JSON, any
/// other as TOML.
fn http(addr: &str, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let kind = if body.starts_with('{') {
        "application/json"
    } else {
        "application/toml"
    };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {kind}\r\nworkspace_id: {WS}\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    let v = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, v)
}

/// Waits (polling the API) until the sending reaches a final status; returns its answer.
fn finished_sending(addr: &str, token: &str, campaign: i64, sending: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, s) = http(
            addr,
            token,
            "GET",
            &format!("/campaign/{campaign}/sendings/{sending}"),
            "",
        );
        assert_eq!(status, 200, "{s}");
        if ["transmitted", "failed", "skipped"].contains(&s["status"].as_str().unwrap()) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "sending {sending} still {} after 120 s",
            s["status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The operator's sources file: the generated recipients as source `customers` of list 7.
fn write_sources(specs: &Path, data: &Path, store: &Path) {
    let text = format!(
        r#"[workspaces.{WS}.output]
store = {store:?}
[workspaces.{WS}.megasys]
hot_folder = {hot:?}
[workspaces.{WS}.sources.customers]
list = 7
input = {{ type = "csv", path = {csv:?} }}
columns = {{ email = "email", first_name = "first_name", last_name = "last_name", city = "city" }}
"#,
        store = store.display().to_string(),
        hot = data.join("hot").display().to_string(),
        csv = data.join("recipients.csv").display().to_string(),
    );
    std::fs::create_dir_all(data.join("hot")).unwrap();
    std::fs::write(specs.join("sources.toml"), text).unwrap();
}

/// The send configuration both campaigns use: two variants, no holdout, no named lists (the
/// store's own suppression keeps the second campaign clean).
const CONFIG: &str = r#"# reviewed in version control
channel = "email"
[[variants]]
name = "A"
weight = 1
template = "spring_a"
content = "Hi {{first_name}} in {{city}}"
[[variants]]
name = "B"
weight = 1
template = "spring_b"
"#;

/// Creates a campaign of list 7 with [`CONFIG`], schedules it now and approves it; the
/// sending once the scheduler is done with it.
fn send_campaign(addr: &str, token: &str, name: &str) -> (i64, Value) {
    let (status, c) = http(
        addr,
        token,
        "POST",
        "/campaign",
        &json!({"name": name, "list": 7}).to_string(),
    );
    assert_eq!(status, 201, "{c}");
    let id = c["id"].as_i64().unwrap();
    let (status, v) = http(addr, token, "PUT", &format!("/campaign/{id}/spec"), CONFIG);
    assert_eq!(status, 200, "{v}");
    let (status, s) = http(
        addr,
        token,
        "POST",
        &format!("/campaign/{id}/sendings"),
        r#"{"schedule": {"type": "immediate"}}"#,
    );
    assert_eq!(status, 201, "{s}");
    let (status, c) = http(
        addr,
        token,
        "PUT",
        &format!("/campaign/{id}"),
        r#"{"state": "READY"}"#,
    );
    assert_eq!((status, c["state"].as_str()), (200, Some("READY")), "{c}");
    let s = finished_sending(addr, token, id, s["id"].as_i64().unwrap());
    assert_eq!(s["status"], "transmitted", "{s}");
    (id, s)
}

#[test]
fn a_campaign_configured_through_the_api_is_sent_measured_and_feeds_the_next_send() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::generate(&data, 400, 0, &["--invalid-share", "0"]);
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let store = dir.path().join("store");
    write_sources(&specs, &data, &store);
    let (tokens, token) = common::new_token(dir.path(), WS);
    let db = dir.path().join("campaigns.db");
    let server = common::Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--campaigns",
            db.to_str().unwrap(),
            "--campaign-specs",
            specs.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--scheduler-every",
            "1",
            "--rollup-every",
            "0",
        ],
        &[],
    );
    let addr = server.addr.as_str();

    // the first campaign, sent by the scheduler through the configuration given to the API
    let (first, sending) = send_campaign(addr, &token, "Spring");
    let run = sending["run_id"].as_str().unwrap().to_string();
    assert_eq!(sending["ledger_campaign_id"], first.to_string());
    let (status, spec) = http(addr, &token, "GET", &format!("/campaign/{first}/spec"), "");
    assert_eq!((status, spec.as_str()), (200, Some(CONFIG)));

    // the ledger under the API's id: who got which variant
    let ledger = common::read_ledger(&store, WS, &first.to_string(), &run);
    assert_eq!(ledger.len(), 400);
    let sent: Vec<(String, String)> = ledger
        .iter()
        .filter(|r| r.decision == "sent")
        .map(|r| (r.key.clone().unwrap(), r.variant.clone().unwrap()))
        .collect();
    assert!(sent.len() > 300, "{} sent", sent.len());
    let variants: HashSet<&str> = sent.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(variants, HashSet::from(["A", "B"]));

    // engagement and bounce events, every other one without variant and run: every 10th sent
    // recipient bounces hard, the others are delivered, every 3rd of those opens
    let mut lines = Vec::new();
    let mut expected: BTreeMap<&str, [u64; 3]> = BTreeMap::new(); // delivered, opens, hard bounces
    let mut bounced = Vec::new();
    for (i, (email, variant)) in sent.iter().enumerate() {
        let mut kinds = vec![];
        if i % 10 == 0 {
            kinds.push("bounced");
            bounced.push(email.clone());
        } else {
            kinds.push("delivered");
            if i % 3 == 0 {
                kinds.push("opened");
            }
        }
        for kind in kinds {
            let n = lines.len();
            let mut e = json!({
                "event_id": format!("loop-{n}"),
                "workspace_id": WS,
                "campaign_id": first.to_string(),
                "email": email,
                "event_type": kind,
                "ts": "2026-11-30T10:00:00Z",
            });
            if n % 2 == 0 {
                e["variant"] = json!(variant);
                e["run_id"] = json!(run);
            }
            if kind == "bounced" {
                e["bounce_type"] = json!("hard");
            }
            let slot = match kind {
                "delivered" => 0,
                "opened" => 1,
                _ => 2,
            };
            expected.entry(variant.as_str()).or_default()[slot] += 1;
            lines.push(e.to_string());
        }
    }
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, lines.join("\n") + "\n").unwrap();
    common::ingest(&store, &events);

    // statistics under the API's campaign id, per variant, as computed from the events above
    let stats = common::api_get_ok(addr, &format!("/campaign-statistics/{first}"), &token, WS);
    let got: BTreeMap<&str, [u64; 3]> = stats["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["variant"].as_str().expect("every event attributed"),
                [
                    v["delivered"].as_u64().unwrap(),
                    v["opens"].as_u64().unwrap(),
                    v["hard_bounces"].as_u64().unwrap(),
                ],
            )
        })
        .collect();
    assert_eq!(got, expected, "{stats}");

    // the sending's links lead to its run and its recipient logs
    let links = &sending["links"];
    assert_eq!(links["statistics"], format!("/campaign-statistics/{first}"));
    let r = common::api_get_ok(addr, links["run"].as_str().unwrap(), &token, WS);
    assert_eq!(r["run_id"], run.as_str(), "{r}");
    let logs = common::api_get_ok(
        addr,
        &format!("{}&limit=1000", links["recipient_logs"].as_str().unwrap()),
        &token,
        WS,
    );
    assert_eq!(logs["items"].as_array().map(Vec::len), Some(400), "{logs}");
    assert!(logs["next_cursor"].is_null(), "{logs}");

    // the organisation blocks one recipient who did not bounce
    let blocked = sent[1].0.clone();
    let blocklist = dir.path().join("legal-hold.csv");
    std::fs::write(&blocklist, format!("email\n{}\n", blocked.to_uppercase())).unwrap();
    common::run(
        &[
            "suppression",
            "blocklist",
            "import",
            blocklist.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--workspace",
            WS,
        ],
        true,
    );

    // the second campaign to the same list: the hard bounces and the blocked address are
    // suppressed, nobody else
    let (second, sending2) = send_campaign(addr, &token, "Summer");
    let run2 = sending2["run_id"].as_str().unwrap().to_string();
    let ledger2 = common::read_ledger(&store, WS, &second.to_string(), &run2);
    let mut suppressed: Vec<String> = ledger2
        .iter()
        .filter(|r| r.decision == "suppressed" && r.reason.as_deref() == Some("hard_bounce"))
        .map(|r| r.key.clone().unwrap())
        .collect();
    suppressed.sort();
    bounced.sort();
    assert_eq!(suppressed, bounced);
    let others: Vec<(Option<String>, Option<String>)> = ledger2
        .iter()
        .filter(|r| r.decision == "suppressed" && r.reason.as_deref() != Some("hard_bounce"))
        .map(|r| (r.key.clone(), r.reason.clone()))
        .collect();
    assert_eq!(
        others,
        [(Some(blocked.clone()), Some("blocklisted".into()))]
    );
    assert_eq!(
        sending2["decisions"]["suppressed"].as_u64(),
        Some(bounced.len() as u64 + 1)
    );
    let record = common::record(&store, WS, &run2);
    let sup = record.store_suppression.expect("the run built a snapshot");
    assert_eq!((sup.blocklist_rows, sup.blocklist_files), (1, 1));
    assert_eq!(sup.lists["hard_bounce"], bounced.len() as u64);

    // why names the bounce event behind the decision
    let out = common::run(
        &[
            "why",
            "--store",
            store.to_str().unwrap(),
            &run2,
            &bounced[0],
        ],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let idx = sent.iter().position(|(e, _)| *e == bounced[0]).unwrap();
    let event_no = lines
        .iter()
        .position(|l| l.contains(&format!("\"email\":\"{}\"", bounced[0])))
        .unwrap();
    assert_eq!(idx % 10, 0);
    assert!(
        text.contains("SUPPRESSED (hard_bounce)")
            && text.contains(&format!("event loop-{event_no}: bounced (hard)")),
        "{text}"
    );

    // the recipient's history across both campaigns: raw, then from the recipient index the
    // rollup command builds, the same either way
    let who = bounced[0].to_uppercase();
    let history = || {
        common::api_get_ok(
            addr,
            &format!("/recipients/{who}/history?limit=1000"),
            &token,
            WS,
        )
    };
    let raw = history();
    let items = raw["items"].as_array().unwrap();
    let at: Vec<&str> = items.iter().map(|i| i["at"].as_str().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first: {raw}");
    let mut seen: Vec<(String, String, String)> = items
        .iter()
        .map(|i| {
            let text = |k: &str| i[k].as_str().unwrap_or_default().to_string();
            match i["kind"].as_str() {
                Some("decision") => (text("campaign_id"), text("decision"), text("reason")),
                _ => (text("campaign_id"), text("event_type"), text("bounce_type")),
            }
        })
        .collect();
    seen.sort();
    let (first_id, second_id) = (first.to_string(), second.to_string());
    let mut want = vec![
        (second_id.clone(), "suppressed".into(), "hard_bounce".into()),
        (first_id.clone(), "sent".into(), String::new()),
        (first_id.clone(), "submitted".into(), String::new()),
        (first_id.clone(), "bounced".into(), "hard".into()),
    ];
    want.sort();
    assert_eq!(seen, want, "{raw}");
    assert_eq!(items[0]["decision"], "suppressed", "the newest: {raw}");
    let out = common::run(&["rollup", "--store", store.to_str().unwrap()], true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("recipient index: ") && text.contains(" 2 runs indexed"),
        "{text}"
    );
    let indexed = history();
    assert_eq!(indexed["items"], raw["items"]);
    let out = common::run(&["why", "--store", store.to_str().unwrap(), &who], true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{who} in workspace {WS}: 2 decisions, 2 events"))
            && text.contains(&format!("(campaign {second_id}): input row"))
            && text.contains("-> SUPPRESSED (hard_bounce)")
            && text.contains(&format!("bounced in campaign {first_id}")),
        "{text}"
    );

    // a third campaign to a segment of the list, sent by its `when` (its default sending)
    let csv = std::fs::read_to_string(data.join("recipients.csv")).unwrap();
    let mut rows = csv.lines().map(common::csv_fields);
    let header = rows.next().unwrap();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (email_col, city_col) = (col("email"), col("city"));
    let people: Vec<(String, String)> = rows
        .map(|r| (r[email_col].trim().to_lowercase(), r[city_col].clone()))
        .collect();
    let city = people[0].1.clone();
    let (status, a) = http(
        addr,
        &token,
        "POST",
        "/audience",
        &json!({"name": "one city", "conditions": [{"condition_group": "member_properties",
                "field": "city", "operator": "match", "value": city}]})
        .to_string(),
    );
    assert_eq!(status, 201, "{a}");
    let at = chrono::Utc::now().timestamp() + 2;
    let (status, c) = http(
        addr,
        &token,
        "POST",
        "/campaign",
        &json!({"name": "Local", "list": 7, "segments": [a["id"]], "when": at}).to_string(),
    );
    assert_eq!(
        (status, c["state"].as_str()),
        (201, Some("SCHEDULED")),
        "{c}"
    );
    let third = c["id"].as_i64().unwrap();
    let (status, v) = http(
        addr,
        &token,
        "PUT",
        &format!("/campaign/{third}/spec"),
        CONFIG,
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = http(
        addr,
        &token,
        "PUT",
        &format!("/campaign/{third}"),
        r#"{"state": "READY"}"#,
    );
    assert_eq!(status, 200, "{v}");
    let s3 = finished_sending(addr, &token, third, c["default_sending"].as_i64().unwrap());
    assert_eq!(s3["status"], "transmitted", "{s3}");
    let ledger3 = common::read_ledger(
        &store,
        WS,
        &third.to_string(),
        s3["run_id"].as_str().unwrap(),
    );
    let mut got: Vec<String> = ledger3.iter().map(|r| r.key.clone().unwrap()).collect();
    let mut want: Vec<String> = people
        .iter()
        .filter(|(_, c)| c.eq_ignore_ascii_case(&city))
        .map(|(e, _)| e.clone())
        .collect();
    got.sort();
    want.sort();
    assert!(!want.is_empty() && want.len() < people.len());
    assert_eq!(got, want);
    assert!(ledger3.iter().all(|r| r.decision == "sent"
        || ["hard_bounce", "blocklisted"].contains(&r.reason.as_deref().unwrap_or_default())));
}

#[test]
fn the_cli_round_trips_a_configuration_and_ready_names_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::generate(&data, 20, 0, &[]);
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    write_sources(&specs, &data, &dir.path().join("store"));
    let mut sources = std::fs::read_to_string(specs.join("sources.toml")).unwrap();
    sources.push_str(&format!(
        "[workspaces.{WS}.domains]\n3 = \"news.example.com\"\n"
    ));
    std::fs::write(specs.join("sources.toml"), sources).unwrap();
    let db = dir.path().join("campaigns.db");
    let base = ["campaign", "--db", db.to_str().unwrap(), "--workspace", WS];
    let cli = |args: &[&str], env: &[(&str, &str)], ok: bool| {
        let all: Vec<&str> = base.iter().chain(args).copied().collect();
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "BROADSIDE_CREATIVE_API") {
            env.push(("BROADSIDE_CREATIVE_API", ""));
        }
        let out = common::run_env(&all, &env, ok);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, _) = cli(
        &["create", "--name", "X", "--list", "7", "--domain", "3"],
        &[],
        true,
    );
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"].to_string();
    let specs_s = specs.to_str().unwrap();

    // import checks, export gives back what was imported
    let cfg = dir.path().join("x.toml");
    std::fs::write(
        &cfg,
        CONFIG.replace(
            "weight = 1\ntemplate = \"spring_b\"",
            "weight = 0\ntemplate = \"spring_b\"",
        ),
    )
    .unwrap();
    let (_, err) = cli(
        &["import", &id, cfg.to_str().unwrap(), "--specs", specs_s],
        &[],
        false,
    );
    assert!(
        err.contains("x.toml") && err.contains("variants[1].weight must be greater than 0"),
        "{err}"
    );
    let (_, err) = cli(&["export", &id], &[], false);
    assert!(err.contains("has no send configuration"), "{err}");
    std::fs::write(&cfg, CONFIG).unwrap();
    cli(
        &["import", &id, cfg.to_str().unwrap(), "--specs", specs_s],
        &[],
        true,
    );
    let (out, _) = cli(&["export", &id], &[], true);
    assert_eq!(out, CONFIG);

    // READY names everything that does not resolve in this process
    cli(&["state", &id, "SCHEDULED"], &[], true);
    std::fs::rename(data.join("recipients.csv"), data.join("moved.csv")).unwrap();
    let (_, err) = cli(&["state", &id, "READY", "--specs", specs_s], &[], false);
    assert!(
        err.contains("source.path") && err.contains("recipients.csv is not a file"),
        "{err}"
    );
    assert!(
        err.contains(
            "the sender domain news.example.com reaches the email system through the creative API"
        ),
        "{err}"
    );
    std::fs::rename(data.join("moved.csv"), data.join("recipients.csv")).unwrap();
    let (out, _) = cli(
        &["state", &id, "READY", "--specs", specs_s],
        &[("BROADSIDE_CREATIVE_API", "http://127.0.0.1:9/api")],
        true,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "READY"
    );
    // a READY campaign's configuration stays as it was checked
    let (_, err) = cli(
        &["import", &id, cfg.to_str().unwrap(), "--specs", specs_s],
        &[],
        false,
    );
    assert!(err.contains("cannot go from READY"), "{err}");
}
