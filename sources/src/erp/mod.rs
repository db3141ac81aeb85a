//! Recipients from a SQL Server ERP, read with tiberius (see `docs/erp.md`).
//!
//! ```text
//!  bs-erp thread (tokio current-thread runtime)          bs-source thread          workers
//!  connect → probe (TOP 0) → SELECT … ORDER BY key  ──bounded(1)──►  next_item  ──►  decode rows
//!  rows gathered into batches of 8192 tiberius Rows                  (Raw item)       into text
//! ```
//!
//! The I/O thread owns the connection and the result stream; it hands over one batch of rows at
//! a time through a channel of capacity one, so when the pipeline is slow the thread stops
//! reading, the socket's receive window fills and SQL Server waits: memory holds at most a few
//! batches whatever the result size. Text conversion runs on the pipeline's worker threads.

mod sql;
mod types;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use broadside_pipeline::model::{RecipientBatch, RecipientLayout, StdField};
use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::spec::{ErpEncryption, ErpSourceSpec};
use broadside_pipeline::{Error, Result};
use futures_util::TryStreamExt;
use tiberius::{
    AuthMethod, Client, Column, ColumnData, ColumnType, Config, EncryptionLevel, QueryItem, Row,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

pub use sql::{fingerprint, probe_sql, quote_ident, read_sql, ALIAS};
pub use types::{column_type_name, text_form, value_type_name, write_text, TextForm};

use crate::{SizeHint, BATCH_ROWS};

type Conn = Client<Compat<TcpStream>>;

/// Where the password comes from, resolved against the spec's directory.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// An environment variable.
    Env(String),
    /// A file (one trailing newline is ignored).
    File(PathBuf),
}

/// Everything needed to connect and read, taken from the spec.
#[derive(Debug, Clone)]
pub struct ErpSettings {
    /// The source section of the spec.
    pub spec: ErpSourceSpec,
    /// The password's source.
    pub password: PasswordSource,
    /// The recipient key field a shard is decided on (see `Shard::holds`).
    pub recipient_key: StdField,
}

impl ErpSettings {
    /// The settings of a spec's ERP source; `resolve` turns a relative password file path into
    /// one relative to the spec.
    pub fn new(spec: &ErpSourceSpec, resolve: impl Fn(&std::path::Path) -> PathBuf) -> Self {
        let password = match (&spec.password_file, &spec.password_env) {
            (Some(f), _) => PasswordSource::File(resolve(f)),
            (None, Some(e)) => PasswordSource::Env(e.clone()),
            (None, None) => PasswordSource::Env(String::new()),
        };
        ErpSettings {
            spec: spec.clone(),
            password,
            recipient_key: StdField::Email,
        }
    }

    /// `erp host:port/database`: names the server in every message.
    pub fn origin(&self) -> String {
        format!("erp {}", self.spec.server())
    }

