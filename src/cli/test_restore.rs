//! `vm-backup test-restore <vm> [stamp]`: restore under a temporary name without network,
//! boot, judge, record the verdict, remove everything. Exit 0 on pass, 1 on failure.

use std::path::PathBuf;
use std::time::Duration;

use vm_backup::config::Settings;
use vm_backup::engine::restore::test_restore::{self, TestRestoreRequest};
use vm_backup::engine::restore::StampChoice;
use vm_backup::ops::notify;

use super::common::{self, TargetArgs};
use super::restore::Lines;

/// Arguments of `vm-backup test-restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// The VM.
    vm: String,
    /// The backup stamp (default: the latest).
    stamp: Option<StampChoice>,
    /// The hypervisor folder (default: this host).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Where the temporary disks go (default: test_restore.dir, else <journal_dir>/test-restore).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Seconds an agent VM may take until its agent answers (default: test_restore.boot_timeout_seconds).
    #[arg(long, value_name = "SECONDS")]
    boot_timeout: Option<u64>,
    /// Seconds a VM without agent must keep running (default: test_restore.run_seconds).
    #[arg(long, value_name = "SECONDS")]
    run_seconds: Option<u64>,
}

/// Runs `vm-backup test-restore`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let work_dir = args
        .work_dir
        .or_else(|| settings.test_restore.dir.clone())
        .unwrap_or_else(|| settings.journal_dir.join("test-restore"));
    let request = TestRestoreRequest {
        target: settings.target.clone(),
        host: args.host.unwrap_or_else(|| settings.host()),
        vm: args.vm.clone(),
        stamp: args.stamp.unwrap_or(StampChoice::Latest),
        backup_dir: None,
        libvirt_uri: settings.libvirt_uri.clone(),
        work_dir,
        boot_timeout: Duration::from_secs(
            args.boot_timeout
                .unwrap_or(settings.test_restore.boot_timeout_seconds),
        ),
        run_time: Duration::from_secs(
            args.run_seconds
                .unwrap_or(settings.test_restore.run_seconds),
        ),
    };
    let cancel = common::cancel_on_signals();
    let outcome = test_restore::run(&request, &Lines::default(), &cancel)?;
    vm_backup::ops::status::refresh_page(&settings, &Lines::default());
    let ok = outcome.verdict.ok && outcome.cleaned_up;
    if !ok {
        let meta_host = request.host.clone();
        notify::alert_check(
            &settings,
            "test-restore",
            &meta_host,
            &args.vm,
            &outcome.stamp,
            &outcome.verdict.detail,
        );
    }
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).unwrap_or_default()
        );
    } else {
        println!(
            "test restore of {} {} as {}: {}: {}",
            args.vm,
            outcome.stamp,
            outcome.temp_name,
            if outcome.verdict.ok {
                "PASSED"
            } else {
                "FAILED"
            },
            outcome.verdict.detail
        );
        println!(
            "cleanup: {}",
            if outcome.cleaned_up {
                "domain, NVRAM and disks removed".to_string()
            } else {
                outcome.cleanup_problems.join("; ")
            }
        );
    }
    Ok(if ok { 0 } else { 1 })
}
