//! Read-only analyst SQL over the catalog.
//!
//! A statement is parsed and checked *before* planning: exactly one statement, and it must be a
//! query (`SELECT`, `WITH`, `VALUES`, `EXPLAIN` of a query, `SHOW TABLES`/`SHOW COLUMNS`,
//! `DESCRIBE`). DDL (`CREATE [EXTERNAL] TABLE`, `DROP`…), DML (`INSERT`, `COPY … TO`), `SET`
//! and everything else is refused with the reason. DataFusion's own [`SQLOptions`] then refuse
//! DDL, DML and statements again at planning, and file paths cannot be read as tables (URL
//! tables are not enabled), so `SELECT * FROM '/etc/passwd'` or `'../other/events'` is an
//! unknown table. The table functions that fabricate rows from nothing (`range`,
//! `generate_series`) are not in analyst sessions.
//!
//! Every limit holds *while* the query runs, from the catalog's [`Limits`]: the result is
//! streamed batch by batch into an [`AnswerSink`] and the query is dropped (cancelled) as soon
//! as the answer reaches [`Limits::max_rows`] or [`Limits::max_bytes`]; the answer's own
//! buffers are reserved from the query's memory pool ([`Limits::memory_bytes`]) next to the
//! operators' memory; and the whole run is cancelled after [`Limits::timeout`].

use std::io::Write;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::StreamExt;
use serde::Serialize;

use crate::query::lists::plain;
use crate::query::{Catalog, Limits, QueryError, QueryResult, Scope};

/// Checks that `sql` is one read-only statement; the error says why not.
pub fn check_read_only(sql: &str) -> QueryResult<()> {
    read_only_kind(sql).map(|_| ())
}

/// What a read-only statement is: a query (rows of data) or a statement about the catalog or
/// a plan (`SHOW`, `DESCRIBE`, `EXPLAIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    Other,
}

fn read_only_kind(sql: &str) -> QueryResult<Kind> {
    let statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
        .map_err(|e| QueryError::BadRequest(format!("SQL syntax: {e}")))?;
    if statements.len() != 1 {
        return Err(QueryError::BadRequest(format!(
            "exactly one statement expected, got {}",
            statements.len()
        )));
    }
    let refuse = |what: &str| {
        Err(QueryError::BadRequest(format!(
            "refused: {what} is not allowed (read-only SQL: SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE)"
        )))
    };
    match &statements[0] {
        DfStatement::Statement(s) => match s.as_ref() {
            Statement::Query(_) => Ok(Kind::Query),
            Statement::Explain { statement, .. } => match statement.as_ref() {
                Statement::Query(_) => Ok(Kind::Other),
                _ => refuse("EXPLAIN of a non-query"),
            },
            Statement::ShowTables { .. } | Statement::ShowColumns { .. } => Ok(Kind::Other),
            Statement::ExplainTable { .. } => Ok(Kind::Other),
            Statement::Set(_) => refuse("SET"),
            Statement::Copy { .. } => refuse("COPY"),
            Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_) => {
                refuse("data modification")
            }
            _ => refuse("this statement"),
        },
        DfStatement::CreateExternalTable(_) => refuse("CREATE EXTERNAL TABLE"),
        DfStatement::CopyTo(_) => refuse("COPY TO"),
        DfStatement::Explain(e) => match e.statement.as_ref() {
            DfStatement::Statement(s) if matches!(s.as_ref(), Statement::Query(_)) => {
                Ok(Kind::Other)
            }
            _ => refuse("EXPLAIN of a non-query"),
        },
        DfStatement::Reset(_) => refuse("RESET"),
    }
}

/// Why an answer holds fewer rows than the query would have produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// The answer reached [`Limits::max_rows`].
    RowLimit,
    /// The next row would have taken the answer past [`Limits::max_bytes`].
    ByteLimit,
}

/// Where a streamed answer's rows go. Each sink measures its bytes its own way (JSON text for
/// the API, Arrow memory for the command line) and reserves what it keeps from the query's pool.
pub trait AnswerSink {
    /// Keeps the first rows of `batch`, at most `max_rows` of them and at most `max_bytes`
    /// bytes; returns how many rows and bytes it kept. Memory it keeps is reserved in
    /// `reservation` (an error there is the memory limit).
    fn take(
        &mut self,
        batch: &RecordBatch,
        max_rows: usize,
        max_bytes: usize,
        reservation: &MemoryReservation,
    ) -> QueryResult<(usize, usize)>;
}

