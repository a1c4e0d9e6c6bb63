//! Which address is the client: the connection's peer, or, when the peer is one of our trusted
//! proxies (a CDN, a load balancer in front of us), the address those proxies recorded in
//! `X-Forwarded-For`. Also owns [`Cidr`] and [`CidrList`], the address ranges every policy
//! (trusted proxies, flood allow-lists, IP rules) is written in.
//!
//! Must never: believe a forwarding header that did not come from a trusted proxy (anyone can
//! send one); allocate or panic on anything a request carries.
//!
//! The walk is nginx's `realip` with `real_ip_recursive on` (and Envoy's trusted-CIDR mode):
//! when the peer is trusted, read the header's addresses from the right, skip the ones that
//! are trusted proxies too, and take the first that is not. Each trusted proxy appends the
//! address it received the request from, so everything right of the first untrusted address
//! was written by us and everything left of it by the client (and may be forged).
//!
//! - Several header lines are one list, in order (RFC 9110 §5.3).
//! - Empty entries (`a,,b`, trailing commas) are skipped. An entry that is not an address
//!   (`unknown`, an obfuscated `_hidden`, bytes that are not text) stops the walk: the client
//!   is the last address read, i.e. the nearest proxy that vouched for the request. When every
//!   entry is trusted, the leftmost is the client.
//! - Entries may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`) or brackets
//!   (`[2001:db8::1]`), as some proxies write them.
//! - IPv4-mapped IPv6 (`::ffff:192.0.2.1`, what a dual-stack `[::]` listener reports for an
//!   IPv4 client) is treated as IPv4 everywhere: in CIDR matching and in the result.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

use crate::config::error::index;
use crate::config::FieldError;

/// Why a CIDR did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address or CIDR, e.g. 10.0.0.0/8, 192.0.2.1 or 2001:db8::/32")]
    Syntax(String),
    #[error("prefix length /{len} is longer than the {max} bits of the address")]
    PrefixTooLong { len: u32, max: u8 },
    #[error("`{written}` has host bits set after the prefix; did you mean {network}?")]
    HostBits { written: String, network: Cidr },
}

/// One address range: an IPv4 or IPv6 network and a prefix length. A bare address is a
/// single-address range (`/32`, `/128`). An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) is
/// stored as the IPv4 range it maps (`10.0.0.0/8`); an IPv6 range never matches IPv4
/// addresses, so `::/0` means "all of IPv6" and `0.0.0.0/0` "all of IPv4".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `192.0.2.1`, `2001:db8::/32`, `::1`. Host bits set after the prefix
    /// (`10.0.0.1/8`) are an error rather than silently widened: they usually mean a typo.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let syntax = || CidrError::Syntax(text.to_string());
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                let max = max_len(addr);
                let len: u32 = len.parse().map_err(|_| syntax())?;
                match u8::try_from(len) {
                    Ok(len) if len <= max => (addr, len),
                    _ => return Err(CidrError::PrefixTooLong { len, max }),
                }
            }
            None => {
                let addr: IpAddr = text.parse().map_err(|_| syntax())?;
                (addr, max_len(addr))
            }
        };
        let written = Cidr { addr, len };
        let network = Cidr {
            addr: mask_addr(addr, len),
            len,
        };
        if network != written {
            return Err(CidrError::HostBits {
                written: text.to_string(),
                network: network.canonical(),
            });
        }
        Ok(network.canonical())
    }

    /// The network address (host bits are zero).
    pub fn network(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length, in bits of the network's own family.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is in this range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask32(self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.len) == u128::from(net)
            }
            _ => false,
        }
    }

    /// An IPv4-mapped IPv6 range of at least /96 becomes the IPv4 range it covers.
    fn canonical(self) -> Cidr {
        match self.addr {
            IpAddr::V6(v6) if self.len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    len: self.len - 96,
                },
                None => self,
            },
            _ => self,
        }
    }

    /// First and last address, as `u128` in the family's own numbering.
    fn bounds(&self) -> (u128, u128) {
        match self.addr {
            IpAddr::V4(net) => {
                let lo = u32::from(net);
                (u128::from(lo), u128::from(lo | !mask32(self.len)))
            }
            IpAddr::V6(net) => {
                let lo = u128::from(net);
                (lo, lo | !mask128(self.len))
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn mask_addr(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(len))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(len))),
    }
}

