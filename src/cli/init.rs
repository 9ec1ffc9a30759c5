//! `vm-backup init [--target DIR] [--group NAME]`: makes a folder a backup target (writes
//! `.vm-backup-target.json`), or adopts one written by an earlier version. Idempotent.

use vm_backup::config::Settings;
use vm_backup::store::FolderStore;

use super::common::TargetArgs;

/// Arguments of `vm-backup init`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Give this group read access (files 0640, folders 2750; default: `group` in the
    /// configuration file, else none: 0600/0700).
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
}

/// Runs `vm-backup init`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let group = args.group.or(settings.group.clone());
    let (store, marker) = FolderStore::init(&settings.target, group.as_deref())?;
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&marker).unwrap_or_default()
        );
    } else {
        println!(
            "{} is a vm-backup target (id {}, format {}, created {}{})",
            store.root().display(),
            marker.id,
            marker.format_version,
            marker.created_at,
            marker
                .group
                .as_deref()
                .map(|g| format!(", group {g}"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}
