//! The printer clients' transport: the shared HTTP/1.1 client (`broadside-net`, plain and TLS).

pub(crate) use broadside_net::{basic_auth, post_json, Answer, Endpoint};
