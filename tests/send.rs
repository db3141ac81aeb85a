//! End-to-end tests of `broadside send` on generated data: reconciliation, resume after SIGKILL,
//! determinism, dry runs and bad input.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::*;

const WS: &str = "demo";
const CAMPAIGN: &str = "generated-42";

/// Checks every guarantee of a finished run against its outputs.
fn assert_reconciles(dir: &Path, run_id: &str, input_rows: u64) -> Vec<LedgerRow> {
    let store = dir.join("store");
    let ledger = read_ledger(&store, WS, CAMPAIGN, run_id);

    // One ledger row per input row, each exactly once.
    assert_eq!(ledger.len() as u64, input_rows);
    let rows: HashSet<u64> = ledger.iter().map(|r| r.row).collect();
    assert_eq!(rows.len() as u64, input_rows);
    assert_eq!(*rows.iter().max().unwrap(), input_rows - 1);

    // Suppressed keys are on a list; sent keys are not.
    let mut listed: HashMap<String, String> = HashMap::new();
    for (file, reason) in [
        ("suppress_hard_bounce.csv", "hard_bounce"),
        ("suppress_unsubscribed.csv", "unsubscribed"),
        ("suppress_blocklist.csv", "blocklisted"),
    ] {
        for k in suppression_keys(&dir.join(file)) {
            listed.insert(k, reason.to_string());
        }
    }
    let mut suppressed = 0;
    for r in &ledger {
        let key = r.key.clone().unwrap_or_default();
        match r.decision.as_str() {
            "suppressed" => {
                suppressed += 1;
                assert!(listed.contains_key(&key), "suppressed {key} is on no list");
                assert!(r.list.is_some(), "suppressed row without its list");
            }
            "sent" => assert!(!listed.contains_key(&key), "sent {key} is on a list"),
            _ => {}
        }
    }
    assert!(suppressed > 0, "the data set should exercise suppression");

    // Every sent key is in exactly one IFUR line, at the file and line the ledger says.
    let files = read_ifur_files(&dir.join("megasys/hot"));
    let mut seen: HashMap<String, (String, u32)> = HashMap::new();
    for (name, f) in &files {
        for (n, (key, _)) in f.details.iter().enumerate() {
            let prev = seen.insert(key.clone(), (name.clone(), n as u32 + 1));
            assert!(prev.is_none(), "{key} is in two IFUR lines");
        }
    }
    let sent: Vec<&LedgerRow> = ledger.iter().filter(|r| r.decision == "sent").collect();
    assert_eq!(sent.len(), seen.len(), "IFUR lines != sent rows");
    for r in &sent {
        let key = r.key.clone().unwrap();
        let (file, line) = seen
            .get(&key)
            .unwrap_or_else(|| panic!("sent {key} not in any file"));
        assert_eq!(r.file.as_ref(), Some(file));
        assert_eq!(r.line, Some(*line));
        assert!(file.contains(&format!("_{}_", r.variant.clone().unwrap())));
    }

    // The run record and the submitted events agree with the ledger.
    let rec = record(&store, WS, run_id);
    assert_eq!(rec.rows, input_rows);
    let by_decision = |d: &str| ledger.iter().filter(|r| r.decision == d).count() as u64;
    for d in ["sent", "suppressed", "skipped", "holdout", "errored"] {
        assert_eq!(rec.decisions[d], by_decision(d), "run record count for {d}");
    }
    assert_eq!(rec.decisions.values().sum::<u64>(), input_rows);
    assert_eq!(submitted_events(&store, WS, run_id), sent.len() as u64);
    // One submitted event per sent recipient, with its key, variant and a run-unique id.
    let mut events = submitted_event_rows(&store, WS, CAMPAIGN, run_id);
    events.sort();
    let mut expected: Vec<(String, String, Option<String>)> = sent
        .iter()
        .map(|r| {
            (
                format!("sub-{run_id}-{}", r.row),
                r.key.clone().unwrap(),
                r.variant.clone(),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(events, expected);

    // The manifest names every file with the trailer's count and checksum.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("megasys/hot/{CAMPAIGN}_{run_id}.manifest.json"))).unwrap(),
    )
    .unwrap();
    let listed_files = manifest["files"].as_array().unwrap();
    let run_files: Vec<_> = files
        .keys()
        .filter(|n| n.contains(&format!("_{run_id}_")))
        .collect();
    assert_eq!(listed_files.len(), run_files.len());
    for f in listed_files {
        let parsed = &files[f["file"].as_str().unwrap()];
        assert_eq!(f["rows"].as_u64().unwrap(), parsed.details.len() as u64);
        assert_eq!(
            f["checksum"].as_str().unwrap(),
            format!("{:016x}", parsed.checksum)
        );
    }
    ledger
}

#[test]
fn send_reconciles_on_generated_data() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 60_000, 8_000, &["--invalid-share", "0.03"]);
    run(&["send", spec.to_str().unwrap(), "--run-id", "r1"], true);
    let ledger = assert_reconciles(d.path(), "r1", 60_000);

    // Variant shares follow the weights (50/50 after a 5 % holdout).
    let sent_a = ledger
        .iter()
        .filter(|r| r.variant.as_deref() == Some("A"))
        .count() as f64;
    let sent_b = ledger
        .iter()
        .filter(|r| r.variant.as_deref() == Some("B"))
        .count() as f64;
    let holdout = ledger.iter().filter(|r| r.decision == "holdout").count() as f64;
    let eligible = sent_a + sent_b + holdout;
    assert!(
        (holdout / eligible - 0.05).abs() < 0.01,
        "holdout share {}",
        holdout / eligible
    );
    assert!(
        (sent_a / (sent_a + sent_b) - 0.5).abs() < 0.02,
        "variant A share"
    );

    // Invalid rows are skipped with their reasons.
    let reasons: HashSet<String> = ledger
        .iter()
        .filter(|r| r.decision == "skipped")
        .filter_map(|r| r.reason.clone())
        .collect();
    for r in [
        "invalid_email",
        "missing_email",
        "missing_name",
        "invalid_name",
    ] {
        assert!(reasons.contains(r), "no row skipped as {r}: {reasons:?}");
    }

    // Running a finished run again is a no-op.
    let out = run(&["send", spec.to_str().unwrap(), "--run-id", "r1"], true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already done"));
}

#[test]
fn same_campaign_twice_gives_identical_files_and_variants() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 30_000, 3_000, &[]);
    set_spec(&spec, "ifur_roll_rows", "4000");
    run(&["send", spec.to_str().unwrap(), "--run-id", "one"], true);
    run(
        &[
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "two",
            "--new-run",
            "--workers",
            "1",
        ],
        true,
    );
    let files = read_ifur_files(&d.path().join("megasys/hot"));
    let mut compared = 0;
    for (name, f) in &files {
        if let Some(rest) = name.strip_prefix(&format!("{CAMPAIGN}_one_")) {
            let twin = &files[&format!("{CAMPAIGN}_two_{rest}")];
            assert_eq!(f, twin, "{name} differs between runs");
            let a = std::fs::read(d.path().join("megasys/hot").join(name)).unwrap();
            let b = std::fs::read(
                d.path()
                    .join("megasys/hot")
                    .join(format!("{CAMPAIGN}_two_{rest}")),
            )
            .unwrap();
            assert_eq!(a, b, "{name} is not byte-identical");
            compared += 1;
        }
    }
    assert!(
        compared >= 6,
        "expected several rolled files, compared {compared}"
    );
    let store = d.path().join("store");
    let one = read_ledger(&store, WS, CAMPAIGN, "one");
    let two = read_ledger(&store, WS, CAMPAIGN, "two");
    let changed = one
        .iter()
        .zip(&two)
        .filter(|(a, b)| (a.decision.as_str(), &a.variant) != (b.decision.as_str(), &b.variant))
        .count();
    assert_eq!(
        changed, 0,
        "recipients changed decision or variant between runs"
    );
}

