//! Nobody gets the same campaign twice: duplicates within a run, repeat runs of a campaign,
//! and two processes on one run. End to end, through the binary, reading what it wrote.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use broadside_pipeline::run::RunLock;
use common::*;

const WS: &str = "demo";
const CAMPAIGN: &str = "generated-42";

fn small_parts(spec: &Path) {
    let text = std::fs::read_to_string(spec).unwrap();
    assert!(text.contains("[output]"));
    std::fs::write(
        spec,
        text.replace("[output]", "[output]\nledger_part_rows = 5000"),
    )
    .unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The run ids of the campaign's records, oldest first.
fn run_ids(store: &Path) -> Vec<String> {
    let mut runs: Vec<_> = std::fs::read_dir(
        store
            .join("campaign_runs")
            .join(format!("workspace_id={WS}")),
    )
    .unwrap()
    .map(|e| e.unwrap().path())
    .filter(|p| p.extension().is_some_and(|x| x == "json"))
    .map(|p| broadside_pipeline::run::RunRecord::load(&p).unwrap())
    .collect();
    runs.sort_by_key(|r| r.started_at);
    runs.into_iter().map(|r| r.run_id).collect()
}

/// Checks every duplicate rule on a run's ledger against the input order; returns the number
/// of duplicates.
fn assert_one_message_per_person(ledger: &[LedgerRow]) -> usize {
    let validation = [
        "invalid_email",
        "missing_email",
        "missing_name",
        "invalid_name",
        "missing_key",
        "malformed_row",
        "invalid_utf8",
    ];
    let mut first_valid: HashMap<&str, u64> = HashMap::new();
    let mut reached: HashMap<&str, u32> = HashMap::new();
    let mut dups = 0;
    for r in ledger {
        let Some(key) = r.key.as_deref() else {
            continue;
        };
        let invalid = r.decision == "skipped"
            && validation.contains(&r.reason.as_deref().unwrap_or(""))
            || r.decision == "errored";
        if invalid {
            continue;
        }
        match first_valid.get(key) {
            None => {
                assert_ne!(
                    r.reason.as_deref(),
                    Some("duplicate"),
                    "row {} is a first occurrence",
                    r.row
                );
                first_valid.insert(key, r.row);
            }
            Some(first) => {
                assert_eq!(r.decision, "skipped", "row {} repeats row {first}", r.row);
                assert_eq!(r.reason.as_deref(), Some("duplicate"), "row {}", r.row);
                assert_eq!(
                    r.detail.as_deref(),
                    Some(format!("same recipient as input row {}", first + 1).as_str()),
                    "row {}",
                    r.row
                );
                dups += 1;
            }
        }
        if r.decision == "sent" || r.decision == "holdout" {
            *reached.entry(key).or_default() += 1;
        }
    }
    for (k, n) in reached {
        assert_eq!(n, 1, "{k} reached {n} times");
    }
    dups
}

#[test]
fn duplicates_in_one_export_are_sent_once_whatever_the_workers() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(
        d.path(),
        40_000,
        2_000,
        &["--duplicate-share", "0.02", "--invalid-share", "0.05"],
    );
    // A small ledger part size puts repeats across part (and batch) boundaries.
    small_parts(&spec);
    run(
        &[
            "send",
            spec.to_str().unwrap(),
            "--run-id",
            "w4",
            "--workers",
            "4",
        ],
        true,
    );
    let store = d.path().join("store");
    let four = read_ledger(&store, WS, CAMPAIGN, "w4");
    assert_eq!(four.len(), 40_000);
    let dups = assert_one_message_per_person(&four);
    assert!((500..1100).contains(&dups), "{dups} duplicates");
    let rec = record(&store, WS, "w4");
    assert_eq!(rec.dedupe.as_deref(), Some("key"));
    assert_eq!(
        rec.count(
            broadside_pipeline::model::Decision::Skipped,
            broadside_pipeline::model::Reason::Duplicate
        ),
        dups as u64
    );
    // The IFUR files hold each sent person once.
    let files = read_ifur_files(&d.path().join("megasys/hot"));
    let lines: usize = files.values().map(|f| f.details.len()).sum();
    assert_eq!(lines, four.iter().filter(|r| r.decision == "sent").count());

    // One worker, in a copy of the data: the same decisions and details row for row.
    let e = tempfile::tempdir().unwrap();
    let spec1 = generate(
        e.path(),
        40_000,
        2_000,
        &["--duplicate-share", "0.02", "--invalid-share", "0.05"],
    );
    small_parts(&spec1);
    run(
        &[
            "send",
            spec1.to_str().unwrap(),
            "--run-id",
            "w1",
            "--workers",
            "1",
        ],
        true,
    );
    let one = read_ledger(&e.path().join("store"), WS, CAMPAIGN, "w1");
    let view = |l: &[LedgerRow]| -> Vec<(u64, String, Option<String>, Option<String>)> {
        l.iter()
            .map(|r| {
                (
                    r.row,
                    r.decision.clone(),
                    r.reason.clone(),
                    r.detail.clone(),
                )
            })
            .collect()
    };
    assert_eq!(view(&one), view(&four));

    // `why` explains a duplicate and names the row it repeats.
    let dup = four
        .iter()
        .find(|r| r.reason.as_deref() == Some("duplicate"))
        .unwrap();
    let out = run(
        &[
            "why",
            "w4",
            dup.key.as_deref().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
        ],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SKIPPED (duplicate)"), "{text}");
    assert!(text.contains(dup.detail.as_deref().unwrap()), "{text}");

    // A dry run counts them too.
    let out = run(&["send", spec.to_str().unwrap(), "--dry-run"], true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{:<16} {:>10}", "duplicate", dups)),
        "{text}"
    );
}

#[test]
fn dedupe_false_sends_every_row_and_is_recorded() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 5_000, 100, &["--duplicate-share", "0.05"]);
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("dedupe = false\n{text}")).unwrap();
    run(&["send", spec.to_str().unwrap(), "--run-id", "all"], true);
    let store = d.path().join("store");
    let ledger = read_ledger(&store, WS, CAMPAIGN, "all");
    assert!(ledger
        .iter()
        .all(|r| r.reason.as_deref() != Some("duplicate")));
    assert_eq!(record(&store, WS, "all").dedupe.as_deref(), Some("off"));

    std::fs::write(&spec, format!("dedupe = \"sometimes\"\n{text}")).unwrap();
    let out = run(&["send", spec.to_str().unwrap(), "--run-id", "bad"], false);
    let err = stderr(&out);
    assert!(
        err.contains("dedupe") && err.contains("sometimes") && err.contains("household"),
        "{err}"
    );
}

