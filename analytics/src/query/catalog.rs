//! The DataFusion catalog over a store: one [`SessionContext`] per query, scoped to a workspace.
//!
//! Tenancy is enforced where the tables are *registered*, not in SQL text: a workspace session's
//! tables are rooted at that workspace's `workspace_id=<w>/` folders, so files of another
//! workspace are never listed, whatever the query says. Only the analyst command line, run by
//! someone who can read the store's files anyway, may open the all-workspaces scope.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{Array, ArrayRef, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::execution::cache::cache_manager::{
    CacheManagerConfig, CachedFileMetadata, CachedFileMetadataEntry, FileMetadataCache,
    FileStatisticsCache,
};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::cache::TableScopedPath;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
    TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
use datafusion::prelude::{col, lit, SessionConfig, SessionContext};

use crate::decode::valid_workspace_id;
use crate::query::runs::campaign_runs_table;
use crate::query::{QueryError, QueryResult};

/// Which rows a session can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One workspace's rows; the tables have no `workspace_id` column.
    Workspace(String),
    /// Every workspace (analyst command line only); the tables gain a `workspace_id` column.
    All,
}

impl Scope {
    /// A workspace scope, after checking the id is a valid folder name (no `/`, no `..`).
    pub fn workspace(id: &str) -> QueryResult<Scope> {
        if valid_workspace_id(id) {
            Ok(Scope::Workspace(id.to_string()))
        } else {
            Err(QueryError::BadRequest(format!(
                "invalid workspace id {id:?}: letters, digits, '_', '-', '.' only"
            )))
        }
    }
}

/// Resource limits for one query.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory the query's operators may hold (sorts, joins, aggregates); past it the query fails.
    pub memory_bytes: usize,
    /// Wall-clock time after which the query is cancelled.
    pub timeout: Duration,
    /// Partitions each scan is split into (threads working on one query).
    pub target_partitions: usize,
    /// Most rows an analyst SQL answer holds; the query stops there and says it truncated.
    pub max_rows: usize,
    /// Most bytes an analyst SQL answer holds (JSON rows for the API, Arrow data for the
    /// command line); the query stops there and says it truncated.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 2 << 30,
            timeout: Duration::from_secs(60),
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_rows: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// The stores a catalog serves, rooted at one folder (see docs/analytics.md for the tables).
#[derive(Debug, Clone)]
pub struct Catalog {
    store: PathBuf,
    limits: Limits,
    caches: FileCaches,
}

/// Parquet footers and file statistics, kept across the catalog's sessions.
///
/// Each query gets its own session and memory pool, but the parsed footers (page indexes
/// included) and per-file statistics outlive it: a dashboard asking about one campaign again
/// does not re-read and re-parse the footers of every partition. Entries are checked against
/// the file's size and modification time on every use, and store files are never rewritten in
/// place (a rollup is replaced by rename, which gives a new modification time), so a cached
/// entry is never stale. File *listings* are not shared: every query sees newly committed files.
#[derive(Clone)]
struct FileCaches {
    metadata: Arc<FileMetadataCache>,
    statistics: Arc<FileStatisticsCache>,
}

/// Bytes of parsed Parquet footers the catalog keeps (least recently used out first).
const FOOTER_CACHE_BYTES: usize = 256 << 20;
/// Bytes of per-file statistics the catalog keeps.
const STATISTICS_CACHE_BYTES: usize = 64 << 20;

impl FileCaches {
    fn new() -> FileCaches {
        FileCaches {
            metadata: Arc::new(
                DefaultCache::<datafusion::object_store::path::Path, CachedFileMetadataEntry>::new(
                    FOOTER_CACHE_BYTES,
                )
                .with_name("BroadsideFooterCache"),
            ),
            statistics: Arc::new(
                DefaultCache::<TableScopedPath, CachedFileMetadata>::new(STATISTICS_CACHE_BYTES)
                    .with_name("BroadsideStatisticsCache"),
            ),
        }
    }

    fn config(&self) -> CacheManagerConfig {
        CacheManagerConfig::default()
            .with_file_metadata_cache(Some(Arc::clone(&self.metadata)))
            .with_metadata_cache_limit(FOOTER_CACHE_BYTES)
            .with_file_statistics_cache(Some(Arc::clone(&self.statistics)))
            .with_file_statistics_cache_limit(STATISTICS_CACHE_BYTES)
    }
}

impl std::fmt::Debug for FileCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCaches")
            .field("footer_limit", &self.metadata.cache_limit())
            .field("statistics_limit", &self.statistics.cache_limit())
            .finish()
    }
}

