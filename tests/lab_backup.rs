//! Lab tests of `vm-backup backup`, `check` and `orphans` against the real libvirt lab
//! (`lab/libvirt-lab.sh up PREFIX`, `VMB_LAB_LIBVIRT=1`; skipped otherwise). The tests of this
//! file run one at a time (a lock below), each with its own target, journal and config.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const HOST: &str = "labhost";
const AGENT_SECONDS: u64 = 3;

/// A private target + journal + config for one test.
struct Env {
    _tmp: tempfile::TempDir,
    target: PathBuf,
    journal: PathBuf,
    config: PathBuf,
}

impl Env {
    fn new() -> Env {
        Self::with_target(None)
    }

    fn with_target(target: Option<&Path>) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("vmb-eng-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let target = target
            .map(Path::to_path_buf)
            .unwrap_or_else(|| tmp.path().join("target"));
        let journal = tmp.path().join("journal");
        fs::create_dir_all(&target).unwrap();
        vm_backup::store::FolderStore::init(&target, None).unwrap();
        let config = tmp.path().join("vm-backup.conf");
        fs::write(
            &config,
            format!(
                "target = {:?}\nhostname = {HOST:?}\njournal_dir = {:?}\n\
                 [timeouts]\nagent_seconds = {AGENT_SECONDS}\ncommit_seconds = 120\nshutdown_seconds = 60\n",
                target.to_str().unwrap(),
                journal.to_str().unwrap(),
            ),
        )
        .unwrap();
        Env {
            _tmp: tmp,
            target,
            journal,
            config,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = vm_backup();
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env("LIBVIRT_DEFAULT_URI", "qemu:///system");
        c
    }

    fn backup(&self, vm: &str, extra: &[&str]) -> (Output, Option<Value>) {
        let mut args = vec!["backup", vm, "--json"];
        args.extend_from_slice(extra);
        let out = self.cmd(&args).output().unwrap();
        let json = serde_json::from_slice(&out.stdout).ok();
        (out, json)
    }

    fn spawn_backup(&self, vm: &str, pause_ms: u64) -> Child {
        self.cmd(&["backup", vm, "--json"])
            .env("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", pause_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn vm_dir(&self, safe_vm: &str) -> PathBuf {
        self.target.join(HOST).join(safe_vm)
    }

    fn partials(&self, safe_vm: &str) -> Vec<PathBuf> {
        list(&self.vm_dir(safe_vm))
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect()
    }

    fn journal_file(&self, vm: &str) -> PathBuf {
        self.journal.join("journal").join(format!("{vm}.json"))
    }
}

/// The entries of a folder, without the target's marker and the VM locks (the only files
/// vm-backup keeps outside backups).
fn list(dir: &Path) -> Vec<PathBuf> {
    use vm_backup::format::layout::{TARGET_MARKER, VM_LOCK_FILE};
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name() != TARGET_MARKER && e.file_name() != VM_LOCK_FILE)
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Overlay files of ours left in the lab folder.
fn overlays_left() -> Vec<PathBuf> {
    list(&lab_dir())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".vmb-overlay-"))
        .collect()
}

fn sha256sum_c(dir: &Path) {
    let out = Command::new("sha256sum")
        .args(["-c", "--strict", "checksums.sha256"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sha256sum -c in {}: {}{}",
        dir.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        path.display(),
        text(&out.stdout)
    );
}

/// Waits until a `.partial` folder of `safe_vm` exists (the snapshot is taken by then).
fn wait_partial(env: &Env, safe_vm: &str, child: &mut Child) {
    let t = Instant::now();
    while env.partials(safe_vm).is_empty() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("backup ended ({status}) before its partial folder appeared: {err}");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no partial folder");
        sleep(Duration::from_millis(50));
    }
}

fn assert_on_original_images(dom: &str, before: &[(String, String)]) {
    assert_eq!(
        &disk_sources(dom),
        before,
        "{dom} is not on its original images"
    );
    assert!(
        overlays_left().is_empty(),
        "overlays left: {:?}",
        overlays_left()
    );
}

/// Checks the metadata of a finished backup and returns its folder.
fn check_outcome(json: &Value, vm: &str, method: &str) -> PathBuf {
    assert_eq!(json["status"], "success", "{json:#}");
    assert_eq!(json["exit_code"], 0);
    let md = &json["metadata"];
    assert_eq!(md["vm_name"], vm);
    assert_eq!(md["method"], method, "{json:#}");
    assert_eq!(md["host"], HOST);
    assert_eq!(md["result"], "success");
    assert!(md["disks"].as_array().is_some_and(|d| !d.is_empty()));
    for d in md["disks"].as_array().unwrap() {
        assert!(d["virtual_size"].as_u64().unwrap() > 0);
        assert!(d["file_size"].as_u64().unwrap() > 0);
        assert_eq!(d["sha256"].as_str().unwrap().len(), 64);
    }
    assert!(md["total_bytes"].as_u64().unwrap() > 0);
    if method == "quiesce" {
        assert!(md["frozen_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(json["frozen_ms"], md["frozen_ms"]);
    } else {
        assert!(md["frozen_ms"].is_null());
    }
    let dir = PathBuf::from(json["backup_dir"].as_str().unwrap());
    assert!(dir.is_dir());
    assert!(!dir.to_string_lossy().ends_with(".partial"));
    for f in ["backup-metadata.json", "backup.log", "checksums.sha256"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    assert!(dir.join(format!("{vm}.xml")).is_file());
    // Every image was read back from the share block by block during its copy (O_DIRECT
    // works on the lab's targets), so the post-checks did not read it a second time.
    let images: usize = md["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| 1 + d["backing_chain"].as_array().map_or(0, Vec::len))
        .sum();
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(
        log.contains(&format!(
            "{images} of {images} image(s) already read back from the share during the copy"
        )),
        "{log}"
    );
    sha256sum_c(&dir);
    dir
}

/// The data disk copy holds the guest's filesystem as of the snapshot.
fn check_data_disk(copy: &Path, dom: &str, seq_after: &SeqCheck) {
    qemu_img_check(copy);
    let raw = copy.with_extension("check.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(copy)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the copy of {dom}: {}",
        text(&fsck.stdout)
    );
    let seed = ext4_cat(&raw, "/seed.txt").expect("seed.txt in the copy");
    assert!(
        text(&seed).contains(&format!("seed of {dom}")),
        "{}",
        text(&seed)
    );
    let seq = text(&ext4_cat(&raw, "/seq.log").expect("seq.log in the copy"));
    let last: u64 = seq
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .expect("numbers in seq.log");
    assert!(
        last <= seq_after.last,
        "copy's seq.log ends at {last}, after the guest's {}",
        seq_after.last
    );
    fs::remove_file(&raw).unwrap();
}

#[test]
fn auto_backup_of_every_lab_domain() {
    if !lab_enabled("auto_backup_of_every_lab_domain") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let pre = env
        .cmd(&["check", &agent_dom(), "--pre", "--json"])
        .output()
        .unwrap();
    assert_eq!(pre.status.code(), Some(0), "{}", text(&pre.stderr));
    let pre: Value = serde_json::from_slice(&pre.stdout).unwrap();
    assert_eq!(pre["pre"]["method"], "quiesce", "{pre:#}");
    for (kind, method) in [
        ("agent", "quiesce"),
        ("noagent", "snapshot"),
        ("uefi", "snapshot"),
        ("multi", "quiesce"),
    ] {
        let d = dom(kind);
        let before = disk_sources(&d);
        // The writer's log can only be read through the agent.
        let writer = kind == "agent" || kind == "multi";
        let seq_before = writer.then(|| seq_check(&d));
        let t = Instant::now();
        let (out, json) = env.backup(&d, &[]);
        let secs = t.elapsed().as_secs_f64();
        let json =
            json.unwrap_or_else(|| panic!("no JSON from backup of {d}: {}", text(&out.stderr)));
        assert_eq!(out.status.code(), Some(0), "{d}: {json:#}");
        let dir = check_outcome(&json, &d, method);
        eprintln!(
            "MEASURE backup {d}: {secs:.2} s, method {method}, frozen_ms {}",
            json["frozen_ms"]
        );
        assert_on_original_images(&d, &before);
        if kind != "multi" {
            assert!(
                !has_backing_store(&d, false),
                "{d} live XML keeps a backing store"
            );
            assert!(
                !has_backing_store(&d, true),
                "{d} inactive XML keeps a backing store"
            );
        }
        assert!(env.partials(&d).is_empty());
        assert!(!env.journal_file(&d).exists(), "journal left for {d}");
        if let Some(seq_before) = seq_before {
            sleep(Duration::from_millis(1500));
            let after = seq_check(&d);
            assert_eq!(after.gaps, 0, "{d}: writer sequence has gaps: {after:?}");
            assert!(
                after.last > seq_before.last,
                "{d}: writer stopped: {after:?}"
            );
            check_data_disk(&dir.join(format!("{d}-vda.qcow2")), &d, &after);
        }
        match kind {
            "uefi" => {
                assert!(dir.join(format!("{d}-nvram.fd")).is_file());
                let files = json["metadata"]["files"].as_array().unwrap();
                assert!(files.iter().any(|f| f == format!("{d}-nvram.fd").as_str()));
            }
            "multi" => {
                let md = &json["metadata"];
                let targets: Vec<&str> = md["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["target"].as_str().unwrap())
                    .collect();
                assert_eq!(targets, ["vda", "vdb", "vdc"]);
                assert_eq!(md["skipped_disks"][0]["target"], "hdc");
                assert!(md["skipped_disks"][0]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("cdrom"));
                qemu_img_check(&dir.join(format!("{d}-vdb.qcow2")));
                // vdb's backing file is in the backup too (see multi_backing_chain_…).
                assert!(dir.join(format!("{d}-vdb.backing-1.qcow2")).is_file());
                assert!(dir.join(format!("{d}-vdc.raw")).is_file());
                // vdb's own backing file is still the base of the original, untouched.
                assert_eq!(backing_chain_len(&lab_dir().join("multi-vdb.qcow2")), 2);
            }
            _ => {}
        }
    }
    // check --post agrees.
    let out = env
        .cmd(&["check", &agent_dom(), "--post"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn quiesce_freeze_window_is_short_and_one_freeze_thaw_pair() {
    if !lab_enabled("quiesce_freeze_window_is_short_and_one_freeze_thaw_pair") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = agent_dom();
    // TCG guests on a shared 2-core host: one attempt can be slowed by the load, so the
    // bound is checked on the best of at most three backups; every one of them must show
    // exactly one freeze+thaw pair, thawed long before its copy (paused 3 s) ended.
    let mut best = f64::MAX;
    for attempt in 1..=3 {
        let before = freeze_log(&d);
        let t = Instant::now();
        let mut cmd = env.cmd(&["backup", &d, "--json", "--method", "quiesce"]);
        let out = cmd
            .env("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "3000")
            .output()
            .unwrap();
        let run_ms = t.elapsed().as_secs_f64() * 1000.0;
        let json: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
        assert_eq!(out.status.code(), Some(0), "{json:#}");
        let after = freeze_log(&d);
        let new: Vec<&String> = after.iter().skip(before.len()).collect();
        assert_eq!(new.len(), 2, "expected one freeze+thaw pair, got {new:?}");
        assert!(new[0].starts_with("freeze"), "{new:?}");
        assert!(new[1].starts_with("thaw"), "{new:?}");
        let uptime = |l: &str| -> f64 { l.split_whitespace().nth(1).unwrap().parse().unwrap() };
        let guest_ms = (uptime(new[1]) - uptime(new[0])) * 1000.0;
        let frozen_ms = json["metadata"]["frozen_ms"].as_f64().unwrap();
        eprintln!(
            "MEASURE frozen window (attempt {attempt}): engine {frozen_ms:.1} ms, guest hook log {guest_ms:.0} ms, whole backup {run_ms:.0} ms"
        );
        // The engine's window (the whole libvirt call) contains the guest's.
        assert!(
            guest_ms <= frozen_ms + 20.0,
            "guest {guest_ms} > engine {frozen_ms}"
        );
        // The guest was thawed before the copy: frozen for a fraction of the run.
        assert!(
            frozen_ms < run_ms - 3000.0,
            "frozen {frozen_ms} ms of a {run_ms} ms run"
        );
        best = best.min(frozen_ms);
        if frozen_ms < 1000.0 {
            break;
        }
    }
    assert!(best < 1000.0, "frozen window {best} ms even at best");
}

fn kill9_during_copy(env: &Env, d: &str) {
    let mut child = env.spawn_backup(d, 30_000);
    wait_partial(env, d, &mut child);
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    // What a kill -9 leaves: the domain on our overlay, a partial folder, a journal.
    assert!(
        !overlays_left().is_empty(),
        "no overlay while the backup was killed"
    );
    assert!(disk_sources(d)[0].1.contains(".vmb-overlay-"));
    assert!(!env.partials(d).is_empty());
    assert!(env.journal_file(d).exists());
}

#[test]
fn kill9_then_orphans_cleanup_then_backup() {
    if !lab_enabled("kill9_then_orphans_cleanup_then_backup") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = agent_dom();
    let before = disk_sources(&d);
    kill9_during_copy(&env, &d);

    let listed = env.cmd(&["orphans", "--json"]).output().unwrap();
    assert_eq!(listed.status.code(), Some(3), "{}", text(&listed.stderr));
    let report: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(report["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["vm"] == d.as_str() && o["kind"] == "journal"));

    let t = Instant::now();
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    eprintln!(
        "MEASURE orphans --cleanup: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_on_original_images(&d, &before);
    assert!(!has_backing_store(&d, false));
    assert!(!has_backing_store(&d, true));
    assert!(env.partials(&d).is_empty());
    assert!(!env.journal_file(&d).exists());
    // Not frozen: the agent runs commands (refused while frozen).
    gexec_ok(&d, "true");
    // Nothing of this VM is left (other users' domains on a shared lab may show up).
    let again = env.cmd(&["orphans", "--json"]).output().unwrap();
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert!(
        !again["orphans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["vm"] == d.as_str()),
        "{again:#}"
    );

    let (out, json) = env.backup(&d, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    check_outcome(&json.unwrap(), &d, "quiesce");
    assert_on_original_images(&d, &before);
}

#[test]
fn kill9_then_next_backup_repairs_and_succeeds() {
    if !lab_enabled("kill9_then_next_backup_repairs_and_succeeds") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = noagent_dom();
    let before = disk_sources(&d);
    kill9_during_copy(&env, &d);
    let (out, json) = env.backup(&d, &[]);
    let json = json.unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "snapshot");
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(log.contains("repaired:"), "{log}");
    assert_on_original_images(&d, &before);
    assert!(env.partials(&d).is_empty());
    assert_eq!(
        list(&env.vm_dir(&d)).len(),
        1,
        "{:?}",
        list(&env.vm_dir(&d))
    );
}

#[test]
fn sigterm_during_copy_releases_everything() {
    if !lab_enabled("sigterm_during_copy_releases_everything") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = agent_dom();
    let before = disk_sources(&d);
    let mut child = env.spawn_backup(&d, 30_000);
    wait_partial(&env, &d, &mut child);
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["error"].as_str().unwrap().contains(&d));
    assert!(
        json["error"].as_str().unwrap().contains("cancel"),
        "{json:#}"
    );
    assert_on_original_images(&d, &before);
    assert!(env.partials(&d).is_empty());
    assert!(!env.journal_file(&d).exists());
}

/// Mounts a small tmpfs through the lab's share script; unmounts on drop.
struct Share(PathBuf);

impl Share {
    fn tmpfs(dir: &Path, size: &str) -> Share {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/share.sh"))
            .args(["mkfull", dir.to_str().unwrap(), size, "--tmpfs"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "share.sh mkfull: {}",
            text(&out.stderr)
        );
        Share(dir.to_path_buf())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/share.sh"))
            .args(["umount", self.0.to_str().unwrap()])
            .output();
    }
}

#[test]
fn full_target_fails_with_exit_2_and_keeps_earlier_backups() {
    if !lab_enabled("full_target_fails_with_exit_2_and_keeps_earlier_backups") {
        return;
    }
    let _g = serial();
    let mount = tempfile::Builder::new()
        .prefix("vmb-eng-full")
        .tempdir_in("/var/tmp")
        .unwrap();
    let share = Share::tmpfs(&mount.path().join("share"), "40M");
    let env = Env::with_target(Some(&share.0));
    let d = noagent_dom();
    let before = disk_sources(&d);
    let (out, json) = env.backup(&d, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let earlier = check_outcome(&json.unwrap(), &d, "snapshot");

    // Start a backup, and fill the share once its snapshot and partial folder exist.
    let mut child = env.spawn_backup(&d, 2_000);
    wait_partial(&env, &d, &mut child);
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", share.0.join("ballast").display()))
        .status();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = json["error"].as_str().unwrap();
    assert!(err.contains(&d) && err.contains("copy"), "{err}");
    assert!(err.to_lowercase().contains("no space left"), "{err}");
    assert_on_original_images(&d, &before);
    assert!(env.partials(&d).is_empty(), "{:?}", env.partials(&d));
    assert!(!env.journal_file(&d).exists());
    sha256sum_c(&earlier);
    fs::remove_file(share.0.join("ballast")).unwrap();
}

#[test]
fn unknown_vm_exits_1_with_a_clear_message() {
    if !lab_enabled("unknown_vm_exits_1_with_a_clear_message") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let name = format!("{}-does-not-exist", prefix());
    let out = env.cmd(&["backup", &name]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&name) && err.contains("no domain"), "{err}");
    // Only the run's record in the catalog on the share (`metadata/`), no backup folder.
    let written: Vec<_> = list(&env.target)
        .into_iter()
        .filter(|p| !p.ends_with("metadata"))
        .collect();
    assert!(written.is_empty(), "something written: {:?}", written);
    let out = env.cmd(&["check", &name, "--pre"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// Defines a tiny shut-off domain on its own qcow2; undefines it and deletes the disk on drop.
struct TempDomain {
    name: String,
    disk: PathBuf,
}

impl TempDomain {
    fn define(name: &str) -> Result<TempDomain, String> {
        let disk = lab_dir().join(format!("tmpdom-{}.qcow2", std::process::id()));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        let esc = name
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let xml = format!(
            "<domain type='qemu'><name>{esc}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
            disk.display()
        );
        let xml_path = disk.with_extension("xml");
        fs::write(&xml_path, xml).unwrap();
        let out = virsh(&["define", xml_path.to_str().unwrap()]);
        let _ = fs::remove_file(&xml_path);
        if !out.status.success() {
            let _ = fs::remove_file(&disk);
            return Err(text(&out.stderr));
        }
        Ok(TempDomain {
            name: name.to_string(),
            disk,
        })
    }
}

impl Drop for TempDomain {
    fn drop(&mut self) {
        let _ = virsh(&["undefine", &self.name]);
        let _ = fs::remove_file(&self.disk);
    }
}

#[test]
fn hostile_vm_names_are_backed_up_into_safe_folders() {
    if !lab_enabled("hostile_vm_names_are_backed_up_into_safe_folders") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let name = format!("{}-Prüf VM 1", prefix());
    let safe = vm_backup::format::layout::safe_component(&name).unwrap();
    assert!(
        safe.starts_with(&format!("{}-Prüf_VM_1-", prefix())),
        "{safe}"
    );
    let dom = TempDomain::define(&name).expect("libvirt accepts spaces and non-ASCII");
    let (out, json) = env.backup(&dom.name, &[]);
    let json = json.unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    assert_eq!(json["metadata"]["method"], "offline");
    assert_eq!(json["metadata"]["vm_name"], name.as_str());
    let dir = PathBuf::from(json["backup_dir"].as_str().unwrap());
    assert_eq!(dir.parent().unwrap(), env.vm_dir(&safe));
    assert!(dir.join(format!("{safe}-vda.qcow2")).is_file());
    assert!(dir.join(format!("{safe}.xml")).is_file());
    sha256sum_c(&dir);
    drop(dom);

    // A name with a path in it: libvirt refuses '/', or the backup stays inside the target.
    let evil = format!("{}-../x", prefix());
    match TempDomain::define(&evil) {
        Err(e) => eprintln!("libvirt refuses the name {evil:?}: {}", e.trim()),
        Ok(dom) => {
            let (out, json) = env.backup(&dom.name, &[]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            let dir = PathBuf::from(json.unwrap()["backup_dir"].as_str().unwrap());
            assert!(dir.starts_with(env.target.join(HOST)), "{}", dir.display());
            assert!(!dir
                .components()
                .any(|c| c == std::path::Component::ParentDir));
            assert_eq!(
                dir.parent().unwrap(),
                env.vm_dir(&vm_backup::format::layout::safe_component(&evil).unwrap())
            );
        }
    }
    // Nothing was written outside the target's host folder (and the catalog in `metadata/`).
    assert_eq!(
        list(&env.target)
            .into_iter()
            .filter(|p| !p.ends_with("metadata"))
            .collect::<Vec<_>>(),
        vec![env.target.join(HOST)]
    );
}

#[test]
fn hung_agent_fails_within_its_bound_and_leaves_nothing() {
    if !lab_enabled("hung_agent_fails_within_its_bound_and_leaves_nothing") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = agent_dom();
    let before = disk_sources(&d);
    // Stop qemu-ga from inside (a command issued before the hang), resume it 15 s later.
    gexec_ok(
        &d,
        "P=$(pidof qemu-ga); (sleep 1; kill -STOP $P; sleep 15; kill -CONT $P) >/dev/null 2>&1 </dev/null &",
    );
    sleep(Duration::from_secs(2));
    let t = Instant::now();
    let (out, json) = env.backup(&d, &["--method", "quiesce"]);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("MEASURE hung agent: failed after {secs:.2} s (bound {AGENT_SECONDS} s)");
    let json = json.unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let err = json["error"].as_str().unwrap();
    assert!(err.contains(&d) && err.contains("agent"), "{err}");
    assert!(secs < AGENT_SECONDS as f64 + 5.0, "took {secs} s");
    assert_on_original_images(&d, &before);
    assert!(env.partials(&d).is_empty());
    assert!(list(&env.vm_dir(&d)).is_empty());
    assert!(!env.journal_file(&d).exists());
    // Only when asked: a crash-consistent fallback, recorded as such (the agent still hangs).
    let (out, json) = env.backup(&d, &["--method", "quiesce", "--allow-crash-consistent"]);
    let json = json.unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    assert_eq!(json["metadata"]["method"], "snapshot");
    assert_eq!(json["metadata"]["method_requested"], "quiesce");
    let note = json["metadata"]["method_note"].as_str().unwrap();
    assert!(
        note.contains("agent") && note.contains("fallback"),
        "{note}"
    );
    assert!(json["metadata"]["frozen_ms"].is_null());
    assert_on_original_images(&d, &before);
    // The agent comes back; nothing is frozen.
    wait_agent(&d, Duration::from_secs(40));
    gexec_ok(&d, "true");
}

#[test]
fn kill9_then_domain_stopped_is_repaired_offline() {
    if !lab_enabled("kill9_then_domain_stopped_is_repaired_offline") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = noagent_dom();
    let before = disk_sources(&d);
    kill9_during_copy(&env, &d);
    // The domain stops while on our overlay: libvirt cannot blockcommit a shut-off domain.
    virsh_ok(&["destroy", &d]);
    assert!(
        has_backing_store(&d, true),
        "the definition should name the overlay"
    );
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report.to_string().contains("committed offline"),
        "{report:#}"
    );
    assert!(!has_backing_store(&d, true));
    assert!(overlays_left().is_empty(), "{:?}", overlays_left());
    assert!(env.partials(&d).is_empty());
    assert_eq!(backing_chain_len(&lab_dir().join("noagent-vda.qcow2")), 1);
    virsh_ok(&["start", &d]);
    assert_eq!(disk_sources(&d), before);
    assert_eq!(domstate(&d), "running");
}

#[test]
fn offline_shutdown_backup_starts_the_domain_again() {
    if !lab_enabled("offline_shutdown_backup_starts_the_domain_again") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = multi_dom();
    let before = disk_sources(&d);
    // Without --shutdown, a running domain cannot be backed up offline: exit 1, untouched.
    let (out, _) = env.backup(&d, &["--method", "offline"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(domstate(&d), "running");
    let t = Instant::now();
    let (out, json) = env.backup(&d, &["--method", "offline", "--shutdown"]);
    eprintln!(
        "MEASURE offline --shutdown backup of {d}: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let json = json.unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    check_outcome(&json, &d, "offline");
    assert!(json["metadata"]["phases"]["shutdown"].as_f64().is_some());
    assert_eq!(domstate(&d), "running");
    assert_eq!(disk_sources(&d), before);
    wait_agent(&d, Duration::from_secs(90));
}

#[test]
fn second_backup_of_the_same_vm_is_refused_while_one_runs() {
    if !lab_enabled("second_backup_of_the_same_vm_is_refused_while_one_runs") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = noagent_dom();
    let before = disk_sources(&d);
    let mut first = env.spawn_backup(&d, 3_000);
    wait_partial(&env, &d, &mut first);
    let (out, json) = env.backup(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = json.unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.contains(&d) && err.contains("lock"), "{err}");
    // orphans does not touch a running backup either.
    let o = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    assert!(
        !env.partials(&d).is_empty(),
        "orphans removed the running backup's folder"
    );
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_outcome(&json, &d, "snapshot");
    assert_on_original_images(&d, &before);
}

#[test]
fn a_run_with_another_journal_dir_is_refused_by_the_target_lock() {
    if !lab_enabled("a_run_with_another_journal_dir_is_refused_by_the_target_lock") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    // The same target, its own journal_dir (a plugin `config=` with another one).
    let other = Env::with_target(Some(&env.target));
    assert_ne!(env.journal, other.journal);
    let d = noagent_dom();
    let before = disk_sources(&d);
    let mut first = env.spawn_backup(&d, 3_000);
    wait_partial(&env, &d, &mut first);
    let partials = env.partials(&d);
    let (out, json) = other.backup(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = json.unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.contains(&d) && err.contains("lock"), "{err}");
    assert_eq!(
        env.partials(&d),
        partials,
        "the first run's .partial survives"
    );
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_outcome(&json, &d, "snapshot");
    assert_on_original_images(&d, &before);
}

/// Runs a command, panics with its output unless it succeeds; returns stdout.
fn cmd_ok(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn multi_backing_chain_is_copied_whole_and_restores_on_its_own() {
    if !lab_enabled("multi_backing_chain_is_copied_whole_and_restores_on_its_own") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = multi_dom();
    let before = disk_sources(&d);
    // Something only the top image of vdb holds (the seed lives in its backing file).
    let marker = format!("top layer marker {}", std::process::id());
    gexec_ok(
        &d,
        &format!("echo '{marker}' > /mnt/data2/top-marker.txt && sync"),
    );
    let base = lab_dir().join("multi-vdb-base.qcow2");
    let base_sha = cmd_ok("sha256sum", &[base.as_os_str()]);
    let (out, json) = env.backup(&d, &[]);
    let json = json.unwrap_or_else(|| panic!("no JSON: {}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "quiesce"); // includes sha256sum -c
    assert_on_original_images(&d, &before);

    // The metadata lists vdb's chain; the other disks have none.
    let disks = json["metadata"]["disks"].as_array().unwrap();
    let vdb = disks.iter().find(|x| x["target"] == "vdb").unwrap();
    let chain = vdb["backing_chain"]
        .as_array()
        .expect("backing_chain of vdb");
    assert_eq!(chain.len(), 1, "{vdb:#}");
    let b = &chain[0];
    let backing_name = format!("{d}-vdb.backing-1.qcow2");
    assert_eq!(b["depth"], 1);
    assert_eq!(b["file"], backing_name.as_str());
    assert_eq!(b["format"], "qcow2");
    assert_eq!(b["source"], base.to_str().unwrap());
    assert_eq!(b["backing_named_as"], base.to_str().unwrap());
    for other in disks.iter().filter(|x| x["target"] != "vdb") {
        assert!(other.get("backing_chain").is_none(), "{other:#}");
    }
    let sums = fs::read_to_string(dir.join("checksums.sha256")).unwrap();
    assert!(
        sums.contains(&format!(
            "{}  {backing_name}",
            b["sha256"].as_str().unwrap()
        )),
        "{sums}"
    );
    // The backing image is copied byte for byte (nothing writes into it).
    let copy_sha = cmd_ok("sha256sum", &[dir.join(&backing_name).as_os_str()]);
    assert_eq!(
        copy_sha.split_whitespace().next(),
        base_sha.split_whitespace().next()
    );
    // The copy is self-contained: the top names its backing layer in the folder, by a
    // relative name (the copier rewrote cluster 0 on the way, issue 15).
    let top = dir.join(format!("{d}-vdb.qcow2"));
    let info: Value = serde_json::from_str(&cmd_ok(
        "qemu-img",
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            top.as_os_str(),
        ],
    ))
    .unwrap();
    assert_eq!(info["backing-filename"], backing_name.as_str());

    // What a restore does: put the chain back in a scratch folder and rebase the top onto
    // the copied backing image; the result reads the disk as of the snapshot, seed (backing
    // layer) and marker (top layer) included, with no reference to the original files.
    let scratch = tempfile::Builder::new()
        .prefix("vmb-chain")
        .tempdir_in("/var/tmp")
        .unwrap();
    let s_top = scratch.path().join("vdb.qcow2");
    let s_base = scratch.path().join("vdb-base.qcow2");
    fs::copy(&top, &s_top).unwrap();
    fs::copy(dir.join(&backing_name), &s_base).unwrap();
    cmd_ok(
        "qemu-img",
        &[
            "rebase".as_ref(),
            "-u".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            s_base.as_os_str(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            s_top.as_os_str(),
        ],
    );
    let chain_info = cmd_ok(
        "qemu-img",
        &[
            "info".as_ref(),
            "--backing-chain".as_ref(),
            "--output=json".as_ref(),
            s_top.as_os_str(),
        ],
    );
    let lab = lab_dir();
    assert!(
        !chain_info.contains(lab.to_str().unwrap()),
        "the restored chain still refers to the lab: {chain_info}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&chain_info)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let raw = scratch.path().join("vdb.raw");
    cmd_ok(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            s_top.as_os_str(),
            raw.as_os_str(),
        ],
    );
    cmd_ok("e2fsck", &["-fn".as_ref(), raw.as_os_str()]);
    let seed = text(&ext4_cat(&raw, "/seed.txt").expect("seed.txt (backing layer)"));
    assert!(seed.contains("(in the backing file)"), "{seed}");
    let top_marker = text(&ext4_cat(&raw, "/top-marker.txt").expect("top-marker.txt"));
    assert!(top_marker.contains(&marker), "{top_marker}");
    // Without its backing layer the top alone does not hold the seed: the chain matters.
    let alone = scratch.path().join("alone.raw");
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        s_top.display()
    );
    cmd_ok(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            spec.as_ref(),
            alone.as_os_str(),
        ],
    );
    assert!(
        ext4_cat(&alone, "/seed.txt").is_none_or(|s| !text(&s).contains("(in the backing file)")),
        "the top image alone should not hold the seed"
    );
}

/// Starts the domain again when dropped, if it is shut off (the lab expects it running).
struct StartOnDrop(String);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        if domstate(&self.0) == "shut off" {
            let _ = virsh(&["start", &self.0]);
        }
    }
}

#[test]
fn offline_copy_locks_the_images_so_the_domain_cannot_start_meanwhile() {
    if !lab_enabled("offline_copy_locks_the_images_so_the_domain_cannot_start_meanwhile") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = noagent_dom();
    let _restart = StartOnDrop(d.clone());
    if domstate(&d) != "shut off" {
        virsh_ok(&["destroy", &d]);
    }
    wait_state(&d, "shut off", Duration::from_secs(30));
    let image = lab_dir().join("noagent-vda.qcow2");
    let mut child = env
        .cmd(&["backup", &d, "--json", "--method", "offline"])
        .env("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_partial(&env, &d, &mut child);
    // The backup holds QEMU-style locks: starting the domain now fails on the image lock.
    let start = virsh(&["start", &d]);
    let err = text(&start.stderr);
    assert!(
        !start.status.success(),
        "the domain started during the offline copy"
    );
    assert!(
        err.contains("Failed to get \"write\" lock"),
        "unexpected start failure: {err}"
    );
    eprintln!(
        "MEASURE virsh start during the offline copy: {}",
        err.trim()
    );
    assert_eq!(domstate(&d), "shut off");
    let out = child.wait_with_output().unwrap();
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "offline");
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(log.contains("locked for the offline copy"), "{log}");
    // The copy is the image byte for byte (nothing could write into it).
    let sum = |p: &Path| {
        let o = Command::new("sha256sum").arg(p).output().unwrap();
        text(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(sum(&image), sum(&dir.join(format!("{d}-vda.qcow2"))));
    // Released: the domain starts now.
    virsh_ok(&["start", &d]);
    assert_eq!(domstate(&d), "running");
}

/// A domain put on an overlay named like ours by hand; committed back and deleted on drop.
struct HandOverlay {
    dom: String,
    overlay: PathBuf,
}

impl Drop for HandOverlay {
    fn drop(&mut self) {
        let _ = virsh(&[
            "blockcommit",
            &self.dom,
            "vda",
            "--active",
            "--pivot",
            "--wait",
        ]);
        let _ = fs::remove_file(&self.overlay);
    }
}

fn unjournaled_overlays_of(env: &Env, vm: &str) -> Vec<Value> {
    let out = env.cmd(&["orphans", "--json"]).output().unwrap();
    // 0: nothing found; 3: leftovers found (other prefixes' runs may show up too).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["vm"] == vm && o["kind"] == "unjournaled-overlay")
        .cloned()
        .collect()
}

#[test]
fn orphans_skips_the_overlays_of_a_vm_whose_lock_is_held() {
    if !lab_enabled("orphans_skips_the_overlays_of_a_vm_whose_lock_is_held") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = noagent_dom();
    let before = disk_sources(&d);
    let overlay = lab_dir().join(format!(
        "noagent-vda.qcow2.vmb-overlay-handmade-{}.qcow2",
        std::process::id()
    ));
    let spec = format!("vda,file={},snapshot=external", overlay.display());
    virsh_ok(&[
        "snapshot-create-as",
        &d,
        "--name",
        "handmade",
        "--disk-only",
        "--atomic",
        "--no-metadata",
        "--diskspec",
        &spec,
    ]);
    let guard = HandOverlay {
        dom: d.clone(),
        overlay: overlay.clone(),
    };
    // Without a run holding the lock, the overlay is reported (and not touched).
    let found = unjournaled_overlays_of(&env, &d);
    assert_eq!(found.len(), 1, "{found:?}");
    // While "a run" holds the VM's lock (flock on its lock file), it is its own: not reported.
    let lock_dir = env.journal.join("journal");
    fs::create_dir_all(&lock_dir).unwrap();
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_dir.join(format!("{d}.lock")))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    let found = unjournaled_overlays_of(&env, &d);
    assert!(
        found.is_empty(),
        "reported while its lock is held: {found:?}"
    );
    drop(held);
    assert_eq!(unjournaled_overlays_of(&env, &d).len(), 1);
    drop(guard);
    assert_on_original_images(&d, &before);
}

#[test]
fn multi_disks_are_copied_two_at_a_time_and_listed_in_plan_order() {
    if !lab_enabled("multi_disks_are_copied_two_at_a_time_and_listed_in_plan_order") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = multi_dom();
    wait_agent(&d, Duration::from_secs(60));
    let before = disk_sources(&d);
    let t = Instant::now();
    let (out, json) = env.backup(&d, &["--method", "quiesce", "--disk-parallel", "2"]);
    let secs = t.elapsed().as_secs_f64();
    let json = json.unwrap_or_else(|| panic!("no JSON: {}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "quiesce");
    eprintln!("MEASURE backup of {d} with --disk-parallel 2: {secs:.2} s");
    assert_on_original_images(&d, &before);
    assert!(env.partials(&d).is_empty());
    // The metadata lists the disks in the plan's order, whatever order they finished in.
    let targets: Vec<&str> = json["metadata"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["vda", "vdb", "vdc"]);
    // The run log: two at once, and a disk's copy began before another's ended.
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(
        log.contains("copying 3 disks, 2 at once"),
        "no concurrency line in the log:\n{log}"
    );
    let overlap = overlapping_copies(&log);
    assert!(overlap.is_some(), "no overlapping copies:\n{log}");
    eprintln!("RESULT copies overlapped: {overlap:?}");
    let events = copy_events(&log);
    for disk in ["vda", "vdb", "vdc"] {
        assert!(
            events.contains(&(disk.to_string(), true)),
            "{disk}: {events:?}"
        );
        assert!(
            events.contains(&(disk.to_string(), false)),
            "{disk}: {events:?}"
        );
    }
    // Every disk (and vdb's backing image) verifies against its manifest and checksum.
    let stamp = json["metadata"]["stamp"].as_str().unwrap();
    let v = env.cmd(&["verify", &d, stamp]).output().unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    sha256sum_c(&dir);
    qemu_img_check(&dir.join(format!("{d}-vdb.qcow2")));
    assert!(dir.join(format!("{d}-vdb.backing-1.qcow2")).is_file());
    // With 1, the disks go one after the other: no overlap.
    let (out, json) = env.backup(&d, &["--method", "quiesce", "--disk-parallel", "1"]);
    let json = json.unwrap_or_else(|| panic!("no JSON: {}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "quiesce");
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert_eq!(overlapping_copies(&log), None, "{log}");
    assert_on_original_images(&d, &before);
}

#[test]
fn max_rate_holds_the_copy_to_the_limit() {
    if !lab_enabled("max_rate_holds_the_copy_to_the_limit") {
        return;
    }
    let _g = serial();
    let env = Env::new();
    let d = agent_dom();
    wait_agent(&d, Duration::from_secs(60));
    let before = disk_sources(&d);
    const MIB: f64 = 1048576.0;
    let (out, json) = env.backup(&d, &["--method", "quiesce", "--max-rate", "1M"]);
    let json = json.unwrap_or_else(|| panic!("no JSON: {}", text(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let dir = check_outcome(&json, &d, "quiesce");
    assert_on_original_images(&d, &before);
    let log = fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(
        log.contains("bandwidth limit: 1.0 MiB/s"),
        "no bandwidth line in the log:\n{log}"
    );
    // The data the copy read (the allocated bytes of every image, backing images included)
    // could not have gone faster than 1 MiB/s, less the pacer's burst window (100 ms) and one
    // buffer per image. The lab guest is tiny (a few MiB), hence the low limit.
    let md = &json["metadata"];
    let allocated: u64 = md["disks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| {
            let chain = x["backing_chain"].as_array().cloned().unwrap_or_default();
            std::iter::once(x.clone()).chain(chain)
        })
        .map(|x| x["allocated_size"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        allocated > 2 << 20,
        "too little data to see the limit: {allocated}"
    );
    let copy_s = md["phases"]["copy"].as_f64().unwrap();
    let images: usize = md["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| 1 + x["backing_chain"].as_array().map_or(0, Vec::len))
        .sum();
    let floor = allocated as f64 / MIB - 0.1 - images as f64;
    eprintln!(
        "MEASURE --max-rate 1M: {:.1} MiB allocated copied in {copy_s:.2} s (floor {floor:.2} s)",
        allocated as f64 / MIB
    );
    assert!(
        copy_s >= floor * 0.9,
        "{:.1} MiB copied in {copy_s:.2} s: faster than 1 MiB/s",
        allocated as f64 / MIB
    );
}
