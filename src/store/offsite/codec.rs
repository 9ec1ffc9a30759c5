//! How a chunk or a manifest is stored: compressed with zstd when that makes it smaller, then
//! encrypted with AES-256-GCM under the derived encryption key, with a random 96-bit nonce and
//! the object's name as associated data (an object copied under another name does not open).
//!
//! A chunk object: `b"VMC1"`, one byte of encoding (0 stored, 1 zstd), the 12-byte nonce, the
//! ciphertext with its 16-byte tag. A sealed object (manifest, marker check): the nonce, then
//! the ciphertext with its tag.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use super::chunk_id::ChunkId;
use super::key::DerivedKeys;

/// The magic of a chunk object.
const MAGIC: &[u8; 4] = b"VMC1";
/// Encoding byte: the plaintext as is.
const STORED: u8 = 0;
/// Encoding byte: zstd.
const ZSTD: u8 = 1;
/// The zstd level (fast, and most of the gain on disk images).
const ZSTD_LEVEL: i32 = 3;

/// Why a stored object does not open.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Shorter than nonce and tag.
    #[error("too short to be an encrypted object")]
    TooShort,
    /// Not a chunk object.
    #[error("not a vm-backup chunk object (bad magic)")]
    BadMagic,
    /// The GCM tag does not match.
    #[error("authentication failed (altered, or another key)")]
    Authentication,
    /// An encoding byte this build does not know.
    #[error("unknown chunk encoding {0}")]
    UnknownEncoding(u8),
    /// zstd refused the frame.
    #[error("zstd: {0}")]
    Decompress(#[source] std::io::Error),
}

impl CodecError {
    /// What kind of failure this is: always a damaged or altered object.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Corrupt
    }
}

fn cipher(keys: &DerivedKeys) -> Aes256Gcm {
    // A 32-byte key is always the right length for AES-256.
    match Aes256Gcm::new_from_slice(&keys.encryption[..]) {
        Ok(c) => c,
        Err(_) => unreachable!("AES-256-GCM takes a 32-byte key"),
    }
}

fn nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Encrypts `plain` with `aad`: nonce ‖ ciphertext ‖ tag.
fn encrypt(keys: &DerivedKeys, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let n = nonce();
    // AES-GCM encryption fails only on inputs over 64 GiB; chunks are 4 MiB.
    let ct = match cipher(keys).encrypt(Nonce::from_slice(&n), Payload { msg: plain, aad }) {
        Ok(ct) => ct,
        Err(_) => unreachable!("AES-GCM input far below its limit"),
    };
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&n);
    out.extend_from_slice(&ct);
    out
}

fn decrypt(keys: &DerivedKeys, aad: &[u8], bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    if bytes.len() < 12 + 16 {
        return Err(CodecError::TooShort);
    }
    cipher(keys)
        .decrypt(
            Nonce::from_slice(&bytes[..12]),
            Payload {
                msg: &bytes[12..],
                aad,
            },
        )
        .map_err(|_| CodecError::Authentication)
}

/// The stored form of the chunk `plain` whose id is `id`.
pub fn encode_chunk(keys: &DerivedKeys, id: &ChunkId, plain: &[u8]) -> Vec<u8> {
    let (encoding, body) = match zstd::bulk::compress(plain, ZSTD_LEVEL) {
        Ok(z) if z.len() < plain.len() => (ZSTD, z),
        // Incompressible (or the compressor failed): stored as is.
        _ => (STORED, plain.to_vec()),
    };
    let mut out = Vec::with_capacity(5 + 28 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(encoding);
    out.extend_from_slice(&encrypt(keys, &aad(id, encoding), &body));
    out
}

fn aad(id: &ChunkId, encoding: u8) -> Vec<u8> {
    let mut a = b"chunk:".to_vec();
    a.extend_from_slice(&id.0);
    a.push(encoding);
    a
}

/// The plaintext of a stored chunk (its id is checked by the caller).
pub fn decode_chunk(keys: &DerivedKeys, id: &ChunkId, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    if bytes.len() < 5 || &bytes[..4] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let encoding = bytes[4];
    let body = decrypt(keys, &aad(id, encoding), &bytes[5..])?;
    match encoding {
        STORED => Ok(body),
        // A chunk is at most 4 MiB plus slack: bound the output so a forged frame cannot
        // make us allocate without limit.
        ZSTD => zstd::bulk::decompress(&body, 64 << 20).map_err(CodecError::Decompress),
        other => Err(CodecError::UnknownEncoding(other)),
    }
}

/// Seals `plain` under the object name `name`.
pub fn seal(keys: &DerivedKeys, name: &str, plain: &[u8]) -> Vec<u8> {
    encrypt(keys, name.as_bytes(), plain)
}

/// Opens what [`seal`] sealed under `name`.
pub fn open_sealed(keys: &DerivedKeys, name: &str, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    decrypt(keys, name.as_bytes(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::offsite::chunk_id;
    use crate::store::offsite::key::MasterKey;

    #[test]
    fn chunk_round_trip_compresses_and_hides() {
        let k = MasterKey::from_bytes([3; 32]).derive();
        let plain: Vec<u8> = b"vm-backup marker block "
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        let id = chunk_id::of(&k, &plain);
        let enc = encode_chunk(&k, &id, &plain);
        assert!(
            enc.len() < plain.len() / 10,
            "compressible data stored smaller"
        );
        assert!(!enc.windows(23).any(|w| w == b"vm-backup marker block "));
        assert_eq!(decode_chunk(&k, &id, &enc).unwrap(), plain);
        // A flipped byte, another id, another key: refused.
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_chunk(&k, &id, &bad).is_err());
        let other = chunk_id::of(&k, b"other");
        assert!(decode_chunk(&k, &other, &enc).is_err());
        let k2 = MasterKey::from_bytes([4; 32]).derive();
        assert!(decode_chunk(&k2, &id, &enc).is_err());
    }

    #[test]
    fn incompressible_is_stored_with_small_overhead() {
        let k = MasterKey::from_bytes([3; 32]).derive();
        let mut plain = vec![0u8; 65536];
        rand::rngs::OsRng.fill_bytes(&mut plain);
        let id = chunk_id::of(&k, &plain);
        let enc = encode_chunk(&k, &id, &plain);
        assert_eq!(enc[4], STORED);
        assert_eq!(enc.len(), plain.len() + 5 + 12 + 16);
        assert_eq!(decode_chunk(&k, &id, &enc).unwrap(), plain);
    }

    #[test]
    fn sealed_is_bound_to_its_name() {
        let k = MasterKey::from_bytes([5; 32]).derive();
        let s = seal(&k, "backups/h/v/s", b"{}");
        assert_eq!(open_sealed(&k, "backups/h/v/s", &s).unwrap(), b"{}");
        assert!(open_sealed(&k, "backups/h/v/t", &s).is_err());
    }
}
