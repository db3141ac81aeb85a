//! Analytics over the store with DataFusion: the catalog, the API's queries and analyst SQL.
//!
//! - [`catalog`]: tables over the store, scoped to a workspace;
//! - [`lists`]: filtered, paginated rows (events, bounces, recipient logs, historical bounces);
//! - [`mail`]: a mailed recipient's state now, from the ledger and the printer's tracking;
//! - [`runs`]: campaign run records;
//! - [`sql`]: read-only analyst SQL with limits.

pub mod catalog;
pub mod lists;
pub mod mail;
pub mod runs;
pub mod sql;

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::RecordBatch;
use arrow_schema::DataType;
use chrono::{DateTime, Utc};
use datafusion::logical_expr::{col, lit, Expr};
use datafusion::scalar::ScalarValue;

pub use catalog::{Catalog, Limits, Scope};

/// Result of a query.
pub type QueryResult<T> = std::result::Result<T, QueryError>;

/// Why a query failed; the HTTP API maps each kind to a status.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request is malformed (a filter, a parameter, a refused statement): 400.
    #[error("{0}")]
    BadRequest(String),
    /// The thing asked for does not exist in the caller's workspace: 404.
    #[error("{0}")]
    NotFound(String),
    /// The query ran past its time limit and was cancelled: 504.
    #[error("query cancelled after {0:?} (time limit)")]
    Timeout(std::time::Duration),
    /// DataFusion failed (including the memory limit).
    #[error("query failed: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// Reading a store file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A store file is not what its table expects.
    #[error("{}: {message}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl QueryError {
    /// An I/O error on a path.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        QueryError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Whether the query was stopped by its memory limit.
    pub fn is_memory_limit(&self) -> bool {
        matches!(self, QueryError::DataFusion(e) if matches!(
            e.find_root(),
            datafusion::error::DataFusionError::ResourcesExhausted(_)
        ))
    }

    /// Whether the caller, not the server, is at fault.
    pub fn is_client_error(&self) -> bool {
        match self {
            QueryError::BadRequest(_) | QueryError::NotFound(_) => true,
            QueryError::DataFusion(e) => matches!(
                e.find_root(),
                datafusion::error::DataFusionError::Plan(_)
                    | datafusion::error::DataFusionError::SQL(..)
                    | datafusion::error::DataFusionError::SchemaError(..)
                    | datafusion::error::DataFusionError::ResourcesExhausted(_)
            ),
            _ => false,
        }
    }
}

impl From<arrow_schema::ArrowError> for QueryError {
    fn from(e: arrow_schema::ArrowError) -> Self {
        QueryError::DataFusion(e.into())
    }
}

/// The entries of a folder; none when the folder does not exist (an empty table).
pub(crate) fn dir_entries(dir: &Path) -> QueryResult<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map_err(|e| QueryError::io(dir, e))).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(QueryError::io(dir, e)),
    }
}

/// The values `v` of a folder's `key=v` sub-folders that `keep` accepts, sorted.
pub(crate) fn partition_values(
    dir: &Path,
    key: &str,
    keep: impl Fn(&str) -> bool,
) -> QueryResult<Vec<String>> {
    let prefix = format!("{key}=");
    let mut out: Vec<String> = dir_entries(dir)?
        .iter()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(&prefix)
                .map(str::to_string)
        })
        .filter(|v| keep(v))
        .collect();
    out.sort();
    Ok(out)
}

/// Runs a DataFrame to completion within the catalog's time limit.
pub async fn collect(
    limits: &Limits,
    df: datafusion::dataframe::DataFrame,
) -> QueryResult<Vec<arrow_array::RecordBatch>> {
    match tokio::time::timeout(limits.timeout, df.collect()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(QueryError::Timeout(limits.timeout)),
    }
}

/// Runs a DataFrame within the catalog's time limit, handing each result batch to `f` as it
/// arrives (for answers folded in Rust instead of collected).
pub async fn for_each_batch(
    limits: &Limits,
    df: datafusion::dataframe::DataFrame,
    mut f: impl FnMut(&arrow_array::RecordBatch) -> QueryResult<()>,
) -> QueryResult<()> {
    use futures::StreamExt;
    let work = async {
        let mut stream = df.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            f(&batch?)?;
        }
        Ok(())
    };
    match tokio::time::timeout(limits.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(QueryError::Timeout(limits.timeout)),
    }
}

/// Adds `from <= ts < to` to a filter.
pub(crate) fn and_time_range(
    mut f: Expr,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Expr {
    if let Some(t) = from {
        f = f.and(col("ts").gt_eq(ts_lit(t)));
    }
    if let Some(t) = to {
        f = f.and(col("ts").lt(ts_lit(t)));
    }
    f
}

/// A timestamp literal of the event `ts` type.
pub(crate) fn ts_lit(t: DateTime<Utc>) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t.timestamp_micros()),
        Some("UTC".into()),
    ))
}

/// A column as strings (casting dictionaries).
pub(crate) fn strings(b: &RecordBatch, name: &str) -> QueryResult<arrow_array::StringArray> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("query result lacks column {name}"));
    Ok(arrow_cast::cast(c, &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}
