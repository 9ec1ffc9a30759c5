//! `vm-backup backup`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup backup`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("backup")
}
