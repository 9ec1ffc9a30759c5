//! Reading libvirt domain XML: disks (with their live backing chain), NVRAM, firmware, the
//! guest agent channel and the interfaces. The edits (restore's rewrite, the offline repair's
//! re-pointing of a disk) are in [`super::xml_edit`].
//!
//! One XML library serves both, `quick-xml`: it reads *and* writes. Its streaming writer
//! copies every event it does not touch as it came, which is what the edits need (a rewritten
//! domain keeps comments, ordering, quoting and the unknown elements of newer libvirt versions
//! byte for byte); a read-only DOM crate would leave the edits to string surgery on byte
//! ranges. For reading, the events are gathered into a small element tree ([`Element`]), so
//! the questions asked of a domain read as plainly as with a DOM.

use std::path::PathBuf;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// The offline repair's edit, also reachable here where the engine looked for it.
pub use super::xml_edit::point_disk_at;

/// Errors reading or writing domain XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// The XML does not parse.
    #[error("domain XML does not parse: {0}")]
    Parse(#[from] quick_xml::Error),
    /// An attribute does not parse.
    #[error("domain XML does not parse: {0}")]
    Attr(#[from] quick_xml::events::attributes::AttrError),
    /// The document ends inside an element.
    #[error("domain XML does not parse: <{0}> is not closed")]
    Unclosed(String),
    /// The rewritten document could not be written out.
    #[error("cannot write the domain XML: {0}")]
    Write(#[from] std::io::Error),
    /// The rewritten document is not UTF-8.
    #[error("the rewritten domain XML is not UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
    /// The root is not `<domain>`, or it has no `<name>`.
    #[error("not a libvirt domain XML: {0}")]
    NotADomain(String),
    /// An edit names a disk the domain does not have, or one it cannot be applied to.
    #[error("disk {target}: {problem}")]
    Disk {
        /// The disk's target device (`vda`).
        target: String,
        /// What is missing: `no such disk`, `no <source>`, `not a file disk`.
        problem: &'static str,
    },
}

impl XmlError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            XmlError::Parse(_)
            | XmlError::Attr(_)
            | XmlError::Unclosed(_)
            | XmlError::Utf8(_)
            | XmlError::NotADomain(_)
            | XmlError::Disk { .. } => ErrorKind::Corrupt,
            XmlError::Write(_) => ErrorKind::Internal,
        }
    }
}

/// One layer of a disk's backing chain as the live XML shows it (`<backingStore>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingLayer {
    /// The image file, when it is a file.
    pub path: Option<PathBuf>,
    /// Its format (`qcow2`, `raw`).
    pub format: Option<String>,
}

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`, `dir`…
    pub kind: String,
    /// Target device in the guest (`vda`).
    pub target: String,
    /// The image file or device (`<source file=…>` or `dev=…`), if any.
    pub source: Option<PathBuf>,
    /// `<driver type=…>`: `qcow2`, `raw`…
    pub format: Option<String>,
    /// `<readonly/>`.
    pub readonly: bool,
    /// `<shareable/>`.
    pub shareable: bool,
    /// The backing chain below `source` (live XML only; empty when the XML says nothing).
    pub backing: Vec<BackingLayer>,
    /// A block job mirrors this disk and QEMU reports it ready to pivot (`<mirror
    /// ready='yes'>` in the live XML: the job's READY event was seen by libvirt).
    pub mirror_ready: bool,
}

impl DiskDef {
    /// Why this disk is not backed up, if it is not: cdrom, read-only, shareable, network.
    pub fn skip_reason(&self) -> Option<String> {
        if self.device != "disk" {
            return Some(format!("{} device", self.device));
        }
        if self.readonly {
            return Some("read-only disk".into());
        }
        if self.shareable {
            return Some("shareable disk".into());
        }
        if self.kind == "network" {
            return Some("network disk".into());
        }
        if self.source.is_none() {
            return Some("no source (empty drive)".into());
        }
        None
    }
}

/// The state of the guest agent channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// No `org.qemu.guest_agent.0` channel in the XML.
    Absent,
    /// The channel exists; `state` is `connected`/`disconnected` in live XML, `None` inactive.
    Present {
        /// The `state=` attribute of the channel's target.
        state: Option<String>,
    },
}

impl AgentChannel {
    /// Whether the XML has a guest agent channel at all.
    pub fn present(&self) -> bool {
        matches!(self, AgentChannel::Present { .. })
    }

    /// The `state=` of the channel (`connected`, `disconnected`), in live XML only.
    pub fn state(&self) -> Option<&str> {
        match self {
            AgentChannel::Present { state } => state.as_deref(),
            AgentChannel::Absent => None,
        }
    }

    /// Whether the live XML says the agent is connected.
    pub fn connected(&self) -> bool {
        self.state() == Some("connected")
    }
}

