//! The back-pressured runner: source → parallel stages → ordered stages → sinks.
//!
//! ```text
//!  source thread ──bounded──► N worker threads ──bounded──► sequencer ──bounded──► sink threads
//!  (reads batches)            (validate, suppress,          (reorders by seq,       (ledger, events:
//!                              split, encode: stateless)     cap, assign, IFUR)      one thread each)
//! ```
//!
//! A fixed number of batch permits bounds everything between the source and the sequencer, so
//! the reorder buffer and memory stay flat whatever the campaign size: a slow sink fills its
//! channel, which stalls the sequencer, which stops returning permits, which stalls the source.
//! Any error stops every thread; sinks are then aborted rather than finished, so nothing
//! partial is committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Decision, Reason, RecipientBatch, HOLDOUT_VARIANT};
pub use crate::stages::OrderedStage;
use crate::stages::Stage;

/// Produces recipient batches in input order.
pub trait Source: Send {
    /// File name or server, for messages.
    fn describe(&self) -> String;
    /// The next batch (its `seq` is set by the runner), or `None` at the end.
    fn next_batch(&mut self) -> Result<Option<RecipientBatch>>;

    /// The next unit of work. Sources whose decoding is costly (CSV) return raw input here,
    /// decoded by a worker thread, so the source thread only reads.
    fn next_item(&mut self) -> Result<Option<SourceItem>> {
        Ok(self.next_batch()?.map(|b| SourceItem::Ready(Box::new(b))))
    }
}

/// Decodes raw source input into a batch, on a worker thread.
pub type DecodeFn = Box<dyn FnOnce() -> Result<RecipientBatch> + Send>;

/// What a source hands the runner.
pub enum SourceItem {
    /// A decoded batch.
    Ready(Box<RecipientBatch>),
    /// Raw input and the function that decodes it. The decoded batch's `first_row` is
    /// assigned by the runner in sequence order.
    Raw(DecodeFn),
}

impl SourceItem {
    /// The batch, decoded here if it is raw (for callers that read a source directly rather
    /// than through the runner's workers).
    pub fn into_batch(self) -> Result<RecipientBatch> {
        match self {
            SourceItem::Ready(b) => Ok(*b),
            SourceItem::Raw(decode) => decode(),
        }
    }
}

struct Work {
    seq: u64,
    item: SourceItem,
}

/// Consumes decided batches in order, on its own thread.
pub trait Sink: Send {
    /// Sink name for stats.
    fn name(&self) -> &'static str;
    /// Writes one batch.
    fn write(&mut self, batch: &RecipientBatch) -> Result<()>;
    /// Commits everything after the last batch.
    fn finish(&mut self) -> Result<()>;
    /// Called instead of `finish` when the run failed: drop uncommitted work.
    fn abort(&mut self) {}
}

/// Makes the per-worker parallel stages (each worker gets its own instances).
pub type StageFactory = Box<dyn Fn() -> Vec<Box<dyn Stage>> + Send + Sync>;

/// Timing of one stage over the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageStats {
    /// Stage name.
    pub name: String,
    /// Rows the stage processed.
    pub rows: u64,
    /// Seconds spent inside the stage (summed over workers).
    pub busy_secs: f64,
    /// Rows per busy second.
    pub rows_per_sec: f64,
    /// Seconds the stage's thread waited for downstream capacity (back-pressure).
    pub blocked_secs: f64,
}

/// What a run decided.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Input rows.
    pub rows: u64,
    /// Rows per (decision, reason).
    pub counts: BTreeMap<(Decision, Reason), u64>,
    /// Sent rows per variant index.
    pub sent_per_variant: Vec<u64>,
    /// Holdout rows.
    pub holdout: u64,
    /// Per-stage timings, in pipeline order.
    pub stages: Vec<StageStats>,
    /// Wall-clock seconds.
    pub elapsed_secs: f64,
}

