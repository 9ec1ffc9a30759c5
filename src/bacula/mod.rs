//! The Bacula plugin: the plugin string and the per-job state behind the C ABI.
//!
//! The File Daemon shim (`c-shim/vm-backup-fd.c`) holds no logic: it forwards Bacula's events
//! to [`crate::ffi::job`], which drives one [`Job`] per Bacula job. A [`Job`] parses the plugin
//! string, runs the backup through the same engine entry point as `vm-backup backup`, presents
//! the result to Bacula as virtual files under `/@vm-backup/<vm>/<stamp>/`, and on restore turns
//! the files Bacula sends back into a restored VM.
//!
//! ## The plugin string
//!
//! ```text
//! vm-backup: vm=<name> [method=auto|quiesce|snapshot|offline] [target=<dir>] [mode=direct|stream] [config=<file>]
//! ```
//! Values are single words (no spaces). Unknown keys, repeated keys, empty values and bad
//! values are refused with a message naming the key; the job then fails. The string is part of
//! the FileSet and frozen at backup time: restore receives the same string.

use std::path::{Path, PathBuf};

use crate::format::metadata::Method;

pub mod director_config;
mod engine;
mod job;
pub mod options;
mod stream;

pub use job::{
    Content, CreateResult, FileKind, Job, JobInfo, MessageLevel, MessageSink, VirtualFile,
};

/// The plugin's name: the FileSet string starts with `vm-backup:` and the File Daemon loads
/// `vm-backup-fd.so`.
pub const PLUGIN_NAME: &str = "vm-backup";

/// The root of the virtual paths the plugin shows to Bacula.
pub const VIRTUAL_ROOT: &str = "/@vm-backup";

/// The keys the plugin string accepts.
pub const KEYS: [&str; 7] = [
    "vm",
    "method",
    "target",
    "mode",
    "config",
    "disk_parallel",
    "max_rate",
];

/// The date of this version of the plugin, shown by the File Daemon (`status client`) next to
/// the version; changed with the version.
pub const PLUGIN_DATE: &str = "2026-11-22";

/// The description of the plugin the File Daemon shows: what it is and its FileSet syntax.
pub fn plugin_description() -> String {
    let keys: Vec<String> = KEYS
        .iter()
        .map(|k| match *k {
            "vm" => "vm=<name>".to_string(),
            other => format!("{other}="),
        })
        .collect();
    format!(
        "{PLUGIN_NAME}: KVM/libvirt virtual machine backups ({})",
        keys.join(" ")
    )
}

/// The plugin string without its `vm-backup:` prefix (leading blanks allowed), or `None` when
/// the string is not addressed to this plugin.
fn our_arguments(cmd: &str) -> Option<&str> {
    cmd.trim_start()
        .strip_prefix(PLUGIN_NAME)
        .and_then(|rest| rest.strip_prefix(':'))
}

/// Whether a plugin string is addressed to this plugin (starts with `vm-backup:`).
pub fn is_our_command(cmd: &str) -> bool {
    our_arguments(cmd).is_some()
}

