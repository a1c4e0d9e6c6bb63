//! Values found to match nothing, remembered per thread. A browser sends the same
//! User-Agent, Accept and cookies on every request: libinjection's SQLi tokenizer takes
//! ~18k instructions on a User-Agent, and the header sets of the prefilter scan each such
//! value a few times. A verdict that depends on the value alone (and on what judged it) is
//! exact when remembered, so the memo keeps only "nothing here" verdicts: a match must run
//! again for its captures.
//!
//! What judged a value is a `domain`: one per detector, and one per prefilter set (a reload
//! builds new sets with new domains, so nothing remembered under an old ruleset applies to a
//! new one). Direct-mapped, so bounded: 1 024 values of 16 to 512 bytes per thread, a newer
//! value replacing an older one in its slot; the whole value is compared on lookup, so a
//! hash collision only costs a miss.

use std::cell::RefCell;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// libinjection's SQLi detector.
pub const SQLI: u64 = 0;
/// libinjection's XSS detector.
pub const XSS: u64 = 1;

const SLOTS: usize = 1024;
const MIN_LEN: usize = 16;
const MAX_LEN: usize = 512;

/// A remembered value and the domain that found nothing in it.
type Seen = Option<(u64, Box<[u8]>)>;

thread_local! {
    static SEEN: RefCell<Vec<Seen>> = RefCell::new(vec![None; SLOTS]);
}

/// A domain no other judge has.
pub fn domain() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(XSS + 1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The slot of `v`, when values this long are remembered at all (shorter ones cost little
/// to judge again).
fn slot(domain: u64, v: &[u8]) -> Option<usize> {
    if !(MIN_LEN..=MAX_LEN).contains(&v.len()) {
        return None;
    }
    let mut h = rustc_hash::FxHasher::default();
    h.write_u64(domain);
    h.write(v);
    Some(h.finish() as usize % SLOTS)
}

/// Whether `domain` found nothing in `v` before, on this thread.
pub fn known(domain: u64, v: &[u8]) -> bool {
    slot(domain, v).is_some_and(|i| {
        SEEN.with(|s| matches!(&s.borrow()[i], Some((d, seen)) if *d == domain && **seen == *v))
    })
}

/// Records that `domain` found nothing in `v`.
pub fn remember(domain: u64, v: &[u8]) {
    if let Some(i) = slot(domain, v) {
        SEEN.with(|s| s.borrow_mut()[i] = Some((domain, v.into())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_verdicts_are_for_that_value_and_domain_only() {
        let ua = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        let other = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.1";
        assert!(!known(SQLI, ua));
        remember(SQLI, ua);
        assert!(known(SQLI, ua));
        assert!(!known(SQLI, other), "same length, one byte apart");
        assert!(!known(XSS, ua), "each domain keeps its own");
        let set = domain();
        assert!(set > XSS && domain() != set, "domains are fresh");
        assert!(!known(set, ua));
        remember(SQLI, b"short");
        assert!(!known(SQLI, b"short"), "short values are not kept");
    }

    #[test]
    fn a_thread_remembers_for_itself() {
        let v = b"Accept: text/html,application/xhtml+xml;q=0.9";
        let d = domain();
        remember(d, v);
        assert!(known(d, v));
        assert!(!std::thread::spawn(move || known(d, v)).join().unwrap());
    }
}
