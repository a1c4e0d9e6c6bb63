//! Exact per-tenant counting with atomics: GCRA for the per-second rate with burst, clock-aligned
//! fixed windows for minute/hour/day, counters for requests and WebSockets in flight, and GCRA
//! pacing of request bodies. No locks: every check is a compare-and-swap loop on one word.
//!
//! GCRA (the "generic cell rate algorithm", a token bucket kept as one timestamp): each request
//! moves the theoretical arrival time `tat` forward by `T = 1/rate`; a request is admitted when
//! `tat` is at most `tau = (burst - 1) * T` ahead of now. Offered more than the rate, a tenant gets
//! `burst` at once, then exactly `rate` per second: over `t` seconds, `burst + rate * t`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds on a monotonic clock shared by all counters.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Starts at one hour so that "in the past" never underflows.
    3_600_000_000_000 + epoch.elapsed().as_nanos() as u64
}

/// Seconds since the Unix epoch: fixed windows are aligned to the wall clock, like the fleet's.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A rate with burst, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval: nanoseconds per request.
    pub t: u64,
    /// Tolerance: how far ahead of now `tat` may run.
    pub tau: u64,
}

impl Gcra {
    pub fn new(per_second: u64, burst: u64) -> Gcra {
        let t = 1_000_000_000 / per_second.max(1);
        Gcra {
            t,
            tau: t.saturating_mul(burst.max(1) - 1),
        }
    }
}

/// The counters of one tenant on one route group. They outlive reloads (keyed by tenant and
/// group), so editing limits never resets them: a lowered limit bites at once, a raised one
/// frees room at once.
#[derive(Default)]
pub struct Counters {
    tat: AtomicU64,
    /// Minute, hour, day: `window index << 32 | count`.
    windows: [AtomicU64; 3],
    pub in_flight: AtomicU32,
    pub websockets: AtomicU32,
    body_tat: AtomicU64,
    /// Last use (`now_ns`), for sweeping idle unlisted tenants.
    pub last_used: AtomicU64,
}

/// Fixed windows, in the order of `Counters::windows`.
pub const WINDOWS: [u64; 3] = [60, 3600, 86_400];

/// Why a request was refused, and when trying again makes sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub retry_after: Duration,
}

/// What is left of the tightest limit after an admission, for the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the limit is fully available again (`reset`).
    pub reset: u64,
    /// The window the limit counts over, in seconds.
    pub window: u64,
}

impl Counters {
    /// One request against the per-second GCRA. On success returns what is left of the burst.
    pub fn take_rate(&self, g: Gcra, now: u64) -> Result<Remaining, Refusal> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > g.tau {
                return Err(Refusal {
                    retry_after: Duration::from_nanos(start - now - g.tau),
                });
            }
            let new = start + g.t;
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ahead = new - now;
                    let capacity = g.tau / g.t + 1;
                    return Ok(Remaining {
                        limit: capacity,
                        remaining: (g.tau + g.t).saturating_sub(ahead) / g.t,
                        reset: ahead.div_ceil(1_000_000_000),
                        window: 1,
                    });
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back a request taken by [`Self::take_rate`] (a later limit refused it).
    pub fn untake_rate(&self, g: Gcra) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(g.t))
            });
    }

    /// One request against fixed window `w` (an index into [`WINDOWS`]) with `limit`.
    pub fn take_window(&self, w: usize, limit: u64, unix: u64) -> Result<Remaining, Refusal> {
        let len = WINDOWS[w];
        let index = unix / len;
        let reset = (index + 1) * len - unix;
        let cell = &self.windows[w];
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let count = if cur >> 32 == index & 0xffff_ffff {
                cur & 0xffff_ffff
            } else {
                0
            };
            if count >= limit {
                return Err(Refusal {
                    retry_after: Duration::from_secs(reset),
                });
            }
            let new = ((index & 0xffff_ffff) << 32) | (count + 1);
            match cell.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Ok(Remaining {
                        limit,
                        remaining: limit - count - 1,
                        reset,
                        window: len,
                    })
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives back a request taken by [`Self::take_window`] in the same window.
    pub fn untake_window(&self, w: usize, unix: u64) {
        let index = (unix / WINDOWS[w]) & 0xffff_ffff;
        let _ = self.windows[w].fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| {
            (c >> 32 == index && c & 0xffff_ffff > 0).then(|| c - 1)
        });
    }

    /// How long to hold `bytes` of request body back so the body stays within `g` (bytes per
    /// second as the rate; the burst lets small bodies through at once).
    pub fn body_delay(&self, g: Gcra, bytes: u64, now: u64) -> Duration {
        let cost = g.t.saturating_mul(bytes);
        let prev = self
            .body_tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.max(now).saturating_add(cost))
            })
            .unwrap_or(now);
        let start = prev.max(now);
        Duration::from_nanos((start + cost).saturating_sub(now + g.tau + g.t))
    }

    /// True when nothing here matters any more: no rate debt, no window in use, nothing in
    /// flight. Such counters of unlisted tenants can be dropped.
    pub fn idle(&self, now: u64, unix: u64) -> bool {
        self.tat.load(Ordering::Relaxed) <= now
            && self.body_tat.load(Ordering::Relaxed) <= now
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.websockets.load(Ordering::Relaxed) == 0
            && self.windows.iter().enumerate().all(|(w, c)| {
                let c = c.load(Ordering::Relaxed);
                c & 0xffff_ffff == 0 || c >> 32 != (unix / WINDOWS[w]) & 0xffff_ffff
            })
    }
}

