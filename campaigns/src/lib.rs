//! The campaign service: campaigns and their sendings, from the API call that creates them
//! to the scheduler that runs them.
//!
//! - [`state`]: the campaign state machine and the sending statuses, with the transitions
//!   each allows.
//! - [`schedule`]: when a sending runs (none, immediate, absolute, relative, prescheduled).
//! - [`audience`]: who receives it (stored or inline conditions, inline recipients, channel
//!   preference), translated into a parameterised SQL filter or a row predicate.
//! - [`store`]: the store (one SQLite file, or a PostgreSQL database several hosts share;
//!   migrations, leases, run history).
//! - [`scheduler`]: runs due sendings through an [`scheduler::Executor`] the binary provides,
//!   one process per sending (a lease), resumable after a restart.
//! - [`api`]: the `/campaign` HTTP routes; [`api_input`]: their request parsing (pure
//!   functions, fuzzed).
//! - [`callbacks`]: time-aggregated lifecycle-event callbacks to a campaign's `event_callback`.
//! - [`relay`]: follows the event store and feeds delivered / opened / clicked / bounced
//!   events of sendings into the callbacks, with durable progress.
//! - [`send_audience`]: a sending's audience applied to a send: a filter on a file source's
//!   batches ([`send_audience::AudienceSource`]) or a parameterised WHERE on the ERP query.
//! - [`send_config`]: a campaign's send configuration given through the API, assembled with
//!   the operator's named sources into a campaign spec.
//! - [`templates`]: merge-tag checks against the source columns and creative sync by content
//!   hash.
//!
//! docs/campaigns.md describes the behaviour for operators.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod api_input;
pub mod audience;
pub mod callbacks;
pub mod error;
mod http;
pub mod relay;
pub mod schedule;
pub mod scheduler;
pub mod send_audience;
pub mod send_config;
pub mod state;
pub mod store;
pub mod templates;
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
