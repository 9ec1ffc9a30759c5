//! `vm-backup status` and the status page: the attention rules on a catalog built in a tempdir
//! (fake published backups, failure records, verdicts), the command's exit code, JSON and HTML,
//! and (with `VMB_LAB_BROWSER=1`) the page loaded in headless Chromium.

mod ops_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, Duration, Local};
use ops_support::*;
use vm_backup::format::layout::stamp_for;
use vm_backup::format::metadata::{BackupMetadata, Verdict};
use vm_backup::ops::status::{self, Concern, Input, Rules, Status, Urgency, Usage};
use vm_backup::store::catalog::{self, Catalog, FailedRun};
use vm_backup::ExitStatus;

const HOST: &str = "hv1";

fn now() -> DateTime<Local> {
    Local::now()
}

/// A published backup of `vm`, `age_hours` old, indexed in the catalog; `edit` sets verdicts.
fn backup(target: &Path, vm: &str, age_hours: i64, edit: impl FnOnce(&mut BackupMetadata)) {
    let stamp = stamp_for(now() - Duration::hours(age_hours));
    let mut meta = metadata(HOST, vm, &stamp, ExitStatus::Success);
    edit(&mut meta);
    let dir = fake_backup(target, &meta);
    catalog::record_backup(target, &meta, &dir).unwrap();
}

fn verdict(ok: bool, age_hours: i64, detail: &str) -> Option<Verdict> {
    Some(Verdict {
        at: (now() - Duration::hours(age_hours)).to_rfc3339(),
        ok,
        detail: detail.into(),
    })
}

fn failure(target: &Path, vm: &str, age_hours: i64, error: &str) {
    let t = now() - Duration::hours(age_hours);
    catalog::record_failure(
        target,
        &FailedRun {
            host: HOST.into(),
            vm: vm.into(),
            stamp: stamp_for(t),
            started_at: t.to_rfc3339(),
            finished_at: (t + Duration::seconds(3)).to_rfc3339(),
            result: ExitStatus::Failed,
            error: error.into(),
            method: None,
        },
    )
    .unwrap();
}

fn build(target: &Path, inventory: &[&str], usage: Option<Usage>, rules: Rules) -> Status {
    let catalog = Catalog::open(target).unwrap();
    let backups = catalog.backups(None).unwrap();
    let failures = catalog.failures(None).unwrap();
    let names: Vec<String> = inventory.iter().map(|s| s.to_string()).collect();
    status::build(Input {
        target,
        host: HOST,
        inventory: Some(&names),
        backups: &backups,
        failures: &failures,
        usage,
        now: now(),
        rules,
    })
}

fn concerns(s: &Status, vm: &str) -> Vec<(Urgency, Concern)> {
    s.vms
        .iter()
        .find(|v| v.vm == vm)
        .unwrap_or_else(|| panic!("{vm} missing from the status"))
        .attention
        .iter()
        .map(|a| (a.urgency, a.concern))
        .collect()
}

/// A healthy VM (recent, verified, drilled), and one of each problem.
fn populate(target: &Path) {
    backup(target, "healthy", 30, |_| {});
    backup(target, "healthy", 6, |m| {
        m.verify = verdict(true, 5, "3 checks passed");
        m.test_restore = verdict(true, 4, "agent answered");
        m.total_bytes = 12 << 20;
    });
    // Two weeks of daily backups, growing, one with a warning: the charts have a history.
    for day in 1..14_i64 {
        backup(target, "drill-bad", 24 * day + 8, |m| {
            m.total_bytes = (40 - 2 * day as u64) << 20;
            let start = DateTime::parse_from_rfc3339(&m.started_at).unwrap();
            m.finished_at = (start + Duration::seconds(30 + (day * 7) % 25)).to_rfc3339();
            if day == 6 {
                m.result = ExitStatus::Warning;
                m.warnings.push("agent slow to thaw".into());
            }
        });
    }
    backup(target, "drill-bad", 8, |m| {
        m.verify = verdict(true, 7, "3 checks passed");
        m.test_restore = verdict(false, 2, "the guest did not boot in 300 s");
    });
    backup(target, "stale", 24 * 5, |m| {
        m.verify = verdict(true, 24 * 5, "ok");
        m.test_restore = verdict(true, 24 * 5, "ok");
    });
    backup(target, "run-failed", 30, |m| {
        m.verify = verdict(true, 29, "ok");
        m.test_restore = verdict(true, 29, "ok");
    });
    failure(target, "run-failed", 2, "pre-check: domain is paused");
    backup(target, "unverified", 3, |m| {
        m.warnings
            .push("post-check: qemu-img check: 2 corruption(s)".into());
    });
    backup(target, "corrupt", 3, |m| {
        m.verify = verdict(false, 1, "vm-vda.qcow2: chunk 7 at 29360128 does not match");
        m.test_restore = verdict(true, 2, "ok");
    });
    backup(target, "retired", 24 * 90, |_| {});
}

const INVENTORY: &[&str] = &[
    "healthy",
    "drill-bad",
    "stale",
    "run-failed",
    "unverified",
    "corrupt",
    "new-vm",
];

