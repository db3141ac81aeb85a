//! Scenario 5 of the reliability suite, "poison and drift", at scale: N records through a real
//! Kafka-protocol broker (`noida-db`), 1 % of them poison of every kind the decoder refuses
//! (bad JSON, wrong types, missing fields, unknown event type), and 10 % "drift" records that
//! must be accepted (extra fields, nested extra objects, another field order, nulls and
//! whitespace). The ingest runs in-process (`run_kafka_ingest`, as in `kafka_ingest.rs`).
//!
//! Asserted: dead letters = injected poison, per kind, each with the record's original bytes,
//! its topic, partition and offset, and the reason code of its kind; every good record (drift
//! included) is in the Parquet store exactly once; the ingest finishes within a deadline.
//! Measured, not asserted (`figure drift …` lines): the longest interval between consecutive
//! commits (a commit is what makes rows and dead letters visible in the store), the time to
//! the first commit, and events/s of the poisoned run against a clean run of the same size.
//!
//! Short: 50 000 records. Long (`BROADSIDE_LONG=1`): 1 000 000 (`BROADSIDE_TEST_EVENTS` sets
//! another count). Topics get one partition per 16 MiB of records (at least 4). With noida-db
//! the long run currently stops at once with librdkafka's `BadMessage` from 600 000 records up
//! (7 and 12 partitions); 400 000 run through (docs/reliability.md, scenarios 3 and 5).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use broadside_analytics::{run_kafka_ingest, IngestHooks, IngestStats, KafkaIngestConfig};
use common::*;
use serde_json::{json, Value};

/// What a poison record is, and the dead-letter reason code it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Poison {
    /// A valid record cut in the middle.
    Truncated,
    /// Plain text.
    NotJson,
    /// A record with bytes that are not UTF-8 inside a string.
    InvalidUtf8,
    /// A JSON array instead of an object.
    NotAnObject,
    /// `ts` as text that is no time (a string where a number or RFC 3339 time is expected).
    StringForTime,
    /// `campaign_id` as a number.
    NumberForString,
    /// `email` as an array of two addresses.
    ArrayForEmail,
    /// `workspace_id` as an object.
    ObjectForString,
    /// No `email`.
    MissingEmail,
    /// No `event_id`.
    MissingEventId,
    /// `workspace_id` null.
    NullWorkspace,
    /// No `ts`.
    MissingTs,
    /// `event_type` not a known type.
    UnknownEventType,
}

const POISONS: [Poison; 13] = [
    Poison::Truncated,
    Poison::NotJson,
    Poison::InvalidUtf8,
    Poison::NotAnObject,
    Poison::StringForTime,
    Poison::NumberForString,
    Poison::ArrayForEmail,
    Poison::ObjectForString,
    Poison::MissingEmail,
    Poison::MissingEventId,
    Poison::NullWorkspace,
    Poison::MissingTs,
    Poison::UnknownEventType,
];

impl Poison {
    /// The reason code the dead letter must carry, and a text its `detail` must contain.
    fn expected(self) -> (&'static str, &'static str) {
        match self {
            Poison::Truncated => ("malformed_json", "EOF"),
            Poison::NotJson => ("malformed_json", "expected"),
            Poison::InvalidUtf8 => ("not_utf8", "UTF-8"),
            Poison::NotAnObject => ("wrong_type", "invalid type"),
            Poison::StringForTime => ("invalid_timestamp", "not-a-time"),
            Poison::NumberForString => ("wrong_type", "integer"),
            Poison::ArrayForEmail => ("wrong_type", "email"),
            Poison::ObjectForString => ("wrong_type", "map"),
            Poison::MissingEmail => ("missing_field", "`email`"),
            Poison::MissingEventId => ("missing_field", "`event_id`"),
            Poison::NullWorkspace => ("missing_field", "`workspace_id`"),
            Poison::MissingTs => ("missing_field", "`ts`"),
            Poison::UnknownEventType => ("unknown_event_type", "exploded"),
        }
    }
}

