//! The report: every measured point as JSON (`report.json`) and a self-contained HTML page
//! (`report.html`: inline CSS, inline SVG charts, no script, no external asset).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::events::EventsInfo;
use super::measure::Usage;
use super::model::{HeldOut, Model, Projection, Term};

/// Facts about the machine and the binary.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `available_parallelism`.
    pub cores: usize,
    /// MemTotal of /proc/meminfo, bytes.
    pub memory_bytes: Option<u64>,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// /proc/sys/kernel/osrelease.
    pub kernel: Option<String>,
    /// When the benchmark started (UTC, RFC 3339).
    pub date: String,
    /// `broadside` version.
    pub version: String,
    /// `debug` or `release` (debug builds are many times slower).
    pub profile: String,
}

impl Machine {
    /// Reads the facts of this machine.
    pub fn probe() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string());
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_bytes,
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            version: env!("CARGO_PKG_VERSION").to_string(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        }
    }
}

/// One measured `broadside send`.
#[derive(Debug, Clone, Serialize)]
pub struct SendPoint {
    /// Input format (`csv`, `parquet`).
    pub format: String,
    /// Recipients (input rows).
    pub rows: u64,
    /// `--workers`.
    pub workers: usize,
    /// `min(workers, cores)`.
    pub effective_workers: usize,
    /// Suppression entries of the data set.
    pub suppressions: u64,
    /// Attempt (1..=repeat).
    pub attempt: u32,
    /// Run id.
    pub run_id: String,
    /// Spec the run used.
    pub spec: String,
    /// Where the run record was written (still there with `--keep`, for the last attempt).
    pub record_path: String,
    /// Whether the run's outputs (and record) were kept.
    pub kept: bool,
    /// Wall, CPU, peak RSS of the child.
    pub usage: Usage,
    /// Input rows per wall second.
    pub rows_per_sec: f64,
    /// CPU µs per recipient.
    pub cpu_us_per_row: f64,
    /// The run record the child wrote (rows, decisions, stages, …).
    pub record: serde_json::Value,
}

/// The median of one configuration's runs.
#[derive(Debug, Clone, Serialize)]
pub struct SendSummary {
    /// Format.
    pub format: String,
    /// Recipients.
    pub rows: u64,
    /// `--workers`.
    pub workers: usize,
    /// `min(workers, cores)`.
    pub effective_workers: usize,
    /// Runs.
    pub runs: usize,
    /// Median wall seconds.
    pub wall_secs: f64,
    /// Best wall seconds.
    pub best_wall_secs: f64,
    /// Rows per median wall second.
    pub rows_per_sec: f64,
    /// Median CPU µs per recipient.
    pub cpu_us_per_row: f64,
    /// Largest peak RSS, bytes.
    pub peak_rss: u64,
    /// Median seconds building the suppression index.
    pub index_secs: f64,
    /// Median busy and blocked seconds per stage, in pipeline order.
    pub stages: Vec<StageSummary>,
}

/// One stage's median figures.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    /// Stage name.
    pub name: String,
    /// Median busy seconds (summed over workers).
    pub busy_secs: f64,
    /// Median blocked seconds.
    pub blocked_secs: f64,
}

/// Counts from an ingest's summary line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestSummary {
    /// Records read.
    pub records: u64,
    /// Event rows committed.
    pub rows: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Files written.
    pub files: u64,
    /// Commits.
    pub commits: u64,
}

/// One measured `broadside ingest`.
#[derive(Debug, Clone, Serialize)]
pub struct IngestPoint {
    /// `file` or `kafka`.
    pub source: String,
    /// Events offered.
    pub events: u64,
    /// The store it wrote (kept, for inspection and the queries).
    pub store: String,
    /// The NDJSON file (file ingest) or topic (Kafka).
    pub input: String,
    /// Wall, CPU, peak RSS of the child.
    pub usage: Usage,
    /// Kafka: the idle time the child waits before exiting (`--exit-when-idle-ms`), included
    /// in the wall time; 0 for files.
    pub idle_wait_secs: f64,
    /// Records per second of (wall − idle wait).
    pub records_per_sec: f64,
    /// Its summary line, parsed.
    pub summary: IngestSummary,
    /// Its summary line.
    pub summary_line: String,
    /// Kafka: seconds producing the events through the webhook intake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub produce_secs: Option<f64>,
}

