//! The mail channel's printer path in `broadside send` (docs/printers.md, "In `broadside send`").
//!
//! With a `[printer]` table, mail recipients go to a printer instead of IFUR files:
//!
//! - **preflight** ([`MailPlan::load`]): the printer settings, approval rules, creative
//!   templates (every merge tag must be a column of the campaign) and billing are checked
//!   before anything is recorded; billing that is not ready fails closed
//!   (`BILLING_NOT_READY`), and the account's remaining recipient cap joins the spec's.
//! - **proofing** ([`ProofStage`], on the worker threads): approval rules (a refused address
//!   is `skipped` / `printer_approval_failed` with every failed rule in `detail`), then the
//!   creative rendered per recipient (`errored` / `could_not_generate_creative`), serialised
//!   as the printer's request body into the batch's payload.
//! - **printing** ([`PrinterStage`], ordered, after the cap): the batch's `sent` rows are
//!   submitted (Lob: concurrently, limited by the client; batch files: appended), each
//!   outcome journaled, and each row's final recipient state is computed by walking the
//!   state machine, so an undocumented path fails loudly.
//!
//! Pieces belong to their run: keys are derived from workspace + campaign + run + recipient
//! (`piece_key`), and each piece's metadata names the run and this attempt
//! ([`PieceOwner`]). A piece the printer answers with is counted `created` (this attempt made
//! it) or `returned` (an earlier attempt of the run did); one made for another run fails the
//! send with an error naming that run, and its row is recorded nothing, never `Sent`.
//!
//! Resume: a row in the journal (`<staging>/printer-journal.tsv`, fsynced per batch) is not
//! submitted again; any other row is, and its idempotency key makes the printer return the
//! piece an earlier attempt made instead of printing a second.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use arrow_array::Array;
use broadside_pipeline::model::{
    Decision, Reason, RecipientBatch, RecipientLayout, StdField, HOLDOUT_VARIANT,
};
use broadside_pipeline::runner::OrderedStage;
use broadside_pipeline::spec::{CampaignSpec, Channel};
use broadside_pipeline::stages::{Stage, Validator};
use broadside_printers::approval::{Approval, ApprovalRules};
use broadside_printers::batch::{BatchConfig, BatchPrinter};
use broadside_printers::billing::{self, BillingAccount, RecipientCap};
use broadside_printers::enrichment::{EnrichmentClient, EnrichmentConfig, EnrichmentRecord};
use broadside_printers::lob::{
    Creative, IdempotencyKey, LobClient, LobConfig, MailPiece, Origin, PieceOwner, PreparedPiece,
    PrinterStatsSnapshot, RunScope, SubmitError,
};
use broadside_printers::proof::Template;
use broadside_printers::state::{RecipientState, SkipReason};
use broadside_printers::Address;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which kind of printer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrinterKind {
    /// A Lob-compatible HTTP API (`[printer.lob]`).
    Lob,
    /// CSV batches dropped in a folder (`[printer.batch]`).
    Batch,
}

/// What is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PieceKind {
    /// Front and back HTML.
    #[default]
    Postcard,
    /// One HTML file.
    Letter,
}

/// One creative's template files (relative to the spec).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreativeSpec {
    /// Postcard front.
    pub front: Option<PathBuf>,
    /// Postcard back.
    pub back: Option<PathBuf>,
    /// Postcard size (`4x6`, `6x9`, `6x11`).
    pub size: Option<String>,
    /// Letter file.
    pub file: Option<PathBuf>,
    /// Letter in colour.
    #[serde(default)]
    pub color: bool,
}

/// Approval rules: a preset name or a rules table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ApprovalSpec {
    /// `"lob_us"` or `"none"`.
    Preset(String),
    /// An inline table (docs/printers.md, "Approval rules").
    Rules(ApprovalRules),
}

/// The `[printer]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrinterSpec {
    /// `lob` or `batch`.
    pub kind: PrinterKind,
    /// `postcard` (default) or `letter`.
    #[serde(default)]
    pub piece: PieceKind,
    /// The default creative.
    #[serde(default)]
    pub creative: CreativeSpec,
    /// Creatives by variant template name (a variant without one uses `creative`).
    #[serde(default)]
    pub creatives: BTreeMap<String, CreativeSpec>,
    /// Approval rules (default `lob_us` for Lob, none for batch printers).
    pub approval: Option<ApprovalSpec>,
    /// Return address (Lob needs one for letters).
    pub from: Option<Address>,
    /// Lob's `send_date`: a future date or RFC 3339 time holds the pieces until then
    /// (recipient state `Scheduled`).
    pub send_date: Option<String>,
    /// The Lob client settings.
    pub lob: Option<LobConfig>,
    /// The batch printer settings.
    pub batch: Option<BatchConfig>,
    /// The billing account; absent fails closed.
    pub billing: Option<BillingAccount>,
    /// Address enrichment for recipients without address1 (absent: they are skipped).
    pub enrichment: Option<EnrichmentConfig>,
}

/// One variant's parsed creative.
#[derive(Debug, Clone)]
enum CreativeTemplates {
    Postcard {
        front: Template,
        back: Template,
        size: Option<String>,
    },
    Letter {
        file: Template,
        color: bool,
    },
}

