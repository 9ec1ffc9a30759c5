//! Cisco ASAv (and other agent-less appliances): `write memory` before the snapshot and
//! configuration capture over SSH after the copy.
//!
//! The backup workflow calls (through [`SshAppliance`], the engine's hook) [`write_memory`] before the snapshot, so that the disk image holds
//! the running configuration, and [`capture_configs`] after the copy, which saves the output of
//! `show running-config`, `show startup-config`, `show version` and `show failover` into the
//! backup's `configs/` folder, one file per command (`show-running-config.txt`, …).
//!
//! SSH goes through the OpenSSH client (`ssh`), not a Rust SSH library: it is what
//! administrators already trust and configure, it handles every key type and host-key format,
//! and it needs no network code of ours. It runs with no user configuration (`-F /dev/null`),
//! `BatchMode=yes` (never a prompt), `StrictHostKeyChecking=yes` against the configured
//! `known_hosts` only, the configured key only (`IdentitiesOnly=yes`), and `ConnectTimeout`.
//! Each command runs on its own exec channel and is killed when it overruns
//! `ssh.command_timeout_seconds`; a connection failure stops the capture at once, so an
//! unreachable appliance costs one connect timeout, not four.
//!
//! Errors are warnings for a backup (exit 3), never a lost backup.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Ssh, VmEntry};
use crate::engine::backup::{ApplianceFailure, ApplianceHook};

/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 10;
/// Default bound on one command, connection included.
pub const DEFAULT_COMMAND_TIMEOUT: u64 = 60;

/// The commands captured after the copy, and the file each one's output goes to.
pub const CAPTURE_COMMANDS: [(&str, &str); 4] = [
    ("show running-config", "show-running-config.txt"),
    ("show startup-config", "show-startup-config.txt"),
    ("show version", "show-version.txt"),
    ("show failover", "show-failover.txt"),
];

/// Errors talking to an appliance. They are warnings for a backup (exit 3), never a lost backup.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// The inventory or configuration lacks what SSH needs.
    #[error("appliance {vm}: {what} is not configured")]
    NotConfigured {
        /// The VM.
        vm: String,
        /// What is missing (`address`, `ssh.known_hosts`…).
        what: &'static str,
    },
    /// The `ssh` client could not be started.
    #[error("cannot run ssh: {0}")]
    Spawn(#[source] std::io::Error),
    /// A command overran its bound and was killed.
    #[error("appliance {vm}: `{command}` did not finish within {seconds} s")]
    Timeout {
        /// The VM.
        vm: String,
        /// The command.
        command: String,
        /// The bound.
        seconds: u64,
    },
    /// ssh could not connect or authenticate (exit 255).
    #[error("appliance {vm}: cannot connect over ssh: {detail}")]
    Connect {
        /// The VM.
        vm: String,
        /// ssh's own message.
        detail: String,
    },
    /// The command ran and failed.
    #[error("appliance {vm}: `{command}` failed (exit {code}): {detail}")]
    Command {
        /// The VM.
        vm: String,
        /// The command.
        command: String,
        /// Its exit code.
        code: i32,
        /// Its error output.
        detail: String,
    },
    /// The appliance did not confirm `write memory` with `[OK]`.
    #[error("appliance {vm}: `write memory` was not confirmed: {output}")]
    NotConfirmed {
        /// The VM.
        vm: String,
        /// The end of what it answered.
        output: String,
    },
    /// A configuration file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Some commands were captured and others failed.
    #[error("appliance {vm}: captured {written:?}, but: {failures}")]
    Partial {
        /// The VM.
        vm: String,
        /// Files written, relative to the configs folder.
        written: Vec<String>,
        /// What failed.
        failures: String,
    },
}

/// The engine's [`ApplianceHook`] over SSH ([`write_memory`], [`capture_configs`]): what the
/// drivers put in the backup request.
#[derive(Debug, Clone, Copy, Default)]
pub struct SshAppliance;

impl ApplianceHook for SshAppliance {
    fn write_memory(&self, vm: &VmEntry, ssh: &Ssh) -> Result<(), ApplianceFailure> {
        write_memory(vm, ssh).map_err(ApplianceFailure::from)
    }

    fn capture_configs(
        &self,
        vm: &VmEntry,
        ssh: &Ssh,
        dir: &Path,
    ) -> Result<Vec<String>, ApplianceFailure> {
        capture_configs(vm, ssh, dir).map_err(ApplianceFailure::from)
    }
}

/// Saves the running configuration to the startup configuration (`write memory`) before the
/// snapshot, so the disk image holds the current configuration.
pub fn write_memory(vm: &VmEntry, ssh: &Ssh) -> Result<(), ApplianceError> {
    let output = run_remote(vm, ssh, "write memory")?;
    if output.contains("[OK]") {
        tracing::info!(vm = %vm.name, "write memory confirmed");
        Ok(())
    } else {
        Err(ApplianceError::NotConfirmed {
            vm: vm.name.clone(),
            output: tail(&output, 200),
        })
    }
}

