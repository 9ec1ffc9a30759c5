//! Progress reporting and cancellation, injected by whoever drives the engine.
//!
//! The engine never prints: it calls a [`Progress`] sink. The command line renders it as a
//! progress bar or plain lines, the C ABI forwards it to a C callback (which the Bacula plugin
//! turns into job messages), and tests record it. Cancellation is a shared flag that the engine
//! polls at least once per buffer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How important a log line is; maps onto Bacula's M_INFO / M_WARNING / M_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Progress and ordinary events.
    Info,
    /// Something the operator should look at; the job still succeeds.
    Warning,
    /// A failure.
    Error,
}

/// A snapshot of a long-running transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Bytes processed so far (logical offset reached).
    pub done: u64,
    /// Bytes to process in all.
    pub total: u64,
    /// Average rate since the start, bytes per second.
    pub bytes_per_sec: f64,
    /// Time since the start.
    pub elapsed: Duration,
}

/// A sink for progress and log lines. Implementations must be cheap: the engine calls
/// [`Progress::transfer`] at most a few times per second.
pub trait Progress: Send + Sync {
    /// A transfer advanced. `what` names it (a file or disk).
    fn transfer(&self, what: &str, transfer: Transfer);
    /// A log line for the operator (also sent to `tracing` by the engine).
    fn message(&self, level: Level, text: &str);
}

/// A [`Progress`] sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn transfer(&self, _what: &str, _transfer: Transfer) {}
    fn message(&self, _level: Level, _text: &str) {}
}

/// A cancellation flag shared between the driver (signal handler, Bacula cancel event, C caller)
/// and the engine, which polls it.
#[derive(Debug, Default, Clone)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A new, not cancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation; safe from any thread.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The shared flag, for signal handlers (`signal_hook::flag::register`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

/// Bytes in binary units: `512 B`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A rate in binary units per second.
pub fn human_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_sec.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_is_seen_by_clones() {
        let token = CancelToken::new();
        let seen_by_engine = token.clone();
        assert!(!seen_by_engine.is_cancelled());
        token.cancel();
        assert!(seen_by_engine.is_cancelled());
    }
}
