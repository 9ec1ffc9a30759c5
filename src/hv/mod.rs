//! The hypervisor room: every libvirt call the engine makes (through the `virt` crate), the
//! domain XML ([`xml`] reads it, [`xml_edit`] rewrites it; one XML library, `quick-xml`) and
//! `qemu-img` ([`qemu_img`]). Nothing outside this module calls libvirt or spawns `qemu-img`.
//!
//! Everything goes through libvirt's dedicated APIs, never through `virsh` output or raw
//! agent commands (which taint the domain): snapshots with the quiesce flag
//! (`virDomainSnapshotCreateXML`), block commit/job info/pivot, FS thaw, the agent response
//! timeout and an agent ping through `virDomainGetTime` (answered by the guest agent).
//! Calls without a safe wrapper in `virt` 0.5 live in [`raw`], the only `unsafe` here.

pub mod checkpoint;
pub mod export;
pub mod image_lock;
pub mod qemu_img;
pub mod raw;
pub mod xml;
pub mod xml_edit;

use std::path::Path;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

pub use qemu_img::QemuImgError;
pub use raw::BlockJob;
pub use xml::{AgentChannel, DiskDef, DomainXml, XmlError};

/// Errors of this module; each names the VM (or URI) and the operation.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The connection to libvirt failed.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI tried.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// No domain has this name.
    #[error("no domain named {0:?} is defined in libvirt")]
    NoDomain(String),
    /// A call on a domain failed.
    #[error("{op} failed: {message}")]
    Call {
        /// The domain name.
        vm: String,
        /// The operation, in words.
        op: String,
        /// libvirt's message.
        message: String,
    },
    /// The domain XML did not parse.
    #[error("cannot parse the domain XML of {vm:?}: {source}")]
    Xml {
        /// The domain name.
        vm: String,
        /// What went wrong.
        #[source]
        source: XmlError,
    },
    /// Waiting was cancelled (signal, Bacula cancel).
    #[error("cancelled while waiting for {0}")]
    Cancelled(String),
    /// Something did not happen within its bound.
    #[error("{what} did not finish within {seconds} s")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound.
        seconds: u64,
    },
}

/// The coarse state of a domain, as the engine decides on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomState {
    /// Running (or blocked in I/O).
    Running,
    /// Paused by the user or libvirt.
    Paused,
    /// Shut off (also crashed-and-stopped).
    ShutOff,
    /// Shutting down.
    ShuttingDown,
    /// Crashed, PM-suspended or unknown.
    Other,
}

impl DomState {
    /// Whether QEMU runs for this domain (live operations possible).
    pub fn is_live(self) -> bool {
        matches!(self, DomState::Running | DomState::Paused)
    }
}

impl std::fmt::Display for DomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DomState::Running => "running",
            DomState::Paused => "paused",
            DomState::ShutOff => "shut off",
            DomState::ShuttingDown => "shutting down",
            DomState::Other => "crashed/suspended/unknown",
        })
    }
}

/// What [`Dom::undefine`] does with the domain's NVRAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nvram {
    /// Remove it with the definition (a throw-away domain).
    Remove,
    /// Keep it (a definition replaced by a restore).
    Keep,
}

/// A connection to libvirt.
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("uri", &self.uri)
            .finish()
    }
}

