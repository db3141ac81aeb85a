//! Who a sending goes to: an audience (a stored one by id, or inline conditions), inline
//! recipients, and the channel preference used per recipient.
//!
//! Conditions are checked against an allow-list of fields ([`FieldMap`]: condition group +
//! field → column and kind) and translated two ways that select the same rows:
//! [`Conditions::to_sql`] gives a WHERE fragment with placeholders and a list of typed
//! parameters for the ERP query (values never appear in the SQL text; columns are quoted
//! identifiers from the allow-list), and [`Conditions::matches`] is the same filter as a row
//! predicate for file sources.
//!
//! Conditions are ANDed. Text comparisons by `match`, `contains` and `starts_with` fold ASCII
//! case only (what SQLite's `LOWER` does; SQL Server and PostgreSQL fold more, so non-ASCII
//! letters may match there and not in files). `=`-style operators compare exactly (SQL
//! Server's default collation is case-insensitive: pick a case-sensitive one or use `match`).
//! A missing cell (SQL NULL, an empty or unparseable file cell) fails every operator except
//! `ne` and `not_set`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How a field's values are typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    /// Text.
    Text,
    /// Whole numbers.
    Integer,
    /// Decimal numbers.
    Real,
}

/// A field conditions may use: group + field name → a column of the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDef {
    /// The condition group (`member_properties`).
    pub group: String,
    /// The field name in conditions (`first_name`).
    pub field: String,
    /// The source column (quoted as an identifier in SQL).
    pub column: String,
    /// How values are typed.
    pub kind: FieldKind,
}

/// The allow-list of fields conditions may name.
#[derive(Debug, Clone, Default)]
pub struct FieldMap {
    fields: BTreeMap<(String, String), FieldDef>,
}

impl FieldMap {
    /// Builds the allow-list; a column name must be a plain identifier (letters, digits, `_`).
    pub fn new(defs: impl IntoIterator<Item = FieldDef>) -> Result<FieldMap> {
        let mut fields = BTreeMap::new();
        for d in defs {
            let plain = !d.column.is_empty()
                && d.column
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !d.column.as_bytes()[0].is_ascii_digit();
            if !plain {
                return Err(Error::invalid(
                    format!("fields.{}.{}.column", d.group, d.field),
                    format!(
                        "{:?} is not a plain column name (letters, digits, _)",
                        d.column
                    ),
                ));
            }
            fields.insert((d.group.clone(), d.field.clone()), d);
        }
        Ok(FieldMap { fields })
    }

    /// The member fields `broadside serve` allows by default: `member_properties.` email,
    /// first_name, last_name, city, country, postal_code and language (text, columns of the
    /// same name) and member_id (integer).
    pub fn member_defaults() -> FieldMap {
        let text = [
            "email",
            "first_name",
            "last_name",
            "city",
            "country",
            "postal_code",
            "language",
        ];
        let mut defs: Vec<FieldDef> = text
            .iter()
            .map(|f| FieldDef {
                group: "member_properties".into(),
                field: (*f).into(),
                column: (*f).into(),
                kind: FieldKind::Text,
            })
            .collect();
        defs.push(FieldDef {
            group: "member_properties".into(),
            field: "member_id".into(),
            column: "member_id".into(),
            kind: FieldKind::Integer,
        });
        FieldMap::new(defs).expect("default columns are plain names")
    }

    /// Every allowed field, ordered by group and field.
    pub fn defs(&self) -> impl Iterator<Item = &FieldDef> {
        self.fields.values()
    }

    fn get(&self, group: &str, field: &str) -> Option<&FieldDef> {
        self.fields.get(&(group.to_string(), field.to_string()))
    }

    fn names(&self) -> String {
        self.fields
            .keys()
            .map(|(g, f)| format!("{g}.{f}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A typed value: a SQL parameter or a cell of a row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    /// Missing.
    Null,
    /// A whole number.
    Int(i64),
    /// A decimal number.
    Real(f64),
    /// Text.
    Text(String),
}

impl Scalar {
    /// Types a file cell as `kind`; empty or unparseable cells are [`Scalar::Null`].
    pub fn from_text(kind: FieldKind, text: Option<&str>) -> Scalar {
        let Some(t) = text.filter(|t| !t.is_empty()) else {
            return Scalar::Null;
        };
        match kind {
            FieldKind::Text => Scalar::Text(t.to_string()),
            FieldKind::Integer => t.trim().parse().map(Scalar::Int).unwrap_or(Scalar::Null),
            FieldKind::Real => t.trim().parse().map(Scalar::Real).unwrap_or(Scalar::Null),
        }
    }

    fn cmp(&self, other: &Scalar) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Scalar::Int(a), Scalar::Int(b)) => Some(a.cmp(b)),
            (Scalar::Int(a), Scalar::Real(b)) => (*a as f64).partial_cmp(b),
            (Scalar::Real(a), Scalar::Int(b)) => a.partial_cmp(&(*b as f64)),
            (Scalar::Real(a), Scalar::Real(b)) => a.partial_cmp(b),
            // byte order: SQLite's BINARY collation
            (Scalar::Text(a), Scalar::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            _ => None,
        }
    }
}

#[cfg(test)]
impl rusqlite::ToSql for Scalar {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as V};
        Ok(ToSqlOutput::Owned(match self {
            Scalar::Null => V::Null,
            Scalar::Int(i) => V::Integer(*i),
            Scalar::Real(r) => V::Real(*r),
            Scalar::Text(t) => V::Text(t.clone()),
        }))
    }
}

