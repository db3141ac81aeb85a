//! Test setup: a Kafka-protocol broker (`noida-db` by default, or librdkafka's own mock
//! cluster in a process of its own: `bs-mock-kafka`), topic/producer helpers, the ingest
//! worker process and independent readers of the store.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// A Kafka-protocol broker for one test: `noida-db` on a free port with its own data dir,
/// or (`Broker::start_mock`) librdkafka's mock cluster in a `bs-mock-kafka` process.
pub struct Broker {
    pub brokers: String,
    port: u16,
    child: Option<Child>,
    /// The mock's control channel (`None` for noida-db).
    mock: Option<Arc<Mutex<MockControl>>>,
    _dir: tempfile::TempDir,
}

/// Talks to a running `bs-mock-kafka`: commands on its stdin, answers on its stdout.
struct MockControl {
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl MockControl {
    /// The mock has no CreateTopics API: it creates topics on command.
    fn create_topic(&mut self, topic: &str, partitions: i32) -> Result<()> {
        writeln!(self.stdin, "topic {topic} {partitions}")?;
        self.stdin.flush()?;
        let answer = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .context("bs-mock-kafka did not answer a topic creation")?;
        if answer != format!("ok topic {topic}") {
            bail!("bs-mock-kafka creating topic {topic}: {answer}");
        }
        Ok(())
    }
}

/// Running mock clusters by bootstrap string, so that [`create_topic`] (which only gets the
/// bootstrap servers) can reach the one it is asked about.
fn mocks() -> &'static Mutex<HashMap<String, Arc<Mutex<MockControl>>>> {
    static MOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<MockControl>>>>> = OnceLock::new();
    MOCKS.get_or_init(Default::default)
}

impl Broker {
    /// Starts the broker the environment asks for: librdkafka's mock cluster with
    /// `BROADSIDE_TEST_BROKER=mock`, otherwise `noida-db` ([`Broker::start_noida`]).
    pub fn start() -> Result<Broker> {
        match std::env::var("BROADSIDE_TEST_BROKER").as_deref() {
            Ok("mock") => Broker::start_mock(),
            Ok("noida") | Ok("") | Err(_) => Broker::start_noida(),
            Ok(other) => bail!("BROADSIDE_TEST_BROKER={other}: expected `mock` or `noida`"),
        }
    }

