//! Address enrichment: recipients without `address_line1` on a campaign with enrichment
//! enabled become `AddressEnrichable` instead of `Skipped(NoAddress)`, and are looked up at an
//! HTTP enrichment provider in batches.
//!
//! The provider protocol is ours (the seed's provider is proprietary), small enough to put in
//! front of any provider:
//!
//! ```text
//! POST {url}   Authorization: Bearer <token>   Content-Type: application/json
//! {"records": [{"key": "acct-1", "name": "Ada Lovelace", "address_zip": "94107", ...}]}
//! 200 {"results": [{"key": "acct-1", "address": {"address_line1": "...", ...}},
//!                  {"key": "acct-2", "address": null}]}
//! ```
//!
//! A result with an `address_line1` returns the recipient to `Pending` with the enriched
//! fields filled in (fields the recipient had are kept); `null` or a missing result is
//! `Skipped(EnrichmentFailed)`; an address still without a first line is `Skipped(NoAddress)`.
//! If the provider cannot be reached after the retries, the batch is an error and its
//! recipients stay `AddressEnriching`, to be retried on resume rather than wrongly skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::address::{Address, AddressField};
use crate::error::{Error, Result};
use crate::http::{self, Endpoint};
use crate::lob::Pause;
use crate::state::{RecipientState, SkipReason};

/// The state a Pending recipient without `address_line1` moves to, or `None` when it has one.
pub fn gate(address: &Address, enrichment_enabled: bool) -> Option<RecipientState> {
    if address.get(AddressField::AddressLine1).is_some() {
        None
    } else if enrichment_enabled {
        Some(RecipientState::AddressEnrichable)
    } else {
        Some(RecipientState::skipped(SkipReason::NoAddress))
    }
}

/// Settings of the enrichment provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// The provider's endpoint (`http://` or `https://`).
    pub url: String,
    /// Environment variable holding the bearer token (default `ENRICHMENT_TOKEN`).
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Recipients per request (default 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Attempts per batch, the first included (default 5).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry in milliseconds, doubled per attempt (default 1000).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Milliseconds one request may take (default 30 000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_token_env() -> String {
    "ENRICHMENT_TOKEN".into()
}
fn default_batch_size() -> usize {
    100
}
fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    30_000
}

/// One recipient to look up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnrichmentRecord {
    /// The recipient key.
    pub key: String,
    /// What is known of the address.
    #[serde(flatten)]
    pub address: Address,
}

/// The outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enriched {
    /// The recipient key.
    pub key: String,
    /// The state it moves to from `AddressEnriching`.
    pub state: RecipientState,
    /// The merged address when the state is `Pending`.
    pub address: Option<Address>,
}

#[derive(Deserialize)]
struct Answer {
    results: Vec<ResultRow>,
}

#[derive(Deserialize)]
struct ResultRow {
    key: String,
    #[serde(default)]
    address: Option<Address>,
}

/// An enrichment provider client.
pub struct EnrichmentClient {
    cfg: EnrichmentConfig,
    endpoint: Endpoint,
    path: String,
    auth: String,
    pause: Arc<dyn Pause>,
}

impl std::fmt::Debug for EnrichmentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("EnrichmentClient")
            .field("url", &self.cfg.url)
            .finish_non_exhaustive()
    }
}

impl EnrichmentClient {
    /// A client; every config problem is reported at once.
    pub fn new(cfg: EnrichmentConfig, token: &str, pause: Arc<dyn Pause>) -> Result<Self> {
        let mut problems = Vec::new();
        let parsed = Endpoint::parse_url(&cfg.url);
        if let Err(e) = &parsed {
            problems.push(format!("url: {e}"));
        }
        if cfg.batch_size == 0 {
            problems.push("batch_size: must be at least 1".into());
        }
        if cfg.max_attempts == 0 {
            problems.push("max_attempts: must be at least 1".into());
        }
        if cfg.timeout_ms == 0 {
            problems.push("timeout_ms: must be at least 1".into());
        }
        match parsed {
            Ok((endpoint, path)) if problems.is_empty() => Ok(EnrichmentClient {
                endpoint,
                path,
                auth: format!("Bearer {token}"),
                pause,
                cfg,
            }),
            _ => Err(Error::Config {
                what: "address enrichment".into(),
                problems,
            }),
        }
    }

    /// The batch size to call [`EnrichmentClient::enrich`] with.
    pub fn batch_size(&self) -> usize {
        self.cfg.batch_size
    }