impl Hypervisor {
    /// Connects to `uri` (e.g. `qemu:///system`). libvirt's default error printer is turned
    /// off: errors are returned, worded by this module.
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(Self {
            conn,
            uri: uri.to_string(),
        })
    }

    /// Whether the connection to libvirtd still answers (false after libvirtd restarted).
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Opens a new connection to the same URI, trying every second for at most `bound`
    /// (libvirtd restarting); domain handles of the old connection must be looked up again.
    pub fn reconnect(&mut self, bound: Duration) -> Result<(), LibvirtError> {
        let t0 = Instant::now();
        loop {
            match Self::connect(&self.uri) {
                Ok(fresh) => {
                    let old = std::mem::replace(self, fresh);
                    drop(old);
                    return Ok(());
                }
                Err(e) if t0.elapsed() >= bound => {
                    tracing::warn!("reconnecting to {} failed: {e}", self.uri);
                    return Err(LibvirtError::Timeout {
                        what: format!("reconnecting to libvirt at {} ({e})", self.uri),
                        seconds: bound.as_secs(),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }

    /// The URI of this connection.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Looks a domain up by name.
    pub fn domain(&self, name: &str) -> Result<Dom, LibvirtError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Dom {
                dom,
                name: name.to_string(),
            }),
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => {
                Err(LibvirtError::NoDomain(name.to_string()))
            }
            Err(e) => Err(LibvirtError::Call {
                vm: name.to_string(),
                op: "domain lookup".into(),
                message: e.message().to_string(),
            }),
        }
    }

    /// Looks a domain up by name; `None` when no domain has that name.
    pub fn find_domain(&self, name: &str) -> Result<Option<Dom>, LibvirtError> {
        match self.domain(name) {
            Ok(d) => Ok(Some(d)),
            Err(LibvirtError::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The inactive XML (without security info) of every defined domain, with its name. A
    /// domain whose XML cannot be read (it vanished meanwhile) is left out.
    pub fn inactive_xmls(&self) -> Result<Vec<(String, String)>, LibvirtError> {
        let call = |op: &str, e: VirtError| LibvirtError::Call {
            vm: String::new(),
            op: op.into(),
            message: e.message().to_string(),
        };
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| call("listing domains", e))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            let name = d.name().map_err(|e| call("reading a domain name", e))?;
            if let Ok(text) = d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE) {
                out.push((name, text));
            }
        }
        Ok(out)
    }

    /// The names of every defined domain.
    pub fn domain_names(&self) -> Result<Vec<String>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| LibvirtError::Call {
                vm: String::new(),
                op: "listing domains".into(),
                message: e.message().to_string(),
            })?;
        let mut names: Vec<String> = doms.iter().filter_map(|d| d.name().ok()).collect();
        names.sort();
        Ok(names)
    }

    /// (Re)defines domain `vm` from XML (the offline repair, a restore) and returns it.
    pub fn define(&self, vm: &str, xml: &str) -> Result<Dom, LibvirtError> {
        self.conn
            .define_domain_xml(xml)
            .map(|dom| Dom {
                dom,
                name: vm.to_string(),
            })
            .map_err(|e| LibvirtError::Call {
                vm: vm.to_string(),
                op: "defining the domain".into(),
                message: e.message().to_string(),
            })
    }
}

/// A domain handle with the operations the engine uses.
pub struct Dom {
    dom: Domain,
    name: String,
}

impl std::fmt::Debug for Dom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dom").field("name", &self.name).finish()
    }
}

