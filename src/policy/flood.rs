//! Flood (CC) protection: counts requests per client IP (and, optionally, per client IP and
//! route) and blocks an address that goes over its threshold for `block_for`.
//!
//! Owns: the `flood:` settings and their compiled [`FloodPolicy`] (in the snapshot), and the
//! process-wide [`FloodGuard`] (request counters and the table of blocked addresses), which
//! outlives reloads. Must never: take a lock on the path of a request that is not being
//! blocked (beyond a shard read when some address is blocked); grow with the number of
//! distinct clients; count or block an allow-listed address; panic on anything a request
//! carries.
//!
//! Runs after routing and the IP rules, before bot checks, the WAF and authentication (see
//! DESIGN), so a flood is refused before any expensive work: the glue calls
//! [`FloodGuard::check`] once per request (and per WebSocket upgrade) with the client address
//! from [`ClientIpPolicy::client_ip`](super::client_ip::ClientIpPolicy::client_ip) and a
//! stable id of the matched route, and answers [`Verdict::Blocked`] with `429` and a
//! `Retry-After` (whole seconds, rounded up).
//!
//! # Counting
//!
//! Requests are counted in a count-min sketch (`pingora_limits::estimator::Estimator`, the
//! sketch inside `pingora_limits::rate::Rate`): 4 rows of 65 536 atomic counters, so memory is
//! fixed (see [`WINDOW_BYTES`]) whether ten or ten million addresses are seen, and a count is 4
//! hashes and 4 relaxed atomic adds, no lock. A sketch can only over-count (collisions add other
//! keys' requests, never subtract), and by about `total requests in the window / 65 536` per
//! row at worst: 15 at a million requests per window, against a default budget of 100. That
//! is acceptable here and would not be for paid quotas: an over-count can only block a client
//! a little early, the block lasts `block_for` and then lifts by itself, and thresholds are set
//! far above what a person or a well-behaved client sends; a quota, in contrast, must never
//! charge one tenant for another's traffic, so quotas count exactly.
//!
//! Counts are kept in fixed windows of `interval`, like `Rate`: two sketches, one counting the
//! current window and one cleared for the next; the request that finds the window over swaps
//! them and clears the old one (2 MiB, ~50 µs measured, once per interval). The window is
//! driven by the `now` the caller passes, so block expiry and counting share one clock and tests
//! need no sleeps.
//!
//! Why not `Rate` itself: (1) `Rate::maybe_reset` panics, in release builds too, when two
//! threads race a window change during the first second of a `Rate` whose interval is under a
//! second (`assert!(new >= now - 1000)` underflows), and can underflow `now - last_reset` (a
//! panic in debug builds, which the tests run) when another thread has just moved the window;
//! (2) it reads its own clock, so `check(now)` could not drive it; (3) its `rate()` is the
//! previous window's average, which lags a whole interval and would give every flood one
//! free interval. `Rate::observe`'s semantics are kept: the decision uses the running count of
//! the current window, returned by the increment itself, so it reacts on the request that
//! crosses the threshold.
//!
//! # Effective threshold
//!
//! `budget = ⌈requests_per_second × interval⌉` requests per window (at least 1). The request
//! that makes an address's count in the current window exceed `budget` (the `budget + 1`-th) is
//! refused and blocks the address. Windows are fixed, not sliding, and shared by all addresses,
//! so:
//! - a steady rate at or under `requests_per_second` is never blocked (barring over-count);
//! - a burst straddling a window boundary may reach `2 × budget` within one interval unblocked;
//! - a steady rate `R` above the limit `L` is blocked within `interval × (1 + L / R)` of its
//!   start: about one interval for a flood at 50×.
//!
//! A reload that changes `interval` takes effect when the current window ends (its length is
//! read from the policy on each request), so nothing needs rebuilding and blocks are kept.
//!
//! # Blocking
//!
//! Blocked requests are not counted. A per-IP block refuses the address on every route. A
//! per-route block (`per_route_requests_per_second`) refuses the address **only on that
//! route**: a client hammering one expensive endpoint keeps the rest of the site. Both kinds
//! live in one table of 64 shards (`RwLock<HashMap>`); a per-request check is one shard read
//! (skipped entirely while nothing is blocked), an insert a shard write. The table holds at
//! most `max_blocked` entries (rounded up to a multiple of 64, the same share per shard); an
//! insert into a full shard first drops expired entries, then evicts the entry closest to
//! expiry. Expired entries are dropped when their address comes back, when their shard fills,
//! or by [`FloodGuard::sweep`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use pingora_limits::estimator::Estimator;
use serde::{Deserialize, Serialize};