/// One measured `broadside rollup`.
#[derive(Debug, Clone, Serialize)]
pub struct RollupPoint {
    /// Events in the store.
    pub events: u64,
    /// Wall, CPU, peak RSS.
    pub usage: Usage,
}

/// One query's timings at one event count.
#[derive(Debug, Clone, Serialize)]
pub struct QueryPoint {
    /// Events in the store.
    pub events: u64,
    /// Query name.
    pub query: String,
    /// Request path.
    pub path: String,
    /// The first request after the server started, ms.
    pub cold_ms: f64,
    /// Every warm request, ms.
    pub warm_ms: Vec<f64>,
    /// Median of the warm requests, ms.
    pub warm_median_ms: f64,
    /// Answer size, bytes.
    pub bytes: usize,
}

/// The server the queries ran against.
#[derive(Debug, Clone, Serialize)]
pub struct ServePoint {
    /// Events in the store.
    pub events: u64,
    /// Whole life of the server (start, queries, kill).
    pub usage: Usage,
}

/// The event data set of one event count.
#[derive(Debug, Clone, Serialize)]
pub struct EventSet {
    /// The NDJSON file.
    pub file: String,
    /// What it holds.
    pub info: EventsInfo,
}

/// The model of one input format, with its validation and projection.
#[derive(Debug, Clone, Serialize)]
pub struct FormatModel {
    /// Format.
    pub format: String,
    /// Fit on every measured size.
    pub model: Model,
    /// Wall formula with the fitted coefficients.
    pub wall_formula: String,
    /// Memory formula with the fitted coefficients.
    pub rss_formula: String,
    /// Leave-one-size-out predictions.
    pub held_out: Vec<HeldOut>,
    /// Per measured size: mean |relative error| of its held-out points.
    pub held_out_by_size: Vec<HeldOutSize>,
    /// N recipients on K cores.
    pub projection: Vec<Projection>,
}

/// Held-out error of one size.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutSize {
    /// Recipients.
    pub rows: u64,
    /// Mean |relative error| of wall time (`None`: no model without this size).
    pub wall_mean_abs_rel_error: Option<f64>,
    /// Mean |relative error| of peak RSS.
    pub rss_mean_abs_rel_error: Option<f64>,
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Format version of this file.
    pub schema: u32,
    /// Machine and binary.
    pub machine: Machine,
    /// The command line options.
    pub options: serde_json::Value,
    /// Every send run.
    pub send: Vec<SendPoint>,
    /// Medians per configuration.
    pub send_summary: Vec<SendSummary>,
    /// Event data sets.
    pub event_sets: BTreeMap<u64, EventSet>,
    /// Every ingest.
    pub ingest: Vec<IngestPoint>,
    /// Rollups (with `--rollup`).
    pub rollup: Vec<RollupPoint>,
    /// Every query.
    pub queries: Vec<QueryPoint>,
    /// The servers of the queries.
    pub serve: Vec<ServePoint>,
    /// Kafka: measured, or why not.
    pub kafka: String,
    /// The model's description.
    pub model_description: String,
    /// Fitted models, per format.
    pub models: Vec<FormatModel>,
    /// Titles of the charts in report.html, in order (one `<svg>` each).
    pub charts: Vec<String>,
}

/// The model's documentation (HTML page, JSON, --help).
pub const MODEL_DESCRIPTION: &str = "Wall time: wall(N, K) = a + N·(s + p/K), N recipients, K = min(workers, cores): \
a fixed start-up and suppression-index cost a, a serial cost per recipient s (reading, writing) and a parallel \
cost per recipient p shared by the K decision workers (Amdahl's law). Peak memory: rss(N, K) = m0 + m1·N + m2·K. \
Both are fitted by least squares to the median of each measured configuration (per input format), with every \
coefficient ≥ 0 (a negative one is dropped and the rest refitted). Terms the measurements cannot identify are \
left out: with one size there is no intercept (wall ∝ N, memory constant in N), with one worker count no \
serial/parallel split (wall does not depend on K) and no per-worker memory. Validation: leave one size out — the \
model fitted to the other sizes predicts the held-out size's points; the relative error (predicted − measured) / \
measured is reported per point. Projections beyond the largest measured size, or to core counts outside the \
measured worker counts, are extrapolations and flagged. Projections hold for this machine's per-core speed, \
the benchmark's suppression count and duplicate share, and the build profile it ran with.";

