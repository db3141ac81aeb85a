//! Filtered, paginated rows: events, bounce events, recipient logs, historical bounces.
//!
//! Pages are keyset-paginated: rows are ordered by a unique key (e.g. `ts, event_id`) and a page's
//! `next_cursor` names the last row's key, so paging stays cheap and stable while rows arrive.
//! Filters become DataFusion expressions with the values as literals — never SQL text.

use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMicrosecondType, UInt64Type};
use arrow_array::RecordBatch;
use arrow_schema::DataType;
use chrono::{DateTime, Utc};
use datafusion::logical_expr::{col, lit, Expr};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::query::{and_time_range, strings, ts_lit};
use crate::query::{collect, Catalog, QueryError, QueryResult, Scope};

pub use crate::params::{DEFAULT_PAGE, MAX_PAGE};

/// One value of a sort key, as carried in a cursor.
#[derive(Debug, Clone, PartialEq)]
enum KeyValue {
    /// A timestamp's microseconds since the epoch.
    Micros(i64),
    Unsigned(u64),
    Text(String),
}

impl KeyValue {
    /// The cursor form: decimal for numbers, lowercase hex of the UTF-8 for text.
    fn encode(&self) -> String {
        match self {
            KeyValue::Micros(us) => us.to_string(),
            KeyValue::Unsigned(n) => n.to_string(),
            KeyValue::Text(s) => hex_encode(s.as_bytes()),
        }
    }

    /// Reads one cursor part of the given kind. Every part matching the documented pattern
    /// (`-?[0-9]{1,18}`, `[0-9]{1,19}`, `([0-9a-f]{2}){0,2048}`) reads, so a cursor of the
    /// right shape is never refused (it names a position, taken as it is).
    fn decode(kind: Kind, s: &str) -> Option<KeyValue> {
        let digits = |t: &str, max: usize| {
            !t.is_empty() && t.len() <= max && t.bytes().all(|b| b.is_ascii_digit())
        };
        match kind {
            Kind::Timestamp => {
                let ok = digits(s.strip_prefix('-').unwrap_or(s), 18);
                ok.then(|| s.parse().ok().map(KeyValue::Micros))?
            }
            Kind::Unsigned => digits(s, 19).then(|| s.parse().ok().map(KeyValue::Unsigned))?,
            Kind::Text => {
                let lower = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                let bytes = hex_decode(s).filter(|_| lower)?;
                Some(KeyValue::Text(String::from_utf8_lossy(&bytes).into_owned()))
            }
        }
    }
}

/// A cursor: the last row's two key values, `FIRST.SECOND`.
fn encode_cursor(a: &KeyValue, b: &KeyValue) -> String {
    format!("{}.{}", a.encode(), b.encode())
}

/// The `MICROS.HEX` cursor of a list ordered by a time and a text id (the events' order; the
/// runs list, newest first, uses the same shape).
pub(crate) fn encode_time_cursor(micros: i64, id: &str) -> String {
    encode_cursor(&KeyValue::Micros(micros), &KeyValue::Text(id.to_string()))
}

/// Reads a [`encode_time_cursor`] cursor; `None` when it is not of that shape.
pub(crate) fn decode_time_cursor(cursor: &str) -> Option<(i64, String)> {
    match decode_cursor(EVENT_ORDER, cursor)? {
        (KeyValue::Micros(us), KeyValue::Text(id)) => Some((us, id)),
        _ => None,
    }
}

fn decode_cursor(order: Order, cursor: &str) -> Option<(KeyValue, KeyValue)> {
    let (a, b) = cursor.split_once('.')?;
    Some((
        KeyValue::decode(order.first.1, a)?,
        KeyValue::decode(order.second.1, b)?,
    ))
}