/// Everything the mail path needs, checked before the run starts.
pub struct MailPlan {
    /// The printer kind.
    pub kind: PrinterKind,
    campaign_id: String,
    /// The run and this attempt of it: pieces' keys and metadata.
    owner: PieceOwner,
    /// One per variant, in spec order (None for a batch printer without a creative).
    creatives: Vec<Option<CreativeTemplates>>,
    variant_names: Vec<String>,
    approval: ApprovalRules,
    from: Option<Address>,
    send_date: Option<String>,
    /// Whether `send_date` is in the future (pieces become `Scheduled`).
    scheduled: bool,
    lob: Option<(LobConfig, String)>,
    batch: Option<BatchConfig>,
    /// The enrichment provider and its token.
    enrichment: Option<(EnrichmentConfig, String)>,
    /// The account's remaining recipients, when capped.
    pub billing_remaining: Option<u64>,
}

impl std::fmt::Debug for MailPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailPlan")
            .field("kind", &self.kind)
            .field("campaign_id", &self.campaign_id)
            .finish_non_exhaustive()
    }
}

fn read_template(spec: &CampaignSpec, path: &Path, known: &[String]) -> Result<Template> {
    let full = spec.resolve(path);
    let html = std::fs::read_to_string(&full)
        .with_context(|| format!("printer creative {}", full.display()))?;
    let t = Template::parse(&html)
        .map_err(|e| anyhow::anyhow!("printer creative {}: {e}", full.display()))?;
    let unknown: Vec<&str> = t
        .tags()
        .into_iter()
        .filter(|tag| !known.iter().any(|k| k == tag))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "printer creative {}: merge tags that are no column of the campaign: {} (columns: {})",
            full.display(),
            unknown.join(", "),
            known.join(", ")
        );
    }
    Ok(t)
}

impl MailPlan {
    /// Reads and checks the spec's `[printer]` table; `None` when there is none.
    pub fn load(
        spec: &CampaignSpec,
        layout: &RecipientLayout,
        run_id: &str,
    ) -> Result<Option<MailPlan>> {
        let Some(table) = &spec.printer else {
            return Ok(None);
        };
        if spec.channel != Channel::Mail {
            bail!("[printer] is for the mail channel");
        }
        let ps: PrinterSpec = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e| anyhow::anyhow!("[printer]: {e}"))?;
        let mut problems = Vec::new();
        let (lob, batch) = printer_settings(&ps, spec, &mut problems);
        let approval = approval_rules(&ps, &mut problems);
        let enrichment = enrichment_settings(&ps, &mut problems);
        if ps.kind == PrinterKind::Lob && ps.piece == PieceKind::Letter && ps.from.is_none() {
            problems.push("[printer] from: a return address is needed for letters".into());
        }
        let scheduled = match &ps.send_date {
            None => false,
            Some(d) => match parse_send_date(d) {
                Some(t) => t > chrono::Utc::now(),
                None => {
                    problems.push(format!(
                        "[printer] send_date {d:?}: expected YYYY-MM-DD or an RFC 3339 time"
                    ));
                    false
                }
            },
        };
        if !problems.is_empty() {
            bail!("[printer] is not usable:\n  - {}", problems.join("\n  - "));
        }

        let creatives = creatives(spec, &ps, layout)?;

        // Billing fails closed: no account, or one that cannot pay, stops the campaign here.
        if let Err(e) = billing::preflight(ps.billing.as_ref()) {
            bail!("{}: {e}", e.code());
        }
        let billing_remaining = ps
            .billing
            .as_ref()
            .and_then(|a| RecipientCap::new(a).remaining());

