//! `broadside send`: wires a campaign spec into the pipeline, with run records and resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use broadside_pipeline::model::{RecipientLayout, StdField};
use broadside_pipeline::run::{
    base_run_id, campaign_runs, DeliveredFile, FileFingerprint, RunLock, RunRecord, RunStatus,
};
use broadside_pipeline::runner::{self, Assigner, OrderedStage, Pipeline, RunStats, Sink};
use broadside_pipeline::spec::Dedupe;
use broadside_pipeline::spec::{CampaignSpec, SourceSpec};
use broadside_pipeline::stages::{
    BillingCap, Deduplicator, DuplicateResolver, SeenRecipients, Stage, SuppressionIndex,
    Suppressor, Validator, VariantSplitter,
};
use broadside_pipeline::store::StoreLayout;
use broadside_sinks::events::SubmittedEventSink;
use broadside_sinks::ifur::IfurEncoder;
use broadside_sinks::ledger::RecipientLogSink;
use broadside_sinks::megasys::{IfurWriter, IfurWriterConfig, ManifestWriter};
use broadside_sinks::text::KeyPacker;
use broadside_sources::suppression::{load_index_with, load_sent_keys, ListToLoad, LoadedList};
use broadside_sources::{open_source, SizeHint};
use chrono::Utc;
use xxhash_rust::xxh3::xxh3_64;

use crate::progress::Progress;
use broadside_campaigns::send_audience::{AudienceSource, SendAudience};

/// Options of one send.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// The spec file.
    pub spec: PathBuf,
    /// Resume (or name) this run.
    pub run_id: Option<String>,
    /// Decide everything, write nothing.
    pub dry_run: bool,
    /// Worker threads (default: available cores).
    pub workers: Option<usize>,
    /// Show a progress bar (stderr is a terminal).
    pub progress: bool,
    /// Read only this shard of an ERP source (`--shard I/N`); the run id gets a `-sIofN` suffix.
    pub shard: Option<broadside_pipeline::spec::Shard>,
    /// A sending's audience conditions: only matching rows of the source are recipients
    /// (see `crate::audience`).
    pub audience: Option<Vec<broadside_campaigns::audience::Condition>>,
    /// The fields conditions may use (default: `FieldMap::member_defaults`).
    pub audience_fields: Option<broadside_campaigns::audience::FieldMap>,
    /// What a new run does when the campaign already has runs.
    pub repeat: Repeat,
}

/// What a new run does when its (workspace, campaign) already has runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Repeat {
    /// Refuse, listing the earlier runs and the ways on (the default).
    #[default]
    Refuse,
    /// Send to everyone again (`--new-run`).
    NewRun,
    /// Skip, as `already_sent`, every key an earlier run sent (`--exclude-sent`); an error
    /// when there is no earlier run.
    ExcludeSent,
    /// As [`Repeat::ExcludeSent`], and a first run is simply a first run (campaign-service
    /// sendings).
    ExcludeSentIfAny,
}

/// A fresh run id: UTC time plus a random suffix.
fn new_run_id() -> String {
    let now = Utc::now();
    let salt = xxh3_64(
        format!(
            "{}-{}",
            now.timestamp_nanos_opt().unwrap_or(0),
            std::process::id()
        )
        .as_bytes(),
    );
    format!("{}-{:04x}", now.format("%Y%m%dT%H%M%S"), salt & 0xffff)
}

fn input_fingerprint(spec: &CampaignSpec) -> FileFingerprint {
    match &spec.source {
        SourceSpec::Csv(c) => FileFingerprint::of(&spec.resolve(&c.path)),
        SourceSpec::Parquet(p) => FileFingerprint::of(&spec.resolve(&p.path)),
        SourceSpec::Synthetic(s) => FileFingerprint::described(format!(
            "synthetic rows={} seed={} invalid_share={}",
            s.rows, s.seed, s.invalid_share
        )),
        SourceSpec::Erp(e) => FileFingerprint::described(broadside_sources::erp::fingerprint(e)),
    }
}

fn load_suppression(
    spec: &CampaignSpec,
    sent_before: Vec<LoadedList>,
) -> Result<(SuppressionIndex, Vec<FileFingerprint>, f64)> {
    let started = Instant::now();
    let paths: Vec<PathBuf> = spec
        .suppression
        .iter()
        .map(|l| spec.resolve(&l.path))
        .collect();
    let lowercase = spec.key_field() == StdField::Email;
    let lists: Vec<ListToLoad<'_>> = spec
        .suppression
        .iter()
        .zip(&paths)
        .map(|(l, p)| ListToLoad {
            path: p,
            column: &l.column,
            reason: l.reason.reason(),
            lowercase,
        })
        .collect();
    let index = load_index_with(&lists, sent_before).context("loading suppression lists")?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        keys = index.len(),
        lists = lists.len(),
        secs,
        "suppression index built"
    );
    Ok((
        index,
        paths.iter().map(|p| FileFingerprint::of(p)).collect(),
        secs,
    ))
}

