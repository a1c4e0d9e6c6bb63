//! Host matching: parses `match.hosts` patterns at load and maps a request's Host to the host
//! groups it belongs to, most specific first. Never allocates for a host of normal length.

use std::net::Ipv6Addr;

use crate::config::FieldError;

use super::hash::FastMap;

/// One compiled `match.hosts` entry, lowercased, without trailing dot or IPv6 brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// `api.example.com`
    Exact(Box<str>),
    /// `*.example.com`, stored as `example.com`: matches any name that ends in `.example.com`.
    Suffix(Box<str>),
}

/// Parses a route's `hosts` list; errors are reported at `{at}[k]`.
pub(crate) fn compile_hosts(
    hosts: &[String],
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<HostPattern> {
    let mut out = Vec::with_capacity(hosts.len());
    for (k, raw) in hosts.iter().enumerate() {
        match parse_pattern(raw) {
            Ok(p) => out.push(p),
            Err(msg) => errors.push(FieldError::new(format!("{at}[{k}]"), msg)),
        }
    }
    out
}

fn parse_pattern(raw: &str) -> Result<HostPattern, String> {
    let s = raw.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err("host must not be empty".into());
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return ipv6(inner, raw);
    }
    if s.contains(':') {
        if s.parse::<Ipv6Addr>().is_ok() {
            return Ok(HostPattern::Exact(s.into()));
        }
        return Err(format!(
            "`{raw}`: hosts are matched without the port; write the name alone"
        ));
    }
    let s = s.strip_suffix('.').unwrap_or(&s);
    if s == "*" {
        return Err("`*` alone is not a host pattern; leave `hosts` out to match any host".into());
    }
    let (wildcard, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if name.contains('*') || (!wildcard && s.starts_with('*')) {
        return Err(format!(
            "`{raw}`: a wildcard must be the whole first label, as in `*.example.com`"
        ));
    }
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(format!("`{raw}` has an empty label"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("`{raw}`: `{c}` is not allowed in a host name"));
    }
    Ok(if wildcard {
        HostPattern::Suffix(name.into())
    } else {
        HostPattern::Exact(name.into())
    })
}

fn ipv6(inner: &str, raw: &str) -> Result<HostPattern, String> {
    match inner.parse::<Ipv6Addr>() {
        Ok(_) => Ok(HostPattern::Exact(inner.into())),
        Err(_) => Err(format!("`{raw}` is not an IPv6 address")),
    }
}

/// Host groups by specificity. A group is an index into the router's per-group path tables.
#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    exact: FastMap<Box<str>, u32>,
    /// Keyed by the suffix after `*.`.
    wildcard: FastMap<Box<str>, u32>,
    catch_all: Option<u32>,
    groups: u32,
}

impl HostIndex {
    /// The group for a pattern, created on first use. Group ids are dense from 0.
    pub(crate) fn group_for(&mut self, pattern: &HostPattern) -> u32 {
        let (map, key) = match pattern {
            HostPattern::Exact(k) => (&mut self.exact, k),
            HostPattern::Suffix(k) => (&mut self.wildcard, k),
        };
        if let Some(&g) = map.get(key) {
            return g;
        }
        let g = self.groups;
        map.insert(key.clone(), g);
        self.groups += 1;
        g
    }

    /// The group of routes without `hosts`.
    pub(crate) fn catch_all_group(&mut self) -> u32 {
        if let Some(g) = self.catch_all {
            return g;
        }
        let g = self.groups;
        self.catch_all = Some(g);
        self.groups += 1;
        g
    }

    pub(crate) fn group_count(&self) -> usize {
        self.groups as usize
    }

    /// Offers the groups that apply to `host` to `visit` in precedence order — exact, then
    /// wildcards from the longest suffix to the shortest, then catch-all — and returns the
    /// first answer. A missing host only reaches the catch-all group.
    #[inline]
    pub(crate) fn find<T>(
        &self,
        host: Option<&str>,
        mut visit: impl FnMut(u32) -> Option<T>,
    ) -> Option<T> {
        if let Some(raw) = host {
            if !(self.exact.is_empty() && self.wildcard.is_empty()) {
                let found = with_request_host(raw, |h| {
                    if let Some(&g) = self.exact.get(h) {
                        if let Some(t) = visit(g) {
                            return Some(t);
                        }
                    }
                    if !self.wildcard.is_empty() {
                        for (i, b) in h.bytes().enumerate() {
                            if b == b'.' {
                                if let Some(&g) = self.wildcard.get(&h[i + 1..]) {
                                    if let Some(t) = visit(g) {
                                        return Some(t);
                                    }
                                }
                            }
                        }
                    }
                    None
                });
                if found.is_some() {
                    return found;
                }
            }
        }
        self.catch_all.and_then(visit)
    }
}

