//! Thawing a guest a quiesce may have frozen, until the thaw is confirmed.
//!
//! libvirt freezes, snapshots and thaws inside one call. When that call fails (the agent
//! hangs, the snapshot fails), libvirt may not thaw, and a freeze still queued in a hung agent
//! runs when the agent wakes up. So after a failed quiesced snapshot the guest counts as
//! possibly frozen (`may_be_frozen` in the journal) until a thaw call succeeds: the agent
//! processes its channel in order, so a thaw answered after the queued freeze leaves the guest
//! thawed. [`thaw_confirmed`] retries within a bound; what still fails stays in the journal
//! for `vm-backup orphans --cleanup` and the next run of the VM, and is an error (exit 2),
//! never a warning.

use std::time::{Duration, Instant};

use crate::error::ErrorKind;
use crate::hv::{Dom, LibvirtError};
use crate::progress::{Level, Progress};

use super::RunLog;

/// The guest may still be frozen: no thaw call succeeded within the bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "the guest {vm:?} may still be frozen: {attempts} thaw attempt(s) over {seconds} s failed \
     (last: {last}); it stays recorded in the journal and `vm-backup orphans --cleanup` or the \
     next backup of this VM thaws it"
)]
pub struct ThawError {
    /// The domain.
    pub vm: String,
    /// Thaw calls made.
    pub attempts: u32,
    /// The bound, seconds.
    pub seconds: u64,
    /// The last refusal.
    #[source]
    pub last: LibvirtError,
}

impl ThawError {
    /// What kind of failure this is: the guest agent (always fatal).
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::GuestAgent
    }
}

/// How long the release path keeps trying to thaw: three agent timeouts and ten seconds.
pub(crate) fn thaw_bound(agent_seconds: u64) -> Duration {
    Duration::from_secs(agent_seconds.clamp(1, 3600) * 3 + 10)
}

/// Calls `virDomainFSThaw` until one call succeeds or `bound` has passed (at least one call);
/// returns how many filesystems the successful call thawed. The domain's agent timeout bounds
/// each call.
pub(crate) fn thaw_confirmed(
    dom: &Dom,
    bound: Duration,
    progress: &dyn Progress,
    log: &RunLog,
) -> Result<u32, ThawError> {
    let t0 = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match dom.fs_thaw() {
            Ok(n) => {
                log.log(
                    progress,
                    Level::Info,
                    &format!(
                        "thaw confirmed after {attempts} attempt(s) in {:.1} s: {n} filesystem(s) were frozen",
                        t0.elapsed().as_secs_f64()
                    ),
                );
                return Ok(n);
            }
            Err(e) if t0.elapsed() >= bound => {
                return Err(ThawError {
                    vm: dom.name().to_string(),
                    attempts,
                    seconds: bound.as_secs(),
                    last: e,
                })
            }
            Err(e) => {
                log.log(
                    progress,
                    Level::Warning,
                    &format!("thaw attempt {attempts} failed ({e}); trying again"),
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thaw_bound_outlasts_several_agent_timeouts() {
        assert_eq!(thaw_bound(3), Duration::from_secs(19));
        assert_eq!(thaw_bound(0), Duration::from_secs(13));
        assert!(thaw_bound(10) > Duration::from_secs(30));
    }
}
