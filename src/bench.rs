//! `broadside bench`: the end-to-end capacity benchmark. For each size it generates (or reuses)
//! a data set, runs `broadside send` on it in a child process and reports rows/s per stage,
//! the child's CPU time per recipient and its peak RSS, so memory can be compared as the
//! campaign grows. `--repeat` runs each size several times and summarises by the median, as
//! single runs on a shared machine vary by ±10 %.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use broadside_pipeline::run::RunRecord;

use crate::generate::{generate, GenerateOptions};

/// Options of `broadside bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Campaign sizes, comma separated.
    #[arg(long = "rows", value_delimiter = ',', default_value = "1000000")]
    pub sizes: Vec<u64>,
    /// Suppression entries.
    #[arg(long, default_value_t = 200_000)]
    pub suppressions: u64,
    /// Where generated data sets are kept and reused.
    #[arg(long, default_value = "target/bench-data")]
    pub dir: PathBuf,
    /// Use Parquet input instead of CSV.
    #[arg(long)]
    pub parquet: bool,
    /// Keep each run's outputs (of the last run of each size).
    #[arg(long)]
    pub keep: bool,
    /// Share of rows repeating an earlier row's person (skipped as `duplicate`).
    #[arg(long, default_value_t = 0.005)]
    pub duplicate_share: f64,
    /// Runs per size; the summary gives the median and the best.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// Input rows.
    pub rows: u64,
    /// Wall seconds of the child process.
    pub wall_secs: f64,
    /// Peak resident set of the child, bytes.
    pub peak_rss: u64,
    /// User + system CPU seconds of the child.
    pub cpu_secs: f64,
    /// The run record the child wrote.
    pub record: RunRecord,
}

/// What the kernel reports about a finished child.
struct ChildUsage {
    ok: bool,
    peak_rss: u64,
    cpu_secs: f64,
}

/// Runs a child and returns its exit status, peak RSS and CPU time via wait4.
fn run_measured(cmd: &mut Command) -> Result<ChildUsage> {
    let child = cmd.spawn().context("starting broadside send")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; pid is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(ChildUsage {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        peak_rss: usage.ru_maxrss as u64 * 1024,
        cpu_secs: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

fn dataset(o: &BenchOptions, rows: u64) -> Result<PathBuf> {
    let dir = o.dir.join(format!(
        "r{rows}-s{}-d{}-{}",
        o.suppressions,
        o.duplicate_share,
        if o.parquet { "parquet" } else { "csv" }
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
            parquet: o.parquet,
        })?;
    }
    Ok(spec)
}

fn clean_outputs(dir: &Path) {
    for d in ["store", "megasys"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
}

/// Runs the benchmark and prints a report.
pub fn bench(o: &BenchOptions) -> Result<Vec<BenchResult>> {
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for &rows in &o.sizes {
        let spec = dataset(o, rows)?;
        let dir = spec.parent().expect("spec in a folder").to_path_buf();
        let run_id = format!("bench-{rows}");
        for attempt in 1..=o.repeat {
            clean_outputs(&dir);
            let started = std::time::Instant::now();
            let usage = run_measured(
                Command::new(&exe)
                    .arg("send")
                    .arg(&spec)
                    .arg("--run-id")
                    .arg(&run_id)
                    .arg("--no-progress")
                    .stdout(std::process::Stdio::null()),
            )?;
            let wall_secs = started.elapsed().as_secs_f64();
            if !usage.ok {
                bail!("broadside send failed on {}", spec.display());
            }
            let record = RunRecord::load(&crate::send::record_path(&spec, &run_id)?)?;
            if !o.keep {
                clean_outputs(&dir);
            }
            println!(
                "{rows} recipients, {} suppressions (run {attempt}/{}): {wall_secs:.2}s wall, {:.2} M rows/s end to end, \
                 CPU {:.2}s ({:.2} µs/recipient), peak RSS {:.0} MB, index {:.3}s",
                o.suppressions,
                o.repeat,
                rows as f64 / wall_secs / 1e6,
                usage.cpu_secs,
                usage.cpu_secs / rows as f64 * 1e6,
                usage.peak_rss as f64 / 1e6,
                record.suppression_build_secs
            );
            for s in &record.stages {
                println!(
                    "    {:<12} {:>8.2} M rows/s busy  busy {:>7.2}s  blocked {:>7.2}s",
                    s.name,
                    s.rows_per_sec / 1e6,
                    s.busy_secs,
                    s.blocked_secs
                );
            }
            results.push(BenchResult {
                rows,
                wall_secs,
                peak_rss: usage.peak_rss,
                cpu_secs: usage.cpu_secs,
                record,
            });
        }
    }
    println!("\n| recipients | runs | wall s (median, best) | M rows/s (median) | CPU µs/recipient (median) | peak RSS MB (max) | index build s (median) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &rows in &o.sizes {
        let runs: Vec<&BenchResult> = results.iter().filter(|r| r.rows == rows).collect();
        let wall = median(runs.iter().map(|r| r.wall_secs));
        let best = runs
            .iter()
            .map(|r| r.wall_secs)
            .fold(f64::INFINITY, f64::min);
        println!(
            "| {rows} | {} | {wall:.2}, {best:.2} | {:.2} | {:.2} | {:.0} | {:.3} |",
            runs.len(),
            rows as f64 / wall / 1e6,
            median(runs.iter().map(|r| r.cpu_secs)) / rows as f64 * 1e6,
            runs.iter().map(|r| r.peak_rss).max().unwrap_or(0) as f64 / 1e6,
            median(runs.iter().map(|r| r.record.suppression_build_secs)),
        );
    }
    Ok(results)
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

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }
}
