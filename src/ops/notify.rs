//! Slack notifications through incoming webhooks.
//!
//! - An **alert** goes to `slack.alerts_webhook` at once for every failed run, every run that
//!   completed with warnings, and every failed `verify` or `test-restore`:
//!   [`alert_backup`] (called after each run by [`crate::ops::report`]) and [`alert_check`].
//! - A **report** goes to `slack.reports_webhook`: [`weekly_report`] builds the summary of the
//!   last 7 days from the catalog (VMs, results, sizes, durations, throughput, frozen windows,
//!   verify and test-restore verdicts) and [`send_report`] posts it (`vm-backup report --weekly`).
//!
//! Delivery never fails the caller: it returns a [`Delivery`] to log. Each POST has a timeout
//! (`slack.timeout_seconds`, default 2 s) and the whole delivery, retries with backoff included,
//! is bounded by `slack.budget_seconds` (default 5 s), so a dead Slack holds a backup a few
//! seconds at most. Webhook URLs are secrets: they never appear in a log line, an error or a
//! [`Delivery`] (errors are described by their kind and HTTP status only).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Settings;
pub use crate::ops::outcome::BackupOutcome;
pub use crate::progress::{human_bytes, human_rate};
use crate::store::catalog::{BackupRow, FailedRun};
use crate::ExitStatus;

/// Default timeout of one POST.
pub const DEFAULT_POST_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound of one delivery, retries included.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(5);
/// The `tracing` filter directive every log subscriber of this crate must add: ureq logs
/// request URLs at debug level, and webhook URLs are secrets.
pub const LOG_DIRECTIVE: &str = "ureq=warn";
/// Attempts per delivery at most.
pub const MAX_ATTEMPTS: u32 = 3;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "delivery")]
pub enum Delivery {
    /// Nothing worth an alert happened.
    NotNeeded,
    /// No webhook is configured for this kind of message.
    NotConfigured,
    /// Slack accepted it.
    Sent {
        /// Attempts made.
        attempts: u32,
    },
    /// Every attempt failed within the bound; the reason never contains the URL.
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last reason, e.g. `HTTP 500` or `Connection Failed`.
        reason: String,
    },
}

impl Delivery {
    /// Whether the message reached Slack or did not need to.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Delivery::Failed { .. })
    }
}

/// Sends an alert for a backup run when it failed or warned; a clean success sends nothing.
/// Called by the backup workflow after every run. Never fails, never blocks longer than the
/// configured budget.
pub fn alert_backup(settings: &Settings, outcome: &BackupOutcome<'_>) -> Delivery {
    match alert_text(outcome) {
        Some(text) => post_text(settings, settings.slack.alerts_webhook.as_deref(), &text),
        None => Delivery::NotNeeded,
    }
}

/// The text of the alert for a run, or `None` when the run needs none.
pub fn alert_text(outcome: &BackupOutcome<'_>) -> Option<String> {
    match outcome {
        BackupOutcome::Published(meta) => {
            if meta.result == ExitStatus::Success && meta.warnings.is_empty() {
                return None;
            }
            let mut text = format!(
                ":warning: vm-backup *{}* on {}: backup {} {} ({} method, {}, {})",
                meta.vm_name,
                meta.host,
                meta.stamp,
                meta.result,
                meta.method,
                human_bytes(meta.total_bytes),
                human_rate(meta.bytes_per_sec),
            );
            for w in &meta.warnings {
                let _ = write!(text, "\n• {w}");
            }
            Some(text)
        }
        BackupOutcome::Failed(f) => Some(format!(
            ":red_circle: vm-backup *{}* on {}: backup {} {}: {}",
            f.vm, f.host, f.stamp, f.result, f.error
        )),
    }
}

/// Sends an alert for a failed check of a published backup (`verify`, `test-restore`).
pub fn alert_check(
    settings: &Settings,
    check: &str,
    host: &str,
    vm: &str,
    stamp: &str,
    detail: &str,
) -> Delivery {
    let text = format!(
        ":red_circle: vm-backup *{vm}* on {host}: {check} of backup {stamp} failed: {detail}"
    );
    post_text(settings, settings.slack.alerts_webhook.as_deref(), &text)
}

/// Posts a report text to the reports webhook.
pub fn send_report(settings: &Settings, text: &str) -> Delivery {
    post_text(settings, settings.slack.reports_webhook.as_deref(), text)
}

/// Posts `{"text": …}` to a webhook with retries, backoff and a total bound.
pub fn post_text(settings: &Settings, webhook: Option<&str>, text: &str) -> Delivery {
    let Some(url) = webhook.filter(|u| !u.trim().is_empty()) else {
        return Delivery::NotConfigured;
    };
    let per_post = settings
        .slack
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_POST_TIMEOUT);
    let budget = settings
        .slack
        .budget_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_BUDGET);
    let delivery = post_json(url, &serde_json::json!({ "text": text }), per_post, budget);
    match &delivery {
        Delivery::Failed { attempts, reason } => {
            tracing::warn!(attempts, reason = %reason, "Slack notification not delivered")
        }
        Delivery::Sent { attempts } => tracing::info!(attempts, "Slack notification sent"),
        _ => {}
    }
    delivery
}