/// A condition operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// Equal.
    Eq,
    /// Not equal, or missing.
    Ne,
    /// Equal ignoring ASCII case (text fields).
    Match,
    /// Contains, ignoring ASCII case (text fields).
    Contains,
    /// Starts with, ignoring ASCII case (text fields).
    StartsWith,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Equal to one of a non-empty array.
    In,
    /// Present.
    IsSet,
    /// Missing.
    NotSet,
}

/// One condition as the API receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The field's namespace (`member_properties`).
    pub condition_group: String,
    /// The field.
    pub field: String,
    /// The operator.
    pub operator: Operator,
    /// The value (an array for `in`; absent for `is_set` / `not_set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Which SQL dialect a filter is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlDialect {
    /// `?` placeholders, `"col"` identifiers.
    Sqlite,
    /// `$1` placeholders, `"col"` identifiers.
    Postgres,
    /// `@P1` placeholders (tiberius), `[col]` identifiers.
    MsSql,
}

impl SqlDialect {
    fn placeholder(self, n: usize) -> String {
        match self {
            SqlDialect::Sqlite => "?".to_string(),
            SqlDialect::Postgres => format!("${n}"),
            SqlDialect::MsSql => format!("@P{n}"),
        }
    }

    fn ident(self, col: &str) -> String {
        // FieldMap only admits [A-Za-z_][A-Za-z0-9_]*, so quoting cannot be escaped out of.
        match self {
            SqlDialect::MsSql => format!("[{col}]"),
            _ => format!("\"{col}\""),
        }
    }
}

/// A WHERE fragment and its parameters, in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlFilter {
    /// The fragment (`("first_name" = ?) AND (...)`); `1=1` when there is no condition.
    pub where_sql: String,
    /// The parameters, in order.
    pub params: Vec<Scalar>,
}

#[derive(Debug, Clone)]
struct Compiled {
    column: String,
    op: Operator,
    values: Vec<Scalar>,
}

/// Checked, typed conditions.
#[derive(Debug, Clone)]
pub struct Conditions {
    items: Vec<Compiled>,
}

impl Conditions {
    /// Checks conditions against the allow-list; errors name `{field}[i].field` / `.value`.
    pub fn compile(conds: &[Condition], fields: &FieldMap, field: &str) -> Result<Conditions> {
        let mut items = Vec::with_capacity(conds.len());
        for (i, c) in conds.iter().enumerate() {
            let at = |name: &str| format!("{field}[{i}].{name}");
            let def = fields.get(&c.condition_group, &c.field).ok_or_else(|| {
                Error::invalid(
                    at("field"),
                    format!(
                        "{}.{} is not a known field; known: {}",
                        c.condition_group,
                        c.field,
                        fields.names()
                    ),
                )
            })?;
            let text_only = matches!(
                c.operator,
                Operator::Match | Operator::Contains | Operator::StartsWith
            );
            if text_only && def.kind != FieldKind::Text {
                return Err(Error::invalid(
                    at("operator"),
                    format!(
                        "{:?} needs a text field; {} is {:?}",
                        c.operator, c.field, def.kind
                    ),
                ));
            }
            let values = match (c.operator, &c.value) {
                (Operator::IsSet | Operator::NotSet, None | Some(Value::Null)) => Vec::new(),
                (Operator::IsSet | Operator::NotSet, Some(_)) => {
                    return Err(Error::invalid(
                        at("value"),
                        "must be absent for is_set / not_set",
                    ))
                }
                (_, None | Some(Value::Null)) => {
                    return Err(Error::invalid(at("value"), "missing"))
                }
                (Operator::In, Some(Value::Array(vs))) if !vs.is_empty() => vs
                    .iter()
                    .map(|v| typed(v, def.kind, &at("value")))
                    .collect::<Result<_>>()?,
                (Operator::In, Some(_)) => {
                    return Err(Error::invalid(
                        at("value"),
                        "must be a non-empty array for in",
                    ))
                }
                (_, Some(v)) => vec![typed(v, def.kind, &at("value"))?],
            };
            let values = if text_only {
                values
                    .into_iter()
                    .map(|v| match v {
                        Scalar::Text(t) => Scalar::Text(t.to_ascii_lowercase()),
                        other => other,
                    })
                    .collect()
            } else {
                values
            };
            items.push(Compiled {
                column: def.column.clone(),
                op: c.operator,
                values,
            });
        }
        Ok(Conditions { items })
    }

