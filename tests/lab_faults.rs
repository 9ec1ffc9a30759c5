//! Fault injection on the libvirt lab (`lab/libvirt-lab.sh up PREFIX`, `VMB_LAB_LIBVIRT=1`;
//! skipped otherwise): a guest agent that hangs between the ping and the freeze, a thaw that
//! fails for longer than its bound, a commit that does not converge, `kill -9` during the
//! commit and before the publish, a copy corrupted before its post-checks then a prune, and
//! share faults at backup level (a FUSE share from `lab/share.sh faulty`: EIO during the copy
//! and at the publish, fsync failing, the share full, the share disappearing mid-copy).
//!
//! After each fault: the guest is thawed (`guest-fsfreeze-status`), the domain is on its
//! original images with no block job, nothing partial looks whole, earlier backups still
//! verify, and the exit code and the error say what happened. Only the `agent` domain is used.

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
/// What the engine's thaw bound is for [`AGENT_SECONDS`] (3 × agent timeout + 10 s).
const THAW_BOUND_SECONDS: u64 = 3 * AGENT_SECONDS + 10;

/// A private target + journal + config (+ inventory) for one test.
struct Env {
    _tmp: tempfile::TempDir,
    target: PathBuf,
    journal: PathBuf,
    config: PathBuf,
}

impl Env {
    fn new(commit_seconds: u64, pause_max: u64, keep_last: u32) -> Env {
        Env::with_target(commit_seconds, pause_max, keep_last, None)
    }

    /// [`Env::new`] with the target at `target` (a share mounted by the test) instead of a
    /// folder of the test's own.
    fn with_target(
        commit_seconds: u64,
        pause_max: u64,
        keep_last: u32,
        target: Option<PathBuf>,
    ) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("vmb-faults-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let target = target.unwrap_or_else(|| tmp.path().join("target"));
        let journal = tmp.path().join("journal");
        fs::create_dir_all(&target).unwrap();
        vm_backup::store::FolderStore::init(&target, None).unwrap();
        let inventory = tmp.path().join("vm-list.yaml");
        fs::write(
            &inventory,
            format!(
                "vms:\n  - name: {}\n    method: quiesce\n    retention: {{keep_last: {keep_last}}}\n",
                agent_dom()
            ),
        )
        .unwrap();
        let config = tmp.path().join("vm-backup.conf");
        fs::write(
            &config,
            format!(
                "target = {:?}\nhostname = {HOST:?}\njournal_dir = {:?}\ninventory = {:?}\n\
                 [timeouts]\nagent_seconds = {AGENT_SECONDS}\ncommit_seconds = {commit_seconds}\n\
                 commit_pause_max_seconds = {pause_max}\nshutdown_seconds = 60\n",
                target.to_str().unwrap(),
                journal.to_str().unwrap(),
                inventory.to_str().unwrap(),
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

    fn json(out: &Output) -> Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "no JSON (exit {:?}): {}{}",
                out.status.code(),
                text(&out.stdout),
                text(&out.stderr)
            )
        })
    }

    fn backup(&self, vm: &str, envs: &[(&str, &str)]) -> (Output, Value) {
        let mut c = self.cmd(&["backup", vm, "--json", "--method", "quiesce"]);
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let json = Self::json(&out);
        (out, json)
    }

    fn spawn_backup(&self, vm: &str, envs: &[(&str, &str)]) -> Child {
        let mut c = self.cmd(&["backup", vm, "--json", "--method", "quiesce"]);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.target.join(HOST).join(vm)
    }

    fn folders(&self, vm: &str) -> Vec<String> {
        list(&self.vm_dir(vm))
            .into_iter()
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn partials(&self, vm: &str) -> Vec<PathBuf> {
        list(&self.vm_dir(vm))
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect()
    }

    fn journal_file(&self, vm: &str) -> PathBuf {
        self.journal.join("journal").join(format!("{vm}.json"))
    }

    fn verify_ok(&self, vm: &str, stamp: &str) {
        let out = self.cmd(&["verify", vm, stamp]).output().unwrap();
        assert!(
            out.status.success(),
            "verify {vm} {stamp}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What every fault must leave: the guest thawed and writing, on its original images (live
/// and persistent), no block job, no overlay of ours.
fn assert_vm_intact(dom: &str, before: &[(String, String)]) {
    wait_agent(dom, Duration::from_secs(60));
    assert_eq!(
        fsfreeze_status(dom).as_deref(),
        Some("thawed"),
        "{dom} is not thawed"
    );
    assert_eq!(
        &disk_sources(dom),
        before,
        "{dom} is not on its original images"
    );
    // The persistent definition too: a pivot libvirt finished while it restarted may leave it
    // naming the removed overlay (the domain would not start again).
    let persistent: Vec<(String, String)> = domblklist(dom, true)
        .into_iter()
        .filter(|d| d.device == "disk")
        .map(|d| (d.target, d.source))
        .collect();
    assert_eq!(
        &persistent, before,
        "the persistent definition of {dom} is not on its original images"
    );
    let job = virsh(&["blockjob", dom, "vda", "--info"]);
    let job_text = text(&job.stdout) + &text(&job.stderr);
    assert!(
        !job_text.contains("Commit") && !job_text.contains("commit"),
        "a block job remains: {job_text}"
    );
    let overlays: Vec<PathBuf> = list(&lab_dir())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".vmb-overlay-"))
        .collect();
    assert!(overlays.is_empty(), "overlays left: {overlays:?}");
    let s0 = seq_check(dom);
    assert_eq!(s0.gaps, 0, "the writer lost lines: {s0:?}");
    sleep(Duration::from_secs(2));
    let s1 = seq_check(dom);
    assert!(s1.last > s0.last, "the writer is stuck: {s0:?} then {s1:?}");
}

/// Waits until `path` exists, or panics after `bound` (or when the child ends first).
fn wait_for_file(path: &Path, bound: Duration, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("backup ended ({status}) before {} appeared", path.display());
        }
        assert!(t.elapsed() < bound, "{} did not appear", path.display());
        sleep(Duration::from_millis(50));
    }
}

