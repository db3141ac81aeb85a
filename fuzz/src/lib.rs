//! Parsers of the analytics crate, compiled here from their own source files so the fuzz
//! build needs neither DataFusion nor librdkafka (the analytics crate keeps these files free
//! of its heavy modules for this; see README.md). The code fuzzed is the code the crate runs.

#[path = "../../analytics/src/decode.rs"]
pub mod decode;
#[path = "../../analytics/src/intake.rs"]
pub mod intake;
#[path = "../../analytics/src/params.rs"]
pub mod params;
