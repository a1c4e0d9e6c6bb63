//! Verified crawlers (`bots.verify`) through the real binary and a real DNS server: a tiny UDP
//! server in this process answers PTR, A and AAAA queries from a table (and counts them), and
//! `bots.resolver` points the gateway at it. A Googlebot whose PTR name is under googlebot.com
//! and resolves back passes even with `crawler` blocked; a fake gets `403 bot_fake` and never
//! reaches the upstream; detect mode only logs; results are cached per IP (across reloads) and
//! concurrent lookups shared; a server that does not answer leaves the claim unverified; a
//! browser never causes a query. Clients are told apart by `X-Forwarded-For` from a trusted
//! proxy (the test, on loopback).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{config, Gateway, HttpBackend, Req};

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const BINGBOT: &str = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)";
const BROWSER: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36";

const PTR: u16 = 12;
const A: u16 = 1;
const AAAA: u16 = 28;

enum Answer {
    Ptr(String),
    Ip(IpAddr),
}

/// Answers by (name, type).
type Zone = HashMap<(String, u16), Vec<Answer>>;

/// A minimal authoritative-looking DNS server on UDP 127.0.0.1: one question per query, answers
/// from `zone` (NXDOMAIN for unknown names), never answers names in `silent`, waits `delay`
/// before answering names in `slow`.
struct DnsServer {
    addr: std::net::SocketAddr,
    zone: Arc<Mutex<Zone>>,
    silent: Arc<Mutex<Vec<String>>>,
    slow: Arc<Mutex<Vec<String>>>,
    queries: Arc<Mutex<Vec<(String, u16)>>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let s = DnsServer {
            addr: sock.local_addr().unwrap(),
            zone: Default::default(),
            silent: Default::default(),
            slow: Default::default(),
            queries: Default::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (zone, silent, slow, queries, stop) = (
            s.zone.clone(),
            s.silent.clone(),
            s.slow.clone(),
            s.queries.clone(),
            s.stop.clone(),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                queries.lock().unwrap().push((name.clone(), qtype));
                if silent.lock().unwrap().contains(&name) {
                    continue;
                }
                let reply = {
                    let zone = zone.lock().unwrap();
                    let known = zone.keys().any(|(n, _)| *n == name);
                    let answers = zone.get(&(name.clone(), qtype));
                    let mut r = Vec::with_capacity(512);
                    r.extend_from_slice(&buf[..2]); // id
                    let rcode = if known { 0 } else { 3 };
                    r.extend_from_slice(&[0x85, 0x80 | rcode]); // QR AA RD RA
                    let an = answers.map_or(0, Vec::len) as u16;
                    for count in [1, an, 0, 0] {
                        r.extend_from_slice(&u16::to_be_bytes(count));
                    }
                    r.extend_from_slice(&buf[12..qend]); // the question, as asked
                    for a in answers.into_iter().flatten() {
                        let rdata = match a {
                            Answer::Ptr(target) => encode_name(target),
                            Answer::Ip(IpAddr::V4(ip)) => ip.octets().to_vec(),
                            Answer::Ip(IpAddr::V6(ip)) => ip.octets().to_vec(),
                        };
                        r.extend_from_slice(&[0xc0, 0x0c]); // the question's name
                        r.extend_from_slice(&qtype.to_be_bytes());
                        r.extend_from_slice(&[0, 1, 0, 0, 0, 60]); // IN, TTL 60
                        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
                        r.extend_from_slice(&rdata);
                    }
                    r
                };
                if slow.lock().unwrap().contains(&name) {
                    let sock = sock.try_clone().unwrap();
                    thread::spawn(move || {
                        // Under the resolver's resend floor (333 ms): one query stays one packet.
                        thread::sleep(Duration::from_millis(150));
                        let _ = sock.send_to(&reply, peer);
                    });
                } else {
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        s
    }

    fn add(&self, name: &str, qtype: u16, answer: Answer) {
        self.zone
            .lock()
            .unwrap()
            .entry((name.to_string(), qtype))
            .or_default()
            .push(answer);
    }

    /// `ip` has PTR `name`, and `name` has the address `forward`.
    fn host(&self, ip: &str, name: &str, forward: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.add(&reverse_name(ip), PTR, Answer::Ptr(name.into()));
        let forward: IpAddr = forward.parse().unwrap();
        let qtype = if forward.is_ipv4() { A } else { AAAA };
        self.add(name, qtype, Answer::Ip(forward));
    }

    fn queries(&self) -> usize {
        self.queries.lock().unwrap().len()
    }

    /// Queries for `ip`'s reverse name.
    fn ptr_queries(&self, ip: &str) -> usize {
        let name = reverse_name(ip.parse().unwrap());
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t)| *n == name && *t == PTR)
            .count()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The question's name (lowercase, no trailing dot), type, and where the question ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

fn from(ip: &str, path: &str, ua: &str) -> Req {
    Req::get(path)
        .host("v.test")
        .header("x-forwarded-for", &format!("{ip}, 127.0.0.1"))
        .header("user-agent", ua)
}

fn body(app: &HttpBackend, dns: &DnsServer, extra_route: &str) -> String {
    format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
bots:
  block: [ scanner, crawler ]
  resolver: "{}"
  verify_timeout: 500ms
  verify_cache: {{ ttl: 1h, negative_ttl: 5m, error_ttl: 1s, max_entries: 1000 }}
  challenge: {{ secret: "verified-bots-secret-0123456789" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: watch, match: {{ path_prefix: /watch }}, upstream: app, bots: detect }}
  - {{ name: page, match: {{ path_prefix: /page }}, upstream: app, bots: challenge }}
{extra_route}  - {{ name: all, upstream: app }}
"#,
        dns.addr,
        app.addr()
    )
}

#[test]
fn crawlers_are_verified_by_reverse_and_forward_dns() {
    let dns = DnsServer::start();
    dns.host(
        "66.249.66.1",
        "crawl-66-249-66-1.googlebot.com",
        "66.249.66.1",
    );
    dns.host("66.249.66.2", "evil.example.com", "66.249.66.2");
    // The PTR name is right, but its forward lookup is another address.
    dns.host(
        "66.249.66.3",
        "crawl-66-249-66-3.googlebot.com",
        "66.249.66.99",
    );
    dns.host("66.249.66.4", "crawl.evilgooglebot.com", "66.249.66.4");
    dns.host(
        "66.249.66.5",
        "crawl-66-249-66-5.googlebot.com",
        "66.249.66.5",
    );
    dns.host(
        "157.55.39.1",
        "msnbot-157-55-39-1.search.msn.com",
        "157.55.39.1",
    );
    dns.host(
        "2001:4860:4801:10::1",
        "crawl-2001-4860-4801-10--1.googlebot.com",
        "2001:4860:4801:10::1",
    );
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&config(&body(&app, &dns, "")));