#[test]
fn attention_rules_flag_each_problem_and_nothing_on_a_healthy_vm() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path();
    populate(target);
    let s = build(target, INVENTORY, None, Rules::default());

    assert_eq!(concerns(&s, "healthy"), vec![]);
    assert_eq!(
        concerns(&s, "drill-bad"),
        vec![(Urgency::Critical, Concern::DrillFailed)]
    );
    assert_eq!(
        concerns(&s, "stale"),
        vec![(Urgency::Critical, Concern::Stale)]
    );
    assert_eq!(
        concerns(&s, "run-failed"),
        vec![(Urgency::Critical, Concern::LastRunFailed)]
    );
    assert_eq!(
        concerns(&s, "unverified"),
        vec![
            (Urgency::Warning, Concern::ImageCheckFailed),
            (Urgency::Warning, Concern::NotVerified),
            (Urgency::Warning, Concern::NeverDrilled),
        ]
    );
    assert_eq!(
        concerns(&s, "corrupt"),
        vec![
            (Urgency::Critical, Concern::VerifyFailed),
            (Urgency::Warning, Concern::NotVerified),
        ]
    );
    assert_eq!(
        concerns(&s, "new-vm"),
        vec![(Urgency::Critical, Concern::NoBackup)]
    );
    // Only on the share: history, not a VM to chase for new backups.
    let retired = s.vms.iter().find(|v| v.vm == "retired").unwrap();
    assert!(!retired.in_inventory);
    assert_eq!(concerns(&s, "retired"), vec![]);

    // The overall list: every critical item before every warning; VMs with a critical item first.
    let urgencies: Vec<Urgency> = s.attention.iter().map(|a| a.urgency).collect();
    let mut sorted = urgencies.clone();
    sorted.sort();
    assert_eq!(urgencies, sorted);
    assert_eq!(
        s.attention
            .iter()
            .filter(|a| a.urgency == Urgency::Critical)
            .count(),
        5
    );
    let first_ok = s.vms.iter().position(|v| v.worst().is_none()).unwrap();
    assert!(s.vms[..first_ok].iter().all(|v| v.worst().is_some()));
    assert!(
        s.vms[0].worst() == Some(Urgency::Critical),
        "{:?}",
        s.vms[0].vm
    );
}

#[test]
fn verdicts_carry_their_dates_and_the_newest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path();
    populate(target);
    let s = build(target, INVENTORY, None, Rules::default());
    let healthy = s.vms.iter().find(|v| v.vm == "healthy").unwrap();
    let last = healthy.last_backup.as_ref().unwrap();
    assert_eq!(last.total_bytes, 12 << 20);
    assert_eq!(last.frozen_ms, Some(37.5));
    assert!((last.duration_seconds - 42.0).abs() < 1e-6);
    let verified = healthy.hashes_verified.as_ref().unwrap();
    assert!(verified.ok);
    assert_eq!(verified.stamp, last.stamp);
    let age = now()
        - DateTime::parse_from_rfc3339(&verified.at)
            .unwrap()
            .with_timezone(&Local);
    assert!(
        (age - Duration::hours(5)).num_seconds().abs() < 60,
        "{verified:?}"
    );
    let booted = healthy.booted.as_ref().unwrap();
    assert!(booted.ok);
    let image = healthy.image_checked.as_ref().unwrap();
    assert!(image.ok);
    assert_eq!(image.at, last.finished_at);
    assert_eq!(healthy.history.len(), 2);
    assert!(healthy.history[0].stamp < healthy.history[1].stamp);

    // A newer failed drill on an older backup still wins over an older pass.
    let drill = s.vms.iter().find(|v| v.vm == "run-failed").unwrap();
    assert_eq!(
        drill.last_run.as_ref().unwrap().error.as_deref(),
        Some("pre-check: domain is paused")
    );
}

#[test]
fn stale_rule_follows_the_configured_days() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path();
    populate(target);
    let week = Rules {
        stale_after_days: 7,
        ..Rules::default()
    };
    assert_eq!(
        concerns(&build(target, INVENTORY, None, week), "stale"),
        vec![]
    );
    let day = Rules {
        stale_after_days: 1,
        ..Rules::default()
    };
    // 30 hours old: stale after one day, not after two.
    assert!(concerns(&build(target, INVENTORY, None, day), "run-failed")
        .contains(&(Urgency::Critical, Concern::Stale)));
}

