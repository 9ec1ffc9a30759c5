//! The thread-pool engine (the fallback when io_uring is unavailable): the planning thread hands
//! buffers in file order to a few I/O threads, each of which `pread`s its block, passes it to
//! the hashers and `pwrite`s it. Up to `queue_depth` buffers are in flight; the pool's free list
//! is the back-pressure.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::buffer::{Buffer, Filled, ALIGN};
use super::hashing::{is_zero, Item};
use super::job::{IoStats, Job};
use super::pace::Pacer;
use super::plan::{Kind, Planner};
use super::CopyError;

/// Upper bound of I/O threads.
pub(crate) const MAX_IO_THREADS: usize = 4;

/// How many pread/pwrite threads to run for a queue depth.
pub(crate) fn io_threads(queue_depth: usize) -> usize {
    queue_depth.clamp(1, MAX_IO_THREADS)
}

/// How long blocking waits last before they look at the cancel and failure flags again.
const POLL: Duration = Duration::from_millis(50);

struct Task {
    buf: Buffer,
    offset: u64,
    len: usize,
}

/// State shared by the planning thread and the I/O threads.
struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<CopyError>>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    zero_skipped: AtomicU64,
    bytes_read_back: AtomicU64,
}

impl Shared {
    /// Records the first failure; later ones are consequences.
    fn fail(&self, e: CopyError) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

/// Copies the planned blocks with pread/pwrite threads.
pub(crate) fn run(
    job: &Job<'_>,
    mut planner: Planner<'_>,
    out: Sender<Item>,
    _notes: &mut Vec<String>,
) -> Result<IoStats, CopyError> {
    let shared = Shared {
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        zero_skipped: AtomicU64::new(0),
        bytes_read_back: AtomicU64::new(0),
    };
    let mut holes = 0u64;
    let mut pacer = job.max_rate.map(Pacer::new);
    let (task_tx, task_rx) = crossbeam_channel::bounded::<Task>(job.pool.count());
    std::thread::scope(|s| {
        for _ in 0..job.io_threads {
            let rx = task_rx.clone();
            let out = out.clone();
            let shared = &shared;
            s.spawn(move || {
                for task in rx {
                    if shared.failed() || job.cancel.is_cancelled() {
                        job.pool.put(task.buf);
                        continue;
                    }
                    if let Err(e) = copy_block(job, task, &out, shared) {
                        shared.fail(e);
                    }
                }
            });
        }
        drop(task_rx);
        loop {
            if shared.failed() {
                break;
            }
            if job.cancel.is_cancelled() {
                shared.fail(CopyError::Cancelled {
                    path: job.src_path.to_owned(),
                    offset: planner.position(),
                });
                break;
            }
            let block = match planner.next_block() {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    shared.fail(CopyError::read(job.src_path, planner.position(), e));
                    break;
                }
            };
            if block.kind == Kind::Hole {
                holes += block.len;
                let _ = out.send(Item {
                    offset: block.offset,
                    len: block.len,
                    data: None,
                });
                continue;
            }
            if let Some(p) = pacer.as_mut() {
                if !wait_for_pace(p, block.len, job, &shared) {
                    continue; // failed or cancelled: the loop head reports it
                }
            }
            let Some(buf) = wait_for_buffer(job, &shared) else {
                continue; // failed or cancelled: the loop head reports it
            };
            let task = Task {
                buf,
                offset: block.offset,
                len: block.len as usize,
            };
            if task_tx.send(task).is_err() {
                break;
            }
        }
        drop(task_tx);
    });
    if let Some(e) = shared.error.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(IoStats {
        bytes_read: shared.bytes_read.into_inner(),
        bytes_written: shared.bytes_written.into_inner(),
        holes_skipped: holes,
        zero_bytes_skipped: shared.zero_skipped.into_inner(),
        bytes_read_back: shared.bytes_read_back.into_inner(),
    })
}

/// A free buffer, or `None` once the copy failed or was cancelled.
fn wait_for_buffer(job: &Job<'_>, shared: &Shared) -> Option<Buffer> {
    wait_for(job.pool, job, shared)
}

/// Waits until the bandwidth limit admits a read of `len` bytes: `true`, or `false` once the
/// copy failed or was cancelled.
fn wait_for_pace(pacer: &mut Pacer, len: u64, job: &Job<'_>, shared: &Shared) -> bool {
    while let Some(wait) = pacer.admit(Instant::now(), len) {
        if shared.failed() || job.cancel.is_cancelled() {
            return false;
        }
        std::thread::sleep(wait.min(POLL));
    }
    true
}

