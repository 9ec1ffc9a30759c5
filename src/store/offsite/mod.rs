//! The off-site copy: the store's second implementation, an S3-compatible bucket holding
//! compressed, encrypted, deduplicated chunks (see `docs/offsite.md`).
//!
//! Layout under `<prefix>/` in the bucket:
//!
//! ```text
//! <prefix>/vm-backup-offsite.json           the repository marker: format, key fingerprint,
//!                                           a check value sealed under the key
//! <prefix>/chunks/<id[0..2]>/<id>           one chunk: zstd (when it helps), then AES-256-GCM
//! <prefix>/backups/<host>/<vm>/<stamp>      one sealed manifest per backup, written LAST
//! <prefix>/locks/<kind>-<uuid>              a push or a garbage collection running
//! ```
//!
//! One module per responsibility: [`key`] (the master key, its file, fingerprint, paper
//! export and the keys derived from it), [`chunk_id`] (keyed chunk ids), [`codec`] (compress
//! and encrypt a chunk or a manifest), [`s3`] (the HTTP client and credentials),
//! [`manifest`] (what a backup is, off-site), [`lock`] (push and GC exclusion), and
//! [`OffsiteStore`] here, which puts them together. The work (push, verify, restore, prune)
//! is in `engine::offsite`.

pub mod chunk_id;
pub mod codec;
pub mod key;
pub mod lock;
pub mod manifest;
pub mod s3;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

pub use chunk_id::ChunkId;
pub use key::{KeyFile, MasterKey};
pub use manifest::{OffsiteFile, OffsiteManifest};
pub use s3::{LockSupport, ObjectLock, S3Client, S3Config};

/// The name of the repository marker under the prefix.
pub const MARKER_OBJECT: &str = "vm-backup-offsite.json";
/// The format version of the off-site repository written by this build.
pub const OFFSITE_FORMAT_VERSION: u32 = 1;

