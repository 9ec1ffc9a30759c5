//! The status of every VM, for people: `vm-backup status` and the status page on the share.
//!
//! [`build`] is a pure function from what the catalog holds (every backup row with its
//! verdicts, every failed run), the inventory and the target's free space to a [`Status`]:
//! per VM its last run, its last backup (size, duration, frozen window), three verdicts with
//! their dates — hashes verified (`verify`), image checked (the post-checks at publish:
//! re-hash and `qemu-img check`), booted in a drill (`test-restore`) — the history of size and
//! duration, and what needs attention, most urgent first. [`render_text`] and
//! [`render_html`] present it; the HTML is one self-contained file (inline CSS, inline SVG
//! charts, no script, no font, nothing fetched).
//!
//! [`refresh_page`] writes `<target>/metadata/status.html`, beside the catalog, after every
//! run and every drill; it is best effort, like the rest of the after-run work.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Local};
use serde::Serialize;

use crate::config::{Inventory, Settings};
use crate::format::layout::{self, METADATA_DIR};
use crate::format::metadata::Verdict;
use crate::ops::notify::{human_bytes, human_rate};
use crate::progress::{Level, Progress};
use crate::store::catalog::{BackupRow, Catalog, CatalogError, FailedRun};

/// The status page's file name under `<target>/metadata/`.
pub const PAGE_FILE: &str = "status.html";

/// How many backups of a VM the charts show (the newest).
const HISTORY_POINTS: usize = 60;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The page could not be written.
    #[error("cannot write the status page {path}: {source}")]
    Write {
        /// The page.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl StatusError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            StatusError::Catalog(e) => e.kind(),
            StatusError::Write { .. } => crate::error::ErrorKind::Io,
        }
    }
}

/// When a VM or the target needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rules {
    /// A VM whose newest backup is older than this many days is flagged.
    pub stale_after_days: i64,
    /// The target is flagged as filling up from this percentage used…
    pub target_warn_percent: f64,
    /// …and as critical from this one.
    pub target_critical_percent: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            stale_after_days: 2,
            target_warn_percent: 85.0,
            target_critical_percent: 95.0,
        }
    }
}

/// How urgent an attention item is; the more urgent sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Urgency {
    /// Data is at risk or a run failed: look now.
    Critical,
    /// Something is missing or ageing: look this week.
    Warning,
}

/// What needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Concern {
    /// The VM has never been backed up.
    NoBackup,
    /// The latest run of the VM failed (no backup published since).
    LastRunFailed,
    /// The latest restore drill of the VM failed.
    DrillFailed,
    /// The latest verification found a fault.
    VerifyFailed,
    /// The newest backup is older than the rule allows.
    Stale,
    /// The target is filling up.
    TargetFilling,
    /// The post-checks of the newest backup (re-hash, `qemu-img check`) found a problem.
    ImageCheckFailed,
    /// No backup of the VM has ever passed `verify`.
    NotVerified,
    /// No backup of the VM has ever been booted in a drill.
    NeverDrilled,
}

/// One thing that needs attention.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attention {
    /// How urgent.
    pub urgency: Urgency,
    /// What.
    pub concern: Concern,
    /// The VM, or none for the target.
    pub vm: Option<String>,
    /// One line for the operator.
    pub message: String,
}

/// A verdict with the backup it concerns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Passed.
    pub ok: bool,
    /// When it was reached (RFC 3339).
    pub at: String,
    /// The backup it concerns.
    pub stamp: String,
    /// What was found.
    pub detail: String,
}

/// The latest run of a VM, published or not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastRun {
    /// Stamp of the run.
    pub stamp: String,
    /// Result word (`success`, `warning`, `failed`, `pre-check-failed`).
    pub result: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// The error of a failed run.
    pub error: Option<String>,
}

/// The newest published backup of a VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastBackup {
    /// Backup stamp.
    pub stamp: String,
    /// Result word (`success` or `warning`).
    pub result: String,
    /// Method used.
    pub method: String,
    /// Bytes of disk images.
    pub total_bytes: u64,
    /// Wall time of the run, seconds.
    pub duration_seconds: f64,
    /// Throughput of the copy, bytes per second.
    pub bytes_per_sec: f64,
    /// Frozen window, milliseconds (quiesce only).
    pub frozen_ms: Option<f64>,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// The folder, relative to the target.
    pub path: String,
}

