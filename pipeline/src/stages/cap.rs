//! The billing cap: the first `cap` eligible recipients in input order go on, the rest are skipped.

use super::Stage;
use crate::error::Result;
use crate::model::{Decision, Reason, RecipientBatch, NO_VARIANT};

/// Skips eligible rows past the billing cap. Stateful: must see batches in sequence order
/// (the runner runs it on its ordered path), which makes the result deterministic.
#[derive(Debug, Clone)]
pub struct BillingCap {
    remaining: Option<u64>,
}

impl BillingCap {
    /// A cap of `cap` recipients, or none.
    pub fn new(cap: Option<u64>) -> Self {
        BillingCap { remaining: cap }
    }
}

impl Stage for BillingCap {
    fn name(&self) -> &'static str {
        "cap"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        let Some(remaining) = self.remaining.as_mut() else {
            return Ok(());
        };
        for i in 0..batch.len() {
            if batch.decisions[i] != Decision::Pending {
                continue;
            }
            if *remaining == 0 {
                batch.decide(i, Decision::Skipped, Reason::CapExceeded);
                batch.variants[i] = NO_VARIANT;
            } else {
                *remaining -= 1;
            }
        }
        Ok(())
    }
}

impl super::OrderedStage for BillingCap {}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::RecordBatch;
    use arrow_schema::Schema;
    use std::sync::Arc;

    fn batch(n: usize) -> RecipientBatch {
        let cols = RecordBatch::try_new_with_options(
            Arc::new(Schema::empty()),
            vec![],
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(n)),
        )
        .unwrap();
        RecipientBatch::new(0, 0, cols)
    }

    #[test]
    fn cap_counts_only_eligible_rows_across_batches() {
        let mut cap = BillingCap::new(Some(3));
        let mut a = batch(2);
        a.decide(0, Decision::Suppressed, Reason::HardBounce);
        cap.process(&mut a).unwrap();
        assert_eq!(a.decisions, vec![Decision::Suppressed, Decision::Pending]);
        let mut b = batch(3);
        cap.process(&mut b).unwrap();
        assert_eq!(b.decisions[..2], [Decision::Pending, Decision::Pending]);
        assert_eq!(b.decisions[2], Decision::Skipped);
        assert_eq!(b.reasons[2], Reason::CapExceeded);
    }
}
