//! The mail recipient state machine (seed 004), kept per recipient in the send ledger.
//!
//! ```text
//! Pending → ProofingStaged → Proofing → Proofed → SendingStaged → Sending → Sent → Received | Returned
//!                                  ↘ Error    ↘ Scheduled → Sent       ↺ SendingStaged, ↘ Error
//! Pending → AddressEnrichable → AddressEnriching → Pending | Skipped(EnrichmentFailed | NoAddress)
//! Pending → Skipped(NoAddress | International | CapExceeded | PrinterApprovalFailed)
//! Pending → Holdout, Pending → Blacklisted
//! ```
//!
//! Only the edges in [`RecipientState::allowed`] exist; docs/recipient-states.md draws them
//! and says where they differ from the seed's graph. A refused transition is a bug in the
//! caller: [`RecipientState::advance`] returns [`IllegalTransition`] naming both states and, in
//! debug builds, panics so tests find it. Resuming after a crash needs no extra edges: the work
//! of every in-flight state (proofing, sending with its idempotency key) is safe to redo, so a
//! resumed recipient simply re-runs the work of the state it was left in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a recipient was not mailed (seed 004's skip reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SkipReason {
    /// No address1, or enrichment came back without one.
    NoAddress,
    /// Country check or address validation failed.
    International,
    /// The billing recipient cap was reached.
    CapExceeded,
    /// The enrichment provider returned no result.
    EnrichmentFailed,
    /// The printer's approval rules rejected the recipient (the failures are kept beside the
    /// state as `approval_errors`).
    PrinterApprovalFailed,
}

impl SkipReason {
    /// Every reason.
    pub const ALL: [SkipReason; 5] = [
        SkipReason::NoAddress,
        SkipReason::International,
        SkipReason::CapExceeded,
        SkipReason::EnrichmentFailed,
        SkipReason::PrinterApprovalFailed,
    ];

    /// The wire name (`NoAddress`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoAddress => "NoAddress",
            SkipReason::International => "International",
            SkipReason::CapExceeded => "CapExceeded",
            SkipReason::EnrichmentFailed => "EnrichmentFailed",
            SkipReason::PrinterApprovalFailed => "PrinterApprovalFailed",
        }
    }
}

/// The error messages set on recipients in [`RecipientState::Error`] (seed 004), so operators
/// see the same text whatever printer failed; a detail may follow after `": "`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorMessage {
    /// Preflight: no usable billing path for the organisation.
    BillingNotReady,
    /// Proofing: the creative could not be rendered.
    CouldNotGenerateCreative,
    /// Mailing: the mailing queue refused the recipient.
    FailedSubmissionToMailingQueue,
    /// Mailing: the printer could not be reached or refused the submission.
    FailedSubmissionToPrinter,
    /// Proofing: the proofing queue refused the recipient.
    FailedSubmissionToProofingQueue,
    /// Proofing: a discount code could not be applied.
    FailedToApplyDiscountCode,
    /// Mailing: the printer rejected the mailpiece (bad data).
    FailedToMakeMailPiece,
    /// Proofing: the proof could not be made.
    FailedToMakeProof,
}

impl ErrorMessage {
    /// The constant's name (`BILLING_NOT_READY`, ...).
    pub fn code(self) -> &'static str {
        match self {
            ErrorMessage::BillingNotReady => "BILLING_NOT_READY",
            ErrorMessage::CouldNotGenerateCreative => "COULD_NOT_GENERATE_CREATIVE",
            ErrorMessage::FailedSubmissionToMailingQueue => "FAILED_SUBMISSION_TO_MAILING_QUEUE",
            ErrorMessage::FailedSubmissionToPrinter => "FAILED_SUBMISSION_TO_PRINTER",
            ErrorMessage::FailedSubmissionToProofingQueue => "FAILED_SUBMISSION_TO_PROOFING_QUEUE",
            ErrorMessage::FailedToApplyDiscountCode => "FAILED_TO_APPLY_DISCOUNT_CODE",
            ErrorMessage::FailedToMakeMailPiece => "FAILED_TO_MAKE_MAIL_PIECE",
            ErrorMessage::FailedToMakeProof => "FAILED_TO_MAKE_PROOF",
        }
    }

    /// The message text users see.
    pub fn text(self) -> &'static str {
        match self {
            ErrorMessage::BillingNotReady => "Org billing is not ready to send",
            ErrorMessage::CouldNotGenerateCreative => "Could not generate creative for recipient",
            ErrorMessage::FailedSubmissionToMailingQueue => "Failed submission to Mailing Queue",
            ErrorMessage::FailedSubmissionToPrinter => "Failed submission to Printer",
            ErrorMessage::FailedSubmissionToProofingQueue => "Failed submission to Proofing Queue",
            ErrorMessage::FailedToApplyDiscountCode => "Failed to apply discount code",
            ErrorMessage::FailedToMakeMailPiece => "Failed to make mail piece for this recipient",
            ErrorMessage::FailedToMakeProof => "Failed to make proof for this recipient",
        }
    }

    /// The text with an optional detail: `Failed submission to Printer: 3 attempts, HTTP 503`.
    pub fn with_detail(self, detail: &str) -> String {
        if detail.is_empty() {
            self.text().to_string()
        } else {
            format!("{}: {detail}", self.text())
        }
    }
}