// ---------------------------------------------------------------------------------------
// Formatting

/// Escapes text for HTML (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// 1 500 000 → "1.5M".
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{suffix}")
}

/// Seconds, readable.
pub fn secs(v: f64) -> String {
    if v >= 3600.0 {
        format!("{:.1} h", v / 3600.0)
    } else if v >= 120.0 {
        format!("{:.1} min", v / 60.0)
    } else if v >= 1.0 {
        format!("{v:.2} s")
    } else {
        format!("{:.1} ms", v * 1e3)
    }
}

/// Bytes as MB.
pub fn mb(v: f64) -> String {
    format!("{:.0} MB", v / 1e6)
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:+.1} %", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

/// The formula of a fit with its coefficients.
pub fn formula(m: &Model, wall: bool) -> String {
    let fit = if wall { &m.wall } else { &m.rss };
    let mut parts = Vec::new();
    for (t, c) in &fit.terms {
        parts.push(match (t, wall) {
            (Term::Const, true) => format!("{c:.4} s"),
            (Term::Rows, true) => format!("N × {:.4} µs", c * 1e6),
            (Term::RowsPerWorker, true) => format!("N/K × {:.4} µs", c * 1e6),
            (Term::Const, false) => format!("{:.1} MB", c / 1e6),
            (Term::Rows, false) => format!("N × {c:.2} B"),
            (Term::Workers, false) => format!("K × {:.2} MB", c / 1e6),
            (Term::RowsPerWorker, false) => format!("N/K × {c:.2} B"),
            (Term::Workers, true) => format!("K × {c:.4} s"),
        });
    }
    if parts.is_empty() {
        parts.push("0".into());
    }
    format!(
        "{} = {}",
        if wall { "wall" } else { "peak RSS" },
        parts.join(" + ")
    )
}

// ---------------------------------------------------------------------------------------
// SVG charts

const PALETTE: [&str; 16] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
];

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed.
    pub dashed: bool,
}

/// A line chart.
pub struct LineChart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
    /// Formats y tick values.
    pub y_fmt: fn(f64) -> String,
}

const W: f64 = 720.0;
const H: f64 = 360.0;
const ML: f64 = 70.0;
const MR: f64 = 200.0;
const MT: f64 = 36.0;
const MB: f64 = 50.0;

/// Round tick values covering `[0, max]`.
fn nice_ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let n = (max / step).ceil() as usize;
    (0..=n.max(1)).map(|i| i as f64 * step).collect()
}

fn svg_open(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><title>{t}</title><text x="{x}" y="22" class="ct">{t}</text>"#,
        t = esc(title),
        x = ML
    );
}

