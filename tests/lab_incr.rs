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

/// A scratch target (see `LabTarget`) for the agent domain's chains: our checkpoints of it
/// are removed on drop, as later lab tests share the domain.
fn scratch(test: &str) -> LabTarget {
    let mut s = LabTarget::new(test);
    s.checkpoints_of = Some(agent_dom());
    s
}

/// A backup at a level, the one thing these tests add to `LabTarget`.
trait Levels {
    /// A backup at `level` (extra args appended); returns the new folder and its metadata.
    fn backup_at(&self, dom: &str, level: &str, extra: &[&str]) -> (PathBuf, BackupMetadata);
}

impl Levels for LabTarget {
    fn backup_at(&self, dom: &str, level: &str, extra: &[&str]) -> (PathBuf, BackupMetadata) {
        let mut args = vec!["--level", level];
        args.extend_from_slice(extra);
        let dir = self.backup_with(dom, &args);
        let md = BackupMetadata::read(&dir).unwrap();
        (dir, md)
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

#[test]
fn inl_incremental_copies_only_changed_blocks_and_the_chain_is_byte_exact() {
    if !lab_enabled("inl_incremental_copies_only_changed_blocks_and_the_chain_is_byte_exact") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = scratch("incr");
    let t = Instant::now();
    let (full_dir, full) = s.backup_at(&dom, "full", &[]);
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
        let (d, m) = s.backup_at(&dom, "incremental", &["--method", "snapshot"]);
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
    let (_diff_dir, diff) = s.backup_at(&dom, "differential", &[]);
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
    let s = scratch("fallback");
    let (_, full) = s.backup_at(&dom, "full", &[]);
    let ck = full.chain.checkpoint.clone().unwrap();
    // Removed by hand (with its bitmap).
    virsh_ok(&["checkpoint-delete", &dom, &ck]);
    let (dir, md) = s.backup_at(&dom, "incremental", &[]);
    assert_eq!(md.level(), BackupLevel::Full);
    assert_eq!(md.chain.level_requested, Some(BackupLevel::Incremental));
    let note = md.chain.level_note.clone().unwrap_or_default();
    assert!(note.contains(&ck), "{note}");
    let log = fs::read_to_string(dir.join("backup.log")).unwrap_or_default();
    assert!(log.contains("full backup instead"), "{log}");
    // The new full carries a new checkpoint: the next incremental continues from it.
    let (_, next) = s.backup_at(&dom, "incremental", &[]);
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
    let s = scratch("kill9");
    let (_, full) = s.backup_at(&dom, "full", &[]);
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

/// `qemu-img compare` of a qcow2 (with its chain) against a raw reference.
fn same_as(qcow2: &Path, reference: &Path) -> bool {
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &qcow2.display().to_string(),
        &reference.display().to_string(),
    ]);
    if !out.status.success() {
        let (o, e) = texts(&out);
        eprintln!("compare {}:\n{o}\n{e}", qcow2.display());
    }
    out.status.success()
}

/// A raw copy of `image` taken while the domain is paused (its disk as of the next backup).
fn reference_of(image: &str, to: &Path) {
    qemu_img_ok(&[
        "convert",
        "-U",
        "-O",
        "raw",
        image,
        &to.display().to_string(),
    ]);
}

/// The bitmaps named `vmb-*` in a qcow2 image.
fn our_bitmaps(image: &Path) -> Vec<String> {
    vm_backup::hv::qemu_img::bitmaps(image)
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .filter(|n| n.starts_with("vmb-"))
        .collect()
}

#[test]
fn inl_chain_survives_a_restart_verifies_lists_test_restores_and_prunes_whole() {
    if !lab_enabled("inl_chain_survives_a_restart_verifies_lists_test_restores_and_prunes_whole") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = scratch("restart");
    let (full_dir, full) = s.backup_at(&dom, "full", &[]);
    assert!(full.chain.checkpoint.is_some());

    // Shut off: an incremental of an offline VM is a full, and says why (on another target,
    // so the chain above goes on).
    shutdown_wait(&dom);
    let off = scratch("offline");
    let (_, offline) = off.backup_at(&dom, "incremental", &[]);
    assert_eq!(offline.level(), BackupLevel::Full);
    assert_eq!(
        offline.chain.level_requested,
        Some(BackupLevel::Incremental)
    );
    let note = offline.chain.level_note.clone().unwrap_or_default();
    assert!(note.contains("not running"), "{note}");
    // (`off` is dropped at the end: its drop removes our checkpoints from the domain.)
    // Started again: the bitmaps were written at shutdown and QEMU loads them.
    start_and_wait(&dom);
    let image = the_disk(&dom);
    let ck = full.chain.checkpoint.clone().unwrap();
    let bm = vm_backup::hv::qemu_img::bitmaps(Path::new(&image)).unwrap();
    assert!(
        bm.iter().any(|b| b.name == ck && !b.is_inconsistent()),
        "{bm:?}"
    );

    // Still an incremental, byte-exact.
    gexec_ok(
        &dom,
        "dd if=/dev/urandom of=/mnt/data/a.bin bs=64k count=8 2>/dev/null && sync",
    );
    let ref1 = s.dir.join("ref1.raw");
    let (inc_dir, inc) = {
        let _p = Paused::new(&dom);
        reference_of(&image, &ref1);
        s.backup_at(&dom, "incremental", &["--method", "snapshot"])
    };
    assert_eq!(inc.level(), BackupLevel::Incremental, "{:?}", inc.chain);
    assert_eq!(inc.chain.parent.as_deref(), Some(full.stamp.as_str()));
    assert!(inc.chain.full_disks.is_empty(), "{:?}", inc.chain);
    assert!(same_as(&inc_dir.join(&inc.disks[0].file), &ref1));

    // A differential holds every change since the full (A and B), on the full.
    gexec_ok(
        &dom,
        "dd if=/dev/urandom of=/mnt/data/b.bin bs=64k count=8 2>/dev/null && sync",
    );
    let ref2 = s.dir.join("ref2.raw");
    let (diff_dir, diff) = {
        let _p = Paused::new(&dom);
        reference_of(&image, &ref2);
        s.backup_at(&dom, "differential", &["--method", "snapshot"])
    };
    assert_eq!(diff.level(), BackupLevel::Differential, "{:?}", diff.chain);
    assert_eq!(diff.chain.parent.as_deref(), Some(full.stamp.as_str()));
    assert!(same_as(&diff_dir.join(&diff.disks[0].file), &ref2));
    assert!(!same_as(&inc_dir.join(&inc.disks[0].file), &ref2));

    // verify of the incremental checks its whole chain.
    let verify = |stamp: &str| {
        let out = s.vmb(&["verify", &dom, stamp, "--json"]);
        let (o, e) = texts(&out);
        let v: serde_json::Value =
            serde_json::from_str(&o).unwrap_or_else(|_| panic!("verify --json:\n{o}\n{e}"));
        (out.status.code(), v[0].clone())
    };
    let (code, report) = verify(&inc.stamp);
    assert_eq!(code, Some(0), "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    let parent_file = format!("../{}/{}", full.stamp, full.disks[0].file);
    assert!(
        checks.iter().any(|c| c["file"] == parent_file.as_str()
            && c["check"] == "manifest"
            && c["ok"] == true),
        "{report:#}"
    );
    for kind in ["chain link", "whole chain"] {
        assert!(
            checks.iter().any(|c| c["check"] == kind && c["ok"] == true),
            "{kind}: {report:#}"
        );
    }

    // list shows the chain.
    let out = s.vmb(&["list", &dom, "--json"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let rows: serde_json::Value = serde_json::from_str(&o).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stamp"] == inc.stamp.as_str())
        .unwrap_or_else(|| panic!("{rows:#}"));
    assert_eq!(row["chain"]["level"], "incremental", "{row:#}");
    assert_eq!(row["chain"]["parent"], full.stamp.as_str());
    assert_eq!(row["chain"]["chain"], full.stamp.as_str());
    assert_eq!(row["chain"]["depth"], 1);
    let text = texts(&s.vmb(&["list", &dom])).0;
    assert!(
        text.contains(&format!("└ incremental ({})", full.stamp)),
        "{text}"
    );

    // test-restore of the incremental restores the chain and boots it.
    let work = s.dir.join("tr");
    fs::create_dir_all(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
    let out = s.vmb(&[
        "test-restore",
        &dom,
        &inc.stamp,
        "--work-dir",
        &work.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(
        out.status.success(),
        "test-restore of the incremental:\n{o}\n{e}"
    );
    let md = BackupMetadata::read(&inc_dir).unwrap();
    assert!(
        md.test_restore.as_ref().is_some_and(|v| v.ok),
        "{:?}",
        md.test_restore
    );

    // A damaged parent fails the incremental's verify, naming the parent's file.
    let parent_img = full_dir.join(&full.disks[0].file);
    let flip = |at: u64| {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&parent_img)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0xff;
        f.write_all_at(&b, at).unwrap();
    };
    let at = full.disks[0].file_size / 2;
    flip(at);
    let (code, report) = verify(&inc.stamp);
    flip(at);
    assert_ne!(code, Some(0), "{report:#}");
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["file"] == parent_file.as_str() && c["ok"] == false),
        "{report:#}"
    );
    assert_eq!(
        verify(&inc.stamp).0,
        Some(0),
        "repaired parent verifies again"
    );

    // Prune counts chains: keep-last 1 keeps the one chain whole; after a new full, the
    // old chain goes whole.
    fs::write(
        s.dir.join("vm-list.yaml"),
        format!("vms:\n  - name: {dom}\n    retention: {{keep_last: 1}}\n"),
    )
    .unwrap();
    let out = s.vmb(&["prune"]);
    assert!(out.status.success(), "{:?}", texts(&out));
    for d in [&full_dir, &inc_dir, &diff_dir] {
        assert!(d.exists(), "{} pruned out of a kept chain", d.display());
    }
    let (new_dir, new_full) = s.backup_at(&dom, "full", &[]);
    // (verified, so that "newest verified backup" is not the old incremental)
    assert_eq!(verify(&new_full.stamp).0, Some(0));
    let out = s.vmb(&["prune"]);
    assert!(out.status.success(), "{:?}", texts(&out));
    for d in [&full_dir, &inc_dir, &diff_dir] {
        assert!(
            !d.exists(),
            "{} kept: the old chain goes whole",
            d.display()
        );
    }
    assert!(new_dir.exists());
}

/// Detaches a disk attached for a test; if the guest does not let it go, a clean restart
/// (the persistent definition never had it).
struct Attached {
    dom: String,
    target: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = virsh(&["detach-disk", &self.dom, &self.target, "--live"]);
        std::thread::sleep(Duration::from_secs(2));
        if disk_sources(&self.dom)
            .iter()
            .any(|(t, _)| *t == self.target)
        {
            let _ = virsh(&["shutdown", &self.dom, "--mode", "agent"]);
            wait_state(&self.dom, "shut off", Duration::from_secs(60));
            start_and_wait(&self.dom);
        }
    }
}

#[test]
fn inl_a_disk_added_or_a_bitmap_lost_is_copied_in_full_inside_the_incremental() {
    if !lab_enabled("inl_a_disk_added_or_a_bitmap_lost_is_copied_in_full_inside_the_incremental") {
        return;
    }
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    drop_our_checkpoints(&dom);
    let s = scratch("perdisk");
    let (_, full) = s.backup_at(&dom, "full", &[]);
    assert_eq!(full.disks.len(), 1);

    // A disk added since the full.
    let vdb = s.dir.join("vdb.qcow2");
    let vdb_s = vdb.display().to_string();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &vdb_s, "32M"]);
    fs::set_permissions(&vdb, fs::Permissions::from_mode(0o666)).unwrap();
    virsh_ok(&[
        "attach-disk",
        &dom,
        &vdb_s,
        "vdb",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--live",
    ]);
    let _attached = Attached {
        dom: dom.clone(),
        target: "vdb".into(),
    };
    let (inc_dir, inc) = s.backup_at(&dom, "incremental", &[]);
    assert_eq!(inc.level(), BackupLevel::Incremental, "{:?}", inc.chain);
    let why = inc.chain.full_disks.get("vdb").cloned().unwrap_or_default();
    assert!(why.contains("was added"), "{:?}", inc.chain);
    assert!(!inc.chain.full_disks.contains_key("vda"));
    let log = fs::read_to_string(inc_dir.join("backup.log")).unwrap_or_default();
    assert!(
        log.contains("vdb: copied in full inside the incremental"),
        "{log}"
    );
    let file_of = |md: &BackupMetadata, t: &str| {
        md.disks
            .iter()
            .find(|d| d.target == t)
            .unwrap()
            .file
            .clone()
    };
    let backing = |p: &Path| -> Option<String> {
        vm_backup::hv::qemu_img::info(p, "qcow2")
            .unwrap()
            .backing_filename
    };
    assert_eq!(backing(&inc_dir.join(file_of(&inc, "vdb"))), None);
    assert_eq!(
        backing(&inc_dir.join(file_of(&inc, "vda"))),
        Some(format!("../{}/{}", full.stamp, file_of(&full, "vda")))
    );

    // vda's bitmap removed by hand: vda in full, vdb (now with a bitmap) incrementally.
    let vda = the_disk(&dom);
    remove_bitmap_live(&dom, &vda, inc.chain.checkpoint.as_deref().unwrap());
    gexec_ok(
        &dom,
        "dd if=/dev/urandom of=/mnt/data/c.bin bs=64k count=4 2>/dev/null && sync",
    );
    let (ref_a, ref_b) = (s.dir.join("vda.raw"), s.dir.join("vdb.raw"));
    let (inc2_dir, inc2) = {
        let _p = Paused::new(&dom);
        reference_of(&vda, &ref_a);
        reference_of(&vdb_s, &ref_b);
        s.backup_at(&dom, "incremental", &["--method", "snapshot"])
    };
    assert_eq!(inc2.level(), BackupLevel::Incremental, "{:?}", inc2.chain);
    assert_eq!(inc2.chain.parent.as_deref(), Some(inc.stamp.as_str()));
    let why = inc2
        .chain
        .full_disks
        .get("vda")
        .cloned()
        .unwrap_or_default();
    assert!(why.contains("missing"), "{:?}", inc2.chain);
    assert!(
        !inc2.chain.full_disks.contains_key("vdb"),
        "{:?}",
        inc2.chain
    );
    assert_eq!(backing(&inc2_dir.join(file_of(&inc2, "vda"))), None);
    assert_eq!(
        backing(&inc2_dir.join(file_of(&inc2, "vdb"))),
        Some(format!("../{}/{}", inc.stamp, file_of(&inc, "vdb")))
    );
    assert!(same_as(&inc2_dir.join(file_of(&inc2, "vda")), &ref_a));
    assert!(same_as(&inc2_dir.join(file_of(&inc2, "vdb")), &ref_b));
    let out = s.vmb(&["verify", &dom, &inc2.stamp]);
    assert!(out.status.success(), "{:?}", texts(&out));

    // The mixed folder restores: each disk to its point in time, without our bitmaps.
    let copy = format!("{dom}-mixcopy");
    let _undefine = Undefine(copy.clone());
    let disk_dir = s.dir.join("copy-disks");
    let out = s.vmb(&[
        "restore",
        &dom,
        &inc2.stamp,
        "--as",
        &copy,
        "--disk-dir",
        &disk_dir.display().to_string(),
    ]);
    assert!(out.status.success(), "{:?}", texts(&out));
    for (t, reference) in [("vda", &ref_a), ("vdb", &ref_b)] {
        let restored = disk_dir.join(format!("{copy}-{t}.qcow2"));
        assert!(same_as(&restored, reference), "{t}");
        assert_eq!(our_bitmaps(&restored), Vec::<String>::new(), "{t}");
    }
}