/// Runs (or resumes) a send and returns its run record (a dry run saves nothing).
pub fn send(opts: &SendOptions) -> Result<RunRecord> {
    let (mut spec, audience) = load_spec(opts)?;
    let spec_text =
        std::fs::read(&opts.spec).with_context(|| format!("reading {}", opts.spec.display()))?;
    let spec_hash = format!("{:016x}", xxh3_64(&spec_text));
    let store = StoreLayout::new(spec.resolve(&spec.output.store));
    let run_id = run_id_of(opts)?;
    // Every log line of the send (its stage threads' included) carries these.
    let _span = tracing::info_span!(
        "send",
        workspace_id = %spec.workspace_id,
        campaign_id = %spec.campaign_id,
        run_id = %run_id
    )
    .entered();
    let record_path = store.run_record(&spec.workspace_id, &run_id);
    let input = input_fingerprint(&spec);
    if opts.repeat == Repeat::NewRun && opts.run_id.is_some() && record_path.exists() {
        bail!(
            "--new-run starts a new run, but run {run_id} exists: resume it with --run-id {run_id} alone, or name the new run differently"
        );
    }

    // Templates are configuration: checked before anything else.
    check_templates(&spec)?;
    let Claim {
        _run_lock,
        previous,
        campaign_lock,
    } = claim(opts, &spec, &store, &run_id, &record_path)?;
    let excluded = match &previous {
        Some(r) => r.excluded_runs.clone(),
        None => earlier_runs(opts, &spec, &store, &run_id)?,
    };
    let sent_before = sent_keys_of(&spec, &store, &excluded)?;

    // What the workspace's own events say, as a snapshot kept with the run: a resume decides
    // with the lists the run started with.
    let (_snapshot_scratch, store_suppression) =
        match spec.store_suppression && spec.key_field() == StdField::Email {
            true => {
                add_store_suppression(&mut spec, &store, &run_id, previous.is_some(), opts.dry_run)?
            }
            false => (Scratch(None), None),
        };
    let (index, list_prints, index_secs) = load_suppression(&spec, sent_before)?;
    // Open the source before recording anything: a bad mapping or a missing file is a
    // configuration error, not a failed run.
    let layout = Arc::new(spec.columns.layout());
    // Mail through a printer: settings, creatives and billing are checked before anything is
    // recorded (billing that is not ready fails closed here).
    let mail = crate::mail::MailPlan::load(&spec, &layout, &run_id)?.map(Arc::new);
    let (source, mut hint) = open_source(&spec, layout.clone())?;
    let source: Box<dyn broadside_pipeline::runner::Source> = match (&audience, &spec.source) {
        (Some(a), SourceSpec::Csv(_) | SourceSpec::Parquet(_) | SourceSpec::Synthetic(_)) => {
            // The file's row count is not the audience's: progress goes by bytes, or none.
            hint.total_rows = None;
            Box::new(AudienceSource::new(source, a.clone()))
        }
        _ => source,
    };
    let identity = RunIdentity {
        spec_hash,
        input,
        lists: list_prints,
        audience: audience.as_ref().map(|a| a.fingerprint().to_string()),
    };

    let mut record = match previous {
        Some(r) if r.status == RunStatus::Done => {
            println!(
                "run {run_id} is already done ({} recipients); nothing to do",
                r.rows
            );
            return Ok(r);
        }
        Some(r) => resumed(r, &spec, identity)?,
        None => new_record(&spec, &run_id, identity, excluded, store_suppression),
    };
    record.suppression_keys = index.len() as u64;
    record.suppression_build_secs = index_secs;
    if !opts.dry_run {
        record.save(&record_path)?;
        drop(campaign_lock);
        eprintln!("run {run_id}: started (resume with --run-id {run_id})");
    }

    let list_names: Vec<String> = index.lists().iter().map(|l| l.name.clone()).collect();
    let seen = seen_table(opts, &spec, &store, &run_id, &layout)?;
    let variants: Vec<(String, String)> = spec
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.template.clone()))
        .collect();
    let parallel = parallel_stages(
        &spec,
        &layout,
        mail.clone(),
        seen.clone(),
        Arc::new(index),
        opts.dry_run,
    );
    let run = RunOutputs {
        opts,
        spec: &spec,
        store: &store,
        run_id: &run_id,
        layout: &layout,
        variants: &variants,
    };
    let outputs = match run.open(mail.as_ref(), seen, list_names, &mut record) {
        Ok(o) => o,
        Err(e) => return Err(record_failure(&mut record, &record_path, e)),
    };

    let Outputs {
        ordered,
        sinks,
        delivered,
        manifest,
        printer,
    } = outputs;
    let stages = Stages {
        parallel,
        ordered,
        sinks,
        variants: spec.variants.len(),
    };
    let result = run_pipeline(opts, source, stages, hint);
    let stats = match result {
        Ok(stats) => stats,
        Err(e) if opts.dry_run => return Err(e.into()),
        Err(e) => return Err(record_failure(&mut record, &record_path, e.into())),
    };

    let handles = Committers {
        delivered,
        manifest,
        printer,
    };
    complete(
        opts,
        &store,
        record,
        &record_path,
        &stats,
        &variants,
        handles,
    )
}

