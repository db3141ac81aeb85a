//! `broadside bench --report`: a small end-to-end run (two sizes, two worker counts, two event
//! counts, no Kafka) whose report.json must agree with what the runs recorded (run records,
//! the event store via `broadside sql`), hold a latency per (event count, query) and the
//! projection with its held-out errors, and whose report.html must render in headless
//! Chromium without a console error.

mod common;

use std::path::Path;

use broadside_pipeline::run::RunRecord;
use serde_json::Value;

const SIZES: [u64; 2] = [2000, 6000];
const WORKERS: [u64; 2] = [1, 2];
const EVENTS: [u64; 2] = [2000, 6000];
const QUERIES: [&str; 4] = [
    "campaign",
    "time_series",
    "all_campaigns",
    "recipient_history",
];

fn count_events(store: &str) -> u64 {
    let out = common::run(
        &[
            "sql",
            "--store",
            store,
            "--workspace",
            "demo",
            "--format",
            "json",
            "SELECT count(*) AS n FROM events",
        ],
        true,
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("sql --format json");
    v["n"].as_u64().expect("a count")
}

/// Runs Debian's headless Chromium on the page: (dumped DOM, stderr).
fn chromium_dump(page: &Path, profile: &Path) -> (String, String) {
    let out = common::headless_chromium(profile)
        .args([
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bench_report_matches_the_runs_and_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let report_dir = tmp.path().join("report");
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = common::run(
        &[
            "bench",
            "--rows",
            &join(&SIZES),
            "--workers",
            &join(&WORKERS),
            "--events",
            &join(&EVENTS),
            "--suppressions",
            "200",
            "--keep",
            "--dir",
            dir.to_str().unwrap(),
            "--report",
            report_dir.to_str().unwrap(),
        ],
        true,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("projection (csv)"), "{stdout}");
    let r: Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();

    // Machine facts.
    let m = &r["machine"];
    assert!(m["cores"].as_u64().unwrap() >= 1);
    assert!(m["memory_bytes"].as_u64().unwrap() > 0);
    assert!(!m["date"].as_str().unwrap().is_empty());
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));

    // Send points: one per size × workers (CSV, one run), each equal to its run record.
    let sends = r["send"].as_array().unwrap();
    assert_eq!(sends.len(), SIZES.len() * WORKERS.len());
    for &n in &SIZES {
        for &k in &WORKERS {
            let p = sends
                .iter()
                .find(|p| p["rows"] == n && p["workers"] == k)
                .unwrap_or_else(|| panic!("no send point for {n} rows, {k} workers"));
            assert_eq!(p["format"], "csv");
            assert_eq!(p["kept"], true);
            let record =
                RunRecord::load(Path::new(p["record_path"].as_str().unwrap())).expect("run record");
            let reported: RunRecord = serde_json::from_value(p["record"].clone()).unwrap();
            assert_eq!(reported.run_id, record.run_id);
            assert_eq!(p["run_id"], record.run_id.as_str());
            assert_eq!(reported.rows, record.rows);
            assert_eq!(record.rows, n);
            assert_eq!(reported.decisions, record.decisions);
            assert_eq!(reported.stages, record.stages);
            assert!(!record.stages.is_empty());
            let u = &p["usage"];
            assert!(u["wall_secs"].as_f64().unwrap() > 0.0);
            assert!(u["cpu_secs"].as_f64().unwrap() > 0.0);
            assert!(u["peak_rss"].as_u64().unwrap() > 0);
            // The summary's stage figures are those of the (single) run.
            let s = r["send_summary"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["rows"] == n && s["workers"] == k)
                .unwrap();
            let stages = s["stages"].as_array().unwrap();
            assert_eq!(stages.len(), record.stages.len());
            for (a, b) in stages.iter().zip(&record.stages) {
                assert_eq!(a["name"], b.name.as_str());
                assert_eq!(a["busy_secs"].as_f64().unwrap(), b.busy_secs);
                assert_eq!(a["blocked_secs"].as_f64().unwrap(), b.blocked_secs);
            }
        }
    }

    // Ingest points: committed rows equal the store's count and the events offered.
    let ingests = r["ingest"].as_array().unwrap();
    assert_eq!(ingests.len(), EVENTS.len());
    for &n in &EVENTS {
        let p = ingests
            .iter()
            .find(|p| p["events"] == n && p["source"] == "file")
            .unwrap();
        let stored = count_events(p["store"].as_str().unwrap());
        assert_eq!(p["summary"]["rows"], stored);
        assert_eq!(stored, n);
        assert_eq!(p["summary"]["records"], n);
        assert_eq!(p["summary"]["dead_letters"], 0);
        assert!(p["records_per_sec"].as_f64().unwrap() > 0.0);
        // The events spread over several campaigns, the first the benchmark's own.
        let set = &r["event_sets"][n.to_string()]["info"];
        let campaigns = set["by_campaign"].as_object().unwrap();
        assert!(campaigns.len() >= 4, "{campaigns:?}");
        assert!(campaigns.contains_key("generated-42"));
        assert_eq!(
            campaigns.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
            n
        );
    }
    assert!(r["kafka"].as_str().unwrap().starts_with("not measured"));

    // A positive latency for every (event count, query).
    let queries = r["queries"].as_array().unwrap();
    for &n in &EVENTS {
        for q in QUERIES {
            let p = queries
                .iter()
                .find(|p| p["events"] == n && p["query"] == q)
                .unwrap_or_else(|| panic!("no {q} query at {n} events"));
            assert!(p["cold_ms"].as_f64().unwrap() > 0.0);
            assert!(p["warm_median_ms"].as_f64().unwrap() > 0.0);
            let warm = p["warm_ms"].as_array().unwrap();
            assert!(!warm.is_empty());
            assert!(warm.iter().all(|v| v.as_f64().unwrap() > 0.0));
            assert!(p["bytes"].as_u64().unwrap() > 0);
        }
    }

    // Model: a held-out error per measured size, the N × K projection.
    let models = r["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    let fm = &models[0];
    assert_eq!(fm["format"], "csv");
    let by_size = fm["held_out_by_size"].as_array().unwrap();
    assert_eq!(by_size.len(), SIZES.len());
    for (h, &n) in by_size.iter().zip(&SIZES) {
        assert_eq!(h["rows"], n);
        assert!(h["wall_mean_abs_rel_error"].as_f64().unwrap().is_finite());
        assert!(h["rss_mean_abs_rel_error"].as_f64().unwrap().is_finite());
    }
    assert_eq!(
        fm["held_out"].as_array().unwrap().len(),
        SIZES.len() * WORKERS.len()
    );
    let proj = fm["projection"].as_array().unwrap();
    assert_eq!(proj.len(), 16);
    for n in [1_000_000u64, 10_000_000, 50_000_000, 100_000_000] {
        for k in [2u64, 4, 8, 16] {
            let p = proj
                .iter()
                .find(|p| p["recipients"] == n && p["cores"] == k)
                .unwrap_or_else(|| panic!("no projection for {n} on {k}"));
            assert!(p["wall_secs"].as_f64().unwrap() > 0.0);
            assert!(p["peak_rss"].as_f64().unwrap() > 0.0);
            // Every projected size is beyond the measured 6000 rows.
            assert_eq!(p["extrapolated"], true);
        }
    }

    // The page: an <svg> per chart, the projection table, rendered by Chromium cleanly.
    let page = report_dir.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    let charts = r["charts"].as_array().unwrap();
    assert!(charts.len() >= 6, "{charts:?}");
    assert_eq!(html.matches("<svg").count(), charts.len());
    assert!(html.contains(r#"<table id="projection">"#));
    assert!(!html.contains("<script"));
    let (dom, stderr) = chromium_dump(&page, &tmp.path().join("chromium"));
    let console: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console output: {console:?}");
    assert!(dom.contains(r#"<table id="projection">"#), "{dom}");
    assert_eq!(dom.matches("<svg").count(), charts.len());
}
