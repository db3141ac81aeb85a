//! A sending's inline recipients as a send: a CSV of them and a campaign spec derived from the
//! campaign's spec whose source is that CSV, so the send pipeline decides, records and delivers
//! them like any source rows (one ledger row each, IFUR merge fields from their properties).
//!
//! - A recipient given by address is one row: its email (for an email spec, the address of the
//!   first channel of `channels_preference` it has one for, which must be email), plus its
//!   properties.
//! - A recipient given by `member_id` is the member's row of the campaign spec's source (found
//!   by a `member_id` merge field, read through the same filter an audience uses), with its
//!   properties extending (default) or replacing the member's merge fields.
//! - Property names that are standard fields (`first_name`, `city`, `zip`, …) fill those;
//!   the others become merge fields of the derived spec.
//!
//! The files are rewritten only when their content changes, so a transmission resumed after a
//! crash finds the input it started with (the send refuses to resume on a changed input).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::Array;
use broadside_campaigns::audience::{
    pick_channel, Channel as AddressChannel, Condition, FieldMap, InlineRecipient, Operator,
    PropertiesMode,
};
use broadside_campaigns::store::Sending;
use broadside_pipeline::model::{Decision, StdField};
use broadside_pipeline::runner::Source;
use broadside_pipeline::spec::{CampaignSpec, Channel, ColumnMapping, CsvSourceSpec, SourceSpec};
use serde_json::Value;

use crate::audience::{AudienceSource, SendAudience};

/// A member's row of the source: (layout name, value) per column.
type MemberRow = Vec<(String, Option<String>)>;

/// The merge field member recipients are found by.
const MEMBER_FIELD: &str = "member_id";

/// Writes `<dir>/recipients.csv` with the sending's inline recipients and, beside the campaign
/// spec, `<campaign id>.<run id>.toml` with that CSV as its source; returns the derived spec.
pub(super) fn materialise(
    s: &Sending,
    run_id: &str,
    spec_path: &Path,
    dir: &Path,
) -> Result<PathBuf> {
    let spec = CampaignSpec::load(spec_path)?;
    let recipients = &s.recipients.recipients;
    let members = find_members(s, &spec, spec_path)?;

    // The derived layout: the spec's mapped fields, plus every property named in a recipient.
    let mut std: BTreeSet<usize> = StdField::ALL
        .iter()
        .enumerate()
        .filter(|(_, f)| spec.columns.get(**f).is_some())
        .map(|(i, _)| i)
        .collect();
    let mut merge: BTreeSet<String> = spec.columns.merge.keys().cloned().collect();
    if spec.channel == Channel::Email {
        std.insert(std_index(StdField::Email));
    }
    for (i, r) in recipients.iter().enumerate() {
        for key in r.properties.keys() {
            match std_field(key) {
                Some(f) => {
                    std.insert(std_index(f));
                }
                None if safe_name(key) => {
                    merge.insert(key.clone());
                }
                None => bail!(
                    "sending {}: recipients[{i}].properties.{key}: a merge field name must be letters, digits, '-' or '_'",
                    s.id
                ),
            }
        }
    }
    let std_fields: Vec<StdField> = std.iter().map(|i| StdField::ALL[*i]).collect();
    let mut columns: Vec<String> = std_fields.iter().map(|f| f.name().to_string()).collect();
    columns.extend(merge.iter().cloned());

    let mut csv = String::new();
    push_row(&mut csv, columns.iter().map(|c| Some(c.as_str())));
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, r) in recipients.iter().enumerate() {
        let mut row: HashMap<String, String> = HashMap::new();
        match r.member_id {
            Some(id) => {
                let member = &members[&id];
                for (name, v) in member {
                    let is_merge = std_field(name).is_none();
                    if r.properties_mode == PropertiesMode::Replace && is_merge {
                        continue;
                    }
                    if let Some(v) = v {
                        row.insert(name.clone(), v.clone());
                    }
                }
            }
            None => {
                let email = address(s, &spec, spec_path, i, r)?;
                if let Some(e) = email {
                    row.insert("email".into(), e);
                }
            }
        }
        for (k, v) in &r.properties {
            match property_text(v) {
                Some(t) => row.insert(k.clone(), t),
                None if v.is_null() => row.remove(k),
                None => bail!(
                    "sending {}: recipients[{i}].properties.{k}: a merge property is a string, number or boolean",
                    s.id
                ),
            };
        }
        // The same person twice would be sent twice: refuse instead.
        let key_field = spec.key_field().name();
        if let Some(k) = row.get(key_field).map(|k| k.trim().to_lowercase()) {
            if !k.is_empty() {
                if let Some(first) = keys.insert(k.clone(), i) {
                    bail!(
                        "sending {}: recipients[{i}] is the same recipient as recipients[{first}] ({key_field} {k})",
                        s.id
                    );
                }
            }
        }
        push_row(
            &mut csv,
            columns.iter().map(|c| row.get(c).map(String::as_str)),
        );
    }

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv_path =
        std::path::absolute(dir.join("recipients.csv")).context("resolving the recipients file")?;
    write_if_changed(&csv_path, csv.as_bytes())?;

    let mut derived = spec.clone();
    derived.source = SourceSpec::Csv(CsvSourceSpec {
        path: csv_path,
        delimiter: ',',
    });
    let mut mapping = ColumnMapping::default();
    for f in &std_fields {
        set_std(&mut mapping, *f, f.name());
    }
    mapping.merge = merge.iter().map(|m| (m.clone(), m.clone())).collect();
    derived.columns = mapping;
    let text = format!(
        "# Derived from {} for the inline recipients of sending {}; rewritten by the scheduler.\n{}",
        // the file name only: the text is part of the run's spec hash, and the same folder may
        // be named differently by another process
        spec_path.file_name().unwrap_or_default().to_string_lossy(),
        s.id,
        toml::to_string(&derived).context("writing the derived campaign spec")?
    );
    // Beside the campaign spec, so every relative path in it (lists, store, hot folder, printer
    // settings) resolves as it does for the campaign spec.
    let name = spec_path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spec_out = spec_path.with_file_name(format!("{name}.{run_id}.toml"));
    write_if_changed(&spec_out, text.as_bytes())?;
    Ok(spec_out)
}

