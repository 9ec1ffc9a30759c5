//! Lab tests of file-level restore (`vm-backup files`, `mount`, `umount`, `orphans` of mount
//! chains) on backups made by the real `vm-backup backup`. Skipped unless VMB_LAB_LIBVIRT=1.
//! Run with the lab prefix `fil` up (`lab/libvirt-lab.sh up fil --only agent`):
//! `VMB_LAB_PREFIX=fil VMB_LAB_LIBVIRT=1 cargo test --test lab_files -- --test-threads=1`.
//!
//! Disks are prepared on the host with known files (owner, mode, times, a symlink, a file of
//! several 4 MiB chunks): ext4 on the whole disk, xfs on the whole disk (qcow2), and a GPT disk
//! with ext4 on partition 1 and an LVM volume group (its own name, read with `--devices` only,
//! never activated: this kernel has no device-mapper) holding an ext4 logical volume.
//!
//! Crash-consistent images: a `--method snapshot` backup of the agent guest taken right after
//! it fsynced a new file (the file only in the ext4 journal), an XFS image copied live (the
//! file only in the log), and an ext4 whose journal cannot be replayed (the read-only fallback
//! with its warning). Journals are replayed into a throwaway overlay; the backup folder stays
//! byte-identical.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{cmd} failed:\n{o}\n{e}");
    o
}

/// A backup of `dom` by the real program (`vm-backup backup DOM EXTRA…`); returns its stamp.
fn backup_stamp(s: &LabTarget, dom: &str, extra: &[&str]) -> String {
    s.backup_with(dom, extra)
        .file_name()
        .expect("a backup folder")
        .to_string_lossy()
        .into_owned()
}

/// The known tree written on every prepared filesystem.
fn write_tree(root: &Path, tag: &str) {
    let d = root.join("known");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("config.txt"), format!("known file on {tag}\n")).unwrap();
    // An extended attribute and a POSIX ACL (kept by `files extract`).
    sh(&format!(
        "setfattr -n user.vmb -v {tag} {0}/config.txt && setfacl -m u:4321:r {0}/config.txt",
        d.display()
    ));
    sh(&format!("chown 1234:2345 {0}/config.txt && chmod 0640 {0}/config.txt && touch -d '2024-02-03 04:05:06' {0}/config.txt", d.display()));
    let mut big = Vec::new();
    while big.len() < 9 << 20 {
        big.extend_from_slice(format!("FILPATTERN {tag} {:08}\n", big.len()).as_bytes());
    }
    fs::write(d.join("pattern.bin"), &big).unwrap();
    std::os::unix::fs::symlink("config.txt", d.join("link")).unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("sub/secret"), b"s").unwrap();
    sh(&format!(
        "chmod 0700 {0}/sub && chown 7:8 {0}/sub && chmod 4755 {0}/sub/secret && \
         setfacl -d -m u:4321:rx {0}/sub",
        d.display()
    ));
}

/// The extended attributes of `p` (ACLs included), sorted, without `security.selinux` and
/// xfs's `trusted.SGI_ACL_*` (its on-disk form of the same ACLs).
fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "security.selinux" && !n.starts_with("trusted.SGI_ACL_"))
        .map(|n| {
            let v = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n, v)
        })
        .collect();
    out.sort();
    out
}

/// Compares two trees: names, types, content, owner, mode, mtime, extended attributes and
/// ACLs.
fn same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{} missing: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    assert_eq!(
        (ma.uid(), ma.gid()),
        (mb.uid(), mb.gid()),
        "owner of {}",
        b.display()
    );
    if !ma.file_type().is_symlink() {
        assert_eq!(xattrs_of(a), xattrs_of(b), "xattrs of {}", b.display());
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "mode of {}",
            b.display()
        );
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", b.display());
    }
    if ma.is_file() {
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "content of {}",
            b.display()
        );
    } else if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
    } else if ma.is_dir() {
        let mut na: Vec<_> = fs::read_dir(a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let mut nb: Vec<_> = fs::read_dir(b)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "entries of {}", b.display());
        for n in na {
            same_tree(&a.join(&n), &b.join(&n));
        }
    }
}