impl RunStats {
    /// Rows with a given decision.
    pub fn decided(&self, d: Decision) -> u64 {
        self.counts
            .iter()
            .filter(|((dd, _), _)| *dd == d)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Everything a run needs.
pub struct Pipeline {
    /// The recipients.
    pub source: Box<dyn Source>,
    /// Stateless stages run on worker threads.
    pub parallel: StageFactory,
    /// Stages run in sequence order on one thread (cap, assignment, IFUR writer).
    pub ordered: Vec<Box<dyn OrderedStage>>,
    /// Sinks, each on its own thread.
    pub sinks: Vec<Box<dyn Sink>>,
    /// Worker threads for the parallel stages.
    pub workers: usize,
    /// Batches allowed between the source and the sequencer (the memory bound).
    pub in_flight: usize,
    /// Incremented by the rows the sequencer has finished (for progress reporting).
    pub progress: Arc<AtomicU64>,
    /// Number of variants (for per-variant counts).
    pub variants: usize,
}

/// Turns pending rows into their final decision: holdout, or sent to their variant.
#[derive(Debug, Default, Clone)]
pub struct Assigner;

impl Stage for Assigner {
    fn name(&self) -> &'static str {
        "assign"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        for i in 0..batch.len() {
            if batch.decisions[i] != Decision::Pending {
                continue;
            }
            match batch.variants[i] {
                HOLDOUT_VARIANT => batch.decide(i, Decision::Holdout, Reason::Holdout),
                v if (v as usize) < 254 => batch.decide(i, Decision::Sent, Reason::None),
                _ => batch.decide(i, Decision::Errored, Reason::MissingKey),
            };
        }
        Ok(())
    }
}

impl OrderedStage for Assigner {}

/// The first error of a run. Recording it also closes the cancel channel, which wakes the
/// sequencer even when the batch it waits for will never come.
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<Error>>,
    cancel: Mutex<Option<Sender<()>>>,
}

impl Failure {
    fn new() -> (Self, Receiver<()>) {
        let (tx, rx) = bounded(1);
        let f = Failure {
            failed: AtomicBool::new(false),
            first: Mutex::new(None),
            cancel: Mutex::new(Some(tx)),
        };
        (f, rx)
    }

    fn set(&self, e: Error) {
        let mut g = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
        self.cancel.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

/// One thread's time per stage, also published as it goes (`broadside_send_stage_*`; the
/// metric handles are looked up once per stage and thread).
#[derive(Default)]
struct Timer {
    by_stage: HashMap<&'static str, StageTime>,
    order: Vec<&'static str>,
    blocked: Duration,
    /// The stage that ran last: waiting for downstream capacity is charged to it.
    last: &'static str,
    blocked_gauge: Option<(&'static str, metrics::Gauge)>,
}

struct StageTime {
    rows: u64,
    busy: Duration,
    rows_metric: metrics::Counter,
    busy_metric: metrics::Gauge,
}

impl Timer {
    fn add(&mut self, name: &'static str, rows: usize, d: Duration) {
        let e = self.by_stage.entry(name).or_insert_with(|| {
            self.order.push(name);
            StageTime {
                rows: 0,
                busy: Duration::ZERO,
                rows_metric: metrics::counter!("broadside_send_stage_rows_total", "stage" => name),
                busy_metric: metrics::gauge!("broadside_send_stage_busy_seconds", "stage" => name),
            }
        });
        e.rows += rows as u64;
        e.busy += d;
        e.rows_metric.increment(rows as u64);
        e.busy_metric.increment(d.as_secs_f64());
        self.last = name;
    }

    /// Time the thread waited for downstream capacity (or, for the source, for a permit).
    fn block(&mut self, d: Duration) {
        self.blocked += d;
        let stage = if self.last.is_empty() {
            "read"
        } else {
            self.last
        };
        if self.blocked_gauge.as_ref().is_none_or(|(n, _)| *n != stage) {
            let g = metrics::gauge!("broadside_send_stage_blocked_seconds", "stage" => stage);
            self.blocked_gauge = Some((stage, g));
        }
        if let Some((_, g)) = &self.blocked_gauge {
            g.increment(d.as_secs_f64());
        }
    }

    fn into_stats(self, blocked_name: &'static str) -> Vec<StageStats> {
        let mut out: Vec<StageStats> = self
            .order
            .iter()
            .map(|n| {
                let (rows, d) = (self.by_stage[n].rows, self.by_stage[n].busy);
                StageStats {
                    name: n.to_string(),
                    rows,
                    busy_secs: d.as_secs_f64(),
                    rows_per_sec: rows as f64 / d.as_secs_f64().max(1e-9),
                    blocked_secs: 0.0,
                }
            })
            .collect();
        if let Some(s) = out.iter_mut().find(|s| s.name == blocked_name) {
            s.blocked_secs = self.blocked.as_secs_f64();
        } else if let Some(last) = out.last_mut() {
            last.blocked_secs = self.blocked.as_secs_f64();
        }
        out
    }
}

/// Cells of a (decision, reason) tally.
const TALLY: usize = Decision::ALL.len() * Reason::ALL.len();

/// Rows per (decision, reason) of a run, counted per batch into a flat table and published
/// per batch as `broadside_send_rows_total`.
struct Decided {
    totals: Box<[u64; TALLY]>,
    counters: Vec<Option<metrics::Counter>>,
}

impl Default for Decided {
    fn default() -> Self {
        Decided {
            totals: Box::new([0; TALLY]),
            counters: vec![None; TALLY],
        }
    }
}

impl Decided {
    fn cell(i: usize) -> (Decision, Reason) {
        (
            Decision::ALL[i / Reason::ALL.len()],
            Reason::ALL[i % Reason::ALL.len()],
        )
    }

    fn add(&mut self, tally: &[u64; TALLY]) {
        for (i, &n) in tally.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.totals[i] += n;
            self.counters[i]
                .get_or_insert_with(|| {
                    let (d, r) = Decided::cell(i);
                    metrics::counter!(
                        "broadside_send_rows_total",
                        "decision" => d.as_str(),
                        "reason" => if r == Reason::None { "none" } else { r.as_str() }
                    )
                })
                .increment(n);
        }
    }

    fn counts(&self) -> BTreeMap<(Decision, Reason), u64> {
        self.totals
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, &n)| (Decided::cell(i), n))
            .collect()
    }
}

