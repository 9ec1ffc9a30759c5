//! Hashing in the same pass as the copy.
//!
//! The I/O engine hands every block (a filled buffer, or a hole) to [`consume`], which runs on
//! its own thread: it puts the blocks back in file order, hands them in that order to the
//! whole-file SHA-256 (a thread of its own; holes as zeros, so the digest equals
//! `sha256sum`'s), and routes each piece to the chunk worker that owns its chunk
//! (`chunk % workers`), through crossbeam channels. The whole-file hasher never holds more than
//! a share of the buffers: past it, it reads the block again from the destination when it gets
//! there, so hashing the holes of a sparse image overlaps the copy of its data. A chunk
//! worker detects all-zero chunks without hashing them: their digest comes from a value
//! precomputed once per chunk length.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use super::buffer::Filled;
use super::ticker::Ticker;
use super::{ChunkManifest, CopyError, HashMode};

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
    /// Most buffers the whole-file hasher may hold (the rest of the pool keeps the copy going).
    pub hold: usize,
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
    /// A block the whole-file hasher could not read again from the destination.
    pub error: Option<CopyError>,
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

/// Where the whole-file hasher reads again a block it fell behind on: the destination, opened
/// for reading (the bytes the copy wrote, once its write has completed).
pub(crate) struct Reread<'a> {
    /// The destination, readable.
    pub file: &'a File,
    /// Its final path, for errors.
    pub path: &'a Path,
}

/// One in-order item for the whole-file hasher.
enum StreamItem {
    /// A block held in memory (counted in `held`).
    Data(Arc<Filled>),
    /// A block let go so the copy goes on; still in memory if someone holds it, else read
    /// again from the destination (its buffer came back to the pool, so its write completed).
    Later(Weak<Filled>, u64, usize),
    /// `n` zero bytes (a hole).
    Zeros(u64),
}

/// Most items queued for the whole-file hasher (a few MiB of bookkeeping): beyond it, the
/// in-order stage waits, which only happens when the hasher is hundreds of GiB behind.
const STREAM_QUEUE: usize = 1 << 18;

/// Receives blocks until the engine drops its sender, hashes them, and reports progress.
///
/// Three stages run side by side: the in-order stage (this thread: reorders, routes pieces to
/// the chunk workers, ticks), the whole-file SHA-256 on a thread of its own, and the chunk
/// workers. The whole-file hasher must see every byte in order, holes as zeros, so on a sparse
/// image it spends most of its time on zeros. Given a way to read the destination again
/// (`reread`: the copy writes through the page cache), it keeps at most `settings.hold`
/// buffers, and past that the blocks go to it as weak references, read again from the
/// destination when it gets there, so the copy never waits for it. Without one (O_DIRECT
/// writes, where that read would go to the device) it keeps every block it is handed and the
/// pool's back-pressure paces the copy to it. Either way the run costs max(hash of the virtual
/// size, copy of the allocated data), not their sum.
pub(crate) fn consume(
    rx: Receiver<Item>,
    settings: HashSettings,
    reread: Option<Reread<'_>>,
    ticker: &Ticker,
) -> HashResult {
    let workers = if settings.chunks() {
        settings.workers.max(1)
    } else {
        0
    };
    let full_zero = zero_digest(settings.chunk_size);
    let tail = settings.size % settings.chunk_size;
    let tail_zero = if tail == 0 {
        full_zero
    } else {
        zero_digest(tail)
    };
    let count = settings.size.div_ceil(settings.chunk_size);
    let held = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = crossbeam_channel::unbounded::<Piece>();
            senders.push(tx);
            handles
                .push(s.spawn(move || chunk_worker(rx, settings.chunk_size, full_zero, tail_zero)));
        }
        let (stream_tx, stream) = if settings.file() {
            let (tx, rx) = crossbeam_channel::bounded::<StreamItem>(STREAM_QUEUE);
            let held = &held;
            let reread = reread.as_ref();
            (
                Some(tx),
                Some(s.spawn(move || whole_file(rx, held, reread))),
            )
        } else {
            (None, None)
        };
        // A hold limit only makes sense when the hasher can find a let-go block again.
        let hold = match reread {
            Some(_) => settings.hold,
            None => usize::MAX,
        };
        // `order` drops the senders when done, which ends the workers and the stream hasher.
        let mut result = order(rx, settings, ticker, senders, stream_tx, &held, hold);
        if let Some(h) = stream {
            let (seen, digest) = match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            match digest {
                Ok(d) if seen == settings.size && result.done == settings.size => {
                    result.file = Some(d)
                }
                Ok(_) => {}
                Err(e) => result.error = Some(e),
            }
        }
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
        if workers > 0 && result.done == settings.size {
            result.chunks = chunks.into_iter().collect();
        }
        result
    })
}

