//! The campaign spec: a TOML file that says where recipients come from, how they are decided and where they go.
//!
//! Every field is documented in `docs/campaign-spec.md`; `examples/*.toml` are parsed by a test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Reason, StdField};

/// A whole campaign spec.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    /// Stable campaign identifier: letters, digits, `-` and `_`. Part of the split hash and of file names.
    pub campaign_id: String,
    /// Tenant the campaign's ledger and events belong to.
    #[serde(default = "default_workspace")]
    pub workspace_id: String,
    /// `email` or `mail`.
    pub channel: Channel,
    /// Where recipients come from.
    pub source: SourceSpec,
    /// Maps recipient fields to source column names.
    #[serde(default)]
    pub columns: ColumnMapping,
    /// Suppression lists, each with the reason it carries.
    #[serde(default)]
    pub suppression: Vec<SuppressionListSpec>,
    /// Billing cap and other limits.
    #[serde(default)]
    pub caps: Caps,
    /// Holdout (control group) share in percent, `0 <= h < 100`.
    #[serde(default)]
    pub holdout_percent: f64,
    /// A/B variants with weights and templates; at least one.
    pub variants: Vec<VariantSpec>,
    /// Mail-channel rules.
    #[serde(default)]
    pub mail: MailRules,
    /// Where output goes.
    pub output: OutputSpec,
    /// MegaSys hot-folder delivery (email channel).
    #[serde(default)]
    pub megasys: Option<MegasysSpec>,
    /// Directory relative paths are resolved against (the spec file's directory); not read from TOML.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_workspace() -> String {
    "default".to_string()
}

/// Delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Email through MegaSys: needs a valid email.
    Email,
    /// Direct mail through printers: needs a postal address.
    Mail,
}

/// Recipient source.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceSpec {
    /// A CSV file with a header row.
    Csv(CsvSourceSpec),
    /// A Parquet file.
    Parquet(ParquetSourceSpec),
    /// Deterministic generated recipients (`broadside generate` semantics).
    Synthetic(SyntheticSourceSpec),
    /// Microsoft SQL Server ERP (see issue "ERP source").
    Erp(ErpSourceSpec),
}

/// CSV source settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CsvSourceSpec {
    /// Path to the file.
    pub path: PathBuf,
    /// Field delimiter, one ASCII character.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
}

fn default_delimiter() -> char {
    ','
}

/// Parquet source settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSourceSpec {
    /// Path to the file.
    pub path: PathBuf,
}

/// Synthetic source settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSourceSpec {
    /// Number of recipients.
    pub rows: u64,
    /// Generator seed: the same seed gives the same recipients.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Share of deliberately invalid rows, `0..=1`.
    #[serde(default = "default_invalid_share")]
    pub invalid_share: f64,
}

fn default_seed() -> u64 {
    42
}

fn default_invalid_share() -> f64 {
    0.02
}

/// ERP (SQL Server) source settings. Reading from it arrives with the ERP source issue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ErpSourceSpec {
    /// Server host name.
    pub host: String,
    /// TCP port.
    #[serde(default = "default_mssql_port")]
    pub port: u16,
    /// Database name.
    pub database: String,
    /// Login name.
    pub user: String,
    /// Environment variable holding the password (never a literal).
    pub password_env: String,
    /// The recipient query; must `ORDER BY` a unique key for resumable sends.
    pub query: String,
}

fn default_mssql_port() -> u16 {
    1433
}

/// Which source column feeds each recipient field. Unmapped fields are absent.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// Email column.
    pub email: Option<String>,
    /// First-name column.
    pub first_name: Option<String>,
    /// Last-name column.
    pub last_name: Option<String>,
    /// Account-number column.
    pub account_number: Option<String>,
    /// Address line 1 column.
    pub address1: Option<String>,
    /// Address line 2 column.
    pub address2: Option<String>,
    /// City column.
    pub city: Option<String>,
    /// State column.
    pub state: Option<String>,
    /// Zip column.
    pub zip: Option<String>,
    /// Country column.
    pub country: Option<String>,
    /// Extra merge fields: merge name → source column.
    #[serde(default)]
    pub merge: BTreeMap<String, String>,
}

impl ColumnMapping {
    /// The source column mapped to a standard field.
    pub fn get(&self, f: StdField) -> Option<&str> {
        match f {
            StdField::Email => self.email.as_deref(),
            StdField::FirstName => self.first_name.as_deref(),
            StdField::LastName => self.last_name.as_deref(),
            StdField::AccountNumber => self.account_number.as_deref(),
            StdField::Address1 => self.address1.as_deref(),
            StdField::Address2 => self.address2.as_deref(),
            StdField::City => self.city.as_deref(),
            StdField::State => self.state.as_deref(),
            StdField::Zip => self.zip.as_deref(),
            StdField::Country => self.country.as_deref(),
        }
    }

