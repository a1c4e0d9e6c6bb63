//! Routing: compiles the `routes:` of the config into a [`Router`] at load, and picks the
//! [`Route`] for each request. Owns matching, canary splits, path rewrites and header edits as
//! data; never does I/O, never picks a backend, and never allocates on the common path (a
//! request decided by an exact or prefix path). Everything is compiled and checked at load.
//!
//! # Route precedence
//!
//! A request is matched against routes in this order; the first route whose conditions all hold
//! wins. Declared order in `routes:` only breaks ties.
//!
//! 1. **Host.** Routes are grouped by the host patterns in `match.hosts`. The request's host
//!    (the `Host` header, else the URI authority; case-insensitive, port and trailing dot
//!    ignored, `[::1]:80` read as `::1`) is tried against:
//!    1. routes listing the exact name (`api.example.com`);
//!    2. routes listing a wildcard that covers it, longest suffix first: for `a.b.example.com`,
//!       `*.b.example.com` before `*.example.com`. A wildcard matches names of any depth under
//!       its suffix but not the suffix itself (`*.example.com` does not match `example.com`);
//!    3. routes without `hosts`, which match any host (and requests without one).
//!
//!    If no route of a group matches the rest of the request, the next group is tried.
//! 2. **Path**, within a host group:
//!    1. `path` (exact);
//!    2. `path_prefix`, longest prefix first. A prefix is a plain string prefix, as in nginx and
//!       Envoy: `/api` matches `/api`, `/api/x` and also `/apix` (write `/api/` to stop at the
//!       segment);
//!    3. `path_regex`, unanchored unless the pattern says `^…$`;
//!    4. routes with no path condition.
//! 3. **Ties** — routes of the same host group and path kind (same exact path, same prefix, or
//!    regexes that all match) — go in declared order. The first candidate whose other conditions
//!    (`methods`, `headers`, `query`, `cookies`) all hold is the route.
//!
//! Paths are matched as the client sent them, without percent-decoding or normalising.

mod hash;
mod host;
mod matcher;
mod path;
mod predicate;
mod rewrite;
mod route;
mod split;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use crate::config::{self as cfg, FieldError};

use host::HostIndex;
use path::{PathTable, PathTableBuilder};
use predicate::Conditions;

pub use matcher::RequestMatcher;
pub use rewrite::{LocationTemplate, PathRewrite};
pub use route::{Action, HeaderEdits, Route};
pub use split::Split;

/// What matching reads of a request. Borrowed, so building one costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    /// Raw `Host` header or URI authority; may carry a port and any case.
    pub host: Option<&'a str>,
    pub path: &'a str,
    /// Without the `?`.
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

impl<'a> RequestHead<'a> {
    /// Reads a request head. The host is the URI authority (without user info) when the
    /// request has one, otherwise the `Host` header.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        // An absolute-form target (`GET http://host/...`, and HTTP/2's :authority) names the
        // host; a Host header then does not count (RFC 9112 §3.2.2).
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h))
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            });
        Self {
            method: &parts.method,
            host,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        }
    }
}

/// The compiled routing table. Immutable; a config reload builds a new one.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Conditions besides host and path, by route index.
    conditions: Vec<Conditions>,
    hosts: HostIndex,
    /// Path tables by host group id.
    groups: Vec<PathTable>,
}

impl Router {
    /// Compiles routes in declared order. Reports every error at once, each with its field
    /// path (`routes[3].match.path_regex`, `routes[0].split[1].weight`). `default_max_body` is
    /// `http.max_body`, used by routes without their own `max_body`.
    pub fn compile(
        routes: &[cfg::Route],
        default_max_body: u64,
    ) -> Result<Router, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut names: HashMap<&str, usize> = HashMap::with_capacity(routes.len());
        let mut compiled = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            if let Some(&first) = names.get(r.name.as_str()) {
                errors.push(FieldError::new(
                    format!("routes[{i}].name"),
                    format!(
                        "duplicate route name `{}` (first used by routes[{first}])",
                        r.name
                    ),
                ));
            } else if !r.name.trim().is_empty() {
                names.insert(&r.name, i);
            }
            if let Some(c) = route::compile(i, r, default_max_body, &mut errors) {
                compiled.push(c);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut hosts = HostIndex::default();
        let mut builders: Vec<PathTableBuilder> = Vec::new();
        let mut out = Vec::with_capacity(compiled.len());
        let mut conditions = Vec::with_capacity(compiled.len());
        for (route, matcher) in compiled {
            let id = u32::try_from(route.index)
                .map_err(|_| vec![FieldError::new("routes", "too many routes")])?;
            let mut groups: Vec<u32> = if matcher.hosts.is_empty() {
                vec![hosts.catch_all_group()]
            } else {
                matcher.hosts.iter().map(|h| hosts.group_for(h)).collect()
            };
            // A host listed twice (or in two spellings) must not make a route a candidate twice.
            groups.sort_unstable();
            groups.dedup();
            builders.resize_with(hosts.group_count(), PathTableBuilder::default);
            for g in groups {
                builders[g as usize].add(id, &matcher.path);
            }
            conditions.push(matcher.conditions);
            out.push(route);
        }
        let groups = builders
            .into_iter()
            .map(|b| b.build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                vec![FieldError::new(
                    "routes",
                    format!("path regexes of one host group too large together: {e}"),
                )]
            })?;
        Ok(Router {
            routes: out,
            conditions,
            hosts,
            groups,
        })
    }

    /// The route for a request by the precedence in the [module docs](self), or `None`.
    #[inline]
    pub fn find(&self, req: &RequestHead<'_>) -> Option<&Route> {
        let id = self.hosts.find(req.host, |g| {
            self.groups[g as usize].find(req.path, |id| self.conditions[id as usize].holds(req))
        })?;
        Some(&self.routes[id as usize])
    }

    /// All routes in declared order (`routes()[r.index]` is `r`).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}