/// One backup in a VM's history (oldest first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Backup stamp.
    pub stamp: String,
    /// Bytes of disk images.
    pub total_bytes: u64,
    /// Wall time of the run, seconds.
    pub duration_seconds: f64,
    /// The run ended with a warning.
    pub warning: bool,
}

/// Everything known about one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmStatus {
    /// Hypervisor host name.
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// Listed in the inventory (otherwise only found on the share).
    pub in_inventory: bool,
    /// The latest run.
    pub last_run: Option<LastRun>,
    /// The newest published backup.
    pub last_backup: Option<LastBackup>,
    /// The newest `verify` verdict of any of its backups.
    pub hashes_verified: Option<Check>,
    /// The post-checks of the newest backup.
    pub image_checked: Option<Check>,
    /// The newest `test-restore` verdict of any of its backups.
    pub booted: Option<Check>,
    /// Backups on the share.
    pub backups: usize,
    /// Size and duration of the newest backups, oldest first.
    pub history: Vec<Point>,
    /// What needs attention, most urgent first.
    pub attention: Vec<Attention>,
}

impl VmStatus {
    /// The most urgent attention item, if any.
    pub fn worst(&self) -> Option<Urgency> {
        self.attention.iter().map(|a| a.urgency).min()
    }
}

/// Space on the target, as `df` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    /// Size of the file system, bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes available to vm-backup (not counting the blocks reserved for root).
    pub available_bytes: u64,
}

impl Usage {
    /// Percentage used (0–100) the way `df` shows it: used / (used + available).
    pub fn used_percent(&self) -> f64 {
        let usable = self.used_bytes.saturating_add(self.available_bytes);
        if usable == 0 {
            return 0.0;
        }
        100.0 * self.used_bytes as f64 / usable as f64
    }

    /// The space of the file system holding `path`, if it can be read.
    pub fn of(path: &Path) -> Option<Self> {
        let st = nix::sys::statvfs::statvfs(path).ok()?;
        let frag = st.fragment_size() as u64;
        let total = (st.blocks() as u64).saturating_mul(frag);
        let free = (st.blocks_free() as u64).saturating_mul(frag);
        Some(Self {
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
            available_bytes: (st.blocks_available() as u64).saturating_mul(frag),
        })
    }
}

/// The status of the whole target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// When this was built (RFC 3339).
    pub generated_at: String,
    /// The target.
    pub target: String,
    /// Space on the target.
    pub usage: Option<Usage>,
    /// The rules applied.
    pub rules: Rules,
    /// Every VM, most urgent first, then by name.
    pub vms: Vec<VmStatus>,
    /// Everything that needs attention, most urgent first.
    pub attention: Vec<Attention>,
}

/// What [`build`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The target.
    pub target: &'a Path,
    /// This hypervisor (the host of the inventory's VMs).
    pub host: &'a str,
    /// The inventory's VM names, when it could be read.
    pub inventory: Option<&'a [String]>,
    /// Every backup in the catalog.
    pub backups: &'a [BackupRow],
    /// Every failed run in the catalog.
    pub failures: &'a [FailedRun],
    /// Space on the target.
    pub usage: Option<Usage>,
    /// Now.
    pub now: DateTime<Local>,
    /// The rules.
    pub rules: Rules,
}

