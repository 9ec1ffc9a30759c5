//! Keyed chunk ids: HMAC-SHA-256 of the plaintext chunk under a key derived from the master
//! key. Equal chunks get equal ids (deduplication across backups and VMs), but without the key
//! an id says nothing about the content: a known block (a zero page, a well-known binary)
//! cannot be looked for among the object names, as it could with plain SHA-256 names.

use hmac::{Hmac, Mac};

use super::key::DerivedKeys;

/// The id of a chunk (32 bytes; its hex form names the object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From 64 hex digits; `None` otherwise.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(ChunkId(v.try_into().ok()?))
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The id of the plaintext chunk `plain`.
pub fn of(keys: &DerivedKeys, plain: &[u8]) -> ChunkId {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = match <Hmac<sha2::Sha256> as Mac>::new_from_slice(&keys.chunk_id[..]) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(plain);
    ChunkId(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::offsite::key::MasterKey;
    use sha2::Digest;

    #[test]
    fn ids_are_keyed_and_deterministic() {
        let a = MasterKey::from_bytes([1; 32]).derive();
        let b = MasterKey::from_bytes([2; 32]).derive();
        let block = vec![0u8; 4096];
        assert_eq!(of(&a, &block), of(&a, &block));
        assert_ne!(of(&a, &block), of(&b, &block));
        // Not the plain SHA-256 a reader without the key could compute.
        assert_ne!(of(&a, &block).0[..], sha2::Sha256::digest(&block)[..]);
        let id = of(&a, b"x");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("zz"), None);
    }
}
