//! The few libvirt calls the `virt` crate (0.5) has no safe wrapper for: block commit, block
//! job info, block job speed, block job abort (pivot), filesystem thaw and the agent response
//! timeout.
//!
//! Each function takes a live [`virt::domain::Domain`] handle (which owns a reference on the
//! C object for as long as it lives) and turns libvirt's `-1` into [`virt::error::Error`]
//! read from libvirt's thread-local last error. This is the only module of the libvirt layer
//! with `unsafe`.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_uint};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// Flags of [`block_commit`]: commit the active layer into its immediate backing file only.
pub const COMMIT_ACTIVE_SHALLOW: u32 =
    sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;

/// A block job running on one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    /// libvirt's `virDomainBlockJobType` (4 = active commit, 3 = commit, 2 = copy …).
    pub kind: u32,
    /// Progress cursor.
    pub cur: u64,
    /// End of the cursor; `cur == end` (and `end > 0`) means ready to pivot for active commit.
    pub end: u64,
}

impl BlockJob {
    /// A human name for the job type.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_PULL => "pull",
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY => "copy",
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT => "commit",
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT => "active commit",
            sys::VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP => "backup",
            _ => "unknown",
        }
    }

    /// Whether this is an active-layer commit.
    pub fn is_active_commit(&self) -> bool {
        self.kind == sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    }
}

fn cstring(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(Error::from)
}

/// Starts a block commit of `disk` (target name such as `vda`) with `flags`
/// ([`COMMIT_ACTIVE_SHALLOW`] for our overlays). `base`/`top` `None` let libvirt pick them
/// from the flags.
pub fn block_commit(
    dom: &Domain,
    disk: &str,
    base: Option<&str>,
    top: Option<&str>,
    flags: u32,
) -> Result<(), Error> {
    let disk = cstring(disk)?;
    let base = base.map(cstring).transpose()?;
    let top = top.map(cstring).transpose()?;
    let base_ptr = base.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    let top_ptr = top.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: `dom` holds a reference on a valid virDomainPtr for the duration of the call; the
    // C strings live until the end of this function and libvirt only reads them; NULL base/top
    // are documented as "let libvirt choose".
    let rc = unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            base_ptr,
            top_ptr,
            0,
            flags as c_uint,
        )
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// The block job running on `disk`, if any.
pub fn block_job_info(dom: &Domain, disk: &str) -> Result<Option<BlockJob>, Error> {
    let disk = cstring(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `dom` is a valid domain handle; `disk` is a NUL-terminated string alive for the
    // call; `info` is a properly initialised struct that libvirt fills in.
    let rc = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) };
    match rc {
        rc if rc < 0 => Err(Error::last_error()),
        0 => Ok(None),
        _ => Ok(Some(BlockJob {
            kind: info.type_ as u32,
            cur: info.cur,
            end: info.end,
        })),
    }
}

/// Ends the block job on `disk`: with `pivot`, switches the disk to the commit's base (waits
/// for the pivot to complete, no ASYNC flag); without, cancels the job.
pub fn block_job_abort(dom: &Domain, disk: &str, pivot: bool) -> Result<(), Error> {
    let disk = cstring(disk)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: `dom` is a valid domain handle and `disk` a NUL-terminated string alive for the
    // call.
    let rc = unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags as c_uint) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Sets the bandwidth of the block job on `disk`, bytes per second (0: unlimited).
pub fn block_job_set_speed(dom: &Domain, disk: &str, bytes_per_sec: u64) -> Result<(), Error> {
    let disk = cstring(disk)?;
    let bandwidth =
        std::os::raw::c_ulong::try_from(bytes_per_sec).unwrap_or(std::os::raw::c_ulong::MAX);
    // SAFETY: `dom` is a valid domain handle and `disk` a NUL-terminated string alive for the
    // call; the other arguments are plain integers.
    let rc = unsafe {
        sys::virDomainBlockJobSetSpeed(
            dom.as_ptr(),
            disk.as_ptr(),
            bandwidth,
            sys::VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES as c_uint,
        )
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Thaws every frozen guest filesystem through the agent; returns how many were thawed.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: `dom` is a valid domain handle; a NULL mountpoint list with count 0 means "all".
    let rc = unsafe { sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut::<*const c_char>(), 0, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(rc as u32)
}

/// Bounds every guest agent call of this domain (ping, quiesce, thaw) to `seconds`;
/// `None` restores libvirt's default.
pub fn set_agent_timeout(dom: &Domain, seconds: Option<u32>) -> Result<(), Error> {
    let timeout: c_int = match seconds {
        Some(s) => c_int::try_from(s.max(1)).unwrap_or(c_int::MAX),
        None => sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT,
    };
    // SAFETY: `dom` is a valid domain handle; the call takes plain integers.
    let rc = unsafe { sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), timeout, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}
