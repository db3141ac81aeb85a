//! The send's Parquet files (recipient log and submitted events, whose string pages the sinks
//! encode themselves) read the same in parquet-rs, pyarrow and DuckDB: every column of every
//! row, over random batches with nulls, empty, non-ASCII and long strings, batches that cross
//! part files, and keys packed on a worker as well as encoded by the sink.
//!
//! pyarrow and DuckDB come from Python (`.ci/setup` installs them).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, RowDetail, HOLDOUT_VARIANT};
use broadside_pipeline::runner::{Assigner, Sink};
use broadside_pipeline::stages::Stage;
use broadside_sinks::events::SubmittedEventSink;
use broadside_sinks::ledger::RecipientLogSink;
use broadside_sinks::text::KeyPacker;
use chrono::{TimeZone, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A key: usually an address, sometimes empty, non-ASCII, long or missing.
fn key(rng: &mut Rng, i: u64) -> Option<String> {
    match rng.below(20) {
        0 => None,
        1 => Some(String::new()),
        2 => Some(format!("zoë.ørsted.{i}@exämple.dk")),
        3 => Some(format!(
            "{}{i}@long.example",
            "x".repeat(200 + rng.below(400) as usize)
        )),
        4 => Some(format!("日本語{i}@例え.jp")),
        _ => Some(format!(
            "person.{}.{i}@d{}.example.com",
            rng.below(1000),
            rng.below(50)
        )),
    }
}

/// A batch at `first_row` with random keys and decisions, packed on a worker when `pack`.
fn batch(rng: &mut Rng, first_row: u64, rows: usize, pack: bool) -> RecipientBatch {
    let keys: Vec<Option<String>> = (0..rows).map(|i| key(rng, first_row + i as u64)).collect();
    let keys = StringArray::from(keys);
    let schema = Arc::new(Schema::new(vec![Field::new("email", DataType::Utf8, true)]));
    let columns = RecordBatch::try_new(schema, vec![Arc::new(keys.clone()) as ArrayRef]).unwrap();
    let mut b = RecipientBatch::new(0, first_row, columns);
    b.keys = Some(keys.clone());
    for i in 0..rows {
        if keys.is_null(i) {
            b.decide(i, Decision::Skipped, Reason::MissingEmail);
            continue;
        }
        match rng.below(10) {
            0 => {
                b.decide(i, Decision::Suppressed, Reason::HardBounce);
            }
            1 => {
                b.decide(i, Decision::Skipped, Reason::InvalidEmail);
                let text = match rng.below(3) {
                    0 => String::new(),
                    1 => format!("recipients.csv:{}: field \"email\" ≠ an address", i + 2),
                    _ => "d".repeat(300),
                };
                b.details.push(RowDetail {
                    row: i as u32,
                    text,
                });
            }
            2 => b.variants[i] = HOLDOUT_VARIANT,
            _ => b.variants[i] = rng.below(2) as u8,
        }
    }
    if pack {
        KeyPacker::new().process(&mut b).unwrap();
    }
    Assigner.process(&mut b).unwrap();
    b
}

/// Every Parquet file under `dir`, in name order.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Rows of a file as parquet-rs reads them, each value as text: integers in decimal,
/// timestamps as microseconds since the epoch, dictionaries decoded, nulls as `None`.
type Rows = Vec<Vec<Option<String>>>;

fn read_with_parquet_rs(path: &Path) -> (Vec<String>, Rows) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for b in reader {
        let b = b.unwrap();
        names = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let columns: Vec<StringArray> = b
            .columns()
            .iter()
            .map(|c| {
                let c = match c.data_type() {
                    DataType::Dictionary(_, v) => arrow_cast::cast(c, v).unwrap(),
                    _ => c.clone(),
                };
                let c = match c.data_type() {
                    DataType::Timestamp(_, _) => arrow_cast::cast(&c, &DataType::Int64).unwrap(),
                    _ => c,
                };
                arrow_cast::cast(&c, &DataType::Utf8)
                    .unwrap()
                    .as_string::<i32>()
                    .clone()
            })
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| c.is_valid(i).then(|| c.value(i).to_string()))
                    .collect(),
            );
        }
    }
    (names, rows)
}

