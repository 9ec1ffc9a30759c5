//! Direct mode: the engine writes the backup folder itself (`<stamp>.partial/` → copy →
//! commit → XML, NVRAM, configs, checksums, metadata, log → post-checks on the `.partial`
//! folder, re-read from the share → fsync → rename → domain post-check).
//!
//! Only what passed is published: the post-checks (chunk hashes against the manifests,
//! `checksums.sha256`, `qemu-img check`) run on the `.partial` files after they were flushed
//! and dropped from the page cache, before the final rename. A copy that fails them is a
//! failed run (exit 2, kind `corrupt`): its `.partial` folder is removed like after any other
//! failure, so nothing that failed is ever listed, counted by prune or restored.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Local;

use crate::format::layout::{self, VmDir};
use crate::format::metadata::{self, BackupMetadata, DiskRecord};
use crate::progress::Level;
use crate::store::{FolderStore, PartialBackup};
use crate::ExitStatus;

use super::checks;
use super::guards::PartialFolder;
use super::{
    ApplianceFailure, BackupError, BackupSession, Cause, Phase, DEBUG_PAUSE_ENV,
    DEBUG_PAUSE_POSTCHECK_ENV,
};

impl BackupSession<'_> {
    /// Runs the rest of a direct-mode backup after [`BackupSession::prepare`]: copy into the
    /// `.partial` folder, [`BackupSession::finish`], post-checks of the `.partial` folder
    /// (re-read from the share), publish. On success [`Self::published`] returns the metadata
    /// and folder. A copy that fails its post-checks is an error (status 2) and is never
    /// published; warnings (status 3) are only what does not touch the data (appliance
    /// capture, the domain check after the publish).
    pub fn run_direct(&mut self) -> Result<(), BackupError> {
        self.begin_partial()?;
        self.debug_pause(DEBUG_PAUSE_ENV, "before the copy")?;
        self.copy_disks()?;
        self.increment_records();
        self.finish()?;
        self.phase_started(Phase::Publish);
        let t = Instant::now();
        let extra_files = self.write_extras()?;
        let md = self.stage(extra_files, t)?;
        self.debug_pause(DEBUG_PAUSE_POSTCHECK_ENV, "before the post-checks")?;
        self.phase_started(Phase::PostChecks);
        let t = Instant::now();
        self.check_partial(&md)?;
        let dir = self.publish()?;
        self.chain_published();
        self.post_checks(dir, md, t);
        Ok(())
    }

    /// The metadata of this backup, for a driver that copies the disks itself (the Bacula
    /// plugin's stream mode): `disks` records what it copied, `files` the other files it sent
    /// (`<vm>.xml`, `<vm>-nvram.fd`). Method, note, frozen window, phases so far (add the
    /// driver's own with [`Self::record_phase`]), skipped disks and warnings come from the
    /// session; `result` is `warning` when there are warnings.
    pub fn metadata_for(&self, disks: Vec<DiskRecord>, files: Vec<String>) -> BackupMetadata {
        let total: u64 = disks
            .iter()
            .map(|d| d.file_size + d.backing_chain.iter().map(|b| b.file_size).sum::<u64>())
            .sum();
        let copy_secs = self.run.phases.get("copy").copied().unwrap_or(0.0);
        BackupMetadata {
            schema_version: metadata::SCHEMA_VERSION,
            tool_version: crate::VERSION.to_string(),
            vm_name: self.run.request.vm.clone(),
            vm_uuid: self.run.uuid.clone(),
            host: self.run.host.clone(),
            stamp: self.run.stamp.clone(),
            method_requested: self.run.request.method,
            method: self.plan.method,
            method_note: self.plan.method_note.clone(),
            started_at: self.run.started_at.to_rfc3339(),
            finished_at: Local::now().to_rfc3339(),
            frozen_ms: self.run.frozen_ms,
            phases: self.run.phases.clone(),
            disks,
            skipped_disks: self.plan.skipped.clone(),
            files,
            total_bytes: total,
            bytes_per_sec: if copy_secs > 0.0 {
                total as f64 / copy_secs
            } else {
                0.0
            },
            result: if self.run.warnings.is_empty() {
                ExitStatus::Success
            } else {
                ExitStatus::Warning
            },
            warnings: self.run.warnings.clone(),
            appliance: self
                .run
                .request
                .vm_entry
                .as_ref()
                .and_then(|e| e.appliance.clone()),
            verify: None,
            test_restore: None,
            chain: self.plan.chain.clone(),
        }
    }

    /// Records the seconds a phase took (a driver's own `copy`, for instance).
    pub fn record_phase(&mut self, name: &str, seconds: f64) {
        self.run.phases.insert(name.to_string(), seconds);
    }

    /// The published metadata and folder, once [`Self::run_direct`] succeeded.
    pub fn published(&self) -> (Option<BackupMetadata>, Option<PathBuf>) {
        match &self.published {
            Some((md, dir)) => (Some(md.clone()), Some(dir.clone())),
            None => (None, None),
        }
    }

    /// The `.partial` folder being written (empty before [`Self::begin_partial`]).
    fn vm_dir(&self) -> Result<VmDir, BackupError> {
        VmDir::new(
            &self.run.request.settings.target,
            &self.run.host,
            &self.run.request.vm,
        )
        .map_err(|e| self.failed(Phase::Copy, e))
    }

    /// Creates `<target>/<host>/<vm>/<stamp>.partial/` (journaled first).
    fn begin_partial(&mut self) -> Result<(), BackupError> {
        let partial = self.vm_dir()?.partial_dir(&self.run.stamp);
        let p = partial.clone();
        self.run
            .journal
            .update(|r| r.partial_dir = Some(p))
            .map_err(|e| self.failed(Phase::Copy, e))?;
        let guard = FolderStore::open(&self.run.request.settings.target)
            .and_then(|store| store.begin(&self.run.host, &self.run.request.vm, &self.run.stamp))
            .map_err(|e| self.failed(Phase::Copy, e))?;
        self.held.partial = Some(PartialFolder(guard));
        self.log(Level::Info, &format!("writing into {}", partial.display()));
        Ok(())
    }

    /// Test hook: waits as many milliseconds as the variable `env` says, polling
    /// cancellation.
    fn debug_pause(&mut self, env: &str, when: &str) -> Result<(), BackupError> {
        let Some(ms) = std::env::var(env).ok().and_then(|v| v.parse::<u64>().ok()) else {
            return Ok(());
        };
        self.log(
            Level::Warning,
            &format!("{env}={ms}: pausing {when} (test hook)"),
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(ms) {
            if self.run.cancel.is_cancelled() {
                return Err(self.failed(Phase::Copy, Cause::Cancelled));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// XML, NVRAM and appliance configs; returns (relative name, sha256) of each.
    fn write_extras(&mut self) -> Result<Vec<(String, String)>, BackupError> {
        let partial = self.partial_backup(Phase::Publish)?.path().to_owned();
        let mut files = Vec::new();
        let vm = self.run.request.vm.clone();
        let xml_name = layout::xml_file_name(&vm).map_err(|e| self.failed(Phase::Publish, e))?;
        self.partial_backup(Phase::Publish)?
            .write_file(&xml_name, self.plan.inactive_xml.as_bytes())
            .map_err(|e| self.failed(Phase::Publish, e))?;
        files.push((xml_name, hex_sha256(self.plan.inactive_xml.as_bytes())));
        if let Some(nvram) = self.plan.nvram.clone() {
            let name = layout::nvram_file_name(&vm).map_err(|e| self.failed(Phase::Publish, e))?;
            let bytes = fs::read(&nvram).map_err(|source| {
                self.failed(
                    Phase::Publish,
                    Cause::Io {
                        context: format!("NVRAM {}", nvram.display()),
                        source,
                    },
                )
            })?;
            self.partial_backup(Phase::Publish)?
                .write_file(&name, &bytes)
                .map_err(|e| self.failed(Phase::Publish, e))?;
            self.log(
                Level::Info,
                &format!("NVRAM {} copied ({} bytes)", nvram.display(), bytes.len()),
            );
            files.push((name, hex_sha256(&bytes)));
        }
        if let (Some(entry), Some(hook)) = (
            self.run.request.vm_entry.clone(),
            self.run.request.appliance.clone(),
        ) {
            if super::appliance::is_supported(&entry) {
                let captured = self
                    .partial_backup(Phase::Publish)?
                    .create_dir(layout::CONFIGS_DIR)
                    .map_err(|e| ApplianceFailure::from(std::io::Error::from(e)))
                    .and_then(|dir| {
                        hook.capture_configs(&entry, &self.run.request.settings.ssh, &dir)
                    });
                match captured {
                    Ok(names) => {
                        for n in names {
                            let rel = format!("{}/{n}", layout::CONFIGS_DIR);
                            match crate::engine::verify::sha256_file(&partial.join(&rel)) {
                                Ok(sum) => files.push((rel, sum)),
                                Err(e) => self.warn(format!("appliance config {rel}: {e}")),
                            }
                        }
                    }
                    Err(e) => self.warn(format!("appliance configuration capture failed: {e}")),
                }
            }
        }
        Ok(files)
    }

    fn metadata(&self, extra: &[(String, String)], result: ExitStatus) -> BackupMetadata {
        let mut md = self.metadata_for(
            self.copied.clone(),
            extra.iter().map(|(n, _)| n.clone()).collect(),
        );
        md.result = result;
        md
    }

    /// Writes `checksums.sha256`, the metadata and the log into the `.partial` folder.
    fn stage(
        &mut self,
        extra: Vec<(String, String)>,
        t: Instant,
    ) -> Result<BackupMetadata, BackupError> {
        let mut sums = String::new();
        for d in &self.copied {
            sums.push_str(&format!("{}  {}\n", d.sha256, d.file));
            for b in &d.backing_chain {
                sums.push_str(&format!("{}  {}\n", b.sha256, b.file));
            }
        }
        for (name, sum) in &extra {
            sums.push_str(&format!("{sum}  {name}\n"));
        }
        self.partial_backup(Phase::Publish)?
            .write_file(layout::CHECKSUMS_FILE, sums.as_bytes())
            .map_err(|e| self.failed(Phase::Publish, e))?;
        self.phase_finished(Phase::Publish, t.elapsed().as_secs_f64());
        let result = if self.run.warnings.is_empty() {
            ExitStatus::Success
        } else {
            ExitStatus::Warning
        };
        let md = self.metadata(&extra, result);
        crate::store::write_metadata(self.partial_backup(Phase::Publish)?.path(), &md)
            .map_err(|e| self.failed(Phase::Publish, e))?;
        self.partial_backup(Phase::Publish)?
            .write_file(layout::LOG_FILE, self.run.log.text().as_bytes())
            .map_err(|e| self.failed(Phase::Publish, e))?;
        Ok(md)
    }

    /// The post-checks of the copy, on the `.partial` folder re-read from the share: any
    /// problem fails the run (nothing is published).
    fn check_partial(&mut self, md: &BackupMetadata) -> Result<(), BackupError> {
        let dir = self.partial_backup(Phase::PostChecks)?.path().to_owned();
        let images = md
            .disks
            .iter()
            .map(|d| 1 + d.backing_chain.len())
            .sum::<usize>();
        let proven = self.read_back.len();
        self.log(
            Level::Info,
            &if proven == 0 {
                "post-checks: re-reading the copy from the share (page cache dropped) before publishing".to_string()
            } else {
                format!(
                    "post-checks before publishing: {proven} of {images} image(s) already read back \
                     from the share during the copy{}",
                    if proven < images {
                        "; re-reading the rest (page cache dropped)"
                    } else {
                        ""
                    }
                )
            },
        );
        let problems = checks::post_check_folder_after_copy(
            &dir,
            md,
            &self.read_back,
            self.progress(),
            &self.run.cancel,
        );
        if self.run.cancel.is_cancelled() {
            return Err(self.failed(Phase::PostChecks, Cause::Cancelled));
        }
        if !problems.is_empty() {
            return Err(self.failed(Phase::PostChecks, Cause::PostCheck(problems)));
        }
        self.log(Level::Info, "post-checks of the copy passed");
        Ok(())
    }

    /// Syncs the `.partial` folder and renames it to its final name.
    fn publish(&mut self) -> Result<PathBuf, BackupError> {
        if self.run.cancel.is_cancelled() {
            return Err(self.failed(Phase::Publish, Cause::Cancelled));
        }
        self.log(Level::Info, "publishing the backup folder");
        // Syncs every file and folder, renames `.partial` away and syncs the folder above.
        let partial = self
            .held
            .partial
            .take()
            .ok_or_else(|| self.no_partial(Phase::Publish))?;
        let final_dir = match partial.0.publish() {
            Ok(dir) => dir,
            Err(e) => return Err(self.failed(Phase::Publish, e)),
        };
        let _ = self.run.journal.update(|r| {
            r.partial_dir = None;
            r.phase = "published".into();
        });
        self.log(
            Level::Info,
            &format!("backup published as {}", final_dir.display()),
        );
        Ok(final_dir)
    }

    /// After the publish: the domain check (a warning: the data passed already), then the
    /// metadata and log updated with the final phases and warnings.
    fn post_checks(&mut self, dir: PathBuf, mut md: BackupMetadata, t: Instant) {
        let problems = checks::post_check_domain(&self.run.dom, &md);
        for p in problems {
            self.warn(format!("post-check: {p}"));
        }
        self.phase_finished(Phase::PostChecks, t.elapsed().as_secs_f64());
        self.log(
            Level::Info,
            &format!(
                "backup of {:?} {} in {:.1} s{}",
                self.run.request.vm,
                if self.run.warnings.is_empty() {
                    "completed"
                } else {
                    "completed with warnings"
                },
                self.run.t0.elapsed().as_secs_f64(),
                self.run
                    .frozen_ms
                    .map(|ms| format!(", guest frozen {ms:.0} ms"))
                    .unwrap_or_default()
            ),
        );
        md.phases = self.run.phases.clone();
        md.warnings = self.run.warnings.clone();
        md.finished_at = Local::now().to_rfc3339();
        if !md.warnings.is_empty() {
            md.result = ExitStatus::Warning;
        }
        if let Err(e) = crate::store::write_metadata(&dir, &md) {
            self.warn(format!("cannot update backup-metadata.json: {e}"));
        }
        if let Err(e) =
            crate::store::write_backup_file(&dir, layout::LOG_FILE, self.run.log.text().as_bytes())
        {
            self.warn(format!("cannot update backup.log: {e}"));
        }
        md.warnings = self.run.warnings.clone();
        self.published = Some((md, dir));
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

impl BackupSession<'_> {
    /// The `.partial` folder being written.
    pub(super) fn partial_backup(&self, phase: Phase) -> Result<&PartialBackup, BackupError> {
        self.held
            .partial
            .as_ref()
            .map(|p| &p.0)
            .ok_or_else(|| self.no_partial(phase))
    }

    fn no_partial(&self, phase: Phase) -> BackupError {
        self.failed(phase, Cause::Internal("no partial backup folder"))
    }
}