/// Whether `path` is one of the virtual files the plugin shows to Bacula (under
/// [`VIRTUAL_ROOT`]).
pub fn is_virtual_path(path: &str) -> bool {
    path.strip_prefix(VIRTUAL_ROOT)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Errors of the plugin. Their text is worded for the job log; the C ABI prefixes it with the
/// plugin's name and the shim sends it as a fatal job message.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin string does not start with `vm-backup:`.
    #[error("plugin string {0:?} does not start with \"vm-backup:\"")]
    NotOurs(String),
    /// A word of the plugin string is not `key=value`.
    #[error("plugin string: {0:?} is not key=value")]
    NotKeyValue(String),
    /// A key is not one of [`KEYS`].
    #[error("plugin string: unknown key {0:?} (known keys: vm, method, target, mode, config)")]
    UnknownKey(String),
    /// A key was given twice.
    #[error("plugin string: key {0:?} given twice")]
    Repeated(String),
    /// A key has a bad value.
    #[error("plugin string: {key}={value:?}: {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// `vm=` is missing.
    #[error("plugin string: vm=<name> is required")]
    MissingVm,
    /// A file Bacula named is not one of ours.
    #[error("{0:?} is not a vm-backup virtual file (expected /@vm-backup/<vm>/<stamp>/<file>)")]
    BadVirtualPath(String),
    /// The configuration file or the inventory cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A name cannot be used in the layout of the target.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// The target refused a write, a rename or a delete (stream-mode restore staging).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The engine's backup did not complete (exit 1 or 2).
    #[error("backup of {vm} {status} (exit {code}): {source}{releasing}",
        code = status.code(),
        releasing = while_releasing(release_problems))]
    Backup {
        /// The domain.
        vm: String,
        /// The backup's exit status.
        status: crate::ExitStatus,
        /// What failed: the VM, the phase and the cause (shared with the engine's outcome).
        #[source]
        source: std::sync::Arc<crate::engine::backup::BackupError>,
        /// What could not be released after the failure.
        release_problems: Vec<String>,
    },
    /// The engine's restore failed.
    #[error("restore of {vm} failed: {source}")]
    Restore {
        /// The domain.
        vm: String,
        /// The cause.
        #[source]
        source: Box<crate::engine::restore::RestoreError>,
    },
    /// A backup rebuilt from Bacula's data failed its checks before publication (removed).
    #[error("the backup rebuilt in {dir} failed its checks and was removed, nothing restored: {problems}")]
    StagedRefused {
        /// The staging folder.
        dir: std::path::PathBuf,
        /// The problems found.
        problems: crate::engine::backup::Problems,
    },
    /// The metadata of a backup does not parse.
    #[error("{path}: bad metadata: {source}")]
    BadMetadata {
        /// The file (virtual path or path on disk).
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The metadata of a backup cannot be written as JSON.
    #[error("cannot write the backup metadata of {vm}: {source}")]
    WriteMetadata {
        /// The domain.
        vm: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Stream mode cannot send a disk that has a backing file.
    #[error("mode=stream does not send backing files yet: disk {disk} has backing file {}; use mode=direct", backing.display())]
    StreamBackingFile {
        /// The disk's target name (`vda`).
        disk: String,
        /// Its first backing file.
        backing: PathBuf,
    },
    /// A metadata or checksums file sent back by Bacula is larger than the plugin accepts.
    #[error("{path}: metadata file too large (more than {limit} bytes)")]
    TooLarge {
        /// The virtual path.
        path: String,
        /// The largest size accepted.
        limit: usize,
    },
    /// The backup folder a restore would rebuild exists already.
    #[error("{} already exists; remove it or restore with another where=", .0.display())]
    AlreadyExists(PathBuf),
    /// The engine's worker thread panicked.
    #[error("internal error: the engine thread panicked")]
    WorkerPanicked,
    /// The job was canceled.
    #[error("canceled")]
    Canceled,
    /// A line of the filled restore options that is not one of the plugin's options.
    #[error("plugin restore options: {0:?} is not files=… or disk=…")]
    BadRestoreOption(String),
    /// The Director sent the filled restore options without their text: Bacula 9.6 with a
    /// SQLite catalog cannot decode a stored object of 3k+1 bytes (`base64_to_bin` finds its
    /// buffer one byte short) and sends the bytes of an earlier message instead.
    #[error("the Director sent the plugin restore options ({0} bytes) without their text (Bacula 9.6 with a SQLite catalog loses objects of 3k+1 bytes): add a comma at the end of files= (files=/etc/hostname, is read as files=/etc/hostname), which changes the length by one, and run the restore again")]
    RestoreOptionsLost(usize),
    /// A file restore (restore option `files=`) needs `where` to name a folder.
    #[error("plugin restore option files= needs where= set to a folder on the File Daemon's host (the guest files go there)")]
    FileRestoreNeedsWhere,
    /// A guest path of restore option `files=` could not be extracted.
    #[error("cannot restore guest path {path}: {source}")]
    FileRestore {
        /// The guest path as given.
        path: String,
        /// Why.
        #[source]
        source: Box<crate::engine::mount::MountError>,
    },
    /// An event arrived out of order, or a state that cannot happen did.
    #[error("{0}")]
    Protocol(&'static str),
    /// An I/O error with its context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The end of a failed backup's message: what could not be released, if anything.
fn while_releasing(problems: &[String]) -> String {
    if problems.is_empty() {
        String::new()
    } else {
        format!(" (and while releasing: {})", problems.join("; "))
    }
}

impl PluginError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PluginError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where the bulk data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The engine writes the backup to the target; Bacula gets the metadata and checksums.
    #[default]
    Direct,
    /// The disk images, domain XML and NVRAM flow through Bacula to its Storage Daemon.
    Stream,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Stream => "stream",
        })
    }
}

