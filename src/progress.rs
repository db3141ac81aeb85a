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

    /// Shows `rows` decided so far.
    pub fn update(&mut self, rows: u64) {
        let Some(bar) = &self.bar else { return };
        let rate = rows as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        match (&self.hint.total_rows, &self.hint.bytes) {
            (Some(_), _) | (None, None) => bar.set_position(rows),
            (None, Some((_, read))) => bar.set_position(read.load(Ordering::Relaxed)),
        }
        bar.set_message(format!("{rows} rows, {:.2} M rows/s", rate / 1e6));
    }

    /// Clears the bar.
    pub fn finish(&mut self, rows: u64) {
        self.update(rows);
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
