//! Cluster-wide quota counting: one budget per (key, window) shared by a fleet of gateways
//! through Redis, without a Redis round trip per request.
//!
//! Owns the [`ClusterStore`] (one per process, outliving reloads), its connection to Redis, and
//! the local leases of budget it holds. Must never: fail a request because of Redis, make a
//! request wait longer than `command_timeout`, admit more than `limit` per window across the
//! fleet while Redis answers, log per request, or keep state of ended windows past a sweep.
//!
//! # How a request is decided
//! Windows are fixed and aligned to the wall clock (window `w` of a 60 s window covers
//! `[60 w, 60 (w + 1))` seconds since the Unix epoch). For each (key, window) Redis holds one
//! counter, `{key_prefix}{key}:{window_secs}:{w}`, of the budget handed out so far; it expires
//! a few seconds after the window ends.
//!
//! 1. A gateway takes a *lease* (a chunk of the budget) with one atomic Lua script: it grants
//!    `min(chunk, limit - counter)` (never below 0), adds the grant to the counter, and sets its
//!    expiry on first use. The counter therefore never exceeds `limit`: the fleet cannot admit
//!    more than `limit` in a window.
//! 2. Requests are admitted locally from the lease by an atomic decrement: no I/O, no global
//!    lock (finding the entry locks one of 64 shards for a map lookup).
//! 3. When half of a lease is used, the next one is fetched in the background, so most
//!    requests never wait. A request that finds the lease empty waits for one refill (at most
//!    `command_timeout`, shared with the requests waiting beside it), then decides.
//! 4. When Redis answers that the window's budget is gone, the gateway remembers it until the
//!    window ends: no more Redis calls for that key and window, rejections are local, with
//!    `retry_after` = time to the window's end.
//!
//! Lease size: at most `max(1, limit * lease_fraction)`, and adapted to local demand: it
//! doubles when a lease lasted less than half of the target lifetime (a quarter of the window,
//! at most 1 s) and halves when it lasted more than twice that. A busy gateway so makes about
//! one round trip per key per target lifetime, and an idle one holds little budget it will not
//! use. A request waiting for a refill asks for at least as many tokens as there are waiters.
//!
//! # Accuracy (while Redis answers)
//! - Never above `limit` per window key: Redis caps the grants.
//! - Below `limit` only by budget leased and not used when the window ends: at most about
//!   1.5 leases per gateway, a lease at most `limit * lease_fraction` (default 2 %). Under
//!   sustained overload every gateway uses its leases up, so the fleet admits `limit` exactly;
//!   the loss shows when demand stops right at the limit, or when a gateway restarts (its lease
//!   is lost). Measured in the tests: 200/s offered 3x across two gateways admits exactly 200
//!   per window; Redis round trips are 10-12 % of requests (about one per lease of 4, i.e.
//!   `admitted / (limit * lease_fraction)`, plus one per gateway and window to learn that the
//!   budget is gone).
//! - The first request of each window on each gateway waits one round trip for that window's
//!   first lease (leases are not taken ahead of the window).
//! - Each gateway cuts windows by its own clock: clock skew between gateways shifts which window
//!   a request counts in, not how many a window admits. Keys expire [`KEY_SLACK`] after the
//!   window's end, so a gateway whose clock lags by less than that still finds the counter.
//!
//! # Redis unavailable
//! A connect error, a command error or a timeout marks the store *down* (`up() == false`,
//! logged once at warn per outage) and a background task reconnects every
//! `reconnect_interval` (the first attempt at once), then logs the recovery at info. While
//! down, requests make no Redis call: they first use what is left of their lease, then decide
//! by `on_unavailable`: `local` counts exactly on this gateway with
//! `ceil(limit / fleet_size)` per window (requests admitted from leases in the same window
//! count too), `allow` admits, `reject` rejects with `retry_after = reconnect_interval`.
//! What a gateway admits on its own is reported with its next lease of the same window, so
//! the window in which Redis comes back does not hand out the whole budget again.
//!
//! Memory: one entry per (key, window length) in use (about 150 bytes plus the key), in 64
//! shards; a background sweep (every second) drops entries whose window ended, or that no
//! request touched for [`IDLE_AFTER`] (hour and day windows).
//!
//! Threads: the background task (connect, reconnect, idle probe, sweep) and the Redis
//! connection's I/O run on a thread of their own, `tollgate-quota`, with a single-threaded
//! tokio runtime, started by the first `configure` or `acquire` and ended when the store is
//! dropped. Requests only send on the multiplexed connection and await the answer on their own
//! runtime; background lease prefetches are spawned on the requesting runtime.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::error::join;
use crate::config::units::Dur;
use crate::config::FieldError;

/// Shards of the local lease table; a request locks one, briefly, to find its entry.
const SHARDS: usize = 64;

/// Window counters in Redis live this long past their window's end, for gateways whose clock
/// lags.
pub const KEY_SLACK: Duration = Duration::from_secs(5);

/// How often ended entries are swept from the local table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Entries of long windows (hour, day) untouched this long are dropped too, so memory follows
/// the keys in use rather than every key seen today. Dropping one forfeits what is left of its
/// lease (small: leases shrink when demand is low) and the knowledge that its window is
/// exhausted (the next request asks Redis again, and is told so).
const IDLE_AFTER: Duration = Duration::from_secs(60);

/// Longest a background connect (TCP, handshake and probe) may take, unless `command_timeout`
/// is longer. Requests wait for the first connect after a (re)configure at most
/// `command_timeout`, then fall back; never for reconnects.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a lease is meant to last; shorter windows aim at a quarter of the window.
const LEASE_LIFE: Duration = Duration::from_secs(1);

/// Attempts of one request to get a token (each may wait for a refill), all within
/// `command_timeout`.
const MAX_ROUNDS: usize = 4;

/// Records `report` requests a gateway admitted on its own in this window (while Redis was
/// down), then grants `min(want, limit - handed out)` of the window's budget and records it.
/// KEYS[1]: window counter. ARGV: want, limit, expiry in ms, report. Returns {granted, handed
/// out}.
const LEASE_SCRIPT: &str = r"
local report = tonumber(ARGV[4] or '0')
if report > 0 then redis.call('INCRBY', KEYS[1], report) end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
local total = used
if grant > 0 then total = redis.call('INCRBY', KEYS[1], grant) else grant = 0 end
if (grant > 0 or report > 0) and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {grant, total}
";

// ---------------------------------------------------------------------------------------------
// Settings

/// What a request gets when its lease is empty and Redis cannot be asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Count on this gateway alone: `ceil(limit / fleet_size)` per window.
    #[default]
    Local,
    /// Admit every request.
    Allow,
    /// Reject every request, with `retry_after = reconnect_interval`.
    Reject,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::Local => "local",
            Fallback::Allow => "allow",
            Fallback::Reject => "reject",
        })
    }
}

/// `cluster:` in quotas.yaml: count the quotas of plans that opt in across the whole fleet,
/// through one Redis. Changes apply at the next reload; only a changed `redis` reconnects.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0` or `redis://:${env:PASS}@10.0.0.5:6379/2`.
    /// Required. Never logged with its password.
    pub redis: String,
    /// Gateways in the fleet (default 1). Only the `local` fallback uses it: each gateway then
    /// admits `ceil(limit / fleet_size)` per window.
    #[serde(default = "default_fleet_size")]
    pub fleet_size: u32,
    /// `local` (default), `allow` or `reject`: how to decide while Redis is unreachable.
    #[serde(default)]
    pub on_unavailable: Fallback,
    /// Largest lease, as a fraction of the window's limit (default 0.02; 0 < f <= 0.5). At most
    /// about 1.5 leases per gateway can be left unused when a window ends.
    #[serde(default = "default_lease_fraction")]
    pub lease_fraction: f64,
    /// Longest a request waits for Redis (default `50ms`); then it decides by `on_unavailable`
    /// and the store counts as down.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Dur,
    /// Pause between reconnect attempts while Redis is down (default `1s`); also how long an
    /// idle connection goes unprobed.
    #[serde(default = "default_reconnect_interval")]
    pub reconnect_interval: Dur,
    /// Prefix of the Redis keys (default `tollgate:quota:`); the key of a window is
    /// `{prefix}{key}:{window_secs}:{window_index}`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_fleet_size() -> u32 {
    1
}
fn default_lease_fraction() -> f64 {
    0.02
}
fn default_command_timeout() -> Dur {
    Dur(Duration::from_millis(50))
}
fn default_reconnect_interval() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_key_prefix() -> String {
    "tollgate:quota:".to_string()
}

