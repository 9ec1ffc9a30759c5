//! `vm-backup catalog`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup catalog`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup catalog`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("catalog")
}
