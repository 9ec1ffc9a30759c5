//! QEMU-compatible image locks for offline copies: while a shut-off domain's images are being
//! copied, hold the same open-file-description (OFD) byte-range locks that a read-only
//! `qemu-img convert` holds, so that a concurrent `virsh start` fails with QEMU's
//! `Failed to get "write" lock` instead of starting the guest on images being copied.
//!
//! Facts from QEMU's `block/file-posix.c` (its permission locking, QEMU 2.10 and later):
//! byte `100 + i` is read-locked by every opener that *holds* permission bit `i`, byte
//! `200 + i` by every opener that does *not share* permission bit `i`. Before taking a
//! permission, QEMU tests for a conflicting lock on byte `200 + i` (someone refuses to share
//! it), and for a permission it refuses to share it tests byte `100 + i` (someone holds it).
//! Permission bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize. A read-only
//! open without shared write (what `qemu-img convert` does on its source) thus read-locks
//! bytes 100 (holds consistent read), 201 (does not share write) and 203 (does not share
//! resize), which is what [`ImageLock`] takes. The locks are advisory: they only stop
//! cooperating openers (QEMU with locking on, the default), never our own reads.
//!
//! Safe code only: `nix`'s `fcntl` wraps the `F_OFD_*` calls.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg};

/// Byte read-locked by an opener that holds the "consistent read" permission.
pub const LOCK_BYTE_HOLDS_READ: i64 = 100;
/// Byte read-locked by an opener that holds the "write" permission.
pub const LOCK_BYTE_HOLDS_WRITE: i64 = 101;
/// Byte read-locked by an opener that does not share the "write" permission.
pub const LOCK_BYTE_UNSHARED_WRITE: i64 = 201;
/// Byte read-locked by an opener that does not share the "resize" permission.
pub const LOCK_BYTE_UNSHARED_RESIZE: i64 = 203;

/// Errors taking or testing image locks; each names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageLockError {
    /// The image cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The locks of the image cannot be tested.
    #[error("cannot test the locks of {}: {source}", path.display())]
    Probe {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A process holds the image open for writing.
    #[error("{} is open for writing by another process: is the domain running?", path.display())]
    Written {
        /// The image.
        path: PathBuf,
    },
    /// A process refuses to share what the lock needs.
    #[error("cannot lock byte {byte} of {} ({source}): another process refuses to share it", path.display())]
    Refused {
        /// The image.
        path: PathBuf,
        /// The lock byte.
        byte: i64,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

impl ImageLockError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ImageLockError::Open { source, .. } => ErrorKind::from_io(source),
            ImageLockError::Probe { .. } => ErrorKind::Io,
            ImageLockError::Written { .. } | ImageLockError::Refused { .. } => ErrorKind::Busy,
        }
    }
}

/// Shared locks held on one image for as long as the value lives (released on drop, when
/// the file description is closed).
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
}

fn open(path: &Path) -> Result<File, ImageLockError> {
    File::open(path).map_err(|source| ImageLockError::Open {
        path: path.to_path_buf(),
        source,
    })
}

fn flock(kind: i32, start: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

impl ImageLock {
    /// Opens `path` read-only and takes the locks of a read-only, write-unsharing opener.
    /// Fails when a process holds the image open for writing (a running QEMU) or refuses to
    /// share reading, naming the image; nothing is held then.
    pub fn acquire(path: &Path) -> Result<ImageLock, ImageLockError> {
        let file = open(path)?;
        let fd = file.as_raw_fd();
        // Is there a writer? A write lock on its byte would conflict with its read lock.
        let mut probe = flock(libc::F_WRLCK, LOCK_BYTE_HOLDS_WRITE);
        fcntl(fd, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|source| ImageLockError::Probe {
            path: path.to_path_buf(),
            source,
        })?;
        if probe.l_type != libc::F_UNLCK as libc::c_short {
            return Err(ImageLockError::Written {
                path: path.to_path_buf(),
            });
        }
        for byte in [
            LOCK_BYTE_HOLDS_READ,
            LOCK_BYTE_UNSHARED_WRITE,
            LOCK_BYTE_UNSHARED_RESIZE,
        ] {
            let lock = flock(libc::F_RDLCK, byte);
            fcntl(fd, FcntlArg::F_OFD_SETLK(&lock)).map_err(|source| ImageLockError::Refused {
                path: path.to_path_buf(),
                byte,
                source,
            })?;
        }
        Ok(ImageLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The locked image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when a process other than this lock's holder holds a lock on `byte` of the
    /// image that a write lock would conflict with (a test of what QEMU sees).
    pub fn conflicts_with_write(path: &Path, byte: i64) -> Result<bool, ImageLockError> {
        let file = open(path)?;
        let mut probe = flock(libc::F_WRLCK, byte);
        fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|source| {
            ImageLockError::Probe {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // Closing the file description releases its OFD locks; say so explicitly first.
        let unlock = flock(libc::F_UNLCK, 0);
        let whole = libc::flock { l_len: 0, ..unlock };
        let _ = fcntl(self.file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&whole));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_with_a_writer_and_are_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(!ImageLock::conflicts_with_write(&img, LOCK_BYTE_UNSHARED_WRITE).unwrap());
        let lock = ImageLock::acquire(&img).unwrap();
        assert_eq!(lock.path(), img.as_path());
        // OFD locks conflict between file descriptions, even within one process: what a
        // QEMU asking for the write permission would find.
        assert!(ImageLock::conflicts_with_write(&img, LOCK_BYTE_UNSHARED_WRITE).unwrap());
        assert!(ImageLock::conflicts_with_write(&img, LOCK_BYTE_HOLDS_READ).unwrap());
        assert!(!ImageLock::conflicts_with_write(&img, LOCK_BYTE_HOLDS_WRITE).unwrap());
        // A second reader like us can lock too (shared locks).
        let second = ImageLock::acquire(&img).unwrap();
        drop(second);
        drop(lock);
        assert!(!ImageLock::conflicts_with_write(&img, LOCK_BYTE_UNSHARED_WRITE).unwrap());
    }

    #[test]
    fn a_writer_holding_its_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        // Stand in for a QEMU holding the write permission: a read lock on byte 101.
        let writer = File::open(&img).unwrap();
        let l = flock(libc::F_RDLCK, LOCK_BYTE_HOLDS_WRITE);
        fcntl(writer.as_raw_fd(), FcntlArg::F_OFD_SETLK(&l)).unwrap();
        let e = ImageLock::acquire(&img).unwrap_err().to_string();
        assert!(e.contains("open for writing"), "{e}");
        drop(writer);
        assert!(ImageLock::acquire(&img).is_ok());
    }
}