/// A free buffer of `pool`, or `None` once the copy failed or was cancelled.
fn wait_for(pool: &super::buffer::Pool, job: &Job<'_>, shared: &Shared) -> Option<Buffer> {
    loop {
        if let Some(b) = pool.get_timeout(POLL) {
            return Some(b);
        }
        if shared.failed() || job.cancel.is_cancelled() {
            return None;
        }
    }
}

/// Reads one block, hands it to the hashers and writes it.
fn copy_block(
    job: &Job<'_>,
    mut task: Task,
    out: &Sender<Item>,
    shared: &Shared,
) -> Result<(), CopyError> {
    let want = if job.direct_read {
        task.len.next_multiple_of(ALIGN)
    } else {
        task.len
    };
    let mem = task.buf.as_mut_slice();
    let mut got = 0usize;
    while got < task.len {
        let at = task.offset + got as u64;
        match job.src.read_at(&mut mem[got..want], at) {
            Ok(0) => {
                job.pool.put(task.buf);
                return Err(CopyError::shrank(job.src_path, at, job.size));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                job.pool.put(task.buf);
                return Err(CopyError::read(job.src_path, at, e));
            }
        }
    }
    if let Some(r) = job.rewrite {
        r.apply(task.offset, &mut mem[..task.len]);
    }
    if job.direct_write {
        // O_DIRECT writes whole aligned blocks: the padding must be zeros.
        let end = task.len.next_multiple_of(ALIGN).min(mem.len());
        mem[task.len..end].fill(0);
    }
    shared
        .bytes_read
        .fetch_add(task.len as u64, Ordering::Relaxed);
    let filled = job.pool.fill(task.buf, task.offset, task.len);
    let skip = job.zero_as_holes && is_zero(filled.data());
    let _ = out.send(Item {
        offset: task.offset,
        len: task.len as u64,
        data: Some(Arc::clone(&filled)),
    });
    if skip {
        shared
            .zero_skipped
            .fetch_add(task.len as u64, Ordering::Relaxed);
        return Ok(());
    }
    write_block(job, &filled)?;
    shared
        .bytes_written
        .fetch_add(task.len as u64, Ordering::Relaxed);
    if read_back_block(job, &filled, shared)? {
        shared
            .bytes_read_back
            .fetch_add(task.len as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Reads a written block back from the destination (O_DIRECT) and compares it with what was
/// written, when asked. Returns whether it was read back.
fn read_back_block(job: &Job<'_>, filled: &Filled, shared: &Shared) -> Result<bool, CopyError> {
    let Some(rb) = job.read_back else {
        return Ok(false);
    };
    let Some(mut back) = wait_for(rb.pool, job, shared) else {
        return Ok(false);
    };
    let want = filled.len().next_multiple_of(ALIGN);
    let mem = back.as_mut_slice();
    let mut got = 0usize;
    let result = loop {
        if got >= filled.len() {
            break Ok(());
        }
        let at = filled.offset() + got as u64;
        match rb.file.read_at(&mut mem[got..want], at) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(CopyError::write(job.dst_path, at, e)),
        }
    };
    let same = got >= filled.len() && mem[..filled.len()] == *filled.data();
    rb.pool.put(back);
    result?;
    if !same {
        return Err(CopyError::ReadBackMismatch {
            path: job.dst_path.to_owned(),
            offset: filled.offset(),
            len: filled.len(),
        });
    }
    Ok(true)
}

fn write_block(job: &Job<'_>, filled: &Filled) -> Result<(), CopyError> {
    let data = if job.direct_write {
        filled.padded()
    } else {
        filled.data()
    };
    let mut done = 0usize;
    while done < data.len() {
        if job.cancel.is_cancelled() {
            return Err(CopyError::Cancelled {
                path: job.src_path.to_owned(),
                offset: filled.offset() + done as u64,
            });
        }
        let at = filled.offset() + done as u64;
        match job.dst.write_at(&data[done..], at) {
            Ok(0) => {
                return Err(CopyError::write(
                    job.dst_path,
                    at,
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CopyError::write(job.dst_path, at, e)),
        }
    }
    Ok(())
}
