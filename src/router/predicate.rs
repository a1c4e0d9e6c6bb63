//! The conditions of a route besides host and path — methods, headers, query parameters and
//! cookies — and of a split rule's `when`. Compiled at load; evaluated on the request head
//! without allocating unless a query value is percent-encoded.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::header::COOKIE;
use http::{HeaderName, Method};
use regex::bytes::Regex;

use crate::config::{FieldError, RouteMatch, SplitWhen, ValueMatch};

use super::RequestHead;

/// One compiled [`ValueMatch`].
#[derive(Debug, Clone)]
pub(crate) enum ValueMatcher {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    /// Unanchored; runs on bytes so non-UTF-8 header values are matched, not skipped.
    Regex(Regex),
    /// `true`: present with any value; `false`: absent.
    Present(bool),
}

impl ValueMatcher {
    /// Compiles `v`; errors are reported at `at` (the key's path) or `{at}.regex`.
    pub(crate) fn compile(v: &ValueMatch, at: &str, errors: &mut Vec<FieldError>) -> Option<Self> {
        let spec = match v {
            ValueMatch::Exact(s) => return Some(Self::Exact(s.as_bytes().into())),
            ValueMatch::Spec(spec) => spec,
        };
        let set = [
            spec.exact.is_some(),
            spec.prefix.is_some(),
            spec.contains.is_some(),
            spec.regex.is_some(),
            spec.present.is_some(),
        ];
        if set.iter().filter(|&&b| b).count() != 1 {
            errors.push(FieldError::new(
                at,
                "expected exactly one of exact, prefix, contains, regex, present",
            ));
            return None;
        }
        if let Some(s) = &spec.contains {
            // A literal regex: the regex crate's substring search (memchr) does the work.
            return Some(Self::Regex(
                Regex::new(&regex::escape(s)).expect("an escaped literal compiles"),
            ));
        }
        if let Some(s) = &spec.exact {
            return Some(Self::Exact(s.as_bytes().into()));
        }
        if let Some(s) = &spec.prefix {
            return Some(Self::Prefix(s.as_bytes().into()));
        }
        if let Some(present) = spec.present {
            return Some(Self::Present(present));
        }
        let re = spec.regex.as_deref().unwrap_or_default();
        match Regex::new(re) {
            Ok(re) => Some(Self::Regex(re)),
            Err(e) => {
                errors.push(FieldError::new(
                    format!("{at}.regex"),
                    crate::config::error::regex_message(&e),
                ));
                None
            }
        }
    }

    /// Whether the values found for one key satisfy this matcher: any value matching is
    /// enough; `present` looks only at whether there is one.
    fn holds<V: AsRef<[u8]>>(&self, mut values: impl Iterator<Item = V>) -> bool {
        match self {
            Self::Present(want) => values.next().is_some() == *want,
            Self::Exact(x) => values.any(|v| v.as_ref() == &x[..]),
            Self::Prefix(x) => values.any(|v| v.as_ref().starts_with(x)),
            Self::Regex(re) => values.any(|v| re.is_match(v.as_ref())),
        }
    }
}

/// Every condition must hold. Empty conditions always hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Conditions {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(Box<str>, ValueMatcher)>,
    cookies: Vec<(Box<str>, ValueMatcher)>,
}

impl Conditions {
    /// Methods, headers, query and cookies of a route's `match` (`at` = `routes[i].match`).
    pub(crate) fn for_route(m: &RouteMatch, at: &str, errors: &mut Vec<FieldError>) -> Self {
        let mut methods = Vec::with_capacity(m.methods.len());
        for (k, raw) in m.methods.iter().enumerate() {
            match Method::from_bytes(raw.trim().to_ascii_uppercase().as_bytes()) {
                Ok(method) if !raw.trim().is_empty() => methods.push(method),
                _ => errors.push(FieldError::new(
                    format!("{at}.methods[{k}]"),
                    format!("`{raw}` is not an HTTP method"),
                )),
            }
        }
        Self {
            methods,
            headers: headers(&m.headers, &format!("{at}.headers"), errors),
            query: named(&m.query, &format!("{at}.query"), errors),
            cookies: named(&m.cookies, &format!("{at}.cookies"), errors),
        }
    }

