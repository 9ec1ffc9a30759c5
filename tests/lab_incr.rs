//! Lab tests of incremental and differential backups (checkpoints, push-mode backup jobs,
//! qcow2 chains across folders) against real libvirt and a TCG guest. Skipped unless
//! VMB_LAB_LIBVIRT=1. Run with the prefix of the lab that is up, e.g.
//! `VMB_LAB_PREFIX=incr VMB_LAB_LIBVIRT=1 cargo test --test lab_incr -- --test-threads=1`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;
use vm_backup::format::metadata::{BackupLevel, BackupMetadata};

/// A target and journal that QEMU can traverse; removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = PathBuf::from(format!(
            "/var/tmp/vmb-{}-{test}-{}",
            prefix(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("target")).unwrap();
        vm_backup::store::FolderStore::init(dir.join("target"), None).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let conf = format!(
            "target = \"{d}/target\"\nhostname = \"labhost\"\njournal_dir = \"{d}/journal\"\n\
             inventory = \"{d}/vm-list.yaml\"\n",
            d = dir.display()
        );
        fs::write(dir.join("vm-backup.conf"), conf).unwrap();
        Scratch { dir }
    }

    fn vmb_cmd(&self, args: &[&str]) -> Command {
        let conf = self.dir.join("vm-backup.conf").display().to_string();
        let mut c = vm_backup();
        c.args(args).args(["--config", &conf]);
        c
    }

    fn vmb(&self, args: &[&str]) -> Output {
        self.vmb_cmd(args).output().unwrap()
    }

    fn vm_dir(&self, dom: &str) -> PathBuf {
        self.dir.join("target").join("labhost").join(dom)
    }

    /// A backup at `level` (extra args appended); returns the new folder and its metadata.
    fn backup(&self, dom: &str, level: &str, extra: &[&str]) -> (PathBuf, BackupMetadata) {
        let mut args = vec!["backup", dom, "--level", level];
        args.extend_from_slice(extra);
        let out = self.vmb(&args);
        let (o, e) = texts(&out);
        assert!(
            out.status.success(),
            "{level} backup of {dom} failed:\n{o}\n{e}"
        );
        let stamp = vm_backup::format::layout::VmDir {
            path: self.vm_dir(dom),
        }
        .latest()
        .unwrap()
        .expect("a published backup");
        let dir = self.vm_dir(dom).join(stamp);
        let md = BackupMetadata::read(&dir).unwrap();
        (dir, md)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Later lab tests share the domain: leave it without our checkpoints.
        drop_our_checkpoints(&agent_dom());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Resumes the domain when dropped (a failed assertion must not leave it paused).
struct Paused(String);

impl Paused {
    fn new(dom: &str) -> Paused {
        virsh_ok(&["suspend", dom]);
        Paused(dom.to_string())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = virsh(&["resume", &self.0]);
    }
}

/// Destroys and undefines a domain when dropped.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0, "--nvram", "--checkpoints-metadata"]);
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn our_checkpoints(dom: &str) -> Vec<String> {
    virsh_ok(&["checkpoint-list", dom, "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("vmb-"))
        .map(str::to_string)
        .collect()
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "qemu-img {args:?}:\n{o}\n{e}");
    o
}

fn the_disk(dom: &str) -> String {
    disk_sources(dom)
        .into_iter()
        .find(|(t, _)| t == "vda")
        .map(|(_, s)| s)
        .expect("vda")
}

/// A clean start for the tests of one domain: no checkpoint of ours left by another test.
fn drop_our_checkpoints(dom: &str) {
    let names = virsh(&["checkpoint-list", dom, "--name"]);
    if !names.status.success() {
        return;
    }
    for c in our_checkpoints(dom) {
        let _ = virsh(&["checkpoint-delete", dom, &c]);
    }
}

#[test]
fn inl_incremental_copies_only_changed_blocks_and_the_chain_is_byte_exact() {
    if !lab_enabled("inl_incremental_copies_only_changed_blocks_and_the_chain_is_byte_exact") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = Scratch::new("incr");
    let t = Instant::now();
    let (full_dir, full) = s.backup(&dom, "full", &[]);
    let full_secs = t.elapsed().as_secs_f64();
    assert_eq!(full.level(), BackupLevel::Full);
    let full_ck = full
        .chain
        .checkpoint
        .clone()
        .expect("a full records its checkpoint");
    assert_eq!(our_checkpoints(&dom), vec![full_ck.clone()]);

    // Known data in the guest: 1 MiB of random bytes.
    gexec_ok(
        &dom,
        "rm -f /mnt/data/inc.bin; dd if=/dev/urandom of=/mnt/data/inc.bin bs=64k count=16 2>/dev/null && sync",
    );
    let guest_sum = gexec_ok(&dom, "sha256sum /mnt/data/inc.bin");

    // Paused: QEMU has drained and flushed, the image is the disk as of the checkpoint.
    let reference = s.dir.join("reference.raw");
    let (inc_dir, inc, inc_secs) = {
        let _paused = Paused::new(&dom);
        qemu_img_ok(&[
            "convert",
            "-U",
            "-O",
            "raw",
            &the_disk(&dom),
            &reference.display().to_string(),
        ]);
        let t = Instant::now();
        let (d, m) = s.backup(&dom, "incremental", &["--method", "snapshot"]);
        (d, m, t.elapsed().as_secs_f64())
    };
    assert_eq!(inc.level(), BackupLevel::Incremental, "{:?}", inc.chain);
    assert_eq!(inc.chain.parent.as_deref(), Some(full.stamp.as_str()));
    let inc_ck = inc.chain.checkpoint.clone().expect("checkpoint");
    assert_ne!(inc_ck, full_ck);
    // The full's checkpoint stays (differentials count from it), and the new one.
    assert_eq!(our_checkpoints(&dom), vec![full_ck.clone(), inc_ck.clone()]);

    // Only the changed blocks: about 1 MiB (+ the writer, ext4 metadata), far below the disk.
    let d = &inc.disks[0];
    eprintln!(
        "full: {} bytes in {full_secs:.1} s; incremental: {} bytes in {inc_secs:.1} s; virtual {}",
        full.disks[0].file_size, d.file_size, d.virtual_size
    );
    assert!(
        d.file_size < 16 << 20,
        "incremental holds {} bytes",
        d.file_size
    );
    assert!(d.file_size * 8 < d.virtual_size);
    assert!(d.file_size >= 1 << 20, "the 1 MiB written is not in it");
    assert_eq!(
        d.source,
        the_disk(&dom),
        "the record names the domain's image"
    );

    // qemu-img understands the chain without us.
    let inc_file = inc_dir.join(&d.file);
    let inc_path = inc_file.display().to_string();
    qemu_img_ok(&["check", &inc_path]);
    let chain = qemu_img_ok(&["info", "--backing-chain", "--output=json", &inc_path]);
    let chain: serde_json::Value = serde_json::from_str(&chain).unwrap();
    assert_eq!(chain.as_array().map(Vec::len), Some(2), "{chain}");
    assert_eq!(
        chain[0]["backing-filename"],
        format!("../{}/{}", full.stamp, full.disks[0].file)
    );
    let sums = fs::read_to_string(inc_dir.join("checksums.sha256")).unwrap();
    assert!(sums.contains(&d.file), "{sums}");
    assert!(inc_dir.join("backup-metadata.json").exists());
    assert!(full_dir.join(&full.disks[0].file).exists());

    // Byte-exact: the chain equals the disk as of the checkpoint.
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &inc_path,
        &reference.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(
        out.status.success(),
        "chain differs from the disk at the checkpoint:\n{o}\n{e}"
    );
    // And a plain convert of the chain holds the file written in the guest.
    let flat = s.dir.join("flat.raw");
    qemu_img_ok(&[
        "convert",
        "-O",
        "raw",
        &inc_path,
        &flat.display().to_string(),
    ]);
    // The paused guest's ext4 journal may hold the file's metadata: replay it first
    // (debugfs reads the image as it is).
    let _ = Command::new("e2fsck")
        .args(["-fy", &flat.display().to_string()])
        .output()
        .unwrap();
    let data = ext4_cat(&flat, "/inc.bin").expect("inc.bin in the restored chain");
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    assert!(guest_sum.starts_with(&sum), "{guest_sum} vs {sum}");

    // Restore of the incremental to its point in time, as a copy: the chain comes back
    // (each layer checked, rebased), equals the reference and boots with the file in it.
    let copy = format!("{dom}-incrcopy");
    let _undefine = Undefine(copy.clone());
    let disk_dir = s.dir.join("copy-disks");
    let out = s.vmb(&[
        "restore",
        &dom,
        &inc.stamp,
        "--as",
        &copy,
        "--disk-dir",
        &disk_dir.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(
        out.status.success(),
        "restore of the incremental:
{o}
{e}"
    );
    let restored = disk_dir.join(format!("{copy}-vda.qcow2"));
    let restored_s = restored.display().to_string();
    qemu_img_ok(&["check", &restored_s]);
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &restored_s,
        &reference.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(
        out.status.success(),
        "restored chain differs:
{o}
{e}"
    );
    virsh_ok(&["start", &copy]);
    wait_agent(&copy, Duration::from_secs(180));
    let copy_sum = gexec_ok(&copy, "sha256sum /mnt/data/inc.bin");
    assert_eq!(
        copy_sum.split_whitespace().next(),
        guest_sum.split_whitespace().next()
    );
    drop(_undefine);

    // A differential counts from the full: its parent is the full, not the incremental.
    gexec_ok(&dom, "echo diff >> /mnt/data/inc.txt && sync");
    let (_diff_dir, diff) = s.backup(&dom, "differential", &[]);
    assert_eq!(diff.level(), BackupLevel::Differential, "{:?}", diff.chain);
    assert_eq!(diff.chain.parent.as_deref(), Some(full.stamp.as_str()));
    // The incremental's checkpoint is no longer needed.
    assert_eq!(
        our_checkpoints(&dom),
        vec![full_ck, diff.chain.checkpoint.clone().unwrap()]
    );
    assert!(!our_checkpoints(&dom).contains(&inc_ck));
}

#[test]
fn inl_missing_checkpoint_falls_back_to_a_full_and_says_why() {
    if !lab_enabled("inl_missing_checkpoint_falls_back_to_a_full_and_says_why") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = Scratch::new("fallback");
    let (_, full) = s.backup(&dom, "full", &[]);
    let ck = full.chain.checkpoint.clone().unwrap();
    // Removed by hand (with its bitmap).
    virsh_ok(&["checkpoint-delete", &dom, &ck]);
    let (dir, md) = s.backup(&dom, "incremental", &[]);
    assert_eq!(md.level(), BackupLevel::Full);
    assert_eq!(md.chain.level_requested, Some(BackupLevel::Incremental));
    let note = md.chain.level_note.clone().unwrap_or_default();
    assert!(note.contains(&ck), "{note}");
    let log = fs::read_to_string(dir.join("backup.log")).unwrap_or_default();
    assert!(log.contains("full backup instead"), "{log}");
    // The new full carries a new checkpoint: the next incremental continues from it.
    let (_, next) = s.backup(&dom, "incremental", &[]);
    assert_eq!(next.level(), BackupLevel::Incremental, "{:?}", next.chain);
    assert_eq!(next.chain.parent.as_deref(), Some(md.stamp.as_str()));
}

#[test]
fn inl_kill9_mid_incremental_is_repaired_by_the_next_run() {
    if !lab_enabled("inl_kill9_mid_incremental_is_repaired_by_the_next_run") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = Scratch::new("kill9");
    let (_, full) = s.backup(&dom, "full", &[]);
    let full_ck = full.chain.checkpoint.clone().unwrap();
    let mut child = s
        .vmb_cmd(&["backup", &dom, "--level", "incremental"])
        .env("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "60000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the run is in its pause: the scratch folder and a second checkpoint exist.
    let scratch = s.dir.join("journal").join("scratch");
    let t = Instant::now();
    while !(our_checkpoints(&dom).len() == 2
        && fs::read_dir(&scratch).is_ok_and(|mut r| r.next().is_some()))
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the incremental never reached its pause"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    assert_eq!(our_checkpoints(&dom).len(), 2);

    let out = s.vmb(&["backup", &dom, "--level", "incremental"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let all = format!("{o}\n{e}");
    assert!(all.contains("scratch folder"), "{all}");
    assert!(all.contains("of the unfinished backup deleted"), "{all}");
    let stamp = vm_backup::format::layout::VmDir {
        path: s.vm_dir(&dom),
    }
    .latest()
    .unwrap()
    .unwrap();
    let md = BackupMetadata::read(&s.vm_dir(&dom).join(&stamp)).unwrap();
    // Healed and continued: still an incremental on the full (the killed run's changes
    // merged back into the full's bitmap).
    assert_eq!(md.level(), BackupLevel::Incremental, "{:?}", md.chain);
    assert_eq!(md.chain.parent.as_deref(), Some(full.stamp.as_str()));
    assert_eq!(
        our_checkpoints(&dom),
        vec![full_ck, md.chain.checkpoint.clone().unwrap()]
    );
    assert!(fs::read_dir(&scratch).map(|r| r.count()).unwrap_or(0) == 0);
    assert!(!Path::new(&s.vm_dir(&dom))
        .join(format!("{stamp}.partial"))
        .exists());
}
