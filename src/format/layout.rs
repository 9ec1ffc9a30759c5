//! Where a backup lives on the target, per DESIGN.md:
//!
//! ```text
//! <target>/<hypervisor>/<vm>/<YYYY-MM-DD-HHMMSS>/          a whole backup
//! <target>/<hypervisor>/<vm>/<YYYY-MM-DD-HHMMSS>.partial/  one being written (or left by a crash)
//! ```
//!
//! Names that come from VMs or hosts are sanitised by [`safe_component`] so that no name can
//! escape its folder. A folder without `.partial` is always a whole backup: it is renamed from
//! `.partial` only once every file is complete, synced and checksummed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Local, NaiveDateTime, TimeZone};

/// The suffix of a backup folder still being written.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// The checksum file in every backup folder (`sha256sum -c` compatible, relative names).
pub const CHECKSUMS_FILE: &str = "checksums.sha256";
/// The metadata file in every backup folder.
pub const METADATA_FILE: &str = "backup-metadata.json";
/// The run's own log in every backup folder.
pub const LOG_FILE: &str = "backup.log";
/// The folder of appliance configurations inside a backup folder.
pub const CONFIGS_DIR: &str = "configs";
/// The folder of the catalog and run summaries under the target.
pub const METADATA_DIR: &str = "metadata";
/// The marker of an initialised target, in its root (`vm-backup init`).
pub const TARGET_MARKER: &str = ".vm-backup-target.json";
/// The lock file of one VM on the target, in its folder.
pub const VM_LOCK_FILE: &str = ".lock";
/// The format of backup stamps.
pub const STAMP_FORMAT: &str = "%Y-%m-%d-%H%M%S";

/// Errors about the layout on the target.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A name was empty once sanitised.
    #[error("name {0:?} is empty once unsafe characters are removed")]
    EmptyName(String),
    /// A name read from metadata is not one plain file name.
    #[error("{0:?} is not a plain file name (a path, `.`, `..` or a NUL inside)")]
    NotPlainName(String),
    /// A stamp did not parse.
    #[error("{0:?} is not a backup stamp (expected YYYY-MM-DD-HHMMSS)")]
    BadStamp(String),
    /// The folder of a backup already exists.
    #[error("backup folder {0} already exists")]
    Exists(PathBuf),
    /// An I/O error on the target.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The longest sanitised name kept before the digest suffix, in bytes.
const MAX_COMPONENT: usize = 200;

/// Turns a VM or host name into one safe path component, injectively.
///
/// Letters (any script), digits, `-`, `_`, `.`, `+` and `@` are kept; every other character
/// (slashes, spaces, control characters…) becomes `_`. Leading dots are replaced so that the
/// result is never `.`, `..` or a hidden file; the name is cut at 200 bytes. Whenever this
/// changed the name, `-` and the first 8 hex digits of the SHA-256 of the exact name are
/// appended (`web 01` → `web_01-<digest>`), so two different names never share a folder,
/// journal or lock; a name already safe is its own component (folders written before stay).
pub fn safe_component(name: &str) -> Result<String, LayoutError> {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let keep = c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@');
        out.push(if keep { c } else { '_' });
    }
    let trimmed = out.trim_start_matches('.');
    let mut out = if trimmed.len() != out.len() {
        format!("_{trimmed}")
    } else {
        out
    };
    while out.len() > MAX_COMPONENT {
        out.pop();
    }
    if out.is_empty() {
        return Err(LayoutError::EmptyName(name.to_string()));
    }
    if out != name {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        out.push('-');
        out.push_str(&hex::encode(&digest[..4]));
    }
    Ok(out)
}

/// Checks that a name read from metadata (a disk file, a stamp) is one plain file name: not
/// empty, no `/`, not `.` or `..`, no NUL. Call it before joining the name to any folder.
pub fn plain_file_name(name: &str) -> Result<&str, LayoutError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(LayoutError::NotPlainName(name.to_string()));
    }
    Ok(name)
}

