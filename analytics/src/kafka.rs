//! Kafka → Parquet ingest as a consumer-group member, exactly once (see [`crate::commit`]).
//!
//! Offsets are taken from the store, not from the group: on assignment each partition
//! is recovered from its newest commit manifest and the consumer is positioned at the
//! offset after it. Group offsets are still committed after each store commit, but only
//! so that lag shows in the usual Kafka tools.
//!
//! Nothing is skipped silently: on assignment the store's position is checked against the
//! partition's watermarks (once per assignment, not per record). A position below the low
//! watermark (records deleted by retention) or above the high watermark (topic re-created)
//! stops the ingest with [`Error::IngestGap`], or with [`OnGap::Record`] is written to the
//! `ingest_gaps` table ([`crate::gaps`]) and the ingest goes on. A position that falls out of
//! range while consuming stops the ingest (`auto.offset.reset=error`); the restart then
//! checks it as above.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::attribution::Attribution;
use crate::buffer::StreamBuffer;
use crate::commit::{CommitOutcome, Committer, StreamId, WriteSettings};
use crate::error::{Error, Result};
use crate::gaps::{record_gap, GapKind, IngestGap};

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

/// What the ingest does when a partition's offsets do not continue from the store's position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGap {
    /// Stop with [`Error::IngestGap`], naming topic, partition and offsets (the default).
    #[default]
    Stop,
    /// Record the gap in the `ingest_gaps` table and continue at the first available
    /// offset (for a re-created topic, in a new generation of the partition's stream).
    Record,
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
    /// Writer threads that decode, encode and commit (each owns a share of the assigned
    /// partitions); 0 means one per core (CLI: `--writers`).
    #[serde(default)]
    pub writers: usize,
    /// What to do about a gap between the store's position and the partition's offsets
    /// (CLI: `--on-gap stop|record`).
    #[serde(default)]
    pub on_gap: OnGap,
}

/// librdkafka properties the ingest sets itself; overriding them would break exactly-once
/// (`auto.offset.reset` would let the consumer jump over a gap without a word).
const OWNED_OPTIONS: [&str; 7] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "partition.assignment.strategy",
    "auto.offset.reset",
    "isolation.level",
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
            writers: 0,
            on_gap: OnGap::Stop,
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
    /// Gaps recorded in `ingest_gaps` (only with [`OnGap::Record`]).
    pub gaps: u64,
    /// Event rows whose missing variant or run id came from the ledger
    /// ([`crate::attribution`]).
    pub attributed: u64,
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
    /// Called once, when the run accepts its first record (benchmarks time from it).
    pub on_first_record: Option<Box<dyn Fn() + Send + Sync>>,
}

/// A function told about every partition assignment: topic, partition, resume offset.
pub type AssignCallback = Box<dyn Fn(&str, i32, i64) + Send + Sync>;

/// librdkafka's `fetch.queue.backoff.ms` for the ingest (overridable with `kafka_options`).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// A partition: topic and partition number.
type Key = (String, i32);

/// Records a writer decodes per hand-over: big enough that the channel costs nothing per
/// record, small enough that decoding starts while the polling thread fills the next one.
const CHUNK_RECORDS: usize = 4096;
/// ... or this many payload bytes.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks queued per writer before the polling thread waits (back-pressure; with the
/// flush policy's `max_buffered_bytes` this bounds memory).
const WRITER_QUEUE: usize = 4;

/// Raw records of one partition, in offset order, handed to its writer.
#[derive(Default)]
struct Chunk {
    data: Vec<u8>,
    /// Offset and end position in `data` of each record.
    records: Vec<(i64, usize)>,
}

impl Chunk {
    fn push(&mut self, offset: i64, payload: &[u8]) {
        self.data.extend_from_slice(payload);
        self.records.push((offset, self.data.len()));
    }

    fn is_full(&self) -> bool {
        self.records.len() >= CHUNK_RECORDS || self.data.len() >= CHUNK_BYTES
    }
}

