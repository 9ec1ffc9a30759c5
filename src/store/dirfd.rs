//! Directory handles: the target's files are reached relative to an open folder, never by a
//! path looked up again later, and no symlink is ever followed below the target's root.
//!
//! A [`Dir`] is an `O_DIRECTORY|O_NOFOLLOW` file descriptor of a folder. Every folder below the
//! root is entered one name at a time with `openat(…, O_NOFOLLOW)`, created with `mkdirat`, and
//! files are created, renamed and removed with `openat`/`renameat`/`unlinkat` relative to their
//! folder's handle: a symlink planted at any name (a folder, a temporary file, a backup file,
//! the write probe) between a check and a use is refused (`ELOOP`, [`StoreError::Symlink`]) or,
//! for names created exclusively, never touched. Built on `rustix` (safe, `OwnedFd`-returning
//! wrappers of the `*at` calls; already in the dependency tree).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::StoreError;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// An open folder of the target (or of a local state folder), with its path for messages.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as rustix::fs::RawMode)
}

impl Dir {
    /// Opens the folder `path`. The folders above it are the caller's (the configured target,
    /// a local state folder) and are resolved as given; `path` itself must not be a symlink.
    pub(crate) fn open(path: &Path) -> Result<Dir, StoreError> {
        match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Dir {
                fd,
                path: path.to_owned(),
            }),
            Err(e) => Err(Self::open_error(path, e, || {
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
            })),
        }
    }

    /// Opens `root`, then each component of `rel` below it without following a symlink.
    pub(crate) fn open_beneath(root: &Path, rel: &Path) -> Result<Dir, StoreError> {
        let mut dir = Dir::open(root)?;
        for part in rel.components() {
            match part {
                Component::Normal(name) => dir = dir.sub(name)?,
                Component::CurDir => {}
                _ => return Err(StoreError::BadName(rel.display().to_string())),
            }
        }
        Ok(dir)
    }

    /// The folder's path (for messages and for callers that still need one).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside the folder (for messages).
    pub(crate) fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// A second handle of the same folder.
    pub(crate) fn try_clone(&self) -> Result<Dir, StoreError> {
        Ok(Dir {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| StoreError::io("open", &self.path, e))?,
            path: self.path.clone(),
        })
    }

    fn open_error(path: &Path, e: Errno, is_link: impl FnOnce() -> bool) -> StoreError {
        // O_NOFOLLOW on a symlink: ELOOP (or ENOTDIR with O_DIRECTORY on some file systems).
        if (e == Errno::LOOP || e == Errno::NOTDIR) && is_link() {
            return StoreError::Symlink(path.to_owned());
        }
        StoreError::io("open", path, e.into())
    }

    fn is_symlink_at(&self, name: &OsStr) -> bool {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
    }

    /// Opens the subfolder `name` (a symlink there: [`StoreError::Symlink`]).
    pub(crate) fn sub(&self, name: &OsStr) -> Result<Dir, StoreError> {
        let path = self.path.join(name);
        match rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Dir { fd, path }),
            Err(e) => Err(Self::open_error(&path, e, || self.is_symlink_at(name))),
        }
    }

    /// Opens the subfolder `name`, creating it (mode exactly `dir_mode`, whatever the umask)
    /// when missing.
    pub(crate) fn ensure_sub(&self, name: &OsStr, dir_mode: u32) -> Result<Dir, StoreError> {
        match rustix::fs::mkdirat(&self.fd, name, mode(0o700)) {
            Ok(()) => {
                let dir = self.sub(name)?;
                rustix::fs::fchmod(&dir.fd, mode(dir_mode))
                    .map_err(|e| StoreError::io("set the mode of", &dir.path, e.into()))?;
                Ok(dir)
            }
            Err(Errno::EXIST) => self.sub(name),
            Err(e) => Err(StoreError::io("create", &self.path.join(name), e.into())),
        }
    }

    /// The modes of a new file and a new folder inside this folder: 0640/2750 when it is setgid
    /// with group read access (a target initialised with a group), else 0600/0700.
    pub(crate) fn modes(&self) -> (u32, u32) {
        match rustix::fs::fstat(&self.fd) {
            Ok(st) if st.st_mode & 0o2000 != 0 && st.st_mode & 0o050 == 0o050 => (0o640, 0o2750),
            _ => (0o600, 0o700),
        }
    }

    /// Sets the folder's own mode exactly.
    pub(crate) fn set_mode(&self, bits: u32) -> Result<(), StoreError> {
        rustix::fs::fchmod(&self.fd, mode(bits))
            .map_err(|e| StoreError::io("set the mode of", &self.path, e.into()))
    }

    /// The folder's file descriptor (for `fchown`, `flock`…).
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the file `name` with `flags` (plus `O_NOFOLLOW|O_CLOEXEC`); created files get
    /// exactly `file_mode`. The raw `io::Error` is returned, for callers that handle
    /// `EEXIST`/`EINVAL`.
    pub(crate) fn open_file(
        &self,
        name: &OsStr,
        flags: OFlags,
        file_mode: u32,
    ) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode(file_mode),
        )?;
        if flags.contains(OFlags::CREATE) {
            // The umask may have narrowed the mode: set it exactly.
            rustix::fs::fchmod(&fd, mode(file_mode))?;
        }
        Ok(File::from(fd))
    }

    /// Maps an error of [`Dir::open_file`] on `name`: a symlink there is
    /// [`StoreError::Symlink`], anything else an I/O error.
    pub(crate) fn file_error(
        &self,
        action: &'static str,
        name: &OsStr,
        e: std::io::Error,
    ) -> StoreError {
        let path = self.path.join(name);
        let loopish = matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EEXIST));
        if loopish && self.is_symlink_at(name) {
            StoreError::Symlink(path)
        } else {
            StoreError::io(action, &path, e)
        }
    }

    /// Reads the whole file `name` (a symlink there: [`StoreError::Symlink`]).
    pub(crate) fn read_file(&self, name: &OsStr) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.open_file(name, OFlags::RDONLY, 0)
            .and_then(|mut f| f.read_to_end(&mut out))
            .map_err(|e| self.file_error("read", name, e))?;
        Ok(out)
    }

    /// Renames `from` (in this folder) to `to` in `to_dir`, never replacing what is there
    /// (`RENAME_NOREPLACE`; where the file system does not offer it, checked just before).
    pub(crate) fn rename_noreplace(
        &self,
        from: &OsStr,
        to_dir: &Dir,
        to: &OsStr,
    ) -> std::io::Result<()> {
        match rustix::fs::renameat_with(&self.fd, from, &to_dir.fd, to, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                if rustix::fs::statat(&to_dir.fd, to, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                    return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
                }
                Ok(rustix::fs::renameat(&self.fd, from, &to_dir.fd, to)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` in this folder, replacing `to` (a symlink at `to` is replaced,
    /// never followed).
    pub(crate) fn rename(&self, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, from, &self.fd, to)?)
    }

    /// Refuses `name` if it is a symlink (missing is fine).
    pub(crate) fn refuse_symlink(&self, name: &OsStr) -> Result<(), StoreError> {
        if self.is_symlink_at(name) {
            return Err(StoreError::Symlink(self.path.join(name)));
        }
        Ok(())
    }

    /// Sets the mode of the file `name` exactly (opened without following a symlink).
    pub(crate) fn set_file_mode(&self, name: &OsStr, bits: u32) -> Result<(), StoreError> {
        let file = self
            .open_file(name, OFlags::RDONLY, 0)
            .map_err(|e| self.file_error("set the mode of", name, e))?;
        rustix::fs::fchmod(&file, mode(bits))
            .map_err(|e| StoreError::io("set the mode of", &self.path.join(name), e.into()))
    }

    /// Removes the file (or symlink) `name`.
    pub(crate) fn unlink(&self, name: &OsStr) -> std::io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Whether `name` exists in the folder (a symlink counts; it is not followed).
    pub(crate) fn exists(&self, name: &OsStr) -> bool {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// The names in the folder with their types (`.`/`..` left out; a type the file system does
    /// not report is looked up without following).
    pub(crate) fn entries(&self) -> std::io::Result<Vec<(OsString, FileType)>> {
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    let st = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)?;
                    FileType::from_raw_mode(st.st_mode)
                }
                k => k,
            };
            out.push((name.to_owned(), kind));
        }
        Ok(out)
    }

    /// Removes `name` and, if it is a folder, everything in it; symlinks inside are removed,
    /// never followed. Already gone: done.
    pub(crate) fn remove_tree(&self, name: &OsStr) -> std::io::Result<()> {
        let st = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return self.unlink(name);
        }
        let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())?;
        let sub = Dir {
            fd,
            path: self.path.join(name),
        };
        for (child, kind) in sub.entries()? {
            if kind == FileType::Directory {
                sub.remove_tree(&child)?;
            } else {
                match sub.unlink(&child) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// fsyncs the folder (its entries: names created, renamed, removed).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        rustix::fs::fsync(&self.fd).map_err(|e| StoreError::io("fsync", &self.path, e.into()))
    }

    /// fsyncs every file and folder below (cheap for files already synced); a symlink inside
    /// is [`StoreError::Symlink`].
    pub(crate) fn sync_tree(&self) -> Result<(), StoreError> {
        let entries = self
            .entries()
            .map_err(|e| StoreError::io("list", &self.path, e))?;
        for (name, kind) in entries {
            match kind {
                FileType::Symlink => return Err(StoreError::Symlink(self.path.join(&name))),
                FileType::Directory => self.sub(&name)?.sync_tree()?,
                _ => self
                    .open_file(&name, OFlags::RDONLY, 0)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| self.file_error("fsync", &name, e))?,
            }
        }
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_symlinked_folder_on_the_way_is_refused() {
        let dir = crate::store::scratch();
        let outside = crate::store::scratch();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        symlink(outside.path(), dir.path().join("a/b")).unwrap();
        let err = Dir::open_beneath(dir.path(), Path::new("a/b")).unwrap_err();
        assert!(
            matches!(err, StoreError::Symlink(ref p) if p.ends_with("a/b")),
            "{err}"
        );
        let root = Dir::open(dir.path()).unwrap();
        let a = root.sub(OsStr::new("a")).unwrap();
        let err = a.ensure_sub(OsStr::new("b"), 0o700).unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        assert!(Dir::open(&dir.path().join("a/b")).is_err());
        assert!(Dir::open_beneath(dir.path(), Path::new("../x")).is_err());
    }

    #[test]
    fn files_behind_symlinks_are_neither_read_nor_created_and_remove_tree_stays_inside() {
        let dir = crate::store::scratch();
        let outside = crate::store::scratch();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let root = Dir::open(dir.path()).unwrap();
        symlink(&victim, dir.path().join("link")).unwrap();
        let err = root.read_file(OsStr::new("link")).unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        let e = root
            .open_file(
                OsStr::new("link"),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                0o600,
            )
            .unwrap_err();
        let err = root.file_error("create", OsStr::new("link"), e);
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        // A tree holding symlinks to a file and a folder outside: removed, the outside kept.
        let t = root.ensure_sub(OsStr::new("t"), 0o700).unwrap();
        symlink(&victim, dir.path().join("t/f")).unwrap();
        symlink(outside.path(), dir.path().join("t/d")).unwrap();
        t.ensure_sub(OsStr::new("sub"), 0o700).unwrap();
        std::fs::write(dir.path().join("t/sub/x"), b"x").unwrap();
        root.remove_tree(OsStr::new("t")).unwrap();
        assert!(!dir.path().join("t").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        root.remove_tree(OsStr::new("t")).unwrap();
    }

    #[test]
    fn rename_noreplace_keeps_what_is_there() {
        let dir = crate::store::scratch();
        let root = Dir::open(dir.path()).unwrap();
        root.ensure_sub(OsStr::new("a"), 0o700).unwrap();
        root.ensure_sub(OsStr::new("b"), 0o700).unwrap();
        let e = root
            .rename_noreplace(OsStr::new("a"), &root, OsStr::new("b"))
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        root.rename_noreplace(OsStr::new("a"), &root, OsStr::new("c"))
            .unwrap();
        assert!(dir.path().join("c").is_dir());
    }
}
