//! The reusable buffer pool: `queue_depth` buffers allocated once, aligned for O_DIRECT, handed
//! out to the I/O engine and returned automatically when the last user (writer, hashers) drops
//! them. The pool is what bounds the copier's memory.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

/// Alignment of buffer addresses, offsets and lengths for O_DIRECT.
pub(crate) const ALIGN: usize = 4096;

/// One I/O buffer. The aligned region lives inside an over-allocated `Vec`, so its address never
/// changes when the `Buffer` value moves (which the io_uring engine relies on).
pub(crate) struct Buffer {
    mem: Vec<u8>,
    start: usize,
    cap: usize,
    index: usize,
}

impl Buffer {
    fn new(cap: usize, index: usize) -> Self {
        let mem = vec![0u8; cap + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        Self {
            mem,
            start,
            cap,
            index,
        }
    }

    /// The buffer's number in the pool (its io_uring registered-buffer index).
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The whole aligned region.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.cap]
    }

    /// The whole aligned region, read-only.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.cap]
    }
}

/// A buffer holding `len` valid bytes read from `offset`, shared between the writer and the
/// hashers; it goes back to its pool when the last `Arc` is dropped.
pub(crate) struct Filled {
    buf: Option<Buffer>,
    len: usize,
    offset: u64,
    home: Sender<Buffer>,
}

impl Filled {
    /// The valid bytes.
    pub(crate) fn data(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b.as_slice()[..self.len],
            None => &[],
        }
    }

    /// `len` rounded up to [`ALIGN`]: the bytes an O_DIRECT write covers (the tail is zeroed).
    pub(crate) fn padded(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b.as_slice()[..self.len.next_multiple_of(ALIGN).min(b.cap)],
            None => &[],
        }
    }

    /// File offset of the first byte.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of valid bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The pool index of the underlying buffer.
    pub(crate) fn index(&self) -> usize {
        self.buf.as_ref().map_or(0, Buffer::index)
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // The pool may already be gone at shutdown; then the buffer is simply freed.
            let _ = self.home.send(buf);
        }
    }
}

/// The fixed set of buffers of one copy.
pub(crate) struct Pool {
    tx: Sender<Buffer>,
    rx: Receiver<Buffer>,
    count: usize,
}

impl Pool {
    /// Allocates `count` buffers of `size` bytes (a multiple of [`ALIGN`]).
    pub(crate) fn new(count: usize, size: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(count);
        for i in 0..count {
            // Cannot fail: the channel holds exactly `count` and we own the receiver.
            let _ = tx.send(Buffer::new(size, i));
        }
        Self { tx, rx, count }
    }

    /// Number of buffers.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// A free buffer if one is available now.
    pub(crate) fn try_get(&self) -> Option<Buffer> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a free buffer.
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Option<Buffer> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Takes every buffer out (the pool must be idle), e.g. to register them with io_uring.
    pub(crate) fn take_all(&self) -> Vec<Buffer> {
        let mut all = Vec::with_capacity(self.count);
        while let Ok(b) = self.rx.try_recv() {
            all.push(b);
        }
        all
    }

    /// Returns a buffer that was not filled.
    pub(crate) fn put(&self, buf: Buffer) {
        let _ = self.tx.send(buf);
    }

    /// Wraps a buffer holding `len` valid bytes from `offset` for sharing.
    pub(crate) fn fill(&self, buf: Buffer, offset: u64, len: usize) -> Arc<Filled> {
        Arc::new(Filled {
            buf: Some(buf),
            len,
            offset,
            home: self.tx.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_come_back() {
        let pool = Pool::new(2, 8192);
        let a = pool.try_get().expect("first");
        let b = pool.try_get().expect("second");
        assert!(pool.try_get().is_none(), "only two buffers exist");
        assert_eq!(a.as_slice().as_ptr() as usize % ALIGN, 0);
        let shared = pool.fill(a, 0, 100);
        let clone = Arc::clone(&shared);
        drop(shared);
        assert!(pool.try_get().is_none(), "still referenced");
        drop(clone);
        assert!(pool.try_get().is_some(), "returned on last drop");
        pool.put(b);
    }
}
