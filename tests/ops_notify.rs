//! Slack webhooks against a real HTTP server on loopback: one alert per failure, one summary
//! per report, bounded delivery when Slack is dead or silent, and no URL in any output.

mod ops_support;

use std::time::{Duration, Instant};

use ops_support::*;
use vm_backup::config::Settings;
use vm_backup::ops::notify::{self, BackupOutcome, Delivery};
use vm_backup::store::catalog::{self, FailedRun};
use vm_backup::ExitStatus;

const SECRET_PATH: &str = "/services/T0000/B0000/s3cr3tT0k3n";

fn settings(alerts: Option<String>, reports: Option<String>) -> Settings {
    let mut s = Settings::default();
    s.slack.alerts_webhook = alerts;
    s.slack.reports_webhook = reports;
    s
}

fn failure(vm: &str) -> FailedRun {
    FailedRun {
        host: "hv1".into(),
        vm: vm.into(),
        stamp: "2026-11-21-120000".into(),
        started_at: "2026-11-21T12:00:00+00:00".into(),
        finished_at: "2026-11-21T12:00:09+00:00".into(),
        result: ExitStatus::Failed,
        error: "blockcommit did not converge".into(),
        method: None,
    }
}

#[test]
fn one_alert_per_failure_or_warning_and_none_for_a_clean_success() {
    let server = HttpRecorder::start(Behaviour::Ok);
    let s = settings(Some(format!("{}{SECRET_PATH}", server.base)), None);

    let ok = metadata("hv1", "web01", "2026-11-21-120000", ExitStatus::Success);
    assert_eq!(
        notify::alert_backup(&s, &BackupOutcome::Published(&ok)),
        Delivery::NotNeeded
    );

    let f = failure("web01");
    assert_eq!(
        notify::alert_backup(&s, &BackupOutcome::Failed(&f)),
        Delivery::Sent { attempts: 1 }
    );
    let mut warned = metadata("hv1", "asa1", "2026-11-21-130000", ExitStatus::Warning);
    warned
        .warnings
        .push("show failover: connection refused".into());
    assert!(notify::alert_backup(&s, &BackupOutcome::Published(&warned)).is_ok());

    let got = server.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].line, format!("POST {SECRET_PATH} HTTP/1.1"));
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("web01") && text.contains("blockcommit did not converge"),
        "{text}"
    );
    assert!(got[1].body.contains("show failover: connection refused"));
}

#[test]
fn a_flaky_slack_is_retried() {
    let server = HttpRecorder::start(Behaviour::FailFirst(1));
    let s = settings(Some(format!("{}{SECRET_PATH}", server.base)), None);
    let d = notify::alert_backup(&s, &BackupOutcome::Failed(&failure("web01")));
    assert_eq!(d, Delivery::Sent { attempts: 2 });
    assert_eq!(server.received().len(), 2);
}

#[test]
fn a_dead_or_silent_slack_fails_quietly_within_the_bound() {
    let bound = notify::DEFAULT_BUDGET + Duration::from_millis(1500);

    let dead = settings(
        Some(format!("http://127.0.0.1:{}{SECRET_PATH}", dead_port())),
        None,
    );
    let t = Instant::now();
    let d = notify::alert_backup(&dead, &BackupOutcome::Failed(&failure("web01")));
    assert!(t.elapsed() < bound, "took {:?}", t.elapsed());
    match &d {
        Delivery::Failed { attempts, reason } => {
            assert_eq!(*attempts, notify::MAX_ATTEMPTS);
            assert!(
                !reason.contains("s3cr3t") && !reason.contains("127.0.0.1"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }

    let silent = HttpRecorder::start(Behaviour::Silent);
    let s = settings(Some(format!("{}{SECRET_PATH}", silent.base)), None);
    let t = Instant::now();
    let d = notify::alert_backup(&s, &BackupOutcome::Failed(&failure("web01")));
    let took = t.elapsed();
    assert!(took < bound, "took {took:?}");
    assert!(
        took >= notify::DEFAULT_POST_TIMEOUT,
        "it did wait: {took:?}"
    );
    assert!(matches!(d, Delivery::Failed { .. }), "{d:?}");
    assert!(!silent.received().is_empty());
}

#[test]
fn weekly_report_posts_one_summary_and_never_prints_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let now = chrono::Local::now();
    let recent = vm_backup::format::layout::stamp_for(now - chrono::Duration::days(1));
    let old = vm_backup::format::layout::stamp_for(now - chrono::Duration::days(20));
    for (vm, stamp) in [("web01", &recent), ("web01", &old), ("db01", &recent)] {
        let meta = metadata("hv1", vm, stamp, ExitStatus::Success);
        let dir = fake_backup(&target, &meta);
        catalog::record_backup(&target, &meta, &dir).unwrap();
    }
    let mut f = failure("asa1");
    f.stamp = recent.clone();
    catalog::record_failure(&target, &f).unwrap();

    let server = HttpRecorder::start(Behaviour::Ok);
    let url = format!("{}{SECRET_PATH}", server.base);
    let conf = config(
        tmp.path(),
        &target,
        &format!("[slack]\nreports_webhook = \"{url}\"\n"),
    );
    let out = run(&[
        "report",
        "--weekly",
        "--config",
        conf.to_str().unwrap(),
        "-vv",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let got = server.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    let text_ = body["text"].as_str().unwrap();
    assert!(text_.contains("weekly report"), "{text_}");
    assert!(text_.contains("*web01* (hv1): 1 ok, 0 failed"), "{text_}");
    assert!(text_.contains("*asa1* (hv1): 0 ok, 1 failed"), "{text_}");
    assert!(text_.contains("blockcommit did not converge"), "{text_}");
    assert!(
        text_.contains("max 38 ms") || text_.contains("max 37 ms"),
        "{text_}"
    );
    assert!(
        !stderr.contains(SECRET_PATH) && !stdout.contains(SECRET_PATH),
        "{stderr}"
    );

    // Dead Slack: the command says so without the URL, exits 1, and stays within the bound.
    let conf = config(
        tmp.path(),
        &target,
        &format!(
            "[slack]\nreports_webhook = \"http://127.0.0.1:{}{SECRET_PATH}\"\n",
            dead_port()
        ),
    );
    let t = Instant::now();
    let out = run(&[
        "report",
        "--weekly",
        "--config",
        conf.to_str().unwrap(),
        "-vvv",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(t.elapsed() < notify::DEFAULT_BUDGET + Duration::from_secs(3));
    assert!(stderr.contains("not delivered"), "{stderr}");
    assert!(
        !stderr.contains("s3cr3t") && !stdout.contains("s3cr3t"),
        "{stderr}"
    );
}