impl ClusterSettings {
    /// All errors of these settings, located under `path` (e.g. `cluster`).
    pub fn validate(&self, path: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if let Err(e) = redis::Client::open(self.redis.as_str()) {
            // The client's reason ("Redis URL did not parse - InvalidClientConfig") names the
            // problem without echoing the URL, which may hold a password.
            let text = e.to_string();
            let reason = text.split(" - ").next().unwrap_or("did not parse");
            bad(
                "redis",
                format!(
                    "invalid Redis URL: {reason}; expected redis://[:PASSWORD@]HOST:PORT/DB \
                     or unix:///PATH"
                ),
            );
        }
        if self.fleet_size == 0 {
            bad("fleet_size", "must be at least 1".to_string());
        }
        if !(self.lease_fraction > 0.0 && self.lease_fraction <= 0.5) {
            bad(
                "lease_fraction",
                format!(
                    "must be above 0 and at most 0.5, got {}",
                    self.lease_fraction
                ),
            );
        }
        let t = self.command_timeout.get();
        if t < Duration::from_millis(1) || t > Duration::from_secs(10) {
            bad("command_timeout", "must be between 1ms and 10s".to_string());
        }
        let r = self.reconnect_interval.get();
        if r < Duration::from_millis(10) || r > Duration::from_secs(600) {
            bad(
                "reconnect_interval",
                "must be between 10ms and 10m".to_string(),
            );
        }
        if self.key_prefix.len() > 256 {
            bad("key_prefix", "must be at most 256 bytes".to_string());
        }
        errors
    }
}

// ---------------------------------------------------------------------------------------------
// Public types

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Over quota (or Redis down with `on_unavailable: reject`); try again after `retry_after`.
    Reject {
        retry_after: Duration,
    },
}

/// Counters for metrics; monotonic except `up` and `entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterStats {
    /// Configured and Redis answering.
    pub up: bool,
    /// Commands sent to Redis: lease scripts and connection probes.
    pub round_trips: u64,
    /// Of those, the ones that failed or timed out.
    pub errors: u64,
    /// Requests decided by `on_unavailable` (Redis down, or no lease within `command_timeout`).
    pub fallback_decisions: u64,
    /// Times Redis went from reachable (or never tried) to unreachable.
    pub outages: u64,
    /// (key, window) entries held locally.
    pub entries: u64,
}

// ---------------------------------------------------------------------------------------------
// Time and packing

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Windows are whole seconds, at least one.
fn window_secs(window: Duration) -> u64 {
    window.as_secs().max(1)
}

/// Time from `now` to the end of window `w`, at least 1 ms.
fn until_end(now: u64, w: u64, win_ms: u64) -> Duration {
    Duration::from_millis(((w + 1) * win_ms).saturating_sub(now).max(1))
}

/// A window index (low 32 bits) and a count (32 bits) in one word, so a request can check the
/// window and take a token in one compare-and-swap. Windows are compared by wrapping distance,
/// which holds because an entry only ever sees windows close to each other.
fn pack(w: u64, n: u64) -> u64 {
    ((w & 0xffff_ffff) << 32) | n.min(u64::from(u32::MAX))
}

fn unpack(v: u64) -> (u32, u64) {
    ((v >> 32) as u32, v & 0xffff_ffff)
}

/// Is window `a` (low bits) later than window `b`?
fn later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Local state of one (key, window length)

struct Entry {
    window_secs: u64,
    /// (window, tokens left) of the lease this gateway holds.
    lease: AtomicU64,
    /// (window, requests admitted here in it), for the `local` fallback.
    admitted: AtomicU64,
    /// (window, requests admitted here without a lease, Redis not told yet). Reported with the
    /// next lease of the same window, so that a window in which Redis comes back does not
    /// hand out the whole budget again on top of what the fallback admitted.
    unreported: AtomicU64,
    /// (window, limit) at which the fleet's budget ran out; 0 when not known.
    exhausted: AtomicU64,
    /// Latest window index a request touched; the sweep drops the entry once it ended.
    seen: AtomicU64,
    /// Unix second of the latest request; the sweep drops entries idle for [`IDLE_AFTER`].
    touched_s: AtomicU64,
    /// Size of the last lease asked for, adapted to local demand.
    chunk: AtomicU64,
    last_refill_ms: AtomicU64,
    prefetching: AtomicBool,
    /// Requests waiting for a refill; the refill asks for at least this many tokens.
    waiting: AtomicU32,
    /// Held while a refill is in flight, so one Redis call serves all the waiters.
    refill: tokio::sync::Mutex<()>,
}

impl Entry {
    fn new(window_secs: u64, w: u64, now: u64) -> Self {
        Entry {
            window_secs,
            lease: AtomicU64::new(pack(w, 0)),
            admitted: AtomicU64::new(pack(w, 0)),
            unreported: AtomicU64::new(pack(w, 0)),
            exhausted: AtomicU64::new(0),
            seen: AtomicU64::new(w),
            touched_s: AtomicU64::new(now / 1000),
            chunk: AtomicU64::new(1),
            last_refill_ms: AtomicU64::new(now),
            prefetching: AtomicBool::new(false),
            waiting: AtomicU32::new(0),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    /// Notes a request in window `w` at `now`: written only when the window or the second
    /// changed, so concurrent requests mostly just read.
    fn touch(&self, w: u64, now: u64) {
        if self.seen.load(Ordering::Relaxed) < w {
            self.seen.fetch_max(w, Ordering::Relaxed);
        }
        let second = now / 1000;
        if self.touched_s.load(Ordering::Relaxed) < second {
            self.touched_s.store(second, Ordering::Relaxed);
        }
    }

    /// Takes one token of window `w`'s lease; returns the tokens left.
    fn take(&self, w: u64) -> Option<u64> {
        self.lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (lw, n) = unpack(v);
                (lw == w as u32 && n > 0).then(|| v - 1)
            })
            .ok()
            .map(|prev| unpack(prev).1 - 1)
    }

    fn left(&self, w: u64) -> u64 {
        let (lw, n) = unpack(self.lease.load(Ordering::Acquire));
        if lw == w as u32 {
            n
        } else {
            0
        }
    }

