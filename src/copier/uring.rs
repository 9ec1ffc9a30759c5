//! The io_uring engine: one ring with up to `queue_depth` buffers in flight. Reads run ahead
//! while earlier buffers are written behind; a buffer goes to the hashers as soon as its read
//! completes, while its write is in flight (both only read the memory). Buffers are registered
//! with the ring (READ_FIXED/WRITE_FIXED) when the kernel allows, which saves pinning pages on
//! every operation.
//!
//! This is the only module of the copier with `unsafe`: handing buffer addresses to the kernel.
//! The invariant that makes it sound: a buffer given to an operation stays owned by its slot
//! (a [`Buffer`] or an `Arc<Filled>`) until that operation's completion has been reaped, and the
//! engine reaps every completion before it returns, on every path.

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::buffer::{Buffer, Filled, ALIGN};
use super::hashing::{is_zero, Item};
use super::job::{IoStats, Job};
use super::pace::Pacer;
use super::plan::{Block, Kind, Planner};
use super::CopyError;

/// How long to wait for a free buffer before looking at the cancel flag again.
const POLL: Duration = Duration::from_millis(50);

/// Why io_uring cannot be used on this machine (what [`probe`] found).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// `kernel.io_uring_disabled` is 2.
    #[error("kernel.io_uring_disabled = 2")]
    Disabled,
    /// `io_uring_setup` failed with ENOSYS.
    #[error("io_uring_setup: ENOSYS (no io_uring, or blocked by seccomp)")]
    NoSys,
    /// `io_uring_setup` failed with EPERM.
    #[error("io_uring_setup: EPERM (kernel.io_uring_disabled, or blocked by seccomp)")]
    NotPermitted,
    /// `io_uring_setup` failed otherwise (the error's text: the answer is cached and cloned).
    #[error("io_uring_setup: {0}")]
    Setup(String),
    /// Registering the opcode probe failed.
    #[error("io_uring probe: {0}")]
    Probe(String),
    /// An opcode the engine needs is not supported.
    #[error("io_uring opcode {0} not supported")]
    Opcode(&'static str),
}

/// Whether io_uring can be used here: `Ok(())`, or why not. Checks
/// `kernel.io_uring_disabled`, creates a ring (ENOSYS under old kernels or seccomp, EPERM when
/// disabled) and probes the READ and WRITE opcodes. The answer is computed once per process.
pub fn probe() -> Result<(), ProbeError> {
    static ANSWER: OnceLock<Result<(), ProbeError>> = OnceLock::new();
    ANSWER.get_or_init(probe_now).clone()
}

fn probe_now() -> Result<(), ProbeError> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err(ProbeError::Disabled);
        }
    }
    let ring = IoUring::new(4).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => ProbeError::NoSys,
        Some(libc::EPERM) => ProbeError::NotPermitted,
        _ => ProbeError::Setup(e.to_string()),
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ProbeError::Probe(e.to_string()))?;
    for (code, name) in [(opcode::Read::CODE, "READ"), (opcode::Write::CODE, "WRITE")] {
        if !probe.is_supported(code) {
            return Err(ProbeError::Opcode(name));
        }
    }
    Ok(())
}

/// What a buffer slot is doing.
enum Slot {
    Free,
    Reading {
        buf: Buffer,
        offset: u64,
        len: usize,
        got: usize,
    },
    Writing {
        filled: Arc<Filled>,
        done: usize,
    },
    /// The block was written; it is being read back from the destination into `back`.
    ReadingBack {
        filled: Arc<Filled>,
        back: Buffer,
        got: usize,
    },
}

struct Engine<'j, 'a> {
    job: &'j Job<'a>,
    ring: IoUring,
    fixed: bool,
    slots: Vec<Slot>,
    inflight: usize,
    failure: Option<CopyError>,
    out: Sender<Item>,
    stats: IoStats,
    /// The bandwidth limit, if any: reads start no faster than it allows.
    pacer: Option<Pacer>,
}

