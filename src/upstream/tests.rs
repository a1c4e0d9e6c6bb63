//! Tests of the compiled [`Upstream`]: validation paths, balancing, subsets, passive health and
//! state kept across compiles. Health-checker tests with real sockets live in `health.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::Duration;

use pingora_core::upstreams::peer::Peer;

use super::*;

pub(super) fn cfg(yaml: &str) -> config::Upstream {
    serde_yaml::from_str(yaml).expect("test YAML parses")
}

pub(super) fn build(name: &str, yaml: &str, registry: &Registry) -> Upstream {
    Upstream::compile(name, &cfg(yaml), registry).expect("compiles")
}

fn all(up: &mut Upstream) -> SubsetId {
    up.subset(&BTreeMap::new()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pick(up: &Upstream, s: SubsetId) -> usize {
    up.select(s, None, &[]).expect("a usable backend").index
}

fn errors(yaml: &str) -> Vec<(String, String)> {
    match Upstream::compile("chat", &cfg(yaml), &Registry::new()) {
        Ok(_) => panic!("expected errors"),
        Err(errs) => errs.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

fn paths(yaml: &str) -> Vec<String> {
    errors(yaml).into_iter().map(|(p, _)| p).collect()
}

// --- validation -------------------------------------------------------------------------------

#[test]
fn backend_errors_have_exact_paths() {
    let errs = errors(
        r#"
backends:
  - address: "127.0.0.1:80"
    weight: 0
  - address: "nope"
  - address: "127.0.0.1:80"
  - address: "[::1]:0"
"#,
    );
    let got: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        got,
        [
            "upstreams.chat.backends[0].weight",
            "upstreams.chat.backends[1].address",
            "upstreams.chat.backends[2].address",
            "upstreams.chat.backends[3].address",
        ]
    );
    assert_eq!(errs[0].1, "must be at least 1");
    assert!(
        errs[1].1.contains("`nope` is not `host:port`"),
        "{}",
        errs[1].1
    );
    assert!(
        errs[2].1.contains("duplicate backend: backends[0]"),
        "{}",
        errs[2].1
    );

    assert_eq!(paths("backends: []"), ["upstreams.chat.backends"]);
    let unresolvable = errors("backends: [{address: 'no-such-host.invalid:80'}]");
    assert_eq!(unresolvable[0].0, "upstreams.chat.backends[0].address");
    assert!(
        unresolvable[0].1.starts_with("cannot resolve"),
        "{:?}",
        unresolvable
    );
}

#[test]
fn duplicates_are_found_after_resolution() {
    // `localhost` may resolve to ::1 first; compare with what it resolves to.
    let (_, addr) = compile::resolve("localhost:8080").unwrap();
    let yaml = format!("backends: [{{address: 'localhost:8080'}}, {{address: '{addr}'}}]");
    assert_eq!(paths(&yaml), ["upstreams.chat.backends[1].address"]);
}

#[test]
fn hash_on_required_iff_hashing() {
    let base = "backends: [{address: '127.0.0.1:80'}]";
    assert_eq!(
        paths(&format!("{base}\nbalance: hash")),
        ["upstreams.chat.hash_on"]
    );
    assert_eq!(
        paths(&format!("{base}\nbalance: least_conn\nhash_on: path")),
        ["upstreams.chat.hash_on"]
    );
    let errs = errors(&format!("{base}\nbalance: hash\nhash_on: 'query:x'"));
    assert_eq!(errs[0].0, "upstreams.chat.hash_on");
    assert!(errs[0].1.contains("`header:NAME`"), "{}", errs[0].1);
    assert_eq!(
        paths(&format!(
            "{base}\nbalance: hash\nhash_on: 'header:bad name'"
        )),
        ["upstreams.chat.hash_on"]
    );
    for ok in ["header:X-User", "cookie:sid", "client_ip", "path"] {
        let yaml = format!("{base}\nbalance: hash\nhash_on: '{ok}'");
        assert!(
            Upstream::compile("chat", &cfg(&yaml), &Registry::new()).is_ok(),
            "{ok}"
        );
    }
}

#[test]
fn health_check_errors_have_exact_paths() {
    let base = "backends: [{address: '127.0.0.1:80'}]";
    let errs = errors(&format!(
        r#"{base}
health_check:
  http: {{path: "health", host: "", expected_status: [200, 99, 600]}}
  healthy: 0
  unhealthy: 0
  interval: 0s
  timeout: 0s
"#
    ));
    let got: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        got,
        [
            "upstreams.chat.health_check.http.path",
            "upstreams.chat.health_check.http.host",
            "upstreams.chat.health_check.http.expected_status[1]",
            "upstreams.chat.health_check.http.expected_status[2]",
            "upstreams.chat.health_check.healthy",
            "upstreams.chat.health_check.unhealthy",
            "upstreams.chat.health_check.interval",
            "upstreams.chat.health_check.timeout",
        ]
    );
    assert_eq!(errs[0].1, "must start with `/`");
    assert!(errs[2].1.contains("99"), "{}", errs[2].1);

    let both = format!("{base}\nhealth_check: {{http: {{path: /}}, tcp: {{}}}}");
    assert_eq!(paths(&both), ["upstreams.chat.health_check"]);
    let neither = format!("{base}\nhealth_check: {{interval: 1s}}");
    let errs = errors(&neither);
    assert_eq!(errs[0].0, "upstreams.chat.health_check");
    assert_eq!(errs[0].1, "set exactly one of `http` or `tcp`");
    let bad_path = format!("{base}\nhealth_check: {{http: {{path: '/a b'}}}}");
    assert_eq!(paths(&bad_path), ["upstreams.chat.health_check.http.path"]);
    let ok = format!(
        "{base}\nhealth_check: {{http: {{path: /healthz, expected_status: [100, 204, 599]}}}}"
    );
    assert!(Upstream::compile("chat", &cfg(&ok), &Registry::new()).is_ok());
}

#[test]
fn tls_and_timeout_errors_have_exact_paths() {
    let base = "backends: [{address: '127.0.0.1:80'}]";
    assert_eq!(
        paths(&format!(
            "{base}\ntls: {{sni: ''}}\ntimeouts: {{connect: 0s, read: 0s}}"
        )),
        [
            "upstreams.chat.timeouts.connect",
            "upstreams.chat.timeouts.read",
            "upstreams.chat.tls.sni",
        ]
    );
}

#[test]
fn failed_compile_leaves_no_state() {
    let r = Registry::new();
    let bad = cfg("backends: [{address: '127.0.0.1:80'}, {address: 'x'}]");
    assert!(Upstream::compile("u", &bad, &r).is_err());
    assert!(r.is_empty());
}

// --- peers ------------------------------------------------------------------------------------

#[test]
fn peers_carry_tls_and_timeouts() {
    let r = Registry::new();
    let up = build(
        "u",
        r#"
backends: [{address: 'localhost:8443'}, {address: '127.0.0.1:9443'}]
tls: {}
timeouts: {connect: 1500ms, read: 7s, write: 8s, idle: 9s}
"#,
        &r,
    );
    let p = up.peer(0);
    assert!(p.is_tls());
    assert_eq!(p.sni, "localhost", "SNI is the host as written");
    assert_eq!(up.peer(1).sni, "127.0.0.1");
    assert!(p.options.verify_cert && p.options.verify_hostname);
    assert_eq!(
        p.options.connection_timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(p.options.read_timeout, Some(Duration::from_secs(7)));
    assert_eq!(p.options.write_timeout, Some(Duration::from_secs(8)));
    assert_eq!(p.options.idle_timeout, Some(Duration::from_secs(9)));
    assert_eq!(up.backend_addr(1), "127.0.0.1:9443".parse().unwrap());
    assert_eq!(up.peer(1).address().to_string(), "127.0.0.1:9443");

    let up = build(
        "u",
        "backends: [{address: 'localhost:8443'}]\ntls: {sni: api.example.com, verify: false}",
        &r,
    );
    let p = up.peer(0);
    assert_eq!(p.sni, "api.example.com");
    assert!(!p.options.verify_cert && !p.options.verify_hostname);

    let plain = build("u", "backends: [{address: '127.0.0.1:80'}]", &r);
    assert!(!plain.peer(0).is_tls());
    assert_eq!(plain.retries(), 1);
}

#[test]
fn pool_key_is_stable_across_compiles() {
    let yaml = "backends: [{address: '127.0.0.1:443'}]\ntls: {sni: a.example}";
    let one = build("u", yaml, &Registry::new());
    let two = build("u", yaml, &Registry::new());
    assert_eq!(one.peer(0).reuse_hash(), two.peer(0).reuse_hash());
    let other = build(
        "u",
        "backends: [{address: '127.0.0.1:443'}]\ntls: {sni: b.example}",
        &Registry::new(),
    );
    assert_ne!(one.peer(0).reuse_hash(), other.peer(0).reuse_hash());
}

// --- round robin ------------------------------------------------------------------------------

#[test]
fn weighted_round_robin_is_exact_and_smooth() {
    let mut up = build(
        "u",
        "backends: [{address: '127.0.0.1:1', weight: 1}, {address: '127.0.0.1:2', weight: 2}]",
        &Registry::new(),
    );
    let s = all(&mut up);
    let seq: Vec<usize> = (0..300).map(|_| pick(&up, s)).collect();
    assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 100);
    assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 200);
    // Smooth: every window of one period holds exactly one pick of the weight-1 backend.
    for w in seq.windows(3) {
        assert_eq!(w.iter().filter(|&&i| i == 0).count(), 1, "{w:?}");
    }
}

#[test]
fn round_robin_interleaves_like_nginx() {
    let mut up = build(
        "u",
        r#"
backends:
  - {address: '127.0.0.1:1', weight: 5}
  - {address: '127.0.0.1:2', weight: 1}
  - {address: '127.0.0.1:3', weight: 1}
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    let seq: Vec<usize> = (0..14).map(|_| pick(&up, s)).collect();
    // A rotation of nginx's a a b a c a a.
    let period = [0, 0, 1, 0, 2, 0, 0];
    let rotated = (0..7).any(|r| (0..14).all(|k| seq[k] == period[(r + k) % 7]));
    assert!(rotated, "{seq:?}");
}

#[test]
fn unusable_backends_are_skipped() {
    let r = Registry::new();
    let mut up = build(
        "u",
        r#"
backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}, {address: '127.0.0.1:3'}]
passive: {consecutive_failures: 1, ejection_time: 1h}
health_check: {tcp: {}}
"#,
        &r,
    );
    let s = all(&mut up);
    up.report_connect_failure(1);
    let mut counts = [0; 3];
    for _ in 0..300 {
        counts[pick(&up, s)] += 1;
    }
    assert_eq!(counts, [150, 0, 150]);

    // Active health counts for an upstream with a health check.
    up.backends[2].state.healthy.store(false, Ordering::Relaxed);
    for _ in 0..10 {
        assert_eq!(pick(&up, s), 0);
    }
    // Already tried by this request.
    assert!(up.select(s, None, &[0]).is_none());
    up.backends[0].state.healthy.store(false, Ordering::Relaxed);
    assert!(up.select(s, None, &[]).is_none(), "all down: no pick");

    let st: Vec<(bool, bool)> = up
        .backend_states()
        .map(|b| (b.healthy, b.ejected))
        .collect();
    assert_eq!(st, [(false, false), (false, true), (false, false)]);

    // Without a health check, active verdicts left in the state are ignored.
    let mut unchecked = build(
        "u",
        "backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}, {address: '127.0.0.1:3'}]",
        &r,
    );
    let s = all(&mut unchecked);
    let picked: Vec<usize> = (0..6).map(|_| pick(&unchecked, s)).collect();
    assert!(picked.contains(&0) && picked.contains(&2) && !picked.contains(&1));
}