/// Builds the status from what the catalog, the inventory and the target say.
pub fn build(input: Input<'_>) -> Status {
    let mut keys: BTreeMap<(String, String), bool> = BTreeMap::new();
    for name in input.inventory.unwrap_or_default() {
        keys.insert((input.host.to_string(), name.clone()), true);
    }
    let from_share = input
        .backups
        .iter()
        .map(|b| (b.host.clone(), b.vm.clone()))
        .chain(
            input
                .failures
                .iter()
                .map(|f| (f.host.clone(), f.vm.clone())),
        );
    for key in from_share {
        // Without an inventory every VM on the share counts as listed.
        keys.entry(key).or_insert(input.inventory.is_none());
    }
    let mut vms: Vec<VmStatus> = keys
        .into_iter()
        .map(|((host, vm), listed)| vm_status(&input, host, vm, listed))
        .collect();
    vms.sort_by(|a, b| {
        (a.worst().map_or(2, |u| u as u8), &a.vm, &a.host).cmp(&(
            b.worst().map_or(2, |u| u as u8),
            &b.vm,
            &b.host,
        ))
    });

    let mut attention: Vec<Attention> = vms.iter().flat_map(|v| v.attention.clone()).collect();
    if let Some(usage) = input.usage {
        let used = usage.used_percent();
        let urgency = if used >= input.rules.target_critical_percent {
            Some(Urgency::Critical)
        } else if used >= input.rules.target_warn_percent {
            Some(Urgency::Warning)
        } else {
            None
        };
        if let Some(urgency) = urgency {
            attention.push(Attention {
                urgency,
                concern: Concern::TargetFilling,
                vm: None,
                message: format!(
                    "the target is {used:.0} % full ({} free of {})",
                    human_bytes(usage.available_bytes),
                    human_bytes(usage.total_bytes)
                ),
            });
        }
    }
    attention.sort_by(|a, b| (a.urgency, a.concern, &a.vm).cmp(&(b.urgency, b.concern, &b.vm)));
    Status {
        generated_at: input.now.to_rfc3339(),
        target: input.target.display().to_string(),
        usage: input.usage,
        rules: input.rules,
        vms,
        attention,
    }
}

fn vm_status(input: &Input<'_>, host: String, vm: String, in_inventory: bool) -> VmStatus {
    let backups: Vec<&BackupRow> = input
        .backups
        .iter()
        .filter(|b| b.host == host && b.vm == vm)
        .collect();
    let newest_failure = input
        .failures
        .iter()
        .filter(|f| f.host == host && f.vm == vm)
        .max_by(|a, b| a.stamp.cmp(&b.stamp));
    let newest = backups.iter().max_by(|a, b| a.stamp.cmp(&b.stamp)).copied();

    let last_run = match (newest, newest_failure) {
        (Some(b), Some(f)) if f.stamp > b.stamp => Some(failure_run(f)),
        (Some(b), _) => Some(LastRun {
            stamp: b.stamp.clone(),
            result: b.result.clone(),
            finished_at: b.finished_at.clone(),
            error: None,
        }),
        (None, Some(f)) => Some(failure_run(f)),
        (None, None) => None,
    };
    let last_backup = newest.map(|b| LastBackup {
        stamp: b.stamp.clone(),
        result: b.result.clone(),
        method: b.method.clone(),
        total_bytes: b.total_bytes,
        duration_seconds: b.duration_seconds,
        bytes_per_sec: b.bytes_per_sec,
        frozen_ms: b.frozen_ms,
        finished_at: b.finished_at.clone(),
        path: b.path.clone(),
    });
    let newest_verdict = |pick: fn(&BackupRow) -> Option<&Verdict>| {
        backups
            .iter()
            .filter_map(|b| pick(b).map(|v| (b, v)))
            .max_by(|(a, va), (b, vb)| {
                (instant(&va.at), &a.stamp).cmp(&(instant(&vb.at), &b.stamp))
            })
            .map(|(b, v)| Check {
                ok: v.ok,
                at: v.at.clone(),
                stamp: b.stamp.clone(),
                detail: v.detail.clone(),
            })
    };
    let hashes_verified = newest_verdict(|b| b.verify.as_ref());
    let booted = newest_verdict(|b| b.test_restore.as_ref());
    let image_checked = newest.map(|b| {
        let problems: Vec<&str> = b
            .warnings
            .iter()
            .filter(|w| w.starts_with("post-check"))
            .map(String::as_str)
            .collect();
        Check {
            ok: problems.is_empty(),
            at: b.finished_at.clone(),
            stamp: b.stamp.clone(),
            detail: if problems.is_empty() {
                "post-checks passed: re-hashed, qemu-img check".to_string()
            } else {
                problems.join("; ")
            },
        }
    });
    let mut history: Vec<Point> = backups
        .iter()
        .map(|b| Point {
            stamp: b.stamp.clone(),
            total_bytes: b.total_bytes,
            duration_seconds: b.duration_seconds,
            warning: b.result != "success",
        })
        .collect();
    history.sort_by(|a, b| a.stamp.cmp(&b.stamp));
    let drop = history.len().saturating_sub(HISTORY_POINTS);
    history.drain(..drop);

    let mut status = VmStatus {
        host,
        vm,
        in_inventory,
        last_run,
        last_backup,
        hashes_verified,
        image_checked,
        booted,
        backups: backups.len(),
        history,
        attention: Vec::new(),
    };
    status.attention = attention_of(&status, &backups, input);
    status
}

