//! Argument parsing and dispatch. One file per command; each turns its arguments into a call of
//! the library and its result into an exit code.

mod assets;
mod backup;
mod bacula_config;
mod bench;
mod bench_harness;
mod catalog;
mod check;
mod common;
mod copy;
mod files;
mod init;
mod key;
mod list;
mod mount;
mod offsite;
mod orphans;
mod prune;
mod report;
mod restore;
mod status;
mod test_restore;
mod verify;
mod verify_file;

use clap::{Parser, Subcommand};

/// Backup engine for KVM/libvirt virtual machines, driven by Bacula.
#[derive(Debug, Parser)]
#[command(name = "vm-backup", version, about, long_about = None)]
struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a folder a backup target (or adopt one written before); idempotent.
    Init(init::Args),
    /// Back up one VM to the target.
    Backup(backup::Args),
    /// Restore a VM from a backup.
    Restore(restore::Args),
    /// List backups.
    List(list::Args),
    /// Verify backups against their checksums and manifests.
    Verify(verify::Args),
    /// Remove old backups according to the retention in the inventory.
    Prune(prune::Args),
    /// Run the pre- or post-checks of a VM.
    Check(check::Args),
    /// Restore a backup under a temporary name, boot it, and record the verdict.
    TestRestore(test_restore::Args),
    /// Find (and with --cleanup repair) what interrupted backups left behind.
    Orphans(orphans::Args),
    /// Copy one file with the copy engine, hashing it on the way.
    Copy(copy::Args),
    /// Re-hash a file and compare it with a chunk manifest.
    VerifyFile(verify_file::Args),
    /// Measure throughput against baselines.
    Bench(bench::Args),
    /// Generate Bacula Director resources from the inventory.
    BaculaConfig(bacula_config::Args),
    /// Maintain the catalog on the share.
    Catalog(catalog::Args),
    /// Send a run summary.
    Report(report::Args),
    /// Mount a backup's filesystems read-only under a folder.
    Mount(mount::Args),
    /// Unmount what `mount` put under a folder.
    Umount(mount::UmountArgs),
    /// Browse and copy out files of a backup (ls, find, cat, extract).
    Files(files::Args),
    /// The verify-on-read server of a mount (started by `mount` and `files`).
    #[command(hide = true)]
    VerifiedServe(mount::ServeArgs),
    /// Every VM: last backup, verdicts, size, and what needs attention first.
    Status(status::Args),
    /// The off-site copy's key: create, fingerprint, paper export, import.
    Key(key::Args),
    /// The off-site copy on S3-compatible storage: push, list, verify, restore, prune.
    Offsite(offsite::Args),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets(assets::Args),
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    common::init_logging(cli.verbose);
    // Everything this program creates is private unless a mode says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let result = match cli.command {
        Command::Init(a) => init::run(a),
        Command::Backup(a) => backup::run(a),
        Command::Restore(a) => restore::run(a),
        Command::List(a) => list::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Check(a) => check::run(a),
        Command::TestRestore(a) => test_restore::run(a),
        Command::Orphans(a) => orphans::run(a),
        Command::Copy(a) => copy::run(a),
        Command::VerifyFile(a) => verify_file::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BaculaConfig(a) => bacula_config::run(a),
        Command::Catalog(a) => catalog::run(a),
        Command::Report(a) => report::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Umount(a) => mount::run_umount(a),
        Command::Files(a) => files::run(a),
        Command::VerifiedServe(a) => mount::run_serve(a),
        Command::Status(a) => status::run(a),
        Command::Key(a) => key::run(a),
        Command::Offsite(a) => offsite::run(a),
        Command::GenerateAssets(a) => assets::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vm-backup: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            eprintln!("  hint ({}): {}", e.kind(), e.guidance());
            2
        }
    }
}
