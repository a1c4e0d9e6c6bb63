//! Active and passive health checking, observed through traffic and metrics.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{config, dead_addr, Gateway, HttpBackend};

fn healthy_metric(gw: &Gateway, b: &str) -> Option<f64> {
    gw.metric(&format!(
        r#"tollgate_backend_healthy{{upstream="app",backend="{b}"}}"#
    ))
}

/// `n` GETs through a keep-alive client; every one must be a 200 echo. Returns hits per backend.
fn traffic(gw: &Gateway, client: &reqwest::blocking::Client, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = client
            .get(format!("{}/t/{i}", gw.url()))
            .send()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let status = r.status().as_u16();
        let body = r.text().unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        *seen
            .entry(v["backend"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    seen
}

/// Waits until the backend's health metric is `want`, sending traffic meanwhile (which must all
/// succeed). Returns how long it took.
fn await_health(
    gw: &Gateway,
    client: &reqwest::blocking::Client,
    addr: &str,
    want: f64,
    limit: Duration,
) -> Duration {
    let t = Instant::now();
    let deadline = t + limit;
    loop {
        if healthy_metric(gw, addr) == Some(want) {
            return t.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "tollgate_backend_healthy for {addr} not {want} within {limit:?} (is {:?})",
            healthy_metric(gw, addr)
        );
        traffic(gw, client, 2);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn active_checks_eject_and_restore_backends() {
    let b1 = HttpBackend::start("b1");
    let b2 = HttpBackend::start("b2");
    let gw = Gateway::start(
        &config(
            r#"
upstreams:
  app:
    backends: [ { address: "$B1" }, { address: "$B2" } ]
    health_check: { http: { path: /healthz }, interval: 200ms, timeout: 500ms, healthy: 2, unhealthy: 2 }
    passive: { consecutive_failures: 0 }   # active checks alone decide here
routes:
  - name: app
    upstream: app
"#,
        )
        .replace("$B1", &b1.addr())
        .replace("$B2", &b2.addr()),
    );
    let client = common::http_client();
    let (a1, a2) = (b1.addr(), b2.addr());
    assert!(gw.wait_metric(
        &format!(r#"tollgate_backend_healthy{{upstream="app",backend="{a1}"}}"#),
        1.0,
        Duration::from_secs(5)
    ));
    assert!(gw.wait_metric(
        &format!(r#"tollgate_backend_healthy{{upstream="app",backend="{a2}"}}"#),
        1.0,
        Duration::from_secs(5)
    ));
    let seen = traffic(&gw, &client, 20);
    assert!(
        seen.contains_key("b1") && seen.contains_key("b2"),
        "both serve: {seen:?}"
    );
    assert!(
        common::wait_until(Duration::from_secs(3), || b1.health_hits() >= 2
            && b2.health_hits() >= 2),
        "health probes (every 200ms) reach the backends: b1 {} b2 {}",
        b1.health_hits(),
        b2.health_hits()
    );

    // Stop b2: marked down within the thresholds (2 × 200 ms, plus slack), no request lost.
    b2.stop();
    let took = await_health(&gw, &client, &a2, 0.0, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "b2 marked unhealthy only after {took:?}"
    );
    let seen = traffic(&gw, &client, 20);
    assert_eq!(
        seen.get("b1"),
        Some(&20),
        "all traffic to b1 while b2 is down: {seen:?}"
    );

    // Restart b2: marked up again and receives traffic.
    b2.restart();
    let took = await_health(&gw, &client, &a2, 1.0, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "b2 marked healthy only after {took:?}"
    );
    let seen = traffic(&gw, &client, 20);
    assert!(
        seen.get("b2").copied().unwrap_or(0) > 0,
        "b2 gets traffic again: {seen:?}"
    );

    // A backend answering 500 on /healthz (still accepting connections) is taken out too.
    b1.set_health_status(500);
    await_health(&gw, &client, &a1, 0.0, Duration::from_secs(5));
    let seen = traffic(&gw, &client, 10);
    assert_eq!(
        seen.get("b2"),
        Some(&10),
        "b1 failing its check gets no traffic: {seen:?}"
    );
    b1.set_health_status(200);
    await_health(&gw, &client, &a1, 1.0, Duration::from_secs(5));

    // All down: a fast 503 JSON.
    b1.stop();
    b2.stop();
    assert!(gw.wait_metric(
        &format!(r#"tollgate_backend_healthy{{upstream="app",backend="{a1}"}}"#),
        0.0,
        Duration::from_secs(5)
    ));
    assert!(gw.wait_metric(
        &format!(r#"tollgate_backend_healthy{{upstream="app",backend="{a2}"}}"#),
        0.0,
        Duration::from_secs(5)
    ));
    for _ in 0..3 {
        let t = Instant::now();
        let r = gw.get("a.test", "/down");
        let took = t.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(took < Duration::from_secs(1), "503 took {took:?}");
        let j = r.json();
        assert_eq!(j["error"], "no_healthy_backend");
        assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));
    }
}

#[test]
fn passive_ejection_of_a_refusing_backend() {
    let b1 = HttpBackend::start("b1");
    let dead = dead_addr();
    let gw = Gateway::start(
        &config(
            r#"
upstreams:
  app:
    backends: [ { address: "$B1" }, { address: "$DEAD" } ]
    passive: { consecutive_failures: 2, ejection_time: 1m }
    retries: 1
routes:
  - name: app
    upstream: app
"#,
        )
        .replace("$B1", &b1.addr())
        .replace("$DEAD", &dead),
    );
    let client = common::http_client();
    // GETs are retried on the other backend: none fails, even before the ejection.
    let seen = traffic(&gw, &client, 20);
    assert_eq!(seen.get("b1"), Some(&20), "{seen:?}");
    assert_eq!(
        healthy_metric(&gw, &dead),
        Some(0.0),
        "ejected backend should report healthy 0"
    );
    assert_eq!(healthy_metric(&gw, &b1.addr()), Some(1.0));
    // POSTs are not retried: they all succeed only because the dead backend is out.
    for i in 0..20 {
        let r = client
            .post(format!("{}/p/{i}", gw.url()))
            .body("payload")
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().unwrap();
        assert_eq!(status, 200, "POST {i} after ejection: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["backend"], "b1");
        assert_eq!(v["method"], "POST");
    }
    assert_eq!(b1.hits(), 40);
}

#[test]
fn health_state_survives_a_reload() {
    let b1 = HttpBackend::start("b1");
    let b2 = HttpBackend::start("b2");
    let cfg = |marker: &str| {
        config(
            &r#"
upstreams:
  app:
    backends: [ { address: "$B1" }, { address: "$B2" } ]
    health_check: { http: { path: /healthz }, interval: 1s, timeout: 500ms, healthy: 2, unhealthy: 1 }
    passive: { consecutive_failures: 0 }
routes:
  - name: marker
    match: { path: /marker }
    respond: { body: "$MARKER" }
  - name: app
    upstream: app
"#
            .replace("$B1", &b1.addr())
            .replace("$B2", &b2.addr())
            .replace("$MARKER", marker),
        )
    };
    let gw = Gateway::start(&cfg("one"));
    let a2 = b2.addr();
    b2.stop();
    assert!(
        gw.wait_metric(
            &format!(r#"tollgate_backend_healthy{{upstream="app",backend="{a2}"}}"#),
            0.0,
            Duration::from_secs(5)
        ),
        "b2 not marked down"
    );
    // A reload that does not touch the upstream must not forget that b2 is down: POSTs (not
    // retried) right after it all go to b1. With a 1 s check interval, a reset state would
    // send about half of them to the dead backend.
    gw.write_config(&cfg("two"));
    gw.wait_generation(2, Duration::from_secs(5));
    assert_eq!(
        healthy_metric(&gw, &a2),
        Some(0.0),
        "b2 healthy again right after a reload"
    );
    let client = common::http_client();
    let mut bad = Vec::new();
    for i in 0..10 {
        let r = client
            .post(format!("{}/p/{i}", gw.url()))
            .body("x")
            .send()
            .unwrap();
        let st = r.status().as_u16();
        if st != 200 {
            bad.push(format!("POST {i}: {st} {}", r.text().unwrap_or_default()));
        }
    }
    assert!(
        bad.is_empty(),
        "requests sent to the down backend after a reload: {bad:?}"
    );
    assert_eq!(b1.hits(), 10);
}
