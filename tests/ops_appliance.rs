//! ASAv configuration capture against a real OpenSSH server on loopback, whose authorized key
//! has a forced command answering like an ASA. Needs root (sshd); skips visibly otherwise.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use vm_backup::config::{Ssh, VmEntry};
use vm_backup::ops::appliance::{self, ApplianceError};

const RUNNING: &str =
    ": Saved\nASA Version 9.18(3)\nhostname asa-lab\ninterface Management0/0\n nameif management\n";

struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Host key, client key, forced-command script, config; returns the running sshd.
fn start_sshd(dir: &Path) -> Sshd {
    keygen(&dir.join("host_key"));
    keygen(&dir.join("client_key"));
    let log = dir.join("commands.log");
    let script = dir.join("asa.sh");
    fs::write(
        &script,
        format!(
            r#"#!/bin/sh
printf '%s\n' "$SSH_ORIGINAL_COMMAND" >> {log}
case "$SSH_ORIGINAL_COMMAND" in
  "write memory") echo "Building configuration..."; echo "Cryptochecksum: 1b2c3d4e"; echo "[OK]" ;;
  "show running-config") printf '{running}' ;;
  "show startup-config") printf ': Saved\nhostname asa-lab\n' ;;
  "show version") echo "Cisco Adaptive Security Appliance Software Version 9.18(3)" ;;
  "show failover") echo "Failover Off" ;;
  *) echo "ERROR: % Invalid input detected at '^' marker." >&2; exit 1 ;;
esac
"#,
            log = log.display(),
            running = RUNNING.replace('\n', "\\n"),
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let client_pub = fs::read_to_string(dir.join("client_key.pub")).unwrap();
    fs::write(
        dir.join("authorized_keys"),
        format!(
            "command=\"{}\",no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding {client_pub}",
            script.display()
        ),
    )
    .unwrap();
    let port = free_port();
    fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin forced-commands-only\nUsePAM no\nStrictModes no\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .arg("-p")
        .arg(port.to_string())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let host_pub = fs::read_to_string(dir.join("host_key.pub")).unwrap();
    let mut fields = host_pub.split_whitespace();
    fs::write(
        dir.join("known_hosts"),
        format!(
            "[127.0.0.1]:{port} {} {}\n",
            fields.next().unwrap(),
            fields.next().unwrap()
        ),
    )
    .unwrap();
    Sshd { child, port }
}

fn settings(dir: &Path, port: u16, known_hosts: PathBuf) -> Ssh {
    Ssh {
        user: Some("root".into()),
        identity_file: Some(dir.join("client_key")),
        known_hosts: Some(known_hosts),
        port: Some(port),
        connect_timeout_seconds: Some(3),
        command_timeout_seconds: Some(10),
    }
}

fn asa() -> VmEntry {
    VmEntry {
        name: "asa1".into(),
        method: vm_backup::format::metadata::Method::Snapshot,
        priority: 10,
        retention: Default::default(),
        appliance: Some("asav".into()),
        address: Some("127.0.0.1".into()),
        client: None,
    }
}

fn usable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: ops_appliance: needs root to run sshd");
        return false;
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        eprintln!("SKIP: ops_appliance: /usr/sbin/sshd not installed (openssh-server)");
        return false;
    }
    true
}

#[test]
fn write_memory_and_capture_over_a_real_sshd() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sshd = start_sshd(dir);
    let ssh = settings(dir, sshd.port, dir.join("known_hosts"));

    appliance::write_memory(&asa(), &ssh).unwrap();
    let configs = dir.join("backup/configs");
    let files = appliance::capture_configs(&asa(), &ssh, &configs).unwrap();
    assert_eq!(
        files,
        vec![
            "show-running-config.txt",
            "show-startup-config.txt",
            "show-version.txt",
            "show-failover.txt"
        ]
    );
    assert_eq!(
        fs::read_to_string(configs.join("show-running-config.txt")).unwrap(),
        RUNNING
    );
    assert!(fs::read_to_string(configs.join("show-version.txt"))
        .unwrap()
        .contains("Version 9.18(3)"));
    assert_eq!(
        fs::read_to_string(configs.join("show-failover.txt")).unwrap(),
        "Failover Off\n"
    );
    let log = fs::read_to_string(dir.join("commands.log")).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec![
            "write memory",
            "show running-config",
            "show startup-config",
            "show version",
            "show failover"
        ]
    );
}

#[test]
fn unknown_host_key_and_stopped_sshd_fail_cleanly_and_quickly() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sshd = start_sshd(dir);
    let port = sshd.port;

    // A known_hosts that does not know this server: refused, nothing run.
    let other = dir.join("other_known_hosts");
    fs::write(&other, "").unwrap();
    let err = appliance::write_memory(&asa(), &settings(dir, port, other)).unwrap_err();
    assert!(matches!(err, ApplianceError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("Host key verification failed"),
        "{err}"
    );
    assert!(!dir.join("commands.log").exists());

    // sshd stopped: a clean error, quickly, and no file in configs/.
    drop(sshd);
    let configs = dir.join("configs");
    let t = Instant::now();
    let err = appliance::capture_configs(
        &asa(),
        &settings(dir, port, dir.join("known_hosts")),
        &configs,
    )
    .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(err, ApplianceError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert_eq!(fs::read_dir(&configs).unwrap().count(), 0);
}
