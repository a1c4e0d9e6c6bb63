//! Router-level tests: precedence across host groups and path kinds, validation paths, and a
//! large generated table checked against a brute-force reference.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};

use super::*;

fn parse(yaml: &str) -> Vec<cfg::Route> {
    serde_yaml::from_str(yaml).expect("test YAML parses")
}

fn router(yaml: &str) -> Router {
    match Router::compile(&parse(yaml), 1 << 20) {
        Ok(r) => r,
        Err(e) => panic!("{e:?}"),
    }
}

fn errors(yaml: &str) -> Vec<FieldError> {
    Router::compile(&parse(yaml), 1 << 20).expect_err("config should be rejected")
}

/// The name of the route for `method uri` with `Host: host` (no Host header when `None`).
fn route_for(
    r: &Router,
    method: &str,
    host: Option<&str>,
    uri: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (parts, ()) = b.body(()).unwrap().into_parts();
    r.find(&RequestHead::from_parts(&parts))
        .map(|r| r.name.clone())
}

fn get(r: &Router, host: &str, uri: &str) -> Option<String> {
    route_for(r, "GET", Some(host), uri, &[])
}

#[test]
fn host_groups_go_exact_then_longest_wildcard_then_catch_all() {
    // Declared least specific first, so declared order cannot be what decides.
    let r = router(
        "
- {name: any, upstream: u, match: {path: /x}}
- {name: short, upstream: u, match: {hosts: ['*.example.com']}}
- {name: long, upstream: u, match: {hosts: ['*.b.example.com']}}
- {name: exact, upstream: u, match: {hosts: [a.b.example.com]}}
",
    );
    assert_eq!(get(&r, "a.b.example.com", "/x").as_deref(), Some("exact"));
    assert_eq!(get(&r, "c.b.example.com", "/x").as_deref(), Some("long"));
    assert_eq!(get(&r, "z.a.b.example.com", "/x").as_deref(), Some("long"));
    assert_eq!(get(&r, "b.example.com", "/x").as_deref(), Some("short"));
    assert_eq!(
        get(&r, "deep.er.c.example.com", "/x").as_deref(),
        Some("short")
    );
    assert_eq!(
        get(&r, "example.com", "/x").as_deref(),
        Some("any"),
        "wildcard skips the apex"
    );
    assert_eq!(get(&r, "example.com", "/y"), None);
    assert_eq!(
        route_for(&r, "GET", None, "/x", &[]).as_deref(),
        Some("any")
    );
    assert_eq!(route_for(&r, "GET", None, "/y", &[]), None);
}

#[test]
fn request_host_forms() {
    let r = router(
        "
- {name: a, upstream: u, match: {hosts: [Api.Example.com, '[::1]', 10.0.0.1]}}
- {name: any, upstream: u}
",
    );
    for host in [
        "api.example.com",
        "API.EXAMPLE.COM",
        "api.example.com:8080",
        "Api.Example.Com.",
        "[::1]:80",
        "[::1]",
        "10.0.0.1:443",
    ] {
        assert_eq!(get(&r, host, "/").as_deref(), Some("a"), "{host}");
    }
    for host in [
        "api.example.com.evil",
        "xapi.example.com",
        "[::2]",
        "10.0.0.10",
    ] {
        assert_eq!(get(&r, host, "/").as_deref(), Some("any"), "{host}");
    }
    // No Host header: the URI authority, without user info.
    assert_eq!(
        route_for(&r, "GET", None, "http://user:pw@API.example.com:81/x", &[]).as_deref(),
        Some("a")
    );
    assert_eq!(
        route_for(&r, "GET", None, "http://other.com/x", &[]).as_deref(),
        Some("any")
    );
}

#[test]
fn falls_through_to_less_specific_host_groups() {
    let r = router(
        "
- {name: any-api, upstream: u, match: {path_prefix: /api}}
- {name: any, upstream: u}
- {name: wild-static, upstream: u, match: {hosts: ['*.example.com'], path_prefix: /static}}
- {name: exact-api, upstream: u, match: {hosts: [www.example.com], path_prefix: /api, methods: [POST]}}
",
    );
    assert_eq!(
        route_for(&r, "POST", Some("www.example.com"), "/api/x", &[]).as_deref(),
        Some("exact-api")
    );
    // Path fails in the exact group, holds in the wildcard group.
    assert_eq!(
        get(&r, "www.example.com", "/static/a.css").as_deref(),
        Some("wild-static")
    );
    // Method fails in the exact group: the catch-all group's prefix route takes it.
    assert_eq!(
        get(&r, "www.example.com", "/api/x").as_deref(),
        Some("any-api")
    );
    // Nothing in either host group: the catch-all group.
    assert_eq!(get(&r, "www.example.com", "/home").as_deref(), Some("any"));
    assert_eq!(
        get(&r, "other.org", "/static/a.css").as_deref(),
        Some("any")
    );
}