impl Dom {
    fn err(&self, op: impl Into<String>, e: VirtError) -> LibvirtError {
        LibvirtError::Call {
            vm: self.name.clone(),
            op: op.into(),
            message: e.message().to_string(),
        }
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain UUID.
    pub fn uuid(&self) -> Result<String, LibvirtError> {
        self.dom
            .uuid_string()
            .map_err(|e| self.err("reading the UUID", e))
    }

    /// The coarse state.
    pub fn state(&self) -> Result<DomState, LibvirtError> {
        let (state, _) = self
            .dom
            .state()
            .map_err(|e| self.err("reading the state", e))?;
        Ok(match state {
            Enum::Known(DomainState::Running) | Enum::Known(DomainState::Blocked) => {
                DomState::Running
            }
            Enum::Known(DomainState::Paused) => DomState::Paused,
            Enum::Known(DomainState::Shutoff) => DomState::ShutOff,
            Enum::Known(DomainState::Shutdown) => DomState::ShuttingDown,
            _ => DomState::Other,
        })
    }

    /// The domain XML with security info: the persistent definition (`inactive`) or the live
    /// one (real backing chains, agent channel state, firmware autoselection).
    pub fn xml(&self, inactive: bool) -> Result<String, LibvirtError> {
        let mut flags = sys::VIR_DOMAIN_XML_SECURE;
        if inactive {
            flags |= sys::VIR_DOMAIN_XML_INACTIVE;
        }
        self.dom
            .xml_desc(flags)
            .map_err(|e| self.err("reading the domain XML", e))
    }

    /// The parsed domain XML (live when running, else the definition).
    pub fn parsed(&self, inactive: bool) -> Result<DomainXml, LibvirtError> {
        let text = self.xml(inactive)?;
        xml::parse_domain(&text).map_err(|source| LibvirtError::Xml {
            vm: self.name.clone(),
            source,
        })
    }

    /// Capacity (virtual size) and allocation (host bytes) of a disk, by target name.
    pub fn block_sizes(&self, target: &str) -> Result<(u64, u64), LibvirtError> {
        let info = self
            .dom
            .block_info(target, 0)
            .map_err(|e| self.err(format!("reading the size of disk {target}"), e))?;
        Ok((info.capacity, info.allocation))
    }

    /// Bounds every agent call of this domain to `seconds` (`None`: libvirt's default).
    pub fn set_agent_timeout(&self, seconds: Option<u32>) -> Result<(), LibvirtError> {
        raw::set_agent_timeout(&self.dom, seconds)
            .map_err(|e| self.err("setting the guest agent timeout", e))
    }

    /// Asks the guest agent for the guest time: a dedicated API answered by qemu-ga, bounded by
    /// the agent timeout. Ok means the agent answers.
    pub fn agent_ping(&self) -> Result<(), LibvirtError> {
        self.dom
            .time(0)
            .map(|_| ())
            .map_err(|e| self.err("guest agent ping", e))
    }

    /// Creates an external, disk-only, atomic, no-metadata snapshot from `snapshot_xml` into
    /// overlay files created beforehand (reuse-external), with the quiesce flag when asked
    /// (freeze, snapshot and thaw inside this one call).
    pub fn snapshot_external(&self, snapshot_xml: &str, quiesce: bool) -> Result<(), LibvirtError> {
        let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;
        if quiesce {
            flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
        }
        let op = if quiesce {
            "quiesced disk-only snapshot"
        } else {
            "disk-only snapshot"
        };
        self.dom
            .create_snapshot_xml(snapshot_xml, flags)
            .map(drop)
            .map_err(|e| self.err(op, e))
    }

    /// Names of libvirt snapshots with metadata (we never create any).
    pub fn snapshot_names(&self) -> Result<Vec<String>, LibvirtError> {
        let snaps = self
            .dom
            .list_all_snapshots(0)
            .map_err(|e| self.err("listing snapshots", e))?;
        Ok(snaps.iter().filter_map(|s| s.name().ok()).collect())
    }

    /// The block job on a disk, if any.
    pub fn block_job(&self, target: &str) -> Result<Option<BlockJob>, LibvirtError> {
        raw::block_job_info(&self.dom, target)
            .map_err(|e| self.err(format!("reading the block job of {target}"), e))
    }

    /// Starts an active, shallow block commit of `target`: its top overlay into the image
    /// directly below it (never further down the chain).
    pub fn start_active_commit(&self, target: &str) -> Result<(), LibvirtError> {
        raw::block_commit(&self.dom, target, None, None, raw::COMMIT_ACTIVE_SHALLOW)
            .map_err(|e| self.err(format!("starting the block commit of {target}"), e))
    }

    /// Starts a full (not shallow), transient block copy of `target` into the existing image
    /// `dest` (format `format`, created beforehand without a backing file): once pivoted, the
    /// disk stands alone on `dest` (an instant restore moving a disk off the backup).
    pub fn start_block_copy(
        &self,
        target: &str,
        dest: &Path,
        format: &str,
    ) -> Result<(), LibvirtError> {
        let dest_xml = format!(
            "<disk type='file'><source file='{}'/><driver type='{}'/></disk>",
            xml::escape_attr(&dest.to_string_lossy()),
            xml::escape_attr(format)
        );
        raw::block_copy(&self.dom, target, &dest_xml, raw::COPY_REUSE_FULL_TRANSIENT)
            .map_err(|e| self.err(format!("starting the block copy of {target}"), e))
    }

    /// Limits the block job of `target` to `bytes_per_sec` (0: unlimited).
    pub fn set_block_job_speed(
        &self,
        target: &str,
        bytes_per_sec: u64,
    ) -> Result<(), LibvirtError> {
        raw::block_job_set_speed(&self.dom, target, bytes_per_sec)
            .map_err(|e| self.err(format!("setting the speed of the block job of {target}"), e))
    }

    /// Pivots a ready active commit or block copy (waits for the pivot to complete).
    pub fn pivot(&self, target: &str) -> Result<(), LibvirtError> {
        raw::block_job_abort(&self.dom, target, true)
            .map_err(|e| self.err(format!("pivoting {target}"), e))
    }

    /// Cancels the block job of a disk.
    pub fn abort_job(&self, target: &str) -> Result<(), LibvirtError> {
        raw::block_job_abort(&self.dom, target, false)
            .map_err(|e| self.err(format!("aborting the block job of {target}"), e))
    }

    /// Thaws the guest filesystems; returns how many were thawed.
    pub fn fs_thaw(&self) -> Result<u32, LibvirtError> {
        raw::fs_thaw(&self.dom).map_err(|e| self.err("thawing the guest filesystems", e))
    }

    /// Pauses the guest's vCPUs (`virDomainSuspend`): its disks stop changing.
    pub fn suspend(&self) -> Result<(), LibvirtError> {
        self.dom
            .suspend()
            .map_err(|e| self.err("pausing the domain", e))
    }

    /// Resumes a paused guest (`virDomainResume`).
    pub fn resume(&self) -> Result<(), LibvirtError> {
        self.dom
            .resume()
            .map_err(|e| self.err("resuming the domain", e))
    }

    /// Whether the block job of `target` is ready to pivot: QEMU sent BLOCK_JOB_READY, which
    /// libvirt shows as `<mirror ready='yes'>` in the live XML. Unlike `cur == end` in the
    /// job info, this stays true while the guest keeps writing.
    pub fn block_job_ready(&self, target: &str) -> Result<bool, LibvirtError> {
        Ok(self
            .parsed(false)?
            .disks
            .iter()
            .any(|d| d.target == target && d.mirror_ready))
    }

    /// Whether the domain has a persistent definition (a transient one has none to repair).
    pub fn is_persistent(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_persistent()
            .map_err(|e| self.err("reading whether the domain is persistent", e))
    }

    /// Whether QEMU runs for this domain (running, paused, shutting down, PM-suspended).
    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_active()
            .map_err(|e| self.err("reading whether the domain is active", e))
    }

