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

    /// Whether this is a block copy (mirror).
    pub fn is_copy(&self) -> bool {
        self.kind == sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
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

/// Flags of [`block_copy`] for an instant restore: the destination exists (created by us, no
/// backing file), the whole chain is copied (not shallow: the result stands alone), and the
/// job is transient (libvirt 9.0 refuses a block copy of a persistent domain without it).
pub const COPY_REUSE_FULL_TRANSIENT: u32 =
    sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;

/// Starts a block copy (`virDomainBlockCopy`) of `disk` to the destination described by
/// `dest_xml` (a `<disk>` element), with `flags`; no typed parameters.
pub fn block_copy(dom: &Domain, disk: &str, dest_xml: &str, flags: u32) -> Result<(), Error> {
    let disk = cstring(disk)?;
    let dest = cstring(dest_xml)?;
    // SAFETY: `dom` is a valid domain handle; both strings are NUL-terminated and alive for
    // the call; a NULL parameter array with count 0 means "no parameters".
    let rc = unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            disk.as_ptr(),
            dest.as_ptr(),
            ptr::null_mut(),
            0,
            flags as c_uint,
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

/// Freezes every guest filesystem through the agent; returns how many were frozen.
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: `dom` is a valid domain handle; a NULL mountpoint list with count 0 means "all".
    let rc =
        unsafe { sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut::<*const c_char>(), 0, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(rc as u32)
}

/// Creates a checkpoint from `xml` (`<domaincheckpoint>`), with the quiesce flag when asked.
pub fn checkpoint_create(dom: &Domain, xml: &str, quiesce: bool) -> Result<(), Error> {
    let xml = cstring(xml)?;
    let flags = if quiesce {
        sys::VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE
    } else {
        0
    };
    // SAFETY: `dom` is a valid domain handle and `xml` a NUL-terminated string alive for the
    // call; the returned checkpoint object, when not NULL, is ours and freed right away.
    let ck = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
    if ck.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: `ck` is a non-NULL checkpoint reference returned above, freed once.
    unsafe { sys::virDomainCheckpointFree(ck) };
    Ok(())
}

/// The names of every checkpoint of the domain (libvirt metadata).
pub fn checkpoint_names(dom: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: `dom` is a valid domain handle; libvirt allocates `list` (an array of `rc`
    // checkpoint references) which we free below, each element and then the array.
    let rc = unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    let mut names = Vec::with_capacity(rc as usize);
    for i in 0..rc as usize {
        // SAFETY: `list` has `rc` valid elements (libvirt's contract for a non-negative rc).
        let ck = unsafe { *list.add(i) };
        // SAFETY: `ck` is a valid checkpoint; the name pointer belongs to it and is copied
        // before the checkpoint is freed.
        let name = unsafe { sys::virDomainCheckpointGetName(ck) };
        if !name.is_null() {
            // SAFETY: libvirt returns a NUL-terminated string owned by `ck`, alive here.
            let s = unsafe { std::ffi::CStr::from_ptr(name) };
            names.push(s.to_string_lossy().into_owned());
        }
        // SAFETY: each element is a reference the list gave us, freed exactly once.
        unsafe { sys::virDomainCheckpointFree(ck) };
    }
    if !list.is_null() {
        // SAFETY: the array was allocated by libvirt with malloc; freed once with free().
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

/// Deletes the checkpoint `name` (its bitmap merges into its parent's).
pub fn checkpoint_delete(dom: &Domain, name: &str, metadata_only: bool) -> Result<(), Error> {
    let name = cstring(name)?;
    // SAFETY: `dom` is a valid domain handle and `name` a NUL-terminated string alive for
    // the call; a non-NULL result is a reference we free below.
    let ck = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    if ck.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: `ck` is a valid checkpoint reference.
    let flags = if metadata_only {
        sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    } else {
        0
    };
    let rc = unsafe { sys::virDomainCheckpointDelete(ck, flags) };
    let err = (rc < 0).then(Error::last_error);
    // SAFETY: `ck` is freed exactly once, after its last use.
    unsafe { sys::virDomainCheckpointFree(ck) };
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Starts a backup job from `backup_xml` (`<domainbackup>`), creating the checkpoint in
/// `checkpoint_xml` at the same instant when given.
pub fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), Error> {
    let backup = cstring(backup_xml)?;
    let ck = checkpoint_xml.map(cstring).transpose()?;
    let ck_ptr = ck.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: `dom` is a valid domain handle; both strings are NUL-terminated and alive for
    // the call (NULL checkpoint XML means "no checkpoint").
    let rc = unsafe { sys::virDomainBackupBegin(dom.as_ptr(), backup.as_ptr(), ck_ptr, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Aborts the domain's current job (a backup job here).
pub fn abort_domain_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: `dom` is a valid domain handle; the call takes no other argument.
    let rc = unsafe { sys::virDomainAbortJob(dom.as_ptr()) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}