/// Prepares the three disks in `dir` and a copy of each known tree under `dir/ref/<name>`.
/// Returns the disks as (target, file, format).
fn prepare_disks(dir: &Path) -> Vec<(String, PathBuf, String)> {
    let refs = dir.join("ref");
    let m = dir.join("m");
    fs::create_dir_all(&m).unwrap();
    let vg = format!("{}vg{}", prefix(), std::process::id());
    let d = dir.display();
    // vdb: ext4 on the whole disk, raw.
    sh(&format!("truncate -s 64M {d}/vdb.raw && mkfs.ext4 -q -F {d}/vdb.raw && mount -o loop {d}/vdb.raw {d}/m"));
    write_tree(&m, "vdb");
    sh(&format!(
        "mkdir -p {r}/vdb && cp -a {d}/m/known {r}/vdb/ && umount {d}/m",
        r = refs.display()
    ));
    // vdc: xfs on the whole disk, qcow2.
    sh(&format!("truncate -s 320M {d}/vdc.raw && mkfs.xfs -q -f {d}/vdc.raw && mount -o loop {d}/vdc.raw {d}/m"));
    write_tree(&m, "vdc");
    sh(&format!("mkdir -p {r}/vdc && cp -a {d}/m/known {r}/vdc/ && umount {d}/m && qemu-img convert -O qcow2 {d}/vdc.raw {d}/vdc.qcow2 && rm {d}/vdc.raw", r = refs.display()));
    // vdd: GPT, ext4 on partition 1, LVM on partition 2 with an ext4 volume, qcow2.
    sh(&format!("truncate -s 160M {d}/vdd.raw && printf 'label: gpt\\nsize=48M\\nsize=+\\n' | sfdisk -q {d}/vdd.raw"));
    let l = sh(&format!("losetup -f --show -P {d}/vdd.raw"))
        .trim()
        .to_string();
    let _ = Command::new("partx").args(["-a", &l]).output();
    let cleanup_loop = |l: &str| {
        let _ = Command::new("losetup").args(["-d", l]).output();
    };
    let lvm = format!("--devices {l}p2 --config 'global {{ activation = 0 }}'");
    sh(&format!("mkfs.ext4 -q {l}p1 && mount {l}p1 {d}/m"));
    write_tree(&m, "vdd-part1");
    sh(&format!(
        "mkdir -p {r}/part1 && cp -a {d}/m/known {r}/part1/ && umount {d}/m",
        r = refs.display()
    ));
    sh(&format!("pvcreate -q {lvm} {l}p2 && vgcreate -q {lvm} {vg} {l}p2 && lvcreate -q {lvm} -an -Zn -L 48M -n data {vg} 2>&1"));
    let info = sh(&format!(
        "lvm pvs {lvm} --noheadings --nosuffix --units b --separator '|' -o pe_start 2>/dev/null"
    ));
    let pe_start: u64 = info.trim().parse().unwrap();
    let s = sh(&format!(
        "losetup -f --show -o {pe_start} --sizelimit {} {l}p2",
        48 << 20
    ))
    .trim()
    .to_string();
    sh(&format!("mkfs.ext4 -q {s} && mount {s} {d}/m"));
    write_tree(&m, "vdd-lvm");
    sh(&format!(
        "mkdir -p {r}/lvm && cp -a {d}/m/known {r}/lvm/ && umount {d}/m",
        r = refs.display()
    ));
    cleanup_loop(&s);
    cleanup_loop(&l);
    sh(&format!(
        "qemu-img convert -O qcow2 {d}/vdd.raw {d}/vdd.qcow2 && rm {d}/vdd.raw"
    ));
    fs::write(dir.join("vg-name"), &vg).unwrap();
    vec![
        ("vdb".into(), dir.join("vdb.raw"), "raw".into()),
        ("vdc".into(), dir.join("vdc.qcow2"), "qcow2".into()),
        ("vdd".into(), dir.join("vdd.qcow2"), "qcow2".into()),
    ]
}

