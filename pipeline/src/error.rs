//! The pipeline crate's error type.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a send. Row-level problems are decisions, not errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The campaign spec is unusable; every problem is listed.
    #[error("{}: invalid campaign spec:\n  - {}", path.display(), problems.join("\n  - "))]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// One line per problem.
        problems: Vec<String>,
    },
    /// A source could not be read (names the file or server and the place).
    #[error("source {origin}: {message}")]
    Source {
        /// File path or server.
        origin: String,
        /// What went wrong and where.
        message: String,
    },
    /// A sink could not write (names the file or endpoint).
    #[error("sink {target}: {message}")]
    Sink {
        /// File path or endpoint.
        target: String,
        /// What went wrong.
        message: String,
    },
    /// A resumed run does not match what the interrupted attempt did.
    #[error("cannot resume run {run_id}: {message}")]
    Resume {
        /// The run.
        run_id: String,
        /// Why.
        message: String,
    },
    /// Another process holds the lock of a run or campaign.
    #[error("{what} is in progress in {holder} (lock {}); wait for it to finish, or stop it", path.display())]
    Locked {
        /// What is locked (`run R`, `campaign C`).
        what: String,
        /// Who holds it.
        holder: String,
        /// The lock file.
        path: PathBuf,
    },
    /// A worker thread panicked or a channel closed unexpectedly.
    #[error("pipeline stage {stage} failed: {message}")]
    Stage {
        /// Stage name.
        stage: String,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// An I/O error on a path.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A source error.
    pub fn source(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Source {
            origin: origin.into(),
            message: message.into(),
        }
    }

    /// A sink error.
    pub fn sink(target: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Sink {
            target: target.into(),
            message: message.into(),
        }
    }
}
