//! Analytics against generated events: statistics and time series checked against brute-force
//! loops over the same events, rollups against raw scans, and the HTTP API's tenancy, SQL
//! refusals, pagination and historical bounces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use broadside_analytics::api::{api_router, token_hash, ApiConfig, TokenEntry, TokenSet};
use broadside_analytics::event::{BounceType, Event, EventType};
use broadside_analytics::query::Catalog;
use broadside_analytics::stats::{campaign_statistics, Counts, StatsQuery};
use broadside_analytics::synth::EventSpec;
use broadside_analytics::timeseries::{time_series, Granularity, SeriesQuery};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Timelike, Utc};
use chrono_tz::Tz;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const ACME_TOKEN: &str = "acme-token-0123456789";
const CANARY_TOKEN: &str = "canary-token-0123456789";

fn acme_spec() -> EventSpec {
    EventSpec {
        workspace_id: "acme".into(),
        campaigns: 4,
        recipients: 300,
        start: NaiveDate::from_ymd_opt(2026, 2, 20).unwrap(),
        days: 45,
        events: 24_000,
        seed: 7,
    }
}

/// Another tenant with the same campaign ids: any leak changes acme's numbers.
fn canary_spec() -> EventSpec {
    EventSpec {
        workspace_id: "canary".into(),
        campaigns: 4,
        recipients: 50,
        start: NaiveDate::from_ymd_opt(2026, 2, 20).unwrap(),
        days: 45,
        events: 3_000,
        seed: 99,
    }
}

