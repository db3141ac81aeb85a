//! The two databases under the campaign store: SQLite (a file) and PostgreSQL (a
//! `postgres://` URL).
//!
//! The store writes each statement once, in SQLite's spelling with numbered placeholders
//! (`?1`); [`postgres_sql`] turns those into PostgreSQL's `$1`. Parameters and results travel
//! as [`Value`]s and rows as [`Row`]s, so each row decoder in `store.rs` exists once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use postgres::types::{FromSql, IsNull, ToSql, Type};
use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::error::StoreError;

/// One parameter or column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer (`BIGINT`; also what `COUNT(*)` and `SELECT 1` give).
    Int(i64),
    /// Text (JSON is kept as text too).
    Text(String),
    /// A boolean parameter (SQLite stores it as 0 / 1).
    Bool(bool),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of a statement, each converted with `Value::from`.
macro_rules! values {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::db::Value::from($v)),*][..]
    };
}
pub(crate) use values;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
        })
    }
}

impl ToSql for Value {
    /// PostgreSQL infers each parameter's type from the statement; the value is written as
    /// that type (an integer as `INT8`, `INT4` or `INT2`, text as any text type).
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                _ => Err(format!("an integer cannot be passed as {ty}").into()),
            },
            Value::Text(s) if <&str as ToSql>::accepts(ty) => s.as_str().to_sql(ty, out),
            Value::Text(_) => Err(format!("text cannot be passed as {ty}").into()),
            Value::Bool(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            Value::Bool(_) => Err(format!("a boolean cannot be passed as {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`, which knows whether it holds an integer or text.
        true
    }

    postgres::types::to_sql_checked!();
}

/// One result row, its columns in statement order.
#[derive(Debug, Clone)]
pub(crate) struct Row(Vec<Value>);

/// What a column can be read as.
pub(crate) trait FromValue: Sized {
    /// The value as `Self`, or what is wrong with it.
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl Row {
    /// Column `i` as `T`.
    pub(crate) fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let v = self.0.get(i).ok_or_else(|| StoreError::Column {
            column: i,
            message: format!("the row has {} columns", self.0.len()),
        })?;
        T::from_value(v).map_err(|message| StoreError::Column { column: i, message })
    }
}

/// The transaction-level advisory lock every PostgreSQL store transaction takes first (the
/// bytes of "bdsCampS"). See [`Conn::begin`].
const STORE_LOCK: i64 = 0x6264_7343_616d_7053;

/// A database connection.
pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Sqlite(c) => f.debug_tuple("Sqlite").field(c).finish(),
            Conn::Postgres(_) => f.write_str("Postgres"),
        }
    }
}

/// A PostgreSQL connection with its prepared statements. The client wants `&mut` for every
/// call while the store hands out `&self`; a `RefCell` bridges that (the store, like a SQLite
/// connection, is `Send` but not `Sync`: one thread at a time).
pub(crate) struct Pg {
    config: postgres::Config,
    client: RefCell<Option<postgres::Client>>,
    /// Prepared statements by their SQLite text: one parse round trip per statement and
    /// connection instead of one per call.
    statements: RefCell<HashMap<String, postgres::Statement>>,
    /// Inside `BEGIN … COMMIT`: a lost connection is then an error, not a reconnect.
    in_tx: Cell<bool>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The synchronous client runs its own small runtime and blocks on it to close the
        // connection, which panics inside an async task; close it on a plain thread then.
        if let Some(client) = self.client.get_mut().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(client));
            }
        }
    }
}

/// Whether a store location is a PostgreSQL URL rather than a file.
pub(crate) fn is_postgres_url(location: &str) -> bool {
    let lower = location.get(..13).unwrap_or(location).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// The URL without its password (in the user part or a `password=` parameter), for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end);
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (user_info, hosts) = authority.split_at(at);
            let user = user_info.split(':').next().unwrap_or("");
            format!("{user}{hosts}")
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.to_ascii_lowercase().starts_with("password="))
                .collect();
            if query.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", query.join("&"))
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Rewrites SQLite's numbered placeholders (`?1`) to PostgreSQL's (`$1`), leaving string
/// literals and quoted names alone.
pub(crate) fn postgres_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            None => out.push(c),
        }
    }
    out
}

/// The SQLite schema text as PostgreSQL DDL: SQLite's `INTEGER PRIMARY KEY` (a rowid alias
/// that numbers new rows) becomes an identity column.
pub(crate) fn postgres_ddl(sql: &str) -> String {
    sql.replace(
        "INTEGER PRIMARY KEY",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    )
}