    /// Starts `noida-db --only kafka`. Fails (does not skip) when it is not installed:
    /// CI installs it with `analytics/ci-setup.sh`.
    pub fn start_noida() -> Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut b = Broker {
            brokers: format!("127.0.0.1:{port}"),
            port,
            child: None,
            mock: None,
            _dir: dir,
        };
        b.spawn()?;
        Ok(b)
    }

    /// Starts librdkafka's own mock cluster (its Kafka protocol implementation, the one
    /// librdkafka tests itself against) with 3 brokers, in a separate `bs-mock-kafka`
    /// process so that it outlives the client processes a test kills. Every listener is on
    /// 127.0.0.1. Note the mock's limits (see `analytics/src/bin/mock_kafka.rs`): it keeps
    /// only the newest 5 MiB of each partition; it has no CreateTopics API, which
    /// [`create_topic`] handles by asking the process; a restarted static member
    /// (`group.instance.id`) joins as a new member, so its partitions come back only once
    /// the killed one's session expired; and it refuses offset commits from a client that is
    /// not a group member (`UNKNOWN_MEMBER_ID`), so `rewound_consumer_group_adds_no_rows`
    /// cannot rewind a group on it.
    pub fn start_mock() -> Result<Broker> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("mock.log"))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_bs-mock-kafka"))
            .args(["--brokers", "3"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting bs-mock-kafka")?;
        let stdin = child.stdin.take().expect("piped");
        let lines = stdout_lines(&mut child);
        let brokers = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.path().join("mock.log")).unwrap_or_default();
                bail!("bs-mock-kafka printed no bootstrap servers:\n{log}");
            }
        };
        // The listeners exist before the line is printed; check it anyway.
        for addr in brokers.split(',') {
            if !addr.starts_with("127.0.0.1:") {
                let _ = child.kill();
                bail!("bs-mock-kafka listens on {addr}, not on 127.0.0.1");
            }
            TcpStream::connect(addr)
                .with_context(|| format!("connecting to mock broker {addr}"))?;
        }
        let control = Arc::new(Mutex::new(MockControl { stdin, lines }));
        mocks()
            .lock()
            .unwrap()
            .insert(brokers.clone(), Arc::clone(&control));
        Ok(Broker {
            brokers,
            port: 0,
            child: Some(child),
            mock: Some(control),
            _dir: dir,
        })
    }

    /// Whether this is librdkafka's mock cluster (not noida-db).
    pub fn is_mock(&self) -> bool {
        self.mock.is_some()
    }

    /// Starts the broker process on this broker's port and data dir; returns once it listens.
    fn spawn(&mut self) -> Result<()> {
        let dir = self._dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("noida.log"))?;
        let child = Command::new("noida-db")
            .args([
                "start",
                "--only",
                "kafka",
                "--kafka-port",
                &self.port.to_string(),
            ])
            .args(["--host", "127.0.0.1", "--data-dir"])
            .arg(dir.join("data"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "`noida-db` is not on PATH; these tests need a real Kafka-protocol broker. \
                 Install it with `bash analytics/ci-setup.sh` (or `pip install noida-db`)"
            ),
            Err(e) => return Err(e).context("starting noida-db"),
        };
        let addr = &self.brokers;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("noida.log")).unwrap_or_default();
                bail!("noida-db exited with {status} before listening on {addr}:\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("noida-db did not listen on {addr} within 60 s");
            }
            // Back-off between connection attempts, not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the broker cleanly (SIGINT).
    pub fn stop(&mut self) {
        if let Some(control) = self.mock.take() {
            mocks().lock().unwrap().remove(&self.brokers);
            drop(control);
        }
        if let Some(mut c) = self.child.take() {
            // SIGINT is noida-db's clean stop (and bs-mock-kafka's).
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (`true`, SIGSTOP) or thaws (`false`, SIGCONT) the broker process: an outage in
    /// which the broker answers nothing, connections hang and requests time out, and after
    /// which it comes back with its state. (A stop and restart of noida-db is not usable here:
    /// a client asking for metadata before it has reloaded its data dir gets the topic
    /// auto-created anew with one partition.)
    pub fn freeze(&mut self, frozen: bool) {
        let c = self.child.as_ref().expect("a running broker");
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.freeze(false);
        }
        self.stop();
    }
}

/// A child's stdout (piped) as a channel of lines, read on a thread of its own.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Creates a topic with `partitions` partitions and waits until it is usable (through the
/// admin API, or for a mock cluster started by [`Broker::start_mock`], by asking its process).
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let mock = mocks().lock().unwrap().get(brokers).cloned();
    if let Some(control) = mock {
        return control.lock().unwrap().create_topic(topic, partitions);
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

/// Produces `records` (partition, payload) and waits until every one is acknowledged.
pub fn produce(brokers: &str, topic: &str, records: &[(i32, Vec<u8>)]) -> Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "false")
        .create()?;
    for (p, payload) in records {
        let mut rec = BaseRecord::<(), [u8]>::to(topic)
            .partition(*p)
            .payload(payload.as_slice());
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        producer.poll(Duration::from_millis(10));
                        rec = r;
                    } else {
                        bail!("producing to {topic}: {e}");
                    }
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// One valid event in the DESIGN.md shape.
pub fn event_json(i: usize) -> Vec<u8> {
    let ws = ["acme", "globex"][i % 2];
    let day = 1 + (i / 7) % 3;
    let types = [
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "unsubscribed",
        "complained",
    ];
    let t = types[i % types.len()];
    let extra = match t {
        "bounced" => r#","bounce_type":"hard""#.to_string(),
        "clicked" => format!(r#","url":"https://example.com/p/{i}""#),
        _ => String::new(),
    };
    format!(
        r#"{{"event_id":"ev-{i:08}","workspace_id":"{ws}","campaign_id":"c{}","variant":"A","run_id":"r1","email":"user{i}@example.com","event_type":"{t}"{extra},"ts":"2026-03-0{day}T12:00:00Z","extra_field":{{"ignored":true}}}}"#,
        i % 5
    )
    .into_bytes()
}

/// Event rows in the store, read with the parquet crate's generic reader, with the
/// documented schema checked for every file.
pub fn read_event_ids(store: &Path) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for f in parquet_files(&store.join("events"))? {
        let file = std::fs::File::open(&f)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let schema = builder.schema().clone();
        let expected = broadside_pipeline::event::file_schema();
        if schema.fields() != expected.fields() {
            bail!(
                "{}: schema {schema:?} differs from the documented {expected:?}",
                f.display()
            );
        }
        for batch in builder.build()? {
            let batch = batch?;
            let col = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .context("event_id is not utf8")?;
            for i in 0..col.len() {
                ids.push(col.value(i).to_string());
            }
        }
    }
    Ok(ids)
}

