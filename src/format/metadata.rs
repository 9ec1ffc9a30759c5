//! `backup-metadata.json`: the record every published backup carries. Restore, verify, the
//! catalog, the Bacula plugin and retention read it; only the backup workflow writes it (and
//! `verify` / `test-restore` add their verdicts). Documented with an example in
//! `docs/backup-metadata.md`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::copier::ChunkManifest;
use crate::format::layout::{self, LayoutError};
use crate::ExitStatus;

/// The schema version written by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// How consistency was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Pick per domain: quiesce (agent), snapshot (no agent), offline (shut off).
    #[default]
    Auto,
    /// Freeze through the guest agent, external disk-only snapshot, thaw: application-consistent.
    Quiesce,
    /// External disk-only snapshot without freeze: crash-consistent.
    Snapshot,
    /// Copy the images of a shut-off domain.
    Offline,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Method::Auto),
            "quiesce" => Ok(Method::Quiesce),
            "snapshot" => Ok(Method::Snapshot),
            "offline" => Ok(Method::Offline),
            other => Err(format!(
                "unknown method {other:?} (expected auto, quiesce, snapshot or offline)"
            )),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Auto => "auto",
            Method::Quiesce => "quiesce",
            Method::Snapshot => "snapshot",
            Method::Offline => "offline",
        })
    }
}

/// One disk that was copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The target device in the guest (`vda`).
    pub target: String,
    /// The image the domain uses (the base, not our overlay).
    pub source: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The file name inside the backup folder.
    pub file: String,
    /// Virtual size of the disk, bytes.
    pub virtual_size: u64,
    /// Allocated size on the source, bytes.
    pub allocated_size: u64,
    /// Size of the copied image file (logical), bytes.
    pub file_size: u64,
    /// Whole-file SHA-256 of the copy.
    pub sha256: String,
    /// Per-chunk digests of the copy.
    pub manifest: ChunkManifest,
    /// Seconds spent copying this disk.
    pub copy_seconds: f64,
    /// Logical bytes per second of the copy.
    pub bytes_per_sec: f64,
    /// The I/O engine that ran.
    pub io_path: String,
    /// The images below `source` (its backing file, that one's backing file, …, top to
    /// bottom), each copied unchanged as its own file. Empty when `source` has no backing
    /// file (and in metadata written before chains were copied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_chain: Vec<BackingRecord>,
    /// How the copy's header was pointed at its backing file inside the folder (absent when
    /// the image has no backing file, and in metadata written before copies were rewritten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_rewrite: Option<BackingRewrite>,
}

/// The backing file name of a copied qcow2 image, rewritten so that the backup's chain
/// stands on its own: the copy names its parent by the parent's file name in the same
/// folder. `sha256` and `manifest` of the record are those of the rewritten copy; the source's
/// own first-chunk digest and manifest root are kept here for comparison (the two manifests
/// differ only in chunk 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingRewrite {
    /// The name the source's header holds (absolute, or relative to the source's folder).
    pub original: String,
    /// The name the copy's header holds: a file of this folder.
    pub written: String,
    /// `copier` (rewritten on the way, no second pass) or `rebase` (`qemu-img rebase -u`
    /// after the copy, then hashed again: the new name did not fit in the header's room).
    pub how: String,
    /// SHA-256 of the source's first chunk, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_chunk0_sha256: Option<String>,
    /// The chunk-manifest root of the source image itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_root: Option<String>,
}

/// One copied image of a disk's backing chain. Since `backing_rewrite` exists, a qcow2 copy's
/// header names the next layer by its file name in the folder; in older metadata the copy is
/// byte for byte the original, its header naming its backing file by the original name
/// (`backing_named_as` of the next record). A restore puts the chain back and rebases each
/// layer onto the restored one below it either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackingRecord {
    /// 1 for the disk image's own backing file, 2 for the next one down, …
    pub depth: usize,
    /// The file name inside the backup folder (`<vm>-<target>.backing-<depth>.<ext>`).
    pub file: String,
    /// The image's absolute path on the host at backup time.
    pub source: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// How the image above (the disk image for depth 1) names this one in its header, as
    /// written there (may be relative to the image above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_named_as: Option<String>,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Allocated size on the source, bytes.
    pub allocated_size: u64,
    /// Size of the copied file (logical), bytes.
    pub file_size: u64,
    /// Whole-file SHA-256 of the copy (also in `checksums.sha256`).
    pub sha256: String,
    /// Per-chunk digests of the copy.
    pub manifest: ChunkManifest,
    /// Seconds spent copying this image.
    pub copy_seconds: f64,
    /// How this copy's header was pointed at the next layer in the folder (absent for the
    /// bottom layer, raw layers and metadata written before copies were rewritten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_rewrite: Option<BackingRewrite>,
}

