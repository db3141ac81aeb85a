//! Read-only analyst SQL over the catalog.
//!
//! A statement is parsed and checked *before* planning: exactly one statement, and it must be a
//! query (`SELECT`, `WITH`, `VALUES`, `EXPLAIN` of a query, `SHOW TABLES`/`SHOW COLUMNS`,
//! `DESCRIBE`). DDL (`CREATE [EXTERNAL] TABLE`, `DROP`…), DML (`INSERT`, `COPY … TO`), `SET`
//! and everything else is refused with the reason. DataFusion's own [`SQLOptions`] then refuse
//! DDL, DML and statements again at planning, and file paths cannot be read as tables (URL
//! tables are not enabled), so `SELECT * FROM '/etc/passwd'` or `'../other/events'` is an
//! unknown table. Memory and time limits come from the catalog's [`Limits`].

use std::io::Write;

use arrow_array::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;

use crate::query::lists::plain;
use crate::query::{collect, Catalog, Limits, QueryError, QueryResult, Scope};

/// Checks that `sql` is one read-only statement; the error says why not.
pub fn check_read_only(sql: &str) -> QueryResult<()> {
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
            Statement::Query(_) => Ok(()),
            Statement::Explain { statement, .. } => match statement.as_ref() {
                Statement::Query(_) => Ok(()),
                _ => refuse("EXPLAIN of a non-query"),
            },
            Statement::ShowTables { .. } | Statement::ShowColumns { .. } => Ok(()),
            Statement::ExplainTable { .. } => Ok(()),
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
            DfStatement::Statement(s) if matches!(s.as_ref(), Statement::Query(_)) => Ok(()),
            _ => refuse("EXPLAIN of a non-query"),
        },
        DfStatement::Reset(_) => refuse("RESET"),
    }
}

/// Runs one read-only statement in a scope and returns its batches.
pub async fn run_sql(catalog: &Catalog, scope: &Scope, sql: &str) -> QueryResult<Vec<RecordBatch>> {
    check_read_only(sql)?;
    let ctx: SessionContext = catalog.session(scope)?;
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let limits: Limits = catalog.limits();
    let df = ctx.sql_with_options(sql, opts).await?;
    collect(&limits, df).await
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
