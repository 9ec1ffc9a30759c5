//! `vm-backup list`: the backups on the target, from the catalog (kept in line with the share).

use vm_backup::config::Settings;
use vm_backup::format::metadata::BackupMetadata;
use vm_backup::ops::notify::{human_bytes, human_rate, verdict_word};
use vm_backup::store::catalog::{BackupRow, Catalog};

use super::common::TargetArgs;

/// Arguments of `vm-backup list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Only this VM.
    vm: Option<String>,
}

/// Runs `vm-backup list`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let catalog = Catalog::open(&settings.target)?;
    catalog.sync()?;
    let rows = catalog.backups(args.vm.as_deref())?;
    if args.common.json {
        let rows: Vec<JsonRow<'_>> = rows
            .iter()
            .map(|row| JsonRow {
                row,
                chain: chain_of(&settings.target.join(&row.path)),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no backups under {}", settings.target.display());
        return Ok(0);
    }
    println!(
        "{:<12} {:<20} {:<18} {:<18} {:<32} {:<9} {:>10} {:>9} {:>12} {:>9} {:<9} {:<7} {:<12}",
        "HOST",
        "VM",
        "STAMP",
        "CHAIN",
        "LEVEL (PARENT)",
        "METHOD",
        "SIZE",
        "DURATION",
        "THROUGHPUT",
        "FROZEN",
        "RESULT",
        "VERIFY",
        "TEST-RESTORE"
    );
    for r in rows {
        let c = chain_of(&settings.target.join(&r.path));
        println!(
            "{:<12} {:<20} {:<18} {:<18} {:<32} {:<9} {:>10} {:>8.1}s {:>12} {:>9} {:<9} {:<7} {:<12}",
            r.host,
            r.vm,
            r.stamp,
            c.as_ref().map_or("-", |c| c.chain.as_str()),
            c.as_ref().map_or_else(|| "-".to_string(), ChainView::text),
            r.method,
            human_bytes(r.total_bytes),
            r.duration_seconds,
            human_rate(r.bytes_per_sec),
            r.frozen_ms
                .map_or("-".to_string(), |f| format!("{f:.0} ms")),
            r.result,
            verdict_word(r.verify.as_ref()),
            verdict_word(r.test_restore.as_ref()),
        );
    }
    Ok(0)
}

/// A catalog row with its place in a chain (`list --json`).
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    row: &'a BackupRow,
    /// `None` when the metadata cannot be read.
    chain: Option<ChainView>,
}

/// Where a backup sits in its chain, from its folder's metadata.
#[derive(serde::Serialize)]
struct ChainView {
    /// `full`, `incremental` or `differential`.
    level: String,
    /// The parent's stamp (incremental, differential).
    parent: Option<String>,
    /// The chain's id: the stamp of the full it stands on (its own for a full).
    chain: String,
    /// How many backups lie between it and the full (0 for a full).
    depth: usize,
    /// Disks copied in full inside an incremental, with why.
    full_disks: std::collections::BTreeMap<String, String>,
}

impl ChainView {
    /// `full`, or `└ incremental (<parent>)` indented by depth, with the disks copied whole.
    fn text(&self) -> String {
        let mut t = match &self.parent {
            Some(p) => format!("{}└ {} ({p})", "  ".repeat(self.depth - 1), self.level),
            None => self.level.clone(),
        };
        if !self.full_disks.is_empty() {
            let disks: Vec<&str> = self.full_disks.keys().map(String::as_str).collect();
            t.push_str(&format!(" +full {}", disks.join(",")));
        }
        t
    }
}

/// The chain of the backup in `dir`: its parents followed through their metadata.
fn chain_of(dir: &std::path::Path) -> Option<ChainView> {
    let m = BackupMetadata::read(dir).ok()?;
    let base = dir.parent()?;
    let mut chain = m.stamp.clone();
    let mut depth = 0;
    let mut next = m.chain.parent.clone();
    while let Some(p) = next.take() {
        depth += 1;
        chain = p.clone();
        if depth > 1000 {
            break;
        }
        next = BackupMetadata::read(&base.join(&p))
            .ok()
            .and_then(|pm| pm.chain.parent);
    }
    Some(ChainView {
        level: m.level().to_string(),
        parent: m.chain.parent.clone(),
        chain,
        depth,
        full_disks: m.chain.full_disks.clone(),
    })
}