/// Once the backup's `.partial` folder exists (the snapshot is taken), writes 16 MiB in the
/// guest: they land in the overlay, for the commit to carry back.
fn dirty_overlay(env: &Env, d: &str, child: &mut Child) {
    let t = Instant::now();
    while env.partials(d).is_empty() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("backup ended ({status}) before its partial folder appeared");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no partial folder");
        sleep(Duration::from_millis(50));
    }
    gexec_ok(
        d,
        "dd if=/dev/zero of=/mnt/data/dirty.bin bs=1M count=16 conv=fsync 2>/dev/null; rm -f /mnt/data/dirty.bin; sync",
    );
}

fn finish(child: Child) -> (Output, Value) {
    let out = child.wait_with_output().unwrap();
    let json = Env::json(&out);
    (out, json)
}

/// Starts a backup whose commit is throttled to `bandwidth` bytes/s, after a pause of
/// `pause_ms` before the copy in which the guest dirties its overlay ([`dirty_overlay`]);
/// returns it once its commit job runs (bound 120 s).
fn backup_in_a_throttled_commit(env: &Env, d: &str, bandwidth: &str, pause_ms: &str) -> Child {
    let mut child = env.spawn_backup(
        d,
        &[
            ("VMB_DEBUG_COMMIT_BANDWIDTH_BYTES", bandwidth),
            ("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", pause_ms),
        ],
    );
    dirty_overlay(env, d, &mut child);
    let t = Instant::now();
    loop {
        let out = virsh(&["blockjob", d, "vda", "--info"]);
        if (text(&out.stdout) + &text(&out.stderr))
            .to_lowercase()
            .contains("commit")
        {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "backup ended ({status}) before its commit: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no commit job");
        sleep(Duration::from_millis(100));
    }
}

