//! The mail channel through printers, end to end: `broadside send` against a local Lob test
//! server (the printers crate's, speaking Lob's documented API over HTTP on 127.0.0.1) and a
//! batch-file printer folder.

mod common;

#[path = "../printers/tests/support/lob_server.rs"]
mod lob_server;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use arrow_array::Array;
use common::*;
use lob_server::{Fault, LobServer};

const WS: &str = "acme";
const CAMPAIGN: &str = "winback";
const KEY: &str = "test_lob_key";

/// Writes `n` recipients: every 20th has a name too long for Lob (approval), every 25th no
/// offer (the creative cannot be rendered), every 30th lives abroad (validation).
fn write_recipients(dir: &Path, n: usize) {
    let mut csv = String::from("Account,First,Last,Street,City,State,Zip,Country,Offer\n");
    for i in 0..n {
        let last = if i % 20 == 7 {
            "X".repeat(60)
        } else {
            format!("Last{i}")
        };
        let offer = if i % 25 == 3 {
            String::new()
        } else {
            format!("{}% off", 10 + i % 30)
        };
        let country = if i % 30 == 11 { "FR" } else { "US" };
        csv.push_str(&format!(
            "A{i:05},First{i},{last},{i} Main St,Springfield,IL,627{:02},{country},{offer}\n",
            i % 100
        ));
    }
    std::fs::write(dir.join("recipients.csv"), csv).unwrap();
    std::fs::write(dir.join("front.html"), "<h1>{{first_name}}: {{offer}}</h1>").unwrap();
    std::fs::write(dir.join("back-a.html"), "<p>A for {{account_number}}</p>").unwrap();
    std::fs::write(dir.join("back-b.html"), "<p>B for {{account_number}}</p>").unwrap();
}

/// The columns of the recipients `write_recipients` makes.
const CSV_SOURCE: &str = r#"
[source]
type = "csv"
path = "recipients.csv"

[columns]
account_number = "Account"
first_name = "First"
last_name = "Last"
address1 = "Street"
city = "City"
state = "State"
zip = "Zip"
country = "Country"

[columns.merge]
offer = "Offer"
"#;

fn spec(dir: &Path, printer: &str) -> std::path::PathBuf {
    write_spec(dir, "campaign.toml", CSV_SOURCE, 10.0, printer)
}

