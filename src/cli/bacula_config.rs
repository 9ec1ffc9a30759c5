//! `vm-backup bacula-config`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup bacula-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup bacula-config`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("bacula-config")
}