    /// The conditions as a parameterised WHERE fragment.
    pub fn to_sql(&self, dialect: SqlDialect) -> SqlFilter {
        self.to_sql_with(dialect, 1, &|col| dialect.ident(col))
    }

    /// Like [`Conditions::to_sql`], for a query that already has parameters: placeholders are
    /// numbered from `first` (ignored for `?`), and `ident` writes each allow-listed column as
    /// SQL (a caller that maps columns onto another name quotes that name itself).
    pub fn to_sql_with(
        &self,
        dialect: SqlDialect,
        first: usize,
        ident: &dyn Fn(&str) -> String,
    ) -> SqlFilter {
        let mut params = Vec::new();
        let mut parts = Vec::new();
        let base = first.max(1) - 1;
        let mut next = |params: &mut Vec<Scalar>, v: Scalar| {
            params.push(v);
            dialect.placeholder(base + params.len())
        };
        for c in &self.items {
            let col = ident(&c.column);
            let one =
                |params: &mut Vec<Scalar>,
                 next: &mut dyn FnMut(&mut Vec<Scalar>, Scalar) -> String| {
                    next(params, c.values[0].clone())
                };
            let part = match c.op {
                Operator::Eq => format!("{col} = {}", one(&mut params, &mut next)),
                Operator::Ne => {
                    format!("{col} IS NULL OR {col} <> {}", one(&mut params, &mut next))
                }
                Operator::Gt => format!("{col} > {}", one(&mut params, &mut next)),
                Operator::Gte => format!("{col} >= {}", one(&mut params, &mut next)),
                Operator::Lt => format!("{col} < {}", one(&mut params, &mut next)),
                Operator::Lte => format!("{col} <= {}", one(&mut params, &mut next)),
                Operator::Match => format!("LOWER({col}) = {}", one(&mut params, &mut next)),
                Operator::Contains | Operator::StartsWith => {
                    let Scalar::Text(t) = &c.values[0] else {
                        unreachable!("compile types text operators as text")
                    };
                    let lead = if c.op == Operator::Contains { "%" } else { "" };
                    let pattern = format!("{lead}{}%", escape_like(t));
                    format!(
                        "LOWER({col}) LIKE {} ESCAPE '\\'",
                        next(&mut params, Scalar::Text(pattern))
                    )
                }
                Operator::In => {
                    let ph: Vec<String> = c
                        .values
                        .iter()
                        .map(|v| next(&mut params, v.clone()))
                        .collect();
                    format!("{col} IN ({})", ph.join(", "))
                }
                Operator::IsSet => format!("{col} IS NOT NULL"),
                Operator::NotSet => format!("{col} IS NULL"),
            };
            parts.push(format!("({part})"));
        }
        SqlFilter {
            where_sql: if parts.is_empty() {
                "1=1".to_string()
            } else {
                parts.join(" AND ")
            },
            params,
        }
    }