/// A two-variant US mail campaign over `source` (the `[source]` and `[columns]` tables).
fn write_spec(
    dir: &Path,
    name: &str,
    source: &str,
    holdout: f64,
    printer: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
campaign_id = "{CAMPAIGN}"
workspace_id = "{WS}"
channel = "mail"
holdout_percent = {holdout:.1}
{source}
[mail]
countries = ["US"]

[[variants]]
name = "a"
weight = 1
template = "card-a"

[[variants]]
name = "b"
weight = 1
template = "card-b"

[output]
store = "store"
ledger_part_rows = 64

{printer}
"#
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn lob_printer(base_url: &str, extra: &str) -> String {
    format!(
        r#"
[printer]
kind = "lob"
approval = "lob_us"
{extra}

[printer.creative]
front = "front.html"
back = "back-a.html"

[printer.creatives.card-b]
front = "front.html"
back = "back-b.html"

[printer.lob]
base_url = "{base_url}"
api_key_env = "TEST_LOB_KEY"
max_in_flight = 4
requests_per_second = 1000
backoff_ms = 1
max_backoff_ms = 10

[printer.billing]
customer = true
active_subscription = true
"#
    )
}

fn send(args: &[&str], expect_ok: bool) -> std::process::Output {
    run_env(args, &[("TEST_LOB_KEY", KEY)], expect_ok)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The recipient (metadata) of each piece the server made for run `run_id` (its metadata's
/// run); panics on a recipient mailed twice in the run.
fn pieces_by_recipient(server: &LobServer, run_id: &str) -> HashMap<String, (String, String)> {
    let mut out = HashMap::new();
    for p in server.pieces() {
        if p.request["metadata"]["run_id"].as_str() != Some(run_id) {
            continue;
        }
        let who = p.request["metadata"]["recipient"]
            .as_str()
            .expect("metadata.recipient")
            .to_string();
        let back = p.request["back"].as_str().unwrap_or_default().to_string();
        let prev = out.insert(who.clone(), (p.id.clone(), back));
        assert!(prev.is_none(), "{who} has two mailpieces");
    }
    out
}

#[test]
fn every_mailed_recipient_gets_exactly_one_piece_through_lost_answers() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    // Every tenth answer is lost after the piece was made, and 429s, 500s and resets before
    // processing come at other calls.
    server.fault_plan(|call| match call % 10 {
        4 => Some(Fault::DropAfterProcessing),
        _ if call % 7 == 2 => Some(Fault::ServerError),
        _ if call % 11 == 5 => Some(Fault::TooManyRequests {
            retry_after_secs: 0,
        }),
        _ if call % 13 == 6 => Some(Fault::ResetBeforeProcessing),
        _ => None,
    });
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 300);
    let spec = spec(dir.path(), &lob_printer(&server.base_url, ""));
    let out = send(&["send", spec.to_str().unwrap(), "--run-id", "first"], true);
    let stdout = String::from_utf8_lossy(&out.stdout);

    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "first");
    assert_eq!(ledger.len(), 300, "one ledger row per recipient");
    let pieces = pieces_by_recipient(&server, "first");
    let mut sent = 0;
    let mut by_reason: HashMap<String, usize> = HashMap::new();
    for r in &ledger {
        let key = r.key.clone().unwrap();
        *by_reason
            .entry(format!(
                "{}/{}",
                r.decision,
                r.reason.clone().unwrap_or_default()
            ))
            .or_default() += 1;
        let i: usize = key[1..].parse().unwrap();
        match r.decision.as_str() {
            "sent" => {
                sent += 1;
                assert_eq!(r.mail_state.as_deref(), Some("Sent"), "{key}");
                let (id, back) = pieces
                    .get(&key)
                    .unwrap_or_else(|| panic!("{key}: no piece"));
                assert_eq!(
                    r.printer_id.as_ref(),
                    Some(id),
                    "{key}: ledger names its piece"
                );
                let expect = format!("{} for {key}", r.variant.as_deref().unwrap().to_uppercase());
                assert!(
                    back.contains(&expect),
                    "{key}: {back} is not its variant's back"
                );
            }
            other => {
                assert!(r.printer_id.is_none(), "{key} is {other} yet has a piece");
                assert!(
                    !pieces.contains_key(&key),
                    "{key} is {other} yet was mailed"
                );
            }
        }
        if i % 30 == 11 {
            assert_eq!(r.reason.as_deref(), Some("international"), "{key}");
            assert_eq!(r.mail_state.as_deref(), Some("Skipped"));
        } else if i % 20 == 7 && r.decision != "holdout" {
            assert_eq!(r.decision, "skipped", "{key}");
            assert_eq!(r.reason.as_deref(), Some("printer_approval_failed"));
            let d = r.detail.as_deref().unwrap_or_default();
            assert!(d.contains("name") && d.contains("40"), "{key}: {d}");
        } else if i % 25 == 3 && r.decision != "holdout" {
            assert_eq!(r.decision, "errored", "{key}");
            assert_eq!(r.reason.as_deref(), Some("could_not_generate_creative"));
            assert_eq!(r.mail_state.as_deref(), Some("Error"));
            let d = r.detail.as_deref().unwrap_or_default();
            assert!(
                d.starts_with("Could not generate creative for recipient") && d.contains("offer"),
                "{key}: {d}"
            );
        } else if r.decision != "holdout" {
            assert_eq!(r.decision, "sent", "{key}: {:?}", r.reason);
        }
    }
    assert!(sent > 150, "{by_reason:?}");
    assert_eq!(pieces.len(), sent, "one piece per sent recipient");
    assert!(
        server.calls() > sent as u64,
        "faults should have caused retries"
    );
    assert!(server.max_in_flight() <= 4);
    assert!(
        stdout.contains(&format!("{sent} pieces created, 0 returned")),
        "{stdout}"
    );
    println!(
        "figure mail_send_faults recipients=300 sent={sent} pieces={} calls={} duplicates=0",
        pieces.len(),
        server.calls()
    );
}

#[test]
fn a_printer_refusing_the_key_fails_the_run_and_resume_mails_each_recipient_once() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 120);
    let spec_path = spec(dir.path(), &lob_printer(&server.base_url, ""));
    // A wrong key: 401 stops the printer, the run is recorded failed, nothing is lost.
    let out = exe()
        .args(["send", spec_path.to_str().unwrap(), "--run-id", "r1"])
        .env("TEST_LOB_KEY", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refuses every request"), "{err}");
    let rec = record(&dir.path().join("store"), WS, "r1");
    assert_eq!(format!("{:?}", rec.status), "Failed");
    assert!(server.pieces().is_empty());

    // With the right key the run resumes and every eligible recipient gets one piece.
    send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "r1"],
        true,
    );
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "r1");
    assert_eq!(ledger.len(), 120);
    let pieces = pieces_by_recipient(&server, "r1");
    let sent: HashSet<String> = ledger
        .iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.clone().unwrap())
        .collect();
    assert_eq!(pieces.keys().cloned().collect::<HashSet<_>>(), sent);
    // The journal is gone with the finished run.
    assert!(!dir
        .path()
        .join("store/staging/run_id=r1/printer-journal.tsv")
        .exists());
}

