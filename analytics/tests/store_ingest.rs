//! File ingest, suppression build and webhooks against a store on disk (no broker).

mod common;

use std::io::Write;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use broadside_analytics::suppression::{
    build_suppression, SuppressionBuildConfig, SuppressionReason,
};
use broadside_analytics::webhook::{webhook_router, WebhookConfig, WebhookCredential, WebhookSink};
use broadside_analytics::{ingest_file, FileIngestConfig, IngestHooks};
use common::*;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[test]
fn file_ingest_resumes_by_line_and_never_duplicates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let input = dir.path().join("events.ndjson");
    let mut f = std::fs::File::create(&input)?;
    for i in 0..1500 {
        f.write_all(&event_json(i))?;
        f.write_all(b"\n")?;
    }
    f.write_all(b"{broken\n\n")?;
    f.flush()?;
    let mut cfg = FileIngestConfig::new(&input, &store);
    cfg.flush.max_records = 400;
    let first = ingest_file(&cfg, &IngestHooks::default())?;
    assert_eq!((first.rows, first.dead_letters), (1500, 1));
    // Appending and re-running ingests only the new lines.
    for i in 1500..2000 {
        f.write_all(&event_json(i))?;
        f.write_all(b"\r\n")?;
    }
    f.flush()?;
    let second = ingest_file(&cfg, &IngestHooks::default())?;
    assert_eq!(second.rows, 500);
    assert_eq!(second.skipped_committed, 1502);
    let third = ingest_file(&cfg, &IngestHooks::default())?;
    assert_eq!(
        third.rows + third.dead_letters,
        0,
        "a finished file writes nothing"
    );

    assert_exactly_once(
        &read_event_ids(&store)?,
        (0..2000).map(|i| format!("ev-{i:08}")),
    );
    let dl = dead_letters(&store)?;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0]["line"], 1501);
    assert_eq!(dl[0]["payload"], "{broken");
    assert_eq!(dl[0]["reason"], "malformed_json");
    Ok(())
}

fn write_events(path: &std::path::Path, range: std::ops::Range<usize>) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for i in range {
        f.write_all(&event_json(i))?;
        f.write_all(b"\n")?;
    }
    Ok(())
}

/// Regression (issue: ingest skipped data silently): a file rotated or replaced at the same
/// path was taken for the old one and its first lines skipped as "already committed", and a
/// half-written last line was committed as a dead letter, its completed version never read.
/// A file is now known by device, inode and first line; a last line without its newline
/// waits for the next run.
#[test]
fn rotated_file_and_half_written_line_land_exactly_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let input = dir.path().join("events.ndjson");
    write_events(&input, 0..100)?;
    let mut cfg = FileIngestConfig::new(&input, &store);
    cfg.flush.max_records = 30;
    assert_eq!(ingest_file(&cfg, &IngestHooks::default())?.rows, 100);

    // Rotation: the file moves away, a new one starts at the same path, its last line
    // half written.
    let rotated = dir.path().join("events.ndjson.1");
    std::fs::rename(&input, &rotated)?;
    write_events(&input, 100..150)?;
    let line150 = event_json(150);
    let (head, tail) = line150.split_at(40);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)?
        .write_all(head)?;
    let second = ingest_file(&cfg, &IngestHooks::default())?;
    assert_eq!((second.rows, second.dead_letters), (50, 0));
    assert!(
        dead_letters(&store)?.is_empty(),
        "a half line is no dead letter"
    );

    // The rotated file under its new name is still the same file: nothing new in it.
    let moved = ingest_file(
        &FileIngestConfig::new(&rotated, &store),
        &IngestHooks::default(),
    )?;
    assert_eq!((moved.rows, moved.skipped_committed), (0, 100));

    // The half line is completed and another follows: both land, once.
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&input)?;
        f.write_all(tail)?;
        f.write_all(b"\n")?;
    }
    write_events(&input, 151..152)?;
    assert_eq!(ingest_file(&cfg, &IngestHooks::default())?.rows, 2);

    // Replaced in place (same inode, truncated and rewritten): a new file too.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&input)?;
    write_events(&input, 152..160)?;
    assert_eq!(ingest_file(&cfg, &IngestHooks::default())?.rows, 8);
    assert_eq!(ingest_file(&cfg, &IngestHooks::default())?.rows, 0);

    assert_exactly_once(
        &read_event_ids(&store)?,
        (0..160).map(|i| format!("ev-{i:08}")),
    );
    assert!(dead_letters(&store)?.is_empty());

    // An explicit source id follows the file it was started with, and refuses another.
    let mut named = FileIngestConfig::new(&rotated, &store);
    named.source_id = Some("feed".into());
    assert_eq!(ingest_file(&named, &IngestHooks::default())?.rows, 100);
    named.path = input.clone();
    let err = ingest_file(&named, &IngestHooks::default()).unwrap_err();
    assert!(
        err.to_string().contains("is not the file source `feed`"),
        "{err}"
    );
    Ok(())
}

