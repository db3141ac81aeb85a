//! `broadside bench`: the capacity-planning benchmark.
//!
//! 1. **Send**: for each campaign size × worker count × input format it generates (or reuses)
//!    a data set and runs `broadside send --workers K` on it in a child process: wall time,
//!    CPU time and peak RSS (from `wait4`), and the run record's per-stage busy/blocked
//!    seconds. `--repeat` runs each configuration several times; summaries use the median.
//! 2. **Ingest**: for each `--events` count it writes deterministic NDJSON events of the
//!    benchmark's campaign and earlier ones ([`events`]) and runs `broadside ingest --from`
//!    into a fresh store in a child process; with `--brokers` also a Kafka ingest of the same
//!    events, produced to a fresh topic through `broadside serve`'s webhook intake.
//! 3. **Queries**: `broadside serve` on that store (after `broadside rollup` with `--rollup`);
//!    the first (cold) and the median of `--query-repeat` warm requests of four API queries.
//! 4. **Model and report**: a least-squares capacity model ([`model`]), validated by leaving
//!    one size out, projects N recipients on K cores; `--report DIR` writes `report.json`
//!    and a self-contained `report.html` ([`report`]).

mod events;
mod measure;
mod model;
mod report;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use broadside_pipeline::run::RunRecord;
use broadside_pipeline::spec::CampaignSpec;

use crate::generate::{generate, GenerateOptions};
use measure::{http, run_child, Server};
use report::{
    EventSet, FormatModel, HeldOutSize, IngestPoint, IngestSummary, Machine, QueryPoint, Report,
    RollupPoint, SendPoint, SendSummary, ServePoint, StageSummary,
};

/// Input formats of the send measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Recipients as CSV.
    Csv,
    /// Recipients as Parquet.
    Parquet,
}

impl InputFormat {
    fn name(self) -> &'static str {
        match self {
            InputFormat::Csv => "csv",
            InputFormat::Parquet => "parquet",
        }
    }
}

const AFTER_HELP: &str = "\
Every child is the same broadside binary. Data sets are generated once per size and format under \
--dir and reused; each (size, workers, format) sends into a store of its own beside the data set \
(store-wK/, megasys-wK/), removed after each run unless --keep. Events are written to \
DIR/events/events-N.ndjson and ingested into DIR/events/store-N/ (kept after the run, so the store \
can be inspected with `broadside sql --store DIR/events/store-N --workspace demo …`); child logs go to \
DIR/logs/.

Report (--report DIR): DIR/report.json holds every measured point (inputs, wall/CPU/peak RSS, the \
run records, ingest summaries, query timings), the machine (cores, memory, CPU model, date, version, \
build profile), the fitted models with their leave-one-size-out errors and the projection table; \
DIR/report.html shows the same with inline SVG charts (no script, no external asset).

Model: wall(N, K) = a + N·(s + p/K) with K = min(workers, cores), peak RSS = m0 + m1·N + m2·K, fitted \
by non-negative least squares to the median of each configuration, per input format; validated by \
leaving one measured size out; projected for N in {1M, 10M, 50M, 100M} on K in {2, 4, 8, 16} cores, \
rows beyond the measured sizes or worker counts flagged as extrapolated.

