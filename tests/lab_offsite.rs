//! Lab tests of the off-site copy (`vm-backup offsite`, docs/offsite.md) against a real
//! S3-compatible server (s3s-fs, `lab/s3-lab.sh`) and real backups of the lab's agent guest.
//!
//! Needs the libvirt lab with a filled data disk (the dedup ratio needs a disk much larger
//! than the few chunks any backup changes in metadata):
//! ```sh
//! lab/libvirt-lab.sh up ofs --only agent --data-size 512M --fill 400M
//! lab/s3-lab.sh start && eval "$(lab/s3-lab.sh env)"
//! VMB_LAB_PREFIX=ofs VMB_LAB_LIBVIRT=1 cargo test --test lab_offsite -- --test-threads=1
//! ```
//! Two full backups of `<prefix>-agent` are taken once (the second after ~5 % of the image
//! was overwritten in the guest) and shared by the tests; each test pushes into its own
//! prefix of the bucket unless it only reads.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::*;
use vm_backup::format::metadata::BackupMetadata;
use vm_backup::store::offsite::{key, s3, OffsiteStore, S3Client, S3Config};

/// A distinctive text the guest writes into its disk before the first backup.
const MARKER: &str = "VMB-OFFSITE-PLAINTEXT-MARKER-7f3a9c";

struct Fixture {
    dir: PathBuf,
    s3: S3Lab,
    /// (stamp, metadata) of the two backups, oldest first.
    backups: Vec<(String, BackupMetadata)>,
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Fixture {
    fn conf(&self) -> String {
        self.dir.join("vm-backup.conf").display().to_string()
    }

    fn key_file(&self) -> String {
        self.dir.join("offsite.key").display().to_string()
    }

    fn vmb(&self, args: &[&str]) -> Output {
        vm_backup()
            .args(args)
            .args(["--config", &self.conf()])
            .output()
            .unwrap()
    }

    /// `vm-backup offsite ACTION --prefix P ARGS`.
    fn offsite(&self, action: &str, prefix: &str, args: &[&str]) -> Output {
        let mut a = vec!["offsite", action, "--prefix", prefix];
        a.extend_from_slice(args);
        self.vmb(&a)
    }

    fn offsite_ok(&self, action: &str, prefix: &str, args: &[&str]) -> String {
        let out = self.offsite(action, prefix, args);
        let (o, e) = texts(&out);
        assert!(
            out.status.success(),
            "offsite {action} {args:?} failed:\n{o}\n{e}"
        );
        o
    }

    /// The library's view of the store under `prefix` (to count chunks and read manifests).
    fn store(&self, prefix: &str) -> OffsiteStore {
        let cfg = S3Config::new(&self.s3.endpoint, &self.s3.bucket, prefix);
        let client = S3Client::new(&cfg, s3::credentials(&cfg, None).unwrap()).unwrap();
        let master = key::load(Path::new(&self.key_file()), None).unwrap();
        OffsiteStore::open(client, &master, false).unwrap()
    }

    /// Every file the server keeps under `prefix`.
    fn server_files(&self, prefix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.s3.data.join(prefix)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    fn chunk_files(&self, prefix: &str) -> Vec<PathBuf> {
        let chunks = self.s3.data.join(prefix).join("chunks");
        self.server_files(prefix)
            .into_iter()
            .filter(|p| p.starts_with(&chunks))
            .collect()
    }

    fn vm(&self) -> String {
        agent_dom()
    }

    fn backup_name(&self, i: usize) -> String {
        format!("labhost/{}/{}", self.vm(), self.backups[i].0)
    }
}

/// Runs the guest command, panicking with its output unless it succeeds.
fn guest(cmd: &str) -> String {
    gexec_ok(&agent_dom(), cmd)
}

/// A full backup of the agent guest; returns its stamp and metadata.
fn full_backup(dir: &Path, conf: &str) -> (String, BackupMetadata) {
    let dom = agent_dom();
    let out = vm_backup()
        .args(["backup", &dom, "--level", "full", "--config", conf])
        .output()
        .unwrap();
    let (o, e) = texts(&out);
    assert!(out.status.success(), "backup of {dom} failed:\n{o}\n{e}");
    let vm_dir = vm_backup::format::layout::VmDir {
        path: dir.join("target").join("labhost").join(&dom),
    };
    let stamp = vm_dir.latest().unwrap().expect("a published backup");
    let md = BackupMetadata::read(&vm_dir.backup_dir(&stamp)).unwrap();
    (stamp, md)
}

/// The two backups, taken once for every test of this file.
fn fixture(test: &str) -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    if !lab_enabled(test) {
        return None;
    }
    let s3 = s3_lab(test)?;
    FIXTURE
        .get_or_init(|| {
            let dir = lab_dir().join("offsite-test");
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("target")).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
            vm_backup::store::FolderStore::init(dir.join("target"), None).unwrap();
            // A fresh repository for this run: another run's objects are not ours.
            let _ = fs::remove_dir_all(&s3.data);
            fs::create_dir_all(&s3.data).unwrap();
            let conf = format!(
                "target = \"{d}/target\"\nhostname = \"labhost\"\njournal_dir = \"{d}/journal\"\n\
                 inventory = \"{d}/vm-list.yaml\"\n[offsite]\nendpoint = \"{e}\"\nbucket = \"{b}\"\n\
                 key_file = \"{d}/offsite.key\"\n",
                d = dir.display(),
                e = s3.endpoint,
                b = s3.bucket
            );
            fs::write(dir.join("vm-backup.conf"), conf).unwrap();
            let conf = dir.join("vm-backup.conf").display().to_string();
            let out = vm_backup()
                .args(["key", "create", "--config", &conf])
                .output()
                .unwrap();
            assert!(out.status.success(), "key create: {:?}", texts(&out));

            let dom = agent_dom();
            wait_agent(&dom, Duration::from_secs(180));
            // A known plaintext in the guest's disk: 256 KiB of the marker line.
            guest(&format!(
                "yes {MARKER} | head -c 262144 > /mnt/data/marker.txt; sync"
            ));
            let first = full_backup(&dir, &conf);
            // ~5 % of the image overwritten in place (aligned 4 MiB blocks of /fill.bin,
            // whose clusters are allocated: the qcow2 file changes where they lie).
            let image = first.1.disks[0].file_size;
            let mib = ((image / 20) >> 20).max(4) / 4 * 4;
            guest(&format!(
                "dd if=/dev/urandom of=/mnt/data/fill.bin bs=1M seek=64 count={mib} conv=notrunc 2>/dev/null; sync"
            ));
            let second = full_backup(&dir, &conf);
            assert_ne!(first.0, second.0);
            Some(Fixture {
                dir,
                s3,
                backups: vec![first, second],
            })
        })
        .as_ref()
}