/// Emptied chunks kept for reuse, so the polling thread neither allocates nor faults in fresh
/// pages for every chunk.
#[derive(Default)]
struct ChunkPool(Mutex<Vec<Chunk>>);

impl ChunkPool {
    /// Enough for every writer's queue and the chunk each is decoding.
    const KEEP: usize = 16;

    fn take(&self) -> Chunk {
        locked(&self.0).pop().unwrap_or_default()
    }

    fn give(&self, mut chunk: Chunk) {
        chunk.data.clear();
        chunk.records.clear();
        let mut pool = locked(&self.0);
        if pool.len() < Self::KEEP {
            pool.push(chunk);
        }
    }
}

/// Work for a writer thread. Jobs of one partition go to one writer, so they run in order.
/// `epoch` tells stale work apart: after a lost commit (conflict) the writer drops the
/// partition's jobs up to that epoch, and the polling thread resumes with a newer one.
enum Job {
    /// A newly assigned partition and its recovered committer.
    Open { key: Key, committer: Box<Committer> },
    /// Records to decode into the partition's buffer.
    Records { key: Key, epoch: u64, chunk: Chunk },
    /// Commit everything decoded, which ends at offset `end`.
    Commit { key: Key, epoch: u64, end: i64 },
    /// The partition is revoked: commit what is buffered (unless `discard`), forget the
    /// partition, then answer on `done` with the first offset not committed.
    Close {
        key: Key,
        epoch: u64,
        end: i64,
        discard: bool,
        done: SyncSender<Option<i64>>,
    },
    /// Stop the thread.
    Exit,
}

/// What a writer tells the polling thread.
enum Report {
    /// Another member committed from the same start first; consumption must resume at
    /// `next` with a new epoch.
    Conflict { key: Key, epoch: u64, next: i64 },
    /// Writing failed; the ingest stops.
    Failed(Error),
}

/// The polling thread's view of an assigned partition.
struct PollState {
    worker: usize,
    epoch: u64,
    /// Offset of the next record to accept; lower offsets are already committed or handed
    /// to the writer.
    expected: i64,
    /// Records not yet handed to the writer.
    chunk: Chunk,
    /// Records and payload bytes handed over or pending since the last commit job.
    unflushed_records: usize,
    unflushed_bytes: usize,
    /// When the oldest uncommitted record arrived (flush-by-latency).
    first_at: Option<Instant>,
    /// When the newest one arrived (idle flush).
    last_at: Option<Instant>,
    /// Records and payload bytes consumed since the metrics last saw them (published with
    /// the timers, not per record).
    metered_records: u64,
    metered_bytes: u64,
}

struct Shared {
    cfg: KafkaIngestConfig,
    hooks: IngestHooks,
    partitions: Mutex<Vec<(Key, PollState)>>,
    /// Per partition, the first offset not yet committed to the store (kept by the writers).
    committed: Mutex<HashMap<Key, i64>>,
    stats: Mutex<IngestStats>,
    /// An error raised inside a rebalance callback, surfaced by the poll loop.
    failure: Mutex<Option<Error>>,
    workers: Vec<SyncSender<Job>>,
    /// Source of epochs (assignments and post-conflict restarts).
    epochs: AtomicU64,
    chunks: ChunkPool,
    /// Variant and run of events that lack them, from the ledger.
    attribution: Arc<Attribution>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fail(&self, e: Error) {
        locked(&self.failure).get_or_insert(e);
    }

    fn send(&self, worker: usize, job: Job) {
        // A writer only goes away after `Job::Exit`; a failed one keeps draining its queue.
        let _ = self.workers[worker].send(job);
    }

