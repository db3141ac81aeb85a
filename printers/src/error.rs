//! The printers crate's error type.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What stops a printer from being used at all. Per-recipient outcomes are recipient states
/// ([`crate::state::RecipientState`]), not errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A printer's configuration is unusable; every problem is listed.
    #[error("invalid {what} config:\n  - {}", problems.join("\n  - "))]
    Config {
        /// Which configuration.
        what: String,
        /// One line per problem.
        problems: Vec<String>,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}
