//! Reading and rewriting libvirt domain XML for restore.
//!
//! The edit is a streaming pass with `quick-xml`: every event is copied to the output as it
//! came, except the few elements a restore must change. Compared with string surgery this
//! cannot break the document (attributes are re-escaped, elements stay balanced) and it does
//! not depend on how libvirt formats or quotes; compared with a DOM round-trip it keeps
//! everything it does not touch byte for byte (comments, ordering, unknown elements of newer
//! libvirt versions). A `<disk>` element is buffered whole, because its `<target dev>` (which
//! says which backup file it is) comes after its `<source>`.

use std::collections::BTreeMap;
use std::io::Cursor;

use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

/// Errors reading or writing domain XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// The XML does not parse.
    #[error("domain XML does not parse: {0}")]
    Parse(String),
    /// The XML has no `<name>` or is otherwise not a domain.
    #[error("not a libvirt domain XML: {0}")]
    NotADomain(&'static str),
}

impl From<quick_xml::Error> for XmlError {
    fn from(e: quick_xml::Error) -> Self {
        XmlError::Parse(e.to_string())
    }
}

impl From<quick_xml::events::attributes::AttrError> for XmlError {
    fn from(e: quick_xml::events::attributes::AttrError) -> Self {
        XmlError::Parse(e.to_string())
    }
}

/// A disk of a domain, as its XML declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDisk {
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `file`, `block`, `network`…
    pub kind: String,
    /// The guest device (`vda`).
    pub target: String,
    /// The source file or device, if any.
    pub source: Option<String>,
}

/// What a restore needs to know of a domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainXml {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: Option<String>,
    /// The disks.
    pub disks: Vec<XmlDisk>,
    /// `<os><nvram>` path, if any.
    pub nvram: Option<String>,
    /// `<os firmware='efi'>` (firmware auto-selection).
    pub firmware_efi: bool,
    /// A `<channel>` whose target is `org.qemu.guest_agent.0`.
    pub agent_channel: bool,
    /// `state` of the agent channel's target (`connected`), in live XML only.
    pub agent_state: Option<String>,
    /// Number of `<interface>` elements.
    pub interfaces: usize,
}

fn attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, XmlError> {
    Ok(match e.try_get_attribute(key)? {
        Some(a) => Some(a.unescape_value()?.into_owned()),
        None => None,
    })
}

