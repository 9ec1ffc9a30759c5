//! What makes a folder a backup target, and what keeps it private and safe:
//!
//! - the marker `.vm-backup-target.json` written by `vm-backup init` (an id, a format version,
//!   the creation time, the group if any): a folder without it is refused by every command, so
//!   an unmounted share (an empty mount point on the local disk) never receives a backup;
//! - modes: files 0600 and folders 0700, or 0640 and 2750 (setgid, so the group is inherited)
//!   under a target initialised with a group. The mode is set explicitly after creation, so the
//!   umask never widens or narrows it;
//! - no symlink followed: every folder the store creates or enters is checked not to be a
//!   symlink, files are created with `O_CREAT|O_EXCL` and opened with `O_NOFOLLOW`;
//! - one lock per VM on the target (`<target>/<host>/<vm>/.lock`, `flock`), independent of the
//!   local `journal_dir`: exclusive for what writes or deletes (backup, prune), shared for what
//!   only reads (verify, restore).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind as IoKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::format::layout;

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
    let path = root.join(layout::TARGET_MARKER);
    let mut text = String::new();
    match open_nofollow(&path).and_then(|mut f| f.read_to_string(&mut text)) {
        Ok(_) => {}
        Err(e) if e.kind() == IoKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(StoreError::NotInitialised(root.to_owned()))
        }
        Err(e) => return Err(StoreError::io("read", &path, e)),
    }
    serde_json::from_str(&text).map_err(|e| StoreError::BadMarker {
        path,
        reason: e.to_string(),
    })
}

/// Initialises (or adopts) the target `root`: creates the folder if needed, writes the marker
/// unless there is one (then it is kept: init is idempotent). With `group`, the folder is
/// given to that group with mode 2750, so what is written below is readable by the group.
/// Returns the marker and whether it was written now.
pub(crate) fn init(root: &Path, group: Option<&str>) -> Result<(TargetMarker, bool), StoreError> {
    refuse_symlink(root)?;
    if !root.exists() {
        std::fs::create_dir_all(root).map_err(|e| StoreError::io("create", root, e))?;
        set_mode(root, 0o700)?;
    }
    if let Some(name) = group {
        let gid = group_id(name)?;
        nix::unistd::chown(root, None, Some(gid))
            .map_err(|e| StoreError::io("change the group of", root, e.into()))?;
        set_mode(root, 0o2750)?;
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
    super::durable::write_atomic(&root.join(layout::TARGET_MARKER), &bytes)?;
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

/// The modes of a new file and a new folder inside `folder`: 0640/2750 when the folder is
/// setgid with group read access (a target initialised with a group), else 0600/0700.
pub(crate) fn modes_in(folder: &Path) -> (u32, u32) {
    match std::fs::symlink_metadata(folder) {
        Ok(m) if m.mode() & 0o2000 != 0 && m.mode() & 0o050 == 0o050 => (0o640, 0o2750),
        _ => (0o600, 0o700),
    }
}

/// Sets the mode of `path` exactly (whatever the umask was at creation).
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::io("set the mode of", path, e))
}

/// Refuses `path` if it is a symlink (missing is fine).
pub(crate) fn refuse_symlink(path: &Path) -> Result<(), StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(StoreError::Symlink(path.to_owned())),
        _ => Ok(()),
    }
}

/// Creates the folder `path` and the missing folders above it up to `root` (which must
/// exist), each with the mode its parent calls for; an existing folder on the way must be a
/// real folder, not a symlink.
pub(crate) fn ensure_dir(root: &Path, path: &Path) -> Result<(), StoreError> {
    let rel = path.strip_prefix(root).map_err(|_| {
        StoreError::io(
            "create",
            path,
            std::io::Error::other(format!("not under the target {}", root.display())),
        )
    })?;
    let mut cur = root.to_path_buf();
    refuse_symlink(&cur)?;
    for part in rel.components() {
        let parent = cur.clone();
        cur.push(part);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(StoreError::Symlink(cur)),
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(StoreError::io(
                    "create",
                    &cur,
                    std::io::Error::from(IoKind::AlreadyExists),
                ))
            }
            Err(e) if e.kind() == IoKind::NotFound => {}
            Err(e) => return Err(StoreError::io("stat", &cur, e)),
        }
        let (_, dir_mode) = modes_in(&parent);
        match std::fs::create_dir(&cur) {
            Ok(()) => set_mode(&cur, dir_mode)?,
            Err(e) if e.kind() == IoKind::AlreadyExists => refuse_symlink(&cur)?,
            Err(e) => return Err(StoreError::io("create", &cur, e)),
        }
    }
    Ok(())
}

/// Opens a file for reading without following a symlink at its name.
pub(crate) fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads a whole file without following a symlink at its name.
pub(crate) fn read_nofollow(path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    open_nofollow(path)
        .and_then(|mut f| f.read_to_end(&mut out))
        .map_err(|e| StoreError::io("read", path, e))?;
    Ok(out)
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
        ensure_dir(root, vm_dir)?;
        let path = vm_dir.join(layout::VM_LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| StoreError::io("open the lock", &path, e))?;
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
