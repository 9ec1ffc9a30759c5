//! `vm-backup orphans`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup orphans`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup orphans`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("orphans")
}
