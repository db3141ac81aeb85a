//! Criterion micro-benchmark of event decoding, the ingest writers' main cost.
//!
//! `cargo bench -p broadside-analytics --bench decode` (release). Throughput is in records
//! per second.

use std::hint::black_box;

use broadside_analytics::decode::decode_event;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Records of the ingest benchmark's shape; one in ten has an escape in its email, which
/// takes serde_json's path.
fn records() -> Vec<String> {
    (0..10_000)
        .map(|i| {
            let email = if i % 10 == 0 {
                format!("user{i}\\u0040example.com")
            } else {
                format!("user{i}@example.com")
            };
            format!(
                r#"{{"event_id":"ev-{i:010}","workspace_id":"ws{}","campaign_id":"camp-{}","variant":"A","run_id":"run-1","email":"{email}","event_type":"opened","url":null,"ts":"2026-03-0{}T12:{:02}:00Z"}}"#,
                i % 4,
                i % 50,
                1 + i % 3,
                i % 60
            )
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let records = records();
    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("decode_10k", |b| {
        b.iter(|| {
            for r in &records {
                black_box(decode_event(r.as_bytes()).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