#[test]
fn killed_send_resumes_to_the_same_result() {
    let d = tempfile::tempdir().unwrap();
    let rows = 200_000;
    let spec = generate(d.path(), rows, 20_000, &[]);
    set_spec(&spec, "ifur_roll_rows", "5000");
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec).unwrap().replace(
            "ifur_roll_rows = 5000",
            "ifur_roll_rows = 5000\nledger_part_rows = 16384",
        ),
    )
    .unwrap();

    // Start a send, wait until it has delivered two files, then SIGKILL it.
    let mut child = exe()
        .args([
            "--log-format",
            "json",
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "k1",
            "--no-progress",
        ])
        .env("BROADSIDE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut delivered = 0;
    for line in stderr.lines() {
        if line.unwrap().contains("ifur file delivered") {
            delivered += 1;
            if delivered == 2 {
                break;
            }
        }
    }
    assert_eq!(delivered, 2, "the send ended before delivering two files");
    child.kill().unwrap();
    child.wait().unwrap();

    let store = d.path().join("store");
    let rec = record(&store, WS, "k1");
    assert_eq!(
        rec.status,
        broadside_pipeline::run::RunStatus::Running,
        "the kill should land mid-run"
    );
    let hot = d.path().join("megasys/hot");
    let before: Vec<String> = std::fs::read_dir(&hot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".ifur"))
        .collect();
    assert!(before.len() >= 2);
    assert!(
        !hot.join(format!("{CAMPAIGN}_k1.manifest.json")).exists(),
        "no manifest before the run is done"
    );

    // Resume with the same run id.
    run(
        &[
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "k1",
            "--no-progress",
        ],
        true,
    );
    let rec = record(&store, WS, "k1");
    assert_eq!(rec.status, broadside_pipeline::run::RunStatus::Done);
    assert_eq!(rec.attempts, 2);
    assert_reconciles(d.path(), "k1", rows);
    let staging = store.join("staging/run_id=k1");
    assert!(
        !staging.exists() || std::fs::read_dir(&staging).unwrap().next().is_none(),
        "staging not empty"
    );

    // The resumed run produced exactly what an uninterrupted run produces.
    run(
        &[
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "clean",
            "--new-run",
            "--no-progress",
        ],
        true,
    );
    let files = read_ifur_files(&hot);
    for (name, f) in files.iter().filter(|(n, _)| n.contains("_k1_")) {
        let twin = name.replace("_k1_", "_clean_");
        assert_eq!(
            Some(f),
            files.get(&twin),
            "{name} differs from the clean run"
        );
    }
}