/// How a listed table is ordered: two key columns, the first a timestamp or a string, the
/// second a string or an unsigned integer, together unique.
#[derive(Debug, Clone, Copy)]
struct Order {
    first: (&'static str, Kind),
    second: (&'static str, Kind),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Timestamp,
    Text,
    Unsigned,
}

/// A page of rows as JSON objects.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The rows.
    pub items: Vec<serde_json::Value>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters shared by the event lists.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Event type (`opened`…).
    pub event_type: Option<String>,
    /// Campaign.
    pub campaign_id: Option<String>,
    /// Variant.
    pub variant: Option<String>,
    /// Exact address (compared trimmed and case-insensitively).
    pub email: Option<String>,
    /// Bounce type (`hard`, `soft`).
    pub bounce_type: Option<String>,
    /// Run.
    pub run_id: Option<String>,
    /// At or after.
    pub from: Option<DateTime<Utc>>,
    /// Before.
    pub to: Option<DateTime<Utc>>,
}

impl EventFilter {
    fn expr(&self) -> Expr {
        let mut f = lit(true);
        for (c, v) in [
            ("event_type", &self.event_type),
            ("campaign_id", &self.campaign_id),
            ("variant", &self.variant),
            ("bounce_type", &self.bounce_type),
            ("run_id", &self.run_id),
        ] {
            if let Some(v) = v {
                f = f.and(col(c).eq(lit(v.as_str())));
            }
        }
        if let Some(e) = &self.email {
            f = f.and(
                datafusion::functions::expr_fn::lower(col("email"))
                    .eq(lit(e.trim().to_lowercase())),
            );
        }
        if let Some(t) = self.from {
            f = f.and(col("date").gt_eq(lit(t.date_naive().to_string())));
        }
        if let Some(t) = self.to {
            f = f.and(col("date").lt_eq(lit(t.date_naive().to_string())));
        }
        and_time_range(f, self.from, self.to)
    }
}

const EVENT_ORDER: Order = Order {
    first: ("ts", Kind::Timestamp),
    second: ("event_id", Kind::Text),
};

const EVENT_COLUMNS: [&str; 10] = [
    "event_id",
    "campaign_id",
    "variant",
    "run_id",
    "email",
    "event_type",
    "bounce_type",
    "url",
    "ts",
    "date",
];

/// Events of a workspace (`table` is `events` or `bounce_events`).
pub async fn list_events(
    catalog: &Catalog,
    ws: &str,
    table: &'static str,
    filter: &EventFilter,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    list(
        catalog,
        ws,
        table,
        filter.expr(),
        &EVENT_COLUMNS,
        EVENT_ORDER,
        limit,
        cursor,
    )
    .await
}

/// One event by id.
pub async fn get_event(
    catalog: &Catalog,
    ws: &str,
    table: &'static str,
    id: &str,
) -> QueryResult<serde_json::Value> {
    let page = list(
        catalog,
        ws,
        table,
        col("event_id").eq(lit(id)),
        &EVENT_COLUMNS,
        EVENT_ORDER,
        1,
        None,
    )
    .await?;
    page.items
        .into_iter()
        .next()
        .ok_or_else(|| QueryError::NotFound(format!("no event {id:?}")))
}

/// Filters of the recipient-log list.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Campaign.
    pub campaign_id: Option<String>,
    /// Run.
    pub run_id: Option<String>,
    /// Variant.
    pub variant: Option<String>,
    /// Decision (`sent`, `suppressed`, `skipped`, `holdout`, `errored`).
    pub decision: Option<String>,
    /// Reason code (e.g. `hard_bounce`, `unsubscribed`).
    pub reason: Option<String>,
    /// Recipient key.
    pub key: Option<String>,
}

const LOG_ORDER: Order = Order {
    first: ("run_id", Kind::Text),
    second: ("row", Kind::Unsigned),
};

const LOG_COLUMNS: [&str; 13] = [
    "campaign_id",
    "run_id",
    "row",
    "key",
    "variant",
    "decision",
    "reason",
    "detail",
    "suppression_list",
    "ifur_file",
    "ifur_line",
    "mail_state",
    "printer_id",
];

impl LogFilter {
    fn expr(&self) -> Expr {
        let mut f = lit(true);
        for (c, v) in [
            ("campaign_id", &self.campaign_id),
            ("run_id", &self.run_id),
            ("variant", &self.variant),
            ("decision", &self.decision),
            ("reason", &self.reason),
            ("key", &self.key),
        ] {
            if let Some(v) = v {
                f = f.and(col(c).eq(lit(v.as_str())));
            }
        }
        f
    }
}

/// Recipient-log rows of a workspace; each row's `id` is `<run_id>:<row>`.
pub async fn list_logs(
    catalog: &Catalog,
    ws: &str,
    filter: &LogFilter,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    let mut page = list(
        catalog,
        ws,
        "recipient_logs",
        filter.expr(),
        &LOG_COLUMNS,
        LOG_ORDER,
        limit,
        cursor,
    )
    .await?;
    for item in &mut page.items {
        add_log_id(item);
    }
    add_mail_states(catalog, ws, &mut page.items).await?;
    Ok(page)
}