#[test]
fn suppression_build_collects_hard_bounces_complaints_unsubscribes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let input = dir.path().join("e.ndjson");
    let lines = [
        r#"{"event_id":"1","workspace_id":"acme","campaign_id":"c","email":" Bob@X.io ","event_type":"bounced","bounce_type":"hard","ts":1700000000}"#,
        r#"{"event_id":"2","workspace_id":"acme","campaign_id":"c","email":"bob@x.io","event_type":"bounced","bounce_type":"hard","ts":1700090000}"#,
        r#"{"event_id":"3","workspace_id":"acme","campaign_id":"c","email":"soft@x.io","event_type":"bounced","bounce_type":"soft","ts":1700000000}"#,
        r#"{"event_id":"4","workspace_id":"acme","campaign_id":"c","email":"spam@x.io","event_type":"complained","ts":1700000000}"#,
        r#"{"event_id":"5","workspace_id":"acme","campaign_id":"c","email":"bye@x.io","event_type":"unsubscribed","ts":1700000000}"#,
        r#"{"event_id":"6","workspace_id":"other","campaign_id":"c","email":"not-mine@x.io","event_type":"complained","ts":1700000000}"#,
        r#"{"event_id":"7","workspace_id":"acme","campaign_id":"c","email":"open@x.io","event_type":"opened","ts":1700000000}"#,
    ];
    std::fs::write(&input, lines.join("\n"))?;
    ingest_file(
        &FileIngestConfig::new(&input, &store),
        &IngestHooks::default(),
    )?;
    let csv = dir.path().join("old_bounces.csv");
    std::fs::write(
        &csv,
        "email,bounce_type\nOld@Y.io,hard\nsoft-old@y.io,soft\n",
    )?;
    let out = dir.path().join("suppression");
    let cfg = SuppressionBuildConfig {
        store: store.clone(),
        workspace_id: "acme".into(),
        out_dir: out.clone(),
        bounce_csvs: vec![csv],
        soft_bounces: Default::default(),
    };
    let snap = build_suppression(&cfg)?;
    let read = |r: SuppressionReason| std::fs::read_to_string(out.join(r.file_name())).unwrap();
    assert_eq!(
        read(SuppressionReason::HardBounce),
        "email\nbob@x.io\nold@y.io\n"
    );
    assert_eq!(read(SuppressionReason::Complaint), "email\nspam@x.io\n");
    assert_eq!(read(SuppressionReason::Unsubscribed), "email\nbye@x.io\n");
    assert_eq!(snap.lists[&SuppressionReason::HardBounce].count, 2);
    let on_disk: broadside_analytics::suppression::SuppressionSnapshot =
        serde_json::from_slice(&std::fs::read(out.join("snapshot.json"))?)?;
    assert_eq!(on_disk, snap);
    // Same inputs, same lists, same id: a send can tell whether the snapshot changed.
    assert_eq!(build_suppression(&cfg)?.snapshot_id, snap.snapshot_id);
    Ok(())
}

async fn post(
    app: &axum::Router,
    uri: &str,
    ctype: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::post(uri).header("content-type", ctype);
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn webhooks_authenticate_decode_dedupe_and_store() -> Result<()> {
    const SECRET: &str = "0123456789abcdef-secret";
    const GLOBEX: &str = "0123456789abcdef-globex";
    let dir = tempfile::tempdir()?;
    let store = dir.path().to_path_buf();
    let app = webhook_router(
        WebhookConfig::new(vec![
            WebhookCredential::from_secret("acme", SECRET, "acme")?,
            WebhookCredential::from_secret("globex", GLOBEX, "globex")?,
        ]),
        WebhookSink::store(&store),
    )?;
    let form = "event=bounced&when=1700000000&email%5B0%5D=a%40x.io&email%5B1%5D=b%40x.io";
    let uri = format!("/webhooks/callback?workspace_id=acme&campaign_id=42&token={SECRET}");

    let (s, _) = post(
        &app,
        "/webhooks/callback?workspace_id=acme&campaign_id=42&token=nope",
        "application/x-www-form-urlencoded",
        None,
        form,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = post(&app, &uri, "application/x-www-form-urlencoded", None, form).await;
    assert_eq!((s, body["accepted"].as_u64()), (StatusCode::OK, Some(2)));
    // The provider redelivers the same callback: nothing new lands.
    let (s, body) = post(&app, &uri, "application/x-www-form-urlencoded", None, form).await;
    assert_eq!(
        (s, body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (StatusCode::OK, Some(0), Some(2))
    );

    // event_json(1) is globex's, event_json(2) acme's: each with its own workspace's secret.
    for (i, secret) in [(1, GLOBEX), (2, SECRET)] {
        let batch = format!("[{}]", String::from_utf8(event_json(i))?);
        let (s, body) = post(
            &app,
            "/webhooks/events",
            "application/json",
            Some(secret),
            &batch,
        )
        .await;
        assert_eq!((s, body["accepted"].as_u64()), (StatusCode::OK, Some(1)));
    }
    // acme's secret cannot write globex's event.
    let batch = format!("[{}]", String::from_utf8(event_json(3))?);
    let (s, body) = post(
        &app,
        "/webhooks/events",
        "application/json",
        Some(SECRET),
        &batch,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        (body["field"].as_str(), body["refused"].as_u64()),
        (Some("workspace_id"), Some(1))
    );
    let bad = r#"[{"event_id":"x","workspace_id":"acme","campaign_id":"c","email":"a@b.co","event_type":"nope","ts":1}]"#;
    let (s, body) = post(
        &app,
        "/webhooks/events",
        "application/json",
        Some(SECRET),
        bad,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["reason"], "unknown_event_type");

    let ids = read_event_ids(&store)?;
    assert_eq!(ids.len(), 4);
    assert!(ids.contains(&"ev-00000001".to_string()));
    Ok(())
}
