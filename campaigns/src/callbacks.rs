//! Event callbacks: a campaign's lifecycle events (submitted, delivered, bounced, opened,
//! clicked) POSTed to its `event_callback` URL, time-aggregated.
//!
//! Events are grouped per campaign, URL, event type and address kind over a window (at most
//! five minutes, the delay seed 002 promises) and sent as one form POST:
//! `event=delivered&when=1700000000&email[0]=a@x.no&email[1]=b@x.no` (SMS events use
//! `telephone[n]`). `when` is the earliest event time in the batch. The request goes to the
//! callback URL exactly as configured, so its query string is forwarded unchanged.
//!
//! [`CallbackQueue::notify`] never blocks the caller (ingest): the queue is bounded and an
//! event that does not fit is dropped and counted ([`CallbackStats::dropped`]). This is the
//! one place events may be dropped to relieve pressure: the callback is a best-effort copy
//! for a third party; the event itself is already stored by ingest. A POST that fails
//! (connection error, timeout, 5xx, 408, 429) is retried with exponential backoff; other
//! 4xx answers are not retried. Posts go out one at a time, in window order.
//!
//! The client is the shared HTTP/1.1 client (`broadside-net`): `http://` and `https://`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Callback settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Seconds events are gathered before a POST (1..=300, default 60).
    pub window_secs: i64,
    /// Events the queue holds before new ones are dropped (default 10 000).
    pub queue: usize,
    /// Most addresses in one POST; a fuller batch is sent before its window ends (default 1000).
    pub max_per_post: usize,
    /// Attempts per POST, the first included (default 5).
    pub max_attempts: u32,
    /// First retry delay in milliseconds, doubled per attempt up to 60 s (default 1000).
    pub backoff_ms: u64,
    /// Seconds one POST may take (default 10).
    pub timeout_secs: u64,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            window_secs: 60,
            queue: 10_000,
            max_per_post: 1000,
            max_attempts: 5,
            backoff_ms: 1000,
            timeout_secs: 10,
        }
    }
}

impl CallbackConfig {
    /// Reports every problem at once.
    pub fn validate(&self) -> std::result::Result<(), Vec<String>> {
        let mut p = Vec::new();
        if !(1..=300).contains(&self.window_secs) {
            p.push(format!(
                "window_secs: {} is outside 1..=300 (callbacks promise at most 5 minutes of delay)",
                self.window_secs
            ));
        }
        if self.queue == 0 {
            p.push("queue: must be at least 1".into());
        }
        if self.max_per_post == 0 {
            p.push("max_per_post: must be at least 1".into());
        }
        if self.max_attempts == 0 {
            p.push("max_attempts: must be at least 1".into());
        }
        if self.timeout_secs == 0 {
            p.push("timeout_secs: must be at least 1".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

/// A lifecycle event type callbacks report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackEvent {
    /// Submitted for delivery.
    Submitted,
    /// Delivered.
    Delivered,
    /// Permanent delivery failure.
    Bounced,
    /// Opened (email only).
    Opened,
    /// A link was clicked (email only).
    Clicked,
}

impl CallbackEvent {
    /// The form value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackEvent::Submitted => "submitted",
            CallbackEvent::Delivered => "delivered",
            CallbackEvent::Bounced => "bounced",
            CallbackEvent::Opened => "opened",
            CallbackEvent::Clicked => "clicked",
        }
    }
}

/// Who an event is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    /// An email recipient (`email[n]`).
    Email(String),
    /// An SMS recipient (`telephone[n]`).
    Telephone(String),
}

/// One lifecycle event of a campaign with a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The campaign.
    pub campaign_id: i64,
    /// Its `event_callback` URL.
    pub url: String,
    /// What happened.
    pub event: CallbackEvent,
    /// When (unix seconds).
    pub when: i64,
    /// To whom.
    pub address: Address,
}

/// One POST to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackPost {
    /// The campaign.
    pub campaign_id: i64,
    /// The URL, as configured.
    pub url: String,
    /// The form body.
    pub body: String,
    /// Addresses in it.
    pub count: usize,
    /// The earliest event time in it (unix seconds; the form's `when`).
    pub when: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    campaign_id: i64,
    url: String,
    event: CallbackEvent,
    telephone: bool,
}

