//! Retention: which backups of a VM to keep and which to remove.
//!
//! The heart of this module is [`plan`], a pure function from a list of backups (with what is
//! known about each) and a [`Retention`] policy to a decision per backup with its reasons. It
//! touches no file, so it is tested with tables over a year of synthetic stamps. [`scan_vm`]
//! gathers the input from the target and [`apply`] carries a plan out.
//!
//! ## The rules
//!
//! - `keep_last: N` keeps the N newest usable backups.
//! - `keep_daily/weekly/monthly/yearly: N` keep the newest usable backup of each of the N most
//!   recent days / ISO weeks / months / years that have one (grandfather-father-son). Each rule
//!   is applied on its own and a backup kept by several rules lists every reason.
//! - A policy with no rule at all keeps everything: no retention configured means no pruning.
//!
//! Whatever the policy says, these are never removed:
//! - the newest backup whose `verify` verdict passed, and the newest usable backup;
//! - a `.partial` folder (a backup being written, or left by a crash: cleaning those up is the
//!   job of `vm-backup orphans`, which knows whether a backup is still running);
//! - a backup whose metadata cannot be read (it is reported, not judged);
//! - anything at all of a VM whose latest run failed (or whose newest backup failed
//!   verification or a test restore): while backups are failing, the old ones are all there is.
//!
//! A usable backup is a published folder whose metadata reads, whose result is success or
//! warning, and whose verification and test restore (when they ran) did not fail. Backups that
//! failed verification or a test restore count for no rule and are removed unless protected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDateTime};
use serde::Serialize;

use crate::config::Retention;
use crate::format::layout::{self, VmDir, STAMP_FORMAT};
use crate::format::metadata::BackupMetadata;
use crate::ExitStatus;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The layout on the target is invalid or unreadable.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// Removing a backup folder failed.
    #[error(transparent)]
    Remove(#[from] crate::store::StoreError),
}

/// What is known about one backup folder of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "detail")]
pub enum BackupState {
    /// A `.partial` folder: being written, or left by a crash.
    InProgress,
    /// A whole backup that can be restored from.
    Usable {
        /// Whether `verify` passed on it (false: never verified).
        verified: bool,
    },
    /// A whole backup known to be bad (failed result, verification or test restore).
    Failed(String),
    /// A folder whose metadata could not be read.
    Unreadable(String),
}

/// One backup folder, as input to [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// The stamp (folder name without `.partial`).
    pub stamp: String,
    /// The stamp as a local date and time.
    #[serde(skip)]
    pub time: NaiveDateTime,
    /// What is known about it.
    pub state: BackupState,
    /// The backup it was written on top of (incremental, differential): its disk images
    /// are the backing files of this one's, so it is kept as long as this one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl Candidate {
    /// A candidate from a stamp; `None` when the stamp does not parse.
    pub fn new(stamp: &str, state: BackupState) -> Option<Self> {
        let time = NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT).ok()?;
        Some(Self {
            stamp: stamp.to_string(),
            time,
            state,
            parent: None,
        })
    }

    /// The same candidate, written on top of the backup `parent`.
    pub fn with_parent(mut self, parent: Option<String>) -> Self {
        self.parent = parent;
        self
    }
}

/// The decision about one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The stamp.
    pub stamp: String,
    /// Whether it is a `.partial` folder.
    pub partial: bool,
    /// Keep it (true) or remove it (false).
    pub keep: bool,
    /// Why, in words (at least one).
    pub reasons: Vec<String>,
}

