//! Splits the source into blocks: data blocks (to read, at most one buffer, never crossing a
//! buffer boundary, hence never a chunk boundary) and holes (never read), found with
//! SEEK_DATA/SEEK_HOLE as the copy advances, so the plan costs no memory.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::buffer::ALIGN;

/// Whether a block holds data or is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Allocated: read it.
    Data,
    /// A hole: zeros, neither read nor written.
    Hole,
}

/// A contiguous piece of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    /// Offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Data or hole.
    pub kind: Kind,
}

/// Walks the source's extents lazily.
pub(crate) struct Planner<'a> {
    file: &'a File,
    size: u64,
    buffer_size: u64,
    pos: u64,
    region_end: u64,
    region: Kind,
    sparse: bool,
}

impl<'a> Planner<'a> {
    /// Plans `size` bytes of `file` in blocks of at most `buffer_size`.
    pub(crate) fn new(file: &'a File, size: u64, buffer_size: usize) -> Self {
        Self {
            file,
            size,
            buffer_size: buffer_size as u64,
            pos: 0,
            region_end: 0,
            region: Kind::Data,
            sparse: true,
        }
    }

    /// Where the next block starts.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    fn seek(&self, whence: Whence) -> Result<Option<u64>, Errno> {
        match lseek(self.file.as_raw_fd(), self.pos as i64, whence) {
            Ok(off) => Ok(Some(off as u64)),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Finds the region (data or hole) that starts at `pos`.
    fn next_region(&mut self) -> std::io::Result<()> {
        if self.sparse {
            match self.seek(Whence::SeekData) {
                Ok(None) => {
                    // No data after pos: the rest is a hole.
                    self.region = Kind::Hole;
                    self.region_end = self.size;
                    return Ok(());
                }
                Ok(Some(data)) => {
                    let data = data.min(self.size);
                    let data = (data / ALIGN as u64 * ALIGN as u64).max(self.pos);
                    if data > self.pos {
                        self.region = Kind::Hole;
                        self.region_end = data;
                        return Ok(());
                    }
                    let hole = match self.seek(Whence::SeekHole) {
                        Ok(h) => h.unwrap_or(self.size),
                        Err(e) => return Err(e.into()),
                    };
                    let hole = hole
                        .next_multiple_of(ALIGN as u64)
                        .min(self.size)
                        .max(self.pos + 1);
                    self.region = Kind::Data;
                    self.region_end = hole;
                    return Ok(());
                }
                // Filesystems and files without extent support (pipes, some devices): dense.
                Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) | Err(Errno::ESPIPE) => {
                    self.sparse = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.region = Kind::Data;
        self.region_end = self.size;
        Ok(())
    }

    /// The next block, `None` at the end. Errors come from lseek on the source.
    pub(crate) fn next_block(&mut self) -> std::io::Result<Option<Block>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        if self.pos >= self.region_end {
            self.next_region()?;
        }
        let end = match self.region {
            // Holes may be long: the consumer splits them at chunk boundaries.
            Kind::Hole => self.region_end,
            Kind::Data => {
                let boundary = (self.pos / self.buffer_size + 1) * self.buffer_size;
                self.region_end.min(boundary)
            }
        };
        let block = Block {
            offset: self.pos,
            len: end - self.pos,
            kind: self.region,
        };
        self.pos = end;
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn plan(file: &File, size: u64, buffer: usize) -> Vec<Block> {
        let mut p = Planner::new(file, size, buffer);
        let mut out = Vec::new();
        while let Some(b) = p.next_block().expect("plan") {
            out.push(b);
        }
        out
    }

    #[test]
    fn blocks_cover_the_file_and_respect_buffer_boundaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::create(&path).expect("create");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&[1u8; 70_000]).expect("write");
        f.set_len(3 << 20).expect("len");
        let f = File::open(&path).expect("open");
        let blocks = plan(&f, 3 << 20, 65536);
        let mut pos = 0;
        for b in &blocks {
            assert_eq!(b.offset, pos, "contiguous");
            if b.kind == Kind::Data {
                assert!(b.len <= 65536);
                assert_eq!(b.offset / 65536, (b.offset + b.len - 1) / 65536);
            }
            pos += b.len;
        }
        assert_eq!(pos, 3 << 20);
        let data: u64 = blocks
            .iter()
            .filter(|b| b.kind == Kind::Data)
            .map(|b| b.len)
            .sum();
        assert!(data >= 70_000, "the written range is data");
        assert!(
            data < 3 << 20,
            "the holes are found (got {data} bytes of data)"
        );
    }
}