    /// The stream of a partition in `generation` (0 until the topic is first re-created
    /// under `--on-gap record`; each re-creation starts the offsets, and so the commit
    /// chain, anew in a folder of its own).
    fn stream_id(topic: &str, partition: i32, generation: u32) -> StreamId {
        let mut dead_fields = serde_json::Map::new();
        dead_fields.insert("source".into(), "kafka".into());
        dead_fields.insert("topic".into(), topic.into());
        dead_fields.insert("partition".into(), partition.into());
        let mut state_rel = partition_state_rel(topic, partition);
        let mut dead_rel = PathBuf::from("dead_letters/kafka")
            .join(format!("topic={topic}"))
            .join(format!("partition={partition}"));
        let mut prefix = format!("kafka-{topic}-{partition}");
        let mut describe = format!("topic {topic} partition {partition}");
        if generation > 0 {
            dead_fields.insert("generation".into(), generation.into());
            state_rel.push(format!("generation={generation}"));
            dead_rel.push(format!("generation={generation}"));
            prefix.push_str(&format!("-g{generation}"));
            describe.push_str(&format!(" (generation {generation})"));
        }
        StreamId {
            state_rel,
            dead_rel,
            prefix,
            describe,
            dead_fields,
            offset_field: "offset",
        }
    }

    /// Recovers a newly assigned partition from the store and checks the store's position
    /// against the partition's watermarks. Returns the committer and where to consume from.
    fn open_partition(
        &self,
        consumer: &BaseConsumer<IngestContext>,
        topic: &str,
        partition: i32,
    ) -> Result<(Committer, Offset)> {
        let store = &self.cfg.store;
        let settings = self.cfg.flush.write_settings();
        let generation = current_generation(store, topic, partition)?;
        let committer = Committer::open(
            store,
            Shared::stream_id(topic, partition, generation),
            0,
            settings,
        )?
        .with_attribution(self.attribution.clone());
        let next = committer.next();
        if next == 0 {
            // Nothing committed yet: start at the first record the partition still has.
            return Ok((committer, Offset::Beginning));
        }
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(30))
            .map_err(|e| {
                Error::kafka(
                    format!("topic {topic} partition {partition}: reading the watermarks"),
                    e,
                )
            })?;
        let recreated = high < next;
        if !recreated && low <= next {
            return Ok((committer, Offset::Offset(next)));
        }
        if self.cfg.on_gap == OnGap::Stop {
            return Err(Error::IngestGap {
                topic: topic.to_string(),
                partition,
                recreated,
                store_next: next,
                low,
                high,
            });
        }
        let gap = IngestGap {
            topic: topic.to_string(),
            partition,
            kind: if recreated {
                GapKind::Recreated
            } else {
                GapKind::Retention
            },
            from: next,
            to: low,
            generation,
            seen_at_us: chrono::Utc::now().timestamp_micros(),
        };
        record_gap(store, &gap)?;
        locked(&self.stats).gaps += 1;
        tracing::warn!(
            topic,
            partition,
            kind = gap.kind.as_str(),
            store_next = next,
            low,
            high,
            "ingest gap recorded in ingest_gaps; continuing"
        );
        if !recreated {
            // The first commit's range starts at `next` and so spans the gap; its rows start
            // at `low`.
            return Ok((committer, Offset::Offset(low)));
        }
        let generation = generation + 1;
        let fresh = Committer::open(
            store,
            Shared::stream_id(topic, partition, generation),
            0,
            settings,
        )?
        .with_attribution(self.attribution.clone());
        Ok((fresh, Offset::Beginning))
    }

    /// Hands a partition's pending records to its writer.
    fn hand_over(&self, key: &Key, st: &mut PollState) {
        if !st.chunk.records.is_empty() {
            let chunk = std::mem::replace(&mut st.chunk, self.chunks.take());
            self.send(
                st.worker,
                Job::Records {
                    key: key.clone(),
                    epoch: st.epoch,
                    chunk,
                },
            );
        }
    }

    /// Asks the partition's writer to commit everything consumed so far.
    fn flush(&self, key: &Key, st: &mut PollState) {
        if st.unflushed_records == 0 {
            return;
        }
        self.hand_over(key, st);
        self.send(
            st.worker,
            Job::Commit {
                key: key.clone(),
                epoch: st.epoch,
                end: st.expected - 1,
            },
        );
        st.unflushed_records = 0;
        st.unflushed_bytes = 0;
        st.first_at = None;
        st.last_at = None;
    }

    /// Commits (or, when `discard`, drops) a partition's records and waits until its
    /// writer has let it go. Returns the first offset not committed, when known.
    fn close(&self, key: &Key, mut st: PollState, discard: bool) -> Option<i64> {
        if !discard {
            self.hand_over(key, &mut st);
        }
        let (done, wait) = sync_channel(1);
        self.send(
            st.worker,
            Job::Close {
                key: key.clone(),
                epoch: st.epoch,
                end: st.expected - 1,
                discard,
                done,
            },
        );
        wait.recv().ok().flatten()
    }

    /// The writer with the fewest partitions.
    fn least_loaded(&self, parts: &[(Key, PollState)]) -> usize {
        (0..self.workers.len())
            .min_by_key(|w| parts.iter().filter(|(_, s)| s.worker == *w).count())
            .unwrap_or(0)
    }
}