/// Adds `current_mail_state` (and `mail_state_event`, `mail_state_at`) to the items with a
/// `mail_state`: the ledger's state moved on by the printer's tracking events
/// ([`crate::query::mail`]).
pub(crate) async fn add_mail_states(
    catalog: &Catalog,
    ws: &str,
    items: &mut [serde_json::Value],
) -> QueryResult<()> {
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    let mut runs: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for item in items.iter() {
        if let (Some(run), Some(key), Some(state)) = (
            text(item, "run_id"),
            text(item, "key"),
            text(item, "mail_state"),
        ) {
            runs.entry(run).or_default().push((key, state));
        }
    }
    for (run, ledger) in runs {
        let now = crate::query::mail::current_mail_states(catalog, ws, &run, &ledger).await?;
        for item in items.iter_mut() {
            if text(item, "run_id").as_deref() != Some(run.as_str()) {
                continue;
            }
            let Some(n) = text(item, "key").and_then(|k| now.get(&k)) else {
                continue;
            };
            if let Some(o) = item.as_object_mut() {
                o.insert("current_mail_state".into(), n.state.clone().into());
                o.insert("mail_state_event".into(), n.event_id.clone().into());
                o.insert(
                    "mail_state_at".into(),
                    n.at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                        .into(),
                );
            }
        }
    }
    Ok(())
}

fn add_log_id(item: &mut serde_json::Value) {
    if let Some(o) = item.as_object_mut() {
        let id = format!(
            "{}:{}",
            o.get("run_id").and_then(|v| v.as_str()).unwrap_or(""),
            o.get("row").and_then(|v| v.as_u64()).unwrap_or(0)
        );
        o.insert("id".into(), id.into());
    }
}

/// One recipient-log row by id (`<run_id>:<row>`).
pub async fn get_log(catalog: &Catalog, ws: &str, id: &str) -> QueryResult<serde_json::Value> {
    let (run, row) = id
        .rsplit_once(':')
        .and_then(|(r, n)| Some((r, n.parse::<u64>().ok()?)))
        .ok_or_else(|| QueryError::BadRequest(format!("log id {id:?}: expected <run_id>:<row>")))?;
    let page = list(
        catalog,
        ws,
        "recipient_logs",
        col("run_id").eq(lit(run)).and(col("row").eq(lit(row))),
        &LOG_COLUMNS,
        LOG_ORDER,
        1,
        None,
    )
    .await?;
    let mut item = page
        .items
        .into_iter()
        .next()
        .ok_or_else(|| QueryError::NotFound(format!("no recipient log {id:?}")))?;
    add_log_id(&mut item);
    add_mail_states(catalog, ws, std::slice::from_mut(&mut item)).await?;
    Ok(item)
}

/// Filters of the historical-bounce list.
#[derive(Debug, Clone, Default)]
pub struct HistoricalFilter {
    /// Exact address (case-insensitive).
    pub email: Option<String>,
    /// `hard` or `soft`.
    pub bounce_type: Option<String>,
    /// ERP account number.
    pub account_number: Option<String>,
    /// Bounced at or after.
    pub from: Option<DateTime<Utc>>,
    /// Bounced before.
    pub to: Option<DateTime<Utc>>,
}

impl HistoricalFilter {
    /// The filter as an expression over `historical_bounces`.
    pub fn expr(&self) -> Expr {
        let mut f = lit(true);
        if let Some(e) = &self.email {
            f = f.and(col("email").eq(lit(e.trim().to_lowercase())));
        }
        if let Some(b) = &self.bounce_type {
            f = f.and(col("bounce_type").eq(lit(b.as_str())));
        }
        if let Some(a) = &self.account_number {
            f = f.and(col("account_number").eq(lit(a.as_str())));
        }
        if let Some(t) = self.from {
            f = f.and(col("bounced_at").gt_eq(ts_lit(t)));
        }
        if let Some(t) = self.to {
            f = f.and(col("bounced_at").lt(ts_lit(t)));
        }
        f
    }
}

/// Sort order of historical bounces (and of their CSV export).
pub const HISTORICAL_COLUMNS: [&str; 5] = [
    "email",
    "bounce_type",
    "account_number",
    "bounced_at",
    "source",
];
const HISTORICAL_ORDER: Order = Order {
    first: ("bounced_at", Kind::Timestamp),
    second: ("email", Kind::Text),
};