fn local(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

/// Reads what a restore needs from a domain XML.
pub fn inspect(xml: &str) -> Result<DomainXml, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut out = DomainXml::default();
    let mut stack: Vec<String> = Vec::new();
    let mut disk: Option<XmlDisk> = None;
    loop {
        let event = reader.read_event()?;
        let (e, empty) = match &event {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            _ => (None, false),
        };
        if let Some(e) = e {
            let name = local(&e);
            let parent = stack.last().map(String::as_str);
            let depth = stack.len();
            match (name.as_str(), parent) {
                ("os", Some("domain")) if depth == 1 => {
                    out.firmware_efi = attr(&e, "firmware")?.as_deref() == Some("efi");
                }
                ("disk", Some("devices")) => {
                    disk = Some(XmlDisk {
                        device: attr(&e, "device")?.unwrap_or_else(|| "disk".into()),
                        kind: attr(&e, "type")?.unwrap_or_default(),
                        target: String::new(),
                        source: None,
                    });
                }
                ("source", Some("disk")) => {
                    if let Some(d) = disk.as_mut() {
                        d.source = attr(&e, "file")?.or(attr(&e, "dev")?).or(attr(&e, "name")?);
                    }
                }
                ("target", Some("disk")) => {
                    if let Some(d) = disk.as_mut() {
                        d.target = attr(&e, "dev")?.unwrap_or_default();
                    }
                }
                ("target", Some("channel"))
                    if attr(&e, "name")?.as_deref() == Some("org.qemu.guest_agent.0") =>
                {
                    out.agent_channel = true;
                    out.agent_state = attr(&e, "state")?;
                }
                ("interface", Some("devices")) => out.interfaces += 1,
                _ => {}
            }
            if empty {
                if name == "disk" {
                    out.disks.extend(disk.take());
                }
            } else {
                stack.push(name);
            }
            continue;
        }
        match event {
            Event::End(_) => {
                let name = stack.pop().unwrap_or_default();
                if name == "disk" {
                    out.disks.extend(disk.take());
                }
            }
            Event::Text(t) => {
                let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                let text = t.unescape()?.trim().to_string();
                match path.as_slice() {
                    ["domain", "name"] => out.name = text,
                    ["domain", "uuid"] => out.uuid = Some(text),
                    ["domain", "os", "nvram"] => out.nvram = Some(text),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.name.is_empty() {
        return Err(XmlError::NotADomain("no <name>"));
    }
    Ok(out)
}

/// The changes a restore makes to a domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XmlEdits {
    /// New `<name>`.
    pub name: Option<String>,
    /// New `<uuid>`.
    pub uuid: Option<String>,
    /// Give every `<interface>` a new random MAC address (locally administered, 52:54:00:…).
    pub new_macs: bool,
    /// Remove every `<interface>` (test restores run without network).
    pub strip_interfaces: bool,
    /// New source file per disk target device (`vda` → path); the disk becomes `type='file'`.
    pub disk_sources: BTreeMap<String, String>,
    /// Disks (by target device) to remove from the domain: writable disks that were not backed
    /// up must not be shared by a copy running beside the original.
    pub drop_disks: std::collections::BTreeSet<String>,
    /// New `<nvram>` path.
    pub nvram: Option<String>,
    /// When `<os firmware='efi'>` has no `<nvram>`, add one with this path.
    pub add_nvram: Option<String>,
    /// New path per file-backed `<serial>`/`<console>` source, by element index (`serial0`).
    pub char_files: BTreeMap<String, String>,
}

/// Applies `edits` to a domain XML; always drops `<backingStore>` (a restored image stands
/// alone). Everything else is copied unchanged.
pub fn rewrite(xml: &str, edits: &XmlEdits) -> Result<String, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut writer = Writer::new(Cursor::new(Vec::new()));
    let mut stack: Vec<String> = Vec::new();
    // Depth at which a skipped subtree started (backingStore, interface).
    let mut skipping: Option<usize> = None;
    // A <disk> being buffered, with its events.
    let mut disk_buf: Option<Vec<Event<'static>>> = None;
    let mut char_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut current_char: Option<String> = None;
    let mut saw_nvram = false;
    let w = |writer: &mut Writer<Cursor<Vec<u8>>>, ev: Event<'_>| -> Result<(), XmlError> {
        writer
            .write_event(ev)
            .map_err(|e| XmlError::Parse(e.to_string()))
    };
    loop {
        let event = reader.read_event()?.into_owned();
        if let Event::Eof = event {
            break;
        }
        // Skipped subtrees.
        if let Some(depth) = skipping {
            match &event {
                Event::Start(_) => stack.push(String::new()),
                Event::End(_) => {
                    stack.pop();
                    if stack.len() == depth {
                        skipping = None;
                    }
                }
                _ => {}
            }
            continue;
        }
        let parent = stack.last().cloned().unwrap_or_default();
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let name = local(e);
                let is_start = matches!(event, Event::Start(_));
                let drop_it = name == "backingStore"
                    || (name == "interface" && parent == "devices" && edits.strip_interfaces);
                if drop_it {
                    // Also drop the whitespace that preceded it when buffering a disk.
                    if is_start {
                        skipping = Some(stack.len());
                        stack.push(name);
                    }
                    continue;
                }
                let mut out_event = event.clone();
                if (name == "serial" || name == "console") && parent == "devices" {
                    let i = char_index.entry(name.clone()).or_insert(0);
                    let key = format!("{name}{i}");
                    *i += 1;
                    current_char = (attr(e, "type")?.as_deref() == Some("file")).then_some(key);
                }
                if name == "source" && (parent == "serial" || parent == "console") {
                    if let Some(path) = current_char.as_ref().and_then(|k| edits.char_files.get(k))
                    {
                        out_event = with_attr(e, "path", path, is_start)?;
                    }
                }
                if name == "mac" && parent == "interface" && edits.new_macs {
                    out_event = with_attr(e, "address", &random_mac(), is_start)?;
                }
                if name == "os" && stack.len() == 1 && is_start && edits.add_nvram.is_some() {
                    // Remember to add <nvram> before </os> if none is seen.
                    saw_nvram = false;
                }
                if name == "nvram" && parent == "os" {
                    saw_nvram = true;
                }
                if name == "disk" && parent == "devices" && is_start {
                    disk_buf = Some(vec![out_event]);
                    stack.push(name);
                    continue;
                }
                if let Some(buf) = disk_buf.as_mut() {
                    buf.push(out_event);
                } else {
                    w(&mut writer, out_event)?;
                }
                if is_start {
                    stack.push(name);
                }
            }
            Event::End(_) => {
                let name = stack.pop().unwrap_or_default();
                if name == "disk" && disk_buf.is_some() {
                    let mut buf = disk_buf.take().unwrap_or_default();
                    buf.push(event.clone());
                    for ev in rewrite_disk(buf, &edits.disk_sources, &edits.drop_disks)? {
                        w(&mut writer, ev)?;
                    }
                    continue;
                }
                if let Some(buf) = disk_buf.as_mut() {
                    buf.push(event);
                    continue;
                }
                if name == "os" && stack.len() == 1 && !saw_nvram {
                    if let Some(path) = &edits.add_nvram {
                        w(&mut writer, Event::Start(BytesStart::new("nvram")))?;
                        w(&mut writer, Event::Text(BytesText::new(path)))?;
                        w(
                            &mut writer,
                            Event::End(quick_xml::events::BytesEnd::new("nvram")),
                        )?;
                    }
                }
                if name == "serial" || name == "console" {
                    current_char = None;
                }
                w(&mut writer, event)?;
            }
            Event::Text(t) => {
                let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                let replacement = match path.as_slice() {
                    ["domain", "name"] => edits.name.as_deref(),
                    ["domain", "uuid"] => edits.uuid.as_deref(),
                    ["domain", "os", "nvram"] => edits.nvram.as_deref(),
                    _ => None,
                };
                let ev = match replacement {
                    Some(r) => Event::Text(BytesText::new(r).into_owned()),
                    None => Event::Text(t.clone()),
                };
                if let Some(buf) = disk_buf.as_mut() {
                    buf.push(ev);
                } else {
                    w(&mut writer, ev)?;
                }
            }
            _ => {
                if let Some(buf) = disk_buf.as_mut() {
                    buf.push(event);
                } else {
                    w(&mut writer, event)?;
                }
            }
        }
    }
    let bytes = writer.into_inner().into_inner();
    let text = String::from_utf8(bytes).map_err(|e| XmlError::Parse(e.to_string()))?;
    // Whitespace-only lines left where a subtree was dropped.
    let text: Vec<&str> = text
        .split('\n')
        .enumerate()
        .filter(|(i, l)| *i == 0 || !l.trim().is_empty())
        .map(|(_, l)| l)
        .collect();
    let mut text = text.join("\n");
    if xml.ends_with('\n') && !text.ends_with('\n') {
        text.push('\n');
    }
    inspect(&text)?;
    Ok(text)
}