/// Formats a backup stamp for a moment.
pub fn stamp_for(time: DateTime<Local>) -> String {
    time.format(STAMP_FORMAT).to_string()
}

/// Parses a backup stamp.
pub fn parse_stamp(stamp: &str) -> Result<DateTime<Local>, LayoutError> {
    let naive = NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT)
        .map_err(|_| LayoutError::BadStamp(stamp.to_string()))?;
    Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| LayoutError::BadStamp(stamp.to_string()))
}

/// The folder of all backups of one VM: `<target>/<host>/<vm>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    /// `<target>/<host>/<vm>`, both components sanitised.
    pub path: PathBuf,
}

impl VmDir {
    /// The folder for `vm` on `host` under `target`.
    pub fn new(target: &Path, host: &str, vm: &str) -> Result<Self, LayoutError> {
        Ok(Self {
            path: target.join(safe_component(host)?).join(safe_component(vm)?),
        })
    }

    /// The final folder of the backup with this stamp.
    pub fn backup_dir(&self, stamp: &str) -> PathBuf {
        self.path.join(stamp)
    }

    /// The `.partial` folder of the backup with this stamp.
    pub fn partial_dir(&self, stamp: &str) -> PathBuf {
        self.path.join(format!("{stamp}{PARTIAL_SUFFIX}"))
    }

    /// The stamps of the whole backups in this folder, oldest first. Missing folder: none.
    pub fn complete_stamps(&self) -> Result<Vec<String>, LayoutError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(_, partial)| !partial)
            .map(|(s, _)| s)
            .collect())
    }

    /// The `.partial` folders left in this folder (by a running or crashed backup).
    pub fn partial_dirs(&self) -> Result<Vec<PathBuf>, LayoutError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(_, partial)| *partial)
            .map(|(s, _)| self.partial_dir(&s))
            .collect())
    }

    /// The newest whole backup, if any.
    pub fn latest(&self) -> Result<Option<String>, LayoutError> {
        Ok(self.complete_stamps()?.pop())
    }

    /// (stamp, is_partial) for every folder whose name is a stamp, sorted by stamp.
    fn entries(&self) -> Result<Vec<(String, bool)>, LayoutError> {
        let read = match fs::read_dir(&self.path) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(LayoutError::Io {
                    context: "cannot list",
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in read.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let (stamp, partial) = match name.strip_suffix(PARTIAL_SUFFIX) {
                Some(stamp) => (stamp.to_string(), true),
                None => (name, false),
            };
            if parse_stamp(&stamp).is_ok() {
                out.push((stamp, partial));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Every VM folder under `<target>/<host>/` (sanitised names as found on disk).
pub fn vm_dirs(target: &Path, host: &str) -> Result<Vec<(String, VmDir)>, LayoutError> {
    let host_dir = target.join(safe_component(host)?);
    let read = match fs::read_dir(&host_dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LayoutError::Io {
                context: "cannot list",
                path: host_dir,
                source,
            })
        }
    };
    let mut out: Vec<(String, VmDir)> = read
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, VmDir { path: e.path() })
        })
        .filter(|(name, _)| name != METADATA_DIR)
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The file name of a disk image inside a backup: `<vm>-<target-dev>.<ext>`.
pub fn disk_file_name(vm: &str, target_dev: &str, format: &str) -> Result<String, LayoutError> {
    let ext = if format == "qcow2" { "qcow2" } else { "raw" };
    Ok(format!(
        "{}-{}.{ext}",
        safe_component(vm)?,
        safe_component(target_dev)?
    ))
}

/// The file name of the domain XML inside a backup: `<vm>.xml`.
pub fn xml_file_name(vm: &str) -> Result<String, LayoutError> {
    Ok(format!("{}.xml", safe_component(vm)?))
}