/// Reads each file with pyarrow and with DuckDB, values as text in the same form.
const READ_BACK: &str = r#"
import json, sys
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

out = []
for path in sys.argv[1:]:
    table = pq.read_table(path)
    columns = []
    for col in table.columns:
        kind = col.type
        if pa.types.is_dictionary(kind):
            col = col.cast(kind.value_type)
            kind = kind.value_type
        if pa.types.is_timestamp(kind):
            col = col.cast(pa.int64())
        columns.append([None if v is None else str(v) for v in col.to_pylist()])
    by_pyarrow = [list(r) for r in zip(*columns)]
    con = duckdb.connect()
    source = "read_parquet(?, hive_partitioning = false)"
    kinds = con.execute(f"DESCRIBE SELECT * FROM {source}", [path]).fetchall()
    exprs = []
    for name, kind, *_ in kinds:
        q = '"' + name.replace('"', '""') + '"'
        exprs.append(f"epoch_us({q})::VARCHAR" if kind.startswith("TIMESTAMP") else f"{q}::VARCHAR")
    by_duckdb = [list(r) for r in con.execute(f"SELECT {', '.join(exprs)} FROM {source}", [path]).fetchall()]
    out.append({"path": path, "columns": table.column_names, "pyarrow": by_pyarrow, "duckdb": by_duckdb})
print(json.dumps(out))
"#;

#[test]
fn pyarrow_and_duckdb_read_every_value_parquet_rs_reads() {
    let d = tempfile::tempdir().unwrap();
    let log_dir = d.path().join("log");
    let variants = vec!["A".to_string(), "B—ü".to_string()];
    // Parts of 7 000 rows: batches of up to 9 000 rows cross them.
    let part_rows = 7_000;
    let mut log = RecipientLogSink::new(&log_dir, part_rows, variants.clone(), vec![]).unwrap();
    let started = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
    let mut events =
        SubmittedEventSink::new(d.path(), "ws", "c1", "r1", variants, started, part_rows).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut first = 0u64;
    for n in 0..8 {
        let rows = match n {
            0 => 1,
            1 => 0,
            _ => 1 + rng.below(9_000) as usize,
        };
        let b = batch(&mut rng, first, rows, n % 2 == 0);
        first += rows as u64;
        log.write(&b).unwrap();
        events.write(&b).unwrap();
    }
    log.finish().unwrap();
    events.finish().unwrap();

    let files = parquet_files(d.path());
    assert!(
        files.len() >= 4,
        "expected several log and event parts, got {files:?}"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(READ_BACK)
        .args(&files)
        .output()
        .expect("python3 runs (pyarrow and duckdb: see .ci/setup)");
    assert!(
        out.status.success(),
        "reading back with pyarrow and DuckDB failed (are they installed? .ci/setup): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut total = 0;
    for (path, theirs) in files.iter().zip(read.as_array().unwrap()) {
        let (names, ours) = read_with_parquet_rs(path);
        let rows = |v: &serde_json::Value| -> Rows { serde_json::from_value(v.clone()).unwrap() };
        let columns: Vec<String> = serde_json::from_value(theirs["columns"].clone()).unwrap();
        assert_eq!(columns, names, "{}", path.display());
        for reader in ["pyarrow", "duckdb"] {
            let theirs = rows(&theirs[reader]);
            assert_eq!(theirs.len(), ours.len(), "{reader}: {}", path.display());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a, b, "{reader}: {} row {i} ({names:?})", path.display());
            }
        }
        total += ours.len();
    }
    // Every recipient is logged once, and the sent ones are events as well.
    assert!(total as u64 > first, "{total} rows for {first} recipients");
}
