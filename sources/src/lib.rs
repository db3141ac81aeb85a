//! Recipient sources (the SQL Server ERP, CSV, Parquet, synthetic) and suppression-list
//! loaders. Every source streams: memory does not grow with the input.
#![warn(missing_docs)]

pub mod csv;
pub mod erp;
pub mod parquet;
pub mod suppression;
pub mod synthetic;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use broadside_pipeline::model::RecipientLayout;
use broadside_pipeline::runner::Source;
use broadside_pipeline::spec::{CampaignSpec, SourceSpec};
use broadside_pipeline::{Error, Result};

/// Rows per batch produced by the sources.
pub const BATCH_ROWS: usize = 8192;

/// What a source can tell about its size, for progress bars.
#[derive(Debug, Clone, Default)]
pub struct SizeHint {
    /// Total rows, when known up front.
    pub total_rows: Option<u64>,
    /// Total bytes and a live counter of bytes read, for file sources of unknown row count.
    pub bytes: Option<(u64, Arc<AtomicU64>)>,
}

/// Opens the source a spec describes.
pub fn open_source(
    spec: &CampaignSpec,
    layout: Arc<RecipientLayout>,
) -> Result<(Box<dyn Source>, SizeHint)> {
    let mapping = spec.columns.source_columns();
    match &spec.source {
        SourceSpec::Csv(c) => {
            let s =
                csv::CsvSource::open(&spec.resolve(&c.path), c.delimiter as u8, &mapping, layout)?;
            let h = s.size_hint();
            Ok((Box::new(s), h))
        }
        SourceSpec::Parquet(p) => {
            let s = parquet::ParquetSource::open(&spec.resolve(&p.path), &mapping, layout)?;
            let h = s.size_hint();
            Ok((Box::new(s), h))
        }
        SourceSpec::Synthetic(s) => {
            let src = synthetic::SyntheticSource::new(
                synthetic::Generator::new(s.seed, s.invalid_share),
                s.rows,
                &mapping,
                layout,
            )?;
            let h = src.size_hint();
            Ok((Box::new(src), h))
        }
        SourceSpec::Erp(e) => {
            if e.shard.is_some() && spec.caps.billing_cap.is_some() {
                return Err(Error::source(
                    format!("erp {}", e.server()),
                    "caps.billing_cap cannot be split across shards (each shard would apply the whole cap); run unsharded or drop the cap",
                ));
            }
            let mut settings = erp::ErpSettings::new(e, |p| spec.resolve(p));
            settings.recipient_key = spec.key_field();
            let s = erp::ErpSource::open(settings, &mapping, layout)?;
            let h = s.size_hint();
            Ok((Box::new(s), h))
        }
    }
}
