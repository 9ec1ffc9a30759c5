//! Lab test of backups of disks on backing chains (issue 15): each backup stands on its own.
//! The lab's multi domain gets one more disk, `vdd`, a chain of three layers made here:
//! `top.qcow2` names `mid.qcow2` by an absolute path, `mid.qcow2` names `bottom.raw` (a raw
//! base) by a relative name; its `vdb` already runs on a qcow2 with an absolute backing file.
//! Backed up online and offline; inside each backup folder, with the originals moved away,
//! `qemu-img info --backing-chain` stays in the folder, `qemu-img check` and `convert` pass,
//! and so do the backup's post-check (run again) and `vm-backup verify`; `qemu-img compare` of the offline copy
//! against the source; a restore `--as` boots. Skipped unless VMB_LAB_LIBVIRT=1.
//! `VMB_LAB_PREFIX=chl VMB_LAB_LIBVIRT=1 cargo test --test lab_chains -- --test-threads=1`

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::*;
use vm_backup::format::metadata::{BackupMetadata, DiskRecord};
use vm_backup::progress::{CancelToken, NoProgress};

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tool_ok(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap();
    let (o, e) = texts(&out);
    assert!(out.status.success(), "{tool} {args:?}: {o}\n{e}");
    o
}

/// `qemu-img info --backing-chain` (without -U: nothing else has the backup's files open).
fn chain_of(image: &Path) -> Vec<PathBuf> {
    let o = tool_ok(
        "qemu-img",
        &[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            image.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().unwrap()))
        .collect()
}

