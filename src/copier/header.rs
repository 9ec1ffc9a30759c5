//! The one transform the copier makes on the way, when asked: rewrite the backing file name
//! in the header of a qcow2 image (v2 or v3), so that a copied layer names its parent by a
//! name its owner chose (a relative name inside the backup folder). The name lives in
//! cluster 0: `backing_file_offset` (u64 BE at 8) and `backing_file_size` (u32 BE at 16) say
//! where; the backing format is a header extension (0xe2792aca) and stays as it is (a layer's
//! parent keeps its format). The rewrite happens on the first block, after it is read and
//! before it is hashed and written, so the digests are those of the written file; a name that
//! does not fit where the old one was (in the unused rest of the first block and of cluster
//! 0) is not written, and the report says why: the caller rebases after the copy.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The qcow2 magic, `QFI\xfb`.
const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The longest backing file name qemu accepts.
const MAX_NAME: usize = 1023;
/// Header length of a version 2 image (fixed).
const V2_HEADER_LEN: u64 = 72;

/// The backing file name the copier should write into the copy's qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRename {
    /// The new name, as the header will hold it (a relative name: a file beside the copy).
    pub new_name: String,
}

/// What became of a requested [`BackingRename`] (in the [`super::CopyReport`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRewrite {
    /// Whether the header of the copy names `new_name`.
    pub applied: bool,
    /// The name in the source's header (when it could be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_name: Option<String>,
    /// The name asked for.
    pub new_name: String,
    /// Why it was not applied (empty when it was).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// SHA-256 of the source's first chunk (before the rewrite), when chunks were hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_chunk0: Option<String>,
    /// The chunk-manifest root of the source itself: the copy's digests with the source's
    /// first chunk, so the source can be compared with the copy without hashing it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_root: Option<String>,
}

/// Why a header was not rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotRewritten {
    /// The first block does not start with the qcow2 magic.
    #[error("not a qcow2 image")]
    NotQcow2,
    /// A qcow2 version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// The header names no backing file.
    #[error("the header names no backing file")]
    NoBackingFile,
    /// The header or its extensions run past the first block, or the name sits among them.
    #[error("unexpected header layout: {0}")]
    Layout(&'static str),
    /// The new name is longer than qemu allows.
    #[error("the new name is {0} bytes long, qemu allows {MAX_NAME}")]
    TooLong(usize),
    /// The new name does not fit where the old one was.
    #[error("the new name needs {need} bytes from offset {offset}, only {room} are free there")]
    DoesNotFit {
        /// Where the name starts.
        offset: u64,
        /// Bytes the new name needs.
        need: usize,
        /// Bytes free from `offset` (the old name plus the zero bytes after it, within
        /// cluster 0 and the first block).
        room: usize,
    },
    /// The copy's first block was never read (the source is empty or starts with a hole).
    #[error("the first block of the source was not read")]
    NoFirstBlock,
}

/// A header rewritten in a block: what was there before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The name the header held.
    pub old_name: String,
    /// The original bytes `[0, original.len())` of the block (header up to the end of the
    /// longer name), to compute the source's own digest.
    pub original: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}

/// Rewrites the backing file name in the qcow2 header at the start of `block` (the file's
/// first bytes) to `new_name`; on refusal `block` is left untouched.
pub fn rewrite_backing_name(block: &mut [u8], new_name: &[u8]) -> Result<Rewritten, NotRewritten> {
    if block.get(0..4) != Some(&MAGIC[..]) {
        return Err(NotRewritten::NotQcow2);
    }
    let short = NotRewritten::Layout("the header is longer than the first block");
    let version = be32(block, 4).ok_or(short.clone())?;
    if version != 2 && version != 3 {
        return Err(NotRewritten::Version(version));
    }
    let offset = be64(block, 8).ok_or(short.clone())?;
    let size = be32(block, 16).ok_or(short.clone())? as u64;
    let cluster_bits = be32(block, 20).ok_or(short.clone())?;
    if offset == 0 || size == 0 {
        return Err(NotRewritten::NoBackingFile);
    }
    if new_name.len() > MAX_NAME {
        return Err(NotRewritten::TooLong(new_name.len()));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(NotRewritten::Layout("cluster size out of range"));
    }
    let header_len = if version == 2 {
        V2_HEADER_LEN
    } else {
        be32(block, 100).ok_or(short.clone())? as u64
    };
    // Walk the header extensions: the name must come after their end marker.
    let mut at = header_len;
    loop {
        let a = usize::try_from(at).map_err(|_| short.clone())?;
        let kind = be32(block, a).ok_or(short.clone())?;
        let len = be32(block, a + 4).ok_or(short.clone())? as u64;
        at += 8;
        if kind == 0 {
            break;
        }
        at += len.next_multiple_of(8);
        if at > offset {
            return Err(NotRewritten::Layout(
                "the backing name sits among the extensions",
            ));
        }
    }
    if offset < at {
        return Err(NotRewritten::Layout(
            "the backing name sits among the extensions",
        ));
    }
    let old_end = offset + size;
    let limit = (1u64 << cluster_bits).min(block.len() as u64);
    if old_end > limit {
        return Err(short);
    }
    // Room: the old name and the zero bytes after it, up to the end of cluster 0 (or of
    // the block).
    let (o, e, l) = (offset as usize, old_end as usize, limit as usize);
    let free_after = block[e..l].iter().take_while(|&&b| b == 0).count();
    let room = size as usize + free_after;
    if new_name.len() > room {
        return Err(NotRewritten::DoesNotFit {
            offset,
            need: new_name.len(),
            room,
        });
    }
    let end = e.max(o + new_name.len());
    let original = block[..end].to_vec();
    let old_name = String::from_utf8_lossy(&block[o..e]).into_owned();
    block[o..o + new_name.len()].copy_from_slice(new_name);
    block[o + new_name.len()..end].fill(0);
    block[16..20].copy_from_slice(&(new_name.len() as u32).to_be_bytes());
    Ok(Rewritten { old_name, original })
}

/// A rewrite in progress: shared by the I/O threads, applied to the block at offset 0.
pub(crate) struct Rewrite {
    new_name: String,
    outcome: Mutex<Option<Result<Rewritten, NotRewritten>>>,
}

impl Rewrite {
    /// A rewrite to `rename`.
    pub(crate) fn new(rename: &BackingRename) -> Self {
        Self {
            new_name: rename.new_name.clone(),
            outcome: Mutex::new(None),
        }
    }

    /// Applies the rewrite when `offset` is 0 (the file's first block, `data` its valid
    /// bytes); other blocks pass untouched.
    #[inline]
    pub(crate) fn apply(&self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            return;
        }
        let r = rewrite_backing_name(data, self.new_name.as_bytes());
        if let Ok(mut slot) = self.outcome.lock() {
            *slot = Some(r);
        }
    }

    /// The name asked for.
    pub(crate) fn new_name(&self) -> &str {
        &self.new_name
    }

    /// What happened (`NoFirstBlock` when the first block was never seen).
    pub(crate) fn take(&self) -> Result<Rewritten, NotRewritten> {
        self.outcome
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .unwrap_or(Err(NotRewritten::NoFirstBlock))
    }
}
