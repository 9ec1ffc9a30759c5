//! Exposing a disk image of a backup as a block device on this host, without the `nbd` kernel
//! module: `qemu-storage-daemon` opens the image (and its backing layers) read-only and exports
//! the guest-visible disk as a FUSE file, either as it is (read-only) or under a throwaway
//! qcow2 overlay outside the backup (writable: what a journal replay writes lands there); a
//! loop device (`losetup -P`, read-only for the plain export) turns that file into a block
//! device with its partitions; the guest's filesystems are then mounted read-only, their
//! journals replayed into the overlay, or left unreplayed (`noload` / `norecovery`) without one.
//!
//! LVM: this kernel has no device-mapper, so logical volumes cannot be activated. Their layout
//! is read from the LVM metadata (`lvs`/`pvs --devices`, read-only, nothing activated, no host
//! VG touched) and each linear logical volume lying in one run of extents on one physical volume
//! gets a read-only loop device at its offset. Other layouts are reported, not mounted.
//!
//! Every step is a small function that can be undone on its own, so the engine can record what
//! it did and tear down what a killed command left ([`crate::engine::mount`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

/// Errors of the export helpers; each names the tool or the device.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A tool could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed: {message}")]
    Failed {
        /// The program and what it did.
        tool: String,
        /// Its standard error (trimmed).
        message: String,
    },
    /// Something did not appear in time.
    #[error("{what} did not appear within {seconds} s")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound.
        seconds: u64,
    },
}

impl ExportError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ExportError::Spawn { .. } | ExportError::Failed { .. } => ErrorKind::Tool,
            ExportError::Timeout { .. } => ErrorKind::Tool,
        }
    }
}