/// A backup that must succeed (exit 0); returns its stamp.
fn good_backup(env: &Env, d: &str) -> String {
    let (out, json) = env.backup(d, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    json["metadata"]["stamp"].as_str().unwrap().to_string()
}

/// The lab's agent domain once its agent answers, and the images it runs on.
fn ready_agent() -> (String, Vec<(String, String)>) {
    let d = agent_dom();
    wait_agent(&d, Duration::from_secs(60));
    let before = disk_sources(&d);
    (d, before)
}

/// After a fault was repaired: the next backup succeeds, leaves no `.partial` folder, and the
/// guest is intact.
fn next_backup_is_clean(env: &Env, d: &str, before: &[(String, String)]) {
    good_backup(env, d);
    assert!(env.partials(d).is_empty(), "{:?}", env.partials(d));
    assert_vm_intact(d, before);
}

/// Starts a backup that pauses `pause_ms` once its `.partial` folder is complete (before its
/// post-checks) and returns it with that folder, once its metadata is written (bound 120 s).
fn backup_paused_before_postcheck(env: &Env, d: &str, pause_ms: &str) -> (Child, PathBuf) {
    let mut child = env.spawn_backup(d, &[("VMB_DEBUG_PAUSE_BEFORE_POSTCHECK_MS", pause_ms)]);
    let t = Instant::now();
    let partial = loop {
        if let Some(p) = env.partials(d).into_iter().next() {
            break p;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("backup ended ({status}) before its partial folder appeared");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no partial folder");
        sleep(Duration::from_millis(50));
    };
    wait_for_file(
        &partial.join("backup-metadata.json"),
        Duration::from_secs(120),
        &mut child,
    );
    (child, partial)
}

#[test]
fn agent_hangs_between_ping_and_freeze_then_wakes_up_the_thaw_is_confirmed() {
    if !lab_enabled("agent_hangs_between_ping_and_freeze_then_wakes_up_the_thaw_is_confirmed") {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    let freezes = |log: &[String]| log.iter().filter(|l| l.starts_with("freeze")).count();
    let freezes_before = freezes(&freeze_log(&d));
    // The engine pings, then pauses 4 s; meanwhile qemu-ga stops for 10 s (longer than the
    // agent timeout, shorter than the thaw bound): libvirt's freeze times out, and the agent
    // runs the queued freeze when it wakes up.
    let child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_AFTER_PING_MS", "4000")]);
    sleep(Duration::from_millis(1500));
    agent_hang(&d, Duration::from_secs(10));
    let t = Instant::now();
    let (out, json) = finish(child);
    eprintln!(
        "MEASURE agent hang after ping: ended {:.1} s after the hang",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let err = json["error"].as_str().unwrap();
    assert!(err.contains("snapshot"), "{err}");
    assert!(!err.contains("may still be frozen"), "{err}");
    assert!(!env.journal_file(&d).exists(), "the journal remains");
    assert!(env.partials(&d).is_empty() && env.folders(&d).is_empty());
    assert_vm_intact(&d, &before);
    // The freeze did run late (libvirt had reported it timed out), and was thawed after it.
    let log = freeze_log(&d);
    assert_eq!(freezes(&log), freezes_before + 1, "{log:?}");
    assert_eq!(
        log.last().map(|l| l.starts_with("thaw")),
        Some(true),
        "{log:?}"
    );
}

#[test]
fn a_thaw_that_fails_past_its_bound_is_exit_2_and_orphans_thaws_later() {
    if !lab_enabled("a_thaw_that_fails_past_its_bound_is_exit_2_and_orphans_thaws_later") {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    let hang = THAW_BOUND_SECONDS + 12;
    let child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_AFTER_PING_MS", "4000")]);
    sleep(Duration::from_millis(1500));
    agent_hang(&d, Duration::from_secs(hang));
    let hung_at = Instant::now();
    let (out, json) = finish(child);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let err = json["error"].as_str().unwrap();
    assert!(
        err.contains("may still be frozen") && err.contains("orphans"),
        "{err}"
    );
    // The journal keeps the possibly frozen guest.
    let rec: Value = serde_json::from_slice(&fs::read(env.journal_file(&d)).unwrap()).unwrap();
    assert_eq!(rec["may_be_frozen"], true, "{rec:#}");
    // The agent wakes up and runs the queued freeze: the guest IS frozen now.
    while hung_at.elapsed() < Duration::from_secs(hang + 2) {
        sleep(Duration::from_millis(500));
    }
    wait_agent(&d, Duration::from_secs(60));
    eprintln!("MEASURE after the agent woke up: {:?}", fsfreeze_status(&d));
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "orphans: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("thaw confirmed"),
        "{}",
        text(&out.stdout)
    );
    assert!(!env.journal_file(&d).exists(), "the journal remains");
    assert_vm_intact(&d, &before);
}

#[test]
fn a_commit_that_does_not_converge_pauses_the_guest_and_pivots() {
    if !lab_enabled("a_commit_that_does_not_converge_pauses_the_guest_and_pivots") {
        return;
    }
    let _g = serial();
    let env = Env::new(3, 10, 3);
    let (d, before) = ready_agent();
    // A commit throttled to 1 KiB/s never converges in 3 s: 16 MiB written into the overlay
    // during the copy (QEMU's first burst copies one 1 MiB buffer at most).
    let mut child = env.spawn_backup(
        &d,
        &[
            ("VMB_DEBUG_COMMIT_BANDWIDTH_BYTES", "1024"),
            ("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "8000"),
        ],
    );
    dirty_overlay(&env, &d, &mut child);
    let (out, json) = finish(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let paused = json["metadata"]["phases"]["commit-pause"]
        .as_f64()
        .unwrap_or_else(|| panic!("no commit-pause in the phases: {json:#}"));
    eprintln!("MEASURE commit pause: {:.0} ms", paused * 1000.0);
    assert!(paused > 0.0 && paused <= 10.0, "{paused}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pausing the guest"), "{stderr}");
    assert_eq!(domstate(&d), "running");
    assert_vm_intact(&d, &before);
    let stamp = json["metadata"]["stamp"].as_str().unwrap();
    env.verify_ok(&d, stamp);
}

#[test]
fn kill9_during_the_commit_then_orphans_converges_and_pivots() {
    if !lab_enabled("kill9_during_the_commit_then_orphans_converges_and_pivots") {
        return;
    }
    let _g = serial();
    let env = Env::new(600, 10, 3);
    let (d, before) = ready_agent();
    // Wait for the throttled commit job, then kill -9.
    let mut child = backup_in_a_throttled_commit(&env, &d, "1024", "8000");
    child.kill().unwrap();
    let _ = child.wait();
    assert!(env.journal_file(&d).exists());
    assert!(env.folders(&d).iter().all(|f| f.ends_with(".partial")));
    let journaled = fs::read_to_string(env.journal_file(&d)).unwrap();
    // The repair finds the job still running (throttled): it reuses it; when the converge
    // bound (shortened here) runs out, the guest is paused, the throttle lifted, the disk
    // pivoted.
    let config = fs::read_to_string(&env.config).unwrap();
    fs::write(
        &env.config,
        config.replace("commit_seconds = 600", "commit_seconds = 3"),
    )
    .unwrap();
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "orphans: {report}{}",
        text(&out.stderr)
    );
    assert!(
        report.contains("committed and pivoted"),
        "{report}\njournal was: {journaled}\n{}",
        text(&out.stderr)
    );
    // Usually the throttled job needs the pause; the one-line timing is kept for the record.
    eprintln!(
        "MEASURE repair of a killed commit: guest paused: {}",
        report.contains("paused")
    );
    assert!(
        env.partials(&d).is_empty(),
        "orphans left the partial folder"
    );
    assert!(!env.journal_file(&d).exists());
    assert_vm_intact(&d, &before);
    // The next backup succeeds.
    next_backup_is_clean(&env, &d, &before);
}

/// What a libvirtd restarted during the commit was once seen to leave (docs/faults.md): the
/// pivot done, the domain running on its base, but its persistent definition still naming the
/// overlay, so the VM would not start after its next shutdown. The state is built by hand
/// here (kill -9 in the commit, pivot with virsh, the inactive XML pointed at the overlay);
/// `orphans --cleanup` must point the definition back before it deletes the overlay.
#[test]
fn a_persistent_definition_left_on_the_overlay_after_the_pivot_is_pointed_back_by_orphans() {
    if !lab_enabled(
        "a_persistent_definition_left_on_the_overlay_after_the_pivot_is_pointed_back_by_orphans",
    ) {
        return;
    }
    let _g = serial();
    let env = Env::new(600, 10, 3);
    let (d, before) = ready_agent();
    let mut child = backup_in_a_throttled_commit(&env, &d, "1024", "8000");
    child.kill().unwrap();
    let _ = child.wait();
    assert!(env.journal_file(&d).exists());
    let base = before
        .iter()
        .find(|(t, _)| t == "vda")
        .map(|(_, s)| s.clone())
        .expect("no vda");
    let overlay = disk_sources(&d)
        .into_iter()
        .find(|(t, _)| t == "vda")
        .map(|(_, s)| s)
        .expect("no vda");
    assert_ne!(overlay, base, "the killed backup left vda on its base");
    // Finish the commit by hand: lift the throttle, pivot once ready (bound 120 s).
    virsh_ok(&["blockjob", &d, "vda", "--bandwidth", "0"]);
    let t = Instant::now();
    while !virsh(&["blockjob", &d, "vda", "--pivot"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the commit never got ready"
        );
        sleep(Duration::from_millis(200));
    }
    assert_eq!(disk_sources(&d), before, "not on the base after the pivot");
    let inactive = virsh_ok(&["dumpxml", "--inactive", "--security-info", &d]);
    let broken = inactive.replace(&format!("file='{base}'"), &format!("file='{overlay}'"));
    assert_ne!(broken, inactive, "the base is not in the inactive XML");
    let xml_file = env.journal.join("broken-definition.xml");
    fs::write(&xml_file, broken).unwrap();
    virsh_ok(&["define", &xml_file.to_string_lossy()]);
    assert!(
        domblklist(&d, true)
            .iter()
            .any(|b| b.target == "vda" && b.source == overlay),
        "the persistent definition does not name the overlay"
    );
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "orphans: {report}{}",
        text(&out.stderr)
    );
    assert!(
        report.contains("persistent definition named the overlay"),
        "{report}\n{}",
        text(&out.stderr)
    );
    assert!(!env.journal_file(&d).exists());
    assert!(!Path::new(&overlay).exists(), "the overlay was not deleted");
    assert_vm_intact(&d, &before);
    next_backup_is_clean(&env, &d, &before);
}

#[test]
fn a_copy_corrupted_before_its_post_checks_is_never_published_and_prune_keeps_the_good_one() {
    if !lab_enabled(
        "a_copy_corrupted_before_its_post_checks_is_never_published_and_prune_keeps_the_good_one",
    ) {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 1);
    let (d, before) = ready_agent();
    let good = good_backup(&env, &d);
    // The second backup pauses once its `.partial` folder is complete: flip one byte of its
    // disk image there (what a faulty share would return on the re-read).
    let (child, partial) = backup_paused_before_postcheck(&env, &d, "4000");
    let image = list(&partial)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".qcow2"))
        .expect("no image in the partial folder");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 70_000).unwrap();
        b[0] ^= 0xff;
        f.write_all_at(&b, 70_000).unwrap();
        f.sync_all().unwrap();
    }
    let (out, json) = finish(child);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let err = json["error"].as_str().unwrap();
    assert!(
        err.contains("post-checks") && err.contains("not published") && err.contains("differ"),
        "{err}"
    );
    assert_eq!(
        env.folders(&d),
        vec![good.clone()],
        "something else was kept"
    );
    assert!(!env.journal_file(&d).exists());
    assert_vm_intact(&d, &before);
    // Prune (keep_last 1) keeps the good backup: the failed copy was never counted.
    let out = env.cmd(&["prune", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "prune: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(env.folders(&d), vec![good.clone()]);
    env.verify_ok(&d, &good);
}

#[test]
fn kill9_before_the_publish_leaves_nothing_that_looks_whole() {
    if !lab_enabled("kill9_before_the_publish_leaves_nothing_that_looks_whole") {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    let good = good_backup(&env, &d);
    let (mut child, partial) = backup_paused_before_postcheck(&env, &d, "10000");
    child.kill().unwrap();
    let _ = child.wait();
    // Only the good backup looks whole; the killed one is a `.partial` folder.
    assert_eq!(
        env.folders(&d)
            .into_iter()
            .filter(|f| !f.ends_with(".partial"))
            .collect::<Vec<_>>(),
        vec![good.clone()]
    );
    let list_out = env.cmd(&["list", "--json"]).output().unwrap();
    let listed = text(&list_out.stdout);
    assert!(
        !listed.contains(
            &partial
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace(".partial", "")
        ),
        "{listed}"
    );
    // The next backup repairs, removes the partial folder and succeeds.
    next_backup_is_clean(&env, &d, &before);
    env.verify_ok(&d, &good);
}

/// The ids of the libvirtd clients opened by process `pid` (`virt-admin client-info`).
fn libvirtd_clients_of(pid: u32) -> Vec<String> {
    let out = Command::new("virt-admin")
        .args(["srv-clients-list", "libvirtd"])
        .output()
        .unwrap();
    let mut ids = Vec::new();
    for line in text(&out.stdout).lines().skip(2) {
        let Some(id) = line.split_whitespace().next() else {
            continue;
        };
        let info = Command::new("virt-admin")
            .args(["client-info", "libvirtd", id])
            .output()
            .unwrap();
        let ours = text(&info.stdout).lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k.trim() == "unix_process_id" && v.trim() == pid.to_string())
        });
        if ours {
            ids.push(id.to_string());
        }
    }
    ids
}

