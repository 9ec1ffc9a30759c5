//! Checkpoints (QEMU persistent dirty bitmaps named by libvirt) and push-mode backup jobs
//! (`virDomainBackupBegin`), for incremental and differential backups. The engine names every
//! checkpoint it creates with [`CHECKPOINT_PREFIX`] and never touches any other.

use std::path::Path;
use std::time::{Duration, Instant};

use virt::sys;

use super::{raw, Dom, LibvirtError};

/// The prefix of the checkpoints this tool creates (`vmb-<stamp>`).
pub const CHECKPOINT_PREFIX: &str = "vmb-";

/// The checkpoint name of a backup stamp.
pub fn checkpoint_name(stamp: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{stamp}")
}

/// Whether a checkpoint name is one of ours.
pub fn is_ours(name: &str) -> bool {
    name.starts_with(CHECKPOINT_PREFIX)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// `<domaincheckpoint>` naming `name` with a bitmap on each of `targets`.
pub fn checkpoint_xml(name: &str, targets: &[String]) -> String {
    let mut x = format!("<domaincheckpoint><name>{}</name><disks>", escape(name));
    for t in targets {
        x.push_str(&format!("<disk name='{}' checkpoint='bitmap'/>", escape(t)));
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

/// `<domainbackup mode='push'>`: the changes since checkpoint `since` of each `(target,
/// file)` written into a new qcow2 `file` (only the changed clusters are allocated); the
/// disks named in `full` are copied whole instead (`backupmode='full'`, libvirt ≥ 7.7: a
/// disk whose bitmap is missing or broken, or that was added or resized).
pub fn push_backup_xml(since: &str, disks: &[(String, &Path)], full: &[String]) -> String {
    let mut x = format!(
        "<domainbackup mode='push'><incremental>{}</incremental><disks>",
        escape(since)
    );
    for (t, f) in disks {
        x.push_str(&format!(
            "<disk name='{}' backup='yes' type='file'{}><driver type='qcow2'/><target file='{}'/></disk>",
            escape(t),
            if full.contains(t) {
                " backupmode='full'"
            } else {
                ""
            },
            escape(&f.to_string_lossy())
        ));
    }
    x.push_str("</disks></domainbackup>");
    x
}

impl Dom {
    /// Names of every checkpoint of the domain (ours and others').
    pub fn checkpoint_names(&self) -> Result<Vec<String>, LibvirtError> {
        raw::checkpoint_names(&self.dom).map_err(|e| self.err("listing checkpoints", e))
    }

    /// Creates a checkpoint with a bitmap on each of `targets` (quiesced through the agent
    /// when asked: the freeze lasts only the checkpoint creation).
    pub fn create_checkpoint(
        &self,
        name: &str,
        targets: &[String],
        quiesce: bool,
    ) -> Result<(), LibvirtError> {
        raw::checkpoint_create(&self.dom, &checkpoint_xml(name, targets), quiesce)
            .map_err(|e| self.err(format!("creating checkpoint {name}"), e))
    }

    /// Deletes a checkpoint of ours; refuses any other (never touches checkpoints it did not
    /// create).
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), LibvirtError> {
        if !is_ours(name) {
            return Err(LibvirtError::Call {
                vm: self.name.clone(),
                op: format!("deleting checkpoint {name}"),
                message: format!("not created by vm-backup (no {CHECKPOINT_PREFIX} prefix)"),
            });
        }
        raw::checkpoint_delete(&self.dom, name, false)
            .map_err(|e| self.err(format!("deleting checkpoint {name}"), e))
    }

    /// Deletes only libvirt's record of a checkpoint of ours, for one whose bitmap is gone
    /// from a disk (libvirt then refuses the normal delete): the bitmaps it had on the other
    /// disks stay in those images.
    pub fn forget_checkpoint(&self, name: &str) -> Result<(), LibvirtError> {
        if !is_ours(name) {
            return Err(LibvirtError::Call {
                vm: self.name.clone(),
                op: format!("forgetting checkpoint {name}"),
                message: format!("not created by vm-backup (no {CHECKPOINT_PREFIX} prefix)"),
            });
        }
        raw::checkpoint_delete(&self.dom, name, true)
            .map_err(|e| self.err(format!("forgetting checkpoint {name}"), e))
    }

    /// Starts a push-mode backup job of the changes since `since` into the given files (the
    /// disks in `full` copied whole), creating the checkpoint `new_checkpoint` at the same
    /// instant (when given).
    pub fn begin_push_backup(
        &self,
        since: &str,
        disks: &[(String, &Path)],
        full: &[String],
        new_checkpoint: Option<(&str, &[String])>,
    ) -> Result<(), LibvirtError> {
        let ck = new_checkpoint.map(|(n, t)| checkpoint_xml(n, t));
        raw::backup_begin(
            &self.dom,
            &push_backup_xml(since, disks, full),
            ck.as_deref(),
        )
        .map_err(|e| {
            self.err(
                format!("starting the backup job (changes since {since})"),
                e,
            )
        })
    }

    /// Freezes the guest filesystems through the agent; returns how many were frozen.
    pub fn fs_freeze(&self) -> Result<u32, LibvirtError> {
        raw::fs_freeze(&self.dom).map_err(|e| self.err("freezing the guest filesystems", e))
    }

    /// Whether a job (a backup job here) runs on the domain.
    pub fn has_job(&self) -> Result<bool, LibvirtError> {
        let info = self
            .dom
            .job_info()
            .map_err(|e| self.err("reading the domain job", e))?;
        Ok(info.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
    }

    /// Aborts the domain's job (a backup job: its checkpoint stays, its target is partial).
    pub fn abort_domain_job(&self) -> Result<(), LibvirtError> {
        raw::abort_domain_job(&self.dom).map_err(|e| self.err("aborting the backup job", e))
    }

    /// Waits at most `bound` for the domain's job to end, polling `cancelled`; then checks
    /// that it completed (a failed or cancelled job is an error with libvirt's message).
    pub fn wait_job(
        &self,
        bound: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), LibvirtError> {
        let t = Instant::now();
        while self.has_job()? {
            if cancelled() {
                return Err(LibvirtError::Cancelled(format!(
                    "the backup job of {:?}",
                    self.name
                )));
            }
            if t.elapsed() > bound {
                return Err(LibvirtError::Timeout {
                    what: format!("the backup job of {:?}", self.name),
                    seconds: bound.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let stats = self
            .dom
            .job_stats(sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
            .map_err(|e| self.err("reading the completed backup job", e))?;
        if stats.r#type == sys::VIR_DOMAIN_JOB_COMPLETED as i32 {
            return Ok(());
        }
        Err(LibvirtError::Call {
            vm: self.name.clone(),
            op: "the backup job".into(),
            message: stats
                .error_message
                .unwrap_or_else(|| format!("it ended with job type {}", stats.r#type)),
        })
    }
}

/// The disk whose bitmap libvirt refused, from its error message (`checkpoint inconsistent:
/// missing or broken bitmap 'C' for disk 'vda'`, `bitmap 'C' not found in backing chain of
/// 'vda'`). Pure.
pub fn refused_bitmap_disk(message: &str) -> Option<String> {
    if !message.contains("bitmap") {
        return None;
    }
    let tail = ["for disk '", "backing chain of '"]
        .iter()
        .find_map(|m| message.rfind(m).map(|i| &message[i + m.len()..]))?;
    let disk = &tail[..tail.find('\'')?];
    (!disk.is_empty()).then(|| disk.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_names_every_disk_and_escapes() {
        let x = checkpoint_xml("vmb-1", &["vda".into(), "vdb".into()]);
        assert!(x.contains("<name>vmb-1</name>"));
        assert!(x.contains("<disk name='vdb' checkpoint='bitmap'/>"));
        let p = Path::new("/t/a'b.qcow2");
        let b = push_backup_xml("vmb-1", &[("vda".into(), p)], &[]);
        assert!(b.contains("<incremental>vmb-1</incremental>"));
        assert!(b.contains("file='/t/a&apos;b.qcow2'"), "{b}");
        assert!(!b.contains("backupmode"), "{b}");
        let q = Path::new("/t/b.qcow2");
        let m = push_backup_xml(
            "vmb-1",
            &[("vda".into(), p), ("vdb".into(), q)],
            &["vdb".into()],
        );
        assert!(
            m.contains("<disk name='vdb' backup='yes' type='file' backupmode='full'>"),
            "{m}"
        );
        assert!(
            m.contains("<disk name='vda' backup='yes' type='file'><driver"),
            "{m}"
        );
    }

    #[test]
    fn the_disk_of_a_refused_bitmap_is_found() {
        assert_eq!(
            refused_bitmap_disk(
                "operation failed: checkpoint inconsistent: missing or broken bitmap 'c3' for disk 'vda'"
            )
            .as_deref(),
            Some("vda")
        );
        assert_eq!(
            refused_bitmap_disk(
                "internal error: bitmap 'vmb-1' not found in backing chain of 'vdb'"
            )
            .as_deref(),
            Some("vdb")
        );
        assert_eq!(refused_bitmap_disk("domain is not running"), None);
    }

    #[test]
    fn only_prefixed_names_are_ours() {
        assert!(is_ours(&checkpoint_name("2026-01-01-000000")));
        assert!(!is_ours("c1"));
    }
}
