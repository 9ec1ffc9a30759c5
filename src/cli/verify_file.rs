//! `vm-backup verify-file`.

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup verify-file`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup verify-file`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let _ = args.common;
    common::not_yet("verify-file")
}