/// Renders a line chart; the x axis is logarithmic when the x values span 20× or more.
pub fn line_chart(c: &LineChart) -> String {
    let mut out = String::new();
    svg_open(&mut out, &c.title);
    let xs: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| x.is_finite())
        .collect();
    let ys: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .collect();
    if xs.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" class="note">no data</text></svg>"#,
            W / 2.0 - 30.0,
            H / 2.0
        );
        return out;
    }
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let log = xmin > 0.0 && xmax / xmin >= 20.0;
    let tx = |x: f64| if log { x.log10() } else { x };
    let (lo, hi) = if xmin == xmax {
        (tx(xmin) - 1.0, tx(xmax) + 1.0)
    } else if log {
        (tx(xmin), tx(xmax))
    } else {
        (0.0f64.min(xmin), xmax)
    };
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let px = |x: f64| ML + (tx(x) - lo) / (hi - lo) * pw;
    let yt = nice_ticks(ys.iter().cloned().fold(0.0, f64::max) * 1.05);
    let ymax = *yt.last().expect("ticks");
    let py = |y: f64| MT + ph - y / ymax * ph;
    // Grid and y ticks.
    for &t in &yt {
        let _ = write!(
            out,
            r#"<line x1="{ML}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{tx:.1}" y="{ty:.1}" class="yt">{l}</text>"#,
            x2 = ML + pw,
            y = py(t),
            tx = ML - 6.0,
            ty = py(t) + 4.0,
            l = esc(&(c.y_fmt)(t))
        );
    }
    // X ticks: the measured x values (distinct), thinned to at most 8.
    let mut ticks = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let every = ticks.len().div_ceil(8).max(1);
    for (i, &t) in ticks.iter().enumerate() {
        if i % every != 0 && i != ticks.len() - 1 {
            continue;
        }
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{y1}" y2="{y2}" class="tick"/><text x="{x:.1}" y="{ty}" class="xt">{l}</text>"#,
            x = px(t),
            y1 = MT + ph,
            y2 = MT + ph + 5.0,
            ty = MT + ph + 18.0,
            l = esc(&si(t))
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{yb}" class="axis"/><line x1="{ML}" x2="{xr}" y1="{yb}" y2="{yb}" class="axis"/><text x="{xc}" y="{xl}" class="xl">{xlab}{logn}</text><text transform="translate(16 {yc}) rotate(-90)" class="yl">{ylab}</text>"#,
        yb = MT + ph,
        xr = ML + pw,
        xc = ML + pw / 2.0,
        xl = H - 10.0,
        yc = MT + ph / 2.0,
        xlab = esc(&c.x_label),
        logn = if log { " (log scale)" } else { "" },
        ylab = esc(&c.y_label)
    );
    for (i, s) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{}/>"#,
            pts.join(" "),
            if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            }
        );
        for p in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}</title></circle>"#,
                px(p.0),
                py(p.1),
                esc(&format!(
                    "{}: x = {}, y = {}",
                    s.name,
                    si(p.0),
                    (c.y_fmt)(p.1)
                ))
            );
        }
        legend(&mut out, i, &s.name, color, s.dashed);
    }
    out.push_str("</svg>");
    out
}

fn legend(out: &mut String, i: usize, name: &str, color: &str, dashed: bool) {
    let y = MT + 8.0 + i as f64 * 18.0;
    let x = W - MR + 14.0;
    let _ = write!(
        out,
        r#"<line x1="{x}" x2="{x2}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{d}/><text x="{tx}" y="{ty}" class="lg">{n}</text>"#,
        x2 = x + 18.0,
        tx = x + 24.0,
        ty = y + 4.0,
        d = if dashed {
            r#" stroke-dasharray="4 3""#
        } else {
            ""
        },
        n = esc(name)
    );
}

/// One bar: its label and its segments (name, value), bottom up.
pub type Bar = (String, Vec<(String, f64)>);

/// A stacked bar chart: groups (e.g. sizes) of bars (busy, blocked), each a stack of
/// segments (stages) whose names pick the colours.
pub struct StackedBars {
    /// Title.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// (group label, bars: (bar label, segments: (segment name, value))).
    pub groups: Vec<(String, Vec<Bar>)>,
}