fn failure_run(f: &FailedRun) -> LastRun {
    let result = serde_json::to_value(f.result)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "failed".to_string());
    LastRun {
        stamp: f.stamp.clone(),
        result,
        finished_at: f.finished_at.clone(),
        error: Some(f.error.clone()),
    }
}

/// An RFC 3339 time as an instant (none when it does not parse).
fn instant(at: &str) -> Option<DateTime<chrono::FixedOffset>> {
    DateTime::parse_from_rfc3339(at).ok()
}

/// The attention rules of one VM.
fn attention_of(vm: &VmStatus, backups: &[&BackupRow], input: &Input<'_>) -> Vec<Attention> {
    let mut out = Vec::new();
    let mut flag = |urgency, concern, message: String| {
        out.push(Attention {
            urgency,
            concern,
            vm: Some(vm.vm.clone()),
            message,
        })
    };
    // A VM only on the share (not in the inventory) is history: only its bad verdicts count.
    let listed = vm.in_inventory;
    match (&vm.last_backup, &vm.last_run) {
        (None, _) if listed => flag(
            Urgency::Critical,
            Concern::NoBackup,
            "never backed up".to_string(),
        ),
        _ => {}
    }
    if let (Some(run), true) = (&vm.last_run, listed) {
        if let Some(error) = &run.error {
            flag(
                Urgency::Critical,
                Concern::LastRunFailed,
                format!("the last run ({}) failed: {error}", run.stamp),
            );
        }
    }
    if let Some(c) = vm.booted.as_ref().filter(|c| !c.ok) {
        flag(
            Urgency::Critical,
            Concern::DrillFailed,
            format!("the restore drill of {} failed: {}", c.stamp, c.detail),
        );
    }
    if let Some(c) = vm.hashes_verified.as_ref().filter(|c| !c.ok) {
        flag(
            Urgency::Critical,
            Concern::VerifyFailed,
            format!("verify of {} found a fault: {}", c.stamp, c.detail),
        );
    }
    if let (Some(last), true) = (&vm.last_backup, listed) {
        if let Ok(t) = layout::parse_stamp(&last.stamp) {
            let days = (input.now - t).num_hours() as f64 / 24.0;
            if days > input.rules.stale_after_days as f64 {
                flag(
                    Urgency::Critical,
                    Concern::Stale,
                    format!("no backup for {days:.0} days (last {})", last.stamp),
                );
            }
        }
    }
    if let Some(c) = vm.image_checked.as_ref().filter(|c| !c.ok) {
        flag(
            Urgency::Warning,
            Concern::ImageCheckFailed,
            format!("post-checks of {}: {}", c.stamp, c.detail),
        );
    }
    if listed && !backups.is_empty() {
        if !backups
            .iter()
            .any(|b| b.verify.as_ref().is_some_and(|v| v.ok))
        {
            flag(
                Urgency::Warning,
                Concern::NotVerified,
                "no verified backup (`vm-backup verify`)".to_string(),
            );
        }
        if vm.booted.is_none() {
            flag(
                Urgency::Warning,
                Concern::NeverDrilled,
                "never booted in a restore drill (`vm-backup test-restore`)".to_string(),
            );
        }
    }
    out.sort_by_key(|a| (a.urgency, a.concern));
    out
}

/// Reads the catalog (kept in line with the share), the inventory and the target's space, and
/// builds the status.
pub fn collect(
    settings: &Settings,
    rules: Rules,
    now: DateTime<Local>,
) -> Result<Status, StatusError> {
    let catalog = Catalog::open(&settings.target)?;
    catalog.sync()?;
    let backups = catalog.backups(None)?;
    let failures = catalog.failures(None)?;
    let inventory = match Inventory::load(&settings.inventory) {
        Ok(inv) => Some(inv.vms.into_iter().map(|v| v.name).collect::<Vec<_>>()),
        Err(e) => {
            tracing::warn!(error = %e, "status without the inventory: only the VMs on the share");
            None
        }
    };
    let host = settings.host();
    Ok(build(Input {
        target: &settings.target,
        host: &host,
        inventory: inventory.as_deref(),
        backups: &backups,
        failures: &failures,
        usage: Usage::of(&settings.target),
        now,
        rules,
    }))
}