    fn password(&self) -> Result<String> {
        let origin = self.origin();
        match &self.password {
            PasswordSource::Env(v) => std::env::var(v).map_err(|_| {
                Error::source(
                    &origin,
                    format!(
                        "the password environment variable {v} (source.password_env) is not set"
                    ),
                )
            }),
            PasswordSource::File(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Error::source(
                        &origin,
                        format!(
                            "cannot read the password file {} (source.password_file): {e}",
                            p.display()
                        ),
                    )
                })?;
                Ok(text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text)
                    .to_string())
            }
        }
    }

    fn config(&self, password: &str) -> Config {
        let s = &self.spec;
        let mut c = Config::new();
        c.host(&s.host);
        match (s.port, &s.instance) {
            (Some(p), _) => c.port(p),
            (None, Some(i)) => c.instance_name(i),
            (None, None) => c.port(ErpSourceSpec::DEFAULT_PORT),
        }
        c.database(&s.database);
        c.application_name("broadside");
        c.authentication(AuthMethod::sql_server(&s.user, password));
        c.encryption(match s.encryption {
            ErpEncryption::Off => EncryptionLevel::Off,
            ErpEncryption::On => EncryptionLevel::On,
            ErpEncryption::Required => EncryptionLevel::Required,
            ErpEncryption::NotSupported => EncryptionLevel::NotSupported,
        });
        if s.trust_server_certificate {
            c.trust_cert();
        }
        if let Some(ca) = &s.trust_cert_ca {
            c.trust_cert_ca(ca.display().to_string());
        }
        c.handshake_timeout(Some(Duration::from_secs(s.login_timeout_secs)));
        c.command_timeout(match s.query_timeout_secs {
            0 => None,
            n => Some(Duration::from_secs(n)),
        });
        c
    }

    /// Connects and logs in, following one Azure-style redirect.
    async fn connect(&self) -> Result<Conn> {
        let password = self.password()?;
        let mut config = self.config(&password);
        let limit = Duration::from_secs(self.spec.login_timeout_secs);
        for _ in 0..2 {
            let tcp = self.tcp(&config, limit).await?;
            match Client::connect(config.clone(), tcp.compat_write()).await {
                Ok(c) => return Ok(c),
                Err(tiberius::error::Error::Routing { host, port }) => {
                    config.host(&host);
                    config.port(port);
                }
                Err(e) => return Err(self.login_error(e)),
            }
        }
        Err(Error::source(
            self.origin(),
            "the server redirected the login twice",
        ))
    }

    async fn tcp(&self, config: &Config, limit: Duration) -> Result<TcpStream> {
        use tiberius::SqlBrowser;
        let origin = self.origin();
        let named = self.spec.instance.is_some() && self.spec.port.is_none();
        let attempt = async {
            if named {
                TcpStream::connect_named(config)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                TcpStream::connect(config.get_addr())
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let tcp = match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(Error::source(
                    origin,
                    format!("cannot reach the server: {e}"),
                ))
            }
            Err(_) => {
                return Err(Error::source(
                    origin,
                    format!(
                    "cannot reach the server: no connection within {}s (source.login_timeout_secs)",
                    limit.as_secs()
                ),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    fn login_error(&self, e: tiberius::error::Error) -> Error {
        use tiberius::error::Error as T;
        let s = &self.spec;
        let msg = match &e {
            T::Server(t) if t.code() == 18456 || t.code() == 4060 => format!(
                "login failed for user {:?} on database {:?} (wrong password, unknown login or no access): {}",
                s.user,
                s.database,
                t.message()
            ),
            T::Server(t) => format!("the server refused the login: {} (error {})", t.message(), t.code()),
            T::Tls(m) => format!(
                "TLS handshake failed (source.encryption = {:?}, trust_server_certificate = {}): {m}",
                s.encryption, s.trust_server_certificate
            )
            .replace("Required", "required")
            .replace("NotSupported", "not_supported")
            .replace("On", "on")
            .replace("Off", "off"),
            T::Io { message, .. } if message.contains("timed out") || message.contains("TimedOut") => format!(
                "the login did not complete within {}s (source.login_timeout_secs); a server expecting TLS \
                 while source.encryption = \"not_supported\" looks like this: {message}",
                s.login_timeout_secs
            ),
            T::Io { message, .. } => format!(
                "the connection failed during login (does source.encryption = {} match the server?): {message}",
                encryption_name(s.encryption)
            ),
            T::Protocol(m) => format!(
                "the server does not speak the expected protocol (check source.encryption = {}): {m}",
                encryption_name(s.encryption)
            ),
            other => format!("login failed: {other}"),
        };
        Error::source(self.origin(), msg)
    }
}

fn encryption_name(e: ErpEncryption) -> &'static str {
    match e {
        ErpEncryption::Off => "off",
        ErpEncryption::On => "on",
        ErpEncryption::Required => "required",
        ErpEncryption::NotSupported => "not_supported",
    }
}

fn query_error(origin: &str, what: &str, e: tiberius::error::Error) -> Error {
    use tiberius::error::Error as T;
    let msg = match &e {
        T::Server(t) => format!(
            "{what}: SQL Server error {} at line {}: {}",
            t.code(),
            t.line(),
            t.message()
        ),
        T::Io { message, .. } if message.contains("timed out") || message.contains("TimedOut") => {
            format!("{what}: the server sent nothing within source.query_timeout_secs ({message})")
        }
        other => format!("{what}: {other}"),
    };
    Error::source(origin, msg)
}

/// One result column as the server describes it, and its text mapping.
#[derive(Debug, Clone)]
pub struct ResultColumn {
    /// Column name.
    pub name: String,
    /// SQL type name.
    pub sql_type: String,
    /// How values become text (`None`: this type cannot be mapped).
    pub form: Option<TextForm>,
}

fn describe_columns(cols: &[Column], sample: Option<&Row>) -> Vec<ResultColumn> {
    cols.iter()
        .enumerate()
        .map(|(i, c)| {
            // Only the nullable integer and float types leave their width out of the metadata;
            // a money column's values arrive as floats but it is still money.
            let exact = matches!(c.column_type(), ColumnType::Intn | ColumnType::Floatn)
                .then(|| sample.and_then(|r| r.get_column_data(i).ok()))
                .flatten()
                .and_then(value_type_name);
            ResultColumn {
                name: c.name().to_string(),
                sql_type: exact
                    .unwrap_or_else(|| column_type_name(c.column_type()))
                    .to_string(),
                form: text_form(c.column_type()),
            }
        })
        .collect()
}

/// Runs the probe query: the result's columns and up to `limit` sample rows.
async fn probe(
    settings: &ErpSettings,
    client: &mut Conn,
    limit: u32,
) -> Result<(Vec<ResultColumn>, Vec<Row>)> {
    let origin = settings.origin();
    let s = &settings.spec;
    let q = sql::bind(probe_sql(&s.query, limit), &s.params);
    let mut stream = q
        .query(client)
        .await
        .map_err(|e| query_error(&origin, "the query failed", e))?;
    let cols: Vec<Column> = stream
        .columns()
        .await
        .map_err(|e| query_error(&origin, "the query failed", e))?
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let rows = stream
        .into_first_result()
        .await
        .map_err(|e| query_error(&origin, "the query failed", e))?;
    if cols.is_empty() {
        return Err(Error::source(origin, "the query returns no result set"));
    }
    Ok((describe_columns(&cols, rows.first()), rows))
}

/// Which result column feeds each recipient field, and how.
struct DecodePlan {
    /// Per layout column: (result column index, name, text form).
    columns: Vec<(usize, String, TextForm)>,
    key: (usize, String, TextForm),
}

fn plan(
    origin: &str,
    cols: &[ResultColumn],
    mapping: &[(String, String)],
    key: &str,
) -> Result<DecodePlan> {
    let find = |col: &str| {
        cols.iter()
            .position(|c| c.name == col)
            .or_else(|| cols.iter().position(|c| c.name.eq_ignore_ascii_case(col)))
    };
    let mut wanted: Vec<(String, String)> = mapping
        .iter()
        .map(|(f, c)| (format!("columns.{f}"), c.clone()))
        .collect();
    wanted.push(("source.key_column".into(), key.to_string()));
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, c)| find(c).is_none())
        .map(|(f, c)| format!("{c:?} ({f})"))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::source(
            origin,
            format!(
                "column {} not found; the query returns: {}",
                missing.join(", "),
                names.join(", ")
            ),
        ));
    }
    let idx: Vec<usize> = wanted.iter().filter_map(|(_, c)| find(c)).collect();
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for ((field, _), &i) in wanted.iter().zip(&idx) {
        let c = &cols[i];
        match c.form {
            Some(f) => out.push((i, c.name.clone(), f)),
            None => problems.push(format!(
                "column {:?} ({field}) is {}, which has no text form; CONVERT it in the query",
                c.name, c.sql_type
            )),
        }
    }
    if !problems.is_empty() {
        return Err(Error::source(origin, problems.join("; ")));
    }
    let key = out.pop().expect("key column is last");
    Ok(DecodePlan { columns: out, key })
}

