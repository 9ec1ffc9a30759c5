//! Opening the source, and the destination: a [`Sink`], the file the copy writes into and
//! its owner commits. The backup target's sinks come from the store; [`TempFile`] is the
//! copier's own, for a copy to a path it is handed (`vm-backup copy`, the C ABI, restores to a
//! local disk): created beside the final name, removed by its guard on every path unless
//! committed (fsync, rename, fsync of the folder).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
    // Advisory only. A mostly dense file is read sequentially: the kernel doubles its
    // readahead. A mostly sparse one is read extent by extent (SEEK_DATA), and readahead past
    // the end of each extent zero-fills page-cache pages for the hole that follows (16 % of
    // the CPU of a sparse copy in the profile of docs/performance.md): no readahead there, the
    // queue of reads in flight keeps the device busy instead.
    let advice = if is_mostly_sparse(meta.len(), meta.blocks() * 512, kind.is_file()) {
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM
    } else {
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL
    };
    let _ = nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, advice);
    Ok(Source { file, size, direct })
}

/// Whether a file of `len` bytes with `allocated` bytes on disk is mostly holes (less than half
/// allocated); only regular files have holes.
pub(crate) fn is_mostly_sparse(len: u64, allocated: u64, regular: bool) -> bool {
    regular && allocated < len / 2
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

/// Where a copy writes: a file open for positional writes (io_uring or pwrite, O_DIRECT when
/// [`Sink::is_direct`]), preallocated and filled by the copier, then committed through
/// [`Sink::commit`] by the copier once complete. Dropped uncommitted, its owner removes it.
pub trait Sink {
    /// The open file.
    fn file(&self) -> &File;
    /// Whether the file is open with O_DIRECT (writes are padded to 4 KiB, then cut back).
    fn is_direct(&self) -> bool;
    /// The final path, for errors and the report.
    fn path(&self) -> &Path;
    /// Why O_DIRECT was not used although asked for, if so (goes into the report's notes).
    fn note(&self) -> Option<&str> {
        None
    }
    /// Makes the file durable and visible under its final name.
    fn commit(self: Box<Self>) -> std::io::Result<()>;
}

/// Writes a chunk manifest as pretty JSON to `path` (for `vm-backup copy --manifest` and
/// `vmb_copy_file`), through the same temporary file and commit as a copy.
pub fn write_manifest(path: &Path, manifest: &super::ChunkManifest) -> Result<(), CopyError> {
    let mut json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| CopyError::write(path, 0, std::io::Error::other(e)))?;
    json.push(b'\n');
    let temp = TempFile::create(path, false, PRIVATE_MODE, &mut Vec::new())?;
    std::io::Write::write_all(&mut &temp.file, &json).map_err(|e| CopyError::write(path, 0, e))?;
    let size = json.len() as u64;
    Box::new(temp)
        .commit()
        .map_err(|e| CopyError::write(path, size, e))
}

/// The mode of the files the copier creates: readable by their owner only.
pub(crate) const PRIVATE_MODE: u32 = 0o600;

/// The copier's own temporary destination file. Dropping it without [`Sink::commit`] removes
/// it.
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
    /// Creates `.<name>.vmb-tmp-<pid>[-n]` beside `target` with `mode` (exactly, whatever
    /// the umask), never through a symlink.
    pub(crate) fn create(
        target: &Path,
        direct: bool,
        mode: u32,
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
            opts.write(true).create_new(true).mode(mode);
            let flags = if want_direct { libc::O_DIRECT } else { 0 };
            opts.custom_flags(flags | libc::O_NOFOLLOW);
            match opts.open(&temp) {
                Ok(file) => {
                    use std::os::unix::fs::PermissionsExt;
                    file.set_permissions(std::fs::Permissions::from_mode(mode))
                        .map_err(open_err)?;
                    return Ok(Self {
                        file,
                        direct: want_direct,
                        temp,
                        target: target.to_owned(),
                        armed: true,
                    });
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
}

impl Sink for TempFile {
    fn file(&self) -> &File {
        &self.file
    }

    fn is_direct(&self) -> bool {
        self.direct
    }

    fn path(&self) -> &Path {
        &self.target
    }

    /// Syncs the data, renames the file to its final name and syncs the folder.
    fn commit(mut self: Box<Self>) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.temp, &self.target)?;
        self.armed = false;
        File::open(folder_of(&self.target))?.sync_all()
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

#[cfg(test)]
mod tests {
    use super::is_mostly_sparse;

    #[test]
    fn readahead_only_for_mostly_dense_regular_files() {
        assert!(is_mostly_sparse(16 << 30, 4 << 30, true));
        assert!(!is_mostly_sparse(16 << 30, 12 << 30, true));
        assert!(
            !is_mostly_sparse(16 << 30, 0, false),
            "a block device has no holes"
        );
        assert!(!is_mostly_sparse(0, 0, true));
    }
}