#[test]
fn skipped_traffic_spreads_by_weight() {
    let mut up = build(
        "u",
        r#"
backends:
  - {address: '127.0.0.1:1', weight: 3}
  - {address: '127.0.0.1:2', weight: 1}
  - {address: '127.0.0.1:3', weight: 1}
passive: {consecutive_failures: 1, ejection_time: 1h}
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    up.report_connect_failure(2);
    let mut counts = [0; 3];
    for _ in 0..400 {
        counts[pick(&up, s)] += 1;
    }
    // Weights 3:1 among the usable ones, not the ejected one's share all to its successor.
    assert!((298..=302).contains(&counts[0]), "{counts:?}");
    assert_eq!(counts[0] + counts[1], 400);
}

#[test]
fn tried_backends_are_skipped() {
    let mut up = build(
        "u",
        "backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]",
        &Registry::new(),
    );
    let s = all(&mut up);
    for _ in 0..10 {
        assert_eq!(up.select(s, None, &[1]).unwrap().index, 0);
    }
    assert!(up.select(s, None, &[0, 1]).is_none());
}

// --- least_conn -------------------------------------------------------------------------------

#[test]
fn least_conn_picks_least_loaded_and_drop_releases() {
    let mut up = build(
        "u",
        r#"
balance: least_conn
backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}, {address: '127.0.0.1:3'}]
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    let mut held: Vec<Pick> = (0..6).map(|_| up.select(s, None, &[]).unwrap()).collect();
    let in_flight = |up: &Upstream| up.backend_states().map(|b| b.in_flight).collect::<Vec<_>>();
    assert_eq!(in_flight(&up), [2, 2, 2]);

    // Release backend 1's picks: it is now the least loaded, twice.
    held.retain(|p| p.index != 1);
    assert_eq!(in_flight(&up), [2, 0, 2]);
    let a = up.select(s, None, &[]).unwrap();
    let b = up.select(s, None, &[]).unwrap();
    assert_eq!((a.index, b.index), (1, 1));
    assert_eq!(in_flight(&up), [2, 2, 2]);
    drop((a, b, held));
    assert_eq!(in_flight(&up), [0, 0, 0]);

    // Ties rotate.
    let mut counts = [0; 3];
    for _ in 0..30 {
        counts[pick(&up, s)] += 1;
    }
    assert_eq!(counts, [10, 10, 10]);
}

