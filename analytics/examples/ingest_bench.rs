//! Ingest throughput next to the raw consume rate of the same client on the same broker.
//!
//! ```text
//! cargo run --release -p broadside-analytics --example ingest_bench [-- EVENTS]
//! ```
//!
//! Starts `noida-db` (or uses `BROADSIDE_KAFKA_BROKERS`), produces EVENTS (default 400,000:
//! noida-db answers `BadMessage` past about 420 000 records) JSON events over 4 partitions,
//! then runs, each in its own process so peak RSS is its own: a raw consumer (the same client
//! settings; polls and counts, decodes and writes nothing) and the ingest (decode, Arrow, zstd
//! Parquet, exactly-once commits), five times each, alternating, all from offset 0. Each is
//! timed from its partition assignment and from its first record to its last record (raw) or
//! last commit (ingest); the second excludes the fetch start-up, a tenth to a third of a
//! second here, which weighs heavily on runs this short.

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
const PARTITIONS: u64 = 4;
/// Raw and ingest runs per benchmark (each side's best is reported).
const ROUNDS: usize = 5;

/// CPU seconds (user + system, all threads and children) process `pid` has used; NaN if it
/// is gone or unknown.
fn cpu_secs(pid: Option<u32>) -> f64 {
    pid.and_then(cpu_ticks)
        .map_or(f64::NAN, |t| t as f64 / 100.0)
}

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Positions the raw consumer as the ingest positions itself: when the group assigns
/// partitions, at an explicit offset (0 here), so neither looks up a reset offset; and notes
/// the moment, so both are timed from their assignment. (Left to `auto.offset.reset`, the raw
/// consumer sometimes lost a second to the offset lookup, which halved its rate.)
struct AssignClock(Arc<std::sync::OnceLock<Instant>>);

impl rdkafka::client::ClientContext for AssignClock {}

impl rdkafka::consumer::ConsumerContext for AssignClock {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS as ASSIGN;
        if err == ASSIGN {
            let _ = self.0.set(Instant::now());
            let _ = tpl.set_all_offsets(rdkafka::Offset::Offset(0));
            let _ = consumer.assign(tpl);
        } else {
            let _ = consumer.unassign();
        }
    }
}

fn raw(brokers: &str, n: u64) -> Result<()> {
    let assigned = Arc::new(std::sync::OnceLock::new());
    let c: BaseConsumer<AssignClock> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("partition.assignment.strategy", "range,roundrobin")
        .set(
            "fetch.queue.backoff.ms",
            broadside_analytics::kafka::FETCH_QUEUE_BACKOFF_MS,
        )
        .create_with_context(AssignClock(Arc::clone(&assigned)))?;
    c.subscribe(&[TOPIC])?;
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut first = None;
    while got < n {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            first.get_or_insert_with(Instant::now);
            got += 1;
            bytes += m.payload_len() as u64;
        }
    }
    let secs = assigned
        .get()
        .map(|s| s.elapsed().as_secs_f64())
        .context("records arrived without an assignment")?;
    let streaming = first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    println!(
        "RESULT raw {got} {secs:.3} {:.1} {bytes} {streaming:.3} {:.2}",
        peak_rss_mib(),
        cpu_secs(Some(std::process::id()))
    );
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
    // Timed from the first assignment to the last commit (group joining is not ingest work),
    // and from the first record to the last commit.
    let assigned = Arc::new(std::sync::OnceLock::<Instant>::new());
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
    let done = Arc::new(std::sync::OnceLock::<Instant>::new());
    let (a2, f2, d2) = (Arc::clone(&assigned), Arc::clone(&first), Arc::clone(&done));
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
        on_first_record: Some(Box::new(move || {
            let _ = f2.set(Instant::now());
        })),
    };
    let stats = run_kafka_ingest(&cfg, hooks, &stop)?;
    let (secs, streaming) = match (assigned.get(), first.get(), done.get()) {
        (Some(a), Some(f), Some(d)) => (
            d.duration_since(*a).as_secs_f64(),
            d.duration_since(*f).as_secs_f64(),
        ),
        _ => bail!("ingest ended before committing {n} records"),
    };
    println!(
        "RESULT ingest {} {secs:.3} {:.1} {} {streaming:.3} {:.2}",
        stats.records,
        peak_rss_mib(),
        stats.files,
        cpu_secs(Some(std::process::id()))
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
        .unwrap_or(400_000);
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
        &[NewTopic::new(
            TOPIC,
            PARTITIONS as i32,
            TopicReplication::Fixed(1),
        )],
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
            .partition((i % PARTITIONS) as i32)
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
    // Raw and ingest alternate, each once the broker is quiet: noida-db saves its log for a
    // while after the produce and after being read, on the same two cores as the consumer.
    // Runs this short are noisy, so each side is run ROUNDS times and the best of each is
    // compared. The CPU each used (and the broker's CPU during it) shows what bounds them.
    let broker_pid = noida.as_ref().map(|g| g.0.id());
    let broker_secs = || cpu_secs(broker_pid);
    // RESULT fields: kind, records, seconds from assignment, peak RSS MiB, bytes or files,
    // seconds from the first record, CPU seconds.
    let rate =
        |r: &[String], field: usize| -> Result<f64> { Ok(n as f64 / r[field].parse::<f64>()?) };
    let micros_per_event = |secs: f64| secs * 1e6 / n as f64;
    let (mut raws, mut ingests) = (Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    for round in 0..ROUNDS {
        settle_broker(broker_pid);
        let b0 = broker_secs();
        let raw = run(&["raw", &brokers, &ns])?;
        let b1 = broker_secs();
        settle_broker(broker_pid);
        let store = dir.path().join(format!("store-{round}"));
        let b2 = broker_secs();
        let ing = run(&["ingest", &brokers, &ns, store.to_str().unwrap()])?;
        let b3 = broker_secs();
        cpu.push([
            micros_per_event(raw[7].parse()?),
            micros_per_event(b1 - b0),
            micros_per_event(ing[7].parse()?),
            micros_per_event(b3 - b2),
        ]);
        let (raw_a, raw_f, ing_a, ing_f) = (
            rate(&raw, 3)?,
            rate(&raw, 6)?,
            rate(&ing, 3)?,
            rate(&ing, 6)?,
        );
        eprintln!(
            "round {}: raw {raw_a:.0} events/s from assignment, {raw_f:.0} from the first record (peak RSS {} MiB); ingest {ing_a:.0} and {ing_f:.0} events/s (peak RSS {} MiB, {} files)",
            round + 1,
            raw[4],
            ing[4],
            ing[5]
        );
        let c = cpu[round];
        eprintln!(
            "         CPU per event: raw {:.2} µs (broker {:.2} µs), ingest {:.2} µs (broker {:.2} µs)",
            c[0], c[1], c[2], c[3]
        );
        raws.push((raw_a, raw_f));
        ingests.push((ing_a, ing_f, ing[4].parse::<f64>()?));
    }
    let best = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0, f64::max);
    let rss_max = best(&mut ingests.iter().map(|i| i.2));
    println!("events: {n}, best of {ROUNDS} runs each (events/s)");
    println!("                    from assignment   from first record");
    let (ra, rf) = (
        best(&mut raws.iter().map(|r| r.0)),
        best(&mut raws.iter().map(|r| r.1)),
    );
    let (ia, if_) = (
        best(&mut ingests.iter().map(|r| r.0)),
        best(&mut ingests.iter().map(|r| r.1)),
    );
    println!("raw consume        {ra:>16.0}   {rf:>17.0}");
    println!("ingest to Parquet  {ia:>16.0}   {if_:>17.0}   (peak RSS at most {rss_max} MiB)");
    println!(
        "ingest / raw       {:>15.1}%   {:>16.1}%",
        100.0 * ia / ra,
        100.0 * if_ / rf
    );
    let mean = |i: usize| cpu.iter().map(|c| c[i]).sum::<f64>() / cpu.len() as f64;
    println!(
        "CPU per event (mean; whole process, all threads): raw {:.2} µs + broker {:.2} µs, ingest {:.2} µs + broker {:.2} µs",
        mean(0),
        mean(1),
        mean(2),
        mean(3)
    );
    drop(noida);
    Ok(())
}

