//! The throughput harness behind `vm-backup bench`: test images, interleaved runs against
//! baselines, medians and ratios.
//!
//! It builds three images in a folder — dense random data, a sparse raw image 25 % allocated in
//! scattered extents, and a qcow2 converted from the dense one — and times, round after round
//! and interleaved so that drifting machine load hits every method alike:
//!
//! - (a) the copier with both hashes, (b) the same on the thread pool instead of io_uring,
//!   (b2) with chunk hashes only, (a3) as a backup copies (O_DIRECT on both ends, every block
//!   read back from the destination: `engine::backup::backup_copy_options`),
//! - (c) `cp --sparse=always` then `sha256sum` (the reference site's method),
//! - (d) `qemu-img convert -m 16 -W -O raw` (no hash),
//! - the limits of the machine: a read-only pass, a write-only pass of the same size, and
//!   SHA-256 of one stream in memory,
//! - on a backup copy of each image (made once, before the rounds, by the copier): (v) the
//!   verify data path (`verify_file` against the copy's manifest, what `vm-backup verify` runs
//!   per disk) beside (v2) `sha256sum` of the copy, and (r) the restore data path (what
//!   `vm-backup restore` runs per disk, `engine::restore::apply::copy_checked`: one read, the
//!   copy with both hashes compared with the manifest and the metadata's SHA-256) beside (d)
//!   `qemu-img convert` and (a) the backup copy.
//!
//! Caches are dropped before each run when possible (root), otherwise reads use O_DIRECT, and
//! the report says which. Every method ends with its output on disk (`sync FILE` after the
//! subprocess baselines, as the copier syncs its output), so no figure is a page-cache figure.
//! Medians over the rounds and the ratios are pure functions, tested below.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use vm_backup::copier::{self, CopyOptions, HashMode, IoPath};
use vm_backup::engine::restore;
use vm_backup::progress::{CancelToken, Level, NoProgress, Progress};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The settings are unusable.
    #[error("bad bench settings: {0}")]
    BadSettings(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool (cp, sha256sum, qemu-img, sync) failed or is missing.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status and stderr, or why it could not start.
        detail: String,
    },
    /// The copier failed.
    #[error(transparent)]
    Copy(#[from] copier::CopyError),
    /// Interrupted by the operator.
    #[error("benchmark cancelled")]
    Cancelled,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

/// How the harness keeps the page cache out of the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CachePolicy {
    /// Drop when running as root, otherwise O_DIRECT reads.
    Auto,
    /// `sync; echo 3 > /proc/sys/vm/drop_caches` before every run (needs root).
    Drop,
    /// O_DIRECT reads for the copier and the read pass; the subprocess baselines may then be
    /// served partly from the cache.
    Direct,
    /// Nothing: warm-cache figures (only for quick checks).
    Warm,
}

/// What `vm-backup bench` is asked to do.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Where the images go (kept); `None`: a fresh folder under /var/tmp, removed afterwards.
    pub dir: Option<PathBuf>,
    /// Size of the dense image.
    pub dense_size: u64,
    /// Logical size of the sparse image (25 % allocated).
    pub sparse_size: u64,
    /// Rounds of every measurement; the report gives medians.
    pub rounds: usize,
    /// How caches are kept out.
    pub cache: CachePolicy,
    /// Also vary queue depth, buffer size and hash workers, and report the best.
    pub sweep: bool,
    /// The `vm-backup` binary, to measure the peak RSS of a copy as a child process.
    pub exe: Option<PathBuf>,
}

impl BenchSettings {
    /// The full benchmark: 4 GiB dense, 16 GiB sparse, 3 rounds.
    pub fn full() -> Self {
        Self {
            dir: None,
            dense_size: 4 << 30,
            sparse_size: 16 << 30,
            rounds: 3,
            cache: CachePolicy::Auto,
            sweep: false,
            exe: None,
        }
    }

    /// Small sizes for demos and tests: 256 MiB dense, 1 GiB sparse.
    pub fn quick() -> Self {
        Self {
            dense_size: 256 * MIB,
            sparse_size: 1 << 30,
            ..Self::full()
        }
    }
}

/// One measured method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// (a) the copier, both hashes.
    CopyBoth,
    /// (b) the copier, both hashes, thread pool.
    CopyThreads,
    /// (b2) the copier, chunk hashes only.
    CopyChunks,
    /// (a3) the copier as a backup runs it: O_DIRECT on both ends, every block read back.
    CopyBackup,
    /// (c) `cp --sparse=always` + `sha256sum`.
    CpSha256sum,
    /// (d) `qemu-img convert -m 16 -W -O raw`.
    QemuImg,
    /// Limit: read only.
    ReadOnly,
    /// Limit: write only.
    WriteOnly,
    /// Limit: SHA-256 of one stream in memory.
    Sha256Memory,
    /// (v) the verify data path on the backup copy.
    Verify,
    /// (v2) `sha256sum` of the backup copy.
    Sha256sumCopy,
    /// (r) the restore data path from the backup copy.
    Restore,
}

impl Method {
    /// The methods run on every image.
    pub const ON_IMAGES: [Method; 9] = [
        Method::CopyBoth,
        Method::CopyThreads,
        Method::CopyChunks,
        Method::CopyBackup,
        Method::CpSha256sum,
        Method::QemuImg,
        Method::Verify,
        Method::Sha256sumCopy,
        Method::Restore,
    ];
    /// The limits, measured on the dense image's size.
    pub const LIMITS: [Method; 3] = [Method::ReadOnly, Method::WriteOnly, Method::Sha256Memory];

