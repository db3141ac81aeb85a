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
    /// Email channel: also suppress what the workspace's events in the store say (hard
    /// bounces, complaints, unsubscribes), from a snapshot built when the run starts and kept
    /// with it. `true` by default.
    #[serde(default = "yes")]
    pub store_suppression: bool,
    /// Billing cap and other limits.
    #[serde(default)]
    pub caps: Caps,
    /// Holdout (control group) share in percent, `0 <= h < 100`.
    #[serde(default)]
    pub holdout_percent: f64,
    /// One message per person per run: `true` (the default) skips every later row whose
    /// recipient key repeats an earlier valid one as `duplicate`; `"household"` (mail) also
    /// treats one normalised address1 + zip as one recipient; `false` turns it off.
    #[serde(default)]
    pub dedupe: Dedupe,
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
    /// Mail channel: the printer the pieces go to (`kind = "lob" | "batch"`, approval rules,
    /// creative, billing). Kept as a table here and read by the send command, which owns the
    /// printer settings (docs/printers.md); without it, mail recipients go to IFUR files.
    #[serde(default)]
    pub printer: Option<toml::Table>,
    /// Directory relative paths are resolved against (the spec file's directory); not read from TOML.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn yes() -> bool {
    true
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
    /// Microsoft SQL Server ERP (see `docs/erp.md`); boxed, being much larger than the others.
    Erp(Box<ErpSourceSpec>),
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

/// ERP (SQL Server) source settings. See `docs/erp.md`.
///
/// Broadside wraps the query as `SELECT * FROM (query) AS bs_source [WHERE shard] ORDER BY
/// bs_source.[key_column]`, so the query itself must not end in `ORDER BY`: the order is always
/// the key's, which makes a resumed (replayed) or sharded run read the same rows in the same order.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ErpSourceSpec {
    /// Server host name or address.
    pub host: String,
    /// TCP port (default 1433; with `instance` and no port, the SQL Browser service is asked).
    #[serde(default)]
    pub port: Option<u16>,
    /// Named instance (`HOST\INSTANCE`), resolved through SQL Browser (UDP 1434) unless `port` is set.
    #[serde(default)]
    pub instance: Option<String>,
    /// Database name.
    pub database: String,
    /// SQL login name.
    pub user: String,
    /// Environment variable holding the password (never a literal). One of `password_env` and `password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (e.g. a Docker/Kubernetes secret); one trailing newline is ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS: `off` (only the login packet is encrypted), `on`, `required` (default), or
    /// `not_supported` (no TLS at all, for servers without it).
    #[serde(default)]
    pub encryption: ErpEncryption,
    /// Accept any server certificate (development only: it disables server authentication).
    #[serde(default)]
    pub trust_server_certificate: bool,
    /// PEM/DER file of the CA (or self-signed certificate) to trust instead of the system roots.
    #[serde(default)]
    pub trust_cert_ca: Option<PathBuf>,
    /// The recipient query. Values go in as typed parameters `@P1`, `@P2`, … (see `params`), never
    /// interpolated. No trailing `ORDER BY`: Broadside orders by `key_column`.
    pub query: String,
    /// Typed query parameters, bound in order to `@P1`, `@P2`, ….
    #[serde(default)]
    pub params: Vec<ErpParam>,
    /// A unique, non-null column of the query's result: the sort order of the read (so a resumed
    /// run replays the same rows in the same order) and the shard hash input.
    pub key_column: String,
    /// Seconds allowed for the TCP connection plus the login handshake.
    #[serde(default = "default_login_timeout")]
    pub login_timeout_secs: u64,
    /// Seconds the server may stay silent while a result is read (time to first row, or a
    /// mid-stream stall; a slow pipeline does not count). 0 waits forever.
    #[serde(default = "default_query_timeout")]
    pub query_timeout_secs: u64,
    /// This worker's share of a sharded send (`broadside send --shard I/N`); not read from TOML.
    #[serde(skip)]
    pub shard: Option<Shard>,
    /// The sending's audience as a filter on the query's result; set by the campaign service,
    /// not read from TOML.
    #[serde(skip)]
    pub audience: Option<ErpAudience>,
}

/// An audience translated for the ERP query: Broadside reads
/// `SELECT * FROM (query) AS bs_source WHERE (where_sql) … ORDER BY key`.
#[derive(Debug, Clone)]
pub struct ErpAudience {
    /// The WHERE fragment: allow-listed, quoted columns of `bs_source` and placeholders
    /// numbered after the query's own (`@P{params.len() + 1}`, …); never a value.
    pub where_sql: String,
    /// The fragment's values, bound after the query's own parameters.
    pub params: Vec<ErpParam>,
}

