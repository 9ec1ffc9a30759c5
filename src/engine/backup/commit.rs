//! Bringing a disk back from one of our overlays onto its base image: online (active
//! shallow block commit, wait for convergence, pivot) or offline (`qemu-img commit` and a
//! redefinition of the inactive XML, per the lab notes §3). Used by the session and by the
//! orphan repair.

use std::path::Path;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use crate::error::ErrorKind;
use crate::hv::{xml, Dom, Hypervisor, LibvirtError};
use crate::progress::{Level, Progress, Transfer};

use super::journal::JournalError;
use super::{RunLog, ToolError};

/// Why a disk could not be brought back onto its base image (or the domain restarted).
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// `qemu-img commit` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The journal could not record the progress.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The block job ended by itself but the disk is not on its base.
    #[error("{target}: the commit job vanished and the disk is not on {}", base.display())]
    Vanished {
        /// The disk.
        target: String,
        /// Its base image.
        base: PathBuf,
    },
    /// The block commit did not converge in time, not even with the guest paused; it was
    /// aborted.
    #[error(
        "{target}: the block commit did not converge within {seconds} s, guest pause included \
         ({cur} of {end} bytes{}); the job was aborted and the disk stays on its overlay until \
         repaired",
        last_pivot_error.as_ref().map(|e| format!("; last pivot error: {e}")).unwrap_or_default()
    )]
    NotConverged {
        /// The disk.
        target: String,
        /// The bound.
        seconds: u64,
        /// Bytes committed.
        cur: u64,
        /// Bytes to commit.
        end: u64,
        /// The last refused pivot.
        last_pivot_error: Option<Box<LibvirtError>>,
    },
    /// The guest paused for the commit could not be resumed.
    #[error("{target}: the guest paused so that the commit converges cannot be resumed: {source}")]
    NotResumed {
        /// The disk.
        target: String,
        /// libvirt's error.
        #[source]
        source: LibvirtError,
    },
    /// After the pivot or the redefinition the disk is not on its base.
    #[error("{target}: after {when} the domain is not on {}", base.display())]
    NotOnBase {
        /// The disk.
        target: String,
        /// Its base image.
        base: PathBuf,
        /// `the pivot` or `redefinition`.
        when: &'static str,
    },
    /// An aborted block job does not go away.
    #[error("{target}: the aborted block job is still there")]
    StaleJob {
        /// The disk.
        target: String,
    },
    /// A block job remains on a disk after the commit.
    #[error("{target}: a {job} block job remains after the commit")]
    JobRemains {
        /// The disk.
        target: String,
        /// Its kind.
        job: String,
    },
    /// The inactive XML could not be rewritten.
    #[error("cannot rewrite the domain XML: {0}")]
    Xml(#[source] Box<crate::hv::xml::XmlError>),
    /// An overlay could not be deleted after its commit.
    #[error("cannot delete overlay {}: {source}", path.display())]
    DeleteOverlay {
        /// The overlay.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Several disks failed (each is named).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<CommitError>),
}

impl CommitError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommitError::Libvirt(e) => e.kind(),
            CommitError::Tool(e) => e.kind(),
            CommitError::Journal(e) => e.kind(),
            CommitError::DeleteOverlay { source, .. } => ErrorKind::from_io(source),
            CommitError::Several(all) => all.first().map_or(ErrorKind::Internal, Self::kind),
            _ => ErrorKind::Libvirt,
        }
    }
}

/// The environment variable that throttles every active commit to this many bytes per
/// second (a test hook that makes a commit not converge in time; never set in production).
pub const DEBUG_COMMIT_BANDWIDTH_ENV: &str = "VMB_DEBUG_COMMIT_BANDWIDTH_BYTES";

/// How long a live commit may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitBounds {
    /// Waiting for the job to be ready and pivot while the guest runs.
    pub(crate) converge: Duration,
    /// Then, the guest paused so that the job converges (0: never pause).
    pub(crate) pause_max: Duration,
}

impl CommitBounds {
    /// The bounds of the settings (`commit_seconds`, `commit_pause_max_seconds`).
    pub(crate) fn of(settings: &crate::config::Settings) -> Self {
        Self {
            converge: Duration::from_secs(settings.timeouts.commit_seconds),
            pause_max: Duration::from_secs(settings.timeouts.commit_pause_max_seconds),
        }
    }
}

/// A live commit that pivoted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Committed {
    /// The guest was paused this long so that the commit converged (milliseconds).
    pub(crate) paused_ms: Option<f64>,
}

/// One look at the job: pivoted (or ended on the base), or still pending.
enum Step {
    Done,
    Pending { cur: u64, end: u64 },
}