#[test]
fn the_libvirt_connection_drops_between_snapshot_and_commit_then_reconnects_and_commits() {
    if !lab_enabled(
        "the_libvirt_connection_drops_between_snapshot_and_commit_then_reconnects_and_commits",
    ) {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    let mut child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "6000")]);
    let t = Instant::now();
    while env.partials(&d).is_empty() {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "backup ended before its partial folder appeared: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no partial folder");
        sleep(Duration::from_millis(50));
    }
    // What libvirtd restarting does to the engine: its connection is closed by the server
    // (only ours: the daemons are shared by the lab's users).
    let ids = libvirtd_clients_of(child.id());
    assert!(!ids.is_empty(), "no libvirtd client of the backup found");
    for id in &ids {
        let out = Command::new("virt-admin")
            .args(["client-disconnect", "libvirtd", id])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    if let Ok(Some(status)) = child.try_wait() {
        panic!("backup ended ({status}) during its pause");
    }
    let (out, json) = finish(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("reconnect"), "{stderr}");
    assert_vm_intact(&d, &before);
    let stamp = json["metadata"]["stamp"].as_str().unwrap();
    env.verify_ok(&d, stamp);
}

/// A fault of the share, switched on while the backup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShareFault {
    /// Writes fail with EIO once 1 MiB of the copy is written.
    CopyEio,
    /// The rename of `<stamp>.partial` to `<stamp>` fails with EIO.
    PublishEio,
    /// Every fsync fails with EIO.
    FsyncFails,
    /// The share is full (ENOSPC) once 1 MiB of the copy is written.
    Full,
    /// The share disappears (unmounted, FUSE server killed) while a disk is being copied.
    Vanishes,
    /// Once 1 MiB of the copy is written, the share acknowledges writes but stores other bytes
    /// (silent data loss): the copy's read-back must catch it.
    StoresOtherBytes,
}