/// A writer thread's state of one partition.
struct WriterState {
    committer: Box<Committer>,
    buffer: StreamBuffer,
    /// Jobs with an epoch at or below this are stale (set by a conflict).
    dead_epoch: Option<u64>,
    /// Offset of the last record decoded into `buffer`.
    last_offset: i64,
}

/// Decodes, encodes and commits the partitions given to it, in job order.
fn writer_loop(shared: &Shared, jobs: Receiver<Job>, reports: Sender<Report>) {
    let mut parts: HashMap<Key, WriterState> = HashMap::new();
    let mut failed = false;
    let stale = |st: &WriterState, epoch: u64| st.dead_epoch.is_some_and(|d| epoch <= d);
    while let Ok(job) = jobs.recv() {
        let result = match job {
            Job::Exit => break,
            Job::Open { key, committer } => {
                let next = committer.next();
                locked(&shared.committed).insert(key.clone(), next);
                parts.insert(
                    key,
                    WriterState {
                        committer,
                        buffer: StreamBuffer::default(),
                        dead_epoch: None,
                        last_offset: next - 1,
                    },
                );
                Ok(())
            }
            Job::Records { key, epoch, chunk } => {
                let r = match parts.get_mut(&key) {
                    Some(st) if !failed && !stale(st, epoch) => decode_chunk(st, &chunk),
                    _ => Ok(()),
                };
                shared.chunks.give(chunk);
                r
            }
            Job::Commit { key, epoch, end } => match parts.get_mut(&key) {
                Some(st) if !failed && !stale(st, epoch) => {
                    commit(shared, &key, epoch, st, end, &reports)
                }
                _ => Ok(()),
            },
            Job::Close {
                key,
                epoch,
                end,
                discard,
                done,
            } => {
                let mut next = None;
                let mut r = Ok(());
                if let Some(mut st) = parts.remove(&key) {
                    if !failed && !discard && !stale(&st, epoch) {
                        r = commit(shared, &key, epoch, &mut st, end, &reports);
                    }
                    next = Some(st.committer.next());
                }
                locked(&shared.committed).remove(&key);
                let _ = done.send(next);
                r
            }
        };
        if let Err(e) = result {
            failed = true;
            let _ = reports.send(Report::Failed(e));
        }
    }
}

fn decode_chunk(st: &mut WriterState, chunk: &Chunk) -> Result<()> {
    let now = Instant::now();
    let mut start = 0;
    for &(offset, end) in &chunk.records {
        st.buffer
            .push_record(offset, &chunk.data[start..end], now)?;
        st.last_offset = offset;
        start = end;
    }
    Ok(())
}

