//! The request key of `balance: hash` (`hash_on:`), and the hash functions behind it.
//!
//! Runs on the request path: reads borrowed header bytes, hashes them with FNV-1a, never
//! allocates.

use std::net::IpAddr;

use http::header::{HeaderName, COOKIE};

/// What `hash_on:` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HashOn {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
    Path,
}

impl HashOn {
    /// Parses `header:NAME`, `cookie:NAME`, `client_ip` or `path`.
    pub fn parse(s: &str) -> Result<HashOn, String> {
        const EXPECTED: &str = "expected `header:NAME`, `cookie:NAME`, `client_ip` or `path`";
        if s == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        if s == "path" {
            return Ok(HashOn::Path);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashOn::Header)
                .map_err(|_| format!("`{name}` is not a valid header name; {EXPECTED}"));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            let name = name.trim();
            if name.is_empty() || name.contains([';', '=', ' ', ',']) {
                return Err(format!("`{name}` is not a valid cookie name; {EXPECTED}"));
            }
            return Ok(HashOn::Cookie(name.to_string()));
        }
        Err(format!("`{s}` is not a hash key; {EXPECTED}"))
    }

    /// The hash of this request's key, `None` when the request does not carry it.
    pub fn key(&self, req: &http::request::Parts, client_ip: Option<IpAddr>) -> Option<u64> {
        match self {
            HashOn::Header(name) => req.headers.get(name).map(|v| fnv1a(v.as_bytes())),
            HashOn::Cookie(name) => cookie(req, name).map(fnv1a),
            HashOn::ClientIp => client_ip.map(|ip| match ip {
                IpAddr::V4(v4) => fnv1a(&v4.octets()),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    // The same client over a v4-mapped socket hashes like its v4 address.
                    Some(v4) => fnv1a(&v4.octets()),
                    None => fnv1a(&v6.octets()),
                },
            }),
            HashOn::Path => Some(fnv1a(req.uri.path().as_bytes())),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` header(s), first occurrence.
fn cookie<'r>(req: &'r http::request::Parts, name: &str) -> Option<&'r [u8]> {
    for header in req.headers.get_all(COOKIE) {
        for pair in header.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if &pair[..eq] == name.as_bytes() {
                let value = pair[eq + 1..].trim_ascii();
                // RFC 6265 allows a quoted value; the quotes are not part of it.
                let value = value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value);
                return Some(value);
            }
        }
    }
    None
}

/// 64-bit FNV-1a: fast, stable across processes and releases (unlike std's `RandomState`).
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A strong 64-bit finalizer (splitmix64). FNV's low bits avalanche poorly; rendezvous scores
/// are computed as `mix(key ^ backend_seed)`.
#[inline]
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn parses_the_four_forms() {
        assert_eq!(
            HashOn::parse("header:X-User"),
            Ok(HashOn::Header(HeaderName::from_static("x-user")))
        );
        assert_eq!(
            HashOn::parse("cookie:sid"),
            Ok(HashOn::Cookie("sid".into()))
        );
        assert_eq!(HashOn::parse("client_ip"), Ok(HashOn::ClientIp));
        assert_eq!(HashOn::parse("path"), Ok(HashOn::Path));
        assert!(HashOn::parse("header:").is_err());
        assert!(HashOn::parse("cookie:").is_err());
        assert!(HashOn::parse("query:x").is_err());
        assert!(HashOn::parse("ip").is_err());
    }

    #[test]
    fn keys_come_from_the_request() {
        let r = parts(
            "/a/b?x=1",
            &[
                ("x-user", "alice"),
                ("cookie", "a=1; sid=xyz"),
                ("cookie", "sid=later"),
            ],
        );
        let h = HashOn::parse("header:X-User").unwrap();
        assert_eq!(h.key(&r, None), Some(fnv1a(b"alice")));
        let c = HashOn::parse("cookie:sid").unwrap();
        assert_eq!(c.key(&r, None), Some(fnv1a(b"xyz")));
        let c = HashOn::parse("cookie:a").unwrap();
        assert_eq!(c.key(&r, None), Some(fnv1a(b"1")));
        let missing = HashOn::parse("cookie:nope").unwrap();
        assert_eq!(missing.key(&r, None), None);
        let p = HashOn::Path;
        assert_eq!(p.key(&r, None), Some(fnv1a(b"/a/b")));
        let ip = HashOn::ClientIp;
        assert_eq!(ip.key(&r, None), None);
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip.key(&r, Some(v4)), ip.key(&r, Some(mapped)));
        assert!(ip.key(&r, Some(v4)).is_some());
        let no_header = parts("/", &[]);
        assert_eq!(h.key(&no_header, None), None);
    }

    #[test]
    fn quoted_cookie_values_are_unquoted() {
        let r = parts("/", &[("cookie", "sid=\"xyz\"")]);
        let c = HashOn::parse("cookie:sid").unwrap();
        assert_eq!(c.key(&r, None), Some(fnv1a(b"xyz")));
    }
}
