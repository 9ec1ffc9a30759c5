//! The backup target as a local or NFS-mounted folder, laid out as [`crate::format::layout`]
//! says: `<target>/<host>/<vm>/<stamp>[.partial]/`.

use std::ffi::{OsStr, OsString};
use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use crate::format::layout::{self, VmDir};
use crate::format::metadata::BackupMetadata;

use super::dirfd::Dir;
use super::durable::{self, StagedFile};
use super::target::{self, LockMode, TargetLock, TargetMarker};
use super::{BackupStore, StoreError};

/// A backup target that is a folder (local disk or NFS mount), initialised by
/// [`FolderStore::init`] (`vm-backup init`).
///
/// [`FolderStore::open`] refuses a folder without the target marker, so that an unmounted
/// share (its empty mount point) never receives a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderStore {
    root: PathBuf,
}

impl FolderStore {
    /// The target rooted at `root`: refused ([`StoreError::NotInitialised`], kind
    /// TargetMissing) when the folder or its marker is missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        target::read_marker(&root)?;
        Ok(Self { root })
    }

    /// Initialises the target at `root` (creates the folder, writes the marker), or adopts
    /// a folder already holding backups; idempotent (an existing marker is kept). With
    /// `group`, gives that group read access to what is written from now on.
    pub fn init(
        root: impl Into<PathBuf>,
        group: Option<&str>,
    ) -> Result<(Self, TargetMarker), StoreError> {
        let root = root.into();
        let (marker, _) = target::init(&root, group)?;
        Ok((Self { root }, marker))
    }

    /// The marker of the target.
    pub fn marker(&self) -> Result<TargetMarker, StoreError> {
        target::read_marker(&self.root)
    }

    /// The folder of the target.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of every backup of `vm` on `host` (names sanitised).
    pub fn vm_dir(&self, host: &str, vm: &str) -> Result<VmDir, StoreError> {
        Ok(VmDir::new(&self.root, host, vm)?)
    }

    /// Takes the lock of `vm` on `host` on the target (`<vm folder>/.lock`): exclusive for
    /// backup and prune, shared for verify and restore. Held elsewhere: [`StoreError::Busy`].
    pub fn lock_vm(&self, host: &str, vm: &str, mode: LockMode) -> Result<TargetLock, StoreError> {
        let vm_dir = self.vm_dir(host, vm)?;
        TargetLock::acquire(&self.root, &vm_dir.path, mode)
    }

    /// Takes the lock of the VM folder `vm_dir` (one listed under this target, e.g. by
    /// [`crate::format::layout::vm_dirs`]); see [`FolderStore::lock_vm`].
    pub fn lock_dir(&self, vm_dir: &Path, mode: LockMode) -> Result<TargetLock, StoreError> {
        TargetLock::acquire(&self.root, vm_dir, mode)
    }

    /// Begins the backup of `vm` on `host` stamped `stamp`: creates `<stamp>.partial/` (and
    /// the folders above it). The guard removes it when dropped unless published.
    pub fn begin(&self, host: &str, vm: &str, stamp: &str) -> Result<PartialBackup, StoreError> {
        let vm_dir = self.vm_dir(host, vm)?;
        let parent = target::ensure_dir(&self.root, &vm_dir.path)?;
        PartialBackup::create_in(parent, vm_dir.partial_dir(stamp), vm_dir.backup_dir(stamp))
    }

    /// Opens the folder `path` below the root, entering each folder without following a
    /// symlink; missing: [`StoreError::NotFound`].
    fn open_below(&self, path: &Path) -> Result<Dir, StoreError> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| StoreError::BadName(path.display().to_string()))?;
        match Dir::open_beneath(&self.root, rel) {
            Err(StoreError::Io { source, .. }) if source.kind() == IoKind::NotFound => {
                Err(StoreError::NotFound(path.to_owned()))
            }
            other => other,
        }
    }

    /// Checks that the target accepts a new file: a fresh random name, created with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW` (never an existing file, never through a symlink), then
    /// removed.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let name = format!(".vm-backup-write-test-{}", uuid::Uuid::new_v4().simple());
        self.probe(&name)
    }

    fn probe(&self, name: &str) -> Result<(), StoreError> {
        let root = Dir::open(&self.root).map_err(|e| match e {
            StoreError::Io { source, .. } => {
                StoreError::io("write a test file in", &self.root, source)
            }
            other => other,
        })?;
        let name = OsStr::new(name);
        let mut file = root
            .open_file(name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, 0o600)
            .map_err(|e| match root.file_error("write a test file in", name, e) {
                StoreError::Io { source, .. } => {
                    StoreError::io("write a test file in", &self.root, source)
                }
                other => other,
            })?;
        std::io::Write::write_all(&mut file, b"x")
            .and_then(|()| file.sync_all())
            .and_then(|()| root.unlink(name))
            .map_err(|e| StoreError::io("write a test file in", &self.root, e))
    }
}

