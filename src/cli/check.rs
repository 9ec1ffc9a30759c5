//! `vm-backup check`.

use vm_backup::engine::backup::{checks, BackupRequest};

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The domain to check.
    vm: String,
    /// Run the pre-checks of a backup (nothing is touched); exit 1 on failure.
    #[arg(long, conflicts_with = "post", required_unless_present = "post")]
    pre: bool,
    /// Check the newest backup of the VM and that the domain runs on its original images;
    /// exit 3 on a problem.
    #[arg(long)]
    post: bool,
    /// Method the pre-checks assume.
    #[arg(long, default_value = "auto")]
    method: vm_backup::format::metadata::Method,
    /// Pre-checks of an offline backup with --shutdown.
    #[arg(long)]
    shutdown: bool,
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup check`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings = super::backup::settings(&args.common)?;
    let mut request = BackupRequest::new(&args.vm, settings);
    request.method = args.method;
    request.shutdown = args.shutdown;
    if args.pre {
        match checks::run_pre_checks(&request) {
            Ok(pre) => {
                if args.common.json {
                    let v = serde_json::json!({"vm": args.vm, "ok": true, "pre": pre});
                    println!("{v:#}");
                } else {
                    println!(
                        "pre-checks of {:?} passed: domain {}, method {}{}, disks {:?}, {} skipped, {} MiB needed, {} MiB free",
                        args.vm,
                        pre.state,
                        pre.method,
                        pre.method_note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
                        pre.disk_targets,
                        pre.skipped.len(),
                        pre.needed_bytes >> 20,
                        pre.free_bytes >> 20
                    );
                }
                Ok(0)
            }
            Err(e) => {
                if args.common.json {
                    let v = serde_json::json!({"vm": args.vm, "ok": false, "error": e.to_string()});
                    println!("{v:#}");
                } else {
                    eprintln!("vm-backup: {e}");
                }
                Ok(e.status.code())
            }
        }
    } else {
        let cancel = common::cancel_on_signals();
        let progress = common::LineProgress::new(false);
        match checks::run_post_checks(&request, &progress, &cancel) {
            Ok((dir, problems)) => {
                if args.common.json {
                    // `problems`: the lines as printed; `faults`: file, kind and detail of each.
                    let v = serde_json::json!({"vm": args.vm, "ok": problems.is_empty(), "backup_dir": dir, "problems": problems.lines(), "faults": problems});
                    println!("{v:#}");
                } else if problems.is_empty() {
                    println!("post-checks of {:?} passed ({})", args.vm, dir.display());
                } else {
                    for p in &problems {
                        println!("problem: {p}");
                    }
                }
                Ok(if problems.is_empty() { 0 } else { 3 })
            }
            Err(e) => {
                if args.common.json {
                    let v = serde_json::json!({"vm": args.vm, "ok": false, "error": e.to_string()});
                    println!("{v:#}");
                } else {
                    eprintln!("vm-backup: {e}");
                }
                Ok(3)
            }
        }
    }
}