    /// The label in the table.
    pub fn label(self) -> &'static str {
        match self {
            Method::CopyBoth => "(a) vm-backup copy, both hashes",
            Method::CopyThreads => "(b) (a) on the thread pool",
            Method::CopyChunks => "(b2) (a) with --hash chunks",
            Method::CopyBackup => "(a3) (a) as a backup: O_DIRECT, read-back",
            Method::CpSha256sum => "(c) cp --sparse=always + sha256sum",
            Method::QemuImg => "(d) qemu-img convert -m 16 -W",
            Method::ReadOnly => "read only",
            Method::WriteOnly => "write only",
            Method::Sha256Memory => "SHA-256, 1 stream, memory",
            Method::Verify => "(v) verify the backup copy",
            Method::Sha256sumCopy => "(v2) sha256sum of the backup copy",
            Method::Restore => "(r) restore it, one checked read",
        }
    }
}

/// A test image.
#[derive(Debug, Clone, Serialize)]
pub struct Image {
    /// `dense`, `sparse` or `qcow2`.
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// Its length in bytes (what throughputs are computed from).
    pub size: u64,
    /// Bytes allocated on disk.
    pub allocated: u64,
}

/// The rounds of one method on one image.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// The image (`dense`, `sparse`, `qcow2`; the limits use `dense`).
    pub image: String,
    /// The method.
    pub method: Method,
    /// The table label.
    pub label: String,
    /// Bytes per run (the image's length).
    pub bytes: u64,
    /// Seconds of each round.
    pub seconds: Vec<f64>,
    /// Median seconds.
    pub median_seconds: f64,
    /// Bytes over median seconds, in GiB/s.
    pub gib_per_sec: f64,
}

/// A ratio of throughputs, e.g. (a) over (c).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// The image.
    pub image: String,
    /// What is compared, e.g. `a/c`.
    pub name: String,
    /// Throughput of the first over that of the second.
    pub value: f64,
}

/// One point of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Buffers in flight.
    pub queue_depth: usize,
    /// Buffer size in bytes.
    pub buffer_size: usize,
    /// Hash workers.
    pub hash_workers: usize,
    /// Throughput of (a) on the dense image, GiB/s.
    pub gib_per_sec: f64,
}

/// The whole report (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The folder of the images.
    pub dir: PathBuf,
    /// The cache policy that ran.
    pub cache: CachePolicy,
    /// Rounds per measurement.
    pub rounds: usize,
    /// The images.
    pub images: Vec<Image>,
    /// Every method on every image, and the limits.
    pub measurements: Vec<Measurement>,
    /// (a)/(c), (a)/(d) per image, and (a)/min(read, write, hash) on the dense image.
    pub ratios: Vec<Ratio>,
    /// Peak resident set of (a) as a child `vm-backup copy` of the dense image, KiB.
    pub peak_rss_kib: Option<u64>,
    /// The I/O engine (a) ran on.
    pub copy_io_path: Option<IoPath>,
    /// The sweep, when asked for.
    pub sweep: Vec<SweepPoint>,
    /// The best sweep point.
    pub sweep_best: Option<SweepPoint>,
    /// How the figures were obtained, and anything skipped.
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Pure functions: medians, throughputs, ratios, parsing, extent choice.

/// The median of `values` (mean of the two middle ones for an even count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// GiB per second for `bytes` in `seconds` (0 when no time was measured).
pub fn gib_per_sec(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / GIB / seconds
    } else {
        0.0
    }
}

/// A measurement from its rounds.
pub fn summarise(image: &str, method: Method, bytes: u64, seconds: Vec<f64>) -> Measurement {
    let median_seconds = median(&seconds).unwrap_or(0.0);
    Measurement {
        image: image.to_owned(),
        method,
        label: method.label().to_owned(),
        bytes,
        gib_per_sec: gib_per_sec(bytes, median_seconds),
        seconds,
        median_seconds,
    }
}

/// The ratios of the report: per image (a)/(c) and (a)/(d), and on the dense image
/// (a)/min(read, write, hash). Ratios whose parts are missing or zero are left out.
pub fn compute_ratios(measurements: &[Measurement]) -> Vec<Ratio> {
    let find = |image: &str, method: Method| {
        measurements
            .iter()
            .find(|m| m.image == image && m.method == method && m.gib_per_sec > 0.0)
            .map(|m| m.gib_per_sec)
    };
    let mut images: Vec<&str> = Vec::new();
    for m in measurements {
        if Method::ON_IMAGES.contains(&m.method) && !images.contains(&m.image.as_str()) {
            images.push(&m.image);
        }
    }
    let mut ratios = Vec::new();
    let mut push = |image: &str, name: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            ratios.push(Ratio {
                image: image.to_owned(),
                name: name.to_owned(),
                value: a / b,
            });
        }
    };
    for image in images {
        let a = find(image, Method::CopyBoth);
        push(image, "a/c", a, find(image, Method::CpSha256sum));
        push(image, "a/d", a, find(image, Method::QemuImg));
        push(
            image,
            "a3/d",
            find(image, Method::CopyBackup),
            find(image, Method::QemuImg),
        );
        let v = find(image, Method::Verify);
        push(image, "v/v2", v, find(image, Method::Sha256sumCopy));
        let r = find(image, Method::Restore);
        push(image, "r/d", r, find(image, Method::QemuImg));
        push(image, "r/a", r, a);
    }
    let limits: Option<Vec<f64>> = Method::LIMITS.iter().map(|&m| find("dense", m)).collect();
    if let Some(limits) = limits {
        let bound = limits.iter().copied().fold(f64::INFINITY, f64::min);
        push(
            "dense",
            "a/min(read,write,hash)",
            find("dense", Method::CopyBoth),
            Some(bound),
        );
        push(
            "dense",
            "a3/min(read,write,hash)",
            find("dense", Method::CopyBackup),
            Some(bound),
        );
        push(
            "dense",
            "v/read",
            find("dense", Method::Verify),
            Some(limits[0]),
        );
    }
    ratios
}