/// Historical bounces of a workspace.
pub async fn list_historical(
    catalog: &Catalog,
    ws: &str,
    filter: &HistoricalFilter,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    list(
        catalog,
        ws,
        "historical_bounces",
        filter.expr(),
        &HISTORICAL_COLUMNS,
        HISTORICAL_ORDER,
        limit,
        cursor,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn list(
    catalog: &Catalog,
    ws: &str,
    table: &'static str,
    filter: Expr,
    columns: &[&str],
    order: Order,
    limit: usize,
    cursor: Option<&str>,
) -> QueryResult<Page> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(QueryError::BadRequest(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let ctx: SessionContext = catalog.session(&Scope::Workspace(ws.to_string()))?;
    let mut f = filter;
    if let Some(c) = cursor {
        f = f.and(after(order, c)?);
    }
    let df = ctx
        .table(table)
        .await?
        .filter(f)?
        .select(columns.iter().map(|c| col(*c)).collect::<Vec<Expr>>())?
        .sort(vec![
            col(order.first.0).sort(true, false),
            col(order.second.0).sort(true, false),
        ])?
        .limit(0, Some(limit + 1))?;
    let batches = collect(&catalog.limits(), df).await?;
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut items = rows_to_json(&batches)?;
    let next_cursor = if total > limit {
        items.truncate(limit);
        Some(cursor_of(order, &batches, limit - 1)?)
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// `key > cursor` in the order's lexicographic sense.
fn after(order: Order, cursor: &str) -> QueryResult<Expr> {
    let bad = || QueryError::BadRequest(format!("invalid cursor {cursor:?}"));
    let (a, b) = decode_cursor(order, cursor).ok_or_else(bad)?;
    let value = |v: KeyValue| -> QueryResult<Expr> {
        Ok(match v {
            KeyValue::Micros(us) => ts_lit(DateTime::from_timestamp_micros(us).ok_or_else(bad)?),
            KeyValue::Text(s) => lit(s),
            KeyValue::Unsigned(n) => lit(n),
        })
    };
    let (a, b) = (value(a)?, value(b)?);
    let (c1, c2) = (col(order.first.0), col(order.second.0));
    Ok(c1.clone().gt(a.clone()).or(c1.eq(a).and(c2.gt(b))))
}

fn cursor_of(order: Order, batches: &[RecordBatch], mut row: usize) -> QueryResult<String> {
    for b in batches {
        if row < b.num_rows() {
            let key = |(name, kind): (&str, Kind)| -> QueryResult<KeyValue> {
                let c = b.column_by_name(name).expect("key column selected");
                Ok(match kind {
                    Kind::Timestamp => {
                        KeyValue::Micros(c.as_primitive::<TimestampMicrosecondType>().value(row))
                    }
                    Kind::Text => KeyValue::Text(strings(b, name)?.value(row).to_string()),
                    Kind::Unsigned => KeyValue::Unsigned(
                        arrow_cast::cast(c, &DataType::UInt64)?
                            .as_primitive::<UInt64Type>()
                            .value(row),
                    ),
                })
            };
            return Ok(encode_cursor(&key(order.first)?, &key(order.second)?));
        }
        row -= b.num_rows();
    }
    unreachable!("cursor row within the results")
}

/// Batches as JSON objects (nulls omitted; timestamps RFC 3339; dictionaries as strings).
pub fn rows_to_json(batches: &[RecordBatch]) -> QueryResult<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
        for b in batches {
            w.write(&plain(b)?)?;
        }
        w.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_slice(&buf)?)
}

/// Dictionary columns decoded to plain strings (CSV and JSON writers want those).
pub fn plain(b: &RecordBatch) -> QueryResult<RecordBatch> {
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        if let DataType::Dictionary(_, v) = f.data_type() {
            cols.push(arrow_cast::cast(c, v)?);
            fields.push(f.as_ref().clone().with_data_type(v.as_ref().clone()));
        } else {
            cols.push(c.clone());
            fields.push(f.as_ref().clone());
        }
    }
    Ok(RecordBatch::try_new(
        std::sync::Arc::new(arrow_schema::Schema::new(fields)),
        cols,
    )?)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 4096 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let ts = KeyValue::Micros(-1_000_000);
        let id = KeyValue::Text("évent:1".into());
        let c = encode_cursor(&ts, &id);
        assert_eq!(decode_cursor(EVENT_ORDER, &c), Some((ts, id)));
        let c = encode_cursor(&KeyValue::Text("r1".into()), &KeyValue::Unsigned(5));
        assert_eq!(c, "7231.5");
        assert!(after(LOG_ORDER, &c).is_ok());
        assert!(after(EVENT_ORDER, &c).is_err(), "kinds in the wrong places");
        for garbage in [
            "zz",
            "",
            ".",
            "1.x",
            "1.ABCD",
            "1.abc",
            "1234567890123456789.00",
        ] {
            assert!(after(EVENT_ORDER, garbage).is_err(), "{garbage:?}");
        }
        // Any cursor of the documented shape reads (the position is taken as it is).
        for shaped in ["0.", "-999999999999999999.ff", "999999999999999999.00c3"] {
            assert!(after(EVENT_ORDER, shaped).is_ok(), "{shaped:?}");
        }
        assert!(after(LOG_ORDER, ".9999999999999999999").is_ok());
    }
}
