//! Direct mail: the mail recipient state machine, printer approval rules and printer clients.
//!
//! - [`state`]: recipient states (seed 004) and the only transitions allowed between them
//!   (from `broadside-tracking`, shared with the analytics).
//! - [`approval`]: per-printer approval rules; a recipient that fails is
//!   `Skipped(PrinterApprovalFailed)` with every rule failure kept.
//! - [`lob`]: a Lob-compatible HTTP client (postcards, letters) with idempotency keys,
//!   retries, `Retry-After`, and a concurrency and rate limit per printer.
//! - [`enrichment`]: gating recipients without an address into enrichment, and the HTTP
//!   enrichment provider client (batches, retries).
//! - [`proof`]: the creative rendered from the campaign template and merge variables
//!   (`COULD_NOT_GENERATE_CREATIVE` when it cannot be).
//! - [`batch`]: the batch-file printer (CSV batches dropped atomically, manifest last).
//! - [`tracking`]: Lob-style delivery webhooks: signature check, Sent → Received, event types
//!   (from `broadside-tracking`).
//! - [`billing`]: preflight billing (`BILLING_NOT_READY`, fails closed) and the recipient cap.
//!
//! docs/printers.md describes what is built and how it plugs into `broadside send`;
//! docs/recipient-states.md draws the state graph.
#![warn(missing_docs, unreachable_pub)]

pub mod address;
pub mod approval;
pub mod batch;
pub mod billing;
pub mod enrichment;
pub mod error;
mod http;
pub mod lob;
pub mod proof;
pub use broadside_tracking::{state, tracking};

pub use address::{Address, AddressField};
pub use error::{Error, Result};
pub use state::{ErrorMessage, IllegalTransition, RecipientState, SkipReason};
