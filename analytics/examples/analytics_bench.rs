//! Analytics benchmark: one campaign's statistics and daily time series, and every campaign's
//! statistics, through the API router (auth, query, JSON), from raw events and from rollups.
//!
//! ```sh
//! cargo run --release -p broadside-analytics --example analytics_bench -- \
//!     --store /tmp/bench-store --events 100000000 --campaigns 200 --days 90 --runs 5
//! ```
//!
//! Generates the events first if the store has none (deterministic, `synth`), then builds the
//! rollups (timed), then times each query `--runs` times after one warm-up and prints the
//! median and min. Results are checked equal between raw and rolled-up answers.
//! `--api-only` stops after the API timings (no raw scans, no raw = rolled-up check);
//! `--without-firsts` removes the first-seen counts after the refresh, so the queries read every
//! month uniques row as they do when those counts do not hold.

use std::path::PathBuf;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use broadside_analytics::api::{api_router, token_hash, ApiConfig, TokenEntry, TokenSet};
use broadside_analytics::query::Catalog;
use broadside_analytics::stats::{campaign_statistics, StatsQuery};
use broadside_analytics::synth::EventSpec;
use broadside_analytics::timeseries::{time_series, Granularity, SeriesQuery};
use chrono::NaiveDate;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let store = PathBuf::from(arg("--store", "/tmp/bench-store"));
    let spec = EventSpec {
        workspace_id: "bench".into(),
        campaigns: arg("--campaigns", "200").parse()?,
        recipients: arg("--recipients", "200000").parse()?,
        start: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        days: arg("--days", "90").parse()?,
        events: arg("--events", "100000000").parse()?,
        seed: 1,
    };
    let runs: usize = arg("--runs", "5").parse()?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    if !store.join("events/workspace_id=bench").exists() {
        let t = Instant::now();
        let n = spec.write(&store, threads, 128 * 1024)?;
        println!(
            "generated {n} events in {:.1} s ({:.2} M events/s)",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64() / 1e6
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let catalog = Catalog::new(&store);
    let t = Instant::now();
    let r = rt.block_on(broadside_analytics::rollup::refresh(
        &catalog,
        Some("bench"),
    ))?;
    println!(
        "recipient index: {} days and {} runs indexed, {} current, in {:.1} s",
        r.recipients.days_built,
        r.recipients.runs_built,
        r.recipients.days_current + r.recipients.runs_current,
        r.recipients.secs
    );
    println!(
        "rollup refresh: {} built, {} current, {} months built, first-seen counts {} in {:.1} s",
        r.built,
        r.current,
        r.months_built,
        if r.firsts_built > 0 {
            "built"
        } else {
            "current"
        },
        t.elapsed().as_secs_f64()
    );
    // `--without-firsts`: the queries as they run without the first-seen counts (every month
    // uniques row read and folded), for comparing the two on the same store and binary.
    if std::env::args().any(|a| a == "--without-firsts") {
        let f = store.join("rollups/uniques_monthly/workspace_id=bench/_firsts.json");
        std::fs::remove_file(&f)?;
        println!("without the first-seen counts ({} removed)", f.display());
    }

    let token = "bench-token-0123456789";
    let app = api_router(ApiConfig {
        catalog: catalog.clone(),
        tokens: TokenSet {
            tokens: vec![TokenEntry {
                name: "bench".into(),
                sha256: token_hash(token),
                workspaces: vec!["bench".into()],
            }],
        },
        bounce_history: None,
        sql: Default::default(),
    });
    let campaign = "c042";
    let time = |uri: String| -> anyhow::Result<(f64, f64, usize)> {
        let mut times = Vec::new();
        let mut len = 0;
        for i in 0..=runs {
            let req = Request::get(&uri)
                .header("authorization", format!("Bearer {token}"))
                .header("workspace_id", "bench")
                .body(Body::empty())?;
            let t = Instant::now();
            let resp = rt.block_on(app.clone().oneshot(req))?;
            assert!(resp.status().is_success(), "{uri}: {}", resp.status());
            let body = rt.block_on(resp.into_body().collect())?.to_bytes();
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            len = body.len();
        }
        let min = times.iter().cloned().fold(f64::MAX, f64::min);
        Ok((median(times), min, len))
    };
    // One recipient's history (events and ledger rows), a different recipient each run.
    let people = spec.recipients.max(1);
    let mut times = Vec::new();
    let mut found = 0;
    for i in 0..=runs as u64 {
        let who = format!("user{}@example.com", (1_000 + 7_919 * i) % people);
        let req = Request::get(format!("/recipients/{who}/history"))
            .header("authorization", format!("Bearer {token}"))
            .header("workspace_id", "bench")
            .body(Body::empty())?;
        let t = Instant::now();
        let resp = rt.block_on(app.clone().oneshot(req))?;
        assert!(resp.status().is_success(), "{who}: {}", resp.status());
        let body = rt.block_on(resp.into_body().collect())?.to_bytes();
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            found += v["items"].as_array().map_or(0, |a| a.len());
        }
    }
    let min = times.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "API one recipient's history (index): median {:.1} ms, min {min:.1} ms ({:.1} entries each)",
        median(times),
        found as f64 / runs as f64
    );
    for (what, uri) in [
        ("statistics", format!("/campaign-statistics/{campaign}")),
        (
            "all-campaign statistics",
            "/campaign-statistics/".to_string(),
        ),
        (
            "daily time series",
            format!("/campaign-statistics/{campaign}/time-series?granularity=day"),
        ),
    ] {
        let (med, min, len) = time(uri)?;
        println!("API {what} (rollups): median {med:.1} ms, min {min:.1} ms ({len} bytes)");
    }

    if std::env::args().any(|a| a == "--api-only") {
        return Ok(());
    }
    // Raw: the same queries with rollups ignored.
    let mut raw_times = Vec::new();
    let mut series_times = Vec::new();
    for i in 0..=runs {
        let q = StatsQuery {
            campaign_id: Some(campaign.into()),
            raw_only: true,
            ..Default::default()
        };
        let t = Instant::now();
        let raw = rt.block_on(campaign_statistics(&catalog, "bench", &q))?;
        let el = t.elapsed().as_secs_f64() * 1000.0;
        let sq = SeriesQuery {
            campaign_id: campaign.into(),
            granularity: Granularity::Day,
            time_zone: chrono_tz::Tz::UTC,
            from: None,
            to: None,
            event_types: vec![],
            raw_only: true,
        };
        let t = Instant::now();
        let raw_series = rt.block_on(time_series(&catalog, "bench", &sq))?;
        let el2 = t.elapsed().as_secs_f64() * 1000.0;
        if i == 0 {
            let rolled = rt.block_on(campaign_statistics(
                &catalog,
                "bench",
                &StatsQuery {
                    raw_only: false,
                    ..q
                },
            ))?;
            assert_eq!(raw, rolled, "raw and rolled-up statistics differ");
            let rolled_series = rt.block_on(time_series(
                &catalog,
                "bench",
                &SeriesQuery {
                    raw_only: false,
                    ..sq
                },
            ))?;
            assert_eq!(raw_series, rolled_series, "raw and rolled-up series differ");
        } else {
            raw_times.push(el);
            series_times.push(el2);
        }
    }
    println!(
        "raw statistics: median {:.0} ms; raw daily time series: median {:.0} ms",
        median(raw_times),
        median(series_times)
    );
    Ok(())
}
