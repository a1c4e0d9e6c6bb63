//! One `match:` condition on its own (the shape of a route's `match`), for policies that test
//! a request against each of their rules rather than pick one route: custom rules. Compiled
//! with the same parsers as routes, so a condition means the same thing in both places.

use regex::Regex;

use super::host::{compile_hosts, with_request_host, HostPattern};
use super::path::{compile_path, PathCond};
use super::predicate::Conditions;
use super::RequestHead;
use crate::config::{FieldError, RouteMatch};

#[derive(Debug)]
pub struct RequestMatcher {
    hosts: Vec<HostPattern>,
    path: Path,
    conditions: Conditions,
}

#[derive(Debug)]
enum Path {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl RequestMatcher {
    /// Errors are reported under `at` (e.g. `rules[2].match`).
    pub fn compile(m: &RouteMatch, at: &str, errors: &mut Vec<FieldError>) -> Option<Self> {
        let before = errors.len();
        let hosts = compile_hosts(&m.hosts, &format!("{at}.hosts"), errors);
        let path = match compile_path(m, at, errors) {
            Some(PathCond::Any) | None => Path::Any,
            Some(PathCond::Exact(p)) => Path::Exact(p),
            Some(PathCond::Prefix(p)) => Path::Prefix(p),
            // Checked by compile_path.
            Some(PathCond::Regex(re)) => Path::Regex(Regex::new(&re).ok()?),
        };
        let conditions = Conditions::for_route(m, at, errors);
        (errors.len() == before).then_some(RequestMatcher {
            hosts,
            path,
            conditions,
        })
    }

    pub fn matches(&self, req: &RequestHead<'_>) -> bool {
        let path_ok = match &self.path {
            Path::Any => true,
            Path::Exact(p) => req.path == p,
            Path::Prefix(p) => req.path.starts_with(p.as_str()),
            Path::Regex(re) => re.is_match(req.path),
        };
        path_ok && self.host_ok(req.host) && self.conditions.holds(req)
    }

    fn host_ok(&self, host: Option<&str>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(raw) = host else {
            return false;
        };
        with_request_host(raw, |h| {
            self.hosts.iter().any(|p| match p {
                HostPattern::Exact(x) => h == &**x,
                HostPattern::Suffix(s) => h
                    .strip_suffix(&**s)
                    .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            })
        })
    }
}
