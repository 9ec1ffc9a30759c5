//! The master key: 256 random bits in a key file (plain, or wrapped under a passphrase with
//! Argon2id), its fingerprint, its paper export, and the keys derived from it with HKDF-SHA-256
//! (one for encryption, one for chunk ids), so that neither use weakens the other.
//!
//! The key file (JSON, mode 0600):
//! `{"format": 1, "fingerprint": "…", "created_at": "…", "key": "<hex>"}`, or with a
//! passphrase `"kdf": {"algorithm": "argon2id", "salt", "m_cost", "t_cost", "p_cost"}` and
//! `"wrapped": "<hex nonce ‖ AES-256-GCM(master)>"` instead of `"key"`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::OffsiteError;

/// Why a key could not be made, wrapped or read back from paper.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The KDF named in the key file is not Argon2id.
    #[error("unknown KDF {0:?}")]
    UnknownKdf(String),
    /// A hex field does not decode.
    #[error("{field}: {source}")]
    Hex {
        /// The field.
        field: &'static str,
        /// The cause.
        #[source]
        source: hex::FromHexError,
    },
    /// Argon2 refused its parameters.
    #[error("KDF: {0}")]
    Kdf(argon2::Error),
    /// AES-GCM refused (a wrong key length: a damaged file).
    #[error("cannot wrap the key")]
    Wrap,
    /// A line of the paper copy is wrong.
    #[error("paper key line {line}: {reason}")]
    Paper {
        /// The line number (1 to 8; 0: the whole text).
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

impl KeyError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::InvalidInput
    }
}

/// The master key (32 bytes, zeroed when dropped; never printed by `Debug`).
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

/// The keys derived from the master key.
#[derive(Clone)]
pub struct DerivedKeys {
    /// AES-256-GCM key of chunks, manifests and the marker check.
    pub(crate) encryption: Zeroizing<[u8; 32]>,
    /// HMAC-SHA-256 key of chunk ids.
    pub(crate) chunk_id: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DerivedKeys(..)")
    }
}

impl MasterKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        MasterKey(k)
    }

    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(bytes))
    }

    /// The raw bytes (for the paper export).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn hkdf(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"vm-backup offsite"), &self.0[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA-256's limit (255 × 32): expand cannot fail.
        if hk.expand(info, &mut out[..]).is_err() {
            unreachable!("HKDF output of 32 bytes is always valid");
        }
        out
    }

    /// The keys for encryption and for chunk ids.
    pub fn derive(&self) -> DerivedKeys {
        DerivedKeys {
            encryption: self.hkdf(b"encryption v1"),
            chunk_id: self.hkdf(b"chunk id v1"),
        }
    }

    /// A short public name of the key (derived, reveals nothing of it): `xxxx-xxxx-xxxx-xxxx`.
    pub fn fingerprint(&self) -> String {
        let fp = self.hkdf(b"fingerprint v1");
        let hex = hex::encode(&fp[..8]);
        hex.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    /// A printable export: the key in 8 lines of 4 bytes (hex), each line followed by a
    /// 2-byte check of its line number and content, and the fingerprint.
    pub fn paper(&self) -> String {
        use sha2::Digest;
        let mut out = String::new();
        out.push_str("vm-backup off-site key (keep it safe: it opens every off-site backup)\n");
        out.push_str(&format!("fingerprint: {}\n\n", self.fingerprint()));
        for (i, line) in self.0.chunks(4).enumerate() {
            let mut h = sha2::Sha256::new();
            h.update([i as u8]);
            h.update(line);
            let check = h.finalize();
            out.push_str(&format!(
                "{:02}: {}  {}\n",
                i + 1,
                hex::encode(line),
                hex::encode(&check[..2])
            ));
        }
        out
    }

    /// The key back from a paper export's 8 lines (`NN: hex  check`); every check must match.
    pub fn from_paper(text: &str) -> Result<Self, KeyError> {
        use sha2::Digest;
        let mut key = Zeroizing::new([0u8; 32]);
        let mut seen = 0usize;
        for line in text.lines() {
            let Some((num, rest)) = line.split_once(':') else {
                continue;
            };
            let Ok(n) = num.trim().parse::<usize>() else {
                continue;
            };
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let paper = |reason| KeyError::Paper { line: n, reason };
            let [data, check] = parts[..] else {
                return Err(paper("expected 8 hex digits and a 4-digit check"));
            };
            if !(1..=8).contains(&n) {
                return Err(paper("line number out of 1..8"));
            }
            let bytes = hex::decode(data).map_err(|_| paper("not hex"))?;
            if bytes.len() != 4 {
                return Err(paper("expected 8 hex digits"));
            }
            let mut h = sha2::Sha256::new();
            h.update([(n - 1) as u8]);
            h.update(&bytes);
            if hex::encode(&h.finalize()[..2]) != check.to_lowercase() {
                return Err(paper("the check does not match (typing error?)"));
            }
            key[(n - 1) * 4..n * 4].copy_from_slice(&bytes);
            seen |= 1 << (n - 1);
        }
        if seen != 0xff {
            return Err(KeyError::Paper {
                line: 0,
                reason: "expected the 8 lines 01 to 08",
            });
        }
        Ok(MasterKey(key))
    }
}

