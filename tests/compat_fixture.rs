//! Compatibility with backups written before the rooms redesign (issue 8): a backup taken by
//! vm-backup 0.1.0 (main at 33b499a) is kept in `tests/fixtures/backup-v0.1.0/` and this code
//! must still list, verify and restore it. See `tests/fixtures/backup-v0.1.0/README.md` for how
//! it was made and what its disk holds.
//!
//! The committed fixture is never modified: every test works on a copy in a temporary folder.
//! The restore test needs libvirt and is skipped unless `VMB_LAB_LIBVIRT=1` (see tests/support);
//! it only needs the lab's daemons (`lab/libvirt-lab.sh daemons`), no lab domain.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{lab_enabled, prefix, virsh, virsh_ok, vm_backup};

/// The hypervisor folder the old backup was written under (`hostname` in its configuration).
const HOST: &str = "fixturehost";
/// The backed-up domain.
const VM: &str = "fixture-vm";
/// The backup's stamp.
const STAMP: &str = "2026-11-29-123424";
/// The disk image of vda in the backup.
const DISK: &str = "fixture-vm-vda.qcow2";

/// The committed fixture: a target holding one backup.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backup-v0.1.0")
}

/// Copies a folder tree (plain files and folders only).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dst);
        } else {
            fs::copy(entry.path(), &dst).unwrap();
        }
    }
}

/// A copy of the fixture's target in `parent/target` (without the fixture's README).
fn copy_fixture(parent: &Path) -> PathBuf {
    let target = parent.join("target");
    copy_tree(&fixture().join(HOST), &target.join(HOST));
    // A target written before markers existed: `vm-backup init` adopts it.
    let out = vmb(&target, &["init"]);
    assert!(out.status.success(), "{:?}", texts(&out));
    target
}

/// The backup folder inside a target.
fn backup_dir(target: &Path) -> PathBuf {
    target.join(HOST).join(VM).join(STAMP)
}

/// Runs `vm-backup ARGS --target TARGET --config /dev/null` (no site configuration).
fn vmb(target: &Path, args: &[&str]) -> Output {
    vm_backup()
        .args(args)
        .arg("--target")
        .arg(target)
        .args(["--config", "/dev/null"])
        .output()
        .expect("run vm-backup")
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn list_shows_the_old_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let target = copy_fixture(tmp.path());

    let out = vmb(&target, &["list", "--json"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "list failed:\n{o}\n{e}");
    let rows: serde_json::Value = serde_json::from_str(&o).expect("list --json prints JSON");
    let rows = rows.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 1, "{o}");
    let row = &rows[0];
    assert_eq!(row["host"], HOST, "{o}");
    assert_eq!(row["vm"], VM, "{o}");
    assert_eq!(row["stamp"], STAMP, "{o}");
    assert_eq!(row["method"], "offline", "{o}");
    assert_eq!(row["result"], "success", "{o}");
    assert_eq!(row["total_bytes"], 720896, "{o}");

    // The table names it too.
    let out = vmb(&target, &["list", VM]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "list {VM} failed:\n{o}\n{e}");
    assert!(o.contains(STAMP) && o.contains(HOST), "{o}");
}

#[test]
fn verify_passes_on_the_old_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let target = copy_fixture(tmp.path());

    for stamp in [STAMP, "latest"] {
        let out = vmb(&target, &["verify", VM, stamp, "--host", HOST]);
        let (o, e) = texts(&out);
        assert!(
            out.status.success(),
            "verify {VM} {stamp} failed:\n{o}\n{e}"
        );
        assert!(o.contains("0 with faults"), "{o}");
    }
    let out = vmb(&target, &["verify", "--all"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "verify --all failed:\n{o}\n{e}");
    assert!(o.contains("1 backup(s) verified, 0 with faults"), "{o}");
}

/// Flips one byte of `file` at `offset`.
fn flip_byte(file: &Path, offset: usize) {
    let mut bytes = fs::read(file).unwrap();
    bytes[offset] ^= 0xff;
    fs::write(file, bytes).unwrap();
}

