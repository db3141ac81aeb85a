//! Delivery tracking: Lob-style webhooks (`postcard.mailed`, `letter.in_transit`,
//! `postcard.delivered`, `postcard.returned_to_sender`, ...) checked, parsed and turned into
//! recipient state changes and analytics event types.
//!
//! A webhook is trusted only when `Lob-Signature` is the hex HMAC-SHA256, keyed with the
//! webhook secret, of `{Lob-Signature-Timestamp}.{raw body}` and the timestamp is within the
//! tolerance of now (a replayed old delivery is refused). Printers deliver webhooks at least
//! once and out of order, so applying one is idempotent: a delivered piece stays Received and a
//! returned one Returned whatever arrives later, and a repeat changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::state::RecipientState;

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackingError {
    /// Signature absent, malformed or wrong, or the timestamp is too old or in the future.
    #[error("webhook signature: {0}")]
    Signature(String),
    /// The body is not a Lob event.
    #[error("webhook body: {0}")]
    Body(String),
    /// The recipient is not yet known as sent (the webhook beat the ledger): retry later.
    #[error("webhook for {piece} arrived while the recipient is {state}")]
    NotSent {
        /// The printer's piece id.
        piece: String,
        /// The recipient's state.
        state: RecipientState,
    },
}

/// Checks a webhook's signature. `now_ms` is the receiver's clock in Unix milliseconds; the
/// timestamp header may be in milliseconds or seconds.
pub fn verify_signature(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    raw_body: &[u8],
    now_ms: u64,
    tolerance: Duration,
) -> Result<(), TrackingError> {
    let ts: u64 = timestamp.trim().parse().map_err(|_| {
        TrackingError::Signature(format!("timestamp {timestamp:?} is not a number"))
    })?;
    // Seconds until the year 33658; anything larger is milliseconds.
    let ts_ms = if ts < 1_000_000_000_000 {
        ts * 1000
    } else {
        ts
    };
    if ts_ms.abs_diff(now_ms) > tolerance.as_millis() as u64 {
        return Err(TrackingError::Signature(format!(
            "timestamp {timestamp} is more than {} s from now",
            tolerance.as_secs()
        )));
    }
    let given = decode_hex(signature.trim())
        .ok_or_else(|| TrackingError::Signature("not a hex digest".into()))?;
    // `verify_slice` compares in constant time: how much of a guess matched must not show in
    // the timing.
    signed_mac(secret, timestamp, raw_body)
        .verify_slice(&given)
        .map_err(|_| TrackingError::Signature("does not match".into()))?;
    Ok(())
}

