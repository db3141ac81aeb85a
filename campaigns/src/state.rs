//! The campaign state machine and the sending statuses.
//!
//! Campaign (seed 002): `DRAFT ⇄ SCHEDULED ⇄ READY ⇒ SENDING ⇒ DONE | ERROR`, plus
//! `CANCELLED`, which DRAFT, SCHEDULED and READY may go to: nothing has been sent yet, so
//! cancelling loses nothing. Once SENDING, recipients have been handed to the channels and
//! the run can only end (DONE or ERROR); DONE, ERROR and CANCELLED are final. SENDING, DONE
//! and ERROR are set by the scheduler, never by an API client ([`CampaignState::client_targets`]).
//!
//! Sending (seed 003): `draft ⇄ scheduled ⇒ preparing ⇒ prepared ⇒ transmitting ⇒
//! transmitted`, with `skipped` (no recipient resolved) after preparing, `failed` from any
//! step before transmitted (not finished within the window after the desired time, or the
//! executor failed), and `cancelled` from draft or scheduled only. transmitted, skipped,
//! failed and cancelled are final: a cancelled or failed sending cannot be rescheduled.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A campaign's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CampaignState {
    /// Being edited; nothing will run.
    Draft,
    /// Has a send time; not yet approved to run.
    Scheduled,
    /// Approved: its due sendings run.
    Ready,
    /// At least one sending has started.
    Sending,
    /// Every sending ended and none failed.
    Done,
    /// Every sending ended and at least one failed.
    Error,
    /// Stopped before anything was sent.
    Cancelled,
}

use CampaignState as C;

impl CampaignState {
    /// Every state, in lifecycle order.
    pub const ALL: [CampaignState; 7] = [
        C::Draft,
        C::Scheduled,
        C::Ready,
        C::Sending,
        C::Done,
        C::Error,
        C::Cancelled,
    ];

    /// The wire name (`DRAFT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            C::Draft => "DRAFT",
            C::Scheduled => "SCHEDULED",
            C::Ready => "READY",
            C::Sending => "SENDING",
            C::Done => "DONE",
            C::Error => "ERROR",
            C::Cancelled => "CANCELLED",
        }
    }

    /// The states this one may go to (by anyone: client or scheduler).
    pub fn allowed_from(self) -> &'static [CampaignState] {
        match self {
            C::Draft => &[C::Scheduled, C::Cancelled],
            C::Scheduled => &[C::Draft, C::Ready, C::Cancelled],
            C::Ready => &[C::Scheduled, C::Sending, C::Cancelled],
            C::Sending => &[C::Done, C::Error],
            C::Done | C::Error | C::Cancelled => &[],
        }
    }

    /// Whether only the scheduler may move a campaign into this state.
    pub fn system_only(self) -> bool {
        matches!(self, C::Sending | C::Done | C::Error)
    }

    /// The states an API client may move a campaign in this state to.
    pub fn client_targets(self) -> Vec<CampaignState> {
        self.allowed_from()
            .iter()
            .copied()
            .filter(|s| !s.system_only())
            .collect()
    }

    /// Whether no further transition is possible.
    pub fn is_final(self) -> bool {
        self.allowed_from().is_empty()
    }

    /// Checks a transition by anyone; the error lists the allowed targets.
    pub fn transition(self, id: i64, to: CampaignState) -> Result<CampaignState> {
        if self.allowed_from().contains(&to) {
            Ok(to)
        } else {
            Err(refusal("campaign", id, self, to, self.allowed_from()))
        }
    }

    /// Checks a transition asked for by an API client; staying in the same state is allowed.
    pub fn client_transition(self, id: i64, to: CampaignState) -> Result<CampaignState> {
        let allowed = self.client_targets();
        if to == self || allowed.contains(&to) {
            Ok(to)
        } else {
            Err(refusal("campaign", id, self, to, &allowed))
        }
    }
}

/// A sending's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendingStatus {
    /// No schedule yet.
    Draft,
    /// Will run at its desired time.
    Scheduled,
    /// Dispatches are being built.
    Preparing,
    /// Dispatches are built, waiting for transmission.
    Prepared,
    /// Dispatches are being transmitted.
    Transmitting,
    /// Dispatches were transmitted.
    Transmitted,
    /// No recipient could be resolved.
    Skipped,
    /// Not finished within the window after the desired time, or the executor failed.
    Failed,
    /// Cancelled before execution started.
    Cancelled,
}