/// The file name of the UEFI NVRAM inside a backup: `<vm>-nvram.fd`.
pub fn nvram_file_name(vm: &str) -> Result<String, LayoutError> {
    Ok(format!("{}-nvram.fd", safe_component(vm)?))
}

/// The host name recorded in the layout: the kernel's node name.
pub fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

impl LayoutError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            LayoutError::EmptyName { .. } => ErrorKind::InvalidInput,
            LayoutError::BadStamp { .. } => ErrorKind::InvalidInput,
            LayoutError::NotPlainName { .. } => ErrorKind::InvalidInput,
            LayoutError::Exists { .. } => ErrorKind::Busy,
            LayoutError::Io { .. } => ErrorKind::TargetFailing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_inside_their_folder() {
        for (name, want) in [
            ("../x", "__x"),
            ("..", "_"),
            ("a/b", "a_b"),
            ("/etc/passwd", "_etc_passwd"),
            ("my vm", "my_vm"),
            ("Grüße VM", "Grüße_VM"),
            (".hidden", "_hidden"),
            ("tab\there", "tab_here"),
        ] {
            let got = safe_component(name).unwrap();
            assert!(got.starts_with(&format!("{want}-")), "for {name:?}: {got}");
            assert_eq!(got.len(), want.len() + 9, "for {name:?}: {got}");
            assert!(!got.contains('/') && got != "." && got != ".." && !got.starts_with('.'));
        }
        assert!(safe_component("").is_err());
    }

    #[test]
    fn safe_names_keep_their_folder() {
        for name in ["web-01.prod", "vm1", "Grüße", "a+b@c_d"] {
            assert_eq!(safe_component(name).unwrap(), name);
        }
    }

    #[test]
    fn different_names_never_share_a_component() {
        let names = [
            "web 01".to_string(),
            "web_01".to_string(),
            "web/01".to_string(),
            ".x".to_string(),
            "_x".to_string(),
            "a".repeat(300),
            format!("{}b", "a".repeat(300)),
            "a".repeat(200),
        ];
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            assert!(seen.insert(safe_component(n).unwrap()), "{n:?} collides");
        }
        assert_eq!(safe_component("web_01").unwrap(), "web_01");
        assert_ne!(safe_component("web 01").unwrap(), "web_01");
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let name = "é".repeat(300);
        let got = safe_component(&name).unwrap();
        assert!(got.len() <= 209);
        let (cut, digest) = got.rsplit_once('-').unwrap();
        assert!(cut.len() <= 200 && cut.chars().all(|c| c == 'é'));
        assert_eq!(digest.len(), 8);
    }

    #[test]
    fn plain_file_names_only() {
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a/b", "a\0b"] {
            assert!(plain_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["web-vda.qcow2", ".hidden", "a..b"] {
            assert_eq!(plain_file_name(good).unwrap(), good);
        }
    }

    #[test]
    fn stamps_round_trip_and_reject_garbage() {
        let t = parse_stamp("2026-11-21-120000").unwrap();
        assert_eq!(stamp_for(t), "2026-11-21-120000");
        assert!(parse_stamp("2026-11-21").is_err());
        assert!(parse_stamp("latest").is_err());
    }

    #[test]
    fn partial_folders_are_not_backups() {
        let dir = tempfile::tempdir().unwrap();
        let vm = VmDir::new(dir.path(), "hv1", "vm1").unwrap();
        for name in [
            "2026-11-14-120000",
            "2026-11-21-120000",
            "2026-11-22-120000.partial",
            "junk",
        ] {
            fs::create_dir_all(vm.path.join(name)).unwrap();
        }
        assert_eq!(
            vm.complete_stamps().unwrap(),
            vec!["2026-11-14-120000", "2026-11-21-120000"]
        );
        assert_eq!(vm.latest().unwrap().as_deref(), Some("2026-11-21-120000"));
        assert_eq!(
            vm.partial_dirs().unwrap(),
            vec![vm.path.join("2026-11-22-120000.partial")]
        );
    }
}