enum Msg {
    Ready(Arc<DecodePlan>),
    Rows { rows: Vec<Row>, first_row: u64 },
    Failed(Error),
    End,
}

/// Streams the rows of the campaign's query in key order, one batch per `next_item`.
pub struct ErpSource {
    origin: String,
    rx: mpsc::Receiver<Msg>,
    plan: Arc<DecodePlan>,
    layout: Arc<RecipientLayout>,
    rows: u64,
    finished: bool,
    io: Option<std::thread::JoinHandle<()>>,
}

impl ErpSource {
    /// Connects, checks the query returns every mapped column and the key, and starts the read.
    pub fn open(
        settings: ErpSettings,
        mapping: &[(String, String)],
        layout: Arc<RecipientLayout>,
    ) -> Result<Self> {
        let origin = settings.origin();
        let (tx, mut rx) = mpsc::channel::<Msg>(1);
        let mapping = mapping.to_vec();
        let io_origin = origin.clone();
        let io_layout = layout.clone();
        let io = std::thread::Builder::new()
            .name("bs-erp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.blocking_send(Msg::Failed(Error::source(
                            io_origin,
                            format!("cannot start the I/O runtime: {e}"),
                        )));
                        return;
                    }
                };
                rt.block_on(read(settings, mapping, io_layout, tx));
            })
            .map_err(|e| {
                Error::source(&origin, format!("cannot start the ERP reader thread: {e}"))
            })?;
        let plan = match rx.blocking_recv() {
            Some(Msg::Ready(p)) => p,
            Some(Msg::Failed(e)) => {
                let _ = io.join();
                return Err(e);
            }
            _ => {
                let _ = io.join();
                return Err(Error::source(
                    &origin,
                    "the ERP reader stopped before the query started",
                ));
            }
        };
        Ok(ErpSource {
            origin,
            rx,
            plan,
            layout,
            rows: 0,
            finished: false,
            io: Some(io),
        })
    }

    /// Progress information: the row count is not known up front.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for ErpSource {
    fn drop(&mut self) {
        // Closing the channel makes the reader stop (it waits on `closed()` as well as the server).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

/// The I/O side: connect, probe, read, hand over batches.
async fn read(
    settings: ErpSettings,
    mapping: Vec<(String, String)>,
    layout: Arc<RecipientLayout>,
    tx: mpsc::Sender<Msg>,
) {
    let origin = settings.origin();
    let fail = |e: Error| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Msg::Failed(e)).await;
        }
    };
    let mut client = match settings.connect().await {
        Ok(c) => c,
        Err(e) => return fail(e).await,
    };
    let s = &settings.spec;
    let (cols, _) = match probe(&settings, &mut client, 0).await {
        Ok(p) => p,
        Err(e) => return fail(e).await,
    };
    let plan = match plan(&origin, &cols, &mapping, &s.key_column) {
        Ok(p) => Arc::new(p),
        Err(e) => return fail(e).await,
    };
    let key_name = plan.key.1.clone();
    let params = sql::read_params(s);
    let q = sql::bind(read_sql(&s.query, &key_name, s.audience.as_ref()), &params);
    // A shard keeps the rows whose recipient key hashes to it (the layout column of the key).
    let shard = match (s.shard, layout.index(settings.recipient_key)) {
        (Some(sh), Some(col)) => Some((sh, plan.columns[col].0, plan.columns[col].2)),
        (Some(_), None) => {
            return fail(Error::source(
                &origin,
                format!(
                    "--shard needs the recipient key ({}) mapped in [columns]",
                    settings.recipient_key.name()
                ),
            ))
            .await
        }
        (None, _) => None,
    };
    let mut key_text = String::new();
    let mut stream = match q.query(&mut client).await {
        Ok(st) => st,
        Err(e) => return fail(query_error(&origin, "the query failed", e)).await,
    };
    if tx.send(Msg::Ready(plan.clone())).await.is_err() {
        return;
    }
    let mut key_check = KeyCheck::new(&key_name, plan.key.0);
    let mut batch: Vec<Row> = Vec::with_capacity(BATCH_ROWS);
    // Rows of the result, and rows of this shard (the run's input rows).
    let mut read_rows = 0u64;
    let mut rows = 0u64;
    loop {
        let item = tokio::select! {
            it = stream.try_next() => it,
            _ = tx.closed() => return,
        };
        match item {
            Ok(Some(QueryItem::Row(r))) => {
                read_rows += 1;
                if let Err(m) = key_check.check(&r, read_rows) {
                    return fail(Error::source(&origin, m)).await;
                }
                if let Some((sh, col, form)) = shard {
                    let raw = match r.get_column_data(col) {
                        Ok(v) => write_text(form, v, &mut key_text),
                        Err(e) => Err(e.to_string()),
                    };
                    match raw {
                        Ok(present) => {
                            if !sh.holds(settings.recipient_key, present.then_some(&*key_text)) {
                                continue;
                            }
                        }
                        Err(m) => {
                            let m = format!("row {read_rows} of the result, recipient key: {m}");
                            return fail(Error::source(&origin, m)).await;
                        }
                    }
                }
                rows += 1;
                batch.push(r);
                if batch.len() == BATCH_ROWS {
                    let rows_out = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS));
                    let first_row = rows - rows_out.len() as u64;
                    if tx
                        .send(Msg::Rows {
                            rows: rows_out,
                            first_row,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Ok(Some(QueryItem::Metadata(m))) => {
                if m.result_index() > 0 {
                    return fail(Error::source(
                        &origin,
                        "the query returned more than one result set; it must be a single SELECT",
                    ))
                    .await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let what = format!("reading row {} of the result", read_rows + 1);
                return fail(query_error(&origin, &what, e)).await;
            }
        }
    }
    if !batch.is_empty() {
        let first_row = rows - batch.len() as u64;
        if tx
            .send(Msg::Rows {
                rows: batch,
                first_row,
            })
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = tx.send(Msg::End).await;
    drop(stream);
    // Close the session politely; the server is done with it either way.
    let _ = client.close().await;
}

/// Refuses NULL and repeated keys: the read order (and so resume and sharding) relies on the
/// key being unique. Repeats are adjacent because the read is ordered by the key; text keys
/// compare case-insensitively and without trailing spaces, as SQL Server's default collations do.
struct KeyCheck {
    name: String,
    idx: usize,
    prev_int: Option<i64>,
    prev_text: String,
    have_prev: bool,
    buf: String,
}

impl KeyCheck {
    fn new(name: &str, idx: usize) -> Self {
        KeyCheck {
            name: name.to_string(),
            idx,
            prev_int: None,
            prev_text: String::new(),
            have_prev: false,
            buf: String::new(),
        }
    }

    fn check(&mut self, row: &Row, n: u64) -> std::result::Result<(), String> {
        let v = row
            .get_column_data(self.idx)
            .map_err(|e| format!("row {n}: key column {:?}: {e}", self.name))?;
        let int = match v {
            ColumnData::U8(x) => x.map(i64::from),
            ColumnData::I16(x) => x.map(i64::from),
            ColumnData::I32(x) => x.map(i64::from),
            ColumnData::I64(x) => *x,
            _ => None,
        };
        let dup = if let Some(i) = int {
            let d = self.prev_int == Some(i);
            self.prev_int = Some(i);
            d
        } else {
            let form = text_form_of(v);
            match write_text(form, v, &mut self.buf) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "row {n}: key column {:?} (source.key_column) is NULL; the key must be unique and not NULL",
                        self.name
                    ))
                }
                Err(e) => return Err(format!("row {n}: key column {:?}: {e}", self.name)),
            }
            let cur = self.buf.trim_end_matches(' ');
            let d = self.have_prev && cur.eq_ignore_ascii_case(&self.prev_text);
            self.prev_text.clear();
            self.prev_text.push_str(cur);
            d
        };
        if dup && self.have_prev {
            let shown = match int {
                Some(i) => i.to_string(),
                None => self.prev_text.clone(),
            };
            return Err(format!(
                "rows {} and {n} have the same key {:?} = {shown:?}; source.key_column must be unique so a resumed or sharded send reads the same rows in the same order",
                n - 1,
                self.name
            ));
        }
        self.have_prev = true;
        Ok(())
    }
}