/// Rows committed so far (from Parquet footers only, cheap enough to poll).
pub fn committed_rows(store: &Path) -> Result<u64> {
    let mut n = 0;
    for f in parquet_files(&store.join("events"))? {
        let r = SerializedFileReader::new(std::fs::File::open(&f)?)?;
        n += r.metadata().file_metadata().num_rows() as u64;
    }
    Ok(n)
}

/// Per partition of `topic`, the offset after the highest committed record that the store's
/// data file names show (`kafka-<topic>-<partition>-<start>-<end>.parquet`, `end` inclusive;
/// files appear only after their commit's manifest, so this never overstates a commit).
pub fn committed_next_offsets(store: &Path, topic: &str) -> Result<HashMap<i32, i64>> {
    let prefix = format!("kafka-{topic}-");
    let mut next: HashMap<i32, i64> = HashMap::new();
    for f in parquet_files(&store.join("events"))? {
        let Some(name) = f.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name
            .strip_suffix(".parquet")
            .and_then(|n| n.strip_prefix(&prefix))
        else {
            continue;
        };
        let mut it = rest.rsplitn(3, '-');
        let (Some(end), Some(_start), Some(partition)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let (Ok(end), Ok(partition)) = (end.parse::<i64>(), partition.parse::<i32>()) else {
            continue;
        };
        let e = next.entry(partition).or_default();
        *e = (*e).max(end + 1);
    }
    Ok(next)
}

/// (low, high) watermarks of partitions `0..partitions` of `topic`.
pub fn watermarks(brokers: &str, topic: &str, partitions: i32) -> Result<Vec<(i64, i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    (0..partitions)
        .map(|p| Ok(c.fetch_watermarks(topic, p, Duration::from_secs(10))?))
        .collect()
}

/// Every `*.parquet` under `dir` (temp and staged files are not `.parquet`).
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for e in rd {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Dead-letter records (parsed NDJSON) under `<store>/dead_letters`.
pub fn dead_letters(store: &Path) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut stack = vec![store.join("dead_letters")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ndjson") {
                for line in std::fs::read_to_string(&p)?.lines() {
                    out.push(serde_json::from_str(line)?);
                }
            }
        }
    }
    Ok(out)
}

/// Polls `cond` until it holds or `timeout` passes (condition wait, with a short back-off).
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An `ingest_worker` process with its stdout lines delivered on a channel.
pub struct Worker {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub commits_seen: usize,
    pub assignments_seen: usize,
    /// The last lines the worker printed, for error messages.
    pub recent: std::collections::VecDeque<String>,
}