        Ok(Some(MailPlan {
            kind: ps.kind,
            campaign_id: spec.campaign_id.clone(),
            owner: PieceOwner {
                run: RunScope {
                    workspace_id: spec.workspace_id.clone(),
                    campaign_id: spec.campaign_id.clone(),
                    run_id: run_id.to_string(),
                },
                attempt_id: attempt_id(),
            },
            creatives,
            variant_names: spec.variants.iter().map(|v| v.name.clone()).collect(),
            approval,
            from: ps.from,
            send_date: ps.send_date,
            scheduled,
            lob,
            batch,
            enrichment,
            billing_remaining,
        }))
    }

    /// The cap for the run: the spec's and the account's, whichever is lower.
    pub fn cap(&self, spec_cap: Option<u64>) -> Option<u64> {
        match (spec_cap, self.billing_remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// An id for this attempt of the run (this process): time and process id, hashed. Only its
/// difference from other attempts' ids matters.
fn attempt_id() -> String {
    let now = chrono::Utc::now();
    let salt = xxhash_rust::xxh3::xxh3_64(
        format!(
            "{}-{}",
            now.timestamp_nanos_opt().unwrap_or(0),
            std::process::id()
        )
        .as_bytes(),
    );
    format!("{}-{:08x}", now.format("%Y%m%dT%H%M%S"), salt & 0xffff_ffff)
}

/// The Lob client's settings and API key, or the batch printer's settings (its folder
/// resolved against the spec), as the printer kind asks; problems are added to `problems`.
fn printer_settings(
    ps: &PrinterSpec,
    spec: &CampaignSpec,
    problems: &mut Vec<String>,
) -> (Option<(LobConfig, String)>, Option<BatchConfig>) {
    let lob = match ps.kind {
        PrinterKind::Lob => match &ps.lob {
            None => {
                problems.push("[printer.lob] is needed for kind = \"lob\"".to_string());
                None
            }
            Some(cfg) => {
                if let Err(p) = cfg.validate() {
                    problems.extend(p.into_iter().map(|p| format!("[printer.lob] {p}")));
                }
                secret(&cfg.api_key_env, "[printer.lob] the API key", problems)
                    .map(|k| (cfg.clone(), k))
            }
        },
        PrinterKind::Batch => None,
    };
    let batch = match ps.kind {
        PrinterKind::Batch => match &ps.batch {
            None => {
                problems.push("[printer.batch] is needed for kind = \"batch\"".to_string());
                None
            }
            Some(b) => {
                let mut b = b.clone();
                b.folder = spec.resolve(&b.folder);
                if !b.folder.is_dir() {
                    problems.push(format!(
                        "[printer.batch] folder {} is not a folder",
                        b.folder.display()
                    ));
                }
                Some(b)
            }
        },
        PrinterKind::Lob => None,
    };
    (lob, batch)
}

/// The approval rules: the preset or table the spec gives, else Lob's US rules for Lob and
/// none for batch files; problems are added to `problems`.
fn approval_rules(ps: &PrinterSpec, problems: &mut Vec<String>) -> ApprovalRules {
    let approval = match &ps.approval {
        None if ps.kind == PrinterKind::Lob => ApprovalRules::lob_us(),
        None => ApprovalRules::default(),
        Some(ApprovalSpec::Preset(p)) if p == "lob_us" => ApprovalRules::lob_us(),
        Some(ApprovalSpec::Preset(p)) if p == "none" => ApprovalRules::default(),
        Some(ApprovalSpec::Preset(p)) => {
            problems.push(format!(
                "[printer] approval = {p:?}: presets are \"lob_us\" and \"none\", or give a table"
            ));
            ApprovalRules::default()
        }
        Some(ApprovalSpec::Rules(r)) => r.clone(),
    };
    if let Err(p) = approval.validate() {
        problems.extend(p.into_iter().map(|p| format!("[printer.approval] {p}")));
    }
    approval
}

/// The address enrichment provider's settings and token, checked by building a client;
/// problems are added to `problems`.
fn enrichment_settings(
    ps: &PrinterSpec,
    problems: &mut Vec<String>,
) -> Option<(EnrichmentConfig, String)> {
    let enrichment = match &ps.enrichment {
        None => None,
        Some(cfg) => {
            let token = secret(&cfg.token_env, "[printer.enrichment] the token", problems);
            // Building a client checks every setting.
            if let Some(Err(e)) = token.as_ref().map(|t| {
                EnrichmentClient::new(
                    cfg.clone(),
                    t,
                    Arc::new(broadside_printers::lob::TokioPause),
                )
            }) {
                problems.push(format!("[printer.enrichment] {e}"));
            }
            token.map(|t| (cfg.clone(), t))
        }
    };
    enrichment
}

/// Each variant's creative templates (none for a batch printer without one): every merge
/// tag must be a column.
fn creatives(
    spec: &CampaignSpec,
    ps: &PrinterSpec,
    layout: &RecipientLayout,
) -> Result<Vec<Option<CreativeTemplates>>> {
    // Creatives: every merge tag must be a column.
    let known: Vec<String> = layout.names().to_vec();
    let mut creatives = Vec::new();
    for v in &spec.variants {
        let c = ps.creatives.get(&v.template).unwrap_or(&ps.creative);
        let empty = c.front.is_none() && c.back.is_none() && c.file.is_none();
        if empty && ps.kind == PrinterKind::Batch {
            creatives.push(None);
            continue;
        }
        let t = match ps.piece {
            PieceKind::Postcard => {
                let (Some(front), Some(back)) = (&c.front, &c.back) else {
                    bail!(
                        "[printer] variant {}: a postcard needs creative front and back",
                        v.name
                    );
                };
                CreativeTemplates::Postcard {
                    front: read_template(spec, front, &known)?,
                    back: read_template(spec, back, &known)?,
                    size: c.size.clone(),
                }
            }
            PieceKind::Letter => {
                let Some(file) = &c.file else {
                    bail!("[printer] variant {}: a letter needs creative file", v.name);
                };
                CreativeTemplates::Letter {
                    file: read_template(spec, file, &known)?,
                    color: c.color,
                }
            }
        };
        creatives.push(Some(t));
    }
    Ok(creatives)
}

/// The secret in environment variable `var`, or `None` with a problem saying `what` is read
/// from it and it is not set.
fn secret(var: &str, what: &str, problems: &mut Vec<String>) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            problems.push(format!("{what} is read from ${var}, which is not set"));
            None
        }
    }
}

fn parse_send_date(d: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(d) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let day = chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()?;
    Some(day.and_hms_opt(0, 0, 0)?.and_utc())
}

/// The idempotency key of a recipient's piece: workspace + campaign + run + recipient key
/// (piece `mail`), so a recipient gets one piece per run whatever attempt or machine submits
/// it, and no other run, campaign or workspace shares the key.
fn piece_key(run: &RunScope, recipient: &str) -> IdempotencyKey {
    run.key(recipient, "mail")
}

/// A row's value in batch column `idx`, unless null or empty.
fn text(b: &RecipientBatch, idx: usize, row: usize) -> Option<&str> {
    let col = b.column(idx);
    (col.is_valid(row) && !col.value(row).is_empty()).then(|| col.value(row))
}

/// A row's value of a standard field, unless unmapped, null or empty.
fn cell(b: &RecipientBatch, layout: &RecipientLayout, f: StdField, row: usize) -> Option<String> {
    text(b, layout.index(f)?, row).map(str::to_string)
}

