//! The feedback loop: bounces and complaints ingested as events become the suppression lists
//! of the next send, and the send records which snapshot it used.

mod common;

use std::io::Write;

use common::*;

/// The first `n` keys run `run` of the generated campaign sent.
fn first_sent(store: &std::path::Path, run_id: &str, n: usize) -> Vec<String> {
    let sent: Vec<String> = read_ledger(store, "demo", "generated-42", run_id)
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.unwrap())
        .take(n)
        .collect();
    assert_eq!(sent.len(), n);
    sent
}

#[test]
fn hard_bounces_from_events_suppress_the_next_send() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 3_000, 10, &["--invalid-share", "0"]);
    let s = spec.to_str().unwrap();
    let store = d.path().join("store");
    run(&["send", s, "--run-id", "before"], true);
    let sent = first_sent(&store, "before", 40);

    // 20 hard bounces, 10 soft bounces (must not suppress), 10 complaints, one bad line.
    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    for (i, email) in sent.iter().enumerate() {
        let (kind, bounce) = match i {
            0..20 => ("bounced", "\"hard\""),
            20..30 => ("bounced", "\"soft\""),
            _ => ("complained", "null"),
        };
        writeln!(
            f,
            r#"{{"event_id":"ev-{i}","workspace_id":"demo","campaign_id":"generated-42","email":"{}","event_type":"{kind}","bounce_type":{bounce},"ts":"2026-11-20T10:00:00Z"}}"#,
            email.to_uppercase()
        )
        .unwrap();
    }
    writeln!(f, "{{not json").unwrap();
    drop(f);

    let text = ingest(&store, &events);
    assert!(
        text.contains("40 event rows") && text.contains("1 dead letters"),
        "{text}"
    );
    // Ingesting the same file again adds nothing.
    assert!(ingest(&store, &events).contains("0 event rows"));

    let lists = d.path().join("lists");
    let out = run(
        &[
            "suppression",
            "build",
            "--store",
            store.to_str().unwrap(),
            "--workspace",
            "demo",
            "--out",
            lists.to_str().unwrap(),
        ],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let snapshot = text.split_whitespace().nth(2).unwrap().to_string();
    assert!(snapshot.starts_with("sup-"), "{text}");

    let mut spec_text = std::fs::read_to_string(&spec).unwrap();
    for (file, reason) in [
        ("hard_bounce.csv", "hard_bounce"),
        ("complaint.csv", "complaint"),
    ] {
        spec_text.push_str(&format!(
            "\n[[suppression]]\npath = \"lists/{file}\"\nreason = \"{reason}\"\n"
        ));
    }
    std::fs::write(&spec, spec_text).unwrap();
    run(&["send", s, "--run-id", "after", "--new-run"], true);

    let after = read_ledger(&store, "demo", "generated-42", "after");
    let decision = |k: &str| {
        after
            .iter()
            .find(|r| r.key.as_deref() == Some(k))
            .unwrap()
            .clone()
    };
    for (i, email) in sent.iter().enumerate() {
        let r = decision(email);
        match i {
            0..20 => assert_eq!(
                (r.decision.as_str(), r.reason.as_deref()),
                ("suppressed", Some("hard_bounce")),
                "{email}"
            ),
            20..30 => assert_eq!(
                r.decision, "sent",
                "a soft bounce must not suppress {email}"
            ),
            _ => assert_eq!(
                (r.decision.as_str(), r.reason.as_deref()),
                ("suppressed", Some("complaint")),
                "{email}"
            ),
        }
    }
    let rec = record(&store, "demo", "after");
    assert_eq!(rec.suppression_snapshots, vec![snapshot]);
}

/// Without any list in the spec, a send suppresses what the workspace's events in the store
/// say, from a snapshot it keeps with the run; another workspace's events do not count, and
/// `store_suppression = false` turns it off.
#[test]
fn the_next_send_suppresses_from_the_store_by_itself() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 2_000, 0, &["--invalid-share", "0"]);
    let s = spec.to_str().unwrap();
    let store = d.path().join("store");
    run(&["send", s, "--run-id", "first"], true);
    let sent = first_sent(&store, "first", 40);

    // 10 hard bounces, 10 complaints, 10 unsubscribes in `demo`; 10 hard bounces of other
    // recipients in `rival`, which must not reach demo's send.
    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    for (i, email) in sent.iter().enumerate() {
        let (ws, kind, bounce) = match i {
            0..10 => ("demo", "bounced", "\"hard\""),
            10..20 => ("demo", "complained", "null"),
            20..30 => ("demo", "unsubscribed", "null"),
            _ => ("rival", "bounced", "\"hard\""),
        };
        writeln!(
            f,
            r#"{{"event_id":"fb-{i}","workspace_id":"{ws}","campaign_id":"generated-42","email":" {email} ","event_type":"{kind}","bounce_type":{bounce},"ts":"2026-11-21T10:00:00Z"}}"#
        )
        .unwrap();
    }
    drop(f);
    ingest(&store, &events);

    // from the data set's folder, the spec and its store named by relative paths
    let out = exe()
        .current_dir(d.path())
        .args(["send", "campaign.toml", "--run-id", "next", "--new-run"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ledger = read_ledger(&store, "demo", "generated-42", "next");
    let row = |k: &str| ledger.iter().find(|r| r.key.as_deref() == Some(k)).unwrap();
    for (i, email) in sent.iter().enumerate() {
        let r = row(email);
        let expect = match i {
            0..10 => ("suppressed", Some("hard_bounce")),
            10..20 => ("suppressed", Some("complaint")),
            20..30 => ("suppressed", Some("unsubscribed")),
            _ => ("sent", None),
        };
        assert_eq!(
            (r.decision.as_str(), r.reason.as_deref()),
            expect,
            "{email}"
        );
    }
    // the snapshot is kept with the run and named in its record
    let folder = store.join("campaign_runs/workspace_id=demo/next.suppression");
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("snapshot.json")).unwrap()).unwrap();
    for list in ["hard_bounce", "complaint", "unsubscribed"] {
        assert_eq!(snap["lists"][list]["count"], 10, "{snap}");
    }
    let rec = record(&store, "demo", "next");
    assert_eq!(
        rec.suppression_snapshots,
        vec![snap["snapshot_id"].as_str().unwrap().to_string()]
    );
    // `why` names the list that matched
    let out = run(
        &["why", "next", &sent[0], "--store", store.to_str().unwrap()],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "matched suppression list {}",
            folder.join("hard_bounce.csv").display()
        )),
        "{text}"
    );

    // turned off, everyone is sent again
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("store_suppression = false\n{text}")).unwrap();
    run(&["send", s, "--run-id", "off", "--new-run"], true);
    let off = read_ledger(&store, "demo", "generated-42", "off");
    assert!(sent.iter().all(|k| off
        .iter()
        .any(|r| r.key.as_deref() == Some(k) && r.decision == "sent")));
    assert!(record(&store, "demo", "off")
        .suppression_snapshots
        .is_empty());
}

