//! Helpers shared by the lab tests (`tests/lab_*.rs`), used with `mod support;`.
//!
//! The lab itself is brought up by `lab/libvirt-lab.sh up [PREFIX]` (see `scripts/test.sh`);
//! these helpers only talk to it. They shell out to `virsh` and to the lab script on purpose:
//! tests are not the product, and an independent path to libvirt makes a better witness of what
//! the engine did than the engine's own bindings.
//!
//! Domains of a prefix `P` (env `VMB_LAB_PREFIX`, default `vmb`):
//! - `P-agent`: qemu-ga, one qcow2 data disk (vda, ext4, `/seed.txt`), the writer appending
//!   `1, 2, 3 …` to `/mnt/data/seq.log`, the fsfreeze hook logging to `/run/freeze.log`;
//! - `P-noagent`: same guest without an agent channel (stands in for an ASAv), qcow2 vda;
//! - `P-uefi`: q35 + OVMF + NVRAM file, a blank qcow2 vda, no agent (sits in the UEFI shell);
//! - `P-multi`: agent; vda qcow2, vdb qcow2 with a backing file, vdc raw, hdc cdrom (ISO).
//!
//! Disks live in `/var/lib/vm-backup-lab/P/` (see [`lab_dir`]).

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Root of every lab file on the machine (daemons, guest, one folder per prefix).
pub const LAB_ROOT: &str = "/var/lib/vm-backup-lab";

/// True when the libvirt lab is up (`VMB_LAB_LIBVIRT=1`); otherwise prints a visible SKIP line
/// naming `test` and returns false, so a test can `if !lab_enabled("x") { return; }`.
pub fn lab_enabled(test: &str) -> bool {
    if std::env::var("VMB_LAB_LIBVIRT").as_deref() == Ok("1") {
        true
    } else {
        eprintln!("SKIP: {test}: libvirt lab not enabled (run lab/libvirt-lab.sh up, then set VMB_LAB_LIBVIRT=1)");
        false
    }
}

/// The lab prefix (`VMB_LAB_PREFIX`, default `vmb`).
pub fn prefix() -> String {
    std::env::var("VMB_LAB_PREFIX").unwrap_or_else(|_| "vmb".to_string())
}

/// Name of the lab domain of a kind (`agent`, `noagent`, `uefi`, `multi`): `<prefix>-<kind>`.
pub fn dom(kind: &str) -> String {
    format!("{}-{kind}", prefix())
}

/// `<prefix>-agent`: the guest with qemu-ga, one qcow2 data disk and the writer.
pub fn agent_dom() -> String {
    dom("agent")
}

/// `<prefix>-noagent`: no guest agent channel (ASAv stand-in).
pub fn noagent_dom() -> String {
    dom("noagent")
}

/// `<prefix>-uefi`: OVMF firmware with an NVRAM file.
pub fn uefi_dom() -> String {
    dom("uefi")
}

/// `<prefix>-multi`: several disks (qcow2, qcow2 with backing file, raw, cdrom) and an agent.
pub fn multi_dom() -> String {
    dom("multi")
}

/// Folder holding the prefix's disks, NVRAM, domain XML and console logs.
pub fn lab_dir() -> PathBuf {
    Path::new(LAB_ROOT).join(prefix())
}

/// Path of `lab/libvirt-lab.sh` in this checkout.
pub fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/libvirt-lab.sh")
}

/// A `Command` for the `vm-backup` binary built for these tests.
pub fn vm_backup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vm-backup"))
}