/// A row's address, named as Lob names it (name = first and last name).
fn address(b: &RecipientBatch, layout: &RecipientLayout, row: usize) -> Address {
    let name = [StdField::FirstName, StdField::LastName]
        .iter()
        .filter_map(|f| cell(b, layout, *f, row))
        .collect::<Vec<_>>()
        .join(" ");
    let company = layout
        .names()
        .iter()
        .position(|n| n == "company")
        .and_then(|i| text(b, i, row))
        .map(str::to_string);
    Address {
        name: (!name.is_empty()).then_some(name),
        company,
        address_line1: cell(b, layout, StdField::Address1, row),
        address_line2: cell(b, layout, StdField::Address2, row),
        address_city: cell(b, layout, StdField::City, row),
        address_state: cell(b, layout, StdField::State, row),
        address_zip: cell(b, layout, StdField::Zip, row),
        address_country: cell(b, layout, StdField::Country, row),
    }
}

/// Every non-empty column of a row, as merge variables.
fn merge_vars(b: &RecipientBatch, layout: &RecipientLayout, row: usize) -> Map<String, Value> {
    let mut vars = Map::new();
    for (i, name) in layout.names().iter().enumerate() {
        if let Some(v) = text(b, i, row) {
            vars.insert(name.clone(), Value::String(v.to_string()));
        }
    }
    vars
}

/// Approval and proofing, on the worker threads (see the module docs).
pub struct ProofStage {
    plan: Arc<MailPlan>,
    layout: Arc<RecipientLayout>,
}

impl ProofStage {
    /// A stage for one worker.
    pub fn new(plan: Arc<MailPlan>, layout: Arc<RecipientLayout>) -> Self {
        ProofStage { plan, layout }
    }

    fn piece(
        &self,
        b: &RecipientBatch,
        row: usize,
        to: Address,
        variant: usize,
    ) -> std::result::Result<Option<PreparedPiece>, String> {
        let Some(creative) = &self.plan.creatives[variant] else {
            return Ok(None);
        };
        let vars = merge_vars(b, &self.layout, row);
        let render = |t: &Template| t.render(&vars).map_err(|e| e.to_string());
        let creative = match creative {
            CreativeTemplates::Postcard { front, back, size } => Creative::Postcard {
                front: render(front)?,
                back: render(back)?,
                size: size.clone(),
            },
            CreativeTemplates::Letter { file, color } => Creative::Letter {
                file: render(file)?,
                color: *color,
            },
        };
        let key = b.key(row).unwrap_or_default();
        let variant_name = &self.plan.variant_names[variant];
        let mut metadata: BTreeMap<String, String> = self
            .plan
            .owner
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        metadata.insert("recipient".to_string(), key.to_string());
        metadata.insert("variant".to_string(), variant_name.clone());
        let piece = MailPiece {
            key: piece_key(&self.plan.owner.run, key),
            description: Some(format!("{} {variant_name}", self.plan.campaign_id)),
            to,
            from: self.plan.from.clone(),
            creative,
            merge_variables: Map::new(),
            // What the delivery webhooks bring back (`POST /webhooks/lob`) to file the event,
            // and what a repeated key brings back to tell whose piece it is.
            metadata,
        };
        let mut prepared = piece.prepare();
        if let Some(d) = &self.plan.send_date {
            let mut body: Map<String, Value> =
                serde_json::from_slice(&prepared.body).map_err(|e| e.to_string())?;
            body.insert("send_date".into(), Value::String(d.clone()));
            prepared.body = Value::Object(body).to_string().into_bytes();
        }
        Ok(Some(prepared))
    }
}

impl Stage for ProofStage {
    fn name(&self) -> &'static str {
        "proof"
    }

    fn process(&mut self, b: &mut RecipientBatch) -> broadside_pipeline::Result<()> {
        let n = b.len();
        b.payload.clear();
        b.payload_ends.clear();
        b.payload_ends.reserve(n);
        for row in 0..n {
            let v = b.variants[row];
            if b.decisions[row] == Decision::Pending
                && v != HOLDOUT_VARIANT
                && (v as usize) < self.plan.creatives.len()
            {
                let to = address(b, &self.layout, row);
                match self.plan.approval.evaluate(&to) {
                    Approval::Approved => match self.piece(b, row, to, v as usize) {
                        Ok(Some(p)) => b.payload.extend_from_slice(&p.body),
                        Ok(None) => {}
                        Err(e) => {
                            b.decide(row, Decision::Errored, Reason::CouldNotGenerateCreative);
                            let state = RecipientState::error(
                                broadside_printers::ErrorMessage::CouldNotGenerateCreative,
                                &e,
                            );
                            b.add_detail(row, state_message(&state));
                        }
                    },
                    rejected => {
                        b.decide(row, Decision::Skipped, Reason::PrinterApprovalFailed);
                        b.add_detail(row, rejected.errors().join("; "));
                    }
                }
            }
            b.payload_ends.push(b.payload.len() as u32);
        }
        Ok(())
    }
}

/// Marks a row whose address came from the enrichment provider (in `mail_states`, until the
/// printer stage writes the final state).
const ENRICHED: &str = "enriched";
/// Marks a row the enrichment provider was asked about and could not complete.
const ENRICH_FAILED: &str = "enrich-failed";

