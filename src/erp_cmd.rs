//! `broadside erp check`: connect to the ERP, run the campaign query with a row limit, and show
//! its columns, their SQL types, how each maps to recipient text, and whether the spec's column
//! mapping is satisfied.

use std::path::PathBuf;

use anyhow::{bail, Result};
use broadside_pipeline::spec::{CampaignSpec, SourceSpec};
use broadside_sources::erp::{self, ErpSettings};
use clap::Subcommand;

/// `broadside erp …` subcommands.
#[derive(Subcommand)]
pub enum ErpCommand {
    /// Connect, run the campaign's query with a row limit, and check it against the column mapping.
    Check {
        /// The campaign spec (its source must be `type = "erp"`).
        spec: PathBuf,
        /// Rows fetched (`TOP (n)`) and shown as a sample.
        #[arg(long, default_value_t = 5)]
        rows: u32,
    },
}

/// Runs an `erp` subcommand.
pub fn run(cmd: ErpCommand) -> Result<()> {
    match cmd {
        ErpCommand::Check { spec, rows } => check(&spec, rows),
    }
}

fn check(path: &std::path::Path, rows: u32) -> Result<()> {
    let spec = CampaignSpec::load(path)?;
    let SourceSpec::Erp(e) = &spec.source else {
        bail!("{}: the source is not type = \"erp\"", path.display());
    };
    let mapping = spec.columns.source_columns();
    let report = erp::check(ErpSettings::new(e, |p| spec.resolve(p)), &mapping, rows)?;
    println!(
        "{}: connected; the query returns {} columns",
        report.origin,
        report.columns.len()
    );
    let width = report
        .columns
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(6);
    println!(
        "  {:<width$}  {:<18}  {:<32}  mapped to",
        "column", "sql type", "text form"
    );
    for (i, c) in report.columns.iter().enumerate() {
        let mut uses: Vec<String> = report
            .mapping
            .iter()
            .filter(|(_, _, idx)| *idx == Some(i))
            .map(|(f, _, _)| f.clone())
            .collect();
        if report.key == Some(i) {
            uses.push("key".into());
        }
        let form = c.form.map_or("(no text form)", |f| f.describe());
        println!(
            "  {:<width$}  {:<18}  {:<32}  {}",
            c.name,
            c.sql_type,
            form,
            if uses.is_empty() {
                "-".to_string()
            } else {
                uses.join(", ")
            }
        );
    }
    println!("mapping:");
    for (field, col, idx) in &report.mapping {
        let status = match idx {
            Some(i) if report.columns[*i].form.is_some() => "ok",
            Some(_) => "UNREADABLE",
            None => "MISSING",
        };
        println!("  {field:<16} <- {col:<24} {status}");
    }
    println!(
        "  {:<16} <- {:<24} {}",
        "key",
        e.key_column,
        if report.key.is_some() {
            "ok"
        } else {
            "MISSING"
        }
    );
    println!("sample ({} rows):", report.sample.len());
    for row in &report.sample {
        let cells: Vec<String> = row
            .iter()
            .map(|v| v.clone().unwrap_or_else(|| "NULL".into()))
            .collect();
        println!("  {}", cells.join(" | "));
    }
    if report.problems.is_empty() {
        println!("ok: the mapping is satisfied");
        Ok(())
    } else {
        for p in &report.problems {
            println!("problem: {p}");
        }
        bail!(
            "{}: the query does not satisfy the campaign's column mapping ({} problems)",
            report.origin,
            report.problems.len()
        )
    }
}