fn default_login_timeout() -> u64 {
    15
}

fn default_query_timeout() -> u64 {
    300
}

impl ErpSourceSpec {
    /// The port to connect to when none is configured and no instance is named.
    pub const DEFAULT_PORT: u16 = 1433;

    /// `host[\instance][:port]/database`, for messages (never contains the password).
    pub fn server(&self) -> String {
        let mut s = self.host.clone();
        if let Some(i) = &self.instance {
            s.push('\\');
            s.push_str(i);
        }
        match (self.port, &self.instance) {
            (Some(p), _) => s.push_str(&format!(":{p}")),
            (None, None) => s.push_str(&format!(":{}", Self::DEFAULT_PORT)),
            (None, Some(_)) => {}
        }
        format!("{s}/{}", self.database)
    }

    /// Every problem with these settings (prefixed `source.`).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.host.trim().is_empty() {
            p.push("source.host must not be empty".into());
        }
        if self.database.trim().is_empty() {
            p.push("source.database must not be empty".into());
        }
        if self.user.trim().is_empty() {
            p.push("source.user must not be empty".into());
        }
        match (&self.password_env, &self.password_file) {
            (None, None) => p.push(
                "source.password_env or source.password_file must name where the password is (never a literal)"
                    .into(),
            ),
            (Some(_), Some(_)) => {
                p.push("source.password_env and source.password_file: give only one".into())
            }
            (Some(e), None) if e.trim().is_empty() || e.contains('=') => {
                p.push(format!("source.password_env {e:?} is not an environment variable name"))
            }
            _ => {}
        }
        if self.port == Some(0) {
            p.push("source.port must be between 1 and 65535".into());
        }
        if self.key_column.trim().is_empty() {
            p.push("source.key_column must name a unique column of the query".into());
        }
        if self.query.trim().is_empty() {
            p.push("source.query must not be empty".into());
        } else if ends_with_order_by(&self.query) {
            p.push(
                "source.query must not end with ORDER BY: Broadside orders the rows by source.key_column itself"
                    .into(),
            );
        }
        if self.query.contains(';') && self.query.trim_end().trim_end_matches(';').contains(';') {
            p.push("source.query must be a single SELECT statement".into());
        }
        let max_param = max_param_ref(&self.query);
        if max_param > self.params.len() {
            p.push(format!(
                "source.query uses @P{max_param} but only {} source.params are given",
                self.params.len()
            ));
        }
        for (i, param) in self.params.iter().enumerate() {
            if let Err(e) = param.check() {
                p.push(format!("source.params[{i}] (@P{}): {e}", i + 1));
            }
        }
        if self.login_timeout_secs == 0 {
            p.push("source.login_timeout_secs must be greater than 0".into());
        }
        p
    }
}

/// Whether the query text's last clause is an `ORDER BY` (outside strings and comments).
fn ends_with_order_by(query: &str) -> bool {
    let code = strip_literals(query).to_ascii_uppercase();
    let Some(pos) = find_last_word(&code, "ORDER") else {
        return false;
    };
    // An ORDER BY inside parentheses (a window function, a subquery with TOP) is fine.
    let tail = &code[pos..];
    let mut depth = 0i32;
    for c in tail.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
    }
    let before = &code[..pos];
    let open = before.matches('(').count() as i32 - before.matches(')').count() as i32;
    open == 0 && depth <= 0 && tail[5..].trim_start().starts_with("BY")
}

fn find_last_word(code: &str, word: &str) -> Option<usize> {
    let b = code.as_bytes();
    let mut found = None;
    let mut from = 0;
    while let Some(i) = code[from..].find(word) {
        let at = from + i;
        let end = at + word.len();
        let ok_before = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        let ok_after = end >= b.len() || !(b[end].is_ascii_alphanumeric() || b[end] == b'_');
        if ok_before && ok_after {
            found = Some(at);
        }
        from = end;
    }
    found
}