/// Argon2id parameters of a wrapped key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdf {
    /// Always `argon2id`.
    pub algorithm: String,
    /// Random salt, hex.
    pub salt: String,
    /// Memory, KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

/// The content of a key file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    /// Format of the key file (1).
    pub format: u32,
    /// The key's fingerprint (checked when the key is opened).
    pub fingerprint: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// The key in hex, when not wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The passphrase KDF, when wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<Kdf>,
    /// nonce ‖ AES-256-GCM(master) under the KDF's key, hex, when wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<String>,
}

fn argon2_key(pass: &[u8], kdf: &Kdf) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    if kdf.algorithm != "argon2id" {
        return Err(KeyError::UnknownKdf(kdf.algorithm.clone()));
    }
    let salt = hex::decode(&kdf.salt).map_err(|source| KeyError::Hex {
        field: "salt",
        source,
    })?;
    let params =
        argon2::Params::new(kdf.m_cost, kdf.t_cost, kdf.p_cost, Some(32)).map_err(KeyError::Kdf)?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass, &salt, &mut out[..])
        .map_err(KeyError::Kdf)?;
    Ok(out)
}

impl KeyFile {
    /// A key file for `key`, wrapped under `passphrase` when given (Argon2id, 64 MiB, 3 passes).
    pub fn new(key: &MasterKey, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        let mut file = KeyFile {
            format: 1,
            fingerprint: key.fingerprint(),
            created_at: chrono::Local::now().to_rfc3339(),
            key: None,
            kdf: None,
            wrapped: None,
        };
        match passphrase {
            None => file.key = Some(hex::encode(key.bytes())),
            Some(pass) => {
                let mut salt = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                let kdf = Kdf {
                    algorithm: "argon2id".into(),
                    salt: hex::encode(salt),
                    m_cost: 64 * 1024,
                    t_cost: 3,
                    p_cost: 1,
                };
                let kek = argon2_key(pass, &kdf)?;
                let cipher = Aes256Gcm::new_from_slice(&kek[..]).map_err(|_| KeyError::Wrap)?;
                let mut nonce = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut nonce);
                let ct = cipher
                    .encrypt(Nonce::from_slice(&nonce), &key.bytes()[..])
                    .map_err(|_| KeyError::Wrap)?;
                let mut w = nonce.to_vec();
                w.extend_from_slice(&ct);
                file.kdf = Some(kdf);
                file.wrapped = Some(hex::encode(w));
            }
        }
        Ok(file)
    }

    /// Whether a passphrase is needed to open it.
    pub fn needs_passphrase(&self) -> bool {
        self.wrapped.is_some()
    }

    /// Reads the key file at `path`.
    pub fn read(path: &Path) -> Result<Self, OffsiteError> {
        let text = std::fs::read_to_string(path).map_err(|source| OffsiteError::KeyIo {
            path: path.to_owned(),
            source,
        })?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| OffsiteError::BadKeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if file.format != 1 {
            return Err(OffsiteError::BadKeyFile {
                path: path.to_owned(),
                reason: format!("unknown key file format {}", file.format),
            });
        }
        Ok(file)
    }

    /// Writes it to `path` (mode 0600, never over an existing file).
    pub fn write_new(&self, path: &Path) -> Result<(), OffsiteError> {
        let io = |source| OffsiteError::KeyIo {
            path: path.to_owned(),
            source,
        };
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| OffsiteError::Json {
            action: "encode",
            what: path.display().to_string(),
            source,
        })?;
        json.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        json.zeroize();
        Ok(())
    }

    /// The master key, unwrapped with `passphrase` when the file needs one; its fingerprint
    /// must match the one recorded.
    pub fn open(&self, path: &Path, passphrase: Option<&[u8]>) -> Result<MasterKey, OffsiteError> {
        let bad = |reason: String| OffsiteError::BadKeyFile {
            path: path.to_owned(),
            reason,
        };
        let bytes: Zeroizing<Vec<u8>> = match (&self.key, &self.wrapped, &self.kdf) {
            (Some(hexkey), None, _) => {
                Zeroizing::new(hex::decode(hexkey).map_err(|e| bad(format!("key: {e}")))?)
            }
            (None, Some(w), Some(kdf)) => {
                let pass = passphrase.ok_or_else(|| {
                    bad("the key is protected by a passphrase: give --passphrase-file or VM_BACKUP_PASSPHRASE".into())
                })?;
                let w = hex::decode(w).map_err(|e| bad(format!("wrapped: {e}")))?;
                if w.len() < 12 {
                    return Err(bad("wrapped key too short".into()));
                }
                let kek = argon2_key(pass, kdf).map_err(|e| bad(e.to_string()))?;
                let cipher = Aes256Gcm::new_from_slice(&kek[..]).map_err(|e| bad(e.to_string()))?;
                Zeroizing::new(
                    cipher
                        .decrypt(Nonce::from_slice(&w[..12]), &w[12..])
                        .map_err(|_| OffsiteError::WrongPassphrase(path.to_owned()))?,
                )
            }
            _ => return Err(bad("neither \"key\" nor \"wrapped\" with \"kdf\"".into())),
        };
        let arr: [u8; 32] = bytes[..]
            .try_into()
            .map_err(|_| bad("the key is not 32 bytes".into()))?;
        let key = MasterKey::from_bytes(arr);
        if key.fingerprint() != self.fingerprint {
            return Err(bad(format!(
                "the key's fingerprint {} is not the recorded {}",
                key.fingerprint(),
                self.fingerprint
            )));
        }
        Ok(key)
    }
}