/// Defines a shut-off domain with these disks.
fn define(s: &mut LabTarget, name: &str, disks: &[(String, PathBuf, String)]) {
    let mut xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><devices>"
    );
    for (t, f, fmt) in disks {
        xml.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>\
             <source file='{}'/><target dev='{t}' bus='virtio'/></disk>",
            f.display()
        ));
    }
    xml.push_str("</devices></domain>");
    let path = s.dir.join("dom.xml");
    fs::write(&path, xml).unwrap();
    let _ = virsh(&["undefine", name]);
    virsh_ok(&["define", &path.display().to_string()]);
    s.domains.push(name.to_string());
}

#[test]
fn prepared_disks_extract_and_mount_with_owner_mode_and_content() {
    if !lab_enabled("prepared_disks_extract_and_mount_with_owner_mode_and_content") {
        return;
    }
    let mut s = LabTarget::new("prep");
    let disks = prepare_disks(&s.dir);
    let dom = format!("{}-files", prefix());
    define(&mut s, &dom, &disks);
    let stamp = backup_stamp(&s, &dom, &["--method", "offline"]);
    let refs = s.dir.join("ref");
    // (disk, path in the backup, reference tree)
    let cases = [
        ("vdb", "/known", refs.join("vdb/known")),
        ("vdc", "/known", refs.join("vdc/known")),
        ("vdd", "part1/known", refs.join("part1/known")),
    ];
    let vg = fs::read_to_string(s.dir.join("vg-name")).unwrap();
    let lvm_path = format!("{vg}-data/known");
    let all: Vec<(&str, &str, PathBuf)> = cases
        .iter()
        .map(|(d, p, r)| (*d, *p, r.clone()))
        .chain([("vdd", lvm_path.as_str(), refs.join("lvm/known"))])
        .collect();
    for (disk, path, reference) in &all {
        let out = s.dir.join(format!("out-{disk}-{}", path.replace('/', "_")));
        fs::create_dir(&out).unwrap();
        s.vmb_ok(&[
            "files",
            &dom,
            &stamp,
            "--disk",
            disk,
            "extract",
            path,
            &out.display().to_string(),
        ]);
        same_tree(reference, &out.join("known"));
        let ls = s.vmb_ok(&["files", &dom, &stamp, "--disk", disk, "--json", "ls", path]);
        let entries: serde_json::Value = serde_json::from_str(&ls).unwrap();
        let cfg = entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"].as_str().unwrap().ends_with("/config.txt"))
            .expect("config.txt listed");
        assert_eq!(cfg["uid"], 1234);
        assert_eq!(cfg["gid"], 2345);
        assert_eq!(cfg["mode"], 0o640);
        assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    }
    // mount: one folder per volume on the partitioned disk, the filesystem itself otherwise.
    let mnt = s.dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    s.vmb_ok(&["mount", &dom, &stamp, "--disk", "vdd", &m]);
    same_tree(&refs.join("part1/known"), &mnt.join("part1/known"));
    same_tree(
        &refs.join("lvm/known"),
        &mnt.join(format!("{vg}-data/known")),
    );
    assert!(
        fs::write(mnt.join("part1/known/new"), b"x").is_err(),
        "the mount is read-only"
    );
    s.vmb_ok(&["umount", &m]);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    s.vmb_ok(&["mount", &dom, &stamp, "--disk", "vdc", &m]);
    same_tree(&refs.join("vdc/known"), &mnt.join("known"));
    s.vmb_ok(&["umount", &m]);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());

    // A flipped byte in a copy of the backup: the read fails naming the file and the chunk.
    let vm_dir = s.dir.join("target/labhost").join(&dom);
    let bad_stamp = "2000-01-01-000000";
    sh(&format!(
        "cp -a {0}/{stamp} {0}/{bad_stamp}",
        vm_dir.display()
    ));
    let img = vm_dir.join(bad_stamp).join(format!("{dom}-vdb.raw"));
    let bytes = fs::read(&img).unwrap();
    let find = |needle: &[u8]| -> Vec<usize> {
        bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect()
    };
    // A chunk holding pattern.bin but not config.txt (which must still read).
    let cfg_chunk = find(b"known file on vdb")[0] / (4 << 20);
    let at = find(b"FILPATTERN vdb")
        .into_iter()
        .rev()
        .find(|i| i / (4 << 20) != cfg_chunk)
        .expect("the pattern in another chunk than config.txt");
    drop(bytes);
    let chunk = at / (4 << 20);
    sh(&format!(
        "printf 'X' | dd of={} bs=1 seek={at} conv=notrunc status=none",
        img.display()
    ));
    let small = s.vmb(&[
        "files",
        &dom,
        bad_stamp,
        "--disk",
        "vdb",
        "cat",
        "/known/config.txt",
    ]);
    assert!(
        small.status.success(),
        "undamaged chunks still read: {:?}",
        texts(&small)
    );
    let out = s.vmb(&[
        "files",
        &dom,
        bad_stamp,
        "--disk",
        "vdb",
        "cat",
        "/known/pattern.bin",
    ]);
    let (_, e) = texts(&out);
    assert!(!out.status.success());
    assert!(e.contains(&format!("chunk {chunk} ")), "{e}");
    assert!(e.contains(&img.display().to_string()), "{e}");
    let out = s.vmb(&[
        "files",
        &dom,
        bad_stamp,
        "--disk",
        "vdb",
        "extract",
        "/known",
        &s.dir.join("out-bad").display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        !s.dir.join("out-bad/pattern.bin").exists(),
        "no partial copy left"
    );
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());

    // Killed commands: the chain is found and taken down by orphans --cleanup.
    for (what, args) in [
        (
            "files",
            vec![
                "files",
                dom.as_str(),
                stamp.as_str(),
                "--disk",
                "vdd",
                "ls",
                "/",
            ],
        ),
        (
            "mount",
            vec![
                "mount",
                dom.as_str(),
                stamp.as_str(),
                "--disk",
                "vdd",
                m.as_str(),
            ],
        ),
    ] {
        let mut child = s
            .vmb_cmd(&args)
            .env("VMB_TEST_MOUNT_STALL_SECS", "60")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.leftovers().iter().any(|l| l.starts_with("loop")) {
            assert!(Instant::now() < deadline, "{what}: no loop device appeared");
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!s.leftovers().is_empty());
        let found = s.vmb(&["orphans"]);
        let (o, _) = texts(&found);
        assert_eq!(found.status.code(), Some(3), "{what}: {o}");
        assert!(o.contains("[mount]"), "{what}: {o}");
        s.vmb_ok(&["orphans", "--cleanup"]);
        assert!(s.leftovers().is_empty(), "{what}: {:?}", s.leftovers());
    }
}

