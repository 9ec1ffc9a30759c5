//! The copy's bandwidth limit (`CopyOptions::max_rate`): reads of the source are started no
//! faster than the limit allows, so the copy moves at most that many bytes per second on
//! average. Holes cost nothing (they are not read).
//!
//! A hand-written pacer rather than a crate: the copy's planning thread is the only caller,
//! it must keep reaping io_uring completions while it waits (so it asks "how long until I may
//! read N bytes?" instead of blocking in a limiter), and the arithmetic is a dozen lines. Pure
//! logic: the clock is passed in, so the unit tests need no sleeps.

use std::time::{Duration, Instant};

/// How far ahead of the limit a copy may run at once: reads that fit in this window start
/// without waiting (the first buffers of a copy, or after a pause in the reads).
const BURST: Duration = Duration::from_millis(100);

/// Paces reads to at most `rate` bytes per second.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    /// When the bytes allowed so far have all been "spent" at the limit.
    next_free: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second (at least 1).
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next_free: None,
        }
    }

    /// Asks to read `bytes` at `now`: `None` if the read may start (and it is counted), or how
    /// long to wait before asking again.
    pub(crate) fn admit(&mut self, now: Instant, bytes: u64) -> Option<Duration> {
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = self.next_free.map_or(earliest, |t| t.max(earliest));
        if start > now {
            return Some(start - now);
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.next_free = Some(start + cost);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Admits reads as fast as the pacer lets them in, from `t0`, until `total` bytes went
    /// through; returns the clock at the last admission.
    fn drain(p: &mut Pacer, t0: Instant, block: u64, total: u64) -> Instant {
        let mut now = t0;
        let mut done = 0;
        while done < total {
            match p.admit(now, block) {
                None => done += block,
                Some(wait) => now += wait,
            }
        }
        now
    }

    #[test]
    fn the_average_rate_stays_within_the_limit() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10 * MIB);
        let end = drain(&mut p, t0, MIB, 100 * MIB);
        let took = (end - t0).as_secs_f64();
        // 100 MiB at 10 MiB/s: the last read starts after 9.9 s, less the burst window.
        assert!((9.7..=9.95).contains(&took), "took {took} s");
    }

    #[test]
    fn a_pause_earns_only_the_burst_window() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10 * MIB);
        drain(&mut p, t0, MIB, 10 * MIB);
        // Ten idle seconds later, only the read at hand and one burst window (1 MiB at
        // 10 MiB/s) go at once.
        let later = t0 + Duration::from_secs(20);
        let at_once = (0..10)
            .take_while(|_| p.admit(later, MIB).is_none())
            .count();
        assert_eq!(at_once, 2);
    }

    #[test]
    fn the_wait_is_the_time_until_the_next_read_fits() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Pacer::new(MIB);
        assert_eq!(p.admit(t0, MIB), None);
        let wait = p.admit(t0, MIB).expect("must wait");
        assert_eq!(wait, Duration::from_millis(900));
        assert_eq!(p.admit(t0 + wait, MIB), None);
    }
}
