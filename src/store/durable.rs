//! Durable writes: the one implementation of "temporary file beside the final name, fsync,
//! rename, fsync of the folder", for small files written from bytes and for big files the
//! copier fills through a sink.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use super::dirfd::Dir;
use super::StoreError;

/// A file being written under a temporary name beside its final name: created by
/// [`StagedFile::create`], made durable and visible by [`StagedFile::commit`], removed when
/// dropped uncommitted. Every step is relative to the handle of its folder.
#[derive(Debug)]
pub struct StagedFile {
    file: File,
    direct: bool,
    dir: Dir,
    temp: OsString,
    name: OsString,
    target: PathBuf,
    note: Option<String>,
    armed: bool,
}

impl StagedFile {
    /// Creates `.<name>.vmb-tmp-<pid>[-n]` beside `target` (mode 0600, or 0640 in a target
    /// with a group; `O_CREAT|O_EXCL|O_NOFOLLOW` relative to the folder's handle: never an
    /// existing file, never through a symlink planted at that name). With `direct`, opens it
    /// with O_DIRECT when the file system accepts it; when it refuses (EINVAL), writes through
    /// the page cache and says so in [`StagedFile::note`]. The folder of `target` must not be a
    /// symlink.
    pub fn create(target: &Path, direct: bool) -> Result<Self, StoreError> {
        let name = target
            .file_name()
            .ok_or_else(|| StoreError::BadName(target.display().to_string()))?;
        Self::create_in(Dir::open(&folder_of(target))?, name, direct)
    }

    /// [`StagedFile::create`] for the file `name` of the open folder `dir`.
    pub(crate) fn create_in(dir: Dir, name: &OsStr, direct: bool) -> Result<Self, StoreError> {
        let (mode, _) = dir.modes();
        let mut want_direct = direct;
        let mut note = None;
        for attempt in 0..100u32 {
            let suffix = if attempt == 0 {
                String::new()
            } else {
                format!("-{attempt}")
            };
            let mut temp = OsString::from(".");
            temp.push(name);
            temp.push(format!(".vmb-tmp-{}{suffix}", std::process::id()));
            let mut flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
            if want_direct {
                flags |= OFlags::DIRECT;
            }
            match dir.open_file(&temp, flags, mode) {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        direct: want_direct,
                        target: dir.join(name),
                        dir,
                        temp,
                        name: name.to_owned(),
                        note,
                        armed: true,
                    });
                }
                // Taken (a leftover, or a symlink planted there): never touched, next name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // O_CREAT may have made the file before O_DIRECT was refused.
                    let _ = dir.unlink(&temp);
                    note = Some(format!(
                        "O_DIRECT refused on destination folder {} (EINVAL); writing through the page cache",
                        dir.path().display()
                    ));
                    want_direct = false;
                    continue;
                }
                Err(e) => return Err(dir.file_error("create", &temp, e)),
            }
        }
        Err(StoreError::io(
            "create a temporary file for",
            &dir.join(name),
            std::io::Error::other("too many leftover temporary files"),
        ))
    }

    /// The open temporary file (written at offsets by the copier).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file is open with O_DIRECT (writes must be aligned).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The final path the file gets on commit.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// The temporary path (for tests and logs).
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join(&self.temp)
    }

    /// Why O_DIRECT was not used although asked for, if so.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Syncs the data, renames the file to its final name and syncs the folder (all relative
    /// to the folder's handle; a symlink at the final name is replaced, never followed).
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.file
            .sync_all()
            .map_err(|e| StoreError::io("fsync", &self.temp_path(), e))?;
        self.dir
            .rename(&self.temp, &self.name)
            .map_err(|e| StoreError::io("rename into place", &self.target, e))?;
        self.armed = false;
        self.dir.sync()
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.dir.unlink(&self.temp) {
                tracing::warn!(path = %self.temp_path().display(), "cannot remove temporary file: {e}");
            }
        }
    }
}

/// Writes a small file durably: a temporary file beside it, fsync, rename, fsync of the
/// folder. The temporary file is removed on failure; the previous content, if any, stays.
/// The folder of `path` must not be a symlink; the file is reached relative to its handle.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .ok_or_else(|| StoreError::BadName(path.display().to_string()))?;
    write_atomic_in(&Dir::open(&folder_of(path))?, name, bytes)
}

/// [`write_atomic`] for the file `name` of the open folder `dir`.
pub(crate) fn write_atomic_in(dir: &Dir, name: &OsStr, bytes: &[u8]) -> Result<(), StoreError> {
    let mut staged = StagedFile::create_in(dir.try_clone()?, name, false)?;
    staged
        .file
        .write_all(bytes)
        .map_err(|e| StoreError::io("write", &staged.target, e))?;
    let path = staged.target.clone();
    staged.commit()?;
    tracing::trace!(path = %path.display(), bytes = bytes.len(), "written durably");
    Ok(())
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let dir = crate::store::scratch();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), vec!["a.json"]);
    }

    #[test]
    fn a_staged_file_dropped_uncommitted_is_removed() {
        let dir = crate::store::scratch();
        let path = dir.path().join("disk.raw");
        {
            let staged = StagedFile::create(&path, false).unwrap();
            assert!(staged.temp_path().exists());
            assert_eq!(staged.path(), path);
        }
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_staged_file_commits_under_its_final_name() {
        let dir = crate::store::scratch();
        let path = dir.path().join("disk.raw");
        let mut staged = StagedFile::create(&path, false).unwrap();
        staged.file.write_all(b"data").unwrap();
        let second = StagedFile::create(&path, false).unwrap();
        assert_ne!(second.temp_path(), staged.temp_path());
        drop(second);
        staged.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        assert_eq!(names(dir.path()), vec!["disk.raw"]);
    }

    #[test]
    fn direct_is_used_or_explained() {
        // tmpfs refuses O_DIRECT on older kernels and accepts it on newer ones: either way the
        // file is usable and a refusal is noted.
        let dir = crate::store::scratch();
        let staged = StagedFile::create(&dir.path().join("x"), true).unwrap();
        assert!(staged.is_direct() || staged.note().is_some());
    }

    #[test]
    fn files_are_private_whatever_the_umask() {
        use std::os::unix::fs::MetadataExt;
        let dir = crate::store::scratch();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let path = dir.path().join("a.json");
        write_atomic(&path, b"x").unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    }

    #[test]
    fn a_symlink_at_a_temporary_or_final_name_is_not_followed() {
        let dir = crate::store::scratch();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("a.json");
        // Planted at the first temporary name, and as the final file.
        let temp = dir
            .path()
            .join(format!(".a.json.vmb-tmp-{}", std::process::id()));
        // Planted as the folder itself: refused.
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
        let err = write_atomic(&linked.join("b.json"), b"x").unwrap_err();
        assert!(matches!(err, StoreError::Symlink(_)), "{err}");
        let err = StagedFile::create(&linked.join("disk.raw"), false).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&temp)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_missing_folder_is_a_target_error() {
        let dir = crate::store::scratch();
        let err = write_atomic(&dir.path().join("nope/a"), b"x").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::TargetMissing);
    }
}