/// The parsed plugin string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginArgs {
    /// The domain to back up.
    pub vm: String,
    /// The consistency method; unset: the inventory's, else `auto` (as `vm-backup backup`).
    pub method: Option<Method>,
    /// The target, overriding the configuration file.
    pub target: Option<PathBuf>,
    /// Direct (default) or stream.
    pub mode: Mode,
    /// The configuration file (default `/etc/vm-backup/vm-backup.conf` when present).
    pub config: Option<PathBuf>,
    /// Disks copied at once in direct mode, overriding `[copy] disk_parallel`.
    pub disk_parallel: Option<usize>,
    /// Bandwidth limit of a direct-mode copy, bytes per second, overriding `[copy] max_rate`.
    pub max_rate: Option<u64>,
}

impl PluginArgs {
    /// Parses a FileSet plugin string.
    pub fn parse(cmd: &str) -> Result<Self, PluginError> {
        let rest = our_arguments(cmd).ok_or_else(|| PluginError::NotOurs(cmd.to_string()))?;
        let mut vm = None;
        let mut method = None;
        let mut target = None;
        let mut mode = None;
        let mut config = None;
        let mut disk_parallel = None;
        let mut max_rate = None;
        for word in rest.split_whitespace() {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| PluginError::NotKeyValue(word.to_string()))?;
            let key: &'static str = KEYS
                .iter()
                .find(|k| **k == key)
                .ok_or_else(|| PluginError::UnknownKey(key.to_string()))?;
            if value.is_empty() {
                return Err(bad(key, value, "empty value"));
            }
            let fresh = match key {
                "vm" => vm.replace(parse_vm(value)?).is_none(),
                "method" => method
                    .replace(
                        value
                            .parse::<Method>()
                            .map_err(|why| bad(key, value, &why))?,
                    )
                    .is_none(),
                "target" => target.replace(absolute(key, value)?).is_none(),
                "mode" => mode.replace(parse_mode(value)?).is_none(),
                "disk_parallel" => disk_parallel.replace(parse_disk_parallel(value)?).is_none(),
                "max_rate" => max_rate
                    .replace(
                        crate::config::parse_rate(value)
                            .map_err(|e| bad(key, value, &e.to_string()))?,
                    )
                    .is_none(),
                _ => config.replace(absolute(key, value)?).is_none(),
            };
            if !fresh {
                return Err(PluginError::Repeated(key.to_string()));
            }
        }
        Ok(Self {
            vm: vm.ok_or(PluginError::MissingVm)?,
            method,
            target,
            mode: mode.unwrap_or_default(),
            config,
            disk_parallel,
            max_rate,
        })
    }
}

fn parse_disk_parallel(value: &str) -> Result<usize, PluginError> {
    let max = crate::config::MAX_DISK_PARALLEL;
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            "disk_parallel",
            value,
            &format!("a number of disks from 1 to {max}"),
        )),
    }
}

fn bad(key: &'static str, value: &str, why: &str) -> PluginError {
    PluginError::BadValue {
        key,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn parse_vm(value: &str) -> Result<String, PluginError> {
    if value.contains('/') || value.chars().any(char::is_control) {
        return Err(bad(
            "vm",
            value,
            "a domain name has no '/' or control characters",
        ));
    }
    Ok(value.to_string())
}

fn parse_mode(value: &str) -> Result<Mode, PluginError> {
    match value {
        "direct" => Ok(Mode::Direct),
        "stream" => Ok(Mode::Stream),
        _ => Err(bad("mode", value, "expected direct or stream")),
    }
}

fn absolute(key: &'static str, value: &str) -> Result<PathBuf, PluginError> {
    let path = PathBuf::from(value);
    if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
        return Err(bad(key, value, "must be an absolute path without '..'"));
    }
    Ok(path)
}

/// A virtual path `/@vm-backup/<vm>/<stamp>/<file>` taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualPath {
    /// The VM folder name (sanitised VM name).
    pub vm: String,
    /// The backup stamp.
    pub stamp: String,
    /// The file name inside the backup folder (no `/`).
    pub file: String,
}

impl VirtualPath {
    /// The virtual path of `file` in the backup `stamp` of `vm`.
    pub fn new(vm: &str, stamp: &str, file: &str) -> Self {
        Self {
            vm: vm.to_string(),
            stamp: stamp.to_string(),
            file: file.to_string(),
        }
    }

    /// The path as Bacula catalogs it.
    pub fn to_path(&self) -> String {
        format!("{VIRTUAL_ROOT}/{}/{}/{}", self.vm, self.stamp, self.file)
    }

    /// The virtual folder of the backup (`/@vm-backup/<vm>/<stamp>/`, trailing slash as
    /// Bacula writes directories).
    pub fn dir_path(vm: &str, stamp: &str) -> String {
        format!("{VIRTUAL_ROOT}/{vm}/{stamp}/")
    }

