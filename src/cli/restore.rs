//! `vm-backup restore <vm> <stamp|latest> [--as NAME] [--disk-dir DIR] [--start | --instant]
//! [--force]`.

use std::path::PathBuf;

use vm_backup::config::Settings;
use vm_backup::engine::restore::{self, RestoreRequest, StampChoice};
use vm_backup::progress::{Level, Progress, Transfer};

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// The VM whose backup to restore.
    vm: String,
    /// The backup stamp (YYYY-MM-DD-HHMMSS), or `latest`.
    stamp: StampChoice,
    /// Restore as a new domain of this name beside the original (new UUID and MAC addresses).
    #[arg(long = "as", value_name = "NEW-NAME")]
    new_name: Option<String>,
    /// Put the disks, NVRAM and configs in this folder instead of their original place.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Start the domain once defined.
    #[arg(long)]
    start: bool,
    /// Restore a damaged backup, replace a defined (shut off) domain, overwrite files.
    /// A running domain is never replaced.
    #[arg(long)]
    force: bool,
    /// The hypervisor folder the backup is under (default: this host).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// The backup folder itself (instead of VM, stamp and host).
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<PathBuf>,
    /// Run the VM at once from the backup (local overlays over the read-only backup), then
    /// move its disks to local storage while it runs (block copy and pivot).
    #[arg(long, conflicts_with = "start")]
    instant: bool,
}

/// Plain progress lines on stderr (messages only; transfers every 10 %).
#[derive(Debug, Default)]
pub struct Lines {
    last: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Progress for Lines {
    fn transfer(&self, what: &str, t: Transfer) {
        if t.total == 0 {
            return;
        }
        let tenth = t.done * 10 / t.total;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(what) != Some(&tenth) {
            last.insert(what.to_string(), tenth);
            eprintln!(
                "  {what}: {}% ({})",
                tenth * 10,
                vm_backup::ops::notify::human_rate(t.bytes_per_sec)
            );
        }
    }
    fn message(&self, level: Level, text: &str) {
        let tag = match level {
            Level::Info => "",
            Level::Warning => "warning: ",
            Level::Error => "error: ",
        };
        eprintln!("{tag}{text}");
    }
}

/// `restore --instant`: run from the backup, move the disks while the domain runs.
fn run_instant(
    request: RestoreRequest,
    settings: &Settings,
    json: bool,
    cancel: &vm_backup::progress::CancelToken,
) -> Result<i32, vm_backup::Error> {
    use vm_backup::engine::restore::instant;
    let vm = request.vm.clone();
    let request = instant::InstantRequest {
        restore: request,
        journal_dir: settings.journal_dir.clone(),
        copy_bound: instant::DEFAULT_COPY_BOUND,
        helper: std::env::current_exe()
            .map_err(|e| vm_backup::Error::io("cannot find this program", e))?,
    };
    let outcome = instant::restore_instant(&request, &Lines::default(), cancel)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "restored {vm} ({}) from {} as domain {} (uuid {}): running after {:.1} s, disks moved \
         to local storage in {:.1} s",
        outcome.stamp,
        outcome.backup_dir.display(),
        outcome.domain,
        outcome.uuid,
        outcome.started_after_seconds,
        outcome.copy_seconds
    );
    for d in &outcome.disks {
        println!("  {}: {}", d.target, d.path.display());
    }
    if !outcome.verified {
        println!("  WARNING: the backup was read without the verify-on-read layer");
    }
    Ok(0)
}

/// Runs `vm-backup restore`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let mut request = RestoreRequest::new(
        &settings.target,
        args.host.unwrap_or_else(|| settings.host()),
        &args.vm,
        args.stamp,
    );
    request.backup_dir = args.backup_dir;
    request.new_name = args.new_name;
    request.disk_dir = args.disk_dir;
    request.start = args.start;
    request.force = args.force;
    request.libvirt_uri = settings.libvirt_uri.clone();
    let cancel = common::cancel_on_signals();
    if args.instant {
        return run_instant(request, &settings, args.common.json, &cancel);
    }
    let outcome = restore::restore(&request, &Lines::default(), &cancel)?;
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "restored {} ({}) from {} as domain {} (uuid {}){}",
        args.vm,
        outcome.stamp,
        outcome.backup_dir.display(),
        outcome.domain,
        outcome.uuid,
        if outcome.started { ", started" } else { "" }
    );
    for d in &outcome.disks {
        println!("  {}: {}", d.target, d.path.display());
        for b in &d.backing_chain {
            println!("    backing: {}", b.display());
        }
    }
    if let Some(n) = &outcome.nvram {
        println!("  nvram: {}", n.display());
    }
    if let Some(c) = &outcome.configs {
        println!("  configs: {}", c.display());
    }
    if !outcome.verify.ok {
        println!(
            "  WARNING: restored from a damaged backup (--force): {}",
            outcome.verify.summary()
        );
    }
    Ok(0)
}