/// The locks a run holds and its record, if it has one.
struct Claim {
    _run_lock: Option<RunLock>,
    /// The run's record when it exists: the send is a resume.
    previous: Option<RunRecord>,
    /// A new run's hold on its campaign until its record is written.
    campaign_lock: Option<RunLock>,
}

/// One process per run: a second one refuses at once, naming the holder. A new run also holds
/// its campaign's lock until its record exists, so two sends started together cannot both find
/// no earlier run. The run's record is read once, under its lock. A dry run holds nothing.
fn claim(
    opts: &SendOptions,
    spec: &CampaignSpec,
    store: &StoreLayout,
    run_id: &str,
    record_path: &Path,
) -> Result<Claim> {
    if opts.dry_run {
        return Ok(Claim {
            _run_lock: None,
            previous: None,
            campaign_lock: None,
        });
    }
    let run_lock = RunLock::acquire(
        &store.run_lock(&spec.workspace_id, run_id),
        &format!("run {run_id}"),
    )?;
    let previous = match record_path.exists() {
        true => Some(RunRecord::load(record_path)?),
        false => None,
    };
    let campaign_lock = match &previous {
        None => Some(RunLock::acquire(
            &store.campaign_lock(&spec.workspace_id, &spec.campaign_id),
            &format!("a new run of campaign {}", spec.campaign_id),
        )?),
        Some(_) => None,
    };
    Ok(Claim {
        _run_lock: Some(run_lock),
        previous,
        campaign_lock,
    })
}

/// What commits a run's outputs once the pipeline is through.
struct Committers {
    delivered: Option<Arc<Mutex<Vec<DeliveredFile>>>>,
    manifest: Option<ManifestWriter>,
    printer: Option<crate::mail::PrinterFinish>,
}

/// Ends a run whose pipeline succeeded: the ready signal comes after every output (IFUR
/// files, ledger, events) is committed, so a run that fails to commit its last ledger part
/// has no manifest; then the record is saved done, the staging folder removed and the
/// summary printed.
fn complete(
    opts: &SendOptions,
    store: &StoreLayout,
    mut record: RunRecord,
    record_path: &Path,
    stats: &RunStats,
    variants: &[(String, String)],
    c: Committers,
) -> Result<RunRecord> {
    let committed = c
        .manifest
        .as_ref()
        .map_or(Ok(()), |m| m.write().map_err(anyhow::Error::from))
        .and_then(|()| c.printer.as_ref().map_or(Ok(()), |p| p.finish()));
    if let Err(e) = committed {
        return Err(record_failure(&mut record, record_path, e));
    }
    record.apply_stats(stats, variants);
    if let Some(d) = c.delivered {
        record.files = d.lock().unwrap_or_else(|p| p.into_inner()).clone();
    }
    record.status = RunStatus::Done;
    record.finished_at = Some(Utc::now());
    if !opts.dry_run {
        metrics::counter!("broadside_send_runs_total", "outcome" => "done").increment(1);
        record.save(record_path)?;
        let staging = store.staging_dir(&record.run_id);
        if c.printer.is_some() {
            // The run is done: nothing will be submitted again.
            let _ = std::fs::remove_file(crate::mail::journal_path(&staging));
        }
        let _ = std::fs::remove_dir(staging);
    }
    print_summary(&record, stats, opts.dry_run);
    if let Some(p) = &c.printer {
        print_printer_summary(p);
    }
    Ok(record)
}

/// One message per person per run: the table every worker and the ordered path share, or
/// none with `dedupe = false`. Its working file of fingerprints lives beside the run records
/// (a dry run writes nothing in the store).
fn seen_table(
    opts: &SendOptions,
    spec: &CampaignSpec,
    store: &StoreLayout,
    run_id: &str,
    layout: &Arc<RecipientLayout>,
) -> Result<Option<Arc<SeenRecipients>>> {
    if spec.dedupe == Dedupe::Off {
        return Ok(None);
    }
    let work_dir = match opts.dry_run {
        true => std::env::temp_dir(),
        false => store.runs_dir(&spec.workspace_id),
    };
    Ok(Some(SeenRecipients::new(
        spec.dedupe,
        run_id,
        layout.clone(),
        &work_dir,
    )?))
}