/// Folder (under the store) of the hourly count rollups.
pub const ROLLUP_HOURLY: &str = "rollups/hourly";
/// Folder (under the store) of the per-day distinct-recipient rollups.
pub const ROLLUP_UNIQUES: &str = "rollups/uniques";
/// Folder (under the store) of closed months of hourly counts, one file per month.
pub const ROLLUP_HOURLY_MONTHLY: &str = "rollups/hourly_monthly";
/// Folder (under the store) of closed months of distinct recipients, one file per month.
pub const ROLLUP_UNIQUES_MONTHLY: &str = "rollups/uniques_monthly";

/// Schema of `rollup_hourly`.
pub fn hourly_schema() -> SchemaRef {
    schema_of(&[
        ("campaign_id", DataType::Utf8, false),
        ("variant", DataType::Utf8, true),
        ("event_type", DataType::Utf8, false),
        ("bounce_type", DataType::Utf8, true),
        ("hour", ts_type(), false),
        ("n", DataType::Int64, false),
    ])
}

/// Schema of `rollup_uniques`.
pub fn uniques_schema() -> SchemaRef {
    schema_of(&[
        ("campaign_id", DataType::Utf8, false),
        ("variant", DataType::Utf8, true),
        ("event_type", DataType::Utf8, false),
        ("email_hash", DataType::UInt64, false),
    ])
}

/// Folder (under the store) of the per-day event copies sorted by recipient.
pub const RECIPIENT_EVENTS: &str = "rollups/recipient_events";
/// Folder (under the store) of the per-run ledger copies sorted by recipient.
pub const RECIPIENT_LEDGER: &str = "rollups/recipient_ledger";
/// Folder (under the store) of the closed months' run ledgers, merged into one file a month.
pub const RECIPIENT_LEDGER_MONTHLY: &str = "rollups/recipient_ledger_monthly";

/// Schema of `recipient_events` (the event file schema with `email_hash` in front).
pub fn events_index_schema() -> SchemaRef {
    with_hash("email_hash", &broadside_pipeline::event::file_schema())
}

/// Schema of `recipient_ledger` (the ledger schema with `key_hash` in front).
pub fn ledger_index_schema() -> SchemaRef {
    with_hash("key_hash", &broadside_pipeline::store::ledger_schema())
}

/// Schema of `recipient_ledger_monthly`: `recipient_ledger`'s with the run's `campaign_id` and
/// `run_id` as columns (a month file holds many runs).
pub fn ledger_month_schema() -> SchemaRef {
    let ledger = ledger_index_schema();
    let mut fields = vec![Arc::new(ledger.field(0).clone())];
    for name in ["campaign_id", "run_id"] {
        fields.push(Arc::new(Field::new(name, DataType::Utf8, false)));
    }
    fields.extend(ledger.fields().iter().skip(1).cloned());
    Arc::new(Schema::new(fields))
}

fn with_hash(name: &str, schema: &Schema) -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new(name, DataType::UInt64, false))];
    fields.extend(schema.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}

/// Schema of the `historical_bounces` table.
pub fn historical_schema() -> SchemaRef {
    schema_of(&[
        ("email", DataType::Utf8, false),
        ("bounce_type", DataType::Utf8, false),
        ("account_number", DataType::Utf8, true),
        ("bounced_at", ts_type(), true),
        ("source", DataType::Utf8, false),
    ])
}

/// Table functions DataFusion registers by default that fabricate any number of rows from
/// nothing (`SELECT * FROM range(1e12)`); analyst sessions do not have them.
pub const REMOVED_TABLE_FUNCTIONS: [&str; 2] = ["range", "generate_series"];

/// Names of the tables every session has.
pub const TABLES: [&str; 13] = [
    "events",
    "bounce_events",
    "recipient_logs",
    "campaign_runs",
    "historical_bounces",
    "rollup_hourly",
    "rollup_uniques",
    "rollup_hourly_monthly",
    "rollup_uniques_monthly",
    "recipient_events",
    "recipient_ledger",
    "recipient_ledger_monthly",
    "ingest_gaps",
];

impl Catalog {
    /// A catalog over `store` with default limits.
    pub fn new(store: impl Into<PathBuf>) -> Catalog {
        Catalog {
            store: store.into(),
            limits: Limits::default(),
            caches: FileCaches::new(),
        }
    }

