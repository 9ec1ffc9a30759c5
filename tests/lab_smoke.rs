//! Smoke tests of the libvirt lab itself: the guests, their agent, the writer, the freeze hook
//! and the disk layouts other lab tests rely on. Needs `lab/libvirt-lab.sh up` and
//! `VMB_LAB_LIBVIRT=1`; skips otherwise.

mod support;

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use support::*;

#[test]
fn agent_domain_answers_guest_ping() {
    if !lab_enabled("agent_domain_answers_guest_ping") {
        return;
    }
    let d = agent_dom();
    assert_eq!(domstate(&d), "running");
    wait_agent(&d, Duration::from_secs(60));
    assert!(agent_ping(&d));
    let out = gexec_ok(
        &d,
        "cat /mnt/data/seed.txt; grep ' /mnt/data ' /proc/mounts",
    );
    assert!(out.contains(&format!("seed of {d}")), "{out}");
    assert!(out.contains("ext4"), "{out}");
    // A failing guest command reports its exit code.
    assert_eq!(gexec(&d, "exit 7").code, 7);
}

#[test]
fn writer_sequence_grows_without_gap() {
    if !lab_enabled("writer_sequence_grows_without_gap") {
        return;
    }
    let d = agent_dom();
    let a = seq_check(&d);
    sleep(Duration::from_secs(2));
    let b = seq_check(&d);
    assert_eq!(a.first, 1, "{a:?}");
    assert_eq!(b.first, 1, "{b:?}");
    assert_eq!(b.gaps, 0, "{b:?}");
    assert_eq!(b.lines, b.last, "{b:?}");
    assert!(
        b.last > a.last + 3,
        "writer too slow or stopped: {a:?} then {b:?}"
    );
}

#[test]
fn freeze_hook_logs_freeze_and_thaw_and_writer_survives() {
    if !lab_enabled("freeze_hook_logs_freeze_and_thaw_and_writer_survives") {
        return;
    }
    let d = agent_dom();
    let before = freeze_log(&d);
    let seq_before = seq_check(&d);
    {
        let _frozen = Frozen::new(&d);
        let refused = gexec(&d, "true");
        assert_ne!(refused.code, 0, "guest-exec must be refused while frozen");
        assert!(
            refused.stderr.contains("frozen"),
            "unexpected error: {}",
            refused.stderr
        );
        sleep(Duration::from_secs(1));
    } // thawed here
    let after = freeze_log(&d);
    assert_eq!(after.len(), before.len() + 2, "{after:?}");
    assert!(after[before.len()].starts_with("freeze "), "{after:?}");
    assert!(after[before.len() + 1].starts_with("thaw "), "{after:?}");
    sleep(Duration::from_millis(500));
    let seq_after = seq_check(&d);
    assert_eq!(seq_after.gaps, 0, "{seq_after:?}");
    assert!(
        seq_after.last > seq_before.last,
        "writer stopped after thaw"
    );
}

#[test]
fn noagent_domain_has_no_agent() {
    if !lab_enabled("noagent_domain_has_no_agent") {
        return;
    }
    let d = noagent_dom();
    assert_eq!(domstate(&d), "running");
    assert!(!agent_ping(&d));
    let out = virsh(&["domfsfreeze", &d]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QEMU guest agent is not configured"), "{err}");
    assert!(!virsh_ok(&["dumpxml", &d]).contains("org.qemu.guest_agent.0"));
    let disks = disk_sources(&d);
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert!(disks[0].1.ends_with(".qcow2"), "{disks:?}");
}

#[test]
fn multi_domain_has_the_described_disks() {
    if !lab_enabled("multi_domain_has_the_described_disks") {
        return;
    }
    let d = multi_dom();
    let devs = domblklist(&d, false);
    let by_target = |t: &str| {
        devs.iter()
            .find(|b| b.target == t)
            .unwrap_or_else(|| panic!("no {t} in {devs:?}"))
            .clone()
    };
    let vda = by_target("vda");
    let vdb = by_target("vdb");
    let vdc = by_target("vdc");
    let hdc = by_target("hdc");
    assert_eq!(devs.len(), 4, "{devs:?}");
    assert!(vda.source.ends_with("multi-vda.qcow2"));
    assert!(vdb.source.ends_with("multi-vdb.qcow2"));
    assert!(vdc.source.ends_with("multi-vdc.raw"));
    assert_eq!(hdc.device, "cdrom");
    assert!(hdc.source.ends_with(".iso"), "{hdc:?}");
    assert_eq!(backing_chain_len(Path::new(&vda.source)), 1);
    assert_eq!(backing_chain_len(Path::new(&vdb.source)), 2);
    // The guest mounts all three data disks and writes its sequence on vda.
    let mounts = gexec_ok(&d, "cat /proc/mounts");
    for m in ["/mnt/data ", "/mnt/data2 ", "/mnt/data3 "] {
        assert!(mounts.contains(m), "{m} not mounted: {mounts}");
    }
    let seed = gexec_ok(&d, "cat /mnt/data2/seed.txt");
    assert!(seed.contains("backing file"), "{seed}");
    assert_eq!(seq_check(&d).gaps, 0);
}

#[test]
fn uefi_domain_has_an_nvram_file() {
    if !lab_enabled("uefi_domain_has_an_nvram_file") {
        return;
    }
    let d = uefi_dom();
    assert_eq!(domstate(&d), "running");
    let xml = virsh_ok(&["dumpxml", "--inactive", &d]);
    let start = xml.find("<nvram").expect("no <nvram> in the XML");
    let rest = &xml[start..];
    let path = &rest[rest.find('>').unwrap() + 1..rest.find("</nvram>").unwrap()];
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("nvram {path}: {e}"));
    assert!(meta.len() > 0);
    assert!(xml.contains("type='pflash'"), "no pflash loader");
    assert!(!agent_ping(&d));
}