#[test]
fn resume_refuses_a_changed_input() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 2_000, 100, &[]);
    let store = d.path().join("store");
    // Fake an interrupted run by marking a finished one as running, then change the input.
    run(&["send", spec.to_str().unwrap(), "--run-id", "x"], true);
    let path = store.join(format!("campaign_runs/workspace_id={WS}/x.json"));
    let mut rec = record(&store, WS, "x");
    rec.status = broadside_pipeline::run::RunStatus::Running;
    rec.save(&path).unwrap();
    let csv = d.path().join("recipients.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("late@example.com,Late,Comer,AC9,1 Way,,Town,ST,00001,US,1\n");
    std::fs::write(&csv, text).unwrap();
    let out = run(&["send", spec.to_str().unwrap(), "--run-id", "x"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot resume run x") && err.contains("recipients.csv changed"),
        "{err}"
    );
}

#[test]
fn dry_run_decides_but_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 5_000, 500, &[]);
    let out = run(&["send", spec.to_str().unwrap(), "--dry-run"], true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dry run (nothing written)"), "{text}");
    assert!(text.contains("5000 recipients"), "{text}");
    assert!(text.contains("hard_bounce"), "{text}");
    assert!(!d.path().join("store").exists());
    assert!(!d.path().join("megasys").exists());
}

#[test]
fn why_explains_each_kind_of_decision() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 5_000, 1_000, &["--invalid-share", "0.05"]);
    let csv = d.path().join("recipients.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("short@example.com,Short\n");
    std::fs::write(&csv, text).unwrap();
    run(&["send", spec.to_str().unwrap(), "--run-id", "w"], true);
    let ledger = read_ledger(&d.path().join("store"), WS, CAMPAIGN, "w");
    let spec_s = spec.to_str().unwrap();
    let ask = |key: &str| {
        String::from_utf8_lossy(&run(&["why", "w", key, "--spec", spec_s], true).stdout).to_string()
    };
    let sent = ledger.iter().find(|r| r.decision == "sent").unwrap();
    let out = ask(&sent.key.clone().unwrap().to_uppercase());
    assert!(
        out.contains("SENT") && out.contains(&sent.file.clone().unwrap()),
        "{out}"
    );
    let sup = ledger.iter().find(|r| r.decision == "suppressed").unwrap();
    let out = ask(sup.key.as_ref().unwrap());
    assert!(
        out.contains("SUPPRESSED") && out.contains("suppress_"),
        "{out}"
    );
    let skipped = ledger
        .iter()
        .find(|r| r.reason.as_deref() == Some("invalid_email"))
        .unwrap();
    let out = ask(skipped.key.as_ref().unwrap());
    assert!(out.contains("SKIPPED (invalid_email)"), "{out}");

    // The short row is errored with file, line and field count in the ledger.
    let bad = ledger.iter().find(|r| r.decision == "errored").unwrap();
    assert_eq!(bad.reason.as_deref(), Some("malformed_row"));
    assert!(
        bad.detail
            .as_ref()
            .unwrap()
            .contains("recipients.csv:5002: expected 11 fields, found 2"),
        "{bad:?}"
    );

    let out = run(&["why", "w", "nobody@example.com", "--spec", spec_s], false);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not in run w"));
}