    /// The standard-column mapping used by files from `broadside generate`.
    pub fn generated() -> Self {
        ColumnMapping {
            email: Some("email".into()),
            first_name: Some("first_name".into()),
            last_name: Some("last_name".into()),
            account_number: Some("account_number".into()),
            address1: Some("address1".into()),
            address2: Some("address2".into()),
            city: Some("city".into()),
            state: Some("state".into()),
            zip: Some("zip".into()),
            country: Some("country".into()),
            merge: BTreeMap::from([("points".to_string(), "points".to_string())]),
        }
    }

    /// Source columns in recipient-layout order: mapped standard fields, then merge fields.
    pub fn source_columns(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = StdField::ALL
            .into_iter()
            .filter_map(|f| self.get(f).map(|c| (f.name().to_string(), c.to_string())))
            .collect();
        out.extend(self.merge.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

/// One suppression list file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionListSpec {
    /// CSV (with header) or Parquet file; the format is chosen by extension.
    pub path: PathBuf,
    /// What a match means.
    pub reason: SuppressionReason,
    /// The column holding the key (email by default).
    #[serde(default = "default_suppression_column")]
    pub column: String,
}

fn default_suppression_column() -> String {
    "email".to_string()
}

/// Why a suppression list suppresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// Hard bounces.
    HardBounce,
    /// Unsubscribes.
    Unsubscribed,
    /// Spam complaints.
    Complaint,
    /// Organisation blocklist.
    Blocklist,
}

impl SuppressionReason {
    /// The ledger reason this list produces.
    pub fn reason(self) -> Reason {
        match self {
            SuppressionReason::HardBounce => Reason::HardBounce,
            SuppressionReason::Unsubscribed => Reason::Unsubscribed,
            SuppressionReason::Complaint => Reason::Complaint,
            SuppressionReason::Blocklist => Reason::Blocklisted,
        }
    }
}

/// Limits.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    /// At most this many eligible recipients (after validation and suppression, in input order) go on; the rest are skipped with `cap_exceeded`.
    pub billing_cap: Option<u64>,
}

/// One A/B variant.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    /// Variant name: letters, digits, `-` and `_`.
    pub name: String,
    /// Relative weight (> 0).
    pub weight: u32,
    /// Template name MegaSys merges this variant's IFUR file into.
    pub template: String,
}

/// Mail-channel rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MailRules {
    /// Countries mailed to (compared case-insensitively); others are skipped as `international`.
    #[serde(default = "default_countries")]
    pub countries: Vec<String>,
}

impl Default for MailRules {
    fn default() -> Self {
        MailRules {
            countries: default_countries(),
        }
    }
}

fn default_countries() -> Vec<String> {
    ["US", "USA", "United States", "United States of America"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// Output settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Store root: ledger, run records, submitted events and IFUR staging live under it.
    pub store: PathBuf,
    /// IFUR files roll after this many detail lines.
    #[serde(default = "default_roll_rows")]
    pub ifur_roll_rows: u64,
    /// Recipient-log part files hold this many input rows.
    #[serde(default = "default_ledger_part_rows")]
    pub ledger_part_rows: u64,
}

fn default_roll_rows() -> u64 {
    500_000
}

fn default_ledger_part_rows() -> u64 {
    1_048_576
}

/// MegaSys hot-folder delivery.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MegasysSpec {
    /// The folder MegaSys watches.
    pub hot_folder: PathBuf,
}