/// Every process with its parent and CPU ticks used so far (user + system, all threads).
fn processes() -> Vec<(u32, u32, u64)> {
    let mut procs = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return procs;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: ppid is the 2nd, utime and stime the
        // 12th and 13th.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        procs.push((pid, num(1) as u32, num(11) + num(12)));
    }
    procs
}

/// `root` and its descendants (`noida-db` on PATH is a launcher whose child is the broker).
fn process_tree(root: u32, procs: &[(u32, u32, u64)]) -> Vec<u32> {
    let mut tree = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid, _) in procs {
            if tree.contains(&ppid) && !tree.contains(&pid) {
                tree.push(pid);
                grew = true;
            }
        }
    }
    tree
}

/// CPU ticks used so far by a process and its descendants.
fn cpu_ticks(root: u32) -> Option<u64> {
    let procs = processes();
    let tree = process_tree(root, &procs);
    procs.iter().any(|p| p.0 == root).then(|| {
        procs
            .iter()
            .filter(|p| tree.contains(&p.0))
            .map(|p| p.2)
            .sum()
    })
}

/// Waits (up to three minutes) until a local broker has used under 5 % of a core for a second, so
/// a measured consumer does not share the machine with the broker's background saving.
fn settle_broker(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut quiet = 0;
    let Some(mut last) = cpu_ticks(pid) else {
        return;
    };
    while quiet < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let Some(now) = cpu_ticks(pid) else { return };
        // 100 ticks per second: 5 % of a core over 200 ms is one tick.
        quiet = if now - last <= 1 { quiet + 1 } else { 0 };
        last = now;
    }
    if quiet < 5 {
        eprintln!("broker still busy after three minutes; measuring anyway");
    }
}

/// Stops the broker (SIGINT, its clean stop) also when the benchmark fails; after 10 s
/// without an exit, the launcher and the broker under it are killed.
struct NoidaGuard(std::process::Child);

impl Drop for NoidaGuard {
    fn drop(&mut self) {
        let tree = process_tree(self.0.id(), &processes());
        unsafe { libc_kill(self.0.id() as i32, 2) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let exited = loop {
            match self.0.try_wait() {
                Ok(Some(_)) => break true,
                _ if Instant::now() >= deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        // The broker under the launcher may outlive it.
        for pid in tree.iter().skip(usize::from(exited)).rev() {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                unsafe { libc_kill(*pid as i32, 9) };
            }
        }
        let _ = self.0.wait();
    }
}

/// kill(2) without a libc dependency in the example's own imports.
unsafe fn libc_kill(pid: i32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, sig);
}
