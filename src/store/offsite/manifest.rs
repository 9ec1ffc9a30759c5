//! What a backup is, off-site: the backup's metadata (the bytes of `backup-metadata.json`) and
//! each of its files as a list of chunk ids. Sealed under the key (names of files and the
//! metadata are not readable in the bucket); written last by a push, so a backup is listed
//! only when every chunk it names is there.

use serde::{Deserialize, Serialize};

use super::chunk_id::ChunkId;

/// The format of the manifest written by this build.
pub const MANIFEST_VERSION: u32 = 1;

/// One chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteChunk {
    /// The keyed id (hex): names the object.
    pub id: String,
    /// SHA-256 of the plaintext chunk (hex), from the backup's chunk manifest.
    pub sha256: String,
}

impl OffsiteChunk {
    /// The id, parsed.
    pub fn chunk_id(&self) -> Option<ChunkId> {
        ChunkId::from_hex(&self.id)
    }
}

/// One file of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteFile {
    /// Its name inside the backup folder (`configs/…` for appliance files).
    pub name: String,
    /// Its size.
    pub size: u64,
    /// The chunk size (the last chunk may be shorter).
    pub chunk_size: u64,
    /// The whole file's SHA-256 when the backup's `checksums.sha256` records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The chunks in order; `None` for an all-zero chunk (a hole: nothing stored).
    pub chunks: Vec<Option<OffsiteChunk>>,
}

/// The manifest of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteManifest {
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// The hypervisor folder.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// The backup's stamp.
    pub stamp: String,
    /// When the push finished (RFC 3339).
    pub pushed_at: String,
    /// The bytes of the backup's `backup-metadata.json`.
    pub metadata_json: String,
    /// The files, disk images first.
    pub files: Vec<OffsiteFile>,
}

impl OffsiteManifest {
    /// Every chunk id it references.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter().flatten())
            .filter_map(OffsiteChunk::chunk_id)
    }

    /// The logical size of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The backup's parent (incremental, differential), from its metadata.
    pub fn parent(&self) -> Option<String> {
        serde_json::from_str::<crate::format::metadata::BackupMetadata>(&self.metadata_json)
            .ok()
            .and_then(|m| m.chain.parent)
    }
}