impl BackupStore for FolderStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn backups(&self, host: &str, vm: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.vm_dir(host, vm)?.complete_stamps()?)
    }

    fn read(&self, host: &str, vm: &str, stamp: &str, name: &str) -> Result<Vec<u8>, StoreError> {
        let dir = self.vm_dir(host, vm)?.backup_dir(stamp);
        let rel = dir
            .strip_prefix(&self.root)
            .map_err(|_| StoreError::BadName(dir.display().to_string()))?;
        Dir::open_beneath(&self.root, rel)?.read_file(OsStr::new(safe_name(name)?))
    }

    fn write(
        &self,
        host: &str,
        vm: &str,
        stamp: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let dir = self.open_below(&self.vm_dir(host, vm)?.backup_dir(stamp))?;
        durable::write_atomic_in(&dir, OsStr::new(safe_name(name)?), bytes)
    }

    fn delete(&self, host: &str, vm: &str, stamp: &str) -> Result<PathBuf, StoreError> {
        let vm_dir = self.vm_dir(host, vm)?;
        delete_in(&self.open_below(&vm_dir.path)?, stamp)
    }
}

/// A backup being written: `<stamp>.partial/` on the target. Every file goes in durably,
/// relative to the folder's handle; [`PartialBackup::publish`] renames the folder to its final
/// name (relative to the handle of the folder above, never replacing anything). Dropped
/// unpublished, it removes the folder.
#[derive(Debug)]
pub struct PartialBackup {
    parent: Dir,
    handle: Dir,
    name: OsString,
    final_name: OsString,
    dir: PathBuf,
    final_dir: PathBuf,
    armed: bool,
}