fn merge_stats(all: Vec<Vec<StageStats>>) -> Vec<StageStats> {
    let mut out: Vec<StageStats> = Vec::new();
    for stats in all {
        for s in stats {
            match out.iter_mut().find(|o| o.name == s.name) {
                Some(o) => {
                    o.rows += s.rows;
                    o.busy_secs += s.busy_secs;
                    o.blocked_secs += s.blocked_secs;
                }
                None => out.push(s),
            }
        }
    }
    for o in &mut out {
        o.rows_per_sec = o.rows as f64 / o.busy_secs.max(1e-9);
    }
    out
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A debug-level span around one stage's work on one batch (free when debug is off).
fn stage_span(stage: &'static str, rows: usize) -> tracing::span::EnteredSpan {
    tracing::debug_span!("stage", stage, rows).entered()
}

/// Spawns a named scoped thread (names show in `top -H`, profilers and panic messages).
fn named<'scope, 'env, F>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: String,
    f: F,
) -> std::thread::ScopedJoinHandle<'scope, Vec<StageStats>>
where
    F: FnOnce() -> Vec<StageStats> + Send + 'scope,
{
    // The thread's span is a child of the caller's (the send's), so its log lines carry the
    // run's ids.
    let span = tracing::info_span!("thread", thread = %name);
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || span.in_scope(f))
        .expect("spawning a pipeline thread")
}