fn store_with_events() -> Result<(tempfile::TempDir, Vec<Event>)> {
    let d = tempfile::tempdir()?;
    let store = d.path().join("store");
    acme_spec().write(&store, 2, 4096)?;
    canary_spec().write(&store, 2, 4096)?;
    Ok((d, acme_spec().all()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Counts of a set of events, computed by hand.
fn brute_counts<'a>(events: impl Iterator<Item = &'a Event>) -> Counts {
    let mut c = Counts::default();
    let mut opens = BTreeSet::new();
    let mut clicks = BTreeSet::new();
    for e in events {
        let who = e.email.trim().to_lowercase();
        match e.event_type {
            EventType::Submitted => c.submitted += 1,
            EventType::Delivered => c.delivered += 1,
            EventType::Opened => {
                c.opens += 1;
                opens.insert(who);
            }
            EventType::Clicked => {
                c.clicks += 1;
                clicks.insert(who);
            }
            EventType::Bounced => {
                c.bounces += 1;
                match e.bounce_type {
                    Some(BounceType::Hard) => c.hard_bounces += 1,
                    Some(BounceType::Soft) => c.soft_bounces += 1,
                    None => {}
                }
            }
            EventType::Unsubscribed => c.unsubscribes += 1,
            EventType::Complained => c.complaints += 1,
        }
    }
    c.unique_opens = opens.len() as u64;
    c.unique_clicks = clicks.len() as u64;
    c
}

fn check_stats(
    rt: &tokio::runtime::Runtime,
    catalog: &Catalog,
    events: &[Event],
    q: StatsQuery,
) -> Result<()> {
    let got = rt.block_on(campaign_statistics(catalog, "acme", &q))?;
    let in_range = |e: &&Event| {
        q.from.is_none_or(|f| e.ts >= f)
            && q.to.is_none_or(|t| e.ts < t)
            && q.campaign_id.as_ref().is_none_or(|c| *c == e.campaign_id)
    };
    let campaigns: BTreeSet<&str> = events
        .iter()
        .filter(in_range)
        .map(|e| e.campaign_id.as_str())
        .collect();
    assert_eq!(
        got.iter()
            .map(|c| c.campaign_id.as_str())
            .collect::<Vec<_>>(),
        campaigns.iter().copied().collect::<Vec<_>>()
    );
    for c in &got {
        let mine = || {
            events
                .iter()
                .filter(in_range)
                .filter(|e| e.campaign_id == c.campaign_id)
        };
        assert_eq!(
            c.totals.counts,
            brute_counts(mine()),
            "{} totals ({q:?})",
            c.campaign_id
        );
        let variants: BTreeSet<Option<&str>> = mine().map(|e| e.variant.as_deref()).collect();
        assert_eq!(
            c.variants
                .iter()
                .map(|v| v.variant.as_deref())
                .collect::<Vec<_>>(),
            variants.iter().copied().collect::<Vec<_>>()
        );
        for v in &c.variants {
            let expect = brute_counts(mine().filter(|e| e.variant == v.variant));
            assert_eq!(
                v.figures.counts, expect,
                "{} {:?}",
                c.campaign_id, v.variant
            );
        }
        let t = &c.totals;
        let want = t.counts.unique_clicks as f64 / t.counts.unique_opens as f64;
        assert_eq!(t.rates.click_to_open_rate, Some(want));
    }
    Ok(())
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

#[test]
fn statistics_match_brute_force_raw_rolled_up_and_mixed() -> Result<()> {
    let (dir, mut events) = store_with_events()?;
    let store = dir.path().join("store");
    let catalog = Catalog::new(&store);
    let rt = runtime();
    let ranges = [
        (None, None),
        (
            Some(utc("2026-03-01T00:00:00Z")),
            Some(utc("2026-03-15T00:00:00Z")),
        ),
        // Exactly March: its month compaction alone once built.
        (
            Some(utc("2026-03-01T00:00:00Z")),
            Some(utc("2026-04-01T00:00:00Z")),
        ),
        // Not day-aligned: answered from raw events even with rollups.
        (
            Some(utc("2026-03-02T05:30:00Z")),
            Some(utc("2026-03-09T17:00:00Z")),
        ),
        // No lower bound: unique recipients of the compacted months from their first-seen
        // counts, alone (to the end of March) or with April's days read by day.
        (None, Some(utc("2026-04-01T00:00:00Z"))),
        (None, Some(utc("2026-04-03T00:00:00Z"))),
    ];
    let check_all = |events: &[Event], raw_only: bool| -> Result<()> {
        for (from, to) in ranges {
            for campaign_id in [None, Some("c002".to_string())] {
                let q = StatsQuery {
                    campaign_id,
                    from,
                    to,
                    raw_only,
                };
                check_stats(&rt, &catalog, events, q)?;
            }
        }
        Ok(())
    };
    check_all(&events, true)?;

    let report = rt.block_on(broadside_analytics::rollup::refresh(&catalog, None))?;
    assert_eq!(report.built, 90, "45 days × 2 workspaces");
    // February (from the 20th), March and April (to the 5th) are closed months of both
    // workspaces: each compacted into one file per table.
    assert_eq!(report.months_built, 6);
    assert_eq!(report.firsts_built, 2, "one first-seen count per workspace");
    assert_eq!(report.totals_built, 6, "the totals of each compacted month");
    let again = rt.block_on(broadside_analytics::rollup::refresh(&catalog, None))?;
    assert_eq!((again.built, again.current), (0, 90));
    assert_eq!((again.months_built, again.months_current), (0, 6));
    assert_eq!((again.firsts_built, again.totals_built), (0, 0));
    let plan = |from: Option<&str>, to: Option<&str>| {
        let day = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
        broadside_analytics::rollup::DatePlan::new(&store, "acme", from.map(day), to.map(day), true)
    };
    let all = plan(None, None)?;
    assert_eq!(all.months, ["2026-02", "2026-03", "2026-04"]);
    assert!(all.rolled.is_empty() && all.raw.is_empty(), "{all:?}");
    // the first-seen counts hold for the months from the first one on, and for no other run
    let firsts = |from: Option<&str>, to: Option<&str>, months: &[&str]| -> Result<bool> {
        let p = plan(from, to)?;
        assert_eq!(p.months, months);
        Ok(broadside_analytics::rollup::month_firsts(&store, "acme", &p)?.is_some())
    };
    assert!(firsts(None, None, &["2026-02", "2026-03", "2026-04"])?);
    assert!(firsts(None, Some("2026-03-01"), &["2026-02"])?);
    assert!(!firsts(Some("2026-03-01"), None, &["2026-03", "2026-04"])?);
    for m in ["2026-02", "2026-03", "2026-04"] {
        assert!(broadside_analytics::rollup::month_totals(&store, "acme", &all, m)?.is_some());
    }
    assert_eq!(
        plan(None, Some("2026-04-03"))?.months,
        ["2026-02", "2026-03"]
    );
    // A range cutting a month reads that month's days.
    let part = plan(Some("2026-03-10"), Some("2026-04-06"))?;
    assert_eq!(part.months, ["2026-04"]);
    assert_eq!(part.rolled.len(), 22, "March 10 to 31");
    check_all(&events, false)?;

    // New events land in one partition: its rollup is stale and that day is scanned raw.
    let late = EventSpec {
        start: NaiveDate::from_ymd_opt(2026, 3, 3).unwrap(),
        days: 1,
        events: 500,
        seed: 8,
        ..acme_spec()
    };
    late.write(&store, 1, 4096)?;
    events.extend(late.all());
    assert!(!broadside_analytics::rollup::is_current(
        &store,
        "acme",
        "2026-03-03"
    )?);
    // March's compaction no longer matches: its other days come from their day rollups.
    let stale = plan(None, None)?;
    assert_eq!(stale.months, ["2026-02", "2026-04"]);
    assert_eq!(stale.raw, ["2026-03-03"]);
    assert_eq!(stale.rolled.len(), 30);
    // March changed since the first-seen counts were made: they hold for February alone
    assert!(!firsts(None, None, &["2026-02", "2026-04"])?);
    assert!(firsts(None, Some("2026-03-01"), &["2026-02"])?);
    check_all(&events, false)?;

    // The next refresh rolls the day up again and compacts March again.
    let report = rt.block_on(broadside_analytics::rollup::refresh(&catalog, None))?;
    assert_eq!((report.built, report.months_built), (1, 1));
    assert_eq!(report.firsts_built, 1, "acme's again");
    assert_eq!(report.totals_built, 1, "March's again");
    assert_eq!(plan(None, None)?.months, ["2026-02", "2026-03", "2026-04"]);
    assert!(firsts(None, None, &["2026-02", "2026-03", "2026-04"])?);
    check_all(&events, false)?;

    // Late events in the last month: the first two months keep their counts, April's days are
    // read raw, and its campaigns fold their February and March uniques with them.
    let late = EventSpec {
        start: NaiveDate::from_ymd_opt(2026, 4, 2).unwrap(),
        days: 1,
        events: 400,
        seed: 9,
        ..acme_spec()
    };
    late.write(&store, 1, 4096)?;
    events.extend(late.all());
    let mixed = plan(None, None)?;
    assert_eq!(mixed.months, ["2026-02", "2026-03"]);
    assert_eq!(mixed.raw, ["2026-04-02"]);
    check_all(&events, false)?;
    Ok(())
}

/// The bucket key of an instant, computed independently with chrono-tz.
fn key_of(g: Granularity, tz: Tz, t: DateTime<Utc>) -> String {
    let l = t.with_timezone(&tz);
    match g {
        Granularity::Hour => format!("{} {:02}", l.date_naive(), l.hour()),
        Granularity::Day => l.date_naive().to_string(),
        Granularity::Week => {
            let d = l.date_naive();
            (d - Duration::days(d.weekday().num_days_from_monday() as i64)).to_string()
        }
        Granularity::Month => format!("{}-{:02}", l.year(), l.month()),
    }
}

/// Granularity, zone, optional range, event types.
type Case = (
    Granularity,
    &'static str,
    Option<(&'static str, &'static str)>,
    Vec<EventType>,
);

#[test]
fn time_series_match_brute_force_with_gaps_zones_and_rollups() -> Result<()> {
    let (dir, mut events) = store_with_events()?;
    let store = dir.path().join("store");
    // A campaign with a 10-day hole and a single late event: gaps must come back as zeros.
    let sparse = |day: u32, seed: u64| EventSpec {
        campaigns: 1,
        start: NaiveDate::from_ymd_opt(2026, 2, 20).unwrap() + Duration::days(day as i64),
        days: 1,
        events: 40,
        seed,
        ..acme_spec()
    };
    for (day, seed) in [(0, 11), (1, 12), (12, 13)] {
        let s = sparse(day, seed);
        s.write(&store, 1, 4096)?;
        events.extend(s.all());
    }
    let catalog = Catalog::new(&store);
    let rt = runtime();
    let cases: Vec<Case> = vec![
        (Granularity::Day, "UTC", None, vec![]),
        (
            Granularity::Day,
            "Europe/Paris",
            Some(("2026-03-20T00:00:00Z", "2026-04-05T00:00:00Z")),
            vec![EventType::Opened, EventType::Clicked],
        ),
        (Granularity::Week, "America/New_York", None, vec![]),
        (
            Granularity::Month,
            "Europe/Paris",
            None,
            vec![EventType::Delivered],
        ),
        (
            Granularity::Hour,
            "Asia/Kolkata",
            Some(("2026-03-02T00:00:00Z", "2026-03-04T00:00:00Z")),
            vec![],
        ),
        (
            Granularity::Hour,
            "UTC",
            Some(("2026-03-29T00:00:00Z", "2026-03-30T12:00:00Z")),
            vec![EventType::Submitted],
        ),
    ];
    let run_cases = |events: &[Event], raw_only: bool| -> Result<()> {
        for (g, tz_name, range, types) in &cases {
            for campaign in ["c000", "c003"] {
                let tz: Tz = tz_name.parse().unwrap();
                let q = SeriesQuery {
                    campaign_id: campaign.into(),
                    granularity: *g,
                    time_zone: tz,
                    from: range.map(|r| utc(r.0)),
                    to: range.map(|r| utc(r.1)),
                    event_types: types.clone(),
                    raw_only,
                };
                let s = rt.block_on(time_series(&catalog, "acme", &q))?;
                let wanted: Vec<EventType> = if types.is_empty() {
                    EventType::ALL.to_vec()
                } else {
                    types.clone()
                };
                let mine: Vec<&Event> = events
                    .iter()
                    .filter(|e| e.campaign_id == campaign && wanted.contains(&e.event_type))
                    .filter(|e| range.is_none_or(|r| e.ts >= utc(r.0) && e.ts < utc(r.1)))
                    .collect();
                let mut expect: BTreeMap<(String, String), u64> = BTreeMap::new();
                for e in &mine {
                    *expect
                        .entry((key_of(*g, tz, e.ts), e.event_type.as_str().to_string()))
                        .or_default() += 1;
                }
                // Buckets are consecutive, distinct, and cover every event's bucket.
                let keys: Vec<String> = s
                    .buckets
                    .iter()
                    .map(|b| key_of(*g, tz, utc(&b.start)))
                    .collect();
                assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
                for ((k, t), n) in &expect {
                    let i = keys
                        .iter()
                        .position(|x| x == k)
                        .unwrap_or_else(|| panic!("{campaign} {g:?} {tz_name}: no bucket {k}"));
                    assert_eq!(
                        s.buckets[i].counts[t], *n,
                        "{campaign} {g:?} {tz_name} {k} {t}"
                    );
                }
                let total: u64 = s.buckets.iter().flat_map(|b| b.counts.values()).sum();
                assert_eq!(total, mine.len() as u64, "{campaign} {g:?} {tz_name}");
                // No holes: one bucket per period between the first and the last.
                if *g == Granularity::Day && range.is_none() {
                    let first = NaiveDate::parse_from_str(&keys[0], "%Y-%m-%d")?;
                    let last = NaiveDate::parse_from_str(keys.last().unwrap(), "%Y-%m-%d")?;
                    assert_eq!(keys.len() as i64, (last - first).num_days() + 1);
                }
            }
        }
        Ok(())
    };
    run_cases(&events, true)?;
    rt.block_on(broadside_analytics::rollup::refresh(&catalog, Some("acme")))?;
    run_cases(&events, false)?;

    // The sparse campaign's day series has zeros across its hole.
    let s = rt.block_on(time_series(
        &catalog,
        "acme",
        &SeriesQuery {
            campaign_id: "c000".into(),
            granularity: Granularity::Day,
            time_zone: Tz::UTC,
            from: Some(utc("2026-02-20T00:00:00Z")),
            to: Some(utc("2026-03-05T00:00:00Z")),
            event_types: vec![],
            raw_only: false,
        },
    ))?;
    assert_eq!(s.buckets.len(), 13);
    Ok(())
}

fn api(store: &Path) -> axum::Router {
    let entry = |name: &str, token: &str, ws: &str| TokenEntry {
        name: name.into(),
        sha256: token_hash(token),
        workspaces: vec![ws.into()],
    };
    api_router(ApiConfig {
        catalog: Catalog::new(store),
        tokens: TokenSet {
            tokens: vec![
                entry("acme", ACME_TOKEN, "acme"),
                entry("canary", CANARY_TOKEN, "canary"),
            ],
        },
        bounce_history: Some(store.parent().unwrap().join("bounce-history")),
        sql: Default::default(),
    })
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    ws: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    if let Some(w) = ws {
        r = r.header("workspace_id", w);
    }
    if !body.is_empty() {
        r = r.header("content-type", "application/json");
    }
    let resp = app
        .clone()
        .oneshot(r.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

const ENDPOINTS: [(&str, &str, &str); 16] = [
    ("GET", "/campaign-statistics/", ""),
    ("GET", "/campaign-statistics/c001", ""),
    (
        "GET",
        "/campaign-statistics/c001/time-series?granularity=week",
        "",
    ),
    ("GET", "/campaign-events/?event_type=open&limit=1000", ""),
    ("GET", "/bounce-events/?limit=1000", ""),
    ("GET", "/bounce-events/ev-99-0", ""),
    ("GET", "/historical-bounces/", ""),
    ("GET", "/historical-bounces/export", ""),
    (
        "POST",
        "/historical-bounces/backfill",
        r#"{"full_backfill": true}"#,
    ),
    ("GET", "/historical-bounces/backfill/bf-1", ""),
    ("GET", "/campaign-runs/", ""),
    ("GET", "/campaign-runs/run-000", ""),
    ("GET", "/campaign-recipient-logs/", ""),
    ("GET", "/campaign-recipient-logs/run-000:0", ""),
    ("GET", "/recipients/user7@example.com/history", ""),
    (
        "POST",
        "/sql",
        r#"{"sql": "SELECT event_id, email FROM events"}"#,
    ),
];

#[test]
fn tenant_isolation_matrix() -> Result<()> {
    let (dir, _) = store_with_events()?;
    let store = dir.path().join("store");
    // acme's own (empty) bounce-history folder: its backfill has something to import.
    std::fs::create_dir_all(dir.path().join("bounce-history").join("workspace_id=acme"))?;
    let app = api(&store);
    let rt = runtime();
    rt.block_on(async {
        for (method, uri, body) in ENDPOINTS {
            let attempts: [(Option<&str>, Option<&str>, StatusCode); 8] = [
                (None, Some("acme"), StatusCode::UNAUTHORIZED),
                (Some("not-a-token"), Some("acme"), StatusCode::UNAUTHORIZED),
                (Some(""), Some("acme"), StatusCode::UNAUTHORIZED),
                (Some(ACME_TOKEN), None, StatusCode::FORBIDDEN),
                (Some(ACME_TOKEN), Some("canary"), StatusCode::FORBIDDEN),
                (Some(ACME_TOKEN), Some("../canary"), StatusCode::FORBIDDEN),
                (
                    Some(ACME_TOKEN),
                    Some("acme' OR '1'='1"),
                    StatusCode::FORBIDDEN,
                ),
                (
                    Some(ACME_TOKEN),
                    Some("acme/../canary"),
                    StatusCode::FORBIDDEN,
                ),
            ];
            for (token, ws, want) in attempts {
                let (status, text) = call(&app, method, uri, token, ws, body).await;
                assert_eq!(
                    status, want,
                    "{method} {uri} token={token:?} ws={ws:?}: {text}"
                );
                assert!(!text.contains("ev-99-"), "canary leaked: {text}");
            }
            // A workspace_id query parameter that contradicts the header.
            let sep = if uri.contains('?') { '&' } else { '?' };
            let (status, _) = call(
                &app,
                method,
                &format!("{uri}{sep}workspace_id=canary"),
                Some(ACME_TOKEN),
                Some("acme"),
                body,
            )
            .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri} mismatched");
            // The rightful caller gets an answer, without canary rows.
            let (status, text) =
                call(&app, method, uri, Some(ACME_TOKEN), Some("acme"), body).await;
            assert!(
                status.is_success() || status == StatusCode::NOT_FOUND,
                "{method} {uri}: {status} {text}"
            );
            if status != StatusCode::NOT_FOUND {
                assert!(
                    !text.contains("ev-99-"),
                    "{method} {uri} leaked canary rows: {text}"
                );
            }
        }
        // A canary bounce, fetched by id: the canary sees it, acme does not.
        let id = canary_spec()
            .all()
            .into_iter()
            .find(|e| e.event_type == EventType::Bounced)
            .unwrap()
            .event_id;
        let uri = format!("/bounce-events/{id}");
        let (status, text) = call(&app, "GET", &uri, Some(CANARY_TOKEN), Some("canary"), "").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.contains(&id));
        let (status, _) = call(&app, "GET", &uri, Some(ACME_TOKEN), Some("acme"), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The canary sees its own rows (the canary marker is real).
        let (status, text) = call(
            &app,
            "POST",
            "/sql",
            Some(CANARY_TOKEN),
            Some("canary"),
            r#"{"sql": "SELECT event_id FROM events LIMIT 1"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("ev-99-"), "{text}");
    });
    Ok(())
}

#[test]
fn sql_refusals_and_workspace_scope() -> Result<()> {
    let (dir, events) = store_with_events()?;
    let store = dir.path().join("store");
    let app = api(&store);
    let rt = runtime();
    let canary_file = std::fs::read_dir(store.join("events/workspace_id=canary/date=2026-02-20"))?
        .next()
        .unwrap()?
        .path();
    let escape = dir.path().join("escaped.parquet");
    rt.block_on(async {
        let refused = [
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/'".to_string(),
            format!("COPY events TO '{}'", escape.display()),
            format!(
                "COPY (SELECT * FROM events) TO '{}' STORED AS PARQUET",
                escape.display()
            ),
            "SET datafusion.execution.target_partitions = 1".into(),
            "INSERT INTO events SELECT * FROM events".into(),
            "DROP TABLE events".into(),
            "CREATE VIEW v AS SELECT * FROM events".into(),
            format!("SELECT * FROM '{}'", canary_file.display()),
            "SELECT * FROM '../workspace_id=canary/'".into(),
            "SELECT 1; SELECT 2".into(),
        ];
        for sql in refused {
            let body = serde_json::json!({ "sql": sql }).to_string();
            let (status, text) =
                call(&app, "POST", "/sql", Some(ACME_TOKEN), Some("acme"), &body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {text}");
        }
        assert!(!escape.exists(), "COPY wrote a file");
        let (status, text) = call(
            &app,
            "POST",
            "/sql",
            Some(ACME_TOKEN),
            Some("acme"),
            r#"{"sql": "SELECT count(*) AS n, count(DISTINCT campaign_id) AS c FROM events"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["rows"][0]["n"], events.len() as u64);
        assert_eq!(v["columns"], serde_json::json!(["n", "c"]));
    });
    Ok(())
}

#[test]
fn event_pages_cover_every_row_once() -> Result<()> {
    let (dir, events) = store_with_events()?;
    let store = dir.path().join("store");
    let app = api(&store);
    let rt = runtime();
    rt.block_on(async {
        let want: BTreeSet<String> = events
            .iter()
            .filter(|e| e.event_type == EventType::Bounced && e.campaign_id == "c001")
            .map(|e| e.event_id.clone())
            .collect();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let uri = match &cursor {
                Some(c) => format!("/bounce-events?campaign_id=c001&limit=37&cursor={c}"),
                None => "/bounce-events?campaign_id=c001&limit=37".into(),
            };
            let (status, text) = call(&app, "GET", &uri, Some(ACME_TOKEN), Some("acme"), "").await;
            assert_eq!(status, StatusCode::OK, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let items = v["items"].as_array().unwrap();
            assert!(items.len() <= 37);
            let mut last_ts = String::new();
            for i in items {
                assert_eq!(i["event_type"], "bounced");
                let ts = i["ts"].as_str().unwrap().to_string();
                assert!(ts >= last_ts, "pages are in time order");
                last_ts = ts;
                seen.push(i["event_id"].as_str().unwrap().to_string());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(seen.len(), want.len(), "no row twice");
        assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), want);

        let one = want.iter().next().unwrap();
        let (status, text) = call(
            &app,
            "GET",
            &format!("/bounce-events/{one}"),
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains(one.as_str()));

        let (status, text) = call(
            &app,
            "GET",
            "/campaign-events/?event_type=nope",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(text.contains("event_type"), "{text}");
        let (status, text) = call(
            &app,
            "GET",
            "/campaign-events/?colour=red",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(text.contains("colour"), "{text}");
    });
    Ok(())
}

#[test]
fn historical_bounces_backfill_list_and_export() -> Result<()> {
    let (dir, _) = store_with_events()?;
    let store = dir.path().join("store");
    let root = dir.path().join("bounce-history");
    // Only the caller's folder is imported: not the root's files, not another workspace's.
    let history = root.join("workspace_id=acme");
    std::fs::create_dir_all(&history)?;
    std::fs::create_dir_all(root.join("workspace_id=canary"))?;
    for other in [
        root.join("loose.csv"),
        root.join("workspace_id=canary/c.csv"),
    ] {
        std::fs::write(
            other,
            "email,type,account_number,date\nrival@x.co,hard,R-1,2026-01-05\n",
        )?;
    }
    std::fs::write(
        history.join("export-1.csv"),
        "email,type,account_number,date\nAnn@X.co,hard,A-1,2026-01-05\n\"o,dd\"@x.co,soft,A-2,2026-02-01\nbob@x.co,hard,,2025-12-31\n",
    )?;
    let app = api(&store);
    let rt = runtime();
    rt.block_on(async {
        let (status, text) = call(
            &app,
            "POST",
            "/historical-bounces/backfill",
            Some(ACME_TOKEN),
            Some("acme"),
            r#"{"full_backfill": true}"#,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let url = v["status_url"].as_str().unwrap().to_string();
        // The job runs on a blocking thread; wait for its status to change.
        let job = loop {
            let (status, text) = call(&app, "GET", &url, Some(ACME_TOKEN), Some("acme"), "").await;
            assert_eq!(status, StatusCode::OK);
            let j: Value = serde_json::from_str(&text).unwrap();
            if j["status"] != "running" {
                break j;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["report"]["rows_imported"], 3);
        // Another workspace cannot see the job.
        let (status, _) = call(&app, "GET", &url, Some(CANARY_TOKEN), Some("canary"), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (_, text) = call(
            &app,
            "GET",
            "/historical-bounces/?bounce_type=hard",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap();
        let emails: Vec<&str> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["email"].as_str().unwrap())
            .collect();
        assert_eq!(emails, vec!["bob@x.co", "ann@x.co"], "hard only, by date");
        let (_, text) = call(
            &app,
            "GET",
            "/historical-bounces/?account_number=A-2&date_from=2026-01-10",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert!(
            text.contains("o,dd@x.co") && !text.contains("ann@"),
            "{text}"
        );

        let (status, csv) = call(
            &app,
            "GET",
            "/historical-bounces/export",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "email,bounce_type,account_number,bounced_at,source"
        );
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("bob@x.co,hard,,2025-12-31"), "{csv}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("\"o,dd@x.co\",soft,A-2")),
            "{csv}"
        );

        let (status, text) = call(
            &app,
            "GET",
            "/historical-bounces/export",
            Some(CANARY_TOKEN),
            Some("canary"),
            "",
        )
        .await;
        assert_eq!(
            (status, text.lines().count()),
            (StatusCode::OK, 1),
            "canary has none: {text}"
        );
        let (status, _) = call(
            &app,
            "POST",
            "/historical-bounces/backfill",
            Some(ACME_TOKEN),
            Some("acme"),
            r#"{}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    });
    Ok(())
}

/// `POST /sql` stops at the row and byte limits while the query runs (and says so), refuses
/// the row-fabricating table functions, and answers a query past its memory limit with 422.
#[test]
fn sql_answers_stop_at_their_limits() -> Result<()> {
    let (dir, _) = store_with_events()?;
    let store = dir.path().join("store");
    let limits = broadside_analytics::query::Limits {
        max_rows: 50,
        max_bytes: 1000,
        memory_bytes: 8 << 20,
        ..Default::default()
    };
    let app = api_router(ApiConfig {
        catalog: Catalog::new(&store).with_limits(limits),
        tokens: TokenSet {
            tokens: vec![TokenEntry {
                name: "acme".into(),
                sha256: token_hash(ACME_TOKEN),
                workspaces: vec!["acme".into()],
            }],
        },
        bounce_history: None,
        sql: Default::default(),
    });
    let rt = runtime();
    rt.block_on(async {
        let sql = |q: &str| serde_json::json!({ "sql": q }).to_string();
        let ask = |q: String| {
            let app = app.clone();
            async move { call(&app, "POST", "/sql", Some(ACME_TOKEN), Some("acme"), &q).await }
        };
        let values = (0..100)
            .map(|i| format!("({i})"))
            .collect::<Vec<_>>()
            .join(",");
        let v = format!("WITH v(x) AS (VALUES {values}) ");

        // Rows: a 10⁶-row cross join answers with the first 50.
        let (status, text) = ask(sql(&format!(
            "{v}SELECT a.x * 10000 + b.x * 100 + c.x AS k FROM v a, v b, v c ORDER BY k"
        )))
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(a["truncated"], true);
        assert_eq!(a["truncated_by"], "row_limit");
        assert_eq!(a["row_count"], 50);
        assert_eq!(a["columns"], serde_json::json!(["k"]));
        let keys: Vec<u64> = a["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["k"].as_u64().unwrap())
            .collect();
        assert_eq!(keys, (0..50).collect::<Vec<u64>>());

        // Bytes: rows of ~110 bytes stop before the rows' JSON passes 1000 bytes.
        let (status, text) =
            ask(sql(&format!("{v}SELECT x, repeat('y', 100) AS pad FROM v"))).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(a["truncated_by"], "byte_limit", "{text}");
        let rows = a["rows"].as_array().unwrap();
        let rows_json = serde_json::to_string(rows).unwrap();
        assert!(rows_json.len() <= 1000 + 2, "{} bytes", rows_json.len());
        assert!((7..=9).contains(&rows.len()), "{} rows", rows.len());

        // Exactly at the limit is not truncated; an empty answer still has its columns.
        let (_, text) = ask(sql(&format!("{v}SELECT x FROM v LIMIT 50"))).await;
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (a["truncated"].clone(), a["row_count"].clone()),
            (false.into(), 50.into())
        );
        assert_eq!(a["truncated_by"], Value::Null);
        let (_, text) = ask(sql("SELECT event_id FROM events WHERE false")).await;
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(a["columns"], serde_json::json!(["event_id"]));
        assert_eq!(a["rows"], serde_json::json!([]));

        for f in ["range(1000000000)", "generate_series(1, 1000000000)"] {
            let (status, text) = ask(sql(&format!("SELECT count(*) FROM {f}"))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{f}: {text}");
            assert!(text.contains("not found"), "{text}");
        }

        // Memory: a million distinct keys need more than 8 MiB; no spilling to disk.
        let (status, text) = ask(sql(&format!(
            "{v}SELECT count(DISTINCT a.x * 10000 + b.x * 100 + c.x) AS n FROM v a, v b, v c"
        )))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
        assert!(text.contains("esources exhausted"), "{text}");
    });
    Ok(())
}

/// One ledger row of a synthetic run (the columns the history shows).
#[derive(Debug, Clone)]
struct LedgerRow {
    workspace: &'static str,
    campaign: &'static str,
    run: &'static str,
    row: u64,
    key: Option<String>,
    decision: &'static str,
    reason: Option<&'static str>,
}

/// Writes a run's recipient log in two parts, as a send does, and its run record.
fn write_run(store: &Path, rows: &[LedgerRow], started: &str) -> Result<()> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
    let first = &rows[0];
    let dir = store.join(format!(
        "recipient_logs/workspace_id={}/campaign_id={}/run_id={}",
        first.workspace, first.campaign, first.run
    ));
    std::fs::create_dir_all(&dir)?;
    let schema = broadside_pipeline::store::ledger_schema();
    for (part, chunk) in rows.chunks(rows.len().div_ceil(2)).enumerate() {
        let text = |f: &dyn Fn(&LedgerRow) -> Option<String>| -> ArrayRef {
            std::sync::Arc::new(chunk.iter().map(f).collect::<StringArray>())
        };
        let cols: Vec<ArrayRef> = vec![
            std::sync::Arc::new(chunk.iter().map(|r| r.row).collect::<UInt64Array>()),
            text(&|r| r.key.clone()),
            text(&|r| (r.decision == "sent").then(|| "A".to_string())),
            text(&|r| Some(r.decision.to_string())),
            text(&|r| r.reason.map(str::to_string)),
            text(&|_| None),
            text(&|_| None),
            text(&|r| (r.decision == "sent").then(|| format!("{}_A_00001.ifur", r.run))),
            std::sync::Arc::new(
                chunk
                    .iter()
                    .map(|r| (r.decision == "sent").then_some(r.row as u32 + 1))
                    .collect::<UInt32Array>(),
            ),
            text(&|_| None),
            text(&|_| None),
        ];
        let cols = cols
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| arrow_cast::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(schema.clone(), cols)?;
        // Committed as the store commits: a temporary file renamed into place.
        let path = dir.join(format!("part-{part:05}.parquet"));
        let tmp = path.with_extension("tmp");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&tmp)?,
            schema.clone(),
            None,
        )?;
        w.write(&batch)?;
        w.close()?;
        std::fs::rename(&tmp, &path)?;
    }
    let record = serde_json::json!({
        "run_id": first.run, "campaign_id": first.campaign, "workspace_id": first.workspace,
        "status": "done", "attempts": 1, "started_at": started, "finished_at": started,
        "spec_hash": "0", "input": {"path": "in.csv", "bytes": 0, "modified_ns": 0},
        "suppression_lists": [], "rows": rows.len(), "decisions": {}, "reasons": [],
        "variants": [], "holdout": 0, "suppression_keys": 0, "suppression_build_secs": 0.0,
        "files": [], "stages": [], "elapsed_secs": 1.0, "rows_per_sec": 1.0, "error": null
    });
    let runs = store.join(format!("campaign_runs/workspace_id={}", first.workspace));
    std::fs::create_dir_all(&runs)?;
    std::fs::write(
        runs.join(format!("{}.json", first.run)),
        format!("{record}\n"),
    )?;
    Ok(())
}

/// Ledger rows of a run: recipients `range` of the synthetic events' addresses (spelt as the
/// send writes keys: lowercased), every third one twice, plus an account number, a
/// non-ASCII address and a row without a key.
fn ledger_rows(
    workspace: &'static str,
    campaign: &'static str,
    run: &'static str,
    range: std::ops::Range<u64>,
) -> Vec<LedgerRow> {
    let mut keys: Vec<Option<String>> = Vec::new();
    for r in range {
        keys.push(Some(format!("user{r}@example.com")));
        if r % 3 == 0 {
            keys.push(Some(format!("user{r}@example.com")));
        }
    }
    keys.extend([
        Some("AC-0042".into()),
        Some("ünïcode@example.com".into()),
        None,
    ]);
    let decisions = [
        ("sent", None),
        ("suppressed", Some("hard_bounce")),
        ("skipped", Some("duplicate")),
        ("holdout", Some("holdout")),
    ];
    keys.into_iter()
        .enumerate()
        .map(|(i, key)| LedgerRow {
            workspace,
            campaign,
            run,
            row: i as u64,
            key,
            decision: decisions[i % 4].0,
            reason: decisions[i % 4].1,
        })
        .collect()
}

/// A recipient's history through the API, every page of `limit` items.
async fn history_pages(app: &axum::Router, who: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let who = who.replace(' ', "%20");
    loop {
        let uri = match &cursor {
            Some(c) => format!("/recipients/{who}/history?limit={limit}&cursor={c}"),
            None => format!("/recipients/{who}/history?limit={limit}"),
        };
        let (status, text) = call(app, "GET", &uri, Some(ACME_TOKEN), Some("acme"), "").await;
        assert_eq!(status, StatusCode::OK, "{uri}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        out.extend(items.iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    out
}

/// What the history of `who` must hold, computed by brute force: (at, id, kind, what) of
/// every acme event whose trimmed, ASCII-lowercased address is `who`'s and every acme ledger
/// row whose key is `who` normalised as a send does, newest first.
fn brute_history(
    events: &[Event],
    ledger: &[(LedgerRow, DateTime<Utc>)],
    who: &str,
) -> Vec<(i64, String, String, String)> {
    let identity = who.trim().to_ascii_lowercase();
    let key = if who.contains('@') {
        who.trim().to_lowercase()
    } else {
        who.trim().to_string()
    };
    let mut want: Vec<(i64, String, String, String)> = events
        .iter()
        .filter(|e| e.email.trim().to_ascii_lowercase() == identity)
        .map(|e| {
            (
                e.ts.timestamp_micros(),
                e.event_id.clone(),
                "event".to_string(),
                format!("{} {}", e.campaign_id, e.event_type.as_str()),
            )
        })
        .collect();
    want.extend(
        ledger
            .iter()
            .filter(|(r, _)| r.workspace == "acme" && r.key.as_deref() == Some(key.as_str()))
            .map(|(r, at)| {
                (
                    at.timestamp_micros(),
                    format!("{}:{}", r.run, r.row),
                    "decision".to_string(),
                    format!("{} {}", r.campaign, r.decision),
                )
            }),
    );
    want.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    want
}

fn seen_history(items: &[Value]) -> Vec<(i64, String, String, String)> {
    items
        .iter()
        .map(|i| {
            let at = DateTime::parse_from_rfc3339(i["at"].as_str().unwrap())
                .unwrap()
                .timestamp_micros();
            let kind = i["kind"].as_str().unwrap().to_string();
            let (id, what) = if kind == "event" {
                (
                    i["event_id"].as_str().unwrap().to_string(),
                    format!(
                        "{} {}",
                        i["campaign_id"].as_str().unwrap(),
                        i["event_type"].as_str().unwrap()
                    ),
                )
            } else {
                (
                    i["id"].as_str().unwrap().to_string(),
                    format!(
                        "{} {}",
                        i["campaign_id"].as_str().unwrap(),
                        i["decision"].as_str().unwrap()
                    ),
                )
            };
            (at, id, kind, what)
        })
        .collect()
}

#[test]
fn recipient_history_matches_brute_force_raw_indexed_and_mixed() -> Result<()> {
    use broadside_analytics::recipients::IndexPlan;
    let (dir, mut events) = store_with_events()?;
    let store = dir.path().join("store");
    let mut ledger: Vec<(LedgerRow, DateTime<Utc>)> = Vec::new();
    let add_run = |ledger: &mut Vec<_>, rows: Vec<LedgerRow>, started: &str| -> Result<()> {
        write_run(&store, &rows, started)?;
        ledger.extend(rows.into_iter().map(|r| (r, utc(started))));
        Ok(())
    };
    let rows = ledger_rows("acme", "c001", "run-a", 0..100);
    add_run(&mut ledger, rows, "2026-02-21T08:00:00Z")?;
    let rows = ledger_rows("acme", "c002", "run-b", 50..150);
    add_run(&mut ledger, rows, "2026-03-10T08:00:00Z")?;
    // The other tenant: the same campaign id and addresses.
    let rows = ledger_rows("canary", "c001", "run-c", 0..50);
    add_run(&mut ledger, rows, "2026-03-30T08:00:00Z")?;
    let catalog = Catalog::new(&store);
    let rt = runtime();
    let app = api(&store);
    let people = [
        "user7@example.com",
        "  USER7@Example.COM ",
        "user60@example.com",
        "user120@example.com",
        "user299@example.com",
        "ÜNÏCODE@example.com",
        "AC-0042",
        "ac-0042",
        "nobody@example.com",
    ];
    let check = |events: &[Event], ledger: &[(LedgerRow, DateTime<Utc>)]| {
        rt.block_on(async {
            for who in people {
                let want = brute_history(events, ledger, who);
                let all = history_pages(&app, who, 1000).await;
                assert_eq!(seen_history(&all), want, "{who:?}");
                assert!(
                    all.iter()
                        .all(|i| !i.to_string().contains("ev-99-")
                            && !i.to_string().contains("run-c")),
                    "canary rows in acme's history of {who:?}"
                );
                // Small pages cover the same rows once each, in the same order.
                let paged = history_pages(&app, who, 7).await;
                assert_eq!(paged, all, "{who:?} paged by 7");
            }
        });
        // Someone with both events and decisions (so the check has something to compare).
        let seen = brute_history(events, ledger, "user60@example.com");
        assert!(seen.iter().any(|s| s.2 == "event") && seen.iter().any(|s| s.2 == "decision"));
    };

    // Raw: no index yet.
    let plan = IndexPlan::new(&store, "acme")?;
    assert!(plan.days_indexed.is_empty() && plan.runs_indexed.is_empty());
    assert_eq!((plan.days_raw.len(), plan.runs_raw.len()), (45, 2));
    check(&events, &ledger);

    // Indexed: every day and run, and read from the index.
    let report = rt.block_on(broadside_analytics::rollup::refresh(&catalog, None))?;
    let r = report.recipients;
    assert_eq!((r.days_built, r.runs_built, r.raced), (90, 3, 0), "{r:?}");
    // Closed months of runs merged: acme's February and March, canary's March.
    assert_eq!(r.months_built, 3, "{r:?}");
    let again = rt.block_on(broadside_analytics::rollup::refresh(&catalog, None))?;
    assert_eq!(
        (again.recipients.days_built, again.recipients.runs_built),
        (0, 0)
    );
    assert_eq!(
        (again.recipients.days_current, again.recipients.runs_current),
        (90, 3)
    );
    let plan = IndexPlan::new(&store, "acme")?;
    assert!(
        plan.days_raw.is_empty() && plan.runs_raw.is_empty(),
        "{plan:?}"
    );
    assert_eq!(
        (
            again.recipients.months_built,
            again.recipients.months_current
        ),
        (0, 3)
    );
    // Both runs come from their months' merged files, not their own.
    assert_eq!(plan.ledger_months, ["2026-02", "2026-03"]);
    assert!(plan.runs_indexed.is_empty(), "{plan:?}");
    check(&events, &ledger);
    // The index files are sorted by the hash, with the hash's page statistics.
    let idx =
        store.join("rollups/recipient_events/workspace_id=acme/date=2026-03-03/events.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&idx)?,
    )?
    .build()?;
    let mut last = 0u64;
    let mut rows = 0;
    for b in reader {
        let b = b?;
        let h = b
            .column_by_name("email_hash")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::UInt64Array>()
            .unwrap()
            .clone();
        for v in h.values() {
            assert!(*v >= last, "sorted by email_hash");
            last = *v;
        }
        rows += b.num_rows();
    }
    let day = NaiveDate::from_ymd_opt(2026, 3, 3).unwrap();
    assert_eq!(
        rows,
        events.iter().filter(|e| e.ts.date_naive() == day).count()
    );

    // Mixed: late events in one day and a new run since the refresh are read raw, the rest
    // from the index.
    let late = EventSpec {
        start: day,
        days: 1,
        events: 500,
        seed: 8,
        ..acme_spec()
    };
    late.write(&store, 1, 4096)?;
    events.extend(late.all());
    let rows = ledger_rows("acme", "c003", "run-d", 5..80);
    add_run(&mut ledger, rows, "2026-04-02T08:00:00Z")?;
    // run-b resumed: its log parts rewritten with more rows.
    ledger.retain(|(r, _)| r.run != "run-b");
    let rows = ledger_rows("acme", "c002", "run-b", 50..160);
    add_run(&mut ledger, rows, "2026-03-10T08:00:00Z")?;
    let plan = IndexPlan::new(&store, "acme")?;
    let pair = |c: &str, r: &str| (c.to_string(), r.to_string());
    assert_eq!(plan.days_raw, ["2026-03-03"]);
    assert_eq!(
        plan.runs_raw,
        [pair("c002", "run-b"), pair("c003", "run-d")]
    );
    // Stale index files are left out of the lookup (the new run has none yet), and so is
    // run-a's own, read from February's merged file; March's no longer holds run-b's log.
    assert_eq!(plan.days_unusable, ["2026-03-03"]);
    assert_eq!(plan.ledger_months, ["2026-02"]);
    assert_eq!(
        plan.runs_unusable,
        [pair("c001", "run-a"), pair("c002", "run-b")]
    );
    check(&events, &ledger);

    // A cursor that is not one is refused, naming it.
    rt.block_on(async {
        let (status, text) = call(
            &app,
            "GET",
            "/recipients/user7@example.com/history?cursor=zz",
            Some(ACME_TOKEN),
            Some("acme"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(text.contains("cursor"), "{text}");
    });
    Ok(())
}
