//! A real send, then the analytics API (`broadside serve --tokens`) over TCP and `broadside sql`:
//! runs, recipient logs and statistics agree with the ledger the send wrote.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;

use common::api_get as get;
use common::*;
use serde_json::Value;

fn serve(store: &std::path::Path, tokens: &std::path::Path) -> Server {
    let (store, tokens) = (store.to_str().unwrap(), tokens.to_str().unwrap());
    Server::start(
        &["--store", store, "--tokens", tokens, "--rollup-every", "0"],
        &[],
    )
}

/// `broadside sql --store STORE [--workspace demo] --format FORMAT QUERY`: its stdout.
fn sql(store: &std::path::Path, demo_only: bool, format: &str, query: &str) -> String {
    let store = store.to_str().unwrap();
    let mut args = vec!["sql", "--store", store];
    if demo_only {
        args.extend(["--workspace", "demo"]);
    }
    args.extend(["--format", format, query]);
    String::from_utf8(run(&args, true).stdout).unwrap()
}

#[test]
fn api_and_sql_agree_with_the_ledger_of_a_real_send() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 5_000, 300, &[]);
    let store = d.path().join("store");
    run(&["send", spec.to_str().unwrap(), "--run-id", "r1"], true);
    let ledger = read_ledger(&store, "demo", "generated-42", "r1");
    let mut decisions: BTreeMap<String, u64> = BTreeMap::new();
    for r in &ledger {
        *decisions.entry(r.decision.clone()).or_default() += 1;
    }

    let (tokens, token) = new_token(d.path(), "demo");
    let server = serve(&store, &tokens);
    let record = api_get_ok(&server.addr, "/campaign-runs/r1", &token, "demo");
    assert_eq!(record["status"], "done");
    assert_eq!(record["rows"], ledger.len() as u64);
    for (d, n) in &decisions {
        assert_eq!(record["decisions"][d], *n, "{d}");
    }
    let (status, body) = get(
        &server.addr,
        "/campaign-runs?campaign_id=generated-42",
        &token,
        "demo",
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (status, _) = get(&server.addr, "/campaign-runs/r1", &token, "other");
    assert_eq!(status, 403);

    // Suppressed recipients, page by page, are exactly the ledger's.
    let want: Vec<(u64, String)> = ledger
        .iter()
        .filter(|r| r.decision == "suppressed")
        .map(|r| (r.row, r.reason.clone().unwrap()))
        .collect();
    assert!(!want.is_empty());
    let mut got = Vec::new();
    let mut cursor = String::new();
    loop {
        let v = api_get_ok(
            &server.addr,
            &format!("/campaign-recipient-logs/?run_id=r1&decision=suppressed&limit=50{cursor}"),
            &token,
            "demo",
        );
        for i in v["items"].as_array().unwrap() {
            got.push((
                i["row"].as_u64().unwrap(),
                i["reason"].as_str().unwrap().to_string(),
            ));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(got, want);
    let first = &ledger[want[0].0 as usize];
    let v = api_get_ok(
        &server.addr,
        &format!("/campaign-recipient-logs/r1:{}", first.row),
        &token,
        "demo",
    );
    assert_eq!(v["key"].as_str(), first.key.as_deref());
    assert_eq!(v["suppression_list"].as_str(), first.list.as_deref());

    // Statistics: one submitted event per sent recipient, per variant.
    let v = api_get_ok(
        &server.addr,
        "/campaign-statistics/generated-42",
        &token,
        "demo",
    );
    assert_eq!(v["totals"]["submitted"], decisions["sent"]);
    for variant in v["variants"].as_array().unwrap() {
        let name = variant["variant"].as_str().unwrap();
        let sent = ledger
            .iter()
            .filter(|r| r.decision == "sent" && r.variant.as_deref() == Some(name))
            .count();
        assert_eq!(variant["submitted"], sent as u64, "{name}");
    }
    drop(server);

    // The same numbers through `broadside sql`, as CSV.
    let text = sql(
        &store,
        true,
        "csv",
        "SELECT decision, count(*) AS n FROM recipient_logs WHERE run_id = 'r1' GROUP BY decision ORDER BY decision",
    );
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("decision,n"));
    let from_sql: BTreeMap<String, u64> = lines
        .map(|l| {
            let (d, n) = l.split_once(',').unwrap();
            (d.to_string(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(from_sql, decisions);

    // Statements from stdin, and a refusal that names the reason.
    let mut child = exe()
        .args([
            "sql",
            "--store",
            store.to_str().unwrap(),
            "--format",
            "json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"SELECT count(*) AS n\nFROM events WHERE workspace_id = 'demo';\nDROP TABLE events;\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim(), format!("{{\"n\":{}}}", decisions["sent"]));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("refused") && stderr.contains("not allowed"),
        "{stderr}"
    );
}

/// `/campaign-runs/` pages like the other lists: newest first, `limit` per page, a cursor.
#[test]
fn run_list_is_paginated_newest_first() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 200, 10, &[]);
    let store = d.path().join("store");
    run(&["send", spec.to_str().unwrap(), "--run-id", "r1"], true);
    // Four more records of the same shape, started later than r1.
    let dir = store.join("campaign_runs/workspace_id=demo");
    let base: Value = serde_json::from_slice(&std::fs::read(dir.join("r1.json")).unwrap()).unwrap();
    for i in 2..=5 {
        let mut r = base.clone();
        r["run_id"] = format!("r{i}").into();
        r["started_at"] = format!("2099-01-0{i}T00:00:00Z").into();
        std::fs::write(dir.join(format!("r{i}.json")), r.to_string()).unwrap();
    }
    let out = run(
        &["token", "new", "--name", "t", "--workspace", "demo"],
        true,
    );
    let tokens = d.path().join("tokens.toml");
    std::fs::write(&tokens, &out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let token = stderr.split_whitespace().last().unwrap().to_string();
    let server = serve(&store, &tokens);

    let mut seen = Vec::new();
    let mut path = "/campaign-runs/?limit=2".to_string();
    loop {
        let v = api_get_ok(&server.addr, &path, &token, "demo");
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{v}");
        seen.extend(
            items
                .iter()
                .map(|i| i["run_id"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/campaign-runs/?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["r5", "r4", "r3", "r2", "r1"]);
    let (status, body) = get(
        &server.addr,
        "/campaign-runs/?status=done&limit=1",
        &token,
        "demo",
    );
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"][0]["run_id"], "r5");
    assert!(v["next_cursor"].is_string());
    for bad in [
        "/campaign-runs/?limit=0",
        "/campaign-runs/?limit=1001",
        "/campaign-runs/?cursor=zz",
    ] {
        let (status, body) = get(&server.addr, bad, &token, "demo");
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

/// Engagement events that arrive without a variant or run id get them from the ledger when
/// they are ingested, so the statistics per variant are the same whether or not the provider
/// echoes the variant; a value the event carries is kept, other workspaces and addresses the
/// campaign never sent are left alone, and an event goes to the run that had last sent before
/// it happened.
#[test]
fn events_without_a_variant_are_attributed_from_the_ledger() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 2_000, 0, &["--invalid-share", "0"]);
    let s = spec.to_str().unwrap();
    let store = d.path().join("store");
    run(&["send", s, "--run-id", "r1"], true);
    run(&["send", s, "--run-id", "r2", "--new-run"], true);
    let (r1_start, r2_start) = (
        record(&store, "demo", "r1").started_at,
        record(&store, "demo", "r2").started_at,
    );
    assert!(r1_start < r2_start);
    let sent: Vec<(String, String)> = read_ledger(&store, "demo", "generated-42", "r1")
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| (r.key.unwrap(), r.variant.unwrap()))
        .take(300)
        .collect();
    assert_eq!(sent.len(), 300);
    let variants: std::collections::BTreeSet<&str> = sent.iter().map(|(_, v)| v.as_str()).collect();
    assert!(variants.len() >= 2, "{variants:?}");
    let sent_r2: BTreeMap<String, String> = read_ledger(&store, "demo", "generated-42", "r2")
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| (r.key.unwrap(), r.variant.unwrap()))
        .collect();

    // Independent expectation: (variant, run, event type) → events.
    let mut want: BTreeMap<(Option<String>, Option<String>, String), u64> = BTreeMap::new();
    let mut add = |v: Option<&str>, r: Option<&str>, t: &str| {
        *want
            .entry((v.map(String::from), r.map(String::from), t.to_string()))
            .or_default() += 1;
    };
    let ts =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    let mut attributed = 0;
    for (i, (key, variant)) in sent.iter().enumerate() {
        // Even rows echo the variant and run, odd rows carry neither (and another spelling).
        let (echo, email) = if i % 2 == 0 {
            (
                format!(r#","variant":"{variant}","run_id":"r1""#),
                key.clone(),
            )
        } else {
            attributed += 1;
            (String::new(), format!(" {} ", key.to_uppercase()))
        };
        writeln!(
            f,
            r#"{{"event_id":"o-{i}","workspace_id":"demo","campaign_id":"generated-42","email":"{email}","event_type":"opened","ts":"{}"{echo}}}"#,
            ts(r1_start)
        )
        .unwrap();
        add(Some(variant), Some("r1"), "opened");
        // Every third recipient clicks after the second run started: that run's send.
        if i % 3 == 0 {
            attributed += 1;
            writeln!(
                f,
                r#"{{"event_id":"c-{i}","workspace_id":"demo","campaign_id":"generated-42","email":"{key}","event_type":"clicked","url":"https://x.example/","ts":"{}"}}"#,
                ts(r2_start)
            )
            .unwrap();
            add(Some(&sent_r2[key]), Some("r2"), "clicked");
        }
    }
    // The provider's own variant wins over the ledger's; the run is still filled in.
    let (k0, v0) = &sent[0];
    let other = variants.iter().find(|v| *v != v0).unwrap();
    writeln!(
        f,
        r#"{{"event_id":"x-own","workspace_id":"demo","campaign_id":"generated-42","email":"{k0}","event_type":"opened","variant":"{other}","ts":"{}"}}"#,
        ts(r1_start)
    )
    .unwrap();
    attributed += 1;
    add(Some(other), Some("r1"), "opened");
    // Not sent by the campaign, another campaign, another workspace: left as they came.
    for (id, ws, campaign, email) in [
        ("x-nobody", "demo", "generated-42", "nobody@nowhere.example"),
        ("x-campaign", "demo", "other-campaign", k0.as_str()),
        ("x-rival", "rival", "generated-42", k0.as_str()),
    ] {
        writeln!(
            f,
            r#"{{"event_id":"{id}","workspace_id":"{ws}","campaign_id":"{campaign}","email":"{email}","event_type":"opened","ts":"{}"}}"#,
            ts(r1_start)
        )
        .unwrap();
    }
    add(None, None, "opened"); // x-nobody; the other two are not this campaign's
    drop(f);

    let text = ingest(&store, &events);
    assert!(
        text.contains(&format!("({attributed} attributed from the ledger)")),
        "{text}"
    );

    // What was stored, read back through SQL.
    let text = sql(
        &store,
        true,
        "json",
        "SELECT variant, run_id, event_type, count(*) AS n FROM events WHERE event_type <> 'submitted' AND campaign_id = 'generated-42' GROUP BY variant, run_id, event_type",
    );
    // one JSON object per line
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = |v: &Value| v.as_str().map(String::from);
    let got: BTreeMap<(Option<String>, Option<String>, String), u64> = rows
        .iter()
        .map(|r| {
            (
                (
                    s(&r["variant"]),
                    s(&r["run_id"]),
                    s(&r["event_type"]).unwrap(),
                ),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let text = sql(
        &store,
        false,
        "csv",
        "SELECT event_id FROM events WHERE event_id LIKE 'x-%' AND variant IS NULL AND run_id IS NULL ORDER BY event_id",
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["event_id", "x-campaign", "x-nobody", "x-rival"]
    );

    // The statistics API: opens per variant are the ledger's, whatever the provider echoed.
    let (tokens, token) = new_token(d.path(), "demo");
    let server = serve(&store, &tokens);
    let v = api_get_ok(
        &server.addr,
        "/campaign-statistics/generated-42",
        &token,
        "demo",
    );
    for variant in v["variants"].as_array().unwrap() {
        let name = variant["variant"].as_str();
        let opened: u64 = want
            .iter()
            .filter(|((v, _, t), _)| v.as_deref() == name && t == "opened")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(variant["opens"], opened, "{name:?}: {variant}");
    }
}
