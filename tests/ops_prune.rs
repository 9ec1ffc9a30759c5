//! `vm-backup prune` on a real temporary target: partial folders stay, a failed latest run
//! keeps everything, --dry-run removes nothing, and the plan says why.

mod ops_support;

use std::fs;

use ops_support::*;
use vm_backup::store::catalog::{self, FailedRun};
use vm_backup::ExitStatus;

fn stamps(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != vm_backup::format::layout::VM_LOCK_FILE)
        .collect();
    v.sort();
    v
}

#[test]
fn prune_keeps_partial_and_everything_after_a_failed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let conf = config(tmp.path(), &target, "");
    fs::write(
        tmp.path().join("vm-list.yaml"),
        "vms:\n  - name: web01\n    retention: {keep_last: 2}\n  - name: other\n",
    )
    .unwrap();
    let all = [
        "2026-11-16-120000",
        "2026-11-17-120000",
        "2026-11-18-120000",
        "2026-11-19-120000",
        "2026-11-20-120000",
    ];
    for s in all {
        fake_backup(&target, &metadata("hv1", "web01", s, ExitStatus::Success));
    }
    // A VM without retention in the inventory, and a backup being written right now.
    fake_backup(
        &target,
        &metadata("hv1", "other", "2026-11-01-120000", ExitStatus::Success),
    );
    let vm_dir = target.join("hv1/web01");
    fs::create_dir_all(vm_dir.join("2026-11-21-120000.partial")).unwrap();
    fs::write(
        vm_dir.join("2026-11-21-120000.partial/web01-vda.qcow2"),
        b"half",
    )
    .unwrap();

    // The latest run failed: nothing may go.
    catalog::record_failure(
        &target,
        &FailedRun {
            host: "hv1".into(),
            vm: "web01".into(),
            stamp: "2026-11-21-000000".into(),
            started_at: "2026-11-21T00:00:00+00:00".into(),
            finished_at: "2026-11-21T00:01:00+00:00".into(),
            result: ExitStatus::Failed,
            error: "copy failed: no space left".into(),
            method: None,
        },
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap();
    let out = run(&["prune", "--config", conf_s]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("latest run failed (copy failed: no space left)"),
        "{stdout}"
    );
    assert!(!stdout.contains("removed"), "{stdout}");
    assert_eq!(stamps(&vm_dir).len(), 6);

    // A good backup after the failure: keep-last 2 applies now. Dry run first.
    fake_backup(
        &target,
        &metadata("hv1", "web01", "2026-11-21-060000", ExitStatus::Success),
    );
    let out = run(&["prune", "--config", conf_s, "--dry-run"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert_eq!(stdout.matches("would remove").count(), 4, "{stdout}");
    assert_eq!(stamps(&vm_dir).len(), 7);

    let out = run(&["prune", "--config", conf_s]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stamps(&vm_dir),
        vec![
            "2026-11-20-120000",
            "2026-11-21-060000",
            "2026-11-21-120000.partial"
        ],
        "{stdout}"
    );
    assert!(stdout.contains("2026-11-21-120000.partial"), "{stdout}");
    assert!(stdout.contains("in progress"), "{stdout}");
    assert!(stdout.contains("keep-last 2/2"), "{stdout}");
    // The VM without retention kept its backup, and the catalog forgot the removed ones.
    assert!(target.join("hv1/other/2026-11-01-120000").is_dir());
    assert!(stdout.contains("other: keep"), "{stdout}");
    let rows = catalog::Catalog::open(&target)
        .unwrap()
        .backups(Some("web01"))
        .unwrap();
    let kept: Vec<&str> = rows.iter().map(|r| r.stamp.as_str()).collect();
    assert_eq!(kept, vec!["2026-11-20-120000", "2026-11-21-060000"]);
}

#[test]
fn colliding_names_get_two_folders_and_prune_of_one_never_touches_the_other() {
    use vm_backup::format::layout::safe_component;
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let conf = config(tmp.path(), &target, "");
    fs::write(
        tmp.path().join("vm-list.yaml"),
        "vms:\n  - name: web_01\n    retention: {keep_last: 1}\n  - name: web 01\n    retention: {keep_last: 5}\n",
    )
    .unwrap();
    let a = safe_component("web_01").unwrap();
    let b = safe_component("web 01").unwrap();
    assert_eq!(a, "web_01", "a safe name keeps its folder");
    assert_ne!(a, b);
    // Each VM's backups go in its own folder (as the engine lays them out).
    let stamps_a = ["2026-11-18-120000", "2026-11-19-120000"];
    let stamps_b = ["2026-11-18-130000"];
    for s in stamps_a {
        let md = metadata("hv1", "web_01", s, ExitStatus::Success);
        let dir = target.join("hv1").join(&a).join(s);
        fs::create_dir_all(&dir).unwrap();
        vm_backup::store::write_metadata(&dir, &md).unwrap();
    }
    for s in stamps_b {
        let md = metadata("hv1", "web 01", s, ExitStatus::Success);
        let dir = target.join("hv1").join(&b).join(s);
        fs::create_dir_all(&dir).unwrap();
        vm_backup::store::write_metadata(&dir, &md).unwrap();
    }
    // A backup of "web 01" left in web_01's folder by a version whose names collided: prune of
    // web_01 (keep-last 1) neither counts nor removes it.
    let stray = target.join("hv1").join(&a).join("2026-11-20-120000");
    fs::create_dir_all(&stray).unwrap();
    vm_backup::store::write_metadata(
        &stray,
        &metadata("hv1", "web 01", "2026-11-20-120000", ExitStatus::Success),
    )
    .unwrap();

    let out = run(&[
        "prune",
        "--config",
        conf.to_str().unwrap(),
        "--vm",
        "web_01",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stamps(&target.join("hv1").join(&a)),
        vec!["2026-11-19-120000", "2026-11-20-120000"],
        "{stdout}"
    );
    assert_eq!(
        stamps(&target.join("hv1").join(&b)),
        vec!["2026-11-18-130000"]
    );
}

#[test]
fn a_target_without_marker_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("mnt");
    fs::create_dir_all(&target).unwrap();
    fs::write(tmp.path().join("vm-list.yaml"), "vms: []\n").unwrap();
    let conf = tmp.path().join("vm-backup.conf");
    fs::write(
        &conf,
        format!(
            "target = \"{}\"\nhostname = \"hv1\"\ninventory = \"{}\"\njournal_dir = \"{}\"\n",
            target.display(),
            tmp.path().join("vm-list.yaml").display(),
            tmp.path().join("journal").display()
        ),
    )
    .unwrap();
    let c = conf.to_str().unwrap();
    for args in [
        vec!["backup", "web01", "--config", c, "--json"],
        vec!["list", "--config", c],
        vec!["prune", "--config", c],
        vec!["verify", "--all", "--config", c],
        vec!["verify", "web01", "latest", "--config", c],
        vec!["restore", "web01", "latest", "--config", c],
        vec!["catalog", "--config", c, "rebuild"],
    ] {
        let out = run(&args);
        let (stdout, stderr) = text(&out);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {stdout}\n{stderr}");
        if args[0] == "backup" {
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}\n{stderr}");
        }
        assert!(
            format!("{stdout}{stderr}").contains("vm-backup init"),
            "{args:?}: {stdout}\n{stderr}"
        );
        assert_eq!(
            fs::read_dir(&target).unwrap().count(),
            0,
            "{args:?} wrote into an uninitialised target"
        );
    }
    // Initialised (twice: idempotent), the same target is accepted.
    for _ in 0..2 {
        let out = run(&["init", "--config", c]);
        assert!(out.status.success(), "{:?}", text(&out));
    }
    let out = run(&["list", "--config", c]);
    assert!(out.status.success(), "{:?}", text(&out));
}

#[test]
fn prune_and_verify_wait_for_no_one_while_a_backup_holds_the_vm_lock() {
    use vm_backup::store::{FolderStore, LockMode};
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let conf = config(tmp.path(), &target, "");
    fs::write(
        tmp.path().join("vm-list.yaml"),
        "vms:\n  - name: web01\n    retention: {keep_last: 1}\n",
    )
    .unwrap();
    for s in ["2026-11-19-120000", "2026-11-20-120000"] {
        fake_backup(&target, &metadata("hv1", "web01", s, ExitStatus::Success));
    }
    let c = conf.to_str().unwrap();
    // This process stands for a running backup (another journal_dir: only the target's lock
    // is shared between the two).
    let store = FolderStore::open(&target).unwrap();
    let lock = store.lock_vm("hv1", "web01", LockMode::Exclusive).unwrap();
    let out = run(&["prune", "--config", c]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("skipping web01"), "{stderr}");
    assert_eq!(stamps(&target.join("hv1/web01")).len(), 2, "{stdout}");
    let out = run(&["verify", "web01", "latest", "--config", c]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("lock"), "{stderr}");
    drop(lock);
    // Free again: prune applies keep-last 1.
    let out = run(&["prune", "--config", c]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(stamps(&target.join("hv1/web01")), vec!["2026-11-20-120000"]);
}
