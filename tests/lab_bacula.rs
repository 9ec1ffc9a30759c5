//! Lab tests against real Bacula daemons (Director, Storage Daemon, File Daemon with the
//! vm-backup plugin) driven by bconsole, and real libvirt guests.
//!
//! They skip unless `VMB_LAB_BACULA=1`; the tests that back up VMs also need
//! `VMB_LAB_LIBVIRT=1` and the libvirt lab's `bac` domains:
//!
//! ```sh
//! lab/libvirt-lab.sh up bac --only agent,noagent --data-size 1G --fill 600M
//! VMB_LAB_BACULA=1 VMB_LAB_LIBVIRT=1 cargo test --test lab_bacula -- --test-threads=1
//! ```
//! Each test brings the Bacula lab up if needed (`lab/bacula-lab.sh ensure`, which also installs
//! the plugin just built). The tests share one Director and run one at a time.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const LAB: &str = "/var/lib/vm-backup-lab/bacula";
/// The host name the stream-mode test configures.
const STREAM_HOST: &str = "vmb-stream-host";
/// The bandwidth limit of [`Lab::slow_job`] (the plugin's `max_rate=`), and its value in MiB/s.
const SLOW_RATE: &str = "60M";
const SLOW_MIB_S: f64 = 60.0;
/// The job [`Lab::slow_job`] defines.
const SLOW_JOB: &str = "vm-slow";
static AGENT: Domain = Domain("agent", OnceLock::new());
static NOAGENT: Domain = Domain("noagent", OnceLock::new());

/// The libvirt lab prefix of the Bacula lab's domains: `VMB_LAB_PREFIX`, default `bac`
/// (`lab/bacula-lab.sh` generates its jobs for the same prefix).
fn prefix() -> String {
    std::env::var("VMB_LAB_PREFIX").unwrap_or_else(|_| "bac".to_string())
}