fn text_form_of(v: &ColumnData<'static>) -> TextForm {
    match v {
        ColumnData::Guid(_) => TextForm::Guid,
        ColumnData::Numeric(_) => TextForm::Decimal,
        _ => TextForm::Text,
    }
}

impl Source for ErpSource {
    fn describe(&self) -> String {
        self.origin.clone()
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        self.next_item()?.map(SourceItem::into_batch).transpose()
    }

    fn next_item(&mut self) -> Result<Option<SourceItem>> {
        if self.finished {
            return Ok(None);
        }
        match self.rx.blocking_recv() {
            Some(Msg::Rows { rows, first_row }) => {
                self.rows += rows.len() as u64;
                let plan = self.plan.clone();
                let layout = self.layout.clone();
                let origin = self.origin.clone();
                Ok(Some(SourceItem::Raw(Box::new(move || {
                    decode(&origin, &plan, &layout, &rows, first_row)
                }))))
            }
            Some(Msg::End) => {
                self.finished = true;
                if self.rows == 0 {
                    return Err(Error::source(
                        &self.origin,
                        "the query returned no recipient rows",
                    ));
                }
                Ok(None)
            }
            Some(Msg::Failed(e)) => {
                self.finished = true;
                Err(e)
            }
            Some(Msg::Ready(_)) | None => {
                self.finished = true;
                Err(Error::source(
                    &self.origin,
                    "the ERP reader stopped unexpectedly",
                ))
            }
        }
    }
}

