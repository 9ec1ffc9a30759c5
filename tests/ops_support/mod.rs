//! Helpers shared by the ops tests: backup folders built by hand (real files, real metadata),
//! the `vm-backup` binary, and a recording HTTP server on loopback.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_backup::copier::ChunkManifest;
use vm_backup::format::metadata::{BackupMetadata, DiskRecord, Method, SCHEMA_VERSION};
use vm_backup::ExitStatus;

/// The `vm-backup` binary built for the tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vm-backup"))
}

/// Runs the binary with args and returns its output.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run vm-backup")
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Metadata of a backup with no disks, for tests of what reads metadata only.
pub fn metadata(host: &str, vm: &str, stamp: &str, result: ExitStatus) -> BackupMetadata {
    let t = vm_backup::format::layout::parse_stamp(stamp).unwrap();
    BackupMetadata {
        schema_version: SCHEMA_VERSION,
        tool_version: vm_backup::VERSION.into(),
        vm_name: vm.into(),
        vm_uuid: "6f1c1f0e-0000-4000-8000-000000000001".into(),
        host: host.into(),
        stamp: stamp.into(),
        method_requested: Method::Auto,
        method: Method::Quiesce,
        method_note: None,
        started_at: t.to_rfc3339(),
        finished_at: (t + chrono::Duration::seconds(42)).to_rfc3339(),
        frozen_ms: Some(37.5),
        phases: BTreeMap::from([("copy".to_string(), 40.0)]),
        disks: Vec::new(),
        skipped_disks: Vec::new(),
        files: Vec::new(),
        total_bytes: 10 << 20,
        bytes_per_sec: 250.0 * 1024.0 * 1024.0,
        result,
        warnings: Vec::new(),
        appliance: None,
        verify: None,
        test_restore: None,
        chain: Default::default(),
    }
}

/// Creates `<target>/<host>/<vm>/<stamp>/` with a metadata file (no disks) and returns it.
pub fn fake_backup(target: &Path, meta: &BackupMetadata) -> PathBuf {
    vm_backup::store::FolderStore::init(target, None).unwrap();
    let dir = target
        .join(&meta.host)
        .join(&meta.vm_name)
        .join(&meta.stamp);
    fs::create_dir_all(&dir).unwrap();
    vm_backup::store::write_metadata(&dir, meta).unwrap();
    dir
}

/// A config file pointing at `target`, with extra TOML appended.
pub fn config(dir: &Path, target: &Path, extra: &str) -> PathBuf {
    vm_backup::store::FolderStore::init(target, None).unwrap();
    let path = dir.join("vm-backup.conf");
    fs::write(
        &path,
        format!(
            "target = \"{}\"\nhostname = \"hv1\"\ninventory = \"{}\"\n{extra}\n",
            target.display(),
            dir.join("vm-list.yaml").display()
        ),
    )
    .unwrap();
    path
}

/// Builds a chunk manifest of a file (4 MiB chunks) the way the copier records it.
pub fn manifest_of(path: &Path, chunk_size: u64) -> (ChunkManifest, String) {
    use sha2::{Digest, Sha256};
    let data = fs::read(path).unwrap();
    let mut digests = Vec::new();
    let mut zero_chunks = Vec::new();
    let mut root = Sha256::new();
    for (i, chunk) in data.chunks(chunk_size as usize).enumerate() {
        let d = Sha256::digest(chunk);
        root.update(d);
        digests.push(hex::encode(d));
        if chunk.iter().all(|&b| b == 0) {
            zero_chunks.push(i as u64);
        }
    }
    let whole = hex::encode(Sha256::digest(&data));
    (
        ChunkManifest {
            chunk_size,
            file_size: data.len() as u64,
            digests,
            zero_chunks,
            root: hex::encode(root.finalize()),
        },
        whole,
    )
}

/// A disk record for a file already in the backup folder.
pub fn disk_record(
    dir: &Path,
    file: &str,
    target_dev: &str,
    format: &str,
    source: &Path,
) -> DiskRecord {
    let (manifest, sha256) = manifest_of(&dir.join(file), 4 << 20);
    let size = manifest.file_size;
    DiskRecord {
        target: target_dev.into(),
        source: source.display().to_string(),
        format: format.into(),
        file: file.into(),
        virtual_size: size,
        allocated_size: size,
        file_size: size,
        sha256,
        manifest,
        copy_seconds: 0.1,
        bytes_per_sec: size as f64 * 10.0,
        io_path: "threads".into(),
        backing_chain: Vec::new(),
        backing_rewrite: None,
    }
}