/// A lab domain's name, `<prefix>-<kind>`, resolved once.
struct Domain(&'static str, OnceLock<String>);

impl std::ops::Deref for Domain {
    type Target = str;
    fn deref(&self) -> &str {
        self.1.get_or_init(|| format!("{}-{}", prefix(), self.0))
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/bacula-lab.sh")
}

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vm-backup"))
        .parent()
        .expect("binary folder")
        .to_path_buf()
}

/// The lab, brought up once per test process; holding the guard serialises the tests.
struct Lab {
    _guard: MutexGuard<'static, ()>,
}

fn lab(test: &str, needs_vms: bool) -> Option<Lab> {
    if std::env::var("VMB_LAB_BACULA").as_deref() != Ok("1") {
        eprintln!(
            "SKIP: {test}: Bacula lab not enabled (set VMB_LAB_BACULA=1; see tests/lab_bacula.rs)"
        );
        return None;
    }
    if needs_vms && !support::lab_enabled(test) {
        return None;
    }
    static LOCK: Mutex<()> = Mutex::new(());
    static UP: OnceLock<()> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    UP.get_or_init(|| {
        let out = Command::new(lab_script())
            .arg("ensure")
            .env("VMB_BUILD_DIR", build_dir())
            .env("VMB_FD_PLUGIN_SO", env!("VMB_FD_PLUGIN"))
            .output()
            .expect("run lab/bacula-lab.sh");
        assert!(
            out.status.success(),
            "bacula-lab.sh ensure: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    if needs_vms {
        for vm in [&*AGENT, &*NOAGENT] {
            let state = support::virsh_ok(&["domstate", vm]);
            assert!(
                state.contains("running"),
                "{vm} must run (lab/libvirt-lab.sh up bac): {state}"
            );
        }
    }
    Some(Lab { _guard: guard })
}

impl Lab {
    fn bconsole(&self, commands: &str) -> String {
        let mut child = Command::new("timeout")
            .args(["300", "bconsole", "-c"])
            .arg(format!("{LAB}/etc/bconsole.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run bconsole");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(commands.as_bytes())
                .expect("write to bconsole");
        }
        let out = child.wait_with_output().expect("bconsole output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sql(&self, query: &str) -> String {
        let out = Command::new("sqlite3")
            .arg(format!("{LAB}/work/dir/bacula.db"))
            .arg(query)
            .output()
            .expect("run sqlite3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Queues `run job=NAME yes` lines at once and returns their JobIds in order.
    fn queue(&self, jobs: &[&str]) -> Vec<u32> {
        let cmds: String = jobs.iter().map(|j| format!("run job={j} yes\n")).collect();
        let out = self.bconsole(&cmds);
        let ids: Vec<u32> = out
            .lines()
            .filter_map(|l| l.split("Job queued. JobId=").nth(1))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        assert_eq!(ids.len(), jobs.len(), "not all queued: {out}");
        ids
    }

    /// Waits until the job has ended (bconsole's `wait`, then the catalog's JobStatus: `wait`
    /// returns at once for a job the Director has not started yet).
    fn wait(&self, id: u32) -> char {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            self.bconsole(&format!("wait jobid={id}\n"));
            let status = self.status(id);
            if matches!(status, 'T' | 'E' | 'e' | 'f' | 'A') || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn status(&self, id: u32) -> char {
        self.sql(&format!("select JobStatus from Job where JobId={id}"))
            .chars()
            .next()
            .unwrap_or('?')
    }

    fn run(&self, job: &str) -> (u32, char) {
        let id = self.queue(&[job])[0];
        (id, self.wait(id))
    }

    /// Waits until the job has ended, at most `limit` (panics naming the job otherwise).
    fn wait_within(&self, id: u32, limit: Duration) -> char {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(id);
            if matches!(status, 'T' | 'E' | 'e' | 'f' | 'A') {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still '{status}' after {limit:?}: {}",
                self.joblog(id)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs bconsole `commands` that queue one job and returns its JobId.
    fn queued(&self, commands: &str) -> u32 {
        let out = self.bconsole(commands);
        queued_id(&out).unwrap_or_else(|| panic!("nothing queued by {commands:?}: {out}"))
    }

    /// A bconsole restore of every file of job `id` into `where_` (empty: the plugin's own
    /// place), waited for: (restore JobId, JobStatus, job log).
    fn restore(&self, id: u32, where_: &Path) -> (u32, char, String) {
        let rid = self.queued(&format!(
            "restore jobid={id} where={} all done yes\n",
            where_.display()
        ));
        let status = self.wait(rid);
        (rid, status, self.joblog(rid))
    }

    fn joblog(&self, id: u32) -> String {
        self.sql(&format!(
            "select LogText from Log where JobId={id} order by LogId"
        ))
    }

    fn files(&self, id: u32) -> Vec<String> {
        let out = self.sql(&format!(
            "select Path.Path || Filename.Name from File join Path on File.PathId = Path.PathId join Filename on File.FilenameId = Filename.FilenameId where File.JobId={id} order by File.FileIndex"
        ));
        out.lines().map(str::to_string).collect()
    }

    /// Adds a drop-in Director configuration and reloads.
    fn drop_in(&self, name: &str, text: &str) {
        std::fs::write(format!("{LAB}/etc/dir.d/{name}.conf"), text).expect("write drop-in");
        let out = self.bconsole("reload\n");
        assert!(!out.contains("rror"), "reload: {out}");
    }

    /// A job of the agent guest whose copy is held to [`SLOW_RATE`] by the plugin's
    /// `max_rate=`, for the tests that act while the copy runs (cancel, kill -9, live
    /// progress): however fast the machine, its 600 MiB take about ten seconds. The drop-in
    /// stays for the rest of the run (jobs of JobDefs VmBackup are Full).
    fn slow_job(&self) -> &'static str {
        let conf = format!("{LAB}/etc/dir.d/zz-slow.conf");
        if !Path::new(&conf).exists() {
            self.drop_in(
                "zz-slow",
                &format!(
                    "FileSet {{\n Name = \"slow-set\"\n Include {{\n  Plugin = \"vm-backup: vm={AGENT} config={LAB}/etc/vm-backup.conf max_rate={SLOW_RATE}\"\n }}\n}}\n\
                     Job {{\n Name = \"{SLOW_JOB}\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"slow-set\"\n}}\n"
                ),
            );
        }
        SLOW_JOB
    }
}

/// The JobId of a `Job queued. JobId=N` line.
fn queued_id(bconsole_out: &str) -> Option<u32> {
    bconsole_out
        .lines()
        .filter_map(|l| l.split("Job queued. JobId=").nth(1))
        .find_map(|s| s.trim().parse().ok())
}

/// Destroys and undefines a domain a restore may have defined (before and after a test).
fn forget_domain(dom: &str) {
    let _ = support::virsh(&["destroy", dom]);
    let _ = support::virsh(&["undefine", dom, "--nvram"]);
}

/// The disk of the restored domain that lies in `where_` and passes `also`.
fn restored_disk(restored: &str, where_: &Path, also: impl Fn(&str) -> bool) -> String {
    let blk = support::virsh_ok(&["domblklist", restored, "--details"]);
    blk.split_whitespace()
        .find(|w| w.starts_with(&where_.display().to_string()) && also(w))
        .unwrap_or_else(|| panic!("no disk of {restored} in {}: {blk}", where_.display()))
        .to_string()
}

/// Where the libvirt lab keeps the `bac` domains' disks.
fn disk_dir() -> PathBuf {
    Path::new(support::LAB_ROOT).join(prefix())
}

fn vm_dir(vm: &str) -> PathBuf {
    Path::new(LAB)
        .join("target")
        .join(vm_backup::format::layout::this_host())
        .join(vm)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != vm_backup::format::layout::VM_LOCK_FILE)
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The backup folder named by a job's virtual files.
fn folder_of(files: &[String], vm: &str) -> PathBuf {
    let meta = files
        .iter()
        .find(|f| f.ends_with("/backup-metadata.json"))
        .unwrap_or_else(|| panic!("no metadata file among {files:?}"));
    let stamp = meta.split('/').nth(3).expect("stamp component");
    vm_dir(vm).join(stamp)
}

/// Removes a verified backup folder (the agent's disk holds hundreds of MiB).
fn discard(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn sha256sum_check(dir: &Path) {
    let out = Command::new("sha256sum")
        .args(["-c", "checksums.sha256"])
        .current_dir(dir)
        .output()
        .expect("run sha256sum");
    assert!(
        out.status.success(),
        "sha256sum -c in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn disk_source(vm: &str) -> String {
    support::virsh_ok(&["domblklist", vm, "--details"])
}

fn assert_on_base(vm: &str) {
    let blk = disk_source(vm);
    let base = disk_dir().join(format!(
        "{}-vda.qcow2",
        vm.trim_start_matches(&format!("{}-", prefix()))
    ));
    assert!(
        blk.contains(&base.display().to_string()),
        "{vm} is not back on its base image {}: {blk}",
        base.display()
    );
    let xml = support::virsh_ok(&["dumpxml", vm]);
    assert!(
        !xml.contains("<backingStore type="),
        "{vm} still has a backing chain"
    );
}

#[test]
fn plugin_is_loaded_and_listed_by_status_client() {
    let Some(lab) = lab("plugin_is_loaded_and_listed_by_status_client", false) else {
        return;
    };
    let out = lab.bconsole("status client=vmb-fd\n");
    assert!(
        out.contains(&format!(
            "Plugin: vm-backup-fd.so({})",
            env!("CARGO_PKG_VERSION")
        )),
        "status client: {out}"
    );
    // The File Daemon writes its queued "Loaded plugin" line to fd.log only once a Director
    // has connected (the status above): wait for it, bounded.
    let mut fd_log = String::new();
    for _ in 0..300 {
        fd_log = std::fs::read_to_string(format!("{LAB}/log/fd.log")).unwrap_or_default();
        if fd_log.contains("Loaded plugin") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        fd_log.contains("Loaded plugin: vm-backup-fd.so"),
        "fd.log: {fd_log}"
    );
}

#[test]
fn run_job_backs_up_the_vm_through_the_plugin() {
    let Some(lab) = lab("run_job_backs_up_the_vm_through_the_plugin", true) else {
        return;
    };
    let t0 = Instant::now();
    let (id, status) = lab.run(&format!("vm-{AGENT}"));
    eprintln!(
        "backup job {id}: {status} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "job log: {log}");
    let files = lab.files(id);
    // The live job log (read while the engine ran), then the two metadata files.
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files[0].ends_with("/progress.log"), "{files:?}");
    assert!(
        files[0].starts_with(&format!("/@vm-backup/{AGENT}/")),
        "{files:?}"
    );
    assert!(
        files.iter().any(|f| f.ends_with("/checksums.sha256")),
        "{files:?}"
    );
    let dir = folder_of(&files, &AGENT);
    assert!(dir.is_dir(), "{} missing", dir.display());
    let names = entries(&dir);
    for want in [
        format!("{AGENT}-vda.qcow2"),
        format!("{AGENT}.xml"),
        "checksums.sha256".into(),
        "backup-metadata.json".into(),
        "backup.log".into(),
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    sha256sum_check(&dir);
    // The engine's progress lines reach the job log.
    for want in [
        "vm-backup: copying vda",
        "100% (",
        "committed and pivoted",
        "backup published",
        &format!("job report: VM {AGENT}, method "),
        "frozen ",
        " MiB/s), folder /",
        "warnings: none",
    ] {
        assert!(log.contains(want), "{want:?} not in job log: {log}");
    }
    // `list files jobid=N` shows the virtual files too.
    let listed = lab.bconsole(&format!("list files jobid={id}\n"));
    assert!(listed.contains("/backup-metadata.json"), "{listed}");
    assert_on_base(&AGENT);
    discard(&dir);
}

#[test]
fn estimate_listing_takes_no_snapshot() {
    let Some(lab) = lab("estimate_listing_takes_no_snapshot", true) else {
        return;
    };
    let before = entries(&vm_dir(&AGENT));
    let disk_dir_before = entries(&disk_dir());
    let out = lab.bconsole(&format!("estimate job=vm-{AGENT} listing\n"));
    assert!(out.contains(&format!("/@vm-backup/{AGENT}/")), "{out}");
    assert!(out.contains("backup-metadata.json"), "{out}");
    // Each disk, with its allocated size, without touching the VM.
    assert!(out.contains(&format!("/{AGENT}-vda.qcow2")), "{out}");
    assert!(
        out.contains("would copy disk vda (") && out.contains("bytes allocated)"),
        "{out}"
    );
    assert_eq!(entries(&vm_dir(&AGENT)), before, "estimate wrote a backup");
    assert_eq!(
        entries(&disk_dir()),
        disk_dir_before,
        "estimate created files (overlay?)"
    );
    assert_on_base(&AGENT);
}

#[test]
fn unknown_vm_and_malformed_string_fail_the_job() {
    let Some(lab) = lab("unknown_vm_and_malformed_string_fail_the_job", false) else {
        return;
    };
    let missing = format!("{}-missing", prefix());
    let (id, status) = lab.run(&format!("vm-{missing}"));
    let log = lab.joblog(id);
    assert_eq!(status, 'f', "{log}");
    assert!(
        log.contains(&format!(
            "Fatal error: vm-backup: backup of {missing} pre-check failed (exit 1)"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("no domain named \"{missing}\"")),
        "{log}"
    );
    assert!(
        !vm_dir(&missing).exists(),
        "something was written for an unknown VM"
    );

    lab.drop_in(
        "zz-malformed",
        &format!("FileSet {{ Name = \"bad-set\"\n Include {{ Plugin = \"vm-backup: vm={AGENT} colour=red\" }} }}\n\
         Job {{ Name = \"vm-bad-string\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"bad-set\" }}\n"),
    );
    let before = entries(&vm_dir(&AGENT));
    let (id, status) = lab.run("vm-bad-string");
    let log = lab.joblog(id);
    assert_eq!(status, 'f', "{log}");
    assert!(log.contains("unknown key \"colour\""), "{log}");
    assert_eq!(
        entries(&vm_dir(&AGENT)),
        before,
        "a malformed job touched the target"
    );
    assert!(lab.files(id).is_empty());
}

#[test]
fn queued_jobs_run_one_at_a_time_in_priority_order() {
    let Some(lab) = lab("queued_jobs_run_one_at_a_time_in_priority_order", true) else {
        return;
    };
    // The first job occupies the single slot; of the two that wait, the lower Priority number
    // (vm-bac-agent, 10) must run before vm-bac-noagent (20), although queued after it.
    let ids = lab.queue(&[
        &format!("vm-{AGENT}"),
        &format!("vm-{NOAGENT}"),
        &format!("vm-{AGENT}"),
    ]);
    for id in &ids {
        assert_eq!(lab.wait(*id), 'T', "job {id}: {}", lab.joblog(*id));
    }
    let times: Vec<(i64, i64)> = ids
        .iter()
        .map(|id| {
            let row = lab.sql(&format!(
                "select strftime('%s', StartTime), strftime('%s', EndTime) from Job where JobId={id}"
            ));
            let mut it = row.split('|').map(|s| s.parse::<i64>().unwrap_or(0));
            (it.next().unwrap_or(0), it.next().unwrap_or(0))
        })
        .collect();
    let (first, low, high) = (times[0], times[1], times[2]);
    assert!(high.0 >= first.1, "jobs overlapped: {times:?}");
    assert!(
        low.0 >= high.1,
        "priority 20 ran before priority 10 finished: {times:?}"
    );
    for id in ids {
        let files = lab.files(id);
        let vm = if files.iter().any(|f| f.contains(&*NOAGENT)) {
            &*NOAGENT
        } else {
            &*AGENT
        };
        discard(&folder_of(&files, vm));
    }
}

#[test]
fn scheduled_job_behaves_like_run_job() {
    let Some(lab) = lab("scheduled_job_behaves_like_run_job", true) else {
        return;
    };
    // A schedule for the next minute (at least 15 s away), on a copy of the VM's job.
    let now = chrono::Local::now() + chrono::Duration::seconds(75);
    let at = now.format("%H:%M").to_string();
    lab.drop_in(
        "zz-schedule",
        &format!(
            "Schedule {{\n Name = \"TestSoon\"\n Run = Level=Full daily at {at}\n}}\n\
             Job {{ Name = \"vm-{AGENT}-scheduled\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"vm-{AGENT}-set\"\n Schedule = \"TestSoon\" }}\n"
        ),
    );
    let last: u32 = lab.sql("select max(JobId) from Job").parse().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(150);
    let id = loop {
        let id = lab.sql(&format!(
            "select max(JobId) from Job where Name='vm-{AGENT}-scheduled' and JobId>{last}"
        ));
        if let Ok(id) = id.parse::<u32>() {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the schedule did not start the job"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let status = lab.wait(id);
    std::fs::remove_file(format!("{LAB}/etc/dir.d/zz-schedule.conf")).ok();
    lab.bconsole("reload\n");
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    assert!(log.contains("vm-backup: copying vda"), "{log}");
    let files = lab.files(id);
    let dir = folder_of(&files, &AGENT);
    sha256sum_check(&dir);
    assert_on_base(&AGENT);
    discard(&dir);
}

/// The restored image holds the backup's guest data, byte for byte (`qemu-img compare`). The
/// files themselves may differ: a restore drops the checkpoint bitmaps (`vmb-*`) that a
/// direct-mode Full copied from the source, so the restored VM starts clean.
fn assert_same_guest_data(restored: &str, backed_up: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", restored, backed_up])
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "restored disk {restored} differs from {backed_up}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the copy of `vm` has begun (its `.partial` folder exists on the target).
/// (The folder rather than a log line: it is the moment the engine starts writing.)
fn wait_copy(vm: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !partials(vm).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn partials(vm: &str) -> Vec<String> {
    entries(&vm_dir(vm))
        .into_iter()
        .filter(|e| e.ends_with(".partial"))
        .collect()
}

fn overlays() -> Vec<String> {
    let disks = disk_dir();
    entries(&disks)
        .into_iter()
        .filter(|e| e.starts_with("agent-vda") && e != "agent-vda.qcow2")
        .collect()
}

#[test]
fn cancel_during_copy_ends_a_and_leaves_nothing() {
    let Some(lab) = lab("cancel_during_copy_ends_a_and_leaves_nothing", true) else {
        return;
    };
    let id = lab.queue(&[lab.slow_job()])[0];
    assert!(
        wait_copy(&AGENT, Duration::from_secs(60)),
        "the copy did not start"
    );
    let out = lab.bconsole(&format!("cancel jobid={id} yes\n"));
    let status = lab.wait(id);
    let log = lab.joblog(id);
    assert_eq!(status, 'A', "cancel: {out}\nlog: {log}");
    assert!(
        !log.contains("backup published"),
        "the copy finished before the cancel (lower SLOW_RATE): {log}"
    );
    // The Director ends the job as soon as it has told the FD; the FD's job thread then stops
    // the copy, commits the snapshot and removes the partial folder.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (!partials(&AGENT).is_empty() || !overlays().is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        partials(&AGENT).is_empty(),
        "partial left: {:?}",
        partials(&AGENT)
    );
    assert!(overlays().is_empty(), "overlay left: {:?}", overlays());
    assert_on_base(&AGENT);
}

#[test]
fn kill_9_of_the_fd_mid_backup_is_repaired_by_the_next_job() {
    let Some(lab) = lab(
        "kill_9_of_the_fd_mid_backup_is_repaired_by_the_next_job",
        true,
    ) else {
        return;
    };
    let id = lab.queue(&[lab.slow_job()])[0];
    assert!(
        wait_copy(&AGENT, Duration::from_secs(60)),
        "the copy did not start"
    );
    let pid = std::fs::read_to_string(format!("{LAB}/work/fd.pid")).expect("fd pid");
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = lab.wait(id);
    assert_ne!(status, 'T', "the job survived kill -9 of the FD");
    let left = (partials(&AGENT), overlays());
    let out = Command::new(lab_script())
        .arg("restart-fd")
        .output()
        .expect("restart fd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (id2, status2) = lab.run(&format!("vm-{AGENT}"));
    let log2 = lab.joblog(id2);
    assert_eq!(status2, 'T', "{log2}");
    assert!(
        log2.contains("did not finish: repairing its leftovers"),
        "the next job did not repair (left after kill: {left:?}): {log2}"
    );
    assert_on_base(&AGENT);
    assert!(
        partials(&AGENT).is_empty(),
        "partial left: {:?}",
        partials(&AGENT)
    );
    assert!(overlays().is_empty(), "overlay left: {:?}", overlays());
    let dir = folder_of(&lab.files(id2), &AGENT);
    sha256sum_check(&dir);
    discard(&dir);
}

#[test]
fn restore_with_where_defines_a_new_domain_that_boots() {
    let Some(lab) = lab("restore_with_where_defines_a_new_domain_that_boots", true) else {
        return;
    };
    let restored = format!("{AGENT}-restored");
    forget_domain(&restored);
    let (id, status) = lab.run(&format!("vm-{AGENT}"));
    assert_eq!(status, 'T', "{}", lab.joblog(id));
    let dir = folder_of(&lab.files(id), &AGENT);
    let where_ = PathBuf::from(format!("{LAB}/restore/job-{id}"));
    let _ = std::fs::remove_dir_all(&where_);

    let t0 = Instant::now();
    let (rid, rstatus, log) = lab.restore(id, &where_);
    eprintln!(
        "restore job {rid}: {rstatus} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(rstatus, 'T', "{log}");
    assert!(log.contains(&format!("as domain {restored}")), "{log}");

    // Defined under the new name, its disk in `where`, byte-identical to the backup's copy.
    let disk = restored_disk(&restored, &where_, |_| true);
    let backed_up = dir.join(format!("{AGENT}-vda.qcow2"));
    assert_same_guest_data(&disk, &backed_up.display().to_string());

    // It boots: the guest agent answers.
    support::virsh_ok(&["start", &restored]);
    let booted = Command::new(support::lab_script())
        .args(["wait-agent", &restored, "90"])
        .status()
        .expect("wait-agent");
    forget_domain(&restored);
    assert!(booted.success(), "{restored} did not boot to its agent");
    let _ = std::fs::remove_dir_all(&where_);
    discard(&dir);
}

#[test]
fn stream_mode_backs_up_through_bacula_and_restores_byte_exact() {
    let Some(lab) = lab(
        "stream_mode_backs_up_through_bacula_and_restores_byte_exact",
        true,
    ) else {
        return;
    };
    let restored = format!("{NOAGENT}-restored");
    forget_domain(&restored);
    // The lab's settings with a configured host name, which the streamed metadata must record
    // (as direct mode's does).
    let stream_conf = format!("{LAB}/etc/vm-backup-stream.conf");
    let settings = std::fs::read_to_string(format!("{LAB}/etc/vm-backup.conf")).unwrap();
    std::fs::write(
        &stream_conf,
        format!("hostname = \"{STREAM_HOST}\"\n{settings}"),
    )
    .unwrap();
    lab.drop_in(
        "zz-stream",
        &format!(
            "FileSet {{\n Name = \"stream-set\"\n Include {{\n  Plugin = \"vm-backup: vm={NOAGENT} mode=stream config={stream_conf} max_rate=1G\"\n }}\n}}\n\
             Job {{\n Name = \"vm-stream\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"stream-set\"\n}}\n"
        ),
    );
    let before = entries(&vm_dir(&NOAGENT));
    let (id, status) = lab.run("vm-stream");
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    // A direct-mode option in a stream job is said to do nothing there.
    assert!(log.contains("max_rate= applies to mode=direct"), "{log}");
    let files = lab.files(id);
    let names: Vec<&str> = files
        .iter()
        .map(|f| f.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            format!("{NOAGENT}-vda.qcow2").as_str(),
            format!("{NOAGENT}.xml").as_str(),
            "checksums.sha256",
            "backup-metadata.json"
        ],
        "{files:?}"
    );
    let bytes: u64 = lab
        .sql(&format!("select JobBytes from Job where JobId={id}"))
        .parse()
        .unwrap_or(0);
    assert!(
        bytes > 1 << 20,
        "the disk did not go through Bacula: JobBytes={bytes}"
    );
    assert_eq!(
        entries(&vm_dir(&NOAGENT)),
        before,
        "stream mode wrote to the target"
    );
    assert_on_base(&NOAGENT);

    let where_ = PathBuf::from(format!("{LAB}/restore/stream-{id}"));
    let _ = std::fs::remove_dir_all(&where_);
    let (_, rstatus, rlog) = lab.restore(id, &where_);
    assert_eq!(rstatus, 'T', "{rlog}");
    assert!(rlog.contains(&format!("as domain {restored}")), "{rlog}");
    // The folder rebuilt from Bacula's data checks against the digests taken while streaming,
    // and the restored disk is byte-identical to it.
    let stamp = files[0].split('/').nth(3).expect("stamp");
    let rebuilt = where_.join(&*NOAGENT).join(stamp);
    sha256sum_check(&rebuilt);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(rebuilt.join("backup-metadata.json")).expect("streamed metadata"),
    )
    .expect("metadata is JSON");
    assert_eq!(meta["host"], STREAM_HOST, "{meta}");
    assert!(meta["phases"]["copy"].as_f64().is_some(), "{meta}");
    let disk = restored_disk(&restored, &where_, |w| {
        w.ends_with(".qcow2") && !w.contains(stamp)
    });
    let streamed = rebuilt.join(format!("{NOAGENT}-vda.qcow2"));
    assert_same_guest_data(&disk, &streamed.display().to_string());
    forget_domain(&restored);
    let _ = std::fs::remove_dir_all(&where_);
    std::fs::remove_file(format!("{LAB}/etc/dir.d/zz-stream.conf")).ok();
    std::fs::remove_file(&stream_conf).ok();
    lab.bconsole("reload\n");
}

/// The `Bytes=` count of job `id` in `status client`, and its "Processing file" line.
fn client_bytes(status: &str, id: u32) -> Option<(u64, String)> {
    let mut lines = status
        .lines()
        .skip_while(|l| !l.contains(&format!("JobId {id} ")));
    lines.next()?;
    let mut bytes = None;
    let mut file = String::new();
    for l in lines.take(6) {
        if let Some(rest) = l.split("Bytes=").nth(1).filter(|_| l.contains("Files=")) {
            let n: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == ',')
                .filter(char::is_ascii_digit)
                .collect();
            bytes = n.parse().ok();
        }
        if let Some(f) = l.split("Processing file: ").nth(1) {
            file = f.trim().to_string();
        }
    }
    bytes.map(|b| (b, file))
}

#[test]
fn progress_reaches_messages_and_status_client_while_the_copy_runs() {
    let Some(lab) = lab(
        "progress_reaches_messages_and_status_client_while_the_copy_runs",
        true,
    ) else {
        return;
    };
    lab.bconsole("messages\n"); // drain what earlier jobs left
    let id = lab.queue(&[lab.slow_job()])[0];
    let deadline = Instant::now() + Duration::from_secs(600);
    // Copy lines (`…vda.qcow2: 42% (…`, not yet 100 %) seen in `messages` while the job ran,
    // and the byte counts `status client` showed meanwhile.
    let mut live_lines = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    let mut processing = String::new();
    let mut messages = String::new();
    while Instant::now() < deadline {
        let out = lab.bconsole("messages\n");
        let status = lab.bconsole("status client=vmb-fd\n");
        let running = lab.status(id) == 'R';
        messages.push_str(&out);
        if running {
            for l in out.lines() {
                if l.contains("vda.qcow2: ")
                    && l.contains("% (")
                    && !l.contains("100% (")
                    && l.contains("MiB/s, ETA")
                {
                    live_lines.push(l.to_string());
                }
            }
            if let Some((bytes, file)) = client_bytes(&status, id) {
                if counts.last() != Some(&bytes) {
                    counts.push(bytes);
                }
                if !file.is_empty() {
                    processing = file;
                }
            }
        }
        if matches!(lab.status(id), 'T' | 'E' | 'e' | 'f' | 'A') {
            break;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let status = lab.wait(id);
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    eprintln!(
        "live copy lines: {}; status client byte counts while running: {counts:?}; processing: {processing}",
        live_lines.len()
    );
    assert!(
        !live_lines.is_empty(),
        "no copy progress line in `messages` before the job ended: {messages}"
    );
    assert!(
        counts.len() >= 2 && counts.windows(2).all(|w| w[0] < w[1]),
        "status client did not show a growing byte count while the job ran: {counts:?}"
    );
    assert!(
        processing.ends_with("/progress.log"),
        "status client's current file: {processing:?}"
    );
    // Every phase reaches the job log.
    for want in [
        "pre-checks",
        "(the frozen window)",
        "% (",
        "committing the overlays",
        "publishing the backup folder",
        "post-checks",
        "job report: VM",
        &format!("bandwidth limit: {SLOW_MIB_S:.1} MiB/s"),
    ] {
        assert!(log.contains(want), "{want:?} not in the job log: {log}");
    }
    // The plugin's max_rate= held the copy: the report's rate is the limit's, give or take the
    // pacer's burst window (unlimited, this copy runs at several times the limit).
    let report_rate: f64 = log
        .split("job report: VM")
        .nth(1)
        .and_then(|r| r.split(" s (").nth(1))
        .and_then(|r| r.split(" MiB/s").next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in the job report: {log}"));
    assert!(
        report_rate <= SLOW_MIB_S * 1.1,
        "the copy ran at {report_rate} MiB/s, over max_rate={SLOW_RATE}: {log}"
    );
    discard(&folder_of(&lab.files(id), &AGENT));
}

#[test]
fn a_warning_that_does_not_touch_the_data_ends_ok_with_warnings() {
    let Some(lab) = lab(
        "a_warning_that_does_not_touch_the_data_ends_ok_with_warnings",
        true,
    ) else {
        return;
    };
    // A port nobody listens on: the appliance's SSH and the Slack webhook are unreachable.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let inventory = format!("{LAB}/etc/vm-list-warn.yaml");
    std::fs::write(
        &inventory,
        format!(
            "vms:\n  - name: {NOAGENT}\n    method: snapshot\n    appliance: asav\n    address: 127.0.0.1\n"
        ),
    )
    .unwrap();
    let conf = format!("{LAB}/etc/vm-backup-warn.conf");
    std::fs::write(
        &conf,
        format!(
            "target = \"{LAB}/target\"\njournal_dir = \"{LAB}/journal\"\ninventory = \"{inventory}\"\n\
             [ssh]\nport = {port}\nconnect_timeout_seconds = 2\ncommand_timeout_seconds = 5\n\
             [slack]\nalerts_webhook = \"http://127.0.0.1:{port}/hook\"\ntimeout_seconds = 1\nbudget_seconds = 3\n"
        ),
    )
    .unwrap();
    lab.drop_in(
        "zz-warn",
        &format!(
            "FileSet {{\n Name = \"warn-set\"\n Include {{\n  Plugin = \"vm-backup: vm={NOAGENT} config={conf}\"\n }}\n}}\n\
             Job {{\n Name = \"vm-warn\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"warn-set\"\n}}\n"
        ),
    );
    let (id, status) = lab.run("vm-warn");
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    assert!(log.contains("Backup OK -- with warnings"), "{log}");
    assert!(log.contains("Slack alert not delivered"), "{log}");
    assert!(log.contains("Warning: vm-backup:"), "{log}");
    let dir = folder_of(&lab.files(id), &NOAGENT);
    sha256sum_check(&dir);
    assert_on_base(&NOAGENT);
    discard(&dir);
}

// ---- issue 11: Bacula levels (incrementals in direct mode) ----

/// `run job=JOB level=LEVEL yes`, waited for: (JobId, JobStatus).
fn run_level(lab: &Lab, job: &str, level: &str) -> (u32, char) {
    let id = lab.queued(&format!("run job={job} level={level} yes\n"));
    (id, lab.wait(id))
}

/// Resumes a paused domain when dropped.
struct ResumeOnDrop(String);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        let _ = support::virsh(&["resume", &self.0]);
    }
}

/// Our checkpoints (`vmb-*`) deleted from a domain (a clean chain before and after).
fn forget_our_checkpoints(dom: &str) {
    let names = support::virsh(&["checkpoint-list", dom, "--name"]);
    for c in String::from_utf8_lossy(&names.stdout)
        .lines()
        .map(str::trim)
        .filter(|c| c.starts_with("vmb-"))
    {
        if !support::virsh(&["checkpoint-delete", dom, c])
            .status
            .success()
        {
            let _ = support::virsh(&["checkpoint-delete", dom, c, "--metadata"]);
        }
    }
}

/// A Bacula Incremental after a Full, in direct mode, on the agent guest of the libvirt lab
/// of `VMB_LAB_PREFIX`: the job log says which level ran and on what, the folder is an
/// incremental on the Full's folder, and a bconsole restore of the Incremental's JobId gives
/// the disk as of that job, byte for byte.
#[test]
fn incremental_job_after_a_full_is_an_incremental_and_restores_byte_exact() {
    let name = "incremental_job_after_a_full_is_an_incremental_and_restores_byte_exact";
    let Some(lab) = lab(name, false) else {
        return;
    };
    if !support::lab_enabled(name) {
        return;
    }
    let dom = support::agent_dom();
    support::wait_agent(&dom, Duration::from_secs(60));
    forget_our_checkpoints(&dom);
    let restored = format!("{dom}-restored");
    forget_domain(&restored);
    lab.drop_in(
        "zz-incr",
        &format!(
            "FileSet {{\n Name = \"incr-set\"\n Include {{\n  Plugin = \"vm-backup: vm={dom} mode=direct method=snapshot config={LAB}/etc/vm-backup.conf\"\n }}\n}}\n\
             Job {{\n Name = \"vm-incr\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"incr-set\"\n}}\n"
        ),
    );
    let (fid, fstatus) = run_level(&lab, "vm-incr", "Full");
    let flog = lab.joblog(fid);
    assert_eq!(fstatus, 'T', "{flog}");
    assert!(flog.contains("Full requested: level full ran"), "{flog}");
    let full_dir = folder_of(&lab.files(fid), &dom);

    // Known data, then the Incremental while the guest is paused (the reference is its disk).
    support::gexec_ok(
        &dom,
        "dd if=/dev/urandom of=/mnt/data/bacula-inc.bin bs=64k count=8 2>/dev/null && sync",
    );
    let image = support::disk_sources(&dom)
        .into_iter()
        .find(|(t, _)| t == "vda")
        .map(|(_, s)| s)
        .expect("vda");
    let reference = PathBuf::from(format!("{LAB}/restore/incr-reference.raw"));
    let (iid, istatus) = {
        support::virsh_ok(&["suspend", &dom]);
        let _resume = ResumeOnDrop(dom.clone());
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw", &image])
            .arg(&reference)
            .output()
            .expect("qemu-img convert");
        assert!(out.status.success(), "{out:?}");
        run_level(&lab, "vm-incr", "Incremental")
    };
    let ilog = lab.joblog(iid);
    assert_eq!(istatus, 'T', "{ilog}");
    let full_stamp = full_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        ilog.contains(&format!(
            "Incremental requested: level incremental ran, on top of {full_stamp}"
        )),
        "{ilog}"
    );
    let inc_dir = folder_of(&lab.files(iid), &dom);
    let meta = vm_backup::format::metadata::BackupMetadata::read(&inc_dir).expect("metadata");
    assert_eq!(
        meta.level(),
        vm_backup::format::metadata::BackupLevel::Incremental
    );
    assert_eq!(meta.chain.parent.as_deref(), Some(full_stamp.as_str()));

    // Restore of the Incremental's JobId through bconsole: the chain comes back.
    let where_ = PathBuf::from(format!("{LAB}/restore/incr-{iid}"));
    let _ = std::fs::remove_dir_all(&where_);
    let (_, rstatus, rlog) = lab.restore(iid, &where_);
    assert_eq!(rstatus, 'T', "{rlog}");
    let disk = restored_disk(&restored, &where_, |w| w.ends_with(".qcow2"));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", &disk])
        .arg(&reference)
        .output()
        .expect("qemu-img compare");
    forget_domain(&restored);
    let _ = std::fs::remove_dir_all(&where_);
    let _ = std::fs::remove_file(&reference);
    std::fs::remove_file(format!("{LAB}/etc/dir.d/zz-incr.conf")).ok();
    lab.bconsole("reload\n");
    forget_our_checkpoints(&dom);
    discard(&inc_dir);
    discard(&full_dir);
    assert!(
        cmp.status.success(),
        "the restored incremental differs from the disk at the job: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

/// The program and a Bacula job on the same VM at once, each with its own `journal_dir`: the
/// second comer is refused by the VM's lock on the target (exit 1, nothing touched), and the
/// job it met runs on to a verified backup with its `.partial` folder never removed.
#[test]
fn the_program_and_a_bacula_job_on_one_vm_exclude_each_other_through_the_target() {
    let name = "the_program_and_a_bacula_job_on_one_vm_exclude_each_other_through_the_target";
    let Some(lab) = lab(name, true) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let conf = scratch.path().join("vm-backup.conf");
    let site = std::fs::read_to_string(format!("{LAB}/etc/vm-backup.conf")).unwrap();
    let other_journal = scratch.path().join("journal");
    let own: String = site
        .lines()
        .map(|l| {
            if l.starts_with("journal_dir") {
                format!("journal_dir = \"{}\"\n", other_journal.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&conf, own).unwrap();
    let id = lab.queue(&[&format!("vm-{AGENT}")])[0];
    assert!(
        wait_copy(&AGENT, Duration::from_secs(60)),
        "the copy did not start"
    );
    let staged = partials(&AGENT);
    let out = Command::new(env!("CARGO_BIN_EXE_vm-backup"))
        .args(["backup", &AGENT, "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let still_copying = lab.status(id) == 'R';
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lock"), "{stderr}");
    if still_copying {
        assert_eq!(
            partials(&AGENT),
            staged,
            "the job's partial folder was touched"
        );
    }
    let status = lab.wait(id);
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    let dir = folder_of(&lab.files(id), &AGENT);
    sha256sum_check(&dir);
    assert_on_base(&AGENT);
    discard(&dir);
}

// ---- issue 9: the last fault rows through Bacula ----

/// Waits until job `id`'s log contains `marker` (true) or the job has ended without it
/// (false), at most `limit`.
fn wait_log(lab: &Lab, id: u32, marker: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if lab.joblog(id).contains(marker) {
            return true;
        }
        if matches!(lab.status(id), 'T' | 'E' | 'e' | 'f' | 'A') {
            return lab.joblog(id).contains(marker);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The File Daemon process is alive and answers `status client`.
fn assert_fd_answers(lab: &Lab) {
    let pid = std::fs::read_to_string(format!("{LAB}/work/fd.pid")).expect("fd pid");
    let alive = Command::new("kill")
        .args(["-0", pid.trim()])
        .status()
        .expect("kill -0");
    assert!(alive.success(), "bacula-fd (pid {}) is gone", pid.trim());
    let status = lab.bconsole("status client=vmb-fd\n");
    assert!(
        status.contains("Plugin: vm-backup-fd.so"),
        "bacula-fd does not answer status client: {status}"
    );
}

/// The published backups of `vm` on the lab target (folder names without `.partial`).
fn published(vm: &str) -> Vec<String> {
    entries(&vm_dir(vm))
        .into_iter()
        .filter(|e| !e.ends_with(".partial"))
        .collect()
}

/// `vm-backup` with the lab's settings.
fn lab_vmb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vm-backup"))
        .args(args)
        .args(["--config", &format!("{LAB}/etc/vm-backup.conf")])
        .output()
        .expect("run vm-backup")
}

/// Nothing partial looks like a backup of `vm`: `vm-backup list` and the catalog on the share
/// name only published folders, each of which verifies.
fn assert_only_whole_backups(vm: &str) {
    let folders = published(vm);
    let list = lab_vmb(&["list", vm]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.status.success(), "vm-backup list: {listed}");
    assert!(
        !listed.contains(".partial"),
        "list shows a partial: {listed}"
    );
    let catalog = Command::new("sqlite3")
        .arg(format!("{LAB}/target/metadata/backup-catalog.db"))
        .arg(format!("select stamp from backups where vm = '{vm}'"))
        .output()
        .expect("sqlite3");
    for stamp in String::from_utf8_lossy(&catalog.stdout).lines() {
        assert!(
            folders.iter().any(|f| f == stamp),
            "the catalog names {stamp}, which is not a published folder ({folders:?})"
        );
    }
    for stamp in &folders {
        assert!(
            listed.contains(stamp.as_str()),
            "{stamp} not listed: {listed}"
        );
        let v = lab_vmb(&["verify", vm, stamp]);
        assert!(
            v.status.success(),
            "{vm} {stamp} does not verify: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}

/// A cancel raced against the end of a direct-mode job (as soon as the job log shows the copy
/// done, the commit, the publish, and the final report: the plugin is about to be freed, or
/// being freed, while the engine's worker ends). Whatever the race gives, the File Daemon lives
/// and answers, the job ends A or T within its bound, the guest is thawed, the domain is on its
/// own image with no block job, no `.partial` is listed or catalogued and every published
/// folder verifies; the next job ends "Backup OK".
#[test]
fn cancel_racing_the_end_of_a_job_leaves_the_fd_the_guest_and_the_target_sound() {
    let name = "cancel_racing_the_end_of_a_job_leaves_the_fd_the_guest_and_the_target_sound";
    let Some(lab) = lab(name, true) else {
        return;
    };
    let before = published(&AGENT);
    let job = format!("vm-{AGENT}");
    let mut outcomes = Vec::new();
    for marker in [
        "vda copied:",
        "committing the overlays back",
        "publishing the backup folder",
        "job report:",
    ] {
        let id = lab.queue(&[&job])[0];
        let seen = wait_log(&lab, id, marker, Duration::from_secs(300));
        let t = Instant::now();
        lab.bconsole(&format!("cancel jobid={id} yes\n"));
        let status = lab.wait_within(id, Duration::from_secs(180));
        let log = lab.joblog(id);
        outcomes.push(format!(
            "{marker:?}: seen {seen}, status {status} {:.1} s after the cancel",
            t.elapsed().as_secs_f64()
        ));
        assert!(
            matches!(status, 'A' | 'T'),
            "cancel at {marker:?}: status {status}\n{log}"
        );
        assert_fd_answers(&lab);
        // The Director ends the job once it has told the FD; the job thread then releases.
        let deadline = Instant::now() + Duration::from_secs(60);
        while (!partials(&AGENT).is_empty() || !overlays().is_empty()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(partials(&AGENT).is_empty(), "partial left at {marker:?}");
        assert!(overlays().is_empty(), "overlay left: {:?}", overlays());
        assert_eq!(
            support::fsfreeze_status(&AGENT).as_deref(),
            Some("thawed"),
            "cancel at {marker:?}"
        );
        assert_on_base(&AGENT);
        let jobs = support::virsh_ok(&["blockjob", &AGENT, "vda", "--info"]);
        assert!(jobs.contains("No current block job"), "{jobs}");
        assert_only_whole_backups(&AGENT);
    }
    eprintln!("cancel races: {outcomes:#?}");
    let (id, status) = lab.run(&job);
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "{log}");
    assert!(log.contains("Backup OK"), "{log}");
    let dir = folder_of(&lab.files(id), &AGENT);
    assert_only_whole_backups(&AGENT);
    for stamp in published(&AGENT) {
        if !before.contains(&stamp) {
            discard(&vm_dir(&AGENT).join(stamp));
        }
    }
    assert!(!dir.exists());
}

/// A stream-mode restore with an empty `where` of only part of a backup's files (the disk image
/// left out, as an operator picking files in bconsole's tree would): the folder the plugin
/// stages on the target fails its post-check ("… is missing"), so the job fails naming the file,
/// nothing new is left in the VM's folder (no stamp folder, no `.partial`), and the earlier
/// direct-mode backup still verifies.
#[test]
fn a_stream_restore_of_part_of_a_backup_is_refused_and_leaves_nothing_on_the_target() {
    let name = "a_stream_restore_of_part_of_a_backup_is_refused_and_leaves_nothing_on_the_target";
    let Some(lab) = lab(name, true) else {
        return;
    };
    let (did, dstatus) = lab.run(&format!("vm-{NOAGENT}"));
    assert_eq!(dstatus, 'T', "{}", lab.joblog(did));
    let earlier = folder_of(&lab.files(did), &NOAGENT);
    lab.drop_in(
        "zz-stream-part",
        &format!(
            "FileSet {{\n Name = \"stream-part-set\"\n Include {{\n  Plugin = \"vm-backup: vm={NOAGENT} mode=stream config={LAB}/etc/vm-backup.conf\"\n }}\n}}\n\
             Job {{\n Name = \"vm-stream-part\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"stream-part-set\"\n}}\n"
        ),
    );
    let (sid, sstatus) = lab.run("vm-stream-part");
    assert_eq!(sstatus, 'T', "{}", lab.joblog(sid));
    let files = lab.files(sid);
    let meta = files
        .iter()
        .find(|f| f.ends_with("/backup-metadata.json"))
        .unwrap_or_else(|| panic!("no metadata among {files:?}"));
    let stamp_dir = meta.trim_end_matches("backup-metadata.json");
    let disk = format!("{NOAGENT}-vda.qcow2");
    let before = entries(&vm_dir(&NOAGENT));

    // bconsole's tree: every file of the job but the disk image; an empty `where`.
    let rid = lab.queued(&format!(
        "restore jobid={sid} where=\ncd {stamp_dir}\nmark *\nunmark {disk}\ndone\nyes\n"
    ));
    let rstatus = lab.wait_within(rid, Duration::from_secs(300));
    let rlog = lab.joblog(rid);
    assert!(
        matches!(rstatus, 'f' | 'E'),
        "the partial restore was not refused ({rstatus}): {rlog}"
    );
    assert!(
        rlog.contains("failed its checks") && rlog.contains(&format!("{disk} is missing")),
        "the job log does not name the problem: {rlog}"
    );
    assert!(!rlog.contains("as domain"), "{rlog}");
    assert_eq!(
        entries(&vm_dir(&NOAGENT)),
        before,
        "the refused restore left something in the VM's folder"
    );
    assert_only_whole_backups(&NOAGENT);
    assert_on_base(&NOAGENT);
    std::fs::remove_file(format!("{LAB}/etc/dir.d/zz-stream-part.conf")).ok();
    lab.bconsole("reload\n");
    discard(&earlier);
}

/// Issue 14: the off-site push as the Admin job `bacula-config --offsite` prints, run from
/// bconsole after a backup job; the backup is then listed off-site and verifies. Needs the S3
/// lab too (`lab/s3-lab.sh start; eval "$(lab/s3-lab.sh env)"`). Self-contained: its own
/// configuration file, key, credentials file and bucket prefix; the drop-in is removed after.
#[test]
fn offsite_admin_job_pushes_the_backup_which_then_verifies() {
    let test = "offsite_admin_job_pushes_the_backup_which_then_verifies";
    let Some(s3) = support::s3_lab(test) else {
        return;
    };
    let Some(lab) = lab(test, false) else {
        return;
    };
    if !support::lab_enabled(test) {
        return;
    }
    let state = support::virsh_ok(&["domstate", &AGENT]);
    assert!(state.contains("running"), "{AGENT} must run: {state}");
    let (id, status) = lab.run(&format!("vm-{AGENT}"));
    assert_eq!(status, 'T', "backup job log: {}", lab.joblog(id));
    let dir = folder_of(&lab.files(id), &AGENT);
    let stamp = dir.file_name().unwrap().to_string_lossy().into_owned();

    // The off-site settings the File Daemon's command reads: the lab's configuration plus an
    // [offsite] section; credentials in a file (the daemon has no AWS_* variables).
    let etc = Path::new(LAB).join("etc");
    let conf = etc.join("vm-backup-offsite.conf");
    let key = etc.join("offsite.key");
    let creds = etc.join("s3-credentials");
    let prefix = format!("bacula-{}", std::process::id());
    let _ = std::fs::remove_file(&key);
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()
        ),
    )
    .unwrap();
    let base = std::fs::read_to_string(etc.join("vm-backup.conf")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "{base}\n[offsite]\nendpoint = \"{}\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\n\
             key_file = \"{}\"\ncredentials_file = \"{}\"\n",
            s3.endpoint,
            s3.bucket,
            key.display(),
            creds.display()
        ),
    )
    .unwrap();
    let vmb = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vm-backup"))
            .args(args)
            .arg("--config")
            .arg(&conf)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .expect("run vm-backup")
    };
    let out = vmb(&["key", "create"]);
    assert!(out.status.success(), "{out:?}");

    // What `bacula-config --offsite` prints for the lab's inventory and client: its Admin job,
    // with the lab's binary and configuration instead of /usr/bin and /etc.
    let out = Command::new(env!("CARGO_BIN_EXE_vm-backup"))
        .args(["bacula-config", "--offsite", "--inventory"])
        .arg(etc.join("vm-list.yaml"))
        .args(["--client", "vmb-fd=127.0.0.1"])
        .output()
        .expect("run bacula-config");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{printed}");
    let start = printed
        .find("# The off-site copy")
        .unwrap_or_else(|| panic!("no off-site job in: {printed}"));
    let job = printed[start..].replace(
        "/usr/bin/vm-backup offsite push --all",
        &format!(
            "{} offsite push --all --config {}",
            env!("CARGO_BIN_EXE_vm-backup"),
            conf.display()
        ),
    );
    assert!(job.contains("Type = Admin"), "{job}");
    lab.drop_in("offsite", &job);
    struct DropIn;
    impl Drop for DropIn {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(format!("{LAB}/etc/dir.d/offsite.conf"));
        }
    }
    let _drop_in = DropIn;

    let (id, status) = lab.run("vm-backup-offsite-push");
    let log = lab.joblog(id);
    assert_eq!(status, 'T', "admin job log: {log}");
    let name = format!("{}/{AGENT}/{stamp}", vm_backup::format::layout::this_host());
    assert!(
        log.contains(&format!("{name}: pushed")),
        "the push's output is in the job log: {log}"
    );
    let out = vmb(&["offsite", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && listed.contains(&name), "{out:?}");
    let out = vmb(&["offsite", "verify", &AGENT, &stamp]);
    let verified = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && verified.contains("checked: ok"),
        "{out:?}"
    );
    lab.bconsole("reload\n");
    discard(&dir);
}

/// Runs a bconsole restore of backup job `id` into `where_` with the plugin restore option
/// `files=` set through `mod` → "Plugin Options" (13) → `mod` → files (1), and returns the
/// restore's JobId, status and job log. When the 9.6 Director loses the filled options (a
/// SQLite catalog cannot send an object of 3k+1 bytes), the plugin fails the job saying so and
/// the restore is run once more with a trailing comma, as the message advises.
fn restore_guest_files(lab: &Lab, id: u32, where_: &Path, files: &str) -> (u32, char, String) {
    let (rid, status, log) = restore_guest_files_once(lab, id, where_, files);
    if status == 'f' && log.contains("without their text") {
        assert!(log.contains("add a comma at the end of files="), "{log}");
        eprintln!("restore {rid}: options lost by the Director; again with a trailing comma");
        return restore_guest_files_once(lab, id, where_, &format!("{files},"));
    }
    (rid, status, log)
}

fn restore_guest_files_once(lab: &Lab, id: u32, where_: &Path, files: &str) -> (u32, char, String) {
    let out = lab.bconsole(&format!(
        "restore jobid={id} where={} all done\nmod\n13\nmod\n1\n{files}\nyes\nyes\n",
        where_.display()
    ));
    assert!(out.contains("Plugin Restore Options"), "{out}");
    assert!(out.contains("Plugin Options:  User specified"), "{out}");
    let rid: u32 = out
        .lines()
        .filter_map(|l| l.split("Job queued. JobId=").nth(1))
        .find_map(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("restore not queued: {out}"));
    let status = lab.wait(rid);
    (rid, status, lab.joblog(rid))
}

#[test]
fn plugin_restore_option_files_extracts_one_guest_file_into_where() {
    let Some(lab) = lab(
        "plugin_restore_option_files_extracts_one_guest_file_into_where",
        true,
    ) else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let restored = format!("{AGENT}-restored");
    let _ = support::virsh(&["destroy", &restored]);
    let _ = support::virsh(&["undefine", &restored, "--nvram"]);
    support::wait_agent(&AGENT, Duration::from_secs(120));
    // A known file on the agent's data disk (vda, ext4 on /mnt/data in the guest).
    let name = format!("bfr-{}.txt", std::process::id());
    let marker = format!("single-file restore {}", std::process::id());
    support::gexec_ok(
        &AGENT,
        &format!("echo '{marker}' > /mnt/data/{name} && chown 1234:2345 /mnt/data/{name} && chmod 0604 /mnt/data/{name} && sync"),
    );
    let stat = support::gexec_ok(&AGENT, &format!("stat -c '%u %g %a %Y' /mnt/data/{name}"));
    let (id, status) = lab.run(&format!("vm-{AGENT}"));
    assert_eq!(status, 'T', "{}", lab.joblog(id));
    let dir = folder_of(&lab.files(id), &AGENT);
    let robjects = lab.sql(&format!(
        "select ObjectName || ' ' || ObjectType from RestoreObject where JobId={id}"
    ));
    assert_eq!(robjects, "RestoreOptions 27", "the backup's restore object");
    support::gexec_ok(&AGENT, &format!("rm -f /mnt/data/{name} && sync"));

    let where_ = PathBuf::from(format!("{LAB}/restore/files-{id}"));
    let _ = std::fs::remove_dir_all(&where_);
    let t0 = Instant::now();
    let (rid, rstatus, log) = restore_guest_files(&lab, id, &where_, &format!("/{name}"));
    eprintln!(
        "single-file restore job {rid}: {rstatus} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(rstatus, 'T', "{log}");
    assert!(
        log.contains(&format!("vm-backup: extracted /{name} to ")),
        "{log}"
    );
    let got = where_.join(&name);
    assert_eq!(
        std::fs::read_to_string(&got).unwrap_or_default(),
        format!("{marker}\n"),
        "{log}"
    );
    let md = std::fs::metadata(&got).expect("extracted file");
    let want: Vec<&str> = stat.split_whitespace().collect();
    assert_eq!(md.uid().to_string(), want[0], "owner");
    assert_eq!(md.gid().to_string(), want[1], "group");
    assert_eq!(format!("{:o}", md.mode() & 0o7777), want[2], "mode");
    assert_eq!(md.mtime().to_string(), want[3], "mtime");
    // Nothing but the file: no disk image, no VM defined.
    assert_eq!(entries(&where_), vec![name.clone()], "{log}");
    assert!(!log.contains("as domain"), "{log}");
    assert!(
        support::virsh(&["dominfo", &restored]).status.code() != Some(0),
        "{restored} was defined"
    );

    // A path the backup does not hold fails the job, naming it.
    let missing = PathBuf::from(format!("{LAB}/restore/files-{id}-missing"));
    let _ = std::fs::remove_dir_all(&missing);
    let (_, mstatus, mlog) = restore_guest_files(&lab, id, &missing, "/no-such-file.txt");
    assert_eq!(mstatus, 'f', "{mlog}");
    assert!(
        mlog.contains("Fatal error") && mlog.contains("/no-such-file.txt"),
        "{mlog}"
    );
    let _ = std::fs::remove_dir_all(&where_);
    let _ = std::fs::remove_dir_all(&missing);
    discard(&dir);
}

#[test]
fn plugin_restore_option_files_in_stream_mode_extracts_from_the_staged_disk() {
    use std::os::unix::fs::MetadataExt;
    let Some(lab) = lab(
        "plugin_restore_option_files_in_stream_mode_extracts_from_the_staged_disk",
        true,
    ) else {
        return;
    };
    lab.drop_in(
        "zz-stream-files",
        &format!(
            "FileSet {{\n Name = \"stream-files-set\"\n Include {{\n  Plugin = \"vm-backup: vm={NOAGENT} mode=stream config={LAB}/etc/vm-backup.conf\"\n }}\n}}\n\
             Job {{\n Name = \"vm-stream-files\"\n JobDefs = \"VmBackup\"\n Client = \"vmb-fd\"\n FileSet = \"stream-files-set\"\n}}\n"
        ),
    );
    let (id, status) = lab.run("vm-stream-files");
    assert_eq!(status, 'T', "{}", lab.joblog(id));
    // The data disk's lost+found (ext4 on /mnt/data in the guest): a folder that stays the
    // same, unlike seq.log, which the noagent guest's writer appends to during the backup.
    let where_ = PathBuf::from(format!("{LAB}/restore/stream-files-{id}"));
    let _ = std::fs::remove_dir_all(&where_);
    let (_, rstatus, log) = restore_guest_files(&lab, id, &where_, "/lost+found");
    assert_eq!(rstatus, 'T', "{log}");
    assert!(
        log.contains("vm-backup: extracted /lost+found to "),
        "{log}"
    );
    let md = std::fs::metadata(where_.join("lost+found")).expect("extracted folder");
    assert!(md.is_dir(), "{log}");
    assert_eq!(format!("{:o}", md.mode() & 0o7777), "700", "{log}");
    // The staged disk image is gone: only the file and the (empty) VM folder remain.
    assert_eq!(
        entries(&where_),
        vec![NOAGENT.to_string(), "lost+found".to_string()],
        "{log}"
    );
    assert_eq!(
        entries(&where_.join(&*NOAGENT)),
        Vec::<String>::new(),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&where_);
    std::fs::remove_file(format!("{LAB}/etc/dir.d/zz-stream-files.conf")).ok();
    lab.bconsole("reload\n");
}