#[derive(Debug)]
struct Bucket {
    opened_at: i64,
    first_when: i64,
    addresses: Vec<String>,
}

/// Groups events into POSTs by window; time is a parameter.
#[derive(Debug)]
pub struct Aggregator {
    window: i64,
    max_per_post: usize,
    pending: BTreeMap<Key, Bucket>,
    ready: Vec<CallbackPost>,
}

impl Aggregator {
    /// An aggregator with a window in seconds and a cap on addresses per POST.
    pub fn new(window_secs: i64, max_per_post: usize) -> Aggregator {
        Aggregator {
            window: window_secs,
            max_per_post: max_per_post.max(1),
            pending: BTreeMap::new(),
            ready: Vec::new(),
        }
    }

    /// Adds an event seen at `now`.
    pub fn push(&mut self, ev: LifecycleEvent, now: i64) {
        let (telephone, addr) = match ev.address {
            Address::Email(a) => (false, a),
            Address::Telephone(t) => (true, t),
        };
        let key = Key {
            campaign_id: ev.campaign_id,
            url: ev.url,
            event: ev.event,
            telephone,
        };
        let b = self.pending.entry(key.clone()).or_insert_with(|| Bucket {
            opened_at: now,
            first_when: ev.when,
            addresses: Vec::new(),
        });
        b.first_when = b.first_when.min(ev.when);
        b.addresses.push(addr);
        if b.addresses.len() >= self.max_per_post {
            let b = self.pending.remove(&key).expect("just inserted");
            self.ready.push(post(&key, b));
        }
    }

    /// Events waiting.
    pub fn pending(&self) -> usize {
        self.pending
            .values()
            .map(|b| b.addresses.len())
            .sum::<usize>()
            + self.ready.iter().map(|p| p.count).sum::<usize>()
    }

    /// POSTs whose window has ended by `now` (and full ones).
    pub fn take_due(&mut self, now: i64) -> Vec<CallbackPost> {
        let due: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, b)| now - b.opened_at >= self.window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = std::mem::take(&mut self.ready);
        for k in due {
            let b = self.pending.remove(&k).expect("listed");
            out.push(post(&k, b));
        }
        out
    }

    /// Every pending POST, windows ended or not.
    pub fn take_all(&mut self) -> Vec<CallbackPost> {
        let mut out = std::mem::take(&mut self.ready);
        for (k, b) in std::mem::take(&mut self.pending) {
            out.push(post(&k, b));
        }
        out
    }
}

fn post(k: &Key, b: Bucket) -> CallbackPost {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("event", k.event.as_str());
    form.append_pair("when", &b.first_when.to_string());
    let name = if k.telephone { "telephone" } else { "email" };
    for (i, a) in b.addresses.iter().enumerate() {
        form.append_pair(&format!("{name}[{i}]"), a);
    }
    CallbackPost {
        campaign_id: k.campaign_id,
        url: k.url.clone(),
        body: form.finish(),
        count: b.addresses.len(),
        when: b.first_when,
    }
}

/// Counters of the callback queue.
#[derive(Debug, Default)]
pub struct CallbackStats {
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// POSTs answered 2xx.
    pub posted: AtomicU64,
    /// Events in those POSTs.
    pub events_posted: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
    /// POSTs given up on.
    pub failed: AtomicU64,
    /// Events in those POSTs.
    pub events_failed: AtomicU64,
}

impl CallbackStats {
    /// An event the full queue turned away.
    fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("broadside_callback_events_total", "outcome" => "dropped").increment(1);
    }

    /// A POST of `events` answered 2xx, `delay_secs` after its earliest event.
    fn posted(&self, events: usize, delay_secs: i64) {
        self.posted.fetch_add(1, Ordering::Relaxed);
        self.events_posted
            .fetch_add(events as u64, Ordering::Relaxed);
        metrics::counter!("broadside_callback_posts_total", "outcome" => "posted").increment(1);
        metrics::counter!("broadside_callback_events_total", "outcome" => "posted")
            .increment(events as u64);
        metrics::histogram!("broadside_callback_delay_seconds").record(delay_secs.max(0) as f64);
    }

    /// A POST of `events` given up on.
    fn failed(&self, events: usize) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.events_failed
            .fetch_add(events as u64, Ordering::Relaxed);
        metrics::counter!("broadside_callback_posts_total", "outcome" => "failed").increment(1);
        metrics::counter!("broadside_callback_events_total", "outcome" => "failed")
            .increment(events as u64);
    }

    /// A POST tried again.
    fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("broadside_callback_retries_total").increment(1);
    }
}