/// The size of the biggest temporary file (a disk being copied) below `dir`.
fn biggest_temp_file(dir: &Path) -> u64 {
    let mut best = 0;
    for p in list(dir) {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            best = best.max(biggest_temp_file(&p));
        } else if p.to_string_lossy().contains(".vmb-tmp-") {
            best = best.max(meta.len());
        }
    }
    best
}

#[test]
fn share_faults_during_a_backup_fail_it_cleanly_and_keep_the_earlier_backup() {
    if !lab_enabled("share_faults_during_a_backup_fail_it_cleanly_and_keep_the_earlier_backup") {
        return;
    }
    let _g = serial();
    let tmp = tempfile::Builder::new()
        .prefix("vmb-faults-share")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mnt = tmp.path().join("share");
    let share = Share::faulty(&mnt, &[]);
    let env = Env::with_target(120, 5, 10, Some(mnt.clone()));
    let mnt_text = mnt.to_string_lossy().into_owned();
    let (d, before) = ready_agent();
    let good = good_backup(&env, &d);
    let backing = share.backing();
    assert!(backing.is_dir(), "{}", backing.display());
    for fault in [
        ShareFault::CopyEio,
        ShareFault::PublishEio,
        ShareFault::FsyncFails,
        ShareFault::Full,
        ShareFault::Vanishes,
        ShareFault::StoresOtherBytes,
    ] {
        eprintln!("--- share fault {fault:?}");
        let mut child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "4000")]);
        let t = Instant::now();
        while env.partials(&d).is_empty() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{fault:?}: backup ended ({status}) before its partial folder appeared");
            }
            assert!(t.elapsed() < Duration::from_secs(120), "no partial folder");
            sleep(Duration::from_millis(50));
        }
        match fault {
            ShareFault::CopyEio => share.set_fault(&["--fail-after", "1048576", "--errno", "EIO"]),
            ShareFault::PublishEio => share.set_fault(&["--fail-op", r"rename=\.partial$"]),
            ShareFault::FsyncFails => share.set_fault(&["--fail-fsync"]),
            ShareFault::Full => share.set_fault(&["--fail-after", "1048576", "--errno", "ENOSPC"]),
            ShareFault::StoresOtherBytes => share.set_fault(&["--corrupt-after", "1048576"]),
            ShareFault::Vanishes => {
                // A slow share, so that the copy is caught under way.
                share.set_fault(&["--write-delay-ms", "30"]);
                let t = Instant::now();
                while biggest_temp_file(&backing) < 512 * 1024 {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("backup ended ({status}) before its copy was under way");
                    }
                    assert!(t.elapsed() < Duration::from_secs(120), "no copy under way");
                    sleep(Duration::from_millis(20));
                }
                share.vanish();
            }
        }
        let (out, json) = finish(child);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{fault:?}: {json:#}\n{stderr}");
        let err = json["error"].as_str().unwrap_or_default();
        eprintln!("RESULT {fault:?}: exit 2: {err}");
        assert!(
            err.contains(&mnt_text),
            "{fault:?}: the error does not name the target: {err}"
        );
        if fault == ShareFault::StoresOtherBytes {
            // Caught while the disk was copied, by reading it back from the share.
            assert!(err.contains("read-back"), "{fault:?}: {err}");
        }
        if fault == ShareFault::Vanishes {
            // Nothing went to the empty mount point on the local disk.
            assert!(
                list(&mnt).is_empty(),
                "written into the bare mount point: {:?}",
                list(&mnt)
            );
            share.remount();
        } else {
            share.set_fault(&["--off"]);
        }
        assert_vm_intact(&d, &before);
        let whole: Vec<String> = env
            .folders(&d)
            .into_iter()
            .filter(|f| !f.ends_with(".partial") && !f.starts_with('.'))
            .collect();
        assert_eq!(whole, vec![good.clone()], "{fault:?}");
        env.verify_ok(&d, &good);
    }
    // Healed, the same share takes the next backup; what the faults left is repaired.
    good_backup(&env, &d);
    assert!(env.partials(&d).is_empty(), "{:?}", env.partials(&d));
    env.verify_ok(&d, &good);
    drop(env);
    drop(share);
}