#[test]
fn billing_not_ready_fails_closed_before_anything_is_printed() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 10);
    let printer = lob_printer(&server.base_url, "")
        .replace("active_subscription = true", "active_subscription = false");
    let spec_path = spec(dir.path(), &printer);
    let out = exe()
        .args(["send", spec_path.to_str().unwrap(), "--run-id", "b1"])
        .env("TEST_LOB_KEY", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BILLING_NOT_READY"), "{err}");
    assert_eq!(server.calls(), 0);
    assert!(
        !dir.path().join("store").join("campaign_runs").exists(),
        "nothing recorded"
    );

    // No billing table at all fails closed too.
    let no_billing = lob_printer(&server.base_url, "");
    let no_billing = &no_billing[..no_billing.find("[printer.billing]").unwrap()];
    let spec_path = spec(dir.path(), no_billing);
    let out = exe()
        .args(["send", spec_path.to_str().unwrap()])
        .env("TEST_LOB_KEY", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BILLING_NOT_READY"));
    assert_eq!(server.calls(), 0);
}

#[test]
fn the_account_cap_and_a_future_send_date_are_applied() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 100);
    let printer = lob_printer(&server.base_url, "send_date = \"2099-01-01\"").replace(
        "active_subscription = true",
        "active_subscription = true\nrecipient_cap = 50\nrecipients_used = 20",
    );
    let spec_path = spec(dir.path(), &printer);
    send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "c1"],
        true,
    );
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "c1");
    let sent: Vec<_> = ledger.iter().filter(|r| r.decision == "sent").collect();
    let holdout = ledger.iter().filter(|r| r.decision == "holdout").count();
    // The account had 30 recipients left; like `caps.billing_cap`, holdouts count.
    assert_eq!(sent.len() + holdout, 30);
    assert!(sent
        .iter()
        .all(|r| r.mail_state.as_deref() == Some("Scheduled")));
    let capped = ledger
        .iter()
        .filter(|r| r.reason.as_deref() == Some("cap_exceeded"))
        .count();
    assert!(capped > 0);
    let pieces = server.pieces();
    assert_eq!(pieces.len(), sent.len());
    assert!(pieces
        .iter()
        .all(|p| p.request["send_date"].as_str() == Some("2099-01-01")));
}

#[test]
fn a_batch_printer_gets_csv_batches_and_a_manifest_naming_every_row() {
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 200);
    std::fs::create_dir(dir.path().join("printer")).unwrap();
    let printer = r#"
[printer]
kind = "batch"

[printer.batch]
folder = "printer"
batch_size = 40

[printer.billing]
customer = true
active_subscription = true
"#;
    let spec_path = spec(dir.path(), printer);
    send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "b1"],
        true,
    );
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "b1");
    let sent: Vec<_> = ledger.iter().filter(|r| r.decision == "sent").collect();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join(format!("printer/{CAMPAIGN}-b1.manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["total_rows"].as_u64(), Some(sent.len() as u64));
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), sent.len().div_ceil(40));
    // Each sent row is in the file the ledger names, by its account number.
    let mut rows_in: HashMap<String, String> = HashMap::new();
    for f in files {
        let name = f["name"].as_str().unwrap();
        let text = std::fs::read_to_string(dir.path().join("printer").join(name)).unwrap();
        for line in text.lines().skip(1) {
            let acct = line
                .split(',')
                .find(|c| c.starts_with('A') && c.len() == 6)
                .expect("account column")
                .to_string();
            assert!(rows_in.insert(acct, name.to_string()).is_none());
        }
    }
    assert_eq!(rows_in.len(), sent.len());
    for r in sent {
        let key = r.key.as_ref().unwrap();
        assert_eq!(rows_in.get(key), r.printer_id.as_ref(), "{key}");
    }
    // Approval is off by default for batch printers; the long names are mailed.
    assert!(!ledger
        .iter()
        .any(|r| r.reason.as_deref() == Some("printer_approval_failed")));
}