#[test]
fn least_conn_divides_by_weight() {
    let mut up = build(
        "u",
        r#"
balance: least_conn
backends: [{address: '127.0.0.1:1', weight: 1}, {address: '127.0.0.1:2', weight: 3}]
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    let held: Vec<Pick> = (0..8).map(|_| up.select(s, None, &[]).unwrap()).collect();
    let loads: Vec<usize> = up.backend_states().map(|b| b.in_flight).collect();
    assert_eq!(loads, [2, 6]);
    drop(held);
}

#[test]
fn pick_is_send_and_static() {
    fn assert_send_static<T: Send + 'static>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_static::<Pick>();
    assert_send_sync::<Upstream>();
    assert_send_sync::<Registry>();
    assert_send_sync::<HealthChecker>();
}

// --- hash -------------------------------------------------------------------------------------

const FOUR: &str = r#"
balance: hash
hash_on: path
backends:
  - {address: '127.0.0.1:1'}
  - {address: '127.0.0.1:2'}
  - {address: '127.0.0.1:3'}
  - {address: '127.0.0.1:4'}
"#;

fn owners(up: &Upstream, s: SubsetId, keys: u64) -> Vec<String> {
    (0..keys)
        .map(|k| {
            let i = up.select(s, Some(key::mix(k)), &[]).unwrap().index;
            up.backend_address(i).to_string()
        })
        .collect()
}

#[test]
fn rendezvous_moves_only_the_removed_backends_keys() {
    let mut up = build("u", FOUR, &Registry::new());
    let s = all(&mut up);
    let before = owners(&up, s, 4000);
    // Spread is even.
    let mut per: HashMap<&str, usize> = HashMap::new();
    for o in &before {
        *per.entry(o).or_default() += 1;
    }
    for (&addr, &n) in &per {
        assert!((850..1150).contains(&n), "{addr}: {n}");
    }

    // Backend 3 removed from the config.
    let mut three = build(
        "u",
        &FOUR.replace("  - {address: '127.0.0.1:3'}\n", ""),
        &Registry::new(),
    );
    let s3 = all(&mut three);
    let after = owners(&three, s3, 4000);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b == "127.0.0.1:3" {
            moved += 1;
            assert_ne!(a, "127.0.0.1:3");
        } else {
            assert_eq!(a, b, "a key of a remaining backend moved");
        }
    }
    assert!(moved > 0);

    // Backend 3 ejected: same answer as removing it.
    let mut down = build(
        "u",
        &format!("{FOUR}passive: {{consecutive_failures: 1, ejection_time: 1h}}\n"),
        &Registry::new(),
    );
    let sd = all(&mut down);
    down.report_connect_failure(2);
    assert_eq!(owners(&down, sd, 4000), after);
}

