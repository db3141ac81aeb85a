//! Runs due sendings: one process per sending (a lease row in the store), each step
//! persisted, so a restart resumes where the last process stopped.
//!
//! A sending goes `scheduled → preparing → prepared → transmitting → transmitted` (or
//! `skipped` when preparation resolves no recipient, `failed` when the executor fails or the
//! window after the desired time passes). Each arrow is a compare-and-set in the store that
//! also requires the caller's lease to be live, so a process whose lease expired cannot
//! move a sending another process has taken over.
//!
//! After a restart: a sending left `prepared` is transmitted without preparing again; one
//! left `preparing` is prepared again (preparation must be repeatable: it builds dispatches,
//! it sends nothing); one left `transmitting` is handed to [`Executor::transmit`] again with
//! `resumed = true`, and the executor must continue rather than start over (the send
//! pipeline's checkpoint/resume does this: every recipient is sent exactly once).
//!
//! Time is a parameter (`now`, unix seconds) so tests drive the clock.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::SendingStatus;
use crate::store::{Sending, StatusPatch, Store};

/// What preparation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// Recipients resolved; 0 makes the sending `skipped`.
    pub recipients: u64,
    /// The executor's handle to the dispatches (a run id, a folder), stored with the sending.
    pub handle: String,
    /// How preparation decided the resolved recipients (`sent`, `skipped`, `suppressed`,
    /// `holdout`…, as the send's run record counts them), when the executor knows.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub decisions: std::collections::BTreeMap<String, u64>,
}

/// What an executor step failure says.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// The send path the binary plugs in.
pub trait Executor: Send + Sync {
    /// Builds the dispatches of a sending (resolves its audience and recipients). May run
    /// again for the same sending after a restart, so it must not send anything.
    fn prepare(&self, sending: &Sending) -> std::result::Result<Prepared, StepError>;

    /// Transmits prepared dispatches. `resumed` is true when an earlier process started this
    /// transmission and stopped: continue it, do not send twice.
    fn transmit(
        &self,
        sending: &Sending,
        prepared: &Prepared,
        resumed: bool,
    ) -> std::result::Result<(), StepError>;
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This process's name in leases and run history (unique per process).
    pub holder: String,
    /// Seconds a lease lasts (default 900). It is renewed at every step, and while an
    /// executor step runs, every `heartbeat` if set; without a heartbeat one step (a whole
    /// transmission) must finish within it or another process may take the sending over.
    pub lease_secs: i64,
    /// Most sendings looked at per pass (default 100).
    pub batch: usize,
    /// Renew the lease this often while the executor works (a thread with its own store
    /// connection, counting real time from the pass's `now`); `None` (the default, and what
    /// tests with a fake clock use) renews only between steps.
    pub heartbeat: Option<std::time::Duration>,
}