    /// Adds a grant for window `w`; a grant for a window older than the lease's is dropped.
    fn add(&self, w: u64, grant: u64) {
        let _ = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (lw, n) = unpack(v);
                if lw == w as u32 {
                    Some(pack(w, n.saturating_add(grant)))
                } else if later(w as u32, lw) {
                    Some(pack(w, grant))
                } else {
                    None
                }
            });
    }

    fn is_exhausted(&self, w: u64, limit: u64) -> bool {
        let v = self.exhausted.load(Ordering::Acquire);
        let (ew, at) = unpack(v);
        v != 0 && ew == w as u32 && limit.min(u64::from(u32::MAX)) <= at
    }

    fn set_exhausted(&self, w: u64, limit: u64) {
        let new = pack(w, limit.max(1));
        let _ = self
            .exhausted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v == 0 || !later(unpack(v).0, w as u32)).then_some(new)
            });
    }

    /// Notes `n` admissions in window `w` made without a lease (or takes them back, negative).
    fn note_unreported(&self, w: u64, n: i64) {
        let _ = self
            .unreported
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (lw, c) = unpack(v);
                if lw == w as u32 {
                    Some(pack(w, c.saturating_add_signed(n)))
                } else if later(w as u32, lw) {
                    Some(pack(w, n.max(0) as u64))
                } else {
                    None
                }
            });
    }

    /// Takes the count of window `w`'s unreported admissions (to report them to Redis).
    fn take_unreported(&self, w: u64) -> u64 {
        let prev = self.unreported.swap(pack(w, 0), Ordering::AcqRel);
        let (lw, c) = unpack(prev);
        if lw == w as u32 {
            c
        } else {
            0
        }
    }

    /// Counts one admission in window `w`, if fewer than `cap` were admitted in it.
    fn admit_local(&self, w: u64, cap: u64) -> bool {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (lw, n) = unpack(v);
                if lw == w as u32 {
                    (n < cap).then(|| pack(w, n + 1))
                } else if later(w as u32, lw) {
                    (cap > 0).then(|| pack(w, 1))
                } else {
                    None
                }
            })
            .is_ok()
    }

    /// The size of the next lease (caller holds `refill`): doubled when the last one went fast,
    /// halved when it went slowly, within `1..=cap`. The pause between the end of one window's
    /// demand (its budget ran out, say) and the next window is not slowness: across a window
    /// boundary the size is kept, unless a whole window went by without a refill.
    fn next_chunk(&self, cap: u64, now: u64, life_ms: u64) -> u64 {
        let last = self.last_refill_ms.swap(now, Ordering::Relaxed);
        let gap = now.saturating_sub(last);
        let win_ms = self.window_secs * 1000;
        let same_window = last / win_ms == now / win_ms;
        let cur = self.chunk.load(Ordering::Relaxed).clamp(1, cap);
        let next = if gap * 2 < life_ms {
            cur.saturating_mul(2).min(cap)
        } else if gap > life_ms * 2 && (same_window || gap > win_ms) {
            (cur / 2).max(1)
        } else {
            cur
        };
        self.chunk.store(next, Ordering::Relaxed);
        next
    }
}

/// Decrements `Entry::waiting` when a waiter leaves, however it leaves.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The connection to Redis

const CONNECTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// One Redis URL: its client, current connection and reachability. Replaced only when the
/// configured URL changes.
struct Link {
    /// `None` when the URL does not parse (validation should have refused it): always down.
    client: Option<redis::Client>,
    /// `host:port` (or socket path), for logs: never the URL, which may hold a password.
    addr: String,
    /// The live connection and its generation; a failure on an older one changes nothing.
    conn: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    state: AtomicU8,
    /// Woken when `state` changes, for requests waiting on the first connect.
    settled: Notify,
    /// An outage was logged and its recovery not yet.
    down_logged: AtomicBool,
    down_since: Mutex<Option<Instant>>,
    last_attempt: Mutex<Option<Instant>>,
    last_ok_ms: AtomicU64,
}

impl Link {
    fn new(url: &str) -> Self {
        let (client, addr) = match redis::Client::open(url) {
            Ok(c) => {
                let addr = c.get_connection_info().addr().to_string();
                (Some(c), addr)
            }
            Err(e) => {
                tracing::error!(error = %e, "cluster quota: invalid Redis URL; every decision falls back to on_unavailable");
                (None, "(invalid URL)".to_string())
            }
        };
        Link {
            state: AtomicU8::new(if client.is_some() { CONNECTING } else { DOWN }),
            client,
            addr,
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
            settled: Notify::new(),
            down_logged: AtomicBool::new(false),
            down_since: Mutex::new(None),
            last_attempt: Mutex::new(None),
            last_ok_ms: AtomicU64::new(0),
        }
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    fn connection(&self) -> Option<(u64, MultiplexedConnection)> {
        lock(&self.conn).clone()
    }
}

/// Entries by key, then by window length (a key has one per limit it is checked against).
type Shard = HashMap<Box<str>, Vec<Arc<Entry>>>;

/// What the store runs with between two reloads.
struct Active {
    settings: ClusterSettings,
    link: Arc<Link>,
}

#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
    errors: AtomicU64,
    fallback: AtomicU64,
    outages: AtomicU64,
}

/// Why a refill gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum RefillError {
    #[error("Redis is down")]
    Down,
    #[error("no answer within command_timeout")]
    Timeout,
}

// ---------------------------------------------------------------------------------------------
// The store

/// Cluster-wide counters for the whole process: the Redis link and the local leases. Lives as
/// long as the process (an `Arc` in the gateway); [`ClusterStore::configure`] re-attaches it on
/// every reload, and leases survive reloads.
pub struct ClusterStore {
    me: Weak<ClusterStore>,
    active: ArcSwapOption<Active>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    entries: AtomicUsize,
    script: redis::Script,
    /// Wakes the background task: new link, or a failure to reconnect after.
    wake: Arc<Notify>,
    maintainer: AtomicBool,
    counters: Counters,
}

impl ClusterStore {
    /// A store with no settings: until configured, [`ClusterStore::acquire`] counts exactly on
    /// this gateway alone, as if it were the whole fleet.
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| ClusterStore {
            me: me.clone(),
            active: ArcSwapOption::empty(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            entries: AtomicUsize::new(0),
            script: redis::Script::new(LEASE_SCRIPT),
            wake: Arc::new(Notify::new()),
            maintainer: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    /// Applies the settings of a (re)load; `None` turns cluster counting off (local counting
    /// as a lone gateway). Keeps the connection unless `redis` changed. Never blocks, and may be
    /// called from any thread: connecting happens on the store's own thread, at once.
    pub fn configure(&self, settings: Option<&ClusterSettings>) {
        let Some(settings) = settings else {
            self.active.store(None);
            return;
        };
        let link = match self.active.load_full() {
            Some(a) if a.settings.redis == settings.redis => a.link.clone(),
            _ => Arc::new(Link::new(&settings.redis)),
        };
        self.active.store(Some(Arc::new(Active {
            settings: settings.clone(),
            link,
        })));
        self.wake.notify_one();
        self.ensure_maintainer();
    }

    /// Records a one-time value (an HMAC request's nonce) fleet-wide for `ttl`: `Some(true)`
    /// the first time the fleet sees `key`, `Some(false)` when it was seen before, `None` when
    /// there is no answer (not configured, Redis down or slow: the caller's local check stands).
    /// One round trip, at most `command_timeout`.
    pub async fn first_seen(&self, key: &str, ttl: Duration) -> Option<bool> {
        let active = self.active.load_full()?;
        if active.link.state() != UP {
            return None;
        }
        let (generation, mut conn) = active.link.connection()?;
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}once:{key}", active.settings.key_prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let call = cmd.query_async::<Option<String>>(&mut conn);
        match timeout(active.settings.command_timeout.get(), call).await {
            Ok(Ok(set)) => Some(set.is_some()),
            Ok(Err(e)) => {
                self.mark_down(&active, generation, &e);
                None
            }
            Err(_) => None,
        }
    }

    /// Configured, and Redis answered the last time it was asked.
    pub fn up(&self) -> bool {
        self.active
            .load()
            .as_ref()
            .is_some_and(|a| a.link.state() == UP)
    }

    pub fn stats(&self) -> ClusterStats {
        let c = &self.counters;
        ClusterStats {
            up: self.up(),
            round_trips: c.round_trips.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            fallback_decisions: c.fallback.load(Ordering::Relaxed),
            outages: c.outages.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed) as u64,
        }
    }