/// The `Lob-Signature` a sender computes for `timestamp` and `raw_body` (hex HMAC-SHA256 of
/// `{timestamp}.{raw body}`): what [`verify_signature`] checks. For test senders and tools.
pub fn sign(secret: &[u8], timestamp: &str, raw_body: &[u8]) -> String {
    signed_mac(secret, timestamp, raw_body)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// HMAC-SHA256 keyed with `secret` over `{timestamp}.{raw body}`, ready to finalise or verify.
fn signed_mac(secret: &[u8], timestamp: &str, raw_body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(raw_body);
    mac
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a tracking event says about the mailpiece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Milestone {
    /// Handed to the postal service.
    Mailed,
    /// Moving through the mail stream (in transit, in the local area, processed for delivery,
    /// re-routed, left the country).
    InTransit,
    /// Delivered.
    Delivered,
    /// Returned to the sender.
    Returned,
    /// Anything else (created, rendered, deleted, ...): recorded nowhere.
    Other(String),
}

/// A parsed tracking webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingUpdate {
    /// The event's id (`evt_…`), for deduplication.
    pub event_id: String,
    /// The printer's piece id (`psc_…`, `ltr_…`).
    pub piece_id: String,
    /// The event type as sent (`postcard.delivered`).
    pub event_type: String,
    /// What happened.
    pub milestone: Milestone,
    /// The piece's metadata (the campaign and recipient ids we set when creating it).
    pub metadata: BTreeMap<String, String>,
    /// When the printer recorded the event.
    pub date_created: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    id: String,
    event_type: EventType,
    body: PieceBody,
    #[serde(default)]
    date_created: Option<String>,
}

#[derive(Deserialize)]
struct EventType {
    id: String,
}

#[derive(Deserialize)]
struct PieceBody {
    id: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl TrackingUpdate {
    /// Parses a webhook body (after its signature was verified).
    pub fn parse(raw_body: &[u8]) -> Result<TrackingUpdate, TrackingError> {
        let e: Envelope =
            serde_json::from_slice(raw_body).map_err(|e| TrackingError::Body(e.to_string()))?;
        let (_, what) = e.event_type.id.split_once('.').ok_or_else(|| {
            TrackingError::Body(format!("event type {:?} has no resource", e.event_type.id))
        })?;
        let milestone = match what {
            "mailed" => Milestone::Mailed,
            "in_transit"
            | "in_local_area"
            | "processed_for_delivery"
            | "re-routed"
            | "international_exit" => Milestone::InTransit,
            "delivered" => Milestone::Delivered,
            "returned_to_sender" => Milestone::Returned,
            other => Milestone::Other(other.to_string()),
        };
        Ok(TrackingUpdate {
            event_id: e.id,
            piece_id: e.body.id,
            event_type: e.event_type.id,
            milestone,
            metadata: e.body.metadata,
            date_created: e.date_created,
        })
    }

    /// The analytics event type and bounce type this update is recorded as, if any
    /// (`delivered`; `bounced`/`hard` for a returned piece).
    pub fn event_type(&self) -> Option<(&'static str, Option<&'static str>)> {
        match self.milestone {
            Milestone::Delivered => Some(("delivered", None)),
            Milestone::Returned => Some(("bounced", Some("hard"))),
            _ => None,
        }
    }

    /// The states the recipient moves through, in order (empty when nothing changes). A
    /// Scheduled piece that is mailed or later becomes Sent; a delivered piece Received, a
    /// returned one Returned.
    pub fn transitions(
        &self,
        current: &RecipientState,
    ) -> Result<Vec<RecipientState>, TrackingError> {
        self.milestone.transitions(&self.piece_id, current)
    }
}

impl Milestone {
    /// The milestone of a recorded tracking event type (the inverse of
    /// [`TrackingUpdate::event_type`]): `delivered`, and `bounced` for a returned piece.
    pub fn of_event_type(event_type: &str) -> Option<Milestone> {
        match event_type {
            "delivered" => Some(Milestone::Delivered),
            "bounced" => Some(Milestone::Returned),
            _ => None,
        }
    }

    /// The states a recipient in `current` moves through on this milestone of piece `piece`.
    pub fn transitions(
        &self,
        piece: &str,
        current: &RecipientState,
    ) -> Result<Vec<RecipientState>, TrackingError> {
        use RecipientState as S;
        let moving = matches!(
            self,
            Milestone::Mailed | Milestone::InTransit | Milestone::Delivered | Milestone::Returned
        );
        let mut path = Vec::new();
        match current {
            S::Scheduled if moving => path.push(S::Sent),
            S::Scheduled | S::Sent | S::Received | S::Returned => {}
            other if moving => {
                return Err(TrackingError::NotSent {
                    piece: piece.to_string(),
                    state: other.clone(),
                })
            }
            _ => {}
        }
        let settled = matches!(current, S::Received | S::Returned);
        match self {
            Milestone::Delivered if !settled => path.push(S::Received),
            Milestone::Returned if !settled => path.push(S::Returned),
            _ => {}
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The MAC computed independently of `signed_mac`'s message framing.
    fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }

    #[test]
    fn sign_is_hmac_of_timestamp_dot_body() {
        assert_eq!(
            sign(b"Jefe", "1764669600", b"what do ya want for nothing?"),
            hex(&hmac_sha256(
                b"Jefe",
                b"1764669600.what do ya want for nothing?"
            ))
        );
    }

    #[test]
    fn signatures() {
        let body = br#"{"id":"evt_1"}"#;
        let ts = "1764669600000";
        let now = 1_764_669_600_000 + 1_000;
        let sig = hex(&hmac_sha256(
            b"whsec",
            format!("{ts}.{{\"id\":\"evt_1\"}}").as_bytes(),
        ));
        let five = Duration::from_secs(300);
        assert_eq!(
            verify_signature(b"whsec", ts, &sig, body, now, five),
            Ok(())
        );
        // Seconds work too.
        let sig_s = hex(&hmac_sha256(b"whsec", br#"1764669600.{"id":"evt_1"}"#));
        assert_eq!(
            verify_signature(b"whsec", "1764669600", &sig_s, body, now, five),
            Ok(())
        );
        for (secret, ts, sig, body, now) in [
            (&b"other"[..], ts, sig.as_str(), &body[..], now),
            (b"whsec", ts, sig.as_str(), br#"{"id":"evt_2"}"#, now),
            (b"whsec", ts, "zz", body, now),
            (b"whsec", ts, &sig[..10], body, now),
            (b"whsec", "soon", sig.as_str(), body, now),
            (b"whsec", ts, sig.as_str(), body, now + 301_000),
        ] {
            assert!(
                matches!(
                    verify_signature(secret, ts, sig, body, now, five),
                    Err(TrackingError::Signature(_))
                ),
                "{ts} {sig}"
            );
        }
    }

    fn update(kind: &str) -> TrackingUpdate {
        let body = format!(
            r#"{{"id":"evt_9","object":"event","date_created":"2026-12-05T10:00:00.000Z",
               "event_type":{{"id":"postcard.{kind}","resource":"postcards","object":"event_type"}},
               "body":{{"id":"psc_1","object":"postcard","metadata":{{"campaign":"spring","recipient":"acct-1"}}}}}}"#
        );
        TrackingUpdate::parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn parses_lob_events() {
        let u = update("delivered");
        assert_eq!(
            (
                u.event_id.as_str(),
                u.piece_id.as_str(),
                u.event_type.as_str()
            ),
            ("evt_9", "psc_1", "postcard.delivered")
        );
        assert_eq!(u.milestone, Milestone::Delivered);
        assert_eq!(u.metadata["recipient"], "acct-1");
        assert_eq!(u.event_type(), Some(("delivered", None)));
        assert_eq!(update("in_local_area").milestone, Milestone::InTransit);
        assert_eq!(
            update("returned_to_sender").event_type(),
            Some(("bounced", Some("hard")))
        );
        assert_eq!(
            update("rendered_pdf").milestone,
            Milestone::Other("rendered_pdf".into())
        );
        assert!(TrackingUpdate::parse(b"{}").is_err());
    }

    #[test]
    fn state_changes_are_idempotent_and_follow_the_graph() {
        use RecipientState as S;
        let cases = [
            ("delivered", S::Sent, vec![S::Received]),
            ("delivered", S::Received, vec![]),
            ("delivered", S::Scheduled, vec![S::Sent, S::Received]),
            ("mailed", S::Scheduled, vec![S::Sent]),
            ("mailed", S::Sent, vec![]),
            ("in_transit", S::Received, vec![]),
            ("returned_to_sender", S::Sent, vec![S::Returned]),
            (
                "returned_to_sender",
                S::Scheduled,
                vec![S::Sent, S::Returned],
            ),
            ("delivered", S::Returned, vec![]),
            ("returned_to_sender", S::Received, vec![]),
            ("rendered_pdf", S::Sending, vec![]),
        ];
        for (kind, from, want) in cases {
            let path = update(kind).transitions(&from).unwrap();
            assert_eq!(path, want, "{kind} from {from}");
            let mut s = from.clone();
            for next in path {
                s.advance(next).unwrap();
            }
        }
        assert!(matches!(
            update("delivered").transitions(&S::Sending),
            Err(TrackingError::NotSent { .. })
        ));
    }
}