    /// Looks up one batch (at most `batch_size` records); one outcome per record, in order.
    /// `Err` when the provider could not answer: the records stay `AddressEnriching`.
    pub async fn enrich(&self, records: &[EnrichmentRecord]) -> Result<Vec<Enriched>, String> {
        if records.len() > self.cfg.batch_size {
            return Err(format!(
                "{} records in one batch, at most {}",
                records.len(),
                self.cfg.batch_size
            ));
        }
        let body = serde_json::json!({ "records": records })
            .to_string()
            .into_bytes();
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            let sent = tokio::time::timeout(
                Duration::from_millis(self.cfg.timeout_ms),
                http::post_json(
                    &self.endpoint,
                    &self.path,
                    &[("authorization", self.auth.as_str())],
                    body.clone(),
                ),
            )
            .await;
            let why = match sent {
                Ok(Ok(a)) if (200..300).contains(&a.status) => {
                    break serde_json::from_slice::<Answer>(&a.body)
                        .map_err(|e| format!("enrichment answer: {e}"))?;
                }
                Ok(Ok(a)) if a.status == 429 || a.status == 408 || a.status >= 500 => {
                    format!("HTTP {}", a.status)
                }
                Ok(Ok(a)) => {
                    return Err(format!(
                        "enrichment provider refused the batch: HTTP {}: {}",
                        a.status,
                        String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
                    ))
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {} ms", self.cfg.timeout_ms),
            };
            if attempt >= self.cfg.max_attempts {
                return Err(format!(
                    "enrichment provider unreachable after {attempt} attempts: {why}"
                ));
            }
            let delay = self
                .cfg
                .backoff_ms
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(60_000);
            self.pause.pause(Duration::from_millis(delay)).await;
        };
        let mut found: HashMap<String, Option<Address>> = answer
            .results
            .into_iter()
            .map(|r| (r.key, r.address))
            .collect();
        Ok(records
            .iter()
            .map(|rec| outcome(rec, found.remove(&rec.key).flatten()))
            .collect())
    }
}

fn outcome(rec: &EnrichmentRecord, found: Option<Address>) -> Enriched {
    let Some(found) = found else {
        return Enriched {
            key: rec.key.clone(),
            state: RecipientState::skipped(SkipReason::EnrichmentFailed),
            address: None,
        };
    };
    let mut merged = rec.address.clone();
    let fill = |mine: &mut Option<String>, theirs: Option<String>| {
        if mine.as_deref().is_none_or(|s| s.trim().is_empty()) {
            *mine = theirs;
        }
    };
    fill(&mut merged.name, found.name);
    fill(&mut merged.company, found.company);
    fill(&mut merged.address_line1, found.address_line1);
    fill(&mut merged.address_line2, found.address_line2);
    fill(&mut merged.address_city, found.address_city);
    fill(&mut merged.address_state, found.address_state);
    fill(&mut merged.address_zip, found.address_zip);
    fill(&mut merged.address_country, found.address_country);
    if merged.get(AddressField::AddressLine1).is_none() {
        return Enriched {
            key: rec.key.clone(),
            state: RecipientState::skipped(SkipReason::NoAddress),
            address: None,
        };
    }
    Enriched {
        key: rec.key.clone(),
        state: RecipientState::Pending,
        address: Some(merged),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gating() {
        let none = Address::default();
        assert_eq!(gate(&none, true), Some(RecipientState::AddressEnrichable));
        assert_eq!(
            gate(&none, false),
            Some(RecipientState::skipped(SkipReason::NoAddress))
        );
        let some = Address {
            address_line1: Some("1 Main St".into()),
            ..Address::default()
        };
        assert_eq!(gate(&some, true), None);
        for s in [gate(&none, true), gate(&none, false)]
            .into_iter()
            .flatten()
        {
            assert!(RecipientState::Pending.allowed(&s));
        }
    }

    #[test]
    fn outcomes_merge_and_follow_the_graph() {
        let rec = EnrichmentRecord {
            key: "a".into(),
            address: Address {
                name: Some("Ada".into()),
                address_zip: Some("94107".into()),
                ..Address::default()
            },
        };
        let found = Address {
            name: Some("Someone Else".into()),
            address_line1: Some("210 King St".into()),
            address_city: Some("San Francisco".into()),
            ..Address::default()
        };
        let ok = outcome(&rec, Some(found));
        assert_eq!(ok.state, RecipientState::Pending);
        let addr = ok.address.unwrap();
        assert_eq!(addr.name.as_deref(), Some("Ada"), "known fields are kept");
        assert_eq!(addr.address_line1.as_deref(), Some("210 King St"));
        assert_eq!(addr.address_zip.as_deref(), Some("94107"));
        let failed = outcome(&rec, None);
        assert_eq!(
            failed.state,
            RecipientState::skipped(SkipReason::EnrichmentFailed)
        );
        let still_none = outcome(&rec, Some(Address::default()));
        assert_eq!(
            still_none.state,
            RecipientState::skipped(SkipReason::NoAddress)
        );
        for s in [ok.state, failed.state, still_none.state] {
            assert!(RecipientState::AddressEnriching.allowed(&s), "{s}");
        }
    }

    #[test]
    fn records_serialise_flat() {
        let rec = EnrichmentRecord {
            key: "a".into(),
            address: Address {
                address_zip: Some("94107".into()),
                ..Address::default()
            },
        };
        assert_eq!(
            serde_json::to_string(&rec).unwrap(),
            r#"{"key":"a","address_zip":"94107"}"#
        );
    }
}