#[test]
fn path_kinds_go_exact_then_longest_prefix_then_regex_then_none() {
    let r = router(
        r#"
- {name: none, upstream: u}
- {name: regex, upstream: u, match: {path_regex: '^/api/v[0-9]+/users'}}
- {name: prefix-short, upstream: u, match: {path_prefix: /api}}
- {name: prefix-long, upstream: u, match: {path_prefix: /api/v1/}}
- {name: exact, upstream: u, match: {path: /api/v1/users}}
"#,
    );
    assert_eq!(get(&r, "h", "/api/v1/users").as_deref(), Some("exact"));
    assert_eq!(
        get(&r, "h", "/api/v1/users/7").as_deref(),
        Some("prefix-long")
    );
    assert_eq!(
        get(&r, "h", "/api/v2/users").as_deref(),
        Some("prefix-short")
    );
    assert_eq!(
        get(&r, "h", "/apix").as_deref(),
        Some("prefix-short"),
        "string prefix"
    );
    assert_eq!(get(&r, "h", "/api").as_deref(), Some("prefix-short"));
    assert_eq!(get(&r, "h", "/ap").as_deref(), Some("none"));
    assert_eq!(
        get(&r, "h", "/api/v1/users?x=1").as_deref(),
        Some("exact"),
        "query is not part of the path"
    );

    let r = router(
        r#"
- {name: none, upstream: u}
- {name: regex, upstream: u, match: {path_regex: '^/v[0-9]+/'}}
- {name: prefix, upstream: u, match: {path_prefix: /v1/, methods: [POST]}}
"#,
    );
    assert_eq!(
        route_for(&r, "POST", Some("h"), "/v1/x", &[]).as_deref(),
        Some("prefix")
    );
    assert_eq!(
        get(&r, "h", "/v1/x").as_deref(),
        Some("regex"),
        "prefix's method fails: regex next"
    );
    assert_eq!(get(&r, "h", "/x/v1/").as_deref(), Some("none"));
}

#[test]
fn ties_go_in_declared_order_first_whose_conditions_hold() {
    let r = router(
        "
- {name: beta, upstream: u, match: {path_prefix: /app, headers: {x-beta: '1'}}}
- {name: post, upstream: u, match: {path_prefix: /app, methods: [post]}}
- {name: plain, upstream: u, match: {path_prefix: /app}}
- {name: shadowed, upstream: u, match: {path_prefix: /app}}
- {name: r1, upstream: u, match: {path_regex: '^/r', query: {v: '2'}}}
- {name: r2, upstream: u, match: {path_regex: 'x$'}}
- {name: r3, upstream: u, match: {path_regex: '^/r', cookies: {c: {present: true}}}}
",
    );
    assert_eq!(
        route_for(&r, "POST", Some("h"), "/app", &[("x-beta", "1")]).as_deref(),
        Some("beta")
    );
    assert_eq!(
        route_for(&r, "POST", Some("h"), "/app", &[]).as_deref(),
        Some("post")
    );
    assert_eq!(get(&r, "h", "/app/z").as_deref(), Some("plain"));
    assert_eq!(get(&r, "h", "/rx?v=2").as_deref(), Some("r1"));
    assert_eq!(get(&r, "h", "/rx?v=3").as_deref(), Some("r2"));
    assert_eq!(
        route_for(&r, "GET", Some("h"), "/ry", &[("cookie", "c=1")]).as_deref(),
        Some("r3")
    );
    assert_eq!(get(&r, "h", "/ry"), None);
}

#[test]
fn a_route_with_several_hosts_is_in_each_group() {
    let r = router(
        "
- {name: wild, upstream: u, match: {hosts: ['*.example.com'], path_prefix: /}}
- {name: multi, upstream: u, match: {hosts: [a.example.com, '*.b.example.com', A.EXAMPLE.com], path: /m}}
",
    );
    assert_eq!(get(&r, "a.example.com", "/m").as_deref(), Some("multi"));
    assert_eq!(get(&r, "x.b.example.com", "/m").as_deref(), Some("multi"));
    assert_eq!(get(&r, "c.example.com", "/m").as_deref(), Some("wild"));
    assert_eq!(get(&r, "a.example.com", "/n").as_deref(), Some("wild"));
}