fn run(mut cmd: Command, what: &str) -> Output {
    cmd.env("LIBVIRT_DEFAULT_URI", "qemu:///system");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `lab/libvirt-lab.sh ARGS` and returns its output, whatever its exit status.
pub fn run_lab(args: &[&str]) -> Output {
    let mut cmd = Command::new(lab_script());
    cmd.args(args);
    run(cmd, &format!("lab/libvirt-lab.sh {args:?}"))
}

/// Runs `lab/libvirt-lab.sh ARGS`, panics with its stderr unless it succeeds, returns stdout.
pub fn run_lab_ok(args: &[&str]) -> String {
    let out = run_lab(args);
    assert!(
        out.status.success(),
        "lab/libvirt-lab.sh {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `virsh -c qemu:///system ARGS`, whatever its exit status.
pub fn virsh(args: &[&str]) -> Output {
    let mut cmd = Command::new("virsh");
    cmd.arg("-c").arg("qemu:///system").args(args);
    run(cmd, &format!("virsh {args:?}"))
}

/// Runs `virsh ARGS`, panics with its stderr unless it succeeds, returns stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `virsh domstate DOM` (e.g. `running`, `shut off`).
pub fn domstate(dom: &str) -> String {
    virsh_ok(&["domstate", dom]).trim().to_string()
}

/// Waits until `virsh domstate DOM` reads `state` (e.g. `shut off`), at most `timeout`;
/// panics with the last state otherwise.
pub fn wait_state(dom: &str, state: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = domstate(dom);
        if now == state {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dom} still '{now}' after {timeout:?}, expected '{state}'"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a shut-off domain and, when it has an agent, waits for `guest-ping` (60 s).
pub fn start_and_wait(dom: &str) {
    virsh_ok(&["start", dom]);
    if virsh_ok(&["dumpxml", dom]).contains("org.qemu.guest_agent.0") {
        wait_agent(dom, Duration::from_secs(60));
    }
}

/// Shuts a guest down cleanly through its agent (`virsh shutdown --mode agent`: the lab guest
/// stops its writer, syncs and unmounts) and waits until it is shut off (30 s).
pub fn shutdown_wait(dom: &str) {
    virsh_ok(&["shutdown", dom, "--mode", "agent"]);
    wait_state(dom, "shut off", Duration::from_secs(30));
}

/// True when the domain's guest agent answers `guest-ping` within 5 s.
pub fn agent_ping(dom: &str) -> bool {
    virsh(&[
        "qemu-agent-command",
        dom,
        r#"{"execute":"guest-ping"}"#,
        "--timeout",
        "5",
    ])
    .status
    .success()
}

/// Waits until the guest agent answers `guest-ping`, at most `timeout` (panics otherwise, with
/// the domain state and the end of its console log).
pub fn wait_agent(dom: &str, timeout: Duration) {
    let secs = timeout.as_secs().max(1).to_string();
    run_lab_ok(&["wait-agent", dom, &secs]);
}

/// Result of a guest command run through the agent.
#[derive(Debug, Clone)]
pub struct Gexec {
    /// Exit code of `/bin/sh -c CMD` in the guest (255 if unknown).
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error (plus the lab script's own messages, if any).
    pub stderr: String,
}

/// Runs `/bin/sh -c CMD` in the guest through qemu-ga (guest-exec + guest-exec-status).
/// To leave something running in the guest, detach its output: `cmd >/dev/null 2>&1 &`
/// (the agent waits for the captured output pipes to close).
pub fn gexec(dom: &str, cmd: &str) -> Gexec {
    let out = run_lab(&["gexec", dom, cmd]);
    Gexec {
        code: out.status.code().unwrap_or(255),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// Like [`gexec`] but panics unless the command exits 0; returns its stdout.
pub fn gexec_ok(dom: &str, cmd: &str) -> String {
    let r = gexec(dom, cmd);
    assert_eq!(
        r.code, 0,
        "guest command on {dom} failed: {cmd}\n{}",
        r.stderr
    );
    r.stdout
}

/// Stops the guest agent (SIGSTOP of qemu-ga) for `duration` (whole seconds); it resumes by
/// itself (a timer in the guest). Commands libvirt sent meanwhile may be executed late: a
/// freeze that libvirt reported as timed out can freeze the guest when the agent resumes.
pub fn agent_hang(dom: &str, duration: Duration) {
    run_lab_ok(&["agent-hang", dom, &duration.as_secs().to_string()]);
}

/// `guest-fsfreeze-status` of the guest (`thawed` / `frozen`), `None` if the agent does not answer.
pub fn fsfreeze_status(dom: &str) -> Option<String> {
    let out = virsh(&[
        "qemu-agent-command",
        dom,
        r#"{"execute":"guest-fsfreeze-status"}"#,
        "--timeout",
        "5",
    ]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["return"].as_str().map(str::to_string)
}

/// What the writer's `/mnt/data/seq.log` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqCheck {
    /// First number in the file.
    pub first: u64,
    /// Last number in the file.
    pub last: u64,
    /// How many times a line is not the previous one plus one (0 = nothing lost or repeated).
    pub gaps: u64,
    /// Number of lines.
    pub lines: u64,
}

impl SeqCheck {
    /// Parses the summary line `first=F last=L gaps=G lines=N`.
    pub fn parse(s: &str) -> Option<SeqCheck> {
        let line = s.lines().rev().find(|l| l.starts_with("first="))?;
        let mut v = [0u64; 4];
        for (i, key) in ["first", "last", "gaps", "lines"].iter().enumerate() {
            let field = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))?;
            v[i] = field.parse().ok()?;
        }
        Some(SeqCheck {
            first: v[0],
            last: v[1],
            gaps: v[2],
            lines: v[3],
        })
    }
}

/// Reads the writer's sequence file in the guest (`/mnt/data/seq.log`) and summarises it.
pub fn seq_check(dom: &str) -> SeqCheck {
    let out = run_lab_ok(&["seq-check", dom]);
    SeqCheck::parse(&out).unwrap_or_else(|| panic!("unexpected seq-check output: {out}"))
}

/// Lines of the guest's `/run/freeze.log` (`freeze <uptime>` / `thaw <uptime>`), oldest first.
pub fn freeze_log(dom: &str) -> Vec<String> {
    gexec_ok(dom, "cat /run/freeze.log 2>/dev/null; true")
        .lines()
        .map(str::to_string)
        .collect()
}

/// One row of `virsh domblklist --details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkDev {
    /// `file`, `block`, …
    pub kind: String,
    /// `disk`, `cdrom`, …
    pub device: String,
    /// Target device name (`vda`, `hdc`).
    pub target: String,
    /// Source path, `-` when empty.
    pub source: String,
}

/// The block devices a domain runs on (`virsh domblklist DOM --details`; add `inactive` for the
/// persistent definition). After a backup the sources must be the original images again.
pub fn domblklist(dom: &str, inactive: bool) -> Vec<BlkDev> {
    let mut args = vec!["domblklist", dom, "--details"];
    if inactive {
        args.push("--inactive");
    }
    virsh_ok(&args)
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| BlkDev {
                kind: f[0].to_string(),
                device: f[1].to_string(),
                target: f[2].to_string(),
                source: f[3..].join(" "),
            })
        })
        .collect()
}

/// `(target, source)` of every disk (not cdrom) of the running domain.
pub fn disk_sources(dom: &str) -> Vec<(String, String)> {
    domblklist(dom, false)
        .into_iter()
        .filter(|d| d.device == "disk")
        .map(|d| (d.target, d.source))
        .collect()
}

/// True when the live (or, with `inactive`, persistent) XML still names a backing store of a
/// disk, i.e. an external snapshot overlay was left uncommitted. The lab's `multi` domain has a
/// real backing file on vdb, so check a domain without one (agent, noagent, uefi).
pub fn has_backing_store(dom: &str, inactive: bool) -> bool {
    let mut args = vec!["dumpxml", dom];
    if inactive {
        args.push("--inactive");
    }
    virsh_ok(&args).contains("<backingStore type=")
}

/// Number of images in the backing chain of a disk image (`qemu-img info -U --backing-chain`).
pub fn backing_chain_len(image: &Path) -> usize {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(image);
    let out = run(cmd, "qemu-img info");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        image.display(),
        text(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON");
    v.as_array().map_or(1, Vec::len)
}

/// Reads `path` from the ext4 filesystem in disk image `image` (qcow2 or raw), offline with
/// `qemu-img convert -U` + `debugfs`. `None` when the file does not exist.
pub fn ext4_cat(image: &Path, path: &str) -> Option<Vec<u8>> {
    let img = image.to_string_lossy();
    let out = run_lab(&["ext4-cat", &img, path]);
    out.status.success().then_some(out.stdout)
}

/// The SHA-256 of every file under `dir` (path relative to `dir` → hex digest), to show that
/// a folder is byte-identical before and after something read it.
pub fn tree_digests(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read a folder").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let mut f = std::fs::File::open(&p).expect("open a file");
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h).expect("read a file");
                let rel = p.strip_prefix(dir).expect("under the folder").to_path_buf();
                out.insert(rel, hex::encode(h.finalize()));
            }
        }
    }
    out
}