#[test]
fn verify_names_the_file_with_a_flipped_byte() {
    // A byte in the first data cluster of the image (qcow2 stays well-formed, only the hashes
    // can see it), then a byte of the domain XML.
    for (file, offset) in [(DISK, 0x50000 + 100), ("fixture-vm.xml", 20)] {
        let tmp = tempfile::tempdir().unwrap();
        let target = copy_fixture(tmp.path());
        flip_byte(&backup_dir(&target).join(file), offset);

        let out = vmb(&target, &["verify", VM, STAMP, "--host", HOST]);
        let (o, e) = texts(&out);
        assert!(
            !out.status.success(),
            "verify passed with a flipped byte in {file}:\n{o}\n{e}"
        );
        assert!(o.contains("FAILED"), "{o}\n{e}");
        assert!(
            o.contains(file) || e.contains(file),
            "verify must name {file}:\n{o}\n{e}"
        );
        // Only that file is named as damaged.
        let other = if file == DISK { "fixture-vm.xml" } else { DISK };
        assert!(!o.contains(&format!("{other}:")), "{o}");
    }

    // The committed fixture was not touched.
    let copy = tempfile::tempdir().unwrap();
    let target = copy_fixture(copy.path());
    let out = vmb(&target, &["verify", VM, STAMP, "--host", HOST]);
    assert!(out.status.success(), "{:?}", texts(&out));
}

/// Runs `qemu-img ARGS`, returns its output.
fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

/// A restore folder QEMU could traverse, and the domain restored into it: removed on drop,
/// also when an assertion fails.
struct Restored {
    dir: PathBuf,
    domain: String,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.domain]);
        let _ = virsh(&["undefine", &self.domain, "--nvram"]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn restore_as_a_new_domain_gives_back_the_old_disk() {
    if !lab_enabled("restore_as_a_new_domain_gives_back_the_old_disk") {
        return;
    }
    let guard = Restored {
        dir: PathBuf::from(format!(
            "/var/tmp/vmb-{}-compat-{}",
            prefix(),
            std::process::id()
        )),
        domain: format!("{}-fixture-restored", prefix()),
    };
    let _ = fs::remove_dir_all(&guard.dir);
    let _ = virsh(&["undefine", &guard.domain, "--nvram"]);
    let target = copy_fixture(&guard.dir);
    let disk_dir = guard.dir.join("disks");
    let dd = disk_dir.display().to_string();

    let out = vmb(
        &target,
        &[
            "restore",
            VM,
            "latest",
            "--host",
            HOST,
            "--as",
            &guard.domain,
            "--disk-dir",
            &dd,
        ],
    );
    let (o, e) = texts(&out);
    assert!(out.status.success(), "restore failed:\n{o}\n{e}");

    // Defined, shut off, on the restored disk.
    assert_eq!(
        virsh_ok(&["domstate", &guard.domain]).trim(),
        "shut off",
        "{o}\n{e}"
    );
    let restored = disk_dir.join(format!("{}-vda.qcow2", guard.domain));
    assert!(restored.is_file(), "no {}:\n{o}\n{e}", restored.display());
    let xml = virsh_ok(&["dumpxml", &guard.domain, "--inactive"]);
    assert!(xml.contains(&restored.display().to_string()), "{xml}");
    assert!(!xml.contains("/var/tmp/vmb-fixture/"), "{xml}");

    // The disk holds what the backup holds, and the data written before the backup.
    let backup_image = backup_dir(&fixture()).join(DISK);
    let r = restored.display().to_string();
    let b = backup_image.display().to_string();
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", &r, &b]);
    assert!(
        cmp.status.success(),
        "restored disk differs from the backup: {:?}",
        texts(&cmp)
    );
    for (pattern, offset, len) in [
        ("0xab", "0", "256k"),
        ("0x5c", "1M", "64k"),
        ("0x3e", "3M", "32k"),
    ] {
        let read = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c"])
            .arg(format!("read -P {pattern} {offset} {len}"))
            .arg(&restored)
            .output()
            .expect("run qemu-io");
        let (o, e) = texts(&read);
        assert!(
            read.status.success() && !o.contains("verification failed"),
            "restored disk lacks {len} of {pattern} at {offset}:\n{o}\n{e}"
        );
    }

    drop(guard);
}
