//! What every command shares: the target/config/json options, logging, progress rendering and
//! signal handling.

use std::path::PathBuf;

use vm_backup::config::Settings;
use vm_backup::progress::CancelToken;

/// Options of every command that touches backups.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// The backup target (overrides the configuration file).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// The configuration file.
    #[arg(long, value_name = "FILE", env = "VM_BACKUP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

impl TargetArgs {
    /// The settings of `--config` with `--target` applied ([`Settings::load_with_target`]).
    pub fn settings(&self) -> Result<Settings, vm_backup::config::ConfigError> {
        Settings::load_with_target(self.config.as_deref(), self.target.as_deref())
    }
}

/// Sends `tracing` output to stderr; `RUST_LOG` overrides the level.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // ureq logs request URLs at debug level, and Slack webhook URLs are secrets.
    let filter = match vm_backup::ops::notify::LOG_DIRECTIVE.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A cancel token set by SIGINT and SIGTERM, so that guards run before the process exits.
#[allow(dead_code)] // used by the commands that run long jobs
pub fn cancel_on_signals() -> CancelToken {
    let token = CancelToken::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, token.flag());
    }
    token
}

/// A [`vm_backup::progress::Progress`] sink for the terminal: log lines on stderr, transfer
/// progress at most every 2 s (or never, when `verbose` is false and only errors matter).
pub struct LineProgress {
    verbose: bool,
    last: std::sync::Mutex<std::time::Instant>,
}

impl LineProgress {
    /// A sink printing info lines when `verbose`, warnings and errors always.
    pub fn new(verbose: bool) -> Self {
        Self {
            verbose,
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl vm_backup::progress::Progress for LineProgress {
    fn transfer(&self, what: &str, t: vm_backup::progress::Transfer) {
        if !self.verbose {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.elapsed() < std::time::Duration::from_secs(2) && t.done < t.total {
            return;
        }
        *last = std::time::Instant::now();
        let pct = if t.total > 0 {
            t.done as f64 * 100.0 / t.total as f64
        } else {
            100.0
        };
        eprintln!(
            "{what}: {pct:.0}% ({} / {} MiB, {:.1} MiB/s)",
            t.done >> 20,
            t.total >> 20,
            t.bytes_per_sec / (1 << 20) as f64
        );
    }

    fn message(&self, level: vm_backup::progress::Level, text: &str) {
        use vm_backup::progress::Level;
        match level {
            Level::Info if self.verbose => eprintln!("{text}"),
            Level::Info => {}
            Level::Warning => eprintln!("warning: {text}"),
            Level::Error => eprintln!("error: {text}"),
        }
    }
}
