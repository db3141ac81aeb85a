//! Sinks of the send path: the IFUR encoder and writer with MegaSys hot-folder delivery, the
//! recipient log and `submitted` events (Parquet, parted by input row range, committed atomically).
#![warn(missing_docs)]

mod chunk;
pub mod coded;
pub mod delivery;
pub mod delta;
pub mod direct;
pub mod events;
pub mod ifur;
pub mod ledger;
pub mod megasys;
pub mod parts;
pub mod text;

/// Errors of the file formats this crate reads back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// An IFUR file does not follow the format.
    #[error("invalid IFUR file: {0}")]
    Format(String),
}
