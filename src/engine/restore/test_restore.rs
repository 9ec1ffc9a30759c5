//! Test restores: restore a backup under a temporary name with no network, boot it, judge it,
//! record the verdict, and leave nothing behind.
//!
//! The temporary domain is `<vm>-testrestore-<8 hex>`, its disks and NVRAM go to
//! `<work_dir>/<temporary name>/`, and it has no `<interface>`. A VM whose XML has a guest-agent
//! channel passes when its agent answers: the live XML shows the channel `state='connected'`
//! and a libvirt call served by the agent (`virDomainGetHostname` with the agent source)
//! returns. A VM without an agent passes when it keeps running for the configured time.
//! The verdict goes into the backup's `backup-metadata.json` (`test_restore`) and the catalog.
//!
//! Whatever happens — a damaged backup, a failed define, a guest that never boots, a
//! cancellation, a panic — a guard destroys the domain, undefines it with its NVRAM, and
//! removes its folder.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{locate, restore, RestoreError, RestoreRequest, StampChoice};
use crate::format::layout;
use crate::format::metadata::{BackupMetadata, Verdict};
use crate::hv::{xml, Dom, DomState, Hypervisor, LibvirtError, Nvram};
use crate::progress::{CancelToken, Level, Progress};

/// Why a test restore failed: the verdict's detail.
#[derive(Debug, thiserror::Error)]
enum TestFailure {
    /// The work folder could not be made.
    #[error("work folder: {0}")]
    WorkDir(#[source] std::io::Error),
    /// The backup failed verification.
    #[error("backup damaged: {0}")]
    Damaged(String),
    /// The restore failed for another reason.
    #[error("restore failed: {0}")]
    Restore(#[source] RestoreError),
    /// The restored domain is not defined.
    #[error("restored domain not found: {0}")]
    NotDefined(#[source] LibvirtError),
    /// The domain did not start.
    #[error("start failed: {0}")]
    Start(#[source] LibvirtError),
    /// Another libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The test was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The guest stopped running.
    #[error("domain left the running state after {seconds:.1} s: {state}")]
    Stopped {
        /// Seconds since the start.
        seconds: f64,
        /// The state it is in.
        state: DomState,
    },
    /// The guest agent never answered.
    #[error("guest agent did not answer within {seconds} s ({last})")]
    AgentSilent {
        /// The bound.
        seconds: u64,
        /// The last thing seen.
        last: AgentSeen,
    },
}

/// The last thing seen of the guest agent while waiting for it.
#[derive(Debug)]
enum AgentSeen {
    /// The live XML does not say `connected`.
    NotConnected,
    /// The channel's state in the live XML.
    Channel(String),
    /// Connected, but the call served by the agent failed.
    NotAnswering(LibvirtError),
}

impl std::fmt::Display for AgentSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentSeen::NotConnected => f.write_str("agent channel not connected"),
            AgentSeen::Channel(state) => write!(f, "agent channel {state}"),
            AgentSeen::NotAnswering(e) => write!(f, "agent connected but not answering: {e}"),
        }
    }
}

/// What to test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestRestoreRequest {
    /// The backup target.
    pub target: PathBuf,
    /// The hypervisor folder.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Which backup.
    pub stamp: StampChoice,
    /// The backup folder itself, overriding target/host/vm/stamp.
    pub backup_dir: Option<PathBuf>,
    /// The libvirt URI.
    pub libvirt_uri: String,
    /// Where the temporary disks go (each test in its own sub-folder).
    pub work_dir: PathBuf,
    /// How long an agent VM may take until its agent answers.
    pub boot_timeout: Duration,
    /// How long a VM without agent must keep running.
    pub run_time: Duration,
}

/// What a test restore found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestRestoreOutcome {
    /// The backup folder tested.
    pub backup_dir: PathBuf,
    /// Its stamp.
    pub stamp: String,
    /// The temporary domain name.
    pub temp_name: String,
    /// Whether the guest agent was the criterion.
    pub agent: bool,
    /// The verdict (also recorded in the metadata).
    pub verdict: Verdict,
    /// Seconds from start to verdict.
    pub seconds: f64,
    /// Whether everything was removed afterwards (domain, NVRAM, disks).
    pub cleaned_up: bool,
    /// What could not be removed, if anything.
    pub cleanup_problems: Vec<String>,
}