    /// Parses a restored file name: `ofname` as the File Daemon gives it, which is `where`
    /// followed by the cataloged path. Directories (trailing `/`) give `Ok(None)`.
    pub fn parse_restored(ofname: &str, where_: &str) -> Result<Option<Self>, PluginError> {
        let where_ = where_.trim_end_matches('/');
        let rest = ofname.strip_prefix(where_).unwrap_or(ofname);
        let rel = rest
            .strip_prefix(VIRTUAL_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| PluginError::BadVirtualPath(ofname.to_string()))?;
        let parts: Vec<&str> = rel.split('/').collect();
        let ok_part = |p: &str| !p.is_empty() && p != "." && p != "..";
        match parts.as_slice() {
            [vm] | [vm, ""] if ok_part(vm) => Ok(None),
            [vm, stamp] | [vm, stamp, ""] if ok_part(vm) && ok_part(stamp) => Ok(None),
            [vm, stamp, file] if ok_part(vm) && ok_part(stamp) && ok_part(file) => {
                crate::format::layout::parse_stamp(stamp)
                    .map_err(|_| PluginError::BadVirtualPath(ofname.to_string()))?;
                Ok(Some(Self::new(vm, stamp, file)))
            }
            _ => Err(PluginError::BadVirtualPath(ofname.to_string())),
        }
    }
}

/// The effective site settings of a job: the configuration file named by `config=` (or the
/// default one), with `target=`, `disk_parallel=` and `max_rate=` applied.
pub fn settings_for(args: &PluginArgs) -> Result<crate::config::Settings, PluginError> {
    let mut settings =
        crate::config::Settings::load_with_target(args.config.as_deref(), args.target.as_deref())?;
    if let Some(n) = args.disk_parallel {
        settings.copy.disk_parallel = n;
    }
    if let Some(rate) = args.max_rate {
        settings.copy.max_rate = Some(rate);
    }
    Ok(settings)
}

/// The name under which a VM restored with a non-empty `where` is defined.
pub fn restored_name(vm: &str) -> String {
    format!("{vm}-restored")
}

/// Whether a `where` value means "restore to the original place".
pub fn is_original_place(where_: &str) -> bool {
    let trimmed = where_.trim();
    trimmed.is_empty() || trimmed == "/"
}

/// `where` as a folder, when it names one.
pub fn where_dir(where_: &str) -> Option<&Path> {
    (!is_original_place(where_)).then(|| Path::new(where_.trim()))
}