#[test]
fn bad_input_gets_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 100, 10, &[]);
    let s = spec.to_str().unwrap();

    // Unknown key in the spec: named, with the spec file.
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("[output]", "[output]\nroll_rows = 5")).unwrap();
    let err = String::from_utf8_lossy(&run(&["send", s], false).stderr).to_string();
    assert!(
        err.contains("campaign.toml") && err.contains("unknown field `roll_rows`"),
        "{err}"
    );
    std::fs::write(&spec, &text).unwrap();

    // Missing suppression file: named.
    std::fs::rename(
        d.path().join("suppress_blocklist.csv"),
        d.path().join("gone.csv"),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&run(&["send", s], false).stderr).to_string();
    assert!(err.contains("suppress_blocklist.csv"), "{err}");
    std::fs::rename(
        d.path().join("gone.csv"),
        d.path().join("suppress_blocklist.csv"),
    )
    .unwrap();

    // Mapped column missing from the CSV header: named with the header's columns.
    std::fs::write(&spec, text.replace("zip = \"zip\"", "zip = \"postcode\"")).unwrap();
    let err = String::from_utf8_lossy(&run(&["send", s], false).stderr).to_string();
    assert!(
        err.contains("\"postcode\" (columns.zip)") && err.contains("the header has"),
        "{err}"
    );
    std::fs::write(&spec, &text).unwrap();

    // Header-only source: an error, and the run is recorded as failed, not done.
    std::fs::write(d.path().join("recipients.csv"), "email,first_name,last_name,account_number,address1,address2,city,state,zip,country,points\n").unwrap();
    let err =
        String::from_utf8_lossy(&run(&["send", s, "--run-id", "empty"], false).stderr).to_string();
    assert!(err.contains("no recipient rows"), "{err}");
    let rec = record(&d.path().join("store"), WS, "empty");
    assert_eq!(rec.status, broadside_pipeline::run::RunStatus::Failed);
    assert!(rec.error.unwrap().contains("no recipient rows"));
}

#[test]
fn non_utf8_field_is_an_errored_row_not_an_abort() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 1_000, 10, &[]);
    let csv = d.path().join("recipients.csv");
    let mut bytes = std::fs::read(&csv).unwrap();
    bytes.extend_from_slice(b"bad@example.com,B\xffd,Name,AC1,1 St,,Town,ST,00001,US,1\n");
    std::fs::write(&csv, bytes).unwrap();
    run(&["send", spec.to_str().unwrap(), "--run-id", "u"], true);
    let ledger = read_ledger(&d.path().join("store"), WS, CAMPAIGN, "u");
    assert_eq!(ledger.len(), 1_001);
    let bad = ledger
        .iter()
        .find(|r| r.reason.as_deref() == Some("invalid_utf8"))
        .unwrap();
    assert_eq!(bad.decision, "errored");
    assert!(
        bad.detail
            .as_ref()
            .unwrap()
            .contains(":1002: field \"first_name\" (column 2)"),
        "{bad:?}"
    );
}

#[test]
fn parquet_source_gives_the_same_decisions_as_csv() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let spec_a = generate(a.path(), 20_000, 2_000, &[]);
    let spec_b = generate(b.path(), 20_000, 2_000, &["--parquet"]);
    run(&["send", spec_a.to_str().unwrap(), "--run-id", "p"], true);
    run(&["send", spec_b.to_str().unwrap(), "--run-id", "p"], true);
    let la = read_ledger(&a.path().join("store"), WS, CAMPAIGN, "p");
    let lb = read_ledger(&b.path().join("store"), WS, CAMPAIGN, "p");
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(
            (&x.key, &x.decision, &x.variant, &x.reason),
            (&y.key, &y.decision, &y.variant, &y.reason)
        );
    }
}

/// A store named by a URL is refused, in a spec and on the command line, before anything is
/// written: no folder called `s3:` appears.
#[test]
fn a_store_named_by_a_url_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 100, 0, &[]);
    set_spec(&spec, "store", "\"s3://bucket/store\"");
    let out = exe()
        .current_dir(d.path())
        .args(["send", "campaign.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("output.store") && err.contains("\"s3://bucket/store\" is a s3:// URL"),
        "{err}"
    );
    for args in [
        &["sql", "--store", "s3://bucket/store", "SELECT 1"][..],
        &[
            "ingest",
            "--store",
            "gs://bucket/store",
            "--from",
            "x.ndjson",
        ][..],
        &["serve", "--store", "file:///tmp/store"][..],
    ] {
        let out = exe().current_dir(d.path()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("local or mounted folder"), "{args:?}: {err}");
    }
    assert!(!d.path().join("s3:").exists() && !d.path().join("gs:").exists());
}