/// Scratch folders, the extra disk and the copy domain: all undone on drop.
struct Lab {
    dir: PathBuf,
    dom: String,
    copy: String,
    /// Files moved away, to put back (from, to).
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Lab {
    fn conf(&self) -> String {
        self.dir.join("vm-backup.conf").display().to_string()
    }

    fn vmb(&self, args: &[&str]) -> Output {
        let conf = self.conf();
        let mut all = args.to_vec();
        all.extend(["--config", &conf]);
        vm_backup().args(&all).output().unwrap()
    }

    /// A real backup; returns its folder.
    fn backup(&self) -> PathBuf {
        let out = self.vmb(&["backup", &self.dom]);
        let (o, e) = texts(&out);
        assert_eq!(out.status.code(), Some(0), "backup:\n{o}\n{e}");
        let vm_dir = self.dir.join("target").join("labhost").join(&self.dom);
        let stamp = vm_backup::format::layout::VmDir {
            path: vm_dir.clone(),
        }
        .latest()
        .unwrap()
        .expect("a published backup");
        vm_dir.join(stamp)
    }

    /// Moves `files` away (renamed beside themselves), remembered to be put back.
    fn move_away(&mut self, files: &[PathBuf]) {
        for f in files {
            let to = f.with_extension("moved-away");
            fs::rename(f, &to).unwrap();
            self.moved.push((to, f.clone()));
        }
    }

    fn put_back(&mut self) {
        for (from, to) in self.moved.drain(..) {
            let _ = fs::rename(&from, &to);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.put_back();
        let _ = virsh(&["destroy", &self.copy]);
        let _ = virsh(&["undefine", &self.copy, "--nvram"]);
        let _ = virsh(&["detach-disk", &self.dom, "vdd", "--live"]);
        let _ = virsh(&["detach-disk", &self.dom, "vdd", "--config"]);
        if domstate(&self.dom) != "running" {
            let _ = virsh(&["start", &self.dom]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The disk images of `disk` in the backup, top first, and their source paths.
fn layers(disk: &DiskRecord) -> Vec<(String, PathBuf)> {
    std::iter::once((disk.file.clone(), PathBuf::from(&disk.source)))
        .chain(
            disk.backing_chain
                .iter()
                .map(|b| (b.file.clone(), PathBuf::from(&b.source))),
        )
        .collect()
}

/// Everything a self-contained backup of a chained disk must show, with its originals away.
fn check_folder(lab: &mut Lab, backup: &Path, disk: &DiskRecord, meta: &BackupMetadata) {
    let ls = layers(disk);
    assert!(ls.len() >= 2, "{} has a chain: {disk:?}", disk.target);
    assert!(disk.backing_rewrite.is_some(), "{disk:?}");
    // Each copy names the next one by its plain name in the folder.
    for w in ls.windows(2) {
        let info = tool_ok(
            "qemu-img",
            &[
                "info",
                "--output=json",
                backup.join(&w[0].0).to_str().unwrap(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["backing-filename"].as_str(), Some(w[1].0.as_str()));
    }
    // The originals away (the running domain keeps its open files): the backup on its own.
    let originals: Vec<PathBuf> = ls.iter().skip(1).map(|(_, s)| s.clone()).collect();
    lab.move_away(&originals);
    let top = backup.join(&disk.file);
    let chain = chain_of(&top);
    assert_eq!(chain.len(), ls.len(), "{chain:?}");
    for f in &chain {
        assert!(f.starts_with(backup), "{f:?} is outside the backup");
    }
    tool_ok("qemu-img", &["check", top.to_str().unwrap()]);
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            lab.dir.join("converted.raw").to_str().unwrap(),
        ],
    );
    let _ = fs::remove_file(lab.dir.join("converted.raw"));
    // The backup's post-check, run again now: only the folder's files are opened.
    let problems = vm_backup::engine::backup::checks::post_check_folder(
        backup,
        meta,
        &NoProgress,
        &CancelToken::new(),
    );
    assert!(problems.is_empty(), "post-check: {problems:?}");
    // verify runs the same chain check.
    let out = lab.vmb(&["verify", &lab.dom.clone(), &meta.stamp]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "verify:\n{o}\n{e}");
    lab.put_back();
}

#[test]
fn chained_disks_are_backed_up_self_contained_online_and_offline_and_restore_boots() {
    if !lab_enabled(
        "chained_disks_are_backed_up_self_contained_online_and_offline_and_restore_boots",
    ) {
        return;
    }
    let dom = multi_dom();
    let dir = PathBuf::from(format!(
        "/var/tmp/vmb-{}-chains-{}",
        prefix(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("target")).unwrap();
    vm_backup::store::FolderStore::init(dir.join("target"), None).unwrap();
    fs::create_dir_all(dir.join("src")).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("src"), fs::Permissions::from_mode(0o755)).unwrap();
    let conf = format!(
        "target = \"{d}/target\"\nhostname = \"labhost\"\njournal_dir = \"{d}/journal\"\n\
         inventory = \"{d}/vm-list.yaml\"\n",
        d = dir.display()
    );
    fs::write(dir.join("vm-backup.conf"), conf).unwrap();
    let mut lab = Lab {
        dir: dir.clone(),
        dom: dom.clone(),
        copy: format!("{dom}-chl"),
        moved: Vec::new(),
    };
    let _ = virsh(&["destroy", &lab.copy]);
    let _ = virsh(&["undefine", &lab.copy, "--nvram"]);

    // vdd: top.qcow2 -(absolute)-> mid.qcow2 -(relative)-> bottom.raw, data in each layer.
    let src = dir.join("src");
    let p = |n: &str| src.join(n).display().to_string();
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p("bottom.raw"), "8M"],
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 2M", &p("bottom.raw")],
    );
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "bottom.raw",
            "-F",
            "raw",
            &p("mid.qcow2"),
        ],
    );
    tool_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 1M 2M", &p("mid.qcow2")],
    );
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("mid.qcow2"),
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    tool_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 6M 64k", &p("top.qcow2")],
    );
    for f in ["bottom.raw", "mid.qcow2", "top.qcow2"] {
        fs::set_permissions(src.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    if domstate(&dom) != "running" {
        start_and_wait(&dom);
    }
    wait_agent(&dom, Duration::from_secs(120));
    virsh_ok(&[
        "attach-disk",
        &dom,
        &p("top.qcow2"),
        "vdd",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--persistent",
    ]);

    // Online.
    let backup = lab.backup();
    let meta = BackupMetadata::read(&backup).unwrap();
    for t in ["vdb", "vdd"] {
        let d = meta.disks.iter().find(|d| d.target == t).unwrap().clone();
        check_folder(&mut lab, &backup, &d, &meta);
    }
    let vdd = meta.disks.iter().find(|d| d.target == "vdd").unwrap();
    assert_eq!(vdd.backing_chain.len(), 2);
    assert_eq!(vdd.backing_chain[1].format, "raw");

    // Offline: the sources do not change, so the copy compares equal to them.
    shutdown_wait(&dom);
    std::thread::sleep(Duration::from_secs(1));
    let backup2 = lab.backup();
    assert_ne!(backup2, backup);
    let meta2 = BackupMetadata::read(&backup2).unwrap();
    let vdd2 = meta2
        .disks
        .iter()
        .find(|d| d.target == "vdd")
        .unwrap()
        .clone();
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-U",
            backup2.join(&vdd2.file).to_str().unwrap(),
            &p("top.qcow2"),
        ],
    );
    // The source's own digest is kept: its chunk 0 differs from the copy's.
    let rw = vdd2.backing_rewrite.clone().unwrap();
    assert_eq!(rw.how, "copier");
    assert_eq!(rw.original, p("mid.qcow2"));
    assert_ne!(rw.source_root.as_deref(), Some(vdd2.manifest.root.as_str()));
    for t in ["vdb", "vdd"] {
        let d = meta2.disks.iter().find(|d| d.target == t).unwrap().clone();
        check_folder(&mut lab, &backup2, &d, &meta2);
    }

    // Restore --as into a folder of its own, the originals away: it boots.
    let dd = dir.join("restored");
    let vdd_sources: Vec<PathBuf> = layers(&vdd2).into_iter().map(|(_, s)| s).collect();
    lab.move_away(&vdd_sources);
    let out = lab.vmb(&[
        "restore",
        &dom,
        "latest",
        "--as",
        &lab.copy.clone(),
        "--disk-dir",
        &dd.display().to_string(),
    ]);
    lab.put_back();
    let (o, e) = texts(&out);
    assert!(out.status.success(), "restore:\n{o}\n{e}");
    let top = dd.join(format!("{}-vdd.qcow2", lab.copy));
    let chain = chain_of(&top);
    assert_eq!(chain.len(), 3, "{chain:?}");
    for f in &chain {
        assert!(f.starts_with(&dd), "{f:?} is outside the restore folder");
    }
    tool_ok(
        "qemu-img",
        &["compare", "-U", top.to_str().unwrap(), &p("top.qcow2")],
    );
    virsh_ok(&["start", &lab.copy]);
    wait_agent(&lab.copy, Duration::from_secs(180));
    assert_eq!(domstate(&lab.copy), "running");
}
