//! Site configuration (`/etc/vm-backup/vm-backup.conf`, TOML) and the inventory
//! (`vm-list.yaml`). Both are optional: every setting has a default, and flags and the Bacula
//! plugin string override them. A bad file fails with its path, line and key.
//!
//! ```toml
//! target = "/mnt/backup"
//! group = "backup-readers"         # optional: `vm-backup init` gives it read access (0640/0750)
//! hostname = "hv1"                 # default: the kernel's node name
//! journal_dir = "/var/lib/vm-backup"
//! inventory = "/etc/vm-backup/vm-list.yaml"
//! [timeouts]
//! agent_seconds = 10               # guest agent calls (ping, quiesce)
//! commit_seconds = 600             # blockcommit convergence
//! commit_pause_max_seconds = 5     # then the guest paused at most this long to converge
//! shutdown_seconds = 300           # clean shutdown for offline --shutdown
//! [copy]
//! disk_parallel = 2                # disks of one VM copied at once (1: one after the other)
//! max_rate = "200M"                # optional bandwidth limit of a backup's copy, bytes/s
//! [slack]
//! alerts_webhook = "https://hooks.slack.com/services/…"
//! reports_webhook = "https://hooks.slack.com/services/…"
//! [offsite]                       # `vm-backup offsite` (docs/offsite.md)
//! endpoint = "https://s3.example.net"
//! bucket = "vm-backups"
//! prefix = "site1"
//! key_file = "/etc/vm-backup/offsite.key"
//! credentials_file = "/etc/vm-backup/s3-credentials"   # or AWS_ACCESS_KEY_ID/…
//! object_lock_days = 70           # optional: S3 Object Lock (COMPLIANCE) on what push uploads
//! [offsite.retention]
//! keep_weekly = 8
//! keep_monthly = 12
//! [ssh]
//! user = "backup"
//! identity_file = "/etc/vm-backup/id_ed25519"
//! known_hosts = "/etc/vm-backup/known_hosts"
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::format::metadata::Method;

/// The default location of the site configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vm-backup/vm-backup.conf";
/// The default location of the inventory.
pub const DEFAULT_INVENTORY_PATH: &str = "/etc/vm-backup/vm-list.yaml";
/// The default backup target.
pub const DEFAULT_TARGET: &str = "/mnt/backup";
/// The default folder of the local journal of acquired states.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/vm-backup";

/// Errors reading the configuration or the inventory.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not parse, or has an unknown key or a bad value.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// A target override (`--target`, the plugin's `target=`) cannot be made absolute.
    #[error("target {target}: {source}")]
    Target {
        /// The target as given.
        target: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Timeouts of the steps that wait on something outside our control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Guest agent calls (ping, quiesce), seconds.
    pub agent_seconds: u64,
    /// Blockcommit convergence, seconds.
    pub commit_seconds: u64,
    /// Then at most this long with the guest paused so that the commit converges, seconds.
    pub commit_pause_max_seconds: u64,
    /// Clean shutdown of a domain for `offline --shutdown`, seconds.
    pub shutdown_seconds: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            agent_seconds: 10,
            commit_seconds: 600,
            commit_pause_max_seconds: 5,
            shutdown_seconds: 300,
        }
    }
}

/// Slack incoming webhooks. URLs are secrets: never log them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slack {
    /// Webhook for alerts (every failure or warning).
    pub alerts_webhook: Option<String>,
    /// Webhook for run summaries.
    pub reports_webhook: Option<String>,
    /// Timeout of one POST, seconds (default 2).
    pub timeout_seconds: Option<u64>,
    /// Bound on the whole delivery of one message, retries included, seconds (default 5).
    pub budget_seconds: Option<u64>,
}

/// SSH settings for appliances (Cisco ASAv).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ssh {
    /// Remote user.
    pub user: Option<String>,
    /// Private key.
    pub identity_file: Option<PathBuf>,
    /// known_hosts file (StrictHostKeyChecking=yes against it).
    pub known_hosts: Option<PathBuf>,
    /// Port (default 22).
    pub port: Option<u16>,
    /// Connect timeout, seconds (default 10).
    pub connect_timeout_seconds: Option<u64>,
    /// Bound on one command (connection included), seconds (default 60).
    pub command_timeout_seconds: Option<u64>,
}

