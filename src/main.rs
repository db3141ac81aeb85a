//! The `broadside` command line: sends, synthetic data, explanations and benchmarks.

mod analytics_cmd;
mod bench;
mod campaign_cmd;
mod erp_cmd;
mod events_cmd;
mod generate;
mod mail;
mod metrics;
mod progress;
mod send;
mod ui;
mod why;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "broadside",
    version,
    about = "Very large campaign sends and their analytics"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run (or resume) a send described by a campaign spec.
    Send {
        /// The campaign spec (TOML, see docs/campaign-spec.md).
        spec: PathBuf,
        /// Resume this run (or give a new run its id). Running a finished run again does nothing.
        #[arg(long)]
        run_id: Option<String>,
        /// Decide every recipient and print the counts, but write and deliver nothing.
        #[arg(long)]
        dry_run: bool,
        /// Worker threads for the decision stages (default: all cores).
        #[arg(long)]
        workers: Option<usize>,
        /// Never draw the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Read only shard I of N (0-based) of an ERP source; see docs/erp.md.
        #[arg(long, value_parser = broadside_pipeline::spec::Shard::parse)]
        shard: Option<broadside_pipeline::spec::Shard>,
        /// Send only to this audience: a JSON file holding an audience object
        /// (`{"type": "inline", "conditions": [...]}`) or its conditions array; see
        /// docs/campaigns.md.
        #[arg(long, value_name = "FILE.json")]
        audience: Option<PathBuf>,
        /// Fields conditions may use besides the member defaults (JSON, see docs/campaigns.md).
        #[arg(long, value_name = "FILE.json", requires = "audience")]
        audience_fields: Option<PathBuf>,
        /// The campaign already has runs: start a new one that sends to everyone again (with
        /// `--run-id R`, named R; R must not exist yet).
        #[arg(long, conflicts_with = "exclude_sent")]
        new_run: bool,
        /// The campaign already has runs: start a new one that skips (`already_sent`) every
        /// key an earlier run of the campaign sent.
        #[arg(long)]
        exclude_sent: bool,
        /// Serve Prometheus metrics (`GET /metrics`: rows per decision, stage times, rows/s,
        /// ETA) on this address while the send runs; see docs/metrics.md.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// The ERP (SQL Server) source.
    Erp {
        #[command(subcommand)]
        command: erp_cmd::ErpCommand,
    },
    /// Write deterministic synthetic recipients, suppression lists and a campaign spec.
    Generate(generate::GenerateOptions),
    /// Explain why a recipient got its decision in a run (`why RUN KEY`), or list every
    /// decision and event of a recipient in a workspace, newest first (`why KEY`).
    Why {
        /// `RUN KEY`, or `KEY` alone. The key is an email, or an account number for mail
        /// campaigns.
        #[arg(value_name = "RUN KEY", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Workspace of the recipient for `why KEY` (default: the spec's, else the store's
        /// only workspace).
        #[arg(long)]
        workspace: Option<String>,
        /// Store root of the run (default: the store of --spec, else ./store).
        #[arg(long, value_parser = broadside_pipeline::store::store_arg)]
        store: Option<PathBuf>,
        /// Take the store root from this campaign spec.
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Ingest events into the store, exactly once: from Kafka, or from an NDJSON file.
    Ingest(events_cmd::IngestOptions),
    /// Suppression lists from the event store.
    Suppression {
        #[command(subcommand)]
        command: SuppressionCommand,
    },
    /// Serve the analytics API (statistics, time series, events, bounces, runs, logs, SQL)
    /// and/or the webhook intake.
    Serve(events_cmd::ServeOptions),
    /// Read-only SQL over the store (one statement, or a prompt reading stdin).
    Sql(analytics_cmd::SqlOptions),
    /// Bring the hourly rollups up to date with the event store.
    Rollup {
        /// Store root.
        #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
        store: PathBuf,
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Historical bounces (the email system's bounce history).
    Bounces {
        #[command(subcommand)]
        command: BouncesCommand,
    },
    /// Capacity benchmark: sends per size, workers and format, event ingest and API queries,
    /// with a JSON + HTML report and a fitted projection (see `broadside bench --help`).
    Bench(bench::BenchOptions),
    /// Campaigns and their sendings in a campaign store (ops twins of the `/campaign` API).
    Campaign(campaign_cmd::CampaignOptions),
}

#[derive(Subcommand)]
enum SuppressionCommand {
    /// Turn hard bounces, complaints, unsubscribes and repeated soft bounces (events, imported
    /// historical bounces and bounce CSVs) into the suppression lists a send uses, with a
    /// snapshot record.
    Build {
        /// Store root.
        #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
        store: PathBuf,
        /// Workspace whose events are scanned.
        #[arg(long)]
        workspace: String,
        /// Output folder for the lists and snapshot.json.
        #[arg(long)]
        out: PathBuf,
        /// Historical bounce export (CSV with an `email` column; repeatable).
        #[arg(long = "bounces")]
        bounces: Vec<PathBuf>,
    },
    /// The workspace's organisation blocklist in the store, which every send's store
    /// suppression snapshot reads (reason `blocklisted`).
    Blocklist {
        #[command(subcommand)]
        command: BlocklistCommand,
    },
}

#[derive(Subcommand)]
enum BlocklistCommand {
    /// Put a CSV (header with an `email` column) on the blocklist, replacing the file of the
    /// same name; a bad row refuses the whole file.
    Import {
        /// The CSV.
        file: PathBuf,
        /// Store root.
        #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
        store: PathBuf,
        /// Workspace.
        #[arg(long)]
        workspace: String,
        /// Name of the list on the blocklist (default: the file's name without extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// Take a named file off the blocklist.
    Remove {
        /// Its name.
        name: String,
        /// Store root.
        #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
        store: PathBuf,
        /// Workspace.
        #[arg(long)]
        workspace: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token and the token-file entry (its SHA-256) for `serve --tokens`,
    /// or with --webhook a webhook secret and its entry for `serve --webhook-tokens`.
    New {
        /// A name for the token (shown in logs).
        #[arg(long)]
        name: String,
        /// A workspace the token may read (repeatable); with --webhook, the one workspace the
        /// secret writes into.
        #[arg(long = "workspace")]
        workspaces: Vec<String>,
        /// A webhook credential (`[[webhooks]]` entry) instead of an API token.
        #[arg(long)]
        webhook: bool,
    },
}

#[derive(Subcommand)]
enum BouncesCommand {
    /// Import historical bounce CSV exports (files or folders) into the store.
    Import {
        /// CSV files or folders of CSV files.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Store root.
        #[arg(long, default_value = "store", value_parser = broadside_pipeline::store::store_arg)]
        store: PathBuf,
        /// Workspace the bounces belong to.
        #[arg(long)]
        workspace: String,
        /// Only rows bounced at or after (YYYY-MM-DD or RFC 3339).
        #[arg(long, conflicts_with = "full")]
        since: Option<String>,
        /// Replace every earlier import of the workspace.
        #[arg(long)]
        full: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BROADSIDE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Send {
            spec,
            run_id,
            dry_run,
            workers,
            no_progress,
            shard,
            audience,
            audience_fields,
            new_run,
            exclude_sent,
            metrics_listen,
        } => {
            if let Some(addr) = &metrics_listen {
                metrics::listen(addr)?;
            }
            let audience = audience
                .map(|p| campaign_cmd::audience_file(&p))
                .transpose()?;
            let audience_fields = match &audience_fields {
                Some(p) => Some(broadside_campaigns::send_audience::allowed_fields(Some(p))?),
                None => None,
            };
            send::send(&send::SendOptions {
                spec,
                run_id,
                dry_run,
                workers,
                progress: !no_progress && std::io::stderr().is_terminal(),
                shard,
                audience,
                audience_fields,
                repeat: match (new_run, exclude_sent) {
                    (true, _) => send::Repeat::NewRun,
                    (_, true) => send::Repeat::ExcludeSent,
                    _ => send::Repeat::Refuse,
                },
            })?;
        }
        Command::Erp { command } => erp_cmd::run(command)?,
        Command::Generate(o) => {
            let spec = generate::generate(&o)?;
            println!("next: broadside send {}", spec.display());
        }
        Command::Why {
            args,
            workspace,
            store,
            spec,
        } => {
            let spec = spec
                .map(|p| broadside_pipeline::spec::CampaignSpec::load(&p))
                .transpose()?;
            let store = match (store, &spec) {
                (Some(s), _) => s,
                (None, Some(s)) => s.resolve(&s.output.store),
                (None, None) => PathBuf::from("store"),
            };
            match args.as_slice() {
                [run_id, key] => why::why(&store, run_id, key)?,
                [key] => {
                    let ws = workspace.or(spec.map(|s| s.workspace_id));
                    why::history(&store, ws.as_deref(), key)?
                }
                _ => unreachable!("clap takes one or two values"),
            }
        }
        Command::Ingest(o) => events_cmd::ingest(&o)?,
        Command::Suppression {
            command:
                SuppressionCommand::Build {
                    store,
                    workspace,
                    out,
                    bounces,
                },
        } => events_cmd::suppression_build(store, workspace, out, bounces)?,
        Command::Suppression {
            command: SuppressionCommand::Blocklist { command },
        } => match command {
            BlocklistCommand::Import {
                file,
                store,
                workspace,
                name,
            } => {
                let name = match name {
                    Some(n) => n,
                    None => file
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                };
                let n = broadside_analytics::suppression::import_blocklist(
                    &store, &workspace, &name, &file,
                )?;
                println!(
                    "blocklist {name} of workspace {workspace}: {n} addresses from {}",
                    file.display()
                );
            }
            BlocklistCommand::Remove {
                name,
                store,
                workspace,
            } => {
                if !broadside_analytics::suppression::remove_blocklist(&store, &workspace, &name)? {
                    anyhow::bail!("workspace {workspace} has no blocklist {name}");
                }
                println!("blocklist {name} of workspace {workspace} removed");
            }
        },
        Command::Serve(o) => events_cmd::serve(&o)?,
        Command::Sql(o) => analytics_cmd::sql(&o)?,
        Command::Rollup { store, workspace } => analytics_cmd::rollup(store, workspace)?,
        Command::Token {
            command:
                TokenCommand::New {
                    name,
                    workspaces,
                    webhook,
                },
        } => analytics_cmd::token_new(name, workspaces, webhook)?,
        Command::Bounces {
            command:
                BouncesCommand::Import {
                    sources,
                    store,
                    workspace,
                    since,
                    full,
                },
        } => analytics_cmd::bounces_import(store, workspace, sources, since, full)?,
        Command::Bench(o) => {
            bench::bench(&o)?;
        }
        Command::Campaign(o) => campaign_cmd::run(o)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