/// Rewrites the buffered events of one `<disk>`: the source of a known target becomes the
/// new file (and the disk `type='file'`).
fn rewrite_disk(
    events: Vec<Event<'static>>,
    sources: &BTreeMap<String, String>,
    drop: &std::collections::BTreeSet<String>,
) -> Result<Vec<Event<'static>>, XmlError> {
    let mut target = None;
    for ev in &events {
        if let Event::Start(e) | Event::Empty(e) = ev {
            if local(e) == "target" {
                target = attr(e, "dev")?;
            }
        }
    }
    if target.as_ref().is_some_and(|t| drop.contains(t)) {
        return Ok(Vec::new());
    }
    let Some(new_source) = target.and_then(|t| sources.get(&t)) else {
        return Ok(events);
    };
    let mut out = Vec::with_capacity(events.len());
    let mut depth = 0usize;
    for (i, ev) in events.into_iter().enumerate() {
        match &ev {
            Event::Start(e) if i == 0 => {
                out.push(Event::Start(replace_attr(e, "type", "file")?));
                depth += 1;
                continue;
            }
            Event::Start(e) | Event::Empty(e) if depth == 1 && local(e) == "source" => {
                let mut n = BytesStart::new("source");
                n.push_attribute(("file", new_source.as_str()));
                for a in e.attributes() {
                    let a = a?;
                    // Keep options like startupPolicy; drop what described the old source.
                    if matches!(
                        a.key.as_ref(),
                        b"file" | b"dev" | b"name" | b"protocol" | b"pool" | b"volume" | b"dir"
                    ) {
                        continue;
                    }
                    n.push_attribute(a);
                }
                let is_start = matches!(ev, Event::Start(_));
                if is_start {
                    depth += 1;
                    out.push(Event::Start(n));
                } else {
                    out.push(Event::Empty(n));
                }
                continue;
            }
            Event::Start(_) => depth += 1,
            Event::End(_) => depth = depth.saturating_sub(1),
            _ => {}
        }
        out.push(ev);
    }
    Ok(out)
}

