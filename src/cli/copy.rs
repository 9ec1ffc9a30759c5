//! `vm-backup copy`: the copy engine alone, on one file.

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use vm_backup::copier::{self, CopyOptions, HashMode, IoPath};
use vm_backup::progress::{Level, Progress, Transfer};

/// Arguments of `vm-backup copy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to copy.
    src: PathBuf,
    /// The destination file, or an existing folder (the source's name is kept).
    dst: PathBuf,
    /// I/O engine (`auto` picks io_uring when the kernel allows; VMB_IO=threads forces the
    /// thread pool).
    #[arg(long, value_enum, default_value = "auto")]
    io: IoArg,
    /// Buffers in flight.
    #[arg(long, default_value_t = copier::DEFAULT_QUEUE_DEPTH)]
    queue_depth: usize,
    /// Size of each buffer (e.g. 1M, 256k).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    buffer_size: u64,
    /// What to hash.
    #[arg(long, value_enum, default_value = "both")]
    hash: HashArg,
    /// Size of each hashed chunk in the manifest (a multiple of the buffer size).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    chunk_size: u64,
    /// Chunk-hashing threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    hash_workers: usize,
    /// Read the source with O_DIRECT (falls back, with a note, when refused).
    #[arg(long)]
    direct_read: bool,
    /// Write the destination with O_DIRECT (falls back, with a note, when refused).
    #[arg(long)]
    direct_write: bool,
    /// Leave allocated all-zero blocks as holes in the destination.
    #[arg(long)]
    zero_as_holes: bool,
    /// Read every written block back from the destination (O_DIRECT) and compare it with what
    /// was written (needs --direct-write; off with a note otherwise).
    #[arg(long)]
    read_back: bool,
    /// Bandwidth limit: read at most this many bytes per second from the source (e.g. 100M;
    /// holes are free). Default: no limit.
    #[arg(long, value_name = "RATE", value_parser = vm_backup::config::parse_rate)]
    max_rate: Option<u64>,
    /// Write the chunk manifest as JSON to this file.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--io` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum IoArg {
    Auto,
    Uring,
    Threads,
}

/// `--hash` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HashArg {
    Both,
    Chunks,
    File,
    None,
}

/// Parses sizes such as `4M`, `1MiB`, `64k`.
pub fn parse_size(text: &str) -> Result<u64, vm_backup::config::SizeError> {
    vm_backup::config::parse_size(text)
}

/// Renders progress as an indicatif bar on a terminal, and not at all otherwise.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar on stderr when it is a terminal (and `quiet` is false).
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self { bar }
    }

    /// Removes the bar.
    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn transfer(&self, what: &str, t: Transfer) {
        if let Some(b) = &self.bar {
            b.set_length(t.total);
            b.set_position(t.done);
            b.set_message(what.to_owned());
        }
    }

    fn message(&self, level: Level, text: &str) {
        if level >= Level::Warning {
            match &self.bar {
                Some(b) => b.println(text),
                None => eprintln!("{text}"),
            }
        }
    }
}

/// Runs `vm-backup copy`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let options = CopyOptions {
        io: match args.io {
            IoArg::Auto => IoPath::Auto,
            IoArg::Uring => IoPath::Uring,
            IoArg::Threads => IoPath::Threads,
        },
        queue_depth: args.queue_depth,
        buffer_size: usize::try_from(args.buffer_size)
            .map_err(|_| vm_backup::Error::Other("buffer size too large".into()))?,
        hash: match args.hash {
            HashArg::Both => HashMode::Both,
            HashArg::Chunks => HashMode::Chunks,
            HashArg::File => HashMode::File,
            HashArg::None => HashMode::None,
        },
        chunk_size: args.chunk_size,
        hash_workers: args.hash_workers,
        direct_read: args.direct_read,
        direct_write: args.direct_write,
        zero_as_holes: args.zero_as_holes,
        read_back: args.read_back,
        max_rate: args.max_rate,
    };
    if args.manifest.is_some() && matches!(options.hash, HashMode::File | HashMode::None) {
        return Err(vm_backup::Error::Other(
            "--manifest needs chunk hashing (--hash both or chunks)".into(),
        ));
    }
    let cancel = super::common::cancel_on_signals();
    let bar = Bar::new(args.json);
    let result = copier::copy_file(&args.src, &args.dst, &options, &bar, &cancel);
    bar.done();
    let report = result?;
    if let (Some(path), Some(manifest)) = (&args.manifest, &report.manifest) {
        copier::write_manifest(path, manifest)?;
    }
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| vm_backup::Error::Other(format!("cannot encode report: {e}")))?;
        println!("{text}");
    } else {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "copied {} -> {}",
            report.source.display(),
            report.destination.display()
        );
        println!(
            "  {:.1} MiB logical, {:.1} MiB read, {:.1} MiB written, {:.1} MiB of holes skipped, {} zero chunks",
            mib(report.logical_size),
            mib(report.bytes_read),
            mib(report.bytes_written),
            mib(report.holes_skipped),
            report.zero_chunks
        );
        println!(
            "  {:.2} s, {:.1} MiB/s, io {:?}, queue depth {}, buffer {} KiB",
            report.duration.as_secs_f64(),
            report.bytes_per_sec / (1u64 << 20) as f64,
            report.io_path,
            report.settings.queue_depth,
            report.settings.buffer_size >> 10
        );
        if let Some(sha) = &report.sha256 {
            println!("  sha256 {sha}");
        }
        if let Some(m) = &report.manifest {
            println!("  manifest root {} ({} chunks)", m.root, m.digests.len());
        }
        for note in &report.notes {
            println!("  note: {note}");
        }
    }
    Ok(0)
}
