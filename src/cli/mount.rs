//! `vm-backup mount <vm> <stamp|latest> [--disk DEV] DIR`, `vm-backup umount DIR`, and the
//! hidden `vm-backup verified-serve SPEC` (the verify-on-read server a mount runs).

use std::path::PathBuf;

use vm_backup::engine::mount::{self, MountRequest};
use vm_backup::engine::restore::StampChoice;
use vm_backup::store::verified_read::{self, ServeSpec};

use super::common::TargetArgs;

/// Which backup and disk (shared by `mount` and `files`).
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: TargetArgs,
    /// The VM whose backup to open.
    pub vm: String,
    /// The backup stamp (YYYY-MM-DD-HHMMSS), or `latest`.
    pub stamp: StampChoice,
    /// The disk (`vda`); default: the first disk of the backup.
    #[arg(long, value_name = "DEV")]
    pub disk: Option<String>,
    /// The hypervisor folder the backup is under (default: this host).
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// The backup folder itself (instead of VM, stamp and host).
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
}

impl BackupArgs {
    /// The engine's request, with this program as the verify-on-read server.
    pub fn request(&self) -> Result<MountRequest, vm_backup::Error> {
        let settings = super::backup::settings(&self.common)?;
        let helper = std::env::current_exe()
            .map_err(|e| vm_backup::Error::io("cannot find this program", e))?;
        let mut req = MountRequest::new(
            &settings.target,
            self.host.clone().unwrap_or_else(|| settings.host()),
            &self.vm,
            self.stamp.clone(),
            &settings.journal_dir,
            helper,
        );
        req.backup.backup_dir = self.backup_dir.clone();
        req.disk = self.disk.clone();
        Ok(req)
    }
}

/// Arguments of `vm-backup mount`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    backup: BackupArgs,
    /// The (empty) folder to mount under: one folder per partition or logical volume, or the
    /// filesystem itself when the disk holds one.
    dir: PathBuf,
}

/// Runs `vm-backup mount`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let req = args.backup.request()?;
    let state = mount::mount(&req, &args.dir)?;
    if args.backup.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&state).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "mounted disk {} of {} {} read-only (every read checked against the chunk manifest):",
        state.disk, state.vm, state.stamp
    );
    for v in &state.volumes {
        println!(
            "  {} ({}) on {}",
            if v.name.is_empty() { "/" } else { &v.name },
            v.fstype,
            v.path.display()
        );
    }
    for (name, why) in &state.skipped {
        println!("  not mounted: {name}: {why}");
    }
    for w in &state.warnings {
        println!("  warning: {w}");
    }
    println!("unmount with: vm-backup umount {}", state.dir.display());
    Ok(0)
}

/// Arguments of `vm-backup umount`.
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    #[command(flatten)]
    common: TargetArgs,
    /// The folder given to `vm-backup mount`.
    dir: PathBuf,
}

/// Runs `vm-backup umount`.
pub fn run_umount(args: UmountArgs) -> Result<i32, vm_backup::Error> {
    let settings = super::backup::settings(&args.common)?;
    let done = mount::umount(&settings.journal_dir, &args.dir)?;
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&done).unwrap_or_default()
        );
    } else {
        println!("unmounted {}", args.dir.display());
    }
    Ok(0)
}

/// Arguments of the hidden `vm-backup verified-serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The server spec (JSON) written by the mount.
    spec: PathBuf,
}

/// Runs the verify-on-read server until its folder is unmounted; prints `ready` once mounted.
pub fn run_serve(args: ServeArgs) -> Result<i32, vm_backup::Error> {
    let text = std::fs::read(&args.spec)
        .map_err(|e| vm_backup::Error::io(format!("cannot read {}", args.spec.display()), e))?;
    let spec: ServeSpec = serde_json::from_slice(&text).map_err(|e| {
        vm_backup::Error::Other(format!("bad server spec {}: {e}", args.spec.display()))
    })?;
    verified_read::serve(&spec, || {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    })
    .map_err(|e| vm_backup::Error::Other(e.to_string()))?;
    Ok(0)
}
