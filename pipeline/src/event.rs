//! The engagement-event schema shared by the send path (which writes `submitted` events) and analytics.
//!
//! Events are stored as Parquet under `<store>/events/workspace_id=<w>/date=<YYYY-MM-DD>/`;
//! `workspace_id` and `date` are hive partition columns and are not repeated inside the files.
//! `docs/events.md` documents the schema.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// What happened to a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// Handed to the sending system (written by `broadside send`).
    Submitted,
    /// Accepted by the receiving mail server.
    Delivered,
    /// Opened.
    Opened,
    /// A link was clicked.
    Clicked,
    /// Bounced (see [`BounceType`]).
    Bounced,
    /// Unsubscribed.
    Unsubscribed,
    /// Marked as spam.
    Complained,
}

impl EventType {
    /// Every event type.
    pub const ALL: [EventType; 7] = [
        EventType::Submitted,
        EventType::Delivered,
        EventType::Opened,
        EventType::Clicked,
        EventType::Bounced,
        EventType::Unsubscribed,
        EventType::Complained,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Submitted => "submitted",
            EventType::Delivered => "delivered",
            EventType::Opened => "opened",
            EventType::Clicked => "clicked",
            EventType::Bounced => "bounced",
            EventType::Unsubscribed => "unsubscribed",
            EventType::Complained => "complained",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kind of bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BounceType {
    /// Permanent: the address is suppressed in later sends.
    Hard,
    /// Temporary.
    Soft,
}

impl BounceType {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            BounceType::Hard => "hard",
            BounceType::Soft => "soft",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<BounceType> {
        match s {
            "hard" => Some(BounceType::Hard),
            "soft" => Some(BounceType::Soft),
            _ => None,
        }
    }
}

/// One event, as a row (used at the edges: decoding, tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Globally unique id; duplicates are dropped on ingest.
    pub event_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Campaign.
    pub campaign_id: String,
    /// A/B variant, if known.
    pub variant: Option<String>,
    /// Send run, if known.
    pub run_id: Option<String>,
    /// Recipient email.
    pub email: String,
    /// What happened.
    pub event_type: EventType,
    /// For bounces: hard or soft.
    pub bounce_type: Option<BounceType>,
    /// For clicks: the URL.
    pub url: Option<String>,
    /// When it happened (UTC).
    pub ts: DateTime<Utc>,
}

/// Arrow schema of event Parquet files (without the hive partition columns).
pub fn file_schema() -> SchemaRef {
    let utf8 = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        utf8("event_id", false),
        utf8("campaign_id", false),
        utf8("variant", true),
        utf8("run_id", true),
        utf8("email", false),
        utf8("event_type", false),
        utf8("bounce_type", true),
        utf8("url", true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// The events table: `<store>/events`, hive-partitioned by `workspace_id` and `date`.
pub fn events_dir(store: &Path) -> PathBuf {
    store.join("events")
}

/// The folder holding one workspace's events of one day.
pub fn partition_dir(store: &Path, workspace_id: &str, date: NaiveDate) -> PathBuf {
    events_dir(store)
        .join(format!("workspace_id={workspace_id}"))
        .join(format!("date={}", date.format("%Y-%m-%d")))
}

/// How the files of a send's own `submitted` events are named: `submitted-<run id>-NNNNN.parquet`.
pub fn submitted_file_stem(run_id: &str) -> String {
    format!("submitted-{run_id}")
}

/// Whether an event file holds a send's own `submitted` events (which never say bounce,
/// complaint or unsubscribe, and are no engagement to relay).
pub fn is_submitted_file(name: &str) -> bool {
    name.starts_with("submitted-")
}

/// One committed event file of the events table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFile {
    /// Its workspace (the `workspace_id` partition).
    pub workspace: String,
    /// Its day, `YYYY-MM-DD` (the `date` partition).
    pub date: String,
    /// The file name.
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
}

impl EventFile {
    /// `workspace_id=W/date=D/NAME`: the file's place within the events table.
    pub fn relative(&self) -> String {
        format!(
            "workspace_id={}/date={}/{}",
            self.workspace, self.date, self.name
        )
    }
}

/// The committed files (`*.parquet`; files being written have other names) under an events
/// table folder, in path order. A missing folder has none. Errors name the folder listed.
pub fn committed_files(events: &Path) -> Result<Vec<EventFile>, (PathBuf, std::io::Error)> {
    let list = |dir: &Path| -> Result<Vec<(String, PathBuf)>, (PathBuf, std::io::Error)> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err((dir.to_path_buf(), e)),
        };
        for e in entries {
            let e = e.map_err(|e| (dir.to_path_buf(), e))?;
            out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
        out.sort();
        Ok(out)
    };
    let mut out = Vec::new();
    for (ws_name, ws_dir) in list(events)? {
        let Some(workspace) = ws_name.strip_prefix("workspace_id=") else {
            continue;
        };
        if !ws_dir.is_dir() {
            continue;
        }
        for (date_name, date_dir) in list(&ws_dir)? {
            let Some(date) = date_name.strip_prefix("date=") else {
                continue;
            };
            if !date_dir.is_dir() {
                continue;
            }
            for (name, path) in list(&date_dir)? {
                if name.ends_with(".parquet") && path.is_file() {
                    out.push(EventFile {
                        workspace: workspace.to_string(),
                        date: date.to_string(),
                        name,
                        path,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Builds event record batches column by column.
#[derive(Debug, Default)]
pub struct EventBatchBuilder {
    event_id: StringBuilder,
    campaign_id: StringBuilder,
    variant: StringBuilder,
    run_id: StringBuilder,
    email: StringBuilder,
    event_type: StringBuilder,
    bounce_type: StringBuilder,
    url: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    len: usize,
}

impl EventBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one event; its `workspace_id` is the caller's partition and is not stored.
    pub fn push(&mut self, e: &Event) {
        self.push_parts(
            &e.event_id,
            &e.campaign_id,
            e.variant.as_deref(),
            e.run_id.as_deref(),
            &e.email,
            e.event_type,
            e.bounce_type,
            e.url.as_deref(),
            e.ts.timestamp_micros(),
        );
    }

    /// Appends one event from borrowed parts (no allocation per row).
    #[allow(clippy::too_many_arguments)]
    pub fn push_parts(
        &mut self,
        event_id: &str,
        campaign_id: &str,
        variant: Option<&str>,
        run_id: Option<&str>,
        email: &str,
        event_type: EventType,
        bounce_type: Option<BounceType>,
        url: Option<&str>,
        ts_micros: i64,
    ) {
        self.event_id.append_value(event_id);
        self.campaign_id.append_value(campaign_id);
        self.variant.append_option(variant);
        self.run_id.append_option(run_id);
        self.email.append_value(email);
        self.event_type.append_value(event_type.as_str());
        self.bounce_type
            .append_option(bounce_type.map(BounceType::as_str));
        self.url.append_option(url);
        self.ts.append_value(ts_micros);
        self.len += 1;
    }

    /// Finishes the rows appended so far into a batch of [`file_schema`].
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.len = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.campaign_id.finish()),
            Arc::new(self.variant.finish()),
            Arc::new(self.run_id.finish()),
            Arc::new(self.email.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.bounce_type.finish()),
            Arc::new(self.url.finish()),
            Arc::new(self.ts.finish().with_timezone("UTC")),
        ];
        RecordBatch::try_new(file_schema(), cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_produces_file_schema() {
        let mut b = EventBatchBuilder::new();
        let e = Event {
            event_id: "e1".into(),
            workspace_id: "w".into(),
            campaign_id: "c".into(),
            variant: Some("A".into()),
            run_id: None,
            email: "a@b.co".into(),
            event_type: EventType::Bounced,
            bounce_type: Some(BounceType::Hard),
            url: None,
            ts: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        };
        b.push(&e);
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), file_schema());
        assert!(b.is_empty());
    }

    #[test]
    fn event_type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("exploded"), None);
    }

    #[test]
    fn partition_dir_is_hive_style() {
        let d = partition_dir(
            Path::new("/s"),
            "acme",
            NaiveDate::from_ymd_opt(2026, 1, 2).unwrap(),
        );
        assert_eq!(
            d,
            PathBuf::from("/s/events/workspace_id=acme/date=2026-01-02")
        );
    }
}