/// Where a mail recipient is in the campaign.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum RecipientState {
    /// Synced and valid; ready for proofing.
    Pending,
    /// Queued for proof generation.
    ProofingStaged,
    /// Proof generation in progress.
    Proofing,
    /// Proof made; ready for mailing.
    Proofed,
    /// Queued for mailpiece creation.
    SendingStaged,
    /// Mailpiece creation in progress.
    Sending,
    /// Mailpiece submitted to the printer.
    Sent,
    /// Delivered, as reported by the printer's webhooks.
    Received,
    /// Returned to the sender, as reported by the printer's webhooks.
    Returned,
    /// Created at the printer with a future mail date.
    Scheduled,
    /// Control group member: not mailed on purpose.
    Holdout,
    /// Not mailed because of the reason.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
    /// Missing address1 but eligible for enrichment.
    AddressEnrichable,
    /// Address enrichment in progress.
    AddressEnriching,
    /// A fatal error in proofing or mailing.
    Error {
        /// An [`ErrorMessage`] text, possibly with a detail.
        message: String,
    },
    /// On the organisation's blocklist.
    Blacklisted,
}

use RecipientState as S;

/// The shape of a state without its data, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pending,
    ProofingStaged,
    Proofing,
    Proofed,
    SendingStaged,
    Sending,
    Sent,
    Received,
    Returned,
    Scheduled,
    Holdout,
    Skipped(SkipReason),
    AddressEnrichable,
    AddressEnriching,
    Error,
    Blacklisted,
}

impl RecipientState {
    /// A skipped state.
    pub fn skipped(reason: SkipReason) -> RecipientState {
        S::Skipped { reason }
    }

    /// An error state with one of seed 004's messages and an optional detail.
    pub fn error(message: ErrorMessage, detail: &str) -> RecipientState {
        S::Error {
            message: message.with_detail(detail),
        }
    }

    /// One state of every shape: each skip reason once, `Error` with an empty message.
    pub fn samples() -> Vec<RecipientState> {
        let mut all = vec![
            S::Pending,
            S::ProofingStaged,
            S::Proofing,
            S::Proofed,
            S::SendingStaged,
            S::Sending,
            S::Sent,
            S::Received,
            S::Returned,
            S::Scheduled,
            S::Holdout,
        ];
        all.extend(SkipReason::ALL.iter().map(|r| S::skipped(*r)));
        all.extend([
            S::AddressEnrichable,
            S::AddressEnriching,
            S::Error {
                message: String::new(),
            },
            S::Blacklisted,
        ]);
        all
    }

    fn kind(&self) -> Kind {
        match self {
            S::Pending => Kind::Pending,
            S::ProofingStaged => Kind::ProofingStaged,
            S::Proofing => Kind::Proofing,
            S::Proofed => Kind::Proofed,
            S::SendingStaged => Kind::SendingStaged,
            S::Sending => Kind::Sending,
            S::Sent => Kind::Sent,
            S::Received => Kind::Received,
            S::Returned => Kind::Returned,
            S::Scheduled => Kind::Scheduled,
            S::Holdout => Kind::Holdout,
            S::Skipped { reason } => Kind::Skipped(*reason),
            S::AddressEnrichable => Kind::AddressEnrichable,
            S::AddressEnriching => Kind::AddressEnriching,
            S::Error { .. } => Kind::Error,
            S::Blacklisted => Kind::Blacklisted,
        }
    }

