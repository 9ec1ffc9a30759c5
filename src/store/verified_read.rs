//! Verify-on-read: a read-only FUSE folder serving backup files, each chunk checked against its
//! manifest (SHA-256 per chunk, `backup-metadata.json`) the first time it is read.
//!
//! File-level restore (`vm-backup mount` / `files`) lets `qemu-storage-daemon` open the files of
//! this folder instead of the backup's own, so every byte that reaches the guest filesystem has
//! been checked: a chunk whose digest differs answers `EIO`, is logged (file and chunk named) and
//! is appended to a damage report ([`DAMAGE_FILE`]) the engine reads to word its error. Verified
//! chunks are remembered (a bit per chunk), so each is hashed once; the backup files are opened
//! read-only and never written.
//!
//! The server runs in a process of its own ([`serve`], behind the hidden `vm-backup
//! verified-serve` command) so that a mount outlives the command that made it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file, beside the FUSE folder, where the server appends one JSON line per damaged chunk.
pub const DAMAGE_FILE: &str = "damaged.jsonl";

/// One file to serve: the backup file and its chunk manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedFile {
    /// The name in the served folder (the backup file's own name).
    pub name: String,
    /// The backup file, opened read-only.
    pub path: PathBuf,
    /// Chunk size of the manifest.
    pub chunk_size: u64,
    /// Logical size of the file, as the manifest records it.
    pub file_size: u64,
    /// SHA-256 per chunk, lowercase hex.
    pub digests: Vec<String>,
}

/// What the server serves and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeSpec {
    /// The (existing, empty) folder to mount the FUSE file system on.
    pub mountpoint: PathBuf,
    /// The damage report ([`DAMAGE_FILE`]), appended to.
    pub damage_report: PathBuf,
    /// The files.
    pub files: Vec<ServedFile>,
}

/// One damaged chunk, as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    /// The backup file.
    pub file: PathBuf,
    /// Chunk index (0-based).
    pub chunk: u64,
    /// Byte offset of the chunk.
    pub offset: u64,
    /// Digest recorded in the manifest.
    pub expected: String,
    /// Digest of what was read (empty when the read itself failed).
    pub actual: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.actual.is_empty() {
            write!(
                f,
                "{}: chunk {} (offset {}) cannot be read",
                self.file.display(),
                self.chunk,
                self.offset
            )
        } else {
            write!(
                f,
                "{}: chunk {} (offset {}) has SHA-256 {}, the manifest says {}",
                self.file.display(),
                self.chunk,
                self.offset,
                self.actual,
                self.expected
            )
        }
    }
}

/// Errors of the verify-on-read layer.
#[derive(Debug, thiserror::Error)]
pub enum VerifiedReadError {
    /// A backup file cannot be opened or its size does not match the manifest.
    #[error("cannot serve {path}: {message}")]
    Open {
        /// The backup file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A manifest is inconsistent (chunk count vs size).
    #[error("the chunk manifest of {path} is inconsistent: {count} digests for {size} bytes in chunks of {chunk_size}")]
    Manifest {
        /// The backup file.
        path: PathBuf,
        /// Digests listed.
        count: usize,
        /// File size recorded.
        size: u64,
        /// Chunk size recorded.
        chunk_size: u64,
    },
    /// Mounting or serving the FUSE file system failed.
    #[error("FUSE file system on {path}: {source}")]
    Fuse {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl VerifiedReadError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            VerifiedReadError::Open { .. } => ErrorKind::NotFound,
            VerifiedReadError::Manifest { .. } => ErrorKind::Corrupt,
            VerifiedReadError::Fuse { .. } => ErrorKind::Tool,
        }
    }
}