/// Address enrichment, on the worker threads between validation and suppression: rows skipped
/// for `no_address` are looked up at the provider in batches; a found address is written into
/// the row's columns and the row is validated again (zip, country) and goes on as Pending;
/// none found is `skipped` / `enrichment_failed`. A provider that cannot answer fails the run
/// (resume retries) rather than skipping recipients for an outage.
pub struct EnrichStage {
    /// The validation rules enriched addresses are checked against again.
    validator: Validator,
    layout: Arc<RecipientLayout>,
    client: EnrichmentClient,
    rt: tokio::runtime::Runtime,
}

impl EnrichStage {
    /// A stage for one worker, or `None` when the campaign does not enrich.
    pub fn new(
        plan: &MailPlan,
        validator: Validator,
        layout: Arc<RecipientLayout>,
    ) -> Option<EnrichStage> {
        let (cfg, token) = plan.enrichment.clone()?;
        let client =
            EnrichmentClient::new(cfg, &token, Arc::new(broadside_printers::lob::TokioPause))
                .expect("checked by MailPlan::load");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        Some(EnrichStage {
            validator,
            layout,
            client,
            rt,
        })
    }
}

/// The standard fields an enriched address fills.
const ADDRESS_FIELDS: [StdField; 6] = [
    StdField::Address1,
    StdField::Address2,
    StdField::City,
    StdField::State,
    StdField::Zip,
    StdField::Country,
];

/// An address's value for one of [`ADDRESS_FIELDS`].
fn address_value(a: &Address, f: StdField) -> Option<&str> {
    match f {
        StdField::Address1 => a.address_line1.as_deref(),
        StdField::Address2 => a.address_line2.as_deref(),
        StdField::City => a.address_city.as_deref(),
        StdField::State => a.address_state.as_deref(),
        StdField::Zip => a.address_zip.as_deref(),
        StdField::Country => a.address_country.as_deref(),
        _ => None,
    }
}