/// The query with string literals, quoted identifiers and comments blanked out.
fn strip_literals(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '[' | '"' => {
                let close = if c == '[' { ']' } else { c };
                out.push(' ');
                while let Some(d) = chars.next() {
                    if d == close {
                        if chars.peek() == Some(&close) {
                            chars.next();
                            continue;
                        }
                        break;
                    }
                }
                out.push(' ');
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
                out.push('\n');
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

/// The highest `@Pn` the query refers to (0 when none).
fn max_param_ref(query: &str) -> usize {
    let code = strip_literals(query);
    let b = code.as_bytes();
    let mut max = 0;
    for i in 0..b.len() {
        if b[i] == b'@' && i + 1 < b.len() && (b[i + 1] == b'P' || b[i + 1] == b'p') {
            let digits: String = code[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                max = max.max(n);
            }
        }
    }
    max
}

/// TLS setting of the ERP connection (TDS `ENCRYPTION` pre-login option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErpEncryption {
    /// Only the login packet is encrypted.
    Off,
    /// Encrypt the whole session if the server can.
    On,
    /// Encrypt the whole session or refuse to connect.
    #[default]
    Required,
    /// No TLS at all, not even for the login (servers without TLS support only).
    NotSupported,
}

/// One typed query parameter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ErpParam {
    /// SQL type the value is sent as.
    #[serde(rename = "type")]
    pub sql_type: ErpParamType,
    /// The value (TOML string, integer, float or boolean as fits the type); omit for NULL.
    #[serde(default)]
    pub value: Option<ErpParamValue>,
}

/// SQL type of a query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErpParamType {
    /// `bit` (TOML boolean).
    Bit,
    /// `int` (TOML integer).
    Int,
    /// `bigint` (TOML integer).
    Bigint,
    /// `float` (TOML number).
    Float,
    /// `decimal` (TOML string such as `"12.50"`, exact).
    Decimal,
    /// `nvarchar` (TOML string).
    Nvarchar,
    /// `date` (TOML string `YYYY-MM-DD`).
    Date,
    /// `datetime2` (TOML string `YYYY-MM-DDTHH:MM:SS[.fffffff]`).
    Datetime2,
    /// `uniqueidentifier` (TOML string).
    Uniqueidentifier,
}

/// A parameter value as written in TOML.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ErpParamValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (decimals, dates, GUIDs and text).
    Text(String),
}

impl ErpParam {
    /// Checks the value fits the type.
    pub fn check(&self) -> std::result::Result<(), String> {
        use ErpParamType as T;
        use ErpParamValue as V;
        let Some(v) = &self.value else {
            return Ok(());
        };
        let ok = match (self.sql_type, v) {
            (T::Bit, V::Bool(_)) => true,
            (T::Int, V::Int(i)) => i32::try_from(*i).is_ok(),
            (T::Bigint, V::Int(_)) => true,
            (T::Float, V::Float(_) | V::Int(_)) => true,
            (T::Nvarchar, V::Text(_)) => true,
            (T::Decimal, V::Text(t)) => parse_decimal(t).is_some(),
            (T::Date, V::Text(t)) => chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").is_ok(),
            (T::Datetime2, V::Text(t)) => parse_datetime(t).is_some(),
            (T::Uniqueidentifier, V::Text(t)) => is_guid(t),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("value {v:?} is not a valid {:?}", self.sql_type).to_lowercase())
        }
    }
}

/// Parses `[-]digits[.digits]` into (unscaled value, scale), at most 38 digits.
pub fn parse_decimal(t: &str) -> Option<(i128, u8)> {
    let t = t.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || int.len() + frac.len() > 38 {
        return None;
    }
    let digits = format!("{int}{frac}");
    let v: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    Some((if neg { -v } else { v }, frac.len() as u8))
}

/// Parses a `datetime2` parameter value.
pub fn parse_datetime(t: &str) -> Option<chrono::NaiveDateTime> {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok())
}

fn is_guid(t: &str) -> bool {
    let t = t.trim_matches(|c| c == '{' || c == '}');
    let groups: Vec<&str> = t.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One worker's share of a sharded send: shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This worker's shard, `0..count`.
    pub index: u32,
    /// Number of shards.
    pub count: u32,
}