/// Posts a signed Lob tracking webhook to `broadside serve`; returns the raw answer.
fn post_tracking(addr: &str, secret: &str, body: &str, tamper: bool) -> String {
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut sig = broadside_printers::tracking::sign(secret.as_bytes(), &ts, body.as_bytes());
    if tamper {
        sig = sig.replace('a', "b").replace('0', "1");
    }
    let headers = [
        format!("Lob-Signature: {sig}"),
        format!("Lob-Signature-Timestamp: {ts}"),
    ];
    post_raw(addr, "/webhooks/lob", &headers, body)
}

#[test]
fn printer_tracking_webhooks_become_delivered_and_bounced_events() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 40);
    let spec_path = spec(dir.path(), &lob_printer(&server.base_url, ""));
    send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "t1"],
        true,
    );
    let pieces = server.pieces();
    assert!(pieces.len() >= 3);

    let store = dir.path().join("store");
    let lob_secret = "lob-webhook-signing-secret";
    let (tokens, token) = new_token(dir.path(), WS);
    let serve = Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--rollup-every",
            "0",
            "--tokens",
            tokens.to_str().unwrap(),
        ],
        &[
            ("BROADSIDE_WEBHOOK_SECRET", "a-long-enough-test-secret"),
            ("BROADSIDE_WEBHOOK_WORKSPACE", WS),
            ("BROADSIDE_LOB_WEBHOOK_SECRET", lob_secret),
            ("BROADSIDE_LOB_WEBHOOK_WORKSPACE", WS),
        ],
    );
    // Lob's webhook envelope: the piece comes back with the metadata the send gave it.
    let envelope = |evt: &str, kind: &str, i: usize| {
        serde_json::json!({
            "id": evt,
            "event_type": {"id": format!("postcard.{kind}"), "resource": "postcards"},
            "date_created": "2026-12-01T10:00:00Z",
            "body": {"id": pieces[i].id, "metadata": pieces[i].request["metadata"]},
        })
        .to_string()
    };
    let delivered = envelope("evt_1", "delivered", 0);
    let denied = post_tracking(&serve.addr, lob_secret, &delivered, true);
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let ok = post_tracking(&serve.addr, lob_secret, &delivered, false);
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("\"accepted\":1"),
        "{ok}"
    );
    // At-least-once delivery: the repeat is recognised.
    let again = post_tracking(&serve.addr, lob_secret, &delivered, false);
    assert!(again.contains("\"duplicates\":1"), "{again}");
    let returned = post_tracking(
        &serve.addr,
        lob_secret,
        &envelope("evt_2", "returned_to_sender", 1),
        false,
    );
    assert!(returned.contains("\"accepted\":1"), "{returned}");
    // A milestone that is not an analytics event is acknowledged, not recorded.
    let transit = post_tracking(
        &serve.addr,
        lob_secret,
        &envelope("evt_3", "in_transit", 2),
        false,
    );
    assert!(
        transit.starts_with("HTTP/1.1 200") && transit.contains("\"accepted\":0"),
        "{transit}"
    );

    // The recipient logs show each mailed recipient's state now: delivered → Received,
    // returned → Returned, in transit (not recorded) → still Sent.
    let who = |i: usize| {
        pieces[i].request["metadata"]["recipient"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ledger = read_ledger(&store, WS, CAMPAIGN, "t1");
    for (i, want, event) in [
        (0, "Received", Some("lob-evt_1")),
        (1, "Returned", Some("lob-evt_2")),
        (2, "Sent", None),
    ] {
        let r = ledger
            .iter()
            .find(|r| r.key.as_deref() == Some(who(i).as_str()))
            .unwrap();
        assert_eq!(r.mail_state.as_deref(), Some("Sent"));
        let v = api_get_ok(
            &serve.addr,
            &format!("/campaign-recipient-logs/t1:{}", r.row),
            &token,
            WS,
        );
        assert_eq!(v["mail_state"], "Sent", "{v}");
        assert_eq!(v["current_mail_state"], want, "{v}");
        assert_eq!(v["mail_state_event"].as_str(), event, "{v}");
        let v = api_get_ok(
            &serve.addr,
            &format!("/campaign-recipient-logs/?run_id=t1&key={}", who(i)),
            &token,
            WS,
        );
        assert_eq!(v["items"][0]["current_mail_state"], want, "{v}");

        let out = run(
            &["why", "t1", &who(i), "--store", store.to_str().unwrap()],
            true,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = match event {
            Some(e) => {
                format!("mail state now: {want} (tracking event {e} at 2026-12-01T10:00:00Z)")
            }
            None => "mail state now: Sent (no tracking event moved it)".to_string(),
        };
        assert!(text.contains(&line), "{text}");
    }
    // Another workspace's token sees none of it.
    let (status, _) = api_get(
        &serve.addr,
        &format!("/campaign-recipient-logs/?run_id=t1&key={}", who(0)),
        &token,
        "other",
    );
    assert_eq!(status, 403);
    drop(serve);

    // The events store holds exactly the two events, filed under the piece's campaign and run.
    let day = store.join(format!("events/workspace_id={WS}/date=2026-12-01"));
    let mut got = Vec::new();
    for e in std::fs::read_dir(&day).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&p).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for b in r {
            let b = b.unwrap();
            let col = |n: &str| {
                let c =
                    arrow_cast::cast(b.column_by_name(n).unwrap(), &arrow_schema::DataType::Utf8)
                        .unwrap();
                let s = c
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .unwrap()
                    .clone();
                (0..s.len())
                    .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
                    .collect::<Vec<_>>()
            };
            let (types, emails, runs, camps, bounces) = (
                col("event_type"),
                col("email"),
                col("run_id"),
                col("campaign_id"),
                col("bounce_type"),
            );
            for i in 0..b.num_rows() {
                assert_eq!(runs[i].as_deref(), Some("t1"));
                assert_eq!(camps[i].as_deref(), Some(CAMPAIGN));
                got.push((
                    types[i].clone().unwrap(),
                    emails[i].clone().unwrap(),
                    bounces[i].clone(),
                ));
            }
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("bounced".to_string(), who(1), Some("hard".to_string())),
            ("delivered".to_string(), who(0), None),
        ]
    );
}

