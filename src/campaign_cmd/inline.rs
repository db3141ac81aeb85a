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
//! - With an audience as well, the CSV first holds the audience: the campaign spec source's
//!   rows that match its conditions, in source order (read through the filter a send applies:
//!   batch by batch for files, a `WHERE` for the ERP source), then the inline recipients in the
//!   order given. A recipient in both — an audience row with the key of an inline recipient
//!   (the ledger's key: trimmed lowercased email, or the account number for a mail spec keyed
//!   by it) — is written once, as the inline recipient: the member's row combined with the
//!   inline address and properties per `properties_mode` ([`InlineRows::claim`]). Rows the
//!   source could not read stay rows, as lines the CSV source reports as malformed.
//!
//! The files are rewritten only when their content changes, so a transmission resumed after a
//! crash finds the input it started with (the send refuses to resume on a changed input).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::Array;
use broadside_campaigns::audience::{
    pick_channel, Channel as AddressChannel, Condition, FieldMap, InlineRecipient, Operator,
    PropertiesMode,
};
use broadside_campaigns::store::Sending;
use broadside_pipeline::model::{Decision, RecipientBatch, StdField};
use broadside_pipeline::runner::Source;
use broadside_pipeline::spec::{CampaignSpec, Channel, ColumnMapping, CsvSourceSpec, SourceSpec};
use serde_json::{Map, Value};

use broadside_campaigns::send_audience::{AudienceSource, SendAudience};

/// A member's row of the source: (layout name, value) per column.
type MemberRow = Vec<(String, Option<String>)>;

/// A recipient's row of the derived CSV: layout name → cell (an absent cell is empty).
type Cells = HashMap<String, String>;

/// The merge field member recipients are found by.
const MEMBER_FIELD: &str = "member_id";

/// The audience a sending's inline recipients are sent with: its conditions and the fields
/// they may use.
pub(super) struct WithAudience<'a> {
    pub conditions: &'a [Condition],
    pub fields: &'a FieldMap,
}