#[test]
fn kill9_during_the_snapshot_call_then_orphans_thaws_and_restores_the_images() {
    if !lab_enabled("kill9_during_the_snapshot_call_then_orphans_thaws_and_restores_the_images") {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    // The engine pings, then pauses 3 s; qemu-ga stops for 8 s meanwhile, so the snapshot
    // call (its quiescing freeze) is in flight when the backup is killed.
    let mut child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_AFTER_PING_MS", "3000")]);
    sleep(Duration::from_millis(1000));
    agent_hang(&d, Duration::from_secs(8));
    sleep(Duration::from_millis(3500));
    if let Ok(Some(status)) = child.try_wait() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "backup ended ({status}) before its snapshot call: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        env.journal_file(&d).exists(),
        "no journal records the snapshot in flight"
    );
    // The agent wakes up and runs the freeze libvirt queued: the guest may end frozen, and the
    // snapshot may have been taken after all. The answer to the ping comes after the freeze.
    wait_agent(&d, Duration::from_secs(60));
    let status = fsfreeze_status(&d);
    eprintln!(
        "RESULT kill -9 during the snapshot call: guest {status:?}, disks {:?}",
        disk_sources(&d)
    );
    let out = env
        .cmd(&["orphans", "--cleanup", "--json"])
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "orphans: {report}{}",
        text(&out.stderr)
    );
    assert!(!env.journal_file(&d).exists(), "the journal remains");
    assert!(
        env.folders(&d).is_empty(),
        "left on the target: {:?}",
        env.folders(&d)
    );
    assert_vm_intact(&d, &before);
    let stamp = good_backup(&env, &d);
    assert_vm_intact(&d, &before);
    env.verify_ok(&d, &stamp);
}