/// A local address-enrichment provider (the protocol in `printers/src/enrichment.rs`): finds an
/// address for even keys (row numbers), none for odd ones. Returns its URL and the records seen.
fn start_provider() -> (
    tokio::runtime::Runtime,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use axum::routing::post;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app = axum::Router::new().route(
        "/lookup",
        post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let seen = seen2.clone();
                async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some("Bearer enrich-token")
                    {
                        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({})));
                    }
                    let mut results = Vec::new();
                    for r in body["records"].as_array().unwrap() {
                        let key = r["key"].as_str().unwrap().to_string();
                        seen.lock().unwrap().push(key.clone());
                        let found = key.parse::<u64>().unwrap() % 2 == 0;
                        results.push(serde_json::json!({
                            "key": key,
                            "address": found.then(|| serde_json::json!({
                                "address_line1": "1 Found Rd", "address_city": "Peoria",
                                "address_state": "IL", "address_zip": "61602", "address_country": "US"
                            })),
                        }));
                    }
                    (axum::http::StatusCode::OK, axum::Json(serde_json::json!({"results": results})))
                }
            },
        ),
    );
    let (rt, addr) = serve_local(app);
    (rt, format!("http://{addr}/lookup"), seen)
}

#[test]
fn recipients_without_an_address_are_enriched_or_skipped() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let (_provider, url, seen) = start_provider();
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 60);
    // Every fifth recipient has no street.
    let csv = std::fs::read_to_string(dir.path().join("recipients.csv")).unwrap();
    let csv: Vec<String> = csv
        .lines()
        .enumerate()
        .map(|(n, l)| {
            if n > 0 && (n - 1) % 5 == 0 {
                let mut f: Vec<&str> = l.split(',').collect();
                f[3] = "";
                f.join(",")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(dir.path().join("recipients.csv"), csv.join("\n") + "\n").unwrap();
    let printer = lob_printer(&server.base_url, "").replace(
        "[printer.billing]",
        &format!(
            "[printer.enrichment]\nurl = \"{url}\"\ntoken_env = \"TEST_ENRICH_TOKEN\"\nbatch_size = 5\nbackoff_ms = 1\n\n[printer.billing]"
        ),
    );
    let spec_path = spec(dir.path(), &printer);
    let out = exe()
        .args(["send", spec_path.to_str().unwrap(), "--run-id", "e1"])
        .env("TEST_LOB_KEY", KEY)
        .env("TEST_ENRICH_TOKEN", "enrich-token")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Only the twelve recipients without a street were looked up.
    let mut asked: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|k| k.parse().unwrap())
        .collect();
    asked.sort_unstable();
    assert_eq!(asked, (0..60).step_by(5).collect::<Vec<u64>>());
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "e1");
    let pieces = pieces_by_recipient(&server, "e1");
    let streets: HashMap<String, String> = server
        .pieces()
        .iter()
        .map(|p| {
            (
                p.request["metadata"]["recipient"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                p.request["to"]["address_line1"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    for r in ledger.iter().filter(|r| r.row % 5 == 0) {
        let key = r.key.clone().unwrap();
        if r.decision == "holdout" {
            continue;
        }
        if r.row % 2 == 0 {
            assert_eq!(r.decision, "sent", "{key}: {:?}", r.reason);
            assert_eq!(r.mail_state.as_deref(), Some("Sent"));
            assert_eq!(
                r.detail.as_deref(),
                Some("address from the enrichment provider")
            );
            assert!(pieces.contains_key(&key));
            assert_eq!(streets[&key], "1 Found Rd");
        } else {
            assert_eq!(r.decision, "skipped", "{key}");
            assert_eq!(r.reason.as_deref(), Some("enrichment_failed"));
            assert_eq!(r.mail_state.as_deref(), Some("Skipped"));
            assert!(!pieces.contains_key(&key));
        }
    }
}

#[test]
fn a_mail_send_killed_mid_run_resumes_without_printing_anyone_twice() {
    let rt = runtime();
    // A little latency so the kill lands while pieces are in flight.
    let server = rt.block_on(LobServer::start(KEY, Duration::from_millis(2)));
    let dir = tempfile::tempdir().unwrap();
    // Parquet: batches of 8192 rows, so the run has two.
    common::generate(dir.path(), 12_000, 0, &["--parquet"]);
    std::fs::write(dir.path().join("front.html"), "<h1>{{first_name}}</h1>").unwrap();
    std::fs::write(dir.path().join("back-a.html"), "<p>{{account_number}}</p>").unwrap();
    std::fs::write(
        dir.path().join("back-b.html"),
        "<p>B {{account_number}}</p>",
    )
    .unwrap();
    let printer =
        lob_printer(&server.base_url, "approval = \"none\"").replace("approval = \"lob_us\"\n", "");
    let source = r#"
[source]
type = "parquet"
path = "recipients.parquet"

[columns]
account_number = "account_number"
first_name = "first_name"
last_name = "last_name"
address1 = "address1"
city = "city"
state = "state"
zip = "zip"
country = "country"
"#;
    let spec_path = write_spec(dir.path(), "mail.toml", source, 5.0, &printer);
    let journal = dir
        .path()
        .join("store/staging/run_id=k1/printer-journal.tsv");
    let mut child = exe()
        .args(["send", spec_path.to_str().unwrap(), "--run-id", "k1"])
        .env("TEST_LOB_KEY", KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the first batch is journaled, while the next one is being submitted.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&journal).map_or(0, |m| m.len()) == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the send finished before a batch was journaled"
        );
        assert!(std::time::Instant::now() < deadline, "no batch journaled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first = std::fs::read_to_string(&journal).unwrap().lines().count();
    while server.pieces().len() < first + 200 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the send finished before the kill"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the second batch stalled"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Requests the killed send left at the server finish (or are dropped) before counting.
    while server.in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests left hanging"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let journaled = std::fs::read_to_string(&journal).unwrap().lines().count();
    let before = server.calls();
    let pieces_before = server.pieces().len();
    // Pieces of the second batch were made but not journaled: the resume submits them again
    // and their keys bring back the same pieces.
    assert!(journaled > 0 && pieces_before > journaled);

    let out = send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "k1"],
        true,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "k1");
    assert_eq!(ledger.len(), 12_000);
    let sent: HashMap<String, String> = ledger
        .iter()
        .filter(|r| r.decision == "sent")
        .map(|r| (r.key.clone().unwrap(), r.printer_id.clone().unwrap()))
        .collect();
    // One piece per sent recipient (pieces_by_recipient panics on a second), the one the ledger
    // names.
    let pieces = pieces_by_recipient(&server, "k1");
    assert_eq!(pieces.len(), sent.len());
    for (key, id) in &sent {
        assert_eq!(&pieces[key].0, id, "{key}");
    }
    // The journaled rows were not submitted again.
    let resumed_calls = server.calls() - before;
    assert!(
        resumed_calls as usize <= sent.len() - journaled,
        "{resumed_calls} calls on resume for {} sent, {journaled} journaled",
        sent.len()
    );
    assert!(
        stdout.contains(&format!("{journaled} already printed")),
        "{stdout}"
    );
    // The pieces made but not journaled came back for the run's keys: counted returned, not
    // created. (Counted by the attempt their metadata names, the killed one being the first
    // piece's: a request the killed send left in a socket may still have made a piece.)
    let all = server.pieces();
    let killed = all[0].request["metadata"]["attempt_id"].clone();
    let by_killed = all
        .iter()
        .filter(|p| p.request["metadata"]["attempt_id"] == killed)
        .count();
    let (created, returned) = (all.len() - by_killed, by_killed - journaled);
    assert!(returned >= pieces_before - journaled);
    assert!(
        stdout.contains(&format!(
            "{created} pieces created, {returned} returned as made by an earlier attempt"
        )),
        "{stdout}"
    );
    println!(
        "figure mail_kill_resume sent={} journaled_before_kill={journaled} pieces_before_kill={pieces_before} resume_calls={resumed_calls} duplicates=0",
        sent.len()
    );
}

/// The rows of a run recorded `sent` (none when the run recorded no ledger part).
fn sent_keys(store: &Path, run_id: &str) -> HashSet<String> {
    let dir = store.join(format!(
        "recipient_logs/workspace_id={WS}/campaign_id={CAMPAIGN}/run_id={run_id}"
    ));
    if !dir.exists() {
        return HashSet::new();
    }
    read_ledger(store, WS, CAMPAIGN, run_id)
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.unwrap())
        .collect()
}

/// Recipient `i` of `write_recipients` is mailed when nothing refuses it (the specs of these
/// tests have no holdout).
fn mailed(i: usize) -> bool {
    i % 20 != 7 && i % 25 != 3 && i % 30 != 11
}

/// Makes recipient `i`'s postcard at the server directly, as another process would: under
/// `run`'s key for the recipient, with the metadata of `owner`. Returns the piece's id.
fn precreate(
    rt: &tokio::runtime::Runtime,
    server: &LobServer,
    run: &str,
    owner: &broadside_printers::lob::PieceOwner,
    i: usize,
) -> String {
    use broadside_printers::lob::{Creative, LobClient, LobConfig, MailPiece, RunScope};
    let scope = RunScope {
        workspace_id: WS.into(),
        campaign_id: CAMPAIGN.into(),
        run_id: run.into(),
    };
    let recipient = format!("A{i:05}");
    let mut metadata: std::collections::BTreeMap<String, String> = owner
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("recipient".into(), recipient.clone());
    let piece = MailPiece {
        // The key `broadside send` derives for the recipient in `run` (piece `mail`).
        key: scope.key(&recipient, "mail"),
        description: None,
        to: broadside_printers::Address {
            name: Some(format!("First{i} Last{i}")),
            address_line1: Some(format!("{i} Main St")),
            address_city: Some("Springfield".into()),
            address_state: Some("IL".into()),
            address_zip: Some(format!("627{:02}", i % 100)),
            address_country: Some("US".into()),
            ..Default::default()
        },
        from: None,
        creative: Creative::Postcard {
            front: "<h1>made elsewhere</h1>".into(),
            back: "<p>made elsewhere</p>".into(),
            size: None,
        },
        merge_variables: serde_json::Map::new(),
        metadata,
    };
    let client = LobClient::new(
        LobConfig {
            base_url: server.base_url.clone(),
            ..LobConfig::default()
        },
        KEY,
    )
    .unwrap();
    rt.block_on(client.create(&piece)).unwrap().id
}

fn owner(run: &str, attempt: &str) -> broadside_printers::lob::PieceOwner {
    broadside_printers::lob::PieceOwner {
        run: broadside_printers::lob::RunScope {
            workspace_id: WS.into(),
            campaign_id: CAMPAIGN.into(),
            run_id: run.into(),
        },
        attempt_id: attempt.into(),
    }
}

/// The issue's case: a second campaign sent with a copy of the first one's spec (same
/// `campaign_id`) got the first one's pieces back for its keys and recorded them `Sent`.
#[test]
fn two_runs_of_one_campaign_spec_each_print_their_own_pieces() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 90);
    let printer = lob_printer(&server.base_url, "");
    let first = write_spec(dir.path(), "campaign.toml", CSV_SOURCE, 0.0, &printer);
    let copy = write_spec(dir.path(), "copy.toml", CSV_SOURCE, 0.0, &printer);
    send(&["send", first.to_str().unwrap(), "--run-id", "one"], true);
    let out = send(
        &[
            "send",
            copy.to_str().unwrap(),
            "--run-id",
            "two",
            "--new-run",
        ],
        true,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);

    let store = dir.path().join("store");
    let (one, two) = (sent_keys(&store, "one"), sent_keys(&store, "two"));
    let expect: HashSet<String> = (0..90)
        .filter(|&i| mailed(i))
        .map(|i| format!("A{i:05}"))
        .collect();
    assert_eq!(one, expect);
    assert_eq!(two, expect);
    // Each run made its own piece for every recipient it records sent.
    assert_eq!(server.pieces().len(), 2 * expect.len());
    let keys: HashSet<_> = server
        .pieces()
        .iter()
        .map(|p| p.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), 2 * expect.len(), "no key shared between runs");
    let (p1, p2) = (
        pieces_by_recipient(&server, "one"),
        pieces_by_recipient(&server, "two"),
    );
    for r in read_ledger(&store, WS, CAMPAIGN, "two")
        .iter()
        .filter(|r| r.decision == "sent")
    {
        let key = r.key.as_ref().unwrap();
        assert_eq!(r.printer_id.as_ref(), Some(&p2[key].0), "{key}");
        assert_ne!(p1[key].0, p2[key].0, "{key}");
    }
    assert!(
        stdout.contains(&format!("{} pieces created, 0 returned", expect.len())),
        "{stdout}"
    );
}