    /// The state's name without data (`Skipped`, `Error`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            S::Pending => "Pending",
            S::ProofingStaged => "ProofingStaged",
            S::Proofing => "Proofing",
            S::Proofed => "Proofed",
            S::SendingStaged => "SendingStaged",
            S::Sending => "Sending",
            S::Sent => "Sent",
            S::Received => "Received",
            S::Returned => "Returned",
            S::Scheduled => "Scheduled",
            S::Holdout => "Holdout",
            S::Skipped { .. } => "Skipped",
            S::AddressEnrichable => "AddressEnrichable",
            S::AddressEnriching => "AddressEnriching",
            S::Error { .. } => "Error",
            S::Blacklisted => "Blacklisted",
        }
    }

    /// Whether the documented graph has an edge from this state to `to` (data such as the error
    /// message does not matter; the skip reason does).
    pub fn allowed(&self, to: &RecipientState) -> bool {
        use Kind as K;
        use SkipReason as R;
        matches!(
            (self.kind(), to.kind()),
            (K::Pending, K::ProofingStaged)
                | (K::Pending, K::AddressEnrichable)
                | (K::Pending, K::Holdout)
                | (K::Pending, K::Blacklisted)
                | (
                    K::Pending,
                    K::Skipped(
                        R::NoAddress | R::International | R::CapExceeded | R::PrinterApprovalFailed
                    )
                )
                | (K::ProofingStaged, K::Proofing)
                | (K::Proofing, K::Proofed)
                | (K::Proofing, K::Error)
                | (K::Proofed, K::SendingStaged)
                | (K::Proofed, K::Scheduled)
                | (K::SendingStaged, K::Sending)
                | (K::Sending, K::Sent)
                | (K::Sending, K::SendingStaged)
                | (K::Sending, K::Error)
                | (K::Sent, K::Received)
                | (K::Sent, K::Returned)
                | (K::Scheduled, K::Sent)
                | (K::AddressEnrichable, K::AddressEnriching)
                | (K::AddressEnriching, K::Pending)
                | (
                    K::AddressEnriching,
                    K::Skipped(R::EnrichmentFailed | R::NoAddress)
                )
        )
    }

    /// The state a ledger's `mail_state` names, for the states without data (`Skipped` and
    /// `Error` carry a reason or message the column does not hold: `None`).
    pub fn from_name(name: &str) -> Option<RecipientState> {
        Self::samples()
            .into_iter()
            .find(|s| s.name() == name && !matches!(s, S::Skipped { .. } | S::Error { .. }))
    }

    /// Whether no edge leaves this state.
    pub fn is_final(&self) -> bool {
        !Self::samples().iter().any(|to| self.allowed(to))
    }

    /// Checks the move to `to` and returns the new state, or the refusal naming both states.
    /// Never panics: for callers that decide what to do with a refusal (and for tests).
    pub fn transition(&self, to: RecipientState) -> Result<RecipientState, IllegalTransition> {
        if self.allowed(&to) {
            Ok(to)
        } else {
            Err(IllegalTransition {
                from: self.clone(),
                to,
            })
        }
    }

    /// Moves this state to `to`. A refused move is a bug: it is logged, panics in debug builds
    /// and in release returns the error (the state is left unchanged) so the caller can record
    /// the recipient as failed instead of losing it.
    pub fn advance(&mut self, to: RecipientState) -> Result<(), IllegalTransition> {
        match self.transition(to) {
            Ok(next) => {
                *self = next;
                Ok(())
            }
            Err(e) => {
                tracing::error!(%e, "refused recipient state transition");
                debug_assert!(false, "{e}");
                Err(e)
            }
        }
    }
}

impl fmt::Display for RecipientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S::Skipped { reason } => write!(f, "Skipped({})", reason.as_str()),
            S::Error { message } if !message.is_empty() => write!(f, "Error({message:?})"),
            other => f.write_str(other.name()),
        }
    }
}

/// A transition the graph does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal recipient state transition {from} -> {to}")]
pub struct IllegalTransition {
    /// The state the recipient was in.
    pub from: RecipientState,
    /// The state asked for.
    pub to: RecipientState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The documented edges, written out independently of `allowed` (by display name).
    const EDGES: &[(&str, &str)] = &[
        ("Pending", "ProofingStaged"),
        ("Pending", "AddressEnrichable"),
        ("Pending", "Holdout"),
        ("Pending", "Blacklisted"),
        ("Pending", "Skipped(NoAddress)"),
        ("Pending", "Skipped(International)"),
        ("Pending", "Skipped(CapExceeded)"),
        ("Pending", "Skipped(PrinterApprovalFailed)"),
        ("ProofingStaged", "Proofing"),
        ("Proofing", "Proofed"),
        ("Proofing", "Error"),
        ("Proofed", "SendingStaged"),
        ("Proofed", "Scheduled"),
        ("SendingStaged", "Sending"),
        ("Sending", "Sent"),
        ("Sending", "SendingStaged"),
        ("Sending", "Error"),
        ("Sent", "Received"),
        ("Sent", "Returned"),
        ("Scheduled", "Sent"),
        ("AddressEnrichable", "AddressEnriching"),
        ("AddressEnriching", "Pending"),
        ("AddressEnriching", "Skipped(EnrichmentFailed)"),
        ("AddressEnriching", "Skipped(NoAddress)"),
    ];