/// Commits one partition's buffer, which must end at `end`.
fn commit(
    shared: &Shared,
    key: &Key,
    epoch: u64,
    st: &mut WriterState,
    end: i64,
    reports: &Sender<Report>,
) -> Result<()> {
    if st.buffer.is_empty() {
        return Ok(());
    }
    if end != st.last_offset {
        return Err(Error::state(
            st.committer.describe(),
            format!(
                "commit asked up to offset {end} but records were decoded up to {}",
                st.last_offset
            ),
        ));
    }
    let records = st.buffer.records as u64;
    let start = st.committer.next();
    let pending = st.buffer.take()?;
    match st.committer.commit(end, pending)? {
        CommitOutcome::Committed {
            rows,
            dead_letters,
            files,
            attributed,
        } => {
            {
                let mut stats = locked(&shared.stats);
                stats.add_commit(records, rows, dead_letters, files);
                stats.attributed += attributed;
            }
            locked(&shared.committed).insert(key.clone(), end + 1);
            if let Some(h) = &shared.hooks.on_commit {
                h(&CommitInfo {
                    stream: st.committer.describe().to_string(),
                    start,
                    end,
                    rows,
                    dead_letters,
                });
            }
        }
        CommitOutcome::Conflict { next } => {
            locked(&shared.stats).conflicts += 1;
            locked(&shared.committed).insert(key.clone(), next);
            st.dead_epoch = Some(epoch);
            st.buffer.discard();
            st.last_offset = next - 1;
            let _ = reports.send(Report::Conflict {
                key: key.clone(),
                epoch,
                next,
            });
        }
    }
    Ok(())
}

/// A partition's state folder (generation 0), relative to the store.
fn partition_state_rel(topic: &str, partition: i32) -> PathBuf {
    PathBuf::from("_ingest/kafka")
        .join(format!("topic={topic}"))
        .join(format!("partition={partition}"))
}

/// The newest generation of a partition's stream: the highest `generation=N` folder in its
/// state folder, 0 when there is none.
fn current_generation(store: &std::path::Path, topic: &str, partition: i32) -> Result<u32> {
    let dir = store.join(partition_state_rel(topic, partition));
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut newest = 0;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("generation="))
            .and_then(|n| n.parse::<u32>().ok())
        {
            newest = newest.max(n);
        }
    }
    Ok(newest)
}

/// The consumer context: positions assigned partitions from the store and commits
/// revoked ones before letting them go.
struct IngestContext {
    shared: Arc<Shared>,
}

