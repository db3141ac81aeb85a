//! Kafka → Parquet ingest as a consumer-group member, exactly once (see [`crate::commit`]).
//!
//! Offsets are taken from the store, not from the group: on assignment each partition
//! is recovered from its newest commit manifest and the consumer is positioned at the
//! offset after it. Group offsets are still committed after each store commit, but only
//! so that lag shows in the usual Kafka tools.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::buffer::StreamBuffer;
use crate::commit::{CommitOutcome, Committer, StreamId, WriteSettings};
use crate::error::{Error, Result};

/// When buffered records are committed: whichever limit is reached first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushPolicy {
    /// Commit a partition's buffer once it holds this many records.
    pub max_records: usize,
    /// ... or this many payload bytes.
    pub max_bytes: usize,
    /// ... or when its oldest record has waited this long (milliseconds).
    pub max_latency_ms: u64,
    /// ... or when no record arrived for this long (milliseconds): a quiet topic still lands.
    pub idle_ms: u64,
    /// Commit every partition when all buffers together hold this many payload bytes
    /// (bounds memory whatever the number of partitions).
    pub max_buffered_bytes: usize,
    /// zstd level of the Parquet files.
    pub zstd_level: i32,
    /// Maximum rows per Parquet row group.
    pub row_group_rows: usize,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            max_records: 500_000,
            max_bytes: 128 << 20,
            max_latency_ms: 30_000,
            idle_ms: 2_000,
            max_buffered_bytes: 512 << 20,
            zstd_level: 1,
            row_group_rows: 128 * 1024,
        }
    }
}

impl FlushPolicy {
    pub(crate) fn problems(&self, out: &mut Vec<String>) {
        if self.max_records == 0 {
            out.push("flush.max_records must be at least 1".into());
        }
        if self.max_bytes == 0 || self.max_buffered_bytes == 0 {
            out.push("flush.max_bytes and flush.max_buffered_bytes must be positive".into());
        }
        if self.max_latency_ms == 0 || self.idle_ms == 0 {
            out.push("flush.max_latency_ms and flush.idle_ms must be positive".into());
        }
        if !(1..=22).contains(&self.zstd_level) {
            out.push(format!(
                "flush.zstd_level {} is not in 1..=22",
                self.zstd_level
            ));
        }
        if self.row_group_rows == 0 {
            out.push("flush.row_group_rows must be at least 1".into());
        }
    }

    pub(crate) fn write_settings(&self) -> WriteSettings {
        WriteSettings {
            zstd_level: self.zstd_level,
            row_group_rows: self.row_group_rows,
        }
    }
}

/// Configuration of `broadside ingest` from Kafka.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaIngestConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092` (CLI: `--brokers`, env `BROADSIDE_KAFKA_BROKERS`).
    pub brokers: String,
    /// Consumer group; run one ingest process per group member (CLI: `--group`).
    pub group_id: String,
    /// Topics to consume (CLI: `--topic`, repeatable).
    pub topics: Vec<String>,
    /// Store root; events land under `<store>/events/` (CLI: `--store`).
    pub store: PathBuf,
    /// When to commit.
    #[serde(default)]
    pub flush: FlushPolicy,
    /// Extra librdkafka properties (`security.protocol`, `session.timeout.ms`, ...)
    /// (CLI: `-X key=value`). Offset handling properties are owned by the ingest.
    #[serde(default)]
    pub kafka_options: BTreeMap<String, String>,
    /// Stop (after committing everything) once no record arrived for this long, in
    /// milliseconds. `None` runs until shutdown (CLI: `--exit-when-idle-ms`).
    #[serde(default)]
    pub exit_when_idle_ms: Option<u64>,
}

/// librdkafka properties the ingest sets itself; overriding them would break exactly-once.
const OWNED_OPTIONS: [&str; 5] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "partition.assignment.strategy",
];

impl KafkaIngestConfig {
    /// A config with default flush policy and options.
    pub fn new(brokers: &str, group_id: &str, topics: &[&str], store: impl Into<PathBuf>) -> Self {
        KafkaIngestConfig {
            brokers: brokers.to_string(),
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            store: store.into(),
            flush: FlushPolicy::default(),
            kafka_options: BTreeMap::new(),
            exit_when_idle_ms: None,
        }
    }