    /// Whether a row passes; `cell` returns a column's typed value.
    pub fn matches(&self, cell: &dyn Fn(&str) -> Scalar) -> bool {
        self.items.iter().all(|c| {
            let v = cell(&c.column);
            let ord = |want: &[std::cmp::Ordering]| {
                v.cmp(&c.values[0]).is_some_and(|o| want.contains(&o))
            };
            use std::cmp::Ordering::*;
            match c.op {
                Operator::Eq => ord(&[Equal]),
                Operator::Ne => v == Scalar::Null || !ord(&[Equal]),
                Operator::Gt => ord(&[Greater]),
                Operator::Gte => ord(&[Greater, Equal]),
                Operator::Lt => ord(&[Less]),
                Operator::Lte => ord(&[Less, Equal]),
                Operator::In => c.values.iter().any(|w| v.cmp(w) == Some(Equal)),
                Operator::IsSet => v != Scalar::Null,
                Operator::NotSet => v == Scalar::Null,
                Operator::Match | Operator::Contains | Operator::StartsWith => {
                    let (Scalar::Text(t), Scalar::Text(w)) = (&v, &c.values[0]) else {
                        return false;
                    };
                    let t = t.to_ascii_lowercase();
                    match c.op {
                        Operator::Match => t == *w,
                        Operator::Contains => t.contains(w.as_str()),
                        _ => t.starts_with(w.as_str()),
                    }
                }
            }
        })
    }
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn typed(v: &Value, kind: FieldKind, field: &str) -> Result<Scalar> {
    let wrong = || Error::invalid(field, format!("{v} is not a {kind:?} value").to_lowercase());
    match (kind, v) {
        (FieldKind::Text, Value::String(s)) => Ok(Scalar::Text(s.clone())),
        (FieldKind::Integer, Value::Number(n)) => n.as_i64().map(Scalar::Int).ok_or_else(wrong),
        (FieldKind::Integer, Value::String(s)) => {
            s.trim().parse().map(Scalar::Int).map_err(|_| wrong())
        }
        (FieldKind::Real, Value::Number(n)) => n.as_f64().map(Scalar::Real).ok_or_else(wrong),
        (FieldKind::Real, Value::String(s)) => {
            s.trim().parse().map(Scalar::Real).map_err(|_| wrong())
        }
        _ => Err(wrong()),
    }
}

/// A sending's audience: a stored one by id, or inline conditions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Audience {
    /// A stored audience.
    Reference {
        /// Its id.
        id: i64,
    },
    /// Conditions given with the sending.
    Inline {
        /// The conditions (ANDed).
        conditions: Vec<Condition>,
    },
}

impl Audience {
    /// Parses an `audience` object. An `id` means a stored audience (the seed's examples give
    /// `"type": "inline"` with an id, so both `reference` and `inline` are accepted with it).
    pub fn from_json(v: &Value, field: &str) -> Result<Audience> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::invalid(field, format!("must be an object, not {v}")))?;
        let f = |name: &str| format!("{field}.{name}");
        if let Some(k) = obj
            .keys()
            .find(|k| !["type", "id", "conditions"].contains(&k.as_str()))
        {
            return Err(Error::invalid(
                f(k),
                "unknown field; allowed: type, id, conditions",
            ));
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("inline" | "reference") => {}
            _ => {
                return Err(Error::invalid(
                    f("type"),
                    "must be \"reference\" or \"inline\"",
                ))
            }
        }
        match (obj.get("id"), obj.get("conditions")) {
            (Some(_), Some(_)) => Err(Error::invalid(
                field,
                "give either id or conditions, not both",
            )),
            (Some(id), None) => Ok(Audience::Reference {
                id: id.as_i64().filter(|i| *i > 0).ok_or_else(|| {
                    Error::invalid(f("id"), format!("{id} is not a positive integer"))
                })?,
            }),
            (None, Some(c)) => Ok(Audience::Inline {
                conditions: serde_json::from_value(c.clone())
                    .map_err(|e| Error::invalid(f("conditions"), e.to_string()))?,
            }),
            (None, None) => Err(Error::invalid(field, "needs an id or conditions")),
        }
    }
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Email (needs an email address).
    Email,
    /// SMS (needs an msisdn).
    Sms,
    /// App push (needs an app token).
    Push,
}

/// How inline `properties` combine with a member's merge properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertiesMode {
    /// Add to the member's properties; a key given here wins.
    #[default]
    Extend,
    /// Use only the properties given here.
    Replace,
}

/// A recipient given inline with a sending.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineRecipient {
    /// A member: identifiers then come from the member's data and the ones here are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<i64>,
    /// Email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number (digits, optional leading +).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<String>,
    /// App push token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_token: Option<String>,
    /// Merge properties.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
    /// How `properties` combine with a member's (default extend).
    #[serde(default)]
    pub properties_mode: PropertiesMode,
}

/// A recipient's addresses per channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    /// Email address.
    pub email: Option<String>,
    /// Phone number.
    pub msisdn: Option<String>,
    /// App push token.
    pub app_token: Option<String>,
}

impl Identifiers {
    /// The address for a channel, if present and non-empty.
    pub fn for_channel(&self, ch: Channel) -> Option<&str> {
        match ch {
            Channel::Email => self.email.as_deref(),
            Channel::Sms => self.msisdn.as_deref(),
            Channel::Push => self.app_token.as_deref(),
        }
        .filter(|s| !s.trim().is_empty())
    }
}

