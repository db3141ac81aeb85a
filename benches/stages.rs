//! Criterion micro-benchmarks, one group per hot stage of the send path.
//!
//! `cargo bench --bench stages` (release). Throughput is reported in recipients per second.

use std::hint::black_box;
use std::sync::Arc;

use broadside_pipeline::model::{Decision, RecipientBatch, RecipientLayout};
use broadside_pipeline::runner::{Assigner, Sink, Source};
use broadside_pipeline::spec::CampaignSpec;
use broadside_pipeline::stages::suppression::fingerprint;
use broadside_pipeline::stages::{
    BillingCap, Stage, SuppressionIndexBuilder, Suppressor, Validator, VariantSplitter,
};
use broadside_sinks::events::SubmittedEventSink;
use broadside_sinks::ifur::IfurEncoder;
use broadside_sinks::ledger::RecipientLogSink;
use broadside_sinks::text::KeyPacker;
use broadside_sources::csv::CsvSource;
use broadside_sources::synthetic::{write_recipients_csv, Generator, SyntheticSource, COLUMNS};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const SPEC: &str = r#"
campaign_id = "bench"
channel = "email"
holdout_percent = 5.0
[source]
type = "synthetic"
rows = 8192
[columns]
email = "email"
first_name = "first_name"
last_name = "last_name"
account_number = "account_number"
address1 = "address1"
city = "city"
state = "state"
zip = "zip"
country = "country"
[columns.merge]
points = "points"
[[variants]]
name = "A"
weight = 1
template = "a"
[[variants]]
name = "B"
weight = 1
template = "b"
[output]
store = "store"
[megasys]
hot_folder = "hot"
"#;

fn spec() -> CampaignSpec {
    CampaignSpec::parse(SPEC, "bench.toml".as_ref(), ".".into()).expect("bench spec")
}

fn layout() -> Arc<RecipientLayout> {
    Arc::new(spec().columns.layout())
}

fn raw_batch(first: u64) -> RecipientBatch {
    let s = spec();
    let mut src = SyntheticSource::new(
        Generator::new(42, 0.02),
        first + 8192,
        &s.columns.source_columns(),
        layout(),
    )
    .unwrap();
    let mut last = None;
    while let Some(b) = src.next_batch().unwrap() {
        last = Some(b);
    }
    last.unwrap()
}

fn validated_batch() -> RecipientBatch {
    let mut b = raw_batch(0);
    Validator::new(&spec(), layout()).process(&mut b).unwrap();
    b
}

fn bench_csv(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.csv");
    let rows = 200_000u64;
    write_recipients_csv(&path, &Generator::new(1, 0.02), rows).unwrap();
    let mapping: Vec<(String, String)> = COLUMNS
        .iter()
        .filter(|c| **c != "address2")
        .map(|c| (c.to_string(), c.to_string()))
        .collect();
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Elements(rows));
    g.sample_size(10);
    g.bench_function("csv_200k", |b| {
        b.iter(|| {
            let mut src = CsvSource::open(&path, b',', &mapping, layout()).unwrap();
            let mut n = 0;
            while let Some(batch) = src.next_batch().unwrap() {
                n += batch.len();
            }
            black_box(n)
        })
    });
    g.finish();
}

