//! End-to-end Kafka ingest against a real Kafka-protocol broker (`noida-db`), grouped by
//! behaviour: crashes, rebalances, broker outages, dead letters, webhooks through Kafka,
//! independent readers.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use broadside_analytics::{run_kafka_ingest, IngestHooks, KafkaIngestConfig};
use common::*;

const PARTITIONS: i32 = 4;

fn events(range: std::ops::Range<usize>) -> Vec<(i32, Vec<u8>)> {
    range
        .map(|i| ((i % PARTITIONS as usize) as i32, event_json(i)))
        .collect()
}

/// Produce N events, SIGKILL the ingest process at random points several times,
/// restart it: every event lands exactly once.
#[test]
fn crash_restart_exactly_once() -> Result<()> {
    const N: usize = 12_000;
    let broker = Broker::start()?;
    let mut rng = Rng::from_env();
    let store = tempfile::tempdir()?;
    create_topic(&broker.brokers, "events", PARTITIONS)?;
    produce(&broker.brokers, "events", &events(0..N))?;

    // A restarted worker keeps its static group membership, as a pod restarted under
    // the same name would: the broker hands its partitions straight back instead of
    // waiting for the killed member's session to expire.
    const STATIC: &[&str] = &["-X", "group.instance.id=crashy-1"];
    for round in 0..4 {
        let t0 = std::time::Instant::now();
        let mut w = Worker::spawn(&broker.brokers, "crashy", "events", store.path(), STATIC)?;
        let commits = 1 + rng.below(3) as usize;
        w.wait_commits(1, Duration::from_secs(60))?;
        eprintln!("round {round}: first commit after {:?}", t0.elapsed());
        w.wait_commits(commits - 1, Duration::from_secs(60))?;
        // A random extra delay puts the kill anywhere inside the next flush.
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        w.sigkill()?;
        let on_disk = committed_rows(store.path())?;
        eprintln!("round {round}: killed after {commits} commits, {on_disk} rows on disk");
        assert!(
            on_disk < N as u64 || round > 0,
            "kill must happen mid-stream"
        );
    }
    let mut w = Worker::spawn(&broker.brokers, "crashy", "events", store.path(), STATIC)?;
    wait_until(Duration::from_secs(90), "all events on disk", || {
        Ok(committed_rows(store.path())? >= N as u64)
    })?;
    w.stop()?;

    let ids = read_event_ids(store.path())?;
    assert_exactly_once(&ids, (0..N).map(|i| format!("ev-{i:08}")));
    assert!(dead_letters(store.path())?.is_empty());

    // An independent reader sees the same rows and the documented schema.
    let (rows, distinct, schema) = pyarrow_summary(store.path())?;
    assert_eq!((rows, distinct), (N as u64, N as u64));
    assert_eq!(
        schema,
        "event_id:string:notnull,campaign_id:string:notnull,variant:string:null,run_id:string:null,\
         email:string:notnull,event_type:string:notnull,bounce_type:string:null,url:string:null,\
         ts:timestamp[us, tz=UTC]:notnull,workspace_id:string:null,date:string:null"
    );
    Ok(())
}

/// Two ingest processes in one group, a member joining and leaving mid-stream.
#[test]
fn group_member_joins_and_leaves_exactly_once() -> Result<()> {
    const N: usize = 12_000;
    let broker = Broker::start()?;
    let store = tempfile::tempdir()?;
    create_topic(&broker.brokers, "events", PARTITIONS)?;
    produce(&broker.brokers, "events", &events(0..N / 3))?;

    let mut a = Worker::spawn(&broker.brokers, "pair", "events", store.path(), &[])?;
    a.wait_commits(2, Duration::from_secs(60))?;
    let mut b = Worker::spawn(&broker.brokers, "pair", "events", store.path(), &[])?;
    produce(&broker.brokers, "events", &events(N / 3..2 * N / 3))?;
    // B only commits once the group rebalanced and gave it partitions.
    b.wait_commits(1, Duration::from_secs(60))?;
    produce(&broker.brokers, "events", &events(2 * N / 3..N))?;
    b.wait_commits(1, Duration::from_secs(60))?;
    b.stop()?; // leaves the group: its partitions move back to A
    wait_until(Duration::from_secs(90), "all events on disk", || {
        Ok(committed_rows(store.path())? >= N as u64)
    })?;
    a.stop()?;

    let ids = read_event_ids(store.path())?;
    assert_exactly_once(&ids, (0..N).map(|i| format!("ev-{i:08}")));
    Ok(())
}

