//! `vm-backup bacula-config`: writes the Director's Client, FileSet and Job resources for an
//! inventory (one Job per VM, priorities and methods from the inventory).

use std::path::PathBuf;

use super::common::TargetArgs;
use vm_backup::bacula::director_config::{self, ClientSpec, Options};
use vm_backup::bacula::Mode;
use vm_backup::config::Inventory;

/// Arguments of `vm-backup bacula-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// The inventory (vm-list.yaml).
    #[arg(long, value_name = "FILE", default_value = vm_backup::config::DEFAULT_INVENTORY_PATH)]
    inventory: PathBuf,
    /// A hypervisor's File Daemon: NAME or NAME=ADDRESS (repeat; VMs without `client:` go to the first).
    #[arg(long = "client", value_name = "NAME[=ADDRESS]", required = true)]
    clients: Vec<ClientSpec>,
    /// The Catalog resource the Clients use.
    #[arg(long, default_value = "MyCatalog")]
    catalog: String,
    /// The File Daemons' port.
    #[arg(long, default_value_t = 9102)]
    fd_port: u16,
    /// The File Daemons' Director password.
    #[arg(long, default_value = "CHANGE-ME", env = "VMB_FD_PASSWORD")]
    fd_password: String,
    /// Send the disk images through Bacula (mode=stream) instead of writing them to the target.
    #[arg(long)]
    stream: bool,
    /// Add an Admin job that runs `vm-backup offsite push --all` on the first client after
    /// the VM jobs (docs/offsite.md, docs/bacula.md).
    #[arg(long)]
    offsite: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Runs `vm-backup bacula-config`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let inventory = Inventory::load(&args.inventory)?;
    let offsite_job = args
        .offsite
        .then(|| offsite_admin_job(&inventory, &args.clients));
    let opts = Options {
        clients: args.clients,
        catalog: args.catalog,
        fd_port: args.fd_port,
        fd_password: args.fd_password,
        target: args.common.target,
        config: args.common.config,
        mode: if args.stream {
            Mode::Stream
        } else {
            Mode::Direct
        },
    };
    let mut text = director_config::generate(&inventory, &opts)
        .map_err(|e| vm_backup::Error::Other(e.to_string()))?;
    if let Some(job) = offsite_job {
        text.push_str(&job);
    }
    match args.output {
        Some(path) => vm_backup::store::write_atomic(&path, text.as_bytes())
            .map_err(|e| vm_backup::Error::io(format!("write {}", path.display()), e.into()))?,
        None => print!("{text}"),
    }
    Ok(0)
}

/// The Admin job of the off-site push: same JobDefs (schedule, pool, messages) as the VM
/// jobs, a lower priority so it starts after them, the push run on the hypervisor.
fn offsite_admin_job(inventory: &Inventory, clients: &[ClientSpec]) -> String {
    let after = inventory.vms.iter().map(|v| v.priority).max().unwrap_or(10) + 1;
    let client = clients
        .first()
        .map(|c| c.name.as_str())
        .unwrap_or("CHANGE-ME");
    let fileset = inventory
        .vms
        .first()
        .map(|v| format!("vm-{}-set", v.name))
        .unwrap_or_default();
    format!(
        r#"
# The off-site copy (docs/offsite.md): after the VM jobs, push what is new to S3.
# Type = Admin saves no data; the FileSet is only required by the syntax.
# An Admin job never contacts a File Daemon: its RunScript runs on the DIRECTOR's host
# (RunsOnClient = yes would be skipped silently). That host needs the backup share mounted and
# the [offsite] settings; otherwise reach the hypervisor with ssh in Command, or push per VM
# from each VM Job (RunScript {{ RunsWhen = After; RunsOnClient = yes; Command =
# "/usr/bin/vm-backup offsite push <vm> --latest" }}, docs/bacula.md).
Job {{
  Name = "vm-backup-offsite-push"
  JobDefs = "VmBackup"
  Type = Admin
  Client = "{client}"
  FileSet = "{fileset}"
  Priority = {after}
  RunScript {{
    RunsWhen = Before
    RunsOnClient = no
    FailJobOnError = yes
    Command = "/usr/bin/vm-backup offsite push --all"
  }}
}}
"#
    )
}