/// The temporary domain and its folder; removed on drop.
struct TempDomain {
    uri: String,
    name: String,
    dir: PathBuf,
    done: bool,
}

impl TempDomain {
    /// Destroys and undefines the domain (with NVRAM) and removes its folder.
    fn cleanup(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut problems = Vec::new();
        match Hypervisor::connect(&self.uri) {
            Err(e) => problems.push(e.to_string()),
            Ok(hv) => match hv.find_domain(&self.name) {
                Ok(Some(d)) => {
                    if d.is_active().unwrap_or(false) {
                        if let Err(e) = d.destroy() {
                            problems.push(format!("destroy {}: {e}", self.name));
                        }
                    }
                    if let Err(e) = d.undefine(Nvram::Remove) {
                        problems.push(format!("undefine {}: {e}", self.name));
                    }
                }
                Ok(None) => {}
                Err(e) => problems.push(format!("lookup {}: {e}", self.name)),
            },
        }
        if self.dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                problems.push(format!("remove {}: {e}", self.dir.display()));
            }
        }
        problems
    }
}

impl Drop for TempDomain {
    fn drop(&mut self) {
        for p in self.cleanup() {
            tracing::error!(problem = %p, "test-restore cleanup");
        }
    }
}

/// Runs a test restore and records its verdict. An unusable backup or a guest that does not
/// boot is a failed verdict (`Ok` with `verdict.ok == false`); `Err` means the test could not
/// be run at all (no such backup, metadata unreadable).
pub fn run(
    request: &TestRestoreRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<TestRestoreOutcome, RestoreError> {
    let started = Instant::now();
    let mut base = RestoreRequest::new(
        &request.target,
        &request.host,
        &request.vm,
        request.stamp.clone(),
    );
    base.backup_dir = request.backup_dir.clone();
    let (dir, stamp) = locate(&base)?;
    let meta = BackupMetadata::read(&dir).map_err(|e| RestoreError::Unreadable {
        path: dir.join(layout::METADATA_FILE),
        source: e,
    })?;
    let vm_safe = layout::safe_component(&meta.vm_name)?;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let temp_name = format!("{vm_safe}-testrestore-{suffix}");
    let work = request.work_dir.join(&temp_name);

    check_traversable(&request.work_dir)?;
    let mut guard = TempDomain {
        uri: request.libvirt_uri.clone(),
        name: temp_name.clone(),
        dir: work.clone(),
        done: false,
    };
    let mut agent = false;
    let verdict = (|| -> Result<String, TestFailure> {
        prepare_dir(&request.work_dir).map_err(TestFailure::WorkDir)?;
        prepare_dir(&work).map_err(TestFailure::WorkDir)?;
        let mut req = base.clone();
        req.backup_dir = Some(dir.clone());
        req.new_name = Some(temp_name.clone());
        req.disk_dir = Some(work.clone());
        req.strip_interfaces = true;
        req.libvirt_uri = request.libvirt_uri.clone();
        let outcome = restore(&req, progress, cancel).map_err(|e| match e {
            RestoreError::Damaged { detail, .. } => TestFailure::Damaged(detail),
            other => TestFailure::Restore(other),
        })?;
        let hv = Hypervisor::connect(&request.libvirt_uri)?;
        let domain = hv.domain(&temp_name).map_err(TestFailure::NotDefined)?;
        agent = domain.parsed(true).is_ok_and(|x| x.agent.present());
        progress.message(
            Level::Info,
            &format!(
                "booting {temp_name} ({} disk(s) restored, no network)",
                outcome.disks.len()
            ),
        );
        domain.start().map_err(TestFailure::Start)?;
        let boot = Instant::now();
        if agent {
            wait_for_agent(&domain, request.boot_timeout, cancel, boot)
        } else {
            keep_running(&domain, request.run_time, cancel, boot)
        }
    })();
    let cleanup_problems = guard.cleanup();
    drop(guard);
    let (ok, mut detail) = match verdict {
        Ok(d) => (true, d),
        Err(e) => (false, e.to_string()),
    };
    if !cleanup_problems.is_empty() {
        detail.push_str(&format!(
            " (cleanup incomplete: {})",
            cleanup_problems.join("; ")
        ));
    }
    let verdict = Verdict {
        at: chrono::Local::now().to_rfc3339(),
        ok,
        detail,
    };
    progress.message(
        if ok { Level::Info } else { Level::Error },
        &format!(
            "test restore {}: {}",
            if ok { "passed" } else { "FAILED" },
            verdict.detail
        ),
    );
    record(&request.target, &dir, &verdict);
    Ok(TestRestoreOutcome {
        backup_dir: dir,
        stamp,
        temp_name,
        agent,
        verdict,
        seconds: started.elapsed().as_secs_f64(),
        cleaned_up: cleanup_problems.is_empty(),
        cleanup_problems,
    })
}

/// Creates a folder the QEMU user can traverse (libvirt's DAC driver chowns the files, not
/// the folders).
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut perms = fs::metadata(dir)?.permissions();
    perms.set_mode(perms.mode() | 0o755);
    fs::set_permissions(dir, perms)
}