impl PluginError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            PluginError::NotOurs { .. } => ErrorKind::InvalidInput,
            PluginError::NotKeyValue { .. } => ErrorKind::InvalidInput,
            PluginError::UnknownKey { .. } => ErrorKind::InvalidInput,
            PluginError::Repeated { .. } => ErrorKind::InvalidInput,
            PluginError::BadValue { .. } => ErrorKind::InvalidInput,
            PluginError::MissingVm => ErrorKind::InvalidInput,
            PluginError::BadVirtualPath { .. } => ErrorKind::InvalidInput,
            PluginError::Config(e) => e.kind(),
            PluginError::Layout(e) => e.kind(),
            PluginError::Store(e) => e.kind(),
            PluginError::Backup { source, .. } => source.kind(),
            PluginError::Restore { source, .. } => source.kind(),
            PluginError::BadMetadata { .. } => ErrorKind::Corrupt,
            PluginError::StagedRefused { .. } => ErrorKind::Corrupt,
            PluginError::WriteMetadata { .. } => ErrorKind::Internal,
            PluginError::StreamBackingFile { .. } => ErrorKind::InvalidInput,
            PluginError::TooLarge { .. } => ErrorKind::Corrupt,
            PluginError::AlreadyExists(_) => ErrorKind::Busy,
            PluginError::WorkerPanicked => ErrorKind::Internal,
            PluginError::Canceled => ErrorKind::Cancelled,
            PluginError::BadRestoreOption(_) => ErrorKind::InvalidInput,
            PluginError::FileRestoreNeedsWhere => ErrorKind::InvalidInput,
            PluginError::RestoreOptionsLost(_) => ErrorKind::InvalidInput,
            PluginError::FileRestore { source, .. } => source.kind(),
            PluginError::Protocol { .. } => ErrorKind::Internal,
            PluginError::Io { source, .. } => ErrorKind::from_io(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_string_takes_defaults() {
        let a = PluginArgs::parse("vm-backup: vm=web01").unwrap();
        assert_eq!(a.vm, "web01");
        assert_eq!(a.method, None);
        assert_eq!(a.mode, Mode::Direct);
        assert_eq!(a.target, None);
        assert_eq!(a.config, None);
        assert_eq!(a.disk_parallel, None);
        assert_eq!(a.max_rate, None);
    }

    #[test]
    fn every_key_parses() {
        let a = PluginArgs::parse(
            "vm-backup: vm=asa1 method=snapshot target=/mnt/backup mode=stream config=/etc/vb.conf disk_parallel=3 max_rate=200M/s",
        )
        .unwrap();
        assert_eq!(a.disk_parallel, Some(3));
        assert_eq!(a.max_rate, Some(200 << 20));
        assert_eq!(a.method, Some(Method::Snapshot));
        assert_eq!(a.mode, Mode::Stream);
        assert_eq!(a.target.as_deref(), Some(Path::new("/mnt/backup")));
        assert_eq!(a.config.as_deref(), Some(Path::new("/etc/vb.conf")));
        // no space after the colon, extra spaces between words
        let b = PluginArgs::parse("vm-backup:vm=x   method=offline").unwrap();
        assert_eq!((b.vm.as_str(), b.method), ("x", Some(Method::Offline)));
    }

    #[test]
    fn errors_name_the_key_and_why() {
        let cases = [
            ("vm-backup: vm=a colour=red", "\"colour\""),
            ("vm-backup: vm=a method=fast", "method=\"fast\""),
            (
                "vm-backup: vm=a mode=tape",
                "mode=\"tape\": expected direct or stream",
            ),
            (
                "vm-backup: vm=a target=rel/dir",
                "target=\"rel/dir\": must be an absolute",
            ),
            ("vm-backup: vm=a target=/mnt/../etc", "target="),
            ("vm-backup: vm=a config=", "config=\"\": empty value"),
            (
                "vm-backup: vm=a disk_parallel=0",
                "disk_parallel=\"0\": a number",
            ),
            ("vm-backup: vm=a disk_parallel=two", "disk_parallel=\"two\""),
            ("vm-backup: vm=a max_rate=0", "max_rate=\"0\""),
            ("vm-backup: vm=a max_rate=fast", "max_rate=\"fast\""),
            ("vm-backup: vm=a vm=b", "key \"vm\" given twice"),
            ("vm-backup: method=quiesce", "vm=<name> is required"),
            ("vm-backup: vm=a junk", "\"junk\" is not key=value"),
            ("vm-backup: vm=../x", "vm=\"../x\""),
            ("bpipe: vm=a", "does not start with"),
        ];
        for (input, expected) in cases {
            let err = PluginArgs::parse(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn virtual_paths_round_trip_and_strip_where() {
        let p = VirtualPath::new("web01", "2026-11-21-120000", "backup-metadata.json");
        let s = p.to_path();
        assert_eq!(
            s,
            "/@vm-backup/web01/2026-11-21-120000/backup-metadata.json"
        );
        assert_eq!(
            VirtualPath::parse_restored(&s, "").unwrap(),
            Some(p.clone())
        );
        let with_where = format!("/tmp/r{s}");
        assert_eq!(
            VirtualPath::parse_restored(&with_where, "/tmp/r/").unwrap(),
            Some(p)
        );
        assert_eq!(
            VirtualPath::parse_restored("/tmp/r/@vm-backup/web01/2026-11-21-120000/", "/tmp/r")
                .unwrap(),
            None
        );
        for bad in [
            "/etc/passwd",
            "/@vm-backup/web01/notastamp/x",
            "/@vm-backup/web01/2026-11-21-120000/../x",
            "/@vm-backup/a/2026-11-21-120000/b/c",
        ] {
            assert!(VirtualPath::parse_restored(bad, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn our_commands_paths_and_description() {
        assert!(is_our_command("vm-backup: vm=a"));
        assert!(is_our_command("  vm-backup:vm=a"));
        assert!(!is_our_command("vm-backupx: vm=a"));
        assert!(!is_our_command("bpipe:/x:a:b"));
        assert!(is_virtual_path("/@vm-backup/web01/2026-11-21-120000/x"));
        assert!(!is_virtual_path("/@vm-backupx/a"));
        assert!(!is_virtual_path("/etc/passwd"));
        assert_eq!(
            plugin_description(),
            "vm-backup: KVM/libvirt virtual machine backups (vm=<name> method= target= mode= config= disk_parallel= max_rate=)"
        );
    }

    #[test]
    fn where_values() {
        assert!(is_original_place(""));
        assert!(is_original_place("/"));
        assert_eq!(where_dir("/srv/r"), Some(Path::new("/srv/r")));
        assert_eq!(restored_name("web01"), "web01-restored");
    }
}