/// Decides, for every backup of one VM, whether to keep it and why. Pure: no I/O.
///
/// `latest_run_failure` is the error of the VM's latest run when that run failed (from the
/// catalog); then everything is kept. The result is sorted by stamp, oldest first.
pub fn plan(
    candidates: &[Candidate],
    retention: &Retention,
    latest_run_failure: Option<&str>,
) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| a.time.cmp(&b.time).then(a.stamp.cmp(&b.stamp)));
    let mut reasons: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut add = |i: usize, why: String| reasons.entry(i).or_default().push(why);

    // Protections that hold whatever the policy says.
    for (i, c) in sorted.iter().enumerate() {
        match &c.state {
            BackupState::InProgress => add(i, "in progress (.partial: left to `orphans`)".into()),
            BackupState::Unreadable(why) => add(i, format!("metadata unreadable ({why})")),
            _ => {}
        }
    }
    let newest_whole = sorted
        .iter()
        .rposition(|c| !matches!(c.state, BackupState::InProgress));
    let newest_whole_failed = newest_whole.and_then(|i| match &sorted[i].state {
        BackupState::Failed(why) => Some(why.clone()),
        _ => None,
    });
    let keep_all = match (latest_run_failure, newest_whole_failed) {
        (Some(err), _) => Some(format!("latest run failed ({err}): keeping everything")),
        (None, Some(why)) => Some(format!("newest backup failed ({why}): keeping everything")),
        (None, None) => None,
    };
    let no_policy = retention.keep_last.is_none()
        && retention.keep_daily.is_none()
        && retention.keep_weekly.is_none()
        && retention.keep_monthly.is_none()
        && retention.keep_yearly.is_none();

    let usable: Vec<usize> = (0..sorted.len())
        .filter(|&i| matches!(sorted[i].state, BackupState::Usable { .. }))
        .collect();
    if let Some(&i) = usable.last() {
        add(i, "newest usable backup".into());
    }
    if let Some(&i) = usable
        .iter()
        .rev()
        .find(|&&i| matches!(sorted[i].state, BackupState::Usable { verified: true }))
    {
        add(i, "newest verified backup".into());
    }

    // Chains: a backup's chain is named by its oldest member found (the full it stands on).
    let index: BTreeMap<&str, usize> = sorted
        .iter()
        .enumerate()
        .map(|(i, c)| (c.stamp.as_str(), i))
        .collect();
    let root: Vec<usize> = (0..sorted.len())
        .map(|i| {
            let mut r = i;
            for _ in 0..sorted.len() {
                match sorted[r].parent.as_deref().and_then(|p| index.get(p)) {
                    Some(&j) if j != r => r = j,
                    _ => break,
                }
            }
            r
        })
        .collect();

    // keep-last counts chains: the newest usable point of each of the N newest chains.
    if let Some(n) = retention.keep_last {
        let mut chains = BTreeSet::new();
        for &i in usable.iter().rev() {
            if chains.len() >= n as usize {
                break;
            }
            if chains.insert(root[i]) {
                let why = if root[i] == i {
                    format!("keep-last {}/{n}", chains.len())
                } else {
                    format!(
                        "keep-last {}/{n} (chain of {})",
                        chains.len(),
                        sorted[root[i]].stamp
                    )
                };
                add(i, why);
            }
        }
    }
    type PeriodKey = fn(&NaiveDateTime) -> String;
    let rules: [(&str, Option<u32>, PeriodKey); 4] = [
        ("daily", retention.keep_daily, |t| {
            t.format("%Y-%m-%d").to_string()
        }),
        ("weekly", retention.keep_weekly, |t| {
            let w = t.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", retention.keep_monthly, |t| {
            t.format("%Y-%m").to_string()
        }),
        ("yearly", retention.keep_yearly, |t| {
            t.format("%Y").to_string()
        }),
    ];
    for (name, keep, key) in rules {
        let Some(n) = keep else { continue };
        let mut periods = BTreeSet::new();
        for &i in usable.iter().rev() {
            if periods.len() >= n as usize {
                break;
            }
            let period = key(&sorted[i].time);
            if periods.insert(period.clone()) {
                add(i, format!("keep-{name} {period}"));
            }
        }
    }

    // Chains stay whole: a kept backup keeps its parent, that one its own, down to the full…
    let mut todo: Vec<usize> = reasons.keys().copied().collect();
    while let Some(i) = todo.pop() {
        let Some(p) = sorted[i].parent.as_deref() else {
            continue;
        };
        let Some(&j) = index.get(p) else { continue };
        let why = format!("parent of kept {}", sorted[i].stamp);
        let first = !reasons.contains_key(&j);
        reasons.entry(j).or_default().push(why);
        if first {
            todo.push(j);
        }
    }
    // …and a chain is removed whole or not at all: every member of a chain with a kept
    // member is kept (a later increment on a kept full stays with it).
    // (each chain named by its newest kept member)
    let kept_chains: BTreeMap<usize, usize> = reasons.keys().map(|&i| (root[i], i)).collect();
    for (i, r) in root.iter().enumerate() {
        if reasons.contains_key(&i) {
            continue;
        }
        if let Some(&k) = kept_chains.get(r) {
            let why = format!("same chain as kept {}", sorted[k].stamp);
            reasons.entry(i).or_default().push(why);
        }
    }

    sorted
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let partial = matches!(c.state, BackupState::InProgress);
            match reasons.remove(&i) {
                Some(why) => Decision {
                    stamp: c.stamp.clone(),
                    partial,
                    keep: true,
                    reasons: why,
                },
                None if keep_all.is_some() || no_policy => Decision {
                    stamp: c.stamp.clone(),
                    partial,
                    keep: true,
                    reasons: vec![keep_all
                        .clone()
                        .unwrap_or_else(|| "no retention configured: keeping everything".into())],
                },
                None => Decision {
                    stamp: c.stamp.clone(),
                    partial,
                    keep: false,
                    reasons: vec![match &c.state {
                        BackupState::Failed(why) => format!("failed ({why}), not protected"),
                        _ => "matched no retention rule".into(),
                    }],
                },
            }
        })
        .collect()
}

