//! The verify-on-read server ([`crate::store::verified_read`]) as a process of its own:
//! started by `mount`, `files` and `restore --instant` as `PROGRAM verified-serve SPEC`, it
//! mounts a read-only FUSE folder serving backup files, each chunk checked against its manifest
//! on its first read. It outlives the command that started it (its own process group), so its
//! pieces live in a work folder the caller records before starting it: the spec
//! ([`SPEC_FILE`]), the pid ([`PID_FILE`]), its log ([`LOG_FILE`]) and the damage report
//! ([`crate::store::verified_read::DAMAGE_FILE`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::hv::export;
use crate::store::verified_read::ServeSpec;

/// What the hidden server command is called (`vm-backup verified-serve SPEC`).
pub const SERVE_COMMAND: &str = "verified-serve";
/// The server's spec, in the work folder.
pub const SPEC_FILE: &str = "spec.json";
/// The server's pid, in the work folder.
pub const PID_FILE: &str = "verifier.pid";
/// The server's standard error, in the work folder.
pub const LOG_FILE: &str = "verifier.log";

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// A file of the work folder could not be written, or the program not started.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server ended before it reported its folder mounted; its log says why.
    #[error("the verify-on-read server did not start: {0}")]
    Start(String),
}

impl VerifierError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            VerifierError::Io { source, .. } => ErrorKind::from_io(source),
            VerifierError::Start(_) => ErrorKind::Tool,
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VerifierError {
    let context = context.into();
    move |source| VerifierError::Io { context, source }
}

/// Starts `helper verified-serve <workdir>/spec.json` serving `spec` and waits for its
/// "ready" line (the FUSE folder is mounted then). Returns its pid, also written to
/// `<workdir>/verifier.pid`. The server outlives this process.
pub fn start(helper: &Path, workdir: &Path, spec: &ServeSpec) -> Result<u32, VerifierError> {
    let spec_file = workdir.join(SPEC_FILE);
    let text = serde_json::to_vec(spec).map_err(|e| VerifierError::Io {
        context: "cannot encode the server spec".into(),
        source: e.into(),
    })?;
    std::fs::write(&spec_file, text)
        .map_err(io(format!("cannot write {}", spec_file.display())))?;
    let log_path = workdir.join(LOG_FILE);
    let log = std::fs::File::create(&log_path)
        .map_err(io(format!("cannot create {}", log_path.display())))?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(helper)
            .arg(SERVE_COMMAND)
            .arg(&spec_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(io(format!("cannot start {}", helper.display())))?
    };
    let pid = child.id();
    let pid_file = workdir.join(PID_FILE);
    std::fs::write(&pid_file, pid.to_string())
        .map_err(io(format!("cannot write {}", pid_file.display())))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(VerifierError::Start(log.trim().to_string()));
    }
    // The server outlives this command; it is reaped by init when it ends.
    drop(child);
    Ok(pid)
}

/// The pid of the server of `workdir`, when it runs (a recycled pid is never taken for it).
pub fn running(workdir: &Path) -> Option<u32> {
    export::read_pid(&workdir.join(PID_FILE))
        .filter(|p| export::process_matches(*p, &workdir.to_string_lossy()))
}

/// Takes the server of `workdir` down: its FUSE folder `mountpoint` unmounted (lazily when
/// busy or dead), then the process stopped. Every step tolerates a piece already gone; returns
/// what was done.
pub fn stop(workdir: &Path, mountpoint: &Path) -> Result<Vec<String>, export::ExportError> {
    let mut done = Vec::new();
    if export::is_mounted(mountpoint) {
        export::unmount(mountpoint, false).or_else(|_| export::unmount(mountpoint, true))?;
        done.push(format!(
            "verify-on-read folder {} unmounted",
            mountpoint.display()
        ));
    }
    if let Some(pid) = export::read_pid(&workdir.join(PID_FILE)) {
        if export::stop_process(pid, &workdir.to_string_lossy(), Duration::from_secs(5)) {
            done.push(format!("verify-on-read server {pid} stopped"));
        }
    }
    Ok(done)
}

/// The mount points under `dir` (a work folder is removed only when none is left).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    export::mounts()
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(dir))
        .collect()
}