/// Copies the planned blocks through one io_uring instance.
pub(crate) fn run(
    job: &Job<'_>,
    mut planner: Planner<'_>,
    out: Sender<Item>,
    notes: &mut Vec<String>,
) -> Result<IoStats, CopyError> {
    let depth = job.pool.count();
    let entries = (depth as u32).next_power_of_two().max(2);
    let ring = IoUring::new(entries).map_err(CopyError::Uring)?;
    let fixed = job.register_buffers && register(&ring, job, notes);
    let mut engine = Engine {
        job,
        ring,
        fixed,
        slots: (0..depth).map(|_| Slot::Free).collect(),
        inflight: 0,
        failure: None,
        out,
        stats: IoStats::default(),
        pacer: job.max_rate.map(Pacer::new),
    };
    match engine.run(&mut planner) {
        Ok(()) => {}
        Err(fatal) => {
            // The ring itself failed: which operations are still in flight is unknown, so
            // their buffers are leaked rather than freed under the kernel's feet.
            std::mem::forget(std::mem::take(&mut engine.slots));
            return Err(fatal);
        }
    }
    match engine.failure.take() {
        Some(e) => Err(e),
        None => Ok(engine.stats),
    }
}

/// Registers every pool buffer with the ring; on refusal (e.g. RLIMIT_MEMLOCK) notes it and
/// goes on with plain READ/WRITE.
fn register(ring: &IoUring, job: &Job<'_>, notes: &mut Vec<String>) -> bool {
    let mut all = job.pool.take_all();
    all.sort_by_key(Buffer::index);
    let complete = all.len() == job.pool.count();
    let iovecs: Vec<libc::iovec> = all
        .iter_mut()
        .map(|b| {
            let s = b.as_mut_slice();
            libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            }
        })
        .collect();
    let result = if complete {
        // SAFETY: every iovec points into a pool buffer's heap allocation, which the pool keeps
        // alive (and never moves) for longer than this ring exists; the ring is dropped at the
        // end of `run`, which unregisters them.
        unsafe { ring.submitter().register_buffers(&iovecs) }
    } else {
        Err(std::io::Error::other("pool not idle"))
    };
    for b in all {
        job.pool.put(b);
    }
    match result {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!(
                "io_uring buffer registration refused ({e}); using plain READ/WRITE"
            ));
            false
        }
    }
}

impl Engine<'_, '_> {
    fn fail(&mut self, e: CopyError) {
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }

    /// The main loop. Returns `Err` only when the ring itself fails; file errors and
    /// cancellation land in `self.failure` after every operation in flight has completed.
    fn run(&mut self, planner: &mut Planner<'_>) -> Result<(), CopyError> {
        let mut pending: Option<Block> = None;
        let mut planned_all = false;
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(self.slots.len() * 2);
        loop {
            if self.failure.is_none() && self.job.cancel.is_cancelled() {
                self.fail(CopyError::Cancelled {
                    path: self.job.src_path.to_owned(),
                    offset: planner.position(),
                });
            }
            if self.failure.is_none() && !planned_all {
                planned_all = self.issue_reads(planner, &mut pending)?;
            }
            if self.inflight == 0 {
                if planned_all || self.failure.is_some() {
                    return Ok(());
                }
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(CopyError::Uring(e)),
            }
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(slot, res) in &completions {
                self.inflight -= 1;
                self.complete(slot as usize, res)?;
            }
        }
    }

    /// Starts reads while buffers are free. Returns whether the plan is exhausted.
    fn issue_reads(
        &mut self,
        planner: &mut Planner<'_>,
        pending: &mut Option<Block>,
    ) -> Result<bool, CopyError> {
        loop {
            let block = match pending.take() {
                Some(b) => b,
                None => match planner.next_block() {
                    Ok(Some(b)) => b,
                    Ok(None) => return Ok(true),
                    Err(e) => {
                        let at = planner.position();
                        self.fail(CopyError::read(self.job.src_path, at, e));
                        return Ok(false);
                    }
                },
            };
            if block.kind == Kind::Hole {
                self.stats.holes_skipped += block.len;
                let _ = self.out.send(Item {
                    offset: block.offset,
                    len: block.len,
                    data: None,
                });
                continue;
            }
            let buf = if self.inflight == 0 {
                // Nothing of ours in flight: every buffer is with the hashers; wait for one.
                loop {
                    if let Some(b) = self.job.pool.get_timeout(POLL) {
                        break Some(b);
                    }
                    if self.job.cancel.is_cancelled() {
                        break None;
                    }
                }
            } else {
                self.job.pool.try_get()
            };
            let Some(buf) = buf else {
                *pending = Some(block);
                return Ok(false);
            };
            if let Some(wait) = self
                .pacer
                .as_mut()
                .and_then(|p| p.admit(Instant::now(), block.len))
            {
                // Over the bandwidth limit: keep the block for later. With operations in flight
                // the main loop waits for their completions; with none, wait here (briefly, so
                // that the cancel flag is looked at).
                self.job.pool.put(buf);
                *pending = Some(block);
                if self.inflight == 0 {
                    std::thread::sleep(wait.min(POLL));
                }
                return Ok(false);
            }
            let idx = buf.index();
            self.slots[idx] = Slot::Reading {
                buf,
                offset: block.offset,
                len: block.len as usize,
                got: 0,
            };
            self.push_read(idx)?;
        }
    }