/// Freezes the guest's filesystems (`virsh domfsfreeze`); thaws them when dropped, so a failing
/// assertion never leaves a lab guest frozen.
pub struct Frozen(pub String);

impl Frozen {
    /// Freezes `dom`; panics if libvirt refuses.
    pub fn new(dom: &str) -> Frozen {
        virsh_ok(&["domfsfreeze", dom]);
        Frozen(dom.to_string())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = virsh(&["domfsthaw", &self.0]);
    }
}

/// A small or failing backup target mounted by `lab/share.sh` (root); unmounted and deleted
/// when dropped.
pub struct Share {
    /// The mount point.
    pub dir: PathBuf,
}

impl Share {
    fn script(args: &[&str]) -> Output {
        let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/share.sh"));
        cmd.args(args);
        run(cmd, &format!("lab/share.sh {args:?}"))
    }

    fn script_ok(args: &[&str]) {
        let out = Share::script(args);
        assert!(
            out.status.success(),
            "lab/share.sh {args:?} failed: {}",
            text(&out.stderr)
        );
    }

    /// Mounts a filesystem of `size` (e.g. `"20M"`) on `dir`: loop ext4, or tmpfs with `tmpfs`.
    /// Writing more than it holds fails with ENOSPC.
    pub fn full(dir: &Path, size: &str, tmpfs: bool) -> Share {
        let d = dir.to_string_lossy();
        let mut args = vec!["mkfull", &*d, size];
        if tmpfs {
            args.push("--tmpfs");
        }
        Share::script_ok(&args);
        Share {
            dir: dir.to_path_buf(),
        }
    }