    /// A split rule's `when` (`at` = `routes[i].split[j].when`).
    pub(crate) fn for_split(w: &SplitWhen, at: &str, errors: &mut Vec<FieldError>) -> Self {
        Self {
            methods: Vec::new(),
            headers: headers(&w.headers, &format!("{at}.headers"), errors),
            query: named(&w.query, &format!("{at}.query"), errors),
            cookies: named(&w.cookies, &format!("{at}.cookies"), errors),
        }
    }

    /// Cheapest checks first.
    #[inline]
    pub(crate) fn holds(&self, req: &RequestHead<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(req.method))
            && self
                .headers
                .iter()
                .all(|(name, m)| m.holds(req.headers.get_all(name).iter().map(|v| v.as_bytes())))
            && self
                .query
                .iter()
                .all(|(key, m)| m.holds(query_values(req.query, key)))
            && self
                .cookies
                .iter()
                .all(|(name, m)| m.holds(cookie_values(req.headers, name)))
    }
}

fn headers(
    map: &BTreeMap<String, ValueMatch>,
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<(HeaderName, ValueMatcher)> {
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        let key_at = format!("{at}.{name}");
        let header = HeaderName::from_bytes(name.as_bytes());
        if header.is_err() {
            errors.push(FieldError::new(
                &key_at,
                format!("`{name}` is not a valid header name"),
            ));
        }
        let matcher = ValueMatcher::compile(v, &key_at, errors);
        if let (Ok(h), Some(m)) = (header, matcher) {
            out.push((h, m));
        }
    }
    out
}

fn named(
    map: &BTreeMap<String, ValueMatch>,
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<(Box<str>, ValueMatcher)> {
    map.iter()
        .filter_map(|(name, v)| {
            Some((
                name.as_str().into(),
                ValueMatcher::compile(v, &format!("{at}.{name}"), errors)?,
            ))
        })
        .collect()
}

/// Values of `key` in a raw query string (`a=1&b=2&a=3`), percent- and `+`-decoded. A key
/// without `=` has the empty value.
pub(crate) fn query_values<'q>(
    query: Option<&'q str>,
    key: &'q str,
) -> impl Iterator<Item = Cow<'q, [u8]>> + 'q {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k).as_ref() == key.as_bytes()).then(|| decode(v))
        })
}

