//! `broadside sql`, `broadside rollup`, `broadside token new` and `broadside bounces import`:
//! the analyst side, wired to `broadside_analytics`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use broadside_analytics::api::token_hash;
use broadside_analytics::historical::{self, parse_time, ImportRequest};
use broadside_analytics::query::sql::{run_sql, write_batches, Batches, Format, Truncation};
use broadside_analytics::query::{Catalog, Limits, Scope};

/// Per-query limits (shared by `sql` and `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitOptions {
    /// Memory one query may use for sorts, joins, aggregates and its answer's own buffers (MiB).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub query_memory_mb: u64,
    /// Seconds after which a query is cancelled.
    #[arg(long, default_value_t = 60)]
    pub query_timeout_secs: u64,
    /// Most rows an analyst SQL answer holds; the query stops there and the answer says it was
    /// truncated.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sql_max_rows: u64,
    /// Most MiB an analyst SQL answer holds (JSON rows for `serve`, Arrow data for `sql`); the
    /// query stops there and the answer says it was truncated.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub sql_max_mb: u64,
}

impl LimitOptions {
    /// As catalog limits.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: (self.query_memory_mb as usize) << 20,
            timeout: Duration::from_secs(self.query_timeout_secs),
            max_rows: self.sql_max_rows as usize,
            max_bytes: (self.sql_max_mb as usize) << 20,
            ..Limits::default()
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

/// Options of `broadside sql`.
#[derive(Debug, Clone, clap::Args)]
pub struct SqlOptions {
    /// One statement to run; without it, statements are read from stdin (an interactive prompt
    /// on a terminal, ending each statement with `;`).
    pub sql: Option<String>,
    /// Store root.
    #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
    pub store: PathBuf,
    /// Only this workspace's rows (tables then have no workspace_id column). Default: every
    /// workspace, with a workspace_id column.
    #[arg(long)]
    pub workspace: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Write the result to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitOptions,
}

/// Runs `broadside sql`.
pub fn sql(o: &SqlOptions) -> Result<()> {
    let format = match o.format {
        OutputFormat::Table => Format::Table,
        OutputFormat::Csv => Format::Csv,
        OutputFormat::Json => Format::Json,
        OutputFormat::Parquet => Format::Parquet,
    };
    if format == Format::Parquet && o.output.is_none() {
        bail!("--format parquet needs --output FILE");
    }
    let scope = match &o.workspace {
        Some(w) => Scope::workspace(w)?,
        None => Scope::All,
    };
    if !o.store.is_dir() {
        bail!("store {} does not exist (--store DIR)", o.store.display());
    }
    let catalog = Catalog::new(&o.store).with_limits(o.limits.limits());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the query runtime")?;
    let run_one = |text: &str| -> Result<()> {
        let started = Instant::now();
        let mut sink = Batches::default();
        let answer = rt.block_on(run_sql(&catalog, &scope, text, &mut sink))?;
        let batches = sink.batches;
        let rows = answer.rows;
        match &o.output {
            Some(path) => {
                let tmp = path.with_extension("tmp");
                let f = std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                write_batches(&batches, format, std::io::BufWriter::new(f))?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("{rows} rows written to {}", path.display());
            }
            None => write_batches(&batches, format, std::io::stdout())?,
        }
        // Said whether or not stderr is a terminal: a cut result must not pass for a whole one.
        match answer.truncated {
            Some(Truncation::RowLimit) => eprintln!(
                "truncated: the first {rows} rows (the row limit, --sql-max-rows {})",
                o.limits.sql_max_rows
            ),
            Some(Truncation::ByteLimit) => eprintln!(
                "truncated: {rows} rows (the byte limit, --sql-max-mb {})",
                o.limits.sql_max_mb
            ),
            None => {}
        }
        if std::io::stderr().is_terminal() {
            eprintln!("{rows} rows in {:.3} s", started.elapsed().as_secs_f64());
        }
        drop(answer);
        Ok(())
    };
    if let Some(text) = &o.sql {
        return run_one(text);
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("broadside sql on {} — end statements with ';', \\q to quit; tables: events, bounce_events, recipient_logs, campaign_runs, historical_bounces, rollup_hourly, rollup_uniques, rollup_hourly_monthly, rollup_uniques_monthly, ingest_gaps", o.store.display());
    }
    let mut pending = String::new();
    let mut failed = false;
    let prompt = |pending: &str| {
        if interactive {
            eprint!("{}", if pending.is_empty() { "sql> " } else { "...> " });
            let _ = std::io::stderr().flush();
        }
    };
    prompt(&pending);
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        if pending.is_empty() && matches!(line.trim(), "\\q" | "exit" | "quit") {
            break;
        }
        pending.push_str(&line);
        pending.push('\n');
        if line.trim_end().ends_with(';') {
            let text = std::mem::take(&mut pending);
            if let Err(e) = run_one(text.trim().trim_end_matches(';')) {
                if !interactive {
                    return Err(e);
                }
                eprintln!("error: {e:#}");
                failed = true;
            }
        }
        prompt(&pending);
    }
    if !pending.trim().is_empty() {
        run_one(pending.trim())?;
    }
    if failed && !interactive {
        bail!("a statement failed");
    }
    Ok(())
}