/// The state of a whole backup folder, from its metadata.
pub fn state_of(dir: &Path) -> BackupState {
    match BackupMetadata::read(dir) {
        Err(e) => BackupState::Unreadable(e.to_string()),
        Ok(meta) => state_from_metadata(&meta),
    }
}

/// The state of a whole backup, from its metadata record.
pub fn state_from_metadata(meta: &BackupMetadata) -> BackupState {
    if !matches!(meta.result, ExitStatus::Success | ExitStatus::Warning) {
        return BackupState::Failed(format!("result: {}", meta.result));
    }
    if let Some(w) = meta.warnings.iter().find(|w| is_data_post_check_warning(w)) {
        return BackupState::Failed(format!("published with a failed post-check: {w}"));
    }
    if let Some(v) = meta.verify.as_ref().filter(|v| !v.ok) {
        return BackupState::Failed(format!("verify failed: {}", v.detail));
    }
    if let Some(v) = meta.test_restore.as_ref().filter(|v| !v.ok) {
        return BackupState::Failed(format!("test restore failed: {}", v.detail));
    }
    BackupState::Usable {
        verified: meta.verify.as_ref().is_some_and(|v| v.ok),
    }
}

/// Whether a warning of the metadata is a failed post-check of the copied data. Backups
/// written before post-checks ran on the `.partial` folder were published with these as
/// warnings (exit 3); today such a copy is never published. The domain's own post-check
/// (`post-check: disk vda runs on …`, a block job left) says nothing about the data.
fn is_data_post_check_warning(w: &str) -> bool {
    w.strip_prefix("post-check: ")
        .is_some_and(|rest| !rest.starts_with("disk ") && !rest.contains("block job"))
}

