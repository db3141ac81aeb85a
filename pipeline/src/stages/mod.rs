//! Decision stages. Each is a small synchronous transform over one batch.

pub mod cap;
pub mod dedupe;
pub mod split;
pub mod suppression;
pub mod validate;

use crate::error::Result;
use crate::model::RecipientBatch;

/// One decision stage: looks at a batch and decides (or annotates) its pending rows.
pub trait Stage: Send {
    /// Stage name for stats and logs.
    fn name(&self) -> &'static str;
    /// Processes one batch in place.
    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()>;
}

/// A stage that must see batches in order and may need a final flush (cap, IFUR writer).
pub trait OrderedStage: Stage {
    /// Called once after the last batch, on success only.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called instead of `finish` when the run failed.
    fn abort(&mut self) {}
}

pub use cap::BillingCap;
pub use dedupe::{Deduplicator, DuplicateResolver, SeenRecipients};
pub use split::VariantSplitter;
pub use suppression::{SuppressionIndex, SuppressionIndexBuilder, Suppressor};
pub use validate::Validator;
