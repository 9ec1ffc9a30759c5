//! Helpers shared by the copier integration tests: building sparse files with real data,
//! comparing files, running both I/O engines.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use vm_backup::copier::{self, CopyOptions, IoPath};
use vm_backup::progress::{Level, Progress, Transfer};

/// The engines to exercise: the thread pool always, io_uring when this kernel allows it.
pub fn engines() -> Vec<IoPath> {
    match copier::probe_uring() {
        Ok(()) => vec![IoPath::Threads, IoPath::Uring],
        Err(why) => {
            eprintln!("SKIP: io_uring engine not tested here: {why}");
            vec![IoPath::Threads]
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Creates a file of `size` bytes whose only data are `extents` (offset, length) of
/// pseudo-random bytes; everything else is a hole.
pub fn sparse_file(path: &Path, size: u64, extents: &[(u64, usize)]) {
    let f = File::create(path).expect("create source");
    f.set_len(size).expect("set length");
    for (i, &(off, len)) in extents.iter().enumerate() {
        f.write_all_at(&pattern(len, i as u64 + 1), off)
            .expect("write extent");
    }
    f.sync_all().expect("sync source");
}

/// Asserts two files have the same length and bytes.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    let (la, lb) = (
        fa.metadata().expect("meta").len(),
        fb.metadata().expect("meta").len(),
    );
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert_eq!(n, m, "short read comparing at {pos}");
        if n == 0 {
            break;
        }
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at offset {}",
                a.display(),
                b.display(),
                pos + i as u64
            );
        }
        pos += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..]).expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

/// SHA-256 of a file, computed independently of the copier.
pub fn sha256_of(path: &Path) -> String {
    let mut f = File::open(path).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut f, &mut buf);
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// `sha256sum`'s verdict on a file.
pub fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

/// Allocated 512-byte blocks of a file.
pub fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

/// Names in a folder.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Options for tests: small buffers so that small files still use many of them.
pub fn options(io: IoPath) -> CopyOptions {
    CopyOptions {
        io,
        queue_depth: 4,
        buffer_size: 64 << 10,
        chunk_size: 256 << 10,
        ..CopyOptions::default()
    }
}

/// A progress sink that counts calls and runs an action on the first one.
pub struct OnFirst<F: Fn() + Send + Sync> {
    /// Transfer calls seen.
    pub calls: AtomicUsize,
    /// Last transfer seen.
    pub last: Mutex<Option<Transfer>>,
    action: F,
}

impl<F: Fn() + Send + Sync> OnFirst<F> {
    /// Runs `action` on the first transfer call.
    pub fn new(action: F) -> Self {
        Self {
            calls: AtomicUsize::new(0),
            last: Mutex::new(None),
            action,
        }
    }
}

impl<F: Fn() + Send + Sync> Progress for OnFirst<F> {
    fn transfer(&self, _what: &str, t: Transfer) {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            (self.action)();
        }
        *self.last.lock().expect("lock") = Some(t);
    }
    fn message(&self, _level: Level, _text: &str) {}
}

/// Whether we run as root (mounting tmpfs needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A filesystem mounted on `dir` for one test, unmounted on drop.
pub struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size`, or `None` (with a SKIP line) when that is not possible here.
    pub fn mount(dir: &Path, size: &str) -> Option<Self> {
        Self::mount_fs("tmpfs", dir, &format!("size={size}"))
    }

    /// Mounts a filesystem of type `fstype` with `options`, or `None` with a SKIP line.
    pub fn mount_fs(fstype: &str, dir: &Path, options: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("SKIP: mounting a {fstype} needs root");
            return None;
        }
        let status = std::process::Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(dir)
            .status();
        match status {
            Ok(s) if s.success() => Some(Self {
                dir: dir.to_owned(),
            }),
            other => {
                eprintln!(
                    "SKIP: cannot mount a {fstype} on {}: {other:?}",
                    dir.display()
                );
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// Opens a file for writing without truncating it.
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open rw")
}
