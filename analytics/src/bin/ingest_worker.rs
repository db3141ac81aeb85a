//! A Kafka ingest process for the end-to-end tests (which SIGKILL it at random points)
//! and for trying the ingest by hand; the `broadside ingest` subcommand is the real CLI.
//!
//! ```text
//! cargo run -p broadside-analytics --bin ingest_worker -- \
//!     --brokers 127.0.0.1:9092 --group g --topic events --store /tmp/store
//! ```
//!
//! Prints `ASSIGN <topic> <partition> <resume offset>` on every partition assignment,
//! `COMMIT <start> <end> <rows> <dead_letters> <stream>` after every commit and
//! `DONE <records> <rows> <dead_letters> <gaps recorded>` on a clean exit. SIGINT/SIGTERM stop it cleanly
//! (everything buffered is committed first).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use broadside_analytics::{run_kafka_ingest, IngestHooks, KafkaIngestConfig, OnGap};

static STOP: AtomicBool = AtomicBool::new(false);

fn parse_args() -> Result<KafkaIngestConfig, String> {
    let mut cfg = KafkaIngestConfig::new("", "", &[], "");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--brokers" => cfg.brokers = value,
            "--group" => cfg.group_id = value,
            "--topic" => cfg.topics.push(value),
            "--store" => cfg.store = value.into(),
            "--max-records" => cfg.flush.max_records = num(&value)? as usize,
            "--max-latency-ms" => cfg.flush.max_latency_ms = num(&value)?,
            "--idle-ms" => cfg.flush.idle_ms = num(&value)?,
            "--exit-when-idle-ms" => cfg.exit_when_idle_ms = Some(num(&value)?),
            "--on-gap" => {
                cfg.on_gap = match value.as_str() {
                    "stop" => OnGap::Stop,
                    "record" => OnGap::Record,
                    v => return Err(format!("--on-gap {v}: expected stop or record")),
                }
            }
            "-X" => {
                let (k, v) = value.split_once('=').ok_or("-X takes key=value")?;
                cfg.kafka_options.insert(k.into(), v.into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ingest_worker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = broadside_analytics::stop::set_on_stop_signal(&STOP) {
        eprintln!("ingest_worker: cannot install the SIGINT/SIGTERM handlers: {e}");
        return ExitCode::FAILURE;
    }
    let hooks = IngestHooks {
        on_commit: Some(Box::new(|c| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "COMMIT {} {} {} {} {}",
                c.start, c.end, c.rows, c.dead_letters, c.stream
            );
            let _ = out.flush();
        })),
        on_assign: Some(Box::new(|topic, partition, next| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ASSIGN {topic} {partition} {next}");
            let _ = out.flush();
        })),
        ..Default::default()
    };
    match run_kafka_ingest(&cfg, hooks, &STOP) {
        Ok(stats) => {
            println!(
                "DONE {} {} {} {}",
                stats.records, stats.rows, stats.dead_letters, stats.gaps
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ingest_worker: {e}");
            ExitCode::FAILURE
        }
    }
}
