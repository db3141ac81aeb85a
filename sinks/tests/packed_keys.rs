//! Keys packed once on a worker ([`KeyPacker`]) and spliced into both the recipient log and
//! the submitted events: what the files hold must not depend on it. The recipient log puts a
//! batch's sent rows first when it uses the packed page, and keeps row order when it cannot
//! (a row the billing cap took after packing, a batch across a part boundary).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, HOLDOUT_VARIANT};
use broadside_pipeline::runner::{Assigner, Sink};
use broadside_pipeline::stages::Stage;
use broadside_sinks::events::SubmittedEventSink;
use broadside_sinks::ledger::RecipientLogSink;
use broadside_sinks::parts::segments;
use broadside_sinks::text::{sent_keys_packed, KeyPacker};
use chrono::{TimeZone, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use proptest::prelude::*;

/// What happens to a row: sent, holdout, suppressed, or sendable when packed but then taken
/// by the billing cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Sent,
    Holdout,
    Suppressed,
    Capped,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        8 => Just(Fate::Sent),
        1 => Just(Fate::Holdout),
        2 => Just(Fate::Suppressed),
        1 => Just(Fate::Capped),
    ]
}

fn key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        8 => "[a-z0-9.]{1,20}@(example\\.com|mail\\.co|d[0-9]{1,3}\\.org)".prop_map(Some),
        1 => "[^\\x00]{0,30}".prop_map(Some),
        1 => Just(None),
    ]
}

/// A batch at `first_row` decided as `rows` say, packed where the worker would pack it.
fn decided(first_row: u64, rows: &[(Option<String>, Fate)], pack: bool) -> RecipientBatch {
    let keys = StringArray::from(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
    let schema = Arc::new(Schema::new(vec![Field::new("email", DataType::Utf8, true)]));
    let columns = RecordBatch::try_new(schema, vec![Arc::new(keys.clone()) as ArrayRef]).unwrap();
    let mut b = RecipientBatch::new(0, first_row, columns);
    b.keys = Some(keys);
    for (i, (k, f)) in rows.iter().enumerate() {
        match (k, f) {
            (None, _) => {
                b.decide(i, Decision::Skipped, Reason::MissingEmail);
            }
            (_, Fate::Suppressed) => {
                b.decide(i, Decision::Suppressed, Reason::HardBounce);
            }
            (_, Fate::Holdout) => b.variants[i] = HOLDOUT_VARIANT,
            _ => b.variants[i] = (i % 2) as u8,
        }
    }
    if pack {
        KeyPacker::new().process(&mut b).unwrap();
    }
    for (i, (_, f)) in rows.iter().enumerate() {
        if *f == Fate::Capped {
            b.decide(i, Decision::Skipped, Reason::CapExceeded);
        }
    }
    Assigner.process(&mut b).unwrap();
    b
}

/// Every Parquet file under `dir` whose name starts with `prefix`, in name order, read whole.
fn read_parts(dir: &Path, prefix: &str) -> Vec<RecordBatch> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".parquet")
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
        })
        .collect()
}

fn strings(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = b.column_by_name(name).unwrap();
    let c = arrow_cast::cast(c, &DataType::Utf8).unwrap();
    c.as_string::<i32>()
        .iter()
        .map(|s| s.map(str::to_string))
        .collect()
}

/// (row, key, decision) of each recipient-log row and (event id, email) of each submitted
/// event, in file order.
type Written = (
    Vec<(u64, Option<String>, Option<String>)>,
    Vec<(Option<String>, Option<String>)>,
);

