//! The `vm-backup` command line. All the work happens in the library; this only parses
//! arguments, sets up logging and turns results into exit codes.

fn main() {
    std::process::exit(vm_backup_cli::main());
}

#[path = "cli/mod.rs"]
mod vm_backup_cli;