impl PartialBackup {
    /// Creates `dir` (a folder named `<stamp>.partial`) to be published as `final_dir`, its
    /// sibling. For staging a backup outside the target (a Bacula restore to `where=`), the same
    /// rules: the folders above `dir` are created if needed, and `dir`'s own folder must not be
    /// a symlink.
    pub fn create(dir: PathBuf, final_dir: PathBuf) -> Result<Self, StoreError> {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| StoreError::io("create", &parent, e))?;
        Self::create_in(Dir::open(&parent)?, dir, final_dir)
    }

    fn create_in(parent: Dir, dir: PathBuf, final_dir: PathBuf) -> Result<Self, StoreError> {
        let (Some(name), Some(final_name)) = (dir.file_name(), final_dir.file_name()) else {
            return Err(StoreError::BadName(dir.display().to_string()));
        };
        if final_dir.parent() != dir.parent() || name == final_name {
            return Err(StoreError::BadName(final_dir.display().to_string()));
        }
        if parent.exists(final_name) {
            return Err(StoreError::Exists(final_dir));
        }
        let (_, mode) = parent.modes();
        let handle = parent.ensure_sub(name, mode)?;
        tracing::debug!(path = %dir.display(), "partial backup created");
        Ok(Self {
            name: name.to_owned(),
            final_name: final_name.to_owned(),
            parent,
            handle,
            dir,
            final_dir,
            armed: true,
        })
    }

    /// The `.partial` folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The folder it becomes once published.
    pub fn final_path(&self) -> &Path {
        &self.final_dir
    }

    /// Writes the file `name` (relative, may name a subfolder made by
    /// [`PartialBackup::create_dir`]) durably from bytes.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let (dir, leaf) = self.leaf(name)?;
        durable::write_atomic_in(&dir, OsStr::new(leaf), bytes)
    }

    /// Stages the file `name` for the copier: fill [`StagedFile::file`], then
    /// [`StagedFile::commit`]. `direct` asks for O_DIRECT.
    pub fn create_file(&self, name: &str, direct: bool) -> Result<StagedFile, StoreError> {
        let (dir, leaf) = self.leaf(name)?;
        StagedFile::create_in(dir, OsStr::new(leaf), direct)
    }

    /// Opens the file `name` for streaming in (a Bacula restore); made durable on publish.
    pub fn create_stream(&self, name: &str) -> Result<std::fs::File, StoreError> {
        let (dir, leaf) = self.leaf(name)?;
        let (mode, _) = dir.modes();
        let leaf = OsStr::new(leaf);
        dir.open_file(leaf, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC, mode)
            .map_err(|e| dir.file_error("create", leaf, e))
    }

    /// Creates the subfolder `name` and returns its path (appliance configurations).
    pub fn create_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        let (_, mode) = self.handle.modes();
        let sub = self.handle.ensure_sub(OsStr::new(safe_name(name)?), mode)?;
        Ok(sub.path().to_owned())
    }

    /// Syncs every file and folder, renames `<stamp>.partial` to `<stamp>` (never over an
    /// existing name) and syncs the folder above. Returns the published folder.
    pub fn publish(mut self) -> Result<PathBuf, StoreError> {
        self.handle.sync_tree()?;
        self.parent
            .rename_noreplace(&self.name, &self.parent, &self.final_name)
            .map_err(|e| {
                StoreError::io(
                    "rename into place",
                    &self.final_dir,
                    std::io::Error::new(e.kind(), format!("from {}: {e}", self.dir.display())),
                )
            })?;
        self.armed = false;
        if let Err(e) = self.parent.sync() {
            tracing::warn!("backup published, but {e}");
        }
        tracing::info!(path = %self.final_dir.display(), "backup published");
        Ok(self.final_dir.clone())
    }

    /// Removes the folder now; on failure the guard still holds it (and tries again on drop).
    pub fn discard(&mut self) -> Result<(), StoreError> {
        if self.armed {
            self.remove()?;
            self.armed = false;
        }
        Ok(())
    }

    fn remove(&self) -> Result<(), StoreError> {
        self.parent
            .remove_tree(&self.name)
            .map_err(|e| StoreError::io("remove", &self.dir, e))?;
        tracing::info!(path = %self.dir.display(), "partial backup removed");
        Ok(())
    }

    /// The folder holding `name` (entered without following symlinks) and its last part.
    fn leaf<'a>(&self, name: &'a str) -> Result<(Dir, &'a str), StoreError> {
        let mut parts: Vec<&str> = name.split('/').collect();
        for part in &parts {
            safe_name(part)?;
        }
        let leaf = parts.pop().unwrap_or_default();
        let mut dir = self.handle.try_clone()?;
        for part in parts {
            dir = dir.sub(OsStr::new(part))?;
        }
        Ok((dir, leaf))
    }
}