    let passes = |ip: &str, path: &str, ua: &str| {
        let before = app.hits();
        let r = gw.send(&from(ip, path, ua));
        assert_eq!(r.status, 200, "{ip} {path} {ua}: {}", r.text());
        assert_eq!(app.hits(), before + 1);
        r.header("x-request-id").unwrap().to_string()
    };
    let refused = |ip: &str, path: &str, ua: &str, code: &str| {
        let before = app.hits();
        let r = gw.send(&from(ip, path, ua));
        assert_eq!(r.status, 403, "{ip} {path} {ua}: {}", r.text());
        assert_eq!(r.json()["error"], code, "{}", r.text());
        assert_eq!(app.hits(), before, "a refused request reached the upstream");
        r.header("x-request-id").unwrap().to_string()
    };
    let screened = |id: &str| {
        let line = gw
            .wait_access_log(id, Duration::from_secs(5))
            .expect("logged");
        line["screened"].as_str().unwrap_or("").to_string()
    };

    // Browsers, scripts and scanners never cause a DNS query.
    passes("198.51.100.7", "/x", BROWSER);
    passes("198.51.100.8", "/x", "curl/8.5.0");
    refused("198.51.100.9", "/x", "sqlmap/1.7.2", "bot_blocked");
    assert_eq!(dns.queries(), 0, "{:?}", dns.queries.lock().unwrap());

    // A verified Googlebot passes although crawlers are blocked, and the challenge too.
    let id = passes("66.249.66.1", "/x", GOOGLEBOT);
    assert_eq!(screened(&id), "bot:googlebot:verified");
    assert_eq!(dns.queries(), 2, "one PTR and one A query");
    // Cached: no more queries for this address, on any route.
    passes("66.249.66.1", "/x", GOOGLEBOT);
    passes("66.249.66.1", "/page/home", GOOGLEBOT);
    assert_eq!(dns.queries(), 2, "{:?}", dns.queries.lock().unwrap());
    // Over IPv6 (PTR under ip6.arpa, AAAA back), and Bingbot by its own domain.
    passes("2001:4860:4801:10::1", "/x", GOOGLEBOT);
    let id = passes("157.55.39.1", "/x", BINGBOT);
    assert_eq!(screened(&id), "bot:bingbot:verified");
    // Bing's address claiming to be Googlebot is a fake, from the cache.
    let n = dns.queries();
    refused("157.55.39.1", "/x", GOOGLEBOT, "bot_fake");
    assert_eq!(dns.queries(), n);

    // Fakes: a PTR name elsewhere, one on a look-alike domain, one whose forward lookup is
    // another address, and an address without PTR. Never reach the upstream.
    let id = refused("66.249.66.2", "/x", GOOGLEBOT, "bot_fake");
    assert_eq!(screened(&id), "bot:googlebot:fake");
    refused("66.249.66.4", "/x", GOOGLEBOT, "bot_fake");
    refused("66.249.66.3", "/x", GOOGLEBOT, "bot_fake");
    refused("192.0.2.10", "/x", GOOGLEBOT, "bot_fake");
    // On a challenge route too, as JSON rather than the challenge page.
    refused("66.249.66.2", "/page/home", GOOGLEBOT, "bot_fake");
    // Detect mode: passes, logged as a fake.
    let id = passes("66.249.66.2", "/watch/x", GOOGLEBOT);
    assert_eq!(screened(&id), "bot:googlebot:fake");
    let r = gw.send(&from("66.249.66.2", "/watch/x", GOOGLEBOT));
    let line = gw
        .wait_access_log(r.header("x-request-id").unwrap(), Duration::from_secs(5))
        .unwrap();
    assert!(line.get("error").is_none(), "{line}");

