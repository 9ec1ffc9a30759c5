//! Lab tests of restore and test-restore against real libvirt and TCG guests, on backups made
//! by the real `vm-backup backup`. Skipped unless VMB_LAB_LIBVIRT=1 (see tests/support).
//! Run with the prefix of the lab that is up, e.g.
//! `VMB_LAB_PREFIX=ops VMB_LAB_LIBVIRT=1 cargo test --test lab_ops -- --test-threads=1`.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use vm_backup::format::metadata::BackupMetadata;

/// A scratch target whose settings add the test-restore section (its folder, its bounds).
fn scratch(test: &str) -> LabTarget {
    LabTarget::with_settings(
        test,
        "[test_restore]\ndir = \"{d}/test-restore\"\nboot_timeout_seconds = 120\nrun_seconds = 5\n",
    )
}

fn domain_exists(dom: &str) -> bool {
    virsh(&["dominfo", dom]).status.success()
}

fn test_restore_domains() -> Vec<String> {
    virsh_ok(&["list", "--all", "--name"])
        .lines()
        .filter(|l| l.starts_with(&format!("{}-", prefix())) && l.contains("-testrestore-"))
        .map(str::to_string)
        .collect()
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

#[test]
fn restore_as_a_copy_beside_the_running_original() {
    if !lab_enabled("restore_as_a_copy_beside_the_running_original") {
        return;
    }
    let orig = agent_dom();
    let copy = format!("{orig}-copy");
    let mut s = scratch("restore");
    s.owns(&copy);
    let _ = virsh(&["destroy", &copy]);
    let _ = virsh(&["undefine", &copy, "--nvram"]);
    wait_agent(&orig, Duration::from_secs(60));
    let marker = format!("restore-marker-{}", std::process::id());
    gexec_ok(
        &orig,
        &format!("echo {marker} > /mnt/data/marker.txt && sync"),
    );
    let orig_sources = disk_sources(&orig);
    let orig_uuid = virsh_ok(&["domuuid", &orig]).trim().to_string();

    let backup = s.backup(&orig);
    let meta = BackupMetadata::read(&backup).unwrap();
    let disk_dir = s.dir.join("copy-disks");
    let dd = disk_dir.display().to_string();

    // Restoring over the running original is refused, even with --force.
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["restore", &orig, "latest"];
        args.extend_from_slice(extra);
        let out = s.vmb(&args);
        let (o, e) = texts(&out);
        assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
        assert!(e.contains("is running"), "{e}");
    }

    // Restore beside it, not started: the disk is the backup, byte for byte.
    let out = s.vmb(&["restore", &orig, "latest", "--as", &copy, "--disk-dir", &dd]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let restored = disk_dir.join(format!("{copy}-vda.qcow2"));
    assert_eq!(
        fs::read(&restored).unwrap(),
        fs::read(backup.join(&meta.disks[0].file)).unwrap(),
        "restored image differs from the backup"
    );
    assert!(domain_exists(&copy));
    assert_eq!(domstate(&copy), "shut off");
    let xml = virsh_ok(&["dumpxml", &copy, "--inactive"]);
    assert!(xml.contains(&restored.display().to_string()), "{xml}");
    assert!(!xml.contains("<backingStore type="), "{xml}");
    let copy_uuid = virsh_ok(&["domuuid", &copy]).trim().to_string();
    assert_ne!(copy_uuid, orig_uuid);
    for (_, src) in &orig_sources {
        assert!(
            !xml.contains(src.as_str()),
            "the copy must not use {src}: {xml}"
        );
    }

    // Defined: refused without --force; replaced and started with it.
    let out = s.vmb(&["restore", &orig, "latest", "--as", &copy, "--disk-dir", &dd]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(e.contains("already defined"), "{e}");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd,
        "--force",
        "--start",
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert_eq!(domstate(&copy), "running");
    wait_agent(&copy, Duration::from_secs(120));
    let seen = gexec_ok(&copy, "cat /mnt/data/marker.txt");
    assert_eq!(seen.trim(), marker);

    // The original kept running on its own disks, its writer without a gap.
    assert_eq!(domstate(&orig), "running");
    assert_eq!(disk_sources(&orig), orig_sources);
    assert!(!has_backing_store(&orig, false));
    assert!(agent_ping(&orig));
    assert_eq!(seq_check(&orig).gaps, 0);
    assert_eq!(virsh_ok(&["domuuid", &orig]).trim(), orig_uuid);
}

#[test]
fn a_flipped_byte_stops_restore_naming_the_chunk_and_force_restores_with_a_warning() {
    if !lab_enabled(
        "a_flipped_byte_stops_restore_naming_the_chunk_and_force_restores_with_a_warning",
    ) {
        return;
    }
    let orig = agent_dom();
    let copy = format!("{orig}-damaged");
    let mut s = scratch("damaged");
    s.owns(&copy);
    let _ = virsh(&["destroy", &copy]);
    let _ = virsh(&["undefine", &copy, "--nvram"]);
    let backup = s.backup(&orig);
    let meta = BackupMetadata::read(&backup).unwrap();
    let disk = &meta.disks[0];
    let img = backup.join(&disk.file);
    let mut bytes = fs::read(&img).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&img, &bytes).unwrap();
    let chunk = at as u64 / disk.manifest.chunk_size;
    let named = format!(
        "{}: chunk {chunk} (offset {}) does not match the manifest",
        disk.file,
        chunk * disk.manifest.chunk_size
    );
    let disk_dir = s.dir.join("damaged-disks");
    let dd = disk_dir.display().to_string();

    // Found as the image is copied (one read): refused, nothing left, no domain.
    let out = s.vmb(&["restore", &orig, "latest", "--as", &copy, "--disk-dir", &dd]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(e.contains("is damaged") && e.contains(&named), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert!(!disk_dir.exists(), "nothing left at the destination");
    assert!(!domain_exists(&copy));

    // With --force: restored as it is, with the warning naming the chunk.
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd,
        "--force",
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        e.contains("restoring anyway (--force)") && e.contains(&named),
        "{e}"
    );
    assert!(
        o.contains("WARNING: restored from a damaged backup (--force)") && o.contains(&named),
        "{o}"
    );
    assert!(domain_exists(&copy));
    let restored = disk_dir.join(format!("{copy}-vda.qcow2"));
    assert_eq!(
        fs::read(&restored).unwrap(),
        bytes,
        "restored as the backup has it"
    );
}

#[test]
fn uefi_restore_brings_back_the_nvram() {
    if !lab_enabled("uefi_restore_brings_back_the_nvram") {
        return;
    }
    let orig = uefi_dom();
    let copy = format!("{orig}-copy");
    let mut s = scratch("uefi");
    s.owns(&copy);
    let _ = virsh(&["destroy", &copy]);
    let _ = virsh(&["undefine", &copy, "--nvram"]);
    let backup = s.backup(&orig);
    let nvram_backup = backup.join(format!("{orig}-nvram.fd"));
    assert!(nvram_backup.is_file(), "the backup has the NVRAM");
    let dd = s.dir.join("uefi-copy");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let nvram = dd.join(format!("{copy}_VARS.fd"));
    assert_eq!(fs::read(&nvram).unwrap(), fs::read(&nvram_backup).unwrap());
    let xml = virsh_ok(&["dumpxml", &copy, "--inactive"]);
    assert!(xml.contains(&nvram.display().to_string()), "{xml}");
    virsh_ok(&["start", &copy]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(domstate(&copy), "running");
    assert_eq!(domstate(&orig), "running");
}

#[test]
fn test_restore_passes_on_a_good_backup_and_leaves_nothing() {
    if !lab_enabled("test_restore_passes_on_a_good_backup_and_leaves_nothing") {
        return;
    }
    let s = scratch("trgood");
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    let backup = s.backup(&dom);
    let before = test_restore_domains();
    let out = s.vmb(&["test-restore", &dom]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(
        o.contains("PASSED") && o.contains("guest agent answered"),
        "{o}"
    );
    let v = BackupMetadata::read(&backup).unwrap().test_restore.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(test_restore_domains(), before, "no test domain left");
    assert_eq!(files_in(&s.dir.join("test-restore")), 0, "no disk left");
    // The catalog shows the verdict.
    let out = s.vmb(&["list", &dom, "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["test_restore"]["ok"], true, "{rows}");

    // A VM without agent passes by running for the configured time.
    let noagent = noagent_dom();
    s.backup(&noagent);
    let out = s.vmb(&["test-restore", &noagent]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(o.contains("kept running for 5 s"), "{o}");
    assert_eq!(test_restore_domains(), before);
    assert_eq!(files_in(&s.dir.join("test-restore")), 0);
}

#[test]
fn test_restore_fails_on_damage_or_no_boot_and_still_cleans_up() {
    if !lab_enabled("test_restore_fails_on_damage_or_no_boot_and_still_cleans_up") {
        return;
    }
    let s = scratch("trbad");
    let dom = agent_dom();
    wait_agent(&dom, Duration::from_secs(60));
    let backup = s.backup(&dom);
    let before = test_restore_domains();

    // A guest that does not answer in time (1 s under TCG): booted, judged, destroyed.
    let out = s.vmb(&["test-restore", &dom, "--boot-timeout", "1"]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{o}\n{e}");
    assert!(
        o.contains("FAILED") && o.contains("did not answer within 1 s"),
        "{o}"
    );
    assert_eq!(test_restore_domains(), before, "no test domain left");
    assert_eq!(files_in(&s.dir.join("test-restore")), 0, "no disk left");

    // One flipped byte: refused before anything is defined, recorded as a failure.
    let meta = BackupMetadata::read(&backup).unwrap();
    let img = backup.join(&meta.disks[0].file);
    let len = fs::metadata(&img).unwrap().len();
    let mut bytes = fs::read(&img).unwrap();
    let at = (len / 2) as usize;
    bytes[at] ^= 0xff;
    fs::write(&img, &bytes).unwrap();
    let out = s.vmb(&["test-restore", &dom]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{o}\n{e}");
    assert!(
        o.contains("backup damaged") && o.contains(&meta.disks[0].file),
        "{o}"
    );
    assert!(o.contains("chunk"), "{o}");
    let v = BackupMetadata::read(&backup).unwrap().test_restore.unwrap();
    assert!(!v.ok && v.detail.contains("chunk"), "{v:?}");
    assert_eq!(test_restore_domains(), before);
    assert_eq!(files_in(&s.dir.join("test-restore")), 0);
    assert_eq!(domstate(&dom), "running");
}

#[test]
fn appliance_restore_gives_back_its_configs() {
    if !lab_enabled("appliance_restore_gives_back_its_configs") {
        return;
    }
    let orig = noagent_dom();
    let copy = format!("{orig}-copy");
    let mut s = scratch("asa");
    s.owns(&copy);
    let _ = virsh(&["destroy", &copy]);
    let _ = virsh(&["undefine", &copy, "--nvram"]);
    let backup = s.backup(&orig);
    // What the ASAv capture leaves in a backup (the capture itself is tested against a real
    // sshd in tests/ops_appliance.rs).
    let configs = backup.join("configs");
    fs::create_dir_all(&configs).unwrap();
    let running = "hostname asa-lab\ninterface Management0/0\n";
    fs::write(configs.join("show-running-config.txt"), running).unwrap();
    let sum =
        vm_backup::engine::verify::sha256_file(&configs.join("show-running-config.txt")).unwrap();
    let mut sums = fs::read_to_string(backup.join("checksums.sha256")).unwrap();
    sums.push_str(&format!("{sum}  configs/show-running-config.txt\n"));
    fs::write(backup.join("checksums.sha256"), sums).unwrap();

    let dd = s.dir.join("asa-copy");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.contains("configs:"), "{o}");
    assert_eq!(
        fs::read_to_string(dd.join(format!("{copy}-configs/show-running-config.txt"))).unwrap(),
        running
    );
    assert!(domain_exists(&copy));
    assert_eq!(domstate(&orig), "running");
}

#[test]
fn multi_disk_restore_as_a_copy_boots_with_every_disk() {
    if !lab_enabled("multi_disk_restore_as_a_copy_boots_with_every_disk") {
        return;
    }
    let orig = multi_dom();
    let copy = format!("{orig}-copy");
    let mut s = scratch("multi");
    s.owns(&copy);
    let _ = virsh(&["destroy", &copy]);
    let _ = virsh(&["undefine", &copy, "--nvram"]);
    wait_agent(&orig, Duration::from_secs(60));
    let marker = format!("multi-{}", std::process::id());
    gexec_ok(
        &orig,
        &format!("echo {marker} > /mnt/data2/m.txt; echo {marker} > /mnt/data3/m.txt; sync"),
    );
    s.backup(&orig);
    let dd = s.dir.join("multi-copy");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd.display().to_string(),
        "--start",
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    // qcow2 (with a backing file of its own), raw and the cdrom.
    let blk = domblklist(&copy, true);
    let src = |t: &str| blk.iter().find(|b| b.target == t).map(|b| b.source.clone());
    assert_eq!(
        src("vda"),
        Some(dd.join(format!("{copy}-vda.qcow2")).display().to_string())
    );
    assert_eq!(
        src("vdb"),
        Some(dd.join(format!("{copy}-vdb.qcow2")).display().to_string())
    );
    assert_eq!(
        src("vdc"),
        Some(dd.join(format!("{copy}-vdc.raw")).display().to_string())
    );
    assert!(
        src("hdc").is_some_and(|s| s.ends_with("multi-cdrom.iso")),
        "{blk:?}"
    );
    wait_agent(&copy, Duration::from_secs(120));
    assert_eq!(gexec_ok(&copy, "cat /mnt/data2/m.txt").trim(), marker);
    assert_eq!(gexec_ok(&copy, "cat /mnt/data3/m.txt").trim(), marker);
    // The backing file's own content is there too.
    assert!(gexec_ok(&copy, "cat /mnt/data2/seed.txt").contains("backing file"));
    assert_eq!(domstate(&orig), "running");
    assert!(agent_ping(&orig));
}

/// `qemu-img info -U --backing-chain` of an image: the file names, top to bottom.
fn chain_of(image: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", texts(&out).1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().unwrap()))
        .collect()
}

fn qemu_img_ok(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    let (o, e) = texts(&out);
    assert!(out.status.success(), "qemu-img {args:?}: {o}\n{e}");
}

#[test]
fn backing_chain_restores_self_contained_and_verify_names_a_bad_layer() {
    if !lab_enabled("backing_chain_restores_self_contained_and_verify_names_a_bad_layer") {
        return;
    }
    let orig = multi_dom();
    let copy = format!("{orig}-chain");
    let copy2 = format!("{orig}-chain2");
    let mut s = scratch("chain");
    s.owns(&copy);
    s.owns(&copy2);
    for d in [&copy, &copy2] {
        let _ = virsh(&["destroy", d]);
        let _ = virsh(&["undefine", d, "--nvram"]);
    }
    wait_agent(&orig, Duration::from_secs(60));
    let marker = format!("chain-{}", std::process::id());
    gexec_ok(&orig, &format!("echo {marker} > /mnt/data2/m.txt; sync"));
    let orig_sources = disk_sources(&orig);
    let orig_vdb = PathBuf::from(&orig_sources.iter().find(|(t, _)| t == "vdb").unwrap().1);
    let orig_chain = chain_of(&orig_vdb);
    assert!(orig_chain.len() >= 2, "the lab's vdb has a backing file");
    let base_sum = vm_backup::engine::verify::sha256_file(&orig_chain[1]).unwrap();

    // A real backup copies the chain.
    let backup = s.backup(&orig);
    let meta = BackupMetadata::read(&backup).unwrap();
    let vdb = meta
        .disks
        .iter()
        .find(|d| d.target == "vdb")
        .unwrap()
        .clone();
    assert_eq!(vdb.backing_chain.len(), orig_chain.len() - 1, "{vdb:?}");

    // The reference: the backup's own chain, copied to scratch and rebased onto itself.
    let reference = s.dir.join("reference");
    fs::create_dir_all(&reference).unwrap();
    let mut files = vec![(vdb.file.clone(), vdb.format.clone())];
    files.extend(
        vdb.backing_chain
            .iter()
            .map(|l| (l.file.clone(), l.format.clone())),
    );
    for (f, _) in &files {
        fs::copy(backup.join(f), reference.join(f)).unwrap();
    }
    for w in files.windows(2) {
        let (img, fmt) = (&w[0].0, &w[0].1);
        let (below, bfmt) = (&w[1].0, &w[1].1);
        let img = reference.join(img).display().to_string();
        let below = reference.join(below).display().to_string();
        qemu_img_ok(&["rebase", "-u", "-f", fmt, "-b", &below, "-F", bfmt, &img]);
    }
    let reference_top = reference.join(&vdb.file);
    assert_eq!(chain_of(&reference_top).len(), files.len());

    // 1. --as with --disk-dir: the chain lands in the folder, self-contained.
    let dd = s.dir.join("chain-copy");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &copy,
        "--disk-dir",
        &dd.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let top = dd.join(format!("{copy}-vdb.qcow2"));
    let chain = chain_of(&top);
    assert_eq!(chain.len(), 1 + vdb.backing_chain.len(), "{chain:?}");
    for f in &chain {
        assert!(f.starts_with(&dd), "{f:?} is outside the restore folder");
        assert!(!orig_chain.contains(f), "{f:?} belongs to the original");
    }
    assert_eq!(chain[1], dd.join(format!("{copy}-vdb.backing-1.qcow2")));
    assert!(o.contains("backing:"), "{o}");
    qemu_img_ok(&[
        "compare",
        "-U",
        &top.display().to_string(),
        &reference_top.display().to_string(),
    ]);
    let xml = virsh_ok(&["dumpxml", &copy, "--inactive"]);
    assert!(!xml.contains("<backingStore type="), "{xml}");

    // 2. --as beside the original: new names next to the restored top, the original's
    // backing file untouched and not referenced.
    let out = s.vmb(&["restore", &orig, "latest", "--as", &copy2]);
    let (o, e) = texts(&out);
    let top2 = orig_vdb.with_file_name(format!("{copy2}-vdb.qcow2"));
    let restored2: Vec<PathBuf> = if top2.exists() {
        chain_of(&top2)
    } else {
        Vec::new()
    };
    // Remove what this restore put into the lab folder, whatever the assertions say.
    let _ = virsh(&["undefine", &copy2, "--nvram"]);
    for f in fs::read_dir(orig_vdb.parent().unwrap()).unwrap().flatten() {
        if f.file_name()
            .to_string_lossy()
            .starts_with(&format!("{copy2}-"))
        {
            let _ = fs::remove_file(f.path());
        }
    }
    assert!(out.status.success(), "{o}\n{e}");
    assert_eq!(restored2.len(), chain.len(), "{restored2:?}");
    assert_eq!(
        restored2[1],
        orig_vdb.with_file_name(format!("{copy2}-vdb.backing-1.qcow2"))
    );
    for f in &restored2 {
        assert!(!orig_chain.contains(f), "{f:?} belongs to the original");
    }

    // The original runs on its own, untouched images.
    assert_eq!(domstate(&orig), "running");
    assert_eq!(disk_sources(&orig), orig_sources);
    assert_eq!(chain_of(&orig_vdb), orig_chain);
    assert_eq!(
        vm_backup::engine::verify::sha256_file(&orig_chain[1]).unwrap(),
        base_sum
    );
    assert!(agent_ping(&orig));
    assert_eq!(gexec_ok(&orig, "cat /mnt/data2/m.txt").trim(), marker);

    // 3. test-restore boots the chain and leaves nothing.
    let before = test_restore_domains();
    let out = s.vmb(&["test-restore", &orig]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(o.contains("PASSED"), "{o}");
    assert_eq!(test_restore_domains(), before);
    assert_eq!(files_in(&s.dir.join("test-restore")), 0);

    // 4. One flipped byte in the backing layer: verify names it, restore refuses.
    let layer = &vdb.backing_chain[0];
    let img = backup.join(&layer.file);
    let mut bytes = fs::read(&img).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&img, &bytes).unwrap();
    let out = s.vmb(&["verify", &orig, &meta.stamp]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{o}\n{e}");
    assert!(o.contains(&layer.file) && o.contains("chunk"), "{o}");
    let dd3 = s.dir.join("chain-refused");
    let out = s.vmb(&[
        "restore",
        &orig,
        "latest",
        "--as",
        &format!("{orig}-chain3"),
        "--disk-dir",
        &dd3.display().to_string(),
    ]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(e.contains("damaged") && e.contains(&layer.file), "{e}");
    assert!(!dd3.exists(), "nothing created");
    assert!(!domain_exists(&format!("{orig}-chain3")));
}

/// Starts a lab domain again when dropped (a failed assertion must not leave it shut off).
struct StartAgain(String);

impl Drop for StartAgain {
    fn drop(&mut self) {
        if domstate(&self.0) != "running" {
            let _ = virsh(&["start", &self.0]);
        }
    }
}

#[test]
fn backing_chain_restores_in_place_and_keeps_an_identical_base() {
    if !lab_enabled("backing_chain_restores_in_place_and_keeps_an_identical_base") {
        return;
    }
    let orig = multi_dom();
    let s = scratch("chainip");
    wait_agent(&orig, Duration::from_secs(60));
    let marker = format!("inplace-{}", std::process::id());
    gexec_ok(&orig, &format!("echo {marker} > /mnt/data2/ip.txt; sync"));
    let sources = disk_sources(&orig);
    let vdb = PathBuf::from(&sources.iter().find(|(t, _)| t == "vdb").unwrap().1);
    let chain = chain_of(&vdb);
    assert!(chain.len() >= 2);
    s.backup(&orig);
    let base_sum = vm_backup::engine::verify::sha256_file(&chain[1]).unwrap();
    let base_mtime = fs::metadata(&chain[1]).unwrap().modified().unwrap();

    let _again = StartAgain(orig.clone());
    shutdown_wait(&orig);
    // Defined (shut off) and its files exist: in place needs --force.
    let out = s.vmb(&["restore", &orig, "latest"]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    let out = s.vmb(&["restore", &orig, "latest", "--force"]);
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{o}\n{e}");
    // Same files, the identical base kept as it was (not rewritten).
    assert_eq!(chain_of(&vdb), chain);
    assert_eq!(
        vm_backup::engine::verify::sha256_file(&chain[1]).unwrap(),
        base_sum
    );
    assert_eq!(
        fs::metadata(&chain[1]).unwrap().modified().unwrap(),
        base_mtime
    );
    assert_eq!(disk_sources(&orig), sources);
    start_and_wait(&orig);
    wait_agent(&orig, Duration::from_secs(120));
    assert_eq!(gexec_ok(&orig, "cat /mnt/data2/ip.txt").trim(), marker);
    assert!(gexec_ok(&orig, "cat /mnt/data2/seed.txt").contains("backing file"));
}