/// What a streamed query produced.
#[derive(Debug)]
pub struct SqlAnswer {
    /// The result's schema (known even without rows).
    pub schema: SchemaRef,
    /// Rows the sink kept.
    pub rows: usize,
    /// Bytes the sink kept, as it counts them.
    pub bytes: usize,
    /// Set when the query was stopped at a limit before its last row.
    pub truncated: Option<Truncation>,
    /// The sink's memory, reserved from the query's pool: keep it until the answer is sent.
    pub reservation: MemoryReservation,
}

/// Runs one read-only statement in a scope, streaming its rows into `sink` until the last row
/// or the first limit (rows, bytes, memory, time; see the module documentation).
pub async fn run_sql(
    catalog: &Catalog,
    scope: &Scope,
    sql: &str,
    sink: &mut (impl AnswerSink + Send),
) -> QueryResult<SqlAnswer> {
    let kind = read_only_kind(sql)?;
    let ctx: SessionContext = catalog.analyst_session(scope)?;
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let limits: Limits = catalog.limits();
    let reservation = MemoryConsumer::new("sql answer").register(&ctx.runtime_env().memory_pool);
    let work = async {
        let mut df = ctx.sql_with_options(sql, opts).await?;
        if kind == Kind::Query {
            // One row past the limit tells a truncated answer from an exact one, and a
            // limit above a sort lets the sort keep only its top rows.
            df = df.limit(0, Some(limits.max_rows.saturating_add(1)))?;
        }
        let mut stream = df.execute_stream().await?;
        let schema = stream.schema();
        let (mut rows, mut bytes, mut truncated) = (0usize, 0usize, None);
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let rows_left = limits.max_rows - rows;
            let (r, b) = sink.take(&batch, rows_left, limits.max_bytes - bytes, &reservation)?;
            rows += r;
            bytes += b;
            if r < batch.num_rows() {
                truncated = Some(if r == rows_left {
                    Truncation::RowLimit
                } else {
                    Truncation::ByteLimit
                });
                break;
            }
        }
        // Dropping the stream here cancels whatever the plan was still computing.
        drop(stream);
        QueryResult::Ok((schema, rows, bytes, truncated))
    };
    let (schema, rows, bytes, truncated) = match tokio::time::timeout(limits.timeout, work).await {
        Ok(r) => r?,
        Err(_) => return Err(QueryError::Timeout(limits.timeout)),
    };
    Ok(SqlAnswer {
        schema,
        rows,
        bytes,
        truncated,
        reservation,
    })
}

/// Rows encoded as JSON objects, comma-separated, after a prefix (e.g. `{"rows":[`); bytes
/// are the rows' text. Nulls are omitted, timestamps RFC 3339, dictionaries plain strings.
#[derive(Debug, Default)]
pub struct JsonRows {
    text: Vec<u8>,
    rows: usize,
}

/// Rows encoded per step: bounds the scratch text of one step however wide the rows are.
const JSON_STEP_ROWS: usize = 512;

impl JsonRows {
    /// Rows that will follow `prefix`.
    pub fn after(prefix: &[u8]) -> JsonRows {
        JsonRows {
            text: prefix.to_vec(),
            rows: 0,
        }
    }

    /// The prefix, the rows and `suffix`, in one buffer (grown within `reservation`).
    pub fn finish(
        mut self,
        suffix: &[u8],
        reservation: &MemoryReservation,
    ) -> QueryResult<Vec<u8>> {
        reservation.try_resize(self.text.len() + suffix.len())?;
        self.text.reserve_exact(suffix.len());
        self.text.extend_from_slice(suffix);
        Ok(self.text)
    }
}