    /// Replaces the per-query limits.
    pub fn with_limits(mut self, limits: Limits) -> Catalog {
        self.limits = limits;
        self
    }

    /// The store root.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// The per-query limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A fresh session for analyst SQL: [`Catalog::session`] without the table functions that
    /// fabricate unbounded rows ([`REMOVED_TABLE_FUNCTIONS`]) and without spilling to disk, so
    /// the memory limit is where an analyst query stops (temporary files would be an unbounded
    /// resource of their own).
    pub fn analyst_session(&self, scope: &Scope) -> QueryResult<SessionContext> {
        let ctx = self.session_with(scope, false)?;
        for f in REMOVED_TABLE_FUNCTIONS {
            ctx.deregister_udtf(f);
        }
        Ok(ctx)
    }

    /// A fresh session holding the scope's tables and the `email_hash` function, with a memory
    /// pool of its own ([`Limits::memory_bytes`]).
    pub fn session(&self, scope: &Scope) -> QueryResult<SessionContext> {
        self.session_with(scope, true)
    }

    fn session_with(&self, scope: &Scope, spill: bool) -> QueryResult<SessionContext> {
        let mut runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(MeteredPool(TrackConsumersPool::new(
                GreedyMemoryPool::new(self.limits.memory_bytes),
                NonZeroUsize::new(5).expect("non-zero"),
            ))))
            .with_cache_manager(self.caches.config());
        if !spill {
            runtime = runtime.with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            );
        }
        let runtime = runtime.build_arc()?;
        let mut config = SessionConfig::new()
            .with_target_partitions(self.limits.target_partitions)
            .with_information_schema(true);
        // Pushed-down filters are evaluated while decoding Parquet pages: the per-campaign
        // queries keep a small fraction of every page.
        config.options_mut().execution.parquet.pushdown_filters = true;
        config.options_mut().execution.parquet.reorder_filters = true;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_udf(email_hash_udf());

        let ws = match scope {
            Scope::Workspace(w) => Some(w.as_str()),
            Scope::All => None,
        };
        let events = self.listing("events", ws, &["date"], crate::event::file_schema())?;
        ctx.register_table("events", events.clone())?;
        ctx.register_table(
            "recipient_logs",
            self.listing(
                "recipient_logs",
                ws,
                &["campaign_id", "run_id"],
                broadside_pipeline::store::ledger_schema(),
            )?,
        )?;
        ctx.register_table(
            "historical_bounces",
            self.listing("historical_bounces", ws, &[], historical_schema())?,
        )?;
        ctx.register_table(
            "rollup_hourly",
            self.listing(ROLLUP_HOURLY, ws, &["date"], hourly_schema())?,
        )?;
        ctx.register_table(
            "rollup_uniques",
            self.listing(ROLLUP_UNIQUES, ws, &["date"], uniques_schema())?,
        )?;
        ctx.register_table(
            "rollup_hourly_monthly",
            self.listing(ROLLUP_HOURLY_MONTHLY, ws, &["month"], hourly_schema())?,
        )?;
        ctx.register_table(
            "rollup_uniques_monthly",
            self.listing(ROLLUP_UNIQUES_MONTHLY, ws, &["month"], uniques_schema())?,
        )?;
        ctx.register_table(
            "recipient_events",
            self.listing(RECIPIENT_EVENTS, ws, &["date"], events_index_schema())?,
        )?;
        ctx.register_table(
            "recipient_ledger",
            self.listing(
                RECIPIENT_LEDGER,
                ws,
                &["campaign_id", "run_id"],
                ledger_index_schema(),
            )?,
        )?;
        ctx.register_table(
            "recipient_ledger_monthly",
            self.listing(
                RECIPIENT_LEDGER_MONTHLY,
                ws,
                &["month"],
                ledger_month_schema(),
            )?,
        )?;
        let runs: Arc<MemTable> = Arc::new(campaign_runs_table(&self.store, ws)?);
        ctx.register_table("campaign_runs", runs)?;
        let bounces = ctx
            .read_table(events)?
            .filter(col("event_type").eq(lit("bounced")))?
            .into_view();
        ctx.register_table("bounce_events", bounces)?;
        // Gaps belong to a Kafka partition, not to a workspace: every scope sees the same rows
        // (topic, partition and offsets, no event data), since a gap may hide any workspace's
        // events.
        ctx.register_table(
            "ingest_gaps",
            self.store_wide_listing(crate::gaps::GAPS_DIR, crate::gaps::gaps_schema())?,
        )?;
        Ok(ctx)
    }

    /// The folder a table of `ws` lives in (`<store>/<table>/workspace_id=<w>/`).
    pub fn table_dir(&self, table: &str, ws: Option<&str>) -> PathBuf {
        let mut p = self.store.join(table);
        if let Some(w) = ws {
            p.push(format!("workspace_id={w}"));
        }
        p
    }

    /// A table of files directly under `<store>/<table>/`, with no workspace folders.
    fn store_wide_listing(
        &self,
        table: &str,
        file_schema: SchemaRef,
    ) -> QueryResult<Arc<ListingTable>> {
        let dir = self.store.join(table);
        let abs = std::path::absolute(&dir).map_err(|e| QueryError::io(&dir, e))?;
        let mut text = abs.to_string_lossy().into_owned();
        if !text.ends_with('/') {
            text.push('/');
        }
        let url = ListingTableUrl::parse(&text)?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(file_schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }

    fn listing(
        &self,
        table: &str,
        ws: Option<&str>,
        partitions: &[&str],
        file_schema: SchemaRef,
    ) -> QueryResult<Arc<ListingTable>> {
        let dir = self.table_dir(table, ws);
        let abs = std::path::absolute(&dir).map_err(|e| QueryError::io(&dir, e))?;
        let mut text = abs.to_string_lossy().into_owned();
        if !text.ends_with('/') {
            text.push('/');
        }
        let url = ListingTableUrl::parse(&text)?;
        let mut cols: Vec<(String, DataType)> = Vec::new();
        if ws.is_none() {
            cols.push(("workspace_id".into(), DataType::Utf8));
        }
        cols.extend(partitions.iter().map(|p| (p.to_string(), DataType::Utf8)));
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(cols);
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(file_schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }
}

/// `email_hash(email)`: xxh3-64 of the trimmed, lowercased address, the identity unique
/// counts use (see docs/analytics.md). The raw path and the rollups share it, so both
/// count the same distinct values.
pub fn email_hash(email: &str) -> u64 {
    let t = email.trim();
    if t.bytes().any(|b| b.is_ascii_uppercase()) {
        xxhash_rust::xxh3::xxh3_64(t.to_ascii_lowercase().as_bytes())
    } else {
        xxhash_rust::xxh3::xxh3_64(t.as_bytes())
    }
}

/// `email_hash(e)` as an expression.
pub fn email_hash_expr(e: datafusion::logical_expr::Expr) -> datafusion::logical_expr::Expr {
    email_hash_udf().call(vec![e])
}

fn email_hash_udf() -> datafusion::logical_expr::ScalarUDF {
    create_udf(
        "email_hash",
        vec![DataType::Utf8],
        DataType::UInt64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let a = arrays[0].as_string::<i32>();
            let out: UInt64Array = a.iter().map(|v| v.map(email_hash)).collect();
            let scalar = args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
            let out: ArrayRef = Arc::new(out);
            Ok(if scalar {
                ColumnarValue::Scalar(datafusion::scalar::ScalarValue::try_from_array(&out, 0)?)
            } else {
                ColumnarValue::Array(out)
            })
        }),
    )
}

