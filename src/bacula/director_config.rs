//! Bacula Director resources generated from the `vm-list.yaml` inventory: one Client per
//! hypervisor, and per VM one FileSet (with the plugin string) and one Job (with its Priority).
//! The output is meant for an include folder of `bacula-conf/bacula-dir.conf`, which supplies
//! the JobDefs `VmBackup` (schedule, storage, pool, messages, Maximum Concurrent Jobs = 1).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::bacula::{Mode, PluginArgs};
use crate::config::{Inventory, VmEntry};

/// Errors generating the resources.
#[derive(Debug, thiserror::Error)]
pub enum BaculaConfigError {
    /// No `--client` was given.
    #[error("at least one --client NAME[=ADDRESS] is needed")]
    NoClient,
    /// A VM names a client that was not given.
    #[error("VM {vm:?} runs on client {client:?}, which is not among the --client values")]
    UnknownClient {
        /// The VM.
        vm: String,
        /// Its client.
        client: String,
    },
    /// A name cannot be written into a Bacula resource or a plugin string.
    #[error("{what} {name:?} cannot be used in the Bacula configuration: {why}")]
    BadName {
        /// What kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// The plugin string generated does not parse (a bug, or a bad path).
    #[error("generated plugin string for {vm:?} is invalid: {source}")]
    PluginString {
        /// The VM.
        vm: String,
        /// The parse error.
        #[source]
        source: crate::bacula::PluginError,
    },
}

/// A File Daemon (hypervisor) the Director talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// The Client resource name (the File Daemon's Name).
    pub name: String,
    /// Its address (default: the name).
    pub address: String,
}

impl std::str::FromStr for ClientSpec {
    type Err = String;
    /// `NAME` or `NAME=ADDRESS`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, address) = s.split_once('=').unwrap_or((s, s));
        if name.is_empty() || address.is_empty() {
            return Err(format!("{s:?}: expected NAME or NAME=ADDRESS"));
        }
        Ok(Self {
            name: name.to_string(),
            address: address.to_string(),
        })
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The hypervisors; a VM without `client:` in the inventory goes to the first.
    pub clients: Vec<ClientSpec>,
    /// The Catalog resource the Clients use.
    pub catalog: String,
    /// The File Daemons' port.
    pub fd_port: u16,
    /// The File Daemons' Director password.
    pub fd_password: String,
    /// `target=` for every plugin string (default: the plugin's configuration).
    pub target: Option<PathBuf>,
    /// `config=` for every plugin string.
    pub config: Option<PathBuf>,
    /// `mode=` for every plugin string (default direct).
    pub mode: Mode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            catalog: "MyCatalog".into(),
            fd_port: 9102,
            fd_password: "CHANGE-ME".into(),
            target: None,
            config: None,
            mode: Mode::Direct,
        }
    }
}

/// The Job resource name of a VM.
pub fn job_name(vm: &str) -> String {
    format!("vm-{vm}")
}

/// The FileSet resource name of a VM.
pub fn fileset_name(vm: &str) -> String {
    format!("vm-{vm}-set")
}

