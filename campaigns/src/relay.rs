//! The engagement-callback relay: follows the event store (the hive-partitioned Parquet that
//! `broadside ingest` and the webhook intake write, docs/events.md) and feeds the delivered,
//! opened, clicked and bounced events of sendings into the [`CallbackQueue`].
//!
//! Ingest never waits for callbacks: it only writes files. The relay, a separate task of the
//! serving process, lists `<events>/workspace_id=W/date=D/*.parquet`, reads the files it has
//! not relayed yet, maps each event to its sending and campaign, and queues the events whose
//! campaign has an `event_callback`.
//!
//! **Mapping.** An event belongs to a sending when its `run_id` is a run the executor recorded
//! for that sending ([`Store::record_sending_run`]: `sending-<id>-<created>` in the binary)
//! *and* the event is stored under the workspace and carries the campaign id that run was
//! written with (the campaign spec's `workspace_id` and `campaign_id`). The run id alone would
//! do in practice, but checking all three keeps an event of another workspace, or one a
//! provider attributed to another campaign, from reaching a third party's URL. Events without a
//! recorded run id (sends outside the campaign service, sendings run before the relay existed)
//! are not relayed.
//!
//! **Progress.** A file is recorded in `relayed_event_files` (the campaign store) only after
//! its events were queued *and* the queue was flushed, i.e. every POST they are in succeeded
//! or was given up after its retries. A crash before the record replays the file on the next
//! pass: callbacks are at least once. Event files are immutable once they have their final
//! name (writers rename complete files into place), so a recorded file never needs reading
//! again. One process per store relays: the relay holds a lease ([`RELAY_LEASE`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, StringArray, TimestampMicrosecondArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::callbacks::{Address, CallbackEvent, CallbackQueue, LifecycleEvent};
use crate::error::{Error, Result};
use crate::store::{RunCallback, Store, RELAY_LEASE};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Who holds the relay lease (host and process id in the binary).
    pub holder: String,
    /// Seconds between passes, for the caller's loop (default 60).
    pub every_secs: u64,
    /// Most new event files one pass reads; the rest wait for the next pass (default 500).
    pub max_files_per_pass: usize,
    /// Seconds the relay lease lasts; renewed every pass (default 300). A relay that died is
    /// replaced by another process once its lease has expired.
    pub lease_secs: i64,
}