/// A slot of a concurrency cap; released on drop, whatever ended the request or tunnel.
pub struct Slot {
    counters: std::sync::Arc<Counters>,
    websocket: bool,
}

impl Slot {
    /// Takes a slot if fewer than `cap` are taken.
    pub fn acquire(counters: &std::sync::Arc<Counters>, cap: u32, websocket: bool) -> Option<Slot> {
        let cell = if websocket {
            &counters.websockets
        } else {
            &counters.in_flight
        };
        cell.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()?;
        Some(Slot {
            counters: counters.clone(),
            websocket,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let cell = if self.websocket {
            &self.counters.websockets
        } else {
            &self.counters.in_flight
        };
        cell.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const S: u64 = 1_000_000_000;

    #[test]
    fn gcra_gives_the_burst_then_the_rate() {
        let c = Counters::default();
        let g = Gcra::new(10, 5);
        let t0 = 100 * S;
        let admitted = (0..100).filter(|_| c.take_rate(g, t0).is_ok()).count();
        assert_eq!(admitted, 5, "burst");
        let r = c.take_rate(g, t0).unwrap_err();
        assert!(r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_millis(100));
        // One second later: exactly 10 more (offered every millisecond).
        let mut more = 0;
        for ms in 1..=1000 {
            if c.take_rate(g, t0 + ms * S / 1000).is_ok() {
                more += 1;
            }
        }
        assert_eq!(more, 10);
    }

    #[test]
    fn fixed_windows_count_exactly_and_reset_at_the_boundary() {
        let c = Counters::default();
        let unix = 1_000_040; // 20 s into a minute window (1_000_020 is a boundary)
        let ok = (0..50)
            .filter(|_| c.take_window(0, 30, unix).is_ok())
            .count();
        assert_eq!(ok, 30);
        let r = c.take_window(0, 30, unix).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(40));
        // A lowered limit refuses at once; a raised one admits at once.
        assert!(c.take_window(0, 10, unix).is_err());
        assert!(c.take_window(0, 31, unix).is_ok());
        c.untake_window(0, unix);
        assert!(c.take_window(0, 31, unix).is_ok());
        assert!(c.take_window(0, 30, unix + 40).is_ok(), "next window");
    }

    #[test]
    fn concurrent_takers_never_exceed_the_limit() {
        let c = Arc::new(Counters::default());
        let g = Gcra::new(1000, 200);
        let now = 50 * S;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| {
                            c.take_rate(g, now).is_ok() && c.take_window(0, 150, 60).is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 150);
    }

    #[test]
    fn slots_are_released_on_drop() {
        let c = Arc::new(Counters::default());
        let a = Slot::acquire(&c, 2, true).unwrap();
        let _b = Slot::acquire(&c, 2, true).unwrap();
        assert!(Slot::acquire(&c, 2, true).is_none());
        assert!(Slot::acquire(&c, 1, false).is_some(), "separate caps");
        drop(a);
        assert!(Slot::acquire(&c, 2, true).is_some());
    }

    #[test]
    fn body_pacing_holds_back_what_exceeds_the_rate() {
        let c = Counters::default();
        let g = Gcra::new(1000, 1000); // 1000 B/s, 1000 B at once
        let now = 10 * S;
        assert_eq!(c.body_delay(g, 1000, now), Duration::ZERO);
        let d = c.body_delay(g, 500, now);
        assert!(
            d >= Duration::from_millis(499) && d <= Duration::from_millis(501),
            "{d:?}"
        );
    }

    #[test]
    fn idle_counters_are_recognised() {
        let c = Counters::default();
        let now = 10 * S;
        assert!(c.idle(now, 120));
        c.take_window(1, 5, 120).unwrap();
        assert!(!c.idle(now, 120));
        assert!(c.idle(now, 3600 + 120), "the hour window ended");
    }
}