/// Writes `checksums.sha256` for every disk and file listed in the metadata.
pub fn write_checksums(dir: &Path, meta: &BackupMetadata) {
    use sha2::{Digest, Sha256};
    let mut out = String::new();
    for d in &meta.disks {
        out.push_str(&format!("{}  {}\n", d.sha256, d.file));
    }
    for f in &meta.files {
        let data = fs::read(dir.join(f)).unwrap();
        out.push_str(&format!("{}  {}\n", hex::encode(Sha256::digest(&data)), f));
    }
    fs::write(dir.join("checksums.sha256"), out).unwrap();
}

/// One HTTP request received by [`HttpRecorder`].
#[derive(Debug, Clone)]
pub struct Request {
    /// Request line, e.g. `POST /services/T/B/X HTTP/1.1`.
    pub line: String,
    /// Body text.
    pub body: String,
}

/// How the recording server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `200 ok`.
    Ok,
    /// Accept the connection, read the request, and never answer.
    Silent,
    /// `500` to the first N requests, then 200.
    FailFirst(usize),
}

/// A real HTTP server on 127.0.0.1 that records every request.
pub struct HttpRecorder {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// What was received.
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl HttpRecorder {
    /// Starts the server on a free port; it runs until the test process ends.
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                let Some(req) = read_request(&stream) else {
                    continue;
                };
                let n = {
                    let mut v = seen.lock().unwrap();
                    v.push(req);
                    v.len()
                };
                let status = match behaviour {
                    Behaviour::Silent => {
                        held.push(stream); // keep it open, never answer
                        continue;
                    }
                    Behaviour::FailFirst(k) if n <= k => "500 Internal Server Error",
                    _ => "200 OK",
                };
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        Self { base, requests }
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_request(mut stream: &TcpStream) -> Option<Request> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = stream.read(&mut tmp).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(Request {
        line: head.lines().next().unwrap_or_default().to_string(),
        body: String::from_utf8_lossy(&buf[header_end..]).into_owned(),
    })
}

/// A port on 127.0.0.1 with nothing listening (bound then released).
pub fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A disk image for a hand-made backup: `size` bytes of pseudo-random data, as qcow2 (through
/// `qemu-img convert`) or raw.
pub fn make_image(path: &Path, size: usize, seed: u64, format: &str) {
    let mut x = seed | 1;
    let mut data = vec![0u8; size];
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    if format == "raw" {
        fs::write(path, &data).unwrap();
        return;
    }
    let raw = path.with_extension("tmp.raw");
    fs::write(&raw, &data).unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_file(raw).unwrap();
}

/// A backup folder built by hand the way the engine publishes one: images copied with the
/// copier (its manifests), the domain XML, checksums.sha256 and backup-metadata.json.
/// `disks` are (target dev, format, source image).
pub fn hand_backup(
    target: &Path,
    host: &str,
    vm: &str,
    stamp: &str,
    xml: &str,
    disks: &[(&str, &str, PathBuf)],
) -> (PathBuf, BackupMetadata) {
    use vm_backup::copier::{copy_file, CopyOptions};
    use vm_backup::progress::{CancelToken, NoProgress};
    vm_backup::store::FolderStore::init(target, None).unwrap();
    let dir = target.join(host).join(vm).join(stamp);
    fs::create_dir_all(&dir).unwrap();
    let mut meta = metadata(host, vm, stamp, ExitStatus::Success);
    for (dev, format, src) in disks {
        let file = vm_backup::format::layout::disk_file_name(vm, dev, format).unwrap();
        let report = copy_file(
            src,
            &dir.join(&file),
            &CopyOptions::default(),
            &NoProgress,
            &CancelToken::new(),
        )
        .unwrap();
        let size = report.logical_size;
        meta.disks.push(DiskRecord {
            target: dev.to_string(),
            source: src.display().to_string(),
            format: format.to_string(),
            file,
            virtual_size: size,
            allocated_size: size,
            file_size: size,
            sha256: report.sha256.clone().unwrap(),
            manifest: report.manifest.clone().unwrap(),
            copy_seconds: report.duration.as_secs_f64(),
            bytes_per_sec: report.bytes_per_sec,
            io_path: "threads".into(),
            backing_chain: Vec::new(),
            backing_rewrite: None,
        });
    }
    meta.total_bytes = meta.disks.iter().map(|d| d.file_size).sum();
    let xml_name = format!("{vm}.xml");
    fs::write(dir.join(&xml_name), xml).unwrap();
    meta.files.push(xml_name);
    write_checksums(&dir, &meta);
    vm_backup::store::write_metadata(&dir, &meta).unwrap();
    (dir, meta)
}

/// Flips one byte of a file at `offset`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// A minimal domain XML naming the given (target dev, format, source) disks.
pub fn domain_xml(name: &str, disks: &[(&str, &str, PathBuf)]) -> String {
    let mut devices = String::new();
    for (dev, format, src) in disks {
        devices.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
            src.display()
        ));
    }
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>6f1c1f0e-0000-4000-8000-000000000001</uuid>\n  <memory unit='KiB'>65536</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n{devices}  </devices>\n</domain>\n"
    )
}