    /// Stops the domain at once (pulls the plug): only for throw-away domains.
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        self.dom
            .destroy()
            .map_err(|e| self.err("destroying the domain", e))
    }

    /// Undefines the domain with its snapshot and checkpoint metadata and managed save image;
    /// its NVRAM file is removed or kept as `nvram` says.
    pub fn undefine(&self, nvram: Nvram) -> Result<(), LibvirtError> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | match nvram {
                Nvram::Remove => sys::VIR_DOMAIN_UNDEFINE_NVRAM,
                Nvram::Keep => sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM,
            };
        self.dom
            .undefine_flags(flags)
            .map(drop)
            .map_err(|e| self.err("undefining the domain", e))
    }

    /// The guest's host name, asked of the guest agent (a dedicated API served by qemu-ga).
    pub fn agent_hostname(&self) -> Result<String, LibvirtError> {
        self.dom
            .hostname(sys::VIR_DOMAIN_GET_HOSTNAME_AGENT)
            .map_err(|e| self.err("asking the guest agent for the host name", e))
    }

    /// Starts the domain.
    pub fn start(&self) -> Result<(), LibvirtError> {
        self.dom
            .create()
            .map(|_| ())
            .map_err(|e| self.err("starting the domain", e))
    }

    /// Asks the guest to shut down cleanly (agent if present, else ACPI); never destroys.
    pub fn request_shutdown(&self, agent: bool) -> Result<(), LibvirtError> {
        let flags = if agent {
            sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        } else {
            sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        };
        self.dom
            .shutdown_flags(flags)
            .map(|_| ())
            .map_err(|e| self.err("requesting a clean shutdown", e))
    }

    /// Waits until the domain is shut off, polling `stop` (cancellation) every 100 ms.
    pub fn wait_shut_off(
        &self,
        bound: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), LibvirtError> {
        let t0 = Instant::now();
        loop {
            if self.state()? == DomState::ShutOff {
                return Ok(());
            }
            if stop() {
                return Err(LibvirtError::Cancelled(format!(
                    "the clean shutdown of {:?}",
                    self.name
                )));
            }
            if t0.elapsed() >= bound {
                return Err(LibvirtError::Timeout {
                    what: format!("the clean shutdown of {:?}", self.name),
                    seconds: bound.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The user and group QEMU runs as under libvirt's system instance (`libvirt-qemu` on Debian,
/// `qemu` on RHEL), if that user exists: restored images are handed to it, so libvirt can
/// probe their backing chains before it labels them.
pub fn qemu_user() -> Option<(u32, u32)> {
    ["libvirt-qemu", "qemu"].iter().find_map(|name| {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    })
}

/// The usual NVRAM path libvirt uses for a domain with auto-selected UEFI firmware.
pub fn default_nvram_path(vm: &str) -> std::path::PathBuf {
    Path::new("/var/lib/libvirt/qemu/nvram").join(format!("{vm}_VARS.fd"))
}

impl LibvirtError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            LibvirtError::Connect { .. } => ErrorKind::Libvirt,
            LibvirtError::NoDomain { .. } => ErrorKind::NotFound,
            LibvirtError::Call { .. } => ErrorKind::Libvirt,
            LibvirtError::Xml { .. } => ErrorKind::Libvirt,
            LibvirtError::Cancelled { .. } => ErrorKind::Cancelled,
            LibvirtError::Timeout { .. } => ErrorKind::Libvirt,
        }
    }
}