/// Drift an ingest must accept.
#[derive(Debug, Clone, Copy)]
enum Drift {
    /// Unknown scalar and array fields.
    ExtraFields,
    /// Nested unknown objects.
    NestedExtra,
    /// The fields in reverse order.
    Reordered,
    /// Optional fields null, pretty-printed with whitespace, escaped characters.
    NullsAndWhitespace,
}

const DRIFTS: [Drift; 4] = [
    Drift::ExtraFields,
    Drift::NestedExtra,
    Drift::Reordered,
    Drift::NullsAndWhitespace,
];

/// The fields of the i-th event, in the documented order.
fn fields(i: usize) -> Vec<(&'static str, Value)> {
    let types = [
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "unsubscribed",
        "complained",
    ];
    let t = types[i % types.len()];
    let mut f = vec![
        ("event_id", json!(format!("ev-{i:08}"))),
        ("workspace_id", json!(["acme", "globex"][i % 2])),
        ("campaign_id", json!(format!("c{}", i % 5))),
        ("variant", json!("A")),
        ("run_id", json!("r1")),
        ("email", json!(format!("user{i}@example.com"))),
        ("event_type", json!(t)),
    ];
    match t {
        "bounced" => f.push(("bounce_type", json!("hard"))),
        "clicked" => f.push(("url", json!(format!("https://example.com/p/{i}")))),
        _ => {}
    }
    f.push((
        "ts",
        json!(format!("2026-03-0{}T12:00:00Z", 1 + (i / 7) % 3)),
    ));
    f
}

fn render(fields: &[(&str, Value)], sep: &str) -> Vec<u8> {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    format!("{{{sep}{}{sep}}}", body.join(&format!(",{sep}"))).into_bytes()
}

fn with(
    mut f: Vec<(&'static str, Value)>,
    key: &'static str,
    v: Value,
) -> Vec<(&'static str, Value)> {
    match f.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = v,
        None => f.push((key, v)),
    }
    f
}

