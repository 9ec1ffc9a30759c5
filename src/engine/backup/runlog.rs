//! The run's own log: every line goes to `tracing`, to the driver's [`Progress`] sink and into
//! the `backup.log` written into the backup folder.

use std::sync::Mutex;

use chrono::Local;

use crate::progress::{Level, Progress};

/// Collects the log lines of one run.
#[derive(Debug, Default)]
pub struct RunLog {
    lines: Mutex<Vec<String>>,
}

impl RunLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a line at `level` and forwards it.
    pub fn log(&self, progress: &dyn Progress, level: Level, text: &str) {
        // The progress sink is the operator's channel; tracing gets a debug copy.
        tracing::debug!(?level, "{text}");
        progress.message(level, text);
        let word = match level {
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
        };
        let line = format!(
            "{} {word} {text}",
            Local::now().format("%Y-%m-%dT%H:%M:%S%.3f%z")
        );
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(line);
        }
    }

    /// The lines so far, newline-terminated.
    pub fn text(&self) -> String {
        let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }
}
