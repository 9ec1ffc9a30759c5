//! `vm-backup backup` reports every run, whatever its outcome: a failed run (here an unknown
//! VM, refused by the pre-checks) is recorded in the catalog on the share and alerted once to
//! the Slack webhook (a real HTTP server on loopback), and the URL never appears in the output.

mod ops_support;

use std::process::Command;

use ops_support::{Behaviour, HttpRecorder};

#[test]
fn a_failed_backup_is_alerted_once_and_recorded_in_the_catalog() {
    let server = HttpRecorder::start(Behaviour::Ok);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    vm_backup::store::FolderStore::init(&target, None).unwrap();
    let secret = "/services/T000/B000/topsecret";
    let config = dir.path().join("vm-backup.conf");
    std::fs::write(
        &config,
        format!(
            "target = {:?}\njournal_dir = {:?}\nhostname = \"hv-test\"\n[slack]\nalerts_webhook = \"{}{secret}\"\n",
            target,
            dir.path().join("journal"),
            server.base
        ),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_vm-backup"))
        .args(["backup", "vmb-no-such-domain-4711", "--config"])
        .arg(&config)
        .arg("--metrics-file")
        .arg(dir.path().join("vm-backup.prom"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("vmb-no-such-domain-4711"), "{stderr}");
    assert!(
        !stderr.contains("topsecret") && !stdout.contains("topsecret"),
        "webhook URL leaked: {stderr}{stdout}"
    );

    let got = server.received();
    assert_eq!(got.len(), 1, "exactly one alert: {got:?}");
    assert!(got[0].line.contains(secret));
    assert!(
        got[0].body.contains("vmb-no-such-domain-4711"),
        "{}",
        got[0].body
    );

    let failed_runs = target.join("metadata").join("failed-runs");
    let recorded = json_files(&failed_runs);
    assert_eq!(recorded.len(), 1, "one failed run recorded: {recorded:?}");
    let text = std::fs::read_to_string(&recorded[0]).unwrap();
    assert!(
        text.contains("vmb-no-such-domain-4711") && text.contains("hv-test"),
        "{text}"
    );
}

/// Every `.json` file below `dir`.
fn json_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(json_files(&path));
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out
}
