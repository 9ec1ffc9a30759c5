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
    // No overlay, no server, no journal left.
    assert!(s.servers().is_empty(), "{:?}", s.servers());
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
