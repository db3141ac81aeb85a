//! `broadside bench`: the end-to-end capacity benchmark. For each size it generates (or reuses)
//! a data set, runs `broadside send` on it in a child process and reports rows/s per stage and
//! the child's peak RSS, so memory can be compared as the campaign grows.

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
    /// Keep each run's outputs.
    #[arg(long)]
    pub keep: bool,
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
    /// The run record the child wrote.
    pub record: RunRecord,
}

/// Runs a child and returns (exit ok, peak RSS bytes) via wait4.
fn run_measured(cmd: &mut Command) -> Result<(bool, u64)> {
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
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, usage.ru_maxrss as u64 * 1024))
}

fn dataset(o: &BenchOptions, rows: u64) -> Result<PathBuf> {
    let dir = o.dir.join(format!(
        "r{rows}-s{}-{}",
        o.suppressions,
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
        clean_outputs(&dir);
        let run_id = format!("bench-{rows}");
        let started = std::time::Instant::now();
        let (ok, peak_rss) = run_measured(
            Command::new(&exe)
                .arg("send")
                .arg(&spec)
                .arg("--run-id")
                .arg(&run_id)
                .arg("--no-progress")
                .stdout(std::process::Stdio::null()),
        )?;
        let wall_secs = started.elapsed().as_secs_f64();
        if !ok {
            bail!("broadside send failed on {}", spec.display());
        }
        let record = RunRecord::load(&crate::send::record_path(&spec, &run_id)?)?;
        if !o.keep {
            clean_outputs(&dir);
        }
        println!(
            "{rows} recipients, {} suppressions: {:.2}s wall, {:.2} M rows/s end to end, peak RSS {:.0} MB, index {:.3}s",
            o.suppressions,
            wall_secs,
            rows as f64 / wall_secs / 1e6,
            peak_rss as f64 / 1e6,
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
            peak_rss,
            record,
        });
    }
    println!("\n| recipients | wall s | M rows/s | peak RSS MB | index build s |");
    println!("|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.3} |",
            r.rows,
            r.wall_secs,
            r.rows as f64 / r.wall_secs / 1e6,
            r.peak_rss as f64 / 1e6,
            r.record.suppression_build_secs
        );
    }
    Ok(results)
}