/// Runs a tool, returning its standard output when it succeeds.
fn run(tool: &str, args: &[&str]) -> Result<String, ExportError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| ExportError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(ExportError::Failed {
            tool: format!("{tool} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One image of a disk's chain, as `qemu-storage-daemon` opens it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// The file to open (read-only).
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// The `qemu-storage-daemon` arguments exporting `layers` (top first) as a FUSE file at
/// `export`. The chain is given explicitly (`backing` of each qcow2 node), so the headers'
/// backing names are never followed, and opened read-only. Without `overlay` the export is
/// read-only; with it, the export is the qcow2 `overlay` (made by [`create_overlay`], its
/// backing node given explicitly as the chain's top), writable: writes land in the overlay only.
pub fn qsd_args(
    layers: &[Layer],
    overlay: Option<&Path>,
    export: &Path,
    pidfile: &Path,
) -> Vec<String> {
    let mut args = chain_nodes("", layers);
    let node = match overlay {
        None => "n0",
        Some(ov) => {
            args.push("--blockdev".to_string());
            args.push(
                json!({"driver": "file", "node-name": "of",
                       "filename": ov.to_string_lossy()})
                .to_string(),
            );
            args.push("--blockdev".to_string());
            args.push(
                json!({"driver": "qcow2", "node-name": "ov", "file": "of", "backing": "n0"})
                    .to_string(),
            );
            "ov"
        }
    };
    args.push("--export".to_string());
    args.push(
        json!({"type": "fuse", "id": "e", "node-name": node,
               "mountpoint": export.to_string_lossy(), "writable": overlay.is_some()})
        .to_string(),
    );
    args.push("--daemonize".to_string());
    args.push("--pidfile".to_string());
    args.push(pidfile.to_string_lossy().into_owned());
    args
}

/// The `--blockdev` arguments opening `layers` (top first) read-only, nodes named
/// `{prefix}f{i}` (file) and `{prefix}n{i}` (format; the top is `{prefix}n0`), each qcow2
/// node's backing given explicitly.
fn chain_nodes(prefix: &str, layers: &[Layer]) -> Vec<String> {
    let mut args = Vec::new();
    let n = layers.len();
    for (i, layer) in layers.iter().enumerate().rev() {
        args.push("--blockdev".to_string());
        args.push(
            json!({"driver": "file", "node-name": format!("{prefix}f{i}"),
                   "filename": layer.path.to_string_lossy(), "read-only": true,
                   "locking": "off"})
            .to_string(),
        );
        let mut node = json!({"driver": layer.format, "node-name": format!("{prefix}n{i}"),
                              "file": format!("{prefix}f{i}"), "read-only": true});
        if layer.format == "qcow2" {
            node["backing"] = if i + 1 < n {
                json!(format!("{prefix}n{}", i + 1))
            } else {
                serde_json::Value::Null
            };
        }
        args.push("--blockdev".to_string());
        args.push(node.to_string());
    }
    args
}

/// The `nbd+unix` URL of export `name` on `socket` (a qcow2 overlay's backing file name).
pub fn nbd_url(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// The `qemu-storage-daemon` arguments exporting each disk's chain (export name, layers top
/// first) read-only over NBD on the unix socket `socket` (an instant restore's backing files:
/// the backup is opened read-only by root, QEMU reads it through the socket).
pub fn qsd_nbd_args(disks: &[(String, Vec<Layer>)], socket: &Path, pidfile: &Path) -> Vec<String> {
    let mut args = Vec::new();
    for (d, (_, layers)) in disks.iter().enumerate() {
        args.extend(chain_nodes(&format!("d{d}"), layers));
    }
    args.push("--nbd-server".to_string());
    args.push(json!({"addr": {"type": "unix", "path": socket.to_string_lossy()}}).to_string());
    for (d, (name, _)) in disks.iter().enumerate() {
        args.push("--export".to_string());
        args.push(
            json!({"type": "nbd", "id": format!("e{d}"), "node-name": format!("d{d}n0"),
                   "name": name, "writable": false})
            .to_string(),
        );
    }
    args.push("--daemonize".to_string());
    args.push("--pidfile".to_string());
    args.push(pidfile.to_string_lossy().into_owned());
    args
}

/// Starts `qemu-storage-daemon` with [`qsd_nbd_args`] (daemonized: it returns once the socket
/// listens) and returns its pid.
pub fn start_qsd_nbd(
    disks: &[(String, Vec<Layer>)],
    socket: &Path,
    pidfile: &Path,
) -> Result<u32, ExportError> {
    let args = qsd_nbd_args(disks, socket, pidfile);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-storage-daemon", &refs)?;
    read_pid(pidfile).ok_or_else(|| ExportError::Failed {
        tool: "qemu-storage-daemon".into(),
        message: format!("no pid in {}", pidfile.display()),
    })
}

/// Creates the throwaway qcow2 overlay `path` of `virtual_size` bytes, with no backing file
/// named in its header ([`qsd_args`] gives the backing node explicitly).
pub fn create_overlay(path: &Path, virtual_size: u64) -> Result<(), ExportError> {
    let (p, size) = (path.to_string_lossy(), virtual_size.to_string());
    run("qemu-img", &["create", "-q", "-f", "qcow2", &p, &size])?;
    Ok(())
}

/// Starts `qemu-storage-daemon` with [`qsd_args`] (daemonized: it returns once the export is in
/// place) and returns its pid. `export` must be an existing regular file.
pub fn start_qsd(
    layers: &[Layer],
    overlay: Option<&Path>,
    export: &Path,
    pidfile: &Path,
) -> Result<u32, ExportError> {
    let args = qsd_args(layers, overlay, export, pidfile);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-storage-daemon", &refs)?;
    read_pid(pidfile).ok_or_else(|| ExportError::Failed {
        tool: "qemu-storage-daemon".into(),
        message: format!("no pid in {}", pidfile.display()),
    })
}

/// The pid written in a pid file.
pub fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Attaches `file` to a new loop device, partitions scanned, read-only unless `writable`;
/// returns `/dev/loopN`.
pub fn attach_loop(file: &Path, writable: bool) -> Result<String, ExportError> {
    let f = file.to_string_lossy();
    let mut args = vec!["-f", "--show", "-P"];
    if !writable {
        args.push("-r");
    }
    args.push(&f);
    Ok(run("losetup", &args)?.trim().to_string())
}

/// Attaches a slice of `device` (bytes `offset .. offset+size`) to a new loop device, read-only
/// unless `writable`.
pub fn attach_slice(
    device: &str,
    offset: u64,
    size: u64,
    writable: bool,
) -> Result<String, ExportError> {
    let (o, s) = (offset.to_string(), size.to_string());
    let mut args = vec!["-f", "--show", "-o", &o, "--sizelimit", &s];
    if !writable {
        args.push("-r");
    }
    args.push(device);
    Ok(run("losetup", &args)?.trim().to_string())
}

/// Detaches a loop device (an already detached one is not an error).
pub fn detach_loop(dev: &str) -> Result<(), ExportError> {
    match run("losetup", &["-d", dev]) {
        Ok(_) => Ok(()),
        Err(ExportError::Failed { message, .. })
            if message.contains("No such device") || message.contains("No such file") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The loop devices whose backing file is `file`, or whose backing device is `device`.
pub fn loops_backed_by(file: &str) -> Vec<String> {
    run("losetup", &["-n", "-O", "NAME", "-j", file])
        .map(|o| {
            o.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The partitions of a loop device (`/dev/loopNpM`), in order; waits up to 5 s for the
/// kernel to create their nodes.
pub fn partitions(dev: &str) -> Vec<String> {
    let name = dev.trim_start_matches("/dev/");
    let sys = Path::new("/sys/block").join(name);
    let scanned = |sys: &Path| {
        std::fs::read_dir(sys).is_ok_and(|rd| {
            rd.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}p"))
            })
        })
    };
    if !scanned(&sys) && has_partition_table(dev) {
        // This kernel's partition scan may not know the table (GPT): add them from user space.
        let _ = run("partx", &["-a", dev]);
    }
    let mut parts: Vec<(u32, String)> = std::fs::read_dir(&sys)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let idx = n.strip_prefix(&format!("{name}p"))?.parse().ok()?;
                    Some((idx, format!("/dev/{n}")))
                })
                .collect()
        })
        .unwrap_or_default();
    parts.sort();
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, p) in &parts {
        while !Path::new(p).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    parts.into_iter().map(|(_, p)| p).collect()
}

/// What `blkid` finds on a device: `TYPE` (`ext4`, `xfs`, `LVM2_member`, `swap`…), empty when
/// nothing is recognised (a partition table alone, or unformatted space).
pub fn probe(dev: &str) -> Result<String, ExportError> {
    match run("blkid", &["-p", "-o", "value", "-s", "TYPE", dev]) {
        Ok(o) => Ok(o.trim().to_string()),
        // blkid exits 2 when it recognises nothing.
        Err(ExportError::Failed { message, .. }) if message.is_empty() => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Whether a device holds a partition table.
pub fn has_partition_table(dev: &str) -> bool {
    run("blkid", &["-p", "-o", "value", "-s", "PTTYPE", dev])
        .map(|o| !o.trim().is_empty())
        .unwrap_or(false)
}

/// A logical volume mappable as a loop slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalVolume {
    /// Volume group name.
    pub vg: String,
    /// Logical volume name.
    pub lv: String,
    /// The physical volume device it lies on.
    pub pv: String,
    /// Byte offset on that device.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// An LVM option set reading only `devices` (never the host's own disks), taking no lock and
/// writing nothing.
fn lvm_args<'a>(cmd: &'a str, devices: &'a str) -> Vec<&'a str> {
    vec![
        cmd,
        "--devices",
        devices,
        "--config",
        "global { activation = 0 }",
        "--readonly",
        "--noheadings",
        "--nosuffix",
        "--units",
        "b",
        "--separator",
        "|",
    ]
}

/// Volumes found but not mappable: (`vg-lv`, why not).
pub type Unmappable = Vec<(String, String)>;

/// Reads the logical volumes on the physical volumes `pvs` (read-only metadata scan, nothing
/// activated). Returns the mappable ones and, for the others, why not.
pub fn logical_volumes(pvs: &[String]) -> Result<(Vec<LogicalVolume>, Unmappable), ExportError> {
    let devices = pvs.join(",");
    let mut a = lvm_args("pvs", &devices);
    a.extend(["-o", "pv_name,pe_start,vg_extent_size"]);
    let mut pe_start = std::collections::HashMap::new();
    let mut extent = 0u64;
    for line in run("lvm", &a)?.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() == 3 {
            pe_start.insert(f[0].to_string(), f[1].parse::<u64>().unwrap_or(0));
            extent = f[2].parse().unwrap_or(0);
        }
    }
    let mut a = lvm_args("lvs", &devices);
    a.extend([
        "-o",
        "vg_name,lv_name,segtype,seg_count,seg_pe_ranges,lv_size",
        "-a",
    ]);
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for line in run("lvm", &a)?.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() != 6 {
            continue;
        }
        let (vg, lv, segtype, segs, ranges, size) = (f[0], f[1], f[2], f[3], f[4], f[5]);
        let name = format!("{vg}-{lv}");
        if lv.starts_with('[') {
            continue; // hidden sub-volume
        }
        if segtype != "linear" || segs != "1" {
            skipped.push((
                name,
                format!("{segtype} volume with {segs} segment(s): only single-run linear volumes can be mapped without device-mapper"),
            ));
            continue;
        }
        // "/dev/loop5p2:0-255"
        let parsed = ranges.rsplit_once(':').and_then(|(pv, r)| {
            let (a, b) = r.split_once('-')?;
            Some((
                pv.to_string(),
                a.parse::<u64>().ok()?,
                b.parse::<u64>().ok()?,
            ))
        });
        let (Some((pv, first, last)), true) = (parsed, extent > 0) else {
            skipped.push((name, format!("cannot read its extents ({ranges:?})")));
            continue;
        };
        let start = pe_start.get(&pv).copied().unwrap_or(0);
        let size_b = size.parse::<u64>().unwrap_or((last - first + 1) * extent);
        ok.push(LogicalVolume {
            vg: vg.to_string(),
            lv: lv.to_string(),
            pv,
            offset: start + first * extent,
            size: size_b,
        });
    }
    Ok((ok, skipped))
}

/// The read-only mount options for a filesystem type. With `replay` (a writable device under a
/// throwaway overlay) the kernel replays an ext3/4 journal or an XFS log into the device as it
/// mounts; without it the journal is left unreplayed (`noload` / `norecovery`: the device is
/// read-only). XFS UUIDs may equal a mounted filesystem's.
pub fn mount_options(fstype: &str, replay: bool) -> &'static str {
    match (fstype, replay) {
        ("ext3" | "ext4", false) => "ro,noload,nodev,nosuid,noexec",
        ("xfs", false) => "ro,norecovery,nouuid,nodev,nosuid,noexec",
        ("xfs", true) => "ro,nouuid,nodev,nosuid,noexec",
        _ => "ro,nodev,nosuid,noexec",
    }
}

/// Whether a filesystem type is one we mount.
pub fn mountable(fstype: &str) -> bool {
    matches!(
        fstype,
        "ext2" | "ext3" | "ext4" | "xfs" | "vfat" | "btrfs" | "ntfs" | "iso9660"
    )
}

/// Mounts `dev` read-only at `dir`, its journal replayed when `replay` ([`mount_options`]).
pub fn mount_ro(dev: &str, fstype: &str, dir: &Path, replay: bool) -> Result<(), ExportError> {
    let d = dir.to_string_lossy();
    run(
        "mount",
        &["-t", fstype, "-o", mount_options(fstype, replay), dev, &d],
    )?;
    Ok(())
}

/// Unmounts `dir` (not mounted is not an error); `lazy` detaches a busy or dead mount.
pub fn unmount(dir: &Path, lazy: bool) -> Result<(), ExportError> {
    if !is_mounted(dir) {
        return Ok(());
    }
    let d = dir.to_string_lossy();
    let mut args = vec![];
    if lazy {
        args.push("-l");
    }
    args.push(&d);
    run("umount", &args)?;
    Ok(())
}

/// Decodes the octal escapes of `/proc/self/mountinfo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of this host (`/proc/self/mountinfo`), with their sources.
pub fn mounts() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            t.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    let sep = f.iter().position(|x| *x == "-")?;
                    Some((
                        PathBuf::from(unescape(f.get(4)?)),
                        unescape(f.get(sep + 2)?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == path)
}

/// Waits until something is mounted at `path`.
pub fn wait_mounted(path: &Path, bound: Duration) -> Result<(), ExportError> {
    let deadline = Instant::now() + bound;
    while !is_mounted(path) {
        if Instant::now() > deadline {
            return Err(ExportError::Timeout {
                what: format!("a mount on {}", path.display()),
                seconds: bound.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether process `pid` is alive and its command line mentions `hint` (so a recycled pid is
/// never taken for ours).
pub fn process_matches(pid: u32, hint: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(hint))
        .unwrap_or(false)
}

/// Stops process `pid` if it is ours (`hint` in its command line): SIGTERM, then SIGKILL after
/// `grace`. Returns whether it was running.
pub fn stop_process(pid: u32, hint: &str, grace: Duration) -> bool {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !process_matches(pid, hint) {
        return false;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while process_matches(pid, hint) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_matches(pid, hint) {
        let _ = kill(p, Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_is_given_explicitly_and_read_only() {
        let layers = [
            Layer {
                path: "/b/vm-vda.qcow2".into(),
                format: "qcow2".into(),
            },
            Layer {
                path: "/b/vm-vda.backing-1.raw".into(),
                format: "raw".into(),
            },
        ];
        let args = qsd_args(
            &layers,
            None,
            Path::new("/w/disk.raw"),
            Path::new("/w/qsd.pid"),
        );
        let text = args.join(" ");
        assert_eq!(text.matches("\"read-only\":true").count(), 4);
        assert!(text.contains("\"backing\":\"n1\""));
        assert!(text.contains("\"writable\":false"));
        // The bottom layer is declared before the node that uses it.
        let f1 = text.find("\"node-name\":\"n1\"").unwrap();
        let n0 = text.find("\"node-name\":\"n0\"").unwrap();
        assert!(f1 < n0);
    }

    #[test]
    fn an_overlay_is_the_only_writable_node_and_the_export() {
        let layers = [Layer {
            path: "/b/vm-vda.qcow2".into(),
            format: "qcow2".into(),
        }];
        let args = qsd_args(
            &layers,
            Some(Path::new("/j/mounts/m/overlay.qcow2")),
            Path::new("/w/disk.raw"),
            Path::new("/w/qsd.pid"),
        );
        let text = args.join(" ");
        // The backup's nodes stay read-only; the overlay stands on the chain's top.
        assert_eq!(text.matches("\"read-only\":true").count(), 2);
        assert!(text.contains("\"filename\":\"/j/mounts/m/overlay.qcow2\""));
        assert!(text.contains("\"backing\":\"n0\""));
        let i = args.iter().position(|a| a == "--export").unwrap();
        let export: serde_json::Value = serde_json::from_str(&args[i + 1]).unwrap();
        assert_eq!(export["node-name"], "ov");
        assert_eq!(export["writable"], true);
        let n0 = text.find("\"node-name\":\"n0\"").unwrap();
        let ov = text.find("\"node-name\":\"ov\"").unwrap();
        assert!(n0 < ov);
    }

    #[test]
    fn mountinfo_escapes_decode() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn journals_are_replayed_only_on_request() {
        assert!(mount_options("ext4", false).contains("noload"));
        assert!(mount_options("xfs", false).contains("norecovery"));
        assert!(!mount_options("ext4", true).contains("noload"));
        assert!(!mount_options("xfs", true).contains("norecovery"));
        assert!(mount_options("xfs", true).contains("nouuid"));
        for fs in ["ext4", "xfs", "vfat"] {
            for replay in [false, true] {
                assert!(mount_options(fs, replay).starts_with("ro,"));
            }
        }
    }
}