enum Msg {
    Event(LifecycleEvent),
    Flush(oneshot::Sender<()>),
}

/// The clock callbacks use (unix seconds).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The handle callers notify; cheap to clone.
#[derive(Clone)]
pub struct CallbackQueue {
    tx: mpsc::Sender<Msg>,
    stats: Arc<CallbackStats>,
}

/// The task that aggregates and delivers; run it with [`CallbackWorker::run`].
pub struct CallbackWorker {
    rx: mpsc::Receiver<Msg>,
    agg: Aggregator,
    cfg: CallbackConfig,
    stats: Arc<CallbackStats>,
    clock: Clock,
}

impl CallbackQueue {
    /// A queue and its worker; events are accepted before the worker runs.
    pub fn new(cfg: CallbackConfig, clock: Clock) -> Result<(CallbackQueue, CallbackWorker)> {
        cfg.validate()
            .map_err(|p| Error::invalid("callbacks", p.join("; ")))?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let stats = Arc::new(CallbackStats::default());
        let worker = CallbackWorker {
            rx,
            agg: Aggregator::new(cfg.window_secs, cfg.max_per_post),
            cfg,
            stats: stats.clone(),
            clock,
        };
        Ok((CallbackQueue { tx, stats }, worker))
    }

    /// Queues an event without waiting; false (and counted) when the queue is full or closed.
    pub fn notify(&self, ev: LifecycleEvent) -> bool {
        match self.tx.try_send(Msg::Event(ev)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped();
                false
            }
        }
    }

    /// Queues an event, waiting for room: for producers that may wait (the scheduler replaying
    /// a send's `submitted` events), never ingest. Must not be called from async code. False
    /// when the worker is gone.
    pub fn notify_blocking(&self, ev: LifecycleEvent) -> bool {
        self.tx.blocking_send(Msg::Event(ev)).is_ok()
    }

    /// Sends everything queued now, windows ended or not, and waits until each POST has
    /// succeeded or been given up on (shutdown; tests).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// [`CallbackQueue::flush`] for threads outside the runtime (the event relay); must not be
    /// called from async code.
    pub fn flush_blocking(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.blocking_send(Msg::Flush(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// The counters.
    pub fn stats(&self) -> &CallbackStats {
        &self.stats
    }
}

impl CallbackWorker {
    /// Aggregates events and delivers due POSTs until every queue handle is dropped, then
    /// delivers what is left.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Event(ev)) => self.agg.push(ev, (self.clock)()),
                    Some(Msg::Flush(ack)) => {
                        // everything already queued belongs to this flush
                        while let Ok(m) = self.rx.try_recv() {
                            match m {
                                Msg::Event(ev) => self.agg.push(ev, (self.clock)()),
                                Msg::Flush(other) => { let _ = other.send(()); }
                            }
                        }
                        let posts = self.agg.take_all();
                        self.deliver(posts).await;
                        let _ = ack.send(());
                    }
                    None => {
                        let posts = self.agg.take_all();
                        self.deliver(posts).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    let posts = self.agg.take_due((self.clock)());
                    self.deliver(posts).await;
                }
            }
        }
    }

    async fn deliver(&self, posts: Vec<CallbackPost>) {
        for p in posts {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let timeout = Duration::from_secs(self.cfg.timeout_secs);
                let outcome = match tokio::time::timeout(timeout, post_form(&p.url, &p.body)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Callback {
                        url: p.url.clone(),
                        message: format!("no answer within {} s", self.cfg.timeout_secs),
                    }),
                };
                let retry = match outcome {
                    Ok(status) if (200..300).contains(&status) => {
                        self.stats.posted(p.count, (self.clock)() - p.when);
                        break;
                    }
                    Ok(status) => {
                        tracing::warn!(url = %p.url, status, attempt, "event callback refused");
                        status >= 500 || status == 408 || status == 429
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "event callback failed");
                        true
                    }
                };
                if !retry || attempt >= self.cfg.max_attempts {
                    self.stats.failed(p.count);
                    tracing::error!(url = %p.url, campaign = p.campaign_id, events = p.count, "event callback given up");
                    break;
                }
                self.stats.retried();
                let shift = (attempt - 1).min(16);
                let delay = self.cfg.backoff_ms.saturating_mul(1 << shift).min(60_000);
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
    }
}

