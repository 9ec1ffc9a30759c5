//! `vm-backup generate-assets --out DIR` (hidden): the man pages and shell completions of the
//! packages, generated from this very parser so they never drift from the program.
//!
//! Why a hidden subcommand rather than an `xtask` binary: the parser lives in the program
//! (`src/cli/`, not in the library), so only the program can describe itself without a second
//! copy of it; and the packaging script needs nothing but the release binary it just built.

use std::fs;
use std::path::PathBuf;

use clap::CommandFactory;

/// Arguments of `vm-backup generate-assets`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write `man/*.1` and `completions/{vm-backup.bash,_vm-backup}`.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> vm_backup::Error {
    move |source| vm_backup::Error::Io { context, source }
}

/// Writes `<name>.1` for `cmd` and, recursively, one page per visible subcommand (clap's
/// generated `help` subcommands are left out: `vm-backup help X` is `vm-backup-X(1)`).
fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
) -> Result<(), vm_backup::Error> {
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_string()))
        .render(&mut page)
        .and_then(|()| fs::write(&path, page))
        .map_err(io(format!("cannot write {}", path.display())))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

/// Runs `vm-backup generate-assets`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let man = args.out.join("man");
    let completions = args.out.join("completions");
    for dir in [&man, &completions] {
        fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    let mut cmd = super::Cli::command();
    cmd.build();
    // One page for the program and one per subcommand: vm-backup(1), vm-backup-backup(1)…
    write_pages(&cmd, "vm-backup", &man)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
        clap_complete::generate_to(shell, &mut cmd, "vm-backup", &completions).map_err(io(
            format!(
                "cannot write {shell} completions to {}",
                completions.display()
            ),
        ))?;
    }
    println!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(0)
}