/// Writes the page for `status` to `path` atomically.
pub fn write_page(path: &Path, status: &Status) -> Result<(), StatusError> {
    crate::store::write_atomic(path, render_html(status).as_bytes()).map_err(|e| {
        StatusError::Write {
            path: path.to_path_buf(),
            source: e.into(),
        }
    })
}

/// The status page of a target: `<target>/metadata/status.html`.
pub fn page_path(target: &Path) -> PathBuf {
    target.join(METADATA_DIR).join(PAGE_FILE)
}

/// After a run or a drill: rewrites the status page beside the catalog. Best effort: a
/// problem is a warning, never a failed run.
pub fn refresh_page(settings: &Settings, progress: &dyn Progress) {
    let path = page_path(&settings.target);
    let result = collect(settings, Rules::default(), Local::now())
        .and_then(|status| write_page(&path, &status));
    if let Err(e) = result {
        let text = format!("status page not updated: {e}");
        tracing::warn!("{text}");
        progress.message(Level::Warning, &text);
    }
}

// ------------------------------------------------------------------------------------------
// Text

/// A date for people: `2026-11-29 03:12` (the input when it does not parse).
fn short_time(at: &str) -> String {
    match instant(at) {
        Some(t) => t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string(),
        None => at.to_string(),
    }
}

fn check_word(c: Option<&Check>) -> String {
    match c {
        Some(c) if c.ok => format!("ok {}", short_time(&c.at)),
        Some(c) => format!("FAILED {}", short_time(&c.at)),
        None => "never".to_string(),
    }
}

