//! The API contract: schemathesis (a property-based API fuzzer, installed by `.ci/setup`)
//! generates requests from the `/openapi.json` a real `broadside serve` publishes (analytics
//! API, webhooks with printer tracking, campaign API, all mounted, over seeded data) and checks
//! every answer against the document: no 5xx, every status and content type documented, every
//! body valid against its schema, schema-valid requests accepted and schema-violating ones
//! refused. What JSON Schema cannot say is listed, with its reason, in
//! `tests/api-contract/schemathesis.toml`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{ingest, new_token, Server};

/// Runs schemathesis over the operations `filter` selects with `headers`; panics with its
/// report unless it found nothing.
fn schemathesis(addr: &str, filter: &[&str], headers: &[String]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Its working files (.schemathesis/) go to a scratch folder, not the checkout.
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("schemathesis");
    cmd.current_dir(scratch.path())
        .arg("--config-file")
        .arg(root.join("tests/api-contract/schemathesis.toml"))
        .arg("run")
        .arg(format!("http://{addr}/openapi.json"))
        .args(["--max-examples", "25", "--workers", "1"])
        .arg("--generation-deterministic")
        .args(filter)
        .env("NO_COLOR", "1");
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .output()
        .expect("schemathesis on PATH (bash .ci/setup installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis {filter:?} found contract failures:\n{report}"
    );
    // It ran: operations were selected and requests generated.
    assert!(
        report.contains("generated") && !report.contains("Selected: 0/"),
        "{report}"
    );
}

#[test]
fn every_mounted_route_keeps_the_openapi_contract_under_fuzzing() {
    let d = tempfile::tempdir().unwrap();
    let gen = d.path().join("gen");
    let spec = common::generate(&gen, 2_000, 100, &[]);
    common::run(
        &[
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "r1",
            "--no-progress",
        ],
        true,
    );
    let store = gen.join("store");
    let ledger = common::read_ledger(&store, "demo", "generated-42", "r1");
    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    for (i, r) in ledger
        .iter()
        .filter(|r| r.decision == "sent")
        .take(200)
        .enumerate()
    {
        let (kind, bounce) = match i % 4 {
            0 => ("delivered", None),
            1 => ("opened", None),
            2 => ("clicked", None),
            _ => ("bounced", Some(if i % 8 == 3 { "hard" } else { "soft" })),
        };
        let mut e = serde_json::json!({
            "event_id": format!("c-{i}"), "workspace_id": "demo", "campaign_id": "generated-42",
            "run_id": "r1", "event_type": kind, "email": r.key.as_deref().unwrap(),
            "ts": format!("2026-12-0{}T{:02}:00:00Z", 1 + i % 5, i % 24),
        });
        if let Some(b) = bounce {
            e["bounce_type"] = b.into();
        }
        writeln!(f, "{e}").unwrap();
    }
    drop(f);
    ingest(&store, &events);
    let history = d.path().join("history/workspace_id=demo");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::write(
        history.join("export.csv"),
        "email,bounce_type,bounced_at\nold@example.com,hard,2026-11-01\n",
    )
    .unwrap();
    let (tokens, token) = new_token(d.path(), "demo");
    let secret = "contract-webhook-secret";
    let s = Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--rollup-every",
            "0",
            "--webhook-secret",
            secret,
            "--webhook-workspace",
            "demo",
            "--lob-webhook-secret",
            "contract-lob-secret",
            "--lob-webhook-workspace",
            "demo",
            "--campaigns",
            d.path().join("campaigns.db").to_str().unwrap(),
            "--bounce-history",
            d.path().join("history").to_str().unwrap(),
        ],
        &[],
    );

    // The published document holds every mounted route, and only those.
    let (status, body) = common::api_get(&s.addr, "/openapi.json", "-", "-");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in ["/sql", "/webhooks/lob", "/campaign", "/audience"] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the served document"
        );
    }

    schemathesis(
        &s.addr,
        &["--exclude-tag", "webhooks"],
        &[
            format!("Authorization: Bearer {token}"),
            "workspace_id: demo".into(),
        ],
    );
    schemathesis(
        &s.addr,
        &["--include-tag", "webhooks"],
        &[format!("Authorization: Bearer {secret}")],
    );
}

#[test]
fn the_served_document_lists_only_what_is_mounted_and_unknown_routes_answer_json() {
    let d = tempfile::tempdir().unwrap();
    let (tokens, token) = new_token(d.path(), "demo");
    let s = Server::start(
        &[
            "--store",
            d.path().join("store").to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--rollup-every",
            "0",
        ],
        &[],
    );
    let (_, body) = common::api_get(&s.addr, "/openapi.json", "-", "-");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert!(paths.iter().any(|p| *p == "/sql"), "{paths:?}");
    assert!(
        !paths.iter().any(|p| p.starts_with("/webhooks")
            || p.starts_with("/campaign/")
            || *p == "/audience"),
        "routes this server does not mount are documented: {paths:?}"
    );
    // Not mounted here: a JSON 404, not an empty body.
    for (method, path) in [
        ("GET", "/campaign"),
        ("POST", "/webhooks/events"),
        ("GET", "/nope"),
    ] {
        let raw = common::request_raw(
            &s.addr,
            method,
            path,
            &[format!("Authorization: Bearer {token}")],
            "",
        );
        assert!(raw.starts_with("HTTP/1.1 404"), "{method} {path}: {raw}");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(path), "{body}");
    }
    // A method a route does not take: a JSON 405.
    let raw = common::request_raw(&s.addr, "DELETE", "/sql", &[], "");
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.contains("\"error\""), "{raw}");
}