    /// One request against `limit` per `window` (whole seconds: 1 s, 60 s, 3600 s, 86400 s)
    /// for `key` (e.g. the tenant) across the fleet. Called once per request by the quota
    /// policy, for each cluster-counted limit of the tenant's plan. Returns at once when the
    /// local lease has a token or the window's budget is known to be gone; otherwise waits for
    /// one refill, at most `command_timeout`. Never fails: Redis trouble is decided by
    /// `on_unavailable`. Must be polled inside a tokio runtime.
    pub async fn acquire(&self, key: &str, window: Duration, limit: u64) -> Decision {
        self.decide(key, window, limit, None).await.decision
    }

    /// One request against several limits of `key` (e.g. per second, minute, hour, day),
    /// checked in order. Stops at the first refusal and gives back what the earlier limits
    /// took, so a refused request spends no budget. Waits at most `command_timeout` in all.
    pub async fn acquire_all(&self, key: &str, limits: &[(Duration, u64)]) -> Decision {
        let mut taken = Vec::with_capacity(limits.len());
        let started = Instant::now();
        for &(window, limit) in limits {
            let outcome = self.decide(key, window, limit, Some(started)).await;
            if let Decision::Reject { .. } = outcome.decision {
                for t in &taken {
                    give_back(t);
                }
                return outcome.decision;
            }
            taken.push(outcome);
        }
        Decision::Admit
    }