    /// Mounts the FUSE pass-through share on `dir` with fault options such as
    /// `["--fail-after", "1048576", "--errno", "EIO"]` or `["--fail-fsync"]` (none: healthy).
    pub fn faulty(dir: &Path, fault: &[&str]) -> Share {
        let d = dir.to_string_lossy();
        let mut args = vec!["faulty", &*d];
        args.extend_from_slice(fault);
        Share::script_ok(&args);
        Share {
            dir: dir.to_path_buf(),
        }
    }

    /// Changes the fault of a faulty share (`["--off"]` to heal it); byte counts start now.
    pub fn set_fault(&self, fault: &[&str]) {
        let d = self.dir.to_string_lossy();
        let mut args = vec!["fault", &*d];
        args.extend_from_slice(fault);
        Share::script_ok(&args);
    }

    /// The share disappears (lazy unmount, FUSE server killed: open files get ENOTCONN); its
    /// content is kept for [`Share::remount`].
    pub fn vanish(&self) {
        Share::script_ok(&["vanish", &self.dir.to_string_lossy()]);
    }

    /// Mounts a vanished share again, healthy, with its content.
    pub fn remount(&self) {
        Share::script_ok(&["remount", &self.dir.to_string_lossy()]);
    }

    /// The folder holding the share's content (what the FUSE mount passes through to).
    pub fn backing(&self) -> PathBuf {
        let key = self
            .dir
            .canonicalize()
            .unwrap_or_else(|_| self.dir.clone())
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "_");
        let root =
            std::env::var("VMB_LAB_ROOT").unwrap_or_else(|_| "/var/lib/vm-backup-lab".into());
        Path::new(&root)
            .join("shares")
            .join(format!("{key}.backing"))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = Share::script(&["umount", &self.dir.to_string_lossy()]);
    }
}

