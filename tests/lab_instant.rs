//! Lab tests of `vm-backup restore --instant` on backups made by the real `vm-backup backup`
//! of the agent guest. Skipped unless VMB_LAB_LIBVIRT=1. Run with the lab prefix up
//! (`lab/libvirt-lab.sh up ins --only agent`):
//! `VMB_LAB_PREFIX=ins VMB_LAB_LIBVIRT=1 cargo test --test lab_instant -- --test-threads=1`.
//!
//! The restored domain (from an incremental on a full: the chain is followed) boots from
//! local overlays over the read-only backup, the guest agent answers, files the guest wrote
//! between the backups, during and after the copy end up on the final disk, which has no
//! backing file and still holds the backup's files; the backup's files (content, owner, mode,
//! times) are unchanged. A restore killed with `kill -9` during the copy leaves
//! the domain running on its overlays, `orphans` reports it and `orphans --cleanup` finishes.
//! Every read goes through the verify-on-read layer: a byte flipped in the parent of an
//! incremental fails the restore naming the file and the chunk, and leaves no disk, domain,
//! mount, server or journal, and the backup unchanged.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// The scratch target of these tests: `LabTarget` (its domains, our checkpoints of
/// `checkpoints_of` and the folder are cleaned up on drop), plus [`InstantTarget`].
type Scratch = LabTarget;

/// What the instant-restore tests add to `LabTarget`.
trait InstantTarget {
    /// Backs up `dom` at `level` (`full`: no checkpoint); returns the backup folder.
    fn backup_level(&self, dom: &str, level: &str) -> PathBuf;
    /// Every file of the target with owner, mode, size, mtime and SHA-256.
    fn target_state(&self) -> Vec<String>;
    /// qemu-storage-daemon processes serving from this scratch folder.
    fn servers(&self) -> Vec<String>;
}

impl InstantTarget for LabTarget {
    fn backup_level(&self, dom: &str, level: &str) -> PathBuf {
        if level == "full" {
            self.backup(dom)
        } else {
            self.backup_with(dom, &["--level", level])
        }
    }

    fn target_state(&self) -> Vec<String> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . -exec stat -c '%n %u:%g %a %s %Y' {{}} + | sort && \
                 find . -type f -exec sha256sum {{}} + | sort",
                self.target().display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn servers(&self) -> Vec<String> {
        self.leftovers()
            .into_iter()
            .filter(|l| l.contains("qemu-storage-daemon"))
            .filter_map(|l| l.strip_prefix("process: ").map(str::to_string))
            .collect()
    }
}

/// `vm-backup orphans` reports nothing of `name` (the libvirt daemons are shared: other
/// engineers' domains may show up).
fn no_orphan_of(s: &Scratch, name: &str) {
    let o = s.vmb(&["orphans"]);
    let (out, err) = texts(&o);
    assert_ne!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(
        !out.lines().any(|l| l.starts_with(&format!("{name} "))),
        "{out}"
    );
}

/// Checks the final state of an instantly restored domain after the guest wrote `written`
/// (guest path under /mnt/data → content): running on `dest`, live and persistent; `dest`
/// stands alone; after a clean shutdown it holds the backup's seed files and what was written.
fn check_final(dom: &str, dest: &Path, backup_image: &Path, written: &[(&str, &str)]) {
    let dest_s = dest.display().to_string();
    assert_eq!(
        disk_sources(dom),
        vec![("vda".to_string(), dest_s.clone())],
        "live disks of {dom}"
    );
    let inactive = virsh_ok(&["dumpxml", "--inactive", dom]);
    assert!(
        inactive.contains(&format!("<source file='{dest_s}'/>")),
        "persistent XML of {dom} names {dest_s}:\n{inactive}"
    );
    assert!(!inactive.contains(".vmb-instant"), "{inactive}");
    assert!(
        !has_backing_store(dom, false),
        "live XML has a backing store"
    );
    for (path, content) in written {
        assert_eq!(
            gexec_ok(dom, &format!("cat /mnt/data/{path}")).trim(),
            *content
        );
    }
    shutdown_wait(dom);
    assert_eq!(backing_chain_len(dest), 1, "{dest_s} has a backing file");
    // The backup's own files are on the final disk.
    for f in ["/seed.txt", "/random.bin"] {
        let from_backup = ext4_cat(backup_image, f).expect("file in the backup");
        let on_final = ext4_cat(dest, f).expect("file on the final disk");
        assert!(from_backup == on_final, "{f} differs from the backup");
    }
    for (path, content) in written {
        let got = ext4_cat(dest, &format!("/{path}"))
            .unwrap_or_else(|| panic!("{path} missing on the final disk"));
        assert_eq!(String::from_utf8_lossy(&got).trim(), *content, "{path}");
    }
    let check = Command::new("qemu-img")
        .args(["check", "-q", &dest_s])
        .output()
        .unwrap();
    assert!(check.status.success(), "qemu-img check {dest_s}");
}