    #[test]
    fn every_pair_is_allowed_or_refused_as_documented() {
        let states = RecipientState::samples();
        assert_eq!(states.len(), 20);
        let mut allowed = 0;
        for from in &states {
            for to in &states {
                let documented = EDGES.contains(&(&*from.to_string(), &*to.to_string()));
                match from.transition(to.clone()) {
                    Ok(next) => {
                        assert!(documented, "{from} -> {to} is allowed but not documented");
                        assert_eq!(&next, to);
                        allowed += 1;
                    }
                    Err(e) => {
                        assert!(!documented, "{from} -> {to} is documented but refused");
                        assert_eq!(e.from, *from);
                        assert_eq!(e.to, *to);
                        let text = e.to_string();
                        assert!(text.contains(&format!("{from} -> {to}")), "{text}");
                    }
                }
            }
        }
        assert_eq!(allowed, EDGES.len());
        assert_eq!(states.len() * states.len() - allowed, 400 - 24);
    }

    #[test]
    fn error_message_does_not_change_the_edge() {
        let to = RecipientState::error(ErrorMessage::FailedToMakeProof, "timeout");
        assert_eq!(
            to,
            RecipientState::Error {
                message: "Failed to make proof for this recipient: timeout".into()
            }
        );
        assert!(RecipientState::Proofing.allowed(&to));
        assert!(!RecipientState::Sent.allowed(&to));
    }

    #[test]
    fn final_states() {
        let finals: Vec<String> = RecipientState::samples()
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| s.name().to_string())
            .collect();
        // Every skip reason plus Received, Returned, Holdout, Error and Blacklisted.
        assert_eq!(finals.len(), 5 + 5);
        for name in [
            "Received",
            "Returned",
            "Holdout",
            "Error",
            "Blacklisted",
            "Skipped",
        ] {
            assert!(finals.iter().any(|f| f == name), "{name} should be final");
        }
    }

    #[test]
    fn advance_moves_along_the_happy_path() {
        let mut s = RecipientState::Pending;
        for next in [
            S::ProofingStaged,
            S::Proofing,
            S::Proofed,
            S::SendingStaged,
            S::Sending,
            S::SendingStaged,
            S::Sending,
            S::Sent,
            S::Received,
        ] {
            s.advance(next.clone()).unwrap();
            assert_eq!(s, next);
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "illegal recipient state transition Sent -> Pending")]
    fn advance_panics_on_an_illegal_move_in_debug() {
        let mut s = RecipientState::Sent;
        let _ = s.advance(RecipientState::Pending);
    }

    #[test]
    fn ledger_names_give_the_states_without_data() {
        assert_eq!(RecipientState::from_name("Sent"), Some(S::Sent));
        assert_eq!(RecipientState::from_name("Returned"), Some(S::Returned));
        assert_eq!(RecipientState::from_name("Skipped"), None);
        assert_eq!(RecipientState::from_name("Error"), None);
        assert_eq!(RecipientState::from_name("sent"), None);
    }

    #[test]
    fn states_round_trip_through_json() {
        for s in RecipientState::samples() {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<RecipientState>(&json).unwrap(), s);
        }
        assert_eq!(
            serde_json::to_string(&RecipientState::skipped(SkipReason::CapExceeded)).unwrap(),
            r#"{"state":"Skipped","reason":"CapExceeded"}"#
        );
    }

    #[test]
    fn error_messages_match_seed_004() {
        assert_eq!(
            ErrorMessage::BillingNotReady.text(),
            "Org billing is not ready to send"
        );
        assert_eq!(
            ErrorMessage::CouldNotGenerateCreative.code(),
            "COULD_NOT_GENERATE_CREATIVE"
        );
    }

    proptest! {
        /// Random event sequences: every accepted step is a documented edge, every refused step
        /// leaves the state as it was, and the state is always one of the documented shapes.
        #[test]
        fn random_walks_stay_on_the_graph(steps in proptest::collection::vec(0usize..20, 0..64)) {
            let states = RecipientState::samples();
            let mut s = RecipientState::Pending;
            for i in steps {
                let to = states[i].clone();
                let before = s.clone();
                match s.transition(to.clone()) {
                    Ok(next) => {
                        prop_assert!(EDGES.contains(&(&*before.to_string(), &*to.to_string())));
                        s = next;
                    }
                    Err(_) => prop_assert_eq!(&s, &before),
                }
                prop_assert!(states.contains(&s));
            }
        }
    }
}