/// The in-order stage: reorders blocks by offset, routes them to the chunk workers and the
/// whole-file hasher (at most `hold` buffers held by the latter, counted in `held`).
fn order(
    rx: Receiver<Item>,
    settings: HashSettings,
    ticker: &Ticker,
    senders: Vec<Sender<Piece>>,
    stream: Option<Sender<StreamItem>>,
    held: &AtomicUsize,
    hold: usize,
) -> HashResult {
    let mut pending: BTreeMap<u64, Item> = BTreeMap::new();
    let mut next = 0u64;
    for item in rx {
        pending.insert(item.offset, item);
        while let Some(item) = pending.remove(&next) {
            if !senders.is_empty() {
                route(&item, settings, &senders);
            }
            if let Some(tx) = stream.as_ref() {
                let out = match item.data {
                    None => StreamItem::Zeros(item.len),
                    // The first block always stays in memory (nothing is held before it).
                    Some(d) if item.offset == 0 || held.load(Ordering::Acquire) < hold => {
                        held.fetch_add(1, Ordering::AcqRel);
                        StreamItem::Data(d)
                    }
                    Some(d) => StreamItem::Later(Arc::downgrade(&d), item.offset, d.len()),
                };
                // The hasher only goes away by panicking (propagated) or failing (reported).
                let _ = tx.send(out);
            }
            next += item.len;
            ticker.tick(next);
        }
    }
    HashResult {
        file: None,
        chunks: None,
        done: next,
        error: None,
    }
}

/// The whole-file SHA-256, in order, holes as zeros. Returns the bytes hashed and the digest,
/// or the error of a block it could not read again.
fn whole_file(
    rx: Receiver<StreamItem>,
    held: &AtomicUsize,
    reread: Option<&Reread<'_>>,
) -> (u64, Result<[u8; 32], CopyError>) {
    let mut hasher = Sha256::new();
    let mut seen = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    for item in rx {
        match item {
            StreamItem::Data(d) => {
                hasher.update(d.data());
                seen += d.len() as u64;
                drop(d);
                held.fetch_sub(1, Ordering::AcqRel);
            }
            StreamItem::Zeros(n) => {
                feed_zeros(&mut hasher, n);
                seen += n;
            }
            StreamItem::Later(weak, offset, len) => {
                if let Some(d) = weak.upgrade() {
                    hasher.update(d.data());
                } else {
                    let Some(r) = reread else {
                        // Cannot happen: blocks are only let go when they can be read again.
                        let e = std::io::Error::other("block let go without a way to read it");
                        return (seen, Err(CopyError::write(Path::new(""), offset, e)));
                    };
                    buf.resize(len, 0);
                    if let Err(e) = r.file.read_exact_at(&mut buf, offset) {
                        return (seen, Err(CopyError::write(r.path, offset, e)));
                    }
                    hasher.update(&buf);
                }
                seen += len as u64;
            }
        }
    }
    (seen, Ok(hasher.finalize().into()))
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
    use crate::progress::NoProgress;

    /// Blocks the whole-file hasher let go, whose buffers are gone, are read again from the
    /// destination: the digest is that of the destination's bytes for them.
    #[test]
    fn let_go_blocks_are_read_again_from_the_destination() {
        let block = 4096usize;
        let pool = super::super::buffer::Pool::new(4, block);
        let content: Vec<u8> = (0..4 * block).map(|i| (i * 7 % 251) as u8).collect();
        let mut written = content.clone();
        written[block + 5] ^= 0xff; // what the destination holds differs in block 1
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dst");
        std::fs::write(&path, &written).expect("write");
        let file = File::open(&path).expect("open");
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..4 {
            let mut buf = pool.try_get().expect("buffer");
            buf.as_mut_slice()[..block].copy_from_slice(&content[i * block..(i + 1) * block]);
            let filled = pool.fill(buf, (i * block) as u64, block);
            tx.send(Item {
                offset: (i * block) as u64,
                len: block as u64,
                data: Some(filled),
            })
            .expect("send");
        }
        tx.send(Item {
            offset: 4 * block as u64,
            len: 3 * block as u64,
            data: None,
        })
        .expect("send");
        drop(tx);
        // File digest only: no chunk worker holds a block, so a let-go block is gone at once.
        let settings = HashSettings {
            mode: HashMode::File,
            chunk_size: 2 * block as u64,
            workers: 2,
            size: 7 * block as u64,
            hold: 0,
        };
        let ticker = Ticker::new(&NoProgress, "t".into(), settings.size);
        let reread = Reread {
            file: &file,
            path: &path,
        };
        let out = consume(rx, settings, Some(reread), &ticker);
        assert!(out.error.is_none());
        assert_eq!(out.done, settings.size);
        // Block 0 stays in memory; blocks 1-3 were let go and read again from the destination.
        let mut expected = content[..block].to_vec();
        expected.extend_from_slice(&written[block..]);
        expected.extend_from_slice(&[0u8; 3 * 4096]);
        let want: [u8; 32] = Sha256::digest(&expected).into();
        assert_eq!(out.file, Some(want));
        // Without a way to read again, every block is kept: the digest is the copy's.
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut buf = pool.try_get().expect("buffer");
        buf.as_mut_slice()[..block].copy_from_slice(&content[..block]);
        tx.send(Item {
            offset: 0,
            len: block as u64,
            data: Some(pool.fill(buf, 0, block)),
        })
        .expect("send");
        drop(tx);
        let one = HashSettings {
            size: block as u64,
            ..settings
        };
        let out = consume(rx, one, None, &ticker);
        let want: [u8; 32] = Sha256::digest(&content[..block]).into();
        assert_eq!(out.file, Some(want));
    }

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
