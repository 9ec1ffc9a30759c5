//! Opening the source, and the destination's temporary file: created beside the final name,
//! removed by its guard on every path unless committed (fsync, rename, fsync of the folder).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::CopyError;

/// The opened source.
pub(crate) struct Source {
    /// The file.
    pub file: File,
    /// Its logical size.
    pub size: u64,
    /// Whether O_DIRECT is in effect.
    pub direct: bool,
}

/// Opens `path` for reading, with O_DIRECT when asked and accepted (else a note says why not).
pub(crate) fn open_source(
    path: &Path,
    direct: bool,
    notes: &mut Vec<String>,
) -> Result<Source, CopyError> {
    let open_err = |source| CopyError::SourceOpen {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let kind = meta.file_type();
    // Opening a FIFO would block and a socket cannot be opened: refuse them up front.
    if kind.is_fifo() || kind.is_socket() || kind.is_char_device() {
        return Err(open_err(std::io::Error::other(
            "not a regular file or block device",
        )));
    }
    let mut opened = None;
    if direct {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => opened = Some((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => notes.push(format!(
                "O_DIRECT refused on source {} (EINVAL); reading through the page cache",
                path.display()
            )),
            Err(e) => return Err(open_err(e)),
        }
    }
    let (mut file, direct) = match opened {
        Some(x) => x,
        None => (File::open(path).map_err(open_err)?, false),
    };
    let meta = file.metadata().map_err(open_err)?;
    let size = if meta.file_type().is_block_device() {
        file.seek(SeekFrom::End(0)).map_err(open_err)?
    } else {
        meta.len()
    };
    // Sequential access: the kernel doubles its readahead for buffered reads. Advisory only.
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
    );
    Ok(Source { file, size, direct })
}

/// Where the copy goes: an existing folder gets the source's file name.
pub(crate) fn resolve_destination(src: &Path, dst: &Path) -> Result<PathBuf, CopyError> {
    let dst = if dst.is_dir() {
        let name = src.file_name().ok_or_else(|| {
            CopyError::BadOptions(format!("source {} has no file name", src.display()))
        })?;
        dst.join(name)
    } else {
        dst.to_owned()
    };
    let folder = folder_of(&dst);
    if !folder.is_dir() {
        return Err(CopyError::DestinationFolderMissing { path: folder });
    }
    if dst.file_name().is_none() {
        return Err(CopyError::BadOptions(format!(
            "destination {} has no file name",
            dst.display()
        )));
    }
    Ok(dst)
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The temporary destination file. Dropping it without [`TempFile::commit`] removes it.
pub(crate) struct TempFile {
    /// The open file.
    pub file: File,
    /// Whether O_DIRECT is in effect.
    pub direct: bool,
    temp: PathBuf,
    target: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Creates `.<name>.vmb-tmp-<pid>[-n]` beside `target`.
    pub(crate) fn create(
        target: &Path,
        direct: bool,
        notes: &mut Vec<String>,
    ) -> Result<Self, CopyError> {
        let folder = folder_of(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let open_err = |source| CopyError::DestinationOpen {
            path: target.to_owned(),
            source,
        };
        let mut want_direct = direct;
        for attempt in 0..100u32 {
            let suffix = if attempt == 0 {
                String::new()
            } else {
                format!("-{attempt}")
            };
            let temp = folder.join(format!(".{name}.vmb-tmp-{}{suffix}", std::process::id()));
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true).mode(0o644);
            if want_direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            match opts.open(&temp) {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        direct: want_direct,
                        temp,
                        target: target.to_owned(),
                        armed: true,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // create_new may have left the file behind before O_DIRECT was refused.
                    let _ = std::fs::remove_file(&temp);
                    notes.push(format!(
                        "O_DIRECT refused on destination folder {} (EINVAL); writing through the page cache",
                        folder.display()
                    ));
                    want_direct = false;
                    continue;
                }
                Err(e) => return Err(open_err(e)),
            }
        }
        Err(open_err(std::io::Error::other(
            "too many leftover temporary files",
        )))
    }

    /// The temporary path (for tests and logs).
    pub(crate) fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Syncs the data, renames the file to its final name and syncs the folder.
    pub(crate) fn commit(mut self, size: u64) -> Result<(), CopyError> {
        let write_err = |offset, e| CopyError::write(&self.target, offset, e);
        self.file.sync_all().map_err(|e| write_err(size, e))?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| write_err(size, e))?;
        self.armed = false;
        let folder = folder_of(&self.target);
        File::open(&folder)
            .and_then(|d| d.sync_all())
            .map_err(|e| write_err(size, e))?;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(&self.temp) {
                tracing::warn!("cannot remove temporary file {}: {e}", self.temp.display());
            }
        }
    }
}