    /// [`ClusterStore::acquire`], also saying which window the request counted in and where
    /// its admission came from. Waits until `started + command_timeout` at most (`started`
    /// defaults to when it first has to wait).
    async fn decide(
        &self,
        key: &str,
        window: Duration,
        limit: u64,
        started: Option<Instant>,
    ) -> Outcome {
        let win_secs = window_secs(window);
        let win_ms = win_secs * 1000;
        let now = now_ms();
        let w = now / win_ms;
        if limit == 0 {
            let decision = Decision::Reject {
                retry_after: until_end(now, w, win_ms),
            };
            return Outcome {
                decision,
                window: w,
                entry: None,
                lease: false,
            };
        }
        let entry = self.entry(key, win_secs, w, now);
        entry.touch(w, now);
        // Also sweeps the entries of an unconfigured store.
        self.ensure_maintainer();
        let active = {
            let guard = self.active.load();
            let Some(active) = guard.as_ref() else {
                let decision = local(&entry, w, limit, now, win_ms);
                return Outcome::new(decision, w, entry, false);
            };
            // Fast path: a token from the lease, or a known-exhausted window. No await.
            if let Some(d) = self.decide_locally(active, &entry, key, w, limit, now, win_ms) {
                return Outcome::new(d, w, entry, true);
            }
            Arc::clone(active)
        };
        let deadline = started.unwrap_or_else(Instant::now) + active.settings.command_timeout.get();
        let mut failed = None;
        for round in 0..MAX_ROUNDS {
            if round > 0 {
                let now = now_ms();
                let w = now / win_ms;
                entry.touch(w, now);
                if let Some(d) = self.decide_locally(&active, &entry, key, w, limit, now, win_ms) {
                    return Outcome::new(d, w, entry, true);
                }
            }
            let link = &active.link;
            match link.state() {
                UP => {}
                CONNECTING => {
                    let settled = link.settled.notified();
                    tokio::pin!(settled);
                    settled.as_mut().enable();
                    if link.state() == CONNECTING && timeout_at(deadline, settled).await.is_err() {
                        failed = Some(RefillError::Timeout);
                        break;
                    }
                    continue;
                }
                _ => {
                    failed = Some(RefillError::Down);
                    break;
                }
            }
            let w = now_ms() / win_ms;
            if let Err(e) = self.refill(&active, &entry, key, w, limit, deadline).await {
                failed = Some(e);
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let now = now_ms();
        let w = now / win_ms;
        if failed.is_none() {
            // The last refill may have brought tokens in after the last look.
            if let Some(d) = self.decide_locally(&active, &entry, key, w, limit, now, win_ms) {
                return Outcome::new(d, w, entry, true);
            }
        }
        let decision = self.fallback(&active.settings, &entry, w, limit, now, win_ms);
        Outcome::new(decision, w, entry, false)
    }

    /// Decides from local knowledge alone, if it can: a token of the lease (admit; perhaps
    /// prefetch the next lease) or a window whose budget is gone (reject).
    #[allow(clippy::too_many_arguments)]
    fn decide_locally(
        &self,
        active: &Arc<Active>,
        entry: &Arc<Entry>,
        key: &str,
        w: u64,
        limit: u64,
        now: u64,
        win_ms: u64,
    ) -> Option<Decision> {
        if let Some(left) = entry.take(w) {
            entry.admit_local(w, u64::MAX);
            if left * 2 < entry.chunk.load(Ordering::Relaxed).max(1)
                && !entry.is_exhausted(w, limit)
                && active.link.state() == UP
            {
                self.prefetch(entry, key, w, limit);
            }
            return Some(Decision::Admit);
        }
        entry.is_exhausted(w, limit).then(|| Decision::Reject {
            retry_after: until_end(now, w, win_ms),
        })
    }

    /// Waits (until `deadline`) for one refill of `entry` for window `w`, doing it if no one
    /// else is. Ok when the lease got tokens or the window turned out exhausted.
    async fn refill(
        &self,
        active: &Active,
        entry: &Entry,
        key: &str,
        w: u64,
        limit: u64,
        deadline: Instant,
    ) -> Result<(), RefillError> {
        entry.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&entry.waiting);
        let _held = timeout_at(deadline, entry.refill.lock())
            .await
            .map_err(|_| RefillError::Timeout)?;
        if entry.left(w) > 0 || entry.is_exhausted(w, limit) {
            return Ok(());
        }
        let want = u64::from(waiting.0.load(Ordering::Relaxed));
        drop(waiting);
        self.lease(active, entry, key, w, limit, want, deadline)
            .await
    }

    /// Asks Redis for a lease (caller holds `entry.refill`) and records the answer.
    #[allow(clippy::too_many_arguments)]
    async fn lease(
        &self,
        active: &Active,
        entry: &Entry,
        key: &str,
        w: u64,
        limit: u64,
        waiters: u64,
        deadline: Instant,
    ) -> Result<(), RefillError> {
        let s = &active.settings;
        let link = &active.link;
        let Some((generation, mut conn)) = link.connection() else {
            return Err(RefillError::Down);
        };
        let win_ms = entry.window_secs * 1000;
        let now = now_ms();
        let cap = lease_cap(limit, s.lease_fraction);
        let life_ms = (win_ms / 4).min(LEASE_LIFE.as_millis() as u64).max(1);
        let want = entry.next_chunk(cap, now, life_ms).max(waiters).min(limit);
        let redis_key = format!("{}{key}:{}:{w}", s.key_prefix, entry.window_secs);
        let expire_ms = (w + 1) * win_ms - now.min((w + 1) * win_ms) + KEY_SLACK.as_millis() as u64;
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        let report = entry.take_unreported(w);
        let mut invocation = self.script.key(&redis_key);
        invocation.arg(want).arg(limit).arg(expire_ms).arg(report);
        let call = invocation.invoke_async::<(u64, u64)>(&mut conn);
        let answer = timeout_at(deadline, call).await;
        if !matches!(answer, Ok(Ok(_))) {
            // Not known to have arrived: report it with the next lease (at worst twice, which
            // only makes the window stricter).
            entry.note_unreported(w, report as i64);
        }
        match answer {
            Ok(Ok((grant, total))) => {
                link.last_ok_ms.store(now_ms(), Ordering::Relaxed);
                entry.add(w, grant);
                if total >= limit {
                    entry.set_exhausted(w, limit);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.mark_down(active, generation, &e);
                Err(RefillError::Down)
            }
            Err(_) => {
                let why = format!(
                    "no answer within {}",
                    humantime::format_duration(s.command_timeout.get())
                );
                self.mark_down(active, generation, &why);
                Err(RefillError::Timeout)
            }
        }
    }

    /// Fetches the next lease in the background when half of this one is used.
    fn prefetch(&self, entry: &Arc<Entry>, key: &str, w: u64, limit: u64) {
        if entry.prefetching.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(me), Ok(rt)) = (self.me.upgrade(), tokio::runtime::Handle::try_current()) else {
            entry.prefetching.store(false, Ordering::Release);
            return;
        };
        let entry = entry.clone();
        let key = key.to_owned();
        rt.spawn(async move {
            if let Some(active) = me.active.load_full() {
                let deadline = Instant::now() + active.settings.command_timeout.get();
                if let Ok(_held) = timeout_at(deadline, entry.refill.lock()).await {
                    let chunk = entry.chunk.load(Ordering::Relaxed).max(1);
                    if entry.left(w) * 2 < chunk
                        && !entry.is_exhausted(w, limit)
                        && active.link.state() == UP
                        && now_ms() / (entry.window_secs * 1000) == w
                    {
                        let _ = me.lease(&active, &entry, &key, w, limit, 0, deadline).await;
                    }
                }
            }
            entry.prefetching.store(false, Ordering::Release);
        });
    }

    /// Decides by `on_unavailable`.
    fn fallback(
        &self,
        s: &ClusterSettings,
        entry: &Entry,
        w: u64,
        limit: u64,
        now: u64,
        win_ms: u64,
    ) -> Decision {
        self.counters.fallback.fetch_add(1, Ordering::Relaxed);
        match s.on_unavailable {
            Fallback::Local => {
                let cap = limit.div_ceil(u64::from(s.fleet_size.max(1)));
                let decision = local(entry, w, cap, now, win_ms);
                if decision == Decision::Admit {
                    entry.note_unreported(w, 1);
                }
                decision
            }
            Fallback::Allow => {
                entry.admit_local(w, u64::MAX);
                entry.note_unreported(w, 1);
                Decision::Admit
            }
            Fallback::Reject => Decision::Reject {
                retry_after: s.reconnect_interval.get(),
            },
        }
    }

    /// The entry of (`key`, `win_secs`), created for window `w` if missing.
    fn entry(&self, key: &str, win_secs: u64, w: u64, now: u64) -> Arc<Entry> {
        let shard = &self.shards[(self.hasher.hash_one(key) % SHARDS as u64) as usize];
        let mut map = lock(shard);
        if let Some(e) = map
            .get(key)
            .and_then(|list| list.iter().find(|e| e.window_secs == win_secs))
        {
            return e.clone();
        }
        let e = Arc::new(Entry::new(win_secs, w, now));
        map.entry(key.into()).or_default().push(e.clone());
        self.entries.fetch_add(1, Ordering::Relaxed);
        e
    }

    /// Drops the entries whose last window ended, or idle for [`IDLE_AFTER`], that no request
    /// or refill holds. Locks one shard at a time.
    /// Yields between shards: the background runtime also carries the Redis connection, whose
    /// answers requests are waiting for.
    async fn sweep(&self) {
        let now = now_ms();
        for shard in 0..SHARDS {
            self.sweep_shard(shard, now);
            tokio::task::yield_now().await;
        }
    }

    #[cfg(test)]
    fn sweep_at(&self, now: u64) {
        for shard in 0..SHARDS {
            self.sweep_shard(shard, now);
        }
    }

    fn sweep_shard(&self, shard: usize, now: u64) {
        let mut map = lock(&self.shards[shard]);
        let mut dropped = 0;
        map.retain(|_, list| {
            list.retain(|e| {
                let ended = e.seen.load(Ordering::Relaxed) < now / (e.window_secs * 1000)
                    || e.touched_s.load(Ordering::Relaxed) + IDLE_AFTER.as_secs() < now / 1000;
                // Requests clone an entry only under this lock: count 1 means only the map.
                let keep = !ended || Arc::strong_count(e) > 1;
                dropped += usize::from(!keep);
                keep
            });
            !list.is_empty()
        });
        self.entries.fetch_sub(dropped, Ordering::Relaxed);
    }

    // -- Link health ------------------------------------------------------------------------

    /// Records a failed command or connect on connection `generation` of the active link.
    fn mark_down(&self, active: &Active, generation: u64, why: &dyn fmt::Display) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let link = &active.link;
        {
            let mut conn = lock(&link.conn);
            if conn.as_ref().is_some_and(|(g, _)| *g != generation) {
                return; // a newer connection is already in place
            }
            *conn = None;
        }
        link.state.store(DOWN, Ordering::Release);
        link.settled.notify_waiters();
        if !link.down_logged.swap(true, Ordering::AcqRel) {
            *lock(&link.down_since) = Some(Instant::now());
            self.counters.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                redis = %link.addr,
                error = %why,
                on_unavailable = %active.settings.on_unavailable,
                "cluster quota store unreachable; deciding by on_unavailable until it is back"
            );
        }
        self.wake.notify_one();
    }

    /// Connects (TCP, handshake, a probe of the lease script) in the background.
    async fn connect(&self, active: &Active) {
        let link = &active.link;
        let Some(client) = &link.client else { return };
        *lock(&link.last_attempt) = Some(Instant::now());
        let limit = CONNECT_TIMEOUT.max(active.settings.command_timeout.get());
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(limit))
            .set_response_timeout(None);
        let attempt = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.probe(&active.settings, &mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let generation = link.generation.load(Ordering::Acquire);
        match timeout(limit, attempt).await {
            Ok(Ok(conn)) => {
                let generation = link.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *lock(&link.conn) = Some((generation, conn));
                link.last_ok_ms.store(now_ms(), Ordering::Relaxed);
                link.state.store(UP, Ordering::Release);
                link.settled.notify_waiters();
                if link.down_logged.swap(false, Ordering::AcqRel) {
                    let since = lock(&link.down_since).take();
                    let outage = since.map(|t| {
                        humantime::format_duration(Duration::from_millis(
                            t.elapsed().as_millis() as u64
                        ))
                        .to_string()
                    });
                    tracing::info!(
                        redis = %link.addr,
                        outage = outage.as_deref().unwrap_or("?"),
                        "cluster quota store reachable again"
                    );
                } else {
                    tracing::info!(redis = %link.addr, "cluster quota store connected");
                }
            }
            Ok(Err(e)) => self.mark_down(active, generation, &e),
            Err(_) => self.mark_down(active, generation, &"connect timed out"),
        }
    }

    /// Runs the lease script on a probe key: proves the server answers and accepts writes,
    /// and loads the script so requests' EVALSHA finds it.
    async fn probe(
        &self,
        s: &ClusterSettings,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        let probe_key = format!("{}probe", s.key_prefix);
        self.script
            .key(probe_key)
            .arg(1)
            .arg(u32::MAX)
            .arg(60_000)
            .invoke_async::<(u64, u64)>(conn)
            .await
            .map(drop)
    }

    /// One tick of the background task: reconnect when due, probe an idle connection.
    async fn tend(&self) {
        let Some(active) = self.active.load_full() else {
            return;
        };
        let link = &active.link;
        let interval = active.settings.reconnect_interval.get();
        match link.state() {
            UP => {
                let idle = now_ms().saturating_sub(link.last_ok_ms.load(Ordering::Relaxed));
                if idle >= interval.as_millis() as u64 {
                    let Some((generation, mut conn)) = link.connection() else {
                        return;
                    };
                    let limit = active.settings.command_timeout.get();
                    match timeout(limit, self.probe(&active.settings, &mut conn)).await {
                        Ok(Ok(())) => link.last_ok_ms.store(now_ms(), Ordering::Relaxed),
                        Ok(Err(e)) => self.mark_down(&active, generation, &e),
                        Err(_) => self.mark_down(&active, generation, &"probe timed out"),
                    }
                }
            }
            _ => {
                let due = lock(&link.last_attempt).is_none_or(|t| t.elapsed() >= interval);
                if due {
                    self.connect(&active).await;
                }
            }
        }
    }

    /// Starts the background thread (sweep, reconnect, probe, Redis I/O) unless it runs. If
    /// it cannot start, the next call tries again.
    fn ensure_maintainer(&self) {
        if self.maintainer.load(Ordering::Relaxed) || self.maintainer.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, wake) = (self.me.clone(), self.wake.clone());
        let started = std::thread::Builder::new()
            .name("tollgate-quota".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(maintain(me, wake)),
                    Err(e) => {
                        tracing::error!(error = %e, "cluster quota: cannot start its runtime");
                        if let Some(store) = me.upgrade() {
                            store.maintainer.store(false, Ordering::Release);
                        }
                    }
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cluster quota: cannot start its thread");
            self.maintainer.store(false, Ordering::Release);
        }
    }
}

