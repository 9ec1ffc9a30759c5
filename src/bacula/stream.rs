//! Stream mode: the disk images, the domain XML and the NVRAM travel through Bacula as virtual
//! files. The engine's [`BackupSession`] takes the snapshot (the guest runs on overlays), the
//! plugin reads the unchanging base images while Bacula pulls them, hashing them on the way,
//! and finishes the session (commit and pivot) after the last one; then the checksums and the
//! metadata follow. Dropping the session before (error, cancel) commits too.
//!
//! Restore rebuilds the backup folder from the files Bacula sends and restores from it with the
//! engine's restore.

use std::sync::Arc;
use std::time::Instant;

use super::job::{Content, FileKind, VirtualFile};
use super::{PluginArgs, PluginError, VirtualPath};
use crate::config::Settings;
use crate::engine::backup::{BackupError, BackupSession, Problem, ProblemKind, ProgressRef};
use crate::engine::{FileDigests, StreamHasher, STREAM_CHUNK_SIZE};
use crate::format::layout;
use crate::format::metadata::{BackupMetadata, DiskRecord};
use crate::progress::{CancelToken, Progress};
use crate::store::PartialBackup;

/// An open backup session of the engine; dropping it commits the snapshot.
pub struct StreamSession {
    session: BackupSession<'static>,
    /// When the session was ready and Bacula began pulling the files (the `copy` phase).
    prepared: Instant,
}

fn engine_error(vm: &str, source: BackupError) -> PluginError {
    PluginError::Backup {
        vm: vm.to_string(),
        status: source.status,
        source: std::sync::Arc::new(source),
        release_problems: Vec::new(),
    }
}

/// A hasher for a streamed file: the copier's, with the engine's chunk size.
pub fn hasher() -> StreamHasher {
    StreamHasher::new(STREAM_CHUNK_SIZE)
}

impl StreamSession {
    /// Prepares the session (checks, repair of leftovers, freeze/snapshot), as the direct
    /// backup does.
    pub fn prepare(
        args: &PluginArgs,
        settings: &Settings,
        progress: Arc<dyn Progress>,
        cancel: &CancelToken,
    ) -> Result<Self, PluginError> {
        let request = super::engine::request(args, settings)?;
        let session =
            BackupSession::prepare(&request, ProgressRef::Shared(progress), cancel.clone())
                .map_err(|e| engine_error(&args.vm, e))?;
        Ok(Self {
            session,
            prepared: Instant::now(),
        })
    }

    fn vm(&self) -> String {
        layout::safe_component(self.session.vm()).unwrap_or_else(|_| "vm".into())
    }

    /// The files to send: the disks, the domain XML, the NVRAM.
    pub fn files(&self, mtime: i64) -> Result<Vec<VirtualFile>, PluginError> {
        let vm = self.vm();
        let stamp = self.session.stamp().to_string();
        let mut files = Vec::new();
        for disk in self.session.disks() {
            if let Some(first) = disk.backing_chain.first() {
                return Err(PluginError::StreamBackingFile {
                    disk: disk.target.clone(),
                    backing: first.path.clone(),
                });
            }
            let size = std::fs::metadata(&disk.source)
                .map_err(|e| PluginError::io(format!("stat {}", disk.source.display()), e))?
                .len();
            files.push(VirtualFile {
                path: VirtualPath::new(&vm, &stamp, &disk.file_name).to_path(),
                kind: FileKind::Regular,
                size,
                mode: 0o600,
                mtime,
                content: Content::File(disk.source.clone()),
            });
        }
        let xml = self.session.domain_xml().as_bytes().to_vec();
        let name = layout::xml_file_name(self.session.vm())?;
        files.push(VirtualFile {
            path: VirtualPath::new(&vm, &stamp, &name).to_path(),
            kind: FileKind::Regular,
            size: xml.len() as u64,
            mode: 0o600,
            mtime,
            content: Content::Bytes(xml),
        });
        if let Some(nvram) = self.session.nvram_path() {
            let name = layout::nvram_file_name(self.session.vm())?;
            let size = std::fs::metadata(nvram)
                .map_err(|e| PluginError::io(format!("stat {}", nvram.display()), e))?
                .len();
            files.push(VirtualFile {
                path: VirtualPath::new(&vm, &stamp, &name).to_path(),
                kind: FileKind::Regular,
                size,
                mode: 0o600,
                mtime,
                content: Content::File(nvram.to_path_buf()),
            });
        }
        Ok(files)
    }