/// The channel used for a recipient: the first of `preference` it has an address for, so a
/// recipient without the preferred identifier falls back to the next channel; `None` when it
/// has none of them (the recipient is skipped).
pub fn pick_channel<'a>(
    ids: &'a Identifiers,
    preference: &[Channel],
) -> Option<(Channel, &'a str)> {
    preference
        .iter()
        .find_map(|ch| ids.for_channel(*ch).map(|a| (*ch, a)))
}

impl InlineRecipient {
    /// Checks one recipient; `channels` are the sending's channels. Errors name the field.
    pub fn validate(&self, field: &str, channels: &[Channel]) -> Result<()> {
        if let Some(id) = self.member_id {
            if id <= 0 {
                return Err(Error::invalid(
                    format!("{field}.member_id"),
                    "must be a positive integer",
                ));
            }
            return Ok(());
        }
        if let Some(e) = &self.email {
            let ok = e
                .split_once('@')
                .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'));
            if !ok {
                return Err(Error::invalid(
                    format!("{field}.email"),
                    format!("{e:?} is not an email address"),
                ));
            }
        }
        if let Some(m) = &self.msisdn {
            let digits = m.strip_prefix('+').unwrap_or(m);
            if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::invalid(
                    format!("{field}.msisdn"),
                    format!("{m:?} is not a phone number"),
                ));
            }
        }
        let ids = self.identifiers();
        if pick_channel(&ids, channels).is_none() {
            let need: Vec<&str> = channels
                .iter()
                .map(|c| match c {
                    Channel::Email => "email",
                    Channel::Sms => "msisdn",
                    Channel::Push => "app_token",
                })
                .collect();
            return Err(Error::invalid(
                field,
                format!("needs member_id or at least one of {}", need.join(", ")),
            ));
        }
        Ok(())
    }

    /// The identifiers given inline.
    pub fn identifiers(&self) -> Identifiers {
        Identifiers {
            email: self.email.clone(),
            msisdn: self.msisdn.clone(),
            app_token: self.app_token.clone(),
        }
    }

    /// The merge properties for this recipient given the member's (empty for arbitrary ones).
    pub fn merge_properties(&self, member: &Map<String, Value>) -> Map<String, Value> {
        match self.properties_mode {
            PropertiesMode::Replace => self.properties.clone(),
            PropertiesMode::Extend => {
                let mut out = member.clone();
                for (k, v) in &self.properties {
                    out.insert(k.clone(), v.clone());
                }
                out
            }
        }
    }
}

/// Who a sending goes to.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Recipients {
    /// The audience, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Audience>,
    /// Inline recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<InlineRecipient>,
    /// Channels in order of preference.
    pub channels_preference: Vec<Channel>,
    /// Send to everyone again, including keys an earlier sending of the campaign reached
    /// (`"exclude_sent": false` in the API). By default a sending skips them as `already_sent`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_sent: bool,
}

impl Recipients {
    /// The channels used when a sending does not say (`["email"]`).
    pub const DEFAULT_CHANNELS: [Channel; 1] = [Channel::Email];

