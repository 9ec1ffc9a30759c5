//! What makes a folder a backup target, and what keeps it private and safe:
//!
//! - the marker `.vm-backup-target.json` written by `vm-backup init` (an id, a format version,
//!   the creation time, the group if any): a folder without it is refused by every command, so
//!   an unmounted share (an empty mount point on the local disk) never receives a backup;
//! - modes: files 0600 and folders 0700, or 0640 and 2750 (setgid, so the group is inherited)
//!   under a target initialised with a group. The mode is set explicitly after creation, so the
//!   umask never widens or narrows it;
//! - no symlink followed: every folder below the root is entered and created relative to its
//!   parent's handle with `O_NOFOLLOW` ([`super::dirfd`]), files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` and opened with `O_NOFOLLOW` relative to their folder;
//! - one lock per VM on the target (`<target>/<host>/<vm>/.lock`, `flock`), independent of the
//!   local `journal_dir`: exclusive for what writes or deletes (backup, prune), shared for what
//!   only reads (verify, restore).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind as IoKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::format::layout;

use super::dirfd::Dir;
use super::StoreError;

/// The format version of the target written by this build.
pub const TARGET_FORMAT_VERSION: u32 = 1;

/// The content of `.vm-backup-target.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetMarker {
    /// A random id of the target (UUID v4).
    pub id: String,
    /// [`TARGET_FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// When `vm-backup init` wrote it (RFC 3339).
    pub created_at: String,
    /// The group given read access (files 0640, folders 2750), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Reads the marker of the target `root`: missing root or marker is
/// [`StoreError::NotInitialised`] (kind TargetMissing).
pub(crate) fn read_marker(root: &Path) -> Result<TargetMarker, StoreError> {
    let missing = |e: &std::io::Error| {
        e.kind() == IoKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
    };
    let dir = match Dir::open(root) {
        Ok(dir) => dir,
        Err(StoreError::Io { source, .. }) if missing(&source) => {
            return Err(StoreError::NotInitialised(root.to_owned()))
        }
        Err(e) => return Err(e),
    };
    let text = match dir.read_file(OsStr::new(layout::TARGET_MARKER)) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(StoreError::Io { source, .. }) if missing(&source) => {
            return Err(StoreError::NotInitialised(root.to_owned()))
        }
        Err(e) => return Err(e),
    };
    serde_json::from_str(&text).map_err(|e| StoreError::BadMarker {
        path: root.join(layout::TARGET_MARKER),
        reason: e.to_string(),
    })
}

/// Initialises (or adopts) the target `root`: creates the folder if needed, writes the marker
/// unless there is one (then it is kept: init is idempotent). With `group`, the folder is
/// given to that group with mode 2750, so what is written below is readable by the group.
/// Returns the marker and whether it was written now.
pub(crate) fn init(root: &Path, group: Option<&str>) -> Result<(TargetMarker, bool), StoreError> {
    let fresh = !root.exists();
    if fresh {
        std::fs::create_dir_all(root).map_err(|e| StoreError::io("create", root, e))?;
    }
    // The root itself must not be a symlink (the folders above it are the administrator's).
    let dir = Dir::open(root)?;
    if fresh {
        dir.set_mode(0o700)?;
    }
    if let Some(name) = group {
        let gid = group_id(name)?;
        nix::unistd::fchown(dir.fd().as_raw_fd(), None, Some(gid))
            .map_err(|e| StoreError::io("change the group of", root, e.into()))?;
        dir.set_mode(0o2750)?;
    }
    match read_marker(root) {
        Ok(marker) => return Ok((marker, false)),
        Err(StoreError::NotInitialised(_)) => {}
        Err(e) => return Err(e),
    }
    let marker = TargetMarker {
        id: uuid::Uuid::new_v4().to_string(),
        format_version: TARGET_FORMAT_VERSION,
        created_at: chrono::Local::now().to_rfc3339(),
        group: group.map(str::to_owned),
    };
    let bytes = serde_json::to_vec_pretty(&marker).map_err(StoreError::Encode)?;
    super::durable::write_atomic_in(&dir, OsStr::new(layout::TARGET_MARKER), &bytes)?;
    tracing::info!(target = %root.display(), id = %marker.id, "target initialised");
    Ok((marker, true))
}

/// The gid of the group `name`.
fn group_id(name: &str) -> Result<nix::unistd::Gid, StoreError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(StoreError::UnknownGroup(name.to_string())),
        Err(e) => Err(StoreError::io(
            "look up the group",
            Path::new(name),
            e.into(),
        )),
    }
}

/// Opens the folder `path` below the target `root`, creating the missing folders on the way
/// (each with the mode its parent calls for), one name at a time relative to its parent's
/// handle: a symlink anywhere below the root is refused ([`StoreError::Symlink`]).
pub(crate) fn ensure_dir(root: &Path, path: &Path) -> Result<Dir, StoreError> {
    let rel = path.strip_prefix(root).map_err(|_| {
        StoreError::io(
            "create",
            path,
            std::io::Error::other(format!("not under the target {}", root.display())),
        )
    })?;
    let mut dir = Dir::open(root)?;
    for part in rel.components() {
        let Component::Normal(name) = part else {
            return Err(StoreError::BadName(rel.display().to_string()));
        };
        let (_, dir_mode) = dir.modes();
        dir = dir.ensure_sub(name, dir_mode)?;
    }
    Ok(dir)
}

/// Whether a VM lock is taken to read (shared) or to write and delete (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Verify, restore: several at once, never with a backup or prune of that VM.
    Shared,
    /// Backup, prune: alone on the VM.
    Exclusive,
}

/// The `flock` on `<target>/<host>/<vm>/.lock`, released when dropped (or when the process
/// dies). On NFS, Linux maps `flock` to a byte-range lock seen by every client.
#[derive(Debug)]
pub struct TargetLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl TargetLock {
    /// Takes the lock of the folder `vm_dir` (created if needed) without waiting; held by
    /// another run: [`StoreError::Busy`].
    pub(crate) fn acquire(root: &Path, vm_dir: &Path, mode: LockMode) -> Result<Self, StoreError> {
        let dir = ensure_dir(root, vm_dir)?;
        let name = OsStr::new(layout::VM_LOCK_FILE);
        let path = dir.join(name);
        let file = dir
            .open_file(
                name,
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CREATE,
                0o600,
            )
            .map_err(|e| dir.file_error("open the lock", name, e))?;
        let arg = match mode {
            LockMode::Shared => FlockArg::LockSharedNonblock,
            LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
        };
        let mut file = match Flock::lock(file, arg) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StoreError::Busy(path)),
            Err((_, errno)) => return Err(StoreError::io("lock", &path, errno.into())),
        };
        if mode == LockMode::Exclusive {
            // Who holds it, for the message of the run that is refused (best effort).
            let _ = file
                .set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()));
        }
        tracing::debug!(path = %path.display(), ?mode, "target lock taken");
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
