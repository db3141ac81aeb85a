//! Preflight billing: a mail campaign runs only if the organisation can be billed for it, and
//! mails at most its recipient cap.
//!
//! [`preflight`] fails closed (`BILLING_NOT_READY`, seed 004) before any proofing or printing
//! when no usable billing path exists or when billing could not be looked up at all, so no
//! creative credit is burnt and no mailpiece is printed for an org that cannot be billed.
//! [`RecipientCap`] then skips recipients past the cap with `Skipped(CapExceeded)`, in input
//! order, so the same recipients are admitted on every run of the same input.

use serde::Deserialize;

use crate::state::{ErrorMessage, RecipientState, SkipReason};

/// What is known about the organisation's billing when the campaign starts (a campaign spec's
/// `[printer.billing]` table: absent keys are false / 0 / no cap).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingAccount {
    /// The org has a payment-provider customer.
    pub customer: bool,
    /// The customer has an active subscription.
    pub active_subscription: bool,
    /// The org has a legacy per-item subscription.
    pub legacy_subscription_item: bool,
    /// The legacy item's price no longer matches the current price list.
    pub legacy_price_drift: bool,
    /// Most recipients the org may mail in this billing period; `None` is unlimited.
    pub recipient_cap: Option<u64>,
    /// Recipients already mailed in this period.
    pub recipients_used: u64,
}

/// How the campaign will be billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingPath {
    /// Through the active subscription.
    Subscription,
    /// Through the legacy per-item subscription.
    LegacyItem,
}

/// The campaign may not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", ErrorMessage::BillingNotReady.text(), reasons.join("; "))]
pub struct BillingNotReady {
    /// Every reason found.
    pub reasons: Vec<String>,
}

impl BillingNotReady {
    /// The seed 004 code, `BILLING_NOT_READY`.
    pub fn code(&self) -> &'static str {
        ErrorMessage::BillingNotReady.code()
    }
}

/// Checks billing before proofing or sending. `None` (billing could not be looked up) fails
/// closed like a missing billing path.
pub fn preflight(account: Option<&BillingAccount>) -> Result<BillingPath, BillingNotReady> {
    let Some(a) = account else {
        return Err(BillingNotReady {
            reasons: vec!["billing could not be looked up".into()],
        });
    };
    let mut reasons = Vec::new();
    if !a.customer {
        reasons.push("no billing customer".to_string());
    } else if a.active_subscription {
        return Ok(BillingPath::Subscription);
    } else if a.legacy_subscription_item && !a.legacy_price_drift {
        return Ok(BillingPath::LegacyItem);
    } else {
        reasons.push("no active subscription".into());
        if !a.legacy_subscription_item {
            reasons.push("no legacy subscription item".into());
        } else {
            reasons.push("legacy price drift".into());
        }
    }
    Err(BillingNotReady { reasons })
}

/// Admits recipients up to the billing cap; the rest are `Skipped(CapExceeded)`.
#[derive(Debug, Clone)]
pub struct RecipientCap {
    remaining: Option<u64>,
}

impl RecipientCap {
    /// The cap left for this campaign.
    pub fn new(account: &BillingAccount) -> RecipientCap {
        RecipientCap {
            remaining: account
                .recipient_cap
                .map(|cap| cap.saturating_sub(account.recipients_used)),
        }
    }

    /// Recipients still admitted; `None` is unlimited.
    pub fn remaining(&self) -> Option<u64> {
        self.remaining
    }

    /// Admits the next recipient (`None`), or says which state it moves to.
    pub fn admit(&mut self) -> Option<RecipientState> {
        match &mut self.remaining {
            None => None,
            Some(0) => Some(RecipientState::skipped(SkipReason::CapExceeded)),
            Some(n) => {
                *n -= 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> BillingAccount {
        BillingAccount {
            customer: true,
            active_subscription: true,
            ..BillingAccount::default()
        }
    }

    #[test]
    fn billing_paths() {
        assert_eq!(preflight(Some(&account())), Ok(BillingPath::Subscription));
        let legacy = BillingAccount {
            active_subscription: false,
            legacy_subscription_item: true,
            ..account()
        };
        assert_eq!(preflight(Some(&legacy)), Ok(BillingPath::LegacyItem));
    }

    #[test]
    fn fails_closed() {
        let cases = [
            (None, "billing could not be looked up"),
            (Some(BillingAccount::default()), "no billing customer"),
            (
                Some(BillingAccount {
                    active_subscription: false,
                    ..account()
                }),
                "no active subscription; no legacy subscription item",
            ),
            (
                Some(BillingAccount {
                    active_subscription: false,
                    legacy_subscription_item: true,
                    legacy_price_drift: true,
                    ..account()
                }),
                "no active subscription; legacy price drift",
            ),
        ];
        for (a, why) in cases {
            let err = preflight(a.as_ref()).unwrap_err();
            assert_eq!(err.code(), "BILLING_NOT_READY");
            assert_eq!(
                err.to_string(),
                format!("Org billing is not ready to send: {why}")
            );
        }
    }

    #[test]
    fn cap_skips_recipients_past_it_in_order() {
        let mut cap = RecipientCap::new(&BillingAccount {
            recipient_cap: Some(5),
            recipients_used: 2,
            ..account()
        });
        let decisions: Vec<_> = (0..5).map(|_| cap.admit()).collect();
        let skipped = Some(RecipientState::skipped(SkipReason::CapExceeded));
        assert_eq!(decisions, [None, None, None, skipped.clone(), skipped]);
        let mut unlimited = RecipientCap::new(&account());
        assert!((0..1000).all(|_| unlimited.admit().is_none()));
        let mut over = RecipientCap::new(&BillingAccount {
            recipient_cap: Some(1),
            recipients_used: 9,
            ..account()
        });
        assert!(over.admit().is_some());
    }
}