impl Worker {
    pub fn spawn(
        brokers: &str,
        group: &str,
        topic: &str,
        store: &Path,
        extra: &[&str],
    ) -> Result<Worker> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ingest_worker"))
            .args(["--brokers", brokers, "--group", group, "--topic", topic])
            .arg("--store")
            .arg(store)
            .args([
                "--max-records",
                "500",
                "--idle-ms",
                "300",
                "--max-latency-ms",
                "1000",
            ])
            .args([
                "-X",
                "session.timeout.ms=6000",
                "-X",
                "heartbeat.interval.ms=500",
                "-X",
                "max.poll.interval.ms=8000",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning ingest_worker")?;
        let rx = stdout_lines(&mut child);
        Ok(Worker {
            child,
            lines: rx,
            commits_seen: 0,
            assignments_seen: 0,
            recent: Default::default(),
        })
    }

    /// Blocks until the worker reported `n` more commits.
    pub fn wait_commits(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.commits_seen + n;
        self.wait_for(timeout, |w| w.commits_seen >= target)
            .with_context(|| format!("waiting for {target} commits"))
    }

    /// Blocks until the worker reports another partition assignment.
    pub fn wait_assigned(&mut self, timeout: Duration) -> Result<()> {
        let target = self.assignments_seen + 1;
        self.wait_for(timeout, |w| w.assignments_seen >= target)
            .context("waiting for a partition assignment")
    }

    /// Reads the worker's lines until `done` holds.
    fn wait_for(&mut self, timeout: Duration, mut done: impl FnMut(&Worker) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if l.starts_with("COMMIT ") {
                        self.commits_seen += 1;
                    } else if l.starts_with("ASSIGN ") {
                        self.assignments_seen += 1;
                    }
                    if self.recent.len() == 8 {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(l);
                }
                Err(_) => bail!(
                    "worker reported {} commits in all after {timeout:?}; its last lines: {:?}",
                    self.commits_seen,
                    self.recent
                ),
            }
        }
        Ok(())
    }

    pub fn sigkill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for the clean `DONE` exit.
    pub fn stop(&mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("worker exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A failing test must not leave ingest processes behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic PRNG (seed printed by the tests for reproduction).
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Rng {
        let seed = std::env::var("BROADSIDE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("BROADSIDE_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Counts per event id; asserts count(*) = count(distinct) = n and every id present.
pub fn assert_exactly_once(ids: &[String], expected: impl IntoIterator<Item = String>) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated event ids, e.g. {dups:?}");
    let mut missing = Vec::new();
    let mut n = 0;
    for id in expected {
        n += 1;
        if !counts.contains_key(id.as_str()) {
            missing.push(id);
        }
    }
    assert!(
        missing.is_empty(),
        "{} events missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        ids.len(),
        n,
        "count(*) must equal the number of produced events"
    );
}

/// Reads the store with pyarrow (an independent implementation) and returns
/// (rows, distinct event ids, schema string).
pub fn pyarrow_summary(store: &Path) -> Result<(u64, u64, String)> {
    let script = r#"
import sys
import pyarrow.dataset as ds
d = ds.dataset(sys.argv[1] + "/events", format="parquet", partitioning="hive")
t = d.to_table()
print(t.num_rows)
print(len(set(t.column("event_id").to_pylist())))
print(",".join(f"{f.name}:{f.type}:{'null' if f.nullable else 'notnull'}" for f in d.schema))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(store)
        .output()
        .context("running python3 (install pyarrow with analytics/ci-setup.sh)")?;
    if !out.status.success() {
        bail!(
            "pyarrow could not read the store (install it with analytics/ci-setup.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let rows = lines.next().context("no row count")?.parse()?;
    let distinct = lines.next().context("no distinct count")?.parse()?;
    let schema = lines.next().context("no schema")?.to_string();
    Ok((rows, distinct, schema))
}

/// What a finished `ingest_worker` run printed.
pub struct WorkerRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ingest_worker` until it exits by itself (give `--exit-when-idle-ms`, or expect it to
/// fail), killing it after `timeout`; returns its exit status and output.
pub fn run_worker_to_exit(
    brokers: &str,
    group: &str,
    topic: &str,
    store: &Path,
    extra: &[&str],
    timeout: Duration,
) -> Result<WorkerRun> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest_worker"))
        .args(["--brokers", brokers, "--group", group, "--topic", topic])
        .arg("--store")
        .arg(store)
        .args(["--idle-ms", "300", "-X", "session.timeout.ms=6000"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ingest_worker")?;
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "ingest_worker did not exit within {timeout:?}; stderr:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(WorkerRun {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Rows of `SELECT ...` over the store's catalog (all workspaces), as JSON objects.
pub fn sql_rows(store: &Path, sql: &str) -> Result<Vec<serde_json::Value>> {
    use broadside_analytics::query::{Catalog, Scope};
    let catalog = Catalog::new(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sink = broadside_analytics::query::sql::Batches::default();
    let answer = rt.block_on(broadside_analytics::query::sql::run_sql(
        &catalog,
        &Scope::All,
        sql,
        &mut sink,
    ))?;
    assert!(answer.truncated.is_none(), "{sql}: answer truncated");
    let mut out = Vec::new();
    broadside_analytics::query::sql::write_batches(
        &sink.batches,
        broadside_analytics::query::sql::Format::Json,
        &mut out,
    )?;
    String::from_utf8(out)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}