fn write_and_read(batches: &[Vec<(Option<String>, Fate)>], part_rows: u64, pack: bool) -> Written {
    let d = tempfile::tempdir().unwrap();
    let log_dir = d.path().join("log");
    let variants = vec!["a".to_string(), "b".to_string()];
    let mut log = RecipientLogSink::new(&log_dir, part_rows, variants.clone(), vec![]).unwrap();
    let started = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
    let mut events =
        SubmittedEventSink::new(d.path(), "ws", "c1", "r1", variants, started, part_rows).unwrap();
    let mut first = 0u64;
    for rows in batches {
        let b = decided(first, rows, pack);
        first += rows.len() as u64;
        log.write(&b).unwrap();
        events.write(&b).unwrap();
    }
    log.finish().unwrap();
    events.finish().unwrap();
    let mut logged = Vec::new();
    for b in read_parts(&log_dir, "part-") {
        let rows = b
            .column_by_name("row")
            .unwrap()
            .as_primitive::<UInt64Type>();
        let keys = strings(&b, "key");
        let decisions = strings(&b, "decision");
        for i in 0..b.num_rows() {
            logged.push((rows.value(i), keys[i].clone(), decisions[i].clone()));
        }
    }
    let mut submitted = Vec::new();
    let dir = broadside_pipeline::event::partition_dir(d.path(), "ws", started.date_naive());
    if dir.exists() {
        for b in read_parts(&dir, "submitted-") {
            submitted.extend(
                strings(&b, "event_id")
                    .into_iter()
                    .zip(strings(&b, "email")),
            );
        }
    }
    (logged, submitted)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// With keys packed on the worker, both files hold what they hold without: the same
    /// recipient-log rows (sent rows first in each batch that used the page, row order in the
    /// others) and the same submitted events in the same order.
    #[test]
    fn packed_keys_write_the_same_rows(
        batches in proptest::collection::vec(
            proptest::collection::vec((key(), fate()), 0..300), 1..6),
        part_rows in 50u64..2000,
    ) {
        let (log_plain, events_plain) = write_and_read(&batches, part_rows, false);
        let (log_packed, events_packed) = write_and_read(&batches, part_rows, true);
        prop_assert_eq!(&events_packed, &events_plain);
        // The expected order of the packed run, batch by batch.
        let mut expected = Vec::new();
        let mut first = 0u64;
        let mut by_row = log_plain.iter();
        for rows in &batches {
            let b = decided(first, rows, true);
            let whole = segments(first, rows.len(), part_rows).len() == 1;
            let logged: Vec<_> = by_row.by_ref().take(rows.len()).cloned().collect();
            match sent_keys_packed(&b).filter(|_| whole) {
                Some(p) => {
                    let sent = |r: &&(u64, Option<String>, Option<String>)| {
                        r.2.as_deref() == Some("sent")
                    };
                    prop_assert_eq!(p.rows.len(), logged.iter().filter(sent).count());
                    expected.extend(logged.iter().filter(sent).cloned());
                    expected.extend(logged.iter().filter(|r| !sent(r)).cloned());
                }
                None => expected.extend(logged),
            }
            first += rows.len() as u64;
        }
        prop_assert_eq!(&log_packed, &expected);
        // Without packing the log is in row order, one row per input row.
        let rows: Vec<u64> = log_plain.iter().map(|r| r.0).collect();
        prop_assert_eq!(rows, (0..first).collect::<Vec<_>>());
    }
}

/// A batch the billing cap reached after packing cannot use the page: its sent rows are fewer
/// than the packed ones. One that nothing touched after packing can.
#[test]
fn packed_keys_are_used_only_when_they_are_the_sent_rows() {
    let rows = |f: Fate| -> Vec<(Option<String>, Fate)> {
        (0..10)
            .map(|i| {
                (
                    Some(format!("p{i}@example.com")),
                    if i == 3 { f } else { Fate::Sent },
                )
            })
            .collect()
    };
    assert!(sent_keys_packed(&decided(0, &rows(Fate::Suppressed), true)).is_some());
    let capped = decided(0, &rows(Fate::Capped), true);
    assert!(sent_keys_packed(&capped).is_none());
    assert!(sent_keys_packed(&decided(0, &rows(Fate::Sent), false)).is_none());
    // Forcing such keys on the log is refused rather than logging a row twice.
    let d = tempfile::tempdir().unwrap();
    let log = RecipientLogSink::new(d.path(), 100, vec!["a".into(), "b".into()], vec![]).unwrap();
    let err = log
        .log_batch(&capped, capped.packed_keys.as_ref())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not its sent rows"), "{err}");
}
