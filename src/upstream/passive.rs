//! Passive health: ejecting backends that fail on live traffic.
//!
//! A backend that fails `consecutive_failures` times in a row (connect failures, and 5xx answers
//! when `count_5xx`) is taken out for `ejection_time`. When that time is over it gets traffic
//! again on probation ("half-open"): one more failure ejects it again at once, a success clears
//! the probation. Everything here runs on the request path: atomics only, no locks, and a clock
//! read only when a backend is or may become ejected.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::registry::BackendState;

/// Monotonic milliseconds since the first call in this process, never 0 (0 means "not ejected").
pub(super) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// The compiled `passive:` block of one upstream.
#[derive(Debug, Clone, Copy)]
pub(super) struct PassivePolicy {
    /// 0 = passive ejection off.
    pub consecutive_failures: u32,
    pub ejection_ms: u64,
    pub count_5xx: bool,
}

impl PassivePolicy {
    pub fn new(cfg: &crate::config::PassiveHealth) -> Self {
        Self {
            consecutive_failures: cfg.consecutive_failures,
            ejection_ms: duration_ms(cfg.ejection_time.get()),
            count_5xx: cfg.count_5xx,
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2).max(1)
}

impl BackendState {
    /// Whether the backend is out of rotation because of an ejection. Ends an ejection whose
    /// time is over (and logs that once).
    #[inline]
    pub(super) fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        self.ejected_at(until, now_ms())
    }

    fn ejected_at(&self, until: u64, now: u64) -> bool {
        if until == 0 {
            return false;
        }
        if now < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                upstream = %self.upstream,
                backend = %self.addr,
                "ejection over, backend gets traffic again (on probation)"
            );
        }
        false
    }

    /// A failure on live traffic (connect failure, or a counted 5xx).
    pub(super) fn passive_failure(&self, policy: &PassivePolicy) {
        if policy.consecutive_failures == 0 {
            return;
        }
        let now = now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        if self.ejected_at(until, now) {
            // A late answer to a request sent before the ejection: already out.
            return;
        }
        if self.probation.load(Ordering::Relaxed) {
            self.eject(now, policy, "failed again on probation");
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= policy.consecutive_failures {
            self.eject(now, policy, "consecutive failures");
        }
    }

    /// A success on live traffic: resets the failure count and ends a probation.
    #[inline]
    pub(super) fn passive_success(&self) {
        // Read before writing: the common case (nothing to reset) stays a shared cache line.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Relaxed)
            && !self.is_ejected()
            && self.probation.swap(false, Ordering::Relaxed)
        {
            tracing::info!(
                upstream = %self.upstream,
                backend = %self.addr,
                "backend recovered from ejection"
            );
        }
    }

    /// A passing active probe lifts a passive ejection early (as Envoy does by default); the
    /// backend stays on probation, so one more failure ejects it again.
    pub(super) fn active_probe_passed(&self) {
        if self.ejected_until.load(Ordering::Relaxed) != 0
            && self.ejected_until.swap(0, Ordering::Relaxed) != 0
        {
            tracing::info!(
                upstream = %self.upstream,
                backend = %self.addr,
                "active health check passed, ejection lifted (on probation)"
            );
        }
    }

    fn eject(&self, now: u64, policy: &PassivePolicy, why: &str) {
        let until = now.saturating_add(policy.ejection_ms);
        // Only one of several concurrent failures ejects (and logs).
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.failures.store(0, Ordering::Relaxed);
            self.probation.store(true, Ordering::Relaxed);
            tracing::warn!(
                upstream = %self.upstream,
                backend = %self.addr,
                ejection_ms = policy.ejection_ms,
                reason = why,
                "backend ejected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    fn policy(n: u32, ms: u64) -> PassivePolicy {
        PassivePolicy {
            consecutive_failures: n,
            ejection_ms: ms,
            count_5xx: true,
        }
    }

    #[test]
    fn a_passing_active_probe_lifts_an_ejection() {
        let s = BackendState::new("u", "127.0.0.1:1".parse().unwrap());
        let p = policy(2, 60_000);
        s.passive_failure(&p);
        s.passive_failure(&p);
        assert!(s.is_ejected());
        s.active_probe_passed();
        assert!(!s.is_ejected(), "probe success must lift the ejection");
        s.passive_failure(&p);
        assert!(
            s.is_ejected(),
            "still on probation: one failure ejects again"
        );
    }

    #[test]
    fn ejects_after_consecutive_failures_then_half_open() {
        let s = BackendState::new("u", "127.0.0.1:1".parse().unwrap());
        let p = policy(3, 80);
        s.passive_failure(&p);
        s.passive_failure(&p);
        s.passive_success(); // resets the run
        s.passive_failure(&p);
        s.passive_failure(&p);
        assert!(!s.is_ejected());
        s.passive_failure(&p);
        assert!(s.is_ejected());
        // Failures while ejected change nothing.
        s.passive_failure(&p);
        sleep(Duration::from_millis(40));
        assert!(s.is_ejected());
        sleep(Duration::from_millis(60));
        assert!(!s.is_ejected(), "ejection must end after ejection_time");
        // Half-open: one failure re-ejects at once.
        s.passive_failure(&p);
        assert!(s.is_ejected());
        sleep(Duration::from_millis(100));
        assert!(!s.is_ejected());
        // A success ends the probation: it takes the full count again.
        s.passive_success();
        s.passive_failure(&p);
        s.passive_failure(&p);
        assert!(!s.is_ejected());
        s.passive_failure(&p);
        assert!(s.is_ejected());
    }

    #[test]
    fn zero_turns_it_off() {
        let s = BackendState::new("u", "127.0.0.1:1".parse().unwrap());
        let p = policy(0, 1000);
        for _ in 0..100 {
            s.passive_failure(&p);
        }
        assert!(!s.is_ejected());
    }
}
