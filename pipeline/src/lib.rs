//! Broadside's send pipeline core: the recipient model, decision stages, the suppression index,
//! the back-pressured runner, run records and the store layout.
//!
//! Stages exchange [`model::RecipientBatch`]es: Arrow columns of a few thousand recipients plus
//! a decision and reason per row. See `DESIGN.md` for the whole flow.
#![warn(missing_docs)]

pub mod error;
pub mod event;
pub mod model;
pub mod run;
pub mod runner;
pub mod spec;
pub mod stages;
pub mod store;
pub mod strings;

pub use error::{Error, Result};