impl ClientContext for IngestContext {
    /// `broadside_ingest_consumer_lag_records` per partition: the broker's last stable offset
    /// (the high watermark when no transaction is open) minus the store's next offset, for
    /// the partitions this process holds; 0 for the others it knows of (held by another
    /// member, or revoked), so a sum over processes counts each partition once.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let committed = locked(&self.shared.committed);
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let lag = match committed.get(&(topic.clone(), partition)) {
                    Some(&next) if p.ls_offset >= 0 => (p.ls_offset - next).max(0),
                    _ => 0,
                };
                metrics::gauge!(
                    "broadside_ingest_consumer_lag_records",
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(lag as f64);
            }
        }
    }

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
                let mut parts = locked(&sh.partitions);
                let assigned: Vec<Key> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (topic, partition) in assigned {
                    match sh.open_partition(consumer, &topic, partition) {
                        Ok((committer, start)) => {
                            let next = committer.next();
                            if let Err(e) = tpl.set_partition_offset(&topic, partition, start) {
                                sh.fail(Error::kafka(format!("topic {topic} partition {partition}: positioning at offset {start:?}"), e));
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
                            let key = (topic, partition);
                            let worker = sh.least_loaded(&parts);
                            let epoch = sh.epochs.fetch_add(1, Ordering::Relaxed);
                            sh.send(
                                worker,
                                Job::Open {
                                    key: key.clone(),
                                    committer: Box::new(committer),
                                },
                            );
                            parts.retain(|(k, _)| *k != key);
                            parts.push((
                                key,
                                PollState {
                                    worker,
                                    epoch,
                                    expected: next,
                                    chunk: Chunk::default(),
                                    unflushed_records: 0,
                                    unflushed_bytes: 0,
                                    first_at: None,
                                    last_at: None,
                                    metered_records: 0,
                                    metered_bytes: 0,
                                },
                            ));
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
                let revoked: Vec<Key> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let closing: Vec<(Key, PollState)> = {
                    let mut parts = locked(&sh.partitions);
                    let (closing, kept) = std::mem::take(&mut *parts)
                        .into_iter()
                        .partition(|(k, _)| revoked.contains(k));
                    *parts = kept;
                    closing
                };
                let mut offsets = TopicPartitionList::new();
                for (key, st) in closing {
                    let next = sh.close(&key, st, lost);
                    if let (false, Some(next)) = (lost, next) {
                        let _ = offsets.add_partition_offset(&key.0, key.1, Offset::Offset(next));
                    }
                    tracing::info!(topic = key.0, partition = key.1, "partition revoked");
                }
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
                let all = std::mem::take(&mut *locked(&sh.partitions));
                for (key, st) in all {
                    sh.close(&key, st, true);
                }
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs the ingest until `shutdown` is set (or, with `exit_when_idle_ms`, until the
/// topics are drained), committing everything buffered before returning.
///
/// The polling thread only copies records into per-partition chunks; writer threads
/// (`writers`, one per core by default) decode them, build Arrow batches, encode Parquet and
/// commit, each owning a set of partitions, so decoding and writing overlap with consuming.
///
/// Errors name the topic/partition or file involved. Records that cannot be decoded
/// are not errors: they go to `<store>/dead_letters/kafka/topic=T/partition=P/`.
pub fn run_kafka_ingest(
    cfg: &KafkaIngestConfig,
    hooks: IngestHooks,
    shutdown: &AtomicBool,
) -> Result<IngestStats> {
    cfg.validate()?;
    let writers = match cfg.writers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let (report_tx, reports) = channel();
    let mut queues = Vec::with_capacity(writers);
    let mut receivers = Vec::with_capacity(writers);
    for _ in 0..writers {
        let (tx, rx) = sync_channel(WRITER_QUEUE);
        queues.push(tx);
        receivers.push(rx);
    }
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        hooks,
        partitions: Mutex::new(Vec::new()),
        committed: Mutex::new(HashMap::new()),
        stats: Mutex::new(IngestStats::default()),
        failure: Mutex::new(None),
        workers: queues,
        epochs: AtomicU64::new(1),
        chunks: ChunkPool::default(),
        attribution: Attribution::new(&cfg.store),
    });
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| {
            let sh = Arc::clone(&shared);
            let tx = report_tx.clone();
            std::thread::Builder::new()
                .name(format!("ingest-writer-{i}"))
                .spawn(move || writer_loop(&sh, rx, tx))
                .map_err(|e| Error::io("spawning an ingest writer thread", e))
        })
        .collect::<Result<_>>()?;
    drop(report_tx);
    let result = consume(cfg, &shared, &reports, shutdown);
    for w in 0..shared.workers.len() {
        shared.send(w, Job::Exit);
    }
    for h in handles {
        let _ = h.join();
    }
    // A writer failing during the final commits reports it only now.
    let result = result.and_then(|()| {
        match reports.try_iter().find_map(|r| match r {
            Report::Failed(e) => Some(e),
            Report::Conflict { .. } => None,
        }) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    result?;
    let stats = locked(&shared.stats).clone();
    Ok(stats)
}

/// The polling loop of [`run_kafka_ingest`].
fn consume(
    cfg: &KafkaIngestConfig,
    shared: &Arc<Shared>,
    reports: &Receiver<Report>,
    shutdown: &AtomicBool,
) -> Result<()> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Eager protocols only: the rebalance callback assigns whole sets with offsets.
        .set("partition.assignment.strategy", "range,roundrobin")
        // A position the broker no longer has is an error, never a silent jump (see the
        // module docs); the position is checked against the watermarks on assignment.
        .set("auto.offset.reset", "error")
        // Records of aborted transactions are never ingested.
        .set("isolation.level", "read_committed")
        // librdkafka pauses a partition's fetching for this long once its local queue holds
        // `queued.min.messages` (100 000): 1 s by default, which stalls the ingest every time
        // it has drained a full queue (it drains 100 000 records in well under a second).
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        // librdkafka's statistics (every second) give each partition's last stable offset:
        // the consumer lag metric ([`IngestContext::stats`]).
        .set("statistics.interval.ms", "1000");
    for (k, v) in &cfg.kafka_options {
        cc.set(k, v);
    }
    let consumer: BaseConsumer<IngestContext> = cc
        .create_with_context(IngestContext {
            shared: Arc::clone(shared),
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
    let mut mirrored_commits = 0u64;
    let mut first_record = true;
    // The clock is read every CLOCK_EVERY records, not per record: on a VM the read costs
    // about 100 ns, a fifth of the polling thread's time. Timers are off by microseconds.
    const CLOCK_EVERY: u32 = 64;
    let mut now = Instant::now();
    let mut unclocked = 0u32;

    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            break Ok(());
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(e) = locked(&shared.failure).take() {
            break Err(e);
        }
        unclocked += 1;
        if unclocked >= CLOCK_EVERY || !matches!(polled, Some(Ok(_))) {
            now = Instant::now();
            unclocked = 0;
        }
        match polled {
            Some(Ok(msg)) => {
                last_record = now;
                let mut parts = locked(&shared.partitions);
                // A message for a partition we no longer own is a leftover of a revoke.
                let Some((key, st)) = parts
                    .iter_mut()
                    .find(|(k, _)| k.1 == msg.partition() && k.0 == msg.topic())
                else {
                    continue;
                };
                if msg.offset() < st.expected {
                    locked(&shared.stats).skipped_committed += 1;
                    continue;
                }
                if std::mem::take(&mut first_record) {
                    if let Some(h) = &shared.hooks.on_first_record {
                        h();
                    }
                }
                let payload = msg.payload().unwrap_or_default();
                st.chunk.push(msg.offset(), payload);
                st.expected = msg.offset() + 1;
                st.unflushed_records += 1;
                st.unflushed_bytes += payload.len();
                st.first_at.get_or_insert(now);
                st.last_at = Some(now);
                st.metered_records += 1;
                st.metered_bytes += payload.len() as u64;
                buffered_bytes += payload.len();
                if st.unflushed_records >= policy.max_records
                    || st.unflushed_bytes >= policy.max_bytes
                {
                    buffered_bytes = buffered_bytes.saturating_sub(st.unflushed_bytes);
                    shared.flush(key, st);
                } else if st.chunk.is_full() {
                    shared.hand_over(key, st);
                }
                if buffered_bytes >= policy.max_buffered_bytes {
                    for (key, st) in parts.iter_mut() {
                        shared.flush(key, st);
                    }
                    buffered_bytes = 0;
                }
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                // The position fell out of the partition's range while consuming (retention
                // caught up with it, or the topic was re-created): `auto.offset.reset=error`
                // stops here instead of jumping. A restart checks every partition on
                // assignment and names the gap (or records it with `--on-gap record`).
                break Err(Error::kafka(
                    format!(
                        "consuming {}: a partition's offset is out of range (records deleted \
                         or topic re-created); restart the ingest to see which partition and \
                         offsets",
                        cfg.topics.join(",")
                    ),
                    KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset),
                ));
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
        if let Err(e) = take_reports(&consumer, shared, reports, &mut buffered_bytes) {
            break Err(e);
        }
        if now.duration_since(last_timer_check) >= Duration::from_millis(50) {
            last_timer_check = now;
            let mut parts = locked(&shared.partitions);
            publish_metrics(&mut parts, buffered_bytes);
            for (key, st) in parts.iter_mut() {
                let due = match (st.first_at, st.last_at) {
                    (Some(first), Some(last)) => {
                        now.duration_since(first) >= max_latency || now.duration_since(last) >= idle
                    }
                    _ => false,
                };
                if due {
                    buffered_bytes = buffered_bytes.saturating_sub(st.unflushed_bytes);
                    shared.flush(key, st);
                }
            }
            if let Some(limit) = exit_idle {
                // Drained: nothing consumed is waiting, and the writers committed it all.
                let committed = locked(&shared.committed);
                let drained = parts.iter().all(|(k, st)| {
                    st.unflushed_records == 0 && committed.get(k) == Some(&st.expected)
                });
                if drained && now.duration_since(last_record) >= limit {
                    break Ok(());
                }
            }
        }
        let commits = locked(&shared.stats).commits;
        if commits != mirrored_commits {
            mirrored_commits = commits;
            commit_group_offsets(&consumer, shared);
        }
    };

    if result.is_ok() {
        let all = std::mem::take(&mut *locked(&shared.partitions));
        for (key, st) in all {
            let _ = shared.close(&key, st, false);
        }
        if let Some(e) = locked(&shared.failure).take() {
            return Err(e);
        }
    }
    commit_group_offsets(&consumer, shared);
    result?;
    consumer.unsubscribe();
    Ok(())
}

/// Publishes what the polling thread counted since the last call: records and bytes per
/// topic, and the bytes buffered.
fn publish_metrics(parts: &mut [(Key, PollState)], buffered_bytes: usize) {
    for ((topic, _), st) in parts.iter_mut() {
        if st.metered_records > 0 {
            let source = topic.clone();
            metrics::counter!("broadside_ingest_records_total", "source" => source.clone())
                .increment(std::mem::take(&mut st.metered_records));
            metrics::counter!("broadside_ingest_bytes_total", "source" => source)
                .increment(std::mem::take(&mut st.metered_bytes));
        }
    }
    metrics::gauge!("broadside_ingest_buffered_bytes").set(buffered_bytes as f64);
}

/// Handles the writers' reports: a conflict restarts the partition at the winner's end with
/// a new epoch; a failure stops the ingest.
fn take_reports(
    consumer: &BaseConsumer<IngestContext>,
    shared: &Shared,
    reports: &Receiver<Report>,
    buffered_bytes: &mut usize,
) -> Result<()> {
    for report in reports.try_iter() {
        let (key, epoch, next) = match report {
            Report::Failed(e) => return Err(e),
            Report::Conflict { key, epoch, next } => (key, epoch, next),
        };
        let mut parts = locked(&shared.partitions);
        let Some((_, st)) = parts.iter_mut().find(|(k, _)| *k == key) else {
            continue;
        };
        if st.epoch != epoch {
            continue;
        }
        *buffered_bytes = buffered_bytes.saturating_sub(st.unflushed_bytes);
        st.epoch = shared.epochs.fetch_add(1, Ordering::Relaxed);
        st.expected = next;
        st.chunk = Chunk::default();
        st.unflushed_records = 0;
        st.unflushed_bytes = 0;
        st.first_at = None;
        st.last_at = None;
        drop(parts);
        if let Err(e) = consumer.seek(&key.0, key.1, Offset::Offset(next), Duration::from_secs(10))
        {
            // Cannot reposition: stop rather than risk a gap; a restart resumes from the store.
            return Err(Error::kafka(
                format!(
                    "topic {} partition {}: seeking to offset {next}",
                    key.0, key.1
                ),
                e,
            ));
        }
    }
    Ok(())
}

/// Mirrors the store's positions into the group offsets (for lag monitoring only).
fn commit_group_offsets(consumer: &BaseConsumer<IngestContext>, shared: &Shared) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in locked(&shared.committed).iter() {
        if *next > 0 {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
    }
    if tpl.count() > 0 {
        match consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) | Err(KafkaError::ConsumerCommit(_)) => {}
            Err(e) => tracing::debug!(error = %e, "group offset commit failed"),
        }
    }
}