/// The site configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where backups go.
    pub target: PathBuf,
    /// The group `vm-backup init` gives read access to the target (files 0640, folders
    /// 2750); none: files 0600, folders 0700.
    pub group: Option<String>,
    /// The host name used in the layout (default: the kernel's node name).
    pub hostname: Option<String>,
    /// The local journal of acquired states.
    pub journal_dir: PathBuf,
    /// The inventory file.
    pub inventory: PathBuf,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Slack webhooks.
    pub slack: Slack,
    /// SSH for appliances.
    pub ssh: Ssh,
    /// Prometheus textfile to write after each run.
    pub metrics_file: Option<PathBuf>,
    /// `vm-backup test-restore`.
    pub test_restore: TestRestore,
    /// The off-site copy (`vm-backup offsite`, docs/offsite.md).
    pub offsite: Offsite,
    /// How a backup copies its disks (`[copy]`).
    pub copy: CopySettings,
}

/// How a backup copies the disks of a VM (`[copy]`; `--disk-parallel` and the plugin's
/// `disk_parallel=` override it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopySettings {
    /// Disks of one VM copied at once, sharing one queue of buffers (1: one after the
    /// other; default [`DEFAULT_DISK_PARALLEL`]).
    pub disk_parallel: usize,
    /// Bandwidth limit of a direct-mode backup's copy, bytes per second read from the disks,
    /// shared by the disks copied at once (`None`: no limit). Written `"200M"`, `"1G/s"` or
    /// a number of bytes; `--max-rate` and the plugin's `max_rate=` override it.
    #[serde(deserialize_with = "rate::deserialize")]
    pub max_rate: Option<u64>,
}

/// `[copy] max_rate`: a rate as [`parse_rate`] reads it, or a plain number.
mod rate {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let rate = match Raw::deserialize(d)? {
            Raw::Bytes(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        super::parse_rate(&rate)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Most disks copied at once (the queue of buffers is split between them).
pub const MAX_DISK_PARALLEL: usize = 16;

/// Default of `[copy] disk_parallel` (docs/performance.md §4b).
pub const DEFAULT_DISK_PARALLEL: usize = 2;

impl Default for CopySettings {
    fn default() -> Self {
        Self {
            disk_parallel: DEFAULT_DISK_PARALLEL,
            max_rate: None,
        }
    }
}

/// The off-site copy on S3-compatible storage (`[offsite]`; flags override each key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Offsite {
    /// `http(s)://host:port` of the S3-compatible server.
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: Option<String>,
    /// A folder inside the bucket.
    pub prefix: Option<String>,
    /// The signing region (default `us-east-1`).
    pub region: Option<String>,
    /// The key file (`vm-backup key create`); keep it, and a paper copy, off the share.
    pub key_file: Option<PathBuf>,
    /// A file holding the key file's passphrase, when it has one.
    pub passphrase_file: Option<PathBuf>,
    /// An AWS-format credentials file, used when `AWS_ACCESS_KEY_ID` is not set; never on
    /// the backup share.
    pub credentials_file: Option<PathBuf>,
    /// Upload and download threads (default 4).
    pub workers: Option<usize>,
    /// Put what `offsite push` uploads under S3 Object Lock (COMPLIANCE) for this many days;
    /// the bucket must have Object Lock enabled (docs/offsite.md).
    pub object_lock_days: Option<u32>,
    /// The off-site retention (`offsite prune`), independent of the primary's.
    pub retention: Retention,
}

/// Settings of `vm-backup test-restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestRestore {
    /// Where the disks of the temporary domain go (default: `<journal_dir>/test-restore`).
    /// Every parent must be traversable by the QEMU user.
    pub dir: Option<PathBuf>,
    /// How long a VM with a guest agent may take to boot until its agent answers, seconds.
    pub boot_timeout_seconds: u64,
    /// How long a VM without an agent must keep running to pass, seconds.
    pub run_seconds: u64,
}

impl Default for TestRestore {
    fn default() -> Self {
        Self {
            dir: None,
            boot_timeout_seconds: 180,
            run_seconds: 30,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            target: PathBuf::from(DEFAULT_TARGET),
            group: None,
            hostname: None,
            journal_dir: PathBuf::from(DEFAULT_JOURNAL_DIR),
            inventory: PathBuf::from(DEFAULT_INVENTORY_PATH),
            libvirt_uri: "qemu:///system".to_string(),
            timeouts: Timeouts::default(),
            slack: Slack::default(),
            ssh: Ssh::default(),
            metrics_file: None,
            test_restore: TestRestore::default(),
            offsite: Offsite::default(),
            copy: CopySettings::default(),
        }
    }
}

impl Settings {
    /// Loads the configuration: `path` if given (it must exist), else the default path if it
    /// exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses the TOML text of a configuration file named `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let settings: Settings = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        if settings.target.as_os_str().is_empty() || !settings.target.is_absolute() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "target".into(),
                message: "must be an absolute path".into(),
            });
        }
        if !(1..=MAX_DISK_PARALLEL).contains(&settings.copy.disk_parallel) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "copy.disk_parallel".into(),
                message: format!("must be 1 to {MAX_DISK_PARALLEL}"),
            });
        }
        Ok(settings)
    }

    /// Loads the configuration (see [`Settings::load`]) and applies a `--target` override
    /// (see [`Settings::with_target`]).
    pub fn load_with_target(
        path: Option<&Path>,
        target: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        Self::load(path)?.with_target(target)
    }

    /// These settings with a target override applied: `--target` of the command line or
    /// `target=` of the plugin string. A relative path is taken from the current folder (made
    /// absolute here, so the layout never sees a relative target); `None` keeps the configured
    /// target. The one place an override is applied.
    pub fn with_target(mut self, target: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(t) = target {
            self.target = std::path::absolute(t).map_err(|source| ConfigError::Target {
                target: t.to_path_buf(),
                source,
            })?;
        }
        Ok(self)
    }

    /// The host name used in the layout.
    pub fn host(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(crate::format::layout::this_host)
    }
}