/// The email column of a recipient given by address.
fn address(
    s: &Sending,
    spec: &CampaignSpec,
    spec_path: &Path,
    i: usize,
    r: &InlineRecipient,
) -> Result<Option<String>> {
    if spec.channel == Channel::Mail {
        // mail goes to the postal address in its properties; the email is only a key
        return Ok(r.email.clone());
    }
    let ids = r.identifiers();
    match pick_channel(&ids, &s.recipients.channels_preference) {
        Some((AddressChannel::Email, a)) => Ok(Some(a.trim().to_string())),
        Some((other, _)) => bail!(
            "sending {}: recipients[{i}] goes by {} (the first channel of channels_preference it has an address for), which campaign spec {} (channel email) cannot deliver",
            s.id,
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            spec_path.display()
        ),
        None => bail!(
            "sending {}: recipients[{i}] has no address for any channel of channels_preference",
            s.id
        ),
    }
}

/// The source rows (layout name → value) of the members the sending names by id.
fn find_members(
    s: &Sending,
    spec: &CampaignSpec,
    spec_path: &Path,
) -> Result<HashMap<i64, MemberRow>> {
    let wanted: Vec<(usize, i64)> = s
        .recipients
        .recipients
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.member_id.map(|m| (i, m)))
        .collect();
    let mut found = HashMap::new();
    let Some((first, first_id)) = wanted.first().copied() else {
        return Ok(found);
    };
    let layout = Arc::new(spec.columns.layout());
    let Some(idx) = layout.names().iter().position(|n| n == MEMBER_FIELD) else {
        bail!(
            "sending {}: recipients[{first}] names member {first_id}, but campaign spec {} has no `{MEMBER_FIELD}` merge field to find members by (map [columns.merge] {MEMBER_FIELD}, or give the recipient's email)",
            s.id,
            spec_path.display()
        );
    };
    let ids: Vec<i64> = wanted.iter().map(|(_, m)| *m).collect();
    let cond = Condition {
        condition_group: "member_properties".into(),
        field: MEMBER_FIELD.into(),
        operator: Operator::In,
        value: Some(Value::from(ids.clone())),
    };
    let filter = Arc::new(SendAudience::compile(
        &[cond],
        &FieldMap::member_defaults(),
        &layout,
    )?);
    let mut source_spec = spec.clone();
    let erp = match &spec.source {
        SourceSpec::Erp(e) => Some(filter.erp(spec, e)),
        _ => None,
    };
    if let SourceSpec::Erp(e) = &mut source_spec.source {
        e.audience = erp;
    }
    let (src, _) = broadside_sources::open_source(&source_spec, layout.clone())
        .with_context(|| format!("sending {}: reading members from the source", s.id))?;
    let mut src = AudienceSource::new(src, filter);
    let want: HashSet<i64> = ids.iter().copied().collect();
    while let Some(b) = src.next_batch()? {
        let col = b.column(idx);
        for (row, decision) in b.decisions.iter().enumerate() {
            if *decision != Decision::Pending || !col.is_valid(row) {
                continue;
            }
            let Ok(id) = col.value(row).trim().parse::<i64>() else {
                continue;
            };
            if !want.contains(&id) || found.contains_key(&id) {
                continue;
            }
            let values = layout
                .names()
                .iter()
                .enumerate()
                .map(|(c, name)| {
                    let a = b.column(c);
                    (
                        name.clone(),
                        a.is_valid(row).then(|| a.value(row).to_string()),
                    )
                })
                .collect();
            found.insert(id, values);
        }
    }
    if let Some((i, m)) = wanted.iter().find(|(_, m)| !found.contains_key(m)) {
        bail!(
            "sending {}: recipients[{i}]: member {m} is not in the source of campaign spec {}",
            s.id,
            spec_path.display()
        );
    }
    Ok(found)
}

