//! `vm-backup list`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup list`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("list")
}
