//! Test servers shared by the integration tests.

pub mod lob_server;