#[test]
fn instant_restore_runs_at_once_and_ends_on_standalone_local_disks() {
    if !lab_enabled("instant_restore_runs_at_once_and_ends_on_standalone_local_disks") {
        return;
    }
    let mut s = Scratch::new("inst");
    let src = agent_dom();
    // An incremental on a full: the instant restore follows the chain.
    s.checkpoints_of = Some(src.clone());
    s.vmb_ok(&["backup", &src, "--level", "full"]);
    gexec_ok(
        &src,
        "echo between-backups > /mnt/data/instant-incr.txt && sync",
    );
    let bdir = s.backup_level(&src, "incremental");
    let meta = fs::read_to_string(bdir.join("backup-metadata.json")).unwrap();
    assert!(
        meta.contains("\"parent\": \"20"),
        "not an incremental:\n{meta}"
    );
    let image = bdir.join(format!("{src}-vda.qcow2"));
    let before = s.target_state();
    let name = format!("{}-inst", prefix());
    s.domains.push(name.clone());
    let restored = s.dir.join("restored");
    let t0 = Instant::now();
    let out = s.vmb_ok(&[
        "restore",
        &src,
        "latest",
        "--instant",
        "--as",
        &name,
        "--disk-dir",
        &restored.display().to_string(),
    ]);
    let done = t0.elapsed();
    assert!(out.contains(&format!("as domain {name}")), "{out}");
    assert_eq!(domstate(&name), "running");
    wait_agent(&name, Duration::from_secs(180));
    eprintln!(
        "BENCH instant restore command {:.1} s, agent answering {:.1} s after the command",
        done.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let dest = restored.join(format!("{name}-vda.qcow2"));
    gexec_ok(
        &name,
        "echo after-copy > /mnt/data/instant-after.txt && sync",
    );
    // No overlay, no server, no mount, no journal left.
    assert!(s.servers().is_empty(), "{:?}", s.servers());
    assert!(
        mounts_under(&s.dir).is_empty(),
        "{:?}",
        mounts_under(&s.dir)
    );
    let left: Vec<_> = fs::read_dir(&restored)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vmb-instant"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    no_orphan_of(&s, &name);
    check_final(
        &name,
        &dest,
        &image,
        &[
            ("instant-incr.txt", "between-backups"),
            ("instant-after.txt", "after-copy"),
        ],
    );
    assert_eq!(s.target_state(), before, "the backup changed");
    // A second instant restore under the same name is refused while the domain exists.
    let again = s.vmb(&[
        "restore",
        &src,
        "latest",
        "--instant",
        "--as",
        &name,
        "--disk-dir",
        &s.dir.join("again").display().to_string(),
    ]);
    assert!(!again.status.success());
    assert!(
        texts(&again).1.contains("already defined"),
        "{:?}",
        texts(&again)
    );
    assert_eq!(s.target_state(), before, "the backup changed");
}

#[test]
fn an_instant_restore_killed_during_the_copy_keeps_running_and_orphans_finishes_it() {
    if !lab_enabled(
        "an_instant_restore_killed_during_the_copy_keeps_running_and_orphans_finishes_it",
    ) {
        return;
    }
    let mut s = Scratch::new("kill");
    let src = agent_dom();
    let bdir = s.backup(&src);
    let image = bdir.join(format!("{src}-vda.qcow2"));
    let before = s.target_state();
    let name = format!("{}-instk", prefix());
    s.domains.push(name.clone());
    let restored = s.dir.join("restored");
    let mut child = s
        .vmb_cmd(&[
            "restore",
            &src,
            "latest",
            "--instant",
            "--as",
            &name,
            "--disk-dir",
            &restored.display().to_string(),
        ])
        .env("VMB_TEST_INSTANT_STALL_SECS", "600")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the copy to have started (the test hook holds before the pivot).
    let journal = s.dir.join(format!("journal/journal/{name}.json"));
    let t0 = Instant::now();
    loop {
        let phase = fs::read_to_string(&journal).unwrap_or_default();
        if phase.contains("instant-copying") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the copy did not start: {phase}"
        );
        assert!(child.try_wait().unwrap().is_none(), "the restore ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_agent(&name, Duration::from_secs(180));
    // Written while the block copy runs (the disk is on the overlay, mirrored).
    gexec_ok(
        &name,
        "echo during-copy > /mnt/data/instant-during.txt && sync",
    );
    let overlay = restored.join(format!("{name}-vda.qcow2.vmb-instant.qcow2"));
    assert_eq!(
        disk_sources(&name),
        vec![("vda".to_string(), overlay.display().to_string())]
    );
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    // Left running on its overlay, never on a half-copied disk.
    assert_eq!(domstate(&name), "running");
    assert_eq!(
        disk_sources(&name),
        vec![("vda".to_string(), overlay.display().to_string())]
    );
    assert!(agent_ping(&name));
    // The verify-on-read folder outlives the killed command (the journal names it).
    assert!(
        mounts_under(&s.dir).iter().any(|m| m.ends_with("/layers")),
        "{:?}",
        mounts_under(&s.dir)
    );
    let report = s.vmb(&["orphans"]);
    let (o, e) = texts(&report);
    assert_eq!(report.status.code(), Some(3), "{o}\n{e}");
    assert!(o.contains(&name) && o.contains("instant restore"), "{o}");
    let fixed = s.vmb(&["orphans", "--repair"]);
    let (o, e) = texts(&fixed);
    assert_eq!(fixed.status.code(), Some(0), "{o}\n{e}");
    assert!(o.contains("pivoted"), "{o}");
    assert!(!journal.exists());
    assert!(s.servers().is_empty(), "{:?}", s.servers());
    assert!(
        mounts_under(&s.dir).is_empty(),
        "{:?}",
        mounts_under(&s.dir)
    );
    assert!(!overlay.exists());
    no_orphan_of(&s, &name);
    gexec_ok(
        &name,
        "echo after-repair > /mnt/data/instant-after.txt && sync",
    );
    let dest = restored.join(format!("{name}-vda.qcow2"));
    check_final(
        &name,
        &dest,
        &image,
        &[
            ("instant-during.txt", "during-copy"),
            ("instant-after.txt", "after-repair"),
        ],
    );
    assert_eq!(s.target_state(), before, "the backup changed");
}

/// Mount points under `dir` (nothing may stay mounted after a restore, whatever its end).
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect()
}

/// Processes whose command line mentions `dir` (the NBD server, the verify-on-read server).
fn processes_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for p in fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        if p.file_name().to_string_lossy() == me {
            continue;
        }
        if let Ok(c) = fs::read(p.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&d) && !c.contains("cargo") {
                out.push(c);
            }
        }
    }
    out
}