impl Drop for PartialBackup {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.remove() {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Removes a `.partial` folder and everything in it (already gone: done); symlinks inside are
/// removed, never followed, and the folder itself must not be one.
pub fn remove_partial(dir: &Path) -> Result<(), StoreError> {
    let (Some(name), Some(parent)) = (dir.file_name(), dir.parent()) else {
        return Err(StoreError::BadName(dir.display().to_string()));
    };
    if !name.to_string_lossy().ends_with(layout::PARTIAL_SUFFIX) {
        return Err(StoreError::BadName(dir.display().to_string()));
    }
    let parent = match Dir::open(parent) {
        Ok(p) => p,
        Err(StoreError::Io { source, .. }) if source.kind() == IoKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    parent
        .remove_tree(name)
        .map_err(|e| StoreError::io("remove", dir, e))?;
    tracing::info!(path = %dir.display(), "partial backup removed");
    Ok(())
}

/// Deletes the published backup `stamp` of a VM: renamed to `.<stamp>.pruning` first, so that
/// a folder half-removed by a crash is never taken for a backup. Returns the folder removed.
pub fn delete_backup(vm_dir: &VmDir, stamp: &str) -> Result<PathBuf, StoreError> {
    delete_in(&Dir::open(&vm_dir.path)?, stamp)
}

fn delete_in(vm: &Dir, stamp: &str) -> Result<PathBuf, StoreError> {
    layout::parse_stamp(stamp)?;
    let path = vm.join(stamp);
    let name = OsStr::new(stamp);
    vm.refuse_symlink(name)?;
    let doomed = OsString::from(format!(".{stamp}.pruning"));
    vm.rename(name, &doomed)
        .map_err(|e| StoreError::io("remove", &path, e))?;
    vm.remove_tree(&doomed)
        .map_err(|e| StoreError::io("remove", &vm.join(&doomed), e))?;
    tracing::info!(path = %path.display(), "backup deleted");
    Ok(path)
}

/// Rewrites `backup-metadata.json` in a backup folder (published or not) durably.
pub fn write_metadata(backup_dir: &Path, md: &BackupMetadata) -> Result<(), StoreError> {
    let bytes = md.to_json().map_err(StoreError::Encode)?;
    durable::write_atomic(&backup_dir.join(layout::METADATA_FILE), &bytes)
}

/// Rewrites one small file (`backup.log`…) in a published backup folder durably.
pub fn write_backup_file(backup_dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    durable::write_atomic(&backup_dir.join(safe_name(name)?), bytes)
}

/// A file name inside a backup: one component, not `.`/`..`, no hidden file.
fn safe_name(name: &str) -> Result<&str, StoreError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') || name.contains('\0') {
        return Err(StoreError::BadName(name.to_string()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn store() -> (tempfile::TempDir, FolderStore) {
        let dir = crate::store::scratch();
        let (store, _) = FolderStore::init(dir.path(), None).unwrap();
        (dir, store)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_folder_without_marker_is_refused_and_init_is_idempotent() {
        let dir = crate::store::scratch();
        let err = FolderStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetMissing);
        assert!(err.to_string().contains("vm-backup init"), "{err}");
        assert!(names(dir.path()).is_empty(), "nothing written");
        let gone = FolderStore::open(dir.path().join("gone")).unwrap_err();
        assert_eq!(gone.kind(), ErrorKind::TargetMissing);
        let (_, first) = FolderStore::init(dir.path(), None).unwrap();
        let (_, second) = FolderStore::init(dir.path(), None).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.format_version, crate::store::TARGET_FORMAT_VERSION);
        assert_eq!(names(dir.path()), vec![layout::TARGET_MARKER]);
        let store = FolderStore::open(dir.path()).unwrap();
        assert_eq!(store.marker().unwrap().id, first.id);
    }

    #[test]
    fn init_adopts_a_folder_with_backups() {
        let dir = crate::store::scratch();
        std::fs::create_dir_all(dir.path().join("hv1/web/2026-11-21-120000")).unwrap();
        let (store, _) = FolderStore::init(dir.path(), None).unwrap();
        assert_eq!(
            store.backups("hv1", "web").unwrap(),
            vec!["2026-11-21-120000"]
        );
    }

    #[test]
    fn files_and_folders_are_private_under_umask_022() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let p = store.begin("hv1", "web", "2026-11-21-120000").unwrap();
        p.write_file("web.xml", b"<domain/>").unwrap();
        let staged = p.create_file("web-vda.raw", false).unwrap();
        staged.commit().unwrap();
        drop(p.create_stream("stream.raw").unwrap());
        p.create_dir(layout::CONFIGS_DIR).unwrap();
        let published = p.publish().unwrap();
        nix::sys::stat::umask(old);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        for d in [
            dir.path().join("hv1"),
            dir.path().join("hv1/web"),
            published.clone(),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&published.join(layout::CONFIGS_DIR)), 0o700);
        for f in ["web.xml", "web-vda.raw", "stream.raw"] {
            assert_eq!(mode(&published.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir.path().join(layout::TARGET_MARKER)), 0o600);
    }

    #[test]
    fn a_target_with_a_group_gives_it_read_access() {
        use std::os::unix::fs::MetadataExt;
        let dir = crate::store::scratch();
        // Our own primary group: chown to it needs no privilege.
        let gid = nix::unistd::getegid();
        let Ok(Some(group)) = nix::unistd::Group::from_gid(gid) else {
            eprintln!("no name for gid {gid}: skipped");
            return;
        };
        let (store, marker) = FolderStore::init(dir.path(), Some(&group.name)).unwrap();
        assert_eq!(marker.group.as_deref(), Some(group.name.as_str()));
        let p = store.begin("hv1", "web", "2026-11-21-120000").unwrap();
        p.write_file("web.xml", b"x").unwrap();
        let published = p.publish().unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!(meta(&published).mode() & 0o777, 0o750);
        assert_eq!(meta(&published).gid(), gid.as_raw());
        assert_eq!(meta(&published.join("web.xml")).mode() & 0o7777, 0o640);
        assert_eq!(meta(&dir.path().join("hv1")).mode() & 0o777, 0o750);
        assert!(FolderStore::init(dir.path(), Some("no-such-group-vmb")).is_err());
    }

    #[test]
    fn the_write_probe_never_follows_a_symlink() {
        let (dir, store) = store();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // The name an older version used, and a fixed name planted by an attacker.
        let old = dir
            .path()
            .join(format!(".vm-backup-write-test-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old).unwrap();
        store.check_writable().unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".probe")).unwrap();
        assert!(store.probe(".probe").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_symlink_as_a_backup_file_or_folder_is_never_followed() {
        let (dir, store) = store();
        let outside = crate::store::scratch();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let published = store
            .begin("hv1", "web", "2026-11-21-120000")
            .unwrap()
            .publish()
            .unwrap();
        std::os::unix::fs::symlink(&victim, published.join("backup.log")).unwrap();
        std::os::unix::fs::symlink(&victim, published.join("web.xml")).unwrap();
        store
            .write("hv1", "web", "2026-11-21-120000", "backup.log", b"log")
            .unwrap();
        assert!(store
            .read("hv1", "web", "2026-11-21-120000", "web.xml")
            .is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A VM folder that is a symlink to elsewhere: nothing is created through it.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("hv1/evil")).unwrap();
        let err = store.begin("hv1", "evil", "2026-11-21-120000").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        assert!(store.lock_vm("hv1", "evil", LockMode::Exclusive).is_err());
        assert_eq!(names(outside.path()), vec!["victim"]);
    }

    #[test]
    fn symlinks_planted_inside_a_backup_are_refused_and_removal_never_follows_them() {
        use std::os::unix::fs::symlink;
        let (dir, store) = store();
        let outside = crate::store::scratch();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // The partial folder's own name planted as a symlink: never entered.
        std::fs::create_dir_all(dir.path().join("hv1/web")).unwrap();
        symlink(
            outside.path(),
            dir.path().join("hv1/web/2026-11-21-120000.partial"),
        )
        .unwrap();
        let err = store.begin("hv1", "web", "2026-11-21-120000").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        // The host folder a symlink: nothing is created through it.
        symlink(outside.path(), dir.path().join("hv2")).unwrap();
        let err = store.begin("hv2", "web", "2026-11-21-120000").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        let p = store.begin("hv1", "web", "2026-11-21-120001").unwrap();
        // A subfolder, a streamed file and a file name inside the partial folder.
        symlink(outside.path(), p.path().join("configs")).unwrap();
        let err = p.write_file("configs/running.cfg", b"x").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        assert!(p.create_dir("configs").is_err());
        symlink(&victim, p.path().join("disk.raw")).unwrap();
        let err = p.create_stream("disk.raw").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        // Publish refuses the symlink inside (sync_tree), and the guard removes the folder
        // without following any of them.
        let partial = p.path().to_owned();
        let err = p.publish().unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        assert!(!partial.exists());
        // A symlink at the final name: publish never replaces it.
        let p = store.begin("hv1", "web", "2026-11-21-120002").unwrap();
        symlink(outside.path(), dir.path().join("hv1/web/2026-11-21-120002")).unwrap();
        assert!(p.publish().is_err());
        // A published backup that is a symlink: neither deleted through nor read.
        let err = store.delete("hv1", "web", "2026-11-21-120002").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        assert!(store
            .read("hv1", "web", "2026-11-21-120002", "victim")
            .is_err());
        // remove_partial of a folder holding symlinks to the outside.
        let left = dir.path().join("hv1/web/2026-11-21-120003.partial");
        std::fs::create_dir(&left).unwrap();
        symlink(outside.path(), left.join("d")).unwrap();
        symlink(&victim, left.join("f")).unwrap();
        remove_partial(&left).unwrap();
        assert!(!left.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(names(outside.path()), vec!["victim"]);
    }

    #[test]
    fn the_vm_lock_excludes_writers_and_shares_readers() {
        let (_dir, store) = store();
        let a = store.lock_vm("hv1", "web", LockMode::Exclusive).unwrap();
        let err = store
            .lock_vm("hv1", "web", LockMode::Exclusive)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert_eq!(
            store
                .lock_vm("hv1", "web", LockMode::Shared)
                .unwrap_err()
                .kind(),
            ErrorKind::Busy
        );
        let other = store.lock_vm("hv1", "web 01", LockMode::Exclusive).unwrap();
        drop(a);
        let r1 = store.lock_vm("hv1", "web", LockMode::Shared).unwrap();
        let _r2 = store.lock_vm("hv1", "web", LockMode::Shared).unwrap();
        assert_eq!(
            store
                .lock_vm("hv1", "web", LockMode::Exclusive)
                .unwrap_err()
                .kind(),
            ErrorKind::Busy
        );
        assert!(r1.path().ends_with("hv1/web/.lock"));
        drop(other);
    }

    #[test]
    fn a_published_backup_lists_reads_and_deletes() {
        let (_dir, store) = store();
        let partial = store.begin("hv1", "web", "2026-11-21-120000").unwrap();
        assert!(partial
            .path()
            .ends_with("hv1/web/2026-11-21-120000.partial"));
        partial.write_file("web.xml", b"<domain/>").unwrap();
        let disk = partial.create_file("web-vda.raw", false).unwrap();
        std::io::Write::write_all(&mut disk.file(), &[7u8; 4096]).unwrap();
        disk.commit().unwrap();
        let configs = partial.create_dir(layout::CONFIGS_DIR).unwrap();
        durable::write_atomic(&configs.join("running.cfg"), b"cfg").unwrap();
        partial.write_file("configs/startup.cfg", b"cfg2").unwrap();
        assert!(store.backups("hv1", "web").unwrap().is_empty());
        let dir = partial.publish().unwrap();
        assert!(dir.ends_with("hv1/web/2026-11-21-120000"));
        assert_eq!(
            store.backups("hv1", "web").unwrap(),
            vec!["2026-11-21-120000"]
        );
        assert_eq!(
            store
                .read("hv1", "web", "2026-11-21-120000", "web.xml")
                .unwrap(),
            b"<domain/>"
        );
        store
            .write("hv1", "web", "2026-11-21-120000", "backup.log", b"log")
            .unwrap();
        assert_eq!(std::fs::read(dir.join("backup.log")).unwrap(), b"log");
        assert_eq!(
            std::fs::read(dir.join("configs/startup.cfg")).unwrap(),
            b"cfg2"
        );
        let removed = store.delete("hv1", "web", "2026-11-21-120000").unwrap();
        assert_eq!(removed, dir);
        assert!(!dir.exists());
        assert!(store.backups("hv1", "web").unwrap().is_empty());
        let vm = store.vm_dir("hv1", "web").unwrap();
        assert_eq!(std::fs::read_dir(&vm.path).unwrap().count(), 0);
    }

    #[test]
    fn an_unpublished_backup_is_removed_on_drop_or_discard() {
        let (_dir, store) = store();
        let p = store.begin("hv1", "web", "2026-11-21-120000").unwrap();
        p.write_file("a", b"x").unwrap();
        let path = p.path().to_owned();
        drop(p);
        assert!(!path.exists());
        let mut p = store.begin("hv1", "web", "2026-11-21-120001").unwrap();
        p.discard().unwrap();
        assert!(!p.path().exists());
        p.discard().unwrap();
    }

    #[test]
    fn an_existing_backup_is_not_begun_again() {
        let (_dir, store) = store();
        store
            .begin("hv1", "web", "2026-11-21-120000")
            .unwrap()
            .publish()
            .unwrap();
        let err = store.begin("hv1", "web", "2026-11-21-120000").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
    }

    #[test]
    fn names_cannot_escape_the_backup() {
        let (_dir, store) = store();
        let p = store.begin("hv1", "web", "2026-11-21-120000").unwrap();
        for bad in ["../x", "..", ".hidden", "", "a//b"] {
            let err = p.write_file(bad, b"x").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(store
            .read("hv1", "web", "2026-11-21-120000", "../../x")
            .is_err());
        assert!(store.delete("hv1", "web", "../escape").is_err());
        assert!(remove_partial(store.root()).is_err());
    }

    #[test]
    fn missing_and_writable_targets_are_told_apart() {
        let (dir, store) = store();
        store.check_writable().unwrap();
        assert_eq!(names(dir.path()), vec![layout::TARGET_MARKER]);
        let missing = FolderStore {
            root: dir.path().join("gone"),
        };
        assert_eq!(
            missing.check_writable().unwrap_err().kind(),
            ErrorKind::TargetMissing
        );
        assert_eq!(
            missing
                .read("h", "v", "2026-11-21-120000", "x")
                .unwrap_err()
                .kind(),
            ErrorKind::TargetMissing
        );
        assert_eq!(
            missing
                .write("h", "v", "2026-11-21-120000", "x", b"")
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn metadata_is_written_as_format_serialises_it() {
        let (dir, _store) = store();
        let md: BackupMetadata = serde_json::from_str(
            r#"{"schema_version": 1, "tool_version": "0", "vm_name": "web", "vm_uuid": "u",
                "host": "hv1", "stamp": "2026-11-21-120000", "method_requested": "auto",
                "method": "offline", "started_at": "t0", "finished_at": "t1", "phases": {},
                "disks": [], "skipped_disks": [], "files": [], "total_bytes": 0,
                "bytes_per_sec": 0.0, "result": "success"}"#,
        )
        .unwrap();
        write_metadata(dir.path(), &md).unwrap();
        let back = BackupMetadata::read(dir.path()).unwrap();
        assert_eq!(back.vm_name, md.vm_name);
    }
}
