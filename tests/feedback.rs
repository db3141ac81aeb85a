//! The feedback loop: bounces and complaints ingested as events become the suppression lists
//! of the next send, and the send records which snapshot it used.

mod common;

use std::io::Write;

use common::*;

#[test]
fn hard_bounces_from_events_suppress_the_next_send() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 3_000, 10, &["--invalid-share", "0"]);
    let s = spec.to_str().unwrap();
    let store = d.path().join("store");
    run(&["send", s, "--run-id", "before"], true);
    let sent: Vec<String> = read_ledger(&store, "demo", "generated-42", "before")
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.unwrap())
        .take(40)
        .collect();
    assert_eq!(sent.len(), 40);

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

    let out = run(
        &[
            "ingest",
            "--store",
            store.to_str().unwrap(),
            "--from",
            events.to_str().unwrap(),
        ],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("40 event rows") && text.contains("1 dead letters"),
        "{text}"
    );
    // Ingesting the same file again adds nothing.
    let out = run(
        &[
            "ingest",
            "--store",
            store.to_str().unwrap(),
            "--from",
            events.to_str().unwrap(),
        ],
        true,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 event rows"));

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
