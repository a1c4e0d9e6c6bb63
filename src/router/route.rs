//! The compiled form of one `routes:` entry — what to do with a request once it matched — and
//! its compilation from config. Matching itself lives in the other modules.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::config::{self as cfg, FieldError, HeaderOps, WebSocket};

use super::host::{compile_hosts, HostPattern};
use super::path::{compile_path, PathCond};
use super::predicate::Conditions;
use super::rewrite::{LocationTemplate, PathRewrite};
use super::split::Split;

/// A route ready for requests. Built only by [`super::Router::compile`].
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in `routes:`; the last tie-breaker of precedence.
    pub index: usize,
    pub name: String,
    pub action: Action,
    /// Backend selection for `Action::Proxy`; a single default target otherwise.
    pub split: Split,
    /// Upstream path rewrite; only on proxy routes.
    pub rewrite: Option<PathRewrite>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub websocket: WebSocket,
    /// Request body cap in bytes (the route's `max_body`, else `http.max_body`).
    pub max_body: u64,
}

/// What a matched route does: exactly one of `upstream`, `redirect`, `respond`.
#[derive(Debug, Clone)]
pub enum Action {
    Proxy {
        upstream: String,
    },
    Redirect {
        status: u16,
        location: LocationTemplate,
    },
    /// Answered by the gateway itself, no upstream involved.
    Respond {
        status: u16,
        body: Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
}

/// Header edits the caller applies in the order remove → set (replace all values) → add
/// (append a value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn compile(ops: &HeaderOps, at: &str, errors: &mut Vec<FieldError>) -> Self {
        let mut remove = Vec::with_capacity(ops.remove.len());
        for (k, name) in ops.remove.iter().enumerate() {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => remove.push(h),
                Err(_) => errors.push(FieldError::new(
                    format!("{at}.remove[{k}]"),
                    format!("`{name}` is not a valid header name"),
                )),
            }
        }
        Self {
            remove,
            set: header_pairs(&ops.set, &format!("{at}.set"), errors),
            add: header_pairs(&ops.add, &format!("{at}.add"), errors),
        }
    }
}

/// Parses `name: value` pairs; a bad name or value is reported at `{at}.{name}`.
fn header_pairs(
    map: &BTreeMap<String, String>,
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        let h = HeaderName::from_bytes(name.as_bytes());
        let v = HeaderValue::from_str(value);
        match (h, v) {
            (Ok(h), Ok(v)) => out.push((h, v)),
            (Err(_), _) => errors.push(FieldError::new(
                format!("{at}.{name}"),
                format!("`{name}` is not a valid header name"),
            )),
            (_, Err(_)) => errors.push(FieldError::new(
                format!("{at}.{name}"),
                "header value must not hold control characters",
            )),
        }
    }
    out
}

/// How a route is found: its host patterns (empty: any host), path condition and the rest.
#[derive(Debug)]
pub(crate) struct Matcher {
    pub(crate) hosts: Vec<HostPattern>,
    pub(crate) path: PathCond,
    pub(crate) conditions: Conditions,
}

/// Compiles route `i`; every problem is pushed to `errors`, and `None` returned if there was any.
/// Route names are checked across routes by the caller.
pub(crate) fn compile(
    i: usize,
    r: &cfg::Route,
    default_max_body: u64,
    errors: &mut Vec<FieldError>,
) -> Option<(Route, Matcher)> {
    let before = errors.len();
    let at = format!("routes[{i}]");
    if r.name.trim().is_empty() {
        errors.push(FieldError::new(
            format!("{at}.name"),
            "route name must not be empty",
        ));
    }

    let match_at = format!("{at}.match");
    let hosts = compile_hosts(&r.matcher.hosts, &format!("{match_at}.hosts"), errors);
    let path = compile_path(&r.matcher, &match_at, errors);
    let conditions = Conditions::for_route(&r.matcher, &match_at, errors);

    let action = action(r, &at, errors);
    let split = Split::compile(r, &at, errors);
    let rewrite = r.rewrite.as_ref().and_then(|rw| {
        if r.upstream.is_none() {
            errors.push(FieldError::new(
                format!("{at}.rewrite"),
                "`rewrite` applies to proxied requests only; this route has no `upstream`",
            ));
            return None;
        }
        PathRewrite::compile(rw, &format!("{at}.rewrite"), errors)
    });
    let request_headers =
        HeaderEdits::compile(&r.request_headers, &format!("{at}.request_headers"), errors);
    let response_headers = HeaderEdits::compile(
        &r.response_headers,
        &format!("{at}.response_headers"),
        errors,
    );

    if errors.len() > before {
        return None;
    }
    let route = Route {
        index: i,
        name: r.name.clone(),
        action: action?,
        split: split?,
        rewrite: rewrite.flatten(),
        request_headers,
        response_headers,
        websocket: r.websocket.clone(),
        max_body: r.max_body.map_or(default_max_body, |b| b.0),
    };
    Some((
        route,
        Matcher {
            hosts,
            path: path?,
            conditions,
        },
    ))
}

fn action(r: &cfg::Route, at: &str, errors: &mut Vec<FieldError>) -> Option<Action> {
    let given: Vec<&str> = [
        r.upstream.as_ref().map(|_| "upstream"),
        r.redirect.as_ref().map(|_| "redirect"),
        r.respond.as_ref().map(|_| "respond"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() != 1 {
        let found = if given.is_empty() {
            "none".to_string()
        } else {
            given.join(", ")
        };
        errors.push(FieldError::new(
            at,
            format!("a route needs exactly one of upstream, redirect, respond (found {found})"),
        ));
        return None;
    }
    if let Some(upstream) = &r.upstream {
        if upstream.trim().is_empty() {
            errors.push(FieldError::new(
                format!("{at}.upstream"),
                "upstream name must not be empty",
            ));
            return None;
        }
        return Some(Action::Proxy {
            upstream: upstream.clone(),
        });
    }
    if let Some(red) = &r.redirect {
        let status_ok = matches!(red.status, 301 | 302 | 303 | 307 | 308);
        if !status_ok {
            errors.push(FieldError::new(
                format!("{at}.redirect.status"),
                format!(
                    "{} is not a redirect status; use 301, 302, 303, 307 or 308",
                    red.status
                ),
            ));
        }
        let location = LocationTemplate::compile(red, &format!("{at}.redirect.location"), errors);
        return Some(Action::Redirect {
            status: red.status,
            location: location?,
        })
        .filter(|_| status_ok);
    }
    let resp = r.respond.as_ref()?;
    let status_ok = (100..=599).contains(&resp.status);
    if !status_ok {
        errors.push(FieldError::new(
            format!("{at}.respond.status"),
            format!("{} is not an HTTP status (100–599)", resp.status),
        ));
    }
    let headers = header_pairs(&resp.headers, &format!("{at}.respond.headers"), errors);
    status_ok.then(|| Action::Respond {
        status: resp.status,
        body: Bytes::from(resp.body.clone()),
        headers,
    })
}