fn std_index(f: StdField) -> usize {
    StdField::ALL
        .iter()
        .position(|g| *g == f)
        .expect("a standard field")
}

fn std_field(name: &str) -> Option<StdField> {
    StdField::ALL.into_iter().find(|f| f.name() == name)
}

fn set_std(m: &mut ColumnMapping, f: StdField, column: &str) {
    let v = Some(column.to_string());
    match f {
        StdField::Email => m.email = v,
        StdField::FirstName => m.first_name = v,
        StdField::LastName => m.last_name = v,
        StdField::AccountNumber => m.account_number = v,
        StdField::Address1 => m.address1 = v,
        StdField::Address2 => m.address2 = v,
        StdField::City => m.city = v,
        StdField::State => m.state = v,
        StdField::Zip => m.zip = v,
        StdField::Country => m.country = v,
    }
}

/// The spec's rule for merge names.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A property as a cell: strings as they are, numbers and booleans as JSON writes them; `None`
/// for null, arrays and objects.
fn property_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Appends one CSV record (RFC 4180 quoting; an absent cell is empty).
fn push_row<'a>(out: &mut String, cells: impl Iterator<Item = Option<&'a str>>) {
    for (i, c) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let c = c.unwrap_or("");
        if c.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&c.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(c);
        }
    }
    out.push('\n');
}

/// Writes `bytes` to `path` (temporary file, fsync, rename) unless it already holds them, so an
/// unchanged input keeps its modification time.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_with_delimiters_quotes_or_newlines_are_quoted() {
        let mut out = String::new();
        push_row(
            &mut out,
            [
                Some("a"),
                None,
                Some("b,c"),
                Some("say \"hi\""),
                Some("x\ny"),
            ]
            .into_iter(),
        );
        assert_eq!(out, "a,,\"b,c\",\"say \"\"hi\"\"\",\"x\ny\"\n");
    }
}