#[test]
fn compiled_routes_carry_their_actions() {
    let r = router(
        r#"
- name: api
  match: {path_prefix: /api}
  upstream: backend
  rewrite: {strip_prefix: /api}
  request_headers: {set: {X-Env: prod}, add: {x-tag: a}, remove: [Cookie]}
  max_body: 1k
  websocket: {enabled: false, idle_timeout: 5m}
- name: moved
  match: {path_prefix: /old}
  redirect: {status: 308, location: "https://new.example.com{path}{query}"}
- name: health
  match: {path: /healthz}
  respond: {status: 204, body: ok, headers: {X-Served-By: tollgate}}
"#,
    );
    let routes = r.routes();
    assert_eq!(routes.len(), 3);
    assert!(routes.iter().enumerate().all(|(i, r)| r.index == i));

    let api = &routes[0];
    assert!(matches!(&api.action, Action::Proxy { upstream } if upstream == "backend"));
    assert_eq!(api.rewrite.as_ref().unwrap().apply("/api/v1"), "/v1");
    assert_eq!(api.request_headers.remove, vec![http::header::COOKIE]);
    assert_eq!(
        api.request_headers.set,
        vec![(
            HeaderName::from_static("x-env"),
            HeaderValue::from_static("prod")
        )]
    );
    assert_eq!(api.request_headers.add.len(), 1);
    assert!(api.response_headers.is_empty() && !api.request_headers.is_empty());
    assert_eq!(api.max_body, 1024);
    assert!(!api.websocket.enabled);
    assert_eq!(api.websocket.idle_timeout.get().as_secs(), 300);
    assert_eq!(api.split.targets().len(), 1);

    let Action::Redirect { status, location } = &routes[1].action else {
        panic!("{:?}", routes[1].action)
    };
    assert_eq!(*status, 308);
    assert_eq!(
        location.render("/old/x", Some("a=1")),
        "https://new.example.com/old/x?a=1"
    );
    assert_eq!(routes[1].max_body, 1 << 20, "http.max_body by default");
    assert!(routes[1].websocket.enabled);

    let Action::Respond {
        status,
        body,
        headers,
    } = &routes[2].action
    else {
        panic!("{:?}", routes[2].action)
    };
    assert_eq!((*status, &body[..]), (204, &b"ok"[..]));
    assert_eq!(
        headers,
        &vec![(
            HeaderName::from_static("x-served-by"),
            HeaderValue::from_static("tollgate")
        )]
    );
    assert_eq!(get(&r, "h", "/healthz").as_deref(), Some("health"));
}

#[test]
fn every_error_is_reported_with_its_path() {
    let errs = errors(
        r#"
- {name: '', upstream: u}
- {name: ok, upstream: u}
- {name: ok, upstream: u}
- {name: none}
- {name: two, upstream: u, respond: {}}
- {name: paths, upstream: u, match: {path: /a, path_prefix: /a}}
- {name: slash, upstream: u, match: {path: a, methods: [GET, 'B@D']}}
- {name: re, upstream: u, match: {path_regex: '(unclosed'}}
- {name: hosts, upstream: u, match: {hosts: [ok.com, '*foo', 'a.*.b', '']}}
- {name: red, redirect: {status: 200, location: /x}}
- {name: resp, respond: {status: 600, headers: {'bad header': x, x-ok: "a\u0001"}}}
- {name: hdrs, upstream: u, request_headers: {set: {'a b': x}, remove: ['c d']}, response_headers: {add: {x-a: "\n"}}}
- {name: rw, respond: {}, rewrite: {strip_prefix: /a}}
- {name: split, upstream: u, split: [{weight: 101, labels: {}}, {weight: 20, labels: {}}]}
- {name: nosplit, redirect: {location: /}, split: [{labels: {}}]}
- {name: sticky, upstream: u, sticky: {cookie: a, header: b}}
- {name: values, upstream: u, match: {headers: {x: {regex: '['}}, query: {q: {prefix: a, exact: b}}}}
"#,
    );
    let got: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        got,
        [
            "routes[0].name",
            "routes[2].name",
            "routes[3]",
            "routes[4]",
            "routes[5].match",
            "routes[6].match.path",
            "routes[6].match.methods[1]",
            "routes[7].match.path_regex",
            "routes[8].match.hosts[1]",
            "routes[8].match.hosts[2]",
            "routes[8].match.hosts[3]",
            "routes[9].redirect.status",
            "routes[10].respond.status",
            "routes[10].respond.headers.bad header",
            "routes[10].respond.headers.x-ok",
            "routes[11].request_headers.remove[0]",
            "routes[11].request_headers.set.a b",
            "routes[11].response_headers.add.x-a",
            "routes[12].rewrite",
            "routes[13].split[0].weight",
            "routes[13].split",
            "routes[14].split",
            "routes[15].sticky",
            "routes[16].match.headers.x.regex",
            "routes[16].match.query.q",
        ]
    );
    let msg = |path: &str| &errs.iter().find(|e| e.path == path).unwrap().message;
    assert_eq!(
        msg("routes[2].name"),
        "duplicate route name `ok` (first used by routes[1])"
    );
    assert_eq!(
        msg("routes[3]"),
        "a route needs exactly one of upstream, redirect, respond (found none)"
    );
    assert_eq!(
        msg("routes[4]"),
        "a route needs exactly one of upstream, redirect, respond (found upstream, respond)"
    );
    assert!(
        msg("routes[7].match.path_regex").contains("unclosed group"),
        "{}",
        msg("routes[7].match.path_regex")
    );
    assert!(msg("routes[9].redirect.status").contains("301, 302, 303, 307 or 308"));
    assert!(msg("routes[13].split").contains("121"));
}