    // Concurrent requests from one new address share one lookup (the server answers slowly).
    let verified = r#"tollgate_bot_verifications_total{bot="googlebot",result="verified"}"#;
    let lookups_before = gw.metric(verified).unwrap_or(0.0);
    let reverse = reverse_name("66.249.66.5".parse().unwrap());
    dns.slow.lock().unwrap().push(reverse);
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let req = from("66.249.66.5", "/x", GOOGLEBOT);
            let addr = gw.addr();
            thread::spawn(move || {
                let mut c = common::RawConn::connect(addr).unwrap();
                c.request(&req).unwrap().status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(dns.ptr_queries("66.249.66.5"), 1, "lookups were not shared");
    assert_eq!(gw.metric(verified), Some(lookups_before + 1.0));

    // A DNS server that does not answer: after verify_timeout the claim is unverified, so not
    // exempt (crawlers are blocked here: bot_blocked, not bot_fake).
    dns.silent
        .lock()
        .unwrap()
        .push(reverse_name("203.0.113.50".parse().unwrap()));
    let started = Instant::now();
    let id = refused("203.0.113.50", "/x", GOOGLEBOT, "bot_blocked");
    let took = started.elapsed();
    // (The resolver may resend an unanswered query within the timeout.)
    let sent = dns.ptr_queries("203.0.113.50");
    assert!(sent >= 1);
    // ...detect mode lets it pass, logged as what it is (the error is cached for error_ttl).
    let watched = passes("203.0.113.50", "/watch/x", GOOGLEBOT);
    assert_eq!(
        dns.ptr_queries("203.0.113.50"),
        sent,
        "the error was not cached"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(screened(&id), "bot:googlebot:unverified,bot:googlebot");
    assert_eq!(screened(&watched), "bot:googlebot:unverified,bot:googlebot");

    let m = gw.metrics_text();
    for (selector, at_least) in [
        (
            r#"tollgate_bot_verifications_total{bot="googlebot",result="verified"}"#,
            3.0,
        ),
        (
            r#"tollgate_bot_verifications_total{bot="bingbot",result="verified"}"#,
            1.0,
        ),
        (
            r#"tollgate_bot_verifications_total{bot="googlebot",result="fake"}"#,
            4.0,
        ),
        (
            r#"tollgate_bot_verifications_total{bot="googlebot",result="error"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="blocked",category="bot",route="all",rule="googlebot:fake"}"#,
            4.0,
        ),
        (
            r#"tollgate_screened_total{action="detected",category="bot",route="watch",rule="googlebot:fake"}"#,
            2.0,
        ),
    ] {
        let v = common::metric_in(&m, selector).unwrap_or(0.0);
        assert!(v >= at_least, "{selector} = {v}\n{m}");
    }
    assert_eq!(
        common::metric_in(
            &m,
            r#"tollgate_bot_verifications_total{bot="googlebot",result="verified"}"#
        ),
        Some(3.0),
        "cache hits are not lookups"
    );

    // The cache outlives a reload: no new query for a known address.
    let gen = gw.generation();
    gw.write_config(&config(&body(
        &app,
        &dns,
        "  - { name: extra, match: { path_prefix: /extra }, upstream: app }\n",
    )));
    gw.wait_generation(gen + 1, Duration::from_secs(10));
    let n = dns.queries();
    passes("66.249.66.1", "/extra/x", GOOGLEBOT);
    refused("66.249.66.2", "/x", GOOGLEBOT, "bot_fake");
    assert_eq!(dns.queries(), n, "{:?}", dns.queries.lock().unwrap());
}

#[test]
fn verification_can_be_turned_off_and_errors_are_reported() {
    let dns = DnsServer::start();
    let app = HttpBackend::start("app");
    // `verify: []`: a Googlebot User-Agent is an ordinary crawler (blocked here), no DNS.
    let text = config(&format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
bots: {{ block: [ crawler ], verify: [], resolver: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: all, upstream: app }}
"#,
        dns.addr,
        app.addr()
    ));
    let gw = Gateway::start(&text);
    let r = gw.send(&from("66.249.66.1", "/x", GOOGLEBOT));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "bot_blocked");
    assert_eq!(dns.queries(), 0);

    // A broken entry is refused with its place; the old config keeps serving.
    let bad = text.replace(
        "verify: []",
        "verify: [ { name: googlebot, user_agent: Googlebot, domains: [ \"*.googlebot.com\" ] } ]",
    );
    gw.write_config(&bad);
    assert!(common::wait_until(Duration::from_secs(10), || {
        gw.status_json()["last_error"]
            .to_string()
            .contains("bots.verify[0].domains[0]")
    }));
    assert_eq!(gw.send(&from("66.249.66.1", "/x", GOOGLEBOT)).status, 403);
    assert_eq!(dns.queries(), 0);
}