impl SchedulerConfig {
    /// Defaults with the given holder name.
    pub fn new(holder: impl Into<String>) -> SchedulerConfig {
        SchedulerConfig {
            holder: holder.into(),
            lease_secs: 900,
            batch: 100,
            heartbeat: None,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Sendings whose status this pass changed.
    pub advanced: usize,
    /// Sendings another process held.
    pub busy: usize,
    /// Sendings failed for passing their window.
    pub overdue: usize,
}

/// Runs due sendings of one store through an executor.
pub struct Scheduler<E> {
    store: Store,
    executor: E,
    cfg: SchedulerConfig,
}

enum Step {
    /// Moved the sending on; another step may follow.
    Advanced,
    /// Nothing to do now (waiting for the transmission time, or finished).
    Idle,
}

impl<E: Executor> Scheduler<E> {
    /// A scheduler over `store`.
    pub fn new(store: Store, executor: E, cfg: SchedulerConfig) -> Scheduler<E> {
        Scheduler {
            store,
            executor,
            cfg,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// Runs every due sending as far as it can go at `now`.
    pub fn tick(&self, now: i64) -> Result<PassReport> {
        let mut total = PassReport::default();
        loop {
            let r = self.pass(now, usize::MAX)?;
            total.busy = r.busy;
            total.overdue += r.overdue;
            total.advanced += r.advanced;
            if r.advanced == 0 {
                return Ok(total);
            }
        }
    }

    /// One pass: fails overdue sendings, then advances each due sending by at most
    /// `max_steps` persisted steps (prepare is one step, transmit another).
    pub fn pass(&self, now: i64, max_steps: usize) -> Result<PassReport> {
        let mut report = PassReport::default();
        for (_, campaign_id) in self.store.fail_overdue(now)? {
            report.overdue += 1;
            self.store.sync_campaign_state(campaign_id, now)?;
        }
        for s in self.store.due_sendings(now, self.cfg.batch)? {
            if !self
                .store
                .try_lease(s.id, &self.cfg.holder, now, self.cfg.lease_secs)?
            {
                report.busy += 1;
                continue;
            }
            let result = self.drive(s.id, now, max_steps);
            let released = self.store.release_lease(s.id, &self.cfg.holder);
            report.advanced += result?;
            released?;
        }
        Ok(report)
    }

    /// Advances one leased sending; returns how many steps it took.
    fn drive(&self, id: i64, now: i64, max_steps: usize) -> Result<usize> {
        let mut steps = 0;
        while steps < max_steps {
            // Re-read under the lease: another process may have moved it since the query.
            let s = self.store.sending_by_id(id)?;
            let _span = tracing::info_span!(
                "scheduler_step",
                campaign_id = s.campaign_id,
                sending_id = s.id,
                status = %s.status
            )
            .entered();
            match self.step(&s, now)? {
                Step::Advanced => steps += 1,
                Step::Idle => break,
            }
            self.store.sync_campaign_state(s.campaign_id, now)?;
            if !self
                .store
                .try_lease(id, &self.cfg.holder, now, self.cfg.lease_secs)?
            {
                break;
            }
        }
        Ok(steps)
    }

    fn step(&self, s: &Sending, now: i64) -> Result<Step> {
        use SendingStatus as S;
        let Some(timing) = s.timing else {
            return Ok(Step::Idle);
        };
        let holder = self.cfg.holder.as_str();
        if !s.status.is_final() && now > timing.fail_at {
            let msg = "not finished within the window after the desired time";
            return self.fail(s, msg, now);
        }
        match s.status {
            S::Scheduled | S::Preparing => {
                if s.status == S::Scheduled && !self.store.begin_execution(s.id, holder, now)? {
                    return Ok(Step::Idle);
                }
                let run = self.store.start_run(s.id, "prepare", holder, now)?;
                match self.with_heartbeat(s.id, now, || self.executor.prepare(s)) {
                    Ok(p) if p.recipients == 0 => {
                        self.store.finish_run(
                            run,
                            now,
                            "skipped",
                            Some("no recipient resolved"),
                        )?;
                        let patch = StatusPatch {
                            recipient_count: Some(0),
                            ..Default::default()
                        };
                        self.moved(self.store.advance(
                            s.id,
                            holder,
                            S::Preparing,
                            S::Skipped,
                            now,
                            &patch,
                        )?)
                    }
                    Ok(p) => {
                        let handle = serde_json::to_string(&p).expect("prepared serialises");
                        let detail = format!("{} recipients", p.recipients);
                        self.store.finish_run(run, now, "ok", Some(&detail))?;
                        let patch = StatusPatch {
                            prepared: Some(&handle),
                            recipient_count: Some(p.recipients as i64),
                            error: None,
                        };
                        self.moved(self.store.advance(
                            s.id,
                            holder,
                            S::Preparing,
                            S::Prepared,
                            now,
                            &patch,
                        )?)
                    }
                    Err(e) => {
                        let msg = format!("prepare failed: {e}");
                        self.store.finish_run(run, now, "failed", Some(&msg))?;
                        self.fail(s, &msg, now)
                    }
                }
            }
            S::Prepared | S::Transmitting => {
                if now < timing.desired_at {
                    return Ok(Step::Idle); // prescheduled: prepared early, transmit on time
                }
                let prepared = self.prepared(s)?;
                let resumed = s.status == S::Transmitting;
                if !resumed
                    && !self.store.advance(
                        s.id,
                        holder,
                        S::Prepared,
                        S::Transmitting,
                        now,
                        &StatusPatch::default(),
                    )?
                {
                    return Ok(Step::Idle);
                }
                let run = self.store.start_run(s.id, "transmit", holder, now)?;
                match self
                    .with_heartbeat(s.id, now, || self.executor.transmit(s, &prepared, resumed))
                {
                    Ok(()) => {
                        let detail = if resumed { "resumed" } else { "ok" };
                        self.store.finish_run(run, now, "ok", Some(detail))?;
                        self.moved(self.store.advance(
                            s.id,
                            holder,
                            S::Transmitting,
                            S::Transmitted,
                            now,
                            &StatusPatch::default(),
                        )?)
                    }
                    Err(e) => {
                        let msg = format!("transmit failed: {e}");
                        self.store.finish_run(run, now, "failed", Some(&msg))?;
                        self.fail(s, &msg, now)
                    }
                }
            }
            _ => Ok(Step::Idle),
        }
    }

    /// Runs `f` while a thread keeps the lease on `id` alive (when a heartbeat is set).
    fn with_heartbeat<T>(&self, id: i64, now: i64, f: impl FnOnce() -> T) -> T {
        let Some(every) = self.cfg.heartbeat else {
            return f();
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = self.store.path().to_path_buf();
        let holder = self.cfg.holder.as_str();
        let ttl = self.cfg.lease_secs;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let store = match Store::open(&path) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(sending = id, error = %e, "lease heartbeat cannot open the store");
                        return;
                    }
                };
                let started = std::time::Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let at = now + started.elapsed().as_secs() as i64;
                    match store.try_lease(id, holder, at, ttl) {
                        Ok(true) => {}
                        Ok(false) => {
                            // Another process took it over: the status changes after this
                            // step will be refused (they require our lease).
                            tracing::error!(sending = id, "lost the lease while the executor ran");
                            return;
                        }
                        Err(e) => tracing::warn!(sending = id, error = %e, "lease renewal failed"),
                    }
                }
            });
            let out = f();
            drop(stop);
            out
        })
    }

    fn prepared(&self, s: &Sending) -> Result<Prepared> {
        let text = s.prepared.as_deref().ok_or_else(|| Error::Execution {
            sending_id: s.id,
            step: "transmit",
            message: "no prepared dispatches recorded".into(),
        })?;
        serde_json::from_str(text).map_err(|e| Error::Execution {
            sending_id: s.id,
            step: "transmit",
            message: format!("unreadable prepared handle: {e}"),
        })
    }

    fn fail(&self, s: &Sending, msg: &str, now: i64) -> Result<Step> {
        // The status may have moved since `s` was read (e.g. preparing → prepared).
        let cur = self.store.sending_by_id(s.id)?;
        if cur.status.is_final() {
            return Ok(Step::Idle);
        }
        tracing::warn!(sending = s.id, status = %cur.status, error = msg, "sending failed");
        let patch = StatusPatch {
            error: Some(msg),
            ..Default::default()
        };
        self.moved(self.store.advance(
            s.id,
            &self.cfg.holder,
            cur.status,
            SendingStatus::Failed,
            now,
            &patch,
        )?)
    }

    fn moved(&self, advanced: bool) -> Result<Step> {
        Ok(if advanced { Step::Advanced } else { Step::Idle })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::Recipients;
    use crate::schedule::{Schedule, ScheduleConfig, When};
    use crate::state::CampaignState;
    use crate::store::CampaignFields;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use crate::store::db::values;
    use crate::testing::{on_both_backends, TestStore};

    // Each runs on a SQLite file and on a PostgreSQL database.
    on_both_backends!(
        restart_between_prepare_and_transmit_transmits_once,
        prescheduled_prepares_early_and_transmits_on_time_across_a_restart,
        a_transmission_interrupted_midway_is_resumed_after_the_lease_expires,
        two_schedulers_racing_on_one_file_run_each_sending_once,
        a_sending_in_preparation_is_left_alone_by_another_process,
        the_heartbeat_keeps_the_lease_while_the_executor_works,
        a_campaign_unapproved_after_the_due_query_does_not_start,
        starting_a_sending_moves_its_campaign_to_sending_at_once,
        nothing_resolved_is_skipped_and_executor_errors_fail,
        sendings_wait_for_a_ready_campaign_and_fail_after_the_window,
    );

    /// Counts calls per sending; `recipients` decides what prepare resolves.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<HashMap<(i64, &'static str), usize>>>,
        resumed: Arc<Mutex<Vec<i64>>>,
        recipients: u64,
        fail_transmit: bool,
        /// Runs inside `prepare`, to interleave another process deterministically.
        during_prepare: Option<Arc<dyn Fn(i64) + Send + Sync>>,
    }

    impl Recorder {
        fn count(&self, id: i64, step: &'static str) -> usize {
            self.calls
                .lock()
                .unwrap()
                .get(&(id, step))
                .copied()
                .unwrap_or(0)
        }
        fn bump(&self, id: i64, step: &'static str) {
            *self.calls.lock().unwrap().entry((id, step)).or_default() += 1;
        }
    }

    impl Executor for Recorder {
        fn prepare(&self, s: &Sending) -> std::result::Result<Prepared, StepError> {
            self.bump(s.id, "prepare");
            if let Some(hook) = &self.during_prepare {
                hook(s.id);
            }
            Ok(Prepared {
                recipients: self.recipients,
                handle: format!("run-{}", s.id),
                decisions: Default::default(),
            })
        }
        fn transmit(
            &self,
            s: &Sending,
            p: &Prepared,
            resumed: bool,
        ) -> std::result::Result<(), StepError> {
            assert_eq!(
                p.handle,
                format!("run-{}", s.id),
                "transmit gets the prepared handle"
            );
            self.bump(s.id, "transmit");
            if resumed {
                self.resumed.lock().unwrap().push(s.id);
            }
            if self.fail_transmit {
                return Err("printer API answered 500".into());
            }
            Ok(())
        }
    }

    fn recorder() -> Recorder {
        Recorder {
            recipients: 3,
            ..Default::default()
        }
    }

    /// A READY campaign with `n` sendings on `schedule` accepted at `now`.
    fn seed(path: &Path, n: usize, schedule: Schedule, now: i64) -> (i64, Vec<i64>) {
        let s = Store::open(path).unwrap();
        let c = s
            .create_campaign(
                "ws",
                &CampaignFields {
                    name: Some("spring".into()),
                    state: Some(CampaignState::Ready),
                    ..Default::default()
                },
                now,
            )
            .unwrap();
        let t = schedule
            .resolve(now, &ScheduleConfig::default(), "schedule")
            .unwrap();
        let ids = (0..n)
            .map(|_| {
                s.create_sending("ws", c.id, &schedule, t, &Recipients::default(), now)
                    .unwrap()
                    .id
            })
            .collect();
        (c.id, ids)
    }

    fn scheduler(path: &Path, holder: &str, ex: Recorder) -> Scheduler<Recorder> {
        Scheduler::new(Store::open(path).unwrap(), ex, SchedulerConfig::new(holder))
    }

    const T0: i64 = 1_700_000_000;
    const NOW: Schedule = Schedule {
        when: When::Immediate,
        prescheduled: false,
    };

    fn restart_between_prepare_and_transmit_transmits_once(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (campaign, ids) = seed(&path, 1, NOW, T0);
        let id = ids[0];
        let ex = recorder();
        {
            let sched = scheduler(&path, "proc-1", ex.clone());
            // one persisted step, then the process "dies" (the scheduler and store are dropped)
            assert_eq!(sched.pass(T0, 1).unwrap().advanced, 1);
            let s = sched.store().sending_by_id(id).unwrap();
            assert_eq!(s.status, SendingStatus::Prepared);
            assert_eq!(s.recipient_count, Some(3));
            assert_eq!(ex.count(id, "transmit"), 0);
        }
        let sched = scheduler(&path, "proc-2", ex.clone());
        sched.tick(T0 + 5).unwrap();
        sched.tick(T0 + 6).unwrap();
        assert_eq!(
            ex.count(id, "prepare"),
            1,
            "prepared once, not again after the restart"
        );
        assert_eq!(ex.count(id, "transmit"), 1);
        assert!(ex.resumed.lock().unwrap().is_empty());
        let s = sched.store().sending_by_id(id).unwrap();
        assert_eq!(s.status, SendingStatus::Transmitted);
        let runs = sched.store().runs(id).unwrap();
        let steps: Vec<_> = runs
            .iter()
            .map(|r| (r.step.as_str(), r.holder.as_str(), r.outcome.as_deref()))
            .collect();
        assert_eq!(
            steps,
            [
                ("prepare", "proc-1", Some("ok")),
                ("transmit", "proc-2", Some("ok"))
            ]
        );
        assert_eq!(
            sched.store().campaign("ws", campaign).unwrap().state,
            CampaignState::Done
        );
    }

    fn prescheduled_prepares_early_and_transmits_on_time_across_a_restart(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let at = T0 + 3600;
        let sched_at = Schedule {
            when: When::Absolute { at },
            prescheduled: true,
        };
        let (_, ids) = seed(&path, 1, sched_at, T0);
        let ex = recorder();
        {
            let sched = scheduler(&path, "a", ex.clone());
            sched.tick(at - 301).unwrap();
            assert_eq!(ex.count(ids[0], "prepare"), 0, "not before the lead");
            sched.tick(at - 300).unwrap();
            assert_eq!(ex.count(ids[0], "prepare"), 1);
            sched.tick(at - 1).unwrap();
            assert_eq!(
                ex.count(ids[0], "transmit"),
                0,
                "not before the desired time"
            );
        }
        let sched = scheduler(&path, "b", ex.clone());
        sched.tick(at).unwrap();
        assert_eq!(
            (ex.count(ids[0], "prepare"), ex.count(ids[0], "transmit")),
            (1, 1)
        );
    }

    fn a_transmission_interrupted_midway_is_resumed_after_the_lease_expires(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (_, ids) = seed(&path, 1, NOW, T0);
        let id = ids[0];
        {
            // process 1 moves the sending to transmitting and dies inside transmit
            let store = Store::open(&path).unwrap();
            assert!(store.try_lease(id, "dead", T0, 900).unwrap());
            let ex = recorder();
            let sched = Scheduler::new(store, ex, SchedulerConfig::new("dead"));
            sched.pass(T0, 1).unwrap(); // prepared (releases its lease)
            assert!(sched.store().try_lease(id, "dead", T0, 900).unwrap());
            let none = StatusPatch::default();
            assert!(sched
                .store()
                .advance(
                    id,
                    "dead",
                    SendingStatus::Prepared,
                    SendingStatus::Transmitting,
                    T0,
                    &none
                )
                .unwrap());
        }
        let ex = recorder();
        let sched = scheduler(&path, "alive", ex.clone());
        let r = sched.tick(T0 + 10).unwrap();
        assert_eq!(
            (r.advanced, r.busy),
            (0, 1),
            "the dead process's lease still holds it"
        );
        assert_eq!(ex.count(id, "transmit"), 0);
        sched.tick(T0 + 900).unwrap();
        assert_eq!(ex.count(id, "transmit"), 1);
        assert_eq!(*ex.resumed.lock().unwrap(), vec![id]);
        assert_eq!(
            sched.store().sending_by_id(id).unwrap().status,
            SendingStatus::Transmitted
        );
    }

    fn two_schedulers_racing_on_one_file_run_each_sending_once(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (campaign, ids) = seed(&path, 40, NOW, T0);
        let ex = recorder();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|holder| {
                let (path, ex, barrier) = (path.clone(), ex.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let sched = scheduler(&path, holder, ex);
                    barrier.wait();
                    for k in 0..3 {
                        sched.tick(T0 + k).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let store = Store::open(&path).unwrap();
        for id in ids {
            assert_eq!(ex.count(id, "prepare"), 1, "sending {id} prepared once");
            assert_eq!(ex.count(id, "transmit"), 1, "sending {id} transmitted once");
            assert_eq!(
                store.sending_by_id(id).unwrap().status,
                SendingStatus::Transmitted
            );
        }
        assert_eq!(
            store.campaign("ws", campaign).unwrap().state,
            CampaignState::Done
        );
    }

    fn a_sending_in_preparation_is_left_alone_by_another_process(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (_, ids) = seed(&path, 1, NOW, T0);
        let other_ex = recorder();
        let other = Arc::new(Mutex::new(scheduler(&path, "other", other_ex.clone())));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (o, seen2) = (other.clone(), seen.clone());
        let ex = Recorder {
            recipients: 3,
            // while "first" is inside prepare (status preparing, lease held), "other" runs a pass
            during_prepare: Some(Arc::new(move |_| {
                let r = o.lock().unwrap().tick(T0 + 1).unwrap();
                seen2.lock().unwrap().push(r);
            })),
            ..Default::default()
        };
        let first = scheduler(&path, "first", ex.clone());
        first.tick(T0).unwrap();
        let r = seen.lock().unwrap().clone();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].advanced, r[0].busy),
            (0, 1),
            "the other process saw the lease"
        );
        assert_eq!(other_ex.count(ids[0], "prepare"), 0);
        assert_eq!(
            (ex.count(ids[0], "prepare"), ex.count(ids[0], "transmit")),
            (1, 1)
        );
        // the lease is released afterwards: nothing is left for the other process
        assert_eq!(
            other.lock().unwrap().tick(T0 + 2).unwrap(),
            PassReport::default()
        );
    }

    fn the_heartbeat_keeps_the_lease_while_the_executor_works(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (_, ids) = seed(&path, 1, NOW, T0);
        let watcher = Arc::new(Mutex::new(Store::open(&path).unwrap()));
        let w = watcher.clone();
        let renewed = Arc::new(Mutex::new(None));
        let r = renewed.clone();
        let ex = Recorder {
            recipients: 1,
            // a slow preparation: wait (bounded) until the lease was pushed past its first
            // expiry, i.e. the heartbeat ran after at least one real second
            during_prepare: Some(Arc::new(move |id| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    let taken = w
                        .lock()
                        .unwrap()
                        .try_lease(id, "other", T0 + 59, 60)
                        .unwrap();
                    assert!(!taken, "the lease must stay held while preparing");
                    let exp: i64 = {
                        let st = w.lock().unwrap();
                        st.db()
                            .query_one(
                                "SELECT expires_at FROM leases WHERE sending_id = ?1",
                                values![id],
                            )
                            .and_then(|r| r.get(0))
                            .unwrap()
                    };
                    if exp > T0 + 60 {
                        *r.lock().unwrap() = Some(exp);
                        return;
                    }
                    std::thread::yield_now();
                }
            })),
            ..Default::default()
        };
        let mut cfg = SchedulerConfig::new("slow");
        cfg.lease_secs = 60;
        cfg.heartbeat = Some(std::time::Duration::from_millis(20));
        let sched = Scheduler::new(Store::open(&path).unwrap(), ex.clone(), cfg);
        sched.tick(T0).unwrap();
        assert!(
            renewed.lock().unwrap().is_some(),
            "the heartbeat renewed the lease"
        );
        assert_eq!(ex.count(ids[0], "transmit"), 1);
        assert_eq!(
            sched.store().sending_by_id(ids[0]).unwrap().status,
            SendingStatus::Transmitted
        );
    }

    fn a_campaign_unapproved_after_the_due_query_does_not_start(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (campaign, ids) = seed(&path, 1, NOW, T0);
        let sched = scheduler(&path, "a", recorder());
        // the sending was found due and leased, then a client took the approval back
        assert_eq!(sched.store().due_sendings(T0, 10).unwrap().len(), 1);
        assert!(sched.store().try_lease(ids[0], "a", T0, 900).unwrap());
        let back = CampaignFields {
            state: Some(CampaignState::Scheduled),
            ..Default::default()
        };
        sched
            .store()
            .update_campaign("ws", campaign, &back, T0)
            .unwrap();
        assert!(!sched.store().begin_execution(ids[0], "a", T0).unwrap());
        let s = sched.store().sending_by_id(ids[0]).unwrap();
        assert_eq!(s.status, SendingStatus::Scheduled);
        assert_eq!(
            sched.store().campaign("ws", campaign).unwrap().state,
            CampaignState::Scheduled
        );
        sched.tick(T0).unwrap();
        assert_eq!(sched.executor().count(ids[0], "prepare"), 0);
    }

    fn starting_a_sending_moves_its_campaign_to_sending_at_once(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (campaign, ids) = seed(&path, 1, NOW, T0);
        let sched = scheduler(&path, "a", recorder());
        assert!(sched.store().try_lease(ids[0], "a", T0, 900).unwrap());
        assert!(sched.store().begin_execution(ids[0], "a", T0).unwrap());
        let c = sched.store().campaign("ws", campaign).unwrap();
        assert_eq!(
            c.state,
            CampaignState::Sending,
            "no window for a client to cancel mid-run"
        );
        let cancel = CampaignFields {
            state: Some(CampaignState::Cancelled),
            ..Default::default()
        };
        assert!(sched
            .store()
            .update_campaign("ws", campaign, &cancel, T0)
            .is_err());
        assert!(
            !sched.store().begin_execution(ids[0], "a", T0).unwrap(),
            "only once"
        );
    }

    fn nothing_resolved_is_skipped_and_executor_errors_fail(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let (campaign, ids) = seed(&path, 1, NOW, T0);
        let empty = Recorder::default();
        scheduler(&path, "a", empty.clone()).tick(T0).unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.sending_by_id(ids[0]).unwrap().status,
            SendingStatus::Skipped
        );
        assert_eq!(empty.count(ids[0], "transmit"), 0);
        assert_eq!(
            store.campaign("ws", campaign).unwrap().state,
            CampaignState::Done
        );

        let ts2 = ts.another();
        let path2 = ts2.path().to_path_buf();
        let (campaign, ids) = seed(&path2, 1, NOW, T0);
        let failing = Recorder {
            recipients: 2,
            fail_transmit: true,
            ..Default::default()
        };
        scheduler(&path2, "a", failing).tick(T0).unwrap();
        let store = Store::open(&path2).unwrap();
        let s = store.sending_by_id(ids[0]).unwrap();
        assert_eq!(s.status, SendingStatus::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("transmit failed: printer API answered 500")
        );
        assert_eq!(
            store.campaign("ws", campaign).unwrap().state,
            CampaignState::Error
        );
    }

    fn sendings_wait_for_a_ready_campaign_and_fail_after_the_window(ts: &TestStore) {
        let path = ts.path().to_path_buf();
        let store = Store::open(&path).unwrap();
        let c = store
            .create_campaign(
                "ws",
                &CampaignFields {
                    name: Some("x".into()),
                    ..Default::default()
                },
                T0,
            )
            .unwrap();
        let t = NOW
            .resolve(T0, &ScheduleConfig::default(), "schedule")
            .unwrap();
        let sd = store
            .create_sending("ws", c.id, &NOW, t, &Recipients::default(), T0)
            .unwrap();
        drop(store);
        let ex = recorder();
        let sched = scheduler(&path, "a", ex.clone());
        sched.tick(T0 + 60).unwrap();
        assert_eq!(
            ex.count(sd.id, "prepare"),
            0,
            "a DRAFT campaign's sendings do not run"
        );
        sched.tick(T0 + 1200).unwrap();
        assert_eq!(
            sched.store().sending_by_id(sd.id).unwrap().status,
            SendingStatus::Scheduled
        );
        let r = sched.tick(T0 + 1201).unwrap();
        assert_eq!(r.overdue, 1);
        let s = sched.store().sending_by_id(sd.id).unwrap();
        assert_eq!(s.status, SendingStatus::Failed);
        assert!(s.error.unwrap().contains("window"));
        assert_eq!(ex.count(sd.id, "prepare"), 0);
    }
}
