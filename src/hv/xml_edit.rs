//! Editing libvirt domain XML: the rewrite of a restore (new name, UUID, MACs, disk, NVRAM and
//! console paths, without `<backingStore>`) and the offline repair's re-pointing of one disk at
//! its base image.
//!
//! Each edit is a streaming pass with `quick-xml` (see [`super::xml`] for why this library):
//! every event is copied to the output as it came, except the few elements the edit must
//! change. Compared with string surgery this cannot break the document (attributes are
//! re-escaped, elements stay balanced) and it does not depend on how libvirt formats or
//! quotes; compared with a DOM round-trip it keeps everything it does not touch byte for byte
//! (comments, ordering, unknown elements of newer libvirt versions). A `<disk>` element is
//! buffered whole, because its `<target dev>` (which says which disk it is) comes after its
//! `<source>`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use super::xml::{parse_domain, XmlError};

/// The changes a restore makes to a domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
    pub drop_disks: BTreeSet<String>,
    /// New `<nvram>` path.
    pub nvram: Option<String>,
    /// When `<os firmware='efi'>` has no `<nvram>`, add one with this path.
    pub add_nvram: Option<String>,
    /// New path per file-backed `<serial>`/`<console>` source, by element index (`serial0`).
    pub char_files: BTreeMap<String, String>,
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

type Out = Writer<Cursor<Vec<u8>>>;

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
    let w = |writer: &mut Out, ev: Event<'_>| -> Result<(), XmlError> {
        writer.write_event(ev)?;
        Ok(())
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
                        w(&mut writer, Event::End(BytesEnd::new("nvram")))?;
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
    let text = String::from_utf8(writer.into_inner().into_inner())?;
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
    parse_domain(&text)?;
    Ok(text)
}