/// Reads the backups of one VM folder (whole and `.partial`) as input to [`plan`].
///
/// A backup whose metadata names a VM that does not belong in this folder (its name does not
/// sanitise to the folder's name: a backup of another VM, written before names were made
/// injective) is left out: never counted, never removed.
pub fn scan_vm(vm_dir: &VmDir) -> Result<Vec<Candidate>, PruneError> {
    let folder = vm_dir
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for stamp in vm_dir.complete_stamps()? {
        let dir = vm_dir.backup_dir(&stamp);
        let meta = BackupMetadata::read(&dir);
        let parent = meta.as_ref().ok().and_then(|m| m.chain.parent.clone());
        let state = match meta {
            Err(e) => BackupState::Unreadable(e.to_string()),
            Ok(meta) if layout::safe_component(&meta.vm_name).ok().as_deref() != Some(&folder) => {
                tracing::warn!(
                    path = %dir.display(),
                    vm = %meta.vm_name,
                    "backup of another VM in this folder: left alone by prune"
                );
                continue;
            }
            Ok(meta) => state_from_metadata(&meta),
        };
        if let Some(c) = Candidate::new(&stamp, state) {
            out.push(c.with_parent(parent));
        }
    }
    for partial in vm_dir.partial_dirs()? {
        let name = partial
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stamp = name.trim_end_matches(layout::PARTIAL_SUFFIX);
        if let Some(c) = Candidate::new(stamp, BackupState::InProgress) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Removes the backups a plan marks for removal; returns the folders removed. `.partial`
/// folders are never removed here, whatever the plan says.
pub fn apply(vm_dir: &VmDir, decisions: &[Decision]) -> Result<Vec<PathBuf>, PruneError> {
    let mut removed = Vec::new();
    for d in decisions.iter().filter(|d| !d.keep && !d.partial) {
        // Renamed first by the store, so that a folder half-removed by a crash is never
        // taken for a backup.
        let path = crate::store::delete_backup(vm_dir, &d.stamp)?;
        tracing::info!(path = %path.display(), "pruned backup");
        removed.push(path);
    }
    Ok(removed)
}

impl PruneError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            PruneError::Layout(e) => e.kind(),
            PruneError::Remove(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, NaiveDate};

    fn usable(stamp: &str) -> Candidate {
        Candidate::new(stamp, BackupState::Usable { verified: false }).unwrap()
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.stamp.as_str())
            .collect()
    }

    /// One backup a day at 12:00 from 2025-11-23 to 2026-11-22 (a Sunday): 365 stamps.
    fn year_of_dailies() -> Vec<Candidate> {
        let first = NaiveDate::from_ymd_opt(2025, 11, 23).unwrap();
        (0..365)
            .map(|d| {
                let day = first + Duration::days(d);
                usable(&format!("{}-120000", day.format("%Y-%m-%d")))
            })
            .collect()
    }

    fn policy(last: u32, daily: u32, weekly: u32, monthly: u32, yearly: u32) -> Retention {
        let opt = |n: u32| (n > 0).then_some(n);
        Retention {
            keep_last: opt(last),
            keep_daily: opt(daily),
            keep_weekly: opt(weekly),
            keep_monthly: opt(monthly),
            keep_yearly: opt(yearly),
        }
    }

    /// (stamp, parent) → a usable candidate on top of that parent.
    fn chained(stamp: &str, parent: Option<&str>) -> Candidate {
        usable(stamp).with_parent(parent.map(String::from))
    }

    #[test]
    fn chains_stay_whole() {
        // F1 ← I1 ← I2   F2 ← D1 (differential on F2)   F3 ← I3
        let list = [
            chained("2026-01-01-120000", None),
            chained("2026-01-02-120000", Some("2026-01-01-120000")),
            chained("2026-01-03-120000", Some("2026-01-02-120000")),
            chained("2026-01-04-120000", None),
            chained("2026-01-05-120000", Some("2026-01-04-120000")),
            chained("2026-01-06-120000", None),
            chained("2026-01-07-120000", Some("2026-01-06-120000")),
        ];
        let table: [(Retention, Vec<&str>); 4] = [
            // keep-last 1: the newest incremental and its full.
            (
                policy(1, 0, 0, 0, 0),
                vec!["2026-01-06-120000", "2026-01-07-120000"],
            ),
            // keep-last 2 counts chains: F3's and F2's (with its differential), whole.
            (
                policy(2, 0, 0, 0, 0),
                vec![
                    "2026-01-04-120000",
                    "2026-01-05-120000",
                    "2026-01-06-120000",
                    "2026-01-07-120000",
                ],
            ),
            // keep-daily 5 reaches back to I2 (2026-01-03): its whole chain comes along.
            (
                policy(0, 5, 0, 0, 0),
                vec![
                    "2026-01-01-120000",
                    "2026-01-02-120000",
                    "2026-01-03-120000",
                    "2026-01-04-120000",
                    "2026-01-05-120000",
                    "2026-01-06-120000",
                    "2026-01-07-120000",
                ],
            ),
            // keep-daily 3: D1 and its full F2, F3 and I3; F1's chain goes.
            (
                policy(0, 3, 0, 0, 0),
                vec![
                    "2026-01-04-120000",
                    "2026-01-05-120000",
                    "2026-01-06-120000",
                    "2026-01-07-120000",
                ],
            ),
        ];
        for (retention, want) in table {
            let d = plan(&list, &retention, None);
            assert_eq!(kept(&d), want, "{retention:?}");
            for dec in &d {
                if dec.keep {
                    if let Some(p) = list
                        .iter()
                        .find(|c| c.stamp == dec.stamp)
                        .and_then(|c| c.parent.as_deref())
                    {
                        assert!(
                            kept(&d).contains(&p),
                            "{} kept without its parent {p}",
                            dec.stamp
                        );
                    }
                }
            }
        }
        // The reason names the child.
        let d = plan(&list, &policy(1, 0, 0, 0, 0), None);
        let f3 = d.iter().find(|d| d.stamp == "2026-01-06-120000").unwrap();
        assert!(
            f3.reasons
                .iter()
                .any(|r| r == "parent of kept 2026-01-07-120000"),
            "{:?}",
            f3.reasons
        );
    }

    #[test]
    fn a_chain_is_removed_whole_or_not_at_all() {
        // F1 ← I1 ← I2 ← I3 (days 1–4), F2 ← I4 (days 5–6).
        let list = [
            chained("2026-01-01-120000", None),
            chained("2026-01-02-120000", Some("2026-01-01-120000")),
            chained("2026-01-03-120000", Some("2026-01-02-120000")),
            chained("2026-01-04-120000", Some("2026-01-03-120000")),
            chained("2026-01-05-120000", None),
            chained("2026-01-06-120000", Some("2026-01-05-120000")),
        ];
        // (policy, kept): a rule keeping any point of F1's chain keeps all of it.
        let table: [(Retention, Vec<&str>); 4] = [
            (
                policy(1, 0, 0, 0, 0),
                vec!["2026-01-05-120000", "2026-01-06-120000"],
            ),
            (
                policy(2, 0, 0, 0, 0),
                list.iter().map(|c| c.stamp.as_str()).collect(),
            ),
            // keep-daily 3: days 4–6; day 4 is I3, so F1…I3 all stay.
            (
                policy(0, 3, 0, 0, 0),
                list.iter().map(|c| c.stamp.as_str()).collect(),
            ),
            // keep-daily 2: days 5–6, F2's chain only.
            (
                policy(0, 2, 0, 0, 0),
                vec!["2026-01-05-120000", "2026-01-06-120000"],
            ),
        ];
        for (retention, want) in table {
            let d = plan(&list, &retention, None);
            assert_eq!(kept(&d), want, "{retention:?}");
        }
        // A full kept by a rule keeps its later increments (reason named), not only parents.
        let d = plan(&list[..4], &policy(0, 0, 0, 0, 0), None);
        assert!(d.iter().all(|d| d.keep));
        let yearly_on_full = [
            chained("2025-12-31-120000", None),
            chained("2026-01-01-120000", Some("2025-12-31-120000")),
            chained("2026-01-02-120000", None),
        ];
        let d = plan(&yearly_on_full, &policy(1, 0, 0, 0, 2), None);
        let i = d.iter().find(|d| d.stamp == "2026-01-01-120000").unwrap();
        assert!(i.keep, "{d:?}");
        assert!(
            i.reasons
                .iter()
                .any(|r| r == "same chain as kept 2025-12-31-120000")
                || i.reasons.iter().any(|r| r.starts_with("keep-yearly")),
            "{:?}",
            i.reasons
        );
    }

    #[test]
    fn gfs_over_a_year_of_dailies() {
        let year = year_of_dailies();
        assert_eq!(year.last().unwrap().stamp, "2026-11-22-120000");
        // (policy, the stamps kept, newest first) — worked out by hand from the calendar:
        // 2026-11-22 is a Sunday, so every Sunday ends an ISO week.
        let table: Vec<(Retention, Vec<&str>)> = vec![
            (
                policy(3, 0, 0, 0, 0),
                vec!["2026-11-22", "2026-11-21", "2026-11-20"],
            ),
            (
                policy(0, 7, 0, 0, 0),
                vec![
                    "2026-11-22",
                    "2026-11-21",
                    "2026-11-20",
                    "2026-11-19",
                    "2026-11-18",
                    "2026-11-17",
                    "2026-11-16",
                ],
            ),
            (
                policy(0, 0, 4, 0, 0),
                vec!["2026-11-22", "2026-11-15", "2026-11-08", "2026-11-01"],
            ),
            (
                policy(0, 0, 0, 6, 0),
                vec![
                    "2026-11-22",
                    "2026-10-31",
                    "2026-09-30",
                    "2026-08-31",
                    "2026-07-31",
                    "2026-06-30",
                ],
            ),
            (policy(0, 0, 0, 0, 3), vec!["2026-11-22", "2025-12-31"]),
            // All together: 7 dailies, then Sundays 11-15, 11-08, 11-01 (11-22 is already a daily),
            // month ends back to 2026-01 (12 months: 2026-11 … 2025-12), and the year 2025.
            (
                policy(2, 7, 4, 12, 2),
                vec![
                    "2026-11-22",
                    "2026-11-21",
                    "2026-11-20",
                    "2026-11-19",
                    "2026-11-18",
                    "2026-11-17",
                    "2026-11-16",
                    "2026-11-15",
                    "2026-11-08",
                    "2026-11-01",
                    "2026-10-31",
                    "2026-09-30",
                    "2026-08-31",
                    "2026-07-31",
                    "2026-06-30",
                    "2026-05-31",
                    "2026-04-30",
                    "2026-03-31",
                    "2026-02-28",
                    "2026-01-31",
                    "2025-12-31",
                ],
            ),
        ];
        for (retention, want) in table {
            let decisions = plan(&year, &retention, None);
            assert_eq!(decisions.len(), 365);
            let mut got: Vec<String> = kept(&decisions)
                .into_iter()
                .map(|s| s[..10].to_string())
                .collect();
            got.reverse();
            assert_eq!(got, want, "policy {retention:?}");
            for d in &decisions {
                assert!(!d.reasons.is_empty(), "{d:?}");
            }
        }
    }

    #[test]
    fn several_backups_a_day_keep_the_newest_of_the_day() {
        let c = vec![
            usable("2026-11-20-010000"),
            usable("2026-11-20-230000"),
            usable("2026-11-21-010000"),
            usable("2026-11-21-130000"),
        ];
        let d = plan(&c, &policy(0, 2, 0, 0, 0), None);
        assert_eq!(kept(&d), vec!["2026-11-20-230000", "2026-11-21-130000"]);
        let why = &d
            .iter()
            .find(|d| d.stamp == "2026-11-20-230000")
            .unwrap()
            .reasons;
        assert_eq!(why, &vec!["keep-daily 2026-11-20".to_string()]);
    }

    #[test]
    fn reasons_accumulate_and_removals_say_why() {
        let c = vec![usable("2026-11-01-120000"), usable("2026-11-22-120000")];
        let d = plan(&c, &policy(1, 1, 0, 0, 0), None);
        assert_eq!(
            d[1].reasons,
            vec![
                "newest usable backup".to_string(),
                "keep-last 1/1".into(),
                "keep-daily 2026-11-22".into()
            ]
        );
        assert!(!d[0].keep);
        assert_eq!(d[0].reasons, vec!["matched no retention rule".to_string()]);
    }

    #[test]
    fn no_policy_keeps_everything() {
        let d = plan(&year_of_dailies(), &Retention::default(), None);
        assert!(d.iter().all(|d| d.keep));
    }

    #[test]
    fn the_newest_verified_backup_survives_any_policy() {
        let mut c = vec![
            Candidate::new("2026-11-01-120000", BackupState::Usable { verified: true }).unwrap(),
            usable("2026-11-08-120000"),
            usable("2026-11-15-120000"),
            usable("2026-11-22-120000"),
        ];
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert_eq!(kept(&d), vec!["2026-11-01-120000", "2026-11-22-120000"]);
        assert!(d[0].reasons.contains(&"newest verified backup".to_string()));
        // A newer verified one takes over the protection.
        c[2].state = BackupState::Usable { verified: true };
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert_eq!(kept(&d), vec!["2026-11-15-120000", "2026-11-22-120000"]);
    }

    #[test]
    fn partial_folders_are_never_removed_and_count_for_nothing() {
        let c = vec![
            usable("2026-11-20-120000"),
            usable("2026-11-21-120000"),
            Candidate::new("2026-11-22-120000", BackupState::InProgress).unwrap(),
        ];
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert_eq!(kept(&d), vec!["2026-11-21-120000", "2026-11-22-120000"]);
        assert!(d[2].partial && d[2].reasons[0].contains("in progress"));
    }

    #[test]
    fn a_failed_latest_run_keeps_everything() {
        let c = year_of_dailies();
        let d = plan(&c, &policy(1, 0, 0, 0, 0), Some("copy failed: EIO"));
        assert!(d.iter().all(|d| d.keep));
        assert!(d[0].reasons[0].contains("latest run failed (copy failed: EIO)"));
    }

    #[test]
    fn a_failed_newest_backup_keeps_everything_but_older_failures_go() {
        let mut c = vec![
            usable("2026-11-01-120000"),
            Candidate::new("2026-11-08-120000", BackupState::Failed("verify".into())).unwrap(),
            usable("2026-11-15-120000"),
            usable("2026-11-22-120000"),
        ];
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert_eq!(kept(&d), vec!["2026-11-22-120000"]);
        assert!(d[1].reasons[0].starts_with("failed (verify)"));

        c.push(Candidate::new("2026-11-23-120000", BackupState::Failed("boot".into())).unwrap());
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert!(d.iter().all(|d| d.keep), "{d:?}");
    }

    #[test]
    fn unreadable_metadata_is_kept_and_reported() {
        let c = vec![
            Candidate::new(
                "2026-11-01-120000",
                BackupState::Unreadable("bad json".into()),
            )
            .unwrap(),
            usable("2026-11-22-120000"),
        ];
        let d = plan(&c, &policy(1, 0, 0, 0, 0), None);
        assert!(d[0].keep);
        assert!(d[0].reasons[0].contains("bad json"));
    }

    #[test]
    fn a_backup_published_with_a_failed_data_post_check_is_never_usable() {
        let mut md: BackupMetadata = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "tool_version": "0", "vm_name": "a", "vm_uuid": "u",
            "host": "h", "stamp": "2026-11-22-120000", "method_requested": "auto",
            "method": "snapshot", "started_at": "2026-11-22T12:00:00+00:00",
            "finished_at": "2026-11-22T12:00:01+00:00", "phases": {}, "disks": [],
            "skipped_disks": [], "files": [], "total_bytes": 0, "bytes_per_sec": 0.0,
            "result": "warning", "warnings": []
        }))
        .unwrap();
        md.warnings = vec!["post-check: disk vda runs on /x, not on its original image /y".into()];
        assert!(matches!(
            state_from_metadata(&md),
            BackupState::Usable { .. }
        ));
        md.warnings
            .push("post-check: a-vda.qcow2: 1 chunk(s) differ from the manifest".into());
        match state_from_metadata(&md) {
            BackupState::Failed(why) => assert!(why.contains("chunk(s) differ"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