#[test]
fn ext4_cat_reads_a_disk_image_offline() {
    if !lab_enabled("ext4_cat_reads_a_disk_image_offline") {
        return;
    }
    let img = lab_dir().join("agent-vda.qcow2");
    let seed = ext4_cat(&img, "/seed.txt").expect("seed.txt readable");
    assert_eq!(
        String::from_utf8_lossy(&seed).trim(),
        format!("seed of {}", agent_dom())
    );
    assert!(ext4_cat(&img, "/no-such-file").is_none());
    let raw = lab_dir().join("multi-vdc.raw");
    assert!(ext4_cat(&raw, "/seed.txt").is_some());
}

#[test]
fn running_domains_are_on_their_base_images() {
    if !lab_enabled("running_domains_are_on_their_base_images") {
        return;
    }
    for d in [agent_dom(), noagent_dom(), uefi_dom()] {
        assert!(!has_backing_store(&d, false), "{d} runs on an overlay");
        assert!(!has_backing_store(&d, true), "{d} defined on an overlay");
        for (_, src) in disk_sources(&d) {
            assert!(
                src.starts_with(&lab_dir().to_string_lossy().into_owned()),
                "{src}"
            );
        }
    }
}

#[test]
fn multi_shuts_down_through_the_agent_and_restarts_with_its_sequence() {
    if !lab_enabled("multi_shuts_down_through_the_agent_and_restarts_with_its_sequence") {
        return;
    }
    let d = multi_dom();
    let before = seq_check(&d);
    shutdown_wait(&d);
    // Offline, the image holds what the writer wrote (flushed by the guest's shutdown script).
    let img = lab_dir().join("multi-vda.qcow2");
    let log = ext4_cat(&img, "/seq.log").expect("seq.log on the data disk");
    let offline_last: u64 = String::from_utf8_lossy(&log)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("a number on the last line");
    assert!(offline_last >= before.last, "{offline_last} < {before:?}");
    start_and_wait(&d);
    sleep(Duration::from_secs(1));
    let after = seq_check(&d);
    assert_eq!(after.first, 1, "{after:?}");
    assert_eq!(
        after.gaps, 0,
        "the writer resumes after the last number: {after:?}"
    );
    assert!(after.last > offline_last, "{after:?} vs {offline_last}");
}

#[test]
fn full_and_faulty_shares_fail_writes_as_told() {
    use std::io::Write;
    if !lab_enabled("full_and_faulty_shares_fail_writes_as_told") {
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let block = vec![0x5au8; 1 << 20];
    let write_mib = |path: &Path, mib: usize| -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        for _ in 0..mib {
            f.write_all(&block)?;
        }
        f.sync_all()
    };

    for tmpfs in [false, true] {
        let dir = tmp.path().join(format!("full-{tmpfs}"));
        let share = Share::full(&dir, "8M", tmpfs);
        write_mib(&share.dir.join("small"), 2).expect("2 MiB fit");
        let err = write_mib(&share.dir.join("big"), 16).expect_err("16 MiB must not fit");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    let dir = tmp.path().join("faulty");
    let share = Share::faulty(&dir, &["--fail-after", "3145728", "--errno", "EIO"]);
    write_mib(&share.dir.join("a"), 2).expect("2 MiB pass");
    let err = write_mib(&share.dir.join("b"), 2).expect_err("past 3 MiB writes fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    share.set_fault(&["--off"]);
    write_mib(&share.dir.join("c"), 4).expect("healed share takes writes");
    std::fs::rename(share.dir.join("c"), share.dir.join("d")).expect("rename");
    assert_eq!(
        std::fs::metadata(share.dir.join("d")).unwrap().len(),
        4 << 20
    );
    share.set_fault(&["--fail-after", "0", "--errno", "ENOSPC"]);
    let err = write_mib(&share.dir.join("e"), 1).expect_err("full now");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    share.set_fault(&["--fail-fsync"]);
    let err = write_mib(&share.dir.join("f"), 1).expect_err("fsync fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(share);
    assert!(
        !std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .contains(&*dir.to_string_lossy()),
        "faulty share still mounted"
    );
}

#[test]
fn agent_hang_helper_makes_agent_calls_time_out_then_recovers() {
    if !lab_enabled("agent_hang_helper_makes_agent_calls_time_out_then_recovers") {
        return;
    }
    struct ResetTimeout(String);
    impl Drop for ResetTimeout {
        fn drop(&mut self) {
            let _ = virsh(&["domfsthaw", &self.0]);
            let _ = virsh(&["guest-agent-timeout", &self.0, "--timeout", "-1"]);
        }
    }
    let d = agent_dom();
    let _reset = ResetTimeout(d.clone());
    virsh_ok(&["guest-agent-timeout", &d, "--timeout", "2"]);
    agent_hang(&d, Duration::from_secs(6));
    let t = std::time::Instant::now();
    let out = virsh(&["domfsfreeze", &d]);
    assert!(
        !out.status.success(),
        "freeze must fail while the agent hangs"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the 2 s agent timeout was not honoured: {:?}",
        t.elapsed()
    );
    wait_agent(&d, Duration::from_secs(30));
    // The timed-out freeze may still be executed when the agent resumes (seen here): thaw.
    eprintln!(
        "fsfreeze status after the agent resumed: {:?}",
        fsfreeze_status(&d)
    );
    let _ = virsh(&["domfsthaw", &d]);
    assert_eq!(fsfreeze_status(&d).as_deref(), Some("thawed"));
    sleep(Duration::from_millis(500));
    assert_eq!(seq_check(&d).gaps, 0);
}