/// The stages and sinks a run's batches pass through.
struct Stages {
    parallel: runner::StageFactory,
    ordered: Vec<Box<dyn OrderedStage>>,
    sinks: Vec<Box<dyn Sink>>,
    variants: usize,
}

/// Runs the pipeline on `--workers` threads (default: every core) with four batches per
/// worker in flight, reporting progress as the sequencer finishes rows.
fn run_pipeline(
    opts: &SendOptions,
    source: Box<dyn broadside_pipeline::runner::Source>,
    stages: Stages,
    hint: SizeHint,
) -> broadside_pipeline::Result<RunStats> {
    let workers = opts.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let counter = Arc::new(AtomicU64::new(0));
    let pipeline = Pipeline {
        source,
        parallel: stages.parallel,
        ordered: stages.ordered,
        sinks: stages.sinks,
        workers,
        in_flight: workers * 4 + 4,
        progress: counter.clone(),
        variants: stages.variants,
    };
    let _running = crate::progress::Running::start();
    with_progress(opts.progress, counter, hint, || runner::run(pipeline))
}

/// The campaign spec to send, with `--shard` and the sending's audience applied to its source:
/// the audience becomes a parameterised `WHERE` on the ERP query (part of its fingerprint), or
/// a filter on a file source's batches.
fn load_spec(opts: &SendOptions) -> Result<(CampaignSpec, Option<Arc<SendAudience>>)> {
    let mut spec = CampaignSpec::load(&opts.spec)?;
    if let Some(shard) = opts.shard {
        match &mut spec.source {
            SourceSpec::Erp(e) => e.shard = Some(shard),
            _ => bail!("--shard splits an ERP source by its key; this spec's source is not erp"),
        }
    }
    let audience = match &opts.audience {
        Some(conds) => {
            let allow = match &opts.audience_fields {
                Some(f) => f.clone(),
                None => broadside_campaigns::audience::FieldMap::member_defaults(),
            };
            Some(Arc::new(SendAudience::compile(
                conds,
                &allow,
                &spec.columns.layout(),
            )?))
        }
        None => None,
    };
    if let Some(a) = &audience {
        let erp = match &spec.source {
            SourceSpec::Erp(e) => Some(a.erp(&spec, e)),
            _ => None,
        };
        if let SourceSpec::Erp(e) = &mut spec.source {
            e.audience = erp;
        }
    }
    Ok((spec, audience))
}

/// The run's id: `--run-id` (letters, digits, `-`, `_`) or a new one. Each shard is its own
/// run (own record, ledger and IFUR files), named after its share.
fn run_id_of(opts: &SendOptions) -> Result<String> {
    let run_id = match &opts.run_id {
        Some(r) => {
            if r.is_empty()
                || !r
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!("--run-id {r:?} must be letters, digits, '-' or '_'");
            }
            r.clone()
        }
        None => new_run_id(),
    };
    Ok(match opts.shard {
        Some(s) => format!("{run_id}-s{}of{}", s.index, s.count),
        None => run_id,
    })
}

/// The keys each excluded earlier run sent, as suppression lists (reason `already_sent`).
fn sent_keys_of(
    spec: &CampaignSpec,
    store: &StoreLayout,
    excluded: &[String],
) -> Result<Vec<LoadedList>> {
    excluded
        .iter()
        .map(|r| {
            let dir = store.recipient_log_dir(&spec.workspace_id, &spec.campaign_id, r);
            Ok(LoadedList {
                name: r.clone(),
                reason: broadside_pipeline::model::Reason::AlreadySent,
                fingerprints: load_sent_keys(&dir)
                    .with_context(|| format!("reading the keys run {r} sent"))?,
            })
        })
        .collect()
}

/// What a run decides from, which a resume must find unchanged.
struct RunIdentity {
    spec_hash: String,
    input: FileFingerprint,
    lists: Vec<FileFingerprint>,
    audience: Option<String>,
}

/// The record of a run being resumed, once it is checked to decide from what it started with.
fn resumed(mut r: RunRecord, spec: &CampaignSpec, id: RunIdentity) -> Result<RunRecord> {
    let mut problems = Vec::new();
    if r.campaign_id != spec.campaign_id {
        problems.push(format!(
            "it belongs to campaign {}, not {}",
            r.campaign_id, spec.campaign_id
        ));
    }
    if r.spec_hash != id.spec_hash {
        problems.push("the campaign spec changed since the run started".to_string());
    }
    if r.input != id.input {
        problems.push(format!(
            "the input {} changed since the run started",
            id.input.path
        ));
    }
    if r.suppression_lists != id.lists {
        problems.push("a suppression list changed since the run started".to_string());
    }
    if r.audience != id.audience {
        problems.push("the sending's audience changed since the run started".to_string());
    }
    if !problems.is_empty() {
        bail!(broadside_pipeline::Error::Resume {
            run_id: r.run_id,
            message: problems.join("; ")
        });
    }
    tracing::info!(run_id = %r.run_id, attempt = r.attempts + 1, "resuming run");
    r.attempts += 1;
    r.status = RunStatus::Running;
    r.error = None;
    Ok(r)
}