fn replace_attr(
    e: &BytesStart<'_>,
    key: &str,
    value: &str,
) -> Result<BytesStart<'static>, XmlError> {
    let mut n = BytesStart::new(local(e));
    let mut done = false;
    for a in e.attributes() {
        let a = a?;
        if a.key.as_ref() == key.as_bytes() {
            n.push_attribute((key, value));
            done = true;
        } else {
            n.push_attribute(a);
        }
    }
    if !done {
        n.push_attribute((key, value));
    }
    Ok(n)
}

fn with_attr(
    e: &BytesStart<'_>,
    key: &str,
    value: &str,
    is_start: bool,
) -> Result<Event<'static>, XmlError> {
    let n = replace_attr(e, key, value)?;
    Ok(if is_start {
        Event::Start(n)
    } else {
        Event::Empty(n)
    })
}

/// A random MAC in QEMU's locally administered range `52:54:00:xx:xx:xx`.
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

impl XmlError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            XmlError::Parse { .. } => ErrorKind::Corrupt,
            XmlError::NotADomain { .. } => ErrorKind::Corrupt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu'>
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
    fn inspect_reads_what_restore_needs() {
        let d = inspect(DOMAIN).unwrap();
        assert_eq!(d.name, "web01");
        assert_eq!(
            d.uuid.as_deref(),
            Some("6f1c1f0e-0000-4000-8000-000000000001")
        );
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some("/var/lib/libvirt/images/web01.qcow2")
        );
        assert_eq!(d.disks[1].device, "cdrom");
        assert_eq!(d.disks[1].source.as_deref(), Some("/iso/install & go.iso"));
        assert_eq!(
            d.nvram.as_deref(),
            Some("/var/lib/libvirt/qemu/nvram/web01_VARS.fd")
        );
        assert!(d.agent_channel);
        assert_eq!(d.agent_state.as_deref(), Some("connected"));
        assert_eq!(d.interfaces, 1);
    }

    #[test]
    fn rewrite_for_a_copy_beside_the_original() {
        let edits = XmlEdits {
            name: Some("web01-copy".into()),
            uuid: Some("11111111-2222-4333-8444-555555555555".into()),
            new_macs: true,
            disk_sources: BTreeMap::from([("vda".into(), "/restore/web01-copy-vda.qcow2".into())]),
            nvram: Some("/restore/web01-copy_VARS.fd".into()),
            char_files: BTreeMap::from([(
                "serial0".into(),
                "/restore/web01-copy.console.log".into(),
            )]),
            ..Default::default()
        };
        let out = rewrite(DOMAIN, &edits).unwrap();
        let d = inspect(&out).unwrap();
        assert_eq!(d.name, "web01-copy");
        assert_eq!(
            d.uuid.as_deref(),
            Some("11111111-2222-4333-8444-555555555555")
        );
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some("/restore/web01-copy-vda.qcow2")
        );
        // The cdrom is not ours to move; its escaped name survives.
        assert_eq!(d.disks[1].source.as_deref(), Some("/iso/install & go.iso"));
        assert!(out.contains("install &amp; go.iso"), "{out}");
        assert_eq!(d.nvram.as_deref(), Some("/restore/web01-copy_VARS.fd"));
        assert!(
            out.contains("template='/usr/share/OVMF/OVMF_VARS_4M.fd'")
                || out.contains("template=\"/usr/share/OVMF/OVMF_VARS_4M.fd\""),
            "{out}"
        );
        assert!(!out.contains("backingStore"), "{out}");
        assert!(!out.contains("base.qcow2"), "{out}");
        assert!(!out.contains("52:54:00:aa:bb:cc"), "{out}");
        assert!(out.contains("<mac address=\"52:54:00:"), "{out}");
        assert!(out.contains("/restore/web01-copy.console.log"), "{out}");
        assert!(!out.contains("/var/log/web01.console.log"), "{out}");
        assert_eq!(d.interfaces, 1);
        // Untouched parts are kept as they were.
        assert!(out.contains("<memory unit='KiB'>131072</memory>"), "{out}");
        assert!(out.contains("<target dev='vda' bus='virtio'/>"), "{out}");
        assert!(!out.lines().any(|l| l.trim().is_empty()), "{out}");
    }

    #[test]
    fn strip_interfaces_and_add_nvram_for_auto_firmware() {
        let xml = "<domain type='qemu'><name>a</name><os firmware='efi'><type>hvm</type></os><devices><interface type='network'><mac address='52:54:00:00:00:01'/></interface><disk type='block' device='disk'><source dev='/dev/vg/a'/><target dev='vda'/></disk><disk type='block' device='disk'><source dev='/dev/vg/shared'/><target dev='vdb'/></disk></devices></domain>";
        let edits = XmlEdits {
            strip_interfaces: true,
            drop_disks: ["vdb".to_string()].into(),
            add_nvram: Some("/r/a_VARS.fd".into()),
            disk_sources: BTreeMap::from([("vda".into(), "/r/a-vda.raw".into())]),
            ..Default::default()
        };
        let out = rewrite(xml, &edits).unwrap();
        let d = inspect(&out).unwrap();
        assert_eq!(d.interfaces, 0, "{out}");
        assert_eq!(d.nvram.as_deref(), Some("/r/a_VARS.fd"));
        assert_eq!(d.disks[0].kind, "file");
        assert_eq!(d.disks[0].source.as_deref(), Some("/r/a-vda.raw"));
        assert_eq!(d.disks.len(), 1, "the disk not backed up is gone: {out}");
        assert!(!out.contains("shared"), "{out}");
        assert!(
            !out.contains("dev=\"/dev/vg/a\"") && !out.contains("'/dev/vg/a'"),
            "{out}"
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert!(rewrite("<domain><name>a</domain>", &XmlEdits::default()).is_err());
        assert!(inspect("<domain></domain>").is_err());
    }
}