/// A set of [`Cidr`]s, compiled into sorted, merged ranges per family so that
/// [`contains`](CidrList::contains) is a binary search: no allocation, `O(log n)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList {
    /// As written (canonical form), for `/status` and error messages.
    cidrs: Vec<Cidr>,
    /// Disjoint, non-adjacent, sorted inclusive ranges.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CidrList {
    /// Parses every item; `path` is the list's field path (`flood.allow`), and each error names
    /// its item (`flood.allow[2]: ...`). All errors are returned, not just the first.
    pub fn parse(path: &str, items: &[String]) -> Result<CidrList, Vec<FieldError>> {
        let mut cidrs = Vec::with_capacity(items.len());
        let mut errors = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match Cidr::parse(item) {
                Ok(c) => cidrs.push(c),
                Err(e) => errors.push(FieldError::new(index(path, i), e.to_string())),
            }
        }
        if errors.is_empty() {
            Ok(CidrList::from_cidrs(cidrs))
        } else {
            Err(errors)
        }
    }

    /// Builds the list from parsed ranges.
    pub fn from_cidrs(cidrs: Vec<Cidr>) -> CidrList {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for c in &cidrs {
            match c.addr {
                IpAddr::V4(_) => v4.push(c.bounds()),
                IpAddr::V6(_) => v6.push(c.bounds()),
            }
        }
        let v4 = merge(v4)
            .into_iter()
            // Bounds of an IPv4 range fit in u32 by construction.
            .map(|(lo, hi)| (lo as u32, hi as u32))
            .collect();
        CidrList {
            cidrs,
            v4,
            v6: merge(v6),
        }
    }

    /// Whether `ip` is in any range. IPv4-mapped IPv6 addresses are looked up as IPv4.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(ip) => in_ranges(&self.v4, u32::from(ip)),
            IpAddr::V6(ip) => in_ranges(&self.v6, u128::from(ip)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// The ranges as parsed (canonical form, in the order written).
    pub fn cidrs(&self) -> &[Cidr] {
        &self.cidrs
    }
}

/// Sorts inclusive ranges and merges overlapping or adjacent ones.
fn merge(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            // A range ending at the top of the space absorbs everything after it.
            Some(last) if last.1.checked_add(1).is_none_or(|next| lo <= next) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

#[inline]
fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], ip: T) -> bool {
    // The last range starting at or below `ip` is the only one that can hold it.
    let after = ranges.partition_point(|&(lo, _)| lo <= ip);
    after > 0 && ip <= ranges[after - 1].1
}

/// The `client_ip:` section of tollgate.yaml (hot-reloaded).
///
/// ```yaml
/// client_ip:
///   trusted_proxies: [10.0.0.0/8, 2001:db8:cd0::/48]   # default [] : the client is the peer
///   header: x-forwarded-for                            # default
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientIpSettings {
    /// CIDRs of the proxies in front of the gateway whose `header` is believed. Default empty:
    /// the client is always the connection's peer and the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies append the client address to: a comma-separated list of
    /// addresses, such as `X-Forwarded-For` (default) or `X-Real-IP`. Not RFC 7239 `Forwarded`.
    pub header: String,
}

impl Default for ClientIpSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            header: "x-forwarded-for".to_string(),
        }
    }
}

/// Compiled [`ClientIpSettings`]; lives in the config snapshot.
#[derive(Debug, Clone)]
pub struct ClientIpPolicy {
    trusted: CidrList,
    header: HeaderName,
}

impl Default for ClientIpPolicy {
    /// No trusted proxies: the client is the peer.
    fn default() -> Self {
        Self {
            trusted: CidrList::default(),
            header: HeaderName::from_static("x-forwarded-for"),
        }
    }
}

impl ClientIpPolicy {
    /// Compiles the settings; `path` is the section's field path (`client_ip`). Runs at load
    /// time; every error is returned.
    pub fn compile(path: &str, s: &ClientIpSettings) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let trusted = CidrList::parse(&field(path, "trusted_proxies"), &s.trusted_proxies)
            .unwrap_or_else(|e| {
                errors.extend(e);
                CidrList::default()
            });
        let header = match HeaderName::from_bytes(s.header.trim().as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                errors.push(FieldError::new(
                    field(path, "header"),
                    format!("`{}` is not a valid header name", s.header),
                ));
                HeaderName::from_static("x-forwarded-for")
            }
        };
        if errors.is_empty() {
            Ok(Self { trusted, header })
        } else {
            Err(errors)
        }
    }

    /// The trusted proxies' ranges.
    pub fn trusted_proxies(&self) -> &CidrList {
        &self.trusted
    }

    /// The client address of a request arriving from `peer` with `headers`. Runs once per
    /// request (and per WebSocket upgrade), before routing-independent policies (flood, IP
    /// rules) and the access log read it. The result is canonical: IPv4 clients are always
    /// `IpAddr::V4`, even behind a dual-stack listener.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.trusted.is_empty() || !self.trusted.contains(peer) {
            return peer;
        }
        let mut client = peer;
        // Lines from the last, entries from the right: the order proxies appended them.
        for line in headers.get_all(&self.header).iter().rev() {
            for entry in line.as_bytes().rsplit(|&b| b == b',') {
                let entry = entry.trim_ascii();
                if entry.is_empty() {
                    continue;
                }
                match parse_entry(entry) {
                    Some(ip) => {
                        client = ip;
                        if !self.trusted.contains(ip) {
                            return ip;
                        }
                    }
                    // Garbage: nobody we trust vouched for anything left of here.
                    None => return client,
                }
            }
        }
        client
    }
}

