//! `vm-backup offsite push | list | verify | restore | prune`: the off-site copy on
//! S3-compatible storage (docs/offsite.md).

use std::path::PathBuf;

use vm_backup::config::{Retention, Settings};
use vm_backup::engine::offsite::{self, PushOptions, Selection};
use vm_backup::engine::restore::StampChoice;
use vm_backup::store::offsite::{
    key, s3, LockSupport, OffsiteError, OffsiteStore, S3Client, S3Config,
};
use vm_backup::store::FolderStore;

use super::common::{self, LineProgress};
use super::key::KeyArgs;

/// Arguments of `vm-backup offsite`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

/// Where the off-site store is, and the key.
#[derive(Debug, Clone, clap::Args)]
struct StoreArgs {
    /// The S3-compatible server, `http(s)://host:port` (default: `[offsite] endpoint`).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The bucket (default: `[offsite] bucket`).
    #[arg(long, value_name = "NAME")]
    bucket: Option<String>,
    /// A folder inside the bucket (default: `[offsite] prefix`).
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
    #[command(flatten)]
    key: KeyArgs,
    /// The backup target (overrides the configuration file).
    #[arg(long, value_name = "DIR")]
    target: Option<PathBuf>,
    /// Upload or download threads (default: `[offsite] workers`, else 4).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
    /// Print progress and what is done.
    #[arg(long)]
    progress: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Copy published backups off-site (only what is not there yet).
    Push {
        #[command(flatten)]
        store: StoreArgs,
        /// The VM (its folder on the target).
        #[arg(required_unless_present = "all")]
        vm: Option<String>,
        /// Every VM of this host.
        #[arg(long, conflicts_with = "vm")]
        all: bool,
        /// Only the newest backup of each VM (and the parents it needs).
        #[arg(long)]
        latest: bool,
        /// The hypervisor folder (default: this host).
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// Lock what is uploaded with S3 Object Lock (COMPLIANCE) for N days (default:
        /// `[offsite] object_lock_days`); refused, exit 1, if the bucket cannot lock.
        #[arg(long, value_name = "N")]
        object_lock_days: Option<u32>,
    },
    /// List the backups off-site.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Download, decrypt and check chunks against their SHA-256.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// The VM (default: every backup).
        vm: Option<String>,
        /// The stamp (default: every backup of the VM).
        stamp: Option<String>,
        /// Check this share of the chunks, chosen at random (1 to 100).
        #[arg(long, value_name = "N%", default_value = "100")]
        sample: String,
        /// The hypervisor folder (default: this host).
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
    },
    /// Restore a VM from off-site, straight to disk images, and define it.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        /// The VM.
        vm: String,
        /// The stamp, or `latest`.
        stamp: StampChoice,
        /// Define the restored VM under this name.
        #[arg(long = "as", value_name = "NAME")]
        new_name: Option<String>,
        /// Put the disks here (else where they were).
        #[arg(long, value_name = "DIR")]
        disk_dir: Option<PathBuf>,
        /// Start the domain once defined.
        #[arg(long)]
        start: bool,
        /// The hypervisor folder (default: this host).
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
    },
    /// Apply the off-site retention, then delete chunks no backup references.
    Prune {
        #[command(flatten)]
        store: StoreArgs,
        /// Print what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Skip the garbage collection of chunks.
        #[arg(long)]
        no_gc: bool,
        /// Keep the newest N backups (overrides `[offsite.retention]`).
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
        /// Keep one backup per day for N days.
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        /// Keep one backup per ISO week for N weeks.
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        /// Keep one backup per month for N months.
        #[arg(long, value_name = "N")]
        keep_monthly: Option<u32>,
    },
}

impl StoreArgs {
    fn settings(&self) -> Result<Settings, vm_backup::Error> {
        Ok(Settings::load_with_target(
            self.key.config.as_deref(),
            self.target.as_deref(),
        )?)
    }

    fn workers(&self, settings: &Settings) -> usize {
        self.workers.or(settings.offsite.workers).unwrap_or(4)
    }

    /// Connects and opens the repository (creating its marker when `create`).
    fn open(&self, settings: &Settings, create: bool) -> Result<OffsiteStore, vm_backup::Error> {
        let client = self.client(settings)?;
        let (key_file, pass) = self.key.resolve(settings)?;
        let master = key::load(&key_file, pass.as_deref())?;
        Ok(OffsiteStore::open(client, &master, create)?)
    }