/// The record of a new run.
fn new_record(
    spec: &CampaignSpec,
    run_id: &str,
    id: RunIdentity,
    excluded_runs: Vec<String>,
    store_suppression: Option<broadside_pipeline::run::StoreSuppression>,
) -> RunRecord {
    RunRecord {
        run_id: run_id.to_string(),
        campaign_id: spec.campaign_id.clone(),
        workspace_id: spec.workspace_id.clone(),
        status: RunStatus::Running,
        attempts: 1,
        started_at: Utc::now(),
        finished_at: None,
        spec_hash: id.spec_hash,
        input: id.input,
        suppression_lists: id.lists,
        suppression_snapshots: snapshot_ids(spec),
        audience: id.audience,
        rows: 0,
        decisions: Default::default(),
        reasons: Vec::new(),
        variants: Vec::new(),
        holdout: 0,
        suppression_keys: 0,
        suppression_build_secs: 0.0,
        files: Vec::new(),
        delivered_missing: Vec::new(),
        stages: Vec::new(),
        elapsed_secs: 0.0,
        rows_per_sec: 0.0,
        error: None,
        dedupe: Some(spec.dedupe.as_str().to_string()),
        excluded_runs,
        store_suppression,
    }
}

/// The stages every worker runs, in order: validate, enrichment (mail), deduplication,
/// suppression, the variant split, then proofing (mail) or IFUR encoding and key packing.
fn parallel_stages(
    spec: &CampaignSpec,
    layout: &Arc<RecipientLayout>,
    mail: Option<Arc<crate::mail::MailPlan>>,
    seen: Option<Arc<SeenRecipients>>,
    index: Arc<SuppressionIndex>,
    dry: bool,
) -> runner::StageFactory {
    let (spec, layout) = (spec.clone(), layout.clone());
    Box::new(move || {
        let mut stages: Vec<Box<dyn Stage>> = vec![Box::new(Validator::new(&spec, layout.clone()))];
        // Enriched addresses are suppressed and split like any other row.
        if let Some(e) = mail.as_ref().and_then(|p| {
            let rules = Validator::new(&spec, layout.clone());
            crate::mail::EnrichStage::new(p, rules, layout.clone())
        }) {
            stages.push(Box::new(e));
        }
        if let Some(seen) = &seen {
            stages.push(Box::new(Deduplicator::new(seen.clone())));
        }
        stages.push(Box::new(Suppressor::new(index.clone())));
        stages.push(Box::new(VariantSplitter::new(&spec)));
        if let Some(plan) = &mail {
            // Approval and proofing run in a dry run too: they explain who would be mailed.
            stages.push(Box::new(crate::mail::ProofStage::new(
                plan.clone(),
                layout.clone(),
            )));
        } else if !dry {
            stages.push(Box::new(IfurEncoder::new(layout.clone())));
            stages.push(Box::new(KeyPacker::new()));
        }
        stages
    })
}

/// The ordered stages and sinks of a run, and the handles that commit its outputs after it.
struct Outputs {
    ordered: Vec<Box<dyn OrderedStage>>,
    sinks: Vec<Box<dyn Sink>>,
    /// The IFUR files delivered so far (email).
    delivered: Option<Arc<Mutex<Vec<DeliveredFile>>>>,
    /// Writes the MegaSys manifest, the ready signal, once everything is committed (email).
    manifest: Option<ManifestWriter>,
    /// Finishes the printer submissions (mail).
    printer: Option<crate::mail::PrinterFinish>,
}

/// What the outputs of a run are opened from.
struct RunOutputs<'a> {
    opts: &'a SendOptions,
    spec: &'a CampaignSpec,
    store: &'a StoreLayout,
    run_id: &'a str,
    layout: &'a Arc<RecipientLayout>,
    variants: &'a [(String, String)],
}