/// The main prefix: both backups pushed once, shared by the tests that only read (and the
/// flipped-byte test, which puts the byte back).
fn pushed_main(f: &Fixture) -> &'static serde_json::Value {
    static REPORT: OnceLock<serde_json::Value> = OnceLock::new();
    REPORT.get_or_init(|| {
        let o = f.offsite_ok("push", "main", &[&f.vm(), "--json"]);
        serde_json::from_str(&o).unwrap()
    })
}

fn digests(md: &BackupMetadata) -> Vec<String> {
    let zero: BTreeSet<u64> = md.disks[0].manifest.zero_chunks.iter().copied().collect();
    md.disks[0]
        .manifest
        .digests
        .iter()
        .enumerate()
        .filter(|(i, _)| !zero.contains(&(*i as u64)))
        .map(|(_, d)| d.clone())
        .collect()
}

#[test]
fn second_push_sends_only_what_changed_and_nothing_is_readable() {
    let Some(f) = fixture("second_push_sends_only_what_changed_and_nothing_is_readable") else {
        return;
    };
    let report = pushed_main(f);
    let b = report["backups"].as_array().unwrap();
    assert_eq!(b.len(), 2, "{report:#}");
    let (first, second) = (&b[0], &b[1]);
    assert_eq!(first["backup"], f.backup_name(0));
    let up1 = first["uploaded_plain_bytes"].as_u64().unwrap();
    let up2 = second["uploaded_plain_bytes"].as_u64().unwrap();
    let image = f.backups[0].1.disks[0].file_size;
    eprintln!(
        "image {} MiB; first push {} MiB ({} chunks), second {} MiB ({} chunks, {} already there)",
        image >> 20,
        up1 >> 20,
        first["uploaded_chunks"],
        up2 >> 20,
        second["uploaded_chunks"],
        second["present_chunks"]
    );
    assert!(up1 > image / 2, "the first push sends the image: {first:#}");
    assert!(
        up2 * 10 <= up1,
        "the second push sent {up2} bytes, more than 10 % of the first's {up1}"
    );
    // Exactly the image chunks that are new (plus at most the small files' own chunks:
    // XML, checksums), no more, no fewer.
    let old: BTreeSet<String> = digests(&f.backups[0].1).into_iter().collect();
    let new: BTreeSet<String> = digests(&f.backups[1].1)
        .into_iter()
        .filter(|d| !old.contains(d))
        .collect();
    let sent = second["uploaded_chunks"].as_u64().unwrap();
    assert!(
        sent >= new.len() as u64 && sent <= new.len() as u64 + 3,
        "second push uploaded {sent} chunks; {} image chunks are new",
        new.len()
    );
    assert!(!new.is_empty(), "the guest's change reached the image");

    // Compressible content (ext4 metadata, the marker file) is stored smaller.
    let stored1 = first["uploaded_stored_bytes"].as_u64().unwrap();
    assert!(
        stored1 < up1,
        "stored {stored1} bytes for {up1} bytes of chunks: nothing compressed"
    );

    // The marker is in the backup image in the clear, and nowhere on the server's disk.
    let dir = f
        .dir
        .join("target/labhost")
        .join(f.vm())
        .join(&f.backups[0].0);
    let image_bytes = fs::read(dir.join(&f.backups[0].1.disks[0].file)).unwrap();
    let needle = MARKER.as_bytes();
    assert!(
        image_bytes.windows(needle.len()).any(|w| w == needle),
        "the marker is in the primary backup (test sanity)"
    );
    let vm_name = f.vm();
    let files = f.server_files("main");
    assert!(files.len() > 10);
    for p in &files {
        let bytes = fs::read(p).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{} holds the guest's plaintext",
            p.display()
        );
        // Manifests are sealed: the disk file names are not readable either.
        if p.to_string_lossy().contains("/backups/") {
            assert!(!bytes
                .windows(vm_name.len() + 4)
                .any(|w| w.starts_with(vm_name.as_bytes()) && &w[vm_name.len()..] == b"-vda"));
        }
    }

    // Pushing again sends nothing; list shows both; a full verify passes.
    let again: serde_json::Value =
        serde_json::from_str(&f.offsite_ok("push", "main", &[&f.vm(), "--json"])).unwrap();
    assert!(again["backups"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["already"] == true));
    let list = f.offsite_ok("list", "main", &[]);
    assert!(
        list.contains(&f.backup_name(0)) && list.contains(&f.backup_name(1)),
        "{list}"
    );
    let v = f.offsite_ok("verify", "main", &[]);
    assert!(v.contains("checked: ok"), "{v}");
}