/// Posts a JSON body to `url`: at most [`MAX_ATTEMPTS`] attempts, each bounded by `per_post`
/// and all together by `budget`; retries after a network error, HTTP 429 or 5xx, with a
/// backoff of 0.5 s, then 1 s.
pub fn post_json(
    url: &str,
    body: &serde_json::Value,
    per_post: Duration,
    budget: Duration,
) -> Delivery {
    let deadline = Instant::now() + budget;
    let mut attempts = 0;
    let mut reason = String::from("no attempt made");
    let mut backoff = Duration::from_millis(500);
    while attempts < MAX_ATTEMPTS {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(50) {
            break;
        }
        attempts += 1;
        let agent = ureq::AgentBuilder::new()
            .timeout(per_post.min(left))
            .redirects(0)
            .user_agent(concat!("vm-backup/", env!("CARGO_PKG_VERSION")))
            .build();
        let retry = match agent.post(url).send_json(body) {
            Ok(_) => return Delivery::Sent { attempts },
            Err(ureq::Error::Status(code, _)) => {
                reason = format!("HTTP {code}");
                code == 429 || code >= 500
            }
            // The transport error's own text may quote the URL: keep only its kind.
            Err(ureq::Error::Transport(t)) => {
                reason = t.kind().to_string();
                !matches!(
                    t.kind(),
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme
                )
            }
        };
        if !retry {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if attempts < MAX_ATTEMPTS && left > backoff {
            std::thread::sleep(backoff);
            backoff *= 2;
        } else {
            break;
        }
    }
    Delivery::Failed { attempts, reason }
}

/// The weekly summary text from the catalog rows of the last 7 days before `now`.
pub fn weekly_report(
    backups: &[BackupRow],
    failures: &[FailedRun],
    now: chrono::DateTime<chrono::Local>,
) -> String {
    let since = now - chrono::Duration::days(7);
    let in_week = |stamp: &str| {
        crate::format::layout::parse_stamp(stamp)
            .map(|t| t >= since && t <= now)
            .unwrap_or(false)
    };
    let backups: Vec<&BackupRow> = backups.iter().filter(|b| in_week(&b.stamp)).collect();
    let failures: Vec<&FailedRun> = failures.iter().filter(|f| in_week(&f.stamp)).collect();
    let mut vms: std::collections::BTreeSet<(String, String)> = backups
        .iter()
        .map(|b| (b.host.clone(), b.vm.clone()))
        .collect();
    vms.extend(failures.iter().map(|f| (f.host.clone(), f.vm.clone())));

    let total: u64 = backups.iter().map(|b| b.total_bytes).sum();
    let mut text = format!(
        "*vm-backup weekly report* {} – {}\n{} VMs, {} backups ({} with warnings), {} failed runs, {} written\n",
        since.format("%Y-%m-%d"),
        now.format("%Y-%m-%d"),
        vms.len(),
        backups.len(),
        backups.iter().filter(|b| b.result == "warning").count(),
        failures.len(),
        human_bytes(total),
    );
    for (host, vm) in &vms {
        let mine: Vec<&&BackupRow> = backups
            .iter()
            .filter(|b| &b.host == host && &b.vm == vm)
            .collect();
        let failed: Vec<&&FailedRun> = failures
            .iter()
            .filter(|f| &f.host == host && &f.vm == vm)
            .collect();
        let _ = write!(
            text,
            "\n*{vm}* ({host}): {} ok, {} failed",
            mine.len(),
            failed.len()
        );
        if let Some(last) = mine.last() {
            let frozen = mine
                .iter()
                .filter_map(|b| b.frozen_ms)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            let _ = write!(
                text,
                "\n  last {} {} ({}): {}, {:.1} s, {}, frozen {}, verify {}, test-restore {}",
                last.stamp,
                last.result,
                last.method,
                human_bytes(last.total_bytes),
                last.duration_seconds,
                human_rate(last.bytes_per_sec),
                frozen.map_or("–".to_string(), |f| format!("max {f:.0} ms")),
                verdict_word(last.verify.as_ref()),
                verdict_word(last.test_restore.as_ref()),
            );
        }
        for f in failed {
            let _ = write!(
                text,
                "\n  :red_circle: {} {}: {}",
                f.stamp, f.result, f.error
            );
        }
    }
    text
}

/// `passed`, `FAILED` or `–` for a verdict.
pub fn verdict_word(v: Option<&crate::format::metadata::Verdict>) -> &'static str {
    match v {
        Some(v) if v.ok => "passed",
        Some(_) => "FAILED",
        None => "–",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_rate(1048576.0), "1.0 MiB/s");
    }

    #[test]
    fn failures_alert_and_clean_successes_do_not() {
        let f = FailedRun {
            host: "hv1".into(),
            vm: "web01".into(),
            stamp: "2026-11-21-120000".into(),
            started_at: String::new(),
            finished_at: String::new(),
            result: ExitStatus::Failed,
            error: "copy failed: EIO".into(),
            method: None,
        };
        let text = alert_text(&BackupOutcome::Failed(&f)).unwrap();
        assert!(
            text.contains("web01") && text.contains("copy failed: EIO"),
            "{text}"
        );
    }

    #[test]
    fn no_webhook_is_not_an_error() {
        let d = post_text(&Settings::default(), None, "x");
        assert_eq!(d, Delivery::NotConfigured);
        assert!(d.is_ok());
    }
}