/// Retention of one VM's backups (grandfather-father-son); unset keys keep nothing by that rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Keep the newest N backups.
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N days.
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks.
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months.
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years.
    pub keep_yearly: Option<u32>,
}

/// One VM of the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Domain name.
    pub name: String,
    /// Consistency method.
    #[serde(default)]
    pub method: Method,
    /// Bacula job priority (lower runs first).
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Retention.
    #[serde(default)]
    pub retention: Retention,
    /// Appliance type (`asav`), for SSH configuration capture.
    #[serde(default)]
    pub appliance: Option<String>,
    /// Management address of an appliance (for SSH).
    #[serde(default)]
    pub address: Option<String>,
    /// Bacula client (hypervisor) that runs this VM.
    #[serde(default)]
    pub client: Option<String>,
}

fn default_priority() -> u32 {
    10
}

/// The inventory (`vm-list.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The VMs, in the order written.
    #[serde(default)]
    pub vms: Vec<VmEntry>,
}

impl Inventory {
    /// Loads an inventory; a missing file at the default path is an empty inventory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_INVENTORY_PATH) =>
            {
                Ok(Self::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the YAML text of an inventory named `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let inventory: Inventory = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for vm in &inventory.vms {
            if !seen.insert(vm.name.as_str()) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: format!("vms[{}].name", vm.name),
                    message: "listed twice".into(),
                });
            }
        }
        Ok(inventory)
    }

    /// The entry of a VM, if listed.
    pub fn vm(&self, name: &str) -> Option<&VmEntry> {
        self.vms.iter().find(|v| v.name == name)
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl ConfigError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ConfigError::Read { .. } => ErrorKind::Config,
            ConfigError::Parse { .. } => ErrorKind::Config,
            ConfigError::Invalid { .. } => ErrorKind::Config,
            ConfigError::Target { .. } => ErrorKind::Config,
        }
    }
}

/// A byte size that [`parse_size`] refused; the message quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No digits, or too many of them.
    #[error("`{0}` is not a size (e.g. 4096, 64k, 4M, 1MiB)")]
    NotASize(String),
    /// A suffix other than b, k, m, g, t (with optional `b`/`ib`).
    #[error("unknown size suffix `{suffix}` in `{text}`")]
    UnknownSuffix {
        /// The suffix, lower-cased.
        suffix: String,
        /// The whole text.
        text: String,
    },
    /// The size does not fit in 64 bits.
    #[error("`{0}` is too large")]
    TooLarge(String),
    /// A bandwidth limit of zero (see [`parse_rate`]).
    #[error("`{0}`: a bandwidth limit must be more than 0 bytes per second")]
    ZeroRate(String),
}

impl SizeError {
    /// What kind of failure this is (always bad input).
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::InvalidInput
    }
}

/// Parses a byte size with an optional suffix: `4096`, `64k`, `4M`, `1MiB`, `2G`, `1T`
/// (powers of 1024; `KB`/`MB`… are accepted as the same).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::NotASize(text.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(SizeError::UnknownSuffix {
                suffix: other.to_string(),
                text: text.to_string(),
            })
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// Parses a bandwidth limit in bytes per second: a size as [`parse_size`] reads it, with an
/// optional `/s` (`100M`, `100M/s`, `1G`); 0 is refused.
pub fn parse_rate(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(size)? {
        0 => Err(SizeError::ZeroRate(text.to_string())),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_empty() {
        let s = Settings::parse("", Path::new("x.conf")).unwrap();
        assert_eq!(s.target, PathBuf::from("/mnt/backup"));
        assert_eq!(s.timeouts.agent_seconds, 10);
    }

    #[test]
    fn max_rate_reads_sizes_per_second_and_refuses_zero() {
        let s = Settings::parse("", Path::new("x.conf")).unwrap();
        assert_eq!(s.copy.max_rate, None);
        for (text, want) in [
            ("\"200M\"", 200 << 20),
            ("\"1G/s\"", 1 << 30),
            ("4096", 4096),
        ] {
            let s = Settings::parse(&format!("[copy]\nmax_rate = {text}\n"), Path::new("x.conf"))
                .unwrap();
            assert_eq!(s.copy.max_rate, Some(want), "{text}");
        }
        for bad in ["\"0\"", "0", "\"fast\"", "\"10X\""] {
            let e = Settings::parse(&format!("[copy]\nmax_rate = {bad}\n"), Path::new("x.conf"))
                .unwrap_err();
            // The file, line and what is wrong with the value.
            let e = e.to_string();
            assert!(e.starts_with("x.conf:2:"), "{bad}: {e}");
            assert!(e.contains("bandwidth") || e.contains("size"), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_parallel_defaults_to_two_and_is_bounded() {
        let s = Settings::parse("", Path::new("x.conf")).unwrap();
        assert_eq!(s.copy.disk_parallel, DEFAULT_DISK_PARALLEL);
        let s = Settings::parse("[copy]\ndisk_parallel = 3\n", Path::new("x.conf")).unwrap();
        assert_eq!(s.copy.disk_parallel, 3);
        for bad in ["0", "17"] {
            let e = Settings::parse(
                &format!("[copy]\ndisk_parallel = {bad}\n"),
                Path::new("x.conf"),
            )
            .unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key, .. } if key == "copy.disk_parallel"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "target = \"/srv/b\"\n[timeouts]\nagent_secs = 3\n";
        let err = Settings::parse(text, Path::new("/etc/vm-backup/vm-backup.conf")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/vm-backup/vm-backup.conf:3:"), "{msg}");
        assert!(msg.contains("agent_secs"), "{msg}");
    }

    #[test]
    fn target_override_is_applied_once_and_made_absolute() {
        let base = Settings::default();
        let kept = base.clone().with_target(None).unwrap();
        assert_eq!(kept.target, base.target);
        let set = base.clone().with_target(Some(Path::new("/srv/b"))).unwrap();
        assert_eq!(set.target, PathBuf::from("/srv/b"));
        let relative = base.clone().with_target(Some(Path::new("b"))).unwrap();
        assert!(relative.target.is_absolute() && relative.target.ends_with("b"));
        let empty = base.with_target(Some(Path::new(""))).unwrap_err();
        assert!(matches!(empty, ConfigError::Target { .. }), "{empty}");
    }

    #[test]
    fn relative_target_is_refused() {
        let err = Settings::parse("target = \"backups\"", Path::new("c")).unwrap_err();
        assert!(err.to_string().contains("target"), "{err}");
    }

    #[test]
    fn inventory_parses_and_reports_bad_values_with_line() {
        let text = "vms:\n  - name: web01\n    method: quiesce\n    priority: 5\n    retention: {keep_last: 3}\n  - name: asa1\n    method: snapshot\n    appliance: asav\n    address: 127.0.0.1\n";
        let inv = Inventory::parse(text, Path::new("vm-list.yaml")).unwrap();
        assert_eq!(inv.vms.len(), 2);
        assert_eq!(inv.vm("web01").unwrap().retention.keep_last, Some(3));
        assert_eq!(inv.vm("asa1").unwrap().method, Method::Snapshot);

        let bad = "vms:\n  - name: web01\n    method: fast\n";
        let err = Inventory::parse(bad, Path::new("vm-list.yaml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("vm-list.yaml:3:"), "{msg}");
        assert!(msg.contains("fast"), "{msg}");
    }

    #[test]
    fn duplicate_vm_is_refused() {
        let text = "vms:\n  - name: a\n  - name: a\n";
        assert!(Inventory::parse(text, Path::new("v")).is_err());
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("4Q").is_err());
        assert!(parse_size("M").is_err());
    }
    #[test]
    fn rates_take_an_optional_per_second_and_refuse_zero() {
        assert_eq!(parse_rate("200M"), Ok(200 << 20));
        assert_eq!(parse_rate("1G/s"), Ok(1 << 30));
        assert!(matches!(parse_rate("0/s"), Err(SizeError::ZeroRate(_))));
        assert!(parse_rate("fast").is_err());
    }
}