    /// Commits the snapshot, then returns `checksums.sha256` and `backup-metadata.json` for
    /// what was sent (`sent`: file name and its digests, in order). The metadata comes from the
    /// engine's builder, as in direct mode.
    pub fn finish(
        mut self,
        sent: &[(String, FileDigests)],
        mtime: i64,
    ) -> Result<Vec<VirtualFile>, PluginError> {
        let vm_name = self.session.vm().to_string();
        self.session
            .record_phase("copy", self.prepared.elapsed().as_secs_f64());
        self.session
            .finish()
            .map_err(|e| engine_error(&vm_name, e))?;
        let vm = self.vm();
        let stamp = self.session.stamp().to_string();
        let mut sums = String::new();
        let mut disks = Vec::new();
        let mut other = Vec::new();
        for (name, hash) in sent {
            sums.push_str(&format!("{}  {name}\n", hash.sha256));
            match self.session.disks().iter().find(|d| &d.file_name == name) {
                Some(d) => disks.push(DiskRecord {
                    target: d.target.clone(),
                    source: d.source.display().to_string(),
                    format: d.format.clone(),
                    file: name.clone(),
                    virtual_size: d.virtual_size,
                    allocated_size: d.allocated_size,
                    file_size: hash.manifest.file_size,
                    sha256: hash.sha256.clone(),
                    manifest: hash.manifest.clone(),
                    copy_seconds: 0.0,
                    bytes_per_sec: 0.0,
                    io_path: "bacula-stream".into(),
                    backing_chain: Vec::new(),
                    backing_rewrite: None,
                }),
                None => other.push(name.clone()),
            }
        }
        let meta = self.session.metadata_for(disks, other);
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|source| PluginError::WriteMetadata {
                vm: vm_name.clone(),
                source,
            })?;
        let file = |name: &str, bytes: Vec<u8>| VirtualFile {
            path: VirtualPath::new(&vm, &stamp, name).to_path(),
            kind: FileKind::Regular,
            size: bytes.len() as u64,
            mode: 0o600,
            mtime,
            content: Content::Bytes(bytes),
        };
        Ok(vec![
            file(layout::CHECKSUMS_FILE, sums.into_bytes()),
            file(layout::METADATA_FILE, json),
        ])
    }
}

/// What a stream backup would send, without touching the VM: the domain's disks are only
/// known once the session runs, so the estimate lists the metadata files only.
pub fn estimate(
    args: &PluginArgs,
    settings: &Settings,
    stamp: &str,
    mtime: i64,
) -> Result<Vec<VirtualFile>, PluginError> {
    let _ = (args, settings, stamp, mtime);
    Ok(Vec::new())
}

