//! `vm-backup key create | fingerprint | paper | import`: the off-site copy's master key.

use std::path::{Path, PathBuf};

use vm_backup::config::Settings;
use vm_backup::store::offsite::key::{self, KeyFile, MasterKey};
use vm_backup::store::offsite::OffsiteError;

/// Arguments of `vm-backup key`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

/// Where the key file is.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// The key file (default: `key_file` of the `[offsite]` section).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A file whose first line is the key's passphrase (else `VM_BACKUP_PASSPHRASE`).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The configuration file.
    #[arg(long, value_name = "FILE", env = "VM_BACKUP_CONFIG")]
    pub config: Option<PathBuf>,
}

impl KeyArgs {
    /// The key file and passphrase file, from the flags or the configuration.
    pub fn resolve(
        &self,
        settings: &Settings,
    ) -> Result<(PathBuf, Option<PathBuf>), vm_backup::Error> {
        let file = self
            .key_file
            .clone()
            .or_else(|| settings.offsite.key_file.clone())
            .ok_or_else(|| {
                vm_backup::Error::Other(
                    "no key file: give --key-file or key_file in the [offsite] section".into(),
                )
            })?;
        let pass = self
            .passphrase_file
            .clone()
            .or_else(|| settings.offsite.passphrase_file.clone());
        Ok((file, pass))
    }
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Create a new random 256-bit key (with a passphrase: wrapped with Argon2id).
    Create(KeyArgs),
    /// Print the key's fingerprint (what the off-site store records).
    Fingerprint(KeyArgs),
    /// Print the key for paper: 8 lines of hex, each with a check.
    Paper(KeyArgs),
    /// Write a key file from a paper copy.
    Import {
        #[command(flatten)]
        key: KeyArgs,
        /// The paper copy, typed back in (`-` for standard input).
        #[arg(long, value_name = "FILE")]
        paper: PathBuf,
    },
}

fn passphrase(
    file: Option<&Path>,
) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, vm_backup::Error> {
    Ok(key::read_passphrase(file)?)
}

fn write_key(k: &MasterKey, file: &Path, pass: Option<&Path>) -> Result<(), vm_backup::Error> {
    let pass = passphrase(pass)?;
    if matches!(&pass, Some(p) if p.is_empty()) {
        return Err(vm_backup::Error::Other("the passphrase is empty".into()));
    }
    let kf =
        KeyFile::new(k, pass.as_deref().map(|p| &p[..])).map_err(|e| OffsiteError::BadKeyFile {
            path: file.to_owned(),
            reason: e.to_string(),
        })?;
    kf.write_new(file)?;
    println!("key {} written to {}", k.fingerprint(), file.display());
    println!("keep a copy off the backup share (`vm-backup key paper`): without it the off-site backups cannot be read");
    Ok(())
}

/// Runs `vm-backup key`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    match args.action {
        Action::Create(a) => {
            let settings = Settings::load(a.config.as_deref())?;
            let (file, pass) = a.resolve(&settings)?;
            write_key(&MasterKey::generate(), &file, pass.as_deref())?;
        }
        Action::Fingerprint(a) => {
            let settings = Settings::load(a.config.as_deref())?;
            let (file, _) = a.resolve(&settings)?;
            // The fingerprint is recorded in the file; opening it checks it matches.
            let kf = KeyFile::read(&file)?;
            if !kf.needs_passphrase() {
                kf.open(&file, None)?;
            }
            println!("{}", kf.fingerprint);
        }
        Action::Paper(a) => {
            let settings = Settings::load(a.config.as_deref())?;
            let (file, pass) = a.resolve(&settings)?;
            let k = key::load(&file, pass.as_deref())?;
            print!("{}", k.paper());
        }
        Action::Import { key: a, paper } => {
            let settings = Settings::load(a.config.as_deref())?;
            let (file, pass) = a.resolve(&settings)?;
            let text = if paper.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|source| {
                    vm_backup::Error::Io {
                        context: "cannot read standard input".into(),
                        source,
                    }
                })?
            } else {
                std::fs::read_to_string(&paper).map_err(|source| vm_backup::Error::Io {
                    context: format!("cannot read {}", paper.display()),
                    source,
                })?
            };
            let k = MasterKey::from_paper(&text)
                .map_err(|e| vm_backup::Error::Other(format!("paper key: {e}")))?;
            write_key(&k, &file, pass.as_deref())?;
        }
    }
    Ok(0)
}