    /// Submits (the rest of) the read of slot `idx`.
    fn push_read(&mut self, idx: usize) -> Result<(), CopyError> {
        let fd = types::Fd(self.job.src.as_raw_fd());
        let direct = self.job.direct_read;
        let Slot::Reading {
            buf,
            offset,
            len,
            got,
        } = &mut self.slots[idx]
        else {
            return Ok(());
        };
        let want = if direct {
            len.next_multiple_of(ALIGN)
        } else {
            *len
        };
        let region = &mut buf.as_mut_slice()[*got..want];
        let (ptr, n) = (region.as_mut_ptr(), region.len() as u32);
        let at = *offset + *got as u64;
        let sqe = if self.fixed {
            opcode::ReadFixed::new(fd, ptr, n, idx as u16)
                .offset(at)
                .build()
        } else {
            opcode::Read::new(fd, ptr, n).offset(at).build()
        };
        self.push(sqe.user_data(idx as u64))
    }

    /// Submits (the rest of) the write of slot `idx`.
    fn push_write(&mut self, idx: usize) -> Result<(), CopyError> {
        let fd = types::Fd(self.job.dst.as_raw_fd());
        let direct = self.job.direct_write;
        let Slot::Writing { filled, done } = &self.slots[idx] else {
            return Ok(());
        };
        let data = if direct {
            filled.padded()
        } else {
            filled.data()
        };
        let region = &data[*done..];
        let (ptr, n) = (region.as_ptr(), region.len() as u32);
        let at = filled.offset() + *done as u64;
        let sqe = if self.fixed {
            opcode::WriteFixed::new(fd, ptr, n, filled.index() as u16)
                .offset(at)
                .build()
        } else {
            opcode::Write::new(fd, ptr, n).offset(at).build()
        };
        self.push(sqe.user_data(idx as u64))
    }

