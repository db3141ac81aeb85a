//! Terminal progress bar (rows/s, ETA when the total is known).

use std::sync::atomic::Ordering;
use std::time::Instant;

use broadside_sources::SizeHint;
use indicatif::{ProgressBar, ProgressStyle};

/// Progress of a send; draws nothing when not on a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
    hint: SizeHint,
    started: Instant,
}

impl Progress {
    /// A bar sized from the source's hint.
    pub fn new(show: bool, hint: SizeHint) -> Self {
        let bar = show.then(|| {
            let (len, template) = match (&hint.total_rows, &hint.bytes) {
                (Some(n), _) => (
                    *n,
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows {msg} ETA {eta}",
                ),
                (None, Some((b, _))) => (
                    *b,
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg} ETA {eta}",
                ),
                (None, None) => (0, "{spinner} [{elapsed_precise}] {pos} rows {msg}"),
            };
            let bar = ProgressBar::new(len);
            bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
            bar
        });
        Progress {
            bar,
            hint,
            started: Instant::now(),
        }
    }

    /// Shows `rows` decided so far (and publishes the send's rate and ETA as metrics).
    pub fn update(&mut self, rows: u64) {
        let rate = rows as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        metrics::gauge!("broadside_send_rows_per_second").set(rate);
        let expected = self.hint.total_rows.unwrap_or(0);
        metrics::gauge!("broadside_send_rows_expected").set(expected as f64);
        let eta = if expected > rows && rate > 0.0 {
            (expected - rows) as f64 / rate
        } else {
            0.0
        };
        metrics::gauge!("broadside_send_eta_seconds").set(eta);
        let Some(bar) = &self.bar else { return };
        match (&self.hint.total_rows, &self.hint.bytes) {
            (Some(_), _) | (None, None) => bar.set_position(rows),
            (None, Some((_, read))) => bar.set_position(read.load(Ordering::Relaxed)),
        }
        bar.set_message(format!("{rows} rows, {:.2} M rows/s", rate / 1e6));
    }

    /// Clears the bar; the ETA of a send that ended is 0.
    pub fn finish(&mut self, rows: u64) {
        self.update(rows);
        metrics::gauge!("broadside_send_eta_seconds").set(0.0);
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Counts a send in `broadside_send_runs_running` while it lives.
pub struct Running;

impl Running {
    pub fn start() -> Running {
        metrics::gauge!("broadside_send_runs_running").increment(1.0);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!("broadside_send_runs_running").decrement(1.0);
    }
}
