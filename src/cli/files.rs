//! `vm-backup files <vm> <stamp|latest> [--disk DEV] ls|find|cat|extract PATH [DEST]`.

use std::path::PathBuf;

use vm_backup::engine::files::{Browse, Entry};

use super::mount::BackupArgs;

/// Arguments of `vm-backup files`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    backup: BackupArgs,
    #[command(subcommand)]
    action: Action,
}

/// What to do with the backup's files.
#[derive(Debug, clap::Subcommand)]
enum Action {
    /// List a folder (or show a file): type and mode, owner, size, modification time.
    Ls {
        /// Inside the filesystem, or starting with the volume name (`part1/etc`); `/` lists
        /// the volumes.
        #[arg(default_value = "/")]
        path: String,
    },
    /// List everything under a folder.
    Find {
        /// As for `ls`.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Write a file's content to standard output.
    Cat {
        /// As for `ls`.
        path: String,
    },
    /// Copy a file or folder out with owner, mode and times.
    Extract {
        /// As for `ls`.
        path: String,
        /// Where to (an existing folder: inside it, under the same name). Default: here.
        #[arg(default_value = ".")]
        dest: PathBuf,
    },
}

fn print_entry(e: &Entry, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let when = chrono::DateTime::from_timestamp(e.mtime, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    let link = e
        .target
        .as_ref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    println!(
        "{} {:>5} {:>5} {:>12} {} {}{}",
        e.mode_string(),
        e.uid,
        e.gid,
        e.size,
        when,
        e.path,
        link
    );
}

/// Runs `vm-backup files`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let req = args.backup.request()?;
    let json = args.backup.common.json;
    let browse = Browse::open(&req)?;
    // On standard error: standard output may be a file's bytes (`cat`).
    for w in &browse.state().warnings {
        eprintln!("warning: {w}");
    }
    match args.action {
        Action::Ls { path } => {
            let entries = browse.ls(&path)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries).unwrap_or_default()
                );
            } else {
                for e in &entries {
                    print_entry(e, false);
                }
            }
        }
        Action::Find { path } => {
            // One JSON object per line (streamed), so the first entry shows at once.
            browse.find(&path, &mut |e| print_entry(e, json))?;
        }
        Action::Cat { path } => {
            let mut out = std::io::stdout().lock();
            browse.cat(&path, &mut out)?;
        }
        Action::Extract { path, dest } => {
            let r = browse.extract(&path, &dest)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "extracted {path} to {}: {} file(s), {} folder(s), {} symlink(s), {} bytes, {} \
                     extended attribute(s)",
                    r.dest.display(),
                    r.files,
                    r.dirs,
                    r.symlinks,
                    r.bytes,
                    r.xattrs
                );
                for s in &r.skipped {
                    println!("  skipped: {s}");
                }
            }
        }
    }
    drop(browse);
    Ok(0)
}