use super::client_ip::CidrList;
use crate::config::error::join;
use crate::config::units::Dur;
use crate::config::FieldError;

/// Rows (hash functions) of each count-min sketch.
const HASHES: usize = 4;
/// Counters per row. Sized for the total requests per window (the over-count is about
/// `requests / SLOTS`), not for the number of addresses.
const SLOTS: usize = 1 << 16;
/// Bytes of one counting window (two sketches): 4 MiB. The per-IP window always exists once
/// flood protection has been enabled; the per-route one only once a per-route limit has been.
pub const WINDOW_BYTES: usize = 2 * HASHES * SLOTS * std::mem::size_of::<isize>();
/// Shards of the block table (a power of two).
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// Bytes per block-table entry, as laid out (key and expiry, plus the map's control byte); the
/// map may hold up to twice as many slots as entries.
pub const BLOCK_ENTRY_BYTES: usize = std::mem::size_of::<(BlockKey, u64)>() + 1;

const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_BLOCK_FOR: Duration = Duration::from_secs(24 * 3600);

/// The `flood:` section of tollgate.yaml (hot-reloaded).
///
/// ```yaml
/// flood:
///   enabled: false                      # default
///   requests_per_second: 100            # per client IP, default 100
///   per_route_requests_per_second: 20   # per client IP and route; default none
///   interval: 1s                        # counting window, default 1s
///   block_for: 60s                      # default 60s
///   allow: [10.0.0.0/8, 192.0.2.10]     # never counted nor blocked; default []
///   max_blocked: 100000                 # default 100000
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FloodSettings {
    /// Turns flood protection on. Default `false`: every request passes and nothing is counted.
    pub enabled: bool,
    /// Requests per second one client IP may send, on all routes together, measured over
    /// `interval` (the budget per window is `requests_per_second × interval`, rounded up).
    /// Going over blocks the address everywhere. Default `100`; at least 1.
    pub requests_per_second: u64,
    /// Requests per second one client IP may send to one route, measured the same way. Going
    /// over blocks the address on that route only. Default none (no per-route limit).
    pub per_route_requests_per_second: Option<u64>,
    /// The counting window. Longer windows tolerate bursts better and react more slowly.
    /// Default `1s`; between `100ms` and `1h`.
    pub interval: Dur,
    /// How long an address that went over stays blocked. Default `60s`; at most `24h`.
    pub block_for: Dur,
    /// CIDRs (or addresses) that are never counted nor blocked: offices, health checkers,
    /// partners' egress. Default empty.
    pub allow: Vec<String>,
    /// The most addresses (and address + route pairs) blocked at once; when full, the block
    /// closest to expiry makes room. Default `100000`; at least 1.
    pub max_blocked: usize,
}

impl Default for FloodSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            requests_per_second: 100,
            per_route_requests_per_second: None,
            interval: Dur(Duration::from_secs(1)),
            block_for: Dur(Duration::from_secs(60)),
            allow: Vec::new(),
            max_blocked: 100_000,
        }
    }
}

/// Compiled [`FloodSettings`]; lives in the config snapshot.
#[derive(Debug, Clone)]
pub struct FloodPolicy {
    enabled: bool,
    /// Requests allowed per window, per IP.
    budget: isize,
    /// Requests allowed per window, per IP and route.
    route_budget: Option<isize>,
    interval_ms: u64,
    block_for_ms: u64,
    allow: CidrList,
    /// Entries per block-table shard.
    shard_capacity: usize,
}

impl Default for FloodPolicy {
    /// Disabled.
    fn default() -> Self {
        Self {
            enabled: false,
            budget: isize::MAX,
            route_budget: None,
            interval_ms: 1000,
            block_for_ms: 60_000,
            allow: CidrList::default(),
            shard_capacity: 100_000usize.div_ceil(SHARDS),
        }
    }
}

impl FloodPolicy {
    /// Compiles the settings; `path` is the section's field path (`flood`). Runs at load time;
    /// every error is returned. Settings are checked even when `enabled: false`, so turning
    /// the guard on later cannot fail on an old mistake.
    pub fn compile(path: &str, s: &FloodSettings) -> Result<FloodPolicy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |name: &str, msg: String| errors.push(FieldError::new(join(path, name), msg));