/// Benchmarks `stage` on fresh copies of `batch`: group `group`, function `name`, throughput
/// in the batch's rows.
fn bench_stage(
    c: &mut Criterion,
    group: &str,
    name: &str,
    batch: &RecipientBatch,
    stage: &mut dyn Stage,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function(name, |b| {
        b.iter_batched(
            || batch.clone(),
            |mut x| {
                stage.process(&mut x).unwrap();
                x
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_validate(c: &mut Criterion) {
    let batch = raw_batch(0);
    let mut v = Validator::new(&spec(), layout());
    bench_stage(c, "validate", "batch_8192", &batch, &mut v);
}

fn bench_suppress(c: &mut Criterion) {
    let n = 2_000_000u64;
    let gen = Generator::new(42, 0.0);
    let mut s = String::new();
    let keys: Vec<String> = (0..n)
        .map(|j| {
            gen.suppression_email(j, 8192, 0.001, &mut s);
            s.trim().to_lowercase()
        })
        .collect();

    let mut g = c.benchmark_group("suppression_index_build");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("2M_keys", |b| {
        b.iter(|| {
            let mut builder = SuppressionIndexBuilder::new();
            let l = builder.add_list("bench", broadside_pipeline::model::Reason::HardBounce);
            for k in &keys {
                builder.add_fingerprint(l, fingerprint(k));
            }
            black_box(builder.build())
        })
    });
    g.finish();

    let mut builder = SuppressionIndexBuilder::new();
    let l = builder.add_list("bench", broadside_pipeline::model::Reason::HardBounce);
    for k in &keys {
        builder.add(l, k);
    }
    let mut stage = Suppressor::new(Arc::new(builder.build()));
    let batch = validated_batch();
    bench_stage(c, "suppress", "batch_8192_vs_2M", &batch, &mut stage);
}

fn bench_split_encode(c: &mut Criterion) {
    let batch = validated_batch();
    let mut split = VariantSplitter::new(&spec());
    bench_stage(c, "split", "batch_8192", &batch, &mut split);

    let mut split_batch = batch.clone();
    split.process(&mut split_batch).unwrap();
    let mut enc = IfurEncoder::new(layout());
    bench_stage(c, "ifur_encode", "batch_8192", &split_batch, &mut enc);

    let mut pack = KeyPacker::new();
    bench_stage(c, "pack_keys", "batch_8192", &split_batch, &mut pack);

    let mut g = c.benchmark_group("cap");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("batch_8192", |b| {
        b.iter_batched(
            || (split_batch.clone(), BillingCap::new(Some(4096))),
            |(mut x, mut cap)| {
                cap.process(&mut x).unwrap();
                x
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A batch as the sinks see it: validated, split, its sent keys packed by a worker if
/// `packed`, assigned, and placed in one IFUR file per variant (the placement the IFUR writer
/// records).
fn decided_batch(packed: bool) -> RecipientBatch {
    let mut batch = validated_batch();
    VariantSplitter::new(&spec()).process(&mut batch).unwrap();
    if packed {
        KeyPacker::new().process(&mut batch).unwrap();
    }
    Assigner.process(&mut batch).unwrap();
    let n = batch.len();
    batch.placement_files = vec!["IFUR_A_00001.txt".into(), "IFUR_B_00001.txt".into()];
    batch.placement_file = vec![u32::MAX; n];
    batch.placement_line = vec![0; n];
    for i in 0..n {
        if batch.decisions[i] == Decision::Sent {
            batch.placement_file[i] = u32::from(batch.variants[i]);
            batch.placement_line[i] = i as u32 + 2;
        }
    }
    batch
}

/// Writes `batches` copies of `batch` (with consecutive row numbers) through a fresh sink.
fn write_through(mut sink: impl Sink, batch: &RecipientBatch, batches: u64) {
    for i in 0..batches {
        let mut x = batch.clone();
        x.first_row = i * 8192;
        sink.write(&x).unwrap();
    }
    sink.finish().unwrap();
}

fn bench_sinks(c: &mut Criterion) {
    let batches = 25u64;
    let variants = || vec!["A".to_string(), "B".to_string()];
    // `write_200k`: the sink compresses the keys itself; `write_200k_packed`: a worker did
    // (`pack_keys`), as in a send.
    let runs = [
        ("write_200k", decided_batch(false)),
        ("write_200k_packed", decided_batch(true)),
    ];
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(8192 * batches));
    g.sample_size(10);
    for (name, batch) in &runs {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let dir = tempfile::tempdir().unwrap();
                let sink = RecipientLogSink::new(dir.path(), 1 << 20, variants(), vec![]).unwrap();
                write_through(sink, batch, batches);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("submitted_events");
    g.throughput(Throughput::Elements(8192 * batches));
    g.sample_size(10);
    for (name, batch) in &runs {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let dir = tempfile::tempdir().unwrap();
                let sink = SubmittedEventSink::new(
                    dir.path(),
                    "bench",
                    "bench-campaign",
                    "bench-run-0001",
                    variants(),
                    chrono::Utc::now(),
                    1 << 20,
                )
                .unwrap();
                write_through(sink, batch, batches);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_csv,
    bench_validate,
    bench_suppress,
    bench_split_encode,
    bench_sinks
);
criterion_main!(benches);
