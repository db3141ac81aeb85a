//! A real send, then the analytics API (`broadside serve --tokens`) over TCP and `broadside sql`:
//! runs, recipient logs and statistics agree with the ledger the send wrote.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;

use common::*;
use serde_json::Value;

fn serve(store: &std::path::Path, tokens: &std::path::Path) -> Server {
    let (store, tokens) = (store.to_str().unwrap(), tokens.to_str().unwrap());
    Server::start(
        &["--store", store, "--tokens", tokens, "--rollup-every", "0"],
        &[],
    )
}

fn get(addr: &str, path: &str, token: &str, ws: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nworkspace_id: {ws}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    // The API answers with Content-Length (no chunking) for JSON.
    (status, body)
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

    // A token from `broadside token new`.
    let out = run(
        &["token", "new", "--name", "test", "--workspace", "demo"],
        true,
    );
    let tokens = d.path().join("tokens.toml");
    std::fs::write(&tokens, &out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let token = stderr.split_whitespace().last().unwrap().to_string();
    assert!(token.starts_with("bs_"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&token),
        "token stored in clear"
    );

    let server = serve(&store, &tokens);
    let (status, body) = get(&server.addr, "/campaign-runs/r1", &token, "demo");
    assert_eq!(status, 200, "{body}");
    let record: Value = serde_json::from_str(&body).unwrap();
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
        let (status, body) = get(
            &server.addr,
            &format!("/campaign-recipient-logs/?run_id=r1&decision=suppressed&limit=50{cursor}"),
            &token,
            "demo",
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
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
    let (status, body) = get(
        &server.addr,
        &format!("/campaign-recipient-logs/r1:{}", first.row),
        &token,
        "demo",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["key"].as_str(), first.key.as_deref());
    assert_eq!(v["suppression_list"].as_str(), first.list.as_deref());

    // Statistics: one submitted event per sent recipient, per variant.
    let (status, body) = get(
        &server.addr,
        "/campaign-statistics/generated-42",
        &token,
        "demo",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
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
    let out = run(
        &[
            "sql",
            "--store",
            store.to_str().unwrap(),
            "--workspace",
            "demo",
            "--format",
            "csv",
            "SELECT decision, count(*) AS n FROM recipient_logs WHERE run_id = 'r1' GROUP BY decision ORDER BY decision",
        ],
        true,
    );
    let text = String::from_utf8(out.stdout).unwrap();
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
        let (status, body) = get(&server.addr, &path, &token, "demo");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{body}");
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