use SendingStatus as S;

impl SendingStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [SendingStatus; 9] = [
        S::Draft,
        S::Scheduled,
        S::Preparing,
        S::Prepared,
        S::Transmitting,
        S::Transmitted,
        S::Skipped,
        S::Failed,
        S::Cancelled,
    ];

    /// The wire name (`draft`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            S::Draft => "draft",
            S::Scheduled => "scheduled",
            S::Preparing => "preparing",
            S::Prepared => "prepared",
            S::Transmitting => "transmitting",
            S::Transmitted => "transmitted",
            S::Skipped => "skipped",
            S::Failed => "failed",
            S::Cancelled => "cancelled",
        }
    }

    /// The statuses this one may go to.
    pub fn allowed_from(self) -> &'static [SendingStatus] {
        match self {
            S::Draft => &[S::Scheduled, S::Cancelled],
            S::Scheduled => &[S::Draft, S::Preparing, S::Failed, S::Cancelled],
            S::Preparing => &[S::Prepared, S::Skipped, S::Failed],
            S::Prepared => &[S::Transmitting, S::Failed],
            S::Transmitting => &[S::Transmitted, S::Failed],
            S::Transmitted | S::Skipped | S::Failed | S::Cancelled => &[],
        }
    }

    /// Whether execution has started (the scheduler owns the sending from here).
    pub fn is_executing(self) -> bool {
        matches!(self, S::Preparing | S::Prepared | S::Transmitting)
    }

    /// Whether no further transition is possible.
    pub fn is_final(self) -> bool {
        self.allowed_from().is_empty()
    }

    /// Whether a client may give it a new schedule (draft and scheduled only).
    pub fn reschedulable(self) -> bool {
        matches!(self, S::Draft | S::Scheduled)
    }

    /// Checks a transition; the error lists the allowed targets.
    pub fn transition(self, id: i64, to: SendingStatus) -> Result<SendingStatus> {
        if self.allowed_from().contains(&to) {
            Ok(to)
        } else {
            Err(refusal("sending", id, self, to, self.allowed_from()))
        }
    }
}

fn refusal<T: fmt::Display>(entity: &'static str, id: i64, from: T, to: T, allowed: &[T]) -> Error {
    Error::Transition {
        entity,
        id,
        from: from.to_string(),
        to: to.to_string(),
        allowed: allowed.iter().map(|s| s.to_string()).collect(),
    }
}

macro_rules! text_enum {
    ($t:ty, $what:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
                    .ok_or_else(|| {
                        let names: Vec<_> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        Error::invalid(
                            $what,
                            format!("unknown value {s:?}; one of {}", names.join(", ")),
                        )
                    })
            }
        }
    };
}

text_enum!(CampaignState, "state");
text_enum!(SendingStatus, "status");

#[cfg(test)]
mod tests {
    use super::*;

    /// Every campaign transition the docs promise (from, to), and only those.
    const CAMPAIGN_ALLOWED: &[(CampaignState, CampaignState)] = &[
        (C::Draft, C::Scheduled),
        (C::Draft, C::Cancelled),
        (C::Scheduled, C::Draft),
        (C::Scheduled, C::Ready),
        (C::Scheduled, C::Cancelled),
        (C::Ready, C::Scheduled),
        (C::Ready, C::Sending),
        (C::Ready, C::Cancelled),
        (C::Sending, C::Done),
        (C::Sending, C::Error),
    ];

    const SENDING_ALLOWED: &[(SendingStatus, SendingStatus)] = &[
        (S::Draft, S::Scheduled),
        (S::Draft, S::Cancelled),
        (S::Scheduled, S::Draft),
        (S::Scheduled, S::Preparing),
        (S::Scheduled, S::Failed),
        (S::Scheduled, S::Cancelled),
        (S::Preparing, S::Prepared),
        (S::Preparing, S::Skipped),
        (S::Preparing, S::Failed),
        (S::Prepared, S::Transmitting),
        (S::Prepared, S::Failed),
        (S::Transmitting, S::Transmitted),
        (S::Transmitting, S::Failed),
    ];