    /// Checks the configuration, reporting every problem at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if self.brokers.trim().is_empty() {
            p.push("brokers is empty".into());
        }
        if self.group_id.trim().is_empty() {
            p.push("group_id is empty".into());
        }
        if self.topics.is_empty() {
            p.push("no topic given".into());
        }
        for t in &self.topics {
            let ok = !t.is_empty()
                && t.len() <= 249
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                p.push(format!("topic `{t}` is not a valid Kafka topic name"));
            }
        }
        for k in self.kafka_options.keys() {
            if OWNED_OPTIONS.contains(&k.as_str()) {
                p.push(format!(
                    "kafka option `{k}` is set by the ingest and cannot be overridden"
                ));
            }
        }
        self.flush.problems(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                what: "kafka ingest",
                problems: p,
            })
        }
    }
}

/// Counters of one ingest run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Records consumed and committed (good and dead).
    pub records: u64,
    /// Event rows written.
    pub rows: u64,
    /// Records sent to the dead letters.
    pub dead_letters: u64,
    /// Parquet files written.
    pub files: u64,
    /// Commits made.
    pub commits: u64,
    /// Records skipped because they were already committed (redelivery after a seek).
    pub skipped_committed: u64,
    /// Commits lost to another writer (a partition moved while we held it).
    pub conflicts: u64,
}

impl IngestStats {
    /// Counts one successful commit of `records` consumed records.
    pub fn add_commit(&mut self, records: u64, rows: u64, dead_letters: u64, files: u64) {
        self.records += records;
        self.rows += rows;
        self.dead_letters += dead_letters;
        self.files += files;
        self.commits += 1;
    }
}

/// A commit that happened, as reported to [`IngestHooks::on_commit`].
#[derive(Debug, Clone)]
pub struct CommitInfo {
    /// `topic T partition P` or `file F`.
    pub stream: String,
    /// First offset (or line) of the range.
    pub start: i64,
    /// Last offset (or line) of the range.
    pub end: i64,
    /// Rows written.
    pub rows: u64,
    /// Dead letters written.
    pub dead_letters: u64,
}

/// A function told about every commit.
pub type CommitCallback = Box<dyn Fn(&CommitInfo) + Send + Sync>;

/// Observation points for tools and tests (progress output, fault injection).
#[derive(Default)]
pub struct IngestHooks {
    /// Called after every successful commit.
    pub on_commit: Option<CommitCallback>,
    /// Called when a partition is assigned, with the offset it resumes at.
    pub on_assign: Option<AssignCallback>,
}

/// A function told about every partition assignment: topic, partition, resume offset.
pub type AssignCallback = Box<dyn Fn(&str, i32, i64) + Send + Sync>;

struct PartitionState {
    committer: Committer,
    buffer: StreamBuffer,
    /// Offset of the next record to accept; lower offsets are already committed.
    expected: i64,
}

struct Shared {
    cfg: KafkaIngestConfig,
    hooks: IngestHooks,
    partitions: Mutex<HashMap<(String, i32), PartitionState>>,
    stats: Mutex<IngestStats>,
    /// An error raised inside a rebalance callback, surfaced by the poll loop.
    failure: Mutex<Option<Error>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, i32), PartitionState>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: Error) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }

    fn stream_id(topic: &str, partition: i32) -> StreamId {
        let mut dead_fields = serde_json::Map::new();
        dead_fields.insert("source".into(), "kafka".into());
        dead_fields.insert("topic".into(), topic.into());
        dead_fields.insert("partition".into(), partition.into());
        StreamId {
            state_rel: PathBuf::from("_ingest/kafka")
                .join(format!("topic={topic}"))
                .join(format!("partition={partition}")),
            dead_rel: PathBuf::from("dead_letters/kafka")
                .join(format!("topic={topic}"))
                .join(format!("partition={partition}")),
            prefix: format!("kafka-{topic}-{partition}"),
            describe: format!("topic {topic} partition {partition}"),
            dead_fields,
            offset_field: "offset",
        }
    }

    /// Commits one partition's buffer. Returns the offset to seek to on conflict.
    fn flush(&self, st: &mut PartitionState) -> Result<Option<i64>> {
        if st.buffer.is_empty() {
            return Ok(None);
        }
        let records = st.buffer.records as u64;
        let start = st.committer.next();
        let end = st.expected - 1;
        let pending = st.buffer.take()?;
        let outcome = st.committer.commit(end, pending)?;
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            CommitOutcome::Committed {
                rows,
                dead_letters,
                files,
            } => {
                stats.add_commit(records, rows, dead_letters, files);
                drop(stats);
                if let Some(h) = &self.hooks.on_commit {
                    h(&CommitInfo {
                        stream: st.committer.describe().to_string(),
                        start,
                        end,
                        rows,
                        dead_letters,
                    });
                }
                Ok(None)
            }
            CommitOutcome::Conflict { next } => {
                stats.conflicts += 1;
                st.expected = next;
                Ok(Some(next))
            }
        }
    }
}