/// One forwarding-header entry: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:443`. Returns the canonical address.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let ip = if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else if let Ok(sa) = text.parse::<SocketAddr>() {
        sa.ip()
    } else {
        text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?
    };
    Some(ip.to_canonical())
}

fn field(path: &str, name: &str) -> String {
    crate::config::error::join(path, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(items: &[&str]) -> CidrList {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        CidrList::parse("t", &items).unwrap()
    }

    fn policy(trusted: &[&str]) -> ClientIpPolicy {
        let s = ClientIpSettings {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            ..ClientIpSettings::default()
        };
        ClientIpPolicy::compile("client_ip", &s).unwrap()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_ignores_the_header() {
        let p = policy(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.9"]);
        assert_eq!(p.client_ip(ip("198.51.100.7"), &h), ip("198.51.100.7"));
        // No trusted proxies at all: same.
        let none = policy(&[]);
        assert_eq!(none.client_ip(ip("10.1.1.1"), &h), ip("10.1.1.1"));
        assert_eq!(
            ClientIpPolicy::default().client_ip(ip("10.1.1.1"), &h),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn trusted_chain_of_several_proxies() {
        // client → CDN edge (192.0.2.0/24) → LB (10.0.0.0/8) → us
        let p = policy(&["10.0.0.0/8", "192.0.2.0/24"]);
        let h = xff(&["203.0.113.9, 192.0.2.10, 10.0.0.5"]);
        assert_eq!(p.client_ip(ip("10.0.0.6"), &h), ip("203.0.113.9"));
        // Peer trusted, header absent: the peer.
        assert_eq!(
            p.client_ip(ip("10.0.0.6"), &HeaderMap::new()),
            ip("10.0.0.6")
        );
        // Every entry trusted: the leftmost.
        let h = xff(&["10.9.9.9, 192.0.2.10"]);
        assert_eq!(p.client_ip(ip("10.0.0.6"), &h), ip("10.9.9.9"));
    }

    #[test]
    fn spoofed_leftmost_entries_are_ignored() {
        let p = policy(&["10.0.0.0/8"]);
        // The client sent "1.1.1.1, 10.0.0.99" itself; our LB appended its real address.
        let h = xff(&["1.1.1.1, 10.0.0.99, 203.0.113.9"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn several_header_lines_are_one_list() {
        let p = policy(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.9, 10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        let h = xff(&["1.1.1.1", "203.0.113.9", "10.0.0.5"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn ipv6_and_ipv4_mapped() {
        let p = policy(&["2001:db8:cd0::/48", "10.0.0.0/8"]);
        let h = xff(&["2001:db8:1::7, [2001:db8:cd0::2]:443"]);
        assert_eq!(p.client_ip(ip("2001:db8:cd0::1"), &h), ip("2001:db8:1::7"));
        // A dual-stack listener reports an IPv4 LB as ::ffff:10.0.0.1: still trusted, and the
        // answer is plain IPv4.
        let h = xff(&["::ffff:203.0.113.9"]);
        assert_eq!(p.client_ip(ip("::ffff:10.0.0.1"), &h), ip("203.0.113.9"));
        assert_eq!(
            p.client_ip(ip("::ffff:198.51.100.1"), &h),
            ip("198.51.100.1")
        );
        // Brackets without port, IPv4 with port.
        let h = xff(&["[2001:db8:1::8]"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("2001:db8:1::8"));
        let h = xff(&["203.0.113.9:5678"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // A mapped CIDR is the IPv4 range; ::/0 does not cover IPv4.
        let l = list(&["::ffff:192.0.2.0/120", "::/0"]);
        assert!(l.contains(ip("192.0.2.77")));
        assert!(!l.contains(ip("198.51.100.1")));
        assert!(l.contains(ip("2001:db8::1")));
        assert_eq!(l.cidrs()[0].to_string(), "192.0.2.0/24");
    }

    #[test]
    fn bad_entries_stop_the_walk() {
        let p = policy(&["10.0.0.0/8"]);
        // Garbage right after the peer: nobody vouched for anything, the peer is the client.
        let h = xff(&["203.0.113.9, unknown"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // Garbage further left: the last good (trusted) address.
        let h = xff(&["203.0.113.9, _hidden, 10.0.0.7"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.7"));
        // Empty entries are skipped, not garbage.
        let h = xff(&[" 203.0.113.9 ,, 10.0.0.7, "]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // Bytes that are not text.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9, \xff\xfe").unwrap(),
        );
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // Zone ids, junk ports.
        let h = xff(&["fe80::1%eth0"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        let h = xff(&["203.0.113.9:99999"]);
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn another_header_name() {
        let s = ClientIpSettings {
            trusted_proxies: vec!["10.0.0.0/8".into()],
            header: "X-Real-IP".into(),
        };
        let p = ClientIpPolicy::compile("client_ip", &s).unwrap();
        let mut h = xff(&["1.1.1.1"]);
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.9"));
        assert_eq!(p.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        let bad = ClientIpSettings {
            trusted_proxies: vec!["10.0.0.0/8".into(), "nope".into()],
            header: "bad header".into(),
        };
        let errs = ClientIpPolicy::compile("client_ip", &bad).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["client_ip.trusted_proxies[1]", "client_ip.header"]);
    }

    #[test]
    fn cidr_edge_cases() {
        let all4 = list(&["0.0.0.0/0"]);
        assert!(all4.contains(ip("0.0.0.0")));
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::1")));
        let all6 = list(&["::/0"]);
        assert!(all6.contains(ip("::")));
        assert!(all6.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")));
        assert!(!all6.contains(ip("10.0.0.1")));

        let host = list(&["192.0.2.1/32", "2001:db8::1/128", "::1", "198.51.100.5"]);
        assert!(host.contains(ip("192.0.2.1")));
        assert!(!host.contains(ip("192.0.2.0")));
        assert!(!host.contains(ip("192.0.2.2")));
        assert!(host.contains(ip("2001:db8::1")));
        assert!(!host.contains(ip("2001:db8::2")));
        assert!(host.contains(ip("::1")));
        assert!(host.contains(ip("198.51.100.5")));
        assert!(!host.contains(ip("198.51.100.4")));

        let nets = list(&["10.0.0.0/8", "2001:db8::/32", " 172.16.0.0/12 "]);
        assert!(nets.contains(ip("10.255.255.255")));
        assert!(!nets.contains(ip("11.0.0.0")));
        assert!(nets.contains(ip("172.31.0.1")));
        assert!(!nets.contains(ip("172.32.0.1")));
        assert!(nets.contains(ip("2001:db8:ffff::1")));
        assert!(!nets.contains(ip("2001:db9::1")));
        assert!(!CidrList::default().contains(ip("10.0.0.1")));
        assert!(CidrList::default().is_empty());
        assert!(!nets.is_empty());

        let items: Vec<String> = [
            "10.0.0.0/8",
            "10.0.0.1/8",
            "::1/129",
            "1.2.3.4/33",
            "x",
            "1.2.3.4/",
            "2001:db8::1/32",
            "1.2.3.4/-1",
            "1.2.3.4/300",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let errs = CidrList::parse("flood.allow", &items).unwrap_err();
        let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "flood.allow[1]: `10.0.0.1/8` has host bits set after the prefix; did you mean 10.0.0.0/8?",
                "flood.allow[2]: prefix length /129 is longer than the 128 bits of the address",
                "flood.allow[3]: prefix length /33 is longer than the 32 bits of the address",
                "flood.allow[4]: `x` is not an IP address or CIDR, e.g. 10.0.0.0/8, 192.0.2.1 or 2001:db8::/32",
                "flood.allow[5]: `1.2.3.4/` is not an IP address or CIDR, e.g. 10.0.0.0/8, 192.0.2.1 or 2001:db8::/32",
                "flood.allow[6]: `2001:db8::1/32` has host bits set after the prefix; did you mean 2001:db8::/32?",
                "flood.allow[7]: `1.2.3.4/-1` is not an IP address or CIDR, e.g. 10.0.0.0/8, 192.0.2.1 or 2001:db8::/32",
                "flood.allow[8]: prefix length /300 is longer than the 32 bits of the address",
            ]
        );
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let l = list(&[
            "10.0.0.0/9",
            "10.128.0.0/9",
            "10.1.0.0/16",
            "192.0.2.0/24",
            "255.255.255.255",
        ]);
        assert_eq!(l.v4.len(), 3, "{:?}", l.v4);
        assert!(l.contains(ip("10.200.0.1")));
        assert!(l.contains(ip("255.255.255.255")));
        assert!(!l.contains(ip("192.0.3.0")));
        let l = list(&["::/1", "8000::/1"]);
        assert_eq!(l.v6, vec![(0, u128::MAX)]);
    }

    #[test]
    fn cidr_contains_agrees_with_list() {
        let c = Cidr::parse("2001:db8:80::/41").unwrap();
        assert_eq!(c.prefix_len(), 41);
        assert_eq!(c.network(), ip("2001:db8:80::"));
        assert!(c.contains(ip("2001:db8:ff::1")));
        assert!(!c.contains(ip("2001:db8:100::")));
        let c = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("::ffff:10.2.3.4")));
    }
}