        let interval = s.interval.get();
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            err("interval", "must be between 100ms and 1h, e.g. 1s".into());
        }
        let interval_ms = interval.as_millis().clamp(1, MAX_INTERVAL.as_millis()) as u64;
        let mut budget = |name: &str, rps: u64| -> isize {
            if rps == 0 {
                err(
                    name,
                    "must be at least 1; to turn flood protection off, set `enabled: false`".into(),
                );
                return isize::MAX;
            }
            let per_window = (u128::from(rps) * u128::from(interval_ms)).div_ceil(1000);
            isize::try_from(per_window).unwrap_or(isize::MAX)
        };
        let ip_budget = budget("requests_per_second", s.requests_per_second);
        let route_budget = s
            .per_route_requests_per_second
            .map(|rps| budget("per_route_requests_per_second", rps));

        let block_for = s.block_for.get();
        if block_for.is_zero() || block_for > MAX_BLOCK_FOR {
            err(
                "block_for",
                "must be more than 0 and at most 24h, e.g. 60s".into(),
            );
        }
        let block_for_ms = block_for
            .as_nanos()
            .div_ceil(1_000_000)
            .clamp(1, MAX_BLOCK_FOR.as_millis()) as u64;
        if s.max_blocked == 0 {
            err("max_blocked", "must be at least 1".into());
        }
        let allow = match CidrList::parse(&join(path, "allow"), &s.allow) {
            Ok(l) => l,
            Err(e) => {
                errors.extend(e);
                CidrList::default()
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(FloodPolicy {
            enabled: s.enabled,
            budget: ip_budget,
            route_budget,
            interval_ms,
            block_for_ms,
            allow,
            shard_capacity: s.max_blocked.div_ceil(SHARDS),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Requests one IP may send per window before it is blocked (see the module docs).
    pub fn budget(&self) -> u64 {
        self.budget as u64
    }

    /// Requests one IP may send to one route per window, when a per-route limit is set.
    pub fn route_budget(&self) -> Option<u64> {
        self.route_budget.map(|b| b as u64)
    }
}

/// What [`FloodGuard::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse the request (`429`). `retry_after` is how long the block has left; `newly` is
    /// true only on the request that caused the block (log it once, count it in metrics).
    Blocked {
        retry_after: Duration,
        newly: bool,
    },
}

/// Process-wide flood state: the counting windows and the block table. Created once at
/// startup, shared by every worker, kept across reloads; each call takes the current
/// snapshot's [`FloodPolicy`].
pub struct FloodGuard {
    /// Time zero of the windows and the block table, which store milliseconds since it.
    epoch: Instant,
    /// Allocated on the first request counted, so a disabled guard costs nothing.
    per_ip: OnceLock<Window>,
    per_route: OnceLock<Window>,
    blocks: BlockTable,
}

impl Default for FloodGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl FloodGuard {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            per_ip: OnceLock::new(),
            per_route: OnceLock::new(),
            blocks: BlockTable::new(),
        }
    }

    /// Decides one request from `ip` on `route`, counting it if it is let through. Runs once
    /// per request, after routing (so `route` is known) and before auth.
    ///
    /// `route`: a stable id of the matched route (a hash of its name survives reloads that
    /// reorder routes; an index does not), `None` when no route matched (only the per-IP
    /// limit applies). `now`: the request's arrival time, `Instant::now()` in production.
    pub fn check(
        &self,
        policy: &FloodPolicy,
        ip: IpAddr,
        route: Option<u64>,
        now: Instant,
    ) -> Verdict {
        if !policy.enabled {
            return Verdict::Allow;
        }
        let ip = ip.to_canonical();
        if !policy.allow.is_empty() && policy.allow.contains(ip) {
            return Verdict::Allow;
        }
        let key = ip_key(ip);
        // Per-route blocks matter only while a per-route limit is configured.
        let route = route.filter(|_| policy.route_budget.is_some());
        let now_ms = self.millis(now);

        if let Some(left) = self.blocks.lookup(key, route, now_ms) {
            return Verdict::Blocked {
                retry_after: Duration::from_millis(left),
                newly: false,
            };
        }
        let seen = self
            .per_ip
            .get_or_init(Window::new)
            .observe(&key, now_ms, policy.interval_ms);
        if seen > policy.budget {
            return self.block(
                policy,
                BlockKey {
                    ip: key,
                    route: None,
                },
                now_ms,
            );
        }
        if let (Some(budget), Some(r)) = (policy.route_budget, route) {
            let seen = self.per_route.get_or_init(Window::new).observe(
                &(key, r),
                now_ms,
                policy.interval_ms,
            );
            if seen > budget {
                return self.block(
                    policy,
                    BlockKey {
                        ip: key,
                        route: Some(r),
                    },
                    now_ms,
                );
            }
        }
        Verdict::Allow
    }

    /// Entries in the block table, including expired ones not yet dropped (see [`sweep`]).
    ///
    /// [`sweep`]: FloodGuard::sweep
    pub fn blocked_len(&self) -> usize {
        self.blocks.len.load(Ordering::Relaxed)
    }

    /// Drops every expired block. Optional (expired blocks never refuse anything); call it from
    /// a periodic task to keep [`blocked_len`](FloodGuard::blocked_len) exact for metrics.
    pub fn sweep(&self, now: Instant) {
        self.blocks.sweep(self.millis(now));
    }

    /// Bytes held now: counting windows allocated so far and block-table slots. Bounded by
    /// `2 × WINDOW_BYTES + 2 × ⌈max_blocked / 64⌉ × 64 × BLOCK_ENTRY_BYTES` plus the maps'
    /// fixed overhead, whatever the number of distinct clients.
    pub fn memory_bytes(&self) -> usize {
        let windows =
            usize::from(self.per_ip.get().is_some()) + usize::from(self.per_route.get().is_some());
        windows * WINDOW_BYTES + self.blocks.slots() * BLOCK_ENTRY_BYTES
    }

    fn block(&self, policy: &FloodPolicy, key: BlockKey, now_ms: u64) -> Verdict {
        let expires = now_ms.saturating_add(policy.block_for_ms);
        let (expires, newly) = self
            .blocks
            .insert(key, expires, now_ms, policy.shard_capacity);
        Verdict::Blocked {
            retry_after: Duration::from_millis(expires.saturating_sub(now_ms)),
            newly,
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

/// The address as one integer; IPv4 as its IPv4-mapped IPv6 form (which a canonical IPv6
/// address never is), so the two families never share a key.
fn ip_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Fixed counting windows over two count-min sketches (see the module docs).
struct Window {
    sketches: [Estimator; 2],
    /// `start << 1 | current`: the current window's start (milliseconds since the guard's
    /// epoch) and which sketch counts it. The other sketch is already clear.
    state: AtomicU64,
}

impl Window {
    fn new() -> Self {
        Self {
            sketches: [Estimator::new(HASHES, SLOTS), Estimator::new(HASHES, SLOTS)],
            state: AtomicU64::new(0),
        }
    }

    /// Counts one event of `key` at `now_ms` and returns its (over-)estimated count in the
    /// current window, this event included.
    #[inline]
    fn observe<K: std::hash::Hash>(&self, key: &K, now_ms: u64, interval_ms: u64) -> isize {
        let mut state = self.state.load(Ordering::Acquire);
        // A caller whose `now` is a little older than the window start counts in the current
        // window (saturating): clocks of concurrent requests are not ordered.
        if now_ms.saturating_sub(state >> 1) >= interval_ms {
            let next = (now_ms << 1) | ((state & 1) ^ 1);
            match self
                .state
                .compare_exchange(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // We moved the window: clear the old sketch for the one after. Requests
                    // that read the old state just before still add to it; the few counts they
                    // leave over-count the next window slightly, which is the safe direction.
                    self.sketches[(state & 1) as usize].reset();
                    state = next;
                }
                Err(current) => state = current,
            }
        }
        self.sketches[(state & 1) as usize].incr(key, 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BlockKey {
    ip: u128,
    /// `None`: blocked on every route.
    route: Option<u64>,
}

/// Blocked keys and when each block ends (milliseconds since the guard's epoch).
struct BlockTable {
    shards: Box<[RwLock<HashMap<BlockKey, u64>>]>,
    /// Entries over all shards; `0` lets the per-request check skip the lookup.
    len: AtomicUsize,
    /// Mixed into the shard choice so that nobody can aim many addresses at one shard.
    seed: u64,
}

impl BlockTable {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
            seed: fastrand::u64(..),
        }
    }

    /// Both keys of an address (everywhere, and per route) live in the shard of its address,
    /// so one read lock answers both.
    #[inline]
    fn shard(&self, ip: u128) -> &RwLock<HashMap<BlockKey, u64>> {
        let x = (ip as u64) ^ ((ip >> 64) as u64).rotate_left(32) ^ self.seed;
        let i = (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize;
        &self.shards[i]
    }

    /// Milliseconds left on a block of `ip` (everywhere, or on `route`), if any is live.
    #[inline]
    fn lookup(&self, ip: u128, route: Option<u64>, now_ms: u64) -> Option<u64> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let shard = self.shard(ip);
        let mut expired = false;
        {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            let everywhere = BlockKey { ip, route: None };
            let keys = [
                Some(everywhere),
                route.map(|r| BlockKey { ip, route: Some(r) }),
            ];
            for key in keys.iter().flatten() {
                if let Some(&expires) = map.get(key) {
                    if expires > now_ms {
                        return Some(expires - now_ms);
                    }
                    expired = true;
                }
            }
        }
        if expired {
            // Once per block, when its address comes back after it ended.
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|k, &mut expires| k.ip != ip || expires > now_ms);
            self.len.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
        None
    }

    /// Blocks `key` until `expires` unless it is already blocked; returns the block's end and
    /// whether this call created it.
    fn insert(&self, key: BlockKey, expires: u64, now_ms: u64, capacity: usize) -> (u64, bool) {
        let mut map = self
            .shard(key.ip)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(&current) = map.get(&key) {
            if current > now_ms {
                // Another request crossed the threshold at the same moment.
                return (current, false);
            }
        }
        let before = map.len();
        if !map.contains_key(&key) && map.len() >= capacity {
            map.retain(|_, &mut e| e > now_ms);
            while map.len() >= capacity.max(1) {
                let Some(soonest) = map.iter().min_by_key(|(_, &e)| e).map(|(k, _)| *k) else {
                    break;
                };
                map.remove(&soonest);
            }
        }
        map.insert(key, expires);
        let after = map.len();
        if after >= before {
            self.len.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.len.fetch_sub(before - after, Ordering::Relaxed);
        }
        (expires, true)
    }

    fn sweep(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, &mut e| e > now_ms);
            self.len.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
    }

    /// Slots allocated over all shards.
    fn slots(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).capacity())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// interval 100ms, block_for 500ms, 100 rps → budget 10 per window.
    fn settings() -> FloodSettings {
        FloodSettings {
            enabled: true,
            requests_per_second: 100,
            interval: Dur(ms(100)),
            block_for: Dur(ms(500)),
            ..FloodSettings::default()
        }
    }

    fn compile(s: &FloodSettings) -> FloodPolicy {
        FloodPolicy::compile("flood", s).unwrap()
    }

    fn blocked(v: Verdict) -> bool {
        matches!(v, Verdict::Blocked { .. })
    }

    /// Sends `per_window` requests from `ip` in each 100ms window, spread evenly, for
    /// `windows` windows starting at `start`; returns the time of the first refusal.
    fn flood(
        (g, p): (&FloodGuard, &FloodPolicy),
        ip: IpAddr,
        route: Option<u64>,
        start: Instant,
        per_window: u32,
        windows: u32,
    ) -> Option<Instant> {
        let step = ms(100) / per_window;
        let mut first = None;
        for i in 0..per_window * windows {
            let at = start + step * i;
            if blocked(g.check(p, ip, route, at)) && first.is_none() {
                first = Some(at);
            }
        }
        first
    }

    #[test]
    fn defaults_read_from_yaml() {
        let s: FloodSettings = serde_yaml::from_str("{}").unwrap();
        assert_eq!(s, FloodSettings::default());
        assert!(!s.enabled);
        assert_eq!(s.requests_per_second, 100);
        assert_eq!(s.interval.get(), Duration::from_secs(1));
        assert_eq!(s.block_for.get(), Duration::from_secs(60));
        assert_eq!(s.max_blocked, 100_000);
        let p = compile(&s);
        assert_eq!(p.budget(), 100);
        assert_eq!(p.route_budget(), None);
        let s: FloodSettings = serde_yaml::from_str(
            "{enabled: true, requests_per_second: 15, per_route_requests_per_second: 3, \
             interval: 100ms, block_for: 2m, allow: [10.0.0.0/8], max_blocked: 10}",
        )
        .unwrap();
        let p = compile(&s);
        assert_eq!(p.budget(), 2, "15 rps over 100ms rounds up");
        assert_eq!(p.route_budget(), Some(1));
        assert!(serde_yaml::from_str::<FloodSettings>("{rate: 1}").is_err());
        let back: FloodSettings =
            serde_yaml::from_str(&serde_yaml::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn config_errors_name_every_field() {
        let s = FloodSettings {
            requests_per_second: 0,
            per_route_requests_per_second: Some(0),
            interval: Dur(ms(10)),
            block_for: Dur(Duration::ZERO),
            allow: vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()],
            max_blocked: 0,
            ..FloodSettings::default()
        };
        let errs = FloodPolicy::compile("flood", &s).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "flood.interval",
                "flood.requests_per_second",
                "flood.per_route_requests_per_second",
                "flood.block_for",
                "flood.max_blocked",
                "flood.allow[1]",
            ]
        );
        assert!(errs[1].message.contains("enabled: false"), "{}", errs[1]);
    }

    #[test]
    fn disabled_guard_allows_everything_and_allocates_nothing() {
        let g = FloodGuard::new();
        let p = compile(&FloodSettings {
            enabled: false,
            ..settings()
        });
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            assert_eq!(
                g.check(&p, ip("192.0.2.1"), Some(1), t0 + ms(i / 100)),
                Verdict::Allow
            );
        }
        assert_eq!(g.memory_bytes(), 0);
        assert_eq!(
            g.check(&FloodPolicy::default(), ip("192.0.2.1"), None, t0),
            Verdict::Allow
        );
    }

    #[test]
    fn flood_is_blocked_within_an_interval_and_released_after_block_for() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let t0 = Instant::now();
        let attacker = ip("203.0.113.9");
        // 50× the threshold: 500 requests per 100ms window.
        let first = flood((&g, &p), attacker, None, t0 + ms(30), 500, 1).expect("blocked") - t0;
        assert!(first <= ms(30) + ms(100), "blocked after {first:?}");
        // Exactly one verdict says `newly`; later ones carry the time left.
        let v = g.check(&p, attacker, None, t0 + ms(130));
        match v {
            Verdict::Blocked { retry_after, newly } => {
                assert!(!newly);
                assert!(
                    retry_after <= ms(500) && retry_after > ms(300),
                    "{retry_after:?}"
                );
            }
            Verdict::Allow => panic!("still flooding, must stay blocked"),
        }
        assert_eq!(g.blocked_len(), 1);
        // Quiet after the block: released once block_for has passed since the block.
        let release = t0 + first + ms(500);
        assert!(blocked(g.check(&p, attacker, None, release - ms(1))));
        assert_eq!(g.check(&p, attacker, None, release), Verdict::Allow);
        assert_eq!(g.blocked_len(), 0, "an expired block is dropped when seen");
    }

    #[test]
    fn newly_is_reported_once() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let t0 = Instant::now();
        let a = ip("203.0.113.9");
        let verdicts: Vec<Verdict> = (0..20).map(|_| g.check(&p, a, None, t0)).collect();
        assert!(
            verdicts[..10].iter().all(|v| *v == Verdict::Allow),
            "budget is 10"
        );
        assert_eq!(
            verdicts[10],
            Verdict::Blocked {
                retry_after: ms(500),
                newly: true
            }
        );
        assert!(verdicts[11..]
            .iter()
            .all(|v| matches!(v, Verdict::Blocked { newly: false, .. })));
    }

    #[test]
    fn steady_rate_at_the_limit_is_never_blocked() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let t0 = Instant::now();
        // 100 rps exactly (10 per window) for 5 seconds, windows starting at arbitrary offsets.
        assert_eq!(
            flood((&g, &p), ip("198.51.100.1"), None, t0 + ms(7), 10, 50),
            None
        );
    }

    #[test]
    fn allow_listed_ip_is_never_blocked_nor_counted() {
        let g = FloodGuard::new();
        let p = compile(&FloodSettings {
            allow: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            ..settings()
        });
        let t0 = Instant::now();
        assert_eq!(flood((&g, &p), ip("10.1.2.3"), Some(1), t0, 500, 5), None);
        assert_eq!(
            flood((&g, &p), ip("::ffff:10.1.2.3"), None, t0, 500, 5),
            None
        );
        assert_eq!(flood((&g, &p), ip("2001:db8::5"), None, t0, 500, 5), None);
        assert_eq!(g.blocked_len(), 0);
        assert_eq!(g.memory_bytes(), 0, "not even counted");
    }

    #[test]
    fn quiet_ip_beside_the_flood_is_never_blocked() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let t0 = Instant::now();
        let attacker = ip("203.0.113.9");
        let quiet = ip("203.0.113.10");
        for i in 0..5_000u32 {
            let at = t0 + Duration::from_micros(200) * i; // 5 000 rps for 1s
            g.check(&p, attacker, None, at);
            if i % 100 == 0 {
                assert_eq!(g.check(&p, quiet, None, at), Verdict::Allow); // 50 rps
            }
        }
        assert!(blocked(g.check(&p, attacker, None, t0 + ms(999))));
    }

    #[test]
    fn ipv4_mapped_is_the_same_client() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let t0 = Instant::now();
        for _ in 0..6 {
            g.check(&p, ip("192.0.2.1"), None, t0);
            g.check(&p, ip("::ffff:192.0.2.1"), None, t0);
        }
        assert!(blocked(g.check(&p, ip("192.0.2.1"), None, t0)));
        assert_eq!(g.check(&p, ip("::192.0.2.1"), None, t0), Verdict::Allow);
    }

    #[test]
    fn per_route_threshold_blocks_only_that_route() {
        let g = FloodGuard::new();
        let p = compile(&FloodSettings {
            requests_per_second: 1000,               // 100 per window
            per_route_requests_per_second: Some(50), // 5 per window
            ..settings()
        });
        let t0 = Instant::now();
        let a = ip("203.0.113.9");
        let (search, home) = (Some(7), Some(8));
        let first = flood((&g, &p), a, search, t0, 20, 1).expect("route limit");
        assert_eq!(first - t0, ms(5) * 5, "the 6th request to the route");
        // The same client elsewhere is fine, and so is another client on the route.
        assert_eq!(g.check(&p, a, home, t0 + ms(60)), Verdict::Allow);
        assert_eq!(g.check(&p, a, None, t0 + ms(60)), Verdict::Allow);
        assert_eq!(
            g.check(&p, ip("203.0.113.10"), search, t0 + ms(60)),
            Verdict::Allow
        );
        assert!(blocked(g.check(&p, a, search, t0 + ms(60))));
        // The per-IP limit still blocks everywhere.
        let spread = (0..200u64)
            .map(|i| {
                g.check(
                    &p,
                    a,
                    Some(100 + i),
                    t0 + ms(100) + Duration::from_micros(i * 100),
                )
            })
            .position(blocked);
        assert_eq!(
            spread,
            Some(100),
            "the 101st request in the window, over many routes"
        );
        assert!(blocked(g.check(&p, a, Some(9), t0 + ms(250))));
        // Without a per-route limit, route ids do not matter.
        let plain = compile(&settings());
        let g = FloodGuard::new();
        let hits = (0..10u64)
            .map(|r| g.check(&plain, a, Some(r), t0))
            .filter(|v| *v == Verdict::Allow)
            .count();
        assert_eq!(hits, 10);
        assert!(blocked(g.check(&plain, a, Some(11), t0)));
    }

    #[test]
    fn reload_changes_interval_and_keeps_blocks() {
        let g = FloodGuard::new();
        let t0 = Instant::now();
        let slow = compile(&FloodSettings {
            interval: Dur(Duration::from_secs(10)),
            block_for: Dur(Duration::from_secs(60)),
            ..settings()
        }); // 1000 per 10s window
        let fast = compile(&settings()); // 10 per 100ms window
        let a = ip("203.0.113.9");
        let b = ip("203.0.113.10");
        for _ in 0..1001 {
            g.check(&slow, a, None, t0);
        }
        assert!(blocked(g.check(&slow, a, None, t0)));
        // 500 requests from b in the long window: fine under `slow`.
        for _ in 0..500 {
            assert_eq!(g.check(&slow, b, None, t0 + ms(50)), Verdict::Allow);
        }
        // Reload to 100ms windows: the old 10s window ends 100ms after it started, so b's 500
        // are not carried over, and a stays blocked.
        assert_eq!(g.check(&fast, b, None, t0 + ms(120)), Verdict::Allow);
        assert!(blocked(g.check(&fast, a, None, t0 + ms(120))));
        // And back to the long window: no window restarts early.
        for _ in 0..100 {
            assert_eq!(g.check(&slow, b, None, t0 + ms(300)), Verdict::Allow);
        }
    }

    #[test]
    fn block_table_is_bounded_and_evicts_the_soonest_expiry() {
        let g = FloodGuard::new();
        let p = compile(&FloodSettings {
            requests_per_second: 10, // 1 per window
            max_blocked: 128,        // 2 per shard
            block_for: Dur(Duration::from_secs(3600)),
            ..settings()
        });
        let t0 = Instant::now();
        let mut newly = 0;
        for i in 0..2_000u32 {
            let a = IpAddr::V4(Ipv4Addr::from(0xC000_0000 + i));
            let at = t0 + ms(u64::from(i)); // later blocks expire later
            g.check(&p, a, None, at);
            if matches!(
                g.check(&p, a, None, at),
                Verdict::Blocked { newly: true, .. }
            ) {
                newly += 1;
            }
            assert!(g.blocked_len() <= 128, "{}", g.blocked_len());
        }
        assert_eq!(newly, 2_000, "every address went over and was blocked");
        assert!(g.blocked_len() > 64, "{}", g.blocked_len());
        // The most recent block is kept; the very first was evicted long ago.
        let last = IpAddr::V4(Ipv4Addr::from(0xC000_0000u32 + 1999));
        assert!(blocked(g.check(&p, last, None, t0 + ms(2000))));
        let first = IpAddr::V4(Ipv4Addr::from(0xC000_0000u32));
        assert_eq!(g.check(&p, first, None, t0 + ms(5000)), Verdict::Allow);
        // Sweeping after everything expired empties the table.
        g.sweep(t0 + Duration::from_secs(7200));
        assert_eq!(g.blocked_len(), 0);
    }

    #[test]
    fn a_million_distinct_ips_stay_in_fixed_memory_and_are_not_blocked() {
        let g = FloodGuard::new();
        let p = compile(&FloodSettings {
            per_route_requests_per_second: Some(100),
            interval: Dur(Duration::from_secs(1)),
            ..settings()
        }); // budgets 100 per window; all in one window: the worst case for over-counting
        let t0 = Instant::now();
        for i in 0..1_000_000u64 {
            let a = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from((i as u32).wrapping_mul(2_654_435_761)))
            } else {
                IpAddr::V6(Ipv6Addr::from((u128::from(i) << 64) | 0x2001_0db8))
            };
            let v = g.check(&p, a, Some(i % 16), t0 + Duration::from_micros(i / 2));
            assert_eq!(v, Verdict::Allow, "request {i} from {a}");
        }
        assert_eq!(g.blocked_len(), 0);
        assert_eq!(g.memory_bytes(), 2 * WINDOW_BYTES);
        assert_eq!(WINDOW_BYTES, 4 << 20);
    }

    #[test]
    fn many_threads_share_one_guard() {
        let g = std::sync::Arc::new(FloodGuard::new());
        let p = std::sync::Arc::new(compile(&settings()));
        let start = Instant::now();
        let handles: Vec<_> = (0..4u32)
            .map(|t| {
                let (g, p) = (g.clone(), p.clone());
                std::thread::spawn(move || {
                    let (mut quiet, mut hot) = (0, 0);
                    for i in 0..20_000u32 {
                        // Real time: every thread crosses window boundaries concurrently.
                        let a = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i * 4 + t));
                        if blocked(g.check(&p, a, None, Instant::now())) {
                            quiet += 1;
                        }
                        let v = g.check(&p, ip("203.0.113.9"), None, Instant::now());
                        if let Verdict::Blocked { newly: true, .. } = v {
                            hot += 1;
                        }
                    }
                    (quiet, hot)
                })
            })
            .collect();
        let results: Vec<(u32, u32)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let elapsed = start.elapsed();
        let quiet: u32 = results.iter().map(|r| r.0).sum();
        let hot: u32 = results.iter().map(|r| r.1).sum();
        assert_eq!(quiet, 0, "one request per address");
        // The hot address is blocked, once per 500ms block, by exactly one thread each time.
        let most = 1 + elapsed.as_millis() / 500;
        assert!(
            hot >= 1 && u128::from(hot) <= most,
            "{hot} blocks in {elapsed:?}"
        );
    }

    /// The same on the real clock, with short durations and bounded waits. Requests follow an
    /// absolute schedule (5 000 rps, 50× the limit), so a thread that is descheduled catches up
    /// in a burst rather than slowing the flood down.
    #[test]
    fn real_clock_flood_and_release() {
        let g = FloodGuard::new();
        let p = compile(&settings());
        let a = ip("203.0.113.9");
        let start = Instant::now();
        let mut sent = 0u32;
        let blocked_at = loop {
            let now = Instant::now();
            if now < start + Duration::from_micros(200) * sent {
                std::thread::yield_now();
                continue;
            }
            sent += 1;
            if blocked(g.check(&p, a, None, now)) {
                break now;
            }
            assert!(now - start < Duration::from_secs(2), "never blocked");
        };
        assert!(
            blocked_at - start <= Duration::from_secs(1),
            "{:?}",
            blocked_at - start
        );
        std::thread::sleep(ms(300));
        let now = Instant::now();
        if now - blocked_at < ms(500) {
            assert!(blocked(g.check(&p, a, None, now)));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            std::thread::sleep(ms(20));
            let now = Instant::now();
            if g.check(&p, a, None, now) == Verdict::Allow {
                assert!(now - blocked_at >= ms(500), "released early");
                break;
            }
            assert!(now < deadline, "never released");
        }
    }
}