/// The `dev` of the `<target>` among the buffered events of one `<disk>`.
fn disk_target(events: &[Event<'static>]) -> Result<Option<String>, XmlError> {
    let mut target = None;
    for ev in events {
        if let Event::Start(e) | Event::Empty(e) = ev {
            if local(e) == "target" {
                target = attr(e, "dev")?;
            }
        }
    }
    Ok(target)
}

/// Rewrites the buffered events of one `<disk>`: the source of a known target becomes the
/// new file (and the disk `type='file'`).
fn rewrite_disk(
    events: Vec<Event<'static>>,
    sources: &BTreeMap<String, String>,
    drop: &BTreeSet<String>,
) -> Result<Vec<Event<'static>>, XmlError> {
    let target = disk_target(&events)?;
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
                    copy_attr(&mut n, a)?;
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

/// Copies an attribute read from the input to `n`. Its raw (still escaped) value is kept as
/// it was, unless it holds a `"` (legal inside single quotes): the writer always uses double
/// quotes, so such a value is unescaped and written escaped again.
fn copy_attr(n: &mut BytesStart<'static>, a: Attribute<'_>) -> Result<(), XmlError> {
    if a.value.contains(&b'"') {
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value()?.into_owned();
        n.push_attribute((key.as_str(), value.as_str()));
    } else {
        n.push_attribute(a);
    }
    Ok(())
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
            copy_attr(&mut n, a)?;
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

/// Rewrites the `<disk>` with target `target` of an inactive domain XML so that it points at
/// `base` (format `base_format`) again: the source file and driver type are replaced and any
/// `<backingStore>` under the disk is removed. The rest of the document is kept byte for byte.
pub fn point_disk_at(
    xml: &str,
    target: &str,
    base: &str,
    base_format: &str,
) -> Result<String, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut writer = Writer::new(Cursor::new(Vec::new()));
    let mut stack: Vec<String> = Vec::new();
    // The buffered events of a <disk>, and the depth it started at.
    let mut disk: Option<(Vec<Event<'static>>, usize)> = None;
    let mut found = false;
    loop {
        let event = reader.read_event()?.into_owned();
        match &event {
            Event::Eof => break,
            Event::Start(e) => {
                let name = local(e);
                if disk.is_none()
                    && name == "disk"
                    && stack.last().map(String::as_str) == Some("devices")
                {
                    disk = Some((Vec::new(), stack.len()));
                }
                stack.push(name);
            }
            Event::End(_) => {
                stack.pop();
            }
            _ => {}
        }
        let Some((buf, depth)) = disk.as_mut() else {
            writer.write_event(event)?;
            continue;
        };
        let closes = matches!(event, Event::End(_)) && stack.len() == *depth;
        buf.push(event);
        if closes {
            let (buf, _) = disk.take().unwrap_or_default();
            let events = if disk_target(&buf)?.as_deref() == Some(target) {
                found = true;
                repoint_disk(buf, target, base, base_format)?
            } else {
                buf
            };
            for ev in events {
                writer.write_event(ev)?;
            }
        }
    }
    if !found {
        return Err(XmlError::Disk {
            target: target.to_string(),
            problem: "no such disk",
        });
    }
    Ok(String::from_utf8(writer.into_inner().into_inner())?)
}

/// The events of one `<disk>` with its `<source file>` on `base`, its `<driver type>` on
/// `base_format` and no `<backingStore>`.
fn repoint_disk(
    events: Vec<Event<'static>>,
    target: &str,
    base: &str,
    base_format: &str,
) -> Result<Vec<Event<'static>>, XmlError> {
    let disk_err = |problem| XmlError::Disk {
        target: target.to_string(),
        problem,
    };
    let mut out = Vec::with_capacity(events.len());
    let mut depth = 0usize;
    // Depth at which a skipped <backingStore> started.
    let mut skipping: Option<usize> = None;
    let mut saw_source = false;
    for ev in events {
        if let Some(d) = skipping {
            match &ev {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == d {
                        skipping = None;
                    }
                }
                _ => {}
            }
            continue;
        }
        let edited = match &ev {
            Event::Start(e) | Event::Empty(e) if depth == 1 => {
                let is_start = matches!(ev, Event::Start(_));
                match local(e).as_str() {
                    "backingStore" => {
                        if is_start {
                            skipping = Some(depth);
                            depth += 1;
                        }
                        continue;
                    }
                    "source" => {
                        saw_source = true;
                        if e.try_get_attribute("file")?.is_none() {
                            return Err(disk_err("not a file disk"));
                        }
                        Some(with_attr(e, "file", base, is_start)?)
                    }
                    "driver" if e.try_get_attribute("type")?.is_some() => {
                        Some(with_attr(e, "type", base_format, is_start)?)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match &ev {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth = depth.saturating_sub(1),
            _ => {}
        }
        out.push(edited.unwrap_or(ev));
    }
    if !saw_source {
        return Err(disk_err("no <source>"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::xml::tests::{DOMAIN, LIVE};
    use std::path::Path;

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
        let d = parse_domain(&out).unwrap();
        assert_eq!(d.name, "web01-copy");
        assert_eq!(d.uuid, "11111111-2222-4333-8444-555555555555");
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some(Path::new("/restore/web01-copy-vda.qcow2"))
        );
        // The cdrom is not ours to move; its escaped name survives.
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some(Path::new("/iso/install & go.iso"))
        );
        assert!(out.contains("install &amp; go.iso"), "{out}");
        assert_eq!(
            d.nvram.as_deref(),
            Some(Path::new("/restore/web01-copy_VARS.fd"))
        );
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

    /// The exact output for the fixture, as the restore wrote it before the XML code moved
    /// into `hv` (only the random MAC differs from run to run).
    #[test]
    fn rewrite_output_is_unchanged() {
        let edits = XmlEdits {
            name: Some("web01-copy".into()),
            uuid: Some("11111111-2222-4333-8444-555555555555".into()),
            disk_sources: BTreeMap::from([("vda".into(), "/restore/web01-copy-vda.qcow2".into())]),
            nvram: Some("/restore/web01-copy_VARS.fd".into()),
            char_files: BTreeMap::from([(
                "serial0".into(),
                "/restore/web01-copy.console.log".into(),
            )]),
            ..Default::default()
        };
        let expected = r#"<domain type='qemu'>
  <name>web01-copy</name>
  <uuid>11111111-2222-4333-8444-555555555555</uuid>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/restore/web01-copy_VARS.fd</nvram>
  </os>
  <devices>
    <disk type="file" device="disk">
      <driver name='qemu' type='qcow2'/>
      <source file="/restore/web01-copy-vda.qcow2"/>
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
    <serial type='file'><source path="/restore/web01-copy.console.log"/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
  </devices>
</domain>
"#;
        assert_eq!(rewrite(DOMAIN, &edits).unwrap(), expected);

        let xml = "<domain type='qemu'><name>a</name><os firmware='efi'><type>hvm</type></os><devices><interface type='network'><mac address='52:54:00:00:00:01'/></interface><disk type='block' device='disk'><source dev='/dev/vg/a' startupPolicy='optional'/><target dev='vda'/></disk><disk type='block' device='disk'><source dev='/dev/vg/shared'/><target dev='vdb'/></disk></devices></domain>";
        let edits = XmlEdits {
            strip_interfaces: true,
            drop_disks: ["vdb".to_string()].into(),
            add_nvram: Some("/r/a_VARS.fd".into()),
            disk_sources: BTreeMap::from([("vda".into(), "/r/a-vda.raw".into())]),
            ..Default::default()
        };
        let expected = r#"<domain type='qemu'><name>a</name><os firmware='efi'><type>hvm</type><nvram>/r/a_VARS.fd</nvram></os><devices><disk type="file" device="disk"><source file="/r/a-vda.raw" startupPolicy="optional"/><target dev='vda'/></disk></devices></domain>"#;
        assert_eq!(rewrite(xml, &edits).unwrap(), expected);
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
        let d = parse_domain(&out).unwrap();
        assert_eq!(d.interfaces, 0, "{out}");
        assert_eq!(d.nvram.as_deref(), Some(Path::new("/r/a_VARS.fd")));
        assert_eq!(d.disks[0].kind, "file");
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some(Path::new("/r/a-vda.raw"))
        );
        assert_eq!(d.disks.len(), 1, "the disk not backed up is gone: {out}");
        assert!(!out.contains("shared"), "{out}");
        assert!(
            !out.contains("dev=\"/dev/vg/a\"") && !out.contains("'/dev/vg/a'"),
            "{out}"
        );
    }

    #[test]
    fn a_double_quote_inside_single_quotes_stays_well_formed() {
        let xml = "<domain><name>a</name><devices><disk type='file'><source file='/a' startupPolicy='x\"y'/><target dev='vda'/></disk></devices></domain>";
        let edits = XmlEdits {
            disk_sources: BTreeMap::from([("vda".into(), "/b".into())]),
            ..Default::default()
        };
        let out = rewrite(xml, &edits).unwrap();
        assert!(out.contains("startupPolicy=\"x&quot;y\""), "{out}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(rewrite("<domain><name>a</domain>", &XmlEdits::default()).is_err());
    }

    #[test]
    fn point_disk_at_restores_base_and_drops_backing_store() {
        let out = point_disk_at(LIVE, "vda", "/lab/multi-vda.qcow2", "qcow2").unwrap();
        let d = parse_domain(&out).unwrap();
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some(Path::new("/lab/multi-vda.qcow2"))
        );
        assert!(d.disks[0].backing.is_empty());
        assert!(!out.contains("vmb-overlay"));
        // The other disks are untouched, byte for byte.
        assert!(out.contains("<source file='/lab/multi-vdc.raw'/>"));
        let raw = point_disk_at(LIVE, "vdc", "/lab/o'dd&.raw", "raw").unwrap();
        assert_eq!(
            parse_domain(&raw).unwrap().disks[1].source.as_deref(),
            Some(Path::new("/lab/o'dd&.raw"))
        );
        assert_eq!(
            parse_domain(&raw).unwrap().disks[1].format.as_deref(),
            Some("raw")
        );
        assert!(point_disk_at(LIVE, "vdz", "/x", "raw").is_err());
        // A network disk has no file to point elsewhere.
        assert!(point_disk_at(LIVE, "vdd", "/x", "raw").is_err());
        // Everything outside the edited disk is kept as it was.
        let before = LIVE.split("<disk").next().unwrap();
        assert!(out.starts_with(before));
        let after = LIVE.split("</disk>").nth(1).unwrap();
        assert!(out.contains(after));
    }
}