impl RelayConfig {
    /// Defaults for `holder`.
    pub fn new(holder: impl Into<String>) -> RelayConfig {
        RelayConfig {
            holder: holder.into(),
            every_secs: 60,
            max_files_per_pass: 500,
            lease_secs: 300,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayPass {
    /// Another process holds the relay lease: nothing was read.
    pub busy: bool,
    /// New event files read and recorded as relayed.
    pub files: u64,
    /// Engagement events (delivered, opened, clicked, bounced) in them.
    pub events: u64,
    /// Events queued for a callback.
    pub queued: u64,
    /// Files that could not be read (logged; tried again next pass).
    pub unreadable: u64,
    /// New files left for the next pass (over `max_files_per_pass`).
    pub deferred: u64,
}

/// Follows an event store and feeds its engagement events into a callback queue.
pub struct EventRelay {
    store: Store,
    events: PathBuf,
    queue: CallbackQueue,
    cfg: RelayConfig,
}

impl EventRelay {
    /// A relay over the campaign store at `db` and the event root `events`
    /// (`<store>/events`).
    pub fn new(
        db: &Path,
        events: &Path,
        queue: CallbackQueue,
        cfg: RelayConfig,
    ) -> Result<EventRelay> {
        if cfg.max_files_per_pass == 0 {
            return Err(Error::invalid(
                "relay.max_files_per_pass",
                "must be at least 1",
            ));
        }
        if cfg.lease_secs <= 0 {
            return Err(Error::invalid("relay.lease_secs", "must be at least 1"));
        }
        Ok(EventRelay {
            store: Store::open(db)?,
            events: events.to_path_buf(),
            queue,
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// One pass: reads the event files not relayed yet, queues their events for the
    /// callbacks, flushes the queue and records the files. Blocks (reads files, waits for the
    /// POSTs); must not be called from async code.
    pub fn relay_once(&self, now: i64) -> Result<RelayPass> {
        let mut pass = RelayPass::default();
        if !self
            .store
            .try_lease(RELAY_LEASE, &self.cfg.holder, now, self.cfg.lease_secs)?
        {
            pass.busy = true;
            return Ok(pass);
        }
        let mut new_files = Vec::new();
        for (rel, path, workspace) in event_files(&self.events)? {
            if self.store.is_relayed(&rel)? {
                continue;
            }
            if new_files.len() == self.cfg.max_files_per_pass {
                pass.deferred += 1;
                continue;
            }
            new_files.push((rel, path, workspace));
        }
        let mut runs: HashMap<String, Option<RunCallback>> = HashMap::new();
        let mut done = Vec::new();
        for (rel, path, workspace) in new_files {
            match self.relay_file(&path, &workspace, &mut runs) {
                Ok((events, queued)) => {
                    pass.events += events;
                    pass.queued += queued;
                    done.push((rel, queued));
                }
                Err(Error::Callback { url, message }) => {
                    // the worker is gone: nothing queued from here on would be delivered
                    return Err(Error::Callback { url, message });
                }
                Err(e) => {
                    tracing::error!(error = %e, "event file not relayed; trying again next pass");
                    pass.unreadable += 1;
                }
            }
        }
        if pass.queued > 0 {
            // Recorded only once every POST holding these events succeeded or was given up:
            // a crash before this point replays the files (at least once).
            self.queue.flush_blocking();
        }
        pass.files = done.len() as u64;
        self.store.mark_relayed(&done, now)?;
        metrics::counter!("broadside_callback_relay_files_total").increment(pass.files);
        metrics::gauge!("broadside_callback_relay_last_pass_timestamp_seconds").set(now as f64);
        Ok(pass)
    }

    /// Queues the engagement events of one file; returns (engagement events, queued).
    fn relay_file(
        &self,
        path: &Path,
        workspace: &str,
        runs: &mut HashMap<String, Option<RunCallback>>,
    ) -> Result<(u64, u64)> {
        let bad = |message: String| Error::EventFile {
            path: path.to_path_buf(),
            message,
        };
        let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| bad(e.to_string()))?;
        let (mut events, mut queued) = (0, 0);
        for batch in reader {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            let text = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| bad(format!("no text column {name}")))
            };
            let (kind, campaign, run, email) = (
                text("event_type")?,
                text("campaign_id")?,
                text("run_id")?,
                text("email")?,
            );
            let ts = batch
                .column_by_name("ts")
                .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                .ok_or_else(|| bad("no microsecond ts column".into()))?;
            for i in 0..batch.num_rows() {
                let event = match kind.value(i) {
                    "delivered" => CallbackEvent::Delivered,
                    "opened" => CallbackEvent::Opened,
                    "clicked" => CallbackEvent::Clicked,
                    "bounced" => CallbackEvent::Bounced,
                    // submitted events are relayed by the executor after its transmission;
                    // unsubscribed and complained are not callback events
                    _ => continue,
                };
                events += 1;
                if run.is_null(i) {
                    continue;
                }
                let run_id = run.value(i);
                if !runs.contains_key(run_id) {
                    runs.insert(run_id.to_string(), self.store.run_callback(run_id)?);
                }
                let Some(rc) = runs.get(run_id).and_then(Option::as_ref) else {
                    continue;
                };
                if rc.run.workspace_id != workspace || rc.run.campaign_key != campaign.value(i) {
                    continue;
                }
                let Some(url) = &rc.event_callback else {
                    continue;
                };
                let ev = LifecycleEvent {
                    campaign_id: rc.campaign_id,
                    url: url.clone(),
                    event,
                    when: ts.value(i).div_euclid(1_000_000),
                    address: Address::Email(email.value(i).to_string()),
                };
                if !self.queue.notify_blocking(ev) {
                    return Err(Error::Callback {
                        url: url.clone(),
                        message: "the callback worker stopped".into(),
                    });
                }
                queued += 1;
            }
        }
        Ok((events, queued))
    }
}

impl Drop for EventRelay {
    fn drop(&mut self) {
        // A relay stopped in order hands over at once; one that died waits for its lease.
        let _ = self.store.release_lease(RELAY_LEASE, &self.cfg.holder);
    }
}

/// Engagement event files under `events` in name order: (path relative to `events`, path,
/// workspace). `submitted-*` files (the executor relays those) are left out.
fn event_files(events: &Path) -> Result<Vec<(String, PathBuf, String)>> {
    Ok(broadside_pipeline::event::committed_files(events)
        .map_err(|(path, e)| Error::EventFile {
            path,
            message: format!("listing: {e}"),
        })?
        .into_iter()
        .filter(|f| !broadside_pipeline::event::is_submitted_file(&f.name))
        .map(|f| (f.relative(), f.path, f.workspace))
        .collect())
}