impl AnswerSink for JsonRows {
    fn take(
        &mut self,
        batch: &RecordBatch,
        max_rows: usize,
        max_bytes: usize,
        reservation: &MemoryReservation,
    ) -> QueryResult<(usize, usize)> {
        let n = batch.num_rows().min(max_rows);
        let batch = plain(&batch.slice(0, n))?;
        let (mut rows, mut bytes) = (0, 0);
        let mut scratch = Vec::new();
        let mut start = 0;
        while start < n {
            let len = JSON_STEP_ROWS.min(n - start);
            scratch.clear();
            {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut scratch);
                w.write(&batch.slice(start, len))?;
                w.finish()?;
            }
            // The scratch text is the answer's too while it exists.
            let held = self.text.capacity() + scratch.capacity();
            reservation.try_resize(held)?;
            let mut fit = 0;
            let mut add = 0;
            for line in scratch.split(|b| *b == b'\n').take(len) {
                let cost = line.len() + usize::from(self.rows + fit > 0);
                if bytes + add + cost > max_bytes {
                    break;
                }
                add += cost;
                fit += 1;
            }
            if self.text.capacity() < self.text.len() + add {
                let want = (self.text.len() + add)
                    .max(self.text.capacity() * 2)
                    .min(self.text.len() + max_bytes - bytes);
                reservation.try_resize(want + scratch.capacity())?;
                self.text.reserve_exact(want - self.text.len());
            }
            for line in scratch.split(|b| *b == b'\n').take(fit) {
                if self.rows > 0 {
                    self.text.push(b',');
                }
                self.text.extend_from_slice(line);
                self.rows += 1;
            }
            rows += fit;
            bytes += add;
            if fit < len {
                break;
            }
            start += len;
        }
        drop(scratch);
        reservation.try_resize(self.text.capacity())?;
        Ok((rows, bytes))
    }
}

/// Arrow batches as they came (for the command line's writers); bytes are each kept row's
/// share of its batch's Arrow memory. A cut batch is kept as a slice, so its whole memory
/// stays reserved.
#[derive(Debug, Default)]
pub struct Batches {
    /// The kept batches.
    pub batches: Vec<RecordBatch>,
}

impl AnswerSink for Batches {
    fn take(
        &mut self,
        batch: &RecordBatch,
        max_rows: usize,
        max_bytes: usize,
        reservation: &MemoryReservation,
    ) -> QueryResult<(usize, usize)> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok((0, 0));
        }
        let memory = batch.get_array_memory_size();
        let per_row = memory.div_ceil(n).max(1);
        let fit = n.min(max_rows).min(max_bytes / per_row);
        if fit > 0 {
            reservation.try_grow(memory)?;
            self.batches.push(batch.slice(0, fit));
        }
        Ok((fit, fit * per_row))
    }
}

/// Output formats of analyst SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
    /// A Parquet file.
    Parquet,
}

/// Writes batches in a format.
pub fn write_batches(
    batches: &[RecordBatch],
    format: Format,
    out: impl Write + Send,
) -> QueryResult<()> {
    let batches: Vec<RecordBatch> = batches.iter().map(plain).collect::<QueryResult<_>>()?;
    match format {
        Format::Table => {
            let mut out = out;
            let t = datafusion::arrow::util::pretty::pretty_format_batches(&batches)?;
            writeln!(out, "{t}").map_err(|e| QueryError::io("<output>", e))?;
        }
        Format::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            for b in &batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Parquet => {
            let Some(first) = batches.first() else {
                return Err(QueryError::BadRequest(
                    "the query returned no batches: nothing to write as Parquet".into(),
                ));
            };
            let mut w = parquet::arrow::ArrowWriter::try_new(out, first.schema(), None)
                .map_err(|e| QueryError::DataFusion(e.into()))?;
            for b in &batches {
                w.write(b).map_err(|e| QueryError::DataFusion(e.into()))?;
            }
            w.close().map_err(|e| QueryError::DataFusion(e.into()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_corpus() {
        for sql in [
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc/'",
            "CREATE TABLE t AS SELECT 1",
            "CREATE VIEW v AS SELECT 1",
            "COPY events TO '/tmp/x.parquet'",
            "COPY (SELECT 1) TO '../out.csv'",
            "INSERT INTO events VALUES (1)",
            "DELETE FROM events",
            "UPDATE events SET email = 'x'",
            "DROP TABLE events",
            "SET datafusion.execution.target_partitions = 1",
            "RESET datafusion.execution.target_partitions",
            "SELECT 1; SELECT 2",
            "SELECT 1; DROP TABLE events",
            "EXPLAIN COPY events TO '/tmp/x'",
            "",
        ] {
            assert!(check_read_only(sql).is_err(), "accepted: {sql}");
        }
        for sql in [
            "SELECT * FROM events",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
            "VALUES (1)",
        ] {
            check_read_only(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