    /// Parses `audience`, `recipients` and `channels_preference` out of a sending payload,
    /// checking each recipient.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Recipients> {
        let audience = match obj.get("audience") {
            None | Some(Value::Null) => None,
            Some(v) => Some(Audience::from_json(v, "audience")?),
        };
        let channels_preference: Vec<Channel> = match obj.get("channels_preference") {
            None | Some(Value::Null) => Self::DEFAULT_CHANNELS.to_vec(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::invalid("channels_preference", e.to_string()))?,
        };
        if channels_preference.is_empty() {
            return Err(Error::invalid(
                "channels_preference",
                "must name at least one channel",
            ));
        }
        for (i, c) in channels_preference.iter().enumerate() {
            if channels_preference[..i].contains(c) {
                return Err(Error::invalid(
                    format!("channels_preference[{i}]"),
                    format!("{c:?} is listed twice"),
                ));
            }
        }
        let mut recipients = Vec::new();
        if let Some(v) = obj.get("recipients").filter(|v| !v.is_null()) {
            let arr = v
                .as_array()
                .ok_or_else(|| Error::invalid("recipients", "must be an array"))?;
            for (i, r) in arr.iter().enumerate() {
                let field = format!("recipients[{i}]");
                let r: InlineRecipient = serde_json::from_value(r.clone())
                    .map_err(|e| Error::invalid(&field, e.to_string()))?;
                r.validate(&field, &channels_preference)?;
                recipients.push(r);
            }
        }
        let include_sent = match obj.get("exclude_sent") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => !b,
            Some(v) => {
                return Err(Error::invalid(
                    "exclude_sent",
                    format!("must be true or false, not {v}"),
                ))
            }
        };
        Ok(Recipients {
            audience,
            recipients,
            channels_preference,
            include_sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use serde_json::json;

    fn fields() -> FieldMap {
        let d = |group: &str, field: &str, column: &str, kind| FieldDef {
            group: group.into(),
            field: field.into(),
            column: column.into(),
            kind,
        };
        FieldMap::new([
            d(
                "member_properties",
                "first_name",
                "first_name",
                FieldKind::Text,
            ),
            d("member_properties", "city", "city", FieldKind::Text),
            d("member_properties", "age", "age", FieldKind::Integer),
            d("member_properties", "score", "score", FieldKind::Real),
        ])
        .unwrap()
    }

    /// (id, first_name, city, age, score) — NULLs, mixed case and LIKE wildcards included.
    type Row = (
        i64,
        Option<&'static str>,
        Option<&'static str>,
        Option<i64>,
        Option<f64>,
    );
    const ROWS: &[Row] = &[
        (1, Some("Piotr"), Some("Kraków"), Some(34), Some(7.5)),
        (2, Some("piotr"), Some("Oslo"), Some(19), Some(2.0)),
        (3, Some("PIOTR"), None, None, None),
        (4, Some("Jan"), Some("Oslo"), Some(52), Some(9.25)),
        (5, None, Some("Bergen"), Some(34), Some(7.5)),
        (6, Some("Ann_a"), Some("Oslo"), Some(41), Some(3.0)),
        (7, Some("Anna"), Some("oslo"), Some(28), Some(5.5)),
        (8, Some("50% Off"), Some("Bergen"), Some(60), None),
        (9, Some("Piotrek"), Some("Kraków"), Some(34), Some(8.0)),
    ];

    fn sqlite_ids(filter: &SqlFilter) -> Vec<i64> {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE members (id INTEGER PRIMARY KEY, first_name TEXT, city TEXT, age INTEGER, score REAL)",
        )
        .unwrap();
        for r in ROWS {
            db.execute(
                "INSERT INTO members VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![r.0, r.1, r.2, r.3, r.4],
            )
            .unwrap();
        }
        let sql = format!(
            "SELECT id FROM members WHERE {} ORDER BY id",
            filter.where_sql
        );
        let mut st = db.prepare(&sql).unwrap();
        let ids = st
            .query_map(rusqlite::params_from_iter(filter.params.iter()), |r| {
                r.get(0)
            })
            .unwrap()
            .collect::<rusqlite::Result<Vec<i64>>>()
            .unwrap();
        ids
    }

    /// The file-source view of the same rows: every cell is text, typed by the field kind.
    fn file_ids(c: &Conditions) -> Vec<i64> {
        ROWS.iter()
            .filter(|r| {
                let age = r.3.map(|a| a.to_string());
                let score = r.4.map(|s| s.to_string());
                c.matches(&|col: &str| match col {
                    "first_name" => Scalar::from_text(FieldKind::Text, r.1),
                    "city" => Scalar::from_text(FieldKind::Text, r.2),
                    "age" => Scalar::from_text(FieldKind::Integer, age.as_deref()),
                    "score" => Scalar::from_text(FieldKind::Real, score.as_deref()),
                    other => panic!("unexpected column {other}"),
                })
            })
            .map(|r| r.0)
            .collect()
    }

    fn cond(field: &str, op: &str, value: Value) -> Value {
        let mut c = json!({"condition_group": "member_properties", "field": field, "operator": op});
        if !value.is_null() {
            c["value"] = value;
        }
        c
    }

    #[test]
    fn sql_and_file_predicate_select_the_same_rows() {
        let table: Vec<(Vec<Value>, Vec<i64>)> = vec![
            (
                vec![cond("first_name", "match", json!("Piotr"))],
                vec![1, 2, 3],
            ),
            (vec![cond("first_name", "eq", json!("Piotr"))], vec![1]),
            (
                vec![cond("first_name", "ne", json!("Piotr"))],
                vec![2, 3, 4, 5, 6, 7, 8, 9],
            ),
            (
                vec![cond("first_name", "contains", json!("IOT"))],
                vec![1, 2, 3, 9],
            ),
            (
                vec![cond("first_name", "starts_with", json!("ann_"))],
                vec![6],
            ),
            (vec![cond("first_name", "contains", json!("0% o"))], vec![8]),
            (
                vec![cond("city", "in", json!(["Oslo", "Bergen"]))],
                vec![2, 4, 5, 6, 8],
            ),
            (
                vec![
                    cond("age", "gte", json!(34)),
                    cond("age", "lt", json!("52")),
                ],
                vec![1, 5, 6, 9],
            ),
            (vec![cond("score", "gt", json!(7.5))], vec![4, 9]),
            (vec![cond("score", "lte", json!(3))], vec![2, 6]),
            (vec![cond("age", "not_set", Value::Null)], vec![3]),
            (
                vec![
                    cond("score", "is_set", Value::Null),
                    cond("city", "match", json!("OSLO")),
                ],
                vec![2, 4, 6, 7],
            ),
            (
                vec![cond("first_name", "eq", json!("x' OR '1'='1"))],
                vec![],
            ),
            (vec![], (1..=9).collect()),
        ];
        let f = fields();
        for (conds, expect) in table {
            let parsed: Vec<Condition> =
                serde_json::from_value(Value::Array(conds.clone())).unwrap();
            let c = Conditions::compile(&parsed, &f, "audience.conditions").unwrap();
            let sql = c.to_sql(SqlDialect::Sqlite);
            assert_eq!(
                sqlite_ids(&sql),
                expect,
                "SQL {} {:?}",
                sql.where_sql,
                sql.params
            );
            assert_eq!(file_ids(&c), expect, "file predicate for {conds:?}");
        }
    }

    #[test]
    fn values_never_reach_the_sql_text() {
        let parsed: Vec<Condition> = serde_json::from_value(json!([
            cond("first_name", "eq", json!("x'); DROP TABLE members; --")),
            cond("city", "in", json!(["a", "b"])),
            cond("first_name", "contains", json!("50%")),
        ]))
        .unwrap();
        let c = Conditions::compile(&parsed, &fields(), "audience.conditions").unwrap();
        let pg = c.to_sql(SqlDialect::Postgres);
        assert_eq!(
            pg.where_sql,
            "(\"first_name\" = $1) AND (\"city\" IN ($2, $3)) AND (LOWER(\"first_name\") LIKE $4 ESCAPE '\\')"
        );
        assert_eq!(pg.params[3], Scalar::Text("%50\\%%".into()));
        let ms = c.to_sql(SqlDialect::MsSql);
        assert!(
            ms.where_sql
                .starts_with("([first_name] = @P1) AND ([city] IN (@P2, @P3))"),
            "{}",
            ms.where_sql
        );
        assert!(!ms.where_sql.contains("DROP"));
        // after a query's own two parameters, with columns renamed by the caller
        let after = c.to_sql_with(SqlDialect::MsSql, 3, &|col| {
            format!("t.[{}]", col.to_uppercase())
        });
        assert!(
            after
                .where_sql
                .starts_with("(t.[FIRST_NAME] = @P3) AND (t.[CITY] IN (@P4, @P5))"),
            "{}",
            after.where_sql
        );
        assert_eq!(after.params, ms.params);
    }

    #[test]
    fn bad_conditions_name_the_field() {
        let f = fields();
        let table: &[(Value, &str)] = &[
            (
                cond("password", "eq", json!("x")),
                "audience.conditions[0].field: member_properties.password is not a known field",
            ),
            (
                cond("age", "match", json!("3")),
                "audience.conditions[0].operator: Match needs a text field",
            ),
            (
                cond("age", "eq", json!("old")),
                "audience.conditions[0].value: \"old\" is not a integer value",
            ),
            (
                cond("city", "eq", Value::Null),
                "audience.conditions[0].value: missing",
            ),
            (
                cond("city", "in", json!([])),
                "audience.conditions[0].value: must be a non-empty array",
            ),
            (
                cond("city", "is_set", json!("x")),
                "audience.conditions[0].value: must be absent",
            ),
        ];
        for (c, expect) in table {
            let parsed: Vec<Condition> = serde_json::from_value(json!([c])).unwrap();
            let e = Conditions::compile(&parsed, &f, "audience.conditions")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expect), "{e}");
        }
        let bad_col = FieldDef {
            group: "g".into(),
            field: "f".into(),
            column: "name\"; --".into(),
            kind: FieldKind::Text,
        };
        assert!(FieldMap::new([bad_col]).is_err());
    }

    #[test]
    fn audiences_by_reference_or_conditions() {
        assert_eq!(
            Audience::from_json(&json!({"type": "inline", "id": 15}), "audience").unwrap(),
            Audience::Reference { id: 15 }
        );
        let a = Audience::from_json(
            &json!({"type": "inline", "conditions": [cond("first_name", "match", json!("Piotr"))]}),
            "audience",
        )
        .unwrap();
        assert!(matches!(a, Audience::Inline { conditions } if conditions.len() == 1));
        let bad: &[(Value, &str)] = &[
            (
                json!({"type": "inline"}),
                "audience: needs an id or conditions",
            ),
            (
                json!({"type": "inline", "id": -1}),
                "audience.id: -1 is not a positive integer",
            ),
            (
                json!({"type": "dynamic", "id": 1}),
                "audience.type: must be",
            ),
            (
                json!({"type": "inline", "id": 1, "conditions": []}),
                "audience: give either",
            ),
            (
                json!({"type": "inline", "ids": [1]}),
                "audience.ids: unknown field",
            ),
            (
                json!({"type": "inline", "conditions": [{"field": "x"}]}),
                "audience.conditions: missing field",
            ),
        ];
        for (v, expect) in bad {
            let e = Audience::from_json(v, "audience").unwrap_err().to_string();
            assert!(e.starts_with(expect), "{v}: {e}");
        }
    }

    #[test]
    fn recipients_need_an_identifier_for_a_sending_channel() {
        let obj = |v: Value| v.as_object().unwrap().clone();
        let ok = Recipients::from_json(&obj(json!({
            "recipients": [
                {"member_id": 150, "properties": {"name": "Piotr"}},
                {"email": "jan@example.com", "properties": {"name": "Jan"}}
            ]
        })))
        .unwrap();
        assert_eq!(ok.recipients.len(), 2);
        assert_eq!(ok.channels_preference, vec![Channel::Email]);
        let table: &[(Value, &str)] = &[
            (
                json!({"recipients": [{"properties": {}}]}),
                "recipients[0]: needs member_id or at least one of email",
            ),
            (
                json!({"recipients": [{"email": "a@b.no"}, {"msisdn": "4740769126"}]}),
                "recipients[1]: needs member_id or at least one of email",
            ),
            (
                json!({"recipients": [{"email": "nope"}]}),
                "recipients[0].email: \"nope\" is not an email address",
            ),
            (
                json!({"recipients": [{"msisdn": "12ab"}], "channels_preference": ["sms"]}),
                "recipients[0].msisdn",
            ),
            (
                json!({"recipients": [{"member_id": 0}]}),
                "recipients[0].member_id",
            ),
            (
                json!({"recipients": [{"emial": "a@b.no"}]}),
                "recipients[0]: unknown field `emial`",
            ),
            (
                json!({"channels_preference": ["sms", "sms"]}),
                "channels_preference[1]: Sms is listed twice",
            ),
            (
                json!({"channels_preference": ["fax"]}),
                "channels_preference: unknown variant `fax`",
            ),
            (
                json!({"channels_preference": []}),
                "channels_preference: must name",
            ),
            (
                json!({"exclude_sent": "no"}),
                "exclude_sent: must be true or false, not \"no\"",
            ),
        ];
        for (v, expect) in table {
            let e = Recipients::from_json(&obj(v.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expect), "{v}: {e}");
        }
        let sms_first = Recipients::from_json(&obj(json!({
            "channels_preference": ["sms", "email"],
            "recipients": [{"email": "a@b.no"}, {"msisdn": "+4740769126"}]
        })))
        .unwrap();
        assert_eq!(sms_first.recipients.len(), 2);
    }

    #[test]
    fn channel_preference_falls_back_when_an_identifier_is_missing() {
        let both = Identifiers {
            email: Some("a@b.no".into()),
            msisdn: Some("4740769126".into()),
            app_token: None,
        };
        let email_only = Identifiers {
            email: Some("a@b.no".into()),
            msisdn: Some(" ".into()),
            app_token: None,
        };
        let pref = [Channel::Sms, Channel::Email];
        assert_eq!(
            pick_channel(&both, &pref),
            Some((Channel::Sms, "4740769126"))
        );
        assert_eq!(
            pick_channel(&email_only, &pref),
            Some((Channel::Email, "a@b.no"))
        );
        assert_eq!(
            pick_channel(&email_only, &[Channel::Push, Channel::Sms]),
            None
        );
    }

    #[test]
    fn properties_extend_or_replace_the_members() {
        let member = json!({"name": "Piotr K", "city": "Oslo"})
            .as_object()
            .unwrap()
            .clone();
        let mut r = InlineRecipient {
            member_id: Some(150),
            properties: json!({"name": "Piotr"}).as_object().unwrap().clone(),
            ..Default::default()
        };
        assert_eq!(
            Value::Object(r.merge_properties(&member)),
            json!({"name": "Piotr", "city": "Oslo"})
        );
        r.properties_mode = PropertiesMode::Replace;
        assert_eq!(
            Value::Object(r.merge_properties(&member)),
            json!({"name": "Piotr"})
        );
    }
}