impl Shard {
    /// Parses `I/N` (0-based `I`, `I < N`).
    pub fn parse(s: &str) -> std::result::Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard {s:?} must be I/N, e.g. 0/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index {i:?} is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {s:?}: need 0 <= I < N and N >= 1"));
        }
        Ok(Shard { index, count })
    }

    /// The shard a recipient belongs to, by its key normalised as the validate stage does
    /// (trimmed; an email also lowercased), so every spelling of one person lands in one shard
    /// and deduplication holds across shards. Rows without a key go to shard 0, where the
    /// validate stage skips them with a reason.
    pub fn of_key(key_field: StdField, raw: Option<&str>, count: u32) -> u32 {
        let Some(k) = raw.map(crate::strings::trimmed).filter(|k| !k.is_empty()) else {
            return 0;
        };
        let h = match key_field {
            StdField::Email if k.is_ascii() => {
                xxhash_rust::xxh3::xxh3_64(k.to_ascii_lowercase().as_bytes())
            }
            StdField::Email => xxhash_rust::xxh3::xxh3_64(k.to_lowercase().as_bytes()),
            _ => xxhash_rust::xxh3::xxh3_64(k.as_bytes()),
        };
        (h % count.max(1) as u64) as u32
    }

    /// Whether this shard holds the recipient with key `raw` (see [`Shard::of_key`]).
    pub fn holds(&self, key_field: StdField, raw: Option<&str>) -> bool {
        Shard::of_key(key_field, raw, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
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

    /// The recipient layout this mapping gives: the mapped standard fields, then the merge
    /// fields, in the order of [`ColumnMapping::source_columns`].
    pub fn layout(&self) -> crate::model::RecipientLayout {
        let std: Vec<StdField> = StdField::ALL
            .into_iter()
            .filter(|f| self.get(*f).is_some())
            .collect();
        let merge: Vec<String> = self.merge.keys().cloned().collect();
        crate::model::RecipientLayout::new(&std, &merge)
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
    /// Repeated soft bounces (the store's suppression snapshot).
    SoftBounceRepeated,
}

impl SuppressionReason {
    /// The ledger reason this list produces.
    pub fn reason(self) -> Reason {
        match self {
            SuppressionReason::HardBounce => Reason::HardBounce,
            SuppressionReason::Unsubscribed => Reason::Unsubscribed,
            SuppressionReason::Complaint => Reason::Complaint,
            SuppressionReason::Blocklist => Reason::Blocklisted,
            SuppressionReason::SoftBounceRepeated => Reason::SoftBounceRepeated,
        }
    }
}

/// How a run deduplicates its recipients (`dedupe` in the spec).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dedupe {
    /// By the recipient key (normalised email, or account number for mail).
    #[default]
    Key,
    /// By the key and, for mail, by household (normalised address1 + zip).
    Household,
    /// Not at all: every valid row is decided on its own.
    Off,
}

impl Dedupe {
    /// The name recorded in the run record: `key`, `household` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dedupe::Key => "key",
            Dedupe::Household => "household",
            Dedupe::Off => "off",
        }
    }
}

impl Serialize for Dedupe {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Dedupe::Key => s.serialize_bool(true),
            Dedupe::Off => s.serialize_bool(false),
            Dedupe::Household => s.serialize_str("household"),
        }
    }
}