    fn push(&mut self, sqe: squeue::Entry) -> Result<(), CopyError> {
        // SAFETY: the entry points into the buffer owned by `self.slots[idx]` (its user_data),
        // which stays there, unmoved on the heap, until this operation's completion is reaped
        // in `run`; `run` reaps every completion before returning (or leaks the slots if the
        // ring fails). The file descriptors outlive the engine.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // Cannot happen: at most `depth` operations are in flight and the queue holds that.
            self.ring.submit().map_err(CopyError::Uring)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| CopyError::Uring(std::io::Error::other("submission queue full")))?;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Handles the completion of slot `idx`'s operation with result `res`.
    fn complete(&mut self, idx: usize, res: i32) -> Result<(), CopyError> {
        let Some(slot) = self.slots.get_mut(idx) else {
            return Ok(());
        };
        match std::mem::replace(slot, Slot::Free) {
            Slot::Free => Ok(()),
            Slot::Reading {
                buf,
                offset,
                len,
                got,
            } => {
                let at = offset + got as u64;
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    self.slots[idx] = Slot::Reading {
                        buf,
                        offset,
                        len,
                        got,
                    };
                    return self.push_read(idx);
                }
                if res <= 0 || self.failure.is_some() {
                    self.job.pool.put(buf);
                    if res < 0 {
                        let e = std::io::Error::from_raw_os_error(-res);
                        self.fail(CopyError::read(self.job.src_path, at, e));
                    } else if res == 0 {
                        self.fail(CopyError::shrank(self.job.src_path, at, self.job.size));
                    }
                    return Ok(());
                }
                let got = got + res as usize;
                if got < len {
                    self.slots[idx] = Slot::Reading {
                        buf,
                        offset,
                        len,
                        got,
                    };
                    return self.push_read(idx);
                }
                self.read_done(idx, buf, offset, len)
            }
            Slot::Writing { filled, done } => {
                let at = filled.offset() + done as u64;
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    self.slots[idx] = Slot::Writing { filled, done };
                    return self.push_write(idx);
                }
                if res < 0 {
                    let e = std::io::Error::from_raw_os_error(-res);
                    self.fail(CopyError::write(self.job.dst_path, at, e));
                    return Ok(());
                }
                if res == 0 {
                    let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
                    self.fail(CopyError::write(self.job.dst_path, at, e));
                    return Ok(());
                }
                let done = done + res as usize;
                let total = if self.job.direct_write {
                    filled.padded().len()
                } else {
                    filled.len()
                };
                if done < total && self.failure.is_none() {
                    self.slots[idx] = Slot::Writing { filled, done };
                    return self.push_write(idx);
                }
                if done >= total {
                    self.stats.bytes_written += filled.len() as u64;
                    if self.failure.is_none() {
                        return self.start_read_back(idx, filled);
                    }
                }
                Ok(())
            }
            Slot::ReadingBack { filled, back, got } => {
                let at = filled.offset() + got as u64;
                let Some(rb) = self.job.read_back else {
                    return Ok(());
                };
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    self.slots[idx] = Slot::ReadingBack { filled, back, got };
                    return self.push_read_back(idx);
                }
                if res < 0 {
                    rb.pool.put(back);
                    let e = std::io::Error::from_raw_os_error(-res);
                    self.fail(CopyError::write(self.job.dst_path, at, e));
                    return Ok(());
                }
                let got = got + res as usize;
                if res > 0 && got < filled.len() && self.failure.is_none() {
                    self.slots[idx] = Slot::ReadingBack { filled, back, got };
                    return self.push_read_back(idx);
                }
                let same = got >= filled.len() && back.as_slice()[..filled.len()] == *filled.data();
                rb.pool.put(back);
                if same {
                    self.stats.bytes_read_back += filled.len() as u64;
                } else if self.failure.is_none() {
                    self.fail(CopyError::ReadBackMismatch {
                        path: self.job.dst_path.to_owned(),
                        offset: filled.offset(),
                        len: filled.len(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Once a block's write completed: reads it back from the destination (O_DIRECT), when
    /// asked; the block's buffer stays held until the comparison.
    fn start_read_back(&mut self, idx: usize, filled: Arc<Filled>) -> Result<(), CopyError> {
        let Some(rb) = self.job.read_back else {
            return Ok(());
        };
        // One read-back buffer per slot: one is free whenever a slot finishes its write.
        let back = loop {
            if let Some(b) = rb.pool.get_timeout(POLL) {
                break b;
            }
            if self.job.cancel.is_cancelled() {
                return Ok(());
            }
        };
        self.slots[idx] = Slot::ReadingBack {
            filled,
            back,
            got: 0,
        };
        self.push_read_back(idx)
    }

    /// Submits (the rest of) the read-back of slot `idx` (plain READ: the read-back buffers
    /// are not registered with the ring).
    fn push_read_back(&mut self, idx: usize) -> Result<(), CopyError> {
        let Some(rb) = self.job.read_back else {
            return Ok(());
        };
        let fd = types::Fd(rb.file.as_raw_fd());
        let Slot::ReadingBack { filled, back, got } = &mut self.slots[idx] else {
            return Ok(());
        };
        // O_DIRECT: the whole padded block, from an aligned offset (`got` stays aligned: a
        // short O_DIRECT read ends on a block boundary or at the end of the file).
        let want = filled.len().next_multiple_of(ALIGN);
        let region = &mut back.as_mut_slice()[*got..want];
        let (ptr, n) = (region.as_mut_ptr(), region.len() as u32);
        let at = filled.offset() + *got as u64;
        let sqe = opcode::Read::new(fd, ptr, n).offset(at).build();
        self.push(sqe.user_data(idx as u64))
    }

    /// A whole block was read: hand it to the hashers and start its write.
    fn read_done(
        &mut self,
        idx: usize,
        mut buf: Buffer,
        offset: u64,
        len: usize,
    ) -> Result<(), CopyError> {
        self.stats.bytes_read += len as u64;
        if let Some(r) = self.job.rewrite {
            r.apply(offset, &mut buf.as_mut_slice()[..len]);
        }
        if self.job.direct_write {
            let mem = buf.as_mut_slice();
            let end = len.next_multiple_of(ALIGN).min(mem.len());
            mem[len..end].fill(0);
        }
        let filled = self.job.pool.fill(buf, offset, len);
        let skip = self.job.zero_as_holes && is_zero(filled.data());
        let _ = self.out.send(Item {
            offset,
            len: len as u64,
            data: Some(Arc::clone(&filled)),
        });
        if skip {
            self.stats.zero_bytes_skipped += len as u64;
            return Ok(());
        }
        if self.job.cancel.is_cancelled() {
            return Ok(()); // the main loop records the cancellation
        }
        self.slots[idx] = Slot::Writing { filled, done: 0 };
        self.push_write(idx)
    }
}
