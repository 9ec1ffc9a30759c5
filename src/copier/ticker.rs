//! Rate-limited progress: forwards a transfer to the injected [`Progress`] at most four times a
//! second (and always at the end).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::progress::{Progress, Transfer};

/// Minimum time between two progress calls.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A throttled progress reporter for one transfer.
pub(crate) struct Ticker<'a> {
    progress: &'a dyn Progress,
    what: String,
    total: u64,
    start: Instant,
    last: Mutex<Option<Instant>>,
}

impl<'a> Ticker<'a> {
    /// A reporter for `total` bytes of `what`, timed from now.
    pub(crate) fn new(progress: &'a dyn Progress, what: String, total: u64) -> Self {
        Self {
            progress,
            what,
            total,
            start: Instant::now(),
            last: Mutex::new(None),
        }
    }

    fn send(&self, done: u64, now: Instant) {
        let elapsed = now.duration_since(self.start);
        let secs = elapsed.as_secs_f64();
        self.progress.transfer(
            &self.what,
            Transfer {
                done,
                total: self.total,
                bytes_per_sec: if secs > 0.0 { done as f64 / secs } else { 0.0 },
                elapsed,
            },
        );
    }

    /// Reports `done` bytes if the last report is old enough (the first one goes at once).
    pub(crate) fn tick(&self, done: u64) {
        let now = Instant::now();
        let due = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            match *last {
                Some(t) if now.duration_since(t) < PROGRESS_INTERVAL => false,
                _ => {
                    *last = Some(now);
                    true
                }
            }
        };
        if due {
            self.send(done, now);
        }
    }

    /// Reports the final figure unconditionally.
    pub(crate) fn finish(&self, done: u64) {
        self.send(done, Instant::now());
    }
}
