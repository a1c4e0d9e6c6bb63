//! Backend state that outlives configuration snapshots.
//!
//! The [`Registry`] owns one [`BackendState`] per (upstream name, resolved backend address). A
//! compile of an upstream gets-or-creates its states here, so a reload of an unchanged upstream
//! keeps its active health, passive-ejection counters and in-flight counts. The registry lock is
//! taken at compile and by [`Registry::retain`] only; the request path reads the states through
//! the `Arc`s the compiled upstream holds and never touches the lock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Upstream;

/// Per-(upstream, address) state shared by every snapshot that configures that backend.
///
/// All fields are atomics: the request path reads and updates them without locks.
#[derive(Debug)]
pub(crate) struct BackendState {
    /// For logs only.
    pub(super) upstream: Box<str>,
    pub(super) addr: SocketAddr,
    /// Active health as last decided by the health checker. Starts `true`: a new backend gets
    /// traffic at once rather than after its first probes.
    pub(super) healthy: AtomicBool,
    /// Consecutive probe results that disagree with `healthy`.
    pub(super) streak: AtomicU32,
    /// Passive: consecutive failures seen on live traffic.
    pub(super) failures: AtomicU32,
    /// Passive: end of the current ejection in [`super::passive::now_ms`] units; 0 = not ejected.
    pub(super) ejected_until: AtomicU64,
    /// Passive: set at ejection, cleared by the first success afterwards. While set (and the
    /// ejection is over) one more failure ejects again at once.
    pub(super) probation: AtomicBool,
    /// Requests holding a [`super::Pick`] on this backend.
    pub(super) in_flight: AtomicUsize,
}

impl BackendState {
    pub(super) fn new(upstream: &str, addr: SocketAddr) -> Self {
        Self {
            upstream: upstream.into(),
            addr,
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one active probe result. Returns the new health when this result flips it:
    /// `rise` consecutive successes bring an unhealthy backend back, `fall` consecutive failures
    /// take a healthy one down. Called by the health checker only, one probe at a time per
    /// backend.
    pub(super) fn observe_probe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.healthy.load(Ordering::Relaxed) {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let n = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if ok { rise } else { fall };
        if n >= needed.max(1) {
            self.healthy.store(ok, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            Some(ok)
        } else {
            None
        }
    }

    /// Forgets active-check verdicts (the upstream no longer has a `health_check`). Returns
    /// whether the backend was marked unhealthy before.
    pub(super) fn reset_active(&self) -> bool {
        self.streak.store(0, Ordering::Relaxed);
        !self.healthy.swap(true, Ordering::Relaxed)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

type Key = (String, SocketAddr);

/// Long-lived state that outlives config snapshots: one backend state per (upstream name,
/// backend address) with its active health, passive-ejection counters and in-flight count. A
/// reload re-attaches to it, so health and counters survive reloads of unchanged upstreams.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<Key, Arc<BackendState>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of `addr` in upstream `upstream`, created healthy on first use.
    pub(super) fn state(&self, upstream: &str, addr: SocketAddr) -> Arc<BackendState> {
        let mut states = self.lock();
        if let Some(s) = states.get(&(upstream.to_string(), addr)) {
            return s.clone();
        }
        let s = Arc::new(BackendState::new(upstream, addr));
        states.insert((upstream.to_string(), addr), s.clone());
        s
    }

    /// Forget state of backends no longer configured (called after a new snapshot is live).
    ///
    /// Snapshots still in use keep their own `Arc`s, so requests in flight on an old snapshot
    /// are unaffected; a backend configured again later starts afresh.
    pub fn retain(&self, live: &[Arc<Upstream>]) {
        let keep: HashSet<(&str, SocketAddr)> = live
            .iter()
            .flat_map(|u| u.backends.iter().map(|b| (u.name.as_str(), b.addr)))
            .collect();
        self.lock()
            .retain(|(name, addr), _| keep.contains(&(name.as_str(), *addr)));
    }

    /// Number of backend states held (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Arc<BackendState>>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_thresholds_flip_health() {
        let s = BackendState::new("u", "127.0.0.1:1".parse().unwrap());
        assert!(s.is_healthy());
        // fall = 3: two failures are not enough, a success in between resets the streak.
        assert_eq!(s.observe_probe(false, 2, 3), None);
        assert_eq!(s.observe_probe(false, 2, 3), None);
        assert_eq!(s.observe_probe(true, 2, 3), None);
        assert_eq!(s.observe_probe(false, 2, 3), None);
        assert_eq!(s.observe_probe(false, 2, 3), None);
        assert!(s.is_healthy());
        assert_eq!(s.observe_probe(false, 2, 3), Some(false));
        assert!(!s.is_healthy());
        // rise = 2.
        assert_eq!(s.observe_probe(true, 2, 3), None);
        assert_eq!(s.observe_probe(false, 2, 3), None);
        assert_eq!(s.observe_probe(true, 2, 3), None);
        assert!(!s.is_healthy());
        assert_eq!(s.observe_probe(true, 2, 3), Some(true));
        assert!(s.is_healthy());
    }

    #[test]
    fn same_key_same_state() {
        let r = Registry::new();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s1 = r.state("u", a);
        let s2 = r.state("u", a);
        let s3 = r.state("v", a);
        assert!(Arc::ptr_eq(&s1, &s2));
        assert!(!Arc::ptr_eq(&s1, &s3));
        assert_eq!(r.len(), 2);
    }
}