impl<'de> Deserialize<'de> for Dedupe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dedupe;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, \"key\" or \"household\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Dedupe, E> {
                Ok(if v { Dedupe::Key } else { Dedupe::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Dedupe, E> {
                match v {
                    "key" => Ok(Dedupe::Key),
                    "household" => Ok(Dedupe::Household),
                    "off" => Ok(Dedupe::Off),
                    other => Err(E::custom(format!(
                        "dedupe = {other:?} is not a dedupe mode: use true, false, \"key\" or \"household\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
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
    /// The template's content (a file with `{{merge_tags}}`), when the campaign keeps it: every
    /// tag must be a column of the campaign (checked before the send), and the campaign service
    /// syncs it to the email system's creative API when its content changed.
    #[serde(default)]
    pub content: Option<PathBuf>,
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
        if let Err(e) = crate::store::check_store_location(&self.output.store) {
            p.push(format!("output.store: {e}"));
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
        if self.channel == Channel::Email && self.printer.is_some() {
            p.push("[printer] is for the mail channel; this campaign's channel is email".into());
        }
        if self.dedupe == Dedupe::Household
            && (self.channel != Channel::Mail || c.address1.is_none() || c.zip.is_none())
        {
            p.push(
                "dedupe = \"household\" needs the mail channel with columns.address1 and columns.zip mapped"
                    .into(),
            );
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
            SourceSpec::Erp(e) => p.extend(e.problems()),
            SourceSpec::Parquet(_) => {}
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

    const ERP: &str = r#"
campaign_id = "c1"
channel = "email"
[source]
type = "erp"
host = "db"
database = "ERP"
user = "reader"
password_env = "PW"
key_column = "Id"
query = "SELECT Id, Email, First FROM dbo.Customers WHERE Active = @P1"
[[source.params]]
type = "bit"
value = true
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

    #[test]
    fn erp_spec_parses_with_defaults() {
        let s = parse(ERP).unwrap();
        let SourceSpec::Erp(e) = &s.source else {
            panic!("not erp")
        };
        assert_eq!(e.encryption, ErpEncryption::Required);
        assert_eq!(e.server(), "db:1433/ERP");
        assert_eq!(e.login_timeout_secs, 15);
        assert_eq!(e.params.len(), 1);
    }

    #[test]
    fn erp_spec_problems_are_all_listed() {
        let text = ERP
            .replace(
                "password_env = \"PW\"",
                "password_env = \"PW\"\npassword_file = \"pw\"",
            )
            .replace(
                "WHERE Active = @P1",
                "WHERE Active = @P1 AND Since > @P2 ORDER BY Id",
            )
            .replace("value = true", "value = 3");
        let err = parse(&text).unwrap_err().to_string();
        for want in [
            "give only one",
            "must not end with ORDER BY",
            "uses @P2 but only 1",
            "params[0] (@P1)",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
        let text = ERP.replace("password_env = \"PW\"\n", "");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("never a literal"));
        let text = ERP.replace("key_column = \"Id\"\n", "");
        assert!(parse(&text).unwrap_err().to_string().contains("key_column"));
        let text = ERP.replace("password_env", "password");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("unknown field `password`"));
    }

    #[test]
    fn order_by_is_refused_only_at_the_end_of_the_query() {
        assert!(ends_with_order_by("SELECT a FROM t ORDER BY a"));
        assert!(ends_with_order_by(
            "SELECT a FROM t order  by a DESC -- newest"
        ));
        assert!(!ends_with_order_by(
            "SELECT a, ROW_NUMBER() OVER (ORDER BY a) AS n FROM t"
        ));
        assert!(!ends_with_order_by("SELECT a FROM t WHERE b = 'ORDER BY'"));
        assert!(!ends_with_order_by("SELECT [order by] FROM t"));
        assert!(!ends_with_order_by(
            "SELECT a FROM (SELECT TOP 10 a FROM t ORDER BY a) AS x"
        ));
    }

    #[test]
    fn params_check_their_values() {
        let p = |t: ErpParamType, v: ErpParamValue| ErpParam {
            sql_type: t,
            value: Some(v),
        };
        assert!(
            p(ErpParamType::Decimal, ErpParamValue::Text("-12.50".into()))
                .check()
                .is_ok()
        );
        assert_eq!(parse_decimal("-12.50"), Some((-1250, 2)));
        assert!(p(ErpParamType::Decimal, ErpParamValue::Text("1e3".into()))
            .check()
            .is_err());
        assert!(p(ErpParamType::Int, ErpParamValue::Int(1 << 40))
            .check()
            .is_err());
        assert!(p(ErpParamType::Bigint, ErpParamValue::Int(1 << 40))
            .check()
            .is_ok());
        assert!(
            p(ErpParamType::Date, ErpParamValue::Text("2024-02-30".into()))
                .check()
                .is_err()
        );
        assert!(p(
            ErpParamType::Uniqueidentifier,
            ErpParamValue::Text("{6F9619FF-8B86-D011-B42D-00C04FC964FF}".into())
        )
        .check()
        .is_ok());
        assert_eq!(max_param_ref("SELECT @P12, '@P99' FROM t -- @P77"), 12);
    }

    #[test]
    fn every_spelling_of_one_recipient_lands_in_one_shard() {
        let e = StdField::Email;
        for n in [2, 3, 7] {
            for (a, b) in [
                ("ann@x.org", " Ann@X.ORG\t"),
                ("åsa@døme.no", "ÅSA@DØME.NO"),
            ] {
                assert_eq!(Shard::of_key(e, Some(a), n), Shard::of_key(e, Some(b), n));
            }
            assert_eq!(Shard::of_key(e, None, n), 0);
            assert_eq!(Shard::of_key(e, Some("  "), n), 0);
            // An account number is trimmed, not lowercased (as the validate stage keys it).
            let acct = StdField::AccountNumber;
            assert_eq!(
                Shard::of_key(acct, Some(" A-17 "), n),
                Shard::of_key(acct, Some("A-17"), n)
            );
        }
        // Keys spread over the shards.
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[Shard::of_key(e, Some(&format!("p{i}@example.com")), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        assert!(
            Shard { index: 1, count: 4 }.holds(e, Some("p1@example.com"))
                == (Shard::of_key(e, Some("P1@example.com"), 4) == 1)
        );
    }

    #[test]
    fn shards_parse() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        assert!(Shard::parse("4/4").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("1").is_err());
    }
}