/// `application/x-www-form-urlencoded` decoding; borrows when there is nothing to decode.
/// A malformed `%` escape is kept as written.
fn decode(s: &str) -> Cow<'_, [u8]> {
    let b = s.as_bytes();
    if !b.iter().any(|&c| c == b'%' || c == b'+') {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Values of cookie `name` across all `Cookie` headers (`a=1; b=2`). Names are case-sensitive.
pub(crate) fn cookie_values<'h>(
    headers: &'h http::HeaderMap,
    name: &'h str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn req<'a>(
        method: &'a Method,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestHead<'a> {
        RequestHead {
            method,
            host: None,
            path: "/",
            query,
            headers,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn when(yaml: &str) -> Conditions {
        let m: RouteMatch = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let c = Conditions::for_route(&m, "m", &mut errs);
        assert_eq!(errs, vec![]);
        c
    }

    #[test]
    fn value_matchers() {
        let h = headers(&[("x-v", "Beta-2"), ("x-v", "gamma")]);
        let get = Method::GET;
        let r = req(&get, None, &h);
        assert!(
            when("headers: {X-V: gamma}").holds(&r),
            "any repeated value may match"
        );
        assert!(
            !when("headers: {x-v: beta-2}").holds(&r),
            "values are case-sensitive"
        );
        assert!(when("headers: {x-v: {prefix: Beta}}").holds(&r));
        assert!(!when("headers: {x-v: {prefix: beta}}").holds(&r));
        assert!(when("headers: {x-v: {regex: '^gam+a$'}}").holds(&r));
        assert!(!when("headers: {x-v: {regex: '^amma'}}").holds(&r));
        assert!(when("headers: {x-v: {exact: gamma}}").holds(&r));
        assert!(when("headers: {x-v: {present: true}}").holds(&r));
        assert!(!when("headers: {x-v: {present: false}}").holds(&r));
        assert!(when("headers: {x-missing: {present: false}}").holds(&r));
        assert!(!when("headers: {x-missing: {present: true}}").holds(&r));
        assert!(!when("headers: {x-missing: ''}").holds(&r));
        assert!(
            !when("headers: {x-v: gamma, x-w: '1'}").holds(&r),
            "all conditions must hold"
        );
    }

    #[test]
    fn methods() {
        let h = HeaderMap::new();
        let c = when("methods: [get, Post]");
        assert!(c.holds(&req(&Method::GET, None, &h)));
        assert!(c.holds(&req(&Method::POST, None, &h)));
        assert!(!c.holds(&req(&Method::DELETE, None, &h)));
        let purge = Method::from_bytes(b"PURGE").unwrap();
        assert!(when("methods: [purge]").holds(&req(&purge, None, &h)));
        assert!(when("{}").holds(&req(&Method::DELETE, None, &h)));
    }

    #[test]
    fn query() {
        let h = HeaderMap::new();
        let get = Method::GET;
        let q = |s| req(&get, Some(s), &h);
        assert!(when("query: {a: '1'}").holds(&q("a=1&b=2")));
        assert!(when("query: {b: '2'}").holds(&q("a=1&b=2")));
        assert!(
            when("query: {a: '3'}").holds(&q("a=1&b=2&a=3")),
            "repeated key: any value"
        );
        assert!(!when("query: {a: '2'}").holds(&q("a=1&b=2")));
        assert!(when("query: {q: hello world/é}").holds(&q("q=hello+world%2F%C3%A9")));
        assert!(when("query: {my key: x}").holds(&q("my%20key=x")));
        assert!(when("query: {flag: ''}").holds(&q("flag&x=1")));
        assert!(when("query: {flag: {present: true}}").holds(&q("x=1&flag")));
        assert!(when("query: {bad: '%zz%'}").holds(&q("bad=%zz%")));
        assert!(when("query: {x: {present: false}}").holds(&req(&get, None, &h)));
        assert!(!when("query: {x: {present: true}}").holds(&req(&get, None, &h)));
        assert!(when("query: {v: {regex: '^v[0-9]$'}}").holds(&q("v=v7")));
        assert!(!when("query: {v: {prefix: w}}").holds(&q("v=v7")));
    }

    #[test]
    fn cookies() {
        let h = headers(&[("cookie", "a=1; session=abc"), ("cookie", "canary=yes;x=")]);
        let get = Method::GET;
        let r = req(&get, None, &h);
        assert!(when("cookies: {session: abc}").holds(&r));
        assert!(
            when("cookies: {canary: 'yes', a: '1'}").holds(&r),
            "cookies from every header"
        );
        assert!(when("cookies: {x: ''}").holds(&r));
        assert!(
            !when("cookies: {Session: abc}").holds(&r),
            "names are case-sensitive"
        );
        assert!(when("cookies: {nope: {present: false}}").holds(&r));
        assert!(when("cookies: {session: {prefix: ab}}").holds(&r));
        assert_eq!(
            cookie_values(&h, "a").collect::<Vec<_>>(),
            vec![b"1".as_slice()]
        );
    }

    #[test]
    fn errors_have_paths() {
        let m: RouteMatch = serde_yaml::from_str(
            "methods: [GET, 'G T', '']
headers: {'bad name': x, x-a: {regex: '('}, x-b: {exact: a, prefix: b}, x-c: {}}
query: {q: {regex: '[z'}}
cookies: {c: {present: true, exact: x}}",
        )
        .unwrap();
        let mut errs = Vec::new();
        Conditions::for_route(&m, "routes[4].match", &mut errs);
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[4].match.methods[1]",
                "routes[4].match.methods[2]",
                "routes[4].match.headers.bad name",
                "routes[4].match.headers.x-a.regex",
                "routes[4].match.headers.x-b",
                "routes[4].match.headers.x-c",
                "routes[4].match.query.q.regex",
                "routes[4].match.cookies.c",
            ]
        );
        assert!(
            errs[3].message.starts_with("invalid regex:"),
            "{}",
            errs[3].message
        );
    }
}