/// Longest host handled without touching the heap (DNS names are at most 253 bytes).
const STACK_HOST: usize = 256;

/// Calls `f` with the request host in the form patterns are stored in: port and IPv6 brackets
/// removed, one trailing dot dropped, ASCII lowercase. Lowercases into a stack buffer, and only
/// when the host has an uppercase letter.
pub(crate) fn with_request_host<R>(raw: &str, f: impl FnOnce(&str) -> R) -> R {
    let host = strip_port(raw.trim());
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return f(host);
    }
    if host.len() <= STACK_HOST {
        let mut buf = [0u8; STACK_HOST];
        let buf = &mut buf[..host.len()];
        buf.copy_from_slice(host.as_bytes());
        buf.make_ascii_lowercase();
        // ASCII lowercasing of valid UTF-8 is valid UTF-8; an empty host can match nothing.
        return f(std::str::from_utf8(buf).unwrap_or(""));
    }
    f(&host.to_ascii_lowercase())
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(end) => &rest[..end],
            None => host,
        };
    }
    match host.rfind(':') {
        // More than one colon: a bare IPv6 address, not a port.
        Some(p) if !host[..p].contains(':') => &host[..p],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> String {
        with_request_host(raw, str::to_string)
    }

    #[test]
    fn request_hosts_are_normalised() {
        assert_eq!(norm("Example.COM"), "example.com");
        assert_eq!(norm("example.com:8080"), "example.com");
        assert_eq!(norm("Example.com.:443"), "example.com");
        assert_eq!(norm("[::1]:80"), "::1");
        assert_eq!(norm("[2001:DB8::1]"), "2001:db8::1");
        assert_eq!(norm("2001:db8::1"), "2001:db8::1");
        assert_eq!(norm("10.0.0.1:80"), "10.0.0.1");
        let long = format!("{}.COM", "A".repeat(300));
        assert_eq!(norm(&long), long.to_ascii_lowercase());
    }

    #[test]
    fn patterns_parse() {
        assert_eq!(
            parse_pattern("API.Example.com."),
            Ok(HostPattern::Exact("api.example.com".into()))
        );
        assert_eq!(
            parse_pattern("*.Example.com"),
            Ok(HostPattern::Suffix("example.com".into()))
        );
        assert_eq!(parse_pattern("[::1]"), Ok(HostPattern::Exact("::1".into())));
        assert_eq!(parse_pattern("::1"), Ok(HostPattern::Exact("::1".into())));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "", " ", "*foo", "*", "a.*.b", "*.", "a..b", "a b.com", "x.com:80", "[zz]", "**.a.com",
            "a*.com",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad:?} accepted");
        }
        let mut errs = Vec::new();
        let got = compile_hosts(
            &["ok.com".into(), "a.*.b".into()],
            "routes[2].match.hosts",
            &mut errs,
        );
        assert_eq!(got, vec![HostPattern::Exact("ok.com".into())]);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, "routes[2].match.hosts[1]");
        assert!(errs[0].message.contains("wildcard"), "{}", errs[0].message);
    }

    #[test]
    fn groups_are_offered_most_specific_first() {
        let mut idx = HostIndex::default();
        let exact = idx.group_for(&HostPattern::Exact("a.b.example.com".into()));
        let long = idx.group_for(&HostPattern::Suffix("b.example.com".into()));
        let short = idx.group_for(&HostPattern::Suffix("example.com".into()));
        let any = idx.catch_all_group();
        assert_eq!(
            idx.group_for(&HostPattern::Suffix("example.com".into())),
            short
        );
        assert_eq!(idx.group_count(), 4);

        let order = |host: Option<&str>| {
            let mut seen = Vec::new();
            let r: Option<()> = idx.find(host, |g| {
                seen.push(g);
                None
            });
            assert!(r.is_none());
            seen
        };
        assert_eq!(
            order(Some("A.B.Example.com:8443")),
            vec![exact, long, short, any]
        );
        assert_eq!(order(Some("x.a.b.example.com")), vec![long, short, any]);
        assert_eq!(order(Some("c.example.com")), vec![short, any]);
        // A wildcard never matches its own apex.
        assert_eq!(order(Some("example.com")), vec![any]);
        assert_eq!(order(Some("other.org")), vec![any]);
        assert_eq!(order(None), vec![any]);
        // The first group that answers wins.
        assert_eq!(
            idx.find(Some("a.b.example.com"), |g| (g != exact).then_some(g)),
            Some(long)
        );
    }
}
