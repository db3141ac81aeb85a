//! What the printers and the analytics exchange about mailed recipients, with no client code:
//!
//! - [`state`]: recipient states (seed 004) and the only transitions allowed between them;
//! - [`tracking`]: Lob-style delivery webhooks: signature check, Sent → Received, event types.
//!
//! The send records states through `broadside-printers`; the analytics' webhook intake and
//! mail-state queries read them through this crate alone.
#![warn(missing_docs, unreachable_pub)]

pub mod state;
pub mod tracking;
