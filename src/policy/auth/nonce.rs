//! Replay protection for signed requests: the `(access key, nonce)` pairs seen recently.
//!
//! Owns a memory-bounded set of keyed 64-bit hashes. It must never store nonce strings, scan
//! every entry on the request path, or forget a nonce that is still inside its window to make
//! room: when full it refuses new nonces (fail closed) and the caller answers 503.
//!
//! Layout: 64 shards, each a `Mutex` over a ring of `GENERATIONS` (4) hash sets. Time is cut into
//! ticks of `window / (GENERATIONS - 1)`; a shard moves to a fresh set at each tick it sees and
//! clears the oldest one. A nonce is therefore remembered for at least `window` and at most
//! `window * GENERATIONS / (GENERATIONS - 1)`. Rotation is lazy (done by the next request that
//! locks the shard), so expiry costs nothing per request beyond the shard it hashes to.
//!
//! Memory: about 16-32 bytes per remembered nonce (an open-addressing `u64` set), so a
//! capacity of 1 000 000 costs at most ~32 MB.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;
/// Hash sets per shard. More generations expire entries closer to `window` at the cost of one
/// more set lookup per request.
const GENERATIONS: usize = 4;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// The same access key used this nonce inside the window.
    #[error("nonce already used")]
    Replayed,
    /// The store holds `capacity` nonces that are all still inside their window.
    #[error("nonce store full")]
    Full,
}

/// Memory-bounded replay store shared by every route that checks nonces. A nonce is remembered
/// for at least `window`; size it as [`super::hmac::HmacSettings::nonce_window`] (twice the
/// clock skew: a request is fresh from `skew` before its timestamp to `skew` after it).
pub struct NonceStore {
    shards: Box<[Mutex<Shard>]>,
    /// Random per process (per store), so clients cannot aim nonces at one shard or predict
    /// collisions.
    keys: RandomState,
    origin: Instant,
    tick_nanos: u64,
    capacity: usize,
    /// Entries held across all shards, including some past their window not yet rotated out.
    len: AtomicUsize,
    window: Duration,
}

struct Shard {
    /// Tick of `gens[head]`, the set new nonces go into.
    tick: u64,
    head: usize,
    gens: [HashSet<u64, BuildHasherDefault<Prehashed>>; GENERATIONS],
}

impl Shard {
    /// Moves the ring forward to `tick`, clearing the generations that fell out of the window.
    fn advance(&mut self, tick: u64, len: &AtomicUsize) {
        if tick <= self.tick {
            return;
        }
        let steps = (tick - self.tick).min(GENERATIONS as u64);
        for _ in 0..steps {
            self.head = (self.head + 1) % GENERATIONS;
            let gen = &mut self.gens[self.head];
            len.fetch_sub(gen.len(), Ordering::Relaxed);
            gen.clear();
        }
        self.tick = tick;
    }

    fn contains(&self, hash: u64) -> bool {
        self.gens.iter().any(|g| g.contains(&hash))
    }
}

impl NonceStore {
    /// A store that remembers up to `capacity` nonces, each for at least `window`.
    pub fn new(capacity: usize, window: Duration) -> Self {
        let tick = window.as_nanos() / (GENERATIONS as u128 - 1);
        let tick_nanos = u64::try_from(tick).unwrap_or(u64::MAX).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    tick: 0,
                    head: 0,
                    gens: Default::default(),
                })
            })
            .collect();
        Self {
            shards,
            keys: RandomState::new(),
            origin: Instant::now(),
            tick_nanos,
            capacity,
            len: AtomicUsize::new(0),
            window,
        }
    }

    /// Records `nonce` for `access_key` at `now`. Runs after the request's signature verified
    /// (otherwise anyone could burn a client's nonces). `Replayed` when the pair was seen inside
    /// the window; `Full` when `capacity` nonces are all still inside theirs.
    pub fn check_and_insert(
        &self,
        access_key: &str,
        nonce: &str,
        now: Instant,
    ) -> Result<(), NonceError> {
        // `(&str, &str)` hashes each string with a terminator, so ("ab","c") ≠ ("a","bc").
        let hash = self.keys.hash_one((access_key, nonce));
        let shard = &self.shards[(hash >> 58) as usize % SHARDS];
        let tick = self.tick_at(now);

        let mut s = lock(shard);
        s.advance(tick, &self.len);
        if s.contains(hash) {
            return Err(NonceError::Replayed);
        }
        if !self.reserve() {
            // Other shards may hold generations that expired but were not rotated yet because
            // no request touched them: rotate everything once, then try again.
            drop(s);
            self.expire_all(tick);
            if !self.reserve() {
                return Err(NonceError::Full);
            }
            s = lock(shard);
            s.advance(tick, &self.len);
            if s.contains(hash) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                return Err(NonceError::Replayed);
            }
        }
        let head = s.head;
        s.gens[head].insert(hash);
        Ok(())
    }

    /// Nonces held, including some past their window that have not been rotated out yet.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The shortest time a nonce is remembered.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn tick_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / u128::from(self.tick_nanos)).unwrap_or(u64::MAX)
    }

    /// Takes one slot of the global capacity, or says there is none.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// The slow path when full: one pass over the 64 shards, never per request otherwise.
    fn expire_all(&self, tick: u64) {
        for shard in self.shards.iter() {
            lock(shard).advance(tick, &self.len);
        }
    }
}