/// The QEMU node name of the qcow2 format layer of `image` in the running domain (QMP
/// `query-named-block-nodes`).
pub fn format_node(dom: &str, image: &str) -> String {
    let out = virsh_ok(&[
        "qemu-monitor-command",
        dom,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("QMP answer");
    v["return"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["drv"] == "qcow2" && n["file"] == image)
        .and_then(|n| n["node-name"].as_str())
        .unwrap_or_else(|| panic!("no qcow2 node for {image} in {dom}: {out}"))
        .to_string()
}

/// Removes the persistent dirty bitmap `name` from `image` of the running domain behind
/// libvirt's back (QMP `block-dirty-bitmap-remove`): a bitmap lost "by hand".
pub fn remove_bitmap_live(dom: &str, image: &str, name: &str) {
    let cmd = serde_json::json!({
        "execute": "block-dirty-bitmap-remove",
        "arguments": {"node": format_node(dom, image), "name": name},
    });
    virsh_ok(&["qemu-monitor-command", dom, &cmd.to_string()]);
}

/// Standard output and standard error of a finished command, as text.
pub fn texts(out: &Output) -> (String, String) {
    (text(&out.stdout), text(&out.stderr))
}

/// The `vmb-*` checkpoints (ours) of a domain.
pub fn our_checkpoints(dom: &str) -> Vec<String> {
    let names = virsh(&["checkpoint-list", dom, "--name"]);
    text(&names.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("vmb-"))
        .map(str::to_string)
        .collect()
}

/// Deletes our checkpoints (`vmb-*`) of a shared lab domain, so that the next test starts
/// without them (a checkpoint whose bitmap a test removed is only forgotten by libvirt).
pub fn drop_our_checkpoints(dom: &str) {
    for c in our_checkpoints(dom) {
        if !virsh(&["checkpoint-delete", dom, &c]).status.success() {
            let _ = virsh(&["checkpoint-delete", dom, &c, "--metadata"]);
        }
    }
}

/// An initialised backup target for one test, with its own configuration (host `labhost`,
/// journal and inventory beside it) in `/var/tmp/vmb-<prefix>-<test>-<pid>/` (mode 0755, so
/// QEMU can reach restored disks there); `vm-backup` runs with that configuration
/// (`VM_BACKUP_CONFIG`). Dropped, also when an assertion failed: `orphans --cleanup`, the
/// domains the test defined destroyed and undefined, our checkpoints removed from the shared
/// domains named in `checkpoints_of`, then the folder, unless a mount, loop device or
/// image server still uses it (removing it then would hang or fail).
pub struct LabTarget {
    /// The scratch folder: `target/`, `journal/`, `vm-backup.conf`, anything the test adds.
    pub dir: PathBuf,
    /// Domains the test defined (destroyed and undefined on drop).
    pub domains: Vec<String>,
    /// A shared lab domain whose `vmb-*` checkpoints the test creates (removed on drop).
    pub checkpoints_of: Option<String>,
}

impl LabTarget {
    /// A fresh scratch folder for `test` with an initialised target and the usual settings.
    pub fn new(test: &str) -> LabTarget {
        LabTarget::with_settings(test, "")
    }

    /// Like [`LabTarget::new`], with `extra` (TOML lines, e.g. a `[test_restore]` section,
    /// where `{d}` stands for the scratch folder) appended to the configuration.
    pub fn with_settings(test: &str, extra: &str) -> LabTarget {
        use std::os::unix::fs::PermissionsExt;
        let dir = PathBuf::from(format!(
            "/var/tmp/vmb-{}-{test}-{}",
            prefix(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("target")).expect("create the scratch target");
        vm_backup::store::FolderStore::init(dir.join("target"), None).expect("init the target");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the scratch folder");
        let d = dir.display().to_string();
        let conf = format!(
            "target = \"{d}/target\"\nhostname = \"labhost\"\njournal_dir = \"{d}/journal\"\n\
             inventory = \"{d}/vm-list.yaml\"\n{}",
            extra.replace("{d}", &d)
        );
        std::fs::write(dir.join("vm-backup.conf"), conf).expect("write vm-backup.conf");
        LabTarget {
            dir,
            domains: Vec::new(),
            checkpoints_of: None,
        }
    }

    /// The configuration file.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("vm-backup.conf")
    }

    /// The backup target.
    pub fn target(&self) -> PathBuf {
        self.dir.join("target")
    }

    /// The folder of a VM's backups on the target.
    pub fn vm_dir(&self, dom: &str) -> PathBuf {
        self.target().join("labhost").join(dom)
    }

    /// A `vm-backup ARGS` command with this configuration.
    pub fn vmb_cmd(&self, args: &[&str]) -> Command {
        let mut c = vm_backup();
        c.env("VM_BACKUP_CONFIG", self.conf()).args(args);
        c
    }

    /// Runs `vm-backup ARGS`, whatever its exit status.
    pub fn vmb(&self, args: &[&str]) -> Output {
        self.vmb_cmd(args).output().expect("run vm-backup")
    }

    /// Runs `vm-backup ARGS`; panics with its output unless it succeeds; returns stdout.
    pub fn vmb_ok(&self, args: &[&str]) -> String {
        let out = self.vmb(args);
        let (o, e) = texts(&out);
        assert!(out.status.success(), "vm-backup {args:?} failed:\n{o}\n{e}");
        o
    }

    /// The newest published backup folder of `dom`.
    pub fn latest(&self, dom: &str) -> PathBuf {
        let vm_dir = self.vm_dir(dom);
        let stamp = vm_backup::format::layout::VmDir {
            path: vm_dir.clone(),
        }
        .latest()
        .expect("read the VM folder")
        .expect("a published backup");
        vm_dir.join(stamp)
    }

    /// A real `vm-backup backup DOM` that must succeed; returns the new backup folder.
    pub fn backup(&self, dom: &str) -> PathBuf {
        self.backup_with(dom, &[])
    }

    /// `vm-backup backup DOM EXTRA…` that must succeed; returns the new backup folder.
    pub fn backup_with(&self, dom: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["backup", dom];
        args.extend_from_slice(extra);
        self.vmb_ok(&args);
        self.latest(dom)
    }

    /// A crash-consistent backup (`--method snapshot`, no freeze) of the agent guest `dom`,
    /// taken right after the guest wrote `content` to `/mnt/data/<dir>/note.txt` (a new folder)
    /// and fsynced it: ext4 commits the change to its journal, and the guest kernel writes the
    /// metadata in place only ~30 s later, so the backup holds it in the journal only. Checked
    /// offline (`debugfs`, which never replays): the file must be missing from the image, else
    /// the attempt is repeated with a new folder (at most 3). Returns the backup folder and the
    /// folder's name used.
    pub fn backup_with_unreplayed_journal(
        &self,
        dom: &str,
        dir: &str,
        content: &str,
    ) -> (PathBuf, String) {
        for attempt in 1..=3 {
            let name = format!("{dir}{attempt}");
            gexec_ok(
                dom,
                &format!(
                    "mkdir /mnt/data/{name} && echo '{content}' | dd of=/mnt/data/{name}/note.txt conv=fsync 2>/dev/null"
                ),
            );
            let folder = self.backup_with(dom, &["--method", "snapshot"]);
            let image = folder.join(format!("{dom}-vda.qcow2"));
            if ext4_cat(&image, &format!("/{name}/note.txt")).is_none() {
                return (folder, name);
            }
            eprintln!(
                "attempt {attempt}: /{name}/note.txt already in place in {}",
                folder.display()
            );
        }
        panic!("no backup of {dom} left the new file in the ext4 journal only (3 attempts)");
    }

    /// Remembers a domain to destroy and undefine at the end.
    pub fn owns(&mut self, dom: &str) {
        self.domains.push(dom.to_string());
    }

    /// What still uses the scratch folder: loop devices, mounts, `qemu-storage-daemon` or
    /// verify-on-read processes serving from it.
    pub fn leftovers(&self) -> Vec<String> {
        let d = self.dir.display().to_string();
        let mut out = Vec::new();
        if let Ok(loops) = Command::new("losetup").arg("-a").output() {
            for l in text(&loops.stdout).lines().filter(|l| l.contains(&d)) {
                out.push(format!("loop: {l}"));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mounts.lines().filter(|l| l.contains(&d)) {
            out.push(format!("mount: {l}"));
        }
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
                let c = text(&c).replace('\0', " ");
                if c.contains(&d)
                    && (c.contains("qemu-storage-daemon") || c.contains("verified-serve"))
                {
                    out.push(format!("process: {c}"));
                }
            }
        }
        out
    }
}

impl Drop for LabTarget {
    fn drop(&mut self) {
        let _ = self.vmb(&["orphans", "--cleanup"]);
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&[
                "undefine",
                d,
                "--nvram",
                "--checkpoints-metadata",
                "--snapshots-metadata",
            ]);
        }
        if let Some(dom) = &self.checkpoints_of {
            drop_our_checkpoints(dom);
        }
        if self.leftovers().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_copies_reads_the_run_log_order() {
        let seq = "t INFO copying vda (/l/a.qcow2, 1 bytes allocated, 2 virtual) to x-vda.qcow2\n\
                   t INFO vda copied: 1 bytes in 0.1 s (1 MiB/s, uring), sha256 0\n\
                   t INFO copying vdb (/l/b.qcow2, 1 bytes allocated, 2 virtual) to x-vdb.qcow2\n\
                   t INFO copying vdb's backing image /l/c (qcow2, depth 1, 1 bytes allocated) to y\n\
                   t INFO vdb copied: 1 bytes in 0.1 s (1 MiB/s, uring), sha256 0\n";
        assert_eq!(copy_events(seq).len(), 4);
        assert_eq!(overlapping_copies(seq), None);
        let par = "t INFO copying vda (/l/a.qcow2, 1 bytes allocated, 2 virtual) to x-vda.qcow2\n\
                   t INFO copying vdb (/l/b.qcow2, 1 bytes allocated, 2 virtual) to x-vdb.qcow2\n\
                   t INFO vdb copied: 1 bytes in 0.1 s (1 MiB/s, uring), sha256 0\n\
                   t INFO vda copied: 1 bytes in 0.1 s (1 MiB/s, uring), sha256 0\n";
        assert_eq!(overlapping_copies(par), Some(("vda".into(), "vdb".into())));
    }

    #[test]
    fn seq_check_summary_parses() {
        let s = "gap after 3: 5\nfirst=1 last=9 gaps=1 lines=8\n";
        assert_eq!(
            SeqCheck::parse(s),
            Some(SeqCheck {
                first: 1,
                last: 9,
                gaps: 1,
                lines: 8
            })
        );
        assert_eq!(SeqCheck::parse("garbage"), None);
    }
}

/// The lab's S3-compatible server (`lab/s3-lab.sh start`; `eval "$(lab/s3-lab.sh env)"`):
/// endpoint, bucket and the folder where the server keeps the bucket's objects as files.
#[derive(Debug, Clone)]
pub struct S3Lab {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The bucket's folder on this machine (s3s-fs stores each object as a plain file).
    pub data: PathBuf,
}

/// The S3 lab when its environment is set (`VMB_S3_ENDPOINT`, `VMB_S3_BUCKET`,
/// `VMB_S3_DATA`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`); otherwise prints a visible
/// SKIP line naming `test` and returns `None`.
pub fn s3_lab(test: &str) -> Option<S3Lab> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        var("VMB_S3_ENDPOINT"),
        var("VMB_S3_BUCKET"),
        var("VMB_S3_DATA"),
        var("AWS_ACCESS_KEY_ID"),
    ) {
        (Some(endpoint), Some(bucket), Some(data), Some(_)) => Some(S3Lab {
            endpoint,
            bucket,
            data: PathBuf::from(data),
        }),
        _ => {
            eprintln!("SKIP: {test}: S3 lab not enabled (lab/s3-lab.sh start; eval \"$(lab/s3-lab.sh env)\")");
            None
        }
    }
}