impl RunOutputs<'_> {
    /// Opens the ordered path (duplicate resolution, the billing cap, assignment, then the
    /// printer or the IFUR writer) and the sinks (recipient log, submitted events). A dry run
    /// opens no output. Called once the run is recorded as running: an output that cannot be
    /// opened must mark it failed, not leave it looking like a send in progress.
    fn open(
        &self,
        mail: Option<&Arc<crate::mail::MailPlan>>,
        seen: Option<Arc<SeenRecipients>>,
        lists: Vec<String>,
        record: &mut RunRecord,
    ) -> Result<Outputs> {
        let (spec, store, run_id) = (self.spec, self.store, self.run_id);
        let cap = match mail {
            Some(plan) => plan.cap(spec.caps.billing_cap),
            None => spec.caps.billing_cap,
        };
        let mut out = Outputs {
            ordered: Vec::new(),
            sinks: Vec::new(),
            delivered: None,
            manifest: None,
            printer: None,
        };
        if let Some(seen) = seen {
            out.ordered.push(Box::new(DuplicateResolver::new(seen)));
        }
        out.ordered.push(Box::new(BillingCap::new(cap)));
        out.ordered.push(Box::new(Assigner));
        if self.opts.dry_run {
            return Ok(out);
        }
        match mail {
            Some(plan) => {
                let (stage, finish) = crate::mail::PrinterStage::new(
                    plan.clone(),
                    self.layout.clone(),
                    run_id,
                    &store.staging_dir(run_id),
                )?;
                out.ordered.push(Box::new(stage));
                out.printer = Some(finish);
            }
            None => {
                let hot = match &spec.megasys {
                    Some(m) => spec.resolve(&m.hot_folder),
                    None => store.root().join("outbox").join(format!("run_id={run_id}")),
                };
                let writer = IfurWriter::new(IfurWriterConfig {
                    campaign_id: spec.campaign_id.clone(),
                    run_id: run_id.to_string(),
                    workspace_id: spec.workspace_id.clone(),
                    variants: self.variants.to_vec(),
                    fields: self.layout.names().to_vec(),
                    roll_rows: spec.output.ifur_roll_rows,
                    staging: store.staging_dir(run_id),
                    hot_folder: hot,
                    deliveries: store.delivery_journal(&spec.workspace_id, run_id),
                })?;
                record.delivered_missing = writer.delivered_missing();
                out.delivered = Some(writer.delivered());
                out.manifest = Some(writer.manifest());
                out.ordered.push(Box::new(writer));
            }
        }
        let names: Vec<String> = self.variants.iter().map(|v| v.0.clone()).collect();
        out.sinks.push(Box::new(RecipientLogSink::new(
            &store.recipient_log_dir(&spec.workspace_id, &spec.campaign_id, run_id),
            spec.output.ledger_part_rows,
            names.clone(),
            lists,
        )?));
        out.sinks.push(Box::new(SubmittedEventSink::new(
            store.root(),
            &spec.workspace_id,
            &spec.campaign_id,
            run_id,
            names,
            record.started_at,
            spec.output.ledger_part_rows,
        )?));
        Ok(out)
    }
}

/// What the printer did, after the run's summary.
fn print_printer_summary(p: &crate::mail::PrinterFinish) {
    let s = p.summary.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "  printer: {} pieces submitted: {} pieces created, {} returned as made by an earlier attempt of this run; {} already printed by an earlier attempt (journal), {} failed",
        s.submitted, s.created, s.returned, s.journaled, s.failed
    );
    if let Some(l) = s.lob {
        println!(
            "  printer requests: {} ({} retries, {} rate limited, {} server errors, {} transport errors)",
            l.requests, l.retries, l.rate_limited, l.server_errors, l.transport_errors
        );
    }
}

/// The variants' template contents: every merge tag must be a column of the campaign (unknown
/// tags are listed with their lines), checked before anything is recorded.
pub fn check_templates(spec: &CampaignSpec) -> Result<Vec<(String, String)>> {
    let layout = spec.columns.layout();
    let columns: Vec<&str> = layout.names().iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for v in &spec.variants {
        let Some(path) = &v.content else { continue };
        let path = spec.resolve(path);
        let content = std::fs::read_to_string(&path)
            .with_context(|| format!("variant {}: template content {}", v.name, path.display()))?;
        broadside_campaigns::templates::check_merge_tags(&v.template, &content, &columns)
            .with_context(|| format!("variant {}: {}", v.name, path.display()))?;
        out.push((v.template.clone(), content));
    }
    Ok(out)
}

/// Records a run as failed with its error and says how to resume it; returns the error.
fn record_failure(record: &mut RunRecord, path: &Path, e: anyhow::Error) -> anyhow::Error {
    record.status = RunStatus::Failed;
    record.error = Some(e.to_string());
    metrics::counter!("broadside_send_runs_total", "outcome" => "failed").increment(1);
    if let Err(save) = record.save(path) {
        tracing::error!(error = %save, "could not record the failure");
    }
    let run_id = &record.run_id;
    eprintln!("run {run_id} failed; fix the cause and resume with --run-id {run_id}");
    e
}