    /// The S3 client of the bucket and prefix (nothing sent yet).
    fn client(&self, settings: &Settings) -> Result<S3Client, vm_backup::Error> {
        let o = &settings.offsite;
        let need = |v: Option<String>, what: &str| {
            v.ok_or_else(|| {
                vm_backup::Error::Other(format!(
                    "no off-site {what}: give --{what} or {what} in the [offsite] section"
                ))
            })
        };
        let endpoint = need(self.endpoint.clone().or(o.endpoint.clone()), "endpoint")?;
        let bucket = need(self.bucket.clone().or(o.bucket.clone()), "bucket")?;
        let prefix = self.prefix.clone().or(o.prefix.clone()).unwrap_or_default();
        let mut cfg = S3Config::new(&endpoint, &bucket, &prefix);
        if let Some(r) = &o.region {
            cfg.region = r.clone();
        }
        cfg.credentials_file = o.credentials_file.clone();
        let creds = s3::credentials(&cfg, Some(&settings.target))?;
        Ok(S3Client::new(&cfg, creds)?)
    }
}

/// A bucket that cannot lock objects while Object Lock was asked for: refused before
/// anything was uploaded, exit 1 (like a failed pre-check).
fn refuse_no_lock(e: OffsiteError) -> Result<i32, vm_backup::Error> {
    let e = vm_backup::Error::from(e);
    eprintln!("vm-backup: error: {e}");
    eprintln!("  hint ({}): {}", e.kind(), e.guidance());
    Ok(1)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), vm_backup::Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| vm_backup::Error::Other(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Runs `vm-backup offsite`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let cancel = common::cancel_on_signals();
    match args.action {
        Action::Push {
            store: s,
            vm,
            all,
            latest,
            host,
            object_lock_days,
        } => {
            let settings = s.settings()?;
            let primary = FolderStore::open(&settings.target)?;
            let object_lock_days = object_lock_days.or(settings.offsite.object_lock_days);
            if object_lock_days.is_some() {
                // Before anything, even the repository marker, is uploaded.
                let client = s.client(&settings)?;
                if let LockSupport::Unavailable(detail) = client.object_lock_support()? {
                    return refuse_no_lock(OffsiteError::NoObjectLock {
                        location: client.location(),
                        detail,
                    });
                }
            }
            let store = s.open(&settings, true)?;
            let host = host.unwrap_or_else(|| settings.host());
            let selection = match (all, vm) {
                (true, _) | (false, None) => Selection::All,
                (false, Some(vm)) => Selection::Vms(vec![vm]),
            };
            let options = PushOptions {
                workers: s.workers(&settings),
                latest_only: latest,
                object_lock_days,
            };
            let progress = LineProgress::new(s.progress);
            let report = match offsite::push(
                &primary, &host, &selection, &store, &options, &progress, &cancel,
            ) {
                Ok(r) => r,
                // A bucket that cannot lock: refused before anything was uploaded (exit 1,
                // like a failed pre-check).
                Err(offsite::OffsiteRunError::Store(e @ OffsiteError::NoObjectLock { .. })) => {
                    return refuse_no_lock(e)
                }
                Err(e) => return Err(e.into()),
            };
            if s.json {
                print_json(&report)?;
            } else {
                for b in &report.backups {
                    match (&b.skipped, b.already) {
                        (Some(why), _) => println!("{}: skipped ({why})", b.backup),
                        (None, true) => println!("{}: already off-site", b.backup),
                        (None, false) => println!(
                            "{}: pushed: {} chunks, {} uploaded ({} → {} bytes), {} already there, {} zero, {:.1} s",
                            b.backup,
                            b.chunks,
                            b.uploaded_chunks,
                            b.uploaded_plain_bytes,
                            b.uploaded_stored_bytes,
                            b.present_chunks,
                            b.zero_chunks,
                            b.seconds
                        ),
                    }
                }
            }
            Ok(0)
        }
        Action::List { store: s } => {
            let settings = s.settings()?;
            let store = s.open(&settings, false)?;
            #[derive(serde::Serialize)]
            struct Row {
                host: String,
                vm: String,
                stamp: String,
                bytes: u64,
                files: usize,
                pushed_at: String,
            }
            let mut rows = Vec::new();
            for (host, vm, stamp) in store.backups()? {
                let m = store.get_manifest(&host, &vm, &stamp)?;
                rows.push(Row {
                    bytes: m.bytes(),
                    files: m.files.len(),
                    pushed_at: m.pushed_at.clone(),
                    host,
                    vm,
                    stamp,
                });
            }
            if s.json {
                print_json(&rows)?;
            } else {
                for r in &rows {
                    println!(
                        "{}/{}/{}  {} MiB in {} files  (pushed {})",
                        r.host,
                        r.vm,
                        r.stamp,
                        r.bytes >> 20,
                        r.files,
                        r.pushed_at
                    );
                }
            }
            Ok(0)
        }
        Action::Verify {
            store: s,
            vm,
            stamp,
            sample,
            host,
        } => {
            let settings = s.settings()?;
            let store = s.open(&settings, false)?;
            let pct: f64 = sample
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|p: &f64| *p > 0.0 && *p <= 100.0)
                .ok_or_else(|| {
                    vm_backup::Error::Other(format!("--sample {sample:?}: expected 1% to 100%"))
                })?;
            let which = match vm {
                None => Vec::new(),
                Some(vm) => {
                    let host = vm_backup::format::layout::safe_component(
                        &host.unwrap_or_else(|| settings.host()),
                    )?;
                    let vm = vm_backup::format::layout::safe_component(&vm)?;
                    store
                        .backups()?
                        .into_iter()
                        .filter(|(h, v, st)| {
                            *h == host && *v == vm && stamp.as_ref().is_none_or(|x| x == st)
                        })
                        .collect::<Vec<_>>()
                }
            };
            let progress = LineProgress::new(s.progress);
            let report = offsite::verify(
                &store,
                &which,
                pct,
                s.workers(&settings),
                &progress,
                &cancel,
            )?;
            if s.json {
                print_json(&report)?;
            } else {
                for f in &report.faults {
                    println!("FAULT {f}");
                }
                println!(
                    "{} backups, {} chunks ({} MiB) checked: {}",
                    report.backups.len(),
                    report.chunks_checked,
                    report.bytes_checked >> 20,
                    if report.ok() { "ok" } else { "FAULTS" }
                );
            }
            Ok(if report.ok() { 0 } else { 1 })
        }
        Action::Restore {
            store: s,
            vm,
            stamp,
            new_name,
            disk_dir,
            start,
            host,
        } => {
            let settings = s.settings()?;
            let store = s.open(&settings, false)?;
            let request = offsite::OffsiteRestoreRequest {
                host: host.unwrap_or_else(|| settings.host()),
                vm,
                stamp,
                new_name,
                disk_dir,
                start,
                libvirt_uri: settings.libvirt_uri.clone(),
                workers: s.workers(&settings),
            };
            let progress = LineProgress::new(s.progress);
            let outcome = offsite::restore(&store, &request, &progress, &cancel)?;
            if s.json {
                print_json(&outcome)?;
            } else {
                println!(
                    "restored {} from off-site backup {}: domain {} ({})",
                    request.vm, outcome.stamp, outcome.domain, outcome.uuid
                );
                for d in &outcome.disks {
                    println!("  {} -> {}", d.target, d.path.display());
                }
            }
            Ok(0)
        }
        Action::Prune {
            store: s,
            dry_run,
            no_gc,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
        } => {
            let settings = s.settings()?;
            let store = s.open(&settings, false)?;
            let mut retention: Retention = settings.offsite.retention.clone();
            if keep_last.is_some()
                || keep_daily.is_some()
                || keep_weekly.is_some()
                || keep_monthly.is_some()
            {
                retention = Retention {
                    keep_last,
                    keep_daily,
                    keep_weekly,
                    keep_monthly,
                    keep_yearly: None,
                };
            }
            if retention == Retention::default() {
                return Err(vm_backup::Error::Other(
                    "no off-site retention: set [offsite.retention] or give --keep-*; nothing would be kept".into(),
                ));
            }
            let progress = LineProgress::new(s.progress);
            let report = offsite::prune(
                &store,
                &offsite::PruneOptions {
                    retention,
                    dry_run,
                    no_gc,
                },
                &progress,
            )?;
            if s.json {
                print_json(&report)?;
            } else {
                for r in &report.removed {
                    println!("{} {r}", if dry_run { "would remove" } else { "removed" });
                }
                match &report.gc_skipped {
                    Some(why) => println!("garbage collection skipped: {why}"),
                    None if !dry_run && !no_gc => println!(
                        "garbage collection: {} chunks deleted, {} referenced",
                        report.chunks_deleted, report.chunks_referenced
                    ),
                    None => {}
                }
            }
            Ok(0)
        }
    }
}