/// Captures running-config, startup-config, version and failover state into `configs_dir`;
/// returns the file names written, relative to `configs_dir`.
pub fn capture_configs(
    vm: &VmEntry,
    ssh: &Ssh,
    configs_dir: &Path,
) -> Result<Vec<String>, ApplianceError> {
    std::fs::create_dir_all(configs_dir).map_err(|source| ApplianceError::Write {
        path: configs_dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    let mut failures = Vec::new();
    for (command, file) in CAPTURE_COMMANDS {
        match run_remote(vm, ssh, command) {
            Ok(output) => {
                let path = configs_dir.join(file);
                crate::store::write_atomic(&path, output.as_bytes()).map_err(|e| {
                    ApplianceError::Write {
                        path,
                        source: e.into(),
                    }
                })?;
                written.push(file.to_string());
            }
            // No connection: the other commands would fail the same way, only slower.
            Err(e @ (ApplianceError::Connect { .. } | ApplianceError::Timeout { .. }))
                if written.is_empty() =>
            {
                return Err(e)
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(written)
    } else {
        Err(ApplianceError::Partial {
            vm: vm.name.clone(),
            written,
            failures: failures.join("; "),
        })
    }
}

/// The `ssh` command line for one remote command (without running it).
pub fn ssh_command(vm: &VmEntry, ssh: &Ssh, remote: &str) -> Result<Command, ApplianceError> {
    let missing = |what| ApplianceError::NotConfigured {
        vm: vm.name.clone(),
        what,
    };
    let address = vm.address.as_deref().ok_or_else(|| missing("address"))?;
    if address.is_empty() || address.starts_with('-') {
        return Err(missing("a valid address"));
    }
    let known_hosts = ssh
        .known_hosts
        .as_ref()
        .ok_or_else(|| missing("ssh.known_hosts"))?;
    let identity = ssh
        .identity_file
        .as_ref()
        .ok_or_else(|| missing("ssh.identity_file"))?;
    let connect = ssh
        .connect_timeout_seconds
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut cmd = Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-T"])
        .args(["-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "IdentitiesOnly=yes"])
        .arg("-o")
        .arg(format!("ConnectTimeout={connect}"))
        .args([
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=2",
        ])
        .args(["-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(identity)
        .arg("-p")
        .arg(ssh.port.unwrap_or(22).to_string());
    if let Some(user) = &ssh.user {
        cmd.arg("-l").arg(user);
    }
    cmd.arg("--").arg(address).arg(remote);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// Runs one command on the appliance within the configured bound; returns its output.
fn run_remote(vm: &VmEntry, ssh: &Ssh, remote: &str) -> Result<String, ApplianceError> {
    let mut cmd = ssh_command(vm, ssh, remote)?;
    let bound = ssh
        .command_timeout_seconds
        .unwrap_or(DEFAULT_COMMAND_TIMEOUT);
    let mut child = cmd.spawn().map_err(ApplianceError::Spawn)?;
    let pipe_reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = pipe_reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = pipe_reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + Duration::from_secs(bound);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(ApplianceError::Spawn(e)),
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ApplianceError::Timeout {
            vm: vm.name.clone(),
            command: remote.to_string(),
            seconds: bound,
        });
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status.code() {
        Some(0) => Ok(stdout),
        Some(255) => Err(ApplianceError::Connect {
            vm: vm.name.clone(),
            detail: tail(&stderr, 300),
        }),
        code => Err(ApplianceError::Command {
            vm: vm.name.clone(),
            command: remote.to_string(),
            code: code.unwrap_or(-1),
            detail: tail(
                if stderr.trim().is_empty() {
                    &stdout
                } else {
                    &stderr
                },
                300,
            ),
        }),
    }
}

/// The last `max` bytes of a text, trimmed, on a character boundary.
fn tail(text: &str, max: usize) -> String {
    let t = text.trim();
    let mut start = t.len().saturating_sub(max);
    while !t.is_char_boundary(start) {
        start += 1;
    }
    t[start..].replace('\n', " | ")
}

impl ApplianceError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ApplianceError::NotConfigured { .. } => ErrorKind::Config,
            ApplianceError::Spawn { .. } => ErrorKind::Tool,
            ApplianceError::Timeout { .. } => ErrorKind::Tool,
            ApplianceError::Connect { .. } => ErrorKind::Tool,
            ApplianceError::Command { .. } => ErrorKind::Tool,
            ApplianceError::NotConfirmed { .. } => ErrorKind::Tool,
            ApplianceError::Write { .. } => ErrorKind::TargetFailing,
            ApplianceError::Partial { .. } => ErrorKind::Tool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(address: Option<&str>) -> VmEntry {
        VmEntry {
            name: "asa1".into(),
            method: Default::default(),
            priority: 10,
            retention: Default::default(),
            appliance: Some("asav".into()),
            address: address.map(str::to_string),
            client: None,
        }
    }

    #[test]
    fn missing_settings_are_named() {
        let ssh = Ssh::default();
        let e = ssh_command(&entry(None), &ssh, "x").unwrap_err();
        assert!(e.to_string().contains("address"), "{e}");
        let e = ssh_command(&entry(Some("-oProxyCommand=x")), &ssh, "x").unwrap_err();
        assert!(e.to_string().contains("valid address"), "{e}");
        let e = ssh_command(&entry(Some("10.0.0.1")), &ssh, "x").unwrap_err();
        assert!(e.to_string().contains("known_hosts"), "{e}");
    }

    #[test]
    fn the_command_line_is_strict() {
        let ssh = Ssh {
            user: Some("backup".into()),
            identity_file: Some("/k".into()),
            known_hosts: Some("/kh".into()),
            port: Some(2222),
            connect_timeout_seconds: Some(3),
            command_timeout_seconds: None,
        };
        let cmd = ssh_command(&entry(Some("asa.example")), &ssh, "show version").unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for want in [
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/kh",
            "ConnectTimeout=3",
            "-i /k",
            "-p 2222",
            "-l backup",
            "-- asa.example show version",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
    }
}
