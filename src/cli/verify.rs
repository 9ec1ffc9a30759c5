//! `vm-backup verify <vm> <stamp|latest> | --all`: re-hash backups against their manifests,
//! record the verdicts, alert on faults. Exit 0 when everything passed, 1 on any fault.

use std::path::PathBuf;

use vm_backup::config::Settings;
use vm_backup::engine::restore::StampChoice;
use vm_backup::engine::verify::{self, VerifyOptions};
use vm_backup::format::layout::VmDir;
use vm_backup::ops::notify;
use vm_backup::store::{catalog, FolderStore, LockMode};

use super::common::{self, TargetArgs};
use super::restore::Lines;

/// Arguments of `vm-backup verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// The VM.
    #[arg(required_unless_present = "all")]
    vm: Option<String>,
    /// The backup stamp, or `latest`.
    #[arg(required_unless_present = "all")]
    stamp: Option<StampChoice>,
    /// Every backup under the target.
    #[arg(long, conflicts_with_all = ["vm", "stamp"])]
    all: bool,
    /// The hypervisor folder (default: this host).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Skip `qemu-img check` on qcow2 images.
    #[arg(long)]
    no_qemu_img: bool,
}

/// Runs `vm-backup verify`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let store = FolderStore::open(&settings.target)?;
    let dirs: Vec<PathBuf> = if args.all {
        catalog::backup_dirs(&settings.target)?
    } else {
        let vm = args.vm.clone().unwrap_or_default();
        let host = args.host.clone().unwrap_or_else(|| settings.host());
        let vm_dir = VmDir::new(&settings.target, &host, &vm)?;
        let stamp = match args.stamp.clone() {
            Some(StampChoice::Stamp(s)) => s,
            _ => vm_dir.latest()?.ok_or_else(|| {
                vm_backup::Error::Other(format!(
                    "no backup of {vm} under {}",
                    vm_dir.path.display()
                ))
            })?,
        };
        let dir = vm_dir.backup_dir(&stamp);
        if !dir.is_dir() {
            return Err(vm_backup::Error::Other(format!(
                "no backup {}",
                dir.display()
            )));
        }
        // A folder shared by colliding names (before they were made injective) may hold
        // another VM's backup: never verify it as this one's.
        if let Ok(meta) = vm_backup::format::metadata::BackupMetadata::read(&dir) {
            if meta.vm_name != vm {
                return Err(vm_backup::Error::Other(format!(
                    "{} is a backup of VM {:?}, not of {vm:?}",
                    dir.display(),
                    meta.vm_name
                )));
            }
        }
        vec![dir]
    };
    let options = VerifyOptions {
        qemu_img_check: !args.no_qemu_img,
        ..VerifyOptions::default()
    };
    let cancel = common::cancel_on_signals();
    let progress = Lines::default();
    let mut reports = Vec::new();
    let mut faults = 0;
    for dir in &dirs {
        // The VM's lock, shared: no backup or prune of that VM meanwhile.
        let _lock = match dir.parent() {
            Some(vm_dir) => match store.lock_dir(vm_dir, LockMode::Shared) {
                Ok(lock) => Some(lock),
                Err(e) if args.all && e.kind() == vm_backup::error::ErrorKind::Busy => {
                    eprintln!("vm-backup: skipping {}: {e}", dir.display());
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let report = verify::verify_chain(dir, &options, &progress, &cancel)?;
        if let Err(e) = verify::record_verdict(&settings.target, &report) {
            eprintln!("vm-backup: warning: {e}");
        }
        if !report.ok {
            faults += 1;
            notify::alert_check(
                &settings,
                "verify",
                &report.host,
                &report.vm,
                &report.stamp,
                &report.summary(),
            );
        }
        if !args.common.json {
            println!(
                "{} {}: {}",
                if report.ok { "OK    " } else { "FAILED" },
                dir.display(),
                report.summary()
            );
            for c in report.checks.iter().filter(|c| !c.ok) {
                println!("    {} [{}]: {}", c.file, c.check, c.detail);
            }
        }
        reports.push(report);
    }
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
    } else {
        println!("{} backup(s) verified, {faults} with faults", reports.len());
    }
    Ok(if faults > 0 { 1 } else { 0 })
}