fn without(f: Vec<(&'static str, Value)>, key: &str) -> Vec<(&'static str, Value)> {
    f.into_iter().filter(|(k, _)| *k != key).collect()
}

fn poison_record(i: usize, kind: Poison) -> Vec<u8> {
    let good = render(&fields(i), "");
    match kind {
        Poison::Truncated => good[..good.len() / 2].to_vec(),
        Poison::NotJson => format!("record {i} is not JSON at all").into_bytes(),
        Poison::InvalidUtf8 => {
            let mut b = render(&with(fields(i), "campaign_id", json!("c-XX")), "");
            let at = b.windows(4).position(|w| w == b"c-XX").unwrap() + 2;
            b[at] = 0xff;
            b[at + 1] = 0xfe;
            b
        }
        Poison::NotAnObject => {
            let mut b = b"[".to_vec();
            b.extend_from_slice(&good);
            b.push(b']');
            b
        }
        Poison::StringForTime => render(&with(fields(i), "ts", json!("not-a-time")), ""),
        Poison::NumberForString => render(&with(fields(i), "campaign_id", json!(i)), ""),
        Poison::ArrayForEmail => render(
            &with(
                fields(i),
                "email",
                json!([format!("a{i}@example.com"), format!("b{i}@example.com")]),
            ),
            "",
        ),
        Poison::ObjectForString => {
            render(&with(fields(i), "workspace_id", json!({"id": "acme"})), "")
        }
        Poison::MissingEmail => render(&without(fields(i), "email"), ""),
        Poison::MissingEventId => render(
            &with(
                without(fields(i), "event_id"),
                "note",
                json!(format!("poison {i}")),
            ),
            "",
        ),
        Poison::NullWorkspace => render(&with(fields(i), "workspace_id", Value::Null), ""),
        Poison::MissingTs => render(&without(fields(i), "ts"), ""),
        Poison::UnknownEventType => render(&with(fields(i), "event_type", json!("exploded")), ""),
    }
}

fn drift_record(i: usize, kind: Drift) -> Vec<u8> {
    match kind {
        Drift::ExtraFields => {
            let mut f = fields(i);
            f.insert(1, ("schema_version", json!(3)));
            f.push(("x_source", json!("crm")));
            f.push(("x_score", json!(0.25)));
            f.push(("x_tags", json!(["a", "b", 7, null])));
            f.push(("telephone_hint", json!(false)));
            render(&f, "")
        }
        Drift::NestedExtra => {
            let mut f = fields(i);
            f.insert(
                3,
                (
                    "meta",
                    json!({"a": {"b": [1, {"c": null, "event_id": "not-this-one"}], "d": "e"}}),
                ),
            );
            f.push((
                "context",
                json!({"user_agent": "x/1.0", "geo": {"lat": 1.5, "lon": -2}}),
            ));
            render(&f, "")
        }
        Drift::Reordered => {
            let mut f = fields(i);
            f.reverse();
            render(&f, "")
        }
        Drift::NullsAndWhitespace => {
            let f = with(
                with(fields(i), "variant", Value::Null),
                "run_id",
                Value::Null,
            );
            let mut b = render(&f, "\n  ");
            // An escaped character in a value the store keeps as text.
            let text = String::from_utf8(b).unwrap().replace("\"c", "\"\\u0063");
            b = text.into_bytes();
            b
        }
    }
}

/// What the i-th record is.
enum Record {
    Good,
    Drift(Drift),
    Poison(Poison),
}

fn record_kind(i: usize) -> Record {
    if i % 100 == 37 {
        Record::Poison(POISONS[(i / 100) % POISONS.len()])
    } else if i % 10 == 3 {
        Record::Drift(DRIFTS[(i / 10) % DRIFTS.len()])
    } else {
        Record::Good
    }
}

fn record(i: usize) -> Vec<u8> {
    match record_kind(i) {
        Record::Good => render(&fields(i), ""),
        Record::Drift(d) => drift_record(i, d),
        Record::Poison(p) => poison_record(i, p),
    }
}

/// Standard base64 (with padding) back to bytes; how dead letters keep non-UTF-8 payloads.
fn unbase64(s: &str) -> Result<Vec<u8>> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).context("not base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// One ingest run's progress, observed at every commit.
struct Run {
    stats: IngestStats,
    secs: f64,
    first_commit_s: f64,
    longest_gap_s: f64,
    commits: usize,
}

/// Runs the ingest in-process on `topic` until `records` records are committed (rows + dead
/// letters), recording the instant of every commit.
fn ingest(
    brokers: &str,
    topic: &str,
    store: &std::path::Path,
    records: u64,
    long: bool,
) -> Result<Run> {
    let mut cfg = KafkaIngestConfig::new(brokers, &format!("{topic}-g"), &[topic], store);
    cfg.flush.max_records = if long { 5_000 } else { 1_000 };
    cfg.flush.idle_ms = 200;
    let seen = Arc::new(AtomicU64::new(0));
    let commits = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let hooks = IngestHooks {
        on_commit: Some(Box::new({
            let seen = Arc::clone(&seen);
            let commits = Arc::clone(&commits);
            move |c| {
                commits.lock().unwrap().push(Instant::now());
                seen.fetch_add(c.rows + c.dead_letters, Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handle = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || run_kafka_ingest(&cfg, hooks, &stop)
    });
    let deadline = Duration::from_secs(120 + records / 2_000);
    let waited = wait_until(deadline, "every record committed", || {
        if handle.is_finished() {
            bail!("the ingest stopped before committing every record");
        }
        Ok(seen.load(Ordering::SeqCst) >= records)
    });
    stop.store(true, Ordering::SeqCst);
    let stats = handle.join().expect("ingest thread")?;
    waited?;
    let times = commits.lock().unwrap().clone();
    let last = *times.last().context("no commit")?;
    let longest_gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    Ok(Run {
        stats,
        secs: (last - start).as_secs_f64(),
        first_commit_s: (times[0] - start).as_secs_f64(),
        longest_gap_s: longest_gap.as_secs_f64(),
        commits: times.len(),
    })
}

/// Poison and drift at scale, with the stall figure (see the module docs).
#[test]
fn poison_and_drift_at_scale() -> Result<()> {
    let long = std::env::var_os("BROADSIDE_LONG").is_some();
    let n: usize = std::env::var("BROADSIDE_TEST_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if long { 1_000_000 } else { 50_000 });
    let sample: usize = (0..1_000).map(|i| record(i).len()).sum();
    let bytes = sample as u64 * n as u64 / 1_000;
    let partitions = bytes.div_ceil(16 << 20).max(4) as i32;

    let broker = Broker::start()?;
    create_topic(&broker.brokers, "drift", partitions)?;
    eprintln!("{n} records, about {bytes} bytes, {partitions} partitions per topic");

    // Produce in chunks, noting where each poison record lands: the
    // offset of a record is its position among the records produced to its partition.
    let mut poison_at: HashMap<(i64, i64), (usize, Poison, Vec<u8>)> = HashMap::new();
    let mut injected: BTreeMap<Poison, usize> = BTreeMap::new();
    let mut next_offset = vec![0i64; partitions as usize];
    let mut good_ids = Vec::new();
    let mut drift = 0usize;
    let produce_start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        let mut batch = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let p = (i % partitions as usize) as i32;
            let payload = record(i);
            match record_kind(i) {
                Record::Poison(kind) => {
                    *injected.entry(kind).or_default() += 1;
                    poison_at.insert(
                        (i64::from(p), next_offset[p as usize]),
                        (i, kind, payload.clone()),
                    );
                }
                Record::Drift(_) => {
                    drift += 1;
                    good_ids.push(format!("ev-{i:08}"));
                }
                Record::Good => good_ids.push(format!("ev-{i:08}")),
            }
            next_offset[p as usize] += 1;
            batch.push((p, payload));
        }
        produce(&broker.brokers, "drift", &batch)?;
    }
    let produce_s = produce_start.elapsed().as_secs_f64();
    let poison = poison_at.len();
    assert_eq!(injected.len(), POISONS.len(), "every poison kind injected");

    let store = tempfile::tempdir()?;
    let run = ingest(&broker.brokers, "drift", store.path(), n as u64, long)?;

    // Dead letters: exactly the poison, each with its bytes, position and reason.
    assert_eq!(run.stats.dead_letters as usize, poison);
    let dl = dead_letters(store.path())?;
    assert_eq!(dl.len(), poison, "dead-letter count equals injected poison");
    let mut found: BTreeMap<Poison, usize> = BTreeMap::new();
    let mut positions = HashSet::new();
    for d in &dl {
        assert_eq!(d["source"], "kafka", "{d}");
        assert_eq!(d["topic"], "drift", "{d}");
        let pos = (
            d["partition"].as_i64().context("partition")?,
            d["offset"].as_i64().context("offset")?,
        );
        assert!(positions.insert(pos), "two dead letters for {pos:?}");
        let Some((i, kind, bytes)) = poison_at.get(&pos) else {
            panic!("dead letter at {pos:?} is not an injected poison record: {d}");
        };
        let kept = match (d["payload"].as_str(), d["payload_base64"].as_str()) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(b64)) => unbase64(b64)?,
            _ => panic!("dead letter without exactly one payload field: {d}"),
        };
        assert_eq!(&kept, bytes, "record {i} ({kind:?}) not kept byte for byte");
        assert_eq!(
            std::str::from_utf8(bytes).is_ok(),
            d["payload"].is_string(),
            "text kept as text, other bytes as base64: {d}"
        );
        let (code, hint) = kind.expected();
        assert_eq!(d["reason"], code, "record {i} ({kind:?}): {d}");
        let detail = d["detail"].as_str().context("detail")?;
        assert!(
            detail.contains(hint),
            "record {i} ({kind:?}): detail {detail:?} does not name {hint:?}"
        );
        *found.entry(*kind).or_default() += 1;
    }
    assert_eq!(found, injected, "dead letters per kind = injected per kind");

    // Good records, drift included: each exactly once in the Parquet store.
    let ids = read_event_ids(store.path())?;
    let good = good_ids.len();
    let distinct = ids.iter().collect::<HashSet<_>>().len();
    assert_exactly_once(&ids, good_ids);
    assert_eq!(run.stats.rows as usize, good);

    // The same records without poison (drift replaced by the plain shape too).
    // The clean topic is produced only now, so the broker never holds both topics while the
    // poisoned run is measured.
    create_topic(&broker.brokers, "clean", partitions)?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        let clean: Vec<_> = chunk
            .iter()
            .map(|&i| ((i % partitions as usize) as i32, render(&fields(i), "")))
            .collect();
        produce(&broker.brokers, "clean", &clean)?;
    }
    let clean_store = tempfile::tempdir()?;
    let clean = ingest(&broker.brokers, "clean", clean_store.path(), n as u64, long)?;
    assert_eq!(clean.stats.dead_letters, 0);
    assert_eq!(committed_rows(clean_store.path())?, n as u64);

    let kinds: Vec<String> = injected
        .iter()
        .map(|(k, c)| format!("{k:?}={c}({})", k.expected().0))
        .collect();
    println!(
        "figure drift events={n} partitions={partitions} poison={poison} dead_letters={} \
         good_rows={} distinct={distinct} expected_good={good} drift_records={drift} \
         commits={} files={} first_commit_s={:.2} longest_gap_s={:.2} secs={:.1} events_per_s={:.0} \
         produce_s={produce_s:.1}",
        dl.len(),
        ids.len(),
        run.commits,
        run.stats.files,
        run.first_commit_s,
        run.longest_gap_s,
        run.secs,
        n as f64 / run.secs,
    );
    println!("figure drift_kinds {}", kinds.join(" "));
    println!(
        "figure drift_clean events={n} partitions={partitions} dead_letters=0 rows={n} \
         commits={} files={} first_commit_s={:.2} longest_gap_s={:.2} secs={:.1} events_per_s={:.0} \
         poisoned_over_clean_events_per_s={:.2}",
        clean.commits,
        clean.stats.files,
        clean.first_commit_s,
        clean.longest_gap_s,
        clean.secs,
        n as f64 / clean.secs,
        clean.secs / run.secs,
    );
    Ok(())
}

/// The record builders themselves: every poison kind is refused with its reason and every
/// drift shape decodes to the plain record's row (the decoder, without a broker).
#[test]
fn poison_and_drift_records_decode_as_intended() {
    use broadside_analytics::decode::decode_event;
    for (k, kind) in POISONS.iter().enumerate() {
        let b = poison_record(1_000 + k, *kind);
        let e = decode_event(&b).expect_err(&format!("{kind:?} must be refused"));
        let (code, hint) = kind.expected();
        assert_eq!(e.code(), code, "{kind:?}: {e}");
        assert!(e.to_string().contains(hint), "{kind:?}: {e}");
    }
    for (k, kind) in DRIFTS.iter().enumerate() {
        let i = 2_000 + k;
        let plain = render(&fields(i), "");
        let want = decode_event(&plain).unwrap().rows()[0].to_event();
        let mut got = decode_event(&drift_record(i, *kind))
            .unwrap_or_else(|e| panic!("{kind:?} refused: {e}"))
            .rows()[0]
            .to_event();
        if matches!(kind, Drift::NullsAndWhitespace) {
            assert_eq!((got.variant.take(), got.run_id.take()), (None, None));
            got.variant = want.variant.clone();
            got.run_id = want.run_id.clone();
        }
        assert_eq!(got, want, "{kind:?}");
    }
}
