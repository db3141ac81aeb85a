//! Golden-file tests of the IFUR format: delimiter, escapes, quotes, newlines and non-ASCII.
//! Set `UPDATE_GOLDEN=1` to rewrite the golden files after an intended format change.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use broadside_pipeline::model::{Decision, Reason, RecipientBatch, RecipientLayout, StdField};
use broadside_pipeline::runner::OrderedStage;
use broadside_pipeline::stages::Stage;
use broadside_sinks::ifur::{parse, IfurEncoder};
use broadside_sinks::megasys::{IfurWriter, IfurWriterConfig};

type Row = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

const ROWS: &[Row] = &[
    ("ann@example.com", Some("Ann"), Some("Lee"), Some("plain")),
    (
        "pipe@example.com",
        Some("A|B"),
        Some("C:\\path\\"),
        Some("|leading and trailing|"),
    ),
    (
        "nl@example.com",
        Some("Multi"),
        Some("Line"),
        Some("line1\r\nline2\nline3\r"),
    ),
    (
        "quote@example.com",
        Some("He said \"hi\""),
        Some("O'Brien"),
        Some("\"\""),
    ),
    ("held@example.com", Some("Holdout"), None, None),
    (
        "intl@example.com",
        Some("Zoë"),
        Some("東京"),
        Some("🚀 \\p is not an escape here"),
    ),
    ("nulls@example.com", None, Some("OnlyLast"), None),
    ("supp@example.com", Some("Suppressed"), None, None),
];

fn batch(layout: &Arc<RecipientLayout>) -> RecipientBatch {
    let col = |f: fn(&Row) -> Option<&'static str>| -> ArrayRef {
        Arc::new(StringArray::from(ROWS.iter().map(f).collect::<Vec<_>>()))
    };
    let columns = RecordBatch::try_new(
        layout.schema(),
        vec![col(|r| Some(r.0)), col(|r| r.1), col(|r| r.2), col(|r| r.3)],
    )
    .unwrap();
    let mut b = RecipientBatch::new(0, 0, columns);
    b.keys = Some(StringArray::from(
        ROWS.iter().map(|r| Some(r.0)).collect::<Vec<_>>(),
    ));
    for i in 0..ROWS.len() {
        b.variants[i] = (i % 2) as u8;
    }
    b.decide(4, Decision::Holdout, Reason::Holdout);
    b.decide(7, Decision::Suppressed, Reason::HardBounce);
    b
}

fn check_golden(name: &str, actual: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        expected == actual,
        "{name} differs from its golden file:\n--- expected\n{}\n--- actual\n{}",
        String::from_utf8_lossy(&expected),
        String::from_utf8_lossy(actual)
    );
}

/// An IFUR writer of campaign `golden`, run `r1`, variants A and B, into `<dir>/hot`, and the
/// test batch encoded with every pending row sent.
fn writer_and_sent_batch(dir: &Path, roll_rows: u64) -> (IfurWriter, RecipientBatch) {
    let layout = Arc::new(RecipientLayout::new(
        &[StdField::Email, StdField::FirstName, StdField::LastName],
        &["note".to_string()],
    ));
    let writer = IfurWriter::new(IfurWriterConfig {
        campaign_id: "golden".into(),
        run_id: "r1".into(),
        workspace_id: "w".into(),
        variants: vec![("A".into(), "tpl-a".into()), ("B".into(), "tpl|b".into())],
        fields: layout.names().to_vec(),
        roll_rows,
        staging: dir.join("staging"),
        hot_folder: dir.join("hot"),
        deliveries: dir.join("r1.deliveries.jsonl"),
    })
    .unwrap();
    let mut b = batch(&layout);
    IfurEncoder::new(layout.clone()).process(&mut b).unwrap();
    for i in 0..b.len() {
        if b.decisions[i] == Decision::Pending {
            b.decide(i, Decision::Sent, Reason::None);
        }
    }
    (writer, b)
}

#[test]
fn tricky_fields_match_golden_files_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let hot = dir.path().join("hot");
    let (mut writer, mut b) = writer_and_sent_batch(dir.path(), 2);
    writer.process(&mut b).unwrap();
    writer.finish().unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&hot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".ifur"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "golden_r1_A_00001.ifur",
            "golden_r1_A_00002.ifur",
            "golden_r1_B_00001.ifur",
            "golden_r1_B_00002.ifur"
        ]
    );
    let mut round_tripped = Vec::new();
    for n in &names {
        let bytes = std::fs::read(hot.join(n)).unwrap();
        check_golden(n, &bytes);
        assert!(bytes.windows(2).filter(|w| *w == b"\r\n").count() >= 3);
        let f = parse(&bytes).unwrap();
        assert_eq!(f.fields, ["email", "first_name", "last_name", "note"]);
        round_tripped.extend(f.details);
    }
    // Every sent row comes back exactly, absent values as empty strings; holdout and
    // suppressed rows are in no file.
    round_tripped.sort();
    let mut expected: Vec<(String, Vec<String>)> = ROWS
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4 && *i != 7)
        .map(|(_, r)| {
            let v = |x: Option<&str>| x.unwrap_or("").to_string();
            (
                r.0.to_string(),
                vec![r.0.to_string(), v(r.1), v(r.2), v(r.3)],
            )
        })
        .collect();
    expected.sort();
    assert_eq!(round_tripped, expected);
    // The ledger placement points at the right file and detail line.
    assert_eq!(b.placement(0), Some(("golden_r1_A_00001.ifur", 1)));
    assert_eq!(b.placement(5), Some(("golden_r1_B_00002.ifur", 1)));
    assert_eq!(b.placement(4), None);
}

