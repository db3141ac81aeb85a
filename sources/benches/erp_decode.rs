//! The ERP source's per-row decode cost: SQL Server values (as tiberius hands them over) written
//! as recipient text into Arrow string builders, the same loop `decode` runs on the workers.
//!
//! `cargo bench -p broadside-sources --bench erp_decode` (release). Two row shapes: the 11
//! text/integer columns of `benches/erp-source.sh`'s `customers` table, and a typed ERP row
//! (decimal, money, GUID, datetime2, datetimeoffset, bit, fixed-width char).

use std::borrow::Cow;
use std::hint::black_box;

use arrow_array::builder::StringBuilder;
use arrow_array::Array;
use broadside_sources::erp::{write_text, TextForm};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tiberius::numeric::Numeric;
use tiberius::{ColumnData, IntoSql};

const ROWS: usize = 8192;

fn text(s: String) -> ColumnData<'static> {
    ColumnData::String(Some(Cow::Owned(s)))
}

/// The bench table's shape: integer key and ten text columns.
fn customer_rows() -> (Vec<TextForm>, Vec<Vec<ColumnData<'static>>>) {
    let mut forms = vec![TextForm::Integer];
    forms.extend([TextForm::Text; 10]);
    let rows = (0..ROWS as i64)
        .map(|i| {
            vec![
                ColumnData::I64(Some(i + 1_000_000)),
                text(format!("first.last{i}@example{}.com", i % 97)),
                text("Margaret".into()),
                text("Okonkwo-Smith".into()),
                text(format!("AC{:08}", i)),
                text(format!("{} Long Meadow Road", i % 9999)),
                text("Springfield".into()),
                text("IL".into()),
                text(format!("{:05}", i % 99_999)),
                text("US".into()),
                text(format!("{}", i % 50_000)),
            ]
        })
        .collect();
    (forms, rows)
}

/// A typed ERP row: the conversions that do more than copy text.
fn typed_rows() -> (Vec<TextForm>, Vec<Vec<ColumnData<'static>>>) {
    let forms = vec![
        TextForm::Integer,
        TextForm::Text,
        TextForm::FixedText,
        TextForm::Decimal,
        TextForm::Money,
        TextForm::Guid,
        TextForm::DateTime,
        TextForm::DateTimeOffset,
        TextForm::Date,
        TextForm::Boolean,
        TextForm::Text,
    ];
    let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 14).unwrap();
    let rows = (0..ROWS as i64)
        .map(|i| {
            let at = day.and_hms_milli_opt(9, 26, 53, (i % 1000) as u32).unwrap();
            let offset = chrono::FixedOffset::east_opt(3600).unwrap();
            vec![
                ColumnData::I32(Some(i as i32)),
                text(format!("first.last{i}@example.com")),
                text("GOLD      ".into()),
                ColumnData::Numeric(Some(Numeric::new_with_scale(i as i128 * 137 + 5, 2))),
                ColumnData::F64(Some((i as f64) * 1.25 + 0.0001)),
                ColumnData::Guid(Some(uuid::Uuid::from_u128(
                    0x6f96_19ff_8b86_d011_b42d_00c0_4fc9_64ff ^ i as u128,
                ))),
                at.into_sql(),
                at.and_local_timezone(offset).unwrap().into_sql(),
                day.into_sql(),
                ColumnData::Bit(Some(i % 3 == 0)),
                ColumnData::String(None),
            ]
        })
        .collect();
    (forms, rows)
}

/// One batch through the decode loop: every value to text, appended to its column's builder.
fn decode(forms: &[TextForm], rows: &[Vec<ColumnData<'static>>]) -> usize {
    let mut builders: Vec<StringBuilder> = forms
        .iter()
        .map(|_| StringBuilder::with_capacity(rows.len(), rows.len() * 16))
        .collect();
    let mut buf = String::with_capacity(64);
    for row in rows {
        for ((form, v), b) in forms.iter().zip(row).zip(builders.iter_mut()) {
            if write_text(*form, v, &mut buf).unwrap() {
                b.append_value(&buf);
            } else {
                b.append_null();
            }
        }
    }
    builders.iter_mut().map(|b| b.finish().len()).sum()
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("erp_decode");
    g.throughput(Throughput::Elements(ROWS as u64));
    let (forms, rows) = customer_rows();
    g.bench_function("customers_11_text_cols", |b| {
        b.iter(|| black_box(decode(&forms, &rows)))
    });
    let (forms, rows) = typed_rows();
    g.bench_function("typed_11_cols", |b| {
        b.iter(|| black_box(decode(&forms, &rows)))
    });
    g.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
