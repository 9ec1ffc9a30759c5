//! `vm-backup bacula-config` writes Director resources that the real Director accepts together
//! with the base configuration `bacula-conf/bacula-dir.conf` (checked with `bacula-dir -t`).

use std::path::Path;
use std::process::Command;

fn fill(template: &str, dir: &Path) -> String {
    let pairs = [
        ("@DIR_NAME@", "t-dir".to_string()),
        ("@DIR_ADDRESS@", "127.0.0.1".into()),
        ("@DIR_PORT@", "19191".into()),
        ("@CONSOLE_PASSWORD@", "pw".into()),
        ("@WORK_DIR@", dir.display().to_string()),
        ("@QUERY_FILE@", "/etc/bacula/scripts/query.sql".into()),
        ("@SD_ADDRESS@", "127.0.0.1".into()),
        ("@SD_PORT@", "19193".into()),
        ("@SD_PASSWORD@", "pw".into()),
        ("@CATALOG@", "TestCatalog".into()),
        ("@JOB_LOG@", dir.join("jobs.log").display().to_string()),
        ("@DAEMON_LOG@", dir.join("daemon.log").display().to_string()),
        ("@RESTORE_WHERE@", dir.join("restore").display().to_string()),
        ("@INCLUDE_DIR@", dir.join("dir.d").display().to_string()),
        ("@RESTORE_CLIENT@", "hv1-fd".into()),
    ];
    let mut text = template.to_string();
    for (k, v) in pairs {
        text = text.replace(k, &v);
    }
    text
}

#[test]
fn generated_resources_pass_bacula_dir_t_with_the_base_config() {
    let bacula_dir = Path::new("/usr/sbin/bacula-dir");
    if !bacula_dir.exists() {
        eprintln!("SKIP: bacula-dir not installed (scripts/install-deps.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("dir.d")).unwrap();
    let inventory = dir.join("vm-list.yaml");
    std::fs::write(
        &inventory,
        "vms:\n  - name: web01\n    method: quiesce\n    priority: 5\n  - name: asa1\n    method: snapshot\n    priority: 20\n    client: hv2-fd\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vm-backup"))
        .args(["bacula-config", "--inventory"])
        .arg(&inventory)
        .args([
            "--client",
            "hv1-fd=hv1.example.org",
            "--client",
            "hv2-fd",
            "--catalog",
            "TestCatalog",
        ])
        .args(["--target", "/mnt/backup", "--output"])
        .arg(dir.join("dir.d/vms.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = std::fs::read_to_string(dir.join("dir.d/vms.conf")).unwrap();
    assert_eq!(generated.matches("Job {").count(), 2, "{generated}");
    assert!(generated.contains("Priority = 20"), "{generated}");

    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bacula-conf/bacula-dir.conf"),
    )
    .unwrap();
    // `bacula-dir -t` opens the catalog: give it the SQLite tables Debian ships.
    let tables =
        Path::new("/usr/share/dbconfig-common/data/bacula-director-sqlite3/install/sqlite3");
    let sql =
        std::fs::read(tables).expect("Debian's SQLite catalog script (bacula-director-sqlite3)");
    let mut sqlite = Command::new("sqlite3")
        .arg(dir.join("bacula.db"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sqlite3");
    std::io::Write::write_all(sqlite.stdin.as_mut().unwrap(), &sql).unwrap();
    drop(sqlite.stdin.take());
    assert!(sqlite.wait().unwrap().success());
    let conf = dir.join("bacula-dir.conf");
    std::fs::write(&conf, fill(&template, dir)).unwrap();
    let check = Command::new(bacula_dir)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bacula-dir -t: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // And a broken resource is caught by the same check, so the test can fail.
    std::fs::write(
        dir.join("dir.d/zz.conf"),
        "Job { Name = \"x\"\n JobDefs = \"NoSuchDefs\" }\n",
    )
    .unwrap();
    let check = Command::new(bacula_dir)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "bacula-dir -t accepted a Job with unknown JobDefs"
    );
}