#[test]
fn online_backup_of_the_agent_guest_restores_a_deleted_file() {
    if !lab_enabled("online_backup_of_the_agent_guest_restores_a_deleted_file") {
        return;
    }
    let s = LabTarget::new("online");
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(120));
    let marker = format!("online file {}", std::process::id());
    gexec_ok(
        &dom,
        &format!("mkdir -p /mnt/data/filtest && echo '{marker}' > /mnt/data/filtest/note.txt && chown 1234:2345 /mnt/data/filtest/note.txt && chmod 0604 /mnt/data/filtest/note.txt && sync"),
    );
    let stat = gexec_ok(&dom, "stat -c '%u %g %a %Y %s' /mnt/data/filtest/note.txt");
    let stamp = backup_stamp(&s, &dom, &[]);
    gexec_ok(&dom, "rm -rf /mnt/data/filtest && sync");

    let t0 = Instant::now();
    let ls = s.vmb_ok(&["files", &dom, &stamp, "ls", "/filtest"]);
    eprintln!(
        "BENCH first listing (online backup, TCG guest disk): {:?}",
        t0.elapsed()
    );
    assert!(ls.contains("note.txt"), "{ls}");
    let out = s.dir.join("out");
    fs::create_dir(&out).unwrap();
    s.vmb_ok(&[
        "files",
        &dom,
        "latest",
        "extract",
        "/filtest/note.txt",
        &out.display().to_string(),
    ]);
    let got = out.join("note.txt");
    assert_eq!(fs::read_to_string(&got).unwrap(), format!("{marker}\n"));
    let md = fs::metadata(&got).unwrap();
    let want: Vec<&str> = stat.split_whitespace().collect();
    assert_eq!(md.uid().to_string(), want[0]);
    assert_eq!(md.gid().to_string(), want[1]);
    assert_eq!(format!("{:o}", md.mode() & 0o7777), want[2]);
    assert_eq!(md.mtime().to_string(), want[3]);

    let mnt = s.dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    s.vmb_ok(&["mount", &dom, &stamp, &m]);
    assert_eq!(
        fs::read_to_string(mnt.join("filtest/note.txt")).unwrap(),
        format!("{marker}\n")
    );
    s.vmb_ok(&["umount", &m]);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn crash_consistent_backup_replays_the_ext4_journal_for_files_and_mount() {
    if !lab_enabled("crash_consistent_backup_replays_the_ext4_journal_for_files_and_mount") {
        return;
    }
    let s = LabTarget::new("crash");
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(120));
    let marker = format!("crash-consistent file {}", std::process::id());
    let (folder, name) =
        s.backup_with_unreplayed_journal(&dom, &format!("crash{}-", std::process::id()), &marker);
    let stamp = folder.file_name().unwrap().to_string_lossy().into_owned();
    gexec_ok(&dom, &format!("rm -rf /mnt/data/{name}"));
    let before = tree_digests(&folder);
    let file = format!("/{name}/note.txt");

    // `files`: list and get, through the journal replayed into the overlay.
    let out = s.vmb(&["files", &dom, &stamp, "ls", &format!("/{name}")]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.contains("note.txt"), "{o}");
    assert!(!e.contains("warning"), "{e}");
    let dest = s.dir.join("out");
    fs::create_dir(&dest).unwrap();
    s.vmb_ok(&[
        "files",
        &dom,
        &stamp,
        "extract",
        &file,
        &dest.display().to_string(),
    ]);
    assert_eq!(
        fs::read_to_string(dest.join("note.txt")).unwrap(),
        format!("{marker}\n")
    );
    assert_eq!(
        s.vmb_ok(&["files", &dom, &stamp, "cat", &file]),
        format!("{marker}\n")
    );
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());

    // `mount`: the same, and the overlay holds only what the replay wrote.
    let mnt = s.dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    let state: serde_json::Value =
        serde_json::from_str(&s.vmb_ok(&["mount", "--json", &dom, &stamp, &m])).unwrap();
    assert_eq!(state["volumes"][0]["replayed"], true, "{state}");
    assert_eq!(state["warnings"], serde_json::json!([]), "{state}");
    let overlay = PathBuf::from(state["overlay"].as_str().expect("an overlay"));
    assert!(
        overlay.starts_with(s.dir.join("journal")),
        "{}",
        overlay.display()
    );
    let used = fs::metadata(&overlay).unwrap().blocks() * 512;
    eprintln!("overlay after the replay: {} KiB allocated", used / 1024);
    assert!(used < 16 << 20, "the overlay holds {used} bytes");
    assert_eq!(
        fs::read_to_string(mnt.join(&name).join("note.txt")).unwrap(),
        format!("{marker}\n")
    );
    s.vmb_ok(&["umount", &m]);
    assert!(!overlay.exists(), "{} left", overlay.display());
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    let states: Vec<_> = fs::read_dir(s.dir.join("journal/mounts"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(states.is_empty(), "{states:?}");

    // Nothing was written in the backup folder.
    assert_eq!(tree_digests(&folder), before);
    s.vmb_ok(&["verify", &dom, &stamp]);
    assert!(ext4_cat(&folder.join(format!("{dom}-vda.qcow2")), &file).is_none());
}

#[test]
fn a_journal_that_cannot_be_replayed_falls_back_to_the_read_only_mount_with_a_warning() {
    if !lab_enabled(
        "a_journal_that_cannot_be_replayed_falls_back_to_the_read_only_mount_with_a_warning",
    ) {
        return;
    }
    let mut s = LabTarget::new("nojournal");
    // ext4 marked as needing recovery, its journal superblock zeroed: the kernel refuses the
    // replay ("no valid journal superblock"), a `noload` mount reads the filesystem.
    let img = s.dir.join("vdb.raw");
    let (d, i) = (s.dir.display(), img.display());
    sh(&format!(
        "mkdir {d}/m && truncate -s 32M {i} && mkfs.ext4 -q -F -b 4096 {i} && mount -o loop {i} {d}/m \
         && echo kept > {d}/m/kept.txt && umount {d}/m"
    ));
    let block = sh(&format!("debugfs -R 'bmap <8> 0' {i} 2>/dev/null"));
    sh(&format!(
        "dd if=/dev/zero of={i} bs=4096 seek={} count=1 conv=notrunc status=none && \
         debugfs -w -R 'feature needs_recovery' {i}",
        block.trim()
    ));
    let dom = format!("{}-nojournal", prefix());
    define(&mut s, &dom, &[("vdb".into(), img.clone(), "raw".into())]);
    let folder = s.backup_with(&dom, &["--method", "offline"]);
    let stamp = folder.file_name().unwrap().to_string_lossy().into_owned();
    let before = tree_digests(&folder);

    let out = s.vmb(&["files", &dom, &stamp, "cat", "/kept.txt"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert_eq!(o, "kept\n");
    assert!(e.contains("could not be replayed"), "{e}");
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());

    let mnt = s.dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    let state: serde_json::Value =
        serde_json::from_str(&s.vmb_ok(&["mount", "--json", &dom, &stamp, &m])).unwrap();
    assert_eq!(state["volumes"][0]["replayed"], false, "{state}");
    assert_eq!(state["overlay"], serde_json::Value::Null, "{state}");
    assert!(
        state["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("could not be replayed"),
        "{state}"
    );
    assert_eq!(fs::read_to_string(mnt.join("kept.txt")).unwrap(), "kept\n");
    s.vmb_ok(&["umount", &m]);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    assert_eq!(tree_digests(&folder), before);
}

#[test]
fn an_xfs_copied_live_reads_with_its_log_recovered_into_the_overlay() {
    if !lab_enabled("an_xfs_copied_live_reads_with_its_log_recovered_into_the_overlay") {
        return;
    }
    let mut s = LabTarget::new("xfslog");
    // A crash-consistent copy made on the host: the image copied while mounted, right after a
    // new file was fsynced (in the log; XFS writes the metadata in place later).
    let (d, live, img) = (
        s.dir.display().to_string(),
        s.dir.join("live.raw"),
        s.dir.join("vdb.raw"),
    );
    let (l, i) = (live.display(), img.display());
    sh(&format!(
        "mkdir {d}/m && truncate -s 320M {l} && mkfs.xfs -q -f {l} && mount -o loop {l} {d}/m \
         && mkdir {d}/m/xd && echo 'xfs log file' | dd of={d}/m/xd/note.txt conv=fsync status=none \
         && cp --sparse=always {l} {i} && umount {d}/m && rm {l}"
    ));
    // Reproduced: without recovery the new folder is not there.
    let seen = sh(&format!(
        "L=$(losetup -f --show -r {i}) && mount -o ro,norecovery,nouuid $L {d}/m && ls {d}/m; \
         umount {d}/m; losetup -d $L"
    ));
    assert!(
        !seen.contains("xd"),
        "the log was written in place already: {seen}"
    );
    let dom = format!("{}-xfslog", prefix());
    define(&mut s, &dom, &[("vdb".into(), img.clone(), "raw".into())]);
    let folder = s.backup_with(&dom, &["--method", "offline"]);
    let stamp = folder.file_name().unwrap().to_string_lossy().into_owned();
    let before = tree_digests(&folder);
    let out = s.vmb(&["files", &dom, &stamp, "cat", "/xd/note.txt"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert_eq!(o, "xfs log file\n");
    assert!(!e.contains("warning"), "{e}");
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    assert_eq!(tree_digests(&folder), before);
}