/// What the engine needs from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// `<name>`.
    pub name: String,
    /// `<uuid>` (empty when the XML has none).
    pub uuid: String,
    /// Every `<disk>`, in document order.
    pub disks: Vec<DiskDef>,
    /// `<os><nvram>` path, if any.
    pub nvram: Option<PathBuf>,
    /// `<os firmware='efi'>` or a pflash loader: the domain boots UEFI.
    pub efi: bool,
    /// The guest agent channel.
    pub agent: AgentChannel,
    /// Number of `<interface>` elements.
    pub interfaces: usize,
}

/// An element of a parsed document: its local name, attributes and text unescaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// The local name (without a namespace prefix).
    pub name: String,
    /// The attributes, in document order.
    pub attributes: Vec<(String, String)>,
    /// The text directly inside this element, concatenated.
    pub text: String,
    /// The child elements, in document order.
    pub children: Vec<Element>,
}

impl Element {
    /// The value of attribute `key`, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first child element named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The child elements named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn from_start(e: &BytesStart<'_>) -> Result<Self, XmlError> {
        let mut attributes = Vec::new();
        for a in e.attributes() {
            let a = a?;
            attributes.push((
                String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned(),
                a.unescape_value()?.into_owned(),
            ));
        }
        Ok(Element {
            name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
            attributes,
            ..Default::default()
        })
    }
}

/// Parses a whole document into its root element.
pub fn parse_tree(xml: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut close = |el: Element, stack: &mut Vec<Element>| match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => root = root.take().or(Some(el)),
    };
    loop {
        match reader.read_event()? {
            Event::Start(e) => stack.push(Element::from_start(&e)?),
            Event::Empty(e) => close(Element::from_start(&e)?, &mut stack),
            Event::End(_) => {
                if let Some(el) = stack.pop() {
                    close(el, &mut stack);
                }
            }
            Event::Text(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&t.unescape()?);
                }
            }
            Event::CData(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(open) = stack.pop() {
        return Err(XmlError::Unclosed(open.name));
    }
    root.ok_or_else(|| XmlError::NotADomain("empty document".into()))
}