#[test]
fn valid_edge_values_are_accepted() {
    router(
        "
- {name: a, redirect: {status: 303, location: /}}
- {name: b, respond: {status: 100}}
- {name: c, respond: {status: 599}}
- {name: d, upstream: u, split: [{weight: 0, labels: {}}, {weight: 100, labels: {}}]}
- {name: e, upstream: u, match: {methods: [PURGE, get]}}
",
    );
}

#[test]
fn empty_router_finds_nothing() {
    let r = router("[]");
    assert_eq!(get(&r, "a.com", "/"), None);
    assert!(r.routes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// A large generated table against a brute-force reference.

/// Route `i` of the generated table, as YAML. Kinds cycle so every host kind meets every path kind.
pub(super) fn generated_route(i: usize) -> String {
    let host = match i % 4 {
        0 | 1 => format!("hosts: [svc{}.example.com]", i / 8),
        2 => format!("hosts: ['*.t{}.example.net']", i / 40),
        _ => String::new(),
    };
    let path = match i % 5 {
        0 => format!("path: /exact/{i}"),
        1 | 2 => format!("path_prefix: /api/{}", i / 7),
        3 if i % 15 == 3 => format!("path_regex: '^/items/{}/[0-9]+$'", i / 30),
        _ => String::new(),
    };
    let extra = match i % 7 {
        0 => "methods: [POST]",
        1 => "headers: {x-tenant: {prefix: t1}}",
        _ => "",
    };
    let fields: Vec<&str> = [host.as_str(), path.as_str(), extra]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    format!(
        "- {{name: r{i}, upstream: u, match: {{{}}}}}\n",
        fields.join(", ")
    )
}

struct Ref {
    hosts: Vec<(bool, String)>, // (is wildcard, name or suffix)
    path: path::PathCond,
    regex: Option<regex::Regex>,
    method: Option<Method>,
    tenant_prefix: bool,
}

/// Precedence rank of route `r` for a request, lowest wins; `None` if it does not match.
fn reference_rank(
    r: &Ref,
    i: usize,
    host: &str,
    method: &Method,
    p: &str,
    tenant: Option<&str>,
) -> Option<(u8, usize, u8, usize, usize)> {
    let host_rank = if r.hosts.is_empty() {
        Some((2, 0))
    } else {
        r.hosts
            .iter()
            .filter_map(|(wild, name)| match wild {
                false if host == name => Some((0, 0)),
                true if host.ends_with(&format!(".{name}")) => Some((1, usize::MAX - name.len())),
                _ => None,
            })
            .min()
    }?;
    let path_rank = match &r.path {
        path::PathCond::Exact(x) => (x == p).then_some((0, 0)),
        path::PathCond::Prefix(x) => p
            .starts_with(x.as_str())
            .then_some((1, usize::MAX - x.len())),
        path::PathCond::Regex(_) => r.regex.as_ref().unwrap().is_match(p).then_some((2, 0)),
        path::PathCond::Any => Some((3, 0)),
    }?;
    let method_ok = r.method.as_ref().is_none_or(|m| m == method);
    let tenant_ok = !r.tenant_prefix || tenant.is_some_and(|t| t.starts_with("t1"));
    (method_ok && tenant_ok).then_some((host_rank.0, host_rank.1, path_rank.0, path_rank.1, i))
}

#[test]
fn ten_thousand_generated_routes_match_the_reference() {
    const N: usize = 10_000;
    let yaml: String = (0..N).map(generated_route).collect();
    let cfg_routes = parse(&yaml);
    let r = Router::compile(&cfg_routes, 1024).expect("generated routes compile");
    assert_eq!(r.routes().len(), N);
    let refs: Vec<Ref> = cfg_routes
        .iter()
        .map(|c| {
            let mut errs = Vec::new();
            let path = path::compile_path(&c.matcher, "m", &mut errs).unwrap();
            Ref {
                hosts: c
                    .matcher
                    .hosts
                    .iter()
                    .map(|h| (h.starts_with("*."), h.trim_start_matches("*.").to_string()))
                    .collect(),
                regex: match &path {
                    path::PathCond::Regex(re) => Some(regex::Regex::new(re).unwrap()),
                    _ => None,
                },
                path,
                method: c.matcher.methods.first().map(|m| m.parse().unwrap()),
                tenant_prefix: !c.matcher.headers.is_empty(),
            }
        })
        .collect();

    // Each exact-path route without extra conditions is found by its own request.
    let mut direct = 0;
    for i in (0..N).filter(|i| i % 5 == 0 && i % 7 > 1) {
        let host = match i % 4 {
            0 | 1 => format!("svc{}.example.com", i / 8),
            2 => format!("x.T{}.example.net:8443", i / 40),
            _ => "unrelated.org".to_string(),
        };
        assert_eq!(
            get(&r, &host, &format!("/exact/{i}")),
            Some(format!("r{i}")),
            "{host}"
        );
        direct += 1;
    }
    assert!(direct > 1000);

    // Random requests over the same hosts and paths, compared with the brute-force reference.
    let mut rng = fastrand::Rng::with_seed(7);
    let methods = [Method::GET, Method::POST];
    let mut hits = 0;
    for _ in 0..400 {
        let host = match rng.u8(0..5) {
            0 => format!("svc{}.example.com", rng.usize(0..N / 8 + 2)),
            1 => format!("a.t{}.example.net", rng.usize(0..N / 40 + 2)),
            2 => format!("a.b.t{}.example.net", rng.usize(0..N / 40 + 2)),
            3 => format!("t{}.example.net", rng.usize(0..N / 40)),
            _ => "other.org".to_string(),
        };
        let path = match rng.u8(0..5) {
            0 => format!("/exact/{}", rng.usize(0..N + 5)),
            1 => format!("/api/{}", rng.usize(0..N / 7 + 2)),
            2 => format!("/api/{}/x", rng.usize(0..N / 7 + 2)),
            3 => format!("/items/{}/{}", rng.usize(0..N / 30 + 2), rng.u16(..)),
            _ => "/nothing".to_string(),
        };
        let method = &methods[rng.usize(0..2)];
        let tenant = [None, Some("t1-a"), Some("t2")][rng.usize(0..3)];
        let headers: Vec<(&str, &str)> = tenant.map(|t| ("x-tenant", t)).into_iter().collect();
        let got = route_for(&r, method.as_str(), Some(&host), &path, &headers);
        let want = refs
            .iter()
            .enumerate()
            .filter_map(|(i, rf)| reference_rank(rf, i, &host, method, &path, tenant))
            .min()
            .map(|rank| format!("r{}", rank.4));
        assert_eq!(got, want, "{method} {host}{path} tenant={tenant:?}");
        hits += usize::from(got.is_some());
    }
    assert!(hits > 300, "the random requests should mostly hit: {hits}");
}

#[test]
fn request_head_reads_parts() {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("Example.com:81"));
    let (mut parts, ()) = Request::builder()
        .uri("http://auth.example.com/p/a?x=1&y")
        .body(())
        .unwrap()
        .into_parts();
    parts.headers = h;
    let head = RequestHead::from_parts(&parts);
    assert_eq!(
        head.host,
        Some("auth.example.com"),
        "an absolute-form authority wins over the Host header (RFC 9112 3.2.2)"
    );
    assert_eq!(head.path, "/p/a");
    assert_eq!(head.query, Some("x=1&y"));
    assert_eq!(head.method, Method::GET);
}