impl Pg {
    /// Connects to `url` (checked to be a PostgreSQL URL). TLS is not supported yet, so
    /// `sslmode=require` is refused; without a `connect_timeout` in the URL, 10 s is used.
    pub(crate) fn connect(url: &str) -> Result<Pg, StoreError> {
        let mut config: postgres::Config = url.parse()?;
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(StoreError::Unsupported(
                "sslmode=require: TLS to PostgreSQL is not supported yet; use sslmode=disable on a trusted network".into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("broadside");
        }
        let client = config.connect(postgres::NoTls)?;
        Ok(Pg {
            config,
            client: RefCell::new(Some(client)),
            statements: RefCell::new(HashMap::new()),
            in_tx: Cell::new(false),
        })
    }

    /// Runs `f` on the client, connecting again first when the server closed the connection
    /// (a restart, an idle timeout) and no transaction is open.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.client.borrow_mut();
        let closed = slot.as_ref().is_none_or(|c| c.is_closed());
        if closed && !self.in_tx.get() {
            self.statements.borrow_mut().clear();
            *slot = Some(self.config.connect(postgres::NoTls)?);
        }
        let client = slot.as_mut().expect("connected above");
        Ok(f(client)?)
    }

    fn statement(&self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(st) = self.statements.borrow().get(sql) {
            if !self.client.borrow().as_ref().is_none_or(|c| c.is_closed()) {
                return Ok(st.clone());
            }
        }
        let st = self.with_client(|c| c.prepare(&postgres_sql(sql)))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self.with_client(|c| c.query(&st, &refs))?;
        rows.iter().map(pg_row).collect()
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        self.with_client(|c| c.execute(&st, &refs))
    }
}

fn pg_row(row: &postgres::Row) -> Result<Row, StoreError> {
    fn get<'a, T: FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<Option<T>, StoreError> {
        Ok(row.try_get::<_, Option<T>>(i)?)
    }
    let mut values = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = match *ty {
            Type::INT8 => get::<i64>(row, i)?.map(Value::Int),
            Type::INT4 => get::<i32>(row, i)?.map(|v| Value::Int(v.into())),
            Type::INT2 => get::<i16>(row, i)?.map(|v| Value::Int(v.into())),
            Type::BOOL => get::<bool>(row, i)?.map(Value::Bool),
            _ if <String as FromSql>::accepts(ty) => get::<String>(row, i)?.map(Value::Text),
            _ => {
                return Err(StoreError::Column {
                    column: i,
                    message: format!("unsupported column type {ty}"),
                })
            }
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

fn sqlite_value(v: ValueRef<'_>, column: usize) -> Result<Value, StoreError> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        other => {
            return Err(StoreError::Column {
                column,
                message: format!("unexpected {:?} value", other.data_type()),
            })
        }
    })
}

impl Conn {
    /// The rows of a statement (a `SELECT`, or a write with `RETURNING`).
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(params))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let values = (0..n)
                        .map(|i| sqlite_value(r.get_ref(i)?, i))
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    out.push(Row(values));
                }
                Ok(out)
            }
            Conn::Postgres(pg) => pg.query(sql, params),
        }
    }

    /// The first row of a statement, if any.
    pub(crate) fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a statement that must return one.
    pub(crate) fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or(StoreError::NoRow)
    }

    /// Runs a write; returns the rows it changed.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
            }
            Conn::Postgres(pg) => pg.execute(sql, params),
        }
    }

    /// Runs statements without parameters (a migration, `COMMIT`).
    pub(crate) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(pg) => pg.with_client(|c| c.batch_execute(sql)),
        }
    }

    /// Starts a transaction in which the store reads and then writes.
    ///
    /// SQLite: `BEGIN IMMEDIATE` takes the file's write lock at once, so two processes on one
    /// file serialise instead of failing with a busy error halfway through.
    ///
    /// PostgreSQL: `BEGIN` (READ COMMITTED) and then `pg_advisory_xact_lock` on one key for the
    /// whole database, held until `COMMIT` or `ROLLBACK`. Every store transaction takes it
    /// first, so they run one at a time across all processes and hosts, as on SQLite, and each
    /// statement after the lock sees everything committed before it. (`SELECT … FOR UPDATE`
    /// would lock only rows that exist, not the absence of a row or a count, and SERIALIZABLE
    /// would need every caller to retry on conflicts.) The statements outside transactions —
    /// taking a lease, a status change — are single compare-and-set statements, which
    /// PostgreSQL's row locks make atomic by themselves: of two `INSERT … ON CONFLICT DO UPDATE
    /// … WHERE` on one lease row, the second waits for the first and then checks its `WHERE`
    /// against the row the first left, so only one holder wins.
    pub(crate) fn begin(&self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Conn::Postgres(pg) => {
                let begun = pg.with_client(|c| {
                    c.batch_execute(&format!(
                        "BEGIN; SELECT pg_advisory_xact_lock({STORE_LOCK})"
                    ))
                });
                if begun.is_err() {
                    // Do not leave a half-begun transaction for the next statement.
                    let _ = pg.with_client(|c| c.batch_execute("ROLLBACK"));
                    return begun;
                }
                pg.in_tx.set(true);
                Ok(())
            }
        }
    }

    /// Ends the transaction [`Conn::begin`] started: `COMMIT` or `ROLLBACK`.
    pub(crate) fn end(&self, commit: bool) -> Result<(), StoreError> {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        let out = self.batch(sql);
        if let Conn::Postgres(pg) = self {
            pg.in_tx.set(false);
        }
        out
    }
}
