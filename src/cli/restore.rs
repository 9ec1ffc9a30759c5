//! `vm-backup restore`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup restore`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("restore")
}