/// Repeated soft bounces (3 in the 30 days before the run, events and imported bounces
/// together) and imported hard bounces suppress the next send; the run record counts the
/// snapshot's lists and sources, and `why` names the events or the import behind a decision.
#[test]
fn repeated_soft_bounces_and_imported_bounces_suppress_and_why_names_them() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 2_000, 0, &["--invalid-share", "0"]);
    let s = spec.to_str().unwrap();
    let store = d.path().join("store");
    let st = store.to_str().unwrap();
    run(&["send", s, "--run-id", "first"], true);
    let sent = first_sent(&store, "first", 25);
    let now = chrono::Utc::now();
    let ago = |days: i64| (now - chrono::Duration::days(days)).to_rfc3339();

    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    let soft = |f: &mut std::fs::File, i: usize, n: usize, days: i64| {
        writeln!(
            f,
            r#"{{"event_id":"sb-{i}-{n}","workspace_id":"demo","campaign_id":"generated-42","email":"{}","event_type":"bounced","bounce_type":"soft","ts":"{}"}}"#,
            sent[i],
            ago(days)
        )
        .unwrap();
    };
    for i in 0..5 {
        // three soft bounces this month: suppressed
        (0..3).for_each(|n| soft(&mut f, i, n, 1 + n as i64));
    }
    for i in 5..10 {
        // two: not yet
        (0..2).for_each(|n| soft(&mut f, i, n, 1));
    }
    for i in 10..15 {
        // three, but two of them older than the window: not suppressed
        soft(&mut f, i, 0, 2);
        soft(&mut f, i, 1, 40);
        soft(&mut f, i, 2, 45);
    }
    for i in 20..25 {
        // two soft bounce events and one imported below: three together
        (0..2).for_each(|n| soft(&mut f, i, n, 3));
    }
    drop(f);
    ingest(&store, &events);

    let export = d.path().join("export.csv");
    let mut csv = String::from("email,bounce_type,bounced_at\n");
    for k in &sent[15..20] {
        csv.push_str(&format!("{k},hard,2025-01-02\n"));
    }
    for k in &sent[20..25] {
        csv.push_str(&format!("{k},soft,{}\n", ago(4)));
    }
    std::fs::write(&export, csv).unwrap();
    let ex = export.to_str().unwrap();
    run(
        &[
            "bounces",
            "import",
            ex,
            "--store",
            st,
            "--workspace",
            "demo",
        ],
        true,
    );

    run(&["send", s, "--run-id", "next", "--new-run"], true);
    let ledger = read_ledger(&store, "demo", "generated-42", "next");
    let row = |k: &str| ledger.iter().find(|r| r.key.as_deref() == Some(k)).unwrap();
    for (i, k) in sent.iter().enumerate() {
        let want = match i {
            0..5 | 20..25 => ("suppressed", Some("soft_bounce_repeated")),
            15..20 => ("suppressed", Some("hard_bounce")),
            _ => ("sent", None),
        };
        let r = row(k);
        assert_eq!((r.decision.as_str(), r.reason.as_deref()), want, "{i} {k}");
    }
    let rec = record(&store, "demo", "next");
    let sup = rec
        .store_suppression
        .expect("the run used a store snapshot");
    assert_eq!(sup.lists["soft_bounce_repeated"], 10);
    assert_eq!(sup.lists["hard_bounce"], 5);
    assert_eq!(sup.historical_files, 1);
    assert_eq!(sup.historical_rows, 10); // 5 hard + 5 soft inside the window
    assert_eq!(sup.event_rows, 3 * 5 + 2 * 5 + 5 + 2 * 5); // soft bounces inside the window
    assert_eq!(rec.suppression_snapshots, vec![sup.snapshot_id]);

    let why = |k: &str| {
        let out = run(&["why", "next", k, "--store", st], true);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = why(&sent[0]);
    for n in 0..3 {
        assert!(
            text.contains(&format!("event sb-0-{n}: bounced (soft)")),
            "{text}"
        );
    }
    let text = why(&sent[21]);
    assert!(
        text.contains("event sb-21-0")
            && text.contains("imported soft bounce")
            && text.contains("export.csv"),
        "{text}"
    );
    let text = why(&sent[15]);
    assert!(
        text.contains("imported hard bounce at 2025-01-02T00:00:00Z (export export.csv)"),
        "{text}"
    );
}
