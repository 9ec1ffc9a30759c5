//! Hashing in the same pass as the copy.
//!
//! The I/O engine hands every block (a filled buffer, or a hole) to [`consume`], which runs on
//! its own thread: it puts the blocks back in file order, feeds the whole-file SHA-256 in stream
//! order (holes as zeros, so the digest equals `sha256sum`'s), and routes each piece to the
//! chunk worker that owns its chunk (`chunk % workers`), through crossbeam channels. A chunk
//! worker detects all-zero chunks without hashing them: their digest comes from a value
//! precomputed once per chunk length.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use super::buffer::Filled;
use super::ticker::Ticker;
use super::{ChunkManifest, HashMode};

/// A 64 KiB block of zeros, fed to hashers for holes.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// One block handed from the I/O engine to the hashers, in any order.
pub(crate) struct Item {
    /// Offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The bytes; `None` for a hole (zeros).
    pub data: Option<Arc<Filled>>,
}

/// Whether every byte of `data` is zero. Compares 64-byte blocks with a vectorisable OR fold.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Feeds `n` zero bytes into `hasher`.
pub(crate) fn feed_zeros(hasher: &mut Sha256, mut n: u64) {
    while n > 0 {
        let step = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..step]);
        n -= step as u64;
    }
}

/// SHA-256 of `len` zero bytes.
pub fn zero_digest(len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    feed_zeros(&mut h, len);
    h.finalize().into()
}

/// The manifest root: SHA-256 over the concatenated binary chunk digests.
pub fn root_digest(digests: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    h.finalize().into()
}

/// The digest of one chunk and whether it was all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkDigest {
    /// SHA-256 of the chunk.
    pub digest: [u8; 32],
    /// The chunk was all zero (holes or zero bytes).
    pub zero: bool,
}

/// What to hash and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HashSettings {
    /// Which digests.
    pub mode: HashMode,
    /// Chunk size of the manifest.
    pub chunk_size: u64,
    /// Chunk worker threads.
    pub workers: usize,
    /// Logical size of the file.
    pub size: u64,
}

impl HashSettings {
    fn chunks(&self) -> bool {
        matches!(self.mode, HashMode::Both | HashMode::Chunks)
    }

    fn file(&self) -> bool {
        matches!(self.mode, HashMode::Both | HashMode::File)
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        let start = chunk * self.chunk_size;
        (self.size - start).min(self.chunk_size)
    }
}

/// What the hashers computed.
#[derive(Debug, Default)]
pub(crate) struct HashResult {
    /// Whole-file digest.
    pub file: Option<[u8; 32]>,
    /// Chunk digests, in order.
    pub chunks: Option<Vec<ChunkDigest>>,
    /// Bytes seen contiguously from offset 0 (equals the size when nothing was lost).
    pub done: u64,
}

/// A piece of one chunk for a chunk worker.
struct Piece {
    chunk: u64,
    bytes: PieceBytes,
    last: bool,
}

enum PieceBytes {
    Data(Arc<Filled>, Range<usize>),
    Zeros(u64),
}

/// Receives blocks until the engine drops its sender, hashes them, and reports progress.
pub(crate) fn consume(rx: Receiver<Item>, settings: HashSettings, ticker: &Ticker) -> HashResult {
    if !settings.chunks() {
        return order(rx, settings, ticker, Vec::new());
    }
    let workers = settings.workers.max(1);
    let full_zero = zero_digest(settings.chunk_size);
    let tail = settings.size % settings.chunk_size;
    let tail_zero = if tail == 0 {
        full_zero
    } else {
        zero_digest(tail)
    };
    let count = settings.size.div_ceil(settings.chunk_size);
    std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = crossbeam_channel::unbounded::<Piece>();
            senders.push(tx);
            handles
                .push(s.spawn(move || chunk_worker(rx, settings.chunk_size, full_zero, tail_zero)));
        }
        // `order` drops the senders when done, which ends the workers.
        let mut result = order(rx, settings, ticker, senders);
        let mut chunks = vec![None; count as usize];
        for h in handles {
            let done = match h.join() {
                Ok(d) => d,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            for (i, d) in done {
                if let Some(slot) = chunks.get_mut(i as usize) {
                    *slot = Some(d);
                }
            }
        }
        // Chunks are complete only when the whole file went through.
        if result.done == settings.size {
            result.chunks = chunks.into_iter().collect();
        }
        result
    })
}

