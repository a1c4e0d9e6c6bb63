//! IP allow and deny lists: `ip_rules:` for every route, `routes[].ip_rules` for one. Checked
//! first after routing, on the client address (`client_ip`, trusted proxies honoured), before
//! anything else spends work on the request. IPv4 and IPv6 CIDRs; IPv4-mapped IPv6 clients
//! are looked up as IPv4.
//!
//! Rules: a client in a deny list (global or the route's) is refused; with an allow list (the
//! route's if it has one, else the global one), a client outside it is refused. Deny wins.

use std::net::IpAddr;

use serde::Deserialize;

use super::client_ip::CidrList;
use crate::config::{error, FieldError};

/// The YAML form, global and per route.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpRulesSettings {
    /// Only these may pass (empty: everyone not denied).
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The compiled rules of one route: the global lists merged with its own.
#[derive(Debug, Clone, Default)]
pub struct IpRules {
    deny: CidrList,
    allow: CidrList,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVerdict {
    Denied,
    NotAllowed,
}

impl IpVerdict {
    pub fn code(self) -> &'static str {
        match self {
            IpVerdict::Denied => "ip_denied",
            IpVerdict::NotAllowed => "ip_not_allowed",
        }
    }
}

impl IpRules {
    /// `global` at `ip_rules`, `route` at `{route_path}.ip_rules`.
    pub fn compile(
        global: &IpRulesSettings,
        route: Option<(&str, &IpRulesSettings)>,
    ) -> Result<IpRules, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut list = |path: &str, items: &[String]| {
            CidrList::parse(path, items)
                .map_err(|e| errors.extend(e))
                .ok()
                .map(|l| l.cidrs().to_vec())
                .unwrap_or_default()
        };
        let mut deny = list("ip_rules.deny", &global.deny);
        let mut allow = list("ip_rules.allow", &global.allow);
        if let Some((path, r)) = route {
            deny.extend(list(&error::join(path, "ip_rules.deny"), &r.deny));
            let own = list(&error::join(path, "ip_rules.allow"), &r.allow);
            if !r.allow.is_empty() {
                allow = own;
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(IpRules {
            deny: CidrList::from_cidrs(deny),
            allow: CidrList::from_cidrs(allow),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// None: the client may pass. Two binary searches at most, no allocation.
    #[inline]
    pub fn check(&self, ip: IpAddr) -> Option<IpVerdict> {
        if self.deny.contains(ip) {
            return Some(IpVerdict::Denied);
        }
        if !self.allow.is_empty() && !self.allow.contains(ip) {
            return Some(IpVerdict::NotAllowed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allow: &[&str], deny: &[&str]) -> IpRulesSettings {
        IpRulesSettings {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_a_route_allow_list_replaces_the_global_one() {
        let global = settings(&["10.0.0.0/8", "2001:db8::/32"], &["10.6.6.0/24"]);
        let r = IpRules::compile(&global, None).unwrap();
        assert_eq!(r.check(ip("10.1.2.3")), None);
        assert_eq!(r.check(ip("::ffff:10.1.2.3")), None, "IPv4-mapped");
        assert_eq!(r.check(ip("2001:db8::1")), None);
        assert_eq!(r.check(ip("10.6.6.6")), Some(IpVerdict::Denied));
        assert_eq!(r.check(ip("192.0.2.1")), Some(IpVerdict::NotAllowed));

        let route = settings(&["192.0.2.0/24"], &["192.0.2.66"]);
        let r = IpRules::compile(&global, Some(("routes[0]", &route))).unwrap();
        assert_eq!(r.check(ip("192.0.2.1")), None);
        assert_eq!(r.check(ip("10.1.2.3")), Some(IpVerdict::NotAllowed));
        assert_eq!(r.check(ip("192.0.2.66")), Some(IpVerdict::Denied));
        assert_eq!(
            r.check(ip("10.6.6.6")),
            Some(IpVerdict::Denied),
            "global deny stays"
        );

        let open = IpRules::compile(&IpRulesSettings::default(), None).unwrap();
        assert!(open.is_empty());
        assert_eq!(open.check(ip("203.0.113.9")), None);
    }

    #[test]
    fn every_bad_entry_is_reported_with_its_path() {
        let bad = settings(&["10.0.0.0/33"], &["nope"]);
        let errs =
            IpRules::compile(&bad, Some(("routes[2]", &settings(&["::1/129"], &[])))).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "ip_rules.deny[0]",
                "ip_rules.allow[0]",
                "routes[2].ip_rules.allow[0]"
            ]
        );
    }
}