/// Checks a backup rebuilt from Bacula's data in its staging folder (`<stamp>.partial`, which
/// `list`, restore and prune never take for a backup) before it is published: the metadata
/// parses and names this stamp, and the same post-checks as a direct-mode backup pass (every
/// file present with its size, each disk re-hashed against its chunk manifest, every line of
/// `checksums.sha256`, `qemu-img check`). Refused: [`PluginError::StagedRefused`]; the caller
/// drops the guard, which removes the folder.
pub fn check_staged(
    staged: &PartialBackup,
    stamp: &str,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<BackupMetadata, PluginError> {
    let dir = staged.path();
    let refused = |problems: Vec<Problem>| PluginError::StagedRefused {
        dir: dir.to_owned(),
        problems: problems.into(),
    };
    let meta = BackupMetadata::read(dir).map_err(|e| {
        refused(vec![Problem::general(
            ProblemKind::Unreadable,
            format!("cannot read {}: {e}", layout::METADATA_FILE),
        )])
    })?;
    if meta.stamp != stamp {
        return Err(refused(vec![Problem::general(
            ProblemKind::Identity,
            format!("the metadata is of backup {}, not {stamp}", meta.stamp),
        )]));
    }
    let problems = crate::engine::backup::checks::post_check_folder(dir, &meta, progress, cancel);
    if !problems.is_empty() {
        tracing::warn!(dir = %dir.display(), "streamed backup refused: {problems}");
        return Err(PluginError::StagedRefused {
            dir: dir.to_owned(),
            problems,
        });
    }
    Ok(meta)
}

/// Restores a backup rebuilt from Bacula's data: [`check_staged`] first, then the folder is
/// published (renamed without `.partial`) and restored from.
pub fn restore_staged(
    settings: &Settings,
    staged: PartialBackup,
    where_: &str,
    force: bool,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<String, PluginError> {
    let name = staged
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = name
        .strip_suffix(layout::PARTIAL_SUFFIX)
        .unwrap_or(&name)
        .to_string();
    let meta = check_staged(&staged, &stamp, progress, cancel)?;
    let folder = staged.publish()?;
    let mut request = crate::engine::restore::RestoreRequest::new(
        &settings.target,
        &meta.host,
        &meta.vm_name,
        crate::engine::restore::StampChoice::Stamp(stamp),
    );
    request.backup_dir = Some(folder.clone());
    request.libvirt_uri = settings.libvirt_uri.clone();
    request.force = force;
    if let Some(dir) = super::where_dir(where_) {
        request.disk_dir = Some(dir.to_path_buf());
        request.new_name = Some(super::restored_name(&meta.vm_name));
    }
    let line = super::engine::finish_restore(
        crate::engine::restore::restore(&request, progress, cancel),
        &meta.vm_name,
        cancel,
    )?;
    Ok(format!(
        "{line} (streamed backup rebuilt in {})",
        folder.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    const STAMP: &str = "2026-11-21-120000";

    /// A staged folder with `web.xml` and its checksum (`sum`: the line's hash).
    fn staged(root: &std::path::Path, sum: Option<&str>) -> PartialBackup {
        let p = PartialBackup::create(
            root.join(format!("{STAMP}{}", layout::PARTIAL_SUFFIX)),
            root.join(STAMP),
        )
        .unwrap();
        let md = format!(
            r#"{{"schema_version": 1, "tool_version": "0", "vm_name": "web", "vm_uuid": "u",
                "host": "hv1", "stamp": "{STAMP}", "method_requested": "auto",
                "method": "offline", "started_at": "t0", "finished_at": "t1", "phases": {{}},
                "disks": [], "skipped_disks": [], "files": ["web.xml"], "total_bytes": 0,
                "bytes_per_sec": 0.0, "result": "success"}}"#
        );
        p.write_file(layout::METADATA_FILE, md.as_bytes()).unwrap();
        p.write_file("web.xml", b"<domain/>").unwrap();
        let real = crate::engine::verify::sha256_file(&p.path().join("web.xml")).unwrap();
        let line = format!("{}  web.xml\n", sum.unwrap_or(&real));
        p.write_file(layout::CHECKSUMS_FILE, line.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn a_streamed_backup_is_checked_before_it_is_published_and_removed_when_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancelToken::new();
        let good = staged(dir.path(), None);
        let meta = check_staged(&good, STAMP, &NoProgress, &cancel).unwrap();
        assert_eq!(meta.vm_name, "web");
        // Another stamp than the folder's: refused.
        let err = check_staged(&good, "2026-11-21-120001", &NoProgress, &cancel).unwrap_err();
        assert!(matches!(err, PluginError::StagedRefused { .. }), "{err}");
        drop(good);
        // A corrupt file: refused, and once dropped nothing is left, nothing published.
        let bad = staged(dir.path(), Some(&"0".repeat(64)));
        let err = check_staged(&bad, STAMP, &NoProgress, &cancel).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
        assert!(err.to_string().contains("web.xml"), "{err}");
        match &err {
            PluginError::StagedRefused { problems, .. } => {
                let p = problems.iter().next().expect("a problem");
                assert_eq!(p.file.as_deref(), Some("web.xml"));
                assert_eq!(p.kind, ProblemKind::ChecksumMismatch);
            }
            other => panic!("not refused: {other}"),
        }
        drop(bad);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