/// Refuses a work folder below a folder that the QEMU user cannot traverse (libvirt's DAC
/// driver chowns the images, not their folders), with a message that says which one.
fn check_traversable(dir: &Path) -> Result<(), RestoreError> {
    for ancestor in dir.ancestors().skip(1) {
        if let Ok(meta) = fs::metadata(ancestor) {
            if meta.permissions().mode() & 0o001 == 0 {
                return Err(RestoreError::NotTraversable {
                    dir: ancestor.to_path_buf(),
                    mode: meta.permissions().mode() & 0o7777,
                });
            }
        }
    }
    Ok(())
}

fn wait_for_agent(
    domain: &Dom,
    timeout: Duration,
    cancel: &CancelToken,
    boot: Instant,
) -> Result<String, TestFailure> {
    let mut last = AgentSeen::NotConnected;
    while boot.elapsed() < timeout {
        if cancel.is_cancelled() {
            return Err(TestFailure::Cancelled);
        }
        still_running(domain, boot)?;
        let live = domain.xml(false)?;
        let state = xml::parse_domain(&live)
            .ok()
            .and_then(|x| x.agent.state().map(str::to_string))
            .unwrap_or_default();
        if state == "connected" {
            match domain.agent_hostname() {
                Ok(host) => {
                    return Ok(format!(
                        "booted; guest agent answered after {:.1} s (hostname {host:?})",
                        boot.elapsed().as_secs_f64()
                    ))
                }
                Err(e) => last = AgentSeen::NotAnswering(e),
            }
        } else if !state.is_empty() {
            last = AgentSeen::Channel(state);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(TestFailure::AgentSilent {
        seconds: timeout.as_secs(),
        last,
    })
}

fn keep_running(
    domain: &Dom,
    run_time: Duration,
    cancel: &CancelToken,
    boot: Instant,
) -> Result<String, TestFailure> {
    while boot.elapsed() < run_time {
        if cancel.is_cancelled() {
            return Err(TestFailure::Cancelled);
        }
        still_running(domain, boot)?;
        std::thread::sleep(Duration::from_millis(500));
    }
    still_running(domain, boot)?;
    Ok(format!(
        "booted and kept running for {} s (no guest agent)",
        run_time.as_secs()
    ))
}

fn still_running(domain: &Dom, boot: Instant) -> Result<(), TestFailure> {
    match domain.state()? {
        DomState::Running => Ok(()),
        state => Err(TestFailure::Stopped {
            seconds: boot.elapsed().as_secs_f64(),
            state,
        }),
    }
}

/// Records the verdict in the metadata and the catalog; failures are logged.
fn record(target: &Path, dir: &Path, verdict: &Verdict) {
    match BackupMetadata::read(dir) {
        Ok(mut meta) => {
            meta.test_restore = Some(verdict.clone());
            if let Err(e) = crate::store::write_metadata(dir, &meta) {
                tracing::error!(error = %e, "test-restore verdict not written to the metadata");
                return;
            }
            if let Err(e) = crate::store::catalog::record_verdict(target, &meta, dir) {
                tracing::warn!(error = %e, "test-restore verdict not recorded in the catalog");
            }
        }
        Err(e) => tracing::error!(error = %e, "test-restore verdict not recorded"),
    }
}