/// A dry run's snapshot folder, removed when the send is done with it.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Builds (or, on resume, finds) the run's snapshot of the workspace's suppressions from the
/// store's events (`<store>/campaign_runs/workspace_id=W/<run>.suppression/`, a temporary
/// folder for a dry run) and adds its lists to the spec's.
fn add_store_suppression(
    spec: &mut CampaignSpec,
    store: &StoreLayout,
    run_id: &str,
    resuming: bool,
    dry_run: bool,
) -> Result<(Scratch, Option<broadside_pipeline::run::StoreSuppression>)> {
    use broadside_analytics::suppression::{
        build_suppression, SuppressionBuildConfig, SuppressionReason as Found, SuppressionSnapshot,
    };
    use broadside_pipeline::run::StoreSuppression;
    use broadside_pipeline::spec::{SuppressionListSpec, SuppressionReason};
    let record = store.run_record(&spec.workspace_id, run_id);
    let (dir, scratch) = match dry_run {
        true => {
            let d = std::env::temp_dir().join(format!(
                "broadside-suppression-{}-{run_id}",
                std::process::id()
            ));
            (d.clone(), Scratch(Some(d)))
        }
        false => (record.with_extension("suppression"), Scratch(None)),
    };
    // The lists are added to the spec, whose relative paths are the spec folder's.
    let dir = std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))?;
    let snapshot = dir.join("snapshot.json");
    // A resumed run keeps the snapshot it started with. Its record exists, so it had one,
    // unless it started without store suppression: then it goes on without.
    if resuming && !snapshot.is_file() {
        return Ok((scratch, None));
    }
    // A resumed run reads the snapshot it started with; a new one builds it.
    let (snap, build_secs) = if resuming {
        (SuppressionSnapshot::load(&snapshot)?, 0.0)
    } else {
        let started = Instant::now();
        let snap = build_suppression(&SuppressionBuildConfig {
            store: store.root().to_path_buf(),
            workspace_id: spec.workspace_id.clone(),
            out_dir: dir.clone(),
            bounce_csvs: Vec::new(),
            soft_bounces: Default::default(),
        })
        .with_context(|| {
            format!(
                "building the store's suppression snapshot in {}",
                dir.display()
            )
        })?;
        (snap, started.elapsed().as_secs_f64())
    };
    let c = snap.source_counts();
    let summary = StoreSuppression {
        snapshot_id: snap.snapshot_id.clone(),
        lists: snap
            .lists
            .iter()
            .map(|(r, l)| (r.as_str().to_string(), l.count))
            .collect(),
        event_rows: c.event_rows,
        event_files: c.event_files,
        historical_rows: c.historical_rows,
        historical_files: c.historical_files,
        blocklist_rows: c.blocklist_rows,
        blocklist_files: c.blocklist_files,
        build_secs,
    };
    if !resuming {
        let counts: Vec<String> = summary
            .lists
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        tracing::info!(
            snapshot = %summary.snapshot_id,
            lists = %counts.join(" "),
            event_files = c.event_files,
            historical_files = c.historical_files,
            blocklist_files = c.blocklist_files,
            secs = build_secs,
            "store suppression snapshot built"
        );
    }
    for found in Found::ALL {
        let reason = match found {
            Found::HardBounce => SuppressionReason::HardBounce,
            Found::Complaint => SuppressionReason::Complaint,
            Found::Unsubscribed => SuppressionReason::Unsubscribed,
            Found::SoftBounceRepeated => SuppressionReason::SoftBounceRepeated,
            Found::Blocklist => SuppressionReason::Blocklist,
        };
        // A resumed run started from a snapshot without this list decides without it.
        if !snap.lists.contains_key(&found) {
            continue;
        }
        spec.suppression.push(SuppressionListSpec {
            path: dir.join(found.file_name()),
            reason,
            column: "email".into(),
        });
    }
    Ok((scratch, Some(summary)))
}