#[test]
fn a_filling_target_is_flagged_by_percentage() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path();
    backup(target, "healthy", 1, |m| {
        m.verify = verdict(true, 1, "ok");
        m.test_restore = verdict(true, 1, "ok");
    });
    let at = |used: u64| {
        let s = build(
            target,
            &["healthy"],
            Some(Usage {
                total_bytes: 1000,
                used_bytes: used,
                available_bytes: 1000 - used,
            }),
            Rules::default(),
        );
        s.attention
            .iter()
            .map(|a| (a.urgency, a.concern, a.vm.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(at(500), vec![]);
    assert_eq!(
        at(900),
        vec![(Urgency::Warning, Concern::TargetFilling, None)]
    );
    assert_eq!(
        at(970),
        vec![(Urgency::Critical, Concern::TargetFilling, None)]
    );
}

#[test]
fn without_an_inventory_every_vm_on_the_share_counts() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path();
    backup(target, "old", 24 * 10, |_| {});
    let catalog = Catalog::open(target).unwrap();
    let s = status::build(Input {
        target,
        host: HOST,
        inventory: None,
        backups: &catalog.backups(None).unwrap(),
        failures: &catalog.failures(None).unwrap(),
        usage: None,
        now: now(),
        rules: Rules::default(),
    });
    assert_eq!(s.vms.len(), 1);
    assert!(s.vms[0].in_inventory);
    assert!(concerns(&s, "old").contains(&(Urgency::Critical, Concern::Stale)));
}

/// A config and inventory for the command, the populated target beside them.
fn setup_cli(dir: &Path) -> (PathBuf, PathBuf) {
    let target = dir.join("target");
    std::fs::create_dir_all(&target).unwrap();
    populate(&target);
    let inventory: String = INVENTORY
        .iter()
        .map(|vm| format!("  - name: {vm}\n"))
        .collect();
    std::fs::write(dir.join("vm-list.yaml"), format!("vms:\n{inventory}")).unwrap();
    (config(dir, &target, ""), target)
}

#[test]
fn status_command_prints_json_writes_html_and_exits_1_on_critical() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _target) = setup_cli(dir.path());
    let page = dir.path().join("page.html");
    let out = run(&[
        "status",
        "--config",
        config.to_str().unwrap(),
        "--json",
        "--html",
        page.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let vms: Vec<&str> = json["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    for vm in INVENTORY {
        assert!(vms.contains(vm), "{vm} missing from {vms:?}");
    }
    assert!(json["attention"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["vm"] == "drill-bad" && a["concern"] == "drill-failed"));
    assert!(json["usage"]["total_bytes"].as_u64().unwrap() > 0);

    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for vm in INVENTORY {
        assert!(
            html.contains(&format!("data-vm=\"{vm}\"")),
            "{vm} not on the page"
        );
    }
    // Self-contained: nothing fetched, no script.
    for banned in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
        assert!(!html.contains(banned), "page contains {banned}");
    }
    assert!(html.contains("<svg class=\"chart\""));

    // Text form, and a target with nothing critical exits 0.
    let out = run(&["status", "--config", config.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("CRITICAL") && stdout.contains("drill-bad"),
        "{stdout}"
    );
    let calm = tempfile::tempdir().unwrap();
    let target = calm.path().join("t");
    backup(&target, "healthy", 1, |m| {
        m.verify = verdict(true, 1, "ok");
        m.test_restore = verdict(true, 1, "ok");
    });
    std::fs::write(
        calm.path().join("vm-list.yaml"),
        "vms:\n  - name: healthy\n",
    )
    .unwrap();
    let cfg = ops_support::config(calm.path(), &target, "");
    let out = run(&["status", "--config", cfg.to_str().unwrap(), "--json"]);
    let json: serde_json::Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!(json["vms"][0]["attention"], serde_json::json!([]));
    // The tempdir's real file system may itself be nearly full: then, and only then, exit 1.
    let critical = json["attention"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["urgency"] == "critical");
    assert_eq!(
        out.status.code(),
        Some(if critical { 1 } else { 0 }),
        "{json}"
    );
}

/// The page in a real browser: every VM present and the failed drill flagged in the DOM, and a
/// screenshot (`<target tmpdir>/status-page.png`; the one in docs/ is a copy of it).
#[test]
fn status_page_renders_in_headless_chromium() {
    if std::env::var("VMB_LAB_BROWSER").as_deref() != Ok("1") {
        eprintln!("SKIP: headless Chromium not enabled (VMB_LAB_BROWSER=1, apt chromium)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, _target) = setup_cli(dir.path());
    let page = dir.path().join("status.html");
    let out = run(&[
        "status",
        "--config",
        config.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(page.exists(), "{:?}", text(&out));
    let profile = tempfile::tempdir().unwrap();
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1320,1500",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(format!("file://{}", page.display()))
            .output()
            .expect("run chromium (apt chromium)");
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium(&["--dump-dom"]);
    assert!(dom.contains("<title>vm-backup status</title>"), "{dom}");
    // One card per VM: the inventory's and the retired one found only on the share.
    assert_eq!(
        dom.matches("<section class=\"vm ").count(),
        INVENTORY.len() + 1
    );
    for vm in INVENTORY {
        assert!(
            dom.contains(&format!("data-vm=\"{vm}\" data-host=\"hv1\"")),
            "{vm} not in the DOM"
        );
    }
    assert!(
        dom.contains("<li class=\"critical\" data-vm=\"drill-bad\" data-concern=\"drill-failed\">"),
        "the failed drill is not flagged in the DOM"
    );
    assert!(dom.contains("data-vm=\"drill-bad\" data-host=\"hv1\" data-level=\"critical\""));

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot too small"
    );
    eprintln!("screenshot: {}", shot.display());
}