/// Writes `<dir>/recipients.csv` with the sending's recipients — the audience's rows, if it
/// has one, then the inline recipients — and, beside the campaign spec,
/// `<campaign id>.<run id>.toml` with that CSV as its source; returns the derived spec.
pub(super) fn materialise(
    s: &Sending,
    run_id: &str,
    spec_path: &Path,
    dir: &Path,
    audience: Option<WithAudience<'_>>,
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

    // The inline recipients, keyed (the same person twice would be sent twice: refused).
    let mut inline = InlineRows::new(s.id, spec.key_field());
    for (i, r) in recipients.iter().enumerate() {
        match r.member_id {
            Some(id) => inline.push(i, Cells::new(), Some(&members[&id]), r)?,
            None => {
                let mut own = Cells::new();
                if let Some(e) = address(s, &spec, spec_path, i, r)? {
                    own.insert("email".into(), e);
                }
                inline.push(i, own, None, r)?;
            }
        }
    }

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv_path =
        std::path::absolute(dir.join("recipients.csv")).context("resolving the recipients file")?;
    let tmp = csv_path.with_extension("csv.tmp");
    let mut out = CsvOut::create(&tmp, columns.len())?;
    out.row(columns.iter().map(|c| Some(c.as_str())))?;
    if let Some(a) = &audience {
        // The audience's rows in source order, except those an inline recipient takes.
        let layout = spec.columns.layout();
        let names = layout.names();
        let at: Vec<Option<usize>> = columns
            .iter()
            .map(|c| names.iter().position(|n| n == c))
            .collect();
        let key_at = layout.index(spec.key_field());
        read_audience(s, &spec, a, |b, row| {
            if b.decisions[row] != Decision::Pending {
                // What the source could not read stays a row of the send, with its detail.
                return out.unreadable(b.detail(row).unwrap_or("a row the source could not read"));
            }
            let cell = |c: usize| {
                let a = b.column(c);
                a.is_valid(row).then(|| a.value(row))
            };
            let key = key_at.and_then(|k| recipient_key(inline.key_field, cell(k)));
            let member = || {
                names
                    .iter()
                    .enumerate()
                    .map(|(c, name)| (name.clone(), cell(c).map(String::from)))
                    .collect()
            };
            if inline.claim(key.as_deref(), member)? {
                return Ok(());
            }
            out.row(at.iter().map(|c| c.and_then(cell)))
        })?;
    }
    for row in inline.rows() {
        out.row(columns.iter().map(|c| row.get(c).map(String::as_str)))?;
    }
    out.finish()?;
    replace_if_changed(&tmp, &csv_path)?;

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
    let what = if audience.is_some() {
        "the audience and inline recipients"
    } else {
        "the inline recipients"
    };
    let text = format!(
        "# Derived from {} for {what} of sending {}; rewritten by the scheduler.\n{}",
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

/// A recipient's key as the ledger has it: the key field's value trimmed, and lowercased for
/// an email; `None` when empty.
fn recipient_key(key_field: StdField, value: Option<&str>) -> Option<String> {
    let mut buf = String::new();
    let key = broadside_sources::suppression::normalize_key(
        value?,
        key_field == StdField::Email,
        &mut buf,
    );
    (!key.is_empty()).then(|| key.to_string())
}

/// A member's row as the start of an inline recipient's: all of it when properties extend it;
/// when they replace it, only its standard fields (identity and address), not its merge fields.
fn member_base(member: &MemberRow, mode: PropertiesMode) -> Cells {
    member
        .iter()
        .filter(|(name, _)| mode == PropertiesMode::Extend || std_field(name).is_some())
        .filter_map(|(name, v)| v.clone().map(|v| (name.clone(), v)))
        .collect()
}

/// Applies recipient `i`'s properties to its row: a value sets a cell (a key given wins),
/// `null` clears it.
fn apply_properties(
    sending: i64,
    i: usize,
    row: &mut Cells,
    properties: &Map<String, Value>,
) -> Result<()> {
    for (k, v) in properties {
        match property_text(v) {
            Some(t) => row.insert(k.clone(), t),
            None if v.is_null() => row.remove(k),
            None => bail!(
                "sending {sending}: recipients[{i}].properties.{k}: a merge property is a string, number or boolean"
            ),
        };
    }
    Ok(())
}

/// One inline recipient.
struct InlineRow {
    /// Its row on its own: its address (or the member's row, for a `member_id`) with its
    /// properties applied.
    cells: Cells,
    /// For a recipient given by address: its address cells, to lay over an audience member
    /// with its key (a `member_id` recipient's row already is the member's).
    own: Option<Cells>,
    properties: Map<String, Value>,
    mode: PropertiesMode,
    /// Its row combined with the audience member of its key, once one is read.
    joined: Option<Cells>,
}

/// A sending's inline recipients, keyed like the ledger so an audience member with the key of
/// one is sent once: as the inline recipient, combined with the member's row.
struct InlineRows {
    sending: i64,
    key_field: StdField,
    rows: Vec<InlineRow>,
    by_key: HashMap<String, usize>,
}

impl InlineRows {
    fn new(sending: i64, key_field: StdField) -> InlineRows {
        InlineRows {
            sending,
            key_field,
            rows: Vec::new(),
            by_key: HashMap::new(),
        }
    }

    /// Adds recipient `i` (the next one): by address (`own`, its address cells) or as
    /// `member`'s row. A recipient with the key of an earlier one fails the sending.
    fn push(
        &mut self,
        i: usize,
        own: Cells,
        member: Option<&MemberRow>,
        r: &InlineRecipient,
    ) -> Result<()> {
        let mut cells = match member {
            Some(m) => member_base(m, r.properties_mode),
            None => own.clone(),
        };
        apply_properties(self.sending, i, &mut cells, &r.properties)?;
        let key_name = self.key_field.name();
        let key = recipient_key(self.key_field, cells.get(key_name).map(String::as_str));
        if let Some(k) = key {
            if let Some(first) = self.by_key.insert(k.clone(), self.rows.len()) {
                bail!(
                    "sending {}: recipients[{i}] is the same recipient as recipients[{first}] ({key_name} {k})",
                    self.sending
                );
            }
        }
        self.rows.push(InlineRow {
            cells,
            own: member.is_none().then_some(own),
            properties: r.properties.clone(),
            mode: r.properties_mode,
            joined: None,
        });
        Ok(())
    }

    /// Offers an audience member with `key`: true when an inline recipient has that key — the
    /// member is then sent as that recipient, not on its own — false when it is a recipient of
    /// its own. A recipient given by address is combined with the (first such) member's row:
    /// the member's row ([`member_base`] per `properties_mode`), then the inline address, then
    /// the inline properties.
    fn claim(&mut self, key: Option<&str>, member: impl FnOnce() -> MemberRow) -> Result<bool> {
        let Some(&at) = key.and_then(|k| self.by_key.get(k)) else {
            return Ok(false);
        };
        let r = &mut self.rows[at];
        if let (None, Some(own)) = (&r.joined, &r.own) {
            let mut cells = member_base(&member(), r.mode);
            cells.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
            apply_properties(self.sending, at, &mut cells, &r.properties)?;
            r.joined = Some(cells);
        }
        Ok(true)
    }

    /// The recipients' rows, in the order given.
    fn rows(&self) -> impl Iterator<Item = &Cells> {
        self.rows
            .iter()
            .map(|r| r.joined.as_ref().unwrap_or(&r.cells))
    }
}

/// Reads the campaign spec's source through the audience, as a send would (a `WHERE` on an ERP
/// source, the batch filter on a file), calling `each` with every row it keeps.
fn read_audience(
    s: &Sending,
    spec: &CampaignSpec,
    a: &WithAudience<'_>,
    mut each: impl FnMut(&RecipientBatch, usize) -> Result<()>,
) -> Result<()> {
    let layout = Arc::new(spec.columns.layout());
    let filter = Arc::new(
        SendAudience::compile(a.conditions, a.fields, &layout)
            .with_context(|| format!("sending {}", s.id))?,
    );
    let mut source_spec = spec.clone();
    if let SourceSpec::Erp(e) = &mut source_spec.source {
        e.audience = Some(filter.erp(spec, e));
    }
    let (src, _) = broadside_sources::open_source(&source_spec, layout)
        .with_context(|| format!("sending {}: reading the audience from the source", s.id))?;
    let mut src: Box<dyn Source> = match &spec.source {
        SourceSpec::Erp(_) => src,
        _ => Box::new(AudienceSource::new(src, filter)),
    };
    while let Some(b) = src
        .next_batch()
        .with_context(|| format!("sending {}: reading the audience from the source", s.id))?
    {
        for row in 0..b.len() {
            each(&b, row)?;
        }
    }
    Ok(())
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

/// The derived CSV, written to a temporary file as it is built (an audience may be millions of
/// rows).
struct CsvOut {
    path: PathBuf,
    file: BufWriter<std::fs::File>,
    columns: usize,
    line: String,
}

impl CsvOut {
    fn create(path: &Path, columns: usize) -> Result<CsvOut> {
        let file =
            std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
        Ok(CsvOut {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
            columns,
            line: String::new(),
        })
    }

    fn row<'a>(&mut self, cells: impl Iterator<Item = Option<&'a str>>) -> Result<()> {
        self.line.clear();
        push_row(&mut self.line, cells);
        self.file
            .write_all(self.line.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// A row the source could not read: its detail, as the first of one field more than the
    /// header has, which the CSV source reports as a malformed row (`errored`).
    fn unreadable(&mut self, detail: &str) -> Result<()> {
        let cells = std::iter::once(Some(detail)).chain(std::iter::repeat_n(None, self.columns));
        self.row(cells)
    }

    fn finish(self) -> Result<()> {
        let path = self.path;
        self.file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Moves the freshly written `tmp` to `path` unless `path` already holds the same bytes (then
/// `tmp` is removed), so an unchanged input keeps its modification time.
fn replace_if_changed(tmp: &Path, path: &Path) -> Result<()> {
    if same_content(tmp, path).with_context(|| format!("comparing {}", path.display()))? {
        std::fs::remove_file(tmp).with_context(|| format!("removing {}", tmp.display()))?;
        return Ok(());
    }
    std::fs::rename(tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Whether two files hold the same bytes (false if `b` does not exist).
fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    let Ok(meta) = std::fs::metadata(b) else {
        return Ok(false);
    };
    if std::fs::metadata(a)?.len() != meta.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; returns how many bytes it read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn recipient(v: Value) -> InlineRecipient {
        serde_json::from_value(v).unwrap()
    }

    fn cells(pairs: &[(&str, &str)]) -> Cells {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn member_row(pairs: &[(&str, Option<&str>)]) -> MemberRow {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(String::from)))
            .collect()
    }

    #[test]
    fn keys_are_the_ledgers() {
        let email = StdField::Email;
        assert_eq!(
            recipient_key(email, Some("  Ann@Example.COM ")),
            Some("ann@example.com".into())
        );
        assert_eq!(recipient_key(email, Some("  ")), None);
        assert_eq!(recipient_key(email, None), None);
        // account numbers are trimmed, not folded
        assert_eq!(
            recipient_key(StdField::AccountNumber, Some(" Ab-7 ")),
            Some("Ab-7".into())
        );
    }

    #[test]
    fn an_audience_member_with_an_inline_key_is_sent_once_as_the_inline_recipient() {
        let mut rows = InlineRows::new(4, StdField::Email);
        let extend = recipient(json!({"email": "Ann@X.no",
            "properties": {"tier": "gold", "city": null, "points": 7}}));
        rows.push(0, cells(&[("email", "Ann@X.no")]), None, &extend)
            .unwrap();
        let replace = recipient(json!({"email": "bob@x.no", "properties_mode": "replace",
            "properties": {"tier": "silver"}}));
        rows.push(1, cells(&[("email", "bob@x.no")]), None, &replace)
            .unwrap();
        let new = recipient(json!({"email": "new@x.no", "properties": {"first_name": "New"}}));
        rows.push(2, cells(&[("email", "new@x.no")]), None, &new)
            .unwrap();
        let by_id = member_row(&[
            ("email", Some("cy@x.no")),
            ("first_name", Some("Cy")),
            ("points", Some("3")),
        ]);
        let member = recipient(json!({"member_id": 12, "properties": {"tier": "id"}}));
        rows.push(3, Cells::new(), Some(&by_id), &member).unwrap();

        let ann = member_row(&[
            ("email", Some(" ann@x.NO")),
            ("first_name", Some("Ann")),
            ("city", Some("Oslo")),
            ("points", Some("1")),
            ("tier", None),
        ]);
        let bob = member_row(&[
            ("email", Some("bob@x.no")),
            ("first_name", Some("Bob")),
            ("city", Some("Bergen")),
            ("points", Some("2")),
        ]);
        // audience members with an inline key are taken; others are recipients of their own
        assert!(rows.claim(Some("ann@x.no"), || ann.clone()).unwrap());
        assert!(rows.claim(Some("bob@x.no"), || bob.clone()).unwrap());
        assert!(rows
            .claim(Some("cy@x.no"), || panic!("not needed"))
            .unwrap());
        assert!(!rows
            .claim(Some("dora@x.no"), || panic!("not needed"))
            .unwrap());
        assert!(!rows.claim(None, || panic!("not needed")).unwrap());
        // a second audience row with the same key is dropped too; the first one's data stays
        let ann2 = member_row(&[("email", Some("ann@x.no")), ("first_name", Some("Other"))]);
        assert!(rows.claim(Some("ann@x.no"), || ann2.clone()).unwrap());

        let out: Vec<&Cells> = rows.rows().collect();
        // extend: the member's row, the inline address, then the properties (null clears)
        assert_eq!(
            *out[0],
            cells(&[
                ("email", "Ann@X.no"),
                ("first_name", "Ann"),
                ("points", "7"),
                ("tier", "gold")
            ])
        );
        // replace: the member's standard fields, only the inline merge properties
        assert_eq!(
            *out[1],
            cells(&[
                ("email", "bob@x.no"),
                ("first_name", "Bob"),
                ("city", "Bergen"),
                ("tier", "silver")
            ])
        );
        // not in the audience: as given
        assert_eq!(
            *out[2],
            cells(&[("email", "new@x.no"), ("first_name", "New")])
        );
        // a member by id already is the member's row
        assert_eq!(
            *out[3],
            cells(&[
                ("email", "cy@x.no"),
                ("first_name", "Cy"),
                ("points", "3"),
                ("tier", "id")
            ])
        );
    }

    #[test]
    fn two_inline_recipients_with_one_key_fail_the_sending() {
        let mut rows = InlineRows::new(4, StdField::Email);
        let a = recipient(json!({"email": "ann@x.no"}));
        rows.push(0, cells(&[("email", "ann@x.no")]), None, &a)
            .unwrap();
        let m = member_row(&[("email", Some(" ANN@x.no "))]);
        let b = recipient(json!({"member_id": 5}));
        let e = rows
            .push(1, Cells::new(), Some(&m), &b)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "sending 4: recipients[1] is the same recipient as recipients[0] (email ann@x.no)"
        );
        // for mail keyed by account number, the key comes from the properties
        let mut mail = InlineRows::new(5, StdField::AccountNumber);
        let r = recipient(json!({"email": "a@x.no", "properties": {"account_number": "A1"}}));
        mail.push(0, cells(&[("email", "a@x.no")]), None, &r)
            .unwrap();
        assert!(mail.claim(Some("A1"), Vec::new).unwrap());
        assert!(!mail.claim(Some("a1"), Vec::new).unwrap());
    }

    /// A campaign spec over a CSV of five members (one line malformed) and a sending with an
    /// audience and inline recipients.
    fn fixture(dir: &Path) -> (PathBuf, Sending) {
        std::fs::write(
            dir.join("members.csv"),
            "Email,First,Country,Points,Id\n\
             ann@x.no,Ann,NO,10,1\n\
             bob@x.no,Bob,US,20,2\n\
             broken,line\n\
             Cy@X.no,Cy,NO,30,3\n\
             dora@x.no,Dora,NO,40,4\n",
        )
        .unwrap();
        let spec = dir.join("7.toml");
        std::fs::write(
            &spec,
            r#"campaign_id = "c7"
workspace_id = "w"
channel = "email"
[source]
type = "csv"
path = "members.csv"
[columns]
email = "Email"
first_name = "First"
country = "Country"
[columns.merge]
points = "Points"
member_id = "Id"
[[variants]]
name = "A"
weight = 1
template = "t"
[output]
store = "store"
[megasys]
hot_folder = "hot"
"#,
        )
        .unwrap();
        let recipients = broadside_campaigns::audience::Recipients::from_json(
            json!({
                "audience": {"type": "inline", "conditions": [{"condition_group": "member_properties",
                    "field": "country", "operator": "eq", "value": "NO"}]},
                "recipients": [
                    {"email": "new@x.no", "properties": {"first_name": "New", "tier": "t1"}},
                    {"email": "cy@x.no", "properties": {"tier": "t2", "points": "99"}},
                    {"member_id": 2, "properties": {"tier": "t3"}}
                ]
            })
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let s = Sending {
            id: 3,
            campaign_id: 7,
            status: broadside_campaigns::state::SendingStatus::Scheduled,
            schedule: broadside_campaigns::schedule::Schedule {
                when: broadside_campaigns::schedule::When::Immediate,
                prescheduled: false,
            },
            timing: None,
            recipients,
            prepared: None,
            recipient_count: None,
            error: None,
            created_at: 1,
            updated_at: 1,
        };
        (spec, s)
    }

    fn conditions(s: &Sending) -> Vec<Condition> {
        match &s.recipients.audience {
            Some(broadside_campaigns::audience::Audience::Inline { conditions }) => {
                conditions.clone()
            }
            _ => panic!("inline audience"),
        }
    }

    #[test]
    fn the_audience_rows_then_the_inline_recipients_are_written_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, s) = fixture(dir.path());
        let conds = conditions(&s);
        let fields = FieldMap::member_defaults();
        let out = dir.path().join("sendings");
        let with = || {
            Some(WithAudience {
                conditions: &conds,
                fields: &fields,
            })
        };
        let derived = materialise(&s, "run-3", &spec, &out, with()).unwrap();
        assert_eq!(derived, dir.path().join("7.run-3.toml"));
        let csv = out.join("recipients.csv");
        let text = std::fs::read_to_string(&csv).unwrap();
        let broken = format!(
            "{}:4: expected 5 fields, found 2",
            dir.path().join("members.csv").display()
        );
        // the audience (country NO) in source order without cy (an inline recipient), the
        // unreadable line kept as one, then the inline recipients in the order given
        let expect = format!(
            "email,first_name,country,member_id,points,tier\n\
             ann@x.no,Ann,NO,1,10,\n\
             \"{broken}\",,,,,,\n\
             dora@x.no,Dora,NO,4,40,\n\
             new@x.no,New,,,,t1\n\
             cy@x.no,Cy,NO,3,99,t2\n\
             bob@x.no,Bob,US,2,20,t3\n"
        );
        assert_eq!(text, expect);

        // rebuilt from the same sending and source, the input is the same file, untouched
        let before = std::fs::metadata(&csv).unwrap().modified().unwrap();
        let spec_before = std::fs::metadata(&derived).unwrap().modified().unwrap();
        materialise(&s, "run-3", &spec, &out, with()).unwrap();
        assert_eq!(std::fs::read_to_string(&csv).unwrap(), expect);
        assert_eq!(std::fs::metadata(&csv).unwrap().modified().unwrap(), before);
        assert_eq!(
            std::fs::metadata(&derived).unwrap().modified().unwrap(),
            spec_before
        );
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["recipients.csv"]);

        // the derived spec reads that file, the audience already applied: one decision per
        // row, the unreadable one errored
        let d = CampaignSpec::load(&derived).unwrap();
        assert!(matches!(&d.source, SourceSpec::Csv(c) if c.path == csv));
        assert_eq!(d.columns.merge.len(), 3);
        let dry = crate::send::send(&crate::send::SendOptions {
            spec: derived.clone(),
            dry_run: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dry.rows, 6);
        assert_eq!(
            dry.decisions.get("errored"),
            Some(&1),
            "{:?}",
            dry.decisions
        );
        assert_eq!(
            dry.reasons
                .iter()
                .find(|r| r.decision == "errored")
                .map(|r| r.reason.as_str()),
            Some("malformed_row")
        );

        // without the audience: only the inline recipients
        materialise(&s, "run-3", &spec, &out, None).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "email,first_name,country,member_id,points,tier",
                "new@x.no,New,,,,t1",
                "cy@x.no,,,,99,t2",
                "bob@x.no,Bob,US,2,20,t3"
            ]
        );
    }
}