/// The snapshot ids of `snapshot.json` files beside the spec's suppression lists.
fn snapshot_ids(spec: &CampaignSpec) -> Vec<String> {
    let mut ids: Vec<String> = spec
        .suppression
        .iter()
        .filter_map(|l| {
            let p = spec.resolve(&l.path).parent()?.join("snapshot.json");
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
            v.get("snapshot_id")?.as_str().map(String::from)
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The runs a new run must not repeat: refuses when the campaign has runs and the options
/// say nothing about them; returns the runs whose sent keys to skip (`--exclude-sent`).
fn earlier_runs(
    opts: &SendOptions,
    spec: &CampaignSpec,
    store: &StoreLayout,
    run_id: &str,
) -> Result<Vec<String>> {
    let base = base_run_id(run_id);
    // The other shards of this send are not earlier runs.
    let runs: Vec<RunRecord> =
        campaign_runs(&store.runs_dir(&spec.workspace_id), &spec.campaign_id)?
            .into_iter()
            .filter(|r| base_run_id(&r.run_id) != base)
            .collect();
    match opts.repeat {
        Repeat::NewRun => Ok(Vec::new()),
        Repeat::ExcludeSent | Repeat::ExcludeSentIfAny
            if runs.is_empty() && opts.repeat == Repeat::ExcludeSent =>
        {
            bail!(
                "--exclude-sent: campaign {} has no earlier run in workspace {} (store {}); send without it",
                spec.campaign_id,
                spec.workspace_id,
                store.root().display()
            )
        }
        Repeat::ExcludeSent | Repeat::ExcludeSentIfAny => {
            // A run still sending has not written all it will send: wait for it.
            for r in runs
                .iter()
                .filter(|r| r.status == RunStatus::Running && !opts.dry_run)
            {
                RunLock::acquire(
                    &store.run_lock(&spec.workspace_id, &r.run_id),
                    &format!("earlier run {} of campaign {}", r.run_id, spec.campaign_id),
                )
                .context("--exclude-sent needs every earlier run stopped")?;
            }
            Ok(runs.into_iter().map(|r| r.run_id).collect())
        }
        Repeat::Refuse if runs.is_empty() => Ok(Vec::new()),
        Repeat::Refuse if opts.dry_run => {
            eprintln!(
                "note: campaign {} already has {} run(s); a real send needs --run-id R, --new-run or --exclude-sent",
                spec.campaign_id,
                runs.len()
            );
            Ok(Vec::new())
        }
        Repeat::Refuse => {
            let mut msg = format!(
                "campaign {} in workspace {} already has {} run(s); sending again would mail its recipients again:\n",
                spec.campaign_id,
                spec.workspace_id,
                runs.len()
            );
            for r in &runs {
                let sent = r.decisions.get("sent").copied().unwrap_or(0);
                msg.push_str(&format!(
                    "  {:<28} {:<8} started {}  {} rows, {} sent\n",
                    r.run_id,
                    format!("{:?}", r.status).to_lowercase(),
                    r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    r.rows,
                    sent
                ));
            }
            let spec_path = opts.spec.display();
            msg.push_str(&format!(
                "choose one:\n  broadside send {spec_path} --run-id RUN      resume that run (a done run has nothing left)\n  broadside send {spec_path} --new-run         a new run that sends to everyone again\n  broadside send {spec_path} --exclude-sent    a new run that skips every key an earlier run sent"
            ));
            bail!(msg)
        }
    }
}

fn with_progress<T>(
    show: bool,
    counter: Arc<AtomicU64>,
    hint: SizeHint,
    f: impl FnOnce() -> T,
) -> T {
    let stop = Arc::new(AtomicBool::new(false));
    let span = tracing::Span::current();
    std::thread::scope(|s| {
        let stop2 = stop.clone();
        let reporter = s.spawn(move || {
            let _span = span.entered();
            let mut p = Progress::new(show, hint);
            let mut last_log = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_millis(200));
                let rows = counter.load(Ordering::Relaxed);
                p.update(rows);
                if !show && last_log.elapsed() >= Duration::from_secs(10) {
                    tracing::info!(rows, "send progress");
                    last_log = Instant::now();
                }
            }
            p.finish(counter.load(Ordering::Relaxed));
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        // Wake the reporter now rather than at its next tick: the scope waits for it, and a
        // send would otherwise end up to one tick (200 ms) after its work is done.
        reporter.thread().unpark();
        out
    })
}

fn print_summary(r: &RunRecord, stats: &RunStats, dry: bool) {
    let title = if dry {
        "dry run (nothing written)"
    } else {
        "run"
    };
    println!(
        "{title} {} of campaign {}: {} recipients in {:.2}s ({:.0} rows/s)",
        r.run_id, r.campaign_id, r.rows, stats.elapsed_secs, r.rows_per_sec
    );
    for (d, n) in &r.decisions {
        if *n == 0 {
            continue;
        }
        println!("  {d:<11} {n:>12}");
        for c in r
            .reasons
            .iter()
            .filter(|c| &c.decision == d && !c.reason.is_empty())
        {
            println!("    {:<16} {:>10}", c.reason, c.count);
        }
    }
    for v in &r.variants {
        println!(
            "  variant {:<8} {:>12} sent (template {})",
            v.name, v.sent, v.template
        );
    }
    if !r.files.is_empty() {
        println!("  {} IFUR files delivered", r.files.len());
    }
    println!(
        "  suppression index: {} keys built in {:.3}s",
        r.suppression_keys, r.suppression_build_secs
    );
    for s in &stats.stages {
        println!(
            "  stage {:<12} {:>12.0} rows/s busy  {:>8.2}s busy  {:>8.2}s blocked",
            s.name, s.rows_per_sec, s.busy_secs, s.blocked_secs
        );
    }
}

/// The path of a run record, for other commands.
pub fn record_path(spec_path: &Path, run_id: &str) -> Result<PathBuf> {
    let spec = CampaignSpec::load(spec_path)?;
    Ok(StoreLayout::new(spec.resolve(&spec.output.store)).run_record(&spec.workspace_id, run_id))
}