    #[test]
    fn every_campaign_pair_is_allowed_or_refused_as_documented() {
        for from in CampaignState::ALL {
            for to in CampaignState::ALL {
                let documented = CAMPAIGN_ALLOWED.contains(&(from, to));
                match from.transition(7, to) {
                    Ok(s) => {
                        assert!(documented, "{from} -> {to} should be refused");
                        assert_eq!(s, to);
                    }
                    Err(Error::Transition {
                        entity,
                        id,
                        from: f,
                        to: t,
                        allowed,
                    }) => {
                        assert!(!documented, "{from} -> {to} should be allowed");
                        assert_eq!((entity, id), ("campaign", 7));
                        assert_eq!((f.as_str(), t.as_str()), (from.as_str(), to.as_str()));
                        let expect: Vec<String> = CAMPAIGN_ALLOWED
                            .iter()
                            .filter(|(a, _)| *a == from)
                            .map(|(_, b)| b.to_string())
                            .collect();
                        assert_eq!(allowed, expect, "allowed list from {from}");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
    }

    #[test]
    fn every_sending_pair_is_allowed_or_refused_as_documented() {
        for from in SendingStatus::ALL {
            for to in SendingStatus::ALL {
                let documented = SENDING_ALLOWED.contains(&(from, to));
                match from.transition(3, to) {
                    Ok(_) => assert!(documented, "{from} -> {to} should be refused"),
                    Err(Error::Transition { allowed, .. }) => {
                        assert!(!documented, "{from} -> {to} should be allowed");
                        let expect: Vec<String> = SENDING_ALLOWED
                            .iter()
                            .filter(|(a, _)| *a == from)
                            .map(|(_, b)| b.to_string())
                            .collect();
                        assert_eq!(allowed, expect, "allowed list from {from}");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
    }

    #[test]
    fn clients_cannot_set_scheduler_owned_states() {
        let table: &[(CampaignState, &[CampaignState])] = &[
            (C::Draft, &[C::Scheduled, C::Cancelled]),
            (C::Scheduled, &[C::Draft, C::Ready, C::Cancelled]),
            (C::Ready, &[C::Scheduled, C::Cancelled]),
            (C::Sending, &[]),
            (C::Done, &[]),
            (C::Error, &[]),
            (C::Cancelled, &[]),
        ];
        for (from, targets) in table {
            assert_eq!(from.client_targets(), targets.to_vec(), "from {from}");
            assert!(
                from.client_transition(1, *from).is_ok(),
                "same state {from}"
            );
        }
        let e = C::Ready.client_transition(9, C::Sending).unwrap_err();
        assert_eq!(
            e.to_string(),
            "campaign 9: cannot go from READY to SENDING; allowed from READY: SCHEDULED, CANCELLED"
        );
        let e = C::Done.client_transition(9, C::Draft).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("allowed from DONE: none (final state)"),
            "{e}"
        );
    }

    #[test]
    fn cancelled_and_failed_sendings_cannot_be_rescheduled() {
        for s in SendingStatus::ALL {
            let expect = matches!(s, S::Draft | S::Scheduled);
            assert_eq!(s.reschedulable(), expect, "{s}");
        }
        for s in [S::Cancelled, S::Failed, S::Transmitted, S::Skipped] {
            assert!(s.is_final());
            assert!(s.transition(1, S::Scheduled).is_err());
        }
    }

    #[test]
    fn names_parse_case_insensitively_and_unknown_names_are_listed() {
        for s in CampaignState::ALL {
            assert_eq!(
                s.as_str().to_lowercase().parse::<CampaignState>().unwrap(),
                s
            );
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        for s in SendingStatus::ALL {
            assert_eq!(s.as_str().parse::<SendingStatus>().unwrap(), s);
        }
        let e = "LIVE".parse::<CampaignState>().unwrap_err().to_string();
        assert!(e.starts_with("state: unknown value \"LIVE\""), "{e}");
        assert!(e.contains("DRAFT, SCHEDULED, READY"), "{e}");
    }
}