/// The in-order stage: reorders blocks by offset, feeds the stream hasher and the chunk workers.
fn order(
    rx: Receiver<Item>,
    settings: HashSettings,
    ticker: &Ticker,
    senders: Vec<Sender<Piece>>,
) -> HashResult {
    let mut stream = settings.file().then(Sha256::new);
    let mut pending: BTreeMap<u64, Item> = BTreeMap::new();
    let mut next = 0u64;
    for item in rx {
        pending.insert(item.offset, item);
        while let Some(item) = pending.remove(&next) {
            if !senders.is_empty() {
                route(&item, settings, &senders);
            }
            if let Some(h) = stream.as_mut() {
                match &item.data {
                    Some(d) => h.update(d.data()),
                    None => feed_zeros(h, item.len),
                }
            }
            next += item.len;
            ticker.tick(next);
        }
    }
    let file = if next == settings.size {
        stream.map(|h| h.finalize().into())
    } else {
        None
    };
    HashResult {
        file,
        chunks: None,
        done: next,
    }
}

/// Splits an item at chunk boundaries and sends each piece to the worker owning its chunk.
fn route(item: &Item, settings: HashSettings, senders: &[Sender<Piece>]) {
    let mut pos = item.offset;
    let end = item.offset + item.len;
    while pos < end {
        let chunk = pos / settings.chunk_size;
        let chunk_end = chunk * settings.chunk_size + settings.chunk_len(chunk);
        let piece_end = end.min(chunk_end);
        let bytes = match &item.data {
            Some(d) => {
                let from = (pos - item.offset) as usize;
                let to = (piece_end - item.offset) as usize;
                PieceBytes::Data(Arc::clone(d), from..to)
            }
            None => PieceBytes::Zeros(piece_end - pos),
        };
        let worker = (chunk % senders.len() as u64) as usize;
        // A worker only goes away by panicking, which `consume` propagates.
        let _ = senders[worker].send(Piece {
            chunk,
            bytes,
            last: piece_end == chunk_end,
        });
        pos = piece_end;
    }
}

/// Hashes the chunks routed to one worker; each arrives whole and in order.
fn chunk_worker(
    rx: Receiver<Piece>,
    chunk_size: u64,
    full_zero: [u8; 32],
    tail_zero: [u8; 32],
) -> Vec<(u64, ChunkDigest)> {
    let mut out = Vec::new();
    let mut hasher: Option<Sha256> = None;
    let mut zeros = 0u64; // leading zero bytes not yet hashed
    let mut current = u64::MAX;
    for piece in rx {
        if piece.chunk != current {
            current = piece.chunk;
            hasher = None;
            zeros = 0;
        }
        match piece.bytes {
            PieceBytes::Zeros(n) => match hasher.as_mut() {
                Some(h) => feed_zeros(h, n),
                None => zeros += n,
            },
            PieceBytes::Data(filled, range) => {
                let data = &filled.data()[range];
                match hasher.as_mut() {
                    Some(h) => h.update(data),
                    None if is_zero(data) => zeros += data.len() as u64,
                    None => {
                        let mut h = Sha256::new();
                        feed_zeros(&mut h, zeros);
                        h.update(data);
                        hasher = Some(h);
                    }
                }
            }
        }
        if piece.last {
            let digest = match hasher.take() {
                Some(h) => ChunkDigest {
                    digest: h.finalize().into(),
                    zero: false,
                },
                None => ChunkDigest {
                    digest: if zeros == chunk_size {
                        full_zero
                    } else {
                        tail_zero
                    },
                    zero: true,
                },
            };
            out.push((piece.chunk, digest));
            zeros = 0;
        }
    }
    out
}

/// The manifest of a file of `file_size` bytes from its chunk digests, in order.
pub(crate) fn manifest_of(
    chunk_size: u64,
    file_size: u64,
    chunks: &[ChunkDigest],
) -> ChunkManifest {
    let digests: Vec<[u8; 32]> = chunks.iter().map(|c| c.digest).collect();
    ChunkManifest {
        chunk_size,
        file_size,
        digests: digests.iter().map(hex::encode).collect(),
        zero_chunks: chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.zero)
            .map(|(i, _)| i as u64)
            .collect(),
        root: hex::encode(root_digest(&digests)),
    }
}