/// Runs a pipeline to the end (or the first error).
pub fn run(p: Pipeline) -> Result<RunStats> {
    let started = Instant::now();
    let Pipeline {
        source,
        parallel,
        ordered,
        sinks,
        workers,
        in_flight,
        progress,
        variants,
    } = p;
    let workers = workers.max(1);
    let in_flight = in_flight.max(workers + 2);
    let (failure, cancel_rx) = Failure::new();
    let failure = Arc::new(failure);

    let (permit_tx, permit_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        permit_tx.send(()).expect("fresh channel");
    }
    let (work_tx, work_rx) = bounded::<Work>(workers * 2);
    let (done_tx, done_rx) = bounded::<RecipientBatch>(workers * 2);
    let (sink_txs, sink_rxs): (Vec<_>, Vec<_>) = sinks.iter().map(|_| bounded(4)).unzip();

    let mut stats = std::thread::scope(|scope| {
        let f = failure.clone();
        let source_handle = named(scope, "bs-source".into(), move || {
            read_source(source, permit_rx, work_tx, &f)
        });
        let worker_handles: Vec<_> = (0..workers)
            .map(|w| {
                let (rx, tx, f) = (work_rx.clone(), done_tx.clone(), failure.clone());
                let stages = parallel();
                named(scope, format!("bs-worker-{w}"), move || {
                    work(stages, rx, tx, &f)
                })
            })
            .collect();
        drop(work_rx);
        drop(done_tx);
        let sink_handles: Vec<_> = sinks
            .into_iter()
            .zip(sink_rxs)
            .map(|(sink, rx)| {
                let f = failure.clone();
                named(scope, format!("bs-{}", sink.name()), move || {
                    write_sink(sink, rx, &f)
                })
            })
            .collect();

        let sequencer = Sequencer {
            ordered,
            sink_txs,
            permit_tx,
            progress,
            failure: &failure,
        };
        let (mut rs, sequenced) = sequencer.run(done_rx, cancel_rx, variants);

        let join =
            |h: std::thread::ScopedJoinHandle<'_, Vec<StageStats>>, what: &str| match h.join() {
                Ok(s) => s,
                Err(p) => {
                    failure.set(Error::Stage {
                        stage: what.to_string(),
                        message: panic_message(p),
                    });
                    Vec::new()
                }
            };
        let mut all = vec![join(source_handle, "read")];
        all.extend(worker_handles.into_iter().map(|h| join(h, "worker")));
        all.push(sequenced);
        all.extend(sink_handles.into_iter().map(|h| join(h, "sink")));
        rs.stages = merge_stats(all);
        rs
    });

    if let Some(e) = failure
        .first
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    stats.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// The source thread: takes a permit for each item it reads (the permits bound the batches
/// between the source and the sequencer) and hands the item to the workers, numbered.
fn read_source(
    mut source: Box<dyn Source>,
    permits: Receiver<()>,
    work: Sender<Work>,
    failure: &Failure,
) -> Vec<StageStats> {
    let mut t = Timer::default();
    let mut seq = 0u64;
    loop {
        if failure.is_set() {
            break;
        }
        let w = Instant::now();
        if permits.recv().is_err() {
            break;
        }
        t.block(w.elapsed());
        let s = Instant::now();
        match source.next_item() {
            Ok(Some(item)) => {
                let rows = match &item {
                    SourceItem::Ready(b) => b.len(),
                    SourceItem::Raw(_) => 0,
                };
                t.add("read", rows, s.elapsed());
                let w = Instant::now();
                if work.send(Work { seq, item }).is_err() {
                    break;
                }
                t.block(w.elapsed());
                seq += 1;
            }
            Ok(None) => break,
            Err(e) => {
                failure.set(e);
                break;
            }
        }
    }
    t.into_stats("read")
}

/// A worker thread: decodes raw items and runs the parallel stages on each batch.
fn work(
    mut stages: Vec<Box<dyn Stage>>,
    items: Receiver<Work>,
    done: Sender<RecipientBatch>,
    failure: &Failure,
) -> Vec<StageStats> {
    let mut t = Timer::default();
    for work in items.iter() {
        if failure.is_set() {
            break;
        }
        let mut b = match work.item {
            SourceItem::Ready(b) => *b,
            SourceItem::Raw(decode) => {
                let s = Instant::now();
                match decode() {
                    Ok(b) => {
                        t.add("decode", b.len(), s.elapsed());
                        b
                    }
                    Err(e) => {
                        failure.set(e);
                        return t.into_stats("");
                    }
                }
            }
        };
        b.seq = work.seq;
        for st in stages.iter_mut() {
            let s = Instant::now();
            let _span = stage_span(st.name(), b.len());
            if let Err(e) = st.process(&mut b) {
                failure.set(e);
                return t.into_stats("");
            }
            t.add(st.name(), b.len(), s.elapsed());
        }
        let w = Instant::now();
        if done.send(b).is_err() {
            break;
        }
        t.block(w.elapsed());
    }
    t.into_stats("")
}

/// A sink thread: writes each decided batch, then commits (or aborts after any failure).
fn write_sink(
    mut sink: Box<dyn Sink>,
    batches: Receiver<Arc<RecipientBatch>>,
    failure: &Failure,
) -> Vec<StageStats> {
    let mut t = Timer::default();
    let name = sink.name();
    for b in batches.iter() {
        let s = Instant::now();
        let _span = stage_span(name, b.len());
        if let Err(e) = sink.write(&b) {
            failure.set(e);
            sink.abort();
            return t.into_stats(name);
        }
        t.add(name, b.len(), s.elapsed());
    }
    if failure.is_set() {
        sink.abort();
    } else {
        let s = Instant::now();
        match sink.finish() {
            Ok(()) => t.add(name, 0, s.elapsed()),
            Err(e) => failure.set(e),
        }
    }
    t.into_stats(name)
}