/// Commits the active overlay of `target` into the image directly below it and pivots, then
/// checks the live XML names `base` again.
///
/// The pivot is tried whenever the job is ready: QEMU's READY (`<mirror ready='yes'>` in the
/// live XML, which stays set while the guest writes) or `cur == end` in the job info; a
/// refused pivot is tried again. If the job has not pivoted within `bounds.converge`, the
/// guest is paused for at most `bounds.pause_max` (any bandwidth limit lifted) so that the job
/// converges, pivoted and resumed: [`Committed::paused_ms`] says so. Only when that fails too
/// is the job aborted (the disk stays on the overlay, which the journal records).
pub(crate) fn commit_live(
    dom: &Dom,
    target: &str,
    base: &Path,
    bounds: CommitBounds,
    progress: &dyn Progress,
    log: &RunLog,
) -> Result<Committed, CommitError> {
    let t0 = Instant::now();
    match dom.block_job(target)? {
        Some(job) if job.is_active_commit() => {
            log.log(
                progress,
                Level::Info,
                &format!("{target}: reusing the active commit job already running"),
            );
        }
        Some(job) => {
            log.log(
                progress,
                Level::Warning,
                &format!(
                    "{target}: aborting a stale {} block job before committing",
                    job.kind_name()
                ),
            );
            dom.abort_job(target)?;
            wait_no_job(dom, target, Duration::from_secs(30))?;
            dom.start_active_commit(target)?;
        }
        None => dom.start_active_commit(target)?,
    }
    if let Some(bytes) = std::env::var(DEBUG_COMMIT_BANDWIDTH_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        log.log(
            progress,
            Level::Warning,
            &format!(
                "{DEBUG_COMMIT_BANDWIDTH_ENV}={bytes}: commit of {target} throttled (test hook)"
            ),
        );
        dom.set_block_job_speed(target, bytes)?;
    }
    let mut last_pivot_error = None;
    let (mut cur, mut end): (u64, u64);
    loop {
        match step(dom, target, base, t0, &mut last_pivot_error, progress)? {
            Step::Done => {
                wait_on_base(dom, target, base)?;
                return Ok(Committed::default());
            }
            Step::Pending { cur: c, end: e } => (cur, end) = (c, e),
        }
        if t0.elapsed() > bounds.converge {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !bounds.pause_max.is_zero() && dom.state()? == crate::hv::DomState::Running {
        log.log(
            progress,
            Level::Warning,
            &format!(
                "{target}: the commit did not converge within {} s ({cur} of {end} bytes): pausing the guest for at most {} s so that it converges",
                bounds.converge.as_secs(),
                bounds.pause_max.as_secs()
            ),
        );
        dom.suspend()?;
        let tp = Instant::now();
        if let Err(e) = dom.set_block_job_speed(target, 0) {
            log.log(
                progress,
                Level::Warning,
                &format!("{target}: cannot lift the commit's bandwidth limit: {e}"),
            );
        }
        let mut outcome = Ok(false);
        while tp.elapsed() < bounds.pause_max {
            match step(dom, target, base, t0, &mut last_pivot_error, progress) {
                Ok(Step::Done) => {
                    outcome = Ok(true);
                    break;
                }
                Ok(Step::Pending { cur: c, end: e }) => (cur, end) = (c, e),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let paused_ms = tp.elapsed().as_secs_f64() * 1000.0;
        let resumed = dom.resume();
        log.log(
            progress,
            Level::Warning,
            &format!(
                "{target}: guest paused {paused_ms:.0} ms for the commit ({})",
                match &outcome {
                    Ok(true) => "pivoted",
                    Ok(false) => "still not converged",
                    Err(_) => "failed",
                }
            ),
        );
        if let Err(source) = resumed {
            return Err(CommitError::NotResumed {
                target: target.to_string(),
                source,
            });
        }
        if outcome? {
            wait_on_base(dom, target, base)?;
            return Ok(Committed {
                paused_ms: Some(paused_ms),
            });
        }
    }
    let _ = dom.abort_job(target);
    Err(CommitError::NotConverged {
        target: target.to_string(),
        seconds: bounds.converge.as_secs() + bounds.pause_max.as_secs(),
        cur,
        end,
        last_pivot_error,
    })
}

/// Looks at the job once: pivots when it is ready.
fn step(
    dom: &Dom,
    target: &str,
    base: &Path,
    t0: Instant,
    last_pivot_error: &mut Option<Box<LibvirtError>>,
    progress: &dyn Progress,
) -> Result<Step, CommitError> {
    let Some(job) = dom.block_job(target)? else {
        // The job ended by itself: fine only if the disk is on its base already.
        if on_source(dom, target, base)? {
            return Ok(Step::Done);
        }
        return Err(CommitError::Vanished {
            target: target.to_string(),
            base: base.to_path_buf(),
        });
    };
    let elapsed = t0.elapsed();
    progress.transfer(
        &format!("commit {target}"),
        Transfer {
            done: job.cur,
            total: job.end,
            bytes_per_sec: job.cur as f64 / elapsed.as_secs_f64().max(1e-3),
            elapsed,
        },
    );
    let ready = (job.end > 0 && job.cur == job.end) || dom.block_job_ready(target)?;
    if ready {
        match dom.pivot(target) {
            Ok(()) => return Ok(Step::Done),
            Err(e) => *last_pivot_error = Some(Box::new(e)),
        }
    }
    Ok(Step::Pending {
        cur: job.cur,
        end: job.end,
    })
}

/// The pivot is synchronous, but give the live XML a moment to show it.
fn wait_on_base(dom: &Dom, target: &str, base: &Path) -> Result<(), CommitError> {
    let t1 = Instant::now();
    loop {
        if on_source(dom, target, base)? {
            return Ok(());
        }
        if t1.elapsed() > Duration::from_secs(10) {
            return Err(CommitError::NotOnBase {
                target: target.to_string(),
                base: base.to_path_buf(),
                when: "the pivot",
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_no_job(dom: &Dom, target: &str, bound: Duration) -> Result<(), CommitError> {
    let t0 = Instant::now();
    while dom.block_job(target)?.is_some() {
        if t0.elapsed() > bound {
            return Err(CommitError::StaleJob {
                target: target.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether the live (running) or persistent (shut off) definition has `target` on `path`.
pub(crate) fn on_source(dom: &Dom, target: &str, path: &Path) -> Result<bool, LibvirtError> {
    let live = dom.state()?.is_live();
    let parsed = dom.parsed(!live)?;
    Ok(parsed
        .disks
        .iter()
        .any(|d| d.target == target && d.source.as_deref() == Some(path)))
}

/// Offline repair of a shut-off domain left on `overlay`: `qemu-img commit` of the overlay
/// into its base, then the inactive XML is redefined with the disk on `base` (format
/// `base_format`) and without `<backingStore>`.
pub(crate) fn commit_offline(
    hv: &Hypervisor,
    dom: &Dom,
    target: &str,
    overlay: &Path,
    base: &Path,
    base_format: &str,
) -> Result<(), CommitError> {
    if overlay.exists() {
        crate::hv::qemu_img::commit(overlay)?;
    }
    redefine_on_base(hv, dom, target, base, base_format, "redefinition")
}

/// Rewrites the persistent definition with `target` on `base` (format `base_format`, no
/// `<backingStore>`) and confirms it: `when` names the step in the error.
fn redefine_on_base(
    hv: &Hypervisor,
    dom: &Dom,
    target: &str,
    base: &Path,
    base_format: &str,
    when: &'static str,
) -> Result<(), CommitError> {
    let inactive = dom.xml(true)?;
    let fixed = xml::point_disk_at(&inactive, target, &base.to_string_lossy(), base_format)
        .map_err(|e| CommitError::Xml(Box::new(e)))?;
    hv.define(dom.name(), &fixed)?;
    let on_base = dom
        .parsed(true)?
        .disks
        .iter()
        .any(|d| d.target == target && d.source.as_deref() == Some(base));
    if !on_base {
        return Err(CommitError::NotOnBase {
            target: target.to_string(),
            base: base.to_path_buf(),
            when,
        });
    }
    Ok(())
}

/// Points the persistent definition of a live domain back at `base` when it still names our
/// `overlay` for `target`, and says whether it had to. libvirt rewrites both definitions at the
/// pivot, but a libvirtd restarted during the commit was once seen to leave the inactive XML on
/// the (then deleted) overlay: the VM would not start after its next shutdown. Only a disk on
/// exactly our overlay is touched, so an administrator's own edit is never undone.
pub(crate) fn persistent_on_base(
    hv: &Hypervisor,
    dom: &Dom,
    target: &str,
    overlay: &Path,
    base: &Path,
    base_format: &str,
) -> Result<bool, CommitError> {
    if !dom.state()?.is_live() || !dom.is_persistent()? {
        return Ok(false);
    }
    let on_overlay = dom
        .parsed(true)?
        .disks
        .iter()
        .any(|d| d.target == target && d.source.as_deref() == Some(overlay));
    if !on_overlay {
        return Ok(false);
    }
    redefine_on_base(
        hv,
        dom,
        target,
        base,
        base_format,
        "the redefinition of the persistent XML",
    )?;
    Ok(true)
}