/// Errors of the off-site store.
#[derive(Debug, thiserror::Error)]
pub enum OffsiteError {
    /// The S3 server could not be reached, or failed (after retries).
    #[error("S3 server {endpoint}: cannot {action} {key}: {detail}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// What was being done.
        action: &'static str,
        /// The object key.
        key: String,
        /// Why (transport error or HTTP status and body).
        detail: String,
    },
    /// The server refused the credentials or the signature (HTTP 401/403).
    #[error("S3 server {endpoint} refused the credentials (HTTP {status}) to {action} {key}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the credentials file")]
    Denied {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// What was being done.
        action: &'static str,
        /// The object key.
        key: String,
    },
    /// The bucket does not exist.
    #[error("bucket {0:?} does not exist on the S3 server (create it, or correct --bucket)")]
    NoBucket(String),
    /// An object that must exist is missing.
    #[error("object {0} is missing from the off-site store")]
    Missing(String),
    /// No credentials were found.
    #[error("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or credentials_file in the [offsite] section")]
    NoCredentials,
    /// The credentials file is unusable.
    #[error("credentials file {path}: {reason}")]
    BadCredentials {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A setting is missing or malformed (endpoint, bucket, prefix).
    #[error("off-site setting {key}: {reason}")]
    Setting {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The key file cannot be read or written.
    #[error("key file {path}: {source}")]
    KeyIo {
        /// The key file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not parse or is inconsistent.
    #[error("key file {path}: {reason}")]
    BadKeyFile {
        /// The key file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The passphrase does not open the key file.
    #[error("the passphrase does not open the key file {0}")]
    WrongPassphrase(std::path::PathBuf),
    /// The key is not the one the off-site store was written with.
    #[error("wrong key: the off-site store {location} was written with key {expected}, this key is {actual}")]
    WrongKey {
        /// The store.
        location: String,
        /// The fingerprint recorded in the store.
        expected: String,
        /// The fingerprint of the key given.
        actual: String,
    },
    /// A stored object does not decrypt or does not match its id or hash: altered or damaged.
    #[error("object {key} is damaged or altered: {reason}")]
    Corrupt {
        /// The object key.
        key: String,
        /// What failed.
        reason: String,
    },
    /// A manifest or marker could not be encoded or decoded.
    #[error("cannot {action} {what}: {source}")]
    Json {
        /// encode / decode.
        action: &'static str,
        /// Which object.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Another push or garbage collection holds a lock.
    #[error("off-site store busy: {0}")]
    Busy(String),
    /// Compressing failed (an internal error of the zstd library).
    #[error("cannot compress {what}: {source}")]
    Codec {
        /// Which object.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The repository marker is missing or of another format.
    #[error("{0}")]
    NotARepository(String),
    /// Object Lock was asked for, and the bucket does not have it.
    #[error("S3 Object Lock asked for (object_lock_days / --object-lock-days), but {location} cannot lock objects: {detail}; nothing was uploaded")]
    NoObjectLock {
        /// The store.
        location: String,
        /// What the server answered.
        detail: String,
    },
}

impl OffsiteError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> ErrorKind {
        match self {
            OffsiteError::Unreachable { .. } => ErrorKind::TargetFailing,
            OffsiteError::Denied { .. } => ErrorKind::Config,
            OffsiteError::NoBucket(_) => ErrorKind::TargetMissing,
            OffsiteError::Missing(_) => ErrorKind::NotFound,
            OffsiteError::NoCredentials | OffsiteError::BadCredentials { .. } => ErrorKind::Config,
            OffsiteError::Setting { .. } => ErrorKind::Config,
            OffsiteError::KeyIo { .. } => ErrorKind::Io,
            OffsiteError::BadKeyFile { .. } => ErrorKind::Config,
            OffsiteError::WrongPassphrase(_) | OffsiteError::WrongKey { .. } => {
                ErrorKind::InvalidInput
            }
            OffsiteError::Corrupt { .. } => ErrorKind::Corrupt,
            OffsiteError::Json { .. } => ErrorKind::Corrupt,
            OffsiteError::Busy(_) => ErrorKind::Busy,
            OffsiteError::Codec { .. } => ErrorKind::Internal,
            OffsiteError::NotARepository(_) => ErrorKind::TargetMissing,
            OffsiteError::NoObjectLock { .. } => ErrorKind::Config,
        }
    }
}

/// The repository marker `<prefix>/vm-backup-offsite.json` (plain JSON: nothing secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoMarker {
    /// [`OFFSITE_FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The fingerprint of the key the store is written with.
    pub key_fingerprint: String,
    /// A fixed text sealed under the key: opening it proves the key (hex).
    pub check: String,
    /// When it was written (RFC 3339).
    pub created_at: String,
}

/// The fixed text sealed into the marker.
const CHECK_TEXT: &[u8] = b"vm-backup offsite repository v1";

/// An opened off-site repository: the bucket, the prefix and the key.
#[derive(Debug)]
pub struct OffsiteStore {
    client: S3Client,
    keys: key::DerivedKeys,
}

impl OffsiteStore {
    /// Opens the repository at `client`'s bucket and prefix with `master`; creates the marker
    /// when there is none (`create`), else refuses a store written with another key.
    pub fn open(client: S3Client, master: &MasterKey, create: bool) -> Result<Self, OffsiteError> {
        let keys = master.derive();
        let store = Self { client, keys };
        match store.client.get(MARKER_OBJECT)? {
            Some(bytes) => {
                let marker: RepoMarker =
                    serde_json::from_slice(&bytes).map_err(|source| OffsiteError::Json {
                        action: "decode",
                        what: MARKER_OBJECT.into(),
                        source,
                    })?;
                if marker.format_version > OFFSITE_FORMAT_VERSION {
                    return Err(OffsiteError::NotARepository(format!(
                        "{} has off-site format {}, newer than this build ({OFFSITE_FORMAT_VERSION})",
                        store.location(),
                        marker.format_version
                    )));
                }
                let actual = master.fingerprint();
                let sealed = hex::decode(&marker.check).unwrap_or_default();
                let opened = codec::open_sealed(&store.keys, MARKER_OBJECT, &sealed);
                if marker.key_fingerprint != actual || opened.as_deref().ok() != Some(CHECK_TEXT)
                {
                    return Err(OffsiteError::WrongKey {
                        location: store.location(),
                        expected: marker.key_fingerprint,
                        actual,
                    });
                }
            }
            None if create => {
                let marker = RepoMarker {
                    format_version: OFFSITE_FORMAT_VERSION,
                    key_fingerprint: master.fingerprint(),
                    check: hex::encode(codec::seal(&store.keys, MARKER_OBJECT, CHECK_TEXT)),
                    created_at: chrono::Local::now().to_rfc3339(),
                };
                let bytes =
                    serde_json::to_vec_pretty(&marker).map_err(|source| OffsiteError::Json {
                        action: "encode",
                        what: MARKER_OBJECT.into(),
                        source,
                    })?;
                store.client.put(MARKER_OBJECT, &bytes)?;
                tracing::info!(store = %store.location(), "off-site repository created");
            }
            None => {
                return Err(OffsiteError::NotARepository(format!(
                    "{} holds no off-site repository (no {MARKER_OBJECT}); run `vm-backup offsite push` first",
                    store.location()
                )))
            }
        }
        Ok(store)
    }

    /// Where the store is, for messages (endpoint, bucket, prefix; never credentials).
    pub fn location(&self) -> String {
        self.client.location()
    }

    /// The S3 client.
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The keyed id of a plaintext chunk.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        chunk_id::of(&self.keys, plain)
    }

    /// The object key (relative to the prefix) of a chunk.
    pub fn chunk_key(id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    /// The object key (relative to the prefix) of a backup's manifest.
    pub fn manifest_key(host: &str, vm: &str, stamp: &str) -> String {
        format!("backups/{host}/{vm}/{stamp}")
    }

    /// Every chunk id present in the store.
    pub fn chunk_ids(&self) -> Result<BTreeSet<ChunkId>, OffsiteError> {
        let mut out = BTreeSet::new();
        for obj in self.client.list("chunks/")? {
            if let Some(name) = obj.key.rsplit('/').next() {
                if let Some(id) = ChunkId::from_hex(name) {
                    out.insert(id);
                }
            }
        }
        Ok(out)
    }

    /// Compresses, encrypts and uploads a chunk under its id; returns the stored size.
    pub fn put_chunk(&self, id: &ChunkId, plain: &[u8]) -> Result<u64, OffsiteError> {
        self.put_chunk_locked(id, plain, None)
    }

    /// [`OffsiteStore::put_chunk`] under an Object Lock retention when given.
    pub fn put_chunk_locked(
        &self,
        id: &ChunkId,
        plain: &[u8],
        lock: Option<&ObjectLock>,
    ) -> Result<u64, OffsiteError> {
        let bytes = codec::encode_chunk(&self.keys, id, plain);
        self.client.put_locked(&Self::chunk_key(id), &bytes, lock)?;
        Ok(bytes.len() as u64)
    }

    /// Extends the Object Lock retention of a chunk already in the store (a new backup
    /// references it: it must stay as long as the new backup's manifest).
    pub fn extend_chunk_retention(
        &self,
        id: &ChunkId,
        lock: &ObjectLock,
    ) -> Result<(), OffsiteError> {
        self.client.extend_retention(&Self::chunk_key(id), lock)
    }

    /// Downloads, decrypts and decompresses a chunk, and checks it is the chunk `id` names.
    pub fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, OffsiteError> {
        let key = Self::chunk_key(id);
        let bytes = self
            .client
            .get(&key)?
            .ok_or_else(|| OffsiteError::Missing(key.clone()))?;
        let plain =
            codec::decode_chunk(&self.keys, id, &bytes).map_err(|e| OffsiteError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        if self.chunk_id(&plain) != *id {
            return Err(OffsiteError::Corrupt {
                key,
                reason: "the content does not match the chunk id".into(),
            });
        }
        Ok(plain)
    }

    /// Deletes a chunk.
    pub fn delete_chunk(&self, id: &ChunkId) -> Result<(), OffsiteError> {
        self.client.delete(&Self::chunk_key(id))
    }

    /// Seals and uploads a backup's manifest (the commit point of a push).
    pub fn put_manifest(&self, m: &OffsiteManifest) -> Result<(), OffsiteError> {
        self.put_manifest_locked(m, None)
    }

    /// [`OffsiteStore::put_manifest`] under an Object Lock retention when given.
    pub fn put_manifest_locked(
        &self,
        m: &OffsiteManifest,
        lock: Option<&ObjectLock>,
    ) -> Result<(), OffsiteError> {
        let key = Self::manifest_key(&m.host, &m.vm, &m.stamp);
        let json = serde_json::to_vec(m).map_err(|source| OffsiteError::Json {
            action: "encode",
            what: key.clone(),
            source,
        })?;
        let packed = zstd::encode_all(&json[..], 3).map_err(|source| OffsiteError::Codec {
            what: key.clone(),
            source,
        })?;
        let sealed = codec::seal(&self.keys, &key, &packed);
        self.client.put_locked(&key, &sealed, lock)
    }

    /// Downloads and opens a backup's manifest.
    pub fn get_manifest(
        &self,
        host: &str,
        vm: &str,
        stamp: &str,
    ) -> Result<OffsiteManifest, OffsiteError> {
        let key = Self::manifest_key(host, vm, stamp);
        let sealed = self
            .client
            .get(&key)?
            .ok_or_else(|| OffsiteError::Missing(key.clone()))?;
        let opened =
            codec::open_sealed(&self.keys, &key, &sealed).map_err(|e| OffsiteError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        let json = zstd::decode_all(&opened[..]).map_err(|e| OffsiteError::Corrupt {
            key: key.clone(),
            reason: format!("cannot decompress: {e}"),
        })?;
        serde_json::from_slice(&json).map_err(|source| OffsiteError::Json {
            action: "decode",
            what: key,
            source,
        })
    }

    /// Whether the manifest of a backup is there (the backup is complete off-site).
    pub fn has_manifest(&self, host: &str, vm: &str, stamp: &str) -> Result<bool, OffsiteError> {
        self.client.exists(&Self::manifest_key(host, vm, stamp))
    }

    /// Deletes a backup's manifest (its chunks stay until garbage collection).
    pub fn delete_manifest(&self, host: &str, vm: &str, stamp: &str) -> Result<(), OffsiteError> {
        self.client.delete(&Self::manifest_key(host, vm, stamp))
    }

    /// Every backup off-site as (host, vm, stamp), sorted.
    pub fn backups(&self) -> Result<Vec<(String, String, String)>, OffsiteError> {
        let mut out = Vec::new();
        for obj in self.client.list("backups/")? {
            let rest = obj.key.strip_prefix("backups/").unwrap_or(&obj.key);
            let parts: Vec<&str> = rest.split('/').collect();
            if let [host, vm, stamp] = parts[..] {
                if crate::format::layout::parse_stamp(stamp).is_ok() {
                    out.push((host.to_string(), vm.to_string(), stamp.to_string()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