#[test]
fn rendezvous_spreads_by_weight() {
    let mut up = build(
        "u",
        r#"
balance: hash
hash_on: 'header:x-user'
backends: [{address: '127.0.0.1:1', weight: 1}, {address: '127.0.0.1:2', weight: 3}]
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    let n = 20_000;
    let heavy = (0..n)
        .filter(|&k| up.select(s, Some(key::mix(k)), &[]).unwrap().index == 1)
        .count();
    let share = heavy as f64 / n as f64;
    assert!((share - 0.75).abs() < 0.02, "{share}");
    // Same key, same backend.
    let a = up.select(s, Some(42), &[]).unwrap().index;
    for _ in 0..10 {
        assert_eq!(up.select(s, Some(42), &[]).unwrap().index, a);
    }
    // Retry of a hashed request goes to another backend.
    assert_ne!(up.select(s, Some(42), &[a]).unwrap().index, a);
}

#[test]
fn hash_key_and_fallback() {
    let mut up = build(
        "u",
        "balance: hash\nhash_on: 'cookie:sid'\nbackends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]",
        &Registry::new(),
    );
    let s = all(&mut up);
    let req = http::Request::builder()
        .header("cookie", "theme=dark; sid=abc")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    assert_eq!(up.hash_key(&req, None), Some(key::fnv1a(b"abc")));
    let bare = http::Request::builder().body(()).unwrap().into_parts().0;
    assert_eq!(up.hash_key(&bare, None), None);
    // No key: round robin over the subset.
    let mut counts = [0; 2];
    for _ in 0..10 {
        counts[pick(&up, s)] += 1;
    }
    assert_eq!(counts, [5, 5]);

    let rr = build(
        "u",
        "backends: [{address: '127.0.0.1:1'}]",
        &Registry::new(),
    );
    assert_eq!(rr.hash_key(&req, None), None, "not hashing");
}

// --- subsets ----------------------------------------------------------------------------------

#[test]
fn subsets_by_labels() {
    let mut up = build(
        "u",
        r#"
backends:
  - {address: '127.0.0.1:1', labels: {track: stable, zone: eu}}
  - {address: '127.0.0.1:2', labels: {track: stable, zone: us}}
  - {address: '127.0.0.1:3', labels: {track: canary, zone: eu}}
"#,
        &Registry::new(),
    );
    let everyone = all(&mut up);
    let canary = up.subset(&labels(&[("track", "canary")])).unwrap();
    let stable = up.subset(&labels(&[("track", "stable")])).unwrap();
    let stable_eu = up
        .subset(&labels(&[("zone", "eu"), ("track", "stable")]))
        .unwrap();
    assert_eq!(up.subset(&labels(&[("track", "canary")])), Ok(canary));
    assert_eq!(up.subset(&BTreeMap::new()), Ok(everyone));
    assert_ne!(canary, stable);

    for _ in 0..10 {
        assert_eq!(pick(&up, canary), 2);
        assert_eq!(pick(&up, stable_eu), 0);
        assert_ne!(pick(&up, stable), 2);
    }
    let seen: std::collections::HashSet<usize> = (0..9).map(|_| pick(&up, everyone)).collect();
    assert_eq!(seen.len(), 3);

    let err = up
        .subset(&labels(&[("track", "canary"), ("zone", "us")]))
        .unwrap_err();
    assert_eq!(
        err,
        "no backend of upstream `u` carries the labels track=canary, zone=us"
    );
    // An id from another upstream with fewer subsets picks nothing rather than panicking.
    let mut other = build(
        "o",
        "backends: [{address: '127.0.0.1:9'}]",
        &Registry::new(),
    );
    all(&mut other);
    assert!(other.select(stable_eu, None, &[]).is_none());
}

// --- registry ---------------------------------------------------------------------------------

#[test]
fn registry_keeps_state_across_compiles_and_retain_drops_removed() {
    let r = Registry::new();
    let yaml = r#"
backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]
passive: {consecutive_failures: 1, ejection_time: 1h}
"#;
    let mut first = build("u", yaml, &r);
    let s1 = all(&mut first);
    first.report_connect_failure(0);
    let held = first.select(s1, None, &[]).unwrap();
    assert_eq!(held.index, 1);

    // A reload: the same upstream compiled again sees the ejection and the in-flight request.
    let mut second = build("u", yaml, &r);
    let s2 = all(&mut second);
    let st: Vec<(bool, usize)> = second
        .backend_states()
        .map(|b| (b.ejected, b.in_flight))
        .collect();
    assert_eq!(st, [(true, 0), (false, 1)]);
    assert_eq!(pick(&second, s2), 1);
    drop(held);
    assert_eq!(
        second.backend_states().map(|b| b.in_flight).sum::<usize>(),
        0
    );
    assert_eq!(r.len(), 2);

    // Another upstream with the same address has its own state.
    let other = build("v", yaml, &r);
    assert!(!other.backend_states().next().unwrap().ejected);
    assert_eq!(r.len(), 4);

    // Backend 0 removed and upstream v gone: retain forgets them.
    let third = Arc::new(build("u", "backends: [{address: '127.0.0.1:2'}]", &r));
    r.retain(std::slice::from_ref(&third));
    assert_eq!(r.len(), 1);
    // Configured again later: a fresh state, not ejected.
    let back = build("u", yaml, &r);
    assert!(!back.backend_states().next().unwrap().ejected);
    assert_eq!(r.len(), 2);
    r.retain(&[]);
    assert!(r.is_empty());
}