fn check_name(what: &'static str, name: &str) -> Result<(), BaculaConfigError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains white space or control characters")
    } else if name
        .chars()
        .any(|c| matches!(c, '"' | '\'' | '\\' | '/' | '#' | ';' | '{' | '}' | '='))
    {
        Some("contains one of \" ' \\ / # ; { } =")
    } else {
        None
    };
    match why {
        Some(why) => Err(BaculaConfigError::BadName {
            what,
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// The plugin string of a VM.
pub fn plugin_string(vm: &VmEntry, opts: &Options) -> Result<String, BaculaConfigError> {
    let mut s = format!("vm-backup: vm={} method={}", vm.name, vm.method);
    if let Some(t) = &opts.target {
        let _ = write!(s, " target={}", t.display());
    }
    if opts.mode == Mode::Stream {
        s.push_str(" mode=stream");
    }
    if let Some(c) = &opts.config {
        let _ = write!(s, " config={}", c.display());
    }
    PluginArgs::parse(&s).map_err(|source| BaculaConfigError::PluginString {
        vm: vm.name.clone(),
        source,
    })?;
    Ok(s)
}

/// Generates the Client, FileSet and Job resources for an inventory.
pub fn generate(inventory: &Inventory, opts: &Options) -> Result<String, BaculaConfigError> {
    let first = opts.clients.first().ok_or(BaculaConfigError::NoClient)?;
    check_name("catalog", &opts.catalog)?;
    let mut out = String::from(
        "# Generated by `vm-backup bacula-config` from the inventory; regenerate rather than edit.\n\n",
    );
    for c in &opts.clients {
        check_name("client", &c.name)?;
        check_name("client address", &c.address)?;
        let _ = writeln!(
            out,
            "Client {{\n  Name = \"{}\"\n  Address = \"{}\"\n  FDPort = {}\n  Catalog = \"{}\"\n  Password = \"{}\"\n  AutoPrune = yes\n  Maximum Concurrent Jobs = 1\n}}\n",
            c.name,
            c.address,
            opts.fd_port,
            opts.catalog,
            opts.fd_password.replace('"', "")
        );
    }
    for vm in &inventory.vms {
        check_name("VM", &vm.name)?;
        let client = match &vm.client {
            Some(name) => opts
                .clients
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| BaculaConfigError::UnknownClient {
                    vm: vm.name.clone(),
                    client: name.clone(),
                })?,
            None => first,
        };
        let plugin = plugin_string(vm, opts)?;
        let _ = writeln!(
            out,
            "FileSet {{\n  Name = \"{}\"\n  # The plugin string is part of the FileSet: changing it makes the next job a Full.\n  Include {{\n    Plugin = \"{}\"\n  }}\n}}\n",
            fileset_name(&vm.name),
            plugin
        );
        let _ = writeln!(
            out,
            "Job {{\n  Name = \"{}\"\n  JobDefs = \"VmBackup\"\n  Client = \"{}\"\n  FileSet = \"{}\"\n  Priority = {}\n}}\n",
            job_name(&vm.name),
            client.name,
            fileset_name(&vm.name),
            vm.priority
        );
    }
    Ok(out)
}

impl BaculaConfigError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            BaculaConfigError::NoClient => ErrorKind::InvalidInput,
            BaculaConfigError::UnknownClient { .. } => ErrorKind::InvalidInput,
            BaculaConfigError::BadName { .. } => ErrorKind::InvalidInput,
            BaculaConfigError::PluginString { .. } => ErrorKind::InvalidInput,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inv(text: &str) -> Inventory {
        Inventory::parse(text, Path::new("vm-list.yaml")).unwrap()
    }

    #[test]
    fn one_job_per_vm_with_priority_method_and_client() {
        let i = inv("vms:\n  - name: web01\n    method: quiesce\n    priority: 5\n  - name: asa1\n    method: snapshot\n    client: hv2-fd\n");
        let opts = Options {
            clients: vec![
                "hv1-fd=hv1.example.org".parse().unwrap(),
                "hv2-fd".parse().unwrap(),
            ],
            target: Some("/mnt/backup".into()),
            ..Options::default()
        };
        let out = generate(&i, &opts).unwrap();
        assert_eq!(out.matches("Job {").count(), 2);
        assert_eq!(out.matches("Client {").count(), 2);
        assert!(out.contains("Address = \"hv1.example.org\""), "{out}");
        assert!(
            out.contains("Plugin = \"vm-backup: vm=web01 method=quiesce target=/mnt/backup\""),
            "{out}"
        );
        assert!(out.contains("Name = \"vm-web01\"\n  JobDefs = \"VmBackup\"\n  Client = \"hv1-fd\"\n  FileSet = \"vm-web01-set\"\n  Priority = 5"), "{out}");
        assert!(
            out.contains("Client = \"hv2-fd\"\n  FileSet = \"vm-asa1-set\"\n  Priority = 10"),
            "{out}"
        );
    }

    #[test]
    fn refuses_unknown_client_bad_names_and_no_client() {
        let i = inv("vms:\n  - name: a\n    client: hvX\n");
        let opts = Options {
            clients: vec!["hv1".parse().unwrap()],
            ..Options::default()
        };
        assert!(generate(&i, &opts).unwrap_err().to_string().contains("hvX"));
        assert!(matches!(
            generate(&inv("vms: []\n"), &Options::default()),
            Err(BaculaConfigError::NoClient)
        ));
        let bad = inv("vms:\n  - name: \"a b\"\n");
        assert!(generate(&bad, &opts)
            .unwrap_err()
            .to_string()
            .contains("white space"));
        let bad = inv("vms:\n  - name: 'x\"y'\n");
        assert!(generate(&bad, &opts).is_err());
    }
}
