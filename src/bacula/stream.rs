//! Stream mode: the disk images, the domain XML and the NVRAM travel through Bacula as virtual
//! files. The engine's [`BackupSession`] takes the snapshot (the guest runs on overlays), the
//! plugin reads the unchanging base images while Bacula pulls them, hashing them on the way,
//! and finishes the session (commit and pivot) after the last one; then the checksums and the
//! metadata follow. Dropping the session before (error, cancel) commits too.
//!
//! Restore rebuilds the backup folder from the files Bacula sends and restores from it with the
//! engine's restore.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::job::{Content, FileKind, VirtualFile};
use super::{PluginArgs, PluginError, VirtualPath};
use crate::config::Settings;
use crate::copier::{root_digest, ChunkManifest, DEFAULT_CHUNK_SIZE};
use crate::engine::backup::{BackupSession, ProgressRef};
use crate::format::layout;
use crate::format::metadata::{BackupMetadata, DiskRecord, SCHEMA_VERSION};
use crate::progress::{CancelToken, Progress};
use crate::store::PartialBackup;
use crate::ExitStatus;

/// An open backup session of the engine; dropping it commits the snapshot.
pub struct StreamSession {
    session: BackupSession<'static>,
    started_at: String,
}

fn engine_error(vm: &str, e: crate::engine::backup::BackupError) -> PluginError {
    PluginError::Engine(format!(
        "vm-backup: backup of {vm} {} (exit {}): {e}",
        e.status,
        e.status.code()
    ))
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
            started_at: chrono::Local::now().to_rfc3339(),
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
                return Err(PluginError::Engine(format!(
                    "vm-backup: mode=stream does not send backing files yet: disk {} has backing file {}; use mode=direct",
                    disk.target,
                    first.path.display()
                )));
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
        let name = layout::xml_file_name(self.session.vm())
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        files.push(VirtualFile {
            path: VirtualPath::new(&vm, &stamp, &name).to_path(),
            kind: FileKind::Regular,
            size: xml.len() as u64,
            mode: 0o600,
            mtime,
            content: Content::Bytes(xml),
        });
        if let Some(nvram) = self.session.nvram_path() {
            let name = layout::nvram_file_name(self.session.vm())
                .map_err(|e| PluginError::Engine(e.to_string()))?;
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
    /// what was sent (`sent`: file name and its digests, in order).
    pub fn finish(
        mut self,
        sent: &[(String, StreamHash)],
        mtime: i64,
    ) -> Result<Vec<VirtualFile>, PluginError> {
        let vm_name = self.session.vm().to_string();
        self.session
            .finish()
            .map_err(|e| engine_error(&vm_name, e))?;
        let vm = self.vm();
        let stamp = self.session.stamp().to_string();
        let mut sums = String::new();
        let mut disks = Vec::new();
        let mut other = Vec::new();
        let mut total = 0;
        for (name, hash) in sent {
            sums.push_str(&format!("{}  {name}\n", hash.sha256));
            match self.session.disks().iter().find(|d| &d.file_name == name) {
                Some(d) => {
                    total += hash.size;
                    disks.push(DiskRecord {
                        target: d.target.clone(),
                        source: d.source.display().to_string(),
                        format: d.format.clone(),
                        file: name.clone(),
                        virtual_size: d.virtual_size,
                        allocated_size: d.allocated_size,
                        file_size: hash.size,
                        sha256: hash.sha256.clone(),
                        manifest: hash.manifest.clone(),
                        copy_seconds: 0.0,
                        bytes_per_sec: 0.0,
                        io_path: "bacula-stream".into(),
                        backing_chain: Vec::new(),
                    })
                }
                None => other.push(name.clone()),
            }
        }
        let meta = BackupMetadata {
            schema_version: SCHEMA_VERSION,
            tool_version: crate::VERSION.to_string(),
            vm_name: vm_name.clone(),
            vm_uuid: self.session.uuid().to_string(),
            host: crate::format::layout::this_host(),
            stamp: stamp.clone(),
            method_requested: self.session.method(),
            method: self.session.method(),
            method_note: self.session.method_note().map(str::to_string),
            started_at: self.started_at.clone(),
            finished_at: chrono::Local::now().to_rfc3339(),
            frozen_ms: self.session.frozen_ms(),
            phases: Default::default(),
            disks,
            skipped_disks: self.session.skipped_disks().to_vec(),
            files: other,
            total_bytes: total,
            bytes_per_sec: 0.0,
            result: ExitStatus::Success,
            warnings: self.session.warnings().to_vec(),
            appliance: None,
            verify: None,
            test_restore: None,
            chain: Default::default(),
        };
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| PluginError::Engine(e.to_string()))?;
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

/// Digests of one streamed file: whole-file SHA-256 and the chunk manifest the engine's
/// verification reads.
#[derive(Debug, Clone)]
pub struct StreamHash {
    /// Whole-file SHA-256, hex.
    pub sha256: String,
    /// Bytes hashed.
    pub size: u64,
    /// Per-chunk digests.
    pub manifest: ChunkManifest,
}

/// Hashes a file as it is read, whole and per chunk.
pub struct Hasher {
    whole: Sha256,
    chunk: Sha256,
    in_chunk: u64,
    chunk_zero: bool,
    size: u64,
    digests: Vec<[u8; 32]>,
    zero_chunks: Vec<u64>,
}

impl Default for Hasher {
    fn default() -> Self {
        Self {
            whole: Sha256::new(),
            chunk: Sha256::new(),
            in_chunk: 0,
            chunk_zero: true,
            size: 0,
            digests: Vec::new(),
            zero_chunks: Vec::new(),
        }
    }
}

impl Hasher {
    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (DEFAULT_CHUNK_SIZE - self.in_chunk) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            self.chunk.update(now);
            self.chunk_zero &= now.iter().all(|b| *b == 0);
            self.in_chunk += now.len() as u64;
            if self.in_chunk == DEFAULT_CHUNK_SIZE {
                self.close_chunk();
            }
            data = rest;
        }
    }

    fn close_chunk(&mut self) {
        let digest: [u8; 32] = std::mem::take(&mut self.chunk).finalize().into();
        if self.chunk_zero {
            self.zero_chunks.push(self.digests.len() as u64);
        }
        self.digests.push(digest);
        self.in_chunk = 0;
        self.chunk_zero = true;
    }

    /// The digests.
    pub fn finish(mut self) -> StreamHash {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        let root = root_digest(&self.digests);
        StreamHash {
            sha256: hex::encode(self.whole.finalize()),
            size: self.size,
            manifest: ChunkManifest {
                chunk_size: DEFAULT_CHUNK_SIZE,
                file_size: self.size,
                digests: self.digests.iter().map(hex::encode).collect(),
                zero_chunks: self.zero_chunks,
                root: hex::encode(root),
            },
        }
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

/// Restores the VM from a backup folder rebuilt from the streamed files (`staged`, ending in
/// `.partial`): renames it into place and restores from it as from any backup.
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
    let what = format!(
        "rename {} to {}",
        staged.path().display(),
        staged.final_path().display()
    );
    let folder = staged
        .publish()
        .map_err(|e| PluginError::io(what, e.into()))?;
    let meta = BackupMetadata::read(&folder)
        .map_err(|e| PluginError::Engine(format!("vm-backup: {}: {e}", folder.display())))?;
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

    #[test]
    fn hasher_matches_one_pass_digests_across_chunk_edges() {
        let mut data = vec![0u8; (DEFAULT_CHUNK_SIZE as usize) + 10];
        data[DEFAULT_CHUNK_SIZE as usize + 3] = 7;
        let mut h = Hasher::default();
        for piece in data.chunks(65536 + 3) {
            h.update(piece);
        }
        let out = h.finish();
        assert_eq!(out.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(out.manifest.digests.len(), 2);
        assert_eq!(out.manifest.zero_chunks, vec![0]);
        assert_eq!(
            out.manifest.digests[1],
            hex::encode(Sha256::digest(&data[DEFAULT_CHUNK_SIZE as usize..]))
        );
    }
}