/// The disk copies of a backup's run log (`backup.log`), in the order the engine logged them:
/// `(disk, true)` when its copy began (`copying vda (…`), `(disk, false)` when its image was
/// copied (`vda copied: …`; backing images are not counted).
pub fn copy_events(log: &str) -> Vec<(String, bool)> {
    let mut events = Vec::new();
    for line in log.lines() {
        // "<timestamp> INFO <text>"
        let Some(text) = line.splitn(3, ' ').nth(2) else {
            continue;
        };
        if let Some(rest) = text.strip_prefix("copying ") {
            if let Some((disk, _)) = rest.split_once(" (") {
                if !disk.contains(' ') && !disk.contains('\'') {
                    events.push((disk.to_string(), true));
                }
            }
        } else if let Some((disk, _)) = text.split_once(" copied: ") {
            if !disk.contains(' ') {
                events.push((disk.to_string(), false));
            }
        }
    }
    events
}

/// Two disks whose copies overlapped in a run log's [`copy_events`]: the second's copy began
/// before the first's ended (from the engine's own order of events, not from timings).
pub fn overlapping_copies(log: &str) -> Option<(String, String)> {
    let events = copy_events(log);
    for (i, (a, start)) in events.iter().enumerate() {
        if !start {
            continue;
        }
        let end = events[i..].iter().position(|(d, s)| d == a && !s)? + i;
        if let Some((b, _)) = events[i + 1..end].iter().find(|(d, s)| *s && d != a) {
            return Some((a.clone(), b.clone()));
        }
    }
    None
}