fn is_safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl CampaignSpec {
    /// Reads, parses and validates a spec file; relative paths resolve against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, path, base)
    }

    /// Parses and validates spec text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path, base_dir: PathBuf) -> Result<Self> {
        let mut spec: CampaignSpec = toml::from_str(text).map_err(|e| Error::Spec {
            path: origin.to_path_buf(),
            problems: vec![e.to_string().trim_end().to_string()],
        })?;
        spec.base_dir = base_dir;
        let problems = spec.validate();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(Error::Spec {
                path: origin.to_path_buf(),
                problems,
            })
        }
    }

    /// Every problem with the spec at once (empty when it is usable).
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !is_safe_id(&self.campaign_id) {
            p.push(format!(
                "campaign_id {:?} must be 1-128 letters, digits, '-' or '_'",
                self.campaign_id
            ));
        }
        if !is_safe_id(&self.workspace_id) {
            p.push(format!(
                "workspace_id {:?} must be 1-128 letters, digits, '-' or '_'",
                self.workspace_id
            ));
        }
        if self.variants.is_empty() {
            p.push("variants: at least one [[variants]] entry is needed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            if !is_safe_id(&v.name) {
                p.push(format!(
                    "variants[{i}].name {:?} must be 1-128 letters, digits, '-' or '_'",
                    v.name
                ));
            }
            if !seen.insert(v.name.as_str()) {
                p.push(format!("variants[{i}].name {:?} is used twice", v.name));
            }
            if v.weight == 0 {
                p.push(format!("variants[{i}].weight must be greater than 0"));
            }
            if v.template.trim().is_empty() {
                p.push(format!("variants[{i}].template must not be empty"));
            }
        }
        if self.variants.len() > 200 {
            p.push("variants: at most 200 variants are supported".into());
        }
        if !(0.0..100.0).contains(&self.holdout_percent) {
            p.push(format!(
                "holdout_percent {} must be at least 0 and below 100",
                self.holdout_percent
            ));
        }
        if self.caps.billing_cap == Some(0) {
            p.push("caps.billing_cap must be greater than 0 (omit it for no cap)".into());
        }
        if self.output.ifur_roll_rows == 0 {
            p.push("output.ifur_roll_rows must be greater than 0".into());
        }
        if self.output.ledger_part_rows == 0 {
            p.push("output.ledger_part_rows must be greater than 0".into());
        }
        let c = &self.columns;
        match self.channel {
            Channel::Email => {
                if c.email.is_none() {
                    p.push("columns.email must be mapped for the email channel".into());
                }
                if self.megasys.is_none() {
                    p.push("[megasys] hot_folder is needed for the email channel".into());
                }
            }
            Channel::Mail => {
                for f in [StdField::Address1, StdField::Zip, StdField::Country] {
                    if c.get(f).is_none() {
                        p.push(format!(
                            "columns.{} must be mapped for the mail channel",
                            f.name()
                        ));
                    }
                }
                if c.email.is_none() && c.account_number.is_none() {
                    p.push(
                        "columns.email or columns.account_number must be mapped: it is the recipient key"
                            .into(),
                    );
                }
            }
        }
        if c.first_name.is_none() && c.last_name.is_none() {
            p.push("columns.first_name or columns.last_name must be mapped".into());
        }
        for name in c.merge.keys() {
            if StdField::ALL.iter().any(|f| f.name() == name) {
                p.push(format!(
                    "columns.merge.{name} clashes with the standard field of that name"
                ));
            }
            if !is_safe_id(name) {
                p.push(format!(
                    "columns.merge.{name}: merge names must be letters, digits, '-' or '_'"
                ));
            }
        }
        match &self.source {
            SourceSpec::Csv(s) => {
                if !s.delimiter.is_ascii() || s.delimiter == '"' || s.delimiter == '\n' {
                    p.push(format!(
                        "source.delimiter {:?} must be one ASCII character other than '\"' and newline",
                        s.delimiter
                    ));
                }
            }
            SourceSpec::Synthetic(s) => {
                if !(0.0..=1.0).contains(&s.invalid_share) {
                    p.push("source.invalid_share must be between 0 and 1".into());
                }
            }
            SourceSpec::Parquet(_) | SourceSpec::Erp(_) => {}
        }
        p
    }

    /// Resolves a spec path against the spec file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The recipient key field: email for the email channel; for mail, the account number when mapped, else email.
    pub fn key_field(&self) -> StdField {
        match self.channel {
            Channel::Mail if self.columns.account_number.is_some() => StdField::AccountNumber,
            _ => StdField::Email,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
campaign_id = "c1"
channel = "email"
[source]
type = "csv"
path = "r.csv"
[columns]
email = "Email"
first_name = "First"
[[variants]]
name = "A"
weight = 1
template = "t"
[output]
store = "data"
[megasys]
hot_folder = "hot"
"#;

    fn parse(text: &str) -> Result<CampaignSpec> {
        CampaignSpec::parse(text, Path::new("spec.toml"), PathBuf::from("/base"))
    }

    #[test]
    fn minimal_spec_parses_with_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.workspace_id, "default");
        assert_eq!(s.output.ifur_roll_rows, 500_000);
        assert_eq!(s.resolve(Path::new("r.csv")), PathBuf::from("/base/r.csv"));
        assert_eq!(s.key_field(), StdField::Email);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[output]", "[output]\nroll = 5");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `roll`"), "{err}");
        assert!(err.contains("spec.toml"), "{err}");
    }

    #[test]
    fn unknown_key_inside_tagged_source_is_named() {
        let text = MINIMAL.replace("path = \"r.csv\"", "path = \"r.csv\"\nheaderz = true");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("headerz"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let text = MINIMAL
            .replace(
                "campaign_id = \"c1\"",
                "campaign_id = \"bad id\"\nholdout_percent = 100",
            )
            .replace("weight = 1", "weight = 0");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("campaign_id"), "{err}");
        assert!(err.contains("holdout_percent"), "{err}");
        assert!(err.contains("weight"), "{err}");
    }

    #[test]
    fn mail_channel_requires_address_fields() {
        let text = MINIMAL.replace("channel = \"email\"", "channel = \"mail\"");
        let err = parse(&text).unwrap_err().to_string();
        for f in ["address1", "zip", "country"] {
            assert!(err.contains(&format!("columns.{f}")), "{err}");
        }
    }
}