/// A disk that was deliberately not copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedDisk {
    /// The target device (`hdc`).
    pub target: String,
    /// Why: cdrom, read-only, shareable, network…
    pub reason: String,
}

/// A verdict of `verify` or `test-restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// When it was reached (RFC 3339).
    pub at: String,
    /// Whether the check passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The whole `backup-metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupMetadata {
    /// [`SCHEMA_VERSION`] at the time of writing.
    pub schema_version: u32,
    /// vm-backup version that wrote it.
    pub tool_version: String,
    /// Domain name as libvirt knows it.
    pub vm_name: String,
    /// Domain UUID.
    pub vm_uuid: String,
    /// Hypervisor host name.
    pub host: String,
    /// Backup stamp (`YYYY-MM-DD-HHMMSS`), the folder name.
    pub stamp: String,
    /// Method asked for.
    pub method_requested: Method,
    /// Method used.
    pub method: Method,
    /// Why a weaker method was used, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_note: Option<String>,
    /// Start time (RFC 3339).
    pub started_at: String,
    /// End time (RFC 3339).
    pub finished_at: String,
    /// How long the guest filesystems were frozen, milliseconds (quiesce only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<f64>,
    /// Seconds spent in each phase (`checks`, `snapshot`, `copy`, `commit`, `publish`, `post-checks`).
    pub phases: BTreeMap<String, f64>,
    /// Disks copied.
    pub disks: Vec<DiskRecord>,
    /// Disks skipped, with reasons.
    pub skipped_disks: Vec<SkippedDisk>,
    /// Other files of the backup (XML, NVRAM, configs) relative to the folder.
    pub files: Vec<String>,
    /// Total bytes of disk images copied.
    pub total_bytes: u64,
    /// Whole-run throughput of the copy phase, bytes per second.
    pub bytes_per_sec: f64,
    /// Outcome.
    pub result: ExitStatus,
    /// Warnings raised (post-checks, appliance capture…).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Appliance type from the inventory (`asav`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance: Option<String>,
    /// The latest `verify` verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verdict>,
    /// The latest `test-restore` verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_restore: Option<Verdict>,
    /// Level, parent and checkpoint (flattened: `level`, `parent`, `checkpoint`,
    /// `level_note`; all absent in metadata written before levels, which means a full).
    #[serde(flatten, default)]
    pub chain: ChainInfo,
}

/// The level of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackupLevel {
    /// Every allocated block.
    #[default]
    Full,
    /// The blocks changed since the previous backup of the chain (its parent).
    Incremental,
    /// The blocks changed since the last full (its parent).
    Differential,
}

impl std::str::FromStr for BackupLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full" | "f" => Ok(BackupLevel::Full),
            "incremental" | "inc" | "i" => Ok(BackupLevel::Incremental),
            "differential" | "diff" | "d" => Ok(BackupLevel::Differential),
            other => Err(format!(
                "unknown level {other:?} (expected full, incremental or differential)"
            )),
        }
    }
}

impl std::fmt::Display for BackupLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupLevel::Full => "full",
            BackupLevel::Incremental => "incremental",
            BackupLevel::Differential => "differential",
        })
    }
}

/// Where a backup sits in a chain. An incremental or differential backup's disk files are
/// qcow2 images holding only the changed clusters, whose backing file is the parent's image
/// by relative path (`../<parent>/<file>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChainInfo {
    /// The level that ran (absent: full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<BackupLevel>,
    /// The level asked for, when it differs from the one that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_requested: Option<BackupLevel>,
    /// Why the level that ran differs from the one asked (or per-disk fallbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_note: Option<String>,
    /// The parent backup's stamp (a folder next to this one), for incremental and
    /// differential backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The libvirt checkpoint created with this backup (`vmb-<stamp>`): the next incremental
    /// reads the blocks changed since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Disks of an incremental or differential copied in full (their files have no backing
    /// file: the chain of that disk starts here), by target, with why (bitmap missing or
    /// inconsistent, disk added or resized). Empty for a full and when every disk is an
    /// increment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub full_disks: BTreeMap<String, String>,
}

impl ChainInfo {
    /// Whether disk `target` of this backup is an increment on its parent's image (false
    /// for a full and for a disk copied in full inside an incremental or differential).
    pub fn disk_has_parent(&self, target: &str) -> bool {
        self.parent.is_some() && !self.full_disks.contains_key(target)
    }
}