#[test]
fn a_repeat_send_is_refused_until_told_how() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 6_000, 300, &[]);
    let spec_s = spec.to_str().unwrap();
    let store = d.path().join("store");

    // --exclude-sent with nothing before it is a mistake.
    let out = run(&["send", spec_s, "--exclude-sent"], false);
    assert!(stderr(&out).contains("no earlier run"), "{}", stderr(&out));
    run(&["send", spec_s], true);
    // --new-run cannot name a run that exists (that would be a resume).
    let existing = run_ids(&store)[0].clone();
    let out = run(&["send", spec_s, "--new-run", "--run-id", &existing], false);
    assert!(
        stderr(&out).contains("--new-run starts a new run"),
        "{}",
        stderr(&out)
    );
    let first = run_ids(&store);
    assert_eq!(first.len(), 1);
    let first_ledger = read_ledger(&store, WS, CAMPAIGN, &first[0]);
    let sent_first: Vec<String> = first_ledger
        .iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.clone().unwrap())
        .collect();

    // Again, without a word: refused, listing the run and the three ways on; nothing written.
    let out = run(&["send", spec_s], false);
    let err = stderr(&out);
    for want in [
        first[0].as_str(),
        "done",
        "--run-id",
        "--new-run",
        "--exclude-sent",
    ] {
        assert!(err.contains(want), "{want} missing from: {err}");
    }
    assert_eq!(run_ids(&store), first);

    // New people join the export: --exclude-sent sends exactly them.
    let csv = d.path().join("recipients.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    let header: Vec<String> = csv_fields(text.lines().next().unwrap());
    let email_col = header.iter().position(|h| h == "email").unwrap();
    // A row the first run sent is a valid template for newcomers.
    let sent_row = first_ledger
        .iter()
        .find(|r| r.decision == "sent")
        .unwrap()
        .row as usize;
    let template: Vec<String> = csv_fields(text.lines().nth(1 + sent_row).unwrap());
    let mut new_keys = Vec::new();
    for i in 0..25 {
        let mut f = template.clone();
        let email = format!("newcomer.{i}@example.org");
        f[email_col] = email.clone();
        new_keys.push(email);
        text.push_str(&f.iter().map(|v| csv_field(v)).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    std::fs::write(&csv, text).unwrap();
    run(&["send", spec_s, "--exclude-sent"], true);
    let runs = run_ids(&store);
    assert_eq!(runs.len(), 2);
    let second = read_ledger(&store, WS, CAMPAIGN, &runs[1]);
    // Sent: newcomers only; every newcomer sent or held out (the holdout is stable per key, so
    // the first run's holdout is held out again).
    let decided = |k: &str| {
        second
            .iter()
            .find(|r| r.key.as_deref() == Some(k))
            .unwrap()
            .decision
            .clone()
    };
    let sent_second: Vec<String> = second
        .iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.clone().unwrap())
        .collect();
    assert!(!sent_second.is_empty());
    assert!(
        sent_second.iter().all(|k| new_keys.contains(k)),
        "{sent_second:?}"
    );
    assert!(new_keys
        .iter()
        .all(|k| ["sent", "holdout"].contains(&decided(k).as_str())));
    let already: Vec<&LedgerRow> = second
        .iter()
        .filter(|r| r.reason.as_deref() == Some("already_sent"))
        .collect();
    assert_eq!(already.len(), sent_first.len());
    assert!(already.iter().all(|r| r.decision == "skipped"
        && r.detail.as_deref() == Some(format!("sent by run {}", first[0]).as_str())));
    assert_eq!(
        record(&store, WS, &runs[1]).excluded_runs,
        vec![first[0].clone()]
    );

    // --new-run sends to everyone again.
    run(&["send", spec_s, "--new-run"], true);
    let runs = run_ids(&store);
    assert_eq!(runs.len(), 3);
    let third = read_ledger(&store, WS, CAMPAIGN, &runs[2]);
    let sent_third = third.iter().filter(|r| r.decision == "sent").count();
    assert!(
        sent_third >= sent_first.len(),
        "{sent_third} < {}",
        sent_first.len()
    );
}

#[test]
fn a_run_held_by_another_process_is_refused_and_kill_9_releases_it() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 3_000, 100, &[]);
    let spec_s = spec.to_str().unwrap();
    let store = d.path().join("store");
    let lock_path = store
        .join("locks")
        .join(format!("workspace_id={WS}"))
        .join("run_id=held.lock");

    // This test process holds the run's lock: the binary refuses at once, naming us.
    let held = RunLock::acquire(&lock_path, "run held").unwrap();
    let out = run(&["send", spec_s, "--run-id", "held"], false);
    let err = stderr(&out);
    assert!(err.contains("run held is in progress"), "{err}");
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    assert!(!store
        .join("campaign_runs")
        .join(format!("workspace_id={WS}"))
        .join("held.json")
        .exists());
    drop(held);

    // A real send holds it while it runs (here: waiting on a source that is a named pipe
    // nobody writes to yet); kill -9 of that process releases it.
    let csv = d.path().join("recipients.csv");
    std::fs::remove_file(&csv).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&csv)
        .status()
        .unwrap()
        .success());
    let big_lock = store
        .join("locks")
        .join(format!("workspace_id={WS}"))
        .join("run_id=k.lock");
    let mut child = exe()
        .args(["send", spec_s, "--run-id", "k"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = child.id().to_string();
    loop {
        let text = std::fs::read_to_string(&big_lock).unwrap_or_default();
        if text.contains(&format!("\"pid\":{pid}")) {
            break;
        }
        assert!(Instant::now() < deadline, "the send never took its lock");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the send ended before it was seen holding its lock"
        );
        std::thread::yield_now();
    }
    let out = run(&["send", spec_s, "--run-id", "k"], false);
    assert!(
        stderr(&out).contains(&format!("process {pid}")),
        "{}",
        stderr(&out)
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The lock died with its holder: this process can take it at once.
    drop(RunLock::acquire(&big_lock, "run k").unwrap());
}

#[test]
fn two_sends_started_together_on_one_run_never_both_run() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 300_000, 1_000, &[]);
    let spec_s = spec.to_str().unwrap();
    let start = || {
        exe()
            .args(["send", spec_s, "--run-id", "same", "--workers", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let ran = outs
        .iter()
        .filter(|o| {
            o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("already done")
        })
        .count();
    assert_eq!(ran, 1, "exactly one process sends");
    for o in &outs {
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o));
        assert!(
            o.status.success() || text.contains("run same is in progress in"),
            "the other one refuses, naming the holder: {text}"
        );
    }
    let ledger = read_ledger(&d.path().join("store"), WS, CAMPAIGN, "same");
    assert_eq!(ledger.len(), 300_000);
}