/// Turns a batch of tiberius rows into recipient text columns (runs on a worker thread).
fn decode(
    origin: &str,
    plan: &DecodePlan,
    layout: &RecipientLayout,
    rows: &[Row],
    first_row: u64,
) -> Result<RecipientBatch> {
    let mut builders: Vec<StringBuilder> = plan
        .columns
        .iter()
        .map(|_| StringBuilder::with_capacity(rows.len(), rows.len() * 16))
        .collect();
    let mut buf = String::with_capacity(64);
    for (r, row) in rows.iter().enumerate() {
        for ((idx, name, form), b) in plan.columns.iter().zip(builders.iter_mut()) {
            let bad = |m: String| {
                Error::source(
                    origin,
                    format!(
                        "row {} of the result, column {name:?}: {m}",
                        first_row + r as u64 + 1
                    ),
                )
            };
            let v = row.get_column_data(*idx).map_err(|e| bad(e.to_string()))?;
            if write_text(*form, v, &mut buf).map_err(bad)? {
                b.append_value(&buf);
            } else {
                b.append_null();
            }
        }
    }
    let arrays: Vec<ArrayRef> = builders
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    let columns = RecordBatch::try_new(layout.schema(), arrays)
        .map_err(|e| Error::source(origin, e.to_string()))?;
    Ok(RecipientBatch::new(0, first_row, columns))
}