/// Pieces an earlier attempt of the run made (its answers or journal lines lost) come back for
/// the run's keys on resume: nothing new is printed for them and they count as returned.
#[test]
fn a_resume_gets_its_runs_pieces_back_and_counts_them_returned() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 60);
    let spec_path = write_spec(
        dir.path(),
        "campaign.toml",
        CSV_SOURCE,
        0.0,
        &lob_printer(&server.base_url, ""),
    );
    let earlier = owner("r2", "an-earlier-attempt");
    let before: HashMap<String, String> = (0..60)
        .filter(|&i| mailed(i) && i % 4 == 0)
        .map(|i| {
            (
                format!("A{i:05}"),
                precreate(&rt, &server, "r2", &earlier, i),
            )
        })
        .collect();
    let out = send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "r2"],
        true,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ledger = read_ledger(&dir.path().join("store"), WS, CAMPAIGN, "r2");
    let sent: Vec<_> = ledger.iter().filter(|r| r.decision == "sent").collect();
    assert_eq!(sent.len(), (0..60).filter(|&i| mailed(i)).count());
    // One piece per recipient: the earlier attempt's where there was one.
    assert_eq!(server.pieces().len(), sent.len());
    for r in &sent {
        let key = r.key.as_ref().unwrap();
        if let Some(id) = before.get(key) {
            assert_eq!(r.printer_id.as_ref(), Some(id), "{key}");
        }
    }
    assert!(
        stdout.contains(&format!(
            "{} pieces submitted: {} pieces created, {} returned as made by an earlier attempt",
            sent.len(),
            sent.len() - before.len(),
            before.len()
        )),
        "{stdout}"
    );
}