impl Stage for EnrichStage {
    fn name(&self) -> &'static str {
        "enrich"
    }

    fn process(&mut self, b: &mut RecipientBatch) -> broadside_pipeline::Result<()> {
        let rows: Vec<usize> = (0..b.len())
            .filter(|&i| b.decisions[i] == Decision::Skipped && b.reasons[i] == Reason::NoAddress)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let records: Vec<EnrichmentRecord> = rows
            .iter()
            .map(|&i| EnrichmentRecord {
                key: format!("{}", b.first_row + i as u64),
                address: address(b, &self.layout, i),
            })
            .collect();
        let mut found: HashMap<usize, Address> = HashMap::new();
        let mut failed = Vec::new();
        for (chunk_rows, chunk) in rows
            .chunks(self.client.batch_size())
            .zip(records.chunks(self.client.batch_size()))
        {
            let outcomes = self.rt.block_on(self.client.enrich(chunk)).map_err(|e| {
                broadside_pipeline::Error::Stage {
                    stage: "enrich".into(),
                    message: e,
                }
            })?;
            for (&row, o) in chunk_rows.iter().zip(outcomes) {
                match (o.state, o.address) {
                    (RecipientState::Pending, Some(a)) => {
                        found.insert(row, a);
                    }
                    (RecipientState::Skipped { reason }, _) => failed.push((row, reason)),
                    (other, _) => {
                        return Err(broadside_pipeline::Error::Stage {
                            stage: "enrich".into(),
                            message: format!(
                                "enrichment gave row {row} the state {}",
                                other.name()
                            ),
                        })
                    }
                }
            }
        }
        if b.mail_states.is_empty() {
            b.mail_states = vec![""; b.len()];
        }
        for (row, reason) in failed {
            b.mail_states[row] = ENRICH_FAILED;
            if reason == SkipReason::EnrichmentFailed {
                b.reasons[row] = Reason::EnrichmentFailed;
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        // Rewrite the address columns of the enriched rows.
        let mut columns: Vec<arrow_array::ArrayRef> = b.columns.columns().to_vec();
        for f in ADDRESS_FIELDS {
            let Some(idx) = self.layout.index(f) else {
                continue;
            };
            let old = b.column(idx);
            let new: arrow_array::StringArray = (0..b.len())
                .map(|i| {
                    let enriched = found
                        .get(&i)
                        .and_then(|a| address_value(a, f))
                        .map(str::trim)
                        .filter(|v| !v.is_empty());
                    match enriched {
                        Some(v) => Some(v.to_string()),
                        None => old.is_valid(i).then(|| old.value(i).to_string()),
                    }
                })
                .collect();
            columns[idx] = Arc::new(new);
        }
        b.columns =
            arrow_array::RecordBatch::try_new(b.columns.schema(), columns).map_err(|e| {
                broadside_pipeline::Error::Stage {
                    stage: "enrich".into(),
                    message: e.to_string(),
                }
            })?;
        // The enriched rows are validated again for what address1 was hiding.
        let mut rows: Vec<usize> = found.keys().copied().collect();
        rows.sort_unstable();
        for row in rows {
            b.mail_states[row] = ENRICHED;
            b.decisions[row] = Decision::Pending;
            b.reasons[row] = Reason::None;
            let get = |f| cell(b, &self.layout, f, row);
            let reason = self.validator.mail_address(
                true,
                get(StdField::Zip).is_some(),
                get(StdField::Country).as_deref(),
            );
            if let Some(r) = reason {
                b.decide(row, Decision::Skipped, r);
            }
            b.add_detail(row, "address from the enrichment provider".to_string());
        }
        Ok(())
    }
}

fn state_message(s: &RecipientState) -> String {
    match s {
        RecipientState::Error { message } => message.clone(),
        other => other.name().to_string(),
    }
}

/// Rows already printed by an earlier attempt of the run: `row \t key \t printer id` lines.
struct Journal {
    path: PathBuf,
    done: HashMap<u64, (String, String)>,
    file: Option<File>,
}

impl Journal {
    fn open(path: PathBuf) -> Result<Journal> {
        let mut done = HashMap::new();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // Only whole lines count: a line cut by a crash (no newline yet) is ignored, and that
        // row is submitted again; its key returns the first piece.
        let whole = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&bytes[..0], |end| &bytes[..end]);
        for line in whole.split(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(line);
            let mut parts = text.split('\t');
            if let (Some(row), Some(key), Some(id), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                if let Ok(row) = row.parse::<u64>() {
                    done.insert(row, (key.to_string(), id.to_string()));
                }
            }
        }
        Ok(Journal {
            path,
            done,
            file: None,
        })
    }

    fn get(&self, row: u64, key: &IdempotencyKey) -> Option<&str> {
        self.done
            .get(&row)
            .filter(|(k, _)| k == key.as_str())
            .map(|(_, id)| id.as_str())
    }

    fn append(&mut self, lines: &str) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .with_context(|| format!("opening {}", self.path.display()))?;
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(lines.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The journal's path for a run.
pub fn journal_path(staging: &Path) -> PathBuf {
    staging.join("printer-journal.tsv")
}

enum Output {
    Lob {
        client: Arc<LobClient>,
        rt: tokio::runtime::Runtime,
    },
    Batch {
        printer: Arc<Mutex<Option<BatchPrinter>>>,
    },
}

/// Counters printed at the end of a mail run.
#[derive(Debug, Clone, Default)]
pub struct PrintSummary {
    /// Pieces the printer confirmed in this attempt (`created` + `returned`).
    pub submitted: u64,
    /// Pieces this attempt made (batch printers: rows written to this run's files).
    pub created: u64,
    /// Pieces the printer returned for their key as made by an earlier attempt of this run
    /// (made, then the answer or the journal line was lost).
    pub returned: u64,
    /// Pieces found in the journal (printed by an earlier attempt).
    pub journaled: u64,
    /// Pieces the printer refused or that failed for good.
    pub failed: u64,
    /// The Lob client's counters.
    pub lob: Option<PrinterStatsSnapshot>,
}

/// A piece's outcome at the printer: its id and whether this attempt made it.
type Submitted = std::result::Result<(String, Origin), SubmitError>;

/// Submits sent rows to the printer (see the module docs).
pub struct PrinterStage {
    plan: Arc<MailPlan>,
    layout: Arc<RecipientLayout>,
    out: Output,
    journal: Journal,
    summary: Arc<Mutex<PrintSummary>>,
}

/// What `broadside send` finishes after the run committed (the batch printer's manifest).
pub struct PrinterFinish {
    printer: Option<Arc<Mutex<Option<BatchPrinter>>>>,
    /// The counters.
    pub summary: Arc<Mutex<PrintSummary>>,
}

impl PrinterFinish {
    /// Writes the batch printer's last file and its manifest (the printer's ready signal).
    pub fn finish(&self) -> Result<()> {
        if let Some(p) = &self.printer {
            if let Some(p) = p.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let m = p.finish().context("batch printer")?;
                tracing::info!(
                    files = m.files.len(),
                    rows = m.total_rows,
                    "batch printer manifest written"
                );
            }
        }
        Ok(())
    }
}

impl PrinterStage {
    /// The stage for one run; `staging` holds its journal.
    pub fn new(
        plan: Arc<MailPlan>,
        layout: Arc<RecipientLayout>,
        run_id: &str,
        staging: &Path,
    ) -> Result<(PrinterStage, PrinterFinish)> {
        let summary = Arc::new(Mutex::new(PrintSummary::default()));
        let (out, batch_handle) = match plan.kind {
            PrinterKind::Lob => {
                let (cfg, key) = plan.lob.clone().expect("checked by MailPlan::load");
                let client = LobClient::new(cfg, &key).context("printer")?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the printer's runtime")?;
                (
                    Output::Lob {
                        client: Arc::new(client),
                        rt,
                    },
                    None,
                )
            }
            PrinterKind::Batch => {
                let cfg = plan.batch.clone().expect("checked by MailPlan::load");
                let merge: Vec<String> = layout.names().to_vec();
                let p = BatchPrinter::new(cfg, &plan.campaign_id, run_id, merge)
                    .context("batch printer")?;
                let handle = Arc::new(Mutex::new(Some(p)));
                (
                    Output::Batch {
                        printer: handle.clone(),
                    },
                    Some(handle),
                )
            }
        };
        let journal = Journal::open(journal_path(staging))?;
        let stage = PrinterStage {
            plan,
            layout,
            out,
            journal,
            summary: summary.clone(),
        };
        Ok((
            stage,
            PrinterFinish {
                printer: batch_handle,
                summary,
            },
        ))
    }

    fn submit_lob(
        &mut self,
        b: &mut RecipientBatch,
        todo: Vec<(usize, IdempotencyKey)>,
    ) -> broadside_pipeline::Result<()> {
        let Output::Lob { client, rt } = &self.out else {
            unreachable!("called for Lob printers only")
        };
        let owner = &self.plan.owner;
        let pieces: Vec<(usize, PreparedPiece)> = todo
            .into_iter()
            .map(|(row, key)| {
                let path = match self.plan.creatives[b.variants[row] as usize] {
                    Some(CreativeTemplates::Letter { .. }) => "/v1/letters",
                    _ => "/v1/postcards",
                };
                (
                    row,
                    PreparedPiece {
                        key,
                        path,
                        body: b.payload_line(row).to_vec(),
                    },
                )
            })
            .collect();
        // All of the batch's pieces are in flight together; the client's semaphore and rate
        // limit decide how many requests are really open. A batch can take minutes at a
        // printer's rate: its progress is logged every 10 s.
        let total = pieces.len();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let done = &done;
        let results: Vec<(usize, IdempotencyKey, Submitted)> = rt.block_on(async {
            let all =
                futures::future::join_all(pieces.into_iter().map(|(row, piece)| async move {
                    let r = client.create_prepared(&piece).await.and_then(|c| {
                        let origin = owner.origin(&piece.key, &c)?;
                        Ok((c.id, origin))
                    });
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (row, piece.key, r)
                }));
            let mut all = std::pin::pin!(all);
            let every = std::time::Duration::from_secs(10);
            loop {
                match tokio::time::timeout(every, &mut all).await {
                    Ok(results) => break results,
                    Err(_) => tracing::info!(
                        first_row = b.first_row,
                        done = done.load(std::sync::atomic::Ordering::Relaxed),
                        of = total,
                        "printing the batch"
                    ),
                }
            }
        });
        let mut lines = String::new();
        let mut fatal = None;
        let mut other_run = None;
        let mut summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        for (row, key, r) in results {
            match r {
                Ok((id, origin)) => {
                    lines.push_str(&format!("{}\t{key}\t{id}\n", b.first_row + row as u64));
                    b.printer_ids[row] = Some(id.into());
                    summary.submitted += 1;
                    match origin {
                        Origin::Created => summary.created += 1,
                        Origin::Returned => summary.returned += 1,
                    }
                }
                // Another run's piece: not this run's, so the row is neither journaled nor
                // recorded; the send stops (see `other_run`).
                Err(e @ SubmitError::OtherRun(_)) => {
                    if other_run.is_none() {
                        other_run = Some(e.to_string());
                    }
                }
                Err(e) => {
                    if e.stops_the_printer() && fatal.is_none() {
                        fatal = Some(e.to_string());
                    }
                    b.decisions[row] = Decision::Errored;
                    b.reasons[row] = match e {
                        SubmitError::Rejected { .. } => Reason::PrinterRejected,
                        _ => Reason::PrinterFailed,
                    };
                    b.add_detail(row, state_message(&e.recipient_state()));
                    summary.failed += 1;
                }
            }
        }
        summary.lob = Some(client.stats());
        drop(summary);
        // What was created is journaled before the run can fail on a stopped printer.
        self.journal
            .append(&lines)
            .map_err(|e| broadside_pipeline::Error::sink("printer journal", format!("{e:#}")))?;
        // Failing the send rather than erroring the row: a row recorded `errored` would be
        // final, while a stopped run records nothing for the batch and can be resumed once
        // the key's owner is sorted out, so no recipient is lost either way.
        if let Some(e) = other_run {
            return Err(broadside_pipeline::Error::sink(
                "printer",
                format!(
                    "a mailpiece of another run came back for this run's key, stopping the send \
                     (the recipient is not recorded): {e}"
                ),
            ));
        }
        if let Some(f) = fatal {
            return Err(broadside_pipeline::Error::sink(
                "printer",
                format!("the printer refuses every request, stopping the send: {f}"),
            ));
        }
        Ok(())
    }
}

/// The state a row ends in, reached by walking the documented graph from `Pending`: a path the
/// graph does not have fails the run (it is a bug, not a recipient problem).
fn final_state(
    decision: Decision,
    reason: Reason,
    scheduled: bool,
    enrichment: &str,
) -> std::result::Result<RecipientState, String> {
    use RecipientState as S;
    let mut s = S::Pending;
    if enrichment == ENRICHED || enrichment == ENRICH_FAILED {
        s.advance(S::AddressEnrichable).map_err(|e| e.to_string())?;
        s.advance(S::AddressEnriching).map_err(|e| e.to_string())?;
        if enrichment == ENRICH_FAILED {
            let why = if reason == Reason::EnrichmentFailed {
                SkipReason::EnrichmentFailed
            } else {
                SkipReason::NoAddress
            };
            s.advance(S::skipped(why)).map_err(|e| e.to_string())?;
            return Ok(s);
        }
        s.advance(S::Pending).map_err(|e| e.to_string())?;
    }
    let proofing = [S::ProofingStaged, S::Proofing];
    let sending = [S::Proofed, S::SendingStaged, S::Sending];
    let err = |m: &str| S::Error {
        message: m.to_string(),
    };
    let path: Vec<S> = match (decision, reason) {
        (Decision::Sent, _) if scheduled => [&proofing[..], &[S::Proofed, S::Scheduled]].concat(),
        (Decision::Sent, _) => [&proofing[..], &sending[..], &[S::Sent]].concat(),
        (Decision::Holdout, _) => vec![S::Holdout],
        (Decision::Suppressed, _) => vec![S::Blacklisted],
        (Decision::Skipped, Reason::CapExceeded) => vec![S::skipped(SkipReason::CapExceeded)],
        (Decision::Skipped, Reason::International) => vec![S::skipped(SkipReason::International)],
        (
            Decision::Skipped,
            Reason::NoAddress
            | Reason::MissingZip
            | Reason::MissingCountry
            | Reason::EnrichmentFailed,
        ) => {
            vec![S::skipped(SkipReason::NoAddress)]
        }
        // Missing or invalid names are what a printer's approval would refuse too.
        (Decision::Skipped, _) => vec![S::skipped(SkipReason::PrinterApprovalFailed)],
        (Decision::Errored, Reason::CouldNotGenerateCreative) => {
            [&proofing[..], &[err("creative")]].concat()
        }
        (Decision::Errored, Reason::PrinterRejected | Reason::PrinterFailed) => {
            [&proofing[..], &sending[..], &[err("printer")]].concat()
        }
        // The row could not be read: it fails where it starts.
        (Decision::Errored, _) => [&proofing[..], &[err("row")]].concat(),
        (Decision::Pending, _) => return Err("a row left the pipeline undecided".into()),
    };
    for next in path {
        s.advance(next).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

impl Stage for PrinterStage {
    fn name(&self) -> &'static str {
        "printer"
    }

    fn process(&mut self, b: &mut RecipientBatch) -> broadside_pipeline::Result<()> {
        let n = b.len();
        b.printer_ids = vec![None; n];
        let mut todo = Vec::new();
        let mut summary_journaled = 0;
        for row in 0..n {
            if b.decisions[row] != Decision::Sent {
                continue;
            }
            let key = piece_key(&self.plan.owner.run, b.key(row).unwrap_or_default());
            if let Some(id) = self.journal.get(b.first_row + row as u64, &key) {
                b.printer_ids[row] = Some(id.into());
                summary_journaled += 1;
            } else {
                todo.push((row, key));
            }
        }
        self.summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journaled += summary_journaled;
        if matches!(self.out, Output::Lob { .. }) {
            self.submit_lob(b, todo)?;
        } else if let Output::Batch { printer } = &self.out {
            let mut guard = printer.lock().unwrap_or_else(|e| e.into_inner());
            let p = guard.as_mut().expect("finished only after the run");
            let written = todo.len() as u64;
            for (row, key) in todo {
                let to = address(b, &self.layout, row);
                let vars = merge_vars(b, &self.layout, row);
                let file = p.current_file();
                p.push(&key, &to, &vars)
                    .map_err(|e| broadside_pipeline::Error::sink("batch printer", e.to_string()))?;
                b.printer_ids[row] = Some(file.into());
            }
            // The run's files are this run's: every row written is created by it.
            let mut summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
            summary.submitted += written;
            summary.created += written;
        }
        let marks = std::mem::take(&mut b.mail_states);
        b.mail_states = Vec::with_capacity(n);
        for row in 0..n {
            let mark = marks.get(row).copied().unwrap_or_default();
            let s = final_state(b.decisions[row], b.reasons[row], self.plan.scheduled, mark)
                .map_err(|e| broadside_pipeline::Error::sink("mail state", e))?;
            b.mail_states.push(s.name());
        }
        Ok(())
    }
}

impl OrderedStage for PrinterStage {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_reaches_a_documented_state() {
        for d in Decision::ALL {
            for r in Reason::ALL {
                for (scheduled, mark) in [(false, ""), (true, ""), (false, ENRICHED)] {
                    let s = final_state(d, r, scheduled, mark);
                    if d == Decision::Pending {
                        assert!(s.is_err());
                        continue;
                    }
                    let s = s.unwrap_or_else(|e| panic!("{d:?} {r:?}: {e}"));
                    let expect = match d {
                        Decision::Sent if scheduled => "Scheduled",
                        Decision::Sent => "Sent",
                        Decision::Holdout => "Holdout",
                        Decision::Suppressed => "Blacklisted",
                        Decision::Skipped => "Skipped",
                        Decision::Errored => "Error",
                        Decision::Pending => unreachable!(),
                    };
                    assert_eq!(s.name(), expect, "{d:?} {r:?}");
                }
                if d == Decision::Skipped {
                    let s = final_state(d, r, false, ENRICH_FAILED).unwrap();
                    assert_eq!(s.name(), "Skipped", "{r:?}");
                }
            }
        }
    }

    #[test]
    fn journal_ignores_a_torn_last_line_and_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.tsv");
        let run = RunScope {
            workspace_id: "w".into(),
            campaign_id: "c".into(),
            run_id: "r".into(),
        };
        let k1 = piece_key(&run, "a@x");
        let k2 = piece_key(&run, "b@x");
        std::fs::write(&p, format!("0\t{k1}\tpsc_1\n1\t{k2}\tpsc_2\n2\t{k2}\tpsc_")).unwrap();
        let j = Journal::open(p).unwrap();
        assert_eq!(j.get(0, &k1), Some("psc_1"));
        assert_eq!(j.get(1, &k2), Some("psc_2"));
        // Same row, another recipient: not the same piece.
        assert_eq!(j.get(0, &k2), None);
        assert_eq!(j.get(2, &k2), None);
    }

    #[test]
    fn send_dates() {
        assert!(parse_send_date("2030-01-02").is_some());
        assert!(parse_send_date("2030-01-02T10:00:00Z").is_some());
        assert!(parse_send_date("tomorrow").is_none());
    }
}