/// Hashes of a string column (used when rollups are built).
pub fn email_hashes(a: &dyn Array) -> UInt64Array {
    a.as_string::<i32>()
        .iter()
        .map(|v| v.map(email_hash))
        .collect::<arrow_array::PrimitiveArray<UInt64Type>>()
}

/// The `ts` type of the event schema.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A schema from `(name, type, nullable)` triples.
pub fn schema_of(fields: &[(&str, DataType, bool)]) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .iter()
            .map(|(n, t, null)| Field::new(*n, t.clone(), *null))
            .collect::<Vec<_>>(),
    ))
}

/// A query's memory pool that also keeps `broadside_query_memory_bytes` (all running queries
/// of the process together) up to date; limits and their errors are the inner pool's.
#[derive(Debug)]
struct MeteredPool<P>(P);

impl<P: MemoryPool> std::fmt::Display for MeteredPool<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl<P: MemoryPool> MemoryPool for MeteredPool<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.0.register(consumer)
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.0.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.0.grow(reservation, additional);
        metrics::gauge!("broadside_query_memory_bytes").increment(additional as f64);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.0.shrink(reservation, shrink);
        metrics::gauge!("broadside_query_memory_bytes").decrement(shrink as f64);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        self.0.try_grow(reservation, additional)?;
        metrics::gauge!("broadside_query_memory_bytes").increment(additional as f64);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.0.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.0.memory_limit()
    }
}
