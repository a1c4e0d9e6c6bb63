//! Load-balancing policies over a subset of an upstream's backends.
//!
//! A [`Subset`] is precomputed at compile: its member list and, for round robin, the whole
//! smooth-weighted sequence. Selection is a read of that sequence at an atomic cursor, so the
//! request path takes no lock and allocates nothing. Unusable backends (down, ejected, already
//! tried by this request) are skipped by walking on; the caller decides what "usable" means.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::key::mix;

/// Longest precomputed round-robin sequence. Weights whose (gcd-reduced) sum exceeds it are
/// scaled down proportionally (each stays ≥ 1), so very skewed weights are approximated.
pub(super) const MAX_SEQUENCE: u64 = 4096;

/// Backends carrying a set of labels, with their balancing state.
#[derive(Debug)]
pub(super) struct Subset {
    pub labels: BTreeMap<String, String>,
    /// Backend indexes, in config order.
    pub members: Box<[usize]>,
    /// Weights of `members`, same order.
    weights: Box<[u32]>,
    /// Smooth weighted round-robin order, as backend indexes.
    sequence: Box<[u32]>,
    /// Round-robin position, also the tie-breaker rotation of least-conn.
    cursor: AtomicUsize,
    /// All weights equal: rendezvous hashing can compare raw hashes.
    uniform: bool,
}

impl Subset {
    /// `members` must not be empty; `weights[i]` is the weight of backend `i` (≥ 1).
    pub fn new(labels: BTreeMap<String, String>, members: Vec<usize>, weights: &[u32]) -> Self {
        let member_weights: Vec<u32> = members.iter().map(|&i| weights[i]).collect();
        let sequence = smooth_wrr(&member_weights)
            .into_iter()
            .map(|pos| members[pos] as u32)
            .collect();
        let uniform = member_weights.windows(2).all(|w| w[0] == w[1]);
        Self {
            labels,
            members: members.into(),
            weights: member_weights.into(),
            sequence,
            // Start each subset at a random point so that several gateways (or a reload) do not
            // all send their first requests to the same backend.
            cursor: AtomicUsize::new(fastrand::usize(..)),
            uniform,
        }
    }

    /// Smooth weighted round robin: the next usable backend in the precomputed sequence.
    ///
    /// Positions walked over are consumed (the cursor moves past them), so the traffic of an
    /// unusable backend spreads over the others by weight instead of all going to its
    /// successor in the sequence.
    #[inline]
    pub fn round_robin(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.sequence.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for k in 0..len {
            let i = self.sequence[start.wrapping_add(k) % len] as usize;
            if usable(i) {
                if k > 0 {
                    self.cursor.fetch_add(k, Ordering::Relaxed);
                }
                return Some(i);
            }
        }
        None
    }

    /// Fewest requests in flight per unit of weight; ties go to the next backend in rotation.
    #[inline]
    pub fn least_conn(
        &self,
        usable: impl Fn(usize) -> bool,
        in_flight: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        let n = self.members.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u128, u128)> = None;
        for k in 0..n {
            let pos = start.wrapping_add(k) % n;
            let i = self.members[pos];
            if !usable(i) {
                continue;
            }
            let load = in_flight(i) as u128;
            let weight = u128::from(self.weights[pos]);
            // load / weight < best_load / best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Weighted rendezvous hashing: the usable backend with the highest score for `key`.
    /// Removing a backend only moves the keys it had; weights set each backend's share.
    #[inline]
    pub fn rendezvous(
        &self,
        key: u64,
        usable: impl Fn(usize) -> bool,
        seed: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        if self.uniform {
            return self
                .members
                .iter()
                .copied()
                .filter(|&i| usable(i))
                .max_by_key(|&i| mix(key ^ seed(i)));
        }
        let mut best: Option<(usize, f64)> = None;
        for (pos, &i) in self.members.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            let score = weighted_score(mix(key ^ seed(i)), self.weights[pos]);
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// `weight / -ln(u)` with `u` the hash mapped into (0, 1): the highest score wins with
/// probability proportional to the weight.
#[inline]
fn weighted_score(h: u64, weight: u32) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    let u = ((h >> 11) as f64 + 0.5) * SCALE;
    f64::from(weight) / -u.ln()
}

/// nginx's smooth weighted round robin, unrolled into one full period: each step adds every
/// weight to its current value, picks the largest (first on ties) and subtracts the total from
/// it. Returns positions into `weights`. Weights are reduced by their gcd first.
pub(super) fn smooth_wrr(weights: &[u32]) -> Vec<usize> {
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x.max(1))).collect();
    reduce(&mut w);
    let total: u64 = w.iter().sum();
    if total > MAX_SEQUENCE {
        for x in &mut w {
            *x = (*x * MAX_SEQUENCE / total).max(1);
        }
        reduce(&mut w);
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &wi) in w.iter().enumerate() {
            current[i] += wi as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best);
    }
    out
}

fn reduce(w: &mut [u64]) {
    let g = w.iter().copied().fold(0, gcd);
    if g > 1 {
        for x in w {
            *x /= g;
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence_matches_nginx() {
        // The example of nginx's commit that introduced smooth weighted round robin.
        assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(&[1, 2]), vec![1, 0, 1]);
        assert_eq!(smooth_wrr(&[1, 1, 1]), vec![0, 1, 2]);
    }

    #[test]
    fn weights_reduced_by_gcd() {
        assert_eq!(smooth_wrr(&[100, 200]), vec![1, 0, 1]);
        assert_eq!(smooth_wrr(&[4, 4]).len(), 2);
    }

    #[test]
    fn long_sequences_are_capped() {
        let s = smooth_wrr(&[1, 100_000]);
        assert!(s.len() as u64 <= MAX_SEQUENCE, "{}", s.len());
        assert_eq!(s.iter().filter(|&&p| p == 0).count(), 1);
        let s = smooth_wrr(&[3000, 1000, 7]);
        assert!(s.len() as u64 <= MAX_SEQUENCE + 3);
        let count = |p| s.iter().filter(|&&x| x == p).count() as f64;
        let ratio = count(0) / count(1);
        assert!((ratio - 3.0).abs() < 0.05, "{ratio}");
        assert!(count(2) >= 1.0);
    }
}
