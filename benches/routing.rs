//! `Router::find` with 10, 1 000 and 10 000 routes: many exact hosts with path prefixes, some
//! wildcard hosts, exact paths, a few regexes and catch-all routes; hits of each kind and misses.
//!
//! Run: `cargo bench --bench routing -- --warm-up-time 1 --measurement-time 2`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use tollgate::config::*;
use tollgate::router::{RequestHead, Router};

/// Route `i` of an `n`-route table. Every 10 routes share one exact host; one in ten is a
/// wildcard host, one in ten has no host, and about one in a hundred is a regex.
fn route(i: usize) -> String {
    let host = i / 10;
    match i % 10 {
        0..=5 => format!(
            "- {{name: r{i}, upstream: u, match: {{hosts: [app{host}.example.com], path_prefix: /api/r{i}/}}}}\n"
        ),
        6 => format!("- {{name: r{i}, upstream: u, match: {{hosts: [app{host}.example.com], path: /login/{i}, methods: [POST]}}}}\n"),
        7 => format!("- {{name: r{i}, upstream: u, match: {{hosts: ['*.tenant{host}.example.net'], path_prefix: /t/{i}}}}}\n"),
        8 if i % 100 == 8 => format!(
            "- {{name: r{i}, upstream: u, match: {{hosts: [app{host}.example.com], path_regex: '^/items/[0-9]+/r{i}$'}}}}\n"
        ),
        8 => format!("- {{name: r{i}, upstream: u, match: {{hosts: [app{host}.example.com], path: /exact/{i}}}}}\n"),
        _ => format!(
            "- {{name: r{i}, upstream: u, match: {{path_prefix: /static/{i}/, headers: {{x-env: {{present: false}}}}}}}}\n"
        ),
    }
}

fn router(n: usize) -> Router {
    let yaml: String = (0..n).map(route).collect();
    let routes: Vec<Route> = serde_yaml::from_str(&yaml).expect("bench routes parse");
    Router::compile(&routes, 1 << 20).expect("bench routes compile")
}

/// (case, method, host, path and query, the route it must find)
type Case = (&'static str, &'static str, String, String, Option<String>);

fn cases(n: usize) -> Vec<Case> {
    let last = n - 10; // the last block of ten, so big tables are probed at their far end
    let host = last / 10;
    let regex = if n >= 100 { n - 92 } else { 8 };
    let hit = |i: usize| Some(format!("r{i}"));
    vec![
        (
            "prefix_hit",
            "GET",
            format!("app{host}.example.com"),
            format!("/api/r{}/users/42?page=2", last + 3),
            hit(last + 3),
        ),
        (
            "exact_hit",
            "POST",
            format!("app{host}.example.com"),
            format!("/login/{}", last + 6),
            hit(last + 6),
        ),
        (
            "wildcard_hit",
            "GET",
            format!("shop.tenant{host}.example.net"),
            format!("/t/{}/cart", last + 7),
            hit(last + 7),
        ),
        (
            "mixed_case_port",
            "GET",
            format!("APP{host}.Example.COM:8443"),
            format!("/api/r{}/x", last + 1),
            hit(last + 1),
        ),
        (
            "regex_hit",
            "GET",
            format!("app{}.example.com", regex / 10),
            format!("/items/123/r{regex}"),
            hit(regex),
        ),
        (
            "fallthrough_catch_all",
            "GET",
            format!("app{host}.example.com"),
            format!("/static/{}/app.js", last + 9),
            hit(last + 9),
        ),
        (
            "miss_known_host",
            "GET",
            format!("app{host}.example.com"),
            "/nothing/here".into(),
            None,
        ),
        (
            "miss_unknown_host",
            "GET",
            "unknown.example.org".into(),
            "/api/r1/x".into(),
            None,
        ),
    ]
}

fn bench_find(c: &mut Criterion) {
    let mut group = c.benchmark_group("find");
    for n in [10, 1_000, 10_000] {
        let r = router(n);
        for (case, method, host, uri, want) in cases(n) {
            let (parts, ()) = Request::builder()
                .method(method)
                .uri(uri.as_str())
                .header("host", host.as_str())
                .header("user-agent", "bench/1.0")
                .header("accept", "*/*")
                .body(())
                .expect("bench request builds")
                .into_parts();
            let head = RequestHead::from_parts(&parts);
            let got = r.find(&head).map(|route| route.name.clone());
            assert_eq!(got, want, "{case} with {n} routes: {method} {host}{uri}");
            group.bench_with_input(BenchmarkId::new(case, n), &head, |b, head| {
                b.iter(|| black_box(r.find(black_box(head))).map(|route| route.index))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_find);
criterion_main!(benches);