/// The ordered path, on the calling thread: puts the workers' batches back in input order,
/// runs the ordered stages on each, counts decisions and passes each batch to every sink.
struct Sequencer<'a> {
    ordered: Vec<Box<dyn OrderedStage>>,
    sink_txs: Vec<Sender<Arc<RecipientBatch>>>,
    permit_tx: Sender<()>,
    progress: Arc<AtomicU64>,
    failure: &'a Failure,
}

impl Sequencer<'_> {
    /// Runs until the workers are done or the run failed; returns the run's counts and the
    /// sequencer's own stage times. Finishes the ordered stages on success, aborts them
    /// otherwise, and closes the sinks' channels either way.
    fn run(
        mut self,
        done: Receiver<RecipientBatch>,
        cancel: Receiver<()>,
        variants: usize,
    ) -> (RunStats, Vec<StageStats>) {
        let mut t = Timer::default();
        let mut pending: BTreeMap<u64, RecipientBatch> = BTreeMap::new();
        let mut next = 0u64;
        let mut rs = RunStats {
            sent_per_variant: vec![0; variants],
            ..RunStats::default()
        };
        let mut decided = Decided::default();
        'outer: loop {
            let b = crossbeam_channel::select! {
                recv(done) -> b => match b {
                    Ok(b) => b,
                    Err(_) => break 'outer,
                },
                recv(cancel) -> _ => break 'outer,
            };
            pending.insert(b.seq, b);
            while let Some(mut b) = pending.remove(&next) {
                next += 1;
                if self.failure.is_set() {
                    break 'outer;
                }
                b.first_row = rs.rows;
                if !self.order(&mut b, &mut t) {
                    break 'outer;
                }
                rs.rows += b.len() as u64;
                decided.add(&count(&b, &mut rs));
                self.progress.fetch_add(b.len() as u64, Ordering::Relaxed);
                let shared = Arc::new(b);
                for tx in &self.sink_txs {
                    let w = Instant::now();
                    if tx.send(shared.clone()).is_err() {
                        break 'outer;
                    }
                    t.block(w.elapsed());
                }
                // The batch is out of the reorder window: let the source read another.
                let _ = self.permit_tx.send(());
            }
        }
        rs.counts = decided.counts();
        drop(done);
        if !self.failure.is_set() && !pending.is_empty() {
            self.failure.set(Error::Stage {
                stage: "sequencer".into(),
                message: format!("{} batches never became contiguous", pending.len()),
            });
        }
        self.close(&mut t);
        (rs, t.into_stats(""))
    }

    /// Runs the ordered stages on one batch; false when one failed (the failure is recorded).
    fn order(&mut self, b: &mut RecipientBatch, t: &mut Timer) -> bool {
        for st in self.ordered.iter_mut() {
            let s = Instant::now();
            let _span = stage_span(st.name(), b.len());
            if let Err(e) = st.process(b) {
                self.failure.set(e);
                return false;
            }
            t.add(st.name(), b.len(), s.elapsed());
        }
        true
    }

    /// Finishes the ordered stages (or aborts them after a failure) and lets the sinks end.
    fn close(mut self, t: &mut Timer) {
        drop(self.permit_tx);
        if !self.failure.is_set() {
            for st in self.ordered.iter_mut() {
                let s = Instant::now();
                if let Err(e) = st.finish() {
                    self.failure.set(e);
                    break;
                }
                t.add(st.name(), 0, s.elapsed());
            }
        }
        if self.failure.is_set() {
            for st in self.ordered.iter_mut() {
                st.abort();
            }
        }
        drop(self.sink_txs);
    }
}

/// The batch's rows per (decision, reason) cell; adds its sent rows per variant and its
/// holdout rows to `rs`.
fn count(b: &RecipientBatch, rs: &mut RunStats) -> [u64; TALLY] {
    let mut tally = [0u64; TALLY];
    for i in 0..b.len() {
        tally[b.decisions[i] as usize * Reason::ALL.len() + b.reasons[i] as usize] += 1;
        match b.decisions[i] {
            Decision::Sent => {
                if let Some(c) = rs.sent_per_variant.get_mut(b.variants[i] as usize) {
                    *c += 1;
                }
            }
            Decision::Holdout => rs.holdout += 1,
            _ => {}
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_cells_map_back_to_their_decision_and_reason() {
        for d in Decision::ALL {
            for r in Reason::ALL {
                let i = d as usize * Reason::ALL.len() + r as usize;
                assert_eq!(Decided::cell(i), (d, r));
            }
        }
    }
}