/// Reads the damage report a server wrote (empty when there is none).
pub fn read_damage(report: &Path) -> Vec<Damage> {
    std::fs::read_to_string(report)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One served file, open.
struct Served {
    spec: ServedFile,
    file: File,
    /// One flag per chunk: verified.
    verified: Vec<bool>,
    /// Chunks found damaged (answer EIO again without re-reading).
    damaged: Vec<bool>,
}

/// The FUSE file system: inode 1 is the folder, inode 2 + i the i-th file.
pub struct VerifiedFs {
    files: Vec<Served>,
    damage_report: PathBuf,
    mtime: SystemTime,
}

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(3600);

impl VerifiedFs {
    /// Opens every file read-only and checks the manifests' shapes.
    pub fn open(spec: &ServeSpec) -> Result<Self, VerifiedReadError> {
        let mut files = Vec::new();
        for f in &spec.files {
            let file = File::open(&f.path).map_err(|e| VerifiedReadError::Open {
                path: f.path.clone(),
                message: e.to_string(),
            })?;
            let len = file
                .metadata()
                .map_err(|e| VerifiedReadError::Open {
                    path: f.path.clone(),
                    message: e.to_string(),
                })?
                .len();
            if len != f.file_size {
                return Err(VerifiedReadError::Open {
                    path: f.path.clone(),
                    message: format!("{len} bytes, the manifest says {}", f.file_size),
                });
            }
            let expected = if f.chunk_size == 0 {
                usize::MAX
            } else {
                f.file_size.div_ceil(f.chunk_size) as usize
            };
            if expected != f.digests.len() {
                return Err(VerifiedReadError::Manifest {
                    path: f.path.clone(),
                    count: f.digests.len(),
                    size: f.file_size,
                    chunk_size: f.chunk_size,
                });
            }
            files.push(Served {
                spec: f.clone(),
                file,
                verified: vec![false; expected],
                damaged: vec![false; expected],
            });
        }
        Ok(Self {
            files,
            damage_report: spec.damage_report.clone(),
            mtime: SystemTime::now(),
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == ROOT {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let f = self.files.get(usize::try_from(ino.checked_sub(2)?).ok()?)?;
            (FileType::RegularFile, f.spec.file_size, 0o444, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Reads `size` bytes at `offset` of file `idx`, verifying every chunk touched that was not
    /// verified yet. A damaged chunk is an error (and is reported once).
    fn read_verified(&mut self, idx: usize, offset: u64, size: u64) -> Result<Vec<u8>, Damage> {
        let damage_report = self.damage_report.clone();
        let f = &mut self.files[idx];
        let end = (offset + size).min(f.spec.file_size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let cs = f.spec.chunk_size;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let chunk = pos / cs;
            let cstart = chunk * cs;
            let cend = (cstart + cs).min(f.spec.file_size);
            let upto = cend.min(end);
            let ci = chunk as usize;
            let damage = |actual: String| Damage {
                file: f.spec.path.clone(),
                chunk,
                offset: cstart,
                expected: f.spec.digests[ci].clone(),
                actual,
            };
            if f.damaged[ci] {
                return Err(damage("(already found damaged)".into()));
            }
            if f.verified[ci] {
                let mut buf = vec![0u8; (upto - pos) as usize];
                f.file
                    .read_exact_at(&mut buf, pos)
                    .map_err(|_| damage(String::new()))?;
                out.extend_from_slice(&buf);
            } else {
                let mut buf = vec![0u8; (cend - cstart) as usize];
                if f.file.read_exact_at(&mut buf, cstart).is_err() {
                    let d = damage(String::new());
                    report(&damage_report, &d);
                    return Err(d);
                }
                let actual = hex::encode(Sha256::digest(&buf));
                if actual != f.spec.digests[ci] {
                    f.damaged[ci] = true;
                    let d = damage(actual);
                    report(&damage_report, &d);
                    return Err(d);
                }
                f.verified[ci] = true;
                tracing::debug!(file = %f.spec.path.display(), chunk, "chunk verified");
                out.extend_from_slice(&buf[(pos - cstart) as usize..(upto - cstart) as usize]);
            }
            pos = upto;
        }
        Ok(out)
    }
}

/// Logs a damaged chunk and appends it to the damage report.
fn report(path: &Path, d: &Damage) {
    tracing::error!("damaged backup chunk: {d}");
    eprintln!("vm-backup verified-serve: damaged backup chunk: {d}");
    if let Ok(line) = serde_json::to_string(d) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

impl Filesystem for VerifiedFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT {
            return reply.error(libc::ENOENT);
        }
        let found = self
            .files
            .iter()
            .position(|f| OsStr::new(&f.spec.name) == name);
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.attr(ino) {
            Some(a) if a.kind == FileType::RegularFile => reply.opened(0, 0),
            Some(_) => reply.error(libc::EISDIR),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(idx) = ino
            .checked_sub(2)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < self.files.len())
        else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        match self.read_verified(idx, offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(_) => reply.error(libc::EIO),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: BTreeMap<u64, (FileType, String)> = BTreeMap::new();
        entries.insert(1, (FileType::Directory, ".".into()));
        entries.insert(2, (FileType::Directory, "..".into()));
        for (i, f) in self.files.iter().enumerate() {
            entries.insert(i as u64 + 3, (FileType::RegularFile, f.spec.name.clone()));
        }
        for (n, (kind, name)) in entries.range((offset.max(0) as u64 + 1)..) {
            let ino = if *n <= 2 { ROOT } else { *n - 1 };
            if reply.add(ino, *n as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts the folder and serves it until it is unmounted. `ready` is called once the mount is
/// in place (the hidden command prints a line on it, which the engine waits for).
pub fn serve(spec: &ServeSpec, ready: impl FnOnce()) -> Result<(), VerifiedReadError> {
    let fs = VerifiedFs::open(spec)?;
    let options = [
        MountOption::RO,
        MountOption::FSName("vm-backup-verified".into()),
        MountOption::Subtype("vm-backup".into()),
        MountOption::DefaultPermissions,
    ];
    let fuse_err = |source| VerifiedReadError::Fuse {
        path: spec.mountpoint.clone(),
        source,
    };
    let mut session = fuser::Session::new(fs, &spec.mountpoint, &options).map_err(fuse_err)?;
    ready();
    session.run().map_err(fuse_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_for(dir: &Path, data: &[u8], chunk: u64) -> ServeSpec {
        let path = dir.join("disk.raw");
        std::fs::write(&path, data).unwrap();
        let digests = data
            .chunks(chunk as usize)
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        ServeSpec {
            mountpoint: dir.join("mnt"),
            damage_report: dir.join(DAMAGE_FILE),
            files: vec![ServedFile {
                name: "disk.raw".into(),
                path,
                chunk_size: chunk,
                file_size: data.len() as u64,
                digests,
            }],
        }
    }

    #[test]
    fn reads_across_chunks_and_verifies_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let spec = spec_for(dir.path(), &data, 1024);
        let mut fs = VerifiedFs::open(&spec).unwrap();
        let got = fs.read_verified(0, 1000, 3000).unwrap();
        assert_eq!(got, &data[1000..4000]);
        assert_eq!(fs.files[0].verified[..5], [true, true, true, true, false]);
        let tail = fs.read_verified(0, 9990, 100).unwrap();
        assert_eq!(tail, &data[9990..]);
        assert!(fs.read_verified(0, 20_000, 10).unwrap().is_empty());
    }

    #[test]
    fn a_flipped_byte_is_an_error_naming_the_chunk_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 5000];
        let spec = spec_for(dir.path(), &data, 1024);
        let mut bad = data.clone();
        bad[2100] ^= 1;
        std::fs::write(&spec.files[0].path, &bad).unwrap();
        let mut fs = VerifiedFs::open(&spec).unwrap();
        assert!(fs.read_verified(0, 0, 1024).is_ok());
        let err = fs.read_verified(0, 1000, 2000).unwrap_err();
        assert_eq!(err.chunk, 2);
        assert_eq!(err.offset, 2048);
        assert!(err.to_string().contains("chunk 2"), "{err}");
        let again = fs.read_verified(0, 2048, 1).unwrap_err();
        assert_eq!(again.chunk, 2);
        let reported = read_damage(&spec.damage_report);
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].chunk, 2);
    }

    #[test]
    fn a_size_or_manifest_mismatch_refuses_to_serve() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec_for(dir.path(), &[1u8; 3000], 1024);
        spec.files[0].digests.pop();
        assert!(matches!(
            VerifiedFs::open(&spec),
            Err(VerifiedReadError::Manifest { .. })
        ));
        spec.files[0].file_size = 10;
        assert!(matches!(
            VerifiedFs::open(&spec),
            Err(VerifiedReadError::Open { .. })
        ));
    }
}