impl BackupMetadata {
    /// The level that ran (full for metadata written before levels).
    pub fn level(&self) -> BackupLevel {
        self.chain.level.unwrap_or_default()
    }
}

impl BackupMetadata {
    /// Reads `backup-metadata.json` from a backup folder.
    pub fn read(backup_dir: &Path) -> io::Result<Self> {
        let path = backup_dir.join(crate::format::layout::METADATA_FILE);
        // Never through a symlink planted at the name.
        let mut text = String::new();
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?
            .read_to_string(&mut text)?;
        let md: Self = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        md.check_names().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(md)
    }

    /// Checks every name that is joined to a folder later: the stamp parses, each disk and
    /// backing file is one plain file name, each other file is plain names joined by `/`.
    /// [`BackupMetadata::read`] refuses metadata that fails this.
    pub fn check_names(&self) -> Result<(), LayoutError> {
        layout::parse_stamp(&self.stamp)?;
        for disk in &self.disks {
            layout::plain_file_name(&disk.file)?;
            for b in &disk.backing_chain {
                layout::plain_file_name(&b.file)?;
            }
        }
        for file in &self.files {
            if file.is_empty() {
                return Err(LayoutError::NotPlainName(file.clone()));
            }
            for part in file.split('/') {
                layout::plain_file_name(part)
                    .map_err(|_| LayoutError::NotPlainName(file.clone()))?;
            }
        }
        Ok(())
    }

    /// The bytes of `backup-metadata.json` (pretty JSON), as the target stores them.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(file: &str, extra: &str) -> String {
        format!(
            r#"{{"schema_version": 1, "tool_version": "0", "vm_name": "web", "vm_uuid": "u",
                "host": "hv1", "stamp": "2026-11-21-120000", "method_requested": "auto",
                "method": "offline", "started_at": "t0", "finished_at": "t1", "phases": {{}},
                "disks": [{{"target": "vda", "source": "/s", "format": "raw", "file": {file:?},
                  "virtual_size": 0, "allocated_size": 0, "file_size": 0, "sha256": "",
                  "manifest": {{"chunk_size": 1048576, "file_size": 0, "digests": [], "zero_chunks": [], "root": ""}}, "copy_seconds": 0.0,
                  "bytes_per_sec": 0.0, "io_path": "x"}}],
                "skipped_disks": [], "files": [{extra:?}], "total_bytes": 0,
                "bytes_per_sec": 0.0, "result": "success"}}"#
        )
    }

    #[test]
    fn metadata_naming_a_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(layout::METADATA_FILE);
        fs::write(&path, md("web-vda.raw", "configs/running.cfg")).unwrap();
        let ok = BackupMetadata::read(dir.path()).unwrap();
        assert_eq!(ok.disks[0].file, "web-vda.raw");
        for (file, extra) in [
            ("../x", "web.xml"),
            ("/etc/passwd", "web.xml"),
            ("..", "web.xml"),
            ("web-vda.raw", "../../etc/shadow"),
            ("web-vda.raw", "/etc/shadow"),
        ] {
            fs::write(&path, md(file, extra)).unwrap();
            let err = BackupMetadata::read(dir.path()).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{file} {extra}: {err}"
            );
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        for l in [
            BackupLevel::Full,
            BackupLevel::Incremental,
            BackupLevel::Differential,
        ] {
            assert_eq!(l.to_string().parse::<BackupLevel>(), Ok(l));
        }
        assert_eq!("Incremental".parse(), Ok(BackupLevel::Incremental));
        assert!("weekly".parse::<BackupLevel>().is_err());
    }

    #[test]
    fn chain_fields_are_flat_and_optional() {
        let c = ChainInfo {
            level: Some(BackupLevel::Incremental),
            parent: Some("2026-01-01-000000".into()),
            checkpoint: Some("vmb-2026-01-02-000000".into()),
            ..ChainInfo::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["level"], "incremental");
        assert_eq!(v["parent"], "2026-01-01-000000");
        assert!(v.get("level_note").is_none());
        assert!(v.get("full_disks").is_none());
        assert!(c.disk_has_parent("vda"));
        let mut mixed = c.clone();
        mixed
            .full_disks
            .insert("vdb".into(), "disk vdb was added".into());
        assert!(!mixed.disk_has_parent("vdb") && mixed.disk_has_parent("vda"));
        let v = serde_json::to_value(&mixed).unwrap();
        assert_eq!(v["full_disks"]["vdb"], "disk vdb was added");
        let back: ChainInfo = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(back, ChainInfo::default());
    }
}