/// The best sweep point (highest throughput).
pub fn best_point(points: &[SweepPoint]) -> Option<SweepPoint> {
    points
        .iter()
        .max_by(|x, y| x.gib_per_sec.total_cmp(&y.gib_per_sec))
        .cloned()
}

/// "Maximum resident set size (kbytes): N" from `/usr/bin/time -v`'s output.
pub fn parse_max_rss_kib(time_output: &str) -> Option<u64> {
    time_output.lines().find_map(|line| {
        let (key, value) = line.trim().split_once(':')?;
        (key.trim() == "Maximum resident set size (kbytes)")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// A deterministic pseudo-random generator (splitmix64). Test data needs to be incompressible
/// and reproducible, not secret; this is five lines against a new dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buffer` with pseudo-random bytes.
    pub fn fill(&mut self, buffer: &mut [u8]) {
        for word in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

/// Which of `count` extents are allocated: a quarter (at least one), scattered by a seeded
/// shuffle, in increasing order.
pub fn allocated_extents(count: u64, seed: u64) -> Vec<u64> {
    let mut indexes: Vec<u64> = (0..count).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..indexes.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        indexes.swap(i, j);
    }
    let keep = count.div_ceil(4).min(count) as usize;
    let mut chosen = indexes[..keep].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The extent size of a sparse image: 1/1024 of it, between 1 MiB and 64 MiB, a multiple of
/// 1 MiB.
pub fn extent_size(sparse_size: u64) -> u64 {
    ((sparse_size / 1024) / MIB).clamp(1, 64) * MIB
}

/// Human size: "4.00 GiB", "256 MiB".
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

impl BenchReport {
    /// The report as a table for a terminal.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let cache = match self.cache {
            CachePolicy::Drop => "page cache dropped before every run",
            CachePolicy::Direct => "O_DIRECT reads (caches not dropped: not root)",
            CachePolicy::Warm => "WARM caches (figures include the page cache)",
            CachePolicy::Auto => "auto",
        };
        out.push_str(&format!(
            "vm-backup bench in {}: median of {} round(s), {cache}\n\n",
            self.dir.display(),
            self.rounds
        ));
        out.push_str(&format!(
            "{:<22} {:<38} {:>8} {:>10}\n",
            "image", "method", "GiB/s", "median s"
        ));
        for m in &self.measurements {
            let image = if Method::LIMITS.contains(&m.method) {
                format!("limit ({})", human_size(m.bytes))
            } else {
                let size = self
                    .images
                    .iter()
                    .find(|i| i.name == m.image)
                    .map_or(m.bytes, |i| i.size);
                format!("{} {}", m.image, human_size(size))
            };
            out.push_str(&format!(
                "{:<22} {:<38} {:>8.3} {:>10.3}\n",
                image, m.label, m.gib_per_sec, m.median_seconds
            ));
        }
        out.push_str("\nratios (throughput of the first over the second):\n");
        for r in &self.ratios {
            out.push_str(&format!(
                "  {:<8} {:<24} {:>6.2}x\n",
                r.image, r.name, r.value
            ));
        }
        if let Some(kib) = self.peak_rss_kib {
            out.push_str(&format!(
                "\npeak RSS of (a) as `vm-backup copy` on the dense image: {:.1} MiB\n",
                kib as f64 / 1024.0
            ));
        }
        if let Some(best) = &self.sweep_best {
            out.push_str(&format!(
                "\nsweep ({} points), best: --queue-depth {} --buffer-size {}k --hash-workers {} \
                 -> {:.3} GiB/s\n",
                self.sweep.len(),
                best.queue_depth,
                best.buffer_size / 1024,
                best.hash_workers,
                best.gib_per_sec
            ));
        }
        if !self.notes.is_empty() {
            out.push_str("\nnotes:\n");
            for note in &self.notes {
                out.push_str(&format!("  - {note}\n"));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The images.

/// The working folder: given (kept) or made under /var/tmp (removed on drop).
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl WorkDir {
    fn new(dir: Option<&Path>) -> Result<Self, BenchError> {
        match dir {
            Some(path) => {
                std::fs::create_dir_all(path).map_err(io_err(format!(
                    "cannot create bench folder {}",
                    path.display()
                )))?;
                Ok(Self {
                    path: path.to_owned(),
                    remove: false,
                })
            }
            None => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                // /var/tmp is on disk on most systems, where /tmp may be a tmpfs.
                let base = Path::new("/var/tmp");
                let base = if base.is_dir() {
                    base.to_path_buf()
                } else {
                    std::env::temp_dir()
                };
                let path = base.join(format!("vm-backup-bench-{}-{stamp}", std::process::id()));
                std::fs::create_dir(&path)
                    .map_err(io_err(format!("cannot create {}", path.display())))?;
                Ok(Self { path, remove: true })
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes a file through a `.partial` name, renamed when complete, so that an interrupted
/// creation is never reused.
fn create_image(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), BenchError> {
    let partial = path.with_extension("partial");
    let result = File::create(&partial)
        .and_then(|mut file| {
            write(&mut file)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&partial, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        BenchError::Io {
            context: format!("cannot create test image {}", path.display()),
            source: e,
        }
    })
}

/// Writes `len` pseudo-random bytes from the current position.
fn write_random(file: &mut File, len: u64, rng: &mut SplitMix64) -> std::io::Result<()> {
    let mut buffer = vec![0u8; (4 * MIB) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buffer.len() as u64) as usize;
        rng.fill(&mut buffer[..n]);
        file.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn image_info(name: &str, path: &Path) -> Result<Image, BenchError> {
    let meta =
        std::fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
    Ok(Image {
        name: name.to_owned(),
        path: path.to_owned(),
        size: meta.len(),
        allocated: meta.blocks() * 512,
    })
}

/// Creates (or reuses, when present with the right size) the three images.
fn prepare_images(
    dir: &Path,
    settings: &BenchSettings,
    progress: &dyn Progress,
) -> Result<Vec<Image>, BenchError> {
    let dense = dir.join(format!("dense-{}.raw", settings.dense_size));
    let sparse = dir.join(format!("sparse-{}.raw", settings.sparse_size));
    let qcow2 = dir.join(format!("dense-{}.qcow2", settings.dense_size));
    let present = |p: &Path, len: Option<u64>| {
        std::fs::metadata(p).is_ok_and(|m| len.is_none_or(|l| m.len() == l))
    };

    if !present(&dense, Some(settings.dense_size)) {
        progress.message(
            Level::Info,
            &format!("creating {} of random data", dense.display()),
        );
        let mut rng = SplitMix64::new(1);
        create_image(&dense, |f| write_random(f, settings.dense_size, &mut rng))?;
    }
    if !present(&sparse, Some(settings.sparse_size)) {
        progress.message(
            Level::Info,
            &format!(
                "creating {} (25 % allocated in scattered extents)",
                sparse.display()
            ),
        );
        let extent = extent_size(settings.sparse_size);
        let count = settings.sparse_size / extent;
        let mut rng = SplitMix64::new(2);
        create_image(&sparse, |f| {
            for index in allocated_extents(count, 3) {
                std::io::Seek::seek(f, std::io::SeekFrom::Start(index * extent))?;
                write_random(f, extent, &mut rng)?;
            }
            f.set_len(settings.sparse_size)
        })?;
    }
    if !present(&qcow2, None) {
        progress.message(
            Level::Info,
            &format!("creating {} with qemu-img convert", qcow2.display()),
        );
        let partial = qcow2.with_extension("partial");
        run_tool(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&dense)
                .arg(&partial),
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })?;
        std::fs::rename(&partial, &qcow2)
            .map_err(io_err(format!("cannot rename {}", partial.display())))?;
    }
    Ok(vec![
        image_info("dense", &dense)?,
        image_info("sparse", &sparse)?,
        image_info("qcow2", &qcow2)?,
    ])
}

// ---------------------------------------------------------------------------------------------
// Cache control and tools.

/// Runs a tool, failing with its stderr when it fails.
fn run_tool(command: &mut Command) -> Result<(), BenchError> {
    let tool = format!("{:?}", command.get_program());
    let output = command.output().map_err(|e| BenchError::Tool {
        tool: tool.clone(),
        detail: format!("cannot start: {e}"),
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(BenchError::Tool {
            tool,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

/// Whether this process may drop the page cache.
fn can_drop_caches() -> bool {
    nix::unistd::geteuid().is_root() && OpenOptions::new().write(true).open(DROP_CACHES).is_ok()
}

/// The policy that will run for `asked`, refusing `Drop` when not allowed.
fn resolve_cache_policy(asked: CachePolicy) -> Result<CachePolicy, BenchError> {
    match asked {
        CachePolicy::Auto if can_drop_caches() => Ok(CachePolicy::Drop),
        CachePolicy::Auto => Ok(CachePolicy::Direct),
        CachePolicy::Drop if !can_drop_caches() => Err(BenchError::BadSettings(format!(
            "cannot write {DROP_CACHES} (needs root); use --cache direct"
        ))),
        other => Ok(other),
    }
}

/// Flushes dirty data and, under the Drop policy, empties the page cache.
fn before_run(policy: CachePolicy) -> Result<(), BenchError> {
    nix::unistd::sync();
    if policy == CachePolicy::Drop {
        std::fs::write(DROP_CACHES, b"3\n")
            .map_err(io_err(format!("cannot write {DROP_CACHES}")))?;
    }
    Ok(())
}

/// Times `run`, after `before_run`.
fn timed(
    policy: CachePolicy,
    run: impl FnOnce() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    before_run(policy)?;
    let start = Instant::now();
    run()?;
    Ok(start.elapsed().as_secs_f64())
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

// ---------------------------------------------------------------------------------------------
// One function per measurement. Each returns seconds and leaves no output behind.

/// The copier's options for (a), (b), (b2) and (a3).
fn copy_options(method: Method, policy: CachePolicy) -> CopyOptions {
    let mut options = CopyOptions {
        direct_read: policy == CachePolicy::Direct,
        ..CopyOptions::default()
    };
    match method {
        Method::CopyThreads => options.io = IoPath::Threads,
        Method::CopyChunks => options.hash = HashMode::Chunks,
        Method::CopyBackup => options = vm_backup::engine::backup::backup_copy_options(),
        _ => {}
    }
    options
}

/// (a), (b), (b2): the library's copy_file, in process.
fn measure_copy(
    src: &Path,
    dst: &Path,
    options: &CopyOptions,
    policy: CachePolicy,
    cancel: &CancelToken,
) -> Result<(f64, IoPath), BenchError> {
    let mut io_path = IoPath::Auto;
    let seconds = timed(policy, || {
        let report = copier::copy_file(src, dst, options, &NoProgress, cancel)?;
        io_path = report.io_path;
        Ok(())
    });
    remove(dst);
    Ok((seconds?, io_path))
}

/// (c): `cp --sparse=always SRC DST; sync DST; sha256sum DST`.
fn measure_cp_sha256sum(src: &Path, dst: &Path, policy: CachePolicy) -> Result<f64, BenchError> {
    let seconds = timed(policy, || {
        run_tool(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
        run_tool(Command::new("sync").arg(dst))?;
        run_tool(Command::new("sha256sum").arg(dst))
    });
    remove(dst);
    seconds
}

/// (d): `qemu-img convert -m 16 -W -O raw SRC DST; sync DST`.
fn measure_qemu_img(
    src: &Path,
    format: &str,
    dst: &Path,
    policy: CachePolicy,
) -> Result<f64, BenchError> {
    let seconds = timed(policy, || {
        run_tool(
            Command::new("qemu-img")
                .args(["convert", "-m", "16", "-W", "-f", format, "-O", "raw"])
                .arg(src)
                .arg(dst),
        )?;
        run_tool(Command::new("sync").arg(dst))
    });
    remove(dst);
    seconds
}

/// Limit: reads `src` once (O_DIRECT under the Direct policy) in 4 MiB requests.
fn measure_read(src: &Path, policy: CachePolicy) -> Result<f64, BenchError> {
    const BLOCK: usize = 4 << 20;
    timed(policy, || {
        let mut options = OpenOptions::new();
        options.read(true);
        if policy == CachePolicy::Direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options
            .open(src)
            .map_err(io_err(format!("cannot open {}", src.display())))?;
        // O_DIRECT needs an aligned buffer: over-allocate and start at a 4096-byte boundary.
        let mut storage = vec![0u8; BLOCK + 4096];
        let start = storage.as_ptr().align_offset(4096);
        let buffer = &mut storage[start..start + BLOCK];
        loop {
            let n = file
                .read(buffer)
                .map_err(io_err(format!("cannot read {}", src.display())))?;
            if n == 0 {
                return Ok(());
            }
        }
    })
}

/// Limit: writes `bytes` of random data to a new file in 4 MiB requests and syncs it.
fn measure_write(dst: &Path, bytes: u64, policy: CachePolicy) -> Result<f64, BenchError> {
    let mut buffer = vec![0u8; 4 << 20];
    SplitMix64::new(4).fill(&mut buffer);
    let seconds = timed(policy, || {
        let mut file =
            File::create(dst).map_err(io_err(format!("cannot create {}", dst.display())))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buffer.len() as u64) as usize;
            file.write_all(&buffer[..n])
                .map_err(io_err(format!("cannot write {}", dst.display())))?;
            left -= n as u64;
        }
        file.sync_all()
            .map_err(io_err(format!("cannot sync {}", dst.display())))
    });
    remove(dst);
    seconds
}

/// Limit: SHA-256 of `bytes` from a 1 MiB buffer in memory, one stream, one thread.
fn measure_hash(bytes: u64) -> f64 {
    let mut buffer = vec![0u8; MIB as usize];
    SplitMix64::new(5).fill(&mut buffer);
    let start = Instant::now();
    let mut hasher = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        hasher.update(&buffer[..n]);
        left -= n as u64;
    }
    std::hint::black_box(hasher.finalize());
    start.elapsed().as_secs_f64()
}

/// Peak RSS of `vm-backup copy SRC DST` run as a child under `/usr/bin/time -v`.
fn measure_peak_rss(exe: &Path, src: &Path, dst: &Path) -> Result<Option<u64>, BenchError> {
    let output = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(exe)
        .arg("copy")
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| BenchError::Tool {
            tool: "/usr/bin/time".into(),
            detail: format!("cannot start: {e}"),
        });
    remove(dst);
    let output = output?;
    if !output.status.success() {
        return Err(BenchError::Tool {
            tool: format!("{} copy", exe.display()),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(parse_max_rss_kib(&String::from_utf8_lossy(&output.stderr)))
}

/// A copy of an image as a backup holds it: the file and its chunk manifest.
struct BackupCopy {
    path: PathBuf,
    manifest: copier::ChunkManifest,
    sha256: String,
}

/// Makes the backup copy of `image` in `dir` (the copier, both hashes; not timed).
fn make_backup_copy(
    image: &Image,
    dir: &Path,
    cancel: &CancelToken,
) -> Result<BackupCopy, BenchError> {
    let path = dir.join(format!("{}.backup", image.name));
    let report = copier::copy_file(
        &image.path,
        &path,
        &CopyOptions::default(),
        &NoProgress,
        cancel,
    )?;
    let (Some(manifest), Some(sha256)) = (report.manifest, report.sha256) else {
        return Err(BenchError::BadSettings(format!(
            "the copy of {} has no manifest or no SHA-256",
            image.name
        )));
    };
    Ok(BackupCopy {
        path,
        manifest,
        sha256,
    })
}

/// Whether a verify report found the file intact.
fn verified(report: &copier::VerifyFileReport, path: &Path) -> Result<(), BenchError> {
    if report.ok {
        Ok(())
    } else {
        Err(BenchError::Tool {
            tool: "verify_file".into(),
            detail: format!("{} does not match its manifest", path.display()),
        })
    }
}

/// (v): `copier::verify_file` of the backup copy against its manifest, as `vm-backup verify`
/// runs it on every disk.
fn measure_verify(
    backup: &BackupCopy,
    policy: CachePolicy,
    cancel: &CancelToken,
) -> Result<f64, BenchError> {
    timed(policy, || {
        let report = copier::verify_file(&backup.path, &backup.manifest, &NoProgress, cancel)?;
        verified(&report, &backup.path)
    })
}

/// (v2): `sha256sum FILE`.
fn measure_sha256sum(path: &Path, policy: CachePolicy) -> Result<f64, BenchError> {
    timed(policy, || run_tool(Command::new("sha256sum").arg(path)))
}

/// (r): the data path of `vm-backup restore` for one disk, the very function it runs
/// (`engine::restore::apply::copy_checked`): one read of the backup's image, copied with both
/// hashes, every chunk compared with the manifest and the whole file with the recorded
/// SHA-256. The libvirt part of a restore (define the domain) is not in it.
fn measure_restore(
    backup: &BackupCopy,
    dst: &Path,
    policy: CachePolicy,
    cancel: &CancelToken,
) -> Result<f64, BenchError> {
    let seconds = timed(policy, || {
        let copied = restore::apply::copy_checked(
            &backup.path,
            dst,
            "backup",
            &backup.manifest,
            &backup.sha256,
            &NoProgress,
            cancel,
        )
        .map_err(|e| BenchError::Tool {
            tool: "restore".into(),
            detail: e.to_string(),
        })?;
        match copied.check {
            Some(c) if c.ok => Ok(()),
            c => Err(BenchError::Tool {
                tool: "restore".into(),
                detail: format!(
                    "the copy of {} differs from its manifest: {}",
                    backup.path.display(),
                    c.map(|c| c.detail).unwrap_or_default()
                ),
            }),
        }
    });
    remove(dst);
    seconds
}

/// Runs one of [`Method::ON_IMAGES`] on `image`, writing to `dst` (removed afterwards); also
/// returns the I/O engine for the copier's methods.
fn measure_on_image(
    method: Method,
    image: &Image,
    backup: &BackupCopy,
    dst: &Path,
    policy: CachePolicy,
    cancel: &CancelToken,
) -> Result<(f64, Option<IoPath>), BenchError> {
    match method {
        Method::Verify => Ok((measure_verify(backup, policy, cancel)?, None)),
        Method::Sha256sumCopy => Ok((measure_sha256sum(&backup.path, policy)?, None)),
        Method::Restore => Ok((measure_restore(backup, dst, policy, cancel)?, None)),
        Method::CopyBoth | Method::CopyThreads | Method::CopyChunks | Method::CopyBackup => {
            let options = copy_options(method, policy);
            let (t, io) = measure_copy(&image.path, dst, &options, policy, cancel)?;
            Ok((t, Some(io)))
        }
        Method::CpSha256sum => Ok((measure_cp_sha256sum(&image.path, dst, policy)?, None)),
        Method::QemuImg => {
            let format = if image.name == "qcow2" {
                "qcow2"
            } else {
                "raw"
            };
            Ok((measure_qemu_img(&image.path, format, dst, policy)?, None))
        }
        Method::ReadOnly | Method::WriteOnly | Method::Sha256Memory => Err(
            BenchError::BadSettings(format!("{} is not measured per image", method.label())),
        ),
    }
}

/// The sweep grid: queue depth × buffer size × hash workers.
fn sweep_grid() -> Vec<(usize, usize, usize)> {
    let mut grid = Vec::new();
    for queue_depth in [4, 16, 64] {
        for buffer_size in [256 << 10, 1 << 20, 4 << 20] {
            for hash_workers in [1, 2] {
                grid.push((queue_depth, buffer_size, hash_workers));
            }
        }
    }
    grid
}

/// Runs the sweep on the dense image, one run per point.
fn run_sweep(
    dense: &Image,
    out: &Path,
    policy: CachePolicy,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Vec<SweepPoint>, BenchError> {
    let dst = out.join("sweep.raw");
    let mut points = Vec::new();
    for (queue_depth, buffer_size, hash_workers) in sweep_grid() {
        if cancel.is_cancelled() {
            return Err(BenchError::Cancelled);
        }
        let options = CopyOptions {
            queue_depth,
            buffer_size,
            hash_workers,
            chunk_size: copier::DEFAULT_CHUNK_SIZE.max(buffer_size as u64),
            ..copy_options(Method::CopyBoth, policy)
        };
        let (seconds, _) = measure_copy(&dense.path, &dst, &options, policy, cancel)?;
        let point = SweepPoint {
            queue_depth,
            buffer_size,
            hash_workers,
            gib_per_sec: gib_per_sec(dense.size, seconds),
        };
        progress.message(
            Level::Info,
            &format!(
                "sweep qd {queue_depth} buffer {}k workers {hash_workers}: {:.3} GiB/s",
                buffer_size / 1024,
                point.gib_per_sec
            ),
        );
        points.push(point);
    }
    Ok(points)
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Runs the benchmark and returns its report. Progress lines go to `progress`; `cancel` stops
/// it between (and inside) runs. A folder it created itself is removed at the end.
pub fn run(
    settings: &BenchSettings,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<BenchReport, BenchError> {
    if settings.rounds == 0 {
        return Err(BenchError::BadSettings(
            "--rounds must be at least 1".into(),
        ));
    }
    if settings.dense_size < MIB || settings.sparse_size < 4 * MIB {
        return Err(BenchError::BadSettings(
            "sizes must be at least 1 MiB (dense) and 4 MiB (sparse)".into(),
        ));
    }
    let policy = resolve_cache_policy(settings.cache)?;
    let work = WorkDir::new(settings.dir.as_deref())?;
    let images = prepare_images(&work.path, settings, progress)?;
    let out = work.path.join("out");
    std::fs::create_dir_all(&out).map_err(io_err(format!("cannot create {}", out.display())))?;

    let dense = &images[0];
    let backups_dir = work.path.join("backups");
    std::fs::create_dir_all(&backups_dir)
        .map_err(io_err(format!("cannot create {}", backups_dir.display())))?;
    let mut backups = Vec::with_capacity(images.len());
    for image in &images {
        progress.message(
            Level::Info,
            &format!("backup copy of {} for (v) and (r)", image.name),
        );
        backups.push(make_backup_copy(image, &backups_dir, cancel)?);
    }
    let mut seconds: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); Method::ON_IMAGES.len()]; 3];
    let mut limit_seconds: Vec<Vec<f64>> = vec![Vec::new(); Method::LIMITS.len()];
    let mut copy_io_path = None;

    for round in 0..settings.rounds {
        for (i, image) in images.iter().enumerate() {
            // Rotate the order each round so that no method always runs first.
            for k in 0..Method::ON_IMAGES.len() {
                let index = (k + round) % Method::ON_IMAGES.len();
                let method = Method::ON_IMAGES[index];
                if cancel.is_cancelled() {
                    return Err(BenchError::Cancelled);
                }
                progress.message(
                    Level::Info,
                    &format!(
                        "round {}/{}: {} on {}",
                        round + 1,
                        settings.rounds,
                        method.label(),
                        image.name
                    ),
                );
                let dst = out.join(format!("{}.out", image.name));
                let (t, io) = measure_on_image(method, image, &backups[i], &dst, policy, cancel)?;
                if method == Method::CopyBoth {
                    copy_io_path = io;
                }
                progress.message(
                    Level::Info,
                    &format!("  {t:.2} s, {:.3} GiB/s", gib_per_sec(image.size, t)),
                );
                seconds[i][index].push(t);
            }
        }
        for (index, method) in Method::LIMITS.iter().enumerate() {
            progress.message(
                Level::Info,
                &format!(
                    "round {}/{}: limit {}",
                    round + 1,
                    settings.rounds,
                    method.label()
                ),
            );
            let t = match method {
                Method::ReadOnly => measure_read(&dense.path, policy)?,
                Method::WriteOnly => measure_write(&out.join("write.out"), dense.size, policy)?,
                _ => measure_hash(dense.size),
            };
            progress.message(
                Level::Info,
                &format!("  {t:.2} s, {:.3} GiB/s", gib_per_sec(dense.size, t)),
            );
            limit_seconds[index].push(t);
        }
    }

    let mut measurements = Vec::new();
    for (i, image) in images.iter().enumerate() {
        for (index, method) in Method::ON_IMAGES.iter().enumerate() {
            let rounds = std::mem::take(&mut seconds[i][index]);
            measurements.push(summarise(&image.name, *method, image.size, rounds));
        }
    }
    for (index, method) in Method::LIMITS.iter().enumerate() {
        let rounds = std::mem::take(&mut limit_seconds[index]);
        measurements.push(summarise("dense", *method, dense.size, rounds));
    }

    let mut notes = vec![
        match policy {
            CachePolicy::Drop => "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every run".to_owned(),
            CachePolicy::Direct => "not root: the copier and the read pass use O_DIRECT; cp, sha256sum and qemu-img may read from the cache".to_owned(),
            _ => "warm caches: figures include the page cache".to_owned(),
        },
        "(c) and (d) end with `sync DST`, as the copier syncs its output; (c) hashes the copy as the reference site does".to_owned(),
        "sources and copies share the folder's filesystem".to_owned(),
    ];
    let peak_rss_kib = match &settings.exe {
        Some(exe) => match measure_peak_rss(exe, &dense.path, &out.join("rss.out")) {
            Ok(kib) => kib,
            Err(e) => {
                notes.push(format!("peak RSS not measured: {e}"));
                None
            }
        },
        None => {
            notes.push("peak RSS not measured: no vm-backup binary given".to_owned());
            None
        }
    };
    let sweep = if settings.sweep {
        run_sweep(dense, &out, policy, progress, cancel)?
    } else {
        Vec::new()
    };
    let _ = std::fs::remove_dir(&out);
    for backup in &backups {
        remove(&backup.path);
    }
    let _ = std::fs::remove_dir(&backups_dir);

    Ok(BenchReport {
        dir: work.path.clone(),
        cache: policy,
        rounds: settings.rounds,
        ratios: compute_ratios(&measurements),
        images,
        measurements,
        peak_rss_kib,
        copy_io_path,
        sweep_best: best_point(&sweep),
        sweep,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(image: &str, method: Method, gib: f64) -> Measurement {
        summarise(image, method, 1 << 30, vec![1.0 / gib])
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn throughput_in_gib_per_second() {
        assert_eq!(gib_per_sec(2 << 30, 2.0), 1.0);
        assert_eq!(gib_per_sec(1 << 30, 0.0), 0.0);
        let s = summarise("dense", Method::CopyBoth, 1 << 30, vec![4.0, 0.5, 1.0]);
        assert_eq!(s.median_seconds, 1.0);
        assert_eq!(s.gib_per_sec, 1.0);
    }

    #[test]
    fn ratios_per_image_and_against_the_limits() {
        let ms = vec![
            m("dense", Method::CopyBoth, 2.0),
            m("dense", Method::CpSha256sum, 0.5),
            m("dense", Method::QemuImg, 1.0),
            m("sparse", Method::CopyBoth, 8.0),
            m("sparse", Method::CpSha256sum, 2.0),
            m("dense", Method::ReadOnly, 3.0),
            m("dense", Method::WriteOnly, 2.5),
            m("dense", Method::Sha256Memory, 4.0),
        ];
        let ratios = compute_ratios(&ms);
        let get = |image: &str, name: &str| {
            ratios
                .iter()
                .find(|r| r.image == image && r.name == name)
                .map(|r| r.value)
        };
        assert!((get("dense", "a/c").unwrap() - 4.0).abs() < 1e-9);
        assert!((get("dense", "a/d").unwrap() - 2.0).abs() < 1e-9);
        assert!((get("sparse", "a/c").unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(get("sparse", "a/d"), None, "no (d) measured on sparse");
        assert!((get("dense", "a/min(read,write,hash)").unwrap() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn verify_and_restore_ratios() {
        let ms = vec![
            m("dense", Method::CopyBoth, 2.0),
            m("dense", Method::QemuImg, 4.0),
            m("dense", Method::Verify, 2.7),
            m("dense", Method::Sha256sumCopy, 0.9),
            m("dense", Method::Restore, 1.0),
            m("dense", Method::ReadOnly, 3.0),
            m("dense", Method::WriteOnly, 2.5),
            m("dense", Method::Sha256Memory, 4.0),
        ];
        let ratios = compute_ratios(&ms);
        let get = |name: &str| {
            ratios
                .iter()
                .find(|r| r.image == "dense" && r.name == name)
                .map(|r| r.value)
        };
        assert!((get("v/v2").unwrap() - 3.0).abs() < 1e-9);
        assert!((get("v/read").unwrap() - 0.9).abs() < 1e-9);
        assert!((get("r/d").unwrap() - 0.25).abs() < 1e-9);
        assert!((get("r/a").unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn ratios_skip_missing_limits() {
        let ms = vec![
            m("dense", Method::CopyBoth, 2.0),
            m("dense", Method::ReadOnly, 3.0),
        ];
        assert!(compute_ratios(&ms).is_empty());
    }

    #[test]
    fn best_sweep_point() {
        let p = |q, g| SweepPoint {
            queue_depth: q,
            buffer_size: 1 << 20,
            hash_workers: 1,
            gib_per_sec: g,
        };
        assert_eq!(
            best_point(&[p(4, 1.0), p(16, 1.5), p(64, 1.2)])
                .unwrap()
                .queue_depth,
            16
        );
        assert_eq!(best_point(&[]), None);
        assert_eq!(sweep_grid().len(), 18);
    }

    #[test]
    fn max_rss_from_time_output() {
        let text = "\tCommand being timed: \"x\"\n\tMaximum resident set size (kbytes): 20480\n\tAverage resident set size (kbytes): 0\n";
        assert_eq!(parse_max_rss_kib(text), Some(20480));
        assert_eq!(parse_max_rss_kib("nothing"), None);
    }

    #[test]
    fn a_quarter_of_the_extents_scattered_and_reproducible() {
        let chosen = allocated_extents(1024, 3);
        assert_eq!(chosen.len(), 256);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
        assert!(*chosen.last().unwrap() < 1024);
        assert!(chosen.first().unwrap() < &100 && chosen.last().unwrap() > &900);
        assert_eq!(chosen, allocated_extents(1024, 3));
        assert_eq!(allocated_extents(3, 1).len(), 1);
        assert_eq!(extent_size(16 << 30), 16 * MIB);
        assert_eq!(extent_size(8 * MIB), MIB);
        assert_eq!(extent_size(1 << 40), 64 * MIB);
    }

    #[test]
    fn random_data_is_reproducible_and_not_zero() {
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        SplitMix64::new(9).fill(&mut a);
        SplitMix64::new(9).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().filter(|&&x| x == 0).count() < 20);
    }

    #[test]
    fn sparse_image_is_a_quarter_allocated() {
        let dir = std::env::temp_dir().join(format!("vmb-bench-unit-{}", std::process::id()));
        let settings = BenchSettings {
            dense_size: MIB,
            sparse_size: 64 * MIB,
            ..BenchSettings::quick()
        };
        std::fs::create_dir_all(&dir).unwrap();
        let images = prepare_images(&dir, &settings, &NoProgress);
        let _ = std::fs::remove_dir_all(&dir);
        let images = images.unwrap();
        let sparse = &images[1];
        assert_eq!(sparse.size, 64 * MIB);
        // 16 of 64 one-MiB extents, plus a little filesystem metadata.
        assert!(
            sparse.allocated >= 16 * MIB && sparse.allocated < 18 * MIB,
            "{}",
            sparse.allocated
        );
        assert_eq!(images[0].size, MIB);
        assert!(images[2].path.extension().is_some_and(|e| e == "qcow2"));
    }

    #[test]
    fn table_names_every_measurement_and_ratio() {
        let measurements = vec![
            m("dense", Method::CopyBoth, 2.0),
            m("dense", Method::CpSha256sum, 0.5),
        ];
        let report = BenchReport {
            dir: PathBuf::from("/var/tmp/x"),
            cache: CachePolicy::Drop,
            rounds: 3,
            images: vec![],
            ratios: compute_ratios(&measurements),
            measurements,
            peak_rss_kib: Some(2048),
            copy_io_path: Some(IoPath::Uring),
            sweep: vec![],
            sweep_best: None,
            notes: vec!["n1".into()],
        };
        let table = report.render_table();
        for needle in [
            "(a) vm-backup copy, both hashes",
            "(c) cp --sparse=always + sha256sum",
            "a/c",
            "4.00x",
            "2.0 MiB",
            "dropped",
            "n1",
        ] {
            assert!(table.contains(needle), "{needle} missing in\n{table}");
        }
    }
}