/// Renders a stacked bar chart.
pub fn stacked_bars(c: &StackedBars) -> String {
    let mut out = String::new();
    svg_open(&mut out, &c.title);
    let mut names: Vec<String> = Vec::new();
    for (_, bars) in &c.groups {
        for (_, segs) in bars {
            for (n, _) in segs {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
    }
    let max = c
        .groups
        .iter()
        .flat_map(|g| {
            g.1.iter()
                .map(|b| b.1.iter().map(|s| s.1.max(0.0)).sum::<f64>())
        })
        .fold(0.0, f64::max);
    let yt = nice_ticks(max * 1.05);
    let ymax = *yt.last().expect("ticks");
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let py = |y: f64| MT + ph - y / ymax * ph;
    for &t in &yt {
        let _ = write!(
            out,
            r#"<line x1="{ML}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{tx:.1}" y="{ty:.1}" class="yt">{l}</text>"#,
            x2 = ML + pw,
            y = py(t),
            tx = ML - 6.0,
            ty = py(t) + 4.0,
            l = esc(format!("{t:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.'))
        );
    }
    let ng = c.groups.len().max(1) as f64;
    let gw = pw / ng;
    for (gi, (glabel, bars)) in c.groups.iter().enumerate() {
        let nb = bars.len().max(1) as f64;
        let bw = (gw * 0.8 / nb).min(60.0);
        let x0 = ML + gi as f64 * gw + (gw - bw * nb) / 2.0;
        for (bi, (blabel, segs)) in bars.iter().enumerate() {
            let x = x0 + bi as f64 * bw;
            let mut acc = 0.0;
            for (n, v) in segs {
                let v = v.max(0.0);
                let ni = names.iter().position(|x| x == n).unwrap_or(0);
                let _ = write!(
                    out,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{f}"{o}><title>{t}</title></rect>"#,
                    y = py(acc + v),
                    w = bw - 2.0,
                    h = (py(acc) - py(acc + v)).max(0.0),
                    f = PALETTE[ni % PALETTE.len()],
                    o = if blabel.contains("blocked") {
                        r#" fill-opacity="0.45""#
                    } else {
                        ""
                    },
                    t = esc(&format!("{glabel}, {blabel}, {n}: {v:.3} s"))
                );
                acc += v;
            }
            let _ = write!(
                out,
                r#"<text x="{x:.1}" y="{y:.1}" class="bl">{l}</text>"#,
                x = x + bw / 2.0 - 1.0,
                y = MT + ph + 12.0,
                l = esc(blabel)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{x:.1}" y="{y:.1}" class="xt">{l}</text>"#,
            x = ML + gi as f64 * gw + gw / 2.0,
            y = MT + ph + 28.0,
            l = esc(glabel)
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{yb}" class="axis"/><line x1="{ML}" x2="{xr}" y1="{yb}" y2="{yb}" class="axis"/><text transform="translate(16 {yc}) rotate(-90)" class="yl">{ylab}</text>"#,
        yb = MT + ph,
        xr = ML + pw,
        yc = MT + ph / 2.0,
        ylab = esc(&c.y_label)
    );
    for (i, n) in names.iter().enumerate() {
        legend(&mut out, i, n, PALETTE[i % PALETTE.len()], false);
    }
    let _ = write!(
        out,
        r#"<text x="{x}" y="{y}" class="note">solid: busy, pale: blocked</text>"#,
        x = W - MR + 14.0,
        y = MT + 8.0 + names.len() as f64 * 18.0 + 10.0
    );
    out.push_str("</svg>");
    out
}

// ---------------------------------------------------------------------------------------
// The page

fn table(out: &mut String, id: Option<&str>, head: &[&str], rows: &[Vec<String>]) {
    match id {
        Some(id) => {
            let _ = write!(out, r#"<table id="{}">"#, esc(id));
        }
        None => out.push_str("<table>"),
    }
    out.push_str("<thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        let flagged = r.iter().any(|c| c.starts_with("extrapolated"));
        out.push_str(if flagged { r#"<tr class="x">"# } else { "<tr>" });
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}\
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:10px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}tr.x td{color:#8a5a00;background:#fff8e6}\
svg{display:block;margin:12px 0;background:#fff;border:1px solid #e3e3e3;max-width:100%;height:auto}\
svg text{font:12px system-ui,sans-serif;fill:#333}svg .ct{font-size:14px;font-weight:600}\
svg .yt{text-anchor:end}svg .xt,svg .xl,svg .yl,svg .bl{text-anchor:middle}svg .bl{font-size:10px}\
svg .grid{stroke:#eee}svg .axis,svg .tick{stroke:#555}svg .note{font-size:11px;fill:#666}\
code,.formula{font-family:ui-monospace,monospace;background:#f6f6f6;padding:2px 4px}.formula{display:block;padding:8px;margin:6px 0}\
p.note{color:#555}";

/// Renders report.html; returns the page and the chart titles in order.
pub fn html(r: &Report) -> (String, Vec<String>) {
    let mut o = String::new();
    let mut charts = Vec::new();
    let mut chart = |o: &mut String, title: String, svg: String| {
        charts.push(title);
        o.push_str(&svg);
    };
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{CSS}</style></head><body><h1>{t}</h1>",
        t = esc(&format!("Broadside capacity benchmark, {}", r.machine.date))
    );
    // Machine.
    let m = &r.machine;
    o.push_str("<h2>Machine</h2>");
    table(
        &mut o,
        Some("machine"),
        &["fact", "value"],
        &[
            vec!["cores (available parallelism)".into(), m.cores.to_string()],
            vec![
                "memory".into(),
                m.memory_bytes
                    .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or("?".into()),
            ],
            vec!["CPU".into(), m.cpu_model.clone().unwrap_or("?".into())],
            vec!["kernel".into(), m.kernel.clone().unwrap_or("?".into())],
            vec!["date".into(), m.date.clone()],
            vec!["broadside".into(), m.version.clone()],
            vec!["build profile".into(), m.profile.clone()],
        ],
    );
    if m.profile == "debug" {
        o.push_str("<p class=\"note\">A debug build: figures are far below a release build's; use them for shape, not capacity.</p>");
    }
    let _ = write!(
        o,
        "<p class=\"note\">Options: <code>{}</code></p>",
        esc(&r.options.to_string())
    );

    // Send.
    o.push_str("<h2>Send</h2>");
    let rows: Vec<Vec<String>> = r
        .send_summary
        .iter()
        .map(|s| {
            vec![
                s.format.clone(),
                s.rows.to_string(),
                s.workers.to_string(),
                s.runs.to_string(),
                secs(s.wall_secs),
                secs(s.best_wall_secs),
                si(s.rows_per_sec),
                format!("{:.3}", s.cpu_us_per_row),
                mb(s.peak_rss as f64),
                secs(s.index_secs),
            ]
        })
        .collect();
    table(
        &mut o,
        Some("send"),
        &[
            "format",
            "recipients",
            "workers",
            "runs",
            "wall (median)",
            "wall (best)",
            "rows/s",
            "CPU µs/recipient",
            "peak RSS (max)",
            "index build",
        ],
        &rows,
    );
    let configs = {
        let mut v: Vec<(String, usize)> = r
            .send_summary
            .iter()
            .map(|s| (s.format.clone(), s.workers))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let by_size = |f: &dyn Fn(&SendSummary) -> f64| -> Vec<Series> {
        configs
            .iter()
            .map(|(fmt, k)| Series {
                name: format!("{fmt}, {k} workers"),
                points: r
                    .send_summary
                    .iter()
                    .filter(|s| &s.format == fmt && s.workers == *k)
                    .map(|s| (s.rows as f64, f(s)))
                    .collect(),
                dashed: fmt == "parquet",
            })
            .collect()
    };
    chart(
        &mut o,
        "Send: recipients per second against campaign size".into(),
        line_chart(&LineChart {
            title: "Send: recipients per second against campaign size".into(),
            x_label: "recipients".into(),
            y_label: "recipients/s (median run)".into(),
            series: by_size(&|s| s.rows_per_sec),
            y_fmt: si,
        }),
    );
    chart(
        &mut o,
        "Send: peak RSS against campaign size".into(),
        line_chart(&LineChart {
            title: "Send: peak RSS against campaign size".into(),
            x_label: "recipients".into(),
            y_label: "peak RSS, MB".into(),
            series: by_size(&|s| s.peak_rss as f64 / 1e6),
            y_fmt: si,
        }),
    );
    for (fmt, k) in &configs {
        let title = format!("Send stages, {fmt}, {k} workers: busy and blocked seconds per size");
        let groups = r
            .send_summary
            .iter()
            .filter(|s| &s.format == fmt && s.workers == *k)
            .map(|s| {
                (
                    si(s.rows as f64),
                    vec![
                        (
                            "busy".to_string(),
                            s.stages
                                .iter()
                                .map(|g| (g.name.clone(), g.busy_secs))
                                .collect(),
                        ),
                        (
                            "blocked".to_string(),
                            s.stages
                                .iter()
                                .map(|g| (g.name.clone(), g.blocked_secs))
                                .collect(),
                        ),
                    ],
                )
            })
            .collect();
        chart(
            &mut o,
            title.clone(),
            stacked_bars(&StackedBars {
                title,
                y_label: "seconds (summed over workers)".into(),
                groups,
            }),
        );
    }
    // Scaling with workers: rows/s against workers, a line per size and format.
    let mut sizes: Vec<(String, u64)> = r
        .send_summary
        .iter()
        .map(|s| (s.format.clone(), s.rows))
        .collect();
    sizes.sort();
    sizes.dedup();
    let title = "Send: scaling with worker count".to_string();
    chart(
        &mut o,
        title.clone(),
        line_chart(&LineChart {
            title,
            x_label: "workers".into(),
            y_label: "recipients/s (median run)".into(),
            series: sizes
                .iter()
                .map(|(fmt, n)| Series {
                    name: format!("{} {fmt}", si(*n as f64)),
                    points: {
                        let mut p: Vec<(f64, f64)> = r
                            .send_summary
                            .iter()
                            .filter(|s| &s.format == fmt && s.rows == *n)
                            .map(|s| (s.workers as f64, s.rows_per_sec))
                            .collect();
                        p.sort_by(|a, b| a.0.total_cmp(&b.0));
                        p
                    },
                    dashed: fmt == "parquet",
                })
                .collect(),
            y_fmt: si,
        }),
    );

    // Ingest.
    o.push_str("<h2>Ingest</h2>");
    let _ = write!(o, "<p class=\"note\">Kafka: {}</p>", esc(&r.kafka));
    let rows: Vec<Vec<String>> = r
        .ingest
        .iter()
        .map(|p| {
            vec![
                p.source.clone(),
                p.events.to_string(),
                p.summary.rows.to_string(),
                p.summary.dead_letters.to_string(),
                secs(p.usage.wall_secs),
                secs(p.usage.cpu_secs),
                si(p.records_per_sec),
                mb(p.usage.peak_rss as f64),
                p.summary.files.to_string(),
            ]
        })
        .collect();
    table(
        &mut o,
        Some("ingest"),
        &[
            "source",
            "events",
            "rows committed",
            "dead letters",
            "wall",
            "CPU",
            "records/s",
            "peak RSS",
            "files",
        ],
        &rows,
    );
    let mut sources: Vec<String> = r.ingest.iter().map(|p| p.source.clone()).collect();
    sources.sort();
    sources.dedup();
    let ingest_series = |f: &dyn Fn(&IngestPoint) -> f64| -> Vec<Series> {
        sources
            .iter()
            .map(|src| Series {
                name: src.clone(),
                points: r
                    .ingest
                    .iter()
                    .filter(|p| &p.source == src)
                    .map(|p| (p.events as f64, f(p)))
                    .collect(),
                dashed: false,
            })
            .collect()
    };
    for (title, y, f) in [
        (
            "Ingest: records per second against event count",
            "records/s",
            (&|p: &IngestPoint| p.records_per_sec) as &dyn Fn(&IngestPoint) -> f64,
        ),
        (
            "Ingest: peak RSS against event count",
            "peak RSS, MB",
            &|p: &IngestPoint| p.usage.peak_rss as f64 / 1e6,
        ),
    ] {
        chart(
            &mut o,
            title.into(),
            line_chart(&LineChart {
                title: title.into(),
                x_label: "events".into(),
                y_label: y.into(),
                series: ingest_series(f),
                y_fmt: si,
            }),
        );
    }
    if !r.rollup.is_empty() {
        let rows: Vec<Vec<String>> = r
            .rollup
            .iter()
            .map(|p| {
                vec![
                    p.events.to_string(),
                    secs(p.usage.wall_secs),
                    mb(p.usage.peak_rss as f64),
                ]
            })
            .collect();
        o.push_str("<h3>Rollup</h3>");
        table(
            &mut o,
            Some("rollup"),
            &["events", "wall", "peak RSS"],
            &rows,
        );
    }

    // Queries.
    o.push_str("<h2>Queries</h2>");
    let rows: Vec<Vec<String>> = r
        .queries
        .iter()
        .map(|q| {
            vec![
                q.events.to_string(),
                q.query.clone(),
                q.path.clone(),
                format!("{:.2}", q.cold_ms),
                format!("{:.2}", q.warm_median_ms),
                q.bytes.to_string(),
            ]
        })
        .collect();
    table(
        &mut o,
        Some("queries"),
        &[
            "events",
            "query",
            "request",
            "cold ms",
            "warm ms (median)",
            "bytes",
        ],
        &rows,
    );
    let mut qnames: Vec<String> = Vec::new();
    for q in &r.queries {
        if !qnames.contains(&q.query) {
            qnames.push(q.query.clone());
        }
    }
    let mut series = Vec::new();
    for cold in [false, true] {
        for n in &qnames {
            series.push(Series {
                name: format!("{n}{}", if cold { " (cold)" } else { "" }),
                points: r
                    .queries
                    .iter()
                    .filter(|q| &q.query == n)
                    .map(|q| {
                        (
                            q.events as f64,
                            if cold { q.cold_ms } else { q.warm_median_ms },
                        )
                    })
                    .collect(),
                dashed: cold,
            });
        }
    }
    let title = "Query latency against event count".to_string();
    chart(
        &mut o,
        title.clone(),
        line_chart(&LineChart {
            title,
            x_label: "events in the store".into(),
            y_label: "ms (warm: median; dashed: first request)".into(),
            series,
            y_fmt: si,
        }),
    );
    if !r.serve.is_empty() {
        let rows: Vec<Vec<String>> = r
            .serve
            .iter()
            .map(|s| {
                vec![
                    s.events.to_string(),
                    mb(s.usage.peak_rss as f64),
                    secs(s.usage.cpu_secs),
                ]
            })
            .collect();
        table(
            &mut o,
            Some("serve"),
            &["events", "server peak RSS", "server CPU"],
            &rows,
        );
    }

    // Model.
    o.push_str("<h2>Model</h2>");
    let _ = write!(o, "<p>{}</p>", esc(&r.model_description));
    o.push_str("<p class=\"formula\">wall(N, K) = a + N·(s + p / K), K = min(workers, cores)<br>rss(N, K) = m0 + m1·N + m2·K</p>");
    for fm in &r.models {
        let _ = write!(
            o,
            "<h3>{f}</h3><p class=\"formula\">{w}<br>{m}</p>",
            f = esc(&format!("Input {}", fm.format)),
            w = esc(&fm.wall_formula),
            m = esc(&fm.rss_formula)
        );
        let rows: Vec<Vec<String>> = fm
            .held_out
            .iter()
            .map(|h| {
                vec![
                    h.rows.to_string(),
                    h.workers.to_string(),
                    secs(h.wall_secs),
                    h.predicted_wall_secs.map(secs).unwrap_or("–".into()),
                    pct(h.wall_rel_error),
                    mb(h.peak_rss),
                    h.predicted_peak_rss.map(mb).unwrap_or("–".into()),
                    pct(h.rss_rel_error),
                ]
            })
            .collect();
        o.push_str(
            "<p>Leave one size out (each row predicted by the model fitted without its size):</p>",
        );
        table(
            &mut o,
            Some(&format!("held-out-{}", fm.format)),
            &[
                "held-out recipients",
                "workers",
                "wall measured",
                "wall predicted",
                "error",
                "RSS measured",
                "RSS predicted",
                "error",
            ],
            &rows,
        );
    }

    // Projection.
    o.push_str("<h2>Projection</h2><p>N recipients on K cores (send with <code>--workers K</code>), from the model above. Highlighted rows extrapolate beyond the measured sizes or worker counts.</p>");
    let mut rows = Vec::new();
    for fm in &r.models {
        for p in &fm.projection {
            rows.push(vec![
                fm.format.clone(),
                si(p.recipients as f64),
                p.cores.to_string(),
                secs(p.wall_secs),
                si(p.rows_per_sec),
                mb(p.peak_rss),
                if p.extrapolated {
                    format!("extrapolated ({})", p.beyond.join(", "))
                } else {
                    "within measurements".into()
                },
            ]);
        }
    }
    table(
        &mut o,
        Some("projection"),
        &[
            "format",
            "recipients",
            "cores",
            "expected wall",
            "recipients/s",
            "expected peak RSS",
            "range",
        ],
        &rows,
    );
    o.push_str("</body></html>\n");
    (o, charts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(2000.0), "2k");
        assert_eq!(si(100_000_000.0), "100M");
        assert_eq!(nice_ticks(9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn charts_escape_their_text_and_survive_no_data() {
        let svg = line_chart(&LineChart {
            title: "a <b>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "s&t".into(),
                points: vec![(1.0, 2.0), (100.0, 3.0)],
                dashed: false,
            }],
            y_fmt: si,
        });
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("s&amp;t"));
        assert!(svg.contains("log scale"));
        let empty = line_chart(&LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![],
            y_fmt: si,
        });
        assert!(empty.contains("no data"));
    }
}
