//! `vm-backup bench`: the throughput harness (see [`super::bench_harness`]).

use std::path::PathBuf;

use super::bench_harness::{self as bench, BenchSettings, CachePolicy};
use vm_backup::progress::{Level, Progress, Transfer};

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Folder for the test images (kept and reused); default: a temporary folder on /var/tmp.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Size of the dense random image (default 4G; 256M with --quick).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Logical size of the sparse image, 25 % allocated (default 16G; 1G with --quick).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    sparse_size: Option<u64>,
    /// Rounds of every measurement; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Small images, for a demo or a test.
    #[arg(long)]
    quick: bool,
    /// Also vary queue depth, buffer size and hash workers, and print the best setting.
    #[arg(long)]
    sweep: bool,
    /// How the page cache is kept out of the figures.
    #[arg(long, value_enum, default_value = "auto")]
    cache: CacheArg,
}

/// `--cache` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CacheArg {
    /// Drop the caches when root, otherwise O_DIRECT reads.
    Auto,
    /// Drop the caches before every run (needs root).
    Drop,
    /// O_DIRECT reads.
    Direct,
    /// Leave the caches (warm figures, for quick checks only).
    Warm,
}

fn parse_size(text: &str) -> Result<u64, vm_backup::config::SizeError> {
    vm_backup::config::parse_size(text)
}

/// Progress lines on stderr (the table or JSON goes to stdout).
struct Lines;

impl Progress for Lines {
    fn transfer(&self, _what: &str, _transfer: Transfer) {}

    fn message(&self, level: Level, text: &str) {
        match level {
            Level::Info => eprintln!("bench: {text}"),
            _ => eprintln!("bench: {level:?}: {text}"),
        }
    }
}

/// Runs `vm-backup bench`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let mut settings = if args.quick {
        BenchSettings::quick()
    } else {
        BenchSettings::full()
    };
    settings.dir = args.dir;
    settings.dense_size = args.size.unwrap_or(settings.dense_size);
    settings.sparse_size = args.sparse_size.unwrap_or(settings.sparse_size);
    settings.rounds = args.rounds;
    settings.sweep = args.sweep;
    settings.cache = match args.cache {
        CacheArg::Auto => CachePolicy::Auto,
        CacheArg::Drop => CachePolicy::Drop,
        CacheArg::Direct => CachePolicy::Direct,
        CacheArg::Warm => CachePolicy::Warm,
    };
    settings.exe = std::env::current_exe().ok();

    let cancel = common::cancel_on_signals();
    let report = bench::run(&settings, &Lines, &cancel)
        .map_err(|e| vm_backup::Error::Other(e.to_string()))?;
    if args.common.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| vm_backup::Error::Other(format!("cannot render the report: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", report.render_table());
    }
    Ok(0)
}