/// What `broadside erp check` reports.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The server.
    pub origin: String,
    /// Result columns with their SQL types and text forms.
    pub columns: Vec<ResultColumn>,
    /// Per mapping entry: (field, source column, found column index or None).
    pub mapping: Vec<(String, String, Option<usize>)>,
    /// The key column's index, if found.
    pub key: Option<usize>,
    /// Sample rows as text (at most the requested limit), in the result's column order.
    pub sample: Vec<Vec<Option<String>>>,
    /// Problems that would stop a send.
    pub problems: Vec<String>,
}

/// Connects, runs the query with `TOP (limit)`, and checks it against the column mapping.
pub fn check(
    settings: ErpSettings,
    mapping: &[(String, String)],
    limit: u32,
) -> Result<CheckReport> {
    let origin = settings.origin();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::source(&origin, format!("cannot start the I/O runtime: {e}")))?;
    rt.block_on(async {
        let mut client = settings.connect().await?;
        let (columns, rows) = probe(&settings, &mut client, limit).await?;
        let _ = client.close().await;
        let find = |col: &str| {
            columns.iter().position(|c| c.name == col).or_else(|| {
                columns
                    .iter()
                    .position(|c| c.name.eq_ignore_ascii_case(col))
            })
        };
        let mut problems = Vec::new();
        let mapping: Vec<(String, String, Option<usize>)> = mapping
            .iter()
            .map(|(f, c)| (f.clone(), c.clone(), find(c)))
            .collect();
        for (f, c, i) in &mapping {
            match i {
                None => problems.push(format!("column {c:?} (columns.{f}) is not in the result")),
                Some(i) if columns[*i].form.is_none() => problems.push(format!(
                    "column {c:?} (columns.{f}) is {}, which has no text form",
                    columns[*i].sql_type
                )),
                _ => {}
            }
        }
        let key = find(&settings.spec.key_column);
        if key.is_none() {
            problems.push(format!(
                "key column {:?} (source.key_column) is not in the result",
                settings.spec.key_column
            ));
        }
        let mut buf = String::new();
        let sample = rows
            .iter()
            .enumerate()
            .map(|(n, r)| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let v = r.get_column_data(i).ok()?;
                        match c.form.map(|f| write_text(f, v, &mut buf)) {
                            Some(Ok(true)) => Some(buf.clone()),
                            Some(Ok(false)) | None => None,
                            Some(Err(e)) => {
                                problems.push(format!(
                                    "sample row {}, column {:?}: {e}",
                                    n + 1,
                                    c.name
                                ));
                                None
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(CheckReport {
            origin: origin.clone(),
            columns,
            mapping,
            key,
            sample,
            problems,
        })
    })
}
