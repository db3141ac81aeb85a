//! How bearer tokens and webhook credentials are kept and checked: only their SHA-256 is
//! stored, and a presented credential's hash is compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Hex SHA-256 of a token, as token and webhook credential files store it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Constant-time comparison (`subtle`), so response timing does not reveal the secret.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}
