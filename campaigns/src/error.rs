//! The campaign crate's error type.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the campaign service can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of a request or a config is unusable.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as the caller spelled it (`schedule.in`, `recipients[2].email`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A state change the state machine does not allow.
    #[error(
        "{entity} {id}: cannot go from {from} to {to}; allowed from {from}: {}",
        list_or_none(allowed)
    )]
    Transition {
        /// `campaign` or `sending`.
        entity: &'static str,
        /// Its id.
        id: i64,
        /// Its current state.
        from: String,
        /// The state asked for.
        to: String,
        /// The states it may go to.
        allowed: Vec<String>,
    },
    /// A campaign cannot become READY: what its sendings need does not resolve here.
    #[error("campaign {id} is not ready: {}", missing.join("; "))]
    NotReady {
        /// The campaign.
        id: i64,
        /// Each thing missing (a spec file, a secret, a source file), in words.
        missing: Vec<String>,
    },
    /// A campaign's send configuration does not validate: each problem names its field, as the
    /// spec file's validator words it.
    #[error("campaign {id}: the send configuration is not valid: {}", problems.join("; "))]
    BadSpec {
        /// The campaign.
        id: i64,
        /// One entry per problem.
        problems: Vec<String>,
    },
    /// The thing does not exist (or belongs to another workspace).
    #[error("{what} {id} not found")]
    NotFound {
        /// `campaign`, `sending` or `audience`.
        what: &'static str,
        /// Its id.
        id: i64,
    },
    /// The store failed.
    #[error("campaign store {location}: {context}: {source}")]
    Store {
        /// The database file, or the PostgreSQL URL without its password.
        location: String,
        /// What was being done.
        context: String,
        /// The underlying error.
        source: StoreError,
    },
    /// A sending's executor (the send pipeline) failed.
    #[error("sending {sending_id}: {step} failed: {message}")]
    Execution {
        /// The sending.
        sending_id: i64,
        /// `prepare` or `transmit`.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A template does not fit its source: every problem (unknown merge tag, unclosed tag) is
    /// listed with its line.
    #[error("template {name}: {}", problems.join("; "))]
    Template {
        /// The template.
        name: String,
        /// One entry per problem.
        problems: Vec<String>,
    },
    /// The email system's creative API refused or could not be reached.
    #[error("template {name}: creative sync to {url} failed: {message}")]
    CreativeSync {
        /// The template.
        name: String,
        /// The endpoint called.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// An event file of the store could not be read (the relay skips it and tries again).
    #[error("event file {}: {message}", path.display())]
    EventFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An event-callback delivery failed.
    #[error("event callback {url}: {message}")]
    Callback {
        /// The callback URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// What failed underneath the store: the database driver, or a stored value that does not
/// decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite (a file store).
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL (a `postgres://` store). Shown with the server's own message, which the
    /// driver keeps as the error's cause.
    #[error("{}", postgres_message(.0))]
    Postgres(postgres::Error),
    /// A column holds something its field cannot be made of.
    #[error("column {column}: {message}")]
    Column {
        /// The column, counted from 0 in the statement's result.
        column: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The location asks for something this build does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A statement that must return a row returned none.
    #[error("the statement returned no row")]
    NoRow,
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

/// The driver's message followed by its cause ("db error: ERROR: relation … does not
/// exist", "error connecting to server: Connection refused"): the driver's own `Display`
/// leaves the cause out.
fn postgres_message(e: &postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none (final state)".to_string()
    } else {
        v.join(", ")
    }
}

impl Error {
    /// An [`Error::Invalid`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
