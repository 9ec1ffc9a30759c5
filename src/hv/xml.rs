//! Parsing of domain XML: disks (with their live backing chain), NVRAM and the guest agent
//! channel; and the one edit the engine makes to an inactive definition (pointing a disk back
//! at its base image during an offline repair).

use std::path::PathBuf;

use roxmltree::{Document, Node};

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
    /// Whether the live XML says the agent is connected.
    pub fn connected(&self) -> bool {
        matches!(self, AgentChannel::Present { state: Some(s) } if s == "connected")
    }
}

/// What the engine needs from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: String,
    /// Every `<disk>`, in document order.
    pub disks: Vec<DiskDef>,
    /// `<os><nvram>` path, if any.
    pub nvram: Option<PathBuf>,
    /// `<os firmware='efi'>` or a pflash loader: the domain boots UEFI.
    pub efi: bool,
    /// The guest agent channel.
    pub agent: AgentChannel,
}

/// Parses a domain XML (live or inactive).
pub fn parse_domain(xml: &str) -> Result<DomainXml, String> {
    let doc = Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!(
            "root element is <{}>, not <domain>",
            root.tag_name().name()
        ));
    }
    let name = child_text(root, "name").unwrap_or_default();
    let uuid = child_text(root, "uuid").unwrap_or_default();
    let os = child(root, "os");
    let nvram = os
        .and_then(|os| child(os, "nvram"))
        .and_then(|n| n.text())
        .map(|t| PathBuf::from(t.trim()))
        .filter(|p| !p.as_os_str().is_empty());
    let efi = os.is_some_and(|os| {
        os.attribute("firmware") == Some("efi")
            || child(os, "loader").is_some_and(|l| l.attribute("type") == Some("pflash"))
    });
    let mut disks = Vec::new();
    let mut agent = AgentChannel::Absent;
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|n| n.is_element()) {
            match dev.tag_name().name() {
                "disk" => disks.push(parse_disk(dev)),
                "channel" => {
                    if let Some(t) = child(dev, "target") {
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
    })
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

fn child_text(node: Node, name: &str) -> Option<String> {
    child(node, name)
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
}

fn source_path(node: Node) -> Option<PathBuf> {
    child(node, "source")
        .and_then(|s| {
            s.attribute("file")
                .or_else(|| s.attribute("dev"))
                .or_else(|| s.attribute("name"))
        })
        .map(PathBuf::from)
}

fn parse_disk(disk: Node) -> DiskDef {
    let mut backing = Vec::new();
    let mut layer = child(disk, "backingStore");
    while let Some(b) = layer {
        if b.attribute("type").is_none() {
            break; // `<backingStore/>`: end of the chain
        }
        backing.push(BackingLayer {
            path: source_path(b),
            format: child(b, "format").and_then(|f| f.attribute("type").map(str::to_string)),
        });
        layer = child(b, "backingStore");
    }
    DiskDef {
        device: disk.attribute("device").unwrap_or("disk").to_string(),
        kind: disk.attribute("type").unwrap_or("file").to_string(),
        target: child(disk, "target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or_default()
            .to_string(),
        source: source_path(disk),
        format: child(disk, "driver").and_then(|d| d.attribute("type").map(str::to_string)),
        readonly: child(disk, "readonly").is_some(),
        shareable: child(disk, "shareable").is_some(),
        backing,
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

/// Rewrites the `<disk>` with target `target` of an inactive domain XML so that it points at
/// `base` (format `base_format`) again: the source file and driver type are replaced and any
/// `<backingStore>` under the disk is removed. The rest of the document is kept byte for byte.
pub fn point_disk_at(
    xml: &str,
    target: &str,
    base: &str,
    base_format: &str,
) -> Result<String, String> {
    let doc = Document::parse(xml).map_err(|e| e.to_string())?;
    let disk = doc
        .descendants()
        .find(|n| {
            n.is_element()
                && n.tag_name().name() == "disk"
                && child(*n, "target").and_then(|t| t.attribute("dev")) == Some(target)
        })
        .ok_or_else(|| format!("no disk with target {target:?}"))?;
    // (range, replacement) edits, applied from the end so ranges stay valid.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let source = child(disk, "source").ok_or_else(|| format!("disk {target} has no <source>"))?;
    let file_attr = source
        .attributes()
        .find(|a| a.name() == "file")
        .ok_or_else(|| format!("disk {target} is not a file disk"))?;
    edits.push((file_attr.range_value(), escape_attr(base)));
    if let Some(driver) = child(disk, "driver") {
        if let Some(t) = driver.attributes().find(|a| a.name() == "type") {
            edits.push((t.range_value(), escape_attr(base_format)));
        }
    }
    for b in disk
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "backingStore")
    {
        edits.push((b.range(), String::new()));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='4'>
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
            Some(std::path::Path::new("/lab/multi-vda.qcow2"))
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
        assert_eq!(
            d.nvram.as_deref(),
            Some(std::path::Path::new("/v/u_VARS.fd"))
        );
        assert_eq!(d.agent, AgentChannel::Absent);
        assert!(!d.agent.connected());
        assert!(parse_domain("<network/>").is_err());
        assert!(parse_domain("<domain>").is_err());
    }

    #[test]
    fn point_disk_at_restores_base_and_drops_backing_store() {
        let out = point_disk_at(LIVE, "vda", "/lab/multi-vda.qcow2", "qcow2").unwrap();
        let d = parse_domain(&out).unwrap();
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some(std::path::Path::new("/lab/multi-vda.qcow2"))
        );
        assert!(d.disks[0].backing.is_empty());
        assert!(!out.contains("vmb-overlay"));
        // The other disks are untouched, byte for byte.
        assert!(out.contains("<source file='/lab/multi-vdc.raw'/>"));
        let raw = point_disk_at(LIVE, "vdc", "/lab/o'dd&.raw", "raw").unwrap();
        assert_eq!(
            parse_domain(&raw).unwrap().disks[1].source.as_deref(),
            Some(std::path::Path::new("/lab/o'dd&.raw"))
        );
        assert!(point_disk_at(LIVE, "vdz", "/x", "raw").is_err());
    }
}
