//! Ingest throughput next to the raw consume rate of the same client on the same broker.
//!
//! ```text
//! cargo run --release -p broadside-analytics --example ingest_bench [-- EVENTS]
//! ```
//!
//! Starts `noida-db` (or uses `BROADSIDE_KAFKA_BROKERS`), produces EVENTS (default
//! 1,000,000) JSON events over 4 partitions, then runs, each in its own process so peak
//! RSS is its own: a raw consumer (polls and counts, decodes and writes nothing), the
//! ingest (decode, Arrow, zstd Parquet, exactly-once commits), and the raw consumer again,
//! all from offset 0 and each timed from its partition assignment.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use broadside_analytics::{run_kafka_ingest, IngestHooks, KafkaIngestConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

const TOPIC: &str = "bench-events";

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Notes when the raw consumer gets its partitions, so it is timed from the same moment as the
/// ingest (its first assignment): timing from the first message instead would start after
/// librdkafka had already prefetched a queue of them, and measure draining that queue.
struct AssignClock(Arc<std::sync::OnceLock<Instant>>);

impl rdkafka::client::ClientContext for AssignClock {}

impl rdkafka::consumer::ConsumerContext for AssignClock {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if matches!(rebalance, rdkafka::consumer::Rebalance::Assign(_)) {
            let _ = self.0.set(Instant::now());
        }
    }
}

fn raw(brokers: &str, n: u64) -> Result<()> {
    let assigned = Arc::new(std::sync::OnceLock::new());
    let c: BaseConsumer<AssignClock> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create_with_context(AssignClock(Arc::clone(&assigned)))?;
    c.subscribe(&[TOPIC])?;
    let mut got = 0u64;
    let mut bytes = 0u64;
    while got < n {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            got += 1;
            bytes += m.payload_len() as u64;
        }
    }
    let secs = assigned
        .get()
        .map(|s| s.elapsed().as_secs_f64())
        .context("records arrived without an assignment")?;
    println!("RESULT raw {got} {secs:.3} {:.1} {bytes}", peak_rss_mib());
    Ok(())
}

fn ingest(brokers: &str, n: u64, store: &str) -> Result<()> {
    let mut cfg = KafkaIngestConfig::new(
        brokers,
        &format!("ingest-{}", std::process::id()),
        &[TOPIC],
        store,
    );
    cfg.flush.max_records = 100_000;
    cfg.flush.idle_ms = 200;
    // Timed from the first assignment to the last commit: group joining is not ingest work.
    let assigned = Arc::new(std::sync::OnceLock::<Instant>::new());
    let done = Arc::new(std::sync::OnceLock::<Instant>::new());
    let (a2, d2) = (Arc::clone(&assigned), Arc::clone(&done));
    let records = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (Arc::clone(&records), Arc::clone(&stop));
    let hooks = IngestHooks {
        on_commit: Some(Box::new(move |c| {
            let total = r2.fetch_add((c.end - c.start + 1) as u64, Ordering::SeqCst)
                + (c.end - c.start + 1) as u64;
            if total >= n {
                let _ = d2.set(Instant::now());
                s2.store(true, Ordering::SeqCst);
            }
        })),
        on_assign: Some(Box::new(move |_, _, _| {
            let _ = a2.set(Instant::now());
        })),
    };
    let stats = run_kafka_ingest(&cfg, hooks, &stop)?;
    let secs = match (assigned.get(), done.get()) {
        (Some(a), Some(d)) => d.duration_since(*a).as_secs_f64(),
        _ => bail!("ingest ended before committing {n} records"),
    };
    println!(
        "RESULT ingest {} {secs:.3} {:.1} {}",
        stats.records,
        peak_rss_mib(),
        stats.files
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("raw") => return raw(&args[2], args[3].parse()?),
        Some("ingest") => return ingest(&args[2], args[3].parse()?, &args[4]),
        _ => {}
    }
    let n: u64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let mut noida = None;
    let brokers = match std::env::var("BROADSIDE_KAFKA_BROKERS") {
        Ok(b) => b,
        Err(_) => {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = Command::new("noida-db")
                .args([
                    "start",
                    "--only",
                    "kafka",
                    "--kafka-port",
                    &port.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--data-dir",
                ])
                .arg(dir.path().join("noida"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("noida-db not on PATH (bash analytics/ci-setup.sh)")?;
            noida = Some(NoidaGuard(child));
            let addr = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(60);
            while TcpStream::connect(&addr).is_err() {
                if Instant::now() > deadline {
                    bail!("broker did not start");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            addr
        }
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(admin.create_topics(
        &[NewTopic::new(TOPIC, 4, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;

    let t = Instant::now();
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let types = ["delivered", "opened", "clicked", "bounced", "unsubscribed"];
    let mut payload = Vec::with_capacity(512);
    for i in 0..n {
        payload.clear();
        write!(
            payload,
            r#"{{"event_id":"ev-{i:010}","workspace_id":"ws{}","campaign_id":"camp-{}","variant":"A","run_id":"run-1","email":"user{i}@example.com","event_type":"{}","url":null,"ts":"2026-03-0{}T12:{:02}:00Z"}}"#,
            i % 4,
            i % 50,
            types[(i % 5) as usize],
            1 + i % 3,
            i % 60
        )?;
        let mut rec = BaseRecord::<(), [u8]>::to(TOPIC)
            .partition((i % 4) as i32)
            .payload(&payload[..]);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(5));
                    rec = r;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    eprintln!("produced {n} events in {:.1}s", t.elapsed().as_secs_f64());

    let exe = std::env::current_exe()?;
    let run = |args: &[&str]| -> Result<Vec<String>> {
        let out = Command::new(&exe)
            .args(args)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("{args:?} failed");
        }
        let text = String::from_utf8(out.stdout)?;
        Ok(text
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .context("no RESULT")?
            .split(' ')
            .map(String::from)
            .collect())
    };
    let ns = n.to_string();
    let store = dir.path().join("store");
    // Raw, ingest, raw again: the broker is busiest right after the produce (noida-db saves
    // its log then), so the first consumer is often slowed by it; the raw figure used is the
    // faster of the two raw runs.
    let raw1 = run(&["raw", &brokers, &ns])?;
    let ing = run(&["ingest", &brokers, &ns, store.to_str().unwrap()])?;
    let raw2 = run(&["raw", &brokers, &ns])?;
    let rate = |r: &[String]| -> Result<f64> { Ok(n as f64 / r[3].parse::<f64>()?) };
    let (raw1_rate, raw2_rate, ing_rate) = (rate(&raw1)?, rate(&raw2)?, rate(&ing)?);
    let raw_rate = raw1_rate.max(raw2_rate);
    println!("events:            {n}");
    println!(
        "raw consume:       {raw_rate:>12.0} events/s  (runs before and after the ingest: {raw1_rate:.0} and {raw2_rate:.0}; peak RSS {} and {} MiB)",
        raw1[4], raw2[4]
    );
    println!(
        "ingest to Parquet: {ing_rate:>12.0} events/s  (peak RSS {} MiB, {} files)",
        ing[4], ing[5]
    );
    println!("ingest / raw:      {:>11.1}%", 100.0 * ing_rate / raw_rate);
    drop(noida);
    Ok(())
}

/// Stops the broker (SIGINT, its clean stop) also when the benchmark fails.
struct NoidaGuard(std::process::Child);

impl Drop for NoidaGuard {
    fn drop(&mut self) {
        unsafe { libc_kill(self.0.id() as i32) };
        let _ = self.0.wait();
    }
}

/// SIGINT without a libc dependency in the example's own imports.
unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 2);
}