/// The consumer context: positions assigned partitions from the store and commits
/// revoked ones before letting them go.
struct IngestContext {
    shared: Arc<Shared>,
}

impl ClientContext for IngestContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let sh = &self.shared;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut parts = sh.lock();
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (topic, partition) in assigned {
                    let id = Shared::stream_id(&topic, partition);
                    match Committer::open(&sh.cfg.store, id, 0, sh.cfg.flush.write_settings()) {
                        Ok(committer) => {
                            let next = committer.next();
                            if let Err(e) =
                                tpl.set_partition_offset(&topic, partition, Offset::Offset(next))
                            {
                                sh.fail(Error::kafka(format!("topic {topic} partition {partition}: positioning at offset {next}"), e));
                            }
                            tracing::info!(
                                topic,
                                partition,
                                next,
                                "partition assigned; resuming from the store"
                            );
                            if let Some(h) = &sh.hooks.on_assign {
                                h(&topic, partition, next);
                            }
                            parts.insert(
                                (topic, partition),
                                PartitionState {
                                    committer,
                                    buffer: StreamBuffer::default(),
                                    expected: next,
                                },
                            );
                        }
                        Err(e) => sh.fail(e),
                    }
                }
                drop(parts);
                if let Err(e) = consumer.assign(tpl) {
                    sh.fail(Error::kafka("assigning partitions", e));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // A lost assignment (session timed out) is already someone else's: committing
                // would only lose the compare-and-set, so the buffers are dropped instead.
                let lost = consumer.assignment_lost();
                let mut parts = sh.lock();
                let mut offsets = TopicPartitionList::new();
                for e in tpl.elements() {
                    let key = (e.topic().to_string(), e.partition());
                    if let Some(mut st) = parts.remove(&key) {
                        if lost {
                            st.buffer.discard();
                            continue;
                        }
                        match sh.flush(&mut st) {
                            Ok(_) => {
                                let _ = offsets.add_partition_offset(
                                    &key.0,
                                    key.1,
                                    Offset::Offset(st.committer.next()),
                                );
                            }
                            Err(e) => sh.fail(e),
                        }
                        tracing::info!(topic = key.0, partition = key.1, "partition revoked");
                    }
                }
                drop(parts);
                if offsets.count() > 0 {
                    // Best effort: group offsets only serve lag monitoring.
                    let _ = consumer.commit(&offsets, CommitMode::Sync);
                }
                if let Err(e) = consumer.unassign() {
                    sh.fail(Error::kafka("unassigning partitions", e));
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                sh.lock().clear();
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs the ingest until `shutdown` is set (or, with `exit_when_idle_ms`, until the
/// topics are drained), committing everything buffered before returning.
///
/// Errors name the topic/partition or file involved. Records that cannot be decoded
/// are not errors: they go to `<store>/dead_letters/kafka/topic=T/partition=P/`.
pub fn run_kafka_ingest(
    cfg: &KafkaIngestConfig,
    hooks: IngestHooks,
    shutdown: &AtomicBool,
) -> Result<IngestStats> {
    cfg.validate()?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        hooks,
        partitions: Mutex::new(HashMap::new()),
        stats: Mutex::new(IngestStats::default()),
        failure: Mutex::new(None),
    });
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Eager protocols only: the rebalance callback assigns whole sets with offsets.
        .set("partition.assignment.strategy", "range,roundrobin")
        // Only used when the store's offset is no longer on the broker (retention).
        .set("auto.offset.reset", "earliest");
    for (k, v) in &cfg.kafka_options {
        cc.set(k, v);
    }
    let consumer: BaseConsumer<IngestContext> = cc
        .create_with_context(IngestContext {
            shared: Arc::clone(&shared),
        })
        .map_err(|e| Error::kafka(format!("creating consumer for {}", cfg.brokers), e))?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::kafka(format!("subscribing to {}", topics.join(",")), e))?;

    let policy = &cfg.flush;
    let max_latency = Duration::from_millis(policy.max_latency_ms);
    let idle = Duration::from_millis(policy.idle_ms);
    let exit_idle = cfg.exit_when_idle_ms.map(Duration::from_millis);
    let mut last_record = Instant::now();
    let mut last_timer_check = Instant::now();
    let mut buffered_bytes = 0usize;
    let mut seeks: Vec<(String, i32, i64)> = Vec::new();
    let mut mirrored_commits = 0u64;

    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            break Ok(());
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(e) = shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            break Err(e);
        }
        let now = Instant::now();
        match polled {
            Some(Ok(msg)) => {
                last_record = now;
                let key = (msg.topic().to_string(), msg.partition());
                let mut parts = shared.lock();
                // A message for a partition we no longer own is a leftover of a revoke.
                let Some(st) = parts.get_mut(&key) else {
                    continue;
                };
                if msg.offset() < st.expected {
                    shared
                        .stats
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .skipped_committed += 1;
                    continue;
                }
                let payload = msg.payload().unwrap_or_default();
                if let Err(e) = st.buffer.push_record(msg.offset(), payload, now) {
                    break Err(e);
                }
                buffered_bytes += payload.len();
                st.expected = msg.offset() + 1;
                if st.buffer.records >= policy.max_records || st.buffer.bytes >= policy.max_bytes {
                    buffered_bytes = buffered_bytes.saturating_sub(st.buffer.bytes);
                    match shared.flush(st) {
                        Ok(Some(next)) => seeks.push((key.0, key.1, next)),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    }
                }
                if buffered_bytes >= policy.max_buffered_bytes {
                    if let Err(e) = flush_all(&shared, &mut parts, &mut seeks) {
                        break Err(e);
                    }
                    buffered_bytes = 0;
                }
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::BadMessage))) => {
                // librdkafka skips a message set it cannot parse; carrying on would leave
                // a silent gap in the committed range, so stop before committing past it.
                break Err(Error::kafka(
                    format!("consuming {}", cfg.topics.join(",")),
                    KafkaError::MessageConsumption(RDKafkaErrorCode::BadMessage),
                ));
            }
            Some(Err(e)) => {
                // Broker outages surface here; librdkafka reconnects by itself, and
                // nothing is committed meanwhile, so the ingest waits rather than dies.
                tracing::warn!(error = %e, "kafka consumer error");
            }
            None => {}
        }
        if now.duration_since(last_timer_check) >= Duration::from_millis(50) {
            last_timer_check = now;
            let mut parts = shared.lock();
            let mut failed = None;
            for (key, st) in parts.iter_mut() {
                let due = match (st.buffer.first_at, st.buffer.last_at) {
                    (Some(first), Some(last)) => {
                        now.duration_since(first) >= max_latency || now.duration_since(last) >= idle
                    }
                    _ => false,
                };
                if due {
                    buffered_bytes = buffered_bytes.saturating_sub(st.buffer.bytes);
                    match shared.flush(st) {
                        Ok(Some(next)) => seeks.push((key.0.clone(), key.1, next)),
                        Ok(None) => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if parts.values().all(|s| s.buffer.is_empty()) {
                buffered_bytes = 0;
            }
            let all_empty = buffered_bytes == 0;
            drop(parts);
            if let Some(e) = failed {
                break Err(e);
            }
            if let Some(limit) = exit_idle {
                if all_empty && now.duration_since(last_record) >= limit {
                    break Ok(());
                }
            }
        }
        for (topic, partition, next) in seeks.drain(..) {
            if let Err(e) = consumer.seek(
                &topic,
                partition,
                Offset::Offset(next),
                Duration::from_secs(10),
            ) {
                // Cannot reposition: stop rather than risk a gap; a restart resumes from the store.
                return Err(Error::kafka(
                    format!("topic {topic} partition {partition}: seeking to offset {next}"),
                    e,
                ));
            }
        }
        let commits = shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commits;
        if commits != mirrored_commits {
            mirrored_commits = commits;
            commit_group_offsets(&consumer, &shared);
        }
    };

    if result.is_ok() {
        let mut parts = shared.lock();
        flush_all(&shared, &mut parts, &mut seeks)?;
    }
    commit_group_offsets(&consumer, &shared);
    result?;
    consumer.unsubscribe();
    let stats = shared
        .stats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(stats)
}

fn flush_all(
    shared: &Shared,
    parts: &mut HashMap<(String, i32), PartitionState>,
    seeks: &mut Vec<(String, i32, i64)>,
) -> Result<()> {
    for (key, st) in parts.iter_mut() {
        if let Some(next) = shared.flush(st)? {
            seeks.push((key.0.clone(), key.1, next));
        }
    }
    Ok(())
}

/// Mirrors the store's positions into the group offsets (for lag monitoring only).
fn commit_group_offsets(consumer: &BaseConsumer<IngestContext>, shared: &Shared) {
    let parts = shared.lock();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), st) in parts.iter() {
        if st.committer.next() > 0 {
            let _ =
                tpl.add_partition_offset(topic, *partition, Offset::Offset(st.committer.next()));
        }
    }
    drop(parts);
    if tpl.count() > 0 {
        match consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) | Err(KafkaError::ConsumerCommit(_)) => {}
            Err(e) => tracing::debug!(error = %e, "group offset commit failed"),
        }
    }
}