#[test]
fn killed_push_resumes_without_duplicates_and_lists_nothing_meanwhile() {
    let Some(f) = fixture("killed_push_resumes_without_duplicates_and_lists_nothing_meanwhile")
    else {
        return;
    };
    let prefix = "killed";
    let mut child = vm_backup()
        .args([
            "offsite",
            "push",
            &f.vm(),
            "--prefix",
            prefix,
            "--workers",
            "1",
            "--config",
            &f.conf(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut listed_meanwhile = Vec::new();
    while f.chunk_files(prefix).len() < 8 {
        assert!(
            Instant::now() < deadline,
            "the push uploaded no chunk in 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // While it runs, nothing is listed.
    let out = f.offsite("list", prefix, &[]);
    listed_meanwhile.push(texts(&out).0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let before = f.chunk_files(prefix).len();
    let out = f.offsite("list", prefix, &[]);
    listed_meanwhile.push(texts(&out).0);
    for l in &listed_meanwhile {
        assert!(!l.contains(&f.vm()), "an incomplete backup was listed: {l}");
    }

    let report: serde_json::Value =
        serde_json::from_str(&f.offsite_ok("push", prefix, &[&f.vm(), "--json"])).unwrap();
    let first = &report["backups"][0];
    assert!(
        first["present_chunks"].as_u64().unwrap() + 1 >= before as u64,
        "the chunks sent before the kill are not sent again: {first:#} ({before} were there)"
    );
    let store = f.store(prefix);
    let backups = store.backups().unwrap();
    assert_eq!(backups.len(), 2, "{backups:?}");
    let mut referenced = BTreeSet::new();
    for (h, v, s) in &backups {
        referenced.extend(store.get_manifest(h, v, s).unwrap().chunk_ids());
    }
    let files = f.chunk_files(prefix);
    assert_eq!(
        files.len(),
        referenced.len(),
        "one object per referenced chunk, no duplicate and no leftover"
    );
    let v = f.offsite_ok("verify", prefix, &["--sample", "20%"]);
    assert!(v.contains("checked: ok"), "{v}");
}

#[test]
fn flipped_byte_is_named_by_verify_and_refused_by_restore() {
    let Some(f) = fixture("flipped_byte_is_named_by_verify_and_refused_by_restore") else {
        return;
    };
    pushed_main(f);
    let store = f.store("main");
    let (_, vm, stamp) = store.backups().unwrap().pop().unwrap();
    let m = store.get_manifest("labhost", &vm, &stamp).unwrap();
    // A chunk of the disk image that only the newest backup has (the changed region).
    let older = store.get_manifest("labhost", &vm, &f.backups[0].0).unwrap();
    let old_ids: BTreeSet<_> = older.chunk_ids().collect();
    let (index, chunk) = m.files[0]
        .chunks
        .iter()
        .enumerate()
        .find_map(|(i, c)| {
            c.as_ref()
                .filter(|c| !old_ids.contains(&c.chunk_id().unwrap()))
                .map(|c| (i, c.clone()))
        })
        .expect("a chunk of the newest backup only");
    let object =
        f.s3.data
            .join("main/chunks")
            .join(&chunk.id[..2])
            .join(&chunk.id);
    let original = fs::read(&object).unwrap();
    struct PutBack(PathBuf, Vec<u8>);
    impl Drop for PutBack {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, &self.1);
        }
    }
    let _put_back = PutBack(object.clone(), original.clone());
    let mut bad = original.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    fs::write(&object, &bad).unwrap();

    let out = f.offsite("verify", "main", &[]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "verify must fail:\n{o}\n{e}");
    let name = f.backup_name(1);
    let want = format!("{} chunk {index} (object {})", m.files[0].name, chunk.id);
    assert!(
        o.lines().any(|l| l.contains(&name) && l.contains(&want)),
        "verify names the backup {name} and {want}:\n{o}"
    );
    assert!(
        !o.lines()
            .any(|l| l.starts_with("FAULT") && l.contains(&f.backup_name(0))),
        "the older backup does not hold that chunk:\n{o}"
    );

    let disks = f.dir.join("restore-flip");
    let restored = format!("{}-offsite-flip", f.vm());
    let out = f.offsite(
        "restore",
        "main",
        &[
            &f.vm(),
            &stamp,
            "--as",
            &restored,
            "--disk-dir",
            disks.to_str().unwrap(),
        ],
    );
    let (o, e) = texts(&out);
    assert!(!out.status.success(), "restore must refuse:\n{o}\n{e}");
    assert!(e.contains(&want), "restore names the chunk:\n{e}");
    assert_ne!(
        virsh(&["dominfo", &restored]).status.code(),
        Some(0),
        "no domain defined"
    );
    let left: Vec<_> = fs::read_dir(&disks)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing is left in the disk folder: {left:?}"
    );
}

#[test]
fn wrong_key_and_unreachable_server_fail_clearly_and_quickly() {
    let Some(f) = fixture("wrong_key_and_unreachable_server_fail_clearly_and_quickly") else {
        return;
    };
    pushed_main(f);
    let other = f.dir.join("other.key");
    let _ = fs::remove_file(&other);
    let out = vm_backup()
        .args(["key", "create", "--key-file", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = f.offsite("list", "main", &["--key-file", other.to_str().unwrap()]);
    let (_, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(e.contains("wrong key"), "{e}");

    // Server down: a port nobody listens on.
    let t = Instant::now();
    let out = f.offsite("list", "main", &["--endpoint", "http://127.0.0.1:9"]);
    let (_, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        t.elapsed()
    );
    assert!(
        e.contains("S3 server http://127.0.0.1:9") && e.contains("Connect"),
        "{e}"
    );

    // Wrong credentials.
    let t = Instant::now();
    let out = vm_backup()
        .args([
            "offsite",
            "push",
            &f.vm(),
            "--prefix",
            "main",
            "--config",
            &f.conf(),
        ])
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    let (_, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(!e.contains("not-the-secret"), "the secret is never printed");

    // Nothing lost.
    let list = f.offsite_ok("list", "main", &[]);
    assert!(list.contains(&f.backup_name(1)), "{list}");
}

#[test]
fn prune_and_gc_remove_only_unreferenced_chunks() {
    let Some(f) = fixture("prune_and_gc_remove_only_unreferenced_chunks") else {
        return;
    };
    let prefix = "pruned";
    f.offsite_ok("push", prefix, &[&f.vm()]);
    let store = f.store(prefix);
    let m0 = store
        .get_manifest("labhost", &f.vm(), &f.backups[0].0)
        .unwrap();
    let m1 = store
        .get_manifest("labhost", &f.vm(), &f.backups[1].0)
        .unwrap();
    let keep: BTreeSet<_> = m1.chunk_ids().collect();
    let only_old: BTreeSet<_> = m0.chunk_ids().filter(|i| !keep.contains(i)).collect();
    assert!(!only_old.is_empty());
    let before: BTreeSet<_> = store.chunk_ids().unwrap();
    assert_eq!(before.len(), keep.len() + only_old.len());

    let o = f.offsite_ok("prune", prefix, &["--keep-last", "1", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(report["removed"], serde_json::json!([f.backup_name(0)]));
    assert_eq!(
        report["chunks_deleted"].as_u64().unwrap(),
        only_old.len() as u64
    );
    let after: BTreeSet<_> = store.chunk_ids().unwrap();
    assert_eq!(
        after, keep,
        "exactly the chunks the kept backup references remain"
    );
    let list = f.offsite_ok("list", prefix, &[]);
    assert!(!list.contains(&f.backup_name(0)) && list.contains(&f.backup_name(1)));
    let v = f.offsite_ok("verify", prefix, &[]);
    assert!(v.contains("checked: ok"), "{v}");

    // A push running (its lock) stops the collection, which says so.
    let lock = serde_json::json!({"kind": "push", "host": "elsewhere", "pid": 1,
        "started_at": chrono::Local::now().to_rfc3339()});
    let cfg = S3Config::new(&f.s3.endpoint, &f.s3.bucket, prefix);
    let client = S3Client::new(&cfg, s3::credentials(&cfg, None).unwrap()).unwrap();
    client
        .put("locks/push-test", lock.to_string().as_bytes())
        .unwrap();
    let o = f.offsite_ok("prune", prefix, &["--keep-last", "1"]);
    client.delete("locks/push-test").unwrap();
    assert!(o.contains("garbage collection skipped"), "{o}");
}

#[test]
fn restore_from_offsite_boots() {
    let Some(f) = fixture("restore_from_offsite_boots") else {
        return;
    };
    pushed_main(f);
    let disks = f.dir.join("restore-boot");
    fs::create_dir_all(&disks).unwrap();
    fs::set_permissions(&disks, fs::Permissions::from_mode(0o755)).unwrap();
    let name = format!("{}-offsite", f.vm());
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0]);
            let _ = virsh(&["undefine", &self.0, "--nvram"]);
        }
    }
    let _guard = Undefine(name.clone());
    let out = f.offsite(
        "restore",
        "main",
        &[
            &f.vm(),
            "latest",
            "--as",
            &name,
            "--disk-dir",
            disks.to_str().unwrap(),
            "--start",
        ],
    );
    let (o, e) = texts(&out);
    assert!(out.status.success(), "offsite restore failed:\n{o}\n{e}");
    assert!(o.contains(&f.backups[1].0), "{o}");
    wait_agent(&name, Duration::from_secs(240));
    let seen = gexec_ok(&name, "head -c 64 /mnt/data/marker.txt");
    assert!(
        seen.contains(MARKER),
        "the restored guest sees its data: {seen}"
    );
    // Nothing of the staging is left beside the disks.
    let left: Vec<String> = fs::read_dir(&disks)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with('.')),
        "no staging folder or temporary file is left: {left:?}"
    );
    let disk = format!("{name}-vda.qcow2");
    assert!(left.contains(&disk), "{disk} in {left:?}");
}

#[test]
fn damaged_chunk_leaves_no_disk_file_behind() {
    let Some(f) = fixture("damaged_chunk_leaves_no_disk_file_behind") else {
        return;
    };
    pushed_main(f);
    let store = f.store("main");
    let stamp = f.backups[1].0.clone();
    let m = store.get_manifest("labhost", &f.vm(), &stamp).unwrap();
    // The LAST stored chunk of the disk image: when the restore reaches it, every chunk
    // before it has already been written into the image's temporary file.
    let (index, chunk) = m.files[0]
        .chunks
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, c)| c.clone().map(|c| (i, c)))
        .expect("a stored chunk");
    assert!(index > 8, "the image has chunks before the damaged one");
    let object =
        f.s3.data
            .join("main/chunks")
            .join(&chunk.id[..2])
            .join(&chunk.id);
    let original = fs::read(&object).unwrap();
    struct PutBack(PathBuf, Vec<u8>);
    impl Drop for PutBack {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, &self.1);
        }
    }
    let _put_back = PutBack(object.clone(), original.clone());
    let mut bad = original.clone();
    let at = bad.len() - 20; // inside the ciphertext: the GCM tag fails
    bad[at] ^= 0x40;
    fs::write(&object, &bad).unwrap();

    let disks = f.dir.join("restore-damaged");
    let _ = fs::remove_dir_all(&disks);
    fs::create_dir_all(&disks).unwrap();
    fs::set_permissions(&disks, fs::Permissions::from_mode(0o755)).unwrap();
    let restored = format!("{}-offsite-dmg", f.vm());
    let mut child = vm_backup()
        .args([
            "offsite",
            "restore",
            &f.vm(),
            &stamp,
            "--prefix",
            "main",
            "--as",
            &restored,
            "--disk-dir",
            disks.to_str().unwrap(),
            "--config",
            &f.conf(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Watch the disk folder while it runs: the image is written there directly, under a
    // temporary name, and not staged anywhere else first.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the restore did not end in 300 s"
        );
        for e in fs::read_dir(&disks).unwrap().flatten() {
            seen.insert(e.file_name().to_string_lossy().into_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "restore must refuse:\n{o}\n{e}");
    let want = format!("{} chunk {index} (object {})", m.files[0].name, chunk.id);
    assert!(e.contains(&want), "restore names the chunk {want}:\n{e}");
    let tmp = format!(".{restored}-vda.qcow2.vmb-restore");
    assert!(
        seen.contains(&tmp),
        "the image was streamed into {tmp} beside its destination: saw {seen:?}"
    );
    let left: Vec<_> = fs::read_dir(&disks)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "no disk file is left behind: {left:?}");
    assert_ne!(
        virsh(&["dominfo", &restored]).status.code(),
        Some(0),
        "no domain defined"
    );
}

/// The committed compat fixture (one small backup of `fixture-vm` on host `fixturehost`),
/// copied to an initialised target under `parent`, with a configuration for the S3 lab.
/// Needs only the S3 lab, no guest. Returns the configuration file.
fn fixture_target(parent: &Path, s3: &S3Lab) -> String {
    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap().flatten() {
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &dst);
            } else {
                fs::copy(e.path(), &dst).unwrap();
            }
        }
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backup-v0.1.0");
    let target = parent.join("target");
    copy_tree(&fixture.join("fixturehost"), &target.join("fixturehost"));
    vm_backup::store::FolderStore::init(&target, None).unwrap();
    let conf = parent.join("vm-backup.conf");
    fs::write(
        &conf,
        format!(
            "target = \"{d}/target\"\nhostname = \"fixturehost\"\njournal_dir = \"{d}/journal\"\n\
             [offsite]\nendpoint = \"{e}\"\nbucket = \"{b}\"\nkey_file = \"{d}/offsite.key\"\n",
            d = parent.display(),
            e = s3.endpoint,
            b = s3.bucket
        ),
    )
    .unwrap();
    conf.display().to_string()
}