// --- passive ----------------------------------------------------------------------------------

#[test]
fn passive_ejection_and_recovery() {
    let mut up = build(
        "u",
        r#"
backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]
passive: {consecutive_failures: 3, ejection_time: 150ms}
"#,
        &Registry::new(),
    );
    let s = all(&mut up);
    let ejected = |up: &Upstream| up.backend_states().next().unwrap().ejected;
    up.report_status(0, 502);
    up.report_connect_failure(0);
    up.report_status(0, 404); // < 500 resets
    up.report_status(0, 500);
    up.report_status(0, 503);
    assert!(!ejected(&up));
    up.report_status(0, 504);
    assert!(ejected(&up));
    assert!((0..10).all(|_| pick(&up, s) == 1));
    let status = up.backend_states().next().unwrap();
    assert!(!status.healthy && status.ejected);

    sleep(Duration::from_millis(200));
    assert!(!ejected(&up), "back after ejection_time");
    let seen: std::collections::HashSet<usize> = (0..4).map(|_| pick(&up, s)).collect();
    assert!(seen.contains(&0));
    // Half-open: one failure re-ejects.
    up.report_connect_failure(0);
    assert!(ejected(&up));
    sleep(Duration::from_millis(200));
    up.report_status(0, 200);
    up.report_status(0, 500);
    assert!(!ejected(&up), "a success ended the probation");
}

#[test]
fn five_xx_ignored_unless_counted() {
    let up = build(
        "u",
        r#"
backends: [{address: '127.0.0.1:1'}]
passive: {consecutive_failures: 2, ejection_time: 1h, count_5xx: false}
"#,
        &Registry::new(),
    );
    for _ in 0..10 {
        up.report_status(0, 503);
    }
    assert!(!up.backend_states().next().unwrap().ejected);
    up.report_connect_failure(0);
    up.report_connect_failure(0);
    assert!(up.backend_states().next().unwrap().ejected);
    // Unknown index: ignored.
    up.report_connect_failure(7);
    up.report_status(7, 500);
}
