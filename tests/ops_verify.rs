//! `vm-backup verify` and the restore refusal on a backup folder built with the real copier:
//! one flipped byte is named by file and chunk, the exit code says so, the verdict lands in the
//! metadata and the catalog, one Slack alert goes out; restore refuses an image cut short
//! before touching anything (a flipped byte it finds as it copies, in one read: the lab test
//! `lab_ops::a_flipped_byte_stops_restore_naming_the_chunk_and_force_restores_with_a_warning`).

mod ops_support;

use std::fs;

use ops_support::*;
use vm_backup::format::metadata::BackupMetadata;

const STAMP: &str = "2026-11-21-120000";

#[test]
fn a_flipped_byte_is_named_refused_by_restore_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let vda = src.join("web01.qcow2");
    let vdb = src.join("web01-data.raw");
    make_image(&vda, 12 << 20, 7, "qcow2");
    make_image(&vdb, 9 << 20, 11, "raw");
    let disks = [("vda", "qcow2", vda.clone()), ("vdb", "raw", vdb.clone())];
    let (dir, meta) = hand_backup(
        &target,
        "hv1",
        "web01",
        STAMP,
        &domain_xml("web01", &disks),
        &disks,
    );

    let server = HttpRecorder::start(Behaviour::Ok);
    let conf = config(
        tmp.path(),
        &target,
        &format!(
            "[slack]\nalerts_webhook = \"{}/services/T/B/secret\"\n",
            server.base
        ),
    );
    let conf = conf.to_str().unwrap();

    // A whole backup passes, and the verdict is recorded.
    let out = run(&["verify", "web01", STAMP, "--config", conf]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("OK "), "{stdout}");
    let m = BackupMetadata::read(&dir).unwrap();
    assert!(m.verify.as_ref().unwrap().ok, "{:?}", m.verify);
    assert!(server.received().is_empty());

    // One flipped byte in the second 4 MiB chunk of the qcow2 (a data cluster).
    let file = dir.join(&meta.disks[0].file);
    flip_byte(&file, (6 << 20) + 123);
    let out = run(&["verify", "web01", STAMP, "--config", conf]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("web01-vda.qcow2: chunk 1 (offset 4194304) does not match the manifest"),
        "{stdout}"
    );
    let m = BackupMetadata::read(&dir).unwrap();
    let v = m.verify.unwrap();
    assert!(
        !v.ok && v.detail.contains("web01-vda.qcow2: chunk 1"),
        "{v:?}"
    );
    // The catalog has the verdict too.
    let rows = vm_backup::store::catalog::Catalog::open(&target)
        .unwrap()
        .backups(Some("web01"))
        .unwrap();
    assert!(!rows[0].verify.as_ref().unwrap().ok);
    // Exactly one alert, naming the chunk, without leaking the webhook in the output.
    let got = server.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].body.contains("chunk 1"), "{}", got[0].body);
    assert!(!stderr.contains("secret") && !stdout.contains("secret"));

    // --all sees it as well.
    let out = run(&["verify", "--all", "--config", conf, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports[0]["ok"], false);
    assert_eq!(reports[0]["checks"][0]["bad_chunk"][0], 1);

    // Restore checks the data as it copies it (that needs libvirt: the lab tests); what it can
    // judge without reading the data, an image cut short, it refuses before touching anything.
    flip_byte(&file, (6 << 20) + 123); // repaired
    let whole = fs::read(&file).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(whole.len() as u64 - 4096)
        .unwrap();
    let dest = tmp.path().join("restored");
    let out = run(&[
        "restore",
        "web01",
        STAMP,
        "--config",
        conf,
        "--as",
        "web01-copy",
        "--disk-dir",
        dest.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "web01-vda.qcow2: size is {} bytes, the manifest says {}",
            whole.len() - 4096,
            whole.len()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(!dest.exists(), "nothing was restored");
    fs::write(&file, &whole).unwrap();

    // A file listed in checksums.sha256 altered: named too.
    fs::write(dir.join("web01.xml"), "<domain><name>evil</name></domain>").unwrap();
    let out = run(&["verify", "web01", "latest", "--config", conf]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("web01.xml [sha256]: SHA-256 does not match"),
        "{stdout}"
    );
}

#[test]
fn truncated_and_missing_images_are_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let vda = tmp.path().join("a.raw");
    make_image(&vda, 5 << 20, 3, "raw");
    let disks = [("vda", "raw", vda)];
    let (dir, meta) = hand_backup(&target, "hv1", "a", STAMP, &domain_xml("a", &disks), &disks);
    let file = dir.join(&meta.disks[0].file);
    let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(3 << 20).unwrap();
    let out = run(&[
        "verify",
        "a",
        STAMP,
        "--target",
        target.to_str().unwrap(),
        "--host",
        "hv1",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("a-vda.raw"), "{stdout}");
    fs::remove_file(&file).unwrap();
    let out = run(&[
        "verify",
        "a",
        STAMP,
        "--target",
        target.to_str().unwrap(),
        "--host",
        "hv1",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("a-vda.raw [manifest]: missing"), "{stdout}");
}

#[test]
fn a_flipped_byte_in_a_backing_layer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let vda = tmp.path().join("a.qcow2");
    let base = tmp.path().join("base.raw");
    make_image(&vda, 6 << 20, 3, "qcow2");
    make_image(&base, 9 << 20, 5, "raw");
    let disks = [("vda", "qcow2", vda), ("vdz", "raw", base.clone())];
    let (dir, mut meta) = hand_backup(&target, "hv1", "a", STAMP, &domain_xml("a", &disks), &disks);
    // Turn the second image into the first disk's backing layer, as the engine records it.
    let z = meta.disks.pop().unwrap();
    let layer_file = "a-vda.backing-1.raw".to_string();
    fs::rename(dir.join(&z.file), dir.join(&layer_file)).unwrap();
    meta.disks[0]
        .backing_chain
        .push(vm_backup::format::metadata::BackingRecord {
            depth: 1,
            file: layer_file.clone(),
            source: base.display().to_string(),
            format: "raw".into(),
            backing_named_as: Some(base.display().to_string()),
            virtual_size: z.virtual_size,
            allocated_size: z.allocated_size,
            file_size: z.file_size,
            sha256: z.sha256.clone(),
            manifest: z.manifest.clone(),
            copy_seconds: 0.0,
            backing_rewrite: None,
        });
    vm_backup::store::write_metadata(&dir, &meta).unwrap();
    let sums = fs::read_to_string(dir.join("checksums.sha256"))
        .unwrap()
        .replace(&z.file, &layer_file);
    fs::write(dir.join("checksums.sha256"), sums).unwrap();
    let args = [
        "verify",
        "a",
        STAMP,
        "--target",
        target.to_str().unwrap(),
        "--host",
        "hv1",
    ];
    let out = run(&args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    flip_byte(&dir.join(&layer_file), (4 << 20) + 7);
    let out = run(&args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("a-vda.backing-1.raw: chunk 1 (offset 4194304) does not match"),
        "{stdout}"
    );
    // Removed: a missing layer is a fault too.
    fs::remove_file(dir.join(&layer_file)).unwrap();
    let out = run(&args);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("a-vda.backing-1.raw"), "{stdout}");
}

/// A `checksums.sha256` cut at a line boundary is still well formed (and `sha256sum -c` passes
/// it); verify names every file the metadata records that the list lost.
#[test]
fn a_file_cut_out_of_checksums_sha256_is_a_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("backup");
    let vda = tmp.path().join("a.raw");
    make_image(&vda, 2 << 20, 5, "raw");
    let disks = [("vda", "raw", vda)];
    let (dir, _meta) = hand_backup(&target, "hv1", "a", STAMP, &domain_xml("a", &disks), &disks);
    let verify = || {
        run(&[
            "verify",
            "a",
            STAMP,
            "--target",
            target.to_str().unwrap(),
            "--host",
            "hv1",
        ])
    };
    let out = verify();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
    let sums = dir.join("checksums.sha256");
    let kept: String = fs::read_to_string(&sums)
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with("  a.xml"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&sums, kept).unwrap();
    let out = verify();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("a.xml") && stdout.contains("not listed in checksums.sha256"),
        "{stdout}"
    );
}