impl std::fmt::Debug for NonceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceStore")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("window", &self.window)
            .finish()
    }
}

/// A panic while holding a shard (there is none on this path) must not turn every later
/// request into a panic: the sets are still consistent, so keep using them.
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hasher for values that already are keyed hashes. The shard index uses the top bits, which
/// are equal within a shard, so the multiply spreads the low (random) bits into the top bits the
/// table uses for its tags.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_nonce_is_accepted_once_per_key() {
        let store = NonceStore::new(100, MIN);
        let now = Instant::now();
        assert_eq!(store.check_and_insert("k1", "n1", now), Ok(()));
        assert_eq!(
            store.check_and_insert("k1", "n1", now),
            Err(NonceError::Replayed)
        );
        // Same nonce, other key: a different client, not a replay.
        assert_eq!(store.check_and_insert("k2", "n1", now), Ok(()));
        // The pair is hashed unambiguously.
        assert_eq!(store.check_and_insert("k1n", "1", now), Ok(()));
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn nonces_are_remembered_for_the_window_then_forgotten() {
        let store = NonceStore::new(100, MIN);
        let t0 = Instant::now();
        store.check_and_insert("k", "n", t0).unwrap();
        for secs in [1, 30, 59, 60] {
            assert_eq!(
                store.check_and_insert("k", "n", t0 + Duration::from_secs(secs)),
                Err(NonceError::Replayed),
                "still inside the window after {secs}s"
            );
        }
        // At most window * 4/3 later it is gone, and its slot is free again.
        let later = t0 + MIN * 4 / 3 + Duration::from_secs(1);
        assert_eq!(store.check_and_insert("k", "n", later), Ok(()));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_store_refuses_instead_of_forgetting() {
        let store = NonceStore::new(10, MIN);
        let t0 = Instant::now();
        for i in 0..10 {
            store.check_and_insert("k", &format!("n{i}"), t0).unwrap();
        }
        assert_eq!(
            store.check_and_insert("k", "one-more", t0 + Duration::from_secs(30)),
            Err(NonceError::Full)
        );
        // A replay is still recognised as such when full.
        assert_eq!(
            store.check_and_insert("k", "n3", t0),
            Err(NonceError::Replayed)
        );
        assert_eq!(store.len(), 10);
        // Once the old nonces are out of the window there is room for a whole new batch, even
        // in shards that no request touched in between (the full path rotates them all).
        let later = t0 + MIN * 2;
        for i in 0..10 {
            assert_eq!(store.check_and_insert("k", &format!("m{i}"), later), Ok(()));
        }
        assert_eq!(store.len(), 10);
        assert_eq!(
            store.check_and_insert("k", "m10", later),
            Err(NonceError::Full)
        );
    }

    #[test]
    fn capacity_holds_under_concurrent_inserts() {
        let store = Arc::new(NonceStore::new(1000, MIN));
        let now = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let (mut ok, mut replayed, mut full) = (0, 0, 0);
                    // Every thread sends the same 300 shared nonces and 100 of its own.
                    for i in 0..300 {
                        match store.check_and_insert("shared", &i.to_string(), now) {
                            Ok(()) => ok += 1,
                            Err(NonceError::Replayed) => replayed += 1,
                            Err(NonceError::Full) => full += 1,
                        }
                    }
                    for i in 0..100 {
                        match store.check_and_insert("own", &format!("{t}-{i}"), now) {
                            Ok(()) => ok += 1,
                            Err(NonceError::Replayed) => replayed += 1,
                            Err(NonceError::Full) => full += 1,
                        }
                    }
                    (ok, replayed, full)
                })
            })
            .collect();
        let (mut ok, mut replayed, mut full) = (0, 0, 0);
        for t in threads {
            let (o, r, f) = t.join().unwrap();
            ok += o;
            replayed += r;
            full += f;
        }
        // 300 shared + 800 own = 1100 distinct nonces for 1000 slots: exactly 1000 accepted.
        // A shared nonce is either accepted once and replayed by the 7 other threads, or
        // refused as full by all 8 (nothing expires here); at most 100 are refused.
        assert_eq!(ok, 1000);
        assert_eq!(ok + replayed + full, 8 * 400);
        assert_eq!(replayed % 7, 0, "replayed {replayed}");
        assert!(replayed >= 7 * 200, "replayed {replayed}");
        assert_eq!(store.len(), 1000);
    }

    #[test]
    fn instants_before_creation_and_zero_windows_do_not_panic() {
        let t0 = Instant::now();
        let store = NonceStore::new(4, Duration::ZERO);
        store.check_and_insert("k", "n", t0).unwrap();
        let earlier = t0.checked_sub(Duration::from_secs(5)).unwrap_or(t0);
        let _ = store.check_and_insert("k", "m", earlier);
        let empty = NonceStore::new(0, MIN);
        assert_eq!(empty.check_and_insert("k", "n", t0), Err(NonceError::Full));
    }
}
