//! The analytics crate's error type.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop an ingest, a webhook delivery or a suppression build.
///
/// A record that cannot be decoded is not an error: it becomes a dead letter
/// (see [`crate::decode::DeadLetterReason`]).
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
    /// A store file helper from the pipeline crate failed.
    #[error(transparent)]
    Store(#[from] broadside_pipeline::error::Error),
    /// Writing or reading Parquet failed.
    #[error("{}: parquet: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: parquet::errors::ParquetError,
    },
    /// Building an Arrow batch failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// The Kafka client reported an error (names the topic/partition when known).
    #[error("kafka {context}: {source}")]
    Kafka {
        /// Brokers, topic, partition or offset involved.
        context: String,
        /// The client error.
        source: rdkafka::error::KafkaError,
    },
    /// A commit manifest on disk is unreadable or points at missing files.
    #[error("{}: corrupt ingest state: {message}", path.display())]
    State {
        /// The manifest or state folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration is unusable; every problem is listed.
    #[error("invalid {what} configuration:\n  - {}", problems.join("\n  - "))]
    Config {
        /// Which configuration.
        what: &'static str,
        /// One line per problem.
        problems: Vec<String>,
    },
    /// A Kafka partition's offsets do not continue from the store's committed position:
    /// records were deleted before the store read them, or the topic was re-created.
    /// `broadside ingest --on-gap record` records such a gap in `ingest_gaps` and goes on.
    #[error(
        "topic {topic} partition {partition}: {}; the store's committed position is offset \
         {store_next}, the partition holds offsets {low}..{high} (low..high watermark). \
         Nothing after the gap was ingested; rerun with `--on-gap record` to record the gap \
         in the ingest_gaps table and continue",
        if *recreated {
            "the high watermark is below the store's position (topic re-created?)"
        } else {
            "the first available offset is beyond the store's position (records deleted by retention?)"
        }
    )]
    IngestGap {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Whether the high watermark is below the store's position (else the low one is above it).
        recreated: bool,
        /// The first offset the store has not committed.
        store_next: i64,
        /// The partition's low watermark (first available offset).
        low: i64,
        /// The partition's high watermark (offset after the last record).
        high: i64,
    },
    /// An input file line could not be read (names file and line).
    #[error("{}:{line}: {message}", path.display())]
    Input {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
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

    /// A Parquet error on a path.
    pub fn parquet(path: impl AsRef<Path>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A Kafka error with context.
    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            context: context.into(),
            source,
        }
    }

    /// Corrupt on-disk ingest state.
    pub fn state(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::State {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
}