/// The broker goes away mid-stream (frozen for 3 s, 60 s with `BROADSIDE_LONG=1`: no answers,
/// hanging connections) while the ingest keeps running and more events are produced as soon
/// as it is back: every event lands exactly once. The time from the broker's return to the
/// last event on disk is the figure.
#[test]
fn broker_outage_exactly_once() -> Result<()> {
    const N: usize = 9_000;
    let outage = if std::env::var_os("BROADSIDE_LONG").is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(3)
    };
    let mut broker = Broker::start()?;
    let store = tempfile::tempdir()?;
    create_topic(&broker.brokers, "events", PARTITIONS)?;
    produce(&broker.brokers, "events", &events(0..2 * N / 3))?;

    let mut w = Worker::spawn(&broker.brokers, "outage", "events", store.path(), &[])?;
    w.wait_commits(1, Duration::from_secs(60))?;
    broker.freeze(true);
    let before = committed_rows(store.path())?;
    // The outage itself: the scenario's length, not a wait for a result.
    std::thread::sleep(outage);
    assert!(
        w.child.try_wait()?.is_none(),
        "the ingest must ride out a broker outage, not exit"
    );
    broker.freeze(false);
    let back = std::time::Instant::now();
    produce(&broker.brokers, "events", &events(2 * N / 3..N))?;
    wait_until(Duration::from_secs(180), "all events on disk", || {
        Ok(committed_rows(store.path())? >= N as u64)
    })?;
    let catch_up = back.elapsed();
    w.stop()?;

    let ids = read_event_ids(store.path())?;
    assert_exactly_once(&ids, (0..N).map(|i| format!("ev-{i:08}")));
    println!(
        "figure broker_outage events={N} outage_s={} rows_before_outage={before} catch_up_s={:.1} duplicates=0 missing=0",
        outage.as_secs(),
        catch_up.as_secs_f64()
    );
    Ok(())
}