/// The digests of a file that [`StreamHasher`] computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigests {
    /// Whole-file SHA-256, lowercase hex (equals `sha256sum`'s).
    pub sha256: String,
    /// Per-chunk digests; `manifest.file_size` is the number of bytes hashed.
    pub manifest: ChunkManifest,
}

/// The copier's hashing for a driver that reads the bytes itself, in file order (the Bacula
/// plugin's stream mode, where the File Daemon pulls the data): the same whole-file digest,
/// chunk digests, all-zero chunk detection and manifest root as a copy, in one thread.
#[derive(Debug, Clone)]
pub struct StreamHasher {
    chunk_size: u64,
    whole: Sha256,
    /// The current chunk's hasher; `None` while the chunk has been all zeros so far.
    chunk: Option<Sha256>,
    /// Bytes of the current chunk so far.
    in_chunk: u64,
    size: u64,
    chunks: Vec<ChunkDigest>,
    /// The digest of a full all-zero chunk, computed on first use.
    full_zero: Option<[u8; 32]>,
}

impl StreamHasher {
    /// A hasher cutting chunks of `chunk_size` bytes (at least 1).
    pub fn new(chunk_size: u64) -> Self {
        Self {
            chunk_size: chunk_size.max(1),
            whole: Sha256::new(),
            chunk: None,
            in_chunk: 0,
            size: 0,
            chunks: Vec::new(),
            full_zero: None,
        }
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk).min(data.len() as u64) as usize;
            let (now, rest) = data.split_at(room);
            match self.chunk.as_mut() {
                Some(h) => h.update(now),
                None if is_zero(now) => {}
                None => {
                    let mut h = Sha256::new();
                    feed_zeros(&mut h, self.in_chunk);
                    h.update(now);
                    self.chunk = Some(h);
                }
            }
            self.in_chunk += now.len() as u64;
            if self.in_chunk == self.chunk_size {
                self.close_chunk();
            }
            data = rest;
        }
    }

    fn close_chunk(&mut self) {
        let digest = match self.chunk.take() {
            Some(h) => ChunkDigest {
                digest: h.finalize().into(),
                zero: false,
            },
            None if self.in_chunk == self.chunk_size => ChunkDigest {
                digest: *self
                    .full_zero
                    .get_or_insert_with(|| zero_digest(self.chunk_size)),
                zero: true,
            },
            None => ChunkDigest {
                digest: zero_digest(self.in_chunk),
                zero: true,
            },
        };
        self.chunks.push(digest);
        self.in_chunk = 0;
    }

    /// The digests of everything fed.
    pub fn finish(mut self) -> FileDigests {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        FileDigests {
            sha256: hex::encode(self.whole.finalize()),
            manifest: manifest_of(self.chunk_size, self.size, &self.chunks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_hasher_matches_one_pass_digests_across_chunk_edges() {
        let chunk = 1u64 << 16;
        let mut data = vec![0u8; (3 * chunk + 10) as usize];
        data[(chunk + 3) as usize] = 7;
        data[(3 * chunk + 1) as usize] = 1;
        let mut h = StreamHasher::new(chunk);
        for piece in data.chunks(4096 + 3) {
            h.update(piece);
        }
        let out = h.finish();
        assert_eq!(out.sha256, hex::encode(Sha256::digest(&data)));
        let m = &out.manifest;
        assert_eq!((m.chunk_size, m.file_size), (chunk, data.len() as u64));
        assert_eq!(m.zero_chunks, vec![0, 2]);
        let expected: Vec<String> = data
            .chunks(chunk as usize)
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        assert_eq!(m.digests, expected);
        let binary: Vec<[u8; 32]> = data
            .chunks(chunk as usize)
            .map(|c| Sha256::digest(c).into())
            .collect();
        assert_eq!(m.root, hex::encode(root_digest(&binary)));
        let empty = StreamHasher::new(chunk).finish();
        assert!(empty.manifest.digests.is_empty() && empty.manifest.file_size == 0);
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[70] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn zero_digest_matches_plain_hashing() {
        let len = 200_000u64;
        let plain: [u8; 32] = Sha256::digest(vec![0u8; len as usize]).into();
        assert_eq!(zero_digest(len), plain);
        assert_eq!(
            hex::encode(zero_digest(0)),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
