//! The after-run hook the backup workflow calls: catalog, Slack alert and the Prometheus
//! textfile, on a real target, a real HTTP server and a real file.

mod ops_support;

use std::collections::BTreeMap;
use std::fs;

use ops_support::*;
use vm_backup::config::Settings;
use vm_backup::ops::notify::{BackupOutcome, Delivery};
use vm_backup::ops::report;
use vm_backup::store::catalog::{Catalog, FailedRun};
use vm_backup::ExitStatus;

/// `name{labels} value` lines as a map.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn after_each_run_catalog_alert_and_metrics_are_updated() {
    let tmp = tempfile::tempdir().unwrap();
    let server = HttpRecorder::start(Behaviour::Ok);
    let mut settings = Settings {
        target: tmp.path().join("backup"),
        metrics_file: Some(tmp.path().join("textfile/vm-backup.prom")),
        ..Default::default()
    };
    settings.slack.alerts_webhook = Some(format!("{}/services/T/B/x", server.base));
    let prom = settings.metrics_file.clone().unwrap();

    // A clean success: catalog row, metrics, no alert.
    let ok = metadata("hv1", "web01", "2026-11-21-120000", ExitStatus::Success);
    let dir = fake_backup(&settings.target, &ok);
    let after = report::after_backup_run(&settings, &BackupOutcome::Published(&ok), Some(&dir));
    assert!(after.warnings().is_empty(), "{after:?}");
    assert_eq!(after.alert, Delivery::NotNeeded);
    let m = samples(&fs::read_to_string(&prom).unwrap());
    let key = |name: &str, vm: &str| format!("{name}{{host=\"hv1\",vm=\"{vm}\"}}");
    assert_eq!(m[&key("vm_backup_last_run_result", "web01")], 0.0);
    assert_eq!(m[&key("vm_backup_last_bytes", "web01")], (10 << 20) as f64);
    assert_eq!(m[&key("vm_backup_last_duration_seconds", "web01")], 42.0);
    assert_eq!(m[&key("vm_backup_last_frozen_seconds", "web01")], 0.0375);
    assert_eq!(
        m[&key("vm_backup_last_throughput_bytes_per_second", "web01")],
        250.0 * 1024.0 * 1024.0
    );
    let success_at = m[&key("vm_backup_last_success_timestamp_seconds", "web01")];
    assert!(success_at > 1.7e9);

    // Another VM fails, then web01 fails: one alert each; web01's last success is kept.
    let fail = |vm: &str, stamp: &str| FailedRun {
        host: "hv1".into(),
        vm: vm.into(),
        stamp: stamp.into(),
        started_at: "2026-11-22T12:00:00+01:00".into(),
        finished_at: "2026-11-22T12:00:03+01:00".into(),
        result: ExitStatus::Failed,
        error: "snapshot failed".into(),
        method: None,
    };
    for f in [
        fail("db01", "2026-11-22-120000"),
        fail("web01", "2026-11-22-120000"),
    ] {
        let after = report::after_backup_run(&settings, &BackupOutcome::Failed(&f), None);
        assert_eq!(after.alert, Delivery::Sent { attempts: 1 }, "{after:?}");
        assert!(after.catalog_error.is_none() && after.metrics_error.is_none());
    }
    let text = fs::read_to_string(&prom).unwrap();
    let m = samples(&text);
    assert_eq!(m[&key("vm_backup_last_run_result", "web01")], 2.0);
    assert_eq!(m[&key("vm_backup_last_run_success", "web01")], 0.0);
    assert_eq!(
        m[&key("vm_backup_last_success_timestamp_seconds", "web01")],
        success_at
    );
    assert_eq!(m[&key("vm_backup_last_run_result", "db01")], 2.0);
    assert!(!m.contains_key(&key("vm_backup_last_bytes", "db01")));
    assert_eq!(
        text.matches("# TYPE vm_backup_last_run_result gauge")
            .count(),
        1
    );
    assert_eq!(server.received().len(), 2);
    // Nothing but the textfile in its folder (written through a temporary file and renamed).
    assert_eq!(fs::read_dir(prom.parent().unwrap()).unwrap().count(), 1);

    let cat = Catalog::open(&settings.target).unwrap();
    assert_eq!(cat.backups(None).unwrap().len(), 1);
    assert_eq!(cat.failures(None).unwrap().len(), 2);
    assert_eq!(
        cat.latest_failure("hv1", "web01").unwrap().as_deref(),
        Some("snapshot failed")
    );
    let last = vm_backup::store::catalog::read_last_runs(&settings.target);
    assert_eq!(last.vms["hv1/web01"].result, "failed");
}