/// Parses a domain XML (live or inactive).
pub fn parse_domain(xml: &str) -> Result<DomainXml, XmlError> {
    let root = parse_tree(xml)?;
    if root.name != "domain" {
        return Err(XmlError::NotADomain(format!(
            "root element is <{}>, not <domain>",
            root.name
        )));
    }
    let name = child_text(&root, "name").unwrap_or_default();
    if name.is_empty() {
        return Err(XmlError::NotADomain("no <name>".into()));
    }
    let uuid = child_text(&root, "uuid").unwrap_or_default();
    let os = root.child("os");
    let nvram = os
        .and_then(|os| os.child("nvram"))
        .map(|n| PathBuf::from(n.text.trim()))
        .filter(|p| !p.as_os_str().is_empty());
    let efi = os.is_some_and(|os| {
        os.attribute("firmware") == Some("efi")
            || os
                .child("loader")
                .is_some_and(|l| l.attribute("type") == Some("pflash"))
    });
    let mut disks = Vec::new();
    let mut agent = AgentChannel::Absent;
    let mut interfaces = 0;
    if let Some(devices) = root.child("devices") {
        for dev in &devices.children {
            match dev.name.as_str() {
                "disk" => disks.push(parse_disk(dev)),
                "interface" => interfaces += 1,
                "channel" => {
                    if let Some(t) = dev.child("target") {
                        if t.attribute("name") == Some("org.qemu.guest_agent.0") {
                            agent = AgentChannel::Present {
                                state: t.attribute("state").map(str::to_string),
                            };
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(DomainXml {
        name,
        uuid,
        disks,
        nvram,
        efi,
        agent,
        interfaces,
    })
}

fn child_text(node: &Element, name: &str) -> Option<String> {
    node.child(name).map(|n| n.text.trim().to_string())
}

fn source_path(node: &Element) -> Option<PathBuf> {
    node.child("source")
        .and_then(|s| {
            s.attribute("file")
                .or_else(|| s.attribute("dev"))
                .or_else(|| s.attribute("name"))
        })
        .map(PathBuf::from)
}

fn parse_disk(disk: &Element) -> DiskDef {
    let mut backing = Vec::new();
    let mut layer = disk.child("backingStore");
    while let Some(b) = layer {
        if b.attribute("type").is_none() {
            break; // `<backingStore/>`: end of the chain
        }
        backing.push(BackingLayer {
            path: source_path(b),
            format: b
                .child("format")
                .and_then(|f| f.attribute("type").map(str::to_string)),
        });
        layer = b.child("backingStore");
    }
    DiskDef {
        device: disk.attribute("device").unwrap_or("disk").to_string(),
        kind: disk.attribute("type").unwrap_or("file").to_string(),
        target: disk
            .child("target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or_default()
            .to_string(),
        source: source_path(disk),
        format: disk
            .child("driver")
            .and_then(|d| d.attribute("type").map(str::to_string)),
        readonly: disk.child("readonly").is_some(),
        shareable: disk.child("shareable").is_some(),
        backing,
        mirror_ready: disk
            .child("mirror")
            .is_some_and(|m| m.attribute("ready") == Some("yes")),
    }
}

/// Escapes a string for an XML attribute value in single or double quotes.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) const LIVE: &str = r#"<domain type='qemu' id='4'>
  <name>vmb-multi</name>
  <uuid>0b5c3c1e-1111-2222-3333-444455556666</uuid>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/lab/multi-vda.qcow2.vmb-overlay-x.qcow2' index='3'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/lab/multi-vda.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/lab/multi-vdc.raw'/>
      <backingStore/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/lab/cd.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='x'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
</domain>"#;

    /// An inactive UEFI definition as a backup folder holds it.
    pub(crate) const DOMAIN: &str = r#"<domain type='qemu'>
  <name>web01</name>
  <uuid>6f1c1f0e-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install &amp; go.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <serial type='file'><source path='/var/log/web01.console.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
  </devices>
</domain>
"#;

    #[test]
    fn a_ready_mirror_is_seen_and_only_when_libvirt_says_ready() {
        let xml = |ready: &str| {
            format!(
                "<domain><name>x</name><uuid>u</uuid><devices>\
                 <disk type='file' device='disk'><driver type='qcow2'/>\
                 <source file='/i/a.qcow2.vmb-overlay-s.qcow2'/><target dev='vda'/>\
                 <mirror type='file' job='active-commit'{ready}><format type='qcow2'/>\
                 <source file='/i/a.qcow2'/></mirror></disk>\
                 <disk type='file' device='disk'><source file='/i/b.qcow2'/><target dev='vdb'/></disk>\
                 </devices></domain>"
            )
        };
        let ready = parse_domain(&xml(" ready='yes'")).unwrap();
        assert!(ready.disks[0].mirror_ready);
        assert!(!ready.disks[1].mirror_ready);
        let copying = parse_domain(&xml("")).unwrap();
        assert!(!copying.disks[0].mirror_ready);
    }

    #[test]
    fn disks_chain_and_agent_are_parsed() {
        let d = parse_domain(LIVE).unwrap();
        assert_eq!(d.name, "vmb-multi");
        assert_eq!(d.disks.len(), 4);
        let vda = &d.disks[0];
        assert_eq!(vda.target, "vda");
        assert_eq!(vda.format.as_deref(), Some("qcow2"));
        assert_eq!(vda.backing.len(), 1);
        assert_eq!(
            vda.backing[0].path.as_deref(),
            Some(Path::new("/lab/multi-vda.qcow2"))
        );
        assert!(d.disks[1].backing.is_empty());
        assert_eq!(d.disks[2].skip_reason().as_deref(), Some("cdrom device"));
        assert_eq!(d.disks[3].skip_reason().as_deref(), Some("network disk"));
        assert_eq!(d.disks[0].skip_reason(), None);
        assert!(d.agent.connected());
        assert!(!d.efi);
    }

    #[test]
    fn nvram_and_efi_and_missing_agent() {
        let xml = "<domain><name>u</name><uuid>1</uuid><os firmware='efi'><nvram>/v/u_VARS.fd</nvram></os><devices/></domain>";
        let d = parse_domain(xml).unwrap();
        assert!(d.efi);
        assert_eq!(d.nvram.as_deref(), Some(Path::new("/v/u_VARS.fd")));
        assert_eq!(d.agent, AgentChannel::Absent);
        assert!(!d.agent.connected());
        assert!(!d.agent.present());
        assert!(parse_domain("<network/>").is_err());
        assert!(parse_domain("<domain>").is_err());
    }

    /// Was restore's `inspect_reads_what_restore_needs`.
    #[test]
    fn parse_reads_what_restore_needs() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "web01");
        assert_eq!(d.uuid, "6f1c1f0e-0000-4000-8000-000000000001");
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some(Path::new("/var/lib/libvirt/images/web01.qcow2"))
        );
        assert_eq!(d.disks[1].device, "cdrom");
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some(Path::new("/iso/install & go.iso"))
        );
        assert_eq!(
            d.nvram.as_deref(),
            Some(Path::new("/var/lib/libvirt/qemu/nvram/web01_VARS.fd"))
        );
        assert!(d.efi, "a pflash loader boots UEFI");
        assert!(d.agent.present());
        assert_eq!(d.agent.state(), Some("connected"));
        assert_eq!(d.interfaces, 1);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse_domain("<domain></domain>").is_err(), "no name");
        assert!(parse_domain("<domain><name>a</domain>").is_err());
        assert!(parse_domain("").is_err());
    }
}