/// POSTs a form body to `url` over one HTTP/1.1 connection; returns the status code.
pub async fn post_form(url: &str, body: &str) -> Result<u16> {
    let (status, _) = crate::http::send(
        "POST",
        url,
        "application/x-www-form-urlencoded",
        None,
        body.to_string(),
    )
    .await
    .map_err(|message| Error::Callback {
        url: url.to_string(),
        message,
    })?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(campaign_id: i64, event: CallbackEvent, when: i64, address: Address) -> LifecycleEvent {
        LifecycleEvent {
            campaign_id,
            url: "http://cb.test/hook?token=abc".into(),
            event,
            when,
            address,
        }
    }

    fn decode(body: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn events_are_grouped_per_campaign_event_and_channel_within_the_window() {
        let mut agg = Aggregator::new(60, 100);
        agg.push(
            ev(
                1,
                CallbackEvent::Delivered,
                1005,
                Address::Email("a@x.no".into()),
            ),
            1000,
        );
        agg.push(
            ev(
                1,
                CallbackEvent::Delivered,
                1001,
                Address::Email("b@x.no".into()),
            ),
            1010,
        );
        agg.push(
            ev(
                1,
                CallbackEvent::Delivered,
                1002,
                Address::Telephone("4740769126".into()),
            ),
            1010,
        );
        agg.push(
            ev(
                1,
                CallbackEvent::Opened,
                1003,
                Address::Email("a@x.no".into()),
            ),
            1030,
        );
        agg.push(
            ev(
                2,
                CallbackEvent::Delivered,
                1004,
                Address::Email("c@x.no".into()),
            ),
            1030,
        );
        assert_eq!(agg.pending(), 5);
        assert!(agg.take_due(1059).is_empty(), "no window has ended yet");
        let due = agg.take_due(1060);
        assert_eq!(due.len(), 1, "only the group opened at 1000 is due");
        assert_eq!(due[0].campaign_id, 1);
        assert_eq!(
            decode(&due[0].body),
            [
                ("event", "delivered"),
                ("when", "1001"),
                ("email[0]", "a@x.no"),
                ("email[1]", "b@x.no")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let due = agg.take_due(1070);
        assert_eq!(due.len(), 1);
        assert_eq!(
            decode(&due[0].body),
            [
                ("event", "delivered"),
                ("when", "1002"),
                ("telephone[0]", "4740769126")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let rest = agg.take_due(1090);
        assert_eq!(rest.len(), 2);
        assert_eq!(agg.pending(), 0);
    }

    #[test]
    fn a_full_batch_is_sent_before_its_window_ends() {
        let mut agg = Aggregator::new(300, 2);
        for i in 0..5 {
            agg.push(
                ev(
                    1,
                    CallbackEvent::Clicked,
                    10,
                    Address::Email(format!("{i}@x.no")),
                ),
                10,
            );
        }
        let due = agg.take_due(10);
        assert_eq!(due.iter().map(|p| p.count).collect::<Vec<_>>(), [2, 2]);
        let all = agg.take_all();
        assert_eq!(all.iter().map(|p| p.count).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn config_refuses_windows_over_five_minutes() {
        assert!(CallbackConfig::default().validate().is_ok());
        let bad = CallbackConfig {
            window_secs: 301,
            queue: 0,
            ..Default::default()
        };
        let p = bad.validate().unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("window_secs: 301"));
    }
}
