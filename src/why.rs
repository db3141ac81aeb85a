//! `broadside why RUN KEY`: explains one recipient's decision from the ledger; `broadside why
//! KEY`: the recipient's decisions and events in every campaign and run, newest first.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, RecordBatch, StringArray};
use arrow_cast::cast;
use arrow_schema::DataType;
use broadside_pipeline::model::Reason;
use broadside_pipeline::run::RunRecord;
use broadside_pipeline::store::StoreLayout;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// One ledger row, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Input row (0-based).
    pub row: u64,
    /// Decision.
    pub decision: String,
    /// Reason code (may be empty).
    pub reason: String,
    /// Variant (sent rows).
    pub variant: Option<String>,
    /// Detail text.
    pub detail: Option<String>,
    /// Suppression list that matched.
    pub list: Option<String>,
    /// IFUR file and detail line.
    pub ifur: Option<(String, u32)>,
    /// Mail with a printer: the state at the end of the run, and the printer's piece id.
    pub mail: Option<(String, Option<String>)>,
}

/// Finds a run's record anywhere in the store.
pub fn find_run(store: &Path, run_id: &str) -> Result<(PathBuf, RunRecord)> {
    let runs = store.join("campaign_runs");
    let dirs =
        std::fs::read_dir(&runs).with_context(|| format!("no runs under {}", runs.display()))?;
    for d in dirs.flatten() {
        let p = d.path().join(format!("{run_id}.json"));
        if p.exists() {
            let r = RunRecord::load(&p)?;
            return Ok((p, r));
        }
    }
    bail!("run {run_id} not found under {}", runs.display())
}

fn text(batch: &RecordBatch, name: &str, row: usize) -> Result<Option<String>> {
    let col = batch
        .column_by_name(name)
        .with_context(|| format!("ledger has no column {name}"))?;
    let one = cast(&col.slice(row, 1), &DataType::Utf8)?;
    let s = one
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8");
    Ok(s.is_valid(0).then(|| s.value(0).to_string()))
}

/// Every ledger row of `run` whose key equals `key` (normalised like the pipeline does).
pub fn lookup(store: &Path, record: &RunRecord, key: &str) -> Result<Vec<LedgerEntry>> {
    let key = if key.contains('@') {
        key.trim().to_lowercase()
    } else {
        key.trim().to_string()
    };
    let dir = StoreLayout::new(store).recipient_log_dir(
        &record.workspace_id,
        &record.campaign_id,
        &record.run_id,
    );
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("no recipient log at {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    parts.sort();
    let mut out = Vec::new();
    for part in parts {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&part)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            let keys = batch
                .column_by_name("key")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .context("ledger key column")?;
            for i in (0..keys.len()).filter(|i| keys.is_valid(*i) && keys.value(*i) == key) {
                let file = text(&batch, "ifur_file", i)?;
                let line = text(&batch, "ifur_line", i)?.and_then(|l| l.parse().ok());
                out.push(LedgerEntry {
                    row: text(&batch, "row", i)?
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                    decision: text(&batch, "decision", i)?.unwrap_or_default(),
                    reason: text(&batch, "reason", i)?.unwrap_or_default(),
                    variant: text(&batch, "variant", i)?,
                    detail: text(&batch, "detail", i)?,
                    list: text(&batch, "suppression_list", i)?,
                    ifur: file.zip(line),
                    mail: text(&batch, "mail_state", i)?
                        .map(|m| Ok::<_, anyhow::Error>((m, text(&batch, "printer_id", i)?)))
                        .transpose()?,
                });
            }
        }
    }
    Ok(out)
}

