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

pub use cap::BillingCap;
pub use dedupe::{Deduplicator, DuplicateResolver, SeenRecipients};
pub use split::VariantSplitter;
pub use suppression::{SuppressionIndex, SuppressionIndexBuilder, Suppressor};
pub use validate::Validator;
