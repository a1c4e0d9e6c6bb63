//! API keys. Keys are stored and looked up by their SHA-256 digest: the plain key is never kept
//! after load and never compared byte by byte, so lookup time says nothing about how much of a
//! guess was right (the digest of a guess is unpredictable).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// Key digest → consumer index.
pub type ApiKeys = HashMap<[u8; 32], usize>;

pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The consumer a presented key belongs to.
pub fn lookup(keys: &ApiKeys, presented: &[u8]) -> Option<usize> {
    keys.get(&digest(presented)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_digest_only() {
        let mut keys = ApiKeys::new();
        keys.insert(digest(b"k-0123456789abcdef"), 3);
        assert_eq!(lookup(&keys, b"k-0123456789abcdef"), Some(3));
        assert_eq!(lookup(&keys, b"k-0123456789abcdeF"), None);
        assert_eq!(lookup(&keys, b""), None);
    }
}