/// Prints the explanation; errors when the key is not in the run.
pub fn why(store: &Path, run_id: &str, key: &str) -> Result<()> {
    let (_, record) = find_run(store, run_id)?;
    let entries = lookup(store, &record, key)?;
    if entries.is_empty() {
        bail!(
            "{key} is not in run {run_id} (campaign {}, {} input rows)",
            record.campaign_id,
            record.rows
        );
    }
    println!(
        "run {run_id} (campaign {}, workspace {})",
        record.campaign_id, record.workspace_id
    );
    for e in entries {
        let reason = Reason::parse(&e.reason).unwrap_or(Reason::None);
        print!(
            "{key}: input row {} -> {}",
            e.row + 1,
            e.decision.to_uppercase()
        );
        if !e.reason.is_empty() {
            print!(" ({})", e.reason);
        }
        println!();
        match e.decision.as_str() {
            "sent" => {
                if let (Some(v), Some((f, l))) = (&e.variant, &e.ifur) {
                    println!("  variant {v}: detail record {l} of {f}");
                }
            }
            _ => println!("  {}", reason.explain()),
        }
        if let Some(l) = e.list {
            println!("  matched suppression list {l}");
            for line in list_evidence(store, Path::new(&l), key)? {
                println!("    {line}");
            }
        }
        if let Some(d) = e.detail {
            println!("  {d}");
        }
        if let Some((state, piece)) = &e.mail {
            let piece = piece
                .as_deref()
                .map(|p| format!(", printer piece {p}"))
                .unwrap_or_default();
            println!("  mail state at the end of the run: {state}{piece}");
            let now = mail_state_now(store, &record, key, state)?;
            match (&now.event_id, now.at) {
                (Some(id), Some(at)) => println!(
                    "  mail state now: {} (tracking event {id} at {})",
                    now.state,
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                _ => println!(
                    "  mail state now: {} (no tracking event moved it)",
                    now.state
                ),
            }
        }
    }
    Ok(())
}

/// Prints a recipient's history in a workspace (`ws`, or the store's only workspace): every
/// decision with its explanation and every event, newest first.
pub fn history(store: &Path, ws: Option<&str>, key: &str) -> Result<()> {
    use broadside_analytics::query::Catalog;
    use broadside_analytics::recipients::recipient_history;
    let ws = match ws {
        Some(w) => w.to_string(),
        None => only_workspace(store)?,
    };
    let catalog = Catalog::new(store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the history query")?;
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = rt
            .block_on(recipient_history(
                &catalog,
                &ws,
                key,
                broadside_analytics::params::MAX_PAGE,
                cursor.as_deref(),
            ))
            .with_context(|| format!("reading the history of {key} in workspace {ws}"))?;
        items.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if items.is_empty() {
        bail!(
            "{key} has no decision and no event in workspace {ws} of {}",
            store.display()
        );
    }
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let decisions = items.iter().filter(|i| i["kind"] == "decision").count();
    println!(
        "{key} in workspace {ws}: {decisions} decisions, {} events, newest first",
        items.len() - decisions
    );
    for i in &items {
        let at = text(i, "at");
        if i["kind"] == "decision" {
            let (decision, reason) = (text(i, "decision"), text(i, "reason"));
            print!(
                "{at}  run {} (campaign {}): input row {} -> {}",
                text(i, "run_id"),
                text(i, "campaign_id"),
                i["row"].as_u64().unwrap_or(0) + 1,
                decision.to_uppercase()
            );
            if !reason.is_empty() {
                print!(" ({reason})");
            }
            println!();
            if decision == "sent" {
                println!(
                    "    variant {}: detail record {} of {}",
                    text(i, "variant"),
                    i["ifur_line"].as_u64().unwrap_or(0),
                    text(i, "ifur_file")
                );
            } else {
                println!(
                    "    {}",
                    Reason::parse(&reason).unwrap_or(Reason::None).explain()
                );
            }
            for k in ["suppression_list", "detail", "mail_state", "printer_id"] {
                if let Some(v) = i[k].as_str() {
                    println!("    {}: {v}", k.replace('_', " "));
                }
            }
        } else {
            let mut line = format!(
                "{at}  {} in campaign {}",
                text(i, "event_type"),
                text(i, "campaign_id")
            );
            for k in ["variant", "run_id", "bounce_type", "url"] {
                if let Some(v) = i[k].as_str() {
                    line.push_str(&format!(", {} {v}", k.replace('_', " ")));
                }
            }
            println!("{line}");
        }
    }
    println!("(run `broadside why RUN {key}` for the full explanation of one decision)");
    Ok(())
}

/// The store's one workspace (with events or recipient logs); an error naming them when there
/// are several.
fn only_workspace(store: &Path) -> Result<String> {
    let mut found = std::collections::BTreeSet::new();
    for table in ["events", "recipient_logs"] {
        if let Ok(dir) = std::fs::read_dir(store.join(table)) {
            for e in dir.flatten() {
                if let Some(w) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("workspace_id="))
                {
                    found.insert(w.to_string());
                }
            }
        }
    }
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => bail!(
            "no workspace has events or recipient logs in {}",
            store.display()
        ),
        _ => bail!(
            "{} holds several workspaces ({}): give --workspace",
            store.display(),
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The recipient's mail state now: the ledger's, moved on by the printer's tracking events.
fn mail_state_now(
    store: &Path,
    record: &RunRecord,
    key: &str,
    state: &str,
) -> Result<broadside_analytics::query::mail::MailStateNow> {
    use broadside_analytics::query::{mail::current_mail_states, Catalog};
    let key = key.trim().to_string();
    let catalog = Catalog::new(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the tracking query")?;
    let mut now = rt
        .block_on(current_mail_states(
            &catalog,
            &record.workspace_id,
            &record.run_id,
            &[(key.clone(), state.to_string())],
        ))
        .context("reading the printer's tracking events")?;
    Ok(now.remove(&key).expect("asked for this key"))
}

/// For a list of a store suppression snapshot (a `snapshot.json` beside it, built from this
/// store): the events or imported bounces that put `key` on it.
fn list_evidence(store: &Path, list: &Path, key: &str) -> Result<Vec<String>> {
    use broadside_analytics::suppression::{evidence, SuppressionReason, SuppressionSnapshot};
    let Some(snapshot) = list.parent().map(|d| d.join("snapshot.json")) else {
        return Ok(Vec::new());
    };
    if !snapshot.is_file() {
        return Ok(Vec::new());
    }
    let snap = SuppressionSnapshot::load(&snapshot)?;
    let Some(reason) = SuppressionReason::ALL.into_iter().find(|r| {
        list.file_name()
            .is_some_and(|n| n == r.file_name().as_str())
    }) else {
        return Ok(Vec::new());
    };
    let found = evidence(store, &snap, key, reason)
        .with_context(|| format!("searching the sources of {}", snapshot.display()))?;
    Ok(if found.is_empty() {
        vec![format!(
            "(no source of {} names it: the snapshot read other files than this store holds)",
            snapshot.display()
        )]
    } else {
        found
    })
}