/// The status as text for a terminal.
pub fn render_text(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vm-backup status of {}", status.target);
    if let Some(u) = status.usage {
        let _ = writeln!(
            out,
            "target: {:.0} % used, {} free of {}",
            u.used_percent(),
            human_bytes(u.available_bytes),
            human_bytes(u.total_bytes)
        );
    }
    if status.attention.is_empty() {
        let _ = writeln!(out, "\nnothing needs attention");
    } else {
        let _ = writeln!(out, "\nneeds attention:");
        for a in &status.attention {
            let _ = writeln!(
                out,
                "  {:<8} {:<20} {}",
                match a.urgency {
                    Urgency::Critical => "CRITICAL",
                    Urgency::Warning => "warning",
                },
                a.vm.as_deref().unwrap_or("(target)"),
                a.message
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<18} {:<9} {:>10} {:>9} {:>8}  {:<22} {:<22} BOOTED IN DRILL",
        "VM",
        "LAST BACKUP",
        "RESULT",
        "SIZE",
        "DURATION",
        "FROZEN",
        "HASHES VERIFIED",
        "IMAGE CHECKED"
    );
    for v in &status.vms {
        let (stamp, result, size, duration, frozen) = match &v.last_backup {
            Some(b) => (
                b.stamp.clone(),
                v.last_run
                    .as_ref()
                    .map_or(b.result.clone(), |r| r.result.clone()),
                human_bytes(b.total_bytes),
                format!("{:.1}s", b.duration_seconds),
                b.frozen_ms
                    .map_or("-".to_string(), |f| format!("{f:.0} ms")),
            ),
            None => (
                "never".to_string(),
                v.last_run
                    .as_ref()
                    .map_or("-".to_string(), |r| r.result.clone()),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<18} {:<9} {:>10} {:>9} {:>8}  {:<22} {:<22} {}",
            v.vm,
            stamp,
            result,
            size,
            duration,
            frozen,
            check_word(v.hashes_verified.as_ref()),
            check_word(v.image_checked.as_ref()),
            check_word(v.booted.as_ref()),
        );
    }
    out
}

// ------------------------------------------------------------------------------------------
// HTML

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
:root{--ink:#1d2330;--soft:#5b6475;--line:#e3e6ec;--bg:#f5f6f8;--card:#fff;--ok:#1f8a4c;--okbg:#e5f5ec;--warn:#a86400;--warnbg:#fff3dc;--bad:#c0262d;--badbg:#fde8e8;--accent:#2f6fde}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:var(--ink);color:#fff;padding:18px 28px;display:flex;flex-wrap:wrap;gap:8px 32px;align-items:baseline}
header h1{font-size:20px;margin:0;font-weight:600}
header .meta{color:#c8cdd8;font-size:13px}
main{padding:20px 28px 40px;max-width:1320px}
h2{font-size:15px;text-transform:uppercase;letter-spacing:.04em;color:var(--soft);margin:24px 0 10px}
.usage{display:flex;align-items:center;gap:12px;margin-top:4px}
.bar{width:220px;height:10px;border-radius:5px;background:#3a4252;overflow:hidden}
.bar span{display:block;height:100%;background:var(--ok)}
.bar.warning span{background:#e0a030}.bar.critical span{background:#e0484e}
ul.attention{list-style:none;margin:0;padding:0;display:grid;gap:6px}
ul.attention li{background:var(--card);border-left:5px solid var(--warn);padding:8px 12px;border-radius:4px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
ul.attention li.critical{border-color:var(--bad)}
ul.attention li b{margin-right:8px}
.tag{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;padding:1px 6px;border-radius:3px;margin-right:8px}
.tag.critical{background:var(--badbg);color:var(--bad)}.tag.warning{background:var(--warnbg);color:var(--warn)}
.calm{background:var(--okbg);color:var(--ok);padding:10px 14px;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:14px}
section.vm{background:var(--card);border-radius:6px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08);border-top:4px solid var(--ok)}
section.vm.warning{border-top-color:#e0a030}section.vm.critical{border-top-color:var(--bad)}
section.vm h3{margin:0;font-size:17px;display:flex;justify-content:space-between;align-items:baseline}
section.vm h3 small{font-weight:400;color:var(--soft);font-size:12px}
.facts{display:grid;grid-template-columns:auto 1fr;gap:2px 12px;margin:10px 0;font-size:13px}
.facts dt{color:var(--soft)}.facts dd{margin:0}
.verdicts{display:flex;gap:6px;flex-wrap:wrap;margin:8px 0}
.verdict{flex:1 1 0;min-width:110px;border-radius:4px;padding:6px 8px;font-size:12px;background:#eef0f4;color:var(--soft)}
.verdict b{display:block;font-size:13px}
.verdict.ok{background:var(--okbg);color:var(--ok)}.verdict.failed{background:var(--badbg);color:var(--bad)}
.charts{display:flex;gap:12px;flex-wrap:wrap}
figure{margin:0;flex:1 1 170px}
figcaption{font-size:11px;color:var(--soft);display:flex;justify-content:space-between}
svg.chart{width:100%;height:54px;display:block}
.issues{margin:8px 0 0;padding-left:18px;font-size:12.5px}
.issues li.critical{color:var(--bad)}.issues li.warning{color:var(--warn)}
.muted{color:var(--soft)}
footer{color:var(--soft);font-size:12px;padding:0 28px 24px}
"#;

fn urgency_class(u: Option<Urgency>) -> &'static str {
    match u {
        Some(Urgency::Critical) => "critical",
        Some(Urgency::Warning) => "warning",
        None => "ok",
    }
}

/// A small line chart of `values` (oldest first) as inline SVG; warning points are drawn red.
fn chart(values: &[(f64, bool)], label: &str) -> String {
    const W: f64 = 200.0;
    const H: f64 = 54.0;
    const PAD: f64 = 5.0;
    if values.is_empty() {
        return format!(
            "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{} (no data)\"></svg>",
            esc(label)
        );
    }
    let max = values.iter().map(|v| v.0).fold(0.0_f64, f64::max).max(1e-9);
    let n = values.len();
    let x = |i: usize| {
        if n == 1 {
            W / 2.0
        } else {
            PAD + (W - 2.0 * PAD) * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * (v / max);
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(v.0)))
        .collect();
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
    let _ = write!(
        svg,
        "<line x1=\"0\" y1=\"{b:.1}\" x2=\"{W}\" y2=\"{b:.1}\" stroke=\"#e3e6ec\"/>",
        b = H - PAD
    );
    if n > 1 {
        let _ = write!(
            svg,
            "<polygon points=\"{:.1},{:.1} {} {:.1},{:.1}\" fill=\"#2f6fde\" fill-opacity=\"0.10\"/>",
            x(0),
            H - PAD,
            points.join(" "),
            x(n - 1),
            H - PAD
        );
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#2f6fde\" stroke-width=\"1.6\" vector-effect=\"non-scaling-stroke\"/>",
            points.join(" ")
        );
    }
    for (i, v) in values.iter().enumerate() {
        if v.1 || i + 1 == n {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.6\" fill=\"{}\"/>",
                x(i),
                y(v.0),
                if v.1 { "#c0262d" } else { "#2f6fde" }
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

fn verdict_box(title: &str, check: Option<&Check>) -> String {
    let (class, word, when) = match check {
        Some(c) if c.ok => ("ok", "passed", short_time(&c.at)),
        Some(c) => ("failed", "FAILED", short_time(&c.at)),
        None => ("none", "never", String::new()),
    };
    let tip = check.map_or(String::new(), |c| format!("{}: {}", c.stamp, c.detail));
    format!(
        "<div class=\"verdict {class}\" title=\"{}\" data-check=\"{}\">{}<b>{word}</b>{}</div>",
        esc(&tip),
        esc(&title.to_lowercase().replace(' ', "-")),
        esc(title),
        esc(&when)
    )
}

/// The status as one self-contained HTML page.
pub fn render_html(status: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <title>vm-backup status</title><style>{CSS}</style></head><body>\n"
    );
    let _ = write!(
        h,
        "<header><h1>vm-backup status</h1><span class=\"meta\">{} VMs · target {} · generated {}</span>",
        status.vms.len(),
        esc(&status.target),
        esc(&short_time(&status.generated_at))
    );
    if let Some(u) = status.usage {
        let used = u.used_percent();
        let class = if used >= status.rules.target_critical_percent {
            "critical"
        } else if used >= status.rules.target_warn_percent {
            "warning"
        } else {
            "ok"
        };
        let _ = write!(
            h,
            "<span class=\"usage meta\" id=\"target-usage\"><span class=\"bar {class}\"><span style=\"width:{:.0}%\"></span></span>{used:.0} % used · {} free of {}</span>",
            used.clamp(0.0, 100.0),
            human_bytes(u.available_bytes),
            human_bytes(u.total_bytes)
        );
    }
    h.push_str("</header>\n<main>\n<h2>Needs attention</h2>\n");
    if status.attention.is_empty() {
        h.push_str("<p class=\"calm\" id=\"attention\">Nothing needs attention.</p>\n");
    } else {
        h.push_str("<ul class=\"attention\" id=\"attention\">\n");
        for a in &status.attention {
            let u = urgency_class(Some(a.urgency));
            let concern = serde_json::to_value(a.concern)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                h,
                "<li class=\"{u}\" data-vm=\"{}\" data-concern=\"{}\"><span class=\"tag {u}\">{u}</span><b>{}</b>{}</li>",
                esc(a.vm.as_deref().unwrap_or("")),
                esc(&concern),
                esc(a.vm.as_deref().unwrap_or("target")),
                esc(&a.message)
            );
        }
        h.push_str("</ul>\n");
    }
    h.push_str("<h2>Virtual machines</h2>\n<div class=\"grid\" id=\"vms\">\n");
    for v in &status.vms {
        let class = urgency_class(v.worst());
        let _ = write!(
            h,
            "<section class=\"vm {class}\" data-vm=\"{}\" data-host=\"{}\" data-level=\"{class}\"><h3>{}<small>{}{}</small></h3>",
            esc(&v.vm),
            esc(&v.host),
            esc(&v.vm),
            esc(&v.host),
            if v.in_inventory { "" } else { " · not in the inventory" }
        );
        h.push_str("<dl class=\"facts\">");
        match (&v.last_backup, &v.last_run) {
            (Some(b), run) => {
                let result = run
                    .as_ref()
                    .map_or(b.result.as_str(), |r| r.result.as_str());
                let _ = write!(
                    h,
                    "<dt>last backup</dt><dd>{} ({}, {})</dd><dt>last run</dt><dd>{}</dd>\
                     <dt>size</dt><dd>{}</dd><dt>duration</dt><dd>{:.1} s · {}</dd>\
                     <dt>frozen</dt><dd>{}</dd><dt>backups kept</dt><dd>{}</dd>",
                    esc(&b.stamp),
                    esc(&b.method),
                    esc(&b.result),
                    esc(result),
                    human_bytes(b.total_bytes),
                    b.duration_seconds,
                    human_rate(b.bytes_per_sec),
                    b.frozen_ms
                        .map_or("–".to_string(), |f| format!("{f:.0} ms")),
                    v.backups
                );
            }
            (None, run) => {
                let _ = write!(
                    h,
                    "<dt>last backup</dt><dd class=\"muted\">never</dd><dt>last run</dt><dd>{}</dd>",
                    esc(run.as_ref().map_or("never", |r| r.result.as_str()))
                );
            }
        }
        h.push_str("</dl><div class=\"verdicts\">");
        h.push_str(&verdict_box("Hashes verified", v.hashes_verified.as_ref()));
        h.push_str(&verdict_box("Image checked", v.image_checked.as_ref()));
        h.push_str(&verdict_box("Booted in drill", v.booted.as_ref()));
        h.push_str("</div>");
        if !v.history.is_empty() {
            let sizes: Vec<(f64, bool)> = v
                .history
                .iter()
                .map(|p| (p.total_bytes as f64, p.warning))
                .collect();
            let durations: Vec<(f64, bool)> = v
                .history
                .iter()
                .map(|p| (p.duration_seconds, p.warning))
                .collect();
            let max_size = v.history.iter().map(|p| p.total_bytes).max().unwrap_or(0);
            let max_secs = v
                .history
                .iter()
                .map(|p| p.duration_seconds)
                .fold(0.0_f64, f64::max);
            let _ = write!(
                h,
                "<div class=\"charts\"><figure>{}<figcaption><span>size, {} backups</span><span>max {}</span></figcaption></figure>\
                 <figure>{}<figcaption><span>duration</span><span>max {:.1} s</span></figcaption></figure></div>",
                chart(&sizes, &format!("size of the last {} backups of {}", sizes.len(), v.vm)),
                v.history.len(),
                human_bytes(max_size),
                chart(&durations, &format!("duration of the last {} backups of {}", durations.len(), v.vm)),
                max_secs
            );
        }
        if !v.attention.is_empty() {
            h.push_str("<ul class=\"issues\">");
            for a in &v.attention {
                let _ = write!(
                    h,
                    "<li class=\"{}\">{}</li>",
                    urgency_class(Some(a.urgency)),
                    esc(&a.message)
                );
            }
            h.push_str("</ul>");
        }
        h.push_str("</section>\n");
    }
    h.push_str("</div>\n</main>\n");
    let _ = write!(
        h,
        "<footer>vm-backup {} · a backup is flagged after {} days without a new one · the target from {:.0} % used · \
         `vm-backup status` prints the same, `--json` for machines</footer>\n</body></html>\n",
        esc(env!("CARGO_PKG_VERSION")),
        status.rules.stale_after_days,
        status.rules.target_warn_percent
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn chart_of_one_point_is_centred_and_of_none_is_empty() {
        assert!(chart(&[], "x").contains("no data"));
        let one = chart(&[(5.0, false)], "x");
        assert!(one.contains("cx=\"100.0\""), "{one}");
        let bad = chart(&[(5.0, true), (6.0, false)], "x");
        assert!(bad.contains("#c0262d"), "{bad}");
    }

    #[test]
    fn usage_percent() {
        // 10 bytes reserved for root: df says 180 / (180 + 10).
        let u = Usage {
            total_bytes: 200,
            used_bytes: 180,
            available_bytes: 10,
        };
        assert!((u.used_percent() - 100.0 * 180.0 / 190.0).abs() < 1e-9);
        assert_eq!(
            Usage {
                total_bytes: 0,
                used_bytes: 0,
                available_bytes: 0
            }
            .used_percent(),
            0.0
        );
    }
}
