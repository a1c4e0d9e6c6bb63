//! Hashing for the router: a fast map hasher for lookup tables and a stable hash for sticky splits.
//!
//! The lookup tables are keyed only by strings from the config file; requests only look keys
//! up, never insert them, so an unkeyed hash cannot be turned into a collision attack. SipHash's
//! DoS resistance buys nothing here and costs a measurable share of a lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FxHasher`]; only for maps whose keys come from the config.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The Firefox/rustc multiply-rotate hash: a few cycles per word.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, mut bytes: &[u8]) {
        while let Some((chunk, rest)) = bytes.split_first_chunk::<8>() {
            self.add(u64::from_le_bytes(*chunk));
            bytes = rest;
        }
        if let Some((chunk, rest)) = bytes.split_first_chunk::<4>() {
            self.add(u64::from(u32::from_le_bytes(*chunk)));
            bytes = rest;
        }
        for &b in bytes {
            self.add(u64::from(b));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // hashbrown takes its control byte from the top bits; fold the well-mixed high half down
        // so neither end of the hash is weak.
        self.0.rotate_left(26)
    }
}

/// A hash that never changes between builds, processes or machines, so a sticky client lands
/// in the same split slice on every gateway instance and after every restart (FNV-1a, then a
/// SplitMix64 finaliser to spread FNV's weak low bits over the whole word).
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_pinned() {
        // Changing this value moves every sticky client to a different side of its split.
        assert_ne!(stable_hash(b"user-1"), stable_hash(b"user-2"));
        assert_eq!(stable_hash(b"user-1"), 0xc499b5f8a721df58);
    }

    #[test]
    fn fast_map_finds_what_it_stored() {
        let mut m: FastMap<Box<str>, u32> = FastMap::default();
        for i in 0..1000u32 {
            m.insert(format!("host{i}.example.com").into(), i);
        }
        for i in 0..1000u32 {
            assert_eq!(m.get(format!("host{i}.example.com").as_str()), Some(&i));
        }
        assert_eq!(m.get("host1000.example.com"), None);
    }
}