Kafka (--brokers): events are produced to a fresh topic (broadside-bench-N-<ms>, created by the \
broker's auto-creation) through `broadside serve --brokers`' webhook intake (the root crate has no \
Kafka client of its own), then consumed by `broadside ingest --brokers … --exit-when-idle-ms`; its \
records/s excludes that idle wait (--kafka-idle-ms), not the group join.";

/// Options of `broadside bench`.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[command(after_long_help = AFTER_HELP)]
pub struct BenchOptions {
    /// Campaign sizes (recipients), comma separated.
    #[arg(long = "rows", value_delimiter = ',', default_value = "1000000")]
    pub sizes: Vec<u64>,
    /// Worker counts for `broadside send --workers K`, comma separated (default: all cores).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: Vec<u64>,
    /// Input formats, comma separated (csv, parquet).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "csv")]
    pub formats: Vec<InputFormat>,
    /// Measure Parquet input too (the same as adding `parquet` to --formats).
    #[arg(long)]
    pub parquet: bool,
    /// Suppression entries of each generated data set.
    #[arg(long, default_value_t = 200_000)]
    pub suppressions: u64,
    /// Where generated data sets, event files, ingest stores and child logs are kept.
    #[arg(long, default_value = "target/bench-data")]
    pub dir: PathBuf,
    /// Keep each configuration's send outputs and run record (of its last run).
    #[arg(long)]
    pub keep: bool,
    /// Share of rows repeating an earlier row's person (skipped as `duplicate`).
    #[arg(long, default_value_t = 0.005)]
    pub duplicate_share: f64,
    /// Runs per send configuration; summaries give the median and the best.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Event counts for the ingest and query measurements, comma separated (none: skipped).
    #[arg(long, value_delimiter = ',')]
    pub events: Vec<u64>,
    /// Campaigns the events spread over: the benchmark's generated campaign (40 % of the
    /// messages) and N−1 earlier ones.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub event_campaigns: u32,
    /// Days the campaigns' sends spread over (from 2026-01-05).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub event_days: u32,
    /// Kafka bootstrap servers: also measure a Kafka ingest of the same events.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Kafka: the consumer's `--exit-when-idle-ms` (it must cover joining the group); the
    /// wait is left out of the Kafka records/s.
    #[arg(long, default_value_t = 10_000)]
    pub kafka_idle_ms: u64,
    /// Run (and time) `broadside rollup` on each store before its queries; without it the
    /// queries scan raw events.
    #[arg(long)]
    pub rollup: bool,
    /// Warm requests per query after the first (cold) one; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub query_repeat: u32,
    /// Write report.json and report.html into this folder.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// Step counter: a progress bar on a terminal, one line per step otherwise.
struct Steps {
    bar: Option<indicatif::ProgressBar>,
    done: u64,
    total: u64,
}

impl Steps {
    fn new(total: u64) -> Steps {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        Steps {
            bar,
            done: 0,
            total,
        }
    }

    /// Starts step `msg`.
    fn step(&mut self, msg: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.set_position(self.done - 1);
                b.set_message(msg.to_string());
            }
            None => eprintln!("[{}/{}] {msg}…", self.done, self.total),
        }
    }

    /// A result line on stdout (above the bar).
    fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The data set of `rows` in `format`: generated once, then reused.
fn dataset(o: &BenchOptions, rows: u64, format: InputFormat) -> Result<PathBuf> {
    let dir = o.dir.join(format!(
        "r{rows}-s{}-d{}-{}",
        o.suppressions,
        o.duplicate_share,
        format.name()
    ));
    let spec = dir.join("campaign.toml");
    if !spec.exists() {
        generate(&GenerateOptions {
            out: dir.clone(),
            rows,
            suppressions: o.suppressions,
            overlap: 0.5,
            invalid_share: 0.02,
            duplicate_share: o.duplicate_share,
            seed: 42,
            parquet: format == InputFormat::Parquet,
        })
        .with_context(|| format!("generating the data set {}", dir.display()))?;
    }
    Ok(spec)
}

/// A copy of `spec` whose outputs go to `store-<tag>/` and `megasys-<tag>/`, so each
/// configuration's run record stays apart.
fn config_spec(spec: &Path, tag: &str) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let mut out = String::new();
    let (mut store, mut hot) = (false, false);
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with("store =") {
            store = true;
            out.push_str(&format!("store = \"store-{tag}\"\n"));
        } else if t.starts_with("hot_folder =") {
            hot = true;
            out.push_str(&format!("hot_folder = \"megasys-{tag}/hot\"\n"));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !(store && hot) {
        bail!(
            "{}: no `store =` / `hot_folder =` line to redirect",
            spec.display()
        );
    }
    let path = spec.with_file_name(format!("campaign-{tag}.toml"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn clean_outputs(dir: &Path, tag: &str) {
    for d in [format!("store-{tag}"), format!("megasys-{tag}")] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Parses `… R records, N event rows (…), D dead letters, F files, C commits …`.
fn parse_ingest_summary(line: &str) -> IngestSummary {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')' || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let num_before = |word: &str, next: Option<&str>| -> u64 {
        words
            .windows(3)
            .find(|w| w[1] == word && next.is_none_or(|n| w[2] == n))
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0)
    };
    IngestSummary {
        records: num_before("records", None),
        rows: num_before("event", Some("rows")),
        dead_letters: num_before("dead", Some("letters")),
        files: num_before("files", None),
        commits: num_before("commits", None),
    }
}

fn url_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs the benchmark, prints its tables and writes the report.
pub fn bench(o: &BenchOptions) -> Result<()> {
    if o.sizes.is_empty() {
        bail!("--rows needs at least one size");
    }
    let exe = std::env::current_exe().context("locating the broadside binary")?;
    let machine = Machine::probe();
    let mut formats = o.formats.clone();
    if o.parquet {
        formats.push(InputFormat::Parquet);
    }
    formats.sort();
    formats.dedup();
    let workers: Vec<usize> = if o.workers.is_empty() {
        vec![machine.cores]
    } else {
        o.workers.iter().map(|&k| k as usize).collect()
    };
    let logs = o.dir.join("logs");
    let per_events = 2 + u64::from(o.brokers.is_some()) + u64::from(o.rollup);
    let mut steps = Steps::new(
        (o.sizes.len() * workers.len() * formats.len()) as u64 * o.repeat as u64
            + o.events.len() as u64 * per_events,
    );

    // 1. Sends.
    let mut sends: Vec<SendPoint> = Vec::new();
    let mut first_spec = None;
    for &format in &formats {
        for &rows in &o.sizes {
            let spec = dataset(o, rows, format)?;
            first_spec.get_or_insert(spec.clone());
            let dir = spec.parent().expect("spec in a folder").to_path_buf();
            for &k in &workers {
                let tag = format!("w{k}");
                let cspec = config_spec(&spec, &tag)?;
                for attempt in 1..=o.repeat {
                    steps.step(&format!(
                        "send {rows} rows, {k} workers, {} (run {attempt}/{})",
                        format.name(),
                        o.repeat
                    ));
                    clean_outputs(&dir, &tag);
                    let run_id = format!("bench-{rows}-w{k}-{}-{attempt}", format.name());
                    let done = run_child(
                        &format!(
                            "broadside send ({rows} rows, {k} workers, {})",
                            format.name()
                        ),
                        Command::new(&exe)
                            .arg("send")
                            .arg(&cspec)
                            .arg("--run-id")
                            .arg(&run_id)
                            .arg("--workers")
                            .arg(k.to_string())
                            .arg("--no-progress"),
                        &logs.join(format!("send-{run_id}")),
                    )?;
                    let record_path = crate::send::record_path(&cspec, &run_id)?;
                    let record = RunRecord::load(&record_path).with_context(|| {
                        format!("reading the run record {}", record_path.display())
                    })?;
                    let kept = o.keep && attempt == o.repeat;
                    if !kept {
                        clean_outputs(&dir, &tag);
                    }
                    let u = done.usage;
                    steps.say(&format!(
                        "{rows} recipients, {k} workers, {} (run {attempt}/{}): {:.2}s wall, {:.2} M rows/s end to end, \
                         CPU {:.2}s ({:.2} µs/recipient), peak RSS {:.0} MB, index {:.3}s",
                        format.name(),
                        o.repeat,
                        u.wall_secs,
                        rows as f64 / u.wall_secs / 1e6,
                        u.cpu_secs,
                        u.cpu_secs / rows.max(1) as f64 * 1e6,
                        u.peak_rss as f64 / 1e6,
                        record.suppression_build_secs
                    ));
                    for s in &record.stages {
                        steps.say(&format!(
                            "    {:<12} {:>8.2} M rows/s busy  busy {:>7.2}s  blocked {:>7.2}s",
                            s.name,
                            s.rows_per_sec / 1e6,
                            s.busy_secs,
                            s.blocked_secs
                        ));
                    }
                    sends.push(SendPoint {
                        format: format.name().into(),
                        rows,
                        workers: k,
                        effective_workers: k.min(machine.cores),
                        suppressions: o.suppressions,
                        attempt,
                        run_id,
                        spec: cspec.display().to_string(),
                        record_path: record_path.display().to_string(),
                        kept,
                        usage: u,
                        rows_per_sec: rows as f64 / u.wall_secs,
                        cpu_us_per_row: u.cpu_secs / rows.max(1) as f64 * 1e6,
                        record: serde_json::to_value(&record)?,
                    });
                }
            }
        }
    }
    let summaries = summarise(&sends);

    // 2 + 3. Events: ingest and queries.
    let mut event_sets = std::collections::BTreeMap::new();
    let mut ingests = Vec::new();
    let mut rollups = Vec::new();
    let mut queries = Vec::new();
    let mut serves = Vec::new();
    let kafka_note = match &o.brokers {
        Some(b) => format!("measured against {b}: produced through `broadside serve --brokers` (webhook intake), consumed by `broadside ingest --brokers`"),
        None => "not measured (give --brokers B)".to_string(),
    };
    if !o.events.is_empty() {
        let spec = CampaignSpec::load(first_spec.as_ref().expect("a data set"))?;
        let plan = events::EventPlan {
            workspace: spec.workspace_id.clone(),
            campaigns: (0..o.event_campaigns)
                .map(|i| match i {
                    0 => spec.campaign_id.clone(),
                    i => format!("{}-earlier-{i:02}", spec.campaign_id),
                })
                .collect(),
            population: *o.sizes.iter().max().expect("a size"),
            generator: broadside_sources::synthetic::Generator::new(42, 0.02)
                .with_duplicates(o.duplicate_share),
            start: chrono::NaiveDate::from_ymd_opt(2026, 1, 5).expect("date"),
            days: o.event_days,
            seed: 7,
        };
        let edir = o.dir.join("events");
        let (tokens, token) = new_token(&exe, &edir, &plan.workspace)?;
        for &n in &o.events {
            let file = edir.join(format!("events-{n}.ndjson"));
            steps.step(&format!("ingest {n} events from a file"));
            let info = plan.write(n, &file)?;
            let store = edir.join(format!("store-{n}"));
            let _ = std::fs::remove_dir_all(&store);
            let done = run_child(
                &format!("broadside ingest ({n} events from {})", file.display()),
                Command::new(&exe)
                    .arg("ingest")
                    .arg("--store")
                    .arg(&store)
                    .arg("--from")
                    .arg(&file),
                &logs.join(format!("ingest-file-{n}")),
            )?;
            let line = done.stdout.lines().last().unwrap_or("").to_string();
            let summary = parse_ingest_summary(&line);
            steps.say(&format!(
                "ingest {n} events (file): {:.2}s wall, {:.0} records/s, peak RSS {:.0} MB; {line}",
                done.usage.wall_secs,
                n as f64 / done.usage.wall_secs,
                done.usage.peak_rss as f64 / 1e6
            ));
            ingests.push(IngestPoint {
                source: "file".into(),
                events: n,
                store: store.display().to_string(),
                input: file.display().to_string(),
                usage: done.usage,
                idle_wait_secs: 0.0,
                records_per_sec: summary.records as f64 / done.usage.wall_secs,
                summary,
                summary_line: line,
                produce_secs: None,
            });
            if let Some(brokers) = &o.brokers {
                steps.step(&format!("ingest {n} events from Kafka"));
                ingests.push(kafka_ingest(
                    &exe,
                    brokers,
                    o.kafka_idle_ms,
                    &edir,
                    &logs,
                    &file,
                    n,
                    &plan.workspace,
                )?);
                let p = ingests.last().expect("pushed");
                steps.say(&format!(
                    "ingest {n} events (Kafka): {:.2}s wall ({:.1}s idle wait), {:.0} records/s, peak RSS {:.0} MB; {}",
                    p.usage.wall_secs, p.idle_wait_secs, p.records_per_sec, p.usage.peak_rss as f64 / 1e6, p.summary_line
                ));
            }
            if o.rollup {
                steps.step(&format!("rollup of {n} events"));
                let done = run_child(
                    &format!("broadside rollup ({n} events)"),
                    Command::new(&exe).arg("rollup").arg("--store").arg(&store),
                    &logs.join(format!("rollup-{n}")),
                )?;
                steps.say(&format!(
                    "rollup {n} events: {:.2}s wall, peak RSS {:.0} MB",
                    done.usage.wall_secs,
                    done.usage.peak_rss as f64 / 1e6
                ));
                rollups.push(RollupPoint {
                    events: n,
                    usage: done.usage,
                });
            }
            steps.step(&format!("queries over {n} events"));
            let (qs, usage) = run_queries(&exe, &store, &tokens, &token, &plan, &info, n, o)?;
            for q in &qs {
                steps.say(&format!(
                    "query {:<18} {n:>10} events: cold {:>9.2} ms, warm {:>9.2} ms (median of {})",
                    q.query,
                    q.cold_ms,
                    q.warm_median_ms,
                    q.warm_ms.len()
                ));
            }
            queries.extend(qs);
            serves.push(ServePoint { events: n, usage });
            event_sets.insert(
                n,
                EventSet {
                    file: file.display().to_string(),
                    info,
                },
            );
        }
    }
    steps.finish();

    // 4. Model, projection, report.
    let models = fit_models(&summaries);
    print_tables(&summaries, &ingests, &queries, &models);
    let mut report = Report {
        schema: 1,
        machine,
        options: serde_json::to_value(o)?,
        send: sends,
        send_summary: summaries,
        event_sets,
        ingest: ingests,
        rollup: rollups,
        queries,
        serve: serves,
        kafka: kafka_note,
        model_description: report::MODEL_DESCRIPTION.to_string(),
        models,
        charts: Vec::new(),
    };
    if let Some(dir) = &o.report {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (page, charts) = report::html(&report);
        report.charts = charts;
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let html = dir.join("report.html");
        std::fs::write(&html, page).with_context(|| format!("writing {}", html.display()))?;
        println!("\nreport: {} and {}", json.display(), html.display());
    }
    Ok(())
}

/// Medians per (format, rows, workers), in measurement order.
fn summarise(sends: &[SendPoint]) -> Vec<SendSummary> {
    let mut out: Vec<SendSummary> = Vec::new();
    for p in sends {
        if out
            .iter()
            .any(|s| s.format == p.format && s.rows == p.rows && s.workers == p.workers)
        {
            continue;
        }
        let runs: Vec<&SendPoint> = sends
            .iter()
            .filter(|q| q.format == p.format && q.rows == p.rows && q.workers == p.workers)
            .collect();
        let record =
            |q: &SendPoint| -> Option<RunRecord> { serde_json::from_value(q.record.clone()).ok() };
        let records: Vec<RunRecord> = runs.iter().filter_map(|q| record(q)).collect();
        let stage_names: Vec<String> = records
            .first()
            .map(|r| r.stages.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        let stage = |name: &str, f: fn(&broadside_pipeline::runner::StageStats) -> f64| {
            median(
                records
                    .iter()
                    .filter_map(|r| r.stages.iter().find(|s| s.name == name).map(f)),
            )
        };
        let wall = median(runs.iter().map(|q| q.usage.wall_secs));
        out.push(SendSummary {
            format: p.format.clone(),
            rows: p.rows,
            workers: p.workers,
            effective_workers: p.effective_workers,
            runs: runs.len(),
            wall_secs: wall,
            best_wall_secs: runs
                .iter()
                .map(|q| q.usage.wall_secs)
                .fold(f64::INFINITY, f64::min),
            rows_per_sec: p.rows as f64 / wall,
            cpu_us_per_row: median(runs.iter().map(|q| q.cpu_us_per_row)),
            peak_rss: runs.iter().map(|q| q.usage.peak_rss).max().unwrap_or(0),
            index_secs: median(records.iter().map(|r| r.suppression_build_secs)),
            stages: stage_names
                .iter()
                .map(|n| StageSummary {
                    name: n.clone(),
                    busy_secs: stage(n, |s| s.busy_secs),
                    blocked_secs: stage(n, |s| s.blocked_secs),
                })
                .collect(),
        });
    }
    out
}

/// The model of each format, its leave-one-size-out errors and projection.
fn fit_models(summaries: &[SendSummary]) -> Vec<FormatModel> {
    let mut formats: Vec<&str> = summaries.iter().map(|s| s.format.as_str()).collect();
    formats.sort();
    formats.dedup();
    let mut out = Vec::new();
    for f in formats {
        let obs: Vec<model::Obs> = summaries
            .iter()
            .filter(|s| s.format == f)
            .map(|s| model::Obs {
                rows: s.rows as f64,
                k: s.effective_workers as f64,
                wall: s.wall_secs,
                rss: s.peak_rss as f64,
            })
            .collect();
        let Some(m) = model::fit(&obs) else { continue };
        let held_out = model::leave_one_size_out(&obs);
        let mut sizes: Vec<u64> = held_out.iter().map(|h| h.rows).collect();
        sizes.dedup();
        let mean_abs = |v: Vec<Option<f64>>| -> Option<f64> {
            let v: Option<Vec<f64>> = v.into_iter().collect();
            v.filter(|v| !v.is_empty())
                .map(|v| v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64)
        };
        let held_out_by_size = sizes
            .iter()
            .map(|&n| HeldOutSize {
                rows: n,
                wall_mean_abs_rel_error: mean_abs(
                    held_out
                        .iter()
                        .filter(|h| h.rows == n)
                        .map(|h| h.wall_rel_error)
                        .collect(),
                ),
                rss_mean_abs_rel_error: mean_abs(
                    held_out
                        .iter()
                        .filter(|h| h.rows == n)
                        .map(|h| h.rss_rel_error)
                        .collect(),
                ),
            })
            .collect();
        out.push(FormatModel {
            format: f.to_string(),
            wall_formula: report::formula(&m, true),
            rss_formula: report::formula(&m, false),
            projection: model::project(&m, &obs),
            model: m,
            held_out,
            held_out_by_size,
        });
    }
    out
}

fn print_tables(
    summaries: &[SendSummary],
    ingests: &[IngestPoint],
    queries: &[QueryPoint],
    models: &[FormatModel],
) {
    println!("\n| format | recipients | workers | runs | wall s (median, best) | M rows/s (median) | CPU µs/recipient (median) | peak RSS MB (max) | index build s (median) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in summaries {
        println!(
            "| {} | {} | {} | {} | {:.2}, {:.2} | {:.2} | {:.2} | {:.0} | {:.3} |",
            s.format,
            s.rows,
            s.workers,
            s.runs,
            s.wall_secs,
            s.best_wall_secs,
            s.rows_per_sec / 1e6,
            s.cpu_us_per_row,
            s.peak_rss as f64 / 1e6,
            s.index_secs
        );
    }
    if !ingests.is_empty() {
        println!("\n| source | events | rows committed | wall s | records/s | peak RSS MB |");
        println!("|---|---:|---:|---:|---:|---:|");
        for p in ingests {
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} |",
                p.source,
                p.events,
                p.summary.rows,
                p.usage.wall_secs,
                p.records_per_sec,
                p.usage.peak_rss as f64 / 1e6
            );
        }
        println!("\n| events | query | cold ms | warm ms (median) |");
        println!("|---:|---|---:|---:|");
        for q in queries {
            println!(
                "| {} | {} | {:.2} | {:.2} |",
                q.events, q.query, q.cold_ms, q.warm_median_ms
            );
        }
    }
    for m in models {
        println!(
            "\nmodel ({}): {}; {}",
            m.format, m.wall_formula, m.rss_formula
        );
        for h in &m.held_out {
            let pct = |v: Option<f64>| {
                v.map(|v| format!("{:+.1} %", v * 100.0))
                    .unwrap_or("– (no other size)".into())
            };
            println!(
                "  held out {} rows, {} workers: wall {:.3}s predicted {} ({}), peak RSS {:.0} MB predicted {} ({})",
                h.rows,
                h.workers,
                h.wall_secs,
                h.predicted_wall_secs.map(|v| format!("{v:.3}s")).unwrap_or("–".into()),
                pct(h.wall_rel_error),
                h.peak_rss / 1e6,
                h.predicted_peak_rss.map(|v| format!("{:.0} MB", v / 1e6)).unwrap_or("–".into()),
                pct(h.rss_rel_error)
            );
        }
        println!("\nprojection ({}): N recipients on K cores", m.format);
        println!("| recipients | cores | expected wall | M rows/s | expected peak RSS MB | |");
        println!("|---:|---:|---:|---:|---:|---|");
        for p in &m.projection {
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {} |",
                p.recipients,
                p.cores,
                report::secs(p.wall_secs),
                p.rows_per_sec / 1e6,
                p.peak_rss / 1e6,
                if p.extrapolated {
                    format!("extrapolated ({})", p.beyond.join(", "))
                } else {
                    String::new()
                }
            );
        }
    }
}

/// `broadside token new` for `workspace`: (tokens file, token).
fn new_token(exe: &Path, dir: &Path, workspace: &str) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = Command::new(exe)
        .args(["token", "new", "--name", "bench", "--workspace", workspace])
        .output()
        .context("running broadside token new")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("broadside token new failed ({}): {stderr}", out.status);
    }
    let token = stderr
        .split_whitespace()
        .last()
        .filter(|t| t.starts_with("bs_"))
        .with_context(|| format!("broadside token new printed no token: {stderr}"))?
        .to_string();
    let tokens = dir.join("tokens.toml");
    std::fs::write(&tokens, &out.stdout)
        .with_context(|| format!("writing {}", tokens.display()))?;
    Ok((tokens, token))
}