/// Reads and opens the key file at `path`, with the passphrase from `passphrase_file` or the
/// environment variable `VM_BACKUP_PASSPHRASE` when the key is wrapped.
pub fn load(path: &Path, passphrase_file: Option<&Path>) -> Result<MasterKey, OffsiteError> {
    let file = KeyFile::read(path)?;
    let pass = if file.needs_passphrase() {
        read_passphrase(passphrase_file)?
    } else {
        None
    };
    file.open(path, pass.as_deref().map(|p| &p[..]))
}

/// The passphrase from a file (first line) or `VM_BACKUP_PASSPHRASE`.
pub fn read_passphrase(file: Option<&Path>) -> Result<Option<Zeroizing<Vec<u8>>>, OffsiteError> {
    if let Some(f) = file {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(f).map_err(|source| OffsiteError::KeyIo {
                    path: PathBuf::from(f),
                    source,
                })?,
            );
        let line = text.lines().next().unwrap_or("");
        return Ok(Some(Zeroizing::new(line.as_bytes().to_vec())));
    }
    Ok(std::env::var("VM_BACKUP_PASSPHRASE")
        .ok()
        .map(|p| Zeroizing::new(p.into_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_round_trip_and_typo_caught() {
        let k = MasterKey::generate();
        let paper = k.paper();
        let back = MasterKey::from_paper(&paper).unwrap();
        assert_eq!(back.bytes(), k.bytes());
        // One hex digit changed on line 3 is caught by its check.
        let mut lines: Vec<String> = paper.lines().map(str::to_owned).collect();
        let i = lines.iter().position(|l| l.starts_with("03:")).unwrap();
        let c = lines[i].as_bytes()[4];
        let swapped = if c == b'0' { '1' } else { '0' };
        lines[i].replace_range(4..5, &swapped.to_string());
        assert!(MasterKey::from_paper(&lines.join("\n")).is_err());
    }

    #[test]
    fn wrapped_key_opens_only_with_its_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let k = MasterKey::generate();
        // Small KDF cost for the test: the format carries the parameters.
        let mut f = KeyFile::new(&k, Some(b"secret")).unwrap();
        assert!(f.key.is_none() && f.wrapped.is_some());
        f.write_new(&path).unwrap();
        assert!(f.write_new(&path).is_err(), "never over an existing file");
        f = KeyFile::read(&path).unwrap();
        assert_eq!(f.open(&path, Some(b"secret")).unwrap().bytes(), k.bytes());
        assert!(matches!(
            f.open(&path, Some(b"wrong")),
            Err(OffsiteError::WrongPassphrase(_))
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(k.bytes())));
    }

    #[test]
    fn derived_keys_differ_and_fingerprint_is_stable() {
        let k = MasterKey::from_bytes([7; 32]);
        let d = k.derive();
        assert_ne!(d.encryption[..], d.chunk_id[..]);
        assert_ne!(d.encryption[..], [7u8; 32][..]);
        assert_eq!(
            k.fingerprint(),
            MasterKey::from_bytes([7; 32]).fingerprint()
        );
        assert_eq!(k.fingerprint().len(), 19);
    }
}
