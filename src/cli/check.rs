//! `vm-backup check`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup check`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("check")
}