/// Starts `broadside serve` on the store and times the four queries.
#[allow(clippy::too_many_arguments)]
fn run_queries(
    exe: &Path,
    store: &Path,
    tokens: &Path,
    token: &str,
    plan: &events::EventPlan,
    info: &events::EventsInfo,
    n: u64,
    o: &BenchOptions,
) -> Result<(Vec<QueryPoint>, measure::Usage)> {
    let server = Server::start(
        &format!("broadside serve ({n} events)"),
        Command::new(exe)
            .arg("serve")
            .arg("--store")
            .arg(store)
            .arg("--tokens")
            .arg(tokens)
            .args(["--listen", "127.0.0.1:0", "--rollup-every", "0"]),
    )?;
    let campaign = url_encode(&plan.campaigns[0]);
    let from = info.first_ts.date_naive();
    let to = info.last_ts.date_naive();
    let list = [
        ("campaign", format!("/campaign-statistics/{campaign}")),
        (
            "time_series",
            format!("/campaign-statistics/{campaign}/time-series?granularity=day&date_from={from}&date_to={to}"),
        ),
        ("all_campaigns", "/campaign-statistics/".to_string()),
        (
            "recipient_history",
            format!("/campaign-events/?email={}&limit=1000", url_encode(&info.sample_email)),
        ),
    ];
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("workspace_id", plan.workspace.as_str()),
    ];
    let mut out = Vec::new();
    for (name, path) in list {
        let get = || -> Result<measure::Answer> {
            let a = http(&server.addr, "GET", &path, &headers, b"")
                .map_err(|e| server.context(e.context(format!("query {name}: GET {path}"))))?;
            if a.status != 200 {
                return Err(server.context(anyhow::anyhow!(
                    "query {name}: GET {path} answered {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body[..a.body.len().min(2000)])
                )));
            }
            Ok(a)
        };
        let cold = get()?;
        let mut warm = Vec::new();
        for _ in 0..o.query_repeat {
            warm.push(get()?.secs * 1e3);
        }
        out.push(QueryPoint {
            events: n,
            query: name.to_string(),
            path: path.clone(),
            cold_ms: cold.secs * 1e3,
            warm_median_ms: median(warm.iter().copied()),
            warm_ms: warm,
            bytes: cold.body.len(),
        });
    }
    let usage = server.stop()?;
    Ok((out, usage))
}