/// Kills the shared libvirtd with SIGKILL and starts it again (`lab/libvirt-lab.sh daemons`),
/// under `flock /tmp/vmb-libvirtd-restart.lock` (the daemons are shared: one restart at a
/// time, kept short; `-o`: the restarted daemon must not inherit the lock's descriptor, or it
/// would hold the lock for as long as it runs). Returns how long libvirtd was away. Panics
/// unless it answers again.
fn restart_libvirtd() -> Duration {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/libvirt-lab.sh");
    let t = Instant::now();
    let out = Command::new("flock")
        .args([
            "-o",
            "-w",
            "120",
            "/tmp/vmb-libvirtd-restart.lock",
            "sh",
            "-c",
        ])
        .arg(
            "pid=$(cat /var/lib/vm-backup-lab/daemons/libvirtd.pid) && kill -9 \"$pid\" && \
             for i in $(seq 1 100); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.05; done; \
             \"$0\" daemons",
        )
        .arg(&lab)
        .output()
        .unwrap();
    let away = t.elapsed();
    assert!(
        out.status.success(),
        "libvirtd restart failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let version = virsh(&["version"]);
    assert!(version.status.success(), "libvirtd is not back");
    away
}

#[test]
fn libvirtd_killed_and_restarted_between_snapshot_and_commit_the_job_reconnects_and_finishes() {
    if !lab_enabled(
        "libvirtd_killed_and_restarted_between_snapshot_and_commit_the_job_reconnects_and_finishes",
    ) {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let (d, before) = ready_agent();
    let mut child = env.spawn_backup(&d, &[("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "5000")]);
    dirty_overlay(&env, &d, &mut child);
    let away = restart_libvirtd();
    eprintln!(
        "MEASURE libvirtd kill -9 + restart: {:.1} s",
        away.as_secs_f64()
    );
    let (out, json) = finish(child);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{stderr}");
    assert!(stderr.contains("reconnect"), "{stderr}");
    assert!(!env.journal_file(&d).exists(), "the journal remains");
    assert_vm_intact(&d, &before);
    env.verify_ok(&d, json["metadata"]["stamp"].as_str().unwrap());
}

#[test]
fn libvirtd_killed_and_restarted_during_the_commit_the_job_reconnects_and_pivots() {
    if !lab_enabled("libvirtd_killed_and_restarted_during_the_commit_the_job_reconnects_and_pivots")
    {
        return;
    }
    let _g = serial();
    // A converge bound long enough to outlast the restart; the throttled commit then needs
    // the bounded pause to converge.
    let env = Env::new(25, 10, 3);
    let (d, before) = ready_agent();
    // A pause before the copy long enough for the guest's 16 MiB to land in the overlay first
    // (slow TCG).
    let child = backup_in_a_throttled_commit(&env, &d, "4096", "15000");
    let away = restart_libvirtd();
    eprintln!(
        "MEASURE libvirtd kill -9 + restart during the commit: {:.1} s",
        away.as_secs_f64()
    );
    let (out, json) = finish(child);
    let stderr = text(&out.stderr);
    eprintln!(
        "RESULT restart during the commit: exit {:?}",
        out.status.code()
    );
    if out.status.code() == Some(0) {
        assert!(stderr.contains("reconnect"), "{stderr}");
    } else {
        // Not finished within its bounds: exit 2, and the next run's repair converges.
        assert_eq!(out.status.code(), Some(2), "{json:#}\n{stderr}");
        let out = env
            .cmd(&["orphans", "--cleanup", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "orphans: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    assert!(!env.journal_file(&d).exists(), "the journal remains");
    assert_vm_intact(&d, &before);
}

/// Every file and folder below `dir` with its mode (`lstat`).
fn modes_below(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    use std::os::unix::fs::MetadataExt;
    for p in list(dir) {
        let meta = fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), meta.mode() & 0o7777, meta.is_dir()));
        if meta.is_dir() {
            modes_below(&p, out);
        }
    }
}

#[test]
fn a_backup_started_under_umask_022_writes_private_files() {
    if !lab_enabled("a_backup_started_under_umask_022_writes_private_files") {
        return;
    }
    let _g = serial();
    let env = Env::new(120, 5, 3);
    let d = agent_dom();
    wait_agent(&d, Duration::from_secs(60));
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 022 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vm-backup"))
        .args(["backup", &d, "--json", "--method", "quiesce", "--config"])
        .arg(&env.config)
        .env("LIBVIRT_DEFAULT_URI", "qemu:///system");
    let out = c.output().unwrap();
    let json = Env::json(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let mut seen = Vec::new();
    modes_below(&env.target.join(HOST), &mut seen);
    modes_below(&env.journal, &mut seen);
    assert!(seen.len() > 5, "{seen:?}");
    let open: Vec<String> = seen
        .iter()
        .filter(|(_, mode, dir)| mode & 0o077 != 0 && !(*dir && *mode == 0o711))
        .map(|(p, mode, _)| format!("{} {mode:o}", p.display()))
        .collect();
    eprintln!("RESULT umask 022: {} files and folders checked", seen.len());
    assert!(open.is_empty(), "readable by others: {open:#?}");
}

/// Bytes allocated on the host by the lab images of the `multi` domain (what a backup copies).
fn multi_allocated() -> u64 {
    use std::os::unix::fs::MetadataExt;
    [
        "multi-vda.qcow2",
        "multi-vdb.qcow2",
        "multi-vdb-base.qcow2",
        "multi-vdc.raw",
    ]
    .iter()
    .map(|f| {
        fs::metadata(lab_dir().join(f))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    })
    .sum()
}

#[test]
fn the_share_fills_while_two_disks_copy_the_backup_fails_cleanly() {
    if !lab_enabled("the_share_fills_while_two_disks_copy_the_backup_fails_cleanly") {
        return;
    }
    let _g = serial();
    let d = multi_dom();
    wait_agent(&d, Duration::from_secs(60));
    let before = disk_sources(&d);
    // A real filesystem with room for two backups (the pre-check wants the allocated size
    // and a margin free): the first backup fits; while the second one's disks are copied
    // two at a time, something else fills the share.
    let one = multi_allocated();
    let size = format!("{}M", 2 * one / (1 << 20) + 160);
    let tmp = tempfile::Builder::new()
        .prefix("vmb-faults-full")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mnt = tmp.path().join("share");
    let share = Share::full(&mnt, &size, false);
    let env = Env::with_target(120, 5, 10, Some(mnt.clone()));
    let args = [
        "backup",
        &d,
        "--json",
        "--method",
        "quiesce",
        "--disk-parallel",
        "2",
    ];
    let out = env.cmd(&args).output().unwrap();
    let json = Env::json(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let good = json["metadata"]["stamp"].as_str().unwrap().to_string();
    let mut child = env
        .cmd(&args)
        .env("VMB_DEBUG_PAUSE_BEFORE_COPY_MS", "3000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while env.partials(&d).is_empty() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("backup ended ({status}) before its partial folder appeared");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no partial folder");
        sleep(Duration::from_millis(50));
    }
    // Leave a quarter of a backup free (at most 48 MiB): less than the disks need.
    let avail = cmd_stdout("df", &["--output=avail", "-B1", &mnt.to_string_lossy()]);
    let avail: u64 = avail.lines().nth(1).unwrap().trim().parse().unwrap();
    let filler = mnt.join("filler.bin");
    let fill = avail.saturating_sub((one / 4).min(48 << 20)).to_string();
    cmd_stdout("fallocate", &["-l", &fill, &filler.to_string_lossy()]);
    let (out, json) = finish(child);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{json:#}\n{}",
        text(&out.stderr)
    );
    let err = json["error"].as_str().unwrap_or_default();
    eprintln!(
        "RESULT share filled during the copy ({size} share, {one} bytes a backup): exit 2: {err}"
    );
    assert_eq!(json["failed_phase"], "copy", "{json:#}");
    assert!(
        err.to_lowercase().contains("no space"),
        "not the full-share error: {err}"
    );
    assert!(
        !err.to_lowercase().contains("cancel"),
        "the cancellation of the other disk was reported instead of the real error: {err}"
    );
    assert!(env.partials(&d).is_empty(), "{:?}", env.partials(&d));
    assert_vm_intact(&d, &before);
    let whole: Vec<String> = env
        .folders(&d)
        .into_iter()
        .filter(|f| !f.ends_with(".partial") && !f.starts_with('.'))
        .collect();
    assert_eq!(whole, vec![good.clone()]);
    env.verify_ok(&d, &good);
    fs::remove_file(&filler).unwrap();
    drop(env);
    drop(share);
}

/// Runs a program, panics unless it succeeds; returns its stdout.
fn cmd_stdout(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}
