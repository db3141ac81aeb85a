//! Event store, ingest and analytics over Parquet (see DESIGN.md). The event schema lives in `broadside_pipeline::event`.
#![warn(missing_docs)]
pub use broadside_pipeline::event;