/// Produces the events to a fresh topic through the webhook intake of a `broadside serve
/// --brokers`, then measures `broadside ingest` consuming them.
#[allow(clippy::too_many_arguments)]
fn kafka_ingest(
    exe: &Path,
    brokers: &str,
    idle_ms: u64,
    edir: &Path,
    logs: &Path,
    file: &Path,
    n: u64,
    workspace: &str,
) -> Result<IngestPoint> {
    let millis = chrono::Utc::now().timestamp_millis();
    let topic = format!("broadside-bench-{n}-{millis}");
    let secret = format!("bench-webhook-secret-{millis}");
    let scratch = edir.join(format!("webhook-store-{n}"));
    let server = Server::start(
        "broadside serve (webhook intake producing to Kafka)",
        Command::new(exe)
            .arg("serve")
            .arg("--store")
            .arg(&scratch)
            .args(["--listen", "127.0.0.1:0", "--brokers", brokers])
            .args(["--webhook-topic", &topic])
            .args(["--webhook-secret", &secret])
            .args(["--webhook-workspace", workspace])
            .env_remove("BROADSIDE_TOKENS")
            .env_remove("BROADSIDE_WEBHOOK_TOKENS"),
    )?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let auth = format!("Bearer {secret}");
    let started = std::time::Instant::now();
    let mut chunk = String::new();
    let mut lines = text.lines().peekable();
    while lines.peek().is_some() {
        chunk.clear();
        while let Some(l) = lines.peek() {
            if !chunk.is_empty() && chunk.len() + l.len() > 512 * 1024 {
                break;
            }
            chunk.push_str(l);
            chunk.push('\n');
            lines.next();
        }
        let a = http(
            &server.addr,
            "POST",
            "/webhooks/events",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/x-ndjson"),
            ],
            chunk.as_bytes(),
        )
        .map_err(|e| server.context(e.context("producing events to Kafka")))?;
        if !(200..300).contains(&a.status) {
            return Err(server.context(anyhow::anyhow!(
                "producing events to Kafka: POST /webhooks/events answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body[..a.body.len().min(2000)])
            )));
        }
    }
    let produce_secs = started.elapsed().as_secs_f64();
    server.stop()?;
    let _ = std::fs::remove_dir_all(&scratch);
    let store = edir.join(format!("store-kafka-{n}"));
    let _ = std::fs::remove_dir_all(&store);
    let done = run_child(
        &format!("broadside ingest ({n} events from Kafka topic {topic})"),
        Command::new(exe)
            .arg("ingest")
            .arg("--store")
            .arg(&store)
            .args(["--brokers", brokers, "--topic", &topic])
            .args(["--group", &format!("bench-{millis}")])
            .args(["--exit-when-idle-ms", &idle_ms.to_string()]),
        &logs.join(format!("ingest-kafka-{n}")),
    )?;
    let line = done.stdout.lines().last().unwrap_or("").to_string();
    let idle = idle_ms as f64 / 1e3;
    let summary = parse_ingest_summary(&line);
    if summary.records != n {
        bail!(
            "broadside ingest from Kafka topic {topic} read {} of the {n} records produced before it \
             was idle for {idle_ms} ms (raise --kafka-idle-ms?); its summary: {line}\n--- stderr tail ---\n{}",
            summary.records,
            measure::tail(&logs.join(format!("ingest-kafka-{n}.stderr")), 20)
        );
    }
    Ok(IngestPoint {
        source: "kafka".into(),
        events: n,
        store: store.display().to_string(),
        input: topic,
        usage: done.usage,
        idle_wait_secs: idle,
        records_per_sec: summary.records as f64 / (done.usage.wall_secs - idle).max(1e-3),
        summary,
        summary_line: line,
        produce_secs: Some(produce_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::{median, parse_ingest_summary};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }

    #[test]
    fn parses_the_ingest_summary() {
        let s = parse_ingest_summary("ingested x.ndjson: 6000 records, 5990 event rows (0 attributed from the ledger), 10 dead letters, 31 files, 2 commits (0 already committed, skipped; 0 gaps recorded)");
        assert_eq!(
            (s.records, s.rows, s.dead_letters, s.files, s.commits),
            (6000, 5990, 10, 31, 2)
        );
    }
}