/// A piece made for another run under this run's key: the send stops with an error naming
/// that run, and the recipient is not recorded `Sent` (nor journaled, so a resume asks again).
#[test]
fn a_piece_of_another_run_under_this_runs_key_fails_the_send_naming_that_run() {
    let rt = runtime();
    let server = rt.block_on(LobServer::start(KEY, Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    write_recipients(dir.path(), 40);
    let spec_path = write_spec(
        dir.path(),
        "campaign.toml",
        CSV_SOURCE,
        0.0,
        &lob_printer(&server.base_url, ""),
    );
    let foreign = precreate(&rt, &server, "r3", &owner("r-other", "x"), 5);
    let out = send(
        &["send", spec_path.to_str().unwrap(), "--run-id", "r3"],
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to run r-other") && err.contains(&foreign),
        "{err}"
    );
    let store = dir.path().join("store");
    assert_eq!(format!("{:?}", record(&store, WS, "r3").status), "Failed");
    assert!(!sent_keys(&store, "r3").contains("A00005"));
    let journal = std::fs::read_to_string(store.join("staging/run_id=r3/printer-journal.tsv"))
        .unwrap_or_default();
    assert!(!journal.contains(&foreign), "{journal}");
    // The printer made nothing for this run's key: the other run's piece is the only one.
    let key = owner("r3", "").run.key("A00005", "mail");
    let under_key: Vec<_> = server
        .pieces()
        .into_iter()
        .filter(|p| p.idempotency_key.as_deref() == Some(key.as_str()))
        .collect();
    assert_eq!(under_key.len(), 1);
    assert_eq!(under_key[0].id, foreign);
}