/// What [`ClusterStore::decide`] did, so an admission can be given back.
struct Outcome {
    decision: Decision,
    /// Index of the window the request counted in.
    window: u64,
    entry: Option<Arc<Entry>>,
    /// The admission took a lease token (else it was only counted locally).
    lease: bool,
}

impl Outcome {
    fn new(decision: Decision, window: u64, entry: Arc<Entry>, lease: bool) -> Self {
        Outcome {
            decision,
            window,
            entry: Some(entry),
            lease,
        }
    }
}

/// Undoes an admission: the token goes back to the lease it came from (the fleet still counts
/// it as handed to this gateway), and the local count drops by one.
fn give_back(o: &Outcome) {
    let (Decision::Admit, Some(entry)) = (o.decision, &o.entry) else {
        return;
    };
    let w = o.window as u32;
    if !o.lease {
        entry.note_unreported(o.window, -1);
    }
    if o.lease {
        let _ = entry
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (lw, n) = unpack(v);
                (lw == w && n < u64::from(u32::MAX)).then(|| v + 1)
            });
    }
    let _ = entry
        .admitted
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (lw, n) = unpack(v);
            (lw == w && n > 0).then(|| v - 1)
        });
}

/// Exact local counting: `cap` per window on this gateway.
fn local(entry: &Entry, w: u64, cap: u64, now: u64, win_ms: u64) -> Decision {
    if entry.admit_local(w, cap) {
        Decision::Admit
    } else {
        Decision::Reject {
            retry_after: until_end(now, w, win_ms),
        }
    }
}

/// The largest lease for `limit`: `max(1, limit * fraction)`.
fn lease_cap(limit: u64, fraction: f64) -> u64 {
    ((limit as f64 * fraction) as u64).clamp(1, u64::from(u32::MAX) / 2)
}

