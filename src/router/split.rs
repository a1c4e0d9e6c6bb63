//! Canary splits: which backend label selector a proxied request uses. Rules are checked in
//! order and the first that takes the request wins; a request no rule takes uses the route's
//! `labels`. Picks a selector only; choosing a backend is the upstream's job.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::HeaderName;

use crate::config::{self as cfg, FieldError};

use super::hash::stable_hash;
use super::predicate::{cookie_values, Conditions};
use super::RequestHead;

/// A route's compiled `split`, `labels` and `sticky`.
#[derive(Debug, Clone, Default)]
pub struct Split {
    rules: Vec<Rule>,
    /// One selector per rule, then the route's `labels`.
    targets: Vec<BTreeMap<String, String>>,
    sticky: Option<StickyKey>,
}

#[derive(Debug, Clone)]
struct Rule {
    when: Option<Conditions>,
    /// `[from, to)` within `[0, 100)`; weighted rules take consecutive slices in rule order.
    slice: Option<(f64, f64)>,
}

#[derive(Debug, Clone)]
enum StickyKey {
    Cookie(Box<str>),
    Header(HeaderName),
    ClientIp,
}

/// Slack for fractional weights that add up to 100 in decimal but not in binary.
const EPSILON: f64 = 1e-9;

impl Split {
    /// Compiles `split`, `labels` and `sticky` of route `at` (`routes[i]`).
    pub(crate) fn compile(
        route: &cfg::Route,
        at: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<Split> {
        let before = errors.len();
        if route.upstream.is_none() {
            for (field, used) in [
                ("split", !route.split.is_empty()),
                ("labels", !route.labels.is_empty()),
                ("sticky", route.sticky.is_some()),
            ] {
                if used {
                    errors.push(FieldError::new(
                        format!("{at}.{field}"),
                        format!("`{field}` needs `upstream`"),
                    ));
                }
            }
        }
        let mut rules = Vec::with_capacity(route.split.len());
        let mut targets = Vec::with_capacity(route.split.len() + 1);
        let mut acc = 0.0;
        for (j, rule) in route.split.iter().enumerate() {
            let rule_at = format!("{at}.split[{j}]");
            let when = rule
                .when
                .as_ref()
                .map(|w| Conditions::for_split(w, &format!("{rule_at}.when"), errors));
            let slice = rule.weight.map(|w| {
                if !(0.0..=100.0).contains(&w) {
                    errors.push(FieldError::new(
                        format!("{rule_at}.weight"),
                        format!("weight {w} is outside 0–100 (a percentage)"),
                    ));
                }
                let from = acc;
                acc += w;
                (from, acc)
            });
            rules.push(Rule { when, slice });
            targets.push(rule.labels.clone());
        }
        if acc > 100.0 + EPSILON {
            errors.push(FieldError::new(
                format!("{at}.split"),
                format!("split weights add up to {acc}; at most 100"),
            ));
        }
        targets.push(route.labels.clone());
        let sticky = route
            .sticky
            .as_ref()
            .and_then(|s| sticky_key(s, &format!("{at}.sticky"), errors));
        (errors.len() == before).then_some(Split {
            rules,
            targets,
            sticky,
        })
    }

    /// Label selectors, one per rule in order, then the route's default `labels` last. An empty
    /// selector means every backend of the upstream.
    pub fn targets(&self) -> &[BTreeMap<String, String>] {
        &self.targets
    }

    /// Index into [`Split::targets`] for this request: the first rule whose `when` holds and,
    /// if weighted, whose slice holds the request's draw; else the default. The draw is one
    /// number in `[0, 100)` per request: from the sticky key's hash when the route is sticky
    /// and the key is present, otherwise random. `client_ip` is read only for
    /// `sticky.client_ip`.
    pub fn choose(&self, req: &RequestHead<'_>, client_ip: Option<IpAddr>) -> usize {
        let mut draw = None;
        for (k, rule) in self.rules.iter().enumerate() {
            if let Some(when) = &rule.when {
                if !when.holds(req) {
                    continue;
                }
            }
            match rule.slice {
                None => return k,
                Some((from, to)) => {
                    let r = *draw.get_or_insert_with(|| self.draw(req, client_ip));
                    if from <= r && r < to {
                        return k;
                    }
                }
            }
        }
        self.rules.len()
    }

    fn draw(&self, req: &RequestHead<'_>, client_ip: Option<IpAddr>) -> f64 {
        let hash = match &self.sticky {
            None => None,
            Some(StickyKey::Cookie(name)) => {
                cookie_values(req.headers, name).next().map(stable_hash)
            }
            Some(StickyKey::Header(name)) => {
                req.headers.get(name).map(|v| stable_hash(v.as_bytes()))
            }
            Some(StickyKey::ClientIp) => client_ip.map(|ip| match ip {
                IpAddr::V4(v4) => stable_hash(&v4.octets()),
                IpAddr::V6(v6) => stable_hash(&v6.octets()),
            }),
        };
        match hash {
            // The top 53 bits as a uniform fraction in [0, 1).
            Some(h) => (h >> 11) as f64 / (1u64 << 53) as f64 * 100.0,
            None => fastrand::f64() * 100.0,
        }
    }
}

fn sticky_key(s: &cfg::Sticky, at: &str, errors: &mut Vec<FieldError>) -> Option<StickyKey> {
    let count = usize::from(s.cookie.is_some())
        + usize::from(s.header.is_some())
        + usize::from(s.client_ip);
    if count != 1 {
        errors.push(FieldError::new(
            at,
            "expected exactly one of cookie, header, client_ip",
        ));
        return None;
    }
    if let Some(c) = &s.cookie {
        if c.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.cookie"),
                "cookie name must not be empty",
            ));
            return None;
        }
        return Some(StickyKey::Cookie(c.as_str().into()));
    }
    if let Some(h) = &s.header {
        return match HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => Some(StickyKey::Header(name)),
            Err(_) => {
                errors.push(FieldError::new(
                    format!("{at}.header"),
                    format!("`{h}` is not a valid header name"),
                ));
                None
            }
        };
    }
    Some(StickyKey::ClientIp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};

    fn split(yaml: &str) -> Split {
        let route: cfg::Route = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let s = Split::compile(&route, "routes[0]", &mut errs);
        assert_eq!(errs, vec![]);
        s.unwrap()
    }

    fn errors(yaml: &str) -> Vec<(String, String)> {
        let route: cfg::Route = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        assert!(Split::compile(&route, "routes[0]", &mut errs).is_none());
        errs.into_iter().map(|e| (e.path, e.message)).collect()
    }

    fn head<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> RequestHead<'a> {
        RequestHead {
            method: &Method::GET,
            host: None,
            path: "/",
            query,
            headers,
        }
    }

    fn counts(s: &Split, n: usize, mut req: impl FnMut(usize) -> usize) -> Vec<usize> {
        let mut c = vec![0; s.targets().len()];
        for i in 0..n {
            c[req(i)] += 1;
        }
        c
    }

    #[test]
    fn weights_hold_within_three_percent() {
        let s = split(
            "{name: r, upstream: u, labels: {v: stable},
              split: [{weight: 10, labels: {v: canary}}, {weight: 25.5, labels: {v: beta}}]}",
        );
        assert_eq!(s.targets().len(), 3);
        assert_eq!(s.targets()[1]["v"], "beta");
        assert_eq!(s.targets()[2]["v"], "stable");
        let h = HeaderMap::new();
        let n = 10_000;
        let c = counts(&s, n, |_| s.choose(&head(&h, None), None));
        for (got, want) in c.iter().zip([10.0, 25.5, 64.5]) {
            let pct = *got as f64 * 100.0 / n as f64;
            assert!((pct - want).abs() <= 3.0, "got {pct}% for {want}%: {c:?}");
        }
    }

    #[test]
    fn when_rules_come_first_and_unweighted_rules_always_take() {
        let s = split(
            "{name: r, upstream: u,
              split: [{when: {headers: {x-canary: '1'}}, labels: {v: canary}},
                      {when: {query: {beta: {present: true}}}, weight: 50, labels: {v: beta}},
                      {labels: {v: all}}]}",
        );
        let mut h = HeaderMap::new();
        assert_eq!(s.choose(&head(&h, None), None), 2);
        let c = counts(&s, 4000, |_| s.choose(&head(&h, Some("beta")), None));
        assert_eq!(c[0] + c[3], 0);
        assert!((1800..=2200).contains(&c[1]), "{c:?}");
        h.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(s.choose(&head(&h, Some("beta")), None), 0);
    }

    #[test]
    fn sticky_split_is_stable_per_key() {
        let s = split(
            "{name: r, upstream: u, sticky: {cookie: uid},
              split: [{weight: 30, labels: {v: canary}}]}",
        );
        let n = 5000;
        let with_cookie = |i: usize| {
            let mut h = HeaderMap::new();
            h.insert(
                "cookie",
                HeaderValue::from_str(&format!("x=1; uid=user-{i}")).unwrap(),
            );
            h
        };
        let first: Vec<usize> = (0..n)
            .map(|i| s.choose(&head(&with_cookie(i), None), None))
            .collect();
        for _ in 0..3 {
            for (i, &want) in first.iter().enumerate().step_by(7) {
                assert_eq!(
                    s.choose(&head(&with_cookie(i), None), None),
                    want,
                    "user-{i} moved"
                );
            }
        }
        // Different keys still spread by the weights.
        let canary = first.iter().filter(|&&t| t == 0).count() as f64 * 100.0 / n as f64;
        assert!((canary - 30.0).abs() <= 3.0, "{canary}%");
        // Without the key the draw is random: both sides show up.
        let h = HeaderMap::new();
        let c = counts(&s, 1000, |_| s.choose(&head(&h, None), None));
        assert!(c[0] > 200 && c[1] > 600, "{c:?}");
    }

    #[test]
    fn sticky_by_header_and_client_ip() {
        let s = split("{name: r, upstream: u, sticky: {header: X-User}, split: [{weight: 50, labels: {v: c}}]}");
        let mut sides = [0; 2];
        for i in 0..200 {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_str(&i.to_string()).unwrap());
            let t = s.choose(&head(&h, None), None);
            assert!((0..20).all(|_| s.choose(&head(&h, None), None) == t));
            sides[t] += 1;
        }
        assert!(sides[0] > 50 && sides[1] > 50, "{sides:?}");

        let s = split("{name: r, upstream: u, sticky: {client_ip: true}, split: [{weight: 50, labels: {v: c}}]}");
        let h = HeaderMap::new();
        let mut sides = [0; 2];
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let t = s.choose(&head(&h, None), Some(ip));
            assert!((0..20).all(|_| s.choose(&head(&h, None), Some(ip)) == t));
            sides[t] += 1;
        }
        assert!(sides[0] > 50 && sides[1] > 50, "{sides:?}");
    }

    #[test]
    fn no_split_means_default_labels() {
        let s = split("{name: r, upstream: u, labels: {zone: a}}");
        assert_eq!(s.targets().len(), 1);
        assert_eq!(s.choose(&head(&HeaderMap::new(), None), None), 0);
    }

    #[test]
    fn validation() {
        let e = errors(
            "{name: r, upstream: u, sticky: {cookie: a, client_ip: true},
              split: [{weight: 70, labels: {}}, {weight: -1, labels: {}}, {weight: 120, labels: {}},
                      {when: {headers: {x: {regex: '('}}}, labels: {}}]}",
        );
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].split[1].weight",
                "routes[0].split[2].weight",
                "routes[0].split[3].when.headers.x.regex",
                "routes[0].split",
                "routes[0].sticky",
            ]
        );
        assert!(e[3].1.contains("189"), "{}", e[3].1);

        let e = errors(
            "{name: r, upstream: u, split: [{weight: 60, labels: {}}, {weight: 40.5, labels: {}}]}",
        );
        assert_eq!(
            e,
            [(
                "routes[0].split".to_string(),
                "split weights add up to 100.5; at most 100".to_string()
            )]
        );
        let e = errors("{name: r, upstream: u, sticky: {}}");
        assert_eq!(e[0].0, "routes[0].sticky");
        let e = errors("{name: r, upstream: u, sticky: {header: 'a b'}}");
        assert_eq!(e[0].0, "routes[0].sticky.header");
        let e = errors("{name: r, respond: {}, split: [{labels: {}}], sticky: {client_ip: true}}");
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["routes[0].split", "routes[0].sticky"]);
        assert_eq!(e[0].1, "`split` needs `upstream`");
        // Weights that add up to exactly 100 are fine, fractions included.
        split("{name: r, upstream: u, split: [{weight: 33.3, labels: {}}, {weight: 66.7, labels: {}}]}");
    }
}