/// Runs `broadside rollup`.
pub fn rollup(store: PathBuf, workspace: Option<String>) -> Result<()> {
    let catalog = Catalog::new(&store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the query runtime")?;
    let started = Instant::now();
    let r = rt.block_on(broadside_analytics::rollup::refresh(
        &catalog,
        workspace.as_deref(),
    ))?;
    println!(
        "rollups: {} partitions built, {} already current, {} changed while rolling up (retry later); {} closed months compacted, {} already current; in {:.2} s",
        r.built,
        r.current,
        r.raced,
        r.months_built,
        r.months_current,
        started.elapsed().as_secs_f64()
    );
    let i = r.recipients;
    println!(
        "recipient index: {} days and {} runs indexed, {} days and {} runs already current, {} closed months of runs merged, {} already current, {} changed while indexing (retry later); in {:.2} s of the above",
        i.days_built,
        i.runs_built,
        i.days_current,
        i.runs_current,
        i.months_built,
        i.months_current,
        i.raced,
        i.secs
    );
    Ok(())
}

/// Runs `broadside token new`: a random token and the token-file entry holding its hash; with
/// `webhook`, a webhook secret bound to one workspace and its `[[webhooks]]` entry.
pub fn token_new(name: String, workspaces: Vec<String>, webhook: bool) -> Result<()> {
    if workspaces.is_empty() {
        bail!("give at least one --workspace");
    }
    if webhook && workspaces.len() != 1 {
        bail!("a webhook secret writes into exactly one workspace: give one --workspace");
    }
    for w in &workspaces {
        Scope::workspace(w).with_context(|| format!("--workspace {w:?}"))?;
    }
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    let random: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if webhook {
        let secret = format!("bswh_{random}");
        let entry = broadside_analytics::webhook::WebhookCredential::from_secret(
            &name,
            &secret,
            &workspaces[0],
        )?;
        eprintln!("webhook secret (give it to the sender; it is not stored): {secret}");
        eprintln!(
            "signing key for Broadside-Signature (HMAC-SHA256; the sha256 below): {}",
            entry.signing_key()
        );
        println!("[[webhooks]]");
        println!("name = {name:?}");
        println!("workspace = {:?}", entry.workspace);
        println!("sha256 = \"{}\"", entry.sha256);
        return Ok(());
    }
    let token = format!("bs_{random}");
    eprintln!("token (give it to the caller; it is not stored): {token}");
    println!("[[tokens]]");
    println!("name = {name:?}");
    println!("sha256 = \"{}\"", token_hash(&token));
    println!(
        "workspaces = [{}]",
        workspaces
            .iter()
            .map(|w| format!("{w:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Runs `broadside bounces import`.
pub fn bounces_import(
    store: PathBuf,
    workspace: String,
    sources: Vec<PathBuf>,
    since: Option<String>,
    full: bool,
) -> Result<()> {
    let since = since
        .map(|s| {
            parse_time(&s)
                .with_context(|| format!("--since {s:?}: expected YYYY-MM-DD or RFC 3339"))
        })
        .transpose()?;
    let mut files = Vec::new();
    for s in &sources {
        files.extend(historical::source_files(s)?);
    }
    if files.is_empty() {
        bail!("no CSV files in {sources:?}");
    }
    let r = historical::import(
        &store,
        &ImportRequest {
            workspace_id: workspace,
            files,
            since,
            full_backfill: full,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