/// The background task of a store: every tick (a quarter of `reconnect_interval`, 5..250 ms)
/// reconnects or probes when due, and every [`SWEEP_EVERY`] sweeps ended entries. Holds the
/// store only while working, and ends when the store is dropped.
async fn maintain(me: Weak<ClusterStore>, wake: Arc<Notify>) {
    /// Lets the next call start a new thread should this one end early (a panic).
    struct Alive(Weak<ClusterStore>);
    impl Drop for Alive {
        fn drop(&mut self) {
            if let Some(store) = self.0.upgrade() {
                store.maintainer.store(false, Ordering::Release);
            }
        }
    }
    let _alive = Alive(me.clone());
    let mut last_sweep = Instant::now();
    loop {
        let tick = {
            let Some(store) = me.upgrade() else { return };
            if last_sweep.elapsed() >= SWEEP_EVERY {
                store.sweep().await;
                last_sweep = Instant::now();
            }
            store.tend().await;
            store
                .active
                .load()
                .as_ref()
                .map_or(Duration::from_millis(250), |a| {
                    a.settings.reconnect_interval.get() / 4
                })
                .clamp(Duration::from_millis(5), Duration::from_millis(250))
        };
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use tokio::task::JoinSet;

    /// A private redis-server on a loopback port, killed on drop.
    struct RedisServer {
        child: Option<Child>,
        port: u16,
    }

    impl RedisServer {
        fn start(port: u16) -> Self {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let server = RedisServer {
                child: Some(child),
                port,
            };
            for _ in 0..300 {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("redis-server did not listen on {port} within 3 s");
        }

        fn free_port() -> u16 {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            l.local_addr().expect("bound").port()
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// Sends `-STOP` or `-CONT`: a hung server (accepts, never answers), and back.
        fn signal(&self, sig: &str) {
            let pid = self.child.as_ref().expect("running").id().to_string();
            let ok = Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill runs");
            assert!(ok.success(), "kill {sig} {pid}");
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn settings(url: &str, prefix: &str, command_timeout: Duration) -> ClusterSettings {
        ClusterSettings {
            redis: url.to_string(),
            fleet_size: 2,
            on_unavailable: Fallback::Local,
            lease_fraction: 0.02,
            command_timeout: Dur(command_timeout),
            reconnect_interval: Dur(Duration::from_secs(1)),
            key_prefix: format!("test:{prefix}:{}:", now_ms()),
        }
    }

    /// Waits (at most `within`) until every store is up; returns how long it took.
    async fn wait_up(stores: &[&Arc<ClusterStore>], within: Duration) -> Duration {
        let start = Instant::now();
        for _ in 0..1000 {
            if stores.iter().all(|s| s.up()) {
                return start.elapsed();
            }
            if start.elapsed() > within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("stores not up within {within:?}");
    }

    /// One request as the test saw it.
    struct Record {
        store: usize,
        window: u64,
        admitted: bool,
        took: Duration,
    }

    /// Offers requests for `key` from `tasks` tasks per store, each pausing `every` between
    /// requests, for `duration`.
    async fn offer(
        stores: &[Arc<ClusterStore>],
        key: &'static str,
        window: Duration,
        limit: u64,
        tasks: usize,
        every: Duration,
        duration: Duration,
    ) -> Vec<Record> {
        let end = Instant::now() + duration;
        let mut set = JoinSet::new();
        for (i, store) in stores.iter().enumerate() {
            for _ in 0..tasks {
                let store = store.clone();
                set.spawn(async move {
                    let mut seen = Vec::new();
                    for _ in 0..100_000 {
                        if Instant::now() >= end {
                            break;
                        }
                        let start = Instant::now();
                        let o = store.decide(key, window, limit, None).await;
                        seen.push(Record {
                            store: i,
                            window: o.window,
                            admitted: o.decision == Decision::Admit,
                            took: start.elapsed(),
                        });
                        tokio::time::sleep(every).await;
                    }
                    seen
                });
            }
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.extend(r.expect("no task panics"));
        }
        all
    }

    /// (offered, admitted) per window, for the windows strictly inside the run (full ones).
    fn per_window(records: &[Record], store: Option<usize>) -> BTreeMap<u64, (u64, u64)> {
        let mut m = BTreeMap::<u64, (u64, u64)>::new();
        for r in records
            .iter()
            .filter(|r| store.is_none_or(|s| s == r.store))
        {
            let e = m.entry(r.window).or_default();
            e.0 += 1;
            e.1 += u64::from(r.admitted);
        }
        let (first, last) = (m.keys().next().copied(), m.keys().next_back().copied());
        m.retain(|w, _| Some(*w) != first && Some(*w) != last);
        m
    }

    fn sum(stores: &[&Arc<ClusterStore>], f: impl Fn(ClusterStats) -> u64) -> u64 {
        stores.iter().map(|s| f(s.stats())).sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_share_a_per_second_budget() {
        let redis = RedisServer::start(RedisServer::free_port());
        // Generous timeout: the test shares two cores with builds; a timeout would turn into
        // fallback decisions, which the test asserts did not happen.
        let s = settings(&redis.url(), "share", Duration::from_millis(250));
        let (a, b) = (ClusterStore::new(), ClusterStore::new());
        a.configure(Some(&s));
        b.configure(Some(&s));
        wait_up(&[&a, &b], Duration::from_secs(3)).await;

        const LIMIT: u64 = 200;
        // 8 tasks, one request per ~13 ms each: ~600/s offered, 3x the limit.
        let records = offer(
            &[a.clone(), b.clone()],
            "acme",
            Duration::from_secs(1),
            LIMIT,
            4,
            Duration::from_millis(13),
            Duration::from_millis(3600),
        )
        .await;
        let windows = per_window(&records, None);
        assert!(windows.len() >= 2, "full windows measured: {windows:?}");
        for (w, (offered, admitted)) in &windows {
            eprintln!("window {w}: offered {offered}, admitted {admitted} of {LIMIT}");
            assert!(
                *offered >= 2 * LIMIT,
                "load too low to test the limit: {offered}"
            );
            assert!(
                *admitted <= LIMIT,
                "window {w} admitted {admitted} > {LIMIT}"
            );
            assert!(
                *admitted >= LIMIT * 95 / 100,
                "window {w} admitted only {admitted}"
            );
        }
        let stores = [&a, &b];
        let trips = sum(&stores, |s| s.round_trips);
        let requests = records.len() as u64;
        eprintln!("round trips {trips} for {requests} requests");
        assert!(
            trips * 100 < requests * 15,
            "{trips} round trips for {requests} requests"
        );
        assert_eq!(sum(&stores, |s| s.errors), 0);
        assert_eq!(sum(&stores, |s| s.fallback_decisions), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn minute_window_is_exact_across_two_gateways() {
        // Keep the burst inside one minute.
        let into = now_ms() % 60_000;
        if into > 55_000 {
            tokio::time::sleep(Duration::from_millis(60_100 - into)).await;
        }
        let redis = RedisServer::start(RedisServer::free_port());
        let s = settings(&redis.url(), "minute", Duration::from_millis(250));
        let (a, b) = (ClusterStore::new(), ClusterStore::new());
        a.configure(Some(&s));
        b.configure(Some(&s));
        wait_up(&[&a, &b], Duration::from_secs(3)).await;

        const LIMIT: u64 = 30;
        let mut set = JoinSet::new();
        for store in [&a, &b] {
            for _ in 0..3 {
                let store = store.clone();
                set.spawn(async move {
                    let mut seen = Vec::new();
                    for _ in 0..20 {
                        seen.push(
                            store
                                .decide("globex", Duration::from_secs(60), LIMIT, None)
                                .await,
                        );
                    }
                    seen
                });
            }
        }
        let mut outcomes = Vec::new();
        while let Some(r) = set.join_next().await {
            outcomes.extend(r.expect("no task panics"));
        }
        let w = outcomes[0].window;
        assert!(outcomes.iter().all(|o| o.window == w), "one window");
        let admitted = outcomes
            .iter()
            .filter(|o| o.decision == Decision::Admit)
            .count();
        assert_eq!(
            admitted as u64, LIMIT,
            "exactly the limit across both gateways"
        );
        for o in &outcomes {
            if let Decision::Reject { retry_after } = o.decision {
                assert!(retry_after <= Duration::from_secs(60) && !retry_after.is_zero());
            }
        }
        // Redis holds exactly what was handed out.
        let client = redis::Client::open(redis.url()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let key = format!("{}globex:60:{w}", s.key_prefix);
        let held: Option<u64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(held, Some(LIMIT));
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(
            ttl > 0 && ttl <= 65_000,
            "expires after the window: {ttl} ms"
        );
        // Once exhausted, no more round trips for this window.
        let trips = a.stats().round_trips;
        for _ in 0..20 {
            assert!(matches!(
                a.acquire("globex", Duration::from_secs(60), LIMIT).await,
                Decision::Reject { .. }
            ));
        }
        assert_eq!(a.stats().round_trips, trips);
        assert_eq!(sum(&[&a, &b], |s| s.fallback_decisions), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquire_all_gives_lease_tokens_back() {
        let into = now_ms() % 60_000;
        if into > 55_000 {
            tokio::time::sleep(Duration::from_millis(60_100 - into)).await;
        }
        let redis = RedisServer::start(RedisServer::free_port());
        let s = settings(&redis.url(), "all", Duration::from_millis(250));
        let store = ClusterStore::new();
        store.configure(Some(&s));
        wait_up(&[&store], Duration::from_secs(3)).await;
        let (hour, minute) = (Duration::from_secs(3600), Duration::from_secs(60));
        let limits = [(hour, 4), (minute, 2)];
        assert_eq!(store.acquire_all("t", &limits).await, Decision::Admit);
        assert_eq!(store.acquire_all("t", &limits).await, Decision::Admit);
        let Decision::Reject { retry_after } = store.acquire_all("t", &limits).await else {
            panic!("the minute limit refuses the third");
        };
        assert!(retry_after <= minute);
        // The refused request's hour token went back to the lease: two left, not one.
        assert_eq!(store.acquire("t", hour, 4).await, Decision::Admit);
        assert_eq!(store.acquire("t", hour, 4).await, Decision::Admit);
        assert!(matches!(
            store.acquire("t", hour, 4).await,
            Decision::Reject { .. }
        ));
        assert_eq!(store.stats().fallback_decisions, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_falls_back_and_recovers() {
        let port = RedisServer::free_port();
        let mut redis = RedisServer::start(port);
        let timeout = Duration::from_millis(50);
        let s = settings(&redis.url(), "outage", timeout);
        let (a, b) = (ClusterStore::new(), ClusterStore::new());
        a.configure(Some(&s));
        b.configure(Some(&s));
        wait_up(&[&a, &b], Duration::from_secs(3)).await;
        let stores = [a.clone(), b.clone()];
        const LIMIT: u64 = 40; // per second; fleet_size 2: 20 each while Redis is down
        let second = Duration::from_secs(1);
        assert_eq!(a.acquire("k", second, LIMIT).await, Decision::Admit);
        assert_eq!(b.acquire("k", second, LIMIT).await, Decision::Admit);

        redis.kill();
        let records = offer(
            &stores,
            "k",
            second,
            LIMIT,
            1,
            Duration::from_millis(5),
            Duration::from_millis(3200),
        )
        .await;
        let slowest = records.iter().map(|r| r.took).max().expect("requests ran");
        eprintln!("slowest request while Redis was down: {slowest:?}");
        assert!(
            slowest <= timeout + Duration::from_millis(50),
            "{slowest:?}"
        );
        assert!(!a.up() && !b.up(), "down");
        for store in 0..2 {
            let windows = per_window(&records, Some(store));
            // The window of the kill may hold lease tokens; the later ones are pure fallback.
            let full: Vec<_> = windows.values().skip(1).collect();
            assert!(!full.is_empty(), "{windows:?}");
            for (offered, admitted) in full {
                assert!(*offered > 100, "load {offered}");
                assert_eq!(
                    *admitted,
                    LIMIT / 2,
                    "store {store}: ceil(limit / fleet_size)"
                );
            }
        }
        for st in &stores {
            let stats = st.stats();
            assert_eq!(stats.outages, 1, "one outage, logged once");
            assert!(stats.fallback_decisions > 0);
        }

        // The other fallbacks, switched by a reload (same URL: no reconnect).
        let allow = ClusterSettings {
            on_unavailable: Fallback::Allow,
            ..s.clone()
        };
        a.configure(Some(&allow));
        for _ in 0..100 {
            assert_eq!(a.acquire("k", second, LIMIT).await, Decision::Admit);
        }
        let reject = ClusterSettings {
            on_unavailable: Fallback::Reject,
            ..s.clone()
        };
        a.configure(Some(&reject));
        for _ in 0..10 {
            let d = a.acquire("k2", second, LIMIT).await;
            assert_eq!(
                d,
                Decision::Reject {
                    retry_after: s.reconnect_interval.get()
                }
            );
        }
        a.configure(Some(&s));

        let _redis = RedisServer::start(port);
        let took = wait_up(&[&a, &b], Duration::from_millis(2500)).await;
        eprintln!("up again {took:?} after the restart");
        assert_eq!(a.stats().outages, 1);

        let fallbacks = sum(&[&a, &b], |s| s.fallback_decisions);
        let records = offer(
            &stores,
            "k",
            second,
            LIMIT,
            1,
            Duration::from_millis(5),
            Duration::from_millis(2600),
        )
        .await;
        let windows = per_window(&records, None);
        assert!(!windows.is_empty());
        for (w, (_, admitted)) in windows {
            assert!(
                (LIMIT * 95 / 100..=LIMIT).contains(&admitted),
                "window {w}: shared counting again, admitted {admitted}"
            );
        }
        assert_eq!(sum(&[&a, &b], |s| s.fallback_decisions), fallbacks);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hung_redis_costs_at_most_command_timeout() {
        let redis = RedisServer::start(RedisServer::free_port());
        let timeout = Duration::from_millis(50);
        let s = ClusterSettings {
            on_unavailable: Fallback::Reject,
            ..settings(&redis.url(), "hung", timeout)
        };
        let store = ClusterStore::new();
        store.configure(Some(&s));
        wait_up(&[&store], Duration::from_secs(3)).await;

        redis.signal("-STOP");
        let mut set = JoinSet::new();
        for i in 0..20 {
            let store = store.clone();
            set.spawn(async move {
                let start = Instant::now();
                let d = store
                    .acquire(&format!("t{i}"), Duration::from_secs(60), 1000)
                    .await;
                (d, start.elapsed())
            });
        }
        while let Some(r) = set.join_next().await {
            let (d, took) = r.expect("no task panics");
            assert!(took <= timeout + Duration::from_millis(50), "{took:?}");
            assert_eq!(
                d,
                Decision::Reject {
                    retry_after: s.reconnect_interval.get()
                }
            );
        }
        assert!(!store.up());
        // Down: decided at once, no Redis call.
        let trips = store.stats().round_trips;
        let start = Instant::now();
        for i in 0..100 {
            store
                .acquire(&format!("t{i}"), Duration::from_secs(60), 1000)
                .await;
        }
        assert!(start.elapsed() < timeout, "{:?}", start.elapsed());
        assert!(
            store.stats().round_trips <= trips + 1,
            "only the background probe"
        );

        redis.signal("-CONT");
        let took = wait_up(&[&store], Duration::from_secs(3)).await;
        eprintln!("up again {took:?} after SIGCONT");
        assert_eq!(
            store.acquire("t0", Duration::from_secs(60), 1000).await,
            Decision::Admit
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_of_ended_windows_are_dropped() {
        let store = ClusterStore::new(); // unconfigured: local counting, same table and sweep
        for i in 0..500 {
            store
                .acquire(&format!("t{i}"), Duration::from_secs(1), 10)
                .await;
        }
        assert_eq!(store.stats().entries, 500);
        for _ in 0..50 {
            store.acquire("live", Duration::from_secs(1), 10).await;
            if store.stats().entries == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(store.stats().entries, 1, "only the entry still in use");

        // A day window's entry outlives its requests by IDLE_AFTER, not by the day.
        store
            .acquire("daily", Duration::from_secs(86_400), 10)
            .await;
        let now = now_ms();
        store.sweep_at(now);
        assert_eq!(store.stats().entries, 2);
        store.sweep_at(now + IDLE_AFTER.as_millis() as u64 + 2000);
        assert_eq!(store.stats().entries, 0);
    }

    #[tokio::test]
    async fn unconfigured_counts_exactly_and_acquire_all_gives_back() {
        let store = ClusterStore::new();
        let (day, hour) = (Duration::from_secs(86_400), Duration::from_secs(3600));
        let limits = [(day, 3), (hour, 2)];
        assert_eq!(store.acquire_all("t", &limits).await, Decision::Admit);
        assert_eq!(store.acquire_all("t", &limits).await, Decision::Admit);
        assert!(matches!(
            store.acquire_all("t", &limits).await,
            Decision::Reject { .. }
        ));
        // The refused request gave its day token back: one left.
        assert_eq!(store.acquire("t", day, 3).await, Decision::Admit);
        let Decision::Reject { retry_after } = store.acquire("t", day, 3).await else {
            panic!("day limit reached");
        };
        assert!(retry_after <= day);
        assert!(matches!(
            store.acquire("z", day, 0).await,
            Decision::Reject { .. }
        ));
        assert!(!store.up());
    }

    #[test]
    fn settings_default_and_validate() {
        let s: ClusterSettings =
            serde_yaml::from_str("redis: redis://127.0.0.1:6379/0").expect("parses");
        assert_eq!(s.fleet_size, 1);
        assert_eq!(s.on_unavailable, Fallback::Local);
        assert_eq!(s.lease_fraction, 0.02);
        assert_eq!(s.command_timeout.get(), Duration::from_millis(50));
        assert_eq!(s.reconnect_interval.get(), Duration::from_secs(1));
        assert_eq!(s.key_prefix, "tollgate:quota:");
        assert!(s.validate("cluster").is_empty());

        let full = "redis: redis://:secret@10.0.0.5:6379/2\nfleet_size: 4\non_unavailable: reject\n\
                    lease_fraction: 0.05\ncommand_timeout: 20ms\nreconnect_interval: 2s\nkey_prefix: \"q:\"\n";
        let s: ClusterSettings = serde_yaml::from_str(full).expect("parses");
        assert_eq!(s.on_unavailable, Fallback::Reject);
        assert!(s.validate("cluster").is_empty());

        assert!(
            serde_yaml::from_str::<ClusterSettings>("redis: x\nfleet: 2").is_err(),
            "unknown field"
        );
        assert!(
            serde_yaml::from_str::<ClusterSettings>("fleet_size: 2").is_err(),
            "redis is required"
        );
        assert!(
            serde_yaml::from_str::<ClusterSettings>("redis: x\non_unavailable: maybe").is_err()
        );

        let bad = ClusterSettings {
            redis: "http://:secret@host".into(),
            fleet_size: 0,
            lease_fraction: 0.0,
            command_timeout: Dur(Duration::from_secs(30)),
            reconnect_interval: Dur(Duration::ZERO),
            key_prefix: "k".repeat(300),
            ..s
        };
        let errors = bad.validate("cluster");
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cluster.redis",
                "cluster.fleet_size",
                "cluster.lease_fraction",
                "cluster.command_timeout",
                "cluster.reconnect_interval",
                "cluster.key_prefix"
            ]
        );
        assert!(
            !errors[0].message.contains("secret"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn leases_pack_window_and_tokens() {
        let e = Entry::new(1, 10, 0);
        assert_eq!(e.take(10), None);
        e.add(10, 3);
        assert_eq!(e.take(10), Some(2));
        assert_eq!(
            e.take(11),
            None,
            "tokens of window 10 are not for window 11"
        );
        e.add(11, 1);
        assert_eq!(e.left(10), 0, "a newer window replaces the lease");
        e.add(10, 5);
        assert_eq!(e.left(11), 1, "a late grant for an older window is dropped");
        e.set_exhausted(11, 100);
        assert!(e.is_exhausted(11, 100) && e.is_exhausted(11, 50));
        assert!(!e.is_exhausted(11, 200), "a raised limit asks Redis again");
        assert!(!e.is_exhausted(12, 100));
        assert!(later(0, u32::MAX), "windows compare across the wrap");
        assert_eq!(lease_cap(200, 0.02), 4);
        assert_eq!(lease_cap(30, 0.02), 1);
    }
}
