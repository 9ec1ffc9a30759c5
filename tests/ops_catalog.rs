//! The catalog on the share: indexing, rebuild after deletion or corruption with the same
//! content, `vm-backup list` and `vm-backup catalog rebuild`.

mod ops_support;

use std::fs;

use ops_support::*;
use vm_backup::format::metadata::Verdict;
use vm_backup::store::catalog::{self, Catalog, FailedRun};
use vm_backup::ExitStatus;

fn populate(target: &std::path::Path) {
    for (vm, stamp, result) in [
        ("web01", "2026-11-14-120000", ExitStatus::Success),
        ("web01", "2026-11-21-120000", ExitStatus::Warning),
        ("asa1", "2026-11-21-130000", ExitStatus::Success),
    ] {
        let mut meta = metadata("hv1", vm, stamp, result);
        if stamp == "2026-11-14-120000" {
            meta.verify = Some(Verdict {
                at: "2026-11-15T10:00:00+00:00".into(),
                ok: true,
                detail: "2 files, 1 disk".into(),
            });
        }
        if result == ExitStatus::Warning {
            meta.warnings.push("post-check: agent slow".into());
        }
        let dir = fake_backup(target, &meta);
        catalog::record_backup(target, &meta, &dir).unwrap();
    }
    catalog::record_failure(
        target,
        &FailedRun {
            host: "hv1".into(),
            vm: "asa1".into(),
            stamp: "2026-11-22-130000".into(),
            started_at: "2026-11-22T13:00:00+00:00".into(),
            finished_at: "2026-11-22T13:00:05+00:00".into(),
            result: ExitStatus::PreCheckFailed,
            error: "domain not found".into(),
            method: None,
        },
    )
    .unwrap();
}

fn contents(target: &std::path::Path) -> (String, String) {
    let c = Catalog::open(target).unwrap();
    (
        serde_json::to_string(&c.backups(None).unwrap()).unwrap(),
        serde_json::to_string(&c.failures(None).unwrap()).unwrap(),
    )
}

#[test]
fn deleted_or_corrupted_catalog_is_rebuilt_with_the_same_content() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path();
    populate(target);
    let before = contents(target);
    assert!(before.0.contains("web01") && before.0.contains("asa1"));
    assert!(before.1.contains("domain not found"));
    let db = catalog::catalog_path(target);

    fs::remove_file(&db).unwrap();
    assert_eq!(contents(target), before, "after deletion");

    // Garbage over the whole file.
    fs::write(&db, vec![0x5a; 8192]).unwrap();
    assert_eq!(contents(target), before, "after corruption");
    let aside: Vec<_> = fs::read_dir(target.join("metadata"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");

    // A valid SQLite file with its table dropped (damaged schema).
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("DROP TABLE failed_runs;").unwrap();
    }
    assert_eq!(contents(target), before, "after a dropped table");

    // And the explicit command.
    let out = run(&["catalog", "--target", target.to_str().unwrap(), "rebuild"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("3 backups, 1 failed runs"), "{stdout}");
    assert_eq!(contents(target), before, "after catalog rebuild");

    // The last-run summary names the latest run and each VM's.
    let last = catalog::read_last_runs(target);
    assert_eq!(last.last.unwrap().vm, "asa1");
    assert_eq!(last.vms["hv1/web01"].stamp, "2026-11-21-120000");
    assert_eq!(
        last.vms["hv1/asa1"].error.as_deref(),
        Some("domain not found")
    );
}

#[test]
fn list_shows_backups_with_verdicts_and_sees_new_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path();
    populate(target);
    // A folder the catalog was never told about.
    fake_backup(
        target,
        &metadata("hv1", "db01", "2026-11-22-010000", ExitStatus::Success),
    );
    let t = target.to_str().unwrap();
    let out = run(&["list", "--target", t]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("db01"), "{stdout}");
    let web = stdout
        .lines()
        .find(|l| l.contains("2026-11-14-120000"))
        .unwrap();
    assert!(
        web.contains("passed") && web.contains("quiesce") && web.contains("10.0 MiB"),
        "{web}"
    );
    assert!(
        web.contains("250.0 MiB/s") && web.contains("42.0s"),
        "{web}"
    );

    let out = run(&["list", "--target", t, "--json", "web01"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["verify"]["ok"], true);
    assert_eq!(rows[1]["result"], "warning");
}