#[test]
fn parse_rejects_tampered_files() {
    let good = b"H|IFUR|1|c|A|t|1|email\r\nD|a@b.co|a@b.co\r\nT|1|0000000000000000\r\n";
    let err = parse(good).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    let truncated = b"H|IFUR|1|c|A|t|1|email\r\nD|a@b.co|a@b.co\r\n";
    assert!(parse(truncated).is_err());
    let wrong_count = b"H|IFUR|1|c|A|t|1|email\r\nD|a@b.co|a@b.co\r\nT|2|0\r\n";
    assert!(parse(wrong_count)
        .unwrap_err()
        .to_string()
        .contains("trailer says 2"));
}

/// Finished files are committed off the sequencer thread; a commit that fails (here the hot
/// folder vanished) still fails the stage, naming the file, and nothing lands half-written.
#[test]
fn a_failed_commit_fails_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let hot = dir.path().join("hot");
    let (mut writer, mut b) = writer_and_sent_batch(dir.path(), 1);
    std::fs::remove_dir(&hot).unwrap();
    // The failure shows on a later hand-over or, at the latest, when the stage finishes.
    let err = writer
        .process(&mut b)
        .and_then(|()| writer.finish())
        .unwrap_err()
        .to_string();
    assert!(err.contains("golden_r1_A_00001.ifur"), "{err}");
    assert!(!hot.exists());
}

/// The writer hands files to the disk in aligned blocks of 1 MiB: lines that straddle blocks,
/// a line longer than a block, and files that end anywhere in one all read back exactly.
#[test]
fn files_spanning_many_write_blocks_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let hot = dir.path().join("hot");
    let layout = Arc::new(RecipientLayout::new(
        &[StdField::Email],
        &["note".to_string()],
    ));
    let mut writer = IfurWriter::new(IfurWriterConfig {
        campaign_id: "big".into(),
        run_id: "r1".into(),
        workspace_id: "w".into(),
        variants: vec![("A".into(), "t".into()), ("B".into(), "t".into())],
        fields: layout.names().to_vec(),
        roll_rows: 700,
        staging: dir.path().join("staging"),
        hot_folder: hot.clone(),
        deliveries: dir.path().join("r1.deliveries.jsonl"),
    })
    .unwrap();
    let n = 2_000;
    let emails: Vec<String> = (0..n).map(|i| format!("r{i}@example.com")).collect();
    // Notes of 0..5000 bytes (with delimiters to escape), and one of 1.5 MiB.
    let notes: Vec<String> = (0..n)
        .map(|i| match i {
            333 => "z".repeat(3 << 19),
            _ => "ab|c\n".repeat(i * 997 % 1000),
        })
        .collect();
    let columns = RecordBatch::try_new(
        layout.schema(),
        vec![
            Arc::new(StringArray::from_iter_values(&emails)) as ArrayRef,
            Arc::new(StringArray::from_iter_values(&notes)),
        ],
    )
    .unwrap();
    let mut b = RecipientBatch::new(0, 0, columns);
    b.keys = Some(StringArray::from_iter_values(&emails));
    for i in 0..n {
        b.variants[i] = (i % 2) as u8;
    }
    IfurEncoder::new(layout.clone()).process(&mut b).unwrap();
    for i in 0..n {
        b.decide(i, Decision::Sent, Reason::None);
    }
    writer.process(&mut b).unwrap();
    writer.finish().unwrap();

    let mut round_tripped = Vec::new();
    let mut sizes = Vec::new();
    for e in std::fs::read_dir(&hot).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        sizes.push(bytes.len());
        round_tripped.extend(parse(&bytes).unwrap().details);
    }
    assert_eq!(sizes.len(), 4, "700 rows per file, 1000 rows per variant");
    assert!(
        sizes.iter().filter(|s| **s > 2 << 20).count() >= 2,
        "the first file of each variant spans blocks: {sizes:?}"
    );
    round_tripped.sort();
    let mut expected: Vec<(String, Vec<String>)> = (0..n)
        .map(|i| (emails[i].clone(), vec![emails[i].clone(), notes[i].clone()]))
        .collect();
    expected.sort();
    assert_eq!(round_tripped, expected);
}