/// Flips one byte of `file` at `at`.
fn flip_byte(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
}

/// The host offset, in the image `depth` levels below `top`, of the middle of the largest
/// data extent the guest sees from that image (`qemu-img map` of the chain).
fn data_offset_at_depth(top: &Path, depth: u64) -> u64 {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-U"])
        .arg(top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", texts(&out));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let best = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == depth && e["data"] == true && e["offset"].is_u64())
        .max_by_key(|e| e["length"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("no data extent at depth {depth}: {map}"));
    best["offset"].as_u64().unwrap() + best["length"].as_u64().unwrap() / 2
}

#[test]
fn an_instant_restore_from_a_damaged_chain_fails_naming_the_chunk_and_leaves_nothing() {
    if !lab_enabled(
        "an_instant_restore_from_a_damaged_chain_fails_naming_the_chunk_and_leaves_nothing",
    ) {
        return;
    }
    let mut s = Scratch::new("dmg");
    let src = agent_dom();
    // An incremental on a full; the byte is flipped in the full (the parent): every image of
    // the chain is read through the verify-on-read layer.
    s.checkpoints_of = Some(src.clone());
    // Data past the first chunk (the qcow2 header's), so that the damage is met by the guest
    // or the block copy, after the domain started.
    gexec_ok(
        &src,
        "dd if=/dev/urandom of=/mnt/data/instant-big.bin bs=1M count=12 2>/dev/null && sync",
    );
    s.vmb_ok(&["backup", &src, "--level", "full"]);
    gexec_ok(&src, "rm -f /mnt/data/instant-big.bin && sync");
    let vm_dir = s.dir.join("target/labhost").join(&src);
    let full_dir = vm_dir.join(
        vm_backup::format::layout::VmDir {
            path: vm_dir.clone(),
        }
        .latest()
        .unwrap()
        .expect("the full backup"),
    );
    let full_meta = vm_backup::format::metadata::BackupMetadata::read(&full_dir).unwrap();
    assert!(full_meta.chain.parent.is_none(), "{full_meta:?}");
    gexec_ok(
        &src,
        "echo damaged-chain > /mnt/data/instant-dmg.txt && sync",
    );
    let bdir = s.backup_level(&src, "incremental");
    assert_ne!(full_dir, bdir);
    let full = vm_backup::format::metadata::BackupMetadata::read(&full_dir).unwrap();
    let parent_img = full_dir.join(&full.disks[0].file);
    let top = bdir.join(format!("{src}-vda.qcow2"));
    let at = data_offset_at_depth(&top, 1);
    let chunk = at / full.disks[0].manifest.chunk_size;
    assert!(chunk > 0, "the damage would be in the header's chunk");
    flip_byte(&parent_img, at);
    let before = s.target_state();

    let name = format!("{}-instd", prefix());
    s.domains.push(name.clone());
    let restored = s.dir.join("restored");
    let dest = restored.join(format!("{name}-vda.qcow2"));
    let out = s.vmb(&[
        "restore",
        &src,
        "latest",
        "--instant",
        "--as",
        &name,
        "--disk-dir",
        &restored.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    eprintln!("restore from the damaged chain:\n{o}\n{e}");
    // The command fails, naming the file and the chunk.
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(e.contains("is damaged"), "{e}");
    assert!(
        e.contains(&format!("{}: chunk {chunk} ", parent_img.display())),
        "chunk {chunk} of {} not named:\n{e}",
        parent_img.display()
    );
    // Never a local disk made from the damaged data, no domain, nothing mounted or running.
    assert!(!dest.exists(), "{} exists", dest.display());
    assert!(
        !virsh(&["domstate", &name]).status.success(),
        "domain {name} is still defined"
    );
    let left: Vec<_> = fs::read_dir(&restored)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                // The console log the domain wrote while it ran may stay.
                .filter(|p| p.extension().is_none_or(|x| x != "log"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", restored.display());
    assert!(
        mounts_under(&s.dir).is_empty(),
        "{:?}",
        mounts_under(&s.dir)
    );
    assert!(
        processes_under(&s.dir).is_empty(),
        "{:?}",
        processes_under(&s.dir)
    );
    assert!(!s.dir.join(format!("journal/journal/{name}.json")).exists());
    // The backup is unchanged byte for byte (the flipped byte included), nothing is left.
    assert_eq!(s.target_state(), before, "the backup changed");
    no_orphan_of(&s, &name);
    let report = s.vmb(&["orphans"]);
    let (o, e) = texts(&report);
    assert!(!o.contains("[mount]"), "{o}\n{e}");
    flip_byte(&parent_img, at);
}

#[test]
fn files_read_an_incremental_through_its_chain() {
    if !lab_enabled("files_read_an_incremental_through_its_chain") {
        return;
    }
    let mut s = Scratch::new("fincr");
    let src = agent_dom();
    s.checkpoints_of = Some(src.clone());
    s.vmb_ok(&["backup", &src, "--level", "full"]);
    gexec_ok(
        &src,
        "echo in-the-increment > /mnt/data/files-incr.txt && sync",
    );
    let bdir = s.backup_level(&src, "incremental");
    let meta = vm_backup::format::metadata::BackupMetadata::read(&bdir).unwrap();
    let parent = meta.chain.parent.clone().expect("an incremental");
    assert!(
        meta.chain.disk_has_parent("vda"),
        "vda copied in full: {:?}",
        meta.chain
    );
    let stamp = bdir.file_name().unwrap().to_string_lossy().into_owned();
    // A file of the increment, and one only the parent (the full) holds.
    let out = s.vmb_ok(&["files", &src, &stamp, "cat", "/files-incr.txt"]);
    assert_eq!(out.trim(), "in-the-increment");
    let seed = s.vmb_ok(&["files", &src, &stamp, "cat", "/seed.txt"]);
    let full_img = bdir
        .parent()
        .unwrap()
        .join(&parent)
        .join(format!("{src}-vda.qcow2"));
    let from_full = ext4_cat(&full_img, "/seed.txt").expect("seed in the full");
    assert_eq!(seed.as_bytes(), &from_full[..]);
    // 1 MiB of random data written before the full: its blocks are only in the parent.
    let random = s
        .vmb_cmd(&["files", &src, &stamp, "cat", "/random.bin"])
        .output()
        .unwrap();
    assert!(random.status.success(), "{:?}", texts(&random));
    let from_full = ext4_cat(&full_img, "/random.bin").expect("random.bin in the full");
    assert!(
        random.stdout == from_full,
        "random.bin differs from the full's"
    );
    assert!(
        mounts_under(&s.dir).is_empty(),
        "{:?}",
        mounts_under(&s.dir)
    );
    gexec_ok(&src, "rm -f /mnt/data/files-incr.txt && sync");
}
