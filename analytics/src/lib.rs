//! Event store, ingest and analytics over Parquet (see DESIGN.md and docs/events.md).
//!
//! - [`decode`]: JSON events (DESIGN.md shape and provider callbacks) to validated rows;
//! - [`kafka`]: Kafka → Parquet ingest as a consumer-group member, exactly once;
//! - [`file`]: the same store fed from an NDJSON file (embedded default);
//! - [`commit`]: the commit protocol both use;
//! - [`gaps`]: the `ingest_gaps` table (offset ranges the store will never hold);
//! - [`intake`]: the webhook bodies (provider callback forms, JSON batches) parsed to rows;
//! - [`webhook`]: the HTTP intake for provider callbacks and JSON batches;
//! - [`suppression`]: suppression lists built from bounces, complaints and unsubscribes;
//! - [`query`]: the DataFusion catalog, lists, runs and analyst SQL;
//! - [`stats`]: campaign statistics (counts, uniques, rates) per campaign and variant;
//! - [`timeseries`]: event counts per hour/day/week/month bucket in a time zone, gaps filled;
//! - [`rollup`]: hourly pre-aggregates kept beside the events;
//! - [`historical`]: historical bounce imports;
//! - [`params`]: the analytics API's query parameters;
//! - [`api`]: the analytics HTTP API;
//! - [`credentials`]: token and webhook credential hashes, compared in constant time;
//! - [`synth`]: deterministic synthetic events for tests and benchmarks.
//!
//! The event schema lives in `broadside_pipeline::event`.
#![warn(missing_docs)]

pub mod api;
pub mod attribution;
pub mod buffer;
mod columns;
pub mod commit;
pub mod credentials;
pub mod decode;
mod derived;
pub mod error;
pub mod file;
pub mod gaps;
pub mod historical;
pub mod intake;
pub mod kafka;
pub mod params;
pub mod query;
pub mod recipients;
pub mod rollup;
pub mod stats;
pub mod stop;
pub mod suppression;
pub mod synth;
pub mod timeseries;
pub mod webhook;

pub use broadside_pipeline::event;
pub use error::{Error, Result};
pub use file::{ingest_file, ingest_file_until, FileIdentity, FileIngestConfig};
pub use kafka::{
    run_kafka_ingest, CommitInfo, FlushPolicy, IngestHooks, IngestStats, KafkaIngestConfig, OnGap,
};