/// 1% poison records: each lands in the dead letters with its bytes, position and
/// reason; every good record lands.
#[test]
fn poison_records_go_to_dead_letters() -> Result<()> {
    const N: usize = 5_000;
    let broker = Broker::start()?;
    let store = tempfile::tempdir()?;
    create_topic(&broker.brokers, "mixed", PARTITIONS)?;
    let poisons: [&[u8]; 5] = [
        b"{not json",
        b"\xff\xfe\x00binary",
        br#"{"event_id":"x","workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"exploded","ts":1}"#,
        br#"{"event_id":"x","workspace_id":"w","campaign_id":"c","event_type":"opened","ts":1}"#,
        br#"{"event_id":7,"workspace_id":"w","campaign_id":"c","email":"a@b.co","event_type":"opened","ts":1}"#,
    ];
    let mut records = Vec::new();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for i in 0..N {
        let p = (i % PARTITIONS as usize) as i32;
        if i % 100 == 37 {
            let payload = poisons[(i / 100) % poisons.len()].to_vec();
            bad.push(payload.clone());
            records.push((p, payload));
        } else {
            good.push(format!("ev-{i:08}"));
            records.push((p, event_json(i)));
        }
    }
    produce(&broker.brokers, "mixed", &records)?;

    let mut cfg = KafkaIngestConfig::new(&broker.brokers, "poison", &["mixed"], store.path());
    cfg.flush.max_records = 700;
    cfg.flush.idle_ms = 200;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let ingest = std::thread::spawn(move || run_kafka_ingest(&cfg, IngestHooks::default(), &stop2));
    let expect_dead = bad.len();
    wait_until(Duration::from_secs(90), "all records committed", || {
        Ok(committed_rows(store.path())? as usize >= good.len()
            && dead_letters(store.path())?.len() >= expect_dead)
    })?;
    stop.store(true, Ordering::SeqCst);
    let stats = ingest.join().expect("ingest thread")?;
    assert_eq!(stats.dead_letters as usize, expect_dead);

    let dl = dead_letters(store.path())?;
    assert_eq!(
        dl.len(),
        bad.len(),
        "dead-letter count equals injected poison"
    );
    let mut positions = HashSet::new();
    for d in &dl {
        assert_eq!(d["source"], "kafka");
        assert_eq!(d["topic"], "mixed");
        assert!(d["reason"].as_str().is_some_and(|r| !r.is_empty()));
        positions.insert((
            d["partition"].as_i64().unwrap(),
            d["offset"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        positions.len(),
        bad.len(),
        "each dead letter names a distinct position"
    );
    let reasons: HashSet<_> = dl
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    let want: HashSet<String> = [
        "malformed_json",
        "not_utf8",
        "unknown_event_type",
        "missing_field",
        "wrong_type",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(reasons, want);
    // Original bytes are kept: text verbatim, binary as base64.
    let texts: HashSet<_> = dl
        .iter()
        .filter_map(|d| d["payload"].as_str())
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for b in bad.iter().filter(|b| std::str::from_utf8(b).is_ok()) {
        assert!(
            texts.contains(b),
            "payload {:?} not kept verbatim",
            String::from_utf8_lossy(b)
        );
    }
    assert!(dl.iter().any(|d| d["payload_base64"] == "//4AYmluYXJ5"));

    let ids = read_event_ids(store.path())?;
    assert_exactly_once(&ids, good);
    Ok(())
}

/// Against the real broker named by `BROADSIDE_KAFKA_BROKERS` (e.g. the compose service).
#[test]
fn real_broker_from_env_round_trip() -> Result<()> {
    let Ok(brokers) = std::env::var("BROADSIDE_KAFKA_BROKERS") else {
        eprintln!("BROADSIDE_KAFKA_BROKERS not set: nothing to check against an external broker");
        return Ok(());
    };
    const N: usize = 2_000;
    let topic = format!("broadside-test-{}", std::process::id());
    create_topic(&brokers, &topic, 2)?;
    produce(
        &brokers,
        &topic,
        &(0..N)
            .map(|i| ((i % 2) as i32, event_json(i)))
            .collect::<Vec<_>>(),
    )?;
    let store = tempfile::tempdir()?;
    let mut cfg = KafkaIngestConfig::new(&brokers, &format!("{topic}-g"), &[&topic], store.path());
    cfg.flush.idle_ms = 300;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let ingest = std::thread::spawn(move || run_kafka_ingest(&cfg, IngestHooks::default(), &stop2));
    wait_until(Duration::from_secs(120), "all events on disk", || {
        Ok(committed_rows(store.path())? >= N as u64)
    })?;
    stop.store(true, Ordering::SeqCst);
    ingest.join().expect("ingest thread")?;
    assert_exactly_once(
        &read_event_ids(store.path())?,
        (0..N).map(|i| format!("ev-{i:08}")),
    );
    Ok(())
}

/// Webhook deliveries into Kafka, then `broadside ingest` from the topic: the intake answers
/// only after the broker acknowledged, a redelivered batch is dropped by event id, and every
/// accepted event lands in the store exactly once.
#[test]
fn webhook_events_through_kafka_land_exactly_once() -> Result<()> {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use broadside_analytics::webhook::{webhook_router, WebhookConfig, WebhookSink};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const SECRET: &str = "0123456789abcdef-secret";
    const BATCHES: usize = 6;
    const PER_BATCH: usize = 50;
    let broker = Broker::start()?;
    let store = tempfile::tempdir()?;
    create_topic(&broker.brokers, "hooks", PARTITIONS)?;
    let app = webhook_router(
        WebhookConfig::new(SECRET),
        WebhookSink::kafka(&broker.brokers, "hooks")?,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let post = |body: String| -> Result<(StatusCode, serde_json::Value)> {
        rt.block_on(async {
            let req = Request::post("/webhooks/events")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {SECRET}"))
                .body(Body::from(body))?;
            let resp = app.clone().oneshot(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok((status, serde_json::from_slice(&bytes)?))
        })
    };
    let batch = |b: usize| -> String {
        let items: Vec<String> = (b * PER_BATCH..(b + 1) * PER_BATCH)
            .map(|i| String::from_utf8(event_json(i)).unwrap())
            .collect();
        format!("[{}]", items.join(","))
    };
    for b in 0..BATCHES {
        let (s, body) = post(batch(b))?;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"].as_u64(), Some(PER_BATCH as u64), "{body}");
    }
    // The provider redelivers a batch it did not see answered: nothing new goes to Kafka.
    let (s, body) = post(batch(2))?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(PER_BATCH as u64)),
        "{body}"
    );

    let n = BATCHES * PER_BATCH;
    let mut w = Worker::spawn(&broker.brokers, "hooks", "hooks", store.path(), &[])?;
    wait_until(
        Duration::from_secs(90),
        "every webhook event on disk",
        || Ok(committed_rows(store.path())? >= n as u64),
    )?;
    w.stop()?;
    let ids = read_event_ids(store.path())?;
    assert_exactly_once(&ids, (0..n).map(|i| format!("ev-{i:08}")));
    assert!(dead_letters(store.path())?.is_empty());
    Ok(())
}
