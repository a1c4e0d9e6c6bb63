//! What IP rules and bot detection cost per request: `BotDetector::check` on a browser
//! User-Agent (no hit: the whole automaton and both regex sets run), on a scanner (the
//! common refusal) and on a scripting client that is recognised but not refused; and
//! `IpRules::check` with 1 000 deny ranges and an allow list, for an address that passes; and
//! five custom rules of the README's example that a normal API request matches none of.
//!
//! Run: `cargo bench --bench screen` (seconds after the build). Medians in
//! `target/criterion/<group>_<case>/new/estimates.json`.

use std::net::IpAddr;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pingora_http::RequestHeader;
use tollgate::policy::bot::{BotDetector, BotSettings};
use tollgate::policy::ip_rules::{IpRules, IpRulesSettings};
use tollgate::policy::rules::{CustomRules, RuleSpec};
use tollgate::router::RequestHead;

const BROWSER: &[u8] = b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.86";

fn bots(c: &mut Criterion) {
    let settings = BotSettings {
        deny: vec!["^evil-".into(), "badbot/[0-9]+".into()],
        allow: vec!["^internal-probe/".into()],
        ..BotSettings::default()
    };
    let d = BotDetector::compile("bots", &settings).expect("bench settings are valid");
    assert!(d.check(Some(BROWSER)).is_none());
    let builtin_only = BotDetector::compile("bots", &BotSettings::default()).unwrap();
    let mut g = c.benchmark_group("bots");
    g.bench_function("browser", |b| b.iter(|| d.check(black_box(Some(BROWSER)))));
    g.bench_function("browser_builtin_only", |b| {
        b.iter(|| builtin_only.check(black_box(Some(BROWSER))))
    });
    g.bench_function("scanner", |b| {
        b.iter(|| d.check(black_box(Some(b"sqlmap/1.7.2#stable (https://sqlmap.org)"))))
    });
    g.bench_function("script_passes", |b| {
        b.iter(|| d.check(black_box(Some(b"python-requests/2.31.0"))))
    });
    g.finish();
}

fn ip_rules(c: &mut Criterion) {
    let deny = (0..1000u32)
        .map(|i| {
            format!(
                "{}.{}.{}.0/24",
                100 + i / 65536 % 100,
                i / 256 % 256,
                i % 256
            )
        })
        .collect();
    let s = IpRulesSettings {
        deny,
        allow: vec!["0.0.0.0/1".into(), "2001:db8::/32".into()],
    };
    let rules = IpRules::compile(&s, None).expect("bench lists are valid");
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    assert!(rules.check(ip).is_none());
    c.bench_function("ip_rules_1000_pass", |b| {
        b.iter(|| rules.check(black_box(ip)))
    });
}

fn custom_rules(c: &mut Criterion) {
    let specs: Vec<RuleSpec> = serde_yaml::from_str(
        r#"
- { id: admin-delete, match: { path_prefix: /admin, methods: [DELETE] }, action: block }
- { id: shellshock, match: { headers: { user-agent: { contains: "() {" } } }, action: block }
- { id: inside-only, match: { path_prefix: /internal }, client_ip: { not_in: [ 10.0.0.0/8 ] }, action: block }
- { id: debug-log, match: { query: { debug: { present: true } } }, action: log }
- { id: partner-tag, match: { hosts: [ partner.example.com ] }, action: tag, tag: partner }
"#,
    )
    .unwrap();
    let rules = CustomRules::compile(&specs).expect("bench rules are valid");
    let mut req = RequestHeader::build("GET", b"/api/v1/items?page=2", None).unwrap();
    req.insert_header("host", "api.example.com").unwrap();
    req.insert_header("user-agent", std::str::from_utf8(BROWSER).unwrap())
        .unwrap();
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let head = RequestHead::from_parts(&req);
    assert!(rules.evaluate(&head, Some(ip)).blocked_by.is_none());
    c.bench_function("rules_5_no_match", |b| {
        b.iter(|| rules.evaluate(black_box(&head), black_box(Some(ip))))
    });
}

criterion_group!(benches, bots, ip_rules, custom_rules);
criterion_main!(benches);
