//! Bringing a disk back from one of our overlays onto its base image: online (active
//! shallow block commit, wait for convergence, pivot) or offline (`qemu-img commit` and a
//! redefinition of the inactive XML, per the lab notes §3). Used by the session and by the
//! orphan repair.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::hv::{xml, Dom, Hypervisor};
use crate::progress::{Level, Progress, Transfer};

use super::RunLog;

/// Commits the active overlay of `target` into the image directly below it and pivots, then
/// checks the live XML names `base` again. Waits at most `bound` for the commit to converge;
/// on timeout the job is aborted (the disk stays on the overlay, which the journal records).
pub(crate) fn commit_live(
    dom: &Dom,
    target: &str,
    base: &Path,
    bound: Duration,
    progress: &dyn Progress,
    log: &RunLog,
) -> Result<(), String> {
    let t0 = Instant::now();
    match dom.block_job(target).map_err(|e| e.to_string())? {
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
            dom.abort_job(target).map_err(|e| e.to_string())?;
            wait_no_job(dom, target, Duration::from_secs(30))?;
            dom.start_active_commit(target).map_err(|e| e.to_string())?;
        }
        None => dom.start_active_commit(target).map_err(|e| e.to_string())?,
    }
    let what = format!("commit {target}");
    let mut last_pivot_error = String::new();
    loop {
        let job = dom.block_job(target).map_err(|e| e.to_string())?;
        match job {
            None => {
                // The job ended by itself: fine only if the disk is on its base already.
                if on_source(dom, target, base)? {
                    break;
                }
                return Err(format!(
                    "{target}: the commit job vanished and the disk is not on {}",
                    base.display()
                ));
            }
            Some(job) => {
                let elapsed = t0.elapsed();
                progress.transfer(
                    &what,
                    Transfer {
                        done: job.cur,
                        total: job.end,
                        bytes_per_sec: job.cur as f64 / elapsed.as_secs_f64().max(1e-3),
                        elapsed,
                    },
                );
                if job.cur == job.end {
                    match dom.pivot(target) {
                        Ok(()) => break,
                        Err(e) => last_pivot_error = e.to_string(),
                    }
                }
                if elapsed > bound {
                    let _ = dom.abort_job(target);
                    return Err(format!(
                        "{target}: the block commit did not converge within {} s ({} of {} bytes{}); \
                         the job was aborted and the disk stays on its overlay until repaired",
                        bound.as_secs(),
                        job.cur,
                        job.end,
                        if last_pivot_error.is_empty() {
                            String::new()
                        } else {
                            format!("; last pivot error: {last_pivot_error}")
                        }
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pivot is synchronous, but give the live XML a moment to show it.
    let t1 = Instant::now();
    loop {
        if on_source(dom, target, base)? {
            return Ok(());
        }
        if t1.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "{target}: after the pivot the domain is not on {}",
                base.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_no_job(dom: &Dom, target: &str, bound: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while dom.block_job(target).map_err(|e| e.to_string())?.is_some() {
        if t0.elapsed() > bound {
            return Err(format!("{target}: the aborted block job is still there"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether the live (running) or persistent (shut off) definition has `target` on `path`.
pub(crate) fn on_source(dom: &Dom, target: &str, path: &Path) -> Result<bool, String> {
    let live = dom.state().map_err(|e| e.to_string())?.is_live();
    let parsed = dom.parsed(!live).map_err(|e| e.to_string())?;
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
) -> Result<(), String> {
    if overlay.exists() {
        crate::hv::qemu_img::commit(overlay).map_err(|e| e.to_string())?;
    }
    let inactive = dom.xml(true).map_err(|e| e.to_string())?;
    let fixed = xml::point_disk_at(&inactive, target, &base.to_string_lossy(), base_format)
        .map_err(|e| format!("cannot rewrite the domain XML: {e}"))?;
    hv.define(dom.name(), &fixed).map_err(|e| e.to_string())?;
    if !on_source(dom, target, base)? {
        return Err(format!(
            "{target}: after redefinition the domain is not on {}",
            base.display()
        ));
    }
    Ok(())
}