#[test]
fn passphrase_protected_key_opens_only_with_its_passphrase() {
    let test = "passphrase_protected_key_opens_only_with_its_passphrase";
    let Some(s3) = s3_lab(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let conf = fixture_target(tmp.path(), &s3);
    let prefix = format!("pass-{}", std::process::id());
    let run = |args: &[&str], pass: Option<&str>| {
        let mut c = vm_backup();
        c.args(args).args(["--config", &conf]);
        c.env_remove("VM_BACKUP_PASSPHRASE");
        if let Some(p) = pass {
            c.env("VM_BACKUP_PASSPHRASE", p);
        }
        c.output().unwrap()
    };
    let secret = "correct horse battery staple";
    // The passphrase comes from the environment (or a file): never from the command line.
    let out = run(&["key", "create"], Some(secret));
    assert!(out.status.success(), "{:?}", texts(&out));
    let key_text = fs::read_to_string(tmp.path().join("offsite.key")).unwrap();
    assert!(
        key_text.contains("argon2id"),
        "the key is wrapped: {key_text}"
    );
    assert!(!key_text.contains(secret));

    let out = run(
        &["offsite", "push", "fixture-vm", "--prefix", &prefix],
        Some(secret),
    );
    let (o, e) = texts(&out);
    assert!(out.status.success(), "push:\n{o}\n{e}");
    assert!(
        o.contains("fixturehost/fixture-vm/2026-11-29-123424: pushed"),
        "{o}"
    );

    // The right passphrase, from a file this time.
    let pass_file = tmp.path().join("pass");
    fs::write(&pass_file, format!("{secret}\n")).unwrap();
    let out = run(
        &[
            "offsite",
            "verify",
            "--prefix",
            &prefix,
            "--passphrase-file",
            pass_file.to_str().unwrap(),
        ],
        None,
    );
    let (o, e) = texts(&out);
    assert!(
        out.status.success(),
        "verify with the passphrase:\n{o}\n{e}"
    );
    assert!(o.contains("checked: ok"), "{o}");

    // A wrong passphrase: a clear error, exit 2 (any error), for verify and restore alike.
    for action in [
        vec!["offsite", "verify", "--prefix", &prefix],
        vec![
            "offsite",
            "restore",
            "fixture-vm",
            "latest",
            "--prefix",
            &prefix,
            "--as",
            "never-defined",
        ],
    ] {
        let out = run(&action, Some("wrong horse"));
        let (o, e) = texts(&out);
        assert_eq!(out.status.code(), Some(2), "{action:?}:\n{o}\n{e}");
        assert!(
            e.contains("the passphrase does not open the key file"),
            "{action:?}: {e}"
        );
        assert!(!e.contains("wrong horse") && !e.contains(secret));
    }
    // No passphrase at all: says how to give one.
    let out = run(&["offsite", "list", "--prefix", &prefix], None);
    let (_, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(e.contains("VM_BACKUP_PASSPHRASE"), "{e}");
}

#[test]
fn object_lock_on_a_server_without_it_is_refused_before_any_upload() {
    let test = "object_lock_on_a_server_without_it_is_refused_before_any_upload";
    let Some(s3) = s3_lab(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let conf = fixture_target(tmp.path(), &s3);
    let out = vm_backup()
        .args(["key", "create", "--config", &conf])
        .env_remove("VM_BACKUP_PASSPHRASE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", texts(&out));
    let prefix = format!("lock-{}", std::process::id());
    let t = Instant::now();
    let out = vm_backup()
        .args([
            "offsite",
            "push",
            "fixture-vm",
            "--prefix",
            &prefix,
            "--object-lock-days",
            "7",
            "--config",
            &conf,
        ])
        .output()
        .unwrap();
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "refused, exit 1:\n{o}\n{e}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(
        e.contains("S3 Object Lock asked for") && e.contains("nothing was uploaded"),
        "{e}"
    );
    // Nothing at all under the prefix: not even the repository marker or a lock object.
    assert!(
        !s3.data.join(&prefix).exists(),
        "{:?}",
        fs::read_dir(s3.data.join(&prefix)).map(|r| r.count())
    );
    // The same from the configuration file.
    fs::write(
        &conf,
        fs::read_to_string(&conf).unwrap() + "object_lock_days = 7\n",
    )
    .unwrap();
    let out = vm_backup()
        .args([
            "offsite",
            "push",
            "fixture-vm",
            "--prefix",
            &prefix,
            "--config",
            &conf,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", texts(&out));
    assert!(!s3.data.join(&prefix).exists());
    // Without it, the same push goes through (the refusal was the lock, nothing else).
    let text = fs::read_to_string(&conf).unwrap();
    fs::write(&conf, text.replace("object_lock_days = 7\n", "")).unwrap();
    let out = vm_backup()
        .args([
            "offsite",
            "push",
            "fixture-vm",
            "--prefix",
            &prefix,
            "--config",
            &conf,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", texts(&out));
    assert!(s3.data.join(&prefix).join("backups").exists());
}
